//! Error type of the mock.
//!
//! Policy: every failure that a request can provoke is an [`Error`] value
//! (never a panic). Each variant says what went wrong with which object; the
//! platform front ends (for example [`crate::scp`]) map variants to the
//! platform's own error envelope and HTTP status.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the disk model, the inventory and the platform front ends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A named object does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Kind of object ("server", "snapshot", "base image", ...).
        kind: &'static str,
        /// Identifier that was looked up.
        id: String,
    },
    /// The request is malformed or out of range.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The object exists but is in a state that forbids the operation.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The operation is refused by the platform's rules (version, CBT state, ...).
    #[error("{0}")]
    Refused(String),
    /// I/O on a file of the state directory failed.
    #[error("i/o on {path}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A metadata file could not be parsed or written.
    #[error("metadata {path}")]
    Metadata {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// An injected fault fired.
    #[error("injected fault: {0}")]
    Injected(String),
    /// TLS material could not be created or loaded.
    #[error("tls: {0}")]
    Tls(String),
}

impl Error {
    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
