//! NetworkPolicy -> flows in tables 40 (egress) and 50 (ingress).
//!
//! Owns the translation and its bookkeeping. The unit of compilation is a *unit*
//! ([`Provenance`]): one rule of one policy, one pod's default deny in one direction,
//! or one node's own-node exemption. Each unit compiles to flows on its own; flows
//! of different units with the same table, priority and match are merged into one
//! (their conjunction actions united), as OVS requires. A change to the cluster
//! recompiles only the units it can affect and yields a [`FlowDiff`].
//!
//! A rule compiles with conjunctive match: clause 1 the selected pods, clause 2 the
//! peers, clause 3 the ports, plus one `conj_id` flow, so flow count is the sum of
//! the three sets. Named ports are resolved per pod, so for them the pod and the
//! port share one clause (a second conjunction of the same rule).
//!
//! Priorities inside a policy table: 400 own-node traffic (allowed), 300 allow
//! rules, 200 default deny of isolated pods, 0 pass (base pipeline).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use datapath::Match;
use datapath::field::{Field, ether_type, ipv4_mapped, ipv4_prefix_mask, ipv6_prefix_mask};
use datapath::flow::{Action, Cookie, FlowEntry, FlowIdentity, TableId};
use ipnet::IpNet;
use smallvec::SmallVec;

use crate::model::{
    Cluster, Direction, Namespace, Node, NsSel, ObjectKey, Peer, Pod, Policy, PortRef, Protocol,
    Rule,
};

pub const EGRESS_TABLE: u8 = 40;
pub const INGRESS_TABLE: u8 = 50;
/// Where traffic goes once egress policy allows it.
pub const AFTER_EGRESS: u8 = INGRESS_TABLE;
/// Where traffic goes once ingress policy allows it.
pub const AFTER_INGRESS: u8 = 60;

pub mod priority {
    pub const NODE_TRAFFIC: u16 = 400;
    pub const ALLOW: u16 = 300;
    pub const DEFAULT_DENY: u16 = 200;
    pub const PASS: u16 = 0;
}

/// Cookie kinds (top byte of the cookie).
const KIND_UNIT: u64 = 0x01 << 56;
/// Cookies of base-pipeline flows (see `pipeline`).
pub const KIND_PIPELINE: u64 = 0x02 << 56;

/// Where a flow came from: what `flowctl` and the metrics name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provenance {
    /// Rule `index` (0-based) of a policy's ingress or egress list.
    Rule {
        policy: ObjectKey,
        direction: Direction,
        index: usize,
    },
    /// A pod selected by some policy for `direction`: what no rule allows is denied.
    DefaultDeny {
        pod: ObjectKey,
        direction: Direction,
    },
    /// Traffic between a node and its own pods, always allowed.
    NodeTraffic { node: String },
    /// A base-pipeline flow (classifier, spoofguard, ...).
    Pipeline(String),
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provenance::Rule {
                policy,
                direction,
                index,
            } => write!(f, "{policy} {direction} rule {index}"),
            Provenance::DefaultDeny { pod, direction } => {
                write!(f, "default deny of {pod} ({direction})")
            }
            Provenance::NodeTraffic { node } => write!(f, "own-node traffic of {node}"),
            Provenance::Pipeline(what) => f.write_str(what),
        }
    }
}

/// What one change did to the flows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlowDiff {
    pub added: Vec<FlowEntry>,
    pub modified: Vec<FlowEntry>,
    pub deleted: Vec<FlowIdentity>,
}

impl FlowDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.modified.is_empty() && self.deleted.is_empty()
    }

    pub fn len(&self) -> usize {
        self.added.len() + self.modified.len() + self.deleted.len()
    }
}

/// One object-level change.
#[derive(Debug, Clone)]
pub enum Change {
    Namespace(Namespace),
    NamespaceDeleted(String),
    Pod(Pod),
    PodDeleted(ObjectKey),
    Node(Node),
    NodeDeleted(String),
    Policy(Policy),
    PolicyDeleted(ObjectKey),
}

#[derive(Debug, Clone)]
struct Contribution {
    unit: u32,
    actions: SmallVec<[Action; 2]>,
}

#[derive(Debug)]
struct UnitState {
    id: u32,
    flows: Vec<FlowIdentity>,
}

/// The policy compiler: holds the cluster model and the flows it compiles to.
#[derive(Debug, Default)]
pub struct Compiler {
    cluster: Cluster,
    units: HashMap<Provenance, UnitState>,
    by_id: Vec<Option<Provenance>>,
    free_ids: Vec<u32>,
    merged: HashMap<FlowIdentity, SmallVec<[Contribution; 1]>>,
}

fn cookie_of(id: u32) -> Cookie {
    Cookie(KIND_UNIT | u64::from(id))
}

/// The conjunction id of part `part` (0 or 1) of unit `id`.
fn conj_id(id: u32, part: u32) -> u32 {
    id * 2 + part + 1
}

/// A half-open dedup of matches (clause contents).
type Clause = Vec<Match>;

fn push_unique(clause: &mut Clause, seen: &mut HashSet<Match>, m: Match) {
    if seen.insert(m) {
        clause.push(m);
    }
}

fn ip_match(field: Field, ip: IpAddr) -> Match {
    match ip {
        IpAddr::V4(a) => Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with(field, ipv4_mapped(a)),
        IpAddr::V6(a) => Match::any()
            .with(Field::DlType, ether_type::IPV6.into())
            .with(field, u128::from(a)),
    }
}

fn net_match(field: Field, net: IpNet) -> Match {
    match net {
        IpNet::V4(n) => Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with_masked(
                field,
                ipv4_mapped(n.network()),
                ipv4_prefix_mask(n.prefix_len()),
            ),
        IpNet::V6(n) => Match::any()
            .with(Field::DlType, ether_type::IPV6.into())
            .with_masked(
                field,
                u128::from(n.network()),
                ipv6_prefix_mask(n.prefix_len()),
            ),
    }
}

fn family_type(v6: bool) -> u16 {
    if v6 {
        ether_type::IPV6
    } else {
        ether_type::IPV4
    }
}

/// `start..=end` as (value, mask) pairs on a 16-bit field.
pub fn port_masks(start: u16, end: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let (mut s, e) = (u32::from(start), u32::from(end));
    while s <= e {
        let mut size: u32 = if s == 0 {
            1 << 16
        } else {
            s & s.wrapping_neg()
        };
        while s + size - 1 > e {
            size >>= 1;
        }
        out.push((s as u16, !(size - 1) as u16));
        s += size;
    }
    out
}

/// `cidr` minus every `except` entry, as disjoint CIDRs.
pub fn subtract(cidr: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    if except.iter().any(|e| e.contains(&cidr)) {
        return vec![];
    }
    if !except.iter().any(|e| cidr.contains(e)) {
        return vec![cidr];
    }
    match cidr.subnets(cidr.prefix_len() + 1) {
        Ok(halves) => halves.flat_map(|h| subtract(h, except)).collect(),
        Err(_) => vec![],
    }
}

/// Resolves selectors, memoizing namespace selector results for one operation.
struct Resolver<'a> {
    cluster: &'a Cluster,
    ns_cache: HashMap<crate::selector::Selector, Vec<String>>,
}

impl<'a> Resolver<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        Resolver {
            cluster,
            ns_cache: HashMap::new(),
        }
    }

    fn namespaces(&mut self, sel: &NsSel, own: &str) -> Vec<String> {
        match sel {
            NsSel::Own => vec![own.to_string()],
            NsSel::Matching(s) => {
                let cluster = self.cluster;
                self.ns_cache
                    .entry(s.clone())
                    .or_insert_with(|| {
                        cluster
                            .namespace_names()
                            .filter(|n| s.matches(&cluster.namespace_labels(n)))
                            .cloned()
                            .collect()
                    })
                    .clone()
            }
        }
    }

    /// Pods matched by the `Pods` peers of a rule.
    fn peer_pods(&mut self, peers: &[Peer], own: &str) -> Vec<&'a Pod> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for p in peers {
            if let Peer::Pods { namespaces, pods } = p {
                for ns in self.namespaces(namespaces, own) {
                    for pod in self.cluster.pods_in(&ns) {
                        if pods.matches(&pod.labels) && seen.insert(&pod.key) {
                            out.push(pod);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Whether a change to `pod` can change what `rule` of a policy in `own_ns` compiles to
/// as a peer or named-port destination.
fn rule_depends_on_pod(
    cluster: &Cluster,
    rule: &Rule,
    dir: Direction,
    own_ns: &str,
    pod: &Pod,
) -> bool {
    let named = rule
        .ports
        .iter()
        .flatten()
        .any(|p| matches!(p.port, PortRef::Named(_)));
    match &rule.peers {
        None => named && dir == Direction::Egress,
        Some(peers) => peers.iter().any(|peer| match peer {
            Peer::Pods { .. } => cluster.peer_matches(peer, own_ns, pod),
            Peer::Block { .. } => {
                named && dir == Direction::Egress && cluster.peer_matches(peer, own_ns, pod)
            }
        }),
    }
}

struct RuleCtx<'p> {
    table: u8,
    next: u8,
    cookie: Cookie,
    id: u32,
    sel_field: Field,
    peer_field: Field,
    policy: &'p Policy,
}

impl RuleCtx<'_> {
    fn allow(&self) -> Action {
        Action::GotoTable(TableId(self.next))
    }

    /// Conjunction `part` over `clauses` (or plain allow flows for one clause).
    fn emit(&self, clauses: Vec<Clause>, part: u32, out: &mut Vec<FlowEntry>) {
        if clauses.iter().any(Vec::is_empty) {
            return;
        }
        let n = clauses.len();
        if n == 1 {
            for m in &clauses[0] {
                out.push(FlowEntry {
                    table: TableId(self.table),
                    priority: priority::ALLOW,
                    matcher: *m,
                    actions: smallvec::smallvec![self.allow()],
                    cookie: self.cookie,
                });
            }
            return;
        }
        let id = conj_id(self.id, part);
        for (k, clause) in clauses.iter().enumerate() {
            for m in clause {
                out.push(FlowEntry {
                    table: TableId(self.table),
                    priority: priority::ALLOW,
                    matcher: *m,
                    actions: smallvec::smallvec![Action::Conjunction {
                        id,
                        clause: k as u8 + 1,
                        n_clauses: n as u8,
                    }],
                    cookie: self.cookie,
                });
            }
        }
        out.push(FlowEntry {
            table: TableId(self.table),
            priority: priority::ALLOW,
            matcher: Match::any().with(Field::ConjId, id.into()),
            actions: smallvec::smallvec![self.allow()],
            cookie: self.cookie,
        });
    }
}

fn compile_rule(
    res: &mut Resolver<'_>,
    ctx: &RuleCtx<'_>,
    rule: &Rule,
    dir: Direction,
) -> Vec<FlowEntry> {
    let cluster = res.cluster;
    let ns = &ctx.policy.key.namespace;
    let selected: Vec<&Pod> = cluster
        .pods_in(ns)
        .filter(|p| !p.ips.is_empty() && ctx.policy.pod_selector.matches(&p.labels))
        .collect();
    if selected.is_empty() {
        return vec![];
    }
    let families: BTreeSet<bool> = selected
        .iter()
        .flat_map(|p| p.ips.iter().map(IpAddr::is_ipv6))
        .collect();
    let in_families = |ip: &IpAddr| families.contains(&ip.is_ipv6());

    let mut sel_clause = Clause::new();
    let mut seen = HashSet::new();
    for p in &selected {
        for ip in &p.ips {
            push_unique(&mut sel_clause, &mut seen, ip_match(ctx.sel_field, *ip));
        }
    }

    // Peers: pods by selector, and CIDRs.
    let (peer_pods, cidrs): (Vec<&Pod>, Vec<IpNet>) = match &rule.peers {
        None => (vec![], vec![]),
        Some(peers) => {
            let pods = res.peer_pods(peers, ns);
            let cidrs = peers
                .iter()
                .filter_map(|p| match p {
                    Peer::Block { cidr, except } => Some(subtract(*cidr, except)),
                    Peer::Pods { .. } => None,
                })
                .flatten()
                .filter(|n| families.contains(&matches!(n, IpNet::V6(_))))
                .collect();
            (pods, cidrs)
        }
    };
    let peer_clause = || {
        let mut clause = Clause::new();
        let mut seen = HashSet::new();
        for p in &peer_pods {
            for ip in p.ips.iter().filter(|ip| in_families(ip)) {
                push_unique(&mut clause, &mut seen, ip_match(ctx.peer_field, *ip));
            }
        }
        for net in &cidrs {
            push_unique(&mut clause, &mut seen, net_match(ctx.peer_field, *net));
        }
        clause
    };

    let mut numeric: Vec<(Protocol, Option<(u16, u16)>)> = Vec::new();
    let mut named: Vec<(Protocol, &str)> = Vec::new();
    for p in rule.ports.iter().flatten() {
        match &p.port {
            PortRef::Any => numeric.push((p.protocol, None)),
            PortRef::Range { start, end } => numeric.push((p.protocol, Some((*start, *end)))),
            PortRef::Named(n) => named.push((p.protocol, n)),
        }
    }

    let mut out = Vec::new();
    if rule.ports.is_none() || !numeric.is_empty() {
        let mut clauses = vec![sel_clause.clone()];
        if rule.peers.is_some() {
            clauses.push(peer_clause());
        }
        if rule.ports.is_some() {
            let mut clause = Clause::new();
            let mut seen = HashSet::new();
            for &v6 in &families {
                for (proto, range) in &numeric {
                    let base = Match::any()
                        .with(Field::DlType, family_type(v6).into())
                        .with(Field::NwProto, proto.ip_proto().into());
                    match range {
                        None => push_unique(&mut clause, &mut seen, base),
                        Some((s, e)) => {
                            for (v, m) in port_masks(*s, *e) {
                                push_unique(
                                    &mut clause,
                                    &mut seen,
                                    base.with_masked(Field::TpDst, v.into(), m.into()),
                                );
                            }
                        }
                    }
                }
            }
            clauses.push(clause);
        }
        ctx.emit(clauses, 0, &mut out);
    }
    if !named.is_empty() {
        // The pod that resolves the name: the destination.
        let (owners, owner_field): (Vec<&Pod>, Field) = match dir {
            Direction::Ingress => (selected.clone(), ctx.sel_field),
            Direction::Egress => {
                let pods = match &rule.peers {
                    None => cluster.pods().collect(),
                    Some(peers) => {
                        let mut pods = peer_pods.clone();
                        let mut keys: HashSet<&ObjectKey> = pods.iter().map(|p| &p.key).collect();
                        for pod in cluster.pods() {
                            let in_block = peers.iter().any(|p| {
                                matches!(p, Peer::Block { .. }) && cluster.peer_matches(p, ns, pod)
                            });
                            if in_block && keys.insert(&pod.key) {
                                pods.push(pod);
                            }
                        }
                        pods
                    }
                };
                (pods, ctx.peer_field)
            }
        };
        let mut combined = Clause::new();
        let mut seen = HashSet::new();
        for pod in owners {
            for (proto, name) in &named {
                if let Some(port) = pod.resolve(name, *proto) {
                    for ip in pod.ips.iter().filter(|ip| in_families(ip)) {
                        let m = ip_match(owner_field, *ip)
                            .with(Field::NwProto, proto.ip_proto().into())
                            .with(Field::TpDst, port.into());
                        push_unique(&mut combined, &mut seen, m);
                    }
                }
            }
        }
        let clauses = match dir {
            Direction::Ingress if rule.peers.is_some() => vec![combined, peer_clause()],
            Direction::Ingress => vec![combined],
            Direction::Egress => vec![sel_clause, combined],
        };
        ctx.emit(clauses, 1, &mut out);
    }
    out
}

/// Compiles one unit.
fn compile_unit(res: &mut Resolver<'_>, unit: &Provenance, id: u32) -> Vec<FlowEntry> {
    let cluster = res.cluster;
    let cookie = cookie_of(id);
    let mut flows = match unit {
        Provenance::Rule {
            policy,
            direction,
            index,
        } => {
            let Some(p) = cluster.policy(policy) else {
                return vec![];
            };
            let Some(rule) = p.rules(*direction).and_then(|r| r.get(*index)) else {
                return vec![];
            };
            let (table, next, sel_field, peer_field) = match direction {
                Direction::Ingress => (INGRESS_TABLE, AFTER_INGRESS, Field::NwDst, Field::NwSrc),
                Direction::Egress => (EGRESS_TABLE, AFTER_EGRESS, Field::NwSrc, Field::NwDst),
            };
            let ctx = RuleCtx {
                table,
                next,
                cookie,
                id,
                sel_field,
                peer_field,
                policy: p,
            };
            compile_rule(res, &ctx, rule, *direction)
        }
        Provenance::DefaultDeny { pod, direction } => {
            let Some(pod) = cluster.pod(pod) else {
                return vec![];
            };
            if !cluster.is_isolated(pod, *direction) {
                return vec![];
            }
            let (table, field) = match direction {
                Direction::Ingress => (INGRESS_TABLE, Field::NwDst),
                Direction::Egress => (EGRESS_TABLE, Field::NwSrc),
            };
            pod.ips
                .iter()
                .map(|ip| FlowEntry {
                    table: TableId(table),
                    priority: priority::DEFAULT_DENY,
                    matcher: ip_match(field, *ip),
                    actions: SmallVec::new(),
                    cookie,
                })
                .collect()
        }
        Provenance::NodeTraffic { node } => {
            let Some(n) = cluster.node(node) else {
                return vec![];
            };
            let pod_ips: Vec<IpAddr> = cluster
                .pods()
                .filter(|p| p.node.as_deref() == Some(node.as_str()))
                .flat_map(|p| p.ips.iter().copied())
                .collect();
            let mut out = Vec::new();
            for (dir, part) in [(Direction::Egress, 0), (Direction::Ingress, 1)] {
                let (table, next, pod_field, node_field) = match dir {
                    Direction::Egress => (EGRESS_TABLE, AFTER_EGRESS, Field::NwSrc, Field::NwDst),
                    Direction::Ingress => {
                        (INGRESS_TABLE, AFTER_INGRESS, Field::NwDst, Field::NwSrc)
                    }
                };
                let id = conj_id(id, part);
                let clauses: [Vec<Match>; 2] = [
                    pod_ips.iter().map(|ip| ip_match(pod_field, *ip)).collect(),
                    n.addresses
                        .iter()
                        .map(|ip| ip_match(node_field, *ip))
                        .collect(),
                ];
                if clauses.iter().any(Vec::is_empty) {
                    continue;
                }
                for (k, clause) in clauses.iter().enumerate() {
                    for m in clause {
                        out.push(FlowEntry {
                            table: TableId(table),
                            priority: priority::NODE_TRAFFIC,
                            matcher: *m,
                            actions: smallvec::smallvec![Action::Conjunction {
                                id,
                                clause: k as u8 + 1,
                                n_clauses: 2
                            }],
                            cookie,
                        });
                    }
                }
                out.push(FlowEntry {
                    table: TableId(table),
                    priority: priority::NODE_TRAFFIC,
                    matcher: Match::any().with(Field::ConjId, id.into()),
                    actions: smallvec::smallvec![Action::GotoTable(TableId(next))],
                    cookie,
                });
            }
            out
        }
        Provenance::Pipeline(_) => vec![],
    };
    merge_within(&mut flows);
    flows
}

/// Merges flows of one unit that share an identity (their conjunction actions).
fn merge_within(flows: &mut Vec<FlowEntry>) {
    let mut at: HashMap<FlowIdentity, usize> = HashMap::with_capacity(flows.len());
    let mut out: Vec<FlowEntry> = Vec::with_capacity(flows.len());
    for f in flows.drain(..) {
        match at.get(&f.identity()) {
            Some(&i) => {
                let existing = &mut out[i];
                let hard = |e: &FlowEntry| !e.is_conjunctive();
                if hard(existing) {
                    continue;
                }
                if hard(&f) {
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

fn sort_actions(actions: &mut SmallVec<[Action; 2]>) {
    actions.sort_by_key(|a| match a {
        Action::Conjunction { id, clause, .. } => (*id, *clause),
        _ => (0, 0),
    });
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// Compiles a whole cluster.
    pub fn from_cluster(cluster: Cluster) -> Compiler {
        let mut c = Compiler {
            cluster,
            ..Compiler::default()
        };
        let units = c.all_units();
        c.recompile(units, None);
        c
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Number of merged flows.
    pub fn len(&self) -> usize {
        self.merged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.merged.is_empty()
    }

    /// Where a cookie came from.
    pub fn provenance(&self, cookie: Cookie) -> Option<&Provenance> {
        if cookie.0 & (0xff << 56) != KIND_UNIT {
            return None;
        }
        self.by_id.get((cookie.0 & 0xffff_ffff) as usize)?.as_ref()
    }

    /// The unit that owns conjunction `conj_id`, and which of its parts it is.
    pub fn conjunction_owner(&self, conj_id: u32) -> Option<(&Provenance, u32)> {
        let n = conj_id.checked_sub(1)?;
        let unit = self.by_id.get((n / 2) as usize)?.as_ref()?;
        Some((unit, n % 2))
    }

    /// The cookie of a unit, if it has flows.
    pub fn cookie(&self, unit: &Provenance) -> Option<Cookie> {
        self.units.get(unit).map(|u| cookie_of(u.id))
    }

    fn all_units(&self) -> Vec<Provenance> {
        let mut units = Vec::new();
        for p in self.cluster.policies() {
            for dir in [Direction::Ingress, Direction::Egress] {
                for index in 0..p.rules(dir).map_or(0, <[Rule]>::len) {
                    units.push(Provenance::Rule {
                        policy: p.key.clone(),
                        direction: dir,
                        index,
                    });
                }
            }
        }
        for pod in self.cluster.pods() {
            for dir in [Direction::Ingress, Direction::Egress] {
                units.push(Provenance::DefaultDeny {
                    pod: pod.key.clone(),
                    direction: dir,
                });
            }
        }
        for n in self.cluster.nodes() {
            units.push(Provenance::NodeTraffic {
                node: n.name.clone(),
            });
        }
        units
    }

    fn alloc(&mut self, unit: &Provenance) -> u32 {
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
        id
    }

    /// Every flow, merged, sorted by table and priority.
    pub fn flows(&self) -> Vec<FlowEntry> {
        let mut out: Vec<FlowEntry> = self
            .merged
            .iter()
            .filter_map(|(identity, contrib)| self.materialize(identity, contrib))
            .collect();
        out.sort_by(|a, b| {
            (a.table, std::cmp::Reverse(a.priority), a.to_string()).cmp(&(
                b.table,
                std::cmp::Reverse(b.priority),
                b.to_string(),
            ))
        });
        out
    }

    fn materialize(&self, identity: &FlowIdentity, contrib: &[Contribution]) -> Option<FlowEntry> {
        let prov = |c: &Contribution| self.by_id[c.unit as usize].as_ref();
        let hard = contrib
            .iter()
            .filter(|c| {
                !c.actions
                    .iter()
                    .any(|a| matches!(a, Action::Conjunction { .. }))
            })
            .min_by(|a, b| prov(a).cmp(&prov(b)));
        let first = contrib.iter().min_by(|a, b| prov(a).cmp(&prov(b)))?;
        let (actions, unit) = match hard {
            Some(h) => (h.actions.clone(), h.unit),
            None => {
                let mut actions: SmallVec<[Action; 2]> = SmallVec::new();
                for c in contrib {
                    for a in &c.actions {
                        if !actions.contains(a) {
                            actions.push(a.clone());
                        }
                    }
                }
                sort_actions(&mut actions);
                (actions, first.unit)
            }
        };
        Some(FlowEntry {
            table: identity.table,
            priority: identity.priority,
            matcher: identity.matcher,
            actions,
            cookie: cookie_of(unit),
        })
    }

    fn install_unit(
        &mut self,
        unit: Provenance,
        id: u32,
        flows: Vec<FlowEntry>,
        mut diff: Option<&mut DiffBuilder>,
    ) {
        let old = self
            .units
            .remove(&unit)
            .map(|u| u.flows)
            .unwrap_or_default();
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
        if flows.is_empty() {
            self.by_id[id as usize] = None;
            self.free_ids.push(id);
            return;
        }
        let mut identities = Vec::with_capacity(flows.len());
        for f in flows {
            let identity = f.identity();
            if let Some(d) = diff.as_deref_mut() {
                d.touch(self, &identity);
            }
            self.merged.entry(identity).or_default().push(Contribution {
                unit: id,
                actions: f.actions,
            });
            identities.push(identity);
        }
        self.units.insert(
            unit,
            UnitState {
                id,
                flows: identities,
            },
        );
    }

    /// Recompiles `units`, recording what changed in `diff` when given.
    fn recompile(
        &mut self,
        units: impl IntoIterator<Item = Provenance>,
        mut diff: Option<&mut DiffBuilder>,
    ) {
        let ids: Vec<(Provenance, u32)> = units
            .into_iter()
            .map(|u| {
                let id = self.alloc(&u);
                (u, id)
            })
            .collect();
        let mut work = Vec::with_capacity(ids.len());
        {
            let mut res = Resolver::new(&self.cluster);
            for (u, id) in ids {
                let flows = compile_unit(&mut res, &u, id);
                work.push((u, id, flows));
            }
        }
        for (u, id, flows) in work {
            self.install_unit(u, id, flows, diff.as_deref_mut());
        }
    }

    fn rule_units(p: &Policy) -> impl Iterator<Item = Provenance> + '_ {
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .flat_map(move |dir| {
                (0..p.rules(dir).map_or(0, <[Rule]>::len)).map(move |index| Provenance::Rule {
                    policy: p.key.clone(),
                    direction: dir,
                    index,
                })
            })
    }

    /// Applies one change to the cluster and returns the resulting flow diff.
    pub fn apply(&mut self, change: Change) -> FlowDiff {
        let mut units = BTreeSet::new();
        match change {
            Change::Pod(pod) => {
                let old = self.cluster.upsert_pod(pod.clone());
                self.pod_units(old.as_ref(), Some(&pod), &mut units);
            }
            Change::PodDeleted(key) => {
                let old = self.cluster.remove_pod(&key);
                self.pod_units(old.as_ref(), None, &mut units);
            }
            Change::Namespace(ns) => {
                let name = ns.name.clone();
                let before = self.cluster.namespace_labels(&name);
                self.cluster.upsert_namespace(ns);
                self.namespace_units(&name, &before, &mut units);
            }
            Change::NamespaceDeleted(name) => {
                let before = self.cluster.namespace_labels(&name);
                self.cluster.remove_namespace(&name);
                self.namespace_units(&name, &before, &mut units);
            }
            Change::Node(node) => {
                units.insert(Provenance::NodeTraffic {
                    node: node.name.clone(),
                });
                self.cluster.upsert_node(node);
            }
            Change::NodeDeleted(name) => {
                self.cluster.remove_node(&name);
                units.insert(Provenance::NodeTraffic { node: name });
            }
            Change::Policy(p) => {
                let key = p.key.clone();
                if let Some(old) = self.cluster.upsert_policy(p) {
                    units.extend(Self::rule_units(&old));
                }
                self.policy_units(&key, &mut units);
            }
            Change::PolicyDeleted(key) => {
                if let Some(old) = self.cluster.remove_policy(&key) {
                    units.extend(Self::rule_units(&old));
                }
                self.policy_units(&key, &mut units);
            }
        }
        let mut diff = DiffBuilder::default();
        self.recompile(units, Some(&mut diff));
        diff.finish(self)
    }

    fn policy_units(&self, key: &ObjectKey, units: &mut BTreeSet<Provenance>) {
        if let Some(p) = self.cluster.policy(key) {
            units.extend(Self::rule_units(p));
        }
        for pod in self.cluster.pods_in(&key.namespace) {
            for dir in [Direction::Ingress, Direction::Egress] {
                units.insert(Provenance::DefaultDeny {
                    pod: pod.key.clone(),
                    direction: dir,
                });
            }
        }
    }

    fn pod_units(&self, old: Option<&Pod>, new: Option<&Pod>, units: &mut BTreeSet<Provenance>) {
        let versions: Vec<&Pod> = old.into_iter().chain(new).collect();
        for pod in &versions {
            for dir in [Direction::Ingress, Direction::Egress] {
                units.insert(Provenance::DefaultDeny {
                    pod: pod.key.clone(),
                    direction: dir,
                });
            }
            if let Some(node) = &pod.node {
                units.insert(Provenance::NodeTraffic { node: node.clone() });
            }
        }
        for p in self.cluster.policies() {
            let selects = versions.iter().any(|pod| self.cluster.selects(p, pod));
            for dir in [Direction::Ingress, Direction::Egress] {
                for (index, rule) in p.rules(dir).into_iter().flatten().enumerate() {
                    let depends = selects
                        || versions.iter().any(|pod| {
                            rule_depends_on_pod(&self.cluster, rule, dir, &p.key.namespace, pod)
                        });
                    if depends {
                        units.insert(Provenance::Rule {
                            policy: p.key.clone(),
                            direction: dir,
                            index,
                        });
                    }
                }
            }
        }
    }

    fn namespace_units(
        &self,
        name: &str,
        before: &crate::selector::Labels,
        units: &mut BTreeSet<Provenance>,
    ) {
        let after = self.cluster.namespace_labels(name);
        for p in self.cluster.policies() {
            for dir in [Direction::Ingress, Direction::Egress] {
                for (index, rule) in p.rules(dir).into_iter().flatten().enumerate() {
                    let affected = rule.peers.iter().flatten().any(|peer| match peer {
                        Peer::Pods {
                            namespaces: NsSel::Matching(s),
                            ..
                        } => s.matches(before) || s.matches(&after),
                        _ => false,
                    });
                    if affected {
                        units.insert(Provenance::Rule {
                            policy: p.key.clone(),
                            direction: dir,
                            index,
                        });
                    }
                }
            }
        }
    }

    /// The flow currently installed for `identity`.
    pub fn flow(&self, identity: &FlowIdentity) -> Option<FlowEntry> {
        self.merged
            .get(identity)
            .and_then(|c| self.materialize(identity, c))
    }
}

/// Records the merged flow of each identity before a change touches it.
#[derive(Default)]
struct DiffBuilder {
    before: HashMap<FlowIdentity, Option<FlowEntry>>,
}

impl DiffBuilder {
    fn touch(&mut self, c: &Compiler, identity: &FlowIdentity) {
        if !self.before.contains_key(identity) {
            self.before.insert(*identity, c.flow(identity));
        }
    }

    fn finish(self, c: &Compiler) -> FlowDiff {
        let mut diff = FlowDiff::default();
        for (identity, before) in self.before {
            match (before, c.flow(&identity)) {
                (None, Some(after)) => diff.added.push(after),
                (Some(_), None) => diff.deleted.push(identity),
                (Some(b), Some(a)) if a != b => diff.modified.push(a),
                _ => {}
            }
        }
        diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_masks() {
        assert_eq!(port_masks(80, 80), vec![(80, 0xffff)]);
        assert_eq!(port_masks(0, 65535), vec![(0, 0)]);
        let m = port_masks(1000, 2000);
        for p in 0..=u16::MAX {
            let hit = m.iter().any(|(v, mask)| p & mask == *v);
            assert_eq!(hit, (1000..=2000).contains(&p), "port {p}");
        }
        assert!(m.len() <= 30);
    }

    #[test]
    fn cidr_minus_except() {
        let c: IpNet = "172.17.0.0/16".parse().unwrap();
        let e: IpNet = "172.17.1.0/24".parse().unwrap();
        let parts = subtract(c, &[e]);
        assert_eq!(parts.len(), 8);
        let inside = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            parts.iter().any(|p| p.contains(&ip))
        };
        assert!(inside("172.17.0.1"));
        assert!(!inside("172.17.1.5"));
        assert!(inside("172.17.2.5"));
        assert!(inside("172.17.255.255"));
        assert!(subtract(c, &[c]).is_empty());
    }
}
