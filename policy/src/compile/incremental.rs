//! Incremental compilation: from one cluster change to the units it can affect.
//!
//! Owns deciding what a change touches (a pod's roles in every group, the groups
//! a namespace relabel reaches, a policy's rules moving between groups), running
//! that work, and the [`FlowDiff`](super::FlowDiff) it produces. A group whose
//! clauses become empty or non-empty is rebuilt; otherwise only the changed
//! pod's own flows are.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::HashSet;
use super::emit::{compile_deny, compile_frame, compile_member, compile_node, merge_within};
use super::groups::{
    CanonNs, CanonPeer, GroupInfo, GroupKey, Resolver, Roles, in_block, roles, rule_refs,
};
use super::tier;
use super::units::{DiffBuilder, State, Unit};
use crate::cluster::Cluster;
use crate::cnp::ClusterPolicy;
use crate::model::{Direction, ObjectKey, Pod, Policy};
/// Pending work of one change.
#[derive(Default)]
pub(crate) struct Work {
    /// Groups to rebuild from scratch (membership sets, frame, every member).
    pub(crate) groups: BTreeSet<Arc<GroupKey>>,
    /// Single units to recompile.
    pub(crate) units: BTreeSet<Unit>,
    /// ClusterNetworkPolicies changed: (old, new) versions, whose rules'
    /// frames and every pod either involves are recompiled.
    pub(crate) tier_policies: Vec<(Option<ClusterPolicy>, Option<ClusterPolicy>)>,
}

/// Moves a policy's rules out of their old groups and into their new ones;
/// every group touched is rebuilt.
pub(super) fn regroup(
    state: &mut State,
    old: Option<&Policy>,
    new: Option<&Policy>,
    work: &mut Work,
) {
    for p in old.into_iter() {
        for r in rule_refs(p) {
            if let Some(g) = state.group_of.remove(&r) {
                if let Some(info) = state.groups.get_mut(&g) {
                    info.rules.remove(&r);
                }
                work.groups.insert(g);
            }
        }
    }
    for p in new.into_iter() {
        for r in rule_refs(p) {
            let rule = &p
                .rules(r.direction)
                .expect("rule_refs yields existing rules")[r.index];
            let key = GroupKey::of(p, r.direction, rule);
            let g = match state.groups.get_key_value(&key) {
                Some((g, _)) => g.clone(),
                None => {
                    let g = Arc::new(key);
                    let id = state.alloc(&Unit::Frame(g.clone()));
                    state.groups.insert(
                        g.clone(),
                        GroupInfo {
                            id,
                            ..GroupInfo::default()
                        },
                    );
                    g
                }
            };
            if let Some(info) = state.groups.get_mut(&g) {
                info.rules.insert(r.clone());
            }
            state.group_of.insert(r, g.clone());
            work.groups.insert(g);
        }
    }
}
/// Recomputes a group's membership from scratch; returns its pods before and
/// after (whose member units must be recompiled).
fn rebuild_members(
    state: &mut State,
    res: &mut Resolver<'_>,
    g: &Arc<GroupKey>,
) -> BTreeSet<ObjectKey> {
    let cluster = res.cluster;
    let Some(info) = state.groups.get(g) else {
        return BTreeSet::new();
    };
    let mut pods = info.pods();
    let mut selected: BTreeSet<ObjectKey> = BTreeSet::new();
    let policies: BTreeSet<&ObjectKey> = info.rules.iter().map(|r| &r.policy).collect();
    for key in policies {
        let Some(p) = cluster.policy(key) else {
            continue;
        };
        for pod in cluster.pods_in(&key.namespace) {
            if !pod.ips.is_empty() && p.pod_selector.matches(&pod.labels) && cluster.is_local(pod) {
                selected.insert(pod.key.clone());
            }
        }
    }
    // Candidates for the peer and owner roles: none while no pod is selected
    // here (a conjunction without its subject clause never completes; when a
    // pod joins, the group's flags flip and it is rebuilt).
    let mut candidates: BTreeSet<&ObjectKey> = selected.iter().collect();
    if selected.is_empty() {
        let empty = GroupInfo {
            id: info.id,
            rules: info.rules.clone(),
            ..GroupInfo::default()
        };
        state.groups.insert(g.clone(), empty);
        return pods;
    }
    let peers: Vec<CanonPeer> = g.peers.clone().unwrap_or_default();
    for pod in res.peer_pods(&peers) {
        candidates.insert(&pod.key);
    }
    let named_egress = g.direction == Direction::Egress && g.has_named_ports();
    if named_egress {
        match &g.peers {
            None => candidates.extend(cluster.pods().map(|p| &p.key)),
            Some(peers) => {
                for pod in cluster.pods() {
                    let inside = peers
                        .iter()
                        .any(|p| matches!(p, CanonPeer::Block { cidr, except } if in_block(pod, cidr, except)));
                    if inside {
                        candidates.insert(&pod.key);
                    }
                }
            }
        }
    }
    let mut fresh = GroupInfo {
        id: info.id,
        rules: info.rules.clone(),
        ..GroupInfo::default()
    };
    for key in candidates {
        let Some(pod) = cluster.pod(key) else {
            continue;
        };
        let r = roles(cluster, g, pod, selected.contains(key));
        if r.any() {
            fresh.set_roles(key, r);
        }
    }
    pods.extend(fresh.pods());
    state.groups.insert(g.clone(), fresh);
    pods
}
/// Carries out `work`, recording what changed in `diff` when given.
pub(super) fn run(
    state: &mut State,
    cluster: &Cluster,
    work: Work,
    mut diff: Option<&mut DiffBuilder>,
) {
    {
        let mut res = Resolver::new(cluster);
        let mut units = work.units;
        for g in &work.groups {
            for pod in rebuild_members(state, &mut res, g) {
                units.insert(Unit::Member(g.clone(), pod));
            }
            units.insert(Unit::Frame(g.clone()));
        }
        for (old, new) in &work.tier_policies {
            for p in old.iter().chain(new) {
                units.extend(tier::rule_refs(p).map(Unit::Tier));
                for rule in p.egress.iter().chain(&p.ingress) {
                    units.extend(
                        tier::members(cluster, p, rule)
                            .into_iter()
                            .map(Unit::TierPod),
                    );
                }
            }
        }
        // Pods' tier flows name their rules' conjunctions: frames first.
        let (pods, rest): (Vec<Unit>, Vec<Unit>) = units
            .into_iter()
            .partition(|u| matches!(u, Unit::TierPod(_)));
        for u in rest {
            recompile_unit(state, cluster, &u, None, diff.as_deref_mut());
        }
        if !pods.is_empty() {
            let rules =
                tier::RuleSet::new(cluster, |r| state.units.get(&Unit::Tier(r)).map(|u| u.id));
            for u in pods {
                recompile_unit(state, cluster, &u, Some(&rules), diff.as_deref_mut());
            }
        }
        // Groups without rules are gone.
        for g in &work.groups {
            if state.groups.get(g).is_some_and(|i| i.rules.is_empty()) {
                state.release(&Unit::Frame(g.clone()));
                state.groups.remove(g);
            }
        }
    }
}
fn recompile_unit(
    state: &mut State,
    cluster: &Cluster,
    u: &Unit,
    rules: Option<&tier::RuleSet<'_>>,
    diff: Option<&mut DiffBuilder>,
) {
    let mut flows = match u {
        Unit::Frame(g) => match state.groups.get(g) {
            Some(info) if !info.rules.is_empty() => compile_frame(g, info),
            _ => vec![],
        },
        Unit::Member(g, key) => match (state.groups.get(g), cluster.pod(key)) {
            (Some(info), Some(pod)) if !info.rules.is_empty() && info.roles_of(key).any() => {
                compile_member(g, info, pod)
            }
            _ => vec![],
        },
        Unit::Deny(pod, dir) => {
            let id = state.alloc(u);
            compile_deny(cluster, pod, *dir, id)
        }
        Unit::Node(n) => {
            let id = state.alloc(u);
            compile_node(cluster, n, id)
        }
        Unit::Tier(r) => match cluster.cluster_policy(&r.policy) {
            Some(p) if r.index < p.rules(r.direction).len() => {
                let id = state.alloc(u);
                tier::compile_tier_frame(cluster, p, r.direction, r.index, id)
            }
            _ => vec![],
        },
        Unit::TierPod(key) => match (rules, cluster.pod(key)) {
            (Some(rules), Some(pod)) => {
                let id = state.alloc(u);
                rules.compile_pod(cluster, pod, id)
            }
            _ => vec![],
        },
    };
    // A pod's tier flows come merged.
    if !matches!(u, Unit::TierPod(_)) {
        merge_within(&mut flows);
    }
    let frame = matches!(u, Unit::Frame(_));
    if flows.is_empty() {
        if state.units.contains_key(u) {
            state.install(u, flows, diff);
            if !frame {
                state.release(u);
            }
        }
        return;
    }
    state.alloc(u);
    state.install(u, flows, diff);
}
/// A NetworkPolicy of `namespace` changed: which of its pods are isolated may
/// have too (their default denies, and their nodes' own-node allowances).
pub(super) fn deny_units_in(cluster: &Cluster, namespace: &str, work: &mut Work) {
    for pod in cluster.pods_in(namespace) {
        for dir in [Direction::Ingress, Direction::Egress] {
            work.units.insert(Unit::Deny(pod.key.clone(), dir));
        }
        if let Some(node) = &pod.node {
            work.units.insert(Unit::Node(node.clone()));
        }
    }
}
/// A pod changed (`old` -> `new`, either may be absent): update its roles in
/// every group; a group whose clauses become empty or non-empty is rebuilt,
/// otherwise only the pod's own flows are.
pub(super) fn pod_work(
    state: &mut State,
    cluster: &Cluster,
    old: Option<&Pod>,
    new: Option<&Pod>,
    work: &mut Work,
) {
    let key = match (old, new) {
        (_, Some(p)) | (Some(p), None) => p.key.clone(),
        (None, None) => return,
    };
    for pod in old.into_iter().chain(new) {
        for dir in [Direction::Ingress, Direction::Egress] {
            work.units.insert(Unit::Deny(pod.key.clone(), dir));
        }
        if let Some(node) = &pod.node {
            work.units.insert(Unit::Node(node.clone()));
        }
    }
    tier_pod_work(cluster, old, new, work);
    // Groups with a member rule whose policy selects the pod now.
    let mut selecting: HashSet<&Arc<GroupKey>> = HashSet::default();
    if let Some(pod) = new {
        for p in cluster.policies_in(&pod.key.namespace) {
            if cluster.selects(p, pod) && cluster.is_local(pod) {
                selecting.extend(rule_refs(p).filter_map(|r| state.group_of.get(&r)));
            }
        }
    }
    let changed_pod = old != new;
    let mut updates: Vec<(Arc<GroupKey>, Roles, bool)> = Vec::new();
    for (g, info) in &state.groups {
        let before = info.roles_of(&key);
        let after = match new {
            // A group with no subject here needs no peers either.
            Some(pod) if selecting.contains(g) || info.flags(g).selected => {
                roles(cluster, g, pod, selecting.contains(g))
            }
            _ => Roles::default(),
        };
        if before == after && !(before.any() && changed_pod) {
            continue;
        }
        let flip = info.flags_after(g, &key, after) != info.flags(g);
        updates.push((g.clone(), after, flip));
    }
    for (g, after, flip) in updates {
        if flip {
            work.groups.insert(g);
        } else {
            if let Some(info) = state.groups.get_mut(&g) {
                info.set_roles(&key, after);
            }
            work.units.insert(Unit::Member(g, key.clone()));
        }
    }
}
/// A pod changed: its tier flows, when any ClusterNetworkPolicy exists.
fn tier_pod_work(cluster: &Cluster, old: Option<&Pod>, new: Option<&Pod>, work: &mut Work) {
    if cluster.cluster_policies().next().is_none() {
        return;
    }
    if let Some(p) = new.or(old) {
        work.units.insert(Unit::TierPod(p.key.clone()));
    }
}

/// The tier rules of a ClusterNetworkPolicy, before and after a change.
pub(super) fn tier_policy_work(
    old: Option<&ClusterPolicy>,
    new: Option<&ClusterPolicy>,
    work: &mut Work,
) {
    work.tier_policies.push((old.cloned(), new.cloned()));
}

/// The tier rules whose peers select `pred` (nodes, or a DNS name).
pub(super) fn tier_peer_work(
    cluster: &Cluster,
    pred: impl Fn(&crate::cnp::TierRule) -> bool,
    work: &mut Work,
) {
    for p in cluster.cluster_policies() {
        for r in tier::rule_refs(p) {
            if pred(&p.rules(r.direction)[r.index]) {
                work.units.insert(Unit::Tier(r));
            }
        }
    }
}

pub(super) fn namespace_work(
    state: &State,
    cluster: &Cluster,
    name: &str,
    before: &crate::selector::Labels,
    work: &mut Work,
) {
    let after = cluster.namespace_labels(name);
    // Only this namespace's pods can join or leave a tier rule.
    let touched = cluster.cluster_policies().any(|p| {
        p.egress
            .iter()
            .chain(&p.ingress)
            .any(|r| tier::touches_namespace(p, r, before) || tier::touches_namespace(p, r, &after))
    });
    if touched {
        work.units.extend(
            cluster
                .pods_in(name)
                .map(|pod| Unit::TierPod(pod.key.clone())),
        );
    }
    for g in state.groups.keys() {
        let affected = g.peers.iter().flatten().any(|peer| match peer {
            CanonPeer::Pods {
                namespaces: CanonNs::Matching(s),
                ..
            } => s.matches(before) || s.matches(&after),
            _ => false,
        });
        if affected {
            work.groups.insert(g.clone());
        }
    }
}
