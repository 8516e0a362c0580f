//! Actions in ovs-ofctl syntax: printing and parsing one action, with
//! `ct(...)`'s arguments (`nat(src|dst=ADDR[:PORT])` included).

use std::fmt;

use super::{
    OfctlError, bad, fmt_mac, fmt_port, fmt_value, parse_field_ref, parse_int, parse_mac,
    parse_port, parse_table, parse_value,
};
use crate::flow::{Action, Nat, NatTarget, Zone};

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Output(p) => write!(f, "output:{}", fmt_port(*p)),
            Action::Drop => f.write_str("drop"),
            Action::GotoTable(t) => write!(f, "goto_table:{t}"),
            Action::Resubmit(t) => write!(f, "resubmit(,{t})"),
            Action::Conjunction {
                id,
                clause,
                n_clauses,
            } => write!(f, "conjunction({id},{clause}/{n_clauses})"),
            Action::Ct {
                commit,
                zone,
                table,
                mark,
                nat,
            } => {
                let mut args = Vec::new();
                if *commit {
                    args.push("commit".to_string());
                }
                match zone {
                    Zone::Imm(0) => {}
                    Zone::Imm(z) => args.push(format!("zone={z}")),
                    Zone::Reg(r) => args.push(format!("zone=reg{r}")),
                }
                if let Some(t) = table {
                    args.push(format!("table={t}"));
                }
                if let Some(m) = mark {
                    args.push(format!("exec(set_field:{m}->ct_mark)"));
                }
                match nat {
                    None => {}
                    Some(Nat::Tracked) => args.push("nat".into()),
                    Some(Nat::Src(t)) => args.push(format!("nat(src={})", fmt_nat_target(t))),
                    Some(Nat::Dst(t)) => args.push(format!("nat(dst={})", fmt_nat_target(t))),
                }
                write!(f, "ct({})", args.join(","))
            }
            Action::Load {
                field,
                value,
                ofs,
                nbits,
            } => {
                write!(
                    f,
                    "load:0x{value:x}->{}[{}..{}]",
                    field.name(),
                    ofs,
                    ofs + nbits - 1
                )
            }
            Action::SetField { field, value } => {
                write!(
                    f,
                    "set_field:{}->{}",
                    fmt_value(*field, *value, field.full_mask()),
                    field.name()
                )
            }
            Action::Move { src, dst } => {
                write!(f, "move:{}->{}", src.name(), dst.name())
            }
            Action::Controller => f.write_str("controller"),
            Action::Group(g) => write!(f, "group:{g}"),
            Action::Reject => f.write_str("reject"),
            Action::NdAdvert { mac, router } => {
                write!(f, "nd_advert({}", fmt_mac(crate::field::mac_value(*mac)))?;
                if *router {
                    f.write_str(",router")?;
                }
                f.write_str(")")
            }
            Action::Note(text) => write!(f, "note:{text}"),
        }
    }
}

/// `ADDR`, `ADDR:PORT`, `[V6ADDR]:PORT` (ovs-ofctl's forms).
fn parse_nat_target(token: &str, s: &str) -> Result<NatTarget, OfctlError> {
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest
            .split_once(']')
            .ok_or_else(|| bad(token, "unclosed `[` in a nat address"))?;
        (a, p.strip_prefix(':'))
    } else if s.matches(':').count() == 1 {
        let (a, p) = s.split_once(':').expect("one colon");
        (a, Some(p))
    } else {
        (s, None)
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| bad(token, format!("`{addr}` is not an IP address")))?;
    let port = match port {
        Some(p) => Some(parse_int(token, p, 65535)? as u16),
        None => None,
    };
    Ok(NatTarget {
        addr: crate::key::ip_to_wide(ip),
        port,
    })
}

fn fmt_nat_target(t: &NatTarget) -> String {
    let ip = crate::key::wide_to_ip(t.addr);
    match (ip, t.port) {
        (_, None) => ip.to_string(),
        (std::net::IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
    }
}

/// Parses one action.
pub fn parse_action(token: &str) -> Result<Action, OfctlError> {
    let t = token.trim();
    if t == "drop" {
        return Ok(Action::Drop);
    }
    if t == "controller" {
        return Ok(Action::Controller);
    }
    if t == "reject" {
        return Ok(Action::Reject);
    }
    if let Some(g) = t.strip_prefix("group:") {
        return Ok(Action::Group(
            parse_int(token, g, u128::from(u32::MAX))? as u32
        ));
    }
    if let Some(inner) = t
        .strip_prefix("nd_advert(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (mac, router) = match inner.split_once(',') {
            Some((mac, "router")) => (mac, true),
            Some((_, other)) => {
                return Err(bad(
                    token,
                    format!("nd_advert: unknown flag `{other}` (router)"),
                ));
            }
            None => (inner, false),
        };
        let mac = crate::field::mac_bytes(parse_mac(token, mac)?);
        return Ok(Action::NdAdvert { mac, router });
    }
    if let Some(p) = t.strip_prefix("output:") {
        return Ok(Action::Output(parse_port(token, p)?));
    }
    if let Some(n) = t.strip_prefix("goto_table:") {
        return Ok(Action::GotoTable(parse_table(token, n)?));
    }
    if let Some(n) = t.strip_prefix("note:") {
        return Ok(Action::Note(n.into()));
    }
    if let Some(inner) = t
        .strip_prefix("resubmit(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let table = inner
            .strip_prefix(',')
            .ok_or_else(|| bad(token, "resubmit takes (,TABLE)"))?;
        return Ok(Action::Resubmit(parse_table(token, table)?));
    }
    if let Some(inner) = t
        .strip_prefix("conjunction(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (id, kn) = inner
            .split_once(',')
            .ok_or_else(|| bad(token, "conjunction takes (ID,K/N)"))?;
        let (k, n) = kn
            .trim()
            .split_once('/')
            .ok_or_else(|| bad(token, "conjunction takes (ID,K/N)"))?;
        return Ok(Action::Conjunction {
            id: parse_int(token, id.trim(), u128::from(u32::MAX))? as u32,
            clause: parse_int(token, k, 255)? as u8,
            n_clauses: parse_int(token, n, 255)? as u8,
        });
    }
    if let Some(inner) = t.strip_prefix("ct(").and_then(|r| r.strip_suffix(')')) {
        let mut commit = false;
        let mut zone = Zone::Imm(0);
        let mut table = None;
        let mut mark = None;
        let mut nat = None;
        for arg in inner.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if arg == "commit" {
                commit = true;
            } else if arg == "nat" {
                nat = Some(Nat::Tracked);
            } else if let Some(spec) = arg.strip_prefix("nat(").and_then(|r| r.strip_suffix(')')) {
                nat = Some(match spec.split_once('=') {
                    Some(("src", t)) => Nat::Src(parse_nat_target(token, t)?),
                    Some(("dst", t)) => Nat::Dst(parse_nat_target(token, t)?),
                    _ => {
                        return Err(bad(
                            token,
                            "nat takes (src=ADDR[:PORT]) or (dst=ADDR[:PORT])",
                        ));
                    }
                });
            } else if let Some(m) = arg
                .strip_prefix("exec(set_field:")
                .and_then(|r| r.strip_suffix("->ct_mark)"))
            {
                mark = Some(parse_int(token, m, 0xff)? as u8);
            } else if let Some(z) = arg.strip_prefix("zone=") {
                zone = match z.strip_prefix("reg") {
                    Some(r) => Zone::Reg(parse_int(token, r, 7)? as u8),
                    None => Zone::Imm(parse_int(token, z, 0xffff)? as u16),
                };
            } else if let Some(tb) = arg.strip_prefix("table=") {
                table = Some(parse_table(token, tb)?);
            } else {
                return Err(bad(token, format!("unknown ct argument `{arg}`")));
            }
        }
        if mark.is_some() && !commit {
            return Err(bad(token, "ct_mark is set only with commit"));
        }
        return Ok(Action::Ct {
            commit,
            zone,
            table,
            mark,
            nat,
        });
    }
    if let Some(rest) = t.strip_prefix("load:") {
        let (v, dst) = rest
            .split_once("->")
            .ok_or_else(|| bad(token, "load takes VALUE->FIELD[START..END]"))?;
        let (name, range) = match dst.split_once('[') {
            Some((n, r)) => (
                n,
                r.strip_suffix(']')
                    .ok_or_else(|| bad(token, "unclosed `[`"))?,
            ),
            None => (dst, ""),
        };
        let field = parse_field_ref(token, name)?;
        let (ofs, nbits) = if range.is_empty() {
            (0, field.bits())
        } else {
            let (a, b) = range.split_once("..").unwrap_or((range, range));
            let a = parse_int(token, a, 127)? as u32;
            let b = parse_int(token, b, 127)? as u32;
            if b < a {
                return Err(bad(token, "bit range end is before its start"));
            }
            (a, b - a + 1)
        };
        if ofs + nbits > field.bits() || nbits > 128 {
            return Err(bad(
                token,
                format!("bit range does not fit in {}", field.name()),
            ));
        }
        let max = if nbits >= 128 {
            u128::MAX
        } else {
            (1u128 << nbits) - 1
        };
        let value = parse_int(token, v, max)?;
        return Ok(Action::Load {
            field,
            value,
            ofs: ofs as u8,
            nbits: nbits as u8,
        });
    }
    if let Some(rest) = t.strip_prefix("set_field:") {
        let (v, dst) = rest
            .split_once("->")
            .ok_or_else(|| bad(token, "set_field takes VALUE->FIELD"))?;
        let field = parse_field_ref(token, dst)?;
        let (value, mask) = parse_value(token, field, v)?;
        if mask != field.full_mask() {
            return Err(bad(token, "set_field takes a whole value, not a mask"));
        }
        return Ok(Action::SetField { field, value });
    }
    if let Some(rest) = t.strip_prefix("move:") {
        let (a, b) = rest
            .split_once("->")
            .ok_or_else(|| bad(token, "move takes SRC->DST"))?;
        return Ok(Action::Move {
            src: parse_field_ref(token, a.trim_end_matches("[]"))?,
            dst: parse_field_ref(token, b.trim_end_matches("[]"))?,
        });
    }
    Err(bad(token, "unknown action"))
}
