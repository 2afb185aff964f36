//! End-to-end tests: the real `hangar` binary against real peers
//! (docker-registry, skopeo, umoci, runc) on 127.0.0.1.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod apply;
mod apps;
mod cdn;
mod cluster;
mod dashboard;
mod edge;
mod egress;
mod games;
mod guard;
mod image;
mod machine;
mod metrics;
mod operate;
mod registry;
mod setup;
mod support;
mod tenants;
