//! The data mover's interface: copying one volume between a snapshot
//! access and a target, in either direction.
//!
//! The driver decides *what* to copy (which regions, from which starting
//! point); a mover decides *how*: several reads in flight, hashing and
//! compression on a bounded pool (inside the target's writer), bounded
//! memory whatever the disk size.

use std::sync::Arc;

use async_trait::async_trait;
use provider_api::{DirtySource, Result, SnapshotAccess, VolumeReader, VolumeStats, VolumeWriter};

/// Progress of one volume, reported as the copy goes.
pub trait Progress: Send + Sync {
    /// `done` of `total` bytes of `device` are copied.
    fn update(&self, device: &str, done: u64, total: u64);
}

/// A progress sink that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _device: &str, _done: u64, _total: u64) {}
}

/// One volume to back up.
pub struct BackupCopy {
    /// Device name (for errors and progress).
    pub device: String,
    /// Volume size in bytes.
    pub size: u64,
    /// How to read it.
    pub access: SnapshotAccess,
    /// Which regions to read: [`DirtySource::All`] reads everything the
    /// source reports allocated (holes become zeroes without being read).
    pub dirty: DirtySource,
    /// Where to write; unwritten regions keep the writer's starting point.
    pub writer: Box<dyn VolumeWriter>,
}

/// Statistics of a backup copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of holes or zeroes recorded without reading.
    pub bytes_zero: u64,
    /// What the target reported.
    pub target: VolumeStats,
}

/// Moves volume data. Implementations live with the data path (NBD, file
/// handles); the driver only depends on this trait.
#[async_trait]
pub trait DataMover: Send + Sync {
    /// Copy the selected regions of a snapshot access into a target writer
    /// and finish it.
    async fn backup_volume(&self, copy: BackupCopy, progress: &dyn Progress) -> Result<CopyStats>;

    /// Write a stored volume (one layer of it) into a destination the
    /// provider opened. Regions of kind `Inherited` are not written; zero
    /// regions are written as zeroes only where the destination may hold
    /// data. Returns the bytes written.
    async fn restore_volume(
        &self,
        device: &str,
        source: Arc<dyn VolumeReader>,
        destination: &SnapshotAccess,
        progress: &dyn Progress,
    ) -> Result<u64>;
}

/// Serves stored volumes to providers as qemu-img-readable sources (an NBD
/// URI, or an HTTP URL for [`HttpExposer`](crate::HttpExposer)), for as
/// long as the returned guard lives.
#[async_trait]
pub trait SourceExposer: Send + Sync {
    /// Expose `reader` under a name; returns the URI and a guard that
    /// withdraws it when dropped.
    async fn expose(
        &self,
        name: &str,
        reader: Arc<dyn VolumeReader>,
    ) -> Result<(String, Box<dyn Send + Sync>)>;
}
