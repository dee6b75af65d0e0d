//! Writing snapshots and base images.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use provider_api::{
    BaseImageId, ConfigBlob, ConfigKind, Error, ErrorKind, FileArchiveWriter, PlatformMetadata,
    Result, SnapshotId, SnapshotInfo, SnapshotSpec, SnapshotWriter, StartFrom, VolumeSpec,
    VolumeStats, VolumeWriter,
};
use tokio::sync::Semaphore;

use crate::archive::{
    ArchiveWriter, CatalogIter, DynamicIndex, ManifestArchive, Previous, StreamReader,
};
use crate::backend::Backend;
use crate::chunk::{ChunkStore, Digest, is_all_zero};
use crate::crypt::{Crypt, seal_opt};
use crate::index::{FixedIndex, MAX_VOLUME_SIZE};
use crate::manifest::{
    BASE_IMAGE_FORMAT, BaseImageManifest, FileRef, MANIFEST_VERSION, MANIFEST_VERSION_ARCHIVES,
    Manifest, ManifestBlob, ManifestVolume, SNAPSHOT_FORMAT, store_sealed,
};
use crate::storage::{Held, Storage, key_of};
use crate::store::{
    BASE_INDEX_FILE, BASE_MANIFEST_FILE, Datastore, MANIFEST_FILE, SnapPath, WriterRegistration,
    blocking,
};
use crate::util::{
    encode_component, io_err, now_secs, rfc3339, sha256_hex, sync_dir, unique_suffix,
};

/// Chunks in flight per CPU slot (see `VolWriter::inflight`): with 4 MiB
/// chunks and two cores, at most 32 MiB waiting for the disk.
const INFLIGHT_PER_WORKER: u32 = 4;

fn lock_poisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Write `data` to `path` (encrypted with `crypt` if given), durably;
/// returns its [`FileRef`] (size and SHA-256 of the stored bytes).
fn write_file(st: &Storage, path: &Path, data: Vec<u8>, crypt: Option<&Crypt>) -> Result<FileRef> {
    let data = seal_opt(crypt, path, data)?;
    st.write_new(path, &data)?;
    Ok(FileRef {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size: data.len() as u64,
        sha256: sha256_hex(&data),
    })
}

struct SnapState {
    volumes: Vec<ManifestVolume>,
    begun: usize,
    archives: Vec<ManifestArchive>,
    archives_begun: Vec<String>,
}

/// A snapshot being written in `<group>/.tmp-<writer>/`.
pub(crate) struct SnapWriter {
    ds: Datastore,
    spec: SnapshotSpec,
    group: PathBuf,
    tmp: PathBuf,
    reg: WriterRegistration,
    state: Arc<Mutex<SnapState>>,
    blobs: Vec<ManifestBlob>,
    /// Shared locks on snapshots and base images this one starts from.
    held: Vec<Held>,
    done: bool,
}

impl SnapWriter {
    pub(crate) fn begin(ds: Datastore, spec: SnapshotSpec) -> Result<SnapWriter> {
        if spec.platform.is_empty() || spec.guest.0.is_empty() {
            return Err(Error::invalid("platform and guest must not be empty"));
        }
        let reg = ds.register_writer()?;
        let group = ds.group_dir(
            &encode_component(&spec.platform),
            &encode_component(&spec.guest.0),
        );
        let tmp = group.join(format!(".tmp-{}", reg.name));
        if ds.storage().object().is_none() {
            crate::util::create_dir_all_private(&group)
                .map_err(|e| io_err("creating", &group, e))?;
            crate::util::create_dir_private(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
        }
        Ok(SnapWriter {
            ds,
            spec,
            group,
            tmp,
            reg,
            state: Arc::new(Mutex::new(SnapState {
                volumes: Vec::new(),
                begun: 0,
                archives: Vec::new(),
                archives_begun: Vec::new(),
            })),
            blobs: Vec::new(),
            held: Vec::new(),
            done: false,
        })
    }

    fn put_blob(
        &mut self,
        kind: &str,
        file: &str,
        content_type: String,
        data: Vec<u8>,
    ) -> Result<()> {
        let fr = write_file(
            self.ds.storage(),
            &self.tmp.join(file),
            data,
            self.ds.crypt(),
        )?;
        self.blobs.retain(|b| b.kind != kind);
        self.blobs.push(ManifestBlob {
            kind: kind.into(),
            content_type,
            file: fr,
        });
        Ok(())
    }

    /// The index a volume starts from.
    fn start_index(&mut self, spec: &VolumeSpec) -> Result<Option<FixedIndex>> {
        let device = &spec.volume.device;
        let idx = match &spec.start_from {
            StartFrom::Empty => return Ok(None),
            StartFrom::Previous(id) => {
                let (lock, dir, m) = self.ds.lock_snapshot(id)?;
                if self.ds.verify_state(&dir) == Some(false) {
                    return Err(Error::new(
                        ErrorKind::Refused,
                        format!(
                            "snapshot {id} failed verification: it cannot be an incremental base"
                        ),
                    )
                    .volume(device));
                }
                let v = m
                    .volumes
                    .iter()
                    .find(|v| &v.volume.device == device)
                    .ok_or_else(|| {
                        Error::not_found(format!("snapshot {id} has no volume {device}"))
                            .volume(device)
                    })?;
                let idx = FixedIndex::read(
                    self.ds.storage(),
                    &dir.join(&v.index.file),
                    Some(&v.index.sha256),
                    self.ds.crypt(),
                )?;
                self.held.push(lock);
                idx
            }
            StartFrom::BaseImage(bid) => {
                let (lock, idx) = self.ds.lock_base_image(&self.spec.platform, bid)?;
                self.held.push(lock);
                idx
            }
        };
        if idx.chunk_size != self.ds.chunk_size() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "starting index has chunk size {}, the datastore {}",
                    idx.chunk_size,
                    self.ds.chunk_size()
                ),
            ));
        }
        Ok(Some(idx))
    }

    fn commit_sync(&mut self, warnings: Vec<String>) -> Result<SnapshotInfo> {
        let (volumes, archives) = {
            let st = lock_poisoned(&self.state);
            if st.volumes.len() != st.begun {
                return Err(Error::invalid(format!(
                    "{} volume(s) begun but not finished",
                    st.begun - st.volumes.len()
                )));
            }
            if st.archives.len() != st.archives_begun.len() {
                return Err(Error::invalid(format!(
                    "{} file archive(s) begun but not finished",
                    st.archives_begun.len() - st.archives.len()
                )));
            }
            let mut v = st.volumes.clone();
            v.sort_by(|a, b| a.volume.device.cmp(&b.volume.device));
            let mut a = st.archives.clone();
            a.sort_by(|x, y| x.name.cmp(&y.name));
            (v, a)
        };
        let m = Manifest {
            format: SNAPSHOT_FORMAT.into(),
            version: if archives.is_empty() {
                MANIFEST_VERSION
            } else {
                MANIFEST_VERSION_ARCHIVES
            },
            archives,
            platform: self.spec.platform.clone(),
            guest: self.spec.guest.clone(),
            archive: self.spec.archive.clone(),
            time: self.spec.time,
            chunk_size: self.ds.chunk_size(),
            volumes,
            blobs: self.blobs.clone(),
            warnings,
            key_fingerprint: self.ds.key_fingerprint().map(str::to_owned),
        };
        // A backup whose lease lapsed may have lost chunks to a GC that
        // judged it dead: it must not publish.
        self.reg.check()?;
        if let Some(b) = self.ds.storage().object().cloned() {
            return self.commit_object(&b, m);
        }
        // The manifest is written last inside the temp directory; renaming
        // the directory into place publishes the snapshot.
        store_sealed(&self.tmp.join(MANIFEST_FILE), &m, self.ds.crypt())?;
        sync_dir(&self.tmp)?;
        let _group_lock = self.ds.lock_group(&self.group)?;
        let base = rfc3339(self.spec.time);
        let mut name = base.clone();
        let mut n = 1;
        while self.group.join(&name).exists() {
            name = format!("{base}-{n}");
            n += 1;
        }
        let dest = self.group.join(&name);
        fs::rename(&self.tmp, &dest).map_err(|e| io_err("publishing snapshot", &dest, e))?;
        sync_dir(&self.group)?;
        self.done = true;
        let sp = SnapPath {
            platform: encode_component(&self.spec.platform),
            guest: encode_component(&self.spec.guest.0),
            name,
        };
        Ok(self.ds.info_of(&sp, &dest, &m))
    }

    /// Object stores: under the group's lease, choose the name, copy the
    /// temporary files into it, and create the manifest last (`put_new`:
    /// the commit; a reader lists only snapshots with a manifest).
    fn commit_object(&mut self, b: &Arc<dyn Backend>, m: Manifest) -> Result<SnapshotInfo> {
        let _group_lock = self.ds.lock_group(&self.group)?;
        let base = rfc3339(self.spec.time);
        let mut name = base.clone();
        let mut n = 1;
        let taken = |name: &str| -> Result<bool> {
            Ok(!b
                .list(&format!("{}/", key_of(&self.group.join(name))?))?
                .is_empty())
        };
        while taken(&name)? {
            name = format!("{base}-{n}");
            n += 1;
        }
        let dest = self.group.join(&name);
        let tmp_prefix = format!("{}/", key_of(&self.tmp)?);
        for obj in b.list(&tmp_prefix)? {
            let Some(file) = obj.key.strip_prefix(&tmp_prefix) else {
                continue;
            };
            let (data, _) = b.get(&obj.key, obj.size)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Io,
                    format!("{}/{} vanished before the commit", b.location(), obj.key),
                )
            })?;
            b.put(&key_of(&dest.join(file))?, bytes::Bytes::from(data))?;
        }
        let mpath = dest.join(MANIFEST_FILE);
        let sealed = seal_opt(self.ds.crypt(), &mpath, crate::manifest::seal(&m)?)?;
        self.reg.check()?;
        if b.put_new(&key_of(&mpath)?, bytes::Bytes::from(sealed))?
            .is_none()
        {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("snapshot name {name} was taken during the commit (group lease lost?)"),
            ));
        }
        self.done = true;
        if let Err(e) = self.ds.storage().remove_tree(&self.tmp) {
            tracing::warn!("removing {}: {}", self.tmp.display(), e.report());
        }
        let sp = SnapPath {
            platform: encode_component(&self.spec.platform),
            guest: encode_component(&self.spec.guest.0),
            name,
        };
        Ok(self.ds.info_of(&sp, &dest, &m))
    }

    /// The chunk store of this backup: on an object store, existing
    /// chunks are trusted back to the grace before this backup began.
    fn chunk_store(&self) -> ChunkStore {
        let fresh = self
            .reg
            .started
            .checked_sub(self.ds.inner.object_grace)
            .unwrap_or(std::time::UNIX_EPOCH);
        self.ds.chunks().with_fresh_after(fresh)
    }
}

impl Drop for SnapWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.ds.storage().remove_tree(&self.tmp);
        }
        let _ = &self.reg;
    }
}

#[async_trait]
impl SnapshotWriter for SnapWriter {
    async fn put_config(&mut self, kind: ConfigKind, blob: ConfigBlob) -> Result<()> {
        let (k, f) = match kind {
            ConfigKind::Guest => ("guest", "guest.conf.blob"),
            ConfigKind::Firewall => ("firewall", "firewall.conf.blob"),
            ConfigKind::Spec => ("spec", "spec.json.blob"),
        };
        self.put_blob(k, f, blob.content_type, blob.data)
    }

    async fn put_metadata(&mut self, metadata: PlatformMetadata) -> Result<()> {
        let data = serde_json::to_vec(&metadata)
            .map_err(|e| Error::invalid("metadata does not serialize").with_source(e))?;
        self.put_blob(
            "metadata",
            "metadata.json.blob",
            "application/json".into(),
            data,
        )
    }

    async fn begin_base_image(
        &mut self,
        id: &BaseImageId,
        size: u64,
    ) -> Result<Option<Box<dyn VolumeWriter>>> {
        if self.ds.has_base_image_sync(&self.spec.platform, id)? {
            return Ok(None);
        }
        let parent = self.ds.base_dir(&self.spec.platform, id);
        let parent = parent.parent().map(Path::to_path_buf).unwrap_or_default();
        let tmp = parent.join(format!(".tmp-{}", self.reg.name_for_base()));
        if self.ds.storage().object().is_none() {
            crate::util::create_dir_all_private(&parent)
                .map_err(|e| io_err("creating", &parent, e))?;
            crate::util::create_dir_private(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
        }
        let dest = Destination::BaseImage {
            platform: self.spec.platform.clone(),
            id: id.clone(),
            tmp,
            final_dir: self.ds.base_dir(&self.spec.platform, id),
        };
        let w = VolWriter::new(&self.ds, self.chunk_store(), size, None, dest, id.0.clone())?;
        Ok(Some(Box::new(w)))
    }

    async fn begin_volume(&mut self, spec: VolumeSpec) -> Result<Box<dyn VolumeWriter>> {
        let device = spec.volume.device.clone();
        {
            let st = lock_poisoned(&self.state);
            let file = format!("{}.fidx", encode_component(&device));
            if st.volumes.iter().any(|v| v.volume.device == device)
                || self.ds.storage().exists(&self.tmp.join(&file))?
            {
                return Err(
                    Error::invalid(format!("volume {device} written twice")).volume(&device)
                );
            }
        }
        let start = self.start_index(&spec)?;
        lock_poisoned(&self.state).begun += 1;
        let dest = Destination::Snapshot {
            dir: self.tmp.clone(),
            spec: spec.clone(),
            state: self.state.clone(),
        };
        let w = VolWriter::new(
            &self.ds,
            self.chunk_store(),
            spec.volume.size,
            start,
            dest,
            device,
        )?;
        Ok(Box::new(w))
    }

    async fn begin_file_archive(
        &mut self,
        name: &str,
        previous: Option<&SnapshotId>,
    ) -> Result<Box<dyn FileArchiveWriter>> {
        if name.is_empty() || name.len() > 100 {
            return Err(Error::invalid(format!(
                "file archive name {name:?} is empty or too long"
            )));
        }
        {
            let mut st = lock_poisoned(&self.state);
            if st.archives_begun.iter().any(|n| n == name) {
                return Err(Error::invalid(format!("file archive {name} written twice")));
            }
            st.archives_begun.push(name.to_owned());
        }
        let previous = match previous {
            None => None,
            Some(id) => {
                let ds = self.ds.clone();
                let (id, name) = (id.clone(), name.to_owned());
                blocking(move || ds.previous_archive(&id, &name)).await?
            }
        };
        let state = self.state.clone();
        let finish: crate::archive::Finish = Box::new(move |rec: ManifestArchive| {
            lock_poisoned(&state).archives.push(rec);
            Ok(())
        });
        Ok(Box::new(ArchiveWriter::new(
            name,
            self.ds.storage().clone(),
            self.ds.crypt().cloned(),
            self.chunk_store(),
            self.tmp.clone(),
            previous,
            finish,
        )))
    }

    async fn commit(mut self: Box<Self>, warnings: Vec<String>) -> Result<SnapshotInfo> {
        blocking(move || self.commit_sync(warnings)).await
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        let (tmp, storage) = (self.tmp.clone(), self.ds.storage().clone());
        drop(self);
        blocking(move || storage.remove_tree(&tmp)).await
    }
}

impl WriterRegistration {
    fn name_for_base(&self) -> String {
        format!("{}-{}", self.name, unique_suffix())
    }
}

/// Where a finished volume goes.
enum Destination {
    Snapshot {
        dir: PathBuf,
        spec: VolumeSpec,
        state: Arc<Mutex<SnapState>>,
    },
    BaseImage {
        platform: String,
        id: BaseImageId,
        tmp: PathBuf,
        final_dir: PathBuf,
    },
}

/// Results of the chunk workers.
struct PipeState {
    index: FixedIndex,
    bytes_new: u64,
    bytes_stored: u64,
    dirs: BTreeSet<u8>,
    error: Option<Error>,
    /// An error was reported already.
    failed: bool,
}

/// A chunk being assembled from writes.
struct Assembly {
    idx: u64,
    buf: Vec<u8>,
    /// Written ranges inside the chunk (ascending, may touch).
    written: Vec<(usize, usize)>,
    covered: usize,
}

enum Job {
    /// The whole chunk was written.
    Whole(Bytes),
    /// Part of the chunk was written: the rest comes from `old`.
    Merge {
        buf: Vec<u8>,
        written: Vec<(usize, usize)>,
        old: Digest,
    },
}

/// Assembles chunks from ascending writes and hands them to a bounded pool
/// of blocking workers.
pub(crate) struct VolWriter {
    store: ChunkStore,
    chunk_size: u64,
    size: u64,
    pos: u64,
    cur: Option<Assembly>,
    /// A chunk whose length differs from the starting index's (volume
    /// resized): rewritten at finish unless written.
    resize: Option<u64>,
    /// CPU slots: a chunk holds one while it is hashed, compressed and
    /// written to its temporary file.
    sem: Arc<Semaphore>,
    /// Chunks in flight (CPU stage plus their fsync and rename): bounds the
    /// memory held, `INFLIGHT_PER_WORKER` per CPU slot.
    inflight: Arc<Semaphore>,
    inflight_permits: u32,
    state: Arc<Mutex<PipeState>>,
    bytes_written: u64,
    dest: Destination,
    device: String,
    storage: Storage,
}

impl VolWriter {
    fn new(
        ds: &Datastore,
        store: ChunkStore,
        size: u64,
        start: Option<FixedIndex>,
        dest: Destination,
        device: String,
    ) -> Result<VolWriter> {
        if size > MAX_VOLUME_SIZE {
            return Err(Error::invalid(format!("volume size {size} is too large")).volume(&device));
        }
        let cs = ds.chunk_size();
        let mut index = FixedIndex::zeroed(size, cs);
        let mut resize = None;
        if let Some(start) = start {
            let n = start.digests.len().min(index.digests.len());
            index.digests[..n].copy_from_slice(&start.digests[..n]);
            let common = start.size.min(size);
            if start.size != size && common % cs != 0 {
                let i = common / cs;
                if !index.digests[i as usize].is_zero() {
                    resize = Some(i);
                }
            }
        }
        let permits = ds.inner.workers as u32;
        let inflight_permits = permits * INFLIGHT_PER_WORKER;
        Ok(VolWriter {
            storage: ds.storage().clone(),
            store,
            chunk_size: cs,
            size,
            pos: 0,
            cur: None,
            resize,
            sem: Arc::new(Semaphore::new(permits as usize)),
            inflight: Arc::new(Semaphore::new(inflight_permits as usize)),
            inflight_permits,
            state: Arc::new(Mutex::new(PipeState {
                index,
                bytes_new: 0,
                bytes_stored: 0,
                dirs: BTreeSet::new(),
                error: None,
                failed: false,
            })),
            bytes_written: 0,
            dest,
            device,
        })
    }

    fn chunk_len(&self, idx: u64) -> usize {
        self.chunk_size.min(self.size - idx * self.chunk_size) as usize
    }

    fn check(&self, offset: u64, length: u64) -> Result<()> {
        self.check_workers()?;
        if offset < self.pos {
            return Err(Error::invalid(format!(
                "write at {offset} is below the previous write's end {}: writes must ascend",
                self.pos
            ))
            .volume(&self.device)
            .offset(offset));
        }
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(Error::invalid(format!(
                "write of {length} bytes at {offset} goes past the volume's end {}",
                self.size
            ))
            .volume(&self.device)
            .offset(offset));
        }
        Ok(())
    }

    /// The first worker failure, once; afterwards a plain "failed earlier".
    fn check_workers(&self) -> Result<()> {
        let mut st = lock_poisoned(&self.state);
        if let Some(e) = st.error.take() {
            st.failed = true;
            return Err(e.volume(&self.device));
        }
        if st.failed {
            return Err(Error::new(
                ErrorKind::Other,
                "the volume writer failed earlier and cannot continue",
            )
            .volume(&self.device));
        }
        Ok(())
    }

    /// Hand a chunk to a worker (waits while all workers are busy).
    async fn submit(&mut self, idx: u64, job: Job) -> Result<()> {
        if self.resize == Some(idx) {
            self.resize = None;
        }
        let closed = |e| Error::other("chunk workers closed").with_source(e);
        let inflight = self
            .inflight
            .clone()
            .acquire_owned()
            .await
            .map_err(closed)?;
        let permit = self.sem.clone().acquire_owned().await.map_err(closed)?;
        let store = self.store.clone();
        let state = self.state.clone();
        let len = self.chunk_len(idx);
        tokio::task::spawn_blocking(move || {
            let res = process_chunk(&store, len, job, move || drop(permit));
            let mut st = lock_poisoned(&state);
            match res {
                Ok((digest, ins)) => {
                    st.index.digests[idx as usize] = digest;
                    if let Some(ins) = ins.filter(|i| i.new) {
                        st.bytes_new += len as u64;
                        st.bytes_stored += ins.stored;
                        st.dirs.insert(digest.0[0]);
                    }
                }
                Err(e) => {
                    if st.error.is_none() {
                        st.error = Some(e.offset(idx * store.chunk_size() as u64));
                    }
                }
            }
            drop(inflight);
        });
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if let Some(a) = self.cur.take() {
            let old = lock_poisoned(&self.state).index.digests[a.idx as usize];
            let job = Job::Merge {
                buf: a.buf,
                written: a.written,
                old,
            };
            self.submit(a.idx, job).await?;
        }
        Ok(())
    }

    /// Place `data` (or zeroes when `None`) at `offset`.
    async fn place(&mut self, offset: u64, length: u64, data: Option<&Bytes>) -> Result<()> {
        self.check(offset, length)?;
        self.bytes_written += length;
        let cs = self.chunk_size;
        let mut off = offset;
        let end = offset + length;
        while off < end {
            let idx = off / cs;
            let start = (off % cs) as usize;
            let clen = self.chunk_len(idx);
            let n = (clen - start).min((end - off) as usize);
            let src = (off - offset) as usize;
            if self.cur.as_ref().is_some_and(|a| a.idx != idx) {
                self.flush().await?;
            }
            if self.cur.is_none() && start == 0 && n == clen {
                match data {
                    Some(d) => self.submit(idx, Job::Whole(d.slice(src..src + n))).await?,
                    None => {
                        if self.resize == Some(idx) {
                            self.resize = None;
                        }
                        lock_poisoned(&self.state).index.digests[idx as usize] = Digest::ZERO;
                    }
                }
            } else {
                let a = self.cur.get_or_insert_with(|| Assembly {
                    idx,
                    buf: vec![0; clen],
                    written: Vec::new(),
                    covered: 0,
                });
                if let Some(d) = data {
                    a.buf[start..start + n].copy_from_slice(&d[src..src + n]);
                }
                a.written.push((start, start + n));
                a.covered += n;
                let full = a.covered == clen;
                if full && let Some(a) = self.cur.take() {
                    self.submit(idx, Job::Whole(Bytes::from(a.buf))).await?;
                }
            }
            off += n as u64;
        }
        self.pos = end;
        Ok(())
    }
}

impl Drop for VolWriter {
    fn drop(&mut self) {
        // An unfinished base image leaves nothing behind.
        if let Destination::BaseImage { tmp, .. } = &self.dest
            && !tmp.as_os_str().is_empty()
        {
            let _ = fs::remove_dir_all(tmp);
        }
    }
}

/// Hash, detect zeroes, compress and insert one chunk (on a worker);
/// `cpu_done` is called when the chunk no longer needs a CPU slot (before
/// its fsync, or at once when there is nothing to store).
fn process_chunk(
    store: &ChunkStore,
    len: usize,
    job: Job,
    cpu_done: impl FnOnce(),
) -> Result<(Digest, Option<crate::chunk::Inserted>)> {
    let data: Bytes = match job {
        Job::Whole(b) => b,
        Job::Merge {
            mut buf,
            written,
            old,
        } => {
            if !old.is_zero() {
                let prev = store.load(&old)?;
                let mut pos = 0;
                let mut fill = |from: usize, to: usize| {
                    let to = to.min(prev.len());
                    if from < to {
                        buf[from..to].copy_from_slice(&prev[from..to]);
                    }
                };
                for (s, e) in &written {
                    fill(pos, *s);
                    pos = *e;
                }
                fill(pos, len);
            }
            Bytes::from(buf)
        }
    };
    debug_assert_eq!(data.len(), len);
    if is_all_zero(&data) {
        return Ok((Digest::ZERO, None));
    }
    let digest = store.digest_of(&data);
    let ins = store.insert_then(&digest, &data, cpu_done)?;
    Ok((digest, Some(ins)))
}

#[async_trait]
impl VolumeWriter for VolWriter {
    async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.place(offset, len, Some(&data)).await
    }

    async fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        self.place(offset, length, None).await
    }

    async fn finish(mut self: Box<Self>) -> Result<VolumeStats> {
        self.flush().await?;
        if let Some(idx) = self.resize.take() {
            let old = lock_poisoned(&self.state).index.digests[idx as usize];
            let len = self.chunk_len(idx);
            let job = Job::Merge {
                buf: vec![0; len],
                written: Vec::new(),
                old,
            };
            self.submit(idx, job).await?;
        }
        // Wait for every chunk, fsynced and named.
        let _all = self
            .inflight
            .acquire_many(self.inflight_permits)
            .await
            .map_err(|e| Error::other("chunk workers closed").with_source(e))?;
        self.check_workers()?;
        let (index, stats, dirs) = {
            let mut st = lock_poisoned(&self.state);
            let stats = VolumeStats {
                bytes_written: self.bytes_written,
                bytes_new: st.bytes_new,
                bytes_stored: st.bytes_stored,
            };
            (
                std::mem::replace(&mut st.index, FixedIndex::zeroed(0, self.chunk_size)),
                stats,
                std::mem::take(&mut st.dirs),
            )
        };
        let store = self.store.clone();
        let storage = self.storage.clone();
        let device = self.device.clone();
        let dest = std::mem::replace(
            &mut self.dest,
            Destination::BaseImage {
                platform: String::new(),
                id: BaseImageId(String::new()),
                tmp: PathBuf::new(),
                final_dir: PathBuf::new(),
            },
        );
        blocking(move || {
            // New chunks' directory entries must be durable before an index
            // that names them.
            store.sync_prefixes(dirs)?;
            publish_volume(&storage, dest, &index, store.crypt()).map_err(|e| e.volume(&device))
        })
        .await?;
        Ok(stats)
    }
}

fn publish_volume(
    st: &Storage,
    dest: Destination,
    index: &FixedIndex,
    crypt: Option<&Crypt>,
) -> Result<()> {
    match dest {
        Destination::Snapshot { dir, spec, state } => {
            let file = format!("{}.fidx", encode_component(&spec.volume.device));
            let fr = write_file(st, &dir.join(&file), index.encode(), crypt)?;
            lock_poisoned(&state).volumes.push(ManifestVolume {
                volume: spec.volume,
                base: spec.base.or(match spec.start_from {
                    StartFrom::BaseImage(b) => Some(b),
                    _ => None,
                }),
                bitmap_mode: spec.bitmap_mode,
                checkpoint: spec.checkpoint,
                index: fr,
            });
            Ok(())
        }
        Destination::BaseImage {
            platform,
            id,
            tmp,
            final_dir,
        } => {
            if let Some(b) = st.object() {
                return publish_base_object(b, &tmp, &final_dir, platform, id, index, crypt);
            }
            let fr = write_file(st, &tmp.join(BASE_INDEX_FILE), index.encode(), crypt)?;
            store_sealed(
                &tmp.join(BASE_MANIFEST_FILE),
                &BaseImageManifest {
                    format: BASE_IMAGE_FORMAT.into(),
                    version: MANIFEST_VERSION,
                    platform,
                    id,
                    chunk_size: index.chunk_size,
                    index: fr,
                    time: now_secs(),
                    key_fingerprint: crypt.map(|c| c.fingerprint().to_owned()),
                },
                crypt,
            )?;
            match fs::rename(&tmp, &final_dir) {
                Ok(()) => {}
                Err(_) if final_dir.join(BASE_MANIFEST_FILE).exists() => {
                    // Another writer stored it first: same content by
                    // definition of the id.
                    let _ = fs::remove_dir_all(&tmp);
                }
                Err(e) => {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(io_err("publishing base image", &final_dir, e));
                }
            }
            if let Some(p) = final_dir.parent() {
                sync_dir(p)?;
            }
            Ok(())
        }
    }
}

/// Object stores: a base image's index goes under its final directory by
/// a name of its own, then its manifest is created (`put_new`); a writer
/// that finds the manifest there (another stored the same image first)
/// removes its index again.
fn publish_base_object(
    b: &Arc<dyn Backend>,
    tmp: &Path,
    final_dir: &Path,
    platform: String,
    id: BaseImageId,
    index: &FixedIndex,
    crypt: Option<&Crypt>,
) -> Result<()> {
    let own = tmp
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches(".tmp-").to_owned())
        .unwrap_or_default();
    let ipath = final_dir.join(format!("image-{own}.fidx"));
    let fr = write_file(&Storage::Object(b.clone()), &ipath, index.encode(), crypt)?;
    let mpath = final_dir.join(BASE_MANIFEST_FILE);
    let m = BaseImageManifest {
        format: BASE_IMAGE_FORMAT.into(),
        version: MANIFEST_VERSION,
        platform,
        id,
        chunk_size: index.chunk_size,
        index: fr,
        time: now_secs(),
        key_fingerprint: crypt.map(|c| c.fingerprint().to_owned()),
    };
    let sealed = seal_opt(crypt, &mpath, crate::manifest::seal(&m)?)?;
    if b.put_new(&key_of(&mpath)?, bytes::Bytes::from(sealed))?
        .is_none()
    {
        b.delete(&key_of(&ipath)?)?;
    }
    Ok(())
}

impl Datastore {
    /// The archive `name` of snapshot `id`, locked, for an incremental
    /// archive to reuse (`None` when that snapshot has no such archive, or
    /// failed verification: the new archive is then read in full).
    pub(crate) fn previous_archive(&self, id: &SnapshotId, name: &str) -> Result<Option<Previous>> {
        let (lock, dir, m) = self.lock_snapshot(id)?;
        if self.verify_state(&dir) == Some(false) {
            tracing::warn!("snapshot {id} failed verification: archive {name} is read in full");
            return Ok(None);
        }
        let Some(a) = m.archives.iter().find(|a| a.name == name) else {
            return Ok(None);
        };
        let (cat, data) = self.archive_indexes(&dir, a)?;
        let stream = Arc::new(StreamReader::new(
            self.chunks().clone(),
            cat,
            format!("catalog of archive {name} in snapshot {id}"),
        ));
        Ok(Some(Previous {
            data,
            entries: CatalogIter::new(stream),
            peeked: None,
            _lock: lock,
        }))
    }

    /// The catalog and data indexes of a stored archive.
    pub(crate) fn archive_indexes(
        &self,
        dir: &Path,
        a: &ManifestArchive,
    ) -> Result<(DynamicIndex, DynamicIndex)> {
        let read = |f: &FileRef| {
            DynamicIndex::read(self.storage(), &dir.join(&f.file), &f.sha256, self.crypt())
        };
        Ok((read(&a.catalog)?, read(&a.data)?))
    }
}
