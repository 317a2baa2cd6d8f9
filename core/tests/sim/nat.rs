//! A deterministic simulator of nodes behind NATs: each node runs a
//! WireGuard [`Device`] and a [`Disco`] path machine on one UDP "socket",
//! reaches a STUN server and a relay, and sits behind a NAT model with
//! endpoint-independent, address-dependent or address-and-port-dependent
//! mapping and filtering. Virtual time jumps to the earliest deadline.
//!
//! The relay is a reliable, slower hop (a TLS stream in the real system)
//! that NATs do not filter, because nodes connect to it outbound.

#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use wiremesh_core::device::{DeviceConfig, Encapsulated, Event, PeerConfig, Received, HEADROOM, TAILROOM};
use wiremesh_core::disco::{self, Destination, Disco, DiscoConfig, Path, Source, RELAY_ENDPOINT};
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_core::stun;
use wiremesh_core::{Instant, WallTime};

use crate::sim::InFlightQueue;

pub type Device = wiremesh_core::device::Device<ChaCha20Rng>;

pub const STUN_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 3478);
pub const WALL_START: WallTime = WallTime::new(1_700_000_000, 0);
/// How often a node repeats its STUN request (as the agent does).
pub const STUN_INTERVAL: Duration = Duration::from_secs(10);

/// How a NAT's mapping or filtering depends on the remote endpoint (RFC 4787).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependence {
    Independent,
    Address,
    AddressAndPort,
}

struct Mapping {
    internal: SocketAddr,
    /// The remote part the mapping is keyed on (`None` for independent).
    remote: Option<SocketAddr>,
    external_port: u16,
    /// Remote endpoints the inside sent to through this mapping.
    contacted: Vec<SocketAddr>,
}

pub struct Nat {
    pub mapping: Dependence,
    pub filtering: Dependence,
    pub public_ip: Ipv4Addr,
    /// Ports drawn at random (a "symmetric" NAT) instead of counted up.
    pub random_ports: bool,
    next_port: u16,
    maps: Vec<Mapping>,
}

impl Nat {
    pub fn new(mapping: Dependence, filtering: Dependence, public_ip: Ipv4Addr) -> Self {
        let random_ports = mapping == Dependence::AddressAndPort;
        Nat { mapping, filtering, public_ip, random_ports, next_port: 20000, maps: Vec::new() }
    }

    fn key(&self, dst: SocketAddr) -> Option<SocketAddr> {
        match self.mapping {
            Dependence::Independent => None,
            Dependence::Address => Some(SocketAddr::new(dst.ip(), 0)),
            Dependence::AddressAndPort => Some(dst),
        }
    }

    /// Translates an outbound datagram's source, creating a mapping if needed.
    pub fn outbound(&mut self, internal: SocketAddr, dst: SocketAddr, rng: &mut ChaCha20Rng) -> SocketAddr {
        let key = self.key(dst);
        let i = match self.maps.iter().position(|m| m.internal == internal && m.remote == key) {
            Some(i) => i,
            None => {
                let port = if self.random_ports {
                    loop {
                        let p = rng.gen_range(1024..65535);
                        if !self.maps.iter().any(|m| m.external_port == p) {
                            break p;
                        }
                    }
                } else {
                    self.next_port += 1;
                    self.next_port
                };
                self.maps.push(Mapping { internal, remote: key, external_port: port, contacted: Vec::new() });
                self.maps.len() - 1
            }
        };
        let m = &mut self.maps[i];
        if !m.contacted.contains(&dst) {
            m.contacted.push(dst);
        }
        SocketAddr::new(IpAddr::V4(self.public_ip), m.external_port)
    }

    /// The inside address an inbound datagram to `port` from `from` reaches, if the filter lets it.
    pub fn inbound(&self, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let m = self.maps.iter().find(|m| m.external_port == port)?;
        let allowed = match self.filtering {
            Dependence::Independent => true,
            Dependence::Address => m.contacted.iter().any(|a| a.ip() == from.ip()),
            Dependence::AddressAndPort => m.contacted.contains(&from),
        };
        allowed.then_some(m.internal)
    }

    /// Forgets every mapping (a NAT reboot or a timed-out binding): the
    /// inside gets new external ports from now on.
    pub fn rebind(&mut self) {
        self.maps.clear();
        self.next_port += 1000;
    }
}

pub struct NatNode {
    pub device: Device,
    pub disco: Disco<ChaCha20Rng>,
    pub key: PublicKey,
    /// The node's own socket address (behind its NAT, if any).
    pub local: SocketAddr,
    pub nat: Option<Nat>,
    pub tunnel_ip: Ipv4Addr,
    pub reflexive: Option<SocketAddr>,
    /// IP packets the device handed to its "TUN".
    pub delivered: Vec<Vec<u8>>,
    pub handshakes: usize,
    /// Every path change: (time, peer, new path).
    pub path_log: Vec<(Instant, PublicKey, Option<Path>)>,
    /// Every probe this node sent, as on the wire (for replay tests).
    pub probes_sent: Vec<(Destination, Vec<u8>)>,
    next_stun: Instant,
    stun_tx: stun::TransactionId,
}

enum Wire {
    Udp { from: SocketAddr, to: SocketAddr },
    Relay { from: PublicKey, to: PublicKey },
}

/// Counts of what crossed the network, by kind and way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// WireGuard transport messages sent straight over UDP.
    pub direct_data: u64,
    /// WireGuard transport messages sent through the relay.
    pub relayed_data: u64,
    /// Probes through the relay (call-me-maybe).
    pub relayed_probes: u64,
    /// Inbound datagrams a NAT's filter dropped.
    pub nat_blocked: u64,
}

pub struct NatSim {
    pub nodes: Vec<NatNode>,
    pub now: Instant,
    rng: ChaCha20Rng,
    queue: InFlightQueue<(Wire, Vec<u8>)>,
    /// Loss on direct UDP (the relay stream is reliable).
    pub udp_loss: f64,
    /// One-way delay of a direct UDP hop.
    pub udp_delay: Duration,
    /// One-way delay node to node through the relay.
    pub relay_delay: Duration,
    /// Whether the relay forwards at all.
    pub relay_up: bool,
    pub traffic: Traffic,
    pub disco_config: DiscoConfig,
}

impl NatSim {
    pub fn new(seed: u64) -> Self {
        NatSim {
            nodes: Vec::new(),
            now: Instant::from_duration(Duration::from_secs(1000)),
            rng: ChaCha20Rng::seed_from_u64(seed),
            queue: InFlightQueue::new(),
            udp_loss: 0.0,
            udp_delay: Duration::from_millis(15),
            relay_delay: Duration::from_millis(40),
            relay_up: true,
            traffic: Traffic::default(),
            disco_config: DiscoConfig::default(),
        }
    }

    /// Adds a node, behind a NAT with the given mapping and filtering or on
    /// a public address. Its local socket is 192.168.i.2:41641 behind a NAT
    /// with public address 198.51.100.i, or 198.51.100.i:41641 itself.
    pub fn add_node(&mut self, nat: Option<(Dependence, Dependence)>) -> usize {
        let i = self.nodes.len();
        let key = PrivateKey::generate(&mut self.rng);
        let public = key.public_key();
        let wall = WALL_START.after(Duration::from_nanos(self.now.as_nanos()));
        let device = Device::new(
            key.clone(),
            ChaCha20Rng::seed_from_u64(self.rng.gen()),
            DeviceConfig::default(),
            self.now,
            wall,
        );
        let disco = Disco::new(key, ChaCha20Rng::seed_from_u64(self.rng.gen()), self.disco_config, wall);
        let public_ip = Ipv4Addr::new(198, 51, 100, i as u8 + 1);
        let (local, nat) = match nat {
            Some((m, f)) => (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, i as u8 + 1, 2)), 41641),
                Some(Nat::new(m, f, public_ip)),
            ),
            None => (SocketAddr::new(IpAddr::V4(public_ip), 41641), None),
        };
        self.nodes.push(NatNode {
            device,
            disco,
            key: public,
            local,
            nat,
            tunnel_ip: Ipv4Addr::new(100, 64, 0, i as u8 + 1),
            reflexive: None,
            delivered: Vec::new(),
            handshakes: 0,
            path_log: Vec::new(),
            probes_sent: Vec::new(),
            next_stun: self.now,
            stun_tx: [0; 12],
        });
        i
    }

    /// What the control server does: makes `a` and `b` peers with each
    /// other's reported endpoints (local and STUN-reflexive) and the relay.
    pub fn connect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let mut endpoints = vec![self.nodes[y].local];
            endpoints.extend(self.nodes[y].reflexive.filter(|r| *r != self.nodes[y].local));
            let mut pc = PeerConfig::new(self.nodes[y].key);
            pc.allowed_ips = vec![(IpAddr::V4(self.nodes[y].tunnel_ip), 32)];
            let now = self.now;
            let key = self.nodes[y].key;
            let n = &mut self.nodes[x];
            let id = n.device.add_peer(pc, now).unwrap();
            n.device.set_peer_roaming(id, false).unwrap();
            n.disco.add_peer(key, now).unwrap();
            n.disco.set_peer_relay(&key, true, now);
            n.disco.set_peer_endpoints(&key, &endpoints, now);
        }
        self.drain(a);
        self.drain(b);
    }

    pub fn path(&self, from: usize, to: usize) -> Option<Path> {
        self.nodes[from].disco.path(&self.nodes[to].key)
    }

    /// The device endpoint `from` uses for `to`.
    pub fn endpoint(&self, from: usize, to: usize) -> Option<SocketAddr> {
        let d = &self.nodes[from].device;
        d.peer_endpoint(d.peer_by_key(&self.nodes[to].key)?)
    }

    /// Sends an IP packet with `payload` from node `from` to node `to` through the tunnel.
    pub fn send_ip(&mut self, from: usize, to: usize, payload: &[u8]) {
        let packet = crate::sim::ipv4_packet(self.nodes[from].tunnel_ip, self.nodes[to].tunnel_ip, payload);
        let mut buf = vec![0u8; HEADROOM + packet.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + packet.len()].copy_from_slice(&packet);
        let now = self.now;
        match self.nodes[from].device.encapsulate(&mut buf, packet.len(), now) {
            Ok(Encapsulated::Ready(t)) => {
                buf.truncate(t.len);
                self.route_wireguard(from, t.destination, t.peer, buf);
            }
            Ok(Encapsulated::Staged { .. }) => {}
            Err(e) => panic!("node {from} cannot send: {e}"),
        }
        self.drain(from);
    }

    fn route_wireguard(
        &mut self,
        from: usize,
        destination: SocketAddr,
        peer: Option<wiremesh_core::device::PeerId>,
        bytes: Vec<u8>,
    ) {
        let data = bytes.first() == Some(&4);
        if destination == RELAY_ENDPOINT {
            let Some(key) = peer.and_then(|p| self.nodes[from].device.peer_public_key(p)) else { return };
            if data {
                self.traffic.relayed_data += 1;
            }
            self.send_relay(from, key, bytes);
        } else {
            if data {
                self.traffic.direct_data += 1;
            }
            self.send_udp(from, destination, bytes);
        }
    }

    pub fn send_udp(&mut self, from: usize, to: SocketAddr, bytes: Vec<u8>) {
        let local = self.nodes[from].local;
        let src = match self.nodes[from].nat.as_mut() {
            Some(nat) => nat.outbound(local, to, &mut self.rng),
            None => local,
        };
        if self.rng.gen_bool(self.udp_loss) {
            return;
        }
        self.enqueue(self.udp_delay, Wire::Udp { from: src, to }, bytes);
    }

    fn send_relay(&mut self, from: usize, to: PublicKey, bytes: Vec<u8>) {
        if !self.relay_up {
            return;
        }
        let from = self.nodes[from].key;
        self.enqueue(self.relay_delay, Wire::Relay { from, to }, bytes);
    }

    /// Puts a datagram on the wire from any address (a spoofer, a replayer).
    pub fn inject_udp(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.enqueue(self.udp_delay, Wire::Udp { from, to }, bytes);
    }

    fn enqueue(&mut self, delay: Duration, wire: Wire, bytes: Vec<u8>) {
        self.queue.push(self.now + delay, (wire, bytes));
    }

    fn deliver(&mut self, wire: Wire, bytes: Vec<u8>) {
        match wire {
            Wire::Udp { from, to } => {
                if to == STUN_SERVER {
                    let Ok(m) = stun::parse(&bytes) else { return };
                    if m.class == stun::Class::Request {
                        let mut buf = [0u8; stun::MAX_BINDING_RESPONSE_LEN];
                        let n = stun::encode_binding_response(&m.transaction_id, from, &mut buf).unwrap();
                        self.enqueue(self.udp_delay, Wire::Udp { from: STUN_SERVER, to: from }, buf[..n].to_vec());
                    }
                    return;
                }
                let target = self.nodes.iter().position(|n| match &n.nat {
                    Some(nat) => to.ip() == IpAddr::V4(nat.public_ip),
                    None => n.local == to,
                });
                let Some(i) = target else { return };
                if let Some(nat) = &self.nodes[i].nat {
                    if nat.inbound(to.port(), from).is_none() {
                        self.traffic.nat_blocked += 1;
                        return;
                    }
                }
                self.input(i, Source::Direct(from), bytes);
            }
            Wire::Relay { from: _, to } => {
                let Some(i) = self.nodes.iter().position(|n| n.key == to) else { return };
                self.input(i, Source::Relay, bytes);
            }
        }
    }

    /// One datagram or relay frame arriving at node `i`, demultiplexed as a
    /// driver does: STUN, then probes, then WireGuard.
    fn input(&mut self, i: usize, source: Source, mut bytes: Vec<u8>) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if stun::is_stun(&bytes) {
            if let Ok(m) = stun::parse(&bytes) {
                if m.class == stun::Class::Success && m.transaction_id == n.stun_tx {
                    if let Some(mapped) = m.mapped {
                        n.reflexive = Some(mapped);
                        let mut eps = vec![n.local];
                        if mapped != n.local {
                            eps.push(mapped);
                        }
                        n.disco.set_local_endpoints(&eps, now);
                    }
                }
            }
        } else if disco::is_disco(&bytes) {
            let _ = n.disco.handle_datagram(source, &bytes, now);
        } else {
            let from = match source {
                Source::Direct(a) => a,
                Source::Relay => RELAY_ENDPOINT,
            };
            if let Ok(Received::Packet { range, .. }) = n.device.handle_datagram(from, &mut bytes, now) {
                n.delivered.push(bytes[range].to_vec());
            }
        }
        self.drain(i);
    }

    /// Drains a node's outputs: path changes into the device, then probes
    /// and WireGuard datagrams onto the wire.
    pub fn drain(&mut self, i: usize) {
        let mut buf = vec![0u8; 2048];
        loop {
            let mut progress = false;
            while let Some(ev) = self.nodes[i].disco.poll_event() {
                progress = true;
                let now = self.now;
                let n = &mut self.nodes[i];
                n.path_log.push((now, ev.peer, ev.path));
                if let Some(id) = n.device.peer_by_key(&ev.peer) {
                    n.device.set_peer_endpoint(id, ev.path.map(Path::endpoint)).unwrap();
                }
            }
            while let Some(t) = self.nodes[i].disco.poll_transmit(&mut buf).unwrap() {
                progress = true;
                let bytes = buf[..t.len].to_vec();
                self.nodes[i].probes_sent.push((t.destination, bytes.clone()));
                match t.destination {
                    Destination::Direct(a) => self.send_udp(i, a, bytes),
                    Destination::Relay => {
                        self.traffic.relayed_probes += 1;
                        self.send_relay(i, t.peer, bytes);
                    }
                }
            }
            let now = self.now;
            while let Some(t) = self.nodes[i].device.poll_transmit(now, &mut buf).unwrap() {
                progress = true;
                let bytes = buf[..t.len].to_vec();
                self.route_wireguard(i, t.destination, t.peer, bytes);
            }
            while let Some(e) = self.nodes[i].device.poll_event() {
                if matches!(e, Event::HandshakeCompleted { .. }) {
                    self.nodes[i].handshakes += 1;
                }
            }
            if !progress {
                break;
            }
        }
    }

    fn next_event(&self) -> Option<Instant> {
        let net = self.queue.next_at();
        let timers = self
            .nodes
            .iter()
            .flat_map(|n| [n.device.poll_timeout(), n.disco.poll_timeout(), Some(n.next_stun)])
            .flatten()
            .min();
        [net, timers].into_iter().flatten().min()
    }

    fn step(&mut self, limit: Instant) -> bool {
        let Some(t) = self.next_event() else {
            self.now = self.now.max(limit);
            return false;
        };
        if t > limit {
            self.now = limit;
            return false;
        }
        self.now = self.now.max(t);
        while let Some((wire, bytes)) = self.queue.pop_due(self.now) {
            self.deliver(wire, bytes);
        }
        for i in 0..self.nodes.len() {
            let now = self.now;
            if self.nodes[i].next_stun <= now {
                self.nodes[i].next_stun = now + STUN_INTERVAL;
                let tx: stun::TransactionId = self.rng.gen();
                self.nodes[i].stun_tx = tx;
                let mut b = [0u8; stun::BINDING_REQUEST_LEN];
                stun::encode_binding_request(&tx, &mut b).unwrap();
                self.send_udp(i, STUN_SERVER, b.to_vec());
            }
            if self.nodes[i].device.poll_timeout().is_some_and(|d| d <= now) {
                self.nodes[i].device.handle_timeout(now);
            }
            if self.nodes[i].disco.poll_timeout().is_some_and(|d| d <= now) {
                self.nodes[i].disco.handle_timeout(now);
            }
            self.drain(i);
        }
        true
    }

    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step(limit) {}
    }

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

    /// Sends `count` packets from `a` to `b`, one every 10 ms of virtual
    /// time, and returns how many arrived.
    pub fn stream(&mut self, a: usize, b: usize, count: usize) -> usize {
        let before = self.nodes[b].delivered.len();
        for i in 0..count {
            let mut p = (i as u32).to_be_bytes().to_vec();
            p.extend_from_slice(&[0x5a; 100]);
            self.send_ip(a, b, &p);
            self.run_for(Duration::from_millis(10));
        }
        self.run_for(Duration::from_millis(500));
        self.nodes[b].delivered.len() - before
    }

    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }
}
