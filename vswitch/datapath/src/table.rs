//! The set of flow tables: storage, identity, and immutable snapshots.
//!
//! Owns the flows themselves. The control plane edits a [`FlowTables`] (add, modify,
//! delete, replace-all as one diff) and publishes it as an immutable [`Snapshot`];
//! packet threads only ever read snapshots. Each flow keeps a [`FlowTotals`] that
//! survives republication while the flow exists, so counters are not reset by
//! unrelated policy changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::cache_mask::CacheMasks;
use crate::classify::{Classifier, Clause, FlowId, Hit};
use crate::field::{Field, MatchKey};
use crate::flow::{Action, FlowEntry, FlowError, FlowIdentity, TableId};
use crate::group::Group;
use crate::revalidate::{Journal, Step};
use crate::time::Time;

/// Number of tables (0..=254).
pub const N_TABLES: usize = 255;

/// Counters of one flow that outlive snapshots: what packet threads have folded in.
/// Live per-thread counts are added on read (see `stats`).
#[derive(Debug, Default)]
pub struct FlowTotals {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Nanoseconds ([`Time`]) of the last hit, 0 if never.
    pub last_hit: AtomicU64,
    /// When the flow was installed.
    pub created: Time,
}

impl FlowTotals {
    pub(crate) fn add(&self, packets: u64, bytes: u64, last_hit: u64) {
        if packets == 0 {
            return;
        }
        self.packets.fetch_add(packets, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        self.last_hit.fetch_max(last_hit, Relaxed);
    }
}

/// An installed flow.
#[derive(Debug, Clone)]
pub struct Installed {
    pub entry: Arc<FlowEntry>,
    pub totals: Arc<FlowTotals>,
}

/// What a [`FlowTables::apply`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: usize,
    pub modified: usize,
    pub deleted: usize,
}

/// The mutable table set the control plane edits.
#[derive(Debug, Clone)]
pub struct FlowTables {
    classifiers: Vec<Classifier>,
    flows: Vec<Option<Installed>>,
    free: Vec<u32>,
    by_identity: HashMap<FlowIdentity, FlowId>,
    groups: HashMap<u32, Arc<Group>>,
    /// What edits changed since the tables were last published.
    journal: Journal,
    /// The generation these tables were published as (clones keep it;
    /// fresh tables have none): the journal covers the edits since.
    published_as: Option<u64>,
}

impl Default for FlowTables {
    fn default() -> Self {
        FlowTables {
            classifiers: vec![Classifier::default(); N_TABLES],
            flows: Vec::new(),
            free: Vec::new(),
            by_identity: HashMap::new(),
            groups: HashMap::new(),
            journal: Journal::default(),
            published_as: None,
        }
    }
}

fn clauses(entry: &FlowEntry) -> smallvec::SmallVec<[Clause; 1]> {
    entry
        .conjunctions()
        .map(|(id, k, n)| Clause { id, k, n })
        .collect()
}

impl FlowTables {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a select group (flows naming it see the new buckets
    /// in the same generation).
    pub fn add_group(&mut self, group: Group) -> Result<(), FlowError> {
        group.validate()?;
        if self.groups.get(&group.id).is_none_or(|g| **g != group) {
            self.journal.everything();
        }
        self.groups.insert(group.id, Arc::new(group));
        Ok(())
    }

    /// Removes a group; flows still naming it drop what reaches them.
    pub fn remove_group(&mut self, id: u32) -> bool {
        let removed = self.groups.remove(&id).is_some();
        if removed {
            self.journal.everything();
        }
        removed
    }

    pub fn group(&self, id: u32) -> Option<&Group> {
        self.groups.get(&id).map(|g| &**g)
    }

    /// Every group, by id.
    pub fn groups(&self) -> Vec<&Group> {
        let mut out: Vec<&Group> = self.groups.values().map(|g| &**g).collect();
        out.sort_by_key(|g| g.id);
        out
    }

    /// What the microflow cache keys these tables' translations by.
    pub fn cache_masks(&self) -> CacheMasks {
        CacheMasks::build(
            self.iter().map(|(_, i)| &*i.entry),
            self.groups.values().map(|g| &**g),
        )
    }

    /// Number of flows in all tables.
    pub fn len(&self) -> usize {
        self.by_identity.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_identity.is_empty()
    }

    /// Adds a flow, or replaces the actions and cookie of the flow with the same
    /// table, priority and match (keeping its counters, like `ovs-ofctl mod-flows`).
    ///
    /// Fails when the flow does not pass [`FlowEntry::validate`]; nothing changes then.
    pub fn add(&mut self, entry: FlowEntry, now: Time) -> Result<FlowId, FlowError> {
        entry.validate()?;
        for a in &entry.actions {
            if let Action::Group(g) = a
                && !self.groups.contains_key(g)
            {
                return Err(FlowError::UnknownGroup(*g));
            }
        }
        let identity = entry.identity();
        if let Some(&id) = self.by_identity.get(&identity) {
            let slot = self.flows[id.0 as usize]
                .as_mut()
                .expect("indexed flow exists");
            if *slot.entry != entry {
                self.journal.modified(&slot.entry, &entry);
                let table = &mut self.classifiers[usize::from(entry.table.0)];
                let old_clauses = clauses(&slot.entry);
                let new_clauses = clauses(&entry);
                if old_clauses != new_clauses {
                    table.remove(id, entry.priority, &entry.matcher);
                    table.insert(id, entry.priority, &entry.matcher, &new_clauses);
                }
                slot.entry = Arc::new(entry);
            }
            return Ok(id);
        }
        let id = match self.free.pop() {
            Some(i) => FlowId(i),
            None => {
                self.flows.push(None);
                FlowId((self.flows.len() - 1) as u32)
            }
        };
        self.journal.flow(&entry);
        self.classifiers[usize::from(entry.table.0)].insert(
            id,
            entry.priority,
            &entry.matcher,
            &clauses(&entry),
        );
        self.flows[id.0 as usize] = Some(Installed {
            entry: Arc::new(entry),
            totals: Arc::new(FlowTotals {
                created: now,
                ..FlowTotals::default()
            }),
        });
        self.by_identity.insert(identity, id);
        Ok(id)
    }

    /// Removes the flow with this identity; returns whether it existed.
    pub fn remove(&mut self, identity: &FlowIdentity) -> bool {
        let Some(id) = self.by_identity.remove(identity) else {
            return false;
        };
        if let Some(gone) = &self.flows[id.0 as usize] {
            self.journal.flow(&gone.entry);
        }
        self.classifiers[usize::from(identity.table.0)].remove(
            id,
            identity.priority,
            &identity.matcher,
        );
        self.flows[id.0 as usize] = None;
        self.free.push(id.0);
        true
    }

    /// Removes every flow for which `pred` is true; returns how many.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&FlowEntry) -> bool) -> usize {
        let doomed: Vec<FlowIdentity> = self
            .iter()
            .filter(|(_, f)| pred(&f.entry))
            .map(|(_, f)| f.entry.identity())
            .collect();
        doomed.iter().filter(|i| self.remove(i)).count()
    }

    /// Makes the tables hold exactly `wanted` among the flows `owned` selects,
    /// leaving other flows alone: a whole policy recompile becomes a minimal diff,
    /// and unchanged flows keep their counters.
    ///
    /// Fails, changing nothing, when any wanted flow is invalid.
    pub fn apply(
        &mut self,
        wanted: impl IntoIterator<Item = FlowEntry>,
        owned: impl Fn(&FlowEntry) -> bool,
        now: Time,
    ) -> Result<ApplyStats, FlowError> {
        let wanted: Vec<FlowEntry> = wanted.into_iter().collect();
        for f in &wanted {
            f.validate()?;
        }
        let keep: std::collections::HashSet<FlowIdentity> =
            wanted.iter().map(FlowEntry::identity).collect();
        let mut stats = ApplyStats {
            deleted: self.remove_where(|f| owned(f) && !keep.contains(&f.identity())),
            ..ApplyStats::default()
        };
        for f in wanted {
            match self.by_identity.get(&f.identity()) {
                Some(id) => {
                    let same = self.flows[id.0 as usize]
                        .as_ref()
                        .is_some_and(|i| *i.entry == f);
                    if !same {
                        stats.modified += 1;
                        self.add(f, now)?;
                    }
                }
                None => {
                    stats.added += 1;
                    self.add(f, now)?;
                }
            }
        }
        Ok(stats)
    }

    /// Every installed flow with its id, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &Installed)> {
        self.flows
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (FlowId(i as u32), f)))
    }

    pub fn get(&self, id: FlowId) -> Option<&Installed> {
        self.flows.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub fn find(&self, identity: &FlowIdentity) -> Option<FlowId> {
        self.by_identity.get(identity).copied()
    }

    /// The classifier of table `t`.
    pub fn classifier(&self, t: TableId) -> &Classifier {
        &self.classifiers[usize::from(t.0)]
    }

    /// Looks `key` up in table `t`.
    #[inline]
    pub fn lookup(&self, t: TableId, key: &MatchKey) -> Option<(Hit, &Installed)> {
        let hit = self.classifiers[usize::from(t.0)].lookup(key)?;
        let installed = self.flows[hit.flow.0 as usize].as_ref()?;
        Some((hit, installed))
    }

    /// Upper bound of flow ids, for sizing per-flow arrays.
    pub fn id_bound(&self) -> usize {
        self.flows.len()
    }

    /// Every conjunctive flow of `table` that `key` matches and that feeds
    /// conjunction `conj_id`: the clauses that made a conjunctive match (for trace).
    pub fn conjunction_members(
        &self,
        table: TableId,
        conj_id: u32,
        key: &MatchKey,
    ) -> Vec<(FlowId, &Installed)> {
        let mut k = *key;
        k.set(Field::ConjId, 0);
        let mut out: Vec<_> = self
            .iter()
            .filter(|(_, f)| {
                f.entry.table == table
                    && f.entry.conjunctions().any(|(id, _, _)| id == conj_id)
                    && f.entry.matcher.matches(&k)
            })
            .collect();
        out.sort_by_key(|(_, f)| f.entry.conjunctions().find(|c| c.0 == conj_id).map(|c| c.1));
        out
    }
}

/// An immutable, published version of the tables.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub tables: FlowTables,
    /// When it was published.
    pub published: Time,
    /// What the microflow cache keys `tables`' translations by.
    pub cache_masks: CacheMasks,
    /// What the last publishes changed, oldest first.
    history: Arc<[Arc<Step>]>,
}

/// How many publishes back a cached translation can be revalidated.
const HISTORY: usize = 16;

impl Snapshot {
    /// The first snapshot: nothing to revalidate from.
    pub fn new(generation: u64, tables: FlowTables, published: Time) -> Snapshot {
        let mut tables = tables;
        tables.journal = Journal::default();
        tables.published_as = Some(generation);
        Snapshot {
            generation,
            cache_masks: tables.cache_masks(),
            tables,
            published,
            history: Arc::from([]),
        }
    }

    /// The snapshot after `prev`, `tables` edited from `prev`'s: it records
    /// what the edits changed, so translations cached under `prev` (or a
    /// few snapshots before) can be checked instead of dropped.
    pub fn next(prev: &Snapshot, tables: FlowTables, published: Time) -> Snapshot {
        let mut tables = tables;
        let mut journal = std::mem::take(&mut tables.journal);
        if tables.published_as != Some(prev.generation) {
            // Not `prev`'s tables edited (fresh ones, or an older
            // snapshot's): the journal does not say what changed.
            journal.everything();
        }
        let generation = prev.generation + 1;
        tables.published_as = Some(generation);
        let cache_masks = tables.cache_masks();
        // Entries keyed under other masks cannot be checked: none holds.
        let written = cache_masks.same_keys(&prev.cache_masks).then(|| {
            let mut written = cache_masks.written;
            for (w, p) in written.0.iter_mut().zip(prev.cache_masks.written.0.iter()) {
                *w |= p;
            }
            written
        });
        // The clauses of changed conjunctions, before and after.
        let flows = prev.tables.iter().chain(tables.iter());
        let step = Step::new(generation, journal, flows.map(|(_, i)| &*i.entry), written);
        let keep = prev.history.len().min(HISTORY - 1);
        let history = prev.history[prev.history.len() - keep..]
            .iter()
            .map(Arc::clone)
            .chain(std::iter::once(Arc::new(step)))
            .collect();
        Snapshot {
            generation,
            cache_masks,
            tables,
            published,
            history,
        }
    }

    /// Whether a translation of `key` (a cache key: masked by its class's
    /// mask) cached under generation `since` holds in this snapshot too.
    ///
    /// It does when no flow added, removed or modified since could change a
    /// lookup of its pass (see the `revalidate` module): every lookup then
    /// finds the flow it found before, with the same actions. Anything else
    /// (a group or a cache mask changed, too many flows, too old) says no.
    pub fn revalidates(&self, since: u64, key: &MatchKey) -> bool {
        if since >= self.generation {
            return since == self.generation;
        }
        let first = self.generation + 1 - self.history.len() as u64;
        if since + 1 < first {
            return false;
        }
        self.history
            .iter()
            .filter(|s| s.generation > since)
            .all(|s| s.keeps(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::Match;
    use crate::flow::Action;
    use crate::key::PortNo;

    #[test]
    fn add_replaces_by_identity_and_keeps_counters() {
        let mut t = FlowTables::new();
        let m = Match::any().with(Field::InPort, 1);
        let a = t
            .add(
                FlowEntry::new(0, 5, m).action(Action::Output(PortNo(2))),
                Time::ZERO,
            )
            .unwrap();
        t.get(a).unwrap().totals.add(3, 300, 1);
        let b = t
            .add(
                FlowEntry::new(0, 5, m).action(Action::Output(PortNo(3))),
                Time::ZERO,
            )
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(a).unwrap().totals.packets.load(Relaxed), 3);
        assert_eq!(
            t.get(a).unwrap().entry.actions[0],
            Action::Output(PortNo(3))
        );
    }

    #[test]
    fn apply_is_a_minimal_diff() {
        let mut t = FlowTables::new();
        let f =
            |p: u32| FlowEntry::new(1, 10, Match::any().with(Field::InPort, p.into())).cookie(7);
        let other = FlowEntry::new(0, 1, Match::any()).cookie(1);
        t.add(other.clone(), Time::ZERO).unwrap();
        let s = t
            .apply([f(1), f(2)], |e| e.cookie.0 == 7, Time::ZERO)
            .unwrap();
        assert_eq!(
            s,
            ApplyStats {
                added: 2,
                modified: 0,
                deleted: 0
            }
        );
        let s = t
            .apply([f(2), f(3)], |e| e.cookie.0 == 7, Time::ZERO)
            .unwrap();
        assert_eq!(
            s,
            ApplyStats {
                added: 1,
                modified: 0,
                deleted: 1
            }
        );
        assert_eq!(t.len(), 3, "flows outside the owned set are untouched");
        let bad = FlowEntry::new(1, 1, Match::any()).action(Action::GotoTable(TableId(0)));
        assert!(t.apply([bad], |_| true, Time::ZERO).is_err());
        assert_eq!(t.len(), 3, "a failed apply changes nothing");
    }
}
