//! Writing a file archive's entries into a directory (see the crate docs
//! for the resolution rules that keep every write inside it).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use provider_api::{Error, ErrorKind, FileArchiveReader, FileEntry, FileKind, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::walk::io_error;
use crate::{IdMap, proc_path};

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Map stored owner ids back to host ids (unprivileged containers).
    pub id_map: Option<IdMap>,
    /// Set owners (`None`: when running as root).
    pub owners: Option<bool>,
    /// Restore only this entry of the archive and what is below it, as
    /// `<target>/<its last component>` (file-level restore); `None`: the
    /// whole archive, its root being the target directory itself.
    pub only: Option<Vec<u8>>,
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Entries written.
    pub entries: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// What could not be restored as stored (device nodes without the
    /// privilege, attributes the file system refused, …), named.
    pub warnings: Vec<String>,
}

const PIECE: usize = 1 << 20;

/// Check an archive path: relative, no `.`/`..`/empty components, no NUL.
pub(crate) fn check_path(p: &[u8]) -> Result<()> {
    if p.is_empty() {
        return Ok(());
    }
    if p.contains(&0)
        || p.split(|c| *c == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "archive entry path {:?} is not a normal relative path: refused",
                String::from_utf8_lossy(p)
            ),
        ));
    }
    Ok(())
}

fn split(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|c| *c == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

fn ts(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

struct Restorer<'a> {
    reader: &'a dyn FileArchiveReader,
    root: OwnedFd,
    opts: &'a RestoreOptions,
    owners: bool,
    /// Archive path prefix removed (`only`'s parent, with its `/`).
    strip: usize,
    parent: Option<(Vec<u8>, OwnedFd)>,
    report: RestoreReport,
    /// Directories, finished last (deepest first): their mode may forbid
    /// writing into them, and creating children changes their times.
    dirs: Vec<FileEntry>,
    /// Hard link targets outside the selection: their entries.
    outside: HashMap<Vec<u8>, FileEntry>,
}

/// Restore `reader`'s entries into the directory `target` (created when
/// missing). Existing non-directories of the same name are replaced.
pub fn restore_tree(
    reader: &dyn FileArchiveReader,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let tb = target.as_os_str().as_bytes();
    match rustix::fs::mkdir(target, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(io_error(e, "creating", tb)),
    }
    let root = rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_error(e, "opening the restore target", tb))?;
    if let Some(only) = &opts.only {
        check_path(only)?;
        if only.is_empty() {
            return Err(Error::invalid(
                "the path to restore is empty (the root: restore the whole archive)",
            ));
        }
    }
    let strip = match &opts.only {
        Some(o) => match split(o).0 {
            [] => 0,
            p => p.len() + 1,
        },
        None => 0,
    };
    let selected = |p: &[u8]| match &opts.only {
        None => true,
        Some(o) => p == &o[..] || (p.starts_with(o) && p.get(o.len()) == Some(&b'/')),
    };
    // Hard links whose first name is outside the selection get that
    // entry's content: find them first (catalog only).
    let mut wanted: HashSet<Vec<u8>> = HashSet::new();
    let mut outside = HashMap::new();
    if opts.only.is_some() {
        for e in reader.entries()? {
            let e = e?;
            if e.kind == FileKind::Hardlink && selected(&e.path) && !selected(&e.link) {
                wanted.insert(e.link.clone());
            }
        }
        if !wanted.is_empty() {
            for e in reader.entries()? {
                let e = e?;
                if wanted.contains(&e.path) {
                    outside.insert(e.path.clone(), e);
                }
            }
        }
    }
    let owners = opts
        .owners
        .unwrap_or_else(|| rustix::process::geteuid().is_root());
    let mut r = Restorer {
        reader,
        root,
        opts,
        owners,
        strip,
        parent: None,
        report: RestoreReport::default(),
        dirs: Vec::new(),
        outside,
    };
    let mut found = false;
    for e in reader.entries()? {
        let e = e?;
        check_path(&e.path)?;
        if !selected(&e.path) {
            continue;
        }
        found = true;
        r.entry(e)?;
    }
    if let Some(o) = &opts.only
        && !found
    {
        return Err(Error::not_found(format!(
            "the archive has no entry {}",
            String::from_utf8_lossy(o)
        )));
    }
    r.parent = None;
    while let Some(d) = r.dirs.pop() {
        r.finish_entry(&d)?;
    }
    Ok(r.report)
}

impl Restorer<'_> {
    fn warn(&mut self, w: String) {
        tracing::warn!("{w}");
        self.report.warnings.push(w);
    }

    /// Target-relative path of an archive path.
    fn rel<'p>(&self, p: &'p [u8]) -> &'p [u8] {
        &p[self.strip.min(p.len())..]
    }

    /// The directory `rel` (target-relative), resolved beneath the target
    /// without following any symlink.
    fn open_dir(&self, rel: &[u8]) -> Result<OwnedFd> {
        let p: &OsStr = if rel.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(rel)
        };
        rustix::fs::openat2(
            &self.root,
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| {
            let why = match e {
                Errno::XDEV | Errno::LOOP | Errno::NOTDIR => {
                    "it is a symlink or leaves the target: refused"
                }
                _ => "cannot be opened",
            };
            Error::new(
                if matches!(e, Errno::XDEV | Errno::LOOP | Errno::NOTDIR) {
                    ErrorKind::Refused
                } else {
                    ErrorKind::Io
                },
                format!(
                    "restore target directory {} {why} ({e})",
                    String::from_utf8_lossy(rel)
                ),
            )
        })
    }

    fn parent_fd(&mut self, rel_parent: &[u8]) -> Result<&OwnedFd> {
        let hit = matches!(&self.parent, Some((p, _)) if p == rel_parent);
        if !hit {
            let fd = self.open_dir(rel_parent)?;
            self.parent = Some((rel_parent.to_vec(), fd));
        }
        match &self.parent {
            Some((_, fd)) => Ok(fd),
            None => Err(Error::other("no parent directory")),
        }
    }

    fn entry(&mut self, e: FileEntry) -> Result<()> {
        let rel = self.rel(&e.path).to_vec();
        self.report.entries += 1;
        if rel.is_empty() {
            // The archive root: the target itself.
            if e.kind != FileKind::Dir {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    "the archive's root entry is not a directory",
                ));
            }
            self.dirs.push(e);
            return Ok(());
        }
        let (rp, name) = split(&rel);
        let (rp, name) = (rp.to_vec(), name.to_vec());
        let name_os = OsStr::from_bytes(&name);
        let show = e.display_path();
        let parent = self.parent_fd(&rp)?;
        let parent = rustix::io::dup(parent).map_err(|err| io_error(err, "duplicating", &rp))?;
        // Replace what is there (never following it), except directories.
        let clear = |parent: &OwnedFd| -> Result<()> {
            match rustix::fs::statat(parent, name_os, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    if e.kind == FileKind::Dir {
                        Ok(())
                    } else {
                        Err(Error::new(
                            ErrorKind::Refused,
                            format!("{show}: a directory is in the way"),
                        ))
                    }
                }
                Ok(_) => rustix::fs::unlinkat(parent, name_os, AtFlags::empty())
                    .map_err(|err| io_error(err, "replacing", &e.path)),
                Err(Errno::NOENT) => Ok(()),
                Err(err) => Err(io_error(err, "reading", &e.path)),
            }
        };
        clear(&parent)?;
        match e.kind {
            FileKind::Dir => {
                match rustix::fs::mkdirat(&parent, name_os, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(err) => return Err(io_error(err, "creating directory", &e.path)),
                }
                self.dirs.push(e);
                return Ok(());
            }
            FileKind::File => self.file(&parent, name_os, &e, &e)?,
            FileKind::Hardlink => {
                check_path(&e.link)?;
                if let Some(first) = self.outside.get(&e.link).cloned() {
                    // Its first name is not restored: this one gets the content.
                    let mut as_file = e.clone();
                    as_file.kind = FileKind::File;
                    self.file(&parent, name_os, &as_file, &first)?;
                    return self.finish_at(&parent, name_os, &as_file);
                }
                let lrel = self.rel(&e.link).to_vec();
                let (lp, ln) = split(&lrel);
                let lfd = self.open_dir(lp)?;
                rustix::fs::linkat(
                    &lfd,
                    OsStr::from_bytes(ln),
                    &parent,
                    name_os,
                    AtFlags::empty(),
                )
                .map_err(|err| io_error(err, "linking", &e.path))?;
                return Ok(());
            }
            FileKind::Symlink => {
                rustix::fs::symlinkat(OsStr::from_bytes(&e.link), &parent, name_os)
                    .map_err(|err| io_error(err, "creating symlink", &e.path))?;
            }
            FileKind::CharDevice | FileKind::BlockDevice | FileKind::Fifo | FileKind::Socket => {
                let ft = match e.kind {
                    FileKind::CharDevice => FileType::CharacterDevice,
                    FileKind::BlockDevice => FileType::BlockDevice,
                    FileKind::Fifo => FileType::Fifo,
                    _ => FileType::Socket,
                };
                match rustix::fs::mknodat(&parent, name_os, ft, Mode::from_raw_mode(0o600), e.rdev)
                {
                    Ok(()) => {}
                    Err(Errno::PERM | Errno::ACCESS) => {
                        self.warn(format!(
                            "{show}: no privilege to create this device node: skipped"
                        ));
                        return Ok(());
                    }
                    Err(err) => return Err(io_error(err, "creating", &e.path)),
                }
            }
        }
        self.finish_at(&parent, name_os, &e)
    }

    /// Create a regular file `name` with `content`'s stored data.
    fn file(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        e: &FileEntry,
        content: &FileEntry,
    ) -> Result<()> {
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|err| io_error(err, "creating", &e.path))?;
        let extents = content
            .extents
            .clone()
            .unwrap_or_else(|| vec![(0, content.size)]);
        let mut stored = 0u64;
        for (off, len) in extents {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(PIECE as u64) as usize;
                let data = self.reader.read(content, stored + done, n)?;
                write_all_at(&fd, &data, off + done)
                    .map_err(|err| io_error(err, "writing", &e.path).offset_ctx(off + done))?;
                done += n as u64;
            }
            stored += len;
            self.report.bytes += len;
        }
        rustix::fs::ftruncate(&fd, content.size).map_err(|err| io_error(err, "sizing", &e.path))?;
        Ok(())
    }

    /// Owner, mode, attributes and times of an entry in `parent`.
    fn finish_at(&mut self, parent: &OwnedFd, name: &OsStr, e: &FileEntry) -> Result<()> {
        let show = e.display_path();
        if self.owners {
            let (uid, gid) = match &self.opts.id_map {
                Some(m) => (m.to_host(e.uid), m.to_host(e.gid)),
                None => (Some(e.uid), Some(e.gid)),
            };
            match (uid, gid) {
                (Some(u), Some(g)) => {
                    // SAFETY-free: rustix's ids are plain wrappers.
                    let (u, g) = (rustix::fs::Uid::from_raw(u), rustix::fs::Gid::from_raw(g));
                    if let Err(err) = rustix::fs::chownat(
                        parent,
                        name,
                        Some(u),
                        Some(g),
                        AtFlags::SYMLINK_NOFOLLOW,
                    ) {
                        self.warn(format!("{show}: owner not set: {err}"));
                    }
                }
                _ => self.warn(format!(
                    "{show}: owner {}:{} is outside the id map: not set",
                    e.uid, e.gid
                )),
            }
        }
        for (n, v) in &e.xattrs {
            let p = proc_path(parent, name.as_bytes());
            if let Err(err) =
                rustix::fs::lsetxattr(&p, OsStr::from_bytes(n), v, XattrFlags::empty())
            {
                self.warn(format!(
                    "{show}: attribute {} not set: {err}",
                    String::from_utf8_lossy(n)
                ));
            }
        }
        if e.kind != FileKind::Symlink {
            rustix::fs::chmodat(parent, name, Mode::from_raw_mode(e.mode), AtFlags::empty())
                .map_err(|err| io_error(err, "setting the mode of", &e.path))?;
        }
        let t = Timestamps {
            last_access: ts(e.mtime_ns),
            last_modification: ts(e.mtime_ns),
        };
        rustix::fs::utimensat(parent, name, &t, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| io_error(err, "setting the times of", &e.path))?;
        Ok(())
    }

    /// A directory's metadata, once everything below it is written.
    fn finish_entry(&mut self, e: &FileEntry) -> Result<()> {
        let rel = self.rel(&e.path).to_vec();
        if rel.is_empty() {
            let root =
                rustix::io::dup(&self.root).map_err(|err| io_error(err, "duplicating", b""))?;
            // The target itself: "." of its own descriptor.
            return self.finish_at(&root, OsStr::new("."), e);
        }
        let (rp, name) = split(&rel);
        let parent = self.open_dir(rp)?;
        self.finish_at(&parent, OsStr::from_bytes(name), e)
    }
}

fn write_all_at(fd: &OwnedFd, mut data: &[u8], mut off: u64) -> rustix::io::Result<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, off) {
            Ok(n) => {
                data = &data[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

trait OffsetCtx {
    fn offset_ctx(self, off: u64) -> Self;
}

impl OffsetCtx for Error {
    fn offset_ctx(self, off: u64) -> Self {
        self.offset(off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for p in [
            &b"../x"[..],
            b"a/../../x",
            b"/etc/passwd",
            b"a//b",
            b"a/./b",
            b"a\0b",
            b"a/",
        ] {
            assert!(check_path(p).is_err(), "{:?}", String::from_utf8_lossy(p));
        }
        for p in [&b""[..], b"a", b"a/b", b"a/..b", b"\xff/x"] {
            assert!(check_path(p).is_ok());
        }
    }
}
