//! Where a datastore's bytes live: a local directory or an S3-compatible
//! object store, behind one small contract of whole objects.
//!
//! [`Backend`] is what every storage the datastore runs on must give:
//!
//! - **whole objects under `/`-separated keys**: `get` (bounded before
//!   reading), `head`, `put` (atomic and durable: a reader sees the old
//!   object or the new one, never a mix), `delete` (a missing object is
//!   not an error) and `list` of everything under a prefix;
//! - **conditional writes**: `put_new` creates an object only if the key
//!   is free (S3 `If-None-Match: *`; a hard link locally), and
//!   `put_if_version` replaces one only if it is still the version read
//!   (S3 `If-Match: <ETag>`; a content hash under a lock locally). These
//!   are what make a snapshot's commit and a [`lease`] safe between
//!   hosts that share nothing but the store;
//! - **the store's clock**: each object's `modified` time and
//!   [`Backend::now`] come from the store, so expiry and grace periods
//!   never compare one host's clock with another's.
//!
//! The contract is synchronous: the datastore runs its I/O on blocking
//! threads (as it does for files), and [`S3Backend`] drives the async
//! `object_store` client on a small runtime of its own, so it can be
//! called from any thread, inside or outside a Tokio runtime.
//!
//! `tests/backend.rs` (in the `tests` crate) runs one contract suite
//! against [`LocalBackend`] and against [`S3Backend`] on a moto server,
//! with injected 503s, 500s and connection resets.

pub mod lease;
mod local;
mod s3;

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use provider_api::Result;

pub use lease::{KeptLease, Lease, LeaseInfo};
pub use local::LocalBackend;
pub use s3::{S3Backend, S3Options};

/// An object's metadata, as its store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the backend's root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last write, by the store's clock.
    pub modified: SystemTime,
    /// The version a conditional write compares (an S3 ETag, a content
    /// hash locally).
    pub version: String,
}

/// The storage under a datastore (see the module docs for the contract).
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where it is, for messages: a directory or `s3://bucket/prefix`.
    fn location(&self) -> String;

    /// An object's bytes and metadata; `None` when it does not exist. An
    /// object larger than `limit` is refused (kind `Corrupt`) before its
    /// body is read.
    fn get(&self, key: &str, limit: u64) -> Result<Option<(Vec<u8>, ObjectMeta)>>;

    /// An object's metadata; `None` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// Create or replace an object, atomically and durably; returns its
    /// new version.
    fn put(&self, key: &str, data: Bytes) -> Result<String>;

    /// Create an object only if `key` is free: `Some(version)` when this
    /// call created it, `None` when it existed (its content untouched).
    fn put_new(&self, key: &str, data: Bytes) -> Result<Option<String>>;

    /// Replace an object only if its version is still `version`:
    /// `Some(new version)`, or `None` when it changed or vanished.
    fn put_if_version(&self, key: &str, data: Bytes, version: &str) -> Result<Option<String>>;

    /// Remove an object; a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Every object under `prefix` (a key prefix ending in `/`, or empty
    /// for all), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// The store's clock now (the time a write made now would record).
    fn now(&self) -> Result<SystemTime>;

    /// Names directly under `prefix` (a key prefix ending in `/`, or
    /// empty): objects and "directories" (common prefixes), sorted.
    fn children(&self, prefix: &str) -> Result<Vec<String>> {
        let mut v: Vec<String> = self
            .list(prefix)?
            .into_iter()
            .filter_map(|m| {
                m.key
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.split('/').next())
                    .map(str::to_owned)
            })
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// One request that reaches the store: a wrong location or bad
    /// credentials fail here with one clear error.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// Whether `key` is one this crate writes: non-empty `/`-separated
/// components of `[A-Za-z0-9_.%:+-]` (snapshot names are RFC 3339
/// times), none of them `.` or `..`.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.%:+-".contains(&b))
        })
}

fn check_key(key: &str) -> Result<()> {
    if is_valid_key(key) {
        Ok(())
    } else {
        Err(provider_api::Error::invalid(format!(
            "{key:?} is not a valid object key"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "a",
            ".chunks/0a/0abc",
            "scp/vm%2F1/2026-12-01T00:00:00Z-1/index.json",
        ] {
            assert!(is_valid_key(ok), "{ok}");
        }
        for bad in ["", "/a", "a/", "a//b", "../a", "a/./b", "a b", "a\\b", "ü"] {
            assert!(!is_valid_key(bad), "{bad}");
        }
    }
}
