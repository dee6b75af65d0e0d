//! The backup transaction driver.
//!
//! Runs a job over a list of guests with one provider and one target and
//! enforces the guarantees of the contract whatever the provider does:
//!
//! - `job_cleanup` runs even when `job_init` failed (every guest is then
//!   reported failed without being touched);
//! - after `backup_init` was called, any failure of the guest, including in
//!   the success-path `backup_cleanup(true)` and in publishing the
//!   snapshot, gets `backup_cleanup(false, error)`, and no snapshot is
//!   published: a snapshot is published only after the provider's success
//!   cleanup returned;
//! - `backup_handle_log_file` is called exactly once per guest;
//! - one failed guest does not stop the job: the report has one outcome per
//!   guest, in input order;
//! - volumes left out of the incremental answer get bitmap mode `None`;
//!   `Use` without a usable previous volume (none stored, or a different
//!   size) becomes `New`, with a warning;
//! - without a bitmap (`New`, `None`) every region is read: the dirty-region
//!   iterator yields exactly `(0, size)` once (linked volumes in `New` mode
//!   read the overlay's regions on top of the stored base image).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use provider_api::{
    AccessScope, ArchiveName, BackupMechanism, BackupProvider, BackupVmRequest, BitmapMode,
    ConfigKind, DirtySource, Error, ErrorKind, Guest, GuestKind, JobInfo, Outcome, PreviousBackup,
    Result, SnapshotInfo, SnapshotSpec, SnapshotWriter, StartFrom, Target, TargetExt, VmBackup,
    VolumeAccess, VolumeSpec,
};
use tracing::Instrument;

use crate::cancel::CancelToken;
use crate::guest_log::GuestLog;
use crate::mover::{BackupCopy, CopyStats, DataMover, NoProgress, Progress};

/// The file archive a container's tree is stored as.
pub const CONTAINER_ARCHIVE: &str = "root";

/// Settings of a backup job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Job id and options handed to `job_init`.
    pub info: JobInfo,
    /// Guests backed up at once (at least 1).
    pub parallelism: usize,
    /// Directory for the per-guest task logs.
    pub log_dir: PathBuf,
}

/// What one volume's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    /// Device name.
    pub device: String,
    /// Size in bytes.
    pub size: u64,
    /// Bitmap mode used.
    pub bitmap_mode: BitmapMode,
    /// Whether a shared base image was stored with this backup.
    pub base_image_stored: bool,
    /// Copy statistics (volume and base image together).
    pub stats: CopyStats,
}

/// A guest's successful backup.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestBackup {
    /// The published snapshot.
    pub snapshot: SnapshotInfo,
    /// Per-volume figures.
    pub volumes: Vec<VolumeReport>,
    /// Time from `backup_init` to publication.
    pub elapsed: Duration,
}

/// One guest's outcome.
#[derive(Debug)]
pub struct GuestOutcome {
    /// The guest.
    pub guest: Guest,
    /// Its backup or what failed.
    pub result: Result<GuestBackup>,
    /// Its task log.
    pub log_file: PathBuf,
}

/// A job's outcome.
#[derive(Debug)]
pub struct JobReport {
    /// `job_init`'s error, if it failed.
    pub init_error: Option<Error>,
    /// `job_cleanup`'s error, if it failed.
    pub cleanup_error: Option<Error>,
    /// Per guest, in input order.
    pub guests: Vec<GuestOutcome>,
}

impl JobReport {
    /// True when the job and every guest succeeded.
    pub fn success(&self) -> bool {
        self.init_error.is_none()
            && self.cleanup_error.is_none()
            && self.guests.iter().all(|g| g.result.is_ok())
    }
}

/// Runs backup jobs.
pub struct BackupDriver {
    provider: Arc<dyn BackupProvider>,
    target: Arc<dyn Target>,
    mover: Arc<dyn DataMover>,
    progress: Arc<dyn Progress>,
}

impl BackupDriver {
    /// A driver for one provider and one target.
    pub fn new(
        provider: Arc<dyn BackupProvider>,
        target: Arc<dyn Target>,
        mover: Arc<dyn DataMover>,
    ) -> Self {
        BackupDriver {
            provider,
            target,
            mover,
            progress: Arc::new(NoProgress),
        }
    }

    /// Report copy progress to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// Run one job over `guests`.
    pub async fn run_job(&self, options: &JobOptions, guests: Vec<Guest>) -> JobReport {
        self.run_job_cancellable(options, guests, CancelToken::never())
            .await
    }

    /// Run one job over `guests` until it ends or `cancel` fires. On
    /// cancellation the copies in flight stop, every guest that started
    /// gets `backup_cleanup(false, "interrupted")` (nothing is published),
    /// guests not yet started fail without a provider call, and
    /// `job_cleanup` runs as always.
    pub async fn run_job_cancellable(
        &self,
        options: &JobOptions,
        guests: Vec<Guest>,
        cancel: CancelToken,
    ) -> JobReport {
        let span = tracing::info_span!("job", id = %options.info.job_id, provider = self.provider.provider_name());
        async {
            let _ = std::fs::create_dir_all(&options.log_dir);
            let init_error = self.provider.job_init(&options.info).await.err();
            let outcomes = match &init_error {
                Some(e) => {
                    tracing::error!(error = %e.report(), "job_init failed");
                    guests
                        .into_iter()
                        .map(|guest| GuestOutcome {
                            log_file: log_path(options, &guest),
                            result: Err(Error::new(
                                e.kind(),
                                format!("job_init failed: {}", e.report()),
                            )
                            .guest(&guest.id)),
                            guest,
                        })
                        .collect()
                }
                None => {
                    let start_time = options.info.start_time;
                    let mut indexed: Vec<(usize, GuestOutcome)> =
                        futures::stream::iter(guests.into_iter().enumerate())
                            .map(|(i, guest)| {
                                let cancel = cancel.clone();
                                async move {
                                    let o = self
                                        .backup_guest(options, guest, start_time, &cancel)
                                        .await;
                                    (i, o)
                                }
                            })
                            .buffer_unordered(options.parallelism.max(1))
                            .collect()
                            .await;
                    indexed.sort_by_key(|(i, _)| *i);
                    indexed.into_iter().map(|(_, o)| o).collect()
                }
            };
            let cleanup_error = self.provider.job_cleanup().await.err();
            if let Some(e) = &cleanup_error {
                tracing::error!(error = %e.report(), "job_cleanup failed");
            }
            JobReport {
                init_error,
                cleanup_error,
                guests: outcomes,
            }
        }
        .instrument(span)
        .await
    }

    /// Back up one guest: the whole per-guest transaction with its
    /// cleanups. Never panics because of what the provider returns.
    async fn backup_guest(
        &self,
        options: &JobOptions,
        guest: Guest,
        start_time: i64,
        cancel: &CancelToken,
    ) -> GuestOutcome {
        let span = tracing::info_span!("guest", id = %guest.id);
        async {
            let log = GuestLog::create(log_path(options, &guest));
            log.line(format!(
                "backup of {} {} started",
                kind_name(guest.kind),
                guest.id
            ));
            let started = Instant::now();
            let result = if cancel.is_cancelled() {
                Err(interrupted("before this guest started"))
            } else {
                self.backup_guest_inner(&guest, start_time, &log, cancel)
                    .await
            };
            let result = match result {
                Ok((snapshot, volumes)) => Ok(GuestBackup {
                    snapshot,
                    volumes,
                    elapsed: started.elapsed(),
                }),
                Err(e) => Err(e.guest(&guest.id)),
            };
            match &result {
                Ok(b) => log.line(format!("backup finished: snapshot {}", b.snapshot.id)),
                Err(e) => log.line(format!("ERROR: backup failed: {}", e.report())),
            }
            if let Err(e) = self
                .provider
                .backup_handle_log_file(&guest, log.path())
                .await
            {
                tracing::warn!(error = %e.report(), "backup_handle_log_file failed");
            }
            GuestOutcome {
                log_file: log.path().to_path_buf(),
                guest,
                result,
            }
        }
        .instrument(span)
        .await
    }

    async fn backup_guest_inner(
        &self,
        guest: &Guest,
        start_time: i64,
        log: &GuestLog,
        cancel: &CancelToken,
    ) -> Result<(SnapshotInfo, Vec<VolumeReport>)> {
        let mut writer: Option<Box<dyn SnapshotWriter>> = None;
        // On cancellation the attempt stops before its next provider call
        // or in the middle of a copy (a provider call in flight finishes:
        // dropping it could lose the id of an object the platform is
        // creating); the open writer stays in `writer` and is aborted
        // below, and the provider gets its failure cleanup.
        let attempt = self
            .attempt(guest, start_time, log, &mut writer, cancel)
            .await;
        let failure = match attempt {
            Ok((spec_writer, warnings, volumes)) => {
                // Success path: the provider's cleanup first, then publish.
                match self.provider.backup_cleanup(guest, &Outcome::ok()).await {
                    Ok(stats) => {
                        log.line(format!("backup_cleanup: {:?}", stats.extra));
                        match spec_writer.commit(warnings).await {
                            Ok(info) => return Ok((info, volumes)),
                            Err(e) => {
                                let e = Error::new(e.kind(), "publishing the snapshot failed")
                                    .with_source(e);
                                // The provider already cleaned up as if the
                                // backup succeeded: tell it that it did not.
                                self.failure_cleanup(guest, &e, log).await;
                                return Err(e);
                            }
                        }
                    }
                    Err(e) => {
                        let e = Error::new(e.kind(), "backup_cleanup after success failed")
                            .with_source(e);
                        if let Err(a) = spec_writer.abort().await {
                            log.warn(format!("aborting the snapshot failed: {}", a.report()));
                        }
                        e
                    }
                }
            }
            Err(e) => {
                if let Some(w) = writer.take()
                    && let Err(a) = w.abort().await
                {
                    log.warn(format!("aborting the snapshot failed: {}", a.report()));
                }
                e
            }
        };
        self.failure_cleanup(guest, &failure, log).await;
        Err(failure)
    }

    async fn failure_cleanup(&self, guest: &Guest, error: &Error, log: &GuestLog) {
        if let Err(c) = self
            .provider
            .backup_cleanup(guest, &Outcome::failed(error))
            .await
        {
            log.warn(format!(
                "backup_cleanup after failure failed: {}",
                c.report()
            ));
        }
    }

    /// Everything between `backup_init` and the success cleanup. The open
    /// snapshot writer is parked in `writer` so that the caller aborts it
    /// on failure.
    async fn attempt(
        &self,
        guest: &Guest,
        start_time: i64,
        log: &GuestLog,
        writer: &mut Option<Box<dyn SnapshotWriter>>,
        cancel: &CancelToken,
    ) -> Result<(Box<dyn SnapshotWriter>, Vec<String>, Vec<VolumeReport>)> {
        let provider = &*self.provider;
        let go_on = || {
            if cancel.is_cancelled() {
                Err(interrupted("while backing up"))
            } else {
                Ok(())
            }
        };
        if guest.kind == GuestKind::Container && provider.containers().is_none() {
            // The typed capability, asked before any call for the guest.
            return Err(Error::unsupported(format!(
                "containers in provider {}",
                provider.provider_name()
            )));
        }
        let archive: ArchiveName = provider.backup_init(guest, start_time).await?;
        go_on()?;
        log.line(format!("archive {archive}"));
        let mechanism = provider.backup_get_mechanism(guest).await?;
        go_on()?;
        check_mechanism(guest.kind, mechanism)?;
        log.line(format!("mechanism {mechanism:?}"));
        let platform = provider.provider_name().to_owned();
        if guest.kind == GuestKind::Container {
            let (w, warnings) = self
                .backup_container(guest, platform, archive, start_time, log, writer, cancel)
                .await?;
            return Ok((w, warnings, Vec::new()));
        }
        let previous = self.previous_backup(&platform, guest).await?;
        let answer = provider
            .backup_vm_query_incremental(guest, previous.as_ref())
            .await?;
        go_on()?;
        log.line(format!("incremental answer {answer:?}"));
        let request = BackupVmRequest::new(
            answer.clone(),
            previous.clone(),
            self.target.base_images(&platform),
        );
        let vm = provider.backup_vm(guest, request.clone()).await?;
        go_on()?;
        let VmBackup {
            guest_config,
            firewall_config,
            metadata,
            volumes,
            mut warnings,
            spec: guest_spec,
            ..
        } = vm;
        check_volumes(&volumes)?;
        let guest_spec = guest_spec.map(|s| spec_of_backed_up(s, &volumes, &mut warnings));
        for w in &warnings {
            log.warn(w);
        }

        let spec = SnapshotSpec {
            platform,
            guest: guest.id.clone(),
            archive,
            time: start_time,
        };
        let w = writer.insert(
            self.begin(spec, guest_config, firewall_config, metadata)
                .await?,
        );
        if let Some(s) = guest_spec {
            w.put_config(ConfigKind::Spec, s.to_config()).await?;
        }

        let mut reports = Vec::with_capacity(volumes.len());
        for access in volumes {
            let report = self
                .copy_volume(w.as_mut(), access, &request, log, &mut warnings, cancel)
                .instrument(tracing::info_span!("volume"))
                .await?;
            reports.push(report);
        }
        let w = writer
            .take()
            .ok_or_else(|| Error::other("the snapshot writer went missing during the backup"))?;
        Ok((w, warnings, reports))
    }

    /// A container: the provider prepares and exposes its tree, the host
    /// walks it into the snapshot's file archive [`CONTAINER_ARCHIVE`]
    /// (incremental against the previous snapshot's: unchanged files are
    /// not read).
    #[allow(
        clippy::too_many_arguments,
        reason = "the attempt's state, passed down"
    )]
    async fn backup_container(
        &self,
        guest: &Guest,
        platform: String,
        archive: ArchiveName,
        start_time: i64,
        log: &GuestLog,
        writer: &mut Option<Box<dyn SnapshotWriter>>,
        cancel: &CancelToken,
    ) -> Result<(Box<dyn SnapshotWriter>, Vec<String>)> {
        let provider = &*self.provider;
        // The typed capability, asked before any container call.
        let Some(containers) = provider.containers() else {
            return Err(Error::unsupported(format!(
                "container backup by provider {platform}"
            )));
        };
        containers.backup_container_prepare(guest).await?;
        let ct = containers.backup_container(guest).await?;
        if cancel.is_cancelled() {
            return Err(interrupted("while backing up"));
        }
        log.line(format!("container tree {}", ct.directory.display()));
        let previous = self
            .target
            .latest_good_snapshot(&platform, &guest.id)
            .await?
            .map(|s| s.id);
        let spec = SnapshotSpec {
            platform,
            guest: guest.id.clone(),
            archive,
            time: start_time,
        };
        let w = writer.insert(
            self.begin(spec, ct.guest_config, ct.firewall_config, ct.metadata)
                .await?,
        );
        let mut aw = w
            .begin_file_archive(CONTAINER_ARCHIVE, previous.as_ref())
            .await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opts = filetree::WalkOptions {
            id_map: ct.id_map,
            one_file_system: false,
            stop: Some(stop.clone()),
        };
        let dir = ct.directory.clone();
        let walk = tokio::task::spawn_blocking(move || {
            let warnings = filetree::backup_tree(&dir, &mut *aw, &opts)?;
            let stats = aw.finish()?;
            Ok::<_, Error>((stats, warnings))
        });
        let watch = {
            let cancel = cancel.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                cancel.cancelled().await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            })
        };
        let walked = walk
            .await
            .map_err(|e| Error::other(format!("the tree walk panicked: {e}")));
        watch.abort();
        let (stats, warnings) = walked??;
        log.line(format!(
            "archive {CONTAINER_ARCHIVE}: {} entries, {} files read ({} bytes), {} unchanged files reused, {} bytes stored",
            stats.entries, stats.files_read, stats.bytes_read, stats.files_reused, stats.bytes_stored
        ));
        for w in &warnings {
            log.warn(w);
        }
        let w = writer
            .take()
            .ok_or_else(|| Error::other("the snapshot writer went missing during the backup"))?;
        Ok((w, warnings))
    }

    /// Start the snapshot with its configuration and metadata.
    async fn begin(
        &self,
        spec: SnapshotSpec,
        guest_config: provider_api::ConfigBlob,
        firewall_config: Option<provider_api::ConfigBlob>,
        metadata: provider_api::PlatformMetadata,
    ) -> Result<Box<dyn SnapshotWriter>> {
        let mut w = self.target.begin_snapshot(spec).await?;
        let put = async {
            w.put_config(ConfigKind::Guest, guest_config).await?;
            if let Some(fw) = firewall_config {
                w.put_config(ConfigKind::Firewall, fw).await?;
            }
            w.put_metadata(metadata).await
        }
        .await;
        match put {
            Ok(()) => Ok(w),
            Err(e) => {
                if let Err(a) = w.abort().await {
                    tracing::warn!(error = %a.report(), "aborting the snapshot failed");
                }
                Err(e)
            }
        }
    }

    async fn previous_backup(
        &self,
        platform: &str,
        guest: &Guest,
    ) -> Result<Option<PreviousBackup>> {
        let Some(snapshot) = self
            .target
            .latest_good_snapshot(platform, &guest.id)
            .await?
        else {
            return Ok(None);
        };
        let reader = self.target.open_snapshot(&snapshot.id).await?;
        let metadata = reader.metadata().await?;
        Ok(Some(PreviousBackup::new(snapshot, metadata)))
    }

    async fn copy_volume(
        &self,
        writer: &mut dyn SnapshotWriter,
        access: VolumeAccess,
        request: &BackupVmRequest,
        log: &GuestLog,
        warnings: &mut Vec<String>,
        cancel: &CancelToken,
    ) -> Result<VolumeReport> {
        let VolumeAccess {
            volume,
            access,
            bitmap_mode,
            dirty,
            checkpoint,
            base,
            scope,
            ..
        } = access;
        let device = volume.device.clone();
        let (mode, why) = request.host_mode_why(&device, volume.size, bitmap_mode);
        if let Some(why) = why {
            warnings.push(format!("volume {device}: {why}; full backup"));
        }
        if scope == AccessScope::DirtyOnly && mode != BitmapMode::Use {
            // The access holds the changed regions only: a full read would
            // store whatever the rest reads as (zeroes) as the guest's data.
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the provider exposed only the changed regions but the host must read the whole volume (bitmap mode {mode:?}); refusing to store data the access does not hold"
                ),
            )
            .volume(&device));
        }
        log.line(format!(
            "volume {device}: {} bytes, bitmap mode {mode:?}",
            volume.size
        ));
        let mut stats = CopyStats::default();
        let mut base_image_stored = false;

        // The base layer first: the volume may start from it.
        let mut start_from = match mode {
            BitmapMode::Use => {
                let prev = request.previous.as_ref().ok_or_else(|| {
                    Error::invalid("an incremental backup without a previous backup to start from")
                        .volume(&device)
                })?;
                StartFrom::Previous(prev.snapshot.id.clone())
            }
            _ => StartFrom::Empty,
        };
        let base_id = base.as_ref().map(|b| b.id.clone());
        if let Some(base) = base
            && mode == BitmapMode::New
        {
            if let Some(base_writer) = writer.begin_base_image(&base.id, base.size).await? {
                let Some((base_access, base_dirty)) = base.access else {
                    return Err(Error::invalid(format!(
                        "base image {} is not in the target and the provider did not expose it",
                        base.id
                    ))
                    .volume(&device));
                };
                log.line(format!(
                    "storing base image {} ({} bytes)",
                    base.id, base.size
                ));
                let copy = self.mover.backup_volume(
                    BackupCopy {
                        device: format!("{device}@base:{}", base.id),
                        size: base.size,
                        access: base_access,
                        dirty: base_dirty,
                        writer: base_writer,
                    },
                    &*self.progress,
                );
                let base_stats = until_cancelled(cancel, copy)
                    .await
                    .map_err(|e| e.volume(format!("{device} (base image {})", base.id)))?;
                add_stats(&mut stats, &base_stats);
                base_image_stored = true;
            } else {
                log.line(format!("base image {} already stored", base.id));
            }
            // The overlay's regions apply on top of the base only when the
            // provider itself prepared a full (`New`) read; when the host
            // overrode its `Use`, its regions are changes since a
            // checkpoint, not the overlay: read the whole volume instead.
            if bitmap_mode == BitmapMode::New {
                start_from = StartFrom::BaseImage(base.id.clone());
            } else {
                log.warn(format!(
                    "volume {device}: provider offered changes, host needs a full read; reading the whole volume"
                ));
            }
        }

        // Without a bitmap everything is read (the mover turns `All` into
        // `(0, size)`, skipping holes the source reports), except that a
        // linked volume in `New` mode reads its overlay's regions on top of
        // its stored base image.
        let dirty = match (mode, &start_from) {
            (BitmapMode::Use, _) | (BitmapMode::New, StartFrom::BaseImage(_)) => dirty,
            _ => DirtySource::All,
        };
        let volume_writer = writer
            .begin_volume(VolumeSpec {
                volume: volume.clone(),
                start_from,
                base: base_id,
                bitmap_mode: mode,
                checkpoint: if mode == BitmapMode::None {
                    None
                } else {
                    checkpoint
                },
            })
            .await?;
        let copy = self.mover.backup_volume(
            BackupCopy {
                device: device.clone(),
                size: volume.size,
                access,
                dirty,
                writer: volume_writer,
            },
            &*self.progress,
        );
        let copy_stats = until_cancelled(cancel, copy)
            .await
            .map_err(|e| e.volume(&device))?;
        add_stats(&mut stats, &copy_stats);
        log.line(format!(
            "volume {device}: read {} bytes, {} bytes zero, {} new bytes stored as {}",
            stats.bytes_read, stats.bytes_zero, stats.target.bytes_new, stats.target.bytes_stored
        ));
        Ok(VolumeReport {
            device,
            size: volume.size,
            bitmap_mode: mode,
            base_image_stored,
            stats,
        })
    }
}

/// A copy, stopped when `cancel` fires.
async fn until_cancelled<T>(
    cancel: &CancelToken,
    copy: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = copy => r,
        () = cancel.cancelled() => Err(interrupted("while copying")),
    }
}

fn interrupted(when: &str) -> Error {
    Error::new(ErrorKind::Other, format!("job interrupted {when}"))
}

fn add_stats(total: &mut CopyStats, s: &CopyStats) {
    total.bytes_read += s.bytes_read;
    total.bytes_zero += s.bytes_zero;
    total.target.bytes_written += s.target.bytes_written;
    total.target.bytes_new += s.target.bytes_new;
    total.target.bytes_stored += s.target.bytes_stored;
}

fn check_mechanism(kind: GuestKind, mechanism: BackupMechanism) -> Result<()> {
    match (kind, mechanism) {
        (GuestKind::Vm, BackupMechanism::Nbd | BackupMechanism::FileHandle)
        | (GuestKind::Container, BackupMechanism::Directory) => Ok(()),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "backup mechanism {mechanism:?} is not valid for a {}",
                kind_name(kind)
            ),
        )),
    }
}

fn check_volumes(volumes: &[VolumeAccess]) -> Result<()> {
    if volumes.is_empty() {
        return Err(Error::invalid(
            "the provider exposed no volume for the VM; refusing to store an empty backup",
        ));
    }
    let mut seen = BTreeSet::new();
    for v in volumes {
        if v.volume.device.is_empty() || !seen.insert(v.volume.device.as_str()) {
            return Err(Error::invalid(format!(
                "provider exposed an empty or duplicate device name {:?}",
                v.volume.device
            )));
        }
    }
    Ok(())
}

fn kind_name(kind: GuestKind) -> &'static str {
    match kind {
        GuestKind::Vm => "VM",
        GuestKind::Container => "container",
    }
}

fn log_path(options: &JobOptions, guest: &Guest) -> PathBuf {
    let safe: String = guest
        .id
        .0
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    options.log_dir.join(format!("{safe}.log"))
}

/// The provider's guest spec restricted to the volumes it exposes: a
/// disk the spec names that is not backed up (skipped by the provider)
/// is left out with a warning, so that a restore from the spec never
/// expects a volume the snapshot lacks.
fn spec_of_backed_up(
    mut spec: provider_api::GuestSpec,
    volumes: &[provider_api::VolumeAccess],
    warnings: &mut Vec<String>,
) -> provider_api::GuestSpec {
    spec.disks.retain(|d| {
        let kept = volumes.iter().any(|v| v.volume.device == d.device);
        if !kept {
            warnings.push(format!(
                "the guest spec names disk {} which is not backed up: left out of the stored spec",
                d.device
            ));
        }
        kept
    });
    spec
}
