//! The connection table: 64 shards, each an open-addressed array of slots
//! probed linearly, under its own read-write lock.
//!
//! A slot holds the key and the connection inline, 128 bytes on a cache-line
//! boundary: a lookup reads the two lines of one slot (rarely the next
//! slot's), and the hash alone says where they are. So a burst of packets is
//! prefetched in one pass with no lock taken ([`ConnMap::prefetch`]), and
//! each lookup then finds its slot in cache; a table with a separate control
//! array (hashbrown's) needs two dependent rounds of loads for the same.
//!
//! Shards are at most half full, so most keys sit in their home slot and a
//! miss ends at an empty slot a step or two later. Removal shifts the rest of
//! a probe run back (no tombstones), so a table that churns stays as fast as
//! a fresh one. A shard doubles when it would pass half full and shrinks when
//! a bulk removal leaves it under an eighth full.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{CanonKey, Conn};

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
/// Slots of an empty shard.
const MIN_SLOTS: usize = 16;

/// A key and its connection: two cache lines, starting on a line boundary.
#[repr(C, align(64))]
#[derive(Debug)]
struct Slot {
    key: CanonKey,
    conn: Conn,
}

// Two whole cache lines per slot, and `None` costs nothing (a niche of `Conn`).
const _: () = assert!(size_of::<Option<Slot>>() == 128);
// What a probe reads (the key, the state, the deadline, the alias link) is in
// the first line.
const _: () = {
    use std::mem::offset_of;
    let conn = offset_of!(Slot, conn);
    assert!(offset_of!(Slot, key) + size_of::<CanonKey>() <= conn);
    assert!(conn + offset_of!(Conn, state) < 64);
    assert!(conn + offset_of!(Conn, expires) + size_of::<crate::time::Time>() <= 64);
    assert!(conn + offset_of!(Conn, alias_of) + 8 <= 64);
};

#[derive(Debug)]
struct Shard {
    slots: Vec<Option<Slot>>,
    len: usize,
}

/// A shard, its lock, and where its slots are (for prefetching without the
/// lock), each shard on cache lines of its own so threads working in
/// different shards do not contend for a line.
#[repr(align(128))]
#[derive(Debug)]
struct Cell {
    shard: RwLock<Shard>,
    /// Address of `slots[0]` and `slots.len() - 1`, kept in step under the
    /// write lock; read unlocked, only as a prefetch hint.
    base: AtomicUsize,
    mask: AtomicUsize,
}

/// Sharded map of connections by canonical key.
#[derive(Debug)]
pub(super) struct ConnMap {
    hasher: foldhash::fast::RandomState,
    cells: Box<[Cell]>,
}

#[inline]
fn read(cell: &Cell) -> RwLockReadGuard<'_, Shard> {
    cell.shard.read().unwrap_or_else(|p| p.into_inner())
}

#[inline]
fn write(cell: &Cell) -> RwLockWriteGuard<'_, Shard> {
    cell.shard.write().unwrap_or_else(|p| p.into_inner())
}

fn empty_slots(n: usize) -> Vec<Option<Slot>> {
    std::iter::repeat_with(|| None).take(n).collect()
}

impl Shard {
    fn with_slots(n: usize) -> Shard {
        Shard {
            slots: empty_slots(n),
            len: 0,
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Where `key` is (`Ok`), or the empty slot ending its probe run (`Err`).
    #[inline]
    fn find(&self, hash: u64, key: &CanonKey) -> Result<usize, usize> {
        let mask = self.mask();
        let mut at = hash as usize & mask;
        loop {
            match &self.slots[at] {
                None => return Err(at),
                Some(s) if s.key == *key => return Ok(at),
                Some(_) => at = (at + 1) & mask,
            }
        }
    }

    /// Empties slot `at` and closes the gap: each later entry of the run
    /// whose home is not between the gap and itself moves back into it.
    fn take(&mut self, hasher: &impl BuildHasher, at: usize) -> Option<Slot> {
        let taken = self.slots[at].take()?;
        self.len -= 1;
        let mask = self.mask();
        let (mut gap, mut at) = (at, at);
        loop {
            at = (at + 1) & mask;
            let Some(s) = &self.slots[at] else {
                break;
            };
            let home = hasher.hash_one(s.key) as usize & mask;
            // Distances along the ring: the entry may fill the gap when its
            // home is no further on from the gap than the entry itself.
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(gap) & mask) {
                self.slots[gap] = self.slots[at].take();
                gap = at;
            }
        }
        Some(taken)
    }

    /// Puts an entry into the first empty slot of its run (the key must not
    /// be present).
    fn place(&mut self, hash: u64, slot: Slot) {
        let mask = self.mask();
        let mut at = hash as usize & mask;
        while self.slots[at].is_some() {
            at = (at + 1) & mask;
        }
        self.slots[at] = Some(slot);
        self.len += 1;
    }

    /// Moves every entry into `n` fresh slots.
    fn rebuild(&mut self, hasher: &impl BuildHasher, n: usize) {
        let old = std::mem::replace(&mut self.slots, empty_slots(n));
        self.len = 0;
        for slot in old.into_iter().flatten() {
            self.place(hasher.hash_one(slot.key), slot);
        }
    }

    /// Slots for `len` entries at most half full (a power of two).
    fn slots_for(len: usize) -> usize {
        (len * 2).next_power_of_two().max(MIN_SLOTS)
    }
}

impl Cell {
    fn new() -> Cell {
        let cell = Cell {
            shard: RwLock::new(Shard::with_slots(MIN_SLOTS)),
            base: AtomicUsize::new(0),
            mask: AtomicUsize::new(0),
        };
        cell.publish(&read(&cell));
        cell
    }

    /// Records where the shard's slots now are, for prefetching.
    fn publish(&self, shard: &Shard) {
        self.base.store(shard.slots.as_ptr() as usize, Relaxed);
        self.mask.store(shard.mask(), Relaxed);
    }
}

/// A connection, read-locked in its shard.
pub(super) struct Ref<'a> {
    shard: RwLockReadGuard<'a, Shard>,
    at: usize,
}

/// A connection, write-locked in its shard.
pub(super) struct RefMut<'a> {
    map: &'a ConnMap,
    shard: RwLockWriteGuard<'a, Shard>,
    at: usize,
}

impl RefMut<'_> {
    /// Removes the entry; returns its connection.
    pub(super) fn remove(mut self) -> Conn {
        match self.shard.take(&self.map.hasher, self.at) {
            Some(s) => s.conn,
            None => unreachable!("a held reference names an occupied slot"),
        }
    }
}

/// A key's place in the map, its shard write-locked.
pub(super) enum Entry<'a> {
    Occupied(RefMut<'a>),
    Vacant(Vacant<'a>),
}

/// Where a missing key would go.
pub(super) struct Vacant<'a> {
    map: &'a ConnMap,
    shard: RwLockWriteGuard<'a, Shard>,
    hash: u64,
    key: CanonKey,
}

#[inline]
fn slot(shard: &Shard, at: usize) -> &Slot {
    match &shard.slots[at] {
        Some(s) => s,
        None => unreachable!("a held reference names an occupied slot"),
    }
}

#[inline]
fn slot_mut(shard: &mut Shard, at: usize) -> &mut Slot {
    match &mut shard.slots[at] {
        Some(s) => s,
        None => unreachable!("a held reference names an occupied slot"),
    }
}

impl std::ops::Deref for Ref<'_> {
    type Target = Conn;
    #[inline]
    fn deref(&self) -> &Conn {
        &slot(&self.shard, self.at).conn
    }
}

impl std::ops::Deref for RefMut<'_> {
    type Target = Conn;
    #[inline]
    fn deref(&self) -> &Conn {
        &slot(&self.shard, self.at).conn
    }
}

impl std::ops::DerefMut for RefMut<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Conn {
        &mut slot_mut(&mut self.shard, self.at).conn
    }
}

impl Vacant<'_> {
    /// Inserts the connection, growing the shard first when it would pass
    /// half full.
    pub(super) fn insert(mut self, conn: Conn) {
        if (self.shard.len + 1) * 2 > self.shard.slots.len() {
            let n = self.shard.slots.len() * 2;
            self.shard.rebuild(&self.map.hasher, n);
            self.map.cell(self.hash).publish(&self.shard);
        }
        self.shard.place(
            self.hash,
            Slot {
                key: self.key,
                conn,
            },
        );
    }
}

impl ConnMap {
    pub(super) fn new() -> ConnMap {
        ConnMap {
            hasher: foldhash::fast::RandomState::default(),
            cells: (0..SHARDS).map(|_| Cell::new()).collect(),
        }
    }

    /// The key's hash. The zone is left out (keys equal but for it share a
    /// run), so a packet's slot can be prefetched as soon as it is parsed,
    /// before the pipeline has said which zone it is tracked in.
    #[inline]
    pub(super) fn hash(&self, key: &CanonKey) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    fn cell(&self, hash: u64) -> &Cell {
        &self.cells[(hash >> (64 - SHARD_BITS)) as usize]
    }

    /// Starts loading the slot a key of this hash lives in, and the first
    /// line of the next (where a collision puts it, and what a probe passing
    /// it reads). Takes no lock: the shard's address is read as a hint, and
    /// a shard resized meanwhile only wastes the hint.
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
        let cell = self.cell(hash);
        let mask = cell.mask.load(Relaxed);
        let base = cell.base.load(Relaxed);
        let slot = |at: usize| base + (at & mask) * size_of::<Option<Slot>>();
        let home = hash as usize;
        crate::prefetch::read(slot(home) as *const u8);
        crate::prefetch::read((slot(home) + 64) as *const u8);
        crate::prefetch::read(slot(home + 1) as *const u8);
    }

    #[inline]
    pub(super) fn get(&self, key: &CanonKey) -> Option<Ref<'_>> {
        let hash = self.hash(key);
        let shard = read(self.cell(hash));
        let at = shard.find(hash, key).ok()?;
        Some(Ref { shard, at })
    }

    #[inline]
    pub(super) fn get_mut(&self, key: &CanonKey) -> Option<RefMut<'_>> {
        let hash = self.hash(key);
        let shard = write(self.cell(hash));
        let at = shard.find(hash, key).ok()?;
        Some(RefMut {
            map: self,
            shard,
            at,
        })
    }

    pub(super) fn contains_key(&self, key: &CanonKey) -> bool {
        self.get(key).is_some()
    }

    #[inline]
    pub(super) fn entry(&self, key: CanonKey) -> Entry<'_> {
        let hash = self.hash(&key);
        let shard = write(self.cell(hash));
        match shard.find(hash, &key) {
            Ok(at) => Entry::Occupied(RefMut {
                map: self,
                shard,
                at,
            }),
            Err(_) => Entry::Vacant(Vacant {
                map: self,
                shard,
                hash,
                key,
            }),
        }
    }

    /// Inserts or replaces; returns the connection replaced.
    pub(super) fn insert(&self, key: CanonKey, conn: Conn) -> Option<Conn> {
        match self.entry(key) {
            Entry::Occupied(mut e) => Some(std::mem::replace(&mut *e, conn)),
            Entry::Vacant(v) => {
                v.insert(conn);
                None
            }
        }
    }

    pub(super) fn remove(&self, key: &CanonKey) -> Option<(CanonKey, Conn)> {
        self.remove_if(key, |_, _| true)
    }

    /// Removes the key's entry when `pick` says so.
    pub(super) fn remove_if(
        &self,
        key: &CanonKey,
        pick: impl FnOnce(&CanonKey, &Conn) -> bool,
    ) -> Option<(CanonKey, Conn)> {
        let hash = self.hash(key);
        let mut shard = write(self.cell(hash));
        let at = shard.find(hash, key).ok()?;
        let s = slot(&shard, at);
        if !pick(&s.key, &s.conn) {
            return None;
        }
        shard
            .take(&self.hasher, at)
            .map(|Slot { key, conn }| (key, conn))
    }

    /// Keeps the entries `keep` says to (it may change them), shard by shard;
    /// a shard left under an eighth full shrinks. Entries go one by one
    /// after the scan (each closing its gap), so a policy change that cuts a
    /// few connections out of a million costs a scan, not a rebuild.
    pub(super) fn retain(&self, mut keep: impl FnMut(&CanonKey, &mut Conn) -> bool) {
        let mut gone = Vec::new();
        for cell in self.cells.iter() {
            let mut shard = write(cell);
            gone.clear();
            for Slot { key, conn } in shard.slots.iter_mut().flatten() {
                if !keep(key, conn) {
                    gone.push(*key);
                }
            }
            for key in &gone {
                let hash = self.hash(key);
                if let Ok(at) = shard.find(hash, key) {
                    shard.take(&self.hasher, at);
                }
            }
            if !gone.is_empty() && shard.len * 8 < shard.slots.len() {
                let n = Shard::slots_for(shard.len).min(shard.slots.len());
                if n < shard.slots.len() {
                    shard.rebuild(&self.hasher, n);
                    cell.publish(&shard);
                }
            }
        }
    }

    /// Drops every entry and gives the memory back.
    pub(super) fn clear(&self) {
        for cell in self.cells.iter() {
            let mut shard = write(cell);
            *shard = Shard::with_slots(MIN_SLOTS);
            cell.publish(&shard);
        }
    }

    /// Calls `f` on every entry, one shard read-locked at a time.
    pub(super) fn for_each(&self, mut f: impl FnMut(&CanonKey, &Conn)) {
        for cell in self.cells.iter() {
            let shard = read(cell);
            for s in shard.slots.iter().flatten() {
                f(&s.key, &s.conn);
            }
        }
    }

    /// Entries in the map (every shard locked in turn: not for hot paths).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.cells.iter().map(|c| read(c).len).sum()
    }

    /// Slots allocated over all shards (for tests of growth and shrinking).
    #[cfg(test)]
    pub(super) fn slots(&self) -> usize {
        self.cells.iter().map(|c| read(c).slots.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn key(n: u16) -> CanonKey {
        CanonKey {
            zone: n % 2,
            proto: 17,
            a: ([10; 16], n / 2),
            b: ([20; 16], 53),
        }
    }

    /// A connection told apart by its packet count.
    fn conn(tag: u64) -> Conn {
        Conn {
            packets: [tag, 0],
            ..Conn::alias(key(0))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16, u64),
        Remove(u16),
        RemoveEven,
    }

    fn op() -> impl Strategy<Value = Op> {
        // 3,000 keys over 64 shards: runs of several slots, wrapping at the
        // ends, and removals from their middle.
        prop_oneof![
            6 => (0..3000u16, any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            4 => (0..3000u16).prop_map(Op::Remove),
            1 => Just(Op::RemoveEven),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every sequence of inserts and removals leaves the map holding
        /// exactly what a `HashMap` fed the same operations holds.
        #[test]
        fn the_map_agrees_with_a_hash_map(ops in proptest::collection::vec(op(), 1..6000)) {
            let map = ConnMap::new();
            let mut model: HashMap<u16, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let old = map.insert(key(k), conn(v)).map(|c| c.packets[0]);
                        prop_assert_eq!(old, model.insert(k, v));
                    }
                    Op::Remove(k) => {
                        let gone = map.remove(&key(k)).map(|(ck, c)| (ck, c.packets[0]));
                        prop_assert_eq!(gone, model.remove(&k).map(|v| (key(k), v)));
                    }
                    Op::RemoveEven => {
                        map.retain(|_, c| c.packets[0] % 2 == 1);
                        model.retain(|_, v| *v % 2 == 1);
                    }
                }
            }
            prop_assert_eq!(map.len(), model.len());
            for k in 0..3000 {
                prop_assert_eq!(map.get(&key(k)).map(|c| c.packets[0]), model.get(&k).copied());
            }
            let mut seen = 0;
            map.for_each(|ck, c| {
                seen += 1;
                assert_eq!(model.get(&(ck.a.1 * 2 + ck.zone)), Some(&c.packets[0]));
            });
            prop_assert_eq!(seen, model.len());
        }
    }

    #[test]
    fn shards_grow_past_half_full_and_shrink_when_emptied() {
        let map = ConnMap::new();
        let empty = map.slots();
        assert_eq!(empty, SHARDS * MIN_SLOTS);
        for k in 0..60_000 {
            map.insert(key(k), conn(u64::from(k)));
        }
        assert_eq!(map.len(), 60_000);
        assert!(map.slots() >= 120_000, "{} slots", map.slots());
        map.retain(|_, c| c.packets[0] < 100);
        assert_eq!(map.len(), 100);
        assert!(map.slots() < 60_000 / 8, "{} slots", map.slots());
        for k in 0..60_000 {
            assert_eq!(map.get(&key(k)).is_some(), k < 100);
        }
        map.clear();
        assert_eq!((map.len(), map.slots()), (0, empty));
    }

    /// Threads inserting, reading and removing their own keys while another
    /// keeps rebuilding every shard: nothing is lost, nothing appears twice.
    #[test]
    fn threads_sharing_the_map_see_their_own_writes_through_resizes() {
        let map = ConnMap::new();
        std::thread::scope(|s| {
            for t in 0..2u16 {
                let map = &map;
                s.spawn(move || {
                    for round in 0..3u64 {
                        for k in (t * 10_000)..(t * 10_000 + 10_000) {
                            assert!(map.insert(key(k), conn(round)).is_none());
                        }
                        for k in (t * 10_000)..(t * 10_000 + 10_000) {
                            assert_eq!(map.get(&key(k)).map(|c| c.packets[0]), Some(round));
                            assert!(map.remove(&key(k)).is_some());
                        }
                    }
                });
            }
            s.spawn(|| {
                // Its own keys in and out in bulk: every shard grows, then is
                // rebuilt and shrunk by `retain`, under the others' feet.
                for _ in 0..5 {
                    for k in 20_000..40_000 {
                        map.insert(key(k), conn(0));
                    }
                    map.retain(|k, _| k.a.1 < 10_000);
                }
            });
        });
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn an_entry_is_filled_once_and_removed_through_its_reference() {
        let map = ConnMap::new();
        match map.entry(key(7)) {
            Entry::Vacant(v) => v.insert(conn(1)),
            Entry::Occupied(_) => panic!("a new key is vacant"),
        }
        match map.entry(key(7)) {
            Entry::Occupied(mut e) => {
                e.mark = 9;
                assert_eq!(e.remove().mark, 9);
            }
            Entry::Vacant(_) => panic!("an inserted key is occupied"),
        }
        assert!(!map.contains_key(&key(7)));
        assert!(map.remove_if(&key(7), |_, _| true).is_none());
    }
}
