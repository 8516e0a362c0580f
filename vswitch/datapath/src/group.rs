//! Select groups: one of several action lists, chosen per connection.
//!
//! Owns what a group is (weighted buckets), which buckets are possible, and
//! the choice. The choice is a pure function of the packet's addresses and
//! ports (or of its source address alone, for client affinity) and the
//! bucket list, so a cached translation and a trace choose what the packet
//! path chose; what keeps a connection on its bucket after the list changes
//! is conntrack, which remembers the translation the bucket made.

use smallvec::SmallVec;

use crate::field::{Field, MatchKey};
use crate::flow::{Action, FlowError};
use crate::ofctl::OfctlError;

/// One bucket: a weight and the actions it runs.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Bucket {
    pub id: u32,
    /// Relative share of new connections; 0 takes none.
    pub weight: u16,
    pub actions: SmallVec<[Action; 2]>,
}

/// What the choice hashes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Selection {
    /// Addresses, protocol and ports: connections spread over the buckets.
    #[default]
    FiveTuple,
    /// The source address only: a client's connections all take one bucket
    /// while the bucket list is unchanged (`fields(ip_src)`).
    Source,
}

/// A select group (OpenFlow `type=select`).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Group {
    pub id: u32,
    pub selection: Selection,
    /// Client affinity: a client's new connections take the bucket its last
    /// one took while this many seconds have not passed since (remembered in
    /// conntrack), even when the buckets change, if that bucket is still
    /// there (`affinity=SECONDS`).
    pub affinity: Option<u32>,
    pub buckets: Vec<Bucket>,
}

impl Group {
    /// Checks that the group can be installed: bucket actions run inside a
    /// flow's action list, so they may not end it (goto_table, ct with
    /// table=, drop), chain groups, or feed conjunctions; bucket ids are unique.
    pub fn validate(&self) -> Result<(), FlowError> {
        let mut ids: Vec<u32> = self.buckets.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(FlowError::BadBucketAction("the same bucket_id twice"));
        }
        for b in &self.buckets {
            for a in &b.actions {
                let bad = match a {
                    Action::GotoTable(_) => Some("goto_table"),
                    Action::Group(_) => Some("group"),
                    Action::Conjunction { .. } => Some("conjunction"),
                    Action::Drop => Some("drop"),
                    Action::Ct { table: Some(_), .. } => Some("ct(table=...)"),
                    Action::NdAdvert { .. } => Some("nd_advert"),
                    Action::SetField { field, .. }
                    | Action::Load { field, .. }
                    | Action::Move { dst: field, .. }
                        if !matches!(field, Field::Reg(_) | Field::DlSrc | Field::DlDst) =>
                    {
                        Some("a rewrite other than registers and MAC addresses")
                    }
                    _ => None,
                };
                if let Some(what) = bad {
                    return Err(FlowError::BadBucketAction(what));
                }
                if let Action::SetField {
                    field: Field::Reg(n),
                    ..
                }
                | Action::Load {
                    field: Field::Reg(n),
                    ..
                } = a
                    && usize::from(*n) >= crate::field::NREGS
                {
                    return Err(FlowError::BadRegister(*n));
                }
            }
        }
        Ok(())
    }

    /// A bucket by id, if it may take connections.
    pub fn bucket(&self, id: u32) -> Option<&Bucket> {
        self.buckets.iter().find(|b| b.id == id && b.weight > 0)
    }

    /// The bucket a packet with `key` takes: weighted, by the hash of what
    /// [`Selection`] names. `None` when no bucket has weight.
    pub fn choose(&self, key: &MatchKey) -> Option<&Bucket> {
        let total: u64 = self.buckets.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = self.hash(key) % total;
        for b in &self.buckets {
            let w = u64::from(b.weight);
            if at < w {
                return Some(b);
            }
            at -= w;
        }
        None
    }

    /// The fields [`Group::choose`] hashes (affinity reads the source too).
    pub fn hashed_fields(&self) -> &'static [Field] {
        match self.selection {
            Selection::FiveTuple => &[
                Field::NwSrc,
                Field::NwDst,
                Field::NwProto,
                Field::TpSrc,
                Field::TpDst,
            ],
            Selection::Source => &[Field::NwSrc],
        }
    }

    fn hash(&self, key: &MatchKey) -> u64 {
        // A fixed function (not a per-process random seed): a trace, another
        // worker and a restarted switch choose the same bucket.
        let mut h = Mix(0x9e37_79b9_7f4a_7c15 ^ u64::from(self.id));
        h.add(key.get(Field::NwSrc));
        if self.selection == Selection::FiveTuple {
            h.add(key.get(Field::NwDst));
            h.add(
                key.get(Field::NwProto) << 32 | key.get(Field::TpSrc) << 16 | key.get(Field::TpDst),
            );
        }
        h.finish()
    }
}

impl std::fmt::Display for Group {
    /// `group_id=ID,type=select[,selection_method=hash,fields(ip_src)],bucket=bucket_id:N,weight:W,actions=...`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group_id={},type=select", self.id)?;
        if self.selection == Selection::Source {
            f.write_str(",selection_method=hash,fields(ip_src)")?;
        }
        if let Some(secs) = self.affinity {
            write!(f, ",affinity={secs}")?;
        }
        for b in &self.buckets {
            write!(
                f,
                ",bucket=bucket_id:{},weight:{},actions={}",
                b.id,
                b.weight,
                crate::ofctl::format_actions(&b.actions)
            )?;
        }
        Ok(())
    }
}

/// Parses a group in the form [`Group`]'s `Display` prints (ovs-ofctl's
/// `add-group` syntax, select groups only), and validates it.
pub fn parse_group(s: &str) -> Result<Group, OfctlError> {
    use crate::ofctl::{bad, parse_int, split_top};
    let mut id = None;
    let mut selection = Selection::FiveTuple;
    let mut affinity = None;
    let mut buckets: Vec<Bucket> = Vec::new();
    // Inside a bucket: whether its `actions=` began (the rest are actions).
    let mut in_actions = false;
    for token in split_top(s) {
        if let Some(first) = token.strip_prefix("bucket=") {
            let n = buckets.len() as u32;
            buckets.push(Bucket {
                id: n,
                weight: 1,
                actions: SmallVec::new(),
            });
            in_actions = false;
            if first.is_empty() {
                continue;
            }
            // `bucket=bucket_id:0` or `bucket=actions=...`: the rest of the token.
            bucket_token(
                buckets.last_mut().expect("pushed"),
                first,
                token,
                &mut in_actions,
            )?;
            continue;
        }
        if let Some(b) = buckets.last_mut() {
            bucket_token(b, token, token, &mut in_actions)?;
            continue;
        }
        match token.split_once('=') {
            Some(("group_id", v)) => id = Some(parse_int(token, v, u128::from(u32::MAX))? as u32),
            Some(("type", "select")) => {}
            Some(("type", other)) => {
                return Err(bad(
                    token,
                    format!("group type `{other}`: only select groups exist"),
                ));
            }
            Some(("selection_method", "hash")) => {}
            Some(("affinity", v)) => {
                affinity = Some(parse_int(token, v, u128::from(u32::MAX))? as u32)
            }
            _ if token == "fields(ip_src)" || token == "fields(ipv6_src)" => {
                selection = Selection::Source
            }
            _ => {
                return Err(bad(
                    token,
                    "expected group_id=, type=select, fields(ip_src) or bucket=",
                ));
            }
        }
    }
    let id = id.ok_or_else(|| bad(s, "a group needs group_id="))?;
    let group = Group {
        id,
        selection,
        affinity,
        buckets,
    };
    group.validate().map_err(OfctlError::Invalid)?;
    Ok(group)
}

fn bucket_token(
    b: &mut Bucket,
    t: &str,
    token: &str,
    in_actions: &mut bool,
) -> Result<(), OfctlError> {
    use crate::ofctl::{bad, parse_action, parse_int};
    if *in_actions {
        b.actions.push(parse_action(t)?);
        return Ok(());
    }
    if let Some(a) = t.strip_prefix("actions=") {
        *in_actions = true;
        if a != "drop" && !a.is_empty() {
            b.actions.push(parse_action(a)?);
        }
    } else if let Some(v) = t.strip_prefix("bucket_id:") {
        b.id = parse_int(token, v, u128::from(u32::MAX))? as u32;
    } else if let Some(v) = t.strip_prefix("weight:") {
        b.weight = parse_int(token, v, 65535)? as u16;
    } else {
        return Err(bad(
            token,
            "a bucket takes bucket_id:N, weight:W, actions=...",
        ));
    }
    Ok(())
}

struct Mix(u64);

impl Mix {
    fn add(&mut self, v: u128) {
        for word in [v as u64, (v >> 64) as u64] {
            self.0 = (self.0 ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd);
            self.0 ^= self.0 >> 33;
        }
    }

    fn finish(self) -> u64 {
        let mut x = self.0;
        x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::PortNo;

    fn group(weights: &[u16]) -> Group {
        Group {
            id: 1,
            selection: Selection::FiveTuple,
            affinity: None,
            buckets: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Bucket {
                    id: i as u32,
                    weight: *w,
                    actions: [Action::Output(PortNo(i as u32 + 1))].into_iter().collect(),
                })
                .collect(),
        }
    }

    fn key(sport: u16) -> MatchKey {
        let mut k = MatchKey::default();
        k.set(Field::NwSrc, 0xffff_0a00_0001);
        k.set(Field::NwDst, 0xffff_0a60_0001);
        k.set(Field::NwProto, 6);
        k.set(Field::TpSrc, u128::from(sport));
        k.set(Field::TpDst, 80);
        k
    }

    #[test]
    fn connections_spread_by_weight() {
        let g = group(&[1, 3, 0]);
        let mut n = [0u32; 3];
        for sport in 0..8000 {
            n[g.choose(&key(sport)).unwrap().id as usize] += 1;
        }
        assert_eq!(n[2], 0, "weight 0 takes nothing");
        let share = f64::from(n[1]) / 8000.0;
        assert!((0.72..0.78).contains(&share), "{n:?}");
        assert!(group(&[0, 0]).choose(&key(1)).is_none());
    }

    #[test]
    fn source_selection_keeps_a_client_on_one_bucket() {
        let mut g = group(&[1, 1, 1, 1]);
        g.selection = Selection::Source;
        let first = g.choose(&key(1)).unwrap().id;
        assert!((2..500).all(|p| g.choose(&key(p)).unwrap().id == first));
    }

    #[test]
    fn text_round_trips() {
        let text = "group_id=7,type=select,selection_method=hash,fields(ip_src),affinity=10800,bucket=bucket_id:0,weight:2,actions=ct(nat(dst=10.0.1.5:8080)),bucket=bucket_id:1,weight:1,actions=ct(nat(dst=[fd00::5]:8080)),load:0x1->reg3[0..7]";
        let g = parse_group(text).unwrap();
        assert_eq!(g.buckets.len(), 2);
        assert_eq!(g.selection, Selection::Source);
        assert_eq!(g.to_string(), text);
        let err = parse_group("group_id=1,type=all,bucket=actions=output:1").unwrap_err();
        assert!(err.to_string().contains("only select groups"), "{err}");
    }

    #[test]
    fn buckets_may_not_end_the_flow() {
        let mut g = group(&[1]);
        g.buckets[0]
            .actions
            .push(Action::GotoTable(crate::flow::TableId(40)));
        assert_eq!(g.validate(), Err(FlowError::BadBucketAction("goto_table")));
    }
}
