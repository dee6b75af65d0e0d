//! # filetree: directory trees to and from file archives
//!
//! The host side of container and file-level backup: [`backup_tree`]
//! walks a directory tree into a [`provider_api::FileArchiveWriter`];
//! [`restore_tree`] writes a [`provider_api::FileArchiveReader`]'s entries
//! into a directory; [`write_tar`] streams them as a tar archive (the
//! Proxmox `tar` restore mechanism).
//!
//! ## Safety
//!
//! - The walk reaches each entry from its parent directory's descriptor
//!   with `O_NOFOLLOW`: symlinks are stored, never followed, and a
//!   directory replaced by a symlink mid-walk is not entered.
//! - A restore resolves every parent directory with `openat2(2)` and
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` from the target directory, and
//!   creates the entry relative to that descriptor without following a
//!   final symlink: no archive (however crafted) and no concurrent change
//!   of the target makes it write outside the target. Entry paths with
//!   `..`, `.`, empty components, NUL or a leading `/` are refused.
//! - Names are bytes end to end (Linux file names need not be UTF-8).
//!
//! Extended attributes (ACLs are `system.posix_acl_*` attributes) are
//! read and written by path through `/proc/self/fd/<dir>/<name>` with the
//! `l*xattr` calls, which do not follow a final symlink, so that devices
//! and FIFOs are never opened.
//!
//! Hand-written on `rustix` (the `*at` calls, `openat2`, xattrs, seeking
//! data and holes): the crates that walk trees (`walkdir`) follow paths
//! from the root and know nothing of xattrs, sparse files or resolution
//! beneath a directory; `tar` writes the tar stream.

mod restore;
mod tar_out;
mod walk;

use std::os::fd::{AsFd, AsRawFd};

pub use restore::{RestoreOptions, RestoreReport, restore_tree};
pub use tar_out::write_tar;
pub use walk::{WalkOptions, backup_tree};

pub use provider_api::IdMap;

/// `/proc/self/fd/<dir>/<name>`: a path to `name` in an open directory
/// that the kernel resolves through the descriptor.
pub(crate) fn proc_path(dir: &impl AsFd, name: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let mut p = format!("/proc/self/fd/{}/", dir.as_fd().as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    std::ffi::OsString::from_vec(p)
}

/// Every extended attribute of the entry at `path` (final symlink not
/// followed), sorted by name.
pub(crate) fn read_xattrs(path: &std::ffi::OsStr) -> rustix::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rustix::io::Errno;
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) => {
                let need = rustix::fs::llistxattr_query(path)?;
                names.resize(need.max(names.len() * 2), 0);
            }
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name_os = std::ffi::OsStr::from_bytes(name);
        let mut val = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, name_os, &mut val[..]) {
                Ok(n) => break Some(n),
                Err(Errno::RANGE) => {
                    let need = rustix::fs::lgetxattr_query(path, name_os)?;
                    val.resize(need.max(val.len() * 2), 0);
                }
                Err(Errno::NODATA) => break None, // removed meanwhile
                Err(e) => return Err(e),
            }
        };
        if let Some(len) = len {
            val.truncate(len);
            out.push((name.to_vec(), val));
        }
    }
    out.sort();
    Ok(out)
}

use std::os::unix::ffi::OsStrExt;
