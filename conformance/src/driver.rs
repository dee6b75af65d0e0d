//! The platform driver: what a vendor implements so that the kit can play
//! the guest and the platform operator.
//!
//! The kit never talks to a platform directly. It creates guests, writes
//! into their disks, grows a disk and asks what the platform still holds
//! through this trait; everything else goes through the provider under
//! test, driven by the `engine` exactly as a host drives it.

use async_trait::async_trait;
use provider_api::{Guest, Result};

/// One volume of a guest as the platform (and the provider) names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverVolume {
    /// The device name the provider uses for this volume in
    /// [`provider_api::Volume::device`].
    pub device: String,
    /// Size in bytes.
    pub size: u64,
}

/// A platform under test, seen as its operator and its guests see it.
///
/// Implementations talk to the platform's own admin side (the mock
/// hypervisor's admin API, a lab's management tools), never to the
/// provider under test.
#[async_trait]
pub trait PlatformDriver: Send + Sync {
    /// Create a fresh guest with one volume per entry of `sizes` (bytes,
    /// in this order; the platform may round sizes up to its granularity,
    /// [`PlatformDriver::volumes`] reports the real ones). The volumes'
    /// initial content is the platform's choice (zeroes, a pattern, a
    /// shared base image); the kit reads it back before comparing.
    async fn create_guest(&self, name: &str, sizes: &[u64]) -> Result<Guest>;

    /// The guest's volumes in the platform's order, with the device names
    /// the provider will expose. For a guest created by a restore, the
    /// devices are listed in the same order as the original's.
    async fn volumes(&self, guest: &Guest) -> Result<Vec<DriverVolume>>;

    /// The guest writes `data` at `offset` of its volume `device` (as the
    /// guest OS would: change tracking sees it).
    async fn write(&self, guest: &Guest, device: &str, offset: u64, data: &[u8]) -> Result<()>;

    /// The whole current content of the guest's volume `device`, read on
    /// the platform side (not through the provider).
    async fn read(&self, guest: &Guest, device: &str) -> Result<Vec<u8>>;

    /// Grow the guest's volume `device` to `new_size` bytes (the new part
    /// reads as zeroes).
    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> Result<()>;

    /// Objects a backup or restore may leave behind that still exist
    /// (snapshots, attachments, transfers, leases, temporary images,
    /// exports), each described in one line. Empty when clean.
    async fn leftovers(&self) -> Result<Vec<String>>;

    /// Remove a guest the kit created or restored (and its disks), so that
    /// runs do not accumulate guests. Guests the platform cannot remove
    /// may stay; the kit does not check.
    async fn remove_guest(&self, guest: &Guest) -> Result<()>;

    /// Granularity in bytes of the platform's change tracking (a qemu
    /// dirty bitmap's granularity, a CBT block). The kit accepts
    /// incremental reads of whole tracking blocks around each write and
    /// refuses reads beyond them.
    fn tracking_granularity(&self) -> u64;

    /// The most volumes a guest of this platform can have; the kit creates
    /// guests with at most this many (default 16: no practical limit).
    /// Platforms whose guests have a single disk answer 1.
    fn max_volumes(&self) -> usize {
        16
    }
}
