//! Whole-table views and edits: the listing operators see, and dropping the
//! connections a caller's predicate rejects (what a policy change calls).

use std::sync::atomic::Ordering::Relaxed;

use super::{CanonKey, Conn, ConnInfo, Conntrack, Tuple};
use crate::time::Time;

impl Conntrack {
    /// Live connections, optionally of one zone.
    pub fn dump(&self, now: Time, zone: Option<u16>) -> Vec<ConnInfo> {
        let mut out: Vec<ConnInfo> = Vec::new();
        self.map.for_each(|k, c| {
            if c.expires <= now || zone.is_some_and(|z| z != k.zone) {
                return;
            }
            let (o, r) = if c.orig_is_a { (k.a, k.b) } else { (k.b, k.a) };
            out.push(ConnInfo {
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
                nat: c.nat.as_ref().map(|n| n.xlat),
            });
        });
        out.sort_by(|a, b| {
            (a.zone, a.orig.src, a.orig.sport).cmp(&(b.zone, b.orig.src, b.orig.sport))
        });
        out
    }

    /// Drops every connection for which `keep(zone, tuple)` is false;
    /// returns how many were dropped. What a policy change calls so that
    /// connections the new policy would not admit are cut at once. The
    /// tuple is what policy decided on: the originator's source and the
    /// destination after translation.
    pub fn retain(&self, mut keep: impl FnMut(u16, &Tuple) -> bool) -> usize {
        self.remove_where(|k, c| {
            let (o, r) = if c.orig_is_a { (k.a, k.b) } else { (k.b, k.a) };
            let (dst, dport) = match &c.nat {
                Some(n) => (n.xlat.dst, n.xlat.dport),
                None => r,
            };
            let decided = Tuple {
                proto: k.proto,
                src: o.0,
                sport: o.1,
                dst,
                dport,
            };
            !keep(k.zone, &decided)
        })
    }

    /// Removes the connections (never alias entries) `gone` picks, with
    /// their aliases; returns how many.
    pub(super) fn remove_where(&self, mut gone: impl FnMut(&CanonKey, &Conn) -> bool) -> usize {
        let mut removed = 0;
        let mut aliases = Vec::new();
        self.map.retain(|k, c| {
            if c.alias_of.is_some() {
                return true;
            }
            let remove = gone(k, c);
            if remove {
                removed += 1;
                if let Some(n) = &c.nat {
                    aliases.push((n.alias, *k));
                }
            }
            !remove
        });
        for (alias, primary) in aliases {
            self.map
                .remove_if(&alias, |_, a| a.alias_of.as_deref() == Some(&primary));
        }
        self.len.fetch_sub(removed, Relaxed);
        removed
    }
}
