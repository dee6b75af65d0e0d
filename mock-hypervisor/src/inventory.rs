//! Persisted platform inventories.
//!
//! Each platform front end keeps its objects (servers, snapshots, images,
//! attributes, ...) in one serde document saved as `<state-dir>/<name>.json`
//! with write-temp+rename after every change. Disk content is not in the
//! document: it lives in the [`crate::disk::DiskStore`], referenced by id.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::persist;

/// A document of type `T` persisted at a fixed path.
#[derive(Debug)]
pub struct Inventory<T> {
    path: PathBuf,
    doc: Mutex<T>,
}

impl<T: Serialize + DeserializeOwned + Default> Inventory<T> {
    /// Loads the document at `path`, or starts from `T::default()`.
    pub fn load(path: &Path) -> Result<Self> {
        let doc = persist::load_json(path)?.unwrap_or_default();
        Ok(Inventory {
            path: path.to_path_buf(),
            doc: Mutex::new(doc),
        })
    }

    /// Read access (a snapshot of the document under the lock).
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the document and persists it when `f` succeeds.
    ///
    /// On error the in-memory document is left as `f` left it, so `f` must
    /// validate before it mutates.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        let mut doc = self.lock();
        let out = f(&mut doc)?;
        persist::save_json(&self.path, &*doc)?;
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, T> {
        self.doc.lock().unwrap_or_else(|e| e.into_inner())
    }
}
