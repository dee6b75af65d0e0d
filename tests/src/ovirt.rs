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
use provider_api::{
    BackupProvider, BackupVmRequest, ConfigKind, Guest, JobInfo, RestoreTarget, SnapshotId, Target,
};
use provider_ovirt::{BackupMode, OvirtOptions, OvirtProvider, RetryPolicy, WireFormat};
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;

/// An HTTP client for the mock (its admin API over plain HTTP, the engine
/// over HTTPS) that trusts the mock's CA and only it.
pub fn engine_http(mock: &RunningMock) -> reqwest::Client {
    let mut b = reqwest::Client::builder();
    if let Some(ca) = mock.endpoints().platforms["ovirt"]["ca_file"].as_str() {
        let pem = std::fs::read(ca).unwrap();
        b = b
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

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
        // As an engine: HTTPS only, certificates from the mock's CA.
        config.ovirt.https = true;
        // As an engine: `logical_name` is the guest's `/dev/vdX`, reported
        // late; the provider finds attached disks by id in `device_root`.
        config.ovirt.guest_agent_names = true;
        f(&mut config);
        let mock = MockHypervisor::start(config).await.unwrap();
        let store = Arc::new(
            Datastore::create(dir.path().join("store"), DatastoreOptions::default()).unwrap(),
        );
        let http = engine_http(&mock);
        let mut env = Env {
            mock,
            dir,
            store,
            http,
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
        o.tls_ca = ep["ca_file"].as_str().map(std::path::PathBuf::from);
        o.device_root = ep["device_root"].as_str().unwrap().into();
        o.retry = RetryPolicy {
            attempts: 4,
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        };
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
                    info: JobInfo::new(format!("job-{t}"), t),
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

    /// Arms a generic NBD fault (`/admin/faults/nbd`); it also applies to
    /// the image server's reads of a transfer (export `ovirt-transfer-…`).
    pub async fn arm_nbd(&self, fault: Value) {
        self.admin_post("/admin/faults/nbd", fault).await;
    }

    /// Files under the test's directory outside the mock's state, the
    /// datastore and the job logs: what a provider staged (none expected).
    pub fn staged_files(&self) -> Vec<std::path::PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if ["state", "store", "logs"].iter().any(|n| name == *n) {
                continue;
            }
            let path = e.path();
            if path.is_dir() {
                walk(&path, &mut out);
            } else {
                out.push(path);
            }
        }
        out
    }

    /// Arms a generic HTTP fault (`/admin/faults/http`).
    pub async fn arm_http(&self, fault: Value) {
        self.admin_post("/admin/faults/http", fault).await;
    }

    /// Disarms every generic and oVirt fault.
    pub async fn disarm(&self) {
        for path in ["/admin/faults", "/admin/ovirt/faults"] {
            let r = self
                .http
                .delete(format!("{}{path}", self.mock.endpoints().http_url))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
        }
    }

    /// A backup of vm1 by `provider` as job `job` that stops after
    /// `backup_vm`, as if the process died: no cleanup runs, the objects
    /// it created stay on the platform.
    pub async fn interrupted_backup(&self, provider: &OvirtProvider, job: &JobInfo) {
        let guest = Guest::vm(self.vm.clone());
        provider.job_init(job).await.unwrap();
        provider.backup_init(&guest, job.start_time).await.unwrap();
        provider.backup_get_mechanism(&guest).await.unwrap();
        let plan = provider
            .backup_vm_query_incremental(&guest, None)
            .await
            .unwrap();
        provider
            .backup_vm(
                &guest,
                BackupVmRequest::new(plan, None, Arc::new(provider_api::testing::EmptyCatalog)),
            )
            .await
            .unwrap_or_else(|e| panic!("backup_vm: {}", e.report()));
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

/// The conformance kit's platform driver for the mock's oVirt: guests
/// through the admin API (`/admin/ovirt/vms`), guest writes and reads on
/// the mock's disk store in process (the guest's view: change tracking
/// sees the writes), leftovers from `/admin/ovirt/objects`; a disk grows
/// as an oVirt operator grows one, through the engine API (`PUT
/// /vms/{vm}/diskattachments/{disk}` with a larger
/// `<disk><provisioned_size>`). Device names are the disks' aliases (`d0`,
/// `d1`, ...), as provider-ovirt names volumes.
pub struct OvirtDriver {
    http: reqwest::Client,
    admin: String,
    api: String,
    sso: String,
    hv: Arc<mock_hypervisor::hypervisor::Hypervisor>,
    serial: std::sync::atomic::AtomicU64,
}

impl OvirtDriver {
    /// A driver for the mock of `env` (whose appliance it uses).
    pub fn new(env: &Env) -> Self {
        let ep = &env.mock.endpoints().platforms["ovirt"];
        OvirtDriver {
            http: engine_http(&env.mock),
            admin: env.mock.endpoints().http_url.clone(),
            api: ep["base_url"].as_str().unwrap_or_default().to_owned(),
            sso: ep["sso_url"].as_str().unwrap_or_default().to_owned(),
            hv: env.mock.hypervisor().clone(),
            serial: 0.into(),
        }
    }

    /// An engine API token for the operator (`admin@internal`).
    async fn token(&self) -> provider_api::Result<String> {
        let r = self
            .http
            .post(&self.sso)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=ovirt-password")
            .send()
            .await
            .map_err(|e| provider_api::Error::other("engine SSO").with_source(e))?;
        let v: Value = r
            .json()
            .await
            .map_err(|e| provider_api::Error::other("engine SSO answer").with_source(e))?;
        v["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                provider_api::Error::other(format!("engine SSO answer without a token: {v}"))
            })
    }

    async fn objects(&self) -> provider_api::Result<Value> {
        let r = self
            .http
            .get(format!("{}/admin/ovirt/objects", self.admin))
            .send()
            .await
            .map_err(|e| provider_api::Error::other("admin API").with_source(e))?;
        r.json()
            .await
            .map_err(|e| provider_api::Error::other("admin API answer").with_source(e))
    }

    /// `(device, disk id, size)` of a VM's own disks, in attachment order.
    async fn disks(&self, guest: &Guest) -> provider_api::Result<Vec<(String, String, u64)>> {
        let o = self.objects().await?;
        let vm = o["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["id"] == guest.id.0.as_str())
            .ok_or_else(|| provider_api::Error::not_found(format!("no VM {}", guest.id)))?;
        let alias = |id: &str| {
            o["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["id"] == id)
                .and_then(|d| d["alias"].as_str())
                .unwrap_or(id)
                .to_string()
        };
        Ok(vm["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let id = d["id"].as_str().unwrap_or_default().to_string();
                (alias(&id), id, d["size"].as_u64().unwrap_or(0))
            })
            .collect())
    }

    async fn disk(
        &self,
        guest: &Guest,
        device: &str,
    ) -> provider_api::Result<Arc<mock_hypervisor::disk::virtual_disk::VirtualDisk>> {
        let id = self
            .disks(guest)
            .await?
            .into_iter()
            .find(|d| d.0 == device)
            .map(|d| d.1)
            .ok_or_else(|| provider_api::Error::not_found(format!("no volume {device}")))?;
        self.hv
            .store
            .disk(&id)
            .map_err(|e| provider_api::Error::other("mock disk").with_source(e))
    }
}

#[async_trait]
impl conformance::PlatformDriver for OvirtDriver {
    async fn create_guest(&self, name: &str, sizes: &[u64]) -> provider_api::Result<Guest> {
        let n = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let disks: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"size": s, "format": "cow", "alias": format!("d{i}")}))
            .collect();
        let r = self
            .http
            .post(format!("{}/admin/ovirt/vms", self.admin))
            .json(&json!({"name": format!("{name}-{n}"), "status": "down", "disks": disks}))
            .send()
            .await
            .map_err(|e| provider_api::Error::other("admin API").with_source(e))?;
        if !r.status().is_success() {
            return Err(provider_api::Error::other(format!(
                "creating a VM: {}",
                r.text().await.unwrap_or_default()
            )));
        }
        let v: Value = r
            .json()
            .await
            .map_err(|e| provider_api::Error::other("admin API answer").with_source(e))?;
        Ok(Guest::vm(v["id"].as_str().unwrap_or_default()))
    }

    async fn volumes(&self, guest: &Guest) -> provider_api::Result<Vec<conformance::DriverVolume>> {
        Ok(self
            .disks(guest)
            .await?
            .into_iter()
            .map(|(device, _, size)| conformance::DriverVolume { device, size })
            .collect())
    }

    async fn write(
        &self,
        guest: &Guest,
        device: &str,
        offset: u64,
        data: &[u8],
    ) -> provider_api::Result<()> {
        let disk = self.disk(guest, device).await?;
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || disk.write(offset, &data))
            .await
            .map_err(|e| provider_api::Error::other("write task").with_source(e))?
            .map_err(|e| provider_api::Error::other("guest write").with_source(e))
    }

    async fn read(&self, guest: &Guest, device: &str) -> provider_api::Result<Vec<u8>> {
        let disk = self.disk(guest, device).await?;
        tokio::task::spawn_blocking(move || {
            disk.read(
                &mock_hypervisor::disk::virtual_disk::View::Live,
                0,
                disk.size(),
            )
        })
        .await
        .map_err(|e| provider_api::Error::other("read task").with_source(e))?
        .map_err(|e| provider_api::Error::other("guest read").with_source(e))
    }

    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> provider_api::Result<()> {
        let id = self
            .disks(guest)
            .await?
            .into_iter()
            .find(|d| d.0 == device)
            .map(|d| d.1)
            .ok_or_else(|| provider_api::Error::not_found(format!("no volume {device}")))?;
        // DiskAttachmentService.update, as an operator extends a disk.
        let r = self
            .http
            .put(format!(
                "{}/vms/{}/diskattachments/{id}",
                self.api, guest.id.0
            ))
            .bearer_auth(self.token().await?)
            .header("Content-Type", "application/xml")
            .body(format!(
                "<disk_attachment><disk><provisioned_size>{new_size}</provisioned_size></disk></disk_attachment>"
            ))
            .send()
            .await
            .map_err(|e| provider_api::Error::other("engine API").with_source(e))?;
        let status = r.status();
        if !status.is_success() {
            return Err(provider_api::Error::other(format!(
                "extending disk {id} of VM {} to {new_size} bytes: HTTP {status}: {}",
                guest.id,
                r.text().await.unwrap_or_default()
            )));
        }
        Ok(())
    }

    async fn leftovers(&self) -> provider_api::Result<Vec<String>> {
        let o = self.objects().await?;
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
        Ok(out)
    }

    async fn remove_guest(&self, _guest: &Guest) -> provider_api::Result<()> {
        // Guests stay in the mock (each test has a mock of its own).
        Ok(())
    }

    fn tracking_granularity(&self) -> u64 {
        mock_hypervisor::disk::BLOCK_SIZE
    }
}
