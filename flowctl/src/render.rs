//! Rendering answers as text (aligned, coloured on a terminal) or JSON.

use std::fmt::Write as _;

use policy::explain::{TraceView, Traced, describe};
use policy::offline::Offline;
use policy::probe::L4;
use serde_json::{Value, json};

use crate::spec::Spec;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
pub(crate) const DIM: &str = "\x1b[2m";
pub(crate) const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

pub(crate) fn paint(color: bool, code: &str, s: &str) -> String {
    if color {
        format!("{code}{s}{RESET}")
    } else {
        s.to_string()
    }
}

pub fn dump_flows(o: &Offline, table: Option<u8>, rule: Option<&str>, json: bool) -> String {
    let mut flows: Vec<_> = o.tables.iter().map(|(_, f)| f.entry.clone()).collect();
    flows.sort_by(|a, b| {
        (a.table, std::cmp::Reverse(a.priority), a.to_string()).cmp(&(
            b.table,
            std::cmp::Reverse(b.priority),
            b.to_string(),
        ))
    });
    let selected = flows.iter().filter(|f| {
        table.is_none_or(|t| f.table.0 == t)
            && rule.is_none_or(|r| describe(&o.compiler, f.cookie).contains(r))
    });
    if json {
        let list: Vec<Value> = selected
            .map(|f| {
                json!({
                    "table": f.table.0,
                    "priority": f.priority,
                    "match": datapath::ofctl::format_match(&f.matcher),
                    "actions": datapath::ofctl::format_actions(&f.actions),
                    "cookie": format!("0x{:x}", f.cookie.0),
                    "rule": describe(&o.compiler, f.cookie),
                    "flow": f.to_string(),
                })
            })
            .collect();
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
    }
    let mut out = String::new();
    for f in selected {
        let _ = writeln!(out, "{f}  # {}", describe(&o.compiler, f.cookie));
    }
    out
}

/// Renders a trace view (offline or live) as text.
pub fn trace_text(v: &TraceView, color: bool) -> String {
    let p = &v.packet;
    let end = |ip: &str, port: Option<u16>, pod: &Option<String>| {
        let addr = match port {
            Some(port) if ip.contains(':') => format!("[{ip}]:{port}"),
            Some(port) => format!("{ip}:{port}"),
            None => ip.to_string(),
        };
        match pod {
            Some(pod) => format!("{pod} ({addr})"),
            None => format!("{addr} (outside the cluster)"),
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} {} -> {}",
        paint(color, BOLD, "packet:"),
        p.protocol,
        end(&p.src_ip, p.tp_src, &p.src_pod),
        end(&p.dst_ip, p.tp_dst, &p.dst_pod),
    );
    if v.conntrack_assumed {
        let _ = writeln!(
            out,
            "{}",
            paint(
                color,
                DIM,
                "(a new connection; offline mode assumes conntrack +trk+new)"
            )
        );
    } else if let Some(kind) = &v.connection {
        let what = match kind.as_str() {
            "new" => "a new connection",
            "established" => "part of an established connection: policy is not consulted again",
            "related" => "related to a tracked connection",
            _ => "invalid for conntrack: dropped",
        };
        let _ = writeln!(
            out,
            "{}",
            paint(color, DIM, &format!("(live conntrack: {what})"))
        );
    }
    for s in &v.steps {
        let indent = "    ".repeat(s.depth as usize);
        let table = s.table;
        match &s.flow {
            None => {
                let _ = writeln!(out, "{indent}table={table:<3} no match");
            }
            Some(flow) => {
                let rule = s.rule.as_deref().unwrap_or("");
                let _ = writeln!(
                    out,
                    "{indent}table={table:<3} {flow}  {}",
                    paint(color, DIM, &format!("# {rule}"))
                );
                if let Some(c) = &s.conjunction {
                    let _ = writeln!(out, "{indent}          conjunction {} completed by:", c.id);
                    for clause in &c.clauses {
                        let _ = writeln!(out, "{indent}            {}", clause.flow);
                    }
                }
                if let Some(ct) = &s.conntrack {
                    let _ = writeln!(
                        out,
                        "{indent}          conntrack zone {}: {}",
                        ct.zone, ct.state
                    );
                }
            }
        }
    }
    let verdict = if v.verdict == "allow" {
        paint(color, GREEN, "ALLOW")
    } else {
        paint(color, RED, "DENY")
    };
    let _ = writeln!(
        out,
        "{} {verdict} by {}",
        paint(color, BOLD, "verdict:"),
        v.rule
    );
    if let Some(s) = &v.staged {
        let _ = writeln!(
            out,
            "{} {} by {} (vswitch.io/mode: audit, not enforced)",
            paint(color, BOLD, "staged:"),
            paint(color, YELLOW, &s.verdict.to_uppercase()),
            s.rule
        );
    }
    let outputs: Vec<String> = v
        .output
        .iter()
        .map(|o| match &o.pod {
            Some(pod) => format!("{} ({pod})", o.port),
            None => format!("{} (gateway)", o.port),
        })
        .collect();
    if !outputs.is_empty() {
        let _ = writeln!(out, "output: port {}", outputs.join(", "));
    }
    out
}

pub fn trace(o: &Offline, spec: &Spec, t: &Traced, json: bool, color: bool) -> String {
    let v = policy::explain::trace_view(
        &o.compiler,
        &o.topology,
        &spec.src,
        &spec.dst,
        spec.l4,
        t,
        true,
    );
    if json {
        return format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    trace_text(&v, color)
}

pub fn reachability(o: &Offline, l4: L4, json: bool, color: bool) -> String {
    let cells = o.reachability(l4);
    let port = l4.port();
    if json {
        let list: Vec<Value> = cells
            .iter()
            .map(|c| {
                json!({
                    "from": c.from.to_string(),
                    "to": c.to.to_string(),
                    "protocol": l4.protocol_name(),
                    "port": port,
                    "verdict": if c.verdict.allowed { "allow" } else { "deny" },
                    "rule": c.verdict.rule,
                })
            })
            .collect();
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
    }
    let pods: Vec<String> = o.topology.pods.iter().map(|p| p.pod.to_string()).collect();
    let w = pods.iter().map(String::len).max().unwrap_or(4).max(6);
    let mut out = String::new();
    let title = format!(
        "{}/{}",
        l4.protocol_name(),
        port.map_or("-".into(), |p| p.to_string())
    );
    let _ = write!(
        out,
        "{:<w$}",
        paint(color, BOLD, &title),
        w = w + if color { BOLD.len() + RESET.len() } else { 0 }
    );
    for (i, _) in pods.iter().enumerate() {
        let _ = write!(out, " {:>3}", i + 1);
    }
    out.push('\n');
    for (i, from) in pods.iter().enumerate() {
        let _ = write!(out, "{from:<w$}");
        for (j, to) in pods.iter().enumerate() {
            let cell = if i == j {
                paint(color, DIM, "-")
            } else {
                match cells
                    .iter()
                    .find(|c| c.from.to_string() == *from && c.to.to_string() == *to)
                {
                    Some(c) if c.verdict.allowed => paint(color, GREEN, "✓"),
                    Some(_) => paint(color, RED, "✗"),
                    None => "?".into(),
                }
            };
            let _ = write!(out, "   {cell}");
        }
        let _ = writeln!(
            out,
            "   {}",
            paint(color, DIM, &format!("{:>2} = {from}", i + 1))
        );
    }
    let denied = cells.iter().filter(|c| !c.verdict.allowed).count();
    let _ = writeln!(
        out,
        "rows: from, columns: to; {} allowed, {denied} denied",
        cells.len() - denied
    );
    out
}
