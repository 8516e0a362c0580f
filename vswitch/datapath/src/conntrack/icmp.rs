//! ICMP for conntrack: which messages are errors, which only routers send,
//! and the connection an error's payload names.

use etherparse::{LaxSlicedPacket, TransportSlice};

use super::Tuple;
use crate::field::ip_proto;
use crate::key::FlowKey;

pub(super) fn is_icmp_error(key: &FlowKey) -> bool {
    match key.nw_proto {
        ip_proto::ICMP => matches!(key.tp_src, 3 | 4 | 5 | 11 | 12),
        ip_proto::ICMPV6 => matches!(key.tp_src, 1..=4),
        _ => false,
    }
}

/// The errors a router on the path sends about someone else's connection:
/// fragmentation needed (IPv4) / packet too big (IPv6), time exceeded.
pub(super) fn is_router_error(key: &FlowKey) -> bool {
    match key.nw_proto {
        ip_proto::ICMP => (key.tp_src, key.tp_dst) == (3, 4) || key.tp_src == 11,
        ip_proto::ICMPV6 => matches!(key.tp_src, 2 | 3),
        _ => false,
    }
}

pub(super) fn is_icmp_reply_only(key: &FlowKey) -> bool {
    match key.nw_proto {
        ip_proto::ICMP => matches!(key.tp_src, 0 | 14),
        ip_proto::ICMPV6 => key.tp_src == 129,
        _ => false,
    }
}

/// The tuple of the packet embedded in an ICMP error, as the original sender saw it.
pub(super) fn embedded_tuple(frame: &[u8]) -> Option<Tuple> {
    let outer = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let payload = match outer.transport? {
        TransportSlice::Icmpv4(i) => i.payload(),
        TransportSlice::Icmpv6(i) => i.payload(),
        _ => return None,
    };
    let inner = LaxSlicedPacket::from_ip(payload).ok()?;
    let ip = inner.ip_payload()?;
    let (src, dst) = match inner.net.as_ref()? {
        etherparse::LaxNetSlice::Ipv4(v4) => {
            let h = v4.header();
            (
                crate::key::ip_to_wide(h.source_addr().into()),
                crate::key::ip_to_wide(h.destination_addr().into()),
            )
        }
        etherparse::LaxNetSlice::Ipv6(v6) => (v6.header().source(), v6.header().destination()),
        etherparse::LaxNetSlice::Arp(_) => return None,
    };
    let b = ip.payload;
    let (sport, dport) = match ip.ip_number.0 {
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP if b.len() >= 4 => (
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        ),
        ip_proto::ICMP | ip_proto::ICMPV6 if b.len() >= 6 => {
            let id = u16::from_be_bytes([b[4], b[5]]);
            (id, id)
        }
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP | ip_proto::ICMP | ip_proto::ICMPV6 => {
            return None;
        }
        _ => (0, 0),
    };
    Some(Tuple {
        proto: ip.ip_number.0,
        src,
        dst,
        sport,
        dport,
    })
}
