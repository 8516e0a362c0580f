//! The switch: ports, policy and the packet thread, around one datapath.
//!
//! Owns what vswitchd runs: the set of attached TAP ports, the policy compiler
//! with the cluster model, and the pipeline built from both (base tables for the
//! ports + compiled policy), republished atomically after every change. Packet
//! threads poll the ports, run frames through a datapath `Worker` and write them
//! to the ports the verdict names. Until a port is attached and its flows
//! published, its frames are dropped (fail closed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use datapath::{Datapath, DatapathConfig, DropReason, FlowEntry, FlowIdentity, PortNo, Time};
use policy::compile::{
    Change, Compiler, EGRESS_TABLE, FlowDiff, INGRESS_TABLE, KIND_MANUAL, is_manual,
};
use policy::model::{ObjectKey, Pod};
use policy::pipeline::{Gateway, PodPort, Topology, base_flows};

use crate::sys::{self, VNET_HDR_LEN};
use crate::tap::Tap;

/// Frames read from one port before moving to the next.
const BATCH: usize = 64;
/// Largest frame a TAP device hands us (a 64 KiB TSO segment), plus its
/// virtio-net header.
const MAX_FRAME: usize = 65_535 + VNET_HDR_LEN;
/// Bytes kept free in front of every frame in the packet buffer: room for a
/// virtio-net header and a VXLAN header, so headers are put in front or taken
/// off without copying the frame.
const HEADROOM: usize = 32;
/// The VXLAN header.
const VXLAN_LEN: usize = 8;
/// VXLAN flags: the network identifier is valid.
const VXLAN_I: u8 = 0x08;
/// VXLAN flags, a reserved bit vswitch uses between its own nodes: a
/// virtio-net header (segmentation/checksum offload) follows.
const VXLAN_VNET: u8 = 0x01;
/// Token of the tunnel socket in the packet thread's epoll set.
const TUNNEL_TOKEN: u64 = u64::MAX;

/// Switch errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {0} is already attached")]
    AlreadyAttached(ObjectKey),
    #[error("pod {0} is not attached")]
    NotAttached(ObjectKey),
    #[error("failed to install flows")]
    Flows(#[source] datapath::flow::FlowError),
    #[error("failed to start the packet thread")]
    Thread(#[source] std::io::Error),
    #[error("bad flow")]
    BadFlow(#[source] datapath::OfctlError),
    #[error(
        "a compiled flow has the same table, priority and match; use another priority to override it"
    )]
    CompiledFlow,
    #[error("no manual flow with this table, priority and match (add it with add-flow)")]
    NoManualFlow,
}

/// Why the switch itself (not the pipeline) dropped a frame on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortDrop {
    /// The output port's queue was full (the pod is not reading).
    TxFull,
    /// Writing to the output port failed.
    TxError,
    /// Reading from the port failed.
    RxError,
    /// A segmentation-offload frame was bound for a port without offloads.
    OffloadMismatch,
}

impl PortDrop {
    pub const ALL: [PortDrop; 4] = [
        PortDrop::TxFull,
        PortDrop::TxError,
        PortDrop::RxError,
        PortDrop::OffloadMismatch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PortDrop::TxFull => "tx_full",
            PortDrop::TxError => "tx_error",
            PortDrop::RxError => "rx_error",
            PortDrop::OffloadMismatch => "offload_mismatch",
        }
    }
}

/// Counters of one port; they live as long as the port is attached.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames received on this port that the pipeline dropped, by reason.
    pipeline_drops: [AtomicU64; DropReason::ALL.len()],
    /// Frames the switch dropped on this port, by reason.
    port_drops: [AtomicU64; PortDrop::ALL.len()],
}

impl PortCounters {
    /// Drops by reason name (pipeline reasons and port reasons), zeros included.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .zip(&self.pipeline_drops)
            .map(|(r, c)| (r.name(), c.load(Relaxed)))
            .chain(
                PortDrop::ALL
                    .iter()
                    .zip(&self.port_drops)
                    .map(|(r, c)| (r.name(), c.load(Relaxed))),
            )
            .collect()
    }

    fn port_drop(&self, reason: PortDrop) {
        self.port_drops[reason as usize].fetch_add(1, Relaxed);
    }
}

/// One port as packet threads see it.
#[derive(Debug, Clone)]
struct Port {
    no: PortNo,
    tap: Arc<Tap>,
    counters: Arc<PortCounters>,
}

/// The UDP socket other nodes' pods are reached through (VXLAN).
#[derive(Debug)]
pub struct TunnelIo {
    socket: std::net::UdpSocket,
    vni: u32,
    port: u16,
    /// Datagrams dropped: not VXLAN, another VNI, or from an unknown node.
    pub rx_rejected: AtomicU64,
}

/// A tunnel port as reported: the node behind it, its address, counters.
#[derive(Debug, Clone)]
pub struct TunnelPort {
    pub no: PortNo,
    pub node: String,
    pub addr: std::net::SocketAddr,
    pub pod_cidrs: Vec<ipnet::IpNet>,
    pub counters: Arc<PortCounters>,
}

/// A tunnel port: another node.
#[derive(Debug, Clone)]
struct Peer {
    no: PortNo,
    node: String,
    addr: std::net::SocketAddr,
    pod_cidrs: Vec<ipnet::IpNet>,
    counters: Arc<PortCounters>,
}

/// The ports packet threads read and write.
#[derive(Debug, Default)]
struct PortSet {
    ports: Vec<Port>,
    by_no: HashMap<PortNo, usize>,
    tunnel: Option<Arc<TunnelIo>>,
    peers: HashMap<PortNo, Peer>,
    peer_by_ip: HashMap<IpAddr, PortNo>,
}

impl PortSet {
    fn new(ports: Vec<Port>, tunnel: Option<Arc<TunnelIo>>, peers: &[Peer]) -> PortSet {
        let by_no = ports.iter().enumerate().map(|(i, p)| (p.no, i)).collect();
        PortSet {
            ports,
            by_no,
            tunnel,
            peers: peers.iter().map(|p| (p.no, p.clone())).collect(),
            peer_by_ip: peers.iter().map(|p| (p.addr.ip(), p.no)).collect(),
        }
    }

    fn get(&self, p: PortNo) -> Option<&Port> {
        self.by_no.get(&p).map(|&i| &self.ports[i])
    }
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

#[derive(Debug)]
struct Control {
    compiler: Compiler,
    topology: Topology,
    ports: Vec<Port>,
    next_port: u32,
    /// The base-pipeline flows installed, by identity.
    base: HashMap<FlowIdentity, FlowEntry>,
    /// Policy flow diffs compiled but not yet published, in order.
    pending: Vec<FlowDiff>,
    /// False after a failed publish: the next one reinstalls everything.
    in_sync: bool,
    /// Compile time accumulated since the last publish.
    compile_time: Duration,
    last: Realisation,
    /// Node of pods attached here (own-node traffic), when known.
    local_node: Option<String>,
    /// Flows added by hand (`flowctl add-flow`), kept across recompiles.
    manual: HashMap<FlowIdentity, FlowEntry>,
    /// Whether a pod attached before its Pod object is known stays cut off
    /// until it is (Kubernetes mode: fail closed) rather than running unlabelled.
    isolate_unknown: bool,
    /// Pods attached but not yet known to the cluster model (isolated).
    unresolved: Vec<PodPort>,
    tunnel: Option<Arc<TunnelIo>>,
    /// Tunnel ports, one per other node with pods, kept across republication.
    peers: Vec<Peer>,
}

/// First tunnel port number.
const FIRST_TUNNEL_PORT: u32 = 0xf000;

impl Control {
    /// Tunnel peers from the cluster's nodes: every other node with pod CIDRs
    /// and an address of the tunnel's family. Port numbers stay stable.
    fn refresh_peers(&mut self) {
        let Some(tunnel) = &self.tunnel else {
            return;
        };
        let local = tunnel.socket.local_addr().map(|a| a.ip());
        let v6 = local.as_ref().is_ok_and(IpAddr::is_ipv6);
        let mut peers = Vec::new();
        let mut tunnels = Vec::new();
        for node in self.compiler.cluster().nodes() {
            if Some(&node.name) == self.local_node.as_ref() || node.pod_cidrs.is_empty() {
                continue;
            }
            let Some(addr) = node.addresses.iter().find(|a| a.is_ipv6() == v6) else {
                continue;
            };
            let no = match self.peers.iter().find(|p| p.node == node.name) {
                Some(p) => p.no,
                None => {
                    let used: std::collections::HashSet<PortNo> = self
                        .peers
                        .iter()
                        .chain(&peers)
                        .map(|p: &Peer| p.no)
                        .collect();
                    (FIRST_TUNNEL_PORT..)
                        .map(PortNo)
                        .find(|p| !used.contains(p))
                        .expect("a free tunnel port")
                }
            };
            let counters = self
                .peers
                .iter()
                .find(|p| p.node == node.name)
                .map_or_else(Arc::default, |p| p.counters.clone());
            peers.push(Peer {
                no,
                node: node.name.clone(),
                addr: std::net::SocketAddr::new(*addr, tunnel.port),
                pod_cidrs: node.pod_cidrs.clone(),
                counters,
            });
            tunnels.push(policy::pipeline::TunnelPeer {
                port: no,
                node: node.name.clone(),
                pod_cidrs: node.pod_cidrs.clone(),
            });
        }
        self.peers = peers;
        self.topology.tunnels = tunnels;
    }
}

impl Control {
    fn compile(&mut self, change: Change) {
        let _span = tracing::debug_span!("compile", change = change.describe()).entered();
        let t = Instant::now();
        let diff = self.compiler.apply(change);
        self.compile_time += t.elapsed();
        if !diff.is_empty() {
            self.pending.push(diff);
        }
    }
}

/// A new connection the pipeline allowed (committed) or a policy table denied:
/// what the audit log and the per-rule metrics are made of.
#[derive(Debug, Clone, Copy)]
pub struct ConnEvent {
    pub key: datapath::FlowKey,
    pub allowed: bool,
    pub at: SystemTime,
}

/// Where packet threads send connection events (bounded: when the consumer
/// falls behind, events are counted as lost, never waited for).
#[derive(Debug)]
struct EventSink {
    tx: std::sync::mpsc::SyncSender<ConnEvent>,
    lost: AtomicU64,
}

/// A running switch.
#[derive(Debug)]
pub struct Switch {
    dp: Arc<Datapath>,
    events: std::sync::OnceLock<EventSink>,
    ports: ArcSwap<PortSet>,
    control: Mutex<Control>,
    stop: AtomicBool,
    epoch: Instant,
}

impl Switch {
    pub fn new(config: DatapathConfig) -> Arc<Switch> {
        Switch::build(config, Compiler::new())
    }

    /// A switch enforcing `cluster` from the start (compiled in one pass, not
    /// object by object), with no ports yet.
    ///
    /// Fails when the compiled flows cannot be installed.
    pub fn with_cluster(
        config: DatapathConfig,
        cluster: policy::model::Cluster,
    ) -> Result<Arc<Switch>, Error> {
        let started = Instant::now();
        let compiler = Compiler::from_cluster(cluster);
        let switch = Switch::build(config, compiler);
        {
            let mut ctl = switch.control();
            ctl.compile_time = started.elapsed();
            ctl.in_sync = false;
            switch.publish(&mut ctl)?;
        }
        Ok(switch)
    }

    fn build(config: DatapathConfig, compiler: Compiler) -> Arc<Switch> {
        Arc::new(Switch {
            dp: Datapath::new(config),
            events: std::sync::OnceLock::new(),
            ports: ArcSwap::from_pointee(PortSet::default()),
            control: Mutex::new(Control {
                compiler,
                topology: Topology {
                    zone: 1,
                    ..Topology::default()
                },
                ports: Vec::new(),
                next_port: 1,
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
                peers: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.dp
    }

    /// The switch's clock (monotonic, since start).
    pub fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_nanos() as u64)
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the port set, then the flows: the base pipeline's diff against
    /// what is installed plus the pending policy diffs, as one generation (after a
    /// failed publish, every flow instead). Packet threads never see a flow that
    /// outputs to a port they do not know.
    fn publish(&self, ctl: &mut Control) -> Result<u64, Error> {
        let _span = tracing::debug_span!("publish").entered();
        let started = Instant::now();
        ctl.refresh_peers();
        self.ports.store(Arc::new(PortSet::new(
            ctl.ports.clone(),
            ctl.tunnel.clone(),
            &ctl.peers,
        )));
        let base: HashMap<FlowIdentity, FlowEntry> = base_flows(&ctl.topology)
            .into_iter()
            .map(|f| (f.identity(), f))
            .collect();
        let pending = std::mem::take(&mut ctl.pending);
        let now = self.now();
        let result = if ctl.in_sync {
            self.dp.update(now, |t| {
                let mut changed = 0;
                for id in ctl.base.keys().filter(|id| !base.contains_key(id)) {
                    changed += usize::from(t.remove(id));
                }
                for (id, f) in &base {
                    if ctl.base.get(id) != Some(f) {
                        t.add(f.clone(), now)?;
                        changed += 1;
                    }
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
            let flows: Vec<FlowEntry> =
                base.values().cloned().chain(ctl.compiler.flows()).collect();
            self.dp.update(now, |t| {
                t.apply(flows, |_| true, now)
                    .map(|s| s.added + s.modified + s.deleted)
            })
        };
        match result {
            Ok((changed, generation)) => {
                ctl.base = base;
                ctl.in_sync = true;
                let compile = ctl.compile_time;
                metrics::histogram!("vswitch_policy_compile_seconds").record(compile.as_secs_f64());
                metrics::histogram!("vswitch_policy_realisation_seconds")
                    .record((compile + started.elapsed()).as_secs_f64());
                tracing::debug!(
                    generation,
                    flows_changed = changed,
                    compile_us = compile.as_micros() as u64,
                    publish_us = started.elapsed().as_micros() as u64,
                    "published"
                );
                ctl.last = Realisation {
                    generation,
                    flows_changed: changed,
                    compile: std::mem::take(&mut ctl.compile_time),
                    publish: started.elapsed(),
                    at: Some(SystemTime::now()),
                };
                Ok(generation)
            }
            Err(e) => {
                ctl.in_sync = false;
                Err(Error::Flows(e))
            }
        }
    }

    /// Adds (or with `modify`, changes the actions of) a manual flow, given in
    /// ovs-ofctl syntax. Manual flows are for debugging: their cookie is marked
    /// manual, they stay until deleted or vswitchd restarts, and never replace a
    /// compiled flow (a compiled flow added later with the same table, priority
    /// and match replaces them).
    ///
    /// Fails on a flow that does not parse or validate, one that collides with
    /// a compiled flow, and (with `modify`) when no such manual flow exists.
    pub fn add_manual_flow(&self, text: &str, modify: bool) -> Result<(), Error> {
        let mut flow = datapath::parse_flow(text).map_err(Error::BadFlow)?;
        flow.cookie = datapath::Cookie(KIND_MANUAL | (flow.cookie.0 & ((1 << 56) - 1)));
        let id = flow.identity();
        let mut ctl = self.control();
        // Adding over an existing manual flow replaces it, like ovs-ofctl.
        if modify && !ctl.manual.contains_key(&id) {
            return Err(Error::NoManualFlow);
        }
        let snap = self.dp.snapshot();
        if let Some(existing) = snap.tables.find(&id).and_then(|i| snap.tables.get(i))
            && !is_manual(existing.entry.cookie)
        {
            return Err(Error::CompiledFlow);
        }
        let now = self.now();
        self.dp
            .update(now, |t| t.add(flow.clone(), now))
            .map_err(Error::Flows)?;
        ctl.manual.insert(id, flow);
        Ok(())
    }

    /// Deletes manual flows: the one with the table, priority and match of
    /// `spec` (ovs-ofctl syntax, actions optional), or all of them. Returns how
    /// many were deleted. Compiled flows cannot be deleted (that would change
    /// what policy enforces); fails when `spec` does not parse.
    pub fn del_manual_flows(&self, spec: Option<&str>) -> Result<usize, Error> {
        let mut ctl = self.control();
        let doomed: Vec<FlowIdentity> = match spec {
            None => ctl.manual.keys().cloned().collect(),
            Some(text) => {
                let text = if text.contains("actions=") {
                    text.to_string()
                } else {
                    format!("{text},actions=drop")
                };
                let flow = datapath::parse_flow(&text).map_err(Error::BadFlow)?;
                let id = flow.identity();
                if !ctl.manual.contains_key(&id) {
                    return Err(Error::NoManualFlow);
                }
                vec![id]
            }
        };
        let now = self.now();
        self.dp
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
            ctl.manual.remove(id);
        }
        Ok(doomed.len())
    }

    /// Sends connection events to the returned receiver from now on (at most
    /// `capacity` waiting). Call before starting packet threads; once only.
    pub fn connection_events(
        &self,
        capacity: usize,
    ) -> Option<std::sync::mpsc::Receiver<ConnEvent>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        self.events
            .set(EventSink {
                tx,
                lost: AtomicU64::new(0),
            })
            .ok()
            .map(|()| rx)
    }

    /// Connection events dropped because their consumer fell behind.
    pub fn events_lost(&self) -> u64 {
        self.events.get().map_or(0, |e| e.lost.load(Relaxed))
    }

    fn emit(&self, frame: &[u8], in_port: PortNo, allowed: bool) {
        if let Some(sink) = self.events.get() {
            let event = ConnEvent {
                key: datapath::parse(in_port, frame),
                allowed,
                at: SystemTime::now(),
            };
            if sink.tx.try_send(event).is_err() {
                sink.lost.fetch_add(1, Relaxed);
            }
        }
    }

    /// Explains the first packet of a connection against the current tables
    /// (conntrack assumed new): the verdict with the deciding rules, and the
    /// pods at both ends when known.
    pub fn explain_new(
        &self,
        key: &datapath::FlowKey,
    ) -> (
        policy::explain::Verdict,
        Option<ObjectKey>,
        Option<ObjectKey>,
    ) {
        use datapath::field::ct_state::{NEW, TRK};
        let snap = self.dp.snapshot();
        let trace = datapath::trace::trace(
            &snap.tables,
            key,
            datapath::trace::CtSource::Assume(TRK | NEW),
        );
        let ctl = self.control();
        let pod = |ip| ctl.compiler.cluster().pod_by_ip(ip).map(|p| p.key.clone());
        (
            policy::explain::explain(&ctl.compiler, &trace),
            pod(key.src_ip()),
            pod(key.dst_ip()),
        )
    }

    /// The last policy realisation.
    pub fn realisation(&self) -> Realisation {
        self.control().last
    }

    /// Marks pods attached from now on as running on `node` (own-node traffic).
    pub fn set_local_node(&self, node: &str) {
        self.control().local_node = Some(node.to_string());
    }

    /// Pods attached before their Pod object is known get no flows (their frames
    /// are dropped, nothing is forwarded to them) until it is.
    pub fn set_isolate_unknown(&self, isolate: bool) {
        self.control().isolate_unknown = isolate;
    }

    /// Attaches a pod's TAP device with its MAC and addresses; the pod's labels
    /// come from the cluster model. A pod not known yet runs without labels
    /// until it is, or, with [`Switch::set_isolate_unknown`], gets no flows.
    ///
    /// Fails when the pod is already attached or the flows cannot be installed.
    pub fn attach(
        &self,
        tap: Tap,
        pod: ObjectKey,
        mac: [u8; 6],
        ips: Vec<IpAddr>,
    ) -> Result<PortNo, Error> {
        let mut ctl = self.control();
        if ctl
            .topology
            .pods
            .iter()
            .chain(&ctl.unresolved)
            .any(|p| p.pod == pod)
        {
            return Err(Error::AlreadyAttached(pod));
        }
        let port = PortNo(ctl.next_port);
        ctl.next_port += 1;
        ctl.ports.push(Port {
            no: port,
            tap: Arc::new(tap),
            counters: Arc::default(),
        });
        let pod_port = PodPort {
            port,
            pod: pod.clone(),
            mac,
            ips: ips.clone(),
        };
        let known = ctl.compiler.cluster().pod(&pod).cloned();
        if known.is_none() && ctl.isolate_unknown {
            tracing::warn!(%pod, "attached before its Pod object is known: isolated until it is");
            ctl.unresolved.push(pod_port);
            self.publish(&mut ctl)?;
            return Ok(port);
        }
        ctl.topology.pods.push(pod_port);
        let record = Pod {
            ips,
            node: ctl.local_node.clone(),
            ..known.unwrap_or(Pod {
                key: pod,
                labels: Default::default(),
                ips: vec![],
                node: None,
                ports: vec![],
            })
        };
        ctl.compile(Change::Pod(record));
        self.publish(&mut ctl)?;
        Ok(port)
    }

    /// Detaches a pod: its port and flows go away; its TAP fd is closed.
    pub fn detach(&self, pod: &ObjectKey) -> Result<(), Error> {
        let mut ctl = self.control();
        if let Some(i) = ctl.unresolved.iter().position(|p| &p.pod == pod) {
            let port = ctl.unresolved.remove(i).port;
            ctl.ports.retain(|p| p.no != port);
            self.publish(&mut ctl)?;
            return Ok(());
        }
        let Some(i) = ctl.topology.pods.iter().position(|p| &p.pod == pod) else {
            return Err(Error::NotAttached(pod.clone()));
        };
        let port = ctl.topology.pods.remove(i).port;
        ctl.ports.retain(|p| p.no != port);
        ctl.compile(Change::PodDeleted(pod.clone()));
        self.publish(&mut ctl)?;
        Ok(())
    }

    /// Reaches other nodes' pods through `socket` (VXLAN, network identifier
    /// `vni`, peers' UDP port `port`), one tunnel port per node of the cluster
    /// model with pod CIDRs.
    ///
    /// Fails when the socket cannot be made non-blocking or flows cannot be installed.
    pub fn set_tunnel(
        &self,
        socket: std::net::UdpSocket,
        vni: u32,
        port: u16,
    ) -> Result<(), Error> {
        socket.set_nonblocking(true).map_err(Error::Thread)?;
        let mut ctl = self.control();
        ctl.tunnel = Some(Arc::new(TunnelIo {
            socket,
            vni,
            port,
            rx_rejected: AtomicU64::new(0),
        }));
        self.publish(&mut ctl)?;
        Ok(())
    }

    /// Tunnel ports, and the datagrams rejected (not VXLAN, another VNI, or
    /// from an unknown node).
    pub fn tunnel_counters(&self) -> (Vec<TunnelPort>, u64) {
        let ctl = self.control();
        (
            ctl.peers
                .iter()
                .map(|p| TunnelPort {
                    no: p.no,
                    node: p.node.clone(),
                    addr: p.addr,
                    pod_cidrs: p.pod_cidrs.clone(),
                    counters: p.counters.clone(),
                })
                .collect(),
            ctl.tunnel
                .as_ref()
                .map_or(0, |t| t.rx_rejected.load(Relaxed)),
        )
    }

    /// Service (ClusterIP) ranges: pods' traffic to them is decided after the
    /// node's kernel translates it (see `policy::pipeline::Topology`).
    pub fn set_service_cidrs(&self, cidrs: Vec<ipnet::IpNet>) -> Result<(), Error> {
        let mut ctl = self.control();
        ctl.topology.service_cidrs = cidrs;
        self.publish(&mut ctl)?;
        Ok(())
    }

    /// Sets the gateway port.
    pub fn set_gateway(&self, tap: Tap, mac: [u8; 6], ips: Vec<IpAddr>) -> Result<PortNo, Error> {
        let mut ctl = self.control();
        let port = PortNo(0xfffe);
        ctl.ports.retain(|p| p.no != port);
        ctl.ports.push(Port {
            no: port,
            tap: Arc::new(tap),
            counters: Arc::default(),
        });
        ctl.topology.gateway = Some(Gateway { port, mac, ips });
        self.publish(&mut ctl)?;
        Ok(port)
    }

    /// Applies a cluster change (policy, namespace, pod labels, node) and
    /// republishes.
    pub fn apply(&self, change: Change) -> Result<u64, Error> {
        self.apply_all([change])
    }

    /// Applies cluster changes and publishes them as one generation. A pod
    /// attached here keeps the addresses it was attached with and its node.
    pub fn apply_all(&self, changes: impl IntoIterator<Item = Change>) -> Result<u64, Error> {
        let mut ctl = self.control();
        for change in changes {
            let change = match change {
                Change::Pod(mut pod) => {
                    // A pod attached before it was known: it gets its flows now.
                    if let Some(i) = ctl.unresolved.iter().position(|p| p.pod == pod.key) {
                        let resolved = ctl.unresolved.remove(i);
                        tracing::info!(pod = %pod.key, "Pod object known: its port gets flows");
                        ctl.topology.pods.push(resolved);
                    }
                    if let Some(p) = ctl.topology.pods.iter().find(|p| p.pod == pod.key) {
                        pod.ips = p.ips.clone();
                        if ctl.local_node.is_some() {
                            pod.node = ctl.local_node.clone();
                        }
                    }
                    Change::Pod(pod)
                }
                // A deleted pod still attached here: with isolation on, its port
                // is cut off until the pod comes back (or CNI DEL detaches it).
                Change::PodDeleted(key) => {
                    if ctl.isolate_unknown
                        && let Some(i) = ctl.topology.pods.iter().position(|p| p.pod == key)
                    {
                        let gone = ctl.topology.pods.remove(i);
                        tracing::warn!(pod = %key, "Pod object deleted while attached: isolated");
                        ctl.unresolved.push(gone);
                    }
                    Change::PodDeleted(key)
                }
                other => other,
            };
            ctl.compile(change);
        }
        self.publish(&mut ctl)
    }

    /// Attached ports: (port, pod or `None` for the gateway, TAP name, counters).
    pub fn port_counters(&self) -> Vec<(PortNo, Option<ObjectKey>, String, Arc<PortCounters>)> {
        let ctl = self.control();
        ctl.ports
            .iter()
            .map(|p| {
                let pod = ctl
                    .topology
                    .pods
                    .iter()
                    .chain(&ctl.unresolved)
                    .find(|x| x.port == p.no)
                    .map(|x| x.pod.clone());
                (p.no, pod, p.tap.name().to_string(), p.counters.clone())
            })
            .collect()
    }

    /// Runs `f` with the compiler (for provenance lookups).
    pub fn with_compiler<T>(&self, f: impl FnOnce(&Compiler) -> T) -> T {
        f(&self.control().compiler)
    }

    /// Traces a new connection from `src` to `dst` against the live tables and
    /// the live conntrack table (read only); returns the trace view
    /// (`policy::explain::trace_view`).
    ///
    /// Fails when an endpoint is unknown or the two share no address family.
    pub fn trace(
        &self,
        src: &policy::offline::Endpoint,
        dst: &policy::offline::Endpoint,
        l4: policy::offline::L4,
    ) -> Result<serde_json::Value, String> {
        let ctl = self.control();
        let key = policy::offline::packet(ctl.compiler.cluster(), &ctl.topology, src, dst, l4)?;
        let snap = self.dp.snapshot();
        let trace = datapath::trace::trace(
            &snap.tables,
            &key,
            datapath::trace::CtSource::Live(&self.dp.conntrack, self.now()),
        );
        let verdict = policy::explain::explain(&ctl.compiler, &trace);
        let traced = policy::offline::Traced {
            key,
            trace,
            verdict,
        };
        Ok(policy::explain::trace_view(
            &ctl.compiler,
            &ctl.topology,
            src,
            dst,
            l4,
            &traced,
            false,
        ))
    }

    /// Starts a packet thread. After forwarding, it keeps polling its ports
    /// without sleeping for `busy_poll` (lower latency for more CPU).
    pub fn spawn_packet_thread(
        self: &Arc<Self>,
        name: &str,
        busy_poll: Duration,
    ) -> Result<JoinHandle<()>, Error> {
        let me = self.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || me.packet_loop(busy_poll))
            .map_err(Error::Thread)
    }

    /// Asks packet threads to stop (they notice within one poll timeout).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    fn packet_loop(&self, busy_poll: Duration) {
        let mut worker = self.dp.worker();
        // Every frame sits at buf[start..end] with at least HEADROOM - VNET_HDR_LEN
        // free bytes in front; a virtio-net header, when the frame came with one,
        // sits right before it.
        let mut buf = vec![0u8; MAX_FRAME + HEADROOM];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut ready = Vec::new();
        let mut polled: Option<(Arc<PortSet>, sys::Epoll)> = None;
        let mut last_sweep = self.now();
        let mut last_work = Instant::now();
        while !self.stop.load(Relaxed) {
            // (Re)register the ports when the set changed.
            let current = self.ports.load_full();
            if polled
                .as_ref()
                .is_none_or(|(p, _)| !Arc::ptr_eq(p, &current))
            {
                let epoll = match sys::Epoll::new() {
                    Ok(e) => e,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                for (i, p) in current.ports.iter().enumerate() {
                    let _ = epoll.add(p.tap.as_fd(), i as u64);
                }
                if let Some(t) = &current.tunnel {
                    let _ = epoll.add(t.socket.as_fd(), TUNNEL_TOKEN);
                }
                polled = Some((current, epoll));
            }
            let Some((ports_polled, epoll)) = &polled else {
                continue;
            };
            // Right after traffic, spin briefly instead of sleeping: the answer to
            // what was just forwarded usually comes within microseconds, and a
            // sleeping thread takes tens of them to wake.
            let spinning = last_work.elapsed() < busy_poll;
            let timeout = if spinning { 0 } else { 50 };
            if epoll.wait(&mut events, &mut ready, timeout).is_err() || ready.is_empty() {
                if spinning {
                    // Give the CPU to anything else runnable (the pods' own
                    // threads, on a small node): spinning costs only idle time.
                    std::thread::yield_now();
                }
                continue;
            }
            // Ports and flows may have changed while we waited: take both fresh
            // (ports are published before flows, so these ports cover the flows).
            let ports = self.ports.load_full();
            worker.begin_batch();
            let now = self.now();
            for &token in &ready {
                for _ in 0..BATCH {
                    let Some(rx) = self.receive(ports_polled, token, &mut buf) else {
                        break;
                    };
                    self.forward(&mut worker, &ports, now, rx, &mut buf);
                }
            }
            last_work = Instant::now();
            if now.since(last_sweep).as_secs() >= 1 {
                self.dp.conntrack.sweep(now, 4096);
                last_sweep = now;
            }
        }
    }

    /// Reads one frame from the port or tunnel `token` names into `buf`;
    /// `None` when none is waiting.
    fn receive<'p>(&self, ports: &'p PortSet, token: u64, buf: &mut [u8]) -> Option<Received<'p>> {
        if token == TUNNEL_TOKEN {
            let tunnel = ports.tunnel.as_ref()?;
            loop {
                // VXLAN header [+ virtio-net header] + frame, read so that
                // without the optional header the frame starts at HEADROOM - 12.
                let at = HEADROOM - VNET_HDR_LEN - VXLAN_LEN;
                let (n, from) = match tunnel.socket.recv_from(&mut buf[at..]) {
                    Ok(x) => x,
                    Err(_) => return None,
                };
                let h = &buf[at..at + n.min(VXLAN_LEN)];
                let vni = h
                    .get(4..7)
                    .map(|v| u32::from_be_bytes([0, v[0], v[1], v[2]]));
                let peer = ports
                    .peer_by_ip
                    .get(&from.ip())
                    .and_then(|p| ports.peers.get(p));
                let vnet = h.first().is_some_and(|f| f & VXLAN_VNET != 0);
                let hdr = if vnet { VNET_HDR_LEN } else { 0 };
                let valid =
                    n >= VXLAN_LEN + hdr + 14 && h[0] & VXLAN_I != 0 && vni == Some(tunnel.vni);
                let (true, Some(peer)) = (valid, peer) else {
                    tunnel.rx_rejected.fetch_add(1, Relaxed);
                    continue;
                };
                let start = at + VXLAN_LEN + hdr;
                let c = &peer.counters;
                bump(&c.rx_packets, 1);
                bump(&c.rx_bytes, (n - VXLAN_LEN - hdr) as u64);
                return Some(Received {
                    in_port: peer.no,
                    counters: &peer.counters,
                    start,
                    end: at + n,
                    hdr,
                });
            }
        }
        let port = ports.ports.get(token as usize)?;
        let hdr = port.tap.header_len();
        let start = HEADROOM;
        match port.tap.recv(&mut buf[start - hdr..]) {
            Ok(Some(n)) if n >= hdr => {
                let c = &port.counters;
                bump(&c.rx_packets, 1);
                bump(&c.rx_bytes, (n - hdr) as u64);
                Some(Received {
                    in_port: port.no,
                    counters: &port.counters,
                    start,
                    end: start - hdr + n,
                    hdr,
                })
            }
            Ok(None) => None,
            Ok(Some(_)) | Err(_) => {
                port.counters.port_drop(PortDrop::RxError);
                None
            }
        }
    }

    /// Runs one received frame through the pipeline and writes it out.
    fn forward(
        &self,
        worker: &mut datapath::Worker,
        ports: &PortSet,
        now: Time,
        rx: Received<'_>,
        buf: &mut [u8],
    ) {
        let Received {
            in_port,
            counters,
            start,
            end,
            hdr,
        } = rx;
        // Whether the frame needs the header it came with (a TSO segment, or a
        // checksum left to the receiver).
        let offloaded = hdr > 0 && (buf[start - hdr] != 0 || buf[start - hdr + 1] != 0);
        let verdict = worker.process(now, in_port, &mut buf[start..end]);
        if let Some(reason) = verdict.drop {
            counters.pipeline_drops[reason as usize].fetch_add(1, Relaxed);
            let by_policy = verdict
                .decided_by
                .and_then(|id| worker.flow(id))
                .is_some_and(|f| matches!(f.table.0, EGRESS_TABLE | INGRESS_TABLE));
            if by_policy {
                self.emit(&buf[start..end], in_port, false);
            }
            return;
        }
        if verdict.committed {
            self.emit(&buf[start..end], in_port, true);
        }
        let outputs: smallvec::SmallVec<[PortNo; 4]> = verdict.outputs.iter().copied().collect();
        // Whether the bytes before the frame still hold its virtio-net header
        // (a VXLAN header may be written over a header that carried nothing).
        let mut header_intact = hdr > 0;
        for out in outputs {
            let len = (end - start) as u64;
            let (sent, to_counters) = if let Some(peer) = ports.peers.get(&out) {
                let Some(tunnel) = &ports.tunnel else {
                    continue;
                };
                let (at, flags) = if offloaded {
                    (start - VNET_HDR_LEN - VXLAN_LEN, VXLAN_I | VXLAN_VNET)
                } else {
                    header_intact = false;
                    (start - VXLAN_LEN, VXLAN_I)
                };
                let vni = tunnel.vni.to_be_bytes();
                buf[at..at + VXLAN_LEN]
                    .copy_from_slice(&[flags, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
                let r = match tunnel.socket.send_to(&buf[at..end], peer.addr) {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                    Err(e) => Err(e),
                };
                (r, &peer.counters)
            } else if let Some(to) = ports.get(out) {
                let frame = match to.tap.header_len() {
                    0 if offloaded => {
                        to.counters.port_drop(PortDrop::OffloadMismatch);
                        continue;
                    }
                    0 => &buf[start..end],
                    n => {
                        if !header_intact {
                            buf[start - n..start].fill(0);
                        }
                        &buf[start - n..end]
                    }
                };
                (to.tap.send(frame), &to.counters)
            } else {
                continue;
            };
            match sent {
                Ok(true) => {
                    bump(&to_counters.tx_packets, 1);
                    bump(&to_counters.tx_bytes, len);
                }
                Ok(false) => to_counters.port_drop(PortDrop::TxFull),
                Err(_) => to_counters.port_drop(PortDrop::TxError),
            }
        }
    }
}

/// A frame just read: where it is in the buffer and where it came from.
struct Received<'p> {
    in_port: PortNo,
    counters: &'p PortCounters,
    /// The Ethernet frame is `buf[start..end]`.
    start: usize,
    end: usize,
    /// Length of the virtio-net header before it (0: none).
    hdr: usize,
}

/// Counter increment from packet threads (several may write one port's
/// counters, so this is a real read-modify-write).
#[inline(always)]
fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Relaxed);
}
