//! vswitchd's start-up and its ports.
//!
//! Owns the order things start in — cluster state first, then the gateway and
//! tunnel, then saved connections, then recorded ports, and only then
//! forwarding (the binary starts the packet threads last): the first packet
//! forwarded is already under policy — and attaching and detaching pods' TAP
//! devices with their records in the state directory. The control socket
//! (`server`), the manifest watcher (`manifests`), the gateway (`gateway`) and
//! the state files (`state`) are their own modules.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use control::error_chain;
use datapath::{CtConfig, DatapathConfig};
use policy::compile::Change;
use policy::model::ObjectKey;

use crate::config::{Config, Source};
use crate::forwarder::Forwarder;
use crate::gateway;
use crate::manifests::ManifestWatch;
use crate::port::TapPort;
use crate::realiser::Realiser;
use crate::state::{PortRecord, StateDir};
use crate::tap::Tap;
use crate::tunnel::TunnelIo;

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub realiser: Arc<Realiser>,
    pub forwarder: Arc<Forwarder>,
    state: StateDir,
    records: Mutex<Vec<PortRecord>>,
    /// The cluster state has been loaded (manifests) or fully synced from the
    /// API server, compiled and published.
    pub ready: Arc<AtomicBool>,
    /// The connections seen recently (`what-if`, the web view).
    pub recent: Arc<crate::recent::Recent>,
}

impl Daemon {
    /// Builds the switch: cluster state applied, gateway up, saved connections
    /// restored, recorded ports reattached. Packet threads are not started yet.
    ///
    /// Fails when the gateway or the tunnel cannot be set up.
    pub fn start(
        mut config: Config,
        watch: &mut Option<ManifestWatch>,
    ) -> anyhow::Result<Arc<Daemon>> {
        let realiser = Realiser::new(DatapathConfig {
            conntrack: CtConfig {
                max_entries: config.conntrack_max,
                ..CtConfig::default()
            },
            ..DatapathConfig::default()
        });
        let (per_pod, per_namespace) = config.conntrack_limits();
        realiser.set_conntrack_limits(per_pod, per_namespace)?;
        let kubernetes = config.source == Source::Kubernetes;
        if kubernetes || config.gateway.is_some() || config.node_name != crate::config::LOCAL_NODE {
            // Pods attached here run on this node: own-node traffic is theirs,
            // and only this node's pods' rules are compiled (pods elsewhere
            // are peers: their own rules are enforced where they run). Set
            // before the first load: the cold start compiles for this node.
            realiser.set_local_node(&config.node_name);
        }
        if let Some(w) = watch.as_mut() {
            w.poll_into(&realiser);
        }
        if kubernetes {
            // Nothing is forwarded until Namespaces, Pods, Nodes,
            // NetworkPolicies and ClusterNetworkPolicies (or the API server's
            // 404: no CRD) have all been listed and compiled: a policy list
            // that is slow or failing never means "no policy" (fail closed).
            realiser.set_sealed(true)?;
            // Until a pod's object arrives from the API server its labels are
            // unknown: its port stays cut off (fail closed).
            realiser.set_isolate_unknown(true);
        }
        let unset = |g: &crate::config::GatewayConfig| g.address.is_none() || g.address6.is_none();
        if kubernetes && config.gateway.as_ref().is_some_and(unset) {
            // The gateway is the first address of each of this node's pod
            // CIDRs (IPv4, IPv6 when dual-stack; IPv6 alone on an IPv6-only node).
            let cidrs = crate::kubernetes::own_pod_cidrs(&config)?;
            let first = |v6: bool| -> anyhow::Result<Option<ipnet::IpNet>> {
                let Some(cidr) = cidrs.iter().find(|c| c.addr().is_ipv6() == v6) else {
                    return Ok(None);
                };
                let host = policy::pipeline::router_address(cidr)
                    .ok_or_else(|| anyhow::anyhow!("pod CIDR {cidr} has no host address"))?;
                Ok(Some(ipnet::IpNet::new(host, cidr.prefix_len())?))
            };
            let (v4, v6) = (first(false)?, first(true)?);
            if let Some(g) = config.gateway.as_mut() {
                if g.address.is_none() {
                    g.address = v4.or(v6);
                }
                if g.address6.is_none() && g.address.is_some_and(|a| a.addr().is_ipv4()) {
                    g.address6 = v6;
                }
            }
        }
        if let Some(g) = &config.gateway {
            let address = g
                .address
                .ok_or_else(|| anyhow::anyhow!("gateway {} has no address", g.name))?;
            gateway::bring_up(&realiser, g, address, config.offload)?;
            if let Some(path) = &config.kubernetes.cni_conf {
                gateway::write_cni_conf(path, &config.socket, address, g.address6)?;
            }
            realiser.apply(Change::Node(gateway::own_node(&config, None)))?;
        }
        if !config.service_cidrs.is_empty() {
            realiser.set_service_cidrs(config.service_cidrs.clone())?;
        }
        realiser.set_load_balance(config.services == crate::config::ServicesMode::Switch)?;
        if let Some(t) = &config.tunnel {
            let local = t
                .local_address
                .ok_or_else(|| anyhow::anyhow!("tunnel.local_address is not set"))?;
            // A socket per packet thread (at most 8), each read by its own.
            let sockets = config.packet_threads().min(8);
            let tunnel = TunnelIo::open(local, t.port, t.vni, sockets).map_err(|e| {
                anyhow::anyhow!("cannot bind the tunnel to {local}:{}: {e}", t.port)
            })?;
            realiser.set_tunnel(tunnel)?;
        }
        let forwarder = Forwarder::new(realiser.published().clone());
        let daemon = Arc::new(Daemon {
            ready: Arc::new(AtomicBool::new(!kubernetes)),
            recent: Arc::new(crate::recent::Recent::new(config.recent.clone())),
            state: StateDir(config.state_dir.clone()),
            config,
            realiser,
            forwarder,
            records: Mutex::new(Vec::new()),
        });
        for r in daemon.state.load_ports() {
            match daemon.attach(&r) {
                Ok(()) => tracing::info!(port = %r, "reattached"),
                Err(e) => tracing::warn!("cannot reattach {r}: {e}"),
            }
        }
        // After the ports: attaching a port forgets its address's connections
        // (it may have changed hands); the saved ones are the same pods'.
        let (conns, down_ms) = daemon.state.take_conntrack();
        if !conns.is_empty() {
            let n = daemon
                .realiser
                .datapath()
                .conntrack
                .import(daemon.realiser.now(), conns);
            tracing::info!(connections = n, down_ms, "conntrack restored");
        }
        Ok(daemon)
    }

    /// Saves the conntrack table for the next start (a graceful stop: call it
    /// once packet threads have stopped). Established connections then survive
    /// an upgrade or restart of vswitchd.
    ///
    /// Fails when the file cannot be written.
    pub fn save_conntrack(&self) -> anyhow::Result<usize> {
        let conns = self
            .realiser
            .datapath()
            .conntrack
            .export(self.realiser.now());
        Ok(self.state.save_conntrack(conns)?)
    }

    /// The ports as recorded.
    pub fn records(&self) -> Vec<PortRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update_records(&self, f: impl FnOnce(&mut Vec<PortRecord>)) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut records);
        if let Err(e) = self.state.save_ports(&records) {
            tracing::error!(dir = %self.config.state_dir.display(), error = %e, "cannot write the ports state file");
        }
    }

    /// Attaches the persistent TAP device `r.ifname` (in `r.netns`) as pod `r.pod`.
    ///
    /// Fails when the record is malformed, the device cannot be opened, or the
    /// realiser refuses the port.
    pub fn attach(&self, r: &PortRecord) -> Result<(), String> {
        let _span = tracing::info_span!("attach", pod = %r.pod, ifname = %r.ifname).entered();
        let pod: ObjectKey = r.pod.parse().map_err(|e: String| format!("bad pod: {e}"))?;
        let mac: control::Mac = r.mac.parse()?;
        if r.ips.is_empty() {
            return Err("a port needs at least one IP address".into());
        }
        let queues = self.config.tap_queues();
        let taps = match &r.netns {
            Some(ns) => Tap::open_in(Path::new(ns), &r.ifname, self.config.offload, queues),
            None => Tap::open_queues(&r.ifname, true, self.config.offload, queues),
        }
        .map_err(|e| format!("cannot open TAP device {}: {e}", r.ifname))?;
        let queues: Vec<Arc<dyn crate::port::Port>> = taps
            .into_iter()
            .map(|t| Arc::new(TapPort(t)) as Arc<dyn crate::port::Port>)
            .collect();
        self.realiser
            .attach_queues(queues, pod, mac.0, r.ips.clone())
            .map_err(|e| error_chain(&e))?;
        self.update_records(|records| {
            records.retain(|x| x.pod != r.pod);
            records.push(r.clone());
        });
        Ok(())
    }

    /// Detaches pod `pod`.
    ///
    /// Fails when it is not attached.
    pub fn detach(&self, pod: &ObjectKey) -> Result<(), String> {
        let _span = tracing::info_span!("detach", %pod).entered();
        self.realiser.detach(pod).map_err(|e| error_chain(&e))?;
        let name = pod.to_string();
        self.update_records(|records| records.retain(|x| x.pod != name));
        Ok(())
    }
}
