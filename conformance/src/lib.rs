//! # conformance: the data kit every provider runs
//!
//! A provider passes this kit when the host, driving it exactly as a
//! backup product does, gets back **the bytes the guest held** for every
//! snapshot, on every path: full, incremental, after a disk grew, restored
//! to a new guest and in place, two guests at once, and with a failure
//! injected at any step (cleanups run, nothing is published, nothing is
//! left on the platform, no change is lost for the next backup).
//!
//! The kit drives the provider with the workspace's reference host: the
//! `engine`'s [`BackupDriver`](engine::BackupDriver) and
//! [`RestoreDriver`](engine::RestoreDriver) with the
//! [`StandardMover`](engine::StandardMover), an
//! [`NbdExposer`](engine::NbdExposer) serving the stored volumes to
//! providers that pull, and an in-memory target
//! ([`provider_api::testing::memory::MemoryTarget`], wrapped so that the
//! kit sees every region written and can make a write fail). The lifecycle
//! rules of `provider_api::testing` (v1) run as one of the checks.
//!
//! ## 1. What a vendor implements: the platform driver
//!
//! The kit never talks to the platform directly. It plays the platform's
//! operator and the guests through a [`PlatformDriver`] that the vendor
//! writes against the platform's *admin* side (a lab's management API, the
//! mock hypervisor's admin API), never through the provider under test:
//!
//! - `create_guest(name, sizes)` / `remove_guest`: guests with volumes of
//!   the given sizes (the platform may round up; `volumes` reports the real
//!   sizes and the device names the provider uses);
//! - `write(guest, device, offset, data)`: the guest writes, as its OS
//!   would (change tracking must see it); `read(guest, device)`: the whole
//!   volume as the platform holds it;
//! - `grow(guest, device, size)`: the disk grows (the new tail reads as
//!   zeroes);
//! - `leftovers()`: every object a backup or restore may leave (snapshots,
//!   attachments, transfers, leases, exports, temporary images), one line
//!   each; empty when clean;
//! - `tracking_granularity()`: the size of one change-tracking block (a
//!   qemu dirty bitmap's granularity, a CBT block); `max_volumes()` when
//!   guests cannot have three disks.
//!
//! ## 2. How a provider's test calls the kit
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use conformance::{Check, DriverVolume, Kit, PlatformDriver};
//! use provider_api::{Guest, Result};
//! # mod lab {
//! #     use provider_api::Result;
//! #     pub struct Admin;
//! #     impl Admin {
//! #         pub async fn create_vm(&self, _n: &str, _s: &[u64]) -> Result<String> { Ok("vm-1".into()) }
//! #         pub async fn disks(&self, _vm: &str) -> Result<Vec<(String, u64)>> { Ok(vec![]) }
//! #         pub async fn guest_write(&self, _vm: &str, _d: &str, _o: u64, _b: &[u8]) -> Result<()> { Ok(()) }
//! #         pub async fn disk_content(&self, _vm: &str, _d: &str) -> Result<Vec<u8>> { Ok(vec![]) }
//! #         pub async fn resize(&self, _vm: &str, _d: &str, _s: u64) -> Result<()> { Ok(()) }
//! #         pub async fn backup_objects(&self) -> Result<Vec<String>> { Ok(vec![]) }
//! #         pub async fn delete_vm(&self, _vm: &str) -> Result<()> { Ok(()) }
//! #     }
//! #     pub fn my_provider() -> std::sync::Arc<dyn provider_api::BackupProvider> {
//! #         panic!("your provider's constructor goes here")
//! #     }
//! # }
//!
//! /// The lab as its operator sees it (`lab::Admin` is the platform's
//! /// admin client, not the provider under test).
//! struct LabDriver {
//!     admin: lab::Admin,
//! }
//!
//! #[async_trait]
//! impl PlatformDriver for LabDriver {
//!     async fn create_guest(&self, name: &str, sizes: &[u64]) -> Result<Guest> {
//!         Ok(Guest::vm(self.admin.create_vm(name, sizes).await?))
//!     }
//!     async fn volumes(&self, guest: &Guest) -> Result<Vec<DriverVolume>> {
//!         let disks = self.admin.disks(&guest.id.0).await?;
//!         Ok(disks.into_iter().map(|(device, size)| DriverVolume { device, size }).collect())
//!     }
//!     async fn write(&self, guest: &Guest, device: &str, offset: u64, data: &[u8]) -> Result<()> {
//!         self.admin.guest_write(&guest.id.0, device, offset, data).await
//!     }
//!     async fn read(&self, guest: &Guest, device: &str) -> Result<Vec<u8>> {
//!         self.admin.disk_content(&guest.id.0, device).await
//!     }
//!     async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> Result<()> {
//!         self.admin.resize(&guest.id.0, device, new_size).await
//!     }
//!     async fn leftovers(&self) -> Result<Vec<String>> {
//!         self.admin.backup_objects().await
//!     }
//!     async fn remove_guest(&self, guest: &Guest) -> Result<()> {
//!         self.admin.delete_vm(&guest.id.0).await
//!     }
//!     fn tracking_granularity(&self) -> u64 {
//!         64 * 1024
//!     }
//! }
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn conformance() {
//!     let kit = Kit::new(lab::my_provider(), Arc::new(LabDriver { admin: lab::Admin }))
//!         // A check the platform cannot pass yet, with the reason the
//!         // report prints:
//!         .skip(Check::MultiGuest, "the lab has room for one guest only (issue 34)");
//!     match kit.run_all().await {
//!         Ok(report) => println!("{report}"),
//!         Err(failure) => panic!("{}{failure}", failure.before),
//!     }
//! }
//!
//! // Or one check per test, so that they show separately:
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn round_trip() {
//!     let kit = Kit::new(lab::my_provider(), Arc::new(LabDriver { admin: lab::Admin }));
//!     let report = kit.round_trip().await.unwrap_or_else(|f| panic!("{f}"));
//!     println!("{report}");
//! }
//! # fn main() {}
//! ```
//!
//! Give every kit run a platform of its own (one mock hypervisor per test,
//! or one lab per CI job): the kit checks that the *whole* platform is
//! clean before and after each check, so two kits sharing a platform see
//! each other's objects. Volumes are a few MiB (see
//! [`DEFAULT_VOLUME_SIZES`]); the whole kit takes seconds per provider.
//!
//! ## 3. The checks
//!
//! Each check creates its own guests, works on a fresh target, removes its
//! guests at the end and requires `driver.leftovers()` to be empty before
//! it starts, after every backup and restore, and at its end.
//!
//! | check | what it does |
//! |---|---|
//! | [`Check::Lifecycle`] | runs `provider_api::testing::check_all` (call order, cleanups on failure paths, bitmap-mode answers) on a one-volume guest |
//! | [`Check::CapabilityHonesty`] | two backups: `incremental` claimed ⇒ the second uses `Use` for some volume, denied ⇒ for none; `containers` denied ⇒ every container method and `restore_get_mechanism(Container)` answer `Unsupported`; `restore_in_place` claimed ⇒ an in-place restore over guest writes brings the snapshot's bytes back, denied ⇒ it answers `Unsupported` (nothing else) and the guest is untouched |
//! | [`Check::RoundTrip`] | a guest with three volumes of sizes that are not multiples of each other (one not a multiple of 4 MiB); full backup; guest writes on the first and last byte of each volume, across every 4 MiB boundary and into a hole; incremental; one disk grown by 4 MiB and written at its new tail; backup. Every snapshot's stored bytes are compared with what the driver read right before it was taken, then every snapshot is restored to a new guest and compared. Where `restore_in_place` is claimed: guest writes, backup, snapshot 3 restored in place and compared, guest writes, backup (change tracking must have seen the in-place restore), both restored and compared |
//! | [`Check::IncrementalReads`] | (needs `incremental`) full, guest writes, incremental: every volume that had a checkpoint uses `Use`; every region the host wrote into the target for such a volume lies inside the guest's writes expanded to `tracking_granularity()` (an incremental that read everything fails here); every guest write is covered |
//! | [`Check::MultiGuest`] | two guests in one job with parallelism 2, full and incremental; all four snapshots compared and restored |
//! | [`Check::RestoreCleanups`] | a restore to a new guest: `restore_vm_volume_init` and `restore_vm_volume_cleanup(success)` for every volume, one `restore_vm_cleanup(success)` last, nothing left on the platform |
//! | [`Check::FailureInjection`] | a failure after the provider's own successful `job_init`, `backup_init`, `backup_get_mechanism`, `backup_vm_query_incremental`, `backup_vm`, in the copy (the target's writer), after `backup_cleanup(success)`, and in publishing: each time the job fails, `job_cleanup` runs once, the guest's last cleanup is `backup_cleanup(failure)`, no snapshot is published, nothing is left; guest writes made before each failed backup must all be in the next good one. Then a failure after `restore_vm_volume_init`, in the restore copy (a read of the stored volume), and after `restore_vm_volume_cleanup`: the restore fails, every started volume gets its cleanup, `restore_vm_cleanup(failure)` runs, nothing is left; a clean restore follows |
//!
//! The bound of [`Check::IncrementalReads`]: the engine's mover reads
//! exactly the dirty regions the provider reports (split at 4 MiB piece
//! boundaries, never widened) and writes what it read into the target;
//! merging a partly dirty chunk with the previous snapshot's is the
//! datastore's business, behind the target interface. So the honest bound
//! is the guest's writes expanded to the tracking granularity, not to
//! chunks.
//!
//! ## 4. Skipping a check
//!
//! [`Kit::skip`] takes the check and a reason; the [`Report`] lists the
//! check as skipped with that reason. The kit itself skips
//! [`Check::IncrementalReads`] when `capabilities().incremental` is false,
//! and notes the parts of other checks a denied capability turns off
//! (in-place restore). A platform whose guests have one disk says so with
//! [`PlatformDriver::max_volumes`] instead of skipping.
//!
//! ## 5. Reading a failure
//!
//! A [`Failure`] names the check, the guest, the volume, the offset and
//! what differs, e.g.
//!
//! ```text
//! conformance check `round-trip` failed (guest kit41-rt-1, volume disk0, offset 0): restore of
//! snapshot 1 (full backup) to a new guest: the restored volume differs from what the guest held
//! at backup time: size differs: expected 5246976 bytes, found 12582912 ...
//! ```

mod checks;
mod containers;
mod content;
pub mod driver;
mod kit;
mod recorder;
pub mod report;
mod target;

pub use containers::{ContainerDriver, ContainerKit};
pub use driver::{DriverVolume, PlatformDriver};
pub use kit::{DEFAULT_VOLUME_SIZES, Kit};
pub use report::{Check, CheckReport, Failure, Report, Status};
