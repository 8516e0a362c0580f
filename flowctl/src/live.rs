//! Text views of what the running switch reports: flows, ports, connections,
//! counters. Each takes the control protocol's typed view and returns aligned
//! text.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use control::view::{ConnView, DnsView, FlowView, PolicyView, PortView, StatsView};

use crate::render::{BOLD, DIM, paint};

/// Columns aligned on their widest cell; numeric columns right-aligned.
pub fn table(color: bool, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..headers.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            let last = i + 1 == cells.len();
            if numeric[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                if !last {
                    out.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string()
    };
    let mut out = paint(
        color,
        BOLD,
        &line(headers.iter().map(|h| h.to_string()).collect()),
    );
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

/// One flow as `ovs-ofctl dump-flows` prints it, then the rule it comes from.
pub fn flow_line(f: &FlowView, color: bool) -> String {
    let m = if f.matcher.is_empty() {
        String::new()
    } else {
        format!(",{}", f.matcher)
    };
    format!(
        " cookie={}, duration={}s, table={}, n_packets={}, n_bytes={}, idle_age={}, priority={}{m} actions={}  {}",
        f.cookie,
        f.duration_s,
        f.table,
        f.n_packets,
        f.n_bytes,
        f.idle_age_s as u64,
        f.priority,
        f.actions,
        paint(color, DIM, &format!("# {}", f.rule)),
    )
}

/// Whether a flow passes `--table` and `--cookie` (a substring of its rule).
pub fn keep_flow(f: &FlowView, table: Option<u8>, rule: Option<&str>) -> bool {
    table.is_none_or(|t| f.table == t) && rule.is_none_or(|r| f.rule.contains(r))
}

/// The flows of a `dump-flows` answer that pass `--table` and `--cookie`.
pub fn kept_flows(flows: &[FlowView], table: Option<u8>, rule: Option<&str>) -> Vec<FlowView> {
    flows
        .iter()
        .filter(|f| keep_flow(f, table, rule))
        .cloned()
        .collect()
}

pub fn flows_text(flows: &[FlowView], color: bool) -> String {
    let mut out = String::new();
    for f in flows {
        out.push_str(&flow_line(f, color));
        out.push('\n');
    }
    if flows.iter().any(|f| f.manual) {
        out.push_str(&paint(
            color,
            DIM,
            "(manual flows are not policy: they stay until del-flows or a vswitchd restart)\n",
        ));
    }
    out
}

/// Non-zero drop counters, `reason=n,...` (or `-`).
fn drops(d: &BTreeMap<String, u64>) -> (u64, String) {
    let nonzero: Vec<String> = d
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    let total = d.values().sum();
    let detail = if nonzero.is_empty() {
        "-".to_string()
    } else {
        nonzero.join(",")
    };
    (total, detail)
}

pub fn ports_text(ports: &[PortView], color: bool) -> String {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            let (total, detail) = drops(&p.drops);
            let who = match (&p.pod, &p.node) {
                (Some(pod), _) => pod.clone(),
                (None, Some(node)) => format!("(tunnel to {node})"),
                (None, None) => format!(
                    "({})",
                    serde_json::to_value(p.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            };
            let ips = p.ips.as_ref().map_or_else(
                || "-".to_string(),
                |a| {
                    a.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                },
            );
            let ifname = if p.up {
                p.ifname.clone()
            } else {
                format!("{} (down)", p.ifname)
            };
            // The packet thread reading each queue.
            let threads = if p.queues.is_empty() {
                "-".to_string()
            } else {
                p.queues
                    .iter()
                    .map(|q| q.lane.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                p.port.to_string(),
                who,
                ifname,
                ips,
                threads,
                p.rx_packets.to_string(),
                p.rx_bytes.to_string(),
                p.tx_packets.to_string(),
                p.tx_bytes.to_string(),
                total.to_string(),
                detail,
            ]
        })
        .collect();
    table(
        color,
        &[
            "PORT",
            "POD",
            "IFNAME",
            "IPS",
            "THREADS",
            "RX_PKTS",
            "RX_BYTES",
            "TX_PKTS",
            "TX_BYTES",
            "DROPS",
            "BY REASON",
        ],
        &rows,
    )
}

pub fn conntrack_text(conns: &[ConnView], color: bool) -> String {
    let rows: Vec<Vec<String>> = conns
        .iter()
        .map(|c| {
            let end = |ip: &std::net::IpAddr, port: u16| match ip {
                std::net::IpAddr::V6(_) => format!("[{ip}]:{port}"),
                std::net::IpAddr::V4(_) => format!("{ip}:{port}"),
            };
            // A translated connection: where it really goes (and, hairpin,
            // from where the backend sees it).
            let mut src = end(&c.src, c.sport);
            if let Some(t) = &c.translated_src {
                src.push_str(&format!(" (as {t})"));
            }
            let mut dst = end(&c.dst, c.dport);
            if let Some(t) = &c.translated_dst {
                dst.push_str(&format!(" -> {t}"));
            }
            vec![
                c.proto.clone(),
                src,
                dst,
                c.state.clone(),
                format!("{}s", c.timeout_s),
                format!("{}/{}", c.packets.orig, c.packets.reply),
                format!("{}/{}", c.bytes.orig, c.bytes.reply),
                c.zone.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        color,
        &[
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "STATE",
            "TIMEOUT",
            "PACKETS o/r",
            "BYTES o/r",
            "ZONE",
        ],
        &rows,
    );
    let _ = writeln!(out, "{} connections", rows.len());
    out
}

pub fn stats_text(s: &StatsView, color: bool) -> String {
    let mut out = String::new();
    let mut section = |title: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "{}", paint(color, BOLD, title));
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<w$}  {v}");
        }
    };
    let c = &s.cache;
    section(
        "datapath",
        vec![
            ("packets".into(), s.packets.to_string()),
            ("bytes".into(), s.bytes.to_string()),
            ("flows".into(), format!("{} ({} masks)", s.flows, s.masks)),
            ("generation".into(), s.generation.to_string()),
        ],
    );
    section(
        "microflow cache",
        vec![
            ("lookups".into(), c.lookups.to_string()),
            ("hit rate".into(), format!("{:.1}%", c.hit_rate * 100.0)),
            ("hits".into(), c.hits.to_string()),
            ("misses".into(), c.misses.to_string()),
            ("evictions".into(), c.evictions.to_string()),
            ("revalidated".into(), c.revalidated.to_string()),
        ],
    );
    let ct = &s.conntrack;
    section(
        "conntrack",
        vec![
            (
                "entries".into(),
                format!(
                    "{} of {} ({:.1}%)",
                    ct.entries,
                    ct.max,
                    ct.entries as f64 * 100.0 / ct.max.max(1) as f64
                ),
            ),
            ("dropped when full".into(), ct.full_drops.to_string()),
            (
                "dropped at a pod's or namespace's limit".into(),
                ct.limit_drops.to_string(),
            ),
        ],
    );
    let mut owners: Vec<&control::view::CtOwnerView> = ct.owners.iter().collect();
    owners.sort_by(|a, b| {
        b.refused
            .cmp(&a.refused)
            .then(b.connections.cmp(&a.connections))
    });
    section(
        "conntrack by pod and namespace (top 10)",
        owners
            .iter()
            .take(10)
            .map(|o| {
                (
                    o.name.clone(),
                    format!(
                        "{} of {} connections, {} refused at the limit",
                        o.connections, o.limit, o.refused
                    ),
                )
            })
            .collect(),
    );
    section(
        "drops by reason",
        s.drops
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
    );
    section(
        "tables",
        s.tables
            .iter()
            .map(|t| {
                (
                    format!("table {}", t.table),
                    format!(
                        "{} flows, {} lookups, {} matched, {} missed",
                        t.flows, t.lookups, t.matched, t.missed
                    ),
                )
            })
            .collect(),
    );
    let r = &s.realisation;
    section(
        "policy realisation",
        vec![
            ("generation".into(), r.generation.to_string()),
            ("flows changed".into(), r.flows_changed.to_string()),
            (
                "compile".into(),
                format!("{:.3} ms", r.compile_us as f64 / 1e3),
            ),
            (
                "publish".into(),
                format!("{:.3} ms", r.publish_us as f64 / 1e3),
            ),
            (
                "at".into(),
                r.at_rfc3339.clone().unwrap_or_else(|| "-".into()),
            ),
        ],
    );
    out
}

/// One refresh of `watch`: flows ordered by packets since the previous
/// refresh (then by total), with the rate.
pub fn watch_frame(
    flows: &[FlowView],
    previous: &HashMap<String, u64>,
    interval_s: f64,
    limit: usize,
    color: bool,
) -> String {
    let mut rows: Vec<(u64, &FlowView)> = flows
        .iter()
        .map(|f| {
            let before = previous.get(&f.flow).copied().unwrap_or(f.n_packets);
            (f.n_packets.saturating_sub(before), f)
        })
        .collect();
    rows.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| b.1.n_packets.cmp(&a.1.n_packets))
    });
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .take(limit)
        .map(|(delta, f)| {
            vec![
                format!("{:.0}", *delta as f64 / interval_s),
                f.n_packets.to_string(),
                f.n_bytes.to_string(),
                f.table.to_string(),
                f.priority.to_string(),
                format!(
                    "{} {}",
                    f.matcher,
                    paint(color, DIM, &format!("# {}", f.rule))
                ),
            ]
        })
        .collect();
    table(
        color,
        &["PKT/S", "PACKETS", "BYTES", "TABLE", "PRIO", "MATCH"],
        &table_rows,
    )
}

/// Policies by tier, each with its status and rules.
pub fn policies_text(policies: &[PolicyView], color: bool) -> String {
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| {
            vec![
                if p.tier.is_empty() {
                    "-".into()
                } else {
                    p.tier.clone()
                },
                p.priority.map_or("-".into(), |n| n.to_string()),
                p.kind.clone(),
                p.name.clone(),
                p.status.clone(),
                p.mode.clone(),
                p.rules.len().to_string(),
                p.flows.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        color,
        &[
            "TIER", "PRIORITY", "KIND", "NAME", "STATUS", "MODE", "RULES", "FLOWS",
        ],
        &rows,
    );
    if policies.iter().any(|p| p.mode == "audit") {
        let _ = writeln!(
            out,
            "mode audit: staged (vswitch.io/mode: audit): evaluated on new connections, not enforced"
        );
    }
    for p in policies {
        let notes: Vec<&String> = p.message.iter().chain(&p.warnings).collect();
        let rules: Vec<String> = p
            .rules
            .iter()
            .filter(|r| p.kind != policy::status::NETWORK_POLICY || r.flows == 0)
            .map(|r| {
                let name = r
                    .name
                    .as_ref()
                    .map_or(r.index.to_string(), |n| format!("{n:?}"));
                format!(
                    "{} rule {name}: {} ({} flows)",
                    r.direction, r.action, r.flows
                )
            })
            .collect();
        if notes.is_empty() && (p.kind == policy::status::NETWORK_POLICY || rules.is_empty()) {
            continue;
        }
        let _ = writeln!(out, "\n{} {}:", p.kind, paint(color, BOLD, &p.name));
        for n in notes {
            let _ = writeln!(out, "  ! {n}");
        }
        if p.kind != policy::status::NETWORK_POLICY {
            for r in rules {
                let _ = writeln!(out, "  {}", paint(color, DIM, &r));
            }
        }
    }
    out
}

/// Learned names, one row per address.
/// `dump-services`: one row per frontend and backend.
pub fn services_text(services: &[control::view::ServiceView], color: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in services {
        let service = match s.affinity {
            Some(secs) => format!("{} (ClientIP affinity, {secs} s)", s.service),
            None => s.service.clone(),
        };
        if s.backends.is_empty() {
            rows.push(vec![
                service,
                s.frontend.clone(),
                "no endpoints: refused".into(),
                String::new(),
            ]);
            continue;
        }
        for b in &s.backends {
            let backend = match &b.pod {
                Some(pod) => format!("{} ({pod})", b.address),
                None => b.address.clone(),
            };
            rows.push(vec![
                service.clone(),
                s.frontend.clone(),
                backend,
                b.connections.map_or("-".into(), |n| n.to_string()),
            ]);
        }
    }
    table(
        color,
        &["SERVICE", "FRONTEND", "BACKEND", "CONNECTIONS"],
        &rows,
    )
}

pub fn dns_text(names: &[DnsView], color: bool) -> String {
    let rows: Vec<Vec<String>> = names
        .iter()
        .flat_map(|n| {
            n.addresses.iter().map(|a| {
                vec![
                    n.name.clone(),
                    a.address.to_string(),
                    a.expires_in_s.to_string(),
                ]
            })
        })
        .collect();
    table(color, &["NAME", "ADDRESS", "EXPIRES_IN_S"], &rows)
}
