//! Load balancing in the datapath, through its public API: a select group
//! translating new connections, replies and ICMP errors translated back,
//! existing connections kept when the group changes, hairpin, reject.

use datapath::group::parse_group;
use datapath::{Datapath, DatapathConfig, PortNo, Time, parse, parse_flow};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

const CLIENT: [u8; 4] = [10, 0, 0, 1];
const VIP: [u8; 4] = [10, 96, 0, 10];
const B1: [u8; 4] = [10, 0, 0, 11];
const B2: [u8; 4] = [10, 0, 0, 12];

fn port_of(ip: [u8; 4]) -> u32 {
    u32::from(ip[3])
}

fn switch(group: &str) -> std::sync::Arc<Datapath> {
    let dp = Datapath::new(DatapathConfig::default());
    let mut flows = vec![
        "table=0,priority=10,ip,actions=ct(zone=1,nat,table=30)".to_string(),
        "table=30,priority=100,ct_state=-new+est+trk,ip,actions=goto_table:60".into(),
        "table=30,priority=100,ct_state=+rel+trk,ip,actions=goto_table:60".into(),
        "table=30,priority=90,ct_state=+new+trk,tcp,nw_dst=10.96.0.10,tp_dst=80,actions=group:1,goto_table:60".into(),
        "table=30,priority=90,ct_state=+new+trk,udp,nw_dst=10.96.0.10,tp_dst=53,actions=reject".into(),
        "table=30,priority=0,ip,actions=goto_table:60".into(),
        // Hairpin: a client reaching itself gets the Service address as source.
        "table=60,priority=200,ct_state=+new+trk,ip,nw_src=10.0.0.11,nw_dst=10.0.0.11,actions=ct(commit,zone=1,nat(src=10.96.0.10)),output:11".into(),
        "table=60,priority=100,ct_state=+new+trk,ip,actions=ct(commit,zone=1),resubmit(,70)".into(),
        "table=60,priority=50,ip,actions=resubmit(,70)".into(),
    ];
    for ip in [CLIENT, B1, B2, [10, 0, 0, 13]] {
        flows.push(format!(
            "table=70,priority=10,ip,nw_dst={}.{}.{}.{},actions=output:{}",
            ip[0],
            ip[1],
            ip[2],
            ip[3],
            port_of(ip)
        ));
    }
    let group = parse_group(group).unwrap();
    dp.update(Time::ZERO, |t| {
        t.add_group(group)?;
        for f in &flows {
            t.add(parse_flow(f).unwrap(), Time::ZERO)?;
        }
        Ok::<_, datapath::FlowError>(())
    })
    .unwrap();
    dp
}

const TWO: &str = "group_id=1,type=select,bucket=bucket_id:11,weight:1,actions=ct(nat(dst=10.0.0.11:8080)),bucket=bucket_id:12,weight:1,actions=ct(nat(dst=10.0.0.12:8080))";

fn tcp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, syn: bool, ack: bool) -> Vec<u8> {
    let flags = match (syn, ack) {
        (true, true) => "SA",
        (true, false) => "S",
        (false, true) => "A",
        (false, false) => "",
    };
    tcp_flags(src, dst, sp, dp, flags)
}

/// A TCP segment with `flags` (S, A, F) and a few bytes of data.
fn tcp_flags(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, flags: &str) -> Vec<u8> {
    let mut f = Vec::new();
    let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .tcp(sp, dp, 1000, 100);
    for c in flags.chars() {
        b = match c {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            _ => b,
        };
    }
    b.write(&mut f, b"data").unwrap();
    f
}

fn ends(frame: &[u8]) -> ([u8; 4], u16, [u8; 4], u16) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!()
    };
    let (s, d) = (ip.header().source(), ip.header().destination());
    let (sp, dp) = match p.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => (0, 0),
    };
    (s, sp, d, dp)
}

fn checksums_ok(frame: &[u8]) -> bool {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!()
    };
    let h = ip.header().to_header();
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        return h.calc_header_checksum() == h.header_checksum;
    };
    h.calc_header_checksum() == h.header_checksum
        && t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap() == t.checksum()
}

#[test]
fn a_connection_is_translated_both_ways_and_keeps_its_backend() {
    let dp = switch(TWO);
    let mut w = dp.worker();
    w.begin_batch();
    let now = Time::ZERO;
    // The first packet: translated to one backend.
    let mut syn = tcp(CLIENT, VIP, 40000, 80, true, false);
    let v = w.process(now, PortNo(1), &mut syn);
    assert!(v.drop.is_none(), "{v:?}");
    let out = v.outputs.to_vec();
    let (_, sp, backend, bp) = ends(&syn);
    assert_eq!((sp, bp), (40000, 8080));
    assert!(backend == B1 || backend == B2);
    assert_eq!(out, vec![PortNo(port_of(backend))]);
    assert!(checksums_ok(&syn));
    // The backend's answer comes back from the Service address.
    let mut synack = tcp(backend, CLIENT, 8080, 40000, true, true);
    let v = w.process(now, PortNo(port_of(backend)), &mut synack);
    assert_eq!(v.outputs, &[PortNo(1)]);
    assert_eq!(ends(&synack), (VIP, 80, CLIENT, 40000));
    assert!(checksums_ok(&synack));
    // The group changes (the chosen backend leaves): the connection stays.
    let other = if backend == B1 { 12 } else { 11 };
    let only = format!(
        "group_id=1,type=select,bucket=bucket_id:{other},actions=ct(nat(dst=10.0.0.{other}:8080))"
    );
    dp.update(now, |t| t.add_group(parse_group(&only).unwrap()))
        .unwrap();
    w.begin_batch();
    let mut ack = tcp(CLIENT, VIP, 40000, 80, false, true);
    let v = w.process(now, PortNo(1), &mut ack);
    assert_eq!(v.outputs, &[PortNo(port_of(backend))]);
    assert_eq!(ends(&ack).2, backend);
    // A new connection goes to the remaining backend.
    let mut syn2 = tcp(CLIENT, VIP, 40001, 80, true, false);
    let v = w.process(now, PortNo(1), &mut syn2);
    assert_eq!(v.outputs, &[PortNo(other)]);
    // The table lists the translation.
    let dump = dp.conntrack.dump(now, None);
    assert!(
        dump.iter().any(|c| c
            .to_string()
            .contains(&format!("dnat=10.0.0.{}:8080", backend[3]))),
        "{dump:?}"
    );
}

#[test]
fn connections_spread_over_the_backends() {
    let dp = switch(TWO);
    let mut w = dp.worker();
    w.begin_batch();
    let mut to = [0u32; 2];
    for sport in 1000..1400 {
        let mut syn = tcp(CLIENT, VIP, sport, 80, true, false);
        let v = w.process(Time::ZERO, PortNo(1), &mut syn);
        to[usize::from(v.outputs[0] == PortNo(12))] += 1;
    }
    assert!(to[0] > 150 && to[1] > 150, "{to:?}");
}

#[test]
fn an_icmp_error_from_the_backend_names_the_service() {
    let dp = switch(TWO);
    let mut w = dp.worker();
    w.begin_batch();
    let mut syn = tcp(CLIENT, VIP, 40000, 80, true, false);
    w.process(Time::ZERO, PortNo(1), &mut syn);
    let backend = ends(&syn).2;
    // The backend says "port unreachable" about the translated SYN.
    let quoted = &syn[14..];
    let mut err = Vec::new();
    PacketBuilder::ethernet2([4; 6], [2; 6])
        .ipv4(backend, CLIENT, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut err, quoted)
        .unwrap();
    let v = w.process(Time::ZERO, PortNo(port_of(backend)), &mut err);
    assert_eq!(v.outputs, &[PortNo(1)]);
    let p = SlicedPacket::from_ethernet(&err).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), VIP);
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    let inner = icmp.payload();
    assert_eq!(
        &inner[16..20],
        &VIP,
        "the embedded destination is the Service"
    );
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), 80);
    let check = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), inner);
    assert_eq!(check.checksum, icmp.checksum());
}

#[test]
fn hairpin_comes_back_from_the_service_address() {
    let only = "group_id=1,type=select,bucket=bucket_id:11,actions=ct(nat(dst=10.0.0.11:8080))";
    let dp = switch(only);
    let mut w = dp.worker();
    w.begin_batch();
    let mut syn = tcp(B1, VIP, 40000, 80, true, false);
    let v = w.process(Time::ZERO, PortNo(11), &mut syn);
    assert_eq!(v.outputs, &[PortNo(11)]);
    assert_eq!(ends(&syn), (VIP, 40000, B1, 8080));
    assert!(checksums_ok(&syn));
    let mut synack = tcp(B1, VIP, 8080, 40000, true, true);
    let v = w.process(Time::ZERO, PortNo(11), &mut synack);
    assert_eq!(v.outputs, &[PortNo(11)]);
    assert_eq!(ends(&synack), (VIP, 80, B1, 40000));
    assert!(checksums_ok(&synack));
}

#[test]
fn reject_answers_at_once() {
    let dp = switch(TWO);
    let mut w = dp.worker();
    w.begin_batch();
    let mut dns = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(CLIENT, VIP, 64)
        .udp(5353, 53)
        .write(&mut dns, b"q")
        .unwrap();
    let v = w.process(Time::ZERO, PortNo(1), &mut dns);
    assert_eq!(v.outputs, &[PortNo(1)]);
    assert!(!v.reply.is_empty());
    let p = SlicedPacket::from_ethernet(v.reply).unwrap();
    assert!(matches!(p.transport, Some(TransportSlice::Icmpv4(_))));
    let _ = parse(PortNo(1), v.reply);
}

#[test]
fn a_new_connection_on_the_ends_of_a_closed_translated_one_starts_afresh() {
    let only = "group_id=1,type=select,bucket=bucket_id:11,actions=ct(nat(dst=10.0.0.11:8080))";
    let dp = switch(only);
    let mut w = dp.worker();
    w.begin_batch();
    let now = Time::ZERO;
    let mut run = |port: u32, mut f: Vec<u8>| {
        let v = w.process(now, PortNo(port), &mut f);
        (v.outputs.to_vec(), f)
    };
    // Through the Service, closed (the server closes first).
    run(1, tcp_flags(CLIENT, VIP, 40000, 80, "S"));
    run(11, tcp_flags(B1, CLIENT, 8080, 40000, "SA"));
    run(1, tcp_flags(CLIENT, VIP, 40000, 80, "A"));
    run(11, tcp_flags(B1, CLIENT, 8080, 40000, "FA"));
    run(1, tcp_flags(CLIENT, VIP, 40000, 80, "FA"));
    // The same client port, straight to the backend: its answer is the
    // backend's, not the Service's.
    run(1, tcp_flags(CLIENT, B1, 40000, 8080, "S"));
    let (out, synack) = run(11, tcp_flags(B1, CLIENT, 8080, 40000, "SA"));
    assert_eq!(out, vec![PortNo(1)]);
    assert_eq!(ends(&synack), (B1, 8080, CLIENT, 40000), "not translated");
}

#[test]
fn client_affinity_holds_across_backend_changes_until_it_times_out() {
    let sticky = |buckets: &[u32]| {
        let mut g =
            "group_id=1,type=select,selection_method=hash,fields(ip_src),affinity=100".to_string();
        for b in buckets {
            g.push_str(&format!(
                ",bucket=bucket_id:{b},actions=ct(nat(dst=10.0.0.{b}:8080))"
            ));
        }
        parse_group(&g).unwrap()
    };
    let dp = switch(TWO);
    dp.update(Time::ZERO, |t| t.add_group(sticky(&[11, 12])))
        .unwrap();
    let mut w = dp.worker();
    w.begin_batch();
    let backend_at = |w: &mut datapath::Worker, now: Time, sport: u16| {
        let mut syn = tcp(CLIENT, VIP, sport, 80, true, false);
        let v = w.process(now, PortNo(1), &mut syn);
        v.outputs[0]
    };
    let first = backend_at(&mut w, Time::ZERO, 1000);
    // The other backend is the one a change of buckets could move it to: its
    // bucket is removed and re-added, and a third joins.
    for sport in 1001..1020 {
        assert_eq!(backend_at(&mut w, Time::ZERO, sport), first);
    }
    let other = if first == PortNo(11) { 12 } else { 11 };
    dp.update(Time::ZERO, |t| t.add_group(sticky(&[other, first.0, 13])))
        .unwrap();
    w.begin_batch();
    let later = Time(50 * 1_000_000_000);
    for sport in 2000..2030 {
        assert_eq!(
            backend_at(&mut w, later, sport),
            first,
            "the client stays while its affinity lasts"
        );
    }
    // Its backend gone: it moves, and sticks to the new one.
    dp.update(later, |t| t.add_group(sticky(&[other, 13])))
        .unwrap();
    w.begin_batch();
    let moved = backend_at(&mut w, later, 3000);
    assert_ne!(moved, first);
    assert!((3001..3020).all(|p| backend_at(&mut w, later, p) == moved));
    // Past the timeout (100 s after the last connection) the memory is gone.
    assert!(
        dp.conntrack
            .affinity(
                Time(151 * 1_000_000_000),
                1,
                datapath::key::ip_to_wide(CLIENT.into())
            )
            .is_none()
    );
    assert!(
        dp.conntrack
            .affinity(
                Time(149 * 1_000_000_000),
                1,
                datapath::key::ip_to_wide(CLIENT.into())
            )
            .is_some()
    );
}

/// An SCTP INIT (common header and one INIT chunk) with its CRC32c.
fn sctp_init(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&sp.to_be_bytes());
    sctp.extend_from_slice(&dp.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]); // verification tag: 0 in an INIT
    sctp.extend_from_slice(&[0; 4]); // checksum, below
    // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, TSN.
    sctp.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 7, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 9]);
    let crc = datapath::nat::crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .write(&mut f, etherparse::IpNumber(132), &sctp)
        .unwrap();
    f
}

#[test]
fn sctp_is_translated_with_its_crc32c() {
    let dp = switch(TWO);
    dp.update(Time::ZERO, |t| {
        t.add(
            parse_flow("table=30,priority=90,ct_state=+new+trk,sctp,nw_dst=10.96.0.10,tp_dst=80,actions=group:1,goto_table:60").unwrap(),
            Time::ZERO,
        )
    })
    .unwrap();
    let mut w = dp.worker();
    w.begin_batch();
    let mut init = sctp_init(CLIENT, VIP, 5000, 80);
    let v = w.process(Time::ZERO, PortNo(1), &mut init);
    assert!(v.drop.is_none(), "{v:?}");
    let sctp = &init[34..];
    assert_eq!(
        u16::from_be_bytes([sctp[2], sctp[3]]),
        8080,
        "port translated"
    );
    let mut check = sctp.to_vec();
    let got = u32::from_le_bytes(check[8..12].try_into().unwrap());
    check[8..12].copy_from_slice(&[0; 4]);
    assert_eq!(datapath::nat::crc32c(&check), got, "CRC32c recomputed");
    assert!(init[30..34] == B1 || init[30..34] == B2);
}

#[test]
fn a_translated_connection_survives_a_graceful_restart() {
    let dp = switch(TWO);
    let mut w = dp.worker();
    w.begin_batch();
    let mut syn = tcp(CLIENT, VIP, 40000, 80, true, false);
    w.process(Time::ZERO, PortNo(1), &mut syn);
    let backend = ends(&syn).2;
    let saved = dp.conntrack.export(Time::ZERO);
    assert!(saved.iter().any(|c| c.nat.is_some()), "{saved:?}");
    // The next process: another table, another clock, the same flows.
    let next = switch(TWO);
    assert_eq!(next.conntrack.import(Time::ZERO, saved), 1);
    let mut w = next.worker();
    w.begin_batch();
    let mut synack = tcp(backend, CLIENT, 8080, 40000, true, true);
    let v = w.process(Time::ZERO, PortNo(port_of(backend)), &mut synack);
    assert_eq!(v.outputs, &[PortNo(1)]);
    assert_eq!(
        ends(&synack),
        (VIP, 80, CLIENT, 40000),
        "still translated back"
    );
}
