//! The fast transport provider for hosts: ring's assembly ChaCha20-Poly1305.

use super::{counter_nonce, AeadError, CryptoProvider, TransportKey, KEY_LEN, TAG_LEN};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

/// Transport AEAD on `ring`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ring;

/// A ring transport key. ring keeps its expanded key private and does not
/// offer to wipe it; the 32-byte input key is wiped by the caller.
pub struct RingKey(LessSafeKey);

impl core::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

impl CryptoProvider for Ring {
    const NAME: &'static str = "ring";
    type TransportKey = RingKey;
    fn transport_key(key: &[u8; KEY_LEN]) -> RingKey {
        RingKey(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, key).expect("ChaCha20-Poly1305 takes a 32-byte key"),
        ))
    }
}

impl TransportKey for RingKey {
    #[inline]
    fn seal_in_place(&self, counter: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(counter_nonce(counter)), Aad::empty(), buf)
            .expect("transport packets are far below the AEAD length limit");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    #[inline]
    fn open_in_place(&self, counter: u64, buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), AeadError> {
        let tag = Tag::from(*tag);
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(counter_nonce(counter)),
                Aad::empty(),
                tag,
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| AeadError)
    }
}
