//! vswitchd's library: TAP ports, packet threads and the control plane around the
//! datapath and the policy compiler, and the CNI plugin.
//!
//! `sys` holds the kernel calls (the crate's only `unsafe`), `tap` the TAP devices,
//! `switch` the running switch, `daemon` vswitchd (config, manifests, state,
//! control socket), `control` the control-socket protocol, `cni` the plugin,
//! `audit` the audit log of connections, `metrics` the Prometheus endpoint.

pub mod audit;
pub mod cni;
pub mod config;
pub mod control;
pub mod daemon;
pub mod kubernetes;
pub mod metrics;
pub mod switch;
pub mod sys;
pub mod tap;

pub use switch::Switch;
pub use tap::Tap;
