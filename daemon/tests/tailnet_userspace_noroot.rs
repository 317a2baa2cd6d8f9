//! `wiremeshd interface <ifname> --userspace` without root: run as an
//! unprivileged user (`nobody` through setpriv when the test runs as root,
//! as the test's own user otherwise), with no TUN device and no namespace.
//! Its peer is a netstack inside this test process, over loopback UDP; the
//! SOCKS5 proxy (CONNECT and UDP ASSOCIATE) and a port forward carry
//! traffic both ways.
//!
//! Also `wiremeshd node --userspace` with neither `--state` nor `--socket`,
//! unprivileged, against a control server on loopback: it keeps to the
//! user's XDG directories, and `wiremesh status` run by the same user finds
//! its socket without flags.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremesh_core::keys::PrivateKey;
use wiremesh_dataplane::netstack::{Netstack, Options};
use wiremesh_dataplane::uapi::{parse_set, DeviceConfig};

#[path = "support/control.rs"]
mod control_server;

const WIREMESHD: &str = env!("CARGO_BIN_EXE_wiremeshd");
const WIREMESH: &str = env!("CARGO_BIN_EXE_wiremesh");
const PEER: &str = "10.97.0.1";
const NODE: &str = "10.97.0.2";

fn b64(bytes: &[u8; 32]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn random_key() -> PrivateKey {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    PrivateKey::from_bytes(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A SOCKS5 CONNECT to `target` through the proxy at `proxy`.
fn socks5_connect(proxy: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&[5, 1, 0])?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r)?;
    assert_eq!(r, [5, 0]);
    let SocketAddr::V4(t) = target else { panic!("IPv4 only here") };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(std::io::Error::other(format!("SOCKS5 reply {}", reply[1])));
    }
    Ok(s)
}

/// Sends three datagrams of different sizes to `target` through a SOCKS5
/// UDP ASSOCIATE at `proxy`; returns how many came back whole, each with
/// the SOCKS5 header naming `target` as the sender.
fn socks5_udp_echo(proxy: SocketAddr, target: SocketAddr) -> usize {
    let mut control = TcpStream::connect(proxy).unwrap();
    control.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    control.write_all(&[5, 1, 0]).unwrap();
    let mut r = [0u8; 2];
    control.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0]);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // The request names the address the datagrams will come from.
    let mut req = vec![5, 3, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&udp.local_addr().unwrap().port().to_be_bytes());
    control.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], [5, 0, 0, 1], "UDP ASSOCIATE refused");
    let relay = SocketAddr::from(([reply[4], reply[5], reply[6], reply[7]], u16::from_be_bytes([reply[8], reply[9]])));
    let SocketAddr::V4(t) = target else { panic!("IPv4 only here") };
    let mut header = vec![0, 0, 0, 1];
    header.extend_from_slice(&t.ip().octets());
    header.extend_from_slice(&t.port().to_be_bytes());
    udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    // A datagram from another port than the request named is dropped: were
    // it taken, it would fix the association to that port and the client's
    // own echoes below would go there.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut probe = header.clone();
    probe.extend_from_slice(b"stranger");
    stranger.send_to(&probe, relay).unwrap();
    assert!(stranger.recv_from(&mut [0u8; 64]).is_err(), "a stranger's datagram was relayed");
    let mut whole = 0;
    for size in [1usize, 512, 1200] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        let mut datagram = header.clone();
        datagram.extend_from_slice(&payload);
        // UDP may lose a datagram: a few tries each.
        for _ in 0..10 {
            udp.send_to(&datagram, relay).unwrap();
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                assert_eq!(from, relay);
                assert_eq!(&buf[..n], &datagram[..], "header naming the sender, then the payload");
                whole += 1;
                break;
            }
        }
    }
    whole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_interface_runs_unprivileged_and_proxies_both_ways() {
    let (peer_key, node_key) = (random_key(), random_key());
    // The peer: a netstack in this process.
    let mut config = DeviceConfig::default();
    config.apply(&parse_set(&format!("private_key={}\n", hex(&peer_key.to_bytes()))).unwrap()).unwrap();
    let peer = Netstack::start(config, Options { addresses: vec![(PEER.parse().unwrap(), 24)], ..Options::default() })
        .unwrap();
    let node_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let set =
        format!("public_key={}\nendpoint=127.0.0.1:{node_port}\nallowed_ip={NODE}/32\n", hex(&node_key.public_key().0));
    assert!(peer
        .control()
        .uapi(wiremesh_dataplane::uapi::Request::Set(parse_set(&set).unwrap()))
        .as_bytes()
        .starts_with(b"errno=0"));

    // The node: wiremeshd, unprivileged, with a wg setconf file.
    let dir = std::env::temp_dir().join(format!("wiremesh-noroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("node.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {node_port}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = {PEER}/32\nEndpoint = 127.0.0.1:{}\n",
            b64(&node_key.to_bytes()),
            b64(&peer_key.public_key().0),
            peer.listen_port()
        ),
    )
    .unwrap();
    let (socks_port, local_port) = (free_port(), free_port());
    let local_app = TcpListener::bind(("127.0.0.1", local_port)).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let ifname = format!("wmnr{}", std::process::id() % 100_000);
    let socks = format!("127.0.0.1:{socks_port}");
    let forward = format!("tcp:8080=127.0.0.1:{local_port}");
    let args = [
        "interface",
        ifname.as_str(),
        "--foreground",
        "--config",
        conf.to_str().unwrap(),
        "--userspace",
        "--address",
        "10.97.0.2/24",
        "--socks5",
        &socks,
        "--forward",
        &forward,
    ];
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", WIREMESHD]);
        c
    } else {
        Command::new(WIREMESHD)
    };
    let child = cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (daemon, _lines, log) = follow_until(child, "(userspace)", "no start");
    // Unprivileged for real: the process runs as nobody (when we are root).
    if root {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id())).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
        assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "{uid}");
    }

    // Out of the node: SOCKS5 to an echo service on the in-process peer.
    let echo = peer.listen_tcp(7).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy: SocketAddr = socks.parse().unwrap();
    let echoed = tokio::task::spawn_blocking(move || {
        let mut s = socks5_connect(proxy, format!("{PEER}:7").parse().unwrap()).unwrap();
        let msg = vec![0x5au8; 300_000];
        let writer = {
            let mut w = s.try_clone().unwrap();
            let msg = msg.clone();
            std::thread::spawn(move || w.write_all(&msg).unwrap())
        };
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        got == msg
    })
    .await
    .unwrap();
    assert!(echoed, "{log:?}");
    // Nothing listens on port 9 of the peer: the proxy reports the refusal (reply 5).
    let err = tokio::task::spawn_blocking(move || socks5_connect(proxy, format!("{PEER}:9").parse().unwrap()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("reply 5"), "{err}");

    // UDP through the proxy (UDP ASSOCIATE) to an echo service on the peer.
    let udp_echo = peer.bind_udp(7).unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf).await {
            let _ = udp_echo.send_to(&buf[..n], from).await;
        }
    });
    let echoes = tokio::task::spawn_blocking(move || socks5_udp_echo(proxy, format!("{PEER}:7").parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(echoes, 3, "{log:?}");

    // Into the node: the peer connects to the node's tailnet port 8080,
    // forwarded to the local app.
    let app = std::thread::spawn(move || {
        let (mut s, _) = local_app.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong:").unwrap();
        s.write_all(&buf).unwrap();
    });
    let mut s =
        tokio::time::timeout(Duration::from_secs(10), peer.connect_tcp(format!("{NODE}:8080").parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"pong:hello");
    app.join().unwrap();
    assert_eq!(peer.peer_of(NODE.parse().unwrap()).map(|p| p.public_key), Some(node_key.public_key()));

    drop(daemon);
    peer.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The uid the unprivileged processes run as: nobody when the test runs as
/// root, the test's own user otherwise.
fn unprivileged_uid() -> Option<u32> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } == 0).then_some(65534)
}

/// `program args` as the unprivileged user, with `env` and without the XDG
/// variables of the test's own environment.
fn unprivileged(program: &str, args: &[&str], env: &[(&str, &std::path::Path)]) -> Command {
    let mut c = match unprivileged_uid() {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            let uid = uid.to_string();
            c.args(["--reuid", &uid, "--regid", &uid, "--clear-groups", program]);
            c
        }
        None => Command::new(program),
    };
    c.args(args).env_remove("XDG_STATE_HOME").env_remove("XDG_RUNTIME_DIR").env_remove("HOME");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// A directory the unprivileged user owns.
fn owned_dir(path: &std::path::Path) {
    std::fs::create_dir_all(path).unwrap();
    if let Some(uid) = unprivileged_uid() {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, uid) }, 0, "chown {}", path.display());
    }
}

/// Runs `wiremeshd node --userspace` without `--state` and `--socket` in
/// environment `env` until it has its map; checks the state and socket
/// are where `state` and `socket` say, and that `wiremesh status` run the
/// same way (no `--socket`) reaches the agent.
fn node_keeps_to(
    server: &control_server::Server,
    key: &str,
    name: &str,
    env: &[(&str, &std::path::Path)],
    state: &std::path::Path,
    socket: &std::path::Path,
) {
    let url = server.url.to_string();
    let child = unprivileged(
        WIREMESHD,
        &["node", "--control", &url, "--auth-key", key, "--hostname", name, "--userspace"],
        env,
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (daemon, _lines, log) = follow_until(child, "map stream open", "no map");
    // The keys are in the user's state directory, private to the user.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let keys: Vec<_> = std::fs::read_dir(state).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(keys.len() >= 2, "{}: {keys:?} {log:?}", state.display());
    let meta = std::fs::metadata(state).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{}", state.display());
    if let Some(uid) = unprivileged_uid() {
        assert_eq!(meta.uid(), uid);
    }
    // The socket is there (the agent makes it before it asks for a map).
    let mut tries = 0;
    while !socket.exists() && tries < 50 {
        std::thread::sleep(Duration::from_millis(100));
        tries += 1;
    }
    assert!(socket.exists(), "{}: {log:?}", socket.display());
    let out = unprivileged(WIREMESH, &["status", "--json"], env).output().unwrap();
    assert!(out.status.success(), "{} {log:?}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status.to_string().contains(name), "{status}");
    drop(daemon);
}

#[test]
fn node_userspace_without_flags_keeps_to_the_users_dirs() {
    let dir = std::env::temp_dir().join(format!("wiremesh-noroot-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let server = control_server::start(&dir.join("control"));
    let out = Command::new(WIREMESH)
        .args(["keys", "create", "--reusable", "--control", &server.url.to_string(), "--admin-token"])
        .arg(server.token.as_deref().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // XDG_STATE_HOME and XDG_RUNTIME_DIR set: state and socket apart.
    let (home, xdg_state, xdg_run) = (dir.join("home"), dir.join("xdg-state"), dir.join("run-user"));
    for d in [&home, &xdg_state, &xdg_run] {
        owned_dir(d);
    }
    let env = [("HOME", home.as_path()), ("XDG_STATE_HOME", &xdg_state), ("XDG_RUNTIME_DIR", &xdg_run)];
    node_keeps_to(&server, &key, "noroot-xdg", &env, &xdg_state.join("wiremesh"), &xdg_run.join("wiremesh/api.sock"));
    assert!(!home.join(".local").exists(), "HOME was not to be used");

    // Only HOME: both under ~/.local/state/wiremesh.
    let state = home.join(".local/state/wiremesh");
    node_keeps_to(&server, &key, "noroot-home", &[("HOME", &home)], &state, &state.join("api.sock"));

    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads `child`'s stdout and stderr lines into a channel and waits (20 s at
/// most, else panics with `what` and the lines so far) for one containing
/// `marker`; returns the daemon, the channel (keep it: dropped, the readers
/// stop and a full pipe would stall the daemon) and the lines read.
fn follow_until(
    mut child: std::process::Child,
    marker: &str,
    what: &str,
) -> (Daemon, mpsc::Receiver<String>, Vec<String>) {
    let (line_tx, line_rx) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
    ] {
        let tx = line_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let daemon = Daemon(child);
    let mut log = Vec::new();
    loop {
        let line = line_rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what}: {log:?}"));
        let up = line.contains(marker);
        log.push(line);
        if up {
            return (daemon, line_rx, log);
        }
    }
}
