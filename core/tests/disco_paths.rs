//! The path-selection rules of `disco::Disco` one by one, with two machines
//! wired by hand: one node reachable at two addresses whose delays the test
//! sets, so lowest latency, hysteresis, re-probing and the fall back to the
//! relay are each seen to happen (or not) at the time the rules say.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::net::SocketAddr;
use std::time::Duration;
use wiremesh_core::disco::{Destination, Disco, DiscoConfig, Path, Source, MAX_MESSAGE_LEN};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::{Instant, WallTime};

const MS: Duration = Duration::from_millis(1);

/// A probes B, which is reachable at `X` and `Y` (or not, `None`), each with
/// its own one-way delay; A is reachable from B at `A_ADDR`.
struct Pair {
    a: Disco<ChaCha20Rng>,
    b: Disco<ChaCha20Rng>,
    now: Instant,
    x: Option<Duration>,
    y: Option<Duration>,
    /// Datagrams in flight: (arrival, to_b, from, bytes).
    wire: Vec<(Instant, bool, SocketAddr, Vec<u8>)>,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const A_ADDR: &str = "192.0.2.1:1000";
const X: &str = "198.51.100.1:2000";
const Y: &str = "203.0.113.1:3000";

impl Pair {
    fn new() -> Self {
        let (ka, kb) = (PrivateKey::from_bytes([1; 32]), PrivateKey::from_bytes([2; 32]));
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let now = Instant::from_duration(Duration::from_secs(100));
        let wall = WallTime::new(1_700_000_000, 0);
        let mut a = Disco::new(ka, ChaCha20Rng::seed_from_u64(1), DiscoConfig::default(), wall);
        let mut b = Disco::new(kb, ChaCha20Rng::seed_from_u64(2), DiscoConfig::default(), wall);
        a.add_peer(pb, now).unwrap();
        b.add_peer(pa, now).unwrap();
        a.set_peer_relay(&pb, true, now);
        b.set_peer_relay(&pa, true, now);
        a.set_peer_endpoints(&pb, &[addr(X), addr(Y)], now);
        b.set_peer_endpoints(&pa, &[addr(A_ADDR)], now);
        Pair { a, b, now, x: None, y: None, wire: Vec::new() }
    }

    fn delay_to(&self, to: SocketAddr) -> Option<Duration> {
        if to == addr(X) {
            self.x
        } else if to == addr(Y) {
            self.y
        } else {
            None
        }
    }

    /// Moves A's and B's output onto the wire. B answers from the address
    /// the ping reached, with the same delay back.
    fn flush(&mut self) {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        while let Some(t) = self.a.poll_transmit(&mut buf).unwrap() {
            if let Destination::Direct(to) = t.destination {
                if let Some(d) = self.delay_to(to) {
                    self.wire.push((self.now + d, true, to, buf[..t.len].to_vec()));
                }
            }
        }
        while let Some(t) = self.b.poll_transmit(&mut buf).unwrap() {
            if let Destination::Direct(to) = t.destination {
                // B's pongs leave from the address the ping reached; A sees
                // them coming from there. Pings B sends to A are dropped (A's
                // side is not under test).
                if to == addr(A_ADDR) {
                    continue;
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.flush();
            let next_wire = self.wire.iter().map(|w| w.0).min();
            let next = [next_wire, self.a.poll_timeout(), self.b.poll_timeout()].into_iter().flatten().min();
            let Some(t) = next.filter(|t| *t <= end) else { break };
            self.now = self.now.max(t);
            let now = self.now;
            let due: Vec<_> = {
                let (due, rest): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|w| w.0 <= now);
                self.wire = rest;
                due
            };
            for (_, to_b, via, bytes) in due {
                if to_b {
                    let _ = self.b.handle_datagram(Source::Direct(addr(A_ADDR)), &bytes, now);
                    // B's pong goes back through the same address.
                    let mut buf = [0u8; MAX_MESSAGE_LEN];
                    while let Some(t) = self.b.poll_transmit(&mut buf).unwrap() {
                        if t.destination == Destination::Direct(addr(A_ADDR)) {
                            if let Some(d) = self.delay_to(via) {
                                self.wire.push((now + d, false, via, buf[..t.len].to_vec()));
                            }
                        }
                    }
                } else {
                    let _ = self.a.handle_datagram(Source::Direct(via), &bytes, now);
                }
            }
            if self.a.poll_timeout().is_some_and(|t| t <= now) {
                self.a.handle_timeout(now);
            }
            if self.b.poll_timeout().is_some_and(|t| t <= now) {
                self.b.handle_timeout(now);
            }
        }
        self.now = end;
    }

    fn path(&self) -> Option<Path> {
        self.a.path(&self.b.public_key())
    }
}

#[test]
fn relay_first_then_the_only_working_address() {
    let mut p = Pair::new();
    assert_eq!(p.path(), Some(Path::Relay), "relay before anything answered");
    p.x = Some(30 * MS);
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.path(), Some(Path::Direct(addr(X))));
    assert_eq!(p.a.rtt(&p.b.public_key()), Some(60 * MS));
}

#[test]
fn lowest_latency_wins_when_both_answer_from_the_start() {
    let mut p = Pair::new();
    p.x = Some(30 * MS);
    p.y = Some(10 * MS);
    p.run_for(Duration::from_secs(3));
    assert_eq!(p.path(), Some(Path::Direct(addr(Y))));
}

#[test]
fn hysteresis_keeps_a_path_against_a_slightly_better_one() {
    let mut p = Pair::new();
    p.x = Some(30 * MS);
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.path(), Some(Path::Direct(addr(X))));
    // Y comes up at 25 ms: better, but not below 2/3 of 30 ms. Re-probes
    // (every 20 s) measure it; the path stays.
    p.y = Some(25 * MS);
    p.run_for(Duration::from_secs(60));
    assert_eq!(p.path(), Some(Path::Direct(addr(X))));
}

#[test]
fn a_much_better_path_is_taken_at_the_next_reprobe() {
    let mut p = Pair::new();
    p.x = Some(30 * MS);
    p.run_for(Duration::from_secs(1));
    p.y = Some(10 * MS);
    // Not before the re-probe: only the chosen path is pinged in between.
    p.run_for(Duration::from_secs(5));
    assert_eq!(p.path(), Some(Path::Direct(addr(X))));
    // Y (20 ms RTT) is below 2/3 of X's 60 ms: taken within the re-probe interval.
    p.run_for(Duration::from_secs(20));
    assert_eq!(p.path(), Some(Path::Direct(addr(Y))));
}

#[test]
fn a_silent_path_falls_back_to_the_relay_within_the_trust_time() {
    let mut p = Pair::new();
    p.x = Some(30 * MS);
    p.run_for(Duration::from_secs(3));
    assert_eq!(p.path(), Some(Path::Direct(addr(X))));
    p.x = None;
    let cut = p.now;
    let mut fell = None;
    for _ in 0..100 {
        p.run_for(100 * MS);
        if p.path() == Some(Path::Relay) {
            fell = Some(p.now - cut);
            break;
        }
    }
    let fell = fell.expect("fell back to the relay");
    // The last pong was at most one heartbeat (2 s) before the cut, and a
    // path is trusted 5.5 s after its last pong.
    assert!(fell <= DiscoConfig::default().trust + 100 * MS, "{fell:?}");
    assert!(fell >= DiscoConfig::default().trust - DiscoConfig::default().heartbeat - 100 * MS, "{fell:?}");
    // And the other address is taken as soon as it answers.
    p.y = Some(20 * MS);
    p.run_for(Duration::from_secs(3));
    assert_eq!(p.path(), Some(Path::Direct(addr(Y))));
}

#[test]
fn without_a_relay_a_dead_path_leaves_no_path() {
    let mut p = Pair::new();
    let pb = p.b.public_key();
    let now = p.now;
    p.a.set_peer_relay(&pb, false, now);
    assert_eq!(p.path(), None);
    p.x = Some(10 * MS);
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.path(), Some(Path::Direct(addr(X))));
    p.x = None;
    p.run_for(Duration::from_secs(8));
    assert_eq!(p.path(), None);
    let mut events = Vec::new();
    while let Some(e) = p.a.poll_event() {
        events.push(e.path);
    }
    assert_eq!(events, vec![Some(Path::Relay), None, Some(Path::Direct(addr(X))), None]);
}

/// Everything `d` wants to send now: (destination, bytes).
fn drain(d: &mut Disco<ChaCha20Rng>) -> Vec<(Destination, Vec<u8>)> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let mut out = Vec::new();
    while let Some(t) = d.poll_transmit(&mut buf).unwrap() {
        out.push((t.destination, buf[..t.len].to_vec()));
    }
    out
}

/// A ping from a known address of the peer that is not answering (a NAT
/// that just let it through) is pinged back at once, not at the next
/// heartbeat; an address pinged less than a second ago, or a live one, is
/// only answered.
#[test]
fn a_ping_from_a_silent_known_address_is_pinged_back_at_once() {
    let (ka, kb) = (PrivateKey::from_bytes([1; 32]), PrivateKey::from_bytes([2; 32]));
    let (pa, pb) = (ka.public_key(), kb.public_key());
    let t0 = Instant::from_duration(Duration::from_secs(100));
    let wall = |ms: u64| WallTime::new(1_700_000_000 + ms / 1000, (ms % 1000) as u32 * 1_000_000);
    let mut a = Disco::new(ka, ChaCha20Rng::seed_from_u64(1), DiscoConfig::default(), wall(0));
    a.add_peer(pb, t0).unwrap();
    a.set_peer_endpoints(&pb, &[addr(X)], t0);
    // A pings X at once; nothing answers (B's NAT still blocks).
    a.handle_timeout(t0);
    assert_eq!(drain(&mut a).len(), 1);
    // B's side: a fresh machine for B at `ms` after t0 pings A at once.
    let b_at = |ms: u64| {
        let t = t0 + Duration::from_millis(ms);
        let mut b = Disco::new(kb.clone(), ChaCha20Rng::seed_from_u64(ms), DiscoConfig::default(), wall(ms));
        b.add_peer(pa, t).unwrap();
        b.set_peer_endpoints(&pa, &[addr(A_ADDR)], t);
        b.handle_timeout(t);
        let out = drain(&mut b);
        assert_eq!(out.len(), 1);
        (b, t, out[0].1.clone())
    };
    let to_x = |out: &[(Destination, Vec<u8>)]| {
        assert!(out.iter().all(|(d, _)| *d == Destination::Direct(addr(X))), "{out:?}");
        out.len()
    };

    // 0.5 s later B's ping gets through from X: answered, but X was pinged
    // half a second ago, so no ping back.
    let (_, t, ping) = b_at(500);
    a.handle_datagram(Source::Direct(addr(X)), &ping, t).unwrap();
    assert_eq!(to_x(&drain(&mut a)), 1, "only the pong");

    // 1.5 s after A's ping, before its 2 s heartbeat: another ping from X
    // gets the pong and a ping back.
    let (mut b, t, ping) = b_at(1500);
    a.handle_datagram(Source::Direct(addr(X)), &ping, t).unwrap();
    let out = drain(&mut a);
    assert_eq!(to_x(&out), 2, "the pong and a ping back, before the heartbeat");

    // B answers the ping back: X is alive for A, its path.
    for (_, bytes) in &out {
        let _ = b.handle_datagram(Source::Direct(addr(A_ADDR)), bytes, t);
    }
    for (d, bytes) in drain(&mut b) {
        if d == Destination::Direct(addr(A_ADDR)) {
            let _ = a.handle_datagram(Source::Direct(addr(X)), &bytes, t + 10 * MS);
        }
    }
    assert_eq!(a.path(&pb), Some(Path::Direct(addr(X))));
    let _ = drain(&mut a);
    // A further ping from the live address is only answered.
    let (_, t, ping) = b_at(1600);
    a.handle_datagram(Source::Direct(addr(X)), &ping, t).unwrap();
    assert_eq!(to_x(&drain(&mut a)), 1, "a live address is only answered");
}
