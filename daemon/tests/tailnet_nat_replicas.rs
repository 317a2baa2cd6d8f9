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
//!
//! And when beta is given both replicas (its own first) and its replica is
//! SIGKILLed, beta moves to replica 1, whose relay becomes its home, and
//! alpha's map follows at once (a node is at home on the replica it came to
//! last), so alpha's pings go unanswered for well under a second.

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

/// Two replicas on one store, alpha behind a random-port NAT given replica
/// 1 only, beta behind a port-restricted cone given `beta_control` (replica
/// 2 first), each with the peer in its map and connected to its home relay.
/// Fields drop in order: the nodes first, the store last.
struct Pair {
    a: Natted,
    b: Natted,
    replica2: Replica,
    lab: Lab,
    _cluster: postgres_support::Cluster,
    url1: String,
    url2: String,
    relay1: String,
    relay2: String,
}

impl Pair {
    fn start(test: &str, private: u8, beta_control: impl Fn(&str, &str) -> String) -> Option<Pair> {
        if !have_tools(test, &["nft"]) {
            return None;
        }
        let cluster = postgres_support::Cluster::start_or_skip(test)?;
        let store = cluster.socket_url("wiremesh");
        cluster.create_db("wiremesh");
        let mut lab = Lab::replicas(&store, 1);
        let replica2 = spawn_replica(&lab, &store, 2);
        let (url1, url2) = (lab.url.clone(), replica2.url.clone());
        let relay1 = format!("{}:{RELAY_PORT}", lab.subnet.v4(1));
        let relay2 = format!("{}:{RELAY_PORT}", lab.subnet.v4(2));
        let key = lab.new_key(true);
        let a = natted_on(&mut lab, &url1, "alpha", &key, private, Nat::RandomPorts);
        let b = natted_on(&mut lab, &beta_control(&url1, &url2), "beta", &key, private + 1, Nat::PortRestrictedCone);
        let p = Pair { a, b, replica2, lab, _cluster: cluster, url1, url2, relay1, relay2 };
        // Each streams from its (first) replica, and connects to that
        // replica's relay: its home, where its peer reaches it.
        let all = p.nodes();
        for (n, addr) in [(&p.a.node, p.lab.subnet.v4(1)), (&p.b.node, p.lab.subnet.v4(2))] {
            let open = format!("map stream open (version 2) from {addr}:{CONTROL_PORT}");
            wait_until(Duration::from_secs(20), &open, || n.log().contains(&open), || p.logs());
            wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || p.logs());
        }
        // (Beta may connect to alpha's home relay as early as to its own:
        // alpha is in its first map, and disco probes at once.)
        wait_logged(&p.a.node, 0, &format!("relay: connected to {}", p.relay1), Duration::from_secs(20), &all);
        wait_logged(&p.b.node, 0, &format!("relay: connected to {}", p.relay2), Duration::from_secs(20), &all);
        Some(p)
    }

    fn nodes(&self) -> [&Node; 2] {
        [&self.a.node, &self.b.node]
    }

    /// Both agents' logs and replica 2's (replica 1 runs in the lab).
    fn logs(&self) -> String {
        format!("{}--- replica 2 ---\n{}\n", logs(&self.nodes()), self.replica2.proc.out.text())
    }

    /// Waits for pings both ways on the relay path (status, WireGuard
    /// endpoints); returns how long the first ping took to be answered.
    fn relayed(&self) -> Duration {
        let (a, b, all) = (&self.a, &self.b, self.nodes());
        let (va, vb) = (a.node.ipv4(), b.node.ipv4());
        let took = wait_until(Duration::from_secs(20), "alpha -> beta", || a.node.ping(&vb), || self.logs());
        assert!(b.node.ping(&va), "beta -> alpha\n{}", self.logs());
        let (ka, kb) = (node_key(&a.node), node_key(&b.node));
        wait_logged(&a.node, 0, &format!("path to {kb}: relay"), Duration::from_secs(10), &all);
        wait_logged(&b.node, 0, &format!("path to {ka}: relay"), Duration::from_secs(10), &all);
        for n in all {
            assert_eq!(status_path(n), "relay", "{}'s status path\n{}", n.tun, self.logs());
        }
        let (ea, eb) = (wg_endpoints(&a.node), wg_endpoints(&b.node));
        assert!(ea.contains(&format!("{kb}\t{RELAY_MARKER}")), "alpha's endpoint for beta: {ea:?}");
        assert!(eb.contains(&format!("{ka}\t{RELAY_MARKER}")), "beta's endpoint for alpha: {eb:?}");
        took
    }

    /// No direct path through the random-port NAT was ever taken.
    fn never_direct(&self) {
        let (ka, kb) = (node_key(&self.a.node), node_key(&self.b.node));
        for (n, k) in [(&self.a.node, &kb), (&self.b.node, &ka)] {
            let direct = format!("path to {k}: direct");
            assert!(
                !n.log().contains(&direct),
                "{}: a direct path through the random-port NAT?\n{}",
                n.tun,
                self.logs()
            );
        }
    }
}

#[test]
fn relayed_peers_on_different_replicas_meet_through_each_others_relay() {
    let Some(p) = Pair::start(TEST, 77, |_, url2| url2.to_string()) else { return };
    let (a, b, lab, all) = (&p.a, &p.b, &p.lab, p.nodes());
    let (relay1, relay2) = (&p.relay1, &p.relay2);
    let took = p.relayed();
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    // Each sent its peer's datagrams to the peer's home relay: alpha holds
    // a connection to replica 2's relay, beta one to replica 1's.
    wait_logged(&a.node, 0, &format!("relay: connected to {relay2}"), Duration::from_secs(5), &all);
    wait_logged(&b.node, 0, &format!("relay: connected to {relay1}"), Duration::from_secs(5), &all);

    // Round trips: each relay carries one direction of every exchange.
    const N: u32 = 20;
    let urls = [p.url1.as_str(), p.url2.as_str()];
    let before = urls.map(|u| relay_stats_on(lab, u));
    assert_eq!(pings(&a.node, &vb, N), N, "alpha -> beta, relayed\n{}", p.logs());
    assert_eq!(pings(&b.node, &va, N), N, "beta -> alpha, relayed\n{}", p.logs());
    let after = urls.map(|u| relay_stats_on(lab, u));
    let moved = |i: usize, c: &str| relay_counter(&after[i], c) - relay_counter(&before[i], c);
    let (round1, round2) = (moved(0, "forwarded"), moved(1, "forwarded"));
    for (i, fwd) in [round1, round2].into_iter().enumerate() {
        assert!(
            fwd >= u64::from(2 * N),
            "{} pings both ways, but replica {}'s relay forwarded {fwd} frames\n{}",
            N,
            i + 1,
            p.logs()
        );
        // Every frame found its receiver on the relay it was sent to.
        assert_eq!(moved(i, "no_peer"), 0, "frames for a key not on replica {}'s relay", i + 1);
    }

    // One way at a time: alpha's datagrams for beta cross replica 2's relay
    // only, beta's for alpha replica 1's only (a few disco probes and
    // keepalives aside).
    const ONE_WAY: u32 = 100;
    const STRAY: u64 = 10;
    let (ab1, ab2, ab_arrived) = one_way(lab, urls, &a.node, &b.node, ONE_WAY);
    assert_eq!(ab_arrived, u64::from(ONE_WAY), "alpha's echo requests that reached beta\n{}", p.logs());
    assert!(ab2 >= u64::from(ONE_WAY), "alpha -> beta: replica 2's relay forwarded {ab2} of {ONE_WAY}");
    assert!(ab1 <= STRAY, "alpha -> beta: replica 1's relay forwarded {ab1} frames");
    let (ba1, ba2, ba_arrived) = one_way(lab, urls, &b.node, &a.node, ONE_WAY);
    assert_eq!(ba_arrived, u64::from(ONE_WAY), "beta's echo requests that reached alpha\n{}", p.logs());
    assert!(ba1 >= u64::from(ONE_WAY), "beta -> alpha: replica 1's relay forwarded {ba1} of {ONE_WAY}");
    assert!(ba2 <= STRAY, "beta -> alpha: replica 2's relay forwarded {ba2} frames");

    p.never_direct();
    eprintln!(
        "{TEST}: first ping after {took:?}; {N} pings each way: relay 1 forwarded {round1}, relay 2 {round2} frames; \
         {ONE_WAY} requests alpha -> beta only: relay 1 {ab1}, relay 2 {ab2}; beta -> alpha only: relay 1 {ba1}, \
         relay 2 {ba2}"
    );
}

const FAILOVER: &str = "a_relayed_peer_whose_replica_dies_is_reached_at_its_new_home";

/// Pings alpha sends beta, 100 ms apart, while beta's replica dies.
const FAILOVER_PINGS: u32 = 300;

#[test]
fn a_relayed_peer_whose_replica_dies_is_reached_at_its_new_home() {
    let Some(mut p) = Pair::start(FAILOVER, 79, |url1, url2| format!("{url2},{url1}")) else { return };
    p.relayed();
    let all = p.nodes();
    let (va, vb) = (p.a.node.ipv4(), p.b.node.ipv4());
    wait_logged(&p.a.node, 0, &format!("relay: connected to {}", p.relay2), Duration::from_secs(5), &all);

    // Alpha pings beta all along while replica 2 (beta's control server and
    // home relay) is SIGKILLed: beta moves to replica 1, whose relay becomes
    // its home, and alpha's map must send beta's datagrams there.
    let mut ping =
        p.a.node.ns.spawn(&["ping", "-n", "-D", "-c", &FAILOVER_PINGS.to_string(), "-i", "0.1", "-W", "1", &vb]);
    let ping_out = Output::attach(&mut ping);
    std::thread::sleep(Duration::from_secs(1));
    let from_b = p.b.node.log().len();
    p.replica2.proc.kill9();
    let killed_unix = unix_now();
    let moved = wait_until(
        Duration::from_secs(10),
        "beta streaming from replica 1",
        || {
            let st = p.b.node.status();
            st["connected"] == true && st["control"].as_str() == Some(p.url1.as_str())
        },
        || p.logs(),
    );
    let rehomed = wait_until(
        Duration::from_secs(10),
        "beta's relay client at its new home",
        || p.b.node.log().get(from_b..).is_some_and(|l| l.contains(&format!("relay: connected to {}", p.relay1))),
        || p.logs(),
    );
    // The longest silence between two echo replies (by ping's own
    // timestamps) across the kill, once replies flow again 2 s after it.
    let replies = || -> Vec<(f64, u32)> {
        ping_out.text().lines().filter(|l| l.contains(" bytes from ")).filter_map(ping_reply).collect()
    };
    wait_until(
        Duration::from_secs(25),
        "alpha's pings answered again 2 s after the kill",
        || replies().last().is_some_and(|&(t, _)| t > killed_unix + 2.0),
        || format!("{}\n--- ping ---\n{}", p.logs(), ping_out.text()),
    );
    let got = replies();
    let gap = got.windows(2).map(|w| w[1].0 - w[0].0).fold(0.0, f64::max);
    let lost = got.last().map_or(0, |&(_, seq)| seq as usize - got.len());
    // SAFETY: signalling our own child (ping), which has not been reaped.
    unsafe { libc::kill(ping.id() as i32, libc::SIGINT) };
    let _ = ping.wait();
    eprintln!(
        "{FAILOVER}: replica 2 SIGKILLed: beta streams from replica 1 after {moved:?}, its relay client at replica 1's \
         relay {rehomed:?} later; alpha's pings (100 ms apart): longest silence {gap:.2} s, {lost} of {} lost",
        got.last().map_or(0, |&(_, seq)| seq)
    );
    assert!(gap < 3.0, "alpha's pings to beta went unanswered for {gap:.2} s when its replica died\n{}", p.logs());

    // Then both ways through replica 1's relay, the only one left.
    const N: u32 = 20;
    let before = relay_forwarded_on(&p.lab, &p.url1);
    assert_eq!(pings(&p.a.node, &vb, N), N, "alpha -> beta, relayed\n{}", p.logs());
    assert_eq!(pings(&p.b.node, &va, N), N, "beta -> alpha, relayed\n{}", p.logs());
    let relayed = relay_forwarded_on(&p.lab, &p.url1) - before;
    assert!(relayed >= u64::from(4 * N), "{} pings both ways, but relay 1 forwarded {relayed} frames", 2 * N);
    for n in p.nodes() {
        assert_eq!(status_path(n), "relay", "{}'s status path\n{}", n.tun, p.logs());
    }
    p.never_direct();
}

/// Seconds since the Unix epoch, as `ping -D` prints them.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The `[SECONDS]` timestamp `ping -D` puts before a reply line, and the
/// reply's `icmp_seq`.
fn ping_reply(line: &str) -> Option<(f64, u32)> {
    let (time, rest) = line.strip_prefix('[')?.split_once(']')?;
    let seq = rest.split_whitespace().find_map(|w| w.strip_prefix("icmp_seq="))?;
    Some((time.parse().ok()?, seq.parse().ok()?))
}
