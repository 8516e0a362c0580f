//! The base pipeline around the policy tables, for a given set of ports.
//!
//! Owns tables 0 (classifier), 10 (spoofguard) and 20 (ARP and neighbour
//! discovery responder) in [`neighbours`], 30 (conntrack),
//! the pass-through flows of 40/50, 60 (forwarding) and 70 (output). The daemon
//! builds a [`Topology`] from its attached ports; offline mode builds one with a
//! port per pod. Both then install `base_flows` plus the compiler's policy flows,
//! so `flowctl --manifests` runs exactly the pipeline the switch runs.

use std::net::IpAddr;

use datapath::field::{Field, ether_type, ipv4_mapped, mac_value};
use datapath::flow::{Action, Cookie, FlowEntry, TableId, Zone};
use datapath::{Match, PortNo};

use crate::cluster::Cluster;
use crate::compile::{Compiler, net_match};
use crate::cookie::CookieKind;
use crate::model::ObjectKey;
use crate::tables::*;

mod neighbours;
mod services;

use neighbours::{arp_responder, spoofguard};
pub use services::{HAIRPIN_V4, HAIRPIN_V6, groups};

/// Another node, reached through a tunnel port: its pods' addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelPeer {
    pub port: PortNo,
    pub node: String,
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

/// A pod attached to a switch port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    pub port: PortNo,
    pub pod: ObjectKey,
    pub mac: [u8; 6],
    pub ips: Vec<IpAddr>,
}

/// The link-local address of an interface with `mac` (modified EUI-64,
/// RFC 4291 appendix A): what vswitch-cni gives a pod, and the gateway.
pub fn link_local(mac: [u8; 6]) -> IpAddr {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 0x02;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    IpAddr::V6(std::net::Ipv6Addr::from(a))
}

/// The IPv6 router pods route through (`default via fe80::1`): the switch
/// answers for it with the gateway's MAC, as the ARP responder does for the
/// IPv4 gateway address.
pub const VIRTUAL_ROUTER: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The port towards the node (and beyond).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub port: PortNo,
    pub mac: [u8; 6],
    pub ips: Vec<IpAddr>,
}

/// What the base pipeline is built from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Topology {
    pub pods: Vec<PodPort>,
    pub gateway: Option<Gateway>,
    /// Other nodes, one tunnel port each.
    pub tunnels: Vec<TunnelPeer>,
    /// Service (ClusterIP) ranges: translated by the node's kernel (kube-proxy),
    /// so their policy is decided after translation, when the packet comes back
    /// through the gateway.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// The switch load-balances Services itself (`services = "switch"`):
    /// these frontends, translated in table 35 before policy; the node's
    /// kube-proxy is not relied on and `service_cidrs` are not exempt.
    pub load_balance: bool,
    pub frontends: Vec<crate::services::Frontend>,
    /// Conntrack zone of pod traffic.
    pub zone: u16,
    /// Nothing is forwarded (the cluster state is not known yet): every port
    /// is unknown to the classifier.
    pub sealed: bool,
    /// DNS answers to pods are copied to the control plane (a
    /// ClusterNetworkPolicy has `domainNames` peers: it learns what they
    /// resolve to).
    pub snoop_dns: bool,
}

/// What a base-pipeline flow is for; its cookie says it (the payload is the
/// variant's number, stable across releases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    ClassifierKnown,
    ClassifierUnknown,
    SpoofguardOwn,
    SpoofguardGateway,
    SpoofguardDrop,
    ArpReply,
    ArpNoBroadcast,
    ConntrackLookup,
    ConntrackInvalid,
    ConntrackEstablished,
    NotIsolated,
    ForwardLocal,
    ForwardGateway,
    Output,
    ClassifierTunnel,
    SpoofguardTunnel,
    EgressElsewhere,
    IngressElsewhere,
    ForwardRemote,
    ForwardFromTunnel,
    ServiceTraffic,
    ReplyThroughNode,
    OutputViaNode,
    SpoofguardRouterOnly,
    Sealed,
    NoAdminDecision,
    NoBaselineDecision,
    DnsAnswer,
    NdReply,
    SpoofguardNeighbour,
    SpoofguardDadProbe,
    SpoofguardHostOnly,
    ServiceFrontend,
    ServiceNoEndpoints,
    ServiceOther,
    Hairpin,
    ForwardRouted,
}

impl Purpose {
    const ALL: [Purpose; 37] = [
        Purpose::ClassifierKnown,
        Purpose::ClassifierUnknown,
        Purpose::SpoofguardOwn,
        Purpose::SpoofguardGateway,
        Purpose::SpoofguardDrop,
        Purpose::ArpReply,
        Purpose::ArpNoBroadcast,
        Purpose::ConntrackLookup,
        Purpose::ConntrackInvalid,
        Purpose::ConntrackEstablished,
        Purpose::NotIsolated,
        Purpose::ForwardLocal,
        Purpose::ForwardGateway,
        Purpose::Output,
        Purpose::ClassifierTunnel,
        Purpose::SpoofguardTunnel,
        Purpose::EgressElsewhere,
        Purpose::IngressElsewhere,
        Purpose::ForwardRemote,
        Purpose::ForwardFromTunnel,
        Purpose::ServiceTraffic,
        Purpose::ReplyThroughNode,
        Purpose::OutputViaNode,
        Purpose::SpoofguardRouterOnly,
        Purpose::Sealed,
        Purpose::NoAdminDecision,
        Purpose::NoBaselineDecision,
        Purpose::DnsAnswer,
        Purpose::NdReply,
        Purpose::SpoofguardNeighbour,
        Purpose::SpoofguardDadProbe,
        Purpose::SpoofguardHostOnly,
        Purpose::ServiceFrontend,
        Purpose::ServiceNoEndpoints,
        Purpose::ServiceOther,
        Purpose::Hairpin,
        Purpose::ForwardRouted,
    ];

    /// In words, as traces and dumps show it.
    pub const fn text(self) -> &'static str {
        match self {
            Purpose::ClassifierKnown => "classifier: known port",
            Purpose::ClassifierUnknown => "classifier: unknown port",
            Purpose::SpoofguardOwn => "spoofguard: own MAC and IP",
            Purpose::SpoofguardGateway => "spoofguard: gateway",
            Purpose::SpoofguardDrop => "spoofguard: spoofed or unknown",
            Purpose::ArpReply => "arp responder: reply",
            Purpose::ArpNoBroadcast => "arp responder: no broadcast",
            Purpose::ConntrackLookup => "conntrack: lookup",
            Purpose::ConntrackInvalid => "conntrack: invalid",
            Purpose::ConntrackEstablished => "conntrack: established or related",
            Purpose::NotIsolated => "policy: not isolated",
            Purpose::ForwardLocal => "forwarding: local pod",
            Purpose::ForwardGateway => "forwarding: via gateway",
            Purpose::Output => "output",
            Purpose::ClassifierTunnel => "classifier: tunnel",
            Purpose::SpoofguardTunnel => "spoofguard: tunnel (remote node's pods)",
            Purpose::EgressElsewhere => "policy: egress enforced on the source node",
            Purpose::IngressElsewhere => "policy: ingress enforced on the destination node",
            Purpose::ForwardRemote => "forwarding: remote node",
            Purpose::ForwardFromTunnel => "forwarding: local pod from tunnel",
            Purpose::ServiceTraffic => {
                "policy: service traffic, decided after the node translates it"
            }
            Purpose::ReplyThroughNode => {
                "forwarding: reply through the node (it translated the connection)"
            }
            Purpose::OutputViaNode => "output, remembering the node saw it",
            Purpose::Sealed => {
                "classifier: not ready (the cluster state is not synced yet): nothing is forwarded"
            }
            Purpose::SpoofguardRouterOnly => {
                "spoofguard: router advertisement, redirect or neighbour advertisement (the switch answers for every address)"
            }
            Purpose::NoAdminDecision => "policy: no Admin tier rule decided, on to NetworkPolicy",
            Purpose::NoBaselineDecision => "policy: no Baseline tier rule decided: allowed",
            Purpose::DnsAnswer => "output: a DNS answer to a pod, copied for domainNames peers",
            Purpose::NdReply => "neighbour discovery: advertisement for a known address",
            Purpose::SpoofguardNeighbour => {
                "spoofguard: neighbour solicitation from its own address and MAC"
            }
            Purpose::SpoofguardDadProbe => {
                "spoofguard: duplicate address detection probe (unanswered: the address is the pod's)"
            }
            Purpose::SpoofguardHostOnly => {
                "spoofguard: router solicitation or multicast listener message (routes are static; no multicast between pods)"
            }
            Purpose::ServiceFrontend => "services: a new connection to a Service gets a backend",
            Purpose::ServiceNoEndpoints => {
                "services: a Service with no ready endpoints refuses the connection"
            }
            Purpose::ServiceOther => "services: not a Service frontend, on to policy",
            Purpose::ForwardRouted => {
                "forwarding: routed to a local pod (translated to a Service backend, or back)"
            }
            Purpose::Hairpin => {
                "output: a pod reaching itself through a Service (the Service's hairpin address as source)"
            }
        }
    }

    pub fn cookie(self) -> Cookie {
        CookieKind::Pipeline.cookie(self as u64)
    }

    /// The purpose of a base-pipeline cookie.
    pub fn of(c: Cookie) -> Option<Purpose> {
        let i = CookieKind::Pipeline.payload(c)?;
        Purpose::ALL.get(usize::try_from(i).ok()?).copied()
    }
}

/// What a base-pipeline cookie stands for.
pub fn describe(c: Cookie) -> Option<&'static str> {
    Purpose::of(c).map(Purpose::text)
}

fn flow(table: u8, priority: u16, m: Match, purpose: Purpose) -> FlowEntry {
    FlowEntry::new(table, priority, m).cookie(purpose.cookie().0)
}

fn ip_of(ip: &IpAddr) -> (u16, u128) {
    match ip {
        IpAddr::V4(a) => (ether_type::IPV4, ipv4_mapped(*a)),
        IpAddr::V6(a) => (ether_type::IPV6, u128::from(*a)),
    }
}

fn goto(t: u8) -> Action {
    Action::GotoTable(TableId(t))
}

/// The MAC that answers ARP for other nodes' pods.
pub const REMOTE_ROUTER_MAC: [u8; 6] = [0x0a, 0x58, 0xff, 0xff, 0xff, 0xfe];

/// A pod CIDR's router address: its first host (IPv6: the one after the
/// subnet-router anycast address). On its own node it is the gateway's
/// address; other nodes route the CIDR through it (on-link on their gateway,
/// answered by their switch with the router MAC).
pub fn router_address(net: &ipnet::IpNet) -> Option<IpAddr> {
    match net {
        ipnet::IpNet::V4(n) => n.hosts().next().map(IpAddr::V4),
        // IPv6: after the subnet-router anycast address.
        ipnet::IpNet::V6(n) => n.hosts().nth(1).map(IpAddr::V6),
    }
}

/// Forwarding decided: the output port goes into `reg1`, then table 70.
trait ThenOutput {
    fn then_output(self, port: PortNo) -> FlowEntry;
}

impl ThenOutput for FlowEntry {
    fn then_output(self, port: PortNo) -> FlowEntry {
        self.action(Action::Load {
            field: Field::Reg(1),
            value: port.0.into(),
            ofs: 0,
            nbits: 32,
        })
        .action(goto(OUTPUT))
    }
}

/// The base flows for `topo`: every table but the compiled policy flows.
pub fn base_flows(topo: &Topology) -> Vec<FlowEntry> {
    let mut out = Vec::new();
    classifier(topo, &mut out);
    spoofguard(topo, &mut out);
    arp_responder(topo, &mut out);
    conntrack(topo, &mut out);
    policy_exemptions(topo, &mut out);
    forwarding(topo, &mut out);
    output(topo, &mut out);
    services::flows(topo, &mut out);
    out
}

/// Table 0: every known port gets its class in `reg0`; unknown ports drop.
fn classifier(topo: &Topology, out: &mut Vec<FlowEntry>) {
    if topo.sealed {
        out.push(flow(CLASSIFIER, 0, Match::any(), Purpose::Sealed));
        return;
    }
    // 0: classifier.
    let classes = topo
        .pods
        .iter()
        .map(|p| (p.port, CLASS_POD, Purpose::ClassifierKnown))
        .chain(
            topo.gateway
                .iter()
                .map(|g| (g.port, CLASS_GATEWAY, Purpose::ClassifierKnown)),
        )
        .chain(
            topo.tunnels
                .iter()
                .map(|t| (t.port, CLASS_TUNNEL, Purpose::ClassifierTunnel)),
        );
    for (port, class, purpose) in classes {
        let m = Match::any().with(Field::InPort, port.0.into());
        out.push(
            flow(CLASSIFIER, 100, m, purpose)
                .action(Action::Load {
                    field: Field::Reg(0),
                    value: class,
                    ofs: 0,
                    nbits: 8,
                })
                .action(goto(SPOOFGUARD)),
        );
    }
    out.push(flow(
        CLASSIFIER,
        0,
        Match::any(),
        Purpose::ClassifierUnknown,
    ));
}

/// Table 30: conntrack lookup (recirculating into 30 with `+trk`); invalid drops, established and related skip policy.
fn conntrack(topo: &Topology, out: &mut Vec<FlowEntry>) {
    let zone = Zone::Imm(topo.zone);
    let ip_any = [ether_type::IPV4, ether_type::IPV6];
    // 30: conntrack. Recirculates into itself with +trk set.
    for dl in ip_any {
        let ip = Match::any().with(Field::DlType, dl.into());
        out.push(
            flow(
                CONNTRACK,
                200,
                ip.with_masked(Field::CtState, 0, 0x20),
                Purpose::ConntrackLookup,
            )
            .action(Action::Ct {
                commit: false,
                zone,
                table: Some(TableId(CONNTRACK)),
                mark: None,
                nat: topo.load_balance.then_some(datapath::flow::Nat::Tracked),
            }),
        );
        out.push(flow(
            CONNTRACK,
            190,
            ip.with_masked(Field::CtState, 0x30, 0x30),
            Purpose::ConntrackInvalid,
        ));
        for (state, mask) in [(0x22, 0x23), (0x24, 0x25)] {
            out.push(
                flow(
                    CONNTRACK,
                    180,
                    ip.with_masked(Field::CtState, state, mask),
                    Purpose::ConntrackEstablished,
                )
                .action(goto(FORWARDING)),
            );
        }
    }
    let next = if topo.load_balance {
        SERVICES
    } else {
        EGRESS_TABLE
    };
    out.push(flow(CONNTRACK, 0, Match::any(), Purpose::ConntrackLookup).action(goto(next)));
}

/// Tables 40-42 and 50-52: what policy does not decide here (Service traffic, the other node's half of cross-node traffic) and the pass-through for what no policy flow decides.
fn policy_exemptions(topo: &Topology, out: &mut Vec<FlowEntry>) {
    // 40 / 50, Services: a pod's packet to a ClusterIP goes to the node, whose
    // kernel translates it and sends it back through the gateway; policy is
    // decided then, on the real destination (egress matches the pod as source
    // whatever the port it comes from).
    for net in topo.service_cidrs.iter().filter(|_| !topo.load_balance) {
        for (table, next) in [(EGRESS_TABLE, AFTER_EGRESS), (INGRESS_TABLE, AFTER_INGRESS)] {
            let m = net_match(Field::NwDst, *net).with_masked(Field::Reg(0), CLASS_POD, 0xff);
            out.push(flow(table, priority::EXEMPT, m, Purpose::ServiceTraffic).action(goto(next)));
        }
    }

    // 40 / 50 across nodes: egress is enforced on the source node, ingress on
    // the destination node, each exactly once.
    if !topo.tunnels.is_empty() {
        out.push(
            flow(
                EGRESS_TABLE,
                priority::EXEMPT,
                Match::any().with_masked(Field::Reg(0), CLASS_TUNNEL, 0xff),
                Purpose::EgressElsewhere,
            )
            .action(goto(AFTER_EGRESS)),
        );
    }
    for t in &topo.tunnels {
        for net in &t.pod_cidrs {
            // From this node's pods, and from the node itself (a Service
            // backend on another node, after the node's translation).
            for class in [CLASS_POD, CLASS_GATEWAY] {
                let m = net_match(Field::NwDst, *net).with_masked(Field::Reg(0), class, 0xff);
                out.push(
                    flow(
                        INGRESS_TABLE,
                        priority::EXEMPT,
                        m,
                        Purpose::IngressElsewhere,
                    )
                    .action(goto(AFTER_INGRESS)),
                );
            }
        }
    }

    // What no rule of a tier decides goes on to the next tier: Admin, then
    // NetworkPolicy (pods no NetworkPolicy isolates), then Baseline, then allowed.
    for (admin, np, baseline, after) in [
        (EGRESS_TABLE, EGRESS_NP, EGRESS_BASELINE, AFTER_EGRESS),
        (INGRESS_TABLE, INGRESS_NP, INGRESS_BASELINE, AFTER_INGRESS),
    ] {
        let any = Match::any();
        out.push(flow(admin, priority::PASS, any, Purpose::NoAdminDecision).action(goto(np)));
        out.push(flow(np, priority::PASS, any, Purpose::NotIsolated).action(goto(baseline)));
        out.push(
            flow(baseline, priority::PASS, any, Purpose::NoBaselineDecision).action(goto(after)),
        );
    }
}

/// Table 60: the output port, into `reg1`.
fn forwarding(topo: &Topology, out: &mut Vec<FlowEntry>) {
    let ip_any = [ether_type::IPV4, ether_type::IPV6];
    // 60: forwarding.
    for t in &topo.tunnels {
        for net in &t.pod_cidrs {
            // This node's pods and the node itself send to other nodes; what
            // came from a tunnel never goes back into one (no transit).
            for class in [CLASS_POD, CLASS_GATEWAY] {
                let m = net_match(Field::NwDst, *net).with_masked(Field::Reg(0), class, 0xff);
                out.push(flow(FORWARDING, 50, m, Purpose::ForwardRemote).then_output(t.port));
            }
        }
    }
    // Replies of connections the node's kernel saw go back through it.
    if let Some(g) = &topo.gateway {
        for class in [CLASS_POD, CLASS_TUNNEL] {
            for (state, mask) in [(0x2a, 0x2a), (0x2c, 0x2c)] {
                let m = Match::any()
                    .with_masked(Field::Reg(0), class, 0xff)
                    .with_masked(Field::CtState, state, mask)
                    .with(Field::CtMark, MARK_VIA_GATEWAY.into());
                // Addressed to the node, which would otherwise ignore a frame
                // meant for a pod or another node's router.
                out.push(
                    flow(FORWARDING, 120, m, Purpose::ReplyThroughNode)
                        .action(Action::SetField {
                            field: Field::DlDst,
                            value: mac_value(g.mac),
                        })
                        .then_output(g.port),
                );
            }
        }
    }
    // Local pods. From another node, the frame was addressed to that node's
    // gateway; it leaves here addressed to the pod, from this node's gateway (a
    // router hop).
    let router_mac = topo.gateway.as_ref().map_or(OFFLINE_GATEWAY_MAC, |g| g.mac);
    for p in &topo.pods {
        for ip in &p.ips {
            let (dl, addr) = ip_of(ip);
            let to_pod = Match::any()
                .with(Field::DlType, dl.into())
                .with(Field::NwDst, addr);
            out.push(flow(FORWARDING, 100, to_pod, Purpose::ForwardLocal).then_output(p.port));
            // A router hop: from this node's gateway, addressed to the pod.
            let hop = |priority, m, purpose| {
                flow(FORWARDING, priority, m, purpose)
                    .action(Action::SetField {
                        field: Field::DlSrc,
                        value: mac_value(router_mac),
                    })
                    .action(Action::SetField {
                        field: Field::DlDst,
                        value: mac_value(p.mac),
                    })
                    .then_output(p.port)
            };
            if topo.load_balance {
                // Sent to the router (a ClusterIP, the hairpin address) and
                // translated to a pod here.
                let routed = to_pod
                    .with(Field::DlDst, mac_value(router_mac))
                    .with_masked(Field::Reg(0), CLASS_POD, 0xff);
                out.push(hop(105, routed, Purpose::ForwardRouted));
            }
            if !topo.tunnels.is_empty() {
                let tunneled = to_pod.with_masked(Field::Reg(0), CLASS_TUNNEL, 0xff);
                out.push(hop(110, tunneled, Purpose::ForwardFromTunnel));
            }
        }
    }
    if let Some(g) = &topo.gateway {
        for dl in ip_any {
            out.push(
                // Only pods leave through the gateway: the node's own frames
                // (e.g. its IPv6 multicast) are not sent back to it.
                flow(
                    FORWARDING,
                    10,
                    Match::any().with(Field::DlType, dl.into()).with_masked(
                        Field::Reg(0),
                        CLASS_POD,
                        0xff,
                    ),
                    Purpose::ForwardGateway,
                )
                .then_output(g.port),
            );
        }
    }
}

/// Table 70: commit new connections, output.
fn output(topo: &Topology, out: &mut Vec<FlowEntry>) {
    let zone = Zone::Imm(topo.zone);
    // 70: output, committing new connections.
    let ports = topo
        .pods
        .iter()
        .map(|p| p.port)
        .chain(topo.gateway.iter().map(|g| g.port))
        .chain(topo.tunnels.iter().map(|t| t.port));
    let pod_ports: Vec<PortNo> = topo.pods.iter().map(|p| p.port).collect();
    for port in ports {
        let m = Match::any().with(Field::Reg(1), port.0.into());
        // A DNS answer (UDP from port 53) to a pod, in a connection the pod
        // opened: delivered, and copied to the control plane, which learns
        // what names resolve to (for `domainNames` peers).
        if topo.snoop_dns && pod_ports.contains(&port) {
            for dl in [ether_type::IPV4, ether_type::IPV6] {
                let dns = m
                    .with(Field::DlType, dl.into())
                    .with(Field::NwProto, 17)
                    .with(Field::TpSrc, 53)
                    .with_masked(Field::CtState, 0x28, 0x29);
                out.push(
                    flow(OUTPUT, 95, dns, Purpose::DnsAnswer)
                        .action(Action::Controller)
                        .action(Action::Output(port)),
                );
            }
        }
        if topo.gateway.is_some() {
            out.push(
                flow(
                    OUTPUT,
                    110,
                    m.with_masked(Field::CtState, 0x21, 0x21).with_masked(
                        Field::Reg(0),
                        CLASS_GATEWAY,
                        0xff,
                    ),
                    Purpose::OutputViaNode,
                )
                .action(Action::Ct {
                    commit: true,
                    zone,
                    table: None,
                    mark: Some(MARK_VIA_GATEWAY),
                    nat: None,
                })
                .action(Action::Output(port)),
            );
        }
        out.push(
            flow(
                OUTPUT,
                100,
                m.with_masked(Field::CtState, 0x21, 0x21),
                Purpose::Output,
            )
            .action(Action::Ct {
                commit: true,
                zone,
                table: None,
                mark: None,
                nat: None,
            })
            .action(Action::Output(port)),
        );
        out.push(flow(OUTPUT, 90, m, Purpose::Output).action(Action::Output(port)));
    }
}

/// The whole table set for `topo` with `compiler`'s policy flows: what the
/// switch installs after a full resync, what offline mode traces, what tests
/// run. (Incremental publication applies the same flows as diffs.)
pub fn assemble(topo: &Topology, compiler: &Compiler) -> Vec<FlowEntry> {
    let mut out = base_flows(topo);
    out.extend(compiler.flows());
    out
}

/// [`assemble`]d into tables to trace (offline mode, staged policies, what-if).
///
/// Fails only if a compiled flow is rejected by the datapath (a bug).
pub fn tables(
    topo: &Topology,
    compiler: &Compiler,
) -> Result<datapath::FlowTables, datapath::FlowError> {
    let mut tables = datapath::FlowTables::new();
    for g in groups(topo) {
        tables.add_group(g)?;
    }
    for f in assemble(topo, compiler) {
        tables.add(f, datapath::Time::ZERO)?;
    }
    Ok(tables)
}

/// Gateway port of offline topologies.
pub const OFFLINE_GATEWAY: PortNo = PortNo(0xfffe);
/// Gateway MAC of offline topologies.
pub const OFFLINE_GATEWAY_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 1];

/// A MAC derived from a pod's first IP (`0a:58:` + IPv4, as OVN does), or from its
/// key when it has no IPv4 address.
pub fn pod_mac(key: &ObjectKey, ips: &[IpAddr]) -> [u8; 6] {
    match ips.iter().find_map(|ip| match ip {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(_) => None,
    }) {
        Some(o) => [0x0a, 0x58, o[0], o[1], o[2], o[3]],
        None => {
            let h = key
                .to_string()
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
            let b = h.to_be_bytes();
            [0x0a, 0x59, b[0], b[1], b[2], b[3]]
        }
    }
}

/// The topology offline mode uses: every pod with an IP on its own port (1, 2, ...
/// in namespace/name order) and a gateway port for everything else.
pub fn offline_topology(cluster: &Cluster) -> Topology {
    let pods = cluster
        .pods()
        .filter(|p| !p.ips.is_empty())
        .enumerate()
        .map(|(i, p)| PodPort {
            port: PortNo(i as u32 + 1),
            pod: p.key.clone(),
            mac: pod_mac(&p.key, &p.ips),
            ips: p.ips.clone(),
        })
        .collect();
    Topology {
        pods,
        gateway: Some(Gateway {
            port: OFFLINE_GATEWAY,
            mac: OFFLINE_GATEWAY_MAC,
            ips: vec![],
        }),
        tunnels: vec![],
        service_cidrs: vec![],
        load_balance: false,
        frontends: vec![],
        zone: 1,
        sealed: false,
        snoop_dns: false,
    }
}
