//! Adaptive polling: how long a packet thread keeps spinning on its ports
//! after work, before it sleeps until a port or its doorbell wakes it.

use std::time::Duration;

/// How long a packet thread keeps polling after it forwarded something.
#[derive(Debug, Clone, Copy, Default)]
pub struct Polling {
    /// At least this long (0: never poll, always sleep).
    pub min: Duration,
    /// While traffic keeps coming at a steady pace, twice the usual gap
    /// between arrivals, up to this: a request/response exchange every few
    /// milliseconds finds the thread awake (no wake-up on the path), and the
    /// polling stops as soon as the traffic does.
    pub max: Duration,
}

impl Polling {
    /// How long to keep polling, given the smoothed gap between arrivals.
    pub(crate) fn window(&self, gap: Duration) -> Duration {
        if self.min.is_zero() {
            return Duration::ZERO;
        }
        let adaptive = gap.saturating_mul(2);
        if adaptive <= self.max {
            adaptive.max(self.min)
        } else {
            self.min
        }
    }
}
