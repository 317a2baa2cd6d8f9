//! What the tailnet tests share: a control server and node agents, each in
//! its own network namespace, joined through a hub namespace; included by
//! `tailnet_mesh.rs` and `tailnet_dns.rs` (each test crate declares `netns`).
#![allow(dead_code)]

use crate::netns::{veth_pair, Netns, Subnet, VethPair};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const WIREMESHD: &str = env!("CARGO_BIN_EXE_wiremeshd");
pub const WIREMESH: &str = env!("CARGO_BIN_EXE_wiremesh");

/// Collects a child's output lines (so pipes never fill) for later reading.
#[derive(Clone, Default)]
pub struct Output(pub Arc<Mutex<Vec<String>>>);

impl Output {
    pub fn attach(child: &mut Child) -> Output {
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

    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
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

pub struct Proc {
    pub child: Child,
    pub out: Output,
}

impl Proc {
    pub fn kill9(&mut self) {
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

pub struct Node {
    pub ns: Netns,
    pub _link: VethPair,
    pub tun: String,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub proc: Option<Proc>,
}

impl Node {
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let socket = self.socket.to_str().unwrap();
        let mut full = vec![WIREMESH, "--socket", socket];
        full.extend_from_slice(args);
        self.ns.exec(&full)
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn ipv4(&self) -> String {
        self.status()["self"]["ipv4"].as_str().expect("registered").to_string()
    }

    pub fn ipv6(&self) -> String {
        self.status()["self"]["ipv6"].as_str().expect("registered").to_string()
    }

    pub fn wg_peers(&self) -> Vec<String> {
        let out = self.ns.exec(&["wg", "show", &self.tun, "peers"]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.ns.exec(&["ping", "-c", "1", "-W", "1", ip]).status.success()
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.out.text()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.proc.take();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

pub struct Lab {
    pub hub: Netns,
    pub subnet: Subnet,
    pub server_ns: Netns,
    pub _server_link: VethPair,
    pub server_state: PathBuf,
    pub server: Option<Proc>,
    pub url: String,
    pub token: String,
    pub next_host: u8,
    /// Whether the server runs the identity service (off unless a test asks:
    /// the other tests count the nodes they made).
    pub identity: bool,
    /// More control replicas on the same store ([`Lab::replicas`]), and the
    /// URL of each (`url` is the first server's).
    pub replicas: Vec<Proc>,
    pub replica_urls: Vec<String>,
}

pub fn tmpdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("wiremesh-tailnet-{}-{tag}{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl Lab {
    pub fn new() -> Lab {
        Self::with(false)
    }

    /// A lab whose control server runs the identity service (`--identity on`).
    pub fn with_identity() -> Lab {
        Self::with(true)
    }

    fn with(identity: bool) -> Lab {
        Self::on_store(identity, None, 1)
    }

    /// `n` control replicas in the server namespace on one PostgreSQL store
    /// (`state`, a postgres:// URL it reaches), on ports 8443, 9443, ... (each
    /// relay takes the next port):
    /// the first is `server` (its URL `url`), all are in `replica_urls`.
    pub fn replicas(state: &str, n: u16) -> Lab {
        Self::on_store(false, Some(state), n)
    }

    fn on_store(identity: bool, store: Option<&str>, n: u16) -> Lab {
        let mut lab = Lab::unstarted();
        lab.identity = identity;
        let Some(store) = store else {
            lab.start_server();
            return lab;
        };
        lab.server_state = PathBuf::from(store);
        for i in 0..n {
            let (proc, url) = lab.spawn_control(store, 8443 + 1000 * i);
            lab.replica_urls.push(url.clone());
            if i == 0 {
                (lab.server, lab.url) = (Some(proc), url);
            } else {
                lab.replicas.push(proc);
            }
        }
        lab
    }

    pub fn attach(hub: &Netns, ns: &Netns, cidr: &str) -> VethPair {
        let link = veth_pair(ns, cidr, Some(hub), "");
        hub.run_ok(&["ip", "link", "set", &link.b_if, "master", "br0"]);
        link
    }

    pub fn start_server(&mut self) {
        self.start_server_with(&[]);
    }

    /// A control server on `state` listening on `port`; the admin token,
    /// when it prints one (a new store), is kept.
    fn spawn_control(&mut self, state: &str, port: u16) -> (Proc, String) {
        self.spawn_control_with(state, port, &[])
    }

    /// [`Lab::spawn_control`] with `extra` flags for the server.
    fn spawn_control_with(&mut self, state: &str, port: u16, extra: &[&str]) -> (Proc, String) {
        let listen = format!("{}:{port}", self.subnet.v4(1));
        let identity = if self.identity { "on" } else { "off" };
        let mut args = vec![WIREMESHD, "control", "--listen", &listen, "--state", state, "--identity", identity];
        args.extend_from_slice(extra);
        let mut child = self.server_ns.spawn(&args);
        let out = Output::attach(&mut child);
        let url = out.wait_for("control URL: ", Duration::from_secs(30));
        if self.token.is_empty() {
            self.token = out.wait_for("admin token (shown once, stored hashed): ", Duration::from_secs(5));
        }
        (Proc { child, out }, url)
    }

    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec![WIREMESH];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--control", &self.url, "--admin-token", &self.token]);
        self.server_ns.exec(&full)
    }

    pub fn new_key(&self, reusable: bool) -> String {
        let mut args = vec!["keys", "create"];
        if reusable {
            args.push("--reusable");
        }
        let out = self.admin(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A namespace on the bridge with a node agent that was given `key`.
    pub fn spawn_node(&mut self, name: &str, key: &str) -> Node {
        let mut node = self.new_node(name);
        self.start_agent(&mut node, name, key);
        node
    }

    /// A namespace on the bridge, its agent not started yet.
    pub fn new_node(&mut self, name: &str) -> Node {
        let ns = Netns::new();
        let host = self.next_host;
        self.next_host += 1;
        let link = Self::attach(&self.hub, &ns, &self.subnet.v4_cidr(host));
        let tun = crate::netns::unique_ifname("wmn");
        let state = tmpdir(name);
        let socket = state.join("api.sock");
        Node { ns, _link: link, tun, state, socket, proc: None }
    }

    pub fn start_agent(&self, node: &mut Node, name: &str, key: &str) {
        self.start_agent_with(node, name, key, &[]);
    }

    /// Starts the agent with `extra` arguments.
    pub fn start_agent_with(&self, node: &mut Node, name: &str, key: &str, extra: &[&str]) {
        self.start_agent_on(node, &self.url, name, key, extra);
    }

    /// Starts the agent with `--control control` (one URL or several) and `extra`.
    pub fn start_agent_on(&self, node: &mut Node, control: &str, name: &str, key: &str, extra: &[&str]) {
        let mut args = vec![
            WIREMESHD,
            "node",
            "--control",
            control,
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
        args.extend_from_slice(extra);
        let mut child = node.ns.spawn(&args);
        let out = Output::attach(&mut child);
        node.proc = Some(Proc { child, out });
    }
}

/// Waits until `cond` holds, or panics with `what` and `log()` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool, log: impl Fn() -> String) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

pub fn peer_count(n: &Node) -> usize {
    n.status()["peers"].as_array().map(Vec::len).unwrap_or(0)
}

pub fn logs(nodes: &[&Node]) -> String {
    nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.tun, n.log())).collect()
}

impl Lab {
    /// A lab whose control server is not started yet: the bridge and the
    /// server's namespace only, so that a test can first put something on
    /// the bridge whose address the server's flags name (a standalone relay
    /// for `--relay-url`); [`Lab::start_server_with`] starts it.
    pub fn unstarted() -> Lab {
        let hub = Netns::new();
        hub.run_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        hub.run_ok(&["ip", "link", "set", "br0", "up"]);
        let subnet = Subnet::next();
        let server_ns = Netns::new();
        let server_link = Self::attach(&hub, &server_ns, &subnet.v4_cidr(1));
        Lab {
            hub,
            subnet,
            server_ns,
            _server_link: server_link,
            server_state: tmpdir("control"),
            server: None,
            url: String::new(),
            token: String::new(),
            next_host: 10,
            identity: false,
            replicas: Vec::new(),
            replica_urls: Vec::new(),
        }
    }

    /// Starts the control server on the lab's state and port 8443, as
    /// [`Lab::start_server`] does, with `extra` flags after the usual ones.
    pub fn start_server_with(&mut self, extra: &[&str]) {
        let state = self.server_state.to_str().unwrap().to_string();
        let (proc, url) = self.spawn_control_with(&state, 8443, extra);
        (self.server, self.url) = (Some(proc), url);
    }
}

/// A tiny HTTP server on one address in a namespace (a thread of this
/// process moved there), answering each request with `greeting`, the path
/// asked for, and `filler` bytes of padding (so a response spans many
/// packets), or as many as the path's `?bytes=N` asks for.
pub struct WebServer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebServer {
    pub fn start(ns: &Netns, addr: &str, greeting: &str, filler: usize) -> WebServer {
        let path = format!("/run/netns/{}", ns.name());
        let (addr, greeting) = (addr.to_string(), greeting.to_string());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns on a namespace file we hold open; it moves only this thread.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0, "setns");
            let listener = std::net::TcpListener::bind(&addr).expect("web server bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match std::io::Read::read(&mut s, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let asked = text.split(' ').nth(1).unwrap_or("?").to_string();
                // `?bytes=N` asks for N bytes of padding instead (16 MiB at most).
                let padding = asked
                    .split_once("?bytes=")
                    .and_then(|(_, n)| n.parse::<usize>().ok())
                    .map_or(filler, |n| n.min(16 << 20));
                let body = match padding {
                    0 => format!("{greeting} {asked}\n"),
                    n => format!("{greeting} {asked}\n{}\n", "x".repeat(n)),
                };
                let _ = std::io::Write::write_fmt(
                    &mut s,
                    format_args!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                    ),
                );
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("web server up");
        WebServer { stop, thread: Some(thread) }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `curl -sS --max-time 10 ARGS` in `ns`: success, body, stderr.
pub fn curl(ns: &Netns, args: &[&str]) -> (bool, String, String) {
    let mut full = vec!["curl", "-sS", "--max-time", "10"];
    full.extend_from_slice(args);
    let out = ns.exec(&full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
