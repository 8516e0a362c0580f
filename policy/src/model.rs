//! The cluster model: namespaces, pods, nodes and validated NetworkPolicies.
//!
//! Owns the conversion from Kubernetes API objects (k8s-openapi types) into the
//! normalized form the compiler reads, with the API server's validation: an object
//! the API server would reject is refused here with the field that is wrong. It
//! does no I/O and knows nothing of flows.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Node as ApiNode, Pod as ApiPod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use crate::names::ObjectKey;

use crate::error::{Error, FieldError};
use crate::selector::{Labels, Selector, validate_labels};

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Traffic direction relative to the pod a policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Includes `kubernetes.io/metadata.name`.
    pub labels: Labels,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjectKey,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub ports: Vec<NamedPort>,
}

impl Pod {
    /// The port a named port resolves to on this pod, for `protocol`.
    pub fn resolve(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// What ClusterNetworkPolicy `nodes` peers select on.
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

/// Which namespaces a peer's pods come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NsSel {
    /// The policy's own namespace.
    Own,
    Matching(Selector),
}

/// A rule as the API holds it: its peers (`from` or `to`) and ports.
type ApiRule = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

/// One entry of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Pods {
        namespaces: NsSel,
        pods: Selector,
    },
    /// Host bits already masked; `except` strictly inside `cidr`.
    Block {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// A port of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    /// Every port of the protocol.
    Any,
    /// `port` alone (`start == end`) or `port`..=`endPort`.
    Range { start: u16, end: u16 },
    /// Resolved on the destination pod, for the rule's protocol.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortRef,
}

/// One ingress or egress rule. `None` means "all" (the field was absent or empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub key: ObjectKey,
    pub pod_selector: Selector,
    /// `Some` when the policy isolates selected pods for ingress (policyTypes).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// `vswitch.io/mode: audit`: evaluated on traffic, not enforced
    /// ([`crate::staging`]).
    pub staged: bool,
}

impl Policy {
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Validates a NetworkPolicy the way the API server does.
    ///
    /// Fails, naming the field, on: a missing name; unknown policyTypes; a peer
    /// with nothing in it or an ipBlock combined with a selector; a bad CIDR or an
    /// except entry that is not a strict subset of its cidr; an unknown protocol;
    /// a port outside 1-65535 or an invalid port name; endPort with a named or
    /// missing port, or below port; an invalid selector.
    pub fn from_api(np: &NetworkPolicy) -> Result<Policy, Error> {
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = np.metadata.name.clone().unwrap_or_default();
        let object = format!("{namespace}/{name}");
        let invalid = |source: FieldError| Error::Invalid {
            kind: "NetworkPolicy",
            object: object.clone(),
            source,
        };
        if name.is_empty() {
            return Err(invalid(FieldError::new("metadata.name", "is required")));
        }
        let staged = crate::mode::staged(np.metadata.annotations.as_ref()).map_err(invalid)?;
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::from_api(s, "spec.podSelector").map_err(invalid)?,
            None => Selector::everything(),
        };
        let convert = |rules: Vec<ApiRule>,
                       field: &str,
                       peer_field: &str|
         -> Result<Vec<Rule>, FieldError> {
            rules
                .iter()
                .enumerate()
                .map(|(i, (peers, ports))| {
                    let path = format!("spec.{field}[{i}]");
                    Ok(Rule {
                        peers: convert_peers(peers.as_deref(), &format!("{path}.{peer_field}"))?,
                        ports: convert_ports(ports.as_deref(), &format!("{path}.ports"))?,
                    })
                })
                .collect()
        };
        let ingress_rules: Vec<_> = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.clone(), r.ports.clone()))
            .collect();
        let egress_rules: Vec<_> = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.clone(), r.ports.clone()))
            .collect();
        let ingress = convert(ingress_rules, "ingress", "from").map_err(invalid)?;
        let egress = convert(egress_rules, "egress", "to").map_err(invalid)?;
        let (mut has_ingress, mut has_egress) = (true, !egress.is_empty());
        if let Some(types) = &spec.policy_types {
            has_ingress = false;
            has_egress = false;
            if types.len() > 2 {
                return Err(invalid(FieldError::new(
                    "spec.policyTypes",
                    "may hold at most Ingress and Egress",
                )));
            }
            for (i, t) in types.iter().enumerate() {
                let seen = match t.as_str() {
                    "Ingress" => &mut has_ingress,
                    "Egress" => &mut has_egress,
                    other => {
                        return Err(invalid(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {other:?} (Ingress, Egress)"),
                        )));
                    }
                };
                if *seen {
                    return Err(invalid(FieldError::new(
                        format!("spec.policyTypes[{i}]"),
                        "duplicate value",
                    )));
                }
                *seen = true;
            }
        }
        Ok(Policy {
            key: ObjectKey::new(namespace, name),
            pod_selector,
            ingress: has_ingress.then_some(ingress),
            egress: has_egress.then_some(egress),
            staged,
        })
    }
}

fn convert_peers(
    peers: Option<&[NetworkPolicyPeer]>,
    path: &str,
) -> Result<Option<Vec<Peer>>, FieldError> {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(peers.len());
    for (i, p) in peers.iter().enumerate() {
        let path = format!("{path}[{i}]");
        match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(FieldError::new(
                    path,
                    "may not specify both ipBlock and another peer",
                ));
            }
            (Some(b), None, None) => {
                let cidr_path = format!("{path}.ipBlock.cidr");
                let cidr = parse_cidr(&b.cidr, &cidr_path)?;
                let mut except = Vec::new();
                for (j, e) in b.except.iter().flatten().enumerate() {
                    let epath = format!("{path}.ipBlock.except[{j}]");
                    let net = parse_cidr(e, &epath)?;
                    let inside = match (cidr, net) {
                        (IpNet::V4(c), IpNet::V4(n)) => {
                            c.contains(&n.network()) && n.prefix_len() > c.prefix_len()
                        }
                        (IpNet::V6(c), IpNet::V6(n)) => {
                            c.contains(&n.network()) && n.prefix_len() > c.prefix_len()
                        }
                        _ => false,
                    };
                    if !inside {
                        return Err(FieldError::new(
                            epath,
                            format!("{e} must be a strict subset of cidr {}", b.cidr),
                        ));
                    }
                    except.push(net);
                }
                out.push(Peer::Block { cidr, except });
            }
            (None, None, None) => {
                return Err(FieldError::new(
                    path,
                    "must specify one of podSelector, namespaceSelector or ipBlock",
                ));
            }
            (None, ns, pods) => {
                let pods = match pods {
                    Some(s) => Selector::from_api(s, &format!("{path}.podSelector"))?,
                    None => Selector::everything(),
                };
                let namespaces = match ns {
                    Some(s) => NsSel::Matching(Selector::from_api(
                        s,
                        &format!("{path}.namespaceSelector"),
                    )?),
                    None => NsSel::Own,
                };
                out.push(Peer::Pods { namespaces, pods });
            }
        }
    }
    Ok(Some(out))
}

/// Parses a CIDR, masking host bits as Kubernetes does (`10.1.2.3/8` is `10.0.0.0/8`).
pub(crate) fn parse_cidr(s: &str, path: &str) -> Result<IpNet, FieldError> {
    IpNet::from_str(s.trim())
        .map(|n| n.trunc())
        .map_err(|_| FieldError::new(path, format!("{s:?} is not a valid CIDR")))
}

/// An IANA service name: 1-15 characters of `[a-z0-9-]`, at least one letter, no
/// leading, trailing or doubled hyphen.
pub(crate) fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn convert_ports(
    ports: Option<&[NetworkPolicyPort]>,
    path: &str,
) -> Result<Option<Vec<PortSpec>>, FieldError> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let path = format!("{path}[{i}]");
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => Protocol::parse(s).ok_or_else(|| {
                FieldError::new(
                    format!("{path}.protocol"),
                    format!("unsupported value {s:?} (TCP, UDP, SCTP)"),
                )
            })?,
        };
        let port = match &p.port {
            None => PortRef::Any,
            Some(IntOrString::Int(n)) => {
                if !(1..=65535).contains(n) {
                    return Err(FieldError::new(
                        format!("{path}.port"),
                        format!("{n} must be between 1 and 65535"),
                    ));
                }
                PortRef::Range {
                    start: *n as u16,
                    end: *n as u16,
                }
            }
            Some(IntOrString::String(s)) => {
                if !is_port_name(s) {
                    return Err(FieldError::new(
                        format!("{path}.port"),
                        format!(
                            "{s:?} is not a valid port name (1-15 lowercase letters, digits or '-')"
                        ),
                    ));
                }
                PortRef::Named(s.clone())
            }
        };
        let port = match (p.end_port, port) {
            (None, port) => port,
            (Some(end), PortRef::Range { start, .. }) => {
                if !(1..=65535).contains(&end) || end < i32::from(start) {
                    return Err(FieldError::new(
                        format!("{path}.endPort"),
                        format!("{end} must be between port ({start}) and 65535"),
                    ));
                }
                PortRef::Range {
                    start,
                    end: end as u16,
                }
            }
            (Some(_), PortRef::Named(_)) => {
                return Err(FieldError::new(
                    format!("{path}.endPort"),
                    "may not be specified when port is a named port",
                ));
            }
            (Some(_), PortRef::Any) => {
                return Err(FieldError::new(
                    format!("{path}.endPort"),
                    "may not be specified without port",
                ));
            }
        };
        out.push(PortSpec { protocol, port });
    }
    Ok(Some(out))
}

fn object_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    kind: &'static str,
) -> Result<String, Error> {
    match meta.name.clone().filter(|n| !n.is_empty()) {
        Some(n) => Ok(n),
        None => Err(Error::Invalid {
            kind,
            object: "(unnamed)".into(),
            source: FieldError::new("metadata.name", "is required"),
        }),
    }
}

impl Namespace {
    /// Fails on a missing name or invalid labels.
    pub fn from_api(ns: &ApiNamespace) -> Result<Namespace, Error> {
        let name = object_name(&ns.metadata, "Namespace")?;
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        validate_labels(&labels, "metadata.labels").map_err(|source| Error::Invalid {
            kind: "Namespace",
            object: name.clone(),
            source,
        })?;
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        Ok(Namespace { name, labels })
    }

    /// A namespace known only from its pods: it has just the name label.
    pub fn implicit(name: &str) -> Namespace {
        Namespace {
            name: name.into(),
            labels: [(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into(),
        }
    }
}

impl Pod {
    /// Fails on a missing name, invalid labels, an unparsable pod IP, or a
    /// container port outside 1-65535 or with an unknown protocol.
    pub fn from_api(pod: &ApiPod) -> Result<Pod, Error> {
        let name = object_name(&pod.metadata, "Pod")?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = ObjectKey::new(namespace, name);
        let invalid = |source| Error::Invalid {
            kind: "Pod",
            object: key.to_string(),
            source,
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        validate_labels(&labels, "metadata.labels").map_err(invalid)?;
        let status = pod.status.clone().unwrap_or_default();
        let mut ip_strings: Vec<(String, String)> = status
            .pod_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.clone()))
            .collect();
        if ip_strings.is_empty()
            && let Some(ip) = status.pod_ip
        {
            ip_strings.push(("status.podIP".into(), ip));
        }
        let spec = pod.spec.clone().unwrap_or_default();
        // A host-network pod is its node: its podIP is the node's address. It
        // is never a policy subject or a pod peer (it is matched as the node,
        // by address), so it keeps no address here.
        if spec.host_network == Some(true) {
            ip_strings.clear();
        }
        let mut ips = Vec::new();
        for (path, s) in ip_strings {
            let ip = s.parse::<IpAddr>().map_err(|_| {
                invalid(FieldError::new(path, format!("{s:?} is not an IP address")))
            })?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let mut ports = Vec::new();
        for (ci, c) in spec.containers.iter().enumerate() {
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let path = format!("spec.containers[{ci}].ports[{pi}]");
                if !(1..=65535).contains(&p.container_port) {
                    return Err(invalid(FieldError::new(
                        format!("{path}.containerPort"),
                        format!("{} must be between 1 and 65535", p.container_port),
                    )));
                }
                let protocol = match p.protocol.as_deref() {
                    None => Protocol::Tcp,
                    Some(s) => Protocol::parse(s).ok_or_else(|| {
                        invalid(FieldError::new(
                            format!("{path}.protocol"),
                            format!("unsupported value {s:?}"),
                        ))
                    })?,
                };
                if let Some(name) = &p.name {
                    ports.push(NamedPort {
                        name: name.clone(),
                        port: p.container_port as u16,
                        protocol,
                    });
                }
            }
        }
        Ok(Pod {
            key,
            labels,
            ips,
            node: spec.node_name.filter(|n| !n.is_empty()),
            ports,
        })
    }
}

impl Node {
    /// Fails on a missing name or an unparsable address or pod CIDR.
    pub fn from_api(node: &ApiNode) -> Result<Node, Error> {
        let name = object_name(&node.metadata, "Node")?;
        let invalid = |source| Error::Invalid {
            kind: "Node",
            object: name.clone(),
            source,
        };
        let mut addresses = Vec::new();
        for (i, a) in node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .enumerate()
        {
            // Hostname, InternalDNS, ExternalDNS (every cloud provider sets
            // them) are names, not addresses: only the IP types count.
            if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
                continue;
            }
            let ip = a.address.parse::<IpAddr>().map_err(|_| {
                invalid(FieldError::new(
                    format!("status.addresses[{i}].address"),
                    format!("{:?} is not an IP address", a.address),
                ))
            })?;
            addresses.push(ip);
        }
        let mut pod_cidrs = Vec::new();
        let spec = node.spec.clone().unwrap_or_default();
        let cidrs = spec
            .pod_cidrs
            .clone()
            .unwrap_or_else(|| spec.pod_cidr.into_iter().collect());
        for (i, c) in cidrs.iter().enumerate() {
            pod_cidrs.push(parse_cidr(c, &format!("spec.podCIDRs[{i}]")).map_err(invalid)?);
        }
        let labels = node.metadata.labels.clone().unwrap_or_default();
        validate_labels(&labels, "metadata.labels").map_err(invalid)?;
        Ok(Node {
            name,
            labels,
            addresses,
            pod_cidrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    fn np(yaml: &str) -> NetworkPolicy {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn nodes_with_dns_addresses_and_host_network_pods_are_accepted() {
        let node: ApiNode = serde_saphyr::from_str(
            "metadata: {name: n1}\nspec: {podCIDR: 10.1.0.0/24}\nstatus:\n  addresses:\n  - {type: Hostname, address: n1}\n  - {type: InternalDNS, address: n1.internal}\n  - {type: ExternalDNS, address: n1.example.com}\n  - {type: InternalIP, address: 192.0.2.10}\n",
        )
        .unwrap();
        let n = Node::from_api(&node).unwrap();
        assert_eq!(n.addresses, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
        let bad: ApiNode = serde_saphyr::from_str(
            "metadata: {name: n2}\nstatus:\n  addresses: [{type: InternalIP, address: n2.internal}]\n",
        )
        .unwrap();
        assert!(Node::from_api(&bad).is_err(), "an InternalIP must be an IP");
        let pod: ApiPod = serde_saphyr::from_str(
            "metadata: {name: proxy, namespace: kube-system}\nspec: {hostNetwork: true, nodeName: n1, containers: [{name: c, image: x}]}\nstatus: {podIP: 192.0.2.10}\n",
        )
        .unwrap();
        let p = Pod::from_api(&pod).unwrap();
        assert!(
            p.ips.is_empty(),
            "a host-network pod is its node, not a pod address"
        );
        // A default deny in its namespace puts no deny on the node's address.
        let mut c = Cluster::default();
        c.upsert_pod(p);
        c.upsert_policy(
            Policy::from_api(&np(
                "metadata: {name: deny, namespace: kube-system}\nspec: {podSelector: {}}\n",
            ))
            .unwrap(),
        );
        let compiler = crate::compile::Compiler::from_cluster(c);
        assert!(
            compiler
                .flows()
                .iter()
                .all(|f| !f.to_string().contains("192.0.2.10")),
            "no flow names the node's address"
        );
    }

    #[test]
    fn policy_types_default() {
        let p = Policy::from_api(&np(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress: [{}]\n",
        ))
        .unwrap();
        assert!(p.ingress.is_some(), "Ingress is always implied");
        assert!(p.egress.is_some(), "Egress is implied by egress rules");
        let p = Policy::from_api(&np(
            "metadata: {name: p}\nspec:\n  podSelector: {}\n  egress: []\n",
        ))
        .unwrap();
        assert!(p.egress.is_none());
        assert_eq!(p.key, ObjectKey::new("default", "p"));
    }

    #[test]
    fn rejects_what_the_api_server_rejects() {
        let err = |spec: &str| {
            let e = Policy::from_api(&np(&format!(
                "metadata: {{name: p, namespace: x}}\nspec:\n{spec}"
            )))
            .unwrap_err();
            match e {
                Error::Invalid { source, .. } => source.to_string(),
                other => panic!("{other}"),
            }
        };
        assert!(
            err("  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]")
                .starts_with("spec.ingress[0].from[0].ipBlock.cidr:")
        );
        assert!(
            err("  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]")
                .starts_with(
                    "spec.ingress[0].from[0].ipBlock.except[0]: 10.1.0.0/24 must be a strict subset"
                )
        );
        assert!(
            err("  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]}]")
                .contains("strict subset")
        );
        assert!(
            err("  ingress: [{ports: [{port: 70000}]}]")
                .starts_with("spec.ingress[0].ports[0].port:")
        );
        assert!(
            err("  ingress: [{ports: [{port: 80, endPort: 79}]}]")
                .starts_with("spec.ingress[0].ports[0].endPort:")
        );
        assert!(err("  ingress: [{ports: [{port: http, endPort: 90}]}]").contains("named port"));
        assert!(
            err("  ingress: [{ports: [{protocol: ICMP}]}]")
                .starts_with("spec.ingress[0].ports[0].protocol:")
        );
        assert!(err("  ingress: [{ports: [{port: Bad_Name}]}]").contains("not a valid port name"));
        assert!(
            err("  egress: [{to: [{}]}]").starts_with("spec.egress[0].to[0]: must specify one of")
        );
        assert!(
            err("  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]")
                .contains("both ipBlock")
        );
        assert!(
            err("  podSelector: {matchExpressions: [{key: a, operator: Like, values: [b]}]}")
                .contains("operator")
        );
        assert!(err("  policyTypes: [Ingress, Sideways]").starts_with("spec.policyTypes[1]"));
    }

    #[test]
    fn cidr_host_bits_are_masked() {
        let p = Policy::from_api(&np(
            "metadata: {name: p, namespace: x}\nspec:\n  egress: [{to: [{ipBlock: {cidr: 10.244.1.1/4}}]}]\n",
        ))
        .unwrap();
        let rules = p.egress.unwrap();
        assert_eq!(
            rules[0].peers.as_ref().unwrap()[0],
            Peer::Block {
                cidr: "0.0.0.0/4".parse().unwrap(),
                except: vec![]
            }
        );
    }
}
