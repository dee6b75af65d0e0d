//! ZStack scenario fixtures: the in-process mock, its admin API, a
//! datastore and the provider wired through the engine.

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use datastore::{Datastore, DatastoreOptions};
use engine::{
    BackupDriver, CancelToken, HttpExposer, JobOptions, JobReport, MoverOptions, NbdExposer,
    RestoreDriver, RestoreReport, SourceExposer, StandardMover,
};
use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use provider_api::testing::PlatformProbe;
use provider_api::{BackupProvider, Guest, JobInfo, RestoreTarget, SnapshotId, Target};
use provider_zstack::{ZStackOptions, ZStackProvider};
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;

/// Plain JSON client of the mock's admin API.
#[derive(Clone)]
pub struct Admin {
    pub http: reqwest::Client,
    pub url: String,
}

impl Admin {
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
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
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
    pub async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Value {
        self.send(reqwest::Method::DELETE, path, None).await
    }
}

/// The mock, a datastore, a scratch directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub mock: RunningMock,
    pub admin: Admin,
    pub store: Arc<Datastore>,
}

impl Env {
    pub async fn start(configure: impl FnOnce(&mut MockConfig, &std::path::Path)) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = MockConfig::new(dir.path().join("mock"));
        configure(&mut config, dir.path());
        let mock = MockHypervisor::start(config).await.expect("mock starts");
        let admin = Admin {
            http: reqwest::Client::new(),
            url: mock.endpoints().admin_url.trim_end_matches('/').to_owned(),
        };
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
}

/// Distinct, increasing backup times.
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

pub struct Zs {
    pub env: Env,
    pub image: String,
}

impl Zs {
    pub async fn start() -> Zs {
        Zs::start_with(|_| {}).await
    }

    /// With the mock's ZStack settings changed by `configure`.
    pub async fn start_with(
        configure: impl FnOnce(&mut mock_hypervisor::zstack::ZStackConfig),
    ) -> Zs {
        let env = Env::start(|c, _| {
            c.zstack.job_polls = 1;
            configure(&mut c.zstack);
        })
        .await;
        let image = env
            .admin
            .post(
                "/zstack/images",
                json!({"name": "centos-small", "size": 16 * MIB, "fill": [
                    {"offset": 0, "length": 2 * MIB, "pattern": "text", "seed": 1},
                    {"offset": 4 * MIB, "length": 3 * MIB, "pattern": "random", "seed": 2},
                    {"offset": 12 * MIB, "length": MIB, "pattern": "zero", "seed": 0}]}),
            )
            .await["uuid"]
            .as_str()
            .expect("image uuid")
            .to_owned();
        Zs { env, image }
    }

    pub fn admin(&self) -> &Admin {
        &self.env.admin
    }

    /// A VM on the shared image with its own writes and optional data volume.
    pub async fn vm(&self, name: &str, seed: u64, data: bool) -> Value {
        let data = if data {
            json!([{"size": 8 * MIB, "fill": [{"offset": MIB, "length": 2 * MIB, "pattern": "random", "seed": seed + 100}]}])
        } else {
            json!([])
        };
        self.admin()
            .post(
                "/zstack/vms",
                json!({"name": name, "image_uuid": self.image,
                    "root_fill": [{"offset": 5 * MIB, "length": MIB, "pattern": "random", "seed": seed},
                                  {"offset": 14 * MIB, "length": 256 * 1024, "pattern": "text", "seed": seed + 1}],
                    "data": data}),
            )
            .await
    }

    pub fn options(&self) -> ZStackOptions {
        let ep = self.env.mock.endpoints();
        let z = &ep.platforms["zstack"];
        let mut o = ZStackOptions::new(
            z["base_url"].as_str().expect("zstack url"),
            z["account"].as_str().expect("account"),
            z["password"].as_str().expect("password"),
            self.env.dir.path().join(format!("work-{}", now())),
        );
        o.poll_interval_ms = 5;
        o.job_timeout_secs = 20.0;
        o
    }

    pub fn provider(&self) -> Arc<ZStackProvider> {
        self.provider_with(self.options())
    }

    pub fn provider_with(&self, o: ZStackOptions) -> Arc<ZStackProvider> {
        Arc::new(ZStackProvider::new(o).expect("provider"))
    }

    pub async fn backup(&self, provider: Arc<ZStackProvider>, guests: &[&str]) -> JobReport {
        self.backup_parallel(provider, guests, 1).await
    }

    pub async fn backup_parallel(
        &self,
        provider: Arc<ZStackProvider>,
        guests: &[&str],
        parallelism: usize,
    ) -> JobReport {
        self.backup_job(provider, guests, parallelism, JobInfo::new("zstack", now()))
            .await
    }

    /// A backup job with the host's job information (host id, running jobs).
    pub async fn backup_job(
        &self,
        provider: Arc<ZStackProvider>,
        guests: &[&str],
        parallelism: usize,
        info: JobInfo,
    ) -> JobReport {
        let driver = BackupDriver::new(
            provider,
            self.env.store.clone() as Arc<dyn Target>,
            Arc::new(StandardMover::new(MoverOptions::default())),
        );
        let options = JobOptions {
            info,
            parallelism,
            log_dir: self.env.dir.path().join("logs"),
        };
        driver
            .run_job(&options, guests.iter().map(|g| Guest::vm(*g)).collect())
            .await
    }

    pub async fn restore(
        &self,
        provider: Arc<ZStackProvider>,
        snapshot: &SnapshotId,
        name: &str,
    ) -> provider_api::Result<RestoreReport> {
        let http = HttpExposer::start(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?;
        self.restore_with(
            provider,
            snapshot,
            name,
            Arc::new(http),
            CancelToken::never(),
        )
        .await
    }

    /// A restore whose sources are served by `http` (the host's HTTP
    /// exposer, as `restore_listen` / `advertise_url` configure it),
    /// interrupted when `cancel` fires.
    pub async fn restore_with(
        &self,
        provider: Arc<ZStackProvider>,
        snapshot: &SnapshotId,
        name: &str,
        http: Arc<dyn SourceExposer>,
        cancel: CancelToken,
    ) -> provider_api::Result<RestoreReport> {
        let nbd = NbdExposer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        RestoreDriver::new(
            provider as Arc<dyn BackupProvider>,
            self.env.store.clone() as Arc<dyn Target>,
            Arc::new(StandardMover::default()),
            Arc::new(nbd),
        )
        .with_http_exposer(http)
        .restore_vm_cancellable(
            snapshot,
            RestoreTarget::NewGuest {
                name: Some(name.into()),
            },
            cancel,
        )
        .await
    }

    /// How many private (non-system) images exist.
    pub async fn image_count(&self) -> usize {
        self.objects().await["private_images"]
            .as_u64()
            .expect("private_images") as usize
    }

    /// The first instance offering and L3 network of the mock (what the
    /// admin's VMs get unless told otherwise).
    pub async fn default_offering_and_l3(&self) -> (String, String) {
        let o = self.objects().await;
        (
            uuid(&o["instance_offerings"][0]),
            uuid(&o["l3_networks"][0]),
        )
    }

    pub async fn objects(&self) -> Value {
        self.admin().get("/zstack/objects").await
    }

    /// Digests of a VM's volumes in device order.
    pub async fn digests(&self, vm: &str) -> Vec<String> {
        let o = self.objects().await;
        let mut vols: Vec<&Value> = o["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["vmInstanceUuid"] == vm)
            .collect();
        vols.sort_by_key(|v| {
            (
                v["type"] != "Root",
                v["name"].as_str().unwrap_or("").to_owned(),
            )
        });
        let mut out = Vec::new();
        for v in vols {
            let uuid = v["uuid"].as_str().unwrap();
            out.push(
                self.admin()
                    .get(&format!("/zstack/volumes/{uuid}/sha256"))
                    .await["sha256"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        out
    }

    /// Fails the test, listing them, when anything of ours is left on
    /// the platform.
    pub async fn assert_no_leftovers(&self) {
        let left = self.leftovers().await;
        assert!(left.is_empty(), "left on the platform: {left:?}");
    }

    pub async fn leftovers(&self) -> Vec<String> {
        ZsProbe {
            admin: self.admin().clone(),
        }
        .leftovers()
        .await
    }
}

pub struct ZsProbe {
    pub admin: Admin,
}

#[async_trait]
impl PlatformProbe for ZsProbe {
    async fn leftovers(&self) -> Vec<String> {
        let o = self.admin.get("/zstack/objects").await;
        let mut out = Vec::new();
        for key in ["temporary_images", "exports", "snapshots"] {
            for x in o[key].as_array().cloned().unwrap_or_default() {
                out.push(format!("{key}: {x}"));
            }
        }
        for i in o["images"].as_array().cloned().unwrap_or_default() {
            if i["status"] == "Downloading" || i["status"] == "Deleted" {
                out.push(format!("image: {i}"));
            }
        }
        out
    }
}

pub fn uuid(v: &Value) -> String {
    v["uuid"].as_str().expect("uuid").to_owned()
}

pub fn snapshot_of(report: &JobReport, i: usize) -> SnapshotId {
    report.guests[i]
        .result
        .as_ref()
        .expect("guest backed up")
        .snapshot
        .id
        .clone()
}

pub fn assert_ok(report: &JobReport) {
    for g in &report.guests {
        if let Err(e) = &g.result {
            panic!("backup of {} failed: {}", g.guest.id, e.report());
        }
    }
    assert!(report.success(), "{report:?}");
}

/// The conformance kit's platform driver for the mock's ZStack: guests,
/// guest writes and reads, volume growth and leftovers through the mock's
/// admin API (the operator's side), never through the provider.
///
/// A guest's first volume is its root volume, thin-cloned from an image
/// made for it (`<name>-root`, holding a pattern so that the base is not
/// all zeroes); the others are data volumes with data of their own.
/// Devices are named as provider-zstack names them: `root`, `data-<id>`.
pub struct ZsDriver {
    pub admin: Admin,
}

impl ZsDriver {
    fn err(what: &str, e: impl std::fmt::Display) -> provider_api::Error {
        provider_api::Error::other(format!("mock ZStack admin: {what}: {e}"))
    }

    async fn ok_json(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> provider_api::Result<Value> {
        let resp = req.send().await.map_err(|e| Self::err(what, e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| Self::err(what, e))?;
        if !status.is_success() {
            return Err(Self::err(what, format!("HTTP {status}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| Self::err(what, e))
    }

    /// The guest's volumes as (device, volume uuid, size), root first.
    async fn volume_list(&self, guest: &Guest) -> provider_api::Result<Vec<(String, String, u64)>> {
        let o = self
            .ok_json(
                "objects",
                self.admin
                    .http
                    .get(format!("{}/zstack/objects", self.admin.url)),
            )
            .await?;
        let mut vols: Vec<(bool, u64, String, String, u64)> = Vec::new();
        for v in o["volumes"].as_array().cloned().unwrap_or_default() {
            if v["vmInstanceUuid"] != guest.id.0.as_str() {
                continue;
            }
            let field = |k: &str| Self::err("objects", format!("volume without {k}: {v}"));
            let kind = v["type"].as_str().ok_or_else(|| field("type"))?;
            let id = v["deviceId"].as_u64().ok_or_else(|| field("deviceId"))?;
            let uuid = v["uuid"].as_str().ok_or_else(|| field("uuid"))?;
            let size = v["size"].as_u64().ok_or_else(|| field("size"))?;
            let device = if kind == "Root" {
                "root".to_owned()
            } else {
                format!("data-{id}")
            };
            vols.push((kind != "Root", id, device, uuid.to_owned(), size));
        }
        vols.sort();
        Ok(vols.into_iter().map(|(_, _, d, u, s)| (d, u, s)).collect())
    }

    async fn volume_uuid(
        &self,
        guest: &Guest,
        device: &str,
    ) -> provider_api::Result<(String, u64)> {
        self.volume_list(guest)
            .await?
            .into_iter()
            .find(|(d, _, _)| d == device)
            .map(|(_, u, s)| (u, s))
            .ok_or_else(|| {
                provider_api::Error::not_found(format!("guest {} has no volume {device}", guest.id))
            })
    }
}

#[async_trait]
impl conformance::PlatformDriver for ZsDriver {
    async fn create_guest(&self, name: &str, sizes: &[u64]) -> provider_api::Result<Guest> {
        let (root, data) = sizes
            .split_first()
            .ok_or_else(|| provider_api::Error::invalid("a ZStack VM needs a root volume"))?;
        let seed = sizes.iter().sum::<u64>() % 997;
        let image = self
            .ok_json(
                "create image",
                self.admin
                    .http
                    .post(format!("{}/zstack/images", self.admin.url))
                    .json(&json!({"name": format!("{name}-root"), "size": root, "fill": [
                        {"offset": 0, "length": (*root).min(MIB), "pattern": "text", "seed": seed}]})),
            )
            .await?;
        let image = image["uuid"]
            .as_str()
            .ok_or_else(|| Self::err("create image", "no uuid"))?
            .to_owned();
        let data: Vec<Value> = data
            .iter()
            .enumerate()
            .map(|(i, size)| {
                json!({"size": size, "fill": [{"offset": 0, "length": (*size).min(MIB / 2),
                    "pattern": "random", "seed": seed + i as u64 + 1}]})
            })
            .collect();
        let vm = self
            .ok_json(
                "create VM",
                self.admin
                    .http
                    .post(format!("{}/zstack/vms", self.admin.url))
                    .json(&json!({"name": name, "image_uuid": image, "data": data})),
            )
            .await?;
        let id = vm["uuid"]
            .as_str()
            .ok_or_else(|| Self::err("create VM", "no uuid"))?;
        Ok(Guest::vm(id))
    }

    async fn volumes(&self, guest: &Guest) -> provider_api::Result<Vec<conformance::DriverVolume>> {
        Ok(self
            .volume_list(guest)
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
        let (uuid, _) = self.volume_uuid(guest, device).await?;
        self.ok_json(
            "guest write",
            self.admin
                .http
                .put(format!("{}/zstack/volumes/{uuid}/data", self.admin.url))
                .query(&[("offset", offset)])
                .body(data.to_vec()),
        )
        .await
        .map(|_| ())
    }

    async fn read(&self, guest: &Guest, device: &str) -> provider_api::Result<Vec<u8>> {
        let (uuid, size) = self.volume_uuid(guest, device).await?;
        let resp = self
            .admin
            .http
            .get(format!("{}/zstack/volumes/{uuid}/data", self.admin.url))
            .send()
            .await
            .map_err(|e| Self::err("read", e))?;
        if !resp.status().is_success() {
            return Err(Self::err("read", format!("HTTP {}", resp.status())));
        }
        let bytes = resp.bytes().await.map_err(|e| Self::err("read", e))?;
        if bytes.len() as u64 != size {
            return Err(Self::err(
                "read",
                format!("{} bytes of a {size}-byte volume", bytes.len()),
            ));
        }
        Ok(bytes.to_vec())
    }

    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> provider_api::Result<()> {
        let (uuid, _) = self.volume_uuid(guest, device).await?;
        self.ok_json(
            "resize",
            self.admin
                .http
                .post(format!("{}/zstack/volumes/{uuid}/resize", self.admin.url))
                .json(&json!({"size": new_size})),
        )
        .await
        .map(|_| ())
    }

    async fn leftovers(&self) -> provider_api::Result<Vec<String>> {
        let mut out = ZsProbe {
            admin: self.admin.clone(),
        }
        .leftovers()
        .await;
        let o = self.admin.get("/zstack/objects").await;
        for v in o["volumes"].as_array().cloned().unwrap_or_default() {
            if v["vmInstanceUuid"].is_null() {
                out.push(format!("detached volume: {v}"));
            }
        }
        for v in o["running_jobs"].as_array().cloned().unwrap_or_default() {
            out.push(format!("running API job: {v}"));
        }
        Ok(out)
    }

    async fn remove_guest(&self, guest: &Guest) -> provider_api::Result<()> {
        // A guest a failed restore never created (or already removed) is
        // not an error.
        let resp = self
            .admin
            .http
            .delete(format!("{}/zstack/vms/{}", self.admin.url, guest.id.0))
            .send()
            .await
            .map_err(|e| Self::err("remove VM", e))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(Self::err("remove VM", format!("HTTP {status}: {text}")))
    }

    fn tracking_granularity(&self) -> u64 {
        // No change tracking: provider-zstack compares 64 KiB block digests.
        provider_zstack::download::BLOCK
    }
}

/// An HTTP exposer that records the URLs it hands out and can slow every
/// read of the sources down (to interrupt a restore mid-fetch).
pub struct RecordingExposer {
    pub inner: HttpExposer,
    pub urls: std::sync::Mutex<Vec<String>>,
    pub read_delay: std::time::Duration,
    /// Fires at the first read of a source.
    pub first_read: Arc<tokio::sync::Notify>,
}

impl RecordingExposer {
    pub async fn start(advertise: Option<&str>, read_delay: std::time::Duration) -> Self {
        RecordingExposer {
            inner: HttpExposer::start(SocketAddr::from(([127, 0, 0, 1], 0)), advertise)
                .await
                .expect("http exposer"),
            urls: Default::default(),
            read_delay,
            first_read: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

struct SlowReader {
    inner: Arc<dyn provider_api::VolumeReader>,
    delay: std::time::Duration,
    first_read: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl provider_api::VolumeReader for SlowReader {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, length: u64) -> provider_api::Result<provider_api::Bytes> {
        self.first_read.notify_one();
        tokio::time::sleep(self.delay).await;
        self.inner.read_at(offset, length).await
    }
    async fn regions(
        &self,
        offset: u64,
        length: u64,
    ) -> provider_api::Result<Vec<provider_api::Region>> {
        // Every region as data: each chunk goes through `read_at`.
        let _ = self.inner.regions(offset, length).await?;
        Ok(vec![provider_api::Region {
            extent: provider_api::Extent { offset, length },
            kind: provider_api::RegionKind::Data,
        }])
    }
}

#[async_trait]
impl SourceExposer for RecordingExposer {
    async fn expose(
        &self,
        name: &str,
        reader: Arc<dyn provider_api::VolumeReader>,
    ) -> provider_api::Result<(String, Box<dyn Send + Sync>)> {
        let reader: Arc<dyn provider_api::VolumeReader> = if self.read_delay.is_zero() {
            reader
        } else {
            Arc::new(SlowReader {
                inner: reader,
                delay: self.read_delay,
                first_read: self.first_read.clone(),
            })
        };
        let (url, guard) = self.inner.expose(name, reader).await?;
        self.urls.lock().unwrap().push(url.clone());
        Ok((url, guard))
    }
}
