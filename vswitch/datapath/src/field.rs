//! Match fields and their packed layout.
//!
//! Owns the one place that says where each matchable field lives inside a
//! [`MatchKey`], the fixed array of words that the classifier hashes and masks.
//! Everything else (parsing, ofctl syntax, actions) goes through [`Field`], so a
//! field added here is matchable everywhere. This module knows nothing of packets.

use std::fmt;

/// Number of 64-bit words in a [`MatchKey`].
pub const NWORDS: usize = 14;

/// Number of general-purpose 32-bit registers (`reg0`..`reg7`).
pub const NREGS: usize = 8;

/// A packed, fixed-size view of every matchable field: packet headers plus
/// pipeline metadata (registers, conntrack state, conjunction id).
///
/// Layout (word: fields, low bits first):
/// 0 `in_port`, `conj_id` · 1 `dl_src`, `dl_type` · 2 `dl_dst`, `vlan_tci` ·
/// 3-4 `nw_src` · 5-6 `nw_dst` · 7 `tp_src`, `tp_dst`, `tcp_flags`, `nw_proto`, `nw_frag` ·
/// 8 `arp_sha`, `ct_state` · 9 `arp_tha`, `ct_zone` · 10-13 `reg0`..`reg7`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MatchKey(pub [u64; NWORDS]);

impl fmt::Debug for MatchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MatchKey(")?;
        for (i, w) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{w:016x}")?;
        }
        write!(f, ")")
    }
}

/// A matchable field.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Field {
    InPort,
    ConjId,
    DlSrc,
    DlDst,
    DlType,
    VlanTci,
    /// IPv4 (mapped into `::ffff:0:0/96`) or IPv6 source; ARP sender protocol address.
    NwSrc,
    /// IPv4 (mapped) or IPv6 destination; ARP target protocol address.
    NwDst,
    /// IP protocol number; ARP opcode (low 8 bits).
    NwProto,
    /// Fragment bits: [`FRAG_ANY`] and [`FRAG_LATER`].
    NwFrag,
    /// L4 source port; ICMP type.
    TpSrc,
    /// L4 destination port; ICMP code.
    TpDst,
    TcpFlags,
    ArpSha,
    ArpTha,
    CtState,
    CtZone,
    /// The connection's mark (8 bits here), set by `ct(commit,exec(set_field:N->ct_mark))`.
    CtMark,
    Reg(u8),
}

/// A mask of the low `n` bits (`n` up to 128).
pub const fn low_bits(n: u32) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

/// `nw_frag` bit: the packet is a fragment.
pub const FRAG_ANY: u8 = 0x01;
/// `nw_frag` bit: the fragment is not the first one (no L4 header).
pub const FRAG_LATER: u8 = 0x02;

/// Where a field sits: `word`, bit `shift` and width `bits` (<= 64), or a
/// 128-bit field spread over `word` (high half) and `word + 1`.
#[derive(Clone, Copy, Debug)]
struct Place {
    word: usize,
    shift: u32,
    bits: u32,
}

impl Field {
    /// Every field, in canonical print order.
    pub const ALL: [Field; 26] = [
        Field::InPort,
        Field::DlSrc,
        Field::DlDst,
        Field::DlType,
        Field::VlanTci,
        Field::NwSrc,
        Field::NwDst,
        Field::NwProto,
        Field::NwFrag,
        Field::TpSrc,
        Field::TpDst,
        Field::TcpFlags,
        Field::ArpSha,
        Field::ArpTha,
        Field::CtState,
        Field::CtZone,
        Field::CtMark,
        Field::Reg(0),
        Field::Reg(1),
        Field::Reg(2),
        Field::Reg(3),
        Field::Reg(4),
        Field::Reg(5),
        Field::Reg(6),
        Field::Reg(7),
        Field::ConjId,
    ];

    const fn place(self) -> Place {
        let (word, shift, bits) = match self {
            Field::InPort => (0, 0, 32),
            Field::ConjId => (0, 32, 32),
            Field::DlSrc => (1, 0, 48),
            Field::DlType => (1, 48, 16),
            Field::DlDst => (2, 0, 48),
            Field::VlanTci => (2, 48, 16),
            Field::NwSrc => (3, 0, 128),
            Field::NwDst => (5, 0, 128),
            Field::TpSrc => (7, 0, 16),
            Field::TpDst => (7, 16, 16),
            Field::TcpFlags => (7, 32, 16),
            Field::NwProto => (7, 48, 8),
            Field::NwFrag => (7, 56, 8),
            Field::ArpSha => (8, 0, 48),
            Field::CtState => (8, 48, 8),
            Field::CtMark => (8, 56, 8),
            Field::ArpTha => (9, 0, 48),
            Field::CtZone => (9, 48, 16),
            Field::Reg(n) => (10 + (n as usize & 7) / 2, (n as u32 & 1) * 32, 32),
        };
        Place { word, shift, bits }
    }

    /// The canonical text name (ovs-ofctl spelling).
    pub const fn name(self) -> &'static str {
        match self {
            Field::InPort => "in_port",
            Field::ConjId => "conj_id",
            Field::DlSrc => "dl_src",
            Field::DlDst => "dl_dst",
            Field::DlType => "dl_type",
            Field::VlanTci => "vlan_tci",
            Field::NwSrc => "nw_src",
            Field::NwDst => "nw_dst",
            Field::NwProto => "nw_proto",
            Field::NwFrag => "nw_frag",
            Field::TpSrc => "tp_src",
            Field::TpDst => "tp_dst",
            Field::TcpFlags => "tcp_flags",
            Field::ArpSha => "arp_sha",
            Field::ArpTha => "arp_tha",
            Field::CtState => "ct_state",
            Field::CtZone => "ct_zone",
            Field::CtMark => "ct_mark",
            Field::Reg(n) => [
                "reg0", "reg1", "reg2", "reg3", "reg4", "reg5", "reg6", "reg7",
            ][n as usize & 7],
        }
    }

    /// Width in bits.
    pub const fn bits(self) -> u32 {
        self.place().bits
    }

    /// All-ones mask of this field's width.
    pub const fn full_mask(self) -> u128 {
        let bits = self.bits();
        if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        }
    }

    /// Whether the field is pipeline metadata rather than a packet header.
    pub const fn is_metadata(self) -> bool {
        matches!(
            self,
            Field::InPort
                | Field::ConjId
                | Field::CtState
                | Field::CtZone
                | Field::CtMark
                | Field::Reg(_)
        )
    }
}

impl MatchKey {
    /// Reads `field`.
    #[inline]
    pub fn get(&self, field: Field) -> u128 {
        let p = field.place();
        if p.bits == 128 {
            ((self.0[p.word] as u128) << 64) | self.0[p.word + 1] as u128
        } else {
            let m = if p.bits == 64 {
                u64::MAX
            } else {
                (1u64 << p.bits) - 1
            };
            ((self.0[p.word] >> p.shift) & m) as u128
        }
    }

    /// Writes `field`; bits above the field's width are ignored.
    #[inline]
    pub fn set(&mut self, field: Field, value: u128) {
        let p = field.place();
        if p.bits == 128 {
            self.0[p.word] = (value >> 64) as u64;
            self.0[p.word + 1] = value as u64;
        } else {
            let m = if p.bits == 64 {
                u64::MAX
            } else {
                (1u64 << p.bits) - 1
            };
            let w = &mut self.0[p.word];
            *w = (*w & !(m << p.shift)) | ((value as u64 & m) << p.shift);
        }
    }

    /// Writes only the bits of `field` selected by `mask`.
    #[inline]
    pub fn set_masked(&mut self, field: Field, value: u128, mask: u128) {
        let old = self.get(field);
        self.set(field, (old & !mask) | (value & mask));
    }

    /// `self & mask`, word by word.
    #[inline]
    pub fn masked(&self, mask: &MatchKey) -> MatchKey {
        let mut out = [0u64; NWORDS];
        for (o, (a, m)) in out.iter_mut().zip(self.0.iter().zip(mask.0.iter())) {
            *o = a & m;
        }
        MatchKey(out)
    }
}

/// A masked match over [`MatchKey`]: a packet key `k` matches when
/// `k & mask == value`. The invariant `value & mask == value` is kept by every
/// constructor, so two equal matches compare equal.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Match {
    value: MatchKey,
    mask: MatchKey,
}

impl Match {
    /// The match-everything match.
    pub const fn any() -> Match {
        Match {
            value: MatchKey([0; NWORDS]),
            mask: MatchKey([0; NWORDS]),
        }
    }

    /// Matches `field == value` exactly.
    pub fn set(&mut self, field: Field, value: u128) -> &mut Self {
        self.set_masked(field, value, field.full_mask())
    }

    /// Matches `field & mask == value & mask`. A zero mask removes the field.
    pub fn set_masked(&mut self, field: Field, value: u128, mask: u128) -> &mut Self {
        let mask = mask & field.full_mask();
        self.mask.set(field, mask);
        self.value.set(field, value & mask);
        self
    }

    /// Builder form of [`Match::set`].
    pub fn with(mut self, field: Field, value: u128) -> Self {
        self.set(field, value);
        self
    }

    /// Builder form of [`Match::set_masked`].
    pub fn with_masked(mut self, field: Field, value: u128, mask: u128) -> Self {
        self.set_masked(field, value, mask);
        self
    }

    /// The value and mask of one field.
    pub fn get(&self, field: Field) -> (u128, u128) {
        (self.value.get(field), self.mask.get(field))
    }

    /// Whether `field` takes part in the match at all.
    pub fn has(&self, field: Field) -> bool {
        self.mask.get(field) != 0
    }

    /// Whether `field` is matched on all of its bits.
    pub fn is_exact(&self, field: Field) -> bool {
        self.mask.get(field) == field.full_mask()
    }

    pub fn value(&self) -> &MatchKey {
        &self.value
    }

    pub fn mask(&self) -> &MatchKey {
        &self.mask
    }

    /// Whether `key` satisfies this match.
    #[inline]
    pub fn matches(&self, key: &MatchKey) -> bool {
        self.value
            .0
            .iter()
            .zip(self.mask.0.iter())
            .zip(key.0.iter())
            .all(|((v, m), k)| k & m == *v)
    }
}

/// Conntrack state bits (`ct_state`), as OVS numbers them.
pub mod ct_state {
    pub const NEW: u8 = 0x01;
    pub const EST: u8 = 0x02;
    pub const REL: u8 = 0x04;
    pub const RPL: u8 = 0x08;
    pub const INV: u8 = 0x10;
    pub const TRK: u8 = 0x20;
    /// Flag names in bit order, as ofctl prints them.
    pub const NAMES: [(u8, &str); 6] = [
        (NEW, "new"),
        (EST, "est"),
        (REL, "rel"),
        (RPL, "rpl"),
        (INV, "inv"),
        (TRK, "trk"),
    ];
}

/// TCP flag bits (`tcp_flags`), in header order.
pub mod tcp_flags {
    pub const FIN: u16 = 0x001;
    pub const SYN: u16 = 0x002;
    pub const RST: u16 = 0x004;
    pub const PSH: u16 = 0x008;
    pub const ACK: u16 = 0x010;
    pub const URG: u16 = 0x020;
    pub const ECE: u16 = 0x040;
    pub const CWR: u16 = 0x080;
    pub const NS: u16 = 0x100;
    pub const NAMES: [(u16, &str); 9] = [
        (FIN, "fin"),
        (SYN, "syn"),
        (RST, "rst"),
        (PSH, "psh"),
        (ACK, "ack"),
        (URG, "urg"),
        (ECE, "ece"),
        (CWR, "cwr"),
        (NS, "ns"),
    ];
}

/// EtherType values the datapath interprets.
pub mod ether_type {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
}

/// IP protocol numbers the datapath interprets.
pub mod ip_proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;

    /// The protocol's name as dumps and filters spell it (`proto47` for the
    /// ones without one).
    pub fn name(p: u8) -> std::borrow::Cow<'static, str> {
        match p {
            TCP => "tcp".into(),
            UDP => "udp".into(),
            SCTP => "sctp".into(),
            ICMP => "icmp".into(),
            ICMPV6 => "icmp6".into(),
            p => format!("proto{p}").into(),
        }
    }
}

/// An IPv4 address as the 128-bit value the wide address fields hold.
pub fn ipv4_mapped(addr: std::net::Ipv4Addr) -> u128 {
    u128::from(addr.to_ipv6_mapped())
}

/// Mask for an IPv4 prefix of `len` bits, in mapped form.
pub fn ipv4_prefix_mask(len: u8) -> u128 {
    let len = u32::from(len.min(32));
    let low = if len == 0 {
        0
    } else {
        (u32::MAX << (32 - len)) as u128
    };
    (u128::MAX << 32) | low
}

/// Mask for an IPv6 prefix of `len` bits.
pub fn ipv6_prefix_mask(len: u8) -> u128 {
    match len.min(128) {
        0 => 0,
        n => u128::MAX << (128 - u32::from(n)),
    }
}

/// Whether `value` is in the mapped IPv4 range `::ffff:0:0/96`.
pub fn is_ipv4_mapped(value: u128) -> bool {
    value >> 32 == 0xffff
}

/// A MAC address as the 48-bit value its fields hold.
pub fn mac_value(mac: [u8; 6]) -> u128 {
    mac.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b))
}

/// The MAC address held in a 48-bit field value.
pub fn mac_bytes(value: u128) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (i, b) in out.iter_mut().enumerate() {
        *b = (value >> (40 - 8 * i)) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_do_not_overlap() {
        let mut seen = MatchKey::default();
        for f in Field::ALL {
            let mut k = MatchKey::default();
            k.set(f, u128::MAX);
            for (a, b) in seen.0.iter().zip(k.0.iter()) {
                assert_eq!(a & b, 0, "{f:?} overlaps another field");
            }
            seen = MatchKey(std::array::from_fn(|i| seen.0[i] | k.0[i]));
            assert_eq!(k.get(f), f.full_mask(), "{f:?} round-trip");
        }
    }

    #[test]
    fn match_keeps_value_within_mask() {
        let m = Match::any().with_masked(Field::TpDst, 0x1234, 0xff00);
        assert_eq!(m.get(Field::TpDst), (0x1200, 0xff00));
        let mut k = MatchKey::default();
        k.set(Field::TpDst, 0x12ff);
        assert!(m.matches(&k));
        k.set(Field::TpDst, 0x13ff);
        assert!(!m.matches(&k));
    }

    #[test]
    fn ipv4_masks() {
        let a = ipv4_mapped("10.1.2.3".parse().unwrap());
        let m = ipv4_prefix_mask(16);
        assert_eq!(a & m, ipv4_mapped("10.1.0.0".parse().unwrap()));
        assert!(is_ipv4_mapped(a));
        assert_eq!(ipv6_prefix_mask(0), 0);
        assert_eq!(ipv6_prefix_mask(128), u128::MAX);
    }
}
