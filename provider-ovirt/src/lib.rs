//! # provider-ovirt: back up and restore oVirt VMs
//!
//! A [`provider_api::BackupProvider`] for oVirt engines (REST API v4, XML
//! or JSON, see [`WireFormat`]). It runs inside (or next to) a *backup
//! appliance* VM: disks are read and written through that VM.
//!
//! ## Modes
//!
//! - **Snapshot attach** ([`BackupMode::SnapshotAttach`], the backup API
//!   of oVirt 3.4+): take a snapshot without memory, wait until it is `ok`,
//!   list its disks, attach each disk snapshot to the appliance (`disk id`
//!   plus `snapshot id`, `bootable=false`, `interface=virtio`,
//!   `active=true`), and let the host read the attached disk as a local
//!   file (mechanism `file-handle`: the attachment's `logical_name`).
//!   Always a full backup.
//! - **Incremental** ([`BackupMode::Incremental`], oVirt 4.4+): `POST
//!   /vms/{vm}/backups` (with `from_checkpoint_id` for an incremental),
//!   poll `phase` until `ready`, one raw download image transfer per disk,
//!   polled until `transferring`. The host reads each transfer through its
//!   NBD URL when the transfer offers one (mechanism `nbd`; imageio serves
//!   NBD to local clients, the mock hypervisor reports it as `nbd_url`);
//!   otherwise the provider downloads, with ranged GETs, exactly the
//!   regions the host will read (the dirty extents, or the data extents of
//!   `extents?context=zero`) into a sparse file under
//!   [`OvirtOptions::download_dir`] and exposes that file. Changed regions
//!   come from the image server's `extents?context=dirty`. Only `cow` disks
//!   with `backup=incremental` have checkpoints; other disks are read in
//!   full.
//!
//! [`BackupMode::Auto`] picks incremental on engines 4.4 and later and
//! snapshot attach before. Fallbacks to a full backup (checkpoint invalid
//! or missing, a disk without incremental backup) are automatic and leave
//! a warning in the stored snapshot.
//!
//! The guest configuration stored with each backup is the VM's OVF (`GET
//! /vms/{id}?all_content=true`); the metadata records each disk (id,
//! alias, size, format, sparseness, interface, bootable flag).
//!
//! ## Cleanup guarantees
//!
//! `backup_cleanup` runs on every path and is idempotent: it detaches every
//! disk this backup attached to the appliance, deletes the snapshot,
//! finalizes (or cancels) every image transfer and waits for it, then
//! finalizes the backup. Besides the ids it recorded, it sweeps by the
//! description `vmbackup:<archive>` it gave its snapshots and backups, so
//! an object whose creation answer was lost (a malformed answer, a
//! timeout) is found and removed too. An attachment failing half-way
//! leaves the disks already attached to this cleanup.
//!
//! ## Restore
//!
//! A new VM is created from the saved OVF; each disk is created with its
//! saved size, format and sparseness, attached to the appliance, written
//! by the host through the attachment's file, detached and attached to the
//! new VM. In place, each original disk (the VM must be down) is detached
//! from the VM, attached to the appliance, overwritten and re-attached with
//! its saved interface and bootable flag, on every path.
//!
//! ## Errors
//!
//! Errors name the guest, the volume, the offset where one applies and the
//! API call (`POST /vms/{id}/snapshots`); credentials never appear in
//! errors or logs ([`OvirtOptions`]' `Debug` hides the password).
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> provider_api::Result<()> {
//! use std::sync::Arc;
//! use provider_ovirt::{OvirtOptions, OvirtProvider};
//! let mut options = OvirtOptions::new(
//!     "https://engine.example/ovirt-engine/api",
//!     "admin@internal",
//!     "secret",
//!     "backup-appliance",
//! );
//! options.mode = provider_ovirt::BackupMode::Auto;
//! let provider: Arc<dyn provider_api::BackupProvider> = Arc::new(OvirtProvider::new(options)?);
//! // Hand `provider` to a host: engine::BackupDriver::new(provider, target, mover)...
//! # Ok(()) }
//! ```

pub mod client;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use provider_api::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use client::WireFormat;
use client::{Client, flag, items, nested_id, number, text};

/// How backups are taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMode {
    /// Incremental on 4.4+, snapshot attach before.
    #[default]
    Auto,
    /// Snapshot disks attached to the appliance (always full).
    SnapshotAttach,
    /// 4.4+ backups with checkpoints and image transfers.
    Incremental,
}

/// Settings of the provider.
#[derive(Clone, Serialize, Deserialize)]
pub struct OvirtOptions {
    /// API root, e.g. `https://engine/ovirt-engine/api`.
    pub api_url: String,
    /// SSO token URL (default: derived from `api_url`).
    pub sso_url: Option<String>,
    /// User (`admin@internal`).
    pub username: String,
    /// Password (never logged).
    pub password: String,
    /// The backup appliance VM (id or name).
    pub appliance: String,
    /// Wire format.
    pub format: WireFormat,
    /// Backup mode.
    pub mode: BackupMode,
    /// Cluster of restored VMs.
    pub cluster: String,
    /// Storage domain of restored disks (default: the saved one).
    pub storage_domain: Option<String>,
    /// Pause between status polls.
    pub poll_interval: Duration,
    /// How long a snapshot may stay `locked`, a backup may take to get
    /// ready, a transfer to start, an attached disk to show its path.
    pub operation_timeout: Duration,
    /// Timeout of one HTTP call.
    pub http_timeout: Duration,
    /// Where image transfers without NBD access are downloaded (sparse
    /// files, removed by `backup_cleanup`).
    pub download_dir: PathBuf,
}

impl std::fmt::Debug for OvirtOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvirtOptions")
            .field("api_url", &self.api_url)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("appliance", &self.appliance)
            .field("format", &self.format)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl OvirtOptions {
    /// Defaults: XML, automatic mode, cluster `Default`, 1 s polls,
    /// 10 min operation timeout.
    pub fn new(api_url: &str, username: &str, password: &str, appliance: &str) -> Self {
        OvirtOptions {
            api_url: api_url.to_string(),
            sso_url: None,
            username: username.to_string(),
            password: password.to_string(),
            appliance: appliance.to_string(),
            format: WireFormat::Xml,
            mode: BackupMode::Auto,
            cluster: "Default".into(),
            storage_domain: None,
            poll_interval: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(600),
            http_timeout: Duration::from_secs(120),
            download_dir: std::env::temp_dir().join("provider-ovirt"),
        }
    }

    fn sso(&self) -> String {
        self.sso_url.clone().unwrap_or_else(|| {
            let root = self
                .api_url
                .trim_end_matches('/')
                .trim_end_matches("/api")
                .to_string();
            format!("{root}/sso/oauth/token")
        })
    }
}

/// One disk as the metadata records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Device name in the archive.
    pub device: String,
    /// Disk id.
    pub disk_id: String,
    /// Alias.
    pub alias: String,
    /// Size in bytes.
    pub provisioned_size: u64,
    /// `raw` or `cow`.
    pub format: String,
    /// Thin provisioning.
    pub sparse: bool,
    /// `none` or `incremental`.
    pub backup: String,
    /// Attachment interface.
    pub interface: String,
    /// Bootable.
    pub bootable: bool,
    /// Storage domain name.
    pub storage_domain: Option<String>,
}

impl DiskRecord {
    fn incremental(&self) -> bool {
        self.format == "cow" && self.backup == "incremental"
    }

    fn volume_format(&self) -> VolumeFormat {
        if self.format == "cow" {
            VolumeFormat::Qcow2
        } else {
            VolumeFormat::Raw
        }
    }
}

/// Metadata stored with every backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvirtMetadata {
    /// Original VM id.
    pub vm_id: String,
    /// Original VM name.
    pub vm_name: String,
    /// Mode used.
    pub mode: BackupMode,
    /// Disks.
    pub disks: Vec<DiskRecord>,
}

#[derive(Debug, Default)]
struct BackupState {
    vm_id: String,
    tag: String,
    mode: BackupMode,
    warnings: Vec<String>,
    snapshot_id: Option<String>,
    attached: Vec<String>,
    backup_id: Option<String>,
    transfers: Vec<String>,
    files: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
struct RestoreDisk {
    disk_id: String,
    record: DiskRecord,
    attached_to_appliance: bool,
}

#[derive(Debug, Default)]
struct RestoreState {
    vm_id: String,
    new_vm: bool,
    metadata: Option<OvirtMetadata>,
    disks: BTreeMap<String, RestoreDisk>,
}

/// The provider.
pub struct OvirtProvider {
    options: OvirtOptions,
    client: Client,
    appliance_id: Mutex<Option<String>>,
    engine_44: Mutex<Option<bool>>,
    backups: Mutex<HashMap<String, BackupState>>,
    restores: Mutex<HashMap<String, RestoreState>>,
}

impl std::fmt::Debug for OvirtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvirtProvider")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn platform(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Platform, msg)
}

fn bad_answer(call: &str, e: String) -> Error {
    platform(format!("unexpected answer: {e}")).api_call(call)
}

fn vm_path(vm: &str) -> String {
    format!("/vms/{vm}")
}

/// Parses `nbd://host:port/export`.
fn parse_nbd_url(url: &str) -> Option<NbdAccess> {
    let rest = url.strip_prefix("nbd://")?;
    let (hostport, export) = rest.split_once('/')?;
    let (host, port) = hostport.rsplit_once(':')?;
    Some(NbdAccess {
        address: NbdAddress::Tcp {
            host: host.trim_matches(['[', ']']).to_string(),
            port: port.parse().ok()?,
        },
        export: export.to_string(),
        tls: None,
        dirty_bitmap_context: None,
    })
}

impl OvirtProvider {
    /// A provider with these options (no connection yet: `job_init` logs in).
    pub fn new(options: OvirtOptions) -> Result<Self> {
        let client = Client::new(
            &options.api_url,
            &options.sso(),
            &options.username,
            &options.password,
            options.format,
            options.http_timeout,
        )?;
        Ok(OvirtProvider {
            options,
            client,
            appliance_id: Mutex::new(None),
            engine_44: Mutex::new(None),
            backups: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
        })
    }

    /// The options.
    pub fn options(&self) -> &OvirtOptions {
        &self.options
    }

    async fn poll<T, F, Fut>(&self, what: &str, call: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + self.options.operation_timeout;
        loop {
            if let Some(t) = f().await? {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{what} after {:.1} s",
                        self.options.operation_timeout.as_secs_f64()
                    ),
                )
                .api_call(call));
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }

    /// Resolves a VM given by id or name.
    async fn resolve_vm(&self, id_or_name: &str) -> Result<Value> {
        match self.client.get(&vm_path(id_or_name)).await {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let q = format!("/vms?search=name%3D{}", id_or_name.replace(' ', "%20"));
        let list = self.client.get(&q).await?;
        items(&list, "vm")
            .into_iter()
            .next()
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no VM with id or name {id_or_name}")))
    }

    async fn appliance(&self) -> Result<String> {
        if let Some(a) = lock(&self.appliance_id).clone() {
            return Ok(a);
        }
        let vm = self
            .resolve_vm(&self.options.appliance)
            .await
            .map_err(|e| Error::new(e.kind(), "finding the backup appliance VM").with_source(e))?;
        let id = text(&vm, "id").ok_or_else(|| platform("the appliance VM has no id"))?;
        *lock(&self.appliance_id) = Some(id.clone());
        Ok(id)
    }

    async fn supports_incremental(&self) -> Result<bool> {
        if let Some(b) = *lock(&self.engine_44) {
            return Ok(b);
        }
        let api = self.client.get("").await?;
        let v = api
            .get("product_info")
            .and_then(|p| p.get("version"))
            .cloned()
            .unwrap_or(Value::Null);
        let major = number(&v, "major")
            .map_err(|e| bad_answer("GET /", e))?
            .unwrap_or(4);
        let minor = number(&v, "minor")
            .map_err(|e| bad_answer("GET /", e))?
            .unwrap_or(0);
        let b = (major, minor) >= (4, 4);
        *lock(&self.engine_44) = Some(b);
        Ok(b)
    }

    async fn mode_for(&self) -> Result<BackupMode> {
        Ok(match self.options.mode {
            BackupMode::Auto => {
                if self.supports_incremental().await? {
                    BackupMode::Incremental
                } else {
                    BackupMode::SnapshotAttach
                }
            }
            m => m,
        })
    }

    fn state<R>(&self, guest: &Guest, f: impl FnOnce(&mut BackupState) -> R) -> Result<R> {
        let mut all = lock(&self.backups);
        let st = all.get_mut(&guest.id.0).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "backup_init was not called").guest(&guest.id)
        })?;
        Ok(f(st))
    }

    /// The VM's own disks with their attachment settings, checked.
    async fn vm_disks(&self, vm_id: &str) -> Result<Vec<DiskRecord>> {
        let call = format!("GET /vms/{vm_id}/diskattachments");
        let list = self
            .client
            .get(&format!("/vms/{vm_id}/diskattachments"))
            .await?;
        let mut out: Vec<DiskRecord> = Vec::new();
        for a in items(&list, "disk_attachment") {
            if a.get("disk")
                .and_then(|d| nested_id(d, "snapshot"))
                .is_some()
            {
                continue; // a disk snapshot attached for backup: never backed up
            }
            let disk_id = a
                .get("disk")
                .and_then(|d| text(d, "id"))
                .or_else(|| text(a, "id"))
                .ok_or_else(|| bad_answer(&call, "an attachment without a disk id".into()))?;
            let dcall = format!("GET /disks/{disk_id}");
            let d = self.client.get(&format!("/disks/{disk_id}")).await?;
            let size = number(&d, "provisioned_size")
                .map_err(|e| bad_answer(&dcall, e))?
                .ok_or_else(|| bad_answer(&dcall, "no provisioned_size".into()))?;
            let format = text(&d, "format").unwrap_or_default();
            let alias = text(&d, "alias").unwrap_or_else(|| disk_id.clone());
            if format != "raw" && format != "cow" {
                return Err(Error::invalid(format!(
                    "disk {alias} has the unknown format {format:?} (expected raw or cow)"
                ))
                .volume(&alias)
                .api_call(&dcall));
            }
            out.push(DiskRecord {
                device: String::new(),
                disk_id: disk_id.clone(),
                alias,
                provisioned_size: size,
                format,
                sparse: flag(&d, "sparse")
                    .map_err(|e| bad_answer(&dcall, e))?
                    .unwrap_or(true),
                backup: text(&d, "backup").unwrap_or_else(|| "none".into()),
                interface: text(a, "interface").unwrap_or_else(|| "virtio".into()),
                bootable: flag(a, "bootable")
                    .map_err(|e| bad_answer(&call, e))?
                    .unwrap_or(false),
                storage_domain: items(
                    d.get("storage_domains").unwrap_or(&Value::Null),
                    "storage_domain",
                )
                .first()
                .and_then(|s| text(s, "name")),
            });
        }
        // Device names: the alias when unique and safe, else the disk id.
        let mut counts: HashMap<String, usize> = HashMap::new();
        for d in &out {
            *counts.entry(d.alias.clone()).or_default() += 1;
        }
        for d in &mut out {
            let safe = !d.alias.is_empty()
                && d.alias
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            d.device = if safe && counts[&d.alias] == 1 {
                d.alias.clone()
            } else {
                d.disk_id.clone()
            };
        }
        Ok(out)
    }

    async fn ovf(&self, vm_id: &str) -> Result<(String, ConfigBlob)> {
        let call = format!("GET /vms/{vm_id}?all_content=true");
        let vm = self
            .client
            .get(&format!("/vms/{vm_id}?all_content=true"))
            .await?;
        let data = vm
            .get("initialization")
            .and_then(|i| i.get("configuration"))
            .and_then(|c| text(c, "data"))
            .ok_or_else(|| {
                bad_answer(&call, "no initialization.configuration.data (OVF)".into())
            })?;
        client::xml_to_value(&data)
            .map_err(|e| bad_answer(&call, format!("the OVF is not valid XML: {e}")))?;
        Ok((
            text(&vm, "name").unwrap_or_default(),
            ConfigBlob {
                content_type: "application/ovf+xml".into(),
                data: data.into_bytes(),
            },
        ))
    }

    async fn wait_logical_name(&self, vm: &str, disk: &str) -> Result<PathBuf> {
        let path = format!("/vms/{vm}/diskattachments/{disk}");
        let call = format!("GET {path}");
        self.poll("the attached disk shows no logical_name", &call, || async {
            let a = self.client.get(&path).await?;
            Ok(text(&a, "logical_name").map(PathBuf::from))
        })
        .await
    }

    // ---------------------------------------------------- snapshot attach

    async fn backup_snapshot_attach(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
    ) -> Result<Vec<VolumeAccess>> {
        let appliance = self.appliance().await?;
        let call = format!("POST /vms/{vm_id}/snapshots");
        let snap = self
            .client
            .post(
                &format!("/vms/{vm_id}/snapshots"),
                "snapshot",
                json!({"description": tag, "persist_memorystate": false}),
            )
            .await?;
        let sid = text(&snap, "id").ok_or_else(|| bad_answer(&call, "no snapshot id".into()))?;
        self.state(guest, |s| s.snapshot_id = Some(sid.clone()))?;
        let spath = format!("/vms/{vm_id}/snapshots/{sid}");
        let scall = format!("GET {spath}");
        self.poll(&format!("snapshot {sid} stayed locked"), &scall, || async {
            let s = self.client.get(&spath).await?;
            match text(&s, "snapshot_status").as_deref() {
                Some("ok") => Ok(Some(())),
                Some("locked") | Some("in_preview") | None => Ok(None),
                Some(other) => Err(platform(format!("snapshot {sid} is {other}")).api_call(&scall)),
            }
        })
        .await?;
        let dcall = format!("GET {spath}/disks");
        let sdisks = self.client.get(&format!("{spath}/disks")).await?;
        let in_snapshot: Vec<String> = items(&sdisks, "disk")
            .into_iter()
            .filter_map(|d| text(d, "id"))
            .collect();
        let mut volumes = Vec::new();
        for d in disks {
            if !in_snapshot.contains(&d.disk_id) {
                return Err(bad_answer(
                    &dcall,
                    format!("snapshot {sid} has no image of disk {}", d.disk_id),
                )
                .volume(&d.device));
            }
            self.client
                .post(
                    &format!("/vms/{appliance}/diskattachments"),
                    "disk_attachment",
                    json!({
                        "disk": {"id": d.disk_id, "snapshot": {"id": sid}},
                        "active": true,
                        "bootable": false,
                        "interface": "virtio",
                    }),
                )
                .await
                .map_err(|e| e.volume(&d.device))?;
            self.state(guest, |s| s.attached.push(d.disk_id.clone()))?;
            let path = self
                .wait_logical_name(&appliance, &d.disk_id)
                .await
                .map_err(|e| e.volume(&d.device))?;
            volumes.push(VolumeAccess {
                volume: Volume {
                    device: d.device.clone(),
                    size: d.provisioned_size,
                    format: d.volume_format(),
                },
                access: SnapshotAccess::FileHandle(FileAccess { path }),
                bitmap_mode: BitmapMode::None,
                dirty: DirtySource::All,
                checkpoint: None,
                base: None,
            });
        }
        Ok(volumes)
    }

    // -------------------------------------------------------- incremental

    async fn start_backup(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
        from: Option<&str>,
    ) -> Result<Value> {
        let mut body = json!({
            "description": tag,
            "disks": {"disk": disks.iter().map(|d| json!({"id": d.disk_id})).collect::<Vec<_>>()},
        });
        if let Some(f) = from {
            body["from_checkpoint_id"] = json!(f);
        }
        let call = format!("POST /vms/{vm_id}/backups");
        let b = self
            .client
            .post(&format!("/vms/{vm_id}/backups"), "backup", body)
            .await?;
        let bid = text(&b, "id").ok_or_else(|| bad_answer(&call, "no backup id".into()))?;
        self.state(guest, |s| s.backup_id = Some(bid.clone()))?;
        let path = format!("/vms/{vm_id}/backups/{bid}");
        let pcall = format!("GET {path}");
        self.poll(
            &format!("backup {bid} did not get ready"),
            &pcall,
            || async {
                let b = self.client.get(&path).await?;
                match text(&b, "phase").as_deref() {
                    Some("ready") => Ok(Some(b)),
                    Some("failed") | Some("succeeded") => Err(platform(format!(
                        "backup {bid} ended before it was ready ({})",
                        text(&b, "phase").unwrap_or_default()
                    ))
                    .api_call(&pcall)),
                    _ => Ok(None),
                }
            },
        )
        .await
    }

    async fn open_transfer(
        &self,
        guest: &Guest,
        disk: &DiskRecord,
        backup_id: &str,
    ) -> Result<Value> {
        let call = "POST /imagetransfers";
        let t = self
            .client
            .post(
                "/imagetransfers",
                "image_transfer",
                json!({
                    "disk": {"id": disk.disk_id},
                    "backup": {"id": backup_id},
                    "direction": "download",
                    "format": "raw",
                    "inactivity_timeout": 3600,
                }),
            )
            .await?;
        let tid = text(&t, "id").ok_or_else(|| bad_answer(call, "no transfer id".into()))?;
        self.state(guest, |s| s.transfers.push(tid.clone()))?;
        let path = format!("/imagetransfers/{tid}");
        let pcall = format!("GET {path}");
        self.poll(
            &format!("image transfer {tid} did not start"),
            &pcall,
            || async {
                let t = self.client.get(&path).await?;
                match text(&t, "phase").as_deref() {
                    Some("transferring") => Ok(Some(t)),
                    Some("initializing") | Some("resuming") | None => Ok(None),
                    Some(other) => {
                        Err(platform(format!("image transfer {tid} is {other}")).api_call(&pcall))
                    }
                }
            },
        )
        .await
    }

    async fn dirty_extents(&self, transfer: &Value, size: u64) -> Result<Vec<Extent>> {
        let url = text(transfer, "transfer_url")
            .or_else(|| text(transfer, "proxy_url"))
            .ok_or_else(|| platform("the image transfer has no transfer_url"))?;
        let list = self
            .client
            .image_json(
                &format!("{url}/extents?context=dirty"),
                "/images/{ticket}/extents?context=dirty",
            )
            .await?;
        let mut out: Vec<Extent> = Vec::new();
        for e in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            let bad = |m: String| platform(format!("bad dirty extent {e}: {m}"));
            let start = number(e, "start").map_err(bad)?.unwrap_or(0);
            let length = number(e, "length").map_err(bad)?.unwrap_or(0);
            if !flag(e, "dirty").map_err(bad)?.unwrap_or(false) || length == 0 {
                continue;
            }
            let length = length.min(size.saturating_sub(start));
            match out.last_mut() {
                Some(last) if last.end() == start => last.length += length,
                _ if length > 0 => out.push(Extent::new(start, length)),
                _ => {}
            }
        }
        Ok(out)
    }

    async fn backup_incremental(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
        request: &BackupVmRequest,
    ) -> Result<Vec<VolumeAccess>> {
        let mut warnings = Vec::new();
        // The checkpoint the Use volumes start from (one per VM).
        let from = request.previous.as_ref().and_then(|p| {
            disks
                .iter()
                .filter(|d| request.mode(&d.device) == BitmapMode::Use)
                .find_map(|d| p.snapshot.volume(&d.device)?.checkpoint.clone())
        });
        let mut modes: BTreeMap<String, BitmapMode> = disks
            .iter()
            .map(|d| {
                let m = match request.mode(&d.device) {
                    BitmapMode::Use if from.is_some() && d.incremental() => BitmapMode::Use,
                    _ if d.incremental() => BitmapMode::New,
                    _ => BitmapMode::None,
                };
                (d.device.clone(), m)
            })
            .collect();
        let uses = modes.values().any(|m| *m == BitmapMode::Use);
        let from = from.filter(|_| uses).map(|c| c.0);
        let backup = match self
            .start_backup(guest, vm_id, tag, disks, from.as_deref())
            .await
        {
            Ok(b) => b,
            Err(e) if from.is_some() && e.kind() == ErrorKind::InvalidInput => {
                // The checkpoint went invalid between the query and now.
                let bid = self.state(guest, |s| s.backup_id.take())?;
                if let Some(bid) = bid {
                    self.finish_backup(vm_id, &bid, &[]).await?;
                }
                warnings.push(format!(
                    "checkpoint {} refused by the engine ({}); full backup",
                    from.as_deref().unwrap_or_default(),
                    e.message()
                ));
                for m in modes.values_mut() {
                    if *m == BitmapMode::Use {
                        *m = BitmapMode::New;
                    }
                }
                self.start_backup(guest, vm_id, tag, disks, None).await?
            }
            Err(e) => return Err(e),
        };
        self.state(guest, |s| s.warnings.extend(warnings))?;
        let bid = text(&backup, "id").unwrap_or_default();
        let to_checkpoint = text(&backup, "to_checkpoint_id");
        let mut volumes = Vec::new();
        for d in disks {
            let t = self
                .open_transfer(guest, d, &bid)
                .await
                .map_err(|e| e.volume(&d.device))?;
            let mode = modes[&d.device];
            let dirty_list = if mode == BitmapMode::Use {
                Some(
                    self.dirty_extents(&t, d.provisioned_size)
                        .await
                        .map_err(|e| e.volume(&d.device))?,
                )
            } else {
                None
            };
            let access = match text(&t, "nbd_url") {
                Some(url) => SnapshotAccess::Nbd(parse_nbd_url(&url).ok_or_else(|| {
                    platform(format!("unparsable nbd_url {url}")).volume(&d.device)
                })?),
                // No local NBD access: download what the host will read.
                None => SnapshotAccess::FileHandle(FileAccess {
                    path: self
                        .download(guest, &t, d, dirty_list.as_deref())
                        .await
                        .map_err(|e| e.volume(&d.device))?,
                }),
            };
            let dirty = match dirty_list {
                Some(list) => DirtySource::Regions(Box::new(RegionList::new(list))),
                None => DirtySource::All,
            };
            volumes.push(VolumeAccess {
                volume: Volume {
                    device: d.device.clone(),
                    size: d.provisioned_size,
                    format: d.volume_format(),
                },
                access,
                bitmap_mode: mode,
                dirty,
                checkpoint: if d.incremental() {
                    to_checkpoint.clone().map(Checkpoint)
                } else {
                    None
                },
                base: None,
            });
        }
        Ok(volumes)
    }

    /// Downloads a transfer through ranged GETs into a sparse file under
    /// [`OvirtOptions::download_dir`]: the dirty extents of an incremental,
    /// else the data extents (`extents?context=zero`). Regions not
    /// downloaded are holes; the host reads only the regions it is given.
    async fn download(
        &self,
        guest: &Guest,
        transfer: &Value,
        disk: &DiskRecord,
        dirty: Option<&[Extent]>,
    ) -> Result<PathBuf> {
        let url = text(transfer, "transfer_url")
            .or_else(|| text(transfer, "proxy_url"))
            .ok_or_else(|| platform("the image transfer has no transfer_url"))?;
        let regions: Vec<Extent> = match dirty {
            Some(d) => d.to_vec(),
            None => {
                let list = self
                    .client
                    .image_json(
                        &format!("{url}/extents?context=zero"),
                        "/images/{ticket}/extents?context=zero",
                    )
                    .await?;
                let mut out = Vec::new();
                for e in list.as_array().map(Vec::as_slice).unwrap_or_default() {
                    let bad = |m: String| platform(format!("bad extent {e}: {m}"));
                    let start = number(e, "start").map_err(bad)?.unwrap_or(0);
                    let length = number(e, "length").map_err(bad)?.unwrap_or(0);
                    if !flag(e, "zero").map_err(bad)?.unwrap_or(false) && length > 0 {
                        out.push(Extent::new(start, length));
                    }
                }
                out
            }
        };
        std::fs::create_dir_all(&self.options.download_dir)?;
        let path = self.options.download_dir.join(format!(
            "{}-{}.raw",
            text(transfer, "id").unwrap_or_else(|| disk.disk_id.clone()),
            disk.device
        ));
        self.state(guest, |s| s.files.push(path.clone()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.set_len(disk.provisioned_size)?;
        let file = std::sync::Arc::new(file);
        const PIECE: u64 = 8 << 20;
        for r in regions {
            let mut pos = r.offset;
            while pos < r.end().min(disk.provisioned_size) {
                let n = PIECE.min(r.end() - pos);
                let data = self
                    .client
                    .image_range(&url, pos, n)
                    .await
                    .map_err(|e| e.offset(pos))?;
                let f = file.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&data, pos)
                })
                .await
                .map_err(|e| Error::other("write task failed").with_source(e))?
                .map_err(|e| Error::from(e).offset(pos))?;
                pos += n;
            }
        }
        Ok(path)
    }

    /// Finalizes (or cancels) transfers, waits for them, then finalizes
    /// the backup and waits for its end.
    async fn finish_backup(
        &self,
        vm_id: &str,
        backup_id: &str,
        transfers: &[String],
    ) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut transfers: Vec<String> = transfers.to_vec();
        // Transfers the engine knows for this backup (lost answers).
        if let Ok(list) = self.client.get("/imagetransfers").await {
            for t in items(&list, "image_transfer") {
                if nested_id(t, "backup").as_deref() == Some(backup_id)
                    && let Some(id) = text(t, "id")
                    && !transfers.contains(&id)
                {
                    transfers.push(id);
                }
            }
        }
        for tid in &transfers {
            let path = format!("/imagetransfers/{tid}");
            let phase = match self.client.get(&path).await {
                Ok(t) => text(&t, "phase").unwrap_or_default(),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    first.get_or_insert(e);
                    continue;
                }
            };
            if !transfer_final(&phase) && phase != "finalizing_success" {
                let r = self
                    .client
                    .post(&format!("{path}/finalize"), "action", json!({}))
                    .await;
                if let Err(e) = r {
                    let c = self
                        .client
                        .post(&format!("{path}/cancel"), "action", json!({}))
                        .await;
                    if c.is_err() {
                        first.get_or_insert(e);
                        continue;
                    }
                }
            }
            let call = format!("GET {path}");
            let r = self
                .poll(
                    &format!("image transfer {tid} did not finish"),
                    &call,
                    || async {
                        let t = self.client.get(&path).await?;
                        Ok(transfer_final(&text(&t, "phase").unwrap_or_default()).then_some(()))
                    },
                )
                .await;
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        let path = format!("/vms/{vm_id}/backups/{backup_id}");
        let phase = match self.client.get(&path).await {
            Ok(b) => text(&b, "phase").unwrap_or_default(),
            Err(e) if e.kind() == ErrorKind::NotFound => return first.map_or(Ok(()), Err),
            Err(e) => return Err(first.unwrap_or(e)),
        };
        if !matches!(phase.as_str(), "succeeded" | "failed" | "finalizing")
            && let Err(e) = self
                .client
                .post(&format!("{path}/finalize"), "action", json!({}))
                .await
        {
            return Err(first.unwrap_or(e));
        }
        let call = format!("GET {path}");
        let r = self
            .poll(
                &format!("backup {backup_id} did not end"),
                &call,
                || async {
                    let b = self.client.get(&path).await?;
                    Ok(
                        matches!(text(&b, "phase").as_deref(), Some("succeeded" | "failed"))
                            .then_some(()),
                    )
                },
            )
            .await;
        match (first, r) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(()),
        }
    }

    async fn cleanup_guest(&self, st: &BackupState) -> Vec<Error> {
        let mut errors = Vec::new();
        let vm = &st.vm_id;
        // 1. Image transfers and backups (incremental mode).
        let mut backups: Vec<String> = st.backup_id.iter().cloned().collect();
        if st.mode == BackupMode::Incremental {
            match self.client.get(&format!("/vms/{vm}/backups")).await {
                Ok(list) => {
                    for b in items(&list, "backup") {
                        let phase = text(b, "phase").unwrap_or_default();
                        if text(b, "description").as_deref() == Some(st.tag.as_str())
                            && !matches!(phase.as_str(), "succeeded" | "failed")
                            && let Some(id) = text(b, "id")
                            && !backups.contains(&id)
                        {
                            backups.push(id);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => errors.push(e),
            }
        }
        for b in &backups {
            if let Err(e) = self.finish_backup(vm, b, &st.transfers).await {
                errors.push(e);
            }
        }
        // 2. Attachments on the appliance (snapshot-attach mode).
        let mut snapshots: Vec<String> = st.snapshot_id.iter().cloned().collect();
        if st.mode == BackupMode::SnapshotAttach {
            match self.client.get(&format!("/vms/{vm}/snapshots")).await {
                Ok(list) => {
                    for s in items(&list, "snapshot") {
                        if text(s, "description").as_deref() == Some(st.tag.as_str())
                            && let Some(id) = text(s, "id")
                            && !snapshots.contains(&id)
                        {
                            snapshots.push(id);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
            match self.appliance().await {
                Ok(app) => {
                    let mut detach: Vec<String> = st.attached.clone();
                    match self
                        .client
                        .get(&format!("/vms/{app}/diskattachments"))
                        .await
                    {
                        Ok(list) => {
                            for a in items(&list, "disk_attachment") {
                                let snap = a.get("disk").and_then(|d| nested_id(d, "snapshot"));
                                if snap.is_some_and(|s| snapshots.contains(&s))
                                    && let Some(id) = a.get("disk").and_then(|d| text(d, "id"))
                                    && !detach.contains(&id)
                                {
                                    detach.push(id);
                                }
                            }
                        }
                        Err(e) => errors.push(e),
                    }
                    for d in detach {
                        match self
                            .client
                            .delete(&format!("/vms/{app}/diskattachments/{d}"))
                            .await
                        {
                            Ok(()) => {}
                            Err(e) if e.kind() == ErrorKind::NotFound => {}
                            Err(e) => errors.push(e),
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for s in snapshots {
            match self
                .client
                .delete(&format!("/vms/{vm}/snapshots/{s}"))
                .await
            {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn restore_state<R>(&self, guest: &Guest, f: impl FnOnce(&mut RestoreState) -> R) -> Result<R> {
        let mut all = lock(&self.restores);
        let st = all.get_mut(&guest.id.0).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "restore_vm_init was not called").guest(&guest.id)
        })?;
        Ok(f(st))
    }

    async fn attach_to(&self, vm: &str, disk: &str, bootable: bool, interface: &str) -> Result<()> {
        self.client
            .post(
                &format!("/vms/{vm}/diskattachments"),
                "disk_attachment",
                json!({"disk": {"id": disk}, "active": true, "bootable": bootable, "interface": interface}),
            )
            .await
            .map(|_| ())
    }
}

fn transfer_final(phase: &str) -> bool {
    matches!(
        phase,
        "finished_success"
            | "finished_failure"
            | "cancelled"
            | "cancelled_user"
            | "cancelled_system"
    )
}

fn metadata_of(archive: &ArchiveView) -> Result<OvirtMetadata> {
    let m: OvirtMetadata = serde_json::from_value(archive.metadata.clone()).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("snapshot {} has no oVirt metadata", archive.snapshot.id),
        )
        .with_source(e)
    })?;
    for d in &m.disks {
        if d.format != "raw" && d.format != "cow" {
            return Err(Error::invalid(format!(
                "disk {} has the unknown format {:?} (expected raw or cow)",
                d.alias, d.format
            ))
            .volume(&d.device));
        }
    }
    Ok(m)
}

#[async_trait]
impl BackupProvider for OvirtProvider {
    fn provider_name(&self) -> &str {
        "ovirt"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            containers: false,
            incremental: true,
            hot_add: true,
            restore_in_place: true,
        }
    }

    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        self.client.login().await?;
        *lock(&self.engine_44) = None;
        *lock(&self.appliance_id) = None;
        self.appliance().await?;
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        lock(&self.backups).clear();
        self.client.logout();
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        if guest.kind != GuestKind::Vm {
            return Err(Error::unsupported("container backup").guest(&guest.id));
        }
        let vm = self
            .resolve_vm(&guest.id.0)
            .await
            .map_err(|e| e.guest(&guest.id))?;
        let vm_id = text(&vm, "id").ok_or_else(|| platform("the VM has no id").guest(&guest.id))?;
        let mode = self.mode_for().await.map_err(|e| e.guest(&guest.id))?;
        let archive = ArchiveName::new(format!("vm/{vm_id}/{start_time}"))?;
        lock(&self.backups).insert(
            guest.id.0.clone(),
            BackupState {
                vm_id,
                tag: format!("vmbackup:{archive}"),
                mode,
                ..BackupState::default()
            },
        );
        Ok(archive)
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        match self.state(guest, |s| s.mode)? {
            BackupMode::Incremental => Ok(BackupMechanism::Nbd),
            _ => Ok(BackupMechanism::FileHandle),
        }
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        let (vm_id, mode) = self.state(guest, |s| (s.vm_id.clone(), s.mode))?;
        if mode != BackupMode::Incremental {
            return Ok(IncrementalPlan::new());
        }
        let disks = self
            .vm_disks(&vm_id)
            .await
            .map_err(|e| e.guest(&guest.id))?;
        let mut plan = IncrementalPlan::new();
        let mut warnings = Vec::new();
        let mut checked: HashMap<String, std::result::Result<(), String>> = HashMap::new();
        for d in &disks {
            if !d.incremental() {
                if previous.is_some() {
                    warnings.push(format!(
                        "volume {}: {} disk without incremental backup (backup={}); full backup",
                        d.device, d.format, d.backup
                    ));
                }
                continue;
            }
            let prev_cp = previous
                .and_then(|p| p.snapshot.volume(&d.device))
                .filter(|v| v.bitmap_mode != BitmapMode::None)
                .and_then(|v| v.checkpoint.clone());
            let Some(cp) = prev_cp else {
                if previous.is_some() {
                    warnings.push(format!(
                        "volume {}: the previous backup has no checkpoint for it; full backup",
                        d.device
                    ));
                }
                plan.insert(d.device.clone(), BitmapMode::New);
                continue;
            };
            if !checked.contains_key(&cp.0) {
                let path = format!("/vms/{vm_id}/checkpoints/{}", cp.0);
                let r = match self.client.get(&path).await {
                    Ok(c) => match text(&c, "state").as_deref() {
                        Some("created") | None => Ok(()),
                        Some(s) => Err(format!("checkpoint {} is {s}", cp.0)),
                    },
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        Err(format!("checkpoint {} no longer exists", cp.0))
                    }
                    Err(e) => return Err(e.guest(&guest.id)),
                };
                checked.insert(cp.0.clone(), r);
            }
            match &checked[&cp.0] {
                Ok(()) => {
                    plan.insert(d.device.clone(), BitmapMode::Use);
                }
                Err(why) => {
                    warnings.push(format!("volume {}: {why}; full backup", d.device));
                    plan.insert(d.device.clone(), BitmapMode::New);
                }
            }
        }
        for w in &warnings {
            tracing::warn!(guest = %guest.id, "{w}");
        }
        self.state(guest, |s| s.warnings = warnings)?;
        Ok(plan)
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        let (vm_id, tag, mode) = self.state(guest, |s| (s.vm_id.clone(), s.tag.clone(), s.mode))?;
        let r = async {
            let disks = self.vm_disks(&vm_id).await?;
            if disks.is_empty() {
                return Err(Error::invalid("the VM has no disks to back up"));
            }
            let (vm_name, guest_config) = self.ovf(&vm_id).await?;
            let volumes = match mode {
                BackupMode::Incremental => {
                    self.backup_incremental(guest, &vm_id, &tag, &disks, &request)
                        .await?
                }
                _ => {
                    self.backup_snapshot_attach(guest, &vm_id, &tag, &disks)
                        .await?
                }
            };
            let metadata = OvirtMetadata {
                vm_id: vm_id.clone(),
                vm_name,
                mode,
                disks,
            };
            let warnings = self.state(guest, |s| s.warnings.clone())?;
            Ok(VmBackup {
                guest_config,
                firewall_config: None,
                metadata: serde_json::to_value(&metadata).unwrap_or_default(),
                volumes,
                warnings,
            })
        }
        .await;
        r.map_err(|e| e.guest(&guest.id))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        let Some(st) = lock(&self.backups).remove(&guest.id.0) else {
            return Ok(BackupStats::default());
        };
        if !outcome.success {
            tracing::info!(guest = %guest.id, "cleaning up after a failed backup");
        }
        let mut errors = self.cleanup_guest(&st).await;
        for f in &st.files {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(Error::from(e)),
            }
        }
        let mut stats = BackupStats::default();
        stats.extra.insert(
            "mode".into(),
            match st.mode {
                BackupMode::Incremental => "incremental".into(),
                _ => "snapshot-attach".into(),
            },
        );
        if let Some(s) = &st.snapshot_id {
            stats.extra.insert("snapshot".into(), s.clone());
        }
        if let Some(b) = &st.backup_id {
            stats.extra.insert("backup".into(), b.clone());
        }
        match errors.into_iter().next() {
            None => Ok(stats),
            Some(e) => {
                // Keep what is left so that a later cleanup retries it.
                lock(&self.backups).insert(guest.id.0.clone(), st);
                Err(Error::new(e.kind(), "cleaning up the backup failed")
                    .with_source(e)
                    .guest(&guest.id))
            }
        }
    }

    async fn restore_get_mechanism(&self, kind: GuestKind) -> Result<RestoreMechanism> {
        match kind {
            GuestKind::Vm => Ok(RestoreMechanism::QemuImg),
            GuestKind::Container => Err(Error::unsupported("container restore")),
        }
    }

    async fn archive_get_guest_config(&self, archive: &ArchiveView) -> Result<ConfigBlob> {
        archive
            .guest_config
            .clone()
            .ok_or_else(|| Error::not_found("the archive has no OVF configuration"))
    }

    async fn archive_get_firewall_config(
        &self,
        _archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        Ok(None)
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let meta = metadata_of(&request.archive)?;
        self.appliance().await?;
        match &request.target {
            RestoreTarget::InPlace => {
                let vm = self.client.get(&vm_path(&meta.vm_id)).await?;
                let status = text(&vm, "status").unwrap_or_default();
                if status != "down" {
                    return Err(Error::new(
                        ErrorKind::Refused,
                        format!(
                            "VM {} is {status}: shut it down before an in-place restore",
                            meta.vm_name
                        ),
                    )
                    .api_call(format!("GET /vms/{}", meta.vm_id)));
                }
                let current = self.vm_disks(&meta.vm_id).await?;
                for d in &meta.disks {
                    let now = current
                        .iter()
                        .find(|c| c.disk_id == d.disk_id)
                        .ok_or_else(|| {
                            Error::not_found(format!(
                                "disk {} is no longer attached to the VM",
                                d.disk_id
                            ))
                            .volume(&d.device)
                        })?;
                    if now.provisioned_size != d.provisioned_size {
                        return Err(Error::invalid(format!(
                            "disk {} is {} bytes now, {} in the backup",
                            d.alias, now.provisioned_size, d.provisioned_size
                        ))
                        .volume(&d.device));
                    }
                }
                lock(&self.restores).insert(
                    meta.vm_id.clone(),
                    RestoreState {
                        vm_id: meta.vm_id.clone(),
                        new_vm: false,
                        metadata: Some(meta.clone()),
                        disks: BTreeMap::new(),
                    },
                );
                Ok(Guest {
                    id: GuestId(meta.vm_id.clone()),
                    kind: GuestKind::Vm,
                    name: Some(meta.vm_name),
                })
            }
            RestoreTarget::NewGuest { name } => {
                let name = name
                    .clone()
                    .unwrap_or_else(|| format!("{}-restored", meta.vm_name));
                let ovf = String::from_utf8(request.guest_config.data.clone())
                    .map_err(|_| Error::invalid("the saved OVF is not UTF-8"))?;
                let vm = self
                    .client
                    .post(
                        "/vms",
                        "vm",
                        json!({
                            "name": name,
                            "cluster": {"name": self.options.cluster},
                            "template": {"name": "Blank"},
                            "initialization": {"configuration": {"type": "ovf", "data": ovf}},
                        }),
                    )
                    .await?;
                let id =
                    text(&vm, "id").ok_or_else(|| bad_answer("POST /vms", "no VM id".into()))?;
                lock(&self.restores).insert(
                    id.clone(),
                    RestoreState {
                        vm_id: id.clone(),
                        new_vm: true,
                        metadata: Some(meta),
                        disks: BTreeMap::new(),
                    },
                );
                Ok(Guest {
                    id: GuestId(id),
                    kind: GuestKind::Vm,
                    name: Some(name),
                })
            }
        }
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let device = request.volume.volume.device.clone();
        let guest = &request.guest;
        let (vm_id, new_vm, record) = self.restore_state(guest, |s| {
            let rec = s
                .metadata
                .as_ref()
                .and_then(|m| m.disks.iter().find(|d| d.device == device).cloned());
            (s.vm_id.clone(), s.new_vm, rec)
        })?;
        let record = record
            .ok_or_else(|| Error::not_found("the backup metadata does not describe this volume"))
            .map_err(|e| e.volume(&device))?;
        let appliance = self.appliance().await?;
        let r = async {
            let disk_id = if new_vm {
                let mut body = json!({
                    "alias": record.alias,
                    "provisioned_size": record.provisioned_size,
                    "format": record.format,
                    "sparse": record.sparse,
                    "backup": record.backup,
                });
                if let Some(sd) = self
                    .options
                    .storage_domain
                    .clone()
                    .or(record.storage_domain.clone())
                {
                    body["storage_domains"] = json!({"storage_domain": [{"name": sd}]});
                }
                let d = self.client.post("/disks", "disk", body).await?;
                text(&d, "id").ok_or_else(|| bad_answer("POST /disks", "no disk id".into()))?
            } else {
                self.client
                    .delete(&format!("/vms/{vm_id}/diskattachments/{}", record.disk_id))
                    .await?;
                record.disk_id.clone()
            };
            self.restore_state(guest, |s| {
                s.disks.insert(
                    device.clone(),
                    RestoreDisk {
                        disk_id: disk_id.clone(),
                        record: record.clone(),
                        attached_to_appliance: false,
                    },
                )
            })?;
            self.attach_to(&appliance, &disk_id, false, "virtio")
                .await?;
            self.restore_state(guest, |s| {
                if let Some(d) = s.disks.get_mut(&device) {
                    d.attached_to_appliance = true;
                }
            })?;
            let path = self.wait_logical_name(&appliance, &disk_id).await?;
            Ok(VolumeImport {
                writes: vec![LayerWrite {
                    layer: Layer::Merged,
                    destination: SnapshotAccess::FileHandle(FileAccess { path }),
                }],
            })
        }
        .await;
        r.map_err(|e: Error| e.volume(&device).guest(&guest.id))
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        let (vm_id, disk) =
            self.restore_state(guest, |s| (s.vm_id.clone(), s.disks.get(device).cloned()))?;
        let Some(disk) = disk else {
            return Ok(());
        };
        let mut first: Option<Error> = None;
        if disk.attached_to_appliance {
            let appliance = self.appliance().await?;
            match self
                .client
                .delete(&format!(
                    "/vms/{appliance}/diskattachments/{}",
                    disk.disk_id
                ))
                .await
            {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => first = Some(e),
            }
        }
        // The disk goes to the VM: restored, or back where it was.
        if first.is_none()
            && let Err(e) = self
                .attach_to(
                    &vm_id,
                    &disk.disk_id,
                    disk.record.bootable,
                    &disk.record.interface,
                )
                .await
        {
            first = Some(e);
        }
        if !outcome.success {
            tracing::warn!(guest = %guest.id, device, "volume restore failed");
        }
        self.restore_state(guest, |s| {
            s.disks.remove(device);
        })?;
        match first {
            None => Ok(()),
            Some(e) => Err(e.volume(device).guest(&guest.id)),
        }
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(st) = lock(&self.restores).remove(&guest.id.0) else {
            return Ok(());
        };
        if outcome.success || !st.new_vm {
            return Ok(());
        }
        // A failed restore to a new VM leaves no half-restored VM.
        let appliance = self.appliance().await?;
        for d in st.disks.values() {
            if d.attached_to_appliance {
                let _ = self
                    .client
                    .delete(&format!("/vms/{appliance}/diskattachments/{}", d.disk_id))
                    .await;
            }
            let _ = self.client.delete(&format!("/disks/{}", d.disk_id)).await;
        }
        self.client
            .delete(&vm_path(&st.vm_id))
            .await
            .map_err(|e| e.guest(&guest.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_urls() {
        let a = parse_nbd_url("nbd://127.0.0.1:10809/ovirt-transfer-x").unwrap();
        assert_eq!(a.uri(), "nbd://127.0.0.1:10809/ovirt-transfer-x");
        assert!(parse_nbd_url("http://x/y").is_none());
    }

    #[test]
    fn options_hide_the_password() {
        let o = OvirtOptions::new(
            "https://e/ovirt-engine/api",
            "admin@internal",
            "s3cret",
            "app",
        );
        assert!(!format!("{o:?}").contains("s3cret"));
        assert_eq!(o.sso(), "https://e/ovirt-engine/sso/oauth/token");
    }
}
