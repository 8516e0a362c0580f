//! Realisation status of every policy: in force (with its rules and flows) or
//! rejected (with the reason).
//!
//! Owns the one view `flowctl dump-policies` prints, offline and live, and the
//! record of rejected objects the sources (manifest directory, Kubernetes
//! watcher) keep. No I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::compile::{Compiler, Provenance};
use crate::model::Direction;

/// NetworkPolicy's kind, as views name it.
pub const NETWORK_POLICY: &str = "NetworkPolicy";

/// One policy as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    pub kind: String,
    /// `namespace/name` for a NetworkPolicy, `name` for a ClusterNetworkPolicy.
    pub name: String,
    /// `Admin`, `NetworkPolicy` or `Baseline`: where it is evaluated.
    pub tier: String,
    pub priority: Option<u16>,
    /// `accepted` (in force) or `rejected`.
    pub status: String,
    /// Why it was rejected; with a version in force, that version stays.
    pub message: Option<String>,
    /// What it has that this switch fails closed on.
    pub warnings: Vec<String>,
    pub rules: Vec<RuleView>,
    /// Flows compiled for it (a flow shared by equivalent rules counts for each).
    pub flows: usize,
    /// `enforce`, or `audit` for a staged policy (`vswitch.io/mode: audit`):
    /// evaluated on new connections, not enforced; its flows are in the
    /// staged tables only.
    #[serde(default = "enforce")]
    pub mode: String,
}

fn enforce() -> String {
    "enforce".into()
}

impl PolicyView {
    /// Marks a staged policy's view.
    fn staged(mut self, staged: bool) -> PolicyView {
        if staged {
            self.mode = "audit".into();
        }
        self
    }
}

/// One rule of a policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub direction: String,
    pub index: usize,
    pub name: Option<String>,
    /// `Accept`, `Deny`, `Pass`, or `Allow` for a NetworkPolicy rule.
    pub action: String,
    pub flows: usize,
}

impl PolicyView {
    /// A policy with a version in force; `message` says why its latest
    /// version was rejected, when it was.
    fn in_force(
        kind: &str,
        name: String,
        tier: String,
        priority: Option<u16>,
        message: Option<String>,
        warnings: Vec<String>,
        rules: Vec<RuleView>,
    ) -> PolicyView {
        PolicyView {
            kind: kind.into(),
            name,
            tier,
            priority,
            status: if message.is_some() {
                "rejected"
            } else {
                "accepted"
            }
            .into(),
            message,
            warnings,
            flows: rules.iter().map(|r| r.flows).sum(),
            rules,
            mode: enforce(),
        }
    }
}

/// Objects a source rejected: (kind, name) -> reason.
pub type Rejections = BTreeMap<(String, String), String>;

/// The status of every policy in force in `compiler` (staged ones too, when
/// it is the staged compiler) and every rejected one.
pub fn views(compiler: &Compiler, rejected: &Rejections) -> Vec<PolicyView> {
    let per_rule = compiler.flows_per_rule();
    let cluster = compiler.cluster();
    let mut out = Vec::new();
    let message = |kind: &str, name: &str| {
        rejected
            .get(&(kind.to_string(), name.to_string()))
            .map(|r| format!("{r} (the last good version stays in force)"))
    };
    for p in cluster.cluster_policies() {
        let mut rules = Vec::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            for (index, r) in p.rules(dir).iter().enumerate() {
                let prov = Provenance::TierRule {
                    policy: p.name.clone(),
                    tier: p.tier,
                    priority: p.priority,
                    direction: dir,
                    index,
                    name: r.name.clone(),
                    action: r.action,
                    fail_closed: r.fail_closed.is_some(),
                };
                let flows = per_rule.get(&prov).copied().unwrap_or(0);
                rules.push(RuleView {
                    direction: dir.to_string(),
                    index,
                    name: r.name.clone(),
                    action: r.action.to_string(),
                    flows,
                });
            }
        }
        out.push(
            PolicyView::in_force(
                crate::cnp::KIND,
                p.name.clone(),
                p.tier.to_string(),
                Some(p.priority),
                message(crate::cnp::KIND, &p.name),
                p.warnings.clone(),
                rules,
            )
            .staged(p.staged),
        );
    }
    for p in cluster.policies() {
        let mut rules = Vec::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            for index in 0..p.rules(dir).map_or(0, <[_]>::len) {
                let prov = Provenance::Rule {
                    policy: p.key.clone(),
                    direction: dir,
                    index,
                };
                rules.push(RuleView {
                    direction: dir.to_string(),
                    index,
                    name: None,
                    action: "Allow".into(),
                    flows: per_rule.get(&prov).copied().unwrap_or(0),
                });
            }
        }
        let name = p.key.to_string();
        let message = message(NETWORK_POLICY, &name);
        out.push(
            PolicyView::in_force(
                NETWORK_POLICY,
                name,
                NETWORK_POLICY.into(),
                None,
                message,
                vec![],
                rules,
            )
            .staged(p.staged),
        );
    }
    // Rejected, with no version in force.
    for ((kind, name), reason) in rejected {
        let in_force = out.iter().any(|v| &v.kind == kind && &v.name == name);
        if in_force || (kind != NETWORK_POLICY && kind != crate::cnp::KIND) {
            continue;
        }
        out.push(PolicyView {
            kind: kind.clone(),
            name: name.clone(),
            tier: String::new(),
            priority: None,
            status: "rejected".into(),
            message: Some(reason.clone()),
            warnings: vec![],
            rules: vec![],
            flows: 0,
            mode: enforce(),
        });
    }
    let rank = |v: &PolicyView| match v.tier.as_str() {
        "Admin" => 0,
        NETWORK_POLICY => 1,
        "Baseline" => 2,
        _ => 3,
    };
    out.sort_by(|a, b| (rank(a), a.priority, &a.name).cmp(&(rank(b), b.priority, &b.name)));
    out
}
