//! ZStack end to end: provider-zstack against the mock's ZStack module,
//! through engine::BackupDriver / RestoreDriver into a real datastore.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use datastore::{Datastore, DatastoreOptions};
use engine::{
    BackupDriver, JobOptions, JobReport, MoverOptions, NbdExposer, RestoreDriver, RestoreReport,
    StandardMover,
};
use mock_hypervisor::{MockConfig, MockHypervisor, RunningMock};
use provider_api::testing::{PlatformProbe, check_all};
use provider_api::{
    BackupProvider, BaseImageId, ErrorKind, Guest, JobInfo, RestoreTarget, SnapshotId, Target,
};
use provider_zstack::{ZStackOptions, ZStackProvider};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// Plain JSON client of the mock's admin API.
#[derive(Clone)]
struct Admin {
    http: reqwest::Client,
    url: String,
}

impl Admin {
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
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
    async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
    async fn put(&self, path: &str, body: Value) -> Value {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }
    async fn delete(&self, path: &str) -> Value {
        self.send(reqwest::Method::DELETE, path, None).await
    }
}

/// The mock, a datastore, a scratch directory.
struct Env {
    dir: tempfile::TempDir,
    mock: RunningMock,
    admin: Admin,
    store: Arc<Datastore>,
}

impl Env {
    async fn start(configure: impl FnOnce(&mut MockConfig, &std::path::Path)) -> Env {
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
fn now() -> i64 {
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

struct Zs {
    env: Env,
    image: String,
}

impl Zs {
    async fn start() -> Zs {
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

    fn admin(&self) -> &Admin {
        &self.env.admin
    }

    /// A VM on the shared image with its own writes and optional data volume.
    async fn vm(&self, name: &str, seed: u64, data: bool) -> Value {
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

    fn options(&self) -> ZStackOptions {
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

    fn provider(&self) -> Arc<ZStackProvider> {
        self.provider_with(self.options())
    }

    fn provider_with(&self, o: ZStackOptions) -> Arc<ZStackProvider> {
        Arc::new(ZStackProvider::new(o).expect("provider"))
    }

    async fn backup(&self, provider: Arc<ZStackProvider>, guests: &[&str]) -> JobReport {
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
            parallelism: 1,
            log_dir: self.env.dir.path().join("logs"),
        };
        driver
            .run_job(&options, guests.iter().map(|g| Guest::vm(*g)).collect())
            .await
    }

    async fn restore(
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

    async fn objects(&self) -> Value {
        self.admin().get("/zstack/objects").await
    }

    /// Digests of a VM's volumes in device order.
    async fn digests(&self, vm: &str) -> Vec<String> {
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

    async fn leftovers(&self) -> Vec<String> {
        ZsProbe {
            admin: self.admin().clone(),
        }
        .leftovers()
        .await
    }
}

struct ZsProbe {
    admin: Admin,
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

fn uuid(v: &Value) -> String {
    v["uuid"].as_str().expect("uuid").to_owned()
}

fn snapshot_of(report: &JobReport, i: usize) -> SnapshotId {
    report.guests[i]
        .result
        .as_ref()
        .expect("guest backed up")
        .snapshot
        .id
        .clone()
}

fn assert_ok(report: &JobReport) {
    for g in &report.guests {
        if let Err(e) = &g.result {
            panic!("backup of {} failed: {}", g.guest.id, e.report());
        }
    }
    assert!(report.success(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_repeated_backups_restore_byte_identical() {
    let zs = Zs::start().await;
    let vm1 = uuid(&zs.vm("vm-1", 10, false).await);
    let vm2 = zs.vm("vm-2", 20, true).await;
    let vm2_id = uuid(&vm2);
    let provider = zs.provider();

    let first = zs.backup(provider.clone(), &[&vm1, &vm2_id]).await;
    assert_ok(&first);
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
    let before = zs.digests(&vm2_id).await;
    assert_eq!(before.len(), 2);

    // The guest writes; the repeated backup sees it.
    let root_vol = vm2["rootVolumeUuid"].as_str().unwrap();
    zs.admin()
        .post(
            &format!("/zstack/volumes/{root_vol}/write"),
            json!({"offset": 7 * MIB, "length": MIB, "pattern": "random", "seed": 77}),
        )
        .await;
    let second = zs.backup(provider.clone(), &[&vm2_id]).await;
    assert_ok(&second);
    let after = zs.digests(&vm2_id).await;
    assert_ne!(before[0], after[0]);
    assert_eq!(before[1], after[1]);
    let g = second.guests[0].result.as_ref().unwrap();
    assert_eq!(g.snapshot.volumes.len(), 2);
    // The second backup found nothing new in the data volume.
    let data = g.volumes.iter().find(|v| v.device != "root").unwrap();
    assert_eq!(data.stats.target.bytes_new, 0, "{data:?}");

    // Restore both snapshots: each is byte-identical to what was backed up.
    let r1 = zs
        .restore(provider.clone(), &snapshot_of(&first, 1), "vm-2-first")
        .await
        .expect("restore first");
    assert_eq!(zs.digests(&r1.guest.id.0).await, before);
    let r2 = zs
        .restore(provider.clone(), &snapshot_of(&second, 0), "vm-2-second")
        .await
        .expect("restore second");
    assert_eq!(zs.digests(&r2.guest.id.0).await, after);
    let o = zs.objects().await;
    let restored = o["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["uuid"] == r2.guest.id.0.as_str())
        .unwrap();
    assert_eq!(restored["name"], "vm-2-second");

    // A plain root-only VM as well.
    let r3 = zs
        .restore(provider.clone(), &snapshot_of(&first, 0), "vm-1-restored")
        .await
        .expect("restore vm-1");
    assert_eq!(zs.digests(&r3.guest.id.0).await, zs.digests(&vm1).await);
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_cached_base_image_is_stored_once() {
    let zs = Zs::start().await;
    let a = uuid(&zs.vm("linked-a", 30, false).await);
    let b = uuid(&zs.vm("linked-b", 40, true).await);
    let o = zs.objects().await;
    let roots: Vec<&Value> = o["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "Root")
        .collect();
    assert!(
        roots
            .iter()
            .all(|v| v["rootImageUuid"] == zs.image.as_str())
    );

    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&a, &b]).await;
    assert_ok(&report);
    let stored: Vec<bool> = report
        .guests
        .iter()
        .flat_map(|g| g.result.as_ref().unwrap().volumes.iter())
        .filter(|v| v.device == "root")
        .map(|v| v.base_image_stored)
        .collect();
    assert_eq!(
        stored,
        vec![true, false],
        "base stored by the first VM only"
    );
    assert!(
        zs.env
            .store
            .has_base_image_sync("zstack", &BaseImageId(zs.image.clone()))
            .unwrap()
    );
    for g in &report.guests {
        let snap = &g.result.as_ref().unwrap().snapshot;
        assert_eq!(
            snap.volume("root").unwrap().base,
            Some(BaseImageId(zs.image.clone()))
        );
    }
    // The second VM's root volume wrote only its own blocks on top of the base.
    let b_root = report.guests[1]
        .result
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .find(|v| v.device == "root")
        .unwrap();
    assert!(b_root.stats.target.bytes_written <= 2 * MIB, "{b_root:?}");

    // Next job: nothing of the base is stored again, with a fresh work dir too.
    let again = zs.backup(zs.provider(), &[&a, &b]).await;
    assert_ok(&again);
    assert!(
        again
            .guests
            .iter()
            .flat_map(|g| g.result.as_ref().unwrap().volumes.iter())
            .all(|v| !v.base_image_stored)
    );

    // Restores of linked VMs are byte-identical.
    let want = zs.digests(&b).await;
    let r = zs
        .restore(
            provider.clone(),
            &snapshot_of(&again, 1),
            "linked-b-restored",
        )
        .await
        .expect("restore");
    assert_eq!(zs.digests(&r.guest.id.0).await, want);
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reuses_an_image_with_the_same_md5_and_size() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("reuse", 50, true).await);
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    let snap = snapshot_of(&report, 0);
    let count = |o: &Value| o["images"].as_array().unwrap().len();
    let before = count(&zs.objects().await);
    let r1 = zs
        .restore(provider.clone(), &snap, "reuse-1")
        .await
        .expect("restore 1");
    let mid = count(&zs.objects().await);
    assert_eq!(mid, before + 2, "root and data images uploaded");
    let r2 = zs
        .restore(provider.clone(), &snap, "reuse-2")
        .await
        .expect("restore 2");
    assert_eq!(
        count(&zs.objects().await),
        mid,
        "second restore reuses both images"
    );
    let want = zs.digests(&vm).await;
    assert_eq!(zs.digests(&r1.guest.id.0).await, want);
    assert_eq!(zs.digests(&r2.guest.id.0).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_quota_is_refused_before_any_work() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("quota", 60, true).await);
    let used = zs.objects().await["private_images"].as_u64().unwrap();
    zs.admin()
        .put("/zstack/quota", json!({"image_num": used}))
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("quota full");
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.report().contains("image.num"), "{}", err.report());
    let o = zs.objects().await;
    assert!(
        o["snapshots"].as_array().unwrap().is_empty(),
        "no work started"
    );
    assert!(zs.leftovers().await.is_empty());

    // With one free slot a backup works (temporary images one at a time).
    zs.admin()
        .put("/zstack/quota", json!({"image_num": used + 1}))
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    assert_ok(&report);
    assert_eq!(zs.objects().await["private_images"].as_u64().unwrap(), used);

    // A restore needing two new images is refused with one free slot.
    let err = zs
        .restore(zs.provider(), &snapshot_of(&report, 0), "quota-restored")
        .await
        .expect_err("restore needs 2 images");
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.report().contains("image.num"), "{}", err.report());
    assert_eq!(zs.objects().await["private_images"].as_u64().unwrap(), used);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_polling_503_fails_clearly_and_cleans_up() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("poll503", 70, true).await);
    // The template is created, but its job's result is lost.
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "job_poll_503", "action": "CreateDataVolumeTemplateFromVolumeSnapshot", "times": 1}),
        )
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("503");
    let text = err.report();
    assert!(
        text.contains("503") && text.contains("CreateDataVolumeTemplateFromVolumeSnapshot"),
        "{text}"
    );
    assert_eq!(err.context().volume.as_deref(), Some("data-1"), "{text}");
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
    assert!(
        zs.objects().await["temporary_images"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_stuck_downloading_times_out_and_is_removed() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("stuck", 80, false).await);
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "stuck_downloading", "times": 1}),
        )
        .await;
    let mut o = zs.options();
    o.job_timeout_secs = 1.0;
    let before = zs.objects().await["images"].as_array().unwrap().len();
    let err = zs
        .restore(
            zs.provider_with(o),
            &snapshot_of(&report, 0),
            "stuck-restored",
        )
        .await
        .expect_err("stuck");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{}", err.report());
    assert!(err.report().contains("AddImage"), "{}", err.report());
    assert_eq!(err.context().volume.as_deref(), Some("root"));
    let o = zs.objects().await;
    assert_eq!(
        o["images"].as_array().unwrap().len(),
        before,
        "stuck image removed"
    );
    assert!(
        !o["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "stuck-restored")
    );
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_breaking_mid_transfer_is_resumed_or_fails_clearly() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("broken", 90, true).await);
    let want = zs.digests(&vm).await;
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "export_break", "after_bytes": 3 * MIB, "times": 2}),
        )
        .await;
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    let log = std::fs::read_to_string(&report.guests[0].log_file).unwrap();
    assert!(log.contains("export_resumes\": \"2"), "{log}");
    let r = zs
        .restore(
            provider.clone(),
            &snapshot_of(&report, 0),
            "broken-restored",
        )
        .await
        .expect("restore");
    assert_eq!(zs.digests(&r.guest.id.0).await, want);

    // Breaking every time: a clear failure after the retries, nothing left.
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "export_break", "after_bytes": MIB}),
        )
        .await;
    let mut o = zs.options();
    o.download_retries = 2;
    let report = zs.backup(zs.provider_with(o), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("broken export");
    assert_eq!(err.kind(), ErrorKind::DataPath, "{}", err.report());
    assert!(
        err.report().contains("could not be resumed"),
        "{}",
        err.report()
    );
    assert!(err.context().offset.is_some());
    zs.admin().delete("/zstack/faults").await;
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_image_gives_clear_errors() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("disabled", 100, true).await);
    // Back up once while enabled: a restore source.
    let provider = zs.provider();
    let ok = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&ok);

    // The cached base image is disabled: a backup that must read it fails
    // clearly (fresh datastore: the base is not stored yet).
    let client = provider.client();
    client.ensure_session().await.unwrap();
    client
        .call(
            reqwest::Method::PUT,
            &format!("/images/{}/actions", zs.image),
            Some(json!({"changeImageState": {"stateEvent": "disable"}})),
            "ChangeImageState",
        )
        .await
        .unwrap();
    let other = Env::start(|_, _| {}).await; // unused mock: only its fresh datastore
    let driver = BackupDriver::new(
        provider.clone(),
        other.store.clone() as Arc<dyn Target>,
        Arc::new(StandardMover::default()),
    );
    let report = driver
        .run_job(
            &JobOptions {
                info: JobInfo {
                    job_id: "disabled".into(),
                    start_time: now(),
                    ..JobInfo::default()
                },
                parallelism: 1,
                log_dir: zs.env.dir.path().join("logs"),
            },
            vec![Guest::vm(&vm)],
        )
        .await;
    let err = report.guests[0].result.as_ref().expect_err("disabled base");
    assert!(err.report().contains("Disabled"), "{}", err.report());
    assert!(err.report().contains(&zs.image), "{}", err.report());
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );

    // A restored image that is disabled is not reused, and creating a VM
    // from a disabled image is refused by the platform.
    let snap = snapshot_of(&ok, 0);
    let r1 = zs
        .restore(provider.clone(), &snap, "dis-1")
        .await
        .expect("restore");
    let o = zs.objects().await;
    let root_img = o["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vmInstanceUuid"] == r1.guest.id.0.as_str() && v["type"] == "Root")
        .unwrap()["rootImageUuid"]
        .as_str()
        .unwrap()
        .to_owned();
    client
        .call(
            reqwest::Method::PUT,
            &format!("/images/{root_img}/actions"),
            Some(json!({"changeImageState": {"stateEvent": "disable"}})),
            "ChangeImageState",
        )
        .await
        .unwrap();
    let err = client
        .call(
            reqwest::Method::POST,
            "/vm-instances",
            Some(json!({"params": {"name": "x", "imageUuid": root_img}})),
            "CreateVmInstance",
        )
        .await
        .expect_err("disabled image");
    assert!(err.report().contains("Disabled"), "{}", err.report());
    let r2 = zs
        .restore(provider.clone(), &snap, "dis-2")
        .await
        .expect("restore 2");
    let want = zs.digests(&vm).await;
    assert_eq!(zs.digests(&r2.guest.id.0).await, want);
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_kit_passes() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("conformance", 110, true).await);
    let provider = zs.provider();
    let probe = ZsProbe {
        admin: zs.admin().clone(),
    };
    check_all(&*provider, &Guest::vm(&vm), &probe)
        .await
        .expect("conformance");
    // Through a trait object as well.
    let dynp: Arc<dyn BackupProvider> = provider;
    check_all(&*dynp, &Guest::vm(&vm), &probe)
        .await
        .expect("conformance (dyn)");
}

/// Benchmark (ignored by default): full backup of a 4 GiB VM through the
/// image export path (snapshot → template → export → ranged download →
/// datastore), linked root volume with its 4 GiB base image stored too.
/// Run: `cargo test -p scenarios --test zstack -- --ignored --nocapture bench_`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_full_backup_of_a_4_gib_vm() {
    const GIB: u64 = 1 << 30;
    let env = Env::start(|_, _| {}).await;
    let t = std::time::Instant::now();
    let image = env
        .admin
        .post(
            "/zstack/images",
            json!({"name": "bench-base", "size": 4 * GIB, "fill": [
                {"offset": 0, "length": 512 * MIB, "pattern": "text", "seed": 1},
                {"offset": GIB, "length": GIB, "pattern": "random", "seed": 2}]}),
        )
        .await;
    let vm = env
        .admin
        .post(
            "/zstack/vms",
            json!({"name": "bench", "image_uuid": image["uuid"],
                "root_fill": [{"offset": 3 * GIB, "length": 512 * MIB, "pattern": "random", "seed": 3}]}),
        )
        .await;
    eprintln!("setup: {:?}", t.elapsed());
    let zs = Zs {
        env,
        image: uuid(&image),
    };
    let vm = uuid(&vm);
    // One work directory for both runs, as a configured provider keeps it
    // (the second run finds the base image's block digests there).
    let mut o = zs.options();
    o.job_timeout_secs = 600.0;
    for run in ["first (base image stored)", "second (base already stored)"] {
        let t = std::time::Instant::now();
        let report = zs.backup(zs.provider_with(o.clone()), &[&vm]).await;
        assert_ok(&report);
        let secs = t.elapsed().as_secs_f64();
        let g = report.guests[0].result.as_ref().unwrap();
        let read: u64 = g.volumes.iter().map(|v| v.stats.bytes_read).sum();
        let new: u64 = g.volumes.iter().map(|v| v.stats.target.bytes_new).sum();
        eprintln!(
            "BENCH {run}: {secs:.1} s, 4 GiB VM = {:.0} MiB/s of guest size; datastore read {} MiB, stored new {} MiB",
            4096.0 / secs,
            read / MIB,
            new / MIB
        );
    }
    assert!(zs.leftovers().await.is_empty());
}
