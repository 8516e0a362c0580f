//! Policy compiler at scale. Run: `cargo bench -p policy --bench compile`.
//!
//! A generated cluster of 10,000 pods in 1,000 namespaces with 10,000
//! NetworkPolicies (ten per namespace: default deny, allow from own namespace, from
//! labelled namespaces, from pod labels on a port, ipBlock with except, named
//! port, port range, egress to namespaces and DNS, egress ipBlock, namespace AND
//! pod selector). Before the timed benchmarks it prints the flow count and the
//! peak heap of one full compile, measured by a counting allocator.

#![allow(unsafe_code)] // the counting global allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use divan::Bencher;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::compile::{Change, Compiler};
use policy::model::{
    Cluster, NAMESPACE_NAME_LABEL, NamedPort, Namespace, ObjectKey, Pod, Policy, Protocol,
};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAMESPACES: usize = 1000;
const PODS_PER_NS: usize = 10;

fn labels(kv: &[(&str, String)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn pod_labels(j: usize, tier_db: bool) -> BTreeMap<String, String> {
    labels(&[
        ("app", format!("a{}", j % 5)),
        ("tier", if tier_db { "db".into() } else { "web".into() }),
    ])
}

fn policy_yaml(ns: &str, i: usize, j: usize) -> String {
    let team = format!("t{}", (i + 7) % 50);
    let body = match j {
        0 => "podSelector: {}\n  policyTypes: [Ingress]".to_string(),
        1 => "podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]".to_string(),
        2 => format!("podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: {team}}}}}}}]}}]"),
        3 => "podSelector: {matchLabels: {app: a0}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a3}}}], ports: [{port: 8080}]}]".to_string(),
        4 => "podSelector: {matchLabels: {tier: web}}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.16.5.0/24]}}], ports: [{port: 443}]}]".to_string(),
        5 => "podSelector: {matchLabels: {app: a1}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: a4}}}], ports: [{port: http}]}]".to_string(),
        6 => "podSelector: {matchLabels: {app: a2}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a2}}}], ports: [{port: 30000, endPort: 32767}]}]".to_string(),
        7 => format!(
            "podSelector: {{matchLabels: {{tier: web}}}}\n  egress: [{{to: [{{namespaceSelector: {{matchLabels: {{team: {team}}}}}}}]}}, {{to: [{{namespaceSelector: {{matchLabels: {{{NAMESPACE_NAME_LABEL}: ns-0}}}}}}], ports: [{{port: 53, protocol: UDP}}]}}]"
        ),
        8 => "podSelector: {matchLabels: {tier: db}}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: 5432}]}]".to_string(),
        _ => "podSelector: {matchLabels: {tier: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {tier: web}}}], ports: [{port: metrics}]}]".to_string(),
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{j}, namespace: {ns}}}\nspec:\n  {body}\n"
    )
}

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    for i in 0..NAMESPACES {
        let name = format!("ns-{i}");
        let mut l = labels(&[
            ("team", format!("t{}", i % 50)),
            (
                "env",
                if i % 2 == 0 {
                    "prod".into()
                } else {
                    "dev".into()
                },
            ),
        ]);
        l.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        c.upsert_namespace(Namespace {
            name: name.clone(),
            labels: l,
        });
        for j in 0..PODS_PER_NS {
            let k = i * PODS_PER_NS + j;
            c.upsert_pod(Pod {
                key: ObjectKey::new(&name, format!("pod-{j}")),
                labels: pod_labels(j, j % 3 == 0),
                ips: vec![
                    format!("10.{}.{}.{}", 100 + (k >> 16), (k >> 8) & 255, k & 255)
                        .parse()
                        .unwrap(),
                ],
                node: Some(format!("node-{}", k % 100)),
                ports: vec![
                    NamedPort {
                        name: "http".into(),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "metrics".into(),
                        port: 9090,
                        protocol: Protocol::Tcp,
                    },
                ],
            });
        }
        for j in 0..10 {
            let np: NetworkPolicy = serde_saphyr::from_str(&policy_yaml(&name, i, j)).unwrap();
            c.upsert_policy(Policy::from_api(&np).unwrap());
        }
    }
    c
}

fn main() {
    let c = cluster();
    assert_eq!(c.pods().count(), NAMESPACES * PODS_PER_NS);
    assert_eq!(c.policies().count(), NAMESPACES * 10);
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let compiler = Compiler::from_cluster(c.clone());
    let took = t.elapsed();
    let peak = PEAK.load(Relaxed) - base;
    let flows = compiler.flows();
    let conj: usize = flows.iter().filter(|f| f.is_conjunctive()).count();
    eprintln!(
        "scale: {} pods, {} namespaces, {} policies -> {} flows ({} conjunctive clause flows); one full compile {:.0} ms, peak heap {:.1} MiB",
        NAMESPACES * PODS_PER_NS,
        NAMESPACES,
        NAMESPACES * 10,
        flows.len(),
        conj,
        took.as_secs_f64() * 1e3,
        peak as f64 / (1 << 20) as f64
    );
    drop(flows);
    drop(compiler);
    divan::main();
}

#[divan::bench(sample_count = 5)]
fn full_compile_10k_pods_10k_policies(bencher: Bencher) {
    let c = cluster();
    bencher
        .with_inputs(|| c.clone())
        .bench_values(|c| black_box(Compiler::from_cluster(c).len()));
}

/// Relabels one pod (alternating two label sets): recompiles what it touches.
#[divan::bench(sample_count = 50)]
fn relabel_one_pod(bencher: Bencher) {
    let mut compiler = Compiler::from_cluster(cluster());
    let key = ObjectKey::new("ns-500", "pod-4");
    let mut pod = compiler.cluster().pod(&key).unwrap().clone();
    let mut flip = false;
    bencher.bench_local(|| {
        flip = !flip;
        pod.labels = pod_labels(if flip { 3 } else { 4 }, flip);
        let diff = compiler.apply(Change::Pod(pod.clone()));
        black_box(diff.len())
    });
}
