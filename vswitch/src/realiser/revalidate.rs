//! Established connections under a policy change.
//!
//! Owns one decision: after a change is published, every tracked connection
//! is looked at again as if it were new (its original direction, entering the
//! switch where it entered: a local pod's port, the tunnel from its node, or
//! the gateway), through the new tables. One a policy table would now drop is
//! removed from conntrack, so its next packet is not established: a TCP
//! segment mid-stream is invalid and dropped, anything else meets the new
//! policy. A Deny is final for connections already open too (what an admin
//! isolating a tenant expects, and what OVN-Kubernetes does for
//! AdminNetworkPolicy); what the new policy still admits is untouched.

use std::net::IpAddr;

use datapath::conntrack::Tuple;
use datapath::key::wide_to_ip;
use datapath::trace::{Outcome, trace_new};
use policy::probe::{Endpoint, L4, packet};

use super::Realiser;
use super::state::State;

impl Realiser {
    /// Cuts the tracked connections the published tables would no longer
    /// admit; returns how many.
    pub(super) fn revalidate_connections(&self, st: &State) -> usize {
        let ct = &self.published.dp.conntrack;
        if ct.is_empty() {
            return 0;
        }
        let snap = self.published.dp.snapshot();
        let policy_tables = policy::tables::POLICY_TABLES;
        let mut cut = Vec::new();
        let n = ct.retain(|_, t| {
            let Some(key) = original_packet(st, t) else {
                return true;
            };
            let tr = trace_new(&snap.tables, &key);
            let denied = matches!(tr.outcome, Outcome::Drop { .. })
                && tr
                    .deciding_flow()
                    .is_some_and(|f| policy_tables.contains(&f.table));
            if denied && cut.len() < 16 {
                cut.push(format!(
                    "{}:{} -> {}:{}",
                    wide_to_ip(t.src),
                    t.sport,
                    wide_to_ip(t.dst),
                    t.dport
                ));
            }
            !denied
        });
        if n > 0 {
            metrics::counter!("vswitch_connections_cut_by_policy_total").increment(n as u64);
            tracing::info!(connections = n, first = ?cut, "policy change: connections the new policy denies were cut");
        }
        n
    }
}

/// The first packet of a tracked connection's original direction, as it
/// entered the switch.
fn original_packet(st: &State, t: &Tuple) -> Option<datapath::FlowKey> {
    let (src, dst) = (wide_to_ip(t.src), wide_to_ip(t.dst));
    let l4 = match t.proto {
        6 => L4::Tcp(t.dport),
        17 => L4::Udp(t.dport),
        132 => L4::Sctp(t.dport),
        1 | 58 => L4::Icmp,
        _ => return None,
    };
    let mut key = packet(
        st.compiler.cluster(),
        &st.topology,
        &Endpoint::Ip(src),
        &Endpoint::Ip(dst),
        l4,
    )
    .ok()?;
    if !matches!(l4, L4::Icmp) {
        key.tp_src = t.sport;
    }
    // Another node's pod: it came through the tunnel from that node.
    let local = st.topology.pods.iter().any(|p| p.ips.contains(&src));
    if !local && let Some(peer) = tunnel_of(st, src) {
        key.in_port = peer;
    }
    Some(key)
}

fn tunnel_of(st: &State, ip: IpAddr) -> Option<datapath::PortNo> {
    st.topology
        .tunnels
        .iter()
        .find(|t| t.pod_cidrs.iter().any(|n| n.contains(&ip)))
        .map(|t| t.port)
}
