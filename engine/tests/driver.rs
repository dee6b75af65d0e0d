//! The transaction driver against a scripted fake provider: every
//! guarantee of `engine::backup` and `engine::restore`, with the exact call
//! sequence asserted and failures injected at each step.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use engine::{
    BackupCopy, BackupDriver, CopyStats, DataMover, JobOptions, NbdExposer, Progress,
    RestoreDriver, StandardMover,
};
use provider_api::testing::memory::MemoryTarget;
use provider_api::testing::{PlatformProbe, check_all};
use provider_api::*;

const DISK: u64 = 1 << 20;

#[derive(Default)]
struct Script {
    calls: Vec<String>,
    fail: BTreeSet<String>,
    /// Plan answered per device (default: every device `New`, or `Use`
    /// when there is a previous backup).
    plan_override: Option<IncrementalPlan>,
    /// Dirty regions per device for `Use`.
    dirty: BTreeMap<String, Vec<Extent>>,
    open_snapshots: BTreeSet<String>,
    /// disk0 is a linked clone of this base image file.
    linked: Option<(BaseImageId, PathBuf)>,
    /// With `linked`: the dirty regions are the overlay's, mode New.
    overlay_regions: bool,
    in_backup_vm: usize,
    max_in_backup_vm: usize,
}

struct Fake {
    dir: PathBuf,
    script: Mutex<Script>,
    checkpoints: AtomicUsize,
}

impl Fake {
    fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Fake {
            dir: dir.to_owned(),
            script: Mutex::default(),
            checkpoints: AtomicUsize::new(0),
        })
    }
    fn call(&self, what: String) -> Result<()> {
        let mut s = self.script.lock().unwrap();
        let key = what.split(' ').take(2).collect::<Vec<_>>().join(" ");
        s.calls.push(what);
        if s.fail.contains(&key) {
            return Err(Error::new(
                ErrorKind::Platform,
                format!("injected failure at {key}"),
            ));
        }
        Ok(())
    }
    fn fail_at(&self, key: &str) {
        self.script.lock().unwrap().fail.insert(key.to_owned());
    }
    fn calls(&self) -> Vec<String> {
        self.script.lock().unwrap().calls.clone()
    }
    fn calls_of(&self, guest: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.split(' ').nth(1) == Some(guest))
            .collect()
    }
    fn disk(&self, guest: &str, device: &str) -> PathBuf {
        self.dir.join(format!("{guest}-{device}.raw"))
    }
    fn write_disk(&self, guest: &str, device: &str, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.disk(guest, device))
            .unwrap();
        f.set_len(DISK).unwrap();
        f.write_all_at(data, offset).unwrap();
    }
}

#[async_trait]
impl BackupProvider for Fake {
    fn provider_name(&self) -> &str {
        "fake"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::none().incremental(true)
    }
    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        self.call("job_init".into())
    }
    async fn job_cleanup(&self) -> Result<()> {
        self.call("job_cleanup".into())
    }
    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        self.call(format!("backup_init {}", guest.id))?;
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }
    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        self.call(format!("backup_get_mechanism {}", guest.id))?;
        Ok(BackupMechanism::FileHandle)
    }
    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        self.call(format!(
            "query_incremental {} previous={}",
            guest.id,
            previous.is_some()
        ))?;
        let s = self.script.lock().unwrap();
        if let Some(p) = &s.plan_override {
            return Ok(p.clone());
        }
        let mode = if previous.is_some() {
            BitmapMode::Use
        } else {
            BitmapMode::New
        };
        Ok(["disk0", "disk1"]
            .iter()
            .map(|d| (d.to_string(), mode))
            .collect())
    }
    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        {
            let mut s = self.script.lock().unwrap();
            s.in_backup_vm += 1;
            s.max_in_backup_vm = s.max_in_backup_vm.max(s.in_backup_vm);
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        self.script.lock().unwrap().in_backup_vm -= 1;
        self.call(format!("backup_vm {}", guest.id))?;
        self.script
            .lock()
            .unwrap()
            .open_snapshots
            .insert(guest.id.0.clone());
        let cp = self.checkpoints.fetch_add(1, Ordering::SeqCst);
        let dirty = self.script.lock().unwrap().dirty.clone();
        let volumes = ["disk0", "disk1"]
            .iter()
            .map(|d| {
                let mode = match request.mode(d) {
                    BitmapMode::Use => BitmapMode::Use,
                    _ => BitmapMode::New,
                };
                // Deliberately offer dirty regions even where the plan says
                // none: the host must ignore them.
                let regions = dirty.get(*d).cloned().unwrap_or_default();
                let linked = self.script.lock().unwrap().linked.clone();
                let overlay = self.script.lock().unwrap().overlay_regions;
                let base = linked.filter(|_| *d == "disk0").map(|(id, path)| {
                    BaseLayer::new(
                        id,
                        DISK,
                        Some((
                            SnapshotAccess::FileHandle(FileAccess::new(path)),
                            DirtySource::All,
                        )),
                    )
                });
                let claimed = if base.is_some() && overlay {
                    BitmapMode::New
                } else if regions.is_empty() {
                    mode
                } else {
                    BitmapMode::Use
                };
                VolumeAccess::new(
                    Volume {
                        device: d.to_string(),
                        size: DISK,
                        format: VolumeFormat::Raw,
                    },
                    SnapshotAccess::FileHandle(FileAccess::new(self.disk(&guest.id.0, d))),
                )
                .bitmap_mode(claimed)
                .dirty(DirtySource::Regions(Box::new(RegionList::new(regions))))
                .checkpoint(Some(Checkpoint(format!("cp{cp}"))))
                .base(base)
            })
            .collect();
        Ok(VmBackup::new(
            ConfigBlob::json(&serde_json::json!({"vm": guest.id.0})),
            volumes,
        )
        .metadata(serde_json::json!({"checkpoint": cp})))
    }
    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        let tag = if outcome.is_success() { "ok" } else { "failed" };
        self.script
            .lock()
            .unwrap()
            .open_snapshots
            .remove(&guest.id.0);
        self.call(format!("backup_cleanup {} {tag}", guest.id))?;
        Ok(BackupStats::default())
    }
    async fn backup_handle_log_file(&self, guest: &Guest, path: &Path) -> Result<()> {
        assert!(path.exists(), "log file handed over exists");
        self.call(format!("backup_handle_log_file {}", guest.id))
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
            .ok_or_else(|| Error::not_found("guest config"))
    }
    async fn archive_get_firewall_config(&self, _a: &ArchiveView) -> Result<Option<ConfigBlob>> {
        Ok(None)
    }
    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let guest = format!("{}-restored", request.archive.snapshot.guest);
        self.call(format!("restore_vm_init {guest}"))?;
        Ok(Guest::vm(guest))
    }
    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let device = &request.volume.volume.device;
        self.call(format!(
            "restore_vm_volume_init {} {device}",
            request.guest.id
        ))?;
        assert!(request.sources.merged.starts_with("nbd://"));
        let path = self.disk(&request.guest.id.0, device);
        std::fs::File::create(&path)?.set_len(request.volume.volume.size)?;
        Ok(VolumeImport::merged_into(SnapshotAccess::FileHandle(
            FileAccess::new(path),
        )))
    }
    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        o: &Outcome,
    ) -> Result<()> {
        self.call(format!(
            "restore_vm_volume_cleanup {} {device} {}",
            guest.id,
            o.is_success()
        ))
    }
    async fn restore_vm_cleanup(&self, guest: &Guest, o: &Outcome) -> Result<()> {
        self.call(format!(
            "restore_vm_cleanup {} {}",
            guest.id,
            o.is_success()
        ))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    fake: Arc<Fake>,
    target: MemoryTarget,
    driver: BackupDriver,
    options: JobOptions,
}

fn setup(guests: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(dir.path());
    for (i, g) in guests.iter().enumerate() {
        for (j, d) in ["disk0", "disk1"].iter().enumerate() {
            let pattern: Vec<u8> = (0..DISK)
                .map(|x| (x as usize * 7 + i * 13 + j) as u8)
                .collect();
            fake.write_disk(g, d, 0, &pattern);
        }
    }
    let target = MemoryTarget::new();
    let driver = BackupDriver::new(
        fake.clone(),
        Arc::new(target.clone()),
        Arc::new(StandardMover::default()),
    );
    let options = JobOptions {
        info: JobInfo::new("t", 1_000),
        parallelism: 1,
        log_dir: dir.path().join("logs"),
    };
    Setup {
        _dir: dir,
        fake,
        target,
        driver,
        options,
    }
}

fn vms(ids: &[&str]) -> Vec<Guest> {
    ids.iter().map(|i| Guest::vm(*i)).collect()
}

const SUCCESS: [&str; 6] = [
    "backup_init",
    "backup_get_mechanism",
    "query_incremental",
    "backup_vm",
    "backup_cleanup ok",
    "backup_handle_log_file",
];

fn shape(calls: &[String]) -> Vec<String> {
    // Drop the guest id: "backup_cleanup vm1 ok" → "backup_cleanup ok".
    calls
        .iter()
        .map(|c| {
            let mut p: Vec<&str> = c.split(' ').collect();
            if p.len() > 1 {
                p.remove(1);
            }
            p.retain(|x| !x.starts_with("previous="));
            p.join(" ")
        })
        .collect()
}

#[tokio::test]
async fn successful_job_calls_the_lifecycle_in_order_and_stores_identical_data() {
    let s = setup(&["vm1", "vm2"]);
    let report = s.driver.run_job(&s.options, vms(&["vm1", "vm2"])).await;
    assert!(report.success(), "{report:?}");
    let calls = s.fake.calls();
    assert_eq!(calls.first().unwrap(), "job_init");
    assert_eq!(calls.last().unwrap(), "job_cleanup");
    for g in ["vm1", "vm2"] {
        assert_eq!(shape(&s.fake.calls_of(g)), SUCCESS);
        let snap = &report.guests.iter().find(|o| o.guest.id.0 == g).unwrap();
        let snap = &snap.result.as_ref().unwrap().snapshot;
        for d in ["disk0", "disk1"] {
            let stored = s.target.volume_data(&snap.id, d).unwrap();
            assert_eq!(stored, std::fs::read(s.fake.disk(g, d)).unwrap(), "{g} {d}");
        }
        let log = std::fs::read_to_string(&report.guests[0].log_file).unwrap();
        assert!(log.contains("backup finished"), "{log}");
    }
}

#[tokio::test]
async fn a_container_of_a_provider_without_containers_is_refused_before_any_guest_call() {
    let s = setup(&["vm1"]);
    let report = s
        .driver
        .run_job(&s.options, vec![Guest::container("ct1"), Guest::vm("vm1")])
        .await;
    let ct = report
        .guests
        .iter()
        .find(|o| o.guest.id.0 == "ct1")
        .unwrap();
    let err = ct.result.as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let calls = s.fake.calls_of("ct1");
    assert!(
        !calls.iter().any(|c| c.starts_with("backup_init")),
        "no container call before the capability: {calls:?}"
    );
    let vm = report
        .guests
        .iter()
        .find(|o| o.guest.id.0 == "vm1")
        .unwrap();
    assert!(vm.result.is_ok(), "the VM of the same job is backed up");
}

#[tokio::test]
async fn failed_job_init_still_gets_job_cleanup_and_touches_no_guest() {
    let s = setup(&["vm1"]);
    s.fake.fail_at("job_init");
    let report = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    assert!(report.init_error.is_some());
    assert_eq!(s.fake.calls(), ["job_init", "job_cleanup"]);
    let err = report.guests[0].result.as_ref().unwrap_err();
    assert!(err.to_string().contains("job_init failed"), "{err}");
    assert!(
        s.target
            .list_snapshots(None, None)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn failure_at(step: &str, expected: &[&str]) {
    let s = setup(&["vm1", "vm2"]);
    s.fake.fail_at(&format!("{step} vm1"));
    let report = s.driver.run_job(&s.options, vms(&["vm1", "vm2"])).await;
    assert!(!report.success());
    assert_eq!(
        shape(&s.fake.calls_of("vm1")),
        expected,
        "failure at {step}"
    );
    let err = report.guests[0].result.as_ref().unwrap_err();
    assert!(
        err.report().contains("injected failure"),
        "{}",
        err.report()
    );
    assert_eq!(err.context().guest.as_deref(), Some("vm1"));
    // The other guest is unaffected, and the failed one left no snapshot.
    assert!(report.guests[1].result.is_ok());
    assert_eq!(shape(&s.fake.calls_of("vm2")), SUCCESS);
    let listed = s.target.list_snapshots(None, None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].guest.0, "vm2");
    assert!(s.fake.script.lock().unwrap().open_snapshots.is_empty());
    assert_eq!(s.fake.calls().last().unwrap(), "job_cleanup");
}

#[tokio::test]
async fn failure_at_backup_init_gets_failure_cleanup() {
    failure_at(
        "backup_init",
        &[
            "backup_init",
            "backup_cleanup failed",
            "backup_handle_log_file",
        ],
    )
    .await;
}

#[tokio::test]
async fn failure_at_backup_get_mechanism_gets_failure_cleanup() {
    failure_at(
        "backup_get_mechanism",
        &[
            "backup_init",
            "backup_get_mechanism",
            "backup_cleanup failed",
            "backup_handle_log_file",
        ],
    )
    .await;
}

#[tokio::test]
async fn failure_at_query_incremental_gets_failure_cleanup() {
    failure_at(
        "query_incremental",
        &[
            "backup_init",
            "backup_get_mechanism",
            "query_incremental",
            "backup_cleanup failed",
            "backup_handle_log_file",
        ],
    )
    .await;
}

#[tokio::test]
async fn failure_at_backup_vm_gets_failure_cleanup() {
    failure_at(
        "backup_vm",
        &[
            "backup_init",
            "backup_get_mechanism",
            "query_incremental",
            "backup_vm",
            "backup_cleanup failed",
            "backup_handle_log_file",
        ],
    )
    .await;
}

#[tokio::test]
async fn failure_in_success_cleanup_gets_failure_cleanup_and_publishes_nothing() {
    failure_at(
        "backup_cleanup",
        &[
            "backup_init",
            "backup_get_mechanism",
            "query_incremental",
            "backup_vm",
            "backup_cleanup ok",
            "backup_cleanup failed",
            "backup_handle_log_file",
        ],
    )
    .await;
}

#[tokio::test]
async fn failure_while_copying_names_the_volume_and_cleans_up() {
    let s = setup(&["vm1", "vm2"]);
    std::fs::remove_file(s.fake.disk("vm1", "disk1")).unwrap();
    let report = s.driver.run_job(&s.options, vms(&["vm1", "vm2"])).await;
    let err = report.guests[0].result.as_ref().unwrap_err();
    assert_eq!(
        err.context().volume.as_deref(),
        Some("disk1"),
        "{}",
        err.report()
    );
    assert!(shape(&s.fake.calls_of("vm1")).contains(&"backup_cleanup failed".to_string()));
    assert!(report.guests[1].result.is_ok());
}

#[tokio::test]
async fn incremental_reads_only_dirty_regions_on_top_of_the_previous_snapshot() {
    let s = setup(&["vm1"]);
    let first = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    assert!(first.success());
    let before = std::fs::read(s.fake.disk("vm1", "disk0")).unwrap();
    // The guest changes two places; change tracking reports only one.
    s.fake.write_disk("vm1", "disk0", 4096, &[0xAA; 8192]);
    s.fake.write_disk("vm1", "disk0", 600_000, &[0xBB; 100]);
    s.fake
        .script
        .lock()
        .unwrap()
        .dirty
        .insert("disk0".into(), vec![Extent::new(4096, 8192)]);
    let mut options = s.options.clone();
    options.info.start_time = 2_000;
    let second = s.driver.run_job(&options, vms(&["vm1"])).await;
    assert!(second.success(), "{second:?}");
    let b = second.guests[0].result.as_ref().unwrap();
    let v0 = b.volumes.iter().find(|v| v.device == "disk0").unwrap();
    assert_eq!(v0.bitmap_mode, BitmapMode::Use);
    assert_eq!(v0.stats.bytes_read, 8192);
    let stored = s.target.volume_data(&b.snapshot.id, "disk0").unwrap();
    let mut expected = before;
    expected[4096..4096 + 8192].fill(0xAA);
    assert_eq!(stored, expected, "previous data plus the dirty region only");
    assert!(
        s.fake
            .calls()
            .iter()
            .any(|c| c == "query_incremental vm1 previous=true")
    );
}

#[tokio::test]
async fn volumes_left_out_of_the_answer_get_mode_none_and_a_whole_read() {
    let s = setup(&["vm1"]);
    assert!(s.driver.run_job(&s.options, vms(&["vm1"])).await.success());
    // Second run: the answer names only disk0, yet the provider offers a
    // (wrong) dirty list for disk1 and claims Use.
    s.fake.write_disk("vm1", "disk1", 300_000, &[0xCC; 5000]);
    {
        let mut sc = s.fake.script.lock().unwrap();
        sc.plan_override = Some([("disk0".to_string(), BitmapMode::Use)].into());
        sc.dirty.insert("disk1".into(), vec![Extent::new(0, 512)]);
    }
    let mut options = s.options.clone();
    options.info.start_time = 2_000;
    let report = s.driver.run_job(&options, vms(&["vm1"])).await;
    let b = report.guests[0].result.as_ref().unwrap();
    let v1 = b.volumes.iter().find(|v| v.device == "disk1").unwrap();
    assert_eq!(v1.bitmap_mode, BitmapMode::None);
    assert_eq!(v1.stats.bytes_read, DISK, "(0, size) read once");
    let stored = s.target.volume_data(&b.snapshot.id, "disk1").unwrap();
    assert_eq!(stored, std::fs::read(s.fake.disk("vm1", "disk1")).unwrap());
    let info = b.snapshot.volume("disk1").unwrap();
    assert_eq!(info.checkpoint, None, "mode none records no checkpoint");
}

#[tokio::test]
async fn use_without_a_previous_backup_becomes_a_full_with_a_warning() {
    let s = setup(&["vm1"]);
    s.fake.script.lock().unwrap().plan_override = Some(
        [
            ("disk0".to_string(), BitmapMode::Use),
            ("disk1".to_string(), BitmapMode::Use),
        ]
        .into(),
    );
    s.fake
        .script
        .lock()
        .unwrap()
        .dirty
        .insert("disk0".into(), vec![Extent::new(0, 4096)]);
    let report = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    let b = report.guests[0].result.as_ref().unwrap();
    assert!(b.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::New));
    assert!(
        b.snapshot
            .warnings
            .iter()
            .any(|w| w.contains("full backup"))
    );
    let stored = s.target.volume_data(&b.snapshot.id, "disk0").unwrap();
    assert_eq!(stored, std::fs::read(s.fake.disk("vm1", "disk0")).unwrap());
}

#[tokio::test]
async fn guests_run_with_bounded_parallelism() {
    let ids = ["a", "b", "c", "d", "e"];
    let s = setup(&ids);
    let mut options = s.options.clone();
    options.parallelism = 2;
    let report = s.driver.run_job(&options, vms(&ids)).await;
    assert!(report.success());
    assert_eq!(s.fake.script.lock().unwrap().max_in_backup_vm, 2);
    let order: Vec<_> = report
        .guests
        .iter()
        .map(|g| g.guest.id.0.as_str())
        .collect();
    assert_eq!(order, ids, "outcomes in input order");
    for g in ids {
        let n = s
            .fake
            .calls_of(g)
            .iter()
            .filter(|c| c.starts_with("backup_handle_log_file"))
            .count();
        assert_eq!(n, 1, "log file handed once for {g}");
    }
}

#[tokio::test]
async fn restore_writes_identical_disks_and_always_cleans_up() {
    let s = setup(&["vm1"]);
    let report = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    let id = report.guests[0]
        .result
        .as_ref()
        .unwrap()
        .snapshot
        .id
        .clone();
    let exposer = Arc::new(
        NbdExposer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
    );
    let restore = RestoreDriver::new(
        s.fake.clone(),
        Arc::new(s.target.clone()),
        Arc::new(StandardMover::default()),
        exposer,
    );
    let done = restore
        .restore_vm(&id, RestoreTarget::NewGuest { name: None })
        .await
        .unwrap();
    assert_eq!(done.guest.id.0, "vm1-restored");
    for d in ["disk0", "disk1"] {
        assert_eq!(
            std::fs::read(s.fake.disk("vm1-restored", d)).unwrap(),
            std::fs::read(s.fake.disk("vm1", d)).unwrap()
        );
    }
    assert_eq!(
        shape(&s.fake.calls_of("vm1-restored")),
        [
            "restore_vm_init",
            "restore_vm_volume_init disk0",
            "restore_vm_volume_cleanup disk0 true",
            "restore_vm_volume_init disk1",
            "restore_vm_volume_cleanup disk1 true",
            "restore_vm_cleanup true"
        ]
    );

    // A failing volume: its cleanup and the VM cleanup still run, with
    // the failure, and the restore stops there.
    s.fake.fail_at("restore_vm_volume_init vm1-restored");
    s.fake.script.lock().unwrap().calls.clear();
    let err = restore
        .restore_vm(&id, RestoreTarget::NewGuest { name: None })
        .await
        .unwrap_err();
    assert_eq!(
        err.context().volume.as_deref(),
        Some("disk0"),
        "{}",
        err.report()
    );
    assert_eq!(
        shape(&s.fake.calls()),
        [
            "restore_vm_init",
            "restore_vm_volume_init disk0",
            "restore_vm_volume_cleanup disk0 false",
            "restore_vm_cleanup false"
        ]
    );
}

#[tokio::test]
async fn failed_restore_init_still_gets_restore_cleanup() {
    let s = setup(&["vm1"]);
    let report = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    let id = report.guests[0]
        .result
        .as_ref()
        .unwrap()
        .snapshot
        .id
        .clone();
    s.fake.fail_at("restore_vm_init vm1-restored");
    s.fake.script.lock().unwrap().calls.clear();
    let restore = RestoreDriver::new(
        s.fake.clone(),
        Arc::new(s.target.clone()),
        Arc::new(StandardMover::default()),
        Arc::new(
            NbdExposer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        ),
    );
    assert!(
        restore
            .restore_vm(&id, RestoreTarget::InPlace)
            .await
            .is_err()
    );
    assert_eq!(
        shape(&s.fake.calls()),
        ["restore_vm_init", "restore_vm_cleanup false"]
    );
}

struct OpenSnapshots(Arc<Fake>);

#[async_trait]
impl PlatformProbe for OpenSnapshots {
    async fn leftovers(&self) -> Vec<String> {
        let s = self.0.script.lock().unwrap();
        s.open_snapshots
            .iter()
            .map(|g| format!("snapshot of {g}"))
            .collect()
    }
}

#[tokio::test]
async fn the_fake_provider_passes_the_conformance_kit() {
    let s = setup(&["vm1"]);
    check_all(&*s.fake, &Guest::vm("vm1"), &OpenSnapshots(s.fake.clone()))
        .await
        .unwrap();
}

/// A provider that forgets to clean up is caught by the kit.
#[tokio::test]
async fn the_conformance_kit_catches_a_leaking_provider() {
    struct Leaky;
    #[async_trait]
    impl PlatformProbe for Leaky {
        async fn leftovers(&self) -> Vec<String> {
            vec!["snapshot that never goes away".into()]
        }
    }
    let s = setup(&["vm1"]);
    let err = check_all(&*s.fake, &Guest::vm("vm1"), &Leaky)
        .await
        .unwrap_err();
    assert!(err.contains("cleanup leaves nothing behind"), "{err}");
}

/// A linked disk: base image file plus an overlay that changed two 64 KiB
/// blocks (at 0 and 512 KiB). The provider reports `regions` for disk0.
fn link_disk0(s: &Setup, overlay_regions: bool, regions: Vec<Extent>) -> PathBuf {
    let base = s.fake.dir.join("base.raw");
    let data = std::fs::read(s.fake.disk("vm1", "disk0")).unwrap();
    std::fs::write(&base, &data).unwrap();
    s.fake.write_disk("vm1", "disk0", 0, &[0x5A; 65536]);
    s.fake.write_disk("vm1", "disk0", 512 << 10, &[0xA5; 65536]);
    let mut sc = s.fake.script.lock().unwrap();
    sc.linked = Some((BaseImageId("base-1".into()), base.clone()));
    sc.overlay_regions = overlay_regions;
    sc.dirty.insert("disk0".into(), regions);
    base
}

#[tokio::test]
async fn linked_volume_stores_the_base_once_and_the_overlay_on_top() {
    let s = setup(&["vm1"]);
    link_disk0(
        &s,
        true,
        vec![Extent::new(0, 65536), Extent::new(512 << 10, 65536)],
    );
    let report = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    let b = report.guests[0].result.as_ref().unwrap();
    let v0 = b.volumes.iter().find(|v| v.device == "disk0").unwrap();
    assert!(v0.base_image_stored, "{b:?}");
    assert_eq!(
        v0.stats.bytes_read,
        DISK + 2 * 65536,
        "base in full, overlay regions only"
    );
    assert_eq!(s.target.base_image_count(), 1);
    let stored = s.target.volume_data(&b.snapshot.id, "disk0").unwrap();
    assert_eq!(stored, std::fs::read(s.fake.disk("vm1", "disk0")).unwrap());
    assert_eq!(
        b.snapshot.volume("disk0").unwrap().base,
        Some(BaseImageId("base-1".into()))
    );
}

#[tokio::test]
async fn linked_volume_with_changes_where_a_full_is_needed_is_read_whole() {
    let s = setup(&["vm1"]);
    // The provider claims Use (changes since a checkpoint) on a first
    // backup: the host must not lay those regions on the base image.
    link_disk0(&s, false, vec![Extent::new(0, 65536)]);
    let report = s.driver.run_job(&s.options, vms(&["vm1"])).await;
    let b = report.guests[0].result.as_ref().unwrap();
    let v0 = b.volumes.iter().find(|v| v.device == "disk0").unwrap();
    assert_eq!(v0.bitmap_mode, BitmapMode::New);
    let stored = s.target.volume_data(&b.snapshot.id, "disk0").unwrap();
    assert_eq!(stored, std::fs::read(s.fake.disk("vm1", "disk0")).unwrap());
}

/// A provider pairing file-handle access with NBD-bitmap dirty regions
/// gets a clear error for that guest, not a crashed host.
#[tokio::test]
async fn nbd_bitmap_regions_on_a_file_are_an_error_not_a_panic() {
    use engine::{BackupCopy, DataMover, NoProgress};
    let s = setup(&["vm1"]);
    let target = MemoryTarget::new();
    let mut w = target
        .begin_snapshot(SnapshotSpec {
            platform: "fake".into(),
            guest: GuestId("vm1".into()),
            archive: ArchiveName::new("vm/vm1/1").unwrap(),
            time: 1,
        })
        .await
        .unwrap();
    let writer = w
        .begin_volume(VolumeSpec {
            volume: Volume {
                device: "disk0".into(),
                size: DISK,
                format: VolumeFormat::Raw,
            },
            start_from: StartFrom::Empty,
            base: None,
            bitmap_mode: BitmapMode::Use,
            checkpoint: None,
        })
        .await
        .unwrap();
    let err = StandardMover::default()
        .backup_volume(
            BackupCopy {
                device: "disk0".into(),
                size: DISK,
                access: SnapshotAccess::FileHandle(FileAccess::new(s.fake.disk("vm1", "disk0"))),
                dirty: DirtySource::NbdBitmap,
                writer,
            },
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("disk0"), "{err}");
}

/// A mover whose backups never finish: the job can only end by being
/// interrupted.
struct StuckMover;

#[async_trait]
impl DataMover for StuckMover {
    async fn backup_volume(&self, _copy: BackupCopy, _p: &dyn Progress) -> Result<CopyStats> {
        std::future::pending().await
    }
    async fn restore_volume(
        &self,
        _device: &str,
        _source: Arc<dyn VolumeReader>,
        _destination: &SnapshotAccess,
        _p: &dyn Progress,
    ) -> Result<u64> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn an_interrupted_job_runs_every_cleanup_and_publishes_nothing() {
    let s = setup(&["vm1", "vm2", "vm3"]);
    let target = MemoryTarget::new();
    let driver = BackupDriver::new(
        s.fake.clone(),
        Arc::new(target.clone()),
        Arc::new(StuckMover),
    );
    let mut options = s.options.clone();
    options.parallelism = 2;
    let (canceller, token) = engine::cancel_pair();
    let job = driver.run_job_cancellable(&options, vms(&["vm1", "vm2", "vm3"]), token);
    let cancel = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        canceller.cancel();
    };
    let (report, ()) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        tokio::join!(job, cancel)
    })
    .await
    .expect("the interrupted job ends");
    assert!(!report.success());
    for g in &report.guests {
        let e = g.result.as_ref().unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
    }
    // The two guests in flight got their failure cleanup; the third never
    // started and was not touched.
    for g in ["vm1", "vm2"] {
        let calls = shape(&s.fake.calls_of(g));
        assert!(
            calls.contains(&"backup_cleanup failed".to_owned()),
            "{g}: {calls:?}"
        );
    }
    assert!(
        !s.fake
            .calls_of("vm3")
            .iter()
            .any(|c| c.starts_with("backup_init")),
        "{:?}",
        s.fake.calls_of("vm3")
    );
    assert_eq!(s.fake.calls().last().unwrap(), "job_cleanup");
    assert!(s.fake.script.lock().unwrap().open_snapshots.is_empty());
    assert!(target.list_snapshots(None, None).await.unwrap().is_empty());
}
