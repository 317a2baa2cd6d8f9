//! The portable transport provider: the pure-Rust `chacha20poly1305` crate.
//! It builds everywhere, including `no_std` microcontrollers.

use super::{counter_nonce, AeadError, CryptoProvider, TransportKey, KEY_LEN, TAG_LEN};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};

/// Transport AEAD on the pure-Rust `chacha20poly1305` crate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable;

/// A portable transport key; the cipher wipes its key on drop.
pub struct PortableKey(ChaCha20Poly1305);

impl core::fmt::Debug for PortableKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PortableKey(..)")
    }
}

impl CryptoProvider for Portable {
    const NAME: &'static str = "portable";
    type TransportKey = PortableKey;
    fn transport_key(key: &[u8; KEY_LEN]) -> PortableKey {
        PortableKey(ChaCha20Poly1305::new(key.into()))
    }
}

impl TransportKey for PortableKey {
    #[inline]
    fn seal_in_place(&self, counter: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
        self.0
            .encrypt_in_place_detached(&counter_nonce(counter).into(), &[], buf)
            .expect("transport packets are far below the AEAD length limit")
            .into()
    }

    #[inline]
    fn open_in_place(&self, counter: u64, buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), AeadError> {
        self.0.decrypt_in_place_detached(&counter_nonce(counter).into(), &[], buf, tag.into()).map_err(|_| AeadError)
    }
}
