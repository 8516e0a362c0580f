//! Datapath benchmarks. Run: `cargo bench -p datapath --bench datapath`.
//! Figures and the machine they ran on go to BENCHMARKS.md.

use std::hint::black_box;

use datapath::conntrack::{Conntrack, CtConfig};
use datapath::field::{Field, ether_type, ip_proto, ipv4_mapped, ipv4_prefix_mask};
use datapath::flow::{Action, FlowEntry, TableId};
use datapath::{Datapath, DatapathConfig, FlowTables, Match, PortNo, Time, parse, parse_flow};
use divan::{Bencher, counter::ItemsCount};
use etherparse::PacketBuilder;

fn main() {
    divan::main();
}

const BATCH: usize = 1024;

fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut f, &[0; 18])
        .unwrap();
    f
}

/// A stateless 6-table L2/L3 pipeline (classifier, spoofguard, policy, forwarding).
fn simple_pipeline() -> Vec<FlowEntry> {
    [
        "table=0,priority=100,in_port=1,actions=load:0x1->reg0[0..15],goto_table:10",
        "table=10,priority=100,ip,in_port=1,dl_src=02:00:00:00:00:01,nw_src=10.0.0.1,actions=goto_table:40",
        "table=10,priority=0,actions=drop",
        "table=40,priority=0,actions=goto_table:50",
        "cookie=0x50,table=50,priority=200,udp,nw_dst=10.0.0.2,tp_dst=0x1000/0xf000,actions=goto_table:60",
        // Another pod's DNS: it puts the whole destination port in UDP's
        // cache mask, so the 1,024 flows below are 1,024 cache entries.
        "cookie=0x51,table=50,priority=100,udp,nw_dst=10.0.0.3,tp_dst=53,actions=goto_table:60",
        "table=50,priority=0,actions=drop",
        "table=60,priority=100,ip,nw_dst=10.0.0.2,actions=load:0x2->reg1[],goto_table:70",
        "table=70,priority=90,reg1=0x2,actions=output:2",
    ]
    .iter()
    .map(|s| parse_flow(s).unwrap())
    .collect()
}

/// Runs 1,024 UDP flows (all forwarded to port 2) through `flows` once to fill the
/// cache, then measures the cache-hit path over them; `change` runs before
/// every batch.
fn cache_hits_with(bencher: Bencher, flows: Vec<FlowEntry>, change: Option<fn(&Datapath, u32)>) {
    let dp = Datapath::new(DatapathConfig::default());
    dp.update(Time::ZERO, |t| t.apply(flows, |_| true, Time::ZERO))
        .unwrap();
    let mut w = dp.worker();
    w.begin_batch();
    let mut frames: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| {
            udp_frame(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                10_000 + i as u16,
                // 1,024 destination ports: 1,024 cache entries (the source
                // port is in no flow, so not in the cache key).
                0x1000 + i as u16,
            )
        })
        .collect();
    for f in frames.iter_mut() {
        assert_eq!(w.process(Time::ZERO, PortNo(1), f).outputs, &[PortNo(2)]);
    }
    let mut n = 0u32;
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        if let Some(change) = &change {
            n += 1;
            change(&dp, n);
        }
        w.begin_batch();
        for f in frames.iter_mut() {
            black_box(w.process(Time(1), PortNo(1), f).outputs.len());
        }
    });
}

/// A flow for another pod's destination, added on odd calls and removed on
/// even ones: a published change no cached translation here depends on (of
/// a shape the tables have already, so the cache masks stay).
fn change_elsewhere(dp: &Datapath, n: u32) {
    let f =
        parse_flow("cookie=0x99,table=50,priority=300,udp,nw_dst=10.0.0.99,tp_dst=53,actions=drop")
            .unwrap();
    dp.update(Time::ZERO, |t| {
        if n % 2 == 1 {
            t.add(f, Time::ZERO).map(|_| ())
        } else {
            t.remove(&f.identity());
            Ok(())
        }
    })
    .unwrap();
}

fn cache_hits(bencher: Bencher, flows: Vec<FlowEntry>) {
    cache_hits_with(bencher, flows, None);
}

/// Cache-hit path: parse + cache lookup + actions + counters, over a working set of
/// 1024 flows that all stay in the cache.
#[divan::bench]
fn cache_hit(bencher: Bencher) {
    cache_hits(bencher, simple_pipeline());
}

/// The same with a table change elsewhere published before every batch of
/// 1,024 packets (its cost included): cached translations are revalidated
/// instead of run through the tables again.
#[divan::bench]
fn cache_hit_with_a_change_per_batch(bencher: Bencher) {
    cache_hits_with(bencher, simple_pipeline(), Some(change_elsewhere));
}

/// What `cache_hit_with_a_change_per_batch` spends publishing: the change
/// alone (a copy of the table set, its cache masks, the swap).
#[divan::bench]
fn publish_a_change(bencher: Bencher) {
    let dp = Datapath::new(DatapathConfig::default());
    dp.update(Time::ZERO, |t| {
        t.apply(simple_pipeline(), |_| true, Time::ZERO)
    })
    .unwrap();
    let mut n = 0u32;
    bencher.bench_local(|| {
        n += 1;
        change_elsewhere(&dp, n);
    });
}

/// Cache-hit path through the stateful pipeline: one conntrack lookup per packet.
#[divan::bench]
fn cache_hit_with_conntrack(bencher: Bencher) {
    let mut flows = simple_pipeline();
    flows.retain(|f| f.table.0 != 40 && f.table.0 != 70);
    for f in [
        "table=40,priority=0,actions=ct(zone=1,table=45)",
        "table=45,priority=100,ip,ct_state=+est+trk,actions=goto_table:60",
        "table=45,priority=0,actions=goto_table:50",
        "table=70,priority=100,ip,ct_state=+new+trk,actions=ct(commit,zone=1),output:2",
        "table=70,priority=90,reg1=0x2,actions=output:2",
    ] {
        flows.push(parse_flow(f).unwrap());
    }
    cache_hits(bencher, flows);
}

/// Cache-hit path of connections through a Service: the same stateful
/// pipeline with the 1,024 flows addressed to a ClusterIP, translated by a
/// select group at their first packet; each measured packet is looked up
/// (`ct(nat)`), rewritten to its backend (checksums kept) and forwarded.
#[divan::bench]
fn cache_hit_through_a_service(bencher: Bencher) {
    let dp = Datapath::new(DatapathConfig::default());
    let group = datapath::group::parse_group(
        "group_id=1,type=select,bucket=bucket_id:1,actions=ct(nat(dst=10.0.0.2))",
    )
    .unwrap();
    let flows: Vec<FlowEntry> = [
        "table=0,priority=100,in_port=1,actions=load:0x1->reg0[0..15],goto_table:10",
        "table=10,priority=100,ip,in_port=1,dl_src=02:00:00:00:00:01,nw_src=10.0.0.1,actions=goto_table:30",
        "table=30,priority=100,ip,ct_state=-trk,actions=ct(zone=1,nat,table=30)",
        "table=30,priority=90,ip,ct_state=+est+trk,actions=goto_table:60",
        "table=30,priority=80,udp,ct_state=+new+trk,nw_dst=10.0.0.9,actions=group:1,goto_table:50",
        "cookie=0x50,table=50,priority=200,udp,nw_dst=10.0.0.2,tp_dst=0x1000/0xf000,actions=goto_table:60",
        "table=60,priority=100,ip,nw_dst=10.0.0.2,actions=load:0x2->reg1[],goto_table:70",
        "table=70,priority=100,ip,ct_state=+new+trk,actions=ct(commit,zone=1),output:2",
        "table=70,priority=90,reg1=0x2,actions=output:2",
    ]
    .iter()
    .map(|s| parse_flow(s).unwrap())
    .collect();
    dp.update(Time::ZERO, |t| {
        t.add_group(group)?;
        t.apply(flows, |_| true, Time::ZERO).map(|_| ())
    })
    .unwrap();
    let mut w = dp.worker();
    w.begin_batch();
    let frames: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| {
            udp_frame(
                [10, 0, 0, 1],
                [10, 0, 0, 9],
                10_000 + i as u16,
                0x1000 + (i as u16 & 0xff),
            )
        })
        .collect();
    for f in frames.clone().iter_mut() {
        assert_eq!(w.process(Time::ZERO, PortNo(1), f).outputs, &[PortNo(2)]);
    }
    // Each measured packet arrives addressed to the ClusterIP again.
    let mut work = frames.clone();
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        w.begin_batch();
        for (f, orig) in work.iter_mut().zip(&frames) {
            f.copy_from_slice(orig);
            black_box(w.process(Time(1), PortNo(1), f).outputs.len());
        }
    });
}

/// 10,000 flows over 50 distinct masks in a 6-table pipeline (tables 0, 10, 20, 30,
/// 40, 50), each table ending in a catch-all that goes to the next. With `spread`,
/// the 50 masks are divided among the tables (8 or 9 each); without, every table
/// holds all 50 (the worst case for tuple space search).
fn big_pipeline_with(spread: bool) -> Vec<FlowEntry> {
    let tables = [0u8, 10, 20, 30, 40, 50];
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut n = 0u32;
    for (ti, &t) in tables.iter().enumerate() {
        let next = tables.get(ti + 1).copied();
        let catch_all = FlowEntry::new(t, 0, Match::any());
        out.push(match next {
            Some(nt) => catch_all.action(Action::GotoTable(TableId(nt))),
            None => catch_all.action(Action::Output(PortNo(2))),
        });
        // ~1667 flows per table; 50 masks overall: prefix lengths 8..=32 (25), with
        // and without an exact tp_dst.
        let mut added = 0;
        for i in 0u32..1_000_000 {
            if added == 1667 {
                break;
            }
            let mask_no = if spread {
                // Every sixth mask: table ti gets ti, ti+6, ti+12, ... (8 or 9 masks).
                let k = (n as usize) % 9;
                let m = ti + 6 * k;
                (if m < 50 { m } else { ti }) as u8
            } else {
                (n % 50) as u8
            };
            n += 1;
            let len = 8 + (mask_no % 25);
            let with_port = mask_no >= 25;
            let addr = ipv4_mapped(std::net::Ipv4Addr::from(
                0x0a00_0000 | (i.wrapping_mul(2_654_435_761) >> 8),
            ));
            let mut m = Match::any()
                .with(Field::DlType, ether_type::IPV4.into())
                .with(Field::NwProto, ip_proto::UDP.into())
                .with_masked(Field::NwDst, addr, ipv4_prefix_mask(len));
            if with_port {
                m.set(Field::TpDst, u128::from(1000 + (i % 1000) as u16));
            }
            let prio = 100 + u16::from(len) * 4 + u16::from(with_port);
            if !seen.insert((t, prio, m)) {
                continue;
            }
            added += 1;
            let f = FlowEntry::new(t, prio, m);
            out.push(match next {
                Some(nt) => f.action(Action::GotoTable(TableId(nt))),
                None => f.action(Action::Output(PortNo(3))),
            });
        }
    }
    out
}

/// Miss path: every packet misses a 4-entry cache and runs the 6-table pipeline,
/// all 50 masks in every table.
#[divan::bench]
fn miss_6_tables_10k_flows_50_masks(bencher: Bencher) {
    miss_path(bencher, big_pipeline_with(false));
}

/// The same with the 50 masks spread over the 6 tables.
#[divan::bench]
fn miss_6_tables_10k_flows_50_masks_spread(bencher: Bencher) {
    miss_path(bencher, big_pipeline_with(true));
}

fn miss_path(bencher: Bencher, flows: Vec<FlowEntry>) {
    let dp = Datapath::new(DatapathConfig {
        cache_entries: 4,
        ..DatapathConfig::default()
    });
    dp.update(Time::ZERO, |t| t.apply(flows, |_| true, Time::ZERO))
        .unwrap();
    let snap = dp.snapshot();
    let masks: usize = [0u8, 10, 20, 30, 40, 50]
        .iter()
        .map(|t| snap.tables.classifier(TableId(*t)).n_masks())
        .sum();
    assert!(snap.tables.len() >= 10_000, "{} flows", snap.tables.len());
    let distinct: std::collections::HashSet<_> = snap
        .tables
        .iter()
        .map(|(_, f)| *f.entry.matcher.mask())
        .collect();
    assert!(distinct.len() >= 50, "{} distinct masks", distinct.len());
    assert!(masks >= 50, "{masks} masks");
    let mut w = dp.worker();
    w.begin_batch();
    let mut frames: Vec<Vec<u8>> = (0..BATCH as u32)
        .map(|i| {
            let d = (0x0a00_0000 | (i.wrapping_mul(2_654_435_761) >> 8)).to_be_bytes();
            udp_frame([10, 0, 0, 1], d, 5000 + i as u16, 1000 + (i % 1000) as u16)
        })
        .collect();
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        w.begin_batch();
        for f in frames.iter_mut() {
            black_box(w.process(Time(1), PortNo(1), f).outputs.len());
        }
    });
    assert!(w.cache_stats().misses > w.cache_stats().hits * 10);
}

fn conntrack_1m() -> (Conntrack, impl Fn(u32) -> datapath::FlowKey) {
    const N: u32 = 1_000_000;
    let ct = Conntrack::new(CtConfig {
        max_entries: N as usize,
        ..CtConfig::default()
    });
    let key_of = |i: u32| {
        let f = udp_frame(
            [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            [10, 200, 0, 1],
            (i % 50_000) as u16 + 1024,
            53,
        );
        parse(PortNo(1), &f)
    };
    for i in 0..N {
        ct.commit(Time::ZERO, 0, &key_of(i), 60).unwrap();
    }
    assert_eq!(ct.len(), N as usize);
    (ct, key_of)
}

/// `n` keys of the million connections, in a scattered order.
fn random_probes(key_of: &impl Fn(u32) -> datapath::FlowKey, n: usize) -> Vec<datapath::FlowKey> {
    (0..n as u32)
        .map(|i| key_of(i.wrapping_mul(2_654_435_761) % 1_000_000))
        .collect()
}

/// Lookup of existing connections among 1,000,000 entries: 1,024 random ones,
/// revisited (their entries stay in the CPU caches).
#[divan::bench(sample_count = 50)]
fn conntrack_lookup_1m_warm(bencher: Bencher) {
    let (ct, key_of) = conntrack_1m();
    let probes = random_probes(&key_of, BATCH);
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for k in &probes {
            black_box(ct.lookup(Time(1), 0, k, &[]));
        }
    });
}

/// The warm lookups with the prefetch pass in front (groups of 32): the CPU
/// cost of prefetching, with nothing left to wait for.
#[divan::bench(sample_count = 50)]
fn conntrack_lookup_1m_warm_prefetched(bencher: Bencher) {
    let (ct, key_of) = conntrack_1m();
    let probes = random_probes(&key_of, BATCH);
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for group in probes.chunks(32) {
            ct.prefetch(group);
            for k in group {
                black_box(ct.lookup(Time(1), 0, k, &[]));
            }
        }
    });
}

/// The same over 262,144 random connections, each batch of 1,024 a new slice:
/// most lookups miss the CPU caches.
#[divan::bench(sample_count = 50)]
fn conntrack_lookup_1m_cold(bencher: Bencher) {
    let (ct, key_of) = conntrack_1m();
    let probes = random_probes(&key_of, 262_144);
    let mut at = 0;
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for k in &probes[at..at + BATCH] {
            black_box(ct.lookup(Time(1), 0, k, &[]));
        }
        at = (at + BATCH) % probes.len();
    });
}

/// The cold lookups in groups of 32 (a burst of frames read from ports), each
/// group prefetched before it is looked up: the group's memory loads overlap.
#[divan::bench(sample_count = 50)]
fn conntrack_lookup_1m_cold_prefetched(bencher: Bencher) {
    const GROUP: usize = 32;
    let (ct, key_of) = conntrack_1m();
    let probes = random_probes(&key_of, 262_144);
    let mut at = 0;
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for group in probes[at..at + BATCH].chunks(GROUP) {
            ct.prefetch(group);
            for k in group {
                black_box(ct.lookup(Time(1), 0, k, &[]));
            }
        }
        at = (at + BATCH) % probes.len();
    });
}

/// The cold lookups software-pipelined: while one group of 32 is looked up,
/// the next is already prefetched (the deepest overlap a stream of bursts
/// allows).
#[divan::bench(sample_count = 50)]
fn conntrack_lookup_1m_cold_pipelined(bencher: Bencher) {
    const GROUP: usize = 32;
    let (ct, key_of) = conntrack_1m();
    let probes = random_probes(&key_of, 262_144);
    let mut at = 0;
    ct.prefetch(&probes[..GROUP]);
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for g in (at..at + BATCH).step_by(GROUP) {
            let next = (g + GROUP) % probes.len();
            ct.prefetch(&probes[next..next + GROUP]);
            for k in &probes[g..g + GROUP] {
                black_box(ct.lookup(Time(1), 0, k, &[]));
            }
        }
        at = (at + BATCH) % probes.len();
    });
}

/// The life of 1,024 short connections among ~10,000 others: the first
/// packet looked up (new) and committed, the reply looked up, and every
/// iteration 100 ms later than the last with the sweep reclaiming what has
/// expired (1 s timeouts), so the table stays the same size. What a
/// connection-per-request workload costs conntrack, per connection.
#[divan::bench(sample_count = 50)]
fn conntrack_connection_lifecycle(bencher: Bencher) {
    const POOL: u32 = 262_144;
    let s = std::time::Duration::from_secs;
    let ct = Conntrack::new(CtConfig {
        max_entries: 1_000_000,
        udp_first: s(1),
        udp_replied: s(1),
        ..CtConfig::default()
    });
    let (client, server) = ([10, 1, 0, 0], [10, 200, 0, 1]);
    let ends = |i: u32| {
        let mut c = client;
        c[2] = (i >> 16) as u8;
        c[3] = (i >> 8) as u8;
        (c, (i % 256) as u16 + 1024)
    };
    let request: Vec<_> = (0..POOL)
        .map(|i| {
            let (c, port) = ends(i);
            let f = udp_frame(c, server, port, 53);
            (parse(PortNo(1), &f), f.len())
        })
        .collect();
    let reply: Vec<_> = (0..POOL)
        .map(|i| {
            let (c, port) = ends(i);
            parse(PortNo(2), &udp_frame(server, c, 53, port))
        })
        .collect();
    let mut now = Time::from_secs(1);
    let mut at = 0;
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for i in at..at + BATCH {
            let (k, len) = &request[i];
            black_box(ct.lookup(now, 0, k, &[]));
            ct.commit(now, 0, k, *len).unwrap();
            black_box(ct.lookup(now, 0, &reply[i], &[]));
        }
        now = now + std::time::Duration::from_millis(100);
        ct.sweep(now, usize::MAX);
        at = (at + BATCH) % POOL as usize;
    });
    assert!(ct.len() < 20 * BATCH, "{} live connections", ct.len());
}

/// Inserting 10,000 distinct flows (10 masks) into an empty table set, then
/// removing them.
#[divan::bench(sample_count = 20)]
fn classifier_insert_remove_10k(bencher: Bencher) {
    let flows: Vec<FlowEntry> = (0..10_000u32)
        .map(|i| {
            let len = 23 + (i % 10) as u8;
            let m = Match::any()
                .with(Field::DlType, ether_type::IPV4.into())
                .with(Field::NwProto, ip_proto::TCP.into())
                .with_masked(
                    Field::NwDst,
                    ipv4_mapped((0x0a00_0000 | (i << 8)).into()),
                    ipv4_prefix_mask(len),
                );
            FlowEntry::new(40, i as u16, m).action(Action::GotoTable(TableId(50)))
        })
        .collect();
    bencher
        .counter(ItemsCount::new(flows.len()))
        .bench_local(|| {
            let mut t = FlowTables::new();
            for f in &flows {
                t.add(f.clone(), Time::ZERO).unwrap();
            }
            assert_eq!(t.len(), 10_000);
            for f in &flows {
                assert!(t.remove(&f.identity()));
            }
            black_box(t.len());
        });
}

/// Parsing alone (part of every packet's cost).
#[divan::bench]
fn parse_only(bencher: Bencher) {
    let frames: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| udp_frame([10, 0, 0, 1], [10, 0, 0, 2], 10_000 + i as u16, 0x1000))
        .collect();
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for f in &frames {
            black_box(parse(PortNo(1), f));
        }
    });
}

/// Parsing and packing into classifier words.
#[divan::bench]
fn parse_and_pack(bencher: Bencher) {
    let frames: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| udp_frame([10, 0, 0, 1], [10, 0, 0, 2], 10_000 + i as u16, 0x1000))
        .collect();
    let cache = datapath::MicroflowCache::new(16);
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        for f in &frames {
            let k = parse(PortNo(1), f).to_match_key();
            black_box(cache.hash(&datapath::cache::CacheKey {
                key: k,
                stage: TableId(0),
                narrow: 0,
            }));
        }
    });
}
