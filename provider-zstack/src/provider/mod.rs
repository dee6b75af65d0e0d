//! [`ZStackProvider`]: the [`BackupProvider`] implementation. This file
//! holds the provider struct, the state shared by its halves, the helpers
//! every flow uses (VM lookup, backup storage, quota check) and the trait
//! implementation, which delegates: [`backup`] exports and reads volumes,
//! [`restore`] creates images and the VM, [`sweep`] names and removes the
//! temporary platform objects.
//!
//! Locking: `backups` and `restores` (per guest), `export_users` and `job`
//! are `std::sync::Mutex`es held only to copy or update a field, never
//! across an `.await`; `base_exports` hands out one `tokio::sync::Mutex`
//! per base image, held across that image's export and digest pass (see
//! [`backup`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use provider_api::{
    ArchiveName, ArchiveView, BackupMechanism, BackupProvider, BackupStats, BackupVmRequest,
    BaseImageId, BaseLayer, BitmapMode, Capabilities, ConfigBlob, DirtySource, Error, ErrorKind,
    Guest, GuestKind, IncrementalPlan, JobInfo, JobMarker, Outcome, PreviousBackup,
    RestoreSourceKind, RestoreTarget, RestoreVmRequest, RestoreVolumeRequest, Result,
    SnapshotAccess, VmBackup, Volume, VolumeAccess, VolumeFormat, VolumeImport, marker_safe,
};
use provider_kit::http_export::{HttpRange, LoopbackNbd};
use provider_kit::{GuestStates, RetryPolicy, lock};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{
    BackupStorageInventory, ExportResult, ImageInventory, InventoryAnswer, QuotaInventory,
    UuidInventory, VmInventory, VolumeInventory, VolumeSnapshotGroupInventory,
    VolumeSnapshotInventory, like_escape,
};
use crate::client::{Connection, ZStackClient};
use crate::options::ZStackOptions;

/// Name prefix of the restore images kept for reuse.
const KEPT_PREFIX: &str = "vmbackup-restore-";

/// Per-volume record stored in the snapshot metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VolumeMeta {
    device: String,
    uuid: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    md5: String,
    root_image_uuid: Option<String>,
    device_id: u64,
    name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Metadata {
    vm_uuid: String,
    vm_name: String,
    platform: String,
    backup_storage_uuid: String,
    volumes: Vec<VolumeMeta>,
}

#[derive(Debug, Default)]
struct BackupState {
    /// What names every platform object this backup creates.
    tag: Tag,
    /// This backup's work directory (nothing is staged in it any more; an
    /// old version's leftovers are removed with it).
    dir: PathBuf,
    /// Exports this backup holds (backup storage, image), released by
    /// `backup_cleanup` once the data mover is done with them.
    exports: Vec<(String, String)>,
    /// The loopback NBD server serving the exports to the data mover.
    serving: Option<LoopbackNbd>,
    /// The readers of the exports (their resumes are reported).
    sources: Vec<Arc<HttpRange>>,
}

/// The ZStack backup provider. See the crate docs for the flows.
#[derive(Debug)]
pub struct ZStackProvider {
    options: ZStackOptions,
    client: ZStackClient,
    backups: GuestStates<BackupState>,
    restores: GuestStates<RestoreState>,
    counter: AtomicU64,
    /// One export of a base image at a time: an image's export URL is
    /// shared, so guests on the same cached image (backed up in parallel)
    /// must not delete the export another one is still reading.
    base_exports: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Users of each export (backup storage, image): a base image's export
    /// is shared by the guests on it and deleted by the last one.
    export_users: Mutex<HashMap<(String, String), u32>>,
    /// The job of the last `job_init` (its marker names what we create).
    job: Mutex<Option<JobInfo>>,
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn short(s: &str) -> &str {
    &s[..s.len().min(8)]
}

/// The device name of a volume: `root`, or `data-<deviceId>`.
fn device_of(vol: &VolumeInventory) -> String {
    if vol.kind == "Root" {
        "root".into()
    } else {
        format!("data-{}", vol.device_id)
    }
}

/// A VM's volumes in device order, checked: at least the root volume,
/// only `Root` and `Data` volumes, exactly one root, no two volumes on one
/// device name (each would overwrite the other's backup).
fn volumes_of(vm: &VmInventory) -> Result<Vec<VolumeInventory>> {
    let call = format!("GET /zstack/v1/vm-instances/{}", vm.uuid);
    let bad = |m: String| Error::new(ErrorKind::Platform, m).api_call(&call);
    let mut vols = vm.all_volumes.clone();
    vols.sort_by_key(|v| (v.kind != "Root", v.device_id));
    if let Some(v) = vols.iter().find(|v| v.kind != "Root" && v.kind != "Data") {
        return Err(bad(format!(
            "volume {} has type {:?}: only Root and Data volumes can be backed up",
            v.uuid, v.kind
        )));
    }
    if vols.iter().filter(|v| v.kind == "Root").count() != 1 {
        return Err(bad(format!(
            "VM {} lists {} root volumes in allVolumes (one expected)",
            vm.uuid,
            vols.iter().filter(|v| v.kind == "Root").count()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in &vols {
        if !seen.insert(device_of(v)) {
            return Err(bad(format!(
                "two volumes of VM {} are on device {} (deviceId {})",
                vm.uuid,
                device_of(v),
                v.device_id
            )));
        }
    }
    Ok(vols)
}

fn new_uuid(counter: u64) -> String {
    use sha2::{Digest, Sha256};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = Sha256::digest(format!("{nanos}-{}-{counter}", std::process::id()));
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

impl ZStackProvider {
    /// A provider; creates the work directory.
    pub fn new(options: ZStackOptions) -> Result<Self> {
        let digests = options.work_dir.join("base-digests");
        std::fs::create_dir_all(&digests).map_err(|e| {
            Error::new(ErrorKind::Io, format!("creating {}", digests.display())).with_source(e)
        })?;
        let client = ZStackClient::new(Connection {
            base_url: options.base_url.clone(),
            account: options.account.clone(),
            password: options.password.clone(),
            poll_interval: Duration::from_millis(options.poll_interval_ms.max(1)),
            job_timeout: Duration::from_secs_f64(options.job_timeout_secs.max(0.01)),
            io_timeout: Duration::from_secs(options.io_timeout_secs.max(1)),
            retry: RetryPolicy {
                attempts: options.retry_attempts.max(1),
                initial_delay: Duration::from_millis(options.retry_initial_ms),
                ..RetryPolicy::default()
            },
            api_ca: options.api_ca.clone(),
        })?;
        Ok(ZStackProvider {
            options,
            client,
            backups: GuestStates::new("backup_init"),
            restores: GuestStates::new("restore_vm_init"),
            counter: AtomicU64::new(0),
            base_exports: Mutex::new(HashMap::new()),
            export_users: Mutex::new(HashMap::new()),
            job: Mutex::new(None),
        })
    }

    /// The REST client (for tools and tests).
    pub fn client(&self) -> &ZStackClient {
        &self.client
    }

    /// The job timeout of a job that copies an image of `size` bytes:
    /// `job_timeout_secs` plus `job_timeout_secs_per_gib` per GiB.
    pub fn job_timeout_for(&self, size: u64) -> Duration {
        let gib = size as f64 / f64::from(1u32 << 30);
        Duration::from_secs_f64(
            (self.options.job_timeout_secs + self.options.job_timeout_secs_per_gib.max(0.0) * gib)
                .max(0.01),
        )
    }

    async fn vm(&self, guest: &Guest) -> Result<(VmInventory, Value)> {
        self.client.ensure_session().await?;
        // The raw inventory is kept as the guest configuration.
        let raw: Value = self
            .client
            .get_one("/vm-instances", &guest.id.0)
            .await
            .map_err(|e| e.guest(&guest.id))?;
        let vm: VmInventory = crate::api::parse(
            &format!("GET /zstack/v1/vm-instances/{}", guest.id.0),
            raw.clone(),
        )
        .map_err(|e| e.guest(&guest.id))?;
        Ok((vm, raw))
    }

    /// The marker of the current job: the last `job_init`'s, or for a
    /// restore run without one, a job of this restore alone.
    fn marker_or(&self, fallback_job: &str) -> JobMarker {
        match &*lock(&self.job) {
            Some(j) => j.marker(),
            None => JobInfo::new(fallback_job, 0).marker(),
        }
    }

    /// The backup storage to use.
    async fn backup_storage(&self) -> Result<String> {
        if let Some(b) = &self.options.backup_storage_uuid {
            let bs: BackupStorageInventory = self.client.get_one("/backup-storage", b).await?;
            if bs.status != "Connected" {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!("backup storage {b} is {}", bs.status),
                ));
            }
            return Ok(b.clone());
        }
        let list: Vec<BackupStorageInventory> = self
            .client
            .query("/backup-storage", &["status=Connected".into()])
            .await?;
        list.into_iter()
            .find(|b| b.status == "Connected")
            .map(|b| b.uuid)
            .ok_or_else(|| Error::new(ErrorKind::Refused, "ZStack has no Connected backup storage"))
    }

    /// Refuses, before any work, when fewer than `needed` private images
    /// fit under the `image.num` quota.
    async fn check_quota(&self, needed: u64, what: &str) -> Result<()> {
        if needed == 0 {
            return Ok(());
        }
        let quotas: Vec<QuotaInventory> = self
            .client
            .query("/accounts/quotas", &["name=image.num".into()])
            .await?;
        // No image.num quota, or a negative one: no limit.
        let Some(limit) = quotas
            .iter()
            .find(|q| q.name == "image.num")
            .and_then(|q| u64::try_from(q.value).ok())
        else {
            return Ok(());
        };
        let (images, used) = self
            .client
            .query_with_total::<ImageInventory>("/images", &["system=false".into()], 1000)
            .await?;
        if used + needed > limit {
            // By what: this tool's kept restore images and temporary
            // images (a dead job's, until the next job_init sweeps them),
            // and the rest.
            let kept = images
                .iter()
                .filter(|i| i.name.starts_with(KEPT_PREFIX))
                .count();
            let temporary = images
                .iter()
                .filter(|i| i.name.starts_with(JobMarker::PREFIX))
                .count();
            let deleted = images.iter().filter(|i| i.status == "Deleted").count();
            let others = images.len().saturating_sub(kept + temporary);
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "ZStack private image quota image.num is reached: {used} of {limit} slots are used ({kept} restore images kept by vmbackup (keep_restore_images), {temporary} temporary vmbackup images, {others} other images; {deleted} of them deleted but not expunged) and {what} needs {needed} more; delete and expunge images, or raise the quota"
                ),
            )
            .api_call("GET /zstack/v1/accounts/quotas"));
        }
        Ok(())
    }
}

#[async_trait]
impl BackupProvider for ZStackProvider {
    fn provider_name(&self) -> &str {
        "zstack"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
    }

    /// Logs in, checks a backup storage, and sweeps what earlier jobs of
    /// this host that are no longer running left behind (platform objects
    /// and work directories). A failed sweep is logged, not fatal: the
    /// next job tries again.
    async fn job_init(&self, job: &JobInfo) -> Result<()> {
        *lock(&self.job) = Some(job.clone());
        self.client.login().await?;
        self.backup_storage().await?;
        match self.sweep_stale(job).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed what interrupted jobs of this host left");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e.report(), "sweeping what interrupted jobs left failed");
            }
        }
        if let Ok(dir) = std::fs::read_dir(&self.options.work_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stale = name.starts_with(JobMarker::PREFIX)
                    && JobMarker::find_in(&name).is_some_and(|m| m.is_stale_for(job));
                if stale && let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(error = %e, dir = %entry.path().display(), "removing a stale work directory");
                }
            }
        }
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        self.client.logout().await;
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let marker = self.marker_or(&format!("backup-{start_time}"));
        let tag = Tag::new(
            &marker,
            format!("b{n}-{}", short(&marker_safe(&guest.id.0))),
        );
        let dir = self.options.work_dir.join(tag.prefix());
        self.backups.insert(
            &guest.id.0,
            BackupState {
                tag,
                dir,
                ..BackupState::default()
            },
        );
        ArchiveName::new(format!("vm/{}/{start_time}", safe(&guest.id.0)))
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        match guest.kind {
            GuestKind::Vm => Ok(BackupMechanism::FileHandle),
            GuestKind::Container => Err(Error::unsupported("container backup")),
        }
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        _previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        // No change tracking on this path: every backup reads every volume
        // (`New`, so that a linked root volume stores its base image once).
        let (vm, _) = self.vm(guest).await?;
        Ok(volumes_of(&vm)
            .map_err(|e| e.guest(&guest.id))?
            .iter()
            .map(|v| (device_of(v), BitmapMode::New))
            .collect())
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        self.backup_vm_inner(guest, &request)
            .await
            .map_err(|e| e.guest(&guest.id))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        self.backup_cleanup_inner(guest, outcome).await
    }

    /// ZStack's backup storage host fetches AddImage URLs over http(s):
    /// the host serves the restore sources on an address it can reach.
    fn restore_source_kind(&self) -> RestoreSourceKind {
        RestoreSourceKind::Http
    }

    /// ZStack keeps no firewall configuration with a VM.
    async fn archive_get_firewall_config(
        &self,
        _archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        Ok(None)
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        self.restore_vm_init_inner(request).await
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        self.restore_vm_volume_init_inner(request).await
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        self.restore_vm_volume_cleanup_inner(guest, device, outcome)
            .await
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        self.restore_vm_cleanup_inner(guest, outcome).await
    }
}

mod backup;
mod restore;
mod sweep;

use restore::RestoreState;
use sweep::Tag;
