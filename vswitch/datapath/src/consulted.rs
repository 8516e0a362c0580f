//! What one translation looked at.
//!
//! Owns "which bits of the key could this translation have depended on":
//! every bit the flows of each table it looked up compare (a lookup there
//! depends on nothing else), what the flows it ran and the group buckets it
//! chose read, and what every translation depends on (the metadata, dl_type,
//! nw_proto). Keys equal on those bits translate alike; the microflow cache
//! keeps such a translation under that narrower key too (Open vSwitch's
//! megaflows), so a reply to a client's new port finds the translation of
//! the reply before it, though the policy tables compare ports.

use crate::cache_mask::{CacheMasks, actions_read};
use crate::classify::Hit;
use crate::field::{Field, MatchKey};
use crate::flow::TableId;
use crate::pipeline::Observer;
use crate::table::Installed;

/// An observer that records what a translation looked at, passing every
/// event on to `inner`.
#[derive(Debug)]
pub struct Consulted<'a, O> {
    pub inner: O,
    masks: &'a CacheMasks,
    /// What it looked at so far.
    pub mask: MatchKey,
}

impl<'a, O> Consulted<'a, O> {
    pub fn new(masks: &'a CacheMasks, inner: O) -> Consulted<'a, O> {
        Consulted {
            inner,
            masks,
            mask: *masks.always(),
        }
    }

    fn add(&mut self, bits: &MatchKey) {
        for (m, b) in self.mask.0.iter_mut().zip(bits.0.iter()) {
            *m |= b;
        }
    }
}

impl<O: Observer> Observer for Consulted<'_, O> {
    #[inline]
    fn visit(
        &mut self,
        table: TableId,
        key: &MatchKey,
        hit: Option<(Hit, &Installed)>,
        depth: u32,
    ) {
        self.inner.visit(table, key, hit, depth);
        let masks = self.masks;
        self.add(masks.table(table));
        if let Some((_, installed)) = hit {
            let mask = &mut self.mask;
            actions_read(&installed.entry.actions, &mut |f: Field| {
                mask.set(f, f.full_mask())
            });
        }
    }

    fn group(&mut self, group: u32, bucket: Option<u32>) {
        self.inner.group(group, bucket);
        let reads = self.masks.group(group);
        self.add(&reads);
    }

    fn affinity(&mut self, group: u32, client: [u8; 16]) -> Option<u32> {
        self.mask.set(Field::NwSrc, Field::NwSrc.full_mask());
        self.inner.affinity(group, client)
    }

    fn took(&mut self, group: u32, client: [u8; 16], bucket: u32, secs: u32) {
        self.inner.took(group, client, bucket, secs);
    }
}
