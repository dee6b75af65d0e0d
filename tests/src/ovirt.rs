//! oVirt scenario fixtures: an in-process mock with a VM and the backup
//! appliance, a datastore, and helpers around the engine.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datastore::{Datastore, DatastoreOptions};
use engine::{
    BackupDriver, JobOptions, JobReport, NbdExposer, RestoreDriver, RestoreReport, StandardMover,
};
use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use provider_api::testing::PlatformProbe;
use provider_api::{ConfigKind, Guest, JobInfo, RestoreTarget, SnapshotId, Target};
use provider_ovirt::{BackupMode, OvirtOptions, OvirtProvider, WireFormat};
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;

pub struct Env {
    pub mock: RunningMock,
    pub dir: tempfile::TempDir,
    pub store: Arc<Datastore>,
    pub http: reqwest::Client,
    pub vm: String,
    pub disks: Vec<String>,
    pub time: std::sync::atomic::AtomicI64,
}

impl Env {
    /// A mock with `vm1` (16 MiB qcow2 disk with incremental backup +
    /// 8 MiB raw disk) and the appliance; `status` is vm1's power state.
    pub async fn start(status: &str) -> Env {
        Self::start_with(status, |_| {}).await
    }

    pub async fn start_with(status: &str, f: impl FnOnce(&mut MockConfig)) -> Env {
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

    pub async fn admin_post(&self, path: &str, body: Value) -> Value {
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

    pub async fn admin_get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.mock.endpoints().http_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn options(&self, mode: BackupMode, format: WireFormat) -> OvirtOptions {
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

    pub fn provider(&self, mode: BackupMode, format: WireFormat) -> Arc<OvirtProvider> {
        Arc::new(OvirtProvider::new(self.options(mode, format)).unwrap())
    }

    pub async fn backup(&self, provider: Arc<OvirtProvider>) -> JobReport {
        self.backup_of(provider, &self.vm).await
    }

    pub async fn backup_of(&self, provider: Arc<OvirtProvider>, vm: &str) -> JobReport {
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

    pub async fn backup_ok(&self, provider: Arc<OvirtProvider>) -> engine::GuestBackup {
        let mut report = self.backup(provider).await;
        let g = report.guests.remove(0);
        match g.result {
            Ok(b) => b,
            Err(e) => panic!("backup failed: {}", e.report()),
        }
    }

    pub async fn backup_err(&self, provider: Arc<OvirtProvider>) -> provider_api::Error {
        let mut report = self.backup(provider).await;
        match report.guests.remove(0).result {
            Ok(_) => panic!("backup succeeded unexpectedly"),
            Err(e) => e,
        }
    }

    pub async fn restore(
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

    pub async fn sha(&self, disk: &str) -> String {
        let v = self.admin_get(&format!("/admin/disks/{disk}/sha256")).await;
        v["sha256"].as_str().unwrap().to_owned()
    }

    pub async fn shas(&self, disks: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for d in disks {
            out.push(self.sha(d).await);
        }
        out
    }

    pub async fn guest_write(&self, disk: &str, offset: u64, length: u64, seed: u64) {
        self.admin_post(
            &format!("/admin/disks/{disk}/write"),
            json!({"offset": offset, "length": length, "pattern": "random", "seed": seed}),
        )
        .await;
    }

    /// The disks attached to a VM, in the order of the VM's disks.
    pub fn disks_of(&self, vm: &str) -> Vec<(String, String, String, String, bool)> {
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
    pub async fn leftovers(&self) -> Vec<String> {
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

    pub async fn arm(&self, faults: Value) {
        self.admin_post("/admin/ovirt/faults", faults).await;
    }

    /// `GET` on the engine API as JSON with a fresh token.
    pub async fn api_get(&self, path: &str) -> Value {
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

pub struct Probe<'a>(pub &'a Env);

#[async_trait]
impl PlatformProbe for Probe<'_> {
    async fn leftovers(&self) -> Vec<String> {
        self.0.leftovers().await
    }
}

pub async fn guest_config(env: &Env, id: &SnapshotId) -> Vec<u8> {
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
