//! End to end: network namespaces as pods, real TAP devices held by the switch,
//! real TCP and UDP sockets inside the namespaces, policy enforced per packet.
//!
//! Needs root (TAP devices, `ip netns`); skipped with a message otherwise. Every
//! namespace and device is uniquely named and removed on drop, even on failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use control::{L4, Request};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::compile::Change;
use policy::model::{ObjectKey, Pod, Policy};
use vswitch::Tap;
use vswitch::port::TapPort;

mod common;

use common::{
    Attached, Cni, Netns, Running, TempDir, Vswitchd, eventually, flowctl, ip, privileged,
    send_raw, serve_tcp, tcp, udp, write_config,
};

struct Lab {
    // Field order matters: the switch (and its TAP fds) goes before the namespaces.
    running: Running,
    a: Netns,
    b: Netns,
    c: Netns,
}

const A_IP: &str = "10.99.0.1";
const B_IP: &str = "10.99.0.2";
/// A third pod: the attacker where one is needed.
const C_IP: &str = "10.99.0.3";

fn lab() -> Option<Lab> {
    lab_with(Default::default())
}

fn lab_with(config: datapath::DatapathConfig) -> Option<Lab> {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!(
        "vst{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    );
    // Not root, or no TUN driver: nothing here can run.
    if !privileged(&format!("{id}x")) {
        return None;
    }
    let running = Running::with(&format!("{id}p"), config);
    let a = Netns::new(format!("{id}a"));
    let b = Netns::new(format!("{id}b"));
    let c = Netns::new(format!("{id}c"));
    for (ns, addr, last, name, labels) in [
        (&a, A_IP, 1u8, "a", "client"),
        (&b, B_IP, 2, "b", "server"),
        (&c, C_IP, 3, "c", "other"),
    ] {
        plug(&running, &id, ns, name, addr, last, labels);
    }
    Some(Lab { running, a, b, c })
}

/// Attaches pod `test/NAME` (app=`labels`) in `ns` to the switch: a TAP device
/// `{id}{name}` moved into `ns`, MAC 0a:58:0a:63:00:`last`, addresses `addr`/24
/// and fd00:99::`last`.
fn plug(running: &Running, id: &str, ns: &Netns, name: &str, addr: &str, last: u8, labels: &str) {
    let dev = format!("{id}{name}");
    let mac = [0x0a, 0x58, 10, 99, 0, last];
    let tap = Tap::open(&dev, false).unwrap();
    common::place_in(ns, &dev, mac, &format!("{addr}/24"));
    let key = ObjectKey::new("test", name);
    running
        .switch
        .attach(
            Arc::new(TapPort(tap)),
            key.clone(),
            mac,
            // An IPv6 address too: what a pod could send router messages from.
            vec![
                addr.parse().unwrap(),
                format!("fd00:99::{last}").parse().unwrap(),
            ],
        )
        .unwrap();
    running
        .switch
        .apply(Change::Pod(Pod {
            key,
            labels: [("app".to_string(), labels.to_string())].into(),
            ips: vec![],
            node: None,
            ports: vec![],
        }))
        .unwrap();
}

impl Lab {
    fn policy(&self, yaml: &str) {
        let np: NetworkPolicy = serde_saphyr::from_str(yaml).unwrap();
        self.running
            .switch
            .apply(Change::Policy(Policy::from_api(&np).unwrap()))
            .unwrap();
    }
}

#[test]
fn pods_talk_through_the_switch_and_policy_is_enforced_per_packet() {
    let Some(lab) = lab() else { return };
    serve_tcp(&lab.b, B_IP, 8080);
    serve_tcp(&lab.b, B_IP, 8081);
    serve_tcp(&lab.a, A_IP, 9000);

    // No policy: everything flows, both ways, TCP and UDP.
    assert!(tcp(&lab.a, B_IP, 8080), "a -> b tcp/8080 with no policy");
    assert!(tcp(&lab.b, A_IP, 9000), "b -> a tcp/9000 with no policy");
    assert!(udp(&lab.a, &lab.b, B_IP, 5353), "a -> b udp with no policy");

    // Default deny for b, both directions.
    lab.policy(
        "metadata: {name: deny, namespace: test}\nspec: {podSelector: {matchLabels: {app: server}}, policyTypes: [Ingress, Egress]}\n",
    );
    assert!(!tcp(&lab.a, B_IP, 8080), "a -> b denied by default deny");
    assert!(!udp(&lab.a, &lab.b, B_IP, 5354), "udp denied too");

    // Allow clients on 8080 only; b's egress stays denied, yet replies pass.
    lab.policy(
        "metadata: {name: allow-clients, namespace: test}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n",
    );
    assert!(
        tcp(&lab.a, B_IP, 8080),
        "a -> b tcp/8080 allowed, replies pass conntrack"
    );
    assert!(!tcp(&lab.a, B_IP, 8081), "8081 is not allowed");
    assert!(
        !tcp(&lab.b, A_IP, 9000),
        "b's new connections out are denied (egress)"
    );

    let stats = lab.running.switch.datapath().stats();
    let flow_drops = stats
        .drops
        .iter()
        .find(|(r, _)| r.name() == "flow")
        .map(|(_, n)| *n)
        .unwrap_or(0);
    assert!(
        flow_drops > 0,
        "denied packets were dropped by flows: {stats:?}"
    );
    assert!(stats.packets > 20);
}

// ---- vswitchd and vswitch-cni, as a container runtime drives them -----------------

use std::collections::HashMap as Map;

use std::time::Instant;

#[test]
fn vswitchd_with_cni_manifests_and_restart() {
    if !privileged(&format!("vsc{}x", std::process::id() % 100_000)) {
        return;
    }
    if !std::path::Path::new("/usr/lib/cni/host-local").exists()
        && !std::path::Path::new("/opt/cni/bin/host-local").exists()
    {
        panic!(
            "host-local IPAM plugin missing: install containernetworking-plugins (scripts/test.sh does)"
        );
    }
    let id = format!("vsc{}", std::process::id() % 100_000);
    let tmp = TempDir::new("e2e");
    let dir = tmp.0.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let manifests = dir.join("manifests");
    std::fs::write(
        manifests.join("pods.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\n",
    )
    .unwrap();
    let policy = |ports: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db, namespace: shop}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  policyTypes: [Ingress, Egress]\n\
             \n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{ports}]}}]\n"
        )
    };
    std::fs::write(manifests.join("policy.yaml"), policy("{port: 8080}")).unwrap();
    // With TAP offloads: the virtio-net header passes between ports.
    let (config, socket) = write_config(&dir, "offload = true\n");
    let mut daemon = Vswitchd::start(&config, &socket);
    let cni = Cni {
        netconf: serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "vswitch",
            "type": "vswitch-cni",
            "socket": socket,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.97.0.0/24"}]], "dataDir": dir.join("ipam")},
        })
        .to_string(),
    };
    let web_ns = Netns::new(format!("{id}w"));
    let db_ns = Netns::new(format!("{id}d"));
    let mut attached = Attached {
        cni: &cni,
        pods: vec![],
    };
    let mut ip_of = Map::new();
    for (ns, pod) in [(&web_ns, "shop/web"), (&db_ns, "shop/db")] {
        let (ok, result) = cni.call("ADD", ns, pod);
        assert!(ok, "CNI ADD {pod}: {result}");
        attached.pods.push((ns, pod.to_string()));
        let addr = result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        assert_eq!(result["interfaces"][0]["name"], "eth0");
        ip_of.insert(pod, addr);
    }
    let (web, db) = (ip_of["shop/web"].clone(), ip_of["shop/db"].clone());
    serve_tcp(&db_ns, &db, 8080);
    serve_tcp(&db_ns, &db, 8081);
    serve_tcp(&web_ns, &web, 9000);
    assert!(
        cni.call("CHECK", &db_ns, "shop/db").0,
        "CHECK of an attached pod"
    );

    assert!(tcp(&web_ns, &db, 8080), "web -> db:8080 allowed");
    assert!(!tcp(&web_ns, &db, 8081), "web -> db:8081 denied");
    assert!(!tcp(&db_ns, &web, 9000), "db egress denied");

    // Live trace through the control socket names the deciding rule.
    let trace = |port: u16| common::trace(&socket, "shop/web", "shop/db", L4::Tcp(port)).unwrap();
    let t = trace(8080);
    assert_eq!(
        (t["verdict"].as_str(), t["rule"].as_str()),
        (Some("allow"), Some("shop/db ingress rule 0")),
        "{t}"
    );
    let t = trace(8081);
    assert_eq!(t["rule"], "default deny of shop/db (ingress)", "{t}");
    let flows = common::ask(&socket, &Request::DumpFlows).unwrap();
    let hits = |rule: &str| -> u64 {
        flows
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["rule"] == rule)
            .map(|f| f["n_packets"].as_u64().unwrap())
            .sum()
    };
    assert!(
        hits("shop/db ingress rule 0") > 0,
        "allow flows counted packets"
    );
    assert!(
        hits("default deny of shop/db (ingress)") > 0,
        "deny flows counted packets"
    );

    // A policy edit is enforced for new connections. How long the switch took to
    // notice, compile and publish it is printed (a figure, not a check).
    let realised = || {
        common::ask(&socket, &Request::Stats).unwrap()["realisation"]["generation"]
            .as_u64()
            .unwrap()
    };
    let before = realised();
    let edited = Instant::now();
    std::fs::write(
        manifests.join("policy.yaml"),
        policy("{port: 8080}, {port: 8081}"),
    )
    .unwrap();
    while realised() == before {
        assert!(
            edited.elapsed() < Duration::from_secs(8),
            "edit never realised"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    eprintln!(
        "manifest edit written -> flows published: {:.1} ms",
        edited.elapsed().as_secs_f64() * 1e3
    );
    eventually("8081 allowed after the edit", || tcp(&web_ns, &db, 8081));
    // An invalid edit is reported and the last good version stays.
    std::fs::write(
        manifests.join("policy.yaml"),
        policy("{port: 8080, endPort: 10}"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(tcp(&web_ns, &db, 8081), "last good policy still in force");
    assert!(!tcp(&db_ns, &web, 9000), "and still isolating db");

    // A graceful restart (SIGTERM, as a rollout does) keeps established
    // connections: conntrack is saved and restored. db may not open connections
    // to web, so the stream continues only if conntrack remembers it.
    let db_addr: SocketAddr = format!("{db}:8080").parse().unwrap();
    let mut stream =
        web_ns.run(move || TcpStream::connect_timeout(&db_addr, Duration::from_secs(2)).unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut echo = |word: &[u8]| -> Vec<u8> {
        stream.write_all(word).unwrap();
        let mut buf = vec![0u8; word.len()];
        stream.read_exact(&mut buf).map(|_| buf).unwrap_or_default()
    };
    assert_eq!(echo(b"before"), b"before");
    daemon.terminate();
    daemon.restart();
    assert_eq!(
        echo(b"after"),
        b"after",
        "the established connection continues after a graceful restart"
    );

    // kill -9: nothing is forwarded while vswitchd is down...
    daemon.kill9();
    assert!(
        !tcp(&web_ns, &db, 8080),
        "nothing forwarded while vswitchd is down"
    );
    // ...and after a restart every port is back, under policy from the first packet.
    daemon.restart();
    eventually("ports reattached after restart", || tcp(&web_ns, &db, 8080));
    assert!(
        tcp(&web_ns, &db, 8081),
        "policy from the manifests (last good file)"
    );
    assert!(!tcp(&db_ns, &web, 9000), "db still isolated after restart");

    // DEL removes the port; a second DEL succeeds too.
    assert!(cni.call("DEL", &db_ns, "shop/db").0);
    assert!(cni.call("DEL", &db_ns, "shop/db").0, "DEL is idempotent");
    attached.pods.retain(|(_, p)| p != "shop/db");
    let ports = common::ask(&socket, &Request::Ports).unwrap();
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    // Nothing left behind: no flow for db's address or port, no device.
    let flows = common::ask(&socket, &Request::DumpFlows).unwrap();
    let leftover: Vec<_> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["flow"].as_str())
        .filter(|f| f.contains(&format!("={db},")) || f.contains(&format!("={db} ")))
        .collect();
    assert!(leftover.is_empty(), "flows for db after DEL: {leftover:?}");
    let link = Command::new("ip")
        .args(["-n", &db_ns.0, "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(!link.status.success(), "db's device is gone after DEL");
    drop(attached);
    drop(daemon);
    drop(tmp);
}

// ---- spoofing, named ports, port ranges ---------------------------------------------

fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(40000, port)
        .write(&mut f, b"spoof")
        .unwrap();
    f
}

#[test]
fn spoofing_is_dropped_named_ports_and_ranges_are_enforced() {
    let Some(lab) = lab() else { return };
    let id = lab.a.0.trim_end_matches('a').to_string();
    let (a_mac, b_mac) = ([0x0a, 0x58, 10, 99, 0, 1], [0x0a, 0x58, 10, 99, 0, 2]);
    let (a_ip, b_ip) = ([10, 99, 0, 1], [10, 99, 0, 2]);
    let rx = lab
        .b
        .run(|| UdpSocket::bind("10.99.0.2:7000").expect("bind"));
    rx.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let received = || {
        let mut buf = [0u8; 64];
        rx.recv_from(&mut buf).is_ok()
    };
    let dev = format!("{id}a");
    // The very first frame, sent right after b was attached: it must not be lost
    // to a packet thread still holding the port set from before the attach.
    // The control: a correct frame arrives, so the raw path works.
    send_raw(
        &lab.a,
        dev.clone(),
        udp_frame(a_mac, b_mac, a_ip, b_ip, 7000),
    );
    let ok = received();
    assert!(ok, "a correct frame from a reaches b");
    // IP spoofing, MAC spoofing, and ARP claiming b's address: all dropped.
    send_raw(
        &lab.a,
        dev.clone(),
        udp_frame(a_mac, b_mac, [10, 99, 0, 9], b_ip, 7000),
    );
    assert!(!received(), "spoofed source IP dropped");
    send_raw(
        &lab.a,
        dev.clone(),
        udp_frame([0x0a, 0x58, 1, 2, 3, 4], b_mac, a_ip, b_ip, 7000),
    );
    assert!(!received(), "spoofed source MAC dropped");
    let spoofguard_drops = || -> u64 {
        lab.running
            .switch
            .datapath()
            .flow_stats()
            .iter()
            .filter(|s| {
                policy::pipeline::describe(s.entry.cookie) == Some("spoofguard: spoofed or unknown")
            })
            .map(|s| s.packets)
            .sum()
    };
    let before = spoofguard_drops();
    let mut arp = Vec::new();
    etherparse::PacketBuilder::ethernet2(a_mac, [0xff; 6])
        .arp(
            etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REPLY,
                &a_mac,
                &b_ip,
                &[0xff; 6],
                &b_ip,
            )
            .unwrap(),
        )
        .write(&mut arp)
        .unwrap();
    send_raw(&lab.a, dev.clone(), arp);
    let start = std::time::Instant::now();
    while spoofguard_drops() == before && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        spoofguard_drops() > before,
        "an ARP reply claiming b's address is dropped by spoofguard"
    );

    // Garbage: truncated and malformed frames are dropped and counted on the
    // port they came from, and the switch keeps forwarding.
    let malformed = || -> u64 {
        let ports = lab.running.switch.ports();
        let p = ports.iter().find(|p| p.no == datapath::PortNo(1)).unwrap();
        p.counters.drop_count("malformed")
    };
    let before = malformed();
    let good = udp_frame(a_mac, b_mac, a_ip, b_ip, 7000);
    let mut bad_version = good.clone();
    bad_version[14] = 0x75; // IP version 7
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x42; // header length 8 bytes
    let truncated = good[..14 + 10].to_vec();
    let mut wrong_total = good.clone();
    wrong_total[16..18].copy_from_slice(&9000u16.to_be_bytes()); // longer than the frame
    for junk in [bad_version, short_ihl, truncated, wrong_total] {
        send_raw(&lab.a, dev.clone(), junk);
    }
    let start = std::time::Instant::now();
    while malformed() < before + 4 && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        malformed(),
        before + 4,
        "each garbage frame counted as malformed"
    );
    send_raw(&lab.a, dev.clone(), good.clone());
    assert!(received(), "and the switch still forwards");

    // Frames pods never send legitimately are dropped by spoofguard, even from
    // the pod's own MAC and address: a VLAN tag (a way into another segment),
    // and IPv6 router advertisements, redirects and neighbour advertisements.
    let dropped_by = |purpose: &'static str| {
        let r = lab.running.switch.clone();
        move || -> u64 {
            r.datapath()
                .flow_stats()
                .iter()
                .filter(|s| policy::pipeline::describe(s.entry.cookie) == Some(purpose))
                .map(|s| s.packets)
                .sum()
        }
    };
    let untagged_only = dropped_by("spoofguard: spoofed or unknown");
    let before = untagged_only();
    let mut tagged = Vec::new();
    etherparse::PacketBuilder::ethernet2(a_mac, b_mac)
        .single_vlan(etherparse::VlanId::try_new(7).unwrap())
        .ipv4(a_ip, b_ip, 64)
        .udp(40000, 7000)
        .write(&mut tagged, b"tagged")
        .unwrap();
    send_raw(&lab.a, dev.clone(), tagged);
    eventually("the tagged frame dropped by spoofguard", || {
        untagged_only() > before
    });
    let router_only = dropped_by(
        "spoofguard: router advertisement, redirect or neighbour advertisement (the switch answers for every address)",
    );
    for icmp_type in [134u8, 136, 137] {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(a_mac, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(
                "fd00:99::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                "ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                255,
            )
            .icmpv6_raw(icmp_type, 0, [0; 4])
            .write(&mut f, &[0; 16])
            .unwrap();
        let before = router_only();
        send_raw(&lab.a, dev.clone(), f);
        eventually("a router message from a pod dropped by spoofguard", || {
            router_only() > before
        });
    }

    // Named port "http" (8080 on b) and a range 9000-9010, for clients only.
    lab.running
        .switch
        .apply(Change::Pod(Pod {
            key: ObjectKey::new("test", "b"),
            labels: [("app".to_string(), "server".to_string())].into(),
            ips: vec![],
            node: None,
            ports: vec![policy::model::NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: policy::model::Protocol::Tcp,
            }],
        }))
        .unwrap();
    lab.policy(
        "metadata: {name: ports, namespace: test}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}, {port: 9000, endPort: 9010}]}]\n",
    );
    for port in [8080, 8081, 9000, 9005, 9010, 9011] {
        serve_tcp(&lab.b, B_IP, port);
    }
    assert!(tcp(&lab.a, B_IP, 8080), "named port http");
    assert!(!tcp(&lab.a, B_IP, 8081));
    for (port, want) in [(9000, true), (9005, true), (9010, true), (9011, false)] {
        assert_eq!(
            tcp(&lab.a, B_IP, port),
            want,
            "range 9000-9010, port {port}"
        );
    }
}

// ---- the upstream NetworkPolicy cases, over real traffic -----------------------------

#[test]
fn pods_reach_their_node_through_the_gateway_even_when_isolated() {
    let pid = std::process::id() % 100_000;
    if !privileged(&format!("vsg{pid}x")) {
        return;
    }
    let tmp = TempDir::new("gw");
    let dir = tmp.0.clone();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let gw_name = format!("vsg{pid}");
    let subnet = 100 + (pid % 50) as u8;
    let gw_ip = format!("10.95.{subnet}.1");
    std::fs::write(
        dir.join("manifests/policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: app}\n\
         spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n",
    )
    .unwrap();
    let (config, socket) = write_config(
        &dir,
        &format!("offload = true\n[gateway]\nname = {gw_name:?}\naddress = \"{gw_ip}/24\"\n"),
    );
    let daemon = Vswitchd::start(&config, &socket);
    let cni = Cni {
        netconf: serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "vswitch",
            "type": "vswitch-cni",
            "socket": socket,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.95.{subnet}.0/24"), "gateway": gw_ip}]], "dataDir": dir.join("ipam")},
        })
        .to_string(),
    };
    let ns = Netns::new(format!("vsg{pid}p"));
    let (ok, result) = cni.call("ADD", &ns, "app/pod");
    assert!(ok, "CNI ADD: {result}");
    let attached = Attached {
        cni: &cni,
        pods: vec![(&ns, "app/pod".to_string())],
    };
    assert_eq!(result["ips"][0]["gateway"], gw_ip.as_str());
    let pod_ip = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();

    // The node (host namespace, on the gateway address) and the pod each listen.
    let node = TcpListener::bind(format!("{gw_ip}:7700")).expect("bind on the gateway address");
    std::thread::spawn(move || {
        for c in node.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(b"hello");
        }
    });
    serve_tcp(&ns, &pod_ip, 8080);
    let pod_to_node = {
        let addr: SocketAddr = format!("{gw_ip}:7700").parse().unwrap();
        ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok())
    };
    assert!(
        pod_to_node,
        "an isolated pod reaches its own node through the gateway"
    );
    let node_to_pod = TcpStream::connect_timeout(
        &format!("{pod_ip}:8080").parse().unwrap(),
        Duration::from_millis(1500),
    )
    .is_ok();
    assert!(
        node_to_pod,
        "the node reaches an isolated pod (own-node traffic is always allowed)"
    );
    drop(attached);
    drop(daemon);
    drop(tmp);
}

// ---- observability: flows, ports, conntrack, audit log, metrics, live trace -------

/// GET /metrics over plain HTTP/1.0.
fn scrape(address: &str) -> String {
    let mut s = TcpStream::connect(address).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[test]
fn operators_see_flows_ports_connections_audit_and_metrics() {
    let tag = format!("vso{}", std::process::id() % 100_000);
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let tmp = TempDir::new("obs");
    let dir = tmp.0.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let manifests = "apiVersion: v1\nkind: Namespace\nmetadata: {name: obs}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: obs, labels: {app: client}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: obs, labels: {app: server}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: obs, labels: {app: other}}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: obs}\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n";
    std::fs::write(dir.join("manifests/obs.yaml"), manifests).unwrap();
    let metrics = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let audit = dir.join("audit/audit.log");
    let (config, socket) = write_config(
        &dir,
        &format!(
            "metrics_address = {metrics:?}\n[audit]\npath = {:?}\nallowed = true\nattempt_quiet_ms = 1500\n",
            audit.to_str().unwrap()
        ),
    );
    let _daemon = Vswitchd::start(&config, &socket);
    let cni = Cni {
        netconf: serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "vswitch",
            "type": "vswitch-cni",
            "socket": socket,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.0.0/24"}]], "dataDir": dir.join("ipam")},
        })
        .to_string(),
    };
    let nss: Vec<Netns> = ["c", "s", "o"]
        .iter()
        .map(|x| Netns::new(format!("{tag}{x}")))
        .collect();
    let mut attached = Attached {
        cni: &cni,
        pods: vec![],
    };
    let mut ip = Map::new();
    for (ns, pod) in nss.iter().zip(["obs/client", "obs/server", "obs/other"]) {
        let (ok, result) = cni.call("ADD", ns, pod);
        assert!(ok, "CNI ADD {pod}: {result}");
        attached.pods.push((ns, pod.to_string()));
        let addr = result["ips"][0]["address"].as_str().unwrap();
        ip.insert(pod, addr.split('/').next().unwrap().to_string());
    }
    let (client, server, other) = (&nss[0], &nss[1], &nss[2]);
    let server_ip = ip["obs/server"].clone();
    serve_tcp(server, &server_ip, 8080);
    serve_tcp(server, &server_ip, 8081);

    let counters = || -> Map<String, u64> {
        let flows = common::ask(&socket, &Request::DumpFlows).unwrap();
        flows
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    format!(
                        "{} # {}",
                        f["flow"].as_str().unwrap(),
                        f["rule"].as_str().unwrap()
                    ),
                    f["n_packets"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = counters();
    assert!(
        tcp(client, &server_ip, 8080),
        "client -> server:8080 allowed"
    );
    assert!(!tcp(other, &server_ip, 8080), "other -> server:8080 denied");
    assert!(
        !tcp(client, &server_ip, 8081),
        "client -> server:8081 denied"
    );

    // Counters moved on exactly the policy flows expected.
    let after = counters();
    let moved: Vec<&String> = after
        .iter()
        .filter(|(k, n)| before.get(*k).copied().unwrap_or(0) < **n)
        .map(|(k, _)| k)
        .filter(|k| {
            ["40", "41", "42", "50", "51", "52"]
                .iter()
                .any(|t| k.contains(&format!("table={t},")))
        })
        .collect();
    let allow = "obs/allow-client ingress rule 0";
    let deny = "default deny of obs/server (ingress)";
    assert!(
        moved.iter().any(|k| k.ends_with(allow)),
        "allow rule counted: {moved:#?}"
    );
    assert!(
        moved.iter().any(|k| k.ends_with(deny)),
        "default deny counted: {moved:#?}"
    );
    for k in &moved {
        assert!(
            k.ends_with(allow)
                || k.ends_with(deny)
                || k.ends_with("policy: not isolated")
                || k.contains("tier rule decided"),
            "unexpected policy flow moved: {k}"
        );
    }

    // flowctl, live: flows with counters and rules, ports, connections, stats.
    let text = flowctl(&socket, &["dump-flows", "--table", "51"]);
    assert!(
        text.lines()
            .any(|l| l.contains("n_packets=") && l.contains("duration=") && l.contains(allow)),
        "{text}"
    );
    assert!(!text.contains("table=50,"), "--table filters: {text}");
    let ports = flowctl(&socket, &["dump-ports"]);
    assert!(
        ports.starts_with("PORT") && ports.contains("obs/client"),
        "{ports}"
    );
    let conns: serde_json::Value = serde_json::from_str(&flowctl(
        &socket,
        &[
            "-o",
            "json",
            "dump-conntrack",
            &format!("dst={server_ip},dport=8080,proto=tcp"),
        ],
    ))
    .unwrap();
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["src"] == ip["obs/client"].as_str() && c["dport"] == 8080),
        "the allowed connection is tracked: {conns}"
    );
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["dst"] == server_ip.as_str()),
        "filter applied: {conns}"
    );
    let top = flowctl(
        &socket,
        &[
            "watch",
            "--count",
            "2",
            "--interval",
            "0.2",
            "--table",
            "51",
        ],
    );
    assert_eq!(top.matches("flowctl watch:").count(), 2, "{top}");
    assert!(top.contains("PKT/S") && top.contains(allow), "{top}");
    let stats = flowctl(&socket, &["stats"]);
    assert!(
        stats.contains("hit rate") && stats.contains("policy realisation"),
        "{stats}"
    );

    // Live trace names the same rule as the offline trace of the same cluster.
    let live: serde_json::Value = serde_json::from_str(&flowctl(
        &socket,
        &[
            "-o",
            "json",
            "trace",
            "tcp,src=obs/other,dst=obs/server,tp_dst=8080",
        ],
    ))
    .unwrap();
    let mut m = policy::manifest::Manifests::default();
    policy::manifest::load_str(&mut m, std::path::Path::new("obs.yaml"), manifests);
    let mut cluster = m.to_cluster();
    for (pod, addr) in &ip {
        let key: ObjectKey = pod.parse().unwrap();
        let mut p = cluster.pod(&key).unwrap().clone();
        p.ips = vec![addr.parse().unwrap()];
        cluster.upsert_pod(p);
    }
    let offline = policy::offline::Offline::new(cluster).unwrap();
    let traced = offline
        .trace(
            &policy::probe::Endpoint::Pod("obs/other".parse().unwrap()),
            &policy::probe::Endpoint::Pod("obs/server".parse().unwrap()),
            policy::probe::L4::Tcp(8080),
        )
        .unwrap();
    assert_eq!(live["rule"], traced.verdict.rule.as_str(), "{live}");
    assert_eq!(live["rule"], deny);
    assert_eq!(live["connection"], "new");

    // Hand-added flows: listed as manual, removable, never over a compiled flow.
    let manual = format!(
        "table=0,priority=1000,ip,nw_src={},actions=drop",
        ip["obs/other"]
    );
    flowctl(&socket, &["add-flow", &manual]);
    assert!(flowctl(&socket, &["dump-flows", "--table", "0"]).contains("manual flow"));
    let refused = common::ask(
        &socket,
        &Request::AddFlow {
            flow: "table=40,priority=0,actions=goto_table:50".into(),
        },
    );
    assert!(
        matches!(&refused, Err(e) if e.contains("compiled flow")),
        "{refused:?}"
    );
    assert!(flowctl(&socket, &["del-flows"]).starts_with("1 flow"));
    assert!(!flowctl(&socket, &["dump-flows", "--table", "0"]).contains("manual flow"));

    // The audit log names the denied connection's rule; the allowed one too.
    let other_ip = ip["obs/other"].clone();
    let mut lines: Vec<serde_json::Value> = vec![];
    eventually("audit lines for both connections", || {
        lines = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        lines
            .iter()
            .any(|l| l["verdict"] == "deny" && l["src_ip"] == other_ip.as_str())
            && lines
                .iter()
                .any(|l| l["verdict"] == "allow" && l["rule"] == allow)
    });
    let denied = lines
        .iter()
        .find(|l| l["verdict"] == "deny" && l["src_ip"] == other_ip.as_str())
        .unwrap();
    assert_eq!(denied["rule"], deny, "{denied}");
    assert_eq!(denied["src_pod"], "obs/other");
    assert_eq!(denied["dst_pod"], "obs/server");
    assert_eq!(denied["dst_port"], 8080);
    assert_eq!(denied["protocol"], "tcp");
    assert_eq!(denied["decided_by"][0]["default_deny_of"], "obs/server");
    // One line per connection attempt: the retransmitted SYNs of a denied
    // connect are folded into its line and counted.
    let mut per_attempt = Map::new();
    for l in &lines {
        let key = format!(
            "{} {} {} {}",
            l["verdict"], l["src_ip"], l["src_port"], l["dst_port"]
        );
        *per_attempt.entry(key).or_insert(0) += 1;
    }
    assert!(per_attempt.values().all(|n| *n == 1), "{per_attempt:?}");
    assert!(
        denied["packets"].as_u64().unwrap() >= 2,
        "the SYN and its retransmission, in one line: {denied}"
    );
    assert!(denied["last_time"].as_str().unwrap() > denied["time"].as_str().unwrap());

    // The metrics endpoint serves the expected series.
    let mut body = String::new();
    eventually("metrics with per-rule connection counts", || {
        body = scrape(&metrics);
        body.contains("vswitch_policy_connections_total{")
            && body.contains("vswitch_port_rx_packets_total{")
    });
    for want in [
        r#"policy="obs/allow-client""#,
        r#"rule="default-deny""#,
        r#"pod="obs/client""#,
        "vswitch_microflow_cache_hits_total",
        "vswitch_table_lookups_total{",
        "vswitch_conntrack_entries",
        "vswitch_policy_realisation_seconds_bucket",
        "vswitch_port_drops_total{",
    ] {
        assert!(body.contains(want), "metrics lack {want}:\n{body}");
    }
    // Every series the shipped Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    ))
    .unwrap();
    let mut names: Vec<&str> = dashboard
        .match_indices("vswitch_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|n| {
            n.ends_with("_total")
                || n.ends_with("_bucket")
                || n.ends_with("entries")
                || n.ends_with("generation")
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        assert!(
            body.contains(n),
            "the dashboard queries {n}, which vswitchd does not serve"
        );
    }
    drop(attached);
}

// ---- enforcement integrity: attacks from inside a pod --------------------------------

/// A third pod forges "port unreachable" about a connection between two others:
/// delivered, it would reset the victim's connected UDP socket (ECONNREFUSED).
/// Conntrack must see the error as inconsistent with the connection (+inv).
#[test]
fn forged_icmp_errors_from_a_third_pod_are_dropped() {
    let Some(lab) = lab() else { return };
    let id = lab.a.0.trim_end_matches('a').to_string();
    let server = lab
        .b
        .run(|| UdpSocket::bind(format!("{B_IP}:7100")).unwrap());
    let client = lab.a.run(|| {
        let s = UdpSocket::bind(format!("{A_IP}:0")).unwrap();
        s.connect(format!("{B_IP}:7100")).unwrap();
        s
    });
    client
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    // A real exchange: the connection is established in conntrack.
    client.send(b"ping").unwrap();
    let mut buf = [0u8; 16];
    let (_, from) = server.recv_from(&mut buf).unwrap();
    server.send_to(b"pong", from).unwrap();
    assert_eq!(client.recv(&mut buf).unwrap(), 4);
    let sport = client.local_addr().unwrap().port();
    // c forges "port unreachable" from itself to a, quoting a -> b.
    let mut quoted = Vec::new();
    etherparse::PacketBuilder::ipv4([10, 99, 0, 1], [10, 99, 0, 2], 64)
        .udp(sport, 7100)
        .write(&mut quoted, b"ping")
        .unwrap();
    let (c_mac, a_mac) = ([0x0a, 0x58, 10, 99, 0, 3], [0x0a, 0x58, 10, 99, 0, 1]);
    let forged = |src: [u8; 4], code| {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(c_mac, a_mac)
            .ipv4(src, [10, 99, 0, 1], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(code))
            .write(&mut f, &quoted)
            .unwrap();
        f
    };
    use etherparse::icmpv4::DestUnreachableHeader as Why;
    for code in [Why::Port, Why::FragmentationNeeded { next_hop_mtu: 576 }] {
        send_raw(&lab.c, format!("{id}c"), forged([10, 99, 0, 3], code));
        // Delivered, the error would fail the next receive with ECONNREFUSED.
        client.send(b"ping").unwrap();
        let (_, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(b"pong", from).unwrap();
        match client.recv(&mut buf) {
            Ok(4) => {}
            other => panic!("the forged ICMP error reached the client: {other:?}"),
        }
    }
    // The real thing still works: b's own "port unreachable" once its socket
    // is gone is related to the connection, and reaches a.
    drop(server);
    client.send(b"ping").unwrap();
    eventually("b's genuine port unreachable resets a's socket", || {
        let _ = client.send(b"ping");
        matches!(client.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
}

/// A pod goes away and its address is handed to a new pod: a client that kept
/// its connection to the old pod must not reach the new one under the old
/// connection's +est (conntrack forgets every connection of the address).
#[test]
fn a_stale_connection_does_not_reach_the_next_owner_of_an_address() {
    let Some(lab) = lab() else { return };
    let id = lab.a.0.trim_end_matches('a').to_string();
    serve_tcp(&lab.b, B_IP, 8080);
    let mut client = lab.a.run(|| {
        TcpStream::connect_timeout(
            &format!("{B_IP}:8080").parse().unwrap(),
            Duration::from_secs(2),
        )
        .unwrap()
    });
    client
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut buf = [0u8; 5];
    client.write_all(b"hello").unwrap();
    client.read_exact(&mut buf).unwrap();
    // b goes (as CNI DEL does); a new pod gets b's address, and a policy that
    // admits nobody: no new connection may reach it.
    let b_key = ObjectKey::new("test", "b");
    lab.running.switch.detach(&b_key).unwrap();
    let b2 = Netns::new(format!("{id}n"));
    lab.policy(
        "metadata: {name: isolated, namespace: test}\nspec:\n  podSelector: {matchLabels: {app: isolated}}\n  policyTypes: [Ingress]\n",
    );
    plug(&lab.running, &id, &b2, "n", B_IP, 2, "isolated");
    serve_tcp(&b2, B_IP, 8080);
    let delivered = || -> u64 {
        let ports = lab.running.switch.ports();
        let p = ports
            .iter()
            .find(|p| matches!(&p.role, vswitch::realiser::PortRole::Pod(k) if k.name == "n"))
            .unwrap();
        p.counters
            .tx_packets
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = delivered();
    // The old connection's next segment: with the old entry it would be +est,
    // reach the new pod, and come back as a reset.
    client.write_all(b"again").unwrap();
    match client.read_exact(&mut buf) {
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("the stale connection reached the new pod: {other:?}"),
    }
    assert_eq!(
        delivered(),
        before,
        "nothing of the old connection was delivered"
    );
    assert!(!tcp(&lab.a, B_IP, 8080), "and the new pod's policy holds");
}

/// CPU time (clock ticks) this process's thread named `name` has used.
fn thread_ticks(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // Fields after the command's closing parenthesis; utime, stime are 14, 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread {name}");
}

/// A pod with NET_ADMIN deletes its own interface: the switch's fd for it is
/// dead. The packet thread must not spin on it, the other pods keep working,
/// and the port shows as down.
#[test]
fn a_pod_that_deletes_its_interface_costs_nothing() {
    let Some(lab) = lab() else { return };
    let id = lab.a.0.trim_end_matches('a').to_string();
    serve_tcp(&lab.b, B_IP, 8080);
    assert!(tcp(&lab.a, B_IP, 8080));
    ip(&["-n", &lab.c.0, "link", "del", &format!("{id}c")]);
    let port_c = || {
        lab.running
            .switch
            .port_of(&ObjectKey::new("test", "c"))
            .unwrap()
    };
    eventually("c's port is down", || !port_c().counters.is_up());
    let thread = format!("{id}p");
    let before = thread_ticks(&thread);
    std::thread::sleep(Duration::from_secs(2));
    let used = thread_ticks(&thread) - before;
    // 2 s are 200 ticks at the usual 100 Hz; a spinning thread uses them all.
    assert!(used < 40, "the packet thread used {used} ticks in 2 s");
    assert!(tcp(&lab.a, B_IP, 8080), "the other pods keep working");
    assert!(port_c().counters.drop_count("rx_error") >= 1);
}

/// Other users cannot use the control socket: not through the file's mode,
/// and not even when the mode is opened up (peer credentials are checked);
/// a request is bounded in size and connections in number.
#[test]
fn the_control_socket_is_root_only_and_bounded() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    if !privileged(&format!("vsk{}x", std::process::id() % 100_000)) {
        return;
    }
    let tmp = TempDir::new("ctl");
    std::fs::create_dir_all(tmp.0.join("manifests")).unwrap();
    // The socket's directory is open to everyone: only the socket protects it.
    std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, socket) = write_config(&tmp.0, "");
    let _daemon = Vswitchd::start(&config, &socket);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".vswitchd-"))
        .collect();
    assert!(leftovers.is_empty(), "the private directory is gone");
    let flowctl_as_nobody = || {
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_vswitchd")).with_file_name("flowctl");
        let out = Command::new(exe)
            .arg("--socket")
            .arg(&socket)
            .arg("health")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = flowctl_as_nobody();
    assert!(!ok && err.contains("ermission denied"), "{err}");
    // Even with the file opened to everyone, the peer's credentials refuse it.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, err) = flowctl_as_nobody();
    assert!(!ok && err.contains("not root"), "{err}");

    let line = |s: &mut UnixStream, text: &str| -> String {
        // The daemon may answer and close before a refused request is all
        // written: the answer is what counts.
        let _ = s.write_all(text.as_bytes());
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut r, &mut answer).unwrap();
        answer
    };
    let hello = "{\"op\":\"hello\",\"protocol\":1,\"client\":\"test\"}\n";
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(line(&mut s, hello).contains("\"ok\":true"));
    let answer = line(&mut s, "{\"op\":\"frobnicate\"}\n");
    assert!(
        answer.contains("unknown request \\\"frobnicate\\\""),
        "{answer}"
    );
    let huge = format!(
        "{{\"op\":\"add-flow\",\"flow\":\"{}\"}}\n",
        "x".repeat(control::MAX_REQUEST_BYTES + 10)
    );
    let answer = line(&mut s, &huge);
    assert!(answer.contains("longer than"), "{answer}");
    // Without hello first: refused.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(line(&mut s, "{\"op\":\"ports\"}\n").contains("hello"));
    // Connections beyond the limit are turned away, the others served.
    let mut held = Vec::new();
    let mut busy = 0;
    for _ in 0..40 {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let answer = line(&mut s, hello);
        if answer.contains("busy") {
            busy += 1;
        } else {
            assert!(answer.contains("\"ok\":true"), "{answer}");
            held.push(s);
        }
    }
    assert_eq!(held.len(), 32, "32 connections at once");
    assert_eq!(busy, 8);
    drop(held);
    common::eventually("served again once connections close", || {
        common::ask(&socket, &control::Request::Health).is_ok()
    });
}

/// One pod opening connections as fast as it can must not deny other pods new
/// connections: it is held to its own limit, the table keeps room for others.
#[test]
fn one_pod_cannot_exhaust_conntrack_for_the_others() {
    let config = datapath::DatapathConfig {
        conntrack: datapath::CtConfig {
            max_entries: 300,
            ..Default::default()
        },
        ..Default::default()
    };
    let Some(lab) = lab_with(config) else { return };
    lab.running.switch.set_conntrack_limits(100, 250).unwrap();
    serve_tcp(&lab.b, B_IP, 8080);
    // c opens 400 connections (UDP, each from its own port): a flood. (One
    // datagram first, so the kernel resolves b's address before the flood.)
    lab.c.run(|| {
        let s = UdpSocket::bind(format!("{C_IP}:0")).unwrap();
        s.send_to(b"x", format!("{B_IP}:9999")).unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let flood = lab.c.run(|| {
        (0..400)
            .map(|_| {
                let s = UdpSocket::bind(format!("{C_IP}:0")).unwrap();
                s.send_to(b"x", format!("{B_IP}:9999")).unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    let c_port = || {
        lab.running
            .switch
            .port_of(&ObjectKey::new("test", "c"))
            .unwrap()
    };
    eventually("c held to its limit", || {
        c_port().counters.drop_count("ct_limit") >= 290
    });
    let owners = lab.running.switch.conntrack_owners();
    let c = owners.iter().find(|o| o.0 == "test/c").unwrap();
    assert_eq!(
        (c.1, c.2),
        (100, 100),
        "c has exactly its limit: {owners:?}"
    );
    // a still opens connections, and the ones c has keep working.
    assert!(tcp(&lab.a, B_IP, 8080), "another pod can still connect");
    drop(flood);
}

/// Large UDP datagrams (DNS with EDNS, NFS, media) are fragmented by the
/// sender's kernel. The switch reassembles them before conntrack and policy,
/// decides on the whole datagram's ports, and delivers the fragments: allowed
/// ones arrive intact, denied ones do not, and a flood of fragments that never
/// complete cannot crowd out the others.
#[test]
fn fragmented_datagrams_are_decided_whole() {
    let Some(lab) = lab() else { return };
    let id = lab.a.0.trim_end_matches('a').to_string();
    lab.policy(
        "metadata: {name: udp, namespace: test}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{protocol: UDP, port: 7200}]}]\n",
    );
    let open = lab
        .b
        .run(|| UdpSocket::bind(format!("{B_IP}:7200")).unwrap());
    let closed = lab
        .b
        .run(|| UdpSocket::bind(format!("{B_IP}:7201")).unwrap());
    for s in [&open, &closed] {
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
    }
    let tx = lab.a.run(|| UdpSocket::bind(format!("{A_IP}:0")).unwrap());
    let mut buf = vec![0u8; 70_000];
    // A c-side flood first: first fragments whose datagrams never complete.
    let (c_mac, b_mac) = ([0x0a, 0x58, 10, 99, 0, 3], [0x0a, 0x58, 10, 99, 0, 2]);
    let flood: Vec<Vec<u8>> = (0..7000u16)
        .map(|ipid| {
            let mut f = Vec::new();
            etherparse::PacketBuilder::ethernet2(c_mac, b_mac)
                .ipv4([10, 99, 0, 3], [10, 99, 0, 2], 64)
                .udp(5000, 7200)
                .write(&mut f, &[0u8; 1400])
                .unwrap();
            let more_fragments: u16 = 0x2000;
            f[18..20].copy_from_slice(&ipid.to_be_bytes());
            f[20..22].copy_from_slice(&more_fragments.to_be_bytes());
            f
        })
        .collect();
    let dev = format!("{id}c");
    lab.c
        .run(move || vswitch::sys::send_raw_all(&dev, flood).expect("raw send"));
    for size in [4_000usize, 9_000, 65_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        tx.send_to(&payload, format!("{B_IP}:7200")).unwrap();
        let (n, _) = open
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{size}-byte datagram to an allowed port: {e}"));
        assert_eq!(&buf[..n], &payload[..], "{size} bytes arrive intact");
        tx.send_to(&payload, format!("{B_IP}:7201")).unwrap();
        assert!(
            closed.recv_from(&mut buf).is_err(),
            "{size} bytes to a port the policy does not open"
        );
    }
}
