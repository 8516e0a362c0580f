//! Revalidation: which cached translations a publish cannot have changed.
//!
//! Owns "does this cached translation still hold after these edits". The
//! tables journal the flows edits add, remove or modify; each publish turns
//! its journal into a [`Step`]; a cache entry of an older generation holds
//! when no step since could have changed any lookup of its pass. A changed
//! flow can only change a lookup whose key it matches; a conjunction's flows
//! (its clauses and its `conj_id` flow) only when the conjunction can fire
//! for the key, every clause matching it, which for a policy's new rule with
//! another port or another target is seldom the case.
//!
//! Later lookups of a pass see the key as earlier actions left it, so bits an
//! action may write are not compared: a flow matching there counts as
//! matching (conservative: the entry is translated again).

use std::collections::HashMap;

use smallvec::SmallVec;

use crate::field::{Match, MatchKey};
use crate::flow::FlowEntry;

/// More changed flows than this in one publish: cached translations are
/// not checked against them, but start afresh.
const JOURNAL_MAX: usize = 256;

/// A changed flow's part in lookups.
#[derive(Debug, Clone)]
enum Role {
    /// Wins lookups itself.
    Plain,
    /// The flow of conjunction `conj_id=X`: consulted when X fires.
    Target(u32),
    /// Clauses of conjunctions (id, clause, of n): it never wins a lookup,
    /// it can only make one of them fire.
    Clauses(SmallVec<[(u32, u8, u8); 2]>),
}

#[derive(Debug, Clone)]
struct Changed {
    matcher: Match,
    role: Role,
}

impl Changed {
    fn of(entry: &FlowEntry) -> Changed {
        let m = &entry.matcher;
        let role = if m.is_exact(crate::field::Field::ConjId) {
            Role::Target(m.get(crate::field::Field::ConjId).0 as u32)
        } else {
            let clauses: SmallVec<[(u32, u8, u8); 2]> = entry.conjunctions().collect();
            if !clauses.is_empty() && clauses.len() == entry.actions.len() {
                Role::Clauses(clauses)
            } else {
                Role::Plain
            }
        };
        Changed { matcher: *m, role }
    }
}

/// What edits changed since the tables were last published.
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal {
    changed: Vec<Changed>,
    everything: bool,
}

impl Journal {
    /// `entry` was added, removed or modified.
    pub(crate) fn flow(&mut self, entry: &FlowEntry) {
        self.push(Changed::of(entry));
    }

    /// `old` became `new` (same table, priority and match). A clause flow
    /// that gained or lost conjunctions changes only those: the ones it
    /// keeps fire as before.
    pub(crate) fn modified(&mut self, old: &FlowEntry, new: &FlowEntry) {
        let (before, after) = (Changed::of(old), Changed::of(new));
        if let (Role::Clauses(b), Role::Clauses(a)) = (&before.role, &after.role) {
            let differ: SmallVec<[(u32, u8, u8); 2]> = b
                .iter()
                .filter(|c| !a.contains(c))
                .chain(a.iter().filter(|c| !b.contains(c)))
                .copied()
                .collect();
            if !differ.is_empty() {
                self.push(Changed {
                    matcher: new.matcher,
                    role: Role::Clauses(differ),
                });
            }
            return;
        }
        self.push(before);
        self.push(after);
    }

    fn push(&mut self, changed: Changed) {
        if self.everything {
            return;
        }
        if self.changed.len() == JOURNAL_MAX {
            self.everything();
        } else {
            self.changed.push(changed);
        }
    }

    /// Something no entry can be checked against changed (a group).
    pub(crate) fn everything(&mut self) {
        self.everything = true;
        self.changed = Vec::new();
    }
}

/// What one publish changed, as cache entries are checked against it.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) generation: u64,
    /// `None`: everything (a cache mask or a group changed, or too many
    /// flows).
    changed: Option<Checked>,
}

#[derive(Debug)]
struct Checked {
    flows: Vec<Changed>,
    /// Bits a lookup after a pass's first may see rewritten: not compared.
    written: MatchKey,
    /// The clauses, before and after the publish, of every conjunction a
    /// changed flow takes part in: (clause, of n, match).
    clauses: HashMap<u32, Vec<(u8, u8, Match)>>,
}

impl Step {
    /// The step whose edits `journal` recorded; `flows` are the flows
    /// before and after (for the clauses of changed conjunctions),
    /// `written` what actions write in either (`None`: the cache masks
    /// changed).
    pub(crate) fn new<'a>(
        generation: u64,
        journal: Journal,
        flows: impl Iterator<Item = &'a FlowEntry>,
        written: Option<MatchKey>,
    ) -> Step {
        let changed = written.filter(|_| !journal.everything).map(|written| {
            let mut clauses: HashMap<u32, Vec<(u8, u8, Match)>> = HashMap::new();
            for c in &journal.changed {
                match &c.role {
                    Role::Plain => {}
                    Role::Target(x) => {
                        clauses.entry(*x).or_default();
                    }
                    Role::Clauses(list) => {
                        for (x, _, _) in list {
                            clauses.entry(*x).or_default();
                        }
                    }
                }
            }
            if !clauses.is_empty() {
                for entry in flows {
                    for (x, clause, n) in entry.conjunctions() {
                        if let Some(list) = clauses.get_mut(&x) {
                            list.push((clause, n, entry.matcher));
                        }
                    }
                }
            }
            Checked {
                flows: journal.changed,
                written,
                clauses,
            }
        });
        Step {
            generation,
            changed,
        }
    }

    /// Whether this step leaves a translation of `key` as it was.
    pub(crate) fn keeps(&self, key: &MatchKey) -> bool {
        self.changed.as_ref().is_some_and(|c| !c.touches(key))
    }
}

impl Checked {
    fn touches(&self, key: &MatchKey) -> bool {
        self.flows.iter().any(|f| {
            could_match(&f.matcher, key, &self.written)
                && match &f.role {
                    Role::Plain => true,
                    Role::Target(x) => self.can_fire(*x, key),
                    Role::Clauses(list) => list.iter().any(|(x, _, _)| self.can_fire(*x, key)),
                }
        })
    }

    /// Whether conjunction `x` could fire for `key`, before or after: every
    /// clause has a flow that could match it.
    fn can_fire(&self, x: u32, key: &MatchKey) -> bool {
        let Some(clauses) = self.clauses.get(&x) else {
            return true;
        };
        let n = clauses.iter().map(|c| c.1).max().unwrap_or(0);
        (1..=n).all(|c| {
            clauses
                .iter()
                .any(|(clause, _, m)| *clause == c && could_match(m, key, &self.written))
        })
    }
}

/// Whether `m` matches `key` on the bits outside `ignored`.
#[inline]
fn could_match(m: &Match, key: &MatchKey, ignored: &MatchKey) -> bool {
    let (value, mask) = (m.value(), m.mask());
    (0..key.0.len()).all(|i| {
        let bits = mask.0[i] & !ignored.0[i];
        key.0[i] & bits == value.0[i] & bits
    })
}
