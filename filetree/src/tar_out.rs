//! A file archive as a tar stream (GNU format with PAX records for
//! nanosecond times and extended attributes, `SCHILY.xattr.*` as GNU tar
//! and bsdtar read them). Sparse files are written whole (holes as zero
//! bytes); sockets have no tar form and are skipped with a warning, as GNU
//! tar does.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;

use provider_api::{Error, ErrorKind, FileArchiveReader, FileEntry, FileKind, Result};

use crate::restore::check_path;

/// Stream the archive's entries (all, or `only` and what is below it) as
/// a tar to `out`; returns the warnings.
pub fn write_tar(
    reader: &dyn FileArchiveReader,
    out: &mut dyn Write,
    only: Option<&[u8]>,
) -> Result<Vec<String>> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut warnings = Vec::new();
    let io = |e: std::io::Error, p: &FileEntry| {
        Error::new(
            ErrorKind::Io,
            format!("writing {} to the tar stream: {e}", p.display_path()),
        )
        .with_source(e)
    };
    for e in reader.entries()? {
        let e = e?;
        check_path(&e.path)?;
        if let Some(o) = only
            && !(e.path == o || (e.path.starts_with(o) && e.path.get(o.len()) == Some(&b'/')))
        {
            continue;
        }
        let name: Vec<u8> = if e.path.is_empty() {
            b"./".to_vec()
        } else {
            e.path.clone()
        };
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&name));
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid.into());
        h.set_gid(e.gid.into());
        h.set_mtime(e.mtime_ns.div_euclid(1_000_000_000).max(0) as u64);
        let mut pax: Vec<(String, Vec<u8>)> = vec![(
            "mtime".into(),
            format!(
                "{}.{:09}",
                e.mtime_ns.div_euclid(1_000_000_000),
                e.mtime_ns.rem_euclid(1_000_000_000)
            )
            .into_bytes(),
        )];
        for (n, v) in &e.xattrs {
            // ACLs as GNU tar and bsdtar write them (text), so that they
            // extract with `--acls`.
            let acl = match &n[..] {
                b"system.posix_acl_access" => Some("SCHILY.acl.access"),
                b"system.posix_acl_default" => Some("SCHILY.acl.default"),
                _ => None,
            };
            if let Some(key) = acl {
                match acl_text(v) {
                    Some(t) => pax.push((key.into(), t.into_bytes())),
                    None => warnings.push(format!(
                        "{}: ACL does not parse: left out",
                        e.display_path()
                    )),
                }
                continue;
            }
            match std::str::from_utf8(n) {
                Ok(n) => pax.push((format!("SCHILY.xattr.{n}"), v.clone())),
                Err(_) => warnings.push(format!(
                    "{}: attribute with a non-UTF-8 name has no tar form: left out",
                    e.display_path()
                )),
            }
        }
        let kind = match e.kind {
            FileKind::Socket => {
                warnings.push(format!(
                    "{}: a socket has no tar form: left out",
                    e.display_path()
                ));
                continue;
            }
            FileKind::File => tar::EntryType::Regular,
            FileKind::Dir => tar::EntryType::Directory,
            FileKind::Symlink => tar::EntryType::Symlink,
            FileKind::Hardlink => tar::EntryType::Link,
            FileKind::CharDevice => tar::EntryType::Char,
            FileKind::BlockDevice => tar::EntryType::Block,
            FileKind::Fifo => tar::EntryType::Fifo,
        };
        h.set_entry_type(kind);
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), &v[..])))
            .map_err(|x| io(x, &e))?;
        match e.kind {
            FileKind::File => {
                h.set_size(e.size);
                let mut r = EntryRead {
                    reader,
                    entry: &e,
                    pos: 0,
                };
                b.append_data(&mut h, path, &mut r).map_err(|x| io(x, &e))?;
            }
            FileKind::Symlink | FileKind::Hardlink => {
                h.set_size(0);
                let target = std::path::Path::new(std::ffi::OsStr::from_bytes(&e.link));
                b.append_link(&mut h, path, target).map_err(|x| io(x, &e))?;
            }
            FileKind::CharDevice | FileKind::BlockDevice => {
                h.set_size(0);
                h.set_device_major(rustix::fs::major(e.rdev))
                    .map_err(|x| io(x, &e))?;
                h.set_device_minor(rustix::fs::minor(e.rdev))
                    .map_err(|x| io(x, &e))?;
                b.append_data(&mut h, path, std::io::empty())
                    .map_err(|x| io(x, &e))?;
            }
            _ => {
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty())
                    .map_err(|x| io(x, &e))?;
            }
        }
    }
    b.finish().map_err(|x| {
        Error::new(ErrorKind::Io, format!("finishing the tar stream: {x}")).with_source(x)
    })?;
    Ok(warnings)
}

/// The text form of a Linux POSIX ACL attribute (`user::rw-,user:1000:r--,…`,
/// numeric ids), as `acl_from_text(3)` reads it.
fn acl_text(v: &[u8]) -> Option<String> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) || v[..4] != 2u32.to_le_bytes() {
        return None;
    }
    let mut parts = Vec::new();
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let who = match tag {
            0x01 => "user:".to_string(),
            0x02 => format!("user:{id}"),
            0x04 => "group:".to_string(),
            0x08 => format!("group:{id}"),
            0x10 => "mask:".to_string(),
            0x20 => "other:".to_string(),
            _ => return None,
        };
        let rwx: String = [(4, 'r'), (2, 'w'), (1, 'x')]
            .iter()
            .map(|(b, c)| if perm & b != 0 { *c } else { '-' })
            .collect();
        parts.push(format!("{who}:{rwx}"));
    }
    Some(parts.join(","))
}

/// A regular file's logical content (holes of a sparse file as zeroes).
struct EntryRead<'a> {
    reader: &'a dyn FileArchiveReader,
    entry: &'a FileEntry,
    pos: u64,
}

impl Read for EntryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.entry.size;
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (size - self.pos).min(buf.len().min(1 << 20) as u64) as usize;
        let (data_at, n) = match &self.entry.extents {
            None => (Some(self.pos), want),
            Some(ex) => {
                // The extent holding pos, or the hole before the next one.
                let mut stored = 0u64;
                let mut found = None;
                for (off, len) in ex {
                    if self.pos < *off {
                        found = Some((None, (*off - self.pos).min(want as u64) as usize));
                        break;
                    }
                    if self.pos < off + len {
                        let inner = self.pos - off;
                        found = Some((
                            Some(stored + inner),
                            (len - inner).min(want as u64) as usize,
                        ));
                        break;
                    }
                    stored += len;
                }
                found.unwrap_or((None, want))
            }
        };
        match data_at {
            None => buf[..n].fill(0),
            Some(at) => {
                let d = self
                    .reader
                    .read(self.entry, at, n)
                    .map_err(|e| std::io::Error::other(e.report()))?;
                buf[..n].copy_from_slice(&d);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}
