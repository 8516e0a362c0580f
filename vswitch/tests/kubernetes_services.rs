//! Services and EndpointSlices from a Kubernetes API server (tests/apiserver):
//! readiness waits for them, only ready endpoints serve, named ports come
//! from the slice, headless Services are left alone, a Service without a
//! ready endpoint refuses, a deleted one goes. Root, as in CI.

mod apiserver;
mod common;
mod kubenode;

use std::time::{Duration, Instant};

use apiserver::{ApiServer, Kind};
use common::privileged;
use control::Request;
use kubenode::{Node, node, ns, pod, start};
use serde_json::{Value, json};

fn service(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn slice(ns: &str, name: &str, service: &str, endpoints: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The frontends of `dump-services` for `service` (`ns/name:port`): its backends.
fn backends_of(node: &Node, service: &str) -> Option<Vec<String>> {
    let v = node.ask(&Request::DumpServices).unwrap();
    v.as_array()?
        .iter()
        .find(|s| s["service"] == service)
        .map(|s| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["address"].as_str().unwrap().to_string())
                .collect()
        })
}

#[test]
fn services_and_endpoint_slices_from_the_api_server() {
    if !privileged(&format!("vsk{}x", std::process::id() % 10_000)) {
        return;
    }
    let api = ApiServer::start();
    api.apply(Kind::Namespace, ns("app", json!({})));
    api.apply(Kind::Node, node("node-a", "192.168.7.1", "10.60.0.0/24"));
    api.apply(
        Kind::Pod,
        pod("app", "web", json!({"app": "web"}), "node-a", "10.60.0.1"),
    );
    api.apply(
        Kind::Pod,
        pod("app", "db", json!({"app": "db"}), "node-a", "10.60.0.2"),
    );
    api.apply(
        Kind::Service,
        service(
            "app",
            "db",
            json!({"clusterIP": "10.96.0.50", "selector": {"app": "db"},
                   "ports": [{"name": "pg", "port": 80, "targetPort": "pg"}]}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "app",
            "headless",
            json!({"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 80}]}),
        ),
    );
    // A ready endpoint and one that is not (starting, or terminating).
    api.apply(
        Kind::EndpointSlice,
        slice(
            "app",
            "db-1",
            "db",
            json!([{"addresses": ["10.60.0.2"], "conditions": {"ready": true}, "nodeName": "node-a"},
                   {"addresses": ["10.60.0.9"], "conditions": {"ready": false, "terminating": true}}]),
        ),
    );
    // Nothing is ready until Services and EndpointSlices are listed too.
    api.delay_lists(Kind::EndpointSlice, Duration::from_millis(1500));
    let dir = std::env::temp_dir().join(format!("vswitch-k8s-svc-{}", std::process::id()));
    let mut node_a = start(&api, &dir, "", "");
    node_a.attach("app/web", "10.60.0.1");
    node_a.attach("app/db", "10.60.0.2");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !node_a.ready(),
        "not ready before EndpointSlices are listed"
    );
    let t = Instant::now();
    while !node_a.ready() {
        assert!(t.elapsed() < Duration::from_secs(15), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        backends_of(&node_a, "app/db:pg"),
        Some(vec!["10.60.0.2:5432".to_string()]),
        "only the ready endpoint, the named port from the slice"
    );
    assert!(
        backends_of(&node_a, "app/headless:80").is_none(),
        "headless Services are left alone"
    );
    let trace = common::trace(
        &node_a.daemon.socket,
        "app/web",
        "10.96.0.50",
        control::L4::Tcp(80),
    )
    .unwrap();
    assert_eq!(trace["verdict"], "allow", "{trace}");
    assert_eq!(trace["translations"][0]["to"], "10.60.0.2:5432", "{trace}");
    assert_eq!(trace["translations"][0]["pod"], "app/db", "{trace}");

    // The endpoint stops being ready: refused at once.
    api.apply(
        Kind::EndpointSlice,
        slice(
            "app",
            "db-1",
            "db",
            json!([{"addresses": ["10.60.0.2"], "conditions": {"ready": false}}]),
        ),
    );
    node_a.converges(
        "no ready endpoint",
        "app/web",
        "10.96.0.50",
        80,
        ("deny", "no ready endpoints"),
    );
    // The Service goes: its frontend with it.
    api.delete(Kind::Service, "app/db");
    let t = Instant::now();
    while backends_of(&node_a, "app/db:pg").is_some() {
        assert!(t.elapsed() < Duration::from_secs(15), "the frontend stays");
        std::thread::sleep(Duration::from_millis(50));
    }
}
