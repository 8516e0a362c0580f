//! ovs-ofctl flow syntax: parse and print.
//!
//! Owns the text form of flows, so that people who know OVS can read dumps and type
//! flows (`table=10,priority=100,tcp,nw_src=10.1.0.0/16,tp_dst=80,actions=goto_table:20`).
//! Printing is canonical (fixed field order, shorthands like `tcp` where they apply),
//! and `parse(print(f)) == f` for every valid flow. Errors quote the bad token.

use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::field::{
    Field, Match, ct_state, ether_type, ip_proto, ipv4_mapped, is_ipv4_mapped, mac_bytes,
    mac_value, tcp_flags,
};
use crate::flow::{Action, Cookie, FlowEntry, FlowError, TableId};
use crate::key::PortNo;

mod action;

pub use action::parse_action;

/// A flow text that could not be parsed or describes an impossible flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfctlError {
    #[error("bad token `{token}`: {reason}")]
    Token { token: String, reason: String },
    #[error("flow has no `actions=`")]
    NoActions,
    #[error("impossible flow")]
    Invalid(#[source] FlowError),
}

pub(crate) fn bad(token: &str, reason: impl Into<String>) -> OfctlError {
    OfctlError::Token {
        token: token.to_string(),
        reason: reason.into(),
    }
}

/// Field names accepted on input, with their aliases.
fn field_by_name(name: &str) -> Option<Field> {
    Some(match name {
        "in_port" => Field::InPort,
        "conj_id" => Field::ConjId,
        "dl_src" | "eth_src" => Field::DlSrc,
        "dl_dst" | "eth_dst" => Field::DlDst,
        "dl_type" | "eth_type" => Field::DlType,
        "vlan_tci" => Field::VlanTci,
        "nw_src" | "ip_src" | "ipv6_src" | "arp_spa" => Field::NwSrc,
        "nw_dst" | "ip_dst" | "ipv6_dst" | "arp_tpa" | "nd_target" => Field::NwDst,
        "nw_proto" | "ip_proto" | "arp_op" => Field::NwProto,
        "nw_frag" => Field::NwFrag,
        "tp_src" | "tcp_src" | "udp_src" | "sctp_src" | "icmp_type" | "icmpv6_type" => Field::TpSrc,
        "tp_dst" | "tcp_dst" | "udp_dst" | "sctp_dst" | "icmp_code" | "icmpv6_code" => Field::TpDst,
        "tcp_flags" => Field::TcpFlags,
        "arp_sha" | "nd_sll" => Field::ArpSha,
        "arp_tha" | "nd_tll" => Field::ArpTha,
        "ct_state" => Field::CtState,
        "ct_zone" => Field::CtZone,
        "ct_mark" => Field::CtMark,
        _ => {
            let n = name.strip_prefix("reg")?.parse::<u8>().ok()?;
            if n < 8 {
                Field::Reg(n)
            } else {
                return None;
            }
        }
    })
}

const SHORTHANDS: [(&str, u16, Option<u8>); 11] = [
    ("ip", ether_type::IPV4, None),
    ("ipv6", ether_type::IPV6, None),
    ("arp", ether_type::ARP, None),
    ("tcp", ether_type::IPV4, Some(ip_proto::TCP)),
    ("udp", ether_type::IPV4, Some(ip_proto::UDP)),
    ("sctp", ether_type::IPV4, Some(ip_proto::SCTP)),
    ("icmp", ether_type::IPV4, Some(ip_proto::ICMP)),
    ("tcp6", ether_type::IPV6, Some(ip_proto::TCP)),
    ("udp6", ether_type::IPV6, Some(ip_proto::UDP)),
    ("sctp6", ether_type::IPV6, Some(ip_proto::SCTP)),
    ("icmp6", ether_type::IPV6, Some(ip_proto::ICMPV6)),
];

/// Splits at top-level commas (not inside parentheses or brackets).
pub(crate) fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|t| !t.is_empty());
    out
}

pub(crate) fn parse_int(token: &str, s: &str, max: u128) -> Result<u128, OfctlError> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u128::from_str_radix(hex, 16)
    } else {
        s.parse::<u128>()
    }
    .map_err(|_| bad(token, format!("`{s}` is not a number")))?;
    if v > max {
        return Err(bad(token, format!("{v} is out of range (0-{max})")));
    }
    Ok(v)
}

fn parse_mac(token: &str, s: &str) -> Result<u128, OfctlError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad(token, format!("`{s}` is not a MAC address")));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| bad(token, format!("`{s}` is not a MAC address")))?;
    }
    Ok(mac_value(mac))
}

fn fmt_mac(v: u128) -> String {
    let m = mac_bytes(v);
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// An address with optional `/len` or `/mask`, as (value, mask) of the wide field.
fn parse_addr(token: &str, s: &str) -> Result<(u128, u128), OfctlError> {
    let (addr, suffix) = match s.split_once('/') {
        Some((a, m)) => (a, Some(m)),
        None => (s, None),
    };
    if let Ok(v4) = addr.parse::<Ipv4Addr>() {
        let mask32: u32 = match suffix {
            None => u32::MAX,
            Some(m) => match m.parse::<u8>() {
                Ok(len) if len <= 32 => {
                    if len == 0 {
                        0
                    } else {
                        u32::MAX << (32 - len)
                    }
                }
                Ok(_) => return Err(bad(token, "IPv4 prefix length must be 0-32")),
                Err(_) => u32::from(
                    m.parse::<Ipv4Addr>()
                        .map_err(|_| bad(token, format!("`{m}` is not a prefix length or mask")))?,
                ),
            },
        };
        let mask = (u128::MAX << 32) | u128::from(mask32);
        return Ok((ipv4_mapped(v4) & mask, mask));
    }
    if let Ok(v6) = addr.parse::<Ipv6Addr>() {
        let mask: u128 = match suffix {
            None => u128::MAX,
            Some(m) => match m.parse::<u8>() {
                Ok(len) if len <= 128 => crate::field::ipv6_prefix_mask(len),
                Ok(_) => return Err(bad(token, "IPv6 prefix length must be 0-128")),
                Err(_) => u128::from(
                    m.parse::<Ipv6Addr>()
                        .map_err(|_| bad(token, format!("`{m}` is not a prefix length or mask")))?,
                ),
            },
        };
        return Ok((u128::from(v6) & mask, mask));
    }
    Err(bad(token, format!("`{addr}` is not an IP address")))
}

fn fmt_addr(v: u128, mask: u128) -> String {
    if is_ipv4_mapped(v) && mask >> 32 == u128::MAX >> 32 {
        let a = Ipv4Addr::from(v as u32);
        let m = mask as u32;
        if m == u32::MAX {
            a.to_string()
        } else if m.leading_ones() + m.trailing_zeros() == 32 {
            format!("{a}/{}", m.leading_ones())
        } else {
            format!("{a}/{}", Ipv4Addr::from(m))
        }
    } else {
        let a = Ipv6Addr::from(v);
        if mask == u128::MAX {
            a.to_string()
        } else if mask.leading_ones() + mask.trailing_zeros() == 128 {
            format!("{a}/{}", mask.leading_ones())
        } else {
            format!("{a}/{}", Ipv6Addr::from(mask))
        }
    }
}

const FRAG_WORDS: [(&str, u128, u128); 5] = [
    ("no", 0, 1),
    ("yes", 1, 1),
    ("first", 1, 3),
    ("later", 3, 3),
    ("not_later", 0, 2),
];

fn flag_names(field: Field) -> Option<Vec<(u128, &'static str)>> {
    match field {
        Field::CtState => Some(
            ct_state::NAMES
                .iter()
                .map(|(b, n)| (u128::from(*b), *n))
                .collect(),
        ),
        Field::TcpFlags => Some(
            tcp_flags::NAMES
                .iter()
                .map(|(b, n)| (u128::from(*b), *n))
                .collect(),
        ),
        _ => None,
    }
}

/// `+a-b` flag syntax.
fn parse_flags(token: &str, s: &str, names: &[(u128, &str)]) -> Result<(u128, u128), OfctlError> {
    let (mut v, mut m) = (0u128, 0u128);
    let mut rest = s;
    while !rest.is_empty() {
        let set = match rest.as_bytes()[0] {
            b'+' => true,
            b'-' => false,
            _ => return Err(bad(token, "flags are written +flag or -flag")),
        };
        rest = &rest[1..];
        let end = rest.find(['+', '-']).unwrap_or(rest.len());
        let name = &rest[..end];
        let (bit, _) = names
            .iter()
            .find(|(_, n)| *n == name)
            .ok_or_else(|| bad(token, format!("unknown flag `{name}`")))?;
        m |= bit;
        if set {
            v |= bit;
        }
        rest = &rest[end..];
    }
    Ok((v, m))
}

fn parse_value(token: &str, field: Field, s: &str) -> Result<(u128, u128), OfctlError> {
    let full = field.full_mask();
    if let Some(names) = flag_names(field)
        && s.starts_with(['+', '-'])
    {
        return parse_flags(token, s, &names);
    }
    match field {
        Field::DlSrc | Field::DlDst | Field::ArpSha | Field::ArpTha => {
            let (a, m) = s.split_once('/').map_or((s, None), |(a, m)| (a, Some(m)));
            let v = parse_mac(token, a)?;
            let m = m.map_or(Ok(full), |m| parse_mac(token, m))?;
            Ok((v, m))
        }
        Field::NwSrc | Field::NwDst => parse_addr(token, s),
        Field::NwFrag => FRAG_WORDS
            .iter()
            .find(|(w, _, _)| *w == s)
            .map(|(_, v, m)| (*v, *m))
            .ok_or_else(|| bad(token, "nw_frag is one of no, yes, first, later, not_later")),
        _ => {
            let (a, m) = s.split_once('/').map_or((s, None), |(a, m)| (a, Some(m)));
            let v = parse_int(token, a, full)?;
            let m = m.map_or(Ok(full), |m| parse_int(token, m, full))?;
            Ok((v, m))
        }
    }
}

fn fmt_value(field: Field, v: u128, m: u128) -> String {
    let full = field.full_mask();
    match field {
        Field::DlSrc | Field::DlDst | Field::ArpSha | Field::ArpTha => {
            if m == full {
                fmt_mac(v)
            } else {
                format!("{}/{}", fmt_mac(v), fmt_mac(m))
            }
        }
        Field::NwSrc | Field::NwDst => fmt_addr(v, m),
        Field::NwFrag => FRAG_WORDS
            .iter()
            .find(|(_, fv, fm)| *fv == v && *fm == m)
            .map(|(w, _, _)| w.to_string())
            .unwrap_or_else(|| format!("0x{v:x}/0x{m:x}")),
        Field::CtState | Field::TcpFlags => {
            let names = flag_names(field).unwrap_or_default();
            let known: u128 = names.iter().map(|(b, _)| b).fold(0, |a, b| a | b);
            if m & !known != 0 {
                return format!("0x{v:x}/0x{m:x}");
            }
            let mut out = String::new();
            for (bit, name) in names {
                if m & bit != 0 {
                    out.push(if v & bit != 0 { '+' } else { '-' });
                    out.push_str(name);
                }
            }
            out
        }
        Field::InPort
        | Field::NwProto
        | Field::TpSrc
        | Field::TpDst
        | Field::CtZone
        | Field::CtMark
        | Field::ConjId
            if m == full =>
        {
            v.to_string()
        }
        Field::DlType | Field::VlanTci if m == full => format!("0x{v:04x}"),
        _ if m == full => format!("0x{v:x}"),
        _ => format!("0x{v:x}/0x{m:x}"),
    }
}

/// The text name a field prints under in this match (`ipv6_src`, `arp_op`, ...).
fn display_name(field: Field, m: &Match) -> &'static str {
    let (dl, dl_mask) = m.get(Field::DlType);
    let dl = if dl_mask == 0xffff { dl as u16 } else { 0 };
    let (proto, pmask) = m.get(Field::NwProto);
    let icmp = pmask == 0xff && (proto as u8 == ip_proto::ICMP || proto as u8 == ip_proto::ICMPV6);
    let (icmp_type, tmask) = m.get(Field::TpSrc);
    let nd = icmp && dl == ether_type::IPV6 && tmask == 0xffff && matches!(icmp_type, 135 | 136);
    match (field, dl) {
        (Field::NwDst, _) if nd => "nd_target",
        (Field::ArpSha, _) if nd => "nd_sll",
        (Field::ArpTha, _) if nd => "nd_tll",
        (Field::NwSrc, ether_type::ARP) => "arp_spa",
        (Field::NwDst, ether_type::ARP) => "arp_tpa",
        (Field::NwProto, ether_type::ARP) => "arp_op",
        (Field::NwSrc, ether_type::IPV6) => "ipv6_src",
        (Field::NwDst, ether_type::IPV6) => "ipv6_dst",
        (Field::TpSrc, ether_type::IPV6) if icmp => "icmpv6_type",
        (Field::TpDst, ether_type::IPV6) if icmp => "icmpv6_code",
        (Field::TpSrc, _) if icmp => "icmp_type",
        (Field::TpDst, _) if icmp => "icmp_code",
        _ => field.name(),
    }
}

/// Prints a match in canonical order (no trailing comma; empty for match-all).
pub fn format_match(m: &Match) -> String {
    let mut parts: Vec<String> = Vec::new();
    let (dl, dl_mask) = m.get(Field::DlType);
    let (proto, proto_mask) = m.get(Field::NwProto);
    let mut skip_dl = false;
    let mut skip_proto = false;
    if dl_mask == 0xffff {
        let with_proto = SHORTHANDS.iter().find(|(_, t, p)| {
            u128::from(*t) == dl && p.is_some_and(|p| proto_mask == 0xff && u128::from(p) == proto)
        });
        let plain = SHORTHANDS
            .iter()
            .find(|(_, t, p)| u128::from(*t) == dl && p.is_none());
        if let Some((name, _, _)) = with_proto {
            parts.push(name.to_string());
            skip_dl = true;
            skip_proto = true;
        } else if let Some((name, _, _)) = plain {
            parts.push(name.to_string());
            skip_dl = true;
        }
    }
    for f in Field::ALL {
        if (f == Field::DlType && skip_dl) || (f == Field::NwProto && skip_proto) {
            continue;
        }
        let (v, mask) = m.get(f);
        if mask != 0 {
            parts.push(format!("{}={}", display_name(f, m), fmt_value(f, v, mask)));
        }
    }
    parts.join(",")
}

fn fmt_port(p: PortNo) -> String {
    match p {
        PortNo::IN_PORT => "in_port".into(),
        PortNo::CONTROLLER => "controller".into(),
        PortNo(n) => n.to_string(),
    }
}

/// Prints the actions list (`drop` when empty, as ovs-ofctl does).
pub fn format_actions(actions: &[Action]) -> String {
    if actions.is_empty() {
        return "drop".into();
    }
    actions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for FlowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        if self.cookie.0 != 0 {
            write!(s, "cookie=0x{:x},", self.cookie.0)?;
        }
        write!(s, "table={},priority={},", self.table, self.priority)?;
        let m = format_match(&self.matcher);
        if !m.is_empty() {
            s.push_str(&m);
            s.push(',');
        }
        write!(s, "actions={}", format_actions(&self.actions))?;
        f.write_str(&s)
    }
}

fn parse_table(token: &str, s: &str) -> Result<TableId, OfctlError> {
    Ok(TableId(parse_int(token, s, u128::from(TableId::MAX))? as u8))
}

fn parse_port(token: &str, s: &str) -> Result<PortNo, OfctlError> {
    match s {
        "in_port" | "IN_PORT" => Ok(PortNo::IN_PORT),
        "controller" | "CONTROLLER" => Ok(PortNo::CONTROLLER),
        _ => Ok(PortNo(parse_int(token, s, 0xffff_ff00)? as u32)),
    }
}

fn parse_field_ref(token: &str, s: &str) -> Result<Field, OfctlError> {
    field_by_name(s).ok_or_else(|| bad(token, format!("unknown field `{s}`")))
}

/// Parses a match (the part before `actions=`), with optional `table=`,
/// `priority=` and `cookie=`; dump-only fields (`n_packets=`, `duration=`...) are
/// ignored. Returns (table, priority, cookie, match).
pub fn parse_match(s: &str) -> Result<(TableId, u16, Cookie, Match), OfctlError> {
    let mut m = Match::any();
    let mut table = TableId(0);
    let mut priority = 32768u16;
    let mut cookie = Cookie(0);
    let mut seen: Vec<Field> = Vec::new();
    for token in split_top(s) {
        if let Some((dl, proto)) = SHORTHANDS
            .iter()
            .find(|(n, _, _)| *n == token)
            .map(|(_, t, p)| (*t, *p))
        {
            m.set(Field::DlType, dl.into());
            if let Some(p) = proto {
                m.set(Field::NwProto, p.into());
            }
            continue;
        }
        let (name, value) = token
            .split_once('=')
            .ok_or_else(|| bad(token, "expected FIELD=VALUE or a protocol name"))?;
        match name {
            "table" => table = parse_table(token, value)?,
            "priority" => priority = parse_int(token, value, 65535)? as u16,
            "cookie" => {
                let c = value.split('/').next().unwrap_or(value);
                cookie = Cookie(parse_int(token, c, u128::from(u64::MAX))? as u64);
            }
            "duration" | "n_packets" | "n_bytes" | "idle_age" | "hard_age" | "idle_timeout"
            | "hard_timeout" | "rule" => {}
            "dl_vlan" => {
                let vid = parse_int(token, value, 4095)?;
                m.set_masked(Field::VlanTci, 0x1000 | vid, 0x1fff);
            }
            _ => {
                let field = field_by_name(name)
                    .ok_or_else(|| bad(token, format!("unknown field `{name}`")))?;
                if seen.contains(&field) {
                    return Err(bad(token, format!("{} is matched twice", field.name())));
                }
                seen.push(field);
                let (v, mask) = parse_value(token, field, value)?;
                m.set_masked(field, v, mask);
            }
        }
    }
    Ok((table, priority, cookie, m))
}

/// Parses a flow: `[table=N,][priority=P,][cookie=C,]MATCH,actions=ACTIONS`.
///
/// Fails with the offending token on a syntax error, and with the validation
/// error on an impossible flow (see [`FlowEntry::validate`]).
pub fn parse_flow(s: &str) -> Result<FlowEntry, OfctlError> {
    let at = find_actions(s).ok_or(OfctlError::NoActions)?;
    let (head, actions) = (&s[..at], &s[at + "actions=".len()..]);
    let (table, priority, cookie, matcher) = parse_match(head.trim().trim_end_matches(',').trim())?;
    let mut entry = FlowEntry {
        table,
        priority,
        matcher,
        actions: Default::default(),
        cookie,
    };
    let tokens = split_top(actions);
    // `actions=drop` is the empty action list, as in ovs-ofctl.
    if tokens != ["drop"] {
        for token in tokens {
            entry.actions.push(parse_action(token)?);
        }
    }
    entry.validate().map_err(OfctlError::Invalid)?;
    Ok(entry)
}

/// Position of the `actions=` keyword at a token boundary.
fn find_actions(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("actions=") {
        let at = from + i;
        let boundary = at == 0 || matches!(s.as_bytes()[at - 1], b',' | b' ' | b'\t');
        if boundary {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_strings_round_trip() {
        for s in [
            "table=10,priority=100,tcp,nw_src=10.1.0.0/16,tp_dst=80,actions=goto_table:20",
            "cookie=0x2a,table=40,priority=200,tcp,in_port=3,nw_dst=10.0.0.5,tp_dst=0x1f90/0xfff0,actions=conjunction(7,2/3)",
            "table=0,priority=1,actions=drop",
            "table=30,priority=200,ip,ct_state=-new+est+trk,actions=goto_table:60",
            "table=20,priority=100,arp,arp_tpa=10.0.0.1,arp_op=1,actions=move:dl_src->dl_dst,set_field:02:00:00:00:00:01->dl_src,load:0x2->nw_proto[0..7],move:arp_sha->arp_tha,set_field:02:00:00:00:00:01->arp_sha,move:nw_src->nw_dst,set_field:10.0.0.1->nw_src,output:in_port",
            "table=70,priority=10,ip,ct_state=+new+trk,actions=ct(commit,zone=reg6),load:0x5->reg0[0..15],output:4",
            "table=0,priority=5,ipv6,ipv6_src=fd00::/64,actions=ct(zone=3,table=30)",
            "table=0,priority=5,icmp,icmp_type=8,icmp_code=0,actions=resubmit(,10),controller",
            "table=50,priority=300,tcp,conj_id=12,actions=note:allow,goto_table:60",
            "table=1,priority=1,tcp,nw_frag=no,tcp_flags=+syn-ack,actions=output:2",
        ] {
            let f = parse_flow(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(f.to_string(), s);
            assert_eq!(parse_flow(&f.to_string()).unwrap(), f);
        }
    }

    #[test]
    fn ovs_dump_lines_parse() {
        let f = parse_flow(
            " cookie=0x5, duration=3.2s, table=40, n_packets=3, n_bytes=180, priority=200,tcp,tp_dst=80 actions=goto_table:50",
        )
        .unwrap();
        assert_eq!(
            f.to_string(),
            "cookie=0x5,table=40,priority=200,tcp,tp_dst=80,actions=goto_table:50"
        );
    }

    #[test]
    fn errors_quote_the_bad_token() {
        let e = parse_flow("table=0,tcp,tp_dst=99999,actions=drop").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad token `tp_dst=99999`: 99999 is out of range (0-65535)"
        );
        let e = parse_flow("table=0,tcp,nw_src=10.0.0.300,actions=drop").unwrap_err();
        assert!(e.to_string().contains("`nw_src=10.0.0.300`"), "{e}");
        let e = parse_flow("table=0,bogus=1,actions=drop").unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = parse_flow("table=0,tcp,actions=frobnicate").unwrap_err();
        assert!(e.to_string().contains("`frobnicate`"), "{e}");
        assert_eq!(parse_flow("table=0,tcp"), Err(OfctlError::NoActions));
        let e = parse_flow("table=40,tcp,actions=conjunction(1,1/1)").unwrap_err();
        assert!(matches!(
            e,
            OfctlError::Invalid(FlowError::BadConjunction { .. })
        ));
        let e = parse_flow("table=40,actions=goto_table:10").unwrap_err();
        assert!(matches!(
            e,
            OfctlError::Invalid(FlowError::GotoBackwards { .. })
        ));
    }
}
