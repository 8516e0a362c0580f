//! Multiqueue TAP devices over real traffic: a pod's interface made by the
//! CNI plugin is multiqueue, vswitchd reads `tap_queues` queues of it, the
//! kernel spreads the pod's flows over them, and policy holds on every queue.
//!
//! Needs root; skipped outside CI without it, a failure in CI. Every
//! namespace and device is uniquely named and removed on drop.

use std::net::{IpAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{Cni, TempDir, Vswitchd, eventually, flowctl, privileged, write_config};

const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mq}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: mq, labels: {app: client}}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: mq, labels: {app: server}}\n";

/// The server takes UDP on 7000 only.
const ONLY_7000: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: only-7000, namespace: mq}\n\
    spec:\n  podSelector: {matchLabels: {app: server}}\n\
    \x20 ingress: [{ports: [{protocol: UDP, port: 7000}]}]\n";

/// Datagrams from `flows` source ports of the client to `port` of the
/// server; how many arrived.
fn datagrams(cni: &[common::Netns], server: IpAddr, port: u16, flows: u16) -> usize {
    let rx = cni[1].run(move || {
        let s = UdpSocket::bind((server, port)).expect("server binds");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    });
    cni[0].run(move || {
        for i in 0..flows {
            let c = UdpSocket::bind(("0.0.0.0", 20_000 + i)).expect("client binds");
            for _ in 0..4 {
                c.send_to(b"queue test", (server, port)).expect("sent");
            }
        }
    });
    let mut got = 0;
    let mut buf = [0u8; 64];
    while rx.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    got
}

fn client_queues(socket: &std::path::Path) -> Vec<Value> {
    let ports: Value =
        serde_json::from_str(&flowctl(socket, &["dump-ports", "-o", "json"])).expect("json");
    ports
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["pod"] == "mq/client")
        .expect("the client's port")["queues"]
        .as_array()
        .expect("queues")
        .clone()
}

#[test]
fn a_pods_flows_spread_over_its_queues_and_policy_holds_on_each() {
    if !privileged("vsmqprobe") {
        return;
    }
    let tmp = TempDir::new("mq");
    let dir = tmp.0.clone();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(dir.join("manifests/policy.yaml"), ONLY_7000).unwrap();
    let (config, socket) = write_config(
        &dir,
        "packet_threads = 2\ntap_queues = 2\n[gateway]\nname = \"vsmq\"\naddress = \"10.93.7.1/24\"\n",
    );
    let daemon = Vswitchd::start(&config, &socket);
    let cni = Cni::host_local(&socket, "10.93.7.0/24", "10.93.7.1", &dir);
    let (spaces, ips) = cni.add_all("vsmq", &["mq/client", "mq/server"]);
    let server = ips[1];

    // The pod's device is multiqueue, with both queues attached.
    let details = Command::new("ip")
        .args(["-n", &spaces[0].0, "-d", "link", "show", "eth0"])
        .output()
        .expect("ip runs");
    let details = String::from_utf8_lossy(&details.stdout);
    assert!(
        details.contains("multi_queue") && details.contains("numqueues 2"),
        "eth0 is a two-queue TAP device: {details}"
    );
    assert_eq!(client_queues(&socket).len(), 2);

    // 64 flows of 4 datagrams: the kernel hashes them over both queues.
    eventually("the policy is in force", || {
        datagrams(&spaces, server, 7000, 1) == 4
    });
    let before: Vec<u64> = client_queues(&socket)
        .iter()
        .map(|q| q["work"].as_u64().unwrap())
        .collect();
    assert_eq!(
        datagrams(&spaces, server, 7000, 64),
        256,
        "every datagram arrives"
    );
    let after = client_queues(&socket);
    let read: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(q, b)| q["work"].as_u64().unwrap() - b)
        .collect();
    assert!(
        read.iter().all(|&n| n > 0),
        "both queues carried some of the flows: {read:?}"
    );
    let lanes: Vec<u64> = after.iter().map(|q| q["lane"].as_u64().unwrap()).collect();
    assert_ne!(lanes[0], lanes[1], "each queue has its own packet thread");

    // The policy holds whichever queue a flow takes.
    assert_eq!(
        datagrams(&spaces, server, 7001, 64),
        0,
        "port 7001 is denied"
    );
    drop(daemon);
    for (ns, pod) in spaces.iter().zip(["mq/client", "mq/server"]) {
        cni.call("DEL", ns, pod);
    }
}
