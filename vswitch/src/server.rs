//! The control socket, daemon side.
//!
//! Owns serving the control protocol (`control` crate): who may connect (root,
//! or the configured group, checked with SO_PEERCRED), how much a client may
//! send (one request line of at most `control::MAX_REQUEST_BYTES`, a bounded
//! number of connections at once), the handshake, and turning each request into
//! a call on the daemon and a typed view of the answer. The socket is created
//! inside a private (0700) directory and moved into place, so it is never
//! reachable by other users, not even for an instant.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use control::view::{
    CacheView, ConnView, ConntrackView, CtOwnerView, Deleted, Directions, FlowView, HealthView,
    PortKind, PortView, RealisationView, StatsView, TableView,
};
use control::{ConnFilter, Request, error_chain};

use crate::daemon::Daemon;
use crate::realiser::PortRole;
use crate::sys;

/// Connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 32;

/// Creates the socket at `path` with mode 0600 without it ever being reachable
/// by others: bound inside a fresh 0700 directory, then renamed into place.
///
/// Fails when the socket cannot be created.
pub fn listen(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let private = dir.join(format!(".vswitchd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", private.display()))?;
    let inside = private.join("sock");
    let listener = UnixListener::bind(&inside)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
    let _ = std::fs::remove_file(path);
    std::fs::rename(&inside, path)
        .map_err(|e| anyhow::anyhow!("cannot move the socket to {}: {e}", path.display()))?;
    let _ = std::fs::remove_dir(&private);
    Ok(listener)
}

impl Daemon {
    /// Serves the control socket, one thread per connection.
    ///
    /// Fails when the socket cannot be created.
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        let listener = listen(&self.config.socket)?;
        let me = self.clone();
        let open = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    if let Err(why) = me.admit(&conn) {
                        tracing::warn!(why, "control connection refused");
                        let _ = (&conn).write_all(
                            control::encode_answer::<()>(Err(format!("refused: {why}"))).as_bytes(),
                        );
                        continue;
                    }
                    if open.fetch_add(1, Relaxed) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, Relaxed);
                        let _ = (&conn).write_all(
                            control::encode_answer::<()>(Err(format!(
                                "busy: {MAX_CONNECTIONS} control connections are open"
                            )))
                            .as_bytes(),
                        );
                        continue;
                    }
                    let (me, done) = (me.clone(), open.clone());
                    let spawned = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            me.connection(conn);
                            done.fetch_sub(1, Relaxed);
                        });
                    if spawned.is_err() {
                        open.fetch_sub(1, Relaxed);
                    }
                }
            })?;
        Ok(())
    }

    /// Whether the peer may talk to us: root, or a member of `control_group`.
    fn admit(&self, conn: &UnixStream) -> Result<(), String> {
        let (pid, uid, gid) = sys::peer_credentials(conn.as_fd())
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        if uid == 0 {
            return Ok(());
        }
        if let Some(group) = self.config.control_group
            && (gid == group || sys::process_groups(pid).contains(&group))
        {
            return Ok(());
        }
        Err(format!(
            "uid {uid} (pid {pid}) is not root and not in the control group"
        ))
    }

    fn connection(&self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(60)));
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(conn);
        let mut greeted = false;
        loop {
            let mut line = String::new();
            let limit = control::MAX_REQUEST_BYTES as u64 + 1;
            match (&mut reader).take(limit).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(n) if n as u64 == limit && !line.ends_with('\n') => {
                    let _ = writer.write_all(
                        control::encode_answer::<()>(Err(format!(
                            "request longer than {} bytes",
                            control::MAX_REQUEST_BYTES
                        )))
                        .as_bytes(),
                    );
                    return;
                }
                Ok(_) => {}
            }
            if line.trim().is_empty() {
                continue;
            }
            let answer = match control::decode(&line) {
                Err(e) => control::encode_answer::<()>(Err(e)),
                Ok(req) if !greeted => {
                    let hello = control::check_hello(&req);
                    greeted = hello.is_ok();
                    let refused = hello.is_err();
                    let answer = control::encode_answer(hello);
                    if refused {
                        let _ = writer.write_all(answer.as_bytes());
                        return;
                    }
                    answer
                }
                Ok(req) => self.handle(req),
            };
            if writer.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn handle(&self, req: Request) -> String {
        use control::encode_answer as answer;
        match req {
            Request::Hello { .. } => answer::<()>(Err("hello was already said".into())),
            Request::Attach(a) => answer(self.attach(&crate::state::PortRecord {
                pod: a.pod.to_string(),
                netns: a.netns,
                ifname: a.ifname,
                mac: a.mac.to_string(),
                ips: a.ips,
            })),
            Request::Detach { pod } => answer(self.detach(&pod)),
            Request::Ports => answer(Ok::<_, String>(self.port_views())),
            Request::Trace { src, dst, l4 } => answer(self.realiser.trace(&src, &dst, l4)),
            Request::DumpFlows => answer(Ok::<_, String>(self.flow_views())),
            Request::DumpPolicies => answer(Ok::<_, String>(self.realiser.policy_views())),
            Request::Recent => answer(Ok::<_, String>(self.recent.view(usize::MAX))),
            Request::WhatIf { files } => {
                answer(crate::whatif::what_if(&self.realiser, &self.recent, &files))
            }
            Request::DumpServices => answer(Ok::<_, String>(self.service_views())),
            Request::DumpGroups => answer(Ok::<_, String>(
                self.realiser
                    .datapath()
                    .snapshot()
                    .tables
                    .groups()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<String>>(),
            )),
            Request::DumpDns => answer(Ok::<_, String>(
                self.realiser
                    .with_learned(|l| l.views(std::time::Instant::now())),
            )),
            Request::DumpConntrack { zone, filter } => {
                answer(Ok::<_, String>(self.conn_views(zone, &filter)))
            }
            Request::AddFlow { flow } => answer(
                self.realiser
                    .add_manual_flow(&flow, false)
                    .map_err(|e| error_chain(&e)),
            ),
            Request::ModFlows { flow } => answer(
                self.realiser
                    .add_manual_flow(&flow, true)
                    .map_err(|e| error_chain(&e)),
            ),
            Request::DelFlows { flow } => answer(
                self.realiser
                    .del_manual_flows(flow.as_deref())
                    .map(|deleted| Deleted { deleted })
                    .map_err(|e| error_chain(&e)),
            ),
            Request::Stats => answer(Ok::<_, String>(self.stats_view())),
            Request::Health => answer(Ok::<_, String>(HealthView {
                ready: self.ready.load(Relaxed),
                source: match self.config.source {
                    crate::config::Source::Manifests => "manifests",
                    crate::config::Source::Kubernetes => "kubernetes",
                }
                .into(),
                node: self.config.node_name.clone(),
                generation: self.realiser.realisation().generation,
            })),
        }
    }

    /// Every flow with its counters, age and the rule its cookie names.
    pub fn flow_views(&self) -> Vec<FlowView> {
        let now = self.realiser.now();
        let mut stats = self.realiser.datapath().flow_stats();
        stats.sort_by(|a, b| {
            (a.entry.table, std::cmp::Reverse(a.entry.priority))
                .cmp(&(b.entry.table, std::cmp::Reverse(b.entry.priority)))
                .then_with(|| a.entry.to_string().cmp(&b.entry.to_string()))
        });
        self.realiser.with_compiler(|c| {
            stats
                .into_iter()
                .map(|s| {
                    let e = &s.entry;
                    let duration = now.since(s.created).as_secs_f64();
                    FlowView {
                        table: e.table.0,
                        priority: e.priority,
                        cookie: format!("0x{:x}", e.cookie.0),
                        matcher: datapath::ofctl::format_match(&e.matcher),
                        actions: datapath::ofctl::format_actions(&e.actions),
                        flow: e.to_string(),
                        n_packets: s.packets,
                        n_bytes: s.bytes,
                        duration_s: (duration * 1000.0).round() / 1000.0,
                        idle_age_s: s
                            .last_hit
                            .map_or(duration, |t| now.since(t).as_secs_f64())
                            .floor(),
                        manual: policy::cookie::is_manual(e.cookie),
                        rule: policy::explain::describe(c, e.cookie),
                    }
                })
                .collect()
        })
    }

    /// Tracked connections of `zone` (all zones: `None`) that pass `filter`.
    pub fn conn_views(&self, zone: Option<u16>, filter: &ConnFilter) -> Vec<ConnView> {
        let now = self.realiser.now();
        self.realiser
            .datapath()
            .conntrack
            .dump(now, zone)
            .into_iter()
            .filter(|c| accepts(filter, c))
            .map(|c| {
                let o = &c.orig;
                ConnView {
                    zone: c.zone,
                    proto: datapath::field::ip_proto::name(o.proto).into_owned(),
                    src: datapath::key::wide_to_ip(o.src),
                    dst: datapath::key::wide_to_ip(o.dst),
                    sport: o.sport,
                    dport: o.dport,
                    state: c.state.name().into(),
                    timeout_s: c.expires_in.as_secs(),
                    age_s: c.age.as_secs(),
                    packets: Directions {
                        orig: c.packets[0],
                        reply: c.packets[1],
                    },
                    bytes: Directions {
                        orig: c.bytes[0],
                        reply: c.bytes[1],
                    },
                    translated_dst: c
                        .nat
                        .filter(|n| (n.dst, n.dport) != (o.dst, o.dport))
                        .map(|n| end_text(n.dst, n.dport)),
                    translated_src: c
                        .nat
                        .filter(|n| (n.src, n.sport) != (o.src, o.sport))
                        .map(|n| end_text(n.src, n.sport)),
                }
            })
            .collect()
    }

    /// The Service frontends with their backends and the tracked
    /// connections through each frontend to each backend.
    pub fn service_views(&self) -> Vec<control::view::ServiceView> {
        let counts = self.realiser.service_connections();
        let frontends = self.realiser.frontends();
        self.realiser.with_compiler(|c| {
            control::view::service_views(&frontends, c.cluster(), |f, b| Some(counts.get(f, b)))
        })
    }

    /// Every port with its counters: pod ports (with what they were attached
    /// with), the gateway, tunnels.
    pub fn port_views(&self) -> Vec<PortView> {
        let records = self.records();
        self.realiser
            .ports()
            .into_iter()
            .map(|p| {
                let c = &p.counters;
                let mut view = PortView {
                    port: p.no.0,
                    kind: PortKind::Gateway,
                    pod: None,
                    node: None,
                    ifname: String::new(),
                    netns: None,
                    mac: None,
                    ips: None,
                    up: c.is_up(),
                    rx_packets: c.rx_packets.load(Relaxed),
                    rx_bytes: c.rx_bytes.load(Relaxed),
                    tx_packets: c.tx_packets.load(Relaxed),
                    tx_bytes: c.tx_bytes.load(Relaxed),
                    drops: c
                        .drops()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<BTreeMap<_, _>>(),
                    queues: p
                        .queues
                        .iter()
                        .map(|q| control::view::QueueView {
                            lane: q.lane,
                            work: q.work,
                        })
                        .collect(),
                };
                match p.role {
                    PortRole::Pod(key) => {
                        let pod = key.to_string();
                        view.kind = PortKind::Pod;
                        if let Some(r) = records.iter().find(|r| r.pod == pod) {
                            view.ifname = r.ifname.clone();
                            view.netns = r.netns.clone();
                            view.mac = Some(r.mac.clone());
                            view.ips = Some(r.ips.clone());
                        }
                        view.pod = Some(pod);
                    }
                    PortRole::Gateway => {
                        view.ifname = self
                            .config
                            .gateway
                            .as_ref()
                            .map_or_else(String::new, |g| g.name.clone());
                    }
                    PortRole::Tunnel { node, addr, .. } => {
                        view.kind = PortKind::Tunnel;
                        view.ifname = format!("vxlan:{addr}");
                        view.node = Some(node);
                    }
                }
                view
            })
            .collect()
    }

    /// Datapath and control-plane counters.
    pub fn stats_view(&self) -> StatsView {
        let dp = self.realiser.datapath();
        let s = dp.stats();
        let r = self.realiser.realisation();
        let mut tables: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
        for f in dp.flow_stats() {
            let t = tables.entry(f.entry.table.0).or_default();
            t.0 += 1;
            t.1 += f.packets;
        }
        let misses: BTreeMap<u8, u64> = s.table_misses.iter().map(|(t, n)| (t.0, *n)).collect();
        let lookups = s.cache.hits + s.cache.misses;
        StatsView {
            generation: s.generation,
            flows: s.flows,
            masks: s.masks,
            packets: s.packets,
            bytes: s.bytes,
            drops: s
                .drops
                .iter()
                .map(|(r, n)| (r.name().to_string(), *n))
                .collect(),
            cache: CacheView {
                lookups,
                hits: s.cache.hits,
                misses: s.cache.misses,
                evictions: s.cache.evictions,
                revalidated: s.cache.revalidated,
                hit_rate: if lookups == 0 {
                    0.0
                } else {
                    s.cache.hits as f64 / lookups as f64
                },
            },
            conntrack: ConntrackView {
                entries: s.conntrack_entries,
                max: s.conntrack_max,
                full_drops: s.conntrack_full_drops,
                limit_drops: s.conntrack_limit_drops,
                owners: self
                    .realiser
                    .conntrack_owners()
                    .into_iter()
                    .filter(|(_, n, _, refused)| *n > 0 || *refused > 0)
                    .map(|(name, connections, limit, refused)| CtOwnerView {
                        name,
                        connections,
                        limit,
                        refused,
                    })
                    .collect(),
            },
            tables: tables
                .into_iter()
                .map(|(t, (flows, matched))| {
                    let missed = misses.get(&t).copied().unwrap_or(0);
                    TableView {
                        table: t,
                        flows,
                        matched,
                        missed,
                        lookups: matched + missed,
                    }
                })
                .collect(),
            realisation: RealisationView {
                generation: r.generation,
                flows_changed: r.flows_changed,
                compile_us: r.compile.as_micros() as u64,
                publish_us: r.publish.as_micros() as u64,
                at: r
                    .at
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64()),
                at_rfc3339: r.at.map(crate::timefmt::rfc3339),
            },
        }
    }
}

/// Whether a connection passes a dump filter.
fn accepts(f: &ConnFilter, c: &datapath::ConnInfo) -> bool {
    let o = &c.orig;
    let (src, dst) = (
        datapath::key::wide_to_ip(o.src),
        datapath::key::wide_to_ip(o.dst),
    );
    f.proto
        .as_ref()
        .is_none_or(|p| *p == datapath::field::ip_proto::name(o.proto))
        && f.src.is_none_or(|ip| ip == src)
        && f.dst.is_none_or(|ip| ip == dst)
        && f.ip.is_none_or(|ip| ip == src || ip == dst)
        && f.sport.is_none_or(|p| p == o.sport)
        && f.dport.is_none_or(|p| p == o.dport)
        && f.port.is_none_or(|p| p == o.sport || p == o.dport)
        && f.state.as_ref().is_none_or(|s| s == c.state.name())
}

fn end_text(addr: [u8; 16], port: u16) -> String {
    std::net::SocketAddr::new(datapath::key::wide_to_ip(addr), port).to_string()
}
