//! OVA archives: a tar file holding the descriptor, an optional manifest
//! and the disk images.
//!
//! ## Reading
//!
//! [`Ova::open`] reads the tar headers only (the `tar` crate, seeking past
//! the data) and keeps each member's name, offset and size; nothing is
//! extracted. Disk images are then read in place by qemu through its raw
//! driver's `offset`/`size` window ([`Member::image_opts`]), so an import
//! needs no temporary copy. The archive is untrusted:
//!
//! - only regular files (pax and GNU long-name headers are understood);
//!   links, directories, devices and GNU sparse members are refused;
//! - a name is one plain component (a leading `./` is dropped): no `/`,
//!   `..`, `.`, backslash, control characters or NUL; names are unique;
//! - every member lies within the file (a truncated archive is refused,
//!   even when the cut falls at a header boundary);
//! - at most [`MAX_MEMBERS`] members; the descriptor and manifest are read
//!   up to their own limits;
//! - the tar crate checks each header's checksum.
//!
//! [`Ova::verify`] checks members against the manifest (`SHA256(name)=`,
//! `SHA1(name)=` or `SHA512(name)=` lines).
//!
//! ## Writing
//!
//! [`write()`] puts the descriptor first, then the manifest, then the disks
//! (the order the OVF standard prescribes), as ustar members, under a
//! temporary name renamed into place once complete and synced.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Error, ErrorKind, Result};

/// Most members accepted in an archive.
pub const MAX_MEMBERS: usize = 4096;
/// Largest manifest read.
pub const MAX_MANIFEST: u64 = 1 << 20;

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name (one plain path component).
    pub name: String,
    /// Offset of its data in the archive.
    pub offset: u64,
    /// Size of its data.
    pub size: u64,
}

impl Member {
    /// qemu `--image-opts` reading this member of `archive` as an image of
    /// `driver` (`vmdk`, `qcow2`, `raw`) without extracting it. Commas in
    /// the path are doubled, as qemu's option syntax wants.
    pub fn image_opts(&self, driver: &str, archive: &Path) -> String {
        let path = archive.to_string_lossy().replace(',', ",,");
        if driver == "raw" {
            format!(
                "driver=raw,offset={},size={},file.driver=file,file.filename={path}",
                self.offset, self.size
            )
        } else {
            format!(
                "driver={driver},file.driver=raw,file.offset={},file.size={},file.file.driver=file,file.file.filename={path}",
                self.offset, self.size
            )
        }
    }
}

/// An opened OVA.
#[derive(Debug, Clone)]
pub struct Ova {
    path: PathBuf,
    members: Vec<Member>,
}

fn refused(context: &str, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Refused, context, message)
}

/// A member name as stored, checked: one plain component.
fn member_name(raw: &[u8]) -> Result<String> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let context = format!("member {shown:?}");
    let name = std::str::from_utf8(raw).map_err(|_| refused(&context, "the name is not UTF-8"))?;
    let name = name.strip_prefix("./").unwrap_or(name);
    if name.is_empty() || name == "." || name == ".." {
        return Err(refused(&context, "not a file name"));
    }
    if name.starts_with('/') {
        return Err(refused(&context, "an absolute path"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(refused(
            &context,
            "a path with directories (an OVA holds plain file names)",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(refused(&context, "control characters in the name"));
    }
    Ok(name.to_owned())
}

/// The members of the tar stream `archive` of `len` bytes.
pub fn members<R: Read + Seek>(archive: R, len: u64) -> Result<Vec<Member>> {
    let mut ar = tar::Archive::new(archive);
    let entries = ar
        .entries_with_seek()
        .map_err(|e| Error::new(ErrorKind::Malformed, "tar", e.to_string()))?;
    let mut out: Vec<Member> = Vec::new();
    for entry in entries {
        let at = out
            .last()
            .map(|m| format!("after member {:?}", m.name))
            .unwrap_or_else(|| "first header".to_owned());
        let entry = entry.map_err(|e| Error::new(ErrorKind::Malformed, &at, e.to_string()))?;
        let kind = entry.header().entry_type();
        let raw_name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_name).into_owned();
        let context = format!("member {shown:?}");
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                return Err(refused(&context, "a link (an OVA holds plain files)"));
            }
            tar::EntryType::GNUSparse => {
                return Err(refused(&context, "a GNU sparse member"));
            }
            other => {
                return Err(refused(
                    &context,
                    format!("of type {other:?} (an OVA holds plain files)"),
                ));
            }
        }
        let name = member_name(&raw_name)?;
        let offset = entry.raw_file_position();
        let size = entry.size();
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(Error::new(
                ErrorKind::Malformed,
                &context,
                format!(
                    "declares {size} bytes at offset {offset}, beyond the end of the archive ({len} bytes): truncated or forged"
                ),
            ));
        }
        if out.iter().any(|m| m.name == name) {
            return Err(refused(&context, "a second member of that name"));
        }
        if out.len() >= MAX_MEMBERS {
            return Err(Error::new(
                ErrorKind::Limit,
                "tar",
                format!("more than {MAX_MEMBERS} members"),
            ));
        }
        out.push(Member { name, offset, size });
    }
    if out.is_empty() {
        return Err(Error::new(
            ErrorKind::Malformed,
            "tar",
            "no members: not an OVA",
        ));
    }
    Ok(out)
}

/// A digest algorithm of manifest lines.
enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

fn parse_manifest(text: &str) -> Result<Vec<(Algorithm, String, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let context = format!("manifest line {}", n + 1);
        let bad = || {
            Error::new(
                ErrorKind::Malformed,
                &context,
                format!("{line:?} is not ALG(name)= digest"),
            )
        };
        let (alg, rest) = line.split_once('(').ok_or_else(bad)?;
        let (name, digest) = rest.rsplit_once(")=").ok_or_else(bad)?;
        let alg = match alg.trim().to_ascii_uppercase().as_str() {
            "SHA1" => Algorithm::Sha1,
            "SHA256" => Algorithm::Sha256,
            "SHA512" => Algorithm::Sha512,
            other => {
                return Err(Error::new(
                    ErrorKind::Malformed,
                    &context,
                    format!("digest algorithm {other} is not supported"),
                ));
            }
        };
        out.push((alg, name.to_owned(), digest.trim().to_ascii_lowercase()));
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Ova {
    /// Open `path` and read its headers.
    pub fn open(path: &Path) -> Result<Ova> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(&shown, e))?;
        let len = file.metadata().map_err(|e| Error::io(&shown, e))?.len();
        let members = members(std::io::BufReader::new(file), len).map_err(|e| e.within(&shown))?;
        Ok(Ova {
            path: path.to_owned(),
            members,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All members in archive order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member `name`.
    pub fn member(&self, name: &str) -> Result<&Member> {
        let name = name.strip_prefix("./").unwrap_or(name);
        self.members.iter().find(|m| m.name == name).ok_or_else(|| {
            Error::new(
                ErrorKind::Missing,
                self.path.display().to_string(),
                format!("no member {name:?} (the descriptor references it)"),
            )
        })
    }

    /// The descriptor: the one member ending in `.ovf`.
    pub fn descriptor(&self) -> Result<&Member> {
        let mut ovfs = self
            .members
            .iter()
            .filter(|m| m.name.to_ascii_lowercase().ends_with(".ovf"));
        let shown = self.path.display().to_string();
        match (ovfs.next(), ovfs.next()) {
            (Some(m), None) => Ok(m),
            (None, _) => Err(Error::new(
                ErrorKind::Missing,
                shown,
                "no .ovf descriptor in the archive",
            )),
            (Some(a), Some(b)) => Err(Error::new(
                ErrorKind::Malformed,
                shown,
                format!("two descriptors, {:?} and {:?}", a.name, b.name),
            )),
        }
    }

    /// The bytes of `member`, refused beyond `max` bytes.
    pub fn read(&self, member: &Member, max: u64) -> Result<Vec<u8>> {
        let context = format!("{}: member {:?}", self.path.display(), member.name);
        if member.size > max {
            return Err(Error::new(
                ErrorKind::Limit,
                context,
                format!("{} bytes, more than the {max} accepted", member.size),
            ));
        }
        let mut f = File::open(&self.path).map_err(|e| Error::io(&context, e))?;
        f.seek(SeekFrom::Start(member.offset))
            .map_err(|e| Error::io(&context, e))?;
        let mut buf = Vec::with_capacity(member.size as usize);
        f.take(member.size)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&context, e))?;
        if buf.len() as u64 != member.size {
            return Err(Error::new(ErrorKind::Malformed, context, "truncated"));
        }
        Ok(buf)
    }

    /// Check the members `names` against the manifest, if the archive has
    /// one: a digest that differs is an error; a member the manifest does
    /// not list, or an archive without a manifest, is a warning (returned).
    pub fn verify(&self, names: &[&str]) -> Result<Vec<String>> {
        let shown = self.path.display().to_string();
        let Some(mf) = self
            .members
            .iter()
            .find(|m| m.name.to_ascii_lowercase().ends_with(".mf"))
        else {
            return Ok(vec![format!(
                "{shown} has no manifest: its members are not checked"
            )]);
        };
        let text = self.read(mf, MAX_MANIFEST)?;
        let mut spans = Vec::with_capacity(names.len());
        for name in names {
            let m = self.member(name)?;
            spans.push(Span {
                name: &m.name,
                path: &self.path,
                offset: m.offset,
                size: m.size,
            });
        }
        check_manifest(&text, &shown, &spans)
    }
}

/// Bytes checked against a manifest: `size` bytes at `offset` of `path`.
pub(crate) struct Span<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub offset: u64,
    pub size: u64,
}

/// Check `spans` against the manifest text `manifest` (of `context`).
pub(crate) fn check_manifest(
    manifest: &[u8],
    context: &str,
    spans: &[Span<'_>],
) -> Result<Vec<String>> {
    let text = std::str::from_utf8(manifest).map_err(|_| {
        Error::new(
            ErrorKind::Malformed,
            context,
            "the manifest is not UTF-8 text",
        )
    })?;
    let lines = parse_manifest(text).map_err(|e| e.within(context))?;
    let mut warnings = Vec::new();
    for span in spans {
        let Some((alg, _, want)) = lines.iter().find(|(_, n, _)| n == span.name) else {
            warnings.push(format!(
                "{context}: the manifest does not list {:?}: not checked",
                span.name
            ));
            continue;
        };
        let got = digest(span, alg)?;
        if &got != want {
            return Err(Error::new(
                ErrorKind::Checksum,
                format!("{context}: {:?}", span.name),
                format!(
                    "digest {got} differs from the manifest's {want}: the appliance is damaged"
                ),
            ));
        }
    }
    Ok(warnings)
}

fn digest(span: &Span<'_>, alg: &Algorithm) -> Result<String> {
    let context = format!("{}: {:?}", span.path.display(), span.name);
    let mut f = File::open(span.path).map_err(|e| Error::io(&context, e))?;
    f.seek(SeekFrom::Start(span.offset))
        .map_err(|e| Error::io(&context, e))?;
    let mut r = f.take(span.size);
    let mut buf = vec![0u8; 1 << 20];
    let mut h1 = sha1::Sha1::new();
    let mut h256 = sha2::Sha256::new();
    let mut h512 = sha2::Sha512::new();
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(|e| Error::io(&context, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        match alg {
            Algorithm::Sha1 => h1.update(&buf[..n]),
            Algorithm::Sha256 => h256.update(&buf[..n]),
            Algorithm::Sha512 => h512.update(&buf[..n]),
        }
    }
    if total != span.size {
        return Err(Error::new(ErrorKind::Malformed, context, "truncated"));
    }
    Ok(match alg {
        Algorithm::Sha1 => hex(&h1.finalize()),
        Algorithm::Sha256 => hex(&h256.finalize()),
        Algorithm::Sha512 => hex(&h512.finalize()),
    })
}

/// SHA-256 of a file, hex.
fn file_sha256(path: &Path) -> Result<String> {
    let shown = path.display().to_string();
    let mut f = File::open(path).map_err(|e| Error::io(&shown, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(&shown, e))?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Write the OVA `path`: the descriptor `ovf_name` with `descriptor`, a
/// SHA-256 manifest, then `files` (member name, file) in order. Written
/// as `.<name>.partial` beside `path`, synced, then renamed; an existing
/// `path` is refused.
pub fn write(
    path: &Path,
    ovf_name: &str,
    descriptor: &[u8],
    files: &[(String, PathBuf)],
) -> Result<()> {
    let shown = path.display().to_string();
    if path.exists() {
        return Err(refused(&shown, "exists already"));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| refused(&shown, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let partial = dir.join(format!(".{file_name}.partial"));
    let result = (|| {
        let mut manifest = format!(
            "SHA256({ovf_name})= {}\n",
            hex(&sha2::Sha256::digest(descriptor))
        );
        for (name, file) in files {
            manifest.push_str(&format!("SHA256({name})= {}\n", file_sha256(file)?));
        }
        let mf_name = match ovf_name.rsplit_once('.') {
            Some((stem, _)) => format!("{stem}.mf"),
            None => format!("{ovf_name}.mf"),
        };
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| Error::io(partial.display().to_string(), e))?;
        let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = |size: u64| {
            let mut h = tar::Header::new_ustar();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            h
        };
        let io = |e: std::io::Error| Error::io(&shown, e);
        b.append_data(&mut header(descriptor.len() as u64), ovf_name, descriptor)
            .map_err(io)?;
        b.append_data(
            &mut header(manifest.len() as u64),
            &mf_name,
            manifest.as_bytes(),
        )
        .map_err(io)?;
        for (name, file) in files {
            let f = File::open(file).map_err(|e| Error::io(file.display().to_string(), e))?;
            let len = f
                .metadata()
                .map_err(|e| Error::io(file.display().to_string(), e))?
                .len();
            b.append_data(&mut header(len), name, f).map_err(io)?;
        }
        let out = b
            .into_inner()
            .map_err(io)?
            .into_inner()
            .map_err(|e| io(e.into_error()))?;
        out.sync_all().map_err(io)?;
        drop(out);
        std::fs::rename(&partial, path).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_component() {
        assert_eq!(member_name(b"disk1.vmdk").unwrap(), "disk1.vmdk");
        assert_eq!(member_name(b"./vm.ovf").unwrap(), "vm.ovf");
        for bad in [
            &b"../x"[..],
            b"/etc/passwd",
            b"a/b",
            b"..",
            b".",
            b"",
            b"a\\..\\b",
            b"x\ny",
            b"\xff.vmdk",
        ] {
            let e = member_name(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{bad:?}: {e}");
        }
    }

    #[test]
    fn manifests_of_three_algorithms() {
        let lines =
            parse_manifest("SHA1(a.ovf)= 00AA\nSHA256(disk (1).vmdk)= bb\n\nSHA512(c)=cc\n")
                .unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].2, "00aa");
        assert_eq!(lines[1].1, "disk (1).vmdk");
        assert!(parse_manifest("MD5(a)= 00").is_err());
        assert!(parse_manifest("garbage").is_err());
    }
}
