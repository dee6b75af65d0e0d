//! [`ScpProvider`]: the `BackupProvider` implementation (shared plumbing and
//! the trait here; `backup` and `restore` hold the two halves).

use provider_kit::lock;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use provider_api::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::api::{
    self, BackupResource, BaseImage, Binding, CbtStatus, ChangedAreasPage, CustomAttribute,
    IdAnswer, Server, ServerCreated, Snapshot, SnapshotCreated, VersionAnswer, VmConf, codes,
};
use crate::client::{ScpClient, error_code, is_cbt_expired};
use crate::disk_access::{DiskAccess, DiskTarget, OpenMode, OpenedDisk};
use crate::metadata::{BaseImageMeta, DiskMeta, FORMAT, ServerMeta, SnapshotMetadata};
use crate::options::{AccessMode, ScpOptions};
use crate::rules::{BasePolicy, ScpVersion, base_policy, check_backup_allowed};

const SERVERS: &str = "/janus/20250725/servers";
const RESOURCES: &str = "/janus/20240725/backup-resources";
const BASE_IMAGES: &str = "/janus/20180725/base-images";
const ATTRIBUTES: &str = "/janus/20190725/custom-attributes";
const BINDINGS: &str = "/janus/20190725/custom-attributes/bindings";

/// A backup resource kept alive by a background task.
struct Lease {
    id: String,
    lost: Arc<AtomicBool>,
    renew: JoinHandle<()>,
}

impl Drop for Lease {
    /// A provider dropped without its cleanups stops renewing: the
    /// platform then releases the lease after its `remain_time`.
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// What one guest's backup holds on the platform.
#[derive(Default)]
struct BackupState {
    lease: Option<Lease>,
    snapshot_id: Option<String>,
    /// Disks (and base images) opened for the host.
    opened: Vec<OpenedDisk>,
}

/// What one VM restore holds on the platform.
#[derive(Default)]
struct RestoreState {
    metadata: Option<SnapshotMetadata>,
    /// The VM restored into (empty until created).
    server_id: String,
    /// Device → disk id.
    disks: BTreeMap<String, String>,
    in_place: bool,
    name: String,
    storage_id: String,
    /// The base image to restore (missing on the platform) before the VM
    /// can be created.
    pending_base: bool,
    /// Base image id to link to.
    base_image_id: Option<String>,
    /// A base image this restore created whose data is not complete yet
    /// (deleted when the restore fails).
    unsealed_base: Option<String>,
    /// Its description without the job marker.
    base_description: String,
    lease: Option<Lease>,
    /// Per device: the opened disk to close.
    open: BTreeMap<String, OpenedDisk>,
    /// True when this restore created the VM.
    created: bool,
}

/// The SCP provider. One instance serves a whole job (and restores); it
/// keeps per-guest state behind its own locks.
pub struct ScpProvider {
    client: Arc<ScpClient>,
    options: ScpOptions,
    /// How disks are opened (REST export, hot-add or helper command).
    disks: Arc<dyn DiskAccess>,
    backups: std::sync::Mutex<BTreeMap<String, BackupState>>,
    restores: std::sync::Mutex<BTreeMap<String, RestoreState>>,
    /// Lines for a guest's task log (`backup_handle_log_file`).
    notes: std::sync::Mutex<BTreeMap<String, Vec<String>>>,
    pending_ids: AtomicU64,
    /// The job of the last `job_init` (its marker tags what it creates).
    job: std::sync::Mutex<Option<JobInfo>>,
    /// What the last `job_init` swept.
    swept: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for ScpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScpProvider")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ScpProvider {
    /// A provider for one SCP (not yet logged in: `job_init` does it, and
    /// restores log in when needed).
    pub fn new(options: ScpOptions) -> Result<Self> {
        let client = Arc::new(ScpClient::new(&options)?);
        Ok(ScpProvider {
            disks: crate::disk_access::for_options(client.clone(), &options)?,
            client,
            options,
            backups: Default::default(),
            restores: Default::default(),
            notes: Default::default(),
            pending_ids: AtomicU64::new(0),
            job: Default::default(),
            swept: Default::default(),
        })
    }

    /// What the last `job_init` removed: objects an earlier job of this
    /// host left behind (one line each).
    pub fn swept(&self) -> Vec<String> {
        lock(&self.swept).clone()
    }

    /// The janus client (for tools and tests that need other calls).
    pub fn client(&self) -> &Arc<ScpClient> {
        &self.client
    }

    /// Quick recovery (running the VM straight from the backup) of a
    /// stored snapshot. Linked VMs are refused (seed 4.5.3 rule 7) with
    /// [`ErrorKind::Refused`]; others answer [`ErrorKind::Unsupported`]
    /// since this provider does not implement quick recovery at all.
    pub fn quick_recovery(&self, archive: &ArchiveView) -> Result<()> {
        let md = parse_metadata(&archive.metadata)?;
        if md.is_linked() {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "quick recovery of linked VM {:?} is not supported by SCP: restore it instead",
                    md.server.name
                ),
            )
            .guest(&archive.snapshot.guest));
        }
        Err(Error::unsupported("quick recovery").guest(&archive.snapshot.guest))
    }

    /// The platform server a restore created or overwrote (the guest
    /// `restore_vm_init` returned may be provisional when the base image
    /// had to be restored first).
    pub fn restored_server_id(&self, guest: &Guest) -> Option<String> {
        let r = lock(&self.restores);
        r.get(&guest.id.0)
            .map(|s| s.server_id.clone())
            .filter(|s| !s.is_empty())
    }

    async fn version(&self) -> Result<ScpVersion> {
        let v: VersionAnswer = self
            .client
            .call(Method::GET, "/janus/20180725/system/version", &[], None)
            .await?;
        ScpVersion::parse(&v.build_version)
    }

    async fn server(&self, id: &str) -> Result<Server> {
        self.client
            .call(Method::GET, &format!("{SERVERS}/{id}"), &[], None)
            .await
            .map_err(|e| e.guest(id))
    }

    /// Create a backup resource and start renewing it.
    async fn open_lease(&self, server_id: Option<&str>, kind: &str) -> Result<Lease> {
        let mut body = json!({"type": kind, "remain_time": self.options.lease_seconds});
        if let Some(s) = server_id {
            body["server_id"] = json!(s);
        }
        let r: BackupResource = self
            .client
            .call(Method::POST, RESOURCES, &[], Some(&body))
            .await?;
        let lost = Arc::new(AtomicBool::new(false));
        let renew = tokio::spawn(renew_lease(
            self.client.clone(),
            r.id.clone(),
            self.options.lease_seconds,
            self.options.renew_interval,
            lost.clone(),
        ));
        Ok(Lease {
            id: r.id,
            lost,
            renew,
        })
    }

    /// Release a lease; `Ok(true)` when the platform had already dropped
    /// it (expired).
    async fn close_lease(&self, lease: Lease) -> Result<bool> {
        lease.renew.abort();
        let path = format!("{RESOURCES}/{}", lease.id);
        match self
            .client
            .call::<Value>(Method::DELETE, &path, &[], None)
            .await
        {
            Ok(_) => Ok(lease.lost.load(Ordering::SeqCst)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::LeaseLost) => Ok(true),
            Err(e) => Err(e),
        }
    }

    async fn hot_remove_on(&self, proxy: &str, id: &str) -> Result<()> {
        crate::disk_access::hot_remove(&self.client, proxy, id).await
    }

    /// Open a disk through the configured [`DiskAccess`].
    async fn open_disk(&self, target: DiskTarget) -> Result<OpenedDisk> {
        self.disks.open(&target).await
    }

    /// Close disks opened by [`Self::open_disk`]; the first error.
    async fn close_disks(&self, disks: impl IntoIterator<Item = OpenedDisk>) -> Option<Error> {
        let mut first = None;
        for d in disks {
            if let Err(e) = self.disks.close(d).await {
                first.get_or_insert(e);
            }
        }
        first
    }
}

fn parse_metadata(value: &PlatformMetadata) -> Result<SnapshotMetadata> {
    let md: SnapshotMetadata = serde_json::from_value(value.clone()).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            "the snapshot's SCP metadata does not parse",
        )
        .with_source(e)
    })?;
    if md.format != FORMAT {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("unknown SCP metadata format {:?}", md.format),
        ));
    }
    Ok(md)
}

#[async_trait]
impl BackupProvider for ScpProvider {
    fn provider_name(&self) -> &str {
        "scp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .incremental(true)
            .hot_add(matches!(self.options.access, AccessMode::HotAdd { .. }))
            .restore_in_place(true)
    }

    async fn job_init(&self, job: &JobInfo) -> Result<()> {
        self.client.login().await?;
        self.version().await?;
        *lock(&self.job) = Some(job.clone());
        // Objects of an earlier job of this host that is gone. A failing
        // sweep does not stop the job (what it could not remove stays for
        // the next one), but it is logged.
        let swept = match self.sweep(job).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e.report(), "sweeping objects of earlier jobs failed");
                Vec::new()
            }
        };
        for line in &swept {
            tracing::warn!(object = %line, "removed an object an earlier job left behind");
        }
        *lock(&self.swept) = swept;
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        // Last resort: release whatever a guest still holds.
        let guests: Vec<String> = lock(&self.backups).keys().cloned().collect();
        let mut first = None;
        for g in guests {
            if let Err(e) = self.cleanup_backup(&Guest::vm(g)).await {
                first.get_or_insert(e);
            }
        }
        self.client.logout().await;
        first.map_or(Ok(()), Err)
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        if guest.kind != GuestKind::Vm {
            return Err(Error::unsupported("container backup").guest(&guest.id));
        }
        lock(&self.backups).insert(guest.id.0.clone(), BackupState::default());
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }

    async fn backup_get_mechanism(&self, _guest: &Guest) -> Result<BackupMechanism> {
        Ok(if self.disks.is_file() {
            BackupMechanism::FileHandle
        } else {
            BackupMechanism::Nbd
        })
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        let server = self.server(&guest.id.0).await?;
        check_backup_allowed(&server.id, &server.name, server.revert_mode)?;
        let version = self.version().await?;
        let mut plan = IncrementalPlan::new();
        for d in &server.disks {
            let device = d.device();
            let policy = base_policy(
                &version,
                server.application == "desk",
                d.base_image_id.is_some(),
            );
            let usable = previous
                .and_then(|p| p.snapshot.volume(&device))
                .is_some_and(|v| usable_previous(v, d, policy));
            let mode = if usable && server.cbt.enable == 1 {
                BitmapMode::Use
            } else {
                BitmapMode::New
            };
            plan.insert(device, mode);
        }
        Ok(plan)
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        self.backup_vm_inner(guest, request)
            .await
            .map_err(|e| e.guest(&guest.id))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        let lost = self.cleanup_backup(guest).await?;
        if outcome.is_success() && lost {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                "the backup resource expired during the backup: the data read may be incomplete",
            )
            .guest(&guest.id));
        }
        let mut stats = BackupStats::default();
        stats.extra.insert(
            "lease".into(),
            if lost { "lost" } else { "released" }.into(),
        );
        Ok(stats)
    }

    async fn backup_handle_log_file(&self, guest: &Guest, path: &std::path::Path) -> Result<()> {
        let notes = lock(&self.notes).remove(&guest.id.0).unwrap_or_default();
        if notes.is_empty() {
            return Ok(());
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?;
        for n in notes {
            writeln!(f, "{n}")?;
        }
        Ok(())
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let foreign = request.archive.is_foreign_to(self.provider_name());
        if foreign && !matches!(request.target, RestoreTarget::NewGuest { .. }) {
            return Err(Error::invalid(format!(
                "snapshot {} comes from platform {}: it restores onto SCP as a new server only",
                request.archive.snapshot.id, request.archive.snapshot.platform
            )));
        }
        let md = if foreign {
            crate::spec::foreign_metadata(request, self.options.restore_storage_id.as_deref())?
        } else {
            parse_metadata(&request.archive.metadata)?
        };
        let original = request.archive.snapshot.guest.0.clone();
        let storage_id = self
            .options
            .restore_storage_id
            .clone()
            .unwrap_or_else(|| md.server.storage_id.clone());
        let mut st = RestoreState {
            storage_id,
            ..Default::default()
        };
        match &request.target {
            RestoreTarget::NewGuest { name } => {
                st.name = name
                    .clone()
                    .unwrap_or_else(|| format!("{}-restored", md.server.name));
            }
            RestoreTarget::InPlace => {
                st.in_place = true;
                st.server_id = original.clone();
                st.name = md.server.name.clone();
            }
            other => return Err(Error::unsupported(format!("restore target {other:?}"))),
        }
        if let Some(linked) = md.separate_linked_disk() {
            let base_id =
                linked.disk.base_image_id.clone().ok_or_else(|| {
                    Error::new(ErrorKind::Corrupt, "linked disk without base image")
                })?;
            // The image itself, or one an earlier restore recreated from
            // it (SCP gives a recreated image a new id).
            let marker = restored_marker(&base_id);
            let found: Vec<BaseImage> = self.client.list(BASE_IMAGES, &[]).await?;
            let found = found.iter().find(|i| i.id == base_id).or_else(|| {
                // Complete only once the job marker is gone.
                found.iter().find(|i| {
                    i.status == "AVAILABLE"
                        && i.description.contains(&marker)
                        && JobMarker::find_in(&i.description).is_none()
                })
            });
            match found.cloned() {
                Some(img) if img.status == "AVAILABLE" => {
                    self.ensure_replica(&img, &st.storage_id).await?;
                    if let Some(bm) = &md.base_image {
                        self.restore_attributes(&img.id, bm).await?;
                    }
                    st.base_image_id = Some(img.id);
                }
                _ => st.pending_base = true,
            }
        }
        st.metadata = Some(md);
        let key = if st.pending_base {
            // The VM is created (or relinked) once the base image exists.
            if st.in_place {
                st.server_id.clone()
            } else {
                format!(
                    "pending-restore-{}",
                    self.pending_ids.fetch_add(1, Ordering::Relaxed)
                )
            }
        } else {
            self.prepare_vm(&mut st).await?;
            st.server_id.clone()
        };
        let guest = Guest {
            id: GuestId(key.clone()),
            kind: GuestKind::Vm,
            name: Some(st.name.clone()),
        };
        lock(&self.restores).insert(key, st);
        Ok(guest)
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let key = request.guest.id.0.clone();
        let device = request.volume.volume.device.clone();
        let mut st = lock(&self.restores)
            .remove(&key)
            .ok_or_else(|| Error::invalid("restore_vm_volume_init without restore_vm_init"))?;
        let r = self.volume_init(&mut st, request).await;
        lock(&self.restores).insert(key, st);
        r.map_err(|e| e.volume(&device))
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        // An incomplete base image is deleted by `restore_vm_cleanup`,
        // after the VM linked to it.
        let opened = {
            let mut r = lock(&self.restores);
            r.get_mut(&guest.id.0).and_then(|st| st.open.remove(device))
        };
        let first = self.close_disks(opened).await;
        let _ = outcome;
        first.map_or(Ok(()), |e| Err(e.volume(device)))
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let st = lock(&self.restores).remove(&guest.id.0);
        let Some(mut st) = st else {
            return Ok(());
        };
        let mut first = self
            .close_disks(std::mem::take(&mut st.open).into_values())
            .await;
        if let Some(l) = st.lease.take()
            && let Err(e) = self.close_lease(l).await
        {
            first.get_or_insert(e);
        }
        let unsealed = st.unsealed_base.take();
        if (!outcome.is_success() || unsealed.is_some()) && st.created && !st.server_id.is_empty() {
            // Do not leave a half-restored new VM behind (nor one on an
            // incomplete base image).
            let path = format!("{SERVERS}/{}", st.server_id);
            if let Err(e) = self.client.task::<Value>(Method::DELETE, &path, None).await {
                first.get_or_insert(e);
            }
        }
        if let Some(b) = unsealed {
            // Seed 4.5.3 rule 8: an interrupted base image restore leaves
            // unusable data: delete the image.
            tracing::warn!(base_image = %b, "deleting the incomplete base image");
            if let Err(e) = self.delete_base_image(&b).await {
                first.get_or_insert(e);
            }
        }
        // Keep the mapping for `restored_server_id`.
        let server_id = st.server_id.clone();
        lock(&self.restores).insert(
            guest.id.0.clone(),
            RestoreState {
                server_id,
                ..Default::default()
            },
        );
        first.map_or(Ok(()), |e| Err(e.guest(&guest.id)))
    }
}

mod backup;
mod copy;
mod restore;
mod sweep;

use backup::{renew_lease, usable_previous};
use restore::restored_marker;
