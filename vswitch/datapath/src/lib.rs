//! The vswitch datapath: everything a packet meets, with no I/O.
//!
//! Frames are parsed into a fixed-size [`FlowKey`] ([`key`]), looked up in a
//! per-thread [`MicroflowCache`] ([`cache`]) and on a miss run through OpenFlow-style
//! tables ([`table`], [`classify`], [`pipeline`]) with connection tracking
//! ([`conntrack`]). The control plane edits [`FlowTables`] and publishes immutable
//! snapshots; packet threads drive a [`Worker`] each. Nothing here opens a file
//! descriptor, reads a clock or spawns a thread: time is a parameter ([`Time`]).

pub mod cache;
pub mod cache_mask;
pub mod classify;
pub mod conntrack;
pub mod consulted;
mod exec;
pub mod field;
pub mod flow;
pub mod group;
pub mod ipf;
pub mod key;
pub mod nat;
pub mod nd;
pub mod ofctl;
pub mod pipeline;
mod prefetch;
pub mod reason;
pub mod reject;
mod revalidate;
pub mod table;
pub mod time;
pub mod trace;
pub mod worker;

pub use cache::{CacheStats, MicroflowCache};
pub use classify::FlowId;
pub use conntrack::{ConnInfo, Conntrack, CtConfig};
pub use field::{Field, Match, MatchKey};
pub use flow::{Action, Cookie, FlowEntry, FlowError, FlowIdentity, TableId, Zone};
pub use key::{FlowKey, PortNo, parse};
pub use ofctl::{OfctlError, parse_flow};
pub use table::{FlowTables, Snapshot};
pub use time::Time;
pub use trace::{CtSource, Trace, trace};
pub use worker::{Datapath, DatapathConfig, DropReason, FlowStat, Verdict, Worker};
