//! The standard data mover: NBD and file-handle sources, pipelined.
//!
//! Backup: the dirty regions (everything, a provider's list, or an NBD
//! dirty bitmap) are refined with `base:allocation` where the source has
//! it (holes and zero extents are recorded as zeroes without reading),
//! cut into pieces of [`MoverOptions::piece_size`] aligned to that size
//! (so pieces map onto the target's fixed chunks), read with up to
//! [`MoverOptions::depth`] reads in flight and handed to the target's
//! writer in order. Memory is bounded by `depth * piece_size` here plus
//! what the writer keeps in flight, whatever the disk size.
//!
//! Restore: the stored volume's regions are written to the provider's
//! destination the same way; inherited regions (overlay layer) are not
//! written, zero regions become NBD `WRITE_ZEROES` (or, on files, are
//! written only where the file holds non-zero data, so that fresh sparse
//! files stay sparse).

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use provider_api::{
    DirtyRegions, DirtySource, Error, ErrorKind, Extent, NbdAccess, NbdAddress, RegionKind, Result,
    SnapshotAccess, VolumeReader, WholeVolume,
};

use provider_kit::RetryPolicy;

use crate::mover::{BackupCopy, CopyStats, DataMover, Progress};

/// Tuning of the standard mover.
#[derive(Debug, Clone, Copy)]
pub struct MoverOptions {
    /// Bytes per read (a power of two; 4 MiB matches the datastore's
    /// default chunk).
    pub piece_size: u64,
    /// Reads in flight per volume.
    pub depth: usize,
    /// Bytes per second read from sources (and written to restore
    /// destinations) at most, over all volumes of this mover; `None`:
    /// unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Retries of NBD reads and block-status queries after a dropped
    /// connection or a transient I/O error (each retry on a fresh
    /// connection to the same export when the transport failed).
    pub retry: RetryPolicy,
    /// Longest wait for one NBD request's answer: a source that stops
    /// answering (a hung server, a cut network without a reset) is treated
    /// as a dropped connection after this long, retried as such, and fails
    /// the volume once the retries are spent.
    pub io_timeout: std::time::Duration,
}

impl Default for MoverOptions {
    fn default() -> Self {
        MoverOptions {
            piece_size: 4 << 20,
            depth: 8,
            bandwidth_limit: None,
            retry: RetryPolicy::default(),
            io_timeout: std::time::Duration::from_secs(120),
        }
    }
}

/// The standard mover.
#[derive(Debug, Clone, Default)]
pub struct StandardMover {
    options: MoverOptions,
    limiter: Option<Arc<RateLimiter>>,
}

impl StandardMover {
    /// A mover with these options.
    pub fn new(options: MoverOptions) -> Self {
        StandardMover {
            limiter: options
                .bandwidth_limit
                .map(|rate| Arc::new(RateLimiter::new(rate))),
            options,
        }
    }

    async fn throttle(&self, bytes: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(bytes).await;
        }
    }
}

/// Average-rate limiter: callers sleep until the bytes granted so far fit
/// the rate since the limiter started.
#[derive(Debug)]
struct RateLimiter {
    rate: u64,
    start: std::time::Instant,
    granted: std::sync::Mutex<u64>,
}

impl RateLimiter {
    fn new(rate: u64) -> Self {
        RateLimiter {
            rate: rate.max(1),
            start: std::time::Instant::now(),
            granted: std::sync::Mutex::new(0),
        }
    }

    async fn acquire(&self, bytes: u64) {
        let due = {
            let mut g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
            *g += bytes;
            std::time::Duration::from_secs_f64(*g as f64 / self.rate as f64)
        };
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

const ALLOCATION: &str = "base:allocation";

/// Dirty regions are refined with allocation information this much at a
/// time, which bounds the extent lists held in memory.
const WINDOW: u64 = 256 << 20;

fn data_path(what: &str, offset: u64, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::DataPath, what.to_owned())
        .offset(offset)
        .with_source(e)
}

fn nbd_options(access: &NbdAccess, contexts: &[&str]) -> nbd::client::ConnectOptions {
    let address = match &access.address {
        NbdAddress::Tcp { host, port } => nbd::client::Address::Tcp {
            host: host.clone(),
            port: *port,
        },
        NbdAddress::Unix(p) => nbd::client::Address::Unix(p.clone()),
    };
    let mut o = nbd::client::ConnectOptions::new(address, access.export.clone());
    if let Some(t) = &access.tls {
        o = o.tls(nbd::client::TlsClientConfig {
            ca_pem: t.ca_pem.clone(),
            client_cert_pem: t.client_cert_pem.clone(),
            client_key_pem: t.client_key_pem.clone(),
            server_name: t.server_name.clone(),
        });
    }
    for c in contexts {
        o = o.meta_context(*c);
    }
    o
}

async fn connect(access: &NbdAccess, contexts: &[&str]) -> Result<nbd::client::Client> {
    nbd::client::Client::connect(&nbd_options(access, contexts))
        .await
        .map_err(|e| connect_error(access, e))
}

fn connect_error(access: &NbdAccess, e: nbd::Error) -> Error {
    let kind = match e.kind() {
        nbd::ErrorKind::Tls(_) | nbd::ErrorKind::TlsRequired => ErrorKind::Refused,
        _ => ErrorKind::DataPath,
    };
    let retryable = kind == ErrorKind::DataPath && e.is_retryable();
    Error::new(kind, format!("connecting to NBD export {}", access.uri()))
        .retryable(retryable)
        .with_source(e)
}

/// What to do about a failed NBD request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection is gone (dropped, reset, timed out, shut down by the
    /// server): retry on a fresh one.
    Reconnect,
    /// The server failed this request but the connection is fine (out of
    /// memory, busy, an I/O error on a read): retry as is.
    Again,
    /// Retrying cannot help (protocol violation, bad request, ...).
    Fatal,
}

/// Classify an error of the nbd crate for retrying. `read`: the request
/// was a read, whose server-side EIO is retried (a bounded number of
/// times, like everything else).
fn classify(e: &nbd::Error, read: bool) -> Failure {
    match e.kind() {
        nbd::ErrorKind::Io | nbd::ErrorKind::Disconnected(_) => Failure::Reconnect,
        nbd::ErrorKind::Server { errno, .. } if *errno == nbd::error::errno::ESHUTDOWN => {
            Failure::Reconnect
        }
        nbd::ErrorKind::Server { errno, .. } if read && *errno == nbd::error::errno::EIO => {
            Failure::Again
        }
        _ if e.is_retryable() => Failure::Again,
        _ => Failure::Fatal,
    }
}

/// A generation number no connection has.
const NO_GENERATION: u64 = u64::MAX;

/// A backup source's NBD connection, shared by all reads of a volume,
/// replaced by a fresh one (same export, TLS settings and meta contexts)
/// when the transport fails. Readers take a clone of the current client
/// (no lock is held across a request); the first reader that fails on a
/// given generation reconnects, the others wait for it and use its
/// connection.
struct NbdConn {
    access: NbdAccess,
    contexts: Vec<String>,
    retry: RetryPolicy,
    io_timeout: std::time::Duration,
    size: u64,
    current: std::sync::Mutex<(u64, nbd::client::Client)>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl NbdConn {
    fn new(
        access: NbdAccess,
        contexts: &[&str],
        retry: RetryPolicy,
        io_timeout: std::time::Duration,
        client: nbd::client::Client,
    ) -> NbdConn {
        NbdConn {
            access,
            contexts: contexts.iter().map(|c| (*c).to_owned()).collect(),
            retry,
            io_timeout,
            size: client.size(),
            current: std::sync::Mutex::new((0, client)),
            reconnecting: tokio::sync::Mutex::new(()),
        }
    }

    fn current(&self) -> (u64, nbd::client::Client) {
        let g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (g.0, g.1.clone())
    }

    /// The generation of the current connection (1 + reconnects so far).
    #[cfg(test)]
    fn generation(&self) -> u64 {
        self.current().0
    }

    /// Replace the connection of generation `failed`, unless another
    /// reader did already.
    async fn reconnect(&self, failed: u64) -> Result<()> {
        let _one = self.reconnecting.lock().await;
        if self.current().0 != failed {
            return Ok(());
        }
        let contexts: Vec<&str> = self.contexts.iter().map(String::as_str).collect();
        let client = nbd::client::Client::connect(&nbd_options(&self.access, &contexts))
            .await
            .map_err(|e| connect_error(&self.access, e))?;
        if client.size() != self.size {
            return Err(Error::new(
                ErrorKind::DataPath,
                format!(
                    "NBD export {} has {} bytes after reconnecting, {} before",
                    self.access.uri(),
                    client.size(),
                    self.size
                ),
            )
            .retryable(false));
        }
        let selected = client.meta_contexts();
        if let Some(missing) = self.contexts.iter().find(|c| !selected.contains(c)) {
            return Err(Error::new(
                ErrorKind::ChangeTrackingLost,
                format!(
                    "NBD export {} no longer offers {missing} after reconnecting",
                    self.access.uri()
                ),
            )
            .retryable(false));
        }
        tracing::info!(
            export = %self.access.uri(),
            generation = failed + 1,
            "reconnected to the NBD export"
        );
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *g = (failed + 1, client);
        Ok(())
    }

    /// Run `op` on the current client with retries: `what` names the
    /// operation in errors and logs, `read` whether it is a read.
    async fn request<T, F, Fut>(&self, what: &str, offset: u64, read: bool, op: F) -> Result<T>
    where
        F: Fn(nbd::client::Client) -> Fut,
        Fut: std::future::Future<Output = nbd::Result<T>>,
    {
        // The generation whose connection failed, to replace before the
        // next attempt.
        let stale = std::sync::atomic::AtomicU64::new(NO_GENERATION);
        let attempts = self.retry.attempts.max(1);
        let label = format!("{what} of {} at {offset}", self.access.export);
        provider_kit::retry(&self.retry, &label, |attempt| {
            let stale = &stale;
            let op = &op;
            async move {
                let failed = stale.swap(NO_GENERATION, std::sync::atomic::Ordering::Relaxed);
                if failed != NO_GENERATION
                    && let Err(e) = self.reconnect(failed).await
                {
                    // Still on the broken connection: try again next time.
                    stale.store(failed, std::sync::atomic::Ordering::Relaxed);
                    return Err(e.offset(offset));
                }
                let (generation, client) = self.current();
                let Ok(answer) = tokio::time::timeout(self.io_timeout, op(client)).await else {
                    // No answer: handle it as a dead connection.
                    stale.store(generation, std::sync::atomic::Ordering::Relaxed);
                    let gave_up = if attempt >= attempts && attempts > 1 {
                        format!(" (gave up after {attempts} attempts)")
                    } else {
                        String::new()
                    };
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "{what}: NBD export {} did not answer within {:?}{gave_up}",
                            self.access.uri(),
                            self.io_timeout
                        ),
                    )
                    .offset(offset)
                    .retryable(true));
                };
                match answer {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        let failure = classify(&e, read);
                        if failure == Failure::Reconnect {
                            stale.store(generation, std::sync::atomic::Ordering::Relaxed);
                        }
                        let retryable = failure != Failure::Fatal;
                        let message = if retryable && attempt >= attempts && attempts > 1 {
                            format!("{what} (gave up after {attempts} attempts)")
                        } else {
                            what.to_owned()
                        };
                        Err(data_path(&message, offset, e).retryable(retryable))
                    }
                }
            }
        })
        .await
    }
}

/// A backup source.
enum Source {
    Nbd {
        conn: Arc<NbdConn>,
        allocation: bool,
        bitmap: Option<String>,
    },
    File(Arc<std::fs::File>),
}

impl Source {
    async fn open(
        access: &SnapshotAccess,
        want_bitmap: bool,
        retry: RetryPolicy,
        io_timeout: std::time::Duration,
    ) -> Result<Source> {
        match access {
            SnapshotAccess::Nbd(n) => {
                let mut contexts = vec![ALLOCATION];
                let bitmap = if want_bitmap {
                    let b = n.dirty_bitmap_context.as_deref().ok_or_else(|| {
                        Error::invalid(format!(
                            "dirty regions come from the NBD bitmap but export {} names none",
                            n.uri()
                        ))
                    })?;
                    contexts.push(b);
                    Some(b.to_owned())
                } else {
                    None
                };
                let client = connect(n, &contexts).await?;
                let selected = client.meta_contexts();
                if let Some(b) = &bitmap
                    && !selected.iter().any(|c| c == b)
                {
                    return Err(Error::new(
                        ErrorKind::ChangeTrackingLost,
                        format!("NBD export {} does not offer {b}", n.uri()),
                    ));
                }
                let allocation = selected.iter().any(|c| c == ALLOCATION);
                // Reconnect with what was selected the first time.
                let contexts: Vec<&str> = contexts
                    .into_iter()
                    .filter(|c| selected.iter().any(|s| s == c))
                    .collect();
                Ok(Source::Nbd {
                    conn: Arc::new(NbdConn::new(
                        n.clone(),
                        &contexts,
                        retry,
                        io_timeout,
                        client,
                    )),
                    allocation,
                    bitmap,
                })
            }
            SnapshotAccess::FileHandle(f) => {
                let file = std::fs::File::open(&f.path).map_err(|e| {
                    Error::new(ErrorKind::DataPath, format!("opening {}", f.path.display()))
                        .with_source(e)
                })?;
                Ok(Source::File(Arc::new(file)))
            }
            other => Err(unsupported_access(other)),
        }
    }

    fn size(&self) -> Option<u64> {
        match self {
            Source::Nbd { conn, .. } => Some(conn.size),
            Source::File(f) => f.metadata().ok().map(|m| m.len()),
        }
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        match self {
            Source::Nbd { conn, .. } => {
                conn.request(
                    "reading the snapshot over NBD",
                    offset,
                    true,
                    |c| async move { c.read(offset, len as usize).await },
                )
                .await
            }
            Source::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, offset).map(|_| Bytes::from(buf))
                })
                .await
                .map_err(|e| Error::other("read task failed").with_source(e))?
                .map_err(|e| data_path("reading the snapshot file", offset, e))
            }
        }
    }

    /// `(extent, is_zero)` pieces covering `extent`, from base:allocation.
    async fn allocation(&self, extent: Extent) -> Result<Vec<(Extent, bool)>> {
        let Source::Nbd {
            conn,
            allocation: true,
            ..
        } = self
        else {
            return Ok(vec![(extent, false)]);
        };
        let mut out = Vec::new();
        let mut pos = extent.offset;
        while pos < extent.end() {
            let len = (extent.end() - pos).min(1 << 30);
            let list = conn
                .request("querying allocation over NBD", pos, false, |c| async move {
                    c.block_status(pos, len, ALLOCATION).await
                })
                .await?;
            let before = pos;
            for e in list {
                let start = e.offset.max(pos);
                let end = e.end().min(extent.end());
                if start >= end {
                    continue;
                }
                out.push((Extent::new(start, end - start), e.is_zero()));
                pos = end;
            }
            if pos == before {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    "NBD server answered block status without progress",
                )
                .offset(pos));
            }
        }
        Ok(out)
    }
}

/// Dirty regions from an NBD dirty bitmap.
struct BitmapRegions {
    conn: Arc<NbdConn>,
    context: String,
    size: u64,
    pos: u64,
    pending: VecDeque<Extent>,
}

#[async_trait]
impl DirtyRegions for BitmapRegions {
    async fn next_dirty_region(&mut self) -> Result<Option<Extent>> {
        while self.pending.is_empty() && self.pos < self.size {
            let len = (self.size - self.pos).min(1 << 30);
            let (pos, context) = (self.pos, self.context.as_str());
            let list = self
                .conn
                .request(
                    "querying the dirty bitmap over NBD",
                    pos,
                    false,
                    |c| async move { c.block_status(pos, len, context).await },
                )
                .await?;
            let before = self.pos;
            for e in list {
                let start = e.offset.max(self.pos);
                let end = e.end().min(self.size);
                if start >= end {
                    continue;
                }
                if e.is_dirty() {
                    match self.pending.back_mut() {
                        Some(last) if last.end() == start => last.length += end - start,
                        _ => self.pending.push_back(Extent::new(start, end - start)),
                    }
                }
                self.pos = end;
            }
            if self.pos == before {
                return Err(Error::new(
                    ErrorKind::DataPath,
                    "NBD server answered block status without progress",
                )
                .offset(self.pos));
            }
        }
        Ok(self.pending.pop_front())
    }
}

/// A step of a copy: zeroes to record, or a piece to read.
enum Step {
    Zero(Extent),
    Read(Extent),
}

fn pieces(extent: Extent, piece: u64, out: &mut VecDeque<Step>) {
    let mut pos = extent.offset;
    while pos < extent.end() {
        let boundary = (pos / piece + 1) * piece;
        let end = boundary.min(extent.end());
        out.push_back(Step::Read(Extent::new(pos, end - pos)));
        pos = end;
    }
}

#[async_trait]
impl DataMover for StandardMover {
    async fn backup_volume(&self, copy: BackupCopy, progress: &dyn Progress) -> Result<CopyStats> {
        let BackupCopy {
            device,
            size,
            access,
            dirty,
            mut writer,
        } = copy;
        let source = Arc::new(
            Source::open(
                &access,
                matches!(dirty, DirtySource::NbdBitmap),
                self.options.retry,
                self.options.io_timeout,
            )
            .await?,
        );
        if let Some(actual) = source.size()
            && actual < size
        {
            return Err(Error::invalid(format!(
                "snapshot of {device} has {actual} bytes, the volume {size}"
            )));
        }
        let mut regions: Box<dyn DirtyRegions> = match dirty {
            DirtySource::All => Box::new(WholeVolume::new(size)),
            DirtySource::Regions(r) => r,
            DirtySource::NbdBitmap => match &*source {
                Source::Nbd {
                    conn,
                    bitmap: Some(context),
                    ..
                } => Box::new(BitmapRegions {
                    conn: conn.clone(),
                    context: context.clone(),
                    size,
                    pos: 0,
                    pending: VecDeque::new(),
                }),
                _ => {
                    return Err(Error::invalid(format!(
                        "dirty regions of {device} come from an NBD bitmap, but its access is not NBD"
                    )));
                }
            },
            _ => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("a source of dirty regions this host does not know, for {device}"),
                ));
            }
        };
        let total = size;
        let piece = self.options.piece_size.max(4096);
        let depth = self.options.depth.max(1);
        let mut stats = CopyStats::default();
        let mut steps: VecDeque<Step> = VecDeque::new();
        let mut in_flight = FuturesOrdered::new();
        let mut regions_done = false;
        let mut window: Option<Extent> = None;
        let mut last_end = 0u64;
        let mut done = 0u64;
        loop {
            // Keep the queue fed: the rest of the current dirty region in
            // windows (so that allocation maps stay small whatever the
            // disk size), then the next region.
            while steps.len() < depth && !(regions_done && window.is_none()) {
                let r = match window.take() {
                    Some(r) => r,
                    None => match regions
                        .next_dirty_region()
                        .await
                        .map_err(|e| e.volume(&device))?
                    {
                        None => {
                            regions_done = true;
                            continue;
                        }
                        Some(r) => {
                            if r.offset < last_end || r.end() > size {
                                return Err(Error::invalid(format!(
                                    "dirty region {}+{} of {device} is out of order or past the end ({size})",
                                    r.offset, r.length
                                )));
                            }
                            last_end = r.end();
                            r
                        }
                    },
                };
                let this = Extent::new(r.offset, r.length.min(WINDOW));
                if this.end() < r.end() {
                    window = Some(Extent::new(this.end(), r.end() - this.end()));
                }
                for (e, zero) in source
                    .allocation(this)
                    .await
                    .map_err(|e| e.volume(&device))?
                {
                    if zero {
                        steps.push_back(Step::Zero(e));
                    } else {
                        pieces(e, piece, &mut steps);
                    }
                }
            }
            // Launch reads; zero steps ride along in order.
            while in_flight.len() < depth {
                let Some(step) = steps.pop_front() else { break };
                if let Step::Read(e) = &step {
                    self.throttle(e.length).await;
                }
                let src = source.clone();
                in_flight.push_back(async move {
                    match step {
                        Step::Zero(e) => Ok((e, None)),
                        Step::Read(e) => src.read(e.offset, e.length).await.map(|b| (e, Some(b))),
                    }
                });
            }
            let Some(next) = in_flight.next().await else {
                if steps.is_empty() && regions_done && window.is_none() {
                    break;
                }
                continue;
            };
            let (extent, data) = next.map_err(|e| e.volume(&device))?;
            match data {
                Some(bytes) if bytes.iter().any(|b| *b != 0) => {
                    stats.bytes_read += extent.length;
                    writer.write(extent.offset, bytes).await?;
                }
                Some(_) => {
                    stats.bytes_read += extent.length;
                    writer.write_zeroes(extent.offset, extent.length).await?;
                }
                None => {
                    stats.bytes_zero += extent.length;
                    writer.write_zeroes(extent.offset, extent.length).await?;
                }
            }
            done += extent.length;
            progress.update(&device, done, total);
        }
        stats.target = writer.finish().await?;
        Ok(stats)
    }

    async fn restore_volume(
        &self,
        device: &str,
        source: Arc<dyn VolumeReader>,
        destination: &SnapshotAccess,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let size = source.size();
        let dest = Destination::open(destination, self.options.io_timeout).await?;
        if let Some(actual) = dest.size()
            && actual < size
        {
            return Err(Error::invalid(format!(
                "restore destination of {device} has {actual} bytes, the volume {size}"
            )));
        }
        let dest = Arc::new(dest);
        let piece = self.options.piece_size.max(4096);
        let mut written = 0u64;
        let mut done = 0u64;
        // Regions are listed a window at a time so that the step list
        // stays small whatever the volume size.
        let mut pos = 0u64;
        while pos < size {
            let len = (size - pos).min(WINDOW);
            let mut steps = VecDeque::new();
            for r in source
                .regions(pos, len)
                .await
                .map_err(|e| e.volume(device))?
            {
                match r.kind {
                    RegionKind::Data => pieces(r.extent, piece, &mut steps),
                    RegionKind::Zero => steps.push_back(Step::Zero(r.extent)),
                    RegionKind::Inherited => done += r.extent.length,
                }
            }
            pos += len;
            let mut tasks = futures::stream::iter(steps.into_iter().map(|step| {
                let source = source.clone();
                let dest = dest.clone();
                async move {
                    match step {
                        Step::Read(e) => {
                            self.throttle(e.length).await;
                            let data = source.read_at(e.offset, e.length).await?;
                            dest.write(e.offset, data).await?;
                            Ok::<_, Error>((e.length, e.length))
                        }
                        Step::Zero(e) => {
                            dest.write_zeroes(e.offset, e.length).await?;
                            Ok((e.length, 0))
                        }
                    }
                }
            }))
            .buffer_unordered(self.options.depth.max(1));
            while let Some(r) = tasks.next().await {
                let (len, data) = r.map_err(|e| e.volume(device))?;
                done += len;
                written += data;
                progress.update(device, done, size);
            }
        }
        dest.flush().await.map_err(|e| e.volume(device))?;
        Ok(written)
    }
}

/// A restore destination.
enum Destination {
    /// An NBD export; every request must be answered within `io_timeout`.
    Nbd {
        client: nbd::client::Client,
        uri: String,
        io_timeout: std::time::Duration,
    },
    File(Arc<std::fs::File>),
}

/// Wait for an NBD destination's answer at most `limit`: a destination
/// that stops answering fails the volume instead of hanging the restore.
async fn answered<T>(
    limit: std::time::Duration,
    uri: &str,
    what: &str,
    offset: u64,
    op: impl std::future::Future<Output = nbd::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, op).await {
        Ok(r) => r.map_err(|e| data_path(what, offset, e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("{what}: NBD export {uri} did not answer within {limit:?}"),
        )
        .offset(offset)),
    }
}

impl Destination {
    async fn open(access: &SnapshotAccess, io_timeout: std::time::Duration) -> Result<Destination> {
        match access {
            SnapshotAccess::Nbd(n) => {
                let client = connect(n, &[]).await?;
                if client.is_read_only() {
                    return Err(Error::invalid(format!(
                        "restore destination {} is read-only",
                        n.uri()
                    )));
                }
                Ok(Destination::Nbd {
                    client,
                    uri: n.uri(),
                    io_timeout,
                })
            }
            SnapshotAccess::FileHandle(f) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&f.path)
                    .map_err(|e| {
                        Error::new(ErrorKind::DataPath, format!("opening {}", f.path.display()))
                            .with_source(e)
                    })?;
                Ok(Destination::File(Arc::new(file)))
            }
            other => Err(unsupported_access(other)),
        }
    }

    fn size(&self) -> Option<u64> {
        match self {
            Destination::Nbd { client, .. } => Some(client.size()),
            Destination::File(f) => f.metadata().ok().map(|m| m.len()),
        }
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        match self {
            Destination::Nbd {
                client,
                uri,
                io_timeout,
            } => answered(
                *io_timeout,
                uri,
                "writing the restore destination over NBD",
                offset,
                client.write_bytes(offset, data, false),
            )
            .await
            .map(|_| ()),
            Destination::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
                    .await
                    .map_err(|e| Error::other("write task failed").with_source(e))?
                    .map_err(|e| data_path("writing the restore file", offset, e))
            }
        }
    }

    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        match self {
            Destination::Nbd {
                client: c,
                uri,
                io_timeout,
            } => {
                let what = "zeroing the restore destination over NBD";
                let mut pos = offset;
                while pos < offset + length {
                    let n = if c.can_write_zeroes() {
                        let n = (offset + length - pos).min(1 << 30);
                        answered(*io_timeout, uri, what, pos, c.write_zeroes(pos, n, false))
                            .await?;
                        n
                    } else {
                        let n = (offset + length - pos).min(4 << 20);
                        let zeroes = Bytes::from(vec![0; n as usize]);
                        answered(
                            *io_timeout,
                            uri,
                            what,
                            pos,
                            c.write_bytes(pos, zeroes, false),
                        )
                        .await?;
                        n
                    };
                    pos += n;
                }
                Ok(())
            }
            Destination::File(f) => {
                // Zeroes become holes: nothing is read or written, and the
                // file stays sparse (a fresh file already reads as zeroes
                // there; an old one is deallocated).
                let f = f.clone();
                tokio::task::spawn_blocking(move || {
                    if punch_hole(&f, offset, length)? {
                        return Ok(());
                    }
                    // The filesystem cannot punch holes: overwrite only the
                    // parts that are not zero already.
                    let chunk = 1 << 20;
                    let mut buf = vec![0u8; chunk];
                    let zero = vec![0u8; chunk];
                    let mut pos = offset;
                    let end = offset + length;
                    while pos < end {
                        let n = (end - pos).min(chunk as u64) as usize;
                        let got = f.read_at(&mut buf[..n], pos)?;
                        if buf[..got].iter().any(|b| *b != 0) {
                            f.write_all_at(&zero[..n], pos)?;
                        }
                        pos += n as u64;
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await
                .map_err(|e| Error::other("write task failed").with_source(e))?
                .map_err(|e| data_path("zeroing the restore file", offset, e))
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        match self {
            Destination::Nbd {
                client,
                uri,
                io_timeout,
            } => {
                if client.can_flush() {
                    let what = "flushing the restore destination";
                    answered(*io_timeout, uri, what, 0, client.flush()).await?;
                }
                Ok(())
            }
            Destination::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.sync_all())
                    .await
                    .map_err(|e| Error::other("sync task failed").with_source(e))?
                    .map_err(|e| data_path("syncing the restore file", 0, e))
            }
        }
    }
}

/// Deallocate `length` bytes at `offset` (they read as zeroes after);
/// `Ok(false)` when the filesystem does not support it.
fn punch_hole(file: &std::fs::File, offset: u64, length: u64) -> std::io::Result<bool> {
    use rustix::fs::{FallocateFlags, fallocate};
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        length,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// An access kind added to the contract after this host was written.
fn unsupported_access(access: &SnapshotAccess) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("snapshot access {access:?} is not supported by this host"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rate_limiter_never_exceeds_the_rate() {
        let l = RateLimiter::new(4 << 20);
        let start = std::time::Instant::now();
        for _ in 0..8 {
            l.acquire(256 << 10).await;
        }
        // 2 MiB at 4 MiB/s cannot take less than half a second.
        assert!(start.elapsed() >= std::time::Duration::from_millis(490));
    }

    #[test]
    fn pieces_are_aligned_to_the_piece_size() {
        let mut steps = VecDeque::new();
        pieces(Extent::new(1000, 10_000), 4096, &mut steps);
        let got: Vec<(u64, u64)> = steps
            .iter()
            .map(|s| match s {
                Step::Read(e) => (e.offset, e.length),
                Step::Zero(_) => unreachable!(),
            })
            .collect();
        assert_eq!(got, [(1000, 3096), (4096, 4096), (8192, 2808)]);
    }

    const MIB: u64 = 1 << 20;

    /// A TCP proxy in front of `server` that drops each of its first
    /// `drops` connections (every connection when `None`) once it has
    /// sent `limit` bytes to the client. Returns its port and the number
    /// of connections accepted so far.
    async fn flaky_proxy(
        server: std::net::SocketAddr,
        limit: u64,
        drops: Option<usize>,
    ) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let flaky = drops.is_none_or(|d| n < d);
                let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut sent = 0u64;
                    loop {
                        let got = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(got) => got,
                        };
                        if flaky && sent + got as u64 > limit {
                            break;
                        }
                        if cw.write_all(&buf[..got]).await.is_err() {
                            break;
                        }
                        sent += got as u64;
                    }
                    // Drop both directions: the client sees a reset or EOF.
                    up.abort();
                });
            }
        });
        (port, accepted)
    }

    async fn served_disk() -> (nbd::server::Server, std::net::SocketAddr, Vec<u8>) {
        let size = 16 * MIB as usize;
        let content: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        let export = nbd::server::MemoryExport::new(size as u64).with_dirty_bitmap("cbt0");
        export.fill(0, &content).unwrap();
        // What the guest wrote since the checkpoint: 1 MiB at 4 MiB.
        let o = 4 * MIB as usize;
        nbd::server::Export::write(
            &export,
            4 * MIB,
            Bytes::copy_from_slice(&content[o..o + MIB as usize]),
            false,
        )
        .await
        .unwrap();
        // And 64 KiB of every 256 KiB after 8 MiB: many dirty extents.
        for o in (8 * MIB..16 * MIB).step_by(256 << 10) {
            let u = o as usize;
            nbd::server::Export::write(
                &export,
                o,
                Bytes::copy_from_slice(&content[u..u + (64 << 10)]),
                false,
            )
            .await
            .unwrap();
        }
        let server = nbd::server::Server::new(nbd::server::ServerConfig::default()).unwrap();
        server.add_export("disk", Arc::new(export));
        let addr = server
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        (server, addr, content)
    }

    const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

    /// An export that accepts connections and never answers a read.
    struct Hung(u64);

    #[async_trait]
    impl nbd::server::Export for Hung {
        fn size(&self) -> u64 {
            self.0
        }
        async fn read(&self, _offset: u64, _len: u32) -> nbd::Result<Bytes> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_source_that_stops_answering_fails_within_the_timeout() {
        let server = nbd::server::Server::new(nbd::server::ServerConfig::default()).unwrap();
        server.add_export("disk", Arc::new(Hung(4 * MIB)));
        let addr = server
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let timeout = std::time::Duration::from_millis(200);
        let source = Source::open(&access(addr.port()), false, fast(3), timeout)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), source.read(0, 4096))
            .await
            .expect("the read ends on its own")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{}", e.report());
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(e.to_string().contains("gave up after 3 attempts"), "{e}");
        assert_eq!(e.context().offset, Some(0));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Not `shutdown()`: it waits for the reads the export never answers.
        drop(server);
    }

    /// A writable export that never answers a write.
    struct HungWrites(u64);

    #[async_trait]
    impl nbd::server::Export for HungWrites {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, _offset: u64, len: u32) -> nbd::Result<Bytes> {
            Ok(Bytes::from(vec![0; len as usize]))
        }
        async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> nbd::Result<()> {
            std::future::pending().await
        }
    }

    /// A volume of `0x5a` bytes, all data.
    struct Filled(u64);

    #[async_trait]
    impl VolumeReader for Filled {
        fn size(&self) -> u64 {
            self.0
        }
        async fn read_at(&self, _offset: u64, length: u64) -> Result<Bytes> {
            Ok(Bytes::from(vec![0x5a; length as usize]))
        }
        async fn regions(&self, offset: u64, length: u64) -> Result<Vec<provider_api::Region>> {
            Ok(vec![provider_api::Region {
                extent: Extent::new(offset, length),
                kind: RegionKind::Data,
            }])
        }
    }

    #[tokio::test]
    async fn a_restore_destination_that_stops_answering_fails_within_the_timeout() {
        let server = nbd::server::Server::new(nbd::server::ServerConfig::default()).unwrap();
        server.add_export("disk", Arc::new(HungWrites(4 * MIB)));
        let addr = server
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mover = StandardMover::new(MoverOptions {
            io_timeout: std::time::Duration::from_millis(200),
            ..MoverOptions::default()
        });
        let destination = SnapshotAccess::Nbd(NbdAccess::new(
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: addr.port(),
            },
            "disk",
        ));
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            mover.restore_volume(
                "vda",
                Arc::new(Filled(4 * MIB)),
                &destination,
                &crate::mover::NoProgress,
            ),
        )
        .await
        .expect("the restore ends on its own")
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{}", e.report());
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert_eq!(e.context().volume.as_deref(), Some("vda"), "{}", e.report());
        drop(server);
    }

    /// A volume whose first half is `0x5a` data and second half zeroes.
    struct HalfData(u64);

    #[async_trait]
    impl VolumeReader for HalfData {
        fn size(&self) -> u64 {
            self.0
        }
        async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes> {
            let half = self.0 / 2;
            Ok(Bytes::from(
                (offset..offset + length)
                    .map(|o| if o < half { 0x5a } else { 0 })
                    .collect::<Vec<u8>>(),
            ))
        }
        async fn regions(&self, offset: u64, length: u64) -> Result<Vec<provider_api::Region>> {
            let half = self.0 / 2;
            let mut out = Vec::new();
            let end = offset + length;
            if offset < half {
                out.push(provider_api::Region {
                    extent: Extent::new(offset, half.min(end) - offset),
                    kind: RegionKind::Data,
                });
            }
            if end > half {
                let start = offset.max(half);
                out.push(provider_api::Region {
                    extent: Extent::new(start, end - start),
                    kind: RegionKind::Zero,
                });
            }
            Ok(out)
        }
    }

    #[tokio::test]
    async fn zero_regions_of_a_file_restore_become_holes_over_old_data() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.raw");
        std::fs::write(&path, vec![0xff_u8; (8 * MIB) as usize]).unwrap();
        let mover = StandardMover::default();
        let destination = SnapshotAccess::FileHandle(provider_api::FileAccess::new(path.clone()));
        mover
            .restore_volume(
                "vda",
                Arc::new(HalfData(8 * MIB)),
                &destination,
                &crate::mover::NoProgress,
            )
            .await
            .unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..(4 * MIB) as usize].iter().all(|b| *b == 0x5a));
        assert!(data[(4 * MIB) as usize..].iter().all(|b| *b == 0));
        // The zeroes are holes, not written blocks (unless the filesystem
        // cannot punch holes, where they are written zeroes).
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        let probe = dir.path().join("probe");
        std::fs::write(&probe, [1u8; 8192]).unwrap();
        let probe = std::fs::File::options().write(true).open(&probe).unwrap();
        if punch_hole(&probe, 0, 4096).unwrap() {
            assert!(allocated <= 5 * MIB, "{allocated} bytes allocated");
        }
    }

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            initial_delay: std::time::Duration::from_millis(5),
            max_delay: std::time::Duration::from_millis(20),
        }
    }

    fn access(port: u16) -> SnapshotAccess {
        SnapshotAccess::Nbd(
            NbdAccess::new(
                NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                },
                "disk",
            )
            .with_dirty_bitmap(Some("qemu:dirty-bitmap:cbt0".into())),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_connection_is_reopened_once_for_all_concurrent_readers() {
        let (_server, addr, content) = served_disk().await;
        let (port, accepted) = flaky_proxy(addr, 3 * MIB, Some(1)).await;
        let source = Arc::new(
            Source::open(&access(port), true, fast(5), IO_TIMEOUT)
                .await
                .unwrap(),
        );
        let piece = 256 << 10;
        let reads = futures::stream::iter((0..content.len() as u64 / piece).map(|i| {
            let source = source.clone();
            async move { (i * piece, source.read(i * piece, piece).await) }
        }))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
        for (offset, r) in reads {
            let data = r.unwrap_or_else(|e| panic!("{}", e.report()));
            let o = offset as usize;
            assert!(data[..] == content[o..o + piece as usize], "at {offset}");
        }
        let Source::Nbd { conn, .. } = &*source else {
            unreachable!()
        };
        assert_eq!(conn.generation(), 1, "one reconnect for all readers");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        // The new connection kept the meta contexts: allocation and the
        // dirty bitmap still answer.
        let alloc = source.allocation(Extent::new(0, 16 * MIB)).await.unwrap();
        assert_eq!(alloc, [(Extent::new(0, 16 * MIB), false)]);
        let mut regions = BitmapRegions {
            conn: conn.clone(),
            context: "qemu:dirty-bitmap:cbt0".into(),
            size: 16 * MIB,
            pos: 0,
            pending: VecDeque::new(),
        };
        assert_eq!(
            regions.next_dirty_region().await.unwrap(),
            Some(Extent::new(4 * MIB, MIB))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dirty_bitmap_walk_survives_a_dropped_connection() {
        let (_server, addr, _) = served_disk().await;
        // The handshake fits, the first block status answer (about 1 KiB
        // of extents) does not.
        let (port, accepted) = flaky_proxy(addr, 600, Some(1)).await;
        let source = Source::open(&access(port), true, fast(5), IO_TIMEOUT).await;
        let source = match source {
            Ok(s) => s,
            // The handshake itself was cut: nothing to test here.
            Err(e) => panic!("handshake cut, raise the limit: {}", e.report()),
        };
        let Source::Nbd { conn, .. } = &source else {
            unreachable!()
        };
        let mut regions = BitmapRegions {
            conn: conn.clone(),
            context: "qemu:dirty-bitmap:cbt0".into(),
            size: 16 * MIB,
            pos: 0,
            pending: VecDeque::new(),
        };
        let mut got = Vec::new();
        while let Some(r) = regions
            .next_dirty_region()
            .await
            .unwrap_or_else(|e| panic!("{}", e.report()))
        {
            got.push(r);
        }
        let mut want = vec![Extent::new(4 * MIB, MIB)];
        want.extend(
            (8 * MIB..16 * MIB)
                .step_by(256 << 10)
                .map(|o| Extent::new(o, 64 << 10)),
        );
        assert_eq!(got, want);
        assert_eq!(conn.generation(), 1);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_persistent_failure_is_reported_after_the_bounded_attempts() {
        let (_server, addr, _) = served_disk().await;
        let (port, accepted) = flaky_proxy(addr, 64 << 10, None).await;
        let source = Source::open(&access(port), false, fast(3), IO_TIMEOUT)
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let e = source.read(4 * MIB, MIB).await.unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(e.kind(), ErrorKind::DataPath, "{}", e.report());
        assert_eq!(e.context().offset, Some(4 * MIB), "{}", e.report());
        assert!(
            e.report()
                .contains("reading the snapshot over NBD (gave up after 3 attempts)"),
            "{}",
            e.report()
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn nbd_errors_are_classified_for_retrying() {
        use nbd::error::errno;
        let io = nbd::Error::new(nbd::ErrorKind::Io);
        assert_eq!(classify(&io, false), Failure::Reconnect);
        let gone = nbd::Error::new(nbd::ErrorKind::Disconnected(String::new()));
        assert_eq!(classify(&gone, true), Failure::Reconnect);
        let shutdown = nbd::Error::server(errno::ESHUTDOWN, "");
        assert_eq!(classify(&shutdown, false), Failure::Reconnect);
        let eio = nbd::Error::server(errno::EIO, "");
        assert_eq!(classify(&eio, true), Failure::Again);
        assert_eq!(classify(&eio, false), Failure::Fatal);
        assert_eq!(
            classify(&nbd::Error::server(errno::ENOMEM, ""), false),
            Failure::Again
        );
        assert_eq!(
            classify(&nbd::Error::protocol("bad magic"), true),
            Failure::Fatal
        );
        assert_eq!(
            classify(&nbd::Error::server(errno::EINVAL, ""), true),
            Failure::Fatal
        );
    }
}
