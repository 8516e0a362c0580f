//! Staged policies: evaluated on real traffic, never enforced.
//!
//! Owns what `vswitch.io/mode: audit` means. A staged NetworkPolicy or
//! ClusterNetworkPolicy is kept out of the enforcing compiler (as if it were
//! deleted there) and compiled, together with everything enforced, by a
//! *shadow* compiler whose tables are never published to packet threads. A
//! connection traced through both gives the real verdict and the verdict it
//! would get once the staged policies are enforced. The shadow exists only
//! while some policy is staged; flipping the annotation is one incremental
//! change in each compiler, never a recompile of the rest. The annotation
//! itself is read in [`crate::mode`].

use datapath::trace::trace_new;
use datapath::{FlowKey, FlowTables, Time};

use crate::cluster::Cluster;
use crate::compile::{Change, Compiler};
use crate::error::Error;
use crate::explain::{Verdict, explain};
use crate::pipeline::{Topology, tables};

/// What the enforcing compiler gets for `change`: a staged policy is absent
/// there, so its arrival deletes any enforced version.
pub fn enforced(change: Change) -> Change {
    match change {
        Change::Policy(p) if p.staged => Change::PolicyDeleted(p.key),
        Change::ClusterPolicy(p) if p.staged => Change::ClusterPolicyDeleted(p.name),
        other => other,
    }
}

/// Whether `change` stages a policy (the shadow is needed from then on).
pub fn stages(change: &Change) -> bool {
    match change {
        Change::Policy(p) => p.staged,
        Change::ClusterPolicy(p) => p.staged,
        _ => false,
    }
}

/// `cluster` without its staged policies: what is enforced.
pub fn enforced_cluster(cluster: &Cluster) -> Cluster {
    let policies: Vec<_> = cluster.policies().filter(|p| !p.staged).cloned().collect();
    let cluster_policies: Vec<_> = cluster
        .cluster_policies()
        .filter(|p| !p.staged)
        .cloned()
        .collect();
    cluster.with_policies(&policies, &cluster_policies)
}

/// `cluster` split into what is enforced and, when some policy is staged,
/// the whole of it (what the shadow compiles).
pub fn split(cluster: Cluster) -> (Cluster, Option<Cluster>) {
    if has_staged(&cluster) {
        (enforced_cluster(&cluster), Some(cluster))
    } else {
        (cluster, None)
    }
}

/// Whether some policy of `cluster` is staged.
pub fn has_staged(cluster: &Cluster) -> bool {
    cluster.policies().any(|p| p.staged) || cluster.cluster_policies().any(|p| p.staged)
}

/// Everything enforced plus every staged policy, compiled into tables that
/// only traces read.
#[derive(Debug)]
pub struct Shadow {
    pub compiler: Compiler,
    pub tables: FlowTables,
}

impl Shadow {
    /// Compiles `cluster` (staged policies included) over `topology`.
    ///
    /// Fails only if a compiled flow is rejected by the datapath (a bug).
    pub fn build(cluster: Cluster, topology: &Topology) -> Result<Shadow, Error> {
        let compiler = Compiler::from_cluster(cluster);
        let tables = tables(topology, &compiler).map_err(Error::Flows)?;
        Ok(Shadow { compiler, tables })
    }

    /// Rebuilds the tables from the compiler (after the topology changed).
    ///
    /// Fails only if a compiled flow is rejected by the datapath (a bug).
    pub fn retable(&mut self, topology: &Topology) -> Result<(), Error> {
        self.tables = tables(topology, &self.compiler).map_err(Error::Flows)?;
        Ok(())
    }

    /// Applies a change to the shadow compiler and its tables.
    ///
    /// Fails only if a compiled flow is rejected by the datapath (a bug).
    pub fn apply(&mut self, change: Change) -> Result<(), Error> {
        let diff = self.compiler.apply(change);
        for id in &diff.deleted {
            self.tables.remove(id);
        }
        for f in diff.added.into_iter().chain(diff.modified) {
            self.tables.add(f, Time::ZERO).map_err(Error::Flows)?;
        }
        Ok(())
    }

    /// Whether a staged policy is still in the shadow (else it can go).
    pub fn needed(&self) -> bool {
        has_staged(self.compiler.cluster())
    }

    /// The verdict a new connection would get with staged policies enforced.
    pub fn verdict(&self, key: &FlowKey) -> Verdict {
        explain(&self.compiler, &trace_new(&self.tables, key))
    }
}
