//! Integration tests of the policy compiler through the offline path: upstream
//! conformance cases, the example policy, flow-count bounds, incremental == full.

mod cnp_conformance;
mod conformance;
mod example;
mod incremental;
mod node_scope;
mod scale;
mod semantics;
mod staging;
