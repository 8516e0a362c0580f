//! Packet -> flow key.
//!
//! Owns the validation of frames at the edge of the switch: bytes go in, a fixed-size
//! [`FlowKey`] comes out, and nothing past this module looks at raw headers again
//! (except conntrack for ICMP error payloads). Parsing never panics and never
//! allocates: a truncated or malformed frame yields what could be parsed plus a flag.

use std::net::IpAddr;

use etherparse::{
    LaxLinkExtSlice, LaxNetSlice, LaxSlicedPacket, LinkSlice, TransportSlice,
    err::{Layer, packet::SliceError},
};

use crate::field::{FRAG_ANY, FRAG_LATER, Field, MatchKey, ether_type, ip_proto, mac_value};

/// An OpenFlow-style port number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct PortNo(pub u32);

impl PortNo {
    /// "The port the packet came in on", as an output target.
    pub const IN_PORT: PortNo = PortNo(0xffff_fff8);
    /// The control plane (punt).
    pub const CONTROLLER: PortNo = PortNo(0xffff_fffd);
    /// Not a port: used for keys built by hand with no ingress port.
    pub const NONE: PortNo = PortNo(0xffff_ffff);
}

impl std::fmt::Display for PortNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            PortNo::IN_PORT => f.write_str("IN_PORT"),
            PortNo::CONTROLLER => f.write_str("CONTROLLER"),
            PortNo::NONE => f.write_str("NONE"),
            PortNo(n) => write!(f, "{n}"),
        }
    }
}

/// Parse outcome flags carried in the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct KeyFlags(pub u8);

impl KeyFlags {
    /// The frame ended before a header it announced.
    pub const TRUNCATED: u8 = 0x01;
    /// A header was present but invalid (bad version, length, ...).
    pub const MALFORMED: u8 = 0x02;
    /// More than one VLAN tag (only the outer one is in the key).
    pub const MULTI_VLAN: u8 = 0x04;

    pub fn contains(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// Whether the key is complete and trustworthy.
    pub fn is_clean(self) -> bool {
        self.0 & (Self::TRUNCATED | Self::MALFORMED) == 0
    }
}

/// Everything the pipeline and conntrack know about a packet, parsed once.
///
/// Addresses are 16 bytes wide; IPv4 addresses are stored mapped
/// (`::ffff:a.b.c.d`). ARP reuses `nw_*` like OVS: `nw_proto` holds the opcode,
/// `nw_src`/`nw_dst` the sender/target protocol address. ICMP type and code live in
/// `tp_src`/`tp_dst`, also like OVS.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FlowKey {
    pub in_port: PortNo,
    pub dl_src: [u8; 6],
    pub dl_dst: [u8; 6],
    pub dl_type: u16,
    /// 802.1Q TCI with the CFI bit (0x1000) set when a tag is present, as OVS does.
    pub vlan_tci: u16,
    pub nw_src: [u8; 16],
    pub nw_dst: [u8; 16],
    pub nw_proto: u8,
    pub nw_frag: u8,
    pub tp_src: u16,
    pub tp_dst: u16,
    pub tcp_flags: u16,
    pub arp_sha: [u8; 6],
    pub arp_tha: [u8; 6],
    /// ICMP/ICMPv6 echo identifier (conntrack uses it as the "port").
    pub icmp_id: u16,
    /// Type of the first SCTP chunk (conntrack state machine input).
    pub sctp_chunk: u8,
    pub flags: KeyFlags,
}

/// IPv4 in the mapped form used by the wide address fields.
fn v4(bytes: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&bytes);
    out
}

impl FlowKey {
    /// Whether the key is IPv4 or IPv6.
    pub fn is_ip(&self) -> bool {
        self.dl_type == ether_type::IPV4 || self.dl_type == ether_type::IPV6
    }

    /// The source address as an [`IpAddr`] (IPv4 when mapped).
    pub fn src_ip(&self) -> IpAddr {
        wide_to_ip(self.nw_src)
    }

    /// The destination address as an [`IpAddr`] (IPv4 when mapped).
    pub fn dst_ip(&self) -> IpAddr {
        wide_to_ip(self.nw_dst)
    }

    /// Packs the key into classifier words; metadata fields start at zero except
    /// `in_port`.
    #[inline]
    pub fn to_match_key(&self) -> MatchKey {
        let mut k = MatchKey::default();
        k.set(Field::InPort, u128::from(self.in_port.0));
        k.set(Field::DlSrc, mac_value(self.dl_src));
        k.set(Field::DlDst, mac_value(self.dl_dst));
        k.set(Field::DlType, u128::from(self.dl_type));
        k.set(Field::VlanTci, u128::from(self.vlan_tci));
        k.set(Field::NwSrc, u128::from_be_bytes(self.nw_src));
        k.set(Field::NwDst, u128::from_be_bytes(self.nw_dst));
        k.set(Field::NwProto, u128::from(self.nw_proto));
        k.set(Field::NwFrag, u128::from(self.nw_frag));
        k.set(Field::TpSrc, u128::from(self.tp_src));
        k.set(Field::TpDst, u128::from(self.tp_dst));
        k.set(Field::TcpFlags, u128::from(self.tcp_flags));
        k.set(Field::ArpSha, mac_value(self.arp_sha));
        k.set(Field::ArpTha, mac_value(self.arp_tha));
        k
    }

    /// Rebuilds the packet part of a key from classifier words (the inverse of
    /// [`FlowKey::to_match_key`] for header fields). Used by trace, where a packet is
    /// described by fields rather than bytes.
    pub fn from_match_key(k: &MatchKey) -> FlowKey {
        let mac = |f| crate::field::mac_bytes(k.get(f));
        FlowKey {
            in_port: PortNo(k.get(Field::InPort) as u32),
            dl_src: mac(Field::DlSrc),
            dl_dst: mac(Field::DlDst),
            dl_type: k.get(Field::DlType) as u16,
            vlan_tci: k.get(Field::VlanTci) as u16,
            nw_src: k.get(Field::NwSrc).to_be_bytes(),
            nw_dst: k.get(Field::NwDst).to_be_bytes(),
            nw_proto: k.get(Field::NwProto) as u8,
            nw_frag: k.get(Field::NwFrag) as u8,
            tp_src: k.get(Field::TpSrc) as u16,
            tp_dst: k.get(Field::TpDst) as u16,
            tcp_flags: k.get(Field::TcpFlags) as u16,
            arp_sha: mac(Field::ArpSha),
            arp_tha: mac(Field::ArpTha),
            icmp_id: 0,
            sctp_chunk: 0,
            flags: KeyFlags::default(),
        }
    }
}

/// A 16-byte address as an [`IpAddr`], IPv4 when it is mapped.
pub fn wide_to_ip(a: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// An [`IpAddr`] in the 16-byte form of the wide address fields.
pub fn ip_to_wide(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Parses an Ethernet frame received on `in_port` into a [`FlowKey`].
///
/// Never fails: whatever could not be parsed is left zero and flagged in
/// [`FlowKey::flags`].
#[inline]
pub fn parse(in_port: PortNo, frame: &[u8]) -> FlowKey {
    match parse_fast(in_port, frame) {
        Some(key) => key,
        None => parse_general(in_port, frame),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The common shapes (Ethernet, at most one VLAN tag, unfragmented IPv4 or IPv6
/// without extension headers, TCP/UDP/ICMP with complete headers) parsed by hand:
/// etherparse's general slicer costs more than the whole cache-hit budget. Anything
/// unusual returns `None` and goes to [`parse_general`]; a property test checks that
/// both agree on every frame this accepts.
#[inline]
fn parse_fast(in_port: PortNo, frame: &[u8]) -> Option<FlowKey> {
    if frame.len() < 14 {
        return None;
    }
    let mut key = FlowKey {
        in_port,
        ..FlowKey::default()
    };
    key.dl_dst.copy_from_slice(&frame[0..6]);
    key.dl_src.copy_from_slice(&frame[6..12]);
    let mut et = be16(frame, 12);
    let mut off = 14;
    if et == ether_type::VLAN {
        if frame.len() < 18 {
            return None;
        }
        key.vlan_tci = be16(frame, 14) | 0x1000;
        et = be16(frame, 16);
        off = 18;
        if matches!(et, 0x8100 | 0x88a8 | 0x9100 | 0x88e5) {
            return None;
        }
    }
    key.dl_type = et;
    let ip = &frame[off..];
    let l4 = match et {
        ether_type::IPV4 => {
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(be16(ip, 2));
            if ihl < 20 || total < ihl || total > ip.len() || be16(ip, 6) & 0x3fff != 0 {
                return None;
            }
            key.nw_proto = ip[9];
            if !matches!(key.nw_proto, ip_proto::TCP | ip_proto::UDP | ip_proto::ICMP) {
                return None;
            }
            let mut src = [0u8; 4];
            let mut dst = [0u8; 4];
            src.copy_from_slice(&ip[12..16]);
            dst.copy_from_slice(&ip[16..20]);
            key.nw_src = v4(src);
            key.nw_dst = v4(dst);
            &ip[ihl..total]
        }
        ether_type::IPV6 => {
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return None;
            }
            let end = 40 + usize::from(be16(ip, 4));
            key.nw_proto = ip[6];
            if end > ip.len()
                || !matches!(
                    key.nw_proto,
                    ip_proto::TCP | ip_proto::UDP | ip_proto::ICMPV6
                )
            {
                return None;
            }
            key.nw_src.copy_from_slice(&ip[8..24]);
            key.nw_dst.copy_from_slice(&ip[24..40]);
            &ip[40..end]
        }
        _ => return None,
    };
    match key.nw_proto {
        ip_proto::TCP => {
            if l4.len() < 20 {
                return None;
            }
            let hl = usize::from(l4[12] >> 4) * 4;
            if hl < 20 || hl > l4.len() {
                return None;
            }
            key.tcp_flags = (u16::from(l4[12] & 0x01) << 8) | u16::from(l4[13]);
        }
        ip_proto::UDP => {
            let len = usize::from(be16(l4.get(..8)?, 4));
            if len < 8 || len > l4.len() {
                return None;
            }
        }
        _ => {
            // ICMP / ICMPv6 echo only (other types have type-specific header
            // lengths): type, code, checksum, identifier, sequence.
            let echo = if key.nw_proto == ip_proto::ICMP {
                matches!(l4.first(), Some(0 | 8))
            } else {
                matches!(l4.first(), Some(128 | 129))
            };
            if !echo || l4.len() < 8 {
                return None;
            }
            key.tp_src = u16::from(l4[0]);
            key.tp_dst = u16::from(l4[1]);
            key.icmp_id = be16(l4, 4);
            return Some(key);
        }
    }
    key.tp_src = be16(l4, 0);
    key.tp_dst = be16(l4, 2);
    Some(key)
}

/// Whether the IPv6 extension headers `exts` (raw, starting with header type
/// `next`) hold a fragment header with a non-zero offset.
///
/// Walks the raw bytes with bounds checks instead of etherparse's extension
/// iterator: on laxly parsed, truncated headers that iterator reads out of bounds
/// (etherparse 0.21, found by our fuzz target `frame`).
fn ipv6_later_fragment(mut next: u8, exts: &[u8]) -> bool {
    let mut at = 0usize;
    loop {
        let Some(h) = exts.get(at..at + 8) else {
            return false;
        };
        let len = match next {
            // Fragment: offset in the top 13 bits of bytes 2-3.
            44 => return u16::from_be_bytes([h[2], h[3]]) >> 3 != 0,
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => (usize::from(h[1]) + 1) * 8,
            51 => (usize::from(h[1]) + 2) * 4,
            _ => return false,
        };
        next = h[0];
        at += len;
    }
}

/// A neighbour solicitation or advertisement: like OVS, its target goes in
/// `nw_dst` (the message's own destination, a solicited-node multicast
/// address, is needed by no table) and its source / target link-layer
/// address options in `arp_sha` / `arp_tha` (`nd_target`, `nd_sll`, `nd_tll`
/// in flows). RFC 4861 makes receivers discard one that a router forwarded
/// (hop limit below 255), with a code, or too short: malformed here.
fn neighbour_discovery(key: &mut FlowKey, code: u8, hop_limit: u8, body: &[u8]) {
    let Some(target) = body.get(..16) else {
        key.flags.0 |= KeyFlags::MALFORMED;
        return;
    };
    if code != 0 || hop_limit != 255 {
        key.flags.0 |= KeyFlags::MALFORMED;
        return;
    }
    key.nw_dst.copy_from_slice(target);
    let mut options = &body[16..];
    while let [kind, len, ..] = *options {
        let bytes = usize::from(len) * 8;
        if bytes == 0 || bytes > options.len() {
            key.flags.0 |= KeyFlags::MALFORMED;
            return;
        }
        if len == 1 {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&options[2..8]);
            match kind {
                1 => key.arp_sha = mac,
                2 => key.arp_tha = mac,
                _ => {}
            }
        }
        options = &options[bytes..];
    }
}

/// The general parser: every shape etherparse knows, lax about truncation.
pub fn parse_general(in_port: PortNo, frame: &[u8]) -> FlowKey {
    let mut key = FlowKey {
        in_port,
        ..FlowKey::default()
    };
    let pkt = match LaxSlicedPacket::from_ethernet(frame) {
        Ok(p) => p,
        Err(_) => {
            key.flags.0 |= KeyFlags::TRUNCATED;
            return key;
        }
    };
    if let Some(LinkSlice::Ethernet2(eth)) = &pkt.link {
        key.dl_src = eth.source();
        key.dl_dst = eth.destination();
        key.dl_type = eth.ether_type().0;
    }
    let mut tags = pkt.link_exts.iter();
    if let Some(LaxLinkExtSlice::Vlan(vlan)) = tags.next() {
        let tci = vlan.header_slice();
        key.vlan_tci = u16::from_be_bytes([tci[0], tci[1]]) | 0x1000;
        key.dl_type = vlan.ether_type().0;
        if tags.next().is_some() {
            key.flags.0 |= KeyFlags::MULTI_VLAN;
        }
    }
    if let Some((err, layer)) = &pkt.stop_err {
        key.flags.0 |= match err {
            SliceError::Len(_) => KeyFlags::TRUNCATED,
            _ => KeyFlags::MALFORMED,
        };
        // A stop inside the link layer leaves the EtherType meaningless.
        if matches!(layer, Layer::VlanHeader | Layer::MacsecHeader) {
            return key;
        }
    }
    match &pkt.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            let h = ip.header();
            key.nw_src = v4(h.source());
            key.nw_dst = v4(h.destination());
            key.nw_proto = h.protocol().0;
            // The header claims more bytes than the frame holds.
            if ip.payload().incomplete {
                key.flags.0 |= KeyFlags::TRUNCATED;
            }
            if ip.payload().fragmented {
                key.nw_frag = FRAG_ANY;
                if h.fragments_offset().value() != 0 {
                    key.nw_frag |= FRAG_LATER;
                }
            }
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            let h = ip.header();
            key.nw_src = h.source();
            key.nw_dst = h.destination();
            key.nw_proto = ip.payload().ip_number.0;
            if ip.payload().incomplete {
                key.flags.0 |= KeyFlags::TRUNCATED;
            }
            if ip.payload().fragmented {
                key.nw_frag = FRAG_ANY;
                let later = ipv6_later_fragment(h.next_header().0, ip.extensions().slice());
                if later {
                    key.nw_frag |= FRAG_LATER;
                }
            }
        }
        Some(LaxNetSlice::Arp(arp)) => {
            key.nw_proto = arp.operation().0 as u8;
            let (spa, tpa) = (arp.sender_protocol_addr(), arp.target_protocol_addr());
            let (sha, tha) = (arp.sender_hw_addr(), arp.target_hw_addr());
            if let (Ok(spa), Ok(tpa)) = (<[u8; 4]>::try_from(spa), <[u8; 4]>::try_from(tpa)) {
                key.nw_src = v4(spa);
                key.nw_dst = v4(tpa);
            } else {
                key.flags.0 |= KeyFlags::MALFORMED;
            }
            if let (Ok(sha), Ok(tha)) = (<[u8; 6]>::try_from(sha), <[u8; 6]>::try_from(tha)) {
                key.arp_sha = sha;
                key.arp_tha = tha;
            } else {
                key.flags.0 |= KeyFlags::MALFORMED;
            }
            return key;
        }
        None => return key,
    }
    if key.nw_frag & FRAG_LATER != 0 {
        return key;
    }
    match &pkt.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            key.tp_src = tcp.source_port();
            key.tp_dst = tcp.destination_port();
            let hdr = tcp.header_slice();
            key.tcp_flags = (u16::from(hdr[12] & 0x01) << 8) | u16::from(hdr[13]);
        }
        Some(TransportSlice::Udp(udp)) => {
            key.tp_src = udp.source_port();
            key.tp_dst = udp.destination_port();
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            key.tp_src = u16::from(icmp.type_u8());
            key.tp_dst = u16::from(icmp.code_u8());
            if matches!(icmp.type_u8(), 0 | 8 | 13 | 14) {
                let b = icmp.bytes5to8();
                key.icmp_id = u16::from_be_bytes([b[0], b[1]]);
            }
        }
        Some(TransportSlice::Icmpv6(icmp)) => {
            key.tp_src = u16::from(icmp.type_u8());
            key.tp_dst = u16::from(icmp.code_u8());
            if matches!(icmp.type_u8(), 128 | 129) {
                let b = icmp.bytes5to8();
                key.icmp_id = u16::from_be_bytes([b[0], b[1]]);
            }
            if matches!(icmp.type_u8(), 135 | 136) {
                let hop_limit = match &pkt.net {
                    Some(LaxNetSlice::Ipv6(ip)) => ip.header().hop_limit(),
                    _ => 0,
                };
                neighbour_discovery(&mut key, icmp.code_u8(), hop_limit, icmp.payload());
            }
        }
        Some(TransportSlice::Igmp(_)) => {}
        None => {
            // etherparse has no SCTP support; its common header is fixed:
            // ports (4), verification tag (4), checksum (4), then the first chunk.
            if key.nw_proto == ip_proto::SCTP
                && let Some(p) = pkt.ip_payload()
            {
                let b = p.payload;
                if b.len() >= 4 {
                    key.tp_src = u16::from_be_bytes([b[0], b[1]]);
                    key.tp_dst = u16::from_be_bytes([b[2], b[3]]);
                }
                match b.get(12) {
                    Some(chunk) if b.len() >= 16 => key.sctp_chunk = *chunk,
                    _ => key.flags.0 |= KeyFlags::TRUNCATED,
                }
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn tcp_over_ipv4() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1234, 80, 1, 1000)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        let k = parse(PortNo(3), &f);
        assert_eq!(k.in_port, PortNo(3));
        assert_eq!(k.dl_src, A);
        assert_eq!(k.dl_type, ether_type::IPV4);
        assert_eq!(k.src_ip(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(k.nw_proto, ip_proto::TCP);
        assert_eq!((k.tp_src, k.tp_dst), (1234, 80));
        assert_eq!(k.tcp_flags, crate::field::tcp_flags::SYN);
        assert!(k.flags.is_clean());
    }

    #[test]
    fn ip_length_beyond_the_frame_is_truncated() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut f, &[0; 8])
            .unwrap();
        assert!(parse(PortNo(1), &f).flags.is_clean());
        f[16..18].copy_from_slice(&9000u16.to_be_bytes());
        assert!(!parse(PortNo(1), &f).flags.is_clean(), "IPv4 total length");
        let mut g = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv6([1; 16], [2; 16], 64)
            .udp(1, 2)
            .write(&mut g, &[0; 8])
            .unwrap();
        g[18..20].copy_from_slice(&9000u16.to_be_bytes());
        assert!(
            !parse(PortNo(1), &g).flags.is_clean(),
            "IPv6 payload length"
        );
    }

    #[test]
    fn vlan_udp_ipv6() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(53, 5353)
            .write(&mut f, &[1, 2, 3])
            .unwrap();
        let k = parse(PortNo(1), &f);
        assert_eq!(k.vlan_tci & 0x1fff, 0x1000 | 42);
        assert_eq!(k.dl_type, ether_type::IPV6);
        assert_eq!(k.nw_src, [0xfd; 16]);
        assert_eq!((k.nw_proto, k.tp_src, k.tp_dst), (ip_proto::UDP, 53, 5353));
    }

    #[test]
    fn icmp_echo_and_truncation() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(0x77, 1)
            .write(&mut f, &[0; 8])
            .unwrap();
        let k = parse(PortNo(1), &f);
        assert_eq!((k.tp_src, k.tp_dst, k.icmp_id), (8, 0, 0x77));
        let cut = parse(PortNo(1), &f[..20]);
        assert!(!cut.flags.is_clean());
        assert_eq!(cut.dl_src, A, "link layer survives truncation above it");
        assert!(!parse(PortNo(1), &[]).flags.is_clean());
    }

    #[test]
    fn arp_request() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, [0xff; 6])
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    etherparse::EtherType::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &A,
                    &[10, 0, 0, 1],
                    &[0; 6],
                    &[10, 0, 0, 9],
                )
                .unwrap(),
            )
            .write(&mut f)
            .unwrap();
        let k = parse(PortNo(1), &f);
        assert_eq!(k.dl_type, ether_type::ARP);
        assert_eq!(k.nw_proto, 1);
        assert_eq!(k.arp_sha, A);
        assert_eq!(k.dst_ip(), "10.0.0.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn sctp_ports_from_raw_payload() {
        let mut f = Vec::new();
        let mut sctp = vec![0u8; 16];
        sctp[..4].copy_from_slice(&[0x12, 0x34, 0x00, 0x51]);
        sctp[12] = 1; // INIT
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .write(&mut f, etherparse::IpNumber(132), &sctp)
            .unwrap();
        let k = parse(PortNo(1), &f);
        assert_eq!(
            (k.nw_proto, k.tp_src, k.tp_dst, k.sctp_chunk),
            (132, 0x1234, 81, 1)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        #[test]
        fn fast_path_agrees_with_etherparse(
            kind in 0u8..6,
            vlan in proptest::option::of(0u16..4095),
            ports in proptest::prelude::any::<(u16, u16)>(),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            flips in proptest::collection::vec((12usize..80, proptest::prelude::any::<u8>()), 0..3),
            cut in 0usize..130,
        ) {
            let mut f = Vec::new();
            let (s, d) = ports;
            match kind {
                0 => PacketBuilder::ethernet2(A, B).ipv4([1, 2, 3, 4], [5, 6, 7, 8], 9).tcp(s, d, 1, 2).syn().write(&mut f, &payload).unwrap(),
                1 => PacketBuilder::ethernet2(A, B).ipv4([1, 2, 3, 4], [5, 6, 7, 8], 9).udp(s, d).write(&mut f, &payload).unwrap(),
                2 => PacketBuilder::ethernet2(A, B).ipv4([1, 2, 3, 4], [5, 6, 7, 8], 9).icmpv4_echo_request(s, d).write(&mut f, &payload).unwrap(),
                3 => PacketBuilder::ethernet2(A, B).ipv6([1; 16], [2; 16], 9).tcp(s, d, 1, 2).ack(3).write(&mut f, &payload).unwrap(),
                4 => PacketBuilder::ethernet2(A, B).ipv6([1; 16], [2; 16], 9).udp(s, d).write(&mut f, &payload).unwrap(),
                _ => PacketBuilder::ethernet2(A, B).ipv6([1; 16], [2; 16], 9).icmpv6_echo_reply(s, d).write(&mut f, &payload).unwrap(),
            }
            if let Some(v) = vlan {
                let tag = [0x81, 0x00, (v >> 8) as u8, v as u8];
                f.splice(12..12, tag);
            }
            if flips.is_empty() {
                proptest::prop_assert!(parse_fast(PortNo(1), &f).is_some(), "intact frame takes the fast path");
            }
            for (at, byte) in flips {
                if let Some(x) = f.get_mut(at) { *x = byte; }
            }
            if cut > 20 {
                f.truncate(cut);
            }
            if let Some(fast) = parse_fast(PortNo(1), &f) {
                proptest::prop_assert_eq!(fast, parse_general(PortNo(1), &f), "frame {:02x?}", f);
            }
        }
    }

    #[test]
    fn truncated_ipv6_extensions_found_by_fuzzing() {
        // fuzz/artifacts/frame/crash-8684fdaf...: etherparse's extension iterator
        // read out of bounds on this frame.
        let frame = [
            113u8, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 38, 8, 0, 106, 37, 44, 44, 44, 44, 44, 44, 44, 44,
            44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44, 44,
            44, 44, 44, 44, 44, 44, 44, 0, 0, 74, 0, 1, 0, 0, 38, 8, 0, 106, 255, 255, 255, 255,
            255, 6, 0, 255, 0, 106, 5, 0, 38, 8, 61, 106, 5, 199, 199, 0, 0, 0, 77, 0, 199,
        ];
        let _ = parse(PortNo(1), &frame);
    }

    #[test]
    fn ipv6_fragment_offsets() {
        // Hop-by-hop (8 bytes) then a fragment header with offset 185 (x8 bytes).
        let mut exts = vec![44u8, 0, 0, 0, 0, 0, 0, 0];
        exts.extend([17, 0, 0x05, 0xc8, 0, 0, 0, 1]);
        assert!(ipv6_later_fragment(0, &exts));
        exts[10] = 0;
        exts[11] = 0x01; // offset 0, more fragments
        assert!(!ipv6_later_fragment(0, &exts));
        assert!(!ipv6_later_fragment(0, &exts[..12]), "truncated");
    }

    #[test]
    fn match_key_round_trip() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 3, 4)
            .ack(1)
            .write(&mut f, &[])
            .unwrap();
        let k = parse(PortNo(7), &f);
        assert_eq!(FlowKey::from_match_key(&k.to_match_key()), k);
    }
}
