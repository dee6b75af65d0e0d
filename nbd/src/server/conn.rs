//! One server connection: handshake, then the transmission phase.
//!
//! In the transmission phase a request loop reads requests and starts a
//! task for each (after admission, see [`Admission`]); a writer task
//! writes the replies in the order they are ready. How the phase ends
//! decides what happens to the requests in flight (see [`End`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::{Export, Inner, stopped};
use crate::client::Io;
use crate::error::{Error, ErrorKind, Result, errno};
use crate::proto::*;

const MAX_OPTIONS: usize = 4096;
/// Largest option payload that is skipped (answered ERR_TOO_BIG) rather
/// than ending the connection.
const MAX_SKIPPED_OPTION: u32 = 16 << 20;

pub(crate) enum Raw {
    Tcp(TcpStream),
    Unix(UnixStream),
    Other(Box<dyn Io>),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Boxed(Box<dyn Io>),
}

impl Stream {
    fn io(&mut self) -> &mut dyn Io {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
            Stream::Boxed(s) => s.as_mut(),
        }
    }
    type_split!();
}

macro_rules! type_split {
    () => {
        fn split(
            self,
        ) -> (
            Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
        ) {
            match self {
                Stream::Tcp(s) => {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Stream::Unix(s) => {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Stream::Boxed(s) => {
                    let (r, w) = tokio::io::split(s);
                    (Box::new(r), Box::new(w))
                }
            }
        }
    };
}
use type_split;

struct Selected {
    export: Arc<dyn Export>,
    size: u64,
    structured: bool,
    contexts: Vec<(u32, String)>,
    base_allocation: bool,
    max_payload: u32,
}

pub(crate) async fn serve(
    inner: Arc<Inner>,
    raw: Raw,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let st = match raw {
        Raw::Tcp(s) => Stream::Tcp(s),
        Raw::Unix(s) => Stream::Unix(s),
        Raw::Other(s) => Stream::Boxed(s),
    };
    let (st, sel) = tokio::select! {
        r = within(inner.limits.io_timeout, "the handshake", handshake(&inner, st)) => r?,
        _ = stopped(&mut stop) => return Ok(()),
    };
    match sel {
        Some(sel) => transmission(&inner, st, sel, stop).await,
        None => Ok(()),
    }
}

async fn reply(s: &mut dyn Io, opt: u32, kind: u32, payload: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

fn transmission_flags(e: &dyn Export) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
    if e.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if e.multi_conn() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

fn export_block_size(e: &dyn Export) -> BlockSize {
    let bs = e.block_size();
    let bs = if bs.validate().is_ok() {
        bs
    } else {
        BlockSize::default()
    };
    BlockSize {
        max: bs.max.min(DEFAULT_MAX_PAYLOAD).max(bs.min),
        ..bs
    }
}

fn match_contexts(offered: &[String], queries: &[String], list: bool) -> Vec<(u32, String)> {
    offered
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            (list && queries.is_empty())
                || queries
                    .iter()
                    .any(|q| q == *c || (list && q.ends_with(':') && c.starts_with(q.as_str())))
        })
        .map(|(i, c)| (i as u32 + 1, c.clone()))
        .collect()
}

fn parse_meta_request(p: &[u8]) -> Result<(String, Vec<String>)> {
    let mut c = Cursor::new(p, "meta context request");
    let name = c.string32()?;
    let n = c.u32()?;
    let mut q = Vec::new();
    for _ in 0..n {
        q.push(c.string32()?);
    }
    if c.remaining() != 0 {
        return Err(Error::protocol("trailing bytes in meta context request"));
    }
    Ok((name, q))
}

fn parse_info_request(p: &[u8]) -> Result<(String, Vec<u16>)> {
    let mut c = Cursor::new(p, "INFO/GO request");
    let name = c.string32()?;
    let n = c.u16()?;
    let mut t = Vec::new();
    for _ in 0..n {
        t.push(c.u16()?);
    }
    if c.remaining() != 0 {
        return Err(Error::protocol("trailing bytes in INFO/GO request"));
    }
    Ok((name, t))
}

async fn handshake(inner: &Inner, mut st: Stream) -> Result<(Stream, Option<Selected>)> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    st.io().write_all(&hello).await?;
    st.io().flush().await?;
    let mut cf = [0u8; 4];
    st.io().read_exact(&mut cf).await?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(Error::protocol(format!("unknown client flags {cflags:#x}")));
    }
    if cflags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(Error::unsupported("client does not speak fixed newstyle"));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut tls_up = false;
    let mut structured = false;
    let mut meta: Option<(String, Vec<(u32, String)>)> = None;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        st.io().read_exact(&mut h).await?;
        let magic = be64(&h[0..8]);
        if magic != IHAVEOPT {
            return Err(Error::protocol(format!("bad option magic {magic:#018x}")));
        }
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION_LEN {
            if len > MAX_SKIPPED_OPTION {
                return Err(Error::protocol(format!("option payload of {len} bytes")));
            }
            let mut take = st.io().take(len as u64);
            tokio::io::copy(&mut take, &mut tokio::io::sink()).await?;
            reply(st.io(), opt, REP_ERR_TOO_BIG, b"option payload too large").await?;
            continue;
        }
        let mut p = vec![0u8; len as usize];
        st.io().read_exact(&mut p).await?;
        if inner.tls_required && !tls_up && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok((st, None));
            }
            reply(st.io(), opt, REP_ERR_TLS_REQD, b"TLS is required").await?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(p) else {
                    return Ok((st, None));
                };
                let Some(export) = inner.export(&name) else {
                    return Ok((st, None));
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                st.io().write_all(&b).await?;
                st.io().flush().await?;
                let contexts = match meta {
                    Some((n, c)) if n == name => c,
                    _ => Vec::new(),
                };
                return Ok((st, Some(select(export, structured, contexts))));
            }
            OPT_ABORT => {
                let _ = reply(st.io(), opt, REP_ACK, &[]).await;
                return Ok((st, None));
            }
            OPT_LIST => {
                if len != 0 {
                    reply(st.io(), opt, REP_ERR_INVALID, b"LIST takes no payload").await?;
                    continue;
                }
                for name in inner.names() {
                    let mut b = Vec::with_capacity(4 + name.len());
                    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    b.extend_from_slice(name.as_bytes());
                    reply(st.io(), opt, REP_SERVER, &b).await?;
                }
                reply(st.io(), opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                let Some(acceptor) = inner.tls.clone() else {
                    reply(st.io(), opt, REP_ERR_UNSUP, b"TLS is not configured").await?;
                    continue;
                };
                if tls_up || len != 0 {
                    reply(
                        st.io(),
                        opt,
                        REP_ERR_INVALID,
                        b"TLS already active or bad payload",
                    )
                    .await?;
                    continue;
                }
                reply(st.io(), opt, REP_ACK, &[]).await?;
                let map = |e: std::io::Error| {
                    Error::tls("TLS handshake with client failed").with_source(e)
                };
                st = match st {
                    Stream::Tcp(s) => {
                        Stream::Boxed(Box::new(acceptor.accept(s).await.map_err(map)?))
                    }
                    Stream::Unix(s) => {
                        Stream::Boxed(Box::new(acceptor.accept(s).await.map_err(map)?))
                    }
                    Stream::Boxed(s) => {
                        Stream::Boxed(Box::new(acceptor.accept(s).await.map_err(map)?))
                    }
                };
                tls_up = true;
                structured = false;
                meta = None;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    reply(
                        st.io(),
                        opt,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no payload",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(st.io(), opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    reply(
                        st.io(),
                        opt,
                        REP_ERR_INVALID,
                        b"structured replies not negotiated",
                    )
                    .await?;
                    continue;
                }
                let Ok((name, queries)) = parse_meta_request(&p) else {
                    reply(
                        st.io(),
                        opt,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    )
                    .await?;
                    continue;
                };
                let Some(export) = inner.export(&name) else {
                    reply(st.io(), opt, REP_ERR_UNKNOWN, b"export not found").await?;
                    continue;
                };
                let list = opt == OPT_LIST_META_CONTEXT;
                let found = match_contexts(&export.meta_contexts(), &queries, list);
                for (id, c) in &found {
                    let mut b = Vec::with_capacity(4 + c.len());
                    b.extend_from_slice(&(if list { 0 } else { *id }).to_be_bytes());
                    b.extend_from_slice(c.as_bytes());
                    reply(st.io(), opt, REP_META_CONTEXT, &b).await?;
                }
                reply(st.io(), opt, REP_ACK, &[]).await?;
                if !list {
                    meta = Some((name, found));
                }
            }
            OPT_INFO | OPT_GO => {
                let Ok((name, infos)) = parse_info_request(&p) else {
                    reply(st.io(), opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let Some(export) = inner.export(&name) else {
                    reply(st.io(), opt, REP_ERR_UNKNOWN, b"export not found").await?;
                    continue;
                };
                let mut b = Vec::with_capacity(14);
                b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                reply(st.io(), opt, REP_INFO, &b).await?;
                let bs = export_block_size(export.as_ref());
                let mut b = Vec::with_capacity(14);
                b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                b.extend_from_slice(&bs.min.to_be_bytes());
                b.extend_from_slice(&bs.preferred.to_be_bytes());
                b.extend_from_slice(&bs.max.to_be_bytes());
                reply(st.io(), opt, REP_INFO, &b).await?;
                if infos.contains(&INFO_NAME) {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(name.as_bytes());
                    reply(st.io(), opt, REP_INFO, &b).await?;
                }
                reply(st.io(), opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    let contexts = match meta {
                        Some((n, c)) if n == name => c,
                        _ => Vec::new(),
                    };
                    return Ok((st, Some(select(export, structured, contexts))));
                }
            }
            _ => reply(st.io(), opt, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
    Err(Error::protocol("too many options"))
}

fn select(export: Arc<dyn Export>, structured: bool, contexts: Vec<(u32, String)>) -> Selected {
    let base_allocation = export
        .meta_contexts()
        .iter()
        .any(|c| c == "base:allocation");
    Selected {
        size: export.size(),
        max_payload: export_block_size(export.as_ref()).max,
        export,
        structured,
        contexts,
        base_allocation,
    }
}

/// The wire bytes of one reply.
type Reply = Vec<Bytes>;

/// Capacity of the queue of replies waiting for the writer (their memory
/// is bounded by the admission budgets, not by this).
const REPLY_QUEUE: usize = 256;

/// A reply on its way to the writer, with the admission permits of its
/// request: they are released once the reply has been written.
struct Outgoing {
    reply: Reply,
    _permits: Option<Permits>,
}

/// What one admitted request holds until its reply is written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _conn_bytes: OwnedSemaphorePermit,
    _total_bytes: OwnedSemaphorePermit,
}

/// Admission control of one connection (see the module docs of
/// `server`): a request takes a request slot, then its charge from the
/// connection's byte budget, then from the server-wide one. Always in
/// this order, so that no two requests wait for each other.
struct Admission {
    requests: Arc<Semaphore>,
    conn_bytes: Arc<Semaphore>,
    conn_cap: usize,
    total_bytes: Arc<Semaphore>,
    total_cap: usize,
}

impl Admission {
    fn new(inner: &Inner) -> Self {
        let l = inner.limits;
        Admission {
            requests: Arc::new(Semaphore::new(l.requests)),
            conn_bytes: Arc::new(Semaphore::new(l.conn_bytes)),
            conn_cap: l.conn_bytes,
            total_bytes: inner.total_bytes.clone(),
            total_cap: l.total_bytes,
        }
    }

    /// A request slot: waits while the connection has
    /// `max_in_flight_requests` requests in flight.
    async fn slot(&self) -> OwnedSemaphorePermit {
        acquire(&self.requests, 1).await
    }

    /// Charge `req` against the connection's and the server's byte
    /// budgets; a charge larger than a budget takes all of it.
    async fn charge(&self, slot: OwnedSemaphorePermit, req: &Request) -> Permits {
        let bytes = match req.command {
            CMD_READ | CMD_WRITE => req.length.max(1) as usize,
            _ => 1,
        };
        let conn = acquire(&self.conn_bytes, bytes.min(self.conn_cap)).await;
        let total = acquire(&self.total_bytes, bytes.min(self.total_cap)).await;
        Permits {
            _slot: slot,
            _conn_bytes: conn,
            _total_bytes: total,
        }
    }
}

/// `n` permits of `sem` (`n` ≤ its capacity, at most 32 MiB).
#[allow(
    clippy::expect_used,
    reason = "the admission semaphores live as long as the server and are never closed"
)]
async fn acquire(sem: &Arc<Semaphore>, n: usize) -> OwnedSemaphorePermit {
    sem.clone()
        .acquire_many_owned(n as u32)
        .await
        .expect("admission semaphores are never closed")
}

/// How the transmission phase ended, which decides what happens to the
/// requests in flight.
enum End {
    /// The client sent `NBD_CMD_DISC`: finish in-flight requests within
    /// the shutdown grace.
    Disconnect,
    /// The server shuts down: the same.
    Shutdown,
    /// The client closed its side, its socket failed or it broke the
    /// protocol (`Ok`: end of file): abort in-flight requests.
    ClientGone(Result<()>),
    /// A reply could not be written (the client is gone or stopped
    /// reading): abort in-flight requests.
    WriterFailed(Result<()>),
}

async fn transmission(
    inner: &Inner,
    st: Stream,
    sel: Selected,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let (r, w) = st.split();
    let r = BufReader::with_capacity(256 * 1024, r);
    let w = BufWriter::with_capacity(256 * 1024, w);
    let (tx, rx) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let mut writer = tokio::spawn(write_loop(w, rx, inner.limits.io_timeout));
    let mut tasks = JoinSet::new();
    let admission = Arc::new(Admission::new(inner));
    // the request loop owns the reader and the last sender: both go when
    // it stops
    let end = tokio::select! {
        end = requests(inner, r, Arc::new(sel), admission, tx, &mut tasks) => end,
        r = &mut writer => End::WriterFailed(joined(r)),
        _ = stopped(&mut stop) => End::Shutdown,
    };
    match end {
        End::Disconnect | End::Shutdown => {
            finish(&mut tasks, writer, inner.limits.shutdown_grace).await;
            Ok(())
        }
        End::ClientGone(result) => {
            abort_all(&mut tasks).await;
            writer.abort();
            let _ = writer.await;
            result
        }
        End::WriterFailed(result) => {
            abort_all(&mut tasks).await;
            result
        }
    }
}

/// Read requests and start a task for each, until the client disconnects,
/// goes away or breaks the protocol.
async fn requests(
    inner: &Inner,
    mut r: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    sel: Arc<Selected>,
    admission: Arc<Admission>,
    tx: mpsc::Sender<Outgoing>,
    tasks: &mut JoinSet<()>,
) -> End {
    loop {
        while tasks.try_join_next().is_some() {}
        let req = match read_request(&mut r).await {
            Ok(Some(req)) => req,
            Ok(None) => return End::ClientGone(Ok(())),
            Err(e) => return End::ClientGone(Err(e)),
        };
        if req.command == CMD_DISC {
            return End::Disconnect;
        }
        if matches!(req.command, CMD_READ | CMD_WRITE) && req.length > sel.max_payload {
            match refuse_oversize(&mut r, &sel, &req, &tx, inner.limits.io_timeout).await {
                Ok(()) => continue,
                Err(e) => return End::ClientGone(Err(e)),
            }
        }
        // read the header first: a client that queued requests and left
        // is noticed by the end of file after them
        let slot = admission.slot().await;
        if req.command == CMD_WRITE {
            // the payload is buffered only once it is admitted
            let permits = admission.charge(slot, &req).await;
            let payload = within(
                inner.limits.io_timeout,
                "a WRITE payload",
                read_payload(&mut r, req.length),
            )
            .await;
            match payload {
                Ok(p) => tasks.spawn(respond(sel.clone(), req, Some(p), permits, tx.clone())),
                Err(e) => return End::ClientGone(Err(e)),
            };
        } else {
            let (admission, sel, tx) = (admission.clone(), sel.clone(), tx.clone());
            tasks.spawn(async move {
                let permits = admission.charge(slot, &req).await;
                respond(sel, req, None, permits, tx).await;
            });
        }
    }
}

/// The next request header; `None` at the end of the client's stream.
async fn read_request(r: &mut (impl AsyncRead + Unpin)) -> Result<Option<Request>> {
    let mut h = [0u8; REQUEST_LEN];
    match r.read_exact(&mut h).await {
        Ok(_) => Request::decode(&h).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn read_payload(r: &mut (impl AsyncRead + Unpin), len: u32) -> Result<Bytes> {
    let mut b = BytesMut::zeroed(len as usize);
    r.read_exact(&mut b).await?;
    Ok(b.freeze())
}

/// Answer a READ or WRITE larger than the maximum block size with an
/// error; a WRITE's payload is skipped without buffering it, to stay in
/// sync.
async fn refuse_oversize(
    r: &mut (impl AsyncRead + Unpin),
    sel: &Selected,
    req: &Request,
    tx: &mpsc::Sender<Outgoing>,
    limit: Option<Duration>,
) -> Result<()> {
    if req.command == CMD_WRITE {
        let mut take = r.take(req.length as u64);
        let mut sink = tokio::io::sink();
        let skip = tokio::io::copy(&mut take, &mut sink);
        within(limit, "an oversize WRITE payload", skip).await?;
    }
    let e = Error::invalid(format!(
        "{} of {} bytes exceeds the maximum block size {}",
        command_name(req.command),
        req.length,
        sel.max_payload
    ));
    let out = Outgoing {
        reply: error_reply(sel, req, &e),
        _permits: None,
    };
    tx.send(out)
        .await
        .map_err(|_| Error::new(ErrorKind::Disconnected("reply writer stopped".into())))
}

/// Run one admitted request and queue its reply, with its permits, for
/// the writer.
async fn respond(
    sel: Arc<Selected>,
    req: Request,
    payload: Option<Bytes>,
    permits: Permits,
    tx: mpsc::Sender<Outgoing>,
) {
    let reply = handle(&sel, req, payload).await;
    let out = Outgoing {
        reply,
        _permits: Some(permits),
    };
    // fails only when the connection is ending anyway
    let _ = tx.send(out).await;
}

/// Give in-flight requests `grace` to finish and their replies to be
/// written (the request loop dropped its sender, so the writer ends after
/// the last reply); then abort what is left.
async fn finish(tasks: &mut JoinSet<()>, mut writer: JoinHandle<Result<()>>, grace: Duration) {
    let drained = tokio::time::timeout(grace, async {
        while tasks.join_next().await.is_some() {}
        joined((&mut writer).await)
    })
    .await;
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("NBD server could not write the last replies: {e}"),
        Err(_) => {
            tracing::debug!(
                "NBD requests still in flight after {grace:?}: aborting {}",
                tasks.len()
            );
            abort_all(tasks).await;
            writer.abort();
            let _ = writer.await;
        }
    }
}

/// Abort every request task and wait until their futures are dropped.
async fn abort_all(tasks: &mut JoinSet<()>) {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// The writer's result, a panic or abort included.
fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.unwrap_or_else(|e| Err(std::io::Error::other(e).into()))
}

/// Write replies as they come, batching those already queued into one
/// flush; a reply's permits are released once it is written. Fails when
/// the client is gone or a write makes no progress within `limit`.
async fn write_loop(
    mut w: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    mut rx: mpsc::Receiver<Outgoing>,
    limit: Option<Duration>,
) -> Result<()> {
    while let Some(mut out) = rx.recv().await {
        loop {
            for part in &out.reply {
                write_all_within(&mut w, part, limit).await?;
            }
            match rx.try_recv() {
                Ok(next) => out = next,
                Err(_) => break,
            }
        }
        drop(out);
        within(limit, "a reply write", w.flush()).await?;
    }
    within(limit, "closing the connection", w.shutdown()).await?;
    Ok(())
}

/// `write_all`, failing when one write makes no progress within `limit`
/// (a slow reader is fine, one that stopped reading is not).
async fn write_all_within(
    w: &mut (impl AsyncWrite + Unpin),
    mut buf: &[u8],
    limit: Option<Duration>,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = within(limit, "a reply write", w.write(buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Run `io`, failing with [`std::io::ErrorKind::TimedOut`] when `limit`
/// passes first (`None`: no limit).
async fn within<T, E: From<std::io::Error>>(
    limit: Option<Duration>,
    what: &str,
    io: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let Some(limit) = limit else {
        return io.await;
    };
    match tokio::time::timeout(limit, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} did not complete within {limit:?}"),
        )
        .into()),
    }
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload_len: usize, prefix: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(20 + prefix.len());
    b.put_slice(
        &ChunkHeader {
            flags,
            kind,
            cookie,
            length: payload_len as u32,
        }
        .encode(),
    );
    b.put_slice(prefix);
    b
}

fn error_reply(sel: &Selected, req: &Request, e: &Error) -> Reply {
    let errno = e.errno();
    if sel.structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) {
        let end = req.offset.saturating_add(req.length as u64);
        let off = e.offset().filter(|o| *o >= req.offset && *o < end);
        let msg = e.to_string();
        let p = encode_error_chunk(errno, &msg, off);
        let kind = if off.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        };
        let mut b = chunk(REPLY_FLAG_DONE, kind, req.cookie, p.len(), &[]);
        b.put_slice(&p);
        vec![b.freeze()]
    } else {
        vec![Bytes::copy_from_slice(&simple_reply(errno, req.cookie))]
    }
}

fn ok_reply(req: &Request) -> Reply {
    vec![Bytes::copy_from_slice(&simple_reply(0, req.cookie))]
}

/// Check an export's extents: contiguous from `offset`, non-empty; clip
/// to the request. They may stop short.
fn normalize(ext: Vec<Extent>, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let end = offset + len;
    let mut pos = offset;
    let mut out = Vec::with_capacity(ext.len());
    for e in ext {
        if e.offset != pos || e.length == 0 {
            return Err(
                Error::new(ErrorKind::Io).with_source(std::io::Error::other(format!(
                    "export returned an extent {}+{} where {pos} was expected",
                    e.offset, e.length
                ))),
            );
        }
        let l = e.end().min(end) - pos;
        out.push(Extent {
            offset: pos,
            length: l,
            flags: e.flags,
        });
        pos += l;
        if pos >= end {
            break;
        }
    }
    if out.is_empty() {
        return Err(Error::new(ErrorKind::Io)
            .with_source(std::io::Error::other("export returned no extents")));
    }
    Ok(out)
}

async fn handle(sel: &Selected, req: Request, payload: Option<Bytes>) -> Reply {
    match handle_inner(sel, &req, payload).await {
        Ok(r) => r,
        Err(e) => {
            let e = e
                .with_command(command_name(req.command))
                .with_offset(req.offset);
            tracing::debug!("NBD request failed: {e}");
            error_reply(sel, &req, &e)
        }
    }
}

async fn handle_inner(sel: &Selected, req: &Request, payload: Option<Bytes>) -> Result<Reply> {
    let ex = &sel.export;
    let len = req.length as u64;
    let writes = matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if req.offset.checked_add(len).is_none_or(|e| e > sel.size) {
        let kind = ErrorKind::OutOfRange {
            offset: req.offset,
            length: len,
            size: sel.size,
        };
        return Err(
            if req.command == CMD_WRITE || req.command == CMD_WRITE_ZEROES {
                Error::server(errno::ENOSPC, kind.to_string())
            } else {
                Error::new(kind)
            },
        );
    }
    if writes && ex.read_only() {
        return Err(Error::server(errno::EPERM, "export is read-only"));
    }
    match req.command {
        CMD_READ if !sel.structured => {
            let data = read_checked(ex.as_ref(), req.offset, req.length).await?;
            Ok(vec![
                Bytes::copy_from_slice(&simple_reply(0, req.cookie)),
                data,
            ])
        }
        CMD_READ => structured_read(sel, req).await,
        CMD_WRITE => {
            let data = payload.unwrap_or_default();
            ex.write(req.offset, data, req.flags & CMD_FLAG_FUA != 0)
                .await?;
            Ok(ok_reply(req))
        }
        CMD_WRITE_ZEROES => {
            ex.write_zeroes(req.offset, req.length, req.flags & CMD_FLAG_NO_HOLE != 0)
                .await?;
            Ok(ok_reply(req))
        }
        CMD_TRIM => {
            ex.trim(req.offset, req.length).await?;
            Ok(ok_reply(req))
        }
        CMD_FLUSH => {
            ex.flush().await?;
            Ok(ok_reply(req))
        }
        CMD_CACHE => Ok(ok_reply(req)),
        CMD_BLOCK_STATUS => block_status(sel, req).await,
        c => Err(Error::invalid(format!("unknown command {c}"))),
    }
}

async fn read_checked(ex: &dyn Export, offset: u64, len: u32) -> Result<Bytes> {
    let d = ex.read(offset, len).await?;
    if d.len() != len as usize {
        return Err(
            Error::new(ErrorKind::Io).with_source(std::io::Error::other(format!(
                "export returned {} bytes for a read of {len}",
                d.len()
            ))),
        );
    }
    Ok(d)
}

async fn structured_read(sel: &Selected, req: &Request) -> Result<Reply> {
    let ex = &sel.export;
    let len = req.length as u64;
    if len == 0 {
        return Ok(vec![
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0, &[]).freeze(),
        ]);
    }
    let mut pieces: Vec<Extent> = Vec::new();
    if sel.base_allocation
        && len >= 4096
        && let Ok(ext) = ex
            .block_status("base:allocation", req.offset, req.length)
            .await
        && let Ok(mut ext) = normalize(ext, req.offset, len)
    {
        // zero extents become holes; everything else is read
        for e in ext.iter_mut() {
            e.flags = if e.is_zero() { STATE_ZERO } else { 0 };
        }
        coalesce(&mut ext);
        pieces = ext;
    }
    let covered = pieces.last().map_or(req.offset, |e| e.end());
    if covered < req.offset + len {
        pieces.push(Extent {
            offset: covered,
            length: req.offset + len - covered,
            flags: 0,
        });
    }
    let mut out: Vec<(BytesMut, Option<Bytes>)> = Vec::with_capacity(pieces.len());
    for e in &pieces {
        if e.is_zero() {
            let mut p = [0u8; 12];
            p[0..8].copy_from_slice(&e.offset.to_be_bytes());
            p[8..12].copy_from_slice(&(e.length as u32).to_be_bytes());
            out.push((chunk(0, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12, &p), None));
        } else {
            let data = read_checked(ex.as_ref(), e.offset, e.length as u32)
                .await
                .map_err(|err| err.with_offset(e.offset))?;
            let h = chunk(
                0,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + data.len(),
                &e.offset.to_be_bytes(),
            );
            out.push((h, Some(data)));
        }
    }
    let mut reply = Vec::with_capacity(out.len() * 2);
    let n = out.len();
    for (i, (mut h, d)) in out.into_iter().enumerate() {
        if i + 1 == n {
            h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        }
        reply.push(h.freeze());
        reply.extend(d);
    }
    Ok(reply)
}

async fn block_status(sel: &Selected, req: &Request) -> Result<Reply> {
    if !sel.structured || sel.contexts.is_empty() {
        return Err(Error::invalid("no meta context was negotiated"));
    }
    if req.length == 0 {
        return Err(Error::invalid("BLOCK_STATUS of length 0"));
    }
    let mut chunks = Vec::with_capacity(sel.contexts.len());
    for (id, name) in &sel.contexts {
        let ext = sel
            .export
            .block_status(name, req.offset, req.length)
            .await?;
        let mut ext = normalize(ext, req.offset, req.length as u64)?;
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            ext.truncate(1);
        }
        let plen = 4 + 8 * ext.len();
        let mut b = chunk(
            0,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            plen,
            &id.to_be_bytes(),
        );
        b.reserve(8 * ext.len());
        for e in &ext {
            b.put_u32(e.length as u32);
            b.put_u32(e.flags);
        }
        chunks.push(b);
    }
    if let Some(last) = chunks.last_mut() {
        last[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    }
    Ok(chunks.into_iter().map(BytesMut::freeze).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::MemoryExport;

    #[tokio::test]
    async fn reads_of_holes_use_offset_hole_chunks() {
        let m = MemoryExport::new(1 << 20);
        m.fill(65536, &[9; 65536]).unwrap();
        let sel = select(Arc::new(m), true, Vec::new());
        let req = Request {
            flags: 0,
            command: CMD_READ,
            cookie: 5,
            offset: 0,
            length: 3 * 65536,
        };
        let reply = structured_read(&sel, &req).await.unwrap();
        // hole header, data header + data, hole header (DONE)
        let kinds: Vec<(u16, u16)> = reply
            .iter()
            .filter(|b| b.len() >= 20 && be32(b) == STRUCTURED_REPLY_MAGIC)
            .map(|b| (be16(&b[4..6]), be16(&b[6..8])))
            .collect();
        assert_eq!(
            kinds,
            [
                (0, REPLY_TYPE_OFFSET_HOLE),
                (0, REPLY_TYPE_OFFSET_DATA),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)
            ]
        );
    }

    #[test]
    fn context_matching() {
        let offered: Vec<String> = [
            "base:allocation",
            "qemu:dirty-bitmap:a",
            "qemu:allocation-depth",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(match_contexts(&offered, &[], true).len(), 3);
        assert_eq!(match_contexts(&offered, &[], false).len(), 0);
        assert_eq!(match_contexts(&offered, &q(&["qemu:"]), true).len(), 2);
        assert_eq!(match_contexts(&offered, &q(&["qemu:"]), false).len(), 0);
        assert_eq!(
            match_contexts(&offered, &q(&["qemu:dirty-bitmap:a", "x:y"]), false),
            vec![(2, "qemu:dirty-bitmap:a".to_string())]
        );
    }
}
