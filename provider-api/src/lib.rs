//! # provider-api: the backup provider contract
//!
//! The crate every platform adapter (a *provider*) and every repository (a
//! *target*) depends on, and nothing more: no HTTP client, no NBD
//! implementation. It holds
//!
//! - [`BackupProvider`]: the Proxmox VE backup provider lifecycle
//!   (`job_init`, `backup_init`, `backup_get_mechanism`,
//!   `backup_vm_query_incremental`, `backup_vm`, `backup_cleanup`, ...,
//!   `restore_vm_init`, ..., `job_cleanup`) seen from a platform adapter;
//! - [`Target`]: where a host writes snapshots and reads them back;
//! - the domain types ([`Guest`], [`Volume`], [`SnapshotAccess`],
//!   [`Checkpoint`], [`BaseImageId`], ...);
//! - [`Error`], the error type with a kind, context and retry hint;
//! - with the `testing` feature, a conformance kit (module `testing`) that
//!   every provider's tests run.
//!
//! ## The transaction
//!
//! ```text
//! job_init ─┬─ per guest: backup_init → backup_get_mechanism
//!           │     → backup_vm_query_incremental → backup_vm
//!           │     → (host copies each volume into the target)
//!           │     → backup_cleanup(outcome) → backup_handle_log_file
//!           └─ job_cleanup            (always, even when job_init failed)
//!
//! restore_get_mechanism → archive_get_guest_config / _firewall_config
//!   → restore_vm_init → per volume: restore_vm_volume_init
//!   → (host writes the layers) → restore_vm_volume_cleanup
//!   → restore_vm_cleanup              (cleanups always run)
//! ```
//!
//! The host (the `engine` crate of this workspace, or an embedder's own)
//! enforces the cleanup guarantees; a provider only has to release what it
//! holds when its cleanup is called.
//!
//! ## Optional abilities
//!
//! [`Capabilities`] says what a provider offers beyond VM backup and
//! restore. Containers are a typed capability: a provider that offers
//! them implements [`ContainerProvider`] and returns it from
//! [`BackupProvider::containers`] (`None` by default), and the host asks
//! before any container call. A provider without change tracking returns an
//! empty [`IncrementalPlan`]: every volume is then read in full.
//!
//! ## Example: a small provider
//!
//! A provider that exposes one raw file per VM and supports nothing
//! optional:
//!
//! ```
//! use std::path::PathBuf;
//! use async_trait::async_trait;
//! use provider_api::*;
//!
//! struct FileProvider { dir: PathBuf }
//!
//! #[async_trait]
//! impl BackupProvider for FileProvider {
//!     fn provider_name(&self) -> &str { "files" }
//!     fn capabilities(&self) -> Capabilities { Capabilities::default() }
//!     async fn job_init(&self, _job: &JobInfo) -> Result<()> { Ok(()) }
//!     async fn job_cleanup(&self) -> Result<()> { Ok(()) }
//!     async fn backup_init(&self, guest: &Guest, time: i64) -> Result<ArchiveName> {
//!         ArchiveName::new(format!("vm/{}/{time}", guest.id))
//!     }
//!     async fn backup_get_mechanism(&self, _g: &Guest) -> Result<BackupMechanism> {
//!         Ok(BackupMechanism::FileHandle)
//!     }
//!     async fn backup_vm_query_incremental(
//!         &self, _g: &Guest, _prev: Option<&PreviousBackup>,
//!     ) -> Result<IncrementalPlan> {
//!         Ok(IncrementalPlan::new()) // no change tracking: always full
//!     }
//!     async fn backup_vm(&self, guest: &Guest, _req: BackupVmRequest) -> Result<VmBackup> {
//!         let path = self.dir.join(format!("{}.raw", guest.id));
//!         let size = std::fs::metadata(&path)
//!             .map_err(|e| Error::not_found("disk image missing").guest(&guest.id).with_source(e))?
//!             .len();
//!         // Read in full (bitmap mode `None`), no checkpoint, no base image.
//!         let volume = VolumeAccess::new(
//!             Volume { device: "disk0".into(), size, format: VolumeFormat::Raw },
//!             SnapshotAccess::FileHandle(FileAccess::new(path)),
//!         );
//!         let config = ConfigBlob::json(&serde_json::json!({"name": guest.id.0}));
//!         Ok(VmBackup::new(config, vec![volume]))
//!     }
//!     async fn backup_cleanup(&self, _g: &Guest, _o: &Outcome) -> Result<BackupStats> {
//!         Ok(BackupStats::default())
//!     }
//!     async fn restore_vm_init(&self, req: &RestoreVmRequest) -> Result<Guest> {
//!         match &req.target {
//!             RestoreTarget::NewGuest { name } => {
//!                 Ok(Guest::vm(name.clone().unwrap_or_else(|| "restored".into())))
//!             }
//!             // In place, and any target added to the contract later.
//!             other => Err(Error::unsupported(format!("restore target {other:?}"))),
//!         }
//!     }
//!     async fn restore_vm_volume_init(&self, req: &RestoreVolumeRequest) -> Result<VolumeImport> {
//!         // One file per volume: never name a restored file after the guest alone.
//!         let path = self.dir.join(format!("{}-{}.raw", req.guest.id, req.volume.volume.device));
//!         std::fs::File::create(&path)?.set_len(req.volume.volume.size)?;
//!         Ok(VolumeImport::merged_into(SnapshotAccess::FileHandle(FileAccess::new(path))))
//!     }
//!     async fn restore_vm_volume_cleanup(&self, _g: &Guest, _d: &str, _o: &Outcome) -> Result<()> {
//!         Ok(())
//!     }
//!     async fn restore_vm_cleanup(&self, _g: &Guest, _o: &Outcome) -> Result<()> { Ok(()) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let dir = std::env::temp_dir().join(format!("provider-api-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! std::fs::write(dir.join("vm1.raw"), vec![7u8; 4096]).unwrap();
//! let provider: std::sync::Arc<dyn BackupProvider> = std::sync::Arc::new(FileProvider { dir: dir.clone() });
//! let guest = Guest::vm("vm1");
//! let archive = provider.backup_init(&guest, 1_700_000_000).await.unwrap();
//! assert_eq!(archive.as_str(), "vm/vm1/1700000000");
//! assert!(!provider.capabilities().containers);
//! assert!(provider.containers().is_none());
//! std::fs::remove_dir_all(dir).unwrap();
//! # }
//! ```

pub mod access;
pub mod error;
pub mod files;
pub mod provider;
pub mod spec;
pub mod target;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;

pub use access::{
    AccessScope, BaseLayer, DirtyRegions, DirtySource, FileAccess, NbdAccess, NbdAddress,
    RegionList, SnapshotAccess, TlsSettings, VmBackup, VolumeAccess, WholeVolume,
};
/// The buffer type of [`VolumeReader::read_at`], re-exported so that an
/// implementor (a test double wrapping a reader) needs no `bytes` of its own.
pub use bytes::Bytes;
pub use error::{Context, Error, ErrorKind, Result};
pub use files::{ArchiveStats, FileArchiveReader, FileArchiveWriter, FileEntry, FileKind, IdMap};
pub use provider::{
    ArchiveView, BackupMechanism, BackupProvider, BackupVmRequest, Capabilities, ContainerBackup,
    ContainerProvider, ContainerRestore, IncrementalPlan, LayerWrite, Outcome, PreviousBackup,
    RestoreContainerRequest, RestoreMechanism, RestoreSourceKind, RestoreSources, RestoreTarget,
    RestoreVmRequest, RestoreVolumeRequest, RestoreWarnings, VolumeImport,
};
pub use spec::GuestSpec;
pub use target::{
    BaseImageCatalog, ConfigKind, Layer, Region, RegionKind, SnapshotId, SnapshotInfo,
    SnapshotReader, SnapshotSpec, SnapshotWriter, StartFrom, StoredVolume, Target, TargetExt,
    VolumeReader, VolumeSpec, VolumeStats, VolumeWriter,
};
pub use types::{
    ArchiveName, BackupStats, BaseImageId, BitmapMode, Checkpoint, ConfigBlob, Extent, Guest,
    GuestId, GuestKind, JobInfo, JobMarker, PlatformMetadata, Volume, VolumeFormat, marker_safe,
};
