//! What the Kubernetes-source tests share: API objects as JSON, and a
//! vswitchd fed by the test API server with TAP devices attached as pods.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use control::Request;
use serde_json::{Value, json};
use vswitch::Tap;

use crate::apiserver::ApiServer;
use crate::common::Vswitchd;

pub fn ns(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

pub fn pod(ns: &str, name: &str, labels: Value, node: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": [{"name": "pg", "containerPort": 5432}]}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

pub fn node(name: &str, ip: &str, cidr: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}

pub fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// vswitchd plus the TAP devices the test attached; all removed on drop.
pub struct Node {
    pub daemon: Vswitchd,
    pub dir: PathBuf,
    pub taps: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.daemon.kill9();
        for t in &self.taps {
            let _ = Tap::delete(t);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    pub fn ask(&self, req: &Request) -> Result<Value, String> {
        self.daemon.ask(req)
    }

    /// Attaches a persistent TAP (created here) as `pod` with `ip`.
    pub fn attach(&mut self, pod: &str, ip: &str) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vsk{}t{n}", std::process::id() % 10_000);
        drop(Tap::open(&name, true).expect("create TAP"));
        self.taps.push(name.clone());
        let n = self.taps.len() as u8;
        self.ask(&Request::Attach(control::Attach {
            pod: pod.parse().unwrap(),
            netns: None,
            ifname: name,
            mac: control::Mac([0x0a, 0x58, 0, 0, 0, n]),
            ips: vec![ip.parse().unwrap()],
        }))
        .expect("attach");
    }

    /// (verdict, rule) of a new TCP connection.
    pub fn verdict(&self, src: &str, dst: &str, port: u16) -> (String, String) {
        self.daemon.verdict(src, dst, port)
    }

    /// Waits until the trace gives `want` (verdict, rule substring).
    pub fn converges(&self, what: &str, src: &str, dst: &str, port: u16, want: (&str, &str)) {
        let start = Instant::now();
        loop {
            let (v, r) = self.verdict(src, dst, port);
            if v == want.0 && r.contains(want.1) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{what}: {src} -> {dst}:{port} is {v} by {r:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Installed flows whose text contains `needle`.
    pub fn flows_mentioning(&self, needle: &str) -> Vec<String> {
        self.ask(&Request::DumpFlows)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["flow"].as_str())
            .filter(|f| f.contains(needle))
            .map(String::from)
            .collect()
    }

    pub fn ready(&self) -> bool {
        self.daemon.ready()
    }
}

/// `extra` goes before the `[kubernetes]` section (top-level keys, tables),
/// `kube_extra` into it.
pub fn start(api: &ApiServer, dir: &Path, extra: &str, kube_extra: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let socket = dir.join("vswitchd.sock");
    let config = dir.join("vswitchd.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {:?}\nstate_dir = {:?}\nsource = \"kubernetes\"\nnode_name = \"node-a\"\n{extra}\n[kubernetes]\nkubeconfig = {:?}\n{kube_extra}\n",
            socket.to_str().unwrap(),
            dir.join("state").to_str().unwrap(),
            kubeconfig.to_str().unwrap()
        ),
    )
    .unwrap();
    let daemon = Vswitchd::start_with(&config, &socket, None, &[("RUST_LOG", "info,kube=warn")]);
    Node {
        daemon,
        dir: dir.into(),
        taps: vec![],
    }
}
