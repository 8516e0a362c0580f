//! From a datapath trace to a verdict that names the deciding rule.
//!
//! Owns the wording operators see: "allow" or "deny", and which policy rule (or
//! default deny, or pipeline stage) decided it, from the cookies of the flows the
//! packet matched.

use datapath::FlowKey;
use datapath::field::Field;
use datapath::flow::{Action, Cookie};
use datapath::key::wide_to_ip;
use datapath::pipeline::End;
use datapath::trace::{Outcome, Trace};
use serde::{Deserialize, Serialize};

use crate::cnp::RuleAction;
use crate::compile::{Compiler, Provenance};
use crate::pipeline::{self, Topology};
use crate::probe::{Endpoint, L4};
use crate::tables::{is_egress_table, is_policy_table};

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
    if crate::cookie::is_manual(cookie) {
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
            for egress in [true, false] {
                // Egress matches the packet's source pod, ingress its destination.
                let field = if egress { Field::NwSrc } else { Field::NwDst };
                let mut seen = false;
                let mut decided = false;
                let mut side = None;
                for step in &trace.steps {
                    let Some((_, flow)) = &step.flow else {
                        continue;
                    };
                    if !is_policy_table(step.table.0) || is_egress_table(step.table.0) != egress {
                        continue;
                    }
                    seen = true;
                    // Flows shared by equivalent rules: name the one whose
                    // policy selects this packet's pod.
                    let ip = wide_to_ip(step.key.get(field).to_be_bytes());
                    side = Some(ip);
                    let named = match compiler.cluster().pod_by_ip(ip) {
                        Some(pod) => compiler.rule_for_pod(flow.cookie, pod),
                        None => compiler.provenance(flow.cookie),
                    };
                    match named.or_else(|| compiler.provenance(flow.cookie)) {
                        Some(
                            p @ (Provenance::Rule { .. }
                            | Provenance::NodeTraffic { .. }
                            | Provenance::TierRule {
                                action: RuleAction::Accept,
                                ..
                            }),
                        ) => {
                            rules.push(p.to_string());
                            deciding.push(p.to_string());
                            decided_by.push(p);
                            decided = true;
                        }
                        // Pass: the next tier decides; say so on the way.
                        Some(p @ Provenance::TierRule { .. }) => rules.push(p.to_string()),
                        _ => {}
                    }
                }
                // A pod of another node: its rules are not compiled here.
                let cluster = compiler.cluster();
                let elsewhere = side
                    .and_then(|ip| cluster.pod_by_ip(ip))
                    .filter(|pod| !cluster.is_local(pod))
                    .and_then(|pod| pod.node.clone());
                if seen && !decided {
                    rules.push(match (elsewhere, egress) {
                        (Some(node), true) => {
                            format!("source runs on {node}: its egress policies are enforced there")
                        }
                        (Some(node), false) => format!(
                            "destination runs on {node}: its ingress policies are enforced there"
                        ),
                        (None, true) => "source not isolated for egress".into(),
                        (None, false) => "destination not isolated for ingress".into(),
                    });
                }
            }
            let rule = if !deciding.is_empty() {
                deciding.join("; ")
            } else if rules.iter().any(|r| r.ends_with("enforced there")) {
                rules.join("; ")
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
        Outcome::Reject => {
            let rule = trace
                .matched()
                .last()
                .map(|f| describe(compiler, f.cookie))
                .unwrap_or_else(|| "refused".into());
            Verdict {
                allowed: false,
                rule: rule.clone(),
                rules: vec![rule],
                decided_by: Vec::new(),
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
                .filter(|p| {
                    matches!(
                        p,
                        Provenance::DefaultDeny { .. }
                            | Provenance::Rule { .. }
                            | Provenance::TierRule { .. }
                    )
                })
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

/// A traced packet and its explanation.
#[derive(Debug, Clone)]
pub struct Traced {
    pub key: FlowKey,
    pub trace: Trace,
    pub verdict: Verdict,
    /// The verdict with staged policies enforced (`None`: nothing staged).
    pub staged: Option<Verdict>,
}

/// A trace as operators see it, offline or live: the one shape `flowctl`
/// prints as JSON and renders as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceView {
    pub packet: PacketView,
    /// What conntrack made of the first lookup: `new`, `established`,
    /// `related` or `invalid`.
    pub connection: Option<String>,
    /// Conntrack states were assumed (offline) rather than looked up.
    pub conntrack_assumed: bool,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The deciding rule(s), in words.
    pub rule: String,
    pub rules: Vec<String>,
    pub output: Vec<OutputView>,
    pub steps: Vec<StepView>,
    /// What staged policies (`vswitch.io/mode: audit`) would change about
    /// this connection, when something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedView>,
    /// Translations the packet got on the way (a Service's backend chosen,
    /// a hairpin source), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub translations: Vec<TranslationView>,
}

/// One translation: what changed, as `address:port`, and the pod now named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslationView {
    /// `destination` or `source`.
    pub end: String,
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

fn translation_views(compiler: &Compiler, trace: &Trace) -> Vec<TranslationView> {
    let fmt = |ip, port| std::net::SocketAddr::new(ip, port).to_string();
    let mut out = Vec::new();
    for (from, to) in &trace.translations {
        for (end, a, b) in [
            ("destination", (from.dst, from.dport), (to.dst, to.dport)),
            ("source", (from.src, from.sport), (to.src, to.sport)),
        ] {
            if a != b {
                let ip = wide_to_ip(b.0);
                out.push(TranslationView {
                    end: end.into(),
                    from: fmt(wide_to_ip(a.0), a.1),
                    to: fmt(ip, b.1),
                    pod: compiler.cluster().pod_by_ip(ip).map(|p| p.key.to_string()),
                });
            }
        }
    }
    out
}

/// How a staged verdict relates to the enforced one, for people: `None`
/// when the staged policies change nothing about the connection.
pub fn compare_staged(enforced: &Verdict, staged: &Verdict) -> Option<&'static str> {
    match (enforced.allowed, staged.allowed) {
        (true, false) => Some("would deny"),
        (false, true) => Some("would allow"),
        _ if enforced.decided_by != staged.decided_by => Some(if staged.allowed {
            "would allow"
        } else {
            "would deny"
        }),
        _ => None,
    }
}

/// A staged verdict next to the enforced one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedView {
    /// `would deny` or `would allow`.
    pub verdict: String,
    /// The deciding rule(s) with staged policies enforced, in words.
    pub rule: String,
}

impl StagedView {
    /// The view when staged policies change something about the verdict.
    pub fn of(enforced: &Verdict, staged: &Verdict) -> Option<StagedView> {
        compare_staged(enforced, staged).map(|v| StagedView {
            verdict: v.to_string(),
            rule: staged.rule.clone(),
        })
    }
}

/// The traced packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketView {
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub src_ip: String,
    pub dst_ip: String,
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    pub tp_src: Option<u16>,
    pub tp_dst: Option<u16>,
    pub in_port: u32,
}

/// A port the packet leaves by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputView {
    pub port: u32,
    /// The pod behind it (`None`: the gateway or a tunnel).
    pub pod: Option<String>,
}

/// One table visit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepView {
    pub table: u8,
    pub depth: u32,
    pub priority: Option<u16>,
    /// The flow that matched, ovs-ofctl syntax (`None`: a table miss).
    pub flow: Option<String>,
    pub rule: Option<String>,
    pub conjunction: Option<ConjunctionView>,
    /// The conntrack lookup this flow made.
    pub conntrack: Option<CtLookupView>,
}

/// A conjunctive match and the clause flows that completed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConjunctionView {
    pub id: u32,
    pub clauses: Vec<ClauseView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClauseView {
    pub flow: String,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtLookupView {
    pub zone: u16,
    /// `+new+trk` style.
    pub state: String,
    pub assumed: bool,
}

/// The view of a trace. `assumed`: conntrack states were assumed (offline)
/// rather than looked up.
pub fn trace_view(
    compiler: &Compiler,
    topology: &Topology,
    src: &Endpoint,
    dst: &Endpoint,
    l4: L4,
    traced: &Traced,
    assumed: bool,
) -> TraceView {
    let k = &traced.key;
    let ports = match l4 {
        L4::Icmp => (None, None),
        _ => (Some(k.tp_src), Some(k.tp_dst)),
    };
    let name_of =
        |ip: std::net::IpAddr| compiler.cluster().pod_by_ip(ip).map(|p| p.key.to_string());
    let mut ct = traced.trace.ct_lookups.iter();
    let steps = traced
        .trace
        .steps
        .iter()
        .map(|s| {
            let flow = s.flow.as_ref().map(|(_, f)| f);
            let recirc = flow.is_some_and(|f| {
                f.actions
                    .iter()
                    .any(|a| matches!(a, Action::Ct { table: Some(_), .. }))
            });
            StepView {
                table: s.table.0,
                depth: s.depth,
                priority: flow.map(|f| f.priority),
                flow: flow.map(|f| f.to_string()),
                rule: flow.map(|f| describe(compiler, f.cookie)),
                conjunction: s.conjunction.as_ref().map(|c| ConjunctionView {
                    id: c.id,
                    clauses: c
                        .members
                        .iter()
                        .map(|(_, m)| ClauseView {
                            flow: m.to_string(),
                            rule: describe(compiler, m.cookie),
                        })
                        .collect(),
                }),
                conntrack: if recirc {
                    ct.next().map(|(zone, state)| CtLookupView {
                        zone: *zone,
                        state: ct_state_text(*state),
                        assumed,
                    })
                } else {
                    None
                },
            }
        })
        .collect();
    let output = match &traced.trace.outcome {
        Outcome::Output(ports) => ports
            .iter()
            .map(|p| OutputView {
                port: p.0,
                pod: topology
                    .pods
                    .iter()
                    .find(|x| x.port == *p)
                    .map(|x| x.pod.to_string()),
            })
            .collect(),
        _ => vec![],
    };
    TraceView {
        translations: translation_views(compiler, &traced.trace),
        packet: PacketView {
            protocol: l4.protocol_name().to_string(),
            src: src.to_string(),
            dst: dst.to_string(),
            src_ip: wide_to_ip(k.nw_src).to_string(),
            dst_ip: wide_to_ip(k.nw_dst).to_string(),
            src_pod: name_of(wide_to_ip(k.nw_src)),
            dst_pod: name_of(wide_to_ip(k.nw_dst)),
            tp_src: ports.0,
            tp_dst: ports.1,
            in_port: k.in_port.0,
        },
        connection: traced
            .trace
            .ct_lookups
            .first()
            .map(|(_, state)| connection_kind(*state).to_string()),
        conntrack_assumed: assumed,
        verdict: if traced.verdict.allowed {
            "allow"
        } else {
            "deny"
        }
        .to_string(),
        rule: traced.verdict.rule.clone(),
        rules: traced.verdict.rules.clone(),
        output,
        steps,
        staged: traced
            .staged
            .as_ref()
            .and_then(|s| StagedView::of(&traced.verdict, s)),
    }
}
