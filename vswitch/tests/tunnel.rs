//! The tunnel's input, attacked from the network: a flood of junk datagrams
//! and frames with inconsistent virtio-net headers, sent over real UDP sockets
//! on loopback to a switch whose pods are in-memory ports (no root needed).

use std::net::UdpSocket;
use std::sync::Arc;

use datapath::DatapathConfig;
use policy::compile::Change;
use policy::model::{Node, ObjectKey};
use vswitch::port::MemoryPort;
use vswitch::tunnel::TunnelIo;
use vswitch::{Forwarder, Realiser};

const A_MAC: [u8; 6] = [0x0a, 0x58, 10, 0, 0, 1];
const B_MAC: [u8; 6] = [0x0a, 0x58, 10, 0, 0, 2];

/// A switch with pods a and b (in memory) and a tunnel on 127.0.0.1 to a
/// "remote" node at 127.0.0.1 whose pods are 10.9.0.0/24; returns the switch,
/// its forwarder, the pods and the tunnel's address.
fn switch() -> (
    Arc<Realiser>,
    Arc<Forwarder>,
    Arc<MemoryPort>,
    Arc<MemoryPort>,
    std::net::SocketAddr,
) {
    let r = Realiser::new(DatapathConfig::default());
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    r.set_local_node("here");
    r.set_tunnel(TunnelIo::new(socket, 1, addr.port()).unwrap())
        .unwrap();
    r.apply(Change::Node(Node {
        name: "remote".into(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        pod_cidrs: vec!["10.9.0.0/24".parse().unwrap()],
        ..Node::default()
    }))
    .unwrap();
    let (a, b) = (
        Arc::new(MemoryPort::new(true)),
        Arc::new(MemoryPort::new(true)),
    );
    for (port, name, mac, ip) in [(&a, "a", A_MAC, "10.0.0.1"), (&b, "b", B_MAC, "10.0.0.2")] {
        r.attach(
            port.clone(),
            ObjectKey::new("t", name),
            mac,
            vec![ip.parse().unwrap()],
        )
        .unwrap();
    }
    let f = Forwarder::new(r.published().clone());
    (r, f, a, b, addr)
}

fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(4000, 5000)
        .write(&mut f, b"payload")
        .unwrap();
    f
}

/// A flood of junk to the tunnel port cannot keep the packet thread from the
/// pods: a read gives up after a bounded number of rejected datagrams.
#[test]
fn a_junk_flood_does_not_starve_the_pods() {
    let (r, f, a, b, addr) = switch();
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        attacker.send_to(&i.to_be_bytes(), addr).unwrap();
    }
    let mut hdr_frame = vec![0u8; 12];
    hdr_frame.extend(udp_frame(A_MAC, B_MAC, [10, 0, 0, 1], [10, 0, 0, 2]));
    a.push(hdr_frame);
    let mut lane = f.lane();
    lane.step();
    assert_eq!(b.take().len(), 1, "a's frame crossed in the same step");
    let (rejected, _) = r.tunnel_rejected();
    assert!(
        (1..=16).contains(&rejected),
        "one step read {rejected} junk datagrams"
    );
    // The junk is still read and counted, a bounded amount at a time.
    for _ in 0..200 {
        lane.step();
    }
    assert_eq!(r.tunnel_rejected().0, 200);
}

/// A frame from a peer whose virtio-net header does not fit it (a TSO type on
/// a UDP frame, a checksum position past its end) is dropped and counted,
/// never handed to a pod's device.
#[test]
fn frames_with_inconsistent_offload_headers_are_dropped() {
    let (r, f, _a, b, addr) = switch();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let frame = udp_frame(
        [0x0a, 0x58, 0xff, 0xff, 0xff, 0xfe],
        B_MAC,
        [10, 9, 0, 5],
        [10, 0, 0, 2],
    );
    let datagram = |hdr: [u8; 12]| {
        // VXLAN: I flag plus vswitch's "virtio-net header follows" bit, VNI 1.
        let mut d = vec![0x09, 0, 0, 0, 0, 0, 1, 0];
        d.extend(hdr);
        d.extend(&frame);
        d
    };
    let mut tso_on_udp = [0u8; 12];
    tso_on_udp[1] = 1; // GSO TCPv4
    tso_on_udp[4..6].copy_from_slice(&1448u16.to_le_bytes());
    let mut csum_past_end = [0u8; 12];
    csum_past_end[0] = 1; // NEEDS_CSUM
    csum_past_end[6..8].copy_from_slice(&9000u16.to_le_bytes());
    for bad in [tso_on_udp, csum_past_end] {
        peer.send_to(&datagram(bad), addr).unwrap();
    }
    peer.send_to(&datagram([0; 12]), addr).unwrap();
    let mut lane = f.lane();
    for _ in 0..10 {
        lane.step();
    }
    assert_eq!(
        r.tunnel_rejected().1,
        2,
        "both inconsistent headers counted"
    );
    assert_eq!(b.take().len(), 1, "the consistent frame is delivered");
}

/// The remote node's source check covers IPv6: a frame from the tunnel with
/// an IPv6 source inside that node's IPv6 pod CIDR is forwarded to the local
/// pod; one from any other IPv6 source (a forged one) is dropped by
/// spoofguard.
#[test]
fn a_remote_node_may_only_send_its_own_ipv6_pods_addresses() {
    use datapath::FlowKey;
    use datapath::field::ct_state;
    use datapath::trace::{CtSource, Outcome, trace};
    use vswitch::realiser::PortRole;
    let (r, _f, _a, _b, _addr) = switch();
    r.apply(Change::Node(Node {
        name: "remote".into(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        pod_cidrs: vec![
            "10.9.0.0/24".parse().unwrap(),
            "fd00:9::/64".parse().unwrap(),
        ],
        ..Node::default()
    }))
    .unwrap();
    let c = Arc::new(MemoryPort::new(true));
    let c_ip: std::net::IpAddr = "fd00:1::3".parse().unwrap();
    r.attach(
        c.clone(),
        ObjectKey::new("t", "c"),
        [0x0a, 0x58, 0, 0, 0, 3],
        vec![c_ip],
    )
    .unwrap();
    let tunnel = r
        .ports()
        .into_iter()
        .find(|p| matches!(p.role, PortRole::Tunnel { .. }))
        .expect("a tunnel port to the remote node")
        .no;
    let c_port = r.port_of(&ObjectKey::new("t", "c")).unwrap().no;
    let from = |src: &str| FlowKey {
        in_port: tunnel,
        dl_type: 0x86dd,
        nw_proto: 17,
        nw_src: datapath::key::ip_to_wide(src.parse().unwrap()),
        nw_dst: datapath::key::ip_to_wide(c_ip),
        tp_src: 4000,
        tp_dst: 5000,
        ..FlowKey::default()
    };
    let snap = r.datapath().snapshot();
    let run = |src: &str| {
        trace(
            &snap.tables,
            &from(src),
            CtSource::Assume(ct_state::TRK | ct_state::NEW),
        )
    };
    assert!(
        matches!(run("fd00:9::7").outcome, Outcome::Output(ref ports) if ports == &[c_port]),
        "the remote node's own IPv6 pod reaches the local pod"
    );
    let forged = run("fd00:1::99");
    assert!(matches!(forged.outcome, Outcome::Drop { .. }), "{forged:?}");
    let by = forged.deciding_flow().expect("dropped by a flow");
    assert_eq!(by.table.0, policy::tables::SPOOFGUARD, "{by}");
}
