//! The vswitch policy compiler: Kubernetes NetworkPolicy -> flow entries.
//!
//! [`model`] holds the cluster (namespaces, pods, nodes, validated policies, built
//! from k8s-openapi types with the API server's validation); [`compile`] turns it
//! into conjunctive flows for the policy tables and keeps them up to date one change
//! at a time; [`pipeline`] adds the base tables the switch runs around them;
//! [`manifest`] loads YAML manifests; [`explain`] turns a datapath trace into a
//! verdict naming the rule. No I/O except reading manifest files in [`manifest`].

pub mod cluster;
pub mod cnp;
pub mod compile;
pub mod cookie;
pub mod error;
pub mod explain;
pub mod manifest;
pub mod mode;
pub mod model;
pub mod names;
pub mod offline;
pub mod pipeline;
pub mod probe;
pub mod selector;
pub mod services;
pub mod staging;
pub mod status;
pub mod strict;
pub mod synthetic;
pub mod tables;

pub use cluster::Cluster;
pub use compile::{Change, Compiler, FlowDiff, Provenance};
pub use error::{Error, FieldError};
pub use model::{Direction, ObjectKey, Policy, Protocol};
