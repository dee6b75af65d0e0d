//! Platform-neutral disk model: base images, virtual disks with overlays,
//! copy-on-write snapshots, change tracking, and the store that owns them.
//!
//! Every platform front end (SCP now; oVirt and ZStack later) maps its own
//! objects onto these: a platform disk is a [`VirtualDisk`], a platform
//! image/template is a [`BaseImage`], a platform snapshot freezes
//! [`VirtualDisk`]s through [`VirtualDisk::create_snapshot`].

pub mod base_image;
pub mod bitmap;
pub mod layer;
pub mod pattern;
pub mod store;
pub mod transfer;
pub mod virtual_disk;

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error;

pub use base_image::BaseImage;
pub use bitmap::{BlockBitmap, Run};
pub use pattern::Pattern;
pub use store::DiskStore;
pub use virtual_disk::{Checkpoint, View, VirtualDisk};

/// Granularity of allocation maps, change tracking and copy-on-write: 64 KiB.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// Largest disk or base image the mock accepts: 1 TiB (metadata is kept in
/// memory and rewritten as JSON, one bit per block).
pub const MAX_DISK_SIZE: u64 = 1 << 40;

/// Checks a requested disk or image size.
pub fn check_size(size: u64) -> error::Result<()> {
    if size == 0 || size > MAX_DISK_SIZE {
        return Err(error::Error::Invalid(format!(
            "size {size} must be between 1 byte and {MAX_DISK_SIZE} bytes"
        )));
    }
    Ok(())
}

/// Read-locks, recovering from poisoning (a panicked holder cannot leave a
/// block half-written in memory: all state changes are whole assignments).
pub(crate) fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks, recovering from poisoning.
pub(crate) fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Locks a mutex, recovering from poisoning (as [`read_lock`]).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lower-case hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests;
