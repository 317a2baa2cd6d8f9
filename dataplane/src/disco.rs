//! Path discovery in the data plane: the demultiplexing of the WireGuard
//! socket (WireGuard, STUN and disco probes share it), and [`PathAgent`], the
//! core's [`Disco`] plus a STUN client, run by the worker beside its device.
//!
//! The agent only exists on a device whose owner turned it on
//! ([`crate::driver::Control::set_disco`]); without it the worker hands every
//! datagram to the device as before, so wg(8) and wireguard-go interop is
//! untouched.
//!
//! STUN requests leave from the WireGuard socket itself, so the reflexive
//! address they learn is the one peers must send to; it is added to the
//! local endpoints the probes advertise. A chosen direct path turns the
//! peer's WireGuard roaming off and sets its endpoint; with no working path
//! the peer is left to WireGuard's own endpoint and roaming. Relay paths
//! exist only once the agent holds a [`RelayLink`] ([`PathAgent::set_relay`]):
//! then every peer is reachable through the relay, relay-bound probes go into
//! the link and probes from it come back through
//! [`PathAgent::handle_relay_probe`]. Without a link (the worker sets none
//! yet) relay-bound probes are counted and dropped and no peer is ever moved
//! to the relay.

use crate::driver::Device;
use crate::relay::{RelayDatagram, RelayLink, RelayLinkCounts};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use wiremesh_core::disco::{
    is_disco, Destination, Disco, DiscoConfig, DiscoStats, Path, PathChanged, Source, MAX_MESSAGE_LEN, RELAY_ENDPOINT,
};
use wiremesh_core::keys::{PrivateKey, PublicKey};
use wiremesh_core::stun::{self, Class, TransactionId, BINDING_REQUEST_LEN};
use wiremesh_core::{Instant, WallTime};

/// How often the reflexive address is asked for once known, while every
/// peer has a direct path.
pub const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// How often it is asked for while some peer has none (a NAT that changed
/// its mapping, or lifted a block, shows up sooner, and the new address
/// travels to the peers in call-me-maybe).
pub const STUN_INTERVAL_INDIRECT: Duration = Duration::from_secs(5);
/// How often it is asked for while no answer came.
pub const STUN_RETRY: Duration = Duration::from_secs(2);

/// What a datagram on the WireGuard socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Anything else: the WireGuard device judges it.
    WireGuard,
    /// A STUN Binding message.
    Stun,
    /// A disco probe.
    Probe,
}

/// Classifies a datagram with a few byte compares. A probe starts with `W`
/// and a STUN message with 0x00 or 0x01 and the magic cookie; no WireGuard
/// message passes either test.
#[inline]
pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(b'W') if is_disco(buf) => Kind::Probe,
        Some(0 | 1) if stun::is_stun(buf) => Kind::Stun,
        _ => Kind::WireGuard,
    }
}

/// What the owner of a device tells its path agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoSettings {
    /// Where to send STUN Binding requests (the relay's STUN port, or any
    /// standard STUN server); `None`: no reflexive address is learned.
    pub stun_server: Option<SocketAddr>,
    /// The node's own endpoints (local addresses with the listen port).
    pub local_endpoints: Vec<SocketAddr>,
    /// Each peer's candidate endpoints, as the control server reported them.
    pub peers: Vec<(PublicKey, Vec<SocketAddr>)>,
}

/// What the path agent knows, for the node agent and the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoStatus {
    /// The reflexive address the last STUN answer reported.
    pub reflexive: Option<SocketAddr>,
    /// Each peer's chosen path and its round-trip time.
    pub paths: Vec<(PublicKey, Option<Path>, Option<Duration>)>,
    /// The probe counters.
    pub stats: DiscoStats,
    /// STUN answers accepted.
    pub stun_answers: u64,
    /// STUN messages refused (malformed, unsolicited, from elsewhere).
    pub stun_refused: u64,
    /// Probes that needed the relay while no relay link was set.
    pub relay_dropped: u64,
    /// The relay link's counters, while one is set.
    pub relay: Option<RelayLinkCounts>,
}

/// What [`PathAgent::poll_relayed`] found.
#[derive(Debug)]
pub enum Relayed {
    /// Nothing waiting.
    Empty,
    /// A probe or STUN message, dealt with.
    Handled,
    /// A WireGuard message for the device.
    WireGuard(RelayDatagram),
}

/// The core's [`Disco`] and a STUN client for one device key.
pub struct PathAgent {
    disco: Disco<StdRng>,
    rng: StdRng,
    settings: DiscoSettings,
    stun_pending: Option<TransactionId>,
    next_stun: Instant,
    reflexive: Option<SocketAddr>,
    stun_answers: u64,
    stun_refused: u64,
    relay_dropped: u64,
    relay: Option<RelayLink>,
}

impl PathAgent {
    /// An agent for the device with `private_key`, configured by `settings`.
    pub fn new(private_key: PrivateKey, settings: DiscoSettings, wall: WallTime, now: Instant) -> PathAgent {
        let disco = Disco::new(private_key, StdRng::from_entropy(), DiscoConfig::default(), wall);
        let mut agent = PathAgent {
            disco,
            rng: StdRng::from_entropy(),
            settings: DiscoSettings::default(),
            stun_pending: None,
            next_stun: now,
            reflexive: None,
            stun_answers: 0,
            stun_refused: 0,
            relay_dropped: 0,
            relay: None,
        };
        agent.apply(settings, now);
        agent
    }

    /// The device key this agent probes for.
    pub fn public_key(&self) -> PublicKey {
        self.disco.public_key()
    }

    /// Applies new settings: peers added, removed or given new endpoints.
    pub fn apply(&mut self, settings: DiscoSettings, now: Instant) {
        let old: BTreeMap<PublicKey, Vec<SocketAddr>> = self.settings.peers.iter().cloned().collect();
        let new: BTreeMap<PublicKey, Vec<SocketAddr>> = settings.peers.iter().cloned().collect();
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            self.disco.remove_peer(key);
        }
        for (key, endpoints) in &new {
            if !old.contains_key(key) {
                // Our own key or a low-order one: such a peer is not probed.
                if self.disco.add_peer(*key, now).is_err() {
                    continue;
                }
                self.disco.set_peer_relay(key, self.relay.is_some(), now);
            } else if old.get(key) == Some(endpoints) {
                continue;
            }
            self.disco.set_peer_endpoints(key, endpoints, now);
        }
        if settings.stun_server != self.settings.stun_server {
            self.stun_pending = None;
            self.reflexive = None;
            self.next_stun = now;
        }
        self.settings = settings;
        self.push_local(now);
    }

    fn push_local(&mut self, now: Instant) {
        let mut local = self.settings.local_endpoints.clone();
        if let Some(r) = self.reflexive.filter(|r| !local.contains(r)) {
            local.insert(0, r);
        }
        self.disco.set_local_endpoints(&local, now);
    }

    /// Handles a probe that arrived from `from`; `false` if it was refused
    /// (counted in [`DiscoStats`]).
    pub fn handle_probe(&mut self, from: SocketAddr, buf: &[u8], now: Instant) -> bool {
        self.disco.handle_datagram(Source::Direct(from), buf, now).is_ok()
    }

    /// Sets (or with `None` removes) the link to a relay client: while set,
    /// every peer is reachable through the relay, probes for the relay go
    /// into it, and [`PathAgent::relay_recv`] drains what the relay sent.
    pub fn set_relay(&mut self, link: Option<RelayLink>, now: Instant) {
        let on = link.is_some();
        self.relay = link;
        for (key, _) in &self.settings.peers {
            self.disco.set_peer_relay(key, on, now);
        }
    }

    /// Takes the relay link away (to move it to a new agent); every peer
    /// loses its relay path.
    pub fn take_relay(&mut self, now: Instant) -> Option<RelayLink> {
        let link = self.relay.take();
        if link.is_some() {
            for (key, _) in &self.settings.peers {
                self.disco.set_peer_relay(key, false, now);
            }
        }
        link
    }

    /// Handles a probe that came through the relay; `false` if refused.
    pub fn handle_relay_probe(&mut self, buf: &[u8], now: Instant) -> bool {
        self.disco.handle_datagram(Source::Relay, buf, now).is_ok()
    }

    /// The next datagram the relay delivered (a probe, or a WireGuard
    /// message for the device from [`crate::relay::RELAY_ENDPOINT`]).
    pub fn relay_recv(&mut self) -> Option<RelayDatagram> {
        self.relay.as_mut()?.try_recv()
    }

    /// Asks STUN for the reflexive address at the next turn (the owner saw
    /// a sign the NAT changed: its relay connection was reset).
    pub fn stun_now(&mut self) {
        self.next_stun = Instant::ZERO;
    }

    /// Takes the next datagram the relay delivered: a probe is handled here
    /// and a relayed STUN message refused (STUN is only spoken directly);
    /// a WireGuard message is returned for the device (as a datagram from
    /// [`RELAY_ENDPOINT`]).
    pub fn poll_relayed(&mut self, now: Instant) -> Relayed {
        let Some(dg) = self.relay_recv() else { return Relayed::Empty };
        match classify(&dg.bytes) {
            Kind::Probe => {
                self.handle_relay_probe(&dg.bytes, now);
            }
            Kind::Stun => self.stun_refused += 1,
            Kind::WireGuard => return Relayed::WireGuard(dg),
        }
        Relayed::Handled
    }

    /// Queues a datagram for `peer` through the relay; `false` (counted in
    /// the link, or in `relay_dropped` without one) when it cannot go.
    pub fn relay_send(&mut self, peer: PublicKey, buf: &[u8]) -> bool {
        match &self.relay {
            Some(link) => link.send(peer, buf),
            None => {
                self.relay_dropped += 1;
                false
            }
        }
    }

    /// Handles a STUN message from `from`: an answer to our pending request
    /// from our STUN server sets the reflexive address. `false` if refused.
    pub fn handle_stun(&mut self, from: SocketAddr, buf: &[u8], now: Instant) -> bool {
        let ok = match (stun::parse(buf), self.stun_pending, self.settings.stun_server) {
            (Ok(m), Some(tx), Some(server))
                if from == server && m.class == Class::Success && m.transaction_id == tx =>
            {
                m.mapped
            }
            _ => None,
        };
        let Some(mapped) = ok else {
            self.stun_refused += 1;
            return false;
        };
        self.stun_answers += 1;
        self.stun_pending = None;
        let all_direct = self.settings.peers.iter().all(|(k, _)| matches!(self.disco.path(k), Some(Path::Direct(_))));
        self.next_stun = now.saturating_add(if all_direct { STUN_INTERVAL } else { STUN_INTERVAL_INDIRECT });
        if self.reflexive != Some(mapped) {
            self.reflexive = Some(mapped);
            self.push_local(now);
        }
        true
    }

    /// When [`PathAgent::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stun = self.settings.stun_server.map(|_| self.next_stun);
        match (self.disco.poll_timeout(), stun) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the probe timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.disco.poll_timeout().is_some_and(|t| t <= now) {
            self.disco.handle_timeout(now);
        }
    }

    /// The next datagram to send from the WireGuard socket, written into
    /// `buf` (at least [`MAX_MESSAGE_LEN`] bytes): a STUN request when one is
    /// due, else a probe. Returns its destination and length.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        if let Some(server) = self.settings.stun_server.filter(|_| self.next_stun <= now) {
            let mut tx = [0u8; stun::TRANSACTION_ID_LEN];
            self.rng.fill_bytes(&mut tx);
            if let Ok(n) = stun::encode_binding_request(&tx, &mut buf[..BINDING_REQUEST_LEN]) {
                self.stun_pending = Some(tx);
                self.next_stun = now.saturating_add(STUN_RETRY);
                return Some((server, n));
            }
        }
        loop {
            match self.disco.poll_transmit(&mut buf[..MAX_MESSAGE_LEN]) {
                Ok(Some(t)) => match t.destination {
                    Destination::Direct(to) => return Some((to, t.len)),
                    Destination::Relay => {
                        let peer = t.peer;
                        let _ = self.relay_send(peer, &buf[..t.len]);
                    }
                },
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next change of a peer's chosen path.
    pub fn poll_event(&mut self) -> Option<PathChanged> {
        let change = self.disco.poll_event()?;
        if !matches!(change.path, Some(Path::Direct(_))) {
            // A direct path died: the NAT may have a new mapping for us.
            self.next_stun = Instant::ZERO;
        }
        Some(change)
    }

    /// What the agent knows.
    pub fn status(&self) -> DiscoStatus {
        DiscoStatus {
            reflexive: self.reflexive,
            paths: self.settings.peers.iter().map(|(k, _)| (*k, self.disco.path(k), self.disco.rtt(k))).collect(),
            stats: self.disco.stats(),
            stun_answers: self.stun_answers,
            stun_refused: self.stun_refused,
            relay_dropped: self.relay_dropped,
            relay: self.relay.as_ref().map(RelayLink::stats),
        }
    }

    /// Puts every peer's chosen direct path on `device` (after the device
    /// was re-created or reconfigured).
    pub(crate) fn apply_all(&self, device: &mut Device) {
        for (key, _) in &self.settings.peers {
            apply_path(device, PathChanged { peer: *key, path: self.disco.path(key) });
        }
    }
}

/// Applies a path change to the device: a direct path or the relay pins
/// the endpoint (the relay as [`RELAY_ENDPOINT`], which the worker diverts
/// into the relay link) with roaming off, so WireGuard's roaming cannot
/// undo the choice; no path hands the peer back to WireGuard's own
/// endpoint and roaming.
pub(crate) fn apply_path(device: &mut Device, change: PathChanged) {
    let Some(id) = device.peer_by_key(&change.peer) else { return };
    match change.path {
        Some(path) => {
            let _ = device.set_peer_roaming(id, false);
            let _ = device.set_peer_endpoint(id, Some(path.endpoint()));
        }
        None => release_peer(device, id),
    }
}

/// Makes, updates or drops `agent` after a change of `settings` or of the
/// device key, and puts its chosen paths on `device` (the TUN worker's and
/// the netstack's shared step). A new key gets a new agent, to which the
/// relay link moves; without settings or a key the agent goes, its link is
/// kept in `parked`, and every peer is handed back to WireGuard's roaming.
pub(crate) fn refresh_agent(
    agent: &mut Option<PathAgent>,
    parked: &mut Option<RelayLink>,
    settings: Option<&DiscoSettings>,
    key: Option<PrivateKey>,
    wall: WallTime,
    device: Option<&mut Device>,
    now: Instant,
) {
    match (settings, key) {
        (Some(settings), Some(key)) => {
            match agent.as_mut().filter(|a| a.public_key() == key.public_key()) {
                Some(a) => a.apply(settings.clone(), now),
                None => {
                    let link = agent.as_mut().and_then(|a| a.take_relay(now)).or(parked.take());
                    let mut fresh = PathAgent::new(key, settings.clone(), wall, now);
                    if link.is_some() {
                        fresh.set_relay(link, now);
                    }
                    *agent = Some(fresh);
                }
            }
            if let (Some(a), Some(device)) = (agent.as_ref(), device) {
                a.apply_all(device);
            }
        }
        _ => {
            if let Some(mut a) = agent.take() {
                *parked = a.take_relay(now);
                if let Some(device) = device {
                    let ids: Vec<_> = device.peer_ids().collect();
                    for id in ids {
                        release_peer(device, id);
                    }
                }
            }
        }
    }
}

/// Gives `agent` the relay link (or takes it away), or keeps it in
/// `parked` while there is no agent.
pub(crate) fn set_relay_link(
    agent: &mut Option<PathAgent>,
    parked: &mut Option<RelayLink>,
    link: Option<RelayLink>,
    now: Instant,
) {
    match agent.as_mut() {
        Some(a) => {
            a.set_relay(link, now);
            *parked = None;
        }
        None => *parked = link,
    }
}

/// Hands a peer back to WireGuard's own roaming; a relay endpoint left on
/// it is cleared (nothing can be sent there without the agent).
pub(crate) fn release_peer(device: &mut Device, id: wiremesh_core::device::PeerId) {
    let _ = device.set_peer_roaming(id, true);
    if device.peer_endpoint(id) == Some(RELAY_ENDPOINT) {
        let _ = device.set_peer_endpoint(id, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn addr(a: u8, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, a), port))
    }

    fn wall() -> WallTime {
        WallTime { secs: 1_800_000_000, nanos: 0 }
    }

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn classify_separates_wireguard_stun_and_probes() {
        // WireGuard messages of every type, with any index bytes.
        for ty in 1u8..=4 {
            let mut m = vec![0u8; 148];
            m[0] = ty;
            m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
            assert_eq!(classify(&m), Kind::WireGuard, "type {ty}");
        }
        let mut req = [0u8; BINDING_REQUEST_LEN];
        let n = stun::encode_binding_request(&[7; 12], &mut req).unwrap();
        assert_eq!(classify(&req[..n]), Kind::Stun);
        let mut resp = [0u8; 64];
        let n = stun::encode_binding_response(&[7; 12], addr(1, 5), &mut resp).unwrap();
        assert_eq!(classify(&resp[..n]), Kind::Stun);
        let mut probe = vec![0u8; 80];
        probe[..6].copy_from_slice(&wiremesh_core::disco::MAGIC);
        assert_eq!(classify(&probe), Kind::Probe);
        // A short `W...` datagram is not a probe; the device refuses it.
        assert_eq!(classify(&probe[..10]), Kind::WireGuard);
        assert_eq!(classify(&[]), Kind::WireGuard);
    }

    /// Two agents wired by hand: each sends what it polls to the other (as
    /// from its address), and both end on the direct path to the other.
    #[test]
    fn two_agents_find_the_direct_path() {
        let ka = PrivateKey::from_bytes([1; 32]);
        let kb = PrivateKey::from_bytes([2; 32]);
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let (aa, ab) = (addr(1, 51820), addr(2, 51820));
        let sa = DiscoSettings { stun_server: None, local_endpoints: vec![aa], peers: vec![(pb, vec![ab])] };
        let sb = DiscoSettings { stun_server: None, local_endpoints: vec![ab], peers: vec![(pa, vec![aa])] };
        let mut a = PathAgent::new(ka, sa, wall(), at(0));
        let mut b = PathAgent::new(kb, sb, wall(), at(0));
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let mut events = Vec::new();
        for step in 0..20u64 {
            let now = at(step * 10);
            a.handle_timeout(now);
            b.handle_timeout(now);
            while let Some((to, n)) = a.poll_transmit(now, &mut buf) {
                assert_eq!(to, ab);
                assert_eq!(classify(&buf[..n]), Kind::Probe);
                b.handle_probe(aa, &buf[..n], now);
            }
            while let Some((to, n)) = b.poll_transmit(now, &mut buf) {
                assert_eq!(to, aa);
                a.handle_probe(ab, &buf[..n], now);
            }
            while let Some(e) = a.poll_event() {
                events.push(e);
            }
        }
        assert_eq!(a.status().paths, vec![(pb, Some(Path::Direct(ab)), a.status().paths[0].2)]);
        assert!(a.status().paths[0].2.is_some());
        assert_eq!(b.status().paths[0].1, Some(Path::Direct(aa)));
        assert!(events.contains(&PathChanged { peer: pb, path: Some(Path::Direct(ab)) }));
        // A probe from a third key is refused and counted.
        let kc = PrivateKey::from_bytes([3; 32]);
        let mut c = PathAgent::new(
            kc,
            DiscoSettings { stun_server: None, local_endpoints: vec![], peers: vec![(pa, vec![aa])] },
            wall(),
            at(0),
        );
        c.handle_timeout(at(0));
        let (_, n) = c.poll_transmit(at(0), &mut buf).unwrap();
        let before = a.status().stats;
        assert!(!a.handle_probe(addr(3, 1), &buf[..n], at(300)));
        assert_ne!(a.status().stats, before);
        // Replayed: a genuine probe delivered twice is accepted once.
        b.handle_timeout(at(10_000));
        let (_, n) = b.poll_transmit(at(10_000), &mut buf).unwrap();
        assert!(a.handle_probe(ab, &buf[..n], at(10_000)));
        assert!(!a.handle_probe(ab, &buf[..n], at(10_000)));
    }

    /// Two agents whose direct probes are all lost (a blocked NAT) but
    /// which hold relay links: the probes cross the links (forwarded here by
    /// node key, as the relay does) and both settle on the relay path;
    /// taking the link away leaves no path.
    #[tokio::test]
    async fn with_a_relay_link_probes_cross_the_relay_and_the_path_is_the_relay() {
        let ka = PrivateKey::from_bytes([1; 32]);
        let kb = PrivateKey::from_bytes([2; 32]);
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let (aa, ab) = (addr(1, 51820), addr(2, 51820));
        let sa = DiscoSettings { stun_server: None, local_endpoints: vec![aa], peers: vec![(pb, vec![ab])] };
        let sb = DiscoSettings { stun_server: None, local_endpoints: vec![ab], peers: vec![(pa, vec![aa])] };
        let mut a = PathAgent::new(ka, sa, wall(), at(0));
        let mut b = PathAgent::new(kb, sb, wall(), at(0));
        let wake: std::sync::Arc<dyn Fn() + Send + Sync> = std::sync::Arc::new(|| {});
        let (la, mut port_a) = crate::relay::link(64, wake.clone());
        let (lb, mut port_b) = crate::relay::link(64, wake);
        a.set_relay(Some(la), at(0));
        b.set_relay(Some(lb), at(0));
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let mut relayed = 0;
        for step in 0..50u64 {
            let now = at(step * 10);
            a.handle_timeout(now);
            b.handle_timeout(now);
            // Direct probes are lost.
            while a.poll_transmit(now, &mut buf).is_some() {}
            while b.poll_transmit(now, &mut buf).is_some() {}
            while let Some(d) = port_a.try_next_outbound() {
                assert_eq!(d.peer, pb);
                assert!(port_b.deliver(pa, &d.bytes).await);
            }
            while let Some(d) = port_b.try_next_outbound() {
                assert_eq!(d.peer, pa);
                assert!(port_a.deliver(pb, &d.bytes).await);
            }
            while let Some(d) = b.relay_recv() {
                assert_eq!((d.peer, classify(&d.bytes)), (pa, Kind::Probe));
                assert!(b.handle_relay_probe(&d.bytes, now));
                relayed += 1;
            }
            while let Some(d) = a.relay_recv() {
                assert_eq!((d.peer, classify(&d.bytes)), (pb, Kind::Probe));
                assert!(a.handle_relay_probe(&d.bytes, now));
                relayed += 1;
            }
        }
        assert!(relayed > 0);
        assert_eq!(a.status().paths[0].1, Some(Path::Relay));
        assert_eq!(b.status().paths[0].1, Some(Path::Relay));
        let s = a.status();
        assert_eq!(s.relay_dropped, 0);
        let link = s.relay.unwrap();
        assert!(link.sent > 0 && link.received > 0 && link.send_dropped == 0);
        // A WireGuard datagram for the peer goes the same way.
        assert!(a.relay_send(pb, &[4u8; 32]));
        assert_eq!(port_a.try_next_outbound().map(|d| (d.peer, d.bytes.len())), Some((pb, 32)));
        // Without the link the relay is no path, and sends are counted drops.
        a.set_relay(None, at(600));
        assert_eq!(a.status().paths[0].1, None);
        assert_eq!(a.status().relay, None);
        assert!(!a.relay_send(pb, &[4u8; 32]));
        assert_eq!(a.status().relay_dropped, 1);
    }

    #[test]
    fn stun_is_asked_sooner_while_a_peer_has_no_direct_path() {
        let server = addr(9, 3478);
        let peer = PrivateKey::from_bytes([2; 32]).public_key();
        let settings = DiscoSettings {
            stun_server: Some(server),
            local_endpoints: vec![addr(1, 51820)],
            peers: vec![(peer, vec![addr(2, 51820)])],
        };
        let mut a = PathAgent::new(PrivateKey::from_bytes([1; 32]), settings, wall(), at(0));
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let (to, n) = a.poll_transmit(at(0), &mut buf).unwrap();
        assert_eq!(to, server, "STUN goes first");
        let req = stun::parse(&buf[..n]).unwrap();
        let mut resp = [0u8; 64];
        let m = stun::encode_binding_response(&req.transaction_id, addr(200, 40000), &mut resp).unwrap();
        assert!(a.handle_stun(server, &resp[..m], at(1)));
        // The peer has no direct path: asked again after the shorter interval.
        assert_eq!(a.next_stun, at(1).saturating_add(STUN_INTERVAL_INDIRECT));
        // A path change to anything but a direct path makes it due at once.
        let (link, _port) = crate::relay::link(4, std::sync::Arc::new(|| {}));
        a.set_relay(Some(link), at(2));
        let mut changes = 0;
        while let Some(c) = a.poll_event() {
            assert_eq!(c.path, Some(Path::Relay));
            changes += 1;
        }
        assert_eq!(changes, 1);
        assert!(a.poll_timeout().is_some_and(|t| t <= at(2)));
        let (to, _) = a.poll_transmit(at(2), &mut buf).unwrap();
        assert_eq!(to, server);
        // The owner may ask for it at once too (a relay connection reset).
        let n = stun::encode_binding_response(
            &stun::parse(&buf[..BINDING_REQUEST_LEN]).unwrap().transaction_id,
            addr(200, 40001),
            &mut resp,
        )
        .unwrap();
        assert!(a.handle_stun(server, &resp[..n], at(3)));
        assert!(a.next_stun > at(3));
        a.stun_now();
        assert!(a.poll_timeout().is_some_and(|t| t <= at(3)));
        assert_eq!(a.poll_transmit(at(3), &mut buf).map(|(to, _)| to), Some(server));
    }

    #[test]
    fn stun_learns_the_reflexive_address_and_advertises_it() {
        let server = addr(9, 3478);
        let key = PrivateKey::from_bytes([1; 32]);
        let settings =
            DiscoSettings { stun_server: Some(server), local_endpoints: vec![addr(1, 51820)], peers: vec![] };
        let mut a = PathAgent::new(key, settings, wall(), at(0));
        assert_eq!(a.poll_timeout(), Some(at(0)));
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let (to, n) = a.poll_transmit(at(0), &mut buf).unwrap();
        assert_eq!(to, server);
        let req = stun::parse(&buf[..n]).unwrap();
        assert_eq!(req.class, Class::Request);
        // Not again until the retry interval.
        assert!(a.poll_transmit(at(1), &mut buf).is_none());
        let mut resp = [0u8; 64];
        let reflexive = addr(200, 40000);
        // From the wrong address, or for another transaction: refused.
        let n = stun::encode_binding_response(&req.transaction_id, reflexive, &mut resp).unwrap();
        assert!(!a.handle_stun(addr(8, 3478), &resp[..n], at(2)));
        let m = stun::encode_binding_response(&[0; 12], reflexive, &mut resp[..]).unwrap();
        assert!(!a.handle_stun(server, &resp[..m], at(2)));
        assert!(!a.handle_stun(server, b"garbage", at(2)));
        let n = stun::encode_binding_response(&req.transaction_id, reflexive, &mut resp).unwrap();
        assert!(a.handle_stun(server, &resp[..n], at(3)));
        // Answered once only.
        assert!(!a.handle_stun(server, &resp[..n], at(3)));
        let s = a.status();
        assert_eq!((s.reflexive, s.stun_answers, s.stun_refused), (Some(reflexive), 1, 4));
        assert_eq!(a.poll_timeout(), Some(at(3).saturating_add(STUN_INTERVAL)));
    }
}
