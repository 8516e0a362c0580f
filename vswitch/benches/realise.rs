//! Policy realisation in the switch: a cluster change compiled and its flows
//! published to the packet threads. Run: `cargo bench -p vswitch --bench realise`.
//!
//! The cluster is the policy compiler's scale cluster (10,000 pods in 1,000
//! namespaces, 10,000 NetworkPolicies, ~69k flows). Each iteration is one change
//! as vswitchd applies it: compile the diff, copy the published tables, apply
//! the diff, swap the snapshot.

use std::hint::black_box;

use datapath::DatapathConfig;
use divan::Bencher;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::compile::Change;
use policy::model::{ObjectKey, Policy};
use policy::synthetic::{cluster, pod_labels};
use vswitch::Realiser;

fn main() {
    let t = std::time::Instant::now();
    let switch = Realiser::with_cluster(DatapathConfig::default(), cluster(1000, 10)).unwrap();
    let r = switch.realisation();
    eprintln!(
        "initial realisation: {} flows, compile {:.0} ms, publish {:.0} ms, total {:.0} ms",
        switch.datapath().stats().flows,
        r.compile.as_secs_f64() * 1e3,
        r.publish.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    divan::main();
}

/// Relabels one pod (alternating two label sets) and publishes the result.
#[divan::bench(sample_count = 30)]
fn relabel_one_pod(bencher: Bencher) {
    let switch = Realiser::with_cluster(DatapathConfig::default(), cluster(1000, 10)).unwrap();
    let key = ObjectKey::new("ns-500", "pod-4");
    let mut pod = switch
        .with_compiler(|c| c.cluster().pod(&key).cloned())
        .unwrap();
    let mut flip = false;
    bencher.bench_local(|| {
        flip = !flip;
        pod.labels = pod_labels(if flip { 3 } else { 4 }, flip);
        black_box(switch.apply(Change::Pod(pod.clone())).unwrap())
    });
    let r = switch.realisation();
    eprintln!(
        "last relabel: {} flows changed, compile {} µs, publish {} µs",
        r.flows_changed,
        r.compile.as_micros(),
        r.publish.as_micros()
    );
}

/// Adds a policy, then deletes it (two realisations per iteration).
#[divan::bench(sample_count = 30)]
fn add_then_delete_policy(bencher: Bencher) {
    let switch = Realiser::with_cluster(DatapathConfig::default(), cluster(1000, 10)).unwrap();
    let np: NetworkPolicy = serde_saphyr::from_str(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: extra, namespace: ns-42}\n\
         spec: {podSelector: {matchLabels: {app: a1}}, ingress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}}], ports: [{port: 9443}]}]}\n",
    )
    .unwrap();
    let policy = Policy::from_api(&np).unwrap();
    bencher.bench_local(|| {
        switch.apply(Change::Policy(policy.clone())).unwrap();
        black_box(
            switch
                .apply(Change::PolicyDeleted(policy.key.clone()))
                .unwrap(),
        )
    });
    switch.apply(Change::Policy(policy.clone())).unwrap();
    let r = switch.realisation();
    eprintln!(
        "policy add: {} flows changed, compile {} µs, publish {} µs",
        r.flows_changed,
        r.compile.as_micros(),
        r.publish.as_micros()
    );
}
