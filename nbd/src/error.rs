//! The one error type of the crate.
//!
//! Policy: an [`Error`] carries a [`ErrorKind`] (what went wrong), context
//! (export name, command, offset) and, where a lower layer failed, that
//! layer's error as its `source()`. The message of an error never repeats
//! its source; print the chain to see both. [`Error::is_retryable`] says
//! whether a new attempt (usually on a new connection) can help.

use std::fmt;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Linux errno values used on the wire (the NBD protocol fixes these numbers).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// Symbolic name of an NBD errno, for messages.
    pub fn name(errno: u32) -> &'static str {
        match errno {
            EPERM => "EPERM",
            EIO => "EIO",
            ENOMEM => "ENOMEM",
            EINVAL => "EINVAL",
            ENOSPC => "ENOSPC",
            EOVERFLOW => "EOVERFLOW",
            ENOTSUP => "ENOTSUP",
            ESHUTDOWN => "ESHUTDOWN",
            _ => "unknown errno",
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The peer broke the NBD protocol (bad magic, a field out of range, a
    /// reply for an unknown cookie, an oversize chunk, a truncated message).
    /// The connection is unusable afterwards.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The transport failed (see `source()`).
    #[error("I/O error")]
    Io,
    /// TLS could not be set up or the peer could not be verified.
    #[error("TLS failure: {0}")]
    Tls(String),
    /// The server requires TLS but the client did not ask for it.
    #[error("server requires TLS")]
    TlsRequired,
    /// The server answered a request with an error.
    #[error("server error {} ({}){}", errno, errno::name(*errno), fmt_msg(message))]
    Server {
        /// Errno as sent on the wire.
        errno: u32,
        /// Human-readable message the server sent, possibly empty.
        message: String,
    },
    /// The export does not exist on the server.
    #[error("export not found")]
    ExportNotFound,
    /// A request lies (partly) outside the export.
    #[error("range {offset}+{length} is outside the export of {size} bytes")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        length: u64,
        /// Size of the export.
        size: u64,
    },
    /// The operation is not supported by the peer or the export.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The caller passed an invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The connection is closed (or was closed because of an earlier error).
    #[error("disconnected{}", fmt_msg(.0))]
    Disconnected(String),
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

/// The error type of this crate: a kind plus context.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    export: Option<String>,
    command: Option<&'static str>,
    offset: Option<u64>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of this kind without context.
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            export: None,
            command: None,
            offset: None,
            source: None,
        }
    }

    /// A protocol violation by the peer.
    pub fn protocol(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol(msg.into()))
    }

    /// An unsupported operation.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported(msg.into()))
    }

    /// An invalid argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument(msg.into()))
    }

    /// A server-reported errno.
    pub fn server(errno: u32, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Server {
            errno,
            message: message.into(),
        })
    }

    /// A TLS failure.
    pub fn tls(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Tls(msg.into()))
    }

    /// The kind of error.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The export the error happened on, if known.
    pub fn export(&self) -> Option<&str> {
        self.export.as_deref()
    }

    /// The NBD command that failed, if any (e.g. `"READ"`).
    pub fn command(&self) -> Option<&'static str> {
        self.command
    }

    /// The offset the error is about, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The wire errno a server reports for this error.
    pub fn errno(&self) -> u32 {
        match &self.kind {
            ErrorKind::Server { errno, .. } => *errno,
            ErrorKind::OutOfRange { .. } | ErrorKind::InvalidArgument(_) => errno::EINVAL,
            ErrorKind::Unsupported(_) => errno::ENOTSUP,
            ErrorKind::Disconnected(_) => errno::ESHUTDOWN,
            ErrorKind::Io => {
                let os = self
                    .source
                    .as_ref()
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .and_then(|e| e.raw_os_error());
                match os.map(|e| e as u32) {
                    Some(e @ (errno::EPERM | errno::ENOSPC | errno::ENOMEM | errno::EINVAL)) => e,
                    Some(30) => errno::EPERM,  // EROFS
                    Some(27) => errno::ENOSPC, // EFBIG
                    _ => errno::EIO,
                }
            }
            _ => errno::EIO,
        }
    }

    /// Whether retrying the operation (on a fresh connection for transport
    /// errors) can succeed.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Io | ErrorKind::Disconnected(_) => true,
            ErrorKind::Server { errno, .. } => {
                matches!(
                    *errno,
                    errno::ESHUTDOWN | errno::ENOMEM | 11 /* EAGAIN */
                )
            }
            _ => false,
        }
    }

    /// Attach the export name.
    pub fn with_export(mut self, export: impl Into<String>) -> Self {
        if self.export.is_none() {
            self.export = Some(export.into());
        }
        self
    }

    /// Attach the command name.
    pub fn with_command(mut self, command: &'static str) -> Self {
        if self.command.is_none() {
            self.command = Some(command);
        }
        self
    }

    /// Attach an offset (kept if one is already set).
    pub fn with_offset(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Attach a source error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// A copy without the source (sources are not `Clone`); used to fail
    /// many waiters with the same cause.
    pub(crate) fn duplicate(&self) -> Self {
        Error {
            kind: self.kind.clone(),
            export: self.export.clone(),
            command: self.command,
            offset: self.offset,
            source: None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        let mut sep = " (";
        if let Some(c) = self.command {
            write!(f, "{sep}command {c}")?;
            sep = ", ";
        }
        if let Some(o) = self.offset {
            write!(f, "{sep}offset {o}")?;
            sep = ", ";
        }
        if let Some(e) = &self.export {
            write!(f, "{sep}export {e:?}")?;
            sep = ", ";
        }
        if sep == ", " {
            write!(f, ")")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return Error::new(ErrorKind::Disconnected("peer closed the connection".into()))
                .with_source(e);
        }
        Error::new(ErrorKind::Io).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_context_and_no_source_text() {
        let e = Error::server(errno::EIO, "boom")
            .with_command("READ")
            .with_offset(4096)
            .with_export("vm");
        assert_eq!(
            e.to_string(),
            "server error 5 (EIO): boom (command READ, offset 4096, export \"vm\")"
        );
        let io = Error::from(std::io::Error::other("socket gone"));
        assert_eq!(io.to_string(), "I/O error");
        assert!(io.is_retryable());
        assert!(!e.is_retryable());
    }
}
