//! The one error type of `hangar-oci`. Each variant's message names the thing
//! that was wrong (reference, digest, URL, path) and, where there is one, the
//! way out.

use std::path::PathBuf;

/// Everything that can go wrong while handling images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string that is not an image reference in Docker's grammar.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: String },

    /// A digest of an algorithm Hangar does not support.
    #[error("unsupported digest algorithm in {input:?}: use sha256 or sha512")]
    UnsupportedDigest { input: String },

    /// A string that is not a `sha256:<64 hex>` or `sha512:<128 hex>` digest.
    #[error("invalid digest {input:?}: expected sha256:<64 lowercase hex digits> or sha512:<128>")]
    InvalidDigest { input: String },

    /// A platform string that is not `os/arch[/variant]`.
    #[error("invalid platform {input:?}: expected os/arch[/variant], e.g. linux/amd64")]
    InvalidPlatform { input: String },

    /// The network request itself failed (refused, reset, TLS, cut short).
    #[error("{url}: {cause}")]
    Transport { url: String, cause: String },

    /// The registry answered with an unexpected status.
    #[error("{url}: registry answered {status}{detail}")]
    Status {
        url: String,
        status: u16,
        detail: String,
    },

    /// The registry wants credentials we do not have, or refused ours.
    #[error(
        "{url}: {reason}; pass --creds user:password or add the registry to ~/.docker/config.json"
    )]
    Unauthorized { url: String, reason: String },

    /// A manifest, index or config that cannot be understood.
    #[error("{what} {name}: {reason}")]
    Malformed {
        what: &'static str,
        name: String,
        reason: String,
    },

    /// Content that does not hash or measure to what it claims.
    #[error("blob {digest} from {source_name}: {reason}")]
    Verify {
        digest: String,
        source_name: String,
        reason: String,
    },

    /// The image index has no manifest for the platform asked for.
    #[error("{reference} has no image for platform {wanted}; it has: {available}; choose one with --platform")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },

    /// A layer entry that would escape the target directory or is otherwise refused.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// The image is not in the local store.
    #[error("image {0} is not in the local store; pull it with `hangar image pull {0}` or list images with `hangar image ls`")]
    NotFound(String),

    /// A blob the store should hold is missing.
    #[error("blob {0} is missing from the local store; pull the image again")]
    MissingBlob(String),

    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Bad input that does not fit any other variant.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
