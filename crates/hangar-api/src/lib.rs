//! `hangar-api`: the control plane of a node, assembled as a library.
//!
//! It owns the state store ([`store::Store`]: revisions, compare-and-set
//! and a change feed; [`store::SqliteStore`] keeps it in SQLite under
//! `$HANGAR_HOME`, its schema in numbered migrations; the types of apps,
//! releases and secrets, and the sealing, in [`apps`]), the typed domain
//! ([`config`]: the Fly-shaped machine config, every closed set an enum),
//! the Machines and Apps API ([`server`], behind the node's token or an
//! org's), health checks ([`checks`]), deploys and scaling ([`deploy`]),
//! the edge's routes and scale to zero ([`routing`]), the egress proxy's
//! policy ([`egress`]), `hangar.toml` ([`app_toml`]), and the node's loop
//! ([`node::Node::tick`]: reconcile, egress, idle stops, routes) that makes
//! the host match the store.
//!
//! Its seams: the store is a [`store::Store`] ([`store::SqliteStore`] for
//! one node, [`store::EtcdStore`] for a cluster's shared state); the host is a
//! [`hangar_machine::Driver`] (runc and QEMU in production, a recording
//! fake in the tests of [`node`] and [`deploy`], which need no root); the
//! edge is a [`routing::Ingress`] and the egress proxy an
//! [`egress::EgressControl`], both implemented by the binary.
//!
//! Key design decision: the state store is the source of truth and the
//! host's files are the evidence; `hangar up` keeps nothing in memory that a
//! `kill -9` would lose, so restarting it is always safe.
//!
//! This crate drives `hangar-machine` through the driver and must not touch
//! namespaces, mounts or cgroups itself; it knows the edge and the egress
//! proxy only through its traits (no dependency on either crate).

#![forbid(unsafe_code)]

/// A closed set of names (a machine state, a driver, a strategy, ...): an
/// enum that reads and writes its variants as kebab-case names in JSON,
/// TOML and text (`Display`, `FromStr`, `&'static str`), so a bad value is
/// refused naming the choices.
#[macro_export]
macro_rules! closed_set {
    ($(#[$meta:meta])* pub enum $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash,
            serde::Serialize, serde::Deserialize,
            strum::Display, strum::EnumString, strum::IntoStaticStr,
        )]
        #[serde(rename_all = "kebab-case")]
        #[strum(serialize_all = "kebab-case")]
        pub enum $name { $($body)* }
    };
}

pub mod alerts;
pub mod app_toml;
pub mod apps;
pub mod checks;
pub mod client;
pub mod cluster;
pub mod config;
pub mod deploy;
pub mod dns;
pub mod egress;
pub mod error;
pub mod metrics;
pub mod node;
pub mod observe;
pub mod purge;
pub mod routing;
pub mod server;
pub mod store;
pub mod wire;

pub use config::MachineConfig;
pub use error::{Error, Result};
pub use node::Node;
pub use store::{Desired, EtcdStore, Machine, MachineState, Placement, SqliteStore, Store};
