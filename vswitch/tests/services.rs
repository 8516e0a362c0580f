//! Services load-balanced by the switch (`services = "switch"`), over real
//! traffic: ClusterIP TCP and UDP to pod backends, spread and affinity, a
//! backend leaving while a connection to it is open, a Service with no
//! endpoints refused at once, a pod reaching itself through its Service,
//! policy decided on the chosen backend (ingress on a pod backend, egress to
//! a host-network backend: the hole kube-proxy mode leaves), and flowctl's
//! view of it all.
//!
//! Needs root; skipped outside CI without it, a failure in CI. Every
//! namespace and device is uniquely named and removed on drop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

mod common;

use common::{
    Attached, Cni, Netns, TempDir, Vswitchd, backend, connect, eventually, flowctl, free_address,
    http, privileged, serve_named, spawn_named, write_config,
};

const PODS: [&str; 5] = ["shop/web", "shop/b1", "shop/b2", "shop/batch", "shop/other"];

fn cluster() -> String {
    let pod = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}{}{}{}{}",
        pod("web", "app: web"),
        pod("b1", "app: api, self: b1"),
        pod("b2", "app: api"),
        pod("batch", "app: batch"),
        pod("other", "app: other"),
    )
}

fn services(host: &str, host_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.50.10, selector: {{app: api}}, ports: [{{name: web, port: 80, targetPort: http}}, {{name: dns, port: 53, protocol: UDP, targetPort: dns}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.50.14, selector: {{app: api}}, sessionAffinity: ClientIP, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.50.11, selector: {{app: nothing}}, ports: [{{port: 80}}, {{name: u, port: 53, protocol: UDP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: self, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.50.13, selector: {{self: b1}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: headless, namespace: shop}}\n\
         spec: {{clusterIP: None, selector: {{app: api}}, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: host, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.50.12, ports: [{{port: 443, targetPort: {host_port}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: host-1, namespace: shop, labels: {{kubernetes.io/service-name: host}}}}\n\
         addressType: IPv4\nports: [{{port: {host_port}}}]\nendpoints: [{{addresses: [{host}]}}]\n"
    )
}

/// The api pods take ingress only from the web pod; the batch job may send nothing.
const POLICIES: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: api-from-web, namespace: shop}\n\
    spec:\n  podSelector: {matchLabels: {app: api}}\n\
    \x20 ingress: [{from: [{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {self: b1}}}]}]\n---\n\
    apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: batch-no-egress, namespace: shop}\n\
    spec:\n  podSelector: {matchLabels: {app: batch}}\n  policyTypes: [Egress]\n";

/// A UDP server in `ns` answering each datagram with `name`.
fn serve_udp_named(ns: &Netns, addr: IpAddr, port: u16, name: &'static str) {
    let sock = ns.run(move || UdpSocket::bind(SocketAddr::new(addr, port)).expect("bind udp"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(name.as_bytes(), from);
        }
    });
}

/// A device on the host with one address (a veth pair, the kernel here has
/// no dummy devices), deleted on drop.
struct Dummy(String);

impl Dummy {
    fn new(name: &str, addr: &str) -> Dummy {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", name])
            .output();
        let peer = format!("{name}p");
        common::ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        let d = Dummy(name.to_string());
        common::ip(&["addr", "add", &format!("{addr}/32"), "dev", name]);
        common::ip(&["link", "set", name, "up"]);
        d
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

struct Switch {
    tmp: TempDir,
    daemon: Vswitchd,
    cni: Cni,
    spaces: Vec<Netns>,
    ips: BTreeMap<&'static str, IpAddr>,
}

impl Switch {
    fn ns(&self, pod: &str) -> &Netns {
        &self.spaces[PODS.iter().position(|p| *p == pod).unwrap()]
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        drop(Attached {
            cni: &self.cni,
            pods: PODS
                .iter()
                .zip(&self.spaces)
                .map(|(p, ns)| (ns, p.to_string()))
                .collect(),
        });
    }
}

#[test]
fn cluster_ips_are_load_balanced_in_the_switch_with_policy_on_the_backend() {
    let pid = std::process::id() % 100_000;
    let tag = format!("vssv{pid}");
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let subnet = 100 + (pid % 50) as u8;
    let gw = format!("10.92.{subnet}.1");
    // A host-network backend that is not this pod's node (as the API server
    // on a control-plane host is): an address of a device the test makes on
    // the host.
    let host_ip = format!("10.91.{subnet}.1");
    let host_port = 20_000 + (pid % 20_000) as u16;
    let _host_dev = Dummy::new(&format!("{tag}h"), &host_ip);
    let tmp = TempDir::new(&tag);
    let dir = tmp.0.clone();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/cluster.yaml"), cluster()).unwrap();
    std::fs::write(
        dir.join("manifests/services.yaml"),
        services(&host_ip, host_port),
    )
    .unwrap();
    std::fs::write(dir.join("manifests/policies.yaml"), POLICIES).unwrap();
    let metrics = free_address();
    let (config, socket) = write_config(
        &dir,
        &format!(
            "metrics_address = {metrics:?}\n[gateway]\nname = \"{tag}\"\naddress = \"{gw}/24\"\n[audit]\npath = {:?}\nattempt_quiet_ms = 300\n",
            dir.join("audit.log").to_str().unwrap()
        ),
    );
    let daemon = Vswitchd::start(&config, &socket);
    let cni = Cni::host_local(&socket, &format!("10.92.{subnet}.0/24"), &gw, &dir);
    let (spaces, addrs) = cni.add_all(&tag, &PODS);
    let sw = Switch {
        ips: PODS.iter().copied().zip(addrs).collect(),
        tmp,
        daemon,
        cni,
        spaces,
    };
    for (pod, name) in [("shop/b1", "b1"), ("shop/b2", "b2")] {
        serve_named(sw.ns(pod), sw.ips[pod], 8080, name);
        serve_udp_named(sw.ns(pod), sw.ips[pod], 5353, name);
    }
    let host = TcpListener::bind((host_ip.parse::<IpAddr>().unwrap(), host_port))
        .expect("bind on the host");
    spawn_named(host, "node");
    let web = sw.ns("shop/web");

    // Spread: connections to the ClusterIP reach both backends, translated
    // (the server answers on the Service's address and port).
    eventually("web reaches the api Service", || {
        backend(web, "10.96.50.10", 80).is_some()
    });
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..40 {
        let b = backend(web, "10.96.50.10", 80).expect("every connection is served");
        *seen.entry(b).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both backends serve: {seen:?}");
    assert!(
        seen.values().all(|n| *n >= 8),
        "spread within tolerance: {seen:?}"
    );

    // Session affinity: one client, one backend.
    let first = backend(web, "10.96.50.14", 80).unwrap();
    for _ in 0..15 {
        assert_eq!(
            backend(web, "10.96.50.14", 80).unwrap(),
            first,
            "ClientIP affinity"
        );
    }

    // UDP (DNS-like): the answer comes back from the Service's address and port.
    let (name, from) = web.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        for _ in 0..3 {
            s.send_to(b"query", "10.96.50.10:53").unwrap();
            let mut buf = [0u8; 16];
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return (String::from_utf8_lossy(&buf[..n]).into_owned(), from);
            }
        }
        panic!("no answer through the UDP Service")
    });
    assert!(name == "b1" || name == "b2");
    assert_eq!(from, "10.96.50.10:53".parse().unwrap());

    // No endpoints: refused at once (a reset; an ICMP port unreachable for UDP).
    let started = Instant::now();
    let err = connect(web, "10.96.50.11", 80).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    let udp_refused = web.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.96.50.11:53").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s.send(b"query").unwrap();
        let mut buf = [0u8; 16];
        s.recv(&mut buf).map_err(|e| e.kind())
    });
    assert_eq!(udp_refused, Err(std::io::ErrorKind::ConnectionRefused));

    // Hairpin: b1 reaches itself through its Service.
    assert_eq!(
        backend(sw.ns("shop/b1"), "10.96.50.13", 80).as_deref(),
        Some("b1")
    );

    // Policy on the chosen backend: ingress to the api pods only from web.
    assert!(
        backend(sw.ns("shop/other"), "10.96.50.10", 80).is_none(),
        "ingress decided on the backend"
    );
    // Egress to a host-network backend through a ClusterIP: web may, the
    // batch job (all egress denied) may not — kube-proxy mode lets it.
    assert_eq!(backend(web, "10.96.50.12", 443).as_deref(), Some("node"));
    assert!(
        backend(sw.ns("shop/batch"), "10.96.50.12", 443).is_none(),
        "the egress hole is closed"
    );
    assert!(backend(sw.ns("shop/batch"), "10.96.50.10", 80).is_none());

    // The trace names the Service's backend and the policy decision on it.
    let trace = flowctl(
        &sw.daemon.socket,
        &["trace", "tcp,src=shop/other,dst=10.96.50.10,tp_dst=80"],
    );
    assert!(trace.contains("10.96.50.10:80 ->"), "{trace}");
    assert!(
        trace.contains("api-from-web") || trace.contains("default deny"),
        "{trace}"
    );
    let dump = flowctl(&sw.daemon.socket, &["dump-services"]);
    assert!(
        dump.contains("shop/api:web") && dump.contains(":8080"),
        "{dump}"
    );
    assert!(
        dump.contains("shop/empty") && dump.contains("no endpoints"),
        "{dump}"
    );
    assert!(
        !dump.contains("headless"),
        "headless Services are left alone: {dump}"
    );
    let groups = flowctl(&sw.daemon.socket, &["dump-groups"]);
    assert!(
        groups.contains("affinity=10800") && groups.contains("nat(dst="),
        "{groups}"
    );
    let conns = flowctl(&sw.daemon.socket, &["dump-conntrack", "dst=10.96.50.10"]);
    assert!(conns.contains("10.96.50.10:80 -> 10.92."), "{conns}");

    // The audit log names the ClusterIP and the backend it went to.
    eventually("the denied Service connection is audited", || {
        std::fs::read_to_string(sw.tmp.0.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| {
                l["src_pod"] == "shop/batch"
                    && l["dst_ip"] == "10.96.50.12"
                    && l["dst_backend"] == format!("{host_ip}:{host_port}")
                    && l["verdict"] == "deny"
            })
    });

    // Metrics per Service.
    eventually("Service metrics", || {
        let (_, body) = http(&metrics, "GET", "/metrics", None);
        let value = |prefix: &str| {
            body.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        value("vswitch_service_connection_attempts_total{service=\"shop/api:web\"") >= 40.0
            && value("vswitch_service_refused_total{service=\"shop/empty:80\"") >= 1.0
            && value("vswitch_service_backends{service=\"shop/api:web\"") == 2.0
    });

    // A backend leaves while a connection to it is open: that connection
    // lives on, new ones go to the other backend.
    let (was, mut open) = connect(web, "10.96.50.10", 80).unwrap();
    let (gone, stays) = if was == "b1" {
        ("b1", "b2")
    } else {
        ("b2", "b1")
    };
    let relabelled = cluster().replace(
        &format!("name: {gone}, namespace: shop, labels: {{app: api"),
        &format!("name: {gone}, namespace: shop, labels: {{app: retired"),
    );
    assert_ne!(relabelled, cluster());
    std::fs::write(sw.tmp.0.join("manifests/cluster.yaml"), relabelled).unwrap();
    eventually("new connections avoid the removed backend", || {
        (0..6).all(|_| backend(web, "10.96.50.10", 80).as_deref() == Some(stays))
    });
    open.write_all(b"still").unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"still",
        "the open connection to the removed backend survives"
    );
}
