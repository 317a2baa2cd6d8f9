//! The inbound packet filter: the compiled form of the tailnet policy that the
//! coordination server sends each node, evaluated on every decrypted packet
//! before it reaches the tunnel.
//!
//! A [`Filter`] is a list of [`Rule`]s, each accepting packets from some
//! source prefixes to some destination prefixes for some IP protocols and,
//! for the protocols that have ports (TCP, UDP, SCTP), some destination port
//! ranges. A packet is accepted if any rule accepts it (rules only accept).
//!
//! A [`Firewall`] adds the state a node needs to talk to peers it may reach
//! but that may not reach it: every outbound TCP, UDP and SCTP flow and every
//! ICMP echo request it sends is remembered in a fixed-size [`FlowTable`], and
//! inbound packets of those flows (replies) pass whatever the rules say, as
//! do ICMP errors that quote a packet of such a flow or of a flow the rules
//! let in. Fragments after the first carry no ports and pass: the first
//! fragment was filtered, and without it the rest cannot be reassembled.
//!
//! The rules and the flow table are allocated when the filter is set;
//! evaluating a packet allocates nothing and reads no clock (`now` comes in).

use crate::time::Instant;
use alloc::vec;
use alloc::vec::Vec;
use core::net::IpAddr;
use core::time::Duration;

/// IANA protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IANA protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IANA protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// How long an outbound TCP flow is remembered after its last packet.
pub const TCP_FLOW_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long an outbound UDP or SCTP flow is remembered after its last packet
/// (the Linux connection tracker keeps a UDP stream for 120 s).
pub const UDP_FLOW_TIMEOUT: Duration = Duration::from_secs(180);
/// How long an outbound ICMP echo request waits for its reply.
pub const ICMP_FLOW_TIMEOUT: Duration = Duration::from_secs(30);
/// Slots of a [`FlowTable`] (a power of two).
pub const FLOW_SLOTS: usize = 4096;
/// Slots a flow may occupy from its hash position: lookups read at most this many.
const PROBES: usize = 8;

/// An IP prefix: an address with its host bits cleared and a length. The
/// address and its mask are kept as integers, so a match is one masked
/// comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    v6: bool,
    bits: u128,
    len: u8,
    mask: u128,
}

impl Prefix {
    /// The prefix of `len` bits of `addr` (host bits cleared), or `None` if
    /// `len` exceeds the address family's width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let width = width(addr);
        if len > width {
            return None;
        }
        let mask = mask(len, width);
        Some(Prefix { v6: addr.is_ipv6(), bits: bits(addr) & mask, len, mask })
    }

    /// The prefix holding only `addr`.
    pub fn host(addr: IpAddr) -> Prefix {
        let width = width(addr);
        Prefix { v6: addr.is_ipv6(), bits: bits(addr), len: width, mask: mask(width, width) }
    }

    /// Every IPv4 address.
    pub const ANY_V4: Prefix = Prefix { v6: false, bits: 0, len: 0, mask: 0 };
    /// Every IPv6 address.
    pub const ANY_V6: Prefix = Prefix { v6: true, bits: 0, len: 0, mask: 0 };

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        from_bits(self.bits, self.v6)
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a zero-length prefix (every address of its family).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `addr` lies in the prefix (never across address families).
    #[inline]
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.contains_bits(bits(addr), addr.is_ipv6())
    }

    #[inline]
    fn contains_bits(&self, bits: u128, v6: bool) -> bool {
        v6 == self.v6 && (bits ^ self.bits) & self.mask == 0
    }

    /// Whether every address of `other` lies in this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && other.v6 == self.v6 && (other.bits ^ self.bits) & self.mask == 0
    }
}

impl core::fmt::Display for Prefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

fn width_of(v6: bool) -> u8 {
    if v6 {
        128
    } else {
        32
    }
}

fn width(addr: IpAddr) -> u8 {
    if addr.is_ipv6() {
        128
    } else {
        32
    }
}

fn bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_bits(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(bits.into())
    } else {
        IpAddr::V4((bits as u32).into())
    }
}

/// The network mask of a `len`-bit prefix in a `width`-bit family, in the low bits.
fn mask(len: u8, width: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let ones = u128::MAX >> (128 - u32::from(width));
    ones & !ones.checked_shr(u32::from(len)).unwrap_or(0)
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange { first: 0, last: u16::MAX };

    /// One port.
    pub const fn single(port: u16) -> PortRange {
        PortRange { first: port, last: port }
    }

    /// Whether `port` is in the range.
    #[inline]
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// Whether packets of IP protocol `proto` carry ports a rule can match.
#[inline]
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// One accept rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Where the packet may come from.
    pub sources: Vec<Prefix>,
    /// Which of the node's addresses it may go to.
    pub destinations: Vec<Prefix>,
    /// IANA protocol numbers accepted (empty: every protocol).
    pub protocols: Vec<u8>,
    /// Destination ports accepted for TCP, UDP and SCTP (other protocols have
    /// none and match on addresses and protocol alone; empty: no port).
    pub ports: Vec<PortRange>,
}

impl Rule {
    /// Whether the rule accepts a packet with these fields (`port` is the
    /// destination port, read only for protocols that have ports).
    #[inline]
    pub fn accepts(&self, source: IpAddr, destination: IpAddr, protocol: u8, port: u16) -> bool {
        source.is_ipv6() == destination.is_ipv6()
            && self.accepts_bits((bits(source), bits(destination), source.is_ipv6()), protocol, port)
    }

    /// [`Rule::accepts`] with the addresses as integers of one family.
    #[inline]
    fn accepts_bits(&self, (source, destination, v6): (u128, u128, bool), protocol: u8, port: u16) -> bool {
        (self.protocols.is_empty() || self.protocols.contains(&protocol))
            && (!has_ports(protocol) || self.ports.iter().any(|r| r.contains(port)))
            && self.sources.iter().any(|p| p.contains_bits(source, v6))
            && self.destinations.iter().any(|p| p.contains_bits(destination, v6))
    }
}

/// The rules a node accepts inbound packets by, indexed by source: the rules
/// that name a source address as a host are found by a binary search on that
/// address, so a packet reads only the rules for its own source (plus those
/// with wider source prefixes), however many rules there are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    rules: Vec<Rule>,
    /// (family is v6, host address, rule index), sorted.
    by_host: Vec<(bool, u128, u32)>,
    /// Rules with a source wider than one host, by index.
    wide: Vec<u32>,
}

impl Filter {
    /// A filter of these rules (none: every packet is denied unless it
    /// belongs to a flow the node opened).
    pub fn new(rules: Vec<Rule>) -> Filter {
        let mut by_host = Vec::new();
        let mut wide = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let i = i as u32;
            for p in &r.sources {
                if p.mask == mask(width_of(p.v6), width_of(p.v6)) {
                    by_host.push((p.v6, p.bits, i));
                } else if wide.last() != Some(&i) {
                    wide.push(i);
                }
            }
        }
        by_host.sort_unstable();
        by_host.dedup();
        Filter { rules, by_host, wide }
    }

    /// A filter accepting every packet.
    pub fn allow_all() -> Filter {
        Filter::new(vec![Rule {
            sources: vec![Prefix::ANY_V4, Prefix::ANY_V6],
            destinations: vec![Prefix::ANY_V4, Prefix::ANY_V6],
            protocols: Vec::new(),
            ports: vec![PortRange::ALL],
        }])
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether any rule accepts a packet with these fields, disregarding state.
    #[inline]
    pub fn accepts(&self, source: IpAddr, destination: IpAddr, protocol: u8, port: u16) -> bool {
        if source.is_ipv6() != destination.is_ipv6() {
            return false;
        }
        let (src, v6) = (bits(source), source.is_ipv6());
        let addrs = (src, bits(destination), v6);
        let check = |i: u32| self.rules[i as usize].accepts_bits(addrs, protocol, port);
        let first = self.by_host.partition_point(|&(f, b, _)| (f, b) < (v6, src));
        self.by_host[first..].iter().take_while(|&&(f, b, _)| (f, b) == (v6, src)).any(|&(_, _, i)| check(i))
            || self.wide.iter().any(|&i| check(i))
    }

    /// Whether any rule accepts this (parsed) packet, disregarding state.
    pub fn accepts_packet(&self, p: &Packet) -> bool {
        let port = match p.transport {
            Transport::Ports { destination, .. } => destination,
            _ => 0,
        };
        self.accepts(p.source, p.destination, p.protocol, port)
    }
}

/// The transport-layer fields of a packet the filter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP, UDP or SCTP.
    Ports {
        /// The source port.
        source: u16,
        /// The destination port.
        destination: u16,
    },
    /// An ICMP or ICMPv6 echo request or reply.
    Echo {
        /// Whether it is a request (else a reply).
        request: bool,
        /// The echo identifier.
        id: u16,
    },
    /// An ICMP or ICMPv6 error quoting the start of a packet that caused it.
    IcmpError(Quoted),
    /// A fragment after the first: no transport header.
    LaterFragment,
    /// Any other protocol or ICMP message.
    Other,
}

/// The fields of the packet an ICMP error quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// Its source (normally this node).
    pub source: IpAddr,
    /// Its destination.
    pub destination: IpAddr,
    /// Its IP protocol.
    pub protocol: u8,
    /// Its ports, or the echo identifier as source port and 0.
    pub source_port: u16,
    /// Its destination port (0 for ICMP).
    pub destination_port: u16,
}

/// What the filter reads of one IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The source address.
    pub source: IpAddr,
    /// The destination address.
    pub destination: IpAddr,
    /// The IP protocol (for IPv6, of the header after any extension headers).
    pub protocol: u8,
    /// The transport fields.
    pub transport: Transport,
}

impl Packet {
    /// Reads an IPv4 or IPv6 packet; `None` if its headers are cut short or
    /// malformed.
    pub fn parse(packet: &[u8]) -> Option<Packet> {
        let l3 = parse_l3(packet)?;
        let transport = if l3.later_fragment {
            Transport::LaterFragment
        } else {
            parse_l4(l3.protocol, packet.get(l3.payload..)?, l3.v6)?
        };
        Some(Packet { source: l3.source, destination: l3.destination, protocol: l3.protocol, transport })
    }
}

struct L3 {
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    payload: usize,
    later_fragment: bool,
    v6: bool,
}

/// The IP header; the payload offset may point past a quoted packet's end.
fn parse_l3(packet: &[u8]) -> Option<L3> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some(L3 {
                source: IpAddr::from(src),
                destination: IpAddr::from(dst),
                protocol: packet[9],
                payload: ihl,
                later_fragment: frag != 0,
                v6: false,
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            let mut next = packet[6];
            let mut at = 40;
            let mut later_fragment = false;
            // Hop-by-hop, routing, fragment and destination options headers,
            // a bounded number of them.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        let h = packet.get(at..at + 2)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    44 => {
                        let h = packet.get(at..at + 8)?;
                        next = h[0];
                        later_fragment = u16::from_be_bytes([h[2], h[3]]) >> 3 != 0;
                        at += 8;
                    }
                    _ => break,
                }
            }
            if matches!(next, 0 | 43 | 60 | 44) {
                return None;
            }
            Some(L3 {
                source: IpAddr::from(src),
                destination: IpAddr::from(dst),
                protocol: next,
                payload: at,
                later_fragment,
                v6: true,
            })
        }
        _ => None,
    }
}

fn parse_l4(protocol: u8, l4: &[u8], v6: bool) -> Option<Transport> {
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            let h = l4.get(..4)?;
            Some(Transport::Ports {
                source: u16::from_be_bytes([h[0], h[1]]),
                destination: u16::from_be_bytes([h[2], h[3]]),
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 if (protocol == PROTO_ICMPV6) == v6 => {
            let h = l4.get(..8)?;
            let (request, reply, error) = if v6 {
                (h[0] == 128, h[0] == 129, (1..=4).contains(&h[0]))
            } else {
                (h[0] == 8, h[0] == 0, matches!(h[0], 3 | 4 | 11 | 12))
            };
            if request || reply {
                return Some(Transport::Echo { request, id: u16::from_be_bytes([h[4], h[5]]) });
            }
            if error {
                // An error that quotes nothing parseable is no error of ours.
                return Some(parse_quoted(&l4[8..]).map_or(Transport::Other, Transport::IcmpError));
            }
            Some(Transport::Other)
        }
        _ => Some(Transport::Other),
    }
}

fn parse_quoted(inner: &[u8]) -> Option<Quoted> {
    let l3 = parse_l3(inner)?;
    if l3.later_fragment {
        return None;
    }
    let l4 = inner.get(l3.payload..)?;
    let (source_port, destination_port) = match parse_l4(l3.protocol, l4, l3.v6)? {
        Transport::Ports { source, destination } => (source, destination),
        Transport::Echo { request: true, id } => (id, 0),
        _ => return None,
    };
    Some(Quoted {
        source: l3.source,
        destination: l3.destination,
        protocol: l3.protocol,
        source_port,
        destination_port,
    })
}

/// Why the firewall let a packet in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A rule accepts it.
    Rule,
    /// It answers a flow this node opened (or is an ICMP error about an allowed flow).
    Flow,
    /// A fragment after the first.
    Fragment,
}

/// The identity of a flow as this node sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowKey {
    local: IpAddr,
    remote: IpAddr,
    local_port: u16,
    remote_port: u16,
    protocol: u8,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    key: FlowKey,
    expires: Instant,
}

/// Flows this node opened, in a fixed table: a flow lives in one of
/// [`PROBES`] slots from its (keyed) hash; when all are taken by live
/// flows, the one closest to expiry makes room.
#[derive(Clone, Debug)]
pub struct FlowTable {
    slots: Vec<Option<Slot>>,
    seed: u64,
}

impl FlowTable {
    /// An empty table of [`FLOW_SLOTS`] slots; `seed` keys the hash so that
    /// peers cannot aim their flows at one slot.
    pub fn new(seed: u64) -> FlowTable {
        FlowTable { slots: vec![None; FLOW_SLOTS], seed }
    }

    fn home(&self, k: &FlowKey) -> usize {
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut mix = |x: u64| {
            h = (h ^ x).wrapping_mul(0x2127_599b_f432_5c37);
            h ^= h >> 29;
        };
        let a = bits(k.local);
        let b = bits(k.remote);
        mix(a as u64);
        mix((a >> 64) as u64);
        mix(b as u64);
        mix((b >> 64) as u64);
        mix(u64::from(k.local_port) | u64::from(k.remote_port) << 16 | u64::from(k.protocol) << 32);
        (h as usize) & (FLOW_SLOTS - 1)
    }

    fn record(&mut self, key: FlowKey, expires: Instant, now: Instant) {
        let home = self.home(&key);
        let mut victim = home;
        let mut victim_expires = None;
        for i in 0..PROBES {
            let at = (home + i) & (FLOW_SLOTS - 1);
            match self.slots[at] {
                Some(s) if s.key == key => {
                    self.slots[at] = Some(Slot { key, expires });
                    return;
                }
                Some(s) if s.expires > now => {
                    if victim_expires.is_none_or(|v| s.expires < v) {
                        victim = at;
                        victim_expires = Some(s.expires);
                    }
                }
                // Empty or expired: the best place, but the key may sit further on.
                _ => {
                    if victim_expires != Some(Instant::ZERO) {
                        victim = at;
                        victim_expires = Some(Instant::ZERO);
                    }
                }
            }
        }
        self.slots[victim] = Some(Slot { key, expires });
    }

    fn contains(&self, key: &FlowKey, now: Instant) -> bool {
        let home = self.home(key);
        (0..PROBES)
            .any(|i| matches!(self.slots[(home + i) & (FLOW_SLOTS - 1)], Some(s) if s.key == *key && s.expires > now))
    }

    /// Live flows (for tests and reports).
    pub fn live(&self, now: Instant) -> usize {
        self.slots.iter().flatten().filter(|s| s.expires > now).count()
    }
}

/// A [`Filter`] with the state of the flows this node opened.
#[derive(Clone, Debug)]
pub struct Firewall {
    filter: Filter,
    flows: FlowTable,
}

impl Firewall {
    /// A firewall enforcing `filter`; `seed` keys the flow table's hash.
    pub fn new(filter: Filter, seed: u64) -> Firewall {
        Firewall { filter, flows: FlowTable::new(seed) }
    }

    /// The rules in force.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Replaces the rules; flows already open stay open.
    pub fn set_filter(&mut self, filter: Filter) {
        self.filter = filter;
    }

    /// The flow table.
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Remembers the flow of an outbound packet (read from the tunnel, about
    /// to be sent to a peer), so that its replies pass.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) {
        let Some(p) = Packet::parse(packet) else { return };
        let (local_port, remote_port, timeout) = match p.transport {
            Transport::Ports { source, destination } => {
                let t = if p.protocol == PROTO_TCP { TCP_FLOW_TIMEOUT } else { UDP_FLOW_TIMEOUT };
                (source, destination, t)
            }
            Transport::Echo { request: true, id } => (id, 0, ICMP_FLOW_TIMEOUT),
            _ => return,
        };
        let key = FlowKey { local: p.source, remote: p.destination, local_port, remote_port, protocol: p.protocol };
        self.flows.record(key, now.saturating_add(timeout), now);
    }

    /// Decides on one decrypted inbound packet: `Some` with the reason it
    /// passes, `None` to drop it.
    pub fn inbound(&self, packet: &[u8], now: Instant) -> Option<Verdict> {
        let p = Packet::parse(packet)?;
        let reply_key = match p.transport {
            Transport::LaterFragment => return Some(Verdict::Fragment),
            Transport::Ports { source, destination } => Some(FlowKey {
                local: p.destination,
                remote: p.source,
                local_port: destination,
                remote_port: source,
                protocol: p.protocol,
            }),
            Transport::Echo { request: false, id } => Some(FlowKey {
                local: p.destination,
                remote: p.source,
                local_port: id,
                remote_port: 0,
                protocol: p.protocol,
            }),
            Transport::IcmpError(q) => {
                let sent = FlowKey {
                    local: q.source,
                    remote: q.destination,
                    local_port: q.source_port,
                    remote_port: q.destination_port,
                    protocol: q.protocol,
                };
                // Quoting a packet of a flow this node opened, or a reply in
                // a flow the rules let in.
                if self.flows.contains(&sent, now)
                    || self.filter.accepts(q.destination, q.source, q.protocol, q.source_port)
                {
                    return Some(Verdict::Flow);
                }
                None
            }
            Transport::Echo { request: true, .. } | Transport::Other => None,
        };
        if reply_key.is_some_and(|k| self.flows.contains(&k, now)) {
            return Some(Verdict::Flow);
        }
        self.filter.accepts_packet(&p).then_some(Verdict::Rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);

    fn v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let len = 20 + l4.len();
        let mut p = vec![0x45, 0, (len >> 8) as u8, len as u8, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn ports(sport: u16, dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4
    }

    fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        v4(src, dst, PROTO_TCP, &ports(sport, dport))
    }

    fn echo(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16) -> Vec<u8> {
        let mut l4 = vec![if request { 8 } else { 0 }, 0, 0, 0, 0, 0, 0, 1];
        l4[4..6].copy_from_slice(&id.to_be_bytes());
        v4(src, dst, PROTO_ICMP, &l4)
    }

    fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
        let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&quoted[..28]);
        v4(from, to, PROTO_ICMP, &l4)
    }

    fn b_may_reach_a_ssh() -> Filter {
        Filter::new(vec![Rule {
            sources: vec![Prefix::host(B.into())],
            destinations: vec![Prefix::host(A.into())],
            protocols: vec![PROTO_TCP],
            ports: vec![PortRange::single(22)],
        }])
    }

    #[test]
    fn prefixes_match_by_family_and_length() {
        let p = Prefix::new("100.64.0.0".parse().unwrap(), 10).unwrap();
        assert!(p.contains("100.127.255.255".parse().unwrap()));
        assert!(!p.contains("100.128.0.0".parse().unwrap()));
        assert!(!p.contains("::".parse().unwrap()));
        assert_eq!(Prefix::new("10.1.2.3".parse().unwrap(), 8).unwrap().addr(), IpAddr::from([10, 0, 0, 0]));
        assert!(Prefix::new(A.into(), 33).is_none());
        assert!(Prefix::ANY_V6.contains(Ipv6Addr::LOCALHOST.into()));
        assert!(!Prefix::ANY_V6.contains(A.into()));
        let h = Prefix::host("fd7a::1".parse().unwrap());
        assert!(h.contains("fd7a::1".parse().unwrap()) && !h.contains("fd7a::2".parse().unwrap()));
        assert!(p.covers(&Prefix::host(A.into())) && !Prefix::host(A.into()).covers(&p));
    }

    #[test]
    fn rules_match_source_destination_protocol_and_port() {
        let f = b_may_reach_a_ssh();
        let fw = Firewall::new(f.clone(), 1);
        let now = Instant::ZERO;
        assert_eq!(fw.inbound(&tcp(B, A, 40000, 22), now), Some(Verdict::Rule));
        assert_eq!(fw.inbound(&tcp(B, A, 40000, 80), now), None);
        assert_eq!(fw.inbound(&tcp(C, A, 40000, 22), now), None);
        assert_eq!(fw.inbound(&tcp(B, C, 40000, 22), now), None);
        assert_eq!(fw.inbound(&v4(B, A, PROTO_UDP, &ports(1, 22)), now), None);
        // ICMP has no ports: only addresses and protocol count.
        let icmp = Filter::new(vec![Rule { protocols: vec![PROTO_ICMP], ..f.rules()[0].clone() }]);
        assert_eq!(Firewall::new(icmp, 1).inbound(&echo(B, A, true, 7), now), Some(Verdict::Rule));
        assert_eq!(fw.inbound(&echo(B, A, true, 7), now), None);
        // Garbage is dropped, later fragments pass.
        assert_eq!(fw.inbound(&[0x45, 0, 0], now), None);
        let mut frag = tcp(C, A, 1, 80);
        frag[7] = 10;
        assert_eq!(fw.inbound(&frag, now), Some(Verdict::Fragment));
        assert!(Firewall::new(Filter::allow_all(), 1).inbound(&tcp(C, A, 1, 80), now).is_some());
        assert!(Firewall::new(Filter::default(), 1).inbound(&tcp(C, A, 1, 80), now).is_none());
    }

    #[test]
    fn replies_to_opened_flows_pass_until_they_expire() {
        let mut fw = Firewall::new(b_may_reach_a_ssh(), 7);
        let t0 = Instant::ZERO;
        // A may not be reached on 80 by C, but C answers A's connection.
        assert_eq!(fw.inbound(&tcp(C, A, 80, 50000), t0), None);
        fw.outbound(&tcp(A, C, 50000, 80), t0);
        assert_eq!(fw.inbound(&tcp(C, A, 80, 50000), t0), Some(Verdict::Flow));
        assert_eq!(fw.inbound(&tcp(C, A, 80, 50001), t0), None, "another port is another flow");
        assert_eq!(fw.inbound(&v4(C, A, PROTO_UDP, &ports(80, 50000)), t0), None, "another protocol");
        let late = t0 + TCP_FLOW_TIMEOUT;
        assert_eq!(fw.inbound(&tcp(C, A, 80, 50000), late), None);
        // Echo replies match the request's identifier.
        fw.outbound(&echo(A, C, true, 9), t0);
        assert_eq!(fw.inbound(&echo(C, A, false, 9), t0), Some(Verdict::Flow));
        assert_eq!(fw.inbound(&echo(C, A, false, 10), t0), None);
        assert_eq!(fw.inbound(&echo(C, A, true, 9), t0), None, "a request is no reply");
    }

    #[test]
    fn icmp_errors_pass_only_for_allowed_flows() {
        let mut fw = Firewall::new(b_may_reach_a_ssh(), 3);
        let t0 = Instant::ZERO;
        let sent = tcp(A, C, 50000, 80);
        assert_eq!(fw.inbound(&icmp_error(C, A, &sent), t0), None);
        fw.outbound(&sent, t0);
        assert_eq!(fw.inbound(&icmp_error(C, A, &sent), t0), Some(Verdict::Flow));
        // An error about A's reply in a flow B was allowed to open.
        let reply = tcp(A, B, 22, 40000);
        assert_eq!(fw.inbound(&icmp_error(B, A, &reply), t0), Some(Verdict::Flow));
        let other = tcp(A, B, 80, 40000);
        assert_eq!(fw.inbound(&icmp_error(B, A, &other), t0), None);
    }

    #[test]
    fn ipv6_with_extension_headers() {
        let a: Ipv6Addr = "fd7a::1".parse().unwrap();
        let b: Ipv6Addr = "fd7a::2".parse().unwrap();
        let f = Filter::new(vec![Rule {
            sources: vec![Prefix::new(b.into(), 64).unwrap()],
            destinations: vec![Prefix::host(a.into())],
            protocols: vec![PROTO_UDP],
            ports: vec![PortRange { first: 50, last: 60 }],
        }]);
        let fw = Firewall::new(f, 0);
        let mut p = vec![0x60, 0, 0, 0, 0, 16, 60, 64];
        p.extend_from_slice(&b.octets());
        p.extend_from_slice(&a.octets());
        p.extend_from_slice(&[PROTO_UDP, 0, 0, 0, 0, 0, 0, 0]); // destination options
        p.extend_from_slice(&[0, 1, 0, 53, 0, 8, 0, 0]);
        assert_eq!(fw.inbound(&p, Instant::ZERO), Some(Verdict::Rule));
        p[40 + 8 + 3] = 61;
        assert_eq!(fw.inbound(&p, Instant::ZERO), None);
        p.truncate(44);
        assert_eq!(fw.inbound(&p, Instant::ZERO), None, "cut short");
    }

    #[test]
    fn a_full_table_evicts_the_flow_closest_to_expiry() {
        let mut fw = Firewall::new(Filter::default(), 11);
        let t0 = Instant::ZERO;
        for i in 0..(FLOW_SLOTS as u32 * 2) {
            let port = (i % 60000) as u16 + 1024;
            let remote = Ipv4Addr::from(0x0a00_0000 + i / 60000);
            fw.outbound(&tcp(A, remote, port, 443), t0 + Duration::from_millis(u64::from(i)));
        }
        let now = t0 + Duration::from_secs(60);
        assert!(fw.flows().live(now) <= FLOW_SLOTS);
        // The most recent flow is always kept.
        let last = FLOW_SLOTS as u32 * 2 - 1;
        let remote = Ipv4Addr::from(0x0a00_0000 + last / 60000);
        assert_eq!(fw.inbound(&tcp(remote, A, 443, (last % 60000) as u16 + 1024), now), Some(Verdict::Flow));
    }
}
