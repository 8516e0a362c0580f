#![allow(unsafe_code)] // the counting global allocator below
//! Integration tests of the datapath through its public API: a realistic pipeline,
//! cache equivalence across updates, allocation-free hot path, hostile input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use datapath::field::{Field, ct_state, ether_type, ip_proto, ipv4_mapped, ipv4_prefix_mask};
use datapath::flow::{Action, FlowEntry, TableId, Zone};
use datapath::pipeline::{Silent, xlate};
use datapath::trace::Outcome;
use datapath::{
    CtSource, Datapath, DatapathConfig, DropReason, Match, PortNo, Time, parse, parse_flow, trace,
};
use etherparse::PacketBuilder;
use proptest::prelude::*;

// ---- a counting allocator, armed per thread -------------------------------------

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(Cell::get) {
            ALLOCS.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        if ARMED.with(Cell::get) {
            ALLOCS.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn count_allocs(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    ALLOCS.with(Cell::get)
}

// ---- a small switch: two pods, policy allowing 1 -> 2 on tcp/80 -------------------

const MAC1: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC2: [u8; 6] = [2, 0, 0, 0, 0, 2];
const IP1: [u8; 4] = [10, 0, 0, 1];
const IP2: [u8; 4] = [10, 0, 0, 2];

fn flows(allow_port: u16) -> Vec<FlowEntry> {
    let f = |s: &str| parse_flow(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    vec![
        f("table=0,priority=100,in_port=1,actions=load:0x1->reg0[0..15],goto_table:10"),
        f("table=0,priority=100,in_port=2,actions=load:0x2->reg0[0..15],goto_table:10"),
        f(
            "table=10,priority=100,ip,in_port=1,dl_src=02:00:00:00:00:01,nw_src=10.0.0.1,actions=goto_table:20",
        ),
        f(
            "table=10,priority=100,ip,in_port=2,dl_src=02:00:00:00:00:02,nw_src=10.0.0.2,actions=goto_table:20",
        ),
        f("table=10,priority=0,actions=drop"),
        f("table=20,priority=0,actions=ct(zone=1,table=30)"),
        f("table=30,priority=200,ip,ct_state=+inv+trk,actions=drop"),
        f("table=30,priority=190,ip,ct_state=-new+est+trk,actions=goto_table:60"),
        f("table=30,priority=0,actions=goto_table:40"),
        f("table=40,priority=0,actions=goto_table:50"),
        f(&format!(
            "cookie=0x50,table=50,priority=200,tcp,nw_src=10.0.0.1,nw_dst=10.0.0.2,tp_dst={allow_port},actions=goto_table:60"
        )),
        f("cookie=0x51,table=50,priority=100,ip,nw_dst=10.0.0.2,actions=drop"),
        f("table=50,priority=0,actions=goto_table:60"),
        f("table=60,priority=100,ip,nw_dst=10.0.0.1,actions=load:0x1->reg1[],goto_table:70"),
        f("table=60,priority=100,ip,nw_dst=10.0.0.2,actions=load:0x2->reg1[],goto_table:70"),
        f("table=70,priority=100,ip,ct_state=+new+trk,reg1=0x1,actions=ct(commit,zone=1),output:1"),
        f("table=70,priority=100,ip,ct_state=+new+trk,reg1=0x2,actions=ct(commit,zone=1),output:2"),
        f("table=70,priority=90,reg1=0x1,actions=output:1"),
        f("table=70,priority=90,reg1=0x2,actions=output:2"),
    ]
}

fn install(dp: &Datapath, flows: Vec<FlowEntry>) {
    dp.update(Time::ZERO, |t| t.apply(flows, |_| true, Time::ZERO))
        .unwrap();
}

fn tcp(from: ([u8; 6], [u8; 4], u16), to: ([u8; 6], [u8; 4], u16), flags: &str) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(from.0, to.0)
        .ipv4(from.1, to.1, 64)
        .tcp(from.2, to.2, 1, 1000);
    for c in flags.chars() {
        b = match c {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            _ => b,
        };
    }
    let mut f = Vec::new();
    b.write(&mut f, &[0; 16]).unwrap();
    f
}

#[test]
fn stateful_policy_end_to_end() {
    let dp = Datapath::new(DatapathConfig::default());
    install(&dp, flows(80));
    let mut w = dp.worker();
    w.begin_batch();
    let now = Time::from_secs(1);
    let a = (MAC1, IP1, 40000);
    let b = (MAC2, IP2, 80);

    let mut syn = tcp(a, b, "S");
    assert_eq!(w.process(now, PortNo(1), &mut syn).outputs, &[PortNo(2)]);
    let mut synack = tcp(b, a, "SA");
    assert_eq!(
        w.process(now, PortNo(2), &mut synack).outputs,
        &[PortNo(1)],
        "reply allowed"
    );
    let mut ack = tcp(a, b, "A");
    assert_eq!(w.process(now, PortNo(1), &mut ack).outputs, &[PortNo(2)]);

    // A new connection to a port the policy does not allow.
    let mut other = tcp((MAC1, IP1, 40001), (MAC2, IP2, 81), "S");
    let v = w.process(now, PortNo(1), &mut other);
    assert_eq!(v.drop, Some(DropReason::Flow));
    // Mid-stream packet with no connection: invalid.
    let mut stray = tcp((MAC1, IP1, 40002), (MAC2, IP2, 80), "A");
    assert_eq!(
        w.process(now, PortNo(1), &mut stray).drop,
        Some(DropReason::Flow)
    );
    // Spoofed source IP from port 1.
    let mut spoof = tcp((MAC1, [10, 0, 0, 9], 1), (MAC2, IP2, 80), "S");
    assert_eq!(
        w.process(now, PortNo(1), &mut spoof).drop,
        Some(DropReason::Flow)
    );
    // Garbage.
    let mut junk = vec![0xffu8; 9];
    assert_eq!(
        w.process(now, PortNo(1), &mut junk).drop,
        Some(DropReason::Malformed)
    );

    // The deny flow (cookie 0x51) was hit once; counters merge across the worker.
    w.begin_batch();
    let stats = dp.flow_stats();
    let deny = stats.iter().find(|s| s.entry.cookie.0 == 0x51).unwrap();
    assert_eq!(deny.packets, 1);
    let allow = stats.iter().find(|s| s.entry.cookie.0 == 0x50).unwrap();
    assert_eq!(
        allow.packets, 1,
        "only the SYN goes through policy; the rest is established"
    );
    assert_eq!(dp.conntrack.len(), 1);
    let s = dp.stats();
    assert_eq!(s.packets, 7);
    assert_eq!(
        s.drops
            .iter()
            .find(|(r, _)| *r == DropReason::Malformed)
            .unwrap()
            .1,
        1
    );

    // Policy change: port 81 allowed now; counters of untouched flows survive.
    install(&dp, flows(81));
    w.begin_batch();
    let mut other = tcp((MAC1, IP1, 40003), (MAC2, IP2, 81), "S");
    assert_eq!(w.process(now, PortNo(1), &mut other).outputs, &[PortNo(2)]);
    let deny = dp
        .flow_stats()
        .into_iter()
        .find(|s| s.entry.cookie.0 == 0x51)
        .unwrap();
    assert_eq!(deny.packets, 1, "counters survive republication");
}

#[test]
fn trace_explains_a_deny() {
    let dp = Datapath::new(DatapathConfig::default());
    install(&dp, flows(80));
    let frame = tcp((MAC1, IP1, 1), (MAC2, IP2, 81), "S");
    let key = parse(PortNo(1), &frame);
    let snap = dp.snapshot();
    let t = trace(
        &snap.tables,
        &key,
        CtSource::Live(&dp.conntrack, Time::ZERO),
    );
    let tables: Vec<u8> = t.steps.iter().map(|s| s.table.0).collect();
    assert_eq!(tables, vec![0, 10, 20, 30, 40, 50]);
    assert_eq!(t.ct_lookups, vec![(1, ct_state::TRK | ct_state::NEW)]);
    assert_eq!(t.deciding_flow().unwrap().cookie.0, 0x51);
    assert!(matches!(t.outcome, Outcome::Drop { by: Some(_), .. }));
    // Offline mode: assume an established connection.
    let t = trace(
        &snap.tables,
        &key,
        CtSource::Assume(ct_state::TRK | ct_state::EST),
    );
    assert_eq!(t.outcome, Outcome::Output(vec![PortNo(2)]));
}

#[test]
fn hot_path_does_not_allocate() {
    let dp = Datapath::new(DatapathConfig::default());
    install(&dp, flows(80));
    let mut w = dp.worker();
    w.begin_batch();
    let a = (MAC1, IP1, 40000);
    let b = (MAC2, IP2, 80);
    let mut frames = [
        tcp(a, b, "S"),
        tcp(b, a, "SA"),
        tcp(a, b, "A"),
        tcp(a, b, "A"),
    ];
    let mut junk = vec![0u8; 3];
    // Warm up: fills the cache and creates the connection.
    for (i, f) in frames.iter_mut().enumerate() {
        let port = if i == 1 { PortNo(2) } else { PortNo(1) };
        w.process(Time::from_secs(1), port, f);
    }
    // The counter itself must see allocations, or this test proves nothing.
    assert_eq!(
        count_allocs(|| drop(std::hint::black_box(Box::new(7u64)))),
        1
    );
    let n = count_allocs(|| {
        for round in 0..1000u64 {
            w.begin_batch();
            let now = Time::from_secs(2 + round);
            for f in frames.iter_mut().skip(2) {
                let v = w.process(now, PortNo(1), f);
                assert_eq!(v.outputs.len(), 1);
            }
            w.process(now, PortNo(1), &mut junk);
        }
    });
    assert_eq!(n, 0, "allocations on the cache-hit path");
    assert!(w.cache_stats().hits >= 2000);
}

// ---- properties ------------------------------------------------------------------

fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..3,
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
        0u8..4,
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(kind, s, d, sp, dp, flags, payload)| {
            let base = PacketBuilder::ethernet2(MAC1, MAC2).ipv4(s, d, 64);
            let mut f = Vec::new();
            match kind {
                0 => {
                    let mut t = base.tcp(sp, dp, 1, 100);
                    if flags & 1 != 0 {
                        t = t.syn();
                    }
                    if flags & 2 != 0 {
                        t = t.ack(1);
                    }
                    t.write(&mut f, &payload).unwrap()
                }
                1 => base.udp(sp, dp).write(&mut f, &payload).unwrap(),
                _ => base
                    .icmpv4_echo_request(sp, dp)
                    .write(&mut f, &payload)
                    .unwrap(),
            }
            f
        })
}

/// A random policy table in the range the test frames hit.
fn arb_policy() -> impl Strategy<Value = Vec<FlowEntry>> {
    prop::collection::vec(
        (0u8..4, 0u8..32, any::<u16>(), 1u16..300, any::<bool>()),
        0..30,
    )
    .prop_map(|rules| {
        rules
            .into_iter()
            .map(|(octet, len, port, prio, allow)| {
                let m = Match::any()
                    .with(Field::DlType, ether_type::IPV4.into())
                    .with(Field::NwProto, ip_proto::TCP.into())
                    .with_masked(
                        Field::NwDst,
                        ipv4_mapped([octet, 0, 0, 0].into()),
                        ipv4_prefix_mask(len.min(8)),
                    )
                    .with_masked(Field::TpDst, u128::from(port), 0xff00);
                let e = FlowEntry::new(50, prio, m);
                if allow {
                    e.action(Action::GotoTable(TableId(60)))
                } else {
                    e
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), port in 0u32..4) {
        let dp = Datapath::new(DatapathConfig::default());
        install(&dp, flows(80));
        let mut w = dp.worker();
        w.begin_batch();
        let mut b = bytes.clone();
        let _ = w.process(Time::ZERO, PortNo(port), &mut b);
        let _ = parse(PortNo(port), &bytes);
    }

    #[test]
    fn cached_equals_uncached_across_updates(
        policies in prop::collection::vec(arb_policy(), 1..4),
        frames in prop::collection::vec(arb_frame(), 1..40),
    ) {
        let dp = Datapath::new(DatapathConfig { cache_entries: 64, ..DatapathConfig::default() });
        let mut w = dp.worker();
        for policy in policies {
            let mut all = flows(80);
            all.retain(|f| f.table.0 != 50);
            all.push(FlowEntry::new(50, 0, Match::any()));
            all.extend(policy);
            install(&dp, all);
            w.begin_batch();
            let snap = dp.snapshot();
            for frame in &frames {
                // Twice: the second run is a cache hit.
                for _ in 0..2 {
                    let mut f = frame.clone();
                    let key = parse(PortNo(1), &f);
                    let state = dp.conntrack.peek(Time::ZERO, 1, &key);
                    let cached: Vec<PortNo> = w.process(Time::ZERO, PortNo(1), &mut f).outputs.to_vec();
                    let fresh = trace(&snap.tables, &key, CtSource::Assume(state));
                    let expected = match fresh.outcome {
                        Outcome::Output(p) => p,
                        _ => vec![],
                    };
                    prop_assert_eq!(cached, expected);
                }
            }
            dp.conntrack.flush();
        }
    }

    #[test]
    fn ofctl_round_trips(
        table in 0u8..200, prio in any::<u16>(), port in any::<u16>(), mask in any::<u16>(),
        a in any::<[u8; 4]>(), len in 0u8..=32, reg in 0u8..8, v in any::<u32>(),
        state in any::<u8>(), out in 0u32..100,
    ) {
        let m = Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with(Field::NwProto, ip_proto::UDP.into())
            .with_masked(Field::NwSrc, ipv4_mapped(a.into()), ipv4_prefix_mask(len))
            .with_masked(Field::TpDst, port.into(), mask.into())
            .with_masked(Field::CtState, state.into(), 0x3f)
            .with(Field::Reg(reg), v.into());
        let f = FlowEntry::new(table, prio, m)
            .cookie(u64::from(v))
            .action(Action::Load { field: Field::Reg(reg), value: u128::from(v), ofs: 0, nbits: 32 })
            .action(Action::Ct { commit: true, zone: Zone::Reg(reg), table: None, mark: Some(reg), nat: None })
            .action(Action::Output(PortNo(out)))
            .action(Action::GotoTable(TableId(table + 1)));
        let text = f.to_string();
        let back = parse_flow(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(back, f);
    }

    #[test]
    fn parsed_fields_match_what_was_built(f in arb_frame()) {
        let k = parse(PortNo(1), &f);
        prop_assert!(k.flags.is_clean());
        prop_assert_eq!(k.dl_src, MAC1);
        prop_assert_eq!(k.dl_type, ether_type::IPV4);
        prop_assert_eq!(&k.nw_src[..12], &[0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff][..]);
        prop_assert_eq!(&k.nw_src[12..], &f[26..30]);
    }
}

#[test]
fn xlate_is_deterministic_for_cache() {
    let dp = Datapath::new(DatapathConfig::default());
    install(&dp, flows(80));
    let snap = dp.snapshot();
    let key = parse(PortNo(1), &tcp((MAC1, IP1, 1), (MAC2, IP2, 80), "S")).to_match_key();
    let (mut k1, mut k2) = (key, key);
    let a = xlate(&snap.tables, &mut k1, TableId(0), &mut Silent);
    let b = xlate(&snap.tables, &mut k2, TableId(0), &mut Silent);
    assert_eq!(a, b);
    assert_eq!(k1, k2);
    let _ = Arc::strong_count(&snap);
}
