//! The Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s handshake exactly as WireGuard
//! specifies it (paper section 5.4): message construction and consumption,
//! and the derivation of transport keys. MACs and cookies are in
//! [`crate::cookie`]; this module fills and checks only the Noise fields.
//!
//! A responder consumes an initiation in two steps: [`begin_initiation`]
//! recovers the initiator's static key with the device's own key alone, then
//! the device finds that peer and calls [`Handshake::finish_initiation`] on
//! the peer's state.

use crate::consts::{CONSTRUCTION, HANDSHAKE_INITIATION_RATE, IDENTIFIER};
use crate::crypto::{self, aead_open, aead_seal, dh, hash, kdf, KEY_LEN, TAG_LEN};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::messages::{Initiation, Response};
use crate::time::{Instant, Tai64N, WallTime};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Why a handshake message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A sealed field did not authenticate: wrong keys or a forged message.
    Decrypt,
    /// A Diffie-Hellman result was all zeros (a low-order public key).
    WeakKey,
    /// The initiation's timestamp is not newer than the last one accepted
    /// from this peer: a replayed initiation.
    StaleTimestamp,
    /// Initiations from this peer arrive faster than 50 per second.
    Flood,
    /// A response arrived that matches no initiation in flight.
    UnexpectedResponse,
    /// The initiator's static key is our own.
    OwnKey,
}

impl core::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            HandshakeError::Decrypt => "handshake field failed to authenticate",
            HandshakeError::WeakKey => "public key of low order",
            HandshakeError::StaleTimestamp => "initiation timestamp not newer than the last accepted",
            HandshakeError::Flood => "initiations arriving faster than the rate limit",
            HandshakeError::UnexpectedResponse => "response without a matching initiation",
            HandshakeError::OwnKey => "initiation from our own static key",
        })
    }
}

impl core::error::Error for HandshakeError {}

/// The device's own static identity with the values derived from it.
#[derive(Clone)]
pub struct StaticIdentity {
    private: PrivateKey,
    public: PublicKey,
    /// HASH(HASH(CONSTRUCTION) || IDENTIFIER || own public key) start of the responder's hash.
    responder_hash0: [u8; KEY_LEN],
}

impl core::fmt::Debug for StaticIdentity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StaticIdentity").field("public", &self.public).finish_non_exhaustive()
    }
}

fn initial_chaining_key() -> [u8; KEY_LEN] {
    hash(&[CONSTRUCTION])
}

fn initial_hash(responder_static: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let ck = initial_chaining_key();
    let h = hash(&[&ck, IDENTIFIER]);
    hash(&[&h, responder_static])
}

impl StaticIdentity {
    /// The identity for a private key.
    pub fn new(private: PrivateKey) -> Self {
        let public = private.public_key();
        StaticIdentity { responder_hash0: initial_hash(&public.0), private, public }
    }

    /// Our public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Our private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.private
    }
}

/// Per-peer handshake state: the peer's keys and the handshake in progress.
pub struct Handshake {
    remote_static: PublicKey,
    preshared: PresharedKey,
    /// DH(our static, their static), computed once per peer (paper 5.4.2 note).
    static_static: Option<[u8; KEY_LEN]>,
    /// The two roles are kept apart so that when both sides initiate at
    /// once, each completes its own handshake as initiator as well as
    /// answering the other's: the sessions converge instead of colliding.
    initiator: Option<Initiator>,
    responder: Option<Responder>,
    /// The newest initiation timestamp accepted from this peer.
    latest_timestamp: Tai64N,
    /// When the last initiation from this peer was accepted (flood check).
    last_initiation_consumed: Option<Instant>,
}

/// Our initiation in flight (initiator role).
#[derive(Zeroize, ZeroizeOnDrop)]
struct Initiator {
    #[zeroize(skip)]
    local_index: u32,
    hash: [u8; KEY_LEN],
    chaining_key: [u8; KEY_LEN],
    ephemeral_private: [u8; KEY_LEN],
}

/// The peer's initiation we accepted and have yet to answer (responder role).
#[derive(Zeroize, ZeroizeOnDrop)]
struct Responder {
    #[zeroize(skip)]
    remote_index: u32,
    hash: [u8; KEY_LEN],
    chaining_key: [u8; KEY_LEN],
    remote_ephemeral: [u8; KEY_LEN],
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Some(ss) = self.static_static.as_mut() {
            ss.zeroize();
        }
    }
}

impl core::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Handshake")
            .field("remote_static", &self.remote_static)
            .field("initiation_in_flight", &self.initiator.is_some())
            .field("initiation_received", &self.responder.is_some())
            .finish_non_exhaustive()
    }
}

/// The symmetric keys a completed handshake yields (paper 5.4.5).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SessionKeys {
    /// Key for packets we send.
    pub send: [u8; KEY_LEN],
    /// Key for packets we receive.
    pub receive: [u8; KEY_LEN],
    /// Our index: peers put it in the receiver field of what they send us.
    #[zeroize(skip)]
    pub local_index: u32,
    /// The peer's index: we put it in the receiver field of what we send.
    #[zeroize(skip)]
    pub remote_index: u32,
    /// Whether we initiated (only the initiator may send first).
    #[zeroize(skip)]
    pub initiator: bool,
}

impl core::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

/// An initiation whose sender has been identified but not yet authenticated
/// against that peer's state (the first half of consuming an initiation).
pub struct PendingInitiation {
    /// The initiator's static public key, recovered from the message.
    pub remote_static: PublicKey,
    sender: u32,
    hash: [u8; KEY_LEN],
    chaining_key: [u8; KEY_LEN],
    remote_ephemeral: [u8; KEY_LEN],
    encrypted_timestamp: [u8; 12 + TAG_LEN],
}

impl Drop for PendingInitiation {
    fn drop(&mut self) {
        self.hash.zeroize();
        self.chaining_key.zeroize();
    }
}

/// First half of consuming an initiation (paper 5.4.2, responder side):
/// recovers the initiator's static key using only our own identity.
pub fn begin_initiation(me: &StaticIdentity, msg: &Initiation) -> Result<PendingInitiation, HandshakeError> {
    let mut ck = initial_chaining_key();
    let mut h = me.responder_hash0;
    // e
    let [c] = kdf::<1>(&ck, &msg.ephemeral);
    ck = c;
    h = hash(&[&h, &msg.ephemeral]);
    // es
    let mut es = dh(&me.private.secret(), &msg.ephemeral).ok_or(HandshakeError::WeakKey)?;
    let [c, mut k] = kdf::<2>(&ck, &es);
    es.zeroize();
    ck = c;
    // s
    let mut static_plain = [0u8; KEY_LEN];
    static_plain.copy_from_slice(&msg.encrypted_static[..KEY_LEN]);
    let tag: [u8; TAG_LEN] = msg.encrypted_static[KEY_LEN..].try_into().expect("48-byte field");
    let opened = aead_open(&k, 0, &h, &mut static_plain, &tag);
    k.zeroize();
    opened.map_err(|_| HandshakeError::Decrypt)?;
    h = hash(&[&h, &msg.encrypted_static]);
    if crypto::ct_eq(&static_plain, &me.public.0) {
        return Err(HandshakeError::OwnKey);
    }
    Ok(PendingInitiation {
        remote_static: PublicKey(static_plain),
        sender: msg.sender,
        hash: h,
        chaining_key: ck,
        remote_ephemeral: msg.ephemeral,
        encrypted_timestamp: msg.encrypted_timestamp,
    })
}

impl Handshake {
    /// Handshake state for a peer with static key `remote_static`.
    pub fn new(me: &StaticIdentity, remote_static: PublicKey, preshared: PresharedKey) -> Self {
        Handshake {
            static_static: dh(&me.private.secret(), &remote_static.0),
            remote_static,
            preshared,
            initiator: None,
            responder: None,
            latest_timestamp: Tai64N::default(),
            last_initiation_consumed: None,
        }
    }

    /// The peer's static public key.
    pub fn remote_static(&self) -> &PublicKey {
        &self.remote_static
    }

    /// Replaces the preshared key (takes effect from the next handshake).
    pub fn set_preshared_key(&mut self, psk: PresharedKey) {
        self.preshared = psk;
    }

    /// The preshared key.
    pub fn preshared_key(&self) -> &PresharedKey {
        &self.preshared
    }

    /// Recomputes what depends on our static key after it changed.
    pub fn set_local_identity(&mut self, me: &StaticIdentity) {
        if let Some(ss) = self.static_static.as_mut() {
            ss.zeroize();
        }
        self.static_static = dh(&me.private.secret(), &self.remote_static.0);
        self.clear();
    }

    /// The local index of an initiation in flight, if any.
    pub fn pending_local_index(&self) -> Option<u32> {
        self.initiator.as_ref().map(|i| i.local_index)
    }

    /// Forgets any handshake in progress (wiping its secrets).
    pub fn clear(&mut self) {
        self.initiator = None;
        self.responder = None;
    }

    /// Builds an initiation (paper 5.4.2, initiator side). MAC fields are left
    /// zero for [`crate::cookie`] to fill.
    pub fn create_initiation(
        &mut self,
        me: &StaticIdentity,
        local_index: u32,
        wall: WallTime,
        rng: &mut impl rand_core::CryptoRngCore,
    ) -> Result<Initiation, HandshakeError> {
        let ss = self.static_static.ok_or(HandshakeError::WeakKey)?;
        let mut ck = initial_chaining_key();
        let mut h = initial_hash(&self.remote_static.0);
        let ephemeral = PrivateKey::generate(rng);
        let ephemeral_public = ephemeral.public_key();
        // e
        let [c] = kdf::<1>(&ck, &ephemeral_public.0);
        ck = c;
        h = hash(&[&h, &ephemeral_public.0]);
        // es
        let mut es = dh(&ephemeral.secret(), &self.remote_static.0).ok_or(HandshakeError::WeakKey)?;
        let [c, mut k] = kdf::<2>(&ck, &es);
        es.zeroize();
        ck = c;
        // s
        let mut encrypted_static = [0u8; KEY_LEN + TAG_LEN];
        encrypted_static[..KEY_LEN].copy_from_slice(&me.public.0);
        let tag = aead_seal(&k, 0, &h, &mut encrypted_static[..KEY_LEN]);
        encrypted_static[KEY_LEN..].copy_from_slice(&tag);
        h = hash(&[&h, &encrypted_static]);
        // ss
        let [c, k2] = kdf::<2>(&ck, &ss);
        k = k2;
        ck = c;
        // timestamp
        let mut encrypted_timestamp = [0u8; 12 + TAG_LEN];
        encrypted_timestamp[..12].copy_from_slice(&wall.tai64n().0);
        let tag = aead_seal(&k, 0, &h, &mut encrypted_timestamp[..12]);
        encrypted_timestamp[12..].copy_from_slice(&tag);
        h = hash(&[&h, &encrypted_timestamp]);
        k.zeroize();

        self.initiator =
            Some(Initiator { local_index, hash: h, chaining_key: ck, ephemeral_private: ephemeral.to_bytes() });
        Ok(Initiation {
            sender: local_index,
            ephemeral: ephemeral_public.0,
            encrypted_static,
            encrypted_timestamp,
            mac1: [0; 16],
            mac2: [0; 16],
        })
    }

    /// Second half of consuming an initiation: authenticates the timestamp
    /// against this peer's keys, refuses replays and floods, and records the
    /// handshake so [`Handshake::create_response`] can answer it.
    pub fn finish_initiation(&mut self, pending: PendingInitiation, now: Instant) -> Result<(), HandshakeError> {
        let ss = self.static_static.ok_or(HandshakeError::WeakKey)?;
        let [ck, mut k] = kdf::<2>(&pending.chaining_key, &ss);
        let mut timestamp = [0u8; 12];
        timestamp.copy_from_slice(&pending.encrypted_timestamp[..12]);
        let tag: [u8; TAG_LEN] = pending.encrypted_timestamp[12..].try_into().expect("28-byte field");
        let opened = aead_open(&k, 0, &pending.hash, &mut timestamp, &tag);
        k.zeroize();
        opened.map_err(|_| HandshakeError::Decrypt)?;
        let timestamp = Tai64N(timestamp);
        if timestamp <= self.latest_timestamp {
            return Err(HandshakeError::StaleTimestamp);
        }
        if let Some(last) = self.last_initiation_consumed {
            if now.saturating_duration_since(last) <= HANDSHAKE_INITIATION_RATE {
                return Err(HandshakeError::Flood);
            }
        }
        let h = hash(&[&pending.hash, &pending.encrypted_timestamp]);
        self.latest_timestamp = timestamp;
        self.last_initiation_consumed = Some(now);
        self.responder = Some(Responder {
            remote_index: pending.sender,
            hash: h,
            chaining_key: ck,
            remote_ephemeral: pending.remote_ephemeral,
        });
        Ok(())
    }

    /// Builds the response to the initiation last accepted (paper 5.4.3) and
    /// derives the session keys. MAC fields are left zero.
    pub fn create_response(
        &mut self,
        local_index: u32,
        rng: &mut impl rand_core::CryptoRngCore,
    ) -> Result<(Response, SessionKeys), HandshakeError> {
        let (remote_index, mut h, mut ck, remote_ephemeral) = match &self.responder {
            Some(r) => (r.remote_index, r.hash, r.chaining_key, r.remote_ephemeral),
            None => return Err(HandshakeError::UnexpectedResponse),
        };
        let ephemeral = PrivateKey::generate(rng);
        let ephemeral_public = ephemeral.public_key();
        let ee = dh(&ephemeral.secret(), &remote_ephemeral).ok_or(HandshakeError::WeakKey)?;
        let se = dh(&ephemeral.secret(), &self.remote_static.0).ok_or(HandshakeError::WeakKey)?;
        let mut k = response_chain(&mut ck, &mut h, &ephemeral_public.0, ee, se, &self.preshared);
        // empty
        let tag = aead_seal(&k, 0, &h, &mut []);
        k.zeroize();
        h.zeroize();
        let [receive, send] = kdf::<2>(&ck, &[]);
        ck.zeroize();
        self.responder = None;
        Ok((
            Response {
                sender: local_index,
                receiver: remote_index,
                ephemeral: ephemeral_public.0,
                encrypted_nothing: tag,
                mac1: [0; 16],
                mac2: [0; 16],
            },
            SessionKeys { send, receive, local_index, remote_index, initiator: false },
        ))
    }

    /// Consumes a response to our initiation (paper 5.4.3, initiator side)
    /// and derives the session keys. On failure the initiation stays in
    /// flight, so a forged response cannot cancel a genuine handshake.
    pub fn consume_response(&mut self, me: &StaticIdentity, msg: &Response) -> Result<SessionKeys, HandshakeError> {
        let (local_index, mut h, mut ck, ephemeral_private) = match &self.initiator {
            Some(i) if i.local_index == msg.receiver => (i.local_index, i.hash, i.chaining_key, i.ephemeral_private),
            _ => return Err(HandshakeError::UnexpectedResponse),
        };
        let ephemeral = PrivateKey::from_bytes(ephemeral_private);
        let ee = dh(&ephemeral.secret(), &msg.ephemeral).ok_or(HandshakeError::WeakKey)?;
        let se = dh(&me.private.secret(), &msg.ephemeral).ok_or(HandshakeError::WeakKey)?;
        let mut k = response_chain(&mut ck, &mut h, &msg.ephemeral, ee, se, &self.preshared);
        let opened = aead_open(&k, 0, &h, &mut [], &msg.encrypted_nothing);
        k.zeroize();
        h.zeroize();
        opened.map_err(|_| HandshakeError::Decrypt)?;
        let [send, receive] = kdf::<2>(&ck, &[]);
        ck.zeroize();
        self.initiator = None;
        Ok(SessionKeys { send, receive, local_index, remote_index: msg.sender, initiator: true })
    }
}

/// The response's part of the chain, the same for both roles once each has
/// computed the two Diffie-Hellman values its keys allow (paper 5.4.3):
/// mixes in the responder's ephemeral key `e`, then `ee`, `se` and the
/// preshared key, and returns the key sealing the empty payload. The DH
/// values are wiped here.
fn response_chain(
    ck: &mut [u8; KEY_LEN],
    h: &mut [u8; KEY_LEN],
    responder_ephemeral: &[u8; KEY_LEN],
    mut ee: [u8; KEY_LEN],
    mut se: [u8; KEY_LEN],
    psk: &PresharedKey,
) -> [u8; KEY_LEN] {
    let [c] = kdf::<1>(ck, responder_ephemeral);
    *h = hash(&[h, responder_ephemeral]);
    let [c] = kdf::<1>(&c, &ee);
    ee.zeroize();
    let [c] = kdf::<1>(&c, &se);
    se.zeroize();
    let [c, mut tau, k] = kdf::<3>(&c, &psk.0);
    *ck = c;
    *h = hash(&[h, &tau]);
    tau.zeroize();
    k
}
