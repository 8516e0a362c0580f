//! Connections saved across a graceful restart: exported with their time
//! left, imported into another process's table (another clock).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{CanonKey, Conn, ConnState, Conntrack, NatConn, Tuple};
use crate::nat::Ends;
use crate::time::Time;

/// A connection as saved across a restart: everything the table keeps, with
/// time as what is left rather than as an instant of this process's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedConn {
    pub zone: u16,
    pub proto: u8,
    /// The two endpoints (address, port), canonical order.
    pub a: ([u8; 16], u16),
    pub b: ([u8; 16], u16),
    pub orig_is_a: bool,
    pub state: ConnState,
    pub fin_seen: [bool; 2],
    pub replied: bool,
    /// Time left before expiry, in milliseconds.
    pub expires_in_ms: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub mark: u8,
    /// A translated connection: its original direction's ends after
    /// translation.
    pub nat: Option<crate::nat::Ends>,
}

impl Conntrack {
    /// Every live connection, for saving across a restart.
    pub fn export(&self, now: Time) -> Vec<SavedConn> {
        let mut saved = Vec::new();
        self.map.for_each(|k, c| {
            if c.expires <= now {
                return;
            }
            saved.push(SavedConn {
                zone: k.zone,
                proto: k.proto,
                a: k.a,
                b: k.b,
                orig_is_a: c.orig_is_a,
                state: c.state,
                fin_seen: c.fin_seen,
                replied: c.replied,
                expires_in_ms: (c.expires.0 - now.0) / 1_000_000,
                packets: c.packets,
                bytes: c.bytes,
                mark: c.mark,
                nat: c.nat.as_ref().map(|n| n.xlat),
            });
        });
        saved
    }

    /// Restores saved connections (up to `max_entries`; those already present
    /// are left alone). Returns how many were restored.
    pub fn import(&self, now: Time, saved: impl IntoIterator<Item = SavedConn>) -> usize {
        let mut n = 0;
        for s in saved {
            if self.len.load(Relaxed) >= self.config.max_entries {
                break;
            }
            let key = CanonKey {
                zone: s.zone,
                proto: s.proto,
                a: s.a,
                b: s.b,
            };
            let expires = now + Duration::from_millis(s.expires_in_ms);
            let (o, r) = if s.orig_is_a { (s.a, s.b) } else { (s.b, s.a) };
            let orig = Ends {
                src: o.0,
                sport: o.1,
                dst: r.0,
                dport: r.1,
            };
            let nat = s.nat.filter(|x| *x != orig).map(|xlat| {
                let t = Tuple {
                    proto: s.proto,
                    src: xlat.src,
                    sport: xlat.sport,
                    dst: xlat.dst,
                    dport: xlat.dport,
                };
                NatConn {
                    orig,
                    xlat,
                    alias: t.canon(s.zone).0,
                }
            });
            if nat
                .as_ref()
                .is_some_and(|n| self.map.contains_key(&n.alias))
            {
                continue;
            }
            if let super::map::Entry::Vacant(v) = self.map.entry(key) {
                v.insert(Conn {
                    orig_is_a: s.orig_is_a,
                    state: s.state,
                    fin_seen: s.fin_seen,
                    replied: s.replied,
                    expires,
                    queued: expires,
                    created: now,
                    packets: s.packets,
                    bytes: s.bytes,
                    mark: s.mark,
                    charge: None,
                    nat: nat.clone().map(Box::new),
                    alias_of: None,
                });
                if let Some(n) = nat {
                    self.map.insert(n.alias, Conn::alias(key));
                }
                self.len.fetch_add(1, Relaxed);
                self.schedule(key, expires);
                n += 1;
            }
        }
        n
    }

    /// Drops every connection with an end at one of `addrs` (either
    /// direction, every zone): what a pod leaving, or an address changing hands,
    /// calls for, so no one reaches the address's next owner under a
    /// connection made with its last one. Returns how many were dropped.
    pub fn flush_addresses(&self, addrs: &[[u8; 16]]) -> usize {
        if addrs.is_empty() {
            return 0;
        }
        self.remove_where(|k, c| {
            let translated = c
                .nat
                .as_ref()
                .is_some_and(|n| addrs.contains(&n.xlat.src) || addrs.contains(&n.xlat.dst));
            translated || addrs.contains(&k.a.0) || addrs.contains(&k.b.0)
        })
    }
}
