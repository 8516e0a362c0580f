//! Prometheus metrics: the switch's counters, published on `metrics_address`.
//!
//! Owns the recorder (metrics-exporter-prometheus, rendered on `/metrics` by
//! `web`, which also serves the web view when configured) and a collector thread that copies the switch's own counters (kept per packet
//! thread and per port, never through the metrics facade on the packet path)
//! into Prometheus series once a second. Latency histograms and per-rule
//! connection counts are recorded where they happen (`switch`, `audit`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::forwarder::Forwarder;
use crate::realiser::{PortRole, Realiser};

/// Latency buckets (seconds) for realisation and compile time.
const BUCKETS: [f64; 13] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Serves `/metrics` (and with `web`, the web view) on `address`, and
/// starts the collector thread.
///
/// Fails when the address cannot be bound (in use, no permission) or a
/// recorder is already installed.
pub fn start(
    address: SocketAddr,
    realiser: Arc<Realiser>,
    forwarder: Arc<Forwarder>,
    web: Option<crate::web::Web>,
) -> anyhow::Result<()> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    crate::web::serve(address, handle.clone(), web)?;
    describe();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            loop {
                collect(&realiser, &forwarder);
                handle.run_upkeep();
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "vswitch_port_rx_packets_total",
        "Frames received from a port"
    );
    describe_counter!("vswitch_port_rx_bytes_total", "Bytes received from a port");
    describe_counter!("vswitch_port_tx_packets_total", "Frames sent to a port");
    describe_counter!("vswitch_port_tx_bytes_total", "Bytes sent to a port");
    describe_counter!(
        "vswitch_port_drops_total",
        "Frames dropped on a port, by reason (pipeline reasons are charged to the input port)"
    );
    describe_counter!(
        "vswitch_table_lookups_total",
        "Packets looked up in a table (cache hits included)"
    );
    describe_counter!(
        "vswitch_table_matches_total",
        "Packets that matched a flow in a table"
    );
    describe_gauge!("vswitch_table_flows", "Flows installed in a table");
    describe_counter!(
        "vswitch_tunnel_rx_rejected_total",
        "Tunnel datagrams dropped: not VXLAN, another VNI, or from an unknown node"
    );
    describe_counter!(
        "vswitch_tunnel_rx_bad_offload_total",
        "Tunnel frames dropped because their virtio-net header did not fit them"
    );
    describe_counter!("vswitch_microflow_cache_hits_total", "Microflow cache hits");
    describe_counter!(
        "vswitch_microflow_cache_misses_total",
        "Microflow cache misses (full pipeline lookups)"
    );
    describe_counter!(
        "vswitch_microflow_cache_evictions_total",
        "Microflow cache entries evicted"
    );
    describe_counter!(
        "vswitch_microflow_cache_revalidated_total",
        "Microflow cache hits on entries of an older table generation checked and kept"
    );
    describe_counter!(
        "vswitch_datapath_drops_total",
        "Packets the pipeline dropped, by reason"
    );
    describe_gauge!("vswitch_conntrack_entries", "Tracked connections");
    describe_gauge!("vswitch_conntrack_max_entries", "Conntrack table limit");
    describe_counter!(
        "vswitch_conntrack_full_drops_total",
        "New connections dropped because the conntrack table was full"
    );
    describe_counter!(
        "vswitch_conntrack_limit_drops_total",
        "New connections dropped because their pod or namespace was at its connection limit"
    );
    describe_gauge!(
        "vswitch_conntrack_pod_entries",
        "Tracked connections opened by a pod"
    );
    describe_counter!(
        "vswitch_conntrack_pod_limit_drops_total",
        "New connections of a pod refused at its (or its namespace's) limit"
    );
    describe_counter!(
        "vswitch_policy_connections_total",
        "New connections by deciding policy rule and verdict (one per connection tuple per second)"
    );
    describe_counter!(
        "vswitch_connection_events_lost_total",
        "Connection events lost because the audit consumer fell behind"
    );
    describe_histogram!(
        "vswitch_policy_realisation_seconds",
        "From a cluster change to its flows published (compile + publish)"
    );
    describe_histogram!(
        "vswitch_policy_compile_seconds",
        "Time compiling a batch of cluster changes"
    );
    describe_gauge!(
        "vswitch_policy_generation",
        "Generation of the published flow tables"
    );
    describe_gauge!(
        "vswitch_service_backends",
        "Ready backends of a Service frontend the switch load-balances"
    );
    describe_counter!(
        "vswitch_service_connection_attempts_total",
        "First packets of new connections to a Service frontend with backends (retransmissions included)"
    );
    describe_counter!(
        "vswitch_service_refused_total",
        "New connections to a Service frontend without ready backends, refused"
    );
    describe_gauge!(
        "vswitch_service_connections",
        "Tracked connections through a Service frontend, by backend"
    );
}

/// Per Service frontend: backends, attempts (its table-35 flow's packets),
/// refusals, and tracked connections by backend.
fn services(realiser: &Realiser, flows: &[datapath::worker::FlowStat]) {
    use datapath::field::Field;
    let frontends = realiser.frontends();
    if frontends.is_empty() {
        return;
    }
    // Table 35's flows by what they match: (address, port, protocol).
    let attempts: HashMap<(u128, u128, u128), u64> = flows
        .iter()
        .filter(|s| s.entry.table.0 == policy::tables::SERVICES)
        .map(|s| {
            let m = &s.entry.matcher;
            let key = (
                m.get(Field::NwDst).0,
                m.get(Field::TpDst).0,
                m.get(Field::NwProto).0,
            );
            (key, s.packets)
        })
        .collect();
    let conns = realiser.service_connections();
    for f in &frontends {
        let frontend = std::net::SocketAddr::new(f.ip, f.port).to_string();
        let labels = [("service", f.name()), ("frontend", frontend.clone())];
        gauge!("vswitch_service_backends", &labels).set(f.backends.len() as f64);
        let key = (
            u128::from_be_bytes(datapath::key::ip_to_wide(f.ip)),
            u128::from(f.port),
            u128::from(f.protocol.ip_proto()),
        );
        let name = if f.backends.is_empty() {
            "vswitch_service_refused_total"
        } else {
            "vswitch_service_connection_attempts_total"
        };
        counter!(name, &labels).absolute(attempts.get(&key).copied().unwrap_or(0));
        for b in &f.backends {
            gauge!(
                "vswitch_service_connections",
                "service" => f.name(),
                "frontend" => frontend.clone(),
                "backend" => std::net::SocketAddr::new(b.ip, b.port).to_string()
            )
            .set(conns.get(f, b) as f64);
        }
    }
}

/// Copies the switch's counters into the metrics registry.
pub fn collect(realiser: &Realiser, forwarder: &Forwarder) {
    let (rejected, bad_offload) = realiser.tunnel_rejected();
    counter!("vswitch_tunnel_rx_rejected_total").absolute(rejected);
    counter!("vswitch_tunnel_rx_bad_offload_total").absolute(bad_offload);
    for p in realiser.ports() {
        let pod = match p.role {
            PortRole::Pod(k) => k.to_string(),
            PortRole::Gateway => "(gateway)".to_string(),
            PortRole::Tunnel { node, .. } => format!("(tunnel to {node})"),
        };
        let c = &p.counters;
        let port = p.no.0.to_string();
        let labels = [("port", port.clone()), ("pod", pod.clone())];
        counter!("vswitch_port_rx_packets_total", &labels).absolute(c.rx_packets.load(Relaxed));
        counter!("vswitch_port_rx_bytes_total", &labels).absolute(c.rx_bytes.load(Relaxed));
        counter!("vswitch_port_tx_packets_total", &labels).absolute(c.tx_packets.load(Relaxed));
        counter!("vswitch_port_tx_bytes_total", &labels).absolute(c.tx_bytes.load(Relaxed));
        for (reason, n) in c.drops() {
            counter!("vswitch_port_drops_total", "port" => port.clone(), "pod" => pod.clone(), "reason" => reason)
                .absolute(n);
        }
    }
    let dp = realiser.datapath();
    let s = dp.stats();
    let mut tables: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
    let flows = dp.flow_stats();
    services(realiser, &flows);
    for f in flows {
        let t = tables.entry(f.entry.table.0).or_default();
        t.0 += 1;
        t.1 += f.packets;
    }
    for (t, _) in &s.table_misses {
        tables.entry(t.0).or_default();
    }
    let misses: BTreeMap<u8, u64> = s.table_misses.iter().map(|(t, n)| (t.0, *n)).collect();
    for (t, (flows, matched)) in tables {
        let table = t.to_string();
        let missed = misses.get(&t).copied().unwrap_or(0);
        gauge!("vswitch_table_flows", "table" => table.clone()).set(flows as f64);
        counter!("vswitch_table_matches_total", "table" => table.clone()).absolute(matched);
        counter!("vswitch_table_lookups_total", "table" => table).absolute(matched + missed);
    }
    counter!("vswitch_microflow_cache_hits_total").absolute(s.cache.hits);
    counter!("vswitch_microflow_cache_misses_total").absolute(s.cache.misses);
    counter!("vswitch_microflow_cache_evictions_total").absolute(s.cache.evictions);
    counter!("vswitch_microflow_cache_revalidated_total").absolute(s.cache.revalidated);
    for (reason, n) in &s.drops {
        counter!("vswitch_datapath_drops_total", "reason" => reason.name()).absolute(*n);
    }
    gauge!("vswitch_conntrack_entries").set(s.conntrack_entries as f64);
    gauge!("vswitch_conntrack_max_entries").set(s.conntrack_max as f64);
    counter!("vswitch_conntrack_full_drops_total").absolute(s.conntrack_full_drops);
    counter!("vswitch_conntrack_limit_drops_total").absolute(s.conntrack_limit_drops);
    for (name, connections, _, refused) in realiser.conntrack_owners() {
        if name.contains('/') {
            gauge!("vswitch_conntrack_pod_entries", "pod" => name.clone()).set(connections as f64);
            counter!("vswitch_conntrack_pod_limit_drops_total", "pod" => name).absolute(refused);
        }
    }
    counter!("vswitch_connection_events_lost_total").absolute(forwarder.events_lost());
    gauge!("vswitch_policy_generation").set(s.generation as f64);
}
