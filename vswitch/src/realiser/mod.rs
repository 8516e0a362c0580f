//! The realiser: the control plane that turns cluster state and ports into
//! published tables.
//!
//! Owns the policy compiler with the cluster model, the topology (pod ports,
//! gateway, tunnel peers, Service ranges), manual flows, pods attached before
//! their object is known, and the record of each realisation. Its only output
//! is what it publishes: an immutable port set, then the flows as one table
//! generation ([`Published`]); packet threads read nothing else. Until a port is
//! attached and its flows published, its frames are dropped (fail closed).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use datapath::conntrack::Owner;
use datapath::{Datapath, DatapathConfig, FlowEntry, FlowIdentity, PortNo, Time};
use policy::compile::{Change, Compiler, FlowDiff};
use policy::cookie::{CookieKind, is_manual};
use policy::model::ObjectKey;
use policy::pipeline::{Topology, assemble, base_flows};
use policy::status::{PolicyView, Rejections};

use crate::forwarder::Published;
use crate::port::PortCounters;

mod observe;
mod ports;
mod revalidate;
mod services;
mod state;

pub use observe::Explained;

use state::State;

/// Port numbers of pods: `1..FIRST_TUNNEL_PORT`, reused once freed.
pub const FIRST_POD_PORT: u32 = 1;
/// First tunnel port number (one per other node).
pub const FIRST_TUNNEL_PORT: u32 = 0xf000;
/// The gateway's port number.
pub const GATEWAY_PORT: PortNo = PortNo(0xfffe);

/// Realiser errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {0} is already attached")]
    AlreadyAttached(ObjectKey),
    #[error("pod {0} is not attached")]
    NotAttached(ObjectKey),
    #[error("pod {0} was given no queue to attach")]
    NoQueues(ObjectKey),
    #[error("no free port number: {0} pods are attached")]
    NoFreePort(usize),
    #[error("failed to install flows")]
    Flows(#[source] datapath::flow::FlowError),
    #[error("bad flow")]
    BadFlow(#[source] datapath::OfctlError),
    #[error(
        "a compiled flow has the same table, priority and match; use another priority to override it"
    )]
    CompiledFlow,
    #[error("no manual flow with this table, priority and match (add it with add-flow)")]
    NoManualFlow,
}

/// The last policy realisation: a change compiled and its flows published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Realisation {
    /// Generation of the published tables.
    pub generation: u64,
    /// Flows added, modified or removed.
    pub flows_changed: usize,
    /// Time to compile the change(s).
    pub compile: Duration,
    /// Time to publish the flows (copy the tables, edit, swap).
    pub publish: Duration,
    /// When it was published (unix time).
    pub at: Option<SystemTime>,
}

/// What a port is, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRole {
    /// A pod's port (`None` while the pod's object is unknown: isolated).
    Pod(ObjectKey),
    Gateway,
    /// The tunnel to another node: its name, address and pod CIDRs.
    Tunnel {
        node: String,
        addr: std::net::SocketAddr,
        pod_cidrs: Vec<ipnet::IpNet>,
    },
}

/// A port as reported: number, role, counters.
#[derive(Debug, Clone)]
pub struct PortInfo {
    pub no: PortNo,
    pub role: PortRole,
    pub counters: Arc<PortCounters>,
    /// Its queues' packet threads and work done reading them (none for a
    /// tunnel port: the tunnel socket carries them all).
    pub queues: Vec<QueueInfo>,
}

/// One queue of a port: the packet thread reading it, and the work it
/// caused (frames read, plus one per KiB: what the balancer weighs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub lane: usize,
    pub work: u64,
}

/// The control plane of one switch.
#[derive(Debug)]
pub struct Realiser {
    published: Arc<Published>,
    state: Mutex<State>,
    /// Policies a source rejected, per source, with the reason.
    rejections: Mutex<BTreeMap<&'static str, Rejections>>,
    /// What DNS answers taught the switch (for `domainNames` peers).
    learned: Mutex<crate::dns::Learned>,
    /// Bumped by every publish, also one that changes no flow: what an
    /// explanation of a connection was made against (rules' names and the
    /// shadow change without the tables).
    revision: std::sync::atomic::AtomicU64,
}

impl Realiser {
    /// A realiser with no ports and an empty cluster. The datapath's policy
    /// tables are the compiler's (drops there are policy decisions).
    pub fn new(config: DatapathConfig) -> Arc<Realiser> {
        Realiser::build(config, Compiler::new())
    }

    /// A realiser enforcing `cluster` from the start (compiled in one pass, not
    /// object by object), with no ports yet.
    ///
    /// Fails when the compiled flows cannot be installed.
    pub fn with_cluster(
        config: DatapathConfig,
        cluster: policy::cluster::Cluster,
    ) -> Result<Arc<Realiser>, Error> {
        let started = Instant::now();
        let (enforced, staged) = policy::staging::split(cluster);
        let r = Realiser::build(config, Compiler::from_cluster(enforced));
        {
            let mut st = r.state();
            if let Some(all) = staged {
                st.shadow = st.build_shadow(all);
            }
            st.compile_time = started.elapsed();
            st.in_sync = false;
            r.publish(&mut st)?;
        }
        Ok(r)
    }

    fn build(mut config: DatapathConfig, compiler: Compiler) -> Arc<Realiser> {
        config.policy_tables = policy::tables::POLICY_TABLES.to_vec();
        Arc::new(Realiser {
            published: Arc::new(Published::new(Datapath::new(config))),
            state: Mutex::new(State {
                compiler,
                topology: Topology {
                    zone: 1,
                    ..Topology::default()
                },
                locals: Vec::new(),
                base: HashMap::new(),
                pending: Vec::new(),
                in_sync: true,
                compile_time: Duration::ZERO,
                last: Realisation::default(),
                local_node: None,
                manual: HashMap::new(),
                isolate_unknown: false,
                unresolved: Vec::new(),
                tunnel: None,
                tunnel_states: Vec::new(),
                peers: Vec::new(),
                ct_limits: (usize::MAX, usize::MAX),
                owners: HashMap::new(),
                ns_owners: HashMap::new(),
                shadow: None,
                staged_touched: false,
                services: Default::default(),
            }),
            rejections: Mutex::new(BTreeMap::new()),
            learned: Mutex::new(crate::dns::Learned::default()),
            revision: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs `f` on what DNS answers taught the switch.
    pub fn with_learned<T>(&self, f: impl FnOnce(&mut crate::dns::Learned) -> T) -> T {
        f(&mut self
            .learned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Records what `source` rejects now (replacing what it rejected before).
    pub fn set_rejections(&self, source: &'static str, rejected: Rejections) {
        self.rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(source, rejected);
    }

    /// Every policy in force and every rejected one, with its status.
    pub fn policy_views(&self) -> Vec<PolicyView> {
        let mut all = Rejections::new();
        for r in self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            all.extend(r.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let st = self.state();
        // The staged compiler has every policy, staged ones included.
        let compiler = st.shadow.as_ref().map_or(&st.compiler, |s| &s.compiler);
        policy::status::views(compiler, &all)
    }

    /// What packet threads read: the datapath, the port set, the clock.
    pub fn published(&self) -> &Arc<Published> {
        &self.published
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.published.dp
    }

    /// The switch's clock (monotonic, since start).
    pub fn now(&self) -> Time {
        self.published.clock.now()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the port set, then the flows: the base pipeline's diff against
    /// what is installed plus the pending policy diffs, as one generation (after a
    /// failed publish, every flow instead). Packet threads never see a flow that
    /// outputs to a port they do not know.
    /// See `revision`: explanations made before it are stale.
    pub fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::Acquire)
    }

    fn publish(&self, st: &mut State) -> Result<u64, Error> {
        let _span = tracing::debug_span!("publish").entered();
        self.revision
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let started = Instant::now();
        st.refresh_peers();
        st.refresh_owners(&self.published.dp.conntrack);
        st.topology.snoop_dns = st
            .compiler
            .cluster()
            .cluster_policies()
            .any(policy::cnp::ClusterPolicy::has_domain_peers);
        self.published.set_ports(st.port_set());
        st.topology.frontends = if st.topology.load_balance {
            st.services
                .frontends(st.compiler.cluster(), st.local_node.as_deref())
        } else {
            Vec::new()
        };
        let groups = policy::pipeline::groups(&st.topology);
        let base: HashMap<FlowIdentity, FlowEntry> = base_flows(&st.topology)
            .into_iter()
            .map(|f| (f.identity(), f))
            .collect();
        let pending = std::mem::take(&mut st.pending);
        let now = self.now();
        let dp = &self.published.dp;
        let base_removed: Vec<FlowIdentity> = st
            .base
            .keys()
            .filter(|id| !base.contains_key(id))
            .cloned()
            .collect();
        let base_added: Vec<FlowEntry> = base
            .iter()
            .filter(|(id, f)| st.base.get(id) != Some(f))
            .map(|(_, f)| f.clone())
            .collect();
        let unchanged = st.in_sync
            && !std::mem::take(&mut st.staged_touched)
            && pending.iter().all(FlowDiff::is_empty)
            && base_removed.is_empty()
            && base_added.is_empty()
            && {
                let snap = dp.snapshot();
                snap.tables.groups().len() == groups.len()
                    && groups.iter().all(|g| snap.tables.group(g.id) == Some(g))
            };
        if unchanged {
            // Nothing to publish (a change elsewhere in the cluster): the
            // tables, and every packet thread's caches, stay as they are.
            return Ok(dp.snapshot().generation);
        }
        let result = if st.in_sync {
            st.shadow_base(&base_removed, &base_added, &groups);
            dp.update(now, |t| {
                let mut changed = services::sync_groups(t, &groups)?;
                for id in &base_removed {
                    changed += usize::from(t.remove(id));
                }
                for f in &base_added {
                    t.add(f.clone(), now)?;
                    changed += 1;
                }
                for diff in &pending {
                    for id in &diff.deleted {
                        t.remove(id);
                    }
                    for f in diff.added.iter().chain(&diff.modified) {
                        t.add(f.clone(), now)?;
                    }
                    changed += diff.len();
                }
                Ok(changed)
            })
        } else {
            // Everything again; manual flows stay (flowctl still lists them),
            // unless a compiled flow now has their identity.
            if let Some(shadow) = &mut st.shadow
                && let Err(e) = shadow.retable(&st.topology)
            {
                tracing::error!(error = %e, "staged policies: cannot rebuild the shadow tables");
                st.shadow = None;
            }
            let mut flows = assemble(&st.topology, &st.compiler);
            let compiled: std::collections::HashSet<FlowIdentity> =
                flows.iter().map(FlowEntry::identity).collect();
            st.manual.retain(|id, _| !compiled.contains(id));
            flows.extend(st.manual.values().cloned());
            dp.update(now, |t| {
                let groups_changed = services::sync_groups(t, &groups)?;
                t.apply(flows, |_| true, now)
                    .map(|s| s.added + s.modified + s.deleted + groups_changed)
            })
        };
        match result {
            Ok((changed, generation)) => {
                st.base = base;
                st.in_sync = true;
                let compile = std::mem::take(&mut st.compile_time);
                let publish = started.elapsed();
                metrics::histogram!("vswitch_policy_compile_seconds").record(compile.as_secs_f64());
                metrics::histogram!("vswitch_policy_realisation_seconds")
                    .record((compile + publish).as_secs_f64());
                tracing::debug!(
                    generation,
                    flows_changed = changed,
                    compile_us = compile.as_micros() as u64,
                    publish_us = publish.as_micros() as u64,
                    "published"
                );
                st.last = Realisation {
                    generation,
                    flows_changed: changed,
                    compile,
                    publish,
                    at: Some(SystemTime::now()),
                };
                Ok(generation)
            }
            Err(e) => {
                st.in_sync = false;
                Err(Error::Flows(e))
            }
        }
    }

    /// Recompiles and republishes every flow (what follows a failed publish).
    ///
    /// Fails when the flows cannot be installed.
    pub fn resync(&self) -> Result<u64, Error> {
        let mut st = self.state();
        st.in_sync = false;
        self.publish(&mut st)
    }

    /// Adds (or with `modify`, changes the actions of) a manual flow, given in
    /// ovs-ofctl syntax. Manual flows are for debugging: their cookie is marked
    /// manual, they stay until deleted or vswitchd restarts, and never replace a
    /// compiled flow (a compiled flow added later with the same table, priority
    /// and match replaces them). Each change is logged.
    ///
    /// Fails on a flow that does not parse or validate, one that collides with
    /// a compiled flow, and (with `modify`) when no such manual flow exists.
    pub fn add_manual_flow(&self, text: &str, modify: bool) -> Result<(), Error> {
        let mut flow = datapath::parse_flow(text).map_err(Error::BadFlow)?;
        flow.cookie = CookieKind::Manual.cookie(flow.cookie.0);
        let id = flow.identity();
        let mut st = self.state();
        // Adding over an existing manual flow replaces it, like ovs-ofctl.
        if modify && !st.manual.contains_key(&id) {
            return Err(Error::NoManualFlow);
        }
        let snap = self.published.dp.snapshot();
        if let Some(existing) = snap.tables.find(&id).and_then(|i| snap.tables.get(i))
            && !is_manual(existing.entry.cookie)
        {
            return Err(Error::CompiledFlow);
        }
        let now = self.now();
        self.published
            .dp
            .update(now, |t| t.add(flow.clone(), now))
            .map_err(Error::Flows)?;
        tracing::warn!(flow = %flow, modify, "manual flow added by an operator (not policy)");
        st.manual.insert(id, flow);
        Ok(())
    }

    /// Deletes manual flows: the one with the table, priority and match of
    /// `spec` (ovs-ofctl syntax, actions optional), or all of them. Returns how
    /// many were deleted. Compiled flows cannot be deleted (that would change
    /// what policy enforces); fails when `spec` does not parse.
    pub fn del_manual_flows(&self, spec: Option<&str>) -> Result<usize, Error> {
        let mut st = self.state();
        let doomed: Vec<FlowIdentity> = match spec {
            None => st.manual.keys().cloned().collect(),
            Some(text) => {
                let text = if text.contains("actions=") {
                    text.to_string()
                } else {
                    format!("{text},actions=drop")
                };
                let flow = datapath::parse_flow(&text).map_err(Error::BadFlow)?;
                let id = flow.identity();
                if !st.manual.contains_key(&id) {
                    return Err(Error::NoManualFlow);
                }
                vec![id]
            }
        };
        let now = self.now();
        self.published
            .dp
            .update(now, |t| {
                for id in &doomed {
                    let manual = t
                        .find(id)
                        .and_then(|i| t.get(i))
                        .is_some_and(|f| is_manual(f.entry.cookie));
                    if manual {
                        t.remove(id);
                    }
                }
                Ok::<_, datapath::FlowError>(())
            })
            .map_err(Error::Flows)?;
        for id in &doomed {
            if let Some(f) = st.manual.remove(id) {
                tracing::warn!(flow = %f, "manual flow deleted by an operator");
            }
        }
        Ok(doomed.len())
    }

    /// Applies a cluster change (policy, namespace, pod labels, node) and
    /// republishes.
    pub fn apply(&self, change: Change) -> Result<u64, Error> {
        self.apply_all([change])
    }

    /// Applies cluster changes and publishes them as one generation. A pod
    /// attached here keeps the addresses it was attached with and its node.
    pub fn apply_all(&self, changes: impl IntoIterator<Item = Change>) -> Result<u64, Error> {
        let mut st = self.state();
        // Addresses a pod gave up (deleted, or changed): their connections go.
        let mut released: Vec<IpAddr> = Vec::new();
        let mut compiled = Vec::new();
        for change in changes {
            match &change {
                Change::PodDeleted(key) => {
                    if let Some(old) = st.compiler.cluster().pod(key) {
                        released.extend(&old.ips);
                    }
                }
                Change::Pod(pod) => {
                    if let Some(old) = st.compiler.cluster().pod(&pod.key)
                        && !pod.ips.is_empty()
                    {
                        released.extend(old.ips.iter().filter(|ip| !pod.ips.contains(ip)));
                    }
                }
                _ => {}
            }
            let change = match change {
                Change::Pod(mut pod) => {
                    // A pod attached before it was known: it gets its flows now.
                    if let Some(i) = st.unresolved.iter().position(|p| p.pod == pod.key) {
                        let resolved = st.unresolved.remove(i);
                        tracing::info!(pod = %pod.key, "Pod object known: its port gets flows");
                        st.topology.pods.push(resolved);
                    }
                    if let Some(p) = st.topology.pods.iter().find(|p| p.pod == pod.key) {
                        pod.ips = p.ips.clone();
                        if st.local_node.is_some() {
                            pod.node = st.local_node.clone();
                        }
                    }
                    Change::Pod(pod)
                }
                // A deleted pod still attached here: with isolation on, its port
                // is cut off until the pod comes back (or CNI DEL detaches it).
                Change::PodDeleted(key) => {
                    if st.isolate_unknown
                        && let Some(i) = st.topology.pods.iter().position(|p| p.pod == key)
                    {
                        let gone = st.topology.pods.remove(i);
                        tracing::warn!(pod = %key, "Pod object deleted while attached: isolated");
                        st.unresolved.push(gone);
                    }
                    Change::PodDeleted(key)
                }
                other => other,
            };
            compiled.push(change);
        }
        st.compile_all(compiled);
        let generation = self.publish(&mut st)?;
        // Attached pods keep the addresses they were attached with.
        released.retain(|ip| !st.topology.pods.iter().any(|p| p.ips.contains(ip)));
        self.forget_connections(&released);
        self.revalidate_connections(&st);
        Ok(generation)
    }

    /// Drops every tracked connection with an end at one of `ips`.
    fn forget_connections(&self, ips: &[IpAddr]) {
        let wide: Vec<[u8; 16]> = ips
            .iter()
            .map(|ip| datapath::key::ip_to_wide(*ip))
            .collect();
        let n = self.published.dp.conntrack.flush_addresses(&wide);
        if n > 0 {
            tracing::info!(addresses = ?ips, connections = n, "forgot the connections of addresses given up or handed over");
        }
    }

    /// Datagrams the tunnel rejected (not VXLAN, another VNI, an unknown
    /// node), and frames it dropped for an inconsistent virtio-net header.
    pub fn tunnel_rejected(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.state().tunnel.as_ref().map_or((0, 0), |t| {
            (t.rx_rejected.load(Relaxed), t.rx_bad_offload.load(Relaxed))
        })
    }

    /// Runs `f` with the compiler (for provenance lookups).
    pub fn with_compiler<T>(&self, f: impl FnOnce(&Compiler) -> T) -> T {
        f(&self.state().compiler)
    }

    /// The last policy realisation.
    pub fn realisation(&self) -> Realisation {
        self.state().last
    }

    /// Marks pods attached from now on as running on `node` (own-node
    /// traffic), and compiles for that node only: policies' subjects are its
    /// pods (and pods on no node); pods elsewhere are peers.
    pub fn set_local_node(&self, node: &str) {
        let mut st = self.state();
        st.local_node = Some(node.to_string());
        let diff = st.compiler.rescope(Some(node.to_string()));
        if !diff.is_empty() {
            st.pending.push(diff);
        }
    }

    /// How many connections one pod, and one namespace, may have tracked at
    /// once (new ones beyond are dropped and counted as `ct_limit`); existing
    /// connections keep working. Publishes.
    ///
    /// Fails when flows cannot be installed.
    pub fn set_conntrack_limits(&self, per_pod: usize, per_namespace: usize) -> Result<u64, Error> {
        let mut st = self.state();
        st.ct_limits = (per_pod, per_namespace);
        self.publish(&mut st)
    }

    /// Pods and namespaces with tracked connections or refusals: (name,
    /// connections, limit, refused), pods first.
    pub fn conntrack_owners(&self) -> Vec<(String, usize, usize, u64)> {
        let st = self.state();
        let row = |o: &Arc<Owner>| {
            (
                o.name.clone(),
                o.count(),
                o.limit,
                o.refused.load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        let mut pods: Vec<_> = st.owners.values().map(row).collect();
        let mut namespaces: Vec<_> = st.ns_owners.values().map(row).collect();
        pods.sort();
        namespaces.sort();
        pods.into_iter().chain(namespaces).collect()
    }

    /// While sealed nothing is forwarded, from or to any port: what the switch
    /// does until it knows the whole cluster state (Kubernetes mode, until the
    /// first full sync). Publishes.
    ///
    /// Fails when flows cannot be installed.
    pub fn set_sealed(&self, sealed: bool) -> Result<u64, Error> {
        let mut st = self.state();
        st.topology.sealed = sealed;
        if sealed {
            tracing::info!("sealed: nothing is forwarded until the cluster state is known");
        } else {
            tracing::info!("unsealed: forwarding under the synced cluster state");
        }
        self.publish(&mut st)
    }

    /// Pods attached before their Pod object is known get no flows (their frames
    /// are dropped, nothing is forwarded to them) until it is.
    pub fn set_isolate_unknown(&self, isolate: bool) {
        self.state().isolate_unknown = isolate;
    }
}

#[cfg(test)]
mod tests {
    use super::state::Local;
    use super::*;
    use crate::port::{MemoryPort, Port};
    use policy::model::Pod;
    use policy::probe::{Endpoint, L4};

    fn attach(r: &Realiser, name: &str, last: u8) -> PortNo {
        r.attach(
            Arc::new(MemoryPort::new(false)),
            ObjectKey::new("t", name),
            [0x0a, 0x58, 10, 0, 0, last],
            vec![IpAddr::from([10, 0, 0, last])],
        )
        .unwrap()
    }

    #[test]
    fn port_numbers_are_reused_and_never_reach_the_tunnel_range() {
        let r = Realiser::new(DatapathConfig::default());
        let (a, b) = (attach(&r, "a", 1), attach(&r, "b", 2));
        assert_eq!((a, b), (PortNo(1), PortNo(2)));
        r.detach(&ObjectKey::new("t", "a")).unwrap();
        assert_eq!(attach(&r, "c", 3), PortNo(1), "the freed number is reused");
        // However many pods come and go, numbers stay below the tunnel range:
        // with every pod number taken, the next attach is refused rather than
        // wrapping into tunnel or gateway numbers.
        let mut st = r.state();
        let io: Arc<dyn Port> = Arc::new(MemoryPort::new(false));
        st.locals = (FIRST_POD_PORT..FIRST_TUNNEL_PORT)
            .map(|n| Local::new(PortNo(n), vec![io.clone()]))
            .collect();
        assert!(matches!(st.free_port(), Err(Error::NoFreePort(_))));
        st.locals.remove(100);
        assert_eq!(st.free_port().unwrap(), PortNo(101));
    }

    /// A change that compiles to nothing here (a pod on another node, the
    /// policies selecting it) publishes nothing: the tables' generation, and
    /// with it every packet thread's caches, stay. A change to a local pod's
    /// rules does publish.
    #[test]
    fn changes_elsewhere_in_the_cluster_leave_the_tables_alone() {
        let r = Realiser::new(DatapathConfig::default());
        r.set_local_node("here");
        attach(&r, "a", 1);
        let remote = |labels: &[(&str, &str)]| Pod {
            key: ObjectKey::new("t", "far"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec![IpAddr::from([10, 9, 0, 1])],
            node: Some("elsewhere".into()),
            ports: vec![],
        };
        r.apply(Change::Pod(remote(&[("app", "x")]))).unwrap();
        let np: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "far", "namespace": "t"},
                "spec": {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"]},
            }))
            .unwrap();
        let before = r.datapath().snapshot().generation;
        r.apply(Change::Policy(
            policy::model::Policy::from_api(&np).unwrap(),
        ))
        .unwrap();
        r.apply(Change::Pod(remote(&[("app", "x"), ("v", "2")])))
            .unwrap();
        assert_eq!(
            r.datapath().snapshot().generation,
            before,
            "nothing published"
        );
        // The same policy selecting the local pod is enforced at once.
        r.apply(Change::Pod(Pod {
            key: ObjectKey::new("t", "a"),
            labels: [("app".to_string(), "x".to_string())].into(),
            ips: vec![],
            node: None,
            ports: vec![],
        }))
        .unwrap();
        assert!(r.datapath().snapshot().generation > before);
        // Every publish moves the revision that explanations are made against,
        // and a staged policy (no enforced flow changes) still publishes: the
        // staged verdicts of connections are explained anew.
        let (generation, revision) = (r.datapath().snapshot().generation, r.revision());
        r.apply(Change::Pod(remote(&[("app", "x"), ("v", "3")])))
            .unwrap();
        assert!(r.revision() > revision, "explanations go stale");
        let mut staged = policy::model::Policy::from_api(&np).unwrap();
        staged.key = ObjectKey::new("t", "staged");
        staged.staged = true;
        r.apply(Change::Policy(staged)).unwrap();
        assert!(r.datapath().snapshot().generation > generation);
    }

    /// When a pod's object is deleted, or its address changes, every tracked
    /// connection of the address is forgotten (a remote pod's too).
    #[test]
    fn deleted_and_readdressed_pods_lose_their_connections() {
        use datapath::FlowKey;
        let r = Realiser::new(DatapathConfig::default());
        let pod = |name: &str, ip: [u8; 4]| Pod {
            key: ObjectKey::new("t", name),
            labels: Default::default(),
            ips: vec![IpAddr::from(ip)],
            node: Some("elsewhere".into()),
            ports: vec![],
        };
        r.apply_all([
            Change::Pod(pod("x", [10, 1, 0, 1])),
            Change::Pod(pod("y", [10, 1, 0, 2])),
        ])
        .unwrap();
        let ct = &r.datapath().conntrack;
        let conn = |src: [u8; 4]| FlowKey {
            dl_type: 0x0800,
            nw_proto: 17,
            nw_src: datapath::key::ip_to_wide(IpAddr::from(src)),
            nw_dst: datapath::key::ip_to_wide(IpAddr::from([10, 0, 0, 9])),
            tp_src: 1000,
            tp_dst: 53,
            ..FlowKey::default()
        };
        for src in [[10, 1, 0, 1], [10, 1, 0, 2]] {
            ct.commit(r.now(), 1, &conn(src), 60).unwrap();
        }
        r.apply(Change::PodDeleted(ObjectKey::new("t", "x")))
            .unwrap();
        assert_eq!(ct.len(), 1, "x's connection is forgotten");
        r.apply(Change::Pod(pod("y", [10, 1, 0, 3]))).unwrap();
        assert_eq!(ct.len(), 0, "y's old address's connection is forgotten");
    }

    /// Staged policies: traced beside the live tables, following ports that
    /// come after them, gone with the last staged policy, back when one is
    /// staged again; never enforced.
    #[test]
    fn staged_policies_are_traced_beside_the_live_tables() {
        let r = Realiser::new(DatapathConfig::default());
        let pod = |name: &str, last: u8| {
            Change::Pod(Pod {
                key: ObjectKey::new("t", name),
                labels: [("app".to_string(), name.to_string())].into(),
                ips: vec![IpAddr::from([10, 0, 0, last])],
                node: None,
                ports: vec![],
            })
        };
        r.apply_all([pod("a", 1), pod("b", 2), pod("c", 3)])
            .unwrap();
        attach(&r, "a", 1);
        attach(&r, "b", 2);
        let policy = |mode: &str| {
            let mut m = policy::manifest::Manifests::default();
            let yaml = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: b-closed, namespace: t, annotations: {{vswitch.io/mode: {mode}}}}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: b}}}}, policyTypes: [Ingress]}}\n"
            );
            policy::manifest::load_str(&mut m, std::path::Path::new("p.yaml"), &yaml);
            assert!(m.errors.is_empty(), "{:?}", m.errors);
            Change::Policy(m.policies.remove(0))
        };
        let to_b = |from: &str| {
            let v = r
                .trace(
                    &Endpoint::Pod(ObjectKey::new("t", from)),
                    &Endpoint::Pod(ObjectKey::new("t", "b")),
                    L4::Tcp(80),
                )
                .unwrap();
            (v.verdict, v.staged.map(|s| s.verdict))
        };
        assert_eq!(to_b("a"), ("allow".into(), None), "nothing staged");
        r.apply(policy("audit")).unwrap();
        assert_eq!(to_b("a"), ("allow".into(), Some("would deny".into())));
        // A port attached after the policy was staged is in the staged tables.
        attach(&r, "c", 3);
        assert_eq!(to_b("c"), ("allow".into(), Some("would deny".into())));
        // Enforced: denied, nothing staged any more.
        r.apply(policy("enforce")).unwrap();
        assert_eq!(to_b("a"), ("deny".into(), None));
        assert!(r.state().shadow.is_none(), "the staged tables are gone");
        // Staged again: not enforced, reported.
        r.apply(policy("audit")).unwrap();
        assert_eq!(to_b("c"), ("allow".into(), Some("would deny".into())));
        r.detach(&ObjectKey::new("t", "a")).unwrap();
        assert_eq!(to_b("c"), ("allow".into(), Some("would deny".into())));
        r.apply(Change::PolicyDeleted(ObjectKey::new("t", "b-closed")))
            .unwrap();
        assert_eq!(to_b("c"), ("allow".into(), None));
        assert!(r.state().shadow.is_none());
    }

    #[test]
    fn a_full_resync_keeps_manual_flows() {
        let r = Realiser::new(DatapathConfig::default());
        attach(&r, "a", 1);
        r.add_manual_flow(
            "table=0,priority=1000,ip,nw_src=10.0.0.9,actions=drop",
            false,
        )
        .unwrap();
        r.resync().unwrap();
        let snap = r.datapath().snapshot();
        assert!(
            snap.tables.iter().any(|(_, f)| is_manual(f.entry.cookie)),
            "the manual flow is still installed after a full resync"
        );
        assert_eq!(r.del_manual_flows(None).unwrap(), 1);
    }
}
