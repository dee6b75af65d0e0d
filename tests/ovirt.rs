//! oVirt end to end: provider-ovirt against the in-process mock hypervisor
//! (real HTTP and NBD sockets), through engine::BackupDriver /
//! RestoreDriver with the StandardMover and NbdExposer, into a datastore.
//!
//! Every failure test ends with a leak check through the mock's inventory
//! (snapshots, appliance attachments and their files, backups, transfers,
//! exports).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datastore::{Datastore, DatastoreOptions};
use engine::{
    BackupDriver, JobOptions, JobReport, NbdExposer, RestoreDriver, RestoreReport, StandardMover,
};
use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use provider_api::testing::{PlatformProbe, check_all};
use provider_api::{
    BackupProvider, BitmapMode, ConfigKind, ErrorKind, Guest, JobInfo, RestoreTarget, SnapshotId,
    Target,
};
use provider_ovirt::{BackupMode, OvirtOptions, OvirtProvider, WireFormat};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

struct Env {
    mock: RunningMock,
    dir: tempfile::TempDir,
    store: Arc<Datastore>,
    http: reqwest::Client,
    vm: String,
    disks: Vec<String>,
    time: std::sync::atomic::AtomicI64,
}

impl Env {
    /// A mock with `vm1` (16 MiB qcow2 disk with incremental backup +
    /// 8 MiB raw disk) and the appliance; `status` is vm1's power state.
    async fn start(status: &str) -> Env {
        Self::start_with(status, |_| {}).await
    }

    async fn start_with(status: &str, f: impl FnOnce(&mut MockConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut config = MockConfig::new(dir.path().join("state"));
        config.ovirt.snapshot_polls = 2;
        f(&mut config);
        let mock = MockHypervisor::start(config).await.unwrap();
        let store = Arc::new(
            Datastore::create(dir.path().join("store"), DatastoreOptions::default()).unwrap(),
        );
        let mut env = Env {
            mock,
            dir,
            store,
            http: reqwest::Client::new(),
            vm: String::new(),
            disks: Vec::new(),
            time: 1_700_000_000.into(),
        };
        let vm = env
            .admin_post(
                "/admin/ovirt/vms",
                json!({"name": "vm1", "status": status, "disks": [
                    {"size": 16 * MIB, "format": "cow", "alias": "system", "fill": [
                        {"offset": 0, "length": MIB, "pattern": "text", "seed": 1},
                        {"offset": 2 * MIB, "length": 4 * MIB, "pattern": "random", "seed": 2},
                        {"offset": 12 * MIB, "length": MIB, "pattern": "zero", "seed": 0}]},
                    {"size": 8 * MIB, "format": "raw", "sparse": false, "alias": "data", "interface": "virtio_scsi", "fill": [
                        {"offset": MIB, "length": 2 * MIB, "pattern": "random", "seed": 3}]}
                ]}),
            )
            .await;
        env.vm = vm["id"].as_str().unwrap().to_owned();
        env.disks = vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect();
        env.admin_post(
            "/admin/ovirt/vms",
            json!({"name": "backup-appliance", "appliance": true, "disks": [{"size": 4 * MIB, "format": "raw"}]}),
        )
        .await;
        env
    }

    async fn admin_post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.mock.endpoints().http_url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    async fn admin_get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.mock.endpoints().http_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn options(&self, mode: BackupMode, format: WireFormat) -> OvirtOptions {
        let ep = &self.mock.endpoints().platforms["ovirt"];
        let mut o = OvirtOptions::new(
            ep["base_url"].as_str().unwrap(),
            ep["username"].as_str().unwrap(),
            ep["password"].as_str().unwrap(),
            "backup-appliance",
        );
        o.mode = mode;
        o.format = format;
        o.poll_interval = Duration::from_millis(10);
        o.operation_timeout = Duration::from_secs(5);
        o.download_dir = self.dir.path().join("downloads");
        o
    }

    fn provider(&self, mode: BackupMode, format: WireFormat) -> Arc<OvirtProvider> {
        Arc::new(OvirtProvider::new(self.options(mode, format)).unwrap())
    }

    async fn backup(&self, provider: Arc<OvirtProvider>) -> JobReport {
        self.backup_of(provider, &self.vm).await
    }

    async fn backup_of(&self, provider: Arc<OvirtProvider>, vm: &str) -> JobReport {
        let t = self.time.fetch_add(60, std::sync::atomic::Ordering::SeqCst);
        let driver = BackupDriver::new(
            provider,
            self.store.clone(),
            Arc::new(StandardMover::default()),
        );
        driver
            .run_job(
                &JobOptions {
                    info: JobInfo {
                        job_id: format!("job-{t}"),
                        start_time: t,
                        ..JobInfo::default()
                    },
                    parallelism: 1,
                    log_dir: self.dir.path().join("logs"),
                },
                vec![Guest::vm(vm)],
            )
            .await
    }

    async fn backup_ok(&self, provider: Arc<OvirtProvider>) -> engine::GuestBackup {
        let mut report = self.backup(provider).await;
        let g = report.guests.remove(0);
        match g.result {
            Ok(b) => b,
            Err(e) => panic!("backup failed: {}", e.report()),
        }
    }

    async fn backup_err(&self, provider: Arc<OvirtProvider>) -> provider_api::Error {
        let mut report = self.backup(provider).await;
        match report.guests.remove(0).result {
            Ok(_) => panic!("backup succeeded unexpectedly"),
            Err(e) => e,
        }
    }

    async fn restore(
        &self,
        provider: Arc<OvirtProvider>,
        snapshot: &SnapshotId,
        target: RestoreTarget,
    ) -> provider_api::Result<RestoreReport> {
        let exposer = NbdExposer::start("127.0.0.1:0".parse().unwrap()).await?;
        RestoreDriver::new(
            provider,
            self.store.clone(),
            Arc::new(StandardMover::default()),
            Arc::new(exposer),
        )
        .restore_vm(snapshot, target)
        .await
    }

    async fn sha(&self, disk: &str) -> String {
        let v = self.admin_get(&format!("/admin/disks/{disk}/sha256")).await;
        v["sha256"].as_str().unwrap().to_owned()
    }

    async fn shas(&self, disks: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for d in disks {
            out.push(self.sha(d).await);
        }
        out
    }

    async fn guest_write(&self, disk: &str, offset: u64, length: u64, seed: u64) {
        self.admin_post(
            &format!("/admin/disks/{disk}/write"),
            json!({"offset": offset, "length": length, "pattern": "random", "seed": seed}),
        )
        .await;
    }

    /// The disks attached to a VM, in the order of the VM's disks.
    fn disks_of(&self, vm: &str) -> Vec<(String, String, String, String, bool)> {
        self.mock.ovirt().inventory().read(|doc| {
            let mut v: Vec<_> = doc
                .own_disks(vm)
                .into_iter()
                .map(|(a, d)| {
                    (
                        d.alias.clone(),
                        d.id.clone(),
                        d.format.clone(),
                        a.interface.clone(),
                        a.bootable,
                    )
                })
                .collect();
            v.sort();
            v
        })
    }

    /// What a backup or restore may leave behind, from the mock's
    /// inventory (empty when clean).
    async fn leftovers(&self) -> Vec<String> {
        let o = self.admin_get("/admin/ovirt/objects").await;
        let mut out = Vec::new();
        for key in [
            "snapshots",
            "backup_attachments",
            "appliance_files",
            "active_backups",
            "active_transfers",
            "exports",
        ] {
            for item in o[key].as_array().cloned().unwrap_or_default() {
                out.push(format!("{key}: {item}"));
            }
        }
        out
    }

    async fn arm(&self, faults: Value) {
        self.admin_post("/admin/ovirt/faults", faults).await;
    }

    /// `GET` on the engine API as JSON with a fresh token.
    async fn api_get(&self, path: &str) -> Value {
        let ep = &self.mock.endpoints().platforms["ovirt"];
        let tok: Value = self
            .http
            .post(ep["sso_url"].as_str().unwrap())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=ovirt-password")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        self.http
            .get(format!("{}{path}", ep["base_url"].as_str().unwrap()))
            .bearer_auth(tok["access_token"].as_str().unwrap())
            .header("Accept", "application/json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

struct Probe<'a>(&'a Env);

#[async_trait]
impl PlatformProbe for Probe<'_> {
    async fn leftovers(&self) -> Vec<String> {
        self.0.leftovers().await
    }
}

async fn guest_config(env: &Env, id: &SnapshotId) -> Vec<u8> {
    env.store
        .open_snapshot(id)
        .await
        .unwrap()
        .config(ConfigKind::Guest)
        .await
        .unwrap()
        .expect("guest config")
        .data
}

// ------------------------------------------------------------- full

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_attach_full_backup_restores_a_new_vm_byte_identical_xml() {
    let env = Env::start("up").await;
    let before = env.shas(&env.disks).await;
    let p = env.provider(BackupMode::SnapshotAttach, WireFormat::Xml);
    let b = env.backup_ok(p.clone()).await;
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    assert_eq!(b.volumes.len(), 2);
    assert!(b.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::None));
    let devices: Vec<_> = b.volumes.iter().map(|v| v.device.as_str()).collect();
    assert_eq!(devices, ["system", "data"]);
    let ovf = guest_config(&env, &b.snapshot.id).await;
    assert!(String::from_utf8_lossy(&ovf).contains("ovf:Envelope"));

    // The guest keeps writing; the backup holds the snapshot's content.
    env.guest_write(&env.disks[0], 0, MIB, 77).await;

    let r = env
        .restore(
            p.clone(),
            &b.snapshot.id,
            RestoreTarget::NewGuest {
                name: Some("vm1-copy".into()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("restore failed: {}", e.report()));
    let restored = env.disks_of(&r.guest.id.0);
    let original = env.disks_of(&env.vm);
    assert_eq!(restored.len(), 2);
    for (a, b) in restored.iter().zip(&original) {
        assert_eq!(
            (&a.0, &a.2, &a.3, a.4),
            (&b.0, &b.2, &b.3, b.4),
            "alias, format, interface, bootable"
        );
    }
    let ids: Vec<String> = restored.iter().map(|d| d.1.clone()).collect();
    // Sorted by alias: data, system.
    assert_eq!(
        env.shas(&ids).await,
        vec![before[1].clone(), before[0].clone()]
    );
    // The restored VM's configuration is the saved OVF.
    let vm = env
        .api_get(&format!("/vms/{}?all_content=true", r.guest.id))
        .await;
    assert_eq!(
        vm["initialization"]["configuration"]["data"]
            .as_str()
            .unwrap()
            .as_bytes(),
        ovf.as_slice()
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

// ------------------------------------------------------- incremental

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reads_only_dirty_extents_json_and_restores_byte_identical() {
    let env = Env::start("up").await;
    let p = env.provider(BackupMode::Auto, WireFormat::Json);
    let full = env.backup_ok(p.clone()).await;
    let modes: Vec<_> = full.volumes.iter().map(|v| v.bitmap_mode).collect();
    assert_eq!(modes, [BitmapMode::New, BitmapMode::None]);
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    let checkpoints = env.admin_get("/admin/ovirt/objects").await["checkpoints"].clone();
    assert_eq!(checkpoints.as_array().unwrap().len(), 1);

    env.guest_write(&env.disks[0], 3 * MIB, MIB, 9).await;
    env.guest_write(&env.disks[1], 0, 64 * 1024, 10).await;
    let expected = env.shas(&env.disks).await;
    env.mock.hypervisor().exports.clear_history();
    let inc = env.backup_ok(p.clone()).await;
    let modes: Vec<_> = inc.volumes.iter().map(|v| v.bitmap_mode).collect();
    assert_eq!(modes, [BitmapMode::Use, BitmapMode::None]);
    // Only the dirty MiB of the qcow2 disk was read from its transfer.
    let system_read: u64 = env
        .mock
        .hypervisor()
        .exports
        .closed_stats()
        .iter()
        .filter(|s| s.target.contains(&env.disks[0]))
        .map(|s| s.bytes_read)
        .sum();
    assert_eq!(system_read, MIB, "bytes read from the system disk");
    assert_eq!(inc.volumes[0].stats.bytes_read, MIB);
    assert!(
        inc.snapshot
            .warnings
            .iter()
            .any(|w| w.contains("data") && w.contains("without incremental backup")),
        "{:?}",
        inc.snapshot.warnings
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    let r = env
        .restore(
            p.clone(),
            &inc.snapshot.id,
            RestoreTarget::NewGuest { name: None },
        )
        .await
        .unwrap_or_else(|e| panic!("restore failed: {}", e.report()));
    let ids: Vec<String> = env
        .disks_of(&r.guest.id.0)
        .into_iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(
        env.shas(&ids).await,
        vec![expected[1].clone(), expected[0].clone()]
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_without_nbd_access_downloads_ranges_over_http() {
    let env = Env::start_with("up", |c| c.ovirt.transfer_nbd_url = false).await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    env.backup_ok(p.clone()).await;
    env.guest_write(&env.disks[0], 5 * MIB, MIB, 21).await;
    let expected = env.shas(&env.disks).await;
    let inc = env.backup_ok(p.clone()).await;
    assert_eq!(inc.volumes[0].bitmap_mode, BitmapMode::Use);
    assert_eq!(inc.volumes[0].stats.bytes_read, MIB);
    // Only the dirty MiB went through the image server for that disk.
    let moved: u64 = env.mock.ovirt().inventory().read(|d| {
        d.transfers
            .values()
            .filter(|t| t.disk_id == env.disks[0])
            .map(|t| t.bytes_transferred)
            .min()
            .unwrap_or(0)
    });
    assert_eq!(moved, MIB);
    let left: Vec<_> = std::fs::read_dir(env.dir.path().join("downloads"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "downloads removed by backup_cleanup");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    let r = env
        .restore(
            p.clone(),
            &inc.snapshot.id,
            RestoreTarget::NewGuest { name: None },
        )
        .await
        .unwrap_or_else(|e| panic!("restore failed: {}", e.report()));
    let ids: Vec<String> = env
        .disks_of(&r.guest.id.0)
        .into_iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(
        env.shas(&ids).await,
        vec![expected[1].clone(), expected[0].clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_checkpoint_falls_back_to_a_full_with_a_warning() {
    let env = Env::start("up").await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    env.backup_ok(p.clone()).await;
    env.admin_post(
        &format!("/admin/ovirt/vms/{}/checkpoints/invalidate", env.vm),
        json!({}),
    )
    .await;
    env.guest_write(&env.disks[0], 0, MIB, 5).await;
    let b = env.backup_ok(p.clone()).await;
    assert_eq!(b.volumes[0].bitmap_mode, BitmapMode::New);
    assert!(
        b.snapshot
            .warnings
            .iter()
            .any(|w| w.contains("invalid") && w.contains("full backup")),
        "{:?}",
        b.snapshot.warnings
    );
    // And the chain continues from the new checkpoint.
    env.guest_write(&env.disks[0], 0, MIB, 6).await;
    let c = env.backup_ok(p.clone()).await;
    assert_eq!(c.volumes[0].bitmap_mode, BitmapMode::Use);
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_uses_snapshot_attach_on_engines_before_4_4() {
    let env = Env::start("up").await;
    let r = env
        .http
        .put(format!(
            "{}/admin/ovirt/version",
            env.mock.endpoints().http_url
        ))
        .json(&json!({"version": "4.3.10"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let p = env.provider(BackupMode::Auto, WireFormat::Json);
    let a = env.backup_ok(p.clone()).await;
    let b = env.backup_ok(p.clone()).await;
    assert!(
        a.volumes
            .iter()
            .chain(&b.volumes)
            .all(|v| v.bitmap_mode == BitmapMode::None)
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

// ----------------------------------------------------------- restore

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_restore_overwrites_the_original_disks() {
    let env = Env::start("down").await;
    let before = env.shas(&env.disks).await;
    let attachments = env.disks_of(&env.vm);
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    let b = env.backup_ok(p.clone()).await;
    env.guest_write(&env.disks[0], 0, 8 * MIB, 11).await;
    env.guest_write(&env.disks[1], 0, 8 * MIB, 12).await;
    assert_ne!(env.shas(&env.disks).await, before);
    env.restore(p.clone(), &b.snapshot.id, RestoreTarget::InPlace)
        .await
        .unwrap_or_else(|e| panic!("restore failed: {}", e.report()));
    assert_eq!(env.shas(&env.disks).await, before);
    assert_eq!(
        env.disks_of(&env.vm),
        attachments,
        "disks re-attached as they were"
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_restore_of_a_running_vm_is_refused() {
    let env = Env::start("up").await;
    let p = env.provider(BackupMode::SnapshotAttach, WireFormat::Xml);
    let b = env.backup_ok(p.clone()).await;
    let e = env
        .restore(p.clone(), &b.snapshot.id, RestoreTarget::InPlace)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{}", e.report());
    assert!(e.report().contains("shut it down"), "{}", e.report());
}

// ---------------------------------------------------- failure paths

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_stuck_locked_times_out_with_a_clear_error_and_no_leftovers() {
    let env = Env::start("up").await;
    env.arm(json!({"snapshot_stuck_locked": true})).await;
    let mut o = env.options(BackupMode::SnapshotAttach, WireFormat::Xml);
    o.operation_timeout = Duration::from_millis(300);
    let e = env
        .backup_err(Arc::new(OvirtProvider::new(o).unwrap()))
        .await;
    assert_eq!(e.kind(), ErrorKind::Timeout, "{}", e.report());
    let msg = e.report();
    assert!(
        msg.contains("stayed locked") && msg.contains("GET /vms/"),
        "{msg}"
    );
    assert!(msg.contains(&format!("guest {}", env.vm)), "{msg}");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachment_failing_half_way_detaches_the_disks_already_attached() {
    let env = Env::start("up").await;
    env.arm(json!({"attach_fail_after": 1})).await;
    let e = env
        .backup_err(env.provider(BackupMode::SnapshotAttach, WireFormat::Json))
        .await;
    let msg = e.report();
    assert!(
        msg.contains("hot plugging") && msg.contains("volume data"),
        "{msg}"
    );
    assert!(msg.contains("/diskattachments"), "{msg}");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_clear_errors_and_leave_nothing_behind() {
    let env = Env::start("up").await;
    // XML: the snapshot is created but its answer is cut.
    env.arm(json!({"malformed": [{"method": "POST", "path": "/snapshots", "times": 1}]}))
        .await;
    let e = env
        .backup_err(env.provider(BackupMode::SnapshotAttach, WireFormat::Xml))
        .await;
    let msg = e.report();
    assert!(
        msg.contains("invalid XML") && msg.contains("POST /vms/"),
        "{msg}"
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // JSON: an attachment is made but its answer is cut.
    env.arm(json!({"malformed": [{"method": "POST", "path": "/diskattachments", "times": 1}]}))
        .await;
    let e = env
        .backup_err(env.provider(BackupMode::SnapshotAttach, WireFormat::Json))
        .await;
    assert!(e.report().contains("invalid JSON"), "{}", e.report());
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // Incremental: the backup's answer is cut.
    env.arm(json!({"malformed": [{"method": "POST", "path": "/backups", "times": 1}]}))
        .await;
    let e = env
        .backup_err(env.provider(BackupMode::Incremental, WireFormat::Json))
        .await;
    assert!(e.report().contains("invalid JSON"), "{}", e.report());
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // Incremental: a transfer's answer is cut.
    env.arm(json!({"malformed": [{"method": "POST", "path": "/imagetransfers", "times": 1}]}))
        .await;
    let e = env
        .backup_err(env.provider(BackupMode::Incremental, WireFormat::Xml))
        .await;
    assert!(e.report().contains("invalid XML"), "{}", e.report());
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // Afterwards a backup works again.
    env.backup_ok(env.provider(BackupMode::Incremental, WireFormat::Xml))
        .await;
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_disk_format_is_a_clear_error() {
    let env = Env::start("up").await;
    let vm = env
        .admin_post(
            "/admin/ovirt/vms",
            json!({"name": "odd", "disks": [{"size": MIB, "format": "vmdk", "alias": "weird"}]}),
        )
        .await;
    let mut report = BackupDriver::new(
        env.provider(BackupMode::SnapshotAttach, WireFormat::Xml),
        env.store.clone(),
        Arc::new(StandardMover::default()),
    )
    .run_job(
        &JobOptions {
            info: JobInfo::default(),
            parallelism: 1,
            log_dir: env.dir.path().join("logs"),
        },
        vec![Guest::vm(vm["id"].as_str().unwrap())],
    )
    .await;
    let e = report.guests.remove(0).result.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{}", e.report());
    let msg = e.report();
    assert!(
        msg.contains("unknown format \"vmdk\"") && msg.contains("volume weird"),
        "{msg}"
    );
    assert!(msg.contains("GET /disks/"), "{msg}");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_fail_the_job_without_leaking_the_password() {
    let env = Env::start("up").await;
    let mut o = env.options(BackupMode::Auto, WireFormat::Xml);
    o.password = "wrong-secret".into();
    let report = env.backup(Arc::new(OvirtProvider::new(o).unwrap())).await;
    let e = report.init_error.expect("job_init fails");
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert!(!e.report().contains("wrong-secret"), "{}", e.report());
}

// ------------------------------------------------------ conformance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_kit_in_both_modes_and_formats() {
    let env = Env::start("up").await;
    let guest = Guest::vm(env.vm.clone());
    for (mode, format) in [
        (BackupMode::SnapshotAttach, WireFormat::Xml),
        (BackupMode::Incremental, WireFormat::Json),
    ] {
        let p = env.provider(mode, format);
        check_all(&*p as &dyn BackupProvider, &guest, &Probe(&env))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}/{format:?}: {e}"));
    }
}

// -------------------------------------------------------- benchmark

/// Full and 1%-incremental backup of a 4 GiB two-disk VM (2 x 2 GiB qcow2
/// disks, 1 GiB of random data each), in both modes. Ignored by default:
/// `cargo test -p scenarios --test ovirt -- --ignored --nocapture bench`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: several GiB of I/O"]
async fn bench_4gib_two_disk_vm_full_and_one_percent_incremental() {
    const GIB: u64 = 1 << 30;
    let env = Env::start("up").await;
    let fill = |seed: u64| json!([{"offset": 0, "length": GIB, "pattern": "random", "seed": seed}]);
    let t = std::time::Instant::now();
    let vm = env
        .admin_post(
            "/admin/ovirt/vms",
            json!({"name": "big", "disks": [
                {"size": 2 * GIB, "format": "cow", "alias": "sys", "fill": fill(1)},
                {"size": 2 * GIB, "format": "cow", "alias": "data", "fill": fill(2)}]}),
        )
        .await;
    println!(
        "setup (2 GiB of guest writes): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    let disks: Vec<String> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    let mib = |b: u64| b as f64 / MIB as f64;
    let run = |name: &'static str, r: JobReport| {
        let g = r.guests.into_iter().next().unwrap();
        let b = g
            .result
            .unwrap_or_else(|e| panic!("{name}: {}", e.report()));
        let read: u64 = b.volumes.iter().map(|v| v.stats.bytes_read).sum();
        let secs = b.elapsed.as_secs_f64();
        println!(
            "{name:<32} {secs:>7.2} s  read {:>8.1} MiB  {:>7.1} MiB/s of virtual size",
            mib(read),
            mib(4 * GIB) / secs
        );
    };
    for (mode, label_full, label_inc) in [
        (
            BackupMode::Incremental,
            "incremental mode: full",
            "incremental mode: 1% changed",
        ),
        (
            BackupMode::SnapshotAttach,
            "snapshot-attach: full",
            "snapshot-attach: full again",
        ),
    ] {
        let p = env.provider(mode, WireFormat::Json);
        run(label_full, env.backup_of(p.clone(), &id).await);
        // 1% of 4 GiB: 41 x 1 MiB spread over both disks.
        for i in 0..41u64 {
            let d = &disks[(i % 2) as usize];
            env.guest_write(d, (i * 47 % 2000) * MIB, MIB, 100 + i)
                .await;
        }
        run(label_inc, env.backup_of(p.clone(), &id).await);
    }
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}
