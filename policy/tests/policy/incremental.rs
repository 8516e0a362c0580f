//! Applying any sequence of changes one at a time gives exactly the flows of a full
//! recompile, and the emitted diffs, applied to a table, give the same flows.

use std::collections::BTreeMap;

use datapath::field::Field;
use datapath::flow::{Action, FlowEntry};
use datapath::ofctl::format_match;
use datapath::{FlowTables, Time};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use policy::cnp::{ClusterPolicy, DomainName, RuleAction, Subject, Tier, TierPeer, TierRule};
use policy::compile::{Change, Compiler};
use policy::model::{
    NamedPort, Namespace, Node, NsSel, ObjectKey, Peer, Pod, Policy, PortRef, PortSpec, Protocol,
    Rule,
};
use policy::selector::Selector;
use proptest::prelude::*;

/// A flow with cookies and conjunction ids replaced by the names of the rules
/// that own them, which do not depend on allocation history.
fn normalize(c: &Compiler, f: &FlowEntry) -> String {
    let name = |id: u32| {
        let (owner, part) = c.conjunction_owner(id).expect("conjunction has an owner");
        format!("{owner}#{part}")
    };
    let mut m = f.matcher;
    let conj = m.get(Field::ConjId).0 as u32;
    m.set_masked(Field::ConjId, 0, 0);
    let conj = if conj != 0 {
        format!(",conj_id={}", name(conj))
    } else {
        String::new()
    };
    let mut actions: Vec<String> = f
        .actions
        .iter()
        .map(|a| match a {
            Action::Conjunction {
                id,
                clause,
                n_clauses,
            } => format!("conjunction({},{clause}/{n_clauses})", name(*id)),
            other => other.to_string(),
        })
        .collect();
    actions.sort();
    let cookie = c
        .provenance(f.cookie)
        .map(|p| p.to_string())
        .unwrap_or_default();
    format!(
        "table={},priority={},{}{conj},actions={},cookie={cookie}",
        f.table,
        f.priority,
        format_match(&m),
        actions.join(",")
    )
}

fn normalized(c: &Compiler, flows: impl IntoIterator<Item = FlowEntry>) -> Vec<String> {
    let mut v: Vec<String> = flows.into_iter().map(|f| normalize(c, &f)).collect();
    v.sort();
    v
}

fn sel(labels: &[(&'static str, &'static str)], exists: Option<&'static str>) -> Selector {
    let ls = LabelSelector {
        match_labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        match_expressions: exists.map(|k| {
            vec![LabelSelectorRequirement {
                key: k.into(),
                operator: "NotIn".into(),
                values: Some(vec!["db".into()]),
            }]
        }),
    };
    Selector::from_api(&ls, "test").unwrap()
}

fn arb_selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        Just(sel(&[], None)),
        Just(sel(&[("app", "web")], None)),
        Just(sel(&[("app", "db")], None)),
        Just(sel(&[("tier", "fe")], None)),
        Just(sel(&[], Some("app"))),
    ]
}

fn arb_ns_selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        Just(sel(&[], None)),
        Just(sel(&[("team", "red")], None)),
        Just(sel(&[("kubernetes.io/metadata.name", "b")], None)),
    ]
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        arb_selector().prop_map(|pods| Peer::Pods {
            namespaces: NsSel::Own,
            pods
        }),
        (arb_ns_selector(), arb_selector()).prop_map(|(n, pods)| Peer::Pods {
            namespaces: NsSel::Matching(n),
            pods
        }),
        (0u8..3, any::<bool>()).prop_map(|(ns, except)| {
            let cidr: IpNet = format!("10.{ns}.0.0/16").parse().unwrap();
            let except = if except {
                vec![format!("10.{ns}.0.0/30").parse().unwrap()]
            } else {
                vec![]
            };
            Peer::Block { cidr, except }
        }),
    ]
}

fn arb_port() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        Just(PortSpec {
            protocol: Protocol::Tcp,
            port: PortRef::Range { start: 80, end: 80 }
        }),
        Just(PortSpec {
            protocol: Protocol::Tcp,
            port: PortRef::Range {
                start: 8000,
                end: 8100
            }
        }),
        Just(PortSpec {
            protocol: Protocol::Udp,
            port: PortRef::Any
        }),
        Just(PortSpec {
            protocol: Protocol::Tcp,
            port: PortRef::Named("http".into())
        }),
        Just(PortSpec {
            protocol: Protocol::Udp,
            port: PortRef::Named("dns".into())
        }),
    ]
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop::option::of(prop::collection::vec(arb_peer(), 0..3)),
        prop::option::of(prop::collection::vec(arb_port(), 0..3)),
    )
        .prop_map(|(peers, ports)| Rule {
            peers: peers.filter(|p| !p.is_empty()),
            ports: ports.filter(|p| !p.is_empty()),
        })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        0u8..4,
        0u8..2,
        arb_selector(),
        prop::option::of(prop::collection::vec(arb_rule(), 0..3)),
        prop::option::of(prop::collection::vec(arb_rule(), 0..3)),
    )
        .prop_map(|(n, ns, pod_selector, ingress, egress)| Policy {
            key: ObjectKey::new(["a", "b"][ns as usize], format!("q{n}")),
            pod_selector,
            ingress,
            egress,
            staged: false,
        })
}

fn arb_pod() -> impl Strategy<Value = Pod> {
    (
        0u8..8,
        0u8..3,
        prop::sample::select(vec!["web", "db", "cache"]),
        any::<bool>(),
        any::<bool>(),
        0u8..2,
        0u8..4,
    )
        .prop_map(|(i, ns, app, fe, alt_port, node, stack)| {
            let mut labels = BTreeMap::from([("app".to_string(), app.to_string())]);
            if fe {
                labels.insert("tier".into(), "fe".into());
            }
            let ns_name = ["a", "b", "c"][ns as usize];
            Pod {
                key: ObjectKey::new(ns_name, format!("p{i}")),
                labels,
                // Mostly IPv4; some dual-stack, some IPv6-only.
                ips: match stack {
                    0 => vec![format!("fd00::{ns}:{}", i + 1).parse().unwrap()],
                    1 => vec![
                        format!("10.{ns}.0.{}", i + 1).parse().unwrap(),
                        format!("fd00::{ns}:{}", i + 1).parse().unwrap(),
                    ],
                    _ => vec![format!("10.{ns}.0.{}", i + 1).parse().unwrap()],
                },
                node: Some(format!("n{node}")),
                ports: vec![
                    NamedPort {
                        name: "http".into(),
                        port: if alt_port { 8080 } else { 80 },
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "dns".into(),
                        port: 53,
                        protocol: Protocol::Udp,
                    },
                ],
            }
        })
}

fn arb_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => arb_pod().prop_map(Change::Pod),
        1 => (0u8..3, 0u8..8).prop_map(|(ns, i)| Change::PodDeleted(ObjectKey::new(["a", "b", "c"][ns as usize], format!("p{i}")))),
        4 => arb_policy().prop_map(Change::Policy),
        1 => (0u8..2, 0u8..4).prop_map(|(ns, n)| Change::PolicyDeleted(ObjectKey::new(["a", "b"][ns as usize], format!("q{n}")))),
        2 => (0u8..3, any::<bool>()).prop_map(|(ns, red)| {
            let name = ["a", "b", "c"][ns as usize].to_string();
            let mut labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.clone())]);
            if red {
                labels.insert("team".into(), "red".into());
            }
            Change::Namespace(Namespace { name, labels })
        }),
        1 => (0u8..3).prop_map(|ns| Change::NamespaceDeleted(["a", "b", "c"][ns as usize].to_string())),
        1 => (0u8..2, any::<bool>()).prop_map(|(n, red)| Change::Node(Node {
            name: format!("n{n}"),
            labels: if red { BTreeMap::from([("team".to_string(), "red".to_string())]) } else { BTreeMap::new() },
            addresses: vec![format!("192.168.0.{}", n + 1).parse().unwrap()],
            pod_cidrs: vec![],
        })),
        3 => arb_cluster_policy().prop_map(Change::ClusterPolicy),
        1 => (0u8..3).prop_map(|n| Change::ClusterPolicyDeleted(format!("c{n}"))),
        1 => (0u8..2, prop::collection::btree_set(0u8..3, 0..3)).prop_map(|(n, ips)| Change::Resolved {
            name: ["api.example.com", "example.org"][n as usize].into(),
            addresses: ips.into_iter().map(|i| format!("203.0.113.{i}").parse().unwrap()).collect(),
        }),
        1 => (0u8..2).prop_map(|n| Change::NodeDeleted(format!("n{n}"))),
    ]
}

fn arb_tier_peer() -> impl Strategy<Value = TierPeer> {
    prop_oneof![
        (arb_ns_selector(), arb_selector())
            .prop_map(|(namespaces, pods)| TierPeer::Pods { namespaces, pods }),
        prop_oneof![Just(sel(&[], None)), Just(sel(&[("team", "red")], None))]
            .prop_map(TierPeer::Nodes),
        (0u8..3)
            .prop_map(|ns| TierPeer::Networks(vec![format!("10.{ns}.0.0/16").parse().unwrap()])),
        any::<bool>().prop_map(|w| TierPeer::Domains(vec![
            DomainName::parse(if w { "*.example.com" } else { "example.org" }).unwrap()
        ])),
    ]
}

fn arb_tier_rule() -> impl Strategy<Value = TierRule> {
    (
        prop::sample::select(vec![RuleAction::Accept, RuleAction::Deny, RuleAction::Pass]),
        prop::collection::vec(arb_tier_peer(), 1..3),
        prop::option::of(prop::collection::vec(arb_port(), 1..3)),
        0u8..8,
    )
        .prop_map(|(action, peers, ports, fail)| {
            let named = ports
                .iter()
                .flatten()
                .any(|p| matches!(p.port, PortRef::Named(_)));
            let mut peers = peers;
            // The API's rules: named ports only with pod peers, domain names only in Accept.
            if named {
                peers.retain(|p| matches!(p, TierPeer::Pods { .. }));
            }
            if action != RuleAction::Accept {
                peers.retain(|p| !matches!(p, TierPeer::Domains(_)));
            }
            if peers.is_empty() {
                peers.push(TierPeer::Pods {
                    namespaces: sel(&[], None),
                    pods: sel(&[], None),
                });
            }
            TierRule {
                name: None,
                action,
                peers,
                ports,
                fail_closed: (fail == 0).then(|| "test: a peer not understood".to_string()),
            }
        })
}

fn arb_cluster_policy() -> impl Strategy<Value = ClusterPolicy> {
    (
        0u8..3,
        any::<bool>(),
        0u16..3,
        arb_ns_selector(),
        arb_selector(),
        prop::collection::vec(arb_tier_rule(), 0..3),
        prop::collection::vec(arb_tier_rule(), 0..3),
    )
        .prop_map(
            |(n, admin, priority, namespaces, pods, ingress, egress)| ClusterPolicy {
                name: format!("c{n}"),
                tier: if admin { Tier::Admin } else { Tier::Baseline },
                priority,
                subject: Subject { namespaces, pods },
                ingress: ingress
                    .into_iter()
                    .map(|mut r| {
                        r.peers.retain(|p| matches!(p, TierPeer::Pods { .. }));
                        if r.peers.is_empty() {
                            r.peers.push(TierPeer::Pods {
                                namespaces: sel(&[], None),
                                pods: sel(&[], None),
                            });
                        }
                        r
                    })
                    .collect(),
                egress,
                warnings: vec![],
                staged: false,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn incremental_equals_full_recompile(
        changes in prop::collection::vec(arb_change(), 1..25),
        node in prop::option::of(prop::sample::select(vec!["n0", "n1"])),
    ) {
        // Unscoped (offline), or compiled for one node (a switch).
        let mut inc = Compiler::new();
        inc.rescope(node.map(str::to_string));
        let mut table = FlowTables::new();
        for change in changes {
            let diff = inc.apply(change.clone());
            for id in &diff.deleted {
                prop_assert!(table.remove(id), "diff deletes a flow that is not there: {change:?}");
            }
            for f in diff.added.iter().chain(&diff.modified) {
                table.add(f.clone(), Time::ZERO).unwrap();
            }
            let full = Compiler::from_cluster(inc.cluster().clone());
            let want = normalized(&full, full.flows());
            prop_assert_eq!(&normalized(&inc, inc.flows()), &want, "after {:?}", change);
            let applied = normalized(&inc, table.iter().map(|(_, f)| (*f.entry).clone()));
            prop_assert_eq!(&applied, &want, "diffs applied to a table, after {:?}", change);
        }
    }
}
