//! Units: what recompiles as one piece, and the merged flows they make.
//!
//! Owns the bookkeeping of compiled flows: each [`Unit`] (a group's frame, one
//! pod's part of a group, a default deny, a node) has an id (its cookie) and the
//! flow identities it contributes to; flows of different units with the same
//! table, priority and match are merged into one, their conjunction actions
//! united, as OVS requires.

use std::sync::Arc;

use datapath::flow::{Action, Cookie, FlowEntry, FlowIdentity};
use smallvec::SmallVec;

use super::emit::conj_key;
use super::groups::{GroupInfo, GroupKey, RuleRef};
use super::tier::TierRuleRef;
use super::{FlowDiff, HashMap};
use crate::cookie::CookieKind;
use crate::model::{Direction, ObjectKey};
/// The unit of compilation: what recompiles as one piece.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Unit {
    /// A group's pod-independent flows (it also owns the group's cookie).
    Frame(Arc<GroupKey>),
    /// One pod's flows in one group.
    Member(Arc<GroupKey>, ObjectKey),
    Deny(ObjectKey, Direction),
    Node(String),
    /// One rule of a ClusterNetworkPolicy: its pod-independent flows (it
    /// also owns the rule's cookie and conjunction ids).
    Tier(TierRuleRef),
    /// One pod's flows in every ClusterNetworkPolicy rule (as subject, peer,
    /// owner of a named port), merged: a pod costs a flow per table, role and
    /// address however many rules name it.
    TierPod(ObjectKey),
}

#[derive(Debug, Clone)]
pub(crate) struct Contribution {
    pub(crate) unit: u32,
    pub(crate) cookie: Cookie,
    pub(crate) actions: SmallVec<[Action; 2]>,
}

#[derive(Debug)]
pub(crate) struct UnitState {
    pub(crate) id: u32,
    pub(crate) flows: Vec<FlowIdentity>,
}

/// Compiled flows and the bookkeeping to change them incrementally.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) units: HashMap<Unit, UnitState>,
    pub(crate) by_id: Vec<Option<Unit>>,
    pub(crate) free_ids: Vec<u32>,
    pub(crate) merged: HashMap<FlowIdentity, SmallVec<[Contribution; 1]>>,
    pub(crate) group_of: HashMap<RuleRef, Arc<GroupKey>>,
    pub(crate) groups: HashMap<Arc<GroupKey>, GroupInfo>,
}

impl State {
    pub(crate) fn alloc(&mut self, unit: &Unit) -> u32 {
        if let Some(u) = self.units.get(unit) {
            return u.id;
        }
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                self.by_id.push(None);
                (self.by_id.len() - 1) as u32
            }
        };
        self.by_id[id as usize] = Some(unit.clone());
        self.units.insert(
            unit.clone(),
            UnitState {
                id,
                flows: Vec::new(),
            },
        );
        id
    }

    pub(crate) fn release(&mut self, unit: &Unit) {
        if let Some(u) = self.units.remove(unit) {
            self.by_id[u.id as usize] = None;
            self.free_ids.push(u.id);
        }
    }

    pub(crate) fn unit_of(&self, cookie: Cookie) -> Option<&Unit> {
        let id = CookieKind::Unit.payload(cookie)?;
        self.by_id.get(usize::try_from(id).ok()?)?.as_ref()
    }

    /// The one flow the contributions to `identity` make.
    pub(crate) fn materialize(
        &self,
        identity: &FlowIdentity,
        contrib: &[Contribution],
    ) -> Option<FlowEntry> {
        let unit = |c: &Contribution| self.by_id[c.unit as usize].as_ref();
        let first = contrib.iter().min_by(|a, b| unit(a).cmp(&unit(b)))?;
        let hard = contrib
            .iter()
            .filter(|c| {
                !c.actions
                    .iter()
                    .any(|a| matches!(a, Action::Conjunction { .. }))
            })
            .min_by(|a, b| unit(a).cmp(&unit(b)));
        let (actions, cookie) = match hard {
            Some(h) => (h.actions.clone(), h.cookie),
            None => {
                let mut all: Vec<Action> = contrib
                    .iter()
                    .flat_map(|c| c.actions.iter().cloned())
                    .collect();
                all.sort_by_key(conj_key);
                all.dedup();
                (all.into_iter().collect(), first.cookie)
            }
        };
        Some(FlowEntry {
            table: identity.table,
            priority: identity.priority,
            matcher: identity.matcher,
            actions,
            cookie,
        })
    }

    pub(crate) fn flow(&self, identity: &FlowIdentity) -> Option<FlowEntry> {
        self.merged
            .get(identity)
            .and_then(|c| self.materialize(identity, c))
    }

    /// Replaces the flows of `unit` (allocated) with `flows`.
    pub(crate) fn install(
        &mut self,
        unit: &Unit,
        flows: Vec<FlowEntry>,
        mut diff: Option<&mut DiffBuilder>,
    ) {
        let Some(state) = self.units.get_mut(unit) else {
            return;
        };
        let id = state.id;
        let old = std::mem::take(&mut state.flows);
        for identity in old {
            if let Some(d) = diff.as_deref_mut() {
                d.touch(self, &identity);
            }
            if let Some(list) = self.merged.get_mut(&identity) {
                list.retain(|c| c.unit != id);
                if list.is_empty() {
                    self.merged.remove(&identity);
                }
            }
        }
        let mut identities = Vec::with_capacity(flows.len());
        for f in flows {
            let identity = f.identity();
            if let Some(d) = diff.as_deref_mut() {
                d.touch(self, &identity);
            }
            self.merged.entry(identity).or_default().push(Contribution {
                unit: id,
                cookie: f.cookie,
                actions: f.actions,
            });
            identities.push(identity);
        }
        if let Some(state) = self.units.get_mut(unit) {
            state.flows = identities;
        }
    }
}

/// Records the merged flow of each identity before a change touches it.
#[derive(Default)]
pub(crate) struct DiffBuilder {
    pub(crate) before: HashMap<FlowIdentity, Option<FlowEntry>>,
}

impl DiffBuilder {
    pub(crate) fn touch(&mut self, s: &State, identity: &FlowIdentity) {
        if !self.before.contains_key(identity) {
            self.before.insert(*identity, s.flow(identity));
        }
    }

    pub(crate) fn finish(self, s: &State) -> FlowDiff {
        let mut diff = FlowDiff::default();
        for (identity, before) in self.before {
            match (before, s.flow(&identity)) {
                (None, Some(after)) => diff.added.push(after),
                (Some(_), None) => diff.deleted.push(identity),
                (Some(b), Some(a)) if a != b => diff.modified.push(a),
                _ => {}
            }
        }
        diff
    }
}
