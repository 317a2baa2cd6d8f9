//! Many peers behind one static key: the receiver-index table, dispatch of
//! datagrams by type and index, cryptokey routing, staged packets while a
//! handshake is in flight, timers, counters and events.
//!
//! See the crate documentation for the run loop. Every method that can
//! produce output (handshake messages, cookie replies, keepalives, staged
//! packets) leaves it for [`Device::poll_transmit`]; every method that can
//! change a deadline requires a new look at [`Device::poll_timeout`].

use crate::consts::{
    KEEPALIVE_TIMEOUT, MAX_QUEUED_PACKETS, REJECT_AFTER_TIME, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX,
};
use crate::cookie::{CookieChecker, CookieError, CookieSender, LoadMonitor, RateLimiter};
use crate::crypto::{CryptoProvider, DefaultProvider, TAG_LEN};
use crate::filter::{Filter, Firewall};
use crate::ip::parse_header;
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::messages::{
    classify, CookieReply, Initiation, MessageKind, ParseError, Response, TransportHeader, COOKIE_REPLY_LEN,
    INITIATION_LEN, PADDING_MULTIPLE, RESPONSE_LEN, TRANSPORT_HEADER_LEN,
};
use crate::noise::{begin_initiation, Handshake, HandshakeError, StaticIdentity};
use crate::routing::AllowedIps;
use crate::session::{Keypair, Keypairs, OpenError, SealError, Slot};
use crate::time::{Instant, WallTime};
use crate::timers::Timers;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};
use core::ops::Range;
use core::time::Duration;

/// Bytes the caller leaves before an outbound IP packet (the transport header).
pub const HEADROOM: usize = TRANSPORT_HEADER_LEN;
/// Bytes the caller leaves after an outbound IP packet (padding and tag).
pub const TAILROOM: usize = PADDING_MULTIPLE - 1 + TAG_LEN;
/// Events kept for [`Device::poll_event`] before the oldest are dropped.
const MAX_EVENTS: usize = 1024;

/// A peer's handle within one [`Device`]. Handles of removed peers may be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u32);

/// Why a datagram or packet was dropped. Each is counted per device and,
/// where the peer is known, per peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The datagram is no WireGuard message (bad type or length).
    Malformed,
    /// MAC1 did not match our key.
    BadMac1,
    /// Under load without a valid MAC2: a cookie reply was sent instead.
    CookieRequired,
    /// Under load, the source sent handshakes faster than its rate limit.
    RateLimited,
    /// A handshake message failed to authenticate.
    HandshakeDecrypt,
    /// An initiation from a static key that is no configured peer.
    UnknownPeer,
    /// A replayed initiation (timestamp not newer).
    StaleTimestamp,
    /// Initiations from one peer faster than 50 per second.
    HandshakeFlood,
    /// A handshake with a low-order public key.
    WeakKey,
    /// A response without a matching initiation.
    UnexpectedResponse,
    /// A cookie reply that did not authenticate or answered nothing.
    BadCookieReply,
    /// A message naming a receiver index we do not have.
    UnknownIndex,
    /// A transport counter seen before, too old, or past the limit.
    Replay,
    /// A transport message for an expired keypair.
    ExpiredKeypair,
    /// A transport message whose tag did not authenticate.
    Decrypt,
    /// A decrypted packet that is not IPv4 or IPv6.
    NotIp,
    /// A decrypted packet whose source is outside the peer's allowed IPs.
    NotAllowedSource,
    /// An outbound packet whose destination matches no peer.
    NoRoute,
    /// An outbound packet for a peer with no known endpoint.
    NoEndpoint,
    /// A staged packet pushed out by newer ones, or dropped when the
    /// handshake gave up.
    QueueOverflow,
    /// A decrypted packet the node's packet filter does not accept.
    Filtered,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 21] = [
        DropReason::Malformed,
        DropReason::BadMac1,
        DropReason::CookieRequired,
        DropReason::RateLimited,
        DropReason::HandshakeDecrypt,
        DropReason::UnknownPeer,
        DropReason::StaleTimestamp,
        DropReason::HandshakeFlood,
        DropReason::WeakKey,
        DropReason::UnexpectedResponse,
        DropReason::BadCookieReply,
        DropReason::UnknownIndex,
        DropReason::Replay,
        DropReason::ExpiredKeypair,
        DropReason::Decrypt,
        DropReason::NotIp,
        DropReason::NotAllowedSource,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::QueueOverflow,
        DropReason::Filtered,
    ];

    /// A short stable name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadMac1 => "bad_mac1",
            DropReason::CookieRequired => "cookie_required",
            DropReason::RateLimited => "rate_limited",
            DropReason::HandshakeDecrypt => "handshake_decrypt",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::StaleTimestamp => "stale_timestamp",
            DropReason::HandshakeFlood => "handshake_flood",
            DropReason::WeakKey => "weak_key",
            DropReason::UnexpectedResponse => "unexpected_response",
            DropReason::BadCookieReply => "bad_cookie_reply",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::Replay => "replay",
            DropReason::ExpiredKeypair => "expired_keypair",
            DropReason::Decrypt => "decrypt",
            DropReason::NotIp => "not_ip",
            DropReason::NotAllowedSource => "not_allowed_source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::QueueOverflow => "queue_overflow",
            DropReason::Filtered => "filtered",
        }
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::error::Error for DropReason {}

impl From<HandshakeError> for DropReason {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::Decrypt | HandshakeError::OwnKey => DropReason::HandshakeDecrypt,
            HandshakeError::WeakKey => DropReason::WeakKey,
            HandshakeError::StaleTimestamp => DropReason::StaleTimestamp,
            HandshakeError::Flood => DropReason::HandshakeFlood,
            HandshakeError::UnexpectedResponse => DropReason::UnexpectedResponse,
        }
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Packets dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    fn add(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }
}

/// Counters of one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Bytes of authenticated datagrams received from the peer.
    pub rx_bytes: u64,
    /// Bytes of datagrams sent to the peer.
    pub tx_bytes: u64,
    /// Authenticated transport messages received (keepalives included).
    pub rx_packets: u64,
    /// Transport messages sent (keepalives included).
    pub tx_packets: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<WallTime>,
    /// Drops attributed to this peer.
    pub drops: DropCounts,
}

/// A peer's configuration.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's static public key (its identity).
    pub public_key: PublicKey,
    /// An optional preshared key mixed into every handshake.
    pub preshared_key: Option<PresharedKey>,
    /// Where to send, until the peer roams.
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives sent regardless of traffic (0 or `None`: off).
    pub persistent_keepalive: Option<u16>,
    /// Prefixes routed to and accepted from this peer.
    pub allowed_ips: Vec<(IpAddr, u8)>,
}

impl PeerConfig {
    /// A peer with only a public key.
    pub fn new(public_key: PublicKey) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// Device-wide settings.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The tunnel MTU: padding never grows a packet beyond it (`None`: pad freely).
    pub mtu: Option<usize>,
    /// Handshake messages per second beyond which the device is under load.
    pub load_threshold: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig { mtu: None, load_threshold: 512 }
    }
}

/// Why a configuration change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A peer with this public key exists already.
    DuplicatePeer,
    /// The peer's public key is the device's own.
    OwnKey,
    /// No peer has this handle.
    NoSuchPeer,
    /// A prefix length beyond the address family's width.
    BadPrefix,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::DuplicatePeer => "a peer with this public key exists",
            ConfigError::OwnKey => "peer public key equals the device's own",
            ConfigError::NoSuchPeer => "no such peer",
            ConfigError::BadPrefix => "prefix length too long for the address family",
        })
    }
}

impl core::error::Error for ConfigError {}

/// Why an outbound packet was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// The packet was dropped (counted under this reason).
    Dropped(DropReason),
    /// The buffer cannot hold headroom, padded packet and tag.
    BufferTooSmall {
        /// Bytes the buffer needs.
        needed: usize,
    },
}

impl core::fmt::Display for SendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SendError::Dropped(r) => write!(f, "packet dropped: {r}"),
            SendError::BufferTooSmall { needed } => write!(f, "buffer too small: {needed} bytes needed"),
        }
    }
}

impl core::error::Error for SendError {}

/// A datagram ready in the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Its length: the datagram is `buf[..len]`.
    pub len: usize,
    /// The peer it is for (`None` for a cookie reply to an unknown sender).
    pub peer: Option<PeerId>,
}

/// The outcome of [`Device::encapsulate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Encapsulated {
    /// The packet was sealed in place: send `buf[..len]` to `destination`.
    Ready(Transmit),
    /// No session yet: the packet was staged and a handshake started; it
    /// will come out of [`Device::poll_transmit`] once the session is up.
    Staged {
        /// The peer the packet is for.
        peer: PeerId,
    },
}

/// What an accepted datagram was.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Received {
    /// An IP packet from `peer`, decrypted in place at `buf[range]` (padding removed).
    Packet {
        /// The authenticated sender.
        peer: PeerId,
        /// Where the IP packet lies in the caller's buffer.
        range: Range<usize>,
    },
    /// A keepalive from `peer`.
    Keepalive {
        /// The authenticated sender.
        peer: PeerId,
    },
    /// A handshake message or cookie reply; any answer is in `poll_transmit`.
    Handshake,
}

/// Something the driver may want to act on or report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An authenticated packet came from a new address; replies go there now.
    EndpointChanged {
        /// The peer.
        peer: PeerId,
        /// Its new address.
        endpoint: SocketAddr,
    },
    /// A handshake with the peer completed and a new session is usable.
    HandshakeCompleted {
        /// The peer.
        peer: PeerId,
    },
    /// MAX_TIMER_HANDSHAKES initiations went unanswered; staged packets dropped.
    HandshakeGaveUp {
        /// The peer.
        peer: PeerId,
    },
    /// No handshake for 3 x REJECT_AFTER_TIME: all keys of the peer zeroed.
    KeysZeroed {
        /// The peer.
        peer: PeerId,
    },
}

/// A handshake message or cookie reply waiting for `poll_transmit`.
struct ControlMessage {
    destination: SocketAddr,
    peer: Option<PeerId>,
    len: usize,
    bytes: [u8; INITIATION_LEN],
}

struct Peer<K> {
    public_key: PublicKey,
    handshake: Handshake,
    cookie: CookieSender,
    keypairs: Keypairs<K>,
    timers: Timers,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<u16>,
    /// Whether authenticated datagrams from a new address move the endpoint
    /// (WireGuard roaming); off while path discovery chooses the endpoint.
    roaming: bool,
    /// Plaintext packets waiting for a session; an empty one is a keepalive.
    staged: VecDeque<Vec<u8>>,
    in_flush_queue: bool,
    stats: PeerStats,
}

/// Many WireGuard peers behind one static key. `R` supplies randomness,
/// `P` the transport AEAD.
pub struct Device<R, P: CryptoProvider = DefaultProvider> {
    identity: StaticIdentity,
    checker: CookieChecker,
    load: LoadMonitor,
    limiter: RateLimiter,
    config: DeviceConfig,
    rng: R,
    peers: Vec<Option<Peer<P::TransportKey>>>,
    by_key: BTreeMap<PublicKey, PeerId>,
    by_index: BTreeMap<u32, PeerId>,
    routes: AllowedIps<PeerId>,
    control: VecDeque<ControlMessage>,
    flush: VecDeque<PeerId>,
    events: VecDeque<Event>,
    spare_buffers: Vec<Vec<u8>>,
    drops: DropCounts,
    /// The inbound packet filter (`None`: every packet passes).
    firewall: Option<Firewall>,
    /// Wall-clock time minus monotonic time, for TAI64N timestamps.
    wall_at_zero: Duration,
}

impl<R, P: CryptoProvider> core::fmt::Debug for Device<R, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Device")
            .field("public_key", self.identity.public_key())
            .field("peers", &self.by_key.len())
            .field("provider", &P::NAME)
            .finish_non_exhaustive()
    }
}

impl<R: rand_core::RngCore + rand_core::CryptoRng, P: CryptoProvider> Device<R, P> {
    /// A device with static key `private_key` and no peers. `now` and `wall`
    /// are the current monotonic and wall-clock time.
    pub fn new(private_key: PrivateKey, rng: R, config: DeviceConfig, now: Instant, wall: WallTime) -> Self {
        let identity = StaticIdentity::new(private_key);
        let checker = CookieChecker::new(identity.public_key());
        Device {
            checker,
            load: LoadMonitor::new(config.load_threshold),
            limiter: RateLimiter::new(),
            identity,
            config,
            rng,
            peers: Vec::new(),
            by_key: BTreeMap::new(),
            by_index: BTreeMap::new(),
            routes: AllowedIps::new(),
            control: VecDeque::new(),
            flush: VecDeque::new(),
            events: VecDeque::new(),
            spare_buffers: Vec::new(),
            drops: DropCounts::default(),
            firewall: None,
            wall_at_zero: wall_offset(now, wall),
        }
    }

    // ----- configuration -----

    /// The device's public key.
    pub fn public_key(&self) -> PublicKey {
        *self.identity.public_key()
    }

    /// The device's private key.
    pub fn private_key(&self) -> &PrivateKey {
        self.identity.private_key()
    }

    /// Replaces the static key. Every handshake and session is dropped, and a
    /// peer whose key equals the new public key is removed (as wireguard-go does).
    pub fn set_private_key(&mut self, private_key: PrivateKey) {
        self.identity = StaticIdentity::new(private_key);
        self.checker = CookieChecker::new(self.identity.public_key());
        let own = *self.identity.public_key();
        if let Some(&id) = self.by_key.get(&own) {
            let _ = self.remove_peer(id);
        }
        for id in self.peer_ids().collect::<Vec<_>>() {
            self.zero_peer_keys(id);
            let identity = &self.identity;
            if let Some(p) = self.peers[id.0 as usize].as_mut() {
                p.handshake.set_local_identity(identity);
            }
        }
    }

    /// Re-anchors the wall clock (after the host clock was set).
    pub fn set_wall_clock(&mut self, now: Instant, wall: WallTime) {
        self.wall_at_zero = wall_offset(now, wall);
    }

    /// Sets the tunnel MTU used to cap padding.
    pub fn set_mtu(&mut self, mtu: Option<usize>) {
        self.config.mtu = mtu;
    }

    /// The driver's load signal, e.g. a deep handshake queue.
    pub fn set_under_load(&mut self, loaded: bool, now: Instant) {
        self.load.set_driver_signal(loaded, now);
    }

    /// Adds a peer.
    pub fn add_peer(&mut self, config: PeerConfig, now: Instant) -> Result<PeerId, ConfigError> {
        if self.by_key.contains_key(&config.public_key) {
            return Err(ConfigError::DuplicatePeer);
        }
        if config.public_key == *self.identity.public_key() {
            return Err(ConfigError::OwnKey);
        }
        for &(addr, len) in &config.allowed_ips {
            if len > max_prefix(addr) {
                return Err(ConfigError::BadPrefix);
            }
        }
        let slot = self.peers.iter().position(Option::is_none).unwrap_or(self.peers.len());
        let id = PeerId(slot as u32);
        let mut timers = Timers::default();
        timers.set_persistent_keepalive(keepalive_interval(config.persistent_keepalive), now);
        let peer = Peer {
            handshake: Handshake::new(&self.identity, config.public_key, config.preshared_key.unwrap_or_default()),
            cookie: CookieSender::new(&config.public_key),
            public_key: config.public_key,
            keypairs: Keypairs::default(),
            timers,
            endpoint: config.endpoint,
            persistent_keepalive: config.persistent_keepalive.filter(|&k| k != 0),
            roaming: true,
            staged: VecDeque::new(),
            in_flush_queue: false,
            stats: PeerStats::default(),
        };
        if slot == self.peers.len() {
            self.peers.push(Some(peer));
        } else {
            self.peers[slot] = Some(peer);
        }
        self.by_key.insert(config.public_key, id);
        for (addr, len) in config.allowed_ips {
            let _ = self.routes.insert(addr, len, id);
        }
        if self.peer(id).persistent_keepalive.is_some() {
            // wireguard-go sends a keepalive at once when one is configured.
            self.stage_keepalive(id, now);
        }
        Ok(id)
    }

    /// Removes a peer, its routes, sessions and staged packets.
    pub fn remove_peer(&mut self, id: PeerId) -> Result<(), ConfigError> {
        let peer = self.peers.get_mut(id.0 as usize).and_then(Option::take).ok_or(ConfigError::NoSuchPeer)?;
        self.by_key.remove(&peer.public_key);
        self.by_index.retain(|_, p| *p != id);
        self.routes.remove_value(id);
        self.flush.retain(|p| *p != id);
        self.control.retain(|m| m.peer != Some(id));
        Ok(())
    }

    /// The handle of the peer with `public_key`.
    pub fn peer_by_key(&self, public_key: &PublicKey) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    /// Handles of all peers, in the order of their public keys.
    pub fn peer_ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.by_key.values().copied()
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// A peer's public key.
    pub fn peer_public_key(&self, id: PeerId) -> Option<PublicKey> {
        self.peer_opt(id).map(|p| p.public_key)
    }

    /// A peer's current endpoint.
    pub fn peer_endpoint(&self, id: PeerId) -> Option<SocketAddr> {
        self.peer_opt(id).and_then(|p| p.endpoint)
    }

    /// A peer's counters.
    pub fn peer_stats(&self, id: PeerId) -> Option<PeerStats> {
        self.peer_opt(id).map(|p| p.stats)
    }

    /// A peer's preshared key.
    pub fn peer_preshared_key(&self, id: PeerId) -> Option<&PresharedKey> {
        self.peer_opt(id).map(|p| p.handshake.preshared_key())
    }

    /// A peer's persistent keepalive interval in seconds.
    pub fn peer_persistent_keepalive(&self, id: PeerId) -> Option<u16> {
        self.peer_opt(id).and_then(|p| p.persistent_keepalive)
    }

    /// A peer's allowed IPs, sorted.
    pub fn peer_allowed_ips(&self, id: PeerId) -> Vec<(IpAddr, u8)> {
        self.routes.prefixes_of(id).collect()
    }

    /// Device-wide drop counters.
    pub fn drops(&self) -> DropCounts {
        self.drops
    }

    /// Sets a peer's endpoint.
    pub fn set_peer_endpoint(&mut self, id: PeerId, endpoint: Option<SocketAddr>) -> Result<(), ConfigError> {
        self.peer_mut_opt(id).ok_or(ConfigError::NoSuchPeer)?.endpoint = endpoint;
        Ok(())
    }

    /// Turns WireGuard roaming for a peer on (the default) or off. With it
    /// off only [`Device::set_peer_endpoint`] moves the endpoint, as when
    /// [`crate::disco::Disco`] chooses the path.
    pub fn set_peer_roaming(&mut self, id: PeerId, roaming: bool) -> Result<(), ConfigError> {
        self.peer_mut_opt(id).ok_or(ConfigError::NoSuchPeer)?.roaming = roaming;
        Ok(())
    }

    /// Sets a peer's preshared key (used from its next handshake).
    pub fn set_peer_preshared_key(&mut self, id: PeerId, psk: Option<PresharedKey>) -> Result<(), ConfigError> {
        self.peer_mut_opt(id).ok_or(ConfigError::NoSuchPeer)?.handshake.set_preshared_key(psk.unwrap_or_default());
        Ok(())
    }

    /// Sets a peer's persistent keepalive interval; turning it on sends a keepalive at once.
    pub fn set_peer_persistent_keepalive(
        &mut self,
        id: PeerId,
        seconds: Option<u16>,
        now: Instant,
    ) -> Result<(), ConfigError> {
        let p = self.peer_mut_opt(id).ok_or(ConfigError::NoSuchPeer)?;
        let seconds = seconds.filter(|&s| s != 0);
        let was_off = p.persistent_keepalive.is_none();
        p.persistent_keepalive = seconds;
        p.timers.set_persistent_keepalive(keepalive_interval(seconds), now);
        if was_off && seconds.is_some() {
            self.stage_keepalive(id, now);
        }
        Ok(())
    }

    /// Routes `addr/len` to the peer (taking it from any other peer).
    pub fn add_allowed_ip(&mut self, id: PeerId, addr: IpAddr, len: u8) -> Result<(), ConfigError> {
        self.peer_opt(id).ok_or(ConfigError::NoSuchPeer)?;
        self.routes.insert(addr, len, id).map_err(|_| ConfigError::BadPrefix)?;
        Ok(())
    }

    /// Removes every allowed IP of the peer.
    pub fn clear_allowed_ips(&mut self, id: PeerId) -> Result<(), ConfigError> {
        self.peer_opt(id).ok_or(ConfigError::NoSuchPeer)?;
        self.routes.remove_value(id);
        Ok(())
    }

    /// Removes one allowed IP of the peer, if the peer holds it.
    pub fn remove_allowed_ip(&mut self, id: PeerId, addr: IpAddr, len: u8) -> Result<(), ConfigError> {
        self.peer_opt(id).ok_or(ConfigError::NoSuchPeer)?;
        if let Some(owner) = self.routes.remove(addr, len) {
            if owner != id {
                // Not this peer's prefix: put it back.
                let _ = self.routes.insert(addr, len, owner);
            }
        }
        Ok(())
    }

    /// The peer that `addr` routes to.
    pub fn route(&self, addr: IpAddr) -> Option<PeerId> {
        self.routes.lookup(addr)
    }

    /// Advances the current keypair's send counter of a peer (never
    /// backwards). A testing aid to reach the message limits without sending
    /// 2^60 packets; it cannot weaken the protocol since nonces stay unique.
    pub fn advance_send_counter(&mut self, id: PeerId, counter: u64) {
        if let Some(kp) = self.peer_mut_opt(id).and_then(|p| p.keypairs.current.as_mut()) {
            kp.advance_send_counter(counter);
        }
    }

    /// Sets the inbound packet filter: from now on a decrypted packet reaches
    /// the caller only if the filter accepts it or it answers a flow this
    /// device sent (dropped ones are counted as [`DropReason::Filtered`]).
    /// Replacing a filter keeps the flows already open; `None` (the default)
    /// lets every packet through and forgets them.
    pub fn set_filter(&mut self, filter: Option<Filter>) {
        match (filter, self.firewall.as_mut()) {
            (None, _) => self.firewall = None,
            (Some(f), Some(fw)) => fw.set_filter(f),
            (Some(f), None) => self.firewall = Some(Firewall::new(f, self.rng.next_u64())),
        }
    }

    /// The inbound packet filter in force, if any.
    pub fn filter(&self) -> Option<&Filter> {
        self.firewall.as_ref().map(Firewall::filter)
    }

    /// Starts a handshake with the peer now, unless one was sent within REKEY_TIMEOUT.
    pub fn initiate_handshake(&mut self, id: PeerId, now: Instant) -> Result<(), ConfigError> {
        self.peer_opt(id).ok_or(ConfigError::NoSuchPeer)?;
        self.send_initiation(id, now, false);
        Ok(())
    }

    // ----- data path -----

    /// Seals one outbound IP packet in place. The packet lies at
    /// `buf[HEADROOM..HEADROOM + len]`; `buf` must extend at least
    /// [`TAILROOM`] bytes beyond it. On `Ready` the datagram is `buf[..len]`.
    pub fn encapsulate(&mut self, buf: &mut [u8], len: usize, now: Instant) -> Result<Encapsulated, SendError> {
        let end = HEADROOM.checked_add(len).ok_or(SendError::BufferTooSmall { needed: usize::MAX })?;
        let packet =
            buf.get(HEADROOM..end).ok_or(SendError::BufferTooSmall { needed: end.saturating_add(TAILROOM) })?;
        let Some(header) = parse_header(packet) else {
            return Err(self.drop_send(None, DropReason::NotIp));
        };
        let Some(id) = self.routes.lookup(header.destination) else {
            return Err(self.drop_send(None, DropReason::NoRoute));
        };
        if let Some(fw) = self.firewall.as_mut() {
            // Its replies must pass the inbound filter.
            fw.outbound(&packet[..header.total_len], now);
        }
        let mtu = self.config.mtu;
        let peer = self.peer_mut(id);
        let Some(destination) = peer.endpoint else {
            return Err(self.drop_send(Some(id), DropReason::NoEndpoint));
        };
        if let Some(kp) = peer.keypairs.current.as_mut() {
            match kp.seal(buf, len, mtu, now) {
                Ok(n) => {
                    let rekey = kp.wants_rekey(now);
                    // Jitter is drawn only when the timer it delays gets armed.
                    let jitter =
                        if self.peer(id).timers.new_handshake_armed() { Duration::ZERO } else { self.jitter() };
                    let peer = self.peer_mut(id);
                    peer.stats.tx_bytes += n as u64;
                    peer.stats.tx_packets += 1;
                    peer.timers.on_data_sent(now, jitter);
                    peer.timers.on_authenticated_sent();
                    peer.timers.on_authenticated_traversal(now);
                    if rekey {
                        self.send_initiation(id, now, false);
                    }
                    return Ok(Encapsulated::Ready(Transmit { destination, len: n, peer: Some(id) }));
                }
                Err(SealError::BufferTooSmall { needed }) => return Err(SendError::BufferTooSmall { needed }),
                Err(_) => {} // expired or exhausted: stage and rekey below
            }
        }
        self.stage(id, &buf[HEADROOM..HEADROOM + len]);
        self.send_initiation(id, now, false);
        Ok(Encapsulated::Staged { peer: id })
    }

    /// Handles one datagram received from `from`, decrypting transport
    /// messages in place. Answers (responses, cookie replies, keepalives,
    /// staged packets) wait in [`Device::poll_transmit`].
    pub fn handle_datagram(&mut self, from: SocketAddr, buf: &mut [u8], now: Instant) -> Result<Received, DropReason> {
        let kind = match classify(buf) {
            Ok(k) => k,
            Err(ParseError::UnknownType | ParseError::BadLength { .. }) => {
                return Err(self.count_drop(None, DropReason::Malformed))
            }
        };
        match kind {
            MessageKind::Transport => self.handle_transport(from, buf, now),
            MessageKind::Initiation | MessageKind::Response => {
                if !self.checker.check_mac1(buf) {
                    return Err(self.count_drop(None, DropReason::BadMac1));
                }
                if self.load.on_handshake(now) {
                    if !self.checker.check_mac2(buf, from, now) {
                        let sender = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                        // A classified handshake message always has room for its MACs.
                        if let Some(reply) = self.checker.create_reply(buf, sender, from, now, &mut self.rng) {
                            let mut bytes = [0u8; COOKIE_REPLY_LEN];
                            reply.emit(&mut bytes);
                            self.push_control(from, None, &bytes);
                        }
                        return Err(self.count_drop(None, DropReason::CookieRequired));
                    }
                    if !self.limiter.allow(from.ip(), now) {
                        return Err(self.count_drop(None, DropReason::RateLimited));
                    }
                }
                if kind == MessageKind::Initiation {
                    self.handle_initiation(from, buf, now)
                } else {
                    self.handle_response(from, buf, now)
                }
            }
            MessageKind::CookieReply => {
                let Ok(reply) = CookieReply::parse(buf) else {
                    return Err(self.count_drop(None, DropReason::Malformed));
                };
                let Some(&id) = self.by_index.get(&reply.receiver) else {
                    return Err(self.count_drop(None, DropReason::UnknownIndex));
                };
                match self.peer_mut(id).cookie.consume_reply(&reply, now) {
                    Ok(()) => Ok(Received::Handshake),
                    Err(CookieError::Decrypt | CookieError::Unsolicited) => {
                        Err(self.count_drop(Some(id), DropReason::BadCookieReply))
                    }
                }
            }
        }
    }

    fn handle_initiation(&mut self, from: SocketAddr, buf: &[u8], now: Instant) -> Result<Received, DropReason> {
        let msg = Initiation::parse(buf).map_err(|_| self.count_drop(None, DropReason::Malformed))?;
        let pending = begin_initiation(&self.identity, &msg).map_err(|e| self.count_drop(None, e.into()))?;
        let Some(&id) = self.by_key.get(&pending.remote_static) else {
            return Err(self.count_drop(None, DropReason::UnknownPeer));
        };
        if let Err(e) = self.peer_mut(id).handshake.finish_initiation(pending, now) {
            return Err(self.count_drop(Some(id), e.into()));
        }
        let local_index = self.new_index(id);
        let peer = self.peers[id.0 as usize].as_mut().expect("live peer");
        let result = peer.handshake.create_response(local_index, &mut self.rng);
        let (response, keys) = match result {
            Ok(r) => r,
            Err(e) => {
                self.by_index.remove(&local_index);
                return Err(self.count_drop(Some(id), e.into()));
            }
        };
        let mut bytes = [0u8; RESPONSE_LEN];
        response.emit(&mut bytes);
        let peer = self.peer_mut(id);
        peer.cookie.stamp(&mut bytes, now);
        let dropped = peer.keypairs.install(Keypair::new::<P>(&keys, now));
        peer.stats.rx_bytes += INITIATION_LEN as u64;
        peer.timers.on_authenticated_received();
        peer.timers.on_authenticated_traversal(now);
        peer.timers.on_session_derived(now);
        peer.timers.on_authenticated_sent();
        self.release(dropped);
        self.set_endpoint(id, from);
        self.push_control(from, Some(id), &bytes);
        Ok(Received::Handshake)
    }

    fn handle_response(&mut self, from: SocketAddr, buf: &[u8], now: Instant) -> Result<Received, DropReason> {
        let msg = Response::parse(buf).map_err(|_| self.count_drop(None, DropReason::Malformed))?;
        let Some(&id) = self.by_index.get(&msg.receiver) else {
            return Err(self.count_drop(None, DropReason::UnknownIndex));
        };
        let keys = {
            let identity = &self.identity;
            let peer = self.peers[id.0 as usize].as_mut().expect("index table names live peers");
            match peer.handshake.consume_response(identity, &msg) {
                Ok(k) => k,
                Err(e) => return Err(self.count_drop(Some(id), e.into())),
            }
        };
        let wall = self.wall(now);
        let peer = self.peer_mut(id);
        let dropped = peer.keypairs.install(Keypair::new::<P>(&keys, now));
        peer.stats.rx_bytes += RESPONSE_LEN as u64;
        peer.stats.handshakes += 1;
        peer.stats.last_handshake = Some(wall);
        peer.timers.on_authenticated_received();
        peer.timers.on_authenticated_traversal(now);
        peer.timers.on_handshake_complete();
        peer.timers.on_session_derived(now);
        self.release(dropped);
        self.set_endpoint(id, from);
        self.push_event(Event::HandshakeCompleted { peer: id });
        // Confirm the session to the responder: with staged packets if any,
        // else with a keepalive.
        if self.peer(id).staged.is_empty() {
            self.stage_keepalive(id, now);
        } else {
            self.schedule_flush(id);
        }
        Ok(Received::Handshake)
    }

    #[inline]
    fn handle_transport(&mut self, from: SocketAddr, buf: &mut [u8], now: Instant) -> Result<Received, DropReason> {
        let header = TransportHeader::parse(buf).map_err(|_| self.count_drop(None, DropReason::Malformed))?;
        let Some(&id) = self.by_index.get(&header.receiver) else {
            return Err(self.count_drop(None, DropReason::UnknownIndex));
        };
        let peer = self.peers[id.0 as usize].as_mut().expect("index table names live peers");
        let Some(slot) = peer.keypairs.slot_of(header.receiver) else {
            return Err(self.count_drop(Some(id), DropReason::UnknownIndex));
        };
        let kp = peer.keypairs.get_mut(slot).expect("slot_of found it");
        let opened = kp.open(buf, header.counter, now);
        let range = match opened {
            Ok(r) => r,
            Err(OpenError::Expired) => return Err(self.count_drop(Some(id), DropReason::ExpiredKeypair)),
            Err(OpenError::Replay) => return Err(self.count_drop(Some(id), DropReason::Replay)),
            Err(_) => return Err(self.count_drop(Some(id), DropReason::Decrypt)),
        };
        let last_minute = kp.initiator
            && !peer.timers.sent_last_minute_handshake
            && now.saturating_duration_since(kp.created) >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT;
        peer.stats.rx_bytes += buf.len() as u64;
        peer.stats.rx_packets += 1;
        peer.timers.on_authenticated_received();
        peer.timers.on_authenticated_traversal(now);
        if slot == Slot::Next {
            let wall = self.wall(now);
            let peer = self.peer_mut(id);
            let dropped = peer.keypairs.confirm_next();
            peer.timers.on_handshake_complete();
            peer.stats.handshakes += 1;
            peer.stats.last_handshake = Some(wall);
            self.release([dropped, None]);
            self.push_event(Event::HandshakeCompleted { peer: id });
            self.schedule_flush(id);
        }
        if self.peer(id).endpoint != Some(from) {
            self.set_endpoint(id, from);
        }
        if last_minute {
            self.peer_mut(id).timers.sent_last_minute_handshake = true;
            self.send_initiation(id, now, false);
        }
        if range.is_empty() {
            return Ok(Received::Keepalive { peer: id });
        }
        self.peer_mut(id).timers.on_data_received(now);
        let Some(ip) = parse_header(&buf[range.clone()]) else {
            return Err(self.count_drop(Some(id), DropReason::NotIp));
        };
        if self.routes.lookup(ip.source) != Some(id) {
            return Err(self.count_drop(Some(id), DropReason::NotAllowedSource));
        }
        let packet = range.start..range.start + ip.total_len;
        if self.firewall.as_ref().is_some_and(|fw| fw.inbound(&buf[packet.clone()], now).is_none()) {
            return Err(self.count_drop(Some(id), DropReason::Filtered));
        }
        Ok(Received::Packet { peer: id, range: packet })
    }

    /// The next datagram to send that is not a direct answer to
    /// `encapsulate`: handshake messages, cookie replies, keepalives and
    /// staged packets, written into `buf`. Poll again after every
    /// `handle_*` call and after `encapsulate` returned `Staged`, until it
    /// returns `Ok(None)`. A buffer too small for the next datagram is an
    /// error naming the size needed; the datagram stays queued.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Result<Option<Transmit>, SendError> {
        if let Some(msg) = self.control.front() {
            if buf.len() < msg.len {
                return Err(SendError::BufferTooSmall { needed: msg.len });
            }
            let msg = self.control.pop_front().expect("front exists");
            buf[..msg.len].copy_from_slice(&msg.bytes[..msg.len]);
            if let Some(id) = msg.peer {
                if let Some(p) = self.peer_mut_opt(id) {
                    p.stats.tx_bytes += msg.len as u64;
                }
            }
            return Ok(Some(Transmit { destination: msg.destination, len: msg.len, peer: msg.peer }));
        }
        let mtu = self.config.mtu;
        while let Some(&id) = self.flush.front() {
            let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
                self.flush.pop_front();
                continue;
            };
            let (Some(destination), Some(kp), Some(packet)) =
                (peer.endpoint, peer.keypairs.current.as_mut(), peer.staged.front())
            else {
                peer.in_flush_queue = false;
                self.flush.pop_front();
                continue;
            };
            let len = packet.len();
            let needed = HEADROOM + crate::messages::padded_len(len) + TAG_LEN;
            if buf.len() < needed {
                return Err(SendError::BufferTooSmall { needed });
            }
            buf[HEADROOM..HEADROOM + len].copy_from_slice(packet);
            match kp.seal(buf, len, mtu, now) {
                Ok(n) => {
                    let rekey = kp.wants_rekey(now);
                    let packet = peer.staged.pop_front().expect("front exists");
                    peer.stats.tx_bytes += n as u64;
                    peer.stats.tx_packets += 1;
                    let jitter =
                        if peer.timers.new_handshake_armed() { Duration::ZERO } else { random_jitter(&mut self.rng) };
                    let peer = self.peer_mut(id);
                    if len > 0 {
                        peer.timers.on_data_sent(now, jitter);
                    }
                    peer.timers.on_authenticated_sent();
                    peer.timers.on_authenticated_traversal(now);
                    self.recycle(packet);
                    if rekey {
                        self.send_initiation(id, now, false);
                    }
                    return Ok(Some(Transmit { destination, len: n, peer: Some(id) }));
                }
                Err(_) => {
                    // The session died while packets waited: keep them and rekey.
                    peer.in_flush_queue = false;
                    self.flush.pop_front();
                    self.send_initiation(id, now, false);
                }
            }
        }
        Ok(None)
    }

    /// The next event, if any. Poll after every `handle_*` call.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time [`Device::handle_timeout`] must be called. Changes
    /// after any `handle_*`, `encapsulate` or `poll_transmit` call.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers.iter().flatten().filter_map(|p| p.timers.next_deadline()).min()
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        for slot in 0..self.peers.len() {
            let id = PeerId(slot as u32);
            let Some(peer) = self.peers[slot].as_mut() else { continue };
            if peer.timers.next_deadline().is_none_or(|t| t > now) {
                continue;
            }
            let due = peer.timers.expire(now);
            if due.zero_key_material {
                self.zero_peer_keys(id);
                self.push_event(Event::KeysZeroed { peer: id });
            }
            if due.give_up_handshake {
                let peer = self.peer_mut(id);
                let n = peer.staged.len();
                let dropped: Vec<_> = peer.staged.drain(..).collect();
                peer.stats.drops.0[DropReason::QueueOverflow as usize] += n as u64;
                self.drops.0[DropReason::QueueOverflow as usize] += n as u64;
                for b in dropped {
                    self.recycle(b);
                }
                // The attempt is over: forget the initiation and free its index.
                let peer = self.peer_mut(id);
                if let Some(i) = peer.handshake.pending_local_index() {
                    peer.handshake.clear();
                    self.by_index.remove(&i);
                }
                self.push_event(Event::HandshakeGaveUp { peer: id });
            }
            if due.retransmit_handshake {
                self.send_initiation(id, now, true);
            }
            if due.new_handshake {
                self.send_initiation(id, now, false);
            }
            if due.send_keepalive || due.persistent_keepalive {
                let has_session = self.peer(id).keypairs.current.as_ref().is_some_and(|k| !k.is_expired(now));
                if has_session || due.persistent_keepalive {
                    self.stage_keepalive(id, now);
                }
            }
        }
    }

    // ----- internals -----

    fn peer_opt(&self, id: PeerId) -> Option<&Peer<P::TransportKey>> {
        self.peers.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn peer_mut_opt(&mut self, id: PeerId) -> Option<&mut Peer<P::TransportKey>> {
        self.peers.get_mut(id.0 as usize).and_then(Option::as_mut)
    }

    fn peer(&self, id: PeerId) -> &Peer<P::TransportKey> {
        self.peer_opt(id).expect("peer handle refers to a live peer")
    }

    fn peer_mut(&mut self, id: PeerId) -> &mut Peer<P::TransportKey> {
        self.peer_mut_opt(id).expect("peer handle refers to a live peer")
    }

    fn wall(&self, now: Instant) -> WallTime {
        WallTime::from_unix(self.wall_at_zero + Duration::from_nanos(now.as_nanos()))
    }

    fn jitter(&mut self) -> Duration {
        random_jitter(&mut self.rng)
    }

    fn count_drop(&mut self, peer: Option<PeerId>, reason: DropReason) -> DropReason {
        self.drops.add(reason);
        if let Some(p) = peer.and_then(|id| self.peer_mut_opt(id)) {
            p.stats.drops.add(reason);
        }
        reason
    }

    fn drop_send(&mut self, peer: Option<PeerId>, reason: DropReason) -> SendError {
        SendError::Dropped(self.count_drop(peer, reason))
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn push_control(&mut self, destination: SocketAddr, peer: Option<PeerId>, bytes: &[u8]) {
        let mut msg = ControlMessage { destination, peer, len: bytes.len(), bytes: [0; INITIATION_LEN] };
        msg.bytes[..bytes.len()].copy_from_slice(bytes);
        self.control.push_back(msg);
    }

    fn set_endpoint(&mut self, id: PeerId, endpoint: SocketAddr) {
        let peer = self.peer_mut(id);
        if peer.roaming && peer.endpoint != Some(endpoint) {
            peer.endpoint = Some(endpoint);
            self.push_event(Event::EndpointChanged { peer: id, endpoint });
        }
    }

    /// A fresh random receiver index registered to `peer`.
    fn new_index(&mut self, peer: PeerId) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if let alloc::collections::btree_map::Entry::Vacant(e) = self.by_index.entry(i) {
                e.insert(peer);
                return i;
            }
        }
    }

    fn release<const N: usize>(&mut self, indices: [Option<u32>; N]) {
        for i in indices.into_iter().flatten() {
            self.by_index.remove(&i);
        }
    }

    fn recycle(&mut self, mut b: Vec<u8>) {
        if self.spare_buffers.len() < MAX_QUEUED_PACKETS {
            b.clear();
            self.spare_buffers.push(b);
        }
    }

    fn stage(&mut self, id: PeerId, packet: &[u8]) {
        let mut b = self.spare_buffers.pop().unwrap_or_default();
        b.extend_from_slice(packet);
        let peer = self.peer_mut(id);
        let overflow = if peer.staged.len() >= MAX_QUEUED_PACKETS { peer.staged.pop_front() } else { None };
        peer.staged.push_back(b);
        if let Some(old) = overflow {
            self.count_drop(Some(id), DropReason::QueueOverflow);
            self.recycle(old);
        }
    }

    /// Queues a keepalive; without a session this starts a handshake.
    fn stage_keepalive(&mut self, id: PeerId, now: Instant) {
        if self.peer(id).staged.is_empty() {
            self.stage(id, &[]);
        }
        let has_session = self.peer(id).keypairs.current.as_ref().is_some_and(|k| !k.is_expired(now));
        if has_session {
            self.schedule_flush(id);
        } else {
            self.send_initiation(id, now, false);
        }
    }

    fn schedule_flush(&mut self, id: PeerId) {
        let peer = self.peer_mut(id);
        if !peer.in_flush_queue && !peer.staged.is_empty() {
            peer.in_flush_queue = true;
            self.flush.push_back(id);
        }
    }

    fn zero_peer_keys(&mut self, id: PeerId) {
        let peer = self.peer_mut(id);
        let dropped = peer.keypairs.clear();
        let pending = peer.handshake.pending_local_index();
        peer.handshake.clear();
        self.release(dropped);
        self.release([pending]);
    }

    /// Sends an initiation unless one went out within REKEY_TIMEOUT.
    fn send_initiation(&mut self, id: PeerId, now: Instant, retry: bool) {
        let wall = self.wall(now);
        let jitter = self.jitter();
        let peer = self.peer_mut(id);
        if peer.timers.last_initiation_sent.is_some_and(|t| now.saturating_duration_since(t) < REKEY_TIMEOUT) {
            return;
        }
        let Some(destination) = peer.endpoint else {
            self.count_drop(Some(id), DropReason::NoEndpoint);
            return;
        };
        let old = peer.handshake.pending_local_index();
        self.release([old]);
        let index = self.new_index(id);
        let identity = &self.identity;
        let peer = self.peers[id.0 as usize].as_mut().expect("live peer");
        let msg = match peer.handshake.create_initiation(identity, index, wall, &mut self.rng) {
            Ok(m) => m,
            Err(_) => {
                self.by_index.remove(&index);
                self.count_drop(Some(id), DropReason::WeakKey);
                return;
            }
        };
        let mut bytes = [0u8; INITIATION_LEN];
        msg.emit(&mut bytes);
        peer.cookie.stamp(&mut bytes, now);
        peer.timers.on_handshake_initiated(now, jitter, retry);
        peer.timers.on_authenticated_sent();
        peer.timers.on_authenticated_traversal(now);
        self.push_control(destination, Some(id), &bytes);
    }
}

fn wall_offset(now: Instant, wall: WallTime) -> Duration {
    Duration::new(wall.secs, wall.nanos).saturating_sub(Duration::from_nanos(now.as_nanos()))
}

fn keepalive_interval(seconds: Option<u16>) -> Option<Duration> {
    seconds.filter(|&s| s != 0).map(|s| Duration::from_secs(s.into()))
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn random_jitter(rng: &mut impl rand_core::RngCore) -> Duration {
    Duration::from_nanos(rng.next_u64() % (REKEY_TIMEOUT_JITTER_MAX.as_nanos() as u64 + 1))
}
