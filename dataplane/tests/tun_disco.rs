//! Path discovery in the TUN worker (needs root and /dev/net/tun; skipped
//! otherwise): two workers on loopback in a fresh network namespace, each
//! given the other's true address only as a disco candidate (the WireGuard
//! endpoint of one is a dead port, the other's is unset), and a STUN server
//! played by the test. Disco must find the direct path over the WireGuard
//! socket, pin it as the endpoint, and the WireGuard handshake must then
//! complete over the same socket; STUN must be answered from that socket.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use wiremesh_core::disco::Path;
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::stun;
use wiremesh_dataplane::driver::{Control, Worker};
use wiremesh_dataplane::tun::{Options, Tun};
use wiremesh_dataplane::uapi::{parse_set, DeviceConfig, Request};

mod support;
use support::*;

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: needs root and /dev/net/tun");
        return false;
    }
    true
}

fn start(name: &str, key: &PrivateKey, peer: &PrivateKey, endpoint: Option<&str>) -> (Control, u16) {
    let tun = Tun::create(name, &Options { nonblocking: true, ..Options::with_offloads() }).unwrap();
    let (worker, control) = Worker::new(tun, DeviceConfig::default()).unwrap();
    let port = worker.listen_port();
    std::thread::spawn(move || worker.run().unwrap());
    let mut body = format!(
        "private_key={}\npublic_key={}\nallowed_ip=10.99.0.0/24\n",
        hex(&key.to_bytes()),
        hex(&peer.public_key().0)
    );
    if let Some(e) = endpoint {
        body.push_str(&format!("endpoint={e}\npersistent_keepalive_interval=1\n"));
    }
    let resp = control.uapi(Request::Set(parse_set(&body).unwrap()));
    assert!(String::from_utf8_lossy(resp.as_bytes()).contains("errno=0"));
    (control, port)
}

/// Runs `f` on a thread of its own in a fresh network namespace with
/// loopback up, and waits for it (its panic is the test's).
fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        assert!(Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap().success());
        f()
    })
    .join()
    .unwrap();
}

#[test]
fn disco_finds_the_path_and_wireguard_uses_it() {
    if !usable() {
        return;
    }
    in_fresh_netns(|| {
        let ka = PrivateKey::from_bytes([0x11; 32]);
        let kb = PrivateKey::from_bytes([0x22; 32]);
        // A's endpoint for B is a port nobody listens on; B has none for A.
        let (a, pa) = start("wmdisco0", &ka, &kb, Some("127.0.0.1:9"));
        let (b, pb) = start("wmdisco1", &kb, &ka, None);
        let (addr_a, addr_b): (SocketAddr, SocketAddr) =
            (format!("127.0.0.1:{pa}").parse().unwrap(), format!("127.0.0.1:{pb}").parse().unwrap());
        // Off by default: no agent, WireGuard alone.
        assert_eq!(a.disco_status(), None);

        let stun_server = UdpSocket::bind("127.0.0.1:0").unwrap();
        stun_server.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let stun = Some(stun_server.local_addr().unwrap());
        let settings = |peer: &PrivateKey, cand, own| settings(&peer.public_key(), cand, own, stun);
        assert!(a.set_disco(Some(settings(&kb, addr_b, addr_a))));
        assert!(b.set_disco(Some(settings(&ka, addr_a, addr_b))));

        // Answer STUN for a while: each request must come from a WireGuard socket.
        let mut from_ports = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 1500];
        while from_ports.len() < 2 && Instant::now() < deadline {
            let Ok((n, from)) = stun_server.recv_from(&mut buf) else { continue };
            let m = stun::parse(&buf[..n]).unwrap();
            let mut out = [0u8; 64];
            let len = stun::encode_binding_response(&m.transaction_id, from, &mut out).unwrap();
            stun_server.send_to(&out[..len], from).unwrap();
            if !from_ports.contains(&from.port()) {
                from_ports.push(from.port());
            }
        }
        from_ports.sort();
        let mut want = vec![pa, pb];
        want.sort();
        assert_eq!(from_ports, want, "STUN requests leave from the WireGuard sockets");

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (sa, sb) = (a.disco_status().unwrap(), b.disco_status().unwrap());
            let text = get(&a);
            let handshake = field(&text, "last_handshake_time_sec").is_some_and(|s| s != "0");
            if sa.paths[0].1 == Some(Path::Direct(addr_b))
                && sb.paths[0].1 == Some(Path::Direct(addr_a))
                && sa.reflexive == Some(addr_a)
                && sb.reflexive == Some(addr_b)
                && field(&text, "endpoint").as_deref() == Some(&addr_b.to_string())
                && handshake
            {
                assert!(sa.stun_answers >= 1 && sa.stats != Default::default());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no direct path with a handshake: a={sa:?} b={sb:?} get(a)={}",
                text.lines().filter(|l| !l.starts_with("private_key")).collect::<Vec<_>>().join(" ")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Turning disco off drops the agent.
        assert!(a.set_disco(None));
        assert_eq!(a.disco_status(), None);
        a.stop();
        b.stop();
    });
}

#[test]
fn without_a_direct_path_the_session_runs_over_the_relay_link_then_moves_direct() {
    if !usable() {
        return;
    }
    in_fresh_netns(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ka = PrivateKey::from_bytes([0x33; 32]);
        let kb = PrivateKey::from_bytes([0x44; 32]);
        // A keeps its session alive (keepalives every second) and has a
        // WireGuard endpoint nobody answers at; B has none.
        let (a, pa) = start("wmrelay0", &ka, &kb, Some("127.0.0.1:9"));
        let (b, pb) = start("wmrelay1", &kb, &ka, None);
        let (addr_a, addr_b): (SocketAddr, SocketAddr) =
            (format!("127.0.0.1:{pa}").parse().unwrap(), format!("127.0.0.1:{pb}").parse().unwrap());
        let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let settings = |peer: &PrivateKey, cand, own| settings(&peer.public_key(), cand, own, None);
        // Every direct candidate is dead, and so are the endpoints each
        // advertises (through the relay, in call-me-maybe): only the relay
        // can carry them.
        assert!(a.set_disco(Some(settings(&kb, dead, dead))));
        assert!(b.set_disco(Some(settings(&ka, dead, dead))));
        let port_a = a.relay_link(64).unwrap();
        let port_b = b.relay_link(64).unwrap();
        let (deliver_a, deliver_b) = (port_a.deliverer(), port_b.deliverer());
        rt.spawn(shuttle(port_a, ka.public_key(), deliver_b, kb.public_key()));
        rt.spawn(shuttle(port_b, kb.public_key(), deliver_a, ka.public_key()));

        let deadline = Instant::now() + Duration::from_secs(15);
        let first_handshake = loop {
            match relayed_session(&a, &b) {
                Ok(handshake) => break handshake,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        };

        // The true addresses become known: both move to the direct path,
        // and the session (its handshake) stays the same.
        assert!(a.set_disco(Some(settings(&kb, addr_b, addr_a))));
        assert!(b.set_disco(Some(settings(&ka, addr_a, addr_b))));
        let deadline = Instant::now() + Duration::from_secs(15);
        while let Err(e) = direct_session(&a, &b, addr_a, addr_b) {
            assert!(Instant::now() < deadline, "{e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Keepalives now cross directly: the relay link's traffic stops
        // growing (beyond what was already queued) while B still receives.
        let before = (a.disco_status().unwrap().relay.unwrap().sent, rx_bytes(&get(&b)));
        std::thread::sleep(Duration::from_millis(2500));
        let after = (a.disco_status().unwrap().relay.unwrap().sent, rx_bytes(&get(&b)));
        assert!(after.1 > before.1, "B receives A's keepalives directly: {before:?} -> {after:?}");
        assert!(after.0 - before.0 <= 2, "traffic left the relay: {before:?} -> {after:?}");
        assert_eq!(
            field(&get(&a), "last_handshake_time_sec").unwrap(),
            first_handshake,
            "the session did not restart when the path changed"
        );
        // Removing the link: no relay path any more, and nothing breaks.
        assert!(a.clear_relay());
        assert_eq!(a.disco_status().unwrap().relay, None);
        a.stop();
        b.stop();
    });
}
