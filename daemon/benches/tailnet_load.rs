//! Load benchmark (a bench target, not a test): N simulated nodes register
//! with a real `wiremeshd control` on loopback, on SQLite or on PostgreSQL
//! (a private throwaway cluster), and all hold map streams (version 2: a full
//! map, then deltas); one more stream per run is a version 1 observer (full
//! maps). Then one more node registers and we measure how long until every
//! stream has it, the bytes that change costs per stream as a full map (v1)
//! and as a delta (v2), and the server's memory per streaming node. Run with
//!
//! ```sh
//! WIREMESH_LOAD_NODES=1000,5000 WIREMESH_LOAD_STORES=sqlite,postgres \
//!     cargo bench -p wiremesh-daemon --bench tailnet_load
//! ```
//!
//! (defaults: 100 nodes, both stores; PostgreSQL is skipped when it is not
//! installed). Streams are opened 64 at a time (each waits for its first map
//! before the next starts).

use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::Client;
use wiremesh_daemon::control::proto::{self, MapRequest, RegisterRequest};
use wiremesh_daemon::node::keys::MachineKey;

#[path = "../tests/support/control.rs"]
mod control_server;

use control_server::Store;

/// The control plane alone: without the identity service's own node.
const NO_IDENTITY: &[&str] = &["--identity", "off"];

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sim_node_key(i: usize) -> String {
    let mut nk = [0u8; 32];
    nk[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    proto::b64_key(&nk)
}

async fn register(c: Client, key: String, i: usize) -> (MachineKey, String) {
    let machine = MachineKey::generate().unwrap().0;
    let node_key = sim_node_key(i);
    let challenge = c.challenge().await.unwrap();
    let mut req = RegisterRequest {
        auth_key: key,
        machine_key: machine.public_hex(),
        node_key: node_key.clone(),
        hostname: format!("sim{i}"),
        endpoints: vec![format!("192.0.2.{}:{}", i % 250 + 1, 10000 + i % 50000)],
        challenge: proto::hex(&challenge),
        signature: String::new(),
    };
    req.signature = machine.sign_hex(&proto::register_message(&challenge, &c.url().fingerprint, &req));
    let _: proto::NodeInfo = c.json(hyper::Method::POST, "/api/v1/register", Some(&req), None).await.unwrap();
    (machine, node_key)
}

/// What the streams saw.
#[derive(Default)]
struct Counters {
    /// Streams that got their first map.
    started: AtomicUsize,
    /// Streams that got a line naming the new node.
    reached: AtomicUsize,
    /// Lines received by all streams (to tell when the ramp-up settled).
    lines: AtomicUsize,
    /// Bytes of the line that brought the new node, as a delta (v2) and as a full map (v1).
    delta_bytes: AtomicUsize,
    full_bytes: AtomicUsize,
    /// Bytes of the first (full) map of a v2 stream.
    first_map_bytes: AtomicUsize,
}

/// Opens a stream (`version` 1 or 2) and counts what it receives.
async fn follow(
    new_key: Arc<std::sync::Mutex<Option<String>>>,
    c: Client,
    machine: MachineKey,
    node_key: String,
    version: u32,
    counters: Arc<Counters>,
    opening: Arc<tokio::sync::Semaphore>,
) {
    // A bounded number of streams being opened at once, as nodes coming up
    // over time would (thousands of simultaneous TLS connects overflow the
    // listen backlog and time out).
    let mut permit = Some(opening.acquire_owned().await.unwrap());
    let challenge = c.challenge().await.unwrap();
    let mut req = MapRequest {
        machine_key: machine.public_hex(),
        node_key,
        endpoints: vec![],
        challenge: proto::hex(&challenge),
        signature: String::new(),
    };
    req.signature = machine.sign_hex(&proto::map_message(&challenge, &c.url().fingerprint, &req));
    let path = format!("/api/v1/map?version={version}");
    let resp = c.send(hyper::Method::POST, &path, serde_json::to_vec(&req).unwrap(), None).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut first = true;
    let mut seen = false;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(d) = frame.into_data() {
            buf.extend_from_slice(&d);
        }
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            counters.lines.fetch_add(1, Ordering::Relaxed);
            // Parsing every line here would measure the client: lines are
            // only searched for the new node's key.
            if first {
                assert!(line.starts_with(b"{\"map\":"), "the first line is a full map");
                first = false;
                drop(permit.take());
                if version == 2 {
                    counters.first_map_bytes.store(line.len(), Ordering::Relaxed);
                    counters.started.fetch_add(1, Ordering::SeqCst);
                }
                continue;
            }
            let key = new_key.lock().unwrap().clone();
            if let Some(k) = key.filter(|_| !seen) {
                if std::str::from_utf8(&line).is_ok_and(|l| l.contains(k.as_str())) {
                    seen = true;
                    if version == 2 {
                        counters.delta_bytes.store(line.len(), Ordering::Relaxed);
                        counters.reached.fetch_add(1, Ordering::SeqCst);
                    } else {
                        counters.full_bytes.store(line.len(), Ordering::Relaxed);
                    }
                }
            }
        }
        // A full map of thousands of nodes is megabytes: keep that capacity
        // for one stream, not thousands (the client would measure itself).
        if buf.capacity() > 256 * 1024 && buf.len() < 64 * 1024 {
            buf.shrink_to(64 * 1024);
        }
    }
}

/// Waits until `f` is true, at most `limit`.
async fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t0.elapsed()
}

fn run(store: &Store, n: usize) {
    let server = store.start_with(NO_IDENTITY);
    let token = server.token.clone().unwrap();
    let pid = server.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let c = Client::new(server.url.clone());
        let req = proto::CreateKeyRequest { reusable: true, ..Default::default() };
        let k: proto::CreatedKey =
            c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(&token)).await.unwrap();
        let t0 = Instant::now();
        let mut nodes = Vec::with_capacity(n + 1);
        for chunk in (0..=n).collect::<Vec<_>>().chunks(32) {
            let tasks: Vec<_> = chunk.iter().map(|&i| tokio::spawn(register(c.clone(), k.key.clone(), i))).collect();
            for t in tasks {
                nodes.push(t.await.unwrap());
            }
        }
        let reg_time = t0.elapsed();
        let observer = nodes.pop().unwrap();
        let rss0 = rss_kib(pid);
        let new_key = Arc::new(std::sync::Mutex::new(None));
        let counters = Arc::new(Counters::default());
        let t0 = Instant::now();
        let opening = Arc::new(tokio::sync::Semaphore::new(64));
        for (machine, node_key) in nodes {
            tokio::spawn(follow(new_key.clone(), c.clone(), machine, node_key, 2, counters.clone(), opening.clone()));
        }
        let open_time =
            wait_for("streams open", Duration::from_secs(1800), || counters.started.load(Ordering::SeqCst) == n).await;
        // The ramp-up settles (every node's online state reaching every stream).
        let mut last = usize::MAX;
        let settle = loop {
            let now = counters.lines.load(Ordering::SeqCst);
            if now == last {
                break t0.elapsed() - Duration::from_secs(1);
            }
            last = now;
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let rss1 = rss_kib(pid);
        tokio::spawn(follow(new_key.clone(), c.clone(), observer.0, observer.1, 1, counters.clone(), opening));
        tokio::time::sleep(Duration::from_millis(500)).await;
        *new_key.lock().unwrap() = Some(sim_node_key(n + 1));
        let t0 = Instant::now();
        register(c.clone(), k.key.clone(), n + 1).await;
        wait_for("change reaches all", Duration::from_secs(600), || counters.reached.load(Ordering::SeqCst) == n).await;
        // From the registration's start: the change may reach streams before its answer comes back.
        let fanout = t0.elapsed();
        let _ = wait_for("the v1 observer", Duration::from_secs(60), || counters.full_bytes.load(Ordering::SeqCst) > 0)
            .await;
        let full = counters.full_bytes.load(Ordering::Relaxed);
        let delta = counters.delta_bytes.load(Ordering::Relaxed);
        println!(
            "store={} nodes={n} register_all={reg_time:.2?} ({:.2?}/node) open_all_streams={open_time:.2?} \
             settled_after={settle:.2?} change_reaches_all={fanout:.2?} ({:.1?}/stream) \
             first_map_bytes={} change_bytes_full_v1={full} change_bytes_delta_v2={delta} \
             server_rss={} MiB (+{} KiB/stream while streaming)",
            store.name(),
            reg_time / n as u32,
            fanout / n as u32,
            counters.first_map_bytes.load(Ordering::Relaxed),
            rss1 / 1024,
            rss1.saturating_sub(rss0) / n as u64,
        );
    });
    drop(rt);
    drop(server);
}

fn main() {
    let sizes: Vec<usize> = std::env::var("WIREMESH_LOAD_NODES")
        .unwrap_or_else(|_| "100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let stores = std::env::var("WIREMESH_LOAD_STORES").unwrap_or_else(|_| "sqlite,postgres".into());
    for store in stores.split(',').map(str::trim) {
        for &n in &sizes {
            let s = match store {
                "sqlite" => Store::sqlite(&format!("load-{n}")),
                "postgres" => match Store::postgres("tailnet_load") {
                    Some(s) => s,
                    None => break,
                },
                other => panic!("WIREMESH_LOAD_STORES: unknown store {other:?} (sqlite, postgres)"),
            };
            run(&s, n);
        }
    }
}
