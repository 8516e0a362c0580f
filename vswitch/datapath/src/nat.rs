//! Address and port translation of frames: the byte work behind `ct(nat)`.
//!
//! Owns rewriting a frame's addresses and ports with every checksum that
//! covers them kept right: the IPv4 header checksum, the TCP / UDP / ICMPv6
//! checksums (incrementally, RFC 1624; also when the checksum is left to the
//! receiver and holds only the pseudo-header sum), SCTP's CRC32c (recomputed),
//! and for an ICMP error the packet it embeds (so the sender recognises the
//! connection it knows). Non-first fragments get their addresses only.

use crate::field::{ether_type, ip_proto};

/// A packet's ends: addresses (IPv4 mapped) and ports (0 where there are none).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Ends {
    pub src: [u8; 16],
    pub sport: u16,
    pub dst: [u8; 16],
    pub dport: u16,
}

impl Ends {
    /// A packet's ends as translation sees them: ports only for TCP, UDP
    /// and SCTP.
    pub fn of(k: &crate::key::FlowKey) -> Ends {
        let ported = matches!(k.nw_proto, ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP);
        Ends {
            src: k.nw_src,
            sport: if ported { k.tp_src } else { 0 },
            dst: k.nw_dst,
            dport: if ported { k.tp_dst } else { 0 },
        }
    }

    /// The same ends seen from the other direction.
    pub fn reversed(self) -> Ends {
        Ends {
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// Where a frame's headers sit.
struct Layout {
    l3: usize,
    v6: bool,
    proto: u8,
    /// Start of the transport header; `None` for a non-first fragment.
    l4: Option<usize>,
}

fn layout(frame: &[u8]) -> Option<Layout> {
    let mut l3 = 14;
    let mut ty = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ty == 0x8100 {
        ty = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        l3 = 18;
    }
    match ty {
        ether_type::IPV4 => {
            let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
            if ihl < 20 || frame.len() < l3 + ihl {
                return None;
            }
            let offset = u16::from_be_bytes([frame[l3 + 6], frame[l3 + 7]]) & 0x1fff;
            Some(Layout {
                l3,
                v6: false,
                proto: frame[l3 + 9],
                l4: (offset == 0).then_some(l3 + ihl),
            })
        }
        ether_type::IPV6 => {
            if frame.len() < l3 + 40 {
                return None;
            }
            let mut next = frame[l3 + 6];
            let mut at = l3 + 40;
            loop {
                match next {
                    0 | 43 | 60 => {
                        next = *frame.get(at)?;
                        at += (usize::from(*frame.get(at + 1)?) + 1) * 8;
                    }
                    44 => {
                        let offset =
                            u16::from_be_bytes([*frame.get(at + 2)?, *frame.get(at + 3)?]) >> 3;
                        next = frame[at];
                        at += 8;
                        if offset != 0 {
                            return Some(Layout {
                                l3,
                                v6: true,
                                proto: next,
                                l4: None,
                            });
                        }
                    }
                    _ => break,
                }
            }
            Some(Layout {
                l3,
                v6: true,
                proto: next,
                l4: Some(at),
            })
        }
        _ => None,
    }
}

/// One's-complement sum of 16-bit words, unfolded.
fn sum(bytes: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A checksum field at `at` after `old` became `new` (equal lengths, even).
/// `partial`: the field holds the uncomplemented pseudo-header sum
/// (checksum left to the receiver), not a finished checksum.
fn adjust(frame: &mut [u8], at: usize, old: &[u8], new: &[u8], partial: bool) {
    let Some(field) = frame.get(at..at + 2) else {
        return;
    };
    let check = u16::from_be_bytes([field[0], field[1]]);
    let base = if partial { check } else { !check };
    let s = u32::from(base)
        + sum(new)
        + old
            .chunks(2)
            .map(|c| u32::from(!u16::from_be_bytes([c[0], c[1]])))
            .sum::<u32>();
    let folded = fold(s);
    let out = if partial { folded } else { !folded };
    frame[at..at + 2].copy_from_slice(&out.to_be_bytes());
}

fn addr_bytes(a: &[u8; 16], v6: bool) -> &[u8] {
    if v6 { &a[..] } else { &a[12..] }
}

/// Rewrites the frame's ends to `to` (ports only for TCP, UDP and SCTP),
/// keeping every checksum right. `partial`: the transport checksum is left to
/// the receiver (it holds the pseudo-header sum). False when the frame is not
/// an IP packet of `to`'s family.
pub fn set_ends(frame: &mut [u8], to: &Ends, partial: bool) -> bool {
    let Some(l) = layout(frame) else {
        return false;
    };
    let v4_target = to.src[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if v4_target == l.v6 {
        return false;
    }
    let (src_at, len) = if l.v6 { (l.l3 + 8, 16) } else { (l.l3 + 12, 4) };
    let old_src: Vec<u8> = frame[src_at..src_at + len].to_vec();
    let old_dst: Vec<u8> = frame[src_at + len..src_at + 2 * len].to_vec();
    let new_src = addr_bytes(&to.src, l.v6);
    let new_dst = addr_bytes(&to.dst, l.v6);
    frame[src_at..src_at + len].copy_from_slice(new_src);
    frame[src_at + len..src_at + 2 * len].copy_from_slice(new_dst);
    if !l.v6 {
        adjust(frame, l.l3 + 10, &old_src, new_src, false);
        adjust(frame, l.l3 + 10, &old_dst, new_dst, false);
    }
    let Some(l4) = l.l4 else {
        return true;
    };
    // Where the transport checksum is, and whether it covers the pseudo-header.
    let check = match l.proto {
        ip_proto::TCP => Some(l4 + 16),
        ip_proto::UDP => {
            let at = l4 + 6;
            // An IPv4 UDP checksum of zero means none: it stays none.
            let none = !l.v6 && frame.get(at..at + 2) == Some(&[0, 0]);
            (!none).then_some(at)
        }
        ip_proto::ICMPV6 => Some(l4 + 2),
        _ => None,
    };
    if let Some(at) = check {
        adjust(frame, at, &old_src, new_src, partial);
        adjust(frame, at, &old_dst, new_dst, partial);
    }
    if matches!(l.proto, ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP) && frame.len() >= l4 + 4 {
        let old_ports: [u8; 4] = frame[l4..l4 + 4].try_into().expect("4 bytes");
        let mut new_ports = [0u8; 4];
        new_ports[..2].copy_from_slice(&to.sport.to_be_bytes());
        new_ports[2..].copy_from_slice(&to.dport.to_be_bytes());
        if old_ports != new_ports {
            frame[l4..l4 + 4].copy_from_slice(&new_ports);
            match (l.proto, check) {
                (ip_proto::SCTP, _) => sctp_checksum(&mut frame[l4..]),
                (_, Some(at)) if !partial => adjust(frame, at, &old_ports, &new_ports, false),
                _ => {}
            }
        }
    }
    if l.proto == ip_proto::UDP
        && let Some(at) = check
        && frame.get(at..at + 2) == Some(&[0, 0])
        && !partial
    {
        frame[at..at + 2].copy_from_slice(&[0xff, 0xff]);
    }
    true
}

/// Rewrites an ICMP error: its own ends to `outer` and the packet it embeds
/// to `inner` (addresses, ports, the embedded IPv4 header checksum and, when
/// the embedded transport checksum is there, that too), then the ICMP
/// checksum over the result. False when the frame is not such an error.
pub fn set_error_ends(frame: &mut [u8], outer: &Ends, inner: &Ends) -> bool {
    let Some(l) = layout(frame) else {
        return false;
    };
    let Some(l4) = l.l4 else {
        return false;
    };
    if !matches!(l.proto, ip_proto::ICMP | ip_proto::ICMPV6) || frame.len() < l4 + 8 {
        return false;
    }
    // The outer addresses (with the IPv4 header checksum; the ICMP checksum
    // is recomputed below).
    let (src_at, len) = if l.v6 { (l.l3 + 8, 16) } else { (l.l3 + 12, 4) };
    let old: Vec<u8> = frame[src_at..src_at + 2 * len].to_vec();
    frame[src_at..src_at + len].copy_from_slice(addr_bytes(&outer.src, l.v6));
    frame[src_at + len..src_at + 2 * len].copy_from_slice(addr_bytes(&outer.dst, l.v6));
    if !l.v6 {
        let new = frame[src_at..src_at + 8].to_vec();
        adjust(frame, l.l3 + 10, &old, &new, false);
    }
    // The embedded packet: an IP header right after the 8-byte ICMP header.
    let ip = l4 + 8;
    let (isrc, ilen, proto, inner_l4) = if l.v6 {
        if frame.len() < ip + 40 {
            return false;
        }
        (ip + 8, 16, frame[ip + 6], ip + 40)
    } else {
        let Some(&b) = frame.get(ip) else {
            return false;
        };
        let ihl = usize::from(b & 0x0f) * 4;
        if ihl < 20 || frame.len() < ip + ihl {
            return false;
        }
        (ip + 12, 4, frame[ip + 9], ip + ihl)
    };
    let old_src = frame[isrc..isrc + ilen].to_vec();
    let old_dst = frame[isrc + ilen..isrc + 2 * ilen].to_vec();
    let new_src = addr_bytes(&inner.src, l.v6);
    let new_dst = addr_bytes(&inner.dst, l.v6);
    frame[isrc..isrc + ilen].copy_from_slice(new_src);
    frame[isrc + ilen..isrc + 2 * ilen].copy_from_slice(new_dst);
    if !l.v6 {
        adjust(frame, ip + 10, &old_src, new_src, false);
        adjust(frame, ip + 10, &old_dst, new_dst, false);
    }
    if matches!(proto, ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP)
        && frame.len() >= inner_l4 + 4
    {
        let old_ports = frame[inner_l4..inner_l4 + 4].to_vec();
        frame[inner_l4..inner_l4 + 2].copy_from_slice(&inner.sport.to_be_bytes());
        frame[inner_l4 + 2..inner_l4 + 4].copy_from_slice(&inner.dport.to_be_bytes());
        let check = match proto {
            ip_proto::TCP if frame.len() >= inner_l4 + 18 => Some(inner_l4 + 16),
            ip_proto::UDP
                if frame.len() >= inner_l4 + 8 && frame[inner_l4 + 6..inner_l4 + 8] != [0, 0] =>
            {
                Some(inner_l4 + 6)
            }
            _ => None,
        };
        if let Some(at) = check {
            let new_ports = frame[inner_l4..inner_l4 + 4].to_vec();
            adjust(frame, at, &old_src, new_src, false);
            adjust(frame, at, &old_dst, new_dst, false);
            adjust(frame, at, &old_ports, &new_ports, false);
        }
    }
    // The ICMP checksum over the whole message (ICMPv6: with its pseudo-header).
    let end = if l.v6 {
        l.l3 + 40 + usize::from(u16::from_be_bytes([frame[l.l3 + 4], frame[l.l3 + 5]]))
    } else {
        l.l3 + usize::from(u16::from_be_bytes([frame[l.l3 + 2], frame[l.l3 + 3]]))
    }
    .min(frame.len());
    frame[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
    let mut s = sum(&frame[l4..end]);
    if l.v6 {
        s += sum(&frame[l.l3 + 8..l.l3 + 40]);
        s += (end - l4) as u32 + u32::from(ip_proto::ICMPV6);
    }
    let c = !fold(s);
    frame[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    true
}

/// Recomputes an SCTP packet's CRC32c (RFC 9260 appendix A); `sctp` starts
/// at its common header.
fn sctp_checksum(sctp: &mut [u8]) {
    if sctp.len() < 12 {
        return;
    }
    sctp[8..12].copy_from_slice(&[0; 4]);
    let crc = crc32c(sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// CRC32c (Castagnoli), bitwise by nibble: SCTP through a Service is rare
/// enough that a table-free loop is fast enough, and it keeps the crate free
/// of a dependency for one call site.
pub fn crc32c(bytes: &[u8]) -> u32 {
    const POLY: u32 = 0x82f6_3b78;
    const fn table() -> [u32; 16] {
        let mut t = [0u32; 16];
        let mut i = 0;
        while i < 16 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 4 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const T: [u32; 16] = table();
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        crc = (crc >> 4) ^ T[(crc & 0xf) as usize];
        crc = (crc >> 4) ^ T[(crc & 0xf) as usize];
    }
    !crc
}

/// Is `frame`'s transport checksum right (for tests: TCP, UDP, ICMPv6)?
#[cfg(test)]
pub(crate) fn transport_checksum_ok(frame: &[u8]) -> bool {
    let l = layout(frame).unwrap();
    let l4 = l.l4.unwrap();
    let end = if l.v6 {
        l.l3 + 40 + usize::from(u16::from_be_bytes([frame[l.l3 + 4], frame[l.l3 + 5]]))
    } else {
        l.l3 + usize::from(u16::from_be_bytes([frame[l.l3 + 2], frame[l.l3 + 3]]))
    };
    let mut s = sum(&frame[l4..end]);
    if l.v6 {
        s += sum(&frame[l.l3 + 8..l.l3 + 40]);
    } else {
        s += sum(&frame[l.l3 + 12..l.l3 + 20]);
        if fold(sum(&frame[l.l3..l4])) != 0xffff {
            return false;
        }
    }
    s += (end - l4) as u32 + u32::from(l.proto);
    fold(s) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ip_to_wide;
    use etherparse::PacketBuilder;

    fn w(s: &str) -> [u8; 16] {
        ip_to_wide(s.parse().unwrap())
    }

    fn ends(src: &str, sport: u16, dst: &str, dport: u16) -> Ends {
        Ends {
            src: w(src),
            sport,
            dst: w(dst),
            dport,
        }
    }

    fn tcp4() -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 96, 0, 10], 64)
            .tcp(40000, 80, 1, 100)
            .syn()
            .write(&mut f, b"hello")
            .unwrap();
        f
    }

    #[test]
    fn tcp_and_udp_checksums_stay_right() {
        let mut f = tcp4();
        assert!(transport_checksum_ok(&f));
        assert!(set_ends(
            &mut f,
            &ends("10.0.0.1", 40000, "10.0.1.7", 8080),
            false
        ));
        assert!(transport_checksum_ok(&f));
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
            panic!()
        };
        assert_eq!(t.destination_port(), 8080);

        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6(w("fd00::1"), w("fd00:96::a"), 64)
            .udp(5353, 53)
            .write(&mut f, b"query")
            .unwrap();
        assert!(set_ends(
            &mut f,
            &ends("fd00::1", 5353, "fd00:1::9", 5353),
            false
        ));
        assert!(transport_checksum_ok(&f));
        // Wrong family: untouched.
        assert!(!set_ends(
            &mut f,
            &ends("10.0.0.1", 1, "10.0.0.2", 2),
            false
        ));
    }

    #[test]
    fn a_partial_checksum_gets_the_new_pseudo_header() {
        // Offload: the field holds the pseudo-header sum; after NAT it must
        // be the new pseudo-header's sum, the ports left to the receiver.
        let mut f = tcp4();
        let pseudo = |f: &[u8]| {
            let l4 = 14 + 20;
            let len = f.len() - l4;
            fold(sum(&f[26..34]) + len as u32 + 6)
        };
        let p = pseudo(&f);
        f[34 + 16..34 + 18].copy_from_slice(&p.to_be_bytes());
        set_ends(&mut f, &ends("10.0.0.1", 40000, "10.0.1.7", 8080), true);
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), pseudo(&f));
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }
}
