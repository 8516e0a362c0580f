//! Changing policy without fear, as an operator does it: staged policies
//! (`vswitch.io/mode: audit`) over real traffic, `flowctl what-if` replaying
//! what the switch saw against another policy set, and the live web view in
//! a real headless browser.
//!
//! Needs root (and chromium + chromium-driver for the browser); skipped
//! outside CI without them, a failure in CI. Every namespace and device is
//! uniquely named and removed on drop.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

mod common;
mod webdriver;

use common::{
    Attached, Cni, Netns, TempDir, Vswitchd, eventually, flowctl, free_address, http, privileged,
    serve_tcp, tcp, write_config,
};

const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: batch, namespace: shop, labels: {app: batch}}\n";

/// The database only from the web pods, on 5432; staged with `mode`.
fn db_from_web(mode: Option<&str>) -> String {
    let annotations = mode.map_or(String::new(), |m| {
        format!(", annotations: {{vswitch.io/mode: {m}}}")
    });
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: db-from-web, namespace: shop{annotations}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: db}}}}\n\
         \x20 ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{{port: 5432}}]}}]\n"
    )
}

/// Every egress of the web pods denied; staged with `mode`.
fn web_no_egress(mode: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: web-no-egress, namespace: shop, annotations: {{vswitch.io/mode: {mode}}}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Egress]\n"
    )
}

/// A Baseline Deny whose rule name is markup: the page must show it as text.
const HOSTILE_NAME: &str = "<img src=x onerror=window.pwned=1>";

fn batch_not_to_web() -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
         metadata: {{name: batch-not-to-web}}\n\
         spec:\n  tier: Baseline\n  priority: 1\n\
         \x20 subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: batch}}}}}}}}\n\
         \x20 egress: [{{name: '{HOSTILE_NAME}', action: Deny, to: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: web}}}}}}}}]}}]\n"
    )
}

const PODS: [&str; 3] = ["shop/web", "shop/db", "shop/batch"];

/// A switch with the shop's three pods attached through CNI, the database
/// serving on 5432.
struct Shop {
    tmp: TempDir,
    daemon: Vswitchd,
    cni: Cni,
    spaces: Vec<Netns>,
    ips: BTreeMap<&'static str, IpAddr>,
    metrics: String,
}

impl Shop {
    fn start(tag: &str, subnet: u8, policies: &[String], extra: &str) -> Shop {
        let tmp = TempDir::new(tag);
        let dir = tmp.0.clone();
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        std::fs::write(dir.join("manifests/cluster.yaml"), CLUSTER).unwrap();
        for (i, p) in policies.iter().enumerate() {
            std::fs::write(dir.join(format!("manifests/policy{i}.yaml")), p).unwrap();
        }
        let metrics = free_address();
        let gw = format!("10.94.{subnet}.1");
        let (config, socket) = write_config(
            &dir,
            &format!(
                "metrics_address = {metrics:?}\n{extra}\n[gateway]\nname = \"{tag}\"\naddress = \"{gw}/24\"\n[audit]\npath = {:?}\nattempt_quiet_ms = 500\n",
                dir.join("audit.log").to_str().unwrap()
            ),
        );
        let daemon = Vswitchd::start(&config, &socket);
        let cni = Cni::host_local(&socket, &format!("10.94.{subnet}.0/24"), &gw, &dir);
        let (spaces, addrs) = cni.add_all(tag, &PODS);
        let ips: BTreeMap<&str, IpAddr> = PODS.iter().copied().zip(addrs).collect();
        serve_tcp(&spaces[1], &ips["shop/db"].to_string(), 5432);
        Shop {
            tmp,
            daemon,
            cni,
            spaces,
            ips,
            metrics,
        }
    }

    fn ns(&self, pod: &str) -> &Netns {
        &self.spaces[PODS.iter().position(|p| *p == pod).unwrap()]
    }

    /// Whether `from` reaches the database.
    fn to_db(&self, from: &str) -> bool {
        tcp(self.ns(from), &self.ips["shop/db"].to_string(), 5432)
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.tmp.0.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn manifests(&self) -> std::path::PathBuf {
        self.tmp.0.join("manifests")
    }

    fn detach(self) -> Shop {
        drop(Attached {
            cni: &self.cni,
            pods: PODS
                .iter()
                .zip(&self.spaces)
                .map(|(p, ns)| (ns, p.to_string()))
                .collect(),
        });
        self
    }
}

/// flowctl with its exit code, stdout and stderr (what-if exits 1 on changes).
fn flowctl_code(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let exe = Path::new(env!("CARGO_BIN_EXE_vswitchd")).with_file_name("flowctl");
    let out = Command::new(exe)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("flowctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn staged_policies_are_evaluated_not_enforced_and_what_if_previews_enforcing_them() {
    let pid = std::process::id() % 100_000;
    let tag = format!("vsop{pid}");
    if !privileged(&format!("{tag}x")) {
        return;
    }
    let subnet = 100 + (pid % 50) as u8;
    let shop = Shop::start(&tag, subnet, &[db_from_web(Some("audit"))], "");
    let socket = shop.daemon.socket.clone();

    // Staged: nothing is enforced, the web pod and the batch job both connect.
    eventually("web reaches the database", || shop.to_db("shop/web"));
    assert!(shop.to_db("shop/batch"), "a staged policy is not enforced");

    // The audit log says what the staged policy would do, next to the real
    // verdict, though allowed connections are not logged otherwise.
    eventually("the would-be denial is audited", || {
        shop.audit().iter().any(|l| {
            l["src_pod"] == "shop/batch"
                && l["dst_pod"] == "shop/db"
                && l["verdict"] == "allow"
                && l["staged"]["verdict"] == "would deny"
                && l["staged"]["rule"]
                    .as_str()
                    .unwrap_or("")
                    .contains("shop/db")
        })
    });
    assert!(
        !shop
            .audit()
            .iter()
            .any(|l| l["src_pod"] == "shop/web" && l["dst_pod"] == "shop/db"),
        "connections staged policies would also allow are not logged (allowed = false)"
    );
    // Metrics: per staged rule.
    eventually("the staged counter is exported", || {
        let (_, body) = http(&shop.metrics, "GET", "/metrics", None);
        body.lines().any(|l| {
            l.starts_with("vswitch_policy_staged_connections_total{")
                && l.contains("verdict=\"would-deny\"")
                && l.contains("policy=\"shop/*\"")
        })
    });

    // flowctl: the trace, the policy's mode, the recent connections.
    let trace = flowctl(
        &socket,
        &["trace", "tcp,src=shop/batch,dst=shop/db,tp_dst=5432"],
    );
    assert!(trace.contains("verdict: ALLOW"), "{trace}");
    assert!(trace.contains("staged: WOULD DENY by"), "{trace}");
    let policies: Value =
        serde_json::from_str(&flowctl(&socket, &["dump-policies", "-o", "json"])).unwrap();
    let db = policies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "shop/db-from-web")
        .expect("the staged policy is listed");
    assert_eq!(db["mode"], "audit", "{db}");
    let recent: Value = serde_json::from_str(&flowctl(&socket, &["recent", "-o", "json"])).unwrap();
    let batch = recent["tuples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["src_pod"] == "shop/batch" && t["dst_port"] == 5432)
        .expect("batch -> db is remembered");
    assert_eq!(batch["staged"]["verdict"], "would deny", "{batch}");
    assert_eq!(batch["verdict"], "allow");

    // what-if: enforcing it would cut the batch job, and only it.
    let proposal = TempDir::new(&format!("{tag}-proposal"));
    std::fs::write(proposal.0.join("db.yaml"), db_from_web(None)).unwrap();
    let dir = proposal.0.to_str().unwrap();
    let (code, out, err) = flowctl_code(&socket, &["--manifests", dir, "what-if", "-o", "json"]);
    assert_eq!(code, 1, "changes: exit 1\n{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{v}");
    assert_eq!(changes[0]["change"], "allow -> deny");
    let tuples = changes[0]["tuples"].as_array().unwrap();
    assert_eq!(tuples.len(), 1, "{v}");
    assert_eq!(tuples[0]["src_pod"], "shop/batch");
    assert!(changes[0]["connections"].as_u64().unwrap() >= 1);
    let (_, text, _) = flowctl_code(&socket, &["--manifests", dir, "what-if"]);
    assert!(text.contains("allow -> deny by"), "{text}");
    assert!(text.contains("shop/batch"), "{text}");
    // The set in force (staged as it is): nothing changes, exit 0.
    std::fs::write(proposal.0.join("db.yaml"), db_from_web(Some("audit"))).unwrap();
    let (code, text, err) = flowctl_code(&socket, &["--manifests", dir, "what-if"]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("no verdict would change"), "{text}");
    // A typo in the proposal: exit 2, named.
    std::fs::write(
        proposal.0.join("db.yaml"),
        db_from_web(None).replace(
            "podSelector: {matchLabels: {app: db}}",
            "podSelectr: {matchLabels: {app: db}}",
        ),
    )
    .unwrap();
    let (code, _, err) = flowctl_code(&socket, &["--manifests", dir, "what-if"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("podSelectr"), "{err}");

    // Flip the annotation: enforced now, for the batch job only.
    std::fs::write(shop.manifests().join("policy0.yaml"), db_from_web(None)).unwrap();
    eventually("the flipped policy is enforced", || {
        !shop.to_db("shop/batch")
    });
    assert!(shop.to_db("shop/web"), "its allow rule holds");
    let policies: Value =
        serde_json::from_str(&flowctl(&socket, &["dump-policies", "-o", "json"])).unwrap();
    assert!(
        policies
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "shop/db-from-web" && p["mode"] == "enforce"),
        "{policies}"
    );
    let trace = flowctl(
        &socket,
        &["trace", "tcp,src=shop/batch,dst=shop/db,tp_dst=5432"],
    );
    assert!(trace.contains("verdict: DENY"), "{trace}");
    assert!(
        !trace.contains("staged:"),
        "nothing staged any more: {trace}"
    );
    drop(shop.detach());
}

/// The web view in a real browser: the test's pods, a denied connection
/// within a second, a connection a staged policy would deny, the matrix, and
/// a trace identical to flowctl's.
#[test]
fn the_web_view_shows_pods_live_connections_and_traces_in_a_browser() {
    let pid = std::process::id() % 100_000;
    let tag = format!("vsow{pid}");
    if !privileged(&format!("{tag}x")) || !webdriver::available() {
        return;
    }
    let subnet = 150 + (pid % 50) as u8;
    let shop = Shop::start(
        &tag,
        subnet,
        &[
            db_from_web(None),
            web_no_egress("audit"),
            batch_not_to_web(),
        ],
        "web = true",
    );
    let socket = shop.daemon.socket.clone();
    eventually("web reaches the database", || shop.to_db("shop/web"));
    // Off unless configured, and read only.
    let (status, _) = http(&shop.metrics, "POST", "/api/summary", Some("{}"));
    assert_eq!(status, 405, "read only");
    let (status, body) = http(&shop.metrics, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(body.contains("vswitch_port_rx_packets_total"), "{body}");

    let browser = webdriver::Browser::start();
    browser.open(&format!("http://{}/", shop.metrics));
    // The page shows the test's pods, in their namespace.
    let pods = browser
        .wait_for(
            "const p = [...document.querySelectorAll('#graph [data-namespace=\"shop\"]')].length > 0 \
               && [...document.querySelectorAll('#graph [data-pod]')].map(e => e.dataset.pod).sort(); \
             const listed = ['shop/web', 'shop/db', 'shop/batch'].every(k => document.querySelector('#pods').textContent.includes(k)); \
             return p && p.length === 3 && listed ? p : null;",
            json!([]),
            Duration::from_secs(10),
        )
        .expect("the page lists the pods");
    assert_eq!(pods.0, json!(["shop/batch", "shop/db", "shop/web"]));
    // Wait for the feed's first poll, so what follows is news to the page.
    browser
        .wait_for(
            "return document.querySelector('#live tbody') !== null && window.performance.now() > 500;",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("the page runs");

    // A denied attempt appears within a second of happening.
    let ns = shop.ns("shop/batch").0.clone();
    let db = shop.ips["shop/db"];
    let attempt = std::thread::spawn(move || common::probe(&ns, db, 5432, false).join().unwrap());
    let seen = browser.wait_for(
        "return document.querySelector('#live tbody tr[data-verdict=\"deny\"][data-src=\"shop/batch\"][data-dst=\"shop/db\"]') !== null;",
        json!([]),
        Duration::from_secs(5),
    );
    assert!(!attempt.join().unwrap(), "batch -> db is denied");
    let (_, took) = seen.expect("the denied connection appears");
    assert!(
        took <= Duration::from_secs(1),
        "a denied connection appears within a second (took {took:?})"
    );

    // web -> db: allowed, and the staged policy would deny it.
    assert!(shop.to_db("shop/web"));
    browser
        .wait_for(
            "return document.querySelector('#live tbody tr[data-verdict=\"allow\"][data-src=\"shop/web\"][data-staged=\"would deny\"]') !== null \
                && document.querySelector('#graph path.would-deny') !== null \
                && document.querySelector('#graph path.deny') !== null;",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("the would-be denial is shown, in the list and the graph");
    // Per-rule counters.
    browser
        .wait_for(
            "return [...document.querySelectorAll('#rules tbody tr')].some(r => r.dataset.rule.includes('shop/db'));",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("rule counters");

    // Names from the cluster are text, never markup.
    let ns = shop.ns("shop/batch").0.clone();
    let web_ip = shop.ips["shop/web"];
    std::thread::spawn(move || common::probe(&ns, web_ip, 80, false).join().unwrap());
    let (shown, _) = browser
        .wait_for(
            "const r = document.querySelector('#live tbody tr[data-src=\"shop/batch\"][data-dst=\"shop/web\"]'); \
             return r ? [r.textContent, document.querySelectorAll('#live img, #rules img').length, window.pwned === undefined] : null;",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("batch -> web is shown");
    assert!(shown[0].as_str().unwrap().contains(HOSTILE_NAME), "{shown}");
    assert_eq!(shown[1], 0, "no element from a rule name");
    assert_eq!(shown[2], true, "no script from a rule name");

    // The reachability matrix on 5432.
    browser.type_into("#matrix-port", "5432");
    browser.click("#matrix-form button");
    let cells = browser
        .wait_for(
            "const c = s => document.querySelector(`#matrix td[data-from=\"${s[0]}\"][data-to=\"${s[1]}\"]`); \
             const a = c(['shop/batch', 'shop/db']), b = c(['shop/web', 'shop/db']); \
             return a && b && document.querySelector('#matrix').dataset.port === '5432' \
                ? [a.dataset.verdict, b.dataset.verdict, b.classList.contains('would')] : null;",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("the matrix");
    assert_eq!(cells.0, json!(["deny", "allow", true]));

    // The trace form shows the trace flowctl shows.
    let spec = "tcp,src=shop/batch,dst=shop/db,tp_dst=5432";
    browser.type_into("#trace-spec", spec);
    browser.click("#trace-button");
    let (text, _) = browser
        .wait_for(
            "const o = document.getElementById('trace-out'); return o.dataset.verdict ? o.textContent : null;",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("the trace form answers");
    let cli = flowctl(&socket, &["trace", spec]);
    assert_eq!(text.as_str().unwrap(), cli, "the page's trace is flowctl's");
    assert!(cli.contains("verdict: DENY"), "{cli}");
    // A bad spec is named.
    browser.type_into("#trace-spec", "tcp,src=shop/nobody,dst=shop/db,tp_dst=5432");
    browser.click("#trace-button");
    let (err, _) = browser
        .wait_for(
            "const o = document.getElementById('trace-out'); return o.className === 'error' ? o.textContent : null;",
            json!([]),
            Duration::from_secs(5),
        )
        .expect("errors are shown");
    assert!(err.as_str().unwrap().contains("shop/nobody"), "{err}");
    // VSWITCH_SCREENSHOT=FILE keeps a picture of the page (for the docs).
    if let Some(path) = std::env::var_os("VSWITCH_SCREENSHOT") {
        browser.open(&format!("http://{}/", shop.metrics));
        browser
            .wait_for(
                "return document.querySelectorAll('#graph path[data-edge]').length > 1;",
                json!([]),
                Duration::from_secs(5),
            )
            .expect("the graph draws");
        std::fs::write(path, browser.screenshot()).unwrap();
    }
    drop(browser);
    drop(shop.detach());
}
