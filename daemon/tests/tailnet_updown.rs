//! `wiremesh up`, `down` and `logout` against real node agents in network
//! namespaces (root only; skipped elsewhere, failing in CI), set up as in
//! `tailnet_mesh.rs`: a control server and three nodes on a bridge.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

use std::time::{Duration, Instant};
use tailnet::*;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn listed_names(lab: &Lab) -> Vec<String> {
    let out = lab.admin(&["nodes", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap().to_string()).collect()
}

fn peer_online(n: &Node, name: &str) -> Option<bool> {
    let st = n.status();
    st["peers"].as_array()?.iter().find(|p| p["node"]["name"] == name).map(|p| p["node"]["online"] == true)
}

#[test]
fn tailnet_down_up_and_logout_through_the_cli() {
    if !netns::require_or_skip("tailnet_down_up_and_logout_through_the_cli") {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let mut nodes: Vec<Node> = ["alpha", "beta", "gamma"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    let (alpha, beta, gamma) = (&nodes[0], &nodes[1], &nodes[2]);
    let alpha4 = alpha.ipv4();
    let alpha_key = alpha.status()["self"]["node_key"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(10), "beta -> alpha", || beta.ping(&alpha4), || logs(&all));

    // down: alpha drops every peer and its stream; the others keep it in
    // their maps (offline) but cannot reach it.
    let out = alpha.cli(&["down"]);
    assert!(out.status.success() && text(&out).starts_with("down:"), "{}", text(&out));
    let st = alpha.status();
    assert_eq!(st["state"], "down", "{st}");
    assert_eq!(st["connected"], false);
    assert!(alpha.wg_peers().is_empty(), "{:?}", alpha.wg_peers());
    wait_until(Duration::from_secs(5), "alpha offline", || peer_online(beta, "alpha") == Some(false), || logs(&all));
    assert!(!beta.ping(&alpha4), "alpha answered while down\n{}", logs(&all));
    assert!(beta.ping(&gamma.ipv4()), "the rest of the mesh is undisturbed");
    let human = text(&alpha.cli(&["status"]));
    assert!(human.contains("control down"), "{human}");

    // up: the same node (same key, no auth key needed) is back.
    let out = alpha.cli(&["up"]);
    assert!(out.status.success() && text(&out).contains("up: connected as alpha.wiremesh.internal"), "{}", text(&out));
    assert_eq!(alpha.status()["state"], "up");
    assert_eq!(alpha.status()["self"]["node_key"], alpha_key.as_str());
    wait_until(Duration::from_secs(10), "beta -> alpha after up", || beta.ping(&alpha4), || logs(&all));
    assert!(alpha.ping(&gamma.ipv4()));
    assert_eq!(peer_online(gamma, "alpha"), Some(true));

    // logout: the server removes alpha; it leaves the others' maps and
    // `wg show`, and the admin's list.
    let out = alpha.cli(&["logout"]);
    assert!(out.status.success() && text(&out).starts_with("logged out"), "{}", text(&out));
    let t0 = Instant::now();
    for n in [beta, gamma] {
        wait_until(
            Duration::from_secs(2),
            "alpha gone from wg show",
            || !n.wg_peers().contains(&alpha_key),
            || logs(&all),
        );
        wait_until(Duration::from_secs(2), "alpha gone from the map", || peer_count(n) == 1, || logs(&all));
    }
    eprintln!("logged-out node gone from the peers' wg show and maps after {:?}", t0.elapsed());
    assert_eq!(listed_names(&lab), ["beta", "gamma"]);
    let st = alpha.status();
    assert_eq!(st["state"], "logged_out", "{st}");
    assert!(st["self"].is_null() && alpha.wg_peers().is_empty(), "{st}");
    assert!(!beta.ping(&alpha4));

    // Joining again needs an auth key; a bad one is refused and the agent
    // runs on, still logged out.
    let out = alpha.cli(&["up"]);
    assert!(!out.status.success() && text(&out).contains("auth key"), "{}", text(&out));
    let out =
        alpha.cli(&["up", "--auth-key", "wmkey-0000000000000000000000000000000000000000000000000000000000000000"]);
    assert!(!out.status.success() && text(&out).contains("registration refused"), "{}", text(&out));
    assert_eq!(alpha.status()["state"], "logged_out");
    assert!(listed_names(&lab).len() == 2);

    // With a good key it joins as a new node with a new node key.
    let out = alpha.cli(&["up", "--auth-key", &key]);
    assert!(out.status.success() && text(&out).contains("up: connected as alpha"), "{}", text(&out));
    let new_key = alpha.status()["self"]["node_key"].as_str().unwrap().to_string();
    assert_ne!(new_key, alpha_key, "the node key is replaced at logout");
    for n in [beta, gamma] {
        wait_until(Duration::from_secs(5), "alpha back in the map", || peer_count(n) == 2, || logs(&all));
    }
    let alpha4 = alpha.ipv4();
    wait_until(Duration::from_secs(10), "beta -> new alpha", || beta.ping(&alpha4), || logs(&all));
    assert!(listed_names(&lab).contains(&"alpha".to_string()));

    // down survives a restart of the agent; up after it reconnects.
    let out = alpha.cli(&["down"]);
    assert!(out.status.success(), "{}", text(&out));
    let alpha = &mut nodes[0];
    drop(alpha.proc.take());
    lab.start_agent(alpha, "alpha", &key);
    wait_until(Duration::from_secs(10), "restarted agent", || alpha.status()["state"] == "down", || alpha.log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(alpha.wg_peers().is_empty() && alpha.status()["connected"] == false, "{}", alpha.log());
    let out = alpha.cli(&["up"]);
    assert!(out.status.success() && text(&out).contains("up: connected as alpha"), "{}", text(&out));
    wait_until(Duration::from_secs(10), "alpha's peers back", || alpha.wg_peers().len() == 2, || alpha.log());
    drop(lab.server.take());
}
