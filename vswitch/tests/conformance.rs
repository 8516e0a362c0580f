//! The upstream Kubernetes NetworkPolicy conformance subset over real
//! traffic, once with IPv4 pod addresses and once with IPv6 ones: every
//! pod a network namespace on a TAP port, every probe a real TCP connection
//! or UDP datagram, denials seen as timeouts.
//!
//! Needs root; skipped outside CI without it. Every namespace and device is
//! uniquely named and removed on drop.

use std::collections::HashMap as Map;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::compile::Change;
use policy::model::{ObjectKey, Pod, Policy};
use vswitch::Tap;
use vswitch::port::TapPort;

mod common;

use common::{Netns, Running, privileged, probe, serve_tcp};

const CASES: &str = include_str!("../../policy/tests/data/netpol-cases.json");

#[test]
fn upstream_cases_over_real_ipv4_traffic() {
    upstream_cases("vsu4", Family::V4);
}

#[test]
fn upstream_cases_over_real_ipv6_traffic() {
    upstream_cases("vsu6", Family::V6);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// A model pod's address in this family: IPv4 as the model has it;
    /// IPv6 `fd00:95::A:B` for `10.244.A.B`.
    fn addr(self, model: std::net::IpAddr) -> std::net::IpAddr {
        match (self, model) {
            (Family::V6, std::net::IpAddr::V4(v4)) => {
                let [_, _, a, b] = v4.octets();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(
                    0xfd00,
                    0x95,
                    0,
                    0,
                    0,
                    0,
                    u16::from(a),
                    u16::from(b),
                ))
            }
            _ => model,
        }
    }

    /// The upstream cases' prefixes in this family: /32 is one address (/128),
    /// /4 a block holding every pod (/16 here).
    fn prefix(self, v4: u8) -> u8 {
        match (self, v4) {
            (Family::V4, p) => p,
            (Family::V6, 32) => 128,
            (Family::V6, _) => 16,
        }
    }
}

fn upstream_cases(tag: &str, family: Family) {
    use serde_json::Value;
    let id = format!("{tag}{}", std::process::id() % 100_000);
    if !privileged(&format!("{id}x")) {
        return;
    }
    let doc: Value = serde_json::from_str(CASES).unwrap();
    let model = &doc["model"];
    let running = Running::new(&format!("{id}p"));
    let mut spaces: Vec<Netns> = Vec::new();
    let mut ns_of = Map::new();
    let mut ips = Map::new();
    for (key, pod) in model["pods"].as_object().unwrap() {
        let (pns, pname) = key.split_once('/').unwrap();
        let name = format!("{id}{pns}{pname}");
        let ip = family.addr(pod["ip"].as_str().unwrap().parse().unwrap());
        let ns = Netns::new(name.clone());
        let tap = Tap::open(&name, false).unwrap();
        let key: ObjectKey = key.parse().unwrap();
        let mac = policy::pipeline::pod_mac(&key, &[ip]);
        match family {
            Family::V4 => common::place_in(&ns, &name, mac, &format!("{ip}/16")),
            Family::V6 => common::place_in6(&ns, &name, mac, &format!("{ip}/64")),
        }
        running
            .switch
            .attach(Arc::new(TapPort(tap)), key.clone(), mac, vec![ip])
            .unwrap();
        // Servers on 80 and 81 (TCP), 80 (UDP echo).
        for port in [80u16, 81] {
            serve_tcp(&ns, &ip.to_string(), port);
        }
        let sock = ns.run(move || UdpSocket::bind(SocketAddr::new(ip, 80)).unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        });
        ns_of.insert(key.to_string(), name);
        ips.insert(key.to_string(), ip);
        spaces.push(ns);
    }
    let mut checked = 0;
    let mut cases_run = 0;
    let mut failures = Vec::new();
    let mut in_force: Vec<ObjectKey> = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        if case["server"]["protocols"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "SCTP")
        {
            continue; // no SCTP sockets on this kernel: covered offline (policy tests)
        }
        cases_run += 1;
        for step in case["steps"].as_array().unwrap() {
            // Labels: the model's, overridden by the step's complete sets.
            for (name, ns) in model["namespaces"].as_object().unwrap() {
                let labels = step
                    .get("namespace_labels")
                    .and_then(|o| o.get(name))
                    .unwrap_or(&ns["labels"]);
                let mut labels: std::collections::BTreeMap<String, String> =
                    serde_json::from_value(labels.clone()).unwrap();
                labels.insert("kubernetes.io/metadata.name".into(), name.clone());
                running
                    .switch
                    .apply(Change::Namespace(policy::model::Namespace {
                        name: name.clone(),
                        labels,
                    }))
                    .unwrap();
            }
            let ports: Vec<policy::model::NamedPort> = case["server"]["container_ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| policy::model::NamedPort {
                    name: p["name"].as_str().unwrap().into(),
                    port: p["containerPort"].as_u64().unwrap() as u16,
                    protocol: policy::model::Protocol::parse(p["protocol"].as_str().unwrap())
                        .unwrap(),
                })
                .collect();
            for (key, pod) in model["pods"].as_object().unwrap() {
                let labels = step
                    .get("pod_labels")
                    .and_then(|o| o.get(key))
                    .unwrap_or(&pod["labels"]);
                running
                    .switch
                    .apply(Change::Pod(Pod {
                        key: key.parse().unwrap(),
                        labels: serde_json::from_value(labels.clone()).unwrap(),
                        ips: vec![],
                        node: None,
                        ports: ports.clone(),
                    }))
                    .unwrap();
            }
            // The step's policies are the complete set in force.
            let mut wanted = Vec::new();
            for p in step["policies"].as_array().unwrap() {
                let mut text = p.to_string();
                for (pod, ip) in &ips {
                    for prefix in [32, 4] {
                        text = text.replace(
                            &format!(r#"{{"podIP":"{pod}","prefix":{prefix}}}"#),
                            &format!(r#""{ip}/{}""#, family.prefix(prefix)),
                        );
                    }
                }
                let np: NetworkPolicy = serde_json::from_str(&text).unwrap();
                let policy = Policy::from_api(&np).unwrap();
                wanted.push(policy.key.clone());
                running.switch.apply(Change::Policy(policy)).unwrap();
            }
            for old in in_force.drain(..) {
                if !wanted.contains(&old) {
                    running.switch.apply(Change::PolicyDeleted(old)).unwrap();
                }
            }
            in_force = wanted;
            for exp in step["expect"].as_array().unwrap() {
                let port = exp["port"].as_u64().unwrap() as u16;
                let udp = exp["protocol"] == "UDP";
                let mut probes = Vec::new();
                for (from, row) in exp["matrix"].as_object().unwrap() {
                    for (to, want) in row.as_object().unwrap() {
                        if from != to {
                            probes.push((
                                from.clone(),
                                to.clone(),
                                want.as_bool().unwrap(),
                                probe(&ns_of[from], ips[to], port, udp),
                            ));
                        }
                    }
                }
                for (from, to, want, handle) in probes {
                    checked += 1;
                    let got = handle.join().unwrap();
                    if got != want {
                        failures.push(format!(
                            "{} step {}: {from} -> {to} {}/{port}: want {want}, got {got}",
                            case["id"], step["step"], exp["protocol"]
                        ));
                    }
                }
            }
        }
    }
    drop(running);
    drop(spaces);
    assert!(cases_run >= 10, "only {cases_run} cases");
    assert!(
        failures.is_empty(),
        "{} of {checked} pairs wrong over real traffic:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{cases_run} upstream cases, {checked} pairs over real {family:?} traffic");
}
