//! IPv6 between pods through the switch, as an operator runs it: dual-stack
//! pods through vswitch-cni (host-local with an IPv4 and an IPv6 range),
//! neighbour discovery answered by the switch, policy on real IPv6 traffic,
//! the node through the gateway, and the attacks IPv6 adds (a forged source,
//! a forged neighbour advertisement, a router advertisement from a pod).
//!
//! Needs root; skipped outside CI without it. Every namespace and device is
//! uniquely named and removed on drop.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use etherparse::{Icmpv6Type, PacketBuilder};

mod common;

use common::{
    Attached, Cni, Netns, TempDir, Vswitchd, eventually, privileged, send_raw, serve_tcp, tcp,
    write_config,
};

const PODS: [&str; 4] = ["net6/web", "net6/db", "net6/client", "net6/other"];
/// A pod with an IPv6 address only.
const SOLO: &str = "net6/solo";

fn cluster(subnet6: &str) -> String {
    let mut m = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: net6}\n---\n");
    for p in PODS.iter().chain(&[SOLO]) {
        let name = p.split_once('/').unwrap().1;
        m += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: net6, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]}}\n---\n"
        );
    }
    // web: from client only, on the named port. db: from the pod subnet's
    // IPv6 block except `other` (filled in once addresses are known).
    m += "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: net6}\n\
          spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]\n";
    let _ = subnet6;
    m
}

fn db_policy(subnet6: &str, except: IpAddr) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db, namespace: net6}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: '{subnet6}', except: ['{except}/128']}}}}], ports: [{{port: 80}}]}}]\n"
    )
}

/// `ip -n NS ARGS`, its stdout.
fn ip_in(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.0])
        .args(args)
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether one ping from `ns` to `to` is answered.
fn ping(ns: &Netns, to: IpAddr) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            &to.to_string(),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn dual_stack_pods_talk_over_ipv6_under_policy_and_cannot_spoof() {
    let pid = std::process::id() % 100_000;
    let tag = format!("vs6{pid}");
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let s = 100 + (pid % 100) as u8;
    let subnet4 = format!("10.93.{s}.0/24");
    let subnet6 = format!("fd00:93:{s}::/64");
    let gw4 = format!("10.93.{s}.1");
    let gw6: IpAddr = format!("fd00:93:{s}::1").parse().unwrap();
    let tmp = TempDir::new(&tag);
    let dir = tmp.0.clone();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/cluster.yaml"), cluster(&subnet6)).unwrap();
    let (config, socket) = write_config(
        &dir,
        &format!("[gateway]\nname = \"{tag}\"\naddress = \"{gw4}/24\"\naddress6 = \"{gw6}/64\"\n"),
    );
    let daemon = Vswitchd::start(&config, &socket);
    let cni = Cni {
        netconf: serde_json::json!({
            "cniVersion": "1.0.0", "name": "vswitch", "type": "vswitch-cni", "socket": socket,
            "ipam": {"type": "host-local", "ranges": [
                [{"subnet": subnet4, "gateway": gw4}],
                [{"subnet": subnet6, "gateway": gw6.to_string()}]],
                "dataDir": dir.join("ipam")},
        })
        .to_string(),
    };
    let spaces: Vec<Netns> = (0..PODS.len())
        .map(|i| Netns::new(format!("{tag}p{i}")))
        .collect();
    let mut v6 = Vec::new();
    for (pod, ns) in PODS.iter().zip(&spaces) {
        let (ok, result) = cni.call("ADD", ns, pod);
        assert!(ok, "CNI ADD {pod}: {result}");
        let ips = addresses(&result);
        assert_eq!(ips.len(), 2, "dual-stack: {result}");
        let a6 = *ips.iter().find(|a| a.is_ipv6()).unwrap();
        assert!(
            result["routes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["dst"] == "::/0" && r["gw"] == "fe80::1"),
            "{result}"
        );
        v6.push(a6);
    }
    let _attached = Attached {
        cni: &cni,
        pods: PODS
            .iter()
            .zip(&spaces)
            .map(|(p, ns)| (ns, p.to_string()))
            .collect(),
    };
    // An IPv6-only pod: IPAM with the IPv6 range alone.
    let solo_cni = Cni {
        netconf: serde_json::json!({
            "cniVersion": "1.0.0", "name": "vswitch", "type": "vswitch-cni", "socket": socket,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet6}]], "dataDir": dir.join("ipam")},
        })
        .to_string(),
    };
    let solo = Netns::new(format!("{tag}s"));
    let (ok, result) = solo_cni.call("ADD", &solo, SOLO);
    assert!(ok, "CNI ADD {SOLO}: {result}");
    let solo_ips = addresses(&result);
    assert_eq!(solo_ips.len(), 1, "IPv6 only: {result}");
    let solo6 = solo_ips[0];
    assert!(solo6.is_ipv6());
    let _solo_attached = Attached {
        cni: &solo_cni,
        pods: vec![(&solo, SOLO.to_string())],
    };
    let (web, db, client, other) = (&spaces[0], &spaces[1], &spaces[2], &spaces[3]);
    let (web6, db6, client6, other6) = (v6[0], v6[1], v6[2], v6[3]);
    std::fs::write(dir.join("manifests/db.yaml"), db_policy(&subnet6, other6)).unwrap();
    serve_tcp(web, &web6.to_string(), 80);
    serve_tcp(db, &db6.to_string(), 80);

    // Neighbour discovery answered by the switch, then real IPv6 traffic.
    eventually("client reaches web over IPv6", || {
        tcp(client, &web6.to_string(), 80)
    });
    let neigh = ip_in(client, &["-6", "neigh", "show", &web6.to_string()]);
    let web_mac = ip_in(web, &["link", "show", "eth0"]);
    let web_mac = web_mac
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_string();
    assert!(neigh.contains(&web_mac), "answered with web's MAC: {neigh}");
    assert!(
        ping(client, other6),
        "ICMPv6 echo through conntrack (other is not isolated)"
    );
    assert!(
        !ping(client, web6),
        "web is isolated: only tcp/http from client"
    );
    // Policy on IPv6: a pod selector and a named port...
    assert!(!tcp(other, &web6.to_string(), 80), "web admits only client");
    // ...and an ipBlock with except.
    eventually("the db policy is in force", || {
        tcp(client, &db6.to_string(), 80) && !tcp(other, &db6.to_string(), 80)
    });
    assert!(tcp(web, &db6.to_string(), 80), "inside the block");
    // The node through the gateway, both ways.
    let node_listener = TcpListener::bind(SocketAddr::new(gw6, 0)).expect("bind on the gateway");
    let node_port = node_listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in node_listener.incoming() {
            let Ok(mut c) = c else { return };
            let _ = std::io::Write::write_all(&mut c, b"node");
        }
    });
    assert!(
        common::probe(&client.0, gw6, node_port, false)
            .join()
            .unwrap(),
        "a pod reaches its node over IPv6 (via fe80::1)"
    );
    let from_node = std::net::TcpStream::connect_timeout(
        &SocketAddr::new(client6, 9),
        Duration::from_millis(1500),
    );
    assert!(
        matches!(&from_node, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the node reaches a pod over IPv6 (refused by the pod itself, not dropped): {from_node:?}"
    );

    // Attacks. A forged source: other sends as web (which db admits).
    ip_in(
        other,
        &[
            "addr",
            "add",
            &format!("{web6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip_in(
        other,
        &[
            "route",
            "replace",
            &format!("{db6}/128"),
            "dev",
            "eth0",
            "src",
            &web6.to_string(),
        ],
    );
    assert!(
        !tcp(other, &db6.to_string(), 80),
        "a forged IPv6 source is dropped"
    );
    ip_in(other, &["route", "del", &format!("{db6}/128")]);
    ip_in(
        other,
        &["addr", "del", &format!("{web6}/128"), "dev", "eth0"],
    );
    // A forged neighbour advertisement: other claims web's address to client.
    let other_mac = mac_of(other);
    let client_mac = mac_of(client);
    let mut na = Vec::new();
    let mut body = octets(web6).to_vec();
    body.extend_from_slice(&[2, 1]);
    body.extend_from_slice(&other_mac);
    PacketBuilder::ethernet2(other_mac, client_mac)
        .ipv6(octets(other6), octets(client6), 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 136,
            code_u8: 0,
            bytes5to8: [0x20, 0, 0, 0],
        })
        .write(&mut na, &body)
        .unwrap();
    send_raw(other, "eth0".into(), na);
    // A router advertisement from a pod.
    let mut ra = Vec::new();
    PacketBuilder::ethernet2(other_mac, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(
            octets(link_local(other_mac)),
            octets("ff02::1".parse().unwrap()),
            255,
        )
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 134,
            code_u8: 0,
            bytes5to8: [64, 0, 0x07, 0x08],
        })
        .write(&mut ra, &[0u8; 8])
        .unwrap();
    send_raw(other, "eth0".into(), ra);
    std::thread::sleep(Duration::from_millis(300));
    let neigh = ip_in(client, &["-6", "neigh", "show", &web6.to_string()]);
    assert!(
        !neigh.contains(&mac_text(other_mac)),
        "the forged advertisement never reached client: {neigh}"
    );
    let routes = ip_in(client, &["-6", "route", "show"]);
    assert!(
        !routes.contains("proto ra"),
        "no route learned from a pod's router advertisement: {routes}"
    );
    assert!(
        tcp(client, &web6.to_string(), 80),
        "client still reaches web"
    );
    let trace = common::flowctl(&socket, &["dump-ports", "-o", "json"]);
    let ports: serde_json::Value = serde_json::from_str(&trace).unwrap();
    let other_port = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "net6/other")
        .unwrap();
    assert!(
        other_port["drops"]["flow"].as_u64().unwrap() >= 2,
        "the forged frames were dropped on other's port: {other_port}"
    );

    // Duplicate address detection completes: an address re-added without
    // `nodad` is probed (unanswered) and becomes usable.
    ip_in(
        client,
        &["addr", "del", &format!("{client6}/64"), "dev", "eth0"],
    );
    ip_in(
        client,
        &["addr", "add", &format!("{client6}/64"), "dev", "eth0"],
    );
    eventually("DAD completes and the address works", || {
        let a = ip_in(client, &["-6", "addr", "show", "dev", "eth0"]);
        assert!(!a.contains("dadfailed"), "DAD must not fail: {a}");
        !a.contains("tentative") && tcp(client, &web6.to_string(), 80)
    });
    drop(daemon);
}

/// The addresses of a CNI result.
fn addresses(result: &serde_json::Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let cidr = i["address"].as_str().unwrap();
            cidr.split('/').next().unwrap().parse().unwrap()
        })
        .collect()
}

fn octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn link_local(mac: [u8; 6]) -> IpAddr {
    policy::pipeline::link_local(mac)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn mac_of(ns: &Netns) -> [u8; 6] {
    let text = ip_in(ns, &["link", "show", "eth0"]);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap();
    let mut out = [0u8; 6];
    for (o, b) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(b, 16).unwrap();
    }
    out
}
