//! A real `wiremeshd control` on loopback for the API tests: started on a
//! state directory, its URL (with the certificate pin) and admin token read
//! from what it prints, killed when dropped; its state in a directory
//! (SQLite) or a private PostgreSQL cluster ([`Store`]); and the test node
//! that registers with it ([`TestNode`]). Included by the API tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use wiremesh_daemon::control::client::{Client, ClientError, ControlUrl};
use wiremesh_daemon::control::proto::{self, MapRequest, NodeInfo, RegisterRequest, StreamMessage};
use wiremesh_daemon::node::keys::MachineKey;

#[path = "postgres.rs"]
pub mod pg;

pub struct Server {
    pub child: Child,
    pub url: ControlUrl,
    pub token: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn state_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wiremesh-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn start(state: &std::path::Path) -> Server {
    start_with(state, &[])
}

pub fn start_with(state: &std::path::Path, extra: &[&str]) -> Server {
    start_on(state.as_os_str(), extra)
}

/// Where a test's control servers keep their state: a fresh directory
/// (SQLite), or a fresh database in a private PostgreSQL cluster, both
/// removed on drop.
pub enum Store {
    Dir(PathBuf),
    Postgres { url: String, cluster: pg::Cluster },
}

impl Store {
    /// A fresh state directory.
    pub fn sqlite(tag: &str) -> Store {
        Store::Dir(state_dir(tag))
    }

    /// A fresh database on a private cluster; `None` (the test skips) outside
    /// CI when PostgreSQL is not installed.
    pub fn postgres(test: &str) -> Option<Store> {
        let cluster = pg::Cluster::start_or_skip(test)?;
        let url = cluster.create_db("wiremesh");
        Some(Store::Postgres { url, cluster })
    }

    /// What `--state` gets.
    pub fn arg(&self) -> std::ffi::OsString {
        match self {
            Store::Dir(d) => d.clone().into_os_string(),
            Store::Postgres { url, .. } => url.into(),
        }
    }

    /// Starts a control server on this store.
    pub fn start(&self) -> Server {
        start_on(&self.arg(), &[])
    }

    /// Starts a control server on this store with more arguments.
    pub fn start_with(&self, extra: &[&str]) -> Server {
        start_on(&self.arg(), extra)
    }

    /// The store's name in test output.
    pub fn name(&self) -> &'static str {
        match self {
            Store::Dir(_) => "SQLite",
            Store::Postgres { .. } => "PostgreSQL",
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Dir(d) = self {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Starts `wiremeshd control` on `state` (a directory or a postgres:// URL).
pub fn start_on(state: &std::ffi::OsStr, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wiremeshd"))
        .args(["control", "--listen", "127.0.0.1:0", "--state"])
        .arg(state)
        .args(extra)
        // The identity service registers a node of its own: off unless a
        // test names it (`--identity on`, `--identity=on`) or configures it
        // (`--identity-issuer …`, any `--identity-*`: then the server's own
        // default, on), so node counts stay the tests' own.
        .args(if names_identity(extra) { &[][..] } else { &["--identity", "off"][..] })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start wiremeshd control");
    let out = child.stdout.take().unwrap();
    // Owned by the guard from here on, so the child is reaped on every path.
    let mut server =
        Server { child, url: ControlUrl { host: String::new(), port: 0, fingerprint: [0; 32] }, token: None };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("control server did not start");
        if let Some(t) = line.strip_prefix("admin token (shown once, stored hashed): ") {
            server.token = Some(t.to_string());
        }
        if let Some(u) = line.strip_prefix("control URL: ") {
            server.url = u.parse().unwrap();
            return server;
        }
    }
}

/// Whether `args` set `--identity` (either spelling) or one of the
/// service's settings (`--identity-*`). A test that gives the service an
/// issuer but had `--identity off` added behind its back found no identity
/// service on its tailnet ("no identity service"), with no error anywhere.
fn names_identity(args: &[&str]) -> bool {
    args.iter().any(|a| a.starts_with("--identity"))
}

/// Where test nodes say they can be reached unless a test says otherwise.
pub const TEST_ENDPOINT: &str = "192.0.2.1:41641";

/// A node as the API tests see it: a fresh machine key and a node key made
/// of one repeated byte. Test files add their own request builders in their
/// own `impl TestNode` blocks.
pub struct TestNode {
    pub machine: MachineKey,
    pub node_key: String,
}

impl TestNode {
    pub fn new(n: u8) -> Self {
        TestNode { machine: MachineKey::generate().unwrap().0, node_key: proto::b64_key(&[n; 32]) }
    }

    /// A registration request for `endpoints`, signed by the machine key
    /// over a fresh challenge from `c`.
    pub async fn register_req(
        &self,
        c: &Client,
        auth_key: &str,
        hostname: &str,
        endpoints: &[&str],
    ) -> RegisterRequest {
        let challenge = c.challenge().await.unwrap();
        let mut req = RegisterRequest {
            auth_key: auth_key.into(),
            machine_key: self.machine.public_hex(),
            node_key: self.node_key.clone(),
            hostname: hostname.into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            challenge: proto::hex(&challenge),
            signature: String::new(),
        };
        req.signature = self.machine.sign_hex(&proto::register_message(&challenge, &c.url().fingerprint, &req));
        req
    }

    /// A map request at [`TEST_ENDPOINT`], signed by the machine key over a
    /// fresh challenge from `c`.
    pub async fn signed_map_req(&self, c: &Client) -> MapRequest {
        self.signed_map_req_at(c, &[TEST_ENDPOINT]).await
    }

    pub async fn signed_map_req_at(&self, c: &Client, endpoints: &[&str]) -> MapRequest {
        let challenge = c.challenge().await.unwrap();
        let mut req = MapRequest {
            machine_key: self.machine.public_hex(),
            node_key: self.node_key.clone(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            challenge: proto::hex(&challenge),
            signature: String::new(),
        };
        req.signature = self.machine.sign_hex(&proto::map_message(&challenge, &c.url().fingerprint, &req));
        req
    }

    /// Registers at [`TEST_ENDPOINT`].
    pub async fn register(&self, c: &Client, auth_key: &str, hostname: &str) -> Result<NodeInfo, ClientError> {
        self.register_at(c, auth_key, hostname, &[TEST_ENDPOINT]).await
    }

    pub async fn register_at(
        &self,
        c: &Client,
        auth_key: &str,
        hostname: &str,
        endpoints: &[&str],
    ) -> Result<NodeInfo, ClientError> {
        let req = self.register_req(c, auth_key, hostname, endpoints).await;
        c.json(hyper::Method::POST, "/api/v1/register", Some(&req), None).await
    }
}

/// Reads map-stream lines into a channel.
pub fn stream_lines(mut body: hyper::body::Incoming) -> tokio::sync::mpsc::UnboundedReceiver<StreamMessage> {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(d) = frame.into_data() {
                buf.extend_from_slice(&d);
            }
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if tx.send(serde_json::from_slice(&line).unwrap()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}
