//! `hangar-oci`: OCI images without a Docker daemon.
//!
//! It owns image [`Reference`]s, the registry [`client`], the local
//! content-addressed [`Store`], layer [`unpack`]ing, image [`build`]ing and the
//! OCI image [`layout`] used by `save`/`load`.
//!
//! Key design decision: the store is the only place images live, and content
//! enters it only through verification. Every blob's size and digest are
//! checked while it streams into a temp file, and it becomes visible by an
//! atomic rename; an image name is written last. A crash or a bad registry
//! therefore never leaves anything half-visible. A layer's DiffID is checked
//! wherever the layer is decompressed (unpack), so decompression happens once.
//!
//! This crate must not know about machines, apps or the control plane; it
//! never runs image content and never writes outside the directories it is
//! given.

#![forbid(unsafe_code)]

pub mod auth;
pub mod build;
pub mod client;
pub mod digest;
pub mod error;
pub mod layer;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod store;
pub mod unpack;

pub use digest::{Algorithm, Digest};
pub use error::{Error, Result};
pub use manifest::{Descriptor, ImageConfig, Index, Manifest, Platform};
pub use reference::Reference;
pub use store::{Image, ImageRecord, Store};
