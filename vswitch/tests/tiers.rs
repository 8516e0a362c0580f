//! The admin tiers (ClusterNetworkPolicy) over real traffic: the upstream
//! conformance subset through TAP devices, and the multi-tenancy scenario
//! through vswitchd, vswitch-cni and flowctl as an operator runs them.
//!
//! Needs root; skipped outside CI without it. Every namespace and device is
//! uniquely named and removed on drop.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::cnp::ClusterPolicy;
use policy::compile::Change;
use policy::model::{NamedPort, Namespace, Node, ObjectKey, Pod, Policy, Protocol};
use serde_json::Value;
use vswitch::Tap;
use vswitch::port::TapPort;

mod common;

use common::{
    Attached, Cni, Netns, Running, TempDir, Vswitchd, eventually, flowctl, privileged, serve_tcp,
    write_config,
};

const CASES: &str = include_str!("../../policy/tests/data/cnp-cases.json");

/// What a probe saw. Upstream accepts only a timeout as "denied": a refused
/// connection would fail its test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Connected,
    Refused,
    TimedOut,
}

fn probe(ns: &str, to: IpAddr, port: u16, udp: bool) -> JoinHandle<Seen> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns");
        vswitch::sys::setns_net(f.as_fd()).expect("setns");
        let addr = SocketAddr::new(to, port);
        if !udp {
            return match TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
                Ok(_) => Seen::Connected,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => Seen::Refused,
                Err(_) => Seen::TimedOut,
            };
        }
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..2 {
            let _ = s.send_to(b"probe", addr);
            let mut buf = [0u8; 8];
            match s.recv_from(&mut buf) {
                Ok(_) => return Seen::Connected,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Seen::Refused,
                Err(_) => {}
            }
        }
        Seen::TimedOut
    })
}

fn udp_echo(ns: &Netns, ip: IpAddr, port: u16) {
    let sock = ns.run(move || UdpSocket::bind(SocketAddr::new(ip, port)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

/// Replaces the cases' symbolic CIDRs with the pods' addresses.
fn substitute(v: &mut Value, ips: &BTreeMap<String, IpAddr>) {
    match v {
        Value::Object(m) if m.contains_key("podIP") => {
            let ip = ips[m["podIP"].as_str().unwrap()];
            let prefix = m[if ip.is_ipv6() { "prefixV6" } else { "prefix" }]
                .as_u64()
                .unwrap();
            *v = Value::String(format!("{ip}/{prefix}"));
        }
        Value::Object(m) => m.values_mut().for_each(|x| substitute(x, ips)),
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, ips)),
        _ => {}
    }
}

#[test]
fn upstream_cluster_network_policy_cases_over_real_traffic() {
    let id = format!("vsk{}", std::process::id() % 100_000);
    if !privileged(&format!("{id}x")) {
        return;
    }
    let doc: Value = serde_json::from_str(CASES).unwrap();
    let model = &doc["model"];
    let assigned = &doc["defaultIpAssignment"];
    let running = Running::new(&format!("{id}p"));
    let mut spaces: Vec<Netns> = Vec::new();
    let mut ns_of = BTreeMap::new();
    let mut ips: BTreeMap<String, IpAddr> = BTreeMap::new();
    for (name, node) in model["nodes"].as_object().unwrap() {
        running
            .switch
            .apply(Change::Node(Node {
                name: name.clone(),
                labels: labels(&node["labels"]),
                addresses: vec![assigned["nodes"][name].as_str().unwrap().parse().unwrap()],
                pod_cidrs: vec![],
            }))
            .unwrap();
    }
    let mut pods = Vec::new();
    for (i, (key, pod)) in model["pods"].as_object().unwrap().iter().enumerate() {
        if pod["hostNetwork"].as_bool().unwrap() {
            continue; // the node itself: node peers are covered by the vswitchd test below
        }
        let ip: IpAddr = assigned["pods"][key].as_str().unwrap().parse().unwrap();
        let name = format!("{id}q{i}");
        let ns = Netns::new(name.clone());
        let tap = Tap::open(&name, false).unwrap();
        let okey: ObjectKey = key.parse().unwrap();
        let mac = policy::pipeline::pod_mac(&okey, &[ip]);
        common::place_in(&ns, &name, mac, &format!("{ip}/16"));
        running
            .switch
            .attach(Arc::new(TapPort(tap)), okey.clone(), mac, vec![ip])
            .unwrap();
        for s in pod["serves"].as_array().unwrap() {
            let port = s["port"].as_u64().unwrap() as u16;
            match s["protocol"].as_str().unwrap() {
                "TCP" => serve_tcp(&ns, &ip.to_string(), port),
                "UDP" => udp_echo(&ns, ip, port),
                _ => {} // no SCTP sockets on this kernel: covered offline
            }
        }
        pods.push(Pod {
            key: okey,
            labels: labels(&pod["labels"]),
            ips: vec![],
            node: pod["node"].as_str().map(str::to_string),
            ports: pod["containerPorts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| NamedPort {
                    name: p["name"].as_str().unwrap().into(),
                    port: p["containerPort"].as_u64().unwrap() as u16,
                    protocol: Protocol::parse(p["protocol"].as_str().unwrap()).unwrap(),
                })
                .collect(),
        });
        ns_of.insert(key.clone(), name);
        ips.insert(key.clone(), ip);
        spaces.push(ns);
    }
    for p in pods {
        running.switch.apply(Change::Pod(p)).unwrap();
    }
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut in_force: (Vec<ObjectKey>, Vec<String>) = (vec![], vec![]);
    for case in doc["cases"].as_array().unwrap() {
        for step in case["steps"].as_array().unwrap() {
            let mut changes = Vec::new();
            for (name, ns) in model["namespaces"].as_object().unwrap() {
                let l = step
                    .get("namespace_labels")
                    .and_then(|o| o.get(name))
                    .unwrap_or(&ns["labels"]);
                changes.push(Change::Namespace(Namespace {
                    name: name.clone(),
                    labels: labels(l),
                }));
            }
            // The step's policies are the complete set in force.
            let mut wanted: (Vec<ObjectKey>, Vec<String>) = (vec![], vec![]);
            for p in step["policies"].as_array().unwrap() {
                let mut p = p.clone();
                substitute(&mut p, &ips);
                if p["kind"] == "ClusterNetworkPolicy" {
                    let cnp = ClusterPolicy::from_value(&p).unwrap();
                    wanted.1.push(cnp.name.clone());
                    changes.push(Change::ClusterPolicy(cnp));
                } else {
                    let np: NetworkPolicy = serde_json::from_value(p).unwrap();
                    let policy = Policy::from_api(&np).unwrap();
                    wanted.0.push(policy.key.clone());
                    changes.push(Change::Policy(policy));
                }
            }
            for old in in_force.0.drain(..) {
                if !wanted.0.contains(&old) {
                    changes.push(Change::PolicyDeleted(old));
                }
            }
            for old in in_force.1.drain(..) {
                if !wanted.1.contains(&old) {
                    changes.push(Change::ClusterPolicyDeleted(old));
                }
            }
            in_force = wanted;
            running.switch.apply_all(changes).unwrap();
            let mut probes = Vec::new();
            for exp in step["expect"].as_array().unwrap() {
                let (from, to) = (exp["from"].as_str().unwrap(), exp["to"].as_str().unwrap());
                let udp = match exp["protocol"].as_str().unwrap() {
                    "TCP" => false,
                    "UDP" => true,
                    _ => continue,
                };
                let Some(&dst) = ips.get(to) else {
                    continue; // a host-network pod: see above
                };
                let port = exp["port"].as_u64().unwrap() as u16;
                let want = exp["allow"].as_bool().unwrap();
                probes.push((
                    format!(
                        "{} step {}: {from} -> {to} {}/{port}",
                        case["id"], step["step"], exp["protocol"]
                    ),
                    want,
                    probe(&ns_of[from], dst, port, udp),
                ));
            }
            for (what, want, handle) in probes {
                checked += 1;
                let seen = handle.join().unwrap();
                let ok = if want {
                    seen == Seen::Connected
                } else {
                    seen == Seen::TimedOut
                };
                if !ok {
                    failures.push(format!(
                        "{what}: want {}, saw {seen:?}",
                        if want { "connected" } else { "timed out" }
                    ));
                }
            }
        }
    }
    drop(running);
    drop(spaces);
    assert!(checked >= 100, "only {checked} probes");
    assert!(
        failures.is_empty(),
        "{} of {checked} probes wrong over real traffic:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} upstream ClusterNetworkPolicy probes over real traffic");
}

#[test]
fn tenants_cannot_open_what_the_admin_tier_closes() {
    let pid = std::process::id() % 100_000;
    let tag = format!("vst{pid}");
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let tmp = TempDir::new("tiers");
    let dir = tmp.0.clone();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let subnet = 150 + (pid % 50) as u8;
    let gw_ip = format!("10.96.{subnet}.1");
    // The shipped example's policies, verbatim; its pods without addresses
    // (IPAM gives them), plus a host-network pod: the node, never a subject.
    std::fs::write(
        manifests.join("admin.yaml"),
        include_str!("../../examples/multi-tenancy/admin.yaml"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("tenants.yaml"),
        include_str!("../../examples/multi-tenancy/tenants.yaml"),
    )
    .unwrap();
    let mut cluster = String::new();
    for (ns, labels) in [
        ("tenant-a", "{tenant: a}"),
        ("tenant-b", "{tenant: b}"),
        ("shared", "{role: shared-services}"),
        ("kube-system", "{}"),
    ] {
        cluster += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n---\n"
        );
    }
    for (pod, app) in [
        ("tenant-a/web", "web"),
        ("tenant-a/worker", "worker"),
        ("tenant-b/web", "web"),
        ("shared/dns", "dns"),
    ] {
        let (ns, name) = pod.split_once('/').unwrap();
        cluster += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]}}\n---\n"
        );
    }
    cluster += &format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: agent, namespace: kube-system, labels: {{tenant: a}}}}\n\
         spec: {{hostNetwork: true, containers: [{{name: c}}]}}\nstatus: {{podIP: {gw_ip}}}\n"
    );
    std::fs::write(manifests.join("cluster.yaml"), cluster).unwrap();
    let audit = dir.join("audit.log");
    let (config, socket) = write_config(
        &dir,
        &format!(
            "[gateway]\nname = \"{tag}\"\naddress = \"{gw_ip}/24\"\n[audit]\npath = {:?}\nattempt_quiet_ms = 1000\n",
            audit.to_str().unwrap()
        ),
    );
    let daemon = Vswitchd::start(&config, &socket);
    let cni = Cni::host_local(&socket, &format!("10.96.{subnet}.0/24"), &gw_ip, &dir);
    let names = [
        "tenant-a/web",
        "tenant-a/worker",
        "tenant-b/web",
        "shared/dns",
    ];
    let (spaces, addrs) = cni.add_all(&tag, &names);
    let mut ip = BTreeMap::new();
    let mut ns_of = BTreeMap::new();
    for ((pod, ns), addr) in names.iter().zip(&spaces).zip(addrs) {
        serve_tcp(ns, &addr.to_string(), 80);
        ip.insert(*pod, addr);
        ns_of.insert(*pod, ns.0.clone());
    }
    let attached = Attached {
        cni: &cni,
        pods: names
            .iter()
            .zip(&spaces)
            .map(|(p, ns)| (ns, p.to_string()))
            .collect(),
    };
    let seen = |from: &str, to: &str| probe(&ns_of[from], ip[to], 80, false).join().unwrap();
    let expect = |from: &str, to: &str, want: Seen, why: &str| {
        // The first probe may race the last manifest's publication.
        eventually(why, || seen(from, to) == want);
    };
    expect(
        "tenant-a/worker",
        "tenant-a/web",
        Seen::Connected,
        "a tenant's NetworkPolicy overrides the Baseline deny",
    );
    expect(
        "tenant-b/web",
        "tenant-a/web",
        Seen::TimedOut,
        "the Admin tier isolates tenant A from tenant B",
    );
    assert_eq!(
        seen("tenant-a/worker", "tenant-b/web"),
        Seen::TimedOut,
        "tenant B's NetworkPolicy cannot open it to tenant A: the Admin Deny decides first"
    );
    assert_eq!(
        seen("tenant-a/web", "shared/dns"),
        Seen::Connected,
        "shared services: Admin Accept"
    );
    assert_eq!(
        seen("tenant-b/web", "shared/dns"),
        Seen::Connected,
        "shared services: Admin Accept"
    );
    assert_eq!(
        seen("shared/dns", "tenant-a/worker"),
        Seen::TimedOut,
        "Baseline default deny where no NetworkPolicy decides"
    );

    // The audit log names the tier rule that denied.
    eventually("the denial is audited with its tier rule", || {
        std::fs::read_to_string(&audit).is_ok_and(|log| {
            log.lines().any(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_default();
                v["verdict"] == "deny"
                    && v["decided_by"][0]["cluster_policy"] == "isolate-tenant-b"
                    && v["decided_by"][0]["rule_name"] == "deny-other-tenants"
                    && v["decided_by"][0]["tier"] == "Admin"
            })
        })
    });

    // flowctl names the deciding tier rule, live.
    let trace = flowctl(
        &socket,
        &[
            "trace",
            "tcp,src=tenant-a/worker,dst=tenant-b/web,tp_dst=80",
        ],
    );
    assert!(
        trace.contains("DENY by ClusterNetworkPolicy isolate-tenant-b (Admin tier, priority 20) ingress rule \"deny-other-tenants\": Deny"),
        "{trace}"
    );
    let policies: Value =
        serde_json::from_str(&flowctl(&socket, &["dump-policies", "-o", "json"])).unwrap();
    let status: BTreeMap<String, String> = policies
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for name in [
        "tenants-reach-shared-services",
        "isolate-tenant-a",
        "isolate-tenant-b",
        "default-deny-in-tenants",
        "tenant-b/web-from-tenant-a",
    ] {
        assert_eq!(
            status.get(name).map(String::as_str),
            Some("accepted"),
            "{name}: {policies}"
        );
    }

    // A connection open when an Admin Deny arrives is cut at once; others stay.
    let open = |from: &str, to: &str| {
        let addr = SocketAddr::new(ip[to], 80);
        let s = spaces[names.iter().position(|n| *n == from).unwrap()]
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap());
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s
    };
    let echoes = |s: &mut TcpStream| {
        use std::io::{Read, Write};
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    };
    let mut to_shared = open("tenant-a/web", "shared/dns");
    let mut inside = open("tenant-a/worker", "tenant-a/web");
    assert!(echoes(&mut to_shared) && echoes(&mut inside));
    let cut = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: cut-a-from-shared}\n\
               spec:\n  tier: Admin\n  priority: 5\n  subject: {namespaces: {matchLabels: {tenant: a}}}\n  egress: [{action: Deny, to: [{namespaces: {matchLabels: {role: shared-services}}}]}]\n";
    std::fs::write(manifests.join("cut.yaml"), cut).unwrap();
    eventually("the new Admin Deny is enforced on new connections", || {
        seen("tenant-a/worker", "shared/dns") == Seen::TimedOut
    });
    assert!(
        !echoes(&mut to_shared),
        "the established connection the Deny covers is cut"
    );
    assert!(
        echoes(&mut inside),
        "a connection the new policy still admits stays up"
    );
    std::fs::remove_file(manifests.join("cut.yaml")).unwrap();
    eventually("the Deny removed: shared services reachable again", || {
        seen("tenant-a/worker", "shared/dns") == Seen::Connected
    });

    // Node peers: the node (gateway address; the host-network pod is it) from
    // pods, under a Baseline egress deny to nodes for tenant B.
    let node = TcpListener::bind(format!("{gw_ip}:7700")).expect("bind on the gateway address");
    std::thread::spawn(move || {
        for c in node.incoming() {
            drop(c);
        }
    });
    let to_node = |from: &str| {
        probe(&ns_of[from], gw_ip.parse().unwrap(), 7700, false)
            .join()
            .unwrap()
    };
    assert_eq!(
        to_node("tenant-b/web"),
        Seen::Connected,
        "no node policy yet"
    );
    let nodes = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: tenant-b-not-to-nodes}\n\
                 spec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {matchLabels: {tenant: b}}}\n  egress: [{action: Deny, to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}]}]\n";
    std::fs::write(manifests.join("nodes.yaml"), nodes).unwrap();
    eventually("tenant B's pods no longer reach the node", || {
        to_node("tenant-b/web") == Seen::TimedOut
    });
    assert_eq!(
        to_node("tenant-a/worker"),
        Seen::Connected,
        "tenant A is not the subject"
    );

    // A typo rejects the object with the field named; nothing else changes.
    let typo = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: typo}\n\
                spec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, too: [{namespaces: {}}]}]\n";
    std::fs::write(manifests.join("typo.yaml"), typo).unwrap();
    eventually("the typo is reported", || {
        flowctl(&socket, &["dump-policies"]).contains("spec.egress[0]")
    });
    let text = flowctl(&socket, &["dump-policies"]);
    assert!(
        text.lines()
            .any(|l| l.contains("typo") && l.contains("rejected")),
        "{text}"
    );
    assert_eq!(
        seen("tenant-a/worker", "tenant-a/web"),
        Seen::Connected,
        "the rejected Deny-all is not in force"
    );

    drop(attached);
    drop(spaces);
    drop(daemon);
    drop(tmp);
}

/// A DNS server in `ns` on `ip:53`: answers every A question with `answer`
/// (TTL `ttl`), as CoreDNS would for a name it knows.
fn dns_server(ns: &Netns, ip: IpAddr, answer: std::net::Ipv4Addr, ttl: u32) {
    let sock = ns.run(move || UdpSocket::bind(SocketAddr::new(ip, 53)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            let mut r = buf[..n].to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            r[6..8].copy_from_slice(&1u16.to_be_bytes());
            r.extend([0xc0, 12, 0, 1, 0, 1]);
            r.extend(ttl.to_be_bytes());
            r.extend([0, 4]);
            r.extend(answer.octets());
            let _ = sock.send_to(&r, from);
        }
    });
}

/// Asks `server` for `name` (A) from inside `ns`; whether an answer came.
fn resolve(ns: &Netns, server: IpAddr, name: &str) -> bool {
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend(l.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for _ in 0..3 {
            let _ = s.send_to(&q, SocketAddr::new(server, 53));
            let mut buf = [0u8; 512];
            if s.recv_from(&mut buf).is_ok() {
                return true;
            }
        }
        false
    })
}

#[test]
fn domain_names_are_learned_from_trusted_dns_answers_only() {
    let pid = std::process::id() % 100_000;
    let tag = format!("vsn{pid}");
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let tmp = TempDir::new("dns");
    let dir = tmp.0.clone();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let subnet = 100 + (pid % 50) as u8;
    let gw_ip = format!("10.97.{subnet}.1");
    let mut m = String::new();
    for (pod, labels) in [
        ("kube-system/coredns", "{k8s-app: kube-dns}"),
        ("app/client", "{app: client}"),
        ("app/liar", "{app: liar}"),
        ("ext/target", "{app: target}"),
    ] {
        let (ns, name) = pod.split_once('/').unwrap();
        m += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n---\n"
        );
    }
    m += "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: egress-allowlist}\n\
          spec:\n  tier: Admin\n  priority: 10\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}\n  egress:\n\
          \x20 - {name: example-com, action: Accept, to: [{domainNames: ['*.example.com']}]}\n\
          \x20 - {name: no-target, action: Deny, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: target}}}}]}\n";
    std::fs::write(manifests.join("cluster.yaml"), m).unwrap();
    let (config, socket) = write_config(
        &dir,
        &format!("[gateway]\nname = \"{tag}\"\naddress = \"{gw_ip}/24\"\n[dns]\nmin_ttl = 1\n"),
    );
    let daemon = Vswitchd::start(&config, &socket);
    let cni = Cni::host_local(&socket, &format!("10.97.{subnet}.0/24"), &gw_ip, &dir);
    let names = [
        "kube-system/coredns",
        "app/client",
        "app/liar",
        "ext/target",
    ];
    let (spaces, addrs) = cni.add_all(&tag, &names);
    let ip: BTreeMap<&str, IpAddr> = names.iter().copied().zip(addrs).collect();
    let attached = Attached {
        cni: &cni,
        pods: names
            .iter()
            .zip(&spaces)
            .map(|(p, ns)| (ns, p.to_string()))
            .collect(),
    };
    let (dns_ns, client, liar_ns, target_ns) = (&spaces[0], &spaces[1], &spaces[2], &spaces[3]);
    let IpAddr::V4(target) = ip["ext/target"] else {
        unreachable!()
    };
    serve_tcp(target_ns, &target.to_string(), 443);
    dns_server(dns_ns, ip["kube-system/coredns"], target, 2);
    dns_server(liar_ns, ip["app/liar"], target, 3600);
    let reach = || {
        probe(&client.0, ip["ext/target"], 443, false)
            .join()
            .unwrap()
    };
    eventually("the target is denied before any answer", || {
        reach() == Seen::TimedOut
    });

    // A pod that answers DNS itself is not believed: no learning, still denied.
    assert!(
        resolve(client, ip["app/liar"], "api.example.com"),
        "the liar answers"
    );
    std::thread::sleep(Duration::from_millis(300));
    let learned: Value =
        serde_json::from_str(&flowctl(&socket, &["dump-dns", "-o", "json"])).unwrap();
    assert_eq!(
        learned,
        serde_json::json!([]),
        "nothing learned from an untrusted server"
    );
    assert_eq!(reach(), Seen::TimedOut, "a forged answer opens nothing");

    // The cluster DNS's answer is learned: the name's address is allowed.
    assert!(resolve(
        client,
        ip["kube-system/coredns"],
        "api.example.com"
    ));
    eventually("the learned address is allowed", || {
        reach() == Seen::Connected
    });
    let text = flowctl(&socket, &["dump-dns"]);
    assert!(
        text.contains("api.example.com") && text.contains(&target.to_string()),
        "{text}"
    );
    let trace = flowctl(
        &socket,
        &[
            "trace",
            &format!("tcp,src=app/client,dst={target},tp_dst=443"),
        ],
    );
    assert!(trace.contains("\"example-com\": Accept"), "{trace}");

    // Its TTL (2 s) runs out with no connection left: denied again.
    eventually("the address expires with the answer's TTL", || {
        flowctl(&socket, &["dump-dns"]).lines().count() == 1 && reach() == Seen::TimedOut
    });
    drop(attached);
    drop(spaces);
    drop(daemon);
    drop(tmp);
}
