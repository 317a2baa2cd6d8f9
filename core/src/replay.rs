//! The sliding replay window of RFC 6479, as wide as the kernel's and
//! wireguard-go's: a ring of 128 64-bit blocks, 8192 bits, of which 8128
//! (one block less) are the usable window behind the highest counter seen.

use crate::consts::REJECT_AFTER_MESSAGES;

const BLOCK_BITS: u64 = 64;
const RING_BLOCKS: usize = 128;
/// Counters this far behind the highest one seen are still accepted once.
pub const WINDOW_SIZE: u64 = (RING_BLOCKS as u64 - 1) * BLOCK_BITS;

/// Remembers which counters of a keypair have been received.
///
/// Use [`ReplayWindow::check`] before decrypting (cheap rejection of old or
/// duplicate counters) and [`ReplayWindow::update`] only after the packet
/// authenticated, so forged packets cannot move the window.
#[derive(Clone)]
pub struct ReplayWindow {
    last: u64,
    /// Whether any counter was accepted; `last` is meaningless until then.
    started: bool,
    ring: [u64; RING_BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReplayWindow").field("last", &self.last).finish_non_exhaustive()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub const fn new() -> Self {
        ReplayWindow { last: 0, started: false, ring: [0; RING_BLOCKS] }
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.started.then_some(self.last)
    }

    /// Whether `counter` could be accepted: below the reject limit, not older
    /// than the window, and not seen before. Does not change the window.
    #[inline]
    pub fn check(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if !self.started || counter > self.last {
            return true;
        }
        if self.last - counter > WINDOW_SIZE {
            return false;
        }
        let block = ((counter / BLOCK_BITS) as usize) & (RING_BLOCKS - 1);
        self.ring[block] & (1 << (counter % BLOCK_BITS)) == 0
    }

    /// Marks `counter` as received. Returns `false` (and changes nothing) if
    /// it was a replay or outside the window.
    #[inline]
    pub fn update(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if !self.started || counter > self.last {
            let new_block = counter / BLOCK_BITS;
            if self.started {
                let current = self.last / BLOCK_BITS;
                let diff = (new_block - current).min(RING_BLOCKS as u64);
                for i in 1..=diff {
                    self.ring[((current + i) as usize) & (RING_BLOCKS - 1)] = 0;
                }
            } else {
                self.ring = [0; RING_BLOCKS];
            }
            self.last = counter;
            self.started = true;
        }
        let block = ((counter / BLOCK_BITS) as usize) & (RING_BLOCKS - 1);
        self.ring[block] |= 1 << (counter % BLOCK_BITS);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_duplicates() {
        let mut w = ReplayWindow::new();
        for c in 0..20_000u64 {
            assert!(w.update(c));
            assert!(!w.update(c));
        }
    }

    #[test]
    fn window_edges() {
        let mut w = ReplayWindow::new();
        assert!(w.update(10_000));
        assert!(w.check(10_000 - WINDOW_SIZE));
        assert!(!w.check(10_000 - WINDOW_SIZE - 1));
        assert!(w.update(10_000 - WINDOW_SIZE));
        assert!(!w.update(10_000 - WINDOW_SIZE));
        assert!(!w.update(REJECT_AFTER_MESSAGES));
        assert!(w.update(REJECT_AFTER_MESSAGES - 1));
        assert!(!w.update(REJECT_AFTER_MESSAGES - 1));
    }

    #[test]
    fn far_jump_clears_ring() {
        let mut w = ReplayWindow::new();
        assert!(w.update(5));
        assert!(w.update(1_000_000));
        // 5 is now far outside the window.
        assert!(!w.check(5));
        // A counter inside the new window whose block was reused is fresh.
        assert!(w.update(1_000_000 - 64));
    }
}
