//! Text renderings shared by flowctl and the web view: a trace reads the
//! same in a terminal and in a browser.

use std::fmt::Write as _;

use policy::explain::TraceView;

pub const GREEN: &str = "\x1b[32m";
pub const RED: &str = "\x1b[31m";
pub const YELLOW: &str = "\x1b[33m";
pub const DIM: &str = "\x1b[2m";
pub const BOLD: &str = "\x1b[1m";
pub const RESET: &str = "\x1b[0m";

/// `s` in an ANSI colour when `color`.
pub fn paint(color: bool, code: &str, s: &str) -> String {
    if color {
        format!("{code}{s}{RESET}")
    } else {
        s.to_string()
    }
}

/// Renders a trace view (offline or live) as text.
pub fn trace(v: &TraceView, color: bool) -> String {
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
    for t in &v.translations {
        let pod = t.pod.as_ref().map_or(String::new(), |p| format!(" ({p})"));
        let _ = writeln!(
            out,
            "{} {} {} -> {}{pod}",
            paint(color, BOLD, "translated:"),
            t.end,
            t.from,
            t.to
        );
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
