//! Virtual disks: an optional base image, a writable overlay, copy-on-write
//! snapshots and change tracking (CBT).
//!
//! Files of a disk (`disks/<id>/`): `overlay.raw` (sparse, virtual size),
//! `snap-<snapshot>.cow` per snapshot (sparse, holds only preserved blocks)
//! and `meta.json` (allocation maps, block generations, checkpoints,
//! snapshots).
//!
//! Change tracking: every guest write bumps the disk's generation counter and
//! stamps the written blocks with it. A checkpoint records the generation at
//! the time it was taken, so "changed since checkpoint C" is the set of
//! blocks whose stamp is newer than C's generation, as the snapshot sees them.
//!
//! Snapshots: creating one is O(metadata). When the guest later writes a block
//! that a snapshot has not yet preserved, the old overlay block (if any) is
//! copied into the snapshot's `.cow` file together with its old generation
//! stamp; blocks the overlay never held read through to the immutable base
//! image. Reading a snapshot therefore gives the frozen content however much
//! the guest writes afterwards.
//!
//! Resize: [`VirtualDisk::resize`] grows a disk in place (the overlay file
//! and its allocation map grow; the base-image link, the snapshots and the
//! checkpoints stay). The new tail reads as zeroes (or through to the base
//! image, which is never larger than the disk) and is not dirty: change
//! tracking reports data written, not size changes. The size change is
//! visible instead: a snapshot keeps the size the disk had when it was
//! taken ([`VirtualDisk::view_size`]), a checkpoint records it
//! ([`Checkpoint::size`]), and dirty bitmaps cover the snapshot's size.
//! Shrinking is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::base_image::{BaseImage, check_range};
use super::bitmap::{BlockBitmap, Run, blocks_for, runs};
use super::layer::{Layer, block_len};
use super::{BLOCK_SIZE, read_lock, write_lock};
use crate::error::{Error, Result};
use crate::persist;

/// Which state of a disk to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// What the running guest sees now.
    Live,
    /// The frozen content of a snapshot.
    Snapshot(String),
}

/// A CBT checkpoint of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Disk generation when the checkpoint was taken.
    pub generation: u64,
    /// False once CBT expired (revert, restore): it can no longer serve as
    /// the start of an incremental.
    pub valid: bool,
    /// Disk size in bytes when the checkpoint was taken (0: recorded before
    /// disks could grow, i.e. the disk's size then was its size now). A
    /// disk grown since a checkpoint reports a larger size than this.
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Preserved {
    /// Generation stamp of the block when it was preserved.
    generation: u64,
    /// Whether the overlay held the block (data then lives in the `.cow`
    /// file); otherwise the block read through to the base image or zero.
    overlay_allocated: bool,
}

#[derive(Debug)]
struct Frozen {
    /// Size of the disk when the snapshot was taken.
    size: u64,
    generation: u64,
    checkpoint_id: u64,
    cow: Layer,
    preserved: BTreeMap<u64, Preserved>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FrozenMeta {
    /// Absent in metadata written before disks could grow: the disk's size.
    #[serde(default)]
    size: Option<u64>,
    generation: u64,
    checkpoint_id: u64,
    cow_allocated: BlockBitmap,
    preserved: Vec<(u64, Preserved)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskMeta {
    id: String,
    size: u64,
    base_image_id: Option<String>,
    overlay_allocated: BlockBitmap,
    /// Write generation of blocks written since `generation_floor`
    /// (sparse: `(block, generation)`).
    block_generations: Vec<(u64, u64)>,
    /// Generation every block has at least (raised by a relink).
    #[serde(default)]
    generation_floor: u64,
    generation: u64,
    checkpoints: BTreeMap<u64, Checkpoint>,
    snapshots: BTreeMap<String, FrozenMeta>,
}

#[derive(Debug)]
struct DiskState {
    /// Live virtual size (grows with [`VirtualDisk::resize`]).
    size: u64,
    base: Option<Arc<BaseImage>>,
    overlay: Layer,
    block_generations: BTreeMap<u64, u64>,
    generation_floor: u64,
    generation: u64,
    checkpoints: BTreeMap<u64, Checkpoint>,
    snapshots: BTreeMap<String, Frozen>,
}

impl DiskState {
    /// Generation stamp of block `b` in the live disk.
    fn block_generation(&self, b: u64) -> u64 {
        self.block_generations
            .get(&b)
            .copied()
            .unwrap_or(0)
            .max(self.generation_floor)
    }
}

/// Where a block of a view reads from.
enum Source {
    Overlay,
    Cow,
    Base,
    Zero,
}

/// A guest-visible virtual disk. All methods lock internally: the disk's
/// state lock first, then (for reads through) its base image's lock.
#[derive(Debug)]
pub struct VirtualDisk {
    id: String,
    dir: PathBuf,
    state: RwLock<DiskState>,
}

enum Update<'a> {
    Data(std::borrow::Cow<'a, [u8]>),
    Discard,
}

impl VirtualDisk {
    /// Creates an empty disk in `dir`, linked to `base` when given.
    pub fn create(dir: &Path, id: &str, size: u64, base: Option<Arc<BaseImage>>) -> Result<Self> {
        super::check_size(size)?;
        if let Some(base) = &base {
            if base.size() > size {
                return Err(Error::Invalid(format!(
                    "disk size {size} is smaller than base image {} ({} bytes)",
                    base.id(),
                    base.size()
                )));
            }
            if !base.is_sealed() {
                return Err(Error::Conflict(format!(
                    "base image {} is not available yet",
                    base.id()
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let overlay = Layer::create(&dir.join("overlay.raw"), size)?;
        let disk = VirtualDisk {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            state: RwLock::new(DiskState {
                size,
                base,
                overlay,
                block_generations: BTreeMap::new(),
                generation_floor: 0,
                generation: 0,
                checkpoints: BTreeMap::new(),
                snapshots: BTreeMap::new(),
            }),
        };
        disk.save(&read_lock(&disk.state))?;
        Ok(disk)
    }

    /// Opens a disk persisted in `dir`; `find_image` resolves its base image.
    pub fn open(dir: &Path, find_image: impl Fn(&str) -> Option<Arc<BaseImage>>) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let meta: DiskMeta = persist::load_json(&meta_path)?
            .ok_or_else(|| Error::not_found("disk metadata", meta_path.display().to_string()))?;
        let base = match &meta.base_image_id {
            Some(id) => Some(find_image(id).ok_or_else(|| Error::not_found("base image", id))?),
            None => None,
        };
        let overlay = Layer::open(&dir.join("overlay.raw"), meta.size, meta.overlay_allocated)?;
        let mut snapshots = BTreeMap::new();
        for (sid, f) in meta.snapshots {
            let size = f.size.unwrap_or(meta.size);
            let cow = Layer::open(&dir.join(format!("snap-{sid}.cow")), size, f.cow_allocated)?;
            snapshots.insert(
                sid,
                Frozen {
                    size,
                    generation: f.generation,
                    checkpoint_id: f.checkpoint_id,
                    cow,
                    preserved: f.preserved.into_iter().collect(),
                },
            );
        }
        Ok(VirtualDisk {
            id: meta.id,
            dir: dir.to_path_buf(),
            state: RwLock::new(DiskState {
                size: meta.size,
                base,
                overlay,
                block_generations: meta.block_generations.into_iter().collect(),
                generation_floor: meta.generation_floor,
                generation: meta.generation,
                checkpoints: meta.checkpoints,
                snapshots,
            }),
        })
    }

    fn save(&self, st: &DiskState) -> Result<()> {
        let meta = DiskMeta {
            id: self.id.clone(),
            size: st.size,
            base_image_id: st.base.as_ref().map(|b| b.id().to_string()),
            overlay_allocated: st.overlay.allocated().clone(),
            block_generations: st.block_generations.iter().map(|(b, g)| (*b, *g)).collect(),
            generation_floor: st.generation_floor,
            generation: st.generation,
            checkpoints: st.checkpoints.clone(),
            snapshots: st
                .snapshots
                .iter()
                .map(|(id, f)| {
                    (
                        id.clone(),
                        FrozenMeta {
                            size: Some(f.size),
                            generation: f.generation,
                            checkpoint_id: f.checkpoint_id,
                            cow_allocated: f.cow.allocated().clone(),
                            preserved: f.preserved.iter().map(|(b, p)| (*b, *p)).collect(),
                        },
                    )
                })
                .collect(),
        };
        persist::save_json(&self.dir.join("meta.json"), &meta)
    }

    /// Identifier.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Live virtual size in bytes (what the guest sees now).
    pub fn size(&self) -> u64 {
        read_lock(&self.state).size
    }

    /// Size of a view: the live size, or the size the disk had when the
    /// snapshot was taken (smaller than the live size if the disk grew
    /// since).
    pub fn view_size(&self, view: &View) -> Result<u64> {
        let st = read_lock(&self.state);
        Ok(view_size_of(&st, view_of(&st, view)?))
    }

    /// Grows the disk to `new_size` bytes in place, as a platform's disk
    /// extend does: the base-image link, snapshots (which keep their own
    /// size) and checkpoints stay valid; the new tail reads as zeroes and
    /// is not dirty (no block generation changes). The same size is a
    /// no-op; a smaller one is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        super::check_size(new_size)?;
        let mut st = write_lock(&self.state);
        if new_size < st.size {
            return Err(Error::Invalid(format!(
                "disk {} has {} bytes: it cannot shrink to {new_size}",
                self.id, st.size
            )));
        }
        if new_size == st.size {
            return Ok(());
        }
        // The file grows first: metadata naming a size the file does not
        // have yet is never written (a crash in between leaves a longer
        // file, which opening accepts).
        st.overlay.grow(new_size)?;
        st.size = new_size;
        self.save(&st)
    }

    /// Directory holding the disk's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The base image under the overlay, if the disk is linked.
    pub fn base_image(&self) -> Option<Arc<BaseImage>> {
        read_lock(&self.state).base.clone()
    }

    /// Identifiers of the snapshots that freeze this disk.
    pub fn snapshot_ids(&self) -> Vec<String> {
        read_lock(&self.state).snapshots.keys().cloned().collect()
    }

    /// Checkpoints by id.
    pub fn checkpoints(&self) -> BTreeMap<u64, Checkpoint> {
        read_lock(&self.state).checkpoints.clone()
    }

    /// Checkpoint id created with a snapshot.
    pub fn snapshot_checkpoint(&self, snapshot_id: &str) -> Result<u64> {
        let st = read_lock(&self.state);
        frozen(&st, snapshot_id).map(|f| f.checkpoint_id)
    }

    fn source(st: &DiskState, view: Option<&Frozen>, b: u64) -> Source {
        let base_or_zero = || match &st.base {
            Some(base) if base.is_allocated(b) => Source::Base,
            _ => Source::Zero,
        };
        if let Some(p) = view.and_then(|f| f.preserved.get(&b)) {
            return if p.overlay_allocated {
                Source::Cow
            } else {
                base_or_zero()
            };
        }
        if st.overlay.is_allocated(b) {
            Source::Overlay
        } else {
            base_or_zero()
        }
    }

    fn read_block(st: &DiskState, view: Option<&Frozen>, b: u64, buf: &mut [u8]) -> Result<()> {
        match Self::source(st, view, b) {
            Source::Overlay => st.overlay.read_block(b, buf),
            Source::Cow => match view {
                Some(f) => f.cow.read_block(b, buf),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Source::Base => match &st.base {
                Some(base) => base.read_block_padded(b, buf),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads `length` bytes at `offset` of a view.
    pub fn read(&self, view: &View, offset: u64, length: u64) -> Result<Vec<u8>> {
        let st = read_lock(&self.state);
        let f = view_of(&st, view)?;
        let size = view_size_of(&st, f);
        check_range(size, offset, length)?;
        let mut out = vec![0u8; length as usize];
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK_SIZE;
            let n = block_len(size, b);
            Self::read_block(&st, f, b, &mut block[..n])?;
            let in_block = (pos - b * BLOCK_SIZE) as usize;
            let take = (n - in_block).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            out[at..at + take].copy_from_slice(&block[in_block..in_block + take]);
            pos += take as u64;
        }
        Ok(out)
    }

    /// Whether block `b` of a view holds data: in the overlay, or (when
    /// `include_base`) in the base image.
    fn allocated_in(st: &DiskState, view: Option<&Frozen>, b: u64, include_base: bool) -> bool {
        match Self::source(st, view, b) {
            Source::Overlay | Source::Cow => true,
            Source::Base => include_base,
            Source::Zero => false,
        }
    }

    /// Allocation runs of a view over a byte range.
    pub fn allocation(
        &self,
        view: &View,
        offset: u64,
        length: u64,
        include_base: bool,
    ) -> Result<Vec<Run>> {
        let st = read_lock(&self.state);
        let f = view_of(&st, view)?;
        Ok(runs(view_size_of(&st, f), offset, length, |b| {
            Self::allocated_in(&st, f, b, include_base)
        }))
    }

    /// Allocation map of a view over the whole disk.
    pub fn allocated_map(&self, view: &View, include_base: bool) -> Result<BlockBitmap> {
        let st = read_lock(&self.state);
        let f = view_of(&st, view)?;
        Ok(BlockBitmap::from_fn(view_size_of(&st, f), |b| {
            Self::allocated_in(&st, f, b, include_base)
        }))
    }

    /// Blocks of snapshot `snapshot_id` written after checkpoint
    /// `checkpoint_id` was taken, over the snapshot's size (blocks a disk
    /// grew by since the checkpoint are not dirty unless written).
    pub fn changed_since(&self, snapshot_id: &str, checkpoint_id: u64) -> Result<BlockBitmap> {
        let st = read_lock(&self.state);
        let f = frozen(&st, snapshot_id)?;
        let cp = st
            .checkpoints
            .get(&checkpoint_id)
            .ok_or_else(|| Error::not_found("checkpoint", checkpoint_id.to_string()))?;
        if !cp.valid {
            return Err(Error::Refused(format!(
                "checkpoint {checkpoint_id} is no longer valid, a full backup is needed"
            )));
        }
        if cp.generation > f.generation {
            return Err(Error::Invalid(format!(
                "checkpoint {checkpoint_id} is newer than snapshot {snapshot_id}"
            )));
        }
        Ok(BlockBitmap::from_fn(f.size, |b| {
            let generation = f
                .preserved
                .get(&b)
                .map(|p| p.generation)
                .unwrap_or_else(|| st.block_generation(b));
            generation > cp.generation
        }))
    }

    /// Writes `data` at `offset` as the guest would.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = write_lock(&self.state);
        let size = st.size;
        check_range(size, offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        let mut updates = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK_SIZE;
            let n = block_len(size, b);
            let in_block = (pos - b * BLOCK_SIZE) as usize;
            let take = (n - in_block).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            if take == n {
                updates.push((
                    b,
                    Update::Data(std::borrow::Cow::Borrowed(&data[at..at + take])),
                ));
            } else {
                let mut block = vec![0u8; n];
                Self::read_block(&st, None, b, &mut block)?;
                block[in_block..in_block + take].copy_from_slice(&data[at..at + take]);
                updates.push((b, Update::Data(std::borrow::Cow::Owned(block))));
            }
            pos += take as u64;
        }
        self.apply(&mut st, updates)
    }

    /// Drops every overlay block so the guest sees the base image again
    /// (`recovery-baseimage`); optionally relinks to another base image.
    pub fn reset_to_base(&self, new_base: Option<Arc<BaseImage>>) -> Result<()> {
        let mut st = write_lock(&self.state);
        if let Some(nb) = &new_base {
            let same = st.base.as_ref().is_some_and(|b| b.id() == nb.id());
            if !same && !st.snapshots.is_empty() {
                return Err(Error::Conflict(format!(
                    "disk {} has snapshots: delete them before relinking it to another base image",
                    self.id
                )));
            }
            if nb.size() > st.size || !nb.is_sealed() {
                return Err(Error::Conflict(format!(
                    "base image {} cannot back disk {}",
                    nb.id(),
                    self.id
                )));
            }
        }
        let updates: Vec<_> = (0..blocks_for(st.size))
            .filter(|b| st.overlay.is_allocated(*b))
            .map(|b| (b, Update::Discard))
            .collect();
        // Preserve and discard under the old base, then relink.
        self.apply(&mut st, updates)?;
        if let Some(nb) = new_base {
            st.base = Some(nb);
            st.generation += 1;
            let generation = st.generation;
            st.generation_floor = generation;
            st.block_generations.clear();
        }
        self.save(&st)
    }

    /// Applies block updates: first preserves old blocks for every snapshot
    /// that has not preserved them yet (persisted before the overlay changes),
    /// then writes the overlay and stamps the blocks.
    fn apply(&self, st: &mut DiskState, updates: Vec<(u64, Update<'_>)>) -> Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut preserved_any = false;
        let mut scratch = vec![0u8; BLOCK_SIZE as usize];
        let DiskState {
            overlay,
            snapshots,
            block_generations,
            generation_floor,
            ..
        } = &mut *st;
        for (b, _) in &updates {
            let b = *b;
            for f in snapshots.values_mut() {
                // Blocks past a snapshot's end (the disk grew since) are
                // not part of it.
                if f.preserved.contains_key(&b) || b >= blocks_for(f.size) {
                    continue;
                }
                let overlay_allocated = overlay.is_allocated(b);
                if overlay_allocated {
                    // The snapshot's last block may be shorter than the
                    // overlay's block (the disk grew since).
                    let n = overlay.block_len(b);
                    overlay.read_block(b, &mut scratch[..n])?;
                    let keep = f.cow.block_len(b);
                    f.cow.write_block(b, &scratch[..keep])?;
                }
                f.preserved.insert(
                    b,
                    Preserved {
                        generation: block_generations
                            .get(&b)
                            .copied()
                            .unwrap_or(0)
                            .max(*generation_floor),
                        overlay_allocated,
                    },
                );
                preserved_any = true;
            }
        }
        if preserved_any {
            self.save(st)?;
        }
        st.generation += 1;
        let generation = st.generation;
        for (b, update) in updates {
            match update {
                Update::Data(data) => st.overlay.write_block(b, &data)?,
                Update::Discard => st.overlay.discard_block(b)?,
            }
            st.block_generations.insert(b, generation);
        }
        self.save(st)
    }

    /// Freezes the current content as snapshot `snapshot_id` and records
    /// checkpoint `checkpoint_id` at the same instant. O(metadata).
    pub fn create_snapshot(&self, snapshot_id: &str, checkpoint_id: u64) -> Result<()> {
        let mut st = write_lock(&self.state);
        if st.snapshots.contains_key(snapshot_id) {
            return Err(Error::Conflict(format!("snapshot {snapshot_id} exists")));
        }
        if checkpoint_id == 0 || st.checkpoints.contains_key(&checkpoint_id) {
            return Err(Error::Conflict(format!(
                "checkpoint {checkpoint_id} is not new"
            )));
        }
        let size = st.size;
        let cow = Layer::create(&self.dir.join(format!("snap-{snapshot_id}.cow")), size)?;
        let generation = st.generation;
        st.snapshots.insert(
            snapshot_id.to_string(),
            Frozen {
                size,
                generation,
                checkpoint_id,
                cow,
                preserved: BTreeMap::new(),
            },
        );
        st.checkpoints.insert(
            checkpoint_id,
            Checkpoint {
                generation,
                valid: true,
                size,
            },
        );
        self.save(&st)
    }

    /// Deletes a snapshot (its checkpoint stays usable for incrementals).
    pub fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        let mut st = write_lock(&self.state);
        let f = st
            .snapshots
            .remove(snapshot_id)
            .ok_or_else(|| Error::not_found("snapshot", snapshot_id))?;
        self.save(&st)?;
        let path = f.cow.path().to_path_buf();
        drop(f);
        std::fs::remove_file(&path).map_err(Error::io(path))
    }

    /// Makes the live content equal to snapshot `snapshot_id` again.
    /// Refused when the disk grew since the snapshot (disks never shrink).
    pub fn revert(&self, snapshot_id: &str) -> Result<()> {
        let mut st = write_lock(&self.state);
        let f = frozen(&st, snapshot_id)?;
        if f.size != st.size {
            return Err(Error::Conflict(format!(
                "disk {} grew from {} to {} bytes since snapshot {snapshot_id}: \
                 reverting would shrink it",
                self.id, f.size, st.size
            )));
        }
        let mut updates = Vec::new();
        for (b, p) in &f.preserved {
            if p.overlay_allocated {
                let mut block = vec![0u8; f.cow.block_len(*b)];
                f.cow.read_block(*b, &mut block)?;
                updates.push((*b, Update::Data(std::borrow::Cow::Owned(block))));
            } else {
                updates.push((*b, Update::Discard));
            }
        }
        self.apply(&mut st, updates)
    }

    /// Marks every checkpoint invalid (CBT expired after a revert or restore).
    pub fn invalidate_checkpoints(&self) -> Result<()> {
        let mut st = write_lock(&self.state);
        st.checkpoints.values_mut().for_each(|c| c.valid = false);
        self.save(&st)
    }

    /// SHA-256 of a view's full content.
    pub fn sha256(&self, view: &View) -> Result<String> {
        let st = read_lock(&self.state);
        let f = view_of(&st, view)?;
        let size = view_size_of(&st, f);
        let mut h = Sha256::new();
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for b in 0..blocks_for(size) {
            let n = block_len(size, b);
            Self::read_block(&st, f, b, &mut block[..n])?;
            h.update(&block[..n]);
        }
        Ok(super::hex(&h.finalize()))
    }
}

fn frozen<'a>(st: &'a DiskState, snapshot_id: &str) -> Result<&'a Frozen> {
    st.snapshots
        .get(snapshot_id)
        .ok_or_else(|| Error::not_found("snapshot", snapshot_id))
}

/// Size of a view: the snapshot's when frozen, else the live size.
fn view_size_of(st: &DiskState, view: Option<&Frozen>) -> u64 {
    view.map_or(st.size, |f| f.size)
}

fn view_of<'a>(st: &'a DiskState, view: &View) -> Result<Option<&'a Frozen>> {
    match view {
        View::Live => Ok(None),
        View::Snapshot(id) => frozen(st, id).map(Some),
    }
}
