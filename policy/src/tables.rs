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
pub const EGRESS_TABLE: u8 = 40;
pub const INGRESS_TABLE: u8 = 50;
pub const FORWARDING: u8 = 60;
pub const OUTPUT: u8 = 70;
/// Where traffic goes once egress policy allows it.
pub const AFTER_EGRESS: u8 = INGRESS_TABLE;
/// Where traffic goes once ingress policy allows it.
pub const AFTER_INGRESS: u8 = FORWARDING;

/// The tables whose drops are policy decisions (what the audit log reports).
pub const POLICY_TABLES: [TableId; 2] = [TableId(EGRESS_TABLE), TableId(INGRESS_TABLE)];

/// Priority bands inside a policy table.
pub mod priority {
    /// Exemptions decided elsewhere (Service traffic, the other node's half).
    pub const EXEMPT: u16 = 1000;
    /// Traffic between a node and its own pods: allowed.
    pub const NODE_TRAFFIC: u16 = 400;
    /// NetworkPolicy allow rules.
    pub const ALLOW: u16 = 300;
    /// Default deny of pods a policy isolates.
    pub const DEFAULT_DENY: u16 = 200;
    /// What no policy flow decides passes.
    pub const PASS: u16 = 0;
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
