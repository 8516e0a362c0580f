//! vswitchd fed by a Kubernetes API server (tests/apiserver: the real list/watch
//! protocol): initial sync and readiness, pod add/relabel/delete, policy
//! add/update/delete, namespace relabel, a dropped watch, 410 Gone, and the API
//! server going away, each converging to the right verdicts on the live switch.
//! Pods are TAP devices in the host namespace (root, as in CI).

mod apiserver;
mod common;
mod kubenode;

use std::process::Command;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, Kind};
use common::{Netns, privileged};
use control::Request;
use kubenode::{node, ns, pod, policy, start};
use serde_json::{Value, json};

#[test]
fn vswitchd_converges_on_what_the_api_server_says() {
    if !privileged(&format!("vsk{}x", std::process::id() % 10_000)) {
        return;
    }
    let api = ApiServer::start();
    // Down at first: vswitchd must not report ready before its first sync.
    api.set_down(true);
    api.apply(Kind::Namespace, ns("app", json!({"team": "a"})));
    api.apply(Kind::Namespace, ns("other", json!({})));
    api.apply(Kind::Node, node("node-a", "192.168.7.1", "10.60.0.0/24"));
    api.apply(Kind::Node, node("node-b", "192.168.7.2", "10.60.1.0/24"));
    api.apply(
        Kind::Pod,
        pod("app", "web", json!({"app": "web"}), "node-a", "10.60.0.1"),
    );
    api.apply(
        Kind::Pod,
        pod("app", "db", json!({"app": "db"}), "node-a", "10.60.0.2"),
    );
    api.apply(
        Kind::Pod,
        pod(
            "other",
            "client",
            json!({"app": "client"}),
            "node-b",
            "10.60.1.1",
        ),
    );
    api.apply(
        Kind::NetworkPolicy,
        policy(
            "app",
            "db",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "pg"}]}]}),
        ),
    );

    let dir = std::env::temp_dir().join(format!("vswitch-k8s-{}", std::process::id()));
    let mut node_a = start(&api, &dir, "", "");
    node_a.attach("app/web", "10.60.0.1");
    node_a.attach("app/db", "10.60.0.2");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!node_a.ready(), "not ready before the API server answered");
    // Attached before their Pod objects are known: cut off (fail closed), no
    // flow forwards from or to them.
    let (v, r) = node_a.verdict("app/web", "app/db", 5432);
    assert_eq!(v, "error", "{r}");
    assert!(node_a.flows_mentioning("10.60.0.").is_empty());

    // Initial sync.
    api.set_down(false);
    let t = Instant::now();
    while !node_a.ready() {
        assert!(t.elapsed() < Duration::from_secs(15), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    node_a.converges(
        "initial sync",
        "app/web",
        "app/db",
        5432,
        ("allow", "app/db ingress rule 0"),
    );
    node_a.converges(
        "initial sync",
        "app/web",
        "app/db",
        80,
        ("deny", "default deny of app/db"),
    );

    // Pod relabel: web is no longer app=web.
    api.apply(
        Kind::Pod,
        pod("app", "web", json!({"app": "web2"}), "node-a", "10.60.0.1"),
    );
    node_a.converges(
        "pod relabel",
        "app/web",
        "app/db",
        5432,
        ("deny", "default deny of app/db"),
    );

    // Policy update: allow app=web2 too.
    api.apply(
        Kind::NetworkPolicy,
        policy(
            "app",
            "db",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "web2"]}]}}], "ports": [{"port": 5432}]}]}),
        ),
    );
    node_a.converges(
        "policy update",
        "app/web",
        "app/db",
        5432,
        ("allow", "app/db ingress rule 0"),
    );

    // Policy add, selecting by namespace labels; then a namespace relabel.
    api.apply(
        Kind::NetworkPolicy,
        policy(
            "app",
            "db-from-team-b",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}], "ports": [{"port": 6379}]}]}),
        ),
    );
    node_a.converges(
        "policy add",
        "app/web",
        "app/db",
        6379,
        ("deny", "default deny of app/db"),
    );
    api.apply(Kind::Namespace, ns("app", json!({"team": "b"})));
    node_a.converges(
        "namespace relabel",
        "app/web",
        "app/db",
        6379,
        ("allow", "app/db-from-team-b ingress rule 0"),
    );

    // A dropped watch: the watchers resume from their resourceVersion.
    let (_, watches) = api.requests();
    api.drop_watches();
    api.apply(Kind::Namespace, ns("app", json!({"team": "a"})));
    node_a.converges(
        "after a dropped watch",
        "app/web",
        "app/db",
        6379,
        ("deny", "default deny of app/db"),
    );
    assert!(api.requests().1 > watches, "watches were reopened");

    // 410 Gone: a change made while no watch was open, then the history is
    // compacted; only a relist can see it (here: a deletion).
    api.apply(Kind::Namespace, ns("app", json!({"team": "b"})));
    node_a.converges(
        "namespace relabel back",
        "app/web",
        "app/db",
        6379,
        ("allow", "app/db-from-team-b"),
    );
    let (lists, _) = api.requests();
    api.set_down(true);
    api.delete(Kind::NetworkPolicy, "app/db-from-team-b");
    api.compact();
    std::thread::sleep(Duration::from_millis(500));
    // While the API server is unreachable, the last known state stays in force.
    let (v, r) = node_a.verdict("app/web", "app/db", 6379);
    assert_eq!((v.as_str(), node_a.ready()), ("allow", true), "{r}");
    api.set_down(false);
    node_a.converges(
        "relist after 410",
        "app/web",
        "app/db",
        6379,
        ("deny", "default deny of app/db"),
    );
    assert!(api.requests().0 > lists, "the watchers relisted");

    // Policy delete: db is no longer isolated at all.
    api.delete(Kind::NetworkPolicy, "app/db");
    node_a.converges("policy delete", "app/web", "app/db", 80, ("allow", ""));

    // Pod add: attached first, known later.
    node_a.attach("app/cache", "10.60.0.3");
    assert!(
        node_a.flows_mentioning("10.60.0.3").is_empty(),
        "unknown pod cut off"
    );
    api.apply(
        Kind::Pod,
        pod(
            "app",
            "cache",
            json!({"app": "cache"}),
            "node-a",
            "10.60.0.3",
        ),
    );
    node_a.converges("pod add", "app/cache", "app/db", 80, ("allow", ""));
    // Pod delete while attached: cut off again.
    api.delete(Kind::Pod, "app/cache");
    node_a.converges("pod delete", "app/web", "app/cache", 80, ("error", "cache"));
    assert!(
        node_a.flows_mentioning("=10.60.0.3").is_empty(),
        "deleted pod cut off"
    );
    let ports = node_a.ask(&Request::Ports).unwrap();
    assert_eq!(
        ports.as_array().unwrap().len(),
        3,
        "the port stays until CNI DEL: {ports}"
    );
}

#[test]
fn gateway_and_cni_config_come_from_the_node_object() {
    let gw = format!("vsk{}g", std::process::id() % 10_000);
    if !privileged(&format!("{gw}x")) {
        return;
    }
    let api = ApiServer::start();
    // Dual-stack: a pod CIDR per family.
    let mut dual = node("node-a", "192.168.8.1", "10.62.0.0/24");
    dual["spec"]["podCIDRs"] = json!(["10.62.0.0/24", "fd00:62::/64"]);
    api.apply(Kind::Node, dual);
    let dir = std::env::temp_dir().join(format!("vswitch-k8s-gw-{}", std::process::id()));
    let conf = dir.join("net.d/10-vswitch.conflist");
    let node_a = start(
        &api,
        &dir,
        &format!("[gateway]\nname = {gw:?}"),
        &format!("cni_conf = {:?}", conf.to_str().unwrap()),
    );
    let t = Instant::now();
    while !node_a.ready() {
        assert!(t.elapsed() < Duration::from_secs(15), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    let range = &written["plugins"][0]["ipam"]["ranges"][0][0];
    assert_eq!(range["subnet"], "10.62.0.0/24", "{written}");
    assert_eq!(range["gateway"], "10.62.0.1", "{written}");
    let range6 = &written["plugins"][0]["ipam"]["ranges"][1][0];
    assert_eq!(range6["subnet"], "fd00:62::/64", "{written}");
    assert_eq!(range6["gateway"], "fd00:62::1", "{written}");
    assert_eq!(written["plugins"][0]["type"], "vswitch-cni");
    let addr = Command::new("ip")
        .args(["-o", "addr", "show", "dev", &gw])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addr.stdout);
    assert!(
        addrs.contains("10.62.0.1/24") && addrs.contains("fd00:62::1/64"),
        "gateway addresses from the podCIDRs: {addrs}"
    );

    // A pod as kubelet starts it: the runtime runs the plugin of the written
    // conflist (name and cniVersion from the list), with the pod's identity in
    // CNI_ARGS. (Only IPAM's dataDir is pointed into the test's directory.)
    api.apply(Kind::Namespace, ns("web", json!({})));
    api.apply(
        Kind::Pod,
        pod(
            "web",
            "front",
            json!({"app": "front"}),
            "node-a",
            "10.62.0.2",
        ),
    );
    let mut plugin = written["plugins"][0].clone();
    plugin["name"] = written["name"].clone();
    plugin["cniVersion"] = written["cniVersion"].clone();
    plugin["ipam"]["dataDir"] = json!(dir.join("ipam"));
    let pod_ns = Netns::new(format!("vsk{}p", std::process::id() % 10_000));
    let cni = |command: &str| {
        common::cni(
            None,
            command,
            &pod_ns,
            "front-1",
            "web/front",
            &plugin.to_string(),
        )
    };
    let (ok, result) = cni("ADD");
    assert!(ok, "CNI ADD through the written conflist: {result}");
    let ip = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.62.0."), "{result}");
    assert_eq!(result["ips"][0]["gateway"], "10.62.0.1");
    // The pod reaches its node through the gateway (own-node traffic).
    let listener = std::net::TcpListener::bind("10.62.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let reached = pod_ns.run(move || {
        std::net::TcpStream::connect_timeout(
            &format!("10.62.0.1:{port}").parse().unwrap(),
            Duration::from_secs(3),
        )
        .is_ok()
    });
    assert!(reached, "the pod reaches its node");
    assert!(cni("DEL").0, "CNI DEL");
}

/// A restarted vswitchd forwards nothing until Namespaces, Pods, Nodes and
/// NetworkPolicies have all been listed: with the NetworkPolicy list late or
/// failing, a connection the policy denies must not get through (it did, 20
/// times in 21, before the switch was sealed until the first full sync).
#[test]
fn nothing_is_forwarded_until_every_kind_is_listed() {
    let tag = format!("vsq{}", std::process::id() % 10_000);
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let api = ApiServer::start();
    api.apply(Kind::Namespace, ns("t", json!({})));
    // What real clusters send: a Node with name-typed addresses (every cloud
    // provider sets them), and a host-network pod (it is its node: its
    // "podIP" is the node's address, and a policy selecting it must not put a
    // default deny on that address).
    let mut n = node("node-a", "192.0.2.1", "10.62.0.0/24");
    n["status"]["addresses"] = json!([
        {"type": "Hostname", "address": "node-a"},
        {"type": "InternalDNS", "address": "node-a.internal"},
        {"type": "ExternalDNS", "address": "node-a.example.com"},
        {"type": "InternalIP", "address": "192.0.2.1"},
    ]);
    api.apply(Kind::Node, n);
    let mut proxy = pod(
        "t",
        "proxy",
        json!({"app": "server"}),
        "node-a",
        "192.0.2.1",
    );
    proxy["spec"]["hostNetwork"] = json!(true);
    api.apply(Kind::Pod, proxy);
    api.apply(
        Kind::Pod,
        pod("t", "a", json!({"app": "client"}), "node-a", "10.62.0.1"),
    );
    api.apply(
        Kind::Pod,
        pod("t", "b", json!({"app": "server"}), "node-a", "10.62.0.2"),
    );
    api.apply(
        Kind::NetworkPolicy,
        policy(
            "t",
            "b-closed",
            json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}),
        ),
    );
    let dir = std::env::temp_dir().join(format!("vswitch-k8s-seal-{}", std::process::id()));
    let mut node = start(&api, &dir, "", "");
    let (na, nb) = (Netns::new(format!("{tag}a")), Netns::new(format!("{tag}b")));
    for (ns, pod, last) in [(&na, "t/a", 1u8), (&nb, "t/b", 2)] {
        let dev = format!("{tag}{last}");
        let mac = [0x0a, 0x58, 10, 62, 0, last];
        common::tap_in(ns, &dev, mac, &format!("10.62.0.{last}/24"));
        node.ask(&Request::Attach(control::Attach {
            pod: pod.parse().unwrap(),
            netns: Some(format!("/var/run/netns/{}", ns.0)),
            ifname: dev,
            mac: control::Mac(mac),
            ips: vec![format!("10.62.0.{last}").parse().unwrap()],
        }))
        .expect("attach");
    }
    common::eventually("ready", || node.ready());
    assert!(
        node.flows_mentioning("192.0.2.1")
            .iter()
            .all(|f| !f.contains("priority=200")),
        "no default deny on the node's address: {:?}",
        node.flows_mentioning("192.0.2.1")
    );
    assert!(
        !node.flows_mentioning("192.0.2.1").is_empty(),
        "the Node (with its DNS-name addresses) was accepted: own-node traffic flows"
    );
    common::serve_tcp(&nb, "10.62.0.2", 80);
    common::serve_tcp(&na, "10.62.0.1", 80);
    common::eventually("b reaches a", || common::tcp(&nb, "10.62.0.1", 80));
    assert!(!common::tcp(&na, "10.62.0.2", 80), "the policy closes b");

    // A rollout: SIGTERM, and the new vswitchd's NetworkPolicy list is late.
    api.delay_lists(Kind::NetworkPolicy, Duration::from_secs(4));
    node.daemon.terminate();
    node.daemon.restart();
    let started = Instant::now();
    let (mut tries, mut through) = (0, 0);
    while !node.ready() {
        tries += 1;
        through += usize::from(common::tcp(&na, "10.62.0.2", 80));
        through += usize::from(common::tcp(&nb, "10.62.0.1", 80));
        assert!(started.elapsed() < Duration::from_secs(20), "never ready");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3) && tries >= 2,
        "the list was late ({:?}, {tries} tries)",
        started.elapsed()
    );
    assert_eq!(
        through, 0,
        "nothing forwarded before the policies were listed"
    );
    assert!(
        !common::tcp(&na, "10.62.0.2", 80),
        "and then the policy holds"
    );
    common::eventually("b reaches a again", || common::tcp(&nb, "10.62.0.1", 80));

    // The NetworkPolicy list fails outright: still nothing, and not ready.
    api.delay_lists(Kind::NetworkPolicy, Duration::ZERO);
    api.fail_lists(Kind::NetworkPolicy, true);
    node.daemon.terminate();
    node.daemon.restart();
    let failing = Instant::now();
    while failing.elapsed() < Duration::from_secs(3) {
        assert!(!node.ready(), "ready without a NetworkPolicy list");
        assert!(
            !common::tcp(&na, "10.62.0.2", 80),
            "a failing policy list is not \"no policy\""
        );
    }
    api.fail_lists(Kind::NetworkPolicy, false);
    let t = Instant::now();
    while !node.ready() {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "never ready once the list works"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!common::tcp(&na, "10.62.0.2", 80));
    common::eventually("b reaches a at last", || common::tcp(&nb, "10.62.0.1", 80));
}

fn cnp(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": spec})
}

#[test]
fn cluster_network_policies_from_the_api_server_with_status() {
    if !privileged(&format!("vsc{}x", std::process::id() % 10_000)) {
        return;
    }
    let api = ApiServer::start();
    // A cluster without the CRD: vswitchd still becomes ready (no admin tiers).
    api.set_crd(false);
    api.apply(Kind::Namespace, ns("app", json!({"team": "a"})));
    api.apply(Kind::Namespace, ns("other", json!({"team": "b"})));
    api.apply(Kind::Node, node("node-a", "192.168.8.1", "10.61.0.0/24"));
    api.apply(
        Kind::Pod,
        pod("app", "web", json!({"app": "web"}), "node-a", "10.61.0.1"),
    );
    api.apply(
        Kind::Pod,
        pod("other", "db", json!({"app": "db"}), "node-a", "10.61.0.2"),
    );
    let dir = std::env::temp_dir().join(format!("vswitch-k8s-cnp-{}", std::process::id()));
    let mut n = start(&api, &dir, "", "");
    n.attach("app/web", "10.61.0.1");
    n.attach("other/db", "10.61.0.2");
    common::eventually("ready without the ClusterNetworkPolicy CRD", || n.ready());
    n.converges("no policy", "app/web", "other/db", 5432, ("allow", ""));

    // The CRD arrives, then an Admin Deny: enforced, and its status written.
    api.set_crd(true);
    let deny = json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                      "egress": [{"name": "not-to-b", "action": "Deny", "to": [{"namespaces": {"matchLabels": {"team": "b"}}}]}]});
    api.apply(Kind::ClusterNetworkPolicy, cnp("isolate-a", deny));
    n.converges(
        "the Admin Deny from the API server",
        "app/web",
        "other/db",
        5432,
        ("deny", "ClusterNetworkPolicy isolate-a (Admin tier, priority 10) egress rule \"not-to-b\": Deny"),
    );
    let condition = |name: &str| -> Value {
        api.get(Kind::ClusterNetworkPolicy, name)
            .and_then(|o| {
                o["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "vswitch.io/Accepted")
                    .cloned()
            })
            .unwrap_or(Value::Null)
    };
    common::eventually("status: accepted", || {
        condition("isolate-a")["status"] == "True"
    });
    assert_eq!(condition("isolate-a")["reason"], "Accepted");
    assert_eq!(condition("isolate-a")["observedGeneration"], 1);

    // An invalid one: rejected, with the field, in status and in flowctl; the
    // valid one stays in force.
    let bad = json!({"tier": "Admin", "priority": 5000, "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]});
    api.apply(Kind::ClusterNetworkPolicy, cnp("too-high", bad));
    common::eventually("status: rejected", || {
        condition("too-high")["status"] == "False"
    });
    let c = condition("too-high");
    assert_eq!(c["reason"], "Invalid");
    assert!(
        c["message"].as_str().unwrap().contains("spec.priority"),
        "{c}"
    );
    let views = n.ask(&Request::DumpPolicies).unwrap();
    let view = views
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "too-high")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(view["status"], "rejected", "{views}");
    n.converges(
        "still denied",
        "app/web",
        "other/db",
        5432,
        ("deny", "isolate-a"),
    );
    // Status is written once per realisation, not on every event.
    let writes = api.status_patches().len();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(api.status_patches().len(), writes, "no status write loop");

    // A Pass in front hands the decision to NetworkPolicy (none: allowed).
    let pass = json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                      "egress": [{"action": "Pass", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}]}]});
    api.apply(Kind::ClusterNetworkPolicy, cnp("pass-db", pass));
    n.converges(
        "Pass skips the Admin Deny",
        "app/web",
        "other/db",
        5432,
        ("allow", ""),
    );
    api.delete(Kind::ClusterNetworkPolicy, "pass-db");
    n.converges(
        "Pass removed",
        "app/web",
        "other/db",
        5432,
        ("deny", "isolate-a"),
    );

    // Staged (vswitch.io/mode: audit): evaluated, not enforced, and the
    // status says so.
    let accept = json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                        "egress": [{"name": "db-ok", "action": "Accept", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}]}]});
    api.apply(
        Kind::ClusterNetworkPolicy,
        json!({"metadata": {"name": "staged-accept", "annotations": {"vswitch.io/mode": "audit"}}, "spec": accept}),
    );
    common::eventually("status: staged", || {
        condition("staged-accept")["reason"] == "Staged"
    });
    n.converges(
        "a staged Accept is not enforced",
        "app/web",
        "other/db",
        5432,
        ("deny", "isolate-a"),
    );
    let t = n
        .ask(&Request::Trace {
            src: common::endpoint("app/web"),
            dst: common::endpoint("other/db"),
            l4: control::L4::Tcp(5432),
        })
        .unwrap();
    assert_eq!(t["staged"]["verdict"], "would allow", "{t}");
    assert!(
        t["staged"]["rule"]
            .as_str()
            .unwrap_or("")
            .contains("staged-accept"),
        "{t}"
    );
    api.delete(Kind::ClusterNetworkPolicy, "staged-accept");

    // The CRD goes (and its objects with it): no admin policy, still ready.
    api.set_crd(false);
    n.converges("CRD removed", "app/web", "other/db", 5432, ("allow", ""));
    assert!(n.ready());
}
