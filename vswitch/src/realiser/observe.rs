//! Questions asked of the realiser's tables without changing them: a trace
//! against the live tables and conntrack, a new connection explained with
//! the rules that decide it (and what staged policies would do), and a copy
//! of the model for replaying recent connections against another policy set.

use datapath::FlowKey;
use policy::explain::{TraceView, Traced, Verdict};
use policy::model::ObjectKey;
use policy::pipeline::Topology;
use policy::probe::{Endpoint, L4};

use super::Realiser;

/// A new connection explained: see [`Realiser::explain_new`].
#[derive(Debug, Clone)]
pub struct Explained {
    pub verdict: Verdict,
    /// With staged policies enforced (`None`: nothing is staged).
    pub staged: Option<Verdict>,
    pub src_pod: Option<ObjectKey>,
    /// The destination's pod: the backend's, through a Service.
    pub dst_pod: Option<ObjectKey>,
    /// Through a Service: the backend the connection was translated to.
    pub backend: Option<(std::net::IpAddr, u16)>,
}

impl Realiser {
    /// Traces a new connection from `src` to `dst` against the live tables and
    /// the live conntrack table (read only).
    ///
    /// Fails when an endpoint is unknown or the two share no address family.
    pub fn trace(&self, src: &Endpoint, dst: &Endpoint, l4: L4) -> Result<TraceView, String> {
        let st = self.state();
        let key = policy::probe::packet(st.compiler.cluster(), &st.topology, src, dst, l4)?;
        let snap = self.published.dp.snapshot();
        let trace = datapath::trace::trace(
            &snap.tables,
            &key,
            datapath::trace::CtSource::Live(&self.published.dp.conntrack, self.now()),
        );
        let verdict = policy::explain::explain(&st.compiler, &trace);
        // Staged policies judge new connections only.
        let new = trace
            .ct_lookups
            .first()
            .is_none_or(|(_, state)| state & datapath::field::ct_state::NEW != 0);
        let traced = Traced {
            key,
            trace,
            verdict,
            staged: st.shadow.as_ref().filter(|_| new).map(|s| s.verdict(&key)),
        };
        Ok(policy::explain::trace_view(
            &st.compiler,
            &st.topology,
            src,
            dst,
            l4,
            &traced,
            false,
        ))
    }

    /// Explains the first packet of a connection against the current tables
    /// (conntrack assumed new): the verdict with the deciding rules, the
    /// verdict with staged policies enforced (while some are), and the pods
    /// at both ends when known.
    pub fn explain_new(&self, key: &FlowKey) -> Explained {
        let trace = datapath::trace::trace_new(&self.published.dp.snapshot().tables, key);
        let st = self.state();
        let pod = |ip| st.compiler.cluster().pod_by_ip(ip).map(|p| p.key.clone());
        let backend = trace
            .translations
            .iter()
            .find(|(from, to)| (from.dst, from.dport) != (to.dst, to.dport))
            .map(|(_, to)| (datapath::key::wide_to_ip(to.dst), to.dport));
        Explained {
            verdict: policy::explain::explain(&st.compiler, &trace),
            staged: st.shadow.as_ref().map(|s| s.verdict(key)),
            src_pod: pod(key.src_ip()),
            dst_pod: pod(backend.map_or(key.dst_ip(), |b| b.0)),
            backend,
        }
    }

    /// Explains a new connection from `src` to `dst` (conntrack assumed
    /// new): what a reachability matrix shows.
    ///
    /// Fails when an endpoint is unknown or the two share no address family.
    pub fn explain_probe(
        &self,
        src: &Endpoint,
        dst: &Endpoint,
        l4: L4,
    ) -> Result<Explained, String> {
        let key = {
            let st = self.state();
            policy::probe::packet(st.compiler.cluster(), &st.topology, src, dst, l4)?
        };
        Ok(self.explain_new(&key))
    }

    /// The cluster (what is enforced) and the topology, copied: what a
    /// replay against another policy set starts from.
    pub fn model(&self) -> (policy::Cluster, Topology) {
        let st = self.state();
        (st.compiler.cluster().clone(), st.topology.clone())
    }
}
