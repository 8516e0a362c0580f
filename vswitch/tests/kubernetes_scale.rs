//! Scale in Kubernetes mode, measured: the synthetic cluster of BENCHMARKS.md
//! (10,000 pods in 1,000 namespaces, 10,000 NetworkPolicies, 100 Nodes) served
//! by the test API server; how long vswitchd takes to be ready, the memory it
//! holds, and how long a watched policy change takes to be enforced. 100 of
//! the pods run on this node. A measurement, run by hand (root):
//!
//!   cargo test --release -p vswitch --test kubernetes_scale -- --ignored --nocapture

mod apiserver;
mod common;
mod kubenode;

use std::time::{Duration, Instant};

use apiserver::{ApiServer, Kind};
use control::Request;
use kubenode::{node, policy, start};
use serde_json::{Value, json};

#[test]
#[ignore = "a measurement: run by hand (see the module's doc)"]
fn ten_thousand_pods_and_policies() {
    if !common::privileged("vsw-kscale") {
        return;
    }
    let api = ApiServer::start();
    let mut objects = 0;
    for (_, text) in policy::synthetic::manifests(1000, 10) {
        // This node is node-a: the pods of node-0 run here.
        let text = text.replace("nodeName: node-0\n", "nodeName: node-a\n");
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            let kind = match doc["kind"].as_str() {
                Some("Namespace") => Kind::Namespace,
                Some("Pod") => Kind::Pod,
                Some("NetworkPolicy") => Kind::NetworkPolicy,
                other => panic!("unexpected kind {other:?}"),
            };
            api.apply(kind, doc);
            objects += 1;
        }
    }
    for n in 1..100 {
        api.apply(
            Kind::Node,
            node(
                &format!("node-{n}"),
                &format!("192.168.0.{n}"),
                &format!("10.200.{n}.0/24"),
            ),
        );
    }
    api.apply(Kind::Node, node("node-a", "192.168.0.100", "10.200.0.0/24"));
    let dir = std::env::temp_dir().join(format!("vswitch-kscale-{}", std::process::id()));
    let started = Instant::now();
    let node = start(&api, &dir, "", "");
    while !node.ready() {
        assert!(started.elapsed() < Duration::from_secs(300), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = started.elapsed();
    let flows = node
        .ask(&Request::DumpFlows)
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    let peak = node
        .daemon
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    eprintln!("{objects} objects and 100 Nodes: ready after {ready:?}, {flows} flows, {peak}");

    // A watched policy change selecting this node's pods, enforced when its
    // generation is published; five of them.
    let generation = || {
        node.ask(&Request::Stats).unwrap()["realisation"]["generation"]
            .as_u64()
            .unwrap()
    };
    let mut took = Vec::new();
    for i in 0..5 {
        let before = generation();
        let written = Instant::now();
        api.apply(
            Kind::NetworkPolicy,
            policy(
                "ns-0",
                &format!("extra-{i}"),
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 7000 + i}]}]}),
            ),
        );
        while generation() == before {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "change never enforced"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        took.push(written.elapsed());
    }
    eprintln!("watched policy change -> flows published: {took:?}");
}
