//! Time as a parameter.
//!
//! The datapath never reads a clock: callers pass [`Time`] (nanoseconds since an
//! epoch of their choosing, monotonic). The I/O shell reads the clock once per batch;
//! tests step a virtual clock.

use std::time::Duration;

/// A point in time, in nanoseconds since the caller's epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Time(pub u64);

impl Time {
    pub const ZERO: Time = Time(0);

    pub const fn from_nanos(ns: u64) -> Time {
        Time(ns)
    }

    pub const fn from_secs(s: u64) -> Time {
        Time(s * 1_000_000_000)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;

    /// Saturating.
    fn add(self, d: Duration) -> Time {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(ns))
    }
}
