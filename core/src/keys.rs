//! Key types that wipe themselves and never print their bytes.

use crate::crypto::KEY_LEN;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A Curve25519 public key (a peer's static identity, or an ephemeral key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl core::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Public keys are not secret; a short prefix is enough to tell them apart.
        write!(f, "PublicKey({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

impl From<[u8; KEY_LEN]> for PublicKey {
    fn from(b: [u8; KEY_LEN]) -> Self {
        PublicKey(b)
    }
}

/// A Curve25519 private key. Zeroized on drop; `Debug` prints no bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// Wraps 32 bytes as a private key (clamping happens in X25519 itself).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PrivateKey(bytes)
    }

    /// A fresh random private key.
    pub fn generate(rng: &mut impl rand_core::CryptoRngCore) -> Self {
        let mut b = [0u8; KEY_LEN];
        rng.fill_bytes(&mut b);
        PrivateKey(b)
    }

    /// The key's bytes, for storing it (for example in a `wg` configuration).
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(crate::crypto::public_key(&self.secret()))
    }

    pub(crate) fn secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }
}

impl core::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// An optional preshared symmetric key (all zeros when unused, as the paper says).
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey(pub(crate) [u8; KEY_LEN]);

impl PresharedKey {
    /// Wraps 32 bytes as a preshared key.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PresharedKey(bytes)
    }

    /// The key's bytes, for reporting it through the configuration protocol.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0
    }

    /// Whether this is the all-zero "no preshared key" value.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

impl core::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}
