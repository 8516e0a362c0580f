//! The CNI plugin (spec 1.0): ADD, DEL, CHECK, VERSION.
//!
//! Owns attaching a pod the way a container runtime asks: IPAM delegated to the
//! plugin named in the network config (host-local), a persistent TAP device handed
//! to vswitchd over the control socket, then moved into the pod's namespace and
//! configured. Every failure is reported in the CNI error format; a failed ADD
//! undoes what it did; DEL is idempotent.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::tap::Tap;
use control::view::PortView;
use control::{ControlError, Request, error_chain};

pub const SUPPORTED: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: code, message, details (printed as the spec says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// CNI well-known error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_LATER: u32 = 11;
    pub const PLUGIN: u32 = 999;
}

/// The network configuration on stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    #[serde(default)]
    pub socket: Option<PathBuf>,
    pub ipam: Value,
}

/// The CNI_* environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: HashMap<String, String>,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the CNI_* variables `command` needs.
    ///
    /// Fails (code 4) naming the first missing or malformed variable.
    pub fn from(vars: &HashMap<String, String>) -> Result<Env, CniError> {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let command = get("CNI_COMMAND");
        if command.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set",
                "one of ADD, DEL, CHECK, VERSION",
            ));
        }
        let need = |k: &str| -> Result<String, CniError> {
            match vars.get(k) {
                Some(v) if !v.is_empty() => Ok(v.clone()),
                _ => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{k} is not set"),
                    format!("required for {command}"),
                )),
            }
        };
        let mut env = Env {
            command: command.clone(),
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: HashMap::new(),
            path: get("CNI_PATH")
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        };
        if command == "VERSION" {
            return Ok(env);
        }
        env.container_id = need("CNI_CONTAINERID")?;
        env.ifname = need("CNI_IFNAME")?;
        if env.ifname.len() > 15 {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_IFNAME is longer than 15 bytes",
                env.ifname.clone(),
            ));
        }
        if command == "ADD" || command == "CHECK" {
            env.netns = need("CNI_NETNS")?;
        } else {
            env.netns = get("CNI_NETNS");
        }
        for kv in get("CNI_ARGS").split(';').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some((k, v)) => {
                    env.args.insert(k.to_string(), v.to_string());
                }
                None => {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        "CNI_ARGS is malformed",
                        kv.to_string(),
                    ));
                }
            }
        }
        Ok(env)
    }

    /// `namespace/name` of the pod, from K8S_POD_NAMESPACE and K8S_POD_NAME.
    pub fn pod(&self) -> Result<String, CniError> {
        match (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => {
                Ok(format!("{ns}/{name}"))
            }
            _ => Err(CniError::new(
                code::INVALID_ENV,
                "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME",
                "vswitch matches a pod to its Pod object by namespace/name",
            )),
        }
    }

    /// The TAP device name for this attachment (stable, <= 15 bytes).
    pub fn tap_name(&self) -> String {
        let h = format!("{}/{}", self.container_id, self.ifname)
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        format!("vsw{:011x}", h & 0xfff_ffff_ffff)
    }

    /// The namespace as `ip -n` names it.
    fn ip_netns(&self) -> Result<String, CniError> {
        let p = Path::new(&self.netns);
        if let Some(rest) = self.netns.strip_prefix("/proc/")
            && let Some(pid) = rest.strip_suffix("/ns/net")
        {
            return Ok(pid.to_string());
        }
        let under_netns_dir = p
            .parent()
            .is_some_and(|d| d == Path::new("/var/run/netns") || d == Path::new("/run/netns"));
        match (under_netns_dir, p.file_name()) {
            (true, Some(n)) => Ok(n.to_string_lossy().into_owned()),
            _ => Err(CniError::new(
                code::INVALID_ENV,
                "CNI_NETNS must be /var/run/netns/NAME, /run/netns/NAME or /proc/PID/ns/net",
                self.netns.clone(),
            )),
        }
    }
}

fn ip(args: &[&str]) -> Result<(), CniError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CniError::new(code::IO, "cannot run ip (install iproute2)", e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CniError::new(
            code::PLUGIN,
            format!("ip {} failed", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim(),
        ))
    }
}

/// Runs the IPAM plugin with `command`; returns its result.
fn ipam(conf: &NetConf, raw: &[u8], env: &Env, command: &str) -> Result<Value, CniError> {
    let plugin = conf
        .ipam
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "ipam.type is missing",
                "e.g. \"host-local\"",
            )
        })?;
    let exe = env
        .path
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {plugin:?} not found in CNI_PATH"),
                format!("{:?}", env.path),
            )
        })?;
    // The pod's K8S_* arguments mean nothing to IPAM plugins, which reject
    // unknown arguments unless told to ignore them.
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let args = if args.split(';').any(|a| {
        a.eq_ignore_ascii_case("IgnoreUnknown=1") || a.eq_ignore_ascii_case("IgnoreUnknown=true")
    }) {
        args
    } else if args.is_empty() {
        "IgnoreUnknown=1".to_string()
    } else {
        format!("IgnoreUnknown=1;{args}")
    };
    let mut child = Command::new(&exe)
        .env("CNI_COMMAND", command)
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::IO,
                format!("cannot run {}", exe.display()),
                e.to_string(),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(raw);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::IO, format!("{} failed", exe.display()), e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let (msg, details) = match serde_json::from_str::<Value>(&text) {
            Ok(v) => (
                v.get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("IPAM failed")
                    .to_string(),
                v.get("details")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
            Err(_) => (
                "IPAM failed".to_string(),
                format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
            ),
        };
        return Err(CniError::new(
            code::PLUGIN,
            format!("{plugin}: {msg}"),
            details,
        ));
    }
    if command != "ADD" {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!("{plugin} returned invalid JSON"),
            e.to_string(),
        )
    })
}

fn socket(conf: &NetConf) -> PathBuf {
    conf.socket
        .clone()
        .unwrap_or_else(|| control::DEFAULT_SOCKET.into())
}

/// One request to vswitchd, as vswitch-cni.
fn ask<T: serde::de::DeserializeOwned>(conf: &NetConf, req: &Request) -> Result<T, ControlError> {
    control::request(&socket(conf), "vswitch-cni", req)
}

/// Runs one CNI command; returns what to print on success.
pub fn run(vars: &HashMap<String, String>, stdin: &[u8]) -> Result<Value, (CniError, String)> {
    let fail = |e: CniError| (e, "1.0.0".to_string());
    let env = Env::from(vars).map_err(fail)?;
    if env.command == "VERSION" {
        return Ok(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        fail(CniError::new(
            code::DECODE,
            "invalid network configuration on stdin",
            e.to_string(),
        ))
    })?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (e, version.clone());
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(fail(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED.join(", ")),
        )));
    }
    match env.command.as_str() {
        "ADD" => add(&conf, stdin, &env).map_err(fail),
        "DEL" => del(&conf, stdin, &env).map(|_| Value::Null).map_err(fail),
        "CHECK" => check(&conf, &env).map(|_| Value::Null).map_err(fail),
        other => Err(fail(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "ADD, DEL, CHECK, VERSION",
        ))),
    }
}

fn add(conf: &NetConf, raw: &[u8], env: &Env) -> Result<Value, CniError> {
    let pod = env.pod()?;
    let ns = env.ip_netns()?;
    let result = ipam(conf, raw, env, "ADD")?;
    let undo_ipam = || {
        let _ = ipam(conf, raw, env, "DEL");
    };
    let mut addrs: Vec<(IpNet, Option<IpAddr>)> = Vec::new();
    for entry in result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let addr = entry
            .get("address")
            .and_then(Value::as_str)
            .and_then(|a| a.parse::<IpNet>().ok());
        let gw = entry
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse::<IpAddr>().ok());
        match addr {
            Some(a) => addrs.push((a, gw)),
            None => {
                undo_ipam();
                return Err(CniError::new(
                    code::DECODE,
                    "IPAM returned an address that is not a CIDR",
                    entry.to_string(),
                ));
            }
        }
    }
    if addrs.is_empty() {
        undo_ipam();
        return Err(CniError::new(
            code::PLUGIN,
            "IPAM returned no address",
            result.to_string(),
        ));
    }
    let ips: Vec<IpAddr> = addrs.iter().map(|(a, _)| a.addr()).collect();
    let key: policy::model::ObjectKey = pod
        .parse()
        .map_err(|e: String| CniError::new(code::INVALID_ENV, e, ""))?;
    let mac = control::Mac(policy::pipeline::pod_mac(&key, &ips));
    let mac_text = mac.to_string();
    let tap = env.tap_name();
    // A persistent multiqueue device: vswitchd attaches to it by name (as
    // many queues as it reads with), and it survives a vswitchd restart.
    if let Err(e) = Tap::open_queues(&tap, true, false, 1) {
        undo_ipam();
        return Err(CniError::new(
            code::IO,
            format!("cannot create TAP device {tap}"),
            e.to_string(),
        ));
    }
    let undo_tap = || {
        let _ = ip(&["-n", &ns, "link", "del", &env.ifname]);
        let _ = Tap::delete(&tap);
        undo_ipam();
    };
    // Into the pod's namespace first, renamed: vswitchd finds the device there by
    // name, now and after a restart.
    let place = || -> Result<(), CniError> {
        ip(&["link", "set", &tap, "netns", &ns])?;
        ip(&["-n", &ns, "link", "set", &tap, "name", &env.ifname])?;
        ip(&["-n", &ns, "link", "set", &env.ifname, "address", &mac_text])
    };
    if let Err(e) = place() {
        undo_tap();
        return Err(e);
    }
    let req = Request::Attach(control::Attach {
        pod: key.clone(),
        netns: Some(env.netns.clone()),
        ifname: env.ifname.clone(),
        mac,
        ips: ips.clone(),
    });
    if let Err(e) = ask::<()>(conf, &req) {
        undo_tap();
        let code = match e {
            ControlError::Connect { .. } => code::TRY_LATER,
            _ => code::PLUGIN,
        };
        return Err(CniError::new(
            code,
            "vswitchd refused the port",
            error_chain(&e),
        ));
    }
    let v6 = ips.iter().any(IpAddr::is_ipv6);
    let configure = || -> Result<(), CniError> {
        if v6 {
            // IPv6: the link-local address the switch expects (from the MAC,
            // whatever the host's address generation mode), and no duplicate
            // address detection (IPAM and spoofguard keep addresses unique;
            // DAD would hold them tentative for a second).
            ip(&["-n", &ns, "link", "set", &env.ifname, "addrgenmode", "none"])?;
            let ll = policy::pipeline::link_local(mac.0);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ll}/64"),
                "dev",
                &env.ifname,
                "nodad",
            ])?;
        }
        for (a, _) in &addrs {
            let cidr = a.to_string();
            let mut args = vec!["-n", &ns, "addr", "add", &cidr, "dev", &env.ifname];
            if a.addr().is_ipv6() {
                args.push("nodad");
            }
            ip(&args)?;
        }
        // Segments small enough to cross a tunnel to another node in one UDP
        // datagram with their headers (best effort: older kernels lack it).
        let _ = ip(&[
            "-n",
            &ns,
            "link",
            "set",
            &env.ifname,
            "gso_max_size",
            "64000",
        ]);
        ip(&["-n", &ns, "link", "set", &env.ifname, "up"])?;
        for (default, via) in default_routes(&addrs) {
            ip(&[
                "-n",
                &ns,
                "route",
                "replace",
                default,
                "via",
                &via.to_string(),
                "dev",
                &env.ifname,
            ])?;
        }
        Ok(())
    };
    if let Err(e) = configure() {
        let _ = ask::<()>(conf, &Request::Detach { pod: key.clone() });
        undo_tap();
        return Err(e);
    }
    let ips_json: Vec<Value> = addrs
        .iter()
        .map(|(a, gw)| {
            let mut v = json!({"address": a.to_string(), "interface": 0});
            if let Some(g) = gw {
                v["gateway"] = json!(g.to_string());
            }
            v
        })
        .collect();
    let routes: Vec<Value> = default_routes(&addrs)
        .into_iter()
        .map(|(dst, gw)| json!({"dst": dst, "gw": gw.to_string()}))
        .collect();
    Ok(json!({
        "cniVersion": conf.cni_version,
        "interfaces": [{"name": env.ifname, "mac": mac_text, "sandbox": env.netns}],
        "ips": ips_json,
        "routes": routes,
        "dns": result.get("dns").cloned().unwrap_or(json!({})),
    }))
}

/// The pod's default routes: IPv4 through IPAM's gateway (answered by the
/// switch's ARP responder); IPv6 through the switch's virtual router
/// `fe80::1` whenever the pod has an IPv6 address (answered by its neighbour
/// discovery responder with the gateway's MAC). Routes are static: router
/// advertisements never reach pods.
fn default_routes(addrs: &[(IpNet, Option<IpAddr>)]) -> Vec<(&'static str, IpAddr)> {
    let mut out = Vec::new();
    if let Some(gw) = addrs
        .iter()
        .find(|(a, gw)| a.addr().is_ipv4() && gw.is_some())
        .and_then(|(_, gw)| *gw)
    {
        out.push(("0.0.0.0/0", gw));
    }
    if addrs.iter().any(|(a, _)| a.addr().is_ipv6()) {
        out.push(("::/0", IpAddr::V6(policy::pipeline::VIRTUAL_ROUTER)));
    }
    out
}

fn del(conf: &NetConf, raw: &[u8], env: &Env) -> Result<(), CniError> {
    // Best effort and idempotent: whatever is already gone is fine.
    if let Some(pod) = env.pod().ok().and_then(|p| p.parse().ok()) {
        match ask::<()>(conf, &Request::Detach { pod }) {
            Ok(()) | Err(ControlError::Refused(_)) | Err(ControlError::Connect { .. }) => {}
            Err(e) => {
                return Err(CniError::new(
                    code::PLUGIN,
                    "vswitchd failed to detach the port",
                    error_chain(&e),
                ));
            }
        }
    }
    if let Ok(ns) = env.ip_netns()
        && Path::new(&env.netns).exists()
    {
        let _ = ip(&["-n", &ns, "link", "del", &env.ifname]);
    }
    let _ = Tap::delete(&env.tap_name());
    ipam(conf, raw, env, "DEL").map(drop)
}

fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let pod = env.pod()?;
    let ports: Vec<PortView> = ask(conf, &Request::Ports)
        .map_err(|e| CniError::new(code::TRY_LATER, "cannot ask vswitchd", error_chain(&e)))?;
    let attached = ports.iter().any(|p| p.pod.as_deref() == Some(pod.as_str()));
    if !attached {
        return Err(CniError::new(
            code::PLUGIN,
            format!("pod {pod} is not attached to vswitchd"),
            "",
        ));
    }
    let ns = env.ip_netns()?;
    ip(&["-n", &ns, "link", "show", &env.ifname])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = Env::from(&vars(&[])).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_COMMAND is not set"));
        let e = Env::from(&vars(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")])).unwrap_err();
        assert_eq!(e.msg, "CNI_IFNAME is not set");
        let env = Env::from(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/x"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
            ),
        ]))
        .unwrap();
        assert_eq!(env.pod().unwrap(), "ns/p");
        assert_eq!(env.ip_netns().unwrap(), "x");
        assert!(env.tap_name().len() <= 15);
        let e = Env::from(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "broken"),
        ]))
        .unwrap_err();
        assert_eq!(e.msg, "CNI_ARGS is malformed");
    }

    #[test]
    fn version_and_bad_config() {
        let out = run(&vars(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
        assert_eq!(
            out["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
        let v = vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/x"),
        ]);
        let (e, _) = run(&v, b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let (e, _) = run(
            &v,
            br#"{"cniVersion":"9.9.9","name":"n","type":"vswitch-cni","ipam":{}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }
}
