//! Cryptographic primitives as WireGuard uses them, and the provider trait that
//! lets the transport AEAD be swapped for a faster implementation.
//!
//! The handshake (BLAKE2s hash, HMAC, HKDF, X25519, ChaCha20-Poly1305 with
//! associated data, XChaCha20-Poly1305 for cookies) always runs on the portable
//! pure-Rust crates: it is a few operations per handshake. The transport AEAD,
//! which every data packet pays for, goes through a [`CryptoProvider`]:
//! [`Portable`] everywhere (including `no_std`), [`Ring`] on hosts with the
//! `ring` feature, about three times faster on x86_64 and aarch64.

use blake2::digest::{consts::U16, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, XChaCha20Poly1305};
use zeroize::Zeroize;

mod portable;
#[cfg(feature = "ring")]
mod ring_provider;

pub use portable::{Portable, PortableKey};
#[cfg(feature = "ring")]
pub use ring_provider::{Ring, RingKey};

/// The provider the data plane gets unless it asks for another.
#[cfg(feature = "ring")]
pub type DefaultProvider = Ring;
/// The provider the data plane gets unless it asks for another.
#[cfg(not(feature = "ring"))]
pub type DefaultProvider = Portable;

/// Length of a BLAKE2s-256 hash, of every symmetric key and of X25519 values.
pub const KEY_LEN: usize = 32;
/// Length of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Length of a MAC1/MAC2/cookie value (keyed BLAKE2s-128).
pub const MAC_LEN: usize = 16;
/// Length of an XChaCha20-Poly1305 nonce.
pub const XNONCE_LEN: usize = 24;

/// An authentication failure: the tag did not match. Carries no detail on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AeadError;

impl core::fmt::Display for AeadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("authentication tag mismatch")
    }
}

impl core::error::Error for AeadError {}

/// A source of transport keys: ChaCha20-Poly1305 with a 64-bit counter nonce
/// and no associated data, as WireGuard's transport messages use it (paper 5.4.6).
pub trait CryptoProvider: 'static {
    /// A short name for reports and benchmarks.
    const NAME: &'static str;
    /// A key ready to seal and open transport packets; it wipes itself on drop
    /// where the underlying library allows.
    type TransportKey: TransportKey;
    /// Expands a 32-byte session key into a transport key.
    fn transport_key(key: &[u8; KEY_LEN]) -> Self::TransportKey;
}

/// Sealing and opening of transport packets in place.
pub trait TransportKey: Send + Sync {
    /// Encrypts `buf` in place under nonce `counter` and returns the tag.
    fn seal_in_place(&self, counter: u64, buf: &mut [u8]) -> [u8; TAG_LEN];
    /// Decrypts `buf` in place under nonce `counter` if `tag` authenticates it.
    /// On failure `buf` holds unspecified bytes that must not be used.
    fn open_in_place(&self, counter: u64, buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), AeadError>;
}

/// The 12-byte ChaCha20-Poly1305 nonce for a counter: 4 zero bytes, then the
/// counter little-endian (paper 5.4.6).
#[inline]
pub fn counter_nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// HASH(a || b || ...): BLAKE2s-256 over the concatenation.
pub fn hash(parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, input): keyed BLAKE2s with a 16-byte output (paper 5.4.4). The
/// key is 32 bytes for MAC1 and 16 (a cookie) for MAC2.
pub fn mac(key: &[u8], input: &[&[u8]]) -> [u8; MAC_LEN] {
    debug_assert!(key.len() == KEY_LEN || key.len() == MAC_LEN);
    let mut m = <Blake2sMac<U16> as Mac>::new_from_slice(key).expect("16- and 32-byte keys are valid for BLAKE2s");
    for p in input {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// HMAC-BLAKE2s (RFC 2104 with a 64-byte block), as the paper's HMAC.
pub fn hmac(key: &[u8; KEY_LEN], input: &[&[u8]]) -> [u8; KEY_LEN] {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for i in 0..KEY_LEN {
        ipad[i] ^= key[i];
        opad[i] ^= key[i];
    }
    let mut inner = Blake2s256::new();
    Digest::update(&mut inner, ipad);
    for p in input {
        Digest::update(&mut inner, p);
    }
    let mut inner_hash: [u8; KEY_LEN] = inner.finalize().into();
    let mut outer = Blake2s256::new();
    Digest::update(&mut outer, opad);
    Digest::update(&mut outer, inner_hash);
    let out = outer.finalize().into();
    ipad.zeroize();
    opad.zeroize();
    inner_hash.zeroize();
    out
}

/// KDF_n(key, input) from the paper (HKDF with HMAC-BLAKE2s), returning the
/// first `N` derived 32-byte values (`N` is 1, 2 or 3).
pub fn kdf<const N: usize>(key: &[u8; KEY_LEN], input: &[u8]) -> [[u8; KEY_LEN]; N] {
    debug_assert!((1..=3).contains(&N));
    let mut prk = hmac(key, &[input]);
    let mut out = [[0u8; KEY_LEN]; N];
    let mut prev: [u8; KEY_LEN] = [0; KEY_LEN];
    for (i, slot) in out.iter_mut().enumerate() {
        let counter = [(i + 1) as u8];
        prev = if i == 0 { hmac(&prk, &[&counter]) } else { hmac(&prk, &[&prev, &counter]) };
        *slot = prev;
    }
    prk.zeroize();
    prev.zeroize();
    out
}

/// AEAD(key, counter, plaintext, aad) for handshake fields: seals `buf` in
/// place and returns the tag.
pub fn aead_seal(key: &[u8; KEY_LEN], counter: u64, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    let cipher = ChaCha20Poly1305::new(key.into());
    let tag = cipher
        .encrypt_in_place_detached(&counter_nonce(counter).into(), aad, buf)
        .expect("handshake fields are far below the AEAD length limit");
    tag.into()
}

/// Opens a handshake field sealed by [`aead_seal`].
pub fn aead_open(
    key: &[u8; KEY_LEN],
    counter: u64,
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadError> {
    let cipher = ChaCha20Poly1305::new(key.into());
    cipher.decrypt_in_place_detached(&counter_nonce(counter).into(), aad, buf, tag.into()).map_err(|_| AeadError)
}

/// XAEAD(key, nonce, plaintext, aad): XChaCha20-Poly1305, used for cookie replies.
pub fn xaead_seal(key: &[u8; KEY_LEN], nonce: &[u8; XNONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    let cipher = XChaCha20Poly1305::new(key.into());
    let tag =
        cipher.encrypt_in_place_detached(nonce.into(), aad, buf).expect("cookie is far below the AEAD length limit");
    tag.into()
}

/// Opens a value sealed by [`xaead_seal`].
pub fn xaead_open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; XNONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher.decrypt_in_place_detached(nonce.into(), aad, buf, tag.into()).map_err(|_| AeadError)
}

/// X25519 (RFC 7748) of a secret scalar and a public point. Returns `None` when
/// the result is all zeros (a low-order point), which WireGuard refuses.
pub fn dh(secret: &x25519_dalek::StaticSecret, public: &[u8; KEY_LEN]) -> Option<[u8; KEY_LEN]> {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    if shared.was_contributory() {
        Some(shared.to_bytes())
    } else {
        None
    }
}

/// The public key of a secret scalar.
pub fn public_key(secret: &x25519_dalek::StaticSecret) -> [u8; KEY_LEN] {
    x25519_dalek::PublicKey::from(secret).to_bytes()
}

/// Constant-time equality of two byte strings of the same length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
