//! vswitchd: the switch plus its sources of truth and its control socket.
//!
//! Owns start-up order (policy first, then ports, then forwarding: the first
//! packet forwarded is already under policy), the manifest directory watcher (an
//! invalid file or object is reported and its last good version stays in force),
//! the state file that lets a restarted daemon reattach every port, and serving
//! the control socket.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use datapath::{CtConfig, DatapathConfig};
use policy::compile::Change;
use policy::error::Error as PolicyError;
use policy::manifest::{Manifests, files, load_str};
use policy::model::{Namespace, Node, ObjectKey, Pod, Policy};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use crate::control::{Request, Response, parse_mac};
use crate::switch::Switch;
use crate::tap::Tap;

/// The name of this node when none is configured (standalone).
pub const LOCAL_NODE: &str = "local";

/// One attached port, as the state file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    pub pod: String,
    /// The pod's network namespace (a path); `None`: the host namespace.
    #[serde(default)]
    pub netns: Option<String>,
    /// The TAP device's name in that namespace.
    pub ifname: String,
    pub mac: String,
    pub ips: Vec<IpAddr>,
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub switch: Arc<Switch>,
    records: Mutex<Vec<PortRecord>>,
    /// The cluster state has been loaded (manifests) or fully synced from the
    /// API server, compiled and published.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

fn log(msg: impl std::fmt::Display) {
    tracing::warn!("{msg}");
}

/// An error and its causes, `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

impl Daemon {
    /// Builds the switch: manifests applied, gateway up, recorded ports reattached.
    /// Packet threads are not started yet.
    ///
    /// Fails when the gateway cannot be created or configured.
    pub fn start(config: Config, watch: &mut Option<ManifestWatch>) -> anyhow::Result<Arc<Daemon>> {
        let switch = Switch::new(DatapathConfig {
            conntrack: CtConfig {
                max_entries: config.conntrack_max,
                ..CtConfig::default()
            },
            ..DatapathConfig::default()
        });
        if let Some(w) = watch.as_mut() {
            apply(&switch, w.poll());
        }
        let kubernetes = config.source == crate::config::Source::Kubernetes;
        if kubernetes {
            // Until a pod's object arrives from the API server its labels are
            // unknown: its port stays cut off (fail closed).
            switch.set_isolate_unknown(true);
        }
        if kubernetes || config.gateway.is_some() {
            // Pods attached here run on this node: own-node traffic is theirs.
            switch.set_local_node(&config.node_name);
        }
        let mut config = config;
        if kubernetes && config.gateway.as_ref().is_some_and(|g| g.address.is_none()) {
            // The gateway is the first address of this node's pod CIDR.
            let cidr = crate::kubernetes::own_pod_cidr(&config)?;
            let first = cidr
                .hosts()
                .next()
                .ok_or_else(|| anyhow::anyhow!("pod CIDR {cidr} has no host address"))?;
            if let Some(g) = config.gateway.as_mut() {
                g.address = Some(ipnet::IpNet::new(first, cidr.prefix_len())?);
            }
        }
        if let Some(g) = &config.gateway {
            let address = g
                .address
                .ok_or_else(|| anyhow::anyhow!("gateway {} has no address", g.name))?;
            let tap = Tap::open_with(&g.name, false, config.offload)
                .map_err(|e| anyhow::anyhow!("failed to create gateway {}: {e}", g.name))?;
            run_ip(&["addr", "replace", &address.to_string(), "dev", &g.name])?;
            run_ip(&["link", "set", &g.name, "up"])?;
            let mac_text = std::fs::read_to_string(format!("/sys/class/net/{}/address", g.name))?;
            let mac = parse_mac(mac_text.trim())
                .ok_or_else(|| anyhow::anyhow!("gateway {} has no MAC", g.name))?;
            // The node forwards back out of the gateway (Service translation):
            // no ICMP redirects telling pods to bypass it.
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv4/conf/{}/send_redirects", g.name),
                "0",
            );
            switch.set_gateway(tap, mac, vec![address.addr()])?;
            if let Some(path) = &config.kubernetes.cni_conf {
                write_cni_conf(path, &config.socket, address)?;
            }
            switch.apply(Change::Node(own_node(&config, None)))?;
        }
        if !config.service_cidrs.is_empty() {
            switch.set_service_cidrs(config.service_cidrs.clone())?;
        }
        if let Some(t) = &config.tunnel {
            let local = t
                .local_address
                .ok_or_else(|| anyhow::anyhow!("tunnel.local_address is not set"))?;
            let socket = std::net::UdpSocket::bind((local, t.port)).map_err(|e| {
                anyhow::anyhow!("cannot bind the tunnel to {local}:{}: {e}", t.port)
            })?;
            switch.set_tunnel(socket, t.vni, t.port)?;
        }
        let daemon = Arc::new(Daemon {
            ready: Arc::new(std::sync::atomic::AtomicBool::new(!kubernetes)),
            config,
            switch,
            records: Mutex::new(Vec::new()),
        });
        daemon.load_conntrack();
        for r in daemon.load_state() {
            match daemon.attach(&r) {
                Ok(()) => tracing::info!(port = %describe_port(&r), "reattached"),
                Err(e) => log(format!("cannot reattach {}: {e}", describe_port(&r))),
            }
        }
        Ok(daemon)
    }

    fn state_file(&self) -> PathBuf {
        self.config.state_dir.join("ports.json")
    }

    fn conntrack_file(&self) -> PathBuf {
        self.config.state_dir.join("conntrack.json")
    }

    /// Saves the conntrack table for the next start (a graceful stop: call it
    /// once packet threads have stopped). Established connections then survive
    /// an upgrade or restart of vswitchd.
    pub fn save_conntrack(&self) -> anyhow::Result<usize> {
        let conns: Vec<SavedConnJson> = self
            .switch
            .datapath()
            .conntrack
            .export(self.switch.now())
            .into_iter()
            .map(SavedConnJson::from)
            .collect();
        let saved = json!({
            "saved_at_ms": SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            "connections": conns,
        });
        std::fs::create_dir_all(&self.config.state_dir)?;
        let path = self.conntrack_file();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&saved)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(conns_len(&saved))
    }

    /// Restores what [`Daemon::save_conntrack`] saved, minus the time spent
    /// down, then removes the file (a later crash must not bring it back).
    fn load_conntrack(&self) {
        let path = self.conntrack_file();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let _ = std::fs::remove_file(&path);
        let parsed: Result<Value, _> = serde_json::from_str(&text);
        let Ok(v) = parsed else {
            log(format!("ignoring unreadable {}", path.display()));
            return;
        };
        let now_ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let down_ms = now_ms.saturating_sub(v["saved_at_ms"].as_u64().unwrap_or(now_ms));
        let conns: Vec<datapath::conntrack::SavedConn> =
            serde_json::from_value::<Vec<SavedConnJson>>(v["connections"].clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.into_saved(down_ms))
                .collect();
        let n = self
            .switch
            .datapath()
            .conntrack
            .import(self.switch.now(), conns);
        tracing::info!(connections = n, down_ms, "conntrack restored");
    }

    fn load_state(&self) -> Vec<PortRecord> {
        let path = self.state_file();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                log(format!(
                    "ignoring unreadable state file {}: {e}",
                    path.display()
                ));
                vec![]
            }),
            Err(_) => vec![],
        }
    }

    fn save_state(&self, records: &[PortRecord]) {
        let path = self.state_file();
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.config.state_dir)?;
            std::fs::write(&tmp, serde_json::to_vec_pretty(records).unwrap_or_default())?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            log(format!("cannot write state file {}: {e}", path.display()));
        }
    }

    /// Attaches the persistent TAP device `r.ifname` (in `r.netns`) as pod `r.pod`.
    pub fn attach(&self, r: &PortRecord) -> Result<(), String> {
        let _span = tracing::info_span!("attach", pod = %r.pod, ifname = %r.ifname).entered();
        let pod: ObjectKey = r.pod.parse().map_err(|e: String| format!("bad pod: {e}"))?;
        let mac = parse_mac(&r.mac).ok_or_else(|| format!("bad MAC address {:?}", r.mac))?;
        if r.ips.is_empty() {
            return Err("a port needs at least one IP address".into());
        }
        let tap = match &r.netns {
            Some(ns) => Tap::open_in(Path::new(ns), &r.ifname, self.config.offload),
            None => Tap::open_with(&r.ifname, true, self.config.offload),
        }
        .map_err(|e| format!("cannot open TAP device {}: {e}", r.ifname))?;
        self.switch
            .attach(tap, pod, mac, r.ips.clone())
            .map_err(|e| chain(&e))?;
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.retain(|x| x.pod != r.pod);
        records.push(r.clone());
        self.save_state(&records);
        Ok(())
    }

    pub fn detach(&self, pod: &str) -> Result<(), String> {
        let _span = tracing::info_span!("detach", pod).entered();
        let key: ObjectKey = pod.parse().map_err(|e: String| format!("bad pod: {e}"))?;
        self.switch.detach(&key).map_err(|e| chain(&e))?;
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.retain(|x| x.pod != pod);
        self.save_state(&records);
        Ok(())
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Attach {
                pod,
                netns,
                ifname,
                mac,
                ips,
            } => match self.attach(&PortRecord {
                pod,
                netns,
                ifname,
                mac,
                ips,
            }) {
                Ok(()) => Response::ok(Value::Null),
                Err(e) => Response::err(e),
            },
            Request::Detach { pod } => match self.detach(&pod) {
                Ok(()) => Response::ok(Value::Null),
                Err(e) => Response::err(e),
            },
            Request::Ports => Response::ok(Value::Array(self.ports())),
            Request::Trace {
                src,
                dst,
                protocol,
                port,
            } => {
                let endpoint = |s: &str| -> Result<policy::offline::Endpoint, String> {
                    match s.parse::<IpAddr>() {
                        Ok(ip) => Ok(policy::offline::Endpoint::Ip(ip)),
                        Err(_) => s.parse().map(policy::offline::Endpoint::Pod),
                    }
                };
                let l4 = match (protocol.as_str(), port) {
                    ("tcp", Some(p)) => Ok(policy::offline::L4::Tcp(p)),
                    ("udp", Some(p)) => Ok(policy::offline::L4::Udp(p)),
                    ("sctp", Some(p)) => Ok(policy::offline::L4::Sctp(p)),
                    ("icmp", _) => Ok(policy::offline::L4::Icmp),
                    (other, _) => Err(format!(
                        "protocol {other:?} needs a port, or is not tcp, udp, sctp, icmp"
                    )),
                };
                let result = (|| {
                    let (src, dst, l4) = (endpoint(&src)?, endpoint(&dst)?, l4?);
                    self.switch.trace(&src, &dst, l4)
                })();
                match result {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                }
            }
            Request::DumpFlows => Response::ok(Value::Array(self.flows())),
            Request::DumpConntrack { zone, filter } => {
                match ConnFilter::parse(filter.as_deref().unwrap_or("")) {
                    Ok(f) => Response::ok(Value::Array(self.conntrack(zone, &f))),
                    Err(e) => Response::err(e),
                }
            }
            Request::AddFlow { flow } => match self.switch.add_manual_flow(&flow, false) {
                Ok(()) => Response::ok(Value::Null),
                Err(e) => Response::err(chain(&e)),
            },
            Request::ModFlows { flow } => match self.switch.add_manual_flow(&flow, true) {
                Ok(()) => Response::ok(Value::Null),
                Err(e) => Response::err(chain(&e)),
            },
            Request::DelFlows { flow } => match self.switch.del_manual_flows(flow.as_deref()) {
                Ok(n) => Response::ok(json!({ "deleted": n })),
                Err(e) => Response::err(chain(&e)),
            },
            Request::Stats => Response::ok(self.stats()),
            Request::Health => Response::ok(json!({
                "ready": self.ready.load(Relaxed),
                "source": match self.config.source {
                    crate::config::Source::Manifests => "manifests",
                    crate::config::Source::Kubernetes => "kubernetes",
                },
                "node": self.config.node_name,
                "generation": self.switch.realisation().generation,
            })),
        }
    }

    /// Every flow with its counters, age and the rule its cookie names.
    pub fn flows(&self) -> Vec<Value> {
        let now = self.switch.now();
        let mut stats = self.switch.datapath().flow_stats();
        stats.sort_by(|a, b| {
            (a.entry.table, std::cmp::Reverse(a.entry.priority))
                .cmp(&(b.entry.table, std::cmp::Reverse(b.entry.priority)))
                .then_with(|| a.entry.to_string().cmp(&b.entry.to_string()))
        });
        self.switch.with_compiler(|c| {
            stats
                .into_iter()
                .map(|s| {
                    let e = &s.entry;
                    let duration = now.since(s.created).as_secs_f64();
                    json!({
                        "table": e.table.0,
                        "priority": e.priority,
                        "cookie": format!("0x{:x}", e.cookie.0),
                        "match": datapath::ofctl::format_match(&e.matcher),
                        "actions": datapath::ofctl::format_actions(&e.actions),
                        "flow": e.to_string(),
                        "n_packets": s.packets,
                        "n_bytes": s.bytes,
                        "duration_s": (duration * 1000.0).round() / 1000.0,
                        "idle_age_s": s.last_hit.map_or(duration, |t| now.since(t).as_secs_f64()).floor(),
                        "manual": policy::compile::is_manual(e.cookie),
                        "rule": policy::explain::describe(c, e.cookie),
                    })
                })
                .collect()
        })
    }

    /// Tracked connections of `zone` (all zones: `None`) that pass `filter`.
    pub fn conntrack(&self, zone: Option<u16>, filter: &ConnFilter) -> Vec<Value> {
        let now = self.switch.now();
        self.switch
            .datapath()
            .conntrack
            .dump(now, zone)
            .into_iter()
            .filter(|c| filter.accepts(c))
            .map(|c| {
                let o = &c.orig;
                json!({
                    "zone": c.zone,
                    "proto": proto_name(o.proto),
                    "src": datapath::key::wide_to_ip(o.src),
                    "dst": datapath::key::wide_to_ip(o.dst),
                    "sport": o.sport,
                    "dport": o.dport,
                    "state": c.state.name(),
                    "timeout_s": c.expires_in.as_secs(),
                    "age_s": c.age.as_secs(),
                    "packets": {"orig": c.packets[0], "reply": c.packets[1]},
                    "bytes": {"orig": c.bytes[0], "reply": c.bytes[1]},
                })
            })
            .collect()
    }

    /// Every port with its counters: pod ports (with what they were attached
    /// with) and the gateway.
    pub fn ports(&self) -> Vec<Value> {
        let records = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.switch
            .port_counters()
            .into_iter()
            .map(|(no, pod, ifname, c)| {
                let record = pod
                    .as_ref()
                    .and_then(|k| records.iter().find(|r| r.pod == k.to_string()));
                json!({
                    "port": no.0,
                    "pod": pod.map(|k| k.to_string()),
                    "kind": if record.is_some() { "pod" } else { "gateway" },
                    "ifname": record.map_or(ifname, |r| r.ifname.clone()),
                    "netns": record.and_then(|r| r.netns.clone()),
                    "mac": record.map(|r| r.mac.clone()),
                    "ips": record.map(|r| r.ips.clone()),
                    "rx_packets": c.rx_packets.load(Relaxed),
                    "rx_bytes": c.rx_bytes.load(Relaxed),
                    "tx_packets": c.tx_packets.load(Relaxed),
                    "tx_bytes": c.tx_bytes.load(Relaxed),
                    "drops": c.drops().into_iter().collect::<BTreeMap<_, _>>(),
                })
            })
            .chain(self.switch.tunnel_counters().0.into_iter().map(|t| {
                let (no, node, addr, c) = (t.no, t.node, t.addr, t.counters);
                json!({
                    "port": no.0,
                    "pod": null,
                    "kind": "tunnel",
                    "node": node,
                    "ifname": format!("vxlan:{addr}"),
                    "netns": null,
                    "mac": null,
                    "ips": null,
                    "rx_packets": c.rx_packets.load(Relaxed),
                    "rx_bytes": c.rx_bytes.load(Relaxed),
                    "tx_packets": c.tx_packets.load(Relaxed),
                    "tx_bytes": c.tx_bytes.load(Relaxed),
                    "drops": c.drops().into_iter().collect::<BTreeMap<_, _>>(),
                })
            }))
            .collect()
    }

    /// Datapath and control-plane counters.
    pub fn stats(&self) -> Value {
        let s = self.switch.datapath().stats();
        let r = self.switch.realisation();
        let mut tables: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
        for f in self.switch.datapath().flow_stats() {
            let t = tables.entry(f.entry.table.0).or_default();
            t.0 += 1;
            t.1 += f.packets;
        }
        let misses: BTreeMap<u8, u64> = s.table_misses.iter().map(|(t, n)| (t.0, *n)).collect();
        let tables: Vec<Value> = tables
            .into_iter()
            .map(|(t, (flows, matched))| {
                let missed = misses.get(&t).copied().unwrap_or(0);
                json!({"table": t, "flows": flows, "matched": matched, "missed": missed, "lookups": matched + missed})
            })
            .collect();
        let lookups = s.cache.hits + s.cache.misses;
        json!({
            "generation": s.generation,
            "flows": s.flows,
            "masks": s.masks,
            "packets": s.packets,
            "bytes": s.bytes,
            "drops": s.drops.iter().map(|(r, n)| (r.name(), *n)).collect::<BTreeMap<_, _>>(),
            "cache": {
                "lookups": lookups,
                "hits": s.cache.hits,
                "misses": s.cache.misses,
                "evictions": s.cache.evictions,
                "hit_rate": if lookups == 0 { 0.0 } else { s.cache.hits as f64 / lookups as f64 },
            },
            "conntrack": {"entries": s.conntrack_entries, "max": s.conntrack_max, "full_drops": s.conntrack_full_drops},
            "tables": tables,
            "realisation": {
                "at_rfc3339": r.at.map(rfc3339),
                "generation": r.generation,
                "flows_changed": r.flows_changed,
                "compile_us": r.compile.as_micros() as u64,
                "publish_us": r.publish.as_micros() as u64,
                "at": r.at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
            },
        })
    }

    /// Serves the control socket (mode 0600), one thread per connection.
    ///
    /// Fails when the socket cannot be created.
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        let path = &self.config.socket;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || me.connection(conn));
                }
            })?;
        Ok(())
    }

    fn connection(&self, conn: UnixStream) {
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => Response::err(format!("bad request: {e}")),
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_default();
            out.push('\n');
            if writer.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Writes the CNI network configuration for pods of this node: vswitch-cni
/// talking to `socket`, host-local IPAM over the gateway's subnet.
fn write_cni_conf(path: &Path, socket: &Path, gateway: ipnet::IpNet) -> anyhow::Result<()> {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "vswitch",
        "plugins": [{
            "type": "vswitch-cni",
            "socket": socket,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": gateway.trunc().to_string(), "gateway": gateway.addr().to_string()}]],
            },
        }],
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&conf)?)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot write CNI config {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), subnet = %gateway.trunc(), "wrote the CNI configuration");
    Ok(())
}

/// This node as the cluster model sees it: `api` (the Node object, when the API
/// server has one) plus the gateway's address and subnet and `node_addresses`,
/// so traffic between the node and its pods is always allowed.
pub fn own_node(config: &Config, api: Option<Node>) -> Node {
    let mut node = api.unwrap_or(Node {
        name: config.node_name.clone(),
        addresses: vec![],
        pod_cidrs: vec![],
    });
    if let Some(g) = &config.gateway {
        let gateway = g.address.iter().map(|a| a.addr());
        for a in gateway.chain(g.node_addresses.iter().copied()) {
            if !node.addresses.contains(&a) {
                node.addresses.push(a);
            }
        }
        if let Some(net) = g.address.map(|a| a.trunc())
            && !node.pod_cidrs.contains(&net)
        {
            node.pod_cidrs.push(net);
        }
    }
    node
}

/// A time as RFC 3339 in UTC with milliseconds, e.g. `2026-11-26T08:16:02.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), in 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// `proto` of the routes vswitchd installs on the node (other nodes' pod
/// CIDRs through the gateway), so it can tell them from everyone else's.
const ROUTE_PROTO: &str = "86";

impl Daemon {
    /// Keeps the node's routes to other nodes' pod CIDRs through the gateway in
    /// step with the tunnel peers (checked every second): the node itself
    /// reaches remote pods, e.g. a Service backend after kube-proxy's DNAT.
    /// Does nothing without a gateway and a tunnel.
    pub fn sync_routes_forever(self: Arc<Self>) {
        let (Some(g), Some(_)) = (&self.config.gateway, &self.config.tunnel) else {
            return;
        };
        // Routes of an earlier run may point at pod CIDRs that no longer exist.
        let _ = run_ip(&["route", "flush", "proto", ROUTE_PROTO]);
        let mut installed = std::collections::BTreeSet::new();
        loop {
            let wanted: std::collections::BTreeSet<ipnet::IpNet> = self
                .switch
                .tunnel_counters()
                .0
                .into_iter()
                .flat_map(|t| t.pod_cidrs)
                .collect();
            for net in wanted.difference(&installed) {
                // Through the CIDR's first address, which the switch answers
                // ARP for (IPv6 CIDRs: directly on the gateway).
                let hop = policy::pipeline::remote_next_hop(net);
                let net = net.to_string();
                let mut args = vec!["route", "replace", &net];
                let hop_text = hop.map(|h| h.to_string());
                if let Some(h) = &hop_text {
                    args.extend(["via", h.as_str(), "onlink"]);
                }
                args.extend(["dev", &g.name, "proto", ROUTE_PROTO]);
                match run_ip(&args) {
                    Ok(()) => tracing::info!(%net, "route to another node's pods via the gateway"),
                    Err(e) => tracing::warn!(%net, error = %e, "cannot add a route"),
                }
            }
            for net in installed.difference(&wanted) {
                let _ = run_ip(&["route", "del", &net.to_string(), "proto", ROUTE_PROTO]);
            }
            installed = wanted;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn conns_len(v: &Value) -> usize {
    v["connections"].as_array().map_or(0, Vec::len)
}

/// A saved connection in the state directory.
#[derive(Debug, Serialize, Deserialize)]
struct SavedConnJson {
    zone: u16,
    proto: u8,
    a: (IpAddr, u16),
    b: (IpAddr, u16),
    orig_is_a: bool,
    state: u8,
    fin_seen: [bool; 2],
    replied: bool,
    expires_in_ms: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
    mark: u8,
}

impl From<datapath::conntrack::SavedConn> for SavedConnJson {
    fn from(c: datapath::conntrack::SavedConn) -> SavedConnJson {
        SavedConnJson {
            zone: c.zone,
            proto: c.proto,
            a: (datapath::key::wide_to_ip(c.a.0), c.a.1),
            b: (datapath::key::wide_to_ip(c.b.0), c.b.1),
            orig_is_a: c.orig_is_a,
            state: c.state.code(),
            fin_seen: c.fin_seen,
            replied: c.replied,
            expires_in_ms: c.expires_in_ms,
            packets: c.packets,
            bytes: c.bytes,
            mark: c.mark,
        }
    }
}

impl SavedConnJson {
    /// Back to the datapath's form, `down_ms` later; `None` once expired.
    fn into_saved(self, down_ms: u64) -> Option<datapath::conntrack::SavedConn> {
        Some(datapath::conntrack::SavedConn {
            zone: self.zone,
            proto: self.proto,
            a: (datapath::key::ip_to_wide(self.a.0), self.a.1),
            b: (datapath::key::ip_to_wide(self.b.0), self.b.1),
            orig_is_a: self.orig_is_a,
            state: datapath::conntrack::ConnState::from_code(self.state)?,
            fin_seen: self.fin_seen,
            replied: self.replied,
            expires_in_ms: self.expires_in_ms.checked_sub(down_ms).filter(|t| *t > 0)?,
            packets: self.packets,
            bytes: self.bytes,
            mark: self.mark,
        })
    }
}

/// The name of an IP protocol number.
pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 => "icmp6".into(),
        p => format!("proto{p}"),
    }
}

/// A conntrack dump filter: `proto=tcp,ip=10.0.0.1,port=80,state=ESTABLISHED`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnFilter {
    proto: Option<String>,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    ip: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    port: Option<u16>,
    state: Option<String>,
}

impl ConnFilter {
    /// Parses a filter; fails naming the term that is wrong.
    pub fn parse(text: &str) -> Result<ConnFilter, String> {
        let mut f = ConnFilter::default();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v) = term
                .split_once('=')
                .ok_or_else(|| format!("filter term {term:?} is not key=value"))?;
            let ip = || {
                v.parse::<IpAddr>()
                    .map_err(|_| format!("filter {k}={v}: not an IP address"))
            };
            let port = || {
                v.parse::<u16>()
                    .map_err(|_| format!("filter {k}={v}: not a port number"))
            };
            match k {
                "proto" => f.proto = Some(v.to_ascii_lowercase()),
                "src" => f.src = Some(ip()?),
                "dst" => f.dst = Some(ip()?),
                "ip" => f.ip = Some(ip()?),
                "sport" => f.sport = Some(port()?),
                "dport" => f.dport = Some(port()?),
                "port" => f.port = Some(port()?),
                "state" => f.state = Some(v.to_ascii_uppercase()),
                other => {
                    return Err(format!(
                        "unknown filter key {other:?} (proto, src, dst, ip, sport, dport, port, state)"
                    ));
                }
            }
        }
        Ok(f)
    }

    fn accepts(&self, c: &datapath::ConnInfo) -> bool {
        let o = &c.orig;
        let (src, dst) = (
            datapath::key::wide_to_ip(o.src),
            datapath::key::wide_to_ip(o.dst),
        );
        self.proto
            .as_ref()
            .is_none_or(|p| *p == proto_name(o.proto))
            && self.src.is_none_or(|ip| ip == src)
            && self.dst.is_none_or(|ip| ip == dst)
            && self.ip.is_none_or(|ip| ip == src || ip == dst)
            && self.sport.is_none_or(|p| p == o.sport)
            && self.dport.is_none_or(|p| p == o.dport)
            && self.port.is_none_or(|p| p == o.sport || p == o.dport)
            && self.state.as_ref().is_none_or(|s| s == c.state.name())
    }
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Applies changes as one generation, logging (not failing) when flows cannot
/// be installed.
pub fn apply(switch: &Switch, changes: Vec<Change>) {
    if changes.is_empty() {
        return;
    }
    if let Err(e) = switch.apply_all(changes) {
        log(chain(&e));
    }
}

/// The objects of one manifest file that are in force.
#[derive(Debug, Default, Clone)]
struct FileObjects {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<ObjectKey, Pod>,
    nodes: BTreeMap<String, Node>,
    policies: BTreeMap<ObjectKey, Policy>,
}

impl From<&Manifests> for FileObjects {
    fn from(m: &Manifests) -> FileObjects {
        FileObjects {
            namespaces: m
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            pods: m.pods.iter().map(|p| (p.key.clone(), p.clone())).collect(),
            nodes: m
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            policies: m
                .policies
                .iter()
                .map(|p| (p.key.clone(), p.clone()))
                .collect(),
        }
    }
}

/// (kind, object) of an object a manifest error rejected, when it names one.
fn rejected(e: &PolicyError) -> Option<(&'static str, String)> {
    match e {
        PolicyError::InFile { source, .. } => rejected(source),
        PolicyError::Invalid { kind, object, .. } => Some((kind, object.clone())),
        _ => None,
    }
}

/// Watches a manifest directory and turns its edits into changes.
#[derive(Debug)]
pub struct ManifestWatch {
    dir: PathBuf,
    /// Copies of the last version of each file that loaded cleanly, so that a
    /// restarted daemon keeps enforcing them when a file has since gone bad.
    last_good: Option<PathBuf>,
    signature: Vec<(PathBuf, Option<SystemTime>, u64)>,
    files: HashMap<PathBuf, FileObjects>,
    applied: FileObjects,
}

impl ManifestWatch {
    /// Watches `dir`; with `state_dir`, remembers the last good version of every
    /// file across restarts.
    pub fn new(dir: &Path, state_dir: Option<&Path>) -> ManifestWatch {
        let last_good = state_dir.map(|d| d.join("last-good"));
        let mut files = HashMap::new();
        if let Some(store) = &last_good {
            for path in policy::manifest::files(dir).unwrap_or_default() {
                if let Ok(text) = std::fs::read_to_string(store.join(Self::store_name(&path))) {
                    let mut m = Manifests::default();
                    load_str(&mut m, &path, &text);
                    files.insert(path, FileObjects::from(&m));
                }
            }
        }
        ManifestWatch {
            dir: dir.to_path_buf(),
            last_good,
            signature: Vec::new(),
            files,
            applied: FileObjects::default(),
        }
    }

    fn store_name(path: &Path) -> String {
        path.to_string_lossy().replace(['/', '\\'], "%")
    }

    fn remember(&self, path: &Path, text: &str) {
        if let Some(store) = &self.last_good {
            let _ = std::fs::create_dir_all(store);
            let _ = std::fs::write(store.join(Self::store_name(path)), text);
        }
    }

    fn current_signature(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        files(&self.dir)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let (mtime, len) = meta.map_or((None, 0), |m| (m.modified().ok(), m.len()));
                (p, mtime, len)
            })
            .collect()
    }

    /// The changes since the last call (all objects on the first call); reports
    /// rejected files and objects, whose last good versions stay in force.
    pub fn poll(&mut self) -> Vec<Change> {
        let sig = self.current_signature();
        if sig == self.signature {
            return vec![];
        }
        self.signature = sig;
        let mut next_files = HashMap::new();
        for (path, _, _) in &self.signature {
            let previous = self.files.get(path).cloned().unwrap_or_default();
            let mut m = Manifests::default();
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    load_str(&mut m, path, &text);
                    if m.errors.is_empty() {
                        self.remember(path, &text);
                    }
                }
                Err(e) => {
                    log(format!(
                        "cannot read {}: {e}; keeping its last good objects",
                        path.display()
                    ));
                    next_files.insert(path.clone(), previous);
                    continue;
                }
            }
            let whole_file_failed = m
                .errors
                .iter()
                .any(|e| matches!(e, PolicyError::Yaml { .. }));
            for e in &m.errors {
                log(format!("{} (last good version stays in force)", chain(e)));
            }
            if whole_file_failed {
                next_files.insert(path.clone(), previous);
                continue;
            }
            let mut objs = FileObjects::from(&m);
            for (kind, object) in m.errors.iter().filter_map(rejected) {
                match kind {
                    "NetworkPolicy" => {
                        if let Ok(k) = object.parse::<ObjectKey>()
                            && let Some(p) = previous.policies.get(&k)
                        {
                            objs.policies.insert(k, p.clone());
                        }
                    }
                    "Pod" => {
                        if let Ok(k) = object.parse::<ObjectKey>()
                            && let Some(p) = previous.pods.get(&k)
                        {
                            objs.pods.insert(k, p.clone());
                        }
                    }
                    "Namespace" => {
                        if let Some(n) = previous.namespaces.get(&object) {
                            objs.namespaces.insert(object.clone(), n.clone());
                        }
                    }
                    _ => {
                        if let Some(n) = previous.nodes.get(&object) {
                            objs.nodes.insert(object.clone(), n.clone());
                        }
                    }
                }
            }
            next_files.insert(path.clone(), objs);
        }
        self.files = next_files;
        let mut want = FileObjects::default();
        for f in self.files.values() {
            want.namespaces.extend(f.namespaces.clone());
            want.pods.extend(f.pods.clone());
            want.nodes.extend(f.nodes.clone());
            want.policies.extend(f.policies.clone());
        }
        let mut changes = Vec::new();
        diff(
            &self.applied.namespaces,
            &want.namespaces,
            &mut changes,
            Change::Namespace,
            Change::NamespaceDeleted,
        );
        diff(
            &self.applied.nodes,
            &want.nodes,
            &mut changes,
            Change::Node,
            Change::NodeDeleted,
        );
        diff(
            &self.applied.pods,
            &want.pods,
            &mut changes,
            Change::Pod,
            Change::PodDeleted,
        );
        diff(
            &self.applied.policies,
            &want.policies,
            &mut changes,
            Change::Policy,
            Change::PolicyDeleted,
        );
        self.applied = want;
        changes
    }

    /// Watches forever, applying changes to `switch` as one generation each time.
    /// Edits wake it through inotify (a change is enforced within milliseconds);
    /// the directory is also rescanned every `every`, which is all there is when
    /// inotify is not available.
    pub fn run(mut self, switch: Arc<Switch>, every: Duration) {
        let notify = crate::sys::inotify_init()
            .inspect_err(|e| {
                log(format!(
                    "inotify unavailable ({e}); polling every {every:?}"
                ))
            })
            .ok();
        let mut buf = [0u8; 4096];
        loop {
            match &notify {
                Some(fd) => {
                    // Watch every directory (new ones too); re-adding is a no-op.
                    let mut dirs = vec![self.dir.clone()];
                    while let Some(d) = dirs.pop() {
                        let _ = crate::sys::inotify_watch_dir(fd.as_fd(), &d);
                        if let Ok(entries) = std::fs::read_dir(&d) {
                            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
                        }
                    }
                    let mut ready = Vec::new();
                    let woke = crate::sys::poll_readable(
                        &[fd.as_fd()],
                        &mut ready,
                        every.as_millis().min(i32::MAX as u128) as i32,
                    )
                    .unwrap_or(0)
                        > 0;
                    if woke {
                        // Let a burst of writes (an editor saving) settle, then drain.
                        std::thread::sleep(Duration::from_millis(2));
                        while matches!(crate::sys::read(fd.as_fd(), &mut buf), Ok(n) if n > 0) {}
                    }
                }
                None => std::thread::sleep(every),
            }
            apply(&switch, self.poll());
        }
    }
}

fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut Vec<Change>,
    upsert: impl Fn(V) -> Change,
    delete: impl Fn(K) -> Change,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(upsert(v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(delete(k.clone()));
        }
    }
}

/// Describes a port for logs.
pub fn describe_port(r: &PortRecord) -> String {
    let ns = r.netns.as_deref().unwrap_or("host");
    format!("{} on {} in {ns} ({}, {:?})", r.pod, r.ifname, r.mac, r.ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_795_681_442), "2026-11-26T08:24:02.000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn conntrack_filters() {
        assert!(ConnFilter::parse("proto=tcp,ip=10.0.0.1,port=80,state=established").is_ok());
        let e = ConnFilter::parse("ip=10.0.0").unwrap_err();
        assert!(e.contains("ip=10.0.0") && e.contains("IP address"), "{e}");
        let e = ConnFilter::parse("colour=red").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        assert!(ConnFilter::parse("port").unwrap_err().contains("key=value"));
    }
}
