//! Downloading an exported image into a local sparse file with ranged,
//! resumable GETs (provider-kit's [`HttpRange`]), checking its md5 and (optionally) recording a digest of
//! every 64 KiB block so that a linked root volume can be compared with
//! its base image.
//!
//! The provider no longer stages backups here: it streams exports to the
//! data mover ([`provider_kit::http_export`], see `provider/backup.rs`)
//! and uses only [`BLOCK`]. This whole-image download (and its resume,
//! md5 and final local write failure) stays for tools that want an
//! export as a local file.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use md5::{Digest as _, Md5};
use provider_api::{Error, ErrorKind, Extent, Result};
use provider_kit::http_export::{HttpRange, PASS_CHUNK};
use sha2::Sha256;

/// Granularity of sparse writes and block digests.
pub const BLOCK: u64 = 64 * 1024;

/// A finished download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// Bytes.
    pub size: u64,
    /// md5 of the content (lower-case hex).
    pub md5: String,
    /// SHA-256 of every 64 KiB block, when asked for.
    pub digests: Option<Vec<[u8; 32]>>,
    /// How many times the transfer was resumed.
    pub resumes: u32,
}

struct Sink {
    file: std::fs::File,
    pos: u64,
    buf: Vec<u8>,
    md5: Md5,
    digests: Option<Vec<[u8; 32]>>,
}

impl Sink {
    fn push(&mut self, data: &[u8], path: &Path) -> Result<()> {
        self.md5.update(data);
        self.buf.extend_from_slice(data);
        let whole = self.buf.len() - self.buf.len() % BLOCK as usize;
        if whole >= 16 * BLOCK as usize {
            self.flush(whole, path)?;
        }
        Ok(())
    }

    fn flush(&mut self, n: usize, path: &Path) -> Result<()> {
        for block in self.buf[..n].chunks(BLOCK as usize) {
            if let Some(d) = &mut self.digests {
                d.push(Sha256::digest(block).into());
            }
            if block.iter().any(|b| *b != 0) {
                // A local write failure (a full disk) is not a broken
                // transfer: resuming would not help, so it is final.
                self.file.write_all_at(block, self.pos).map_err(|e| {
                    Error::new(ErrorKind::Io, format!("writing {}", path.display()))
                        .offset(self.pos)
                        .retryable(false)
                        .with_source(e)
                })?;
            }
            self.pos += block.len() as u64;
        }
        self.buf.drain(..n);
        Ok(())
    }

    fn set_len(&self, size: u64, path: &Path) -> Result<()> {
        self.file.set_len(size).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("sizing {} to {size} bytes", path.display()),
            )
            .retryable(false)
            .with_source(e)
        })
    }

    fn received(&self) -> u64 {
        self.pos + self.buf.len() as u64
    }
}

/// Downloads the `size` bytes of `source` (an export URL, see
/// [`HttpRange::new`]) into `path` (created sparse): ranged `GET`s of
/// [`PASS_CHUNK`] bytes, each resumed at its first missing byte when the
/// transfer breaks (up to [`HttpRange::retries`] times). Checks the md5
/// when `expected_md5` is given.
pub async fn download(
    source: &HttpRange,
    path: &Path,
    size: u64,
    expected_md5: Option<&str>,
    want_digests: bool,
) -> Result<Downloaded> {
    let call = source.call();
    let what = source.what();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| {
            Error::new(ErrorKind::Io, format!("creating {}", path.display())).with_source(e)
        })?;
    let mut sink = Sink {
        file,
        pos: 0,
        buf: Vec::with_capacity(32 * BLOCK as usize),
        md5: Md5::new(),
        digests: want_digests.then(Vec::new),
    };
    while sink.received() < size {
        let from = sink.received();
        let data = source.read(from, PASS_CHUNK.min(size - from)).await?;
        sink.push(&data, path)?;
    }
    let n = sink.buf.len();
    sink.flush(n, path)?;
    // Zero blocks were not written: the length makes them holes.
    sink.set_len(size, path)?;
    let md5: String = sink
        .md5
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(want) = expected_md5
        && want.len() == 32
        && !want.eq_ignore_ascii_case(&md5)
    {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("export of {what}: md5 {md5} differs from exportMd5Sum {want}"),
        )
        .api_call(&call));
    }
    Ok(Downloaded {
        size,
        md5,
        digests: sink.digests,
        resumes: source.resumes(),
    })
}

/// The regions of a volume whose blocks differ from its base image's
/// (blocks past the base's end count as different), merged.
pub fn differing_regions(volume: &[[u8; 32]], base: &[[u8; 32]], size: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (i, d) in volume.iter().enumerate() {
        if base.get(i) == Some(d) {
            continue;
        }
        let off = i as u64 * BLOCK;
        let len = BLOCK.min(size.saturating_sub(off));
        if len == 0 {
            break;
        }
        match out.last_mut() {
            Some(last) if last.end() == off => last.length += len,
            _ => out.push(Extent::new(off, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk (here /dev/full) ends the download at once with the
    /// path in the error: resuming would re-fetch the image for nothing
    /// and, worse, count bytes that never reached the disk.
    #[test]
    fn a_local_write_failure_is_final() {
        let path = Path::new("/dev/full");
        let file = OpenOptions::new().write(true).open(path).unwrap();
        let mut sink = Sink {
            file,
            pos: 0,
            buf: Vec::new(),
            md5: Md5::new(),
            digests: None,
        };
        let e = sink
            .push(&vec![7u8; 32 * BLOCK as usize], path)
            .unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("/dev/full"), "{e}");
    }

    #[tokio::test]
    async fn a_download_that_cannot_be_stored_is_not_retried() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU32::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req).await;
                let body = vec![9u8; 4 << 20];
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            }
        });
        let url = format!("http://{addr}/image.raw");
        let source = HttpRange::new(reqwest::Client::new(), url, "volume root").retries(5);
        let e = download(&source, Path::new("/dev/full"), 4 << 20, None, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/dev/full"), "{}", e.report());
        assert_eq!(requests.load(Ordering::SeqCst), 1, "{}", e.report());
    }

    /// A transfer that breaks is resumed at its first missing byte (by
    /// provider-kit's `HttpRange`); the file, md5 and digests are whole.
    #[tokio::test]
    async fn a_broken_transfer_is_resumed_and_the_file_is_whole() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let size = 3 * BLOCK + 100;
        let data: Arc<Vec<u8>> = Arc::new(
            (0..size)
                .map(|i| if i < BLOCK { 0 } else { (i % 251) as u8 })
                .collect(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU32::new(0));
        let (body, seen) = (data.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let mut req = [0u8; 4096];
                let len = s.read(&mut req).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&req[..len]).to_ascii_lowercase();
                let range = req
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .unwrap_or("0-")
                    .to_string();
                let (a, b) = range.split_once('-').unwrap();
                let a: usize = a.trim().parse().unwrap();
                let b: usize = b.trim().parse().unwrap_or(body.len() - 1);
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {a}-{b}/{}\r\nconnection: close\r\n\r\n",
                    b + 1 - a,
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                // The first answer breaks after 100 KiB.
                let end = if n == 0 { a + 100 * 1024 } else { b + 1 };
                let _ = s.write_all(&body[a..end]).await;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let want = hex(&Md5::digest(&data[..]));
        let source = HttpRange::new(
            reqwest::Client::new(),
            format!("http://{addr}/image.raw"),
            "volume data",
        );
        let d = download(&source, &path, size, Some(&want), true)
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()));
        assert_eq!(d.md5, want);
        assert_eq!(d.resumes, 1);
        assert_eq!(std::fs::read(&path).unwrap(), *data);
        let digests = d.digests.unwrap();
        assert_eq!(digests.len(), 4);
        assert_eq!(
            digests[1],
            <[u8; 32]>::from(Sha256::digest(&data[BLOCK as usize..2 * BLOCK as usize]))
        );
        assert_eq!(served.load(Ordering::SeqCst), 2);
    }

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn regions_merge_and_clip() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let vol = vec![a, b, b, a, b];
        let base = vec![a, a, a, a];
        let r = differing_regions(&vol, &base, 4 * BLOCK + 100);
        assert_eq!(
            r,
            vec![Extent::new(BLOCK, 2 * BLOCK), Extent::new(4 * BLOCK, 100)]
        );
    }
}
