//! `hangar-egress`: the egress proxy.
pub mod acl;
pub mod ip;
