//! flowctl as an operator runs it: the binary, real manifests, real output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests")
}

fn flowctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowctl"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("flowctl runs")
}

fn json(args: &[&str]) -> Value {
    let out = flowctl(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

#[test]
fn trace_json_names_the_rule() {
    let dir = examples();
    let d = dir.to_str().unwrap();
    let v = json(&[
        "--manifests",
        d,
        "trace",
        "--output",
        "json",
        "tcp,src=default/frontend,dst=default/db,tp_dst=6379",
    ]);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["rule"], "default/test-network-policy ingress rule 0");
    let tables: Vec<u64> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["table"].as_u64().unwrap())
        .collect();
    // Each direction passes the Admin tier, NetworkPolicy, the Baseline tier.
    assert_eq!(tables, vec![0, 10, 30, 30, 40, 41, 42, 50, 51, 60, 70]);
    let conj = &v["steps"][8]["conjunction"];
    assert_eq!(conj["clauses"].as_array().unwrap().len(), 3);
    let v = json(&[
        "--manifests",
        d,
        "-o",
        "json",
        "trace",
        "udp,src=default/frontend,dst=default/db,tp_dst=6379",
    ]);
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["rule"], "default deny of default/db (ingress)");
}

#[test]
fn trace_text() {
    let out = flowctl(&[
        "--manifests",
        examples().to_str().unwrap(),
        "trace",
        "tcp,src=default/db,dst=10.0.0.7,tp_dst=5978",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        text.contains("verdict: ALLOW by default/test-network-policy egress rule 0"),
        "{text}"
    );
    assert!(text.contains("output: port 65534 (gateway)"), "{text}");
}

#[test]
fn reachability_matrix_json() {
    let v = json(&[
        "--manifests",
        examples().to_str().unwrap(),
        "reachability",
        "--port",
        "6379",
        "--output",
        "json",
    ]);
    let cells = v.as_array().unwrap();
    assert_eq!(cells.len(), 6 * 5);
    let cell = |from: &str, to: &str| {
        cells
            .iter()
            .find(|c| c["from"] == from && c["to"] == to)
            .unwrap()
            .clone()
    };
    assert_eq!(cell("myproject/client", "default/db")["verdict"], "allow");
    assert_eq!(cell("other/client", "default/db")["verdict"], "deny");
    assert_eq!(cell("other/client", "default/db")["protocol"], "tcp");
    assert_eq!(cell("other/client", "default/db")["port"], 6379);
    assert_eq!(
        cell("default/db", "default/frontend")["rule"],
        "default deny of default/db (egress)"
    );
}

#[test]
fn dump_flows_filters_and_annotates() {
    let out = flowctl(&[
        "--manifests",
        examples().to_str().unwrap(),
        "dump-flows",
        "--table",
        "51",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(text.lines().all(|l| l.contains("table=51,")), "{text}");
    assert!(text.contains("# default/test-network-policy ingress rule 0"));
    assert!(text.contains("tcp,tp_dst=6379,actions=conjunction("));
    let v = json(&[
        "--manifests",
        examples().to_str().unwrap(),
        "dump-flows",
        "--cookie",
        "egress rule 0",
        "-o",
        "json",
    ]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|f| f["rule"] == "default/test-network-policy egress rule 0")
    );
    assert!(!v.as_array().unwrap().is_empty());
}

#[test]
fn bad_input_exits_non_zero_with_the_message() {
    let dir = std::env::temp_dir().join(format!("flowctl-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(examples().join("cluster.yaml"), dir.join("cluster.yaml")).unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: wide, namespace: default}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 70}]}]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("broken.yaml"), "kind: Pod\nmetadata: {name: [\n").unwrap();
    let out = flowctl(&[
        "--manifests",
        dir.to_str().unwrap(),
        "trace",
        "tcp,src=default/frontend,dst=default/db,tp_dst=80",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.yaml: document 1: invalid NetworkPolicy default/wide: spec.ingress[0].ports[0].endPort"), "{err}");
    assert!(err.contains("broken.yaml: malformed YAML"), "{err}");
    // The valid objects still load, and the rejected policy opened nothing.
    assert!(String::from_utf8_lossy(&out.stdout).contains("verdict: ALLOW"));
    let out = flowctl(&[
        "--manifests",
        dir.to_str().unwrap(),
        "trace",
        "tcp,src=default/frontend",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad trace spec: missing dst="));
    let out = flowctl(&["--manifests", "/nonexistent/dir", "dump-flows"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to read /nonexistent/dir"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn completions_and_live_mode_without_a_switch() {
    let out = flowctl(&["completions", "bash"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("flowctl"));
    let out = flowctl(&["--socket", "/nonexistent.sock", "dump-flows"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running switch"));
}

#[test]
fn diff_lists_what_a_change_opens_and_closes() {
    let tenants = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multi-tenancy");
    let t = tenants.to_str().unwrap();
    // The same set: nothing changes, exit 0.
    let same = flowctl(&["--manifests", t, "diff", t]);
    assert!(same.status.success());
    assert_eq!(
        String::from_utf8_lossy(&same.stdout),
        "no reachability changes\n"
    );
    // Without the admin's policies: the tenants' isolation is gone, exit 1.
    let dir = std::env::temp_dir().join(format!("flowctl-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["cluster.yaml", "tenants.yaml"] {
        std::fs::copy(tenants.join(f), dir.join(f)).unwrap();
    }
    let out = flowctl(&[
        "--manifests",
        t,
        "-o",
        "json",
        "diff",
        dir.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "changes exit 1, like diff");
    let changes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let opened = changes
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["from"] == "tenant-a/worker" && c["to"] == "tenant-b/web")
        .expect("tenant A reaches tenant B once the Admin Deny is gone");
    assert_eq!(opened["before"], "deny");
    assert_eq!(opened["after"], "allow");
    assert_eq!(opened["port"], 80);
    assert!(
        opened["before_rule"]
            .as_str()
            .unwrap()
            .contains("isolate-tenant-b"),
        "{opened}"
    );
    assert!(
        changes
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["after"] == "allow"),
        "removing deny policies only opens: {changes}"
    );
}

/// The shipped staged example beside the example policy: offline, the trace,
/// the matrix and dump-policies say what it would change, and enforce
/// nothing.
#[test]
fn staged_policies_offline() {
    let dir = std::env::temp_dir().join(format!("flowctl-staged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["cluster.yaml", "test-network-policy.yaml"] {
        std::fs::copy(examples().join(f), dir.join(f)).unwrap();
    }
    let staged = examples().join("../staged/frontend-egress.yaml");
    std::fs::copy(&staged, dir.join("frontend-egress.yaml")).unwrap();
    let d = dir.to_str().unwrap();
    let trace = json(&[
        "--manifests",
        d,
        "-o",
        "json",
        "trace",
        "tcp,src=default/frontend,dst=default/backend,tp_dst=80",
    ]);
    assert_eq!(trace["verdict"], "allow", "not enforced: {trace}");
    assert_eq!(trace["staged"]["verdict"], "would deny", "{trace}");
    let matrix = json(&[
        "--manifests",
        d,
        "-o",
        "json",
        "reachability",
        "--port",
        "80",
    ]);
    let cell = matrix
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["from"] == "default/frontend" && c["to"] == "default/backend")
        .unwrap();
    assert_eq!(cell["verdict"], "allow");
    assert_eq!(cell["staged"]["verdict"], "would deny", "{cell}");
    let text = flowctl(&["--manifests", d, "reachability", "--port", "80"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("staged policies (vswitch.io/mode: audit) would change"),
        "{text}"
    );
    let policies = json(&["--manifests", d, "-o", "json", "dump-policies"]);
    let staged = policies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "default/frontend-egress")
        .unwrap();
    assert_eq!(staged["mode"], "audit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn services_offline_trace_through_a_cluster_ip_and_dump_services() {
    let dir = std::env::temp_dir().join(format!("flowctl-svc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cluster.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nstatus: {podIP: 10.1.0.2}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\n\
         spec: {containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}\nstatus: {podIP: 10.1.0.3}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: batch, namespace: shop, labels: {app: batch}}\nstatus: {podIP: 10.1.0.4}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-from-web, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.20, selector: {app: db}, ports: [{name: pg, port: 5432, targetPort: pg}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: none, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.21, selector: {app: nothing}, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let d = dir.to_str().unwrap();
    let v = json(&[
        "--manifests",
        d,
        "-o",
        "json",
        "trace",
        "tcp,src=shop/web,dst=10.96.0.20,tp_dst=5432",
    ]);
    assert_eq!(v["verdict"], "allow", "{v}");
    assert_eq!(v["translations"][0]["to"], "10.1.0.3:5432");
    assert_eq!(v["translations"][0]["pod"], "shop/db");
    // Policy decides on the backend: the batch job is not admitted.
    let v = json(&[
        "--manifests",
        d,
        "-o",
        "json",
        "trace",
        "tcp,src=shop/batch,dst=10.96.0.20,tp_dst=5432",
    ]);
    assert_eq!(v["verdict"], "deny", "{v}");
    assert!(v["rule"].as_str().unwrap().contains("shop/db"), "{v}");
    // No endpoints: refused.
    let v = json(&[
        "--manifests",
        d,
        "-o",
        "json",
        "trace",
        "tcp,src=shop/web,dst=10.96.0.21,tp_dst=80",
    ]);
    assert_eq!(v["verdict"], "deny");
    assert!(
        v["rule"].as_str().unwrap().contains("no ready endpoints"),
        "{v}"
    );
    let out = flowctl(&["--manifests", d, "dump-services"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("shop/db:pg") && text.contains("10.1.0.3:5432 (shop/db)"),
        "{text}"
    );
    assert!(text.contains("no endpoints: refused"), "{text}");
    let out = flowctl(&["--manifests", d, "dump-groups"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ct(nat(dst=10.1.0.3:5432))"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
