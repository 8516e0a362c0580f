//! Addresses, CIDRs and port ranges as masked matches.
//!
//! Owns the arithmetic of turning an address, a CIDR (minus its `except`
//! entries) or a port range into flow matches with the right EtherType. Knows
//! nothing of policies or pods.

use std::net::IpAddr;

use datapath::Match;
use datapath::field::{Field, ether_type, ipv4_mapped, ipv4_prefix_mask, ipv6_prefix_mask};
use ipnet::IpNet;

pub(crate) fn ip_match(field: Field, ip: IpAddr) -> Match {
    match ip {
        IpAddr::V4(a) => Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with(field, ipv4_mapped(a)),
        IpAddr::V6(a) => Match::any()
            .with(Field::DlType, ether_type::IPV6.into())
            .with(field, u128::from(a)),
    }
}

/// Matches `field` (an address) within `net`, with the right EtherType.
pub(crate) fn net_match(field: Field, net: IpNet) -> Match {
    match net {
        IpNet::V4(n) => Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with_masked(
                field,
                ipv4_mapped(n.network()),
                ipv4_prefix_mask(n.prefix_len()),
            ),
        IpNet::V6(n) => Match::any()
            .with(Field::DlType, ether_type::IPV6.into())
            .with_masked(
                field,
                u128::from(n.network()),
                ipv6_prefix_mask(n.prefix_len()),
            ),
    }
}

pub(crate) fn family_type(v6: bool) -> u16 {
    if v6 {
        ether_type::IPV6
    } else {
        ether_type::IPV4
    }
}

/// `start..=end` as (value, mask) pairs on a 16-bit field.
pub fn port_masks(start: u16, end: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let (mut s, e) = (u32::from(start), u32::from(end));
    while s <= e {
        let mut size: u32 = if s == 0 {
            1 << 16
        } else {
            s & s.wrapping_neg()
        };
        while s + size - 1 > e {
            size >>= 1;
        }
        out.push((s as u16, !(size - 1) as u16));
        s += size;
    }
    out
}

/// `cidr` minus every `except` entry, as disjoint CIDRs.
pub fn subtract(cidr: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    if except.iter().any(|e| e.contains(&cidr)) {
        return vec![];
    }
    if !except.iter().any(|e| cidr.contains(e)) {
        return vec![cidr];
    }
    match cidr.subnets(cidr.prefix_len() + 1) {
        Ok(halves) => halves.flat_map(|h| subtract(h, except)).collect(),
        Err(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn port_ranges_become_masks() {
        assert_eq!(port_masks(80, 80), vec![(80, 0xffff)]);
        assert_eq!(port_masks(0, 65535), vec![(0, 0)]);
        let m = port_masks(1000, 2000);
        for p in 0..=u16::MAX {
            let hit = m.iter().any(|(v, mask)| p & mask == *v);
            assert_eq!(hit, (1000..=2000).contains(&p), "port {p}");
        }
        assert!(m.len() <= 30);
    }

    #[test]
    pub(crate) fn cidr_minus_except() {
        let c: IpNet = "172.17.0.0/16".parse().unwrap();
        let e: IpNet = "172.17.1.0/24".parse().unwrap();
        let parts = subtract(c, &[e]);
        assert_eq!(parts.len(), 8);
        let inside = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            parts.iter().any(|p| p.contains(&ip))
        };
        assert!(inside("172.17.0.1"));
        assert!(!inside("172.17.1.5"));
        assert!(inside("172.17.2.5"));
        assert!(inside("172.17.255.255"));
        assert!(subtract(c, &[c]).is_empty());
    }
}
