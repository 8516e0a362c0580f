//! vswitchd's configuration file (TOML).
//!
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;

/// The name of this node when none is configured (standalone).
pub const LOCAL_NODE: &str = "local";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The control socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Where attached ports are recorded, to reattach them after a restart.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Standalone mode: a directory of manifests, watched for changes.
    #[serde(default)]
    pub manifests: Option<PathBuf>,
    /// How often the manifest directory is rescanned, in milliseconds, when
    /// inotify is not available. With inotify (the usual case) edits wake the
    /// watcher at once, and the safety rescan runs every 10 s (or this, if longer).
    #[serde(default = "default_watch_ms")]
    pub watch_interval_ms: u64,
    /// The port towards the node: an internal TAP device in the host namespace.
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    /// Maximum conntrack entries.
    #[serde(default = "default_ct_max")]
    pub conntrack_max: usize,
    /// Connections one pod may have tracked at once (new ones beyond are
    /// dropped and counted as `ct_limit`). Default: `conntrack_max` / 16.
    #[serde(default)]
    pub conntrack_max_per_pod: Option<usize>,
    /// Connections one namespace's pods on this node may have tracked at once.
    /// Default: `conntrack_max` / 4.
    #[serde(default)]
    pub conntrack_max_per_namespace: Option<usize>,
    /// TAP offloads: a virtio-net header on every frame, TSO and checksum offload
    /// carried between ports (much higher TCP throughput). Applies to every port.
    /// On by default.
    #[serde(default = "default_offload")]
    pub offload: bool,
    /// After forwarding, the packet thread keeps polling its ports this long
    /// (microseconds) before it sleeps: lower latency and higher connection
    /// rates for some CPU. 0 turns it off.
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
    /// While traffic arrives at a steady pace, the packet thread polls for up
    /// to twice the gap between arrivals, at most this long (microseconds):
    /// request/response traffic every few milliseconds finds it awake. It
    /// stops polling when the traffic stops (no CPU when idle).
    #[serde(default = "default_busy_poll_max_us")]
    pub busy_poll_max_us: u64,
    /// Packet threads: the ports' queues are spread over them, and moved
    /// between them by load. Default: one per core the process may run on.
    #[serde(default)]
    pub packet_threads: Option<usize>,
    /// Queues of each pod's TAP device (`IFF_MULTI_QUEUE`): the kernel
    /// spreads a pod's outgoing flows over them, and each may be read by
    /// another packet thread, so one busy pod can use several. Default: one
    /// per packet thread, at most 8; 1 makes them single-queue.
    #[serde(default)]
    pub tap_queues: Option<usize>,
    /// The nice value of the packet threads (-20 to 19). Below the pods'
    /// processes (0) by default, so a pod woken by a frame it was just handed
    /// does not preempt the thread forwarding the rest of the burst.
    /// Lowering it below the process's own needs CAP_SYS_NICE;
    /// without it the threads keep the process's value (logged).
    #[serde(default = "default_packet_thread_nice")]
    pub packet_thread_nice: i32,
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. `127.0.0.1:9478`.
    #[serde(default)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The audit log of denied (and optionally allowed) new connections.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// The summary of recent connections that `flowctl what-if` replays and
    /// the web view shows.
    #[serde(default)]
    pub recent: crate::recent::RecentConfig,
    /// Serve the live web view (read only) on `metrics_address` at `/`.
    #[serde(default)]
    pub web: bool,
    /// DNS snooping for ClusterNetworkPolicy `domainNames` peers: which
    /// servers' answers are trusted, and how long learned addresses last.
    #[serde(default)]
    pub dns: crate::dns::DnsConfig,
    /// Where the cluster state comes from: the manifest directory
    /// (`"manifests"`, standalone) or the Kubernetes API server (`"kubernetes"`).
    #[serde(default)]
    pub source: Source,
    /// This node's name (Kubernetes: `spec.nodeName` of the pods attached
    /// here). Default: `$NODE_NAME`, else `local`.
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// The API server connection (with `source = "kubernetes"`).
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Pods on other nodes, through a VXLAN tunnel to each node with pod CIDRs.
    #[serde(default)]
    pub tunnel: Option<TunnelConfig>,
    /// Besides root, members of this group (numeric gid) may use the control
    /// socket (flowctl). Default: root only.
    #[serde(default)]
    pub control_group: Option<u32>,
    /// Service (ClusterIP) ranges. With `services = "kube-proxy"` they are
    /// translated by kube-proxy in the node's kernel: a pod's traffic to them
    /// goes to the node, and its policy is decided on the translated packet
    /// when it comes back. With `services = "switch"` they are informational.
    #[serde(default)]
    pub service_cidrs: Vec<IpNet>,
    /// Who load-balances Services: the switch itself (`"switch"`, the
    /// default: ClusterIPs translated in the datapath, policy decided on the
    /// chosen backend) or the node's kube-proxy (`"kube-proxy"`).
    #[serde(default)]
    pub services: ServicesMode,
}

/// `services`: who load-balances ClusterIP Services.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum ServicesMode {
    #[default]
    #[serde(rename = "switch")]
    Switch,
    #[serde(rename = "kube-proxy")]
    KubeProxy,
}

/// Where the cluster state comes from.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The manifest directory (`manifests`), watched.
    #[default]
    Manifests,
    /// The Kubernetes API server: Namespaces, Pods, Nodes, NetworkPolicies.
    Kubernetes,
}

/// `[tunnel]`: VXLAN over UDP between nodes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// This node's address on the network between nodes (the UDP socket binds
    /// it; peers are reached at their Node address of the same family).
    /// Default: `$NODE_IP` (the DaemonSet sets it from `status.hostIP`).
    #[serde(default)]
    pub local_address: Option<IpAddr>,
    /// UDP port, the same on every node.
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
    /// VXLAN network identifier (24 bits), the same on every node.
    #[serde(default = "default_vni")]
    pub vni: u32,
}

fn default_vxlan_port() -> u16 {
    4789
}

fn default_vni() -> u32 {
    1
}

/// `[kubernetes]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; without it, the in-cluster service account (or
    /// `$KUBECONFIG` / `~/.kube/config`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Write the CNI network configuration for this node here once its pod
    /// CIDR is known (e.g. `/etc/cni/net.d/10-vswitch.conflist`).
    #[serde(default)]
    pub cni_conf: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// TAP device name (1-15 bytes).
    pub name: String,
    /// Gateway address with the pod subnet's prefix, e.g. `10.244.0.1/24`.
    /// With `source = "kubernetes"` it may be left out: the first address of
    /// this node's `spec.podCIDR`.
    #[serde(default)]
    pub address: Option<IpNet>,
    /// The gateway's IPv6 address with the pod subnet's IPv6 prefix, e.g.
    /// `fd00:10:244::1/64`, for dual-stack pods (IPv6 pods route through the
    /// switch's `fe80::1`, answered with the gateway's MAC).
    #[serde(default)]
    pub address6: Option<IpNet>,
    /// Other addresses of this node (for "traffic to the own node is allowed").
    #[serde(default)]
    pub node_addresses: Vec<IpAddr>,
}

fn default_socket() -> PathBuf {
    control::DEFAULT_SOCKET.into()
}

fn default_state_dir() -> PathBuf {
    "/var/lib/vswitch".into()
}

fn default_node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| LOCAL_NODE.to_string())
}

fn default_busy_poll_us() -> u64 {
    200
}

fn default_busy_poll_max_us() -> u64 {
    5000
}

fn default_packet_thread_nice() -> i32 {
    -10
}

fn default_offload() -> bool {
    true
}

fn default_watch_ms() -> u64 {
    100
}

fn default_ct_max() -> usize {
    262_144
}

/// `[audit]` in the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The log file; `-` for stdout.
    pub path: PathBuf,
    /// Rotate when the file would grow past this many bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` is the newest).
    #[serde(default = "default_keep")]
    pub keep: u32,
    /// Log denied new connections.
    #[serde(default = "yes")]
    pub denied: bool,
    /// Log allowed new connections.
    #[serde(default)]
    pub allowed: bool,
    /// A denied connection attempt (a SYN and its retransmissions, a
    /// datagram and its retries) is one line, written once no packet of it
    /// has been dropped for this long (milliseconds), with the number of
    /// packets dropped; at most a minute after its first.
    #[serde(default = "default_attempt_quiet_ms")]
    pub attempt_quiet_ms: u64,
    /// Per-namespace overrides of `denied` / `allowed`, by the namespace of the
    /// deciding policy (or of the pods at either end when no policy decided).
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceAudit>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceAudit {
    pub denied: Option<bool>,
    pub allowed: Option<bool>,
}

fn default_max_bytes() -> u64 {
    10 << 20
}

fn default_keep() -> u32 {
    5
}

fn default_attempt_quiet_ms() -> u64 {
    10_000
}

fn yes() -> bool {
    true
}

impl AuditConfig {
    /// Whether a connection decided in `namespaces` with this verdict is logged.
    pub fn wants(&self, allowed: bool, namespaces: &[&str]) -> bool {
        let global = if allowed { self.allowed } else { self.denied };
        let mut any_override = false;
        for ns in namespaces {
            if let Some(o) = self.namespaces.get(*ns) {
                let v = if allowed { o.allowed } else { o.denied };
                if let Some(v) = v {
                    if v {
                        return true;
                    }
                    any_override = true;
                }
            }
        }
        global && !any_override
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration in {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Packet threads, the default filled in.
    pub fn packet_threads(&self) -> usize {
        self.packet_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Queues per pod TAP device, the default filled in.
    pub fn tap_queues(&self) -> usize {
        self.tap_queues
            .unwrap_or_else(|| self.packet_threads().min(8))
    }

    /// (per pod, per namespace) connection limits, defaults filled in.
    pub fn conntrack_limits(&self) -> (usize, usize) {
        (
            self.conntrack_max_per_pod
                .unwrap_or((self.conntrack_max / 16).max(1)),
            self.conntrack_max_per_namespace
                .unwrap_or((self.conntrack_max / 4).max(1)),
        )
    }

    /// Reads and checks a configuration file.
    ///
    /// Fails on unreadable files, TOML errors, unknown keys, bad values (named),
    /// a gateway name longer than 15 bytes, or a zero watch interval.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Config::parse(&text, &p)
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_string(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_string(),
            message,
        };
        if let Some(g) = &c.gateway
            && (g.name.is_empty() || g.name.len() > 15)
        {
            return Err(invalid(format!(
                "gateway.name {:?} must be 1-15 bytes",
                g.name
            )));
        }
        if let Some(g) = &c.gateway
            && let Some(a6) = g.address6
            && (a6.addr().is_ipv4() || g.address.is_some_and(|a| a.addr().is_ipv6()))
        {
            return Err(invalid(format!(
                "gateway.address6 {a6}: the IPv6 address of a dual-stack gateway, beside an IPv4 gateway.address (an IPv6-only gateway takes its address in gateway.address)"
            )));
        }
        if c.busy_poll_max_us > 100_000 {
            return Err(invalid(format!(
                "busy_poll_max_us = {} is more than 100000 (100 ms)",
                c.busy_poll_max_us
            )));
        }
        if c.packet_threads.is_some_and(|n| !(1..=256).contains(&n)) {
            return Err(invalid(format!(
                "packet_threads = {} must be between 1 and 256",
                c.packet_threads.unwrap_or_default()
            )));
        }
        if !(-20..=19).contains(&c.packet_thread_nice) {
            return Err(invalid(format!(
                "packet_thread_nice = {} must be between -20 and 19",
                c.packet_thread_nice
            )));
        }
        if c.tap_queues.is_some_and(|n| !(1..=64).contains(&n)) {
            return Err(invalid(format!(
                "tap_queues = {} must be between 1 and 64",
                c.tap_queues.unwrap_or_default()
            )));
        }
        if c.watch_interval_ms == 0 {
            return Err(invalid("watch_interval_ms must be at least 1".into()));
        }
        if c.web && c.metrics_address.is_none() {
            return Err(invalid(
                "web = true needs metrics_address: the web view is served there".into(),
            ));
        }
        if let Some(a) = &c.audit
            && a.path.as_os_str().is_empty()
        {
            return Err(invalid(
                "audit.path is empty (a file, or \"-\" for stdout)".into(),
            ));
        }
        if c.source == Source::Kubernetes && c.manifests.is_some() {
            return Err(invalid(
                "source = \"kubernetes\" and manifests are exclusive: the cluster state comes from one of them".into(),
            ));
        }
        if let Some(g) = &c.gateway
            && g.address.is_none()
            && c.source != Source::Kubernetes
        {
            return Err(invalid(
                "gateway.address is required (only with source = \"kubernetes\" does it come from the node's podCIDR)".into(),
            ));
        }
        if c.tunnel.is_some() && c.gateway.is_none() {
            return Err(invalid(
                "[tunnel] needs [gateway]: pods reach other nodes' pods through their gateway"
                    .into(),
            ));
        }
        if let Some(t) = &mut c.tunnel
            && t.local_address.is_none()
        {
            t.local_address = std::env::var("NODE_IP").ok().and_then(|v| v.parse().ok());
            if t.local_address.is_none() {
                return Err(invalid(
                    "tunnel.local_address is not set and $NODE_IP holds no address".into(),
                ));
            }
        }
        if let Some(t) = &c.tunnel {
            if t.vni >= 1 << 24 {
                return Err(invalid(format!(
                    "tunnel.vni = {} does not fit in 24 bits",
                    t.vni
                )));
            }
            if t.port == 0 {
                return Err(invalid("tunnel.port must not be 0".into()));
            }
        }
        for (key, v) in [
            ("conntrack_max_per_pod", c.conntrack_max_per_pod),
            ("conntrack_max_per_namespace", c.conntrack_max_per_namespace),
        ] {
            if let Some(v) = v
                && (v == 0 || v > c.conntrack_max)
            {
                return Err(invalid(format!(
                    "{key} = {v} must be between 1 and conntrack_max ({})",
                    c.conntrack_max
                )));
            }
        }
        if c.node_name.is_empty() {
            return Err(invalid("node_name is empty".into()));
        }
        if c.busy_poll_us > 10_000 {
            return Err(invalid(format!(
                "busy_poll_us = {} is more than 10000 (10 ms)",
                c.busy_poll_us
            )));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::parse("manifests = \"/etc/vswitch/manifests\"\n", "t.toml").unwrap();
        assert_eq!(c.socket, PathBuf::from(control::DEFAULT_SOCKET));
        assert_eq!(c.watch_interval_ms, 100);
        assert!(c.offload, "offloads are on by default");
        let e = Config::parse("[tunnel]\nlocal_address = \"192.0.2.1\"\n", "t.toml").unwrap_err();
        assert!(
            e.to_string().contains("t.toml") && format!("{e:?}").contains("needs [gateway]"),
            "{e:?}"
        );
        let e = Config::parse(
            "[gateway]\nname = \"g\"\naddress = \"10.0.0.1/24\"\n[tunnel]\nlocal_address = \"192.0.2.1\"\nvni = 16777216\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(format!("{e:?}").contains("24 bits"), "{e:?}");
        let e = Config::parse("socket = \"/x\"\nsokcet = \"/y\"\n", "t.toml").unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(
            chain.contains("invalid configuration in t.toml") && chain.contains("sokcet"),
            "{chain}"
        );
        let e = Config::parse(
            "[gateway]\nname = \"vsw0\"\naddress = \"10.0.0.1/99\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(
            std::error::Error::source(&e)
                .unwrap()
                .to_string()
                .contains("address"),
            "{e}"
        );
        let e = Config::parse(
            "[gateway]\nname = \"a-very-long-interface-name\"\naddress = \"10.0.0.1/24\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("1-15 bytes"));
    }

    #[test]
    fn packet_threads_run_below_the_pods_nice_value_by_default() {
        let c = |extra: &str| Config::parse(&format!("manifests = \"/m\"\n{extra}"), "t.toml");
        assert_eq!(c("").unwrap().packet_thread_nice, -10);
        assert_eq!(c("packet_thread_nice = 0").unwrap().packet_thread_nice, 0);
        for bad in ["packet_thread_nice = -21", "packet_thread_nice = 20"] {
            let e = c(bad).unwrap_err();
            let chain = format!("{e}: {e:?}");
            assert!(
                chain.contains("packet_thread_nice") && chain.contains("between -20 and 19"),
                "{chain}"
            );
        }
    }
}

#[cfg(test)]
mod example {
    #[test]
    fn a_gateway_address6_is_the_ipv6_beside_an_ipv4_address() {
        let gw = |extra: &str| {
            super::Config::parse(
                &format!("manifests = \"/m\"\n[gateway]\nname = \"g\"\n{extra}"),
                "t.toml",
            )
        };
        assert!(gw("address = \"10.0.0.1/24\"\naddress6 = \"fd00::1/64\"").is_ok());
        assert!(gw("address = \"fd00::1/64\"").is_ok(), "IPv6-only");
        for bad in [
            "address = \"10.0.0.1/24\"\naddress6 = \"10.0.1.1/24\"",
            "address = \"fd00::1/64\"\naddress6 = \"fd01::1/64\"",
        ] {
            let e = gw(bad).unwrap_err().to_string();
            assert!(e.contains("gateway.address6"), "{e}");
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/vswitchd.toml");
        let c = super::Config::load(std::path::Path::new(path)).unwrap();
        assert_eq!(c.gateway.unwrap().name, "vsw0");
    }

    /// The TOML the DaemonSet runs with (deploy/configmap.yaml) is valid, given
    /// the $NODE_IP the DaemonSet provides.
    #[test]
    fn the_deployed_config_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/configmap.yaml");
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = &cm.data.unwrap()["vswitchd.toml"];
        let text = text.replace("[tunnel]\n", "[tunnel]\nlocal_address = \"192.0.2.1\"\n");
        let c = super::Config::parse(&text, "deploy/configmap.yaml").unwrap();
        assert_eq!(c.source, super::Source::Kubernetes);
        assert!(c.gateway.unwrap().address.is_none(), "from the podCIDR");
        assert!(
            c.kubernetes.cni_conf.is_some() && c.audit.is_some() && c.metrics_address.is_some()
        );
    }
}
