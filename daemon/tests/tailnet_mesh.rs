//! A whole tailnet in network namespaces (root only; skipped elsewhere,
//! failing in CI): a control server and nodes, each in its own namespace,
//! joined by a bridge in a "hub" namespace. The nodes are real `wiremeshd
//! node` processes with TUN devices; the checks use `ping`, `wg show` and
//! the `wiremesh` CLI.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

use std::time::{Duration, Instant};
use tailnet::*;

#[test]
fn tailnet_three_nodes_reach_each_other_and_lose_a_removed_node() {
    if !netns::require_or_skip("tailnet_three_nodes_reach_each_other_and_lose_a_removed_node") {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let nodes: Vec<Node> = ["alpha", "beta", "gamma"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    // Everyone reaches everyone by tailnet address, IPv4 and IPv6.
    for a in &nodes {
        for b in &nodes {
            if a.tun == b.tun {
                continue;
            }
            let (v4, v6) = (b.ipv4(), b.ipv6());
            wait_until(Duration::from_secs(10), &format!("{} -> {v4}", a.tun), || a.ping(&v4), || logs(&all));
            assert!(a.ping(&v6), "{} -> {v6}\n{}", a.tun, logs(&all));
        }
    }
    // By name, through the CLI.
    let out = nodes[0].cli(&["ping", "-c", "1", "beta"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pinging beta.wiremesh.internal") && text.contains(" via "), "{text}");
    let out = nodes[0].cli(&["ping", "-c", "1", "gamma.wiremesh.internal"]);
    assert!(out.status.success());
    // Status shows handshakes and traffic; whois names the owner.
    let st = nodes[0].status();
    let beta = st["peers"].as_array().unwrap().iter().find(|p| p["node"]["name"] == "beta").unwrap().clone();
    assert!(beta["last_handshake"].as_u64().unwrap() > 0, "{st}");
    assert!(beta["rx_bytes"].as_u64().unwrap() > 0 && beta["tx_bytes"].as_u64().unwrap() > 0);
    assert_eq!(beta["node"]["online"], true);
    assert!(beta["endpoint"].as_str().unwrap().starts_with(&lab.subnet.v4(11)));
    let human = String::from_utf8_lossy(&nodes[0].cli(&["status"]).stdout).into_owned();
    assert!(human.contains("beta.wiremesh.internal") && human.contains("online"), "{human}");
    let out = nodes[1].cli(&["whois", &nodes[2].ipv4()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("gamma.wiremesh.internal") && text.contains("owner admin"),
        "{text}"
    );

    // A one-off key cannot register twice.
    let once = lab.new_key(false);
    let mut delta = lab.spawn_node("delta", &once);
    wait_until(Duration::from_secs(20), "delta registered", || peer_count(&delta) == 3, || delta.log());
    let mut epsilon = lab.spawn_node("epsilon", &once);
    let out = epsilon.proc.as_ref().unwrap().out.clone();
    let exited = wait_until(
        Duration::from_secs(20),
        "a spent key to be refused",
        || matches!(epsilon.proc.as_mut().unwrap().child.try_wait(), Ok(Some(_))),
        || out.text(),
    );
    let status = epsilon.proc.as_mut().unwrap().child.wait().unwrap();
    assert!(!status.success());
    assert!(epsilon.log().contains("key_spent"), "{}", epsilon.log());
    eprintln!("spent key refused after {exited:?}");
    let listed = String::from_utf8_lossy(&lab.admin(&["nodes", "list", "--json"]).stdout).into_owned();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4, "the refused node was not stored: {listed}");

    // The admin removes delta: the others drop it from `wg show` quickly,
    // and delta's agent stops.
    let delta_key = delta.status()["self"]["node_key"].as_str().unwrap().to_string();
    for n in &nodes {
        wait_until(Duration::from_secs(10), "delta in wg show", || n.wg_peers().contains(&delta_key), || n.log());
    }
    let out = lab.admin(&["nodes", "remove", "delta"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t0 = Instant::now();
    for n in &nodes {
        wait_until(
            Duration::from_secs(2),
            "delta gone from wg show",
            || !n.wg_peers().contains(&delta_key),
            || n.log(),
        );
    }
    eprintln!("removed node gone from every wg show after {:?}", t0.elapsed());
    let out = delta.proc.as_ref().unwrap().out.clone();
    wait_until(
        Duration::from_secs(5),
        "delta's agent to stop",
        || matches!(delta.proc.as_mut().unwrap().child.try_wait(), Ok(Some(_))),
        || out.text(),
    );
    assert!(delta.log().contains("node_removed"), "{}", delta.log());
    // The agents speak map-stream version 2 and kept one stream open
    // throughout, so delta's registration and removal reached their
    // `wg show` as deltas (a version 2 stream sends one full map only).
    for n in &nodes {
        let log = n.log();
        assert_eq!(log.matches("map stream open (version 2)").count(), 1, "{log}");
        assert_eq!(log.matches("map stream open").count(), 1, "{log}");
        assert!(log.contains(": 3 peers (1 added, 0 changed, 0 removed)"), "{log}");
        assert!(log.contains(": 2 peers (0 added, 0 changed, 1 removed)"), "{log}");
        for l in log.lines().filter(|l| l.contains(" peers (")).skip(1) {
            assert!(l.starts_with("delta "), "after the first map only deltas: {l}\n{log}");
        }
    }
    // The rest of the mesh is undisturbed.
    assert!(nodes[0].ping(&nodes[1].ipv4()));
    drop(lab.server.take());
}

#[test]
fn tailnet_keeps_flowing_through_a_control_sigkill_and_resumes_after_restart() {
    if !netns::require_or_skip("tailnet_keeps_flowing_through_a_control_sigkill_and_resumes_after_restart") {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let mut nodes: Vec<Node> = ["one", "two"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    // "three" asks for map-stream version 1 (full maps on every change), as
    // an agent facing a server without deltas would get.
    let mut three = lab.new_node("three");
    lab.start_agent_with(&mut three, "three", &key, &["--map-version", "1"]);
    nodes.push(three);
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    let ips: Vec<String> = nodes.iter().map(Node::ipv4).collect();
    wait_until(Duration::from_secs(10), "one -> two", || nodes[0].ping(&ips[1]), || logs(&all));
    // The control server's embedded relay dies with it: what keeps flowing
    // is what runs on direct paths, so every pair must have found one (a
    // pair starts on the relay and moves direct once probes answer).
    let all_direct = |n: &Node| {
        let status = n.status();
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        peers.len() == 2 && peers.iter().all(|p| p["path"].as_str().is_some_and(|s| s.starts_with("direct")))
    };
    wait_until(Duration::from_secs(20), "direct paths", || nodes.iter().all(all_direct), || logs(&all));

    lab.server.as_mut().unwrap().kill9();
    // Traffic keeps flowing without the control server, for longer than
    // the agents' first reconnection attempts.
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        for (i, a) in nodes.iter().enumerate() {
            let b = &ips[(i + 1) % 3];
            assert!(a.ping(b), "{} -> {b} with the control server down\n{}", a.tun, logs(&all));
            pings += 1;
        }
    }
    for n in &nodes {
        assert_eq!(n.status()["connected"], false);
        assert_eq!(peer_count(n), 2, "the last map is kept");
    }
    eprintln!("{pings} pings answered while the control server was down");

    lab.start_server();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "reconnection", || n.status()["connected"] == true, || logs(&all));
    }
    // A node registered after the restart reaches and is reached by the others.
    let four = lab.spawn_node("four", &key);
    for n in &nodes {
        wait_until(Duration::from_secs(10), "four in the maps", || peer_count(n) == 3, || logs(&all));
    }
    wait_until(Duration::from_secs(20), "four's map", || peer_count(&four) == 3, || four.log());
    let four_ip = four.ipv4();
    wait_until(Duration::from_secs(10), "one -> four", || nodes[0].ping(&four_ip), || logs(&[&nodes[0], &four]));
    assert!(four.ping(&ips[2]), "four -> three\n{}", four.log());
    // Addresses are stable across the crash.
    let again: Vec<String> = nodes.iter().map(Node::ipv4).collect();
    assert_eq!(again, ips);
    // The version 1 node followed every change with full maps, the others
    // with deltas after their first map.
    let log = nodes[2].log();
    assert!(log.contains("map stream open (version 1)") && !log.contains("version 2"), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("delta ")), "{log}");
    assert!(
        log.lines().any(|l| l.starts_with("map ") && l.contains(": 3 peers (1 added")),
        "four by a full map: {log}"
    );
    assert!(nodes[0].log().lines().any(|l| l.starts_with("delta ") && l.contains(" peers (1 added")));
    drop(lab.server.take());
}
