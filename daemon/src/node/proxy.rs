//! Ways into a userspace node's tailnet for local programs: a SOCKS5
//! proxy (RFC 1928, CONNECT and UDP ASSOCIATE, no authentication), an HTTP proxy (CONNECT,
//! and absolute-URI requests forwarded one per connection), and port
//! forwards from a tailnet port to a local service.
//!
//! Names are resolved through the tailnet (a node's short name or its full
//! name in the tailnet domain, as the map gives them); IP literals pass
//! through. Nothing is resolved through the system's DNS, so a name outside
//! the tailnet is refused, the way `--socks5-hostname` clients expect.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wire::{
    method, rep, Command, Greeting, Host, HttpError, Parsed, ProxyRequest, Reply, Request, RequestHead, Target,
    UdpDatagram, SOCKS_VERSION,
};
use wiremesh_dataplane::netstack::{Netstack, TcpStream};

pub mod wire;

/// How long a client may take to say where it wants to go.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection through the tunnel may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// The address a UDP datagram for `target` goes to: an IP literal, or a
    /// node's first address (IPv4 first, as `dial` tries them).
    fn resolve_one(&self, target: &Target) -> Option<SocketAddr> {
        let ip = match &target.host {
            Host::Ip(ip) => *ip,
            Host::Domain(name) => *(self.resolve)(name)?.first()?,
        };
        Some(SocketAddr::new(ip, target.port))
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

/// Reads from `s` into `buf` until `parse` has a whole message, and takes
/// that message's bytes off the front of `buf` (what follows stays there).
/// The parsers ask for at most a few hundred bytes, so `buf` stays small.
async fn read_message<S, T, E>(
    s: &mut S,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Parsed<T, E>,
) -> io::Result<Result<T, E>>
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 1024];
    loop {
        match parse(buf) {
            Ok(Some((message, used))) => {
                buf.drain(..used);
                return Ok(Ok(message));
            }
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What a SOCKS5 client asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// A request, and any bytes the client sent after it (early data).
    Request(Request, Vec<u8>),
    /// A request refused with this reply code.
    Refuse(u8),
}

async fn socks5(mut client: tokio::net::TcpStream, dialer: &Dialer) -> io::Result<()> {
    let (request, early) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, socks5_request(&mut client)).await {
        Ok(Ok(Asked::Request(r, early))) => (r, early),
        Ok(Ok(Asked::Refuse(code))) => return socks5_reply(&mut client, code, None).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    match request.command {
        Command::Connect => {}
        Command::Bind => return socks5_reply(&mut client, rep::COMMAND_NOT_SUPPORTED, None).await,
        Command::UdpAssociate => return udp_associate(client, dialer, request.target).await,
    }
    let mut remote = match dialer.dial(&request.target.host.to_string(), request.target.port).await {
        Ok(s) => s,
        Err(e) => return socks5_reply(&mut client, dial_reply(&e), None).await,
    };
    socks5_reply(&mut client, rep::SUCCEEDED, Some(remote.local_addr())).await?;
    remote.write_all(&early).await?;
    relay(&mut client, &mut remote).await?;
    Ok(())
}

/// The SOCKS5 reply code for a failed dial.
fn dial_reply(e: &DialError) -> u8 {
    match e {
        DialError::UnknownHost(_) => rep::HOST_UNREACHABLE,
        DialError::Refused(_) => rep::CONNECTION_REFUSED,
        DialError::Timeout => rep::TTL_EXPIRED,
        DialError::Other(_) => rep::GENERAL_FAILURE,
    }
}

/// Reads the greeting, answers it, and reads the request.
async fn socks5_request<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<Asked> {
    let mut buf = Vec::new();
    let greeting = read_message(s, &mut buf, Greeting::parse)
        .await?
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let chosen = greeting.choose();
    s.write_all(&[SOCKS_VERSION, chosen]).await?;
    if chosen == method::NO_ACCEPTABLE {
        // The client must close (RFC 1928, section 3).
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the client offers no method without authentication",
        ));
    }
    match read_message(s, &mut buf, Request::parse).await? {
        Ok(request) => Ok(Asked::Request(request, buf)),
        Err(e) => match e.reply() {
            Some(code) => Ok(Asked::Refuse(code)),
            None => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        },
    }
}

async fn socks5_reply<S: AsyncWrite + Unpin>(s: &mut S, code: u8, bound: Option<SocketAddr>) -> io::Result<()> {
    let mut out = Vec::with_capacity(22);
    Reply::new(code, bound).emit(&mut out).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    s.write_all(&out).await
}

/// The largest datagram relayed under UDP ASSOCIATE: a UDP payload of
/// 65,507 bytes plus the longest SOCKS5 header (3 + 1 + 1 + 255 + 2).
const UDP_BUF: usize = 65_507 + 262;

/// Serves a UDP ASSOCIATE (RFC 1928, section 7) until the client closes
/// its TCP connection: datagrams from the client (only from the client's
/// address, and from the port its request named if it named one) go into
/// the tailnet from one netstack UDP port; what comes back to that port
/// goes to the client with the sender's address in front.
async fn udp_associate(mut client: tokio::net::TcpStream, dialer: &Dialer, from: Target) -> io::Result<()> {
    let client_ip = client.peer_addr()?.ip();
    let local = match tokio::net::UdpSocket::bind(SocketAddr::new(client.local_addr()?.ip(), 0)).await {
        Ok(s) => s,
        Err(_) => return socks5_reply(&mut client, rep::GENERAL_FAILURE, None).await,
    };
    let tunnel = match dialer.stack.bind_udp(0) {
        Ok(s) => s,
        Err(_) => return socks5_reply(&mut client, rep::GENERAL_FAILURE, None).await,
    };
    socks5_reply(&mut client, rep::SUCCEEDED, Some(local.local_addr()?)).await?;
    // The port the client said it would send from (0: not known yet).
    let expected_port = match from.host {
        Host::Ip(_) => from.port,
        Host::Domain(_) => 0,
    };
    let mut client_udp: Option<SocketAddr> = None;
    let mut control = [0u8; 64];
    let mut up = vec![0u8; UDP_BUF];
    let mut down = vec![0u8; UDP_BUF];
    let mut framed = Vec::with_capacity(UDP_BUF);
    loop {
        tokio::select! {
            // Anything on the TCP connection, or its end, ends the association.
            _ = client.read(&mut control) => return Ok(()),
            r = local.recv_from(&mut up) => {
                let (n, sender) = r?;
                let from_client = sender.ip() == client_ip
                    && (expected_port == 0 || sender.port() == expected_port)
                    && client_udp.is_none_or(|c| c == sender);
                if !from_client {
                    continue;
                }
                let Ok(datagram) = UdpDatagram::parse(&up[..n]) else { continue };
                // Fragments are not reassembled; RFC 1928 lets a server drop them.
                if datagram.frag != 0 {
                    continue;
                }
                let Some(to) = dialer.resolve_one(&datagram.target) else { continue };
                client_udp = Some(sender);
                // A datagram the tunnel cannot take now is lost, as UDP may be.
                let _ = tunnel.send_to(datagram.data, to).await;
            }
            r = tunnel.recv_from(&mut down) => {
                let Ok((n, sender)) = r else { continue };
                let Some(to) = client_udp else { continue };
                framed.clear();
                if (UdpDatagram { frag: 0, target: sender.into(), data: &down[..n] }).emit(&mut framed).is_ok() {
                    let _ = local.send_to(&framed, to).await;
                }
            }
        }
    }
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
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Result<(Vec<u8>, Vec<u8>), HttpError>> {
    let mut buf = Vec::with_capacity(1024);
    let head =
        read_message(s, &mut buf, |b| wire::head_end(b).map(|end| end.map(|end| (b[..end].to_vec(), end)))).await?;
    Ok(head.map(|head| (head, buf)))
}

async fn http_proxy(mut client: tokio::net::TcpStream, dialer: &Dialer) -> io::Result<()> {
    let (head, rest) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(Ok(h))) => h,
        Ok(Ok(Err(e))) => return http_error(&mut client, e.status, e.code, e.error).await,
        Ok(Err(_)) | Err(_) => return Ok(()),
    };
    let request = match RequestHead::parse(&head).and_then(|h| ProxyRequest::from_head(&h)) {
        Ok(r) => r,
        Err(e) => return http_error(&mut client, e.status, e.code, e.error).await,
    };
    let (host, port, forward) = match request {
        ProxyRequest::Connect { host, port } => (host, port, None),
        ProxyRequest::Forward { host, port, head } => (host, port, Some(head)),
    };
    let mut remote = match dialer.dial(&host, port).await {
        Ok(r) => r,
        Err(e) => return dial_error(&mut client, e).await,
    };
    match forward {
        Some(head) => remote.write_all(&head).await?,
        None => client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?,
    }
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

    /// The SOCKS5 handshake over an in-memory stream: what it makes of the
    /// client's bytes and what it answers.
    async fn handshake(input: &[u8]) -> (io::Result<Asked>, Vec<u8>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(input).await.unwrap();
        // The client sends nothing more: a cut request meets the end of the stream.
        a.shutdown().await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), socks5_request(&mut b)).await.expect("no hang");
        drop(b);
        let mut out = Vec::new();
        a.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn socks5_requests() {
        let (r, out) = handshake(&[5, 1, 0, 5, 1, 0, 3, 4, b'b', b'e', b't', b'a', 0, 80]).await;
        let beta = Target { host: Host::Domain("beta".into()), port: 80 };
        assert_eq!(r.unwrap(), Asked::Request(Request { command: Command::Connect, target: beta }, vec![]));
        assert_eq!(out, [5, 0]);
        let (r, _) = handshake(&[5, 1, 0, 5, 1, 0, 1, 100, 64, 0, 2, 1, 187]).await;
        let Asked::Request(req, _) = r.unwrap() else { panic!("refused") };
        assert_eq!(req.target, Target::from(SocketAddr::from(([100, 64, 0, 2], 443))));
        // BIND is parsed (and refused by the caller); UDP ASSOCIATE too.
        let (r, _) = handshake(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 1]).await;
        assert!(matches!(r.unwrap(), Asked::Request(Request { command: Command::Bind, .. }, _)));
        let (r, _) = handshake(&[5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        assert!(matches!(r.unwrap(), Asked::Request(Request { command: Command::UdpAssociate, .. }, _)));
        // An unknown command and an unknown address type get their reply codes.
        let (r, _) = handshake(&[5, 1, 0, 5, 9, 0, 1, 1, 2, 3, 4, 0, 1]).await;
        assert_eq!(r.unwrap(), Asked::Refuse(rep::COMMAND_NOT_SUPPORTED));
        let (r, _) = handshake(&[5, 1, 0, 5, 1, 0, 9]).await;
        assert_eq!(r.unwrap(), Asked::Refuse(rep::ADDRESS_TYPE_NOT_SUPPORTED));
        // Only username/password offered: refused with 0xff.
        let (r, out) = handshake(&[5, 1, 2]).await;
        assert!(r.is_err());
        assert_eq!(out, [5, 0xff]);
        // SOCKS4 is not spoken.
        let (r, _) = handshake(&[4, 1, 0, 80]).await;
        assert!(r.is_err());
        // A stream that ends inside the request is an error, not a request.
        let (r, _) = handshake(&[5, 1, 0, 5, 1, 0, 3, 4, b'b', b'e']).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Bytes a client sends right after its request (before the reply, as
    /// optimistic clients do) are kept for the remote end, not lost.
    #[tokio::test]
    async fn socks5_early_data_is_kept() {
        let (r, _) = handshake(&[5, 1, 0, 5, 1, 0, 1, 100, 64, 0, 2, 0, 80, b'G', b'E', b'T']).await;
        let Asked::Request(_, early) = r.unwrap() else { panic!("refused") };
        assert_eq!(early, b"GET");
    }

    /// The HTTP head reader stops at the end of the head and refuses an
    /// endless one with 431.
    #[tokio::test]
    async fn http_heads_read() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(b"CONNECT beta:22 HTTP/1.1\r\nhost: beta:22\r\n\r\nSSH-2.0").await.unwrap();
        let (head, rest) = read_head(&mut b).await.unwrap().unwrap();
        assert_eq!(head, b"CONNECT beta:22 HTTP/1.1\r\nhost: beta:22\r\n\r\n");
        assert_eq!(rest, b"SSH-2.0");
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&vec![b'a'; wire::MAX_HEAD + 10]).await.unwrap();
        drop(a);
        assert_eq!(read_head(&mut b).await.unwrap().unwrap_err().status, 431);
    }
}
