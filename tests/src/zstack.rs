//! ZStack scenario fixtures: the in-process mock, its admin API, a
//! datastore and the provider wired through the engine.

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use datastore::{Datastore, DatastoreOptions};
use engine::{
    BackupDriver, JobOptions, JobReport, MoverOptions, NbdExposer, RestoreDriver, RestoreReport,
    StandardMover,
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
        let env = Env::start(|c, _| c.zstack.job_polls = 1).await;
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
        let driver = BackupDriver::new(
            provider,
            self.env.store.clone() as Arc<dyn Target>,
            Arc::new(StandardMover::new(MoverOptions::default())),
        );
        let options = JobOptions {
            info: JobInfo {
                job_id: "zstack".into(),
                start_time: now(),
                ..JobInfo::default()
            },
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
        let exposer = NbdExposer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        RestoreDriver::new(
            provider as Arc<dyn BackupProvider>,
            self.env.store.clone() as Arc<dyn Target>,
            Arc::new(StandardMover::default()),
            Arc::new(exposer),
        )
        .restore_vm(
            snapshot,
            RestoreTarget::NewGuest {
                name: Some(name.into()),
            },
        )
        .await
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
