//! vswitchd's library: TAP ports, packet threads and the control plane around the
//! datapath and the policy compiler.
//!
//! `sys` holds the kernel calls (the crate's only `unsafe`), `tap` the TAP devices,
//! `switch` the running switch.

pub mod switch;
pub mod sys;
pub mod tap;

pub use switch::Switch;
pub use tap::Tap;
