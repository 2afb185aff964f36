//! `.internal` DNS: the names of an org's apps and machines (Fly's names:
//! `<app>.internal`, `<region>.<app>.internal`, `<id>.vm.<app>.internal`,
//! `top<N>.nearest.of.<app>.internal`, and TXT `_apps.internal`,
//! `vms.<app>.internal`, `regions.<app>.internal`), answered to the
//! machines of that org on its private network.
//!
//! Owns the wire side: [`Zone`] (what the names say, and the answer to one
//! query) and [`Server`] (a node's sockets, one set per org net). It must
//! not know the state store: the control plane builds a [`Zone`] from its
//! read model whenever that changes and hands it over whole. It never
//! recurses and answers nothing outside `.internal` (REFUSED): machines
//! reach the outside through the egress proxy, which resolves names itself,
//! so DNS is no way out.
//!
//! Messages are read and written with `hickory-proto`; the serving loop is
//! this crate's own (a thread per socket, no async runtime, no task per
//! query): a query is a lookup in a map, so the cost that matters is the
//! syscalls.

mod server;
mod zone;

pub use server::{Counts, Error, Server, RCODES};
pub use zone::{Asker, Instance, Transport, Zone, MAX_UDP, TTL};

#[cfg(test)]
mod tests;
