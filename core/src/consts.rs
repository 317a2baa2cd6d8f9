//! Protocol constants from the WireGuard paper (section 6.1, "Timers") and the
//! message formats of section 5.4.

use core::time::Duration;

/// Rekey once a keypair has sent this many messages (paper 6.1: 2^60).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// A keypair may never send or accept a counter at or beyond this (2^64 - 2^13 - 1).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// The initiator starts a new handshake when its current keypair is this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// A keypair older than this is never used to send or receive.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// Give up retrying a handshake after this long.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// Retransmit an unanswered initiation after this long (plus jitter).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound of the random jitter added to each retransmission (paper 6.1: 1/3 s).
pub const REKEY_TIMEOUT_JITTER_MAX: Duration = Duration::from_millis(334);
/// Send a keepalive when data was received but nothing sent for this long.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Number of initiations (REKEY_ATTEMPT_TIME / REKEY_TIMEOUT) before giving up.
pub const MAX_TIMER_HANDSHAKES: u32 = 18;
/// Minimum spacing of initiations sent to one peer (50 per second).
pub const REKEY_MIN_INTERVAL: Duration = Duration::from_millis(20);
/// Receiving initiations faster than this from one peer is treated as a flood (wireguard-go: 50/s).
pub const HANDSHAKE_INITIATION_RATE: Duration = Duration::from_millis(20);
/// The cookie secret is regenerated this often (paper 5.4.7).
pub const COOKIE_SECRET_MAX_AGE: Duration = Duration::from_secs(120);
/// A received cookie is usable for this long, less a small margin.
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120 - 5);
/// Maximum packets queued per peer while waiting for a handshake (as the kernel).
pub const MAX_QUEUED_PACKETS: usize = 128;

/// Noise construction name (paper 5.4).
pub const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Protocol identifier mixed into the chaining hash (paper 5.4).
pub const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
/// Label used to derive the MAC1 key (paper 5.4.4).
pub const LABEL_MAC1: &[u8] = b"mac1----";
/// Label used to derive the cookie encryption key (paper 5.4.7).
pub const LABEL_COOKIE: &[u8] = b"cookie--";
