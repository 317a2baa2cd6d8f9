//! The core's inbound packet filter (`wiremesh_core::filter`) with arbitrary
//! rules and arbitrary packets.
//!
//! Nothing may panic; on a firewall with no flows, a packet passes exactly
//! when a plainly written reference says a rule accepts it (or it is a later
//! fragment); after a TCP, UDP or SCTP packet goes out, its reply comes in
//! whatever the rules say.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use wiremesh_core::filter::{Filter, Firewall, Packet, PortRange, Prefix, Rule, Transport, Verdict};
use wiremesh_core::Instant;

#[derive(Arbitrary, Debug)]
struct ARule {
    sources: Vec<(bool, [u8; 16], u8)>,
    destinations: Vec<(bool, [u8; 16], u8)>,
    protocols: Vec<u8>,
    ports: Vec<(u16, u16)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rules: Vec<ARule>,
    packets: Vec<Vec<u8>>,
}

fn addr(v6: bool, b: [u8; 16]) -> IpAddr {
    if v6 {
        IpAddr::from(b)
    } else {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    }
}

fn prefixes(list: &[(bool, [u8; 16], u8)]) -> Vec<Prefix> {
    list.iter()
        .take(8)
        .map(|&(v6, b, len)| {
            let width = if v6 { 129 } else { 33 };
            Prefix::new(addr(v6, b), len % width).expect("length within the family")
        })
        .collect()
}

/// Whether `a` lies in `p`, bit by bit.
fn inside(p: &Prefix, a: IpAddr) -> bool {
    let bytes = |x: IpAddr| match x {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    let (pb, ab) = (bytes(p.addr()), bytes(a));
    pb.len() == ab.len()
        && (0..usize::from(p.len())).all(|i| (pb[i / 8] >> (7 - i % 8)) & 1 == (ab[i / 8] >> (7 - i % 8)) & 1)
}

fn reference(rules: &[Rule], p: &Packet) -> bool {
    let port = match p.transport {
        Transport::Ports { destination, .. } => destination,
        _ => 0,
    };
    rules.iter().any(|r| {
        (r.protocols.is_empty() || r.protocols.contains(&p.protocol))
            && (!matches!(p.protocol, 6 | 17 | 132) || r.ports.iter().any(|pr| pr.contains(port)))
            && r.sources.iter().any(|s| inside(s, p.source))
            && r.destinations.iter().any(|d| inside(d, p.destination))
    })
}

/// The reply to a packet: addresses and the first four transport bytes swapped.
fn reply(packet: &[u8]) -> Option<Vec<u8>> {
    let mut r = packet.to_vec();
    let (src, dst, l4) = match r.first()? >> 4 {
        4 => (12..16, 16..20, usize::from(r[0] & 0x0f) * 4),
        6 => (8..24, 24..40, 40),
        _ => return None,
    };
    let s = r.get(src.clone())?.to_vec();
    let d = r.get(dst.clone())?.to_vec();
    r[src.start..src.start + d.len()].copy_from_slice(&d);
    r[dst.start..dst.start + s.len()].copy_from_slice(&s);
    let ports = r.get(l4..l4 + 4)?.to_vec();
    r[l4..l4 + 2].copy_from_slice(&ports[2..4]);
    r[l4 + 2..l4 + 4].copy_from_slice(&ports[0..2]);
    Some(r)
}

fuzz_target!(|input: Input| {
    let rules: Vec<Rule> = input
        .rules
        .iter()
        .take(16)
        .map(|r| Rule {
            sources: prefixes(&r.sources),
            destinations: prefixes(&r.destinations),
            protocols: r.protocols.iter().take(8).copied().collect(),
            ports: r.ports.iter().take(8).map(|&(a, b)| PortRange { first: a.min(b), last: a.max(b) }).collect(),
        })
        .collect();
    let now = Instant::ZERO;
    let fresh = Firewall::new(Filter::new(rules.clone()), 7);
    let mut fw = Firewall::new(Filter::new(rules.clone()), 7);
    for packet in input.packets.iter().take(32) {
        let verdict = fresh.inbound(packet, now);
        match Packet::parse(packet) {
            None => assert_eq!(verdict, None, "unparseable packets are dropped"),
            Some(p) if p.transport == Transport::LaterFragment => assert_eq!(verdict, Some(Verdict::Fragment)),
            // An ICMP error may pass for the flow it quotes; the rest by the rules alone.
            Some(p) if matches!(p.transport, Transport::IcmpError(_)) => {}
            Some(p) => assert_eq!(verdict.is_some(), reference(&rules, &p), "{p:?}"),
        }
        fw.outbound(packet, now);
        if let Some(p) = Packet::parse(packet) {
            // (IPv6 only without extension headers: `reply` swaps the bytes right after the header.)
            let direct = p.source.is_ipv4() || packet[6] == p.protocol;
            if matches!(p.transport, Transport::Ports { .. }) && direct {
                let back = reply(packet).expect("a parsed packet has its headers");
                assert!(fw.inbound(&back, now).is_some(), "the reply to {p:?} passes");
            }
        }
    }
});
