//! Path discovery through modelled NATs, over the simulator in `sim/nat.rs`:
//! which NAT pairs end on a direct path and which stay relayed, loss, a NAT
//! rebinding mid-session, and forged or replayed probes. In every case the
//! WireGuard session carries on across path changes: exactly one handshake.

#[path = "sim/nat.rs"]
mod nat;
mod sim;

use nat::{Dependence::*, NatSim};
use std::time::Duration;
use wiremesh_core::disco::{self, Body, PairKeys, Path, Source, MAX_MESSAGE_LEN};
use wiremesh_core::keys::PrivateKey;

const SECOND: Duration = Duration::from_secs(1);

/// Two nodes behind the given NATs (mapping, filtering), STUN done, connected.
fn pair(
    seed: u64,
    a: Option<(nat::Dependence, nat::Dependence)>,
    b: Option<(nat::Dependence, nat::Dependence)>,
) -> NatSim {
    let mut s = NatSim::new(seed);
    s.add_node(a);
    s.add_node(b);
    // The agents learn their reflexive addresses before reporting endpoints.
    s.run_for(SECOND);
    assert!(s.nodes.iter().all(|n| n.reflexive.is_some()), "STUN answered");
    s.connect(0, 1);
    s
}

fn both_direct(s: &NatSim) -> bool {
    s.path(0, 1).is_some_and(Path::is_direct) && s.path(1, 0).is_some_and(Path::is_direct)
}

/// Traffic starts over the relay at once, then moves to the direct path
/// without a new handshake; afterwards no data crosses the relay.
fn assert_goes_direct(mut s: NatSim, case: &str) {
    assert_eq!(s.path(0, 1), Some(Path::Relay), "{case}: relay before any probe answered");
    assert_eq!(s.endpoint(0, 1), Some(disco::RELAY_ENDPOINT), "{case}");
    assert!(s.stream(0, 1, 5) == 5, "{case}: traffic flows at once (relayed)");
    assert!(s.run_until(10 * SECOND, both_direct), "{case}: no direct path in 10 s: {:?}", s.traffic);
    // The device follows the chosen path; the peer's reflexive address.
    let Some(Path::Direct(addr)) = s.path(0, 1) else { unreachable!() };
    assert_eq!(s.endpoint(0, 1), Some(addr), "{case}");
    assert_eq!(addr.ip(), s.nodes[1].reflexive.unwrap().ip(), "{case}");
    let relayed = s.traffic.relayed_data;
    assert_eq!(s.stream(0, 1, 50), 50, "{case}");
    assert_eq!(s.stream(1, 0, 50), 50, "{case}");
    assert_eq!(s.traffic.relayed_data, relayed, "{case}: data crossed the relay after the direct path was chosen");
    // Stays direct (heartbeats answered) for a while.
    s.run_for(30 * SECOND);
    assert!(both_direct(&s), "{case}: lost the direct path");
    assert_eq!((s.nodes[0].handshakes, s.nodes[1].handshakes), (1, 1), "{case}: the session restarted");
    assert!(s.nodes[0].disco.rtt(&s.nodes[1].key).is_some_and(|r| r >= 2 * s.udp_delay));
}

/// The pair never finds a direct path yet keeps working through the relay.
fn assert_stays_relayed(mut s: NatSim, case: &str) {
    assert_eq!(s.stream(0, 1, 20), 20, "{case}");
    s.run_for(60 * SECOND);
    assert_eq!(s.path(0, 1), Some(Path::Relay), "{case}");
    assert_eq!(s.path(1, 0), Some(Path::Relay), "{case}");
    let direct = s.traffic.direct_data;
    assert_eq!(s.stream(0, 1, 20), 20, "{case}");
    assert_eq!(s.stream(1, 0, 20), 20, "{case}");
    assert_eq!(s.traffic.direct_data, direct, "{case}");
    assert!(s.traffic.nat_blocked > 0, "{case}: probes were tried");
    assert_eq!((s.nodes[0].handshakes, s.nodes[1].handshakes), (1, 1), "{case}");
}

#[test]
fn public_hosts_go_direct() {
    assert_goes_direct(pair(1, None, None), "no NAT");
}

#[test]
fn endpoint_independent_nats_go_direct() {
    // The common home router: endpoint-independent mapping, address-and-port
    // dependent filtering. Simultaneous pings open both sides.
    for seed in 0..4 {
        assert_goes_direct(
            pair(10 + seed, Some((Independent, AddressAndPort)), Some((Independent, AddressAndPort))),
            "EIM/EIM",
        );
    }
}

#[test]
fn address_dependent_mapping_meets_address_restricted_nat_directly() {
    // A's mapping to B differs from its STUN mapping, but B's filter admits
    // any port of an address it sent to: B learns A's new port from its ping.
    for seed in 0..4 {
        assert_goes_direct(pair(20 + seed, Some((Address, Address)), Some((Independent, Address))), "ADM/EIM-ADF");
    }
}

#[test]
fn symmetric_nat_meets_full_cone_directly() {
    assert_goes_direct(
        pair(30, Some((AddressAndPort, AddressAndPort)), Some((Independent, Independent))),
        "APDM/full cone",
    );
}

#[test]
fn symmetric_nat_behind_port_restricted_nat_stays_relayed() {
    for seed in 0..3 {
        assert_stays_relayed(
            pair(40 + seed, Some((AddressAndPort, AddressAndPort)), Some((Independent, AddressAndPort))),
            "APDM/EIM-APDF",
        );
    }
}

#[test]
fn two_symmetric_nats_stay_relayed() {
    assert_stays_relayed(
        pair(50, Some((AddressAndPort, AddressAndPort)), Some((AddressAndPort, AddressAndPort))),
        "APDM/APDM",
    );
}

#[test]
fn address_dependent_mapping_meets_port_restricted_nat_stays_relayed() {
    assert_stays_relayed(pair(60, Some((Address, Address)), Some((Independent, AddressAndPort))), "ADM/EIM-APDF");
}

#[test]
fn lossy_network_still_goes_direct() {
    let mut s = pair(70, Some((Independent, AddressAndPort)), Some((Independent, AddressAndPort)));
    s.udp_loss = 0.3;
    assert!(s.run_until(30 * SECOND, both_direct), "{:?}", s.traffic);
    // Data over a 30 % lossy path: most arrives, the session holds.
    assert!(s.stream(0, 1, 100) >= 50);
    assert_eq!(s.nodes[0].handshakes, 1);
}

#[test]
fn nat_rebinding_falls_back_to_relay_then_returns_direct() {
    let mut s = pair(80, Some((Independent, AddressAndPort)), Some((Independent, AddressAndPort)));
    assert!(s.run_until(10 * SECOND, both_direct));
    s.run_for(3 * SECOND);
    let old = s.nodes[0].reflexive.unwrap();
    s.nodes[0].nat.as_mut().unwrap().rebind();
    let t0 = s.now;
    // Within seconds both sides notice the silence and use the relay.
    assert!(
        s.run_until(10 * SECOND, |s| s.path(0, 1) == Some(Path::Relay) && s.path(1, 0) == Some(Path::Relay)),
        "no fallback"
    );
    let fallback = s.now - t0;
    assert!(fallback <= 8 * SECOND, "fallback took {fallback:?}");
    let relayed = s.traffic.relayed_data;
    assert_eq!(s.stream(0, 1, 10), 10, "traffic continues over the relay");
    assert!(s.traffic.relayed_data > relayed);
    // The next STUN reports the new mapping; call-me-maybe carries it to
    // the peer and both sides are direct again, to the new port.
    assert!(s.run_until(30 * SECOND, both_direct), "not direct again: {:?}", s.traffic);
    assert_ne!(s.nodes[0].reflexive.unwrap(), old);
    assert_eq!(s.path(1, 0), Some(Path::Direct(s.nodes[0].reflexive.unwrap())));
    assert_eq!(s.stream(0, 1, 20), 20);
    assert_eq!(s.stream(1, 0, 20), 20);
    assert_eq!((s.nodes[0].handshakes, s.nodes[1].handshakes), (1, 1), "the session restarted");
}

#[test]
fn relay_failure_with_no_direct_path_is_visible() {
    // Symmetric on both sides and the relay down: nothing gets through, and
    // the path stays "relay" (the only way there is), not a made-up direct one.
    let mut s = pair(90, Some((AddressAndPort, AddressAndPort)), Some((AddressAndPort, AddressAndPort)));
    s.relay_up = false;
    assert_eq!(s.stream(0, 1, 10), 0);
    assert_eq!(s.path(0, 1), Some(Path::Relay));
}

#[test]
fn forged_and_replayed_probes_are_refused_and_counted() {
    let mut s = pair(100, None, None);
    assert!(s.run_until(10 * SECOND, both_direct));
    let (a, b) = (s.nodes[0].key, s.nodes[1].key);

    // A ping node 0 sent to node 1 (and node 1 answered), sent again.
    let b_addr = s.nodes[1].local;
    let ping = s.nodes[0]
        .probes_sent
        .iter()
        .rev()
        .find(|(d, _)| *d == disco::Destination::Direct(b_addr))
        .map(|(_, p)| p.clone())
        .expect("node 0 pinged node 1");
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let other = PrivateKey::from_bytes([0x33; 32]);
    let before = s.nodes[1].disco.stats();
    let from = Source::Direct(s.nodes[0].local);
    let now = s.now;
    assert_eq!(s.nodes[1].disco.handle_datagram(from, &ping, now), Err(disco::DiscoError::Replayed));

    // A probe claiming A's key but sealed by someone else: forged.
    let keys = PairKeys::derive(&other, &b).unwrap();
    let n = keys.seal(&a, u64::MAX / 2, &Body::Ping { tx_id: [1; 12] }, &mut buf).unwrap();
    assert_eq!(s.nodes[1].disco.handle_datagram(from, &buf[..n], now), Err(disco::DiscoError::Forged));
    // A stranger's key: unknown peer.
    let n = keys.seal(&other.public_key(), u64::MAX / 2, &Body::Ping { tx_id: [1; 12] }, &mut buf).unwrap();
    assert_eq!(s.nodes[1].disco.handle_datagram(from, &buf[..n], now), Err(disco::DiscoError::UnknownPeer));
    // A truncated probe: malformed.
    assert_eq!(s.nodes[1].disco.handle_datagram(from, &ping[..ping.len() - 20], now), Err(disco::DiscoError::Forged));
    assert_eq!(s.nodes[1].disco.handle_datagram(from, &ping[..40], now), Err(disco::DiscoError::Malformed));
    let after = s.nodes[1].disco.stats();
    assert_eq!(after.replayed, before.replayed + 1);
    assert_eq!(after.received, before.received);
    assert_eq!(after.forged, before.forged + 2);
    assert_eq!(after.unknown_peer, before.unknown_peer + 1);
    assert_eq!(after.malformed, before.malformed + 1);
    assert!(s.nodes[1].disco.poll_transmit(&mut buf).unwrap().is_none(), "refused probes are not answered");

    // Spoofed from another address: a valid ping replayed from an
    // attacker's address is refused too, so it cannot steer the path.
    let attacker = "192.0.2.66:9999".parse().unwrap();
    let b_local = s.nodes[1].local;
    s.inject_udp(attacker, b_local, ping.clone());
    s.run_for(SECOND);
    assert!(!s.nodes[1].disco.candidates(&a).any(|c| c == attacker));
    assert_eq!(s.nodes[1].disco.stats().replayed, after.replayed + 1);
    assert!(both_direct(&s));
}

#[test]
fn unblocking_mid_transfer_moves_to_direct_without_loss() {
    // A starts behind a symmetric NAT facing a port-restricted one: relayed.
    // Mid-transfer its NAT becomes endpoint-independent (the block lifted):
    // the pair moves to the direct path, and every packet of the transfer
    // arrives, in one session.
    let mut s = pair(110, Some((AddressAndPort, AddressAndPort)), Some((Independent, AddressAndPort)));
    s.run_for(10 * SECOND);
    assert_eq!(s.path(0, 1), Some(Path::Relay));
    let before = s.nodes[1].delivered.len();
    let mut sent = 0;
    for round in 0..40 {
        if round == 10 {
            let nat = s.nodes[0].nat.as_mut().unwrap();
            nat.mapping = Independent;
            nat.random_ports = false;
            nat.rebind();
        }
        for _ in 0..10 {
            s.send_ip(0, 1, &[round as u8; 200]);
            sent += 1;
            s.run_for(Duration::from_millis(100));
        }
    }
    s.run_for(SECOND);
    assert!(both_direct(&s), "not direct after the block was lifted: {:?}", s.traffic);
    assert_eq!(s.nodes[1].delivered.len() - before, sent, "packets lost across the path change");
    assert!(s.traffic.relayed_data > 0 && s.traffic.direct_data > 0);
    assert_eq!((s.nodes[0].handshakes, s.nodes[1].handshakes), (1, 1));
}
