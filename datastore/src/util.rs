//! Small helpers: errors with paths, hex, time names, path-safe names,
//! atomic file replacement.
//!
//! Kept by hand, with the reason: hex (two 10-line functions on fixed-size
//! digests; a crate would add a dependency for less code than its
//! import), path components (`%XX` for everything outside `[A-Za-z0-9_.-]`
//! *and* a leading `.`, which `percent-encoding`'s byte sets cannot say).
//! Calendar arithmetic comes from the `time` crate.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use provider_api::{Error, ErrorKind, Result};

/// An I/O error naming the path it concerns.
pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    let kind = if e.kind() == std::io::ErrorKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("{what} {}", path.display())).with_source(e)
}

/// Stored data is damaged.
pub(crate) fn corrupt(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, message).retryable(false)
}

/// Lower-case hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parse lower- or upper-case hex into exactly `N` bytes.
pub(crate) fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nib(b[2 * i])? << 4) | nib(b[2 * i + 1])?;
    }
    Some(out)
}

/// SHA-256 of `data` as hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    to_hex(&sha2::Sha256::digest(data))
}

/// Seconds since the epoch as a UTC date-time (the `time` crate's range,
/// years -9999 to 9999, clamped: times come from this host's clock or
/// checksummed manifests, and a clamped time still sorts right).
pub(crate) fn utc(secs: i64) -> time::OffsetDateTime {
    let min = time::PrimitiveDateTime::MIN.assume_utc().unix_timestamp();
    let max = time::PrimitiveDateTime::MAX.assume_utc().unix_timestamp();
    time::OffsetDateTime::from_unix_timestamp(secs.clamp(min, max))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Seconds since the epoch as RFC 3339 UTC, e.g. `2026-11-22T00:17:15Z`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let t = utc(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Encode an arbitrary name (guest id, platform, device, base image id) as
/// one safe path component: `[A-Za-z0-9_.-]` kept, everything else (and a
/// leading `.`) as `%XX`.
pub(crate) fn encode_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

/// Whether `s` is a component [`encode_component`] could have produced
/// (or a snapshot directory name): no separators, no leading dot.
pub(crate) fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-%:+".contains(&b))
}

/// fsync a directory so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing directory", dir, e))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique in this host for temporary files.
pub(crate) fn unique_suffix() -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos}-{}-{n}", std::process::id())
}

/// Options for files the datastore creates: readable by the owner only
/// (mode 0600, never more whatever the umask: the umask can only remove
/// bits). Backed-up disks are as secret as the guests.
pub(crate) fn private_file_options() -> fs::OpenOptions {
    let mut o = File::options();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// `File::create` with mode 0600.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

fn private_dir_builder(recursive: bool) -> fs::DirBuilder {
    let mut b = fs::DirBuilder::new();
    b.recursive(recursive);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b
}

/// `fs::create_dir_all` with mode 0700 for every directory it creates.
pub(crate) fn create_dir_all_private(path: &Path) -> std::io::Result<()> {
    private_dir_builder(true).create(path)
}

/// `fs::create_dir` with mode 0700.
pub(crate) fn create_dir_private(path: &Path) -> std::io::Result<()> {
    private_dir_builder(false).create(path)
}

/// Replace `path` with `data` atomically and durably: temp file in the same
/// directory, fsync, rename, fsync the directory.
pub(crate) fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", unique_suffix()));
    let res = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", path, e));
    }
    sync_dir(dir)
}

/// Read a whole file, refusing files larger than `limit` before
/// allocating.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| io_err("reading metadata of", path, e))?
        .len();
    if len > limit {
        return Err(corrupt(format!(
            "{} is {len} bytes, more than the limit of {limit}",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_err("reading", path, e))?;
    if buf.len() as u64 > limit {
        return Err(corrupt(format!(
            "{} grew past {limit} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

/// Now, seconds since the epoch.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_names() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn components_are_safe() {
        for name in ["vm-1", "../x", ".hidden", "a/b", "", "ü", "a b"] {
            let c = encode_component(name);
            assert!(is_safe_component(&c), "{name:?} -> {c:?}");
            assert!(!c.contains('/'));
        }
        assert_eq!(encode_component("vm-1.x"), "vm-1.x");
    }

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex::<4>(&to_hex(&b)), Some(b));
        assert_eq!(from_hex::<4>("zz"), None);
    }
}
