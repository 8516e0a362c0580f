//! Rendering answers as text (aligned, coloured on a terminal) or JSON.

use std::fmt::Write as _;

use policy::explain::{Traced, describe};
use policy::offline::Offline;
use policy::probe::L4;
use serde_json::{Value, json};

use control::spec::Spec;

pub(crate) use control::text::{BOLD, DIM, GREEN, RED, RESET, YELLOW, paint, trace as trace_text};

pub fn dump_flows(o: &Offline, table: Option<u8>, rule: Option<&str>, json: bool) -> String {
    let mut flows: Vec<_> = o.tables.iter().map(|(_, f)| f.entry.clone()).collect();
    // Each flow's text once, not once per comparison (100k flows: 20 s).
    flows.sort_by_cached_key(|f| (f.table, std::cmp::Reverse(f.priority), f.to_string()));
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
                let mut v = json!({
                    "from": c.from.to_string(),
                    "to": c.to.to_string(),
                    "protocol": l4.protocol_name(),
                    "port": port,
                    "verdict": if c.verdict.allowed { "allow" } else { "deny" },
                    "rule": c.verdict.rule,
                });
                if let Some(s) = staged(c) {
                    v["staged"] = json!(s);
                }
                v
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
                    Some(c) => match (c.verdict.allowed, staged(c).is_some()) {
                        (true, false) => paint(color, GREEN, "✓"),
                        (false, false) => paint(color, RED, "✗"),
                        (true, true) => paint(color, YELLOW, "!"),
                        (false, true) => paint(color, YELLOW, "+"),
                    },
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
    let changed = cells.iter().filter(|c| staged(c).is_some()).count();
    if changed > 0 {
        let _ = writeln!(
            out,
            "staged policies (vswitch.io/mode: audit) would change {changed}: ! allowed now, would be denied; + denied now, would be allowed"
        );
    }
    out
}

/// What staged policies would change about a cell, when something.
fn staged(c: &policy::offline::Reach) -> Option<policy::explain::StagedView> {
    c.staged
        .as_ref()
        .and_then(|s| policy::explain::StagedView::of(&c.verdict, s))
        .filter(|s| (s.verdict == "would deny") == c.verdict.allowed)
}
