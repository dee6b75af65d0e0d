//! The contract's error type.
//!
//! Policy (shared by every crate of the workspace):
//! - an error has a [`ErrorKind`] that callers match on, a message that says
//!   what failed in the words of the domain, and a [`Context`] naming the
//!   guest, volume, offset and platform API call it concerns;
//! - [`Error::is_retryable`] tells whether trying again can help (a timeout,
//!   a busy platform) or not (bad input, a missing object, a refused
//!   operation);
//! - a message never repeats its source: the source is reachable through
//!   [`std::error::Error::source`] and printed by the reporter.

use std::fmt;

/// What kind of failure this is. New kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The provider or target does not offer this ability (containers,
    /// incrementals, restore in place, ...).
    Unsupported,
    /// The caller asked for something invalid (bad archive name, unknown
    /// volume, out-of-range offset).
    InvalidInput,
    /// A guest, volume, snapshot, base image or archive does not exist.
    NotFound,
    /// The platform refused the operation (revert mode, quota reached,
    /// quick recovery of a linked VM, ...).
    Refused,
    /// The platform's API answered with an error or with something that
    /// does not parse.
    Platform,
    /// Change tracking cannot be used (expired CBT, invalid checkpoint).
    ChangeTrackingLost,
    /// Reading or writing disk data failed (NBD, file, HTTP transfer).
    DataPath,
    /// Stored data is corrupt or inconsistent.
    Corrupt,
    /// A lease, lock or resource was lost while in use.
    LeaseLost,
    /// An operation did not finish in time.
    Timeout,
    /// Authentication with the platform failed.
    Auth,
    /// Local I/O failed.
    Io,
    /// Anything else.
    Other,
}

impl ErrorKind {
    fn default_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout | ErrorKind::DataPath | ErrorKind::Io
        )
    }
}

/// Where an error happened: every field is optional, set those that apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Guest id.
    pub guest: Option<String>,
    /// Volume (device name) of the guest.
    pub volume: Option<String>,
    /// Byte offset in the volume.
    pub offset: Option<u64>,
    /// Platform API call, e.g. `GET /janus/20180725/base-images`.
    pub api_call: Option<String>,
}

impl Context {
    fn is_empty(&self) -> bool {
        self.guest.is_none()
            && self.volume.is_none()
            && self.offset.is_none()
            && self.api_call.is_none()
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(g) = &self.guest {
            write!(f, "guest {g}")?;
            sep = ", ";
        }
        if let Some(v) = &self.volume {
            write!(f, "{sep}volume {v}")?;
            sep = ", ";
        }
        if let Some(o) = self.offset {
            write!(f, "{sep}offset {o}")?;
            sep = ", ";
        }
        if let Some(c) = &self.api_call {
            write!(f, "{sep}call {c}")?;
        }
        Ok(())
    }
}

/// The error of the provider contract (one pointer wide).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(Box<Inner>);

#[derive(Debug, thiserror::Error)]
#[error("{message}{}", if context.is_empty() { String::new() } else { format!(" ({context})") })]
struct Inner {
    kind: ErrorKind,
    message: String,
    context: Context,
    retryable: bool,
    /// The platform's own error code (`ID.1001`, `3005`), for callers that
    /// act on it; the message names it for people, this is for code.
    platform_code: Option<String>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with the contract's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message saying what failed.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            context: Context::default(),
            retryable: kind.default_retryable(),
            platform_code: None,
            source: None,
        }))
    }

    /// [`ErrorKind::Unsupported`]: `what` names the missing ability.
    pub fn unsupported(what: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Unsupported, format!("{what} is not supported"))
    }

    /// [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, message)
    }

    /// [`ErrorKind::Other`].
    pub fn other(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Other, message)
    }

    /// Record the platform's error code (not shown: the message names it).
    pub fn with_platform_code(mut self, code: impl Into<String>) -> Self {
        self.0.platform_code = Some(code.into());
        self
    }

    /// The platform's error code, when the error came from one.
    pub fn platform_code(&self) -> Option<&str> {
        self.0.platform_code.as_deref()
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.source = Some(Box::new(source));
        self
    }

    /// Name the guest.
    pub fn guest(mut self, guest: impl fmt::Display) -> Self {
        self.0
            .context
            .guest
            .get_or_insert_with(|| guest.to_string());
        self
    }

    /// Name the volume.
    pub fn volume(mut self, volume: impl fmt::Display) -> Self {
        self.0
            .context
            .volume
            .get_or_insert_with(|| volume.to_string());
        self
    }

    /// Name the offset.
    pub fn offset(mut self, offset: u64) -> Self {
        self.0.context.offset.get_or_insert(offset);
        self
    }

    /// Name the platform API call.
    pub fn api_call(mut self, call: impl fmt::Display) -> Self {
        self.0
            .context
            .api_call
            .get_or_insert_with(|| call.to_string());
        self
    }

    /// Override whether retrying can help.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.0.retryable = retryable;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Where it happened.
    pub fn context(&self) -> &Context {
        &self.0.context
    }

    /// Whether trying the same operation again can help.
    pub fn is_retryable(&self) -> bool {
        self.0.retryable
    }

    /// The whole chain (`message (context): source: source's source`), for
    /// logs and `backup_cleanup`'s error text.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            out.push_str(": ");
            out.push_str(&s.to_string());
            src = s.source();
        }
        out
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, "I/O failed").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_platform_code_is_for_code_not_for_the_report() {
        let e = Error::new(ErrorKind::Auth, "session expired").with_platform_code("ID.1001");
        assert_eq!(e.platform_code(), Some("ID.1001"));
        assert!(!e.report().contains("ID.1001"), "{}", e.report());
        assert_eq!(Error::other("x").platform_code(), None);
    }

    #[test]
    fn display_names_context_and_report_adds_source() {
        let e = Error::new(ErrorKind::DataPath, "reading the snapshot failed")
            .guest("vm-1")
            .volume("sys")
            .offset(4096)
            .with_source(std::io::Error::other("EIO"));
        assert_eq!(
            e.to_string(),
            "reading the snapshot failed (guest vm-1, volume sys, offset 4096)"
        );
        assert!(e.report().ends_with(": EIO"));
        assert!(e.is_retryable());
        assert!(!Error::unsupported("containers").is_retryable());
    }

    #[test]
    fn first_context_wins() {
        let e = Error::other("x").guest("inner").guest("outer");
        assert_eq!(e.context().guest.as_deref(), Some("inner"));
    }
}
