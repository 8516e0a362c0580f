//! The microflow cache: exact match on the key, per packet thread.
//!
//! Owns "have we translated this key before, against this table generation".
//! The key it is given is already masked to what a translation can depend on
//! (`cache_mask::CacheMasks`), so one entry serves every connection that
//! differs only in fields no flow looks at.
//! It is a fixed-size, 4-way set-associative array allocated once: lookups and
//! inserts never allocate, a full set evicts its least recently used way, and an
//! entry from an older generation is simply a miss. It is not shared, so it needs no
//! locks; it never decides anything itself (the pipeline does).

use std::hash::{BuildHasher, Hasher};

use crate::cache_mask::CacheMasks;
use crate::field::MatchKey;
use crate::flow::TableId;
use crate::pipeline::Xlate;

const WAYS: usize = 4;

/// What a cached translation is keyed by: the key (headers, registers,
/// conntrack state) under the tables' cache mask, and the table the pass
/// started at.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CacheKey {
    pub key: MatchKey,
    pub stage: TableId,
    /// 0: the key under its class's mask; n: under the cache's n-th narrow
    /// mask (what one translation looked at, see [`MicroflowCache::translate`]).
    pub narrow: u8,
}

#[derive(Debug, Default)]
struct Way {
    valid: bool,
    generation: u64,
    last_used: u64,
    hash: u64,
    key: CacheKey,
    xlate: Xlate,
}

/// Hit, miss and eviction counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Revalidated entries included.
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Hits on an entry of an older table generation found still right.
    pub revalidated: u64,
}

/// A per-thread microflow cache.
#[derive(Debug)]
pub struct MicroflowCache {
    ways: Box<[Way]>,
    /// Keyed with a per-process random seed: which set a key lands in cannot
    /// be predicted from outside, so a pod cannot craft keys that all fight
    /// over one set (hash flooding).
    hasher: foldhash::fast::FixedState,
    set_mask: usize,
    tick: u64,
    /// What translations of this generation looked at, where that was less
    /// than their class's mask: the second chance of a lookup.
    narrow: Vec<MatchKey>,
    narrow_generation: u64,
    pub stats: CacheStats,
}

/// Narrow masks a cache tries at most (there are few: one per path through
/// the tables).
const MAX_NARROW: usize = 8;

/// A seed nobody outside this process can know.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
}

impl MicroflowCache {
    /// A cache of at least `capacity` entries (rounded up to a power of two).
    pub fn new(capacity: usize) -> MicroflowCache {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        MicroflowCache {
            ways: (0..sets * WAYS).map(|_| Way::default()).collect(),
            hasher: foldhash::fast::FixedState::with_seed(random_seed()),
            set_mask: sets - 1,
            tick: 0,
            narrow: Vec::new(),
            narrow_generation: 0,
            stats: CacheStats::default(),
        }
    }

    /// The hash of `key` in this cache (what `get` and `insert` take).
    #[inline]
    pub fn hash(&self, key: &CacheKey) -> u64 {
        let mut h = self.hasher.build_hasher();
        for w in &key.key.0 {
            h.write_u64(*w);
        }
        h.write_u8(key.stage.0);
        h.write_u8(key.narrow);
        h.finish()
    }

    pub fn capacity(&self) -> usize {
        self.ways.len()
    }

    /// Entries valid for `generation`.
    pub fn len(&self, generation: u64) -> usize {
        self.ways
            .iter()
            .filter(|w| w.valid && w.generation == generation)
            .count()
    }

    fn set(&self, hash: u64) -> std::ops::Range<usize> {
        let s = (hash as usize & self.set_mask) * WAYS;
        s..s + WAYS
    }

    /// The cached translation of `key` for `generation`.
    #[inline]
    pub fn get(&mut self, key: &CacheKey, hash: u64, generation: u64) -> Option<&Xlate> {
        match self.find(key, hash, generation, |_, _| false) {
            Some(i) => {
                self.stats.hits += 1;
                Some(&self.ways[i].xlate)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// The translation of `key` for a pass starting at `stage`, under the
    /// tables of `generation` whose cache masks are `masks`:
    ///
    /// 1. the entry for the key under its class's mask (one of an older
    ///    generation where `revalidate` says it still holds);
    /// 2. else an entry under one of the narrow masks translations of this
    ///    generation recorded (what they looked at: a reply of an established
    ///    connection never reaches the tables that compare ports); copied to
    ///    the first kind, for the packets after it;
    /// 3. else what `miss` translates, with what it looked at: stored as the
    ///    first kind, and as the second when that was less.
    #[inline]
    pub fn translate(
        &mut self,
        key: &MatchKey,
        stage: TableId,
        masks: &CacheMasks,
        generation: u64,
        revalidate: impl FnOnce(u64, &CacheKey) -> bool,
        miss: impl FnOnce() -> (Xlate, MatchKey),
    ) -> &Xlate {
        if self.narrow_generation != generation {
            // Narrow masks come from the tables of their generation.
            self.narrow.clear();
            self.narrow_generation = generation;
        }
        let class = masks.of(key);
        let primary = CacheKey {
            key: key.masked(class),
            stage,
            narrow: 0,
        };
        let hash = self.hash(&primary);
        if let Some(i) = self.find(&primary, hash, generation, revalidate) {
            self.stats.hits += 1;
            return &self.ways[i].xlate;
        }
        for n in 0..self.narrow.len() {
            let narrow = CacheKey {
                key: key.masked(&self.narrow[n]),
                stage,
                narrow: n as u8 + 1,
            };
            let h = self.hash(&narrow);
            if let Some(i) = self.find(&narrow, h, generation, |_, _| false) {
                self.stats.hits += 1;
                let xlate = self.ways[i].xlate.clone();
                return self.insert(primary, hash, generation, xlate);
            }
        }
        self.stats.misses += 1;
        let (xlate, consulted) = miss();
        let narrow = consulted.masked(class);
        if narrow != *class {
            let n = match self.narrow.iter().position(|m| *m == narrow) {
                Some(n) => Some(n),
                None if self.narrow.len() < MAX_NARROW => {
                    self.narrow.push(narrow);
                    Some(self.narrow.len() - 1)
                }
                None => None,
            };
            if let Some(n) = n {
                let key = CacheKey {
                    key: key.masked(&narrow),
                    stage,
                    narrow: n as u8 + 1,
                };
                let h = self.hash(&key);
                self.insert(key, h, generation, xlate.clone());
            }
        }
        self.insert(primary, hash, generation, xlate)
    }

    /// The way holding `key` for `generation` (or revalidated for it), its
    /// use recorded.
    fn find(
        &mut self,
        key: &CacheKey,
        hash: u64,
        generation: u64,
        revalidate: impl FnOnce(u64, &CacheKey) -> bool,
    ) -> Option<usize> {
        self.tick += 1;
        let range = self.set(hash);
        let start = range.start;
        let i = start
            + self.ways[range]
                .iter()
                .position(|w| w.valid && w.hash == hash && w.key == *key)?;
        let at = self.ways[i].generation;
        if at != generation {
            if !revalidate(at, key) {
                return None;
            }
            self.ways[i].generation = generation;
            self.stats.revalidated += 1;
        }
        self.ways[i].last_used = self.tick;
        Some(i)
    }

    /// Stores a translation, evicting the least recently used way of a full set.
    pub fn insert(&mut self, key: CacheKey, hash: u64, generation: u64, xlate: Xlate) -> &Xlate {
        let range = self.set(hash);
        let tick = self.tick;
        let set = &mut self.ways[range];
        // The key's own way if it is there (stale), else a free one.
        let victim = set
            .iter()
            .position(|w| w.valid && w.hash == hash && w.key == key)
            .or_else(|| {
                set.iter()
                    .position(|w| !w.valid || w.generation != generation)
            })
            .unwrap_or_else(|| {
                self.stats.evictions += 1;
                (0..WAYS).min_by_key(|&i| set[i].last_used).unwrap_or(0)
            });
        let w = &mut set[victim];
        *w = Way {
            valid: true,
            generation,
            last_used: tick,
            hash,
            key,
            xlate,
        };
        &w.xlate
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        for w in self.ways.iter_mut() {
            w.valid = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::Field;

    fn key(n: u32) -> CacheKey {
        let mut k = MatchKey::default();
        k.set(Field::InPort, n.into());
        CacheKey {
            key: k,
            stage: TableId(0),
            narrow: 0,
        }
    }

    #[test]
    fn hit_miss_generation_and_eviction() {
        let mut c = MicroflowCache::new(4); // one set of four ways
        let k = key(1);
        let h = c.hash(&k);
        assert!(c.get(&k, h, 1).is_none());
        c.insert(k, h, 1, Xlate::default());
        assert!(c.get(&k, h, 1).is_some());
        assert!(c.get(&k, h, 2).is_none(), "new generation invalidates");
        for n in 10..15 {
            let k = key(n);
            let h = c.hash(&k);
            c.insert(k, h, 2, Xlate::default());
        }
        assert_eq!(c.stats.evictions, 1);
        assert_eq!(c.len(2), 4);
        assert_eq!(
            c.stats,
            CacheStats {
                hits: 1,
                misses: 2,
                evictions: 1,
                revalidated: 0,
            }
        );
    }
}

#[cfg(test)]
mod flooding {
    use super::*;
    use crate::field::Field;

    /// Hash flooding: with a seed an attacker can know (a constant in the
    /// source), keys that share a set can be computed offline and sent to
    /// thrash it. Every cache draws its own seed, so the sets keys land in
    /// differ from one cache (one process) to the next.
    #[test]
    fn where_a_key_lands_is_not_predictable() {
        let keys: Vec<CacheKey> = (0..64u32)
            .map(|n| {
                let mut k = MatchKey::default();
                k.set(Field::TpDst, n.into());
                CacheKey {
                    key: k,
                    stage: TableId(0),
                    narrow: 0,
                }
            })
            .collect();
        let (a, b) = (MicroflowCache::new(1024), MicroflowCache::new(1024));
        let sets = |c: &MicroflowCache| -> Vec<u64> {
            keys.iter().map(|k| c.hash(k) & c.set_mask as u64).collect()
        };
        assert_ne!(sets(&a), sets(&b), "two caches place the same keys alike");
    }
}
