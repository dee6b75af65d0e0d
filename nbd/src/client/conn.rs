//! One transmission-phase connection: a writer task that batches requests
//! and a reader task that matches replies to requests by cookie.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

use super::handshake::Negotiated;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::*;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a reply's payload goes.
pub(crate) enum Target {
    /// No payload expected.
    None,
    /// READ: data lands in `buf` (zero filled beforehand).
    Read { buf: BytesMut, covered: u64 },
    /// BLOCK_STATUS: extents per context id.
    Status(HashMap<u32, Vec<Extent>>),
}

/// Result of a completed request.
pub(crate) enum Done {
    None,
    Data(BytesMut),
    Status(HashMap<u32, Vec<Extent>>),
}

struct Pending {
    command: u16,
    offset: u64,
    length: u32,
    target: Target,
    error: Option<Error>,
    tx: oneshot::Sender<Result<Done>>,
}

impl Pending {
    fn finish(self) {
        let cmd = command_name(self.command);
        let r = match self.error {
            Some(e) => Err(e),
            None => match self.target {
                Target::None => Ok(Done::None),
                Target::Read { buf, covered } => {
                    if covered != self.length as u64 {
                        Err(Error::protocol(format!(
                            "read reply covered {covered} of {} bytes",
                            self.length
                        ))
                        .with_command(cmd)
                        .with_offset(self.offset))
                    } else {
                        let mut buf = buf;
                        buf.resize(self.length as usize, 0);
                        Ok(Done::Data(buf))
                    }
                }
                Target::Status(m) => Ok(Done::Status(m)),
            },
        };
        let _ = self.tx.send(r);
    }
}

#[derive(Default)]
struct State {
    map: HashMap<u64, Pending>,
    dead: Option<Error>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer sent `NBD_CMD_DISC`: the server closing the connection
    /// is then the expected end.
    disc_sent: std::sync::atomic::AtomicBool,
    next_cookie: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self, err: Error) {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.dead.is_none() {
                st.dead = Some(err.duplicate());
            }
            st.map.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            let e = Error::new(ErrorKind::Disconnected(err.to_string()))
                .with_command(command_name(p.command))
                .with_offset(p.offset);
            let _ = p.tx.send(Err(e));
        }
    }
}

struct Outgoing {
    header: [u8; REQUEST_LEN],
    payload: Option<Bytes>,
}

/// A connection in the transmission phase.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    pub(crate) info: Negotiated,
    reader: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Dropping `tx` makes the writer send DISC; the reader then ends at
        // the server's EOF. Abort it after a grace period so that a silent
        // server cannot keep the task alive.
        let reader = self.reader.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for _ in 0..250 {
                    if reader.is_finished() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                reader.abort();
            });
        } else {
            reader.abort();
        }
    }
}

struct InFlight<'a>(&'a Shared);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    pub(crate) fn start(r: BoxRead, w: BoxWrite, info: Negotiated) -> Conn {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            disc_sent: std::sync::atomic::AtomicBool::new(false),
            next_cookie: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let (tx, rx) = mpsc::channel(512);
        let rs = shared.clone();
        let rinfo = info.clone();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::with_capacity(256 * 1024, r);
            let err = match read_loop(&mut r, &rs, &rinfo).await {
                Ok(()) => Error::new(ErrorKind::Disconnected(
                    "server closed the connection".into(),
                )),
                Err(e) => {
                    // After our own DISC the server closing (or resetting)
                    // the connection is the expected end, not a failure.
                    if rs.disc_sent.load(Ordering::Acquire) {
                        tracing::debug!("NBD connection closed after disconnect: {e}");
                    } else {
                        tracing::warn!("NBD connection failed: {e}");
                    }
                    e
                }
            };
            rs.fail_all(err);
        });
        let abort = reader.abort_handle();
        let ws = shared.clone();
        let wabort = abort.clone();
        tokio::spawn(async move {
            let w = BufWriter::with_capacity(256 * 1024, w);
            if let Err(e) = write_loop(w, rx, &ws).await {
                ws.fail_all(e);
                wabort.abort();
            }
        });
        Conn {
            shared,
            tx,
            info,
            reader: abort,
        }
    }

    /// Highest number of requests seen in flight at once.
    pub(crate) fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn context_id(&self, name: &str) -> Option<u32> {
        self.info
            .contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(i, _)| *i)
    }

    /// Send one request and wait for its complete reply.
    pub(crate) async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        target: Target,
    ) -> Result<Done> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(e) = &st.dead {
                return Err(Error::new(ErrorKind::Disconnected(e.to_string()))
                    .with_command(command_name(command))
                    .with_offset(offset));
            }
            st.map.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    length,
                    target,
                    error: None,
                    tx,
                },
            );
        }
        let n = self.shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.max_in_flight.fetch_max(n, Ordering::Relaxed);
        let _guard = InFlight(&self.shared);
        let header = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        if self.tx.send(Outgoing { header, payload }).await.is_err() {
            self.shared.lock().map.remove(&cookie);
            return Err(
                Error::new(ErrorKind::Disconnected("connection writer stopped".into()))
                    .with_command(command_name(command))
                    .with_offset(offset),
            );
        }
        rx.await.unwrap_or_else(|_| {
            Err(
                Error::new(ErrorKind::Disconnected("connection reader stopped".into()))
                    .with_command(command_name(command))
                    .with_offset(offset),
            )
        })
    }

    /// Send NBD_CMD_DISC; afterwards every request fails.
    pub(crate) async fn disconnect(&self) {
        {
            let mut st = self.shared.lock();
            if st.dead.is_none() {
                st.dead = Some(Error::new(ErrorKind::Disconnected(
                    "client disconnected".into(),
                )));
            }
        }
        let header = Request {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        let _ = self
            .tx
            .send(Outgoing {
                header,
                payload: None,
            })
            .await;
    }
}

async fn write_loop(
    mut w: BufWriter<BoxWrite>,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: &Shared,
) -> Result<()> {
    while let Some(mut m) = rx.recv().await {
        loop {
            if be16(&m.header[6..8]) == CMD_DISC {
                shared.disc_sent.store(true, Ordering::Release);
            }
            w.write_all(&m.header).await?;
            if let Some(p) = &m.payload {
                w.write_all(p).await?;
            }
            if be16(&m.header[6..8]) == CMD_DISC {
                w.flush().await?;
                let _ = w.shutdown().await;
                return Ok(());
            }
            match rx.try_recv() {
                Ok(next) => m = next,
                Err(_) => break,
            }
        }
        w.flush().await?;
    }
    // Every handle dropped: say goodbye.
    shared.disc_sent.store(true, Ordering::Release);
    let header = Request {
        flags: 0,
        command: CMD_DISC,
        cookie: 0,
        offset: 0,
        length: 0,
    }
    .encode();
    w.write_all(&header).await?;
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(())
}

fn take(active: &mut HashMap<u64, Pending>, shared: &Shared, cookie: u64) -> Result<Pending> {
    if let Some(p) = active.remove(&cookie) {
        return Ok(p);
    }
    shared
        .lock()
        .map
        .remove(&cookie)
        .ok_or_else(|| Error::protocol(format!("reply for unknown cookie {cookie:#x}")))
}

/// Read replies until EOF (Ok) or a protocol/transport error.
async fn read_loop<R>(r: &mut R, shared: &Shared, info: &Negotiated) -> Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut active: HashMap<u64, Pending> = HashMap::new();
    loop {
        let mut magic = [0u8; 4];
        if r.read(&mut magic[..1]).await? == 0 {
            if active.is_empty() {
                return Ok(());
            }
            return Err(Error::protocol(
                "connection closed in the middle of a structured reply",
            ));
        }
        r.read_exact(&mut magic[1..]).await?;
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                r.read_exact(&mut h).await?;
                let errno = be32(&h[0..4]);
                let cookie = be64(&h[4..12]);
                let mut p = take(&mut active, shared, cookie)?;
                let cmd = command_name(p.command);
                if errno != 0 {
                    p.error = Some(
                        Error::server(errno, "")
                            .with_command(cmd)
                            .with_offset(p.offset),
                    );
                } else if let Target::Read { buf, covered } = &mut p.target {
                    if info.structured {
                        return Err(Error::protocol(
                            "simple reply to READ after structured replies were negotiated",
                        ));
                    }
                    put_data(r, buf, 0, p.length as usize).await?;
                    *covered = p.length as u64;
                } else if let Target::Status(_) = p.target {
                    return Err(Error::protocol("simple reply to BLOCK_STATUS"));
                }
                p.finish();
            }
            STRUCTURED_REPLY_MAGIC => {
                if !info.structured {
                    return Err(Error::protocol("structured reply without negotiation"));
                }
                let mut h = [0u8; 16];
                r.read_exact(&mut h).await?;
                let ch = ChunkHeader::decode_after_magic(&h);
                let mut p = take(&mut active, shared, ch.cookie)?;
                read_chunk(r, &ch, &mut p, info).await?;
                if ch.flags & REPLY_FLAG_DONE != 0 {
                    p.finish();
                } else {
                    if active.len() >= 1 << 16 {
                        return Err(Error::protocol("too many unfinished structured replies"));
                    }
                    active.insert(ch.cookie, p);
                }
            }
            m => return Err(Error::protocol(format!("bad reply magic {m:#010x}"))),
        }
    }
}

/// Read `n` bytes from `r` into `buf[s..s+n]`. `buf.len()` is the
/// initialised prefix: bytes below it are overwritten in place, bytes past
/// it are appended straight into spare capacity (gaps zero-filled), so a
/// fresh buffer is never zeroed first.
async fn put_data<R>(r: &mut R, buf: &mut BytesMut, s: usize, n: usize) -> Result<()>
where
    R: AsyncRead + Unpin,
{
    let init = buf.len();
    if s + n <= init {
        r.read_exact(&mut buf[s..s + n]).await?;
        return Ok(());
    }
    if s < init {
        r.read_exact(&mut buf[s..init]).await?;
    } else if s > init {
        buf.resize(s, 0);
    }
    let mut left = (s + n - buf.len()) as u64;
    buf.reserve(left as usize);
    while left > 0 {
        let got = (&mut *r).take(left).read_buf(buf).await?;
        if got == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        left -= got as u64;
    }
    Ok(())
}

/// Zero `buf[s..s+n]` under the same convention as [`put_data`].
fn put_zeroes(buf: &mut BytesMut, s: usize, n: usize) {
    let init = buf.len();
    if s < init {
        buf[s..(s + n).min(init)].fill(0);
    }
    if s + n > init {
        buf.resize(s + n, 0);
    }
}

fn range_err(what: &str, off: u64, len: u64, p: &Pending) -> Error {
    Error::protocol(format!(
        "{what} chunk {off}+{len} lies outside the request {}+{}",
        p.offset, p.length
    ))
    .with_command(command_name(p.command))
}

async fn read_chunk<R>(
    r: &mut R,
    ch: &ChunkHeader,
    p: &mut Pending,
    info: &Negotiated,
) -> Result<()>
where
    R: AsyncRead + Unpin,
{
    let cmd = command_name(p.command);
    let req_end = p.offset + p.length as u64;
    match ch.kind {
        REPLY_TYPE_NONE => {
            if ch.length != 0 || ch.flags & REPLY_FLAG_DONE == 0 {
                return Err(Error::protocol("NONE chunk with payload or without DONE"));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            let Target::Read { buf, covered } = &mut p.target else {
                return Err(Error::protocol(format!(
                    "OFFSET_DATA chunk in reply to {cmd}"
                )));
            };
            if ch.length <= 8 {
                return Err(Error::protocol(format!(
                    "OFFSET_DATA chunk of {} bytes",
                    ch.length
                )));
            }
            let mut o = [0u8; 8];
            r.read_exact(&mut o).await?;
            let off = be64(&o);
            let dlen = (ch.length - 8) as u64;
            if off < p.offset || off.checked_add(dlen).is_none_or(|e| e > req_end) {
                return Err(range_err("OFFSET_DATA", off, dlen, p));
            }
            put_data(r, buf, (off - p.offset) as usize, dlen as usize).await?;
            *covered += dlen;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let Target::Read { buf, covered } = &mut p.target else {
                return Err(Error::protocol(format!(
                    "OFFSET_HOLE chunk in reply to {cmd}"
                )));
            };
            if ch.length != 12 {
                return Err(Error::protocol(format!(
                    "OFFSET_HOLE chunk of {} bytes",
                    ch.length
                )));
            }
            let mut b = [0u8; 12];
            r.read_exact(&mut b).await?;
            let off = be64(&b[0..8]);
            let hlen = be32(&b[8..12]) as u64;
            if hlen == 0 || off < p.offset || off.checked_add(hlen).is_none_or(|e| e > req_end) {
                return Err(range_err("OFFSET_HOLE", off, hlen, p));
            }
            put_zeroes(buf, (off - p.offset) as usize, hlen as usize);
            *covered += hlen;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let Target::Status(map) = &mut p.target else {
                return Err(Error::protocol(format!(
                    "BLOCK_STATUS chunk in reply to {cmd}"
                )));
            };
            if ch.length > MAX_CHUNK_LEN {
                return Err(Error::protocol(format!(
                    "BLOCK_STATUS chunk of {} bytes exceeds the limit {MAX_CHUNK_LEN}",
                    ch.length
                )));
            }
            let mut b = vec![0u8; ch.length as usize];
            r.read_exact(&mut b).await?;
            let (id, descs) = parse_block_status(&b)?;
            if !info.contexts.iter().any(|(i, _)| *i == id) {
                return Err(Error::protocol(format!(
                    "BLOCK_STATUS for unknown context id {id}"
                )));
            }
            let list = map.entry(id).or_default();
            let start = list.last().map_or(p.offset, |e| e.end());
            if start >= req_end {
                return Err(Error::protocol(format!(
                    "extra BLOCK_STATUS chunk for context {id}"
                )));
            }
            let ext = descriptors_to_extents(start, req_end - start, info.size, &descs)
                .map_err(|e| e.with_command(cmd).with_offset(p.offset))?;
            list.extend(ext);
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            if ch.length > 6 + MAX_OPTION_LEN + 8 {
                return Err(Error::protocol(format!(
                    "error chunk of {} bytes",
                    ch.length
                )));
            }
            let mut b = vec![0u8; ch.length as usize];
            r.read_exact(&mut b).await?;
            let ec = match k {
                REPLY_TYPE_ERROR => parse_error_chunk(&b, false)?,
                REPLY_TYPE_ERROR_OFFSET => parse_error_chunk(&b, true)?,
                _ => {
                    // unknown error type: errno and message are still there
                    if b.len() < 6 {
                        return Err(Error::protocol("unknown error chunk shorter than 6 bytes"));
                    }
                    let mlen = (be16(&b[4..6]) as usize).min(b.len() - 6);
                    parse_error_chunk(&b[..6 + mlen], false)?
                }
            };
            if let Some(o) = ec.offset
                && (o < p.offset || o >= req_end)
            {
                return Err(range_err("ERROR_OFFSET", o, 1, p));
            }
            if p.error.is_none() {
                p.error = Some(
                    Error::server(ec.errno, ec.message)
                        .with_command(cmd)
                        .with_offset(ec.offset.unwrap_or(p.offset)),
                );
            }
        }
        k => {
            return Err(Error::protocol(format!(
                "unknown structured reply type {k}"
            )));
        }
    }
    Ok(())
}

/// Feed arbitrary reply bytes to the reply parser with a few requests in
/// flight (fuzzing and property tests).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) async fn fuzz_replies(data: &[u8]) -> Result<()> {
    let structured = data.first().is_some_and(|b| b & 1 == 1);
    run_replies(data.get(1..).unwrap_or_default(), structured).await
}

/// Parse `data` as the replies to four requests in flight: cookie 0 READ
/// 4096@4096, 1 BLOCK_STATUS 65536@4096, 2 WRITE 512@4096, 3 READ 1@4096;
/// the export is 1 MiB with contexts 1 (base:allocation) and 2.
#[cfg(any(test, feature = "fuzzing"))]
async fn run_replies(data: &[u8], structured: bool) -> Result<()> {
    let info = Negotiated {
        size: 1 << 20,
        flags: 0,
        block_size: BlockSize::default(),
        structured,
        contexts: vec![
            (1, "base:allocation".into()),
            (2, "qemu:dirty-bitmap:a".into()),
        ],
    };
    let shared = Shared {
        state: Mutex::new(State::default()),
        disc_sent: std::sync::atomic::AtomicBool::new(false),
        next_cookie: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    };
    let mut rxs = Vec::new();
    for (cookie, (command, length)) in [
        (CMD_READ, 4096u32),
        (CMD_BLOCK_STATUS, 65536),
        (CMD_WRITE, 512),
        (CMD_READ, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let (tx, rx) = oneshot::channel();
        let target = match command {
            CMD_READ => Target::Read {
                buf: if cookie == 0 {
                    BytesMut::zeroed(length as usize)
                } else {
                    BytesMut::new()
                },
                covered: 0,
            },
            CMD_BLOCK_STATUS => Target::Status(HashMap::new()),
            _ => Target::None,
        };
        shared.lock().map.insert(
            cookie as u64,
            Pending {
                command,
                offset: 4096,
                length,
                target,
                error: None,
                tx,
            },
        );
        rxs.push(rx);
    }
    let mut r = data;
    read_loop(&mut r, &shared, &info).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = ChunkHeader {
            flags,
            kind,
            cookie,
            length: payload.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(payload);
        v
    }

    async fn err_of(data: &[u8]) -> String {
        run_replies(data, true).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn chunks_in_any_order_fill_the_buffer() {
        for pre_sized in [false, true] {
            let mut buf = if pre_sized {
                BytesMut::zeroed(300)
            } else {
                BytesMut::new()
            };
            buf.resize(if pre_sized { 300 } else { 0 }, 7);
            let mut src: &[u8] = &[1; 100];
            put_data(&mut src, &mut buf, 100, 100).await.unwrap();
            put_zeroes(&mut buf, 0, 100);
            let mut src: &[u8] = &[2; 100];
            put_data(&mut src, &mut buf, 200, 100).await.unwrap();
            assert_eq!(buf.len(), 300);
            assert!(buf[..100].iter().all(|&b| b == 0));
            assert!(buf[100..200].iter().all(|&b| b == 1));
            assert!(buf[200..].iter().all(|&b| b == 2));
        }
        let mut buf = BytesMut::new();
        let mut short: &[u8] = &[1; 10];
        assert!(put_data(&mut short, &mut buf, 0, 20).await.is_err());
    }

    #[tokio::test]
    async fn hostile_replies_are_named_errors() {
        let e = err_of(&simple_reply(0, 99)).await;
        assert!(e.contains("unknown cookie 0x63"), "{e}");
        let mut big = ChunkHeader {
            flags: 0,
            kind: REPLY_TYPE_BLOCK_STATUS,
            cookie: 1,
            length: 1 << 30,
        }
        .encode()
        .to_vec();
        big.extend_from_slice(&[0; 64]);
        let e = err_of(&big).await;
        assert!(e.contains("exceeds the limit"), "{e}");
        let mut p = 0u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[1; 16]);
        let e = err_of(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 0, &p)).await;
        assert!(e.contains("outside the request"), "{e}");
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(2u32 << 20).to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        let e = err_of(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &p)).await;
        assert!(e.contains("past the export end"), "{e}");
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0]);
        let e = err_of(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &p)).await;
        assert!(e.contains("unknown context id 7"), "{e}");
        let e = err_of(&[0x67, 0x44]).await;
        assert!(e.contains("disconnected"), "{e}");
        let e = err_of(&[1, 2, 3, 4]).await;
        assert!(e.contains("bad reply magic"), "{e}");
        // a well-formed error chunk is not fatal: the loop goes on to EOF
        let p = encode_error_chunk(5, "bad", Some(4096 + 100));
        let ok = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, 0, &p);
        assert!(run_replies(&ok, true).await.is_ok());
    }
}
