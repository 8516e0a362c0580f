//! Staged policies (`vswitch.io/mode: audit`): evaluated, never enforced;
//! flipping the annotation is one incremental change.

use std::path::Path;

use policy::compile::{Change, Compiler};
use policy::manifest::{self, Manifests};
use policy::offline::Offline;
use policy::probe::{Endpoint, L4};
use policy::staging;

const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {app: batch}}
status: {podIP: 10.1.0.4}
";

fn db_only_from_web(mode: Option<&str>) -> String {
    let annotations = mode.map_or(String::new(), |m| {
        format!("\n  annotations: {{vswitch.io/mode: {m}}}")
    });
    format!(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-web
  namespace: shop{annotations}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
"
    )
}

fn load(texts: &[&str]) -> Manifests {
    let mut m = Manifests::default();
    for (i, t) in texts.iter().enumerate() {
        manifest::load_str(&mut m, Path::new(&format!("{i}.yaml")), t);
    }
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    m
}

fn pod(s: &str) -> Endpoint {
    Endpoint::Pod(s.parse().unwrap())
}

#[test]
fn a_staged_deny_is_reported_not_enforced() {
    let staged = db_only_from_web(Some("audit"));
    let o = Offline::new(load(&[PODS, &staged]).to_cluster()).unwrap();
    let t = o
        .trace(&pod("shop/batch"), &pod("shop/db"), L4::Tcp(5432))
        .unwrap();
    assert!(t.verdict.allowed, "not enforced: {}", t.verdict.rule);
    let s = t.staged.expect("a staged verdict");
    assert!(!s.allowed);
    assert!(s.rule.contains("shop/db"), "{}", s.rule);
    let view = policy::explain::StagedView::of(&t.verdict, &s).unwrap();
    assert_eq!(view.verdict, "would deny");
    // The staged allow names its rule next to the enforced verdict.
    let t = o
        .trace(&pod("shop/web"), &pod("shop/db"), L4::Tcp(5432))
        .unwrap();
    assert!(t.verdict.allowed);
    let view = policy::explain::StagedView::of(&t.verdict, t.staged.as_ref().unwrap()).unwrap();
    assert_eq!(view.verdict, "would allow");
    assert!(
        view.rule.contains("shop/db-from-web ingress rule 0"),
        "{}",
        view.rule
    );
    // Enforced, the same policy denies.
    let enforced = db_only_from_web(None);
    let o = Offline::new(load(&[PODS, &enforced]).to_cluster()).unwrap();
    let t = o
        .trace(&pod("shop/batch"), &pod("shop/db"), L4::Tcp(5432))
        .unwrap();
    assert!(!t.verdict.allowed);
    assert!(t.staged.is_none(), "nothing staged, no staged verdict");
}

#[test]
fn a_mistyped_mode_rejects_the_policy_naming_the_annotation() {
    let mut m = Manifests::default();
    manifest::load_str(
        &mut m,
        Path::new("p.yaml"),
        &db_only_from_web(Some("audti")),
    );
    let e = control_chain(&m.errors[0]);
    assert!(e.contains("metadata.annotations[vswitch.io/mode]"), "{e}");
    assert!(e.contains("\"audti\""), "{e}");
}

fn control_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// The enforcing compiler, fed changes through `staging::enforced`, stays
/// what a full compile of the enforced cluster gives; flipping the
/// annotation changes only the flipped policy's flows.
#[test]
fn flipping_the_mode_is_one_incremental_change() {
    let base = load(&[PODS]);
    let mut c = Compiler::from_cluster(base.to_cluster());
    let staged = load(&[&db_only_from_web(Some("audit"))]).policies.remove(0);
    let enforced = load(&[&db_only_from_web(None)]).policies.remove(0);
    let diff = c.apply(staging::enforced(Change::Policy(staged.clone())));
    assert!(diff.is_empty(), "a staged policy compiles nothing enforced");
    let diff = c.apply(staging::enforced(Change::Policy(enforced.clone())));
    assert!(!diff.is_empty());
    let full = Compiler::from_cluster(staging::enforced_cluster(c.cluster()));
    let mut a: Vec<_> = c.flows().into_iter().map(|f| f.to_string()).collect();
    let mut b: Vec<_> = full.flows().into_iter().map(|f| f.to_string()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // Back to audit: the policy's flows go, nothing else changes.
    let before = c.len();
    let diff = c.apply(staging::enforced(Change::Policy(staged)));
    assert_eq!(diff.added.len() + diff.modified.len(), 0, "{diff:?}");
    assert_eq!(c.len(), before - diff.deleted.len());
    assert_eq!(
        c.len(),
        Compiler::from_cluster(base.to_cluster()).len(),
        "as if the policy never was"
    );
}
