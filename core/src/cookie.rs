//! MAC1, MAC2 and cookie replies (paper 5.4.4 and 5.4.7), the decision of
//! when the device is under load, and a per-source rate limit on handshakes.
//!
//! Every handshake message carries MAC1, keyed by the receiver's public key,
//! so a receiver can drop junk without any Diffie-Hellman. Under load a
//! receiver also demands MAC2, keyed by a cookie bound to the sender's IP
//! address and port; a sender without a valid one gets a cookie reply
//! instead of a handshake, proving it can receive at its address.

use crate::consts::{COOKIE_REFRESH_TIME, COOKIE_SECRET_MAX_AGE, LABEL_COOKIE, LABEL_MAC1};
use crate::crypto::{ct_eq, hash, mac, xaead_open, xaead_seal, KEY_LEN, MAC_LEN, TAG_LEN, XNONCE_LEN};
use crate::keys::PublicKey;
use crate::messages::CookieReply;
use crate::time::Instant;
use core::net::{IpAddr, SocketAddr};
use core::time::Duration;
use zeroize::Zeroize;

/// Why a cookie reply was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CookieError {
    /// We sent no handshake message this reply could answer.
    Unsolicited,
    /// The sealed cookie did not authenticate.
    Decrypt,
}

impl core::fmt::Display for CookieError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CookieError::Unsolicited => "cookie reply to no message we sent",
            CookieError::Decrypt => "cookie reply failed to authenticate",
        })
    }
}

impl core::error::Error for CookieError {}

/// HASH(LABEL_MAC1 || public key): the key of MAC1 for messages to that key.
pub fn mac1_key(public: &PublicKey) -> [u8; KEY_LEN] {
    hash(&[LABEL_MAC1, &public.0])
}

/// HASH(LABEL_COOKIE || public key): the key sealing cookies from that key.
pub fn cookie_key(public: &PublicKey) -> [u8; KEY_LEN] {
    hash(&[LABEL_COOKIE, &public.0])
}

/// The offset of MAC1 in a handshake message (the last 32 bytes are the
/// MACs), or `None` for a message too short to carry them.
fn mac1_offset(msg: &[u8]) -> Option<usize> {
    msg.len().checked_sub(2 * MAC_LEN)
}

/// The sending side, one per peer: stamps MAC1 and MAC2 on the handshake
/// messages we send to that peer and keeps the cookie it gave us.
#[derive(Clone)]
pub struct CookieSender {
    mac1_key: [u8; KEY_LEN],
    cookie_key: [u8; KEY_LEN],
    cookie: Option<([u8; MAC_LEN], Instant)>,
    /// MAC1 of the last handshake message sent: the associated data of a reply.
    last_mac1: Option<[u8; MAC_LEN]>,
}

impl Drop for CookieSender {
    fn drop(&mut self) {
        if let Some((c, _)) = self.cookie.as_mut() {
            c.zeroize();
        }
    }
}

impl core::fmt::Debug for CookieSender {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieSender").field("has_cookie", &self.cookie.is_some()).finish_non_exhaustive()
    }
}

impl CookieSender {
    /// The sender of handshake messages to `remote`.
    pub fn new(remote: &PublicKey) -> Self {
        CookieSender { mac1_key: mac1_key(remote), cookie_key: cookie_key(remote), cookie: None, last_mac1: None }
    }

    /// Writes MAC1, and MAC2 if we hold a fresh cookie (zeros otherwise), into
    /// the last 32 bytes of a complete handshake message. A message shorter
    /// than 32 bytes has no room for them and is left as it is.
    pub fn stamp(&mut self, msg: &mut [u8], now: Instant) {
        let Some(at) = mac1_offset(msg) else { return };
        let mac1 = mac(&self.mac1_key, &[&msg[..at]]);
        msg[at..at + MAC_LEN].copy_from_slice(&mac1);
        self.last_mac1 = Some(mac1);
        let mac2 = match &self.cookie {
            Some((cookie, received)) if now.saturating_duration_since(*received) < COOKIE_REFRESH_TIME => {
                mac(cookie, &[&msg[..at + MAC_LEN]])
            }
            _ => [0; MAC_LEN],
        };
        msg[at + MAC_LEN..].copy_from_slice(&mac2);
    }

    /// Accepts a cookie reply to the last message we stamped.
    pub fn consume_reply(&mut self, reply: &CookieReply, now: Instant) -> Result<(), CookieError> {
        let aad = self.last_mac1.ok_or(CookieError::Unsolicited)?;
        let mut cookie = [0u8; MAC_LEN];
        cookie.copy_from_slice(&reply.encrypted_cookie[..MAC_LEN]);
        let tag: [u8; TAG_LEN] = reply.encrypted_cookie[MAC_LEN..].try_into().expect("32-byte field");
        xaead_open(&self.cookie_key, &reply.nonce, &aad, &mut cookie, &tag).map_err(|_| CookieError::Decrypt)?;
        self.cookie = Some((cookie, now));
        // A reply answers one message; a second copy is not accepted.
        self.last_mac1 = None;
        Ok(())
    }
}

/// The receiving side, one per device: checks MACs on handshake messages
/// sent to us and makes cookie replies.
pub struct CookieChecker {
    mac1_key: [u8; KEY_LEN],
    cookie_key: [u8; KEY_LEN],
    secret: [u8; KEY_LEN],
    secret_born: Option<Instant>,
}

impl Drop for CookieChecker {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl core::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieChecker").finish_non_exhaustive()
    }
}

/// The bytes of an address a cookie is bound to: IP then port.
fn address_bytes(addr: SocketAddr, out: &mut [u8; 18]) -> usize {
    let n = match addr.ip() {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    out[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    n + 2
}

impl CookieChecker {
    /// The checker for messages sent to our public key `own`.
    pub fn new(own: &PublicKey) -> Self {
        CookieChecker { mac1_key: mac1_key(own), cookie_key: cookie_key(own), secret: [0; KEY_LEN], secret_born: None }
    }

    /// Whether MAC1 of a complete handshake message is valid for our key.
    pub fn check_mac1(&self, msg: &[u8]) -> bool {
        let Some(at) = mac1_offset(msg) else { return false };
        let expected = mac(&self.mac1_key, &[&msg[..at]]);
        ct_eq(&expected, &msg[at..at + MAC_LEN])
    }

    /// The cookie for `src` under the current secret, if the secret is fresh.
    fn cookie_for(&self, src: SocketAddr, now: Instant) -> Option<[u8; MAC_LEN]> {
        let born = self.secret_born?;
        if now.saturating_duration_since(born) >= COOKIE_SECRET_MAX_AGE {
            return None;
        }
        let mut a = [0u8; 18];
        let n = address_bytes(src, &mut a);
        Some(mac(&self.secret, &[&a[..n]]))
    }

    /// Whether MAC2 of a complete handshake message is valid: made with the
    /// cookie we would give `src` now.
    pub fn check_mac2(&self, msg: &[u8], src: SocketAddr, now: Instant) -> bool {
        let (Some(mut cookie), Some(at)) = (self.cookie_for(src, now), mac1_offset(msg)) else {
            return false;
        };
        let at = at + MAC_LEN;
        let expected = mac(&cookie, &[&msg[..at]]);
        cookie.zeroize();
        ct_eq(&expected, &msg[at..at + MAC_LEN])
    }

    /// A cookie reply to the handshake message `msg` (whose sender index is
    /// `receiver_index`) received from `src`, or `None` if `msg` is too short
    /// to carry MACs. Rotates the secret when it is older than two minutes.
    pub fn create_reply(
        &mut self,
        msg: &[u8],
        receiver_index: u32,
        src: SocketAddr,
        now: Instant,
        rng: &mut impl rand_core::CryptoRngCore,
    ) -> Option<CookieReply> {
        let at = mac1_offset(msg)?;
        let stale = match self.secret_born {
            None => true,
            Some(born) => now.saturating_duration_since(born) >= COOKIE_SECRET_MAX_AGE,
        };
        if stale {
            rng.fill_bytes(&mut self.secret);
            self.secret_born = Some(now);
        }
        let mut cookie = self.cookie_for(src, now).expect("secret was just refreshed");
        let mut nonce = [0u8; XNONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let tag = xaead_seal(&self.cookie_key, &nonce, &msg[at..at + MAC_LEN], &mut cookie);
        let mut encrypted_cookie = [0u8; MAC_LEN + TAG_LEN];
        encrypted_cookie[..MAC_LEN].copy_from_slice(&cookie);
        encrypted_cookie[MAC_LEN..].copy_from_slice(&tag);
        Some(CookieReply { receiver: receiver_index, nonce, encrypted_cookie })
    }
}

/// When the device counts as under load: the driver's own signal (for
/// example its handshake queue depth), or more handshake messages in the
/// last second than `threshold`. Load persists for a second after the
/// signal clears, so an attacker cannot toggle it per packet.
#[derive(Clone, Debug)]
pub struct LoadMonitor {
    threshold: u32,
    window_start: Instant,
    count_in_window: u32,
    driver_says_loaded: bool,
    loaded_until: Option<Instant>,
}

/// How long the device stays under load after the last sign of it.
pub const UNDER_LOAD_LINGER: Duration = Duration::from_secs(1);

impl LoadMonitor {
    /// A monitor that declares load beyond `threshold` handshakes per second.
    pub fn new(threshold: u32) -> Self {
        LoadMonitor {
            threshold,
            window_start: Instant::ZERO,
            count_in_window: 0,
            driver_says_loaded: false,
            loaded_until: None,
        }
    }

    /// The driver's signal: `true` while its handshake queue is deep.
    pub fn set_driver_signal(&mut self, loaded: bool, now: Instant) {
        self.driver_says_loaded = loaded;
        if loaded {
            self.loaded_until = Some(now + UNDER_LOAD_LINGER);
        }
    }

    /// Counts one handshake message and says whether we are under load.
    pub fn on_handshake(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.count_in_window = 0;
        }
        self.count_in_window = self.count_in_window.saturating_add(1);
        if self.count_in_window > self.threshold {
            self.loaded_until = Some(now + UNDER_LOAD_LINGER);
        }
        self.is_loaded(now)
    }

    /// Whether we are under load at `now`.
    pub fn is_loaded(&self, now: Instant) -> bool {
        self.driver_says_loaded || self.loaded_until.is_some_and(|t| now < t)
    }
}

#[cfg(feature = "alloc")]
pub use rate_limit::RateLimiter;

#[cfg(feature = "alloc")]
mod rate_limit {
    use crate::time::Instant;
    use alloc::collections::BTreeMap;
    use core::net::IpAddr;
    use core::time::Duration;

    /// Handshakes per second allowed from one source once its burst is spent.
    const PACKETS_PER_SECOND: u64 = 20;
    /// Handshakes one source may send back to back.
    const PACKETS_BURSTABLE: u64 = 5;
    const PACKET_COST: u64 = 1_000_000_000 / PACKETS_PER_SECOND;
    const MAX_TOKENS: u64 = PACKET_COST * PACKETS_BURSTABLE;
    /// Bound on tracked sources, so a spoofing flood cannot exhaust memory.
    const MAX_ENTRIES: usize = 1 << 16;

    #[derive(Clone, Copy, Debug)]
    struct Bucket {
        tokens: u64,
        last: Instant,
    }

    /// A token bucket per source address (IPv4 address, or IPv6 /64) for
    /// handshake messages that carry a valid cookie while under load.
    #[derive(Clone, Debug, Default)]
    pub struct RateLimiter {
        buckets: BTreeMap<[u8; 16], Bucket>,
        last_sweep: Option<Instant>,
    }

    fn key(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => {
                let mut k = v6.octets();
                k[8..].fill(0);
                k
            }
        }
    }

    impl RateLimiter {
        /// An empty limiter.
        pub fn new() -> Self {
            Self::default()
        }

        /// Whether one more handshake from `ip` is allowed at `now`.
        pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
            self.sweep(now);
            let k = key(ip);
            if let Some(b) = self.buckets.get_mut(&k) {
                let elapsed = now.saturating_duration_since(b.last).as_nanos().min(MAX_TOKENS as u128) as u64;
                b.tokens = (b.tokens + elapsed).min(MAX_TOKENS);
                b.last = now;
                if b.tokens >= PACKET_COST {
                    b.tokens -= PACKET_COST;
                    return true;
                }
                return false;
            }
            if self.buckets.len() >= MAX_ENTRIES {
                return false;
            }
            self.buckets.insert(k, Bucket { tokens: MAX_TOKENS - PACKET_COST, last: now });
            true
        }

        /// Number of sources tracked.
        pub fn len(&self) -> usize {
            self.buckets.len()
        }

        /// Whether no source is tracked.
        pub fn is_empty(&self) -> bool {
            self.buckets.is_empty()
        }

        /// Forgets sources idle for over a second, at most once a second.
        fn sweep(&mut self, now: Instant) {
            let due = self.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            if due {
                self.buckets.retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(1));
                self.last_sweep = Some(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    #[test]
    fn short_messages_are_refused_not_a_panic() {
        let pk = PrivateKey::from_bytes([7; 32]).public_key();
        let mut checker = CookieChecker::new(&pk);
        let mut sender = CookieSender::new(&pk);
        let now = Instant::from_nanos(1);
        for len in 0..32 {
            let mut msg = [1u8; 32];
            let msg = &mut msg[..len];
            assert!(!checker.check_mac1(msg));
            assert!(!checker.check_mac2(msg, "127.0.0.1:1".parse().unwrap(), now));
            let mut rng = rand::rngs::OsRng;
            assert!(checker.create_reply(msg, 0, "127.0.0.1:1".parse().unwrap(), now, &mut rng).is_none());
            let before = msg.to_vec();
            sender.stamp(msg, now);
            assert_eq!(msg, &before[..]);
        }
    }
}
