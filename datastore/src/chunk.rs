//! Chunks: digests, the stored chunk format and the chunk store.
//!
//! A chunk file is a 24-byte header followed by the stored bytes:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 8 | magic `VBDSCHK1` |
//! | 8 | 1 | encoding: 0 = plain, 1 = zstd; bit 7 set = encrypted |
//! | 9 | 3 | reserved, zero |
//! | 12 | 4 | plaintext length (LE u32, at most the datastore's chunk size) |
//! | 16 | 4 | stored length (LE u32, = file length - 24) |
//! | 20 | 4 | CRC-32 of bytes 0..20 and of the stored bytes |
//!
//! The CRC catches damage before decompression; the hash of the
//! plaintext (the chunk's name) is checked after.
//!
//! In an encrypted datastore (see [`crate::crypt`]) the stored bytes are
//! `nonce (12) ‖ AES-256-GCM(plain or zstd bytes) ‖ tag (16)`, the
//! associated data being bytes 0..16 of the header and the chunk's name,
//! and the name is the keyed BLAKE3 of the plaintext. The CRC still covers
//! the stored bytes, so damage is told apart from a wrong key.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use provider_api::{Error, ErrorKind, Result};

use crate::backend::Backend;
use crate::crypt::Crypt;
use crate::util::{corrupt, from_hex, io_err, to_hex, unique_suffix};

/// Magic number of a chunk file (never changes).
pub const CHUNK_MAGIC: [u8; 8] = *b"VBDSCHK1";
/// Size of a chunk file's header.
pub const CHUNK_HEADER_LEN: usize = 24;
const ENC_PLAIN: u8 = 0;
const ENC_ZSTD: u8 = 1;
/// Encoding bit: the stored bytes are encrypted.
const ENC_ENCRYPTED: u8 = 0x80;
/// zstd level used for chunks.
pub const ZSTD_LEVEL: i32 = 1;

/// The hash that names a datastore's chunks (fixed per datastore, in its
/// config): both are 256-bit cryptographic hashes, so a chunk's name
/// checks its content either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkHash {
    /// SHA-256: format version 1 datastores.
    Sha256,
    /// BLAKE3 (256-bit output): format version 2, the default. About four
    /// times SHA-256's speed per core on this project's machines (SHA-NI
    /// 0.7–1.2 GB/s, BLAKE3 with AVX-512 3.1–3.2 GB/s on 4 MiB buffers),
    /// and every backup and every read of a chunk hashes it.
    #[default]
    Blake3,
}

impl ChunkHash {
    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Digest {
        match self {
            ChunkHash::Sha256 => Digest::of(data),
            ChunkHash::Blake3 => Digest(*blake3::hash(data).as_bytes()),
        }
    }
}

/// The hash of a chunk's plaintext ([`ChunkHash`]: SHA-256 or BLAKE3, per
/// datastore). The all-zero digest [`Digest::ZERO`] is reserved: it stands
/// for a chunk of zeroes that is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The chunk that reads as zeroes (whatever its length); never stored.
    pub const ZERO: Digest = Digest([0; 32]);

    /// SHA-256 of `data` (the chunk name in a version 1 datastore; see
    /// [`ChunkStore::digest_of`] for a given datastore's).
    pub fn of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
    }

    /// Whether this is [`Digest::ZERO`].
    pub fn is_zero(&self) -> bool {
        *self == Digest::ZERO
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        from_hex::<32>(s).map(Digest)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Whether every byte of `data` is zero (fast: word compares).
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|b| *b == 0)
}

thread_local! {
    /// One zstd context per worker thread (creating one per chunk costs
    /// allocations of several MiB).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Chunks at least this long are sampled before they are compressed.
const SAMPLE_ABOVE: usize = 256 << 10;
/// Slices of a sampled chunk, spread evenly over it.
const SAMPLE_SLICES: usize = 8;
/// Bytes per slice.
const SAMPLE_SLICE: usize = 8 << 10;
/// A sample that zstd cannot shrink below this share (in 1/1000) of its
/// size marks the chunk as incompressible: it is stored plain.
const SAMPLE_KEEP_PER_MILLE: usize = 970;

fn with_compressor<T>(f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> T) -> Option<T> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut().map(f)
    })
}

/// Whether compressing `data` is worth its CPU: for a large chunk, eight
/// 8 KiB slices spread over it are compressed first, and a chunk whose
/// sample does not shrink by 3 % is stored plain without compressing the
/// rest. Random or already compressed data (encrypted guests, media,
/// archives) costs zstd's entropy analysis of every block otherwise, a
/// third of a full backup's CPU on such data (`perf record` of a backup of
/// random data). A chunk that is incompressible in every slice but
/// compressible elsewhere is stored plain: space, never correctness.
fn worth_compressing(data: &[u8]) -> bool {
    if data.len() < SAMPLE_ABOVE {
        return true;
    }
    let step = data.len() / SAMPLE_SLICES;
    let mut sample = Vec::with_capacity(SAMPLE_SLICES * SAMPLE_SLICE);
    for i in 0..SAMPLE_SLICES {
        let at = i * step;
        sample.extend_from_slice(&data[at..at + SAMPLE_SLICE.min(step)]);
    }
    match with_compressor(|c| c.compress(&sample)) {
        Some(Ok(z)) => z.len() * 1000 < sample.len() * SAMPLE_KEEP_PER_MILLE,
        _ => true,
    }
}

/// Compress `data` when that makes it smaller: (encoding, compressed bytes
/// or `None` for plain).
fn compress(data: &[u8]) -> (u8, Option<Vec<u8>>) {
    if !worth_compressing(data) {
        return (ENC_PLAIN, None);
    }
    match with_compressor(|c| c.compress(data)) {
        Some(Ok(z)) if z.len() < data.len() => (ENC_ZSTD, Some(z)),
        _ => (ENC_PLAIN, None),
    }
}

/// Bytes 0..16 of a chunk header: magic, encoding, plaintext length (the
/// associated data of an encrypted chunk).
fn header_prefix(enc: u8, raw_len: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&CHUNK_MAGIC);
    h[8] = enc;
    h[12..16].copy_from_slice(&(raw_len as u32).to_le_bytes());
    h
}

/// The header of a chunk file for `raw_len` plaintext bytes stored as
/// `payload`.
fn header(enc: u8, raw_len: usize, payload: &[u8]) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..16].copy_from_slice(&header_prefix(enc, raw_len));
    h[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..20]);
    crc.update(payload);
    h[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// A chunk's header and stored bytes: compressed when that makes it
/// smaller, then encrypted under `crypt` (for the chunk named `digest`).
fn encode_parts<'a>(
    data: &'a [u8],
    digest: &Digest,
    crypt: Option<&Crypt>,
) -> Result<([u8; CHUNK_HEADER_LEN], Cow<'a, [u8]>)> {
    let (enc, z) = compress(data);
    match crypt {
        Some(c) => {
            let enc = enc | ENC_ENCRYPTED;
            let body = z.as_deref().unwrap_or(data);
            let sealed = c.seal_chunk(digest, &header_prefix(enc, data.len()), body)?;
            Ok((header(enc, data.len(), &sealed), Cow::Owned(sealed)))
        }
        None => {
            let payload = z.map_or(Cow::Borrowed(data), Cow::Owned);
            Ok((header(enc, data.len(), &payload), payload))
        }
    }
}

/// Encode a chunk named `digest` (its file bytes): compressed when that
/// makes it smaller, encrypted when `crypt` is given.
pub fn encode_chunk(data: &[u8], digest: &Digest, crypt: Option<&Crypt>) -> Result<Vec<u8>> {
    let (head, payload) = encode_parts(data, digest, crypt)?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decode a chunk file's bytes, checking header, CRC, sizes (bounded by
/// `max_len` before any allocation), authenticity (with `crypt`, which an
/// encrypted chunk requires and a plain one refuses) and the digest (with
/// `hash`, or `crypt`'s keyed hash).
pub fn decode_chunk(
    file: &[u8],
    digest: &Digest,
    hash: ChunkHash,
    crypt: Option<&Crypt>,
    max_len: usize,
    path: &Path,
) -> Result<Vec<u8>> {
    if file.len() > max_len + CHUNK_HEADER_LEN + crate::crypt::CHUNK_OVERHEAD + 1024 {
        return Err(corrupt(format!(
            "chunk {digest} at {} is damaged: {} bytes is more than a chunk can be",
            path.display(),
            file.len()
        )));
    }
    decode_chunk_owned(file.to_vec(), digest, hash, crypt, max_len, path)
}

/// [`decode_chunk`] of a buffer it may reuse: an encrypted chunk is
/// decrypted in place and a plain one shifted, without a second copy.
pub(crate) fn decode_chunk_owned(
    mut file: Vec<u8>,
    digest: &Digest,
    hash: ChunkHash,
    crypt: Option<&Crypt>,
    max_len: usize,
    path: &Path,
) -> Result<Vec<u8>> {
    let bad = |why: &str| {
        corrupt(format!(
            "chunk {digest} at {} is damaged: {why}",
            path.display()
        ))
    };
    if file.len() < CHUNK_HEADER_LEN {
        return Err(bad("shorter than its header"));
    }
    let mut head = [0u8; CHUNK_HEADER_LEN];
    head.copy_from_slice(&file[..CHUNK_HEADER_LEN]);
    if head[..8] != CHUNK_MAGIC {
        return Err(bad("bad magic"));
    }
    let enc = head[8];
    let raw_len = u32::from_le_bytes(head[12..16].try_into().unwrap_or_default()) as usize;
    let stored_len = u32::from_le_bytes(head[16..20].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(head[20..24].try_into().unwrap_or_default());
    if raw_len > max_len {
        return Err(bad("length beyond the chunk size"));
    }
    if stored_len != file.len() - CHUNK_HEADER_LEN {
        return Err(bad("truncated or extended"));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..20]);
    h.update(&file[CHUNK_HEADER_LEN..]);
    if h.finalize() != crc {
        return Err(bad("checksum mismatch"));
    }
    // `file` becomes the payload: plain or zstd bytes.
    match (enc & ENC_ENCRYPTED != 0, crypt) {
        (true, Some(c)) => {
            if !c.open_chunk(digest, &head[..16], &mut file, CHUNK_HEADER_LEN) {
                return Err(bad(&format!(
                    "it does not authenticate under key {} (altered, or stored under another name)",
                    c.fingerprint()
                )));
            }
        }
        (false, None) => {
            file.drain(..CHUNK_HEADER_LEN);
        }
        (true, None) => return Err(bad("encrypted, but the datastore was opened without a key")),
        (false, Some(_)) => return Err(bad("not encrypted, in an encrypted datastore")),
    }
    let data = match enc & !ENC_ENCRYPTED {
        ENC_PLAIN if file.len() == raw_len => file,
        ENC_ZSTD => {
            let d =
                zstd::bulk::decompress(&file, raw_len).map_err(|_| bad("zstd stream invalid"))?;
            if d.len() != raw_len {
                return Err(bad("decompressed length mismatch"));
            }
            d
        }
        _ => return Err(bad("unknown encoding")),
    };
    let name = match crypt {
        Some(c) => c.chunk_id(&data),
        None => hash.digest(&data),
    };
    if name != *digest {
        return Err(bad("content does not match its digest"));
    }
    Ok(data)
}

/// Outcome of an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// The chunk was new (not already stored).
    pub new: bool,
    /// Bytes stored on disk for it (0 when it already existed).
    pub stored: u64,
}

/// The chunks of a datastore: `<root>/.chunks/<2 hex>/<64 hex>`, files in
/// a local directory or objects of a [`Backend`] (same keys).
///
/// ## Chunks in an object store
///
/// An object store has no `flock` and no cheap way to refresh an object's
/// time, so a chunk found existing is trusted only when it is *fresh*:
/// written at or after [`ChunkStore::with_fresh_after`]'s time (by the
/// store's clock). A writer sets that to the start of its lease (store
/// time) minus the GC grace period; an older chunk is stored again, which
/// gives it a new `Last-Modified`. A GC deletes only chunks that no
/// snapshot names *and* that are older than the oldest running writer's
/// start minus the grace (see [`crate::backend`]), so a chunk a running
/// backup relies on is either fresh (kept by age) or in a snapshot
/// (kept by mark). Without a fresh-after time every insert stores.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    lock_path: PathBuf,
    chunk_size: usize,
    hash: ChunkHash,
    crypt: Option<Arc<Crypt>>,
    object: Option<ObjectChunks>,
}

#[derive(Debug, Clone)]
struct ObjectChunks {
    backend: Arc<dyn Backend>,
    fresh_after: Option<SystemTime>,
}

impl ChunkStore {
    pub(crate) fn new(
        root: &Path,
        chunk_size: usize,
        hash: ChunkHash,
        crypt: Option<Arc<Crypt>>,
    ) -> Self {
        ChunkStore {
            dir: root.join(".chunks"),
            lock_path: root.join(".locks").join("chunks.lock"),
            chunk_size,
            hash,
            crypt,
            object: None,
        }
    }

    /// The chunks of a datastore on `backend` (under `.chunks/`).
    pub fn on_backend(
        backend: Arc<dyn Backend>,
        chunk_size: usize,
        hash: ChunkHash,
        crypt: Option<Arc<Crypt>>,
    ) -> Self {
        let root = PathBuf::from(backend.location());
        ChunkStore {
            object: Some(ObjectChunks {
                backend,
                fresh_after: None,
            }),
            ..ChunkStore::new(&root, chunk_size, hash, crypt)
        }
    }

    /// This store, trusting existing chunks written at or after `time`
    /// (store clock; object stores only, see the type's docs).
    pub fn with_fresh_after(&self, time: SystemTime) -> ChunkStore {
        let mut s = self.clone();
        if let Some(o) = &mut s.object {
            o.fresh_after = Some(time);
        }
        s
    }

    fn key(digest: &Digest) -> String {
        let hex = digest.to_hex();
        format!(".chunks/{}/{hex}", &hex[..2])
    }

    /// Make new chunks' directory entries durable (local directories;
    /// an object store's writes are durable when they return).
    pub(crate) fn sync_prefixes(&self, prefixes: impl IntoIterator<Item = u8>) -> Result<()> {
        if self.object.is_some() {
            return Ok(());
        }
        for d in prefixes {
            crate::util::sync_dir(&self.prefix_dir(&Digest([d; 32])))?;
        }
        Ok(())
    }

    /// The keys of an encrypted store.
    pub fn crypt(&self) -> Option<&Crypt> {
        self.crypt.as_deref()
    }

    /// The hash naming this store's chunks.
    pub fn hash(&self) -> ChunkHash {
        self.hash
    }

    /// The name `data` has as a chunk of this store (keyed when the store
    /// is encrypted).
    pub fn digest_of(&self, data: &[u8]) -> Digest {
        match &self.crypt {
            Some(c) => c.chunk_id(data),
            None => self.hash.digest(data),
        }
    }

    /// Create the 256 prefix directories.
    pub(crate) fn create(&self) -> Result<()> {
        if self.object.is_some() {
            return Ok(());
        }
        for i in 0..256 {
            let d = self.dir.join(format!("{i:02x}"));
            crate::util::create_dir_all_private(&d).map_err(|e| io_err("creating", &d, e))?;
        }
        Ok(())
    }

    /// Largest plaintext of a chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Where a chunk lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The prefix directory holding a chunk.
    pub(crate) fn prefix_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{:02x}", digest.0[0]))
    }

    /// A shared lock held while inserting, so that a sweep (exclusive) never
    /// removes a chunk between "it exists" and "its time is refreshed".
    fn insert_lock(&self) -> Result<File> {
        let f = crate::util::private_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|e| io_err("opening", &self.lock_path, e))?;
        f.lock_shared()
            .map_err(|e| io_err("locking", &self.lock_path, e))?;
        Ok(f)
    }

    /// The exclusive lock a sweep holds.
    pub(crate) fn sweep_lock(&self) -> Result<File> {
        let f = crate::util::private_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|e| io_err("opening", &self.lock_path, e))?;
        f.lock()
            .map_err(|e| io_err("locking", &self.lock_path, e))?;
        Ok(f)
    }

    /// Insert a chunk whose digest the caller computed from `data`
    /// (idempotent, crash-safe: temp file, fsync, rename). An existing chunk
    /// gets its modification time refreshed so that a concurrent garbage
    /// collection keeps it. The caller fsyncs the chunk's prefix directory
    /// before publishing anything that refers to a new chunk.
    pub fn insert(&self, digest: &Digest, data: &[u8]) -> Result<Inserted> {
        self.insert_then(digest, data, || {})
    }

    /// [`ChunkStore::insert`], calling `written` once the chunk's bytes are
    /// in its temporary file and before that file is fsynced and renamed:
    /// a writer releases its CPU slot there, so that waiting for the disk
    /// overlaps the next chunk's hashing and compression instead of idling
    /// a core. The chunk is still durable before it gets its name.
    pub fn insert_then(
        &self,
        digest: &Digest,
        data: &[u8],
        written: impl FnOnce(),
    ) -> Result<Inserted> {
        debug_assert!(!digest.is_zero());
        if let Some(o) = &self.object {
            return self.insert_object(o, digest, data, written);
        }
        let path = self.path(digest);
        let _lock = self.insert_lock()?;
        match crate::util::private_file_options().write(true).open(&path) {
            Ok(f) => {
                f.set_modified(SystemTime::now())
                    .map_err(|e| io_err("touching chunk", &path, e))?;
                return Ok(Inserted {
                    new: false,
                    stored: 0,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("opening chunk", &path, e)),
        }
        let (head, payload) = encode_parts(data, digest, self.crypt())?;
        let payload = &payload[..];
        let dir = self.prefix_dir(digest);
        let tmp = dir.join(format!(".{}.tmp-{}", digest.to_hex(), unique_suffix()));
        let res = (|| {
            let mut f = crate::util::create_private(&tmp)?;
            f.write_all(&head)?;
            f.write_all(payload)?;
            // The same clock as the GC's cutoff (a file system's own
            // timestamps can lag by a tick).
            f.set_modified(SystemTime::now())?;
            written();
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("storing chunk", &path, e));
        }
        Ok(Inserted {
            new: true,
            stored: (CHUNK_HEADER_LEN + payload.len()) as u64,
        })
    }

    fn insert_object(
        &self,
        o: &ObjectChunks,
        digest: &Digest,
        data: &[u8],
        written: impl FnOnce(),
    ) -> Result<Inserted> {
        let key = Self::key(digest);
        if let Some(fresh_after) = o.fresh_after
            && let Some(m) = o.backend.head(&key)?
            && m.modified >= fresh_after
        {
            return Ok(Inserted {
                new: false,
                stored: 0,
            });
        }
        let (head, payload) = encode_parts(data, digest, self.crypt())?;
        let mut file = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
        file.extend_from_slice(&head);
        file.extend_from_slice(&payload);
        drop(payload);
        written();
        let stored = file.len() as u64;
        o.backend.put(&key, bytes::Bytes::from(file))?;
        Ok(Inserted { new: true, stored })
    }

    fn max_file_len(&self) -> u64 {
        self.chunk_size as u64
            + CHUNK_HEADER_LEN as u64
            + crate::crypt::CHUNK_OVERHEAD as u64
            + 1024
    }

    /// Read, check and decode a chunk.
    pub fn load(&self, digest: &Digest) -> Result<Vec<u8>> {
        if let Some(o) = &self.object {
            let key = Self::key(digest);
            let at = format!("{}/{key}", o.backend.location());
            let Some((buf, _)) = o.backend.get(&key, self.max_file_len())? else {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("chunk {digest} missing at {at}"),
                ));
            };
            return decode_chunk_owned(
                buf,
                digest,
                self.hash,
                self.crypt(),
                self.chunk_size,
                Path::new(&at),
            );
        }
        let path = self.path(digest);
        let mut f = File::open(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::Corrupt
            } else {
                ErrorKind::Io
            };
            Error::new(
                kind,
                format!("chunk {digest} missing or unreadable at {}", path.display()),
            )
            .with_source(e)
        })?;
        let len = f
            .metadata()
            .map_err(|e| io_err("reading metadata of chunk", &path, e))?
            .len();
        if len > self.max_file_len() {
            return Err(corrupt(format!(
                "chunk {digest} at {} is damaged: {len} bytes is more than a chunk can be",
                path.display()
            )));
        }
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| io_err("reading chunk", &path, e))?;
        decode_chunk(
            &buf,
            digest,
            self.hash,
            self.crypt(),
            self.chunk_size,
            &path,
        )
    }

    /// Remove chunks not in `live` whose modification time is before
    /// `cutoff`, and temp files left by crashed inserts: the sweep of a
    /// garbage collection, whose caller marked every chunk a snapshot
    /// names and chose the cutoff (see [`crate::Datastore::gc`]). Returns
    /// (removed chunks, removed bytes, kept chunks, kept bytes).
    pub fn sweep(
        &self,
        live: &HashSet<Digest>,
        cutoff: SystemTime,
    ) -> Result<(u64, u64, u64, u64)> {
        let (mut removed, mut removed_bytes, mut kept, mut kept_bytes) = (0, 0, 0, 0);
        if let Some(o) = &self.object {
            for m in o.backend.list(".chunks/")? {
                let Some(digest) = m.key.rsplit('/').next().and_then(Digest::from_hex) else {
                    continue;
                };
                if live.contains(&digest) || m.modified >= cutoff {
                    kept += 1;
                    kept_bytes += m.size;
                } else {
                    o.backend.delete(&m.key)?;
                    removed += 1;
                    removed_bytes += m.size;
                }
            }
            return Ok((removed, removed_bytes, kept, kept_bytes));
        }
        for i in 0..256 {
            let dir = self.dir.join(format!("{i:02x}"));
            // One prefix at a time under the exclusive lock: inserts wait
            // only for the sweep of one directory.
            let _lock = self.sweep_lock()?;
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("listing", &dir, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| io_err("listing", &dir, e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let Ok(meta) = entry.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(SystemTime::now());
                if name.starts_with('.') {
                    // A temp file of an insert that crashed (live inserts
                    // hold the shared lock, so none is running now).
                    if mtime < cutoff {
                        let _ = fs::remove_file(entry.path());
                    }
                    continue;
                }
                let Some(digest) = Digest::from_hex(&name) else {
                    continue;
                };
                if live.contains(&digest) || mtime >= cutoff {
                    kept += 1;
                    kept_bytes += meta.len();
                } else {
                    fs::remove_file(entry.path())
                        .map_err(|e| io_err("removing chunk", &entry.path(), e))?;
                    removed += 1;
                    removed_bytes += meta.len();
                }
            }
        }
        Ok((removed, removed_bytes, kept, kept_bytes))
    }

    /// Every stored chunk (for stats): (count, bytes).
    pub fn usage(&self) -> Result<(u64, u64)> {
        let (mut n, mut bytes) = (0, 0);
        if let Some(o) = &self.object {
            for m in o.backend.list(".chunks/")? {
                n += 1;
                bytes += m.size;
            }
            return Ok((n, bytes));
        }
        for i in 0..256 {
            let dir = self.dir.join(format!("{i:02x}"));
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for entry in rd.flatten() {
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if let Ok(m) = entry.metadata() {
                    n += 1;
                    bytes += m.len();
                }
            }
        }
        Ok((n, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn incompressible_chunks_are_stored_plain_after_a_sample() {
        let chunk = 4 << 20;
        let random = noise(chunk, 7);
        assert!(!worth_compressing(&random));
        let (enc, z) = compress(&random);
        assert_eq!((enc, z.is_none()), (ENC_PLAIN, true));
        // Half random, half text-like: the sample sees both, so it is
        // compressed (and smaller).
        let mut mixed = random.clone();
        for (i, b) in mixed[chunk / 2..].iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog\n"[i % 44];
        }
        assert!(worth_compressing(&mixed));
        let (enc, z) = compress(&mixed);
        assert_eq!(enc, ENC_ZSTD);
        assert!(z.unwrap().len() < chunk * 6 / 10);
        // Small chunks are compressed without sampling.
        assert!(worth_compressing(&random[..4096]));
        // Plain chunks round-trip like compressed ones.
        let d = Digest::of(&random);
        let enc = encode_chunk(&random, &d, None).unwrap();
        assert_eq!(enc[8], ENC_PLAIN);
        assert_eq!(
            decode_chunk(&enc, &d, ChunkHash::Sha256, None, chunk, Path::new("x")).unwrap(),
            random
        );
    }

    #[test]
    fn encode_decode_and_damage() {
        let p = Path::new("x");
        let crypt = Crypt::new(&crate::key::MasterKey::generate());
        for data in [
            vec![7u8; 10_000],
            (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ] {
            for crypt in [None, Some(&crypt)] {
                let d = match crypt {
                    Some(c) => c.chunk_id(&data),
                    None => Digest::of(&data),
                };
                let dec = |bytes: &[u8], max: usize| {
                    decode_chunk(bytes, &d, ChunkHash::Sha256, crypt, max, p)
                };
                let enc = encode_chunk(&data, &d, crypt).unwrap();
                assert_eq!(enc[8] & ENC_ENCRYPTED != 0, crypt.is_some());
                assert_eq!(dec(&enc, 1 << 20).unwrap(), data);
                // Any flipped byte is caught.
                for pos in [0, 9, 13, 17, 21, CHUNK_HEADER_LEN, enc.len() - 1] {
                    let mut bad = enc.clone();
                    bad[pos] ^= 0x40;
                    let err = dec(&bad, 1 << 20).unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::Corrupt, "pos {pos}");
                    assert!(err.to_string().contains(&d.to_hex()));
                }
                // Truncation is caught.
                assert!(dec(&enc[..enc.len() - 1], 1 << 20).is_err());
                assert!(dec(&enc[..5], 1 << 20).is_err());
                // A length beyond the chunk size is refused before allocating.
                assert!(dec(&enc, 100).is_err());
                // Encrypted and plain chunks are not mistaken for each other.
                let other = match crypt {
                    Some(_) => None,
                    None => Some(&crypt_for_mixups()),
                };
                let err = decode_chunk(&enc, &d, ChunkHash::Sha256, other, 1 << 20, p).unwrap_err();
                assert!(err.to_string().contains("encrypted"), "{err}");
            }
        }
        // An encrypted chunk whose CRC is fixed up after tampering still
        // fails: the AEAD tag, not the CRC, is its integrity.
        let data = vec![1u8; 3000];
        let d = crypt.chunk_id(&data);
        let mut enc = encode_chunk(&data, &d, Some(&crypt)).unwrap();
        enc[CHUNK_HEADER_LEN + 20] ^= 1;
        let fixed = header(enc[8], data.len(), &enc[CHUNK_HEADER_LEN..]);
        enc[..CHUNK_HEADER_LEN].copy_from_slice(&fixed);
        let err = decode_chunk(&enc, &d, ChunkHash::Sha256, Some(&crypt), 1 << 20, p).unwrap_err();
        assert!(err.to_string().contains("does not authenticate"), "{err}");
        // Compression is used only when smaller.
        let five = [5u8; 4096];
        assert_eq!(
            encode_chunk(&five, &Digest::of(&five), None).unwrap()[8],
            ENC_ZSTD
        );
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let e = encode_chunk(&noise, &Digest::of(&noise), None).unwrap();
        assert!(e.len() <= noise.len() + CHUNK_HEADER_LEN);
    }

    fn crypt_for_mixups() -> Crypt {
        Crypt::new(&crate::key::MasterKey::generate())
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[0u8; 0]));
        assert!(is_all_zero(&vec![0u8; 4099]));
        for pos in [0, 3, 64, 4000, 4098] {
            let mut v = vec![0u8; 4099];
            v[pos] = 1;
            assert!(!is_all_zero(&v), "{pos}");
        }
    }

    #[test]
    fn insert_is_idempotent_and_touches() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(".locks")).unwrap();
        let store = ChunkStore::new(dir.path(), 1 << 16, ChunkHash::Sha256, None);
        store.create().unwrap();
        let data = vec![3u8; 5000];
        let d = Digest::of(&data);
        let a = store.insert(&d, &data).unwrap();
        assert!(a.new && a.stored > 0);
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(store.path(&d))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let b = store.insert(&d, &data).unwrap();
        assert_eq!(
            b,
            Inserted {
                new: false,
                stored: 0
            }
        );
        assert!(fs::metadata(store.path(&d)).unwrap().modified().unwrap() > old);
        assert_eq!(store.load(&d).unwrap(), data);
    }
}
