//! Tables 10 and 20: who may send what, and the answers the switch gives
//! for every address it knows (ARP, IPv6 neighbour discovery), so no
//! broadcast or multicast crosses pods.

use std::net::IpAddr;

use datapath::field::{Field, ether_type, mac_value};
use datapath::flow::{Action, FlowEntry};
use datapath::{Match, PortNo};

use super::{
    Purpose, REMOTE_ROUTER_MAC, Topology, VIRTUAL_ROUTER, flow, goto, ip_of, link_local,
    router_address,
};
use crate::compile::net_match;
use crate::tables::*;

/// Table 10: a pod may send only its own MAC and addresses; a remote node only its pods' addresses.
pub(super) fn spoofguard(topo: &Topology, out: &mut Vec<FlowEntry>) {
    let ip_any = [ether_type::IPV4, ether_type::IPV6];
    // 10: spoofguard.
    for p in &topo.pods {
        // Untagged frames only: a pod has no business sending VLAN tags.
        let port = Match::any()
            .with(Field::InPort, p.port.0.into())
            .with(Field::DlSrc, mac_value(p.mac))
            .with(Field::VlanTci, 0);
        // Messages only routers (or the switch's own responder) send: router
        // advertisements, redirects, and neighbour advertisements (the switch
        // answers neighbour solicitations for pods; a pod's own would be a way
        // to claim addresses that are not its).
        ipv6_control(p.port, out);
        let icmp6 = port
            .with(Field::DlType, ether_type::IPV6.into())
            .with(Field::NwProto, datapath::field::ip_proto::ICMPV6.into());
        // Duplicate address detection: never answered, so the pod keeps the
        // address (spoofguard keeps it from taking anyone else's).
        out.push(flow(
            SPOOFGUARD,
            260,
            icmp6
                .with(Field::TpSrc, 135)
                .with(Field::NwSrc, u128::from(std::net::Ipv6Addr::UNSPECIFIED)),
            Purpose::SpoofguardDadProbe,
        ));
        let v6: Vec<IpAddr> = p
            .ips
            .iter()
            .copied()
            .filter(IpAddr::is_ipv6)
            .chain([link_local(p.mac)])
            .collect();
        for ip in &v6 {
            let (_, addr) = ip_of(ip);
            // Solicitations from its own address, its own MAC in the option
            // (or none, allowed for unicast ones): to the responder.
            for sll in [mac_value(p.mac), 0] {
                out.push(
                    flow(
                        SPOOFGUARD,
                        250,
                        icmp6
                            .with(Field::TpSrc, 135)
                            .with(Field::NwSrc, addr)
                            .with(Field::ArpSha, sll),
                        Purpose::SpoofguardNeighbour,
                    )
                    .action(goto(ARP_RESPONDER)),
                );
            }
        }
        // Any other solicitation (another source, another MAC in its option)
        // would poison a neighbour cache: dropped.
        out.push(flow(
            SPOOFGUARD,
            240,
            icmp6.with(Field::TpSrc, 135),
            Purpose::SpoofguardDrop,
        ));
        let link_local_only = [link_local(p.mac)];
        for ip in p.ips.iter().chain(&link_local_only) {
            let (dl, addr) = ip_of(ip);
            out.push(
                flow(
                    SPOOFGUARD,
                    200,
                    port.with(Field::DlType, dl.into()).with(Field::NwSrc, addr),
                    Purpose::SpoofguardOwn,
                )
                .action(goto(CONNTRACK)),
            );
            if ip.is_ipv4() {
                let arp = port
                    .with(Field::DlType, ether_type::ARP.into())
                    .with(Field::NwSrc, addr)
                    .with(Field::ArpSha, mac_value(p.mac));
                out.push(
                    flow(SPOOFGUARD, 200, arp, Purpose::SpoofguardOwn).action(goto(ARP_RESPONDER)),
                );
            }
        }
    }
    if let Some(g) = &topo.gateway {
        let port = Match::any().with(Field::InPort, g.port.0.into());
        ipv6_control(g.port, out);
        out.push(
            flow(
                SPOOFGUARD,
                250,
                port.with(Field::DlType, ether_type::IPV6.into())
                    .with(Field::NwProto, datapath::field::ip_proto::ICMPV6.into())
                    .with(Field::TpSrc, 135),
                Purpose::SpoofguardGateway,
            )
            .action(goto(ARP_RESPONDER)),
        );
        out.push(
            flow(
                SPOOFGUARD,
                200,
                port.with(Field::DlType, ether_type::ARP.into()),
                Purpose::SpoofguardGateway,
            )
            .action(goto(ARP_RESPONDER)),
        );
        for dl in ip_any {
            out.push(
                flow(
                    SPOOFGUARD,
                    200,
                    port.with(Field::DlType, dl.into()),
                    Purpose::SpoofguardGateway,
                )
                .action(goto(CONNTRACK)),
            );
        }
    }
    // A remote node may only send its own pods' addresses.
    for t in &topo.tunnels {
        for net in &t.pod_cidrs {
            let m = net_match(Field::NwSrc, *net).with(Field::InPort, t.port.0.into());
            out.push(flow(SPOOFGUARD, 200, m, Purpose::SpoofguardTunnel).action(goto(CONNTRACK)));
        }
    }
    out.push(flow(SPOOFGUARD, 0, Match::any(), Purpose::SpoofguardDrop));
}

/// ICMPv6 a port never gets through: router advertisements, redirects and
/// neighbour advertisements (the switch answers for every address; a pod's
/// own would claim addresses), router solicitations (routes are static) and
/// multicast listener messages (no multicast crosses pods).
fn ipv6_control(port: PortNo, out: &mut Vec<FlowEntry>) {
    let m = Match::any()
        .with(Field::InPort, port.0.into())
        .with(Field::DlType, ether_type::IPV6.into())
        .with(Field::NwProto, datapath::field::ip_proto::ICMPV6.into());
    for (icmp_type, purpose) in [
        (134u8, Purpose::SpoofguardRouterOnly),
        (136, Purpose::SpoofguardRouterOnly),
        (137, Purpose::SpoofguardRouterOnly),
        (133, Purpose::SpoofguardHostOnly),
        (130, Purpose::SpoofguardHostOnly),
        (131, Purpose::SpoofguardHostOnly),
        (132, Purpose::SpoofguardHostOnly),
        (143, Purpose::SpoofguardHostOnly),
    ] {
        out.push(flow(
            SPOOFGUARD,
            300,
            m.with(Field::TpSrc, icmp_type.into()),
            purpose,
        ));
    }
}

/// Table 20: ARP requests and IPv6 neighbour solicitations for every address the switch knows are answered here; no broadcast or multicast crosses pods.
pub(super) fn arp_responder(topo: &Topology, out: &mut Vec<FlowEntry>) {
    // 20: every address the switch knows, answered with its owner's MAC:
    // pods (and their link-local addresses), the gateway (and the virtual
    // router pods route IPv6 through), and other nodes' pod CIDRs' router
    // address, through which the node routes to them (`router_address`).
    let mut known: Vec<(IpAddr, [u8; 6], bool)> = Vec::new();
    for p in &topo.pods {
        let own = p.ips.iter().copied().chain([link_local(p.mac)]);
        known.extend(own.map(|ip| (ip, p.mac, false)));
    }
    if let Some(g) = &topo.gateway {
        let own = g.ips.iter().copied();
        let routers = [link_local(g.mac), IpAddr::V6(VIRTUAL_ROUTER)];
        known.extend(own.chain(routers).map(|ip| (ip, g.mac, true)));
    }
    for t in &topo.tunnels {
        let hops = t.pod_cidrs.iter().filter_map(router_address);
        known.extend(hops.map(|hop| (hop, REMOTE_ROUTER_MAC, true)));
    }
    out.extend(
        known
            .into_iter()
            .map(|(ip, mac, router)| answer(ip, mac, router)),
    );
    out.push(flow(
        ARP_RESPONDER,
        0,
        Match::any(),
        Purpose::ArpNoBroadcast,
    ));
}

/// The flow answering who has `target`: an ARP request (IPv4) or a neighbour
/// solicitation (IPv6), answered from `mac` (a router's, when `router`).
fn answer(target: IpAddr, mac: [u8; 6], router: bool) -> FlowEntry {
    let (_, addr) = ip_of(&target);
    if target.is_ipv4() {
        let request = Match::any()
            .with(Field::DlType, ether_type::ARP.into())
            .with(Field::NwProto, 1)
            .with(Field::NwDst, addr);
        return arp_reply(
            flow(ARP_RESPONDER, 100, request, Purpose::ArpReply),
            mac,
            addr,
        );
    }
    let solicitation = Match::any()
        .with(Field::DlType, ether_type::IPV6.into())
        .with(Field::NwProto, datapath::field::ip_proto::ICMPV6.into())
        .with(Field::TpSrc, 135)
        .with(Field::NwDst, addr);
    flow(ARP_RESPONDER, 100, solicitation, Purpose::NdReply)
        .action(Action::NdAdvert { mac, router })
        .action(Action::Output(PortNo::IN_PORT))
}

/// Turns an ARP request for `addr` into the reply from `mac`, sent back where
/// it came from.
fn arp_reply(f: FlowEntry, mac: [u8; 6], addr: u128) -> FlowEntry {
    let f = f
        .action(Action::Move {
            src: Field::DlSrc,
            dst: Field::DlDst,
        })
        .action(Action::SetField {
            field: Field::DlSrc,
            value: mac_value(mac),
        })
        .action(Action::Load {
            field: Field::NwProto,
            value: 2,
            ofs: 0,
            nbits: 8,
        })
        .action(Action::Move {
            src: Field::ArpSha,
            dst: Field::ArpTha,
        })
        .action(Action::SetField {
            field: Field::ArpSha,
            value: mac_value(mac),
        });
    // The asked-for address becomes the sender; the asker the target.
    f.action(Action::Move {
        src: Field::NwSrc,
        dst: Field::NwDst,
    })
    .action(Action::SetField {
        field: Field::NwSrc,
        value: addr,
    })
    .action(Action::Output(PortNo::IN_PORT))
}
