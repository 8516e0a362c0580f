//! The Admin and Baseline tiers: ClusterNetworkPolicy rules -> flows.
//!
//! Owns what one tier rule compiles to and which rules a change can touch. A
//! rule is one unit: its flows sit in its tier's table (40/50 Admin, 42/52
//! Baseline) at a priority that orders policies by `priority` and rules by
//! their place in the list, and match with conjunctions: clause 1 the subject
//! pods, clause 2 the peers (pod, node and learned DNS addresses, CIDRs),
//! clause 3 the ports. Named ports are resolved per destination pod, so for
//! them the destination and the port share a clause (a second conjunction).
//! The `conj_id` flow carries the action: Accept jumps past the direction's
//! remaining tiers, Deny drops, Pass jumps to the next tier.

use std::collections::BTreeSet;
use std::net::IpAddr;

use datapath::Match;
use datapath::field::Field;
use datapath::flow::{Action, FlowEntry, TableId};
use ipnet::IpNet;

use super::emit::{conj_id, cookie_of};
use super::matches::{family_type, ip_match, net_match, port_masks};
use crate::cnp::{ClusterPolicy, RuleAction, Tier, TierPeer, TierRule};
use crate::model::{Cluster, Direction, Pod, PortRef, Protocol};
use crate::tables::{
    AFTER_EGRESS, AFTER_INGRESS, EGRESS_BASELINE, EGRESS_NP, EGRESS_TABLE, INGRESS_BASELINE,
    INGRESS_NP, INGRESS_TABLE, priority,
};

/// A rule of a ClusterNetworkPolicy: (policy name, direction, index).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierRuleRef {
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
}

/// The table of a tier and direction, and where its actions go.
pub(crate) struct TierTables {
    pub(crate) table: u8,
    /// Where Accept goes: past every tier of the direction.
    pub(crate) accept: u8,
    /// Where Pass goes: the next tier.
    pub(crate) pass: u8,
}

pub(crate) fn tables(tier: Tier, dir: Direction) -> TierTables {
    match (tier, dir) {
        (Tier::Admin, Direction::Egress) => TierTables {
            table: EGRESS_TABLE,
            accept: AFTER_EGRESS,
            pass: EGRESS_NP,
        },
        (Tier::Baseline, Direction::Egress) => TierTables {
            table: EGRESS_BASELINE,
            accept: AFTER_EGRESS,
            pass: AFTER_EGRESS,
        },
        (Tier::Admin, Direction::Ingress) => TierTables {
            table: INGRESS_TABLE,
            accept: AFTER_INGRESS,
            pass: INGRESS_NP,
        },
        (Tier::Baseline, Direction::Ingress) => TierTables {
            table: INGRESS_BASELINE,
            accept: AFTER_INGRESS,
            pass: AFTER_INGRESS,
        },
    }
}

/// The subject's pods, each with its addresses.
pub(crate) fn subject_pods<'a>(cluster: &'a Cluster, p: &ClusterPolicy) -> Vec<&'a Pod> {
    let mut out = Vec::new();
    for ns in cluster.namespace_names() {
        if !p.subject.namespaces.matches(&cluster.namespace_labels(ns)) {
            continue;
        }
        out.extend(
            cluster
                .pods_in(ns)
                .filter(|pod| !pod.ips.is_empty() && p.subject.pods.matches(&pod.labels)),
        );
    }
    out
}

/// The pods a rule's pod peers match.
fn peer_pods<'a>(cluster: &'a Cluster, rule: &TierRule) -> Vec<&'a Pod> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for peer in &rule.peers {
        let TierPeer::Pods { namespaces, pods } = peer else {
            continue;
        };
        for ns in cluster.namespace_names() {
            if !namespaces.matches(&cluster.namespace_labels(ns)) {
                continue;
            }
            for pod in cluster.pods_in(ns) {
                if !pod.ips.is_empty() && pods.matches(&pod.labels) && seen.insert(&pod.key) {
                    out.push(pod);
                }
            }
        }
    }
    out
}

/// The addresses of a rule's node and domain peers, and its CIDRs.
fn other_peers(cluster: &Cluster, rule: &TierRule) -> (BTreeSet<IpAddr>, BTreeSet<IpNet>) {
    let mut ips = BTreeSet::new();
    let mut nets = BTreeSet::new();
    for peer in &rule.peers {
        match peer {
            TierPeer::Pods { .. } => {}
            TierPeer::Nodes(sel) => {
                for n in cluster.nodes().filter(|n| sel.matches(&n.labels)) {
                    ips.extend(n.addresses.iter().copied());
                }
            }
            TierPeer::Networks(list) => nets.extend(list.iter().copied()),
            TierPeer::Domains(names) => {
                for (name, addrs) in cluster.resolved() {
                    if names.iter().any(|d| d.matches(name)) {
                        ips.extend(addrs.iter().copied());
                    }
                }
            }
        }
    }
    (ips, nets)
}

/// The flows of rule `index` of `policy` in `dir`, under unit `id`.
pub(crate) fn compile_tier_rule(
    cluster: &Cluster,
    policy: &ClusterPolicy,
    dir: Direction,
    index: usize,
    id: u32,
) -> Vec<FlowEntry> {
    let Some(rule) = policy.rules(dir).get(index) else {
        return vec![];
    };
    let Some(action) = rule.effective_action() else {
        return vec![]; // an Accept that fails closed matches nothing
    };
    let t = tables(policy.tier, dir);
    let prio = priority::tier_rule(policy.priority, index as u16);
    let actions: Vec<Action> = match action {
        RuleAction::Accept => vec![Action::GotoTable(TableId(t.accept))],
        RuleAction::Pass => vec![Action::GotoTable(TableId(t.pass))],
        RuleAction::Deny => vec![],
    };
    let (sel_field, peer_field) = match dir {
        Direction::Egress => (Field::NwSrc, Field::NwDst),
        Direction::Ingress => (Field::NwDst, Field::NwSrc),
    };
    let flow = |matcher: Match, actions: Vec<Action>| FlowEntry {
        table: TableId(t.table),
        priority: prio,
        matcher,
        actions: actions.into_iter().collect(),
        cookie: cookie_of(id),
    };
    let clause = |part: u32, k: u8, n: u8, m: Match| {
        flow(
            m,
            vec![Action::Conjunction {
                id: conj_id(id, part),
                clause: k,
                n_clauses: n,
            }],
        )
    };
    let subjects = subject_pods(cluster, policy);
    let mut out = Vec::new();
    if rule.fail_closed.is_some() {
        // Deny everything of the subject in this direction.
        for pod in &subjects {
            for ip in &pod.ips {
                out.push(flow(ip_match(sel_field, *ip), actions.clone()));
            }
        }
        return out;
    }
    let pods = peer_pods(cluster, rule);
    let (ips, nets) = other_peers(cluster, rule);
    let mut peer_matches: Vec<Match> = Vec::new();
    let mut seen = BTreeSet::new();
    for ip in pods.iter().flat_map(|p| p.ips.iter()).chain(&ips) {
        if seen.insert(*ip) {
            peer_matches.push(ip_match(peer_field, *ip));
        }
    }
    peer_matches.extend(nets.iter().map(|n| net_match(peer_field, *n)));
    if subjects.is_empty() || peer_matches.is_empty() {
        return out;
    }
    let families: BTreeSet<bool> = subjects
        .iter()
        .flat_map(|p| p.ips.iter().map(IpAddr::is_ipv6))
        .collect();
    let numeric: Vec<(Protocol, u16, u16)> = rule
        .ports
        .iter()
        .flatten()
        .filter_map(|p| match p.port {
            PortRef::Range { start, end } => Some((p.protocol, start, end)),
            PortRef::Any => Some((p.protocol, 0, u16::MAX)),
            PortRef::Named(_) => None,
        })
        .collect();
    // Part 0: any port, or the numeric ports.
    if rule.ports.is_none() || !numeric.is_empty() {
        let n = if rule.ports.is_none() { 2 } else { 3 };
        for pod in &subjects {
            for ip in &pod.ips {
                out.push(clause(0, 1, n, ip_match(sel_field, *ip)));
            }
        }
        for m in &peer_matches {
            out.push(clause(0, 2, n, *m));
        }
        if n == 3 {
            let mut ports = super::HashSet::default();
            for &v6 in &families {
                for &(proto, start, end) in &numeric {
                    let base = Match::any()
                        .with(Field::DlType, family_type(v6).into())
                        .with(Field::NwProto, proto.ip_proto().into());
                    for (v, mask) in port_masks(start, end) {
                        let m = if mask == 0 {
                            base
                        } else {
                            base.with_masked(Field::TpDst, v.into(), mask.into())
                        };
                        if ports.insert(m) {
                            out.push(clause(0, 3, n, m));
                        }
                    }
                }
            }
        }
        out.push(flow(
            Match::any().with(Field::ConjId, conj_id(id, 0).into()),
            actions.clone(),
        ));
    }
    // Part 1: named ports, resolved on each destination pod.
    if rule.has_named_ports() {
        let dests: &[&Pod] = match dir {
            Direction::Ingress => &subjects,
            Direction::Egress => &pods,
        };
        let mut any = false;
        for pod in dests {
            let resolved: BTreeSet<(Protocol, u16)> = rule
                .ports
                .iter()
                .flatten()
                .filter_map(|p| match &p.port {
                    PortRef::Named(name) => pod.resolve(name, p.protocol).map(|n| (p.protocol, n)),
                    _ => None,
                })
                .collect();
            let dest_field = match dir {
                Direction::Ingress => sel_field,
                Direction::Egress => peer_field,
            };
            let k = match dir {
                Direction::Ingress => 1,
                Direction::Egress => 2,
            };
            for ip in &pod.ips {
                for (proto, port) in &resolved {
                    any = true;
                    let m = ip_match(dest_field, *ip)
                        .with(Field::NwProto, proto.ip_proto().into())
                        .with(Field::TpDst, (*port).into());
                    out.push(clause(1, k, 2, m));
                }
            }
        }
        if any {
            match dir {
                Direction::Ingress => {
                    for m in &peer_matches {
                        out.push(clause(1, 2, 2, *m));
                    }
                }
                Direction::Egress => {
                    for pod in &subjects {
                        for ip in &pod.ips {
                            out.push(clause(1, 1, 2, ip_match(sel_field, *ip)));
                        }
                    }
                }
            }
            out.push(flow(
                Match::any().with(Field::ConjId, conj_id(id, 1).into()),
                actions,
            ));
        }
    }
    out
}

/// Whether a tier rule's flows can depend on `pod` (as subject, peer, or
/// owner of a named port: the last two are peers or subjects too).
pub(crate) fn touches_pod(
    cluster: &Cluster,
    policy: &ClusterPolicy,
    rule: &TierRule,
    pod: &Pod,
) -> bool {
    if cluster.subject_of(policy, pod) {
        return true;
    }
    let ns = cluster.namespace_labels(&pod.key.namespace);
    rule.peers.iter().any(|p| match p {
        TierPeer::Pods { namespaces, pods } => namespaces.matches(&ns) && pods.matches(&pod.labels),
        _ => false,
    })
}

/// Whether a tier rule selects namespaces by labels that `labels` match.
pub(crate) fn touches_namespace(
    policy: &ClusterPolicy,
    rule: &TierRule,
    labels: &crate::selector::Labels,
) -> bool {
    policy.subject.namespaces.matches(labels)
        || rule.peers.iter().any(|p| match p {
            TierPeer::Pods { namespaces, .. } => namespaces.matches(labels),
            _ => false,
        })
}

pub(crate) fn has_node_peers(rule: &TierRule) -> bool {
    rule.peers.iter().any(|p| matches!(p, TierPeer::Nodes(_)))
}

pub(crate) fn touches_name(rule: &TierRule, name: &str) -> bool {
    rule.peers.iter().any(|p| match p {
        TierPeer::Domains(d) => d.iter().any(|d| d.matches(name)),
        _ => false,
    })
}

/// Every rule of a policy.
pub(crate) fn rule_refs(p: &ClusterPolicy) -> impl Iterator<Item = TierRuleRef> + '_ {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .flat_map(move |direction| {
            (0..p.rules(direction).len()).map(move |index| TierRuleRef {
                policy: p.name.clone(),
                direction,
                index,
            })
        })
}
