//! `hangar-metrics`: what metrics need on a node, apart from who exposes
//! them.
//!
//! It owns PromQL confined to one org ([`promql`]: the `org` matcher put
//! on every selector and checked by parsing the result again), running
//! Debian's Prometheus for the node ([`prometheus`]: configuration, data
//! under the node's home, restarts), the shape of the node's HTTP
//! service discovery ([`TargetGroup`]), and dashboards: the Grafana JSON
//! subset they are written in ([`dashboard`], the shipped files under
//! `dashboards/`) and their panels drawn as SVG ([`chart`]).
//!
//! It must not decide which machines are scraped or who may query: the
//! control plane (`hangar-api`) lists the targets and authenticates the
//! caller; this crate only makes the query safe to send and keeps
//! Prometheus running.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod chart;
pub mod dashboard;
pub mod exposition;
pub mod prometheus;
pub mod promql;

/// One group of Prometheus's HTTP service discovery: addresses and the
/// labels every series scraped from them gets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// The labels the node sets on every series of an app's machines; the
/// app's own labels of these names are kept as `exported_<name>`.
pub const TARGET_LABELS: [&str; 5] = ["org", "app", "region", "node", "instance"];
