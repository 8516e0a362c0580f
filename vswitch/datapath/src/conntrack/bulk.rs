//! Whole-table views and edits: the listing operators see, and dropping the
//! connections a caller's predicate rejects (what a policy change calls).

use std::sync::atomic::Ordering::Relaxed;

use super::{ConnInfo, Conntrack, Tuple};
use crate::time::Time;

impl Conntrack {
    /// Live connections, optionally of one zone.
    pub fn dump(&self, now: Time, zone: Option<u16>) -> Vec<ConnInfo> {
        let mut out: Vec<ConnInfo> = self
            .map
            .iter()
            .filter(|e| e.value().expires > now && zone.is_none_or(|z| z == e.key().zone))
            .map(|e| {
                let (k, c) = (e.key(), e.value());
                let (o, r) = if c.orig_is_a { (k.a, k.b) } else { (k.b, k.a) };
                ConnInfo {
                    zone: k.zone,
                    orig: Tuple {
                        proto: k.proto,
                        src: o.0,
                        sport: o.1,
                        dst: r.0,
                        dport: r.1,
                    },
                    state: c.state,
                    expires_in: c.expires.since(now),
                    age: now.since(c.created),
                    packets: c.packets,
                    bytes: c.bytes,
                    owner: c.charge.as_ref().map(|ch| ch.0.name.clone()),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (a.zone, a.orig.src, a.orig.sport).cmp(&(b.zone, b.orig.src, b.orig.sport))
        });
        out
    }

    /// Drops every connection for which `keep(zone, original tuple)` is
    /// false; returns how many were dropped. What a policy change calls so
    /// that connections the new policy would not admit are cut at once.
    pub fn retain(&self, mut keep: impl FnMut(u16, &Tuple) -> bool) -> usize {
        let mut removed = 0;
        self.map.retain(|k, c| {
            let (o, r) = if c.orig_is_a { (k.a, k.b) } else { (k.b, k.a) };
            let orig = Tuple {
                proto: k.proto,
                src: o.0,
                sport: o.1,
                dst: r.0,
                dport: r.1,
            };
            let kept = keep(k.zone, &orig);
            removed += usize::from(!kept);
            kept
        });
        self.len.fetch_sub(removed, Relaxed);
        removed
    }
}
