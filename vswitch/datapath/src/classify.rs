//! One flow table's classifier: tuple space search with conjunctive match.
//!
//! Owns "which flow of this table does this key hit". Flows are grouped by mask into
//! subtables (one hash table each) searched in order of their highest priority with
//! early exit. It stores flow ids and priorities, not flows, and does no counting:
//! the table set (`table`) owns the entries, the worker owns statistics.
//!
//! Lookup semantics, which the linear-scan reference in the tests restates:
//! 1. `H` is the best matching ordinary flow: highest priority, then lowest id.
//! 2. Conjunctive flows (`conjunction(id,k/n)` actions) matching the key with a
//!    priority above `H`'s are grouped by priority, highest first. At each level,
//!    conjunction `id` is complete when every clause `1..=n` has a matching flow. If
//!    any is complete, the result is the best flow matching `conj_id=<a complete id>`
//!    (over all complete ids); if there is none, the search goes on to the next level.
//! 3. Otherwise the result is `H` (or no match).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use arrayvec::ArrayVec;
use hashbrown::HashTable;
use smallvec::SmallVec;

use crate::field::{Field, Match, MatchKey, NWORDS};

/// Dense index of a flow inside a table set; stable while the flow exists.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct FlowId(pub u32);

/// One clause a conjunctive flow feeds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Clause {
    pub id: u32,
    pub k: u8,
    pub n: u8,
}

#[derive(Clone, Debug)]
struct Rule {
    priority: u16,
    id: FlowId,
    clauses: SmallVec<[Clause; 1]>,
}

impl Rule {
    /// Ordering key: higher priority first, then lower id.
    fn rank(&self) -> (u16, std::cmp::Reverse<FlowId>) {
        (self.priority, std::cmp::Reverse(self.id))
    }
}

#[derive(Clone, Debug)]
struct Bucket {
    value: MatchKey,
    /// Sorted best first.
    rules: SmallVec<[Rule; 1]>,
}

#[derive(Clone, Debug)]
struct Subtable {
    max_priority: u16,
    /// The mask's non-zero words as (index, mask), packed: only those are hashed
    /// and compared, and a lookup reads nothing else of the subtable.
    words: ArrayVec<(u8, u64), NWORDS>,
    buckets: HashTable<Bucket>,
    mask: MatchKey,
    priorities: BTreeMap<u16, u32>,
}

/// Fixed seed: lookups must hash identically in every snapshot copy.
#[inline]
fn hash_words(key: &MatchKey, words: &[(u8, u64)]) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x9e37_79b9_7f4a_7c15).build_hasher();
    for &(w, m) in words {
        h.write_u64(key.0[w as usize] & m);
    }
    h.finish()
}

impl Subtable {
    fn new(mask: MatchKey) -> Subtable {
        let words = (0..NWORDS as u8)
            .filter(|&w| mask.0[w as usize] != 0)
            .map(|w| (w, mask.0[w as usize]))
            .collect();
        Subtable {
            mask,
            words,
            max_priority: 0,
            priorities: BTreeMap::new(),
            buckets: HashTable::new(),
        }
    }

    #[inline]
    fn find(&self, key: &MatchKey) -> Option<&Bucket> {
        let hash = hash_words(key, &self.words);
        self.buckets.find(hash, |b| {
            self.words
                .iter()
                .all(|&(w, m)| key.0[w as usize] & m == b.value.0[w as usize])
        })
    }
}

/// The classifier of one table.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    /// Sorted by `max_priority`, highest first.
    subtables: Vec<Subtable>,
    /// Flows matching `conj_id=X`, by X, best first.
    by_conj_id: hashbrown::HashMap<u32, SmallVec<[(Rule, Match); 1]>, foldhash::fast::FixedState>,
    len: usize,
}

/// Result of a lookup.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Hit {
    pub flow: FlowId,
    /// The conjunction that led to `flow`, when it matched on `conj_id`.
    pub conj_id: Option<u32>,
}

impl Classifier {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of distinct masks (subtables).
    pub fn n_masks(&self) -> usize {
        self.subtables.len()
    }

    /// Adds a flow. The caller guarantees `id` is not already present.
    pub fn insert(&mut self, id: FlowId, priority: u16, matcher: &Match, clauses: &[Clause]) {
        self.len += 1;
        let rule = Rule {
            priority,
            id,
            clauses: clauses.iter().copied().collect(),
        };
        if matcher.has(Field::ConjId) {
            let conj = matcher.get(Field::ConjId).0 as u32;
            let list = self.by_conj_id.entry(conj).or_default();
            let at = list.partition_point(|(r, _)| r.rank() > rule.rank());
            list.insert(at, (rule, *matcher));
            return;
        }
        let mask = *matcher.mask();
        let pos = match self.subtables.iter().position(|s| s.mask == mask) {
            Some(p) => p,
            None => {
                self.subtables.push(Subtable::new(mask));
                self.subtables.len() - 1
            }
        };
        let st = &mut self.subtables[pos];
        *st.priorities.entry(priority).or_default() += 1;
        let value = *matcher.value();
        let hash = hash_words(&value, &st.words);
        let words = &st.words;
        let entry = st
            .buckets
            .entry(hash, |b| b.value == value, |b| hash_words(&b.value, words));
        let mut bucket = entry.or_insert_with(|| Bucket {
            value,
            rules: SmallVec::new(),
        });
        let rules = &mut bucket.get_mut().rules;
        let at = rules.partition_point(|r| r.rank() > rule.rank());
        rules.insert(at, rule);
        self.resort(pos);
    }

    /// Removes a flow; returns whether it was present.
    pub fn remove(&mut self, id: FlowId, priority: u16, matcher: &Match) -> bool {
        if matcher.has(Field::ConjId) {
            let conj = matcher.get(Field::ConjId).0 as u32;
            let Some(list) = self.by_conj_id.get_mut(&conj) else {
                return false;
            };
            let before = list.len();
            list.retain(|(r, _)| r.id != id);
            let removed = list.len() != before;
            if list.is_empty() {
                self.by_conj_id.remove(&conj);
            }
            self.len -= usize::from(removed);
            return removed;
        }
        let mask = *matcher.mask();
        let Some(pos) = self.subtables.iter().position(|s| s.mask == mask) else {
            return false;
        };
        let st = &mut self.subtables[pos];
        let value = *matcher.value();
        let hash = hash_words(&value, &st.words);
        let Ok(mut entry) = st.buckets.find_entry(hash, |b| b.value == value) else {
            return false;
        };
        let rules = &mut entry.get_mut().rules;
        let Some(i) = rules.iter().position(|r| r.id == id) else {
            return false;
        };
        rules.remove(i);
        if rules.is_empty() {
            entry.remove();
        }
        if let Some(c) = st.priorities.get_mut(&priority) {
            *c -= 1;
            if *c == 0 {
                st.priorities.remove(&priority);
            }
        }
        self.len -= 1;
        if st.priorities.is_empty() {
            self.subtables.remove(pos);
        } else {
            self.resort(pos);
        }
        true
    }

    /// Restores the subtable order after subtable `pos` changed its priorities.
    fn resort(&mut self, pos: usize) {
        let st = &mut self.subtables[pos];
        st.max_priority = st.priorities.keys().next_back().copied().unwrap_or(0);
        self.subtables
            .sort_by_key(|s| std::cmp::Reverse(s.max_priority));
    }

    /// Finds the flow `key` hits (see the module docs for the semantics).
    /// `key`'s `conj_id` is ignored.
    #[inline]
    pub fn lookup(&self, key: &MatchKey) -> Option<Hit> {
        let mut hard: Option<&Rule> = None;
        let mut soft: SmallVec<[&Rule; 16]> = SmallVec::new();
        for st in &self.subtables {
            if hard.is_some_and(|h| st.max_priority < h.priority) {
                break;
            }
            let Some(bucket) = st.find(key) else { continue };
            for r in &bucket.rules {
                if hard.is_some_and(|h| r.rank() <= h.rank()) {
                    break;
                }
                if r.clauses.is_empty() {
                    hard = Some(r);
                    break;
                }
                soft.push(r);
            }
        }
        if let Some(h) = hard {
            soft.retain(|r| r.priority > h.priority);
        }
        if !soft.is_empty()
            && let Some(hit) = self.resolve_conjunctions(key, &mut soft)
        {
            return Some(hit);
        }
        hard.map(|r| Hit {
            flow: r.id,
            conj_id: None,
        })
    }

    fn resolve_conjunctions(&self, key: &MatchKey, soft: &mut [&Rule]) -> Option<Hit> {
        soft.sort_unstable_by_key(|r| std::cmp::Reverse(r.priority));
        let mut level = 0;
        while level < soft.len() {
            let p = soft[level].priority;
            let end = level + soft[level..].iter().take_while(|r| r.priority == p).count();
            // (id, n, clauses seen as a bitmask)
            let mut seen: SmallVec<[(u32, u8, u64); 8]> = SmallVec::new();
            for r in &soft[level..end] {
                for c in &r.clauses {
                    let bit = 1u64 << (c.k - 1);
                    match seen.iter_mut().find(|(id, n, _)| *id == c.id && *n == c.n) {
                        Some((_, _, mask)) => *mask |= bit,
                        None => seen.push((c.id, c.n, bit)),
                    }
                }
            }
            let mut best: Option<(&Rule, u32)> = None;
            for &(id, n, mask) in &seen {
                let full = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                if mask != full {
                    continue;
                }
                if let Some(r) = self.best_conj_flow(key, id)
                    && best.is_none_or(|(b, _)| r.rank() > b.rank())
                {
                    best = Some((r, id));
                }
            }
            if let Some((r, id)) = best {
                return Some(Hit {
                    flow: r.id,
                    conj_id: Some(id),
                });
            }
            level = end;
        }
        None
    }

    fn best_conj_flow(&self, key: &MatchKey, conj: u32) -> Option<&Rule> {
        let list = self.by_conj_id.get(&conj)?;
        let mut k = *key;
        k.set(Field::ConjId, u128::from(conj));
        list.iter().find(|(_, m)| m.matches(&k)).map(|(r, _)| r)
    }
}

#[cfg(test)]
pub(crate) mod reference {
    //! The lookup semantics restated as a linear scan, for property tests.
    use super::*;

    pub struct RefFlow {
        pub id: FlowId,
        pub priority: u16,
        pub matcher: Match,
        pub clauses: Vec<Clause>,
    }

    pub fn lookup(flows: &[RefFlow], key: &MatchKey) -> Option<Hit> {
        let mut k = *key;
        k.set(Field::ConjId, 0);
        let rank = |f: &RefFlow| (f.priority, std::cmp::Reverse(f.id));
        let matching: Vec<&RefFlow> = flows.iter().filter(|f| f.matcher.matches(&k)).collect();
        let hard = matching
            .iter()
            .filter(|f| f.clauses.is_empty())
            .max_by_key(|f| rank(f));
        let floor = hard.map(|h| i32::from(h.priority)).unwrap_or(-1);
        let mut levels: Vec<u16> = matching
            .iter()
            .filter(|f| !f.clauses.is_empty() && i32::from(f.priority) > floor)
            .map(|f| f.priority)
            .collect();
        levels.sort_unstable();
        levels.dedup();
        for &p in levels.iter().rev() {
            let at: Vec<&&RefFlow> = matching
                .iter()
                .filter(|f| f.priority == p && !f.clauses.is_empty())
                .collect();
            let mut best: Option<(&RefFlow, u32)> = None;
            let ids: std::collections::BTreeSet<(u32, u8)> = at
                .iter()
                .flat_map(|f| f.clauses.iter().map(|c| (c.id, c.n)))
                .collect();
            for (id, n) in ids {
                let complete = (1..=n).all(|k| {
                    at.iter()
                        .any(|f| f.clauses.iter().any(|c| c.id == id && c.n == n && c.k == k))
                });
                if !complete {
                    continue;
                }
                let mut kc = *key;
                kc.set(Field::ConjId, u128::from(id));
                let cand = flows
                    .iter()
                    .filter(|f| f.matcher.has(Field::ConjId) && f.matcher.matches(&kc))
                    .max_by_key(|f| rank(f));
                if let Some(c) = cand
                    && best.is_none_or(|(b, _)| rank(c) > rank(b))
                {
                    best = Some((c, id));
                }
            }
            if let Some((f, id)) = best {
                return Some(Hit {
                    flow: f.id,
                    conj_id: Some(id),
                });
            }
        }
        hard.map(|f| Hit {
            flow: f.id,
            conj_id: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::reference::{RefFlow, lookup as ref_lookup};
    use super::*;
    use proptest::prelude::*;

    fn key(src: u8, dst: u8, port: u16) -> MatchKey {
        let mut k = MatchKey::default();
        k.set(Field::NwSrc, u128::from(src));
        k.set(Field::NwDst, u128::from(dst));
        k.set(Field::TpDst, u128::from(port));
        k
    }

    #[test]
    fn priority_and_early_exit() {
        let mut c = Classifier::default();
        c.insert(FlowId(0), 10, &Match::any(), &[]);
        c.insert(FlowId(1), 100, &Match::any().with(Field::TpDst, 80), &[]);
        c.insert(
            FlowId(2),
            50,
            &Match::any().with_masked(Field::NwSrc, 0, 0xf0),
            &[],
        );
        assert_eq!(c.lookup(&key(1, 1, 80)).unwrap().flow, FlowId(1));
        assert_eq!(c.lookup(&key(1, 1, 81)).unwrap().flow, FlowId(2));
        assert_eq!(c.lookup(&key(0x11, 1, 81)).unwrap().flow, FlowId(0));
        assert!(c.remove(FlowId(0), 10, &Match::any()));
        assert_eq!(c.lookup(&key(0x11, 1, 81)), None);
        assert_eq!(c.n_masks(), 2);
    }

    #[test]
    fn conjunction_sum_not_product() {
        // src in {1,2} and dst in {3,4} and port 80 -> conj 7.
        let mut c = Classifier::default();
        let cl = |k| [Clause { id: 7, k, n: 3 }];
        c.insert(FlowId(0), 100, &Match::any().with(Field::NwSrc, 1), &cl(1));
        c.insert(FlowId(1), 100, &Match::any().with(Field::NwSrc, 2), &cl(1));
        c.insert(FlowId(2), 100, &Match::any().with(Field::NwDst, 3), &cl(2));
        c.insert(FlowId(3), 100, &Match::any().with(Field::NwDst, 4), &cl(2));
        c.insert(FlowId(4), 100, &Match::any().with(Field::TpDst, 80), &cl(3));
        c.insert(FlowId(5), 100, &Match::any().with(Field::ConjId, 7), &[]);
        c.insert(FlowId(6), 1, &Match::any(), &[]);
        let hit = c.lookup(&key(2, 4, 80)).unwrap();
        assert_eq!(
            hit,
            Hit {
                flow: FlowId(5),
                conj_id: Some(7)
            }
        );
        assert_eq!(c.lookup(&key(2, 5, 80)).unwrap().flow, FlowId(6));
        assert_eq!(c.lookup(&key(1, 3, 81)).unwrap().flow, FlowId(6));
    }

    fn arb_match() -> impl Strategy<Value = Match> {
        // Small value spaces so that random keys actually hit flows.
        (
            prop::option::of((0u8..4, prop::sample::select(vec![0xffu8, 0xfe, 0xfc]))),
            prop::option::of(0u8..4),
            prop::option::of((0u16..4, prop::sample::select(vec![0xffffu16, 0xfffe]))),
        )
            .prop_map(|(src, dst, port)| {
                let mut m = Match::any();
                if let Some((v, mask)) = src {
                    m.set_masked(Field::NwSrc, v.into(), mask.into());
                }
                if let Some(v) = dst {
                    m.set(Field::NwDst, v.into());
                }
                if let Some((v, mask)) = port {
                    m.set_masked(Field::TpDst, v.into(), mask.into());
                }
                m
            })
    }

    #[derive(Debug, Clone)]
    enum Kind {
        Hard,
        Soft(u32, u8, u8),
        ConjTarget(u32),
    }

    fn arb_flow() -> impl Strategy<Value = (u16, Match, Kind)> {
        let kind = prop_oneof![
            3 => Just(Kind::Hard),
            3 => (1u32..4, 2u8..4).prop_flat_map(|(id, n)| (Just(id), 1..=n, Just(n)))
                .prop_map(|(id, k, n)| Kind::Soft(id, k, n)),
            1 => (1u32..4).prop_map(Kind::ConjTarget),
        ];
        (
            prop::sample::select(vec![1u16, 5, 10, 10, 20]),
            arb_match(),
            kind,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn classifier_equals_linear_scan(
            flows in prop::collection::vec(arb_flow(), 0..40),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            keys in prop::collection::vec((0u8..5, 0u8..5, 0u16..5), 1..30),
        ) {
            let mut c = Classifier::default();
            let mut reference = Vec::new();
            for (i, (prio, m, kind)) in flows.into_iter().enumerate() {
                let id = FlowId(i as u32);
                let (m, clauses) = match kind {
                    Kind::Hard => (m, vec![]),
                    Kind::Soft(cid, k, n) => (m, vec![Clause { id: cid, k, n }]),
                    Kind::ConjTarget(cid) => (m.with(Field::ConjId, cid.into()), vec![]),
                };
                c.insert(id, prio, &m, &clauses);
                reference.push(RefFlow { id, priority: prio, matcher: m, clauses });
            }
            for r in removals {
                if reference.is_empty() { break; }
                let f = reference.remove(r.index(reference.len()));
                prop_assert!(c.remove(f.id, f.priority, &f.matcher));
            }
            prop_assert_eq!(c.len(), reference.len());
            for (s, d, p) in keys {
                let k = key(s, d, p);
                prop_assert_eq!(c.lookup(&k), ref_lookup(&reference, &k), "key {:?}", (s, d, p));
            }
        }
    }
}
