//! Relayed peers that follow different control replicas (root only; skipped
//! elsewhere, failing in CI). Two replicas share one PostgreSQL store, each
//! with its embedded relay (`--relay auto`: the control port + 1) on its own
//! address on the "public" bridge: replica 1 in the lab's server namespace,
//! replica 2 in a namespace of its own. Alpha sits behind a random-port NAT
//! and is given replica 1 alone; beta sits behind a port-restricted cone and
//! is given replica 2 alone, so the pair has no direct path (see
//! `tailnet_nat.rs`) and each node's home relay is its replica's.
//!
//! Each map names the serving replica's relay first and the other live
//! replica's with its address, and each peer's home relay; a node sends a
//! peer's datagrams to the peer's home relay. So alpha's traffic for beta
//! must cross replica 2's relay and beta's for alpha replica 1's. The test
//! checks the connections each agent opens (its home relay, then its peer's),
//! pings both ways on the relay path, and, with one-way traffic (the
//! receiver's firewall drops the echo requests after counting them), which
//! relay's `forwarded` counter moves.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

#[path = "support/nat.rs"]
mod nat;

#[path = "support/postgres.rs"]
mod postgres_support;

use nat::*;
use netns::{Netns, VethPair};
use std::time::Duration;
use tailnet::*;

const TEST: &str = "relayed_peers_on_different_replicas_meet_through_each_others_relay";

/// The control port of both replicas (each on its own address); the
/// embedded relay listens on the next one.
const CONTROL_PORT: u16 = 8443;
const RELAY_PORT: u16 = CONTROL_PORT + 1;

/// A second control replica in its own namespace on the lab's bridge.
struct Replica {
    // Fields drop in order: the server goes before its namespace.
    proc: Proc,
    url: String,
    _link: VethPair,
    _ns: Netns,
}

/// Starts a control replica on `store` at the lab's bridge address `host`,
/// with the default embedded relay.
fn spawn_replica(lab: &Lab, store: &str, host: u8) -> Replica {
    let ns = Netns::new();
    let link = Lab::attach(&lab.hub, &ns, &lab.subnet.v4_cidr(host));
    let listen = format!("{}:{CONTROL_PORT}", lab.subnet.v4(host));
    let mut child = ns.spawn(&[WIREMESHD, "control", "--listen", &listen, "--state", store, "--identity", "off"]);
    let out = Output::attach(&mut child);
    let url = out.wait_for("control URL: ", Duration::from_secs(30));
    let relay = format!("{}:{RELAY_PORT}", lab.subnet.v4(host));
    assert!(out.text().contains(&format!("relay listening on {relay} ")), "replica 2's relay:\n{}", out.text());
    Replica { proc: Proc { child, out }, url, _link: link, _ns: ns }
}

/// Makes `n` count and drop the ICMP echo requests that arrive on its
/// tailnet interface (so traffic to it goes one way only).
fn drop_echo_requests(n: &Node) {
    n.ns.run_ok(&["nft", "add table ip wmoneway"]);
    n.ns.run_ok(&["nft", "add chain ip wmoneway in { type filter hook input priority 0 ; }"]);
    n.ns.run_ok(&[
        "nft",
        &format!("add rule ip wmoneway in iifname \"{}\" icmp type echo-request counter drop", n.tun),
    ]);
}

fn allow_echo_requests(n: &Node) {
    n.ns.run_ok(&["nft", "delete table ip wmoneway"]);
}

/// Echo requests `n`'s firewall has dropped so far.
fn dropped_echo_requests(n: &Node) -> u64 {
    let out = n.ns.run_ok(&["nft", "list chain ip wmoneway in"]);
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no packet counter in {out}"))
}

/// Sends `count` pings 10 ms apart to a peer that does not answer (its
/// firewall drops them) and returns how many frames each relay forwarded
/// meanwhile (replica 1's, replica 2's) and how many requests arrived.
fn one_way(lab: &Lab, urls: [&str; 2], from: &Node, to: &Node, count: u32) -> (u64, u64, u64) {
    drop_echo_requests(to);
    let before = urls.map(|u| relay_forwarded_on(lab, u));
    let out = from.ns.exec(&["ping", "-q", "-n", "-c", &count.to_string(), "-i", "0.01", "-W", "1", &to.ipv4()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{count} packets transmitted")), "{out:?}");
    let arrived = dropped_echo_requests(to);
    let after = urls.map(|u| relay_forwarded_on(lab, u));
    allow_echo_requests(to);
    (after[0] - before[0], after[1] - before[1], arrived)
}

#[test]
fn relayed_peers_on_different_replicas_meet_through_each_others_relay() {
    if !have_tools(TEST, &["nft"]) {
        return;
    }
    let Some(cluster) = postgres_support::Cluster::start_or_skip(TEST) else { return };
    let store = cluster.socket_url("wiremesh");
    cluster.create_db("wiremesh");
    let mut lab = Lab::replicas(&store, 1);
    let replica2 = spawn_replica(&lab, &store, 2);
    let (url1, url2) = (lab.url.clone(), replica2.url.clone());
    let relay1 = format!("{}:{RELAY_PORT}", lab.subnet.v4(1));
    let relay2 = format!("{}:{RELAY_PORT}", lab.subnet.v4(2));
    let key = lab.new_key(true);
    let a = natted_on(&mut lab, &url1, "alpha", &key, 77, Nat::RandomPorts);
    let b = natted_on(&mut lab, &url2, "beta", &key, 78, Nat::PortRestrictedCone);
    let all = [&a.node, &b.node];
    let replica_logs = || format!("{}--- replica 2 ---\n{}\n", logs(&all), replica2.proc.out.text());

    // Each streams from the one replica it was given, and connects to that
    // replica's relay first: its home, where its peer reaches it.
    for (n, addr) in [(&a.node, lab.subnet.v4(1)), (&b.node, lab.subnet.v4(2))] {
        let open = format!("map stream open (version 2) from {addr}:{CONTROL_PORT}");
        wait_logged(n, 0, &open, Duration::from_secs(20), &all);
        wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, replica_logs);
    }
    wait_logged(&a.node, 0, &format!("relay: connected to {relay1}"), Duration::from_secs(20), &all);
    wait_logged(&b.node, 0, &format!("relay: connected to {relay2}"), Duration::from_secs(20), &all);
    let first_relay = |n: &Node| n.log().lines().find(|l| l.starts_with("relay: connected to ")).map(str::to_string);
    assert_eq!(first_relay(&a.node), Some(format!("relay: connected to {relay1}")), "{}", replica_logs());
    assert_eq!(first_relay(&b.node), Some(format!("relay: connected to {relay2}")), "{}", replica_logs());

    // Pings cross both ways, on the relay path.
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let took = wait_until(Duration::from_secs(20), "alpha -> beta", || a.node.ping(&vb), replica_logs);
    assert!(b.node.ping(&va), "beta -> alpha\n{}", replica_logs());
    let (ka, kb) = (node_key(&a.node), node_key(&b.node));
    wait_logged(&a.node, 0, &format!("path to {kb}: relay"), Duration::from_secs(10), &all);
    wait_logged(&b.node, 0, &format!("path to {ka}: relay"), Duration::from_secs(10), &all);
    for n in all {
        assert_eq!(status_path(n), "relay", "{}'s status path\n{}", n.tun, replica_logs());
    }
    let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
    assert!(ea.contains(&format!("{kb}\t{RELAY_MARKER}")), "alpha's endpoint for beta: {ea:?}");
    assert!(eb.contains(&format!("{ka}\t{RELAY_MARKER}")), "beta's endpoint for alpha: {eb:?}");
    // Each sent its peer's datagrams to the peer's home relay: alpha holds
    // a connection to replica 2's relay, beta one to replica 1's.
    wait_logged(&a.node, 0, &format!("relay: connected to {relay2}"), Duration::from_secs(5), &all);
    wait_logged(&b.node, 0, &format!("relay: connected to {relay1}"), Duration::from_secs(5), &all);

    // Round trips: each relay carries one direction of every exchange.
    const N: u32 = 20;
    let urls = [url1.as_str(), url2.as_str()];
    let before = urls.map(|u| relay_stats_on(&lab, u));
    assert_eq!(pings(&a.node, &vb, N), N, "alpha -> beta, relayed\n{}", replica_logs());
    assert_eq!(pings(&b.node, &va, N), N, "beta -> alpha, relayed\n{}", replica_logs());
    let after = urls.map(|u| relay_stats_on(&lab, u));
    let moved = |i: usize, c: &str| relay_counter(&after[i], c) - relay_counter(&before[i], c);
    let (round1, round2) = (moved(0, "forwarded"), moved(1, "forwarded"));
    for (i, fwd) in [round1, round2].into_iter().enumerate() {
        assert!(
            fwd >= u64::from(2 * N),
            "{} pings both ways, but replica {}'s relay forwarded {fwd} frames\n{}",
            N,
            i + 1,
            replica_logs()
        );
        // Every frame found its receiver on the relay it was sent to.
        assert_eq!(moved(i, "no_peer"), 0, "frames for a key not on replica {}'s relay", i + 1);
    }

    // One way at a time: alpha's datagrams for beta cross replica 2's relay
    // only, beta's for alpha replica 1's only (a few disco probes and
    // keepalives aside).
    const ONE_WAY: u32 = 100;
    const STRAY: u64 = 10;
    let (ab1, ab2, ab_arrived) = one_way(&lab, urls, &a.node, &b.node, ONE_WAY);
    assert_eq!(ab_arrived, u64::from(ONE_WAY), "alpha's echo requests that reached beta\n{}", replica_logs());
    assert!(ab2 >= u64::from(ONE_WAY), "alpha -> beta: replica 2's relay forwarded {ab2} of {ONE_WAY}");
    assert!(ab1 <= STRAY, "alpha -> beta: replica 1's relay forwarded {ab1} frames");
    let (ba1, ba2, ba_arrived) = one_way(&lab, urls, &b.node, &a.node, ONE_WAY);
    assert_eq!(ba_arrived, u64::from(ONE_WAY), "beta's echo requests that reached alpha\n{}", replica_logs());
    assert!(ba1 >= u64::from(ONE_WAY), "beta -> alpha: replica 1's relay forwarded {ba1} of {ONE_WAY}");
    assert!(ba2 <= STRAY, "beta -> alpha: replica 2's relay forwarded {ba2} frames");

    // No direct path through the random-port NAT, all along.
    for (n, k) in [(&a.node, &kb), (&b.node, &ka)] {
        let direct = format!("path to {k}: direct");
        assert!(!n.log().contains(&direct), "{}: a direct path through the random-port NAT?\n{}", n.tun, logs(&all));
    }
    eprintln!(
        "{TEST}: first ping after {took:?}; {N} pings each way: relay 1 forwarded {round1}, relay 2 {round2} frames; \
         {ONE_WAY} requests alpha -> beta only: relay 1 {ab1}, relay 2 {ab2}; beta -> alpha only: relay 1 {ba1}, \
         relay 2 {ba2}"
    );
    drop(lab.server.take());
}
