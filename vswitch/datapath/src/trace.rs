//! Trace: one packet through the pipeline, every step recorded.
//!
//! Owns the explanation of a verdict. It runs the very code the packet path runs
//! (`pipeline::xlate`, same snapshot) with a recording observer, and reads conntrack
//! without changing it. This is the engine behind `flowctl trace`.

use std::sync::Arc;

use crate::classify::{FlowId, Hit};
use crate::conntrack::Conntrack;
use crate::conntrack::{CtRefused, Looked};
use crate::exec::{self, Execute, Translate};
use crate::field::{Field, MatchKey};
use crate::flow::{FlowEntry, TableId};
use crate::key::{FlowKey, PortNo};
use crate::nat::Ends;
use crate::pipeline::{End, Observer, Xlate, xlate};
use crate::table::{FlowTables, Installed};
use crate::time::Time;

/// Where a trace takes conntrack state from.
#[derive(Debug, Clone, Copy)]
pub enum CtSource<'a> {
    /// Assume this `ct_state` at every conntrack lookup (offline mode).
    Assume(u8),
    /// Ask the live table, read-only.
    Live(&'a Conntrack, Time),
}

/// A flow as a trace shows it.
pub type FlowRef = (FlowId, Arc<FlowEntry>);

/// A conjunctive match: its id and the clause flows that completed it.
#[derive(Debug, Clone)]
pub struct Conjunction {
    pub id: u32,
    pub members: Vec<FlowRef>,
}

/// One table visit.
#[derive(Debug, Clone)]
pub struct Step {
    pub table: TableId,
    /// Resubmit nesting depth.
    pub depth: u32,
    /// The flow that matched, `None` for a table miss.
    pub flow: Option<FlowRef>,
    /// When the flow matched through a conjunction.
    pub conjunction: Option<Conjunction>,
    /// Registers and conntrack state at the visit.
    pub key: MatchKey,
}

/// The final outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Output(Vec<PortNo>),
    Punt,
    /// Answered with a reset or a port unreachable (`reject`).
    Reject,
    /// Dropped: by a flow (`Some`), a table miss, or a loop limit.
    Drop {
        by: Option<FlowId>,
        end: End,
    },
}

/// A complete trace.
#[derive(Debug, Clone)]
pub struct Trace {
    pub steps: Vec<Step>,
    /// Conntrack lookups made: (zone, resulting `ct_state`).
    pub ct_lookups: Vec<(u16, u8)>,
    /// Connections the packet would commit (zones).
    pub commits: Vec<u16>,
    /// Translations the packet got, in order: its ends before and after.
    pub translations: Vec<(Ends, Ends)>,
    /// Select groups it met and the bucket each chose (`None`: none to choose).
    pub groups: Vec<(u32, Option<u32>)>,
    pub outcome: Outcome,
}

impl Trace {
    /// The entry of the flow that decided a drop.
    pub fn deciding_flow(&self) -> Option<&Arc<FlowEntry>> {
        let Outcome::Drop { by: Some(id), .. } = self.outcome else {
            return None;
        };
        self.steps
            .iter()
            .filter_map(|s| s.flow.as_ref())
            .find(|(fid, _)| *fid == id)
            .map(|(_, e)| e)
    }

    /// Flows that matched, in order.
    pub fn matched(&self) -> impl Iterator<Item = &Arc<FlowEntry>> {
        self.steps
            .iter()
            .filter_map(|s| s.flow.as_ref().map(|(_, e)| e))
    }
}

struct Recorder<'a> {
    tables: &'a FlowTables,
    steps: Vec<Step>,
    groups: Vec<(u32, Option<u32>)>,
    /// Client affinity, read (never written) from the live table.
    affinity: Option<(&'a Conntrack, Time)>,
}

impl Observer for Recorder<'_> {
    fn visit(
        &mut self,
        table: TableId,
        key: &MatchKey,
        hit: Option<(Hit, &Installed)>,
        depth: u32,
    ) {
        let flow = hit.map(|(h, i)| (h.flow, i.entry.clone()));
        let conjunction = hit.and_then(|(h, _)| h.conj_id).map(|id| {
            let members = self
                .tables
                .conjunction_members(table, id, key)
                .into_iter()
                .map(|(fid, i)| (fid, i.entry.clone()))
                .collect();
            Conjunction { id, members }
        });
        self.steps.push(Step {
            table,
            depth,
            flow,
            conjunction,
            key: *key,
        });
    }

    fn group(&mut self, group: u32, bucket: Option<u32>) {
        self.groups.push((group, bucket));
    }

    fn affinity(&mut self, group: u32, client: [u8; 16]) -> Option<u32> {
        let (ct, now) = self.affinity?;
        ct.affinity(now, group, client)
    }
}

/// The translations of a trace: the pipeline with a recording observer, never
/// the cache.
struct Recording<'a> {
    rec: Recorder<'a>,
    last: Xlate,
}

impl Translate for Recording<'_> {
    fn translate(&mut self, key: &MatchKey, stage: TableId) -> &Xlate {
        let mut scratch = *key;
        self.last = xlate(self.rec.tables, &mut scratch, stage, &mut self.rec);
        &self.last
    }
}

/// The actions of a trace: conntrack read (or assumed), nothing written.
struct Observed<'a> {
    ct: CtSource<'a>,
    lookups: Vec<(u16, u8)>,
    commits: Vec<u16>,
    translations: Vec<(Ends, Ends)>,
    rejected: bool,
}

impl Execute for Observed<'_> {
    fn rewrite(&mut self, _: &FlowKey, _: Field, _: u128) {}

    fn nd_advert(&mut self, _: &FlowKey, _: [u8; 6], _: bool) -> bool {
        true
    }

    fn commit(
        &mut self,
        zone: u16,
        _: Option<u8>,
        _: &FlowKey,
        _: &FlowKey,
    ) -> Result<(), CtRefused> {
        self.commits.push(zone);
        Ok(())
    }

    fn lookup(&mut self, zone: u16, key: &FlowKey, nat: bool) -> Looked {
        let looked = match self.ct {
            CtSource::Assume(s) => Looked {
                state: s,
                mark: 0,
                nat: None,
            },
            CtSource::Live(conntrack, now) => conntrack.peek_nat(now, zone, key, nat),
        };
        self.lookups.push((zone, looked.state));
        looked
    }

    fn set_ends(&mut self, from: &FlowKey, to: &Ends) {
        self.translations.push((Ends::of(from), *to));
    }

    fn set_error_ends(&mut self, from: &FlowKey, outer: &Ends, _: &Ends) {
        self.translations.push((Ends::of(from), *outer));
    }

    fn reject(&mut self, _: &FlowKey) -> bool {
        self.rejected = true;
        true
    }
}

/// Traces `packet` as the first packet of a new connection (conntrack
/// assumed `+trk+new`): what policy decides for a connection, whatever
/// conntrack holds now.
pub fn trace_new(tables: &FlowTables, packet: &FlowKey) -> Trace {
    use crate::field::ct_state::{NEW, TRK};
    trace(tables, packet, CtSource::Assume(TRK | NEW))
}

/// Traces `packet` through `tables`, starting at table 0, with the packet
/// path's own loop (`exec::run`).
pub fn trace(tables: &FlowTables, packet: &FlowKey, ct: CtSource<'_>) -> Trace {
    let mut t = Recording {
        rec: Recorder {
            tables,
            steps: Vec::new(),
            groups: Vec::new(),
            affinity: match ct {
                CtSource::Live(conntrack, now) => Some((conntrack, now)),
                CtSource::Assume(_) => None,
            },
        },
        last: Xlate::default(),
    };
    let mut e = Observed {
        ct,
        lookups: Vec::new(),
        commits: Vec::new(),
        translations: Vec::new(),
        rejected: false,
    };
    let mut outputs = Vec::new();
    let ran = exec::run(&mut t, &mut e, packet, &mut outputs);
    let outcome = if e.rejected {
        Outcome::Reject
    } else if !outputs.is_empty() {
        Outcome::Output(outputs)
    } else if ran.punt {
        Outcome::Punt
    } else {
        let by = match ran.end {
            End::Done | End::Recirc => ran.last,
            End::Miss(_) | End::LoopLimit => None,
        };
        Outcome::Drop { by, end: ran.end }
    };
    Trace {
        steps: t.rec.steps,
        ct_lookups: e.lookups,
        commits: e.commits,
        translations: e.translations,
        groups: t.rec.groups,
        outcome,
    }
}
