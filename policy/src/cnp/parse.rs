//! The API's shape of a ClusterNetworkPolicy and its validation, rule by
//! rule, peer by peer, with the field path of whatever is wrong.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ClusterPolicy, DomainName, MAX_ITEMS, RuleAction, Subject, Tier, TierPeer, TierRule};
use crate::error::FieldError;
use crate::model::{Direction, PortRef, PortSpec, Protocol, parse_cidr};
use crate::selector::Selector;

pub(super) const UNKNOWN: &str =
    "unknown field (is it misspelled?): the object is rejected rather than read without it";

// ---- the API's shape (strict: unknown fields are found by round trip) ---------------

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ApiObject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    pub(super) metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub(super) spec: ApiSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Value>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ApiSpec {
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

pub(super) fn parse_spec(
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
        staged: false,
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
    if let Some(p) = crate::strict::unknown_field(v, &known, path.to_string()) {
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
