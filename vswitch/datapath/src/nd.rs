//! IPv6 neighbour discovery: answering a solicitation in place.
//!
//! Owns the `nd_advert` action's frame rewrite: a neighbour solicitation
//! (RFC 4861 §4.3) becomes the solicited advertisement (§4.4) for its target,
//! from a given MAC, sent back to the asker. The two messages have the same
//! size when the solicitation carries exactly its source link-layer address
//! option (what every host sends outside duplicate address detection), so the
//! rewrite never moves bytes; anything else is refused and the flow outputs
//! nothing. Duplicate address detection probes (source `::`) are refused too:
//! answering one would make the prober give up an address it may own.

use crate::field::ip_proto;

/// ICMPv6 types.
const SOLICITATION: u8 = 135;
const ADVERTISEMENT: u8 = 136;
/// Neighbour discovery options (type, length in 8-byte units).
const SOURCE_LL: u8 = 1;
const TARGET_LL: u8 = 2;
/// Advertisement flags (the first byte after the checksum).
const ROUTER: u8 = 0x80;
const SOLICITED: u8 = 0x40;
const OVERRIDE: u8 = 0x20;
/// The message: 4 header bytes, 4 reserved/flags, the target, one option.
const MESSAGE: usize = 4 + 4 + 16 + 8;

/// Rewrites the solicitation in `frame` (its IPv6 header at `l3`) into the
/// advertisement for its target from `mac`; false (frame untouched) when it
/// is not a solicitation this can answer.
pub fn advertise(frame: &mut [u8], l3: usize, mac: [u8; 6], router: bool) -> bool {
    let l4 = l3 + 40;
    let Some(ip) = frame.get(l3..l4) else {
        return false;
    };
    let well_formed = ip[0] >> 4 == 6
        && u16::from_be_bytes([ip[4], ip[5]]) as usize == MESSAGE
        && ip[6] == ip_proto::ICMPV6
        && ip[7] == 255
        && ip[8..24] != [0u8; 16];
    let Some(icmp) = frame.get(l4..l4 + MESSAGE) else {
        return false;
    };
    if !well_formed
        || icmp[0] != SOLICITATION
        || icmp[1] != 0
        || icmp[24] != SOURCE_LL
        || icmp[25] != 1
    {
        return false;
    }
    // Ethernet: back to the asker, from `mac`.
    let (dst, src) = frame.split_at_mut(6);
    dst.copy_from_slice(&src[..6]);
    frame[6..12].copy_from_slice(&mac);
    // IPv6: from the target, to the asker.
    let mut target = [0u8; 16];
    target.copy_from_slice(&frame[l4 + 8..l4 + 24]);
    frame.copy_within(l3 + 8..l3 + 24, l3 + 24);
    frame[l3 + 8..l3 + 24].copy_from_slice(&target);
    // ICMPv6: the advertisement, its target unchanged, our link-layer address.
    let m = &mut frame[l4..l4 + MESSAGE];
    m[0] = ADVERTISEMENT;
    m[1] = 0;
    m[2] = 0;
    m[3] = 0;
    m[4] = SOLICITED | OVERRIDE | if router { ROUTER } else { 0 };
    m[5..8].fill(0);
    m[24] = TARGET_LL;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    let sum = checksum(&frame[l3 + 8..l3 + 40], &frame[l4..l4 + MESSAGE]);
    frame[l4 + 2..l4 + 4].copy_from_slice(&sum.to_be_bytes());
    true
}

/// The ICMPv6 checksum over the pseudo-header (`addrs`: source then
/// destination) and `message` (its checksum bytes zero).
fn checksum(addrs: &[u8], message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).map_or(0, |&lo| u32::from(lo));
        }
    };
    add(addrs);
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ip_proto::ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    const ASKER_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 2];
    const OWNER_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 3];

    fn ip(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    /// A solicitation as Linux sends it: to the solicited-node multicast
    /// address, with the source link-layer option.
    fn solicitation(src: [u8; 16], target: [u8; 16], hop_limit: u8) -> Vec<u8> {
        let mut dst = ip("ff02::1:ff00:0");
        dst[13..].copy_from_slice(&target[13..]);
        let mut body = target.to_vec();
        body.extend_from_slice(&[SOURCE_LL, 1]);
        body.extend_from_slice(&ASKER_MAC);
        let mut f = Vec::new();
        PacketBuilder::ethernet2(ASKER_MAC, [0x33, 0x33, 0xff, 0, 0, target[15]])
            .ipv6(src, dst, hop_limit)
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: SOLICITATION,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut f, &body)
            .unwrap();
        f
    }

    #[test]
    fn a_solicitation_becomes_its_advertisement() {
        let asker = ip("fd00::2");
        let target = ip("fd00::3");
        let mut f = solicitation(asker, target, 255);
        assert!(advertise(&mut f, 14, OWNER_MAC, false));
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
            panic!("ethernet")
        };
        assert_eq!(eth.destination(), ASKER_MAC);
        assert_eq!(eth.source(), OWNER_MAC);
        let Some(NetSlice::Ipv6(v6)) = &p.net else {
            panic!("ipv6")
        };
        assert_eq!(v6.header().source(), target);
        assert_eq!(v6.header().destination(), asker);
        assert_eq!(v6.header().hop_limit(), 255);
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("icmpv6")
        };
        assert_eq!(icmp.type_u8(), ADVERTISEMENT);
        assert_eq!(icmp.bytes5to8(), [SOLICITED | OVERRIDE, 0, 0, 0]);
        let payload = icmp.payload();
        assert_eq!(&payload[..16], &target);
        assert_eq!(&payload[16..18], &[TARGET_LL, 1]);
        assert_eq!(&payload[18..24], &OWNER_MAC);
        // The checksum, as etherparse computes it.
        let want = icmp
            .icmp_type()
            .calc_checksum(target, asker, payload)
            .unwrap();
        assert_eq!(icmp.checksum(), want);
        // A router's advertisement says so.
        let mut f = solicitation(asker, target, 255);
        assert!(advertise(&mut f, 14, OWNER_MAC, true));
        assert_eq!(f[14 + 40 + 4], ROUTER | SOLICITED | OVERRIDE);
    }

    #[test]
    fn what_is_not_an_answerable_solicitation_is_left_alone() {
        let target = ip("fd00::3");
        for mut f in [
            // Duplicate address detection: from the unspecified address.
            solicitation([0; 16], target, 255),
            // Forwarded by a router: not link-local.
            solicitation(ip("fd00::2"), target, 64),
            // Truncated.
            solicitation(ip("fd00::2"), target, 255)[..80].to_vec(),
        ] {
            let before = f.clone();
            assert!(!advertise(&mut f, 14, OWNER_MAC, false));
            assert_eq!(f, before);
        }
    }

    #[test]
    fn a_solicitation_keys_on_its_target_and_flows_say_so() {
        use crate::key::{PortNo, parse};
        let k = parse(PortNo(1), &solicitation(ip("fd00::2"), ip("fd00::3"), 255));
        assert!(k.flags.is_clean());
        assert_eq!(
            (k.tp_src, k.nw_dst, k.arp_sha),
            (135, ip("fd00::3"), ASKER_MAC)
        );
        let k = parse(PortNo(1), &solicitation(ip("fd00::2"), ip("fd00::3"), 64));
        assert!(!k.flags.is_clean(), "a forwarded solicitation is discarded");
        let text = "table=20,priority=100,icmp6,icmpv6_type=135,nd_target=fd00::3,nd_sll=0a:58:00:00:00:02,actions=nd_advert(0a:58:00:00:00:03,router),output:IN_PORT";
        let flow = crate::ofctl::parse_flow(text).unwrap();
        let printed = flow.to_string();
        assert!(printed.contains("nd_target=fd00::3"), "{printed}");
        assert!(printed.contains("nd_sll=0a:58:00:00:00:02"), "{printed}");
        assert!(
            printed.contains("nd_advert(0a:58:00:00:00:03,router)"),
            "{printed}"
        );
        assert_eq!(crate::ofctl::parse_flow(&printed).unwrap(), flow);
        let not_ns = crate::ofctl::parse_flow(
            "table=20,priority=1,icmp6,actions=nd_advert(0a:58:00:00:00:03)",
        );
        assert!(not_ns.is_err(), "nd_advert needs a solicitation match");
    }
}
