//! Who a connection is charged to, and the charge itself.
//!
//! Owns the per-pod and per-namespace connection counts behind the limits: an
//! [`Owner`] per pod (within its namespace's), a `Charge` taken when a
//! connection is created and given back by its `Drop` however the entry goes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Who a connection is charged to: a pod (by its addresses), within a group
/// (its namespace). Counts are live connections; a connection that would
/// take either past its limit is refused, so one tenant cannot fill the
/// table for everyone.
#[derive(Debug)]
pub struct Owner {
    /// What the owner is, for reports (`namespace/pod`, or the namespace).
    pub name: String,
    pub limit: usize,
    count: AtomicUsize,
    /// New connections refused because of this owner's limit (or its group's).
    pub refused: AtomicU64,
    group: Option<std::sync::Arc<Owner>>,
}

impl Owner {
    /// An owner with `limit` connections, inside `group` when given.
    pub fn new(name: String, limit: usize, group: Option<std::sync::Arc<Owner>>) -> Owner {
        Owner {
            name,
            limit,
            count: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            group,
        }
    }

    /// Live connections charged to it.
    pub fn count(&self) -> usize {
        self.count.load(Relaxed)
    }

    pub(super) fn has_room(&self) -> bool {
        self.count() < self.limit && self.group.as_ref().is_none_or(|g| g.has_room())
    }

    fn take(&self) {
        self.count.fetch_add(1, Relaxed);
        if let Some(g) = &self.group {
            g.take();
        }
    }

    fn give_back(&self) {
        self.count.fetch_sub(1, Relaxed);
        if let Some(g) = &self.group {
            g.give_back();
        }
    }
}

/// A connection's charge to its owner: taken when the connection is
/// created, given back whenever the entry goes (expiry, flush, replacement).
#[derive(Debug)]
pub(super) struct Charge(pub(super) std::sync::Arc<Owner>);

impl Charge {
    pub(super) fn new(owner: &std::sync::Arc<Owner>) -> Charge {
        owner.take();
        Charge(owner.clone())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.0.give_back();
    }
}
