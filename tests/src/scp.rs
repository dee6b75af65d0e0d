//! SCP fixtures: the mock hypervisor with its admin API, a datastore, the
//! engine wired to `provider-scp`, and a leak probe over the mock's
//! object listing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datastore::{Datastore, DatastoreOptions};
use engine::{
    BackupDriver, JobOptions, JobReport, MoverOptions, NbdExposer, RestoreDriver, RestoreReport,
    StandardMover,
};
use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use provider_api::testing::PlatformProbe;
use provider_api::{BackupProvider, Guest, JobInfo, RestoreTarget, SnapshotId, Target};
use provider_scp::{AccessMode, ScpOptions, ScpProvider};
use serde_json::{Value, json};

/// Plain JSON client of the mock's admin API (no auth).
#[derive(Clone)]
pub struct Admin {
    http: reqwest::Client,
    url: String,
}

impl Admin {
    /// A client for `admin_url`.
    pub fn new(admin_url: &str) -> Self {
        Admin {
            http: reqwest::Client::new(),
            url: admin_url.trim_end_matches('/').to_owned(),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status();
        let text = resp.text().await.expect("admin answer");
        assert!(
            status.is_success(),
            "admin {method} {path}: HTTP {status}: {text}"
        );
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("admin JSON")
        }
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// PUT with a JSON body.
    pub async fn put(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Value {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// An `AVAILABLE` base image with data on both storages; returns its id.
    pub async fn base_image(&self, name: &str, size: u64, fills: Value) -> String {
        let v = self
            .post(
                "/scp/base-images",
                json!({"name": name, "size": size,
                    "storage_ids": ["storage-local", "storage-vs"], "fill": fills}),
            )
            .await;
        v["id"].as_str().expect("base image id").to_owned()
    }

    /// A VM; `disks` as the admin API takes them. Returns the server object.
    pub async fn server(&self, body: Value) -> Value {
        self.post("/scp/servers", body).await
    }

    /// A guest write.
    pub async fn write(&self, disk: &str, offset: u64, length: u64, pattern: &str, seed: u64) {
        self.post(
            &format!("/disks/{disk}/write"),
            json!({"offset": offset, "length": length, "pattern": pattern, "seed": seed}),
        )
        .await;
    }

    /// SHA-256 of the live disk as the guest sees it.
    pub async fn sha256(&self, disk: &str) -> String {
        self.get(&format!("/disks/{disk}/sha256")).await["sha256"]
            .as_str()
            .expect("sha256")
            .to_owned()
    }

    /// Digests of every disk of a server, in disk order.
    pub async fn server_digests(&self, server: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for d in server["disks"].as_array().expect("disks") {
            out.push(self.sha256(d["id"].as_str().expect("disk id")).await);
        }
        out
    }

    /// `/admin/scp/objects`.
    pub async fn scp_objects(&self) -> Value {
        self.get("/scp/objects").await
    }

    /// The server object (through the objects listing and the SCP list).
    pub async fn server_by_name(&self, scp: &ScpProvider, name: &str) -> Option<Value> {
        let list: Vec<Value> = scp
            .client()
            .list("/janus/20250725/servers", &[("name", name.to_owned())])
            .await
            .expect("server list");
        list.into_iter().find(|s| s["name"] == name)
    }

    /// Bytes read from SCP exports since the last history reset.
    pub async fn bytes_read(&self) -> u64 {
        let e = self.get("/exports").await;
        ["active", "closed"]
            .iter()
            .flat_map(|k| e[*k].as_array().cloned().unwrap_or_default())
            .map(|s| s["bytes_read"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Forget closed exports' counters.
    pub async fn reset_export_history(&self) {
        self.delete("/exports/history").await;
    }
}

/// The mock, a datastore and the engine.
pub struct Env {
    /// Keeps the directories.
    pub dir: tempfile::TempDir,
    /// The mock hypervisor.
    pub mock: RunningMock,
    /// Its admin API.
    pub admin: Admin,
    /// The datastore.
    pub store: Arc<Datastore>,
}

impl Env {
    /// Start a mock (configured by `configure`) and create a datastore
    /// with 1 MiB chunks.
    pub async fn start(configure: impl FnOnce(&mut MockConfig, &std::path::Path)) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = MockConfig::new(dir.path().join("mock"));
        configure(&mut config, dir.path());
        let mock = MockHypervisor::start(config).await.expect("mock starts");
        let admin = Admin::new(&mock.endpoints().admin_url);
        let store = Arc::new(
            Datastore::create(
                dir.path().join("store"),
                DatastoreOptions {
                    chunk_size: 1 << 20,
                    ..Default::default()
                },
            )
            .expect("datastore"),
        );
        Env {
            dir,
            mock,
            admin,
            store,
        }
    }

    /// Provider options for this mock, with quick polling.
    pub fn options(&self, access: AccessMode) -> ScpOptions {
        let ep = self.mock.endpoints();
        let scp = &ep.platforms["scp"];
        let mut o = ScpOptions::new(
            ep.scp_url(),
            scp["username"].as_str().unwrap_or("admin"),
            scp["password"].as_str().unwrap_or("admin-password"),
        );
        o.access = access;
        o.poll_interval = Duration::from_millis(10);
        o.renew_interval = Duration::from_millis(500);
        o.lease_seconds = 60;
        o
    }

    /// A provider over NBD.
    pub fn provider(&self) -> Arc<ScpProvider> {
        self.provider_with(self.options(AccessMode::Nbd))
    }

    /// A provider with these options.
    pub fn provider_with(&self, options: ScpOptions) -> Arc<ScpProvider> {
        Arc::new(ScpProvider::new(options).expect("provider"))
    }

    /// The CA certificate of the mock's NBDSSL.
    pub fn ca_pem(&self) -> String {
        let p = self
            .mock
            .endpoints()
            .nbd
            .ca_cert
            .clone()
            .expect("mock started with TLS");
        std::fs::read_to_string(p).expect("CA file")
    }

    /// Run one backup job over `guests` (ids), one at a time.
    pub async fn backup(&self, provider: Arc<ScpProvider>, guests: &[&str]) -> JobReport {
        self.backup_with(provider, guests, MoverOptions::default())
            .await
    }

    /// Like [`Env::backup`] with mover options (e.g. a bandwidth limit).
    pub async fn backup_with(
        &self,
        provider: Arc<ScpProvider>,
        guests: &[&str],
        mover: MoverOptions,
    ) -> JobReport {
        let driver = BackupDriver::new(
            provider,
            self.store.clone() as Arc<dyn Target>,
            Arc::new(StandardMover::new(mover)),
        );
        let options = JobOptions {
            info: JobInfo::new("scenario", now()),
            parallelism: 1,
            log_dir: self.dir.path().join("logs"),
        };
        driver
            .run_job(&options, guests.iter().map(|g| Guest::vm(*g)).collect())
            .await
    }

    /// Restore a snapshot through the engine.
    pub async fn restore(
        &self,
        provider: Arc<ScpProvider>,
        snapshot: &SnapshotId,
        target: RestoreTarget,
    ) -> provider_api::Result<RestoreReport> {
        restore_from(&self.store, provider, snapshot, target).await
    }
}

/// Restore `snapshot` from `store` with `provider` (which may point at
/// another mock).
pub async fn restore_from(
    store: &Arc<Datastore>,
    provider: Arc<ScpProvider>,
    snapshot: &SnapshotId,
    target: RestoreTarget,
) -> provider_api::Result<RestoreReport> {
    let exposer = NbdExposer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let driver = RestoreDriver::new(
        provider as Arc<dyn BackupProvider>,
        store.clone() as Arc<dyn Target>,
        Arc::new(StandardMover::default()),
        Arc::new(exposer),
    );
    driver.restore_vm(snapshot, target).await
}

/// Seconds since the epoch; distinct per call so that two jobs in one
/// second get distinct snapshot names.
pub fn now() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let prev = LAST.fetch_max(t, Ordering::SeqCst);
    if prev >= t {
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        t
    }
}

/// A [`PlatformProbe`] over the mock's SCP object listing: snapshots,
/// hot-adds, backup resources, SCP exports, unsealed base images and
/// running tasks left behind.
pub struct ScpProbe {
    /// Admin client.
    pub admin: Admin,
}

#[async_trait]
impl PlatformProbe for ScpProbe {
    async fn leftovers(&self) -> Vec<String> {
        let o = self.admin.scp_objects().await;
        let mut out = Vec::new();
        for key in [
            "snapshots",
            "hotadds",
            "backup_resources",
            "exports",
            "temporary_base_images",
        ] {
            if let Some(a) = o[key].as_array()
                && !a.is_empty()
            {
                out.push(format!("{key}: {}", Value::Array(a.clone())));
            }
        }
        out
    }
}

/// Leftovers now (empty when clean).
pub async fn leftovers(admin: &Admin) -> Vec<String> {
    ScpProbe {
        admin: admin.clone(),
    }
    .leftovers()
    .await
}

/// The conformance kit's [`conformance::PlatformDriver`] for the mock's
/// SCP: guests are linked VMs (the system disk on a shared 1 MiB base
/// image whenever it is large enough), written and read in process on the
/// mock's disks (as the guest sees them, CBT included), grown through the
/// admin API, removed through the janus API.
pub struct ScpDriver {
    admin: Admin,
    mock_hv: Arc<mock_hypervisor::hypervisor::Hypervisor>,
    platform: Arc<mock_hypervisor::scp::ScpPlatform>,
    client: Arc<provider_scp::ScpClient>,
    base_image: String,
    base_size: u64,
    providers: Vec<Arc<ScpProvider>>,
}

fn driver_error(what: &str, e: impl std::fmt::Display) -> provider_api::Error {
    provider_api::Error::other(format!("mock SCP: {what}: {e}"))
}

impl ScpDriver {
    /// A driver for `env`'s mock; `providers` are the providers under test
    /// (a restore may return a provisional guest that only they resolve).
    pub async fn new(env: &Env, providers: Vec<Arc<ScpProvider>>) -> ScpDriver {
        let base_size = 1 << 20;
        let base_image = env
            .admin
            .base_image(
                "kit-base",
                base_size,
                json!([
                    {"offset": 0, "length": 256 << 10, "pattern": "text", "seed": 1},
                    {"offset": 512 << 10, "length": 256 << 10, "pattern": "random", "seed": 2},
                ]),
            )
            .await;
        let client = Arc::new(
            provider_scp::ScpClient::new(&env.options(AccessMode::Nbd)).expect("janus client"),
        );
        ScpDriver {
            admin: env.admin.clone(),
            mock_hv: env.mock.hypervisor().clone(),
            platform: env.mock.scp().clone(),
            client,
            base_image,
            base_size,
            providers,
        }
    }

    fn server_id(&self, guest: &Guest) -> String {
        self.providers
            .iter()
            .find_map(|p| p.restored_server_id(guest))
            .unwrap_or_else(|| guest.id.0.clone())
    }

    /// (disk id, size) of the guest's device.
    fn disk(&self, guest: &Guest, device: &str) -> provider_api::Result<(String, u64)> {
        let id = self.server_id(guest);
        self.platform
            .inventory()
            .read(|doc| {
                doc.servers
                    .get(&id)
                    .and_then(|s| s.disks.iter().find(|d| d.name == device))
                    .map(|d| (d.id.clone(), d.size))
            })
            .ok_or_else(|| {
                provider_api::Error::not_found(format!("server {id} has no disk {device}"))
            })
    }
}

fn round_up_512(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

#[async_trait]
impl conformance::PlatformDriver for ScpDriver {
    async fn create_guest(&self, name: &str, sizes: &[u64]) -> provider_api::Result<Guest> {
        let disks: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let size = round_up_512(*s);
                if i == 0 && size >= self.base_size {
                    json!({"size": size, "base_image_id": self.base_image})
                } else {
                    json!({"size": size})
                }
            })
            .collect();
        let server = self
            .admin
            .server(json!({"name": name, "storage_id": "storage-local", "disks": disks}))
            .await;
        let id = server["id"]
            .as_str()
            .ok_or_else(|| driver_error("create server", "no id"))?;
        Ok(Guest::vm(id))
    }

    async fn volumes(&self, guest: &Guest) -> provider_api::Result<Vec<conformance::DriverVolume>> {
        let id = self.server_id(guest);
        self.platform
            .inventory()
            .read(|doc| {
                doc.servers.get(&id).map(|s| {
                    s.disks
                        .iter()
                        .map(|d| conformance::DriverVolume {
                            device: d.name.clone(),
                            size: d.size,
                        })
                        .collect()
                })
            })
            .ok_or_else(|| provider_api::Error::not_found(format!("server {id}")))
    }

    async fn write(
        &self,
        guest: &Guest,
        device: &str,
        offset: u64,
        data: &[u8],
    ) -> provider_api::Result<()> {
        let (disk, _) = self.disk(guest, device)?;
        self.mock_hv
            .store
            .disk(&disk)
            .and_then(|d| d.write(offset, data))
            .map_err(|e| driver_error("guest write", e))
    }

    async fn read(&self, guest: &Guest, device: &str) -> provider_api::Result<Vec<u8>> {
        let (disk, size) = self.disk(guest, device)?;
        self.mock_hv
            .store
            .disk(&disk)
            .and_then(|d| d.read(&mock_hypervisor::disk::View::Live, 0, size))
            .map_err(|e| driver_error("read disk", e))
    }

    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> provider_api::Result<()> {
        let (disk, _) = self.disk(guest, device)?;
        self.admin
            .post(
                &format!("/scp/servers/{}/disks/{disk}/grow", self.server_id(guest)),
                json!({"size": round_up_512(new_size)}),
            )
            .await;
        Ok(())
    }

    async fn leftovers(&self) -> provider_api::Result<Vec<String>> {
        Ok(leftovers(&self.admin).await)
    }

    async fn remove_guest(&self, guest: &Guest) -> provider_api::Result<()> {
        let path = format!("/janus/20250725/servers/{}", self.server_id(guest));
        match self
            .client
            .task::<Value>(reqwest::Method::DELETE, &path, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == provider_api::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn tracking_granularity(&self) -> u64 {
        mock_hypervisor::disk::BLOCK_SIZE
    }
}
