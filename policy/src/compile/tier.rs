//! The Admin and Baseline tiers: ClusterNetworkPolicy rules -> flows.
//!
//! Owns what one tier rule compiles to and which rules a change can touch. A
//! rule's flows sit in its tier's table (40/50 Admin, 42/52 Baseline) and
//! match with conjunctions: clause 1 the subject pods, clause 2 the peers
//! (pod, node and learned DNS addresses, CIDRs), clause 3 the ports. Named
//! ports are resolved per destination pod, so for them the destination and
//! the port share a clause (a second conjunction). The `conj_id` flow carries
//! the action (Accept jumps past the direction's remaining tiers, Deny drops,
//! Pass jumps to the next tier) at a priority that orders policies by
//! `priority` and rules by their place in the list; clause flows of all rules
//! share one priority and merge (see [`Emit`]). A rule compiles as a frame
//! (pod-independent flows) plus one member unit per pod it involves, so a pod
//! change recompiles only that pod's flows.

use std::collections::BTreeSet;
use std::net::IpAddr;

use datapath::Match;
use datapath::field::Field;
use datapath::flow::{Action, FlowEntry, TableId};
use ipnet::IpNet;

use super::emit::{conj_id, cookie_of};
use super::matches::{family_type, ip_match, net_match, port_masks};
use crate::cluster::Cluster;
use crate::cnp::{ClusterPolicy, RuleAction, Tier, TierPeer, TierRule};
use crate::model::{Direction, ObjectKey, Pod, PortRef, Protocol};
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

/// The pods a rule involves (subjects and pod peers): its member units.
pub(crate) fn members(cluster: &Cluster, p: &ClusterPolicy, rule: &TierRule) -> Vec<ObjectKey> {
    let mut out = Vec::new();
    for ns in cluster.namespace_names() {
        let labels = cluster.namespace_labels(ns);
        let subject_ns = p.subject.namespaces.matches(&labels);
        let peer_ns: Vec<&TierPeer> = rule
            .peers
            .iter()
            .filter(|peer| matches!(peer, TierPeer::Pods { namespaces, .. } if namespaces.matches(&labels)))
            .collect();
        if !subject_ns && peer_ns.is_empty() {
            continue;
        }
        for pod in cluster.pods_in(ns) {
            if pod.ips.is_empty() {
                continue;
            }
            let subject = subject_ns && p.subject.pods.matches(&pod.labels);
            let peer = peer_ns.iter().any(
                |peer| matches!(peer, TierPeer::Pods { pods, .. } if pods.matches(&pod.labels)),
            );
            if subject || peer {
                out.push(pod.key.clone());
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

/// How a rule compiles: its table, the conj_id flows' priority and action,
/// and its conjunctions (part 0: any or numeric ports; part 1: named ports).
struct Shape {
    table: u8,
    priority: u16,
    actions: Vec<Action>,
    sel_field: Field,
    peer_field: Field,
    fail_closed: bool,
    /// Part 0's clause count (2: subject, peers; 3: and ports), if it exists.
    numeric: Option<u8>,
    named: bool,
    direction: Direction,
}

fn shape(policy: &ClusterPolicy, dir: Direction, index: usize) -> Option<(Shape, &TierRule)> {
    let rule = policy.rules(dir).get(index)?;
    let action = rule.effective_action()?; // an Accept that fails closed matches nothing
    let t = tables(policy.tier, dir);
    let (sel_field, peer_field) = match dir {
        Direction::Egress => (Field::NwSrc, Field::NwDst),
        Direction::Ingress => (Field::NwDst, Field::NwSrc),
    };
    let has_numeric = rule
        .ports
        .iter()
        .flatten()
        .any(|p| !matches!(p.port, PortRef::Named(_)));
    let fail_closed = rule.fail_closed.is_some();
    let numeric = if fail_closed || rule.ports.is_none() {
        Some(2)
    } else {
        has_numeric.then_some(3)
    };
    Some((
        Shape {
            table: t.table,
            priority: priority::tier_rule(policy.priority, index as u16),
            actions: match action {
                RuleAction::Accept => vec![Action::GotoTable(TableId(t.accept))],
                RuleAction::Pass => vec![Action::GotoTable(TableId(t.pass))],
                RuleAction::Deny => vec![],
            },
            sel_field,
            peer_field,
            fail_closed,
            numeric,
            named: !fail_closed && rule.has_named_ports(),
            direction: dir,
        },
        rule,
    ))
}

/// Builds a rule's flows. Clause flows of every rule of a table share one
/// priority ([`priority::TIER_CLAUSE`]), so flows with the same match merge
/// into one carrying each rule's conjunction action, and a pod costs a flow
/// per role and address however many rules name it; the order of rules is
/// the order of their `conj_id` flows (the classifier takes the best
/// complete conjunction at a priority level).
struct Emit<'a> {
    shape: &'a Shape,
    /// The rule's unit: its conjunction ids.
    id: u32,
    /// The cookie of the unit emitting.
    cookie: datapath::flow::Cookie,
    out: Vec<FlowEntry>,
}

impl Emit<'_> {
    fn clause(&mut self, part: u32, k: u8, n: u8, m: Match) {
        self.out.push(FlowEntry {
            table: TableId(self.shape.table),
            priority: priority::TIER_CLAUSE,
            matcher: m,
            actions: smallvec::smallvec![Action::Conjunction {
                id: conj_id(self.id, part),
                clause: k,
                n_clauses: n,
            }],
            cookie: self.cookie,
        });
    }

    fn decide(&mut self, part: u32) {
        self.out.push(FlowEntry {
            table: TableId(self.shape.table),
            priority: self.shape.priority,
            matcher: Match::any().with(Field::ConjId, conj_id(self.id, part).into()),
            actions: self.shape.actions.iter().cloned().collect(),
            cookie: cookie_of(self.id),
        });
    }
}

/// The pod-independent flows of a rule (its frame), under unit `id`: the
/// `conj_id` flows, the ports clause, CIDR, node and learned DNS peers.
pub(crate) fn compile_tier_frame(
    cluster: &Cluster,
    policy: &ClusterPolicy,
    dir: Direction,
    index: usize,
    id: u32,
) -> Vec<FlowEntry> {
    let Some((sh, rule)) = shape(policy, dir, index) else {
        return vec![];
    };
    let mut e = Emit {
        shape: &sh,
        id,
        cookie: cookie_of(id),
        out: Vec::new(),
    };
    if let Some(n) = sh.numeric {
        e.decide(0);
        if sh.fail_closed {
            // Everything of the subject: the peer clause matches anything.
            e.clause(0, 2, 2, Match::any());
            return e.out;
        }
        let (ips, nets) = other_peers(cluster, rule);
        for ip in &ips {
            e.clause(0, 2, n, ip_match(sh.peer_field, *ip));
        }
        for net in &nets {
            e.clause(0, 2, n, net_match(sh.peer_field, *net));
        }
        if n == 3 {
            let mut seen = super::HashSet::default();
            for v6 in [false, true] {
                for p in rule.ports.iter().flatten() {
                    let (start, end) = match p.port {
                        PortRef::Range { start, end } => (start, end),
                        PortRef::Any => (0, u16::MAX),
                        PortRef::Named(_) => continue,
                    };
                    let base = Match::any()
                        .with(Field::DlType, family_type(v6).into())
                        .with(Field::NwProto, p.protocol.ip_proto().into());
                    for (v, mask) in port_masks(start, end) {
                        let m = if mask == 0 {
                            base
                        } else {
                            base.with_masked(Field::TpDst, v.into(), mask.into())
                        };
                        if seen.insert(m) {
                            e.clause(0, 3, n, m);
                        }
                    }
                }
            }
        }
    }
    if sh.named {
        e.decide(1);
    }
    e.out
}

type NsCache = Option<(String, Vec<(bool, smallvec::SmallVec<[bool; 4]>)>)>;

/// Every rule of every ClusterNetworkPolicy with its shape and unit id:
/// what compiling a pod's tier flows reads, built once per change.
pub(crate) struct RuleSet<'a> {
    rules: Vec<(&'a ClusterPolicy, &'a TierRule, Shape, u32)>,
    /// For the last namespace seen: per rule, whether its subject's namespace
    /// selector matches, and whether each peer's namespace selector does.
    ns_cache: std::cell::RefCell<NsCache>,
}

impl<'a> RuleSet<'a> {
    /// `frame` gives a rule's unit id (its frame must be compiled).
    pub(crate) fn new(cluster: &'a Cluster, frame: impl Fn(TierRuleRef) -> Option<u32>) -> Self {
        let mut rules = Vec::new();
        for p in cluster.cluster_policies() {
            for r in rule_refs(p) {
                let (dir, index) = (r.direction, r.index);
                if let (Some((sh, rule)), Some(id)) = (shape(p, dir, index), frame(r)) {
                    rules.push((p, rule, sh, id));
                }
            }
        }
        RuleSet {
            rules,
            ns_cache: std::cell::RefCell::new(None),
        }
    }

    /// One pod's flows in every rule (as subject, pod peer, owner of a named
    /// port: the destination), under unit `unit`, merged: one flow per match
    /// with every rule's conjunction action.
    pub(crate) fn compile_pod(&self, cluster: &Cluster, pod: &Pod, unit: u32) -> Vec<FlowEntry> {
        let mut out = Vec::new();
        if pod.ips.is_empty() {
            return out;
        }
        // What depends on the namespace only, once per namespace (units are
        // compiled in key order: a namespace's pods come together).
        let mut cache = self.ns_cache.borrow_mut();
        if cache
            .as_ref()
            .is_none_or(|(ns, _)| *ns != pod.key.namespace)
        {
            let labels = cluster.namespace_labels(&pod.key.namespace);
            let per_rule = self
                .rules
                .iter()
                .map(|(policy, rule, _, _)| {
                    let peers: smallvec::SmallVec<[bool; 4]> = rule
                        .peers
                        .iter()
                        .map(|p| {
                            matches!(p, TierPeer::Pods { namespaces, .. } if namespaces.matches(&labels))
                        })
                        .collect();
                    (policy.subject.namespaces.matches(&labels), peers)
                })
                .collect();
            *cache = Some((pod.key.namespace.clone(), per_rule));
        }
        let per_rule = &cache.as_ref().expect("filled above").1;
        for ((policy, rule, sh, id), (subject_ns, peer_ns)) in self.rules.iter().zip(per_rule) {
            let subject =
                *subject_ns && policy.subject.pods.matches(&pod.labels) && cluster.is_local(pod);
            let peer = !sh.fail_closed
                && rule.peers.iter().zip(peer_ns).any(|(p, ns_ok)| {
                    *ns_ok && matches!(p, TierPeer::Pods { pods, .. } if pods.matches(&pod.labels))
                });
            if !subject && !peer {
                continue;
            }
            let mut e = Emit {
                shape: sh,
                id: *id,
                cookie: cookie_of(unit),
                out: std::mem::take(&mut out),
            };
            member_flows(&mut e, rule, pod, subject, peer);
            out = e.out;
        }
        // Merge: the actions of one pod's flows are distinct (rules and
        // clauses differ), so no action needs comparing.
        let mut at: super::HashMap<datapath::flow::FlowIdentity, usize> =
            super::HashMap::with_capacity_and_hasher(out.len(), Default::default());
        let mut merged: Vec<FlowEntry> = Vec::with_capacity(out.len());
        for f in out {
            match at.entry(f.identity()) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    merged[*e.get()].actions.extend(f.actions);
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(merged.len());
                    merged.push(f);
                }
            }
        }
        merged
    }
}

fn member_flows(e: &mut Emit<'_>, rule: &TierRule, pod: &Pod, subject: bool, peer: bool) {
    let sh = e.shape;
    let dest = match sh.direction {
        Direction::Ingress => subject,
        Direction::Egress => peer,
    };
    let resolved: BTreeSet<(Protocol, u16)> = if sh.named && dest {
        rule.ports
            .iter()
            .flatten()
            .filter_map(|p| match &p.port {
                PortRef::Named(name) => pod.resolve(name, p.protocol).map(|n| (p.protocol, n)),
                _ => None,
            })
            .collect()
    } else {
        BTreeSet::new()
    };
    for ip in &pod.ips {
        if let Some(n) = sh.numeric {
            if subject {
                e.clause(0, 1, n, ip_match(sh.sel_field, *ip));
            }
            if peer {
                e.clause(0, 2, n, ip_match(sh.peer_field, *ip));
            }
        }
        if sh.named {
            let (dest_field, dest_k, other_k, other_field, other) = match sh.direction {
                Direction::Ingress => (sh.sel_field, 1, 2, sh.peer_field, peer),
                Direction::Egress => (sh.peer_field, 2, 1, sh.sel_field, subject),
            };
            for (proto, port) in &resolved {
                let m = ip_match(dest_field, *ip)
                    .with(Field::NwProto, proto.ip_proto().into())
                    .with(Field::TpDst, (*port).into());
                e.clause(1, dest_k, 2, m);
            }
            if other {
                e.clause(1, other_k, 2, ip_match(other_field, *ip));
            }
        }
    }
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
