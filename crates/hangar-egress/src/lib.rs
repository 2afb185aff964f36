//! `hangar-egress`: the egress proxy.
pub mod ip;
