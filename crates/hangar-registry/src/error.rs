//! Errors: [`Error`] for the registry's own operations, [`ApiError`] for
//! answers in the distribution spec's JSON error form.

use std::path::PathBuf;

use hyper::StatusCode;

/// What can fail inside the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Oci(#[from] hangar_oci::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// `gc` needs the registry stopped.
    #[error("the registry is running (it holds the store lock); stop `hangar registry serve` and run gc again")]
    Busy,

    /// A token command named a token that does not exist.
    #[error("no token with id {0:?}; list them with `hangar registry token list`")]
    NoSuchToken(String),

    /// Bad input to a registry command.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error answer: HTTP status plus a spec error code and message.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// What was refused and why, for people (clients print it); the
    /// message stands in where nothing more is known.
    pub detail: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> ApiError {
        self.detail = Some(detail.into());
        self
    }

    /// The one answer for "no such repository" and "not yours to read":
    /// identical, so nothing leaks about other orgs.
    pub fn name_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known to registry",
        )
        .with_detail(
            "no repository of this name that these credentials may read: an org token reads its own org's repositories (<org>/<repo>) and public ones",
        )
    }

    /// A refused write; `why` says what the credentials may do instead.
    pub fn denied(why: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "DENIED",
            "requested access to the resource is denied",
        )
        .with_detail(why)
    }

    pub fn blob_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        )
    }

    pub fn manifest_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        )
    }

    pub fn upload_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            "blob upload unknown to registry",
        )
    }

    pub fn digest_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }

    pub fn unsupported() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the operation is unsupported",
        )
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            format!("internal error: {e}"),
        )
    }

    pub fn body(&self) -> String {
        let detail = self.detail.as_deref().unwrap_or(&self.message);
        serde_json::json!({"errors": [{"code": self.code, "message": self.message, "detail": detail}]}).to_string()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<hangar_oci::Error> for ApiError {
    fn from(e: hangar_oci::Error) -> ApiError {
        ApiError::internal(e)
    }
}
