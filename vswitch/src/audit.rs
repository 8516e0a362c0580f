//! The audit log and per-rule connection counts.
//!
//! Owns turning connection events from the packet threads (a new connection
//! committed, or a first packet dropped by a policy table) into JSON lines naming
//! the deciding rule: an allowed connection is one line when it is committed;
//! a denied attempt (its first packet and every retransmission of it) is one
//! line with the number of packets dropped, written once the attempt has been
//! quiet for `attempt_quiet_ms`; lines go to a size-rotated file or stdout; and counting connections per
//! policy rule for the metrics (bounded label sets). Explaining an event runs
//! the trace machinery against the current tables on this thread, never on a
//! packet thread.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use datapath::field::ip_proto;
use policy::compile::Provenance;
use policy::model::ObjectKey;
use serde_json::{Value, json};

use crate::config::AuditConfig;
use crate::forwarder::ConnEvent;
use crate::realiser::{Explained, Realiser};
use crate::recent::{Recent, Tuple};

/// A log file rotated by size: `path` → `path.1` → ... → `path.{keep}`.
#[derive(Debug)]
pub struct Rotating {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl Rotating {
    /// Opens (appends to) `path`; fails when it cannot be created.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Rotating> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max_bytes: max_bytes.max(1),
            keep,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }

    /// Appends one line, rotating first when it would not fit.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                self.file = Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.path)?,
                );
                self.file.as_mut().expect("just opened")
            }
        };
        file.write_all(format!("{line}\n").as_bytes())?;
        self.size += len;
        Ok(())
    }
}

/// Where audit lines go.
#[derive(Debug)]
enum Sink {
    Stdout,
    File(Rotating),
}

/// The most label sets `vswitch_policy_connections_total` gets; connections
/// decided by rules beyond it are counted under `policy="other"`.
pub const MAX_RULE_SERIES: usize = 2000;

/// Consumes connection events: audit lines (when configured) and per-rule
/// connection counts (always). Runs until the switch drops the sender.
pub fn run(
    realiser: Arc<Realiser>,
    events: Receiver<ConnEvent>,
    config: Option<AuditConfig>,
    recent: Arc<Recent>,
) {
    let mut audit = Auditor::new(realiser, config, recent);
    // Events are drained in batches between short sleeps rather than waited
    // for one by one: a packet thread's send then never has to wake this
    // thread (a futex call and a context switch per connection).
    let mut batch: Vec<ConnEvent> = Vec::with_capacity(BATCH);
    loop {
        let mut gone = false;
        while batch.len() < BATCH {
            match events.try_recv() {
                Ok(e) => batch.push(e),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
        }
        let now = Instant::now();
        audit.tick(now);
        let idle = batch.is_empty();
        for event in batch.drain(..) {
            audit.event(&event, now);
        }
        if gone {
            audit.finish();
            return;
        }
        std::thread::sleep(if idle { IDLE_SLEEP } else { BUSY_SLEEP });
    }
}

/// The audit thread's state.
struct Auditor {
    realiser: Arc<Realiser>,
    recent: Arc<Recent>,
    config: Option<AuditConfig>,
    sink: Option<Sink>,
    /// How long a denied attempt must be quiet before its line is written.
    quiet: Duration,
    /// Denied attempts being counted.
    attempts: HashMap<Tuple, Attempt>,
    /// Allowed connections logged this second (one line per commit).
    seen: HashMap<Tuple, u64>,
    second: u64,
    series: HashSet<[String; 4]>,
    staged_series: HashSet<[String; 4]>,
    /// When the recent-connections summary was last swept.
    expired: Instant,
    /// Explanations per tuple (source port aside: no policy matches on it)
    /// while the switch publishes nothing new (`Realiser::revision`): a
    /// client reconnecting is traced once, not once per connection.
    explanations: HashMap<Tuple, Arc<Explained>>,
    explained_generation: u64,
}

impl Auditor {
    fn new(realiser: Arc<Realiser>, config: Option<AuditConfig>, recent: Arc<Recent>) -> Auditor {
        let sink = config.as_ref().map(|c| {
            if c.path.as_os_str() == "-" {
                Sink::Stdout
            } else {
                match Rotating::open(&c.path, c.max_bytes, c.keep) {
                    Ok(r) => Sink::File(r),
                    Err(e) => {
                        tracing::error!(path = %c.path.display(), error = %e, "cannot open the audit log; audit lines go to stdout");
                        Sink::Stdout
                    }
                }
            }
        });
        Auditor {
            quiet: Duration::from_millis(config.as_ref().map_or(10_000, |c| c.attempt_quiet_ms)),
            realiser,
            recent,
            config,
            sink,
            attempts: HashMap::new(),
            seen: HashMap::new(),
            second: 0,
            series: HashSet::new(),
            staged_series: HashSet::new(),
            expired: Instant::now(),
            explanations: HashMap::new(),
            explained_generation: u64::MAX,
        }
    }

    fn write(&mut self, line: &Value) {
        let Some(sink) = &mut self.sink else {
            return;
        };
        let line = line.to_string();
        let written = match sink {
            Sink::Stdout => writeln!(std::io::stdout(), "{line}"),
            Sink::File(f) => f.write_line(&line),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write an audit line");
        }
    }

    /// Time passes: the summary's window, and denied attempts gone quiet
    /// (or held long enough) written.
    fn tick(&mut self, now: Instant) {
        if now.duration_since(self.expired) >= Duration::from_secs(1) {
            self.recent.expire();
            self.expired = now;
        }
        let quiet = self.quiet;
        let due: Vec<Tuple> = self
            .attempts
            .iter()
            .filter(|(_, a)| {
                now.duration_since(a.last) >= quiet || now.duration_since(a.first) >= MAX_ATTEMPT
            })
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            if let Some(a) = self.attempts.remove(&t) {
                self.write(&a.finish());
            }
        }
    }

    /// Every attempt still held is written (the switch is stopping).
    fn finish(&mut self) {
        let held: Vec<Attempt> = self.attempts.drain().map(|(_, a)| a).collect();
        for a in held {
            self.write(&a.finish());
        }
    }

    /// Whether `event` is news: a denied attempt's retransmission is counted
    /// in its attempt, an allowed connection seen this second is one already.
    fn is_news(&mut self, event: &ConnEvent, tuple: Tuple, now: Instant) -> bool {
        if !event.allowed {
            let Some(a) = self.attempts.get_mut(&tuple) else {
                return true;
            };
            a.packets += 1;
            a.last = now;
            return false;
        }
        let at = event
            .at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if at != self.second {
            self.seen.retain(|_, s| *s == at);
            self.second = at;
        }
        self.seen.insert(tuple, at) != Some(at)
    }

    /// The explanation of `key`'s connection (reused per tuple until the
    /// next publish, flows changed or not: rules' names can change alone).
    fn explain(&mut self, key: &datapath::FlowKey, tuple: Tuple) -> Arc<Explained> {
        let generation = self.realiser.revision();
        if generation != self.explained_generation {
            self.explanations.clear();
            self.explained_generation = generation;
        }
        let any_port = tuple.any_source_port();
        if let Some(e) = self.explanations.get(&any_port) {
            return e.clone();
        }
        let e = Arc::new(self.realiser.explain_new(key));
        // Through a Service the backend depends on the source port: such a
        // connection is explained on its own.
        if e.backend.is_none() && self.explanations.len() < MAX_EXPLANATIONS {
            self.explanations.insert(any_port, e.clone());
        }
        e
    }

    /// One connection event: the summary, the counts, the audit line.
    fn event(&mut self, event: &ConnEvent, now: Instant) {
        let tuple = Tuple::of(&event.key);
        if !self.is_news(event, tuple, now) {
            return;
        }
        let explained = self.explain(&event.key, tuple);
        self.recent
            .record(&event.key, event.allowed, event.at, &explained);
        let Explained {
            verdict,
            staged,
            src_pod,
            dst_pod,
            backend,
        } = &*explained;
        count(
            &mut self.series,
            CONNECTIONS,
            if event.allowed { "allow" } else { "deny" },
            &verdict.decided_by,
            dst_pod,
        );
        // What staged policies would change: its own series and line fields.
        let would = staged
            .as_ref()
            .and_then(|s| policy::explain::compare_staged(verdict, s).map(|w| (w, s)));
        if let Some((w, s)) = would {
            let label = if w == "would deny" {
                "would-deny"
            } else {
                "would-allow"
            };
            count(
                &mut self.staged_series,
                STAGED,
                label,
                &s.decided_by,
                dst_pod,
            );
        }
        let Some(config) = &self.config else {
            return;
        };
        let namespaces = decision_namespaces(&verdict.decided_by, src_pod, dst_pod);
        // A connection staged policies would deny is logged like a denied one.
        let would_deny = would.is_some_and(|(w, _)| w == "would deny");
        let wanted = config.wants(event.allowed, &namespaces)
            || (would_deny && config.wants(false, &namespaces));
        if !wanted {
            return;
        }
        let mut line = record(event, verdict, src_pod, dst_pod);
        if let Some((ip, port)) = backend {
            // The ClusterIP stays `dst_ip`; this is where it went.
            line["dst_backend"] = json!(std::net::SocketAddr::new(*ip, *port).to_string());
        }
        if let Some((w, s)) = would {
            line["staged"] = json!({
                "verdict": w,
                "rule": s.rule,
                "decided_by": decisions(&s.decided_by),
            });
        }
        if event.allowed {
            self.write(&line);
        } else {
            self.attempts.insert(
                tuple,
                Attempt {
                    line,
                    packets: 1,
                    first: now,
                    last: now,
                    first_at: event.at,
                },
            );
        }
    }
}

/// The most explanations kept for reuse within one table generation.
const MAX_EXPLANATIONS: usize = 65_536;

/// The most events handled between two looks at the clock.
const BATCH: usize = 1024;

/// How long the audit thread sleeps between batches: short while events
/// come, longer when none did.
const BUSY_SLEEP: Duration = Duration::from_millis(5);
const IDLE_SLEEP: Duration = Duration::from_millis(50);

/// The longest a denied attempt is held before its line is written.
const MAX_ATTEMPT: Duration = Duration::from_secs(60);

/// A denied connection attempt being counted.
struct Attempt {
    line: Value,
    packets: u64,
    first: Instant,
    last: Instant,
    first_at: std::time::SystemTime,
}

impl Attempt {
    /// Its line: the first packet's, with how many were dropped and when the
    /// last one was.
    fn finish(&self) -> Value {
        let mut line = self.line.clone();
        line["packets"] = json!(self.packets);
        let last = self.first_at + self.last.duration_since(self.first);
        line["last_time"] = json!(crate::timefmt::rfc3339(last));
        line
    }
}

fn decision_namespaces<'a>(
    decided_by: &'a [Provenance],
    src: &'a Option<ObjectKey>,
    dst: &'a Option<ObjectKey>,
) -> Vec<&'a str> {
    let from_rules: Vec<&str> = decided_by
        .iter()
        .filter_map(|p| match p {
            Provenance::Rule { policy, .. } => Some(policy.namespace.as_str()),
            Provenance::DefaultDeny { pod, .. } => Some(pod.namespace.as_str()),
            _ => None,
        })
        .collect();
    if !from_rules.is_empty() {
        return from_rules;
    }
    [src, dst]
        .into_iter()
        .flatten()
        .map(|k| k.namespace.as_str())
        .collect()
}

/// One audit line.
fn record(
    event: &ConnEvent,
    verdict: &policy::explain::Verdict,
    src_pod: &Option<ObjectKey>,
    dst_pod: &Option<ObjectKey>,
) -> Value {
    let k = &event.key;
    let ports = matches!(k.nw_proto, 6 | 17 | 132);
    json!({
        "time": crate::timefmt::rfc3339(event.at),
        "verdict": if event.allowed { "allow" } else { "deny" },
        "protocol": ip_proto::name(k.nw_proto),
        "src_ip": k.src_ip().to_string(),
        "src_port": ports.then_some(k.tp_src),
        "src_pod": src_pod.as_ref().map(ToString::to_string),
        "dst_ip": k.dst_ip().to_string(),
        "dst_port": ports.then_some(k.tp_dst),
        "dst_pod": dst_pod.as_ref().map(ToString::to_string),
        "rule": verdict.rule,
        "decided_by": decisions(&verdict.decided_by),
    })
}

/// The deciding rules of a verdict, as audit-line objects.
fn decisions(decided_by: &[Provenance]) -> Vec<Value> {
    decided_by
        .iter()
        .map(|p| match p {
            Provenance::Rule {
                policy,
                direction,
                index,
            } => json!({"policy": policy.to_string(), "direction": direction.to_string(), "rule_index": index}),
            Provenance::DefaultDeny { pod, direction } => {
                json!({"default_deny_of": pod.to_string(), "direction": direction.to_string()})
            }
            Provenance::TierRule {
                policy,
                tier,
                priority,
                direction,
                index,
                name,
                action,
                ..
            } => json!({"cluster_policy": policy, "tier": tier.to_string(), "priority": priority,
                        "direction": direction.to_string(), "rule_index": index, "rule_name": name,
                        "action": action.to_string()}),
            other => json!({"other": other.to_string()}),
        })
        .collect()
}

/// Connections per deciding rule.
const CONNECTIONS: &str = "vswitch_policy_connections_total";
/// Connections staged policies would decide otherwise, per staged deciding rule.
const STAGED: &str = "vswitch_policy_staged_connections_total";

/// Counts a connection in `metric` under each deciding rule (or under
/// `not-isolated`).
fn count(
    series: &mut HashSet<[String; 4]>,
    metric: &'static str,
    verdict: &str,
    decided_by: &[Provenance],
    dst: &Option<ObjectKey>,
) {
    let mut labels: Vec<[String; 4]> = decided_by
        .iter()
        .filter_map(|p| match p {
            Provenance::Rule {
                policy,
                direction,
                index,
            } => Some([
                policy.to_string(),
                direction.to_string(),
                index.to_string(),
                verdict.into(),
            ]),
            Provenance::DefaultDeny { pod, direction } => Some([
                format!("{}/*", pod.namespace),
                direction.to_string(),
                "default-deny".into(),
                verdict.into(),
            ]),
            // ClusterNetworkPolicies are cluster-scoped: the policy is its name.
            Provenance::TierRule {
                policy,
                direction,
                index,
                name,
                ..
            } => Some([
                policy.clone(),
                direction.to_string(),
                name.clone().unwrap_or_else(|| index.to_string()),
                verdict.into(),
            ]),
            _ => None,
        })
        .collect();
    if labels.is_empty() {
        let ns = dst.as_ref().map_or("-", |k| k.namespace.as_str());
        labels.push([
            format!("{ns}/*"),
            "-".into(),
            "not-isolated".into(),
            verdict.into(),
        ]);
    }
    for l in labels {
        let l = if series.contains(&l) || series.len() < MAX_RULE_SERIES {
            series.insert(l.clone());
            l
        } else {
            ["other".into(), l[1].clone(), "other".into(), l[3].clone()]
        };
        let [policy, direction, rule, verdict] = l;
        metrics::counter!(metric,
            "policy" => policy, "direction" => direction, "rule" => rule, "verdict" => verdict)
        .increment(1);
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = std::env::temp_dir().join(format!("vswitch-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.log");
        let mut r = Rotating::open(&path, 25, 2).unwrap();
        for i in 0..7 {
            r.write_line(&format!("line number {i}")).unwrap();
        }
        // 14 bytes per line, 25 per file: one line per file.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "line number 6\n");
        assert_eq!(read(&dir.join("audit.log.1")), "line number 5\n");
        assert_eq!(read(&dir.join("audit.log.2")), "line number 4\n");
        assert!(
            !dir.join("audit.log.3").exists(),
            "only `keep` rotated files"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn namespace_overrides() {
        let c: AuditConfig = toml::from_str(
            "path = \"-\"\nallowed = false\n[namespaces.prod]\nallowed = true\n[namespaces.noisy]\ndenied = false\n",
        )
        .unwrap();
        assert!(c.wants(false, &["default"]), "denied logged by default");
        assert!(!c.wants(true, &["default"]), "allowed not by default");
        assert!(c.wants(true, &["prod"]), "allowed in prod");
        assert!(
            !c.wants(false, &["noisy"]),
            "denies in noisy are not logged"
        );
        assert!(toml::from_str::<AuditConfig>("path = \"-\"\nverbose = true\n").is_err());
    }
}
