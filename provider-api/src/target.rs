//! The target: where a host writes one snapshot's volumes, configurations
//! and metadata, and reads them back for restore.
//!
//! A target stores *logically full* snapshots: every volume of every
//! snapshot reads back complete, whatever it was built from. Three ways to
//! build a volume (see [`StartFrom`]): from nothing (full backup), from the
//! same volume of a previous snapshot (incremental: only changed regions are
//! written), or from a stored base image (linked clone: only the overlay's
//! regions are written). Regions not written keep the content of the
//! starting point.
//!
//! A snapshot becomes visible only when [`SnapshotWriter::commit`] returns;
//! [`SnapshotWriter::abort`] (or dropping the writer) leaves nothing visible.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::files::{FileArchiveReader, FileArchiveWriter};
use crate::types::{
    ArchiveName, BaseImageId, BitmapMode, Checkpoint, ConfigBlob, Extent, GuestId,
    PlatformMetadata, Volume,
};

/// A snapshot's id in its target (opaque to the host; stable).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(pub String);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// The provider's name (groups snapshots by platform).
    pub platform: String,
    /// The guest.
    pub guest: GuestId,
    /// Archive name from `backup_init`.
    pub archive: ArchiveName,
    /// Backup time, seconds since the epoch (names the snapshot).
    pub time: i64,
}

/// Which configuration blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigKind {
    /// The guest configuration.
    Guest,
    /// The firewall configuration.
    Firewall,
    /// The platform-neutral [`GuestSpec`](crate::GuestSpec) a provider
    /// gave with a platform backup ([`VmBackup::spec`](crate::VmBackup)),
    /// for restores onto other platforms.
    Spec,
}

/// Where a volume's content starts before the written regions are applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    /// All zeroes (full backup).
    Empty,
    /// The same device of an earlier snapshot of the same guest
    /// (incremental).
    Previous(SnapshotId),
    /// A base image already stored in the target (linked clone: the
    /// regions written are the overlay's).
    BaseImage(BaseImageId),
}

/// One volume to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The volume.
    pub volume: Volume,
    /// What unwritten regions contain.
    pub start_from: StartFrom,
    /// The base image this volume is linked to, if any (kept for restore
    /// even when `start_from` is `Previous`).
    pub base: Option<BaseImageId>,
    /// Bitmap mode used for this backup.
    pub bitmap_mode: BitmapMode,
    /// The provider's checkpoint after this backup.
    pub checkpoint: Option<Checkpoint>,
}

/// What writing a volume cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStats {
    /// Bytes handed to the writer (data and zeroes).
    pub bytes_written: u64,
    /// Bytes of new data the target had to store (after dedup, before
    /// compression).
    pub bytes_new: u64,
    /// Bytes the target stored for new data (after compression).
    pub bytes_stored: u64,
}

/// Writes one volume. Calls come in ascending, non-overlapping offset order.
#[async_trait]
pub trait VolumeWriter: Send {
    /// Write `data` at `offset`.
    async fn write(&mut self, offset: u64, data: Bytes) -> Result<()>;
    /// The region reads as zeroes (a hole or zeroed data in the source).
    async fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()>;
    /// All regions written; make the volume durable (not yet visible).
    async fn finish(self: Box<Self>) -> Result<VolumeStats>;
}

/// Writes one snapshot. Nothing is visible until [`commit`](Self::commit).
#[async_trait]
pub trait SnapshotWriter: Send {
    /// Store a configuration blob.
    async fn put_config(&mut self, kind: ConfigKind, blob: ConfigBlob) -> Result<()>;
    /// Store the provider's metadata.
    async fn put_metadata(&mut self, metadata: PlatformMetadata) -> Result<()>;
    /// Write a shared base image, unless the target already holds it
    /// (`Ok(None)`). Its content must be finished before a volume starts
    /// from it.
    async fn begin_base_image(
        &mut self,
        id: &BaseImageId,
        size: u64,
    ) -> Result<Option<Box<dyn VolumeWriter>>>;
    /// Start writing a volume.
    async fn begin_volume(&mut self, spec: VolumeSpec) -> Result<Box<dyn VolumeWriter>>;
    /// Start a file archive (a directory tree, see [`crate::files`]) named
    /// `name`; with `previous`, regular files whose metadata did not change
    /// since that snapshot's archive of the same name can be reused
    /// without reading them. Targets without file archives answer
    /// `Unsupported`.
    async fn begin_file_archive(
        &mut self,
        name: &str,
        previous: Option<&SnapshotId>,
    ) -> Result<Box<dyn FileArchiveWriter>> {
        let _ = previous;
        Err(crate::Error::unsupported(format!(
            "file archives (archive {name}) in this target"
        )))
    }
    /// Publish the snapshot atomically, with the warnings to show with it.
    async fn commit(self: Box<Self>, warnings: Vec<String>) -> Result<SnapshotInfo>;
    /// Discard everything written.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// A stored volume as listed in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVolume {
    /// The volume.
    pub volume: Volume,
    /// Its base image, if linked.
    pub base: Option<BaseImageId>,
    /// Bitmap mode the backup used.
    pub bitmap_mode: BitmapMode,
    /// Checkpoint for the next incremental.
    pub checkpoint: Option<Checkpoint>,
}

/// A finished snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Id in the target.
    pub id: SnapshotId,
    /// Provider name.
    pub platform: String,
    /// Guest.
    pub guest: GuestId,
    /// Archive name.
    pub archive: ArchiveName,
    /// Backup time, seconds since the epoch.
    pub time: i64,
    /// Volumes.
    pub volumes: Vec<StoredVolume>,
    /// Warnings recorded at backup (e.g. "fell back to full").
    pub warnings: Vec<String>,
    /// `Some(false)` once verification found damage: never used as an
    /// incremental base.
    pub verified: Option<bool>,
}

impl SnapshotInfo {
    /// The stored volume with this device name.
    pub fn volume(&self, device: &str) -> Option<&StoredVolume> {
        self.volumes.iter().find(|v| v.volume.device == device)
    }
}

/// Which view of a linked volume to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The volume as the guest saw it (base and overlay merged).
    Merged,
    /// The base image only.
    Base,
    /// What the guest changed on top of the base image: regions equal to
    /// the base are reported as [`RegionKind::Inherited`].
    Overlay,
}

/// What a region of a stored volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    /// Data (may still contain zero bytes).
    Data,
    /// Reads as zeroes.
    Zero,
    /// Overlay layer only: same as the base image.
    Inherited,
}

/// A region of a stored volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Where.
    pub extent: Extent,
    /// What it holds.
    pub kind: RegionKind,
}

/// Random access to one stored volume (restore, NBD serving, verify).
#[async_trait]
pub trait VolumeReader: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read `length` bytes at `offset` (inside the volume).
    async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes>;
    /// The regions covering `offset..offset+length`, in order, adjacent
    /// regions of one kind merged.
    async fn regions(&self, offset: u64, length: u64) -> Result<Vec<Region>>;
}

/// Read access to one finished snapshot.
#[async_trait]
pub trait SnapshotReader: Send + Sync {
    /// What it holds.
    fn info(&self) -> &SnapshotInfo;
    /// A configuration blob.
    async fn config(&self, kind: ConfigKind) -> Result<Option<ConfigBlob>>;
    /// The provider's metadata (`Null` when none was stored).
    async fn metadata(&self) -> Result<PlatformMetadata>;
    /// Open a volume in one of its layers (`Base` and `Overlay` only for
    /// linked volumes).
    async fn open_volume(&self, device: &str, layer: Layer) -> Result<Arc<dyn VolumeReader>>;
    /// Names of the file archives the snapshot holds.
    fn file_archives(&self) -> Vec<String> {
        Vec::new()
    }
    /// Open a file archive (see [`crate::files`]).
    async fn open_file_archive(&self, name: &str) -> Result<Arc<dyn FileArchiveReader>> {
        Err(crate::Error::not_found(format!(
            "snapshot {} has no file archive {name}",
            self.info().id
        )))
    }
}

/// Whether the target already holds a base image, so that a provider reads
/// it from the platform only when needed.
#[async_trait]
pub trait BaseImageCatalog: Send + Sync {
    /// True when the base image is stored and intact.
    async fn has_base_image(&self, id: &BaseImageId) -> Result<bool>;
}

/// Where snapshots go. The `datastore` crate is the default implementation;
/// an embedder can bring its own.
#[async_trait]
pub trait Target: Send + Sync {
    /// Start a snapshot.
    async fn begin_snapshot(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWriter>>;
    /// Finished snapshots, oldest first, optionally of one platform/guest.
    async fn list_snapshots(
        &self,
        platform: Option<&str>,
        guest: Option<&GuestId>,
    ) -> Result<Vec<SnapshotInfo>>;
    /// Open a finished snapshot.
    async fn open_snapshot(&self, id: &SnapshotId) -> Result<Box<dyn SnapshotReader>>;
    /// The base images of one platform.
    fn base_images(&self, platform: &str) -> Arc<dyn BaseImageCatalog>;
}

/// Helpers on any [`Target`].
#[async_trait]
pub trait TargetExt: Target {
    /// The newest finished snapshot of a guest that may serve as an
    /// incremental base (not failed verification).
    async fn latest_good_snapshot(
        &self,
        platform: &str,
        guest: &GuestId,
    ) -> Result<Option<SnapshotInfo>> {
        let list = self.list_snapshots(Some(platform), Some(guest)).await?;
        Ok(list.into_iter().rev().find(|s| s.verified != Some(false)))
    }
}

impl<T: Target + ?Sized> TargetExt for T {}
