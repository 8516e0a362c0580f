//! From a datapath trace to a verdict that names the deciding rule.
//!
//! Owns the wording operators see: "allow" or "deny", and which policy rule (or
//! default deny, or pipeline stage) decided it, from the cookies of the flows the
//! packet matched.

use datapath::field::Field;
use datapath::flow::Cookie;
use datapath::key::wide_to_ip;
use datapath::pipeline::End;
use datapath::trace::{Outcome, Trace};

use crate::compile::{AFTER_EGRESS, Compiler, EGRESS_TABLE, INGRESS_TABLE, Provenance};
use crate::pipeline;

/// What a cookie stands for, in words.
pub fn describe(compiler: &Compiler, cookie: Cookie) -> String {
    let rules = compiler.rules(cookie);
    match rules.len() {
        0 => {}
        1 => return rules[0].to_string(),
        n => {
            let shown: Vec<String> = rules.iter().take(3).map(ToString::to_string).collect();
            let more = if n > 3 {
                format!(" and {} more", n - 3)
            } else {
                String::new()
            };
            return format!("{}{more}", shown.join(", "));
        }
    }
    if let Some(d) = pipeline::describe(cookie) {
        return d.to_string();
    }
    if crate::compile::is_manual(cookie) {
        return "manual flow (flowctl add-flow; not policy)".to_string();
    }
    if cookie.0 == 0 {
        "no cookie".to_string()
    } else {
        format!("cookie 0x{:x}", cookie.0)
    }
}

/// An explained trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The deciding rule(s), in words.
    pub rule: String,
    /// The provenance of each policy decision (egress, then ingress) when allowed,
    /// or of the flow that dropped the packet.
    pub rules: Vec<String>,
    /// The deciding policy rules, default denies or own-node allowances, as
    /// data (empty when no policy decided: not isolated, or conntrack).
    pub decided_by: Vec<Provenance>,
}

/// Explains `trace` with the compiler's provenance.
pub fn explain(compiler: &Compiler, trace: &Trace) -> Verdict {
    match &trace.outcome {
        Outcome::Output(_) | Outcome::Punt => {
            let mut rules = Vec::new();
            let mut deciding = Vec::new();
            let mut decided_by = Vec::new();
            for step in &trace.steps {
                let Some((_, flow)) = &step.flow else {
                    continue;
                };
                if step.table.0 != EGRESS_TABLE && step.table.0 != INGRESS_TABLE {
                    continue;
                }
                // Flows shared by equivalent rules: name the one whose policy
                // selects this packet's pod (destination for ingress, source for egress).
                let field = if step.table.0 < AFTER_EGRESS {
                    Field::NwSrc
                } else {
                    Field::NwDst
                };
                let ip = wide_to_ip(step.key.get(field).to_be_bytes());
                let named = match compiler.cluster().pod_by_ip(ip) {
                    Some(pod) => compiler.rule_for_pod(flow.cookie, pod),
                    None => compiler.provenance(flow.cookie),
                };
                match named.or_else(|| compiler.provenance(flow.cookie)) {
                    Some(p @ (Provenance::Rule { .. } | Provenance::NodeTraffic { .. })) => {
                        rules.push(p.to_string());
                        deciding.push(p.to_string());
                        decided_by.push(p);
                    }
                    _ if step.table.0 < AFTER_EGRESS => {
                        rules.push("source not isolated for egress".into())
                    }
                    _ => rules.push("destination not isolated for ingress".into()),
                }
            }
            let rule = if !deciding.is_empty() {
                deciding.join("; ")
            } else if rules.is_empty() {
                "established connection (conntrack)".to_string()
            } else {
                "no policy isolates source (egress) or destination (ingress)".to_string()
            };
            Verdict {
                allowed: true,
                rule,
                rules,
                decided_by,
            }
        }
        Outcome::Drop { by, end } => {
            let rule = match (trace.deciding_flow(), end) {
                (Some(f), _) => describe(compiler, f.cookie),
                (None, End::Miss(t)) => format!("no flow matched in table {t}"),
                (None, End::LoopLimit) => "pipeline loop limit".to_string(),
                (None, _) => format!("dropped (flow {by:?})"),
            };
            let decided_by = trace
                .deciding_flow()
                .and_then(|f| compiler.provenance(f.cookie))
                .filter(|p| matches!(p, Provenance::DefaultDeny { .. } | Provenance::Rule { .. }))
                .into_iter()
                .collect();
            Verdict {
                allowed: false,
                rules: vec![rule.clone()],
                rule,
                decided_by,
            }
        }
    }
}

/// `+new+trk` style text of a `ct_state`.
pub fn ct_state_text(state: u8) -> String {
    let mut out = String::new();
    for (bit, name) in datapath::field::ct_state::NAMES {
        if state & bit != 0 {
            out.push('+');
            out.push_str(name);
        }
    }
    out
}

/// What conntrack makes of a packet: `new`, `established`, `related` or `invalid`.
pub fn connection_kind(state: u8) -> &'static str {
    use datapath::field::ct_state::*;
    if state & INV != 0 {
        "invalid"
    } else if state & EST != 0 {
        "established"
    } else if state & REL != 0 {
        "related"
    } else {
        "new"
    }
}

/// A trace as JSON, the one shape `flowctl` prints (offline or live) and renders
/// as text: `packet`, `verdict`, `rule`, `rules`, `output`, `steps`.
/// `assumed`: conntrack states were assumed (offline) rather than looked up.
pub fn trace_view(
    compiler: &Compiler,
    topology: &crate::pipeline::Topology,
    src: &crate::offline::Endpoint,
    dst: &crate::offline::Endpoint,
    l4: crate::offline::L4,
    traced: &crate::offline::Traced,
    assumed: bool,
) -> serde_json::Value {
    use datapath::flow::Action;
    use serde_json::json;
    let k = &traced.key;
    let ports = match l4 {
        crate::offline::L4::Icmp => (None, None),
        _ => (Some(k.tp_src), Some(k.tp_dst)),
    };
    let name_of =
        |ip: std::net::IpAddr| compiler.cluster().pod_by_ip(ip).map(|p| p.key.to_string());
    let mut ct = traced.trace.ct_lookups.iter();
    let steps: Vec<serde_json::Value> = traced
        .trace
        .steps
        .iter()
        .map(|s| {
            let flow = s.flow.as_ref().map(|(_, f)| f);
            let recirc = flow.is_some_and(|f| f.actions.iter().any(|a| matches!(a, Action::Ct { table: Some(_), .. })));
            json!({
                "table": s.table.0,
                "depth": s.depth,
                "priority": flow.map(|f| f.priority),
                "flow": flow.map(|f| f.to_string()),
                "rule": flow.map(|f| describe(compiler, f.cookie)),
                "conjunction": s.conjunction.as_ref().map(|c| json!({
                    "id": c.id,
                    "clauses": c.members.iter().map(|(_, m)| json!({"flow": m.to_string(), "rule": describe(compiler, m.cookie)})).collect::<Vec<_>>(),
                })),
                "conntrack": if recirc {
                    ct.next().map(|(zone, state)| json!({"zone": zone, "state": ct_state_text(*state), "assumed": assumed}))
                } else {
                    None
                },
            })
        })
        .collect();
    let output: Vec<serde_json::Value> = match &traced.trace.outcome {
        Outcome::Output(ports) => ports
            .iter()
            .map(|p| {
                let pod = topology
                    .pods
                    .iter()
                    .find(|x| x.port == *p)
                    .map(|x| x.pod.to_string());
                json!({"port": p.0, "pod": pod})
            })
            .collect(),
        _ => vec![],
    };
    json!({
        "packet": {
            "protocol": l4.protocol_name(),
            "src": src.to_string(),
            "dst": dst.to_string(),
            "src_ip": wide_to_ip(k.nw_src).to_string(),
            "dst_ip": wide_to_ip(k.nw_dst).to_string(),
            "src_pod": name_of(wide_to_ip(k.nw_src)),
            "dst_pod": name_of(wide_to_ip(k.nw_dst)),
            "tp_src": ports.0,
            "tp_dst": ports.1,
            "in_port": k.in_port.0,
        },
        "connection": traced.trace.ct_lookups.first().map(|(_, state)| connection_kind(*state)),
        "conntrack_assumed": assumed,
        "verdict": if traced.verdict.allowed { "allow" } else { "deny" },
        "rule": traced.verdict.rule,
        "rules": traced.verdict.rules,
        "output": output,
        "steps": steps,
    })
}
