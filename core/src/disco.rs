//! Path discovery between peers: authenticated ping, pong and call-me-maybe
//! probes, candidate endpoints per peer, and the choice of the path the
//! WireGuard session uses (a direct UDP address, or the relay).
//!
//! ## Wire format
//!
//! Every probe is one UDP datagram (or one relay frame):
//!
//! ```text
//! magic (6) | sender public key (32) | counter (8, LE) | sealed body | tag (16)
//! ```
//!
//! [`MAGIC`] starts with `W` (0x57): no WireGuard message (type 1 to 4, then
//! three zero bytes) and no STUN message (two leading zero bits) starts so,
//! which lets one socket carry all three. The body is sealed with
//! ChaCha20-Poly1305 under a key only the two peers can compute: the X25519
//! of their static keys, expanded with the WireGuard KDF into one key per
//! direction, so neither a third party nor a reflected probe passes. The
//! nonce is the counter, the associated data the cleartext header. Each
//! sender's counter starts at its wall-clock time in nanoseconds and counts
//! up, and each receiver keeps a replay window per peer: a probe is accepted
//! once, and a restarted node's counters are above its old ones.
//!
//! Bodies: `1` ping (transaction ID 12), `2` pong (the ping's transaction
//! ID, then the address the ping came from, 18 bytes), `3` call-me-maybe (a
//! count, then up to [`MAX_ENDPOINTS`] addresses of 18 bytes). An address is
//! 16 bytes of IPv6 (IPv4 mapped) and a big-endian port.
//!
//! ## Path selection
//!
//! * Candidates of a peer are the endpoints the control server reported
//!   for it plus the addresses its authenticated pings arrived from.
//! * A candidate is *alive* while its last pong is younger than
//!   [`DiscoConfig::trust`]; a pong counts only if it answers a ping sent to
//!   that very address and comes from it.
//! * The chosen path is the alive candidate with the lowest round-trip time,
//!   direct always preferred over the relay. A chosen direct path is replaced
//!   by another only when that one is alive and its RTT is below
//!   2/3 of the current one (hysteresis, so two similar paths do not flap).
//! * With no alive candidate the path is the relay, if the peer has one.
//! * While a direct path is chosen it is pinged every
//!   [`DiscoConfig::heartbeat`]; every [`DiscoConfig::reprobe`] all
//!   candidates are pinged again. With no direct path, all candidates are
//!   pinged every heartbeat and a call-me-maybe with our own endpoints goes
//!   through the relay, so the peer pings us at the same time (the
//!   simultaneous open that endpoint-independent NATs need).
//! * A ping from an address the peer was not known at adds that address as
//!   a candidate and is answered at once, and pinged back at once.
//!
//! The driver applies [`PathChanged`] to the WireGuard device with
//! [`crate::device::Device::set_peer_endpoint`] ([`Path::endpoint`] is the
//! device endpoint; [`RELAY_ENDPOINT`] stands for the relay). The session is
//! not touched, so it survives every path change.

use crate::crypto::{aead_open, aead_seal, dh, hash, hmac, kdf, KEY_LEN, TAG_LEN};
use crate::keys::{PrivateKey, PublicKey};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use core::time::Duration;
use zeroize::{Zeroize, ZeroizeOnDrop};

#[cfg(feature = "alloc")]
pub use machine::*;

/// The first bytes of every probe.
pub const MAGIC: [u8; 6] = [b'W', b'M', 0xd1, 0x5c, 0x0c, 0x01];
/// Magic, sender key and counter.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + 8;
/// Most endpoints a call-me-maybe carries.
pub const MAX_ENDPOINTS: usize = 8;
/// Length of an encoded address.
pub const ADDR_LEN: usize = 18;
/// Length of a ping's transaction ID.
pub const TX_ID_LEN: usize = 12;
/// The longest body: a call-me-maybe with [`MAX_ENDPOINTS`] addresses.
pub const MAX_BODY_LEN: usize = 2 + MAX_ENDPOINTS * ADDR_LEN;
/// The longest probe on the wire.
pub const MAX_MESSAGE_LEN: usize = HEADER_LEN + MAX_BODY_LEN + TAG_LEN;
/// The device endpoint that stands for "through the relay": port 0 is never
/// the source of a real datagram and cannot be sent to, so a driver that
/// forgot to divert it fails instead of leaking.
pub const RELAY_ENDPOINT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 3, 3, 40), 0));

const TYPE_PING: u8 = 1;
const TYPE_PONG: u8 = 2;
const TYPE_CALL_ME_MAYBE: u8 = 3;
const KEY_LABEL: &[u8] = b"wiremesh disco v1";

/// A ping's transaction ID.
pub type TxId = [u8; TX_ID_LEN];

/// Why a probe was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoError {
    /// Not a probe, or its length is impossible.
    Malformed,
    /// The sender's key is not a peer's.
    UnknownPeer,
    /// The tag did not verify: forged, corrupted or sealed for someone else.
    Forged,
    /// The counter was seen before or is too old.
    Replayed,
    /// A pong answering no ping of ours to that address.
    Unsolicited,
    /// A key that cannot be used (a low-order point, or our own).
    BadKey,
    /// The caller's buffer is too small; `needed` bytes are required.
    BufferTooSmall {
        /// Bytes required.
        needed: usize,
    },
}

impl core::fmt::Display for DiscoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiscoError::Malformed => f.write_str("malformed probe"),
            DiscoError::UnknownPeer => f.write_str("probe from an unknown key"),
            DiscoError::Forged => f.write_str("probe failed authentication"),
            DiscoError::Replayed => f.write_str("replayed probe"),
            DiscoError::Unsolicited => f.write_str("pong answering no ping"),
            DiscoError::BadKey => f.write_str("unusable peer key"),
            DiscoError::BufferTooSmall { needed } => write!(f, "buffer too small for probe: {needed} bytes needed"),
        }
    }
}

impl core::error::Error for DiscoError {}

/// Whether `buf` starts like a probe (the test a driver makes to demultiplex).
pub fn is_disco(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN + 1 + TAG_LEN && buf.starts_with(&MAGIC)
}

/// The cleartext header of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sender's static public key.
    pub sender: PublicKey,
    /// The sender's message counter (the AEAD nonce).
    pub counter: u64,
}

impl Header {
    /// Parses the header of a probe, checking the magic and the length.
    pub fn parse(buf: &[u8]) -> Result<Header, DiscoError> {
        if !is_disco(buf) || buf.len() > MAX_MESSAGE_LEN {
            return Err(DiscoError::Malformed);
        }
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&buf[MAGIC.len()..MAGIC.len() + KEY_LEN]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&buf[MAGIC.len() + KEY_LEN..HEADER_LEN]);
        Ok(Header { sender: PublicKey(key), counter: u64::from_le_bytes(c) })
    }

    fn emit(&self, out: &mut [u8]) {
        out[..MAGIC.len()].copy_from_slice(&MAGIC);
        out[MAGIC.len()..MAGIC.len() + KEY_LEN].copy_from_slice(&self.sender.0);
        out[MAGIC.len() + KEY_LEN..HEADER_LEN].copy_from_slice(&self.counter.to_le_bytes());
    }
}

/// The decrypted content of a probe.
// The call-me-maybe variant is the largest by far, but boxing it would need
// `alloc`, which the wire format does without.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// "Are you there on this path?"
    Ping {
        /// Echoed in the pong.
        tx_id: TxId,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's transaction ID.
        tx_id: TxId,
        /// The address the ping came from, as the responder saw it.
        observed: SocketAddr,
    },
    /// "Ping me at these addresses now", sent through the relay.
    CallMeMaybe {
        /// The sender's endpoints.
        endpoints: heapless::Vec<SocketAddr, MAX_ENDPOINTS>,
    },
}

impl Body {
    /// Parses a decrypted body, refusing trailing bytes and unknown types.
    pub fn parse(b: &[u8]) -> Result<Body, DiscoError> {
        let (&ty, rest) = b.split_first().ok_or(DiscoError::Malformed)?;
        match ty {
            TYPE_PING if rest.len() == TX_ID_LEN => {
                let mut tx_id = [0u8; TX_ID_LEN];
                tx_id.copy_from_slice(rest);
                Ok(Body::Ping { tx_id })
            }
            TYPE_PONG if rest.len() == TX_ID_LEN + ADDR_LEN => {
                let mut tx_id = [0u8; TX_ID_LEN];
                tx_id.copy_from_slice(&rest[..TX_ID_LEN]);
                Ok(Body::Pong { tx_id, observed: parse_addr(&rest[TX_ID_LEN..]) })
            }
            TYPE_CALL_ME_MAYBE => {
                let (&n, addrs) = rest.split_first().ok_or(DiscoError::Malformed)?;
                let n = usize::from(n);
                if n > MAX_ENDPOINTS || addrs.len() != n * ADDR_LEN {
                    return Err(DiscoError::Malformed);
                }
                let mut endpoints = heapless::Vec::new();
                for a in addrs.chunks_exact(ADDR_LEN) {
                    // Cannot fail: n <= MAX_ENDPOINTS was checked.
                    let _ = endpoints.push(parse_addr(a));
                }
                Ok(Body::CallMeMaybe { endpoints })
            }
            _ => Err(DiscoError::Malformed),
        }
    }

    /// Writes the body into `out` (at least [`MAX_BODY_LEN`] bytes) and returns its length.
    pub fn emit(&self, out: &mut [u8]) -> usize {
        match self {
            Body::Ping { tx_id } => {
                out[0] = TYPE_PING;
                out[1..1 + TX_ID_LEN].copy_from_slice(tx_id);
                1 + TX_ID_LEN
            }
            Body::Pong { tx_id, observed } => {
                out[0] = TYPE_PONG;
                out[1..1 + TX_ID_LEN].copy_from_slice(tx_id);
                emit_addr(*observed, &mut out[1 + TX_ID_LEN..1 + TX_ID_LEN + ADDR_LEN]);
                1 + TX_ID_LEN + ADDR_LEN
            }
            Body::CallMeMaybe { endpoints } => {
                out[0] = TYPE_CALL_ME_MAYBE;
                out[1] = endpoints.len() as u8;
                for (i, e) in endpoints.iter().enumerate() {
                    emit_addr(*e, &mut out[2 + i * ADDR_LEN..2 + (i + 1) * ADDR_LEN]);
                }
                2 + endpoints.len() * ADDR_LEN
            }
        }
    }
}

fn parse_addr(b: &[u8]) -> SocketAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    let v6 = Ipv6Addr::from(o);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

fn emit_addr(a: SocketAddr, out: &mut [u8]) {
    let v6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out[..16].copy_from_slice(&v6.octets());
    out[16..18].copy_from_slice(&a.port().to_be_bytes());
}

/// The two directional keys shared by a pair of nodes. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PairKeys {
    send: [u8; KEY_LEN],
    recv: [u8; KEY_LEN],
}

impl core::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PairKeys(<redacted>)")
    }
}

impl PairKeys {
    /// Derives the keys between `own` and `peer`: KDF2 keyed with the hash of
    /// a label and both public keys in byte order, over their X25519.
    pub fn derive(own: &PrivateKey, peer: &PublicKey) -> Result<PairKeys, DiscoError> {
        let own_pub = own.public_key();
        if own_pub == *peer {
            return Err(DiscoError::BadKey);
        }
        let mut shared = dh(&own.secret(), &peer.0).ok_or(DiscoError::BadKey)?;
        let (lo, hi) = if own_pub < *peer { (own_pub, *peer) } else { (*peer, own_pub) };
        let chain = hash(&[KEY_LABEL, &lo.0, &hi.0]);
        let [lo_to_hi, hi_to_lo] = kdf::<2>(&chain, &shared);
        shared.zeroize();
        Ok(if own_pub == lo {
            PairKeys { send: lo_to_hi, recv: hi_to_lo }
        } else {
            PairKeys { send: hi_to_lo, recv: lo_to_hi }
        })
    }

    /// Seals `body` from `sender` with `counter` into `out` and returns the
    /// probe's length.
    pub fn seal(&self, sender: &PublicKey, counter: u64, body: &Body, out: &mut [u8]) -> Result<usize, DiscoError> {
        if out.len() < MAX_MESSAGE_LEN {
            return Err(DiscoError::BufferTooSmall { needed: MAX_MESSAGE_LEN });
        }
        Header { sender: *sender, counter }.emit(out);
        let (head, rest) = out.split_at_mut(HEADER_LEN);
        let n = body.emit(rest);
        let tag = aead_seal(&self.send, counter, head, &mut rest[..n]);
        rest[n..n + TAG_LEN].copy_from_slice(&tag);
        Ok(HEADER_LEN + n + TAG_LEN)
    }

    /// Authenticates and decrypts a probe whose header was parsed from `buf`.
    /// Does not check the counter against replays; the caller does.
    pub fn open(&self, buf: &[u8]) -> Result<Body, DiscoError> {
        let header = Header::parse(buf)?;
        let sealed = &buf[HEADER_LEN..buf.len() - TAG_LEN];
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&buf[buf.len() - TAG_LEN..]);
        let mut plain = [0u8; MAX_BODY_LEN];
        let plain = &mut plain[..sealed.len()];
        plain.copy_from_slice(sealed);
        aead_open(&self.recv, header.counter, &buf[..HEADER_LEN], plain, &tag).map_err(|_| DiscoError::Forged)?;
        Body::parse(plain)
    }
}

/// The proof a relay client gives that it holds the private key of the
/// node key it claims: HMAC-BLAKE2s keyed with the X25519 of the client's
/// and the relay's keys, over a label, both public keys and the relay's
/// fresh nonce. Either side computes it with its own private key and the
/// other's public key; nobody else can. `client` names the client's key.
pub fn relay_proof(
    own: &PrivateKey,
    other: &PublicKey,
    client: &PublicKey,
    nonce: &[u8; KEY_LEN],
) -> Result<[u8; KEY_LEN], DiscoError> {
    let own_pub = own.public_key();
    if own_pub == *other {
        return Err(DiscoError::BadKey);
    }
    let relay = if own_pub == *client { *other } else { own_pub };
    let mut shared = dh(&own.secret(), &other.0).ok_or(DiscoError::BadKey)?;
    let proof = hmac(&shared, &[RELAY_LABEL, &relay.0, &client.0, nonce]);
    shared.zeroize();
    Ok(proof)
}

const RELAY_LABEL: &[u8] = b"wiremesh relay auth v1";

/// Timing of the path state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscoConfig {
    /// How often the chosen direct path is pinged, and how often all
    /// candidates are while no direct path works.
    pub heartbeat: Duration,
    /// How often all candidates are pinged although a direct path works.
    pub reprobe: Duration,
    /// How long a pong keeps a path alive.
    pub trust: Duration,
}

impl Default for DiscoConfig {
    fn default() -> Self {
        DiscoConfig {
            heartbeat: Duration::from_secs(2),
            reprobe: Duration::from_secs(20),
            trust: Duration::from_millis(5500),
        }
    }
}

/// How a peer is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// Straight to this UDP address.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
}

impl Path {
    /// The endpoint the WireGuard device should send to for this path.
    pub fn endpoint(self) -> SocketAddr {
        match self {
            Path::Direct(a) => a,
            Path::Relay => RELAY_ENDPOINT,
        }
    }

    /// Whether this is a direct path.
    pub fn is_direct(self) -> bool {
        matches!(self, Path::Direct(_))
    }
}

/// Counters of refused and handled probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscoStats {
    /// Probes sent (queued for sending).
    pub sent: u64,
    /// Probes accepted.
    pub received: u64,
    /// Probes that did not parse.
    pub malformed: u64,
    /// Probes from keys that are not peers.
    pub unknown_peer: u64,
    /// Probes whose tag did not verify.
    pub forged: u64,
    /// Probes whose counter was seen before.
    pub replayed: u64,
    /// Pongs answering no outstanding ping.
    pub unsolicited: u64,
}

#[cfg(feature = "alloc")]
mod machine {
    use super::*;
    use crate::replay::ReplayWindow;
    use crate::time::{Instant, WallTime};
    use alloc::collections::{BTreeMap, VecDeque};

    /// Most candidates kept per peer (reported plus learned).
    pub const MAX_CANDIDATES: usize = 16;
    /// Outstanding pings remembered per candidate.
    const PENDING_PINGS: usize = 4;
    /// Probes waiting for `poll_transmit` beyond this are dropped (oldest first).
    const MAX_QUEUED: usize = 1024;
    /// The least time between a ping to an address and a ping back to it
    /// prompted by the peer's ping from there.
    const PING_BACK_SPACING: Duration = Duration::from_secs(1);

    /// Where a probe came from.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Source {
        /// A UDP datagram from this address.
        Direct(SocketAddr),
        /// A relay frame.
        Relay,
    }

    /// Where a probe goes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Destination {
        /// A UDP datagram to this address.
        Direct(SocketAddr),
        /// A relay frame to the peer.
        Relay,
    }

    /// A probe ready in the caller's buffer.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[must_use]
    pub struct Transmit {
        /// Where to send it.
        pub destination: Destination,
        /// The peer it is for (the relay frame's address).
        pub peer: PublicKey,
        /// Its length: the probe is `buf[..len]`.
        pub len: usize,
    }

    /// The chosen path of a peer changed.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PathChanged {
        /// The peer.
        pub peer: PublicKey,
        /// Its new path (`None`: no direct path and no relay).
        pub path: Option<Path>,
    }

    /// What an accepted probe was.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Received {
        /// A ping; the pong is in `poll_transmit`.
        Ping,
        /// A pong to one of our pings; the round trip it measured.
        Pong {
            /// Round-trip time.
            rtt: Duration,
            /// Our address as the peer saw it.
            observed: SocketAddr,
        },
        /// A call-me-maybe; pings to its endpoints are in `poll_transmit`.
        CallMeMaybe,
    }

    #[derive(Clone, Copy, Debug)]
    struct Candidate {
        addr: SocketAddr,
        /// Reported by the control server (else learned from a ping).
        reported: bool,
        pending: [Option<(TxId, Instant)>; PENDING_PINGS],
        last_pong: Option<Instant>,
        rtt: Option<Duration>,
        learned_at: Instant,
    }

    impl Candidate {
        fn new(addr: SocketAddr, reported: bool, now: Instant) -> Self {
            Candidate { addr, reported, pending: [None; PENDING_PINGS], last_pong: None, rtt: None, learned_at: now }
        }

        fn alive(&self, now: Instant, trust: Duration) -> bool {
            self.last_pong.is_some_and(|t| now.saturating_duration_since(t) < trust)
        }
    }

    struct Peer {
        keys: PairKeys,
        replay: ReplayWindow,
        relay: bool,
        candidates: heapless::Vec<Candidate, MAX_CANDIDATES>,
        path: Option<Path>,
        next_ping: Instant,
        next_reprobe: Instant,
    }

    struct Queued {
        destination: Destination,
        peer: PublicKey,
        len: usize,
        bytes: [u8; MAX_MESSAGE_LEN],
    }

    /// The path state machine of one node for all its peers.
    pub struct Disco<R> {
        private_key: PrivateKey,
        public_key: PublicKey,
        rng: R,
        config: DiscoConfig,
        counter: u64,
        local: heapless::Vec<SocketAddr, MAX_ENDPOINTS>,
        peers: BTreeMap<PublicKey, Peer>,
        queue: VecDeque<Queued>,
        events: VecDeque<PathChanged>,
        stats: DiscoStats,
    }

    impl<R> core::fmt::Debug for Disco<R> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("Disco")
                .field("public_key", &self.public_key)
                .field("peers", &self.peers.len())
                .finish_non_exhaustive()
        }
    }

    impl<R: rand_core::RngCore + rand_core::CryptoRng> Disco<R> {
        /// A state machine for the node with `private_key` and no peers.
        /// `wall` seeds the message counter so a restarted node's probes are
        /// not taken for replays.
        pub fn new(private_key: PrivateKey, rng: R, config: DiscoConfig, wall: WallTime) -> Self {
            let public_key = private_key.public_key();
            let counter = wall.secs.saturating_mul(1_000_000_000).saturating_add(u64::from(wall.nanos));
            Disco {
                private_key,
                public_key,
                rng,
                config,
                counter,
                local: heapless::Vec::new(),
                peers: BTreeMap::new(),
                queue: VecDeque::new(),
                events: VecDeque::new(),
                stats: DiscoStats::default(),
            }
        }

        /// The node's public key.
        pub fn public_key(&self) -> PublicKey {
            self.public_key
        }

        /// Counters of handled and refused probes.
        pub fn stats(&self) -> DiscoStats {
            self.stats
        }

        /// The chosen path to `peer`.
        pub fn path(&self, peer: &PublicKey) -> Option<Path> {
            self.peers.get(peer).and_then(|p| p.path)
        }

        /// The last measured round trip on the chosen direct path to `peer`.
        pub fn rtt(&self, peer: &PublicKey) -> Option<Duration> {
            let p = self.peers.get(peer)?;
            let Some(Path::Direct(a)) = p.path else { return None };
            p.candidates.iter().find(|c| c.addr == a).and_then(|c| c.rtt)
        }

        /// The candidate addresses known for `peer`, in the order kept.
        pub fn candidates(&self, peer: &PublicKey) -> impl Iterator<Item = SocketAddr> + '_ {
            self.peers.get(peer).into_iter().flat_map(|p| p.candidates.iter().map(|c| c.addr))
        }

        /// Sets this node's own endpoints (local addresses and the reflexive
        /// address STUN reported), sent to peers in call-me-maybe probes.
        /// Peers without a direct path are probed again at once.
        pub fn set_local_endpoints(&mut self, endpoints: &[SocketAddr], now: Instant) {
            let new: heapless::Vec<SocketAddr, MAX_ENDPOINTS> = endpoints.iter().copied().take(MAX_ENDPOINTS).collect();
            if new == self.local {
                return;
            }
            self.local = new;
            for p in self.peers.values_mut() {
                if !p.path.is_some_and(Path::is_direct) {
                    p.next_ping = now;
                }
            }
        }

        /// Adds a peer (derives the pair keys). Adding a known peer changes nothing.
        pub fn add_peer(&mut self, peer: PublicKey, now: Instant) -> Result<(), DiscoError> {
            if self.peers.contains_key(&peer) {
                return Ok(());
            }
            let keys = PairKeys::derive(&self.private_key, &peer)?;
            self.peers.insert(
                peer,
                Peer {
                    keys,
                    replay: ReplayWindow::new(),
                    relay: false,
                    candidates: heapless::Vec::new(),
                    path: None,
                    next_ping: now,
                    next_reprobe: now,
                },
            );
            Ok(())
        }

        /// Removes a peer and forgets its paths.
        pub fn remove_peer(&mut self, peer: &PublicKey) {
            self.peers.remove(peer);
        }

        /// Sets the endpoints the control server reports for `peer`; learned
        /// candidates are kept. Unknown peers are ignored.
        pub fn set_peer_endpoints(&mut self, peer: &PublicKey, endpoints: &[SocketAddr], now: Instant) {
            let Some(p) = self.peers.get_mut(peer) else { return };
            let mut changed = false;
            for c in p.candidates.iter_mut() {
                let reported = endpoints.contains(&c.addr);
                changed |= c.reported != reported;
                c.reported = reported;
            }
            for e in endpoints {
                if !p.candidates.iter().any(|c| c.addr == *e) {
                    changed = true;
                    insert_candidate(&mut p.candidates, Candidate::new(*e, true, now));
                }
            }
            // Forget learned candidates that were never alive once a newer
            // report came, so stale guesses do not crowd the list.
            p.candidates
                .retain(|c| c.reported || c.last_pong.is_some() || c.learned_at + Duration::from_secs(60) > now);
            if changed {
                p.next_ping = now;
            }
            self.reselect(*peer, now);
        }

        /// Says whether `peer` is reachable through the relay.
        pub fn set_peer_relay(&mut self, peer: &PublicKey, relay: bool, now: Instant) {
            if let Some(p) = self.peers.get_mut(peer) {
                p.relay = relay;
                self.reselect(*peer, now);
            }
        }

        /// Handles a probe that [`is_disco`] recognised. Answers wait in
        /// [`Disco::poll_transmit`], path changes in [`Disco::poll_event`].
        pub fn handle_datagram(&mut self, source: Source, buf: &[u8], now: Instant) -> Result<Received, DiscoError> {
            let header = Header::parse(buf).inspect_err(|_| self.stats.malformed += 1)?;
            let Some(p) = self.peers.get_mut(&header.sender) else {
                self.stats.unknown_peer += 1;
                return Err(DiscoError::UnknownPeer);
            };
            let body = match p.keys.open(buf) {
                Ok(b) => b,
                Err(e) => {
                    if e == DiscoError::Forged {
                        self.stats.forged += 1;
                    } else {
                        self.stats.malformed += 1;
                    }
                    return Err(e);
                }
            };
            if !p.replay.update(header.counter) {
                self.stats.replayed += 1;
                return Err(DiscoError::Replayed);
            }
            let peer = header.sender;
            match body {
                Body::Ping { tx_id } => {
                    self.stats.received += 1;
                    let (destination, observed) = match source {
                        Source::Direct(a) => (Destination::Direct(a), a),
                        Source::Relay => (Destination::Relay, RELAY_ENDPOINT),
                    };
                    if let Source::Direct(from) = source {
                        let trust = self.config.trust;
                        let p = self.peers.get_mut(&peer).expect("checked above");
                        // Ping back at once when the address is new, or known
                        // but not answering and not pinged in the last
                        // second: the ping opened our way through its NAT,
                        // and ours may open its way through ours (a NAT that
                        // just lifted a block), without waiting for the next
                        // heartbeat. A live address is not pinged back, so
                        // two sides never ping each other back and forth.
                        let ping_back = match p.candidates.iter().find(|c| c.addr == from) {
                            None => {
                                insert_candidate(&mut p.candidates, Candidate::new(from, false, now));
                                true
                            }
                            Some(c) => {
                                !c.alive(now, trust)
                                    && !c
                                        .pending
                                        .iter()
                                        .flatten()
                                        .any(|&(_, at)| now.saturating_duration_since(at) < PING_BACK_SPACING)
                            }
                        };
                        if ping_back {
                            self.ping(peer, from, now);
                        }
                    }
                    self.send(peer, destination, &Body::Pong { tx_id, observed });
                    Ok(Received::Ping)
                }
                Body::Pong { tx_id, observed } => {
                    let Source::Direct(from) = source else {
                        self.stats.unsolicited += 1;
                        return Err(DiscoError::Unsolicited);
                    };
                    let p = self.peers.get_mut(&peer).expect("checked above");
                    let sent = p.candidates.iter_mut().find(|c| c.addr == from).and_then(|c| {
                        let slot = c.pending.iter_mut().find(|s| s.is_some_and(|(t, _)| t == tx_id))?;
                        let (_, at) = slot.take().expect("found by is_some_and");
                        let rtt = now.saturating_duration_since(at);
                        c.last_pong = Some(now);
                        c.rtt = Some(rtt);
                        Some(rtt)
                    });
                    let Some(rtt) = sent else {
                        self.stats.unsolicited += 1;
                        return Err(DiscoError::Unsolicited);
                    };
                    self.stats.received += 1;
                    self.reselect(peer, now);
                    Ok(Received::Pong { rtt, observed })
                }
                Body::CallMeMaybe { endpoints } => {
                    self.stats.received += 1;
                    let p = self.peers.get_mut(&peer).expect("checked above");
                    for e in &endpoints {
                        if !p.candidates.iter().any(|c| c.addr == *e) {
                            insert_candidate(&mut p.candidates, Candidate::new(*e, false, now));
                        }
                    }
                    for e in &endpoints {
                        self.ping(peer, *e, now);
                    }
                    Ok(Received::CallMeMaybe)
                }
            }
        }

        /// The next probe to send, written into `buf` (at least
        /// [`MAX_MESSAGE_LEN`] bytes). Poll after every `handle_*` call and
        /// every configuration change until it returns `Ok(None)`.
        pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Result<Option<Transmit>, DiscoError> {
            let Some(q) = self.queue.front() else { return Ok(None) };
            if buf.len() < q.len {
                return Err(DiscoError::BufferTooSmall { needed: q.len });
            }
            let q = self.queue.pop_front().expect("front exists");
            buf[..q.len].copy_from_slice(&q.bytes[..q.len]);
            Ok(Some(Transmit { destination: q.destination, peer: q.peer, len: q.len }))
        }

        /// The next path change. Poll after every `handle_*` call.
        pub fn poll_event(&mut self) -> Option<PathChanged> {
            self.events.pop_front()
        }

        /// When [`Disco::handle_timeout`] is due next.
        pub fn poll_timeout(&self) -> Option<Instant> {
            let trust = self.config.trust;
            self.peers
                .values()
                .filter_map(|p| {
                    let expiry = match p.path {
                        Some(Path::Direct(a)) => {
                            p.candidates.iter().find(|c| c.addr == a).and_then(|c| c.last_pong).map(|t| t + trust)
                        }
                        _ => None,
                    };
                    let probe = if p.candidates.is_empty() && (!p.relay || self.local.is_empty()) {
                        None
                    } else {
                        Some(p.next_ping)
                    };
                    match (expiry, probe) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                })
                .min()
        }

        /// Sends due pings and call-me-maybes and drops paths that stopped answering.
        pub fn handle_timeout(&mut self, now: Instant) {
            // Peers are visited in key order (BTreeMap) so runs are
            // reproducible; the list is made per timeout, not per packet.
            let due: alloc::vec::Vec<PublicKey> = self
                .peers
                .iter()
                .filter(|(_, p)| p.next_ping <= now || matches!(p.path, Some(Path::Direct(_))))
                .map(|(k, _)| *k)
                .collect();
            for peer in due {
                self.reselect(peer, now);
                let p = self.peers.get_mut(&peer).expect("listed above");
                if p.next_ping > now {
                    continue;
                }
                let direct = p.path.and_then(|path| match path {
                    Path::Direct(a) => Some(a),
                    Path::Relay => None,
                });
                let full = direct.is_none() || p.next_reprobe <= now;
                p.next_ping = now + self.config.heartbeat;
                if full {
                    p.next_reprobe = now + self.config.reprobe;
                }
                let targets: heapless::Vec<SocketAddr, MAX_CANDIDATES> =
                    if full { p.candidates.iter().map(|c| c.addr).collect() } else { direct.into_iter().collect() };
                let call = direct.is_none() && p.relay && !self.local.is_empty();
                for a in targets {
                    self.ping(peer, a, now);
                }
                if call {
                    let endpoints = self.local.clone();
                    self.send(peer, Destination::Relay, &Body::CallMeMaybe { endpoints });
                }
            }
        }

        fn ping(&mut self, peer: PublicKey, to: SocketAddr, now: Instant) {
            let mut tx_id = [0u8; TX_ID_LEN];
            self.rng.fill_bytes(&mut tx_id);
            let Some(p) = self.peers.get_mut(&peer) else { return };
            let Some(c) = p.candidates.iter_mut().find(|c| c.addr == to) else { return };
            // Reuse the oldest slot: a ping that old has timed out anyway.
            let slot = c.pending.iter_mut().min_by_key(|s| s.map(|(_, at)| at)).expect("PENDING_PINGS is not zero");
            *slot = Some((tx_id, now));
            self.send(peer, Destination::Direct(to), &Body::Ping { tx_id });
        }

        fn send(&mut self, peer: PublicKey, destination: Destination, body: &Body) {
            let Some(p) = self.peers.get(&peer) else { return };
            let mut q = Queued { destination, peer, len: 0, bytes: [0; MAX_MESSAGE_LEN] };
            let counter = self.counter;
            self.counter += 1;
            q.len = p.keys.seal(&self.public_key, counter, body, &mut q.bytes).expect("the buffer is MAX_MESSAGE_LEN");
            if self.queue.len() >= MAX_QUEUED {
                self.queue.pop_front();
            }
            self.queue.push_back(q);
            self.stats.sent += 1;
        }

        /// Applies the path-selection rules (module docs) to `peer`.
        fn reselect(&mut self, peer: PublicKey, now: Instant) {
            let trust = self.config.trust;
            let Some(p) = self.peers.get_mut(&peer) else { return };
            let best = p
                .candidates
                .iter()
                .filter(|c| c.alive(now, trust))
                .min_by_key(|c| (c.rtt.unwrap_or(Duration::MAX), c.addr))
                .map(|c| (c.addr, c.rtt.unwrap_or(Duration::MAX)));
            let current = match p.path {
                Some(Path::Direct(a)) => {
                    p.candidates.iter().find(|c| c.addr == a && c.alive(now, trust)).map(|c| (a, c.rtt))
                }
                _ => None,
            };
            let chosen = match (current, best) {
                (Some((a, Some(cur))), Some((b, rtt))) if b != a && rtt.saturating_mul(3) < cur.saturating_mul(2) => {
                    Some(Path::Direct(b))
                }
                (Some((a, _)), _) => Some(Path::Direct(a)),
                (None, Some((b, _))) => Some(Path::Direct(b)),
                (None, None) => p.relay.then_some(Path::Relay),
            };
            if chosen != p.path {
                if !chosen.is_some_and(Path::is_direct) {
                    // Lost the direct path: look for another at once.
                    p.next_ping = now;
                }
                p.path = chosen;
                self.events.push_back(PathChanged { peer, path: chosen });
            }
        }
    }

    /// Adds a candidate, evicting the oldest learned one when full (reported
    /// ones are never evicted for learned ones).
    fn insert_candidate(list: &mut heapless::Vec<Candidate, MAX_CANDIDATES>, c: Candidate) {
        if list.is_full() {
            let victim = list
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.reported || c.reported)
                .min_by_key(|(_, x)| (x.last_pong.is_some(), x.learned_at))
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    list.swap_remove(i);
                }
                None => return,
            }
        }
        let _ = list.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PrivateKey {
        PrivateKey::from_bytes([b; 32])
    }

    #[test]
    fn pair_keys_agree_and_are_directional() {
        let (a, b) = (key(1), key(2));
        let ka = PairKeys::derive(&a, &b.public_key()).unwrap();
        let kb = PairKeys::derive(&b, &a.public_key()).unwrap();
        assert_eq!(ka.send, kb.recv);
        assert_eq!(ka.recv, kb.send);
        assert_ne!(ka.send, ka.recv);
        assert_eq!(PairKeys::derive(&a, &a.public_key()).unwrap_err(), DiscoError::BadKey);
        assert_eq!(PairKeys::derive(&a, &PublicKey([0; 32])).unwrap_err(), DiscoError::BadKey);
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let (a, b) = (key(1), key(2));
        let ka = PairKeys::derive(&a, &b.public_key()).unwrap();
        let kb = PairKeys::derive(&b, &a.public_key()).unwrap();
        let mut endpoints = heapless::Vec::new();
        endpoints.push("192.0.2.1:41641".parse().unwrap()).unwrap();
        endpoints.push("[2001:db8::5]:7".parse().unwrap()).unwrap();
        let bodies = [
            Body::Ping { tx_id: [9; 12] },
            Body::Pong { tx_id: [3; 12], observed: "198.51.100.2:1234".parse().unwrap() },
            Body::CallMeMaybe { endpoints },
        ];
        for body in bodies {
            let mut buf = [0u8; MAX_MESSAGE_LEN];
            let n = ka.seal(&a.public_key(), 77, &body, &mut buf).unwrap();
            assert!(is_disco(&buf[..n]));
            assert_eq!(Header::parse(&buf[..n]).unwrap().counter, 77);
            assert_eq!(kb.open(&buf[..n]).unwrap(), body);
            // The sender cannot open its own probe (directional keys), and
            // no flipped byte passes.
            assert_eq!(ka.open(&buf[..n]), Err(DiscoError::Forged));
            for i in MAGIC.len()..n {
                let mut t = buf;
                t[i] ^= 0x20;
                assert!(kb.open(&t[..n]).is_err(), "flip at {i}");
            }
        }
    }

    #[test]
    fn relay_proof_agrees_only_for_the_key_holder() {
        let (client, relay, thief) = (key(1), key(2), key(3));
        let nonce = [5u8; 32];
        let c = relay_proof(&client, &relay.public_key(), &client.public_key(), &nonce).unwrap();
        let r = relay_proof(&relay, &client.public_key(), &client.public_key(), &nonce).unwrap();
        assert_eq!(c, r);
        // Someone claiming the client's key with their own private key.
        let t = relay_proof(&thief, &relay.public_key(), &client.public_key(), &nonce).unwrap();
        assert_ne!(t, r);
        assert_ne!(relay_proof(&client, &relay.public_key(), &client.public_key(), &[6; 32]).unwrap(), r);
    }

    #[test]
    fn not_wireguard_not_stun() {
        // WireGuard: type 1..4 then three zeros; STUN: two leading zero bits.
        assert!(!(1..=4).contains(&MAGIC[0]));
        assert_ne!(MAGIC[0] & 0xc0, 0);
        let mut wg = [0u8; 148];
        wg[0] = 1;
        assert!(!is_disco(&wg));
    }

    #[test]
    fn bodies_refuse_bad_lengths() {
        assert_eq!(Body::parse(&[]), Err(DiscoError::Malformed));
        assert_eq!(Body::parse(&[TYPE_PING; 12]), Err(DiscoError::Malformed));
        assert_eq!(Body::parse(&[TYPE_CALL_ME_MAYBE, 9]), Err(DiscoError::Malformed));
        assert_eq!(Body::parse(&[TYPE_CALL_ME_MAYBE, 1, 0]), Err(DiscoError::Malformed));
        assert_eq!(Body::parse(&[7, 0]), Err(DiscoError::Malformed));
        assert!(matches!(Body::parse(&[TYPE_CALL_ME_MAYBE, 0]), Ok(Body::CallMeMaybe { .. })));
    }
}
