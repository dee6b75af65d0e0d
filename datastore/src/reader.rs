//! Reading snapshots back: configuration, metadata and random access to
//! volumes with a zero map.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use async_trait::async_trait;
use bytes::Bytes;
use provider_api::{
    ConfigBlob, ConfigKind, Error, Extent, FileArchiveReader, Layer, PlatformMetadata, Region,
    RegionKind, Result, SnapshotId, SnapshotInfo, SnapshotReader, VolumeReader,
};

use crate::archive::{ArchiveReader, StreamReader};
use crate::cache::ChunkCache;
use crate::chunk::ChunkStore;
use crate::index::FixedIndex;
use crate::manifest::{Manifest, read_blob};
use crate::storage::Held;
use crate::store::{Datastore, SnapPath};
use crate::util::corrupt;

/// Largest single read.
pub const MAX_READ: u64 = 256 << 20;
/// Chunks one read fetches at once (their decoding is bounded by the
/// cache's decode limit too).
const READ_AHEAD: usize = 8;
/// Chunks loaded ahead of a sequential reader (see [`VolReader::read_at`]).
pub const READ_AHEAD_CHUNKS: u64 = 4;

/// An open snapshot; holds a shared lock so that it cannot be deleted while
/// open.
pub(crate) struct SnapReader {
    ds: Datastore,
    info: SnapshotInfo,
    dir: PathBuf,
    manifest: Manifest,
    _lock: Arc<Held>,
}

impl SnapReader {
    pub(crate) fn open(ds: Datastore, id: &SnapshotId) -> Result<SnapReader> {
        let (lock, dir, manifest) = ds.lock_snapshot(id)?;
        let sp = SnapPath::parse(id)?;
        let info = ds.info_of(&sp, &dir, &manifest);
        Ok(SnapReader {
            ds,
            info,
            dir,
            manifest,
            _lock: Arc::new(lock),
        })
    }

    fn blob(&self, kind: &str) -> Result<Option<(String, Vec<u8>)>> {
        match self.manifest.blobs.iter().find(|b| b.kind == kind) {
            None => Ok(None),
            Some(b) => Ok(Some((
                b.content_type.clone(),
                read_blob(self.ds.storage(), &self.dir, &b.file, self.ds.crypt())?,
            ))),
        }
    }

    fn open_volume_sync(&self, device: &str, layer: Layer) -> Result<VolReader> {
        let v = self
            .manifest
            .volumes
            .iter()
            .find(|v| v.volume.device == device)
            .ok_or_else(|| {
                Error::not_found(format!("snapshot {} has no volume {device}", self.info.id))
                    .volume(device)
            })?;
        let own = || {
            FixedIndex::read(
                self.ds.storage(),
                &self.dir.join(&v.index.file),
                Some(&v.index.sha256),
                self.ds.crypt(),
            )
        };
        let base = || -> Result<(Held, FixedIndex)> {
            let bid = v.base.as_ref().ok_or_else(|| {
                Error::invalid(format!("volume {device} is not linked to a base image"))
                    .volume(device)
            })?;
            self.ds.lock_base_image(&self.manifest.platform, bid)
        };
        let (index, base, mut locks) = match layer {
            Layer::Merged => (own()?, None, vec![]),
            Layer::Base => {
                let (l, b) = base()?;
                (b, None, vec![l])
            }
            Layer::Overlay => {
                let (l, b) = base()?;
                (own()?, Some(b), vec![l])
            }
        };
        for idx in [Some(&index), base.as_ref()].into_iter().flatten() {
            if idx.chunk_size != self.ds.chunk_size() {
                return Err(corrupt(format!(
                    "volume {device} has chunk size {}, the datastore {}",
                    idx.chunk_size,
                    self.ds.chunk_size()
                )));
            }
        }
        locks.shrink_to_fit();
        Ok(VolReader::new(
            self.ds.chunks().clone(),
            self.ds.chunk_cache().clone(),
            index,
            base,
            self._lock.clone(),
            locks,
        ))
    }
}

#[async_trait]
impl SnapshotReader for SnapReader {
    fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    async fn config(&self, kind: ConfigKind) -> Result<Option<ConfigBlob>> {
        let k = match kind {
            ConfigKind::Guest => "guest",
            ConfigKind::Firewall => "firewall",
            ConfigKind::Spec => "spec",
        };
        Ok(self
            .blob(k)?
            .map(|(content_type, data)| ConfigBlob { content_type, data }))
    }

    async fn metadata(&self) -> Result<PlatformMetadata> {
        match self.blob("metadata")? {
            None => Ok(PlatformMetadata::Null),
            Some((_, data)) => serde_json::from_slice(&data).map_err(|e| {
                corrupt(format!(
                    "metadata of snapshot {} does not parse",
                    self.info.id
                ))
                .with_source(e)
            }),
        }
    }

    async fn open_volume(&self, device: &str, layer: Layer) -> Result<Arc<dyn VolumeReader>> {
        Ok(Arc::new(self.open_volume_sync(device, layer)?))
    }

    fn file_archives(&self) -> Vec<String> {
        self.manifest
            .archives
            .iter()
            .map(|a| a.name.clone())
            .collect()
    }

    async fn open_file_archive(&self, name: &str) -> Result<Arc<dyn FileArchiveReader>> {
        let a = self
            .manifest
            .archives
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "snapshot {} has no file archive {name} (it has: {})",
                    self.info.id,
                    self.file_archives().join(", ")
                ))
            })?;
        let (cat, data) = self.ds.archive_indexes(&self.dir, a)?;
        let what = |s: &str| format!("{s} of archive {name} in snapshot {}", self.info.id);
        Ok(Arc::new(ArchiveReader {
            entries: a.entries,
            catalog: Arc::new(StreamReader::new(
                self.ds.chunks().clone(),
                cat,
                what("catalog"),
            )),
            data: StreamReader::new(self.ds.chunks().clone(), data, what("data")),
            _lock: self._lock.clone(),
        }))
    }
}

/// Random access to a volume (one layer of it). Decoded chunks come from
/// the datastore's shared [`ChunkCache`].
pub struct VolReader {
    store: ChunkStore,
    cache: ChunkCache,
    index: Arc<FixedIndex>,
    /// For the overlay layer: the base image's index.
    base: Option<Arc<FixedIndex>>,
    /// Where the latest read ended (read-ahead's notion of "sequential").
    last_end: AtomicU64,
    _locks: (Arc<Held>, Vec<Held>),
}

impl VolReader {
    fn new(
        store: ChunkStore,
        cache: ChunkCache,
        index: FixedIndex,
        base: Option<FixedIndex>,
        snap_lock: Arc<Held>,
        locks: Vec<Held>,
    ) -> Self {
        VolReader {
            store,
            cache,
            index: Arc::new(index),
            base: base.map(Arc::new),
            last_end: AtomicU64::new(0),
            _locks: (snap_lock, locks),
        }
    }

    /// Chunk `i` of the index (not a zero chunk), checked and decoded.
    async fn chunk(&self, i: usize) -> Result<Bytes> {
        self.cache
            .get(&self.store, self.index.digests[i], self.index.chunk_len(i))
            .await
    }

    /// Read-ahead: a read that starts near where the latest one ended
    /// (within [`READ_AHEAD_CHUNKS`] chunks: clients such as `qemu-img
    /// convert` keep several sequential reads in flight, which complete
    /// out of order) starts loading the [`READ_AHEAD_CHUNKS`] stored
    /// chunks after it, so their decoding overlaps the client's work on
    /// this one. Random reads start nothing. The loads go through the
    /// cache, so they are verified, bounded and shared like a read's, and
    /// memory stays within the cache's bound.
    fn read_ahead(&self, offset: u64, end: u64) {
        let cs = self.index.chunk_size;
        let prev = self.last_end.swap(end, Ordering::Relaxed);
        let window = READ_AHEAD_CHUNKS * cs;
        if offset > prev + cs || offset + window < prev {
            return;
        }
        let next = (end - 1) / cs + 1;
        let count = self.index.digests.len() as u64;
        for i in next..(next + READ_AHEAD_CHUNKS).min(count) {
            let i = i as usize;
            let digest = self.index.digests[i];
            if !digest.is_zero() {
                self.cache
                    .prefetch(&self.store, digest, self.index.chunk_len(i));
            }
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if offset
            .checked_add(length)
            .is_none_or(|e| e > self.index.size)
        {
            return Err(Error::invalid(format!(
                "range {offset}+{length} is beyond the volume's size {}",
                self.index.size
            ))
            .offset(offset));
        }
        Ok(())
    }
}

#[async_trait]
impl VolumeReader for VolReader {
    fn size(&self) -> u64 {
        self.index.size
    }

    async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.check_range(offset, length)?;
        if length > MAX_READ {
            return Err(Error::invalid(format!(
                "read of {length} bytes is larger than {MAX_READ}"
            )));
        }
        if length == 0 {
            return Ok(Bytes::new());
        }
        let cs = self.index.chunk_size;
        let end = offset + length;
        self.read_ahead(offset, end);
        let (first, last) = ((offset / cs) as usize, ((end - 1) / cs) as usize);
        // Inside one stored chunk: hand out the cached bytes themselves (a
        // slice shares the verified chunk: no zeroing, no copy; clients
        // such as `qemu-img convert` read 2 MiB at a time, half a chunk).
        if first == last && !self.index.digests[first].is_zero() {
            let from = (offset - first as u64 * cs) as usize;
            let data = self.chunk(first).await?;
            return Ok(data.slice(from..from + length as usize));
        }
        let mut out = vec![0u8; length as usize];
        // The chunks to fetch (zero chunks are never loaded), at most
        // READ_AHEAD at once; each is copied into place as it arrives.
        let fetches = (first..=last)
            .filter(|&i| !self.index.digests[i].is_zero())
            .map(|i| async move { self.chunk(i).await.map(|data| (i, data)) });
        for_each_bounded(fetches, READ_AHEAD, |(i, data)| {
            let chunk_start = i as u64 * cs;
            let from = offset.max(chunk_start);
            let to = end.min(chunk_start + data.len() as u64);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - chunk_start) as usize..(to - chunk_start) as usize]);
        })
        .await?;
        Ok(Bytes::from(out))
    }

    async fn regions(&self, offset: u64, length: u64) -> Result<Vec<Region>> {
        self.check_range(offset, length)?;
        let cs = self.index.chunk_size;
        let end = offset + length;
        let mut out: Vec<Region> = Vec::new();
        let mut off = offset;
        while off < end {
            let i = (off / cs) as usize;
            let n = (cs - off % cs).min(end - off);
            let d = self.index.digests[i];
            let inherited = self.base.as_ref().is_some_and(|b| {
                b.digests.get(i) == Some(&d) && b.chunk_len(i) == self.index.chunk_len(i)
            });
            let kind = if inherited {
                RegionKind::Inherited
            } else if d.is_zero() {
                RegionKind::Zero
            } else {
                RegionKind::Data
            };
            match out.last_mut() {
                Some(r) if r.kind == kind && r.extent.end() == off => r.extent.length += n,
                _ => out.push(Region {
                    extent: Extent::new(off, n),
                    kind,
                }),
            }
            off += n;
        }
        Ok(out)
    }
}

/// Run the futures of `jobs`, at most `limit` at once, handing each output
/// to `sink` as it completes; stops at the first error (dropping the rest).
async fn for_each_bounded<T, F>(
    jobs: impl Iterator<Item = F>,
    limit: usize,
    mut sink: impl FnMut(T),
) -> Result<()>
where
    F: Future<Output = Result<T>>,
{
    let mut jobs = jobs.fuse();
    let mut running: Vec<Pin<Box<F>>> = Vec::with_capacity(limit);
    loop {
        while running.len() < limit.max(1) {
            match jobs.next() {
                Some(f) => running.push(Box::pin(f)),
                None => break,
            }
        }
        if running.is_empty() {
            return Ok(());
        }
        let (i, out) = std::future::poll_fn(|cx| {
            for (i, f) in running.iter_mut().enumerate() {
                if let Poll::Ready(out) = f.as_mut().poll(cx) {
                    return Poll::Ready((i, out));
                }
            }
            Poll::Pending
        })
        .await;
        drop(running.swap_remove(i));
        sink(out?);
    }
}
