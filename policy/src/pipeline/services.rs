//! Table 35 (Services) and the hairpin flows of table 70, with the select
//! groups they name: what `services = "switch"` adds to the base pipeline.
//!
//! A new connection to a frontend (ClusterIP, protocol, port) runs the
//! frontend's group, whose bucket translates its destination to one ready
//! backend (`ct(nat(dst=IP:PORT))`), and goes on to the policy tables, which
//! decide on the backend; table 70's commit makes the translation the
//! connection's, and table 30's `ct(nat)` lookup translates its later packets
//! and replies. A frontend without backends answers with a reset or a port
//! unreachable. A pod reaching itself gets a source it must answer through
//! the switch (the hairpin address), or its reply would never leave it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use datapath::Match;
use datapath::field::{Field, ether_type};
use datapath::flow::{Action, Nat, NatTarget, Zone};
use datapath::group::{Bucket, Group, Selection};

use super::{Purpose, Topology, flow, goto, ip_of};
use crate::tables::*;

/// The source a pod reaching itself through a Service sees (link-local:
/// never a pod's, routed by the pod through its gateway, i.e. the switch).
pub const HAIRPIN_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 253);
/// IPv6's (a unique local address outside any pod range the switch hands out).
pub const HAIRPIN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0xa9fe, 0xfd);

/// A frontend's priority in table 35.
const FRONTEND: u16 = 100;
/// Hairpin's in table 70, above the plain commit (100).
const HAIRPIN: u16 = 105;

/// Table 35 and the hairpin flows, when the switch load-balances.
pub(super) fn flows(topo: &Topology, out: &mut Vec<datapath::FlowEntry>) {
    if !topo.load_balance {
        return;
    }
    out.push(flow(SERVICES, 0, Match::any(), Purpose::ServiceOther).action(goto(EGRESS_TABLE)));
    for f in &topo.frontends {
        let (dl, addr) = ip_of(&f.ip);
        let m = Match::any()
            .with(Field::DlType, dl.into())
            .with(Field::NwProto, f.protocol.ip_proto().into())
            .with(Field::NwDst, addr)
            .with(Field::TpDst, f.port.into())
            .with_masked(Field::CtState, 0x21, 0x21);
        let e = if f.backends.is_empty() {
            flow(SERVICES, FRONTEND, m, Purpose::ServiceNoEndpoints).action(Action::Reject)
        } else {
            flow(SERVICES, FRONTEND, m, Purpose::ServiceFrontend)
                .action(Action::Group(f.group))
                .action(goto(EGRESS_TABLE))
        };
        out.push(e);
    }
    let zone = Zone::Imm(topo.zone);
    for pod in &topo.pods {
        for ip in &pod.ips {
            let (dl, addr) = ip_of(ip);
            let hairpin: IpAddr = if dl == ether_type::IPV4 {
                HAIRPIN_V4.into()
            } else {
                HAIRPIN_V6.into()
            };
            let m = Match::any()
                .with(Field::Reg(1), pod.port.0.into())
                .with(Field::DlType, dl.into())
                .with(Field::NwSrc, addr)
                .with_masked(Field::CtState, 0x21, 0x21);
            out.push(
                flow(OUTPUT, HAIRPIN, m, Purpose::Hairpin)
                    .action(Action::Ct {
                        commit: true,
                        zone,
                        table: None,
                        mark: None,
                        nat: Some(Nat::Src(NatTarget {
                            addr: datapath::key::ip_to_wide(hairpin),
                            port: None,
                        })),
                    })
                    .action(Action::Output(pod.port)),
            );
        }
    }
}

/// The select group of every frontend with backends: one bucket per
/// backend, translating to it; for `sessionAffinity: ClientIP`, chosen by the
/// client's address and remembered for the affinity's timeout.
pub fn groups(topo: &Topology) -> Vec<Group> {
    if !topo.load_balance {
        return Vec::new();
    }
    topo.frontends
        .iter()
        .filter(|f| !f.backends.is_empty())
        .map(|f| Group {
            id: f.group,
            selection: if f.affinity.is_some() {
                Selection::Source
            } else {
                Selection::FiveTuple
            },
            affinity: f.affinity,
            buckets: bucket_ids(&f.backends)
                .into_iter()
                .zip(&f.backends)
                .map(|(id, b)| Bucket {
                    id,
                    weight: 1,
                    actions: [Action::Ct {
                        // No lookup, no commit: the zone is the commit's, later.
                        commit: false,
                        zone: Zone::Imm(0),
                        table: None,
                        mark: None,
                        nat: Some(Nat::Dst(NatTarget {
                            addr: datapath::key::ip_to_wide(b.ip),
                            port: Some(b.port),
                        })),
                    }]
                    .into_iter()
                    .collect(),
                })
                .collect(),
        })
        .collect()
}

/// A bucket id per backend that does not change when other backends come and
/// go (what client affinity remembers): a hash of the backend, probed past
/// collisions.
fn bucket_ids(backends: &[crate::services::Backend]) -> Vec<u32> {
    let mut taken: Vec<u32> = Vec::with_capacity(backends.len());
    for b in backends {
        let mut h: u32 = 0x811c_9dc5;
        for byte in datapath::key::ip_to_wide(b.ip)
            .iter()
            .chain(&b.port.to_be_bytes())
        {
            h = (h ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
        }
        while taken.contains(&h) {
            h = h.wrapping_add(1);
        }
        taken.push(h);
    }
    taken
}
