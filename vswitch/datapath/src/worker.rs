//! The packet path: [`Datapath`] (shared) and [`Worker`] (one per packet thread).
//!
//! Owns per-packet work: parse, microflow cache, pipeline on a miss, conntrack,
//! rewrites, counters, verdict. It touches no fd and no clock (`now` is passed in):
//! the I/O shell calls [`Worker::begin_batch`] once per batch of frames and
//! [`Worker::process`] per frame, then writes the frame to the verdict's ports.
//!
//! Hot-path rules: no locks, no allocation (proven by a test with a counting
//! allocator), counters are per-worker cells with a single writer, merged on read.
//! The control plane publishes table snapshots with [`Datapath::update`]; a worker
//! picks up the new generation at its next batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::cache::{CacheKey, CacheStats, MicroflowCache};
use crate::classify::FlowId;
use crate::classify::Hit;
use crate::conntrack::{Conntrack, CtConfig, CtRefused, Looked};
use crate::consulted::Consulted;
use crate::exec::{self, Execute, Translate};
use crate::field::{FRAG_ANY, Field, MatchKey, ether_type};
use crate::flow::{FlowEntry, TableId};
use crate::ipf::{Added, Ipf, IpfConfig};
use crate::key::{FlowKey, PortNo, parse};
use crate::nat::Ends;
use crate::pipeline::{End, Observer, Xlate, xlate};
use crate::table::Installed;
use crate::table::{FlowTables, Snapshot};
use crate::time::Time;

pub use crate::reason::DropReason;

/// What to do with a frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict<'a> {
    /// Ports to write the (possibly rewritten) frame to; empty when dropped.
    pub outputs: &'a [PortNo],
    /// The frame as parsed on arrival (before any rewrite): what connection
    /// events and the audit log are made of, with no second parse.
    pub key: &'a FlowKey,
    /// Send a copy to the control plane.
    pub punt: bool,
    pub drop: Option<DropReason>,
    /// The flow that decided a drop, when one did.
    pub decided_by: Option<FlowId>,
    /// A flow of one of [`DatapathConfig::policy_tables`] decided the drop.
    pub policy: bool,
    /// The frame started a connection (conntrack committed it as new).
    pub committed: bool,
    /// A fragment kept until its datagram is whole: nothing to send yet, not
    /// a drop.
    pub held: bool,
    /// The frame completed a fragmented datagram, decided as a whole: these
    /// frames (its fragments, in order) go to the outputs instead of it.
    pub fragments: &'a [Vec<u8>],
    /// `reject` answered the frame: this reply goes to the outputs (the
    /// frame's own port) instead of it. Empty otherwise.
    pub reply: &'a [u8],
}

/// One flow's counters in one worker. Single writer (the worker).
#[derive(Debug, Default)]
struct Slot {
    packets: AtomicU64,
    bytes: AtomicU64,
    last_hit: AtomicU64,
}

/// A worker's per-flow counters for one snapshot generation.
#[derive(Debug)]
struct ShardArray {
    generation: u64,
    slots: Box<[Slot]>,
}

impl ShardArray {
    fn new(generation: u64, n: usize) -> ShardArray {
        ShardArray {
            generation,
            slots: (0..n).map(|_| Slot::default()).collect(),
        }
    }
}

/// A worker's published counters; readers merge them.
#[derive(Debug)]
struct WorkerCell {
    flows: ArcSwap<ShardArray>,
    packets: AtomicU64,
    bytes: AtomicU64,
    punts: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_evictions: AtomicU64,
    cache_revalidated: AtomicU64,
    /// Packets that matched no flow, by the table where the lookup failed.
    table_misses: Box<[AtomicU64]>,
}

/// Single-writer increment: a plain load and store, no read-modify-write.
#[inline(always)]
fn bump(c: &AtomicU64, by: u64) {
    c.store(c.load(Relaxed).wrapping_add(by), Relaxed);
}

/// Configuration of the datapath.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Microflow cache entries per worker.
    pub cache_entries: usize,
    pub conntrack: CtConfig,
    /// Tables whose drops are policy decisions ([`Verdict::policy`]).
    pub policy_tables: Vec<TableId>,
    /// Fragment reassembly limits (per worker).
    pub ipf: IpfConfig,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            cache_entries: 8192,
            conntrack: CtConfig::default(),
            policy_tables: Vec::new(),
            ipf: IpfConfig::default(),
        }
    }
}

/// Totals over all workers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DatapathStats {
    pub generation: u64,
    pub flows: usize,
    pub masks: usize,
    pub packets: u64,
    pub bytes: u64,
    pub punts: u64,
    pub drops: Vec<(DropReason, u64)>,
    pub cache: CacheStats,
    pub workers: usize,
    pub conntrack_entries: usize,
    pub conntrack_max: usize,
    pub conntrack_full_drops: u64,
    /// New connections refused because their originator was at its limit.
    pub conntrack_limit_drops: u64,
    /// Packets that matched no flow in a table, for tables with any.
    pub table_misses: Vec<(TableId, u64)>,
}

/// A flow with its merged counters.
#[derive(Debug, Clone)]
pub struct FlowStat {
    pub id: FlowId,
    pub entry: Arc<FlowEntry>,
    pub packets: u64,
    pub bytes: u64,
    /// `None` if never hit.
    pub last_hit: Option<Time>,
    pub created: Time,
}

/// State shared by the control plane and all workers.
#[derive(Debug)]
pub struct Datapath {
    snapshot: ArcSwap<Snapshot>,
    /// The generation of `snapshot`, stored after it: what a worker checks
    /// per frame (one load) to process every frame read after a publish
    /// under that publish.
    generation: std::sync::atomic::AtomicU64,
    /// Serialises control-plane edits (each edits a copy of the snapshot).
    editing: Mutex<()>,
    pub conntrack: Conntrack,
    workers: Mutex<Vec<Arc<WorkerCell>>>,
    config: DatapathConfig,
}

/// A control-plane edit failed; the published tables are unchanged.
#[derive(Debug, thiserror::Error)]
#[error("flow table update failed")]
pub struct UpdateError(#[source] pub crate::flow::FlowError);

impl Datapath {
    pub fn new(config: DatapathConfig) -> Arc<Datapath> {
        Arc::new(Datapath {
            snapshot: ArcSwap::from_pointee(Snapshot::new(0, FlowTables::new(), Time::ZERO)),
            generation: std::sync::atomic::AtomicU64::new(0),
            editing: Mutex::new(()),
            conntrack: Conntrack::new(config.conntrack.clone()),
            workers: Mutex::new(Vec::new()),
            config,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Edits the tables and publishes the result as one new generation, atomically:
    /// workers see either all of the edit or none of it. When `edit` fails, nothing
    /// is published and the edit is discarded.
    pub fn update<T, E>(
        &self,
        now: Time,
        edit: impl FnOnce(&mut FlowTables) -> Result<T, E>,
    ) -> Result<(T, u64), E> {
        let _editing = self.editing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot.load_full();
        // One copy per edit: the published snapshot is immutable, so the draft
        // starts from it and becomes the next one.
        let mut draft = current.tables.clone();
        let out = edit(&mut draft)?;
        let next = Snapshot::next(&current, draft, now);
        let generation = next.generation;
        self.snapshot.store(Arc::new(next));
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
        Ok((out, generation))
    }

    /// Flows of the current snapshot with counters merged over all workers.
    pub fn flow_stats(&self) -> Vec<FlowStat> {
        let snap = self.snapshot();
        let shards: Vec<Arc<ShardArray>> = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|w| w.flows.load_full())
            .filter(|s| s.generation == snap.generation)
            .collect();
        let mut out: Vec<FlowStat> = snap
            .tables
            .iter()
            .map(|(id, f)| {
                let mut packets = f.totals.packets.load(Relaxed);
                let mut bytes = f.totals.bytes.load(Relaxed);
                let mut last = f.totals.last_hit.load(Relaxed);
                for s in &shards {
                    if let Some(slot) = s.slots.get(id.0 as usize) {
                        packets += slot.packets.load(Relaxed);
                        bytes += slot.bytes.load(Relaxed);
                        last = last.max(slot.last_hit.load(Relaxed));
                    }
                }
                FlowStat {
                    id,
                    entry: f.entry.clone(),
                    packets,
                    bytes,
                    last_hit: (packets > 0).then_some(Time(last)),
                    created: f.totals.created,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (a.entry.table, std::cmp::Reverse(a.entry.priority), a.id).cmp(&(
                b.entry.table,
                std::cmp::Reverse(b.entry.priority),
                b.id,
            ))
        });
        out
    }

    /// Totals over all workers.
    pub fn stats(&self) -> DatapathStats {
        let snap = self.snapshot();
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |f: fn(&WorkerCell) -> &AtomicU64| {
            workers.iter().map(|w| f(w).load(Relaxed)).sum::<u64>()
        };
        DatapathStats {
            generation: snap.generation,
            flows: snap.tables.len(),
            masks: (0..=TableId::MAX)
                .map(|t| snap.tables.classifier(TableId(t)).n_masks())
                .sum(),
            packets: sum(|w| &w.packets),
            bytes: sum(|w| &w.bytes),
            punts: sum(|w| &w.punts),
            drops: DropReason::ALL
                .iter()
                .map(|r| {
                    let n = workers
                        .iter()
                        .map(|w| w.drops[r.index()].load(Relaxed))
                        .sum();
                    (*r, n)
                })
                .collect(),
            cache: CacheStats {
                hits: sum(|w| &w.cache_hits),
                misses: sum(|w| &w.cache_misses),
                evictions: sum(|w| &w.cache_evictions),
                revalidated: sum(|w| &w.cache_revalidated),
            },
            workers: workers.len(),
            conntrack_entries: self.conntrack.len(),
            conntrack_max: self.conntrack.config().max_entries,
            conntrack_full_drops: self.conntrack.stats.full_drops.load(Relaxed),
            conntrack_limit_drops: self.conntrack.stats.limit_drops.load(Relaxed),
            table_misses: (0..=TableId::MAX)
                .filter_map(|t| {
                    let n: u64 = workers
                        .iter()
                        .map(|w| w.table_misses[usize::from(t)].load(Relaxed))
                        .sum();
                    (n > 0).then_some((TableId(t), n))
                })
                .collect(),
        }
    }

    /// A new worker for a packet thread.
    pub fn worker(self: &Arc<Self>) -> Worker {
        let snap = self.snapshot();
        let shard = Arc::new(ShardArray::new(snap.generation, snap.tables.id_bound()));
        let cell = Arc::new(WorkerCell {
            flows: ArcSwap::new(shard.clone()),
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            punts: AtomicU64::new(0),
            drops: Default::default(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_evictions: AtomicU64::new(0),
            cache_revalidated: AtomicU64::new(0),
            table_misses: (0..=TableId::MAX).map(|_| AtomicU64::new(0)).collect(),
        });
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cell.clone());
        Worker {
            dp: self.clone(),
            snap,
            shard,
            cell,
            cache: MicroflowCache::new(self.config.cache_entries),
            outputs: Vec::with_capacity(256),
            key: FlowKey::default(),
            ipf: Ipf::new(self.config.ipf.clone()),
            reply: Vec::with_capacity(1600),
        }
    }
}

/// One packet thread's state: its cache, its counters, its view of the tables.
#[derive(Debug)]
pub struct Worker {
    dp: Arc<Datapath>,
    snap: Arc<Snapshot>,
    shard: Arc<ShardArray>,
    cell: Arc<WorkerCell>,
    cache: MicroflowCache,
    outputs: Vec<PortNo>,
    /// The key of the frame being processed.
    key: FlowKey,
    /// Fragments waiting for the rest of their datagram.
    ipf: Ipf,
    /// The answer `reject` built.
    reply: Vec<u8>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.fold_counters();
        let mut workers = self.dp.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|w| !Arc::ptr_eq(w, &self.cell));
    }
}

impl Worker {
    /// Picks up a newly published snapshot, if any. Call once per batch.
    pub fn begin_batch(&mut self) {
        let current = self.dp.snapshot.load();
        if current.generation != self.snap.generation {
            let next = arc_swap::Guard::into_inner(current);
            self.switch_to(next);
        }
        let c = &self.cache.stats;
        self.cell.cache_hits.store(c.hits, Relaxed);
        self.cell.cache_misses.store(c.misses, Relaxed);
        self.cell.cache_evictions.store(c.evictions, Relaxed);
        self.cell.cache_revalidated.store(c.revalidated, Relaxed);
    }

    /// Picks up a snapshot published since the batch began (one atomic load
    /// when there is none): call before each frame read after the batch
    /// began, so a frame read after a publish is processed under it.
    pub fn refresh(&mut self) {
        let published = self
            .dp
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        if published != self.snap.generation {
            self.begin_batch();
        }
    }

    fn switch_to(&mut self, next: Arc<Snapshot>) {
        let fresh = Arc::new(ShardArray::new(next.generation, next.tables.id_bound()));
        // Publish the new (empty) array before folding the old one, so a reader
        // may briefly under-count but never counts a packet twice.
        self.cell.flows.store(fresh.clone());
        self.fold_counters();
        self.shard = fresh;
        self.snap = next;
    }

    /// Moves this worker's counts for the current snapshot into the flows' totals.
    fn fold_counters(&self) {
        for (i, slot) in self.shard.slots.iter().enumerate() {
            let packets = slot.packets.swap(0, Relaxed);
            if packets == 0 {
                continue;
            }
            if let Some(f) = self.snap.tables.get(FlowId(i as u32)) {
                f.totals.add(
                    packets,
                    slot.bytes.swap(0, Relaxed),
                    slot.last_hit.load(Relaxed),
                );
            }
        }
    }

    /// The generation this worker currently runs.
    pub fn generation(&self) -> u64 {
        self.snap.generation
    }

    /// A flow of the tables this worker runs (e.g. the one that decided a drop).
    pub fn flow(&self, id: FlowId) -> Option<&FlowEntry> {
        self.snap.tables.get(id).map(|f| &*f.entry)
    }

    /// Cache counters of this worker.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats
    }

    /// Runs one frame through the switch. `frame` may be rewritten in place (ARP
    /// replies); the caller then writes it to every port in the verdict.
    pub fn process(&mut self, now: Time, in_port: PortNo, frame: &mut [u8]) -> Verdict<'_> {
        self.process_offloaded(now, in_port, frame, false)
    }

    /// [`Worker::process`] for a frame whose transport checksum is left to
    /// the receiver (`partial`: it holds the pseudo-header sum, which
    /// translation must keep right).
    pub fn process_offloaded(
        &mut self,
        now: Time,
        in_port: PortNo,
        frame: &mut [u8],
        partial: bool,
    ) -> Verdict<'_> {
        let Worker {
            dp,
            snap,
            shard,
            cell,
            cache,
            outputs,
            key,
            ipf,
            reply,
        } = self;
        outputs.clear();
        let len = frame.len() as u64;
        bump(&cell.packets, 1);
        bump(&cell.bytes, len);
        *key = parse(in_port, frame);
        let mut fragments: &[Vec<u8>] = &[];
        let mut frame = frame;
        if key.nw_frag & FRAG_ANY != 0 && key.is_ip() {
            // A fragment: held until its datagram is whole, which is then
            // decided as one packet; its fragments are what is delivered.
            match ipf.add(now, in_port, frame) {
                Added::Held => {
                    return Verdict {
                        outputs,
                        key,
                        punt: false,
                        drop: None,
                        decided_by: None,
                        policy: false,
                        committed: false,
                        held: true,
                        fragments: &[],
                        reply: &[],
                    };
                }
                Added::Dropped(_) => {
                    return drop_verdict(cell, snap, dp, outputs, key, DropReason::Fragment, None);
                }
                Added::Complete => {
                    let (datagram, held) = ipf.completed();
                    *key = parse(in_port, datagram);
                    frame = datagram;
                    fragments = held;
                }
            }
        }
        if !key.flags.is_clean() {
            return drop_verdict(cell, snap, dp, outputs, key, DropReason::Malformed, None);
        }
        let mut cached = Cached {
            snap,
            cache,
            shard,
            len,
            now,
            ct: &dp.conntrack,
        };
        let mut live = Live {
            conntrack: &dp.conntrack,
            frame,
            now,
            partial,
            translated: None,
            reply,
        };
        let ran = exec::run(&mut cached, &mut live, key, outputs);
        let reason = if let Some(why) = ran.ct_refused {
            Some(match why {
                CtRefused::Full(_) => DropReason::CtFull,
                CtRefused::OverLimit => DropReason::CtLimit,
                CtRefused::NatClash => DropReason::NatClash,
            })
        } else if ran.end == End::LoopLimit {
            Some(DropReason::LoopLimit)
        } else if outputs.is_empty() && !ran.punt {
            Some(match ran.end {
                End::Miss(t) => {
                    bump(&cell.table_misses[usize::from(t.0)], 1);
                    DropReason::NoMatch
                }
                _ => DropReason::Flow,
            })
        } else {
            None
        };
        if let Some(reason) = reason {
            return drop_verdict(cell, snap, dp, outputs, key, reason, ran.last);
        }
        if ran.punt {
            bump(&cell.punts, 1);
        }
        // The fragments leave with the datagram's (possibly rewritten) MACs
        // and translated ends.
        let fragments: &[Vec<u8>] = if fragments.is_empty() {
            &[]
        } else {
            let macs: [u8; 12] = live.frame[..12].try_into().expect("an Ethernet header");
            let translated = live.translated;
            let (_, held) = ipf.completed();
            for f in held.iter_mut() {
                f[..12].copy_from_slice(&macs);
                if let Some(to) = &translated {
                    crate::nat::set_ends(f, to, false);
                }
            }
            ipf.fragments()
        };
        let reply: &[u8] = if ran.reply { reply } else { &[] };
        Verdict {
            outputs,
            key,
            punt: ran.punt,
            drop: None,
            decided_by: None,
            policy: false,
            committed: ran.committed,
            held: false,
            fragments,
            reply,
        }
    }
}

/// The packet path's translations: the microflow cache, the pipeline on a miss;
/// every flow hit is counted.
struct Cached<'a> {
    snap: &'a Snapshot,
    cache: &'a mut MicroflowCache,
    shard: &'a ShardArray,
    len: u64,
    now: Time,
    ct: &'a Conntrack,
}

/// The packet path's observer: it records nothing, and keeps client
/// affinity (a cached translation is one connection's: its 5-tuple is in the
/// key, so only its retransmissions reuse the choice).
struct Sticky<'a> {
    ct: &'a Conntrack,
    now: Time,
}

impl Observer for Sticky<'_> {
    #[inline(always)]
    fn visit(&mut self, _: TableId, _: &MatchKey, _: Option<(Hit, &Installed)>, _: u32) {}

    fn affinity(&mut self, group: u32, client: [u8; 16]) -> Option<u32> {
        self.ct.affinity(self.now, group, client)
    }

    fn took(&mut self, group: u32, client: [u8; 16], bucket: u32, secs: u32) {
        self.ct
            .remember_affinity(self.now, group, client, bucket, secs);
    }
}

impl Translate for Cached<'_> {
    #[inline]
    fn translate(&mut self, key: &MatchKey, stage: TableId) -> &Xlate {
        // Keyed by what the translation can depend on (see `CacheMasks` and
        // `Consulted`): a new connection's packets share the entry of the
        // connection before them.
        let snap = self.snap;
        let (tables, generation) = (&snap.tables, snap.generation);
        let revalidate = |since, ck: &CacheKey| snap.revalidates(since, &ck.key);
        let (ct, now) = (self.ct, self.now);
        let x = self.cache.translate(
            key,
            stage,
            &snap.cache_masks,
            generation,
            revalidate,
            || {
                let mut scratch = *key;
                let mut obs = Consulted::new(&snap.cache_masks, Sticky { ct, now });
                let x = xlate(tables, &mut scratch, stage, &mut obs);
                (x, obs.mask)
            },
        );
        for id in &x.hits {
            if let Some(slot) = self.shard.slots.get(id.0 as usize) {
                bump(&slot.packets, 1);
                bump(&slot.bytes, self.len);
                slot.last_hit.store(self.now.0, Relaxed);
            }
        }
        x
    }
}

/// The packet path's actions: the frame's bytes and the live conntrack table.
struct Live<'a> {
    conntrack: &'a Conntrack,
    frame: &'a mut [u8],
    now: Time,
    /// The transport checksum is left to the receiver.
    partial: bool,
    /// The ends translation gave the packet (for a datagram's fragments).
    translated: Option<Ends>,
    reply: &'a mut Vec<u8>,
}

impl Execute for Live<'_> {
    fn rewrite(&mut self, key: &FlowKey, field: Field, value: u128) {
        rewrite(self.frame, key, field, value);
    }

    fn commit(
        &mut self,
        zone: u16,
        mark: Option<u8>,
        orig: &FlowKey,
        current: &FlowKey,
    ) -> Result<(), CtRefused> {
        let len = self.frame.len();
        if orig.nw_src == current.nw_src
            && orig.nw_dst == current.nw_dst
            && orig.tp_src == current.tp_src
            && orig.tp_dst == current.tp_dst
        {
            return self
                .conntrack
                .commit_marked(self.now, zone, orig, len, mark);
        }
        self.conntrack
            .commit_nat(self.now, zone, orig, current, len, mark)
            .map(|_| ())
    }

    fn lookup(&mut self, zone: u16, key: &FlowKey, nat: bool) -> Looked {
        self.conntrack
            .lookup_nat(self.now, zone, key, self.frame, nat)
    }

    fn set_ends(&mut self, _: &FlowKey, to: &Ends) {
        crate::nat::set_ends(self.frame, to, self.partial);
        self.translated = Some(*to);
    }

    fn set_error_ends(&mut self, _: &FlowKey, outer: &Ends, inner: &Ends) {
        crate::nat::set_error_ends(self.frame, outer, inner);
    }

    fn reject(&mut self, key: &FlowKey) -> bool {
        crate::reject::build(self.frame, key, self.reply)
    }

    fn nd_advert(&mut self, key: &FlowKey, mac: [u8; 6], router: bool) -> bool {
        let l3 = if key.vlan_tci != 0 { 18 } else { 14 };
        crate::nd::advertise(self.frame, l3, mac, router)
    }
}

fn drop_verdict<'a>(
    cell: &WorkerCell,
    snap: &Snapshot,
    dp: &Datapath,
    outputs: &'a mut Vec<PortNo>,
    key: &'a FlowKey,
    reason: DropReason,
    decided_by: Option<FlowId>,
) -> Verdict<'a> {
    outputs.clear();
    bump(&cell.drops[reason.index()], 1);
    let policy = reason == DropReason::Flow
        && decided_by
            .and_then(|id| snap.tables.get(id))
            .is_some_and(|f| dp.config.policy_tables.contains(&f.entry.table));
    Verdict {
        outputs,
        key,
        punt: false,
        drop: Some(reason),
        decided_by,
        policy,
        committed: false,
        held: false,
        fragments: &[],
        reply: &[],
    }
}

/// Writes a rewritten field into the frame. Only fields that
/// [`crate::flow::FlowEntry::validate`] allows reach here.
fn rewrite(frame: &mut [u8], key: &FlowKey, field: Field, value: u128) {
    let l3 = if key.vlan_tci != 0 { 18 } else { 14 };
    let arp = key.dl_type == ether_type::ARP;
    let be = value.to_be_bytes();
    // (offset in the frame, bytes of the big-endian value)
    let (at, src) = match field {
        Field::DlDst => (0, 10..16),
        Field::DlSrc => (6, 10..16),
        Field::NwProto if arp => (l3 + 6, 14..16),
        Field::ArpSha if arp => (l3 + 8, 10..16),
        Field::NwSrc if arp => (l3 + 14, 12..16),
        Field::ArpTha if arp => (l3 + 18, 10..16),
        Field::NwDst if arp => (l3 + 24, 12..16),
        _ => return,
    };
    if let Some(dst) = frame.get_mut(at..at + src.len()) {
        dst.copy_from_slice(&be[src]);
    }
}
