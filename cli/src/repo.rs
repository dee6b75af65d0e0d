//! Where a datastore is: a directory, or `s3://bucket/prefix` on S3 or an
//! S3-compatible store.
//!
//! S3 settings come from the usual environment: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, and
//! `AWS_ENDPOINT_URL` for a store other than AWS (an `http://` endpoint is
//! allowed as given). `VMBACKUP_LEASE_TTL` (seconds, default 120) sets how
//! long a crashed host's leases block others.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use datastore::Datastore;
use datastore::backend::{Backend, S3Backend, S3Options};

/// A datastore's location.
pub enum Repo {
    /// A local directory (the path given).
    Dir,
    /// An object store.
    S3(Arc<dyn Backend>),
}

impl Repo {
    /// Parse `-d`'s value.
    pub fn parse(path: &Path) -> Result<Repo> {
        let text = path.to_string_lossy();
        if !text.starts_with("s3://") {
            return Ok(Repo::Dir);
        }
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok()
            .filter(|e| !e.is_empty());
        let options = S3Options {
            url: text.into_owned(),
            allow_http: endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://")),
            endpoint,
            ..S3Options::default()
        };
        let backend =
            S3Backend::new(&options).with_context(|| format!("datastore {}", options.url))?;
        Ok(Repo::S3(Arc::new(backend)))
    }
}

/// The settings of an object-store datastore handle.
pub fn settings(ds: Datastore) -> Datastore {
    match std::env::var("VMBACKUP_LEASE_TTL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(secs) => ds.with_lease_ttl(Duration::from_secs(secs)),
        None => ds,
    }
}
