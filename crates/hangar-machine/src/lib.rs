//! `hangar-machine`: everything about machines that touches the host.
//!
//! It owns layer [`snapshot`]s (each layer unpacked once, keyed by ChainID),
//! the [`Driver`] trait the control plane calls (with a recording fake in
//! [`driver::fake`] for tests without root), and the drivers behind one
//! [`runtime::Runtime`] that implements it (containers: runc bundles;
//! micro-VMs: QEMU microvm, see [`vm`]), one shim per machine (logs, exit
//! codes, OOM kills), and the private [`network`] (bridge, namespaces or
//! taps, addresses).
//!
//! Key design decision: isolation is done by Debian's `runc`, a maintained
//! OCI runtime, rather than hand-rolled namespace code; it handles cgroup v1,
//! hybrid and v2 hosts alike. Hangar writes the bundle and supervises runc
//! through a small shim process per machine that outlives `hangar up`, and
//! whose files (pid, exit code, log) let a restarted node adopt machines.
//!
//! This crate does not decide what should run (that is `hangar-api`'s
//! reconcile loop) and knows nothing of HTTP.

pub mod bundle;
pub mod console;
mod container;
pub mod dir;
pub mod driver;
pub mod error;
pub mod network;
pub mod overlay;
pub mod runtime;
pub mod shim;
pub mod snapshot;
pub mod usage;
pub mod vm;

pub use driver::{Driver, Exec};
pub use error::{Error, Result};
pub use runtime::{check_host, Created, Exit, MachineSpec, ProcState, Runtime, VmInfo};
