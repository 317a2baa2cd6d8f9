//! Ways into a userspace node's tailnet for local programs: a SOCKS5
//! proxy (RFC 1928, CONNECT, no authentication), an HTTP proxy (CONNECT,
//! and absolute-URI requests forwarded one per connection), and port
//! forwards from a tailnet port to a local service.
//!
//! Names are resolved through the tailnet (a node's short name or its full
//! name in the tailnet domain, as the map gives them); IP literals pass
//! through. Nothing is resolved through the system's DNS, so a name outside
//! the tailnet is refused, the way `--socks5-hostname` clients expect.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wiremesh_dataplane::netstack::{Netstack, TcpStream};

/// How long a client may take to say where it wants to go.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection through the tunnel may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest HTTP request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;

/// Names to addresses: the tailnet's view (`None`: no such node).
pub type Resolve = Arc<dyn Fn(&str) -> Option<Vec<IpAddr>> + Send + Sync>;

/// Dials through the tunnel by name or address.
#[derive(Clone)]
pub struct Dialer {
    /// The node's netstack.
    pub stack: Netstack,
    /// Tailnet name resolution.
    pub resolve: Resolve,
}

/// Why a dial failed, as the proxies report it.
#[derive(Debug)]
pub enum DialError {
    /// The name is no node of the tailnet.
    UnknownHost(String),
    /// The node answered with a reset: nothing listens on that port.
    Refused(io::Error),
    /// No answer in time.
    Timeout,
    /// Anything else (no route, no address of that family...).
    Other(io::Error),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::UnknownHost(h) => write!(f, "no node named {h:?} in the tailnet"),
            DialError::Refused(e) => write!(f, "{e}"),
            DialError::Timeout => write!(f, "the connection timed out"),
            DialError::Other(e) => write!(f, "{e}"),
        }
    }
}

impl Dialer {
    /// Opens a TCP connection to `host:port` through the tunnel, trying the
    /// node's addresses in order (IPv4 first).
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                (self.resolve)(host).filter(|a| !a.is_empty()).ok_or_else(|| DialError::UnknownHost(host.into()))?
            }
        };
        let mut last = DialError::UnknownHost(host.into());
        for ip in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, self.stack.connect_tcp(SocketAddr::new(ip, port))).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => last = DialError::Refused(e),
                Ok(Err(e)) => last = DialError::Other(e),
                Err(_) => last = DialError::Timeout,
            }
        }
        Err(last)
    }
}

/// A `--forward` rule: a tailnet TCP port to a local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The port on the node's tailnet addresses.
    pub port: u16,
    /// Where connections go.
    pub target: SocketAddr,
}

impl FromStr for Forward {
    type Err = String;

    /// Parses `tcp:PORT=HOST:PORT` (the only protocol is TCP).
    fn from_str(s: &str) -> Result<Forward, String> {
        let rest = s
            .strip_prefix("tcp:")
            .ok_or_else(|| format!("{s:?}: a forward is tcp:PORT=ADDRESS:PORT (only TCP is forwarded)"))?;
        let (port, target) =
            rest.split_once('=').ok_or_else(|| format!("{s:?}: a forward is tcp:PORT=ADDRESS:PORT"))?;
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: {port:?} is no port"))?;
        if port == 0 {
            return Err(format!("{s:?}: the tailnet port cannot be 0"));
        }
        let target: SocketAddr = target.parse().map_err(|_| format!("{s:?}: {target:?} is no ADDRESS:PORT"))?;
        Ok(Forward { port, target })
    }
}

/// Serves the SOCKS5 proxy on `listener` until the runtime ends.
pub async fn serve_socks5(listener: tokio::net::TcpListener, dialer: Dialer) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let dialer = dialer.clone();
        tokio::spawn(async move {
            let _ = socks5(client, &dialer).await;
        });
    }
}

/// SOCKS5 reply codes (RFC 1928, section 6).
mod rep {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

async fn socks5(mut client: tokio::net::TcpStream, dialer: &Dialer) -> io::Result<()> {
    let (host, port) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, socks5_request(&mut client)).await {
        Ok(Ok(Ok(target))) => target,
        Ok(Ok(Err(code))) => {
            socks5_reply(&mut client, code, None).await?;
            return Ok(());
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let mut remote = match dialer.dial(&host, port).await {
        Ok(s) => s,
        Err(e) => {
            let code = match e {
                DialError::UnknownHost(_) => rep::HOST_UNREACHABLE,
                DialError::Refused(_) => rep::CONNECTION_REFUSED,
                DialError::Timeout => rep::TTL_EXPIRED,
                DialError::Other(_) => rep::GENERAL_FAILURE,
            };
            socks5_reply(&mut client, code, None).await?;
            return Ok(());
        }
    };
    socks5_reply(&mut client, rep::SUCCEEDED, Some(remote.local_addr())).await?;
    relay(&mut client, &mut remote).await?;
    Ok(())
}

/// Reads the greeting and the request: the target, or the reply code to refuse with.
async fn socks5_request<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<Result<(String, u16), u8>> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not SOCKS version 5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        // No acceptable method: the client must close (RFC 1928, section 3).
        s.write_all(&[5, 0xff]).await?;
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the client offers no method without authentication",
        ));
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not SOCKS version 5"));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            s.read_exact(&mut name).await?;
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => n,
                _ => return Ok(Err(rep::HOST_UNREACHABLE)),
            }
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        _ => return Ok(Err(rep::ADDRESS_TYPE_NOT_SUPPORTED)),
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    if req[1] != 1 {
        return Ok(Err(rep::COMMAND_NOT_SUPPORTED));
    }
    Ok(Ok((host, u16::from_be_bytes(port))))
}

async fn socks5_reply<S: AsyncWrite + Unpin>(s: &mut S, code: u8, bound: Option<SocketAddr>) -> io::Result<()> {
    let mut out = vec![5, code, 0];
    match bound.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))) {
        SocketAddr::V4(a) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
    s.write_all(&out).await
}

/// Serves the HTTP proxy on `listener` until the runtime ends.
pub async fn serve_http(listener: tokio::net::TcpListener, dialer: Dialer) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let dialer = dialer.clone();
        tokio::spawn(async move {
            let _ = http_proxy(client, &dialer).await;
        });
    }
}

/// An HTTP error answer with the project's JSON error body.
async fn http_error<S: AsyncWrite + Unpin>(s: &mut S, status: u16, code: &str, error: &str) -> io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = serde_json::json!({ "code": code, "error": error }).to_string();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

/// Reads up to the end of the request head; returns the head and any bytes after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Splits `host[:port]` (with `[v6]` brackets) using `default` for a missing port.
fn host_port(authority: &str, default: Option<u16>) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default?,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), default?)),
    }
    .filter(|(h, _)| !h.is_empty())
}

async fn http_proxy(mut client: tokio::net::TcpStream, dialer: &Dialer) -> io::Result<()> {
    let (head, rest) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            return http_error(&mut client, 431, "head_too_large", "the request head is larger than 16 KiB").await
        }
        Ok(Err(_)) | Err(_) => return Ok(()),
    };
    let Ok(text) = std::str::from_utf8(&head) else {
        return http_error(&mut client, 400, "bad_request", "the request head is not UTF-8").await;
    };
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return http_error(&mut client, 400, "bad_request", "malformed request line").await;
    };
    if !version.starts_with("HTTP/1.") {
        return http_error(&mut client, 400, "bad_request", "only HTTP/1.x is proxied").await;
    }
    if method == "CONNECT" {
        let Some((host, port)) = host_port(target, None) else {
            return http_error(&mut client, 400, "bad_request", "CONNECT needs host:port").await;
        };
        let mut remote = match dialer.dial(&host, port).await {
            Ok(r) => r,
            Err(e) => return dial_error(&mut client, e).await,
        };
        client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
        remote.write_all(&rest).await?;
        relay(&mut client, &mut remote).await?;
        return Ok(());
    }
    // An absolute URI: http://authority/path, sent on in origin form.
    let Some(after) = target.strip_prefix("http://") else {
        return http_error(
            &mut client,
            400,
            "bad_request",
            "a proxied request needs an absolute http:// URI (use CONNECT for anything else)",
        )
        .await;
    };
    let (authority, path) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    let Some((host, port)) = host_port(authority, Some(80)) else {
        return http_error(&mut client, 400, "bad_request", "bad host in the URI").await;
    };
    let mut out = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        // Hop-by-hop headers end here; one request per connection.
        if matches!(name.as_str(), "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    let mut remote = match dialer.dial(&host, port).await {
        Ok(r) => r,
        Err(e) => return dial_error(&mut client, e).await,
    };
    remote.write_all(out.as_bytes()).await?;
    remote.write_all(&rest).await?;
    relay(&mut client, &mut remote).await?;
    Ok(())
}

async fn dial_error(client: &mut tokio::net::TcpStream, e: DialError) -> io::Result<()> {
    let (status, code) = match e {
        DialError::UnknownHost(_) => (502, "unknown_host"),
        DialError::Refused(_) => (502, "connection_refused"),
        DialError::Timeout => (504, "timeout"),
        DialError::Other(_) => (502, "unreachable"),
    };
    http_error(client, status, code, &e.to_string()).await
}

/// Bytes each direction of a relay moves per read: large, so each pass
/// through the netstack's lock carries many segments (tokio's default of
/// 8 KiB costs about a third of the throughput).
const RELAY_BUF: usize = 256 * 1024;

/// Copies both ways between a local socket and a tunnel stream until both close.
async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUF, RELAY_BUF).await
}

/// Serves one `--forward` rule until the runtime ends.
pub async fn serve_forward(listener: wiremesh_dataplane::netstack::TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
                Ok(Ok(mut local)) => {
                    let _ = relay(&mut inbound, &mut local).await;
                }
                // The local service is not there: the tailnet client sees a reset.
                _ => inbound.abort(),
            }
        });
    }
}

/// Which local proxies and forwards to run.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    /// `--socks5 ADDRESS:PORT`.
    pub socks5: Option<SocketAddr>,
    /// `--http-proxy ADDRESS:PORT`.
    pub http: Option<SocketAddr>,
    /// `--forward tcp:PORT=ADDRESS:PORT`, any number.
    pub forwards: Vec<Forward>,
}

/// Binds every listener now (so a port in use is an error at start) and
/// serves them on the current runtime.
pub async fn start(proxies: &Proxies, dialer: Dialer) -> Result<(), String> {
    if let Some(addr) = proxies.socks5 {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--socks5 {addr}: {e}"))?;
        tokio::spawn(serve_socks5(l, dialer.clone()));
    }
    if let Some(addr) = proxies.http {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--http-proxy {addr}: {e}"))?;
        tokio::spawn(serve_http(l, dialer.clone()));
    }
    for f in &proxies.forwards {
        let l = dialer.stack.listen_tcp(f.port).map_err(|e| format!("--forward tcp:{}: {e}", f.port))?;
        tokio::spawn(serve_forward(l, f.target));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse() {
        let f: Forward = "tcp:8080=127.0.0.1:3000".parse().unwrap();
        assert_eq!(f, Forward { port: 8080, target: "127.0.0.1:3000".parse().unwrap() });
        let f: Forward = "tcp:443=[::1]:8443".parse().unwrap();
        assert_eq!(f.target, "[::1]:8443".parse().unwrap());
        for bad in ["udp:53=127.0.0.1:53", "tcp:8080", "tcp:x=127.0.0.1:1", "tcp:0=127.0.0.1:1", "tcp:80=localhost:80"]
        {
            assert!(bad.parse::<Forward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn authorities_split() {
        assert_eq!(host_port("beta:8080", None), Some(("beta".into(), 8080)));
        assert_eq!(host_port("beta", Some(80)), Some(("beta".into(), 80)));
        assert_eq!(host_port("beta", None), None);
        assert_eq!(host_port("[fd7a::1]:443", None), Some(("fd7a::1".into(), 443)));
        assert_eq!(host_port("[fd7a::1]", Some(80)), Some(("fd7a::1".into(), 80)));
        assert_eq!(host_port("fd7a::1", Some(80)), None);
        assert_eq!(host_port(":80", None), None);
        assert_eq!(host_port("beta:99999", None), None);
    }

    /// The SOCKS5 request parser over an in-memory stream.
    #[tokio::test]
    async fn socks5_requests() {
        async fn run(input: &[u8]) -> (io::Result<Result<(String, u16), u8>>, Vec<u8>) {
            let (mut a, mut b) = tokio::io::duplex(1024);
            a.write_all(input).await.unwrap();
            let r = socks5_request(&mut b).await;
            drop(b);
            let mut out = Vec::new();
            a.read_to_end(&mut out).await.unwrap();
            (r, out)
        }
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 3, 4, b'b', b'e', b't', b'a', 0, 80]).await;
        assert_eq!(r.unwrap(), Ok(("beta".into(), 80)));
        assert_eq!(out, [5, 0]);
        let (r, _) = run(&[5, 1, 0, 5, 1, 0, 1, 100, 64, 0, 2, 1, 187]).await;
        assert_eq!(r.unwrap(), Ok(("100.64.0.2".into(), 443)));
        // BIND is not supported; an unknown address type neither.
        let (r, _) = run(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 1]).await;
        assert_eq!(r.unwrap(), Err(rep::COMMAND_NOT_SUPPORTED));
        let (r, _) = run(&[5, 1, 0, 5, 1, 0, 9]).await;
        assert_eq!(r.unwrap(), Err(rep::ADDRESS_TYPE_NOT_SUPPORTED));
        // Only username/password offered: refused with 0xff.
        let (r, out) = run(&[5, 1, 2]).await;
        assert!(r.is_err());
        assert_eq!(out, [5, 0xff]);
        // SOCKS4 is not spoken.
        let (r, _) = run(&[4, 1, 0, 80]).await;
        assert!(r.is_err());
    }
}
