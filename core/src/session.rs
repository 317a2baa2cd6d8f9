//! Transport sessions: a keypair's send counter, replay window and in-place
//! sealing and opening of transport messages (paper 5.4.6), and the three
//! keypair slots a peer rotates through (current, previous, next).

use crate::consts::{REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME};
use crate::crypto::{CryptoProvider, TransportKey, TAG_LEN};
use crate::messages::{padded_len, TransportHeader, TRANSPORT_HEADER_LEN};
use crate::noise::SessionKeys;
use crate::replay::ReplayWindow;
use crate::time::Instant;
use core::ops::Range;

/// Why a packet could not be sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The keypair is older than REJECT_AFTER_TIME.
    Expired,
    /// The keypair has sent REJECT_AFTER_MESSAGES messages.
    CounterExhausted,
    /// The buffer cannot hold header, padded packet and tag.
    BufferTooSmall {
        /// Bytes the buffer needs.
        needed: usize,
    },
}

impl core::fmt::Display for SealError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SealError::Expired => f.write_str("keypair expired"),
            SealError::CounterExhausted => f.write_str("keypair message limit reached"),
            SealError::BufferTooSmall { needed } => write!(f, "buffer too small: {needed} bytes needed"),
        }
    }
}

impl core::error::Error for SealError {}

/// Why a transport message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// The keypair is older than REJECT_AFTER_TIME.
    Expired,
    /// The counter was seen before, is too old for the window, or is past
    /// REJECT_AFTER_MESSAGES.
    Replay,
    /// The tag did not authenticate.
    Decrypt,
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OpenError::Expired => "keypair expired",
            OpenError::Replay => "replayed or too old counter",
            OpenError::Decrypt => "transport message failed to authenticate",
        })
    }
}

impl core::error::Error for OpenError {}

/// One direction pair of transport keys from one handshake.
pub struct Keypair<K> {
    send: K,
    receive: K,
    /// Our index for this keypair.
    pub local_index: u32,
    /// The peer's index for this keypair.
    pub remote_index: u32,
    /// Whether we initiated the handshake that made it.
    pub initiator: bool,
    /// When the handshake completed.
    pub created: Instant,
    send_counter: u64,
    replay: ReplayWindow,
}

impl<K> core::fmt::Debug for Keypair<K> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Keypair")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("initiator", &self.initiator)
            .field("send_counter", &self.send_counter)
            .finish_non_exhaustive()
    }
}

impl<K: TransportKey> Keypair<K> {
    /// A keypair from a completed handshake's keys, with `P`'s transport AEAD.
    pub fn new<P: CryptoProvider<TransportKey = K>>(keys: &SessionKeys, now: Instant) -> Self {
        Keypair {
            send: P::transport_key(&keys.send),
            receive: P::transport_key(&keys.receive),
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            initiator: keys.initiator,
            created: now,
            send_counter: 0,
            replay: ReplayWindow::new(),
        }
    }

    /// Messages sealed so far (the next counter).
    pub fn send_counter(&self) -> u64 {
        self.send_counter
    }

    /// Whether the keypair is too old to send or receive with.
    pub fn is_expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.created) >= REJECT_AFTER_TIME
    }

    /// Whether sending with it should start a new handshake (paper 6.2):
    /// by message count for both sides, by age only for the initiator.
    pub fn wants_rekey(&self, now: Instant) -> bool {
        self.send_counter >= REKEY_AFTER_MESSAGES
            || (self.initiator && now.saturating_duration_since(self.created) >= REKEY_AFTER_TIME)
    }

    /// Advances the send counter to `counter` if that is ahead of it. A
    /// testing aid for exercising the message limits: moving only forward
    /// never reuses a nonce.
    pub fn advance_send_counter(&mut self, counter: u64) {
        self.send_counter = self.send_counter.max(counter);
    }

    /// Seals the IP packet at `buf[TRANSPORT_HEADER_LEN..][..len]` in place:
    /// pads it with zeros to a multiple of 16 (but not beyond `mtu` when
    /// given), encrypts it, writes the header before it and the tag after.
    /// Returns the datagram's length; the datagram is `buf[..returned]`.
    #[inline]
    pub fn seal(&mut self, buf: &mut [u8], len: usize, mtu: Option<usize>, now: Instant) -> Result<usize, SealError> {
        let mut padded = padded_len(len);
        if let Some(mtu) = mtu {
            if len <= mtu {
                padded = padded.min(mtu);
            }
        }
        let needed = TRANSPORT_HEADER_LEN + padded + TAG_LEN;
        if buf.len() < needed {
            return Err(SealError::BufferTooSmall { needed });
        }
        if self.is_expired(now) {
            return Err(SealError::Expired);
        }
        let counter = self.send_counter;
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(SealError::CounterExhausted);
        }
        self.send_counter = counter + 1;
        let body = &mut buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + padded];
        body[len..].fill(0);
        let tag = self.send.seal_in_place(counter, body);
        buf[TRANSPORT_HEADER_LEN + padded..needed].copy_from_slice(&tag);
        TransportHeader { receiver: self.remote_index, counter }.emit(buf);
        Ok(needed)
    }

    /// Opens a transport datagram in place. Returns the range of `datagram`
    /// holding the plaintext (still padded). The replay window moves only
    /// once the tag authenticated.
    #[inline]
    pub fn open(&mut self, datagram: &mut [u8], counter: u64, now: Instant) -> Result<Range<usize>, OpenError> {
        if datagram.len() < crate::messages::TRANSPORT_MIN_LEN {
            return Err(OpenError::Decrypt);
        }
        if self.is_expired(now) {
            return Err(OpenError::Expired);
        }
        if !self.replay.check(counter) {
            return Err(OpenError::Replay);
        }
        let end = datagram.len() - TAG_LEN;
        let (body, tag) = datagram.split_at_mut(end);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| OpenError::Decrypt)?;
        self.receive.open_in_place(counter, &mut body[TRANSPORT_HEADER_LEN..], tag).map_err(|_| OpenError::Decrypt)?;
        if !self.replay.update(counter) {
            return Err(OpenError::Replay);
        }
        Ok(TRANSPORT_HEADER_LEN..end)
    }
}

/// Which of a peer's keypair slots an index refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The keypair used for sending.
    Current,
    /// The keypair replaced last, kept to receive packets still in flight.
    Previous,
    /// A responder's new keypair, not usable for sending until the
    /// initiator has used it (key confirmation).
    Next,
}

/// A peer's keypairs (paper 6.1, key rotation).
pub struct Keypairs<K> {
    /// The keypair for sending.
    pub current: Option<Keypair<K>>,
    /// The keypair before it, still accepted for receiving.
    pub previous: Option<Keypair<K>>,
    /// An unconfirmed responder keypair.
    pub next: Option<Keypair<K>>,
}

impl<K> Default for Keypairs<K> {
    fn default() -> Self {
        Keypairs { current: None, previous: None, next: None }
    }
}

impl<K: TransportKey> Keypairs<K> {
    /// Installs a keypair from a completed handshake. Returns the local
    /// indices of keypairs dropped, which must be released.
    pub fn install(&mut self, kp: Keypair<K>) -> [Option<u32>; 2] {
        let idx = |k: Option<Keypair<K>>| k.map(|k| k.local_index);
        if kp.initiator {
            // An initiator may send at once: the new keypair becomes current.
            // An unconfirmed next keypair would never be confirmed now; it
            // becomes previous so packets already sealed with it still open.
            if let Some(next) = self.next.take() {
                let dropped_prev = self.previous.replace(next);
                let dropped_cur = self.current.replace(kp);
                [idx(dropped_prev), idx(dropped_cur)]
            } else {
                let old = self.current.replace(kp);
                let dropped = core::mem::replace(&mut self.previous, old);
                [idx(dropped), None]
            }
        } else {
            // A responder waits for the initiator's first packet.
            let dropped_next = self.next.replace(kp);
            let dropped_prev = self.previous.take();
            [idx(dropped_next), idx(dropped_prev)]
        }
    }

    /// The slot holding the keypair with local index `index`.
    #[inline]
    pub fn slot_of(&self, index: u32) -> Option<Slot> {
        if self.current.as_ref().is_some_and(|k| k.local_index == index) {
            Some(Slot::Current)
        } else if self.next.as_ref().is_some_and(|k| k.local_index == index) {
            Some(Slot::Next)
        } else if self.previous.as_ref().is_some_and(|k| k.local_index == index) {
            Some(Slot::Previous)
        } else {
            None
        }
    }

    /// The keypair in a slot.
    #[inline]
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Keypair<K>> {
        match slot {
            Slot::Current => self.current.as_mut(),
            Slot::Previous => self.previous.as_mut(),
            Slot::Next => self.next.as_mut(),
        }
    }

    /// The initiator used our next keypair: it becomes current. Returns the
    /// local index of the keypair dropped.
    pub fn confirm_next(&mut self) -> Option<u32> {
        let next = self.next.take()?;
        let old = self.current.replace(next);
        core::mem::replace(&mut self.previous, old).map(|k| k.local_index)
    }

    /// Drops every keypair, returning their local indices.
    pub fn clear(&mut self) -> [Option<u32>; 3] {
        [
            self.current.take().map(|k| k.local_index),
            self.previous.take().map(|k| k.local_index),
            self.next.take().map(|k| k.local_index),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Portable;

    #[test]
    fn short_datagrams_are_refused_not_a_panic() {
        let keys = SessionKeys { send: [1; 32], receive: [2; 32], local_index: 1, remote_index: 2, initiator: true };
        let mut kp = Keypair::new::<Portable>(&keys, Instant::ZERO);
        for len in 0..crate::messages::TRANSPORT_MIN_LEN {
            let mut d = [0u8; 64];
            assert_eq!(kp.open(&mut d[..len], 0, Instant::ZERO), Err(OpenError::Decrypt));
        }
        let mut buf = [0u8; 8];
        assert_eq!(
            kp.seal(&mut buf, 100, None, Instant::ZERO),
            Err(SealError::BufferTooSmall { needed: 16 + 112 + 16 })
        );
    }
}
