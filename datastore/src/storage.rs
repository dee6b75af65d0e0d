//! The datastore's file operations on its storage: a local directory
//! (files, renames and `flock`s, as the crate docs describe) or a
//! [`Backend`] object store (objects, leases). Paths of an object-store
//! datastore are relative (its root is empty): a path is its object key.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use provider_api::{Error, ErrorKind, Result};

use crate::backend::{Backend, KeptLease};
use crate::util::{atomic_write, io_err, read_bounded};

/// Where a datastore's files live.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    /// Files under the datastore's root directory.
    Local,
    /// Objects of a backend; paths are keys.
    Object(Arc<dyn Backend>),
}

/// A lock held: a `flock`ed file (local) or a kept lease (object store).
/// Released when dropped.
#[derive(Debug)]
pub(crate) enum Held {
    /// Held while the file is open.
    #[allow(dead_code, reason = "held for its lock, never read")]
    File(fs::File),
    /// Renewed until dropped, then released.
    #[allow(dead_code, reason = "held for its lease, never read")]
    Lease(KeptLease),
}

pub(crate) fn key_of(path: &Path) -> Result<String> {
    path.to_str()
        .map(|s| s.trim_start_matches('/').to_owned())
        .ok_or_else(|| Error::invalid(format!("{} is not a valid object key", path.display())))
}

impl Storage {
    /// The object backend, if any.
    pub(crate) fn object(&self) -> Option<&Arc<dyn Backend>> {
        match self {
            Storage::Local => None,
            Storage::Object(b) => Some(b),
        }
    }

    /// A whole file, refused beyond `limit` bytes; `NotFound` when missing.
    pub(crate) fn read(&self, path: &Path, limit: u64) -> Result<Vec<u8>> {
        match self {
            Storage::Local => read_bounded(path, limit),
            Storage::Object(b) => {
                let key = key_of(path)?;
                match b.get(&key, limit)? {
                    Some((data, _)) => Ok(data),
                    None => Err(Error::new(
                        ErrorKind::NotFound,
                        format!("{}/{key} does not exist", b.location()),
                    )),
                }
            }
        }
    }

    /// Replace a file atomically and durably.
    pub(crate) fn write_atomic(&self, path: &Path, data: Vec<u8>) -> Result<()> {
        match self {
            Storage::Local => atomic_write(path, &data),
            Storage::Object(b) => b.put(&key_of(path)?, Bytes::from(data)).map(|_| ()),
        }
    }

    /// Write a new file in a directory being prepared (a snapshot's
    /// temporary directory), durably; the directory itself is published
    /// (renamed, or its files copied) later.
    pub(crate) fn write_new(&self, path: &Path, data: &[u8]) -> Result<()> {
        match self {
            Storage::Local => {
                use std::io::Write;
                let res = (|| {
                    let mut f = crate::util::create_private(path)?;
                    f.write_all(data)?;
                    f.sync_all()
                })();
                res.map_err(|e| io_err("writing", path, e))
            }
            Storage::Object(b) => b
                .put(&key_of(path)?, Bytes::copy_from_slice(data))
                .map(|_| ()),
        }
    }

    /// Whether a file exists.
    pub(crate) fn exists(&self, path: &Path) -> Result<bool> {
        match self {
            Storage::Local => Ok(path.exists()),
            Storage::Object(b) => Ok(b.head(&key_of(path)?)?.is_some()),
        }
    }

    /// Remove a file (a missing one is fine).
    pub(crate) fn remove(&self, path: &Path) -> Result<()> {
        match self {
            Storage::Local => match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("removing", path, e)),
            },
            Storage::Object(b) => b.delete(&key_of(path)?),
        }
    }

    /// Remove a directory and everything under it (a missing one is fine).
    pub(crate) fn remove_tree(&self, dir: &Path) -> Result<()> {
        match self {
            Storage::Local => match fs::remove_dir_all(dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("removing", dir, e)),
            },
            Storage::Object(b) => {
                for m in b.list(&format!("{}/", key_of(dir)?))? {
                    b.delete(&m.key)?;
                }
                Ok(())
            }
        }
    }

    /// Names directly under a directory (files and directories), sorted;
    /// empty when it does not exist.
    pub(crate) fn children(&self, dir: &Path) -> Result<Vec<String>> {
        let mut out = match self {
            Storage::Local => {
                let rd = match fs::read_dir(dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_err("listing", dir, e)),
                };
                let mut v = Vec::new();
                for e in rd {
                    let e = e.map_err(|e| io_err("listing", dir, e))?;
                    v.push(e.file_name().to_string_lossy().into_owned());
                }
                v
            }
            Storage::Object(b) => {
                let prefix = match key_of(dir)? {
                    k if k.is_empty() => String::new(),
                    k => format!("{k}/"),
                };
                b.children(&prefix)?
            }
        };
        out.sort();
        out.dedup();
        Ok(out)
    }
}
