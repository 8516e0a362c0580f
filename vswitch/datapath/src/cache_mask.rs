//! What the microflow cache keys a translation by.
//!
//! Owns "which bits of a packet's key can change its translation". A
//! translation depends only on the fields the flows it could meet compare and
//! the fields its actions read; packets that differ elsewhere (another source
//! port: a new connection; other TCP flags) translate alike and can share one
//! cache entry. Open vSwitch records that set per translation (megaflows); we
//! compute it once per published table set, per class of packet, so a lookup
//! costs one mask and one probe (docs/decisions.md says why).
//!
//! A class is the packet's `dl_type` and, where that is stable along the
//! pipeline, its `nw_proto`: a flow that pins `nw_proto=17` can never match a
//! TCP packet, so what it compares (DNS answers' `tp_src=53`, ICMPv6's type)
//! stays out of TCP packets' masks. `nw_proto` is stable for a `dl_type` when
//! no flow that can see such a packet rewrites it (ARP replies do, to their
//! opcode: ARP is then one class). `dl_type` itself is never rewritten.

use smallvec::SmallVec;

use crate::field::{Field, MatchKey};
use crate::flow::Action;
use crate::flow::FlowEntry;
use crate::group::Group;

/// The masks of one `dl_type` that some flow pins.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TypeMasks {
    dl_type: u16,
    /// By `nw_proto`, for the protocols some flow pins.
    by_proto: SmallVec<[(u8, MatchKey); 8]>,
    /// Every other protocol of this type.
    other: MatchKey,
}

/// The cache masks of one table set (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct CacheMasks {
    by_type: SmallVec<[TypeMasks; 4]>,
    /// Packets of a `dl_type` no flow pins.
    other: MatchKey,
    /// What every translation depends on: the metadata, dl_type, nw_proto.
    always: MatchKey,
    /// By table: every bit its flows compare (a lookup there depends on
    /// nothing else).
    tables: Box<[MatchKey]>,
    /// By select group: what choosing its bucket and running it read.
    groups: Vec<(u32, MatchKey)>,
    /// Every bit an action may write during a pass (and `conj_id`, which the
    /// classifier sets): a lookup after the first may see other values there
    /// than the packet had (see [`crate::table::Snapshot::revalidates`]).
    pub written: MatchKey,
}

/// What the flows of one `dl_type` compare, while the masks are built.
struct TypeFlows {
    dl_type: u16,
    /// Flows that pin no protocol.
    unpinned: MatchKey,
    /// Flows that pin one, by protocol.
    protos: Vec<(u8, MatchKey)>,
    /// Whether one of them rewrites nw_proto.
    rewrites: bool,
}

/// A flow's class: the `dl_type` and `nw_proto` it pins exactly, if any.
fn class_of(m: &crate::field::Match) -> (Option<u16>, Option<u8>) {
    let pinned = |f: Field| m.is_exact(f).then(|| m.get(f).0);
    (
        pinned(Field::DlType).map(|v| v as u16),
        pinned(Field::NwProto).map(|v| v as u8),
    )
}

fn or(into: &mut MatchKey, from: &MatchKey) {
    for (a, b) in into.0.iter_mut().zip(from.0.iter()) {
        *a |= b;
    }
}

/// Whether `actions` write `nw_proto`.
fn writes_proto(actions: &[Action]) -> bool {
    actions.iter().any(|a| match a {
        Action::Load { field, .. } | Action::SetField { field, .. } => *field == Field::NwProto,
        Action::Move { dst, .. } => *dst == Field::NwProto,
        _ => false,
    })
}

/// Calls `write` with every field `actions` write.
fn actions_write(actions: &[Action], write: &mut impl FnMut(Field)) {
    for action in actions {
        match action {
            Action::Load { field, .. } | Action::SetField { field, .. } => write(*field),
            Action::Move { dst, .. } => write(*dst),
            Action::Ct {
                nat: Some(crate::flow::Nat::Src(_)),
                ..
            } => {
                write(Field::NwSrc);
                write(Field::TpSrc);
            }
            Action::Ct {
                nat: Some(crate::flow::Nat::Dst(_)),
                ..
            } => {
                write(Field::NwDst);
                write(Field::TpDst);
            }
            _ => {}
        }
    }
}

/// Calls `read` with every packet field `actions` read (beyond the fields they
/// only overwrite whole).
pub(crate) fn actions_read(actions: &[Action], read: &mut impl FnMut(Field)) {
    for action in actions {
        match action {
            Action::Move { src, .. } => read(*src),
            Action::Load {
                field, ofs, nbits, ..
            } if *ofs > 0 || u32::from(*ofs) + u32::from(*nbits) < field.bits() => read(*field),
            _ => {}
        }
    }
}

impl CacheMasks {
    /// The masks of a table set holding `flows` and `groups`. Every class's
    /// mask holds:
    ///
    /// - every bit compared by a flow that can match the class (all flows of
    ///   its `dl_type` and `nw_proto`, and those that pin neither);
    /// - the metadata (in_port, registers, conntrack fields), dl_type and
    ///   nw_proto;
    /// - what actions read, anywhere: a select group's hash fields, a
    ///   `move`'s source, the untouched bits of a field a partial `load`
    ///   writes.
    ///
    /// Two keys equal under their class's mask translate to the same
    /// [`Xlate`](crate::pipeline::Xlate).
    pub fn build<'a>(
        flows: impl Iterator<Item = &'a FlowEntry>,
        groups: impl Iterator<Item = &'a Group>,
    ) -> CacheMasks {
        let mut always = MatchKey::default();
        for f in Field::ALL.into_iter().filter(|f| f.is_metadata()) {
            always.set(f, f.full_mask());
        }
        always.set(Field::DlType, Field::DlType.full_mask());
        always.set(Field::NwProto, Field::NwProto.full_mask());
        let mut base = always;
        let mut read = |field: Field| base.set(field, field.full_mask());
        let mut tables = vec![MatchKey::default(); 256].into_boxed_slice();
        let mut group_reads = Vec::new();
        // Whether any flow of no fixed type, or any group bucket, rewrites
        // nw_proto: then no type's protocol is stable.
        let mut unstable_everywhere = false;
        let mut written = MatchKey::default();
        let mut write = |field: Field| written.set(field, field.full_mask());
        write(Field::ConjId);
        for group in groups {
            let mut reads = MatchKey::default();
            let mut group_read = |field: Field| reads.set(field, field.full_mask());
            // Affinity looks the client (the source) up.
            group_read(Field::NwSrc);
            for f in group.hashed_fields() {
                read(*f);
                group_read(*f);
            }
            for bucket in &group.buckets {
                actions_read(&bucket.actions, &mut read);
                actions_read(&bucket.actions, &mut group_read);
                actions_write(&bucket.actions, &mut write);
                unstable_everywhere |= writes_proto(&bucket.actions);
            }
            group_reads.push((group.id, reads));
        }
        // Masks by class: (dl_type, nw_proto) pinned, each None for "any".
        let mut any = MatchKey::default();
        let mut types: Vec<TypeFlows> = Vec::new();
        for entry in flows {
            actions_read(&entry.actions, &mut read);
            actions_write(&entry.actions, &mut write);
            let rewrites = writes_proto(&entry.actions);
            let mask = entry.matcher.mask();
            or(&mut tables[usize::from(entry.table.0)], mask);
            match class_of(&entry.matcher) {
                (None, _) => {
                    or(&mut any, mask);
                    unstable_everywhere |= rewrites;
                }
                (Some(t), proto) => {
                    let at = match types.iter().position(|x| x.dl_type == t) {
                        Some(i) => i,
                        None => {
                            types.push(TypeFlows {
                                dl_type: t,
                                unpinned: MatchKey::default(),
                                protos: Vec::new(),
                                rewrites: false,
                            });
                            types.len() - 1
                        }
                    };
                    let ty = &mut types[at];
                    ty.rewrites |= rewrites;
                    match proto {
                        None => or(&mut ty.unpinned, mask),
                        Some(p) => match ty.protos.iter_mut().find(|(q, _)| *q == p) {
                            Some((_, m)) => or(m, mask),
                            None => ty.protos.push((p, *mask)),
                        },
                    }
                }
            }
        }
        or(&mut base, &any);
        let by_type = types
            .into_iter()
            .map(|ty| {
                let TypeFlows {
                    dl_type,
                    unpinned,
                    protos,
                    rewrites,
                } = ty;
                let mut other = base;
                or(&mut other, &unpinned);
                if rewrites || unstable_everywhere {
                    // The protocol a later table sees may not be the
                    // packet's: one mask for the whole type.
                    for (_, m) in &protos {
                        or(&mut other, m);
                    }
                    return TypeMasks {
                        dl_type,
                        by_proto: SmallVec::new(),
                        other,
                    };
                }
                let by_proto = protos
                    .into_iter()
                    .map(|(p, m)| {
                        let mut mask = other;
                        or(&mut mask, &m);
                        (p, mask)
                    })
                    .collect();
                TypeMasks {
                    dl_type,
                    by_proto,
                    other,
                }
            })
            .collect();
        CacheMasks {
            by_type,
            other: base,
            always,
            tables,
            groups: group_reads,
            written,
        }
    }

    /// Whether `other` keys the cache as these do (every class's mask the
    /// same): entries keyed under one can be checked under the other.
    pub fn same_keys(&self, other: &CacheMasks) -> bool {
        self.by_type == other.by_type && self.other == other.other
    }

    /// What every translation depends on: the metadata, dl_type, nw_proto.
    pub fn always(&self) -> &MatchKey {
        &self.always
    }

    /// Every bit the flows of `table` compare.
    pub fn table(&self, table: crate::flow::TableId) -> &MatchKey {
        &self.tables[usize::from(table.0)]
    }

    /// What choosing a bucket of select group `id` and running it read
    /// (nothing for a group there is none of).
    pub fn group(&self, id: u32) -> MatchKey {
        self.groups
            .iter()
            .find(|(g, _)| *g == id)
            .map_or_else(MatchKey::default, |(_, m)| *m)
    }

    /// The mask for `key`'s class.
    #[inline]
    pub fn of(&self, key: &MatchKey) -> &MatchKey {
        let dl_type = key.get(Field::DlType) as u16;
        let Some(t) = self.by_type.iter().find(|t| t.dl_type == dl_type) else {
            return &self.other;
        };
        let proto = key.get(Field::NwProto) as u8;
        t.by_proto
            .iter()
            .find(|(p, _)| *p == proto)
            .map_or(&t.other, |(_, m)| m)
    }
}
