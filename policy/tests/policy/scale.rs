//! Flow counts grow with the sum of peers, selected pods and ports, not the product.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use policy::compile::{Compiler, Provenance};
use policy::model::{
    Cluster, Direction, NsSel, ObjectKey, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Rule,
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
        .filter(|f| f.priority == policy::compile::priority::DEFAULT_DENY)
        .count();
    assert_eq!(deny_flows, 1000, "one default-deny flow per isolated pod");
    assert_eq!(flows.len(), 2011 + 1000);
}
