//! NetworkPolicy semantics beyond the upstream subset, through the offline path.

use policy::compile::Compiler;
use policy::manifest::{Manifests, load_str};
use policy::offline::Offline;
use policy::probe::{Endpoint, L4};

const PODS: &str = "
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.1.1}, {type: Hostname, address: n1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web1, namespace: app, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: sip, containerPort: 5060, protocol: SCTP}]}]
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web2, namespace: app, labels: {app: web}}
spec:
  nodeName: n2
  containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]
status: {podIPs: [{ip: 10.1.0.2}, {ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIPs: [{ip: 10.1.0.3}, {ip: 'fd00::3'}]}
";

fn offline(policies: &str) -> Offline {
    let mut m = Manifests::default();
    load_str(&mut m, std::path::Path::new("pods.yaml"), PODS);
    load_str(&mut m, std::path::Path::new("policies.yaml"), policies);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    Offline::new(m.to_cluster()).unwrap()
}

fn verdict(o: &Offline, from: &str, to: &str, l4: L4) -> (bool, String) {
    let ep = |s: &str| match s.parse() {
        Ok(ip) => Endpoint::Ip(ip),
        Err(_) => Endpoint::Pod(s.parse().unwrap()),
    };
    let v = o.trace(&ep(from), &ep(to), l4).unwrap().verdict;
    (v.allowed, v.rule)
}

const DENY_ALL: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: app}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
";

#[test]
fn own_node_traffic_is_always_allowed() {
    let o = offline(DENY_ALL);
    assert!(
        verdict(&o, "192.168.1.1", "app/web1", L4::Tcp(10250)).0,
        "kubelet on its own node"
    );
    assert!(
        verdict(&o, "app/web1", "192.168.1.1", L4::Udp(53)).0,
        "pod to its own node"
    );
    let (allowed, rule) = verdict(&o, "192.168.1.2", "app/web1", L4::Tcp(10250));
    assert!(!allowed, "another node is not exempt");
    assert_eq!(rule, "default deny of app/web1 (ingress)");
    assert!(!verdict(&o, "app/client", "app/web1", L4::Tcp(8080)).0);
}

#[test]
fn named_ports_resolve_on_each_destination_pod() {
    let o = offline(&format!(
        "{DENY_ALL}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-http, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}], ports: [{{port: http}}]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-out, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  egress: [{{to: [{{podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{{port: http}}]}}]
"
    ));
    assert!(verdict(&o, "app/client", "app/web1", L4::Tcp(8080)).0);
    assert!(
        !verdict(&o, "app/client", "app/web1", L4::Tcp(9090)).0,
        "9090 is http only on web2"
    );
    assert!(verdict(&o, "app/client", "app/web2", L4::Tcp(9090)).0);
    assert!(!verdict(&o, "app/client", "app/web2", L4::Tcp(8080)).0);
    assert!(
        !verdict(&o, "app/client", "app/web1", L4::Udp(8080)).0,
        "the protocol must match"
    );
    // Dual stack: the same rules over IPv6 (client fd00::3, web2 fd00::2).
    assert!(verdict(&o, "fd00::3", "fd00::2", L4::Tcp(9090)).0);
    assert!(!verdict(&o, "fd00::3", "fd00::2", L4::Tcp(8080)).0);
    assert!(
        !verdict(&o, "fd00::99", "fd00::2", L4::Tcp(9090)).0,
        "not from a client pod"
    );
}

#[test]
fn port_ranges_sctp_and_empty_from() {
    let o = offline(&format!(
        "{DENY_ALL}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: range, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: []
    ports: [{{port: 30000, endPort: 30100}}, {{protocol: SCTP, port: sip}}]
"
    ));
    for (port, want) in [
        (29999, false),
        (30000, true),
        (30057, true),
        (30100, true),
        (30101, false),
    ] {
        assert_eq!(
            verdict(&o, "8.8.8.8", "app/web1", L4::Tcp(port)).0,
            want,
            "tcp {port}"
        );
    }
    assert!(
        !verdict(&o, "app/client", "app/web1", L4::Sctp(5060)).0,
        "client egress is denied"
    );
    assert!(
        verdict(&o, "8.8.8.8", "app/web1", L4::Sctp(5060)).0,
        "empty from: every source"
    );
    assert!(
        !verdict(&o, "8.8.8.8", "app/web2", L4::Sctp(5060)).0,
        "web2 has no sip port"
    );
}

#[test]
fn egress_only_policy_leaves_ingress_open() {
    let o = offline(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: app}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 'fd00::/64'}}]}]
",
    );
    assert!(
        verdict(&o, "app/web1", "app/client", L4::Tcp(1)).0,
        "ingress not isolated"
    );
    assert!(
        !verdict(&o, "app/client", "app/web1", L4::Tcp(80)).0,
        "IPv4 is not in fd00::/64"
    );
    assert!(
        !verdict(&o, "app/client", "app/web2", L4::Tcp(80)).0,
        "pod to pod prefers IPv4"
    );
    assert!(
        verdict(&o, "fd00::3", "fd00::2", L4::Tcp(80)).0,
        "IPv6 to web2 is in fd00::/64"
    );
}

#[test]
fn a_rejected_update_leaves_the_last_valid_version_in_force() {
    let mut m = Manifests::default();
    load_str(&mut m, std::path::Path::new("pods.yaml"), PODS);
    let mut c = Compiler::from_cluster(m.to_cluster());
    let np = |cidr: &str| {
        let yaml = format!(
            "metadata: {{name: p, namespace: app}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: '{cidr}'}}}}]}}]\n"
        );
        serde_saphyr::from_str::<k8s_openapi::api::networking::v1::NetworkPolicy>(&yaml).unwrap()
    };
    c.apply_network_policy(&np("10.9.0.0/16")).unwrap();
    let sorted = |c: &Compiler| {
        let mut v: Vec<String> = c.flows().iter().map(ToString::to_string).collect();
        v.sort();
        v
    };
    let before = sorted(&c);
    let err = c.apply_network_policy(&np("10.9.0.0/99")).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        "invalid NetworkPolicy app/p: spec.ingress[0].from[0].ipBlock.cidr: \"10.9.0.0/99\" is not a valid CIDR"
    );
    assert_eq!(sorted(&c), before, "nothing changed");
}
