//! The mirror of a kind the switch keeps whole rather than as compiler
//! changes (Services and EndpointSlices): what is applied, a relist in
//! progress, whether it was listed.

use std::collections::BTreeMap;

use kube::runtime::watcher;
use policy::model::ObjectKey;

/// Objects of a kind that is not a compiler change (Services,
/// EndpointSlices): as applied, plus a relist in progress.
#[derive(Debug)]
pub(super) struct Objects<V> {
    pub(super) applied: BTreeMap<ObjectKey, V>,
    relist: Option<BTreeMap<ObjectKey, V>>,
    pub(super) synced: bool,
}

impl<V: Clone + PartialEq> Objects<V> {
    pub(super) fn new() -> Self {
        Objects {
            applied: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Folds one event; `conv` gives the key and the object (`Err`: rejected,
    /// the last good version stays; `Ok(None)`: not one the switch keeps).
    /// Returns whether what is applied changed.
    pub(super) fn event<A>(
        &mut self,
        e: watcher::Event<A>,
        mut conv: impl FnMut(&A) -> (ObjectKey, Result<Option<V>, ()>),
    ) -> bool {
        use watcher::Event as W;
        match e {
            W::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            W::InitApply(o) => {
                let (k, v) = conv(&o);
                let keep = match v {
                    Ok(v) => v,
                    Err(()) => self.applied.get(&k).cloned(),
                };
                if let (Some(buf), Some(v)) = (self.relist.as_mut(), keep) {
                    buf.insert(k, v);
                }
                false
            }
            W::InitDone => {
                self.synced = true;
                match self.relist.take() {
                    Some(fresh) if fresh != self.applied => {
                        self.applied = fresh;
                        true
                    }
                    _ => false,
                }
            }
            W::Apply(o) => match conv(&o) {
                (_, Err(())) => false,
                (k, Ok(Some(v))) => self.applied.insert(k, v.clone()).as_ref() != Some(&v),
                (k, Ok(None)) => self.applied.remove(&k).is_some(),
            },
            W::Delete(o) => self.applied.remove(&conv(&o).0).is_some(),
        }
    }
}
