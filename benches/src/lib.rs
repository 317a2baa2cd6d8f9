//! Benchmark support for wiremesh: two devices that are peers of each other,
//! the handshake between them driven through the public run loop, and
//! packet builders. The criterion benches in `benches/` and the `sizes`
//! binary use it.

use core::net::{IpAddr, Ipv4Addr, SocketAddr};
use core::time::Duration;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wiremesh_core::crypto::CryptoProvider;
use wiremesh_core::device::{Device, DeviceConfig, PeerConfig, PeerId, Received};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::{Instant, WallTime};

/// A device with the deterministic RNG every benchmark uses.
pub type BenchDevice<P> = Device<ChaCha20Rng, P>;

/// Underlay address of device A.
pub const ADDR_A: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 51820);
/// Underlay address of device B.
pub const ADDR_B: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 51820);
/// Tunnel address of device A.
pub const TUNNEL_A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// Tunnel address of device B.
pub const TUNNEL_B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// Static private key of device A.
pub const KEY_A: [u8; 32] = [0x41; 32];
/// Static private key of device B.
pub const KEY_B: [u8; 32] = [0x42; 32];
/// Largest datagram any benchmark produces, with room to spare.
pub const MAX_DATAGRAM: usize = 2048;

const WALL: WallTime = WallTime::new(1_700_000_000, 0);

/// Two devices configured as each other's peer, endpoints known, each
/// routing the other's tunnel address; `P` is the transport provider.
pub struct Pair<P: CryptoProvider> {
    /// The initiating side.
    pub a: BenchDevice<P>,
    /// The responding side.
    pub b: BenchDevice<P>,
    /// B's handle within A.
    pub peer_of_a: PeerId,
    /// A's handle within B.
    pub peer_of_b: PeerId,
    /// Virtual time, advanced only by [`Pair::rehandshake`].
    pub now: Instant,
    scratch: [u8; MAX_DATAGRAM],
}

impl<P: CryptoProvider> Pair<P> {
    /// A configured pair without a session.
    pub fn new() -> Self {
        let now = Instant::from_duration(Duration::from_secs(1000));
        let device = |key, seed| {
            BenchDevice::<P>::new(
                PrivateKey::from_bytes(key),
                ChaCha20Rng::seed_from_u64(seed),
                DeviceConfig::default(),
                now,
                WALL,
            )
        };
        let mut a = device(KEY_A, 1);
        let mut b = device(KEY_B, 2);
        let peer = |public_key, endpoint, ip| {
            let mut c = PeerConfig::new(public_key);
            c.endpoint = Some(endpoint);
            c.allowed_ips = vec![(IpAddr::V4(ip), 32)];
            c
        };
        let peer_of_a = a.add_peer(peer(b.public_key(), ADDR_B, TUNNEL_B), now).expect("valid peer");
        let peer_of_b = b.add_peer(peer(a.public_key(), ADDR_A, TUNNEL_A), now).expect("valid peer");
        Pair { a, b, peer_of_a, peer_of_b, now, scratch: [0; MAX_DATAGRAM] }
    }

    /// A pair with a confirmed session both ways.
    pub fn connected() -> Self {
        let mut p = Self::new();
        p.handshake();
        p
    }

    /// One full handshake started by A at the current time: initiation,
    /// response, and the keepalive that confirms the session to B.
    ///
    /// # Panics
    /// If any step does not produce what the protocol says it must.
    pub fn handshake(&mut self) {
        let now = self.now;
        let buf = &mut self.scratch;
        self.a.initiate_handshake(self.peer_of_a, now).expect("live peer");
        let t = self.a.poll_transmit(now, buf).expect("buffer fits").expect("an initiation");
        let r = self.b.handle_datagram(ADDR_A, &mut buf[..t.len], now);
        assert_eq!(r, Ok(Received::Handshake), "initiation refused");
        let t = self.b.poll_transmit(now, buf).expect("buffer fits").expect("a response");
        let r = self.a.handle_datagram(ADDR_B, &mut buf[..t.len], now);
        assert_eq!(r, Ok(Received::Handshake), "response refused");
        let t = self.a.poll_transmit(now, buf).expect("buffer fits").expect("a keepalive");
        let r = self.b.handle_datagram(ADDR_A, &mut buf[..t.len], now);
        assert_eq!(r, Ok(Received::Keepalive { peer: self.peer_of_b }), "confirmation refused");
        while self.a.poll_event().is_some() {}
        while self.b.poll_event().is_some() {}
    }

    /// A new handshake on the same devices: time moves past REKEY_TIMEOUT
    /// (so A may initiate again and B sees a newer timestamp) first.
    pub fn rehandshake(&mut self) {
        self.now = self.now + Duration::from_secs(6);
        self.handshake();
    }
}

impl<P: CryptoProvider> Default for Pair<P> {
    fn default() -> Self {
        Self::new()
    }
}

/// An IPv4 UDP packet of `total_len` bytes (at least 28) from A to B.
pub fn ipv4_packet(total_len: usize) -> Vec<u8> {
    assert!((28..=usize::from(u16::MAX)).contains(&total_len));
    let mut p = vec![0u8; total_len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&TUNNEL_A.octets());
    p[16..20].copy_from_slice(&TUNNEL_B.octets());
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_core::crypto::Portable;
    use wiremesh_core::device::{Encapsulated, HEADROOM, TAILROOM};

    #[test]
    fn pair_carries_a_packet_after_handshakes() {
        let mut p = Pair::<Portable>::connected();
        p.rehandshake();
        let packet = ipv4_packet(100);
        let mut buf = vec![0u8; HEADROOM + packet.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + packet.len()].copy_from_slice(&packet);
        let Ok(Encapsulated::Ready(t)) = p.a.encapsulate(&mut buf, packet.len(), p.now) else {
            panic!("session is up");
        };
        let Ok(Received::Packet { range, .. }) = p.b.handle_datagram(ADDR_A, &mut buf[..t.len], p.now) else {
            panic!("packet refused");
        };
        assert_eq!(&buf[range], &packet[..]);
    }
}
