//! A synthetic cluster for benchmarks and scale tests.
//!
//! Namespaces of pods with ten NetworkPolicies each, of a mixed kind: default
//! deny, allow from own namespace, from labelled namespaces, from pod labels on a
//! port, ipBlock with except, named port, port range, egress to namespaces and
//! DNS, egress ipBlock, namespace AND pod selector. Deterministic.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::model::{
    Cluster, NAMESPACE_NAME_LABEL, NamedPort, Namespace, ObjectKey, Pod, Policy, Protocol,
};

fn labels(kv: &[(&str, String)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// Labels of the `j`th pod of a namespace (`app: a{j%5}`, `tier: db|web`).
pub fn pod_labels(j: usize, tier_db: bool) -> BTreeMap<String, String> {
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

/// `namespaces` namespaces of `pods_per_ns` pods each, ten policies per namespace.
pub fn cluster(namespaces: usize, pods_per_ns: usize) -> Cluster {
    let mut c = Cluster::default();
    for i in 0..namespaces {
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
        for j in 0..pods_per_ns {
            let k = i * pods_per_ns + j;
            c.upsert_pod(Pod {
                key: ObjectKey::new(&name, format!("pod-{j}")),
                labels: pod_labels(j, j % 3 == 0),
                ips: vec![
                    format!("10.{}.{}.{}", 100 + (k >> 16), (k >> 8) & 255, k & 255)
                        .parse()
                        .expect("generated address"),
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
            let np: NetworkPolicy =
                serde_saphyr::from_str(&policy_yaml(&name, i, j)).expect("generated policy parses");
            c.upsert_policy(Policy::from_api(&np).expect("generated policy is valid"));
        }
    }
    c
}
