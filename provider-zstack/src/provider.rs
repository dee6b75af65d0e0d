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
    FileAccess, Guest, GuestKind, IncrementalPlan, JobInfo, Outcome, PreviousBackup, RegionList,
    RestoreMechanism, RestoreTarget, RestoreVmRequest, RestoreVolumeRequest, Result,
    SnapshotAccess, VmBackup, Volume, VolumeAccess, VolumeFormat, VolumeImport,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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
    /// Longest wait for one API job, in seconds.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_secs: f64,
    /// How often a broken export download is resumed.
    #[serde(default = "default_retries")]
    pub download_retries: u32,
    /// Keep the images a restore uploaded (so that a later restore of the
    /// same data reuses them); otherwise they are deleted once the VM
    /// exists (its volumes stay in the primary storage image cache).
    #[serde(default = "yes")]
    pub keep_restore_images: bool,
}

fn default_poll_ms() -> u64 {
    200
}
fn default_job_timeout() -> f64 {
    600.0
}
fn default_retries() -> u32 {
    5
}
fn yes() -> bool {
    true
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
            download_retries: default_retries(),
            keep_restore_images: true,
        }
    }
}

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
    /// Name prefix of every platform object this backup creates.
    tag: String,
    dir: PathBuf,
    exports: Vec<(String, String)>,
    resumes: u32,
}

#[derive(Debug)]
struct RestoreState {
    vm_uuid: String,
    name: String,
    tag: String,
    meta: Metadata,
    /// device → (image uuid, uploaded by this restore)
    images: BTreeMap<String, (String, bool)>,
    bs: String,
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

fn str_of(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The device name of a volume: `root`, or `data-<deviceId>`.
fn device_of(vol: &Value) -> String {
    if str_of(vol, "type") == "Root" {
        "root".into()
    } else {
        format!("data-{}", vol["deviceId"].as_u64().unwrap_or(0))
    }
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
        })?;
        Ok(ZStackProvider {
            options,
            client,
            backups: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            base_exports: Mutex::new(HashMap::new()),
        })
    }

    /// The REST client (for tools and tests).
    pub fn client(&self) -> &ZStackClient {
        &self.client
    }

    async fn vm(&self, guest: &Guest) -> Result<Value> {
        self.client.ensure_session().await?;
        self.client
            .get_one("/vm-instances", &guest.id.0)
            .await
            .map_err(|e| e.guest(&guest.id))
    }

    fn volumes_of(vm: &Value) -> Vec<Value> {
        let mut v: Vec<Value> = vm["allVolumes"].as_array().cloned().unwrap_or_default();
        v.sort_by_key(|x| x["deviceId"].as_u64().unwrap_or(0));
        v
    }

    /// The backup storage to use.
    async fn backup_storage(&self) -> Result<String> {
        if let Some(b) = &self.options.backup_storage_uuid {
            let bs = self.client.get_one("/backup-storage", b).await?;
            if str_of(&bs, "status") != "Connected" {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!("backup storage {b} is {}", str_of(&bs, "status")),
                ));
            }
            return Ok(b.clone());
        }
        let list = self
            .client
            .query("/backup-storage", &["status=Connected".into()])
            .await?;
        list.first()
            .map(|b| str_of(b, "uuid"))
            .ok_or_else(|| Error::new(ErrorKind::Refused, "ZStack has no Connected backup storage"))
    }

    /// Refuses, before any work, when fewer than `needed` private images
    /// fit under the `image.num` quota.
    async fn check_quota(&self, needed: u64, what: &str) -> Result<()> {
        if needed == 0 {
            return Ok(());
        }
        let quotas = self
            .client
            .query("/accounts/quotas", &["name=image.num".into()])
            .await?;
        let Some(limit) = quotas.first().and_then(|q| q["value"].as_u64()) else {
            return Ok(());
        };
        let used = self
            .client
            .count("/images", &["system=false".into()])
            .await?;
        if used + needed > limit {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "ZStack private image quota image.num is reached: {used} of {limit} images exist and {what} needs {needed} more; delete or expunge images, or raise the quota"
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
        let r = self
            .client
            .call(
                Method::PUT,
                &format!("/backup-storage/{bs}/actions"),
                Some(json!({"exportImageFromBackupStorage": {"imageUuid": image, "exportFormat": "raw"}})),
                "ExportImageFromBackupStorage",
            )
            .await?;
        if let Some(st) = lock(&self.backups).get_mut(state_key) {
            st.exports.push((bs.to_string(), image.to_string()));
        }
        let url = str_of(&r, "imageUrl");
        let md5 = str_of(&r, "exportMd5Sum");
        let url = if url.is_empty() {
            str_of(&r["inventory"], "imageUrl")
        } else {
            url
        };
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

    /// Removes every platform object named with `tag` (temporary images,
    /// volume snapshots). Returns the first error after trying everything.
    async fn sweep(&self, tag: &str) -> Result<()> {
        let mut first: Option<Error> = None;
        let pattern = format!("name~={tag}%");
        match self
            .client
            .query("/images", std::slice::from_ref(&pattern))
            .await
        {
            Ok(images) => {
                for img in images {
                    if let Err(e) = self.drop_image(&str_of(&img, "uuid")).await {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        match self.client.query("/volume-snapshots", &[pattern]).await {
            Ok(snaps) => {
                for s in snaps {
                    let uuid = str_of(&s, "uuid");
                    if let Err(e) = self
                        .client
                        .call(
                            Method::DELETE,
                            &format!("/volume-snapshots/{uuid}"),
                            None,
                            "DeleteVolumeSnapshot",
                        )
                        .await
                        && e.kind() != ErrorKind::NotFound
                    {
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
        tag: &str,
        dir: &Path,
        bs: &str,
        vol: &Value,
        digests: bool,
    ) -> Result<Downloaded> {
        let device = device_of(vol);
        let uuid = str_of(vol, "uuid");
        let name = format!("{tag}-{device}");
        let snap = self
            .client
            .call(
                Method::POST,
                &format!("/volumes/{uuid}/volume-snapshots"),
                Some(json!({"params": {"name": name, "description": "vmbackup temporary snapshot"}, "systemTags": [], "userTags": []})),
                "CreateVolumeSnapshot",
            )
            .await?;
        let snap_uuid = str_of(&snap["inventory"], "uuid");
        let route = if str_of(vol, "type") == "Root" {
            "root-volume-templates"
        } else {
            "data-volume-templates"
        };
        let image = self
            .client
            .call(
                Method::POST,
                &format!("/images/{route}/from/volume-snapshots/{snap_uuid}"),
                Some(json!({"params": {"name": name, "backupStorageUuids": [bs], "description": "vmbackup temporary template"}, "systemTags": [], "userTags": []})),
                if route == "root-volume-templates" {
                    "CreateRootVolumeTemplateFromVolumeSnapshot"
                } else {
                    "CreateDataVolumeTemplateFromVolumeSnapshot"
                },
            )
            .await?;
        let image_uuid = str_of(&image["inventory"], "uuid");
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
        self.client
            .call(
                Method::DELETE,
                &format!("/volume-snapshots/{snap_uuid}"),
                None,
                "DeleteVolumeSnapshot",
            )
            .await?;
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
            let img = self.client.get_one("/images", image_uuid).await.ok();
            let size = img
                .as_ref()
                .and_then(|i| i["size"].as_u64())
                .unwrap_or(d.len() as u64 * download::BLOCK);
            return Ok(Some((
                BaseLayer {
                    id: BaseImageId(image_uuid.to_string()),
                    size,
                    access: None,
                },
                d,
            )));
        }
        let img = match self.client.get_one("/images", image_uuid).await {
            Ok(i) => i,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                warnings.push(format!(
                    "base image {image_uuid} is no longer on a backup storage: the root volume is stored in full"
                ));
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let refs: Vec<String> = img["backupStorageRefs"]
            .as_array()
            .map(|a| a.iter().map(|r| str_of(r, "backupStorageUuid")).collect())
            .unwrap_or_default();
        if str_of(&img, "status") != "Ready" || refs.is_empty() {
            warnings.push(format!(
                "base image {image_uuid} is {} on the backup storages: the root volume is stored in full",
                str_of(&img, "status")
            ));
            return Ok(None);
        }
        let from = if refs.iter().any(|r| r == bs) {
            bs.to_string()
        } else {
            refs[0].clone()
        };
        let path = dir.join(format!("base-{}.raw", safe(image_uuid)));
        let dl = self
            .export_and_download(
                &from,
                image_uuid,
                &path,
                true,
                &format!("base image {image_uuid}"),
                key,
            )
            .await
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("reading base image {image_uuid} (rootImageUuid)"),
                )
                .with_source(e)
            })?;
        let digests = dl.digests.clone().unwrap_or_default();
        self.save_digests(image_uuid, &digests);
        let access = if has_base {
            let _ = std::fs::remove_file(&path);
            None
        } else {
            Some((
                SnapshotAccess::FileHandle(FileAccess { path }),
                DirtySource::All,
            ))
        };
        Ok(Some((
            BaseLayer {
                id: BaseImageId(image_uuid.to_string()),
                size: dl.size,
                access,
            },
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
        let vm = self.vm(guest).await?;
        // Volumes are processed one at a time: one temporary template at once.
        self.check_quota(1, "a backup (one temporary template at a time)")
            .await?;
        let bs = self.backup_storage().await?;
        std::fs::create_dir_all(&dir)?;
        let mut volumes = Vec::new();
        let mut metas = Vec::new();
        let mut warnings = Vec::new();
        for vol in Self::volumes_of(&vm) {
            let device = device_of(&vol);
            let mode = request.mode(&device);
            let root_image = vol["rootImageUuid"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            let linked = mode == BitmapMode::New && root_image.is_some();
            let dl = self
                .fetch_volume(&key, &tag, &dir, &bs, &vol, linked)
                .await
                .map_err(|e| e.volume(&device))?;
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
                    let regions = download::differing_regions(
                        dl.digests.as_deref().unwrap_or(&[]),
                        &base_digests,
                        dl.size,
                    );
                    dirty = DirtySource::Regions(Box::new(RegionList::new(regions)));
                    base = Some(layer);
                }
            }
            let size = vol["size"].as_u64().unwrap_or(dl.size);
            metas.push(VolumeMeta {
                device: device.clone(),
                uuid: str_of(&vol, "uuid"),
                kind: str_of(&vol, "type"),
                size,
                md5: dl.md5.clone(),
                root_image_uuid: root_image.clone(),
                device_id: vol["deviceId"].as_u64().unwrap_or(0),
                name: str_of(&vol, "name"),
            });
            volumes.push(VolumeAccess {
                volume: Volume {
                    device: device.clone(),
                    size,
                    format: VolumeFormat::Qcow2,
                },
                access: SnapshotAccess::FileHandle(FileAccess {
                    path: dir.join(format!("{device}.raw")),
                }),
                bitmap_mode: if mode == BitmapMode::None {
                    BitmapMode::None
                } else {
                    BitmapMode::New
                },
                dirty,
                checkpoint: None,
                base,
            });
        }
        let meta = Metadata {
            vm_uuid: guest.id.0.clone(),
            vm_name: str_of(&vm, "name"),
            platform: str_of(&vm, "platform"),
            backup_storage_uuid: bs,
            volumes: metas,
        };
        Ok(VmBackup {
            guest_config: ConfigBlob::json(&vm),
            firewall_config: None,
            metadata: serde_json::to_value(&meta).unwrap_or(Value::Null),
            volumes,
            warnings,
        })
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
        let hits = self
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
        Ok(hits.first().map(|i| str_of(i, "uuid")))
    }

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
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

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
        self.client
            .call(
                Method::POST,
                "/vm-instances",
                Some(json!({"params": {"name": st.name, "imageUuid": root.0, "resourceUuid": st.vm_uuid,
                                        "description": format!("restored from {}", st.meta.vm_uuid)},
                            "systemTags": [], "userTags": []})),
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
        for v in data {
            let (image, _) = st
                .images
                .get(&v.device)
                .ok_or_else(|| Error::invalid(format!("volume {} was not restored", v.device)))?;
            let vol = self
                .client
                .call(
                    Method::POST,
                    &format!("/volumes/data/from/data-volume-templates/{image}"),
                    Some(json!({"params": {"name": format!("{}-{}", st.name, v.device)}, "systemTags": [], "userTags": []})),
                    "CreateDataVolumeFromVolumeTemplate",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
            let vol_uuid = str_of(&vol["inventory"], "uuid");
            self.client
                .call(
                    Method::POST,
                    &format!("/volumes/{vol_uuid}/vm-instances/{}", st.vm_uuid),
                    None,
                    "AttachDataVolumeToVm",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
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
        Capabilities::default()
    }

    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        self.client.login().await?;
        self.backup_storage().await.map(|_| ())
    }

    async fn job_cleanup(&self) -> Result<()> {
        self.client.logout().await;
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tag = format!("vmbackup-{}-{start_time}-{n}", short(&safe(&guest.id.0)));
        let dir = self.options.work_dir.join(&tag);
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
        let vm = self.vm(guest).await?;
        Ok(Self::volumes_of(&vm)
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
        if !outcome.success {
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
            RestoreTarget::InPlace => return Err(Error::unsupported("restore in place")),
            RestoreTarget::NewGuest { name } => name.clone(),
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
        let vm_uuid = new_uuid(self.counter.fetch_add(1, Ordering::Relaxed));
        let name = name.unwrap_or_else(|| format!("{}-restored", meta.vm_name));
        let tag = format!("vmbackup-restore-{}", short(&vm_uuid));
        lock(&self.restores).insert(
            vm_uuid.clone(),
            RestoreState {
                vm_uuid: vm_uuid.clone(),
                name: name.clone(),
                tag,
                meta,
                images: BTreeMap::new(),
                bs,
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
        let inv = self
            .client
            .call(
                Method::POST,
                "/images",
                Some(json!({"params": {
                    "name": format!("{tag}-{device}"),
                    "url": request.sources.merged,
                    "mediaType": media,
                    "format": "raw",
                    "platform": platform,
                    "system": false,
                    "backupStorageUuids": [bs],
                    "description": format!("vmbackup restore of volume {} of VM {}", meta.uuid, request.volume.volume.device),
                }, "systemTags": [], "userTags": []})),
                "AddImage",
            )
            .await
            .map_err(|e| e.volume(&device))?;
        let img = &inv["inventory"];
        let uuid = str_of(img, "uuid");
        self.restore_state(&request.guest, |st| {
            st.images.insert(device.clone(), (uuid.clone(), true))
        })?;
        let md5 = str_of(img, "md5Sum");
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
        if outcome.success {
            return Ok(());
        }
        let tag = self.restore_state(guest, |st| {
            st.images.remove(device);
            st.tag.clone()
        })?;
        // Also finds an image whose AddImage job never reported back.
        let images = self
            .client
            .query("/images", &[format!("name={tag}-{device}")])
            .await?;
        for i in images {
            self.drop_image(&str_of(&i, "uuid"))
                .await
                .map_err(|e| e.volume(device))?;
        }
        Ok(())
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(st) = lock(&self.restores).remove(&guest.id.0) else {
            return Ok(());
        };
        let mut result = Ok(());
        if outcome.success {
            result = self
                .create_restored_vm(&st)
                .await
                .map_err(|e| e.guest(&guest.id));
        }
        if result.is_err() || !outcome.success {
            let _ = self.destroy_vm(&st.vm_uuid).await;
            if let Err(e) = self.sweep(&st.tag).await {
                tracing::warn!(error = %e.report(), "removing the images of a failed restore");
            }
        } else if !self.options.keep_restore_images {
            for (image, uploaded) in st.images.values() {
                if *uploaded {
                    self.drop_image(image).await?;
                }
            }
        }
        result
    }
}
