//! The provider under test, wrapped: every lifecycle call is recorded (so
//! that the kit can tell which cleanups ran and which guests a restore
//! created), and an armed [`Fault`] makes one step fail *after* the
//! provider's own call succeeded, so that the platform objects it created
//! exist and must be released by the cleanups.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use provider_api::{
    ArchiveName, ArchiveView, BackupMechanism, BackupProvider, BackupStats, BackupVmRequest,
    Capabilities, ConfigBlob, Guest, GuestKind, IncrementalPlan, JobInfo, Outcome, PreviousBackup,
    RestoreMechanism, RestoreVmRequest, RestoreVolumeRequest, Result, VmBackup, VolumeImport,
};

use crate::target::{Fault, Faults, injected};

/// One recorded call (guest ids as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    JobInit,
    JobCleanup,
    BackupInit(String),
    BackupCleanup {
        guest: String,
        success: bool,
    },
    RestoreVmInit {
        restored: Option<String>,
    },
    RestoreVolumeInit {
        guest: String,
        device: String,
    },
    RestoreVolumeCleanup {
        guest: String,
        device: String,
        success: bool,
    },
    RestoreVmCleanup {
        guest: String,
        success: bool,
    },
}

/// The decorator.
pub(crate) struct Recorder {
    inner: Arc<dyn BackupProvider>,
    faults: Arc<Faults>,
    calls: Mutex<Vec<(Instant, Call)>>,
    restored: Mutex<Vec<Guest>>,
}

impl Recorder {
    pub(crate) fn new(inner: Arc<dyn BackupProvider>, faults: Arc<Faults>) -> Self {
        Recorder {
            inner,
            faults,
            calls: Mutex::default(),
            restored: Mutex::default(),
        }
    }

    fn record(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), call));
    }

    /// Number of calls so far (a mark for [`Recorder::calls_since`]).
    pub(crate) fn mark(&self) -> usize {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Calls after `mark`, in order.
    pub(crate) fn calls_since(&self, mark: usize) -> Vec<Call> {
        self.timed_calls_since(mark)
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    }

    /// Calls after `mark` with their times.
    pub(crate) fn timed_calls_since(&self, mark: usize) -> Vec<(Instant, Call)> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.get(mark..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Every guest `restore_vm_init` returned so far.
    pub(crate) fn restored_guests(&self) -> Vec<Guest> {
        self.restored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail_after<T>(&self, fault: Fault, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) if self.faults.hit(fault, 1) => {
                drop(v);
                Err(injected(fault))
            }
            other => other,
        }
    }
}

#[async_trait]
impl BackupProvider for Recorder {
    fn provider_name(&self) -> &str {
        self.inner.provider_name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn job_init(&self, job: &JobInfo) -> Result<()> {
        self.record(Call::JobInit);
        let r = self.inner.job_init(job).await;
        self.fail_after(Fault::JobInit, r)
    }

    async fn job_cleanup(&self) -> Result<()> {
        self.record(Call::JobCleanup);
        self.inner.job_cleanup().await
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        self.record(Call::BackupInit(guest.id.0.clone()));
        let r = self.inner.backup_init(guest, start_time).await;
        self.fail_after(Fault::BackupInit, r)
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        let r = self.inner.backup_get_mechanism(guest).await;
        self.fail_after(Fault::BackupGetMechanism, r)
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        let r = self
            .inner
            .backup_vm_query_incremental(guest, previous)
            .await;
        self.fail_after(Fault::BackupVmQueryIncremental, r)
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        let r = self.inner.backup_vm(guest, request).await;
        self.fail_after(Fault::BackupVm, r)
    }

    fn containers(&self) -> Option<&dyn provider_api::ContainerProvider> {
        self.inner.containers()
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        self.record(Call::BackupCleanup {
            guest: guest.id.0.clone(),
            success: outcome.is_success(),
        });
        let r = self.inner.backup_cleanup(guest, outcome).await;
        if outcome.is_success() {
            self.fail_after(Fault::BackupCleanupSuccess, r)
        } else {
            r
        }
    }

    async fn backup_handle_log_file(&self, guest: &Guest, path: &Path) -> Result<()> {
        self.inner.backup_handle_log_file(guest, path).await
    }

    async fn restore_get_mechanism(&self, kind: GuestKind) -> Result<RestoreMechanism> {
        self.inner.restore_get_mechanism(kind).await
    }

    fn restore_source_kind(&self) -> provider_api::RestoreSourceKind {
        self.inner.restore_source_kind()
    }

    async fn archive_get_guest_config(&self, archive: &ArchiveView) -> Result<ConfigBlob> {
        self.inner.archive_get_guest_config(archive).await
    }

    async fn archive_get_firewall_config(
        &self,
        archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        self.inner.archive_get_firewall_config(archive).await
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let r = self.inner.restore_vm_init(request).await;
        if let Ok(g) = &r {
            self.restored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(g.clone());
        }
        self.record(Call::RestoreVmInit {
            restored: r.as_ref().ok().map(|g| g.id.0.clone()),
        });
        r
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        self.record(Call::RestoreVolumeInit {
            guest: request.guest.id.0.clone(),
            device: request.volume.volume.device.clone(),
        });
        let r = self.inner.restore_vm_volume_init(request).await;
        self.fail_after(Fault::RestoreVmVolumeInit, r)
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        self.record(Call::RestoreVolumeCleanup {
            guest: guest.id.0.clone(),
            device: device.to_owned(),
            success: outcome.is_success(),
        });
        let r = self
            .inner
            .restore_vm_volume_cleanup(guest, device, outcome)
            .await;
        self.fail_after(Fault::RestoreVmVolumeCleanup, r)
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        self.record(Call::RestoreVmCleanup {
            guest: guest.id.0.clone(),
            success: outcome.is_success(),
        });
        self.inner.restore_vm_cleanup(guest, outcome).await
    }
}
