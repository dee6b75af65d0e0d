//! The storage contract of the server, and two ready-made exports.

use std::path::Path;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::{Error, ErrorKind, Result};
use crate::proto::{BlockSize, Extent, STATE_DIRTY, STATE_HOLE, STATE_ZERO, coalesce};

/// Storage behind one NBD export. Held as `Arc<dyn Export>`.
///
/// Only `size` and `read` are mandatory. Writable exports override
/// `read_only` and `write`; the other operations have safe defaults
/// (`write_zeroes` writes zero buffers, `trim` and `flush` do nothing).
/// The server checks every request against [`Export::size`] before
/// calling any method, so implementations see in-range requests only.
#[async_trait]
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused (default: true).
    fn read_only(&self) -> bool {
        true
    }

    /// Whether several connections see a consistent view (default: false).
    fn multi_conn(&self) -> bool {
        false
    }

    /// Block size constraints announced to clients.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// Read `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes>;

    /// Write `data` at `offset`; `fua`: make it durable before returning.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let _ = (offset, data, fua);
        Err(Error::unsupported("export is read-only"))
    }

    /// Write zeroes; with `no_hole` the range must stay allocated.
    async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<()> {
        let _ = no_hole;
        let zeroes = Bytes::from(vec![0u8; len.min(1 << 20) as usize]);
        let mut pos = 0u64;
        while pos < len as u64 {
            let n = (len as u64 - pos).min(zeroes.len() as u64) as usize;
            self.write(offset + pos, zeroes.slice(..n), false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Discard a range (advisory; default: nothing).
    async fn trim(&self, offset: u64, len: u32) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Make earlier writes durable (default: nothing).
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Meta contexts offered, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:cbt0` (default: none).
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Extents of `context` for `[offset, offset+len)`: contiguous,
    /// starting at `offset`; they may stop short of the end (the client
    /// asks again) but not past the export's end.
    async fn block_status(&self, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        let _ = (offset, len);
        Err(Error::unsupported(format!("meta context {context:?}")))
    }
}

/// Granularity of [`MemoryExport`] allocation and dirty tracking.
pub const MEMORY_BLOCK: u64 = 64 * 1024;

struct MemState {
    blocks: Vec<Option<Box<[u8]>>>,
    dirty: Vec<bool>,
}

/// A sparse in-memory export (64 KiB blocks allocated on write) with
/// `base:allocation` and, optionally, a dirty bitmap recording writes.
pub struct MemoryExport {
    size: u64,
    writable: bool,
    bitmap: Option<String>,
    state: RwLock<MemState>,
}

impl MemoryExport {
    /// An empty (all holes) writable export of `size` bytes.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(MEMORY_BLOCK) as usize;
        MemoryExport {
            size,
            writable: true,
            bitmap: None,
            state: RwLock::new(MemState {
                blocks: vec![None; n],
                dirty: vec![false; n],
            }),
        }
    }

    /// Make it read-only.
    pub fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// Offer `qemu:dirty-bitmap:NAME`, marking every block written since
    /// creation (or since [`MemoryExport::clear_dirty`]).
    pub fn with_dirty_bitmap(mut self, name: &str) -> Self {
        self.bitmap = Some(format!("qemu:dirty-bitmap:{name}"));
        self
    }

    /// Forget which blocks are dirty.
    pub fn clear_dirty(&self) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        st.dirty.iter_mut().for_each(|d| *d = false);
    }

    /// Store data directly (setup helper for tests and mocks).
    pub fn fill(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.store(offset, data, false);
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(ErrorKind::OutOfRange {
                offset,
                length: len,
                size: self.size,
            }));
        }
        Ok(())
    }

    fn block_len(&self, i: usize) -> usize {
        (self.size - i as u64 * MEMORY_BLOCK).min(MEMORY_BLOCK) as usize
    }

    fn store(&self, offset: u64, data: &[u8], mark_dirty: bool) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let i = (abs / MEMORY_BLOCK) as usize;
            let within = (abs % MEMORY_BLOCK) as usize;
            let blen = self.block_len(i);
            let n = (blen - within).min(data.len() - pos);
            let b = st.blocks[i].get_or_insert_with(|| vec![0u8; blen].into_boxed_slice());
            b[within..within + n].copy_from_slice(&data[pos..pos + n]);
            if mark_dirty {
                st.dirty[i] = true;
            }
            pos += n;
        }
    }

    fn punch(&self, offset: u64, len: u64, zero: bool) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let i = (pos / MEMORY_BLOCK) as usize;
            let bstart = i as u64 * MEMORY_BLOCK;
            let blen = self.block_len(i) as u64;
            let n = (bstart + blen).min(end) - pos;
            if pos == bstart && n == blen {
                st.blocks[i] = None;
            } else if zero && let Some(b) = st.blocks[i].as_mut() {
                let w = (pos - bstart) as usize;
                b[w..w + n as usize].fill(0);
            }
            st.dirty[i] = true;
            pos += n;
        }
    }
}

#[async_trait]
impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        self.check(offset, len as u64)?;
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let mut out = BytesMut::zeroed(len as usize);
        let mut pos = 0usize;
        while pos < out.len() {
            let abs = offset + pos as u64;
            let i = (abs / MEMORY_BLOCK) as usize;
            let within = (abs % MEMORY_BLOCK) as usize;
            let n = (self.block_len(i) - within).min(out.len() - pos);
            if let Some(b) = &st.blocks[i] {
                out[pos..pos + n].copy_from_slice(&b[within..within + n]);
            }
            pos += n;
        }
        Ok(out.freeze())
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("export is read-only"));
        }
        self.check(offset, data.len() as u64)?;
        self.store(offset, &data, true);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("export is read-only"));
        }
        self.check(offset, len as u64)?;
        if no_hole {
            self.store(offset, &vec![0u8; len as usize], true);
        } else {
            self.punch(offset, len as u64, true);
        }
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("export is read-only"));
        }
        self.check(offset, len as u64)?;
        self.punch(offset, len as u64, false);
        Ok(())
    }
    fn meta_contexts(&self) -> Vec<String> {
        let mut v = vec!["base:allocation".to_owned()];
        v.extend(self.bitmap.clone());
        v
    }
    async fn block_status(&self, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        self.check(offset, len as u64)?;
        let dirty = match context {
            "base:allocation" => false,
            c if Some(c) == self.bitmap.as_deref() => true,
            c => return Err(Error::unsupported(format!("meta context {c:?}"))),
        };
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let end = offset + len as u64;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = (pos / MEMORY_BLOCK) as usize;
            let bend = (i as u64 * MEMORY_BLOCK + self.block_len(i) as u64).min(end);
            let flags = if dirty {
                if st.dirty[i] { STATE_DIRTY } else { 0 }
            } else if st.blocks[i].is_none() {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            out.push(Extent {
                offset: pos,
                length: bend - pos,
                flags,
            });
            pos = bend;
        }
        coalesce(&mut out);
        Ok(out)
    }
}

/// A raw file as an export (positional I/O on the blocking pool).
pub struct FileExport {
    file: Arc<std::fs::File>,
    size: u64,
    writable: bool,
}

impl FileExport {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| file_error("opening", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| file_error("reading the size of", path, e))?
            .len();
        Ok(FileExport {
            file: Arc::new(file),
            size,
            writable: false,
        })
    }

    /// Open `path` for reading and writing.
    pub fn open_rw(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| file_error("opening", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| file_error("reading the size of", path, e))?
            .len();
        Ok(FileExport {
            file: Arc::new(file),
            size,
            writable: true,
        })
    }
}

/// An I/O error that names the file (the kind stays `Io`).
fn file_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    let named = std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    Error::from(named)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io).with_source(e))?
        .map_err(Error::from)
}

#[async_trait]
impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        let f = self.file.clone();
        blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut b = BytesMut::zeroed(len as usize);
            f.read_exact_at(&mut b, offset)?;
            Ok(b.freeze())
        })
        .await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("export is read-only"));
        }
        let f = self.file.clone();
        blocking(move || {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> Result<()> {
        let f = self.file.clone();
        blocking(move || f.sync_data()).await
    }
}
