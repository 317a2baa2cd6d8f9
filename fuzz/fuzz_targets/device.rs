//! Two `Device`s, peers of each other, driven by an arbitrary sequence of
//! operations through the public API only: IP packets sent through either
//! side, datagrams delivered, dropped, duplicated, reordered or mutated on
//! the way, arbitrary datagrams from arbitrary addresses, time jumps, load,
//! counter jumps and configuration changes.
//!
//! Invariants checked after every step:
//! * nothing panics, and `poll_transmit` drains in bounded time;
//! * per-peer counters (bytes, packets, handshakes, drops) never decrease;
//! * a datagram changed on the way never yields `Received::Packet` or
//!   `Received::Keepalive`, and no datagram is accepted twice (replay);
//! * a `Received::Packet` range lies in the buffer and holds exactly an IP
//!   packet the other side sent through `encapsulate` with a source address
//!   the receiver allows for it;
//! * results name the right peer, and lengths fit the buffers given;
//! * after `handle_timeout(now)`, the next deadline lies after `now`.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use wiremesh_core::consts::{REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES};
use wiremesh_core::crypto::Portable;
use wiremesh_core::device::{
    Device, DeviceConfig, DropCounts, DropReason, Encapsulated, Event, PeerConfig, PeerId, PeerStats, Received,
    SendError, HEADROOM, TAILROOM,
};
use wiremesh_core::keys::{PresharedKey, PrivateKey};
use wiremesh_core::{Instant, WallTime};

type Dev = Device<ChaCha20Rng, Portable>;

const KEYS: [[u8; 32]; 2] = [[0x41; 32], [0x42; 32]];
const RNG_SEEDS: [u64; 2] = [0xa, 0xb];
const WALL: WallTime = WallTime::new(1_700_000_000, 0);
/// Largest IP payload the fuzzer sends; keeps every datagram below `BIG`.
const MAX_PAYLOAD: usize = 2000;
/// A buffer large enough for any datagram here.
const BIG: usize = 4096;
const MAX_IN_FLIGHT: usize = 512;
const MAX_OPS: usize = 256;

/// The side whose tunnel addresses these are: 100.64.0.x/32, 10.x.0.0/16,
/// fd00::x/128 and fd0x::/48 (x = 1 for A, 2 for B).
fn tunnel_prefixes(side: usize) -> Vec<(IpAddr, u8)> {
    let x = side as u8 + 1;
    vec![
        (IpAddr::V4(Ipv4Addr::new(100, 64, 0, x)), 32),
        (IpAddr::V4(Ipv4Addr::new(10, x, 0, 0)), 16),
        (IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, x.into())), 128),
        (IpAddr::V6(Ipv6Addr::new(0xfd00 + u16::from(x), 0, 0, 0, 0, 0, 0, 0)), 48),
    ]
}

fn underlay(side: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, side as u8 + 1)), 51820)
}

fn in_prefix(addr: IpAddr, prefix: IpAddr, len: u8) -> bool {
    let (a, p, bits): (Vec<u8>, Vec<u8>, usize) = match (addr, prefix) {
        (IpAddr::V4(a), IpAddr::V4(p)) => (a.octets().to_vec(), p.octets().to_vec(), 32),
        (IpAddr::V6(a), IpAddr::V6(p)) => (a.octets().to_vec(), p.octets().to_vec(), 128),
        _ => return false,
    };
    (0..(len as usize).min(bits)).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (p[i / 8] >> (7 - i % 8)) & 1)
}

/// Whether the other side accepts `source` in a packet from `side`.
fn allowed_source(side: usize, source: IpAddr) -> bool {
    tunnel_prefixes(side).into_iter().any(|(p, l)| in_prefix(source, p, l))
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Side {
    A,
    B,
}

impl Side {
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum AddrChoice {
    A,
    B,
    V4([u8; 4], u16),
    V6([u8; 16], u16),
}

impl AddrChoice {
    fn socket(self) -> SocketAddr {
        match self {
            AddrChoice::A => underlay(0),
            AddrChoice::B => underlay(1),
            AddrChoice::V4(ip, port) => SocketAddr::new(IpAddr::V4(ip.into()), port),
            AddrChoice::V6(ip, port) => SocketAddr::new(IpAddr::V6(ip.into()), port),
        }
    }
}

/// An address in an IP header: the sender's own or the receiver's, one
/// inside the side's /16 (or /48), or anything at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum HostChoice {
    Tunnel,
    InRange(u16),
    Any([u8; 16]),
}

impl HostChoice {
    fn addr(self, side: usize, v6: bool) -> IpAddr {
        let x = side as u8 + 1;
        match (self, v6) {
            (HostChoice::Tunnel, false) => IpAddr::V4(Ipv4Addr::new(100, 64, 0, x)),
            (HostChoice::Tunnel, true) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, x.into())),
            (HostChoice::InRange(h), false) => IpAddr::V4(Ipv4Addr::new(10, x, (h >> 8) as u8, h as u8)),
            (HostChoice::InRange(h), true) => IpAddr::V6(Ipv6Addr::new(0xfd00 + u16::from(x), 0, 0, h, 0, 0, 0, 1)),
            (HostChoice::Any(b), false) => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            (HostChoice::Any(b), true) => IpAddr::V6(b.into()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Bytes(Vec<u8>),
    Fill { len: u16, byte: u8 },
}

/// Room left after the packet: what `encapsulate` asks for, less, or more.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Room {
    Exact,
    Short(u8),
    Extra(u8),
}

#[derive(Arbitrary, Debug)]
enum Mutation {
    Flip { pos: u16, xor: u8 },
    Truncate(u16),
    Append(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Advance {
    Millis(u16),
    Secs(u16),
    /// Jump to the earliest deadline of either device.
    ToDeadline,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Counter {
    NearRekey(u16),
    NearReject(u16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Arbitrary bytes as a datagram to a side.
    Raw {
        to: Side,
        from: AddrChoice,
        bytes: Vec<u8>,
    },
    /// An IP packet through `encapsulate`; its output joins the network.
    Send {
        from: Side,
        v6: bool,
        src: HostChoice,
        dst: HostChoice,
        payload: Payload,
        room: Room,
    },
    /// Everything `poll_transmit` has, into the network.
    Drain {
        side: Side,
        small_buffer: Option<u8>,
    },
    /// One datagram from the network to its receiver (reordering by index).
    Deliver {
        index: u8,
        from: Option<AddrChoice>,
        mutation: Option<Mutation>,
        duplicate: bool,
    },
    /// One datagram lost.
    Lose {
        index: u8,
    },
    /// Every datagram in the network, in order.
    DeliverAll,
    /// Drain and deliver until the network is quiet.
    Pump,
    Advance(Advance),
    SetUnderLoad {
        side: Side,
        loaded: bool,
    },
    Initiate {
        side: Side,
    },
    AdvanceSendCounter {
        side: Side,
        counter: Counter,
    },
    SetPersistentKeepalive {
        side: Side,
        seconds: Option<u8>,
    },
    SetMtu {
        side: Side,
        mtu: Option<u16>,
    },
    SetPresharedKey {
        side: Side,
        key: Option<u8>,
    },
}

struct Datagram {
    to: usize,
    from: SocketAddr,
    bytes: Vec<u8>,
}

struct World {
    now: Instant,
    dev: [Dev; 2],
    /// `peer[i]`: the other side's handle in `dev[i]`.
    peer: [PeerId; 2],
    network: VecDeque<Datagram>,
    /// IP packets side i sent that the other side may deliver.
    sent: [HashSet<Vec<u8>>; 2],
    /// Datagrams side i accepted as transport (packet or keepalive).
    accepted: [HashSet<Vec<u8>>; 2],
    stats: [PeerStats; 2],
    drops: [DropCounts; 2],
}

impl World {
    fn new() -> Self {
        let now = Instant::from_duration(Duration::from_secs(1000));
        let mk = |i: usize| {
            Dev::new(
                PrivateKey::from_bytes(KEYS[i]),
                ChaCha20Rng::seed_from_u64(RNG_SEEDS[i]),
                DeviceConfig::default(),
                now,
                WALL,
            )
        };
        let mut dev = [mk(0), mk(1)];
        let mut peer = [PeerId(0); 2];
        for i in 0..2 {
            let other = 1 - i;
            let mut c = PeerConfig::new(dev[other].public_key());
            c.endpoint = Some(underlay(other));
            c.allowed_ips = tunnel_prefixes(other);
            peer[i] = dev[i].add_peer(c, now).expect("peer config is valid");
        }
        let stats = [dev[0].peer_stats(peer[0]).unwrap(), dev[1].peer_stats(peer[1]).unwrap()];
        World {
            now,
            dev,
            peer,
            network: VecDeque::new(),
            sent: [HashSet::new(), HashSet::new()],
            accepted: [HashSet::new(), HashSet::new()],
            stats,
            drops: [DropCounts::default(); 2],
        }
    }

    fn put_on_wire(&mut self, from: usize, bytes: Vec<u8>) {
        if self.network.len() >= MAX_IN_FLIGHT {
            self.network.pop_front();
        }
        self.network.push_back(Datagram { to: 1 - from, from: underlay(from), bytes });
    }

    /// Hands one datagram to side `to`; `changed` says it differs from what
    /// was sent (or was never sent at all, for `Raw`: `None`).
    fn deliver(&mut self, to: usize, from: SocketAddr, mut buf: Vec<u8>, changed: Option<bool>) {
        let original = buf.clone();
        let result = self.dev[to].handle_datagram(from, &mut buf, self.now);
        match result {
            Ok(Received::Packet { peer, range }) => {
                assert_ne!(changed, Some(true), "a changed datagram yielded a packet");
                assert_eq!(peer, self.peer[to]);
                assert!(range.start <= range.end && range.end <= buf.len(), "range {range:?} outside {}", buf.len());
                assert!(
                    self.sent[1 - to].contains(&buf[range.clone()]),
                    "delivered a packet the peer never sent (or with a source it may not use)"
                );
                assert!(self.accepted[to].insert(original), "a datagram was accepted twice");
            }
            Ok(Received::Keepalive { peer }) => {
                assert_ne!(changed, Some(true), "a changed datagram yielded a keepalive");
                assert_eq!(peer, self.peer[to]);
                assert!(self.accepted[to].insert(original), "a keepalive was accepted twice");
            }
            Ok(Received::Handshake) | Err(_) => {}
        }
    }

    fn drain(&mut self, side: usize, small: Option<u8>) {
        let mut buf = vec![0u8; small.map_or(BIG, usize::from)];
        for _ in 0..10_000 {
            match self.dev[side].poll_transmit(self.now, &mut buf) {
                Ok(Some(t)) => {
                    assert!(t.len <= buf.len());
                    if let Some(p) = t.peer {
                        assert_eq!(p, self.peer[side]);
                    }
                    let bytes = buf[..t.len].to_vec();
                    self.put_on_wire(side, bytes);
                }
                Ok(None) => return,
                Err(SendError::BufferTooSmall { needed }) => {
                    assert!(needed > buf.len(), "BufferTooSmall needs {needed} with {} given", buf.len());
                    assert!(needed <= BIG, "a datagram of {needed} bytes");
                    buf = vec![0u8; BIG];
                }
                Err(e) => panic!("poll_transmit: {e:?}"),
            }
        }
        panic!("poll_transmit did not run dry");
    }

    fn deliver_all(&mut self) {
        let all: Vec<_> = self.network.drain(..).collect();
        for d in all {
            self.deliver(d.to, d.from, d.bytes, Some(false));
        }
    }

    fn send(&mut self, side: usize, v6: bool, src: HostChoice, dst: HostChoice, payload: &Payload, room: Room) {
        let src = src.addr(side, v6);
        let dst = dst.addr(1 - side, v6);
        let body: Vec<u8> = match payload {
            Payload::Bytes(b) => b.iter().copied().take(MAX_PAYLOAD).collect(),
            Payload::Fill { len, byte } => vec![*byte; (*len as usize).min(MAX_PAYLOAD)],
        };
        let packet = ip_packet(src, dst, &body);
        let tail = match room {
            Room::Exact => TAILROOM,
            Room::Short(n) => TAILROOM.saturating_sub(n.into()),
            Room::Extra(n) => TAILROOM + usize::from(n),
        };
        let mut buf = vec![0u8; HEADROOM + packet.len() + tail];
        buf[HEADROOM..HEADROOM + packet.len()].copy_from_slice(&packet);
        let legit = allowed_source(side, src);
        match self.dev[side].encapsulate(&mut buf, packet.len(), self.now) {
            Ok(Encapsulated::Ready(t)) => {
                assert_eq!(t.peer, Some(self.peer[side]));
                assert!(t.len <= buf.len());
                if legit {
                    self.sent[side].insert(packet);
                }
                buf.truncate(t.len);
                self.put_on_wire(side, buf);
            }
            Ok(Encapsulated::Staged { peer }) => {
                assert_eq!(peer, self.peer[side]);
                if legit {
                    self.sent[side].insert(packet);
                }
            }
            Err(SendError::BufferTooSmall { needed }) => {
                assert!(needed > buf.len(), "BufferTooSmall needs {needed} with {} given", buf.len())
            }
            Err(_) => {}
        }
    }

    fn handle_timeouts(&mut self) {
        for d in &mut self.dev {
            d.handle_timeout(self.now);
            if let Some(t) = d.poll_timeout() {
                assert!(t > self.now, "deadline {t:?} not after handle_timeout({:?})", self.now);
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Raw { to, from, bytes } => {
                let bytes = bytes.iter().copied().take(BIG).collect();
                self.deliver(to.index(), from.socket(), bytes, None);
            }
            Op::Send { from, v6, src, dst, payload, room } => self.send(from.index(), *v6, *src, *dst, payload, *room),
            Op::Drain { side, small_buffer } => self.drain(side.index(), *small_buffer),
            Op::Deliver { index, from, mutation, duplicate } => {
                if self.network.is_empty() {
                    return;
                }
                let i = *index as usize % self.network.len();
                let d = if *duplicate {
                    let d = &self.network[i];
                    Datagram { to: d.to, from: d.from, bytes: d.bytes.clone() }
                } else {
                    self.network.remove(i).expect("index in range")
                };
                let mut bytes = d.bytes.clone();
                match mutation {
                    None => {}
                    Some(Mutation::Flip { pos, xor }) => {
                        if !bytes.is_empty() {
                            let p = *pos as usize % bytes.len();
                            bytes[p] ^= *xor;
                        }
                    }
                    Some(Mutation::Truncate(n)) => bytes.truncate(*n as usize),
                    Some(Mutation::Append(extra)) => bytes.extend(extra.iter().take(64)),
                }
                let changed = bytes != d.bytes;
                let from = from.map_or(d.from, AddrChoice::socket);
                self.deliver(d.to, from, bytes, Some(changed));
            }
            Op::Lose { index } => {
                if !self.network.is_empty() {
                    let i = *index as usize % self.network.len();
                    self.network.remove(i);
                }
            }
            Op::DeliverAll => self.deliver_all(),
            Op::Pump => {
                for _ in 0..32 {
                    self.drain(0, None);
                    self.drain(1, None);
                    if self.network.is_empty() {
                        break;
                    }
                    self.deliver_all();
                }
            }
            Op::Advance(a) => {
                match a {
                    Advance::Millis(ms) => self.now = self.now + Duration::from_millis((*ms).into()),
                    Advance::Secs(s) => self.now = self.now + Duration::from_secs((*s).into()),
                    Advance::ToDeadline => {
                        let next = self.dev.iter().filter_map(Dev::poll_timeout).min();
                        if let Some(t) = next {
                            self.now = self.now.max(t);
                        }
                    }
                }
                self.handle_timeouts();
            }
            Op::SetUnderLoad { side, loaded } => self.dev[side.index()].set_under_load(*loaded, self.now),
            Op::Initiate { side } => {
                let s = side.index();
                self.dev[s].initiate_handshake(self.peer[s], self.now).expect("live peer");
            }
            Op::AdvanceSendCounter { side, counter } => {
                let c = match counter {
                    Counter::NearRekey(n) => REKEY_AFTER_MESSAGES - u64::from(*n),
                    Counter::NearReject(n) => REJECT_AFTER_MESSAGES - u64::from(*n),
                    Counter::Any(c) => *c,
                };
                let s = side.index();
                self.dev[s].advance_send_counter(self.peer[s], c);
            }
            Op::SetPersistentKeepalive { side, seconds } => {
                let s = side.index();
                let secs = seconds.map(u16::from);
                self.dev[s].set_peer_persistent_keepalive(self.peer[s], secs, self.now).expect("live peer");
            }
            Op::SetMtu { side, mtu } => self.dev[side.index()].set_mtu(mtu.map(usize::from)),
            Op::SetPresharedKey { side, key } => {
                let s = side.index();
                let psk = key.map(|b| PresharedKey::from_bytes([b; 32]));
                self.dev[s].set_peer_preshared_key(self.peer[s], psk).expect("live peer");
            }
        }
    }

    /// Counters only grow; events name the configured peer.
    fn check(&mut self) {
        for i in 0..2 {
            while let Some(e) = self.dev[i].poll_event() {
                match e {
                    Event::EndpointChanged { peer, .. }
                    | Event::HandshakeCompleted { peer }
                    | Event::HandshakeGaveUp { peer }
                    | Event::KeysZeroed { peer } => assert_eq!(peer, self.peer[i], "{e:?}"),
                    _ => {}
                }
            }
            let new = self.dev[i].peer_stats(self.peer[i]).expect("live peer");
            let old = &self.stats[i];
            assert!(new.rx_bytes >= old.rx_bytes, "rx_bytes went down: {old:?} -> {new:?}");
            assert!(new.tx_bytes >= old.tx_bytes, "tx_bytes went down: {old:?} -> {new:?}");
            assert!(new.rx_packets >= old.rx_packets, "rx_packets went down: {old:?} -> {new:?}");
            assert!(new.tx_packets >= old.tx_packets, "tx_packets went down: {old:?} -> {new:?}");
            assert!(new.handshakes >= old.handshakes, "handshakes went down: {old:?} -> {new:?}");
            assert!(new.last_handshake >= old.last_handshake, "last_handshake went back: {old:?} -> {new:?}");
            let drops = self.dev[i].drops();
            for r in DropReason::ALL {
                assert!(new.drops.get(r) >= old.drops.get(r), "peer drops of {r} went down");
                assert!(drops.get(r) >= self.drops[i].get(r), "device drops of {r} went down");
                assert!(drops.get(r) >= new.drops.get(r), "peer drops of {r} exceed the device's");
            }
            self.stats[i] = new;
            self.drops[i] = drops;
        }
    }
}

/// A UDP packet (protocol 17) in IPv4 or IPv6 with a consistent length field.
fn ip_packet(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + payload.len();
            let mut p = vec![0u8; 20];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[8] = 64;
            p[9] = 17;
            p[12..16].copy_from_slice(&s.octets());
            p[16..20].copy_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
            p[6] = 17;
            p[7] = 64;
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        _ => unreachable!("source and destination of one family"),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut w = World::new();
    for op in ops.iter().take(MAX_OPS) {
        w.apply(op);
        w.check();
    }
});
