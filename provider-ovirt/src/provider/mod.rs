//! [`OvirtProvider`]: the `BackupProvider` implementation (state, shared
//! plumbing, the job and its sweep, and the trait here; `backup` and
//! `restore` hold the two halves).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use provider_api::*;
use provider_kit::poll::{self, Poll, PollPolicy};
use provider_kit::{GuestStates, lock};
use serde_json::json;

use crate::api;
use crate::client::{self, Client};
use crate::imageio;
use crate::metadata::{DiskRecord, OvirtMetadata};
use crate::options::{BackupMode, OvirtOptions};

mod backup;
mod restore;

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
    serving: Option<provider_kit::http_export::LoopbackNbd>,
}

#[derive(Debug, Clone)]
struct RestoreDisk {
    disk_id: String,
    record: DiskRecord,
    attached_to_appliance: bool,
}

#[derive(Debug, Default)]
struct RestoreState {
    /// The VM restored to: the original (in place), or the id the new VM
    /// gets (chosen in `restore_vm_init`, written into the OVF).
    vm_id: String,
    new_vm: bool,
    metadata: Option<OvirtMetadata>,
    /// Volumes being written (between their init and their cleanup).
    disks: BTreeMap<String, RestoreDisk>,
    /// New VM: its name.
    name: String,
    /// New VM: the saved OVF.
    ovf: String,
    /// New VM from another platform's snapshot: its spec (the OVF is
    /// built from it once the disks exist) and the restore's warnings.
    foreign: Option<(GuestSpec, RestoreWarnings)>,
    /// New VM: every disk created (deleted when the restore fails).
    created: Vec<String>,
    /// New VM: the volumes written, by device.
    restored: BTreeMap<String, RestoreDisk>,
    /// New VM: `POST /vms` was sent (the VM may exist).
    vm_posted: bool,
    /// New VM: an id the engine answered other than `vm_id`.
    answered_vm: Option<String>,
}

/// The provider.
pub struct OvirtProvider {
    options: OvirtOptions,
    client: Arc<Client>,
    appliance_id: Mutex<Option<String>>,
    engine_44: Mutex<Option<bool>>,
    job: Mutex<Option<JobInfo>>,
    backups: GuestStates<BackupState>,
    restores: GuestStates<RestoreState>,
}

impl std::fmt::Debug for OvirtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvirtProvider")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
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

/// The names an attached disk has under `/dev/disk/by-id`: virtio disks
/// carry the first 20 characters of the disk id as their serial, SCSI
/// disks the whole id.
fn device_names(disk_id: &str) -> Vec<String> {
    let short: String = disk_id.chars().take(20).collect();
    vec![
        format!("virtio-{short}"),
        format!("scsi-0QEMU_QEMU_HARDDISK_{disk_id}"),
        format!("scsi-0QEMU_QEMU_HARDDISK_{short}"),
    ]
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
            backups: GuestStates::new("backup_init"),
            restores: GuestStates::new("restore_vm_init"),
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
        self.backups
            .collect(|s| s.serving.as_ref().map(|sv| sv.address()))
    }

    async fn poll<T, F, Fut>(&self, what: &str, call: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let policy = PollPolicy::new(self.options.poll_interval, self.options.operation_timeout);
        poll::until(
            &policy,
            || {
                let look = f();
                async move { Ok(look.await?.map_or(Poll::Pending(()), Poll::Done)) }
            },
            |_, _| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{what} after {:.1} s",
                        self.options.operation_timeout.as_secs_f64()
                    ),
                )
                .api_call(call)
            },
        )
        .await
    }

    /// The device of disk `disk_id` attached to the appliance, found the
    /// way the appliance sees it: its serial under
    /// [`OvirtOptions::device_root`] (`virtio-<id[..20]>`,
    /// `scsi-0QEMU_QEMU_HARDDISK_<id>`), waited for up to
    /// [`OvirtOptions::operation_timeout`]. With `logical_name_of`, the
    /// attachment's `logical_name` of that appliance VM is accepted too,
    /// when it names a device that exists here.
    async fn wait_device(&self, disk_id: &str, logical_name_of: Option<&str>) -> Result<PathBuf> {
        let root = &self.options.device_root;
        let names = device_names(disk_id);
        let deadline = Instant::now() + self.options.operation_timeout;
        loop {
            for n in &names {
                let link = root.join(n);
                // A dangling link (device not there yet) does not count.
                if let Ok(dev) = std::fs::canonicalize(&link) {
                    return Ok(dev);
                }
            }
            if let Some(vm) = logical_name_of {
                let path = format!("/vms/{vm}/diskattachments/{disk_id}");
                let a: api::DiskAttachment = self.client.get_as(&path).await?;
                if let Some(dev) = a.logical_name.map(PathBuf::from)
                    && dev.exists()
                {
                    return Ok(dev);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "disk {disk_id} attached to the backup appliance did not appear in {} \
                         (looked for {}) after {:.1} s",
                        root.display(),
                        names.join(", "),
                        self.options.operation_timeout.as_secs_f64()
                    ),
                ));
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
        self.backups.with(&guest.id, f)
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
        for mut st in self.backups.drain() {
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
        self.backups.insert(
            &guest.id.0,
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
            let (vm, guest_config) = self.ovf(&vm_id).await?;
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
            let spec = self.spec_of(guest, &vm, &disks).await;
            let metadata = OvirtMetadata {
                vm_id: vm_id.clone(),
                vm_name: vm.name,
                mode,
                disks,
            };
            let warnings = self.state(guest, |s| s.warnings.clone())?;
            let metadata = serde_json::to_value(&metadata)
                .map_err(|e| Error::other("encoding the oVirt metadata").with_source(e))?;
            Ok(VmBackup::new(guest_config, volumes)
                .metadata(metadata)
                .warnings(warnings)
                .spec(spec))
        }
        .await;
        r.map_err(|e| e.guest(&guest.id))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        let Some(mut st) = self.backups.take(&guest.id) else {
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
                self.backups.insert(&guest.id.0, st);
                Err(Error::new(e.kind(), "cleaning up the backup failed")
                    .with_source(e)
                    .guest(&guest.id))
            }
        }
    }

    /// oVirt keeps no firewall configuration with a VM (vNIC profiles
    /// and network filters belong to the cluster).
    async fn archive_get_firewall_config(
        &self,
        _archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        Ok(None)
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        self.init_restore(request).await
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        self.init_restore_volume(request).await
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        self.cleanup_restore_volume(guest, device, outcome).await
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        self.cleanup_restore(guest, outcome).await
    }
}
