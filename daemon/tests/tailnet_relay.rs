//! The relay over real TLS on loopback: frames between two proven node
//! keys, a client claiming a key it does not hold, malformed and oversized
//! frames, the per-client rate limit, the STUN responder, and the relayed
//! throughput figure docs/nat.md quotes; the embedded relay's counters as
//! administrators read them (`wiremesh relay stats`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wiremesh_core::keys::PrivateKey;
use wiremesh_daemon::control::client::ClientError;
use wiremesh_daemon::relay::client::{self, RelayError};
use wiremesh_daemon::relay::{self, Limits, Relay, MAX_PAYLOAD};

#[path = "support/control.rs"]
mod control_server;

fn key() -> PrivateKey {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    PrivateKey::from_bytes(b)
}

struct Server {
    relay: Arc<Relay>,
    addr: SocketAddr,
    fp: [u8; 32],
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn server(limits: Limits) -> Server {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wiremesh-relay-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let identity = wiremesh_daemon::control::tls::load_or_create(&dir).unwrap();
    let (relay, addr) = relay::start("127.0.0.1:0".parse().unwrap(), identity.config, limits).await.unwrap();
    Server { relay, addr, fp: identity.fingerprint, _dir: TempDir(dir) }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_between_proven_keys() {
    let s = server(Limits::default()).await;
    let (a, b) = (key(), key());
    let (mut a_tx, mut a_rx) = client::connect(s.addr, s.fp, &a).await.unwrap();
    let (mut b_tx, mut b_rx) = client::connect(s.addr, s.fp, &b).await.unwrap();
    settle().await;
    assert_eq!(s.relay.clients(), 2);
    let mut buf = vec![0u8; MAX_PAYLOAD];
    // Opaque bytes are forwarded as they are, tagged with the sender's key.
    for len in [1usize, 148, 1452, MAX_PAYLOAD] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        a_tx.send(&b.public_key(), &payload).await.unwrap();
        let (from, n) = b_rx.recv(&mut buf).await.unwrap().unwrap();
        assert_eq!(from, a.public_key());
        assert_eq!(&buf[..n], &payload[..]);
    }
    b_tx.send(&a.public_key(), b"back").await.unwrap();
    let (from, n) = a_rx.recv(&mut buf).await.unwrap().unwrap();
    assert_eq!((from, &buf[..n]), (b.public_key(), &b"back"[..]));
    // To a key that is not connected: counted, not an error for the sender.
    a_tx.send(&key().public_key(), b"nobody").await.unwrap();
    settle().await;
    let st = s.relay.stats.snapshot();
    assert_eq!((st.accepted, st.forwarded, st.no_peer, st.auth_failed, st.malformed), (2, 5, 1, 0, 0));
    // Payloads the client refuses to frame.
    assert!(matches!(a_tx.send(&b.public_key(), &[]).await, Err(RelayError::BadLength(0))));
    assert!(matches!(a_tx.send(&b.public_key(), &vec![0; MAX_PAYLOAD + 1]).await, Err(RelayError::BadLength(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_claiming_a_key_it_does_not_hold_is_refused() {
    let s = server(Limits::default()).await;
    let (victim, thief, other) = (key(), key(), key());
    let (_v_tx, mut v_rx) = client::connect(s.addr, s.fp, &victim).await.unwrap();
    let (mut o_tx, _o_rx) = client::connect(s.addr, s.fp, &other).await.unwrap();
    let r = client::connect_claiming(s.addr, s.fp, &thief, victim.public_key()).await;
    assert!(matches!(r, Err(RelayError::Refused)), "impostor accepted");
    settle().await;
    let st = s.relay.stats.snapshot();
    assert_eq!((st.accepted, st.auth_failed), (2, 1));
    // The victim's connection still receives its frames.
    o_tx.send(&victim.public_key(), b"still yours").await.unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let (from, n) = v_rx.recv(&mut buf).await.unwrap().unwrap();
    assert_eq!((from, &buf[..n]), (other.public_key(), &b"still yours"[..]));
    // A client pinning another certificate does not connect at all.
    assert!(client::connect(s.addr, [0u8; 32], &thief).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_close_the_connection() {
    let s = server(Limits::default()).await;
    let (a, b) = (key(), key());
    let (_b_tx, mut b_rx) = client::connect(s.addr, s.fp, &b).await.unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let bad_frames: Vec<Vec<u8>> = vec![
        // Oversized: length MAX_PAYLOAD + 1.
        [&[relay::FRAME_SEND][..], &b.public_key().0, &((MAX_PAYLOAD + 1) as u16).to_be_bytes(), &[0u8; 8]].concat(),
        // Unknown type.
        [&[9u8][..], &b.public_key().0, &4u16.to_be_bytes(), b"abcd"].concat(),
        // A relay-to-client frame sent by a client.
        [&[relay::FRAME_RECV][..], &b.public_key().0, &4u16.to_be_bytes(), b"abcd"].concat(),
        // Empty payload.
        [&[relay::FRAME_SEND][..], &b.public_key().0, &0u16.to_be_bytes()].concat(),
    ];
    for (i, frame) in bad_frames.iter().enumerate() {
        let (mut a_tx, mut a_rx) = client::connect(s.addr, s.fp, &a).await.unwrap();
        a_tx.write_raw(frame).await.unwrap();
        // The relay hangs up on us.
        let r = tokio::time::timeout(Duration::from_secs(5), a_rx.recv(&mut buf)).await.expect("closed in time");
        assert!(matches!(r, Ok(None) | Err(_)), "frame {i}: connection still open");
        assert_eq!(s.relay.stats.snapshot().malformed, i as u64 + 1);
    }
    // Nothing reached b.
    assert!(tokio::time::timeout(Duration::from_millis(200), b_rx.recv(&mut buf)).await.is_err());
    assert_eq!(s.relay.stats.snapshot().forwarded, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_bounds_one_client() {
    // 64 KiB/s with a 64 KiB burst: 1 MiB sent at once mostly drops.
    let limits = Limits { rate_bytes_per_sec: 64 << 10, burst_bytes: 64 << 10, queue_frames: 4096 };
    let s = server(limits).await;
    let (a, b) = (key(), key());
    let (mut a_tx, _a_rx) = client::connect(s.addr, s.fp, &a).await.unwrap();
    let (_b_tx, mut b_rx) = client::connect(s.addr, s.fp, &b).await.unwrap();
    let frame = vec![0x42u8; 1024];
    for _ in 0..1024 {
        a_tx.queue(&b.public_key(), &frame).await.unwrap();
    }
    a_tx.flush().await.unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut got = 0u64;
    while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(300), b_rx.recv(&mut buf)).await {
        got += 1;
    }
    let st = s.relay.stats.snapshot();
    assert_eq!(st.forwarded + st.rate_limited, 1024);
    assert!(st.rate_limited >= 900, "{st:?}");
    assert!((64..=100).contains(&got), "{got} frames passed a 64 KiB burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_instead_of_blocking_the_sender() {
    // The receiver never reads: its queue fills, the rest is dropped and
    // counted, and the sender's other destination is still served.
    let limits = Limits { queue_frames: 16, ..Limits::default() };
    let s = server(limits).await;
    let (a, b, c) = (key(), key(), key());
    let (mut a_tx, _a_rx) = client::connect(s.addr, s.fp, &a).await.unwrap();
    let (_b_tx, _b_rx_never_read) = client::connect(s.addr, s.fp, &b).await.unwrap();
    let (_c_tx, mut c_rx) = client::connect(s.addr, s.fp, &c).await.unwrap();
    let frame = vec![1u8; MAX_PAYLOAD];
    for _ in 0..4096 {
        a_tx.queue(&b.public_key(), &frame).await.unwrap();
    }
    a_tx.send(&c.public_key(), b"for c").await.unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let (from, n) = tokio::time::timeout(Duration::from_secs(10), c_rx.recv(&mut buf)).await.unwrap().unwrap().unwrap();
    assert_eq!((from, &buf[..n]), (a.public_key(), &b"for c"[..]));
    assert!(s.relay.stats.snapshot().queue_full > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_reports_the_requesters_address() {
    use wiremesh_core::stun;
    let s = server(Limits::default()).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = [0x5au8; 12];
    let mut req = [0u8; stun::BINDING_REQUEST_LEN];
    stun::encode_binding_request(&tx, &mut req).unwrap();
    // Garbage first: ignored, the responder keeps going.
    sock.send_to(b"not stun at all, not even close", s.addr).await.unwrap();
    sock.send_to(&req, s.addr).await.unwrap();
    let mut buf = [0u8; 128];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(from, s.addr);
    let m = stun::parse(&buf[..n]).unwrap();
    assert_eq!((m.class, m.transaction_id, m.mapped), (stun::Class::Success, tx, Some(sock.local_addr().unwrap())));
    assert_eq!(s.relay.stats.snapshot().stun_answered, 1);
}

/// Relayed throughput over loopback TLS: one sender, one receiver, frames of
/// a WireGuard packet's size, for about a second. Prints the figure
/// docs/nat.md quotes; asserts only that it is not absurdly low.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_throughput() {
    let s = server(Limits { rate_bytes_per_sec: u64::MAX / 4, burst_bytes: u64::MAX / 4, queue_frames: 4096 }).await;
    let (a, b) = (key(), key());
    let (mut a_tx, _a_rx) = client::connect(s.addr, s.fp, &a).await.unwrap();
    let (_b_tx, mut b_rx) = client::connect(s.addr, s.fp, &b).await.unwrap();
    const FRAME: usize = 1452;
    const DURATION: Duration = Duration::from_secs(1);
    let bkey = b.public_key();
    let sender = tokio::spawn(async move {
        let frame = vec![0xa5u8; FRAME];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < DURATION {
            for _ in 0..64 {
                a_tx.queue(&bkey, &frame).await.unwrap();
            }
            a_tx.flush().await.unwrap();
            sent += 64;
        }
        (sent, a_tx)
    });
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let start = Instant::now();
    let mut got = 0u64;
    while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(500), b_rx.recv(&mut buf)).await {
        got += 1;
    }
    let elapsed = start.elapsed().saturating_sub(Duration::from_millis(500));
    let (sent, _keep) = sender.await.unwrap();
    let mbit = (got * FRAME as u64 * 8) as f64 / elapsed.as_secs_f64() / 1e6;
    println!("relayed: {got} of {sent} frames of {FRAME} bytes in {elapsed:?}: {mbit:.0} Mbit/s");
    assert!(got > 0 && got <= sent);
    assert!(mbit > 20.0, "{mbit} Mbit/s");
}

/// `wiremeshd control` embeds the relay by default on the next port (here
/// an ephemeral one), with the control channel's certificate: a node that
/// pinned the control server reaches the relay and its STUN responder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_embeds_the_relay() {
    use std::io::BufRead;
    let dir = TempDir(std::env::temp_dir().join(format!("wiremesh-relay-embedded-{}", std::process::id())));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wiremeshd"))
        .args(["control", "--listen", "127.0.0.1:0", "--state"])
        .arg(&dir.0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let out = child.stdout.take().unwrap();
    let _guard = Kill(child);
    let (relay_addr, url) = tokio::task::spawn_blocking(move || {
        let mut relay = None;
        for line in std::io::BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(r) = line.strip_prefix("relay listening on ") {
                relay = Some(r.split(' ').next().unwrap().parse::<SocketAddr>().unwrap());
            }
            if let Some(u) = line.strip_prefix("control URL: ") {
                let url: wiremesh_daemon::control::client::ControlUrl = u.parse().unwrap();
                return (relay, url);
            }
        }
        panic!("control server exited");
    })
    .await
    .unwrap();
    let relay_addr = relay_addr.expect("the control server started its relay");
    assert_ne!(relay_addr.port(), url.port, "a second port");
    let (a, b) = (key(), key());
    let (mut a_tx, _a_rx) = client::connect(relay_addr, url.fingerprint, &a).await.unwrap();
    let (_b_tx, mut b_rx) = client::connect(relay_addr, url.fingerprint, &b).await.unwrap();
    a_tx.send(&b.public_key(), b"through the embedded relay").await.unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let (from, n) = tokio::time::timeout(Duration::from_secs(5), b_rx.recv(&mut buf)).await.unwrap().unwrap().unwrap();
    assert_eq!((from, &buf[..n]), (a.public_key(), &b"through the embedded relay"[..]));
    // STUN on the same port, UDP.
    use wiremesh_core::stun;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut req = [0u8; stun::BINDING_REQUEST_LEN];
    stun::encode_binding_request(&[1; 12], &mut req).unwrap();
    sock.send_to(&req, relay_addr).await.unwrap();
    let mut r = [0u8; 128];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut r)).await.unwrap().unwrap();
    assert_eq!(stun::parse(&r[..n]).unwrap().mapped, Some(sock.local_addr().unwrap()));
}

/// Every map names the relays the server set, in full maps.
#[test]
fn maps_name_the_relays() {
    use wiremesh_daemon::control::db::{Db, Registration};
    use wiremesh_daemon::control::proto::StreamMessage;
    use wiremesh_daemon::control::server::App;
    let (mut db, _) = Db::open_in_memory().unwrap();
    let (auth, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
    for n in 1..=2u8 {
        let reg = Registration {
            auth_key: auth.clone(),
            machine_key: [n; 32],
            node_key: [n + 10; 32],
            hostname: format!("n{n}"),
            endpoints: vec![],
        };
        db.register(&reg).unwrap();
    }
    // The first node streams its map from this replica (the second is offline).
    let first = db.nodes().unwrap()[0].id;
    db.set_presence(first, 1).unwrap();
    let app = App::new(db, [0; 32], Duration::from_secs(1));
    let snap = app.snapshot();
    let id = snap.nodes[0].id;
    let parse = |body: String| {
        let line = format!("{{\"map\":{{\"version\":1,{body}}}}}");
        let StreamMessage::Map(m) = serde_json::from_str(&line).unwrap() else { panic!("not a map") };
        m
    };
    assert!(parse(app.map_body(&snap, id).unwrap()).relays.is_empty());
    // This replica's relay, recorded with the address other replicas'
    // nodes would use, is named with no host (the control server's own).
    app.set_relay(8444, Some("192.0.2.10:8444".into())).unwrap();
    app.publish();
    let snap = app.snapshot();
    let relays = parse(app.map_body(&snap, id).unwrap()).relays;
    assert_eq!(relays.len(), 1, "{relays:?}");
    assert!(relays[0].id.is_some());
    assert_eq!((relays[0].host.as_deref(), relays[0].port, relays[0].fingerprint.as_deref()), (None, 8444, None));
    // Relays run elsewhere follow this replica's own, in the order given.
    let far = wiremesh_daemon::control::proto::RelayInfo::from_url(&format!(
        "relay://relay.example:3340#sha256={}",
        "cd".repeat(32)
    ))
    .unwrap();
    app.set_other_relays(vec![far.clone()]);
    app.publish();
    let listed = parse(app.map_body(&app.snapshot(), id).unwrap()).relays;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!((&listed[0], &listed[1]), (&relays[0], &far));
    // Its home relay is this replica's; an offline node has none.
    let home = |n: i64| snap.nodes.iter().find(|x| x.id == n).unwrap().relay.clone();
    assert_eq!(home(first), relays[0].id);
    let other = snap.nodes.iter().find(|x| x.id != first).unwrap().id;
    assert_eq!(home(other), None);
}

/// `wiremesh relay stats ARGS --control URL [--admin-token TOKEN]`.
fn relay_stats(server: &control_server::Server, args: &[&str]) -> std::process::Output {
    let url = server.url.to_string();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wiremesh"));
    cmd.args(["relay", "stats", "--control", &url]).args(args).env_remove("WIREMESH_ADMIN_TOKEN");
    cmd.output().unwrap()
}

fn stdout_of(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// `wiremesh relay stats --json` as a JSON object, checked to carry exactly
/// the documented fields.
fn stats_json(server: &control_server::Server) -> serde_json::Map<String, serde_json::Value> {
    let token = server.token.clone().unwrap();
    let text = stdout_of(&relay_stats(server, &["--json", "--admin-token", &token]));
    let serde_json::Value::Object(m) = serde_json::from_str(&text).unwrap() else { panic!("not an object: {text}") };
    let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = [
        "listen",
        "clients",
        "accepted",
        "auth_failed",
        "malformed",
        "forwarded",
        "forwarded_bytes",
        "no_peer",
        "rate_limited",
        "queue_full",
        "stun_answered",
    ];
    want.sort_unstable();
    assert_eq!(keys, want, "{text}");
    m
}

fn field(m: &serde_json::Map<String, serde_json::Value>, name: &str) -> u64 {
    m[name].as_u64().unwrap_or_else(|| panic!("{name} is not a number: {m:?}"))
}

/// The embedded relay's counters through the admin API and the CLI: the
/// address it listens on, the clients connected, the frames forwarded
/// between two of them; refused without the admin token.
#[test]
fn admins_read_the_embedded_relays_counters() {
    let state = control_server::state_dir("relay-stats");
    let server = control_server::start(&state);
    let before = stats_json(&server);
    let listen: SocketAddr = before["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(listen.port(), server.url.port, "the relay has a port of its own");
    assert_eq!((field(&before, "clients"), field(&before, "forwarded")), (0, 0));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fp = server.url.fingerprint;
    let (a, b) = (key(), key());
    let (mut a_tx, mut a_rx) = rt.block_on(client::connect(listen, fp, &a)).unwrap();
    let (mut b_tx, mut b_rx) = rt.block_on(client::connect(listen, fp, &b)).unwrap();
    // Three frames one way, two the other, each received before counting.
    let sizes = [1usize, 148, 1452, 32, MAX_PAYLOAD];
    let mut bytes = 0u64;
    rt.block_on(async {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        for (i, &len) in sizes.iter().enumerate() {
            let payload = vec![i as u8; len];
            let (tx, rx, to, from) =
                if i < 3 { (&mut a_tx, &mut b_rx, &b, &a) } else { (&mut b_tx, &mut a_rx, &a, &b) };
            tx.send(&to.public_key(), &payload).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv(&mut buf)).await.unwrap().unwrap().unwrap();
            assert_eq!((got.0, &buf[..got.1]), (from.public_key(), &payload[..]));
            bytes += len as u64;
        }
    });
    let after = stats_json(&server);
    assert_eq!(after["listen"], before["listen"]);
    assert_eq!(field(&after, "clients"), 2, "{after:?}");
    assert_eq!(field(&after, "accepted"), 2, "{after:?}");
    assert_eq!(field(&after, "forwarded"), sizes.len() as u64, "{after:?}");
    assert_eq!(field(&after, "forwarded_bytes"), bytes, "{after:?}");
    for zero in ["auth_failed", "malformed", "no_peer", "rate_limited", "queue_full", "stun_answered"] {
        assert_eq!(field(&after, zero), 0, "{zero}: {after:?}");
    }

    // The text form: one `name: value` line per counter, the same values.
    let token = server.token.clone().unwrap();
    let text = stdout_of(&relay_stats(&server, &["--admin-token", &token]));
    let lines: std::collections::HashMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim(), v.trim())).collect();
    assert_eq!(lines.len(), 11, "{text}");
    for (name, value) in &after {
        let want = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
        assert_eq!(lines.get(name.as_str()).copied(), Some(want.as_str()), "{name} in {text}");
    }

    // A client leaving is seen at once in the count.
    drop((b_tx, b_rx));
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&stats_json(&server), "clients") != 1 {
        assert!(Instant::now() < deadline, "the closed client is still counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Without the admin token, or with a wrong one: 401, no counters.
    let api = api_client(&server);
    let path = format!("{}/admin/relay", wiremesh_daemon::control::proto::API);
    for bearer in [None, Some("not-the-token")] {
        let r = rt.block_on(api.json::<serde_json::Value>(hyper::Method::GET, &path, None::<&()>, bearer));
        match r {
            Err(ClientError::Api { status: 401, body }) => assert_eq!(body.code, "unauthorized"),
            other => panic!("{bearer:?}: {other:?}"),
        }
    }
    let out = relay_stats(&server, &["--admin-token", "not-the-token"]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"), "{}", String::from_utf8_lossy(&out.stderr));
    // Only GET.
    let r = rt.block_on(api.json::<serde_json::Value>(hyper::Method::POST, &path, None::<&()>, Some(&token)));
    assert!(matches!(r, Err(ClientError::Api { status: 405, .. })), "{r:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}

/// With `--relay off` the route answers 404 `no_relay`, and the CLI says so.
#[test]
fn relay_stats_without_a_relay_is_404() {
    let state = control_server::state_dir("relay-stats-off");
    let server = control_server::start_with(&state, &["--relay", "off"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let api = api_client(&server);
    let path = format!("{}/admin/relay", wiremesh_daemon::control::proto::API);
    let r = rt.block_on(api.json::<serde_json::Value>(hyper::Method::GET, &path, None::<&()>, server.token.as_deref()));
    match r {
        Err(ClientError::Api { status: 404, body }) => assert_eq!(body.code, "no_relay"),
        other => panic!("{other:?}"),
    }
    // The token is still checked first: nothing about the relay leaks.
    let r = rt.block_on(api.json::<serde_json::Value>(hyper::Method::GET, &path, None::<&()>, None));
    assert!(matches!(r, Err(ClientError::Api { status: 401, .. })), "{r:?}");
    let token = server.token.clone().unwrap();
    let out = relay_stats(&server, &["--json", "--admin-token", &token]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(err.contains("no_relay") && err.contains("HTTP 404"), "{err}");
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}

fn api_client(server: &control_server::Server) -> wiremesh_daemon::control::client::Client {
    wiremesh_daemon::control::client::Client::new(server.url.clone())
}
