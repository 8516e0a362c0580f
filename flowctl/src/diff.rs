//! `flowctl --manifests OLD diff NEW`: the reachability changes between two
//! manifest sets, for review before a policy change lands.
//!
//! Owns choosing what to probe (every pod present in both sets, to every
//! other, on every port a policy of either set names, resolved on the
//! destination pod for named ports, plus tcp/80) and listing each probe whose
//! verdict differs, with the rule that decides it on each side.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use policy::model::{PortRef, Protocol};
use policy::offline::Offline;
use policy::probe::{Endpoint, L4};
use serde::Serialize;

use crate::render::{BOLD, paint};

/// One probe whose verdict changes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Changed {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: Option<u16>,
    pub before: String,
    pub before_rule: String,
    pub after: String,
    pub after_rule: String,
}

/// The ports both sets' policies name (numeric ends of ranges and named ports
/// resolved on every pod), plus tcp/80; or just `only` when given.
fn probes(sets: [&Offline; 2], only: Option<L4>) -> Vec<L4> {
    if let Some(l4) = only {
        return vec![l4];
    }
    let mut out: BTreeSet<(u8, u16)> = BTreeSet::from([(6, 80)]);
    let mut add = |protocol: Protocol, port: &PortRef, set: &Offline| match port {
        PortRef::Range { start, end } => {
            out.insert((protocol.ip_proto(), *start));
            out.insert((protocol.ip_proto(), *end));
        }
        PortRef::Named(name) => {
            for pod in set.compiler.cluster().pods() {
                if let Some(p) = pod.resolve(name, protocol) {
                    out.insert((protocol.ip_proto(), p));
                }
            }
        }
        PortRef::Any => {
            out.insert((protocol.ip_proto(), 80));
        }
    };
    for set in sets {
        let cluster = set.compiler.cluster();
        for p in cluster.policies() {
            for dir in [policy::Direction::Ingress, policy::Direction::Egress] {
                for r in p.rules(dir).unwrap_or_default() {
                    for spec in r.ports.iter().flatten() {
                        add(spec.protocol, &spec.port, set);
                    }
                }
            }
        }
        for p in cluster.cluster_policies() {
            for r in p.ingress.iter().chain(&p.egress) {
                for spec in r.ports.iter().flatten() {
                    add(spec.protocol, &spec.port, set);
                }
            }
        }
    }
    out.into_iter()
        .map(|(proto, port)| match proto {
            17 => L4::Udp(port),
            132 => L4::Sctp(port),
            _ => L4::Tcp(port),
        })
        .collect()
}

/// Every probe whose verdict differs between `old` and `new`.
pub fn changes(old: &Offline, new: &Offline, only: Option<L4>) -> Vec<Changed> {
    let pods_of = |o: &Offline| -> BTreeSet<policy::ObjectKey> {
        o.topology.pods.iter().map(|p| p.pod.clone()).collect()
    };
    let pods: Vec<policy::ObjectKey> = pods_of(old).intersection(&pods_of(new)).cloned().collect();
    let mut out = Vec::new();
    for l4 in probes([old, new], only) {
        for from in &pods {
            for to in &pods {
                if from == to {
                    continue;
                }
                let (src, dst) = (Endpoint::Pod(from.clone()), Endpoint::Pod(to.clone()));
                let (Ok(a), Ok(b)) = (old.trace(&src, &dst, l4), new.trace(&src, &dst, l4)) else {
                    continue;
                };
                if a.verdict.allowed == b.verdict.allowed {
                    continue;
                }
                let word = |allowed: bool| if allowed { "allow" } else { "deny" }.to_string();
                out.push(Changed {
                    from: from.to_string(),
                    to: to.to_string(),
                    protocol: l4.protocol_name().into(),
                    port: l4.port(),
                    before: word(a.verdict.allowed),
                    before_rule: a.verdict.rule,
                    after: word(b.verdict.allowed),
                    after_rule: b.verdict.rule,
                });
            }
        }
    }
    out
}

/// The changes as text: one line each, grouped by the rule deciding after.
pub fn text(changes: &[Changed], color: bool) -> String {
    if changes.is_empty() {
        return "no reachability changes\n".into();
    }
    let mut rules: Vec<&str> = changes.iter().map(|c| c.after_rule.as_str()).collect();
    rules.sort();
    rules.dedup();
    let mut out = String::new();
    for rule in rules {
        let _ = writeln!(
            out,
            "{}",
            paint(color, BOLD, &format!("now decided by {rule}:"))
        );
        for c in changes.iter().filter(|c| c.after_rule == rule) {
            let port = c.port.map_or(String::new(), |p| format!("/{p}"));
            let _ = writeln!(
                out,
                "  {} -> {} {}{port}: {} -> {} (was: {})",
                c.from, c.to, c.protocol, c.before, c.after, c.before_rule
            );
        }
    }
    let opened = changes.iter().filter(|c| c.after == "allow").count();
    let _ = writeln!(
        out,
        "{} changes: {opened} opened, {} closed",
        changes.len(),
        changes.len() - opened
    );
    out
}
