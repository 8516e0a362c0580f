//! The packets a trace sends: who to whom, over what.
//!
//! Owns [`Endpoint`] (a pod or an address), [`L4`] and the [`packet`] a new
//! connection between two endpoints starts with, as it enters the switch (from
//! the source pod's port with its MAC, or from the gateway). Offline traces and
//! the live switch's traces build their packets here, the same way.

use std::net::IpAddr;

use datapath::FlowKey;
use datapath::field::{ether_type, tcp_flags};
use datapath::key::ip_to_wide;
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::model::ObjectKey;
use crate::pipeline::{OFFLINE_GATEWAY, OFFLINE_GATEWAY_MAC, Topology};

/// Source port of traced packets.
pub const EPHEMERAL_PORT: u16 = 40000;

/// One end of a traced packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Pod(ObjectKey),
    /// An address; outside the cluster unless a pod has it.
    Ip(IpAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Pod(k) => write!(f, "{k}"),
            Endpoint::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// L4 of a traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "protocol", content = "port")]
pub enum L4 {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    /// ICMP / ICMPv6 echo request.
    Icmp,
}

impl L4 {
    pub fn protocol_name(self) -> &'static str {
        match self {
            L4::Tcp(_) => "tcp",
            L4::Udp(_) => "udp",
            L4::Sctp(_) => "sctp",
            L4::Icmp => "icmp",
        }
    }

    pub fn port(self) -> Option<u16> {
        match self {
            L4::Tcp(p) | L4::Udp(p) | L4::Sctp(p) => Some(p),
            L4::Icmp => None,
        }
    }
}

/// The addresses of an endpoint.
fn endpoint_ips(cluster: &Cluster, e: &Endpoint) -> Result<Vec<IpAddr>, String> {
    match e {
        Endpoint::Ip(ip) => Ok(vec![*ip]),
        Endpoint::Pod(k) => {
            let pod = cluster.pod(k).ok_or_else(|| format!("no pod {k}"))?;
            if pod.ips.is_empty() {
                return Err(format!(
                    "pod {k} has no IP (not attached, no status.podIP; a host-network pod is its node: trace to the node's address)"
                ));
            }
            Ok(pod.ips.clone())
        }
    }
}

/// The flow key of a new connection from `src` to `dst` as it enters the switch:
/// from the source pod's port with its MAC, or from the gateway for an address no
/// attached pod has. Pod-to-pod traces use IPv4 when both ends have it.
///
/// Fails when a pod does not exist or has no address of a family the other end has.
pub fn packet(
    cluster: &Cluster,
    topology: &Topology,
    src: &Endpoint,
    dst: &Endpoint,
    l4: L4,
) -> Result<FlowKey, String> {
    let (sips, dips) = (endpoint_ips(cluster, src)?, endpoint_ips(cluster, dst)?);
    let (s, d) = [false, true]
        .iter()
        .find_map(|&v6| {
            let s = sips.iter().find(|ip| ip.is_ipv6() == v6)?;
            let d = dips.iter().find(|ip| ip.is_ipv6() == v6)?;
            Some((*s, *d))
        })
        .ok_or_else(|| format!("{src} and {dst} share no IP family"))?;
    let gateway = topology
        .gateway
        .as_ref()
        .map_or((OFFLINE_GATEWAY, OFFLINE_GATEWAY_MAC), |g| (g.port, g.mac));
    let endpoint_port = |e: &Endpoint, ip: IpAddr| {
        let pod = match e {
            Endpoint::Pod(k) => Some(k.clone()),
            Endpoint::Ip(_) => cluster.pod_by_ip(ip).map(|p| p.key.clone()),
        };
        pod.and_then(|k| {
            topology
                .pods
                .iter()
                .find(|p| p.pod == k)
                .map(|p| (p.port, p.mac))
        })
        .unwrap_or(gateway)
    };
    let (in_port, dl_src) = endpoint_port(src, s);
    let (_, dl_dst) = endpoint_port(dst, d);
    let mut key = FlowKey {
        in_port,
        dl_src,
        dl_dst,
        dl_type: if s.is_ipv6() {
            ether_type::IPV6
        } else {
            ether_type::IPV4
        },
        nw_src: ip_to_wide(s),
        nw_dst: ip_to_wide(d),
        ..FlowKey::default()
    };
    match l4 {
        L4::Tcp(p) => {
            key.nw_proto = 6;
            key.tp_src = EPHEMERAL_PORT;
            key.tp_dst = p;
            key.tcp_flags = tcp_flags::SYN;
        }
        L4::Udp(p) => {
            key.nw_proto = 17;
            key.tp_src = EPHEMERAL_PORT;
            key.tp_dst = p;
        }
        L4::Sctp(p) => {
            key.nw_proto = 132;
            key.tp_src = EPHEMERAL_PORT;
            key.tp_dst = p;
            key.sctp_chunk = 1;
        }
        L4::Icmp => {
            key.nw_proto = if s.is_ipv6() { 58 } else { 1 };
            key.tp_src = if s.is_ipv6() { 128 } else { 8 };
            key.icmp_id = 1;
        }
    }
    Ok(key)
}
