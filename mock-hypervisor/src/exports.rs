//! Disk exports: what the NBD server serves, with byte counters and faults.
//!
//! A [`DiskExport`] is a named, sized view of a disk (live or a snapshot) or
//! of a base image, read-only or writable. The [`ExportRegistry`] holds the
//! active ones and keeps the counters of closed ones, so a test can assert
//! after cleanup that an incremental read only the changed extents. The NBD
//! server subscribes through [`ExportListener`]; this module does not depend
//! on the NBD implementation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::disk::lock;

use serde::Serialize;

use crate::disk::{BaseImage, View, VirtualDisk};
use crate::error::{Error, Result};
use crate::faults::{FaultRegistry, NbdFaultKind};

/// `base:allocation` meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of the dirty-bitmap contexts: `qemu:dirty-bitmap:checkpoint-<id>`
/// lists the blocks changed since checkpoint `<id>`.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:checkpoint-";
/// `NBD_STATE_HOLE` of `base:allocation`.
pub const STATE_HOLE: u32 = 1;
/// `NBD_STATE_ZERO` of `base:allocation`.
pub const STATE_ZERO: u32 = 2;
/// `NBD_STATE_DIRTY` of a dirty bitmap.
pub const STATE_DIRTY: u32 = 1;

/// What an export shows.
#[derive(Debug, Clone)]
pub enum ExportTarget {
    /// A virtual disk, live or frozen; `include_base` makes base-image
    /// blocks count as allocated (the guest's view of a linked disk).
    Disk {
        /// The disk.
        disk: Arc<VirtualDisk>,
        /// Live or snapshot.
        view: View,
        /// Whether base image blocks are reported allocated.
        include_base: bool,
    },
    /// A base image (writable only while the image is not sealed).
    BaseImage(Arc<BaseImage>),
}

/// One extent of a block-status reply: length and NBD state flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExtentFlags {
    /// Length in bytes.
    pub length: u64,
    /// NBD state flags of the context.
    pub flags: u32,
}

/// Counters and identity of an export, as the admin API reports them.
#[derive(Debug, Clone, Serialize)]
pub struct ExportStats {
    /// Export name (the NBD export name).
    pub name: String,
    /// Who opened it (e.g. `scp:backup-resource:<id>`).
    pub owner: String,
    /// Human description of the target.
    pub target: String,
    /// Whether writes are accepted.
    pub writable: bool,
    /// Whether it still serves.
    pub active: bool,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Number of reads.
    pub read_requests: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Number of block-status queries.
    pub block_status_requests: u64,
}

/// A named export.
#[derive(Debug)]
pub struct DiskExport {
    name: String,
    owner: String,
    target: ExportTarget,
    writable: bool,
    active: AtomicBool,
    bytes_read: AtomicU64,
    read_requests: AtomicU64,
    bytes_written: AtomicU64,
    block_status_requests: AtomicU64,
    faults: Arc<FaultRegistry>,
}

impl DiskExport {
    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Owner tag.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Target.
    pub fn target(&self) -> &ExportTarget {
        &self.target
    }

    /// Size in bytes, read at each call: an export of a live disk that
    /// grew reports the new size (to new NBD connections; an open one keeps
    /// the size of its handshake); a snapshot keeps the size it was taken
    /// at.
    pub fn size(&self) -> u64 {
        match &self.target {
            ExportTarget::Disk { disk, view, .. } => {
                disk.view_size(view).unwrap_or_else(|_| disk.size())
            }
            ExportTarget::BaseImage(image) => image.size(),
        }
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        !self.writable
    }

    /// Whether the export still serves.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Stops serving (lease expiry, close, injected disconnect).
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    fn check_active(&self) -> Result<()> {
        if self.is_active() {
            Ok(())
        } else {
            Err(Error::Conflict(format!("export {} is closed", self.name)))
        }
    }

    /// Reads `length` bytes at `offset`, counting them.
    pub fn read(&self, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.check_active()?;
        match self
            .faults
            .nbd_read(&self.name, self.bytes_read.load(Ordering::SeqCst))
        {
            Some(NbdFaultKind::ReadError) => {
                return Err(Error::Injected(format!("read error on {}", self.name)));
            }
            Some(NbdFaultKind::Disconnect) => {
                self.deactivate();
                return Err(Error::Injected(format!("disconnect of {}", self.name)));
            }
            None => {}
        }
        let data = match &self.target {
            ExportTarget::Disk { disk, view, .. } => disk.read(view, offset, length)?,
            ExportTarget::BaseImage(image) => image.read(offset, length)?,
        };
        self.bytes_read.fetch_add(length, Ordering::SeqCst);
        self.read_requests.fetch_add(1, Ordering::SeqCst);
        Ok(data)
    }

    /// Writes `data` at `offset` (writable exports of live disks or
    /// unsealed base images only).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_active()?;
        if !self.writable {
            return Err(Error::Conflict(format!(
                "export {} is read-only",
                self.name
            )));
        }
        match &self.target {
            ExportTarget::Disk {
                disk,
                view: View::Live,
                ..
            } => disk.write(offset, data)?,
            ExportTarget::Disk { .. } => {
                return Err(Error::Conflict("snapshots are read-only".into()));
            }
            ExportTarget::BaseImage(image) => image.write(offset, data)?,
        }
        self.bytes_written
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Meta contexts offered: `base:allocation`, and for a snapshot of a
    /// disk one dirty bitmap per valid checkpoint older than the snapshot.
    pub fn meta_contexts(&self) -> Vec<String> {
        let mut out = vec![BASE_ALLOCATION.to_string()];
        if let ExportTarget::Disk {
            disk,
            view: View::Snapshot(sid),
            ..
        } = &self.target
            && let Ok(own) = disk.snapshot_checkpoint(sid)
        {
            let checkpoints = disk.checkpoints();
            let own_generation = checkpoints.get(&own).map(|c| c.generation).unwrap_or(0);
            for (id, cp) in checkpoints {
                if id != own && cp.valid && cp.generation <= own_generation {
                    out.push(format!("{DIRTY_BITMAP_PREFIX}{id}"));
                }
            }
        }
        out
    }

    /// Block status of one context over a range.
    pub fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<ExtentFlags>> {
        self.check_active()?;
        self.block_status_requests.fetch_add(1, Ordering::SeqCst);
        let size = self.size();
        if context == BASE_ALLOCATION {
            let runs = match &self.target {
                ExportTarget::Disk {
                    disk,
                    view,
                    include_base,
                } => disk.allocation(view, offset, length, *include_base)?,
                ExportTarget::BaseImage(image) => image.allocation(offset, length),
            };
            return Ok(runs
                .into_iter()
                .map(|r| ExtentFlags {
                    length: r.length,
                    flags: if r.set { 0 } else { STATE_HOLE | STATE_ZERO },
                })
                .collect());
        }
        let checkpoint = context
            .strip_prefix(DIRTY_BITMAP_PREFIX)
            .and_then(|c| c.parse::<u64>().ok())
            .ok_or_else(|| Error::Invalid(format!("unknown meta context {context}")))?;
        match &self.target {
            ExportTarget::Disk {
                disk,
                view: View::Snapshot(sid),
                ..
            } => {
                let changed = disk.changed_since(sid, checkpoint)?;
                Ok(
                    crate::disk::bitmap::runs(size, offset, length, |b| changed.get(b))
                        .into_iter()
                        .map(|r| ExtentFlags {
                            length: r.length,
                            flags: if r.set { STATE_DIRTY } else { 0 },
                        })
                        .collect(),
                )
            }
            _ => Err(Error::Invalid(format!(
                "{context} is only offered on snapshots"
            ))),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> ExportStats {
        ExportStats {
            name: self.name.clone(),
            owner: self.owner.clone(),
            target: match &self.target {
                ExportTarget::Disk { disk, view, .. } => match view {
                    View::Live => format!("disk {}", disk.id()),
                    View::Snapshot(s) => format!("disk {} snapshot {s}", disk.id()),
                },
                ExportTarget::BaseImage(image) => format!("base image {}", image.id()),
            },
            writable: self.writable,
            active: self.is_active(),
            bytes_read: self.bytes_read.load(Ordering::SeqCst),
            read_requests: self.read_requests.load(Ordering::SeqCst),
            bytes_written: self.bytes_written.load(Ordering::SeqCst),
            block_status_requests: self.block_status_requests.load(Ordering::SeqCst),
        }
    }
}

/// Told when exports come and go (the NBD server implements it).
pub trait ExportListener: Send + Sync + std::fmt::Debug {
    /// An export was added.
    fn added(&self, export: Arc<DiskExport>);
    /// An export was removed.
    fn removed(&self, name: &str);
}

/// Active exports by name, plus the counters of closed ones.
#[derive(Debug)]
pub struct ExportRegistry {
    faults: Arc<FaultRegistry>,
    active: Mutex<BTreeMap<String, Arc<DiskExport>>>,
    closed: Mutex<Vec<ExportStats>>,
    listener: Mutex<Option<Arc<dyn ExportListener>>>,
}

impl ExportRegistry {
    /// An empty registry whose exports consult `faults`.
    pub fn new(faults: Arc<FaultRegistry>) -> Self {
        ExportRegistry {
            faults,
            active: Mutex::new(BTreeMap::new()),
            closed: Mutex::new(Vec::new()),
            listener: Mutex::new(None),
        }
    }

    /// Subscribes the NBD server (existing exports are announced).
    pub fn set_listener(&self, listener: Arc<dyn ExportListener>) {
        for e in lock(&self.active).values() {
            listener.added(e.clone());
        }
        *lock(&self.listener) = Some(listener);
    }

    /// Adds an export; its name must be new.
    pub fn add(
        &self,
        name: &str,
        owner: &str,
        target: ExportTarget,
        writable: bool,
    ) -> Result<Arc<DiskExport>> {
        let export = Arc::new(DiskExport {
            name: name.to_string(),
            owner: owner.to_string(),
            target,
            writable,
            active: AtomicBool::new(true),
            bytes_read: AtomicU64::new(0),
            read_requests: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            block_status_requests: AtomicU64::new(0),
            faults: self.faults.clone(),
        });
        {
            let mut active = lock(&self.active);
            if active.contains_key(name) {
                return Err(Error::Conflict(format!("export {name} exists")));
            }
            active.insert(name.to_string(), export.clone());
        }
        if let Some(l) = lock(&self.listener).clone() {
            l.added(export.clone());
        }
        Ok(export)
    }

    /// Looks up an active export.
    pub fn get(&self, name: &str) -> Option<Arc<DiskExport>> {
        lock(&self.active).get(name).cloned()
    }

    /// Removes an export: it stops serving, its counters move to history.
    pub fn remove(&self, name: &str) -> Result<ExportStats> {
        let export = lock(&self.active)
            .remove(name)
            .ok_or_else(|| Error::not_found("export", name))?;
        export.deactivate();
        if let Some(l) = lock(&self.listener).clone() {
            l.removed(name);
        }
        let stats = export.stats();
        lock(&self.closed).push(stats.clone());
        Ok(stats)
    }

    /// Removes every export whose owner is `owner`.
    pub fn remove_owned_by(&self, owner: &str) -> Vec<ExportStats> {
        let names: Vec<String> = lock(&self.active)
            .values()
            .filter(|e| e.owner == owner)
            .map(|e| e.name.clone())
            .collect();
        names.iter().filter_map(|n| self.remove(n).ok()).collect()
    }

    /// Stops every export of `owner` from serving without removing it.
    pub fn deactivate_owned_by(&self, owner: &str) {
        lock(&self.active)
            .values()
            .filter(|e| e.owner == owner)
            .for_each(|e| e.deactivate());
    }

    /// Active exports matching a predicate.
    pub fn find(&self, pred: impl Fn(&DiskExport) -> bool) -> Vec<Arc<DiskExport>> {
        lock(&self.active)
            .values()
            .filter(|e| pred(e))
            .cloned()
            .collect()
    }

    /// Counters of active exports.
    pub fn active_stats(&self) -> Vec<ExportStats> {
        lock(&self.active).values().map(|e| e.stats()).collect()
    }

    /// Counters of closed exports, oldest first.
    pub fn closed_stats(&self) -> Vec<ExportStats> {
        lock(&self.closed).clone()
    }

    /// Counters of every export ever opened with this name (closed ones
    /// first, then the active one).
    pub fn stats_named(&self, name: &str) -> Vec<ExportStats> {
        let mut out: Vec<_> = self
            .closed_stats()
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        out.extend(self.get(name).map(|e| e.stats()));
        out
    }

    /// Forgets the counters of closed exports.
    pub fn clear_history(&self) {
        lock(&self.closed).clear();
    }
}
