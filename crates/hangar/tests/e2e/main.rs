//! End-to-end tests: the real `hangar` binary against real peers
//! (docker-registry, skopeo, umoci) on 127.0.0.1.

mod image;
mod registry;
mod support;
