//! An image behind an HTTP URL served as a read-only NBD export, so that
//! the host's data mover reads it like any qemu-nbd source: no staging
//! file, memory bounded whatever the image size.
//!
//! - [`HttpRange`]: ranged `GET`s on one URL. A read of `len` bytes at
//!   `offset` is one `GET` with `Range: bytes=offset-(offset+len-1)`; a
//!   transfer that breaks is resumed at the first missing byte (a new
//!   ranged `GET` of the rest), up to `retries` times per read, each resume
//!   counted ([`HttpRange::resumes`]). Nothing is written locally, so no
//!   local write can fail and be retried.
//! - [`HttpExport`]: an [`nbd::server::Export`] whose `read` is one
//!   [`HttpRange::read`]. Optionally a [`SequentialCheck`] (an md5, say)
//!   sees every byte of the image **in order, once**: the data mover reads
//!   in ascending order with a bounded number of reads in flight, but they
//!   may complete out of order, so reads that arrive ahead of the next
//!   expected offset are kept in a reorder buffer of at most
//!   `reorder_limit` bytes (default 64 MiB, above the standard mover's
//!   `depth × piece_size` and the NBD server's 32 MiB per-connection
//!   budget) until the gap is filled. A reader that gets further ahead
//!   than that (not the standard mover) switches the export to a
//!   **sequential verification pass**: the buffer is dropped and a
//!   background task reads the rest of the image again with ranged `GET`s,
//!   one chunk at a time; the read that ends at the image's end waits for
//!   that pass. The read that completes the check (or, with the pass, the
//!   final read) fails with the check's message when it fails, and every
//!   later read fails the same way (the data mover's retries cannot get
//!   past it). No allocation information is offered: every byte is read,
//!   so the check covers the whole image.
//! - [`LoopbackNbd`]: an [`nbd::server::Server`] on `127.0.0.1` (any free
//!   port) holding one backup's exports, closed deterministically.
//!
//! Locking: the check's state is a `std::sync::Mutex` held while feeding
//! in-order bytes to the check (hashing, no `.await`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use nbd::server::{Export, Server, ServerConfig};
use provider_api::{Error, ErrorKind, Result};
use reqwest::StatusCode;

/// Bytes per `GET` of a sequential pass.
pub const PASS_CHUNK: u64 = 4 << 20;

/// `url` without its query and user info (a capability or credential may
/// sit there), for errors and logs.
pub fn redact(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or("");
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}{path}")
        }
        None => no_query.to_string(),
    }
}

/// Ranged reads of one HTTP URL, resumed when a transfer breaks.
#[derive(Debug)]
pub struct HttpRange {
    http: reqwest::Client,
    url: String,
    what: String,
    retries: u32,
    resumes: AtomicU32,
}

impl HttpRange {
    /// Reads of `url` with `http`; `what` names the image in errors (e.g.
    /// `volume root (uuid)`). Five resumes per read unless
    /// [`HttpRange::retries`] says otherwise.
    pub fn new(http: reqwest::Client, url: impl Into<String>, what: impl Into<String>) -> Self {
        HttpRange {
            http,
            url: url.into(),
            what: what.into(),
            retries: 5,
            resumes: AtomicU32::new(0),
        }
    }

    /// Resumes of one read at most before it fails.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// How many broken transfers were resumed so far (all reads).
    pub fn resumes(&self) -> u32 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// The API call errors name: `GET <url without query>`.
    pub fn call(&self) -> String {
        format!("GET {}", redact(&self.url))
    }

    /// What errors name.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// `len` bytes at `offset`: one ranged `GET`, resumed at the first
    /// missing byte when the transfer breaks (up to `retries` times). An
    /// answer that is not the asked range (or a 4xx) is a platform error,
    /// never retried.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let mut buf = BytesMut::with_capacity(len as usize);
        let mut failures = 0u32;
        let mut last: Option<Error> = None;
        while (buf.len() as u64) < len {
            let from = offset + buf.len() as u64;
            if failures > self.retries {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    format!(
                        "reading {} bytes at offset {offset} of the export of {} broke and could not be resumed after {} retries",
                        len, self.what, self.retries
                    ),
                )
                .offset(from)
                .api_call(self.call())
                .with_source(last.unwrap_or_else(|| Error::other("unknown"))));
            }
            if failures > 0 {
                self.resumes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(what = %self.what, offset = from, "export transfer broke; resuming");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match self.get(from, offset + len, &mut buf).await {
                Ok(()) => {
                    if (buf.len() as u64) < len {
                        failures += 1;
                        last = Some(Error::new(
                            ErrorKind::DataPath,
                            format!("the transfer ended at {} of {len} bytes", buf.len()),
                        ));
                    }
                }
                Err(e) if e.kind() == ErrorKind::DataPath || e.is_retryable() => {
                    failures += 1;
                    last = Some(e);
                }
                Err(e) => return Err(e.offset(from).api_call(self.call())),
            }
        }
        Ok(buf.freeze())
    }

    /// One `GET` of `[from, end)` appended to `buf` (stops at `end`).
    async fn get(&self, from: u64, end: u64, buf: &mut BytesMut) -> Result<()> {
        let resp = self
            .http
            .get(&self.url)
            .header("Range", format!("bytes={from}-{}", end - 1))
            .send()
            .await
            .map_err(|e| {
                Error::new(ErrorKind::DataPath, "request failed").with_source(e.without_url())
            })?;
        let status = resp.status();
        match status {
            StatusCode::PARTIAL_CONTENT => {
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
                        format!("a read at offset {from} was answered Content-Range {range:?}"),
                    ));
                }
            }
            // A server without ranges: only usable from the start.
            StatusCode::OK if from == 0 => {}
            s => {
                return Err(Error::new(
                    ErrorKind::Platform,
                    format!(
                        "the export answered HTTP {} to a read at offset {from}",
                        s.as_u16()
                    ),
                )
                .retryable(s.is_server_error()));
            }
        }
        let want = (end - from) as usize;
        let mut resp = resp;
        let mut got = 0usize;
        while got < want {
            let chunk = resp.chunk().await.map_err(|e| {
                Error::new(ErrorKind::DataPath, "transfer broke").with_source(e.without_url())
            })?;
            let Some(chunk) = chunk else { break };
            let n = chunk.len().min(want - got);
            buf.extend_from_slice(&chunk[..n]);
            got += n;
        }
        Ok(())
    }
}

/// A check over every byte of an image in order (an md5 compared with
/// the platform's, say).
pub trait SequentialCheck: Send {
    /// The next bytes.
    fn update(&mut self, data: &[u8]);
    /// After the last byte: `Err` with a message naming what differs.
    fn finish(&mut self) -> std::result::Result<(), String>;
}

/// State of an export's in-order check.
struct CheckState {
    /// Bytes before this were given to the check.
    next: u64,
    /// Reads that arrived ahead of `next`, by offset.
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    /// `None` once finished or handed to the sequential pass.
    check: Option<Box<dyn SequentialCheck>>,
    /// The check's verdict, once known.
    outcome: Option<std::result::Result<(), String>>,
    /// Whether the sequential pass runs (or ran).
    pass: bool,
}

/// An image at an HTTP URL as a read-only NBD export (see the module docs).
pub struct HttpExport {
    source: Arc<HttpRange>,
    size: u64,
    reorder_limit: usize,
    check: Option<Mutex<CheckState>>,
    verdict: tokio::sync::watch::Sender<Option<std::result::Result<(), String>>>,
}

impl std::fmt::Debug for HttpExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpExport")
            .field("what", &self.source.what)
            .field("size", &self.size)
            .field("checked", &self.check.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpExport {
    /// The `size` bytes `source` reads, unchecked.
    pub fn new(source: Arc<HttpRange>, size: u64) -> Self {
        HttpExport {
            source,
            size,
            reorder_limit: 64 << 20,
            check: None,
            verdict: tokio::sync::watch::channel(None).0,
        }
    }

    /// Every byte goes through `check` in order, once.
    pub fn checked(mut self, check: Box<dyn SequentialCheck>) -> Self {
        self.check = Some(Mutex::new(CheckState {
            next: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            check: Some(check),
            outcome: None,
            pass: false,
        }));
        self
    }

    /// Bytes of out-of-order reads kept at most before the sequential
    /// pass takes over.
    pub fn reorder_limit(mut self, bytes: usize) -> Self {
        self.reorder_limit = bytes;
        self
    }

    /// The reader.
    pub fn source(&self) -> &Arc<HttpRange> {
        &self.source
    }

    /// The check's verdict: `None` while unknown (or without a check).
    pub fn verdict(&self) -> Option<std::result::Result<(), String>> {
        self.verdict.borrow().clone()
    }

    fn failure(&self, msg: &str) -> nbd::Error {
        nbd::Error::server(nbd::error::errno::EIO, msg.to_string())
    }

    /// Feeds a read to the check. Returns true when the sequential pass
    /// must start (the check is handed back to start it with).
    fn observe(&self, offset: u64, data: &Bytes) -> Option<(u64, Box<dyn SequentialCheck>)> {
        let cell = self.check.as_ref()?;
        let mut st = cell.lock().unwrap_or_else(|e| e.into_inner());
        st.check.as_ref()?;
        let end = offset + data.len() as u64;
        if end <= st.next {
            return None;
        }
        if offset > st.next {
            if st.pending_bytes + data.len() > self.reorder_limit {
                // Too far ahead: verify the rest with a second pass.
                st.pending.clear();
                st.pending_bytes = 0;
                st.pass = true;
                let next = st.next;
                return st.check.take().map(|c| (next, c));
            }
            st.pending_bytes += data.len();
            if let Some(old) = st.pending.insert(offset, data.clone()) {
                st.pending_bytes -= old.len();
            }
            return None;
        }
        let st = &mut *st;
        let check = st.check.as_mut()?;
        check.update(&data[(st.next - offset) as usize..]);
        st.next = end;
        // Drain what the gap held back.
        while let Some((&o, _)) = st.pending.first_key_value() {
            if o > st.next {
                break;
            }
            let (o, d) = st.pending.pop_first().expect("peeked");
            st.pending_bytes -= d.len();
            let e = o + d.len() as u64;
            if e > st.next {
                check.update(&d[(st.next - o) as usize..]);
                st.next = e;
            }
        }
        if st.next >= self.size {
            let verdict = check.finish();
            st.check = None;
            st.outcome = Some(verdict.clone());
            self.verdict.send_replace(Some(verdict));
        }
        None
    }

    /// The sequential pass: `[from, size)` read again in order.
    fn start_pass(&self, from: u64, mut check: Box<dyn SequentialCheck>) {
        tracing::info!(what = %self.source.what, from, "reads came out of order beyond the reorder buffer: verifying the rest with a sequential pass");
        let source = self.source.clone();
        let size = self.size;
        let verdict = self.verdict.clone();
        tokio::spawn(async move {
            let mut pos = from;
            let mut result = Ok(());
            while pos < size {
                let n = PASS_CHUNK.min(size - pos);
                match source.read(pos, n).await {
                    Ok(b) => check.update(&b),
                    Err(e) => {
                        result = Err(format!(
                            "the verification pass over the export of {} failed: {}",
                            source.what,
                            e.report()
                        ));
                        break;
                    }
                }
                pos += n;
            }
            if result.is_ok() {
                result = check.finish();
            }
            verdict.send_replace(Some(result));
        });
    }
}

#[async_trait]
impl Export for HttpExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn multi_conn(&self) -> bool {
        // The in-order check sees one reader's order.
        self.check.is_none()
    }

    async fn read(&self, offset: u64, len: u32) -> nbd::Result<Bytes> {
        if let Some(Err(msg)) = self.verdict() {
            return Err(self.failure(&msg));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let data = self
            .source
            .read(offset, u64::from(len))
            .await
            .map_err(|e| {
                let msg = format!(
                    "{}: reading {len} bytes at offset {offset} failed: {}",
                    self.source.what,
                    e.report()
                );
                tracing::warn!(what = %self.source.what, offset, "{msg}");
                self.failure(&msg)
            })?;
        if let Some((from, check)) = self.observe(offset, &data) {
            self.start_pass(from, check);
        }
        let pass = self
            .check
            .as_ref()
            .is_some_and(|c| c.lock().unwrap_or_else(|e| e.into_inner()).pass);
        if pass && offset + u64::from(len) >= self.size {
            // The last read waits for the sequential pass's verdict.
            let mut rx = self.verdict.subscribe();
            let _ = rx.wait_for(Option::is_some).await;
        }
        match self.verdict() {
            Some(Err(msg)) => Err(self.failure(&msg)),
            _ => Ok(data),
        }
    }
}

/// One backup's loopback NBD server: its own listener (closed on
/// [`LoopbackNbd::close`] or drop) and the server's connections.
pub struct LoopbackNbd {
    server: Server,
    address: SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for LoopbackNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackNbd")
            .field("address", &self.address)
            .field("exports", &self.server.export_names())
            .finish()
    }
}

impl LoopbackNbd {
    /// A server without exports listening on `127.0.0.1`, any free port.
    pub async fn start() -> Result<LoopbackNbd> {
        let server = Server::new(ServerConfig::default()).map_err(|e| {
            Error::new(ErrorKind::Other, "starting the loopback NBD server").with_source(e)
        })?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| {
                Error::new(ErrorKind::DataPath, "listening for NBD on 127.0.0.1").with_source(e)
            })?;
        let address = listener.local_addr().map_err(|e| {
            Error::new(ErrorKind::DataPath, "listening for NBD on 127.0.0.1").with_source(e)
        })?;
        let srv = server.clone();
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let srv = srv.clone();
                        tokio::spawn(async move {
                            if let Err(e) = srv.serve_stream(stream).await {
                                tracing::debug!("NBD connection ended: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("NBD accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(LoopbackNbd {
            server,
            address,
            accept: Some(accept),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Adds an export.
    pub fn add(&self, name: &str, export: Arc<dyn Export>) {
        self.server.add_export(name, export);
    }

    /// Stops listening (the port is closed when this returns), removes
    /// every export and closes every connection (in-flight requests get
    /// the server's grace, then are aborted).
    pub async fn close(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        for name in self.server.export_names() {
            self.server.remove_export(&name);
        }
        self.server.shutdown().await;
    }
}

/// A server dropped without [`LoopbackNbd::close`] (a job cleanup that
/// forgot its backups, a panic) still stops: the listener at once, the
/// connections in the background.
impl Drop for LoopbackNbd {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            for name in self.server.export_names() {
                self.server.remove_export(&name);
            }
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let server = self.server.clone();
                rt.spawn(async move { server.shutdown().await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concatenates what it sees; `finish` compares with the expected.
    struct Collect(Arc<Mutex<Vec<u8>>>, Vec<u8>);

    impl SequentialCheck for Collect {
        fn update(&mut self, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
        fn finish(&mut self) -> std::result::Result<(), String> {
            if *self.0.lock().unwrap() == self.1 {
                Ok(())
            } else {
                Err("differs".into())
            }
        }
    }

    fn export(limit: usize, want: Vec<u8>) -> (HttpExport, Arc<Mutex<Vec<u8>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let src = Arc::new(HttpRange::new(
            reqwest::Client::new(),
            "http://127.0.0.1:9/x",
            "t",
        ));
        let size = want.len() as u64;
        let e = HttpExport::new(src, size)
            .checked(Box::new(Collect(seen.clone(), want)))
            .reorder_limit(limit);
        (e, seen)
    }

    #[test]
    fn out_of_order_reads_are_checked_in_order() {
        let data: Vec<u8> = (0..100u8).collect();
        let (e, seen) = export(1000, data.clone());
        let piece = |a: usize, b: usize| Bytes::copy_from_slice(&data[a..b]);
        for (a, b) in [(20, 40), (60, 100), (0, 10), (10, 30), (40, 60)] {
            assert!(e.observe(a as u64, &piece(a, b)).is_none());
        }
        assert_eq!(*seen.lock().unwrap(), data);
        assert_eq!(e.verdict(), Some(Ok(())));
        // A retried read of checked bytes changes nothing.
        assert!(e.observe(0, &piece(0, 10)).is_none());
        assert_eq!(*seen.lock().unwrap(), data);
    }

    #[test]
    fn a_wrong_byte_fails_the_check() {
        let data: Vec<u8> = (0..100u8).collect();
        let (e, _) = export(1000, data.clone());
        let mut bad = data.clone();
        bad[70] ^= 1;
        e.observe(0, &Bytes::copy_from_slice(&bad[..50]));
        assert_eq!(e.verdict(), None);
        e.observe(50, &Bytes::copy_from_slice(&bad[50..]));
        assert_eq!(e.verdict(), Some(Err("differs".into())));
    }

    #[test]
    fn too_far_ahead_hands_over_to_a_sequential_pass() {
        let data: Vec<u8> = (0..100u8).collect();
        let (e, seen) = export(30, data.clone());
        assert!(e.observe(0, &Bytes::copy_from_slice(&data[..10])).is_none());
        assert!(
            e.observe(20, &Bytes::copy_from_slice(&data[20..40]))
                .is_none()
        );
        let (from, _check) = e
            .observe(40, &Bytes::copy_from_slice(&data[40..60]))
            .expect("pass");
        assert_eq!(from, 10);
        assert_eq!(*seen.lock().unwrap(), &data[..10]);
    }

    /// A one-file HTTP server with `Range`: byte `flip` served flipped,
    /// the first `breaks` responses cut after `cut` bytes.
    async fn serve(
        data: Arc<Vec<u8>>,
        flip: Option<usize>,
        breaks: u32,
        cut: usize,
    ) -> (String, Arc<AtomicU32>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}/img?token=secret", listener.local_addr().unwrap());
        let gets = Arc::new(AtomicU32::new(0));
        let counter = gets.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let data = data.clone();
                let n = counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while !req.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => req.extend_from_slice(&b[..k]),
                        }
                    }
                    let req = String::from_utf8_lossy(&req).to_lowercase();
                    let range = req
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .unwrap_or("0-")
                        .trim()
                        .to_string();
                    let (a, e) = range.split_once('-').unwrap();
                    let a: usize = a.parse().unwrap();
                    let e: usize = e
                        .parse::<usize>()
                        .map_or(data.len(), |e| e + 1)
                        .min(data.len());
                    let mut body = data[a..e].to_vec();
                    if let Some(f) = flip
                        && (a..e).contains(&f)
                    {
                        body[f - a] ^= 0xff;
                    }
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {a}-{}/{}\r\nconnection: close\r\n\r\n",
                        body.len(),
                        e - 1,
                        data.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let send = if n < breaks {
                        cut.min(body.len())
                    } else {
                        body.len()
                    };
                    let _ = s.write_all(&body[..send]).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (url, gets)
    }

    fn image(len: usize) -> Arc<Vec<u8>> {
        Arc::new((0..len).map(|i| (i * 7 % 251) as u8).collect())
    }

    #[tokio::test]
    async fn broken_transfers_are_resumed_at_the_first_missing_byte() {
        let data = image(300_000);
        let (url, _) = serve(data.clone(), None, 2, 1000).await;
        let src = HttpRange::new(reqwest::Client::new(), &url, "volume v").retries(2);
        let got = src.read(5000, 200_000).await.unwrap();
        assert_eq!(&got[..], &data[5000..205_000]);
        assert_eq!(src.resumes(), 2);

        // Breaking more often than the retries allow: a clear error.
        let (url, _) = serve(data.clone(), None, 10, 1000).await;
        let src = HttpRange::new(reqwest::Client::new(), &url, "volume v").retries(2);
        let e = src.read(0, 100_000).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DataPath);
        let text = e.report();
        assert!(text.contains("could not be resumed"), "{text}");
        assert!(text.contains("volume v"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(e.context().offset, Some(3000));
    }

    /// Reads `data` through `export` in pieces, in the given order.
    async fn read_all(export: &HttpExport, order: &[usize], piece: usize) -> nbd::Result<Vec<u8>> {
        let size = export.size() as usize;
        let mut out = vec![0u8; size];
        for &i in order {
            let off = i * piece;
            let len = piece.min(size - off);
            let b = export.read(off as u64, len as u32).await?;
            out[off..off + len].copy_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn the_check_sees_every_byte_once_and_a_flipped_byte_fails_the_read_that_ends_it() {
        let data = image(100_000);
        let want = data.to_vec();
        let (url, _) = serve(data.clone(), None, 0, 0).await;
        let src = Arc::new(HttpRange::new(reqwest::Client::new(), &url, "v"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let e =
            HttpExport::new(src, 100_000).checked(Box::new(Collect(seen.clone(), want.clone())));
        let got = read_all(&e, &[1, 0, 3, 2, 4], 20_000).await.unwrap();
        assert_eq!(got, want);
        assert_eq!(e.verdict(), Some(Ok(())));

        let (url, _) = serve(data.clone(), Some(45_000), 0, 0).await;
        let src = Arc::new(HttpRange::new(reqwest::Client::new(), &url, "v"));
        let e =
            HttpExport::new(src, 100_000).checked(Box::new(Collect(seen.clone(), want.clone())));
        seen.lock().unwrap().clear();
        // Pieces 0, 1, 3, 4 arrive; piece 2 fills the gap and ends the
        // check: it fails, and so does every later read.
        read_all(&e, &[0, 1, 3, 4], 20_000).await.unwrap();
        let err = e.read(40_000, 20_000).await.unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
        assert!(e.read(0, 10).await.is_err());
    }

    #[tokio::test]
    async fn a_reader_too_far_ahead_gets_a_sequential_pass_and_the_last_read_waits_for_it() {
        let data = image(100_000);
        let want = data.to_vec();
        let (url, gets) = serve(data.clone(), None, 0, 0).await;
        let src = Arc::new(HttpRange::new(reqwest::Client::new(), &url, "v"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let e = HttpExport::new(src, 100_000)
            .checked(Box::new(Collect(seen.clone(), want.clone())))
            .reorder_limit(30_000);
        // Backwards: the reorder buffer overflows at once.
        let got = read_all(&e, &[4, 3, 2, 1, 0], 20_000).await.unwrap();
        assert_eq!(got, want);
        // The last piece was read first: the pass may still be running.
        let mut rx = e.verdict.subscribe();
        let v = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("the pass ends")
            .unwrap()
            .clone();
        assert_eq!(v, Some(Ok(())));
        assert_eq!(*seen.lock().unwrap(), want);
        assert!(gets.load(Ordering::SeqCst) > 5, "the pass read again");

        // The pass finds a flipped byte: the last read fails.
        let (url, _) = serve(data.clone(), Some(99_000), 0, 0).await;
        let src = Arc::new(HttpRange::new(reqwest::Client::new(), &url, "v"));
        seen.lock().unwrap().clear();
        let e = HttpExport::new(src, 100_000)
            .checked(Box::new(Collect(seen.clone(), want.clone())))
            .reorder_limit(30_000);
        let r = read_all(&e, &[0, 2, 3, 1, 4], 20_000).await;
        assert!(r.is_err());
        assert_eq!(e.verdict(), Some(Err("differs".into())));
    }

    #[test]
    fn redaction_drops_query_and_user() {
        assert_eq!(
            redact("http://u:p@h:1/a/b?token=x"),
            "http://h:1/a/b".to_string()
        );
    }
}
