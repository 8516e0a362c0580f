//! Every case of the upstream NetworkPolicy e2e subset (tests/data), through the
//! offline path: manifests -> compiler -> full pipeline -> datapath trace.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::cluster::Cluster;
use policy::model::{NamedPort, Namespace, ObjectKey, Pod, Policy, Protocol};
use policy::offline::Offline;
use policy::probe::{Endpoint, L4};
use serde_json::Value;

const CASES: &str = include_str!("../data/netpol-cases.json");

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Replaces `{"podIP": "ns/pod", "prefix": N}` with "<ip>/N".
fn substitute(v: &mut Value, ips: &BTreeMap<String, String>) {
    match v {
        Value::Object(m) if m.contains_key("podIP") => {
            let pod = m["podIP"].as_str().unwrap();
            let prefix = m["prefix"].as_u64().unwrap();
            *v = Value::String(format!("{}/{prefix}", ips[pod]));
        }
        Value::Object(m) => m.values_mut().for_each(|x| substitute(x, ips)),
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, ips)),
        _ => {}
    }
}

fn cluster_for(model: &Value, case: &Value, step: &Value) -> Cluster {
    let mut c = Cluster::default();
    for (name, ns) in model["namespaces"].as_object().unwrap() {
        let mut l = labels(&ns["labels"]);
        if let Some(over) = step.get("namespace_labels").and_then(|o| o.get(name)) {
            l = labels(over);
        }
        l.insert("kubernetes.io/metadata.name".into(), name.clone());
        c.upsert_namespace(Namespace {
            name: name.clone(),
            labels: l,
        });
    }
    let ports: Vec<NamedPort> = case["server"]["container_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| NamedPort {
            name: p["name"].as_str().unwrap().into(),
            port: p["containerPort"].as_u64().unwrap() as u16,
            protocol: Protocol::parse(p["protocol"].as_str().unwrap()).unwrap(),
        })
        .collect();
    let mut ips = BTreeMap::new();
    for (key, pod) in model["pods"].as_object().unwrap() {
        let mut l = labels(&pod["labels"]);
        if let Some(over) = step.get("pod_labels").and_then(|o| o.get(key)) {
            l = labels(over);
        }
        ips.insert(key.clone(), pod["ip"].as_str().unwrap().to_string());
        c.upsert_pod(Pod {
            key: key.parse().unwrap(),
            labels: l,
            ips: vec![pod["ip"].as_str().unwrap().parse().unwrap()],
            node: None,
            ports: ports.clone(),
        });
    }
    for p in step["policies"].as_array().unwrap() {
        let mut p = p.clone();
        substitute(&mut p, &ips);
        let np: NetworkPolicy = serde_json::from_value(p).unwrap();
        c.upsert_policy(Policy::from_api(&np).unwrap());
    }
    c
}

#[test]
fn upstream_cases_pass_offline() {
    let doc: Value = serde_json::from_str(CASES).unwrap();
    let model = &doc["model"];
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        for step in case["steps"].as_array().unwrap() {
            let offline = Offline::new(cluster_for(model, case, step)).unwrap();
            for exp in step["expect"].as_array().unwrap() {
                let port = exp["port"].as_u64().unwrap() as u16;
                let l4 = match exp["protocol"].as_str().unwrap() {
                    "TCP" => L4::Tcp(port),
                    "UDP" => L4::Udp(port),
                    "SCTP" => L4::Sctp(port),
                    other => panic!("protocol {other}"),
                };
                for (from, row) in exp["matrix"].as_object().unwrap() {
                    for (to, want) in row.as_object().unwrap() {
                        if from == to {
                            continue;
                        }
                        let f: ObjectKey = from.parse().unwrap();
                        let t: ObjectKey = to.parse().unwrap();
                        let got = offline
                            .trace(&Endpoint::Pod(f), &Endpoint::Pod(t), l4)
                            .unwrap();
                        checked += 1;
                        if got.verdict.allowed != want.as_bool().unwrap() {
                            failures.push(format!(
                                "{} step {}: {from} -> {to} {l4:?}: want {want}, got {} ({})",
                                case["id"], step["step"], got.verdict.allowed, got.verdict.rule
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 1500, "only {checked} pairs checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} pairs wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
