//! Two userspace nodes in one process, talking through the tunnel over
//! loopback UDP: no root, no TUN.

use rand::{RngCore, SeedableRng};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_dataplane::netstack::{Netstack, Options};
use wiremesh_dataplane::uapi::{parse_set, DeviceConfig, Request};

mod support;
use support::hex;

const A4: &str = "100.64.0.1";
const B4: &str = "100.64.0.2";
const A6: &str = "fd7a:115c:a1e0::1";
const B6: &str = "fd7a:115c:a1e0::2";

struct Node {
    stack: Netstack,
    key: PublicKey,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stack.shutdown();
    }
}

fn node(v4: &str, v6: &str, seed: u64) -> (Node, PrivateKey) {
    let private = PrivateKey::generate(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut config = DeviceConfig::default();
    config.apply(&parse_set(&format!("private_key={}\n", hex(&private.to_bytes()))).unwrap()).unwrap();
    let opts = Options { addresses: vec![(v4.parse().unwrap(), 10), (v6.parse().unwrap(), 48)], ..Options::default() };
    let stack = Netstack::start(config, opts).unwrap();
    (Node { stack, key: private.public_key() }, private)
}

fn add_peer(node: &Node, peer: &Node, v4: &str, v6: &str) {
    let body = format!(
        "public_key={}\nendpoint=127.0.0.1:{}\nallowed_ip={v4}/32\nallowed_ip={v6}/128\n",
        hex(&peer.key.0),
        peer.stack.listen_port()
    );
    let resp = node.stack.control().uapi(Request::Set(parse_set(&body).unwrap()));
    assert!(String::from_utf8_lossy(resp.as_bytes()).starts_with("errno=0"));
}

/// Two nodes that know each other, A at .1 and B at .2.
fn pair(seed: u64) -> (Node, Node) {
    let (a, _) = node(A4, A6, seed);
    let (b, _) = node(B4, B6, seed + 1000);
    add_peer(&a, &b, B4, B6);
    add_peer(&b, &a, A4, A6);
    (a, b)
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// FNV-1a over a byte stream, fed in pieces.
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

async fn echo_server(listener: wiremesh_dataplane::netstack::TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_of_50_mb_keeps_every_byte() {
    let (a, b) = pair(1);
    let listener = b.stack.listen_tcp(7).unwrap();
    let server = tokio::spawn(echo_server(listener));
    let stream =
        tokio::time::timeout(Duration::from_secs(10), a.stack.connect_tcp(addr(B4, 7))).await.unwrap().unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    const TOTAL: usize = 50 << 20;
    let writer = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut sum = Checksum::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            let n = chunk.len().min(TOTAL - sent);
            rng.fill_bytes(&mut chunk[..n]);
            sum.update(&chunk[..n]);
            w.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        w.shutdown().await.unwrap();
        (sum.0, w)
    });
    let started = std::time::Instant::now();
    let mut sum = Checksum::new();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await.expect("echo stalled").unwrap();
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        got += n;
    }
    let (sent_sum, _w) = writer.await.unwrap();
    assert_eq!(got, TOTAL, "bytes echoed");
    assert_eq!(sum.0, sent_sum, "checksum of the echoed stream");
    eprintln!("50 MiB echoed in {:?}", started.elapsed());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_round_trips_both_families() {
    let (a, b) = pair(2);
    let server = b.stack.bind_udp(5353).unwrap();
    let b_key = b.key;
    let a_key = a.key;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            // Each datagram's sender is known by its key.
            assert_eq!(server.peer_of(from).map(|p| p.public_key), Some(a_key));
            server.send_to(&buf[..n], from).await.unwrap();
        }
    });
    let client = a.stack.bind_udp(0).unwrap();
    assert_ne!(client.port(), 0);
    let mut buf = vec![0u8; 2048];
    for (i, target) in [B4, B6].iter().cycle().take(200).enumerate() {
        let msg: Vec<u8> = (0..(i * 7 % 1200 + 1)).map(|k| (k + i) as u8).collect();
        // The first datagrams wait for the handshake; later ones answer at once.
        let mut answered = None;
        for _ in 0..20 {
            client.send_to(&msg, addr(target, 5353)).await.unwrap();
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await {
                answered = Some(r.unwrap());
                break;
            }
        }
        let (n, from) = answered.expect("no UDP answer");
        assert_eq!(&buf[..n], &msg[..]);
        assert_eq!(from, addr(target, 5353));
        assert_eq!(client.peer_of(from).map(|p| p.public_key), Some(b_key));
    }
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    let (a, b) = pair(3);
    let listener = b.stack.listen_tcp(9000).unwrap();
    let server = tokio::spawn(echo_server(listener));
    // Open all of them first, then talk on all of them at once.
    let mut connects = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let stack = a.stack.clone();
        let target = if i % 2 == 0 { B4 } else { B6 };
        connects.spawn(async move { (i, stack.connect_tcp(addr(target, 9000)).await) });
    }
    let mut streams = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(30), connects.join_next()).await.unwrap() {
        let (i, s) = r.unwrap();
        streams.push((i, s.unwrap_or_else(|e| panic!("connection {i}: {e}"))));
    }
    assert_eq!(streams.len(), 1000);
    let mut talks = tokio::task::JoinSet::new();
    for (i, mut s) in streams {
        talks.spawn(async move {
            let msg = format!("connection {i} says hello");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg.as_bytes());
            s
        });
    }
    let mut open = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(30), talks.join_next()).await.unwrap() {
        open.push(r.unwrap());
    }
    // Every local port distinct while all are open.
    let mut ports: Vec<u16> = open.iter().map(|s| s.local_addr().port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 1000);
    drop(open);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_when_nothing_listens() {
    let (a, b) = pair(4);
    // Something listens on another port, to be sure the tunnel works.
    let listener = b.stack.listen_tcp(81).unwrap();
    let ok = tokio::time::timeout(Duration::from_secs(10), a.stack.connect_tcp(addr(B4, 81))).await.unwrap();
    assert!(ok.is_ok());
    drop(listener);
    for target in [B4, B6] {
        let err = tokio::time::timeout(Duration::from_secs(10), a.stack.connect_tcp(addr(target, 80)))
            .await
            .expect("a RST should answer at once")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    }
    // The listener's port refuses too once it is dropped.
    let err = a.stack.connect_tcp(addr(B4, 81)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_and_reset() {
    let (a, b) = pair(5);
    let listener = b.stack.listen_tcp(8080).unwrap();

    // Clean close both ways: each side reads everything, then EOF.
    let mut client = a.stack.connect_tcp(addr(B4, 8080)).await.unwrap();
    let (mut server, from) = listener.accept().await.unwrap();
    assert_eq!(from, client.local_addr());
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    server.write_all(b"response").await.unwrap();
    drop(server);
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"response");
    // Writing after the peer closed and we shut down fails cleanly.
    assert!(client.write_all(b"more").await.is_err());
    drop(client);

    // Reset: the client aborts; the server's read fails with a reset.
    let client = a.stack.connect_tcp(addr(B6, 8080)).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    client.abort();
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(10), server.read(&mut buf)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    let err = server.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);

    // Reset the other way, with data in flight: the client sees the reset.
    let mut client = a.stack.connect_tcp(addr(B4, 8080)).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.write_all(b"unread").await.unwrap();
    server.abort();
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_of_names_the_key_that_sent_the_packets() {
    let (a, b) = pair(6);
    let (c, _) = node("100.64.0.3", "fd7a:115c:a1e0::3", 6006);
    add_peer(&b, &c, "100.64.0.3", "fd7a:115c:a1e0::3");
    add_peer(&c, &b, B4, B6);
    let listener = b.stack.listen_tcp(443).unwrap();
    for (who, target) in [(&a, B4), (&c, B6), (&a, B6), (&c, B4)] {
        let s = who.stack.connect_tcp(addr(target, 443)).await.unwrap();
        let (conn, from) = listener.accept().await.unwrap();
        let peer = conn.peer().expect("a known peer");
        assert_eq!(peer.public_key, who.key);
        assert_eq!(peer.address, from.ip());
        assert_eq!(b.stack.peer_of(from.ip()), Some(peer));
        // And from the other side.
        assert_eq!(s.peer().map(|p| p.public_key), Some(b.key));
        drop(s);
    }
    // An address no peer holds belongs to nobody.
    assert_eq!(b.stack.peer_of("100.64.0.99".parse::<IpAddr>().unwrap()), None);
    assert_ne!(a.key, c.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_filter_applies_to_the_netstack() {
    use wiremesh_core::filter::{Filter, PortRange, Prefix, Rule};
    let (a, b) = pair(7);
    let _open = b.stack.listen_tcp(443).unwrap();
    let _closed = b.stack.listen_tcp(22).unwrap();
    // B accepts only TCP 443 from A's IPv4 address (replies to B's own flows pass).
    let rule = Rule {
        sources: vec![Prefix::host(A4.parse().unwrap())],
        destinations: vec![Prefix::new("0.0.0.0".parse().unwrap(), 0).unwrap()],
        protocols: vec![6],
        ports: vec![PortRange::single(443)],
    };
    assert!(b.stack.control().set_filter(Some(Filter::new(vec![rule]))));
    let ok = tokio::time::timeout(Duration::from_secs(10), a.stack.connect_tcp(addr(B4, 443))).await.unwrap();
    assert!(ok.is_ok());
    // Port 22 listens, but the filter drops the SYN: no answer at all.
    let blocked = tokio::time::timeout(Duration::from_millis(1500), a.stack.connect_tcp(addr(B4, 22))).await;
    assert!(blocked.is_err(), "a filtered SYN got an answer");
    // Lifting the filter lets it through.
    assert!(b.stack.control().set_filter(None));
    let ok = tokio::time::timeout(Duration::from_secs(10), a.stack.connect_tcp(addr(B4, 22))).await.unwrap();
    assert!(ok.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_socket_and_the_peer_sees_resets() {
    let (a, b) = pair(8);
    let listener = b.stack.listen_tcp(8443).unwrap();
    let mut client = a.stack.connect_tcp(addr(B4, 8443)).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let udp = b.stack.bind_udp(9999).unwrap();
    // Tasks waiting on B's sockets when it shuts down.
    let reading = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        server.read(&mut buf).await
    });
    let receiving = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        udp.recv_from(&mut buf).await
    });
    let accepting = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.stack.shutdown();
    let wait = Duration::from_secs(5);
    let err = tokio::time::timeout(wait, reading).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    let err = tokio::time::timeout(wait, receiving).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotConnected);
    let err = tokio::time::timeout(wait, accepting).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotConnected);
    assert_eq!(b.stack.listen_tcp(8444).unwrap_err().kind(), ErrorKind::NotConnected);
    assert_eq!(b.stack.connect_tcp(addr(A4, 1)).await.unwrap_err().kind(), ErrorKind::NotConnected);
    // The RST went out before the worker stopped: A's side is reset too.
    let mut buf = [0u8; 8];
    let err = tokio::time::timeout(wait, client.read(&mut buf)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}
