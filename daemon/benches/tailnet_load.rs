//! Load benchmark (a bench target, not a test): N simulated nodes
//! register with a real `wiremeshd control` on loopback and all hold map
//! streams; then one more node registers and we measure how long until every
//! stream has it, the bytes of one full map, and the server's memory per
//! streaming node. Run with
//!
//! ```sh
//! WIREMESH_LOAD_NODES=100,1000 cargo bench -p wiremesh-daemon --bench tailnet_load
//! ```

use http_body_util::BodyExt;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wiremesh_daemon::control::client::{Client, ControlUrl};
use wiremesh_daemon::control::proto::{self, MapRequest, RegisterRequest, StreamMessage};
use wiremesh_daemon::node::keys::MachineKey;

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

/// Opens a stream; counts its first map, then the first map naming the new node.
async fn follow(
    new_key: Arc<std::sync::Mutex<Option<String>>>,
    c: Client,
    machine: MachineKey,
    node_key: String,
    done: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
) {
    let challenge = c.challenge().await.unwrap();
    let mut req = MapRequest {
        machine_key: machine.public_hex(),
        node_key,
        endpoints: vec![],
        challenge: proto::hex(&challenge),
        signature: String::new(),
    };
    req.signature = machine.sign_hex(&proto::map_message(&challenge, &c.url().fingerprint, &req));
    let resp = c.send(hyper::Method::POST, "/api/v1/map", serde_json::to_vec(&req).unwrap(), None).await.unwrap();
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
            // Parsing every map here would measure the client; the first map
            // is parsed, later ones only searched for the new node's key.
            if first {
                assert!(matches!(serde_json::from_slice(&line), Ok(StreamMessage::Map(_))));
                first = false;
                bytes.store(line.len(), Ordering::Relaxed);
                done.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let key = new_key.lock().unwrap().clone();
            if let Some(k) = key.filter(|_| !seen) {
                if std::str::from_utf8(&line).is_ok_and(|l| l.contains(k.as_str())) {
                    seen = true;
                    bytes.store(line.len(), Ordering::Relaxed);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("WIREMESH_LOAD_NODES")
        .unwrap_or_else(|_| "100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in sizes {
        let dir = std::env::temp_dir().join(format!("wiremesh-load-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_wiremeshd"))
            .args(["control", "--listen", "127.0.0.1:0", "--state"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
        let token = lines.next().unwrap().rsplit(' ').next().unwrap().to_string();
        let url: ControlUrl =
            lines.find_map(|l| l.strip_prefix("control URL: ").map(str::to_string)).unwrap().parse().unwrap();
        let pid = child.id();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let c = Client::new(url);
            let req = proto::CreateKeyRequest { reusable: true, ..Default::default() };
            let k: proto::CreatedKey =
                c.json(hyper::Method::POST, "/api/v1/admin/keys", Some(&req), Some(&token)).await.unwrap();
            let t0 = Instant::now();
            let mut nodes = Vec::with_capacity(n);
            for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
                let tasks: Vec<_> =
                    chunk.iter().map(|&i| tokio::spawn(register(c.clone(), k.key.clone(), i))).collect();
                for t in tasks {
                    nodes.push(t.await.unwrap());
                }
            }
            let reg_time = t0.elapsed();
            let rss0 = rss_kib(pid);
            let new_key = Arc::new(std::sync::Mutex::new(None));
            let done = Arc::new(AtomicUsize::new(0));
            let bytes = Arc::new(AtomicUsize::new(0));
            let t0 = Instant::now();
            for (machine, node_key) in nodes {
                tokio::spawn(follow(new_key.clone(), c.clone(), machine, node_key, done.clone(), bytes.clone()));
            }
            while done.load(Ordering::SeqCst) < n {
                assert!(t0.elapsed() < Duration::from_secs(600), "streams did not all start");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let open_time = t0.elapsed();
            // Let the online-state churn of the ramp-up settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss1 = rss_kib(pid);
            *new_key.lock().unwrap() = Some(sim_node_key(n));
            done.store(0, Ordering::SeqCst);
            let t0 = Instant::now();
            register(c.clone(), k.key.clone(), n).await;
            while done.load(Ordering::SeqCst) < n {
                assert!(t0.elapsed() < Duration::from_secs(600), "change did not reach every stream");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let fanout = t0.elapsed();
            println!(
                "nodes={n} register_all={reg_time:.2?} ({:.2?}/node) open_all_streams={open_time:.2?} \
                 change_reaches_all={fanout:.2?} ({:.1?}/node) full_map_bytes={} server_rss_per_stream={} KiB",
                reg_time / n as u32,
                fanout / n as u32,
                bytes.load(Ordering::Relaxed),
                rss1.saturating_sub(rss0) / n as u64,
            );
        });
        drop(rt);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
