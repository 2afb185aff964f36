//! `hangar-api`: the control plane of a node.
//!
//! It owns the state store ([`state::State`], SQLite under `$HANGAR_HOME`;
//! apps, releases and sealed secrets in [`apps`]), the Machines and Apps
//! API ([`server`], HTTP+JSON shaped like Fly's, behind the node's token or
//! an org's), health checks ([`checks`]), deploys and scaling ([`deploy`]),
//! and the reconcile loop ([`node::Node::reconcile`]) that makes the host
//! match the store: it records exits and OOM kills, applies restart
//! policies, and adopts machines after `hangar up` restarts.
//!
//! Key design decision: the state store is the source of truth and the
//! host's files are the evidence; `hangar up` keeps nothing in memory that a
//! `kill -9` would lose, so restarting it is always safe.
//!
//! This crate drives `hangar-machine` and must not touch namespaces, mounts
//! or cgroups itself.

pub mod app_toml;
pub mod apps;
pub mod checks;
pub mod config;
pub mod deploy;
pub mod error;
mod migrations;
pub mod node;
pub mod server;
pub mod state;

pub use config::MachineConfig;
pub use error::{Error, Result};
pub use node::Node;
pub use state::{Desired, Machine, MachineState, Placement, State};
