//! Why the datapath drops a packet: the reasons it counts, with their names
//! (metrics labels, `flowctl stats`).

/// Why a packet was dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum DropReason {
    /// The frame failed to parse (truncated or malformed headers).
    Malformed,
    /// A table had no matching flow.
    NoMatch,
    /// A flow decided to drop it (policy, spoofguard, invalid conntrack state...).
    Flow,
    /// Resubmit or recirculation limits were exceeded.
    LoopLimit,
    /// The conntrack table was full when committing a new connection.
    CtFull,
    /// The connection's originator (pod or namespace) was at its limit.
    CtLimit,
    /// A translated connection's new ends belonged to another connection.
    NatClash,
    /// A fragment that cannot be reassembled (overlapping, too small, past a
    /// memory limit) or a datagram that did not complete in time.
    Fragment,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::Malformed,
        DropReason::NoMatch,
        DropReason::Flow,
        DropReason::LoopLimit,
        DropReason::CtFull,
        DropReason::CtLimit,
        DropReason::Fragment,
        DropReason::NatClash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoMatch => "no_match",
            DropReason::Flow => "flow",
            DropReason::LoopLimit => "loop_limit",
            DropReason::CtFull => "ct_full",
            DropReason::CtLimit => "ct_limit",
            DropReason::Fragment => "fragment",
            DropReason::NatClash => "nat_clash",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}
