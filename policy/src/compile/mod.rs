//! NetworkPolicy -> flows in tables 41 (egress) and 51 (ingress);
//! ClusterNetworkPolicy -> the Admin (40, 50) and Baseline (42, 52) tiers.
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
//! Priorities inside a policy table: see [`crate::tables::priority`].
//!
//! Layers, each a module: `matches` (addresses, CIDRs, port ranges), `groups`
//! (rules with the same meaning and the pods' roles in them), `emit` (the flows
//! of each unit), `units` (unit ids, cookies, merged flows), `incremental`
//! (from one change to the units it touches, and the diff).

use std::collections::BTreeSet;
use std::fmt;

use datapath::flow::{Cookie, FlowEntry, FlowIdentity};
use smallvec::SmallVec;

use crate::cluster::Cluster;
use crate::cnp::{ClusterPolicy, RuleAction, Tier};
use crate::model::{Direction, Namespace, Node, ObjectKey, Pod, Policy};

mod emit;
mod groups;
mod incremental;
mod matches;
mod tier;
mod units;

pub(crate) use matches::net_match;
pub use matches::{port_masks, subtract};
pub use tier::TierRuleRef;

use emit::cookie_of;
use groups::RuleRef;
use incremental::Work;
use units::{State, Unit};

/// Hash maps of the compiler: foldhash (keys are large; SipHash dominated profiles).
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

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
    /// Traffic between a node and its own pods, always allowed by the
    /// NetworkPolicy tier.
    NodeTraffic { node: String },
    /// Rule `index` of a ClusterNetworkPolicy (Admin or Baseline tier).
    TierRule {
        policy: String,
        tier: Tier,
        priority: u16,
        direction: Direction,
        index: usize,
        /// The rule's name, when it has one.
        name: Option<String>,
        action: RuleAction,
        /// Why it fails closed, when it does.
        fail_closed: bool,
    },
    /// A pod's clause flows in the ClusterNetworkPolicy rules that name it
    /// (the rules are the conjunctions it feeds).
    TierPod { pod: ObjectKey },
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
            Provenance::TierRule {
                policy,
                tier,
                priority,
                direction,
                index,
                name,
                action,
                fail_closed,
            } => {
                write!(
                    f,
                    "ClusterNetworkPolicy {policy} ({tier} tier, priority {priority}) {direction} rule "
                )?;
                match name {
                    Some(n) => write!(f, "{n:?}")?,
                    None => write!(f, "{index}")?,
                }
                write!(f, ": {action}")?;
                if *fail_closed {
                    f.write_str(" (fails closed: a peer or protocol not understood)")?;
                }
                Ok(())
            }
            Provenance::TierPod { pod } => {
                write!(f, "ClusterNetworkPolicy clauses of {pod}")
            }
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

    /// The diffs applied in order, as one.
    pub fn concat(diffs: Vec<FlowDiff>) -> FlowDiff {
        if diffs.len() <= 1 {
            return diffs.into_iter().next().unwrap_or_default();
        }
        // identity -> (whether it existed before the first, the flow after the last)
        let mut net: HashMap<FlowIdentity, (bool, Option<FlowEntry>)> = HashMap::default();
        for d in diffs {
            for (f, existed) in d
                .added
                .into_iter()
                .map(|f| (f, false))
                .chain(d.modified.into_iter().map(|f| (f, true)))
            {
                let id = f.identity();
                net.entry(id).or_insert((existed, None)).1 = Some(f);
            }
            for id in d.deleted {
                net.entry(id).or_insert((true, None)).1 = None;
            }
        }
        let mut diff = FlowDiff::default();
        for (id, (existed, after)) in net {
            match (existed, after) {
                (false, Some(f)) => diff.added.push(f),
                (true, Some(f)) => diff.modified.push(f),
                (true, None) => diff.deleted.push(id),
                (false, None) => {}
            }
        }
        diff
    }

    /// What turns the flows `old` into `new`.
    pub fn between(old: Vec<FlowEntry>, new: Vec<FlowEntry>) -> FlowDiff {
        let mut before: HashMap<FlowIdentity, FlowEntry> =
            old.into_iter().map(|f| (f.identity(), f)).collect();
        let mut diff = FlowDiff::default();
        for f in new {
            match before.remove(&f.identity()) {
                None => diff.added.push(f),
                Some(b) if b != f => diff.modified.push(f),
                Some(_) => {}
            }
        }
        diff.deleted = before.into_keys().collect();
        diff
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
    ClusterPolicy(ClusterPolicy),
    ClusterPolicyDeleted(String),
    /// The addresses a DNS name resolves to now (learned from the pods' DNS
    /// answers; an empty set: expired). What `domainNames` peers match.
    Resolved {
        name: String,
        addresses: BTreeSet<std::net::IpAddr>,
    },
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
            Change::ClusterPolicy(p) => format!("clusternetworkpolicy {}", p.name),
            Change::ClusterPolicyDeleted(n) => format!("clusternetworkpolicy {n} deleted"),
            Change::Resolved { name, addresses } => {
                format!("dns {name}: {} addresses", addresses.len())
            }
        }
    }
}
/// Fewer changes than this (or than a quarter of the cluster) are applied
/// one by one by [`Compiler::apply_all`].
const BULK_CHANGES: usize = 256;

/// `change` made to the model alone (nothing compiled).
fn apply_to_model(cluster: &mut Cluster, change: Change) {
    match change {
        Change::Namespace(ns) => drop(cluster.upsert_namespace(ns)),
        Change::NamespaceDeleted(name) => drop(cluster.remove_namespace(&name)),
        Change::Pod(pod) => drop(cluster.upsert_pod(pod)),
        Change::PodDeleted(key) => drop(cluster.remove_pod(&key)),
        Change::Node(node) => drop(cluster.upsert_node(node)),
        Change::NodeDeleted(name) => drop(cluster.remove_node(&name)),
        Change::Policy(p) => drop(cluster.upsert_policy(p)),
        Change::PolicyDeleted(key) => drop(cluster.remove_policy(&key)),
        Change::ClusterPolicy(p) => drop(cluster.upsert_cluster_policy(p)),
        Change::ClusterPolicyDeleted(name) => drop(cluster.remove_cluster_policy(&name)),
        Change::Resolved { name, addresses } => drop(cluster.set_resolved(&name, addresses)),
    }
}

/// The policy compiler: holds the cluster model and the flows it compiles to.
#[derive(Debug, Default)]
pub struct Compiler {
    cluster: Cluster,
    state: State,
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
            incremental::regroup(&mut c.state, None, Some(p), &mut work);
        }
        for pod in c.cluster.pods() {
            for dir in [Direction::Ingress, Direction::Egress] {
                work.units.insert(Unit::Deny(pod.key.clone(), dir));
            }
        }
        for n in c.cluster.nodes() {
            work.units.insert(Unit::Node(n.name.clone()));
        }
        for p in c.cluster.cluster_policies() {
            work.units.extend(tier::rule_refs(p).map(Unit::Tier));
        }
        if c.cluster.cluster_policies().next().is_some() {
            work.units
                .extend(c.cluster.pods().map(|p| Unit::TierPod(p.key.clone())));
        }
        incremental::run(&mut c.state, &c.cluster, work, None);
        c
    }
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Compiles for `node` from now on (see [`Cluster::is_local`]; `None`:
    /// every pod): everything is compiled again, and the diff says how the
    /// flows changed.
    pub fn rescope(&mut self, node: Option<String>) -> FlowDiff {
        if self.cluster.scope() == node.as_deref() {
            return FlowDiff::default();
        }
        let mut cluster = std::mem::take(&mut self.cluster);
        cluster.set_scope(node);
        self.recompile(cluster)
    }

    /// Replaces the cluster with `cluster`, compiled whole.
    fn recompile(&mut self, cluster: Cluster) -> FlowDiff {
        let old = self.flows();
        *self = Compiler::from_cluster(cluster);
        FlowDiff::between(old, self.flows())
    }

    /// Applies many changes as one: one at a time when they are few, else
    /// by compiling the changed cluster whole (a cold start, a resync: the
    /// full compile is far cheaper than thousands of incremental steps).
    pub fn apply_all(&mut self, changes: Vec<Change>) -> FlowDiff {
        let size = self.cluster.pods().count() + self.cluster.policies().count();
        if changes.len() < BULK_CHANGES.max(size / 4) {
            let diffs: Vec<FlowDiff> = changes.into_iter().map(|c| self.apply(c)).collect();
            return FlowDiff::concat(diffs);
        }
        let mut cluster = self.cluster.clone();
        for change in changes {
            apply_to_model(&mut cluster, change);
        }
        self.recompile(cluster)
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
            Unit::Tier(r) => self.tier_provenance(r),
            Unit::TierPod(pod) => Some(Provenance::TierPod { pod: pod.clone() }),
        }
    }
    fn tier_provenance(&self, r: &TierRuleRef) -> Option<Provenance> {
        let p = self.cluster.cluster_policy(&r.policy)?;
        let rule = p.rules(r.direction).get(r.index)?;
        Some(Provenance::TierRule {
            policy: p.name.clone(),
            tier: p.tier,
            priority: p.priority,
            direction: r.direction,
            index: r.index,
            name: rule.name.clone(),
            action: rule.action,
            fail_closed: rule.fail_closed.is_some(),
        })
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
            Provenance::TierRule {
                policy,
                direction,
                index,
                ..
            } => Unit::Tier(TierRuleRef {
                policy: policy.clone(),
                direction: *direction,
                index: *index,
            }),
            Provenance::TierPod { pod } => Unit::TierPod(pod.clone()),
            Provenance::Pipeline(_) => return None,
        };
        self.state.units.get(&unit).map(|u| cookie_of(u.id))
    }
    /// The rules conjunction `conj_id` stands for.
    pub fn conjunction_rules(&self, conj_id: u32) -> Vec<Provenance> {
        conj_id
            .checked_sub(1)
            .map_or_else(Vec::new, |n| self.rules(cookie_of(n / 2)))
    }
    /// How many flows serve each rule: a flow serves the rules of its own
    /// cookie and those of the conjunctions it feeds (tier clause flows are
    /// owned by the pod they match, and serve many rules). Flows are grouped
    /// by the cookies they serve first, so each group's rules are looked up
    /// once, not once per flow.
    pub fn flows_per_rule(&self) -> HashMap<Provenance, usize> {
        let mut by_cookies: HashMap<SmallVec<[Cookie; 4]>, usize> = HashMap::default();
        for (identity, contrib) in self.state.merged.iter() {
            let Some(f) = self.state.materialize(identity, contrib) else {
                continue;
            };
            let mut cookies: SmallVec<[Cookie; 4]> = smallvec::smallvec![f.cookie];
            cookies.extend(
                f.conjunctions()
                    .filter_map(|(id, _, _)| id.checked_sub(1).map(|n| cookie_of(n / 2))),
            );
            cookies.sort_unstable();
            cookies.dedup();
            *by_cookies.entry(cookies).or_default() += 1;
        }
        let mut out = HashMap::default();
        for (cookies, n) in by_cookies {
            let rules: BTreeSet<Provenance> = cookies.iter().flat_map(|c| self.rules(*c)).collect();
            for p in rules {
                *out.entry(p).or_default() += n;
            }
        }
        out
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
    /// Applies one change to the cluster and returns the resulting flow diff.
    pub fn apply(&mut self, change: Change) -> FlowDiff {
        let mut work = Work::default();
        match change {
            Change::Pod(pod) => {
                let old = self.cluster.upsert_pod(pod.clone());
                incremental::pod_work(
                    &mut self.state,
                    &self.cluster,
                    old.as_ref(),
                    Some(&pod),
                    &mut work,
                );
            }
            Change::PodDeleted(key) => {
                let old = self.cluster.remove_pod(&key);
                incremental::pod_work(
                    &mut self.state,
                    &self.cluster,
                    old.as_ref(),
                    None,
                    &mut work,
                );
            }
            Change::Namespace(ns) => {
                let name = ns.name.clone();
                let before = self.cluster.namespace_labels(&name);
                self.cluster.upsert_namespace(ns);
                incremental::namespace_work(&self.state, &self.cluster, &name, &before, &mut work);
            }
            Change::NamespaceDeleted(name) => {
                let before = self.cluster.namespace_labels(&name);
                self.cluster.remove_namespace(&name);
                incremental::namespace_work(&self.state, &self.cluster, &name, &before, &mut work);
            }
            Change::Node(node) => {
                work.units.insert(Unit::Node(node.name.clone()));
                self.cluster.upsert_node(node);
                incremental::tier_peer_work(&self.cluster, tier::has_node_peers, &mut work);
            }
            Change::NodeDeleted(name) => {
                self.cluster.remove_node(&name);
                work.units.insert(Unit::Node(name));
                incremental::tier_peer_work(&self.cluster, tier::has_node_peers, &mut work);
            }
            Change::Policy(p) => {
                let key = p.key.clone();
                let old = self.cluster.upsert_policy(p.clone());
                incremental::regroup(&mut self.state, old.as_ref(), Some(&p), &mut work);
                incremental::deny_units_in(&self.cluster, &key.namespace, &mut work);
            }
            Change::PolicyDeleted(key) => {
                let old = self.cluster.remove_policy(&key);
                incremental::regroup(&mut self.state, old.as_ref(), None, &mut work);
                incremental::deny_units_in(&self.cluster, &key.namespace, &mut work);
            }
            Change::ClusterPolicy(p) => {
                let old = self.cluster.upsert_cluster_policy(p.clone());
                incremental::tier_policy_work(old.as_ref(), Some(&p), &mut work);
            }
            Change::ClusterPolicyDeleted(name) => {
                let old = self.cluster.remove_cluster_policy(&name);
                incremental::tier_policy_work(old.as_ref(), None, &mut work);
            }
            Change::Resolved { name, addresses } => {
                let before = self.cluster.set_resolved(&name, addresses.clone());
                if before != addresses {
                    incremental::tier_peer_work(
                        &self.cluster,
                        |r| tier::touches_name(r, &name),
                        &mut work,
                    );
                }
            }
        }
        let mut diff = units::DiffBuilder::default();
        incremental::run(&mut self.state, &self.cluster, work, Some(&mut diff));
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
}
