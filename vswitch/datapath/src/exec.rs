//! Executing a packet: passes through the pipeline, with conntrack between them.
//!
//! Owns the one loop that both the packet path ([`crate::worker`]) and
//! [`crate::trace`] run: translate a pass (from the microflow cache, or with a
//! recording observer), carry out its actions, and when it ends in `ct(table=N)`
//! look the packet up in conntrack and start the next pass at table N. Where a
//! translation comes from and what its actions touch (frame bytes, the live
//! conntrack table, or nothing) are the caller's, through [`Translate`] and
//! [`Execute`]; the sequencing, the loop limit and the verdict are decided here
//! once.

use crate::classify::FlowId;
use crate::conntrack::{CtRefused, Looked, NatRewrite};
use crate::field::ip_proto;
use crate::field::{Field, MatchKey};
use crate::flow::TableId;
use crate::key::{FlowKey, PortNo};
use crate::nat::Ends;
use crate::pipeline::{DpAction, End, Xlate};

/// Limit on conntrack recirculations of one packet.
pub const MAX_PASSES: usize = 4;

/// Where a pass's translation comes from.
pub(crate) trait Translate {
    /// The translation of `key` starting at table `stage`.
    fn translate(&mut self, key: &MatchKey, stage: TableId) -> &Xlate;
}

/// What carrying out a pass's actions touches.
pub(crate) trait Execute {
    /// A packet field was rewritten (the key already holds the new value).
    fn rewrite(&mut self, key: &FlowKey, field: Field, value: u128);
    /// `ct(commit)`: create the connection of the packet that arrived as
    /// `orig` and is now `current` (translated when they differ), or say why not.
    fn commit(
        &mut self,
        zone: u16,
        mark: Option<u8>,
        orig: &FlowKey,
        current: &FlowKey,
    ) -> Result<(), CtRefused>;
    /// `ct(table=N)`: the packet's conntrack state in `zone` (with `nat`,
    /// the rewrite its connection's translation gives it).
    fn lookup(&mut self, zone: u16, key: &FlowKey, nat: bool) -> Looked;
    /// The packet (now `key`) gets these ends.
    fn set_ends(&mut self, key: &FlowKey, to: &Ends);
    /// An ICMP error (now `key`) gets these ends, and its embedded packet `inner`.
    fn set_error_ends(&mut self, key: &FlowKey, outer: &Ends, inner: &Ends);
    /// `reject`: replace the packet with its answer (a reset or an
    /// unreachable); false when there is none to give.
    fn reject(&mut self, key: &FlowKey) -> bool;
    /// `nd_advert`: turn the solicitation into its advertisement; false when
    /// the frame cannot be answered (then the pass outputs nothing).
    fn nd_advert(&mut self, key: &FlowKey, mac: [u8; 6], router: bool) -> bool;
}

/// How a packet's passes ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ran {
    /// The last flow whose actions ran: on a drop, the flow that decided it.
    pub last: Option<FlowId>,
    /// How the last pass ended ([`End::LoopLimit`] also when passes ran out).
    pub end: End,
    pub punt: bool,
    /// A connection was committed.
    pub committed: bool,
    /// A commit was refused (the table is full, or the originator at its limit).
    pub ct_refused: Option<CtRefused>,
    /// `reject` replaced the packet with its answer, output to `in_port`.
    pub reply: bool,
}

/// Runs `packet` through the pipeline: pass after pass, conntrack between them,
/// outputs appended to `outputs`.
#[inline(always)]
pub(crate) fn run<T: Translate, E: Execute>(
    t: &mut T,
    e: &mut E,
    packet: &FlowKey,
    outputs: &mut Vec<PortNo>,
) -> Ran {
    // The packet's key as conntrack sees it: the parsed one until a pass
    // rewrites a header field (copied only then).
    let mut rewritten: Option<FlowKey> = None;
    let mut key = packet.to_match_key();
    let mut stage = TableId(0);
    let mut ran = Ran {
        last: None,
        end: End::Done,
        punt: false,
        committed: false,
        ct_refused: None,
        reply: false,
    };
    for _ in 0..MAX_PASSES {
        let x = t.translate(&key, stage);
        ran.last = x.last.or(ran.last);
        ran.end = x.end;
        let mut recirc = None;
        let mut fields_rewritten = false;
        let outputs_before = outputs.len();
        for a in &x.actions {
            match *a {
                DpAction::Output(p) => outputs.push(p),
                DpAction::Rewrite { field, value } => {
                    key.set(field, value);
                    e.rewrite(rewritten.as_ref().unwrap_or(packet), field, value);
                    fields_rewritten = true;
                }
                DpAction::Commit { zone, mark } => {
                    match e.commit(zone, mark, packet, rewritten.as_ref().unwrap_or(packet)) {
                        Ok(()) => ran.committed = true,
                        Err(why) => ran.ct_refused = Some(why),
                    }
                }
                DpAction::Recirc { zone, table, nat } => recirc = Some((zone, table, nat)),
                DpAction::Nat { src, target } => {
                    let current = rewritten.unwrap_or(*packet);
                    let mut to = Ends::of(&current);
                    let ported = matches!(
                        current.nw_proto,
                        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP
                    );
                    let (addr, port) = if src {
                        (&mut to.src, &mut to.sport)
                    } else {
                        (&mut to.dst, &mut to.dport)
                    };
                    *addr = target.addr;
                    if let Some(p) = target.port.filter(|_| ported) {
                        *port = p;
                    }
                    e.set_ends(&current, &to);
                    rewritten = Some(with_ends(&mut key, &current, &to));
                }
                DpAction::Reject => {
                    if e.reject(rewritten.as_ref().unwrap_or(packet)) {
                        outputs.clear();
                        outputs.push(packet.in_port);
                        ran.reply = true;
                    }
                    return ran;
                }
                DpAction::Controller => ran.punt = true,
                DpAction::NdAdvert { mac, router } => {
                    if !e.nd_advert(rewritten.as_ref().unwrap_or(packet), mac, router) {
                        outputs.truncate(outputs_before);
                        return ran;
                    }
                }
            }
        }
        let Some((zone, table, nat)) = recirc else {
            return ran;
        };
        if fields_rewritten {
            rewritten = Some(FlowKey {
                in_port: packet.in_port,
                icmp_id: packet.icmp_id,
                sctp_chunk: packet.sctp_chunk,
                ..FlowKey::from_match_key(&key)
            });
        }
        key.0[10..14].copy_from_slice(&x.regs);
        let current = rewritten.unwrap_or(*packet);
        let looked = e.lookup(zone, &current, nat);
        match looked.nat {
            None => {}
            Some(NatRewrite::Ends(to)) => {
                e.set_ends(&current, &to);
                rewritten = Some(with_ends(&mut key, &current, &to));
            }
            Some(NatRewrite::Error { outer, inner }) => {
                e.set_error_ends(&current, &outer, &inner);
                let to = Ends {
                    sport: current.tp_src,
                    dport: current.tp_dst,
                    ..outer
                };
                rewritten = Some(with_ends(&mut key, &current, &to));
            }
        }
        key.set(Field::CtState, u128::from(looked.state));
        key.set(Field::CtZone, u128::from(zone));
        key.set(Field::CtMark, u128::from(looked.mark));
        stage = table;
    }
    ran.end = End::LoopLimit;
    ran
}

/// `current` with its ends set to `to`, in both of the packet's keys.
fn with_ends(key: &mut MatchKey, current: &FlowKey, to: &Ends) -> FlowKey {
    let mut next = *current;
    next.nw_src = to.src;
    next.nw_dst = to.dst;
    key.set(Field::NwSrc, u128::from_be_bytes(to.src));
    key.set(Field::NwDst, u128::from_be_bytes(to.dst));
    if matches!(
        current.nw_proto,
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP
    ) {
        next.tp_src = to.sport;
        next.tp_dst = to.dport;
        key.set(Field::TpSrc, u128::from(to.sport));
        key.set(Field::TpDst, u128::from(to.dport));
    }
    next
}
