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
//! The check runs on a thread of its own: a read's in-order bytes are
//! queued to it (no copy: slices of the read's buffer) and the read is
//! answered at once, so the data mover's hashing and compressing of one
//! piece overlap the check of the previous ones. At most `queue_limit`
//! bytes (default 32 MiB) wait in that queue; a read that finds more waits until the
//! thread catches up (memory stays bounded when the check is slower than
//! the mover). The read that queues the image's last bytes waits for the
//! verdict, as the last read waits for a sequential pass.
//!
//! Locking: the check's ordering state is a `std::sync::Mutex` held only
//! to order and queue bytes (no hashing, no `.await`); the check itself is
//! owned by its thread.

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

/// What the check's thread is sent, in order.
enum Feed {
    /// The next bytes.
    Data(Bytes),
    /// The image ended: finish and publish the verdict.
    End,
    /// The bytes could not be read (the sequential pass failed): publish
    /// this as the verdict.
    Failed(String),
}

/// The queue to the check's thread and the count of bytes in it.
#[derive(Clone, Debug)]
struct Feeder {
    queue: std::sync::mpsc::Sender<Feed>,
    queued: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Feeder {
    fn data(&self, bytes: Bytes) -> u64 {
        let n = bytes.len() as u64;
        if n > 0 {
            self.queued.send_modify(|q| *q += n);
            // A closed queue means the thread ended (panicked): the
            // verdict channel says so.
            let _ = self.queue.send(Feed::Data(bytes));
        }
        n
    }

    fn send(&self, feed: Feed) {
        let _ = self.queue.send(feed);
    }

    /// Waits while more than `limit` bytes wait to be checked.
    async fn backlog(&self, limit: u64) {
        let mut rx = self.queued.subscribe();
        let _ = rx.wait_for(|q| *q <= limit).await;
    }

    /// [`Feeder::backlog`], or until the check's thread has given its
    /// verdict or died (its queue is then never drained).
    async fn backlog_or_verdict(&self, limit: u64, verdict: &Verdict) {
        let mut verdict = verdict.clone();
        tokio::select! {
            _ = self.backlog(limit) => {}
            _ = verdict.wait_for(Option::is_some) => {}
        }
    }
}

/// The check's verdict as its thread publishes it (closed if it dies).
type Verdict = tokio::sync::watch::Receiver<Option<std::result::Result<(), String>>>;

/// State of an export's in-order check.
struct CheckState {
    /// Bytes before this were given to the check.
    next: u64,
    /// Reads that arrived ahead of `next`, by offset.
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    /// `None` once the image ended or the sequential pass took over.
    feeder: Option<Feeder>,
    /// Whether the sequential pass runs (or ran).
    pass: bool,
}

/// What a read's bytes did to the check.
#[derive(Debug)]
enum Step {
    /// Nothing to wait for: already checked, held back, or unchecked.
    Nothing,
    /// Bytes were queued for the check with this feeder.
    Queued(Feeder),
    /// The image's last bytes were queued: this read waits for the verdict.
    Ended,
    /// Too far ahead: the sequential pass starts at `from` with `feeder`.
    Pass(u64, Feeder),
}

/// An image at an HTTP URL as a read-only NBD export (see the module docs).
pub struct HttpExport {
    source: Arc<HttpRange>,
    size: u64,
    reorder_limit: usize,
    queue_limit: usize,
    check: Option<Mutex<CheckState>>,
    verdict: Verdict,
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
            queue_limit: 32 << 20,
            check: None,
            verdict: tokio::sync::watch::channel(None).1,
        }
    }

    /// Every byte goes through `check` in order, once, on a thread of its
    /// own (see the module docs).
    pub fn checked(mut self, mut check: Box<dyn SequentialCheck>) -> Self {
        let (verdict_tx, verdict) = tokio::sync::watch::channel(None);
        let (queue, rx) = std::sync::mpsc::channel::<Feed>();
        let queued = Arc::new(tokio::sync::watch::channel(0u64).0);
        let drained = queued.clone();
        let what = self.source.what.clone();
        let spawned = std::thread::Builder::new()
            .name("export-check".into())
            .spawn(move || {
                // Ends when every feeder is gone (the export dropped) or
                // the verdict is known; a panicking check drops
                // `verdict_tx`, which waiting reads see as a failure.
                while let Ok(feed) = rx.recv() {
                    match feed {
                        Feed::Data(b) => {
                            check.update(&b);
                            drained.send_modify(|q| *q -= b.len() as u64);
                        }
                        Feed::End => {
                            verdict_tx.send_replace(Some(check.finish()));
                            return;
                        }
                        Feed::Failed(msg) => {
                            verdict_tx.send_replace(Some(Err(msg)));
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // No thread, no check: every read fails rather than pass
            // unchecked bytes.
            let (tx, rx) = tokio::sync::watch::channel(Some(Err(format!(
                "the check of the export of {what} could not start a thread: {e}"
            ))));
            drop(tx);
            self.verdict = rx;
            return self;
        }
        self.verdict = verdict;
        self.check = Some(Mutex::new(CheckState {
            next: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            feeder: Some(Feeder { queue, queued }),
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

    /// Bytes queued for the check at most before reads wait for it.
    pub fn queue_limit(mut self, bytes: usize) -> Self {
        self.queue_limit = bytes;
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

    /// Waits for the check's verdict.
    async fn await_verdict(&self) -> std::result::Result<(), String> {
        let mut rx = self.verdict.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Ok(())),
            Err(_) => Err(format!(
                "the check of the export of {} stopped before its verdict",
                self.source.what
            )),
        }
    }

    fn failure(&self, msg: &str) -> nbd::Error {
        nbd::Error::server(nbd::error::errno::EIO, msg.to_string())
    }

    /// Queues a read's in-order bytes for the check (held back while a
    /// gap before them is open). No hashing here: the mutex is held only
    /// to order the bytes.
    fn observe(&self, offset: u64, data: &Bytes) -> Step {
        let Some(cell) = self.check.as_ref() else {
            return Step::Nothing;
        };
        let mut st = cell.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        let Some(feeder) = st.feeder.clone() else {
            return Step::Nothing;
        };
        let end = offset + data.len() as u64;
        if end <= st.next {
            return Step::Nothing;
        }
        if offset > st.next {
            if st.pending_bytes + data.len() > self.reorder_limit {
                // Too far ahead: verify the rest with a second pass.
                st.pending.clear();
                st.pending_bytes = 0;
                st.pass = true;
                st.feeder = None;
                return Step::Pass(st.next, feeder);
            }
            st.pending_bytes += data.len();
            if let Some(old) = st.pending.insert(offset, data.clone()) {
                st.pending_bytes -= old.len();
            }
            return Step::Nothing;
        }
        feeder.data(data.slice((st.next - offset) as usize..));
        st.next = end;
        // Drain what the gap held back.
        while let Some(first) = st.pending.first_entry() {
            if *first.key() > st.next {
                break;
            }
            let (o, d) = first.remove_entry();
            st.pending_bytes -= d.len();
            let e = o + d.len() as u64;
            if e > st.next {
                feeder.data(d.slice((st.next - o) as usize..));
                st.next = e;
            }
        }
        if st.next >= self.size {
            feeder.send(Feed::End);
            st.feeder = None;
            return Step::Ended;
        }
        Step::Queued(feeder)
    }

    /// The sequential pass: `[from, size)` read again in order.
    fn start_pass(&self, from: u64, feeder: Feeder) {
        tracing::info!(what = %self.source.what, from, "reads came out of order beyond the reorder buffer: verifying the rest with a sequential pass");
        let source = self.source.clone();
        let size = self.size;
        let limit = self.queue_limit as u64;
        let verdict = self.verdict.clone();
        tokio::spawn(async move {
            let mut pos = from;
            while pos < size {
                let n = PASS_CHUNK.min(size - pos);
                match source.read(pos, n).await {
                    Ok(b) => {
                        feeder.data(b);
                        feeder.backlog_or_verdict(limit, &verdict).await;
                    }
                    Err(e) => {
                        feeder.send(Feed::Failed(format!(
                            "the verification pass over the export of {} failed: {}",
                            source.what,
                            e.report()
                        )));
                        return;
                    }
                }
                pos += n;
            }
            feeder.send(Feed::End);
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
        let ended = match self.observe(offset, &data) {
            Step::Nothing => false,
            Step::Queued(feeder) => {
                // Bounded memory: a reader ahead of the check waits.
                feeder
                    .backlog_or_verdict(self.queue_limit as u64, &self.verdict)
                    .await;
                false
            }
            Step::Ended => true,
            Step::Pass(from, feeder) => {
                self.start_pass(from, feeder);
                false
            }
        };
        let pass = self
            .check
            .as_ref()
            .is_some_and(|c| c.lock().unwrap_or_else(|e| e.into_inner()).pass);
        if ended || (pass && offset + u64::from(len) >= self.size) {
            // The read that ends the image's bytes (or, with the pass,
            // the last read) waits for the verdict.
            if let Err(msg) = self.await_verdict().await {
                return Err(self.failure(&msg));
            }
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

    /// Waits until the check's thread has taken every queued byte (or
    /// given its verdict).
    async fn settled(e: &HttpExport) {
        let feeder = e.check.as_ref().unwrap().lock().unwrap().feeder.clone();
        match feeder {
            Some(f) => f.backlog(0).await,
            None => drop(e.await_verdict().await),
        }
    }

    #[tokio::test]
    async fn out_of_order_reads_are_checked_in_order() {
        let data: Vec<u8> = (0..100u8).collect();
        let (e, seen) = export(1000, data.clone());
        let piece = |a: usize, b: usize| Bytes::copy_from_slice(&data[a..b]);
        for (a, b) in [(20, 40), (60, 100), (0, 10), (10, 30)] {
            assert!(!matches!(
                e.observe(a as u64, &piece(a, b)),
                Step::Ended | Step::Pass(..)
            ));
        }
        settled(&e).await;
        assert_eq!(*seen.lock().unwrap(), &data[..40]);
        assert_eq!(e.verdict(), None);
        assert!(matches!(e.observe(40, &piece(40, 60)), Step::Ended));
        assert_eq!(e.await_verdict().await, Ok(()));
        assert_eq!(*seen.lock().unwrap(), data);
        // A retried read of checked bytes changes nothing.
        assert!(matches!(e.observe(0, &piece(0, 10)), Step::Nothing));
        assert_eq!(*seen.lock().unwrap(), data);
    }

    #[tokio::test]
    async fn a_wrong_byte_fails_the_check() {
        let data: Vec<u8> = (0..100u8).collect();
        let (e, _) = export(1000, data.clone());
        let mut bad = data.clone();
        bad[70] ^= 1;
        e.observe(0, &Bytes::copy_from_slice(&bad[..50]));
        settled(&e).await;
        assert_eq!(e.verdict(), None);
        e.observe(50, &Bytes::copy_from_slice(&bad[50..]));
        assert_eq!(e.await_verdict().await, Err("differs".into()));
    }

    #[tokio::test]
    async fn too_far_ahead_hands_over_to_a_sequential_pass() {
        let data: Vec<u8> = (0..100u8).collect();
        let (e, seen) = export(30, data.clone());
        e.observe(0, &Bytes::copy_from_slice(&data[..10]));
        assert!(matches!(
            e.observe(20, &Bytes::copy_from_slice(&data[20..40])),
            Step::Nothing
        ));
        let Step::Pass(from, feeder) = e.observe(40, &Bytes::copy_from_slice(&data[40..60])) else {
            panic!("no pass");
        };
        assert_eq!(from, 10);
        feeder.backlog(0).await;
        assert_eq!(*seen.lock().unwrap(), &data[..10]);
    }

    #[tokio::test]
    async fn a_reader_ahead_of_a_slow_check_waits_and_memory_stays_bounded() {
        /// A check that takes its time and records the most bytes queued.
        struct Slow;
        impl SequentialCheck for Slow {
            fn update(&mut self, _: &[u8]) {
                std::thread::sleep(Duration::from_millis(20));
            }
            fn finish(&mut self) -> std::result::Result<(), String> {
                Ok(())
            }
        }
        let data = image(1000);
        let (url, _) = serve(data.clone(), None, 0, 0).await;
        let src = Arc::new(HttpRange::new(reqwest::Client::new(), &url, "t"));
        let e = HttpExport::new(src, 1000)
            .checked(Box::new(Slow))
            .queue_limit(250);
        let most = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let feeder = e
            .check
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .feeder
            .clone()
            .unwrap();
        let mut rx = feeder.queued.subscribe();
        let watch_most = most.clone();
        let watcher = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let q = *rx.borrow();
                watch_most.fetch_max(q, Ordering::SeqCst);
            }
        });
        let order: Vec<usize> = (0..10).collect();
        let got = read_all(&e, &order, 100).await.unwrap();
        assert_eq!(got, *data);
        assert_eq!(e.verdict(), Some(Ok(())));
        drop(feeder);
        drop(e);
        let _ = tokio::time::timeout(Duration::from_secs(2), watcher).await;
        let most = most.load(Ordering::SeqCst);
        assert!(most <= 350, "{most} bytes were queued at once");
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
        let mut rx = e.verdict.clone();
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

    #[tokio::test]
    async fn a_check_that_dies_fails_the_reads_instead_of_hanging_them() {
        struct Dies;
        impl SequentialCheck for Dies {
            fn update(&mut self, _: &[u8]) {
                panic!("the check broke");
            }
            fn finish(&mut self) -> std::result::Result<(), String> {
                Ok(())
            }
        }
        let data = image(1000);
        let (url, _) = serve(data.clone(), None, 0, 0).await;
        let src = Arc::new(HttpRange::new(reqwest::Client::new(), &url, "v"));
        let e = HttpExport::new(src, 1000)
            .checked(Box::new(Dies))
            .queue_limit(150);
        let order: Vec<usize> = (0..10).collect();
        let r = tokio::time::timeout(Duration::from_secs(10), read_all(&e, &order, 100))
            .await
            .expect("reads must not hang on a dead check");
        let err = r.unwrap_err();
        assert!(
            err.to_string().contains("stopped before its verdict"),
            "{err}"
        );
    }

    #[test]
    fn redaction_drops_query_and_user() {
        assert_eq!(
            redact("http://u:p@h:1/a/b?token=x"),
            "http://h:1/a/b".to_string()
        );
    }
}
