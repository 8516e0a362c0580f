//! Offline mode: a cluster compiled into the switch's full pipeline, with no switch.
//!
//! Owns answering "would this packet be allowed, and by which rule" from objects
//! alone. It builds the same flows vswitchd installs (base pipeline for a port per
//! pod, plus the compiled policy flows), loads them into the datapath's tables and
//! traces packets through the datapath's own code, assuming a new connection.

use datapath::trace::trace_new;
use datapath::{FlowKey, FlowTables};

use crate::cluster::Cluster;
use crate::compile::Compiler;
use crate::error::Error;
use crate::explain::{Traced, Verdict, explain};
use crate::model::ObjectKey;
use crate::pipeline::{Topology, offline_topology, tables};
use crate::probe::{Endpoint, L4, packet};
use crate::staging::{self, Shadow};

/// One cell of a reachability matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub from: ObjectKey,
    pub to: ObjectKey,
    pub verdict: Verdict,
    /// With staged policies enforced (`None`: nothing is staged).
    pub staged: Option<Verdict>,
}

/// A compiled cluster, ready to trace.
#[derive(Debug)]
pub struct Offline {
    /// What is enforced (staged policies left out).
    pub compiler: Compiler,
    pub topology: Topology,
    pub tables: FlowTables,
    /// Everything with staged policies enforced, while some policy is staged.
    pub shadow: Option<Shadow>,
}

impl Offline {
    /// Compiles `cluster` into the full pipeline.
    ///
    /// Fails only if a compiled flow is rejected by the datapath (a bug).
    pub fn new(cluster: Cluster) -> Result<Offline, Error> {
        Offline::with_services(cluster, &crate::services::Services::default())
    }

    /// [`Offline::new`], the switch load-balancing `services` (when there are any).
    pub fn with_services(
        cluster: Cluster,
        services: &crate::services::Services,
    ) -> Result<Offline, Error> {
        let mut topology = offline_topology(&cluster);
        if !services.services.is_empty() {
            topology.load_balance = true;
            topology.frontends = services.frontends(&cluster, None);
        }
        let (cluster, staged) = staging::split(cluster);
        let shadow = staged
            .map(|all| Shadow::build(all, &topology))
            .transpose()?;
        let compiler = Compiler::from_cluster(cluster);
        let tables = tables(&topology, &compiler).map_err(Error::Flows)?;
        Ok(Offline {
            compiler,
            topology,
            tables,
            shadow,
        })
    }

    /// The flow key of a new connection from `src` to `dst` (see [`packet`]).
    pub fn packet(&self, src: &Endpoint, dst: &Endpoint, l4: L4) -> Result<FlowKey, String> {
        packet(self.compiler.cluster(), &self.topology, src, dst, l4)
    }

    /// Traces a new connection through the pipeline.
    pub fn trace_key(&self, key: &FlowKey) -> Traced {
        let t = trace_new(&self.tables, key);
        let verdict = explain(&self.compiler, &t);
        Traced {
            key: *key,
            trace: t,
            verdict,
            staged: self.shadow.as_ref().map(|s| s.verdict(key)),
        }
    }

    /// Traces a new connection from `src` to `dst`.
    pub fn trace(&self, src: &Endpoint, dst: &Endpoint, l4: L4) -> Result<Traced, String> {
        Ok(self.trace_key(&self.packet(src, dst, l4)?))
    }

    /// Every pod to every other pod (pods with an address).
    pub fn reachability(&self, l4: L4) -> Vec<Reach> {
        let pods: Vec<ObjectKey> = self.topology.pods.iter().map(|p| p.pod.clone()).collect();
        let mut out = Vec::with_capacity(pods.len() * pods.len());
        for from in &pods {
            for to in &pods {
                if from == to {
                    continue;
                }
                let traced =
                    self.trace(&Endpoint::Pod(from.clone()), &Endpoint::Pod(to.clone()), l4);
                if let Ok(t) = traced {
                    out.push(Reach {
                        from: from.clone(),
                        to: to.clone(),
                        verdict: t.verdict,
                        staged: t.staged,
                    });
                }
            }
        }
        out
    }
}
