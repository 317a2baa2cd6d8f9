//! WireGuard's per-peer timers (paper section 6), as deadlines.
//!
//! The state here only records deadlines and counters; the caller reports
//! protocol events through the `on_*` methods, asks for [`Timers::next_deadline`],
//! and at that time calls [`Timers::expire`] to learn which actions are due.
//! Jitter is passed in so this module needs no randomness.

use crate::consts::{KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES, REJECT_AFTER_TIME, REKEY_TIMEOUT};
use crate::time::Instant;
use core::time::Duration;

/// What became due when timers expired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Resend the handshake initiation (a retry).
    pub retransmit_handshake: bool,
    /// Retries are exhausted: drop queued packets; keys will be zeroed later.
    pub give_up_handshake: bool,
    /// Send a passive keepalive (we received data and sent nothing since).
    pub send_keepalive: bool,
    /// We sent data and heard nothing back: start a new handshake.
    pub new_handshake: bool,
    /// No handshake for 3 x REJECT_AFTER_TIME: zero all key material.
    pub zero_key_material: bool,
    /// The persistent keepalive interval elapsed.
    pub persistent_keepalive: bool,
}

/// The timer state of one peer.
#[derive(Clone, Debug, Default)]
pub struct Timers {
    retransmit_handshake: Option<Instant>,
    send_keepalive: Option<Instant>,
    need_another_keepalive: bool,
    new_handshake: Option<Instant>,
    zero_key_material: Option<Instant>,
    persistent_keepalive: Option<Instant>,
    persistent_keepalive_interval: Option<Duration>,
    handshake_attempts: u32,
    /// When the last initiation was sent, for the REKEY_TIMEOUT spacing.
    pub last_initiation_sent: Option<Instant>,
    /// Whether the receive-side "rekey before the keypair dies" initiation was sent.
    pub sent_last_minute_handshake: bool,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn due(t: &mut Option<Instant>, now: Instant) -> bool {
    if t.is_some_and(|t| t <= now) {
        *t = None;
        true
    } else {
        false
    }
}

impl Timers {
    /// The earliest deadline, if any timer is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.send_keepalive, self.new_handshake, self.zero_key_material, self.persistent_keepalive]
            .into_iter()
            .fold(self.retransmit_handshake, earliest)
    }

    /// Sets the persistent keepalive interval (`None` or zero disables it).
    pub fn set_persistent_keepalive(&mut self, interval: Option<Duration>, now: Instant) {
        self.persistent_keepalive_interval = interval.filter(|d| !d.is_zero());
        self.persistent_keepalive = self.persistent_keepalive_interval.map(|d| now + d);
    }

    /// Initiations sent in the current attempt.
    pub fn handshake_attempts(&self) -> u32 {
        self.handshake_attempts
    }

    /// Whether the "sent data, heard nothing" handshake timer is armed (then
    /// [`Timers::on_data_sent`] ignores its jitter).
    pub fn new_handshake_armed(&self) -> bool {
        self.new_handshake.is_some()
    }

    /// A data packet (not a keepalive) was sent.
    pub fn on_data_sent(&mut self, now: Instant, jitter: Duration) {
        if self.new_handshake.is_none() {
            self.new_handshake = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter);
        }
    }

    /// A data packet (not a keepalive) was received.
    pub fn on_data_received(&mut self, now: Instant) {
        if self.send_keepalive.is_none() {
            self.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
        } else {
            self.need_another_keepalive = true;
        }
    }

    /// Any authenticated packet (data, keepalive or handshake) was sent.
    pub fn on_authenticated_sent(&mut self) {
        self.send_keepalive = None;
    }

    /// Any authenticated packet was received.
    pub fn on_authenticated_received(&mut self) {
        self.new_handshake = None;
    }

    /// Any authenticated packet was sent or received: push the persistent
    /// keepalive back.
    pub fn on_authenticated_traversal(&mut self, now: Instant) {
        if let Some(d) = self.persistent_keepalive_interval {
            self.persistent_keepalive = Some(now + d);
        }
    }

    /// An initiation was sent; `retry` says whether it is a retransmission.
    pub fn on_handshake_initiated(&mut self, now: Instant, jitter: Duration, retry: bool) {
        if !retry {
            self.handshake_attempts = 0;
        }
        self.last_initiation_sent = Some(now);
        self.retransmit_handshake = Some(now + REKEY_TIMEOUT + jitter);
    }

    /// A handshake completed (either side).
    pub fn on_handshake_complete(&mut self) {
        self.retransmit_handshake = None;
        self.handshake_attempts = 0;
        self.sent_last_minute_handshake = false;
    }

    /// New session keys were derived.
    pub fn on_session_derived(&mut self, now: Instant) {
        self.zero_key_material = Some(now + REJECT_AFTER_TIME * 3);
    }

    /// Disarms every timer (the peer was removed or its keys zeroed).
    pub fn stop_all(&mut self) {
        let persistent = self.persistent_keepalive_interval;
        *self = Timers { persistent_keepalive_interval: persistent, ..Timers::default() };
    }

    /// Collects what is due at `now` and rearms or disarms timers as the
    /// protocol says. `jitter` is used if a keepalive must be rescheduled.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut out = Expired::default();
        if due(&mut self.retransmit_handshake, now) {
            if self.handshake_attempts >= MAX_TIMER_HANDSHAKES {
                out.give_up_handshake = true;
                self.handshake_attempts = 0;
                if self.zero_key_material.is_none() {
                    self.zero_key_material = Some(now + REJECT_AFTER_TIME * 3);
                }
            } else {
                self.handshake_attempts += 1;
                out.retransmit_handshake = true;
            }
        }
        if due(&mut self.send_keepalive, now) {
            out.send_keepalive = true;
            if self.need_another_keepalive {
                self.need_another_keepalive = false;
                self.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
            }
        }
        if due(&mut self.new_handshake, now) {
            out.new_handshake = true;
        }
        if due(&mut self.zero_key_material, now) {
            out.zero_key_material = true;
        }
        if due(&mut self.persistent_keepalive, now) {
            if let Some(d) = self.persistent_keepalive_interval {
                out.persistent_keepalive = true;
                self.persistent_keepalive = Some(now + d);
            }
        }
        out
    }
}
