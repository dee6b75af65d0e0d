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
//!   polled until `transferring`, each disk exposed over NBD (mechanism
//!   `nbd`, see [Data path](#data-path)). Only `cow` disks with
//!   `backup=incremental` have checkpoints; other disks are read in full.
//!   Which disks are read as changes only follows the host's rule
//!   ([`BackupVmRequest::host_mode`]), never the provider's plan alone: a
//!   disk resized since the previous backup is read in full.
//!
//! ## Data path
//!
//! Snapshot attach: the host reads each attached disk snapshot as a local
//! file (the attachment's `logical_name`).
//!
//! Incremental: the API model offers no NBD access to an image transfer,
//! only its image server URL (imageio), and nothing is staged on disk.
//! Each backup runs its own NBD server on `127.0.0.1` (any free port) and
//! exports each disk as an [`imageio::ImageioExport`] named after the
//! volume's device:
//!
//! - a read is one ranged `GET` on the transfer URL (retried like every
//!   image server read);
//! - `base:allocation` answers from `extents?context=zero` (zero and hole
//!   flags), so holes and zero extents are never read;
//! - on a disk the host reads as changes only, `qemu:dirty-bitmap:<from
//!   checkpoint>` answers from `extents?context=dirty` and the volume's
//!   dirty source is [`DirtySource::NbdBitmap`]: the host's data mover
//!   reads only the dirty, allocated ranges, exactly as from qemu-nbd.
//!
//! The transfer URL is asked `OPTIONS` once per disk; the extents lists
//! are fetched once per disk, checked to cover every byte of the disk in
//! order (a region an answer skipped would be taken for unchanged or zero
//! and its data lost) and kept: they are small (one entry per run). An
//! image server that does not offer `extents` has its disks read in full,
//! every byte; an incremental that needs the dirty extents of such a
//! server fails, naming the URL. Because the export serves the whole
//! point-in-time image, the host may always read a disk in full (a resize,
//! a lost checkpoint), and the access is [`AccessScope::Whole`].
//!
//! Memory stays bounded whatever the disk size: the host keeps a few
//! reads in flight, and the NBD server's in-flight budgets (32 MiB per
//! connection, 128 MiB in total) cap what a client can make it hold. A
//! read the image server fails (retries spent) fails the NBD request with
//! `EIO` and a message naming the disk and offset; the host retries it,
//! then fails the volume. `backup_cleanup` (and `job_cleanup`, for a
//! backup whose cleanup never ran) closes the listener, removes the
//! exports and closes the connections before it finalizes the transfers:
//! nothing is left listening.
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
//! `backup_cleanup` runs on every path and is idempotent: it stops the
//! backup's NBD server, detaches every
//! disk this backup attached to the appliance, deletes the snapshot,
//! finalizes (or cancels) every image transfer and waits for it, then
//! finalizes the backup. Besides the ids it recorded, it sweeps by the
//! description `vmbackup:<archive> vmbackup.<host>.<job>` it gave its
//! snapshots, backups and image transfers, so an object whose creation
//! answer was lost (a malformed answer, a timeout) is found and removed
//! too. An attachment failing half-way leaves the disks already attached
//! to this cleanup.
//!
//! ## Interrupted jobs
//!
//! Every object the provider creates carries the job's
//! [`JobMarker`] (`vmbackup.<host>.<job>`) in its description. `job_init`
//! sweeps what an earlier job of the same host left when it died before
//! its cleanups (its marker names this host and a job that is not in
//! [`JobInfo::running_jobs`]): it finalizes (or cancels) that job's image
//! transfers and finalizes its backups (a backup left `ready` makes every
//! later backup of the VM fail), detaches its snapshot disks from the
//! appliance and deletes its snapshots. Objects of a running job or of
//! another host are never touched: the marker is parsed and compared
//! whole, never matched by prefix.
//!
//! ## Retries
//!
//! Answers 502, 503 and 504 and failed connections are retryable; calls
//! that are safe to repeat (`GET`s, the login, `DELETE`s, image server
//! reads) are retried with [`OvirtOptions::retry`] (see
//! [`provider_kit::retry()`]). Other calls run once.
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
//! API call (`POST /vms/{id}/snapshots`); a certificate the engine CA
//! ([`OvirtOptions::tls_ca`]) does not vouch for is refused, naming the
//! host (`host:port`) it came from; credentials never appear in
//! errors or logs ([`OvirtOptions`]' `Debug` hides the password). Answers
//! are read into the typed shapes of [`api`]: a field the provider acts on
//! that is missing or malformed is an [`ErrorKind::Platform`] error naming
//! the call and the field.
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

pub mod api;
pub mod client;
pub mod imageio;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use provider_api::*;
pub use provider_kit::RetryPolicy;
use serde::{Deserialize, Serialize};
use serde_json::json;

use client::Client;
pub use client::WireFormat;

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
    /// The engine's CA certificate (PEM, the engine's `ca.pem`): the only
    /// root trusted for the engine and its image servers (their
    /// certificates are always verified; absent: the system's roots).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Retries of calls that are safe to repeat (not part of the
    /// configuration file: the default suits engines).
    #[serde(skip)]
    pub retry: RetryPolicy,
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
            tls_ca: None,
            retry: RetryPolicy::default(),
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
    /// Storage domain: its id as the engine gives it (`<storage_domain
    /// id="…" href="…"/>`), or its name when only that was given.
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

    fn volume(&self) -> Volume {
        Volume {
            device: self.device.clone(),
            size: self.provisioned_size,
            format: self.volume_format(),
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
    /// Description of every object this backup creates:
    /// `vmbackup:<archive> <job marker>`.
    tag: String,
    mode: BackupMode,
    warnings: Vec<String>,
    snapshot_id: Option<String>,
    attached: Vec<String>,
    backup_id: Option<String>,
    transfers: Vec<String>,
    /// The loopback NBD server exporting the transfers (incremental mode).
    serving: Option<imageio::Serving>,
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
    client: Arc<Client>,
    appliance_id: Mutex<Option<String>>,
    engine_44: Mutex<Option<bool>>,
    job: Mutex<Option<JobInfo>>,
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

/// A `NotFound` answer read as "nothing there".
fn found<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn vm_path(vm: &str) -> String {
    format!("/vms/{vm}")
}

impl OvirtProvider {
    /// A provider with these options (no connection yet: `job_init` logs in).
    pub fn new(options: OvirtOptions) -> Result<Self> {
        let client = Arc::new(Client::new(
            &options.api_url,
            &options.sso(),
            &options.username,
            &options.password,
            options.format,
            options.retry,
            client::http_client(options.http_timeout, options.tls_ca.as_deref())?,
        )?);
        Ok(OvirtProvider {
            options,
            client,
            appliance_id: Mutex::new(None),
            engine_44: Mutex::new(None),
            job: Mutex::new(None),
            backups: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
        })
    }

    /// The options.
    pub fn options(&self) -> &OvirtOptions {
        &self.options
    }

    /// Where this provider serves disks over NBD right now: one loopback
    /// address per incremental backup between its `backup_vm` and its
    /// `backup_cleanup` (diagnostics and tests).
    pub fn nbd_addresses(&self) -> Vec<std::net::SocketAddr> {
        lock(&self.backups)
            .values()
            .filter_map(|s| s.serving.as_ref().map(|sv| sv.address()))
            .collect()
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
    async fn resolve_vm(&self, id_or_name: &str) -> Result<api::Vm> {
        if let Some(vm) = found(self.client.get_as(&vm_path(id_or_name)).await)? {
            return Ok(vm);
        }
        let q = format!("/vms?search=name%3D{}", id_or_name.replace(' ', "%20"));
        let list: api::Vms = self.client.get_as(&q).await?;
        list.vm
            .into_iter()
            .next()
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
        *lock(&self.appliance_id) = Some(vm.id.clone());
        Ok(vm.id)
    }

    async fn supports_incremental(&self) -> Result<bool> {
        if let Some(b) = *lock(&self.engine_44) {
            return Ok(b);
        }
        let root: api::ApiRoot = self.client.get_as("").await?;
        let v = root.product_info.version;
        let b = (v.major, v.minor) >= (4, 4);
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

    /// `text` with the job's marker: the description of every object the
    /// provider creates.
    fn tag(&self, text: &str) -> String {
        match lock(&self.job).as_ref() {
            Some(job) => format!("{text} {}", job.marker()),
            None => text.to_string(),
        }
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
        let list: api::DiskAttachments = self
            .client
            .get_as(&format!("/vms/{vm_id}/diskattachments"))
            .await?;
        let mut out: Vec<DiskRecord> = Vec::new();
        for a in list.disk_attachment {
            if a.disk.snapshot.is_some() {
                continue; // a disk snapshot attached for backup: never backed up
            }
            let disk_id = a.disk.id;
            let dcall = format!("GET /disks/{disk_id}");
            let d: api::Disk = self.client.get_as(&format!("/disks/{disk_id}")).await?;
            if d.id != disk_id {
                return Err(bad_answer(
                    &dcall,
                    format!("asked for disk {disk_id}, got disk {}", d.id),
                ));
            }
            let (size, format, alias) = (d.provisioned_size, d.format, d.alias);
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
                sparse: d.sparse,
                // Absent before 4.4, where no disk has incremental backup.
                backup: d.backup.unwrap_or_else(|| "none".into()),
                interface: a.interface,
                bootable: a.bootable,
                storage_domain: d
                    .storage_domains
                    .storage_domain
                    .into_iter()
                    .find_map(|s| s.id.or(s.name)),
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
        let call = format!("GET /vms/{vm_id}");
        let vm: api::Vm = self
            .client
            .get_as(&format!("/vms/{vm_id}?all_content=true"))
            .await?;
        let data = vm
            .initialization
            .map(|i| i.configuration.data)
            .ok_or_else(|| {
                bad_answer(
                    &call,
                    "missing field `initialization` (the OVF, asked for with all_content=true)"
                        .into(),
                )
            })?;
        client::xml_to_value(&data)
            .map_err(|e| bad_answer(&call, format!("the OVF is not valid XML: {e}")))?;
        Ok((
            vm.name,
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
            let a: api::DiskAttachment = self.client.get_as(&path).await?;
            Ok(a.logical_name.map(PathBuf::from))
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
        let snap: api::Created = self
            .client
            .post_as(
                &format!("/vms/{vm_id}/snapshots"),
                "snapshot",
                json!({"description": tag, "persist_memorystate": false}),
            )
            .await?;
        let sid = snap.id;
        self.state(guest, |s| s.snapshot_id = Some(sid.clone()))?;
        let spath = format!("/vms/{vm_id}/snapshots/{sid}");
        let scall = format!("GET {spath}");
        self.poll(&format!("snapshot {sid} stayed locked"), &scall, || async {
            let s: api::Snapshot = self.client.get_as(&spath).await?;
            match s.snapshot_status.as_str() {
                "ok" => Ok(Some(())),
                "locked" | "in_preview" => Ok(None),
                other => Err(platform(format!("snapshot {sid} is {other}")).api_call(&scall)),
            }
        })
        .await?;
        let dcall = format!("GET {spath}/disks");
        let sdisks: api::SnapshotDisks = self.client.get_as(&format!("{spath}/disks")).await?;
        let in_snapshot: Vec<String> = sdisks.disk.into_iter().map(|d| d.id).collect();
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
            volumes.push(VolumeAccess::new(
                d.volume(),
                SnapshotAccess::FileHandle(FileAccess::new(path)),
            ));
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
    ) -> Result<api::Backup> {
        let mut body = json!({
            "description": tag,
            "disks": {"disk": disks.iter().map(|d| json!({"id": d.disk_id})).collect::<Vec<_>>()},
        });
        if let Some(f) = from {
            body["from_checkpoint_id"] = json!(f);
        }
        let b: api::Created = self
            .client
            .post_as(&format!("/vms/{vm_id}/backups"), "backup", body)
            .await?;
        let bid = b.id;
        self.state(guest, |s| s.backup_id = Some(bid.clone()))?;
        let path = format!("/vms/{vm_id}/backups/{bid}");
        let pcall = format!("GET {path}");
        self.poll(
            &format!("backup {bid} did not get ready"),
            &pcall,
            || async {
                let b: api::Backup = self.client.get_as(&path).await?;
                match b.phase.as_str() {
                    "ready" => Ok(Some(b)),
                    "failed" | "succeeded" => Err(platform(format!(
                        "backup {bid} ended before it was ready ({})",
                        b.phase
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
        tag: &str,
    ) -> Result<api::ImageTransfer> {
        let t: api::Created = self
            .client
            .post_as(
                "/imagetransfers",
                "image_transfer",
                json!({
                    "description": tag,
                    "disk": {"id": disk.disk_id},
                    "backup": {"id": backup_id},
                    "direction": "download",
                    "format": "raw",
                    "inactivity_timeout": 3600,
                }),
            )
            .await?;
        let tid = t.id;
        self.state(guest, |s| s.transfers.push(tid.clone()))?;
        let path = format!("/imagetransfers/{tid}");
        let pcall = format!("GET {path}");
        self.poll(
            &format!("image transfer {tid} did not start"),
            &pcall,
            || async {
                let t: api::ImageTransfer = self.client.get_as(&path).await?;
                match t.phase.as_str() {
                    "transferring" => Ok(Some(t)),
                    "initializing" | "resuming" => Ok(None),
                    other => {
                        Err(platform(format!("image transfer {tid} is {other}")).api_call(&pcall))
                    }
                }
            },
        )
        .await
    }

    /// Exposes one disk's transfer on this backup's loopback NBD server
    /// ([`imageio::ImageioExport`]): `OPTIONS` on the transfer URL once;
    /// with `extents` offered, its `extents?context=zero` as
    /// `base:allocation`; with `dirty_since` (the checkpoint the host reads
    /// the changes since), `extents?context=dirty` as
    /// `qemu:dirty-bitmap:<checkpoint>`. Both lists are checked to cover
    /// every byte of the disk in order: a region an answer skipped would
    /// be taken for unchanged or zero and its data lost.
    async fn serve_disk(
        &self,
        guest: &Guest,
        transfer: &api::ImageTransfer,
        disk: &DiskRecord,
        dirty_since: Option<&str>,
    ) -> Result<NbdAccess> {
        let url = transfer.url(&format!("GET /imagetransfers/{}", transfer.id))?;
        let features = self.client.image_features(url).await?;
        let extents = features.iter().any(|f| f == "extents");
        if !extents && dirty_since.is_some() {
            return Err(platform(format!(
                "the image server at {url} does not offer extents (OPTIONS lists {features:?}): \
                 the changed regions of disk {} cannot be read",
                disk.alias
            ))
            .api_call(format!("OPTIONS {url}")));
        }
        let size = disk.provisioned_size;
        // The dirty extents first: the changes are what an incremental
        // cannot do without.
        let dirty = match dirty_since {
            Some(checkpoint) => {
                let what = "/images/{ticket}/extents?context=dirty";
                let list: Vec<api::DirtyExtent> = self
                    .client
                    .image_json(&format!("{url}/extents?context=dirty"), what)
                    .await?;
                let list: Vec<(u64, u64, u32)> = list
                    .iter()
                    .map(|e| (e.start, e.length, imageio::dirty_flags(e.dirty)))
                    .collect();
                Some((
                    format!("qemu:dirty-bitmap:{checkpoint}"),
                    imageio::extents(&format!("GET {what}"), &list, size)?,
                ))
            }
            None => None,
        };
        let allocation = if extents {
            let what = "/images/{ticket}/extents?context=zero";
            let list: Vec<api::ZeroExtent> = self
                .client
                .image_json(&format!("{url}/extents?context=zero"), what)
                .await?;
            let list: Vec<(u64, u64, u32)> = list
                .iter()
                .map(|e| (e.start, e.length, imageio::allocation_flags(e.zero, e.hole)))
                .collect();
            Some(imageio::extents(&format!("GET {what}"), &list, size)?)
        } else {
            tracing::info!(guest = %guest.id, device = %disk.device, "the image server offers no extents: every byte is read");
            None
        };
        let context = dirty.as_ref().map(|(c, _)| c.clone());
        let export = imageio::ImageioExport::new(
            self.client.clone(),
            url,
            &disk.device,
            size,
            allocation,
            dirty,
        );
        let address = self.serving(guest).await?;
        self.state(guest, |s| {
            if let Some(sv) = &s.serving {
                sv.add(&disk.device, Arc::new(export));
            }
        })?;
        Ok(NbdAccess::new(
            NbdAddress::Tcp {
                host: address.ip().to_string(),
                port: address.port(),
            },
            disk.device.clone(),
        )
        .with_dirty_bitmap(context))
    }

    /// This backup's loopback NBD server, started on first use.
    async fn serving(&self, guest: &Guest) -> Result<std::net::SocketAddr> {
        if let Some(a) = self.state(guest, |s| s.serving.as_ref().map(|sv| sv.address()))? {
            return Ok(a);
        }
        let sv = imageio::Serving::start().await?;
        let address = sv.address();
        // Recorded before any export is added: `backup_cleanup` closes it.
        self.state(guest, |s| s.serving = Some(sv))?;
        Ok(address)
    }

    async fn backup_incremental(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
        request: &BackupVmRequest,
    ) -> Result<Vec<VolumeAccess>> {
        use BitmapMode::{New, Use};
        let mut warnings = Vec::new();
        // Each disk's mode as the host will apply it: a Use the host turns
        // into a full read (a disk resized since the previous backup, ...)
        // is a full read here too, so that the whole disk is exposed.
        let mut modes: BTreeMap<String, BitmapMode> = BTreeMap::new();
        for d in disks {
            let provided = match request.mode(&d.device) {
                Use if d.incremental() => Use,
                _ if d.incremental() => New,
                _ => BitmapMode::None,
            };
            let (mode, why) = request.host_mode_why(&d.device, d.provisioned_size, provided);
            if provided == Use && mode != Use {
                warnings.push(format!(
                    "volume {}: {}; full backup",
                    d.device,
                    why.unwrap_or("the host reads it in full")
                ));
            }
            modes.insert(d.device.clone(), mode);
        }
        // The checkpoint the Use volumes start from (one per VM).
        let from = request.previous.as_ref().and_then(|p| {
            disks
                .iter()
                .filter(|d| modes[&d.device] == Use)
                .find_map(|d| p.snapshot.volume(&d.device)?.checkpoint.clone())
        });
        if from.is_none() {
            for (device, m) in modes.iter_mut().filter(|(_, m)| **m == Use) {
                warnings.push(format!(
                    "volume {device}: the previous backup has no checkpoint for it; full backup"
                ));
                *m = New;
            }
        }
        let uses = modes.values().any(|m| *m == Use);
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
                    if *m == Use {
                        *m = New;
                    }
                }
                self.start_backup(guest, vm_id, tag, disks, None).await?
            }
            Err(e) => return Err(e),
        };
        for w in &warnings {
            tracing::warn!(guest = %guest.id, "{w}");
        }
        self.state(guest, |s| s.warnings.extend(warnings))?;
        // The checkpoint the dirty extents are relative to.
        let since = from
            .as_deref()
            .filter(|_| modes.values().any(|m| *m == Use));
        let mut volumes = Vec::new();
        for d in disks {
            let t = self
                .open_transfer(guest, d, &backup.id, tag)
                .await
                .map_err(|e| e.volume(&d.device))?;
            let mode = modes[&d.device];
            // The API model has no NBD access to a transfer: serve it on
            // loopback NBD, read from the image server on demand.
            let access = self
                .serve_disk(guest, &t, d, since.filter(|_| mode == Use))
                .await
                .map_err(|e| e.volume(&d.device))?;
            let dirty = if mode == Use {
                DirtySource::NbdBitmap
            } else {
                DirtySource::All
            };
            let checkpoint = if d.incremental() {
                backup.to_checkpoint_id.clone().map(Checkpoint)
            } else {
                None
            };
            volumes.push(
                VolumeAccess::new(d.volume(), SnapshotAccess::Nbd(access))
                    .bitmap_mode(mode)
                    .dirty(dirty)
                    .checkpoint(checkpoint),
            );
        }
        Ok(volumes)
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
        match self
            .client
            .get_as::<api::ImageTransfers>("/imagetransfers")
            .await
        {
            Ok(list) => {
                for t in list.image_transfer {
                    if t.backup.as_ref().is_some_and(|b| b.id == backup_id)
                        && !transfers.contains(&t.id)
                    {
                        transfers.push(t.id);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        for tid in &transfers {
            if let Err(e) = self.finish_transfer(tid).await {
                first.get_or_insert(e);
            }
        }
        let path = format!("/vms/{vm_id}/backups/{backup_id}");
        let backup: api::Backup = match found(self.client.get_as(&path).await) {
            Ok(Some(b)) => b,
            Ok(None) => return first.map_or(Ok(()), Err),
            Err(e) => return Err(first.unwrap_or(e)),
        };
        if !backup.ended()
            && backup.phase != "finalizing"
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
                    let b: api::Backup = self.client.get_as(&path).await?;
                    Ok(b.ended().then_some(()))
                },
            )
            .await;
        match (first, r) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(()),
        }
    }

    /// Finalizes (or, when that is refused, cancels) one image transfer
    /// and waits until it has ended; a transfer that is gone is done.
    async fn finish_transfer(&self, tid: &str) -> Result<()> {
        let path = format!("/imagetransfers/{tid}");
        let Some(t) = found(self.client.get_as::<api::ImageTransfer>(&path).await)? else {
            return Ok(());
        };
        if !t.ended() && t.phase != "finalizing_success" {
            let r = self
                .client
                .post(&format!("{path}/finalize"), "action", json!({}))
                .await;
            if let Err(e) = r {
                self.client
                    .post(&format!("{path}/cancel"), "action", json!({}))
                    .await
                    .map_err(|_| e)?;
            }
        }
        let call = format!("GET {path}");
        self.poll(
            &format!("image transfer {tid} did not finish"),
            &call,
            || async {
                Ok(
                    found(self.client.get_as::<api::ImageTransfer>(&path).await)?
                        .is_none_or(|t| t.ended())
                        .then_some(()),
                )
            },
        )
        .await
    }

    /// Detaches the disks of `snapshots` (and `also`) from the appliance.
    async fn detach_snapshot_disks(
        &self,
        snapshots: &[String],
        also: &[String],
        errors: &mut Vec<Error>,
    ) {
        let app = match self.appliance().await {
            Ok(a) => a,
            Err(e) => return errors.push(e),
        };
        let mut detach: Vec<String> = also.to_vec();
        match self
            .client
            .get_as::<api::DiskAttachments>(&format!("/vms/{app}/diskattachments"))
            .await
        {
            Ok(list) => {
                for a in list.disk_attachment {
                    if a.disk
                        .snapshot
                        .as_ref()
                        .is_some_and(|s| snapshots.contains(&s.id))
                        && !detach.contains(&a.disk.id)
                    {
                        detach.push(a.disk.id);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        for d in detach {
            if let Err(e) = found(
                self.client
                    .delete(&format!("/vms/{app}/diskattachments/{d}"))
                    .await,
            ) {
                errors.push(e);
            }
        }
    }

    async fn delete_snapshots(&self, vm: &str, snapshots: &[String], errors: &mut Vec<Error>) {
        for s in snapshots {
            if let Err(e) = found(
                self.client
                    .delete(&format!("/vms/{vm}/snapshots/{s}"))
                    .await,
            ) {
                errors.push(e);
            }
        }
    }

    async fn cleanup_guest(&self, st: &BackupState) -> Vec<Error> {
        let mut errors = Vec::new();
        let vm = &st.vm_id;
        // 1. Image transfers and backups (incremental mode).
        let mut backups: Vec<String> = st.backup_id.iter().cloned().collect();
        if st.mode == BackupMode::Incremental {
            match found(
                self.client
                    .get_as::<api::Backups>(&format!("/vms/{vm}/backups"))
                    .await,
            ) {
                Ok(list) => {
                    for b in list.into_iter().flat_map(|l| l.backup) {
                        if b.description.as_deref() == Some(st.tag.as_str())
                            && !b.ended()
                            && !backups.contains(&b.id)
                        {
                            backups.push(b.id);
                        }
                    }
                }
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
            match self
                .client
                .get_as::<api::Snapshots>(&format!("/vms/{vm}/snapshots"))
                .await
            {
                Ok(list) => {
                    for s in list.snapshot {
                        if s.description.as_deref() == Some(st.tag.as_str())
                            && !snapshots.contains(&s.id)
                        {
                            snapshots.push(s.id);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
            self.detach_snapshot_disks(&snapshots, &st.attached, &mut errors)
                .await;
        }
        self.delete_snapshots(vm, &snapshots, &mut errors).await;
        errors
    }

    /// What an earlier job of this host that is no longer running left
    /// behind (its marker [`JobMarker::is_stale_for`] `job`): image
    /// transfers finalized, backups finalized, snapshot disks detached
    /// from the appliance, snapshots deleted. Returns the errors met; the
    /// sweep goes on past each.
    async fn sweep(&self, job: &JobInfo) -> Vec<Error> {
        let stale = |description: &Option<String>| {
            description
                .as_deref()
                .and_then(JobMarker::find_in)
                .is_some_and(|m| m.is_stale_for(job))
        };
        let mut errors = Vec::new();
        // 1. Transfers (those of stale backups go with their backup too).
        match self
            .client
            .get_as::<api::ImageTransfers>("/imagetransfers")
            .await
        {
            Ok(list) => {
                for t in list.image_transfer {
                    if !t.ended() && stale(&t.description) {
                        tracing::info!(transfer = %t.id, "finalizing an image transfer an interrupted job left");
                        if let Err(e) = self.finish_transfer(&t.id).await {
                            errors.push(e);
                        }
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        // 2. Backups and snapshots, VM by VM.
        let vms = match self.client.get_as::<api::Vms>("/vms").await {
            Ok(list) => list.vm,
            Err(e) => {
                errors.push(e);
                Vec::new()
            }
        };
        let backups_api = match self.supports_incremental().await {
            Ok(b) => b,
            Err(e) => {
                errors.push(e);
                false
            }
        };
        let mut snapshots: Vec<(String, String)> = Vec::new();
        for vm in &vms {
            if backups_api {
                match found(
                    self.client
                        .get_as::<api::Backups>(&format!("/vms/{}/backups", vm.id))
                        .await,
                ) {
                    Ok(list) => {
                        for b in list.into_iter().flat_map(|l| l.backup) {
                            if !b.ended() && stale(&b.description) {
                                tracing::info!(vm = %vm.id, backup = %b.id, phase = %b.phase, "finalizing a backup an interrupted job left");
                                if let Err(e) = self.finish_backup(&vm.id, &b.id, &[]).await {
                                    errors.push(e);
                                }
                            }
                        }
                    }
                    Err(e) => errors.push(e),
                }
            }
            match self
                .client
                .get_as::<api::Snapshots>(&format!("/vms/{}/snapshots", vm.id))
                .await
            {
                Ok(list) => snapshots.extend(
                    list.snapshot
                        .into_iter()
                        .filter(|s| stale(&s.description))
                        .map(|s| (vm.id.clone(), s.id)),
                ),
                Err(e) => errors.push(e),
            }
        }
        // 3. Their disks on the appliance, then the snapshots.
        let ids: Vec<String> = snapshots.iter().map(|(_, s)| s.clone()).collect();
        if !ids.is_empty() {
            self.detach_snapshot_disks(&ids, &[], &mut errors).await;
        }
        for (vm, s) in &snapshots {
            tracing::info!(vm = %vm, snapshot = %s, "deleting a snapshot an interrupted job left");
            self.delete_snapshots(vm, std::slice::from_ref(s), &mut errors)
                .await;
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
        // Snapshot attach is always a full backup; `Auto` is incremental
        // on 4.4+ (known once `job_init` has asked the engine).
        let incremental = match self.options.mode {
            BackupMode::SnapshotAttach => false,
            BackupMode::Incremental => true,
            BackupMode::Auto => lock(&self.engine_44).unwrap_or(true),
        };
        Capabilities::none()
            .incremental(incremental)
            .hot_add(true)
            .restore_in_place(true)
    }

    async fn job_init(&self, job: &JobInfo) -> Result<()> {
        self.client.login().await?;
        *lock(&self.engine_44) = None;
        *lock(&self.appliance_id) = None;
        *lock(&self.job) = Some(job.clone());
        self.appliance().await?;
        // What interrupted jobs of this host left. A failed sweep does not
        // fail the job: each backup cleans up after itself, and the next
        // job sweeps again.
        for e in self.sweep(job).await {
            tracing::warn!(error = %e.report(), "sweeping what an interrupted job left failed");
        }
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        let left: Vec<BackupState> = lock(&self.backups).drain().map(|(_, st)| st).collect();
        for mut st in left {
            if let Some(mut sv) = st.serving.take() {
                sv.close().await;
            }
        }
        *lock(&self.job) = None;
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
        let vm_id = vm.id;
        let mode = self.mode_for().await.map_err(|e| e.guest(&guest.id))?;
        let archive = ArchiveName::new(format!("vm/{vm_id}/{start_time}"))?;
        lock(&self.backups).insert(
            guest.id.0.clone(),
            BackupState {
                vm_id,
                tag: self.tag(&format!("vmbackup:{archive}")),
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
                let r = match found(self.client.get_as::<api::Checkpoint>(&path).await) {
                    Ok(Some(c)) if c.state == "created" => Ok(()),
                    Ok(Some(c)) => Err(format!("checkpoint {} is {}", cp.0, c.state)),
                    Ok(None) => Err(format!("checkpoint {} no longer exists", cp.0)),
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
            let metadata = serde_json::to_value(&metadata)
                .map_err(|e| Error::other("encoding the oVirt metadata").with_source(e))?;
            Ok(VmBackup::new(guest_config, volumes)
                .metadata(metadata)
                .warnings(warnings))
        }
        .await;
        r.map_err(|e| e.guest(&guest.id))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        let Some(mut st) = lock(&self.backups).remove(&guest.id.0) else {
            return Ok(BackupStats::default());
        };
        if !outcome.is_success() {
            tracing::info!(guest = %guest.id, "cleaning up after a failed backup");
        }
        // Nothing reads the transfers any more: stop serving them (the
        // port is closed when this returns) before they are finalized.
        if let Some(mut sv) = st.serving.take() {
            sv.close().await;
        }
        let errors = self.cleanup_guest(&st).await;
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
                let vm: api::Vm = self.client.get_as(&vm_path(&meta.vm_id)).await?;
                let status = vm.status;
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
                let vm: api::Created = self
                    .client
                    .post_as(
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
                let id = vm.id;
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
            other => Err(Error::unsupported(format!("restore target {other:?}"))),
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
                // The option names a domain; the metadata holds the id the
                // engine reported (a name in older metadata).
                let sd = match (&self.options.storage_domain, &record.storage_domain) {
                    (Some(name), _) => Some(json!({"name": name})),
                    (None, Some(id)) if looks_like_uuid(id) => Some(json!({"id": id})),
                    (None, Some(name)) => Some(json!({"name": name})),
                    (None, None) => None,
                };
                if let Some(sd) = sd {
                    body["storage_domains"] = json!({"storage_domain": [sd]});
                }
                let d: api::Created = self.client.post_as("/disks", "disk", body).await?;
                d.id
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
            Ok(VolumeImport::merged_into(SnapshotAccess::FileHandle(
                FileAccess::new(path),
            )))
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
        if !outcome.is_success() {
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
        if outcome.is_success() || !st.new_vm {
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
