//! A synthetic cluster for benchmarks and scale tests.
//!
//! Namespaces of pods with ten NetworkPolicies each, of a mixed kind: default
//! deny, allow from own namespace, from labelled namespaces, from pod labels on a
//! port, ipBlock with except, named port, port range, egress to namespaces and
//! DNS, egress ipBlock, namespace AND pod selector. Deterministic.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::cluster::Cluster;
use crate::model::{NAMESPACE_NAME_LABEL, NamedPort, Namespace, ObjectKey, Pod, Policy, Protocol};

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

/// The `i`th of a mix of ClusterNetworkPolicies, as admins write them:
/// tenant (team) isolation, shared monitoring, cloud metadata blocked, egress
/// allow-lists by domain, same-team Pass, node access, named-port access and a
/// Baseline default deny per team.
fn cluster_policy_yaml(i: usize) -> String {
    let team = format!("t{}", i % 50);
    let prio = i % 1000;
    let (tier, body) = match i % 8 {
        0 => (
            "Admin",
            format!(
                "subject: {{namespaces: {{matchLabels: {{team: {team}}}}}}}\n  ingress: [{{name: other-teams, action: Deny, from: [{{namespaces: {{matchExpressions: [{{key: team, operator: NotIn, values: [{team}]}}]}}}}]}}]"
            ),
        ),
        1 => (
            "Admin",
            format!(
                "subject: {{namespaces: {{matchLabels: {{team: {team}}}}}}}\n  ingress: [{{name: monitoring, action: Accept, from: [{{pods: {{namespaceSelector: {{matchLabels: {{{NAMESPACE_NAME_LABEL}: ns-0}}}}, podSelector: {{matchLabels: {{app: a0}}}}}}}}], protocols: [{{tcp: {{destinationPort: {{number: 9090}}}}}}]}}]"
            ),
        ),
        2 => (
            "Admin",
            format!(
                "subject: {{namespaces: {{matchLabels: {{team: {team}}}}}}}\n  egress: [{{name: metadata, action: Deny, to: [{{networks: [169.254.169.254/32, 'fd00:ec2::254/128']}}]}}]"
            ),
        ),
        3 => (
            "Admin",
            format!(
                "subject: {{pods: {{namespaceSelector: {{matchLabels: {{team: {team}}}}}, podSelector: {{matchLabels: {{tier: web}}}}}}}}\n  egress: [{{name: apis, action: Accept, to: [{{domainNames: ['*.example.com', api.github.com]}}], protocols: [{{tcp: {{destinationPort: {{number: 443}}}}}}]}}, {{name: internet, action: Deny, to: [{{networks: [0.0.0.0/0]}}]}}]"
            ),
        ),
        4 => (
            "Admin",
            format!(
                "subject: {{namespaces: {{matchLabels: {{team: {team}}}}}}}\n  ingress: [{{name: same-team, action: Pass, from: [{{namespaces: {{matchLabels: {{team: {team}}}}}}}]}}]"
            ),
        ),
        5 => (
            "Baseline",
            format!(
                "subject: {{namespaces: {{matchLabels: {{team: {team}}}}}}}\n  egress: [{{name: nodes, action: Deny, to: [{{nodes: {{matchLabels: {{kubernetes.io/os: linux}}}}}}]}}]"
            ),
        ),
        6 => (
            "Admin",
            format!(
                "subject: {{pods: {{namespaceSelector: {{matchLabels: {{team: {team}}}}}, podSelector: {{matchLabels: {{tier: db}}}}}}}}\n  ingress: [{{name: web-to-db, action: Accept, from: [{{pods: {{namespaceSelector: {{matchLabels: {{team: {team}}}}}, podSelector: {{matchLabels: {{tier: web}}}}}}}}], protocols: [{{destinationNamedPort: http}}]}}]"
            ),
        ),
        _ => (
            "Baseline",
            format!(
                "subject: {{namespaces: {{matchLabels: {{team: {team}}}}}}}\n  ingress: [{{name: default-deny, action: Deny, from: [{{namespaces: {{}}}}]}}]"
            ),
        ),
    };
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: cnp-{i}}}\nspec:\n  tier: {tier}\n  priority: {prio}\n  {body}\n"
    )
}

/// `n` ClusterNetworkPolicies of the mix above (see [`cluster`] for the
/// namespaces and teams they select).
pub fn cluster_policies(n: usize) -> Vec<crate::cnp::ClusterPolicy> {
    (0..n)
        .map(|i| {
            let v: serde_json::Value = serde_saphyr::from_str(&cluster_policy_yaml(i))
                .expect("generated cluster policy parses");
            crate::cnp::ClusterPolicy::from_value(&v).expect("generated cluster policy is valid")
        })
        .collect()
}

/// The same cluster as [`cluster`], as manifest files (one per namespace: the
/// Namespace, its Pods and its NetworkPolicies), for starting a switch on it.
/// Pods on `node-{k % 100}`; none on the node a switch calls its own unless
/// it is named so.
pub fn manifests(namespaces: usize, pods_per_ns: usize) -> Vec<(String, String)> {
    let c = cluster(namespaces, pods_per_ns);
    let mut files = Vec::with_capacity(namespaces);
    for i in 0..namespaces {
        let ns = format!("ns-{i}");
        let labels = c.namespace_labels(&ns);
        let mut out =
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n");
        for (k, v) in labels
            .iter()
            .filter(|(k, _)| k.as_str() != NAMESPACE_NAME_LABEL)
        {
            out += &format!("    {k}: {v}\n");
        }
        for pod in c.pods_in(&ns) {
            out += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {ns}\n  labels:\n",
                pod.key.name
            );
            for (k, v) in &pod.labels {
                out += &format!("    {k}: {v}\n");
            }
            out += &format!(
                "spec:\n  nodeName: {}\n  containers:\n  - name: app\n    image: app\n    ports:\n",
                pod.node.as_deref().unwrap_or_default()
            );
            for p in &pod.ports {
                out += &format!("    - {{name: {}, containerPort: {}}}\n", p.name, p.port);
            }
            out += &format!("status:\n  podIP: {}\n", pod.ips[0]);
        }
        for j in 0..10 {
            out += "---\n";
            out += &policy_yaml(&ns, i, j);
        }
        files.push((format!("{ns}.yaml"), out));
    }
    files
}
