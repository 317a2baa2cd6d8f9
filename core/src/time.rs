//! Time as values: the caller's monotonic clock and wall clock, never read here.

use core::ops::{Add, Sub};
use core::time::Duration;

/// A point on the caller's monotonic clock, in nanoseconds since an arbitrary origin.
///
/// The core never reads a clock: every `handle_*` call takes the current `Instant`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The origin of the clock.
    pub const ZERO: Instant = Instant(0);

    /// An instant `nanos` nanoseconds after the origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// An instant `d` after the origin.
    pub const fn from_duration(d: Duration) -> Self {
        Instant(d.as_nanos() as u64)
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d.as_nanos().min(u64::MAX as u128) as u64))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        self.saturating_add(d)
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// Wall-clock time (since the Unix epoch), used only for TAI64N handshake
/// timestamps and for reporting the last handshake time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub secs: u64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl WallTime {
    /// Wall time from seconds and nanoseconds since the Unix epoch.
    pub const fn new(secs: u64, nanos: u32) -> Self {
        WallTime { secs, nanos }
    }

    /// Wall time from a duration since the Unix epoch.
    pub const fn from_unix(d: Duration) -> Self {
        WallTime { secs: d.as_secs(), nanos: d.subsec_nanos() }
    }

    /// The 12-byte TAI64N label (paper 5.1): big-endian seconds offset by 2^62 + 10,
    /// then big-endian nanoseconds. The low bits of the nanoseconds are cleared
    /// (about 16.8 ms granularity) so the timestamp does not reveal a precise clock.
    pub fn tai64n(self) -> Tai64N {
        const TAI64_BASE: u64 = (1 << 62) + 10;
        const WHITENER_MASK: u32 = 0x100_0000 - 1;
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&(TAI64_BASE.wrapping_add(self.secs)).to_be_bytes());
        out[8..].copy_from_slice(&(self.nanos & !WHITENER_MASK).to_be_bytes());
        Tai64N(out)
    }

    /// The wall time `d` after this one.
    pub fn after(self, d: Duration) -> WallTime {
        let total = Duration::new(self.secs, self.nanos) + d;
        WallTime::from_unix(total)
    }
}

/// A TAI64N timestamp as it appears in an initiation. Comparison is
/// lexicographic over the big-endian bytes, which orders them in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tai64N(pub [u8; 12]);
