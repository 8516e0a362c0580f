//! The cluster: every object the compiler reads, and the questions it asks
//! of them (who a policy selects, who is isolated, who is a tier's subject).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::cnp::ClusterPolicy;
use crate::model::{Direction, Namespace, Node, NsSel, ObjectKey, Peer, Pod, Policy};
use crate::selector::Labels;

/// Every object the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    namespaces: BTreeMap<String, Namespace>,
    /// namespace -> pod name -> pod
    pods: BTreeMap<String, BTreeMap<String, Pod>>,
    nodes: BTreeMap<String, Node>,
    policies: BTreeMap<ObjectKey, Policy>,
    cluster_policies: BTreeMap<String, ClusterPolicy>,
    /// Addresses learned from the pods' DNS answers, per name (lower case, no
    /// trailing dot): what `domainNames` peers match.
    resolved: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The node whose pods are compiled as subjects (`None`: every pod, as
    /// offline mode and tests compile). See [`Cluster::is_local`].
    scope: Option<String>,
}

impl Cluster {
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    /// Labels of a namespace, declared or implicit.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        self.namespaces
            .get(name)
            .map(|n| n.labels.clone())
            .unwrap_or_else(|| Namespace::implicit(name).labels)
    }

    /// Names of every namespace, declared or holding pods.
    pub fn namespace_names(&self) -> impl Iterator<Item = &String> {
        let mut names: Vec<&String> = self.namespaces.keys().chain(self.pods.keys()).collect();
        names.sort();
        names.dedup();
        names.into_iter()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values().flat_map(|m| m.values())
    }

    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &Pod> {
        self.pods
            .get(namespace)
            .into_iter()
            .flat_map(|m| m.values())
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(&key.namespace)?.get(&key.name)
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods().find(|p| p.ips.contains(&ip))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn policy(&self, key: &ObjectKey) -> Option<&Policy> {
        self.policies.get(key)
    }

    pub fn policies_in(&self, namespace: &str) -> impl Iterator<Item = &Policy> {
        self.policies
            .range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, p)| p)
    }

    /// Returns the previous version.
    pub fn upsert_namespace(&mut self, ns: Namespace) -> Option<Namespace> {
        self.namespaces.insert(ns.name.clone(), ns)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        self.namespaces.remove(name)
    }

    pub fn upsert_pod(&mut self, pod: Pod) -> Option<Pod> {
        self.pods
            .entry(pod.key.namespace.clone())
            .or_default()
            .insert(pod.key.name.clone(), pod)
    }

    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<Pod> {
        let m = self.pods.get_mut(&key.namespace)?;
        let old = m.remove(&key.name);
        if m.is_empty() {
            self.pods.remove(&key.namespace);
        }
        old
    }

    pub fn upsert_node(&mut self, node: Node) -> Option<Node> {
        self.nodes.insert(node.name.clone(), node)
    }

    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        self.nodes.remove(name)
    }

    /// The same cluster with another policy set (NetworkPolicies and
    /// ClusterNetworkPolicies): what `what-if` compiles.
    pub fn with_policies(
        &self,
        policies: &[Policy],
        cluster_policies: &[ClusterPolicy],
    ) -> Cluster {
        let mut c = self.clone();
        c.policies = policies
            .iter()
            .map(|p| (p.key.clone(), p.clone()))
            .collect();
        c.cluster_policies = cluster_policies
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        c
    }

    pub fn upsert_policy(&mut self, p: Policy) -> Option<Policy> {
        self.policies.insert(p.key.clone(), p)
    }

    pub fn remove_policy(&mut self, key: &ObjectKey) -> Option<Policy> {
        self.policies.remove(key)
    }

    pub fn cluster_policies(&self) -> impl Iterator<Item = &ClusterPolicy> {
        self.cluster_policies.values()
    }

    pub fn cluster_policy(&self, name: &str) -> Option<&ClusterPolicy> {
        self.cluster_policies.get(name)
    }

    pub fn upsert_cluster_policy(&mut self, p: ClusterPolicy) -> Option<ClusterPolicy> {
        self.cluster_policies.insert(p.name.clone(), p)
    }

    pub fn remove_cluster_policy(&mut self, name: &str) -> Option<ClusterPolicy> {
        self.cluster_policies.remove(name)
    }

    /// Every name learned from DNS answers, with its addresses.
    pub fn resolved(&self) -> impl Iterator<Item = (&String, &BTreeSet<IpAddr>)> {
        self.resolved.iter()
    }

    /// Sets the addresses a name resolves to (an empty set forgets it);
    /// returns the previous set.
    pub fn set_resolved(&mut self, name: &str, addresses: BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if addresses.is_empty() {
            self.resolved.remove(&name).unwrap_or_default()
        } else {
            self.resolved.insert(name, addresses).unwrap_or_default()
        }
    }

    /// Whether a ClusterNetworkPolicy's subject includes `pod` (never a pod
    /// without an address: host-network pods are their node).
    pub fn subject_of(&self, policy: &ClusterPolicy, pod: &Pod) -> bool {
        !pod.ips.is_empty()
            && policy.subject.pods.matches(&pod.labels)
            && policy
                .subject
                .namespaces
                .matches(&self.namespace_labels(&pod.key.namespace))
    }

    /// Compile for one node: only its pods (and pods with no node) are
    /// subjects of policies; every other pod is only a peer, an address.
    pub fn set_scope(&mut self, node: Option<String>) {
        self.scope = node;
    }

    /// The node compiled for, when scoped.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether `pod`'s own rules (the policies selecting it, its default
    /// denies, its tier subjects) are compiled here: always unscoped, and
    /// scoped when it runs on this node or on no node yet. A pod elsewhere has
    /// its rules enforced where it runs; here it is only a peer.
    pub fn is_local(&self, pod: &Pod) -> bool {
        match (&self.scope, &pod.node) {
            (Some(here), Some(there)) => here == there,
            _ => true,
        }
    }

    /// Whether `policy` selects `pod`.
    pub fn selects(&self, policy: &Policy, pod: &Pod) -> bool {
        policy.key.namespace == pod.key.namespace && policy.pod_selector.matches(&pod.labels)
    }

    /// Whether a peer of a policy in `policy_ns` matches `pod`.
    pub fn peer_matches(&self, peer: &Peer, policy_ns: &str, pod: &Pod) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    NsSel::Own => pod.key.namespace == policy_ns,
                    NsSel::Matching(sel) => sel.matches(&self.namespace_labels(&pod.key.namespace)),
                };
                ns_ok && pods.matches(&pod.labels)
            }
            Peer::Block { cidr, except } => pod
                .ips
                .iter()
                .any(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))),
        }
    }

    /// Whether any policy isolates `pod` in `dir`.
    pub fn is_isolated(&self, pod: &Pod, dir: Direction) -> bool {
        self.policies_in(&pod.key.namespace)
            .any(|p| p.rules(dir).is_some() && p.pod_selector.matches(&pod.labels))
    }
}
