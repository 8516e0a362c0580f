//! Translated connections: one connection, two keys.
//!
//! A translated connection is found by its original ends (the entry itself)
//! and by its translated ends (an alias entry naming it), so a reply from the
//! translated destination finds it with the same one-hash lookup as any
//! other. Owns committing such a connection (refusing ends another
//! connection holds), the rewrite each of its packets gets, the rewrite of
//! ICMP errors about it, and removing the alias with the connection.

use std::sync::atomic::Ordering::Relaxed;

use super::{CanonKey, Conn, ConnState, Conntrack, CtRefused, Tuple, is_icmp_error};
use crate::key::FlowKey;
use crate::nat::Ends;
use crate::time::Time;

/// A translated connection's ends, in its original direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NatConn {
    /// As the originator sent them.
    pub orig: Ends,
    /// After translation.
    pub xlat: Ends,
    /// The key the translated ends are found under.
    pub alias: CanonKey,
}

/// What a conntrack lookup says about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Looked {
    pub state: u8,
    pub mark: u8,
    /// The rewrite `ct(nat)` gives the packet, for a translated connection.
    pub nat: Option<NatRewrite>,
}

impl Looked {
    pub(super) fn state(state: u8) -> Looked {
        Looked {
            state,
            mark: 0,
            nat: None,
        }
    }
}

/// How a packet of a translated connection is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatRewrite {
    /// Its ends become these.
    Ends(Ends),
    /// An ICMP error: its own ends and those of the packet it embeds.
    Error { outer: Ends, inner: Ends },
}

fn ends(t: &Tuple) -> Ends {
    Ends {
        src: t.src,
        sport: t.sport,
        dst: t.dst,
        dport: t.dport,
    }
}

fn same(t: &Tuple, e: &Ends) -> bool {
    t.src == e.src && t.sport == e.sport && t.dst == e.dst && t.dport == e.dport
}

impl NatConn {
    /// Whether a packet found under the alias travels the original direction.
    pub(super) fn is_translated_orig(&self, t: &Tuple) -> bool {
        same(t, &self.xlat)
    }

    /// The rewrite of a packet found under the connection's own key
    /// (`via_alias` false) or its alias, travelling `orig` or back.
    pub(super) fn rewrite(&self, via_alias: bool, orig: bool) -> Option<NatRewrite> {
        match (via_alias, orig) {
            (false, true) => Some(NatRewrite::Ends(self.xlat)),
            (true, false) => Some(NatRewrite::Ends(self.orig.reversed())),
            // Already as its receiver knows it.
            _ => None,
        }
    }

    /// The rewrite of an ICMP error (`outer` its key) about the packet
    /// `inner` (as that packet was sent), the error travelling `orig_dir`.
    pub(super) fn error_rewrite(
        &self,
        outer: &FlowKey,
        inner: &Tuple,
        via_alias: bool,
        orig_dir: bool,
    ) -> Option<NatRewrite> {
        let (o, x) = (&self.orig, &self.xlat);
        if via_alias && !orig_dir && same(inner, x) {
            // About a translated packet, back to the originator: as it sent it.
            let src = if outer.nw_src == x.dst {
                o.dst
            } else {
                outer.nw_src
            };
            return Some(NatRewrite::Error {
                outer: Ends {
                    src,
                    dst: o.src,
                    ..Ends::default()
                },
                inner: *o,
            });
        }
        if !via_alias && orig_dir && same(inner, &o.reversed()) {
            // From the originator about a reply: as the translated end sent it.
            let src = if outer.nw_src == o.src {
                x.src
            } else {
                outer.nw_src
            };
            return Some(NatRewrite::Error {
                outer: Ends {
                    src,
                    dst: x.dst,
                    ..Ends::default()
                },
                inner: x.reversed(),
            });
        }
        None
    }
}

impl Conn {
    /// Whether `key` opens a new TCP connection on this one's ends, which
    /// are dead but for the wait (TIME_WAIT, or reset).
    pub(super) fn reopened_by(&self, key: &FlowKey) -> bool {
        Conntrack::opens(key)
            && key.nw_proto == crate::field::ip_proto::TCP
            && matches!(self.state, ConnState::TcpTimeWait | ConnState::TcpClosed)
    }

    /// The entry under a translated connection's other key.
    pub(super) fn alias(primary: CanonKey) -> Conn {
        Conn {
            orig_is_a: false,
            state: ConnState::Unreplied,
            fin_seen: [false; 2],
            replied: false,
            expires: Time::ZERO,
            queued: Time::ZERO,
            created: Time::ZERO,
            packets: [0; 2],
            bytes: [0; 2],
            mark: 0,
            charge: None,
            nat: None,
            alias_of: Some(Box::new(primary)),
        }
    }
}

impl Conntrack {
    /// The connection under `ck`, following an alias; and whether it did.
    pub(super) fn resolve(&self, ck: &CanonKey) -> Option<(super::map::Ref<'_>, bool)> {
        let found = self.map.get(ck)?;
        match found.alias_of.as_deref().copied() {
            None => Some((found, false)),
            Some(primary) => {
                drop(found);
                Some((self.map.get(&primary)?, true))
            }
        }
    }

    /// Removes the connection under `ck` and its alias.
    pub(super) fn forget(&self, ck: &CanonKey) {
        if let Some((k, gone)) = self.map.remove_if(ck, |_, c| c.alias_of.is_none()) {
            self.len.fetch_sub(1, Relaxed);
            self.unlink(&k, &gone);
        }
    }

    /// Removes what a removed connection left under other keys.
    pub(super) fn unlink(&self, ck: &CanonKey, gone: &Conn) {
        if let Some(n) = &gone.nat {
            self.map
                .remove_if(&n.alias, |_, a| a.alias_of.as_deref() == Some(ck));
        }
    }

    /// Commits the connection of a packet that arrived as `orig` and leaves
    /// as `current` (translated by `ct(nat(...))` on the way): the
    /// connection is `orig`'s, and `current`'s ends find it too. Refused
    /// (`NatClash`) when a live connection already holds `current`'s ends.
    /// Returns whether a connection was created.
    pub fn commit_nat(
        &self,
        now: Time,
        zone: u16,
        orig: &FlowKey,
        current: &FlowKey,
        len: usize,
        mark: Option<u8>,
    ) -> Result<bool, CtRefused> {
        let (Some(o), Some(t)) = (Tuple::of(orig), Tuple::of(current)) else {
            return self.commit_inner(now, zone, orig, len, mark, None);
        };
        let (ck, _) = o.canon(zone);
        let (ak, _) = t.canon(zone);
        if o == t || ck == ak || is_icmp_error(orig) {
            return self.commit_inner(now, zone, orig, len, mark, None);
        }
        let holder = self
            .map
            .get(&ak)
            .map(|a| (a.alias_of.as_deref().copied(), a.expires));
        let taken = match holder {
            None => false,
            Some((None, expires)) => expires > now,
            Some((Some(p), _)) => p != ck && self.map.get(&p).is_some_and(|c| c.expires > now),
        };
        if taken {
            self.stats.nat_clashes.fetch_add(1, Relaxed);
            return Err(CtRefused::NatClash);
        }
        if let Some((None, _)) = holder
            && let Some((k, dead)) = self
                .map
                .remove_if(&ak, |_, c| c.alias_of.is_none() && c.expires <= now)
        {
            // A dead connection under the translated ends makes way.
            self.len.fetch_sub(1, Relaxed);
            self.unlink(&k, &dead);
        }
        let nat = NatConn {
            orig: ends(&o),
            xlat: ends(&t),
            alias: ak,
        };
        self.commit_inner(now, zone, orig, len, mark, Some(nat))
    }
}
