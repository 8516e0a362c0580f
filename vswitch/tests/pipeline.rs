//! The switch's whole pipeline (base tables + compiled policy) on crafted frames,
//! without TAP devices: what the packet threads run, frame by frame.

use std::net::IpAddr;

use datapath::{Datapath, DatapathConfig, PortNo, Time};
use etherparse::PacketBuilder;
use policy::cluster::Cluster;
use policy::compile::Compiler;
use policy::model::{ObjectKey, Pod};
use policy::pipeline::{PodPort, Topology, assemble};

const MAC_A: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 2];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two pods, a (port 1, 10.0.0.1) and b (port 2, 10.0.0.2), no policy.
fn two_pods() -> std::sync::Arc<Datapath> {
    let mut cluster = Cluster::default();
    let mut topology = Topology {
        zone: 1,
        ..Topology::default()
    };
    for (n, name, mac) in [(1u32, "a", MAC_A), (2, "b", MAC_B)] {
        let key = ObjectKey::new("ns", name);
        let ips = vec![ip(&format!("10.0.0.{n}"))];
        cluster.upsert_pod(Pod {
            key: key.clone(),
            labels: Default::default(),
            ips: ips.clone(),
            node: None,
            ports: vec![],
        });
        topology.pods.push(PodPort {
            port: PortNo(n),
            pod: key,
            mac,
            ips,
        });
    }
    let compiler = Compiler::from_cluster(cluster);
    let dp = Datapath::new(DatapathConfig::default());
    let flows = assemble(&topology, &compiler);
    dp.update(Time::ZERO, |t| t.apply(flows, |_| true, Time::ZERO))
        .unwrap();
    dp
}

fn icmp_echo(from: (u8, [u8; 6]), to: (u8, [u8; 6]), reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(from.1, to.1).ipv4([10, 0, 0, from.0], [10, 0, 0, to.0], 64);
    let b = if reply {
        b.icmpv4_echo_reply(0x1234, 1)
    } else {
        b.icmpv4_echo_request(0x1234, 1)
    };
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 56]).unwrap();
    out
}

#[test]
fn ping_and_its_reply_pass() {
    let dp = two_pods();
    let mut w = dp.worker();
    for round in 0..3 {
        w.begin_batch();
        let now = Time::from_secs(round);
        let mut req = icmp_echo((1, MAC_A), (2, MAC_B), false);
        let v = w.process(now, PortNo(1), &mut req);
        assert_eq!(v.outputs, &[PortNo(2)], "request, round {round}: {v:?}");
        let mut rep = icmp_echo((2, MAC_B), (1, MAC_A), true);
        let v = w.process(now, PortNo(2), &mut rep);
        assert_eq!(v.outputs, &[PortNo(1)], "reply, round {round}: {v:?}");
    }
}
