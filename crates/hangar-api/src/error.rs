//! Errors of the control plane, each mapped to an HTTP status.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("state store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Machine(#[from] hangar_machine::Error),
    #[error(transparent)]
    Oci(#[from] hangar_oci::Error),
    #[error("{0}")]
    Internal(String),
    /// A request body over the cap.
    #[error("{0}")]
    TooLarge(String),
    /// The caller has too many requests in flight; retry after a second.
    #[error("{0}")]
    Busy(String),
    /// A path the API has, with a method it does not.
    #[error("{0}")]
    NotAllowed(String),
    /// A wait that ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// What the call needs cannot be reached now: the cluster's state
    /// store without quorum, or the node a machine runs on.
    #[error("{0}")]
    Unavailable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Invalid(_) => 400,
            Error::TooLarge(_) => 413,
            Error::Busy(_) => 429,
            Error::NotAllowed(_) => 405,
            Error::Timeout(_) => 408,
            Error::Unavailable(_) => 503,
            Error::Oci(hangar_oci::Error::InvalidReference { .. }) => 400,
            Error::Oci(hangar_oci::Error::NotFound(_)) => 404,
            Error::Machine(hangar_machine::Error::Invalid(_)) => 400,
            _ => 500,
        }
    }
}

impl From<crate::client::ClientError> for Error {
    /// Another node's refusal, as this node answers it (the same status).
    fn from(e: crate::client::ClientError) -> Error {
        let text = e.to_string();
        match e.status() {
            Some(404) => Error::NotFound(text),
            Some(409) => Error::Conflict(text),
            Some(400) => Error::Invalid(text),
            Some(413) => Error::TooLarge(text),
            Some(429) => Error::Busy(text),
            Some(405) => Error::NotAllowed(text),
            Some(408) => Error::Timeout(text),
            Some(503) | None => Error::Unavailable(text),
            Some(_) => Error::Internal(text),
        }
    }
}
