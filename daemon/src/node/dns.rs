//! The node agent's MagicDNS-style resolver: a small authoritative DNS
//! server on the tailnet address 100.100.100.100, port 53 over UDP and TCP
//! (RFC 7766: each message behind a two-byte length, several per connection,
//! answered in order), that answers from the node's current map and nothing
//! else (there is no forwarding).
//!
//! * `A`, `AAAA` (and `ANY`: both) for `<name>.<domain>` and for the short
//!   `<name>` of every node in the map, self included; other types for a
//!   known name: no records (NOERROR, "no data").
//! * Unknown names in the tailnet domain (and the domain itself for
//!   anything but no data): NXDOMAIN. Names outside it: REFUSED.
//! * Reverse lookups: `PTR` for the `in-addr.arpa` names of 100.64.0.0/10
//!   (the zones `64.100.in-addr.arpa` to `127.100.in-addr.arpa`) and the
//!   `ip6.arpa` names of the tailnet's ULA /48, answering a node's full
//!   name; an address no node has: NXDOMAIN; other reverse names: REFUSED.
//! * One question per query (else FORMERR), opcode QUERY only (else
//!   NOTIMP), class IN or ANY (else REFUSED). An EDNS0 OPT record is
//!   accepted and answered with one (version 0 only, else BADVERS).
//! * Malformed messages (shorter than a header, a response, a question
//!   that runs past the end, a compression pointer or reserved label type
//!   in the question, a label over 63 or a name over 255 bytes, a broken
//!   OPT record) get no answer and are counted.
//!
//! Answers are at most a header, the question, two records (or one PTR
//! record naming at most 255 bytes, for a question of at most 78) and an
//! OPT record, under 512 bytes, so the TC bit is never needed, and UDP and
//! TCP get the same answers.
//!
//! The parser and builder ([`answer`]) are a pure function of the query and
//! a [`Zone`], with no dependency beyond `std`, so the fuzz target
//! (`fuzz/fuzz_targets/dns.rs`) includes this file as it is.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The resolver's address on the tailnet (reserved by the control server).
pub const RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// The port it serves.
pub const PORT: u16 = 53;
/// TTL of every answer, in seconds: short, since nodes come and go.
pub const TTL: u32 = 60;
/// The UDP payload size advertised in our OPT records.
const EDNS_SIZE: u16 = 1232;

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;

/// Response codes.
pub const NOERROR: u8 = 0;
/// The query was malformed in a way we can still answer (several questions).
pub const FORMERR: u8 = 1;
/// The name does not exist in the tailnet domain.
pub const NXDOMAIN: u8 = 3;
/// Not a standard query.
pub const NOTIMP: u8 = 4;
/// Not a name we answer for.
pub const REFUSED: u8 = 5;

/// One node's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The node's DNS label (lowercase).
    pub name: String,
    /// Its tailnet IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its tailnet IPv6 address.
    pub ipv6: Ipv6Addr,
}

/// What the resolver answers from: the tailnet domain and its nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// Domain labels, lowercase, e.g. `["wiremesh", "internal"]`.
    domain: Vec<Vec<u8>>,
    hosts: Vec<Host>,
    /// The tailnet's ULA /48 (the first host's), for `ip6.arpa` names.
    ula48: Option<[u8; 6]>,
}

impl Zone {
    /// A zone for `domain` (with or without a trailing dot) and `hosts`
    /// (all in one tailnet: the first one's IPv6 /48 is the tailnet's).
    pub fn new(domain: &str, hosts: impl IntoIterator<Item = Host>) -> Zone {
        let domain = domain.split('.').filter(|l| !l.is_empty()).map(|l| l.to_ascii_lowercase().into_bytes()).collect();
        let hosts: Vec<Host> = hosts.into_iter().map(|h| Host { name: h.name.to_ascii_lowercase(), ..h }).collect();
        let ula48 = hosts.first().map(|h| {
            let o = h.ipv6.octets();
            [o[0], o[1], o[2], o[3], o[4], o[5]]
        });
        Zone { domain, hosts, ula48 }
    }

    fn host(&self, label: &[u8]) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name.as_bytes() == label)
    }

    /// `name.domain` in wire form, the data of a PTR record; `None` if it
    /// is no valid name (a label over 63 or the whole over 255 bytes; the
    /// control server makes none such).
    fn wire_name(&self, host: &Host) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(host.name.len() + 32);
        for label in std::iter::once(host.name.as_bytes()).chain(self.domain.iter().map(Vec::as_slice)) {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label);
        }
        out.push(0);
        (out.len() <= 255).then_some(out)
    }

    /// What the reverse name `labels` (lowercase) is in our reverse zones:
    /// `None` if it is not in them at all.
    fn reverse(&self, labels: &[Vec<u8>]) -> Option<Reverse<'_>> {
        let n = labels.len();
        if n < 2 || labels[n - 1] != b"arpa" {
            return None;
        }
        // The name's parts, most significant first.
        let parts: Vec<&[u8]> = labels[..n - 2].iter().rev().map(Vec::as_slice).collect();
        match labels[n - 2].as_slice() {
            b"in-addr" => {
                // Ours: the zones 64.100 to 127.100.in-addr.arpa (100.64.0.0/10).
                let second = parts.get(1).and_then(|l| octet(l))?;
                if parts.first().and_then(|l| octet(l)) != Some(100) || !(64..=127).contains(&second) {
                    return None;
                }
                let mut octets = Vec::with_capacity(4);
                for p in &parts {
                    match octet(p) {
                        Some(o) if octets.len() < 4 => octets.push(o),
                        _ => return Some(Reverse::Missing),
                    }
                }
                let found = self.hosts.iter().filter(|h| h.ipv4.octets().starts_with(&octets));
                Some(self.reverse_match(found, octets.len() == 2, octets.len() == 4))
            }
            b"ip6" => {
                let ula = self.ula48?;
                let prefix: Vec<u8> = ula.iter().flat_map(|b| [b >> 4, b & 15]).collect();
                if parts.len() < prefix.len() {
                    return None;
                }
                let mut nibbles = Vec::with_capacity(32);
                for (i, p) in parts.iter().enumerate() {
                    let v = match p {
                        [c] => (*c as char).to_digit(16).map(|v| v as u8),
                        _ => None,
                    };
                    match v {
                        Some(v) if i < prefix.len() && v != prefix[i] => return None,
                        Some(v) if nibbles.len() < 32 => nibbles.push(v),
                        _ if i < prefix.len() => return None,
                        _ => return Some(Reverse::Missing),
                    }
                }
                let found = self.hosts.iter().filter(|h| {
                    let o = h.ipv6.octets();
                    nibbles.iter().enumerate().all(|(i, v)| (o[i / 2] >> (4 * (1 - i % 2))) & 15 == *v)
                });
                Some(self.reverse_match(found, nibbles.len() == 12, nibbles.len() == 32))
            }
            _ => None,
        }
    }

    fn reverse_match<'a>(&self, mut found: impl Iterator<Item = &'a Host>, apex: bool, full: bool) -> Reverse<'a> {
        match found.next() {
            Some(h) if full => Reverse::Host(h),
            // A name above some node's address exists, with no records.
            Some(_) => Reverse::Exists,
            None if apex && !full => Reverse::Exists,
            None => Reverse::Missing,
        }
    }
}

/// A reverse name in one of our reverse zones.
enum Reverse<'a> {
    /// The address of this node.
    Host(&'a Host),
    /// A zone apex, or a name above a node's address: no records.
    Exists,
    /// No such name: NXDOMAIN.
    Missing,
}

/// A decimal octet as an `in-addr.arpa` label writes it (no leading zeros).
fn octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    std::str::from_utf8(label).ok()?.parse().ok()
}

/// The parts of a query we need.
struct Query<'a> {
    /// The question as it came, name included (echoed in the answer).
    question: &'a [u8],
    /// The labels, lowercased.
    labels: Vec<Vec<u8>>,
    qtype: u16,
    qclass: u16,
    /// An OPT record was present, with this EDNS version.
    edns: Option<u8>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads the question name at `at`: returns the lowercased labels and the
/// offset after it. Compression pointers are refused (a query's only name
/// has nothing earlier to point to), as are the reserved label types.
fn read_name(msg: &[u8], mut at: usize) -> Option<(Vec<Vec<u8>>, usize)> {
    let mut labels = Vec::new();
    let mut wire_len = 0usize;
    loop {
        let len = *msg.get(at)? as usize;
        wire_len += 1 + len;
        if len & 0xc0 != 0 || wire_len > 255 {
            return None;
        }
        at += 1;
        if len == 0 {
            return Some((labels, at));
        }
        let label = msg.get(at..at + len)?;
        labels.push(label.to_ascii_lowercase());
        at += len;
    }
}

/// Parses the question and an optional OPT record after it.
fn parse(msg: &[u8]) -> Option<Query<'_>> {
    let (labels, end) = read_name(msg, HEADER)?;
    let qtype = be16(msg, end)?;
    let qclass = be16(msg, end + 2)?;
    let qend = end + 4;
    let (ancount, nscount, arcount) = (be16(msg, 6)?, be16(msg, 8)?, be16(msg, 10)?);
    let mut edns = None;
    if ancount == 0 && nscount == 0 && arcount > 0 {
        // The first additional record: an OPT has the root name, type 41,
        // the payload size as class, extended rcode, version and flags as
        // TTL, and options we ignore (but whose length must fit).
        let (_, at) = read_name(msg, qend)?;
        let rtype = be16(msg, at)?;
        let rdlen = be16(msg, at + 8)? as usize;
        let version = *msg.get(at + 5)?;
        msg.get(at + 10..at + 10 + rdlen)?;
        if rtype == TYPE_OPT {
            edns = Some(version);
        }
    }
    Some(Query { question: &msg[HEADER..qend], labels, qtype, qclass, edns })
}

/// A header-only answer (FORMERR, NOTIMP) to the query whose header is `q`.
fn bare(q: &[u8], rcode: u8) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out[..2].copy_from_slice(&q[..2]);
    out[2] = 0x80 | (q[2] & 0x79); // QR, the opcode and RD as asked
    out[3] = rcode;
    out
}

/// Answers one DNS query from `zone`: the response to send, or `None` when
/// the message is malformed (or is itself a response) and must be dropped.
pub fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (query[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Some(bare(query, NOTIMP));
    }
    if be16(query, 4)? != 1 {
        return Some(bare(query, FORMERR));
    }
    let q = parse(query)?;

    // Which records, and with what code and authority.
    let mut records: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut rcode = NOERROR;
    let mut authoritative = true;
    let in_domain =
        q.labels.len() >= zone.domain.len() && q.labels[q.labels.len() - zone.domain.len()..] == zone.domain[..];
    let reverse = zone.reverse(&q.labels);
    let host = if q.labels.len() == 1 {
        // A short name: ours only if a node has it.
        zone.host(&q.labels[0])
    } else if in_domain && q.labels.len() == zone.domain.len() + 1 {
        zone.host(&q.labels[0])
    } else {
        None
    };
    if q.edns.is_some_and(|v| v != 0) {
        // BADVERS (16): 0 here, 1 in the OPT record's extended rcode.
    } else if q.qclass != CLASS_IN && q.qclass != CLASS_ANY {
        rcode = REFUSED;
        authoritative = false;
    } else if let Some(r) = reverse {
        match r {
            Reverse::Host(h) if matches!(q.qtype, TYPE_PTR | TYPE_ANY) => {
                records.extend(zone.wire_name(h).map(|n| (TYPE_PTR, n)));
            }
            Reverse::Host(_) | Reverse::Exists => {}
            Reverse::Missing => rcode = NXDOMAIN,
        }
    } else if let Some(h) = host {
        if matches!(q.qtype, TYPE_A | TYPE_ANY) {
            records.push((TYPE_A, h.ipv4.octets().to_vec()));
        }
        if matches!(q.qtype, TYPE_AAAA | TYPE_ANY) {
            records.push((TYPE_AAAA, h.ipv6.octets().to_vec()));
        }
    } else if in_domain && !zone.domain.is_empty() {
        if q.labels.len() != zone.domain.len() {
            rcode = NXDOMAIN;
        }
    } else {
        rcode = REFUSED;
        authoritative = false;
    }

    let mut out =
        Vec::with_capacity(HEADER + q.question.len() + records.iter().map(|(_, d)| 12 + d.len()).sum::<usize>() + 11);
    out.extend_from_slice(&query[..2]);
    out.push(0x80 | if authoritative { 0x04 } else { 0 } | (query[2] & 0x01));
    out.push(rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::from(q.edns.is_some()).to_be_bytes());
    out.extend_from_slice(q.question);
    for (rtype, data) in &records {
        out.extend_from_slice(&[0xc0, HEADER as u8]); // the question's name
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    if let Some(version) = q.edns {
        let ext_rcode = u8::from(version != 0);
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_SIZE.to_be_bytes());
        out.extend_from_slice(&[ext_rcode, 0, 0, 0, 0, 0]);
    }
    Some(out)
}

/// Counters of the running resolver.
#[derive(Debug, Default)]
pub struct Stats {
    /// Queries answered.
    pub answered: AtomicU64,
    /// Messages dropped as malformed.
    pub malformed: AtomicU64,
    /// TCP connections closed at once because too many were open.
    pub tcp_refused: AtomicU64,
    /// TCP connections being served now.
    pub tcp_open: AtomicUsize,
}

/// Bounds on the TCP side (RFC 7766 section 6.2 leaves them to the server).
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Connections served at once; more are closed as they come.
    pub max_connections: usize,
    /// A connection is closed when a whole message (length and body) has
    /// not arrived this long after the last answer, or after it opened.
    pub idle: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits { max_connections: 32, idle: Duration::from_secs(10) }
    }
}

/// Reads exactly `buf.len()` bytes before `deadline`; `false` on EOF, error
/// or time out.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> bool {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf[at..]) {
            Ok(0) => return false,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// The resolver: the zone it answers from (replaced on every map) and, once
/// [`Resolver::serve`] was called, a thread serving it.
#[derive(Debug, Default)]
pub struct Resolver {
    zone: RwLock<Arc<Zone>>,
    serving: Mutex<bool>,
    /// What it did so far.
    pub stats: Stats,
}

impl Resolver {
    /// Answers from `zone` from now on.
    pub fn set_zone(&self, zone: Zone) {
        *self.zone.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(zone);
    }

    /// Whether [`Resolver::serve`] has bound its sockets.
    pub fn serving(&self) -> bool {
        *self.serving.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The zone answered from now.
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Binds `RESOLVER_V4:53` over UDP and TCP (the address must be on an
    /// interface) and serves them on threads; does nothing if already
    /// serving.
    pub fn serve(self: &Arc<Self>) -> Result<(), String> {
        let mut serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        if *serving {
            return Ok(());
        }
        let addr = SocketAddr::from((RESOLVER_V4, PORT));
        let socket = UdpSocket::bind(addr).map_err(|e| format!("cannot bind {addr}/udp: {e}"))?;
        let listener = TcpListener::bind(addr).map_err(|e| format!("cannot bind {addr}/tcp: {e}"))?;
        let me = self.clone();
        std::thread::Builder::new().name("dns".into()).spawn(move || me.run(socket)).map_err(|e| e.to_string())?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || me.run_tcp(listener, TcpLimits::default()))
            .map_err(|e| e.to_string())?;
        *serving = true;
        Ok(())
    }

    fn dropped(&self, from: SocketAddr) {
        let count = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() {
            eprintln!("wiremeshd node: dns: dropped a malformed message from {from} ({count} so far)");
        }
    }

    /// Accepts TCP connections, each served on its own thread, at most
    /// `limits.max_connections` at once.
    fn run_tcp(self: Arc<Self>, listener: TcpListener, limits: TcpLimits) {
        loop {
            let (stream, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    eprintln!("wiremeshd node: dns: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let open = &self.stats.tcp_open;
            if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                open.fetch_sub(1, Ordering::SeqCst);
                self.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                continue; // dropping the stream closes it
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new().name("dns-conn".into()).spawn(move || {
                me.serve_tcp(stream, from, limits.idle);
                me.stats.tcp_open.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Answers length-prefixed queries on one connection, in order, until
    /// the client closes it, goes idle, or sends a malformed message.
    fn serve_tcp(&self, mut stream: TcpStream, from: SocketAddr, idle: Duration) {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(idle));
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let deadline = Instant::now() + idle;
            let mut len = [0u8; 2];
            if !read_by(&mut stream, &mut len, deadline) {
                return;
            }
            let len = usize::from(u16::from_be_bytes(len));
            if !read_by(&mut stream, &mut buf[..len], deadline) {
                return;
            }
            let Some(reply) = answer(&buf[..len], &self.zone()) else {
                // Nothing sensible to answer, and the stream may be out of step.
                self.dropped(from);
                return;
            };
            self.stats.answered.fetch_add(1, Ordering::Relaxed);
            let mut out = Vec::with_capacity(2 + reply.len());
            out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            out.extend_from_slice(&reply);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }

    fn run(&self, socket: UdpSocket) {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("wiremeshd node: dns: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            match answer(&buf[..n], &self.zone()) {
                Some(reply) => {
                    self.stats.answered.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&reply, from);
                }
                None => self.dropped(from),
            }
        }
    }
}

/// `wiremeshd node --accept-dns`: points the host at the resolver by
/// rewriting its resolv.conf (`nameserver 100.100.100.100`, `search
/// <domain>`), and puts the original back when the node leaves the tailnet
/// (down, logout) or the agent exits. The original is first copied to a
/// backup in the agent's state directory, so an agent that was killed
/// restores it when it starts again. The file is rewritten in place (not
/// replaced), so a bind-mounted resolv.conf (`ip netns exec`, containers)
/// works; a symlinked one has its target rewritten.
#[derive(Debug)]
pub struct HostDns {
    path: std::path::PathBuf,
    backup: std::path::PathBuf,
    /// The domain written, while the file points at the resolver.
    pointed: Mutex<Option<String>>,
}

/// What the backup holds when there was no resolv.conf at all.
const ABSENT: &[u8] = b"# wiremesh: there was no resolv.conf\n";

impl HostDns {
    /// Manages `path` (normally `/etc/resolv.conf`), keeping the original in `backup`.
    pub fn new(path: impl Into<std::path::PathBuf>, backup: impl Into<std::path::PathBuf>) -> HostDns {
        HostDns { path: path.into(), backup: backup.into(), pointed: Mutex::new(None) }
    }

    /// What the file says while it points at the resolver.
    pub fn contents(domain: &str) -> String {
        format!(
            "# written by wiremeshd node --accept-dns; the original comes back when it stops\n\
             nameserver {RESOLVER_V4}\nsearch {domain}\n"
        )
    }

    fn write_in_place(&self, bytes: &[u8]) -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// Points the file at the resolver with `domain` as the search list
    /// (saving the original first); does nothing if it already does.
    pub fn point(&self, domain: &str) -> Result<(), String> {
        let mut pointed = self.pointed.lock().unwrap_or_else(|e| e.into_inner());
        if pointed.as_deref() == Some(domain) {
            return Ok(());
        }
        if domain.is_empty() || !domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err(format!("not a domain to search: {domain:?}"));
        }
        if !self.backup.exists() {
            let original = match std::fs::read(&self.path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ABSENT.to_vec(),
                Err(e) => return Err(format!("{}: {e}", self.path.display())),
            };
            let tmp = self.backup.with_extension("tmp");
            std::fs::write(&tmp, &original)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &self.backup))
                .map_err(|e| format!("{}: {e}", self.backup.display()))?;
        }
        self.write_in_place(Self::contents(domain).as_bytes())?;
        *pointed = Some(domain.to_string());
        Ok(())
    }

    /// Puts the original back if a backup is there (left by this agent, or
    /// by one that did not exit cleanly).
    pub fn restore(&self) -> Result<(), String> {
        let mut pointed = self.pointed.lock().unwrap_or_else(|e| e.into_inner());
        let original = match std::fs::read(&self.backup) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                *pointed = None;
                return Ok(());
            }
            Err(e) => return Err(format!("{}: {e}", self.backup.display())),
        };
        if original == ABSENT {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    // A mount point cannot be removed: leave it empty.
                    self.write_in_place(b"")?;
                }
                _ => {}
            }
        } else {
            self.write_in_place(&original)?;
        }
        std::fs::remove_file(&self.backup).map_err(|e| format!("{}: {e}", self.backup.display()))?;
        *pointed = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        Zone::new(
            "wiremesh.internal",
            [
                Host {
                    name: "alpha".into(),
                    ipv4: Ipv4Addr::new(100, 64, 0, 1),
                    ipv6: "fd01:2:3::6440:1".parse().unwrap(),
                },
                Host {
                    name: "Beta".into(),
                    ipv4: Ipv4Addr::new(100, 64, 0, 2),
                    ipv6: "fd01:2:3::6440:2".parse().unwrap(),
                },
            ],
        )
    }

    fn encode_name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for l in name.split('.').filter(|l| !l.is_empty()) {
            out.push(l.len() as u8);
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
        out
    }

    fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        q.extend(encode_name(name));
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        if edns {
            // Root name, OPT, payload 4096, extended rcode, version, flags, no options.
            q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        q
    }

    /// (rcode, aa, answers as (type, rdata), has OPT)
    fn decode(q: &[u8], r: &[u8]) -> (u8, bool, Vec<(u16, Vec<u8>)>, bool) {
        assert_eq!(&r[..2], &q[..2], "id");
        assert!(r[2] & 0x80 != 0, "QR");
        assert_eq!(r[2] & 0x02, 0, "TC never set");
        assert_eq!(r[2] & 0x01, q[2] & 0x01, "RD copied");
        assert_eq!(be16(r, 4).unwrap(), 1);
        let an = be16(r, 6).unwrap();
        let ar = be16(r, 10).unwrap();
        let (_, end) = read_name(r, HEADER).unwrap();
        assert_eq!(&r[HEADER..end + 4], &q[HEADER..end + 4], "question echoed");
        let mut at = end + 4;
        let mut answers = Vec::new();
        for _ in 0..an {
            assert_eq!(&r[at..at + 2], &[0xc0, 12]);
            let t = be16(r, at + 2).unwrap();
            assert_eq!(be16(r, at + 4).unwrap(), CLASS_IN);
            assert_eq!(u32::from_be_bytes(r[at + 6..at + 10].try_into().unwrap()), TTL);
            let len = be16(r, at + 10).unwrap() as usize;
            answers.push((t, r[at + 12..at + 12 + len].to_vec()));
            at += 12 + len;
        }
        if ar == 1 {
            assert_eq!(&r[at..at + 3], &[0, 0, 41]);
            at += 11;
        }
        assert_eq!(at, r.len(), "nothing after the records");
        (r[3] & 0x0f, r[2] & 0x04 != 0, answers, ar == 1)
    }

    #[test]
    fn answers_a_and_aaaa_for_full_and_short_names_in_any_case() {
        let z = zone();
        for name in ["alpha.wiremesh.internal", "alpha", "ALPHA.WireMesh.Internal.", "Alpha"] {
            let q = query(name, TYPE_A, false);
            let (rcode, aa, ans, opt) = decode(&q, &answer(&q, &z).unwrap());
            assert_eq!((rcode, aa, opt), (NOERROR, true, false), "{name}");
            assert_eq!(ans, vec![(TYPE_A, vec![100, 64, 0, 1])]);
        }
        let q = query("beta.wiremesh.internal", TYPE_AAAA, false);
        let (rcode, _, ans, _) = decode(&q, &answer(&q, &z).unwrap());
        assert_eq!(rcode, NOERROR);
        let v6: Ipv6Addr = "fd01:2:3::6440:2".parse().unwrap();
        assert_eq!(ans, vec![(TYPE_AAAA, v6.octets().to_vec())]);
        let q = query("beta", TYPE_ANY, false);
        let (_, _, ans, _) = decode(&q, &answer(&q, &z).unwrap());
        assert_eq!(ans.len(), 2);
        // Another type for a known name: no data.
        let q = query("beta", 16, false);
        assert_eq!(decode(&q, &answer(&q, &z).unwrap()).0, NOERROR);
        assert!(decode(&q, &answer(&q, &z).unwrap()).2.is_empty());
    }

    #[test]
    fn unknown_names_in_the_domain_are_nxdomain_and_others_refused() {
        let z = zone();
        for name in ["gamma.wiremesh.internal", "x.alpha.wiremesh.internal"] {
            let q = query(name, TYPE_A, false);
            let (rcode, aa, ans, _) = decode(&q, &answer(&q, &z).unwrap());
            assert_eq!((rcode, aa, ans.len()), (NXDOMAIN, true, 0), "{name}");
        }
        // The apex exists, with no address.
        let q = query("wiremesh.internal", TYPE_A, false);
        assert_eq!(decode(&q, &answer(&q, &z).unwrap()).0, NOERROR);
        for name in ["example.com", "gamma", "alpha.example.com", "internal", ""] {
            let q = query(name, TYPE_A, false);
            let (rcode, aa, ans, _) = decode(&q, &answer(&q, &z).unwrap());
            assert_eq!((rcode, aa, ans.len()), (REFUSED, false, 0), "{name:?}");
        }
        // Class CH: refused.
        let mut q = query("alpha", TYPE_A, false);
        let n = q.len();
        q[n - 1] = 3;
        assert_eq!(decode(&q, &answer(&q, &z).unwrap()).0, REFUSED);
    }

    #[test]
    fn edns_is_answered_with_an_opt_record() {
        let z = zone();
        let q = query("alpha", TYPE_A, true);
        let (rcode, _, ans, opt) = decode(&q, &answer(&q, &z).unwrap());
        assert_eq!((rcode, ans.len(), opt), (NOERROR, 1, true));
        // Version 1: BADVERS (extended rcode 1), no answers.
        let mut q = query("alpha", TYPE_A, true);
        let n = q.len();
        q[n - 5] = 1;
        let r = answer(&q, &z).unwrap();
        let (rcode, _, ans, opt) = decode(&q, &r);
        assert_eq!((rcode, ans.len(), opt), (NOERROR, 0, true));
        assert_eq!(r[r.len() - 6], 1);
    }

    #[test]
    fn odd_headers_get_formerr_or_notimp() {
        let z = zone();
        let mut q = query("alpha", TYPE_A, false);
        q[5] = 2;
        let r = answer(&q, &z).unwrap();
        assert_eq!((r.len(), r[3], r[2] & 0x80), (HEADER, FORMERR, 0x80));
        q[5] = 0;
        assert_eq!(answer(&q, &z).unwrap()[3], FORMERR);
        let mut q = query("alpha", TYPE_A, false);
        q[2] |= 2 << 3; // STATUS
        let r = answer(&q, &z).unwrap();
        assert_eq!((r.len(), r[3], (r[2] >> 3) & 0xf), (HEADER, NOTIMP, 2));
    }

    #[test]
    fn malformed_messages_are_dropped() {
        let z = zone();
        let good = query("alpha.wiremesh.internal", TYPE_A, true);
        // Every truncation of a good query is dropped (never a panic).
        for n in 0..good.len() {
            assert_eq!(answer(&good[..n], &z), None, "truncated to {n}");
        }
        // A response.
        let mut r = good.clone();
        r[2] |= 0x80;
        assert_eq!(answer(&r, &z), None);
        // A compression pointer in the question, even to itself.
        let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(answer(&p, &z), None);
        p[12] = 0x40; // reserved label type
        assert_eq!(answer(&p, &z), None);
        p[12] = 0x80;
        assert_eq!(answer(&p, &z), None);
        // A name over 255 bytes, made of valid labels.
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63)].join(".");
        assert_eq!(answer(&query(&long, TYPE_A, false), &z), None);
        let ok = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        assert!(answer(&query(&ok, TYPE_A, false), &z).is_some());
        // An OPT record whose options run past the end.
        let mut q = query("alpha", TYPE_A, true);
        let n = q.len();
        q[n - 1] = 8;
        assert_eq!(answer(&q, &z), None);
        // Trailing garbage after a well-formed query is ignored.
        let mut q = query("alpha", TYPE_A, false);
        q.extend_from_slice(&[1, 2, 3]);
        assert!(answer(&q, &z).is_some());
    }

    #[test]
    fn a_pseudo_random_flood_never_panics() {
        let z = zone();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let seed = query("beta.wiremesh.internal", TYPE_AAAA, true);
        for i in 0..20_000 {
            let mut m = seed.clone();
            for _ in 0..(i % 5) + 1 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % m.len();
                m[at] = (x >> 32) as u8;
            }
            m.truncate((x >> 40) as usize % (m.len() + 1));
            if let Some(r) = answer(&m, &z) {
                assert!(r.len() <= 512 && r[2] & 0x80 != 0);
            }
        }
    }

    fn ptr_v4(ip: Ipv4Addr) -> String {
        let o = ip.octets();
        format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
    }

    fn ptr_v6(ip: Ipv6Addr) -> String {
        let mut s: Vec<String> = ip.octets().iter().flat_map(|b| [b >> 4, b & 15]).map(|n| format!("{n:x}")).collect();
        s.reverse();
        s.push("ip6.arpa".into());
        s.join(".")
    }

    #[test]
    fn ptr_answers_full_names_for_tailnet_addresses() {
        let z = zone();
        let beta = encode_name("beta.wiremesh.internal");
        let v6: Ipv6Addr = "fd01:2:3::6440:2".parse().unwrap();
        for name in [ptr_v4(Ipv4Addr::new(100, 64, 0, 2)), ptr_v6(v6), ptr_v6(v6).to_uppercase()] {
            for qtype in [TYPE_PTR, TYPE_ANY] {
                let q = query(&name, qtype, false);
                let (rcode, aa, ans, _) = decode(&q, &answer(&q, &z).unwrap());
                assert_eq!((rcode, aa), (NOERROR, true), "{name}");
                assert_eq!(ans, vec![(TYPE_PTR, beta.clone())], "{name}");
            }
            // Another type for the name: no data.
            let q = query(&name, TYPE_A, false);
            assert_eq!(decode(&q, &answer(&q, &z).unwrap()).2, vec![]);
        }
        // Addresses in our ranges that no node has, and names under ours
        // that are no address: NXDOMAIN.
        let missing = [
            ptr_v4(Ipv4Addr::new(100, 64, 0, 9)),
            "0.0.64.100.in-addr.arpa".into(),
            "1.64.100.in-addr.arpa".into(),
            ptr_v4(Ipv4Addr::new(100, 127, 255, 255)),
            "7.0.64.100.in-addr.arpa".into(),
            "01.0.64.100.in-addr.arpa".into(),
            "x.0.0.64.100.in-addr.arpa".into(),
            "1.1.0.0.64.100.in-addr.arpa".into(),
            ptr_v6("fd01:2:3::6440:9".parse().unwrap()),
            ptr_v6("fd01:2:3:ffff::1".parse().unwrap()),
            format!("0.{}", ptr_v6(v6)),
            format!("zz.{}", ptr_v6(v6).split_once('.').unwrap().1),
        ];
        for name in missing {
            let q = query(&name, TYPE_PTR, false);
            let (rcode, aa, ans, _) = decode(&q, &answer(&q, &z).unwrap());
            assert_eq!((rcode, aa, ans.len()), (NXDOMAIN, true, 0), "{name}");
        }
        // Zone apexes and names above a node's address: no data.
        for name in ["64.100.in-addr.arpa", "100.100.in-addr.arpa", "0.64.100.in-addr.arpa"] {
            let q = query(name, TYPE_PTR, false);
            let (rcode, _, ans, _) = decode(&q, &answer(&q, &z).unwrap());
            assert_eq!((rcode, ans.len()), (NOERROR, 0), "{name}");
        }
        let apex6 = ptr_v6(v6).splitn(21, '.').last().unwrap().to_string();
        assert!(apex6.starts_with("3.0.0.0.2.0.0.0.1.0.d.f."), "{apex6}");
        let q = query(&apex6, TYPE_PTR, false);
        assert_eq!(decode(&q, &answer(&q, &z).unwrap()).0, NOERROR);
        // Outside our reverse zones: refused.
        let refused = [
            ptr_v4(Ipv4Addr::new(100, 63, 0, 2)),
            ptr_v4(Ipv4Addr::new(100, 128, 0, 2)),
            ptr_v4(Ipv4Addr::new(192, 168, 0, 2)),
            "100.in-addr.arpa".into(),
            "in-addr.arpa".into(),
            "arpa".into(),
            ptr_v6("fd01:2:4::6440:2".parse().unwrap()),
            "d.f.ip6.arpa".into(),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa".into(),
        ];
        for name in refused {
            let q = query(&name, TYPE_PTR, false);
            let (rcode, aa, ans, _) = decode(&q, &answer(&q, &z).unwrap());
            assert_eq!((rcode, aa, ans.len()), (REFUSED, false, 0), "{name}");
        }
        // A zone without hosts has no ip6.arpa zone.
        let q = query(&ptr_v6(v6), TYPE_PTR, false);
        assert_eq!(decode(&q, &answer(&q, &Zone::default()).unwrap()).0, REFUSED);
    }

    #[test]
    fn ptr_names_over_255_bytes_are_not_answered() {
        let domain = ["d".repeat(60), "e".repeat(60), "f".repeat(60), "g".repeat(60)].join(".");
        let host = Host { name: "h".repeat(63), ipv4: Ipv4Addr::new(100, 64, 0, 1), ipv6: "fd00::1".parse().unwrap() };
        let z = Zone::new(&domain, [host]);
        let q = query(&ptr_v4(Ipv4Addr::new(100, 64, 0, 1)), TYPE_PTR, false);
        let (rcode, _, ans, _) = decode(&q, &answer(&q, &z).unwrap());
        assert_eq!((rcode, ans.len()), (NOERROR, 0));
    }

    /// Sends `queries` length-prefixed in one write and reads `n` answers.
    fn tcp_exchange(addr: SocketAddr, queries: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        for q in queries {
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(q);
        }
        c.write_all(&out).unwrap();
        (0..n)
            .map(|_| {
                let mut len = [0u8; 2];
                c.read_exact(&mut len).unwrap();
                let mut r = vec![0u8; usize::from(u16::from_be_bytes(len))];
                c.read_exact(&mut r).unwrap();
                r
            })
            .collect()
    }

    #[test]
    fn serves_over_tcp_in_order_with_limits() {
        let r = Arc::new(Resolver::default());
        r.set_zone(zone());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = TcpLimits { max_connections: 2, idle: Duration::from_millis(300) };
        let me = r.clone();
        std::thread::spawn(move || me.run_tcp(listener, limits));
        // Three pipelined queries in one write, answered in order.
        let qs = [
            query("alpha", TYPE_A, false),
            query("beta.wiremesh.internal", TYPE_AAAA, true),
            query(&ptr_v4(Ipv4Addr::new(100, 64, 0, 1)), TYPE_PTR, false),
        ];
        let answers = tcp_exchange(addr, &qs, 3);
        assert_eq!(decode(&qs[0], &answers[0]).2, vec![(TYPE_A, vec![100, 64, 0, 1])]);
        assert_eq!(decode(&qs[1], &answers[1]).2[0].0, TYPE_AAAA);
        assert_eq!(decode(&qs[2], &answers[2]).2, vec![(TYPE_PTR, encode_name("alpha.wiremesh.internal"))]);
        // An idle connection is closed after the idle time.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        assert_eq!(idle.read(&mut [0u8; 1]).unwrap_or(0), 0);
        assert!(t0.elapsed() >= Duration::from_millis(250) && t0.elapsed() < Duration::from_secs(3));
        // So is one that sends half a message and stalls.
        let mut half = TcpStream::connect(addr).unwrap();
        half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        half.write_all(&[0, 40, 1, 2]).unwrap();
        assert_eq!(half.read(&mut [0u8; 1]).unwrap_or(0), 0);
        // A malformed message closes the connection and is counted.
        let mut bad = TcpStream::connect(addr).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        bad.write_all(&[0, 3, 1, 2, 3]).unwrap();
        assert_eq!(bad.read(&mut [0u8; 1]).unwrap_or(0), 0);
        assert_eq!(r.stats.malformed.load(Ordering::Relaxed), 1);
        // With two connections held open, a third is closed at once.
        let settled = |n: usize| {
            let t0 = Instant::now();
            while r.stats.tcp_open.load(Ordering::SeqCst) != n {
                assert!(t0.elapsed() < Duration::from_secs(5), "{n} connections open");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        settled(0);
        let hold: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        settled(2);
        let mut third = TcpStream::connect(addr).unwrap();
        third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(third.read(&mut [0u8; 1]).unwrap_or(0), 0);
        assert_eq!(r.stats.tcp_refused.load(Ordering::Relaxed), 1, "closed as refused, not after the idle time");
        drop(hold);
        // Once they are gone, new connections are served again.
        settled(0);
        let answers = tcp_exchange(addr, &qs[..1], 1);
        assert_eq!(decode(&qs[0], &answers[0]).2, vec![(TYPE_A, vec![100, 64, 0, 1])]);
        assert_eq!(r.stats.answered.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn host_dns_points_at_the_resolver_and_restores_the_original() {
        let dir = std::env::temp_dir().join(format!("wiremesh-hostdns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (conf, backup) = (dir.join("resolv.conf"), dir.join("resolv.conf.orig"));
        std::fs::write(&conf, "nameserver 192.0.2.53\n").unwrap();
        let h = HostDns::new(&conf, &backup);
        h.point("wiremesh.internal").unwrap();
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(text.contains("nameserver 100.100.100.100\nsearch wiremesh.internal\n"), "{text}");
        // Pointing again (another map) keeps the first backup.
        h.point("other.internal").unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), "nameserver 192.0.2.53\n");
        assert!(h.point("bad domain\nnameserver 6.6.6.6").is_err());
        h.restore().unwrap();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "nameserver 192.0.2.53\n");
        assert!(!backup.exists());
        h.restore().unwrap();
        // A backup left by a killed agent is restored by the next one.
        h.point("wiremesh.internal").unwrap();
        drop(h);
        HostDns::new(&conf, &backup).restore().unwrap();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "nameserver 192.0.2.53\n");
        // No resolv.conf at first: none after.
        std::fs::remove_file(&conf).unwrap();
        let h = HostDns::new(&conf, &backup);
        h.point("wiremesh.internal").unwrap();
        assert!(conf.exists());
        h.restore().unwrap();
        assert!(!conf.exists() && !backup.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn serves_over_udp() {
        // Not on 100.100.100.100 (that needs the TUN and root): the same
        // loop on a loopback socket.
        let r = Arc::new(Resolver::default());
        r.set_zone(zone());
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let me = r.clone();
        std::thread::spawn(move || me.run(server));
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        c.send_to(&[1, 2, 3], addr).unwrap();
        let q = query("alpha", TYPE_A, false);
        c.send_to(&q, addr).unwrap();
        let mut buf = [0u8; 512];
        let n = c.recv(&mut buf).unwrap();
        assert_eq!(decode(&q, &buf[..n]).2, vec![(TYPE_A, vec![100, 64, 0, 1])]);
        assert_eq!(r.stats.malformed.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.answered.load(Ordering::Relaxed), 1);
    }
}
