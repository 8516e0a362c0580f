//! The pipeline's fixed numbers: tables, priority bands, register values.
//!
//! Table numbers are fixed so that dumps and traces read the same everywhere
//! (OVS/Antrea style). The compiler, the base pipeline, `explain` and the switch
//! all take them from here; nothing else spells a table number.

use datapath::TableId;

pub const CLASSIFIER: u8 = 0;
pub const SPOOFGUARD: u8 = 10;
pub const ARP_RESPONDER: u8 = 20;
pub const CONNTRACK: u8 = 30;
/// Services: a new connection to a ClusterIP gets its backend (translated).
pub const SERVICES: u8 = 35;
/// Egress policy starts here: exemptions, then the Admin tier (ClusterNetworkPolicy).
pub const EGRESS_TABLE: u8 = 40;
/// Egress NetworkPolicy tier.
pub const EGRESS_NP: u8 = 41;
/// Egress Baseline tier (ClusterNetworkPolicy).
pub const EGRESS_BASELINE: u8 = 42;
/// Ingress policy starts here: exemptions, then the Admin tier.
pub const INGRESS_TABLE: u8 = 50;
/// Ingress NetworkPolicy tier.
pub const INGRESS_NP: u8 = 51;
/// Ingress Baseline tier.
pub const INGRESS_BASELINE: u8 = 52;
pub const FORWARDING: u8 = 60;
pub const OUTPUT: u8 = 70;
/// Where traffic goes once egress policy allows it.
pub const AFTER_EGRESS: u8 = INGRESS_TABLE;
/// Where traffic goes once ingress policy allows it.
pub const AFTER_INGRESS: u8 = FORWARDING;

/// The tables whose drops are policy decisions (what the audit log reports).
pub const POLICY_TABLES: [TableId; 6] = [
    TableId(EGRESS_TABLE),
    TableId(EGRESS_NP),
    TableId(EGRESS_BASELINE),
    TableId(INGRESS_TABLE),
    TableId(INGRESS_NP),
    TableId(INGRESS_BASELINE),
];

/// Whether `table` is one of the egress policy tables (else ingress, when a
/// policy table at all).
pub const fn is_egress_table(table: u8) -> bool {
    table >= EGRESS_TABLE && table < INGRESS_TABLE
}

/// Whether `table` is a policy table.
pub const fn is_policy_table(table: u8) -> bool {
    table >= EGRESS_TABLE && table < FORWARDING
}

/// Priority bands inside a policy table.
pub mod priority {
    /// Exemptions decided elsewhere (Service traffic, the other node's half),
    /// in the first table of each direction: above every Admin tier rule.
    pub const EXEMPT: u16 = 65000;
    /// The highest priority of a tier rule: ClusterNetworkPolicy priority 0,
    /// rule 0. Priority `p`, rule `i` is `TIER_TOP - (p * TIER_RULE_SLOTS + i)`.
    pub const TIER_TOP: u16 = 60000;
    /// Rule slots per ClusterNetworkPolicy priority (the API allows 25 rules).
    pub const TIER_RULE_SLOTS: u16 = 25;
    /// The one priority of every tier rule's conjunctive clause flows, above
    /// every rule's decision (`conj_id`) flow, below the exemptions.
    pub const TIER_CLAUSE: u16 = 60100;
    /// Traffic between a node and its own pods: allowed.
    pub const NODE_TRAFFIC: u16 = 400;
    /// NetworkPolicy allow rules.
    pub const ALLOW: u16 = 300;
    /// Default deny of pods a policy isolates.
    pub const DEFAULT_DENY: u16 = 200;
    /// What no policy flow decides passes (to the next tier, then on).
    pub const PASS: u16 = 0;

    /// The flow priority of rule `index` of a ClusterNetworkPolicy of
    /// `priority` (0-1000, validated): earlier policies and rules first.
    pub const fn tier_rule(priority: u16, index: u16) -> u16 {
        TIER_TOP - (priority * TIER_RULE_SLOTS + index)
    }
}

/// `reg0` value of a packet from a pod port.
pub const CLASS_POD: u128 = 1;
/// `reg0` value of a packet from the gateway port.
pub const CLASS_GATEWAY: u128 = 2;
/// `reg0` value of a packet from a tunnel port (another node's pods).
pub const CLASS_TUNNEL: u128 = 3;
/// `ct_mark` of connections that entered the switch from the gateway: the
/// node's kernel (e.g. kube-proxy's DNAT) saw them, so their replies go back
/// through it to have the translation undone.
pub const MARK_VIA_GATEWAY: u8 = 1;
