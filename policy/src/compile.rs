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

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use datapath::Match;
use datapath::field::{Field, ether_type, ipv4_mapped, ipv4_prefix_mask, ipv6_prefix_mask};
use datapath::flow::{Action, Cookie, FlowEntry, FlowIdentity, TableId};
use ipnet::IpNet;
use smallvec::SmallVec;

/// Hash maps of the compiler: foldhash (keys are large; SipHash dominated profiles).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use crate::model::{
    Cluster, Direction, Namespace, Node, NsSel, ObjectKey, Peer, Pod, Policy, PortRef, PortSpec,
    Protocol, Rule,
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
/// Cookies of flows an operator added by hand (`flowctl add-flow`).
pub const KIND_MANUAL: u64 = 0x03 << 56;

/// Whether a flow was added by hand rather than compiled.
pub fn is_manual(cookie: Cookie) -> bool {
    cookie.0 & (0xff << 56) == KIND_MANUAL
}

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

impl Change {
    /// `kind name` of the object changed, for logs.
    pub fn describe(&self) -> String {
        match self {
            Change::Namespace(n) => format!("namespace {}", n.name),
            Change::NamespaceDeleted(n) => format!("namespace {n} deleted"),
            Change::Pod(p) => format!("pod {}", p.key),
            Change::PodDeleted(k) => format!("pod {k} deleted"),
            Change::Node(n) => format!("node {}", n.name),
            Change::NodeDeleted(n) => format!("node {n} deleted"),
            Change::Policy(p) => format!("networkpolicy {}", p.key),
            Change::PolicyDeleted(k) => format!("networkpolicy {k} deleted"),
        }
    }
}

/// A rule of a policy: (policy, direction, index).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjectKey,
    pub direction: Direction,
    pub index: usize,
}

impl RuleRef {
    pub fn provenance(&self) -> Provenance {
        Provenance::Rule {
            policy: self.policy.clone(),
            direction: self.direction,
            index: self.index,
        }
    }
}

/// Which namespaces a peer's pods come from, with "own namespace" resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CanonNs {
    Named(String),
    Matching(crate::selector::Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CanonPeer {
    Pods {
        namespaces: CanonNs,
        pods: crate::selector::Selector,
    },
    Block {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// What rules with the same meaning share: direction, peers and ports. Rules only
/// allow and are unioned, so all rules of a group compile to one conjunction whose
/// selected clause is the union of their selected pods.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    direction: Direction,
    peers: Option<Vec<CanonPeer>>,
    ports: Option<Vec<PortSpec>>,
    /// Hash of the fields above, computed once: group keys are hashed on every
    /// unit lookup.
    hash: u64,
}

impl Hash for GroupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl GroupKey {
    fn of(policy: &Policy, direction: Direction, rule: &Rule) -> GroupKey {
        let peers = rule.peers.as_ref().map(|peers| {
            let mut v: Vec<CanonPeer> = peers
                .iter()
                .map(|p| match p {
                    Peer::Pods { namespaces, pods } => CanonPeer::Pods {
                        namespaces: match namespaces {
                            NsSel::Own => CanonNs::Named(policy.key.namespace.clone()),
                            NsSel::Matching(s) => CanonNs::Matching(s.clone()),
                        },
                        pods: pods.clone(),
                    },
                    Peer::Block { cidr, except } => {
                        let mut except = except.clone();
                        except.sort();
                        except.dedup();
                        CanonPeer::Block {
                            cidr: *cidr,
                            except,
                        }
                    }
                })
                .collect();
            v.sort();
            v.dedup();
            v
        });
        let ports = rule.ports.as_ref().map(|ports| {
            let mut v = ports.clone();
            v.sort();
            v.dedup();
            v
        });
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (direction, &peers, &ports).hash(&mut h);
        GroupKey {
            direction,
            peers,
            ports,
            hash: h.finish(),
        }
    }

    fn has_named_ports(&self) -> bool {
        self.ports
            .iter()
            .flatten()
            .any(|p| matches!(p.port, PortRef::Named(_)))
    }
}

fn cookie_of(id: u32) -> Cookie {
    Cookie(KIND_UNIT | u64::from(id))
}

/// The conjunction id of part `part` (0 or 1) of unit `id`.
fn conj_id(id: u32, part: u32) -> u32 {
    id * 2 + part + 1
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

/// Matches `field` (an address) within `net`, with the right EtherType.
pub(crate) fn net_match(field: Field, net: IpNet) -> Match {
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

fn ns_matches(cluster: &Cluster, ns: &CanonNs, name: &str) -> bool {
    match ns {
        CanonNs::Named(n) => n == name,
        CanonNs::Matching(s) => match cluster.namespace(name) {
            Some(declared) => s.matches(&declared.labels),
            None => s.matches(&Namespace::implicit(name).labels),
        },
    }
}

fn in_block(pod: &Pod, cidr: &IpNet, except: &[IpNet]) -> bool {
    pod.ips
        .iter()
        .any(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)))
}

/// Resolves selectors, memoizing namespace selector results for one operation.
struct Resolver<'a> {
    cluster: &'a Cluster,
    ns_cache: HashMap<crate::selector::Selector, Arc<Vec<String>>>,
}

impl<'a> Resolver<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        Resolver {
            cluster,
            ns_cache: HashMap::default(),
        }
    }

    fn namespaces(&mut self, ns: &CanonNs) -> Arc<Vec<String>> {
        match ns {
            CanonNs::Named(n) => Arc::new(vec![n.clone()]),
            CanonNs::Matching(s) => {
                let cluster = self.cluster;
                self.ns_cache
                    .entry(s.clone())
                    .or_insert_with(|| {
                        Arc::new(
                            cluster
                                .namespace_names()
                                .filter(|n| ns_matches(cluster, ns, n))
                                .cloned()
                                .collect(),
                        )
                    })
                    .clone()
            }
        }
    }

    /// Pods matched by the pod peers of a group.
    fn peer_pods(&mut self, peers: &[CanonPeer]) -> Vec<&'a Pod> {
        let mut seen = HashSet::default();
        let mut out = Vec::new();
        for p in peers {
            if let CanonPeer::Pods { namespaces, pods } = p {
                for ns in self.namespaces(namespaces).iter() {
                    for pod in self.cluster.pods_in(ns) {
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

/// Whether a pod is one of a group's pod peers.
fn is_peer(cluster: &Cluster, g: &GroupKey, pod: &Pod) -> bool {
    g.peers.iter().flatten().any(|peer| match peer {
        CanonPeer::Pods { namespaces, pods } => {
            pods.matches(&pod.labels) && ns_matches(cluster, namespaces, &pod.key.namespace)
        }
        CanonPeer::Block { .. } => false,
    })
}

/// The named ports of a group, resolved on `pod`: (protocol, port).
fn resolved_ports(g: &GroupKey, pod: &Pod) -> Vec<(Protocol, u16)> {
    let mut out: Vec<(Protocol, u16)> = g
        .ports
        .iter()
        .flatten()
        .filter_map(|p| match &p.port {
            PortRef::Named(name) => pod.resolve(name, p.protocol).map(|port| (p.protocol, port)),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The roles a pod plays in a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Roles {
    /// A member rule's policy selects it.
    selected: bool,
    /// Selected and has an IPv4 / IPv6 address (decides the families of the
    /// group's ports clause).
    selected_v4: bool,
    selected_v6: bool,
    /// It is one of the group's pod peers.
    peer: bool,
    /// It resolves one of the group's named ports as the destination.
    owner: bool,
}

impl Roles {
    fn any(self) -> bool {
        self.selected || self.peer || self.owner
    }
}

/// Computes a pod's roles in a group from the cluster. `selected` is given: it
/// depends on the member policies, which the caller knows.
fn roles(cluster: &Cluster, g: &GroupKey, pod: &Pod, selected: bool) -> Roles {
    if pod.ips.is_empty() {
        return Roles::default();
    }
    let peer = is_peer(cluster, g, pod);
    let selected_v4 = selected && pod.ips.iter().any(IpAddr::is_ipv4);
    let selected_v6 = selected && pod.ips.iter().any(IpAddr::is_ipv6);
    let owner = g.has_named_ports() && match g.direction {
        Direction::Ingress => selected,
        Direction::Egress => match &g.peers {
            None => true,
            Some(peers) => peer || peers.iter().any(
                |p| matches!(p, CanonPeer::Block { cidr, except } if in_block(pod, cidr, except)),
            ),
        },
    } && !resolved_ports(g, pod).is_empty();
    Roles {
        selected,
        selected_v4,
        selected_v6,
        peer,
        owner,
    }
}

/// A group's live membership, and the frame's unit id (its cookie and
/// conjunction ids).
#[derive(Debug, Clone, Default)]
struct GroupInfo {
    id: u32,
    rules: BTreeSet<RuleRef>,
    selected: BTreeSet<ObjectKey>,
    selected_v4: BTreeSet<ObjectKey>,
    selected_v6: BTreeSet<ObjectKey>,
    peers: BTreeSet<ObjectKey>,
    owners: BTreeSet<ObjectKey>,
}

/// What decides which parts of a group emit flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flags {
    selected: bool,
    v4: bool,
    v6: bool,
    peers: bool,
    owners: bool,
}

impl GroupInfo {
    fn flags(&self, g: &GroupKey) -> Flags {
        self.flags_where(g, |set, _| !set.is_empty())
    }

    /// The flags once `pod` has roles `r`, without changing anything.
    fn flags_after(&self, g: &GroupKey, pod: &ObjectKey, r: Roles) -> Flags {
        let has = [r.selected, r.selected_v4, r.selected_v6, r.peer, r.owner];
        self.flags_where(g, |set, i| {
            set.len() > usize::from(set.contains(pod)) || has[i]
        })
    }

    /// Flags from a non-emptiness test on each set (selected, v4, v6, peers,
    /// owners, in that order).
    fn flags_where(
        &self,
        g: &GroupKey,
        nonempty: impl Fn(&BTreeSet<ObjectKey>, usize) -> bool,
    ) -> Flags {
        let cidrs = g
            .peers
            .iter()
            .flatten()
            .any(|p| matches!(p, CanonPeer::Block { .. }));
        Flags {
            selected: nonempty(&self.selected, 0),
            v4: nonempty(&self.selected_v4, 1),
            v6: nonempty(&self.selected_v6, 2),
            peers: cidrs || nonempty(&self.peers, 3),
            owners: nonempty(&self.owners, 4),
        }
    }

    fn roles_of(&self, pod: &ObjectKey) -> Roles {
        Roles {
            selected: self.selected.contains(pod),
            selected_v4: self.selected_v4.contains(pod),
            selected_v6: self.selected_v6.contains(pod),
            peer: self.peers.contains(pod),
            owner: self.owners.contains(pod),
        }
    }

    fn set_roles(&mut self, pod: &ObjectKey, r: Roles) {
        let sets = [
            (&mut self.selected, r.selected),
            (&mut self.selected_v4, r.selected_v4),
            (&mut self.selected_v6, r.selected_v6),
            (&mut self.peers, r.peer),
            (&mut self.owners, r.owner),
        ];
        for (set, on) in sets {
            if on {
                set.insert(pod.clone());
            } else {
                set.remove(pod);
            }
        }
    }

    fn pods(&self) -> BTreeSet<ObjectKey> {
        self.selected
            .iter()
            .chain(&self.peers)
            .chain(&self.owners)
            .cloned()
            .collect()
    }
}

/// The shape of a group: for each part, whether it emits and how many clauses.
struct Shape {
    table: u8,
    next: u8,
    sel_field: Field,
    peer_field: Field,
    /// Part 0 (numeric or any ports): clause count, if it emits.
    numeric: Option<u8>,
    /// Part 1 (named ports): clause count, if it emits.
    named: Option<u8>,
}

fn shape(g: &GroupKey, f: Flags) -> Shape {
    let (table, next, sel_field, peer_field) = match g.direction {
        Direction::Ingress => (INGRESS_TABLE, AFTER_INGRESS, Field::NwDst, Field::NwSrc),
        Direction::Egress => (EGRESS_TABLE, AFTER_EGRESS, Field::NwSrc, Field::NwDst),
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
struct Emitter<'a> {
    shape: &'a Shape,
    id: u32,
    out: Vec<FlowEntry>,
}

impl Emitter<'_> {
    /// A clause flow of `part` with `n` clauses: a plain allow when the part has
    /// a single clause.
    fn clause(&mut self, part: u32, k: u8, n: u8, m: Match) {
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

    fn push(&mut self, matcher: Match, action: Action) {
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
fn compile_frame(g: &GroupKey, info: &GroupInfo) -> Vec<FlowEntry> {
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
fn compile_member(g: &GroupKey, info: &GroupInfo, pod: &Pod) -> Vec<FlowEntry> {
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

fn compile_deny(
    cluster: &Cluster,
    pod: &ObjectKey,
    direction: Direction,
    id: u32,
) -> Vec<FlowEntry> {
    let Some(pod) = cluster.pod(pod) else {
        return vec![];
    };
    if !cluster.is_isolated(pod, direction) {
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
            cookie: cookie_of(id),
        })
        .collect()
}

fn compile_node(cluster: &Cluster, node: &str, id: u32) -> Vec<FlowEntry> {
    let Some(n) = cluster.node(node) else {
        return vec![];
    };
    let pod_ips: Vec<IpAddr> = cluster
        .pods()
        .filter(|p| p.node.as_deref() == Some(node))
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    if pod_ips.is_empty() || n.addresses.is_empty() {
        return vec![];
    }
    let mut out = Vec::new();
    for (dir, part) in [(Direction::Egress, 0), (Direction::Ingress, 1)] {
        let (table, next, pod_field, node_field) = match dir {
            Direction::Egress => (EGRESS_TABLE, AFTER_EGRESS, Field::NwSrc, Field::NwDst),
            Direction::Ingress => (INGRESS_TABLE, AFTER_INGRESS, Field::NwDst, Field::NwSrc),
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
fn merge_within(flows: &mut Vec<FlowEntry>) {
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

fn conj_key(a: &Action) -> (u32, u8) {
    match a {
        Action::Conjunction { id, clause, .. } => (*id, *clause),
        _ => (0, 0),
    }
}

/// The unit of compilation: what recompiles as one piece.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Unit {
    /// A group's pod-independent flows (it also owns the group's cookie).
    Frame(Arc<GroupKey>),
    /// One pod's flows in one group.
    Member(Arc<GroupKey>, ObjectKey),
    Deny(ObjectKey, Direction),
    Node(String),
}

#[derive(Debug, Clone)]
struct Contribution {
    unit: u32,
    cookie: Cookie,
    actions: SmallVec<[Action; 2]>,
}

#[derive(Debug)]
struct UnitState {
    id: u32,
    flows: Vec<FlowIdentity>,
}

/// Compiled flows and the bookkeeping to change them incrementally.
#[derive(Debug, Default)]
struct State {
    units: HashMap<Unit, UnitState>,
    by_id: Vec<Option<Unit>>,
    free_ids: Vec<u32>,
    merged: HashMap<FlowIdentity, SmallVec<[Contribution; 1]>>,
    group_of: HashMap<RuleRef, Arc<GroupKey>>,
    groups: HashMap<Arc<GroupKey>, GroupInfo>,
}

/// The policy compiler: holds the cluster model and the flows it compiles to.
#[derive(Debug, Default)]
pub struct Compiler {
    cluster: Cluster,
    state: State,
}

impl State {
    fn alloc(&mut self, unit: &Unit) -> u32 {
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

    fn release(&mut self, unit: &Unit) {
        if let Some(u) = self.units.remove(unit) {
            self.by_id[u.id as usize] = None;
            self.free_ids.push(u.id);
        }
    }

    fn unit_of(&self, cookie: Cookie) -> Option<&Unit> {
        if cookie.0 & (0xff << 56) != KIND_UNIT {
            return None;
        }
        self.by_id.get((cookie.0 & 0xffff_ffff) as usize)?.as_ref()
    }

    /// The one flow the contributions to `identity` make.
    fn materialize(&self, identity: &FlowIdentity, contrib: &[Contribution]) -> Option<FlowEntry> {
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

    fn flow(&self, identity: &FlowIdentity) -> Option<FlowEntry> {
        self.merged
            .get(identity)
            .and_then(|c| self.materialize(identity, c))
    }

    /// Replaces the flows of `unit` (allocated) with `flows`.
    fn install(&mut self, unit: &Unit, flows: Vec<FlowEntry>, mut diff: Option<&mut DiffBuilder>) {
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

fn rule_refs(p: &Policy) -> impl Iterator<Item = RuleRef> + '_ {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .flat_map(move |direction| {
            (0..p.rules(direction).map_or(0, <[Rule]>::len)).map(move |index| RuleRef {
                policy: p.key.clone(),
                direction,
                index,
            })
        })
}

/// Pending work of one change.
#[derive(Default)]
struct Work {
    /// Groups to rebuild from scratch (membership sets, frame, every member).
    groups: BTreeSet<Arc<GroupKey>>,
    /// Single units to recompile.
    units: BTreeSet<Unit>,
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// Compiles a whole cluster.
    pub fn from_cluster(cluster: Cluster) -> Compiler {
        let mut c = Compiler {
            cluster,
            state: State::default(),
        };
        let mut work = Work::default();
        let policies: Vec<Policy> = c.cluster.policies().cloned().collect();
        for p in &policies {
            c.regroup(None, Some(p), &mut work);
        }
        for pod in c.cluster.pods() {
            for dir in [Direction::Ingress, Direction::Egress] {
                work.units.insert(Unit::Deny(pod.key.clone(), dir));
            }
        }
        for n in c.cluster.nodes() {
            work.units.insert(Unit::Node(n.name.clone()));
        }
        c.run(work, None);
        c
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Number of merged flows.
    pub fn len(&self) -> usize {
        self.state.merged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.merged.is_empty()
    }

    fn unit_provenance(&self, unit: &Unit) -> Option<Provenance> {
        match unit {
            Unit::Frame(g) | Unit::Member(g, _) => self
                .state
                .groups
                .get(g)?
                .rules
                .iter()
                .next()
                .map(RuleRef::provenance),
            Unit::Deny(pod, direction) => Some(Provenance::DefaultDeny {
                pod: pod.clone(),
                direction: *direction,
            }),
            Unit::Node(node) => Some(Provenance::NodeTraffic { node: node.clone() }),
        }
    }

    /// Where a cookie came from; for flows shared by equivalent rules, the first
    /// of them (see [`Compiler::rules`]).
    pub fn provenance(&self, cookie: Cookie) -> Option<Provenance> {
        self.unit_provenance(self.state.unit_of(cookie)?)
    }

    /// Every rule a cookie stands for (several when equivalent rules share flows).
    pub fn rules(&self, cookie: Cookie) -> Vec<Provenance> {
        match self.state.unit_of(cookie) {
            Some(Unit::Frame(g) | Unit::Member(g, _)) => self
                .state
                .groups
                .get(g)
                .map(|i| i.rules.iter().map(RuleRef::provenance).collect())
                .unwrap_or_default(),
            Some(u) => self.unit_provenance(u).into_iter().collect(),
            None => vec![],
        }
    }

    /// The rule of `cookie` that applies to `pod`: the one whose policy selects it.
    pub fn rule_for_pod(&self, cookie: Cookie, pod: &Pod) -> Option<Provenance> {
        match self.state.unit_of(cookie)? {
            Unit::Frame(g) | Unit::Member(g, _) => {
                self.state.groups.get(g)?.rules.iter().find_map(|r| {
                    let p = self.cluster.policy(&r.policy)?;
                    self.cluster.selects(p, pod).then(|| r.provenance())
                })
            }
            u => self.unit_provenance(u),
        }
    }

    /// The cookie of the flows a rule (or default deny, or node) compiles to.
    pub fn cookie(&self, p: &Provenance) -> Option<Cookie> {
        let unit = match p {
            Provenance::Rule {
                policy,
                direction,
                index,
            } => {
                let r = RuleRef {
                    policy: policy.clone(),
                    direction: *direction,
                    index: *index,
                };
                return self
                    .state
                    .groups
                    .get(self.state.group_of.get(&r)?)
                    .map(|i| cookie_of(i.id));
            }
            Provenance::DefaultDeny { pod, direction } => Unit::Deny(pod.clone(), *direction),
            Provenance::NodeTraffic { node } => Unit::Node(node.clone()),
            Provenance::Pipeline(_) => return None,
        };
        self.state.units.get(&unit).map(|u| cookie_of(u.id))
    }

    /// Who owns conjunction `conj_id` (every rule, joined) and which part it is.
    pub fn conjunction_owner(&self, conj_id: u32) -> Option<(String, u32)> {
        let n = conj_id.checked_sub(1)?;
        let rules = self.rules(cookie_of(n / 2));
        if rules.is_empty() {
            return None;
        }
        let names: Vec<String> = rules.iter().map(ToString::to_string).collect();
        Some((names.join(" + "), n % 2))
    }

    /// Every flow, merged, in no particular order (the switch republishes them on
    /// every change; whoever shows them sorts).
    pub fn flows(&self) -> Vec<FlowEntry> {
        self.state
            .merged
            .iter()
            .filter_map(|(identity, contrib)| self.state.materialize(identity, contrib))
            .collect()
    }

    /// The flow currently compiled for `identity`.
    pub fn flow(&self, identity: &FlowIdentity) -> Option<FlowEntry> {
        self.state.flow(identity)
    }

    /// Moves a policy's rules out of their old groups and into their new ones;
    /// every group touched is rebuilt.
    fn regroup(&mut self, old: Option<&Policy>, new: Option<&Policy>, work: &mut Work) {
        let state = &mut self.state;
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
        &mut self,
        res: &mut Resolver<'_>,
        g: &Arc<GroupKey>,
    ) -> BTreeSet<ObjectKey> {
        let cluster = res.cluster;
        let Some(info) = self.state.groups.get(g) else {
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
                if !pod.ips.is_empty() && p.pod_selector.matches(&pod.labels) {
                    selected.insert(pod.key.clone());
                }
            }
        }
        // Candidates for the peer and owner roles.
        let mut candidates: BTreeSet<&ObjectKey> = selected.iter().collect();
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
        self.state.groups.insert(g.clone(), fresh);
        pods
    }

    /// Carries out `work`, recording what changed in `diff` when given.
    fn run(&mut self, work: Work, mut diff: Option<&mut DiffBuilder>) {
        let cluster = std::mem::take(&mut self.cluster);
        {
            let mut res = Resolver::new(&cluster);
            let mut units = work.units;
            for g in &work.groups {
                for pod in self.rebuild_members(&mut res, g) {
                    units.insert(Unit::Member(g.clone(), pod));
                }
                units.insert(Unit::Frame(g.clone()));
            }
            for u in units {
                self.recompile_unit(&cluster, &u, diff.as_deref_mut());
            }
            // Groups without rules are gone.
            for g in &work.groups {
                if self.state.groups.get(g).is_some_and(|i| i.rules.is_empty()) {
                    self.state.release(&Unit::Frame(g.clone()));
                    self.state.groups.remove(g);
                }
            }
        }
        self.cluster = cluster;
    }

    fn recompile_unit(&mut self, cluster: &Cluster, u: &Unit, diff: Option<&mut DiffBuilder>) {
        let state = &mut self.state;
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
        };
        merge_within(&mut flows);
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

    /// Applies one change to the cluster and returns the resulting flow diff.
    pub fn apply(&mut self, change: Change) -> FlowDiff {
        let mut work = Work::default();
        match change {
            Change::Pod(pod) => {
                let old = self.cluster.upsert_pod(pod.clone());
                self.pod_work(old.as_ref(), Some(&pod), &mut work);
            }
            Change::PodDeleted(key) => {
                let old = self.cluster.remove_pod(&key);
                self.pod_work(old.as_ref(), None, &mut work);
            }
            Change::Namespace(ns) => {
                let name = ns.name.clone();
                let before = self.cluster.namespace_labels(&name);
                self.cluster.upsert_namespace(ns);
                self.namespace_work(&name, &before, &mut work);
            }
            Change::NamespaceDeleted(name) => {
                let before = self.cluster.namespace_labels(&name);
                self.cluster.remove_namespace(&name);
                self.namespace_work(&name, &before, &mut work);
            }
            Change::Node(node) => {
                work.units.insert(Unit::Node(node.name.clone()));
                self.cluster.upsert_node(node);
            }
            Change::NodeDeleted(name) => {
                self.cluster.remove_node(&name);
                work.units.insert(Unit::Node(name));
            }
            Change::Policy(p) => {
                let key = p.key.clone();
                let old = self.cluster.upsert_policy(p.clone());
                self.regroup(old.as_ref(), Some(&p), &mut work);
                self.deny_units_in(&key.namespace, &mut work);
            }
            Change::PolicyDeleted(key) => {
                let old = self.cluster.remove_policy(&key);
                self.regroup(old.as_ref(), None, &mut work);
                self.deny_units_in(&key.namespace, &mut work);
            }
        }
        let mut diff = DiffBuilder::default();
        self.run(work, Some(&mut diff));
        diff.finish(&self.state)
    }

    /// Validates a NetworkPolicy and applies it. When validation fails nothing
    /// changes: the last valid version of the policy stays in force.
    pub fn apply_network_policy(
        &mut self,
        np: &k8s_openapi::api::networking::v1::NetworkPolicy,
    ) -> Result<FlowDiff, crate::error::Error> {
        let policy = Policy::from_api(np)?;
        Ok(self.apply(Change::Policy(policy)))
    }

    fn deny_units_in(&self, namespace: &str, work: &mut Work) {
        for pod in self.cluster.pods_in(namespace) {
            for dir in [Direction::Ingress, Direction::Egress] {
                work.units.insert(Unit::Deny(pod.key.clone(), dir));
            }
        }
    }

    /// A pod changed (`old` -> `new`, either may be absent): update its roles in
    /// every group; a group whose clauses become empty or non-empty is rebuilt,
    /// otherwise only the pod's own flows are.
    fn pod_work(&mut self, old: Option<&Pod>, new: Option<&Pod>, work: &mut Work) {
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
        // Groups with a member rule whose policy selects the pod now.
        let mut selecting: HashSet<&Arc<GroupKey>> = HashSet::default();
        if let Some(pod) = new {
            for p in self.cluster.policies_in(&pod.key.namespace) {
                if self.cluster.selects(p, pod) {
                    selecting.extend(rule_refs(p).filter_map(|r| self.state.group_of.get(&r)));
                }
            }
        }
        let changed_pod = old != new;
        let mut updates: Vec<(Arc<GroupKey>, Roles, bool)> = Vec::new();
        for (g, info) in &self.state.groups {
            let before = info.roles_of(&key);
            let after = match new {
                Some(pod) => roles(&self.cluster, g, pod, selecting.contains(g)),
                None => Roles::default(),
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
                if let Some(info) = self.state.groups.get_mut(&g) {
                    info.set_roles(&key, after);
                }
                work.units.insert(Unit::Member(g, key.clone()));
            }
        }
    }

    fn namespace_work(&self, name: &str, before: &crate::selector::Labels, work: &mut Work) {
        let after = self.cluster.namespace_labels(name);
        for g in self.state.groups.keys() {
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
}

/// Records the merged flow of each identity before a change touches it.
#[derive(Default)]
struct DiffBuilder {
    before: HashMap<FlowIdentity, Option<FlowEntry>>,
}

impl DiffBuilder {
    fn touch(&mut self, s: &State, identity: &FlowIdentity) {
        if !self.before.contains_key(identity) {
            self.before.insert(*identity, s.flow(identity));
        }
    }

    fn finish(self, s: &State) -> FlowDiff {
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
