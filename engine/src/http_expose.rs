//! Serving stored volumes over HTTP: restore sources for platforms that
//! pull an image from a URL themselves (ZStack's AddImage is fetched by
//! the backup storage host, never from the caller's loopback).
//!
//! [`HttpExposer`] listens on an address of the host's configuration
//! (`restore_listen`) and hands out URLs under the base URL the platform
//! reaches it by (`advertise_url`, default `http://<listen address>`).
//! Each exposed volume gets a one-time path `/<token>/<name>`, where the
//! token is 128 random bits (from the OS): the path is the capability,
//! nobody can guess another restore's URL, and dropping the guard
//! [`SourceExposer::expose`] returned withdraws it (a new request answers
//! `404`, a response still streaming is cut off).
//!
//! Requests: `GET` (the whole volume, `200`) and `GET` with one
//! `Range: bytes=a-b` / `bytes=a-` / `bytes=-n` (`206` with
//! `Content-Range`; an unsatisfiable range answers `416` with
//! `Content-Range: bytes */SIZE`; several ranges are answered with the
//! whole volume, as HTTP allows); `HEAD` answers the headers only, with
//! `Content-Length` and `Accept-Ranges: bytes`. Zero regions of the
//! stored volume are sent as zeroes without being read (sparse-aware on
//! the reading side; HTTP itself has no way to say "hole").
//!
//! The server is plain HTTP: run it on a backup network, or put a TLS
//! proxy in front of it and advertise the proxy's `https://` URL.

use provider_kit::lock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use provider_api::{Error, ErrorKind, RegionKind, Result, VolumeReader};

use crate::mover::SourceExposer;

/// Bytes per read of the stored volume (and per body chunk).
const CHUNK: u64 = 1 << 20;

static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];

struct Entry {
    name: String,
    reader: Arc<dyn VolumeReader>,
    withdrawn: AtomicBool,
}

type Entries = Arc<Mutex<HashMap<String, Arc<Entry>>>>;

/// Serves stored volumes over HTTP under one-time URLs (see the module
/// docs). The server stops when the exposer is dropped.
pub struct HttpExposer {
    address: SocketAddr,
    base_url: String,
    entries: Entries,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for HttpExposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpExposer")
            .field("address", &self.address)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Drop for HttpExposer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// 128 random bits from the operating system, in hex.
fn token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| {
            Error::new(
                ErrorKind::Io,
                "reading /dev/urandom for a restore URL token",
            )
            .with_source(e)
        })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl HttpExposer {
    /// Listen on `listen` (port 0: any free port) and advertise URLs under
    /// `advertise_url` (e.g. `http://10.0.0.5:8099`; default
    /// `http://<bound address>`, refused when the bound address is
    /// unspecified such as `0.0.0.0`, which no platform can reach).
    pub async fn start(listen: SocketAddr, advertise_url: Option<&str>) -> Result<Self> {
        let base_url = match advertise_url {
            Some(u) => {
                let u = u.trim_end_matches('/');
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(Error::invalid(format!(
                        "advertise_url {u:?}: an http:// or https:// URL expected"
                    )));
                }
                Some(u.to_owned())
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("listening for HTTP restore sources on {listen}"),
            )
            .with_source(e)
        })?;
        let address = listener.local_addr().map_err(|e| {
            Error::new(ErrorKind::Io, "the HTTP restore listener's address").with_source(e)
        })?;
        let base_url = match base_url {
            Some(u) => u,
            None if address.ip().is_unspecified() => {
                return Err(Error::invalid(format!(
                    "restore_listen {address} is not an address a platform can reach: set advertise_url"
                )));
            }
            None => format!("http://{address}"),
        };
        let entries: Entries = Arc::default();
        let app = Router::new()
            .route("/{token}/{name}", get(serve))
            .with_state(entries.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the HTTP restore source server stopped");
            }
        });
        Ok(HttpExposer {
            address,
            base_url,
            entries,
            server,
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The base URL handed-out URLs start with.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// How many volumes are exposed now.
    pub fn exposed(&self) -> usize {
        lock(&self.entries).len()
    }
}

struct Withdraw {
    entries: Entries,
    token: String,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if let Some(e) = lock(&self.entries).remove(&self.token) {
            e.withdrawn.store(true, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl SourceExposer for HttpExposer {
    async fn expose(
        &self,
        name: &str,
        reader: Arc<dyn VolumeReader>,
    ) -> Result<(String, Box<dyn Send + Sync>)> {
        let token = token()?;
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let file = format!("{safe}.raw");
        lock(&self.entries).insert(
            token.clone(),
            Arc::new(Entry {
                name: file.clone(),
                reader,
                withdrawn: AtomicBool::new(false),
            }),
        );
        let url = format!("{}/{token}/{file}", self.base_url);
        Ok((
            url,
            Box::new(Withdraw {
                entries: self.entries.clone(),
                token,
            }),
        ))
    }
}

/// One `Range` of a request: `Ok(None)` without one (or with several),
/// `Err` when it cannot be satisfied.
fn parse_range(h: &HeaderMap, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(v) = h.get(header::RANGE) else {
        return Ok(None);
    };
    let spec = v
        .to_str()
        .map_err(|_| ())?
        .trim()
        .strip_prefix("bytes=")
        .ok_or(())?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            let last: u64 = b.parse().map_err(|_| ())?;
            if last < start {
                return Err(());
            }
            last.saturating_add(1).min(size)
        };
        (start, end)
    };
    if start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such restore source\n").into_response()
}

async fn serve(
    State(entries): State<Entries>,
    Path((token, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(entry) = lock(&entries).get(&token).cloned() else {
        return not_found();
    };
    if entry.name != name {
        return not_found();
    }
    let size = entry.reader.size();
    let (status, start, end) = match parse_range(&headers, size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Err(()) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let stream = futures::stream::unfold((start, entry), move |(pos, entry)| async move {
        if pos >= end {
            return None;
        }
        if entry.withdrawn.load(Ordering::SeqCst) {
            return Some((
                Err(std::io::Error::other("the restore source was withdrawn")),
                (end, entry),
            ));
        }
        let n = CHUNK.min(end - pos);
        match read_chunk(&*entry.reader, pos, n).await {
            Ok(b) => Some((Ok(b), (pos + n, entry))),
            Err(e) => {
                tracing::warn!(error = %e.report(), offset = pos, "reading a restore source for HTTP");
                Some((Err(std::io::Error::other(e.report())), (end, entry)))
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// `n` bytes at `pos`; zero regions are not read.
async fn read_chunk(reader: &dyn VolumeReader, pos: u64, n: u64) -> Result<Bytes> {
    let regions = reader.regions(pos, n).await?;
    if regions.iter().all(|r| r.kind == RegionKind::Zero) && !regions.is_empty() {
        return Ok(Bytes::from_static(&ZEROS[..n as usize]));
    }
    reader.read_at(pos, n).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h, size)
    }

    #[test]
    fn ranges_parse_like_http_says() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 100))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 100))));
        assert_eq!(range("bytes=95-200", 100), Ok(Some((95, 100))));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=5-4", 100), Err(()));
        assert_eq!(range("items=0-1", 100), Err(()));
    }

    #[test]
    fn tokens_are_128_random_bits() {
        let a = token().unwrap();
        let b = token().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
