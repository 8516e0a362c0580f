//! Flow entries and actions.
//!
//! Owns what a flow *is* (`table, priority, match, actions, cookie`) and which flows
//! are impossible: [`FlowEntry::validate`] is the single gate every flow passes
//! before it reaches a table, whether it came from the policy compiler or from text.

use std::fmt;

use smallvec::SmallVec;

use crate::field::{Field, Match, ether_type, ip_proto};
use crate::key::PortNo;

/// A flow table number (0..=254; 255 is reserved, as in OpenFlow).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct TableId(pub u8);

impl TableId {
    pub const MAX: u8 = 254;
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Opaque 64-bit tag the producer of a flow chooses; the policy compiler maps it to
/// the rule that produced the flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct Cookie(pub u64);

/// Where `ct()` takes its zone from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Zone {
    Imm(u16),
    /// Low 16 bits of a register.
    Reg(u8),
}

/// One action of a flow.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Action {
    Output(PortNo),
    /// Stop: the packet is dropped unless it was already output.
    Drop,
    /// Continue at a later table (ends this flow's action list).
    GotoTable(TableId),
    /// Run another table now, then continue with the remaining actions.
    Resubmit(TableId),
    /// Clause `clause` of `n_clauses` of conjunctive match `id` (1-based, OVS style).
    Conjunction {
        id: u32,
        clause: u8,
        n_clauses: u8,
    },
    /// Conntrack: with `table`, look the packet up and continue at `table` with
    /// `ct_state` set; with `commit`, create the connection entry.
    Ct {
        commit: bool,
        zone: Zone,
        table: Option<TableId>,
        /// With `commit`: set the connection's `ct_mark`.
        mark: Option<u8>,
        /// `nat`: apply a tracked connection's translation at the lookup, or
        /// translate a new connection (remembered when it is committed).
        nat: Option<Nat>,
    },
    /// Run one bucket of select group `id` (chosen by a hash of the packet's
    /// addresses and ports), then continue with the flow's next action.
    Group(u32),
    /// Answer the packet with a TCP reset (TCP) or an ICMP / ICMPv6 port
    /// unreachable (anything else) sent back out of `in_port`; the packet
    /// itself goes nowhere. Only for IP flows.
    Reject,
    /// Write `value` into bits `ofs..ofs+nbits` of `field`.
    Load {
        field: Field,
        value: u128,
        ofs: u8,
        nbits: u8,
    },
    /// Set a whole field (registers, or packet fields the datapath can rewrite).
    SetField {
        field: Field,
        value: u128,
    },
    /// Copy one whole field into another of the same width.
    Move {
        src: Field,
        dst: Field,
    },
    /// Send the packet to the control plane.
    Controller,
    /// Turn an ICMPv6 neighbour solicitation into the neighbour advertisement
    /// answering it, from `mac` (with the router flag when `router`), in
    /// place: the IPv6 counterpart of an ARP responder's field rewrites,
    /// which ICMPv6's checksum and option layout do not allow field by field.
    /// Only for flows matching `icmp6,icmpv6_type=135`; then `output:in_port`.
    NdAdvert {
        mac: [u8; 6],
        router: bool,
    },
    /// A comment carried with the flow; no effect.
    Note(Box<str>),
}

/// The `nat` argument of `ct`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Nat {
    /// `nat`: a tracked connection's packets get its translation (the
    /// original direction forwards, replies backwards) at the lookup.
    Tracked,
    /// `nat(src=ADDR[:PORT])`: a new connection's source becomes this.
    Src(NatTarget),
    /// `nat(dst=ADDR[:PORT])`: a new connection's destination becomes this.
    Dst(NatTarget),
}

/// An address (IPv4 mapped, as in the wide fields) and optionally a port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NatTarget {
    pub addr: [u8; 16],
    pub port: Option<u16>,
}

impl NatTarget {
    pub fn is_v4(&self) -> bool {
        self.addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
    }
}

/// One flow: `table, priority, match, actions, cookie`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct FlowEntry {
    pub table: TableId,
    pub priority: u16,
    pub matcher: Match,
    pub actions: SmallVec<[Action; 2]>,
    pub cookie: Cookie,
}

/// Identity of a flow inside a table set: adding a flow with the same key replaces
/// the old one, as OpenFlow's add does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FlowIdentity {
    pub table: TableId,
    pub priority: u16,
    pub matcher: Match,
}

/// Fields whose rewrite the datapath supports (it edits the frame bytes).
pub(crate) fn is_rewritable(field: Field) -> bool {
    matches!(
        field,
        Field::DlSrc
            | Field::DlDst
            | Field::ArpSha
            | Field::ArpTha
            | Field::NwSrc
            | Field::NwDst
            | Field::NwProto
            | Field::Reg(_)
    )
}

/// Why a flow is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("conjunction({id},{clause}/{n}): a conjunction needs 2 to 64 clauses and 1 <= k <= n")]
    BadConjunction { id: u32, clause: u8, n: u8 },
    #[error("a flow with conjunction actions may have no other actions")]
    MixedConjunction,
    #[error("a conjunctive flow may not match on conj_id")]
    ConjunctiveConjId,
    #[error("conj_id must be matched exactly and be non-zero")]
    BadConjIdMatch,
    #[error("goto_table:{to} from table {from}: goto_table must go to a later table")]
    GotoBackwards { from: u8, to: u8 },
    #[error("table {0} is out of range (0-254)")]
    BadTable(u8),
    #[error("{0} must be the last action of a flow")]
    NotLast(&'static str),
    #[error("match on {field} needs {needs}")]
    Prerequisite {
        field: &'static str,
        needs: &'static str,
    },
    #[error(
        "cannot rewrite {0}: the datapath rewrites only MAC addresses, ARP fields (in flows matching arp) and registers"
    )]
    NotRewritable(&'static str),
    #[error("move:{src}->{dst}: fields differ in width")]
    MoveWidth {
        src: &'static str,
        dst: &'static str,
    },
    #[error("load into bits {ofs}..{end} does not fit in {field} ({bits} bits)", end = *ofs as u32 + *nbits as u32)]
    LoadRange {
        field: &'static str,
        ofs: u8,
        nbits: u8,
        bits: u32,
    },
    #[error("nd_advert needs a match on icmp6,icmpv6_type=135 (a neighbour solicitation)")]
    NdAdvertNeedsSolicitation,
    #[error("register reg{0} does not exist (reg0-reg7)")]
    BadRegister(u8),
    #[error("group:{0}: no such group (add the group first)")]
    UnknownGroup(u32),
    #[error("reject needs a match on ip or ipv6")]
    RejectNeedsIp,
    #[error("nat needs a match on ip or ipv6, of the target's family")]
    NatNeedsIp,
    #[error("ct(nat(...)) with table=: translate without recirculating, then goto_table")]
    NatWithTable,
    #[error("a group bucket may not use {0}")]
    BadBucketAction(&'static str),
}

impl FlowEntry {
    /// A flow with no actions (drops).
    pub fn new(table: u8, priority: u16, matcher: Match) -> FlowEntry {
        FlowEntry {
            table: TableId(table),
            priority,
            matcher,
            actions: SmallVec::new(),
            cookie: Cookie(0),
        }
    }

    pub fn action(mut self, a: Action) -> Self {
        self.actions.push(a);
        self
    }

    pub fn cookie(mut self, c: u64) -> Self {
        self.cookie = Cookie(c);
        self
    }

    pub fn identity(&self) -> FlowIdentity {
        FlowIdentity {
            table: self.table,
            priority: self.priority,
            matcher: self.matcher,
        }
    }

    /// The conjunction clauses this flow contributes to, if it is conjunctive.
    pub fn conjunctions(&self) -> impl Iterator<Item = (u32, u8, u8)> + '_ {
        self.actions.iter().filter_map(|a| match a {
            Action::Conjunction {
                id,
                clause,
                n_clauses,
            } => Some((*id, *clause, *n_clauses)),
            _ => None,
        })
    }

    /// Whether this flow only feeds conjunctive matches.
    pub fn is_conjunctive(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Conjunction { .. }))
    }

    /// Checks that the flow can be installed.
    ///
    /// Fails on: a conjunction with n < 2 or k outside 1..=n, conjunctive flows with
    /// other actions or matching `conj_id`, `goto_table` to an earlier or the same
    /// table, `ct(table=..)`/`goto_table` not last, matches missing their
    /// prerequisites (`tp_dst` without a transport protocol, ...), and rewrites the
    /// datapath cannot perform.
    pub fn validate(&self) -> Result<(), FlowError> {
        let table = self.table.0;
        if table > TableId::MAX {
            return Err(FlowError::BadTable(table));
        }
        self.validate_match()?;
        let (dl, dl_mask) = self.matcher.get(Field::DlType);
        let arp = dl_mask == 0xffff && dl == u128::from(ether_type::ARP);
        let conjunctive = self.is_conjunctive();
        if conjunctive && self.matcher.has(Field::ConjId) {
            return Err(FlowError::ConjunctiveConjId);
        }
        let last = self.actions.len().saturating_sub(1);
        for (i, a) in self.actions.iter().enumerate() {
            match a {
                Action::Conjunction {
                    id,
                    clause,
                    n_clauses,
                } => {
                    let valid = (2..=64).contains(n_clauses) && *clause >= 1 && clause <= n_clauses;
                    if !valid {
                        return Err(FlowError::BadConjunction {
                            id: *id,
                            clause: *clause,
                            n: *n_clauses,
                        });
                    }
                }
                _ if conjunctive => return Err(FlowError::MixedConjunction),
                Action::GotoTable(to) => {
                    if to.0 > TableId::MAX {
                        return Err(FlowError::BadTable(to.0));
                    }
                    if to.0 <= table {
                        return Err(FlowError::GotoBackwards {
                            from: table,
                            to: to.0,
                        });
                    }
                    if i != last {
                        return Err(FlowError::NotLast("goto_table"));
                    }
                }
                Action::Resubmit(to) if to.0 > TableId::MAX => {
                    return Err(FlowError::BadTable(to.0));
                }
                Action::Ct {
                    nat: Some(Nat::Src(_) | Nat::Dst(_)),
                    table: Some(_),
                    ..
                } => return Err(FlowError::NatWithTable),
                Action::Ct {
                    nat: Some(Nat::Src(t) | Nat::Dst(t)),
                    zone,
                    ..
                } => {
                    check_zone(*zone)?;
                    let (dl, mask) = self.matcher.get(Field::DlType);
                    let family = if t.is_v4() {
                        ether_type::IPV4
                    } else {
                        ether_type::IPV6
                    };
                    if mask != 0xffff || dl != u128::from(family) {
                        return Err(FlowError::NatNeedsIp);
                    }
                }
                Action::Ct {
                    table: Some(t),
                    zone,
                    ..
                } => {
                    if t.0 > TableId::MAX {
                        return Err(FlowError::BadTable(t.0));
                    }
                    if i != last {
                        return Err(FlowError::NotLast("ct(table=...)"));
                    }
                    check_zone(*zone)?;
                }
                Action::Ct { zone, .. } => check_zone(*zone)?,
                Action::Drop if i != last => return Err(FlowError::NotLast("drop")),
                Action::Reject if i != last => return Err(FlowError::NotLast("reject")),
                Action::Reject => {
                    let (dl, mask) = self.matcher.get(Field::DlType);
                    let ip = mask == 0xffff
                        && (dl == u128::from(ether_type::IPV4)
                            || dl == u128::from(ether_type::IPV6));
                    if !ip {
                        return Err(FlowError::RejectNeedsIp);
                    }
                }
                Action::NdAdvert { .. } => {
                    let m = &self.matcher;
                    let is = |f: Field, v: u128, mask: u128| m.get(f) == (v, mask);
                    let solicitation = is(Field::DlType, ether_type::IPV6.into(), 0xffff)
                        && is(Field::NwProto, ip_proto::ICMPV6.into(), 0xff)
                        && is(Field::TpSrc, 135, 0xffff);
                    if !solicitation {
                        return Err(FlowError::NdAdvertNeedsSolicitation);
                    }
                }
                Action::SetField { field, .. } => check_rewrite(*field, arp)?,
                Action::Load {
                    field, ofs, nbits, ..
                } => {
                    check_rewrite(*field, arp)?;
                    let bits = field.bits();
                    if *nbits == 0 || u32::from(*ofs) + u32::from(*nbits) > bits {
                        return Err(FlowError::LoadRange {
                            field: field.name(),
                            ofs: *ofs,
                            nbits: *nbits,
                            bits,
                        });
                    }
                }
                Action::Move { src, dst } => {
                    check_rewrite(*dst, arp)?;
                    if let Field::Reg(n) = src
                        && *n as usize >= crate::field::NREGS
                    {
                        return Err(FlowError::BadRegister(*n));
                    }
                    if src.bits() != dst.bits() {
                        return Err(FlowError::MoveWidth {
                            src: src.name(),
                            dst: dst.name(),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_match(&self) -> Result<(), FlowError> {
        let m = &self.matcher;
        let (dl_type, dl_mask) = m.get(Field::DlType);
        let dl_type = if dl_mask == 0xffff {
            Some(dl_type as u16)
        } else {
            None
        };
        let is_ip = matches!(dl_type, Some(ether_type::IPV4 | ether_type::IPV6));
        let is_arp = dl_type == Some(ether_type::ARP);
        let (proto, proto_mask) = m.get(Field::NwProto);
        let proto = if proto_mask == 0xff && is_ip {
            Some(proto as u8)
        } else {
            None
        };
        let need = |field: Field, ok: bool, needs: &'static str| {
            if m.has(field) && !ok {
                Err(FlowError::Prerequisite {
                    field: field.name(),
                    needs,
                })
            } else {
                Ok(())
            }
        };
        need(
            Field::NwSrc,
            is_ip || is_arp,
            "dl_type=0x0800, 0x86dd or 0x0806",
        )?;
        need(
            Field::NwDst,
            is_ip || is_arp,
            "dl_type=0x0800, 0x86dd or 0x0806",
        )?;
        need(
            Field::NwProto,
            is_ip || is_arp,
            "dl_type=0x0800, 0x86dd or 0x0806",
        )?;
        need(Field::NwFrag, is_ip, "an IP dl_type")?;
        let l4 = matches!(
            proto,
            Some(
                ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP | ip_proto::ICMP | ip_proto::ICMPV6
            )
        );
        need(Field::TpSrc, l4, "nw_proto tcp, udp, sctp, icmp or icmp6")?;
        need(Field::TpDst, l4, "nw_proto tcp, udp, sctp, icmp or icmp6")?;
        need(
            Field::TcpFlags,
            proto == Some(ip_proto::TCP),
            "nw_proto=6 (tcp)",
        )?;
        // Neighbour discovery keeps its link-layer options where ARP keeps
        // its hardware addresses (nd_sll, nd_tll).
        let (icmp_type, type_mask) = m.get(Field::TpSrc);
        let nd = dl_type == Some(ether_type::IPV6)
            && proto == Some(ip_proto::ICMPV6)
            && type_mask == 0xffff
            && matches!(icmp_type, 135 | 136);
        need(
            Field::ArpSha,
            is_arp || nd,
            "dl_type=0x0806 (arp), or icmp6 with icmpv6_type=135 or 136",
        )?;
        need(
            Field::ArpTha,
            is_arp || nd,
            "dl_type=0x0806 (arp), or icmp6 with icmpv6_type=135 or 136",
        )?;
        if m.has(Field::ConjId) {
            let (v, mask) = m.get(Field::ConjId);
            if mask != Field::ConjId.full_mask() || v == 0 {
                return Err(FlowError::BadConjIdMatch);
            }
        }
        Ok(())
    }
}

fn check_zone(zone: Zone) -> Result<(), FlowError> {
    match zone {
        Zone::Reg(n) if n as usize >= crate::field::NREGS => Err(FlowError::BadRegister(n)),
        _ => Ok(()),
    }
}

/// `arp`: whether the flow matches ARP frames only (the `nw_*` fields are then ARP
/// fields, which the datapath can rewrite; IP addresses it cannot).
fn check_rewrite(field: Field, arp: bool) -> Result<(), FlowError> {
    if let Field::Reg(n) = field
        && n as usize >= crate::field::NREGS
    {
        return Err(FlowError::BadRegister(n));
    }
    let arp_only = matches!(field, Field::NwSrc | Field::NwDst | Field::NwProto);
    if is_rewritable(field) && (arp || !arp_only) {
        Ok(())
    } else {
        Err(FlowError::NotRewritable(field.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp() -> Match {
        Match::any()
            .with(Field::DlType, ether_type::IPV4.into())
            .with(Field::NwProto, ip_proto::TCP.into())
    }

    #[test]
    fn rejects_impossible_flows() {
        let conj1 = FlowEntry::new(40, 10, tcp()).action(Action::Conjunction {
            id: 1,
            clause: 1,
            n_clauses: 1,
        });
        assert!(matches!(
            conj1.validate(),
            Err(FlowError::BadConjunction { .. })
        ));
        let back = FlowEntry::new(40, 10, tcp()).action(Action::GotoTable(TableId(30)));
        assert_eq!(
            back.validate(),
            Err(FlowError::GotoBackwards { from: 40, to: 30 })
        );
        let no_proto = FlowEntry::new(0, 1, Match::any().with(Field::TpDst, 80));
        assert!(matches!(
            no_proto.validate(),
            Err(FlowError::Prerequisite { .. })
        ));
        let mixed = FlowEntry::new(40, 10, tcp())
            .action(Action::Conjunction {
                id: 1,
                clause: 1,
                n_clauses: 2,
            })
            .action(Action::Output(PortNo(1)));
        assert_eq!(mixed.validate(), Err(FlowError::MixedConjunction));
        let ok = FlowEntry::new(40, 10, tcp().with(Field::TpDst, 80))
            .action(Action::GotoTable(TableId(50)));
        assert_eq!(ok.validate(), Ok(()));
    }
}
