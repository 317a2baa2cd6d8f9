//! A whole tailnet in network namespaces (root only; skipped elsewhere,
//! failing in CI): a control server and nodes, each in its own namespace,
//! joined by a bridge in a "hub" namespace. The nodes are real `wiremeshd
//! node` processes with TUN devices; the checks use `ping`, `wg show` and
//! the `wiremesh` CLI.

#[path = "../../testsupport/netns.rs"]
mod netns;

use netns::{veth_pair, Netns, Subnet, VethPair};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WIREMESHD: &str = env!("CARGO_BIN_EXE_wiremeshd");
const WIREMESH: &str = env!("CARGO_BIN_EXE_wiremesh");

/// Collects a child's output lines (so pipes never fill) for later reading.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn attach(child: &mut Child) -> Output {
        let out = Output::default();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = out.0.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        out
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.0.lock().unwrap().iter().find(|l| l.starts_with(prefix)) {
                return l[prefix.len()..].to_string();
            }
            assert!(Instant::now() < deadline, "no line starting {prefix:?} in:\n{}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Proc {
    child: Child,
    out: Output,
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so the agent removes its sockets, then make sure.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

struct Node {
    ns: Netns,
    _link: VethPair,
    tun: String,
    state: PathBuf,
    socket: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let socket = self.socket.to_str().unwrap();
        let mut full = vec![WIREMESH, "--socket", socket];
        full.extend_from_slice(args);
        self.ns.exec(&full)
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn ipv4(&self) -> String {
        self.status()["self"]["ipv4"].as_str().expect("registered").to_string()
    }

    fn ipv6(&self) -> String {
        self.status()["self"]["ipv6"].as_str().expect("registered").to_string()
    }

    fn wg_peers(&self) -> Vec<String> {
        let out = self.ns.exec(&["wg", "show", &self.tun, "peers"]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
    }

    fn ping(&self, ip: &str) -> bool {
        self.ns.exec(&["ping", "-c", "1", "-W", "1", ip]).status.success()
    }

    fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.out.text()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.proc.take();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

struct Lab {
    hub: Netns,
    subnet: Subnet,
    server_ns: Netns,
    _server_link: VethPair,
    server_state: PathBuf,
    server: Option<Proc>,
    url: String,
    token: String,
    next_host: u8,
}

fn tmpdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("wiremesh-mesh-{}-{tag}{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl Lab {
    fn new() -> Lab {
        let hub = Netns::new();
        hub.run_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        hub.run_ok(&["ip", "link", "set", "br0", "up"]);
        let subnet = Subnet::next();
        let server_ns = Netns::new();
        let server_link = Self::attach(&hub, &server_ns, &subnet.v4_cidr(1));
        let mut lab = Lab {
            hub,
            subnet,
            server_ns,
            _server_link: server_link,
            server_state: tmpdir("control"),
            server: None,
            url: String::new(),
            token: String::new(),
            next_host: 10,
        };
        lab.start_server();
        lab
    }

    fn attach(hub: &Netns, ns: &Netns, cidr: &str) -> VethPair {
        let link = veth_pair(ns, cidr, Some(hub), "");
        hub.run_ok(&["ip", "link", "set", &link.b_if, "master", "br0"]);
        link
    }

    fn start_server(&mut self) {
        let listen = format!("{}:8443", self.subnet.v4(1));
        let state = self.server_state.to_str().unwrap();
        let mut child = self.server_ns.spawn(&[WIREMESHD, "control", "--listen", &listen, "--state", state]);
        let out = Output::attach(&mut child);
        self.url = out.wait_for("control URL: ", Duration::from_secs(30));
        if self.token.is_empty() {
            self.token = out.wait_for("admin token (shown once, stored hashed): ", Duration::from_secs(5));
        }
        self.server = Some(Proc { child, out });
    }

    fn admin(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec![WIREMESH];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--control", &self.url, "--admin-token", &self.token]);
        self.server_ns.exec(&full)
    }

    fn new_key(&self, reusable: bool) -> String {
        let mut args = vec!["keys", "create"];
        if reusable {
            args.push("--reusable");
        }
        let out = self.admin(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A namespace on the bridge with a node agent that was given `key`.
    fn spawn_node(&mut self, name: &str, key: &str) -> Node {
        let ns = Netns::new();
        let host = self.next_host;
        self.next_host += 1;
        let link = Self::attach(&self.hub, &ns, &self.subnet.v4_cidr(host));
        let tun = netns::unique_ifname("wmn");
        let state = tmpdir(name);
        let socket = state.join("api.sock");
        let mut node = Node { ns, _link: link, tun, state, socket, proc: None };
        self.start_agent(&mut node, name, key);
        node
    }

    fn start_agent(&self, node: &mut Node, name: &str, key: &str) {
        let args = [
            WIREMESHD,
            "node",
            "--control",
            &self.url,
            "--auth-key",
            key,
            "--hostname",
            name,
            "--state",
            node.state.to_str().unwrap(),
            "--tun",
            &node.tun,
            "--socket",
            node.socket.to_str().unwrap(),
        ];
        let mut child = node.ns.spawn(&args);
        let out = Output::attach(&mut child);
        node.proc = Some(Proc { child, out });
    }
}

/// Waits until `cond` holds, or panics with `what` and `log()` after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool, log: impl Fn() -> String) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

fn peer_count(n: &Node) -> usize {
    n.status()["peers"].as_array().map(Vec::len).unwrap_or(0)
}

fn logs(nodes: &[&Node]) -> String {
    nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.tun, n.log())).collect()
}

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
    let nodes: Vec<Node> = ["one", "two", "three"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    let ips: Vec<String> = nodes.iter().map(Node::ipv4).collect();
    wait_until(Duration::from_secs(10), "one -> two", || nodes[0].ping(&ips[1]), || logs(&all));

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
    drop(lab.server.take());
}
