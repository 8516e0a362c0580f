//! Client affinity: which bucket of a select group a client took last, for
//! as long as the group's affinity lasts since that client's last new
//! connection (Kubernetes `sessionAffinity: ClientIP` with its
//! `timeoutSeconds`). Kept beside connections because it is connection
//! state of the same kind: shared by every packet thread, read by traces,
//! swept with the connections, bounded by the same `max_entries`.

use std::sync::atomic::Ordering::Relaxed;

use super::Conntrack;
use crate::time::Time;

/// (group, client address) -> (bucket id, expiry in ns).
pub(super) type AffinityMap =
    dashmap::DashMap<(u32, [u8; 16]), (u32, u64), foldhash::fast::RandomState>;

impl Conntrack {
    /// The bucket `client` took last in `group`, while its affinity lasts.
    pub fn affinity(&self, now: Time, group: u32, client: [u8; 16]) -> Option<u32> {
        self.affinity
            .get(&(group, client))
            .filter(|e| e.1 > now.0)
            .map(|e| e.0)
    }

    /// `client` took `bucket` of `group` now: it sticks for `secs` from now.
    /// Not remembered when the table is full (the group's hash then decides).
    pub fn remember_affinity(
        &self,
        now: Time,
        group: u32,
        client: [u8; 16],
        bucket: u32,
        secs: u32,
    ) {
        let expires = now.0 + u64::from(secs) * 1_000_000_000;
        if let Some(mut e) = self.affinity.get_mut(&(group, client)) {
            *e = (bucket, expires);
            return;
        }
        if self.affinity.len() >= self.config.max_entries {
            self.stats.affinity_full.fetch_add(1, Relaxed);
            return;
        }
        self.affinity.insert((group, client), (bucket, expires));
    }

    /// Forgets affinities past their time.
    pub(super) fn expire_affinity(&self, now: Time) {
        if !self.affinity.is_empty() {
            self.affinity.retain(|_, e| e.1 > now.0);
        }
    }

    /// Remembered affinities (live and not yet swept).
    pub fn affinity_len(&self) -> usize {
        self.affinity.len()
    }
}
