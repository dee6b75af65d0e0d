//! The NBD client.
//!
//! [`Client::connect`] performs the fixed newstyle handshake (optionally
//! upgrading to TLS first), negotiates structured replies and meta
//! contexts and selects the export with `NBD_OPT_GO`. The returned
//! [`Client`] is cheap to clone; all clones share the connection(s), and
//! any number of tasks may issue requests at once: requests are pipelined
//! and their replies matched by cookie.

mod conn;
pub(crate) mod handshake;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, ErrorKind, Result};
use crate::proto::*;
pub use crate::proto::{BlockSize, Extent};
pub use crate::tls::TlsClientConfig;
pub use crate::uri::{Address, NbdUri};
use conn::{Conn, Done, Target};

/// Default [`ConnectOptions::max_request_size`].
pub const DEFAULT_MAX_REQUEST: u32 = 1 << 20;

/// Default limit for connecting plus the handshake.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How to reach an export.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server address.
    pub address: Address,
    /// Export name.
    pub export: String,
    /// TLS settings: when set, STARTTLS is mandatory and the server is
    /// verified against the CA; there is no fallback to plaintext.
    pub tls: Option<TlsClientConfig>,
    /// Meta contexts to select, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:cbt0`, `qemu:allocation-depth`.
    pub meta_contexts: Vec<String>,
    /// Number of connections to open when the server advertises
    /// multi-conn (1: a single connection).
    pub connections: usize,
    /// Limit for connecting plus the handshake (default 30 s).
    pub connect_timeout: std::time::Duration,
    /// Largest READ/WRITE request sent (default 1 MiB; the server's
    /// maximum block size caps it). Larger reads and writes are split and
    /// the pieces sent concurrently; moderate requests keep the server's
    /// buffers small and its workers busy.
    pub max_request_size: u32,
}

impl ConnectOptions {
    /// Options for `export` at `address`, no TLS, no meta contexts.
    pub fn new(address: Address, export: impl Into<String>) -> Self {
        ConnectOptions {
            address,
            export: export.into(),
            tls: None,
            meta_contexts: Vec::new(),
            connections: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_request_size: DEFAULT_MAX_REQUEST,
        }
    }

    /// Options from a URI. `nbds` URIs need TLS settings: either `tls`
    /// here or a `tls-certificates=DIR` query parameter; without them this
    /// fails (an unverified TLS connection is never made).
    pub fn from_uri(uri: &NbdUri, tls: Option<TlsClientConfig>) -> Result<Self> {
        let tls = match (uri.tls, tls, &uri.tls_certificates) {
            (_, Some(t), _) => Some(t),
            (true, None, Some(dir)) => Some(TlsClientConfig::from_dir(dir)?),
            (true, None, None) => {
                return Err(Error::tls(
                    "nbds:// needs a CA to verify the server (tls-certificates=DIR or TLS settings)",
                ));
            }
            (false, None, _) => None,
        };
        Ok(ConnectOptions {
            address: uri.address.clone(),
            export: uri.export.clone(),
            tls,
            meta_contexts: Vec::new(),
            connections: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_request_size: DEFAULT_MAX_REQUEST,
        })
    }

    /// Add a meta context to select.
    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }

    /// Set TLS.
    pub fn tls(mut self, tls: TlsClientConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Set the largest READ/WRITE request.
    pub fn max_request_size(mut self, n: u32) -> Self {
        self.max_request_size = n.max(512);
        self
    }

    /// Open up to `n` connections when the server allows multi-conn.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }
}

impl TryFrom<&NbdUri> for ConnectOptions {
    type Error = Error;
    fn try_from(u: &NbdUri) -> Result<Self> {
        ConnectOptions::from_uri(u, None)
    }
}

/// An export the server lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<dyn Io>),
}

impl Stream {
    fn io(&mut self) -> &mut dyn Io {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
            Stream::Tls(s) => s.as_mut(),
        }
    }
    fn split(self) -> (conn::BoxRead, conn::BoxWrite) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Connect, read the greeting and do STARTTLS when asked.
async fn open(opts: &ConnectOptions) -> Result<(Stream, bool)> {
    let (mut st, host) = match &opts.address {
        Address::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            (Stream::Tcp(s), host.clone())
        }
        Address::Unix(p) => (
            Stream::Unix(UnixStream::connect(p).await?),
            "localhost".into(),
        ),
    };
    let no_zeroes = handshake::greeting(st.io()).await?;
    if let Some(tls) = &opts.tls {
        handshake::starttls(st.io()).await?;
        let connector = tokio_rustls::TlsConnector::from(tls.build()?);
        let name = tls.server_name(&host)?;
        let map = |e: std::io::Error| Error::tls("TLS handshake failed").with_source(e);
        st = match st {
            Stream::Tcp(s) => Stream::Tls(Box::new(connector.connect(name, s).await.map_err(map)?)),
            Stream::Unix(s) => {
                Stream::Tls(Box::new(connector.connect(name, s).await.map_err(map)?))
            }
            Stream::Tls(_) => return Err(Error::tls("TLS negotiated twice")),
        };
    }
    Ok((st, no_zeroes))
}

async fn connect_one(opts: &ConnectOptions) -> Result<Conn> {
    match tokio::time::timeout(opts.connect_timeout, connect_one_inner(opts)).await {
        Ok(r) => r,
        Err(_) => Err(Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "connect and handshake took longer than {:?}",
                opts.connect_timeout
            ),
        ))
        .with_export(opts.export.clone())),
    }
}

async fn connect_one_inner(opts: &ConnectOptions) -> Result<Conn> {
    let ctx = |e: Error| e.with_export(opts.export.clone());
    let (mut st, no_zeroes) = open(opts).await.map_err(ctx)?;
    let neg = handshake::negotiate(st.io(), &opts.export, true, &opts.meta_contexts, no_zeroes)
        .await
        .map_err(|e| {
            // With TLS 1.3 a refused client certificate is only seen after
            // the TLS handshake, as the server closing the session (an
            // alert, a reset or a truncated NBD handshake).
            let closed = matches!(e.kind(), ErrorKind::Io | ErrorKind::Disconnected(_))
                || matches!(e.kind(), ErrorKind::Protocol(m) if m.starts_with("handshake truncated"));
            match &opts.tls {
                Some(t) if closed => Error::tls(if t.client_cert_pem.is_some() {
                    "the server closed the TLS session after the TLS handshake: it refused our client certificate (is it signed by the CA the server trusts?)"
                } else {
                    "the server closed the TLS session after the TLS handshake: it requires a client certificate (give one with its key, e.g. --tls-cert/--tls-key, or client-cert.pem/client-key.pem in the tls-certificates directory)"
                })
                .with_source(e),
                _ => e,
            }
        })
        .map_err(ctx)?;
    let (r, w) = st.split();
    Ok(Conn::start(r, w, neg))
}

/// List the server's exports (NBD_OPT_LIST).
pub async fn list_exports(opts: &ConnectOptions) -> Result<Vec<ExportListing>> {
    let (mut st, _) = open(opts).await?;
    let r = handshake::list_exports(st.io()).await;
    handshake::abort(st.io()).await;
    Ok(r?
        .into_iter()
        .map(|(name, description)| ExportListing { name, description })
        .collect())
}

/// List meta contexts of `opts.export` matching `queries`
/// (NBD_OPT_LIST_META_CONTEXT; an empty query list asks for all).
pub async fn list_meta_contexts(opts: &ConnectOptions, queries: &[&str]) -> Result<Vec<String>> {
    let (mut st, _) = open(opts).await?;
    let q: Vec<String> = queries.iter().map(|s| s.to_string()).collect();
    let r = handshake::list_meta_contexts(st.io(), &opts.export, &q).await;
    handshake::abort(st.io()).await;
    r.map_err(|e| e.with_export(opts.export.clone()))
}

struct Inner {
    conns: Vec<Conn>,
    max_request: u32,
    next: AtomicUsize,
    export: String,
}

/// A connected NBD client (cheap to clone, shareable across tasks).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.inner.export)
            .field("size", &self.size())
            .field("connections", &self.inner.conns.len())
            .finish()
    }
}

/// Largest length of one TRIM / WRITE_ZEROES / BLOCK_STATUS request.
const MAX_NON_DATA_LEN: u64 = 1 << 30;

impl Client {
    /// Connect to an export.
    pub async fn connect(opts: &ConnectOptions) -> Result<Client> {
        let first = connect_one(opts).await?;
        let mut conns = vec![first];
        if opts.connections > 1 && conns[0].info.flags & TFLAG_CAN_MULTI_CONN != 0 {
            let more = try_join_all((1..opts.connections).map(|_| connect_one(opts))).await?;
            conns.extend(more);
        }
        Ok(Client {
            inner: Arc::new(Inner {
                conns,
                next: AtomicUsize::new(0),
                max_request: opts.max_request_size,
                export: opts.export.clone(),
            }),
        })
    }

    /// Connect to a URI (see [`ConnectOptions::from_uri`]).
    pub async fn connect_uri(uri: &str) -> Result<Client> {
        Self::connect(&ConnectOptions::from_uri(&NbdUri::parse(uri)?, None)?).await
    }

    fn first(&self) -> &Conn {
        &self.inner.conns[0]
    }

    fn pick(&self) -> &Conn {
        let c = &self.inner.conns;
        if c.len() == 1 {
            return &c[0];
        }
        &c[self.inner.next.fetch_add(1, Ordering::Relaxed) % c.len()]
    }

    fn err(&self, e: Error, cmd: &'static str, offset: u64) -> Error {
        e.with_command(cmd)
            .with_offset(offset)
            .with_export(self.inner.export.clone())
    }

    /// Export name.
    pub fn export_name(&self) -> &str {
        &self.inner.export
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.first().info.size
    }
    /// Block size constraints.
    pub fn block_size(&self) -> BlockSize {
        self.first().info.block_size
    }
    /// Transmission flags as sent by the server.
    pub fn transmission_flags(&self) -> u16 {
        self.first().info.flags
    }
    /// Whether several connections to this export are consistent.
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags() & TFLAG_CAN_MULTI_CONN != 0
    }
    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.transmission_flags() & TFLAG_READ_ONLY != 0
    }
    /// Whether TRIM is supported.
    pub fn can_trim(&self) -> bool {
        self.transmission_flags() & TFLAG_SEND_TRIM != 0
    }
    /// Whether WRITE_ZEROES is supported.
    pub fn can_write_zeroes(&self) -> bool {
        self.transmission_flags() & TFLAG_SEND_WRITE_ZEROES != 0
    }
    /// Whether FLUSH is supported.
    pub fn can_flush(&self) -> bool {
        self.transmission_flags() & TFLAG_SEND_FLUSH != 0
    }
    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.first().info.structured
    }
    /// Meta contexts the server selected.
    pub fn meta_contexts(&self) -> Vec<String> {
        self.first()
            .info
            .contexts
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }
    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.inner.conns.len()
    }
    /// Highest number of requests that were in flight at once on one
    /// connection (a pipelining statistic).
    pub fn max_in_flight(&self) -> usize {
        self.inner
            .conns
            .iter()
            .map(Conn::max_in_flight)
            .max()
            .unwrap_or(0)
    }

    fn check_range(&self, cmd: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(self.err(
                Error::new(ErrorKind::OutOfRange {
                    offset,
                    length: len,
                    size,
                }),
                cmd,
                offset,
            ));
        }
        Ok(())
    }

    fn check_aligned(&self, cmd: &'static str, offset: u64, len: u64) -> Result<()> {
        let min = self.block_size().min as u64;
        let end = offset + len;
        if !offset.is_multiple_of(min) || (!len.is_multiple_of(min) && end != self.size()) {
            return Err(self.err(
                Error::invalid(format!(
                    "{offset}+{len} is not aligned to the server's minimum block size {min}"
                )),
                cmd,
                offset,
            ));
        }
        Ok(())
    }

    fn max_payload(&self) -> u64 {
        let bs = self.block_size();
        let max = (bs.max as u64).min(self.inner.max_request as u64);
        (max / bs.min as u64 * bs.min as u64).max(bs.min as u64)
    }

    /// Read `len` bytes at `offset`. Holes read as zeroes. Requests larger
    /// than the server's maximum block size are split and sent at once;
    /// unaligned requests are widened to the minimum block size.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        Ok(self
            .read_with_buffer(offset, len, BytesMut::new())
            .await?
            .freeze())
    }

    /// Like [`Client::read`], but reads into `buf` (cleared first, grown as
    /// needed) and returns it holding exactly `len` bytes: pass buffers
    /// back in to avoid an allocation per read.
    pub async fn read_with_buffer(
        &self,
        offset: u64,
        len: usize,
        mut buf: BytesMut,
    ) -> Result<BytesMut> {
        self.check_range("READ", offset, len as u64)?;
        buf.clear();
        if len == 0 {
            return Ok(buf);
        }
        let min = self.block_size().min as u64;
        let a_off = offset / min * min;
        let a_end = ((offset + len as u64).div_ceil(min) * min).min(self.size());
        let a_len = (a_end - a_off) as usize;
        let piece = self.max_payload() as usize;
        let mut whole = if a_len <= piece {
            // one request: the reader appends into spare capacity, no zeroing
            buf.reserve(a_len);
            self.read_piece(a_off, a_len as u32, buf).await?
        } else {
            buf.resize(a_len, 0);
            let mut futs = Vec::with_capacity(a_len.div_ceil(piece));
            let mut pos = a_off;
            while !buf.is_empty() {
                let part = buf.split_to(piece.min(buf.len()));
                let n = part.len();
                futs.push(self.read_piece(pos, n as u32, part));
                pos += n as u64;
            }
            let mut whole = BytesMut::new();
            for p in try_join_all(futs).await? {
                whole.unsplit(p);
            }
            whole
        };
        let head = (offset - a_off) as usize;
        if head > 0 {
            bytes::Buf::advance(&mut whole, head);
        }
        whole.truncate(len);
        Ok(whole)
    }

    /// One READ request; `buf` is either empty (appended to) or exactly
    /// `len` long (filled in place).
    async fn read_piece(&self, offset: u64, len: u32, buf: BytesMut) -> Result<BytesMut> {
        let target = Target::Read { buf, covered: 0 };
        match self
            .pick()
            .submit(CMD_READ, 0, offset, len, None, target)
            .await
            .map_err(|e| self.err(e, "READ", offset))?
        {
            Done::Data(b) => Ok(b),
            _ => Err(self.err(
                Error::protocol("read finished without data"),
                "READ",
                offset,
            )),
        }
    }

    /// Read into `dst` (`dst.len()` bytes at `offset`).
    pub async fn read_into(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let b = self.read(offset, dst.len()).await?;
        dst.copy_from_slice(&b);
        Ok(())
    }

    /// Write `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_bytes(offset, Bytes::copy_from_slice(data), false)
            .await
    }

    /// Write `data` at `offset` without copying; `fua` forces it to stable
    /// storage before the reply.
    pub async fn write_bytes(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check_range("WRITE", offset, data.len() as u64)?;
        if self.is_read_only() {
            return Err(self.err(Error::unsupported("export is read-only"), "WRITE", offset));
        }
        self.check_aligned("WRITE", offset, data.len() as u64)?;
        let flags = if fua && self.transmission_flags() & TFLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            0
        };
        let piece = self.max_payload() as usize;
        let futs = (0..data.len()).step_by(piece.max(1)).map(|s| {
            let part = data.slice(s..(s + piece).min(data.len()));
            let off = offset + s as u64;
            async move {
                self.pick()
                    .submit(
                        CMD_WRITE,
                        flags,
                        off,
                        part.len() as u32,
                        Some(part),
                        Target::None,
                    )
                    .await
                    .map_err(|e| self.err(e, "WRITE", off))
            }
        });
        try_join_all(futs).await?;
        Ok(())
    }

    async fn ranged(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let name = command_name(cmd);
        let futs = (0..len).step_by(MAX_NON_DATA_LEN as usize).map(|s| {
            let off = offset + s;
            let n = (len - s).min(MAX_NON_DATA_LEN) as u32;
            async move {
                self.pick()
                    .submit(cmd, flags, off, n, None, Target::None)
                    .await
                    .map_err(|e| self.err(e, name, off))
            }
        });
        try_join_all(futs).await?;
        Ok(())
    }

    /// Write zeroes; `no_hole` asks the server to allocate them.
    pub async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        self.check_range("WRITE_ZEROES", offset, len)?;
        if self.is_read_only() || !self.can_write_zeroes() {
            return Err(self.err(
                Error::unsupported("export does not accept WRITE_ZEROES"),
                "WRITE_ZEROES",
                offset,
            ));
        }
        self.check_aligned("WRITE_ZEROES", offset, len)?;
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len).await
    }

    /// Discard a range (TRIM).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range("TRIM", offset, len)?;
        if self.is_read_only() || !self.can_trim() {
            return Err(self.err(
                Error::unsupported("export does not accept TRIM"),
                "TRIM",
                offset,
            ));
        }
        self.check_aligned("TRIM", offset, len)?;
        self.ranged(CMD_TRIM, 0, offset, len).await
    }

    /// Flush all connections (a no-op if the server does not offer FLUSH).
    pub async fn flush(&self) -> Result<()> {
        if !self.can_flush() {
            return Ok(());
        }
        let futs = self.inner.conns.iter().map(|c| async move {
            c.submit(CMD_FLUSH, 0, 0, 0, None, Target::None)
                .await
                .map_err(|e| self.err(e, "FLUSH", 0))
        });
        try_join_all(futs).await?;
        Ok(())
    }

    /// Block status of `[offset, offset+len)` for one negotiated meta
    /// context: the server's reply chunks merged into one list of
    /// extents covering exactly the range, adjacent equal extents joined.
    pub async fn block_status(&self, offset: u64, len: u64, context: &str) -> Result<Vec<Extent>> {
        const CMD: &str = "BLOCK_STATUS";
        self.check_range(CMD, offset, len)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let conn = self.pick();
        let id = conn.context_id(context).ok_or_else(|| {
            self.err(
                Error::unsupported(format!(
                    "meta context {context:?} was not negotiated (selected: {:?})",
                    self.meta_contexts()
                )),
                CMD,
                offset,
            )
        })?;
        let min = self.block_size().min as u64;
        let end = offset + len;
        let mut pos = offset / min * min;
        let max_req = MAX_NON_DATA_LEN.min(u32::MAX as u64 / min * min);
        while pos < end {
            let n = (end.div_ceil(min) * min).min(self.size()) - pos;
            let n = n.min(max_req);
            let r = conn
                .submit(
                    CMD_BLOCK_STATUS,
                    0,
                    pos,
                    n as u32,
                    None,
                    Target::Status(Default::default()),
                )
                .await
                .map_err(|e| self.err(e, CMD, pos))?;
            let Done::Status(mut m) = r else {
                return Err(self.err(
                    Error::protocol("block status finished without extents"),
                    CMD,
                    pos,
                ));
            };
            let ext = m.remove(&id).unwrap_or_default();
            let Some(last) = ext.last() else {
                return Err(self.err(
                    Error::protocol(format!("server sent no extents for {context:?}")),
                    CMD,
                    pos,
                ));
            };
            pos = last.end();
            out.extend(ext);
        }
        // clip to the asked range
        out.retain(|e| e.end() > offset && e.offset < end);
        if let Some(f) = out.first_mut()
            && f.offset < offset
        {
            f.length -= offset - f.offset;
            f.offset = offset;
        }
        if let Some(l) = out.last_mut()
            && l.end() > end
        {
            l.length = end - l.offset;
        }
        coalesce(&mut out);
        Ok(out)
    }

    /// Send NBD_CMD_DISC on every connection. Requests after this fail;
    /// dropping every clone of the client disconnects too.
    pub async fn disconnect(&self) -> Result<()> {
        for c in &self.inner.conns {
            c.disconnect().await;
        }
        Ok(())
    }
}

/// Run the client handshake against arbitrary server bytes (fuzzing).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) async fn fuzz_handshake(data: &[u8]) {
    let mut io = tokio::io::join(data, tokio::io::sink());
    if handshake::greeting(&mut io).await.is_ok() {
        let _ = handshake::negotiate(
            &mut io,
            "vm",
            true,
            &["base:allocation".into(), "qemu:dirty-bitmap:cbt0".into()],
            false,
        )
        .await;
    }
}

/// Run the reply parser against arbitrary bytes (fuzzing).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) async fn fuzz_replies(data: &[u8]) {
    let _ = conn::fuzz_replies(data).await;
}
