//! The answer `reject` gives: what a host with nothing listening would say.
//!
//! Owns building the reply to a packet that is refused out loud (a Service
//! with no endpoints): a TCP reset for TCP, an ICMP destination unreachable
//! (port unreachable) for anything else, from the address the packet was
//! sent to, back to its sender, so the client fails at once instead of
//! waiting for a timeout.

use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, SlicedPacket, TransportSlice};

use crate::field::ether_type;
use crate::key::FlowKey;

/// Bytes of the refused packet an ICMP error carries back (IPv4 keeps the
/// error within 576 bytes, IPv6 within the 1280-byte minimum MTU).
const QUOTE_V4: usize = 548;
const QUOTE_V6: usize = 1232;

/// Writes into `out` the reply refusing `frame` (parsed as `key`); false
/// when there is nothing to answer (not IP, a reset, or ICMP, which are
/// never answered).
pub fn build(frame: &[u8], key: &FlowKey, out: &mut Vec<u8>) -> bool {
    out.clear();
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let (Some(net), Some(_)) = (p.net.as_ref(), p.link.as_ref()) else {
        return false;
    };
    let ip_start = match net {
        etherparse::NetSlice::Ipv4(v4) => v4.header().slice().as_ptr() as usize,
        etherparse::NetSlice::Ipv6(v6) => v6.header().slice().as_ptr() as usize,
        _ => return false,
    } - frame.as_ptr() as usize;
    let eth = PacketBuilder::ethernet2(key.dl_dst, key.dl_src);
    let v6 = key.dl_type == ether_type::IPV6;
    let ip = if v6 {
        eth.ipv6(key.nw_dst, key.nw_src, 64)
    } else {
        let (s, d) = (&key.nw_dst[12..], &key.nw_src[12..]);
        eth.ipv4(s.try_into().expect("4"), d.try_into().expect("4"), 64)
    };
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            if t.rst() {
                return false;
            }
            let data = t.payload().len() as u32 + u32::from(t.syn()) + u32::from(t.fin());
            let b = if t.ack() {
                ip.tcp(
                    t.destination_port(),
                    t.source_port(),
                    t.acknowledgment_number(),
                    0,
                )
                .rst()
            } else {
                ip.tcp(t.destination_port(), t.source_port(), 0, 0)
                    .rst()
                    .ack(t.sequence_number().wrapping_add(data))
            };
            b.write(out, &[]).is_ok()
        }
        // ICMP is never refused this way (errors must not answer errors).
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => false,
        _ => {
            let quoted = &frame[ip_start..];
            let r = if v6 {
                let q = &quoted[..quoted.len().min(QUOTE_V6)];
                ip.icmpv6(Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::Port,
                ))
                .write(out, q)
            } else {
                let q = &quoted[..quoted.len().min(QUOTE_V4)];
                ip.icmpv4(Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ))
                .write(out, q)
            };
            r.is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{PortNo, parse};

    #[test]
    fn a_syn_gets_a_reset_and_a_datagram_port_unreachable() {
        let mut syn = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 96, 0, 10], 64)
            .tcp(40000, 80, 1000, 100)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let mut out = Vec::new();
        assert!(build(&syn, &parse(PortNo(1), &syn), &mut out));
        {
            let r = SlicedPacket::from_ethernet(&out).unwrap();
            let Some(TransportSlice::Tcp(t)) = r.transport else {
                panic!()
            };
            assert!(t.rst() && t.ack());
            assert_eq!(t.acknowledgment_number(), 1001);
            assert_eq!((t.source_port(), t.destination_port()), (80, 40000));
        }
        assert!(crate::nat::transport_checksum_ok(&out));

        let mut dns = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(5353, 53)
            .write(&mut dns, b"query")
            .unwrap();
        assert!(build(&dns, &parse(PortNo(1), &dns), &mut out));
        {
            let r = SlicedPacket::from_ethernet(&out).unwrap();
            let Some(TransportSlice::Icmpv6(i)) = r.transport else {
                panic!()
            };
            assert!(matches!(
                i.icmp_type(),
                Icmpv6Type::DestinationUnreachable(_)
            ));
        }
        assert!(crate::nat::transport_checksum_ok(&out));
        // A reset is never answered.
        let mut rst = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 96, 0, 10], 64)
            .tcp(40000, 80, 1000, 100)
            .rst()
            .write(&mut rst, &[])
            .unwrap();
        assert!(!build(&rst, &parse(PortNo(1), &rst), &mut out));
    }
}
