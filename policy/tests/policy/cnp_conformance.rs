//! The upstream ClusterNetworkPolicy conformance subset (tests/data/cnp-cases),
//! through the offline path: every step's policies compiled with the model's
//! pods and nodes, every probe traced through the full pipeline.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::cluster::Cluster;
use policy::cnp::ClusterPolicy;
use policy::model::{NamedPort, Namespace, Node, ObjectKey, Pod, Policy, Protocol};
use policy::offline::Offline;
use policy::probe::{Endpoint, L4};
use serde_json::Value;

const CASES: &str = include_str!("../data/cnp-cases.json");

fn labels(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

/// The world of the cases: addresses of pods and nodes.
struct World {
    pods: BTreeMap<String, IpAddr>,
    nodes: BTreeMap<String, IpAddr>,
}

impl World {
    fn new(doc: &Value) -> World {
        let a = &doc["defaultIpAssignment"];
        let parse = |m: &Value| -> BTreeMap<String, IpAddr> {
            m.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().parse().unwrap()))
                .collect()
        };
        World {
            pods: parse(&a["pods"]),
            nodes: parse(&a["nodes"]),
        }
    }

    /// Where a probe to `key` goes: the pod's IP, or its node's for a
    /// host-network pod.
    fn address(&self, model: &Value, key: &str) -> IpAddr {
        let pod = &model["pods"][key];
        if pod["hostNetwork"].as_bool().unwrap() {
            self.nodes[pod["node"].as_str().unwrap()]
        } else {
            self.pods[key]
        }
    }

    /// Replaces `{"podIP": "ns/pod", "prefix": 32, "prefixV6": 128}`.
    fn substitute(&self, v: &mut Value) {
        match v {
            Value::Object(m) if m.contains_key("podIP") => {
                let ip = self.pods[m["podIP"].as_str().unwrap()];
                let prefix = if ip.is_ipv6() {
                    m["prefixV6"].as_u64().unwrap()
                } else {
                    m["prefix"].as_u64().unwrap()
                };
                *v = Value::String(format!("{ip}/{prefix}"));
            }
            Value::Object(m) => m.values_mut().for_each(|x| self.substitute(x)),
            Value::Array(a) => a.iter_mut().for_each(|x| self.substitute(x)),
            _ => {}
        }
    }
}

fn cluster_for(world: &World, model: &Value, step: &Value) -> Cluster {
    let mut c = Cluster::default();
    for (name, ns) in model["namespaces"].as_object().unwrap() {
        let l = step
            .get("namespace_labels")
            .and_then(|o| o.get(name))
            .map_or_else(|| labels(&ns["labels"]), labels);
        c.upsert_namespace(Namespace {
            name: name.clone(),
            labels: l,
        });
    }
    for (name, node) in model["nodes"].as_object().unwrap() {
        c.upsert_node(Node {
            name: name.clone(),
            labels: labels(&node["labels"]),
            addresses: vec![world.nodes[name]],
            pod_cidrs: vec![],
        });
    }
    for (key, pod) in model["pods"].as_object().unwrap() {
        let host = pod["hostNetwork"].as_bool().unwrap();
        c.upsert_pod(Pod {
            key: key.parse().unwrap(),
            labels: labels(&pod["labels"]),
            ips: if host { vec![] } else { vec![world.pods[key]] },
            node: pod["node"].as_str().map(str::to_string),
            ports: pod["containerPorts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| NamedPort {
                    name: p["name"].as_str().unwrap().into(),
                    port: p["containerPort"].as_u64().unwrap() as u16,
                    protocol: Protocol::parse(p["protocol"].as_str().unwrap()).unwrap(),
                })
                .collect(),
        });
    }
    for p in step["policies"].as_array().unwrap() {
        let mut p = p.clone();
        world.substitute(&mut p);
        match p["kind"].as_str().unwrap() {
            "ClusterNetworkPolicy" => {
                let cnp = ClusterPolicy::from_value(&p).unwrap();
                assert!(cnp.warnings.is_empty(), "{:?}", cnp.warnings);
                c.upsert_cluster_policy(cnp);
            }
            "NetworkPolicy" => {
                let np: NetworkPolicy = serde_json::from_value(p).unwrap();
                c.upsert_policy(Policy::from_api(&np).unwrap());
            }
            other => panic!("kind {other}"),
        }
    }
    c
}

fn l4(exp: &Value) -> L4 {
    let port = exp["port"].as_u64().unwrap() as u16;
    match exp["protocol"].as_str().unwrap() {
        "TCP" => L4::Tcp(port),
        "UDP" => L4::Udp(port),
        "SCTP" => L4::Sctp(port),
        other => panic!("protocol {other}"),
    }
}

#[test]
fn upstream_cluster_network_policy_cases_pass_offline() {
    let doc: Value = serde_json::from_str(CASES).unwrap();
    let model = &doc["model"];
    let world = World::new(&doc);
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        for step in case["steps"].as_array().unwrap() {
            let offline = Offline::new(cluster_for(&world, model, step)).unwrap();
            for exp in step["expect"].as_array().unwrap() {
                let from: ObjectKey = exp["from"].as_str().unwrap().parse().unwrap();
                let to = exp["to"].as_str().unwrap();
                let dst = if model["pods"][to]["hostNetwork"].as_bool().unwrap() {
                    Endpoint::Ip(world.address(model, to))
                } else {
                    Endpoint::Pod(to.parse().unwrap())
                };
                let want = exp["allow"].as_bool().unwrap();
                let got = offline
                    .trace(&Endpoint::Pod(from.clone()), &dst, l4(exp))
                    .unwrap();
                checked += 1;
                if got.verdict.allowed != want {
                    failures.push(format!(
                        "{} step {} ({}): {from} -> {to} {:?}: want {want}, got {} ({})",
                        case["id"],
                        step["step"],
                        case["subtest"],
                        l4(exp),
                        got.verdict.allowed,
                        got.verdict.rule
                    ));
                }
            }
        }
    }
    assert!(checked >= 150, "only {checked} probes checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} probes wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
