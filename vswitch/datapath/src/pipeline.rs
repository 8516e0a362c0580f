//! Pipeline execution: a key through the tables, to a list of datapath actions.
//!
//! Owns the meaning of flow actions (goto, resubmit, ct, load, output, ...) and the
//! loop guards. Translation is pure: the same snapshot and key always give the same
//! [`Xlate`], which is what makes it cacheable. Conntrack lookups are not done here:
//! `ct(table=N)` ends a pass with [`End::Recirc`] and the caller recirculates. The
//! same code runs for packets and for traces, through the [`Observer`] parameter.

use smallvec::SmallVec;

use crate::classify::{FlowId, Hit};
use crate::field::{Field, MatchKey};
use crate::field::{ct_state, ip_proto};
use crate::flow::{Action, Nat, NatTarget, TableId, Zone, is_rewritable};
use crate::key::PortNo;
use crate::table::{FlowTables, Installed};

/// Nesting limit for `resubmit`.
pub const MAX_DEPTH: u32 = 64;
/// Limit on table lookups in one pass (resubmit loops, fan-out).
pub const MAX_LOOKUPS: u32 = 4096;

/// A translated action: what executing a packet needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DpAction {
    Output(PortNo),
    /// Rewrite a packet field to this (already computed) value.
    Rewrite {
        field: Field,
        value: u128,
    },
    /// Create the conntrack entry for this packet's connection (and set its mark).
    Commit {
        zone: u16,
        mark: Option<u8>,
    },
    /// Look the packet up in conntrack, then continue at `table`. Always last.
    /// With `nat`, a translated connection's packet gets its translation.
    Recirc {
        zone: u16,
        table: TableId,
        nat: bool,
    },
    /// Translate a new connection's source (`src`) or destination: the key
    /// already holds the new ends; the frame is rewritten, and a later
    /// commit makes the translation the connection's.
    Nat {
        src: bool,
        target: NatTarget,
    },
    /// Answer the packet with a reset or port unreachable out of its port.
    Reject,
    Controller,
    /// Answer the neighbour solicitation in place (see [`Action::NdAdvert`]).
    NdAdvert {
        mac: [u8; 6],
        router: bool,
    },
}

/// How a pass ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum End {
    /// All actions ran.
    #[default]
    Done,
    /// A table had no matching flow.
    Miss(TableId),
    /// Recirculation through conntrack.
    Recirc,
    /// `MAX_DEPTH` or `MAX_LOOKUPS` exceeded: the packet is dropped.
    LoopLimit,
}

/// The result of one pass through the pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Xlate {
    pub actions: SmallVec<[DpAction; 6]>,
    /// Flows hit, in order (for counters).
    pub hits: SmallVec<[FlowId; 8]>,
    /// Registers after the pass (words of reg0..reg7), input of the next pass.
    pub regs: [u64; 4],
    pub end: End,
    /// The last flow whose actions ran: on a drop, the flow that decided it.
    pub last: Option<FlowId>,
}

impl Xlate {
    pub fn outputs(&self) -> impl Iterator<Item = PortNo> + '_ {
        self.actions.iter().filter_map(|a| match a {
            DpAction::Output(p) => Some(*p),
            _ => None,
        })
    }
}

/// Sees every table visit; trace records them, the packet path ignores them.
pub trait Observer {
    fn visit(&mut self, table: TableId, key: &MatchKey, hit: Option<(Hit, &Installed)>, depth: u32);
    /// A select group chose a bucket (`None`: it had none to choose).
    fn group(&mut self, _group: u32, _bucket: Option<u32>) {}
    /// The bucket `client` took last in `group`, while its affinity lasts.
    fn affinity(&mut self, _group: u32, _client: [u8; 16]) -> Option<u32> {
        None
    }
    /// `client` took `bucket` of a group with affinity (`secs`).
    fn took(&mut self, _group: u32, _client: [u8; 16], _bucket: u32, _secs: u32) {}
}

/// The packet path's observer: does nothing, compiles to nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {
    #[inline(always)]
    fn visit(&mut self, _: TableId, _: &MatchKey, _: Option<(Hit, &Installed)>, _: u32) {}
}

enum Flow {
    Continue,
    Halt,
}

/// How an action list ended.
enum Step {
    /// It ran out: the flow is done (or the group's bucket, and the flow goes on).
    Next,
    /// `goto_table`.
    Goto(TableId),
    /// The pass ends (drop, reject, recirculation) or halts.
    Stop(Flow),
}

struct Run<'a, O> {
    tables: &'a FlowTables,
    obs: &'a mut O,
    x: Xlate,
    lookups: u32,
}

/// Runs `key` through `tables` starting at `start`; `key` is updated with every
/// register or field the actions write.
pub fn xlate<O: Observer>(
    tables: &FlowTables,
    key: &mut MatchKey,
    start: TableId,
    obs: &mut O,
) -> Xlate {
    let mut run = Run {
        tables,
        obs,
        x: Xlate::default(),
        lookups: 0,
    };
    run.table(key, start, 0);
    run.x.regs = [key.0[10], key.0[11], key.0[12], key.0[13]];
    run.x
}

impl<O: Observer> Run<'_, O> {
    fn table(&mut self, key: &mut MatchKey, mut t: TableId, depth: u32) -> Flow {
        'goto: loop {
            self.lookups += 1;
            if depth > MAX_DEPTH || self.lookups > MAX_LOOKUPS {
                self.x.end = End::LoopLimit;
                return Flow::Halt;
            }
            let Some((hit, installed)) = self.tables.lookup(t, key) else {
                self.obs.visit(t, key, None, depth);
                self.x.end = End::Miss(t);
                return Flow::Continue;
            };
            self.obs.visit(t, key, Some((hit, installed)), depth);
            self.x.hits.push(hit.flow);
            self.x.last = Some(hit.flow);
            self.x.end = End::Done;
            match self.actions(key, &installed.entry.actions, depth) {
                Step::Next => return Flow::Continue,
                Step::Stop(flow) => return flow,
                Step::Goto(next) => {
                    t = next;
                    continue 'goto;
                }
            }
        }
    }

    /// Runs one action list (a flow's, or a group bucket's within it).
    fn actions(&mut self, key: &mut MatchKey, actions: &[Action], depth: u32) -> Step {
        for action in actions {
            match action {
                Action::Output(p) => {
                    let port = if *p == PortNo::IN_PORT {
                        PortNo(key.get(Field::InPort) as u32)
                    } else {
                        *p
                    };
                    self.x.actions.push(DpAction::Output(port));
                }
                Action::Drop => return Step::Stop(Flow::Continue),
                Action::GotoTable(next) => return Step::Goto(*next),
                Action::Resubmit(next) => {
                    if let Flow::Halt = self.table(key, *next, depth + 1) {
                        return Step::Stop(Flow::Halt);
                    }
                }
                Action::Conjunction { .. } => {
                    // Conjunctive flows never win a lookup (classify module).
                }
                Action::Group(id) => {
                    let tables = self.tables;
                    let bucket = tables.group(*id).and_then(|g| {
                        let Some(secs) = g.affinity else {
                            return g.choose(key);
                        };
                        let client = key.get(Field::NwSrc).to_be_bytes();
                        let b = self
                            .obs
                            .affinity(g.id, client)
                            .and_then(|b| g.bucket(b))
                            .or_else(|| g.choose(key))?;
                        self.obs.took(g.id, client, b.id, secs);
                        Some(b)
                    });
                    self.obs.group(*id, bucket.map(|b| b.id));
                    let Some(bucket) = bucket else {
                        // No such group, or no bucket to choose: dropped.
                        return Step::Stop(Flow::Continue);
                    };
                    match self.actions(key, &bucket.actions, depth) {
                        Step::Next => {}
                        other => return other,
                    }
                }
                Action::Reject => {
                    self.x.actions.push(DpAction::Reject);
                    return Step::Stop(Flow::Continue);
                }
                Action::Ct {
                    commit,
                    zone,
                    table,
                    mark,
                    nat,
                } => {
                    let zone = match zone {
                        Zone::Imm(z) => *z,
                        Zone::Reg(r) => key.get(Field::Reg(*r)) as u16,
                    };
                    if let Some(Nat::Src(target) | Nat::Dst(target)) = nat {
                        // Only a new connection is translated here; a tracked
                        // one got its translation at the lookup.
                        let state = key.get(Field::CtState) as u8;
                        if state & (ct_state::TRK | ct_state::NEW) == ct_state::TRK | ct_state::NEW
                        {
                            let src = matches!(nat, Some(Nat::Src(_)));
                            let v6 = key.get(Field::DlType)
                                == u128::from(crate::field::ether_type::IPV6);
                            if target.is_v4() == v6 {
                                // A translation into the other family: dropped.
                                return Step::Stop(Flow::Continue);
                            }
                            let (addr, port) = if src {
                                (Field::NwSrc, Field::TpSrc)
                            } else {
                                (Field::NwDst, Field::TpDst)
                            };
                            key.set(addr, u128::from_be_bytes(target.addr));
                            let proto = key.get(Field::NwProto) as u8;
                            if let Some(p) = target.port
                                && matches!(proto, ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP)
                            {
                                key.set(port, u128::from(p));
                            }
                            self.x.actions.push(DpAction::Nat {
                                src,
                                target: *target,
                            });
                        }
                    }
                    if *commit {
                        self.x.actions.push(DpAction::Commit { zone, mark: *mark });
                    }
                    if let Some(next) = table {
                        self.x.actions.push(DpAction::Recirc {
                            zone,
                            table: *next,
                            nat: matches!(nat, Some(Nat::Tracked)),
                        });
                        self.x.end = End::Recirc;
                        return Step::Stop(Flow::Halt);
                    }
                }
                Action::Load {
                    field,
                    value,
                    ofs,
                    nbits,
                } => {
                    // `nbits` may be 128 (a whole IPv6 address): no shift by the width.
                    let mask = crate::field::low_bits(u32::from(*nbits)) << ofs;
                    key.set_masked(*field, *value << ofs, mask);
                    self.rewrite(key, *field);
                }
                Action::SetField { field, value } => {
                    key.set(*field, *value);
                    self.rewrite(key, *field);
                }
                Action::Move { src, dst } => {
                    let v = key.get(*src);
                    key.set(*dst, v);
                    self.rewrite(key, *dst);
                }
                Action::Controller => self.x.actions.push(DpAction::Controller),
                Action::NdAdvert { mac, router } => self.x.actions.push(DpAction::NdAdvert {
                    mac: *mac,
                    router: *router,
                }),
                Action::Note(_) => {}
            }
        }
        Step::Next
    }

    fn rewrite(&mut self, key: &MatchKey, field: Field) {
        if is_rewritable(field) && !field.is_metadata() {
            let value = key.get(field);
            // Only the last write to a field matters.
            self.x
                .actions
                .retain(|a| !matches!(a, DpAction::Rewrite { field: f, .. } if *f == field));
            self.x.actions.push(DpAction::Rewrite { field, value });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::Match;
    use crate::flow::FlowEntry;
    use crate::time::Time;

    fn tables(flows: Vec<FlowEntry>) -> FlowTables {
        let mut t = FlowTables::new();
        for f in flows {
            t.add(f, Time::ZERO).unwrap();
        }
        t
    }

    #[test]
    fn goto_resubmit_load_output() {
        let t = tables(vec![
            FlowEntry::new(0, 1, Match::any())
                .action(Action::Load {
                    field: Field::Reg(0),
                    value: 5,
                    ofs: 0,
                    nbits: 16,
                })
                .action(Action::Resubmit(TableId(5)))
                .action(Action::GotoTable(TableId(10))),
            FlowEntry::new(5, 1, Match::any()).action(Action::Output(PortNo(9))),
            FlowEntry::new(10, 1, Match::any().with(Field::Reg(0), 5))
                .action(Action::Output(PortNo::IN_PORT)),
        ]);
        let mut k = MatchKey::default();
        k.set(Field::InPort, 3);
        let x = xlate(&t, &mut k, TableId(0), &mut Silent);
        assert_eq!(x.outputs().collect::<Vec<_>>(), vec![PortNo(9), PortNo(3)]);
        assert_eq!(x.hits.len(), 3);
        assert_eq!(x.end, End::Done);
        assert_eq!(x.regs[0] & 0xffff_ffff, 5);
    }

    #[test]
    fn a_load_of_all_128_bits_writes_the_whole_field() {
        // A load into a whole 128-bit field: the mask must not be computed by
        // shifting by the field's width (a panic in the packet thread in debug
        // builds, an empty mask in release ones).
        let flow = crate::ofctl::parse_flow(
            "table=0,priority=1,arp,actions=load:0xffff0a000001->arp_tpa,output:2",
        )
        .unwrap();
        flow.validate().unwrap();
        let t = tables(vec![flow]);
        let mut k = MatchKey::default();
        k.set(Field::DlType, 0x0806);
        let x = xlate(&t, &mut k, TableId(0), &mut Silent);
        assert_eq!(k.get(Field::NwDst), 0xffff_0a00_0001);
        assert!(x.actions.iter().any(
            |a| matches!(a, DpAction::Rewrite { field: Field::NwDst, value } if *value == 0xffff_0a00_0001)
        ));
        // Rewriting an IPv6 destination is refused when the flow is added.
        let v6 = crate::ofctl::parse_flow(
            "table=0,priority=1,ipv6,actions=load:0x20010db8000000000000000000000001->ipv6_dst,output:2",
        );
        assert!(v6.is_err() || v6.unwrap().validate().is_err());
    }

    #[test]
    fn resubmit_loop_is_cut() {
        let t = tables(vec![
            FlowEntry::new(1, 1, Match::any()).action(Action::Resubmit(TableId(1))),
        ]);
        let x = xlate(&t, &mut MatchKey::default(), TableId(1), &mut Silent);
        assert_eq!(x.end, End::LoopLimit);
    }

    #[test]
    fn ct_recirculates_and_miss_is_reported() {
        let t = tables(vec![FlowEntry::new(0, 1, Match::any()).action(
            Action::Ct {
                commit: false,
                zone: Zone::Imm(4),
                table: Some(TableId(30)),
                mark: None,
                nat: None,
            },
        )]);
        let x = xlate(&t, &mut MatchKey::default(), TableId(0), &mut Silent);
        assert_eq!(x.end, End::Recirc);
        assert_eq!(
            x.actions[0],
            DpAction::Recirc {
                zone: 4,
                table: TableId(30),
                nat: false,
            }
        );
        let x = xlate(&t, &mut MatchKey::default(), TableId(30), &mut Silent);
        assert_eq!(x.end, End::Miss(TableId(30)));
    }
}
