//! Restore orchestration.
//!
//! `restore_get_mechanism` → `archive_get_guest_config` /
//! `archive_get_firewall_config` → `restore_vm_init` → per volume
//! `restore_vm_volume_init`, the writes it asks for,
//! `restore_vm_volume_cleanup` → `restore_vm_cleanup`.
//!
//! Cleanups always run: every volume whose `restore_vm_volume_init` was
//! called gets `restore_vm_volume_cleanup` with the outcome, and
//! `restore_vm_cleanup` runs once `restore_vm_init` was called, also when
//! it failed (it then gets the archive's guest, since no new guest
//! exists). The first failed volume stops the restore.

use std::sync::Arc;
use std::time::{Duration, Instant};

use provider_api::{
    ArchiveView, BackupProvider, ConfigKind, Error, ErrorKind, FileArchiveReader, FileEntry, Guest,
    GuestKind, JobInfo, Layer, Outcome, RestoreContainerRequest, RestoreMechanism,
    RestoreSourceKind, RestoreSources, RestoreTarget, RestoreVmRequest, RestoreVolumeRequest,
    Result, SnapshotId, SnapshotReader, StoredVolume, Target,
};
use tracing::Instrument;

use crate::cancel::CancelToken;
use crate::mover::{DataMover, NoProgress, Progress, SourceExposer};

/// A finished restore.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// The restored guest.
    pub guest: Guest,
    /// Bytes written per device.
    pub volumes: Vec<(String, u64)>,
    /// Duration.
    pub elapsed: Duration,
    /// What the provider could not carry over (configuration a platform
    /// does not map, defaults it assumed).
    pub warnings: Vec<String>,
}

/// Runs restores.
pub struct RestoreDriver {
    provider: Arc<dyn BackupProvider>,
    target: Arc<dyn Target>,
    mover: Arc<dyn DataMover>,
    exposer: Arc<dyn SourceExposer>,
    http_exposer: tokio::sync::OnceCell<Arc<dyn SourceExposer>>,
    progress: Arc<dyn Progress>,
    job: Option<JobInfo>,
}

impl RestoreDriver {
    /// A driver for one provider and one target; `exposer` serves stored
    /// volumes as NBD URIs for providers that pull.
    pub fn new(
        provider: Arc<dyn BackupProvider>,
        target: Arc<dyn Target>,
        mover: Arc<dyn DataMover>,
        exposer: Arc<dyn SourceExposer>,
    ) -> Self {
        RestoreDriver {
            provider,
            target,
            mover,
            exposer,
            http_exposer: tokio::sync::OnceCell::new(),
            progress: Arc::new(NoProgress),
            job: None,
        }
    }

    /// Run each restore as a job: `job_init(job)` before it and
    /// `job_cleanup` after it (also when `job_init` failed), so that the
    /// provider tags what it creates with the job's marker and can sweep
    /// what dead jobs of this host left.
    pub fn with_job(mut self, job: JobInfo) -> Self {
        self.job = Some(job);
        self
    }

    /// Serve restore sources over HTTP with `exposer` (usually an
    /// [`HttpExposer`](crate::HttpExposer) on the configured
    /// `restore_listen` / `advertise_url`) to providers that ask for them.
    pub fn with_http_exposer(self, exposer: Arc<dyn SourceExposer>) -> Self {
        let _ = self.http_exposer.set(exposer);
        self
    }

    /// The exposer for the kind of source the provider asks for.
    async fn exposer_for(&self, kind: RestoreSourceKind) -> Result<Arc<dyn SourceExposer>> {
        match kind {
            RestoreSourceKind::Nbd => Ok(self.exposer.clone()),
            RestoreSourceKind::Http => self
                .http_exposer
                .get_or_try_init(|| async {
                    let e = crate::HttpExposer::start(
                        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                        None,
                    )
                    .await?;
                    tracing::warn!(
                        address = %e.address(),
                        "provider {} needs restore sources over HTTP and no restore_listen is configured: serving them on loopback, which only a platform on this host can reach",
                        self.provider.provider_name()
                    );
                    Ok::<_, Error>(Arc::new(e) as Arc<dyn SourceExposer>)
                })
                .await
                .cloned(),
            other => Err(Error::unsupported(format!(
                "restore sources of kind {other:?}"
            ))),
        }
    }

    /// Report copy progress to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// Restore a VM snapshot to `destination`.
    pub async fn restore_vm(
        &self,
        snapshot: &SnapshotId,
        destination: RestoreTarget,
    ) -> Result<RestoreReport> {
        self.restore_vm_cancellable(snapshot, destination, CancelToken::never())
            .await
    }

    /// Restore a VM snapshot to `destination` until done or `cancel`
    /// fires; on cancellation the copy in flight stops and the restore
    /// cleanups run with a failed outcome.
    pub async fn restore_vm_cancellable(
        &self,
        snapshot: &SnapshotId,
        destination: RestoreTarget,
        cancel: CancelToken,
    ) -> Result<RestoreReport> {
        let Some(job) = &self.job else {
            return self.restore_inner(snapshot, destination, cancel).await;
        };
        let init = self.provider.job_init(job).await;
        let result = match init {
            Ok(()) => self.restore_inner(snapshot, destination, cancel).await,
            Err(e) => Err(Error::new(e.kind(), "job_init failed").with_source(e)),
        };
        let cleanup = self.provider.job_cleanup().await;
        let report = result?;
        cleanup.map_err(|e| Error::new(e.kind(), "job_cleanup failed").with_source(e))?;
        Ok(report)
    }

    /// Restore a container snapshot (its file archive
    /// [`crate::CONTAINER_ARCHIVE`]) to `destination`, through the
    /// provider's mechanism: the host writes the tree into the directory
    /// the provider prepared, or streams it as a tar to the path it gave.
    /// The provider's cleanup runs on every path.
    pub async fn restore_container(
        &self,
        snapshot: &SnapshotId,
        destination: RestoreTarget,
        cancel: CancelToken,
    ) -> Result<RestoreReport> {
        let started = Instant::now();
        let Some(containers) = self.provider.containers() else {
            return Err(Error::unsupported(format!(
                "container restore by provider {}",
                self.provider.provider_name()
            )));
        };
        let reader: Arc<dyn SnapshotReader> = Arc::from(self.target.open_snapshot(snapshot).await?);
        let files = reader.open_file_archive(crate::CONTAINER_ARCHIVE).await?;
        let mechanism = self
            .provider
            .restore_get_mechanism(GuestKind::Container)
            .await?;
        if !matches!(
            mechanism,
            RestoreMechanism::Directory | RestoreMechanism::Tar
        ) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("restore mechanism {mechanism:?} is not valid for a container"),
            ));
        }
        let info = reader.info().clone();
        let archive = archive_view(&*reader).await?;
        let request = RestoreContainerRequest::new(archive, destination, mechanism);
        let prepared = match containers.restore_container_init(&request).await {
            Ok(p) => p,
            Err(e) => {
                let original = Guest::container(info.guest.0.clone());
                if let Err(c) = containers
                    .restore_container_cleanup(&original, &Outcome::failed(&e))
                    .await
                {
                    tracing::warn!(error = %c.report(), "restore_container_cleanup failed");
                }
                return Err(e.guest(&info.guest));
            }
        };
        // The writing thread stops at its next read once the restore is
        // cancelled; the cleanup runs only after it has stopped, never
        // beside it.
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let files: Arc<dyn FileArchiveReader> = Arc::new(Stoppable {
            inner: files,
            stopped: stopped.clone(),
        });
        let dest = prepared.destination.clone();
        let id_map = prepared.id_map;
        let mut work = tokio::task::spawn_blocking(move || -> Result<(u64, Vec<String>)> {
            match mechanism {
                RestoreMechanism::Tar => {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&dest)
                        .map_err(|e| {
                            Error::new(
                                ErrorKind::Io,
                                format!("opening the tar destination {}: {e}", dest.display()),
                            )
                        })?;
                    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                    let warnings = filetree::write_tar(&*files, &mut w, None)?;
                    use std::io::Write;
                    w.flush().map_err(|e| {
                        Error::new(ErrorKind::Io, format!("writing {}: {e}", dest.display()))
                    })?;
                    Ok((0, warnings))
                }
                _ => {
                    let opts = filetree::RestoreOptions {
                        id_map,
                        ..Default::default()
                    };
                    let rep = filetree::restore_tree(&*files, &dest, &opts)?;
                    Ok((rep.bytes, rep.warnings))
                }
            }
        });
        let joined = |r: std::result::Result<Result<_>, tokio::task::JoinError>| {
            r.map_err(|e| Error::other(format!("the restore thread panicked: {e}")))
                .and_then(|r| r)
        };
        let result = tokio::select! {
            r = &mut work => joined(r),
            () = cancel.cancelled() => {
                stopped.store(true, std::sync::atomic::Ordering::Release);
                let _ = joined(work.await);
                Err(Error::new(ErrorKind::Other, "restore interrupted"))
            }
        };
        let outcome = match &result {
            Ok(_) => Outcome::ok(),
            Err(e) => Outcome::failed(e),
        };
        let cleanup = containers
            .restore_container_cleanup(&prepared.guest, &outcome)
            .await;
        let (bytes, warnings) = result.map_err(|e| e.guest(&prepared.guest.id))?;
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        cleanup.map_err(|e| {
            Error::new(e.kind(), "restore_container_cleanup failed")
                .with_source(e)
                .guest(&prepared.guest.id)
        })?;
        Ok(RestoreReport {
            guest: prepared.guest,
            volumes: vec![(crate::CONTAINER_ARCHIVE.to_owned(), bytes)],
            elapsed: started.elapsed(),
            warnings,
        })
    }

    async fn restore_inner(
        &self,
        snapshot: &SnapshotId,
        destination: RestoreTarget,
        cancel: CancelToken,
    ) -> Result<RestoreReport> {
        let span = tracing::info_span!("restore", snapshot = %snapshot);
        async {
            let started = Instant::now();
            let reader: Arc<dyn SnapshotReader> =
                Arc::from(self.target.open_snapshot(snapshot).await?);
            let mechanism = self.provider.restore_get_mechanism(GuestKind::Vm).await?;
            if mechanism != RestoreMechanism::QemuImg {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("restore mechanism {mechanism:?} is not valid for a VM"),
                ));
            }
            let exposer = self
                .exposer_for(self.provider.restore_source_kind())
                .await?;
            let info = reader.info().clone();
            let archive = archive_view(&*reader).await?;
            let guest_config = self.provider.archive_get_guest_config(&archive).await?;
            let firewall_config = self.provider.archive_get_firewall_config(&archive).await?;
            let request =
                RestoreVmRequest::new(archive, destination, guest_config, firewall_config);
            let guest = match self.provider.restore_vm_init(&request).await {
                Ok(g) => g,
                Err(e) => {
                    let original = Guest::vm(info.guest.0.clone());
                    if let Err(c) = self
                        .provider
                        .restore_vm_cleanup(&original, &Outcome::failed(&e))
                        .await
                    {
                        tracing::warn!(error = %c.report(), "restore_vm_cleanup failed");
                    }
                    return Err(e.guest(&info.guest));
                }
            };
            let mut written = Vec::new();
            let mut result = Ok(());
            for volume in &info.volumes {
                match self
                    .restore_volume(&*exposer, &reader, &guest, volume, &cancel)
                    .await
                {
                    Ok(n) => written.push((volume.volume.device.clone(), n)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let outcome = match &result {
                Ok(()) => Outcome::ok(),
                Err(e) => Outcome::failed(e),
            };
            let cleanup = self.provider.restore_vm_cleanup(&guest, &outcome).await;
            let warnings = request.warnings.list();
            for warning in &warnings {
                tracing::warn!(guest = %guest.id, "{warning}");
            }
            result.map_err(|e| e.guest(&guest.id))?;
            cleanup.map_err(|e| {
                Error::new(e.kind(), "restore_vm_cleanup failed")
                    .with_source(e)
                    .guest(&guest.id)
            })?;
            Ok(RestoreReport {
                guest,
                volumes: written,
                elapsed: started.elapsed(),
                warnings,
            })
        }
        .instrument(span)
        .await
    }

    async fn restore_volume(
        &self,
        exposer: &dyn SourceExposer,
        reader: &Arc<dyn SnapshotReader>,
        guest: &Guest,
        volume: &StoredVolume,
        cancel: &CancelToken,
    ) -> Result<u64> {
        let device = volume.volume.device.as_str();
        let merged = reader.open_volume(device, Layer::Merged).await?;
        let (merged_uri, _merged_guard) = exposer.expose(device, merged.clone()).await?;
        let mut base_guard = None;
        let mut sources = RestoreSources::new(merged_uri);
        if volume.base.is_some() {
            let base = reader.open_volume(device, Layer::Base).await?;
            let size = base.size();
            let (uri, guard) = exposer.expose(&format!("{device}.base"), base).await?;
            sources = sources.with_base(uri, size);
            base_guard = Some(guard);
        }
        let request = RestoreVolumeRequest::new(guest.clone(), volume.clone(), sources);
        let work = async {
            let import = self.provider.restore_vm_volume_init(&request).await?;
            let mut total = 0;
            for write in import.writes {
                let source = reader.open_volume(device, write.layer).await?;
                total += self
                    .mover
                    .restore_volume(device, source, &write.destination, &*self.progress)
                    .await?;
            }
            Ok::<_, Error>(total)
        };
        let result = tokio::select! {
            r = work => r,
            () = cancel.cancelled() => Err(Error::new(ErrorKind::Other, "restore interrupted")),
        }
        .map_err(|e| e.volume(device));
        let outcome = match &result {
            Ok(_) => Outcome::ok(),
            Err(e) => Outcome::failed(e),
        };
        let cleanup = self
            .provider
            .restore_vm_volume_cleanup(guest, device, &outcome)
            .await;
        drop(base_guard);
        let total = result?;
        cleanup.map_err(|e| {
            Error::new(e.kind(), "restore_vm_volume_cleanup failed")
                .with_source(e)
                .volume(device)
        })?;
        Ok(total)
    }
}

/// A file archive whose reads fail once `stopped` is set: how a
/// cancelled container restore stops its writing thread.
struct Stoppable {
    inner: Arc<dyn FileArchiveReader>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Stoppable {
    fn check(&self) -> Result<()> {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            Err(Error::new(ErrorKind::Other, "restore interrupted"))
        } else {
            Ok(())
        }
    }
}

impl FileArchiveReader for Stoppable {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn entries(&self) -> Result<Box<dyn Iterator<Item = Result<FileEntry>> + Send + '_>> {
        self.check()?;
        let entries = self.inner.entries()?;
        Ok(Box::new(entries.map(move |e| self.check().and(e))))
    }

    fn read(&self, entry: &FileEntry, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check()?;
        self.inner.read(entry, offset, len)
    }
}

/// What a provider sees of a stored snapshot.
async fn archive_view(reader: &dyn SnapshotReader) -> Result<ArchiveView> {
    Ok(ArchiveView::new(
        reader.info().clone(),
        reader.config(ConfigKind::Guest).await?,
        reader.config(ConfigKind::Firewall).await?,
        reader.metadata().await?,
    )
    .with_spec(reader.config(ConfigKind::Spec).await?))
}

/// Restore targets a caller can name on a command line.
pub fn parse_restore_target(text: &str) -> Result<RestoreTarget> {
    match text {
        "in-place" => Ok(RestoreTarget::InPlace),
        "new" => Ok(RestoreTarget::NewGuest { name: None }),
        other => match other.strip_prefix("new:") {
            Some(name) if !name.is_empty() => Ok(RestoreTarget::NewGuest {
                name: Some(name.to_owned()),
            }),
            _ => Err(Error::invalid(format!(
                "restore target {other:?}: expected in-place, new or new:NAME"
            ))),
        },
    }
}
