//! Groups: rules with the same meaning, and the pods that play a part in them.
//!
//! Owns canonical rule keys ([`GroupKey`]: direction, peers with "own namespace"
//! resolved, ports), the roles a pod plays in a group (selected, peer, owner of a
//! named port) and the group's membership sets. Rules only allow and are
//! unioned, so every rule of a group compiles to one conjunction whose selected
//! clause is the union of their policies' pods. Emits no flows.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{HashMap, HashSet, Provenance};
use crate::cluster::Cluster;
use crate::model::{
    Direction, Namespace, NsSel, ObjectKey, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Rule,
};
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
pub(crate) enum CanonNs {
    Named(String),
    Matching(crate::selector::Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum CanonPeer {
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
pub(crate) struct GroupKey {
    pub(crate) direction: Direction,
    pub(crate) peers: Option<Vec<CanonPeer>>,
    pub(crate) ports: Option<Vec<PortSpec>>,
    /// Hash of the fields above, computed once: group keys are hashed on every
    /// unit lookup.
    pub(crate) hash: u64,
}

impl Hash for GroupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl GroupKey {
    pub(crate) fn of(policy: &Policy, direction: Direction, rule: &Rule) -> GroupKey {
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

    pub(crate) fn has_named_ports(&self) -> bool {
        self.ports
            .iter()
            .flatten()
            .any(|p| matches!(p.port, PortRef::Named(_)))
    }
}

pub(crate) fn ns_matches(cluster: &Cluster, ns: &CanonNs, name: &str) -> bool {
    match ns {
        CanonNs::Named(n) => n == name,
        CanonNs::Matching(s) => match cluster.namespace(name) {
            Some(declared) => s.matches(&declared.labels),
            None => s.matches(&Namespace::implicit(name).labels),
        },
    }
}

pub(crate) fn in_block(pod: &Pod, cidr: &IpNet, except: &[IpNet]) -> bool {
    pod.ips
        .iter()
        .any(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)))
}

/// Resolves selectors, memoizing namespace selector results for one operation.
pub(crate) struct Resolver<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) ns_cache: HashMap<crate::selector::Selector, Arc<Vec<String>>>,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(cluster: &'a Cluster) -> Self {
        Resolver {
            cluster,
            ns_cache: HashMap::default(),
        }
    }

    pub(crate) fn namespaces(&mut self, ns: &CanonNs) -> Arc<Vec<String>> {
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
    pub(crate) fn peer_pods(&mut self, peers: &[CanonPeer]) -> Vec<&'a Pod> {
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
pub(crate) fn is_peer(cluster: &Cluster, g: &GroupKey, pod: &Pod) -> bool {
    g.peers.iter().flatten().any(|peer| match peer {
        CanonPeer::Pods { namespaces, pods } => {
            pods.matches(&pod.labels) && ns_matches(cluster, namespaces, &pod.key.namespace)
        }
        CanonPeer::Block { .. } => false,
    })
}

/// The named ports of a group, resolved on `pod`: (protocol, port).
pub(crate) fn resolved_ports(g: &GroupKey, pod: &Pod) -> Vec<(Protocol, u16)> {
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
pub(crate) struct Roles {
    /// A member rule's policy selects it.
    pub(crate) selected: bool,
    /// Selected and has an IPv4 / IPv6 address (decides the families of the
    /// group's ports clause).
    pub(crate) selected_v4: bool,
    pub(crate) selected_v6: bool,
    /// It is one of the group's pod peers.
    pub(crate) peer: bool,
    /// It resolves one of the group's named ports as the destination.
    pub(crate) owner: bool,
}

impl Roles {
    pub(crate) fn any(self) -> bool {
        self.selected || self.peer || self.owner
    }
}

/// Computes a pod's roles in a group from the cluster. `selected` is given: it
/// depends on the member policies, which the caller knows.
pub(crate) fn roles(cluster: &Cluster, g: &GroupKey, pod: &Pod, selected: bool) -> Roles {
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
pub(crate) struct GroupInfo {
    pub(crate) id: u32,
    pub(crate) rules: BTreeSet<RuleRef>,
    pub(crate) selected: BTreeSet<ObjectKey>,
    pub(crate) selected_v4: BTreeSet<ObjectKey>,
    pub(crate) selected_v6: BTreeSet<ObjectKey>,
    pub(crate) peers: BTreeSet<ObjectKey>,
    pub(crate) owners: BTreeSet<ObjectKey>,
}

/// What decides which parts of a group emit flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags {
    pub(crate) selected: bool,
    pub(crate) v4: bool,
    pub(crate) v6: bool,
    pub(crate) peers: bool,
    pub(crate) owners: bool,
}

impl GroupInfo {
    pub(crate) fn flags(&self, g: &GroupKey) -> Flags {
        self.flags_where(g, |set, _| !set.is_empty())
    }

    /// The flags once `pod` has roles `r`, without changing anything.
    pub(crate) fn flags_after(&self, g: &GroupKey, pod: &ObjectKey, r: Roles) -> Flags {
        let has = [r.selected, r.selected_v4, r.selected_v6, r.peer, r.owner];
        self.flags_where(g, |set, i| {
            set.len() > usize::from(set.contains(pod)) || has[i]
        })
    }

    /// Flags from a non-emptiness test on each set (selected, v4, v6, peers,
    /// owners, in that order).
    pub(crate) fn flags_where(
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

    pub(crate) fn roles_of(&self, pod: &ObjectKey) -> Roles {
        Roles {
            selected: self.selected.contains(pod),
            selected_v4: self.selected_v4.contains(pod),
            selected_v6: self.selected_v6.contains(pod),
            peer: self.peers.contains(pod),
            owner: self.owners.contains(pod),
        }
    }

    pub(crate) fn set_roles(&mut self, pod: &ObjectKey, r: Roles) {
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

    pub(crate) fn pods(&self) -> BTreeSet<ObjectKey> {
        self.selected
            .iter()
            .chain(&self.peers)
            .chain(&self.owners)
            .cloned()
            .collect()
    }
}
pub(crate) fn rule_refs(p: &Policy) -> impl Iterator<Item = RuleRef> + '_ {
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
