//! [`Backend`] on a local directory: objects are files, keys their paths.
//!
//! - `put` writes a temporary file in the target directory, fsyncs it,
//!   renames it over the key and fsyncs the directory;
//! - `put_new` links the fsynced temporary file to the key (`link(2)`
//!   fails atomically when the key exists), so two creators can never
//!   both succeed nor overwrite each other;
//! - `put_if_version` and `delete` run under an exclusive `flock` of
//!   `<root>/.objects.vmbtmp-lock`, so a compare-and-replace cannot
//!   interleave with another or with a delete;
//! - a version is the file's inode, size and modification time in
//!   nanoseconds: every replacement is a new file (a rename), so its
//!   version changes;
//! - temporary files contain `.vmbtmp-` in their name and are never
//!   listed.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use provider_api::{Error, ErrorKind, Result};

use super::{Backend, ObjectMeta, check_key};
use crate::util::{
    corrupt, create_dir_all_private, create_private, io_err, sync_dir, unique_suffix,
};

const TMP_MARK: &str = ".vmbtmp-";

/// A [`Backend`] in a local directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

fn version_of(meta: &fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}.{:09}",
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

impl LocalBackend {
    /// The directory `root` (created, private, if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<LocalBackend> {
        let root = root.into();
        create_dir_all_private(&root).map_err(|e| io_err("creating", &root, e))?;
        Ok(LocalBackend { root })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn meta(&self, key: &str, m: &fs::Metadata) -> ObjectMeta {
        ObjectMeta {
            key: key.to_owned(),
            size: m.len(),
            modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            version: version_of(m),
        }
    }

    /// An fsynced temporary file holding `data` next to `path`.
    fn temp(&self, path: &Path, data: &[u8]) -> Result<PathBuf> {
        let dir = path.parent().unwrap_or(&self.root);
        create_dir_all_private(dir).map_err(|e| io_err("creating", dir, e))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let tmp = dir.join(format!(".{name}{TMP_MARK}{}", unique_suffix()));
        let res = (|| {
            let mut f = create_private(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("writing", path, e));
        }
        Ok(tmp)
    }

    fn lock(&self) -> Result<File> {
        let path = self.root.join(format!(".objects{TMP_MARK}lock"));
        let f = crate::store::open_lock_file(&path)?;
        f.lock().map_err(|e| io_err("locking", &path, e))?;
        Ok(f)
    }

    fn stat(&self, key: &str, path: &Path) -> Result<Option<ObjectMeta>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(self.meta(key, &m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading metadata of", path, e)),
        }
    }

    fn replace(&self, key: &str, path: &Path, data: &[u8]) -> Result<String> {
        let tmp = self.temp(path, data)?;
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("replacing", path, e));
        }
        sync_dir(path.parent().unwrap_or(&self.root))?;
        self.stat(key, path)?
            .map(|m| m.version)
            .ok_or_else(|| Error::new(ErrorKind::Io, format!("{} vanished", path.display())))
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str, limit: u64) -> Result<Option<(Vec<u8>, ObjectMeta)>> {
        let path = self.path(key)?;
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path, e)),
        };
        let m = f
            .metadata()
            .map_err(|e| io_err("reading metadata of", &path, e))?;
        if m.len() > limit {
            return Err(corrupt(format!(
                "{} is {} bytes, more than the limit of {limit}",
                path.display(),
                m.len()
            )));
        }
        let mut buf = Vec::with_capacity(m.len() as usize);
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("reading", &path, e))?;
        if buf.len() as u64 > limit {
            return Err(corrupt(format!(
                "{} grew past {limit} bytes",
                path.display()
            )));
        }
        Ok(Some((buf, self.meta(key, &m))))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        self.stat(key, &path)
    }

    fn put(&self, key: &str, data: Bytes) -> Result<String> {
        let path = self.path(key)?;
        self.replace(key, &path, &data)
    }

    fn put_new(&self, key: &str, data: Bytes) -> Result<Option<String>> {
        let path = self.path(key)?;
        let tmp = self.temp(&path, &data)?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(path.parent().unwrap_or(&self.root))?;
                Ok(self.stat(key, &path)?.map(|m| m.version))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(io_err("creating", &path, e)),
        }
    }

    fn put_if_version(&self, key: &str, data: Bytes, version: &str) -> Result<Option<String>> {
        let path = self.path(key)?;
        let _lock = self.lock()?;
        match self.stat(key, &path)? {
            Some(m) if m.version == version => self.replace(key, &path, &data).map(Some),
            _ => Ok(None),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let _lock = self.lock()?;
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let start = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix.trim_end_matches('/'))?
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("listing", &dir, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| io_err("listing", &dir, e))?;
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let Ok(m) = entry.metadata() else { continue };
                if m.is_dir() {
                    stack.push(path);
                    continue;
                }
                if name.contains(TMP_MARK) {
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if super::is_valid_key(&key) {
                    out.push(self.meta(&key, &m));
                }
            }
        }
        Ok(out)
    }

    fn now(&self) -> Result<SystemTime> {
        Ok(SystemTime::now())
    }
}
