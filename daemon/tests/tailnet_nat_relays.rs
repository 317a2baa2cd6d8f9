//! Two more relayed cases through nftables NATs in namespaces (root only;
//! skipped elsewhere, failing in CI), beside `tailnet_nat.rs`:
//!
//! * a **standalone relay** (`wiremeshd relay`, its own namespace on the
//!   bridge) named by the control server's `--relay-url` with `--relay off`:
//!   it is both nodes' home relay and their STUN server, and it alone
//!   carries a pair that no direct path joins (a random-port NAT facing a
//!   port-restricted cone). It has no admin API; its `--stats-interval`
//!   lines give its counters.
//! * a **userspace node** (`--userspace`: no TUN, SOCKS5 and HTTP proxies)
//!   behind a random-port NAT fetching a page from a TUN node behind a cone
//!   through its proxies: relayed first (the embedded relay's counter
//!   grows), then, the block lifted, direct.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

#[path = "support/nat.rs"]
mod nat;

use nat::*;
use netns::Netns;
use std::time::{Duration, Instant};
use tailnet::*;

#[test]
fn a_standalone_relay_carries_a_pair_no_direct_path_joins() {
    const TEST: &str = "a_standalone_relay_carries_a_pair_no_direct_path_joins";
    if !have_tools(TEST, &["nft", "conntrack"]) {
        return;
    }
    let mut lab = Lab::unstarted();
    let relay = StandaloneRelay::start(&mut lab, 3340);
    assert!(relay.url.starts_with(&format!("relay://{}#sha256=", relay.addr)), "relay URL {:?}", relay.url);
    lab.start_server_with(&["--relay", "off", "--relay-url", &relay.url]);
    // The control server runs no relay of its own.
    let admin = ["--control", lab.url.as_str(), "--admin-token", lab.token.as_str()];
    let out = lab.server_ns.exec(&[&[WIREMESH, "relay", "stats", "--json"][..], &admin[..]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no_relay"), "wiremesh relay stats with --relay off: {err}");

    let key = lab.new_key(true);
    let a = natted(&mut lab, "alpha", &key, 81, Nat::RandomPorts);
    let b = natted(&mut lab, "beta", &key, 82, Nat::PortRestrictedCone);
    let all = [&a.node, &b.node];
    let connected = format!("relay: connected to {}", relay.addr);
    for n in all {
        wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || logs(&all));
        wait_logged(n, 0, &connected, Duration::from_secs(20), &all);
    }
    // The standalone relay is their STUN server too: each learns its NAT's
    // address from it.
    for n in [&a, &b] {
        let want = format!("reflexive address {}:", n.public_ip);
        wait_logged(&n.node, 0, &want, Duration::from_secs(20), &all);
    }
    // Alpha's WireGuard socket has been to the relay's STUN and (probing)
    // to beta's NAT: its router must have mapped the two to different
    // public ports, or this is not the NAT the test means.
    let port = wg_listen_port(&a.node);
    let stun = relay.addr.clone();
    let peer = format!("{}:", b.public_ip);
    let mut maps = Vec::new();
    wait_until(
        Duration::from_secs(10),
        "alpha's router mapping its WireGuard socket towards the relay's STUN and towards beta",
        || {
            maps = a.udp_mappings(port);
            maps.iter().any(|(d, _)| *d == stun) && maps.iter().any(|(d, _)| d.starts_with(&peer))
        },
        || logs(&all),
    );
    let ports: std::collections::BTreeSet<u16> = maps.iter().map(|&(_, p)| p).collect();
    assert_eq!(ports.len(), maps.len(), "masquerade random reused a public port: {maps:?}");
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let (took, ka, kb, _, _) = wait_relayed(&a, &b);

    // Each echo request and each reply crosses the standalone relay once.
    const N: u32 = 20;
    let before = relay.next_stats();
    assert_eq!(before["clients"], 2, "both nodes connected to the standalone relay: {before:?}");
    assert!(before["stun_answered"] >= 2, "the standalone relay answered no STUN: {before:?}");
    assert_eq!(pings(&a.node, &vb, N), N, "alpha -> beta, relayed\n{}", logs(&all));
    assert_eq!(pings(&b.node, &va, N), N, "beta -> alpha, relayed\n{}", logs(&all));
    let after = relay.next_stats();
    let relayed = after["forwarded"] - before["forwarded"];
    assert!(
        relayed >= u64::from(4 * N),
        "{} pings both ways, but the standalone relay forwarded {relayed} frames: {before:?} -> {after:?}",
        2 * N
    );
    for counter in ["auth_failed", "malformed", "rate_limited", "queue_full"] {
        assert_eq!(after[counter], 0, "{counter}: {after:?}");
    }
    // No direct path was found through the random-port NAT.
    for (n, k) in [(&a.node, &kb), (&b.node, &ka)] {
        let direct = format!("path to {k}: direct");
        assert!(!n.log().contains(&direct), "{}: a direct path through the random-port NAT?\n{}", n.tun, logs(&all));
    }
    eprintln!(
        "{TEST}: first ping after {took:?}; the standalone relay at {} forwarded {relayed} frames ({} bytes) for {} \
         pings; its counters now {after:?}; alpha's WireGuard port {port} maps to {maps:?}",
        relay.addr,
        after["forwarded_bytes"] - before["forwarded_bytes"],
        2 * N
    );
    drop(lab.server.take());
}

/// Fetches `url` in `ns` through the SOCKS5 proxy at `socks` and returns
/// the body's length and curl's download speed in Mbit/s.
fn download(ns: &Netns, socks: &str, url: &str, all: &[&Node]) -> (usize, f64) {
    let (ok, out, err) = curl(ns, &["--socks5-hostname", socks, "-w", "\n%{speed_download}", url]);
    assert!(ok, "{url}: {err}\n{}", logs(all));
    let (body, speed) = out.rsplit_once('\n').unwrap_or_else(|| panic!("{url}: no speed in curl's output"));
    let bytes_per_sec: f64 = speed.trim().parse().unwrap_or_else(|_| panic!("{url}: speed {speed:?}"));
    (body.len(), bytes_per_sec * 8.0 / 1e6)
}

/// The path beta's status shows for alpha and alpha's for beta.
fn paths(a: &Natted, b: &Natted) -> String {
    format!("alpha's path {:?}, beta's path {:?}", status_path(&a.node), status_path(&b.node))
}

#[test]
fn a_userspace_node_behind_a_nat_reaches_a_peer_through_the_relay() {
    const TEST: &str = "a_userspace_node_behind_a_nat_reaches_a_peer_through_the_relay";
    if !have_tools(TEST, &["nft", "conntrack", "curl"]) {
        return;
    }
    const SOCKS: &str = "127.0.0.1:1055";
    const HTTP_PROXY: &str = "http://127.0.0.1:8080";
    const FILLER: usize = 32 * 1024;
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let control = lab.url.clone();
    let a = natted_with(
        &mut lab,
        &control,
        "alpha",
        &key,
        83,
        Nat::RandomPorts,
        &["--userspace", "--socks5", SOCKS, "--http-proxy", "127.0.0.1:8080"],
    );
    let b = natted(&mut lab, "beta", &key, 84, Nat::PortRestrictedCone);
    let all = [&a.node, &b.node];
    for n in all {
        wait_until(Duration::from_secs(20), "the peer in the map", || peer_count(n) == 1, || logs(&all));
        wait_logged(n, 0, "relay: connected to ", Duration::from_secs(20), &all);
    }
    // Alpha runs on the netstack: no TUN device in its namespace.
    let links = a.node.ns.run_ok(&["ip", "-o", "link"]);
    assert!(!links.contains(&a.node.tun), "a TUN device on the userspace node: {links}");
    // The netstack asks STUN too, through its NAT.
    for n in [&a, &b] {
        let want = format!("reflexive address {}:", n.public_ip);
        wait_logged(&n.node, 0, &want, Duration::from_secs(20), &all);
    }
    let (ka, kb) = (node_key(&a.node), node_key(&b.node));
    let (va, vb) = (a.node.ipv4(), b.node.ipv4());
    let _web = WebServer::start(&b.node.ns, &format!("{vb}:8000"), "hello from beta", FILLER);

    // Relayed: beta pings alpha's netstack, alpha fetches from beta.
    let took = wait_until(Duration::from_secs(20), "beta -> alpha", || b.node.ping(&va), || logs(&all));
    wait_logged(&a.node, 0, &format!("path to {kb}: relay"), Duration::from_secs(10), &all);
    wait_logged(&b.node, 0, &format!("path to {ka}: relay"), Duration::from_secs(10), &all);
    assert_eq!(status_path(&a.node), "relay", "{}\n{}", paths(&a, &b), logs(&all));
    assert_eq!(status_path(&b.node), "relay", "{}\n{}", paths(&a, &b), logs(&all));
    let before = relay_forwarded(&lab);
    let url = format!("http://{vb}:8000/relayed");
    let (ok, body, err) = curl(&a.node.ns, &["--socks5-hostname", SOCKS, &url]);
    assert!(ok, "{url} through SOCKS5, relayed: {err}\n{}", logs(&all));
    assert!(
        body.starts_with("hello from beta /relayed\n") && body.len() > FILLER,
        "{} bytes: {:?}",
        body.len(),
        &body[..body.len().min(80)]
    );
    let (ok, body, err) = curl(&a.node.ns, &["--proxy", HTTP_PROXY, &format!("http://{vb}:8000/relayed-http")]);
    assert!(
        ok && body.starts_with("hello from beta /relayed-http\n"),
        "through the HTTP proxy, relayed: {err}\n{}",
        logs(&all)
    );
    let relayed = relay_forwarded(&lab) - before;
    // Two responses of 32 KiB each are more than 40 packets of 1280 bytes
    // (the tunnel's MTU or below), besides handshakes and ACKs.
    assert!(relayed >= 40, "two 32 KiB fetches, but the relay forwarded {relayed} frames\n{}", logs(&all));
    assert_eq!(status_path(&a.node), "relay", "{}", paths(&a, &b));
    // Throughput through the relay, for the figure: 4 MiB in one fetch.
    const BIG: usize = 4 << 20;
    let big = format!("http://{vb}:8000/big?bytes={BIG}");
    let (len, relayed_mbits) = download(&a.node.ns, SOCKS, &big, &all);
    assert!(len > BIG, "{len} bytes of a {BIG}-byte body, relayed");
    assert_eq!(status_path(&a.node), "relay", "{}", paths(&a, &b));
    for (n, k) in [(&a.node, &kb), (&b.node, &ka)] {
        let direct = format!("path to {k}: direct");
        assert!(!n.log().contains(&direct), "{}: a direct path through the random-port NAT?\n{}", n.tun, logs(&all));
    }

    // The block lifted: alpha's router keeps ports now. The netstack's
    // STUN sees the new mapping, and the pair probes its way to direct.
    let (from_a, from_b) = (a.node.log().len(), b.node.log().len());
    a.set_nat(Nat::PortRestrictedCone);
    let changed = Instant::now();
    // When each of alpha's and beta's log lines since the change appeared.
    let mut timeline: Vec<(Duration, &str, String)> = Vec::new();
    let (mut seen_a, mut seen_b) = (from_a, from_b);
    let direct_a = format!("path to {kb}: direct {}:", b.public_ip);
    let direct_b = format!("path to {ka}: direct {}:", a.public_ip);
    wait_until(
        Duration::from_secs(30),
        "both sides on the direct path after the NAT change",
        || {
            let t = changed.elapsed();
            for (who, log, seen) in [("alpha", a.node.log(), &mut seen_a), ("beta", b.node.log(), &mut seen_b)] {
                let new = log.get(*seen..).unwrap_or("");
                timeline.extend(new.lines().filter(|l| !l.is_empty()).map(|l| (t, who, l.to_string())));
                *seen = log.len();
            }
            let (la, lb) = (a.node.log(), b.node.log());
            la.get(from_a..).is_some_and(|l| l.contains(&direct_a))
                && lb.get(from_b..).is_some_and(|l| l.contains(&direct_b))
        },
        || logs(&all),
    );
    let switched = changed.elapsed();
    let timeline: Vec<String> =
        timeline.iter().map(|(t, who, l)| format!("{:.1}s {who}: {l}", t.as_secs_f64())).collect();
    let (pa, pb) = (status_path(&a.node), status_path(&b.node));
    assert!(pa.starts_with(&format!("direct {}:", b.public_ip)), "alpha's status path: {pa:?}\n{}", logs(&all));
    assert!(pb.starts_with(&format!("direct {}:", a.public_ip)), "beta's status path: {pb:?}\n{}", logs(&all));
    // A second fetch, direct: the relay's counter stays (almost) flat.
    let before = relay_forwarded(&lab);
    let url = format!("http://{vb}:8000/direct");
    let (ok, body, err) = curl(&a.node.ns, &["--socks5-hostname", SOCKS, &url]);
    assert!(ok, "{url} through SOCKS5, direct: {err}\n{}", logs(&all));
    assert!(body.starts_with("hello from beta /direct\n") && body.len() > FILLER, "{} bytes", body.len());
    let through_relay = relay_forwarded(&lab) - before;
    assert!(
        through_relay <= 4,
        "the relay forwarded {through_relay} frames during a direct 32 KiB fetch\n{}",
        logs(&all)
    );
    assert!(b.node.ping(&va), "beta -> alpha, direct\n{}", logs(&all));
    let before = relay_forwarded(&lab);
    let (len, direct_mbits) = download(&a.node.ns, SOCKS, &big, &all);
    assert!(len > BIG, "{len} bytes of a {BIG}-byte body, direct");
    let big_through_relay = relay_forwarded(&lab) - before;
    assert!(big_through_relay <= 4, "the relay forwarded {big_through_relay} frames during a direct 4 MiB fetch");
    eprintln!(
        "{TEST}: first ping after {took:?}; two relayed 32 KiB fetches took {relayed} relay frames; direct {switched:?} \
         after the NAT change ({pa} / {pb}); the direct fetch took {through_relay} relay frames; after the change:\n  {}",
        timeline.join("\n  ")
    );
    eprintln!(
        "{TEST}: throughput of the userspace node through its SOCKS5 proxy (one 4 MiB HTTP fetch, curl's average): \
         relayed {relayed_mbits:.0} Mbit/s, direct {direct_mbits:.0} Mbit/s"
    );
    drop(lab.server.take());
}
