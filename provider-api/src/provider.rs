//! The provider trait: the Proxmox VE backup provider lifecycle, seen from
//! a platform adapter.
//!
//! Roles follow `DESIGN.md`: the *host* (the embedding backup product, or
//! the workspace's `engine`) drives the transaction and owns the target;
//! the *provider* talks to one platform. During backup the provider exposes
//! snapshot access to each volume and keeps it valid until
//! [`BackupProvider::backup_cleanup`]; during restore it says what it
//! consumes and imports data the host exposes.
//!
//! The host calls a provider for several guests at once, so every method
//! takes `&self`; a provider keeps per-guest state behind its own lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::access::{SnapshotAccess, VmBackup};
use crate::error::{Error, Result};
use crate::target::{BaseImageCatalog, Layer, SnapshotInfo, StoredVolume};
use crate::types::{
    ArchiveName, BackupStats, BitmapMode, ConfigBlob, Guest, GuestKind, JobInfo, PlatformMetadata,
};

/// Optional abilities of a provider. The host checks them before it calls
/// an optional method; a provider that lacks one also answers such a call
/// with [`crate::ErrorKind::Unsupported`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Container backup and restore.
    pub containers: bool,
    /// Incremental backups through change tracking.
    pub incremental: bool,
    /// Snapshot access as a hot-added disk (file handle) besides NBD.
    pub hot_add: bool,
    /// Restore over the original guest.
    pub restore_in_place: bool,
}

impl Capabilities {
    /// Nothing beyond VM backup and restore.
    pub fn none() -> Self {
        Capabilities::default()
    }

    /// With or without container backup and restore.
    pub fn containers(mut self, yes: bool) -> Self {
        self.containers = yes;
        self
    }

    /// With or without incremental backups.
    pub fn incremental(mut self, yes: bool) -> Self {
        self.incremental = yes;
        self
    }

    /// With or without hot-add access.
    pub fn hot_add(mut self, yes: bool) -> Self {
        self.hot_add = yes;
        self
    }

    /// With or without restore in place.
    pub fn restore_in_place(mut self, yes: bool) -> Self {
        self.restore_in_place = yes;
        self
    }
}

/// How a guest's data is exposed during backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BackupMechanism {
    /// VM volumes as NBD exports.
    Nbd,
    /// VM volumes as readable files with a dirty-region iterator.
    FileHandle,
    /// A container's filesystem as a directory.
    Directory,
}

/// How a guest's data is consumed during restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RestoreMechanism {
    /// VM volumes: the host gives qemu-img-readable sources (NBD URIs)
    /// and writes into destinations the provider returns.
    QemuImg,
    /// Container: a directory tree.
    Directory,
    /// Container: a tar archive.
    Tar,
}

/// Which kind of URL the host's restore sources ([`RestoreSources`]) are
/// for a [`RestoreMechanism::QemuImg`] restore, as the provider asks with
/// [`BackupProvider::restore_source_kind`].
///
/// `Nbd` (the default) suits a provider that reads the sources itself or
/// hands them to a `qemu-img` on the backup host. `Http` suits a platform
/// that pulls the data over the network from somewhere else (ZStack's
/// AddImage is fetched by its backup storage host): the host then serves
/// each source over HTTP (ranged `GET`, `HEAD` with `Content-Length`) on
/// an address the platform can reach, under an unguessable one-time path
/// withdrawn when the volume's restore ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RestoreSourceKind {
    /// `nbd://HOST:PORT/EXPORT` URIs.
    #[default]
    Nbd,
    /// `http(s)://…` URLs.
    Http,
}

/// The previous backup of a guest, as the host's target holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PreviousBackup {
    /// The snapshot.
    pub snapshot: SnapshotInfo,
    /// The provider's metadata stored with it.
    pub metadata: PlatformMetadata,
}

impl PreviousBackup {
    /// The previous backup `snapshot` with its `metadata`.
    pub fn new(snapshot: SnapshotInfo, metadata: PlatformMetadata) -> Self {
        PreviousBackup { snapshot, metadata }
    }

    /// Whether an incremental of `device` (now `size` bytes) can start from
    /// this backup: it holds the device, at the same size, with a
    /// checkpoint (bitmap mode other than `None`).
    pub fn usable_for(&self, device: &str, size: u64) -> std::result::Result<(), &'static str> {
        match self.snapshot.volume(device) {
            None => Err("no previous backup of this volume"),
            Some(v) if v.volume.size != size => Err("previous backup has another size"),
            Some(v) if v.bitmap_mode == BitmapMode::None => {
                Err("previous backup has no checkpoint")
            }
            Some(_) => Ok(()),
        }
    }
}

/// Per-volume answer of `backup_vm_query_incremental`, keyed by device name.
/// Volumes not listed get [`BitmapMode::None`].
pub type IncrementalPlan = BTreeMap<String, BitmapMode>;

/// Everything `backup_vm` gets.
#[derive(Clone)]
#[non_exhaustive]
pub struct BackupVmRequest {
    /// The plan the host settled on (the provider's answer, checked).
    pub plan: IncrementalPlan,
    /// The previous backup, when the host has a usable one.
    pub previous: Option<PreviousBackup>,
    /// Which base images the target already holds.
    pub base_images: Arc<dyn BaseImageCatalog>,
}

impl std::fmt::Debug for BackupVmRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupVmRequest")
            .field("plan", &self.plan)
            .field("previous", &self.previous.as_ref().map(|p| &p.snapshot.id))
            .finish_non_exhaustive()
    }
}

impl BackupVmRequest {
    /// A request with the host's `plan`, the `previous` backup and the
    /// target's base images.
    pub fn new(
        plan: IncrementalPlan,
        previous: Option<PreviousBackup>,
        base_images: Arc<dyn BaseImageCatalog>,
    ) -> Self {
        BackupVmRequest {
            plan,
            previous,
            base_images,
        }
    }

    /// The mode for one device (`None` when the plan leaves it out).
    pub fn mode(&self, device: &str) -> BitmapMode {
        self.plan.get(device).copied().unwrap_or(BitmapMode::None)
    }

    /// The bitmap mode the host *will* use for `device` (now `size`
    /// bytes) when the provider exposes it with bitmap mode `provided`:
    /// `None` when the plan leaves it out or either side says `None`;
    /// `New` when either says `New`; `Use` only when the previous backup
    /// is usable for it ([`PreviousBackup::usable_for`]), `New` otherwise.
    /// A provider that stages data calls this before deciding what to
    /// stage: under `New` and `None` the host reads the whole volume.
    pub fn host_mode(&self, device: &str, size: u64, provided: BitmapMode) -> BitmapMode {
        self.host_mode_why(device, size, provided).0
    }

    /// [`host_mode`](Self::host_mode) with the reason when the host turns
    /// a `Use` into `New`.
    pub fn host_mode_why(
        &self,
        device: &str,
        size: u64,
        provided: BitmapMode,
    ) -> (BitmapMode, Option<&'static str>) {
        let Some(&planned) = self.plan.get(device) else {
            return (BitmapMode::None, None);
        };
        match (planned, provided) {
            (BitmapMode::None, _) | (_, BitmapMode::None) => (BitmapMode::None, None),
            (_, BitmapMode::New) | (BitmapMode::New, _) => (BitmapMode::New, None),
            (BitmapMode::Use, BitmapMode::Use) => match &self.previous {
                None => (BitmapMode::New, Some("no previous backup of this volume")),
                Some(p) => match p.usable_for(device, size) {
                    Ok(()) => (BitmapMode::Use, None),
                    Err(why) => (BitmapMode::New, Some(why)),
                },
            },
        }
    }
}

/// A container's filesystem exposed for backup.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContainerBackup {
    /// Guest configuration.
    pub guest_config: ConfigBlob,
    /// Firewall configuration.
    pub firewall_config: Option<ConfigBlob>,
    /// Metadata for restore.
    pub metadata: PlatformMetadata,
    /// The filesystem tree.
    pub directory: PathBuf,
    /// Owner id mapping of an unprivileged container: the tree's host ids
    /// are stored as the container sees them.
    pub id_map: Option<crate::files::IdMap>,
}

impl ContainerBackup {
    /// The tree at `directory` with its configuration.
    pub fn new(guest_config: ConfigBlob, directory: PathBuf) -> Self {
        ContainerBackup {
            guest_config,
            firewall_config: None,
            metadata: PlatformMetadata::Null,
            directory,
            id_map: None,
        }
    }

    /// With an owner id mapping.
    pub fn with_id_map(mut self, id_map: crate::files::IdMap) -> Self {
        self.id_map = Some(id_map);
        self
    }
}

/// How a guest's backup or restore ended, for cleanups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Everything succeeded.
    Success,
    /// Something failed.
    Failed {
        /// The error's full report.
        error: String,
    },
}

impl Outcome {
    /// Success.
    pub fn ok() -> Self {
        Outcome::Success
    }

    /// Failure with the error's full report.
    pub fn failed(error: &Error) -> Self {
        Outcome::Failed {
            error: error.report(),
        }
    }

    /// Failure described by `error`.
    pub fn failed_with(error: impl Into<String>) -> Self {
        Outcome::Failed {
            error: error.into(),
        }
    }

    /// True on success.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }

    /// The error text of a failure.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Success => None,
            Outcome::Failed { error } => Some(error),
        }
    }
}

/// What the host read from the archive for a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArchiveView {
    /// The snapshot.
    pub snapshot: SnapshotInfo,
    /// Stored guest configuration.
    pub guest_config: Option<ConfigBlob>,
    /// Stored firewall configuration.
    pub firewall_config: Option<ConfigBlob>,
    /// Stored provider metadata.
    pub metadata: PlatformMetadata,
    /// The platform-neutral guest spec stored beside the platform's
    /// configuration ([`ConfigKind::Spec`](crate::ConfigKind)), if any.
    pub spec: Option<ConfigBlob>,
}

impl ArchiveView {
    /// Whether the snapshot was taken on another platform than
    /// `provider` (or imported): its metadata and configuration are then
    /// not that provider's, only its [`ArchiveView::guest_spec`] is.
    pub fn is_foreign_to(&self, provider: &str) -> bool {
        self.snapshot.platform != provider
    }

    /// The platform-neutral description of the guest, when the snapshot
    /// holds one: the spec a platform backup stored beside its own
    /// configuration, or the configuration itself when it is a spec
    /// (imported appliances). `None` when it holds none; an error when it
    /// does and it does not parse.
    pub fn guest_spec(&self) -> Result<Option<crate::GuestSpec>> {
        self.spec
            .as_ref()
            .and_then(crate::GuestSpec::from_config)
            .or_else(|| {
                self.guest_config
                    .as_ref()
                    .and_then(crate::GuestSpec::from_config)
            })
            .transpose()
            .map_err(|e| {
                Error::new(
                    crate::ErrorKind::Corrupt,
                    format!(
                        "the guest spec stored with snapshot {} does not parse",
                        self.snapshot.id
                    ),
                )
                .with_source(e)
            })
    }

    /// [`ArchiveView::guest_spec`] for a restore onto another platform
    /// than the snapshot's: an error naming the snapshot and its platform
    /// when it holds none.
    pub fn foreign_guest_spec(&self) -> Result<crate::GuestSpec> {
        self.guest_spec()?.ok_or_else(|| {
            Error::invalid(format!(
                "snapshot {} was taken on platform {} and holds no platform-neutral guest spec: \
                 it restores onto {} only (or into raw files with restore --to)",
                self.snapshot.id, self.snapshot.platform, self.snapshot.platform
            ))
        })
    }

    /// The view of `snapshot` with what the target holds for it.
    pub fn new(
        snapshot: SnapshotInfo,
        guest_config: Option<ConfigBlob>,
        firewall_config: Option<ConfigBlob>,
        metadata: PlatformMetadata,
    ) -> Self {
        ArchiveView {
            snapshot,
            guest_config,
            firewall_config,
            metadata,
            spec: None,
        }
    }

    /// With the stored platform-neutral spec.
    pub fn with_spec(mut self, spec: Option<ConfigBlob>) -> Self {
        self.spec = spec;
        self
    }
}

/// Where a restore goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RestoreTarget {
    /// A new guest; the name is a hint (the provider may add a suffix).
    NewGuest {
        /// Name for the new guest.
        name: Option<String>,
    },
    /// Overwrite the original guest (needs
    /// [`Capabilities::restore_in_place`]).
    InPlace,
}

/// A restore of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreVmRequest {
    /// What is restored.
    pub archive: ArchiveView,
    /// Where to.
    pub target: RestoreTarget,
    /// The configuration to apply (from `archive_get_guest_config`).
    pub guest_config: ConfigBlob,
    /// The firewall configuration to apply (from
    /// `archive_get_firewall_config`).
    pub firewall_config: Option<ConfigBlob>,
    /// What the provider could not carry over ([`RestoreVmRequest::warn`]):
    /// the host reports them with the restore.
    pub warnings: RestoreWarnings,
}

/// Warnings a provider gives while restoring (configuration it could not
/// map onto its platform, defaults it assumed). Shared: clones of a
/// request see the same list.
#[derive(Debug, Clone, Default)]
pub struct RestoreWarnings(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl RestoreWarnings {
    /// Adds one.
    pub fn push(&self, warning: impl Into<String>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(warning.into());
    }

    /// Everything given so far.
    pub fn list(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl PartialEq for RestoreWarnings {
    fn eq(&self, other: &Self) -> bool {
        self.list() == other.list()
    }
}

impl Eq for RestoreWarnings {}

impl RestoreVmRequest {
    /// Records a warning for the restore report (the host logs it).
    pub fn warn(&self, warning: impl Into<String>) {
        self.warnings.push(warning);
    }

    /// Restore `archive` to `target` with these configurations.
    pub fn new(
        archive: ArchiveView,
        target: RestoreTarget,
        guest_config: ConfigBlob,
        firewall_config: Option<ConfigBlob>,
    ) -> Self {
        RestoreVmRequest {
            archive,
            target,
            guest_config,
            firewall_config,
            warnings: RestoreWarnings::default(),
        }
    }
}

/// The host's sources for one volume, all readable by `qemu-img`: NBD
/// URIs, or HTTP URLs when the provider asks for them
/// ([`BackupProvider::restore_source_kind`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestoreSources {
    /// The volume as the guest saw it.
    pub merged: String,
    /// The base image only (linked volumes).
    pub base: Option<String>,
    /// Size of the base image.
    pub base_size: Option<u64>,
}

impl RestoreSources {
    /// The merged view at `merged`, no base layer.
    pub fn new(merged: impl Into<String>) -> Self {
        RestoreSources {
            merged: merged.into(),
            base: None,
            base_size: None,
        }
    }

    /// With the base image only at `uri`, `size` bytes.
    pub fn with_base(mut self, uri: impl Into<String>, size: u64) -> Self {
        self.base = Some(uri.into());
        self.base_size = Some(size);
        self
    }
}

/// One volume to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreVolumeRequest {
    /// The guest being restored (as `restore_vm_init` returned it).
    pub guest: Guest,
    /// The stored volume.
    pub volume: StoredVolume,
    /// Where the host offers its data.
    pub sources: RestoreSources,
}

impl RestoreVolumeRequest {
    /// Restore `volume` of the new `guest` from `sources`.
    pub fn new(guest: Guest, volume: StoredVolume, sources: RestoreSources) -> Self {
        RestoreVolumeRequest {
            guest,
            volume,
            sources,
        }
    }
}

/// One layer the host writes into a destination the provider opened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerWrite {
    /// Which view of the stored volume to write.
    pub layer: Layer,
    /// Where (a writable NBD export or file).
    pub destination: SnapshotAccess,
}

/// The provider's answer to `restore_vm_volume_init`: the writes the host
/// performs, in order. Empty when the provider pulled the data itself
/// from [`RestoreSources`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VolumeImport {
    /// Writes in order.
    pub writes: Vec<LayerWrite>,
}

impl LayerWrite {
    /// Write `layer` into `destination`.
    pub fn new(layer: Layer, destination: SnapshotAccess) -> Self {
        LayerWrite { layer, destination }
    }
}

impl VolumeImport {
    /// The host performs `writes`, in order.
    pub fn writes(writes: Vec<LayerWrite>) -> Self {
        VolumeImport { writes }
    }

    /// The host writes the merged volume into `destination`.
    pub fn merged_into(destination: SnapshotAccess) -> Self {
        VolumeImport::writes(vec![LayerWrite::new(Layer::Merged, destination)])
    }

    /// The provider pulled the data itself from the sources; the host
    /// writes nothing.
    pub fn pulled() -> Self {
        VolumeImport::default()
    }
}

/// A container restore.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreContainerRequest {
    /// What is restored.
    pub archive: ArchiveView,
    /// Where to.
    pub target: RestoreTarget,
    /// How the host hands over the tree (from
    /// [`BackupProvider::restore_get_mechanism`]).
    pub mechanism: RestoreMechanism,
}

impl RestoreContainerRequest {
    /// Restore `archive` to `target` through `mechanism`.
    pub fn new(archive: ArchiveView, target: RestoreTarget, mechanism: RestoreMechanism) -> Self {
        RestoreContainerRequest {
            archive,
            target,
            mechanism,
        }
    }
}

/// Where the host puts a container's tree, as the provider prepared it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContainerRestore {
    /// The guest being restored.
    pub guest: Guest,
    /// [`RestoreMechanism::Directory`]: an empty directory the host writes
    /// the tree into. [`RestoreMechanism::Tar`]: a path the host writes a
    /// tar stream to (a file, or a FIFO the provider reads from).
    pub destination: PathBuf,
    /// Owner id mapping to apply (unprivileged containers).
    pub id_map: Option<crate::files::IdMap>,
}

impl ContainerRestore {
    /// The host writes to `destination`.
    pub fn new(guest: Guest, destination: PathBuf) -> Self {
        ContainerRestore {
            guest,
            destination,
            id_map: None,
        }
    }

    /// With an owner id mapping.
    pub fn with_id_map(mut self, id_map: crate::files::IdMap) -> Self {
        self.id_map = Some(id_map);
        self
    }
}

/// A backup provider for one platform.
///
/// Required methods cover VM backup and restore; container and in-place
/// abilities answer [`crate::ErrorKind::Unsupported`] unless a provider
/// overrides them and says so in [`BackupProvider::capabilities`].
#[async_trait]
pub trait BackupProvider: Send + Sync {
    /// Provider (platform) name, e.g. `scp`; groups snapshots in targets.
    fn provider_name(&self) -> &str;

    /// Optional abilities.
    fn capabilities(&self) -> Capabilities;

    /// Start of a job: check the platform, log in.
    async fn job_init(&self, job: &JobInfo) -> Result<()>;

    /// End of a job: log out, release everything. Runs even when
    /// `job_init` failed.
    async fn job_cleanup(&self) -> Result<()>;

    /// Start of one guest's backup; returns the archive name.
    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName>;

    /// How the guest's data will be exposed.
    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism>;

    /// Per volume: `Use` (incremental since the previous checkpoint), `New`
    /// (start tracking, read in full); volumes left out get `None`.
    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan>;

    /// Take the snapshot and expose every volume, the configuration and
    /// the metadata. Access stays valid until `backup_cleanup`.
    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup>;

    /// The container half of the API, for a provider that offers it
    /// (and says so in [`Capabilities::containers`]); `None` by default.
    /// The host asks before any container call: a provider without
    /// containers has no container methods to get wrong.
    fn containers(&self) -> Option<&dyn ContainerProvider> {
        None
    }

    /// End of one guest's backup, on every path: delete snapshots, detach
    /// disks, release leases. `outcome` says whether the host stored it.
    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats>;

    /// The guest's task log, once per guest after `backup_cleanup`.
    async fn backup_handle_log_file(&self, guest: &Guest, path: &Path) -> Result<()> {
        let _ = (guest, path);
        Ok(())
    }

    /// How restored data is consumed for this kind of guest. By default
    /// VMs are restored through [`RestoreMechanism::QemuImg`] and
    /// containers are not supported.
    async fn restore_get_mechanism(&self, kind: GuestKind) -> Result<RestoreMechanism> {
        match kind {
            GuestKind::Vm => Ok(RestoreMechanism::QemuImg),
            GuestKind::Container => Err(Error::unsupported("container restore")),
        }
    }

    /// Which kind of URL this provider needs in [`RestoreSources`] (for
    /// [`RestoreMechanism::QemuImg`]): NBD unless the provider says
    /// otherwise. A host that cannot serve the kind asked for refuses the
    /// restore before `restore_vm_init`. A provider that wraps another
    /// (recording, fault injection) must forward this call.
    fn restore_source_kind(&self) -> RestoreSourceKind {
        RestoreSourceKind::Nbd
    }

    /// The guest configuration to restore with. By default the one stored
    /// with the snapshot; a snapshot without one is a `NotFound` error
    /// naming it.
    async fn archive_get_guest_config(&self, archive: &ArchiveView) -> Result<ConfigBlob> {
        archive.guest_config.clone().ok_or_else(|| {
            Error::not_found(format!(
                "snapshot {} has no guest configuration",
                archive.snapshot.id
            ))
        })
    }

    /// The firewall configuration to restore with, if any. By default the
    /// one stored with the snapshot; a provider whose platform has none
    /// returns `None` whatever the snapshot holds.
    async fn archive_get_firewall_config(
        &self,
        archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        Ok(archive.firewall_config.clone())
    }

    /// Create (or prepare, in place) the guest; returns it.
    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest>;

    /// Prepare one volume; the host then performs the returned writes.
    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport>;

    /// After one volume, on every path.
    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()>;

    /// After the whole VM, on every path.
    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()>;
}

/// The optional container half of the provider API (Proxmox:
/// `backup_container_prepare`, `backup_container`,
/// `restore_container_init`, `restore_container_cleanup`), which a
/// provider opts into through [`BackupProvider::containers`]. The
/// mechanisms: backup is always [`BackupMechanism::Directory`] (the host
/// walks the tree `backup_container` returns); restore is what
/// [`BackupProvider::restore_get_mechanism`] answers for
/// [`GuestKind::Container`] ([`RestoreMechanism::Directory`] or
/// [`RestoreMechanism::Tar`]).
#[async_trait]
pub trait ContainerProvider: Send + Sync {
    /// Privileged preparation of a container backup (check the tree,
    /// freeze or snapshot the container's file system).
    async fn backup_container_prepare(&self, guest: &Guest) -> Result<()>;

    /// Expose a container's file system as a directory tree, with its
    /// configuration; valid until `backup_cleanup`.
    async fn backup_container(&self, guest: &Guest) -> Result<ContainerBackup>;

    /// Prepare a container restore: the host then writes the tree where
    /// the answer says, and calls `restore_container_cleanup` (which, on
    /// success, finishes the guest: e.g. extracts the tar it was given).
    async fn restore_container_init(
        &self,
        request: &RestoreContainerRequest,
    ) -> Result<ContainerRestore>;

    /// After a container restore, on every path: on failure, remove what
    /// the restore created.
    async fn restore_container_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()>;
}
