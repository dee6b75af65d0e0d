//! File archives: a directory tree stored as two chunked streams.
//!
//! - The **data stream** holds the content of regular files, one after the
//!   other in walk order (the data extents only, for sparse files).
//! - The **catalog stream** holds one record per entry (see
//!   [`encode_entry`]), each naming where its content starts in the data
//!   stream. Listing and searching read the catalog only.
//!
//! Both streams are cut into chunks by content-defined chunking (FastCDC
//! 2020, the `fastcdc` crate: a maintained, allocation-free
//! implementation of the published algorithm): inserting or removing
//! bytes moves only the chunks around the change, so files that did not
//! change dedup against earlier archives even when files before them did.
//! Sizes follow the datastore's chunk size `C` (the largest chunk): an
//! average of `C/4` and a minimum of `C/16` (restic's 1 MiB average for
//! the default 4 MiB).
//!
//! Each stream is described by a **dynamic index** (`*.didx`):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 8 | magic `VBDSDYN1` |
//! | 8 | 4 | format version (LE u32, 1) |
//! | 12 | 4 | reserved, zero |
//! | 16 | 8 | stream size in bytes (LE u64) |
//! | 24 | 8 | chunk count (LE u64) |
//! | 32 | 32 | reserved, zero |
//! | 64 | 40 × count | per chunk: end offset in the stream (LE u64, strictly ascending) and digest |
//! | end | 32 | SHA-256 of everything before it |
//!
//! ## Incrementals without reading unchanged files
//!
//! A file whose metadata did not change since the previous archive is not
//! read: the chunks of the previous data stream that hold its content are
//! appended to the new data stream as they are (after a cut of the data
//! pending before them), and its entry points into them. Neighbouring
//! bytes in those chunks belong to no entry of the new archive (they are
//! skipped on reads); consecutive unchanged files share their chunks. The
//! previous snapshot stays locked while the archive is written, so that
//! those chunks cannot be collected meanwhile (the same rule as an
//! incremental volume).

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use provider_api::{
    ArchiveStats, Error, ErrorKind, FileArchiveReader, FileArchiveWriter, FileEntry, FileKind,
    Result,
};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkStore, Digest};
use crate::crypt::{Crypt, FILE_OVERHEAD, open_opt, seal_opt};
use crate::manifest::FileRef;
use crate::storage::{Held, Storage};
use crate::util::{corrupt, sha256_hex};

/// Magic number of a dynamic index.
pub const DYNAMIC_INDEX_MAGIC: [u8; 8] = *b"VBDSDYN1";
const DYN_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
/// Largest number of chunks a dynamic index may list.
pub const MAX_DYNAMIC_CHUNKS: u64 = 1 << 28;
/// Largest catalog record accepted.
pub const MAX_RECORD_LEN: usize = 16 << 20;

/// A file archive in a snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestArchive {
    /// Archive name (unique in the snapshot).
    pub name: String,
    /// Number of catalog entries.
    pub entries: u64,
    /// The catalog stream's index.
    pub catalog: FileRef,
    /// The data stream's index.
    pub data: FileRef,
}

/// A stream's chunks: end offsets and digests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicIndex {
    /// (end offset in the stream, digest) per chunk, ascending.
    pub chunks: Vec<(u64, Digest)>,
}

impl DynamicIndex {
    /// Stream length.
    pub fn size(&self) -> u64 {
        self.chunks.last().map(|c| c.0).unwrap_or(0)
    }

    /// Start offset of chunk `i`.
    pub fn start(&self, i: usize) -> u64 {
        if i == 0 { 0 } else { self.chunks[i - 1].0 }
    }

    /// The chunk holding stream offset `off` (< size).
    pub fn chunk_at(&self, off: u64) -> usize {
        self.chunks.partition_point(|c| c.0 <= off)
    }

    /// The file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 40 * self.chunks.len() + 32);
        out.extend_from_slice(&DYNAMIC_INDEX_MAGIC);
        out.extend_from_slice(&DYN_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.size().to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0; 32]);
        for (end, d) in &self.chunks {
            out.extend_from_slice(&end.to_le_bytes());
            out.extend_from_slice(&d.0);
        }
        use sha2::Digest as _;
        let sum: [u8; 32] = sha2::Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Parse and check file bytes (`path` names the file in errors).
    pub fn decode(buf: &[u8], path: &Path) -> Result<Self> {
        let bad = |why: String| corrupt(format!("index {} is damaged: {why}", path.display()));
        if buf.len() < HEADER_LEN + 32 {
            return Err(bad("shorter than its header".into()));
        }
        if buf[..8] != DYNAMIC_INDEX_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(buf[8..12].try_into().unwrap_or_default());
        if version != DYN_VERSION {
            return Err(bad(format!("unknown version {version}")));
        }
        let size = u64_at(16);
        let count = u64_at(24);
        if count > MAX_DYNAMIC_CHUNKS {
            return Err(bad(format!("chunk count {count} out of range")));
        }
        let expect = HEADER_LEN as u64 + 40 * count + 32;
        if buf.len() as u64 != expect {
            return Err(bad(format!("{} bytes, expected {expect}", buf.len())));
        }
        let body = &buf[..buf.len() - 32];
        use sha2::Digest as _;
        let sum: [u8; 32] = sha2::Sha256::digest(body).into();
        if sum[..] != buf[buf.len() - 32..] {
            return Err(bad("checksum mismatch".into()));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut prev = 0;
        for c in body[HEADER_LEN..].chunks_exact(40) {
            let end = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
            if end <= prev {
                return Err(bad(format!("chunk end {end} not after {prev}")));
            }
            prev = end;
            let mut d = [0u8; 32];
            d.copy_from_slice(&c[8..]);
            chunks.push((end, Digest(d)));
        }
        if prev != size {
            return Err(bad(format!("chunks end at {prev}, the stream at {size}")));
        }
        Ok(DynamicIndex { chunks })
    }

    /// Read and check an index file of a datastore against its manifest
    /// entry, decrypting it with `crypt`.
    pub(crate) fn read(
        st: &Storage,
        path: &Path,
        expect_sha256: &str,
        crypt: Option<&Crypt>,
    ) -> Result<Self> {
        let buf = st.read(
            path,
            HEADER_LEN as u64 + 40 * MAX_DYNAMIC_CHUNKS + 32 + FILE_OVERHEAD as u64,
        )?;
        let got = sha256_hex(&buf);
        if got != expect_sha256 {
            return Err(corrupt(format!(
                "index {} is damaged: sha256 {got} differs from the manifest's {expect_sha256}",
                path.display()
            )));
        }
        DynamicIndex::decode(&open_opt(crypt, path, buf)?, path)
    }
}

/// Compare two archive paths in walk order: component by component, so
/// that everything below a directory comes right after it.
pub fn walk_order(a: &[u8], b: &[u8]) -> Ordering {
    let mut ai = a.split(|c| *c == b'/').filter(|c| !c.is_empty());
    let mut bi = b.split(|c| *c == b'/').filter(|c| !c.is_empty());
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match x.cmp(y) {
                Ordering::Equal => {}
                o => return o,
            },
        }
    }
}

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::Symlink => 3,
        FileKind::Hardlink => 4,
        FileKind::CharDevice => 5,
        FileKind::BlockDevice => 6,
        FileKind::Fifo => 7,
        FileKind::Socket => 8,
    }
}

fn kind_of(c: u8) -> Option<FileKind> {
    Some(match c {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::Hardlink,
        5 => FileKind::CharDevice,
        6 => FileKind::BlockDevice,
        7 => FileKind::Fifo,
        8 => FileKind::Socket,
        _ => return None,
    })
}

/// Append one catalog record:
///
/// `u32 length of the rest` · `u8 kind` · `u32 mode, uid, gid` ·
/// `i64 mtime_ns, ctime_ns` · `u64 inode, size, rdev, data_offset` ·
/// `bytes path` · `bytes link` · `u32 xattr count` + (`bytes name`,
/// `bytes value`)… · `u32 extent count` (`u32::MAX`: not sparse) +
/// (`u64 offset`, `u64 length`)…; all little-endian, `bytes` = `u32`
/// length and the bytes.
pub fn encode_entry(e: &FileEntry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind_code(e.kind));
    for v in [e.mode, e.uid, e.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [e.mtime_ns, e.ctime_ns] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [e.inode, e.size, e.rdev, e.data_offset] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    bytes(out, &e.path);
    bytes(out, &e.link);
    out.extend_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
    for (n, v) in &e.xattrs {
        bytes(out, n);
        bytes(out, v);
    }
    match &e.extents {
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        Some(ex) => {
            out.extend_from_slice(&(ex.len() as u32).to_le_bytes());
            for (o, l) in ex {
                out.extend_from_slice(&o.to_le_bytes());
                out.extend_from_slice(&l.to_le_bytes());
            }
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Parse one record body (without its length prefix).
pub fn decode_entry(buf: &[u8]) -> std::result::Result<FileEntry, String> {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take(&mut self, n: usize) -> std::result::Result<&[u8], String> {
            if self.0.len() < n {
                return Err(format!(
                    "record truncated ({} bytes left, {n} needed)",
                    self.0.len()
                ));
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u32(&mut self) -> std::result::Result<u32, String> {
            Ok(u32::from_le_bytes(
                self.take(4)?.try_into().unwrap_or_default(),
            ))
        }
        fn u64(&mut self) -> std::result::Result<u64, String> {
            Ok(u64::from_le_bytes(
                self.take(8)?.try_into().unwrap_or_default(),
            ))
        }
        fn bytes(&mut self) -> std::result::Result<Vec<u8>, String> {
            let n = self.u32()? as usize;
            Ok(self.take(n)?.to_vec())
        }
    }
    let mut r = R(buf);
    let code = r.take(1)?[0];
    let kind = kind_of(code).ok_or_else(|| format!("unknown entry kind {code}"))?;
    let (mode, uid, gid) = (r.u32()?, r.u32()?, r.u32()?);
    let (mtime_ns, ctime_ns) = (r.u64()? as i64, r.u64()? as i64);
    let (inode, size, rdev, data_offset) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let path = r.bytes()?;
    let link = r.bytes()?;
    let nx = r.u32()? as usize;
    let mut xattrs = Vec::with_capacity(nx.min(1024));
    for _ in 0..nx {
        xattrs.push((r.bytes()?, r.bytes()?));
    }
    let ne = r.u32()?;
    let extents = if ne == u32::MAX {
        None
    } else {
        let mut v = Vec::with_capacity((ne as usize).min(1 << 16));
        for _ in 0..ne {
            v.push((r.u64()?, r.u64()?));
        }
        Some(v)
    };
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the record", r.0.len()));
    }
    Ok(FileEntry {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime_ns,
        ctime_ns,
        inode,
        size,
        rdev,
        link,
        xattrs,
        extents,
        data_offset,
    })
}

/// The FastCDC parameters for a datastore's chunk size (min, avg, max).
pub fn cdc_sizes(chunk_size: usize) -> (usize, usize, usize) {
    let max = chunk_size.clamp(4096, 16 << 20);
    let avg = (max / 4).clamp(1024, 4 << 20);
    let min = (max / 16).clamp(256, 1 << 20);
    (min, avg, max)
}

/// A chunk's digest and insertion, computed on a worker.
type Stored = Result<(Digest, crate::chunk::Inserted)>;
type Job = (Vec<u8>, ChunkStore, std::sync::mpsc::SyncSender<Stored>);

/// Worker threads that hash, compress (and encrypt) and store the chunks
/// of an archive's streams while the walk goes on; results are taken in
/// order, so the index stays in stream order.
pub(crate) struct Pool {
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Chunks in flight per stream (bounds memory: each is at most the
    /// largest chunk).
    depth: usize,
}

impl Pool {
    pub(crate) fn new() -> Pool {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(n);
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((data, store, reply)) = job else {
                            return;
                        };
                        let d = store.digest_of(&data);
                        let r = store.insert(&d, &data).map(|ins| (d, ins));
                        let _ = reply.send(r);
                    }
                })
            })
            .collect();
        Pool {
            tx: Some(tx),
            threads,
            depth: 2 * n,
        }
    }

    fn submit(
        &self,
        data: Vec<u8>,
        store: ChunkStore,
    ) -> Result<std::sync::mpsc::Receiver<Stored>> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .as_ref()
            .and_then(|tx| tx.send((data, store, reply)).ok())
            .ok_or_else(|| Error::other("the chunk workers stopped"))?;
        Ok(rx)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One stream being cut into chunks and stored.
struct StreamWriter {
    store: ChunkStore,
    pool: Arc<Pool>,
    sizes: (usize, usize, usize),
    buf: Vec<u8>,
    index: DynamicIndex,
    /// Chunks cut and not yet stored: (end offset, result to come).
    in_flight: std::collections::VecDeque<(u64, std::sync::mpsc::Receiver<Stored>)>,
    /// End of the last chunk cut (stored or in flight).
    cut_end: u64,
    prefixes: BTreeSet<u8>,
    stored: u64,
    what: String,
}

impl StreamWriter {
    fn new(store: ChunkStore, pool: Arc<Pool>, what: String) -> StreamWriter {
        let sizes = cdc_sizes(store.chunk_size());
        StreamWriter {
            store,
            pool,
            sizes,
            buf: Vec::new(),
            index: DynamicIndex::default(),
            in_flight: std::collections::VecDeque::new(),
            cut_end: 0,
            prefixes: BTreeSet::new(),
            stored: 0,
            what,
        }
    }

    /// Current length of the stream (cut and pending).
    fn pos(&self) -> u64 {
        self.cut_end + self.buf.len() as u64
    }

    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        let max = self.sizes.2;
        while !data.is_empty() {
            let room = (2 * max).saturating_sub(self.buf.len()).max(1);
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buf.extend_from_slice(now);
            data = rest;
            while self.buf.len() >= max {
                let cut = self.cut_point();
                self.emit(cut)?;
            }
        }
        Ok(())
    }

    fn cut_point(&self) -> usize {
        let (min, avg, max) = self.sizes;
        fastcdc::v2020::FastCDC::new(&self.buf, min, avg, max)
            .next()
            .map(|c| c.length)
            .unwrap_or(self.buf.len())
    }

    /// Cut whatever is pending (before reused chunks, and at the end).
    fn flush(&mut self) -> Result<()> {
        while !self.buf.is_empty() {
            let cut = self.cut_point();
            self.emit(cut)?;
        }
        Ok(())
    }

    fn emit(&mut self, len: usize) -> Result<()> {
        let data: Vec<u8> = self.buf.drain(..len).collect();
        let rx = self.pool.submit(data, self.store.clone())?;
        self.cut_end += len as u64;
        self.in_flight.push_back((self.cut_end, rx));
        while self.in_flight.len() > self.pool.depth {
            self.settle_one()?;
        }
        Ok(())
    }

    /// Take the oldest chunk in flight into the index.
    fn settle_one(&mut self) -> Result<()> {
        let Some((end, rx)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let start = self.index.size();
        let (d, ins) = rx
            .recv()
            .map_err(|_| Error::other("a chunk worker stopped"))?
            .map_err(|e| {
                e.context_str(&format!("storing the chunk at {start} of {}", self.what))
            })?;
        if ins.new {
            self.prefixes.insert(d.0[0]);
            self.stored += ins.stored;
        }
        self.index.chunks.push((end, d));
        Ok(())
    }

    fn settle(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_one()?;
        }
        Ok(())
    }

    /// Append an existing chunk (of `len` bytes) as it is.
    fn append_chunk(&mut self, len: u64, d: Digest) -> Result<()> {
        debug_assert!(self.buf.is_empty());
        self.settle()?;
        self.cut_end += len;
        self.index.chunks.push((self.cut_end, d));
        Ok(())
    }

    fn finish(mut self) -> Result<(DynamicIndex, u64)> {
        self.flush()?;
        self.settle()?;
        self.store
            .sync_prefixes(std::mem::take(&mut self.prefixes))?;
        Ok((self.index, self.stored))
    }
}

/// Context for error messages (the error type keeps its kind).
trait ContextStr {
    fn context_str(self, what: &str) -> Error;
}

impl ContextStr for Error {
    fn context_str(self, what: &str) -> Error {
        let kind = self.kind();
        let retry = self.is_retryable();
        Error::new(kind, format!("{what}: {}", self.report())).retryable(retry)
    }
}

/// The previous archive an incremental reuses: its data index and its
/// catalog, read in walk order beside the new walk.
pub(crate) struct Previous {
    pub(crate) data: DynamicIndex,
    pub(crate) entries: CatalogIter,
    pub(crate) peeked: Option<FileEntry>,
    /// Keeps the previous snapshot from deletion while its chunks are
    /// reused.
    pub(crate) _lock: Held,
}

/// Where a finished archive goes.
pub(crate) type Finish = Box<dyn FnOnce(ManifestArchive) -> Result<()> + Send>;

/// Writes one file archive into a snapshot's temporary directory.
pub(crate) struct ArchiveWriter {
    name: String,
    storage: Storage,
    crypt: Option<Crypt>,
    dir: PathBuf,
    data: StreamWriter,
    catalog: StreamWriter,
    record: Vec<u8>,
    previous: Option<Previous>,
    /// The previous data chunk appended last, and where it starts in the
    /// new stream (consecutive reused files share chunks).
    last_reused: Option<(usize, u64)>,
    /// Content still owed by the file added last.
    owed: u64,
    last_path: Option<Vec<u8>>,
    stats: ArchiveStats,
    finish: Option<Finish>,
}

impl ArchiveWriter {
    #[allow(clippy::too_many_arguments, reason = "internal constructor")]
    pub(crate) fn new(
        name: &str,
        storage: Storage,
        crypt: Option<Crypt>,
        store: ChunkStore,
        dir: PathBuf,
        previous: Option<Previous>,
        finish: Finish,
    ) -> ArchiveWriter {
        let pool = Arc::new(Pool::new());
        ArchiveWriter {
            name: name.to_owned(),
            storage,
            crypt,
            dir,
            data: StreamWriter::new(
                store.clone(),
                pool.clone(),
                format!("archive {name}'s data"),
            ),
            catalog: StreamWriter::new(store, pool, format!("archive {name}'s catalog")),
            record: Vec::new(),
            previous,
            last_reused: None,
            owed: 0,
            last_path: None,
            stats: ArchiveStats::default(),
            finish: Some(finish),
        }
    }

    fn check_next(&mut self, e: &FileEntry) -> Result<()> {
        if self.owed != 0 {
            return Err(Error::invalid(format!(
                "archive {}: {} bytes of the previous file's content missing before {}",
                self.name,
                self.owed,
                e.display_path()
            )));
        }
        if let Some(last) = &self.last_path
            && walk_order(last, &e.path) != Ordering::Less
        {
            return Err(Error::invalid(format!(
                "archive {}: entry {} is not after {} in walk order",
                self.name,
                e.display_path(),
                String::from_utf8_lossy(last)
            )));
        }
        if e.path.starts_with(b"/")
            || e.path
                .split(|c| *c == b'/')
                .any(|c| c == b".." || c == b".")
        {
            return Err(Error::invalid(format!(
                "archive {}: entry path {} is not relative and normal",
                self.name,
                e.display_path()
            )));
        }
        self.last_path = Some(e.path.clone());
        Ok(())
    }

    fn put_record(&mut self, e: &FileEntry) -> Result<()> {
        self.record.clear();
        encode_entry(e, &mut self.record);
        let rec = std::mem::take(&mut self.record);
        let r = self.catalog.push(&rec);
        self.record = rec;
        self.stats.entries += 1;
        r
    }
}

impl FileArchiveWriter for ArchiveWriter {
    fn previous(&mut self, path: &[u8]) -> Result<Option<FileEntry>> {
        let Some(p) = &mut self.previous else {
            return Ok(None);
        };
        loop {
            if p.peeked.is_none() {
                p.peeked = match p.entries.next() {
                    None => return Ok(None),
                    Some(e) => Some(e?),
                };
            }
            let Some(e) = &p.peeked else { return Ok(None) };
            match walk_order(&e.path, path) {
                Ordering::Less => p.peeked = None,
                Ordering::Equal => return Ok(p.peeked.take()),
                Ordering::Greater => return Ok(None),
            }
        }
    }

    fn add(&mut self, mut entry: FileEntry) -> Result<()> {
        self.check_next(&entry)?;
        entry.data_offset = self.data.pos();
        if entry.kind == FileKind::File {
            self.owed = entry.stored_len();
            self.stats.files_read += 1;
        } else {
            entry.size = 0;
            entry.extents = None;
        }
        self.put_record(&entry)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.len() as u64 > self.owed {
            return Err(Error::invalid(format!(
                "archive {}: {} bytes written to {}, more than its stored length",
                self.name,
                data.len(),
                self.last_path
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
            )));
        }
        self.owed -= data.len() as u64;
        self.stats.bytes_read += data.len() as u64;
        if !data.is_empty() {
            self.last_reused = None;
        }
        self.data.push(data)
    }

    fn reuse(&mut self, mut entry: FileEntry, previous: &FileEntry) -> Result<()> {
        self.check_next(&entry)?;
        let len = previous.stored_len();
        if entry.kind != FileKind::File
            || previous.kind != FileKind::File
            || entry.stored_len() != len
        {
            return Err(Error::invalid(format!(
                "archive {}: {} cannot reuse the previous content (kind or length differs)",
                self.name,
                entry.display_path()
            )));
        }
        let Some(prev) = &self.previous else {
            return Err(Error::invalid(format!(
                "archive {}: no previous archive to reuse {} from",
                self.name,
                entry.display_path()
            )));
        };
        if len == 0 {
            entry.data_offset = self.data.pos();
        } else {
            let end = previous
                .data_offset
                .checked_add(len)
                .filter(|e| *e <= prev.data.size());
            let Some(end) = end else {
                return Err(corrupt(format!(
                    "archive {}: the previous entry {} lies outside its data stream",
                    self.name,
                    entry.display_path()
                )));
            };
            let first = prev.data.chunk_at(previous.data_offset);
            let last = prev.data.chunk_at(end - 1);
            let mut from = first;
            let first_new_start = match self.last_reused {
                Some((i, start)) if i == first => {
                    from = first + 1;
                    start
                }
                Some((i, _)) if i > first => {
                    return Err(Error::invalid(format!(
                        "archive {}: {} reused out of order",
                        self.name,
                        entry.display_path()
                    )));
                }
                _ => {
                    self.data.flush()?;
                    self.data.pos()
                }
            };
            let mut start = self.data.pos();
            for i in from..=last {
                start = self.data.pos();
                let len = prev.data.chunks[i].0 - prev.data.start(i);
                self.data.append_chunk(len, prev.data.chunks[i].1)?;
            }
            if from <= last {
                self.last_reused = Some((last, start));
            }
            entry.data_offset = first_new_start + (previous.data_offset - prev.data.start(first));
        }
        entry.extents.clone_from(&previous.extents);
        self.stats.files_reused += 1;
        self.put_record(&entry)
    }

    fn finish(mut self: Box<Self>) -> Result<ArchiveStats> {
        if self.owed != 0 {
            return Err(Error::invalid(format!(
                "archive {}: {} bytes of the last file's content missing",
                self.name, self.owed
            )));
        }
        let pool = self.data.pool.clone();
        let data = std::mem::replace(
            &mut self.data,
            StreamWriter::new(self.catalog.store.clone(), pool.clone(), String::new()),
        );
        let catalog = std::mem::replace(
            &mut self.catalog,
            StreamWriter::new(data.store.clone(), pool, String::new()),
        );
        let (didx, s1) = data.finish()?;
        let (cidx, s2) = catalog.finish()?;
        self.stats.bytes_stored = s1 + s2;
        let base = crate::util::encode_component(&self.name);
        let write = |file: String, idx: &DynamicIndex| -> Result<FileRef> {
            let path = self.dir.join(&file);
            let bytes = seal_opt(self.crypt.as_ref(), &path, idx.encode())?;
            self.storage.write_new(&path, &bytes)?;
            Ok(FileRef {
                file,
                size: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            })
        };
        let rec = ManifestArchive {
            name: self.name.clone(),
            entries: self.stats.entries,
            catalog: write(format!("{base}.catalog.didx"), &cidx)?,
            data: write(format!("{base}.data.didx"), &didx)?,
        };
        let finish = self
            .finish
            .take()
            .ok_or_else(|| Error::invalid("finished twice"))?;
        finish(rec)?;
        Ok(self.stats)
    }
}

/// Reads a stream chunk by chunk, keeping the chunk read last.
pub(crate) struct StreamReader {
    store: ChunkStore,
    index: DynamicIndex,
    last: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
    what: String,
}

impl StreamReader {
    pub(crate) fn new(store: ChunkStore, index: DynamicIndex, what: String) -> StreamReader {
        StreamReader {
            store,
            index,
            last: Mutex::new(None),
            what,
        }
    }

    fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((j, c)) = &*last
            && *j == i
        {
            return Ok(c.clone());
        }
        let (end, d) = self.index.chunks[i];
        let want = end - self.index.start(i);
        let data = self
            .store
            .load(&d)
            .map_err(|e| e.context_str(&format!("{} at {}", self.what, self.index.start(i))))?;
        if data.len() as u64 != want {
            return Err(corrupt(format!(
                "chunk {d} of {} at {} has {} bytes, the index says {want}",
                self.what,
                self.index.start(i),
                data.len()
            )));
        }
        let c = Arc::new(data);
        *last = Some((i, c.clone()));
        Ok(c)
    }

    /// `len` bytes at `off`.
    pub(crate) fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let end = off
            .checked_add(len as u64)
            .filter(|e| *e <= self.index.size())
            .ok_or_else(|| {
                corrupt(format!(
                    "{}: {len} bytes at {off} lie outside the stream ({} bytes)",
                    self.what,
                    self.index.size()
                ))
            })?;
        let mut out = Vec::with_capacity(len);
        let mut pos = off;
        while pos < end {
            let i = self.index.chunk_at(pos);
            let c = self.chunk(i)?;
            let s = self.index.start(i);
            let a = (pos - s) as usize;
            let b = ((end - s) as usize).min(c.len());
            out.extend_from_slice(&c[a..b]);
            pos = s + b as u64;
        }
        Ok(out)
    }
}

/// The catalog's records, in order, read chunk by chunk.
pub(crate) struct CatalogIter {
    stream: Arc<StreamReader>,
    next_chunk: usize,
    buf: Vec<u8>,
    at: usize,
    failed: bool,
}

impl CatalogIter {
    pub(crate) fn new(stream: Arc<StreamReader>) -> CatalogIter {
        CatalogIter {
            stream,
            next_chunk: 0,
            buf: Vec::new(),
            at: 0,
            failed: false,
        }
    }

    /// Make `n` bytes available at `at`; false at the end of the stream.
    fn fill(&mut self, n: usize) -> Result<bool> {
        while self.buf.len() - self.at < n {
            if self.next_chunk >= self.stream.index.chunks.len() {
                return Ok(false);
            }
            self.buf.drain(..self.at);
            self.at = 0;
            let c = self.stream.chunk(self.next_chunk)?;
            self.next_chunk += 1;
            self.buf.extend_from_slice(&c);
        }
        Ok(true)
    }

    fn next_entry(&mut self) -> Result<Option<FileEntry>> {
        if !self.fill(4)? {
            if self.buf.len() > self.at {
                return Err(corrupt(format!(
                    "{}: truncated record at its end",
                    self.stream.what
                )));
            }
            return Ok(None);
        }
        let len = u32::from_le_bytes(
            self.buf[self.at..self.at + 4]
                .try_into()
                .unwrap_or_default(),
        ) as usize;
        if len > MAX_RECORD_LEN {
            return Err(corrupt(format!(
                "{}: record of {len} bytes",
                self.stream.what
            )));
        }
        if !self.fill(4 + len)? {
            return Err(corrupt(format!(
                "{}: truncated record at its end",
                self.stream.what
            )));
        }
        let rec = &self.buf[self.at + 4..self.at + 4 + len];
        let e = decode_entry(rec).map_err(|why| corrupt(format!("{}: {why}", self.stream.what)))?;
        self.at += 4 + len;
        Ok(Some(e))
    }
}

impl Iterator for CatalogIter {
    type Item = Result<FileEntry>;

    fn next(&mut self) -> Option<Result<FileEntry>> {
        if self.failed {
            return None;
        }
        match self.next_entry() {
            Ok(e) => e.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// A stored file archive, open for reading.
pub(crate) struct ArchiveReader {
    pub(crate) entries: u64,
    pub(crate) catalog: Arc<StreamReader>,
    pub(crate) data: StreamReader,
    /// Keeps the snapshot from deletion while open.
    pub(crate) _lock: Arc<Held>,
}

impl FileArchiveReader for ArchiveReader {
    fn len(&self) -> u64 {
        self.entries
    }

    fn entries(&self) -> Result<Box<dyn Iterator<Item = Result<FileEntry>> + Send + '_>> {
        Ok(Box::new(CatalogIter::new(self.catalog.clone())))
    }

    fn read(&self, entry: &FileEntry, offset: u64, len: usize) -> Result<Vec<u8>> {
        if entry.kind != FileKind::File {
            return Err(Error::invalid(format!(
                "{} is not a regular file",
                entry.display_path()
            )));
        }
        let stored = entry.stored_len();
        if offset.checked_add(len as u64).is_none_or(|e| e > stored) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: {len} bytes at {offset} lie beyond its {stored} stored bytes",
                    entry.display_path()
                ),
            ));
        }
        self.data.read(entry.data_offset + offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_order_puts_a_directory_before_its_contents() {
        let mut v: Vec<&[u8]> = vec![b"a-c", b"a/b", b"a", b"", b"b", b"a/b/c", b"a.x"];
        v.sort_by(|a, b| walk_order(a, b));
        assert_eq!(
            v,
            vec![&b""[..], b"a", b"a/b", b"a/b/c", b"a-c", b"a.x", b"b"]
        );
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let mut e = FileEntry::new(b"d/\xffname".to_vec(), FileKind::File);
        e.mode = 0o4755;
        e.uid = 100_000;
        e.mtime_ns = -5;
        e.size = 1 << 40;
        e.xattrs = vec![(b"user.a".to_vec(), vec![0, 1, 2])];
        e.extents = Some(vec![(0, 4096), (1 << 39, 10)]);
        e.data_offset = 77;
        let mut buf = Vec::new();
        encode_entry(&e, &mut buf);
        assert_eq!(decode_entry(&buf[4..]).unwrap(), e);
        for cut in [5, 20, buf.len() - 1] {
            assert!(decode_entry(&buf[4..cut]).is_err());
        }
        let mut bad = buf.clone();
        bad[4] = 99;
        assert!(decode_entry(&bad[4..]).unwrap_err().contains("kind"));
    }

    #[test]
    fn dynamic_index_round_trip_and_damage() {
        let idx = DynamicIndex {
            chunks: vec![(10, Digest::of(b"a")), (25, Digest::of(b"b"))],
        };
        let enc = idx.encode();
        let p = Path::new("t.didx");
        assert_eq!(DynamicIndex::decode(&enc, p).unwrap(), idx);
        assert_eq!(idx.chunk_at(9), 0);
        assert_eq!(idx.chunk_at(10), 1);
        for pos in 0..enc.len() {
            let mut bad = enc.clone();
            bad[pos] ^= 1;
            assert!(DynamicIndex::decode(&bad, p).is_err(), "flip at {pos}");
        }
    }
}
