//! `wiremeshd interface <ifname> --userspace` without root: run as an
//! unprivileged user (`nobody` through setpriv when the test runs as root,
//! as the test's own user otherwise), with no TUN device and no namespace.
//! Its peer is a netstack inside this test process, over loopback UDP; the
//! SOCKS5 proxy and a port forward carry TCP both ways.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremesh_core::keys::PrivateKey;
use wiremesh_dataplane::netstack::{Netstack, Options};
use wiremesh_dataplane::uapi::{parse_set, DeviceConfig};

const WIREMESHD: &str = env!("CARGO_BIN_EXE_wiremeshd");
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
    let mut child = cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
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
        let line = line_rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no start: {log:?}"));
        let up = line.contains("(userspace)");
        log.push(line);
        if up {
            break;
        }
    }
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
