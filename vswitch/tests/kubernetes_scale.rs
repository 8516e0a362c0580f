//! Scale, measured: the synthetic cluster of BENCHMARKS.md (10,000 pods in
//! 1,000 namespaces, 10,000 NetworkPolicies, 100 Nodes), served by the test
//! API server (Kubernetes mode) or written to a manifest directory; how long
//! vswitchd takes to be ready, the memory it holds, and how long a policy or
//! label change takes to be enforced (100 changes: p50, p99, max). 100 of the
//! pods run on this node. A measurement, run by hand (root):
//!
//!   cargo test --release -p vswitch --test kubernetes_scale -- --ignored --nocapture --test-threads 1

mod apiserver;
mod common;
mod kubenode;

use std::time::{Duration, Instant};

/// How many changes each test makes and times.
const CHANGES: usize = 100;

/// "p50 …, p99 …, max …" of `took`.
fn spread(mut took: Vec<Duration>) -> String {
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:?}, p99 {:?}, max {:?} ({} changes)",
        at(0.5),
        at(0.99),
        took[took.len() - 1],
        took.len()
    )
}

/// Peak resident memory of `pid`.
fn peak_of(pid: Option<u32>) -> String {
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Waits until `ready` (five minutes at most); how long since `started`.
fn wait_ready(started: Instant, ready: impl Fn() -> bool) -> Duration {
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(300), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// The number of flows a switch holds.
fn flow_count(ask: impl Fn(&Request) -> Result<Value, String>) -> usize {
    ask(&Request::DumpFlows)
        .unwrap()
        .as_array()
        .map_or(0, Vec::len)
}

/// Times `CHANGES` changes made by `change(i)`: from the change to the
/// publish of a new generation (read from `generation`).
fn time_changes(generation: impl Fn() -> u64, mut change: impl FnMut(usize)) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..CHANGES {
        let before = generation();
        let written = Instant::now();
        change(i);
        while generation() == before {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "change {i} never enforced"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        took.push(written.elapsed());
    }
    took
}

use apiserver::{ApiServer, Kind};
use control::Request;
use kubenode::{node, policy, start};
use serde_json::{Value, json};

/// A pod of this node: the label changes flip its `tier` (db or web, which
/// policies select).
fn local_pod(docs: &[Value], node: &str) -> Value {
    docs.iter()
        .find(|d| d["kind"] == "Pod" && d["spec"]["nodeName"] == node)
        .cloned()
        .expect("a pod on this node")
}

#[test]
#[ignore = "a measurement: run by hand (see the module's doc)"]
fn ten_thousand_pods_and_policies() {
    if !common::privileged("vsw-kscale") {
        return;
    }
    let api = ApiServer::start();
    let mut objects = 0;
    let mut docs = Vec::new();
    for (_, text) in policy::synthetic::manifests(1000, 10) {
        // This node is node-a: the pods of node-0 run here.
        let text = text.replace("nodeName: node-0\n", "nodeName: node-a\n");
        docs.extend(serde_saphyr::from_multiple::<Value>(&text).unwrap());
    }
    let relabelled = local_pod(&docs, "node-a");
    for doc in docs {
        let kind = match doc["kind"].as_str() {
            Some("Namespace") => Kind::Namespace,
            Some("Pod") => Kind::Pod,
            Some("NetworkPolicy") => Kind::NetworkPolicy,
            other => panic!("unexpected kind {other:?}"),
        };
        api.apply(kind, doc);
        objects += 1;
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
    let ready = wait_ready(started, || node.ready());
    let flows = flow_count(|r| node.ask(r));
    let peak = peak_of(node.daemon.pid());
    eprintln!("{objects} objects and 100 Nodes: ready after {ready:?}, {flows} flows, {peak}");

    // Watched changes, enforced when their generation is published: a new
    // policy selecting this node's pods, then a label change of one of them.
    let generation = || {
        node.ask(&Request::Stats).unwrap()["realisation"]["generation"]
            .as_u64()
            .unwrap()
    };
    let took = time_changes(generation, |i| {
        if i % 2 == 0 {
            api.apply(
                Kind::NetworkPolicy,
                policy(
                    "ns-0",
                    &format!("extra-{i}"),
                    json!({"podSelector": {}, "ingress": [{"ports": [{"port": 7000 + i}]}]}),
                ),
            );
        } else {
            let mut pod = relabelled.clone();
            if i % 4 == 1 {
                let tier = &mut pod["metadata"]["labels"]["tier"];
                *tier = json!(if *tier == "db" { "web" } else { "db" });
            }
            api.apply(Kind::Pod, pod);
        }
    });
    eprintln!(
        "watched policy or label change -> flows published: {}",
        spread(took)
    );
}

/// The same cluster from a manifest directory (one file per namespace), this
/// node being node-0.
#[test]
#[ignore = "a measurement: run by hand (see the module's doc)"]
fn ten_thousand_pods_and_policies_from_manifests() {
    if !common::privileged("vsw-mscale") {
        return;
    }
    let dir = common::TempDir::new("mscale");
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let files = policy::synthetic::manifests(1000, 10);
    for (name, text) in &files {
        std::fs::write(manifests.join(name), text).unwrap();
    }
    let (ns0_name, ns0) = files
        .iter()
        .find(|(name, _)| name == "ns-0.yaml")
        .cloned()
        .expect("ns-0.yaml");
    let (config, socket) = common::write_config(&dir.0, "node_name = \"node-0\"\n");
    let started = Instant::now();
    let daemon = common::Vswitchd::start(&config, &socket);
    let ready = wait_ready(started, || daemon.ready());
    let flows = flow_count(|r| daemon.ask(r));
    eprintln!(
        "{} manifest files: ready after {ready:?}, {flows} flows, {}",
        files.len(),
        peak_of(daemon.pid())
    );
    let generation = || {
        daemon.ask(&Request::Stats).unwrap()["realisation"]["generation"]
            .as_u64()
            .unwrap()
    };
    // A pod of node-0 in ns-0, whose labels the odd changes rewrite.
    let docs: Vec<Value> = serde_saphyr::from_multiple(&ns0).unwrap();
    let pod = local_pod(&docs, "node-0");
    let labels = |tier: &str| {
        format!(
            "name: {}\n  namespace: ns-0\n  labels:\n    app: {}\n    tier: {tier}\n",
            pod["metadata"]["name"].as_str().unwrap(),
            pod["metadata"]["labels"]["app"].as_str().unwrap(),
        )
    };
    let tier = pod["metadata"]["labels"]["tier"].as_str().unwrap();
    let (original, flipped) = (
        labels(tier),
        labels(if tier == "db" { "web" } else { "db" }),
    );
    assert!(
        ns0.contains(&original),
        "the pod's labels are in {ns0_name}"
    );
    let took = time_changes(generation, |i| {
        if i % 2 == 0 {
            let text = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: extra-{i}, namespace: ns-0}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: [{{port: {}}}]}}]\n",
                7000 + i
            );
            let tmp = manifests.join(format!(".extra-{i}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, manifests.join(format!("extra-{i}.yaml"))).unwrap();
        } else {
            // The pod's tier flipped, then back, in its namespace's file.
            let text = if i % 4 == 1 {
                ns0.replace(&original, &flipped)
            } else {
                ns0.clone()
            };
            let tmp = manifests.join(".ns-0.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, manifests.join(&ns0_name)).unwrap();
        }
    });
    eprintln!(
        "policy or label change in a file -> flows published: {}",
        spread(took)
    );
}
