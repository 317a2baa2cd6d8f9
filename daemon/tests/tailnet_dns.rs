//! The node agent's resolver (MagicDNS-style, at 100.100.100.100) as
//! ordinary programs use it (root only; skipped elsewhere, failing in CI):
//! a control server and nodes in network namespaces as in
//! `tailnet_mesh.rs`, each namespace given a resolv.conf naming the
//! resolver (`ip netns exec` bind-mounts `/etc/netns/<ns>/resolv.conf`),
//! then getent(1) and ping(8) by name.

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
    let d = std::env::temp_dir().join(format!("wiremesh-dns-{}-{tag}{n}", std::process::id()));
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

/// `/etc/netns/<ns>/resolv.conf` for the life of the test.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn write(ns: &Netns, text: &str) -> ResolvConf {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `getent DATABASE NAME` in `n`'s namespace: (success, stdout).
fn getent(n: &Node, db: &str, name: &str) -> (bool, String) {
    let out = n.ns.exec(&["getent", db, name]);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tailnet_names_resolve_through_the_agents_resolver() {
    if !netns::require_or_skip("tailnet_names_resolve_through_the_agents_resolver") {
        return;
    }
    let mut lab = Lab::new();
    let key = lab.new_key(true);
    let nodes: Vec<Node> = ["alpha", "beta", "gamma"].iter().map(|n| lab.spawn_node(n, &key)).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "three-node maps", || peer_count(n) == 2, || logs(&all));
    }
    let (alpha, beta, gamma) = (&nodes[0], &nodes[1], &nodes[2]);
    // alpha searches the tailnet domain; beta has no search list, so its
    // short-name queries reach the resolver as single labels.
    let _alpha_conf = ResolvConf::write(
        &alpha.ns,
        "nameserver 100.100.100.100\nsearch wiremesh.internal\noptions timeout:1 attempts:2\n",
    );
    let _beta_conf = ResolvConf::write(&beta.ns, "nameserver 100.100.100.100\noptions timeout:1 attempts:2\n");
    let (beta4, beta6) = (beta.ipv4(), beta.ipv6());
    let (gamma4, gamma6) = (gamma.ipv4(), gamma.ipv6());

    // Short and full names, A and AAAA, self included.
    let (ok, text) = getent(alpha, "ahosts", "beta.wiremesh.internal");
    assert!(ok && text.contains(&beta4) && text.contains(&beta6), "{text}\n{}", alpha.log());
    let (ok, text) = getent(alpha, "hosts", "beta");
    assert!(ok && (text.contains(&beta4) || text.contains(&beta6)), "{text}");
    let (ok, text) = getent(alpha, "ahostsv4", "gamma");
    assert!(ok && text.contains(&gamma4), "{text}");
    let (ok, text) = getent(alpha, "ahosts", "gamma");
    assert!(ok && text.contains(&gamma6), "{text}");
    let (ok, text) = getent(alpha, "ahostsv4", "alpha");
    assert!(ok && text.contains(&alpha.ipv4()), "{text}");
    let (ok, text) = getent(beta, "ahosts", "gamma");
    assert!(ok && text.contains(&gamma4) && text.contains(&gamma6), "{text}\n{}", beta.log());
    let (ok, text) = getent(beta, "ahostsv4", "ALPHA.wiremesh.internal");
    assert!(ok && text.contains(&alpha.ipv4()), "{text}");

    // Unknown names fail: in the domain (NXDOMAIN), short, and outside it
    // (REFUSED: there is no forwarding).
    for name in ["nosuch", "nosuch.wiremesh.internal", "example.com"] {
        for n in [alpha, beta] {
            let (ok, text) = getent(n, "ahosts", name);
            assert!(!ok, "{name} resolved in {}: {text}", n.tun);
        }
    }

    // ping(8) by name, over the tunnel.
    wait_until(Duration::from_secs(10), "ping beta by name", || alpha.ping("beta"), || logs(&all));
    let out = alpha.ns.exec(&["ping", "-c", "1", "-W", "2", "gamma.wiremesh.internal"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && (text.contains(&gamma4) || text.contains(&gamma6)), "{text}");
    let out = alpha.ns.exec(&["ping", "-4", "-c", "1", "-W", "2", "gamma"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&gamma4), "{text}");
    let out = beta.ns.exec(&["ping", "-6", "-c", "1", "-W", "2", "gamma"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Garbage to the resolver is dropped and counted; it keeps answering.
    let out = alpha.ns.exec(&["bash", "-c", "printf 'garbage' > /dev/udp/100.100.100.100/53"]);
    assert!(out.status.success());
    let log = alpha.proc.as_ref().unwrap().out.clone();
    log.wait_for("wiremeshd node: dns: dropped a malformed message", Duration::from_secs(5));
    assert!(getent(alpha, "ahostsv4", "beta").0);

    // A node that joins later is resolvable once the maps name it.
    let delta = lab.spawn_node("delta", &key);
    wait_until(Duration::from_secs(20), "delta's map", || peer_count(&delta) == 3, || delta.log());
    let delta4 = delta.ipv4();
    wait_until(
        Duration::from_secs(5),
        "delta resolvable",
        || getent(alpha, "ahostsv4", "delta").1.contains(&delta4),
        || logs(&[alpha, &delta]),
    );
    drop(lab.server.take());
}
