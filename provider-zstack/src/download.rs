//! Downloading an exported image into a local sparse file with ranged,
//! resumable GETs, checking its md5 and (optionally) recording a digest of
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
use std::time::Duration;

use md5::{Digest as _, Md5};
use provider_api::{Error, ErrorKind, Extent, Result};
use reqwest::StatusCode;
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

/// Downloads `url` into `path` (created sparse). A broken transfer is
/// resumed with `Range: bytes=<received>-` up to `retries` times; `what`
/// names the volume in errors. Checks the md5 when `expected_md5` is given.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    path: &Path,
    expected_md5: Option<&str>,
    want_digests: bool,
    retries: u32,
    what: &str,
) -> Result<Downloaded> {
    let call = format!("GET {}", redact(url));
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
    let mut size: Option<u64> = None;
    let mut resumes = 0u32;
    let mut last_error: Option<Error> = None;
    loop {
        let from = sink.received();
        if let Some(s) = size
            && from >= s
        {
            break;
        }
        if resumes > retries {
            let e = last_error.unwrap_or_else(|| Error::other("unknown"));
            return Err(Error::new(
                ErrorKind::DataPath,
                format!("export download of {what} broke and could not be resumed after {retries} retries"),
            )
            .offset(from)
            .api_call(&call)
            .with_source(e));
        }
        let mut req = http.get(url);
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let attempt: Result<()> = async {
            let resp = req.send().await.map_err(|e| {
                Error::new(ErrorKind::DataPath, "request failed").with_source(e.without_url())
            })?;
            let status = resp.status();
            match (from, status) {
                (0, StatusCode::OK) => {
                    size = Some(resp.content_length().ok_or_else(|| {
                        Error::new(ErrorKind::Platform, "the export sent no Content-Length")
                    })?);
                    sink.set_len(size.unwrap_or(0), path)?;
                }
                (_, StatusCode::PARTIAL_CONTENT) => {
                    let range = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let start = range
                        .strip_prefix("bytes ")
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse::<u64>().ok());
                    if start != Some(from) {
                        return Err(Error::new(
                            ErrorKind::Platform,
                            format!("resume at {from} answered Content-Range {range:?}"),
                        )
                        .retryable(false));
                    }
                    if size.is_none() {
                        let total = range.rsplit('/').next().and_then(|t| t.parse::<u64>().ok());
                        size = total;
                        sink.set_len(total.unwrap_or(0), path)?;
                    }
                }
                (_, s) => {
                    return Err(Error::new(
                        ErrorKind::Platform,
                        format!("the export answered HTTP {}", s.as_u16()),
                    )
                    .retryable(s.is_server_error()));
                }
            }
            let mut resp = resp;
            while let Some(chunk) = resp.chunk().await.map_err(|e| {
                Error::new(ErrorKind::DataPath, "transfer broke").with_source(e.without_url())
            })? {
                sink.push(&chunk, path)?;
            }
            Ok(())
        }
        .await;
        match attempt {
            Ok(()) => {
                let total = size.unwrap_or(0);
                if sink.received() < total {
                    resumes += 1;
                    last_error = Some(Error::new(
                        ErrorKind::DataPath,
                        format!("the transfer ended at {} of {total} bytes", sink.received()),
                    ));
                    tracing::warn!(
                        what,
                        offset = sink.received(),
                        "export download ended early; resuming"
                    );
                    continue;
                }
                break;
            }
            Err(e) if e.is_retryable() || e.kind() == ErrorKind::DataPath => {
                tracing::warn!(what, offset = sink.received(), error = %e.report(), "export download broke; resuming");
                resumes += 1;
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.offset(sink.received()).api_call(&call)),
        }
    }
    let n = sink.buf.len();
    sink.flush(n, path)?;
    let total = size.unwrap_or(0);
    if sink.pos != total {
        return Err(Error::new(
            ErrorKind::DataPath,
            format!(
                "export of {what} delivered {} bytes, expected {total}",
                sink.pos
            ),
        )
        .api_call(&call));
    }
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
        size: total,
        md5,
        digests: sink.digests,
        resumes,
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

/// A URL without query string or user info, for errors and logs.
pub fn redact(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or("");
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            format!("{scheme}://{rest}")
        }
        None => no_query.to_string(),
    }
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
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/image.raw");
        let e = download(
            &http,
            &url,
            Path::new("/dev/full"),
            None,
            false,
            5,
            "volume root",
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("/dev/full"), "{}", e.report());
        assert_eq!(requests.load(Ordering::SeqCst), 1, "{}", e.report());
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

    #[test]
    fn redaction_drops_query_and_user() {
        assert_eq!(redact("http://u:p@h:1/x?token=1"), "http://h:1/x");
    }
}
