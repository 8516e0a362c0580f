//! Services in the realiser: the Service and EndpointSlice set, the switch's
//! load-balancing mode, and keeping the datapath's select groups equal to
//! the frontends' (published with the flows that name them, in one
//! generation).

use std::collections::HashMap;

use policy::services::{Backend, Frontend};

use super::{Error, Realiser};

/// Tracked connections through each Service frontend to each backend,
/// counted in one pass over conntrack.
#[derive(Debug, Default)]
pub struct ServiceConnections(HashMap<Through, u64>);

/// (protocol, frontend address, frontend port, backend address, backend port).
type Through = (u8, [u8; 16], u16, [u8; 16], u16);

impl ServiceConnections {
    /// Connections through `frontend` translated to `backend`.
    pub fn get(&self, frontend: &Frontend, backend: &Backend) -> u64 {
        let key = (
            frontend.protocol.ip_proto(),
            datapath::key::ip_to_wide(frontend.ip),
            frontend.port,
            datapath::key::ip_to_wide(backend.ip),
            backend.port,
        );
        self.0.get(&key).copied().unwrap_or(0)
    }
}

impl Realiser {
    /// Load-balances Services in the switch (`services = "switch"`) or leaves
    /// them to the node's kube-proxy.
    ///
    /// Fails when flows cannot be installed.
    pub fn set_load_balance(&self, on: bool) -> Result<(), Error> {
        let mut st = self.state();
        st.topology.load_balance = on;
        self.publish(&mut st)?;
        Ok(())
    }

    /// The Services and EndpointSlices in force (replacing the last set);
    /// publishes when the frontends change.
    ///
    /// Fails when flows cannot be installed.
    pub fn set_services(&self, services: policy::services::Services) -> Result<(), Error> {
        let mut st = self.state();
        if st.services == services {
            return Ok(());
        }
        st.services = services;
        self.publish(&mut st)?;
        Ok(())
    }

    /// Applies one Service or EndpointSlice change (Kubernetes mode).
    ///
    /// Fails when flows cannot be installed.
    pub fn edit_services(
        &self,
        edit: impl FnOnce(&mut policy::services::Services),
    ) -> Result<(), Error> {
        let mut st = self.state();
        let before = st.services.clone();
        edit(&mut st.services);
        if st.services == before {
            return Ok(());
        }
        self.publish(&mut st)?;
        Ok(())
    }

    /// The tracked connections through each frontend to each backend.
    pub fn service_connections(&self) -> ServiceConnections {
        let mut counts = HashMap::new();
        for c in self.datapath().conntrack.dump(self.now(), None) {
            if let Some(n) = c.nat {
                let o = &c.orig;
                *counts
                    .entry((o.proto, o.dst, o.dport, n.dst, n.dport))
                    .or_default() += 1;
            }
        }
        ServiceConnections(counts)
    }

    /// The frontends load-balanced now (`flowctl dump-services`).
    pub fn frontends(&self) -> Vec<policy::services::Frontend> {
        self.state().topology.frontends.clone()
    }
}

/// Makes the tables' groups `groups` (same ids replaced, others removed);
/// returns how many changed.
pub(super) fn sync_groups(
    t: &mut datapath::FlowTables,
    groups: &[datapath::group::Group],
) -> Result<usize, datapath::FlowError> {
    let stale: Vec<u32> = t
        .groups()
        .iter()
        .map(|g| g.id)
        .filter(|id| !groups.iter().any(|g| g.id == *id))
        .collect();
    let mut changed = 0;
    for id in stale {
        changed += usize::from(t.remove_group(id));
    }
    for g in groups {
        if t.group(g.id) != Some(g) {
            t.add_group(g.clone())?;
            changed += 1;
        }
    }
    Ok(changed)
}
