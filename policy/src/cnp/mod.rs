//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the Admin and
//! Baseline tiers.
//!
//! Owns the model of a cluster-scoped policy and its validation, as the CRD's
//! OpenAPI schema and CEL rules make the API server do it, with errors that
//! name the field. A peer or protocol this switch does not understand (one an
//! API server with a newer CRD would accept, e.g. a peer whose only field is
//! unknown) does not reject the object: the rule *fails closed* as the API
//! documents it (an Accept rule matches nothing; a Deny or Pass rule denies
//! everything of its subject) and the policy carries a warning saying so.
//! No I/O, no flows. The API's shape and its validation are in `parse`.

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, FieldError};

mod parse;
use crate::model::{Direction, PortRef, PortSpec};
use crate::selector::{Labels, Selector, validate_labels};

/// The API group and version this module reads.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// The kind.
pub const KIND: &str = "ClusterNetworkPolicy";

/// Most rules a policy may have per direction, peers per rule, protocols
/// per rule, CIDRs or domain names per peer (the CRD's limits).
pub const MAX_ITEMS: usize = 25;

/// Where a ClusterNetworkPolicy sits: before NetworkPolicy or after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// What a rule does with the traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleAction {
    /// Allowed; no later rule of this direction is consulted.
    Accept,
    /// Dropped; no later rule is consulted.
    Deny,
    /// The rest of this tier is skipped: on to the next tier.
    Pass,
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleAction::Accept => "Accept",
            RuleAction::Deny => "Deny",
            RuleAction::Pass => "Pass",
        })
    }
}

/// The pods a policy applies to (never host-network pods: they have no pod
/// address in the model).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject {
    pub namespaces: Selector,
    pub pods: Selector,
}

impl Subject {
    pub fn matches(&self, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
        self.namespaces.matches(namespace_labels) && self.pods.matches(pod_labels)
    }
}

/// A domain name peer: exact (`kubernetes.io`) or a wildcard over one or more
/// leading labels (`*.kubernetes.io`). Lower case, without the trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName {
    /// The name, or the suffix after `*.`.
    pub name: String,
    pub wildcard: bool,
}

impl DomainName {
    /// Parses and validates a `domainNames` entry.
    pub fn parse(s: &str) -> Option<DomainName> {
        let lower = s.to_ascii_lowercase();
        let (wildcard, rest) = match lower.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, lower.as_str()),
        };
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        let labels: Vec<&str> = rest.split('.').collect();
        let label_ok = |l: &&str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && l.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && l.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
        };
        (labels.len() >= 2 && labels.iter().all(label_ok) && rest.len() <= 253).then(|| {
            DomainName {
                name: rest.to_string(),
                wildcard,
            }
        })
    }

    /// Whether a name from a DNS answer (any case, trailing dot or not) is one
    /// this entry stands for.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if self.wildcard {
            name.len() > self.name.len() + 1
                && name.ends_with(&self.name)
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
        } else {
            name == self.name
        }
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// One entry of a rule's `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TierPeer {
    /// Pods of the matching namespaces (`namespaces`: every pod).
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// The addresses of the matching nodes (host-network pods are their node).
    Nodes(Selector),
    /// CIDRs, host bits masked.
    Networks(Vec<IpNet>),
    /// The addresses these names resolved to in the pods' DNS answers.
    Domains(Vec<DomainName>),
}

/// One rule of a ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TierRule {
    pub name: Option<String>,
    pub action: RuleAction,
    pub peers: Vec<TierPeer>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<PortSpec>>,
    /// Why the rule fails closed: a peer or protocol this switch does not
    /// understand. Such an Accept rule matches nothing; a Deny or Pass rule
    /// denies everything of the subject in its direction.
    pub fail_closed: Option<String>,
}

impl TierRule {
    /// What the rule does in the datapath once fail-closed is applied: `None`
    /// when it matches nothing.
    pub fn effective_action(&self) -> Option<RuleAction> {
        match (&self.fail_closed, self.action) {
            (None, a) => Some(a),
            (Some(_), RuleAction::Accept) => None,
            (Some(_), _) => Some(RuleAction::Deny),
        }
    }

    pub fn has_named_ports(&self) -> bool {
        self.ports
            .iter()
            .flatten()
            .any(|p| matches!(p.port, PortRef::Named(_)))
    }
}

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0-1000; lower first.
    pub priority: u16,
    pub subject: Subject,
    pub ingress: Vec<TierRule>,
    pub egress: Vec<TierRule>,
    /// What the switch does not understand and fails closed on, by field path.
    pub warnings: Vec<String>,
    /// `vswitch.io/mode: audit`: evaluated on traffic, not enforced
    /// ([`crate::staging`]).
    pub staged: bool,
}

impl ClusterPolicy {
    /// Whether a rule has `domainNames` peers (the switch then learns from
    /// DNS answers).
    pub fn has_domain_peers(&self) -> bool {
        self.egress
            .iter()
            .any(|r| r.peers.iter().any(|p| matches!(p, TierPeer::Domains(_))))
    }

    pub fn rules(&self, dir: Direction) -> &[TierRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Validates a ClusterNetworkPolicy (the whole object as JSON) the way the
    /// API server does with the upstream CRD.
    ///
    /// Fails, naming the field, on: a missing name; a tier other than Admin or
    /// Baseline; a priority outside 0-1000; a subject without exactly one of
    /// `namespaces` / `pods`; more than 25 rules, peers, protocols, CIDRs or
    /// domain names, or none where one is required; a rule name over 100
    /// characters; an unknown action; a peer with two kinds in it; an invalid
    /// CIDR, domain name, selector, port or range; `domainNames` in a rule
    /// whose action is not Accept; `destinationNamedPort` in a rule with
    /// `networks`, `nodes` or `domainNames` peers; any other field the API
    /// does not have.
    pub fn from_value(v: &Value) -> Result<ClusterPolicy, Error> {
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let object = name.clone().unwrap_or_else(|| "(unnamed)".into());
        let invalid = |source: FieldError| Error::Invalid {
            kind: KIND,
            object: object.clone(),
            source,
        };
        let Some(name) = name else {
            return Err(invalid(FieldError::new("metadata.name", "is required")));
        };
        let api: parse::ApiObject = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let path = e.path().to_string();
            invalid(FieldError::new(
                if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                e.inner().to_string(),
            ))
        })?;
        if let Some(path) = crate::strict::unknown_field(
            v,
            &serde_json::to_value(&api).unwrap_or(Value::Null),
            String::new(),
        ) {
            return Err(invalid(FieldError::new(path, parse::UNKNOWN)));
        }
        if let Some(l) = &api.metadata.labels {
            validate_labels(l, "metadata.labels").map_err(invalid)?;
        }
        let staged = crate::mode::staged(api.metadata.annotations.as_ref()).map_err(invalid)?;
        let mut warnings = Vec::new();
        let mut policy = parse::parse_spec(name, &api.spec, &mut warnings).map_err(invalid)?;
        policy.staged = staged;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ClusterPolicy, String> {
        let v: Value = serde_saphyr::from_str(yaml).unwrap();
        ClusterPolicy::from_value(&v).map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s.push_str(": ");
                s.push_str(&x.to_string());
                src = x.source();
            }
            s
        })
    }

    const HEAD: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: p}\n";

    #[test]
    fn a_full_policy_reads() {
        let p = parse(&format!(
            "{HEAD}spec:\n  tier: Admin\n  priority: 10\n  subject: {{pods: {{namespaceSelector: {{matchLabels: {{t: a}}}}, podSelector: {{}}}}}}\n  egress:\n  - {{name: dns, action: Accept, to: [{{namespaces: {{}}}}], protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}, {{tcp: {{destinationPort: {{range: {{start: 1000, end: 2000}}}}}}}}]}}\n  - {{action: Accept, to: [{{domainNames: ['*.example.com', Kubernetes.IO.]}}]}}\n  - {{action: Deny, to: [{{networks: [10.0.0.1/8, 'fd00::/8']}}, {{nodes: {{matchExpressions: [{{key: role, operator: Exists}}]}}}}]}}\n  ingress:\n  - {{action: Pass, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{a: b}}}}}}}}], protocols: [{{destinationNamedPort: web}}]}}\n"
        ))
        .unwrap();
        assert_eq!(p.tier, Tier::Admin);
        assert_eq!(p.priority, 10);
        assert_eq!(p.egress.len(), 3);
        assert_eq!(p.egress[0].name.as_deref(), Some("dns"));
        assert_eq!(p.egress[0].ports.as_ref().unwrap().len(), 2);
        match &p.egress[1].peers[0] {
            TierPeer::Domains(d) => {
                assert!(d.iter().any(|d| d.wildcard && d.matches("www.example.com")));
                assert!(!d.iter().any(|d| d.matches("example.com.au")));
                assert!(d.iter().any(|d| d.matches("kubernetes.io.")));
            }
            other => panic!("{other:?}"),
        }
        match &p.egress[2].peers[0] {
            TierPeer::Networks(n) => assert_eq!(n[0].to_string(), "10.0.0.0/8"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.ingress[0].ports.as_ref().unwrap().len(), 3);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn the_api_servers_rules_are_enforced_with_the_field_named() {
        let spec = |body: &str| format!("{HEAD}spec:\n{body}");
        for (body, field) in [
            (
                "  tier: Middle\n  priority: 1\n  subject: {namespaces: {}}\n",
                "spec.tier",
            ),
            (
                "  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}\n",
                "spec.priority",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {}\n",
                "spec.subject",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}, pods: {podSelector: {}}}\n",
                "spec.subject",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subjet: {namespaces: {}}\n",
                "subject",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabel: {a: b}}}\n",
                "spec.subject.namespaces.matchLabel",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Allow, to: [{namespaces: {}}]}]\n",
                "spec.egress[0].action",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, to: []}]\n",
                "spec.egress[0].to",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, from: [{namespaces: {}}]}]\n",
                "spec.egress[0].from",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, to: [{domainNames: [a.com]}]}]\n",
                "spec.egress[0].action",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Accept, to: [{domainNames: ['a*.com']}]}]\n",
                "spec.egress[0].to[0].domainNames[0]",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Accept, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: web}]}]\n",
                "spec.egress[0].protocols",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Accept, to: [{networks: [10.0.0.0]}]}]\n",
                "spec.egress[0].to[0].networks[0]",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Accept, to: [{namespaces: {}, networks: [10.0.0.0/8]}]}]\n",
                "spec.egress[0].to[0]",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{networks: [10.0.0.0/8]}]}]\n",
                "spec.ingress[0].from[0].networks",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 90, end: 80}}}}]}]\n",
                "spec.ingress[0].protocols[0].tcp.destinationPort.range",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {}}]}]\n",
                "spec.ingress[0].protocols[0].tcp",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 0}}}]}]\n",
                "spec.ingress[0].protocols[0].tcp.destinationPort.number",
            ),
            (
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{pods: {podSelectr: {}}}]}]\n",
                "spec.ingress[0].from[0].pods.podSelectr",
            ),
        ] {
            let e = parse(&spec(body)).expect_err(field);
            assert!(e.contains(field), "{field}: {e}");
            assert!(e.contains("ClusterNetworkPolicy p"), "{e}");
        }
        let many: String = (0..26)
            .map(|_| "  - {action: Deny, to: [{namespaces: {}}]}\n")
            .collect();
        let e = parse(&spec(&format!(
            "  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n{many}"
        )))
        .unwrap_err();
        assert!(e.contains("at most 25"), "{e}");
    }

    #[test]
    fn a_peer_nobody_understands_fails_closed_as_documented() {
        let p = parse(&format!(
            "{HEAD}spec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - {{action: Accept, to: [{{services: {{name: x}}}}]}}\n  - {{action: Pass, to: [{{}}]}}\n  - {{action: Deny, to: [{{namespaces: {{}}}}], protocols: [{{quic: {{}}}}]}}\n"
        ))
        .unwrap();
        assert_eq!(
            p.egress[0].effective_action(),
            None,
            "Accept matches nothing"
        );
        assert_eq!(
            p.egress[1].effective_action(),
            Some(RuleAction::Deny),
            "Pass denies all"
        );
        assert_eq!(p.egress[2].effective_action(), Some(RuleAction::Deny));
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("spec.egress[0].to[0]") && p.warnings[0].contains("services")
        );
    }
}
