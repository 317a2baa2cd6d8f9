//! The inbound packet filter inside the device, over the deterministic
//! simulator, and against a reference model with arbitrary rules and packets.

mod sim;

use proptest::prelude::*;
use sim::{NetConfig, Sim};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use wiremesh_core::crypto::Portable;
use wiremesh_core::device::DropReason;
use wiremesh_core::filter::{Filter, Firewall, PortRange, Prefix, Rule, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use wiremesh_core::Instant;

const SECOND: Duration = Duration::from_secs(1);

fn l4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[3] = 40;
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p
}

/// Node 0 accepts only node 1's TCP to port 22; node 2 is its peer too.
fn three_nodes(seed: u64, net: NetConfig) -> Sim<Portable> {
    let mut s = Sim::<Portable>::new(seed, net);
    for _ in 0..3 {
        s.add_node();
    }
    s.connect(0, 1);
    s.connect(0, 2);
    s.connect(1, 2);
    let (a, b) = (s.nodes[0].tunnel_ip, s.nodes[1].tunnel_ip);
    s.nodes[0].device.set_filter(Some(Filter::new(vec![Rule {
        sources: vec![Prefix::host(b.into())],
        destinations: vec![Prefix::host(a.into())],
        protocols: vec![PROTO_TCP],
        ports: vec![PortRange::single(22)],
    }])));
    s
}

#[test]
fn the_device_delivers_only_what_its_filter_or_its_flows_allow() {
    let mut s = three_nodes(5, NetConfig { loss: 0.05, reorder: 0.1, ..NetConfig::default() });
    let (a, b, c) = (s.nodes[0].tunnel_ip, s.nodes[1].tunnel_ip, s.nodes[2].tunnel_ip);
    let allowed = l4_packet(b, a, PROTO_TCP, 40000, 22);
    let denied_port = l4_packet(b, a, PROTO_TCP, 40000, 80);
    let denied_peer = l4_packet(c, a, PROTO_TCP, 40000, 22);
    for _ in 0..20 {
        s.push_raw(1, &allowed);
        s.push_raw(1, &denied_port);
        s.push_raw(2, &denied_peer);
        s.run_for(SECOND);
    }
    let delivered = &s.nodes[0].delivered;
    assert!(!delivered.is_empty());
    assert!(delivered.iter().all(|p| *p == allowed), "only b's ssh reaches a");
    let filtered = s.count_drops(0, DropReason::Filtered);
    assert!(filtered >= 20, "dropped and counted: {filtered}");
    assert_eq!(s.nodes[0].device.drops().get(DropReason::Filtered) as usize, filtered);
    // Replies to a's own connections pass; node 1 has no filter at all.
    let before = s.nodes[0].delivered.len();
    s.push_raw(0, &l4_packet(a, c, PROTO_UDP, 5353, 53));
    s.run_for(SECOND);
    s.push_raw(2, &l4_packet(c, a, PROTO_UDP, 53, 5353));
    s.run_for(SECOND);
    let replies = s.nodes[0].delivered.len() - before;
    assert!(replies <= 1);
    // With 5% loss either packet may be lost: repeat until one gets through.
    for _ in 0..20 {
        if s.nodes[0].delivered.len() > before {
            break;
        }
        s.push_raw(0, &l4_packet(a, c, PROTO_UDP, 5353, 53));
        s.run_for(SECOND);
        s.push_raw(2, &l4_packet(c, a, PROTO_UDP, 53, 5353));
        s.run_for(SECOND);
    }
    assert_eq!(s.nodes[0].delivered.last().unwrap(), &l4_packet(c, a, PROTO_UDP, 53, 5353));
    // Removing the filter lets everything through again.
    s.nodes[0].device.set_filter(None);
    let n = s.nodes[0].delivered.len();
    for _ in 0..5 {
        s.push_raw(2, &denied_peer);
        s.run_for(SECOND);
    }
    assert!(s.nodes[0].delivered.len() > n);
    assert!(s.nodes[0].device.filter().is_none());
}

fn prefix_strategy() -> impl Strategy<Value = Prefix> {
    (0u8..4, 0u8..=32).prop_map(|(host, len)| Prefix::new(IpAddr::from([10, 0, 0, host]), len).unwrap())
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(prefix_strategy(), 0..3),
        prop::collection::vec(prefix_strategy(), 0..3),
        prop::collection::vec(prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP, 47]), 0..3),
        prop::collection::vec(
            (0u16..6, 0u16..6).prop_map(|(a, b)| PortRange { first: a.min(b), last: a.max(b) }),
            0..3,
        ),
    )
        .prop_map(|(sources, destinations, protocols, ports)| Rule { sources, destinations, protocols, ports })
}

/// The semantics written out plainly, independent of the implementation.
fn reference(rules: &[Rule], src: [u8; 4], dst: [u8; 4], proto: u8, dport: u16) -> bool {
    let inside = |p: &Prefix, a: [u8; 4]| {
        let IpAddr::V4(n) = p.addr() else { return false };
        let m = if p.is_empty() { 0 } else { u32::MAX << (32 - u32::from(p.len())) };
        u32::from(n) & m == u32::from_be_bytes(a) & m
    };
    rules.iter().any(|r| {
        r.sources.iter().any(|p| inside(p, src))
            && r.destinations.iter().any(|p| inside(p, dst))
            && (r.protocols.is_empty() || r.protocols.contains(&proto))
            && (!matches!(proto, 6 | 17 | 132) || r.ports.iter().any(|pr| pr.first <= dport && dport <= pr.last))
    })
}

proptest! {
    #[test]
    fn the_firewall_agrees_with_the_reference(
        rules in prop::collection::vec(rule_strategy(), 0..6),
        packets in prop::collection::vec((0u8..4, 0u8..4, prop::sample::select(vec![6u8, 17, 1, 132, 47]), 0u16..6), 1..20),
    ) {
        let fw = Firewall::new(Filter::new(rules.clone()), 9);
        for (s, d, proto, port) in packets {
            let (src, dst) = ([10, 0, 0, s], [10, 0, 0, d]);
            let p = if proto == PROTO_ICMP {
                let mut p = l4_packet(src.into(), dst.into(), proto, 0, 0);
                p[20] = 13; // a timestamp request: no echo, no error
                p
            } else {
                l4_packet(src.into(), dst.into(), proto, 1000, port)
            };
            prop_assert_eq!(fw.inbound(&p, Instant::ZERO).is_some(), reference(&rules, src, dst, proto, port));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        let mut fw = Firewall::new(Filter::allow_all(), 1);
        let _ = fw.inbound(&bytes, Instant::ZERO);
        fw.outbound(&bytes, Instant::ZERO);
    }
}
