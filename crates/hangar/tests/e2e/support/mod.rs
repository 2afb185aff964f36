//! Shared helpers of the end-to-end tests, by concern:
//!
//! - [`browser`]: Debian's headless Chromium over WebDriver (fantoccini);
//! - [`harness`]: the real `hangar` binary (in a network namespace when
//!   asked), `hangar registry serve`, free ports and waits;
//! - [`peers`]: real peers (docker-registry, skopeo, openssl) on 127.0.0.1,
//!   a token server, and a small HTTP server for faults no real registry
//!   produces on demand;
//! - [`http`]: a tiny HTTP client and request reading for the fake servers;
//! - [`images`]: test images written as OCI layouts;
//! - [`tree`]: directory trees compared with what umoci unpacks.

#![allow(dead_code)]

pub mod browser;
pub mod harness;
pub mod http;
pub mod images;
pub mod peers;
pub mod tree;

pub use harness::*;
pub use http::*;
pub use images::*;
pub use peers::*;
pub use tree::*;
