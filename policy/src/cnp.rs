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
//! No I/O, no flows.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, FieldError};
use crate::model::{Direction, PortRef, PortSpec, Protocol, parse_cidr};
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
        let api: ApiObject = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
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
        if let Some(path) = crate::manifest::unknown_field(
            v,
            &serde_json::to_value(&api).unwrap_or(Value::Null),
            String::new(),
        ) {
            return Err(invalid(FieldError::new(path, UNKNOWN)));
        }
        if let Some(l) = &api.metadata.labels {
            validate_labels(l, "metadata.labels").map_err(invalid)?;
        }
        let mut warnings = Vec::new();
        parse_spec(name, &api.spec, &mut warnings).map_err(invalid)
    }
}

const UNKNOWN: &str =
    "unknown field (is it misspelled?): the object is rejected rather than read without it";

// ---- the API's shape (strict: unknown fields are found by round trip) ---------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiObject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: ApiSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Value>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiSpec {
    tier: String,
    priority: i64,
    subject: ApiSubject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ingress: Option<Vec<ApiRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    egress: Option<Vec<ApiRule>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pods: Option<ApiNamespacedPod>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiNamespacedPod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<LabelSelector>,
    pod_selector: LabelSelector,
}

/// An ingress or egress rule; peers and protocols stay raw so that one this
/// switch does not understand fails closed instead of rejecting the object.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<Vec<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<Vec<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocols: Option<Vec<Map<String, Value>>>,
}

// ---- validation ----------------------------------------------------------------------

fn parse_spec(
    name: String,
    spec: &ApiSpec,
    warnings: &mut Vec<String>,
) -> Result<ClusterPolicy, FieldError> {
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => {
            return Err(FieldError::new(
                "spec.tier",
                format!("unsupported value {other:?}: Admin or Baseline"),
            ));
        }
    };
    if !(0..=1000).contains(&spec.priority) {
        return Err(FieldError::new(
            "spec.priority",
            format!("{} must be between 0 and 1000", spec.priority),
        ));
    }
    let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
        (Some(ns), None) => Subject {
            namespaces: Selector::from_api(ns, "spec.subject.namespaces")?,
            pods: Selector::everything(),
        },
        (None, Some(p)) => Subject {
            namespaces: selector_or_all(
                p.namespace_selector.as_ref(),
                "spec.subject.pods.namespaceSelector",
            )?,
            pods: Selector::from_api(&p.pod_selector, "spec.subject.pods.podSelector")?,
        },
        _ => {
            return Err(FieldError::new(
                "spec.subject",
                "exactly one of `namespaces` or `pods` must be set",
            ));
        }
    };
    let mut rules = BTreeMap::new();
    for (dir, list) in [
        (Direction::Ingress, &spec.ingress),
        (Direction::Egress, &spec.egress),
    ] {
        let field = match dir {
            Direction::Ingress => "spec.ingress",
            Direction::Egress => "spec.egress",
        };
        let list = list.as_deref().unwrap_or_default();
        if list.len() > MAX_ITEMS {
            return Err(FieldError::new(
                field,
                format!("{} rules: at most {MAX_ITEMS} are allowed", list.len()),
            ));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, r) in list.iter().enumerate() {
            out.push(parse_rule(dir, r, &format!("{field}[{i}]"), warnings)?);
        }
        rules.insert(dir, out);
    }
    Ok(ClusterPolicy {
        name,
        tier,
        priority: spec.priority as u16,
        subject,
        ingress: rules.remove(&Direction::Ingress).unwrap_or_default(),
        egress: rules.remove(&Direction::Egress).unwrap_or_default(),
        warnings: std::mem::take(warnings),
    })
}

fn selector_or_all(s: Option<&LabelSelector>, path: &str) -> Result<Selector, FieldError> {
    match s {
        Some(s) => Selector::from_api(s, path),
        None => Ok(Selector::everything()),
    }
}

/// Reads a label selector from raw JSON, strictly.
fn raw_selector(v: &Value, path: &str) -> Result<Selector, FieldError> {
    let sel: LabelSelector = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        FieldError::new(
            format!("{path}{}", dotted(&e.path().to_string())),
            e.inner().to_string(),
        )
    })?;
    let known = serde_json::to_value(&sel).unwrap_or(Value::Null);
    if let Some(p) = crate::manifest::unknown_field(v, &known, path.to_string()) {
        return Err(FieldError::new(p, UNKNOWN));
    }
    Selector::from_api(&sel, path)
}

fn dotted(p: &str) -> String {
    if p == "." || p.is_empty() {
        String::new()
    } else if p.starts_with('[') {
        p.to_string()
    } else {
        format!(".{p}")
    }
}

fn count(path: &str, n: usize, what: &str) -> Result<(), FieldError> {
    if n == 0 {
        return Err(FieldError::new(
            path,
            format!("must have at least one {what}"),
        ));
    }
    if n > MAX_ITEMS {
        return Err(FieldError::new(
            path,
            format!("{n} {what}s: at most {MAX_ITEMS} are allowed"),
        ));
    }
    Ok(())
}

fn parse_rule(
    dir: Direction,
    r: &ApiRule,
    path: &str,
    warnings: &mut Vec<String>,
) -> Result<TierRule, FieldError> {
    if let Some(n) = &r.name
        && n.chars().count() > 100
    {
        return Err(FieldError::new(
            format!("{path}.name"),
            "may be at most 100 characters",
        ));
    }
    let action = match r.action.as_str() {
        "Accept" => RuleAction::Accept,
        "Deny" => RuleAction::Deny,
        "Pass" => RuleAction::Pass,
        other => {
            return Err(FieldError::new(
                format!("{path}.action"),
                format!("unsupported value {other:?}: Accept, Deny or Pass"),
            ));
        }
    };
    let (peers_field, wrong_field, peers) = match dir {
        Direction::Ingress => ("from", "to", &r.from),
        Direction::Egress => ("to", "from", &r.to),
    };
    let wrong = match dir {
        Direction::Ingress => &r.to,
        Direction::Egress => &r.from,
    };
    if wrong.is_some() {
        return Err(FieldError::new(
            format!("{path}.{wrong_field}"),
            format!("{dir} rules have `{peers_field}`, not `{wrong_field}`"),
        ));
    }
    let ppath = format!("{path}.{peers_field}");
    let raw_peers = peers.as_deref().unwrap_or_default();
    count(&ppath, raw_peers.len(), "peer")?;
    let mut fail_closed = None;
    let mut out = Vec::new();
    for (i, p) in raw_peers.iter().enumerate() {
        let at = format!("{ppath}[{i}]");
        match parse_peer(dir, p, &at)? {
            Some(peer) => out.push(peer),
            None => {
                let fields: Vec<&str> = p.keys().map(String::as_str).collect();
                let why = if fields.is_empty() {
                    format!("{at}: a peer with no field set")
                } else {
                    format!(
                        "{at}: a peer this switch does not understand ({})",
                        fields.join(", ")
                    )
                };
                fail_closed.get_or_insert(why);
            }
        }
    }
    let mut ports = None;
    if let Some(protocols) = &r.protocols {
        let qpath = format!("{path}.protocols");
        count(&qpath, protocols.len(), "protocol")?;
        let mut list = Vec::new();
        for (i, p) in protocols.iter().enumerate() {
            let at = format!("{qpath}[{i}]");
            match parse_protocol(p, &at)? {
                Some(specs) => list.extend(specs),
                None => {
                    let fields: Vec<&str> = p.keys().map(String::as_str).collect();
                    fail_closed.get_or_insert(format!(
                        "{at}: a protocol this switch does not understand ({})",
                        fields.join(", ")
                    ));
                }
            }
        }
        list.sort();
        list.dedup();
        ports = Some(list);
    }
    let named = ports
        .iter()
        .flatten()
        .any(|p| matches!(p.port, PortRef::Named(_)));
    let non_pod = out.iter().any(|p| !matches!(p, TierPeer::Pods { .. }));
    if named && non_pod {
        return Err(FieldError::new(
            format!("{path}.protocols"),
            "destinationNamedPort cannot be used with networks, nodes or domainNames peers (they have no named ports)",
        ));
    }
    if action != RuleAction::Accept && out.iter().any(|p| matches!(p, TierPeer::Domains(_))) {
        return Err(FieldError::new(
            format!("{path}.action"),
            format!("{action}: domainNames peers are only allowed in Accept rules"),
        ));
    }
    if let Some(why) = &fail_closed {
        let effect = if action == RuleAction::Accept {
            "matches no traffic"
        } else {
            "denies all traffic of the subject"
        };
        warnings.push(format!("{why}: the rule fails closed ({action} {effect})"));
    }
    Ok(TierRule {
        name: r.name.clone().filter(|n| !n.is_empty()),
        action,
        peers: out,
        ports,
        fail_closed,
    })
}

/// `None`: no field of the peer is one this switch knows (fails closed).
fn parse_peer(
    dir: Direction,
    p: &Map<String, Value>,
    at: &str,
) -> Result<Option<TierPeer>, FieldError> {
    const INGRESS: [&str; 2] = ["namespaces", "pods"];
    const EGRESS: [&str; 5] = ["namespaces", "pods", "nodes", "networks", "domainNames"];
    let allowed: &[&str] = match dir {
        Direction::Ingress => &INGRESS,
        Direction::Egress => &EGRESS,
    };
    let set: Vec<(&String, &Value)> = p.iter().filter(|(_, v)| !v.is_null()).collect();
    let known: Vec<&(&String, &Value)> = set
        .iter()
        .filter(|(k, _)| allowed.contains(&k.as_str()))
        .collect();
    if let Some((k, _)) = set
        .iter()
        .find(|(k, _)| !allowed.contains(&k.as_str()) && EGRESS.contains(&k.as_str()))
    {
        return Err(FieldError::new(
            format!("{at}.{k}"),
            "only egress peers may be nodes, networks or domainNames",
        ));
    }
    match known.len() {
        0 => return Ok(None),
        1 if set.len() == 1 => {}
        1 => {
            let (k, _) = set
                .iter()
                .find(|(k, _)| !allowed.contains(&k.as_str()))
                .expect("an unknown field");
            return Err(FieldError::new(format!("{at}.{k}"), UNKNOWN));
        }
        _ => {
            return Err(FieldError::new(
                at,
                "exactly one of namespaces, pods, nodes, networks or domainNames may be set",
            ));
        }
    }
    let (key, v) = *known[0];
    let here = format!("{at}.{key}");
    let peer = match key.as_str() {
        "namespaces" => TierPeer::Pods {
            namespaces: raw_selector(v, &here)?,
            pods: Selector::everything(),
        },
        "pods" => {
            let obj = v
                .as_object()
                .ok_or_else(|| FieldError::new(&here, "must be an object"))?;
            for k in obj.keys() {
                if k != "namespaceSelector" && k != "podSelector" {
                    return Err(FieldError::new(format!("{here}.{k}"), UNKNOWN));
                }
            }
            let pods = obj
                .get("podSelector")
                .filter(|v| !v.is_null())
                .ok_or_else(|| FieldError::new(format!("{here}.podSelector"), "is required"))?;
            TierPeer::Pods {
                namespaces: match obj.get("namespaceSelector").filter(|v| !v.is_null()) {
                    Some(ns) => raw_selector(ns, &format!("{here}.namespaceSelector"))?,
                    None => Selector::everything(),
                },
                pods: raw_selector(pods, &format!("{here}.podSelector"))?,
            }
        }
        "nodes" => TierPeer::Nodes(raw_selector(v, &here)?),
        "networks" => {
            let list = strings(v, &here)?;
            count(&here, list.len(), "CIDR")?;
            let mut nets = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                let p = format!("{here}[{i}]");
                if !s.contains('/') || s.len() > 43 {
                    return Err(FieldError::new(
                        p,
                        format!("{s:?}: Invalid CIDR format provided"),
                    ));
                }
                nets.push(parse_cidr(s, &p)?);
            }
            nets.sort();
            nets.dedup();
            TierPeer::Networks(nets)
        }
        "domainNames" => {
            let list = strings(v, &here)?;
            count(&here, list.len(), "domain name")?;
            let mut names = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                names.push(DomainName::parse(s).ok_or_else(|| {
                    FieldError::new(
                        format!("{here}[{i}]"),
                        format!("{s:?} is not a domain name (`example.com` or `*.example.com`)"),
                    )
                })?);
            }
            names.sort();
            names.dedup();
            TierPeer::Domains(names)
        }
        _ => unreachable!("only known fields reach here"),
    };
    Ok(Some(peer))
}

fn strings(v: &Value, at: &str) -> Result<Vec<String>, FieldError> {
    let arr = v
        .as_array()
        .ok_or_else(|| FieldError::new(at, "must be a list"))?;
    arr.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| FieldError::new(format!("{at}[{i}]"), "must be a string"))
        })
        .collect()
}

/// `None`: no field this switch knows (fails closed).
fn parse_protocol(p: &Map<String, Value>, at: &str) -> Result<Option<Vec<PortSpec>>, FieldError> {
    const KNOWN: [&str; 4] = ["tcp", "udp", "sctp", "destinationNamedPort"];
    let set: Vec<(&String, &Value)> = p.iter().filter(|(_, v)| !v.is_null()).collect();
    let known = set
        .iter()
        .filter(|(k, _)| KNOWN.contains(&k.as_str()))
        .count();
    if known == 0 {
        return Ok(None);
    }
    if let Some((k, _)) = set.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
        return Err(FieldError::new(format!("{at}.{k}"), UNKNOWN));
    }
    if known > 1 {
        return Err(FieldError::new(
            at,
            "exactly one of tcp, udp, sctp or destinationNamedPort may be set",
        ));
    }
    let (key, v) = set[0];
    let here = format!("{at}.{key}");
    if key == "destinationNamedPort" {
        let name = v
            .as_str()
            .ok_or_else(|| FieldError::new(&here, "must be a string"))?;
        if !crate::model::is_port_name(name) {
            return Err(FieldError::new(
                here,
                format!("{name:?} is not a valid port name"),
            ));
        }
        // A container port's name is unique in its pod, whatever its
        // protocol: resolved per destination pod, for the protocol it has.
        return Ok(Some(
            [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .into_iter()
                .map(|protocol| PortSpec {
                    protocol,
                    port: PortRef::Named(name.to_string()),
                })
                .collect(),
        ));
    }
    let protocol = match key.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => Protocol::Sctp,
    };
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new(&here, "must be an object"))?;
    if let Some(k) = obj.keys().find(|k| *k != "destinationPort") {
        return Err(FieldError::new(format!("{here}.{k}"), UNKNOWN));
    }
    let Some(port) = obj.get("destinationPort").filter(|v| !v.is_null()) else {
        return Err(FieldError::new(
            here,
            "must set destinationPort (a protocol match without one would be written as no protocols)",
        ));
    };
    let here = format!("{here}.destinationPort");
    let port = port
        .as_object()
        .ok_or_else(|| FieldError::new(&here, "must be an object"))?;
    let num = |v: &Value, p: &str| -> Result<u16, FieldError> {
        v.as_i64()
            .filter(|n| (1..=65535).contains(n))
            .map(|n| n as u16)
            .ok_or_else(|| FieldError::new(p, format!("{v} must be a port between 1 and 65535")))
    };
    let range = match (port.get("number"), port.get("range")) {
        (Some(n), None) => {
            let n = num(n, &format!("{here}.number"))?;
            (n, n)
        }
        (None, Some(r)) => {
            let rp = format!("{here}.range");
            let r = r
                .as_object()
                .ok_or_else(|| FieldError::new(&rp, "must be an object"))?;
            if let Some(k) = r.keys().find(|k| *k != "start" && *k != "end") {
                return Err(FieldError::new(format!("{rp}.{k}"), UNKNOWN));
            }
            let get = |k: &str| {
                r.get(k)
                    .ok_or_else(|| FieldError::new(format!("{rp}.{k}"), "is required"))
            };
            let start = num(get("start")?, &format!("{rp}.start"))?;
            let end = num(get("end")?, &format!("{rp}.end"))?;
            if start >= end {
                return Err(FieldError::new(
                    rp,
                    format!("Start port must be less than End port ({start} >= {end})"),
                ));
            }
            (start, end)
        }
        _ => {
            if let Some(k) = port.keys().find(|k| *k != "number" && *k != "range") {
                return Err(FieldError::new(format!("{here}.{k}"), UNKNOWN));
            }
            return Err(FieldError::new(
                here,
                "exactly one of number or range must be set",
            ));
        }
    };
    Ok(Some(vec![PortSpec {
        protocol,
        port: PortRef::Range {
            start: range.0,
            end: range.1,
        },
    }]))
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
