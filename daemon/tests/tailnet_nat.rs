//! Two nodes, each behind its own NAT (a router namespace with nftables
//! masquerade), and the control server with its embedded relay and STUN on
//! the "public" bridge (root only; skipped elsewhere, failing in CI).
//!
//! Two kinds of NAT ([`Nat`]):
//! * [`Nat::PortRestrictedCone`], the usual home router: plain masquerade
//!   keeps the node's source port (one public port for every destination,
//!   endpoint-independent mapping), and nothing new comes in from outside.
//!   Two of these connect directly: both nodes learn their reflexive address
//!   by STUN from the WireGuard socket, report it, and probe each other's at
//!   the same time (disco).
//! * [`Nat::RandomPorts`]: `masquerade random` gives every destination
//!   (address and port) its own random public port (address-and-port-
//!   dependent mapping, "symmetric"), so the port STUN reports is not the one
//!   the peer sees; facing a port-restricted cone the pair has no direct
//!   path and must go through the relay. The test checks the router really
//!   maps that way (its conntrack table) before relying on it.
//!
//! Traffic through the relay is measured on the relay's own counter
//! (`wiremesh relay stats --json`, `forwarded` frames).
//!
//! The cases: two cones go direct and the relay carries none of their
//! pings; a random-port NAT facing a cone stays on the relay; lifting that
//! block during a TCP transfer moves the pair to direct without breaking the
//! connection (and prints relayed and direct iperf3 throughput); a direct
//! path that dies (the NAT turns symmetric and forgets its mappings) falls
//! back to the relay within seconds and the session carries on.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

#[path = "support/nat.rs"]
mod nat;

use nat::*;
use std::process::Child;
use std::time::{Duration, Instant};
use tailnet::*;

#[test]
fn two_nodes_behind_nats_connect_directly() {
    const TEST: &str = "two_nodes_behind_nats_connect_directly";
    if !have_tools(TEST, &["nft"]) {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let a = natted(&mut lab, "alpha", &key, 71, Nat::PortRestrictedCone);
    let b = natted(&mut lab, "beta", &key, 72, Nat::PortRestrictedCone);
    let all = [&a.node, &b.node];
    for n in all {
        wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || logs(&all));
    }
    // Each node learns its NAT's address by STUN and reports it.
    for n in [&a, &b] {
        let want = format!("reflexive address {}:", n.public_ip);
        wait_until(Duration::from_secs(20), "the reflexive address", || n.node.log().contains(&want), || logs(&all));
    }
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let took = wait_until(Duration::from_secs(30), "alpha -> beta", || a.node.ping(&vb), || logs(&all));
    assert!(b.node.ping(&va), "beta -> alpha\n{}", logs(&all));
    // Disco chose the direct paths, each to the other's NAT (not a relay or
    // a private address).
    let (ka, kb) = (node_key(&a.node), node_key(&b.node));
    let direct =
        wait_logged(&a.node, 0, &format!("path to {kb}: direct {}:", b.public_ip), Duration::from_secs(30), &all);
    wait_logged(&b.node, 0, &format!("path to {ka}: direct {}:", a.public_ip), Duration::from_secs(10), &all);
    let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
    assert!(ea.contains(&format!("\t{}:", b.public_ip)), "alpha's endpoint for beta: {ea:?}");
    assert!(eb.contains(&format!("\t{}:", a.public_ip)), "beta's endpoint for alpha: {eb:?}");
    let (pa, pb) = (status_path(&a.node), status_path(&b.node));
    assert!(pa.starts_with(&format!("direct {}:", b.public_ip)), "alpha's status path: {pa:?}");
    assert!(pb.starts_with(&format!("direct {}:", a.public_ip)), "beta's status path: {pb:?}");
    // And the traffic does not go through the relay: 50 pings each way
    // (200 frames, were they relayed) leave its counter where it was, but
    // for a probe or two already on their way.
    let before = relay_forwarded(&lab);
    assert_eq!(pings(&a.node, &vb, 50), 50, "alpha -> beta, direct\n{}", logs(&all));
    assert_eq!(pings(&b.node, &va, 50), 50, "beta -> alpha, direct\n{}", logs(&all));
    let relayed = relay_forwarded(&lab) - before;
    assert!(relayed <= 4, "the relay forwarded {relayed} frames while 100 pings crossed a direct path\n{}", logs(&all));
    eprintln!(
        "{TEST}: first ping after {took:?}, both paths direct after {direct:?} more; relay forwarded {relayed} frames \
         during 100 direct pings; endpoints: {} / {}",
        ea.trim(),
        eb.trim()
    );
    drop(lab.server.take());
}

/// Alpha behind a random-port NAT, beta behind a port-restricted cone, both
/// registered, each with the peer in its map and connected to the relay,
/// and alpha's router checked to map one socket to a different public port
/// per destination.
fn relayed_pair(test: &str) -> (Lab, Natted, Natted) {
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let a = natted(&mut lab, "alpha", &key, 73, Nat::RandomPorts);
    let b = natted(&mut lab, "beta", &key, 74, Nat::PortRestrictedCone);
    {
        let all = [&a.node, &b.node];
        for n in all {
            wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || logs(&all));
            wait_logged(n, 0, "relay: connected to ", Duration::from_secs(20), &all);
        }
        for n in [&a, &b] {
            let want = format!("reflexive address {}:", n.public_ip);
            wait_logged(&n.node, 0, &want, Duration::from_secs(20), &all);
        }
        // Alpha's WireGuard socket has been to the STUN server and (probing)
        // to beta's NAT: the two mappings must differ, or this is not the
        // NAT the test means.
        let port = wg_listen_port(&a.node);
        let stun = format!("{}:", lab.subnet.v4(1));
        let peer = format!("{}:", b.public_ip);
        let seen = std::cell::RefCell::new(Vec::new());
        wait_until(
            Duration::from_secs(10),
            "alpha's router mapping its WireGuard socket towards STUN and towards beta",
            || {
                let maps = a.udp_mappings(port);
                let both =
                    maps.iter().any(|(d, _)| d.starts_with(&stun)) && maps.iter().any(|(d, _)| d.starts_with(&peer));
                *seen.borrow_mut() = maps;
                both
            },
            || format!("mappings of port {port}: {:?}\n{}", seen.borrow(), logs(&all)),
        );
        let maps = seen.into_inner();
        let ports: std::collections::BTreeSet<u16> = maps.iter().map(|&(_, p)| p).collect();
        assert_eq!(ports.len(), maps.len(), "masquerade random reused a public port: {maps:?}");
        eprintln!("{test}: alpha's WireGuard port {port} maps to {maps:?}");
    }
    (lab, a, b)
}

/// Pings both ways through the relay and checks it carried them.
fn check_relayed(test: &str, lab: &Lab, a: &Natted, b: &Natted) {
    let all = [&a.node, &b.node];
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let (took, ka, kb, ea, eb) = wait_relayed(a, b);
    for n in all {
        // The status names the home relay, connected.
        let st = n.status();
        let relays = st["relays"].as_object().cloned().unwrap_or_default();
        assert!(
            relays.values().any(|r| r["home"] == true && r["connected"] == true),
            "{}: no connected home relay in the status: {st}",
            n.tun
        );
        let text = String::from_utf8_lossy(&n.cli(&["status"]).stdout).into_owned();
        assert!(text.contains(" (home): connected"), "{text}");
    }
    // Each echo request and each reply crosses the relay once.
    const N: u32 = 20;
    let before = relay_forwarded(lab);
    assert_eq!(pings(&a.node, &vb, N), N, "alpha -> beta, relayed\n{}", logs(&all));
    assert_eq!(pings(&b.node, &va, N), N, "beta -> alpha, relayed\n{}", logs(&all));
    let relayed = relay_forwarded(lab) - before;
    assert!(relayed >= u64::from(4 * N), "{} pings both ways, but the relay forwarded {relayed} frames", 2 * N);
    // No direct path was found through the random-port NAT.
    for (n, k) in [(&a.node, &kb), (&b.node, &ka)] {
        let direct = format!("path to {k}: direct");
        assert!(!n.log().contains(&direct), "{}: a direct path through the random-port NAT?\n{}", n.tun, logs(&all));
    }
    eprintln!(
        "{test}: first ping after {took:?}; the relay forwarded {relayed} frames for {} pings; endpoints: {} / {}",
        2 * N,
        ea.trim(),
        eb.trim()
    );
}

#[test]
fn random_port_nat_goes_through_the_relay() {
    const TEST: &str = "random_port_nat_goes_through_the_relay";
    if !have_tools(TEST, &["nft", "conntrack"]) {
        return;
    }
    let (mut lab, a, b) = relayed_pair(TEST);
    check_relayed(TEST, &lab, &a, &b);
    drop(lab.server.take());
}

#[test]
fn a_dying_direct_path_falls_back_to_the_relay() {
    const TEST: &str = "a_dying_direct_path_falls_back_to_the_relay";
    if !have_tools(TEST, &["nft", "conntrack"]) {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let a = natted(&mut lab, "alpha", &key, 75, Nat::PortRestrictedCone);
    let b = natted(&mut lab, "beta", &key, 76, Nat::PortRestrictedCone);
    let all = [&a.node, &b.node];
    for n in all {
        wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || logs(&all));
        wait_logged(n, 0, "relay: connected to ", Duration::from_secs(20), &all);
    }
    let (ka, kb) = (node_key(&a.node), node_key(&b.node));
    wait_logged(&a.node, 0, &format!("path to {kb}: direct {}:", b.public_ip), Duration::from_secs(30), &all);
    wait_logged(&b.node, 0, &format!("path to {ka}: direct {}:", a.public_ip), Duration::from_secs(10), &all);
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    assert_eq!(pings(&a.node, &vb, 5), 5, "alpha -> beta, direct\n{}", logs(&all));

    // Alpha's router turns symmetric and forgets its mappings: the direct
    // path stops answering both ways, and no new one can be found.
    let (from_a, from_b) = (a.node.log().len(), b.node.log().len());
    a.set_nat(Nat::RandomPorts);
    let changed = Instant::now();
    // Pings all along, 50 ms apart for 12 s: how many the change costs.
    let during = {
        let node = &a.node;
        let vb = vb.clone();
        std::thread::scope(|s| {
            let h = s.spawn(move || pings(node, &vb, 240));
            let relay_a = format!("path to {kb}: relay");
            let relay_b = format!("path to {ka}: relay");
            wait_until(
                Duration::from_secs(12),
                "both sides back on the relay",
                || {
                    let (la, lb) = (a.node.log(), b.node.log());
                    la.get(from_a..).is_some_and(|l| l.contains(&relay_a))
                        && lb.get(from_b..).is_some_and(|l| l.contains(&relay_b))
                },
                || logs(&all),
            );
            let fell_back = changed.elapsed();
            (fell_back, h.join().expect("pinger"))
        })
    };
    let (fell_back, answered) = during;
    let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
    assert!(ea.contains(&format!("{kb}\t{RELAY_MARKER}")), "alpha's endpoint for beta: {ea:?}");
    assert!(eb.contains(&format!("{ka}\t{RELAY_MARKER}")), "beta's endpoint for alpha: {eb:?}");
    for n in all {
        assert_eq!(status_path(n), "relay", "{}'s status path", n.tun);
    }
    // The session carries on through the relay, both ways.
    const N: u32 = 20;
    let before = relay_forwarded(&lab);
    assert_eq!(pings(&a.node, &vb, N), N, "alpha -> beta, relayed\n{}", logs(&all));
    assert_eq!(pings(&b.node, &va, N), N, "beta -> alpha, relayed\n{}", logs(&all));
    let relayed = relay_forwarded(&lab) - before;
    assert!(relayed >= u64::from(4 * N), "{} pings both ways, but the relay forwarded {relayed} frames", 2 * N);
    eprintln!(
        "{TEST}: both sides on the relay {fell_back:?} after the NAT change; {answered} of 240 pings (50 ms apart) \
         answered across it; then the relay forwarded {relayed} frames for {} pings",
        2 * N
    );
    drop(lab.server.take());
}

/// An iperf3 run from `client` to an iperf3 server on `server`'s tailnet
/// address (one client, then the server exits): started, not waited for.
struct Iperf {
    server: Child,
    client: Child,
    started: Instant,
}

const IPERF_PORT: &str = "5201";

fn start_iperf(client: &Node, server: &Node, seconds: u32) -> Iperf {
    let ip = server.ipv4();
    let srv = server.ns.spawn(&["iperf3", "-s", "-1", "-B", &ip, "-p", IPERF_PORT]);
    wait_until(
        Duration::from_secs(5),
        "iperf3 listening",
        || {
            let out = server.ns.exec(&["ss", "-Htln", "sport", "=", &format!(":{IPERF_PORT}")]);
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        },
        String::new,
    );
    let secs = seconds.to_string();
    let cli = client.ns.spawn(&["iperf3", "-c", &ip, "-p", IPERF_PORT, "-t", &secs, "-J"]);
    Iperf { server: srv, client: cli, started: Instant::now() }
}

impl Iperf {
    fn running(&mut self) -> bool {
        matches!(self.client.try_wait(), Ok(None))
    }

    /// Waits for both ends (bounded: killed after `limit`) and returns the
    /// client's JSON report, asserting it ended well.
    fn finish(self, limit: Duration) -> serde_json::Value {
        let Iperf { server, client, started } = self;
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = client.id();
        std::thread::spawn(move || {
            let _ = tx.send(client.wait_with_output());
        });
        let out = match rx.recv_timeout(limit.saturating_sub(started.elapsed())) {
            Ok(out) => out.expect("iperf3 client"),
            Err(_) => {
                // SAFETY: signalling our own child, which has not been reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("iperf3 client still running after {limit:?}");
            }
        };
        let mut server = server;
        let _ = server.kill();
        let _ = server.wait();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("iperf3 -J: {e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        assert!(out.status.success(), "iperf3 client failed ({}): {report}", out.status);
        assert!(report.get("error").is_none(), "iperf3 reported an error: {}", report["error"]);
        report
    }
}

/// The receiver's average throughput in Mbit/s.
fn mbits(report: &serde_json::Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"].as_f64().expect("sum_received in the iperf3 report") / 1e6
}

#[test]
fn lifting_the_block_moves_to_direct_without_breaking_tcp() {
    const TEST: &str = "lifting_the_block_moves_to_direct_without_breaking_tcp";
    if !have_tools(TEST, &["nft", "conntrack", "iperf3", "ss"]) {
        return;
    }
    let (mut lab, a, b) = relayed_pair(TEST);
    check_relayed(TEST, &lab, &a, &b);
    let all = [&a.node, &b.node];
    let (ka, kb) = (node_key(&a.node), node_key(&b.node));

    // Relayed throughput, for the figure.
    let relayed = mbits(&start_iperf(&a.node, &b.node, 3).finish(Duration::from_secs(15)));

    // A TCP transfer through the tunnel, and, while it runs, alpha's router
    // turns into a port-restricted cone.
    const TRANSFER: u32 = 30;
    let mut transfer = start_iperf(&a.node, &b.node, TRANSFER);
    std::thread::sleep(Duration::from_secs(3));
    assert!(transfer.running(), "the transfer ended before the NAT changed\n{}", logs(&all));
    let (from_a, from_b) = (a.node.log().len(), b.node.log().len());
    a.set_nat(Nat::PortRestrictedCone);
    let changed = Instant::now();
    let direct_a = format!("path to {kb}: direct {}:", b.public_ip);
    let direct_b = format!("path to {ka}: direct {}:", a.public_ip);
    // Alpha's STUN sees its new (port-keeping) mapping and reports it; then
    // the pair probes its way to the direct path.
    let restun_line = format!("reflexive address {}:", a.public_ip);
    let mut restun = None;
    wait_until(
        Duration::from_secs(u64::from(TRANSFER) - 4),
        "both sides on the direct path after the NAT change",
        || {
            let (la, lb) = (a.node.log(), b.node.log());
            let (la, lb) = (la.get(from_a..).unwrap_or(""), lb.get(from_b..).unwrap_or(""));
            if restun.is_none() {
                restun = la.lines().find(|l| l.starts_with(&restun_line)).map(|l| (changed.elapsed(), l.to_string()));
            }
            la.contains(&direct_a) && lb.contains(&direct_b)
        },
        || logs(&all),
    );
    let switched = changed.elapsed();
    let restun = restun.map(|(t, l)| format!("{l:?} after {t:?}")).unwrap_or_else(|| "not logged".into());
    assert!(transfer.running(), "the transfer ended before the pair went direct\n{}", logs(&all));
    let report = transfer.finish(Duration::from_secs(u64::from(TRANSFER) + 15));
    // One connection from start to end, carrying data to the last interval.
    let connected = report["start"]["connected"].as_array().map(Vec::len);
    assert_eq!(connected, Some(1), "iperf3 connections: {}", report["start"]["connected"]);
    let intervals = report["intervals"].as_array().expect("iperf3 intervals");
    assert!(intervals.len() + 1 >= TRANSFER as usize, "{} intervals of {TRANSFER}", intervals.len());
    let last = intervals.last().map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0)).unwrap_or(0);
    assert!(last > 0, "nothing moved in the transfer's last second\n{}", logs(&all));
    // The seconds of the transfer (the NAT changed at 3) that moved nothing.
    let stalled: Vec<usize> =
        intervals.iter().enumerate().filter(|(_, i)| i["sum"]["bytes"].as_u64() == Some(0)).map(|(n, _)| n).collect();
    // Alpha's relay connection crosses its NAT too: what the change did to it.
    let relay_events: Vec<String> = a
        .node
        .log()
        .get(from_a..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with("relay: "))
        .map(str::to_string)
        .collect();

    let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
    assert!(ea.contains(&format!("{kb}\t{}:", b.public_ip)), "alpha's endpoint for beta: {ea:?}");
    assert!(eb.contains(&format!("{ka}\t{}:", a.public_ip)), "beta's endpoint for alpha: {eb:?}");
    let (pa, pb) = (status_path(&a.node), status_path(&b.node));
    assert!(pa.starts_with(&format!("direct {}:", b.public_ip)), "alpha's status path: {pa:?}");
    assert!(pb.starts_with(&format!("direct {}:", a.public_ip)), "beta's status path: {pb:?}");

    // Direct now: 50 pings leave the relay's counter (almost) flat.
    let vb = b.node.ipv4();
    let before = relay_forwarded(&lab);
    assert_eq!(pings(&a.node, &vb, 50), 50, "alpha -> beta, direct\n{}", logs(&all));
    let through_relay = relay_forwarded(&lab) - before;
    assert!(through_relay <= 4, "the relay forwarded {through_relay} frames while 50 pings crossed directly");

    // Direct throughput, for the figure.
    let direct = mbits(&start_iperf(&a.node, &b.node, 3).finish(Duration::from_secs(15)));
    eprintln!(
        "{TEST}: direct {switched:?} after the NAT change (alpha's new mapping: {}), during a {TRANSFER} s TCP \
         transfer ({:.0} Mbit/s on average, {} retransmits, one connection, {} one-second intervals, those without \
         data: {stalled:?}); relay forwarded {through_relay} frames during 50 direct pings; alpha's relay client \
         meanwhile: {relay_events:?}",
        restun,
        mbits(&report),
        report["end"]["sum_sent"]["retransmits"],
        intervals.len()
    );
    eprintln!(
        "{TEST}: throughput through the NATs (iperf3 -t 3, one TCP stream): relayed {relayed:.0} Mbit/s, direct \
         {direct:.0} Mbit/s, direct/relayed {:.2}",
        direct / relayed
    );
    drop(lab.server.take());
}
