//! The local proxies' wire formats as pure functions over byte slices:
//! SOCKS5 (RFC 1928: the greeting, requests, replies and the UDP
//! ASSOCIATE datagram header) and HTTP/1.x proxy request heads (RFC 9112).
//!
//! Every parser takes the bytes received so far and answers with the
//! message and the number of bytes it used, `None` when more bytes are
//! needed, or an error; no parser reads past the slice or trusts a length
//! field before checking it against the slice. The async code in
//! `proxy.rs` only moves bytes, so this module is what the `proxy` fuzz
//! target drives (it includes this file as source, std only).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The SOCKS protocol version this proxy speaks (RFC 1928, section 3).
pub const SOCKS_VERSION: u8 = 5;

/// Authentication methods (RFC 1928, section 3).
pub mod method {
    /// No authentication required.
    pub const NO_AUTH: u8 = 0;
    /// None of the offered methods is acceptable.
    pub const NO_ACCEPTABLE: u8 = 0xff;
}

/// SOCKS5 reply codes (RFC 1928, section 6).
pub mod rep {
    /// The request was granted.
    pub const SUCCEEDED: u8 = 0;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 1;
    /// Host unreachable (here: no such node in the tailnet).
    pub const HOST_UNREACHABLE: u8 = 4;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 5;
    /// TTL expired (here: the connection timed out).
    pub const TTL_EXPIRED: u8 = 6;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// Address types (RFC 1928, section 5).
mod atyp {
    pub const IPV4: u8 = 1;
    pub const DOMAIN: u8 = 3;
    pub const IPV6: u8 = 4;
}

/// Why SOCKS5 bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocksError {
    /// The version byte is not 5.
    Version(u8),
    /// A command other than CONNECT (1), BIND (2) and UDP ASSOCIATE (3).
    Command(u8),
    /// An address type other than IPv4 (1), domain name (3) and IPv6 (4).
    AddressType(u8),
    /// A domain name of length zero.
    EmptyName,
    /// A domain name that is not UTF-8.
    NameNotUtf8,
    /// A UDP datagram shorter than its header says.
    Truncated,
    /// A value too long for its one-byte length field (to encode).
    TooLong,
}

impl SocksError {
    /// The reply code to refuse a request with (`None`: close without a reply).
    pub fn reply(self) -> Option<u8> {
        match self {
            SocksError::Version(_) => None,
            SocksError::Command(_) => Some(rep::COMMAND_NOT_SUPPORTED),
            SocksError::AddressType(_) => Some(rep::ADDRESS_TYPE_NOT_SUPPORTED),
            SocksError::EmptyName | SocksError::NameNotUtf8 => Some(rep::HOST_UNREACHABLE),
            SocksError::Truncated | SocksError::TooLong => Some(rep::GENERAL_FAILURE),
        }
    }
}

impl fmt::Display for SocksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocksError::Version(v) => write!(f, "SOCKS version {v}, not 5"),
            SocksError::Command(c) => write!(f, "unknown SOCKS5 command {c}"),
            SocksError::AddressType(t) => write!(f, "unknown SOCKS5 address type {t}"),
            SocksError::EmptyName => write!(f, "an empty host name"),
            SocksError::NameNotUtf8 => write!(f, "a host name that is not UTF-8"),
            SocksError::Truncated => write!(f, "a UDP datagram shorter than its header"),
            SocksError::TooLong => write!(f, "a value longer than 255 bytes"),
        }
    }
}

impl std::error::Error for SocksError {}

/// What a parser makes of the bytes so far: the message and how many bytes
/// it took, or `None` when it needs more.
pub type Parsed<T, E> = Result<Option<(T, usize)>, E>;

/// The client's greeting: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The methods offered, in the client's order (at most 255).
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Parses `VER NMETHODS METHODS...`.
    pub fn parse(buf: &[u8]) -> Parsed<Greeting, SocksError> {
        let Some(&version) = buf.first() else { return Ok(None) };
        if version != SOCKS_VERSION {
            return Err(SocksError::Version(version));
        }
        let Some(&n) = buf.get(1) else { return Ok(None) };
        let end = 2 + usize::from(n);
        let Some(methods) = buf.get(2..end) else { return Ok(None) };
        Ok(Some((Greeting { methods: methods.to_vec() }, end)))
    }

    /// Appends the greeting's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        let n = u8::try_from(self.methods.len()).map_err(|_| SocksError::TooLong)?;
        out.extend_from_slice(&[SOCKS_VERSION, n]);
        out.extend_from_slice(&self.methods);
        Ok(())
    }

    /// The method the server picks: no authentication, or none acceptable.
    pub fn choose(&self) -> u8 {
        if self.methods.contains(&method::NO_AUTH) {
            method::NO_AUTH
        } else {
            method::NO_ACCEPTABLE
        }
    }
}

/// A host as SOCKS5 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A domain name (1 to 255 bytes of UTF-8), resolved by the proxy.
    Domain(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Domain(d) => f.write_str(d),
        }
    }
}

/// A host and port: `ATYP DST.ADDR DST.PORT` (RFC 1928, section 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where.
    pub host: Host,
    /// Which port.
    pub port: u16,
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Target {
        Target { host: Host::Ip(a.ip()), port: a.port() }
    }
}

impl Target {
    /// Parses `ATYP ADDR PORT`.
    pub fn parse(buf: &[u8]) -> Parsed<Target, SocksError> {
        let Some(&kind) = buf.first() else { return Ok(None) };
        let (host, end) = match kind {
            atyp::IPV4 => {
                let Some(a) = buf.get(1..5) else { return Ok(None) };
                let a: [u8; 4] = a.try_into().map_err(|_| SocksError::Truncated)?;
                (Host::Ip(Ipv4Addr::from(a).into()), 5)
            }
            atyp::IPV6 => {
                let Some(a) = buf.get(1..17) else { return Ok(None) };
                let a: [u8; 16] = a.try_into().map_err(|_| SocksError::Truncated)?;
                (Host::Ip(Ipv6Addr::from(a).into()), 17)
            }
            atyp::DOMAIN => {
                let Some(&len) = buf.get(1) else { return Ok(None) };
                if len == 0 {
                    return Err(SocksError::EmptyName);
                }
                let end = 2 + usize::from(len);
                let Some(name) = buf.get(2..end) else { return Ok(None) };
                let name = std::str::from_utf8(name).map_err(|_| SocksError::NameNotUtf8)?;
                (Host::Domain(name.to_string()), end)
            }
            other => return Err(SocksError::AddressType(other)),
        };
        let Some(port) = buf.get(end..end + 2) else { return Ok(None) };
        let port = u16::from_be_bytes([port[0], port[1]]);
        Ok(Some((Target { host, port }, end + 2)))
    }

    /// Appends `ATYP ADDR PORT` to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        match &self.host {
            Host::Ip(IpAddr::V4(a)) => {
                out.push(atyp::IPV4);
                out.extend_from_slice(&a.octets());
            }
            Host::Ip(IpAddr::V6(a)) => {
                out.push(atyp::IPV6);
                out.extend_from_slice(&a.octets());
            }
            Host::Domain(d) => {
                let len = u8::try_from(d.len()).map_err(|_| SocksError::TooLong)?;
                if len == 0 {
                    return Err(SocksError::EmptyName);
                }
                out.extend_from_slice(&[atyp::DOMAIN, len]);
                out.extend_from_slice(d.as_bytes());
            }
        }
        out.extend_from_slice(&self.port.to_be_bytes());
        Ok(())
    }
}

/// The three SOCKS5 commands (RFC 1928, section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Open a TCP connection to the target.
    Connect = 1,
    /// Accept one TCP connection from the target (not served here).
    Bind = 2,
    /// Relay UDP datagrams; the target is where the client will send from.
    UdpAssociate = 3,
}

/// A client's request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Where (for UDP ASSOCIATE: where the client's datagrams will come from).
    pub target: Target,
}

impl Request {
    /// Parses a request. An unknown command is refused as soon as its
    /// byte arrives, before the address is read.
    pub fn parse(buf: &[u8]) -> Parsed<Request, SocksError> {
        let Some(&version) = buf.first() else { return Ok(None) };
        if version != SOCKS_VERSION {
            return Err(SocksError::Version(version));
        }
        let Some(&cmd) = buf.get(1) else { return Ok(None) };
        let command = match cmd {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            other => return Err(SocksError::Command(other)),
        };
        // The reserved byte is not checked: RFC 1928 names no meaning for it.
        let Some(rest) = buf.get(3..) else { return Ok(None) };
        Ok(Target::parse(rest)?.map(|(target, n)| (Request { command, target }, 3 + n)))
    }

    /// Appends the request's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        out.extend_from_slice(&[SOCKS_VERSION, self.command as u8, 0]);
        self.target.emit(out)
    }
}

/// The server's reply: `VER REP RSV ATYP BND.ADDR BND.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// One of [`rep`].
    pub code: u8,
    /// The address the server bound (for UDP ASSOCIATE: where to send datagrams).
    pub bound: Target,
}

impl Reply {
    /// A reply with `code` and `bound` (0.0.0.0:0 when there is none).
    pub fn new(code: u8, bound: Option<SocketAddr>) -> Reply {
        Reply { code, bound: bound.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))).into() }
    }

    /// Parses a reply (the client's side; used by tests).
    pub fn parse(buf: &[u8]) -> Parsed<Reply, SocksError> {
        let Some(&version) = buf.first() else { return Ok(None) };
        if version != SOCKS_VERSION {
            return Err(SocksError::Version(version));
        }
        let Some(&code) = buf.get(1) else { return Ok(None) };
        let Some(rest) = buf.get(3..) else { return Ok(None) };
        Ok(Target::parse(rest)?.map(|(bound, n)| (Reply { code, bound }, 3 + n)))
    }

    /// Appends the reply's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        out.extend_from_slice(&[SOCKS_VERSION, self.code, 0]);
        self.bound.emit(out)
    }
}

/// A datagram relayed under UDP ASSOCIATE:
/// `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA` (RFC 1928, section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// The fragment number (0: a whole datagram; others are dropped here).
    pub frag: u8,
    /// Where it goes (from the client) or where it came from (to the client).
    pub target: Target,
    /// The payload.
    pub data: &'a [u8],
}

impl<'a> UdpDatagram<'a> {
    /// Parses one whole datagram.
    pub fn parse(buf: &'a [u8]) -> Result<UdpDatagram<'a>, SocksError> {
        // The two reserved bytes are not checked, as for requests.
        let (Some(&frag), Some(rest)) = (buf.get(2), buf.get(3..)) else { return Err(SocksError::Truncated) };
        match Target::parse(rest)? {
            Some((target, n)) => Ok(UdpDatagram { frag, target, data: rest.get(n..).unwrap_or_default() }),
            None => Err(SocksError::Truncated),
        }
    }

    /// Appends the datagram's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        out.extend_from_slice(&[0, 0, self.frag]);
        self.target.emit(out)?;
        out.extend_from_slice(self.data);
        Ok(())
    }
}

/// Why an HTTP proxy request was refused: the status and the JSON error
/// body's `code` and `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    /// The HTTP status.
    pub status: u16,
    /// The machine-readable code.
    pub code: &'static str,
    /// The explanation for people.
    pub error: &'static str,
}

const fn bad_request(error: &'static str) -> HttpError {
    HttpError { status: 400, code: "bad_request", error }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.error)
    }
}

impl std::error::Error for HttpError {}

/// The longest HTTP request head the proxy reads (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// Where the head that starts `buf` ends (just after its `\r\n\r\n`),
/// `None` while it has not ended, or 431 once more than [`MAX_HEAD`] bytes
/// hold no end.
pub fn head_end(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    match window.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => Ok(Some(i + 4)),
        None if buf.len() >= MAX_HEAD => {
            Err(HttpError { status: 431, code: "head_too_large", error: "the request head is larger than 16 KiB" })
        }
        None => Ok(None),
    }
}

/// An HTTP/1.x request head, borrowed from the bytes it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The method (a token).
    pub method: &'a str,
    /// The request target as sent (visible ASCII).
    pub target: &'a str,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: &'a str,
    /// Each header's name and value (the value without surrounding blanks).
    pub headers: Vec<(&'a str, &'a str)>,
}

/// RFC 9110, section 5.6.2: the characters of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

impl<'a> RequestHead<'a> {
    /// Parses a whole head (the bytes up to and with its `\r\n\r\n`, as
    /// [`head_end`] finds them). Bare CR or LF, obsolete line folding,
    /// control characters and malformed request lines are refused (RFC
    /// 9112 allows a recipient to), so nothing the proxy passes on can
    /// split into more lines at the other end.
    pub fn parse(head: &'a [u8]) -> Result<RequestHead<'a>, HttpError> {
        let body = head.strip_suffix(b"\r\n\r\n").ok_or(bad_request("the request head does not end in CRLF CRLF"))?;
        let text = std::str::from_utf8(body).map_err(|_| bad_request("the request head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad_request("malformed request line"));
        };
        if !is_token(method) {
            return Err(bad_request("malformed request line"));
        }
        if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad_request("malformed request target"));
        }
        if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
            return Err(bad_request("only HTTP/1.x is proxied"));
        }
        let mut headers = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                return Err(bad_request("obsolete line folding in a header"));
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(bad_request("a header line without a colon"));
            };
            if !is_token(name) {
                return Err(bad_request("malformed header name"));
            }
            if value.bytes().any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f) {
                return Err(bad_request("a control character in a header value"));
            }
            headers.push((name, value.trim_matches([' ', '\t'])));
        }
        Ok(RequestHead { method, target, version, headers })
    }

    /// Appends the head's bytes to `out`, with `target` in place of the
    /// head's own when given.
    pub fn emit(&self, target: Option<&str>, out: &mut Vec<u8>) {
        let target = target.unwrap_or(self.target);
        out.extend_from_slice(format!("{} {} {}\r\n", self.method, target, self.version).as_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// What a client asks the HTTP proxy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRequest {
    /// `CONNECT host:port`: a tunnel.
    Connect {
        /// The host (brackets of an IPv6 literal removed).
        host: String,
        /// The port.
        port: u16,
    },
    /// An absolute `http://` URI: the request forwarded one per connection.
    Forward {
        /// The host (brackets of an IPv6 literal removed).
        host: String,
        /// The port (80 unless the URI names one).
        port: u16,
        /// The head to send on: origin-form target, hop-by-hop headers
        /// removed, `connection: close` added.
        head: Vec<u8>,
    },
}

/// Headers that end at the proxy (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [&str; 4] = ["proxy-connection", "proxy-authorization", "connection", "keep-alive"];

impl ProxyRequest {
    /// What `head` asks for.
    pub fn from_head(head: &RequestHead<'_>) -> Result<ProxyRequest, HttpError> {
        if head.method == "CONNECT" {
            let (host, port) = host_port(head.target, None).ok_or(bad_request("CONNECT needs host:port"))?;
            return Ok(ProxyRequest::Connect { host, port });
        }
        let after = head
            .target
            .strip_prefix("http://")
            .ok_or(bad_request("a proxied request needs an absolute http:// URI (use CONNECT for anything else)"))?;
        let (authority, path) = match after.find(['/', '?']) {
            Some(i) if after.as_bytes()[i] == b'?' => (&after[..i], format!("/{}", &after[i..])),
            Some(i) => (&after[..i], after[i..].to_string()),
            None => (after, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(bad_request("credentials in the URI are not forwarded"));
        }
        let (host, port) = host_port(authority, Some(80)).ok_or(bad_request("bad host in the URI"))?;
        let kept = RequestHead {
            headers: head
                .headers
                .iter()
                .filter(|(name, _)| !HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)))
                .copied()
                .chain([("connection", "close")])
                .collect(),
            ..head.clone()
        };
        let mut out = Vec::new();
        kept.emit(Some(&path), &mut out);
        Ok(ProxyRequest::Forward { host, port, head: out })
    }
}

/// Splits `host[:port]` (with `[v6]` brackets) using `default` for a missing port.
pub fn host_port(authority: &str, default: Option<u16>) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default?,
            None => return None,
        };
        return Some((host.to_string(), port)).filter(|(h, _)| h.parse::<Ipv6Addr>().is_ok());
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), parse_port(p)?)),
        Some(_) => None,
        None => Some((authority.to_string(), default?)),
    }
    .filter(|(h, _)| !h.is_empty())
}

/// A port in decimal digits only (`u16::from_str` also takes a leading `+`).
fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every proper prefix of `bytes` asks for more; the whole parses and
    /// uses exactly its length.
    fn whole<T: fmt::Debug>(bytes: &[u8], parse: impl Fn(&[u8]) -> Parsed<T, SocksError>) -> T {
        for cut in 0..bytes.len() {
            assert!(matches!(parse(&bytes[..cut]), Ok(None)), "prefix of {cut} bytes: {:?}", parse(&bytes[..cut]));
        }
        let (m, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        m
    }

    #[test]
    fn greetings() {
        let g = whole(&[5, 2, 2, 0], Greeting::parse);
        assert_eq!(g.methods, [2, 0]);
        assert_eq!(g.choose(), method::NO_AUTH);
        assert_eq!(whole(&[5, 1, 2], Greeting::parse).choose(), method::NO_ACCEPTABLE);
        assert_eq!(whole(&[5, 0], Greeting::parse).choose(), method::NO_ACCEPTABLE);
        assert_eq!(Greeting::parse(&[4, 1, 0]), Err(SocksError::Version(4)));
        let mut out = Vec::new();
        g.emit(&mut out).unwrap();
        assert_eq!(out, [5, 2, 2, 0]);
        assert_eq!(Greeting { methods: vec![0; 256] }.emit(&mut out), Err(SocksError::TooLong));
    }

    #[test]
    fn requests() {
        let v6: Ipv6Addr = "fd7a:115c:a1e0::1".parse().unwrap();
        let mut bytes = vec![5, 1, 0, 4];
        bytes.extend_from_slice(&v6.octets());
        bytes.extend_from_slice(&[0x1f, 0x90]);
        let r = whole(&bytes, Request::parse);
        assert_eq!(r, Request { command: Command::Connect, target: SocketAddr::new(v6.into(), 8080).into() });
        let mut out = Vec::new();
        r.emit(&mut out).unwrap();
        assert_eq!(out, bytes);

        let bytes = [5, 3, 0, 3, 5, b'g', b'a', b'm', b'm', b'a', 0, 53];
        let r = whole(&bytes, Request::parse);
        assert_eq!(r.command, Command::UdpAssociate);
        assert_eq!(r.target, Target { host: Host::Domain("gamma".into()), port: 53 });
        // Refused as soon as the bad byte is there.
        assert_eq!(Request::parse(&[5, 4]), Err(SocksError::Command(4)));
        assert_eq!(Request::parse(&[5, 1, 0, 2]), Err(SocksError::AddressType(2)));
        assert_eq!(Request::parse(&[5, 1, 0, 3, 0]), Err(SocksError::EmptyName));
        assert_eq!(Request::parse(&[5, 1, 0, 3, 1, 0xff, 0, 80]), Err(SocksError::NameNotUtf8));
        assert_eq!(Request::parse(&[6]), Err(SocksError::Version(6)));
        assert_eq!(SocksError::EmptyName.reply(), Some(rep::HOST_UNREACHABLE));
        assert_eq!(SocksError::Version(4).reply(), None);
        // A name longer than 255 bytes has no encoding.
        let long = Target { host: Host::Domain("a".repeat(256)), port: 1 };
        assert_eq!(long.emit(&mut Vec::new()), Err(SocksError::TooLong));
    }

    #[test]
    fn replies() {
        let r = Reply::new(rep::SUCCEEDED, Some("127.0.0.1:1080".parse().unwrap()));
        let mut out = Vec::new();
        r.emit(&mut out).unwrap();
        assert_eq!(out, [5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38]);
        assert_eq!(whole(&out, Reply::parse), r);
        let mut out = Vec::new();
        Reply::new(rep::HOST_UNREACHABLE, None).emit(&mut out).unwrap();
        assert_eq!(out, [5, 4, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn udp_datagrams() {
        let bytes = [0, 0, 0, 1, 100, 64, 0, 7, 0, 7, b'p', b'i', b'n', b'g'];
        let d = UdpDatagram::parse(&bytes).unwrap();
        assert_eq!(d.frag, 0);
        assert_eq!(d.target, Target::from(SocketAddr::from(([100, 64, 0, 7], 7))));
        assert_eq!(d.data, b"ping");
        let mut out = Vec::new();
        d.emit(&mut out).unwrap();
        assert_eq!(out, bytes);
        // An empty payload is a datagram; a cut header is not.
        assert_eq!(UdpDatagram::parse(&bytes[..10]).unwrap().data, b"");
        for cut in 0..10 {
            assert_eq!(UdpDatagram::parse(&bytes[..cut]), Err(SocksError::Truncated), "{cut}");
        }
        assert_eq!(UdpDatagram::parse(&[0, 0, 0, 3, 200, b'a']), Err(SocksError::Truncated));
    }

    #[test]
    fn head_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Ok(Some(18)));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), Ok(None));
        assert_eq!(head_end(&[b'a'; MAX_HEAD]).unwrap_err().status, 431);
        // The end must lie within the first MAX_HEAD bytes.
        let mut late = vec![b'a'; MAX_HEAD];
        late.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head_end(&late).unwrap_err().status, 431);
    }

    #[test]
    fn connect_heads() {
        let h = RequestHead::parse(b"CONNECT [fd7a::1]:443 HTTP/1.1\r\nHost:  [fd7a::1]:443 \r\n\r\n").unwrap();
        assert_eq!(h.headers, [("Host", "[fd7a::1]:443")]);
        assert_eq!(ProxyRequest::from_head(&h), Ok(ProxyRequest::Connect { host: "fd7a::1".into(), port: 443 }));
        let h = RequestHead::parse(b"CONNECT beta HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(ProxyRequest::from_head(&h).unwrap_err().error, "CONNECT needs host:port");
    }

    #[test]
    fn forwarded_heads() {
        let h = RequestHead::parse(
            b"GET http://beta:8080/a?b HTTP/1.1\r\nHost: beta:8080\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        let ProxyRequest::Forward { host, port, head } = ProxyRequest::from_head(&h).unwrap() else { panic!() };
        assert_eq!((host.as_str(), port), ("beta", 8080));
        assert_eq!(head, b"GET /a?b HTTP/1.1\r\nHost: beta:8080\r\nAccept: */*\r\nconnection: close\r\n\r\n");
        let h = RequestHead::parse(b"GET http://beta?x=1 HTTP/1.0\r\n\r\n").unwrap();
        let ProxyRequest::Forward { port, head, .. } = ProxyRequest::from_head(&h).unwrap() else { panic!() };
        assert_eq!(port, 80);
        assert_eq!(head, b"GET /?x=1 HTTP/1.0\r\nconnection: close\r\n\r\n");
        for (bad, why) in [
            (&b"GET https://beta/ HTTP/1.1\r\n\r\n"[..], "absolute http://"),
            (b"GET http://user:pw@beta/ HTTP/1.1\r\n\r\n", "credentials"),
            (b"GET http://beta:+80/ HTTP/1.1\r\n\r\n", "bad host"),
            (b"GET http://[beta]/ HTTP/1.1\r\n\r\n", "bad host"),
        ] {
            let h = RequestHead::parse(bad).unwrap();
            let e = ProxyRequest::from_head(&h).unwrap_err();
            assert!(e.error.contains(why), "{e}");
        }
    }

    /// A bare LF or CR inside the request line or a header used to pass
    /// through to the forwarded request, where the server behind would read
    /// it as a line break: a client could add headers or a second request
    /// the proxy never saw. All are refused now.
    #[test]
    fn heads_that_would_split_are_refused() {
        for bad in [
            &b"GET\nX: y http://beta/ HTTP/1.1\r\n\r\n"[..],
            b"GET http://beta/\nX:y HTTP/1.1\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\nA: b\nX-Injected: 1\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\nA: b\rX: 1\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\nA\n: b\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\n folded\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\nA: \x00\r\n\r\n",
            b"GET http://beta/ HTTP/2.0\r\n\r\n",
            b"GET  http://beta/ HTTP/1.1\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\n\r\nA: b\r\n\r\n",
            b"GET http://beta/ HTTP/1.1\r\n",
            b"\xff / HTTP/1.1\r\n\r\n",
        ] {
            let e = RequestHead::parse(bad).unwrap_err();
            assert_eq!(e.status, 400, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn heads_round_trip() {
        let bytes = b"POST http://beta/x HTTP/1.1\r\nHost: beta\r\nContent-Length: 0\r\nX-Empty:\r\n\r\n";
        let h = RequestHead::parse(bytes).unwrap();
        let mut out = Vec::new();
        h.emit(None, &mut out);
        assert_eq!(RequestHead::parse(&out).unwrap(), h);
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
        assert_eq!(host_port("beta:+80", None), None);
        assert_eq!(host_port("beta:", None), None);
        assert_eq!(host_port("[]:80", None), None);
    }
}
