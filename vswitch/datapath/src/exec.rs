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
use crate::conntrack::CtRefused;
use crate::field::{Field, MatchKey};
use crate::flow::TableId;
use crate::key::{FlowKey, PortNo};
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
    /// `ct(commit)`: create the connection, or say why not.
    fn commit(&mut self, zone: u16, mark: Option<u8>, key: &FlowKey) -> Result<(), CtRefused>;
    /// `ct(table=N)`: the packet's `(ct_state, ct_mark)` in `zone`.
    fn lookup(&mut self, zone: u16, key: &FlowKey) -> (u8, u8);
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
                    match e.commit(zone, mark, rewritten.as_ref().unwrap_or(packet)) {
                        Ok(()) => ran.committed = true,
                        Err(why) => ran.ct_refused = Some(why),
                    }
                }
                DpAction::Recirc { zone, table } => recirc = Some((zone, table)),
                DpAction::Controller => ran.punt = true,
                DpAction::NdAdvert { mac, router } => {
                    if !e.nd_advert(rewritten.as_ref().unwrap_or(packet), mac, router) {
                        outputs.truncate(outputs_before);
                        return ran;
                    }
                }
            }
        }
        let Some((zone, table)) = recirc else {
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
        let (state, mark) = e.lookup(zone, rewritten.as_ref().unwrap_or(packet));
        key.set(Field::CtState, u128::from(state));
        key.set(Field::CtZone, u128::from(zone));
        key.set(Field::CtMark, u128::from(mark));
        stage = table;
    }
    ran.end = End::LoopLimit;
    ran
}
