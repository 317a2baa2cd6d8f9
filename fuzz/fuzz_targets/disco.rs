//! Disco probes on arbitrary bytes and a path machine under arbitrary input.
//!
//! `disco::Header::parse`, `Body::parse` and `PairKeys::open` never panic;
//! an arbitrary datagram is never accepted unless it is a genuine probe
//! (fuzzed bytes cannot carry a valid tag); a genuine probe from the peer is
//! accepted once and refused when replayed; a `Disco` fed arbitrary
//! datagrams from arbitrary sources, endpoint updates and time jumps never
//! panics and its deadline after `handle_timeout(now)` is later than `now`.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use wiremesh_core::disco::{self, Body, Disco, DiscoConfig, DiscoError, PairKeys, Source, MAX_MESSAGE_LEN};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::{Instant, WallTime};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Arbitrary bytes from an address (or the relay when `None`).
    Datagram {
        from: Option<(u32, u16)>,
        bytes: Vec<u8>,
    },
    /// Arbitrary bytes behind a genuine header of the peer.
    WithHeader {
        counter: u64,
        bytes: Vec<u8>,
    },
    /// A genuine probe from the peer, delivered twice.
    Genuine {
        counter: u64,
        kind: u8,
        tx_id: [u8; 12],
        addrs: Vec<(u32, u16)>,
    },
    Endpoints(Vec<(u32, u16)>),
    Local(Vec<(u32, u16)>),
    Relay(bool),
    Advance(u16),
}

fn addr((ip, port): (u32, u16)) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)
}

fuzz_target!(|ops: Vec<Op>| {
    let own = PrivateKey::from_bytes([0x11; 32]);
    let peer = PrivateKey::from_bytes([0x22; 32]);
    let peer_pub = peer.public_key();
    let peer_keys = PairKeys::derive(&peer, &own.public_key()).expect("distinct valid keys");
    let mut d = Disco::new(own, ChaCha20Rng::seed_from_u64(1), DiscoConfig::default(), WallTime::new(1, 0));
    let mut now = Instant::from_duration(Duration::from_secs(10));
    d.add_peer(peer_pub, now).expect("valid key");
    let mut out = [0u8; MAX_MESSAGE_LEN];
    for op in ops.into_iter().take(256) {
        match op {
            Op::Datagram { from, bytes } => {
                let _ = disco::Header::parse(&bytes);
                let _ = Body::parse(&bytes);
                let _ = peer_keys.open(&bytes);
                let source = from.map_or(Source::Relay, |a| Source::Direct(addr(a)));
                let stats = d.stats();
                if d.handle_datagram(source, &bytes, now).is_ok() {
                    // Only a byte-exact copy of a genuine probe could pass,
                    // and those are all replays by now.
                    panic!("arbitrary bytes accepted as a probe: {bytes:?} (stats before {stats:?})");
                }
            }
            Op::WithHeader { counter, bytes } => {
                let mut m = vec![0u8; 0];
                m.extend_from_slice(&disco::MAGIC);
                m.extend_from_slice(&peer_pub.0);
                m.extend_from_slice(&counter.to_le_bytes());
                m.extend_from_slice(&bytes);
                assert!(d.handle_datagram(Source::Direct(addr((1, 1))), &m, now).is_err());
            }
            Op::Genuine { counter, kind, tx_id, addrs } => {
                let body = match kind % 3 {
                    0 => Body::Ping { tx_id },
                    1 => Body::Pong { tx_id, observed: addr((2, 2)) },
                    _ => Body::CallMeMaybe {
                        endpoints: addrs.into_iter().take(disco::MAX_ENDPOINTS).map(addr).collect(),
                    },
                };
                let counter = counter % (u64::MAX / 2);
                let n = peer_keys.seal(&peer_pub, counter, &body, &mut out).expect("buffer is MAX_MESSAGE_LEN");
                let src = Source::Direct(addr((3, 3)));
                let first = d.handle_datagram(src, &out[..n], now);
                if first.is_ok() || first == Err(DiscoError::Unsolicited) {
                    assert_eq!(d.handle_datagram(src, &out[..n], now), Err(DiscoError::Replayed));
                }
            }
            Op::Endpoints(a) => {
                let a: Vec<_> = a.into_iter().take(32).map(addr).collect();
                d.set_peer_endpoints(&peer_pub, &a, now);
            }
            Op::Local(a) => {
                let a: Vec<_> = a.into_iter().take(32).map(addr).collect();
                d.set_local_endpoints(&a, now);
            }
            Op::Relay(r) => d.set_peer_relay(&peer_pub, r, now),
            Op::Advance(ms) => {
                now = now + Duration::from_millis(ms.into());
                if d.poll_timeout().is_some_and(|t| t <= now) {
                    d.handle_timeout(now);
                    assert!(d.poll_timeout().is_none_or(|t| t > now), "deadline not moved past now");
                }
            }
        }
        while let Some(t) = d.poll_transmit(&mut out).expect("buffer is MAX_MESSAGE_LEN") {
            assert!(t.len <= MAX_MESSAGE_LEN && disco::is_disco(&out[..t.len]));
            assert_eq!(t.peer, peer_pub);
        }
        while d.poll_event().is_some() {}
    }
});
