//! The kit's target: `provider_api::testing::memory::MemoryTarget` wrapped
//! so that the kit sees every region the host writes into each volume
//! (with the volume's starting point), and can make a
//! volume write, a publication or a read of a stored volume fail.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use provider_api::testing::memory::MemoryTarget;
use provider_api::{
    BaseImageCatalog, BaseImageId, ConfigBlob, ConfigKind, Error, ErrorKind, GuestId, Layer,
    PlatformMetadata, Region, Result, SnapshotId, SnapshotInfo, SnapshotReader, SnapshotSpec,
    SnapshotWriter, StartFrom, Target, VolumeReader, VolumeSpec, VolumeStats, VolumeWriter,
};

/// Where the kit injects a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    JobInit,
    BackupInit,
    BackupGetMechanism,
    BackupVmQueryIncremental,
    BackupVm,
    /// The target's volume writer fails (the second write of the job).
    VolumeWrite,
    BackupCleanupSuccess,
    /// The target fails to publish the snapshot.
    Publish,
    RestoreVmVolumeInit,
    /// Reading a stored volume fails during the restore copy (the second
    /// read), which is how both pushing and pulling providers see a copy
    /// break midway.
    RestoreRead,
    RestoreVmVolumeCleanup,
}

impl Fault {
    pub(crate) const BACKUP: [Fault; 8] = [
        Fault::JobInit,
        Fault::BackupInit,
        Fault::BackupGetMechanism,
        Fault::BackupVmQueryIncremental,
        Fault::BackupVm,
        Fault::VolumeWrite,
        Fault::BackupCleanupSuccess,
        Fault::Publish,
    ];

    pub(crate) const RESTORE: [Fault; 3] = [
        Fault::RestoreVmVolumeInit,
        Fault::RestoreRead,
        Fault::RestoreVmVolumeCleanup,
    ];

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Fault::JobInit => "job_init (after the provider's own call succeeded)",
            Fault::BackupInit => "backup_init (after the provider's own call succeeded)",
            Fault::BackupGetMechanism => {
                "backup_get_mechanism (after the provider's own call succeeded)"
            }
            Fault::BackupVmQueryIncremental => {
                "backup_vm_query_incremental (after the provider's own call succeeded)"
            }
            Fault::BackupVm => "backup_vm (after the provider exposed the snapshot)",
            Fault::VolumeWrite => "the copy (the target's volume writer failed)",
            Fault::BackupCleanupSuccess => {
                "backup_cleanup(success) (after the provider's own cleanup succeeded)"
            }
            Fault::Publish => "publishing the snapshot (the target's commit failed)",
            Fault::RestoreVmVolumeInit => {
                "restore_vm_volume_init (after the provider's own call succeeded)"
            }
            Fault::RestoreRead => "the restore copy (reading the stored volume failed)",
            Fault::RestoreVmVolumeCleanup => {
                "restore_vm_volume_cleanup (after the provider's own cleanup succeeded)"
            }
        }
    }
}

/// The armed fault, shared by the provider decorator and the target.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    armed: Mutex<Option<Fault>>,
    fired: Mutex<Vec<Fault>>,
    hits: AtomicUsize,
}

impl Faults {
    pub(crate) fn arm(&self, fault: Fault) {
        self.hits.store(0, Ordering::SeqCst);
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
    }

    pub(crate) fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Faults fired since the last call.
    pub(crate) fn take_fired(&self) -> Vec<Fault> {
        std::mem::take(&mut *self.fired.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// True (once) when `at` is armed and this is its `nth` occurrence.
    pub(crate) fn hit(&self, at: Fault, nth: usize) -> bool {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        if *armed != Some(at) {
            return false;
        }
        if self.hits.fetch_add(1, Ordering::SeqCst) + 1 < nth {
            return false;
        }
        *armed = None;
        self.fired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at);
        true
    }
}

/// The error the kit injects: never retryable, so that a host that retries
/// does not hide it.
pub(crate) fn injected(fault: Fault) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("conformance kit: injected failure in {}", fault.describe()),
    )
    .retryable(false)
}

/// What the host wrote into one volume of one snapshot.
#[derive(Debug, Clone)]
pub(crate) struct VolumeLog {
    pub device: String,
    pub size: u64,
    pub start_from: StartFrom,
    /// `(offset, length, zeroes)` in call order.
    pub writes: Vec<(u64, u64, bool)>,
    /// Set once the snapshot is published.
    pub snapshot: Option<SnapshotId>,
}

/// The recording, fault-injecting target.
#[derive(Clone)]
pub(crate) struct KitTarget {
    inner: MemoryTarget,
    logs: Arc<Mutex<Vec<Arc<Mutex<VolumeLog>>>>>,
    faults: Arc<Faults>,
}

impl KitTarget {
    pub(crate) fn new(faults: Arc<Faults>) -> Self {
        KitTarget {
            inner: MemoryTarget::new(),
            logs: Arc::default(),
            faults,
        }
    }

    /// The stored bytes of a volume.
    pub(crate) fn volume_data(&self, id: &SnapshotId, device: &str) -> Option<Vec<u8>> {
        self.inner.volume_data(id, device)
    }

    /// What the host wrote into the volumes of a published snapshot.
    pub(crate) fn logs_of(&self, id: &SnapshotId) -> Vec<VolumeLog> {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .filter(|l| l.snapshot.as_ref() == Some(id))
            .collect()
    }
}

struct KitSnapshotWriter {
    inner: Box<dyn SnapshotWriter>,
    logs: Vec<Arc<Mutex<VolumeLog>>>,
    all_logs: Arc<Mutex<Vec<Arc<Mutex<VolumeLog>>>>>,
    faults: Arc<Faults>,
}

struct KitVolumeWriter {
    inner: Box<dyn VolumeWriter>,
    log: Arc<Mutex<VolumeLog>>,
    faults: Arc<Faults>,
}

impl KitVolumeWriter {
    fn record(&self, offset: u64, length: u64, zeroes: bool) -> Result<()> {
        if self.faults.hit(Fault::VolumeWrite, 2) {
            return Err(injected(Fault::VolumeWrite));
        }
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writes
            .push((offset, length, zeroes));
        Ok(())
    }
}

#[async_trait]
impl VolumeWriter for KitVolumeWriter {
    async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
        self.record(offset, data.len() as u64, false)?;
        self.inner.write(offset, data).await
    }

    async fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        self.record(offset, length, true)?;
        self.inner.write_zeroes(offset, length).await
    }

    async fn finish(self: Box<Self>) -> Result<VolumeStats> {
        self.inner.finish().await
    }
}

#[async_trait]
impl SnapshotWriter for KitSnapshotWriter {
    async fn put_config(&mut self, kind: ConfigKind, blob: ConfigBlob) -> Result<()> {
        self.inner.put_config(kind, blob).await
    }

    async fn put_metadata(&mut self, metadata: PlatformMetadata) -> Result<()> {
        self.inner.put_metadata(metadata).await
    }

    async fn begin_base_image(
        &mut self,
        id: &BaseImageId,
        size: u64,
    ) -> Result<Option<Box<dyn VolumeWriter>>> {
        self.inner.begin_base_image(id, size).await
    }

    async fn begin_volume(&mut self, spec: VolumeSpec) -> Result<Box<dyn VolumeWriter>> {
        let log = Arc::new(Mutex::new(VolumeLog {
            device: spec.volume.device.clone(),
            size: spec.volume.size,
            start_from: spec.start_from.clone(),
            writes: Vec::new(),
            snapshot: None,
        }));
        let inner = self.inner.begin_volume(spec).await?;
        self.logs.push(log.clone());
        self.all_logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(log.clone());
        Ok(Box::new(KitVolumeWriter {
            inner,
            log,
            faults: self.faults.clone(),
        }))
    }

    async fn commit(self: Box<Self>, warnings: Vec<String>) -> Result<SnapshotInfo> {
        if self.faults.hit(Fault::Publish, 1) {
            self.inner.abort().await?;
            return Err(injected(Fault::Publish));
        }
        let info = self.inner.commit(warnings).await?;
        for l in &self.logs {
            l.lock().unwrap_or_else(|p| p.into_inner()).snapshot = Some(info.id.clone());
        }
        Ok(info)
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.inner.abort().await
    }
}

struct KitSnapshotReader {
    inner: Box<dyn SnapshotReader>,
    faults: Arc<Faults>,
}

struct KitVolumeReader {
    inner: Arc<dyn VolumeReader>,
    faults: Arc<Faults>,
}

#[async_trait]
impl VolumeReader for KitVolumeReader {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes> {
        if self.faults.hit(Fault::RestoreRead, 2) {
            return Err(injected(Fault::RestoreRead).offset(offset));
        }
        self.inner.read_at(offset, length).await
    }

    async fn regions(&self, offset: u64, length: u64) -> Result<Vec<Region>> {
        self.inner.regions(offset, length).await
    }
}

#[async_trait]
impl SnapshotReader for KitSnapshotReader {
    fn info(&self) -> &SnapshotInfo {
        self.inner.info()
    }

    async fn config(&self, kind: ConfigKind) -> Result<Option<ConfigBlob>> {
        self.inner.config(kind).await
    }

    async fn metadata(&self) -> Result<PlatformMetadata> {
        self.inner.metadata().await
    }

    async fn open_volume(&self, device: &str, layer: Layer) -> Result<Arc<dyn VolumeReader>> {
        let inner = self.inner.open_volume(device, layer).await?;
        Ok(Arc::new(KitVolumeReader {
            inner,
            faults: self.faults.clone(),
        }))
    }
}

#[async_trait]
impl Target for KitTarget {
    async fn begin_snapshot(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWriter>> {
        let inner = self.inner.begin_snapshot(spec).await?;
        Ok(Box::new(KitSnapshotWriter {
            inner,
            logs: Vec::new(),
            all_logs: self.logs.clone(),
            faults: self.faults.clone(),
        }))
    }

    async fn list_snapshots(
        &self,
        platform: Option<&str>,
        guest: Option<&GuestId>,
    ) -> Result<Vec<SnapshotInfo>> {
        self.inner.list_snapshots(platform, guest).await
    }

    async fn open_snapshot(&self, id: &SnapshotId) -> Result<Box<dyn SnapshotReader>> {
        let inner = self.inner.open_snapshot(id).await?;
        Ok(Box::new(KitSnapshotReader {
            inner,
            faults: self.faults.clone(),
        }))
    }

    fn base_images(&self, platform: &str) -> Arc<dyn BaseImageCatalog> {
        self.inner.base_images(platform)
    }
}
