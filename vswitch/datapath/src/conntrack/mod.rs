//! Userspace connection tracking.
//!
//! Owns connection state: which packets belong to a known connection, in which
//! direction, and when a connection dies. Entries live in one sharded map keyed by a
//! canonical (direction-free) tuple, so both directions find the same entry with one
//! lookup. There is no timer per entry: an entry past its deadline is dead to
//! lookups, and [`Conntrack::sweep`] reclaims dead entries from a coarse expiry wheel
//! (one-second buckets of keys, filled when a connection is committed or its timeout
//! shrinks), so a sweep only visits entries that may be due.
//!
//! When the table holds `max_entries`, [`Conntrack::commit`] refuses new connections
//! (the packet is dropped and counted as `ct_full`); existing connections keep working.
//! Fragments and frames that failed to parse are `+inv` (no reassembly).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::field::{FRAG_ANY, ct_state, ip_proto, tcp_flags};
use crate::key::{FlowKey, PortNo, wide_to_ip};
use crate::time::Time;

mod affinity;
mod bulk;
mod expiry;
mod icmp;
mod map;
mod nat;
mod owner;
mod saved;
mod state;

use icmp::{embedded_tuple, is_icmp_error, is_icmp_reply_only, is_router_error};
use nat::NatConn;
pub use nat::{Looked, NatRewrite};
use owner::Charge;
pub use owner::Owner;
pub use saved::SavedConn;
pub use state::ConnState;

/// How often packet threads sweep expired connections, and how many keys one
/// sweep may visit: 655k expiries a second, more than the connection rate one
/// node sustains, so the table and its wheel stay bounded under churn.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
pub const SWEEP_BUDGET: usize = 65_536;

/// Packets one [`Conntrack::prefetch`] prefetches (the rest are skipped).
pub const PREFETCH_MAX: usize = 64;

/// Timeouts and limits.
#[derive(Clone, Debug)]
pub struct CtConfig {
    pub max_entries: usize,
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub tcp_time_wait: Duration,
    pub tcp_closed: Duration,
    pub udp_first: Duration,
    pub udp_replied: Duration,
    pub icmp: Duration,
    pub other: Duration,
}

impl Default for CtConfig {
    fn default() -> Self {
        let s = Duration::from_secs;
        CtConfig {
            max_entries: 262_144,
            tcp_syn: s(30),
            tcp_established: s(24 * 3600),
            tcp_closing: s(30),
            tcp_time_wait: s(30),
            tcp_closed: s(10),
            udp_first: s(30),
            udp_replied: s(180),
            icmp: s(30),
            other: s(60),
        }
    }
}

/// The direction-free identity of a connection: endpoint `a` sorts before `b`.
/// Its hash leaves the zone out (see `ConnMap::hash`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct CanonKey {
    zone: u16,
    proto: u8,
    a: ([u8; 16], u16),
    b: ([u8; 16], u16),
}

impl std::hash::Hash for CanonKey {
    /// Five whole words (no length prefixes), the zone left out.
    #[inline(always)]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let word = |b: &[u8; 16], half: usize| {
            let mut w = [0; 8];
            w.copy_from_slice(&b[half * 8..half * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        state.write_u64(word(&self.a.0, 0));
        state.write_u64(word(&self.a.0, 1));
        state.write_u64(word(&self.b.0, 0));
        state.write_u64(word(&self.b.0, 1));
        state.write_u64(
            u64::from(self.proto) << 32 | u64::from(self.a.1) << 16 | u64::from(self.b.1),
        );
    }
}

/// One direction's tuple of a packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Tuple {
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    /// The tuple of a packet, `None` when conntrack cannot follow it.
    #[inline]
    fn of(key: &FlowKey) -> Option<Tuple> {
        if !key.is_ip() || !key.flags.is_clean() || key.nw_frag & FRAG_ANY != 0 {
            return None;
        }
        let (sport, dport) = match key.nw_proto {
            ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP => (key.tp_src, key.tp_dst),
            // Echo request and reply carry the same identifier: the same value
            // on both sides keeps the tuple symmetric, so the reply finds it.
            ip_proto::ICMP | ip_proto::ICMPV6 => (key.icmp_id, key.icmp_id),
            _ => (0, 0),
        };
        Some(Tuple {
            proto: key.nw_proto,
            src: key.nw_src,
            dst: key.nw_dst,
            sport,
            dport,
        })
    }

    fn reverse(self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..self
        }
    }

    /// Canonical key and whether this tuple is the `a -> b` direction.
    #[inline]
    fn canon(self, zone: u16) -> (CanonKey, bool) {
        let s = (self.src, self.sport);
        let d = (self.dst, self.dport);
        let forward = s <= d;
        let (a, b) = if forward { (s, d) } else { (d, s) };
        (
            CanonKey {
                zone,
                proto: self.proto,
                a,
                b,
            },
            forward,
        )
    }
}

/// A connection's state. Laid out by hand (`repr(C)`): with the key in
/// front of it (see `map`), the first cache line of a slot holds all a probe
/// reads (the key, and the state and flags, whose spare values mark an empty
/// slot) and the deadline; the counters a packet updates share the second.
#[derive(Debug)]
#[repr(C)]
struct Conn {
    state: ConnState,
    /// Whether the originator is endpoint `a` of the canonical key.
    orig_is_a: bool,
    replied: bool,
    fin_seen: [bool; 2],
    /// `ct_mark`, set on commit.
    mark: u8,
    expires: Time,
    /// Set on the entry under a translated connection's other key: the key
    /// of the connection itself (all other fields unused).
    alias_of: Option<Box<CanonKey>>,
    /// A translated connection: its ends before and after, and the key its
    /// translated ends are found under.
    nat: Option<Box<NatConn>>,
    /// The earliest deadline under which the key sits in the expiry wheel.
    queued: Time,
    created: Time,
    packets: [u64; 2],
    bytes: [u64; 2],
    /// Who it is charged to, when its originator has an owner.
    charge: Option<Charge>,
}

impl Conn {
    /// The connection's state without its charge.
    fn uncharged(&self) -> Conn {
        Conn {
            orig_is_a: self.orig_is_a,
            state: self.state,
            fin_seen: self.fin_seen,
            replied: self.replied,
            expires: self.expires,
            queued: self.queued,
            created: self.created,
            packets: self.packets,
            bytes: self.bytes,
            mark: self.mark,
            charge: None,
            nat: self.nat.clone(),
            alias_of: None,
        }
    }
}

/// A connection as `dump` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub zone: u16,
    pub orig: Tuple,
    pub state: ConnState,
    /// Time left before expiry.
    pub expires_in: Duration,
    pub age: Duration,
    /// Packets and bytes, original then reply direction.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Who it is charged to (see [`Owner`]).
    pub owner: Option<String>,
    /// A translated connection: its original direction's ends after
    /// translation (`orig` holds them before).
    pub nat: Option<crate::nat::Ends>,
}

impl std::fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = ip_proto::name(self.orig.proto);
        write!(
            f,
            "{proto},zone={},src={},dst={},sport={},dport={},state={},timeout={}s,packets={}/{},bytes={}/{}",
            self.zone,
            wide_to_ip(self.orig.src),
            wide_to_ip(self.orig.dst),
            self.orig.sport,
            self.orig.dport,
            self.state.name(),
            self.expires_in.as_secs(),
            self.packets[0],
            self.packets[1],
            self.bytes[0],
            self.bytes[1],
        )?;
        if let Some(n) = &self.nat {
            if n.src != self.orig.src || n.sport != self.orig.sport {
                write!(f, ",snat={}:{}", wide_to_ip(n.src), n.sport)?;
            }
            if n.dst != self.orig.dst || n.dport != self.orig.dport {
                write!(f, ",dnat={}:{}", wide_to_ip(n.dst), n.dport)?;
            }
        }
        Ok(())
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct CtStats {
    pub committed: AtomicU64,
    pub full_drops: AtomicU64,
    /// New connections refused because their originator was at its limit.
    pub limit_drops: AtomicU64,
    pub invalid: AtomicU64,
    pub expired: AtomicU64,
    /// New translated connections refused: their translated ends were
    /// another connection's.
    pub nat_clashes: AtomicU64,
    /// Client affinities not remembered: the table was full.
    pub affinity_full: AtomicU64,
}

/// `commit` refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CtRefused {
    /// The table is at `max_entries`.
    #[error("conntrack table full ({0} entries)")]
    Full(usize),
    /// The originator (its pod or its namespace) has as many connections as
    /// it may have.
    #[error("connection limit of the originator reached")]
    OverLimit,
    /// A translated connection's ends after translation belong to another
    /// live connection.
    #[error("translated ends already in use")]
    NatClash,
}

/// The connection table, shared by all packet threads.
#[derive(Debug)]
pub struct Conntrack {
    config: CtConfig,
    map: map::ConnMap,
    len: AtomicUsize,
    /// Deadline (whole seconds, rounded up) -> keys that may expire then.
    /// Only the sweep takes it: packet threads schedule into `scheduled`.
    wheel: Mutex<BTreeMap<u64, Vec<CanonKey>>>,
    /// (deadline second, key) scheduled by packet threads, lock-free; the
    /// sweep moves them into the wheel. Committing a connection takes no
    /// lock another packet thread could hold for it (but the table shard's).
    scheduled: crossbeam_queue::SegQueue<(u64, CanonKey)>,
    /// See [`Conntrack::set_trusted_error_ports`].
    trusted_error_ports: arc_swap::ArcSwap<Vec<PortNo>>,
    /// Who new connections are charged to, by the originator's address.
    owners: arc_swap::ArcSwap<std::collections::HashMap<[u8; 16], std::sync::Arc<Owner>>>,
    /// Client affinity of select groups (see `affinity`).
    affinity: affinity::AffinityMap,
    /// The second of the last affinity sweep.
    affinity_swept: AtomicU64,
    pub stats: CtStats,
}

const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN: u8 = 7;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

impl Conntrack {
    pub fn new(config: CtConfig) -> Conntrack {
        Conntrack {
            map: map::ConnMap::new(),
            config,
            len: AtomicUsize::new(0),
            wheel: Mutex::new(BTreeMap::new()),
            scheduled: crossbeam_queue::SegQueue::new(),
            trusted_error_ports: arc_swap::ArcSwap::from_pointee(Vec::new()),
            owners: arc_swap::ArcSwap::from_pointee(std::collections::HashMap::new()),
            affinity: Default::default(),
            affinity_swept: AtomicU64::new(0),
            stats: CtStats::default(),
        }
    }

    pub fn config(&self) -> &CtConfig {
        &self.config
    }

    /// Live and dead-but-unswept entries.
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks the packet up in `zone` and advances its connection's state.
    /// Returns the `ct_state` bits (always including `+trk`).
    ///
    /// `frame` is read only for ICMP errors (to find the embedded connection).
    pub fn lookup(&self, now: Time, zone: u16, key: &FlowKey, frame: &[u8]) -> u8 {
        self.lookup_marked(now, zone, key, frame).0
    }

    /// Whether an ICMP error is consistent with the connection it embeds, and
    /// then (its direction is the original one, the connection's mark). It must
    /// name a live connection, travel back to the embedded packet's sender,
    /// and come from that packet's destination — or, for the errors routers
    /// send (fragmentation needed / packet too big, time exceeded), through a
    /// port trusted to carry them (the node's). Anything else is forged: a
    /// third party cannot reset or redirect a connection it is not part of.
    fn related(
        &self,
        now: Time,
        zone: u16,
        key: &FlowKey,
        frame: &[u8],
    ) -> Option<(bool, u8, Option<NatRewrite>)> {
        let inner = embedded_tuple(frame)?;
        if key.nw_dst != inner.src {
            return None;
        }
        let from_peer = key.nw_src == inner.dst;
        let from_router = is_router_error(key) && self.trusted_error_port(key.in_port);
        if !(from_peer || from_router) {
            return None;
        }
        // The embedded packet travelled the other way.
        let (ck, fwd) = inner.reverse().canon(zone);
        let (conn, via_alias) = self.resolve(&ck)?;
        if conn.expires <= now {
            return None;
        }
        let orig_dir = if via_alias {
            // Found by its translated ends: the error is about a packet of the
            // original direction after translation, so it travels back.
            !conn
                .nat
                .as_ref()
                .is_some_and(|n| n.is_translated_orig(&inner))
        } else {
            fwd == conn.orig_is_a
        };
        let rewrite = conn
            .nat
            .as_ref()
            .and_then(|n| n.error_rewrite(key, &inner, via_alias, orig_dir));
        Some((orig_dir, conn.mark, rewrite))
    }

    /// Who connections from each address are charged to from now on
    /// (connections already made keep their owner). Replaces the map.
    pub fn set_owners(&self, owners: std::collections::HashMap<[u8; 16], std::sync::Arc<Owner>>) {
        self.owners.store(std::sync::Arc::new(owners));
    }

    /// The charge for a new connection opened by `key`'s source; refused when
    /// its owner (or the owner's group) is at its limit.
    fn charge(&self, key: &FlowKey) -> Result<Option<Charge>, CtRefused> {
        let owners = self.owners.load();
        let Some(owner) = owners.get(&key.nw_src) else {
            return Ok(None);
        };
        if !owner.has_room() {
            owner.refused.fetch_add(1, Relaxed);
            self.stats.limit_drops.fetch_add(1, Relaxed);
            return Err(CtRefused::OverLimit);
        }
        Ok(Some(Charge::new(owner)))
    }

    /// Ports through which ICMP errors from routers (a third party to the
    /// connection) are believed: the node's gateway. Replaces the set.
    pub fn set_trusted_error_ports(&self, ports: Vec<PortNo>) {
        self.trusted_error_ports.store(std::sync::Arc::new(ports));
    }

    fn trusted_error_port(&self, port: PortNo) -> bool {
        self.trusted_error_ports.load().contains(&port)
    }

    /// Starts loading the memory lookups of these packets will read (the
    /// slot each one's connection lives in), so a burst of packets waits for
    /// memory once rather than once per packet. Any zone: the zone is not
    /// part of the hash. Only a hint: it takes no lock and changes nothing.
    pub fn prefetch<'k>(&self, keys: impl IntoIterator<Item = &'k FlowKey>) {
        for key in keys.into_iter().take(PREFETCH_MAX) {
            if let Some(tuple) = Tuple::of(key) {
                self.map.prefetch(self.map.hash(&tuple.canon(0).0));
            }
        }
    }

    /// [`Conntrack::lookup`], also returning the connection's `ct_mark` (0 when
    /// untracked, new or invalid; an ICMP error gets its connection's).
    pub fn lookup_marked(&self, now: Time, zone: u16, key: &FlowKey, frame: &[u8]) -> (u8, u8) {
        let l = self.lookup_nat(now, zone, key, frame, false);
        (l.state, l.mark)
    }

    /// [`Conntrack::lookup_marked`]; with `nat`, also the rewrite a
    /// translated connection's packet gets (`ct(nat)`): its original
    /// direction towards the translated ends, its replies (and ICMP errors
    /// about it) back to the ends the originator knows.
    pub fn lookup_nat(
        &self,
        now: Time,
        zone: u16,
        key: &FlowKey,
        frame: &[u8],
        nat: bool,
    ) -> Looked {
        use ct_state::*;
        let invalid = || {
            self.stats.invalid.fetch_add(1, Relaxed);
            Looked::state(TRK | INV)
        };
        let Some(tuple) = Tuple::of(key) else {
            return invalid();
        };
        if is_icmp_error(key) {
            return match self.related(now, zone, key, frame) {
                Some((orig_dir, mark, rewrite)) => Looked {
                    state: TRK | REL | if orig_dir { 0 } else { RPL },
                    mark,
                    nat: rewrite.filter(|_| nat),
                },
                None => invalid(),
            };
        }
        let (mut ck, fwd) = tuple.canon(zone);
        let mut found = self.map.get_mut(&ck);
        let mut via_alias = false;
        if let Some(primary) = found.as_ref().and_then(|c| c.alias_of.as_deref().copied()) {
            drop(found);
            ck = primary;
            via_alias = true;
            found = self.map.get_mut(&ck);
        }
        if let Some(mut conn) = found
            && conn.expires > now
        {
            if conn.nat.is_some() && conn.reopened_by(key) {
                // A new connection on the ends of a dead translated one: it
                // starts afresh (untranslated, or translated anew).
                drop(conn);
                self.forget(&ck);
                return Looked::state(TRK | NEW);
            }
            let orig = match (&conn.nat, via_alias) {
                (Some(n), true) => n.is_translated_orig(&tuple),
                _ => fwd == conn.orig_is_a,
            };
            let mark = conn.mark;
            let rewrite = conn
                .nat
                .as_ref()
                .filter(|_| nat)
                .and_then(|n| n.rewrite(via_alias, orig));
            return match self.advance(&ck, &mut conn, now, key, orig, frame.len() as u64) {
                Some(state) => Looked {
                    state,
                    mark,
                    nat: rewrite,
                },
                None => invalid(),
            };
        }
        // Unknown (or expired) connection: only an opening packet may start one.
        if Self::opens(key) {
            Looked::state(TRK | NEW)
        } else {
            invalid()
        }
    }

    /// The `ct_state` [`Conntrack::lookup`] would return for this packet, without
    /// changing any state (for trace). ICMP errors need the frame and are
    /// reported `+inv` here.
    pub fn peek(&self, now: Time, zone: u16, key: &FlowKey) -> u8 {
        self.peek_marked(now, zone, key).0
    }

    /// [`Conntrack::peek`], also returning the connection's `ct_mark`.
    pub fn peek_marked(&self, now: Time, zone: u16, key: &FlowKey) -> (u8, u8) {
        let l = self.peek_nat(now, zone, key, false);
        (l.state, l.mark)
    }

    /// [`Conntrack::peek_marked`] with the translation [`Conntrack::lookup_nat`]
    /// would apply.
    pub fn peek_nat(&self, now: Time, zone: u16, key: &FlowKey, nat: bool) -> Looked {
        use ct_state::*;
        let Some(tuple) = Tuple::of(key) else {
            return Looked::state(TRK | INV);
        };
        if is_icmp_error(key) {
            return Looked::state(TRK | INV);
        }
        let (ck, fwd) = tuple.canon(zone);
        if let Some((conn, via_alias)) = self.resolve(&ck)
            && conn.expires > now
        {
            // A copy to advance without touching the entry; it holds no
            // charge (cloning one would count against the owner's limit).
            let mut copy = conn.uncharged();
            drop(conn);
            let orig = match (&copy.nat, via_alias) {
                (Some(n), true) => n.is_translated_orig(&tuple),
                _ => fwd == copy.orig_is_a,
            };
            let rewrite = copy
                .nat
                .as_ref()
                .filter(|_| nat)
                .and_then(|n| n.rewrite(via_alias, orig));
            return Looked {
                state: self.advance_copy(&mut copy, now, key, orig),
                mark: copy.mark,
                nat: rewrite,
            };
        }
        if Self::opens(key) {
            Looked::state(TRK | NEW)
        } else {
            Looked::state(TRK | INV)
        }
    }

    /// Whether a packet may start a connection.
    fn opens(key: &FlowKey) -> bool {
        match key.nw_proto {
            ip_proto::TCP => {
                let f = key.tcp_flags;
                f & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN)
                    == tcp_flags::SYN
            }
            ip_proto::SCTP => key.sctp_chunk == SCTP_INIT,
            _ => !is_icmp_reply_only(key),
        }
    }

    /// [`Conntrack::advance`] on a private copy: same answer, nothing scheduled.
    fn advance_copy(&self, conn: &mut Conn, now: Time, key: &FlowKey, orig: bool) -> u8 {
        conn.queued = Time::ZERO;
        self.transition(conn, now, key, orig, 0)
            .unwrap_or(ct_state::TRK | ct_state::INV)
    }

    /// Advances `conn` with a packet; `None` when the packet is invalid for it.
    fn advance(
        &self,
        ck: &CanonKey,
        conn: &mut Conn,
        now: Time,
        key: &FlowKey,
        orig: bool,
        len: u64,
    ) -> Option<u8> {
        let state = self.transition(conn, now, key, orig, len);
        if conn.expires < conn.queued {
            self.schedule(*ck, conn.expires);
            conn.queued = conn.expires;
        }
        state
    }

    /// Creates the entry for this packet's connection in `zone` (no-op when it
    /// exists); `len` is the packet's length. Fails when the table is full;
    /// untrackable packets are ignored.
    pub fn commit(&self, now: Time, zone: u16, key: &FlowKey, len: usize) -> Result<(), CtRefused> {
        self.commit_marked(now, zone, key, len, None)
    }

    /// [`Conntrack::commit`], setting the connection's `ct_mark` when `mark` is
    /// given (also on a connection already committed).
    pub fn commit_marked(
        &self,
        now: Time,
        zone: u16,
        key: &FlowKey,
        len: usize,
        mark: Option<u8>,
    ) -> Result<(), CtRefused> {
        self.commit_inner(now, zone, key, len, mark, None)
            .map(|_| ())
    }

    /// The commit proper; `nat` makes the new connection a translated one.
    /// Returns whether a connection was created.
    fn commit_inner(
        &self,
        now: Time,
        zone: u16,
        key: &FlowKey,
        len: usize,
        mark: Option<u8>,
        nat: Option<NatConn>,
    ) -> Result<bool, CtRefused> {
        let Some(tuple) = Tuple::of(key) else {
            return Ok(false);
        };
        if is_icmp_error(key) {
            return Ok(false);
        }
        let (ck, fwd) = tuple.canon(zone);
        let c = &self.config;
        let (state, timeout) = match key.nw_proto {
            ip_proto::TCP => (ConnState::TcpSynSent, c.tcp_syn),
            ip_proto::SCTP => (ConnState::SctpCookie, c.tcp_closing),
            ip_proto::ICMP | ip_proto::ICMPV6 => (ConnState::Unreplied, c.icmp),
            ip_proto::UDP => (ConnState::Unreplied, c.udp_first),
            _ => (ConnState::Unreplied, c.other),
        };
        let fresh = |charge| Conn {
            orig_is_a: fwd,
            state,
            fin_seen: [false; 2],
            replied: false,
            expires: (now + timeout),
            queued: (now + timeout),
            created: now,
            packets: [1, 0],
            bytes: [len as u64, 0],
            mark: mark.unwrap_or(0),
            charge,
            nat: nat.clone().map(Box::new),
            alias_of: None,
        };
        let replaced = match self.map.entry(ck) {
            map::Entry::Occupied(mut e) => {
                if let Some(primary) = e.alias_of.as_deref().copied() {
                    // These ends are a translated connection's: theirs while
                    // it lives (its lookups answer for them).
                    drop(e);
                    if self.map.get(&primary).is_some_and(|c| c.expires > now) {
                        return Ok(false);
                    }
                    self.map.remove(&ck);
                    return self.commit_inner(now, zone, key, len, mark, nat);
                }
                if e.expires > now {
                    if let Some(m) = mark {
                        e.mark = m;
                    }
                    return Ok(false);
                }
                // The dead entry's charge is given back as it is replaced.
                let charge = self.charge(key)?;
                let dead = std::mem::replace(&mut *e, fresh(charge));
                drop(e);
                self.schedule(ck, now + timeout);
                self.stats.committed.fetch_add(1, Relaxed);
                Some(dead)
            }
            map::Entry::Vacant(v) => {
                if self.len.load(Relaxed) >= self.config.max_entries {
                    self.stats.full_drops.fetch_add(1, Relaxed);
                    return Err(CtRefused::Full(self.config.max_entries));
                }
                let charge = self.charge(key)?;
                self.len.fetch_add(1, Relaxed);
                v.insert(fresh(charge));
                self.schedule(ck, now + timeout);
                self.stats.committed.fetch_add(1, Relaxed);
                None
            }
        };
        if let Some(dead) = replaced {
            self.unlink(&ck, &dead);
        }
        if let Some(n) = nat {
            self.map.insert(n.alias, Conn::alias(ck));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::ct_state::*;
    use crate::key::{PortNo, parse};
    use etherparse::PacketBuilder;

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    fn tcp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, flags: &str) -> (FlowKey, Vec<u8>) {
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sp, dp, 1, 100);
        for c in flags.chars() {
            b = match c {
                'S' => b.syn(),
                'A' => b.ack(1),
                'F' => b.fin(),
                'R' => b.rst(),
                _ => b,
            };
        }
        let mut f = Vec::new();
        b.write(&mut f, &[]).unwrap();
        (parse(PortNo(1), &f), f)
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> (FlowKey, Vec<u8>) {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .udp(sp, dp)
            .write(&mut f, &[1])
            .unwrap();
        (parse(PortNo(1), &f), f)
    }

    #[test]
    fn prefetching_takes_no_lock_and_changes_no_lookup() {
        let ct = Conntrack::new(CtConfig::default());
        let t0 = Time::from_secs(100);
        let (syn, f) = tcp(A, B, 1000, 80, "S");
        // One tuple in zone 1 only: the zone is not hashed, so both zones'
        // keys share a bucket and must still be told apart.
        ct.commit(t0, 1, &syn, f.len()).unwrap();
        let (other, g) = udp(A, B, 53, 53);
        ct.commit(t0, 0, &other, g.len()).unwrap();
        let (ack, f2) = tcp(B, A, 80, 1000, "SA");
        let mut fragment = udp(B, A, 9, 9).0;
        fragment.nw_frag = crate::field::FRAG_ANY;
        // This thread holds the write lock of `ack`'s shard: prefetching must
        // not wait for it (it takes no lock at all).
        let (ck, _) = Tuple::of(&ack).unwrap().canon(1);
        let held = ct.map.get_mut(&ck).unwrap();
        ct.prefetch([&ack, &other, &fragment, &syn]);
        drop(held);
        ct.prefetch([&ack, &other, &fragment]);
        assert_eq!(ct.lookup(t0, 1, &ack, &f2), TRK | EST | RPL);
        assert_eq!(ct.lookup(t0, 0, &ack, &f2), TRK | INV);
        assert_eq!(ct.lookup(t0, 0, &other, &g), TRK | NEW);
        assert_eq!(ct.lookup(t0, 0, &fragment, &[]), TRK | INV);
    }

    #[test]
    fn tcp_handshake_teardown_and_expiry() {
        let ct = Conntrack::new(CtConfig::default());
        let t0 = Time::from_secs(100);
        let (syn, f) = tcp(A, B, 1000, 80, "S");
        assert_eq!(ct.lookup(t0, 0, &syn, &f), TRK | NEW);
        ct.commit(t0, 0, &syn, f.len()).unwrap();
        let (synack, f2) = tcp(B, A, 80, 1000, "SA");
        assert_eq!(ct.lookup(t0, 0, &synack, &f2), TRK | EST | RPL);
        let (ack, f3) = tcp(A, B, 1000, 80, "A");
        assert_eq!(ct.lookup(t0, 0, &ack, &f3), TRK | EST);
        assert_eq!(ct.dump(t0, None)[0].state, ConnState::TcpEstablished);
        // A different zone does not see it.
        assert_eq!(ct.lookup(t0, 1, &ack, &f3), TRK | INV);
        let (fin1, f4) = tcp(A, B, 1000, 80, "FA");
        let (fin2, f5) = tcp(B, A, 80, 1000, "FA");
        ct.lookup(t0, 0, &fin1, &f4);
        assert_eq!(ct.dump(t0, None)[0].state, ConnState::TcpClosing);
        ct.lookup(t0, 0, &fin2, &f5);
        assert_eq!(ct.dump(t0, None)[0].state, ConnState::TcpTimeWait);
        let later = t0 + Duration::from_secs(31);
        assert_eq!(
            ct.lookup(later, 0, &ack, &f3),
            TRK | INV,
            "expired: mid-stream ACK"
        );
        assert_eq!(ct.sweep_all(later), 1);
        assert!(ct.is_empty());
    }

    #[test]
    fn half_open_expires_quickly() {
        let ct = Conntrack::new(CtConfig::default());
        let (syn, _) = tcp(A, B, 1, 2, "S");
        ct.commit(Time::ZERO, 0, &syn, 60).unwrap();
        assert_eq!(ct.sweep_all(Time::from_secs(29)), 0);
        assert_eq!(ct.sweep_all(Time::from_secs(31)), 1);
    }

    #[test]
    fn invalid_tcp() {
        let ct = Conntrack::new(CtConfig::default());
        let (ack, f) = tcp(A, B, 1, 2, "A");
        assert_eq!(ct.lookup(Time::ZERO, 0, &ack, &f), TRK | INV);
        let (synfin, f) = tcp(A, B, 1, 2, "SF");
        assert_eq!(ct.lookup(Time::ZERO, 0, &synfin, &f), TRK | INV);
    }

    #[test]
    fn udp_reply_and_icmp_related() {
        let ct = Conntrack::new(CtConfig::default());
        let (req, f) = udp(A, B, 5000, 53);
        assert_eq!(ct.lookup(Time::ZERO, 0, &req, &f), TRK | NEW);
        ct.commit(Time::ZERO, 0, &req, f.len()).unwrap();
        assert_eq!(
            ct.lookup(Time::ZERO, 0, &req, &f),
            TRK | NEW,
            "no reply yet"
        );
        // Port unreachable from B, quoting A's datagram.
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2([4; 6], [2; 6])
            .ipv4(B, A, 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut icmp, &f[14..14 + 28])
            .unwrap();
        let k = parse(PortNo(2), &icmp);
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &icmp), TRK | REL | RPL);
        let (rep, f2) = udp(B, A, 53, 5000);
        assert_eq!(ct.lookup(Time::ZERO, 0, &rep, &f2), TRK | EST | RPL);
        assert_eq!(ct.lookup(Time::ZERO, 0, &req, &f), TRK | EST);
    }

    #[test]
    fn forged_icmp_errors_are_invalid() {
        const C: [u8; 4] = [10, 0, 0, 3];
        let ct = Conntrack::new(CtConfig::default());
        let (req, f) = udp(A, B, 5000, 53);
        ct.commit(Time::ZERO, 0, &req, f.len()).unwrap();
        let error = |src, dst, t: etherparse::Icmpv4Type, in_port| {
            let mut icmp = Vec::new();
            PacketBuilder::ethernet2([4; 6], [2; 6])
                .ipv4(src, dst, 64)
                .icmpv4(t)
                .write(&mut icmp, &f[14..14 + 28])
                .unwrap();
            (parse(PortNo(in_port), &icmp), icmp)
        };
        let unreachable = || {
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            )
        };
        let frag_needed = || {
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            )
        };
        // From the connection's other end, back to its sender: related.
        let (k, fr) = error(B, A, unreachable(), 2);
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &fr), TRK | REL | RPL);
        // A third party naming someone else's connection: forged.
        let (k, fr) = error(C, A, unreachable(), 3);
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &fr), TRK | INV);
        // Sent to the wrong end (not back to the embedded packet's sender).
        let (k, fr) = error(A, B, unreachable(), 1);
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &fr), TRK | INV);
        // A router's error from a third party: only through a trusted port.
        let (k, fr) = error(C, A, frag_needed(), 7);
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &fr), TRK | INV);
        ct.set_trusted_error_ports(vec![PortNo(7)]);
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &fr), TRK | REL | RPL);
        let (k, fr) = error(C, A, unreachable(), 7);
        assert_eq!(
            ct.lookup(Time::ZERO, 0, &k, &fr),
            TRK | INV,
            "only the errors routers send"
        );
    }

    #[test]
    fn flushing_an_address_drops_its_connections_in_every_zone() {
        let ct = Conntrack::new(CtConfig::default());
        for zone in [0, 1] {
            let (syn, f) = tcp(A, B, 1000, 80, "S");
            ct.commit(Time::ZERO, zone, &syn, f.len()).unwrap();
        }
        let (other, f) = udp(A, [10, 0, 0, 9], 1, 2);
        ct.commit(Time::ZERO, 0, &other, f.len()).unwrap();
        assert_eq!(ct.flush_addresses(&[crate::key::ip_to_wide(B.into())]), 2);
        assert_eq!(ct.len(), 1);
        let (ack, f) = tcp(A, B, 1000, 80, "A");
        assert_eq!(ct.lookup(Time::ZERO, 0, &ack, &f), TRK | INV, "gone");
    }

    /// A million short connections opened and closed, on a virtual clock,
    /// swept as packet threads sweep: the table and its expiry wheel stay
    /// bounded (flat), they do not grow with the number of connections seen.
    #[test]
    fn a_million_open_close_cycles_leave_memory_flat() {
        let ct = Conntrack::new(CtConfig {
            max_entries: 1 << 20,
            ..CtConfig::default()
        });
        let per_tick = 1000; // 10k connections a second at 10 ticks a second
        let mut now = Time::from_secs(1);
        let mut sizes = Vec::new();
        // Keys built from templates (the frame is only read for ICMP errors).
        let flags = ["S", "SA", "A", "FA", "FA"].map(|f| tcp(A, B, 1, 80, f).0);
        for tick in 0..1000u32 {
            for i in 0..per_tick {
                let n = tick * per_tick + i;
                let src = crate::key::ip_to_wide(std::net::IpAddr::from([
                    10,
                    1,
                    (n >> 8) as u8,
                    n as u8,
                ]));
                let sport = (n >> 16) as u16 + 1024;
                for (step, template) in flags.iter().enumerate() {
                    let mut k = *template;
                    let from_client = step != 1 && step != 4;
                    if from_client {
                        (k.nw_src, k.tp_src) = (src, sport);
                    } else {
                        (k.nw_src, k.nw_dst, k.tp_src, k.tp_dst) = (k.nw_dst, src, 80, sport);
                    }
                    ct.lookup(now, 0, &k, &[]);
                    if step == 0 {
                        ct.commit(now, 0, &k, 60).unwrap();
                    }
                }
            }
            now = now + SWEEP_INTERVAL;
            ct.sweep(now, SWEEP_BUDGET);
            if tick % 100 == 99 {
                sizes.push((ct.len(), ct.wheel_len()));
            }
        }
        // TIME_WAIT lasts 30 s: at 10k a second, ~300k live, whatever the total.
        let (len, wheel) = *sizes.last().unwrap();
        assert!(len <= 310_000 && wheel <= 2 * 310_000, "{sizes:?}");
        let (mid_len, mid_wheel) = sizes[4];
        assert!(
            len <= mid_len + mid_len / 20 && wheel <= mid_wheel + mid_wheel / 10,
            "flat after the first 30 s: {sizes:?}"
        );
    }

    #[test]
    fn a_pod_and_its_namespace_are_held_to_their_limits() {
        let ct = Conntrack::new(CtConfig::default());
        let ns = std::sync::Arc::new(Owner::new("t".into(), 3, None));
        let pod = |name: &str| std::sync::Arc::new(Owner::new(name.into(), 2, Some(ns.clone())));
        let (a, c) = (pod("t/a"), pod("t/c"));
        let wide = |ip: [u8; 4]| crate::key::ip_to_wide(ip.into());
        const C: [u8; 4] = [10, 0, 0, 3];
        ct.set_owners([(wide(A), a.clone()), (wide(C), c.clone())].into());
        let open = |src, port| ct.commit(Time::ZERO, 0, &udp(src, B, port, 53).0, 60);
        assert_eq!(open(A, 1), Ok(()));
        assert_eq!(open(A, 2), Ok(()));
        assert_eq!(open(A, 3), Err(CtRefused::OverLimit), "the pod's limit");
        assert_eq!(open(C, 1), Ok(()));
        assert_eq!(
            open(C, 2),
            Err(CtRefused::OverLimit),
            "the namespace's limit"
        );
        assert_eq!(open(B, 9), Ok(()), "others are not held to t's limits");
        assert_eq!((a.count(), c.count(), ns.count()), (2, 1, 3));
        assert_eq!(a.refused.load(Relaxed), 1);
        // Connections going give their room back.
        assert_eq!(ct.flush_addresses(&[wide(A)]), 2);
        assert_eq!((a.count(), ns.count()), (0, 1));
        assert_eq!(open(C, 2), Ok(()));
        // Existing connections keep working at the limit.
        let (reply, f) = udp(B, A, 53, 1);
        let _ = (reply, f);
        assert_eq!(ct.sweep_all(Time::from_secs(100)), 3);
        assert_eq!(ns.count(), 0);
    }

    #[test]
    fn saved_connections_survive_into_a_new_table() {
        let ct = Conntrack::new(CtConfig::default());
        let t0 = Time::from_secs(100);
        let (syn, f) = tcp(A, B, 1000, 80, "S");
        ct.lookup(t0, 1, &syn, &f);
        ct.commit_marked(t0, 1, &syn, f.len(), Some(1)).unwrap();
        let (synack, f2) = tcp(B, A, 80, 1000, "SA");
        assert_eq!(ct.lookup(t0, 1, &synack, &f2), TRK | EST | RPL);
        let saved = ct.export(t0);
        assert_eq!(saved.len(), 1);
        // Another process: its clock starts elsewhere.
        let ct2 = Conntrack::new(CtConfig::default());
        let t1 = Time::from_secs(5);
        assert_eq!(ct2.import(t1, saved.clone()), 1);
        assert_eq!(ct2.import(t1, saved), 0, "already there");
        let (ack, f3) = tcp(A, B, 1000, 80, "A");
        assert_eq!(ct2.lookup_marked(t1, 1, &ack, &f3), (TRK | EST, 1));
        let (back, f5) = tcp(B, A, 80, 1000, "A");
        assert_eq!(ct2.lookup(t1, 1, &back, &f5), TRK | EST | RPL);
        // It expires as it would have.
        let (_, f4) = tcp(A, B, 1000, 80, "A");
        assert_eq!(ct2.sweep_all(t1 + Duration::from_secs(86_400 * 6)), 1);
        assert_eq!(
            ct2.lookup(t1 + Duration::from_secs(86_400 * 6), 1, &ack, &f4),
            TRK | INV
        );
    }

    #[test]
    fn echo_reply_matches_its_request() {
        let echo = |src, dst, reply: bool, id: u16| {
            let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, dst, 64);
            let b = if reply {
                b.icmpv4_echo_reply(id, 1)
            } else {
                b.icmpv4_echo_request(id, 1)
            };
            let mut f = Vec::new();
            b.write(&mut f, &[0; 8]).unwrap();
            (parse(PortNo(1), &f), f)
        };
        let ct = Conntrack::new(CtConfig::default());
        let (req, f) = echo(A, B, false, 7);
        assert_eq!(ct.lookup(Time::ZERO, 0, &req, &f), TRK | NEW);
        ct.commit(Time::ZERO, 0, &req, f.len()).unwrap();
        let (rep, f2) = echo(B, A, true, 7);
        assert_eq!(ct.lookup(Time::ZERO, 0, &rep, &f2), TRK | EST | RPL);
        let (other, f3) = echo(B, A, true, 8);
        assert_eq!(
            ct.lookup(Time::ZERO, 0, &other, &f3),
            TRK | INV,
            "a reply to no request"
        );
    }

    #[test]
    fn full_table_refuses_new_connections_only() {
        let ct = Conntrack::new(CtConfig {
            max_entries: 2,
            ..CtConfig::default()
        });
        for port in [1, 2] {
            ct.commit(Time::ZERO, 0, &udp(A, B, port, 9).0, 60).unwrap();
        }
        assert_eq!(
            ct.commit(Time::ZERO, 0, &udp(A, B, 3, 9).0, 60),
            Err(CtRefused::Full(2))
        );
        assert_eq!(
            ct.commit(Time::ZERO, 0, &udp(A, B, 1, 9).0, 60),
            Ok(()),
            "existing one"
        );
        assert_eq!(ct.stats.full_drops.load(Relaxed), 1);
        assert_eq!(ct.len(), 2);
    }

    #[test]
    fn sctp_init_opens_others_do_not() {
        let ct = Conntrack::new(CtConfig::default());
        let mut k = udp(A, B, 7, 81).0;
        k.nw_proto = ip_proto::SCTP;
        k.sctp_chunk = 0; // DATA
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &[]), TRK | INV);
        k.sctp_chunk = SCTP_INIT;
        assert_eq!(ct.lookup(Time::ZERO, 0, &k, &[]), TRK | NEW);
        ct.commit(Time::ZERO, 0, &k, 60).unwrap();
        let mut r = k;
        std::mem::swap(&mut r.nw_src, &mut r.nw_dst);
        std::mem::swap(&mut r.tp_src, &mut r.tp_dst);
        r.sctp_chunk = SCTP_INIT_ACK;
        assert_eq!(ct.lookup(Time::ZERO, 0, &r, &[]), TRK | EST | RPL);
        assert_eq!(
            ct.dump(Time::ZERO, None)[0].state,
            ConnState::SctpEstablished
        );
    }
}
