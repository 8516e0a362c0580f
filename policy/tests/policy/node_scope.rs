//! Per-node compilation: a node compiles the rules of its own pods (other
//! pods are only peers, addresses), and decides its pods' connections exactly
//! as the whole cluster's rules do.

use policy::cluster::Cluster;
use policy::compile::{Change, Compiler};
use policy::offline::Offline;
use policy::probe::L4;

/// The synthetic cluster with its pods on two nodes, alternately.
fn two_nodes(namespaces: usize, pods: usize) -> Cluster {
    let mut c = policy::synthetic::cluster(namespaces, pods);
    let all: Vec<_> = c.pods().cloned().collect();
    for (i, mut pod) in all.into_iter().enumerate() {
        pod.node = Some(if i % 2 == 0 { "node-a" } else { "node-b" }.to_string());
        c.upsert_pod(pod);
    }
    c
}

#[test]
fn a_node_decides_its_own_pods_connections_as_the_whole_cluster_does() {
    let cluster = two_nodes(12, 4);
    let full = Offline::new(cluster.clone()).unwrap();
    let mut scoped_cluster = cluster.clone();
    scoped_cluster.set_scope(Some("node-a".into()));
    let scoped = Offline::new(scoped_cluster).unwrap();
    let on_a = |k: &policy::model::ObjectKey| {
        cluster.pod(k).and_then(|p| p.node.as_deref()) == Some("node-a")
    };
    let mut compared = 0;
    let mut remote_only_differs = false;
    for l4 in [L4::Tcp(8080), L4::Tcp(443), L4::Tcp(9090), L4::Udp(53)] {
        let (want, got) = (full.reachability(l4), scoped.reachability(l4));
        assert_eq!(want.len(), got.len());
        for (w, g) in want.iter().zip(&got) {
            assert_eq!((&w.from, &w.to), (&g.from, &g.to));
            if on_a(&w.from) && on_a(&w.to) {
                assert_eq!(
                    w.verdict.allowed, g.verdict.allowed,
                    "{} -> {} {l4:?}: {} vs {}",
                    w.from, w.to, w.verdict.rule, g.verdict.rule
                );
                compared += 1;
            }
            if !on_a(&w.from) && !on_a(&w.to) && !w.verdict.allowed && g.verdict.allowed {
                remote_only_differs = true;
                // A trace here says where that connection is decided.
                assert!(
                    g.verdict.rule.contains("runs on node-b"),
                    "{}",
                    g.verdict.rule
                );
            }
        }
    }
    assert!(compared > 1000, "{compared} pairs compared");
    assert!(
        remote_only_differs,
        "another node's pods' rules are not compiled here"
    );
}

#[test]
fn a_node_holds_far_fewer_flows_than_the_cluster() {
    let cluster = two_nodes(40, 10);
    let full = Compiler::from_cluster(cluster.clone());
    let mut c = cluster;
    c.set_scope(Some("node-a".into()));
    let scoped = Compiler::from_cluster(c);
    assert!(
        scoped.len() * 10 < full.len() * 7,
        "half the pods: {} flows against {}",
        scoped.len(),
        full.len()
    );
    // And a node with no pods holds next to nothing of the policies.
    let mut none = two_nodes(40, 10);
    none.set_scope(Some("node-z".into()));
    let empty = Compiler::from_cluster(none);
    assert!(
        empty.len() < 50,
        "{} flows on a node without pods",
        empty.len()
    );
}

#[test]
fn rescoping_and_moving_a_pod_here_give_the_flows_of_a_fresh_compile() {
    let cluster = two_nodes(10, 4);
    let mut c = Compiler::from_cluster(cluster.clone());
    let diff = c.rescope(Some("node-b".into()));
    assert!(!diff.deleted.is_empty(), "node-a's pods' rules go");
    let mut want = cluster.clone();
    want.set_scope(Some("node-b".into()));
    assert_eq!(sorted(&c), sorted(&Compiler::from_cluster(want.clone())));
    // A pod scheduled here gets its rules; moved away, it loses them.
    let mut pod = cluster
        .pods()
        .find(|p| p.node.as_deref() == Some("node-a"))
        .unwrap()
        .clone();
    pod.node = Some("node-b".into());
    let added = c.apply(Change::Pod(pod.clone()));
    assert!(!added.is_empty());
    want.upsert_pod(pod);
    assert_eq!(sorted(&c), sorted(&Compiler::from_cluster(want)));
}

#[test]
fn many_changes_at_once_compile_whole_and_match_one_at_a_time() {
    let cluster = two_nodes(30, 5);
    let changes = || {
        let mut out: Vec<Change> = cluster
            .namespace_names()
            .map(|n| Change::Namespace(cluster.namespace(n).unwrap().clone()))
            .collect();
        out.extend(cluster.pods().cloned().map(Change::Pod));
        out.extend(cluster.policies().cloned().map(Change::Policy));
        out
    };
    assert!(changes().len() > 256, "takes the bulk path");
    let mut one_by_one = Compiler::new();
    one_by_one.rescope(Some("node-a".into()));
    for change in changes() {
        one_by_one.apply(change);
    }
    let mut bulk = Compiler::new();
    bulk.rescope(Some("node-a".into()));
    let diff = bulk.apply_all(changes());
    assert_eq!(diff.added.len(), bulk.len());
    assert_eq!(sorted(&bulk), sorted(&one_by_one));
}

/// The flows, as text without allocation-dependent ids.
fn sorted(c: &Compiler) -> Vec<String> {
    let mut v: Vec<String> = c
        .flows()
        .iter()
        .map(|f| {
            let rule = c
                .provenance(f.cookie)
                .map(|p| p.to_string())
                .unwrap_or_default();
            let conj = !f.matcher.has(datapath::field::Field::ConjId);
            let actions: Vec<String> = f
                .actions
                .iter()
                .filter(|a| !matches!(a, datapath::flow::Action::Conjunction { .. }))
                .map(|a| a.to_string())
                .collect();
            format!(
                "{} {} {} {} {rule} {conj} n_actions={}",
                f.table,
                f.priority,
                datapath::ofctl::format_match(&{
                    let mut m = f.matcher;
                    m.set_masked(datapath::field::Field::ConjId, 0, 0);
                    m
                }),
                actions.join(","),
                f.actions.len()
            )
        })
        .collect();
    v.sort();
    v
}
