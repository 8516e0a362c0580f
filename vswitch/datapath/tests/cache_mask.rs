//! The microflow cache keys translations by the key under the tables' cache
//! mask, and keeps them across table changes that cannot affect them. These
//! tests hold it to its promises: two keys equal under the mask translate
//! identically (whatever the flows match and the actions read); a translation
//! revalidated after changes is the one the new tables give; and a new
//! connection's packets reuse the translation of the one before.

use datapath::consulted::Consulted;
use datapath::field::{Field, ether_type, ip_proto};
use datapath::flow::{Action, FlowEntry, TableId};
use datapath::group::{Bucket, Group, Selection};
use datapath::pipeline::{Silent, xlate};
use datapath::{
    Datapath, DatapathConfig, FlowTables, Match, MatchKey, PortNo, Snapshot, Time, parse_flow,
};
use etherparse::PacketBuilder;
use proptest::prelude::*;
use smallvec::smallvec;

/// What a random flow pins: its `dl_type` and `nw_proto`, and the fields it
/// may match on besides (their prerequisites met).
fn class(l3: u8) -> (Match, &'static [Field]) {
    let ipv4 = Match::any().with(Field::DlType, ether_type::IPV4.into());
    match l3 {
        0 => (
            ipv4.with(Field::NwProto, ip_proto::TCP.into()),
            &[
                Field::InPort,
                Field::NwSrc,
                Field::NwDst,
                Field::TpSrc,
                Field::TpDst,
                Field::TcpFlags,
                Field::Reg(2),
            ],
        ),
        1 => (
            ipv4.with(Field::NwProto, ip_proto::UDP.into()),
            &[
                Field::InPort,
                Field::NwSrc,
                Field::TpSrc,
                Field::TpDst,
                Field::Reg(2),
            ],
        ),
        2 => (
            ipv4,
            &[Field::InPort, Field::NwSrc, Field::NwDst, Field::Reg(2)],
        ),
        3 => (
            Match::any().with(Field::DlType, ether_type::ARP.into()),
            &[Field::InPort, Field::NwSrc, Field::NwDst, Field::NwProto],
        ),
        // ARP replies only (after a responder rewrote a request, too).
        4 => (
            Match::any()
                .with(Field::DlType, ether_type::ARP.into())
                .with(Field::NwProto, 2),
            &[Field::InPort, Field::NwSrc, Field::NwDst],
        ),
        _ => (Match::any(), &[Field::InPort, Field::DlSrc, Field::Reg(2)]),
    }
}

/// One random flow: table 0..3, a class, a match on up to two of its fields
/// (value and mask drawn from the key's low bits so that random keys hit
/// it), and one action of every kind that reads the key (or, in ARP flows,
/// rewrites nw_proto as an ARP responder does).
fn arb_flow() -> impl Strategy<Value = FlowEntry> {
    (
        0u8..3,
        1u16..100,
        0u8..6,
        prop::collection::vec((0usize..8, any::<u8>(), 0u8..4), 0..3),
        0u8..11,
    )
        .prop_map(|(table, prio, l3, matches, action)| {
            let (mut m, fields) = class(l3);
            for (f, v, mask) in matches {
                let f = fields[f % fields.len()];
                m = m.with_masked(f, u128::from(v & mask), u128::from(mask));
            }
            let e = FlowEntry::new(table, prio, m);
            let next = |e: FlowEntry| {
                if table < 2 {
                    e.action(Action::GotoTable(TableId(table + 1)))
                } else {
                    e
                }
            };
            match action {
                0 => e.action(Action::Output(PortNo(u32::from(prio)))),
                1 => e.action(Action::Output(PortNo::IN_PORT)),
                // dl_src: only this move and the last class read it.
                2 => next(e.action(Action::Move {
                    src: Field::DlSrc,
                    dst: Field::DlDst,
                })),
                // The other 47 bits of dl_dst: only this load reads them.
                3 => next(e.action(Action::Load {
                    field: Field::DlDst,
                    value: 1,
                    ofs: 0,
                    nbits: 1,
                })),
                4 => e.action(Action::Group(1)),
                5 => e.action(Action::Group(2)),
                6 => next(e.action(Action::SetField {
                    field: Field::DlDst,
                    value: 7,
                })),
                // A clause of conjunction 7 (see `tables`).
                7 => e.action(Action::Conjunction {
                    id: 7,
                    clause: (prio % 2) as u8 + 1,
                    n_clauses: 2,
                }),
                8 if l3 == 3 => next(e.action(Action::Load {
                    field: Field::NwProto,
                    value: 2,
                    ofs: 0,
                    nbits: 8,
                })),
                // A register later tables may match, rewritten.
                9 => next(e.action(Action::Load {
                    field: Field::Reg(2),
                    value: u128::from(prio % 4),
                    ofs: 0,
                    nbits: 32,
                })),
                _ => next(e),
            }
        })
}

fn group(id: u32, selection: Selection) -> Group {
    Group {
        id,
        selection,
        affinity: None,
        buckets: (0..4)
            .map(|b| Bucket {
                id: b,
                weight: 1,
                actions: smallvec![Action::Output(PortNo(100 + b))],
            })
            .collect(),
    }
}

fn tables(flows: Vec<FlowEntry>) -> FlowTables {
    let mut t = FlowTables::new();
    t.add_group(group(1, Selection::FiveTuple)).unwrap();
    t.add_group(group(2, Selection::Source)).unwrap();
    // Conjunction 7's flow in every table looks at a bit of the TCP flags no
    // other flow matches: the cache mask must cover what conj_id flows match.
    for table in 0..3 {
        let m = Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with(Field::NwProto, ip_proto::TCP.into())
            .with(Field::ConjId, 7)
            .with_masked(Field::TcpFlags, 1, 1);
        t.add(
            FlowEntry::new(table, 60, m).action(Action::Output(PortNo(77))),
            Time::ZERO,
        )
        .unwrap();
    }
    for f in flows {
        t.add(f, Time::ZERO).unwrap();
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Keys that agree on their class's cache mask get the same
    /// translation (actions, flows hit, registers after the pass, how it
    /// ended); so do keys that agree on what one translation looked at
    /// (`Consulted`) within that mask: the narrow key the cache keeps the
    /// translation under too.
    #[test]
    fn keys_equal_under_the_masks_translate_alike(
        flows in prop::collection::vec(arb_flow(), 0..12),
        key in any::<[u64; 14]>(),
        other in any::<[u64; 14]>(),
        dl_type in prop::sample::select(vec![ether_type::IPV4, ether_type::ARP, ether_type::IPV6]),
        proto in prop::sample::select(vec![ip_proto::TCP, ip_proto::UDP, 1, 2]),
    ) {
        let t = tables(flows);
        // Values in the low bits, as the flows match (so lookups hit).
        let small = |k: [u64; 14]| MatchKey(k.map(|w| w & 0x0303_0303_0303_0303));
        let (mut a, b) = (small(key), small(other));
        a.set(Field::DlType, dl_type.into());
        a.set(Field::NwProto, proto.into());
        let masks = t.cache_masks();
        let class = *masks.of(&a);
        let mut obs = Consulted::new(&masks, Silent);
        let x1 = xlate(&t, &mut a.clone(), TableId(0), &mut obs);
        let narrow = obs.mask.masked(&class);
        for mask in [class, narrow] {
            // b where the mask has no bits, a where it has.
            let k2 = MatchKey(std::array::from_fn(|i| (a.0[i] & mask.0[i]) | (b.0[i] & !mask.0[i])));
            prop_assert_eq!(masks.of(&k2), &class, "one class");
            let x2 = xlate(&t, &mut k2.clone(), TableId(0), &mut Silent);
            prop_assert_eq!(&x1, &x2);
        }
    }
}

/// One edit of a table set: add a flow, remove the i-th flow, or give it
/// other actions.
#[derive(Debug, Clone)]
enum Edit {
    Add(Box<FlowEntry>),
    Remove(usize),
    Modify(usize, u32),
    /// The i-th flow becomes a clause of conjunction 7 (the other clause,
    /// if it is one already).
    Reclause(usize),
}

fn arb_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        arb_flow().prop_map(|f| Edit::Add(Box::new(f))),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), 1u32..50).prop_map(|(i, p)| Edit::Modify(i, p)),
        any::<usize>().prop_map(Edit::Reclause),
    ]
}

fn apply(t: &mut FlowTables, edit: &Edit) {
    let flows: Vec<FlowEntry> = {
        let mut v: Vec<FlowEntry> = t.iter().map(|(_, f)| (*f.entry).clone()).collect();
        v.sort_by_key(|f| f.to_string());
        v
    };
    match edit {
        Edit::Add(f) => {
            let _ = t.add((**f).clone(), Time::ZERO);
        }
        Edit::Remove(i) if !flows.is_empty() => {
            t.remove(&flows[i % flows.len()].identity());
        }
        Edit::Modify(i, port) if !flows.is_empty() => {
            let mut f = flows[i % flows.len()].clone();
            if f.actions
                .iter()
                .all(|a| !matches!(a, Action::Conjunction { .. }))
            {
                f.actions = smallvec![Action::Output(PortNo(*port))];
                t.add(f, Time::ZERO).unwrap();
            }
        }
        Edit::Reclause(i) if !flows.is_empty() => {
            let mut f = flows[i % flows.len()].clone();
            if f.matcher.has(Field::ConjId) {
                return;
            }
            let clause = match f.actions.first() {
                Some(Action::Conjunction { clause, .. }) => 3 - clause,
                _ => 1,
            };
            f.actions = smallvec![Action::Conjunction {
                id: 7,
                clause,
                n_clauses: 2,
            }];
            let _ = t.add(f, Time::ZERO);
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// A translation cached under the first tables and revalidated after a
    /// few publishes of edits is what the newest tables give, for every key
    /// the entry serves.
    #[test]
    fn a_revalidated_translation_is_the_new_one(
        flows in prop::collection::vec(arb_flow(), 0..12),
        steps in prop::collection::vec(prop::collection::vec(arb_edit(), 1..4), 1..4),
        key in any::<[u64; 14]>(),
        other in any::<[u64; 14]>(),
        dl_type in prop::sample::select(vec![ether_type::IPV4, ether_type::ARP]),
        proto in prop::sample::select(vec![ip_proto::TCP, ip_proto::UDP, 1, 2]),
    ) {
        let small = |k: [u64; 14]| MatchKey(k.map(|w| w & 0x0303_0303_0303_0303));
        let mut k = small(key);
        k.set(Field::DlType, dl_type.into());
        k.set(Field::NwProto, proto.into());
        let first = Snapshot::new(1, tables(flows), Time::ZERO);
        let cached = k.masked(first.cache_masks.of(&k));
        let old = xlate(&first.tables, &mut k.clone(), TableId(0), &mut Silent);
        let mut snap = Snapshot::next(&first, first.tables.clone(), Time::ZERO);
        for step in &steps {
            let mut t = snap.tables.clone();
            for edit in step {
                apply(&mut t, edit);
            }
            snap = Snapshot::next(&snap, t, Time::ZERO);
        }
        if snap.revalidates(first.generation, &cached) {
            // Every key the entry serves: equal to k under the mask (which
            // revalidation only allows when no publish changed it).
            prop_assert_eq!(snap.cache_masks.of(&k), first.cache_masks.of(&k));
            let (mask, b) = (*snap.cache_masks.of(&k), small(other));
            let served = MatchKey(std::array::from_fn(|i| (k.0[i] & mask.0[i]) | (b.0[i] & !mask.0[i])));
            for probe in [k, served] {
                let new = xlate(&snap.tables, &mut probe.clone(), TableId(0), &mut Silent);
                prop_assert_eq!(&new, &old, "revalidated for {:?}", probe);
            }
        }
    }
}

/// A random clause of conjunction 7 in table 0: a match on up to two TCP
/// fields, drawn from the keys' low bits.
fn arb_clause() -> impl Strategy<Value = FlowEntry> {
    (
        1u8..3,
        prop::collection::vec((0usize..4, any::<u8>(), 0u8..4), 0..3),
    )
        .prop_map(|(clause, matches)| {
            let (mut m, _) = class(0);
            for (f, v, mask) in matches {
                let f = [Field::NwSrc, Field::NwDst, Field::TpDst, Field::InPort][f];
                m = m.with_masked(f, u128::from(v & mask), u128::from(mask));
            }
            FlowEntry::new(0, 100, m).action(Action::Conjunction {
                id: 7,
                clause,
                n_clauses: 2,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Conjunction 7 decides table 0 when it fires; its clauses come and go
    /// (a policy's peers and ports). A translation revalidated across that
    /// is the new tables' one.
    #[test]
    fn a_revalidated_translation_holds_across_conjunction_changes(
        clauses in prop::collection::vec(arb_clause(), 0..6),
        edits in prop::collection::vec(
            prop_oneof![
                arb_clause().prop_map(|f| Edit::Add(Box::new(f))),
                any::<usize>().prop_map(Edit::Remove),
                any::<usize>().prop_map(Edit::Reclause),
            ],
            1..5,
        ),
        key in any::<[u64; 14]>(),
    ) {
        let mut t = FlowTables::new();
        let (m, _) = class(0);
        t.add(FlowEntry::new(0, 100, m.with(Field::ConjId, 7)).action(Action::Output(PortNo(77))), Time::ZERO).unwrap();
        t.add(FlowEntry::new(0, 1, Match::any()).action(Action::Output(PortNo(1))), Time::ZERO).unwrap();
        for c in clauses {
            t.add(c, Time::ZERO).unwrap();
        }
        let mut k = MatchKey(key.map(|w| w & 0x0303_0303_0303_0303));
        k.set(Field::DlType, ether_type::IPV4.into());
        k.set(Field::NwProto, ip_proto::TCP.into());
        let first = Snapshot::new(1, t, Time::ZERO);
        let cached = k.masked(first.cache_masks.of(&k));
        let old = xlate(&first.tables, &mut k.clone(), TableId(0), &mut Silent);
        let mut t = first.tables.clone();
        for edit in &edits {
            if !matches!(edit, Edit::Remove(_)) || t.len() > 2 {
                apply(&mut t, edit);
            }
        }
        let next = Snapshot::next(&first, t, Time::ZERO);
        if next.revalidates(1, &cached) {
            let new = xlate(&next.tables, &mut k.clone(), TableId(0), &mut Silent);
            prop_assert_eq!(new, old);
        }
    }
}

/// Conjunctions, as policies compile to: a new rule (a conjunction of its
/// own) whose port clause the packet does not match leaves the packet's
/// translation alone; a clause that completes a conjunction the packet
/// matches does not.
#[test]
fn conjunctions_revalidate_by_whether_they_can_fire() {
    let add = |t: &mut FlowTables, flow: &str| {
        t.add(parse_flow(flow).unwrap(), Time::ZERO).unwrap();
    };
    let mut t = FlowTables::new();
    for flow in [
        "table=0,priority=100,tcp,nw_src=10.0.0.1,actions=conjunction(1,1/2)",
        "table=0,priority=100,tcp,tp_dst=80,actions=conjunction(1,2/2)",
        "table=0,priority=100,conj_id=1,tcp,actions=output:2",
        "table=0,priority=1,tcp,tp_dst=9999,actions=drop",
        "table=0,priority=0,actions=drop",
    ] {
        add(&mut t, flow);
    }
    let first = Snapshot::new(1, t, Time::ZERO);
    // Edits start from the published tables (as `Datapath::update` does).
    let mut t = first.tables.clone();
    // 10.0.0.1 -> port 80: allowed by conjunction 1.
    let mut k = key(ether_type::IPV4, ip_proto::TCP);
    k.set(
        Field::NwSrc,
        datapath::field::ipv4_mapped([10, 0, 0, 1].into()),
    );
    k.set(Field::TpDst, 80);
    let cached = k.masked(first.cache_masks.of(&k));
    // Another rule from the same peer to port 8080: conjunction 2 cannot
    // fire for port 80. (The peer's clause flow serves both.)
    for flow in [
        "table=0,priority=100,tcp,nw_src=10.0.0.1,actions=conjunction(1,1/2),conjunction(2,1/2)",
        "table=0,priority=100,tcp,tp_dst=8080,actions=conjunction(2,2/2)",
        "table=0,priority=100,conj_id=2,tcp,actions=output:3",
    ] {
        add(&mut t, flow);
    }
    let second = Snapshot::next(&first, t, Time::ZERO);
    let mut t = second.tables.clone();
    assert!(second.revalidates(1, &cached), "a rule for another port");
    // Conjunction 3 at a higher priority, its port clause matching 80: it
    // fires once its peer clause comes, and decides the packet.
    add(
        &mut t,
        "table=0,priority=200,tcp,tp_dst=80,actions=conjunction(3,2/2)",
    );
    add(&mut t, "table=0,priority=200,conj_id=3,tcp,actions=drop");
    let third = Snapshot::next(&second, t, Time::ZERO);
    let mut t = third.tables.clone();
    assert!(
        third.revalidates(1, &cached),
        "conjunction 3 lacks its peer clause"
    );
    add(
        &mut t,
        "table=0,priority=200,tcp,nw_src=10.0.0.0/8,actions=conjunction(3,1/2)",
    );
    let fourth = Snapshot::next(&third, t, Time::ZERO);
    assert!(
        !fourth.revalidates(1, &cached),
        "the clause completing conjunction 3"
    );
    let before = xlate(&first.tables, &mut k.clone(), TableId(0), &mut Silent);
    let after = xlate(&fourth.tables, &mut k.clone(), TableId(0), &mut Silent);
    assert_ne!(before, after, "and the translation did change");
}

/// A stateful pipeline as the compiler writes it: 10.0.0.1 may open TCP
/// connections to 10.0.0.2:80; nothing matches a source port or TCP flags.
fn stateful_allow() -> Vec<FlowEntry> {
    [
        "table=0,priority=100,in_port=1,ip,nw_src=10.0.0.1,actions=goto_table:20",
        "table=20,priority=0,actions=ct(zone=1,table=30)",
        "table=30,priority=200,ct_state=+inv+trk,actions=drop",
        "cookie=0x1,table=30,priority=100,tcp,nw_dst=10.0.0.2,tp_dst=80,ct_state=+new+trk,actions=ct(commit,zone=1),output:2",
        "table=30,priority=90,ct_state=+est+trk,actions=output:2",
    ]
    .iter()
    .map(|s| parse_flow(s).unwrap())
    .collect()
}

/// Installs `flows` and sends a first SYN (10.0.0.1:40000 -> 10.0.0.2:80),
/// which they forward to port 2; the worker that did.
fn first_syn(dp: &std::sync::Arc<Datapath>, flows: Vec<FlowEntry>) -> datapath::Worker {
    dp.update(Time::ZERO, |t| t.apply(flows, |_| true, Time::ZERO))
        .unwrap();
    let mut w = dp.worker();
    w.begin_batch();
    let mut first = syn(40000, false);
    assert_eq!(
        w.process(Time(1), PortNo(1), &mut first).outputs.to_vec(),
        [PortNo(2)]
    );
    w
}

/// Where a policy compares ports, a reply is addressed to the client's new
/// port every connection, so its key differs in a field the class's mask
/// holds. Its translation never looked at that field (an established
/// connection's reply skips the policy tables): the reply of every
/// connection after the first hits the narrow entry.
#[test]
fn replies_to_new_client_ports_hit_the_cache() {
    let flows: Vec<FlowEntry> = [
        "table=0,priority=100,in_port=1,ip,actions=goto_table:20",
        "table=0,priority=100,in_port=2,ip,actions=goto_table:20",
        "table=20,priority=0,actions=ct(zone=1,table=30)",
        "table=30,priority=200,ct_state=+inv+trk,actions=drop",
        "table=30,priority=190,ct_state=+est+trk,actions=goto_table:60",
        "table=30,priority=0,actions=goto_table:51",
        "table=51,priority=100,tcp,nw_dst=10.0.0.2,tp_dst=80,ct_state=+new+trk,actions=ct(commit,zone=1),goto_table:60",
        "table=51,priority=0,actions=drop",
        "table=60,priority=100,ip,nw_dst=10.0.0.1,actions=output:1",
        "table=60,priority=100,ip,nw_dst=10.0.0.2,actions=output:2",
    ]
    .iter()
    .map(|s| parse_flow(s).unwrap())
    .collect();
    let dp = Datapath::new(DatapathConfig::default());
    dp.update(Time::ZERO, |t| t.apply(flows, |_| true, Time::ZERO))
        .unwrap();
    let mut w = dp.worker();
    w.begin_batch();
    let tcp = |from: [u8; 4], sport: u16, to: [u8; 4], dport: u16, synack: bool| {
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(from, to, 64)
            .tcp(sport, dport, 1, 1000)
            .syn();
        if synack {
            b = b.ack(2);
        }
        let mut f = Vec::new();
        b.write(&mut f, &[]).unwrap();
        f
    };
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let connect = |w: &mut datapath::Worker, port: u16| {
        let mut syn = tcp(a, port, b, 80, false);
        assert_eq!(
            w.process(Time(1), PortNo(1), &mut syn).outputs.to_vec(),
            [PortNo(2)]
        );
        let mut reply = tcp(b, 80, a, port, true);
        assert_eq!(
            w.process(Time(1), PortNo(2), &mut reply).outputs.to_vec(),
            [PortNo(1)]
        );
    };
    connect(&mut w, 40000);
    let before = w.cache_stats();
    for port in 40001..40051 {
        connect(&mut w, port);
    }
    let after = w.cache_stats();
    assert_eq!(
        after.misses, before.misses,
        "50 connections, no miss: {after:?}"
    );
    // A reply nobody asked for is still judged on its own (+inv): dropped.
    let mut stray = tcp(b, 80, a, 50000, true);
    assert!(w.process(Time(1), PortNo(2), &mut stray).outputs.is_empty());
}

/// Tables that are not the previous snapshot's, edited (fresh ones, or an
/// older snapshot's put back), carry no journal of what changed: nothing
/// cached is kept across them.
#[test]
fn tables_from_elsewhere_revalidate_nothing() {
    let mut t = FlowTables::new();
    for f in stateful_allow() {
        t.add(f, Time::ZERO).unwrap();
    }
    let first = Snapshot::new(1, t, Time::ZERO);
    let k = key(ether_type::IPV4, ip_proto::TCP);
    let cached = k.masked(first.cache_masks.of(&k));
    let same = Snapshot::next(&first, first.tables.clone(), Time::ZERO);
    assert!(same.revalidates(1, &cached), "nothing changed");
    let mut fresh = FlowTables::new();
    fresh
        .add(
            parse_flow("table=0,priority=1,actions=drop").unwrap(),
            Time::ZERO,
        )
        .unwrap();
    let replaced = Snapshot::next(&same, fresh, Time::ZERO);
    assert!(!replaced.revalidates(2, &cached), "fresh tables");
    let back = Snapshot::next(&replaced, first.tables.clone(), Time::ZERO);
    assert!(!back.revalidates(3, &cached), "an older snapshot's tables");
    // Tables of the same shape (the same masks) with a deny added, published
    // elsewhere (their journal emptied there), then put in place of `first`'s.
    let mut denied = first.tables.clone();
    denied
        .add(
            parse_flow("table=30,priority=150,tcp,nw_dst=10.0.0.2,tp_dst=80,ct_state=+new+trk,actions=drop")
                .unwrap(),
            Time::ZERO,
        )
        .unwrap();
    let elsewhere = Snapshot::new(9, denied, Time::ZERO);
    let swapped = Snapshot::next(&first, elsewhere.tables.clone(), Time::ZERO);
    assert!(swapped.cache_masks.same_keys(&first.cache_masks));
    assert!(
        !swapped.revalidates(1, &cached),
        "tables not edited from the last"
    );
}

/// A change elsewhere keeps a cached translation; a change to what decided
/// it drops it, and the packet gets the new verdict at once.
#[test]
fn revalidation_keeps_what_a_change_cannot_touch() {
    let dp = Datapath::new(DatapathConfig::default());
    let f = |s: &str| parse_flow(s).unwrap();
    let mut flows = stateful_allow();
    let mut w = first_syn(&dp, flows.clone());
    // Another pod's rule: nothing this packet meets.
    flows.push(f(
        "cookie=0x2,table=30,priority=150,tcp,nw_dst=10.0.0.9,tp_dst=80,actions=drop",
    ));
    dp.update(Time::ZERO, |t| t.apply(flows.clone(), |_| true, Time::ZERO))
        .unwrap();
    w.begin_batch();
    let before = w.cache_stats();
    let mut frame = syn(40001, false);
    assert_eq!(
        w.process(Time(1), PortNo(1), &mut frame).outputs.to_vec(),
        [PortNo(2)]
    );
    let after = w.cache_stats();
    assert_eq!(after.misses, before.misses, "kept across the change");
    assert_eq!(
        after.revalidated - before.revalidated,
        2,
        "both passes revalidated"
    );
    // A deny for this very destination: the cached allow must not survive.
    flows.push(f(
        "cookie=0x3,table=30,priority=150,tcp,nw_dst=10.0.0.2,tp_dst=80,actions=drop",
    ));
    dp.update(Time::ZERO, |t| t.apply(flows.clone(), |_| true, Time::ZERO))
        .unwrap();
    w.begin_batch();
    let mut denied = syn(40002, false);
    assert!(
        w.process(Time(1), PortNo(1), &mut denied)
            .outputs
            .is_empty(),
        "the new deny holds"
    );
}

#[test]
fn what_actions_read_is_in_the_mask() {
    let flow = |s: &str| parse_flow(s).unwrap();
    let mask_of = |flows: &[&str]| {
        let mut t = FlowTables::new();
        for f in flows {
            t.add(flow(f), Time::ZERO).unwrap();
        }
        *t.cache_masks().of(&key(ether_type::IPV4, ip_proto::TCP))
    };
    let has = |m: &MatchKey, f: Field| m.get(f) != 0;
    let plain = mask_of(&["table=0,priority=1,tcp,tp_dst=80,actions=output:1"]);
    assert!(has(&plain, Field::TpDst) && has(&plain, Field::InPort));
    assert!(
        !has(&plain, Field::TpSrc),
        "no flow looks at the source port"
    );
    assert!(!has(&plain, Field::TcpFlags));
    let moved = mask_of(&["table=0,priority=1,actions=move:dl_src->dl_dst,output:1"]);
    assert!(has(&moved, Field::DlSrc), "a move reads its source");
    assert!(!has(&plain, Field::DlSrc));
    let partial = mask_of(&["table=0,priority=1,actions=load:0x1->dl_src[0],output:1"]);
    assert!(
        has(&partial, Field::DlSrc),
        "a partial load keeps the other bits"
    );
    let whole = mask_of(&["table=0,priority=1,actions=load:0x1->dl_src[],output:1"]);
    assert!(!has(&whole, Field::DlSrc), "a whole load reads nothing");
    let mut t = FlowTables::new();
    t.add_group(group(1, Selection::FiveTuple)).unwrap();
    let tcp = key(ether_type::IPV4, ip_proto::TCP);
    assert!(
        has(t.cache_masks().of(&tcp), Field::TpSrc),
        "a select group hashes the ports"
    );
    // What a conjunction's own flow matches besides conj_id counts too.
    let conj = *tables(vec![]).cache_masks().of(&tcp);
    assert!(has(&conj, Field::TcpFlags), "conj_id flows' matches");
}

fn key(dl_type: u16, proto: u8) -> MatchKey {
    let mut k = MatchKey::default();
    k.set(Field::DlType, dl_type.into());
    k.set(Field::NwProto, proto.into());
    k
}

/// What a flow that pins another protocol compares stays out of a packet's
/// mask: DNS answers' source port, ICMPv6's type, ARP responders' rewrite.
#[test]
fn classes_keep_other_protocols_fields_out() {
    let f = |s: &str| parse_flow(s).unwrap();
    let mut t = FlowTables::new();
    for flow in [
        "table=0,priority=10,udp,tp_src=53,actions=controller",
        "table=0,priority=10,icmp6,icmp_type=135,actions=controller",
        "table=0,priority=10,arp,arp_op=1,actions=load:0x2->nw_proto[0..7],output:in_port",
        "table=0,priority=5,arp,arp_op=2,arp_tpa=10.0.0.1,actions=output:1",
        "table=0,priority=1,tcp,tp_dst=80,actions=output:1",
    ] {
        t.add(f(flow), Time::ZERO).unwrap();
    }
    let masks = t.cache_masks();
    let has = |k: MatchKey, f: Field| masks.of(&k).get(f) != 0;
    assert!(!has(key(ether_type::IPV4, ip_proto::TCP), Field::TpSrc));
    assert!(has(key(ether_type::IPV4, ip_proto::TCP), Field::TpDst));
    assert!(has(key(ether_type::IPV4, ip_proto::UDP), Field::TpSrc));
    assert!(has(key(ether_type::IPV6, ip_proto::ICMPV6), Field::TpSrc));
    assert!(!has(key(ether_type::IPV6, ip_proto::TCP), Field::TpSrc));
    // ARP requests become replies in flight (nw_proto is the opcode): what
    // replies are matched on is in a request's mask too.
    assert!(has(key(ether_type::ARP, 1), Field::NwDst));
}

fn syn(sport: u16, flags_ack: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(sport, 80, 1, 1000);
    b = if flags_ack { b.ack(1) } else { b.syn() };
    let mut f = Vec::new();
    b.write(&mut f, &[]).unwrap();
    f
}

/// A policy pipeline as the compiler writes it: nothing matches the source
/// port or the TCP flags, so each new connection's packets hit the entries the
/// first connection's made, before and after conntrack.
#[test]
fn new_connections_hit_the_cache() {
    let dp = Datapath::new(DatapathConfig::default());
    let mut w = first_syn(&dp, stateful_allow());
    let before = w.cache_stats();
    for sport in 40001..40101 {
        let mut frame = syn(sport, false);
        assert_eq!(
            w.process(Time(1), PortNo(1), &mut frame).outputs.to_vec(),
            [PortNo(2)]
        );
    }
    let after = w.cache_stats();
    assert_eq!(after.misses, before.misses, "100 new connections, no miss");
    assert_eq!(after.hits - before.hits, 200, "two passes each, both hits");
    // An ACK of a connection conntrack never saw is still judged on its own
    // state (+inv): the cache does not carry one packet's verdict to another.
    let mut stray = syn(50000, true);
    assert!(w.process(Time(1), PortNo(1), &mut stray).outputs.is_empty());
}
