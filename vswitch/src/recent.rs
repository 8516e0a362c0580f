//! The connections the switch has seen recently, summarised per tuple.
//!
//! Owns the bounded memory of real traffic that `flowctl what-if` replays
//! against another policy set and the web view shows: one entry per
//! (protocol, source address, destination address, destination port) —
//! source ports are ephemeral, so a client reconnecting is one entry — with
//! how many connections were allowed and denied, the latest verdict, its
//! rule and what staged policies would do. Entries older than the window, or
//! beyond `max_tuples` (least recently seen first), are forgotten. Also a
//! short feed of the latest connections, for live views, and counts per
//! deciding rule. Written by the audit thread (which explains every new
//! connection), read by the control socket and the web view.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use control::view::{RecentView, TupleView};
use datapath::FlowKey;
use datapath::field::ip_proto;
use policy::explain::StagedView;
use serde::{Deserialize, Serialize};

use crate::realiser::Explained;

/// `[recent]` in the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecentConfig {
    /// How long a tuple is remembered after its last connection (seconds).
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// The most tuples remembered (about 400 bytes each); 0 turns the
    /// summary off (then `what-if` has nothing to replay).
    #[serde(default = "default_max_tuples")]
    pub max_tuples: usize,
}

impl Default for RecentConfig {
    fn default() -> RecentConfig {
        RecentConfig {
            window_secs: default_window(),
            max_tuples: default_max_tuples(),
        }
    }
}

fn default_window() -> u64 {
    3600
}

fn default_max_tuples() -> usize {
    10_000
}

/// The most entries in the live feed.
pub const FEED: usize = 512;

/// The most rules counted one by one; connections decided by rules beyond
/// are counted under `other`.
pub const MAX_RULES: usize = 2000;

/// A connection's addresses and ports, as its first packet carried them
/// (ICMP: the echo id as the source port). An entry summarises the tuples
/// that differ only in the source port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

impl Tuple {
    pub(crate) fn of(k: &FlowKey) -> Tuple {
        let ports = has_ports(k.nw_proto);
        Tuple {
            proto: k.nw_proto,
            src: k.nw_src,
            dst: k.nw_dst,
            sport: if ports { k.tp_src } else { k.icmp_id },
            dport: if ports { k.tp_dst } else { 0 },
        }
    }

    /// The same with any source port: what policy sees (no rule matches on
    /// a source port).
    pub(crate) fn any_source_port(self) -> Tuple {
        Tuple { sport: 0, ..self }
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

#[derive(Debug, Clone)]
struct Entry {
    /// The latest connection's first packet: what a replay traces.
    key: FlowKey,
    first: SystemTime,
    last: SystemTime,
    last_mono: Instant,
    /// Position in the eviction order.
    stamp: u64,
    allowed: u64,
    denied: u64,
    verdict_allowed: bool,
    /// The latest connection's explanation (shared with the audit thread's
    /// cache: nothing is copied per connection).
    explained: Arc<Explained>,
}

/// One connection in the feed, as recorded (rendered when read).
#[derive(Debug, Clone)]
struct Fed {
    seq: u64,
    key: FlowKey,
    at: SystemTime,
    allowed: bool,
    explained: Arc<Explained>,
}

/// One connection in the live feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedItem {
    /// Increases by one per item: a reader asks for items after the last
    /// one it saw.
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub tuple: TupleView,
}

/// Connections counted per deciding rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub rule: String,
    pub allowed: u64,
    pub denied: u64,
    /// Connections staged policies would decide otherwise.
    pub would_deny: u64,
    pub would_allow: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Tuple, Entry>,
    /// stamp -> tuple, oldest first.
    order: BTreeMap<u64, Tuple>,
    next_stamp: u64,
    evicted: u64,
    feed: VecDeque<Fed>,
    next_seq: u64,
    rules: HashMap<String, RuleCount>,
}

/// The summary (shared; cheap to lock: one insert per new connection).
#[derive(Debug)]
pub struct Recent {
    config: RecentConfig,
    inner: Mutex<Inner>,
}

impl Recent {
    pub fn new(config: RecentConfig) -> Recent {
        Recent {
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn config(&self) -> &RecentConfig {
        &self.config
    }

    /// Records one new connection (allowed) or denied attempt, explained.
    pub fn record(&self, key: &FlowKey, allowed: bool, at: SystemTime, e: &Arc<Explained>) {
        let would = e
            .staged
            .as_ref()
            .and_then(|s| policy::explain::compare_staged(&e.verdict, s));
        let mut inner = self.inner();
        let inner = &mut *inner;
        count_rule(&mut inner.rules, &e.verdict.rule, allowed, would);
        if self.config.max_tuples == 0 {
            return;
        }
        let tuple = Tuple::of(key).any_source_port();
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        let now = Instant::now();
        let entry = inner.entries.entry(tuple).or_insert_with(|| Entry {
            key: *key,
            first: at,
            last: at,
            last_mono: now,
            stamp,
            allowed: 0,
            denied: 0,
            verdict_allowed: allowed,
            explained: e.clone(),
        });
        inner.order.remove(&entry.stamp);
        inner.order.insert(stamp, tuple);
        entry.key = *key;
        entry.last = at;
        entry.last_mono = now;
        entry.stamp = stamp;
        if allowed {
            entry.allowed += 1;
        } else {
            entry.denied += 1;
        }
        entry.verdict_allowed = allowed;
        entry.explained = e.clone();
        while inner.entries.len() > self.config.max_tuples {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.entries.remove(&oldest);
            inner.evicted += 1;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if inner.feed.len() == FEED {
            inner.feed.pop_front();
        }
        inner.feed.push_back(Fed {
            seq,
            key: *key,
            at,
            allowed,
            explained: e.clone(),
        });
    }

    /// Forgets tuples not seen within the window.
    pub fn expire(&self) {
        let window = Duration::from_secs(self.config.window_secs);
        let mut inner = self.inner();
        let inner = &mut *inner;
        while let Some((&stamp, tuple)) = inner.order.first_key_value() {
            let old = inner
                .entries
                .get(tuple)
                .is_none_or(|e| e.last_mono.elapsed() > window);
            if !old {
                break;
            }
            let tuple = *tuple;
            inner.order.remove(&stamp);
            inner.entries.remove(&tuple);
        }
    }

    /// The `most` most recently seen tuples, newest first.
    pub fn view(&self, most: usize) -> RecentView {
        let inner = self.inner();
        RecentView {
            window_secs: self.config.window_secs,
            max_tuples: self.config.max_tuples,
            evicted: inner.evicted,
            tuples: latest(&inner).take(most).map(view).collect(),
        }
    }

    /// The first packets of the latest connection of every tuple, with the
    /// tuple's view (what a replay needs).
    pub fn keys(&self) -> Vec<(FlowKey, TupleView)> {
        let inner = self.inner();
        latest(&inner).map(|e| (e.key, view(e))).collect()
    }

    /// Feed items after `seq` (all kept, when `None`).
    pub fn feed_after(&self, seq: Option<u64>) -> Vec<FeedItem> {
        self.inner()
            .feed
            .iter()
            .filter(|i| seq.is_none_or(|s| i.seq > s))
            .map(|f| FeedItem {
                seq: f.seq,
                time: crate::timefmt::rfc3339(f.at),
                tuple: tuple_view(
                    &f.key,
                    &f.explained,
                    f.allowed,
                    (u64::from(f.allowed), u64::from(!f.allowed)),
                    (f.at, f.at),
                ),
            })
            .collect()
    }

    /// Connections per deciding rule, most first.
    pub fn rules(&self) -> Vec<RuleCount> {
        let mut out: Vec<RuleCount> = self.inner().rules.values().cloned().collect();
        out.sort_by(|a, b| {
            (b.allowed + b.denied)
                .cmp(&(a.allowed + a.denied))
                .then_with(|| a.rule.cmp(&b.rule))
        });
        out
    }
}

/// The entries, most recently seen first.
fn latest(inner: &Inner) -> impl Iterator<Item = &Entry> {
    inner
        .order
        .values()
        .rev()
        .filter_map(|t| inner.entries.get(t))
}

fn count_rule(
    rules: &mut HashMap<String, RuleCount>,
    rule: &str,
    allowed: bool,
    would: Option<&str>,
) {
    let name = if rules.contains_key(rule) || rules.len() < MAX_RULES {
        rule
    } else {
        "other"
    };
    let c = rules.entry(name.to_string()).or_insert_with(|| RuleCount {
        rule: name.to_string(),
        ..RuleCount::default()
    });
    if allowed {
        c.allowed += 1;
    } else {
        c.denied += 1;
    }
    match would {
        Some("would deny") => c.would_deny += 1,
        Some("would allow") => c.would_allow += 1,
        _ => {}
    }
}

fn view(e: &Entry) -> TupleView {
    tuple_view(
        &e.key,
        &e.explained,
        e.verdict_allowed,
        (e.allowed, e.denied),
        (e.first, e.last),
    )
}

fn tuple_view(
    k: &FlowKey,
    e: &Explained,
    allowed: bool,
    (n_allowed, n_denied): (u64, u64),
    (first, last): (SystemTime, SystemTime),
) -> TupleView {
    TupleView {
        protocol: ip_proto::name(k.nw_proto).to_string(),
        src_ip: k.src_ip(),
        dst_ip: k.dst_ip(),
        dst_port: has_ports(k.nw_proto).then_some(k.tp_dst),
        src_pod: e.src_pod.as_ref().map(ToString::to_string),
        dst_pod: e.dst_pod.as_ref().map(ToString::to_string),
        allowed: n_allowed,
        denied: n_denied,
        verdict: if allowed { "allow" } else { "deny" }.to_string(),
        rule: e.verdict.rule.clone(),
        staged: e
            .staged
            .as_ref()
            .and_then(|s| StagedView::of(&e.verdict, s)),
        first_seen: crate::timefmt::rfc3339(first),
        last_seen: crate::timefmt::rfc3339(last),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::explain::Verdict;

    fn key(src: u8, dport: u16, sport: u16) -> FlowKey {
        let mut k = FlowKey {
            nw_proto: 6,
            tp_src: sport,
            tp_dst: dport,
            ..FlowKey::default()
        };
        k.nw_src = datapath::key::ip_to_wide(std::net::IpAddr::from([10, 0, 0, src]));
        k.nw_dst = datapath::key::ip_to_wide(std::net::IpAddr::from([10, 0, 0, 99]));
        k
    }

    fn explained(allowed: bool, rule: &str) -> Arc<Explained> {
        Arc::new(Explained {
            verdict: Verdict {
                allowed,
                rule: rule.into(),
                rules: vec![],
                decided_by: vec![],
            },
            staged: None,
            src_pod: None,
            dst_pod: None,
            backend: None,
        })
    }

    #[test]
    fn a_tuple_is_one_entry_whatever_its_source_ports() {
        let r = Recent::new(RecentConfig::default());
        let now = SystemTime::now();
        for sport in 1000..1010 {
            r.record(&key(1, 80, sport), true, now, &explained(true, "a"));
        }
        r.record(&key(1, 80, 2000), false, now, &explained(false, "b"));
        let v = r.view(usize::MAX);
        assert_eq!(v.tuples.len(), 1);
        let t = &v.tuples[0];
        assert_eq!((t.allowed, t.denied), (10, 1));
        assert_eq!((t.verdict.as_str(), t.rule.as_str()), ("deny", "b"));
        assert_eq!(r.feed_after(None).len(), 11);
        assert_eq!(r.feed_after(Some(9)).len(), 1);
        let rules = r.rules();
        assert_eq!(rules[0].rule, "a");
        assert_eq!(rules[0].allowed, 10);
    }

    #[test]
    fn memory_is_bounded_least_recently_seen_first() {
        let r = Recent::new(RecentConfig {
            window_secs: 60,
            max_tuples: 3,
        });
        let now = SystemTime::now();
        for src in 1..=3 {
            r.record(&key(src, 80, 1), true, now, &explained(true, "a"));
        }
        // Seen again: now the most recent.
        r.record(&key(1, 80, 2), true, now, &explained(true, "a"));
        r.record(&key(4, 80, 1), true, now, &explained(true, "a"));
        let v = r.view(usize::MAX);
        let srcs: Vec<String> = v.tuples.iter().map(|t| t.src_ip.to_string()).collect();
        assert_eq!(srcs, ["10.0.0.4", "10.0.0.1", "10.0.0.3"]);
        assert_eq!(v.evicted, 1);
    }

    #[test]
    fn tuples_outside_the_window_are_forgotten() {
        let r = Recent::new(RecentConfig {
            window_secs: 0,
            max_tuples: 10,
        });
        r.record(
            &key(1, 80, 1),
            true,
            SystemTime::now(),
            &explained(true, "a"),
        );
        std::thread::sleep(Duration::from_millis(5));
        r.expire();
        assert!(r.view(usize::MAX).tuples.is_empty());
        assert_eq!(r.rules().len(), 1, "rule counts stay");
    }
}
