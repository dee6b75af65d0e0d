//! Reading snapshots back: configuration, metadata and random access to
//! volumes with a zero map.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use provider_api::{
    ConfigBlob, ConfigKind, Error, Extent, Layer, PlatformMetadata, Region, RegionKind, Result,
    SnapshotId, SnapshotInfo, SnapshotReader, VolumeReader,
};

use crate::chunk::{ChunkStore, Digest};
use crate::index::FixedIndex;
use crate::manifest::{Manifest, load_blob};
use crate::store::{Datastore, SnapPath, blocking};
use crate::util::corrupt;

/// Decoded chunks kept per volume reader.
pub const CACHE_CHUNKS: usize = 8;
/// Largest single read.
pub const MAX_READ: u64 = 256 << 20;

/// An open snapshot; holds a shared lock so that it cannot be deleted while
/// open.
pub(crate) struct SnapReader {
    ds: Datastore,
    info: SnapshotInfo,
    dir: PathBuf,
    manifest: Manifest,
    _lock: Arc<File>,
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
                load_blob(&self.dir, &b.file)?,
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
        let own = || FixedIndex::load(&self.dir.join(&v.index.file), Some(&v.index.sha256));
        let base = || -> Result<(File, FixedIndex)> {
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
}

/// Random access to a volume (one layer of it).
pub struct VolReader {
    store: ChunkStore,
    index: Arc<FixedIndex>,
    /// For the overlay layer: the base image's index.
    base: Option<Arc<FixedIndex>>,
    cache: Mutex<VecDeque<(Digest, Arc<Vec<u8>>)>>,
    _locks: (Arc<File>, Vec<File>),
}

impl VolReader {
    fn new(
        store: ChunkStore,
        index: FixedIndex,
        base: Option<FixedIndex>,
        snap_lock: Arc<File>,
        locks: Vec<File>,
    ) -> Self {
        VolReader {
            store,
            index: Arc::new(index),
            base: base.map(Arc::new),
            cache: Mutex::new(VecDeque::with_capacity(CACHE_CHUNKS)),
            _locks: (snap_lock, locks),
        }
    }

    async fn chunk(&self, digest: Digest, len: u64) -> Result<Arc<Vec<u8>>> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pos) = c.iter().position(|(d, _)| *d == digest) {
                let e = c
                    .remove(pos)
                    .unwrap_or_else(|| (digest, Arc::new(Vec::new())));
                let data = e.1.clone();
                c.push_front(e);
                return Ok(data);
            }
        }
        let store = self.store.clone();
        let data = blocking(move || store.load(&digest)).await?;
        if data.len() as u64 != len {
            return Err(corrupt(format!(
                "chunk {digest} at {} has {} bytes where the index expects {len}",
                self.store.path(&digest).display(),
                data.len()
            )));
        }
        let data = Arc::new(data);
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= CACHE_CHUNKS {
            c.pop_back();
        }
        c.push_front((digest, data.clone()));
        Ok(data)
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
        let cs = self.index.chunk_size;
        let mut out = vec![0u8; length as usize];
        let end = offset + length;
        let mut off = offset;
        while off < end {
            let i = (off / cs) as usize;
            let start = off % cs;
            let n = (cs - start).min(end - off);
            let digest = self.index.digests[i];
            if !digest.is_zero() {
                let data = self.chunk(digest, self.index.chunk_len(i)).await?;
                let dst = (off - offset) as usize;
                out[dst..dst + n as usize]
                    .copy_from_slice(&data[start as usize..(start + n) as usize]);
            }
            off += n;
        }
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
