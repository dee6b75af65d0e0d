//! The [`BackupProvider`] implementation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use provider_api::{
    ArchiveName, ArchiveView, BackupMechanism, BackupProvider, BackupStats, BackupVmRequest,
    BaseImageId, BaseLayer, BitmapMode, Capabilities, ConfigBlob, DirtySource, Error, ErrorKind,
    FileAccess, Guest, GuestKind, IncrementalPlan, JobInfo, JobMarker, Outcome, PreviousBackup,
    RegionList, RestoreMechanism, RestoreSourceKind, RestoreTarget, RestoreVmRequest,
    RestoreVolumeRequest, Result, SnapshotAccess, VmBackup, Volume, VolumeAccess, VolumeFormat,
    VolumeImport, marker_safe,
};
use provider_kit::RetryPolicy;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{
    BackupStorageInventory, ExportResult, ImageInventory, InventoryAnswer, QuotaInventory,
    UuidInventory, VmInventory, VolumeInventory, VolumeSnapshotInventory, like_escape,
};
use crate::client::{Connection, ZStackClient};
use crate::download::{self, Downloaded};

/// Settings of the provider.
#[derive(Clone, Serialize, Deserialize)]
pub struct ZStackOptions {
    /// Base URL of the API up to `/v1`, e.g. `http://zstack:8080/zstack`.
    pub base_url: String,
    /// Account name.
    pub account: String,
    /// Account password (sent as its SHA-512 digest; never logged).
    pub password: String,
    /// Backup storage for temporary templates and restored images (default:
    /// the first `Connected` one).
    #[serde(default)]
    pub backup_storage_uuid: Option<String>,
    /// Local directory for downloaded exports and the base-image digest
    /// cache (needs room for the largest VM).
    pub work_dir: PathBuf,
    /// Pause between API job polls, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Longest wait for one API job, in seconds; jobs that move an
    /// image's data (templates, AddImage) get `job_timeout_secs_per_gib`
    /// more per GiB of the image.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_secs: f64,
    /// Extra wait per GiB of image for the jobs that copy data, in
    /// seconds (default 120: a backup storage fetching 8.5 MiB/s).
    #[serde(default = "default_job_timeout_per_gib")]
    pub job_timeout_secs_per_gib: f64,
    /// Longest silence of the management node or of a download, in
    /// seconds (each read; a long download that keeps flowing is fine).
    #[serde(default = "default_io_timeout")]
    pub io_timeout_secs: u64,
    /// How often a broken export download is resumed.
    #[serde(default = "default_retries")]
    pub download_retries: u32,
    /// Keep the images a restore uploaded (so that a later restore of the
    /// same data reuses them), each taking one slot of the `image.num`
    /// quota; by default (false) they are deleted and expunged once the
    /// VM exists (its volumes stay in the primary storage image cache),
    /// so that backups and restores leave the image count unchanged.
    #[serde(default)]
    pub keep_restore_images: bool,
    /// Attempts of an idempotent API call (login, queries, job polls)
    /// whose transport failed (1 = no retry).
    #[serde(default = "default_retries")]
    pub retry_attempts: u32,
    /// Delay before the first retry, in milliseconds (doubles up to 5 s,
    /// with jitter).
    #[serde(default = "default_retry_ms")]
    pub retry_initial_ms: u64,
    /// Instance offering of restored VMs (default: the backed-up VM's, or
    /// its CPU and memory when it had none). For a target that lacks the
    /// original offering.
    #[serde(default)]
    pub instance_offering_uuid: Option<String>,
    /// L3 networks of restored VMs, the first the default (default: the
    /// backed-up VM's NICs' networks). For a target that lacks them.
    #[serde(default)]
    pub l3_network_uuids: Vec<String>,
}

fn default_poll_ms() -> u64 {
    200
}
fn default_job_timeout() -> f64 {
    600.0
}
fn default_io_timeout() -> u64 {
    120
}
fn default_retries() -> u32 {
    5
}
fn default_job_timeout_per_gib() -> f64 {
    120.0
}
fn default_retry_ms() -> u64 {
    200
}

impl std::fmt::Debug for ZStackOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZStackOptions")
            .field("base_url", &self.base_url)
            .field("account", &self.account)
            .field("backup_storage_uuid", &self.backup_storage_uuid)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

impl ZStackOptions {
    /// Options with defaults for everything but the essentials.
    pub fn new(
        base_url: impl Into<String>,
        account: impl Into<String>,
        password: impl Into<String>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        ZStackOptions {
            base_url: base_url.into(),
            account: account.into(),
            password: password.into(),
            backup_storage_uuid: None,
            work_dir: work_dir.into(),
            poll_interval_ms: default_poll_ms(),
            job_timeout_secs: default_job_timeout(),
            job_timeout_secs_per_gib: default_job_timeout_per_gib(),
            io_timeout_secs: default_io_timeout(),
            download_retries: default_retries(),
            keep_restore_images: false,
            retry_attempts: default_retries(),
            retry_initial_ms: default_retry_ms(),
            instance_offering_uuid: None,
            l3_network_uuids: Vec::new(),
        }
    }
}

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
    dir: PathBuf,
    exports: Vec<(String, String)>,
    resumes: u32,
}

#[derive(Debug)]
struct RestoreState {
    vm_uuid: String,
    name: String,
    tag: Tag,
    meta: Metadata,
    /// device → (image uuid, uploaded by this restore)
    images: BTreeMap<String, (String, bool)>,
    bs: String,
    shape: VmShape,
}

/// What a restored VM is created with besides its volumes.
#[derive(Debug, Clone)]
struct VmShape {
    /// Instance offering, or (without one) CPUs and memory in bytes.
    compute: Compute,
    /// L3 networks, the first the default.
    l3_network_uuids: Vec<String>,
}

#[derive(Debug, Clone)]
enum Compute {
    Offering(String),
    CpuMemory(u32, u64),
}

/// The ZStack backup provider. See the crate docs for the flows.
#[derive(Debug)]
pub struct ZStackProvider {
    options: ZStackOptions,
    client: ZStackClient,
    backups: Mutex<HashMap<String, BackupState>>,
    restores: Mutex<HashMap<String, RestoreState>>,
    counter: AtomicU64,
    /// One export of a base image at a time: an image's export URL is
    /// shared, so guests on the same cached image (backed up in parallel)
    /// must not delete the export another one is still reading.
    base_exports: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The job of the last `job_init` (its marker names what we create).
    job: Mutex<Option<JobInfo>>,
}

/// The name of the platform objects one backup or restore of one guest
/// creates: `<job marker>.<scope>.<device>` (e.g.
/// `vmbackup.host-1.job-7.b0-1f3a9c2e.data-1`). `.` ends the marker and
/// the scope, so job `1` never matches job `10` nor scope `b1` scope
/// `b10`; matching is always exact, on the client, after the platform's
/// (case-insensitive, wildcard) `~=` query narrowed the candidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tag {
    marker: String,
    scope: String,
}

impl Tag {
    fn new(marker: &JobMarker, scope: String) -> Self {
        Tag {
            marker: marker.to_string(),
            scope,
        }
    }

    /// `<marker>.<scope>`: the common part of every name.
    fn prefix(&self) -> String {
        format!("{}.{}", self.marker, self.scope)
    }

    /// The name of the object made for `device`.
    fn name(&self, device: &str) -> String {
        format!("{}.{device}", self.prefix())
    }

    /// Whether `name` is the name of one of this tag's objects (exactly:
    /// the marker and the scope are whole, a device follows).
    fn owns(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|device| !device.is_empty())
    }

    /// The `~=` condition finding the candidates of [`Tag::owns`].
    fn like(&self, field: &str) -> String {
        format!("{field}~={}.%", like_escape(&self.prefix()))
    }
}

/// The `~=` condition on `field` finding every object named by a marker
/// of `host` (candidates: check with [`JobMarker::find_in`]).
fn host_like(field: &str, host: &str, anywhere: bool) -> String {
    let lead = if anywhere { "%" } else { "" };
    format!(
        "{field}~={lead}{}%",
        like_escape(&format!("{}{host}.", JobMarker::PREFIX))
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        std::fs::create_dir_all(options.work_dir.join("base-digests"))?;
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
        })?;
        Ok(ZStackProvider {
            options,
            client,
            backups: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            base_exports: Mutex::new(HashMap::new()),
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

    async fn export_and_download(
        &self,
        bs: &str,
        image: &str,
        path: &Path,
        digests: bool,
        what: &str,
        state_key: &str,
    ) -> Result<Downloaded> {
        // Known before the call: an export whose answer is lost is deleted too.
        if let Some(st) = lock(&self.backups).get_mut(state_key) {
            st.exports.push((bs.to_string(), image.to_string()));
        }
        let r: ExportResult = self
            .client
            .call_as(
                Method::PUT,
                &format!("/backup-storage/{bs}/actions"),
                Some(json!({"exportImageFromBackupStorage": {"imageUuid": image, "exportFormat": "raw"}})),
                "ExportImageFromBackupStorage",
            )
            .await?;
        let (url, md5) = (r.image_url, r.export_md5_sum);
        let dl = download::download(
            self.client.http(),
            &url,
            path,
            Some(&md5),
            digests,
            self.options.download_retries,
            what,
        )
        .await;
        // The export is removed right away, whatever the download did.
        let del = self.delete_export(bs, image).await;
        if del.is_ok()
            && let Some(st) = lock(&self.backups).get_mut(state_key)
        {
            st.exports.retain(|(b, i)| !(b == bs && i == image));
        }
        let dl = dl?;
        if let Some(st) = lock(&self.backups).get_mut(state_key) {
            st.resumes += dl.resumes;
        }
        Ok(dl)
    }

    async fn delete_export(&self, bs: &str, image: &str) -> Result<()> {
        self.client
            .call(
                Method::DELETE,
                &format!("/backup-storage/{bs}/exported-images/{image}"),
                None,
                "DeleteExportedImage",
            )
            .await
            .map(|_| ())
    }

    /// Deletes and expunges an image (every backup storage).
    async fn drop_image(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/images/{uuid}?deleteMode=Permissive"),
                None,
                "DeleteImage",
            )
            .await
        {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            r => r?,
        };
        self.client
            .call(
                Method::PUT,
                &format!("/images/{uuid}/actions"),
                Some(json!({"expungeImage": {}})),
                "ExpungeImage",
            )
            .await
            .map(|_| ())
    }

    /// Deletes a volume snapshot (gone already is fine).
    async fn drop_snapshot(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/volume-snapshots/{uuid}"),
                None,
                "DeleteVolumeSnapshot",
            )
            .await
        {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes every temporary image and volume snapshot named by `tag`
    /// (exactly, see [`Tag::owns`]). Returns the first error after trying
    /// everything.
    async fn sweep(&self, tag: &Tag) -> Result<()> {
        let mut first: Option<Error> = None;
        match self
            .client
            .query::<ImageInventory>("/images", &[tag.like("name")])
            .await
        {
            Ok(images) => {
                for img in images.iter().filter(|i| tag.owns(&i.name)) {
                    if let Err(e) = self.drop_image(&img.uuid).await {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        match self
            .client
            .query::<VolumeSnapshotInventory>("/volume-snapshots", &[tag.like("name")])
            .await
        {
            Ok(snaps) => {
                for sn in snaps.iter().filter(|s| tag.owns(&s.name)) {
                    if let Err(e) = self.drop_snapshot(&sn.uuid).await {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// `job_init`'s sweep: every object whose job marker names this host
    /// and a job that is not running ([`JobMarker::is_stale_for`]): VMs
    /// and data volumes a restore was creating (marker in the
    /// description), temporary templates and uploaded images, volume
    /// snapshots (marker in the name). Another host's objects and those
    /// of running jobs are never touched. Returns what was removed.
    async fn sweep_stale(&self, job: &JobInfo) -> Result<Vec<String>> {
        let stale = |text: Option<&str>| {
            text.and_then(JobMarker::find_in)
                .filter(|m| m.is_stale_for(job))
        };
        let mut removed = Vec::new();
        let vms: Vec<VmInventory> = self
            .client
            .query(
                "/vm-instances",
                &[host_like("description", &job.host_id, true)],
            )
            .await?;
        for vm in vms {
            if let Some(m) = stale(vm.description.as_deref()) {
                self.destroy_vm(&vm.uuid).await?;
                removed.push(format!("VM {} ({m})", vm.uuid));
            }
        }
        let vols: Vec<VolumeInventory> = self
            .client
            .query(
                "/volumes",
                &[
                    host_like("description", &job.host_id, true),
                    "type=Data".into(),
                ],
            )
            .await?;
        for v in vols {
            if let Some(m) = stale(v.description.as_deref()) {
                self.delete_volume(&v.uuid).await?;
                removed.push(format!("volume {} ({m})", v.uuid));
            }
        }
        let images: Vec<ImageInventory> = self
            .client
            .query("/images", &[host_like("name", &job.host_id, false)])
            .await?;
        for i in images {
            if let Some(m) = stale(Some(&i.name)) {
                self.drop_image(&i.uuid).await?;
                removed.push(format!("image {} ({m})", i.uuid));
            }
        }
        let snaps: Vec<VolumeSnapshotInventory> = self
            .client
            .query(
                "/volume-snapshots",
                &[host_like("name", &job.host_id, false)],
            )
            .await?;
        for sn in snaps {
            if let Some(m) = stale(Some(&sn.name)) {
                self.drop_snapshot(&sn.uuid).await?;
                removed.push(format!("volume snapshot {} ({m})", sn.uuid));
            }
        }
        Ok(removed)
    }

    /// Deletes a data volume (gone already is fine).
    async fn delete_volume(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/volumes/{uuid}"),
                None,
                "DeleteDataVolume",
            )
            .await
        {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn digest_cache(&self, image: &str) -> PathBuf {
        self.options
            .work_dir
            .join("base-digests")
            .join(format!("{}.sha256", safe(image)))
    }

    fn load_digests(&self, image: &str) -> Option<Vec<[u8; 32]>> {
        let bytes = std::fs::read(self.digest_cache(image)).ok()?;
        if bytes.len() % 32 != 0 {
            return None;
        }
        Some(
            bytes
                .chunks(32)
                .map(|c| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(c);
                    a
                })
                .collect(),
        )
    }

    fn save_digests(&self, image: &str, d: &[[u8; 32]]) {
        let bytes: Vec<u8> = d.iter().flatten().copied().collect();
        let path = self.digest_cache(image);
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// One volume: snapshot → template on backup storage → export →
    /// download; the temporary objects are deleted before returning.
    async fn fetch_volume(
        &self,
        key: &str,
        tag: &Tag,
        dir: &Path,
        bs: &str,
        vol: &VolumeInventory,
        digests: bool,
    ) -> Result<Downloaded> {
        let device = device_of(vol);
        let uuid = &vol.uuid;
        let name = tag.name(&device);
        let snap: InventoryAnswer<VolumeSnapshotInventory> = self
            .client
            .call_as(
                Method::POST,
                &format!("/volumes/{uuid}/volume-snapshots"),
                Some(json!({"params": {"name": name, "description": format!("vmbackup temporary snapshot ({})", tag.marker)}, "systemTags": [], "userTags": []})),
                "CreateVolumeSnapshot",
            )
            .await?;
        let snap_uuid = snap.inventory.uuid;
        let route = if vol.kind == "Root" {
            "root-volume-templates"
        } else {
            "data-volume-templates"
        };
        let image: InventoryAnswer<ImageInventory> = self
            .client
            .call_as_within(
                Method::POST,
                &format!("/images/{route}/from/volume-snapshots/{snap_uuid}"),
                Some(json!({"params": {"name": name, "backupStorageUuids": [bs], "description": format!("vmbackup temporary template ({})", tag.marker)}, "systemTags": [], "userTags": []})),
                if route == "root-volume-templates" {
                    "CreateRootVolumeTemplateFromVolumeSnapshot"
                } else {
                    "CreateDataVolumeTemplateFromVolumeSnapshot"
                },
                self.job_timeout_for(vol.size),
            )
            .await?;
        let image_uuid = image.inventory.uuid;
        let path = dir.join(format!("{device}.raw"));
        let dl = self
            .export_and_download(
                bs,
                &image_uuid,
                &path,
                digests,
                &format!("volume {device} ({uuid})"),
                key,
            )
            .await?;
        self.drop_image(&image_uuid).await?;
        self.drop_snapshot(&snap_uuid).await?;
        Ok(dl)
    }

    /// The base layer of a linked root volume, and the regions where the
    /// volume differs from it. `None` when the base image cannot be read
    /// (no longer on a backup storage): the volume is then stored in full.
    async fn base_layer(
        &self,
        key: &str,
        dir: &Path,
        bs: &str,
        image_uuid: &str,
        has_base: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Option<(BaseLayer, Vec<[u8; 32]>)>> {
        let export_lock = lock(&self.base_exports)
            .entry(image_uuid.to_string())
            .or_default()
            .clone();
        let _exporting = export_lock.lock().await;
        let cached = if has_base {
            self.load_digests(image_uuid)
        } else {
            None
        };
        if let Some(d) = cached {
            // The digests cover whole blocks: the image's own size is the
            // base layer's size, and not knowing it is an error.
            let size = match self
                .client
                .get_one::<ImageInventory>("/images", image_uuid)
                .await
            {
                Ok(img) => img.size,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    warnings.push(format!(
                        "base image {image_uuid} is no longer on a backup storage: the root volume is stored in full"
                    ));
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            return Ok(Some((
                BaseLayer::new(BaseImageId(image_uuid.to_string()), size, None),
                d,
            )));
        }
        let img: ImageInventory = match self.client.get_one("/images", image_uuid).await {
            Ok(i) => i,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                warnings.push(format!(
                    "base image {image_uuid} is no longer on a backup storage: the root volume is stored in full"
                ));
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let refs: Vec<String> = img
            .backup_storage_refs
            .iter()
            .map(|r| r.backup_storage_uuid.clone())
            .collect();
        if img.status != "Ready" || refs.is_empty() {
            warnings.push(format!(
                "base image {image_uuid} is {} on the backup storages: the root volume is stored in full",
                img.status
            ));
            return Ok(None);
        }
        if img.state != "Enabled" {
            warnings.push(format!(
                "base image {image_uuid} is {} and cannot be exported: the root volume is stored in full (flattened)",
                img.state
            ));
            return Ok(None);
        }
        let from = if refs.iter().any(|r| r == bs) {
            bs.to_string()
        } else {
            refs[0].clone()
        };
        let path = dir.join(format!("base-{}.raw", safe(image_uuid)));
        let dl = match self
            .export_and_download(
                &from,
                image_uuid,
                &path,
                true,
                &format!("base image {image_uuid}"),
                key,
            )
            .await
        {
            Ok(dl) => dl,
            // The flattened volume is in hand: it is stored in full
            // instead of failing the guest.
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                warnings.push(format!(
                    "base image {image_uuid} (rootImageUuid) could not be exported ({}): the root volume is stored in full (flattened)",
                    e.report()
                ));
                return Ok(None);
            }
        };
        let digests = dl.digests.clone().unwrap_or_default();
        self.save_digests(image_uuid, &digests);
        let access = if has_base {
            let _ = std::fs::remove_file(&path);
            None
        } else {
            Some((
                SnapshotAccess::FileHandle(FileAccess::new(path)),
                DirtySource::All,
            ))
        };
        Ok(Some((
            BaseLayer::new(BaseImageId(image_uuid.to_string()), dl.size, access),
            digests,
        )))
    }

    async fn backup_vm_inner(&self, guest: &Guest, request: &BackupVmRequest) -> Result<VmBackup> {
        let key = guest.id.0.clone();
        let (tag, dir) = {
            let b = lock(&self.backups);
            let st = b
                .get(&key)
                .ok_or_else(|| Error::invalid("backup_vm without backup_init"))?;
            (st.tag.clone(), st.dir.clone())
        };
        let (vm, raw_vm) = self.vm(guest).await?;
        let vols = volumes_of(&vm).map_err(|e| e.guest(&guest.id))?;
        // Volumes are processed one at a time: one temporary template at once.
        self.check_quota(1, "a backup (one temporary template at a time)")
            .await?;
        let bs = self.backup_storage().await?;
        std::fs::create_dir_all(&dir)?;
        let mut volumes = Vec::new();
        let mut metas = Vec::new();
        let mut warnings = Vec::new();
        for vol in vols {
            let device = device_of(&vol);
            let mode = request.mode(&device);
            let root_image = vol.root_image_uuid.clone().filter(|s| !s.is_empty());
            let linked = mode == BitmapMode::New && root_image.is_some();
            let dl = self
                .fetch_volume(&key, &tag, &dir, &bs, &vol, linked)
                .await
                .map_err(|e| e.volume(&device))?;
            if dl.size != vol.size {
                return Err(Error::new(
                    ErrorKind::Platform,
                    format!(
                        "the export of volume {} has {} bytes, the volume {}",
                        vol.uuid, dl.size, vol.size
                    ),
                )
                .volume(&device));
            }
            let mut base = None;
            let mut dirty = DirtySource::All;
            if let (true, Some(img)) = (linked, &root_image) {
                let has = request
                    .base_images
                    .has_base_image(&BaseImageId(img.clone()))
                    .await?;
                if let Some((layer, base_digests)) = self
                    .base_layer(&key, &dir, &bs, img, has, &mut warnings)
                    .await
                    .map_err(|e| e.volume(&device))?
                {
                    // Without the volume's digests nothing would differ from
                    // the base: refuse instead of storing the base's data.
                    let volume_digests = dl.digests.as_deref().ok_or_else(|| {
                        Error::other("the download computed no block digests of the volume")
                            .volume(&device)
                    })?;
                    let regions =
                        download::differing_regions(volume_digests, &base_digests, dl.size);
                    dirty = DirtySource::Regions(Box::new(RegionList::new(regions)));
                    base = Some(layer);
                }
            }
            let size = vol.size;
            metas.push(VolumeMeta {
                device: device.clone(),
                uuid: vol.uuid.clone(),
                kind: vol.kind.clone(),
                size,
                md5: dl.md5.clone(),
                root_image_uuid: root_image.clone(),
                device_id: u64::from(vol.device_id),
                name: vol.name.clone(),
            });
            volumes.push(
                VolumeAccess::new(
                    Volume {
                        device: device.clone(),
                        size,
                        format: VolumeFormat::Qcow2,
                    },
                    SnapshotAccess::FileHandle(FileAccess::new(dir.join(format!("{device}.raw")))),
                )
                .bitmap_mode(if mode == BitmapMode::None {
                    BitmapMode::None
                } else {
                    BitmapMode::New
                })
                .dirty(dirty)
                .base(base),
            );
        }
        let meta = Metadata {
            vm_uuid: guest.id.0.clone(),
            vm_name: vm.name.clone(),
            platform: vm.platform.clone().unwrap_or_default(),
            backup_storage_uuid: bs,
            volumes: metas,
        };
        let metadata = serde_json::to_value(&meta).map_err(|e| {
            Error::other("serialising the snapshot's ZStack metadata").with_source(e)
        })?;
        Ok(VmBackup::new(ConfigBlob::json(&raw_vm), volumes)
            .metadata(metadata)
            .warnings(warnings))
    }

    fn restore_state<R>(&self, guest: &Guest, f: impl FnOnce(&mut RestoreState) -> R) -> Result<R> {
        let mut r = lock(&self.restores);
        let st = r.get_mut(&guest.id.0).ok_or_else(|| {
            Error::invalid("no restore in progress for this guest").guest(&guest.id)
        })?;
        Ok(f(st))
    }

    async fn reusable_image(&self, v: &VolumeMeta) -> Result<Option<String>> {
        if v.md5.len() != 32 {
            return Ok(None);
        }
        let media = if v.kind == "Root" {
            "RootVolumeTemplate"
        } else {
            "DataVolumeTemplate"
        };
        let hits: Vec<ImageInventory> = self
            .client
            .query(
                "/images",
                &[
                    format!("md5Sum={}", v.md5),
                    format!("size={}", v.size),
                    "status=Ready".into(),
                    "state=Enabled".into(),
                    format!("mediaType={media}"),
                ],
            )
            .await?;
        // Checked again here: reusing a wrong image restores wrong data.
        Ok(hits
            .into_iter()
            .find(|i| {
                i.md5_sum.as_deref() == Some(v.md5.as_str())
                    && i.size == v.size
                    && i.status == "Ready"
                    && i.state == "Enabled"
                    && i.media_type == media
            })
            .map(|i| i.uuid))
    }

    /// Destroys then expunges a VM (a destroyed VM keeps its volumes
    /// until expunged; gone already is fine).
    async fn destroy_vm(&self, uuid: &str) -> Result<()> {
        match self
            .client
            .call(
                Method::DELETE,
                &format!("/vm-instances/{uuid}?deleteMode=Enforcing"),
                None,
                "DestroyVmInstance",
            )
            .await
        {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        match self
            .client
            .call(
                Method::PUT,
                &format!("/vm-instances/{uuid}/actions"),
                Some(json!({"expungeVmInstance": {}})),
                "ExpungeVmInstance",
            )
            .await
        {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The instance offering (or CPU and memory) and L3 networks of the
    /// restored VM: the provider options', else the backed-up VM's; each
    /// must exist on the target, checked before anything is created.
    async fn vm_shape(&self, backed: Option<&VmInventory>) -> Result<VmShape> {
        let exists = |resource: &'static str, uuid: String| async move {
            let hits: Vec<UuidInventory> = self
                .client
                .query(resource, &[format!("uuid={uuid}")])
                .await?;
            Ok::<bool, Error>(hits.iter().any(|h| h.uuid == uuid))
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let compute = match (
            nonempty(&self.options.instance_offering_uuid),
            backed.and_then(|v| nonempty(&v.instance_offering_uuid)),
        ) {
            (Some(o), _) => {
                if !exists("/instance-offerings", o.clone()).await? {
                    return Err(Error::not_found(format!(
                        "instance offering {o} (provider option instance_offering_uuid) does not exist on the target"
                    )));
                }
                Compute::Offering(o)
            }
            (None, Some(o)) => {
                if !exists("/instance-offerings", o.clone()).await? {
                    return Err(Error::not_found(format!(
                        "instance offering {o} of the backed-up VM does not exist on the target; \
                         set the provider option instance_offering_uuid to one that does"
                    )));
                }
                Compute::Offering(o)
            }
            (None, None) => match backed.map(|v| (v.cpu_num, v.memory_size)) {
                Some((Some(c), Some(m))) if c > 0 && m > 0 => Compute::CpuMemory(c, m),
                _ => {
                    return Err(Error::invalid(
                        "the backup records neither an instance offering nor CPU and memory of the VM; \
                         set the provider option instance_offering_uuid",
                    ));
                }
            },
        };
        let from_options = !self.options.l3_network_uuids.is_empty();
        let l3: Vec<String> = if from_options {
            self.options.l3_network_uuids.clone()
        } else {
            let mut nics: Vec<_> = backed.map(|v| v.vm_nics.clone()).unwrap_or_default();
            nics.sort_by_key(|n| n.device_id.unwrap_or(u32::MAX));
            let mut l3: Vec<String> = Vec::new();
            if let Some(d) = backed.and_then(|v| nonempty(&v.default_l3_network_uuid)) {
                l3.push(d);
            }
            for n in nics {
                if !n.l3_network_uuid.is_empty() && !l3.contains(&n.l3_network_uuid) {
                    l3.push(n.l3_network_uuid);
                }
            }
            l3
        };
        if l3.is_empty() {
            return Err(Error::invalid(
                "the backup records no L3 network of the VM; set the provider option l3_network_uuids",
            ));
        }
        for n in &l3 {
            if !exists("/l3-networks", n.clone()).await? {
                return Err(Error::not_found(if from_options {
                    format!(
                        "L3 network {n} (provider option l3_network_uuids) does not exist on the target"
                    )
                } else {
                    format!(
                        "L3 network {n} of the backed-up VM does not exist on the target; \
                         set the provider option l3_network_uuids to networks that do"
                    )
                }));
            }
        }
        Ok(VmShape {
            compute,
            l3_network_uuids: l3,
        })
    }

    /// Creates the VM and its data volumes. While this runs, the VM's and
    /// the volumes' descriptions carry the restore's tag (so that a job
    /// that dies here leaves objects the next `job_init` sweeps); once
    /// every volume is attached, the tags are replaced by plain
    /// descriptions, the VM's last. A VM without the tag is a finished
    /// restore and is never swept.
    async fn create_restored_vm(&self, st: &RestoreState) -> Result<()> {
        let root = st
            .meta
            .volumes
            .iter()
            .find(|v| v.kind == "Root")
            .and_then(|v| st.images.get(&v.device))
            .ok_or_else(|| {
                Error::invalid("the backup has no root volume image to create the VM from")
            })?;
        let in_progress = format!("vmbackup restore in progress ({})", st.tag.prefix());
        let mut params = json!({"name": st.name, "imageUuid": root.0, "resourceUuid": st.vm_uuid,
                                "l3NetworkUuids": st.shape.l3_network_uuids,
                                "defaultL3NetworkUuid": st.shape.l3_network_uuids.first(),
                                "description": format!("restored from {}: {in_progress}", st.meta.vm_uuid)});
        match &st.shape.compute {
            Compute::Offering(o) => params["instanceOfferingUuid"] = json!(o),
            Compute::CpuMemory(c, m) => {
                params["cpuNum"] = json!(c);
                params["memorySize"] = json!(m);
            }
        }
        self.client
            .call(
                Method::POST,
                "/vm-instances",
                Some(json!({"params": params, "systemTags": [], "userTags": []})),
                "CreateVmInstance",
            )
            .await?;
        let mut data: Vec<&VolumeMeta> = st
            .meta
            .volumes
            .iter()
            .filter(|v| v.kind != "Root")
            .collect();
        data.sort_by_key(|v| v.device_id);
        let mut created = Vec::new();
        for v in data {
            let (image, _) = st
                .images
                .get(&v.device)
                .ok_or_else(|| Error::invalid(format!("volume {} was not restored", v.device)))?;
            let vol: InventoryAnswer<VolumeInventory> = self
                .client
                .call_as(
                    Method::POST,
                    &format!("/volumes/data/from/data-volume-templates/{image}"),
                    Some(
                        json!({"params": {"name": format!("{}-{}", st.name, v.device),
                                           "description": in_progress},
                                "systemTags": [], "userTags": []}),
                    ),
                    "CreateDataVolumeFromVolumeTemplate",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
            let vol_uuid = vol.inventory.uuid;
            self.client
                .call(
                    Method::POST,
                    &format!("/volumes/{vol_uuid}/vm-instances/{}", st.vm_uuid),
                    None,
                    "AttachDataVolumeToVm",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
            created.push((vol_uuid, v));
        }
        for (vol_uuid, v) in created {
            self.client
                .call(
                    Method::PUT,
                    &format!("/volumes/{vol_uuid}/actions"),
                    Some(json!({"updateVolume": {"description": format!(
                        "vmbackup: volume {} of VM {} restored", v.device, st.meta.vm_uuid)}})),
                    "UpdateVolume",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
        }
        self.client
            .call(
                Method::PUT,
                &format!("/vm-instances/{}/actions", st.vm_uuid),
                Some(json!({"updateVmInstance": {"description": format!("restored from {}", st.meta.vm_uuid)}})),
                "UpdateVmInstance",
            )
            .await?;
        Ok(())
    }

    /// Removes what a failed restore created: the VM (with its attached
    /// volumes), data volumes not attached yet, uploaded images.
    async fn undo_restore(&self, st: &RestoreState) {
        if let Err(e) = self.destroy_vm(&st.vm_uuid).await {
            tracing::warn!(error = %e.report(), "destroying the VM of a failed restore");
        }
        let prefix = st.tag.prefix();
        let vols: Result<Vec<VolumeInventory>> = self
            .client
            .query(
                "/volumes",
                &[format!("description~=%{}%", like_escape(&prefix))],
            )
            .await;
        match vols {
            Ok(vols) => {
                for v in vols {
                    let exact = v
                        .description
                        .as_deref()
                        .is_some_and(|d| d.split([' ', '(', ')']).any(|w| w == prefix));
                    if exact && let Err(e) = self.delete_volume(&v.uuid).await {
                        tracing::warn!(error = %e.report(), "deleting a volume of a failed restore");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.report(), "finding the volumes of a failed restore")
            }
        }
        if let Err(e) = self.sweep(&st.tag).await {
            tracing::warn!(error = %e.report(), "removing the images of a failed restore");
        }
    }

    /// A kept restore image loses the restore's tag (it is no longer
    /// temporary); when renaming fails it is removed instead (it is only
    /// there to be reused).
    async fn keep_image(&self, st: &RestoreState, device: &str, image: &str) -> Result<()> {
        let renamed = self
            .client
            .call(
                Method::PUT,
                &format!("/images/{image}/actions"),
                Some(json!({"updateImage": {
                    "name": format!("{KEPT_PREFIX}{}-{device}", short(&marker_safe(&st.meta.vm_uuid))),
                    "description": format!("vmbackup: volume {device} of VM {} (kept for later restores)", st.meta.vm_uuid)}})),
                "UpdateImage",
            )
            .await;
        if let Err(e) = renamed {
            tracing::warn!(error = %e.report(), image, "renaming a kept restore image failed; removing it");
            self.drop_image(image).await?;
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
        lock(&self.backups).insert(
            guest.id.0.clone(),
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
        let st = lock(&self.backups).remove(&guest.id.0);
        let mut stats = BackupStats::default();
        let Some(st) = st else { return Ok(stats) };
        let mut first: Option<Error> = None;
        self.client.ensure_session().await.ok();
        for (bs, image) in &st.exports {
            if let Err(e) = self.delete_export(bs, image).await {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = self.sweep(&st.tag).await {
            first.get_or_insert(e);
        }
        if st.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&st.dir)
        {
            first.get_or_insert(e.into());
        }
        stats
            .extra
            .insert("export_resumes".into(), st.resumes.to_string());
        if !outcome.is_success() {
            tracing::info!(guest = %guest.id, "cleaned up after a failed backup");
        }
        match first {
            Some(e) => Err(e.guest(&guest.id)),
            None => Ok(stats),
        }
    }

    async fn restore_get_mechanism(&self, kind: GuestKind) -> Result<RestoreMechanism> {
        match kind {
            GuestKind::Vm => Ok(RestoreMechanism::QemuImg),
            GuestKind::Container => Err(Error::unsupported("container restore")),
        }
    }

    /// ZStack's backup storage host fetches AddImage URLs over http(s):
    /// the host serves the restore sources on an address it can reach.
    fn restore_source_kind(&self) -> RestoreSourceKind {
        RestoreSourceKind::Http
    }

    async fn archive_get_guest_config(&self, archive: &ArchiveView) -> Result<ConfigBlob> {
        archive.guest_config.clone().ok_or_else(|| {
            Error::not_found(format!(
                "snapshot {} has no guest configuration",
                archive.snapshot.id
            ))
        })
    }

    async fn archive_get_firewall_config(
        &self,
        _archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        Ok(None)
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let name = match &request.target {
            RestoreTarget::NewGuest { name } => name.clone(),
            _ => return Err(Error::unsupported("restore in place")),
        };
        let meta: Metadata =
            serde_json::from_value(request.archive.metadata.clone()).map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    "the snapshot's ZStack metadata does not parse",
                )
                .with_source(e)
            })?;
        self.client.ensure_session().await?;
        // The guest configuration is the backed-up VM's inventory.
        let backed: Option<VmInventory> = request
            .archive
            .guest_config
            .as_ref()
            .and_then(|c| serde_json::from_slice(&c.data).ok());
        let shape = self.vm_shape(backed.as_ref()).await?;
        let bs = match &self.options.backup_storage_uuid {
            Some(b) => b.clone(),
            None => self.backup_storage().await?,
        };
        let mut needed = 0;
        for v in &meta.volumes {
            if self.reusable_image(v).await?.is_none() {
                needed += 1;
            }
        }
        self.check_quota(needed, "this restore").await?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let vm_uuid = new_uuid(n);
        let name = name.unwrap_or_else(|| format!("{}-restored", meta.vm_name));
        let marker = self.marker_or(&format!("restore-{}", short(&vm_uuid)));
        let tag = Tag::new(&marker, format!("r{n}-{}", short(&vm_uuid)));
        lock(&self.restores).insert(
            vm_uuid.clone(),
            RestoreState {
                vm_uuid: vm_uuid.clone(),
                name: name.clone(),
                tag,
                meta,
                images: BTreeMap::new(),
                bs,
                shape,
            },
        );
        Ok(Guest {
            id: provider_api::GuestId(vm_uuid),
            kind: GuestKind::Vm,
            name: Some(name),
        })
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let device = request.volume.volume.device.clone();
        let (meta, tag, bs, platform) = self.restore_state(&request.guest, |st| {
            (
                st.meta.volumes.iter().find(|v| v.device == device).cloned(),
                st.tag.clone(),
                st.bs.clone(),
                st.meta.platform.clone(),
            )
        })?;
        let meta = meta.ok_or_else(|| {
            Error::not_found("the metadata does not list this volume").volume(&device)
        })?;
        if let Some(uuid) = self.reusable_image(&meta).await? {
            tracing::info!(device, image = %uuid, "reusing an image with the same md5 and size");
            self.restore_state(&request.guest, |st| {
                st.images.insert(device.clone(), (uuid, false))
            })?;
            return Ok(VolumeImport::default());
        }
        let media = if meta.kind == "Root" {
            "RootVolumeTemplate"
        } else {
            "DataVolumeTemplate"
        };
        let platform = if platform.is_empty() {
            "Linux".to_string()
        } else {
            platform
        };
        let url = &request.sources.merged;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            let scheme = url.split("://").next().unwrap_or(url);
            return Err(Error::invalid(format!(
                "ZStack's backup storage fetches images over http(s), the host offered a {scheme}:// source: serve restore sources over HTTP (restore_listen, advertise_url)"
            ))
            .volume(&device));
        }
        // What the error names: where the backup storage was sent (the
        // one-time path is left out).
        let site = url
            .split_once("://")
            .map(|(scheme, rest)| format!("{scheme}://{}", rest.split('/').next().unwrap_or("")))
            .unwrap_or_default();
        let inv: InventoryAnswer<ImageInventory> = self
            .client
            .call_as_within(
                Method::POST,
                "/images",
                Some(json!({"params": {
                    "name": tag.name(&device),
                    "url": url,
                    "mediaType": media,
                    "format": "raw",
                    "platform": platform,
                    "system": false,
                    "backupStorageUuids": [bs],
                    "description": format!("vmbackup restore of volume {} of VM {}", meta.uuid, request.volume.volume.device),
                }, "systemTags": [], "userTags": []})),
                "AddImage",
                self.job_timeout_for(meta.size),
            )
            .await
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!(
                        "ZStack's backup storage could not fetch the restore source from {site} (the advertised restore address; check advertise_url and that the backup storage host reaches it)"
                    ),
                )
                .with_source(e)
                .volume(&device)
            })?;
        let img = inv.inventory;
        let uuid = img.uuid;
        self.restore_state(&request.guest, |st| {
            st.images.insert(device.clone(), (uuid.clone(), true))
        })?;
        if img.size != meta.size {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "restored image {uuid} has {} bytes, the backup {}",
                    img.size, meta.size
                ),
            )
            .volume(&device));
        }
        // Compared when ZStack computed it (it may say "not calculated").
        let md5 = img.md5_sum.unwrap_or_default();
        if meta.md5.len() == 32 && md5.len() == 32 && md5 != meta.md5 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "restored image {uuid} has md5 {md5}, the backup {}",
                    meta.md5
                ),
            )
            .volume(&device));
        }
        Ok(VolumeImport::default())
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        if outcome.is_success() {
            return Ok(());
        }
        let (tag, uploaded) = self.restore_state(guest, |st| {
            let uploaded = st.images.remove(device).filter(|(_, up)| *up);
            (st.tag.clone(), uploaded)
        })?;
        // Also finds an image whose AddImage job never reported back.
        let name = tag.name(device);
        let images: Vec<ImageInventory> = self
            .client
            .query("/images", &[format!("name={name}")])
            .await?;
        let mut doomed: Vec<String> = images
            .into_iter()
            .filter(|i| i.name == name)
            .map(|i| i.uuid)
            .collect();
        doomed.extend(uploaded.map(|(uuid, _)| uuid));
        doomed.sort();
        doomed.dedup();
        for uuid in doomed {
            self.drop_image(&uuid).await.map_err(|e| e.volume(device))?;
        }
        Ok(())
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(st) = lock(&self.restores).remove(&guest.id.0) else {
            return Ok(());
        };
        let mut result = Ok(());
        if outcome.is_success() {
            result = self
                .create_restored_vm(&st)
                .await
                .map_err(|e| e.guest(&guest.id));
        }
        if result.is_err() || !outcome.is_success() {
            self.undo_restore(&st).await;
            return result;
        }
        // The VM exists: what remains is only the uploaded images, whose
        // names carry the restore's tag until kept or removed.
        for (device, (image, uploaded)) in &st.images {
            if !*uploaded {
                continue;
            }
            let r = if self.options.keep_restore_images {
                self.keep_image(&st, device, image).await
            } else {
                self.drop_image(image).await
            };
            // The restore itself succeeded; an image left here still has
            // the tag and is swept by a later job.
            if let Err(e) = r {
                tracing::warn!(error = %e.report(), image, "an uploaded image is left; the next job sweeps it");
            }
        }
        result
    }
}
