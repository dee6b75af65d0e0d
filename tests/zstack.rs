//! ZStack end to end: provider-zstack against the mock's ZStack module,
//! through engine::BackupDriver / RestoreDriver into a real datastore.

use std::sync::Arc;

use engine::{BackupDriver, JobOptions, StandardMover};
use provider_api::testing::check_all;
use provider_api::{BackupProvider, BaseImageId, ErrorKind, Guest, JobInfo, Target};
use serde_json::{Value, json};

use scenarios::zstack::*;

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
async fn guests_on_one_cached_image_back_up_in_parallel() {
    // Both guests export and read the shared base image at the same time:
    // neither may remove the export the other is reading. (The race is
    // timing-dependent; without the provider's per-image export lock about
    // every other run failed, so several rounds catch it.)
    for _ in 0..5 {
        let zs = Zs::start().await;
        let a = uuid(&zs.vm("par-a", 30, false).await);
        let b = uuid(&zs.vm("par-b", 40, true).await);
        let report = zs.backup_parallel(zs.provider(), &[&a, &b], 2).await;
        assert_ok(&report);
        assert_eq!(zs.env.store.stats().unwrap().base_images, 1);
    }
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
                info: JobInfo::new("disabled", now()),
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

// ------------------------------------------------------- issue 12: typed answers

/// Options that retry fast (the default waits 200 ms doubling).
fn fast_retries(zs: &Zs) -> provider_zstack::ZStackOptions {
    let mut o = zs.options();
    o.retry_initial_ms = 5;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_answer_without_all_volumes_is_an_error_naming_the_call_and_field() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("no-volumes", 120, true).await);
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "drop_field", "path": "/vm-instances/", "field": "allVolumes"}),
        )
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0]
        .result
        .as_ref()
        .expect_err("a VM answer without allVolumes must not back up zero volumes");
    let text = err.report();
    assert!(text.contains("allVolumes"), "{text}");
    assert!(
        text.contains(&format!("GET /zstack/v1/vm-instances/{vm}")),
        "{text}"
    );
    assert!(!report.success());
    let published = zs.env.store.list_snapshots(None, None).await.unwrap();
    assert!(published.is_empty(), "{published:?}");
    zs.admin().delete("/zstack/faults").await;
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

// ------------------------------------------------------- issue 12: retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_gateway_errors_are_retried_and_persistent_ones_reported() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("retry", 130, true).await);
    let provider = zs.provider_with(fast_retries(&zs));
    // Two 503s from a proxy on reading the VM, two 502s on job polls.
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "GET", "path": "/zstack/v1/vm-instances/", "status": 503, "times": 2}),
        )
        .await;
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "GET", "path": "/zstack/v1/api-jobs/", "status": 502, "times": 2}),
        )
        .await;
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);

    // Persistent: reported, naming the call and the status.
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "GET", "path": "/zstack/v1/vm-instances/", "status": 503}),
        )
        .await;
    let report = zs.backup(provider, &[&vm]).await;
    let err = report.guests[0]
        .result
        .as_ref()
        .expect_err("persistent 503");
    let text = err.report();
    assert!(
        text.contains("503") && text.contains(&format!("GET /zstack/v1/vm-instances/{vm}")),
        "{text}"
    );
    zs.admin().delete("/faults").await;
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

// ------------------------------------------------------- issue 12: markers and sweeps

fn job(host: &str, id: &str, running: &[&str]) -> JobInfo {
    JobInfo::new(id, now()).on_host(host, running.iter().map(|s| s.to_string()))
}

/// A volume snapshot created through the ZStack API with `name`.
async fn plant_snapshot(zs: &Zs, volume: &str, name: &str) {
    let p = zs.provider();
    p.client().login().await.expect("login");
    p.client()
        .call(
            reqwest::Method::POST,
            &format!("/volumes/{volume}/volume-snapshots"),
            Some(json!({"params": {"name": name}})),
            "CreateVolumeSnapshot",
        )
        .await
        .expect("snapshot");
}

async fn snapshot_names(zs: &Zs) -> Vec<String> {
    let mut names: Vec<String> = zs.objects().await["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_an_interrupted_job_carry_its_marker_and_the_next_job_sweeps_them() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("interrupted", 140, true).await);
    // Deleting fails: the backup fails and its cleanup cannot remove what
    // it created, as when the job is killed.
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "DELETE", "path": "/zstack/v1/volume-snapshots/", "status": 500}),
        )
        .await;
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "DELETE", "path": "/zstack/v1/images/", "status": 500}),
        )
        .await;
    let report = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-1", &[]))
        .await;
    assert!(!report.success());
    zs.admin().delete("/faults").await;
    let o = zs.objects().await;
    let mut left: Vec<String> = Vec::new();
    for key in ["snapshots", "temporary_images"] {
        for x in o[key].as_array().unwrap() {
            left.push(x["name"].as_str().unwrap().to_owned());
        }
    }
    assert!(!left.is_empty(), "the fault should have left objects");
    for name in &left {
        assert!(
            name.starts_with("vmbackup.host-a.job-1."),
            "{name} lacks the job marker"
        );
    }
    // Another host's job, and a job of this host while job-1 still runs,
    // leave them alone.
    let other_host = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-b", "job-7", &[]))
        .await;
    assert_ok(&other_host);
    let same_host_running = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-2", &["job-1"]))
        .await;
    assert_ok(&same_host_running);
    assert_eq!(zs.leftovers().await.len(), left.len(), "{left:?}");
    // job-1 is gone: the next job of host-a sweeps exactly its objects.
    let next = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-3", &[]))
        .await;
    assert_ok(&next);
    assert!(
        zs.leftovers().await.is_empty(),
        "{:?}",
        zs.leftovers().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_matches_markers_exactly() {
    let zs = Zs::start().await;
    let vm = zs.vm("exact", 150, false).await;
    let vm_id = uuid(&vm);
    let root = vm["rootVolumeUuid"].as_str().unwrap().to_owned();
    let stale = "vmbackup.host-a.job-1.b0-x.root";
    let keep = [
        // A running job whose id starts with the stale one's.
        "vmbackup.host-a.job-10.b0-x.root",
        // Another host whose id starts with this one's.
        "vmbackup.host-a-2.job-1.b0-x.root",
        // Another host that differs only in case (the platform's `~=`
        // compares case-insensitively).
        "vmbackup.HOST-A.job-1.b0-x.root",
        // Not a marker at all.
        "xvmbackup.host-a.job-1.b0-x.root",
        "user snapshot",
    ];
    plant_snapshot(&zs, &root, stale).await;
    for k in keep {
        plant_snapshot(&zs, &root, k).await;
    }
    let report = zs
        .backup_job(
            zs.provider(),
            &[&vm_id],
            1,
            job("host-a", "job-2", &["job-10"]),
        )
        .await;
    assert_ok(&report);
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(snapshot_names(&zs).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn like_queries_escape_wildcards() {
    let zs = Zs::start().await;
    for name in ["wild_card.a", "wildXcard.b", "WILD_CARD.c", "wild_card"] {
        zs.admin()
            .post("/zstack/images", json!({"name": name, "size": MIB}))
            .await;
    }
    let p = zs.provider();
    p.client().login().await.unwrap();
    let pattern = format!("name~={}%", provider_zstack::api::like_escape("wild_card."));
    let hits: Vec<provider_zstack::api::ImageInventory> =
        p.client().query("/images", &[pattern]).await.unwrap();
    let mut names: Vec<&str> = hits.iter().map(|i| i.name.as_str()).collect();
    names.sort();
    // `_` is literal once escaped; the case-insensitive match is why the
    // provider compares names exactly afterwards.
    assert_eq!(names, ["WILD_CARD.c", "wild_card.a"]);
    // Unescaped, `_` is a wildcard.
    let loose: Vec<provider_zstack::api::ImageInventory> = p
        .client()
        .query("/images", &["name~=wild_card.%".to_owned()])
        .await
        .unwrap();
    assert_eq!(loose.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_restore_is_never_swept_and_an_interrupted_one_is() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("restore-marker", 160, true).await);
    let provider = zs.provider();
    let report = zs
        .backup_job(provider.clone(), &[&vm], 1, job("host-a", "job-1", &[]))
        .await;
    assert_ok(&report);
    let restored = zs
        .restore(provider.clone(), &snapshot_of(&report, 0), "restored-ok")
        .await
        .expect("restore");
    let want = zs.digests(&restored.guest.id.0).await;
    assert_eq!(want, zs.digests(&vm).await);
    // The next job of the same host keeps the restored VM and its volumes.
    let next = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-2", &[]))
        .await;
    assert_ok(&next);
    assert_eq!(zs.digests(&restored.guest.id.0).await, want);

    // A restore interrupted after creating its VM: the VM still carries the
    // job marker in its description (planted as the provider writes it).
    let p = zs.provider();
    p.client().login().await.unwrap();
    let image = zs.image.clone();
    let created: Value = p
        .client()
        .call(
            reqwest::Method::POST,
            "/vm-instances",
            Some(json!({"params": {"name": "half-restored", "imageUuid": image,
                "description": "restored from x: vmbackup restore in progress (vmbackup.host-a.job-3.r0-x)"}})),
            "CreateVmInstance",
        )
        .await
        .unwrap();
    let half = created["inventory"]["uuid"].as_str().unwrap().to_owned();
    let next = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-4", &[]))
        .await;
    assert_ok(&next);
    let o = zs.objects().await;
    let vms: Vec<&str> = o["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["uuid"].as_str().unwrap())
        .collect();
    assert!(!vms.contains(&half.as_str()), "interrupted restore kept");
    assert!(vms.contains(&restored.guest.id.0.as_str()));
    assert_eq!(zs.digests(&restored.guest.id.0).await, want);
}
