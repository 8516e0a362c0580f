//! vswitchd's library: the switch around the datapath and the policy compiler,
//! and the CNI plugin.
//!
//! Control plane: `realiser` (cluster state and ports -> published tables),
//! fed by `manifests` or `kubernetes`; `daemon` (start-up, pods' ports),
//! `server` (the control socket), `gateway` (the port towards the node),
//! `state` (files kept across restarts), `config`. Data plane: `forwarder`
//! (packet threads) over `port`s: `tap` devices and the `tunnel`. Around them:
//! `audit` (the audit log), `recent` (the recent-connections summary),
//! `web` (the live web view), `metrics` (Prometheus), `cni` (the plugin), and
//! `sys` (the kernel calls, the crate's only `unsafe`).

pub mod audit;
pub mod balance;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod endpoint;
pub mod forwarder;
pub mod gateway;
pub mod kubernetes;
pub mod manifests;
pub mod metrics;
pub mod polling;
pub mod port;
pub mod realiser;
pub mod recent;
pub mod server;
pub mod snoop;
pub mod state;
pub mod sys;
pub mod tap;
pub mod timefmt;
pub mod tunnel;
pub mod web;
pub mod whatif;

pub use forwarder::Forwarder;
pub use realiser::Realiser;
pub use tap::Tap;
