//! One error type for the crate: what failed (a member of the OVA, an
//! element of the descriptor, a disk), why, and a kind to act on.

use std::fmt;

/// What went wrong, for callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file is not what it claims (bad tar header, XML that does not
    /// parse, a size that does not add up).
    Malformed,
    /// Well-formed but refused as unsafe (links, paths leaving the
    /// archive, DTDs, disk images that open other files).
    Refused,
    /// Beyond a limit (descriptor size, member count, nesting depth).
    Limit,
    /// Something the import needs is missing (a referenced file, the
    /// descriptor).
    Missing,
    /// A manifest digest does not match the member.
    Checksum,
    /// Reading or writing a file failed.
    Io,
    /// A tool (qemu-img, qemu-nbd) failed.
    Tool,
}

/// An error naming what failed.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    /// What failed: `x.ova: member disk1.vmdk`, `descriptor: Disk vmdisk1`.
    context: String,
    message: String,
    #[source]
    source: Option<std::io::Error>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.context, self.message)
        }
    }
}

impl Error {
    /// An error of `kind` about `context`.
    pub fn new(kind: ErrorKind, context: impl Into<String>, message: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error while working on `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            context: context.into(),
            message: source.to_string(),
            source: Some(source),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Put `outer` in front of the context (`x.ova: descriptor: ...`).
    pub fn within(mut self, outer: &str) -> Self {
        self.context = if self.context.is_empty() {
            outer.to_owned()
        } else {
            format!("{outer}: {}", self.context)
        };
        self
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for provider_api::Error {
    fn from(e: Error) -> Self {
        let kind = match e.kind {
            ErrorKind::Io | ErrorKind::Tool => provider_api::ErrorKind::Io,
            ErrorKind::Missing => provider_api::ErrorKind::NotFound,
            ErrorKind::Checksum => provider_api::ErrorKind::Corrupt,
            ErrorKind::Refused => provider_api::ErrorKind::Refused,
            ErrorKind::Malformed | ErrorKind::Limit => provider_api::ErrorKind::InvalidInput,
        };
        provider_api::Error::new(kind, e.to_string())
    }
}
