//! The six behaviours written at the top of the example policy
//! (examples/manifests/test-network-policy.yaml), each checked offline with the
//! rule that decides it.

use std::path::Path;

use policy::explain::Traced;
use policy::manifest;
use policy::offline::Offline;
use policy::probe::{Endpoint, L4};

fn offline() -> Offline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    let m = manifest::load(&dir).unwrap();
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    Offline::new(m.to_cluster()).unwrap()
}

fn ep(s: &str) -> Endpoint {
    match s.parse() {
        Ok(ip) => Endpoint::Ip(ip),
        Err(_) => Endpoint::Pod(s.parse().unwrap()),
    }
}

fn trace(o: &Offline, from: &str, to: &str, l4: L4) -> Traced {
    o.trace(&ep(from), &ep(to), l4).unwrap()
}

fn allowed(o: &Offline, from: &str, to: &str, l4: L4) -> bool {
    trace(o, from, to, l4).verdict.allowed
}

const RULE_IN: &str = "default/test-network-policy ingress rule 0";
const RULE_OUT: &str = "default/test-network-policy egress rule 0";

#[test]
fn applies_only_to_role_db_in_default_both_directions() {
    let o = offline();
    // Pods it does not select are not isolated, either way.
    assert!(allowed(
        &o,
        "default/frontend",
        "default/backend",
        L4::Tcp(80)
    ));
    assert!(allowed(&o, "other/client", "default/backend", L4::Udp(53)));
    assert!(allowed(&o, "default/backend", "172.16.0.1", L4::Tcp(443)));
    // db is isolated for ingress and for egress.
    let t = trace(&o, "default/backend", "default/db", L4::Tcp(80));
    assert_eq!(t.verdict.rule, "default deny of default/db (ingress)");
    let t = trace(&o, "default/db", "default/backend", L4::Tcp(80));
    assert_eq!(t.verdict.rule, "default deny of default/db (egress)");
}

#[test]
fn ingress_only_tcp_6379() {
    let o = offline();
    assert!(allowed(&o, "default/frontend", "default/db", L4::Tcp(6379)));
    assert!(!allowed(
        &o,
        "default/frontend",
        "default/db",
        L4::Tcp(6380)
    ));
    assert!(!allowed(
        &o,
        "default/frontend",
        "default/db",
        L4::Udp(6379)
    ));
    assert!(!allowed(
        &o,
        "default/frontend",
        "default/db",
        L4::Sctp(6379)
    ));
    assert!(!allowed(&o, "default/frontend", "default/db", L4::Icmp));
}

#[test]
fn from_role_frontend_in_default() {
    let o = offline();
    let t = trace(&o, "default/frontend", "default/db", L4::Tcp(6379));
    assert!(t.verdict.allowed);
    assert!(t.verdict.rule.contains(RULE_IN), "{}", t.verdict.rule);
    assert!(!allowed(&o, "default/backend", "default/db", L4::Tcp(6379)));
    assert!(
        !allowed(&o, "other/client", "default/db", L4::Tcp(6379)),
        "role=frontend only in default"
    );
}

#[test]
fn from_any_pod_in_namespaces_labelled_project_myproject() {
    let o = offline();
    let t = trace(&o, "myproject/client", "default/db", L4::Tcp(6379));
    assert!(t.verdict.allowed, "{}", t.verdict.rule);
    assert!(t.verdict.rule.contains(RULE_IN));
    assert!(!allowed(&o, "other/client", "default/db", L4::Tcp(6379)));
}

#[test]
fn from_172_17_0_0_16_except_172_17_1_0_24() {
    let o = offline();
    assert!(allowed(&o, "172.17.0.5", "default/db", L4::Tcp(6379)));
    assert!(allowed(&o, "172.17.200.1", "default/db", L4::Tcp(6379)));
    let t = trace(&o, "172.17.1.5", "default/db", L4::Tcp(6379));
    assert!(!t.verdict.allowed);
    assert_eq!(t.verdict.rule, "default deny of default/db (ingress)");
    assert!(!allowed(&o, "172.18.0.5", "default/db", L4::Tcp(6379)));
}

#[test]
fn egress_only_to_10_0_0_0_24_on_tcp_5978() {
    let o = offline();
    let t = trace(&o, "default/db", "10.0.0.5", L4::Tcp(5978));
    assert!(t.verdict.allowed);
    assert!(t.verdict.rule.contains(RULE_OUT), "{}", t.verdict.rule);
    assert!(
        allowed(&o, "default/db", "default/metrics", L4::Tcp(5978)),
        "a pod inside the CIDR"
    );
    assert!(!allowed(&o, "default/db", "10.0.0.5", L4::Tcp(80)));
    assert!(!allowed(&o, "default/db", "10.0.0.5", L4::Udp(5978)));
    assert!(!allowed(&o, "default/db", "10.0.1.5", L4::Tcp(5978)));
    assert!(!allowed(
        &o,
        "default/db",
        "default/frontend",
        L4::Tcp(6379)
    ));
}
