//! Flow counts grow with the sum of peers, selected pods and ports, not the product.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use policy::cluster::Cluster;
use policy::compile::{Compiler, Provenance};
use policy::model::{
    Direction, NsSel, ObjectKey, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Rule,
};
use policy::selector::Selector;

fn sel(k: &str, v: &str) -> Selector {
    let ls = LabelSelector {
        match_labels: Some(BTreeMap::from([(k.to_string(), v.to_string())])),
        match_expressions: None,
    };
    Selector::from_api(&ls, "test").unwrap()
}

#[test]
fn thousand_peers_thousand_pods_ten_ports_is_a_sum() {
    let mut c = Cluster::default();
    for i in 0..2000u32 {
        let app = if i < 1000 { "server" } else { "client" };
        c.upsert_pod(Pod {
            key: ObjectKey::new("big", format!("p{i}")),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            ips: vec![format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap()],
            node: None,
            ports: vec![],
        });
    }
    let ports = (0..10)
        .map(|i| PortSpec {
            protocol: Protocol::Tcp,
            port: PortRef::Range {
                start: 8000 + i,
                end: 8000 + i,
            },
        })
        .collect();
    let key = ObjectKey::new("big", "servers");
    c.upsert_policy(Policy {
        key: key.clone(),
        pod_selector: sel("app", "server"),
        ingress: Some(vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: NsSel::Own,
                pods: sel("app", "client"),
            }]),
            ports: Some(ports),
        }]),
        egress: None,
        staged: false,
    });
    let compiler = Compiler::from_cluster(c);
    let rule = Provenance::Rule {
        policy: key,
        direction: Direction::Ingress,
        index: 0,
    };
    let cookie = compiler.cookie(&rule).unwrap();
    let flows = compiler.flows();
    let rule_flows = flows.iter().filter(|f| f.cookie == cookie).count();
    assert_eq!(
        rule_flows,
        1000 + 1000 + 10 + 1,
        "selected + peers + ports + conj_id"
    );
    let deny_flows = flows
        .iter()
        .filter(|f| f.priority == policy::tables::priority::DEFAULT_DENY)
        .count();
    assert_eq!(deny_flows, 1000, "one default-deny flow per isolated pod");
    assert_eq!(flows.len(), 2011 + 1000);
}

#[test]
fn equivalent_rules_share_flows_and_traces_name_the_right_one() {
    use policy::offline::Offline;
    use policy::probe::{Endpoint, L4};
    let mut c = Cluster::default();
    for (name, app, ip) in [
        ("a", "web", "10.0.0.1"),
        ("b", "db", "10.0.0.2"),
        ("c", "client", "10.0.0.3"),
    ] {
        c.upsert_pod(Pod {
            key: ObjectKey::new("ns", name),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            ips: vec![ip.parse().unwrap()],
            node: None,
            ports: vec![],
        });
    }
    // Two policies, same rule (from app=client on 80), different pods selected.
    for (policy, app) in [("allow-web", "web"), ("allow-db", "db")] {
        c.upsert_policy(Policy {
            key: ObjectKey::new("ns", policy),
            pod_selector: sel("app", app),
            ingress: Some(vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NsSel::Own,
                    pods: sel("app", "client"),
                }]),
                ports: Some(vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortRef::Range { start: 80, end: 80 },
                }]),
            }]),
            egress: None,
            staged: false,
        });
    }
    let o = Offline::new(c).unwrap();
    let rule = |p: &str| Provenance::Rule {
        policy: ObjectKey::new("ns", p),
        direction: Direction::Ingress,
        index: 0,
    };
    assert_eq!(
        o.compiler.cookie(&rule("allow-web")),
        o.compiler.cookie(&rule("allow-db")),
        "one conjunction"
    );
    let flows = o.compiler.flows();
    assert_eq!(
        flows.iter().filter(|f| f.priority == 300).count(),
        2 + 1 + 1 + 1,
        "2 selected + 1 peer + 1 port + conj_id"
    );
    let client = Endpoint::Pod("ns/c".parse().unwrap());
    let to = |p: &str| {
        o.trace(&client, &Endpoint::Pod(p.parse().unwrap()), L4::Tcp(80))
            .unwrap()
            .verdict
    };
    assert_eq!(to("ns/a").rule, "ns/allow-web ingress rule 0");
    assert_eq!(to("ns/b").rule, "ns/allow-db ingress rule 0");
}
