//! A deterministic network simulator for `wiremesh-core` devices: N nodes
//! over a seeded virtual network with loss, duplication, reordering and
//! delay, virtual time jumping to the earliest deadline.

#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use wiremesh_core::crypto::CryptoProvider;
use wiremesh_core::device::{
    DeviceConfig, DropReason, Encapsulated, Event, PeerConfig, PeerId, Received, SendError, HEADROOM, TAILROOM,
};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::{Instant, WallTime};

pub type Device<P> = wiremesh_core::device::Device<ChaCha20Rng, P>;

/// Properties of the virtual network.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    pub loss: f64,
    pub duplicate: f64,
    /// Probability a datagram gets extra delay, so it overtakes or is overtaken.
    pub reorder: f64,
    pub delay: Duration,
    pub jitter: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { loss: 0.0, duplicate: 0.0, reorder: 0.0, delay: Duration::from_millis(10), jitter: Duration::ZERO }
    }
}

pub struct Node<P: CryptoProvider> {
    pub device: Device<P>,
    pub addr: SocketAddr,
    pub tunnel_ip: Ipv4Addr,
    /// IP packets the device handed to its "TUN".
    pub delivered: Vec<Vec<u8>>,
    pub events: Vec<Event>,
    pub drops: Vec<DropReason>,
    /// Every datagram this node sent (for replay tests).
    pub sent_log: Vec<Vec<u8>>,
    /// Inbound datagrams dropped on the floor by the node (network partition).
    pub offline: bool,
}

/// Datagrams on the virtual wire, each with what the simulator needs to
/// deliver it (`T`), taken out in the order they arrive, and in the order
/// they were sent when several arrive at the same instant.
pub struct InFlightQueue<T> {
    heap: BinaryHeap<Reverse<InFlight<T>>>,
    seq: u64,
}

struct InFlight<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for InFlight<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for InFlight<T> {}
impl<T> PartialOrd for InFlight<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for InFlight<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

impl<T> InFlightQueue<T> {
    pub fn new() -> Self {
        InFlightQueue { heap: BinaryHeap::new(), seq: 0 }
    }

    /// Puts `item` on the wire, arriving at `at`.
    pub fn push(&mut self, at: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Reverse(InFlight { at, seq: self.seq, item }));
    }

    /// When the next datagram arrives.
    pub fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(f)| f.at)
    }

    /// The next datagram that has arrived by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_at()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(f)| f.item)
    }
}

impl<T> Default for InFlightQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Decides whether a datagram from node `usize` enters the network.
pub type Filter = Box<dyn FnMut(usize, &[u8]) -> bool>;

pub struct Sim<P: CryptoProvider> {
    pub nodes: Vec<Node<P>>,
    pub now: Instant,
    pub net: NetConfig,
    rng: ChaCha20Rng,
    queue: InFlightQueue<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// A filter applied to every datagram before it enters the network:
    /// return false to drop it. Arguments: sender index, bytes.
    pub filter: Option<Filter>,
    pub datagrams_sent: u64,
}

pub const WALL_START: WallTime = WallTime::new(1_700_000_000, 0);

pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

impl<P: CryptoProvider> Sim<P> {
    pub fn new(seed: u64, net: NetConfig) -> Self {
        Sim {
            nodes: Vec::new(),
            now: Instant::from_duration(Duration::from_secs(1000)),
            net,
            rng: ChaCha20Rng::seed_from_u64(seed),
            queue: InFlightQueue::new(),
            filter: None,
            datagrams_sent: 0,
        }
    }

    /// Adds a node with a random key, underlay address 10.0.x.y:51820 and
    /// tunnel address 100.64.x.y.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let key = PrivateKey::generate(&mut self.rng);
        let dev_rng = ChaCha20Rng::seed_from_u64(self.rng.gen());
        let wall = WALL_START.after(Duration::from_nanos(self.now.as_nanos()));
        let device = Device::<P>::new(key, dev_rng, DeviceConfig::default(), self.now, wall);
        let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
        self.nodes.push(Node {
            device,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, hi, lo)), 51820),
            tunnel_ip: Ipv4Addr::new(100, 64, hi, lo),
            delivered: Vec::new(),
            events: Vec::new(),
            drops: Vec::new(),
            sent_log: Vec::new(),
            offline: false,
        });
        i
    }

    /// Makes `a` and `b` peers of each other, each routing the other's
    /// tunnel address, with endpoints known on both sides.
    pub fn connect(&mut self, a: usize, b: usize) -> (PeerId, PeerId) {
        let pa = self.peer_config(b);
        let pb = self.peer_config(a);
        let now = self.now;
        let id_ab = self.nodes[a].device.add_peer(pa, now).unwrap();
        let id_ba = self.nodes[b].device.add_peer(pb, now).unwrap();
        (id_ab, id_ba)
    }

    pub fn peer_config(&self, of: usize) -> PeerConfig {
        let mut c = PeerConfig::new(self.nodes[of].device.public_key());
        c.endpoint = Some(self.nodes[of].addr);
        c.allowed_ips = vec![(IpAddr::V4(self.nodes[of].tunnel_ip), 32)];
        c
    }

    /// Sends a UDP-in-IPv4 packet with `payload` from node `from`'s tunnel
    /// address to `dst` through its device.
    pub fn send_ip(&mut self, from: usize, dst: Ipv4Addr, payload: &[u8]) -> Result<Encapsulated, SendError> {
        let src = self.nodes[from].tunnel_ip;
        let packet = ipv4_packet(src, dst, payload);
        self.send_raw(from, &packet)
    }

    /// Sends like [`Sim::send_ip`], requiring success, whatever the outcome.
    pub fn push_ip(&mut self, from: usize, dst: Ipv4Addr, payload: &[u8]) {
        let _ = self.send_ip(from, dst, payload).unwrap_or_else(|e| panic!("send from node {from}: {e}"));
    }

    /// Sends like [`Sim::send_raw`], requiring success.
    pub fn push_raw(&mut self, from: usize, packet: &[u8]) {
        let _ = self.send_raw(from, packet).unwrap_or_else(|e| panic!("send from node {from}: {e}"));
    }

    pub fn send_raw(&mut self, from: usize, packet: &[u8]) -> Result<Encapsulated, SendError> {
        let mut buf = vec![0u8; HEADROOM + packet.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + packet.len()].copy_from_slice(packet);
        let now = self.now;
        let r = self.nodes[from].device.encapsulate(&mut buf, packet.len(), now);
        if let Ok(Encapsulated::Ready(t)) = &r {
            let t = *t;
            self.transmit(from, t.destination, buf[..t.len].to_vec());
        }
        self.drain(from);
        r
    }

    /// Puts a datagram on the wire from node `from`.
    pub fn transmit(&mut self, from: usize, to: SocketAddr, bytes: Vec<u8>) {
        self.datagrams_sent += 1;
        self.nodes[from].sent_log.push(bytes.clone());
        if let Some(f) = self.filter.as_mut() {
            if !f(from, &bytes) {
                return;
            }
        }
        let src = self.nodes[from].addr;
        self.inject(src, to, bytes);
    }

    /// Puts a datagram on the wire from any address (e.g. a spoofed one).
    pub fn inject(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        if self.rng.gen_bool(self.net.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(self.net.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut delay = self.net.delay;
            if !self.net.jitter.is_zero() {
                delay += Duration::from_nanos(self.rng.gen_range(0..self.net.jitter.as_nanos() as u64));
            }
            if self.rng.gen_bool(self.net.reorder) {
                delay += Duration::from_millis(self.rng.gen_range(1..50));
            }
            self.queue.push(self.now + delay, (from, to, bytes.clone()));
        }
    }

    /// Drains a node's pending output and events.
    pub fn drain(&mut self, i: usize) {
        let mut buf = vec![0u8; 70000];
        loop {
            let now = self.now;
            match self.nodes[i].device.poll_transmit(now, &mut buf) {
                Ok(Some(t)) => {
                    let bytes = buf[..t.len].to_vec();
                    self.transmit(i, t.destination, bytes);
                }
                Ok(None) => break,
                Err(e) => panic!("poll_transmit: {e}"),
            }
        }
        while let Some(e) = self.nodes[i].device.poll_event() {
            self.nodes[i].events.push(e);
        }
    }

    /// Delivers a datagram to whichever node has address `to`.
    pub fn deliver(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        mut bytes: Vec<u8>,
    ) -> Option<Result<Received, DropReason>> {
        let i = self.nodes.iter().position(|n| n.addr == to)?;
        if self.nodes[i].offline {
            return None;
        }
        let now = self.now;
        let r = self.nodes[i].device.handle_datagram(from, &mut bytes, now);
        match &r {
            Ok(Received::Packet { range, .. }) => self.nodes[i].delivered.push(bytes[range.clone()].to_vec()),
            Ok(_) => {}
            Err(reason) => self.nodes[i].drops.push(*reason),
        }
        self.drain(i);
        Some(r)
    }

    /// The next time something happens: a delivery or a device deadline.
    pub fn next_event(&self) -> Option<Instant> {
        let net = self.queue.next_at();
        let timers = self.nodes.iter().filter_map(|n| n.device.poll_timeout()).min();
        match (net, timers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Processes everything due at the earliest deadline, if it is before
    /// `limit`. Returns false when nothing is left before `limit`.
    pub fn step(&mut self, limit: Instant) -> bool {
        let Some(t) = self.next_event() else {
            self.now = self.now.max(limit);
            return false;
        };
        if t > limit {
            self.now = limit;
            return false;
        }
        self.now = self.now.max(t);
        while let Some((from, to, bytes)) = self.queue.pop_due(self.now) {
            self.deliver(from, to, bytes);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].device.poll_timeout().is_some_and(|d| d <= self.now) {
                let now = self.now;
                self.nodes[i].device.handle_timeout(now);
                self.drain(i);
            }
        }
        true
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step(limit) {}
    }

    /// Runs until `cond` holds or `d` of virtual time passed; returns whether it held.
    pub fn run_until(&mut self, d: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let limit = self.now + d;
        loop {
            if cond(self) {
                return true;
            }
            if !self.step(limit) {
                return cond(self);
            }
        }
    }

    pub fn count_drops(&self, node: usize, reason: DropReason) -> usize {
        self.nodes[node].drops.iter().filter(|r| **r == reason).count()
    }

    pub fn handshakes_completed(&self, node: usize) -> usize {
        self.nodes[node].events.iter().filter(|e| matches!(e, Event::HandshakeCompleted { .. })).count()
    }

    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }
}
