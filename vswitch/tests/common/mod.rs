//! What the end-to-end tests share: `ip`, network namespaces, and the rule that
//! an unprivileged run skips outside CI but fails in it.

#![allow(dead_code)] // each test binary uses a different part

use std::os::fd::AsFd;
use std::process::Command;

/// Runs `ip ARGS`, failing the test with ip's message.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// Creates it (replacing a leftover of the same name) with `lo` up.
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            vswitch::sys::setns_net(ns.as_fd()).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Whether TAP devices can be created (root; `probe` is a name to try). Outside
/// CI the end-to-end tests skip without; in CI (root, as .ci/run runs them)
/// that is a failure.
pub fn privileged(probe: &str) -> bool {
    match vswitch::Tap::open(probe, false) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "end-to-end tests cannot run in CI: cannot create TAP devices ({e})"
            );
            eprintln!("skipping end-to-end test: cannot create TAP devices ({e})");
            false
        }
    }
}

/// Runs vswitch-cni as a container runtime does: `command` for pod
/// `namespace/name` in `pod_ns`, network config `netconf` on stdin. With
/// `node`, the plugin runs inside that node's network namespace. Returns
/// whether it succeeded and what it printed.
pub fn cni(
    node: Option<&str>,
    command: &str,
    pod_ns: &Netns,
    container: &str,
    pod: &str,
    netconf: &str,
) -> (bool, serde_json::Value) {
    use std::io::Write;
    use std::process::Stdio;
    let (pns, pname) = pod.split_once('/').expect("namespace/name");
    let exe = env!("CARGO_BIN_EXE_vswitch-cni");
    let mut cmd = match node {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, exe]);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod_ns.0))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={pns};K8S_POD_NAME={pname}"),
        )
        .env("CNI_PATH", "/usr/lib/cni:/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("vswitch-cni runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(netconf.as_bytes())
        .expect("netconf written");
    let out = child.wait_with_output().expect("vswitch-cni finishes");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v)
}
