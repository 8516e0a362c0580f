//! Two nodes: network namespaces joined by a veth link, each running its own
//! vswitchd with a VXLAN tunnel to the other; pods attached through vswitch-cni
//! on each. Cross-node traffic is allowed and denied as policy says: egress on
//! the source node, ingress on the destination node. Root, as in CI.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use control::Request;
use serde_json::{Value, json};

mod common;

use common::{Netns, Vswitchd, ip, privileged};

/// A node: its namespace and its vswitchd (stopped before the namespace goes).
struct NodeProc {
    daemon: Vswitchd,
    dir: PathBuf,
    ns: Netns,
}

impl NodeProc {
    /// CNI ADD/DEL of `pod` into `pod_ns`, with IPAM fixed to `addr`.
    fn cni(&self, command: &str, pod_ns: &Netns, pod: &str, addr: &str, gw: &str) -> Value {
        let netconf = json!({
            "cniVersion": "1.0.0", "name": "vswitch", "type": "vswitch-cni",
            "socket": self.daemon.socket,
            "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam"),
                     "ranges": [[{"subnet": format!("{}.0/24", gw.rsplit_once('.').unwrap().0), "rangeStart": addr, "rangeEnd": addr, "gateway": gw}]]},
        });
        let (ok, v) = common::cni(
            Some(&self.ns.0),
            command,
            pod_ns,
            &pod_ns.0,
            pod,
            &netconf.to_string(),
        );
        assert!(ok, "CNI {command} {pod}: {v}");
        v
    }

    /// CNI ADD of a dual-stack pod: IPAM fixed to `addr` (IPv4) and `addr6`.
    fn cni_dual(&self, pod_ns: &Netns, pod: &str, addr: &str, gw: &str, addr6: &str) -> Value {
        let (net6, _) = addr6.rsplit_once("::").unwrap();
        let netconf = json!({
            "cniVersion": "1.0.0", "name": "vswitch", "type": "vswitch-cni",
            "socket": self.daemon.socket,
            "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam"),
                     "ranges": [
                        [{"subnet": format!("{}.0/24", gw.rsplit_once('.').unwrap().0), "rangeStart": addr, "rangeEnd": addr, "gateway": gw}],
                        [{"subnet": format!("{net6}::/64"), "rangeStart": addr6, "rangeEnd": addr6}]]},
        });
        let (ok, v) = common::cni(
            Some(&self.ns.0),
            "ADD",
            pod_ns,
            &pod_ns.0,
            pod,
            &netconf.to_string(),
        );
        assert!(ok, "CNI ADD {pod}: {v}");
        v
    }

    fn ask(&self, req: &Request) -> Value {
        self.daemon.ask(req).unwrap()
    }

    /// Packets counted on flows whose rule contains `rule`.
    fn hits(&self, rule: &str) -> u64 {
        self.daemon.hits(rule)
    }
}

const MANIFESTS: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.61.0.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.61.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.77.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: mn}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mn, labels: {app: client}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.61.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: mn, labels: {app: stranger}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.61.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: quiet, namespace: mn, labels: {app: quiet}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.61.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mn, labels: {app: server}}
spec: {nodeName: node-b, containers: [{name: c, image: x}]}
status: {podIP: 10.61.1.10}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: mn}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}, {port: 8082}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: quiet-no-egress, namespace: mn}
spec:
  podSelector: {matchLabels: {app: quiet}}
  policyTypes: [Egress]
";

/// A node to start: its name, the letter in its device names, its address
/// between nodes, its pods' gateway.
struct Spec<'a> {
    name: &'a str,
    letter: &'a str,
    underlay: &'a str,
    gw: &'a str,
    /// The gateway's IPv6 address (dual-stack nodes).
    gw6: Option<&'a str>,
    /// `services`: who load-balances ClusterIPs.
    services: &'a str,
}

fn start_node(ns: Netns, tag: &str, spec: Spec<'_>, manifests: &Path, root: &Path) -> NodeProc {
    let Spec {
        name,
        letter,
        underlay,
        gw,
        gw6,
        services,
    } = spec;
    let address6 = gw6.map_or(String::new(), |g| format!("address6 = \"{g}/64\"\n"));
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vswitchd.sock");
    let config = dir.join("vswitchd.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nstate_dir = {:?}\nmanifests = {manifests:?}\nnode_name = {name:?}\n\
             service_cidrs = [\"10.96.0.0/12\", \"fd00:96::/112\"]\n\
             services = {services:?}\n\
             [gateway]\nname = \"{tag}g{letter}\"\naddress = \"{gw}/24\"\n{address6}\
             [tunnel]\nlocal_address = {underlay:?}\n",
            dir.join("state")
        ),
    )
    .unwrap();
    let daemon = Vswitchd::start_with(&config, &socket, Some(&ns.0), &[]);
    NodeProc { daemon, dir, ns }
}

/// Two node namespaces (`{tag}na`, `{tag}nb`) joined by a veth link, with
/// these addresses (`addr/len`) on its ends.
fn linked_nodes(tag: &str, a: &str, b: &str) -> (Netns, Netns) {
    let (na, nb) = (
        Netns::new(format!("{tag}na")),
        Netns::new(format!("{tag}nb")),
    );
    let (wa, wb) = (format!("{tag}wa"), format!("{tag}wb"));
    ip(&[
        "link", "add", &wa, "netns", &na.0, "type", "veth", "peer", "name", &wb, "netns", &nb.0,
    ]);
    for (ns, dev, addr) in [(&na, &wa, a), (&nb, &wb, b)] {
        let mut args = vec!["-n", &ns.0, "addr", "add", addr, "dev", dev];
        if addr.contains(':') {
            // Unique by construction: no duplicate address detection.
            args.push("nodad");
        }
        ip(&args);
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    (na, nb)
}

/// Whether a TCP connection from `from` to `addr` (`ip:port`) gets an echo.
fn tcp(from: &Netns, addr: &str) -> bool {
    let (ip, port) = addr.rsplit_once(':').unwrap();
    common::tcp(from, ip, port.parse().unwrap())
}

/// An echo server in `ns` on `addr` (`ip:port`), for the rest of the test.
fn serve(ns: &Netns, addr: &str) {
    let (ip, port) = addr.rsplit_once(':').unwrap();
    common::serve_tcp(ns, ip, port.parse().unwrap());
}

#[test]
fn pods_on_two_nodes_talk_through_the_tunnel_under_policy() {
    let tag = format!("vm{}", std::process::id() % 100_000);
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let root = std::env::temp_dir().join(format!("vswitch-mn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), MANIFESTS).unwrap();

    // Pods first (declared before the nodes: dropped after them).
    let pods: Vec<Netns> = ["c", "s", "q", "v"]
        .iter()
        .map(|p| Netns::new(format!("{tag}p{p}")))
        .collect();
    // Two nodes and the wire between them.
    let (na, nb) = linked_nodes(&tag, "192.168.77.1/24", "192.168.77.2/24");
    // Someone else's route with vswitchd's route protocol (another instance, a
    // restart overlap): vswitchd must leave it alone.
    let other = format!("{tag}x");
    let peer = format!("{tag}y");
    ip(&[
        "-n", &na.0, "link", "add", &other, "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["-n", &na.0, "link", "set", &other, "up"]);
    ip(&["-n", &na.0, "link", "set", &peer, "up"]);
    ip(&[
        "-n",
        &na.0,
        "route",
        "add",
        "10.123.0.0/24",
        "dev",
        &other,
        "proto",
        "86",
    ]);
    let a = start_node(
        na,
        &tag,
        Spec {
            name: "node-a",
            letter: "a",
            underlay: "192.168.77.1",
            gw: "10.61.0.1",
            gw6: None,
            services: "kube-proxy",
        },
        &manifests,
        &root,
    );
    let b = start_node(
        nb,
        &tag,
        Spec {
            name: "node-b",
            letter: "b",
            underlay: "192.168.77.2",
            gw: "10.61.1.1",
            gw6: None,
            services: "kube-proxy",
        },
        &manifests,
        &root,
    );
    let (client, stranger, quiet, server) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    a.cni("ADD", client, "mn/client", "10.61.0.10", "10.61.0.1");
    a.cni("ADD", stranger, "mn/stranger", "10.61.0.11", "10.61.0.1");
    a.cni("ADD", quiet, "mn/quiet", "10.61.0.12", "10.61.0.1");
    b.cni("ADD", server, "mn/server", "10.61.1.10", "10.61.1.1");
    serve(server, "10.61.1.10:8080");
    serve(server, "10.61.1.10:8081");
    serve(client, "10.61.0.10:9000");

    // Allowed across nodes: client -> server:8080, replies through the tunnel too.
    let t = Instant::now();
    while !tcp(client, "10.61.1.10:8080") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "client -> server:8080 across nodes"
        );
    }
    let routes = Command::new("ip")
        .args(["-n", &a.ns.0, "route", "show", "proto", "86"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains("10.123.0.0/24"),
        "another instance's route survives vswitchd's start: {routes}"
    );
    // Bulk data across the tunnel: with offloads, segments of up to 64 KB cross
    // as one datagram each, their virtio-net header with them.
    let sink = server.run(|| TcpListener::bind("10.61.1.10:8082").unwrap());
    let counted = std::thread::spawn(move || {
        let (mut c, _) = sink.accept().unwrap();
        let mut n = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k as u64,
            }
        }
    });
    let sent = client.run(|| {
        let mut s = TcpStream::connect("10.61.1.10:8082").unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..16 {
            s.write_all(&chunk).unwrap();
        }
        16u64 << 20
    });
    assert_eq!(counted.join().unwrap(), sent, "16 MiB across nodes, intact");

    // Ingress is enforced on the destination node: node-a lets these through,
    // node-b's default deny for the server drops them.
    let denied_on_b = b.hits("default deny of mn/server (ingress)");
    assert!(
        !tcp(stranger, "10.61.1.10:8080"),
        "stranger is not a client"
    );
    assert!(!tcp(client, "10.61.1.10:8081"), "8081 is not allowed");
    assert!(
        b.hits("default deny of mn/server (ingress)") > denied_on_b,
        "the destination node dropped them"
    );
    assert_eq!(
        a.hits("default deny of mn/server"),
        0,
        "not on the source node"
    );
    assert!(a.hits("policy: ingress enforced on the destination node") > 0);
    // Egress is enforced on the source node: quiet may not send at all.
    let tunnel_rx_b = |b: &NodeProc| -> u64 {
        b.ask(&Request::Ports)
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["kind"] == "tunnel")
            .map(|p| p["rx_packets"].as_u64().unwrap())
            .sum()
    };
    let before = tunnel_rx_b(&b);
    assert!(!tcp(quiet, "10.61.1.10:8080"), "quiet has no egress");
    assert!(
        a.hits("default deny of mn/quiet (egress)") > 0,
        "dropped on the source node"
    );
    assert_eq!(tunnel_rx_b(&b), before, "nothing of it reached node-b");
    assert!(b.hits("policy: egress enforced on the source node") > 0);
    // New connections the other way: server (no egress policy) -> client
    // (not isolated) are allowed.
    assert!(
        tcp(server, "10.61.0.10:9000"),
        "server -> client across nodes"
    );

    // Services, kube-proxy style: DNAT in node-a's kernel. The first hop to the
    // ClusterIP goes to the node; policy is decided on the translated packet
    // (ingress on the backend's node, egress on the client's); replies go back
    // through the node to be untranslated.
    let node_sh = |cmd: &str| {
        let st = Command::new("ip")
            .args(["netns", "exec", &a.ns.0, "sh", "-c", cmd])
            .status()
            .unwrap();
        assert!(st.success(), "{cmd}");
    };
    node_sh(
        "sysctl -qw net.ipv4.ip_forward=1 && \
         iptables -t nat -A PREROUTING -d 10.96.0.10 -p tcp --dport 80 -j DNAT --to-destination 10.61.1.10:8080 && \
         iptables -t nat -A PREROUTING -d 10.96.0.11 -p tcp --dport 80 -j DNAT --to-destination 10.61.0.10:9000",
    );
    let t = Instant::now();
    while !tcp(client, "10.96.0.10:80") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "client -> Service -> server on the other node"
        );
    }
    assert!(
        !tcp(stranger, "10.96.0.10:80"),
        "the backend's ingress policy still applies"
    );
    assert!(
        tcp(stranger, "10.96.0.11:80"),
        "Service with a backend on the same node"
    );
    assert!(
        !tcp(quiet, "10.96.0.11:80"),
        "the client's egress policy still applies"
    );

    // Both nodes show the tunnel port with traffic.
    for node in [&a, &b] {
        let ports = node.ask(&Request::Ports);
        let tunnel = ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == "tunnel")
            .unwrap_or_else(|| panic!("no tunnel port: {ports}"));
        assert!(tunnel["tx_packets"].as_u64().unwrap() > 0, "{tunnel}");
    }
    a.cni("DEL", client, "mn/client", "10.61.0.10", "10.61.0.1");
    drop(a);
    drop(b);
    drop(pods);
    let _ = std::fs::remove_dir_all(&root);
}

const MANIFESTS6: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.62.0.0/24, podCIDRs: [10.62.0.0/24, 'fd00:62::/64']}
status: {addresses: [{type: InternalIP, address: 'fd00:77::1'}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.62.1.0/24, podCIDRs: [10.62.1.0/24, 'fd00:62:1::/64']}
status: {addresses: [{type: InternalIP, address: 'fd00:77::2'}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: mn6}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mn6, labels: {app: client}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.62.0.10, podIPs: [{ip: 10.62.0.10}, {ip: 'fd00:62::10'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: mn6, labels: {app: stranger}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.62.0.11, podIPs: [{ip: 10.62.0.11}, {ip: 'fd00:62::11'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mn6, labels: {app: server}}
spec: {nodeName: node-b, containers: [{name: c, image: x}]}
status: {podIP: 10.62.1.10, podIPs: [{ip: 10.62.1.10}, {ip: 'fd00:62:1::10'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: mn6}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}, {port: 8082}]}]
";

/// Dual-stack pods on two nodes joined over an IPv6 underlay: IPv6 (and
/// IPv4) between them through the VXLAN tunnel, under policy, bulk data
/// intact with TCP segmentation offload carried across.
#[test]
fn dual_stack_pods_on_two_nodes_over_an_ipv6_underlay() {
    let tag = format!("v6m{}", std::process::id() % 100_000);
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let root = std::env::temp_dir().join(format!("vswitch-mn6-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), MANIFESTS6).unwrap();
    let pods: Vec<Netns> = ["c", "t", "s"]
        .iter()
        .map(|p| Netns::new(format!("{tag}p{p}")))
        .collect();
    let (na, nb) = linked_nodes(&tag, "fd00:77::1/64", "fd00:77::2/64");
    let a = start_node(
        na,
        &tag,
        Spec {
            name: "node-a",
            letter: "a",
            underlay: "fd00:77::1",
            gw: "10.62.0.1",
            gw6: Some("fd00:62::1"),
            services: "kube-proxy",
        },
        &manifests,
        &root,
    );
    let b = start_node(
        nb,
        &tag,
        Spec {
            name: "node-b",
            letter: "b",
            underlay: "fd00:77::2",
            gw: "10.62.1.1",
            gw6: Some("fd00:62:1::1"),
            services: "kube-proxy",
        },
        &manifests,
        &root,
    );
    let (client, stranger, server) = (&pods[0], &pods[1], &pods[2]);
    a.cni_dual(
        client,
        "mn6/client",
        "10.62.0.10",
        "10.62.0.1",
        "fd00:62::10",
    );
    a.cni_dual(
        stranger,
        "mn6/stranger",
        "10.62.0.11",
        "10.62.0.1",
        "fd00:62::11",
    );
    b.cni_dual(
        server,
        "mn6/server",
        "10.62.1.10",
        "10.62.1.1",
        "fd00:62:1::10",
    );
    common::serve_tcp(server, "fd00:62:1::10", 8080);
    common::serve_tcp(server, "10.62.1.10", 8080);

    common::eventually("client -> server over IPv6 across nodes", || {
        common::tcp(client, "fd00:62:1::10", 8080)
    });
    assert!(common::tcp(client, "10.62.1.10", 8080), "and over IPv4");
    assert!(
        !common::tcp(stranger, "fd00:62:1::10", 8080),
        "ingress policy on the destination node, over IPv6"
    );
    // Bulk data across the tunnel over IPv6: TSO segments (VIRTIO_NET_HDR_GSO_TCPV6)
    // carried whole, every byte intact.
    let sink = server.run(|| TcpListener::bind("[fd00:62:1::10]:8082").unwrap());
    let received = std::thread::spawn(move || {
        let (mut c, _) = sink.accept().unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        all
    });
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    client.run(move || {
        let mut s = TcpStream::connect("[fd00:62:1::10]:8082").unwrap();
        s.write_all(&sent).unwrap();
    });
    let got = received.join().unwrap();
    assert_eq!(got.len(), data.len(), "every byte across the tunnel");
    assert!(got == data, "bytes intact");
    // A node reaches the other node's IPv6 pods (its route via the remote
    // CIDR's router address, answered by the switch): node-b -> client,
    // which no policy isolates.
    common::serve_tcp(client, "fd00:62::10", 9000);
    common::eventually("node-b -> client over IPv6", || {
        b.ns.run(|| {
            TcpStream::connect_timeout(
                &"[fd00:62::10]:9000".parse().unwrap(),
                Duration::from_millis(800),
            )
            .is_ok()
        })
    });
    // ...and an IPv6 Service through kube-proxy (DNAT in node-a's kernel):
    // policy decided on the translated packet on the backend's node.
    let st = Command::new("ip")
        .args(["netns", "exec", &a.ns.0, "sh", "-c",
            "sysctl -qw net.ipv6.conf.all.forwarding=1 && \
             ip6tables -t nat -A PREROUTING -d fd00:96::10 -p tcp --dport 80 -j DNAT --to-destination [fd00:62:1::10]:8080"])
        .status()
        .unwrap();
    assert!(st.success(), "ip6tables DNAT");
    common::eventually("client -> IPv6 Service -> server on the other node", || {
        common::tcp(client, "fd00:96::10", 80)
    });
    assert!(
        !common::tcp(stranger, "fd00:96::10", 80),
        "the backend's ingress policy holds through the IPv6 Service"
    );
    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(&root);
}

const SERVICES2: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.63.0.0/24, podCIDRs: [10.63.0.0/24, 'fd00:63::/64']}
status: {addresses: [{type: InternalIP, address: 'fd00:78::1'}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.63.1.0/24, podCIDRs: [10.63.1.0/24, 'fd00:63:1::/64']}
status: {addresses: [{type: InternalIP, address: 'fd00:78::2'}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: mns}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mns, labels: {app: client}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.63.0.10, podIPs: [{ip: 10.63.0.10}, {ip: 'fd00:63::10'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: mns, labels: {app: stranger}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.63.0.11, podIPs: [{ip: 10.63.0.11}, {ip: 'fd00:63::11'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: near, namespace: mns, labels: {app: api}}
spec: {nodeName: node-a, containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.63.0.20, podIPs: [{ip: 10.63.0.20}, {ip: 'fd00:63::20'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: mns, labels: {app: api}}
spec: {nodeName: node-b, containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.63.1.20, podIPs: [{ip: 10.63.1.20}, {ip: 'fd00:63:1::20'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-client, namespace: mns}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: mns}
spec:
  clusterIP: 10.96.70.10
  clusterIPs: [10.96.70.10, 'fd00:96::70']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: api-sticky, namespace: mns}
spec:
  clusterIP: 10.96.70.12
  sessionAffinity: ClientIP
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api-local, namespace: mns}
spec:
  clusterIP: 10.96.70.11
  internalTrafficPolicy: Local
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
";

#[test]
fn services_in_the_switch_spread_over_two_nodes_dual_stack() {
    let tag = format!("vsm{}", std::process::id() % 100_000);
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let root = std::env::temp_dir().join(format!("vswitch-mns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("cluster.yaml"), SERVICES2).unwrap();
    let pods: Vec<Netns> = ["c", "t", "n", "f"]
        .iter()
        .map(|p| Netns::new(format!("{tag}p{p}")))
        .collect();
    let (na, nb) = linked_nodes(&tag, "fd00:78::1/64", "fd00:78::2/64");
    let spec = |name, letter, underlay, gw, gw6| Spec {
        name,
        letter,
        underlay,
        gw,
        gw6: Some(gw6),
        services: "switch",
    };
    let a = start_node(
        na,
        &tag,
        spec("node-a", "a", "fd00:78::1", "10.63.0.1", "fd00:63::1"),
        &manifests,
        &root,
    );
    let b = start_node(
        nb,
        &tag,
        spec("node-b", "b", "fd00:78::2", "10.63.1.1", "fd00:63:1::1"),
        &manifests,
        &root,
    );
    let (client, stranger, near, far) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    a.cni_dual(
        client,
        "mns/client",
        "10.63.0.10",
        "10.63.0.1",
        "fd00:63::10",
    );
    a.cni_dual(
        stranger,
        "mns/stranger",
        "10.63.0.11",
        "10.63.0.1",
        "fd00:63::11",
    );
    a.cni_dual(near, "mns/near", "10.63.0.20", "10.63.0.1", "fd00:63::20");
    b.cni_dual(far, "mns/far", "10.63.1.20", "10.63.1.1", "fd00:63:1::20");
    for (ns, name, v4, v6) in [
        (near, "near", "10.63.0.20", "fd00:63::20"),
        (far, "far", "10.63.1.20", "fd00:63:1::20"),
    ] {
        common::serve_named(ns, v4.parse().unwrap(), 8080, name);
        common::serve_named(ns, v6.parse().unwrap(), 8080, name);
    }
    for vip in ["10.96.70.10", "fd00:96::70"] {
        common::eventually(&format!("client -> {vip}"), || {
            common::backend(client, vip, 80).is_some()
        });
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..30 {
            let b = common::backend(client, vip, 80).expect("served");
            *seen.entry(b).or_default() += 1;
        }
        assert_eq!(
            seen.len(),
            2,
            "{vip}: a backend on each node serves: {seen:?}"
        );
        assert!(seen.values().all(|n| *n >= 5), "{vip}: spread: {seen:?}");
        // Ingress policy on the backend's node, whichever it is.
        assert!(
            common::backend(stranger, vip, 80).is_none(),
            "{vip}: the backends' ingress policy holds through the Service"
        );
    }
    // internalTrafficPolicy: Local: only this node's backend.
    for _ in 0..10 {
        assert_eq!(
            common::backend(client, "10.96.70.11", 80).as_deref(),
            Some("near")
        );
    }
    // ClientIP affinity across nodes: every connection to one backend.
    let first = common::backend(client, "10.96.70.12", 80).expect("served");
    for _ in 0..12 {
        assert_eq!(
            common::backend(client, "10.96.70.12", 80).as_deref(),
            Some(first.as_str())
        );
    }
    // The backend on the other node leaves while a connection to it is
    // open: that connection lives on, new ones go to the one left.
    let mut open = None;
    for _ in 0..40 {
        let (name, stream) = common::connect(client, "10.96.70.10", 80).expect("served");
        if name == "far" {
            open = Some(stream);
            break;
        }
    }
    let mut open = open.expect("a connection to the far backend");
    std::fs::write(
        manifests.join("cluster.yaml"),
        SERVICES2.replace(
            "metadata: {name: far, namespace: mns, labels: {app: api}}",
            "metadata: {name: far, namespace: mns, labels: {app: retired}}",
        ),
    )
    .unwrap();
    common::eventually("new connections avoid the removed backend", || {
        (0..6).all(|_| common::backend(client, "10.96.70.10", 80).as_deref() == Some("near"))
    });
    open.write_all(b"still").unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"still",
        "the open connection to the removed backend survives"
    );
    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(&root);
}
