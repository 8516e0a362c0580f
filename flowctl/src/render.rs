//! Rendering answers as text (aligned, coloured on a terminal) or JSON.

use std::fmt::Write as _;

use datapath::field::ct_state;
use datapath::flow::Action;
use datapath::key::wide_to_ip;
use datapath::trace::Outcome;
use policy::explain::describe;
use policy::offline::{L4, Offline, Traced};
use serde_json::{Value, json};

use crate::spec::Spec;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

fn paint(color: bool, code: &str, s: &str) -> String {
    if color {
        format!("{code}{s}{RESET}")
    } else {
        s.to_string()
    }
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let _ = write!(out, ": {s}");
        src = s.source();
    }
    out
}

pub fn ct_state_text(state: u8) -> String {
    let mut out = String::new();
    for (bit, name) in ct_state::NAMES {
        if state & bit != 0 {
            out.push('+');
            out.push_str(name);
        }
    }
    out
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

fn endpoint_text(
    o: &Offline,
    ep: &policy::offline::Endpoint,
    ip: std::net::IpAddr,
    port: Option<u16>,
) -> String {
    let addr = match port {
        Some(p) if ip.is_ipv6() => format!("[{ip}]:{p}"),
        Some(p) => format!("{ip}:{p}"),
        None => ip.to_string(),
    };
    match ep {
        policy::offline::Endpoint::Pod(k) => format!("{k} ({addr})"),
        policy::offline::Endpoint::Ip(_) => match o.compiler.cluster().pod_by_ip(ip) {
            Some(p) => format!("{} ({addr})", p.key),
            None => format!("{addr} (outside the cluster)"),
        },
    }
}

pub fn trace(o: &Offline, spec: &Spec, t: &Traced, json: bool, color: bool) -> String {
    let k = &t.key;
    let (sport, dport) = match spec.l4 {
        L4::Icmp => (None, None),
        _ => (Some(k.tp_src), Some(k.tp_dst)),
    };
    let src = endpoint_text(o, &spec.src, wide_to_ip(k.nw_src), sport);
    let dst = endpoint_text(o, &spec.dst, wide_to_ip(k.nw_dst), dport);
    let outputs = match &t.trace.outcome {
        Outcome::Output(p) => p.iter().map(|p| p.0).collect(),
        _ => vec![],
    };
    if json {
        let mut ct = t.trace.ct_lookups.iter();
        let steps: Vec<Value> = t
            .trace
            .steps
            .iter()
            .map(|s| {
                let flow = s.flow.as_ref().map(|(_, f)| f);
                let has_ct = flow.is_some_and(|f| f.actions.iter().any(|a| matches!(a, Action::Ct { table: Some(_), .. })));
                json!({
                    "table": s.table.0,
                    "depth": s.depth,
                    "priority": flow.map(|f| f.priority),
                    "flow": flow.map(|f| f.to_string()),
                    "rule": flow.map(|f| describe(&o.compiler, f.cookie)),
                    "conjunction": s.conjunction.as_ref().map(|c| json!({
                        "id": c.id,
                        "clauses": c.members.iter().map(|(_, m)| json!({
                            "flow": m.to_string(),
                            "rule": describe(&o.compiler, m.cookie),
                        })).collect::<Vec<_>>(),
                    })),
                    "conntrack": if has_ct {
                        ct.next().map(|(zone, state)| json!({"zone": zone, "state": ct_state_text(*state), "assumed": true}))
                    } else { None },
                })
            })
            .collect();
        let v = json!({
            "packet": {
                "protocol": spec.l4.protocol_name(),
                "src": spec.src.to_string(),
                "dst": spec.dst.to_string(),
                "src_ip": wide_to_ip(k.nw_src).to_string(),
                "dst_ip": wide_to_ip(k.nw_dst).to_string(),
                "tp_src": sport,
                "tp_dst": dport,
                "in_port": k.in_port.0,
            },
            "verdict": if t.verdict.allowed { "allow" } else { "deny" },
            "rule": t.verdict.rule,
            "rules": t.verdict.rules,
            "output": outputs,
            "steps": steps,
        });
        return format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} {src} -> {dst}",
        paint(color, BOLD, "packet:"),
        spec.l4.protocol_name()
    );
    let _ = writeln!(
        out,
        "{}",
        paint(
            color,
            DIM,
            "(a new connection; offline mode assumes conntrack +trk+new)"
        )
    );
    let mut ct = t.trace.ct_lookups.iter();
    for s in &t.trace.steps {
        let indent = "    ".repeat(s.depth as usize);
        match &s.flow {
            None => {
                let _ = writeln!(out, "{indent}table={:<3} no match", s.table.0);
            }
            Some((_, f)) => {
                let rule = describe(&o.compiler, f.cookie);
                let _ = writeln!(
                    out,
                    "{indent}table={:<3} {}  {}",
                    s.table.0,
                    f,
                    paint(color, DIM, &format!("# {rule}"))
                );
                if let Some(c) = &s.conjunction {
                    let _ = writeln!(out, "{indent}          conjunction {} completed by:", c.id);
                    for (_, m) in &c.members {
                        let _ = writeln!(out, "{indent}            {m}");
                    }
                }
                if f.actions
                    .iter()
                    .any(|a| matches!(a, Action::Ct { table: Some(_), .. }))
                    && let Some((zone, state)) = ct.next()
                {
                    let _ = writeln!(
                        out,
                        "{indent}          conntrack zone {zone}: {}",
                        ct_state_text(*state)
                    );
                }
            }
        }
    }
    let verdict = if t.verdict.allowed {
        paint(color, GREEN, "ALLOW")
    } else {
        paint(color, RED, "DENY")
    };
    let _ = writeln!(
        out,
        "{} {verdict} by {}",
        paint(color, BOLD, "verdict:"),
        t.verdict.rule
    );
    if !outputs.is_empty() {
        let ports: Vec<String> = outputs
            .iter()
            .map(
                |p| match o.topology.pods.iter().find(|pp| pp.port.0 == *p) {
                    Some(pp) => format!("{p} ({})", pp.pod),
                    None => format!("{p} (gateway)"),
                },
            )
            .collect();
        let _ = writeln!(out, "output: port {}", ports.join(", "));
    }
    out
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
