//! Services: ClusterIP Services and their EndpointSlices, and the frontends
//! (address, protocol, port → backends) the switch load-balances.
//!
//! Owns reading Service and EndpointSlice objects (with the API server's
//! validation), and deciding what each frontend sends to: the ready
//! endpoints of the Service's slices (or, for a Service whose selector no
//! slice answers for — manifest mode, no controller — the pods it selects),
//! named target ports resolved per endpoint, only the node's own endpoints
//! for `internalTrafficPolicy: Local`. Headless Services (no ClusterIP) are
//! left alone. No I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as ApiService;
use k8s_openapi::api::discovery::v1::EndpointSlice as ApiSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cluster::Cluster;
use crate::error::{Error, FieldError};
use crate::model::{ObjectKey, Protocol};
use crate::selector::Labels;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (the API's default: 3 h).
pub const DEFAULT_AFFINITY_SECONDS: i32 = 10_800;

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where a Service port sends to on an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per endpoint.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
}

/// A Service the switch load-balances (`type` ClusterIP, NodePort or
/// LoadBalancer: their ClusterIP; ExternalName and headless ones are not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: endpoints come from EndpointSlices only.
    pub selector: Option<Labels>,
    /// `sessionAffinity: ClientIP`: for how long (seconds) a client's new
    /// connections follow its last one (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub local_only: bool,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    pub node: Option<String>,
    /// The pod behind it, when the slice names one.
    pub pod: Option<ObjectKey>,
}

/// An EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub key: ObjectKey,
    /// The Service it belongs to (same namespace).
    pub service: String,
    /// (name, protocol, port): the target port of the Service port of that name.
    pub ports: Vec<(String, Protocol, u16)>,
    pub endpoints: Vec<Endpoint>,
}

/// Services and slices, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Services {
    pub services: BTreeMap<ObjectKey, Service>,
    pub slices: BTreeMap<ObjectKey, Slice>,
}

/// A backend: an address and a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

/// What the switch load-balances: one ClusterIP, protocol and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The select group's id (stable for the frontend).
    pub group: u32,
    pub service: ObjectKey,
    pub port_name: String,
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// Ready backends of the frontend's family; empty: refused.
    pub backends: Vec<Backend>,
    /// ClientIP affinity, seconds.
    pub affinity: Option<u32>,
}

impl Frontend {
    /// `ns/name:port` (the port's name, or its number when unnamed).
    pub fn name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}:{}", self.service, self.port)
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }
}

fn invalid(kind: &'static str, key: &ObjectKey, path: impl Into<String>, message: String) -> Error {
    Error::Invalid {
        kind,
        object: key.to_string(),
        source: FieldError::new(path, message),
    }
}

fn protocol(
    kind: &'static str,
    key: &ObjectKey,
    path: &str,
    p: Option<&str>,
) -> Result<Protocol, Error> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s)
            .ok_or_else(|| invalid(kind, key, path, format!("unsupported value {s:?}"))),
    }
}

fn port_number(kind: &'static str, key: &ObjectKey, path: &str, n: i32) -> Result<u16, Error> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(kind, key, path, format!("{n} must be between 1 and 65535")))
}

impl Service {
    /// `None` for a Service the switch does not load-balance (headless,
    /// ExternalName). Fails on an unparsable ClusterIP or a bad port.
    pub fn from_api(s: &ApiService) -> Result<Option<Service>, Error> {
        let name = s.metadata.name.clone().unwrap_or_default();
        let key = ObjectKey::new(
            s.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name,
        );
        let spec = s.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Ok(None);
        }
        let mut texts: Vec<(String, String)> = spec
            .cluster_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
            .collect();
        if texts.is_empty()
            && let Some(ip) = &spec.cluster_ip
        {
            texts.push(("spec.clusterIP".into(), ip.clone()));
        }
        if texts.iter().all(|(_, t)| t.is_empty() || t == "None") {
            return Ok(None);
        }
        let mut cluster_ips = Vec::new();
        for (path, t) in texts {
            let ip = t.parse::<IpAddr>().map_err(|_| {
                invalid("Service", &key, path, format!("{t:?} is not an IP address"))
            })?;
            cluster_ips.push(ip);
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let path = format!("spec.ports[{i}]");
            let port = port_number("Service", &key, &format!("{path}.port"), p.port)?;
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(port_number(
                    "Service",
                    &key,
                    &format!("{path}.targetPort"),
                    *n,
                )?),
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => TargetPort::Number(port_number(
                        "Service",
                        &key,
                        &format!("{path}.targetPort"),
                        n,
                    )?),
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(
                    "Service",
                    &key,
                    &format!("{path}.protocol"),
                    p.protocol.as_deref(),
                )?,
                port,
                target,
            });
        }
        let affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(DEFAULT_AFFINITY_SECONDS);
                if !(1..=86_400).contains(&timeout) {
                    return Err(invalid(
                        "Service",
                        &key,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{timeout} must be between 1 and 86400"),
                    ));
                }
                Some(timeout as u32)
            }
            Some(other) => {
                return Err(invalid(
                    "Service",
                    &key,
                    "spec.sessionAffinity",
                    format!("unsupported value {other:?} (None or ClientIP)"),
                ));
            }
        };
        Ok(Some(Service {
            key,
            cluster_ips,
            ports,
            selector: spec.selector.clone().filter(|s| !s.is_empty()),
            affinity,
            local_only: spec.internal_traffic_policy.as_deref() == Some("Local"),
        }))
    }
}

impl Slice {
    /// Fails on a slice without its Service's label, or a bad address or port.
    pub fn from_api(s: &ApiSlice) -> Result<Slice, Error> {
        let name = s.metadata.name.clone().unwrap_or_default();
        let key = ObjectKey::new(
            s.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name,
        );
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .ok_or_else(|| {
                invalid(
                    "EndpointSlice",
                    &key,
                    "metadata.labels",
                    format!("needs {SERVICE_NAME_LABEL} (the Service it belongs to)"),
                )
            })?;
        let mut ports = Vec::new();
        for (i, p) in s.ports.iter().flatten().enumerate() {
            let path = format!("ports[{i}]");
            let Some(n) = p.port else { continue };
            ports.push((
                p.name.clone().unwrap_or_default(),
                protocol(
                    "EndpointSlice",
                    &key,
                    &format!("{path}.protocol"),
                    p.protocol.as_deref(),
                )?,
                port_number("EndpointSlice", &key, &format!("{path}.port"), n)?,
            ));
        }
        let mut endpoints = Vec::new();
        for (i, e) in s.endpoints.iter().enumerate() {
            let mut addresses = Vec::new();
            for (j, a) in e.addresses.iter().enumerate() {
                addresses.push(a.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        "EndpointSlice",
                        &key,
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                    )
                })?);
            }
            let conditions = e.conditions.clone().unwrap_or_default();
            endpoints.push(Endpoint {
                addresses,
                ready: conditions.ready.unwrap_or(true),
                node: e.node_name.clone(),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        Some(ObjectKey::new(
                            r.namespace.clone().unwrap_or_else(|| key.namespace.clone()),
                            r.name.clone()?,
                        ))
                    }),
            });
        }
        Ok(Slice {
            key,
            service,
            ports,
            endpoints,
        })
    }
}

/// A stable group id for a frontend, unique among `taken`.
fn group_id(service: &ObjectKey, port: &ServicePort, ip: IpAddr, taken: &mut Vec<u32>) -> u32 {
    let text = format!("{service}/{}/{}/{ip}", port.name, port.port);
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let mut id = (h & 0x7fff_ffff).max(1);
    while taken.contains(&id) {
        id = id % 0x7fff_ffff + 1;
    }
    taken.push(id);
    id
}

impl Services {
    pub fn upsert_service(&mut self, s: Service) {
        self.services.insert(s.key.clone(), s);
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        self.services.remove(key);
    }

    pub fn upsert_slice(&mut self, s: Slice) {
        self.slices.insert(s.key.clone(), s);
    }

    pub fn remove_slice(&mut self, key: &ObjectKey) {
        self.slices.remove(key);
    }

    /// Every frontend, with its ready backends as `node` sees them (`node`:
    /// the switch's node, for `internalTrafficPolicy: Local`; `None` offline,
    /// where every endpoint counts).
    pub fn frontends(&self, cluster: &Cluster, node: Option<&str>) -> Vec<Frontend> {
        let mut out = Vec::new();
        let mut taken = Vec::new();
        for s in self.services.values() {
            let slices: Vec<&Slice> = self
                .slices
                .values()
                .filter(|sl| sl.key.namespace == s.key.namespace && sl.service == s.key.name)
                .collect();
            for port in &s.ports {
                let mut backends: Vec<Backend> = Vec::new();
                if slices.is_empty() {
                    // No controller wrote slices: the selected pods, as the
                    // EndpointSlice controller would list them.
                    if let Some(sel) = &s.selector {
                        for pod in cluster.pods_in(&s.key.namespace) {
                            let selected = sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
                            let here =
                                !s.local_only || node.is_none() || pod.node.as_deref() == node;
                            if !selected || !here {
                                continue;
                            }
                            let target = match &port.target {
                                TargetPort::Number(n) => Some(*n),
                                TargetPort::Name(name) => pod.resolve(name, port.protocol),
                            };
                            if let Some(t) = target {
                                backends
                                    .extend(pod.ips.iter().map(|ip| Backend { ip: *ip, port: t }));
                            }
                        }
                    }
                } else {
                    for sl in &slices {
                        let Some((_, _, target)) = sl
                            .ports
                            .iter()
                            .find(|(n, p, _)| *n == port.name && *p == port.protocol)
                        else {
                            continue;
                        };
                        for e in &sl.endpoints {
                            let here = !s.local_only || node.is_none() || e.node.as_deref() == node;
                            if e.ready && here {
                                backends.extend(e.addresses.iter().map(|ip| Backend {
                                    ip: *ip,
                                    port: *target,
                                }));
                            }
                        }
                    }
                }
                backends.sort();
                backends.dedup();
                for ip in &s.cluster_ips {
                    out.push(Frontend {
                        group: group_id(&s.key, port, *ip, &mut taken),
                        service: s.key.clone(),
                        port_name: port.name.clone(),
                        ip: *ip,
                        protocol: port.protocol,
                        port: port.port,
                        backends: backends
                            .iter()
                            .filter(|b| b.ip.is_ipv4() == ip.is_ipv4())
                            .copied()
                            .collect(),
                        affinity: s.affinity,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifests, load_str};

    fn load(text: &str) -> Manifests {
        let mut m = Manifests::default();
        load_str(&mut m, std::path::Path::new("s.yaml"), text);
        m
    }

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: api}}\n\
        spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n\
        status: {podIP: 10.0.0.1}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: api}}\n\
        spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}\n\
        status: {podIP: 10.0.1.1}\n---\n";

    #[test]
    fn frontends_resolve_named_ports_per_pod_and_keep_local_ones() {
        let m = load(&format!(
            "{PODS}apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: x}}\n\
             spec: {{clusterIP: 10.96.0.1, selector: {{app: api}}, internalTrafficPolicy: Local, sessionAffinity: ClientIP,\n\
             \x20 sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}, ports: [{{port: 80, targetPort: http}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: headless, namespace: x}}\nspec: {{clusterIP: None, ports: [{{port: 80}}]}}\n"
        ));
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.services.services.len(), 1, "headless left alone");
        let cluster = m.to_cluster();
        let all = m.services.frontends(&cluster, None);
        assert_eq!(
            all[0].backends,
            vec![
                Backend {
                    ip: "10.0.0.1".parse().unwrap(),
                    port: 8080
                },
                Backend {
                    ip: "10.0.1.1".parse().unwrap(),
                    port: 9090
                },
            ]
        );
        assert_eq!(all[0].affinity, Some(60));
        let here = m.services.frontends(&cluster, Some("n2"));
        assert_eq!(here[0].backends.len(), 1);
        assert_eq!(here[0].backends[0].port, 9090);
    }

    #[test]
    fn slices_give_ready_endpoints_only_and_bad_services_are_named() {
        let m = load(&format!(
            "{PODS}apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: x}}\n\
             spec: {{clusterIP: 10.96.0.1, selector: {{app: api}}, ports: [{{name: web, port: 80, targetPort: http}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: api-1, namespace: x, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nports: [{{name: web, port: 7000}}]\n\
             endpoints: [{{addresses: [10.0.0.1]}}, {{addresses: [10.0.1.1], conditions: {{ready: false, terminating: true}}}}]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: x}}\n\
             spec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: x}}\n\
             spec: {{clusterIP: 10.96.0.3, sessionAffinity: ClientIP, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 0}}}}, ports: [{{port: 80}}]}}\n"
        ));
        let f = m.services.frontends(&m.to_cluster(), None);
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].backends,
            vec![Backend {
                ip: "10.0.0.1".parse().unwrap(),
                port: 7000
            }],
            "the slice's port for the Service port's name; the terminating endpoint left out"
        );
        let errors: Vec<String> = m.errors.iter().map(|e| format!("{e} {:?}", e)).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("spec.clusterIP"), "{errors:?}");
        assert!(errors[1].contains("timeoutSeconds"), "{errors:?}");
    }
}
