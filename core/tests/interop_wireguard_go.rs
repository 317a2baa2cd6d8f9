//! Interop of `wiremesh-core` with a real wireguard-go, before any TUN code:
//! wireguard-go runs in a network namespace this test creates; across a
//! veth pair the test drives a `Device` over a plain UDP socket.
//!
//! * core initiates: handshake, an ICMP echo request sealed by the core to
//!   wireguard-go's tunnel address, and the echo reply that the kernel
//!   behind wireguard-go's TUN sends back, decrypted by the core.
//! * wireguard-go initiates: `ping` inside the namespace makes wireguard-go
//!   send an initiation; the core answers, decrypts the echo request and
//!   seals the echo reply, and `ping` must see it.
//!
//! Both against Debian's wireguard-go 0.0.20220316 and bookworm-backports'
//! 0.0.20231211, over IPv4 and IPv6 underlays. Skips outside CI where it
//! cannot run (not root, no netns); fails in CI.

#[path = "../../testsupport/netns.rs"]
mod netns;

use netns::{veth_pair, Netns, Subnet, WgGoVersion, WireguardGo};
use rand::SeedableRng;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wiremesh_core::crypto::{CryptoProvider, DefaultProvider, Portable};
use wiremesh_core::device::{DeviceConfig, Encapsulated, PeerConfig, Received, HEADROOM, TAILROOM};
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_core::{Instant, WallTime};

type Device<P> = wiremesh_core::device::Device<rand::rngs::StdRng, P>;

const CORE_TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const WG_TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

struct Clock(std::time::Instant);

impl Clock {
    fn now(&self) -> Instant {
        Instant::from_duration(self.0.elapsed())
    }
    fn wall() -> WallTime {
        WallTime::from_unix(SystemTime::now().duration_since(UNIX_EPOCH).unwrap())
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo (type 8 request, 0 reply).
fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = 20 + icmp.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}

struct Side<P: CryptoProvider> {
    device: Device<P>,
    socket: UdpSocket,
    clock: Clock,
    buf: Vec<u8>,
}

impl<P: CryptoProvider> Side<P> {
    fn new(bind: SocketAddr, key: PrivateKey, peer: PublicKey, endpoint: SocketAddr) -> Self {
        let clock = Clock(std::time::Instant::now());
        let socket = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let rng = rand::rngs::StdRng::from_entropy();
        let mut device = Device::<P>::new(key, rng, DeviceConfig::default(), clock.now(), Clock::wall());
        let mut pc = PeerConfig::new(peer);
        pc.endpoint = Some(endpoint);
        pc.allowed_ips = vec![(IpAddr::V4(WG_TUN_IP), 32)];
        device.add_peer(pc, clock.now()).unwrap();
        Side { device, socket, clock, buf: vec![0u8; 65536] }
    }

    /// Sends every pending datagram.
    fn flush(&mut self) {
        loop {
            let now = self.clock.now();
            match self.device.poll_transmit(now, &mut self.buf).unwrap() {
                Some(t) => {
                    self.socket.send_to(&self.buf[..t.len], t.destination).unwrap();
                }
                None => break,
            }
        }
    }

    fn send_packet(&mut self, packet: &[u8]) {
        let mut b = vec![0u8; HEADROOM + packet.len() + TAILROOM];
        b[HEADROOM..HEADROOM + packet.len()].copy_from_slice(packet);
        let now = self.clock.now();
        match self.device.encapsulate(&mut b, packet.len(), now).unwrap() {
            Encapsulated::Ready(t) => {
                self.socket.send_to(&b[..t.len], t.destination).unwrap();
            }
            Encapsulated::Staged { .. } => {}
        }
        self.flush();
    }

    /// Runs the device until `f` returns true for a received IP packet, or
    /// `timeout` passes. Returns that packet.
    fn pump_until(&mut self, timeout: Duration, mut f: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let end = std::time::Instant::now() + timeout;
        let mut rx = vec![0u8; 65536];
        while std::time::Instant::now() < end {
            let now = self.clock.now();
            if self.device.poll_timeout().is_some_and(|t| t <= now) {
                self.device.handle_timeout(now);
                self.flush();
            }
            let (n, from) = match self.socket.recv_from(&mut rx) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => panic!("recv: {e}"),
            };
            let now = self.clock.now();
            let r = self.device.handle_datagram(from, &mut rx[..n], now);
            self.flush();
            if let Ok(Received::Packet { range, .. }) = r {
                let p = rx[range].to_vec();
                if f(&p) {
                    return Some(p);
                }
            }
        }
        None
    }
}

struct Setup {
    _ns: Netns,
    _veth: netns::VethPair,
    wg: WireguardGo,
    core_bind: SocketAddr,
    wg_endpoint: SocketAddr,
    key: PrivateKey,
}

fn setup(version: WgGoVersion, ipv6: bool) -> Setup {
    let ns = Netns::new();
    let net = Subnet::next();
    let (a, b) = if ipv6 { (net.v6_cidr(1), net.v6_cidr(2)) } else { (net.v4_cidr(1), net.v4_cidr(2)) };
    let veth = veth_pair(&ns, &a, None, &b);
    if ipv6 {
        // Let duplicate address detection finish so the addresses are usable.
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..50 {
            let out = netns::host_exec(&["ip", "-6", "addr", "show", "dev", &veth.b_if, "tentative"]);
            let in_ns = ns.exec(&["ip", "-6", "addr", "show", "dev", &veth.a_if, "tentative"]);
            if out.stdout.is_empty() && in_ns.stdout.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let wg = WireguardGo::start(&ns, version, 51820);
    let key = PrivateKey::generate(&mut rand::rngs::OsRng);
    let our_pub = netns::b64_encode_32(&key.public_key().0);
    let core_bind = SocketAddr::new(veth.b_ip.parse().unwrap(), 0);
    // Bind first to learn the port, then tell wireguard-go where we are.
    let probe = UdpSocket::bind(core_bind).unwrap();
    let core_bind = probe.local_addr().unwrap();
    drop(probe);
    let wg_endpoint = SocketAddr::new(veth.a_ip.parse().unwrap(), 51820);
    wg.add_peer(&our_pub, &format!("{CORE_TUN_IP}/32"), Some(&core_bind.to_string()), None);
    wg.up(&format!("{WG_TUN_IP}/24"));
    Setup { _ns: ns, _veth: veth, wg, core_bind, wg_endpoint, key }
}

fn core_initiates<P: CryptoProvider>(name: &str, version: WgGoVersion, ipv6: bool) {
    if netns::require_wireguard_go_or_skip(name, version).is_none() {
        return;
    }
    let s = setup(version, ipv6);
    let wg_pub = PublicKey(netns::b64_decode_32(&s.wg.public_key).unwrap());
    let mut side = Side::<P>::new(s.core_bind, s.key.clone(), wg_pub, s.wg_endpoint);
    let payload = b"wiremesh-core interop echo";
    for seq in 1..=3u16 {
        side.send_packet(&icmp_echo(CORE_TUN_IP, WG_TUN_IP, 8, 0x7777, seq, payload));
        let reply = side.pump_until(Duration::from_secs(10), |p| {
            p.len() >= 28 && p[9] == 1 && p[20] == 0 && p[24..26] == [0x77, 0x77] && p[26..28] == seq.to_be_bytes()
        });
        let reply =
            reply.unwrap_or_else(|| panic!("{name}: no echo reply for seq {seq}; wireguard-go log:\n{}", s.wg.log()));
        assert_eq!(&reply[12..16], &WG_TUN_IP.octets(), "reply source");
        assert_eq!(&reply[16..20], &CORE_TUN_IP.octets(), "reply destination");
        assert_eq!(&reply[28..], payload, "echo payload");
        eprintln!("{name}: echo reply seq={seq} from {WG_TUN_IP} ({} bytes) decrypted by wiremesh-core", reply.len());
    }
    let peer = side.device.peer_ids().next().unwrap();
    let st = side.device.peer_stats(peer).unwrap();
    assert_eq!(st.handshakes, 1);
    assert!(st.rx_packets >= 3 && st.tx_packets >= 3, "{st:?}");
    assert_eq!(st.drops.total(), 0, "{st:?}");
    let dump = s.wg.dump();
    eprintln!("{name}: wg show dump:\n{dump}");
    let line = dump.lines().nth(1).expect("peer line in dump");
    let fields: Vec<&str> = line.split('\t').collect();
    assert_ne!(fields[4], "0", "wireguard-go records a handshake: {line}");
    assert!(fields[5].parse::<u64>().unwrap() > 0 && fields[6].parse::<u64>().unwrap() > 0, "{line}");
}

fn wireguard_go_initiates<P: CryptoProvider>(name: &str, version: WgGoVersion, ipv6: bool) {
    if netns::require_wireguard_go_or_skip(name, version).is_none() {
        return;
    }
    let s = setup(version, ipv6);
    let wg_pub = PublicKey(netns::b64_decode_32(&s.wg.public_key).unwrap());
    let mut side = Side::<P>::new(s.core_bind, s.key.clone(), wg_pub, s.wg_endpoint);
    let ns = s.wg.netns_name().to_string();
    let mut ping = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", &CORE_TUN_IP.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Answer echo requests like a host would, until ping is done.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while std::time::Instant::now() < end {
        if let Some(req) = side.pump_until(Duration::from_millis(200), |p| p.len() >= 28 && p[9] == 1 && p[20] == 8) {
            let id = u16::from_be_bytes([req[24], req[25]]);
            let seq = u16::from_be_bytes([req[26], req[27]]);
            let reply = icmp_echo(CORE_TUN_IP, WG_TUN_IP, 0, id, seq, &req[28..]);
            side.send_packet(&reply);
            answered += 1;
        }
        if let Ok(Some(_)) = ping.try_wait() {
            break;
        }
    }
    let _ = ping.kill();
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{name}: ping inside the namespace:\n{text}");
    assert!(
        out.status.success(),
        "{name}: ping failed ({answered} answered):\n{text}\nwireguard-go log:\n{}",
        s.wg.log()
    );
    assert!(text.contains("3 received"), "{text}");
    let peer = side.device.peer_ids().next().unwrap();
    let st = side.device.peer_stats(peer).unwrap();
    assert_eq!(st.handshakes, 1, "the core answered wireguard-go's initiation: {st:?}");
    assert_eq!(st.drops.total(), 0, "{st:?}");
}

#[test]
fn core_initiates_stable_ipv4() {
    core_initiates::<DefaultProvider>("core_initiates_stable_ipv4", WgGoVersion::Stable, false);
}

#[test]
fn core_initiates_backports_ipv6_portable() {
    core_initiates::<Portable>("core_initiates_backports_ipv6_portable", WgGoVersion::Backports, true);
}

#[test]
fn wireguard_go_initiates_stable_ipv6() {
    wireguard_go_initiates::<DefaultProvider>("wireguard_go_initiates_stable_ipv6", WgGoVersion::Stable, true);
}

#[test]
fn wireguard_go_initiates_backports_ipv4() {
    wireguard_go_initiates::<DefaultProvider>("wireguard_go_initiates_backports_ipv4", WgGoVersion::Backports, false);
}
