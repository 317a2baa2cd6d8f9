//! The tailnet policy end to end: the admin API against a real `wiremeshd
//! control` on loopback (no root needed), and in network namespaces (root
//! only; skipped elsewhere, failing in CI) a control server and three node
//! agents with TUN devices, the policy set with the CLI and checked with
//! real TCP connections (iperf3) and pings between the namespaces.

#[path = "../../testsupport/netns.rs"]
mod netns;

#[path = "support/tailnet.rs"]
mod tailnet;

#[path = "support/control.rs"]
mod control_server;

use std::process::Child;
use std::time::{Duration, Instant};
use tailnet::*;

/// An iperf3 server in a node's namespace, stopped when dropped.
struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listen(n: &Node, port: u16) -> Listener {
    // Its output goes nowhere: a piped one would fill up and block it.
    Listener(n.ns.spawn(&["sh", "-c", &format!("exec iperf3 -s -p {port} >/dev/null 2>&1")]))
}

/// Whether a TCP connection from `from` to `ip:port` carries a short
/// transfer both ways (the SYN in, the SYN-ACK and the results back).
fn tcp_works(from: &Node, ip: &str, port: u16) -> bool {
    let out = from.ns.exec_timeout(
        &["iperf3", "-c", ip, "-p", &port.to_string(), "-n", "64K", "--connect-timeout", "1500"],
        Duration::from_secs(15),
    );
    out.status.success()
}

fn set_policy(lab: &Lab, name: &str, text: &str) -> std::process::Output {
    let file = lab.server_state.with_file_name(format!("{name}.hujson"));
    std::fs::write(&file, text).unwrap();
    let out = lab.admin(&["policy", "set", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    out
}

fn peer_names(n: &Node) -> Vec<String> {
    let st = n.status();
    let mut v: Vec<String> = st["peers"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["node"]["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn tailnet_policy_allows_only_what_it_says_and_changes_live() {
    if !netns::require_or_skip("tailnet_policy_allows_only_what_it_says_and_changes_live") {
        return;
    }
    if !netns::have_command("iperf3") {
        // Skips outside CI, fails in CI.
        netns::skip_or_fail("tailnet_policy_allows_only_what_it_says_and_changes_live", "iperf3 is not installed");
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let nodes: Vec<Node> = ["alpha", "beta", "gamma"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    let (alpha, beta, gamma) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    let (a, b, c) = (alpha.ipv4(), beta.ipv4(), gamma.ipv4());
    // No policy: everything goes.
    wait_until(Duration::from_secs(10), "gamma -> alpha without a policy", || gamma.ping(&a), || logs(&all));
    let _servers = [listen(alpha, 22), listen(beta, 22), listen(beta, 80), listen(alpha, 80)];
    std::thread::sleep(Duration::from_millis(300));
    assert!(tcp_works(beta, &a, 22), "no policy: beta -> alpha:22\n{}", logs(&all));

    // alpha may reach beta's tcp/22, nothing else is allowed.
    let p1 = format!(
        r#"// alpha administers beta over ssh; nothing else.
{{
  "hosts": {{"alpha": "{a}", "beta": "{b}", "gamma": "{c}"}},
  "acls": [
    {{"action": "accept", "src": ["alpha"], "dst": ["beta:22"], "proto": "tcp"}},
  ],
  "tests": [
    {{"src": "{a}", "accept": ["beta:22"], "deny": ["beta:80"]}},
    {{"src": "{b}", "deny": ["alpha:22"]}},
  ],
}}"#
    );
    let out = set_policy(&lab, "p1", &p1);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "maps under the first policy",
        || peer_names(gamma).is_empty() && peer_names(alpha) == ["beta"] && peer_names(beta) == ["alpha"],
        || logs(&all),
    );
    eprintln!("first policy in every map after {:?}", t0.elapsed());
    assert!(gamma.wg_peers().is_empty(), "gamma sees no one in the data plane either");
    assert!(tcp_works(alpha, &b, 22), "alpha -> beta:22 and its replies\n{}", logs(&all));
    assert!(!tcp_works(alpha, &b, 80), "alpha -> beta:80 is denied");
    assert!(!tcp_works(beta, &a, 22), "beta may not open connections to alpha");
    assert!(!alpha.ping(&b), "no ICMP allowed");
    assert!(tcp_works(alpha, &b, 22), "still allowed after the denials");
    // Beta's data plane counted what its filter refused, from alpha, and
    // `wiremesh status` shows it.
    let st = beta.status();
    let from_alpha = st["peers"].as_array().unwrap().iter().find(|p| p["node"]["name"] == "alpha").unwrap();
    let filtered = from_alpha["drops"]["filtered"].as_u64().unwrap_or(0);
    assert!(filtered >= 2, "beta's filter drops from alpha (tcp/80 SYNs, ICMP): {st}");
    assert!(st["drops"]["filtered"].as_u64().unwrap_or(0) >= filtered, "{st}");
    let text = String::from_utf8_lossy(&beta.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("dropped: ") && text.contains("filtered "), "{text}");

    // The reverse, and gamma to alpha's tcp/80: the change reaches the nodes
    // within a second, with nothing restarted.
    let p2 = format!(
        r#"{{
  "hosts": {{"alpha": "{a}", "beta": "{b}", "gamma": "{c}"}},
  "acls": [
    {{"action": "accept", "src": ["beta"], "dst": ["alpha:22"], "proto": "tcp"}},
    {{"action": "accept", "src": ["gamma"], "dst": ["alpha:80"], "proto": "tcp"}},
  ],
}}"#
    );
    let out = set_policy(&lab, "p2", &p2);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t0 = Instant::now();
    let took = wait_until(
        Duration::from_secs(5),
        "maps under the second policy",
        || peer_names(alpha) == ["beta", "gamma"] && peer_names(gamma) == ["alpha"],
        || logs(&all),
    );
    // wait_until's 5 s bound is the check (pushed, not polled); the figure
    // is printed, not asserted, on a shared machine.
    eprintln!("second policy in the maps after {:?} (seen at {took:?})", t0.elapsed());
    assert!(tcp_works(beta, &a, 22), "beta -> alpha:22 now\n{}", logs(&all));
    assert!(!tcp_works(alpha, &b, 22), "alpha -> beta:22 no more");
    assert!(tcp_works(gamma, &a, 80), "gamma -> alpha:80\n{}", logs(&all));
    assert!(!tcp_works(gamma, &a, 22), "gamma -> alpha:22 is denied");

    // A policy whose test fails is refused and changes nothing.
    let bad = p1.replace(r#""deny": ["beta:80"]"#, r#""deny": ["beta:22"]"#);
    let out = set_policy(&lab, "bad", &bad);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("test at line") && err.contains("policy_test_failed"), "{err}");
    let out = set_policy(&lab, "broken", "{\"acls\": [\n  {\"action\": \"accept\",, }]}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("line 2, column 23"), "{err}");
    let got = lab.admin(&["policy", "get"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim_end(), p2.trim_end());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(peer_names(alpha), ["beta", "gamma"]);
    assert!(tcp_works(beta, &a, 22), "the refused policy changed nothing\n{}", logs(&all));
    assert!(!tcp_works(alpha, &b, 22));
}

/// `PUT /api/v1/admin/policy` with a raw body: status and answer.
fn put(server: &control_server::Server, body: Vec<u8>, token: Option<&str>) -> (u16, serde_json::Value) {
    use wiremesh_daemon::control::{client::Client, proto};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let c = Client::new(server.url.clone());
    let (status, answer) = rt
        .block_on(c.raw(hyper::Method::PUT, &format!("{}/admin/policy", proto::API), body, token))
        .expect("the server answers");
    (status, serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null))
}

fn get(server: &control_server::Server, method: hyper::Method) -> (u16, serde_json::Value) {
    use wiremesh_daemon::control::{client::Client, proto};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let c = Client::new(server.url.clone());
    let (status, answer) = rt
        .block_on(c.raw(method, &format!("{}/admin/policy", proto::API), Vec::new(), server.token.as_deref()))
        .expect("the server answers");
    (status, serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null))
}

#[test]
fn policy_api_sets_atomically_and_refuses_bad_files_with_their_place() {
    let state = control_server::state_dir("policy-api");
    let server = control_server::start(&state);
    let token = server.token.clone().expect("a fresh server prints its token");
    let (status, body) = get(&server, hyper::Method::GET);
    assert_eq!((status, &body), (200, &serde_json::json!({"policy": null, "version": 0})));
    let good = "// ok\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"a@\"], \"dst\": [\"b@:22\"]},],\n \"tests\": [{\"src\": \"a@\", \"accept\": [\"b@:22\"]}]}";
    let (status, body) = put(&server, good.into(), Some(&token));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    let refused: &[(&str, u16, &str, &str)] = &[
        ("{\"acls\": [\n  {\"action\": \"accept\",, }]}", 400, "policy_syntax", "line 2, column 23"),
        ("{\n\"ssh\": []}", 400, "policy_unsupported", "line 2, column 1: section \"ssh\" is not supported"),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"group:x\"], \"dst\": [\"*:*\"]}]}",
            400,
            "policy_invalid",
            "group \"x\" is not defined",
        ),
        (
            "{\"acls\": [],\n \"tests\": [{\"src\": \"a@\", \"accept\": [\"b@:22\"]}]}",
            400,
            "policy_test_failed",
            "test at line 2 failed",
        ),
    ];
    for (text, status, code, what) in refused {
        let (s, body) = put(&server, text.as_bytes().to_vec(), Some(&token));
        assert_eq!((s, body["code"].as_str()), (*status, Some(*code)), "{text}: {body}");
        assert!(body["error"].as_str().unwrap().contains(what), "{text}: {body}");
    }
    assert_eq!(put(&server, good.into(), None).0, 401);
    assert_eq!(put(&server, good.into(), Some("wrong")).0, 401);
    assert_eq!(put(&server, vec![0xff, 0xfe, b'{', b'}'], Some(&token)).0, 400);
    let big = format!("{{\"acls\": []}}{}", " ".repeat(wiremesh_daemon::policy::MAX_POLICY_BYTES));
    assert_eq!(put(&server, big.into_bytes(), Some(&token)).0, 413);
    assert_eq!(get(&server, hyper::Method::POST).0, 405);
    // Nothing refused changed anything.
    let (status, body) = get(&server, hyper::Method::GET);
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"policy": good, "version": 1}));
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}
