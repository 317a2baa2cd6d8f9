//! Path discovery and the relay in the userspace netstack: two netstacks on
//! loopback UDP (no root), their relay links joined by the test as the relay
//! would join them. With only dead direct candidates the WireGuard session
//! and a TCP connection run over the relay; once the true addresses are
//! known both move to the direct path, with the same handshake and the same
//! TCP connection still carrying bytes.

use rand::{RngCore, SeedableRng};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_dataplane::netstack::{Netstack, Options, TcpStream};
use wiremesh_dataplane::uapi::{parse_set, DeviceConfig};

mod support;
use support::*;

const A4: &str = "100.64.0.1";
const B4: &str = "100.64.0.2";

struct Node {
    stack: Netstack,
    key: PrivateKey,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stack.shutdown();
    }
}

/// A netstack at `v4` whose one peer is `peer` at `peer_v4`; `endpoint`
/// (with a keepalive every second) or none.
fn node(key: PrivateKey, v4: &str, peer: &PublicKey, peer_v4: &str, endpoint: Option<SocketAddr>) -> Node {
    let mut body =
        format!("private_key={}\npublic_key={}\nallowed_ip={peer_v4}/32\n", hex(&key.to_bytes()), hex(&peer.0));
    if let Some(e) = endpoint {
        body.push_str(&format!("endpoint={e}\npersistent_keepalive_interval=1\n"));
    }
    let mut config = DeviceConfig::default();
    config.apply(&parse_set(&body).unwrap()).unwrap();
    let opts = Options { addresses: vec![(v4.parse().unwrap(), 10)], ..Options::default() };
    Node { stack: Netstack::start(config, opts).unwrap(), key }
}

/// Echoes every connection's bytes back.
async fn echo(listener: wiremesh_dataplane::netstack::TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
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
        });
    }
}

/// Sends `len` random bytes through the echo and checks they come back;
/// returns how long that took.
async fn round_trip(stream: &mut TcpStream, len: usize, seed: u64) -> Duration {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let (mut r, mut w) = tokio::io::split(stream);
    let mut back = vec![0u8; len];
    let work = async { tokio::try_join!(w.write_all(&data), r.read_exact(&mut back)).map(|_| ()) };
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), work).await.expect("the echo timed out").unwrap();
    let took = start.elapsed();
    assert!(back == data, "the echo changed the bytes");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_direct_path_the_session_runs_over_the_relay_link_then_moves_direct() {
    // A UDP socket nobody reads: a direct candidate that never answers.
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = hole.local_addr().unwrap();
    let (ka, kb) = (PrivateKey::from_bytes([0x71; 32]), PrivateKey::from_bytes([0x72; 32]));
    let (pa, pb) = (ka.public_key(), kb.public_key());
    // A keeps its session alive with a WireGuard endpoint nobody answers
    // at; B has none.
    let a = node(ka, A4, &pb, B4, Some(dead));
    let b = node(kb, B4, &pa, A4, None);
    let (ca, cb) = (a.stack.control(), b.stack.control());
    let addr_a: SocketAddr = format!("127.0.0.1:{}", a.stack.listen_port()).parse().unwrap();
    let addr_b: SocketAddr = format!("127.0.0.1:{}", b.stack.listen_port()).parse().unwrap();
    assert_eq!(ca.disco_status(), None, "off by default");

    // Every direct candidate is dead, and so are the endpoints each
    // advertises: only the relay can carry them.
    assert!(ca.set_disco(Some(settings(&pb, dead, dead, None))));
    assert!(cb.set_disco(Some(settings(&pa, dead, dead, None))));
    let port_a = ca.relay_link(256).unwrap();
    let port_b = cb.relay_link(256).unwrap();
    let (deliver_a, deliver_b) = (port_a.deliverer(), port_b.deliverer());
    tokio::spawn(shuttle(port_a, a.key.public_key(), deliver_b, pb));
    tokio::spawn(shuttle(port_b, b.key.public_key(), deliver_a, pa));

    let deadline = Instant::now() + Duration::from_secs(15);
    let first_handshake = loop {
        match relayed_session(&ca, &cb) {
            Ok(handshake) => break handshake,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A TCP connection through the netstacks, over the relay.
    let server = tokio::spawn(echo(b.stack.listen_tcp(7).unwrap()));
    let before = ca.disco_status().unwrap().relay.unwrap();
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), a.stack.connect_tcp(format!("{B4}:7").parse().unwrap()))
            .await
            .expect("connect timed out")
            .unwrap();
    let relayed = round_trip(&mut stream, 1 << 20, 1).await;
    let after = ca.disco_status().unwrap().relay.unwrap();
    // 1 MiB each way is at least 720 full datagrams each way.
    assert!(after.sent - before.sent >= 720, "A's data went through the link: {before:?} -> {after:?}");
    assert!(after.received - before.received >= 720, "B's echo came through the link: {before:?} -> {after:?}");
    assert_eq!(field(&get(&ca), "last_handshake_time_sec").unwrap(), first_handshake);

    // The true addresses become known: both move to the direct path.
    assert!(ca.set_disco(Some(settings(&pb, addr_b, addr_a, None))));
    assert!(cb.set_disco(Some(settings(&pa, addr_a, addr_b, None))));
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = direct_session(&ca, &cb, addr_a, addr_b) {
        assert!(Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The same connection carries 1 MiB more, directly: the links stay
    // (nearly) quiet while B's socket receives every datagram.
    let relay_before = (ca.disco_status().unwrap().relay.unwrap(), cb.disco_status().unwrap().relay.unwrap());
    let datagrams = |n: &Node| n.stack.stats().udp_datagrams.load(std::sync::atomic::Ordering::Relaxed);
    let udp_before = datagrams(&b);
    let direct = round_trip(&mut stream, 1 << 20, 2).await;
    let rate = |t: Duration| 2.0 * 8.0 / t.as_secs_f64(); // Mbit/s: 1 MiB each way
    eprintln!(
        "1 MiB echoed over the relay link in {relayed:?} ({:.0} Mbit/s), directly in {direct:?} ({:.0} Mbit/s)",
        rate(relayed),
        rate(direct)
    );
    let relay_after = (ca.disco_status().unwrap().relay.unwrap(), cb.disco_status().unwrap().relay.unwrap());
    let udp_after = datagrams(&b);
    let quiet = |a: u64, b: u64| b - a <= 4;
    assert!(
        quiet(relay_before.0.sent, relay_after.0.sent)
            && quiet(relay_before.1.sent, relay_after.1.sent)
            && quiet(relay_before.1.received, relay_after.1.received),
        "traffic left the relay: {relay_before:?} -> {relay_after:?}"
    );
    // 1 MiB is at least 720 full datagrams; (nearly) none came by the relay.
    assert!(udp_after - udp_before >= 720, "B received the data on its socket: {udp_before} -> {udp_after}");
    assert_eq!(
        field(&get(&ca), "last_handshake_time_sec").unwrap(),
        first_handshake,
        "the session did not restart when the path changed"
    );
    assert_eq!(relay_after.0.send_dropped, 0);

    // Removing the link: no relay path any more, and the direct path holds.
    assert!(ca.clear_relay());
    assert_eq!(ca.disco_status().unwrap().relay, None);
    round_trip(&mut stream, 64 * 1024, 3).await;
    drop(stream);
    server.abort();
    drop(hole);
}
