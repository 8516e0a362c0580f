//! The gateway: the port towards the node, and what the node needs around it.
//!
//! Owns creating the gateway TAP device and addressing it (iproute2), the
//! sysctl it needs (no ICMP redirects), the CNI configuration written for this
//! node's pods, this node as the cluster model sees it ([`own_node`]), and the
//! node's routes to other nodes' pod CIDRs through the gateway. It touches only
//! what it created: its own device and the routes on it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use policy::model::Node;

use crate::config::{Config, GatewayConfig};
use crate::port::TapPort;
use crate::realiser::{PortRole, Realiser};
use crate::tap::Tap;

/// `proto` of the routes vswitchd installs on the node (other nodes' pod
/// CIDRs through the gateway), so it can tell them from everyone else's.
const ROUTE_PROTO: &str = "86";

/// Runs `ip ARGS`; fails with ip's own message.
pub fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates the gateway device `g` (address `address`), brings it up and
/// attaches it to `realiser`; returns nothing but errors.
///
/// Fails when the device cannot be created, addressed or attached.
pub fn bring_up(
    realiser: &Realiser,
    g: &GatewayConfig,
    address: ipnet::IpNet,
    offload: bool,
) -> anyhow::Result<()> {
    let tap = Tap::open_with(&g.name, false, offload)
        .map_err(|e| anyhow::anyhow!("failed to create gateway {}: {e}", g.name))?;
    for a in std::iter::once(address).chain(g.address6) {
        let cidr = a.to_string();
        let mut args = vec!["addr", "replace", &cidr, "dev", &g.name];
        if a.addr().is_ipv6() {
            // The switch vouches for the link's addresses: no duplicate
            // address detection.
            args.push("nodad");
        }
        run_ip(&args)?;
    }
    run_ip(&["link", "set", &g.name, "up"])?;
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{}/address", g.name))?;
    let mac: control::Mac = mac_text
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("gateway {}: {e}", g.name))?;
    // The node forwards back out of the gateway (Service translation): no ICMP
    // redirects telling pods to bypass it.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{}/send_redirects", g.name),
        "0",
    );
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/accept_ra", g.name), "0");
    let ips = std::iter::once(address)
        .chain(g.address6)
        .map(|a| a.addr())
        .collect();
    realiser.set_gateway(Arc::new(TapPort(tap)), mac.0, ips)?;
    Ok(())
}

/// Writes the CNI network configuration for pods of this node: vswitch-cni
/// talking to `socket`, host-local IPAM over the gateway's subnet.
///
/// Fails when the file cannot be written.
pub fn write_cni_conf(
    path: &Path,
    socket: &Path,
    gateway: ipnet::IpNet,
    gateway6: Option<ipnet::IpNet>,
) -> anyhow::Result<()> {
    let mut ranges = vec![
        serde_json::json!([{"subnet": gateway.trunc().to_string(), "gateway": gateway.addr().to_string()}]),
    ];
    if let Some(g6) = gateway6 {
        ranges.push(serde_json::json!([{"subnet": g6.trunc().to_string(), "gateway": g6.addr().to_string()}]));
    }
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "vswitch",
        "plugins": [{
            "type": "vswitch-cni",
            "socket": socket,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
            },
        }],
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&conf)?)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot write CNI config {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), subnet = %gateway.trunc(), "wrote the CNI configuration");
    Ok(())
}

/// This node as the cluster model sees it: `api` (the Node object, when the API
/// server has one) plus the gateway's address and subnet and `node_addresses`,
/// so traffic between the node and its pods is always allowed.
pub fn own_node(config: &Config, api: Option<Node>) -> Node {
    // Without a Node object, the labels every kubelet sets (what
    // ClusterNetworkPolicy `nodes` peers commonly select on).
    let mut node = api.unwrap_or_else(|| Node {
        name: config.node_name.clone(),
        labels: [
            ("kubernetes.io/hostname", config.node_name.as_str()),
            ("kubernetes.io/os", "linux"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        addresses: vec![],
        pod_cidrs: vec![],
    });
    if let Some(g) = &config.gateway {
        let gateway = g.address.iter().chain(&g.address6).map(|a| a.addr());
        for a in gateway.chain(g.node_addresses.iter().copied()) {
            if !node.addresses.contains(&a) {
                node.addresses.push(a);
            }
        }
        for net in g.address.iter().chain(&g.address6).map(|a| a.trunc()) {
            if !node.pod_cidrs.contains(&net) {
                node.pod_cidrs.push(net);
            }
        }
    }
    node
}

/// Keeps the node's routes to other nodes' pod CIDRs through the gateway in
/// step with the tunnel peers (checked every second): the node itself reaches
/// remote pods, e.g. a Service backend after kube-proxy's DNAT. Does nothing
/// without a gateway and a tunnel. Only routes on this gateway's device are
/// ever removed: another vswitchd's (a test, a restart overlap) are not ours.
pub fn sync_routes_forever(realiser: Arc<Realiser>, config: Config) {
    let (Some(g), Some(_)) = (&config.gateway, &config.tunnel) else {
        return;
    };
    // Routes of an earlier run may point at pod CIDRs that no longer exist.
    let _ = run_ip(&["route", "flush", "dev", &g.name, "proto", ROUTE_PROTO]);
    let mut installed = BTreeSet::new();
    loop {
        let wanted: BTreeSet<ipnet::IpNet> = realiser
            .ports()
            .into_iter()
            .flat_map(|p| match p.role {
                PortRole::Tunnel { pod_cidrs, .. } => pod_cidrs,
                _ => vec![],
            })
            .collect();
        for net in wanted.difference(&installed) {
            // Through the CIDR's first address (IPv6: the one after the
            // subnet-router anycast address), which the switch answers ARP or
            // neighbour solicitations for with its router MAC.
            let hop = policy::pipeline::router_address(net).map(|h| h.to_string());
            let net = net.to_string();
            let mut args = vec!["route", "replace", &net];
            if let Some(h) = &hop {
                args.extend(["via", h.as_str(), "onlink"]);
            }
            args.extend(["dev", &g.name, "proto", ROUTE_PROTO]);
            match run_ip(&args) {
                Ok(()) => tracing::info!(%net, "route to another node's pods via the gateway"),
                Err(e) => tracing::warn!(%net, error = %e, "cannot add a route"),
            }
        }
        for net in installed.difference(&wanted) {
            let _ = run_ip(&[
                "route",
                "del",
                &net.to_string(),
                "dev",
                &g.name,
                "proto",
                ROUTE_PROTO,
            ]);
        }
        installed = wanted;
        std::thread::sleep(Duration::from_secs(1));
    }
}
