//! Expiry: connections are reclaimed from a coarse wheel of one-second
//! buckets of keys, filled when a connection is committed or its deadline
//! shrinks (packet threads push to a lock-free queue; only the sweep takes
//! the wheel), so a sweep visits only entries that may be due.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use super::{CanonKey, Conntrack, map};
use crate::time::Time;

impl Conntrack {
    pub(super) fn schedule(&self, key: CanonKey, at: Time) {
        self.scheduled.push((at.0.div_ceil(1_000_000_000), key));
    }

    /// Moves what packet threads scheduled into the wheel (the caller holds it).
    fn take_scheduled(&self, wheel: &mut BTreeMap<u64, Vec<CanonKey>>) {
        while let Some((second, key)) = self.scheduled.pop() {
            wheel.entry(second).or_default().push(key);
        }
    }

    /// Removes expired entries among those due in the expiry wheel, visiting at
    /// most about `budget` keys (a whole one-second bucket at least). Entries whose
    /// deadline moved later are re-queued. Returns how many were removed.
    pub fn sweep(&self, now: Time, budget: usize) -> usize {
        let now_second = now.0 / 1_000_000_000;
        if self.affinity_swept.swap(now_second, Relaxed) != now_second {
            self.expire_affinity(now);
        }
        let mut due: Vec<CanonKey> = Vec::new();
        {
            let mut wheel = self.wheel.lock().unwrap_or_else(|p| p.into_inner());
            self.take_scheduled(&mut wheel);
            while due.len() < budget {
                let Some(bucket) = wheel.first_entry() else {
                    break;
                };
                if *bucket.key() > now_second {
                    break;
                }
                due.extend(bucket.remove());
            }
        }
        let mut removed = 0;
        for key in due {
            if let map::Entry::Occupied(mut e) = self.map.entry(key) {
                if e.expires <= now {
                    let gone = e.remove();
                    self.unlink(&key, &gone);
                    removed += 1;
                } else {
                    let at = e.expires;
                    e.queued = at;
                    self.schedule(key, at);
                }
            }
        }
        self.len.fetch_sub(removed, Relaxed);
        self.stats.expired.fetch_add(removed as u64, Relaxed);
        removed
    }

    /// Keys waiting in the expiry wheel (bookkeeping, for tests and stats).
    pub fn wheel_len(&self) -> usize {
        let mut wheel = self.wheel.lock().unwrap_or_else(|p| p.into_inner());
        self.take_scheduled(&mut wheel);
        wheel.values().map(Vec::len).sum()
    }

    /// Sweeps everything that is due.
    pub fn sweep_all(&self, now: Time) -> usize {
        self.sweep(now, usize::MAX)
    }

    /// Drops every entry.
    pub fn flush(&self) {
        self.map.clear();
        self.affinity.clear();
        let mut wheel = self.wheel.lock().unwrap_or_else(|p| p.into_inner());
        self.take_scheduled(&mut wheel);
        wheel.clear();
        self.len.store(0, Relaxed);
    }
}
