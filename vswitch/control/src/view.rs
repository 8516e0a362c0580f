//! What vswitchd answers: one typed view per request.
//!
//! Field names are the JSON that `flowctl --output json` prints, so scripts see
//! the same shapes whether they read flowctl or the socket. Traces use
//! [`policy::explain::TraceView`], the shape offline mode prints too.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use policy::explain::TraceView;
pub use policy::status::{PolicyView, RuleView};

/// The answer to hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloView {
    pub protocol: u32,
    /// `vswitchd VERSION`.
    pub server: String,
}

/// What a port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    Pod,
    Gateway,
    Tunnel,
}

/// One port with its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortView {
    pub port: u32,
    pub kind: PortKind,
    /// The pod behind a pod port.
    pub pod: Option<String>,
    /// The node behind a tunnel port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The device (in the pod's namespace), or `vxlan:ADDRESS` for a tunnel.
    pub ifname: String,
    pub netns: Option<String>,
    pub mac: Option<String>,
    pub ips: Option<Vec<IpAddr>>,
    /// Whether the port can be read and written (a pod that deleted its
    /// interface leaves its port down).
    #[serde(default = "yes")]
    pub up: bool,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames dropped on this port, by reason (zeros included).
    pub drops: BTreeMap<String, u64>,
    /// Its queues (a multiqueue TAP device has several): the packet thread
    /// reading each, and the work it caused (none listed for a tunnel port).
    #[serde(default)]
    pub queues: Vec<QueueView>,
}

/// One queue of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueView {
    /// The packet thread reading it (0-based).
    pub lane: usize,
    /// Frames read from it, plus one per KiB: the load the packet threads
    /// are balanced by.
    pub work: u64,
}

fn yes() -> bool {
    true
}

/// One flow with its counters, ovs-ofctl style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub table: u8,
    pub priority: u16,
    /// `0x...`.
    pub cookie: String,
    #[serde(rename = "match")]
    pub matcher: String,
    pub actions: String,
    /// The whole flow in ovs-ofctl syntax.
    pub flow: String,
    pub n_packets: u64,
    pub n_bytes: u64,
    pub duration_s: f64,
    pub idle_age_s: f64,
    /// Added by hand (`flowctl add-flow`), not policy.
    pub manual: bool,
    /// The policy rule (or pipeline purpose) the cookie names.
    pub rule: String,
}

/// Counters of the two directions of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directions {
    pub orig: u64,
    pub reply: u64,
}

/// One tracked connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnView {
    pub zone: u16,
    pub proto: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub state: String,
    pub timeout_s: u64,
    pub age_s: u64,
    pub packets: Directions,
    pub bytes: Directions,
    /// A translated connection (through a Service): where its original
    /// direction goes after translation, `address:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translated_dst: Option<String>,
    /// ... and from, when its source is translated too (hairpin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translated_src: Option<String>,
}

/// Datapath and control-plane counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub generation: u64,
    pub flows: usize,
    pub masks: usize,
    pub packets: u64,
    pub bytes: u64,
    pub drops: BTreeMap<String, u64>,
    pub cache: CacheView,
    pub conntrack: ConntrackView,
    pub tables: Vec<TableView>,
    pub realisation: RealisationView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheView {
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Hits on entries of older table generations found still right
    /// (counted in `hits` too).
    #[serde(default)]
    pub revalidated: u64,
    pub hit_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackView {
    pub entries: usize,
    pub max: usize,
    /// New connections dropped because the table was full.
    pub full_drops: u64,
    /// New connections dropped because their pod or namespace was at its limit.
    #[serde(default)]
    pub limit_drops: u64,
    /// Pods and namespaces holding connections or refused some.
    #[serde(default)]
    pub owners: Vec<CtOwnerView>,
}

/// A pod's or a namespace's share of the connection table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtOwnerView {
    /// `namespace/pod`, or a namespace.
    pub name: String,
    pub connections: usize,
    pub limit: usize,
    /// New connections refused at the limit.
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableView {
    pub table: u8,
    pub flows: u64,
    pub matched: u64,
    pub missed: u64,
    pub lookups: u64,
}

/// The last policy realisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealisationView {
    pub generation: u64,
    pub flows_changed: usize,
    pub compile_us: u64,
    pub publish_us: u64,
    /// Unix time, seconds.
    pub at: Option<f64>,
    pub at_rfc3339: Option<String>,
}

/// Readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// The cluster state has been synced, compiled and published.
    pub ready: bool,
    /// `manifests` or `kubernetes`.
    pub source: String,
    pub node: String,
    pub generation: u64,
}

/// The answer to del-flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: usize,
}

/// A name learned from DNS answers (for ClusterNetworkPolicy `domainNames`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsView {
    pub name: String,
    pub addresses: Vec<DnsAddress>,
}

/// One learned address and when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAddress {
    pub address: std::net::IpAddr,
    pub expires_in_s: u64,
}

/// Connections the switch has seen recently, summarised per (protocol,
/// source, destination, destination port): what `what-if` replays and the
/// web view shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentView {
    /// How far back the summary reaches (seconds) and how many tuples it
    /// holds at most; older and least recently seen tuples are forgotten.
    pub window_secs: u64,
    pub max_tuples: usize,
    /// Tuples forgotten to stay within `max_tuples`.
    pub evicted: u64,
    pub tuples: Vec<TupleView>,
}

/// One tuple of the recent-connections summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TupleView {
    pub protocol: String,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// The destination port (TCP, UDP, SCTP).
    pub dst_port: Option<u16>,
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    /// New connections allowed and denied attempts, since first seen.
    pub allowed: u64,
    pub denied: u64,
    /// The latest connection's verdict and deciding rule.
    pub verdict: String,
    pub rule: String,
    /// What staged policies would do to it (latest connection), when they
    /// change something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<policy::explain::StagedView>,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
}

/// What a policy set would change about the connections seen recently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhatIfView {
    /// Tuples replayed, and how many connections they stand for.
    pub tuples: usize,
    pub connections: u64,
    pub window_secs: u64,
    /// Policies in the proposed set.
    pub policies: usize,
    pub cluster_policies: usize,
    /// Tuples whose verdict would change, grouped by the change and the
    /// rule that decides it under the proposed set.
    pub changes: Vec<WhatIfGroup>,
}

/// Tuples whose verdict changes the same way, by the same rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhatIfGroup {
    /// `allow -> deny` or `deny -> allow`.
    pub change: String,
    /// The deciding rule under the proposed set.
    pub rule: String,
    /// The rule in force now.
    pub was: String,
    pub connections: u64,
    pub tuples: Vec<TupleView>,
}

/// A Service frontend and where it sends new connections
/// (`flowctl dump-services`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// `namespace/name:port` (the port's name, or its number).
    pub service: String,
    /// `ClusterIP:port/protocol`.
    pub frontend: String,
    /// `sessionAffinity: ClientIP`: its timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<u32>,
    /// Ready backends; none: connections are refused.
    pub backends: Vec<BackendView>,
}

/// One backend of a frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    /// `address:port`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Tracked connections through the frontend to it (live only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

/// The views of `frontends`; `connections(frontend, backend)` counts what
/// conntrack holds (live), or is `None` (offline).
pub fn service_views(
    frontends: &[policy::services::Frontend],
    cluster: &policy::Cluster,
    connections: impl Fn(&policy::services::Frontend, &policy::services::Backend) -> Option<u64>,
) -> Vec<ServiceView> {
    let addr = |ip, port| std::net::SocketAddr::new(ip, port).to_string();
    let mut out: Vec<ServiceView> = frontends
        .iter()
        .map(|f| ServiceView {
            service: f.name(),
            frontend: format!(
                "{}/{}",
                addr(f.ip, f.port),
                f.protocol.name().to_ascii_lowercase()
            ),
            affinity: f.affinity,
            backends: f
                .backends
                .iter()
                .map(|b| BackendView {
                    address: addr(b.ip, b.port),
                    pod: cluster.pod_by_ip(b.ip).map(|p| p.key.to_string()),
                    connections: connections(f, b),
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    out
}
