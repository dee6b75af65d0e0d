//! Walking a tree into a [`FileArchiveWriter`].
//!
//! Every entry is reached from its parent directory's descriptor
//! (`openat`/`statat` with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`): a symlink
//! is stored as a link and never followed, and a directory swapped for a
//! symlink during the walk is not entered. Names are raw bytes. Entries
//! that vanish, or files that change while read, become warnings.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use provider_api::{Error, FileArchiveWriter, FileEntry, FileKind, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom};
use rustix::io::Errno;

use crate::{IdMap, proc_path, read_xattrs};

/// How to walk.
#[derive(Debug, Clone, Default)]
pub struct WalkOptions {
    /// Shift of owner ids (unprivileged containers): host ids are stored
    /// as the container sees them.
    pub id_map: Option<IdMap>,
    /// Do not descend into other file systems (mount points are stored as
    /// empty directories).
    pub one_file_system: bool,
    /// Set to stop the walk (it then fails with an "interrupted" error).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

const READ_BUF: usize = 1 << 20;

struct Walker<'a> {
    w: &'a mut dyn FileArchiveWriter,
    opts: &'a WalkOptions,
    root_dev: u64,
    links: HashMap<(u64, u64), Vec<u8>>,
    warnings: Vec<String>,
    buf: Vec<u8>,
}

/// Walk the tree at `root` into `w` (then [`FileArchiveWriter::finish`]
/// is the caller's). The root itself is the entry with the empty path.
/// Returns the warnings (entries that vanished or changed meanwhile).
pub fn backup_tree(
    root: &Path,
    w: &mut dyn FileArchiveWriter,
    opts: &WalkOptions,
) -> Result<Vec<String>> {
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_error(e, "opening the tree", root.as_os_str().as_bytes()))?;
    let st =
        rustix::fs::fstat(&fd).map_err(|e| io_error(e, "reading", root.as_os_str().as_bytes()))?;
    let mut walker = Walker {
        w,
        opts,
        root_dev: st.st_dev,
        links: HashMap::new(),
        warnings: Vec::new(),
        buf: vec![0; READ_BUF],
    };
    let mut entry = walker.entry_of(&st, Vec::new(), FileKind::Dir);
    entry.xattrs = read_xattrs(&proc_path(&fd, b"."))
        .map_err(|e| io_error(e, "reading extended attributes of", b"."))?;
    walker.w.add(entry)?;
    walker.dir(&fd, &[])?;
    Ok(walker.warnings)
}

pub(crate) fn io_error(e: Errno, what: &str, path: &[u8]) -> Error {
    let p = if path.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(path).into_owned()
    };
    let kind = match e {
        Errno::NOENT => provider_api::ErrorKind::NotFound,
        Errno::ACCESS | Errno::PERM => provider_api::ErrorKind::Refused,
        _ => provider_api::ErrorKind::Io,
    };
    Error::new(kind, format!("{what} {p}: {e}")).with_source(std::io::Error::from(e))
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
        p.extend_from_slice(dir);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl Walker<'_> {
    fn entry_of(&mut self, st: &rustix::fs::Stat, path: Vec<u8>, kind: FileKind) -> FileEntry {
        let mut e = FileEntry::new(path, kind);
        e.mode = st.st_mode & 0o7777;
        let (uid, gid) = match &self.opts.id_map {
            Some(m) => {
                let (u, g) = (m.to_archive(st.st_uid), m.to_archive(st.st_gid));
                if u.is_none() || g.is_none() {
                    self.warnings.push(format!(
                        "{}: owner {}:{} is outside the id map: stored as nobody",
                        e.display_path(),
                        st.st_uid,
                        st.st_gid
                    ));
                }
                (u.unwrap_or(65534), g.unwrap_or(65534))
            }
            None => (st.st_uid, st.st_gid),
        };
        e.uid = uid;
        e.gid = gid;
        e.mtime_ns = ns(st.st_mtime, st.st_mtime_nsec as i64);
        e.ctime_ns = ns(st.st_ctime, st.st_ctime_nsec as i64);
        e.inode = st.st_ino;
        e
    }

    fn warn(&mut self, what: String) {
        tracing::warn!("{what}");
        self.warnings.push(what);
    }

    fn dir(&mut self, fd: &OwnedFd, path: &[u8]) -> Result<()> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        let dir =
            rustix::fs::Dir::read_from(fd).map_err(|e| io_error(e, "listing directory", path))?;
        for ent in dir {
            let ent = ent.map_err(|e| io_error(e, "listing directory", path))?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        names.sort();
        for name in names {
            self.one(fd, path, &name)?;
        }
        Ok(())
    }

    fn one(&mut self, dirfd: &OwnedFd, dir: &[u8], name: &[u8]) -> Result<()> {
        let path = join(dir, name);
        if let Some(stop) = &self.opts.stop
            && stop.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(Error::new(
                provider_api::ErrorKind::Other,
                format!("interrupted at {}", String::from_utf8_lossy(&path)),
            ));
        }
        let os = OsStr::from_bytes(name);
        let st = match rustix::fs::statat(dirfd, os, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                self.warn(format!(
                    "{}: vanished during the walk",
                    String::from_utf8_lossy(&path)
                ));
                return Ok(());
            }
            Err(e) => return Err(io_error(e, "reading", &path)),
        };
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => FileKind::File,
            FileType::Directory => FileKind::Dir,
            FileType::Symlink => FileKind::Symlink,
            FileType::CharacterDevice => FileKind::CharDevice,
            FileType::BlockDevice => FileKind::BlockDevice,
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::Unknown => {
                self.warn(format!(
                    "{}: unknown file type, skipped",
                    String::from_utf8_lossy(&path)
                ));
                return Ok(());
            }
        };
        let mut e = self.entry_of(&st, path.clone(), kind);
        match read_xattrs(&proc_path(dirfd, name)) {
            Ok(x) => e.xattrs = x,
            Err(Errno::NOENT) => {
                self.warn(format!("{}: vanished during the walk", e.display_path()));
                return Ok(());
            }
            Err(err) => return Err(io_error(err, "reading extended attributes of", &path)),
        }
        match kind {
            FileKind::Dir => {
                let sub = match rustix::fs::openat(
                    dirfd,
                    os,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {
                        self.warn(format!(
                            "{}: vanished or replaced during the walk",
                            e.display_path()
                        ));
                        return Ok(());
                    }
                    Err(err) => return Err(io_error(err, "opening directory", &path)),
                };
                self.w.add(e)?;
                if self.opts.one_file_system && st.st_dev != self.root_dev {
                    return Ok(());
                }
                self.dir(&sub, &path)
            }
            FileKind::Symlink => {
                match rustix::fs::readlinkat(dirfd, os, Vec::new()) {
                    Ok(t) => e.link = t.into_bytes(),
                    Err(Errno::NOENT | Errno::INVAL) => {
                        self.warn(format!("{}: vanished during the walk", e.display_path()));
                        return Ok(());
                    }
                    Err(err) => return Err(io_error(err, "reading link", &path)),
                }
                self.w.add(e)
            }
            FileKind::CharDevice | FileKind::BlockDevice => {
                e.rdev = st.st_rdev;
                self.w.add(e)
            }
            FileKind::Fifo | FileKind::Socket | FileKind::Hardlink => self.w.add(e),
            FileKind::File => {
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    if let Some(first) = self.links.get(&key) {
                        e.kind = FileKind::Hardlink;
                        e.link = first.clone();
                        return self.w.add(e);
                    }
                    self.links.insert(key, path.clone());
                }
                self.file(dirfd, os, e, &st)
            }
        }
    }

    fn file(
        &mut self,
        dirfd: &OwnedFd,
        name: &OsStr,
        mut e: FileEntry,
        st: &rustix::fs::Stat,
    ) -> Result<()> {
        e.size = st.st_size as u64;
        if let Some(prev) = self.w.previous(&e.path)?
            && prev.kind == FileKind::File
            && prev.size == e.size
            && prev.mtime_ns == e.mtime_ns
            && prev.ctime_ns == e.ctime_ns
            && prev.inode == e.inode
        {
            e.extents.clone_from(&prev.extents);
            return self.w.reuse(e, &prev);
        }
        let fd = match rustix::fs::openat(
            dirfd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP) => {
                self.warn(format!(
                    "{}: vanished or replaced during the walk",
                    e.display_path()
                ));
                return Ok(());
            }
            Err(err) => return Err(io_error(err, "opening", &e.path)),
        };
        let now = rustix::fs::fstat(&fd).map_err(|err| io_error(err, "reading", &e.path))?;
        if now.st_ino != st.st_ino || FileType::from_raw_mode(now.st_mode) != FileType::RegularFile
        {
            self.warn(format!(
                "{}: replaced during the walk, skipped",
                e.display_path()
            ));
            return Ok(());
        }
        // Sparse files (fewer blocks than bytes): only their data extents.
        if (st.st_blocks as u64) * 512 < e.size {
            let ex = data_extents(&fd, e.size).map_err(|err| io_error(err, "mapping", &e.path))?;
            if ex.len() != 1 || ex[0] != (0, e.size) {
                e.extents = Some(ex);
            }
        }
        let extents = e.extents.clone().unwrap_or_else(|| vec![(0, e.size)]);
        let path = e.path.clone();
        self.w.add(e)?;
        let mut short = false;
        for (off, len) in extents {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(self.buf.len() as u64) as usize;
                let got = if short {
                    0
                } else {
                    read_full(&fd, &mut self.buf[..n], off + done)
                        .map_err(|err| io_error(err, "reading", &path))?
                };
                if got < n {
                    // Shrunk while read: the rest reads as zeroes.
                    short = true;
                    self.buf[got..n].fill(0);
                }
                self.w.write(&self.buf[..n])?;
                done += n as u64;
            }
        }
        let after = rustix::fs::fstat(&fd).map_err(|err| io_error(err, "reading", &path))?;
        if short
            || after.st_mtime != st.st_mtime
            || after.st_mtime_nsec != st.st_mtime_nsec
            || after.st_size != st.st_size
        {
            self.warn(format!(
                "{}: changed while it was read (stored as read)",
                String::from_utf8_lossy(&path)
            ));
        }
        Ok(())
    }
}

/// Read until `buf` is full or the file ends.
fn read_full(fd: &OwnedFd, buf: &mut [u8], off: u64) -> rustix::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::pread(fd, &mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The data extents of a file (`SEEK_DATA`/`SEEK_HOLE`).
fn data_extents(fd: impl AsFd, size: u64) -> rustix::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(&fd, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = rustix::fs::seek(&fd, SeekFrom::Hole(start))?.min(size);
        out.push((start, end - start));
        pos = end;
    }
    Ok(out)
}
