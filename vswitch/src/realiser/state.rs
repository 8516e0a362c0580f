//! The realiser's state: what it has compiled and attached, and how that
//! becomes a port set.
//!
//! Owns the bookkeeping behind publication: local ports and tunnel peers with
//! their counters, port number allocation, conntrack owners of attached pods,
//! and turning all of it into the [`PortSet`] packet threads read. The
//! `Realiser` (`mod.rs`) holds it behind its lock and decides when to publish.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datapath::conntrack::Owner;
use datapath::{FlowEntry, FlowIdentity, PortNo};
use policy::compile::{Change, Compiler, FlowDiff};
use policy::model::ObjectKey;
use policy::pipeline::{PodPort, Topology, TunnelPeer};
use policy::staging::{self, Shadow};

use super::{Error, FIRST_POD_PORT, FIRST_TUNNEL_PORT, GATEWAY_PORT, Realisation};
use crate::forwarder::{Endpoint as IoEndpoint, EndpointState, PortSet};
use crate::port::{Port, PortCounters};
use crate::tunnel::{TunnelIo, VxlanPort};

/// A port with its own I/O (a pod or the gateway).
#[derive(Debug, Clone)]
pub(super) struct Local {
    pub(super) no: PortNo,
    /// Its queues (at least one): every one is read, the first is written.
    pub(super) queues: Vec<(Arc<dyn Port>, Arc<EndpointState>)>,
    pub(super) counters: Arc<PortCounters>,
}

impl Local {
    pub(super) fn new(no: PortNo, queues: Vec<Arc<dyn Port>>) -> Local {
        Local {
            no,
            queues: queues.into_iter().map(|q| (q, Arc::default())).collect(),
            counters: Arc::default(),
        }
    }

    /// Queue `queue` as the forwarder reads it.
    pub(super) fn endpoint(&self, queue: usize) -> IoEndpoint {
        let (io, state) = &self.queues[queue];
        IoEndpoint {
            io: io.clone(),
            own: Some((self.no, self.counters.clone())),
            queue,
            state: state.clone(),
        }
    }
}

/// A tunnel port: another node.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) no: PortNo,
    pub(super) node: String,
    pub(super) addr: std::net::SocketAddr,
    pub(super) pod_cidrs: Vec<ipnet::IpNet>,
    pub(super) counters: Arc<PortCounters>,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) compiler: Compiler,
    pub(super) topology: Topology,
    pub(super) locals: Vec<Local>,
    /// The base-pipeline flows installed, by identity.
    pub(super) base: HashMap<FlowIdentity, FlowEntry>,
    /// Policy flow diffs compiled but not yet published, in order.
    pub(super) pending: Vec<FlowDiff>,
    /// False after a failed publish: the next one reinstalls everything.
    pub(super) in_sync: bool,
    /// Compile time accumulated since the last publish.
    pub(super) compile_time: Duration,
    pub(super) last: Realisation,
    /// Node of pods attached here (own-node traffic), when known.
    pub(super) local_node: Option<String>,
    /// Services and EndpointSlices (load-balanced when
    /// `topology.load_balance`).
    pub(super) services: policy::services::Services,
    /// Flows added by hand (`flowctl add-flow`), kept across recompiles.
    pub(super) manual: HashMap<FlowIdentity, FlowEntry>,
    /// Whether a pod attached before its Pod object is known stays cut off
    /// until it is (Kubernetes mode: fail closed) rather than running unlabelled.
    pub(super) isolate_unknown: bool,
    /// Pods attached but not yet known to the cluster model (isolated).
    pub(super) unresolved: Vec<PodPort>,
    pub(super) tunnel: Option<Arc<TunnelIo>>,
    /// The tunnel sockets' readers and loads (see `EndpointState`), one per
    /// socket.
    pub(super) tunnel_states: Vec<Arc<EndpointState>>,
    /// Tunnel ports, one per other node with pods, kept across republication.
    pub(super) peers: Vec<Peer>,
    /// Connections a pod, and a namespace, may have open at once.
    pub(super) ct_limits: (usize, usize),
    /// Conntrack owners of attached pods and their namespaces (kept across
    /// publications: their counts are live connections).
    pub(super) owners: HashMap<ObjectKey, Arc<Owner>>,
    pub(super) ns_owners: HashMap<String, Arc<Owner>>,
    /// Staged policies enforced too, traced beside the real tables while
    /// some policy is staged (`vswitch.io/mode: audit`).
    pub(super) shadow: Option<Shadow>,
    /// Whether a change since the last publish reached the shadow.
    pub(super) staged_touched: bool,
}

impl State {
    pub(super) fn compile(&mut self, change: Change) {
        let _span = tracing::debug_span!("compile", change = change.describe()).entered();
        let t = Instant::now();
        // Staged verdicts are explained per generation: a change the shadow
        // sees publishes one even when the enforced flows stay the same.
        self.staged_touched |= self.shadow.is_some() || staging::stages(&change);
        if self.shadow.is_none() && staging::stages(&change) {
            // The first staged policy: the shadow starts as what is enforced.
            self.shadow = self.build_shadow(self.compiler.cluster().clone());
        }
        if let Some(shadow) = &mut self.shadow {
            if let Err(e) = shadow.apply(change.clone()) {
                tracing::error!(error = %e, "staged policies: cannot compile the shadow tables; staged verdicts stop until the next change");
                self.shadow = None;
            } else if !shadow.needed() {
                self.shadow = None;
            }
        }
        let diff = self.compiler.apply(staging::enforced(change));
        self.enforce(diff, t);
    }

    /// Queues `diff` for the next publish; compiling it began at `t`.
    fn enforce(&mut self, diff: policy::compile::FlowDiff, t: Instant) {
        self.compile_time += t.elapsed();
        if !diff.is_empty() {
            self.pending.push(diff);
        }
    }

    /// Compiles `changes` in order, as one when nothing is staged (the
    /// compiler takes the full-compile path for many: a cold start).
    pub(super) fn compile_all(&mut self, changes: Vec<Change>) {
        if self.shadow.is_some() || changes.iter().any(staging::stages) {
            for change in changes {
                self.compile(change);
            }
            return;
        }
        let _span = tracing::debug_span!("compile", changes = changes.len()).entered();
        let t = Instant::now();
        let diff = self.compiler.apply_all(changes);
        self.enforce(diff, t);
    }

    /// The shadow of `cluster` (staged policies included) over this topology.
    pub(super) fn build_shadow(&self, cluster: policy::Cluster) -> Option<Shadow> {
        Shadow::build(cluster, &self.topology)
            .inspect_err(|e| tracing::error!(error = %e, "staged policies: cannot compile the shadow tables"))
            .ok()
    }

    /// Applies the base pipeline's changes to the shadow's tables too.
    pub(super) fn shadow_base(
        &mut self,
        removed: &[FlowIdentity],
        added: &[FlowEntry],
        groups: &[datapath::group::Group],
    ) {
        let Some(shadow) = &mut self.shadow else {
            return;
        };
        if let Err(e) = super::services::sync_groups(&mut shadow.tables, groups) {
            tracing::error!(error = %e, "staged policies: cannot install a group in the shadow tables");
            self.shadow = None;
            return;
        }
        for id in removed {
            shadow.tables.remove(id);
        }
        for f in added {
            if let Err(e) = shadow.tables.add(f.clone(), datapath::Time::ZERO) {
                tracing::error!(error = %e, "staged policies: cannot install a base flow in the shadow tables");
                self.shadow = None;
                return;
            }
        }
    }

    /// The lowest free pod port number.
    pub(super) fn free_port(&self) -> Result<PortNo, Error> {
        let used: BTreeSet<u32> = self.locals.iter().map(|l| l.no.0).collect();
        (FIRST_POD_PORT..FIRST_TUNNEL_PORT)
            .find(|n| !used.contains(n))
            .map(PortNo)
            .ok_or(Error::NoFreePort(used.len()))
    }

    /// Tunnel peers from the cluster's nodes: every other node with pod CIDRs
    /// and an address of the tunnel's family. Port numbers stay stable.
    pub(super) fn refresh_peers(&mut self) {
        let Some(tunnel) = &self.tunnel else {
            return;
        };
        let v6 = tunnel.is_ipv6();
        let mut peers: Vec<Peer> = Vec::new();
        for node in self.compiler.cluster().nodes() {
            if Some(&node.name) == self.local_node.as_ref() || node.pod_cidrs.is_empty() {
                continue;
            }
            let Some(addr) = node.addresses.iter().find(|a| a.is_ipv6() == v6) else {
                continue;
            };
            let known = self.peers.iter().find(|p| p.node == node.name);
            let no = match known {
                Some(p) => p.no,
                None => {
                    let used: BTreeSet<PortNo> =
                        self.peers.iter().chain(&peers).map(|p| p.no).collect();
                    (FIRST_TUNNEL_PORT..GATEWAY_PORT.0)
                        .map(PortNo)
                        .find(|p| !used.contains(p))
                        .expect("fewer nodes than tunnel port numbers")
                }
            };
            peers.push(Peer {
                no,
                node: node.name.clone(),
                addr: tunnel.peer_addr(*addr),
                pod_cidrs: node.pod_cidrs.clone(),
                counters: known.map_or_else(Arc::default, |p| p.counters.clone()),
            });
        }
        self.topology.tunnels = peers
            .iter()
            .map(|p| TunnelPeer {
                port: p.no,
                node: p.node.clone(),
                pod_cidrs: p.pod_cidrs.clone(),
            })
            .collect();
        self.peers = peers;
    }

    /// Who new connections are charged to: each attached pod (by its
    /// addresses), within its namespace.
    pub(super) fn refresh_owners(&mut self, conntrack: &datapath::Conntrack) {
        let (per_pod, per_ns) = self.ct_limits;
        let mut owners = HashMap::new();
        let mut ns_owners = HashMap::new();
        let mut by_addr = HashMap::new();
        for p in &self.topology.pods {
            let ns = ns_owners
                .entry(p.pod.namespace.clone())
                .or_insert_with(|| {
                    self.ns_owners
                        .get(&p.pod.namespace)
                        .filter(|o| o.limit == per_ns)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(Owner::new(p.pod.namespace.clone(), per_ns, None))
                        })
                })
                .clone();
            let owner = self
                .owners
                .get(&p.pod)
                .filter(|o| o.limit == per_pod)
                .cloned()
                .unwrap_or_else(|| Arc::new(Owner::new(p.pod.to_string(), per_pod, Some(ns))));
            for ip in &p.ips {
                by_addr.insert(datapath::key::ip_to_wide(*ip), owner.clone());
            }
            owners.insert(p.pod.clone(), owner);
        }
        self.owners = owners;
        self.ns_owners = ns_owners;
        conntrack.set_owners(by_addr);
    }

    /// The port set packet threads will read.
    pub(super) fn port_set(&self) -> PortSet {
        let mut set = PortSet::default();
        for l in &self.locals {
            set.ports
                .insert(l.no, (set.endpoints.len(), l.counters.clone()));
            for queue in 0..l.queues.len() {
                set.endpoints.push(l.endpoint(queue));
            }
        }
        if let Some(tunnel) = &self.tunnel {
            let i = set.endpoints.len();
            for (queue, state) in self.tunnel_states.iter().enumerate() {
                set.endpoints.push(IoEndpoint {
                    io: Arc::new(VxlanPort::new(
                        tunnel.clone(),
                        queue,
                        self.peers.iter().map(|p| (p.no, p.addr)),
                    )),
                    own: None,
                    queue,
                    state: state.clone(),
                });
            }
            for p in &self.peers {
                set.ports.insert(p.no, (i, p.counters.clone()));
            }
        }
        set
    }
}
