//! Text views of what the running switch reports: flows, ports, connections,
//! counters. Each takes the control socket's JSON and returns aligned text.

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::Value;

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

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One flow as `ovs-ofctl dump-flows` prints it, then the rule it comes from.
pub fn flow_line(f: &Value, color: bool) -> String {
    let m = f["match"].as_str().unwrap_or("");
    let m = if m.is_empty() {
        String::new()
    } else {
        format!(",{m}")
    };
    format!(
        " cookie={}, duration={}s, table={}, n_packets={}, n_bytes={}, idle_age={}, priority={}{m} actions={}  {}",
        text(&f["cookie"]),
        f["duration_s"].as_f64().unwrap_or(0.0),
        num(&f["table"]),
        num(&f["n_packets"]),
        num(&f["n_bytes"]),
        f["idle_age_s"].as_f64().unwrap_or(0.0) as u64,
        num(&f["priority"]),
        f["actions"].as_str().unwrap_or(""),
        paint(color, DIM, &format!("# {}", text(&f["rule"]))),
    )
}

/// Whether a flow passes `--table` and `--cookie` (a substring of its rule).
pub fn keep_flow(f: &Value, table: Option<u8>, rule: Option<&str>) -> bool {
    table.is_none_or(|t| f["table"].as_u64() == Some(u64::from(t)))
        && rule.is_none_or(|r| f["rule"].as_str().unwrap_or("").contains(r))
}

/// The flows of a `dump-flows` answer that pass `--table` and `--cookie`.
pub fn kept_flows<'a>(flows: &'a Value, table: Option<u8>, rule: Option<&str>) -> Vec<&'a Value> {
    flows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| keep_flow(f, table, rule))
        .collect()
}

pub fn flows_text(flows: &[&Value], color: bool) -> String {
    let mut out = String::new();
    for f in flows {
        out.push_str(&flow_line(f, color));
        out.push('\n');
    }
    if flows.iter().any(|f| f["manual"] == true) {
        out.push_str(&paint(
            color,
            DIM,
            "(manual flows are not policy: they stay until del-flows or a vswitchd restart)\n",
        ));
    }
    out
}

/// Non-zero drop counters, `reason=n,...` (or `-`).
fn drops(d: &Value) -> (u64, String) {
    let mut total = 0;
    let mut parts = Vec::new();
    if let Some(m) = d.as_object() {
        for (k, v) in m {
            let n = num(v);
            if n > 0 {
                total += n;
                parts.push(format!("{k}={n}"));
            }
        }
    }
    let detail = if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(",")
    };
    (total, detail)
}

pub fn ports_text(ports: &Value, color: bool) -> String {
    let rows: Vec<Vec<String>> = ports
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let (total, detail) = drops(&p["drops"]);
            let who = match (p["pod"].as_str(), p["node"].as_str()) {
                (Some(pod), _) => pod.to_string(),
                (None, Some(node)) => format!("(tunnel to {node})"),
                (None, None) => format!("({})", text(&p["kind"])),
            };
            let ips = p["ips"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "-".into());
            vec![
                num(&p["port"]).to_string(),
                who,
                text(&p["ifname"]),
                ips,
                num(&p["rx_packets"]).to_string(),
                num(&p["rx_bytes"]).to_string(),
                num(&p["tx_packets"]).to_string(),
                num(&p["tx_bytes"]).to_string(),
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

pub fn conntrack_text(conns: &Value, color: bool) -> String {
    let rows: Vec<Vec<String>> = conns
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                text(&c["proto"]),
                format!("{}:{}", text(&c["src"]), num(&c["sport"])),
                format!("{}:{}", text(&c["dst"]), num(&c["dport"])),
                text(&c["state"]),
                format!("{}s", num(&c["timeout_s"])),
                format!(
                    "{}/{}",
                    num(&c["packets"]["orig"]),
                    num(&c["packets"]["reply"])
                ),
                format!("{}/{}", num(&c["bytes"]["orig"]), num(&c["bytes"]["reply"])),
                num(&c["zone"]).to_string(),
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

pub fn stats_text(s: &Value, color: bool) -> String {
    let mut out = String::new();
    let mut section = |title: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "{}", paint(color, BOLD, title));
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<w$}  {v}");
        }
    };
    let c = &s["cache"];
    section(
        "datapath",
        vec![
            ("packets".into(), num(&s["packets"]).to_string()),
            ("bytes".into(), num(&s["bytes"]).to_string()),
            (
                "flows".into(),
                format!("{} ({} masks)", num(&s["flows"]), num(&s["masks"])),
            ),
            ("generation".into(), num(&s["generation"]).to_string()),
        ],
    );
    section(
        "microflow cache",
        vec![
            ("lookups".into(), num(&c["lookups"]).to_string()),
            (
                "hit rate".into(),
                format!("{:.1}%", c["hit_rate"].as_f64().unwrap_or(0.0) * 100.0),
            ),
            ("hits".into(), num(&c["hits"]).to_string()),
            ("misses".into(), num(&c["misses"]).to_string()),
            ("evictions".into(), num(&c["evictions"]).to_string()),
        ],
    );
    let ct = &s["conntrack"];
    section(
        "conntrack",
        vec![
            (
                "entries".into(),
                format!(
                    "{} of {} ({:.1}%)",
                    num(&ct["entries"]),
                    num(&ct["max"]),
                    num(&ct["entries"]) as f64 * 100.0 / num(&ct["max"]).max(1) as f64
                ),
            ),
            (
                "dropped when full".into(),
                num(&ct["full_drops"]).to_string(),
            ),
        ],
    );
    let drop_rows: Vec<(String, String)> = s["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), num(v).to_string()))
        .collect();
    section("drops by reason", drop_rows);
    let t_rows: Vec<(String, String)> = s["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                format!("table {}", num(&t["table"])),
                format!(
                    "{} flows, {} lookups, {} matched, {} missed",
                    num(&t["flows"]),
                    num(&t["lookups"]),
                    num(&t["matched"]),
                    num(&t["missed"])
                ),
            )
        })
        .collect();
    section("tables", t_rows);
    let r = &s["realisation"];
    section(
        "policy realisation",
        vec![
            ("generation".into(), num(&r["generation"]).to_string()),
            ("flows changed".into(), num(&r["flows_changed"]).to_string()),
            (
                "compile".into(),
                format!("{:.3} ms", num(&r["compile_us"]) as f64 / 1e3),
            ),
            (
                "publish".into(),
                format!("{:.3} ms", num(&r["publish_us"]) as f64 / 1e3),
            ),
            ("at".into(), text(&r["at_rfc3339"])),
        ],
    );
    out
}

/// One refresh of `watch`: flows ordered by packets since the previous
/// refresh (then by total), with the rate.
pub fn watch_frame(
    flows: &[&Value],
    previous: &HashMap<String, u64>,
    interval_s: f64,
    limit: usize,
    color: bool,
) -> String {
    let mut rows: Vec<(u64, &Value)> = flows
        .iter()
        .map(|f| {
            let key = f["flow"].as_str().unwrap_or("").to_string();
            let now = num(&f["n_packets"]);
            let before = previous.get(&key).copied().unwrap_or(now);
            (now.saturating_sub(before), *f)
        })
        .collect();
    rows.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| num(&b.1["n_packets"]).cmp(&num(&a.1["n_packets"])))
    });
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .take(limit)
        .map(|(delta, f)| {
            vec![
                format!("{:.0}", *delta as f64 / interval_s),
                num(&f["n_packets"]).to_string(),
                num(&f["n_bytes"]).to_string(),
                num(&f["table"]).to_string(),
                num(&f["priority"]).to_string(),
                format!(
                    "{} {}",
                    f["match"].as_str().unwrap_or(""),
                    paint(color, DIM, &format!("# {}", text(&f["rule"])))
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
