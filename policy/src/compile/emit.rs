//! Emission: the flows of a group, a default deny, or a node's own traffic.
//!
//! Owns what flows each unit compiles to: the conjunctive clauses of a group
//! (selected pods, peers, ports, one `conj_id` flow per part), the default-deny
//! drops of an isolated pod, and the own-node allowances. Pure functions of
//! the group's membership and the cluster; no bookkeeping.

use std::net::IpAddr;

use datapath::Match;
use datapath::field::Field;
use datapath::flow::{Action, Cookie, FlowEntry, FlowIdentity, TableId};
use ipnet::IpNet;
use smallvec::SmallVec;

use super::groups::{CanonPeer, Flags, GroupInfo, GroupKey, resolved_ports};
use super::matches::{family_type, ip_match, net_match, port_masks, subtract};
use super::{HashMap, HashSet};
use crate::cluster::Cluster;
use crate::cookie::CookieKind;
use crate::model::{Direction, ObjectKey, Pod, PortRef};
use crate::tables::{AFTER_EGRESS, AFTER_INGRESS, EGRESS_NP, INGRESS_NP, priority};

/// The cookie of unit `id`.
pub(crate) fn cookie_of(id: u32) -> Cookie {
    CookieKind::Unit.cookie(u64::from(id))
}

/// The conjunction id of part `part` (0 or 1) of unit `id`.
pub(crate) fn conj_id(id: u32, part: u32) -> u32 {
    id * 2 + part + 1
}
/// The shape of a group: for each part, whether it emits and how many clauses.
pub(crate) struct Shape {
    pub(crate) table: u8,
    pub(crate) next: u8,
    pub(crate) sel_field: Field,
    pub(crate) peer_field: Field,
    /// Part 0 (numeric or any ports): clause count, if it emits.
    pub(crate) numeric: Option<u8>,
    /// Part 1 (named ports): clause count, if it emits.
    pub(crate) named: Option<u8>,
}

pub(crate) fn shape(g: &GroupKey, f: Flags) -> Shape {
    let (table, next, sel_field, peer_field) = match g.direction {
        Direction::Ingress => (INGRESS_NP, AFTER_INGRESS, Field::NwDst, Field::NwSrc),
        Direction::Egress => (EGRESS_NP, AFTER_EGRESS, Field::NwSrc, Field::NwDst),
    };
    let has_numeric = g
        .ports
        .iter()
        .flatten()
        .any(|p| !matches!(p.port, PortRef::Named(_)));
    let peers_ok = g.peers.is_none() || f.peers;
    let numeric = (g.ports.is_none() || has_numeric) && f.selected && peers_ok;
    let numeric = numeric.then(|| 1 + u8::from(g.peers.is_some()) + u8::from(g.ports.is_some()));
    let named = g.has_named_ports()
        && f.owners
        && match g.direction {
            Direction::Ingress => peers_ok,
            Direction::Egress => f.selected,
        };
    let named = named.then(|| match g.direction {
        Direction::Ingress => 1 + u8::from(g.peers.is_some()),
        Direction::Egress => 2,
    });
    Shape {
        table,
        next,
        sel_field,
        peer_field,
        numeric,
        named,
    }
}

/// Builds one group's flows, all under the group's cookie.
pub(crate) struct Emitter<'a> {
    pub(crate) shape: &'a Shape,
    pub(crate) id: u32,
    pub(crate) out: Vec<FlowEntry>,
}

impl Emitter<'_> {
    /// A clause flow of `part` with `n` clauses: a plain allow when the part has
    /// a single clause.
    pub(crate) fn clause(&mut self, part: u32, k: u8, n: u8, m: Match) {
        let action = if n == 1 {
            Action::GotoTable(TableId(self.shape.next))
        } else {
            Action::Conjunction {
                id: conj_id(self.id, part),
                clause: k,
                n_clauses: n,
            }
        };
        self.push(m, action);
    }

    pub(crate) fn push(&mut self, matcher: Match, action: Action) {
        self.out.push(FlowEntry {
            table: TableId(self.shape.table),
            priority: priority::ALLOW,
            matcher,
            actions: smallvec::smallvec![action],
            cookie: cookie_of(self.id),
        });
    }
}

/// The flows a group has independently of any pod: conj_id flows, the ports
/// clause and the CIDR part of the peer clause.
pub(crate) fn compile_frame(g: &GroupKey, info: &GroupInfo) -> Vec<FlowEntry> {
    let flags = info.flags(g);
    let sh = shape(g, flags);
    let families: Vec<bool> = [(false, flags.v4), (true, flags.v6)]
        .into_iter()
        .filter_map(|(v6, on)| on.then_some(v6))
        .collect();
    let mut e = Emitter {
        shape: &sh,
        id: info.id,
        out: Vec::new(),
    };
    let cidrs: Vec<IpNet> = g
        .peers
        .iter()
        .flatten()
        .filter_map(|p| match p {
            CanonPeer::Block { cidr, except } => Some(subtract(*cidr, except)),
            CanonPeer::Pods { .. } => None,
        })
        .flatten()
        .filter(|n| families.contains(&matches!(n, IpNet::V6(_))))
        .collect();
    if let Some(n) = sh.numeric {
        if g.peers.is_some() {
            for net in &cidrs {
                e.clause(0, 2, n, net_match(sh.peer_field, *net));
            }
        }
        let mut seen = HashSet::default();
        for &v6 in &families {
            for p in g.ports.iter().flatten() {
                let base = Match::any()
                    .with(Field::DlType, family_type(v6).into())
                    .with(Field::NwProto, p.protocol.ip_proto().into());
                let ms: Vec<Match> = match &p.port {
                    PortRef::Any => vec![base],
                    PortRef::Range { start, end } => port_masks(*start, *end)
                        .into_iter()
                        .map(|(v, m)| base.with_masked(Field::TpDst, v.into(), m.into()))
                        .collect(),
                    PortRef::Named(_) => vec![],
                };
                for m in ms {
                    if seen.insert(m) {
                        e.clause(0, n, n, m);
                    }
                }
            }
        }
        if n > 1 {
            e.push(
                Match::any().with(Field::ConjId, conj_id(info.id, 0).into()),
                Action::GotoTable(TableId(sh.next)),
            );
        }
    }
    if let Some(n) = sh.named {
        if g.direction == Direction::Ingress && g.peers.is_some() {
            for net in &cidrs {
                e.clause(1, 2, n, net_match(sh.peer_field, *net));
            }
        }
        if n > 1 {
            e.push(
                Match::any().with(Field::ConjId, conj_id(info.id, 1).into()),
                Action::GotoTable(TableId(sh.next)),
            );
        }
    }
    e.out
}

/// The flows one pod contributes to a group.
pub(crate) fn compile_member(g: &GroupKey, info: &GroupInfo, pod: &Pod) -> Vec<FlowEntry> {
    let sh = shape(g, info.flags(g));
    let r = info.roles_of(&pod.key);
    let mut e = Emitter {
        shape: &sh,
        id: info.id,
        out: Vec::new(),
    };
    let ports = if r.owner {
        resolved_ports(g, pod)
    } else {
        vec![]
    };
    for ip in &pod.ips {
        if let Some(n) = sh.numeric {
            if r.selected {
                e.clause(0, 1, n, ip_match(sh.sel_field, *ip));
            }
            if r.peer {
                e.clause(0, 2, n, ip_match(sh.peer_field, *ip));
            }
        }
        if let Some(n) = sh.named {
            let combined = |field| {
                ports.iter().map(move |(proto, port)| {
                    ip_match(field, *ip)
                        .with(Field::NwProto, proto.ip_proto().into())
                        .with(Field::TpDst, (*port).into())
                })
            };
            match g.direction {
                Direction::Ingress => {
                    for m in combined(sh.sel_field) {
                        e.clause(1, 1, n, m);
                    }
                    if r.peer && g.peers.is_some() {
                        e.clause(1, 2, n, ip_match(sh.peer_field, *ip));
                    }
                }
                Direction::Egress => {
                    if r.selected {
                        e.clause(1, 1, n, ip_match(sh.sel_field, *ip));
                    }
                    for m in combined(sh.peer_field) {
                        e.clause(1, 2, n, m);
                    }
                }
            }
        }
    }
    e.out
}

pub(crate) fn compile_deny(
    cluster: &Cluster,
    pod: &ObjectKey,
    direction: Direction,
    id: u32,
) -> Vec<FlowEntry> {
    let Some(pod) = cluster.pod(pod) else {
        return vec![];
    };
    if !cluster.is_local(pod) || !cluster.is_isolated(pod, direction) {
        return vec![];
    }
    let (table, field) = match direction {
        Direction::Ingress => (INGRESS_NP, Field::NwDst),
        Direction::Egress => (EGRESS_NP, Field::NwSrc),
    };
    pod.ips
        .iter()
        .map(|ip| FlowEntry {
            table: TableId(table),
            priority: priority::DEFAULT_DENY,
            matcher: ip_match(field, *ip),
            actions: SmallVec::new(),
            cookie: cookie_of(id),
        })
        .collect()
}

/// Own-node traffic: a pod a NetworkPolicy isolates may always talk to and
/// from its node (kubelet probes). Only isolated pods: for the others the
/// NetworkPolicy tier decides nothing, and the Baseline tier does.
pub(crate) fn compile_node(cluster: &Cluster, node: &str, id: u32) -> Vec<FlowEntry> {
    let Some(n) = cluster.node(node) else {
        return vec![];
    };
    if n.addresses.is_empty() || cluster.scope().is_some_and(|here| here != node) {
        return vec![];
    }
    let mut out = Vec::new();
    for (dir, part) in [(Direction::Egress, 0), (Direction::Ingress, 1)] {
        let pod_ips: Vec<IpAddr> = cluster
            .pods()
            .filter(|p| p.node.as_deref() == Some(node) && cluster.is_isolated(p, dir))
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        if pod_ips.is_empty() {
            continue;
        }
        let (table, next, pod_field, node_field) = match dir {
            Direction::Egress => (EGRESS_NP, AFTER_EGRESS, Field::NwSrc, Field::NwDst),
            Direction::Ingress => (INGRESS_NP, AFTER_INGRESS, Field::NwDst, Field::NwSrc),
        };
        let id = conj_id(id, part);
        let flow = |matcher, action| FlowEntry {
            table: TableId(table),
            priority: priority::NODE_TRAFFIC,
            matcher,
            actions: smallvec::smallvec![action],
            cookie: cookie_of((id - 1) / 2),
        };
        for (k, (ips, field)) in [(&pod_ips, pod_field), (&n.addresses, node_field)]
            .into_iter()
            .enumerate()
        {
            for ip in ips {
                out.push(flow(
                    ip_match(field, *ip),
                    Action::Conjunction {
                        id,
                        clause: k as u8 + 1,
                        n_clauses: 2,
                    },
                ));
            }
        }
        out.push(flow(
            Match::any().with(Field::ConjId, id.into()),
            Action::GotoTable(TableId(next)),
        ));
    }
    out
}

/// Merges flows of one unit that share an identity (their conjunction actions).
pub(crate) fn merge_within(flows: &mut Vec<FlowEntry>) {
    let mut at: HashMap<FlowIdentity, usize> =
        HashMap::with_capacity_and_hasher(flows.len(), Default::default());
    let mut out: Vec<FlowEntry> = Vec::with_capacity(flows.len());
    for f in flows.drain(..) {
        match at.get(&f.identity()) {
            Some(&i) => {
                let existing = &mut out[i];
                if !existing.is_conjunctive() {
                    continue;
                }
                if !f.is_conjunctive() {
                    *existing = f;
                    continue;
                }
                for a in f.actions {
                    if !existing.actions.contains(&a) {
                        existing.actions.push(a);
                    }
                }
            }
            None => {
                at.insert(f.identity(), out.len());
                out.push(f);
            }
        }
    }
    *flows = out;
}

pub(crate) fn conj_key(a: &Action) -> (u32, u8) {
    match a {
        Action::Conjunction { id, clause, .. } => (*id, *clause),
        _ => (0, 0),
    }
}
