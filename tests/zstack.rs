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
    zs.assert_no_leftovers().await;
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
    zs.assert_no_leftovers().await;
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
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reuses_an_image_with_the_same_md5_and_size() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("reuse", 50, true).await);
    // Keeping restored images is opt-in (each takes a quota slot).
    let mut o = zs.options();
    o.keep_restore_images = true;
    let provider = zs.provider_with(o);
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
    zs.assert_no_leftovers().await;

    // One free slot is not enough for two volumes: the volumes are
    // streamed to the data mover, so every volume's template lives until
    // the backup's cleanup.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": used + 1}))
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("quota full");
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.report().contains("needs 2 more"), "{}", err.report());
    zs.assert_no_leftovers().await;

    // With one free slot per volume a backup works.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": used + 2}))
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    assert_ok(&report);
    assert_eq!(zs.objects().await["private_images"].as_u64().unwrap(), used);

    // A restore needing two new images is refused with one free slot.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": used + 1}))
        .await;
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
    zs.assert_no_leftovers().await;
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
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_breaking_mid_transfer_is_resumed_or_fails_clearly() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("broken", 90, true).await);
    let want = zs.digests(&vm).await;
    zs.admin()
        .post(
            "/zstack/faults",
            // A ranged read (at least 1 MiB) breaks after 256 KiB, its
            // resume once more; both are resumed.
            json!({"kind": "export_break", "after_bytes": 256 * 1024, "times": 2}),
        )
        .await;
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    let log = std::fs::read_to_string(&report.guests[0].log_file).unwrap();
    assert!(log.contains("export_resumes\": \"2"), "{log}");
    assert_restores(&zs, provider.clone(), &report, "broken-restored", &want).await;

    // Breaking every time: a clear failure after the retries, nothing left.
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "export_break", "after_bytes": 256 * 1024}),
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
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_image_gives_clear_errors() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("disabled", 100, true).await);
    // Back up once while enabled: a restore source.
    let provider = zs.provider();
    let ok = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&ok);

    // The cached base image is disabled: a backup that must read it
    // (fresh datastore: the base is not stored yet) stores the flattened
    // root volume in full and says so.
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
    let flat = report.guests[0]
        .result
        .as_ref()
        .expect("disabled base: the flattened volume is backed up");
    let warning = flat.snapshot.warnings.join("\n");
    assert!(warning.contains("Disabled"), "{warning}");
    assert!(warning.contains(&zs.image), "{warning}");
    assert!(
        flat.snapshot.volumes.iter().all(|v| v.base.is_none()),
        "no base layer: {:?}",
        flat.snapshot.volumes
    );
    zs.assert_no_leftovers().await;
    // And it restores byte for byte (into the first mock, from the other
    // datastore).
    let flat_snap = flat.snapshot.id.clone();
    let restored = engine::RestoreDriver::new(
        provider.clone() as Arc<dyn BackupProvider>,
        other.store.clone() as Arc<dyn Target>,
        Arc::new(StandardMover::default()),
        Arc::new(
            engine::NbdExposer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        ),
    )
    .restore_vm(
        &flat_snap,
        provider_api::RestoreTarget::NewGuest {
            name: Some("flat".into()),
        },
    )
    .await
    .expect("restore of the flattened backup");
    assert_eq!(
        zs.digests(&restored.guest.id.0).await,
        zs.digests(&vm).await
    );
    // The restores below keep their images (to disable one).
    let mut o = zs.options();
    o.keep_restore_images = true;
    let provider = zs.provider_with(o);
    let client = provider.client();
    client.ensure_session().await.unwrap();

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
    let (offering, l3) = zs.default_offering_and_l3().await;
    let err = client
        .call(
            reqwest::Method::POST,
            "/vm-instances",
            Some(json!({"params": {"name": "x", "imageUuid": root_img,
                "instanceOfferingUuid": offering, "l3NetworkUuids": [l3]}})),
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
    zs.assert_no_leftovers().await;
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
    zs.assert_no_leftovers().await;
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

/// Job `job-1` of `host-a` backs up `vm` and leaves what it created, as
/// when the job is killed: deleting fails, so the backup fails and its
/// cleanup cannot remove its snapshots and templates.
async fn backup_killed_after_its_snapshots(zs: &Zs, vm: &str) {
    for path in ["/zstack/v1/volume-snapshots/", "/zstack/v1/images/"] {
        zs.admin()
            .post(
                "/faults/http",
                json!({"method": "DELETE", "path": path, "status": 500}),
            )
            .await;
    }
    let report = zs
        .backup_job(zs.provider(), &[vm], 1, job("host-a", "job-1", &[]))
        .await;
    assert!(!report.success());
    zs.admin().delete("/faults").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_an_interrupted_job_carry_its_marker_and_the_next_job_sweeps_them() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("interrupted", 140, true).await);
    backup_killed_after_its_snapshots(&zs, &vm).await;
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
    zs.assert_no_leftovers().await;
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
    let (offering, l3) = zs.default_offering_and_l3().await;
    let created: Value = p
        .client()
        .call(
            reqwest::Method::POST,
            "/vm-instances",
            Some(json!({"params": {"name": "half-restored", "imageUuid": image,
                "instanceOfferingUuid": offering, "l3NetworkUuids": [l3],
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

/// A VM with a root volume on the shared image and two data volumes.
async fn three_volume_vm(zs: &Zs, name: &str) -> String {
    let v = zs
        .admin()
        .post(
            "/zstack/vms",
            json!({"name": name, "image_uuid": zs.image,
                "root_fill": [{"offset": 5 * MIB, "length": MIB, "pattern": "random", "seed": 3}],
                "data": [
                    {"size": 8 * MIB, "fill": [{"offset": MIB, "length": 2 * MIB, "pattern": "random", "seed": 4}]},
                    {"size": 6 * MIB, "fill": [{"offset": 0, "length": MIB, "pattern": "text", "seed": 5},
                                               {"offset": 5 * MIB, "length": MIB, "pattern": "random", "seed": 6}]}]}),
        )
        .await;
    uuid(&v)
}

/// Restores the first guest of `report` to a new VM `name` and checks
/// that its volumes hold `want` (sha256 of each).
async fn assert_restores(
    zs: &Zs,
    provider: Arc<provider_zstack::ZStackProvider>,
    report: &engine::JobReport,
    name: &str,
    want: &[String],
) {
    let r = zs
        .restore(provider, &snapshot_of(report, 0), name)
        .await
        .unwrap_or_else(|e| panic!("restore {name}: {}", e.report()));
    assert_eq!(zs.digests(&r.guest.id.0).await, want, "{name}");
}

fn vm_names(o: &Value) -> Vec<String> {
    o["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_goes_through_one_time_http_urls_byte_for_byte() {
    let zs = Zs::start().await;
    let vm = three_volume_vm(&zs, "http-3").await;
    let provider = zs.provider();
    assert_eq!(
        provider.restore_source_kind(),
        provider_api::RestoreSourceKind::Http
    );
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    let want = zs.digests(&vm).await;
    assert_eq!(want.len(), 3);
    let images_before = zs.image_count().await;
    let exposer = Arc::new(RecordingExposer::start(None, std::time::Duration::ZERO).await);
    let r = zs
        .restore_with(
            provider.clone(),
            &snapshot_of(&report, 0),
            "http-3-restored",
            exposer.clone(),
            engine::CancelToken::never(),
        )
        .await
        .expect("restore over HTTP");
    assert_eq!(zs.digests(&r.guest.id.0).await, want);
    // http URLs with a 128-bit one-time token: one per volume (given to
    // AddImage) and the root volume's base layer.
    let urls = exposer.urls.lock().unwrap().clone();
    assert_eq!(urls.len(), 4, "{urls:?}");
    let base = exposer.inner.base_url().to_owned();
    for u in &urls {
        let token = u
            .strip_prefix(&format!("{base}/"))
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("{u} is not under {base}"));
        assert_eq!(token.len(), 32, "{u}");
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{u}");
    }
    // Withdrawn once the restore ended: the URLs answer 404.
    assert_eq!(exposer.inner.exposed(), 0);
    let http = reqwest::Client::new();
    for u in &urls {
        let status = http.get(u).send().await.unwrap().status();
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{u}");
    }
    // Restored images are removed by default: the image count is unchanged.
    assert_eq!(zs.image_count().await, images_before);
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exposer_serves_ranges_and_head() {
    use provider_api::{Layer, SnapshotReader};
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("ranges", 7, false).await);
    let report = zs.backup(zs.provider(), &[&vm]).await;
    assert_ok(&report);
    let reader: Box<dyn SnapshotReader> = zs
        .env
        .store
        .open_snapshot(&snapshot_of(&report, 0))
        .await
        .unwrap();
    let volume = reader.open_volume("root", Layer::Merged).await.unwrap();
    let size = volume.size();
    let whole = volume.read_at(0, size).await.unwrap();
    let exposer = engine::HttpExposer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let (url, guard) = engine::SourceExposer::expose(&exposer, "root", volume)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), reqwest::StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        size.to_string()
    );
    assert_eq!(head.headers()["accept-ranges"], "bytes");
    let part = http
        .get(&url)
        .header("Range", format!("bytes={}-{}", 5 * MIB - 10, 5 * MIB + 9))
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), reqwest::StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes {}-{}/{size}", 5 * MIB - 10, 5 * MIB + 9)
    );
    let body = part.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &whole[5 * MIB as usize - 10..5 * MIB as usize + 10]
    );
    let full = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(full, whole);
    let bad = http
        .get(&url)
        .header("Range", format!("bytes={size}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::RANGE_NOT_SATISFIABLE);
    // Another token, or the right token with another name: 404.
    let wrong = format!("{}/{}/root.raw", exposer.base_url(), "0".repeat(32));
    assert_eq!(
        http.get(&wrong).send().await.unwrap().status(),
        reqwest::StatusCode::NOT_FOUND
    );
    drop(guard);
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        reqwest::StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_image_refuses_nbd_urls_like_zstack() {
    let zs = Zs::start().await;
    let provider = zs.provider();
    provider.client().login().await.unwrap();
    let bs: Vec<provider_zstack::api::BackupStorageInventory> = provider
        .client()
        .query("/backup-storage", &[])
        .await
        .unwrap();
    let bs = bs[0].uuid.clone();
    let e = provider
        .client()
        .call(
            reqwest::Method::POST,
            "/images",
            Some(
                json!({"params": {"name": "x", "url": "nbd://127.0.0.1:10809/root",
                "mediaType": "RootVolumeTemplate", "format": "raw",
                "backupStorageUuids": [bs]}, "systemTags": [], "userTags": []}),
            ),
            "AddImage",
        )
        .await
        .expect_err("nbd:// refused");
    let text = e.report();
    assert!(text.contains("SYS.1007"), "{text}");
    assert!(text.contains("http:// or https://"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_advertised_address_fails_clearly_and_leaves_nothing() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("wrong-addr", 8, true).await);
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    let images_before = zs.image_count().await;
    let vms_before = vm_names(&zs.objects().await);
    // Nothing listens there (the backup storage cannot reach the host).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let advertised = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let exposer =
        Arc::new(RecordingExposer::start(Some(&advertised), std::time::Duration::ZERO).await);
    let e = zs
        .restore_with(
            provider.clone(),
            &snapshot_of(&report, 0),
            "wrong-addr-restored",
            exposer,
            engine::CancelToken::never(),
        )
        .await
        .expect_err("unreachable advertised address");
    let text = e.report();
    assert!(text.contains(&advertised), "{text}");
    assert!(text.contains("advertise_url"), "{text}");
    assert_eq!(zs.image_count().await, images_before);
    assert_eq!(vm_names(&zs.objects().await), vms_before);
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_interrupted_mid_fetch_leaves_nothing() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("interrupted", 9, false).await);
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    let images_before = zs.image_count().await;
    let vms_before = vm_names(&zs.objects().await);
    // 16 MiB read 1 MiB at a time, 200 ms each: the fetch takes seconds.
    let exposer =
        Arc::new(RecordingExposer::start(None, std::time::Duration::from_millis(200)).await);
    let (canceller, cancel) = engine::cancel_pair();
    let first_read = exposer.first_read.clone();
    let admin = zs.admin().clone();
    let watcher = tokio::spawn(async move {
        first_read.notified().await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // The image is being fetched when the restore is interrupted.
        let o = admin.get("/zstack/objects").await;
        let downloading = o["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["status"] == "Downloading");
        canceller.cancel();
        downloading
    });
    let e = zs
        .restore_with(
            provider.clone(),
            &snapshot_of(&report, 0),
            "interrupted-restored",
            exposer.clone(),
            cancel,
        )
        .await
        .expect_err("interrupted");
    assert!(
        watcher.await.unwrap(),
        "the image was Downloading when interrupted"
    );
    assert!(e.report().contains("interrupted"), "{}", e.report());
    assert_eq!(exposer.inner.exposed(), 0, "the URL is withdrawn");
    // The mock's fetch ends (its source was withdrawn); nothing is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = zs.leftovers().await;
        if left.is_empty() && zs.image_count().await == images_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left: {left:?}, images {} (before {images_before})",
            zs.image_count().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(vm_names(&zs.objects().await), vms_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_renewed_by_logging_in_again() {
    let zs = Zs::start_with(|c| c.session_timeout_secs = 1.0).await;
    let vm = uuid(&zs.vm("session", 12, false).await);
    let provider = zs.provider();
    provider.client().login().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    // Reads and API jobs after the session expired: 401, login, retried.
    let v: Vec<provider_zstack::api::BackupStorageInventory> = provider
        .client()
        .query("/backup-storage", &[])
        .await
        .expect("query after expiry");
    assert!(!v.is_empty());
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let r = zs
        .restore(
            provider.clone(),
            &snapshot_of(&report, 0),
            "session-restored",
        )
        .await
        .expect("restore after expiry");
    assert_eq!(zs.digests(&r.guest.id.0).await, zs.digests(&vm).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_named_by_x_job_uuid_runs_once() {
    let zs = Zs::start().await;
    let vm = zs.vm("jobname", 13, false).await;
    let root = vm["rootVolumeUuid"].as_str().unwrap().to_owned();
    let provider = zs.provider();
    provider.client().login().await.unwrap();
    let base = zs.options().base_url;
    // The session id, as the provider's client would send it.
    let login: Value = reqwest::Client::new()
        .put(format!("{base}/v1/accounts/login"))
        .json(&json!({"logInByAccount": {"accountName": "admin", "password": sha512_hex("password")}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = login["inventory"]["uuid"].as_str().unwrap().to_owned();
    let expires = login["inventory"]["expiredDate"].as_str().unwrap();
    assert!(
        provider_zstack::api::parse_date(expires).is_some(),
        "{expires}"
    );
    let job = "0123456789abcdef0123456789abcdef";
    let send = || {
        reqwest::Client::new()
            .post(format!("{base}/v1/volumes/{root}/volume-snapshots"))
            .header("Authorization", format!("OAuth {session}"))
            .header("X-Job-UUID", job)
            .json(&json!({"params": {"name": "named-job"}}))
            .send()
    };
    let a: Value = send().await.unwrap().json().await.unwrap();
    assert!(a["location"].as_str().unwrap().ends_with(job), "{a}");
    // The same name again is refused as RestServer refuses it (400,
    // plain text) and runs nothing; the job is followed by its name.
    let b = send().await.unwrap();
    assert_eq!(b.status(), reqwest::StatusCode::BAD_REQUEST);
    assert_eq!(
        b.text().await.unwrap(),
        format!("Duplicate job uuid[{job}]")
    );
    let followed = reqwest::Client::new()
        .get(a["location"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert!(followed.status().is_success(), "{}", followed.status());
    assert_eq!(snapshot_names(&zs).await, ["named-job"]);
    // Inventories print ZStack's dates.
    let snaps: Vec<Value> = provider
        .client()
        .query("/volume-snapshots", &[])
        .await
        .unwrap();
    let date = snaps[0]["createDate"].as_str().unwrap();
    assert!(provider_zstack::api::parse_date(date).is_some(), "{date}");
    // A bad job name is refused.
    let bad = reqwest::Client::new()
        .post(format!("{base}/v1/volumes/{root}/volume-snapshots"))
        .header("Authorization", format!("OAuth {session}"))
        .header("X-Job-UUID", "not-a-uuid")
        .json(&json!({"params": {"name": "bad"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
}

fn sha512_hex(s: &str) -> String {
    use sha2::{Digest, Sha512};
    Sha512::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_cycles_leave_the_image_count_unchanged() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("cycles", 14, true).await);
    let provider = zs.provider();
    let before = zs.image_count().await;
    // A quota with two slots free (a restore of two volumes holds both
    // images until the VM exists): enough for any number of cycles.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": before + 2}))
        .await;
    for i in 0..4 {
        let report = zs.backup(provider.clone(), &[&vm]).await;
        assert_ok(&report);
        let r = zs
            .restore(
                provider.clone(),
                &snapshot_of(&report, 0),
                &format!("cycle-{i}"),
            )
            .await
            .expect("restore");
        assert_eq!(zs.digests(&r.guest.id.0).await, zs.digests(&vm).await);
        assert_eq!(zs.image_count().await, before, "cycle {i}");
    }
    zs.assert_no_leftovers().await;
    // A full quota is reported with what uses it.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": before}))
        .await;
    let report = zs.backup(provider, &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("quota full");
    let text = err.report();
    assert!(
        text.contains(&format!("{before} of {before} slots are used")),
        "{text}"
    );
    assert!(text.contains("other images"), "{text}");
}

/// The restored VM's inventory as the API gives it.
async fn vm_inventory(zs: &Zs, vm: &str) -> Value {
    let p = zs.provider();
    p.client().login().await.unwrap();
    let hits: Vec<Value> = p
        .client()
        .query("/vm-instances", &[format!("uuid={vm}")])
        .await
        .unwrap();
    hits.into_iter().next().expect("VM listed")
}

fn nic_networks(vm: &Value) -> Vec<String> {
    let mut nics: Vec<&Value> = vm["vmNics"].as_array().unwrap().iter().collect();
    nics.sort_by_key(|n| n["deviceId"].as_u64());
    nics.iter()
        .map(|n| n["l3NetworkUuid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_vm_requires_an_offering_networks_and_an_image() {
    let zs = Zs::start().await;
    let (offering, l3) = zs.default_offering_and_l3().await;
    let p = zs.provider();
    p.client().login().await.unwrap();
    let create = |params: Value| {
        let p = p.clone();
        async move {
            p.client()
                .call(
                    reqwest::Method::POST,
                    "/vm-instances",
                    Some(json!({"params": params})),
                    "CreateVmInstance",
                )
                .await
        }
    };
    let image = zs.image.clone();
    let e = create(json!({"name": "a", "imageUuid": image, "l3NetworkUuids": [l3]}))
        .await
        .expect_err("no offering");
    assert!(
        e.report().contains("instanceOfferingUuid"),
        "{}",
        e.report()
    );
    let e = create(json!({"name": "a", "imageUuid": image, "instanceOfferingUuid": offering}))
        .await
        .expect_err("no network");
    assert!(e.report().contains("l3NetworkUuids"), "{}", e.report());
    let e = create(
        json!({"name": "a", "imageUuid": image, "instanceOfferingUuid": offering,
                          "l3NetworkUuids": []}),
    )
    .await
    .expect_err("empty networks");
    assert!(e.report().contains("l3NetworkUuids"), "{}", e.report());
    let e = create(json!({"name": "a", "instanceOfferingUuid": offering, "l3NetworkUuids": [l3]}))
        .await
        .expect_err("no image");
    assert!(e.report().contains("imageUuid"), "{}", e.report());
    let e = create(
        json!({"name": "a", "imageUuid": image, "instanceOfferingUuid": "f".repeat(32),
                          "l3NetworkUuids": [l3]}),
    )
    .await
    .expect_err("unknown offering");
    assert!(e.report().contains("InstanceOfferingVO"), "{}", e.report());
    // CPU and memory instead of an offering.
    let v = create(json!({"name": "b", "imageUuid": image, "cpuNum": 3,
                          "memorySize": 3u64 << 30, "l3NetworkUuids": [l3]}))
    .await
    .expect("cpu and memory");
    let vm = v["inventory"]["uuid"].as_str().unwrap().to_owned();
    assert_eq!(v["inventory"]["cpuNum"], 3);
    // Destroyed: still listed, still holding its volumes, until expunged.
    p.client()
        .call(
            reqwest::Method::DELETE,
            &format!("/vm-instances/{vm}"),
            None,
            "DestroyVmInstance",
        )
        .await
        .unwrap();
    let inv = vm_inventory(&zs, &vm).await;
    assert_eq!(inv["state"], "Destroyed");
    assert_eq!(inv["allVolumes"].as_array().unwrap().len(), 1);
    p.client()
        .call(
            reqwest::Method::PUT,
            &format!("/vm-instances/{vm}/actions"),
            Some(json!({"expungeVmInstance": {}})),
            "ExpungeVmInstance",
        )
        .await
        .unwrap();
    let o = zs.objects().await;
    assert!(!o["vms"].as_array().unwrap().iter().any(|v| v["uuid"] == vm));
    assert!(
        !o["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["vmInstanceUuid"] == vm)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_vm_has_the_cpu_memory_and_networks_of_the_original() {
    let zs = Zs::start().await;
    let big = uuid(
        &zs.admin()
            .post(
                "/zstack/instance-offerings",
                json!({"name": "big", "cpu_num": 4, "memory_size": 8u64 << 30}),
            )
            .await,
    );
    let net_a = uuid(
        &zs.admin()
            .post("/zstack/l3-networks", json!({"name": "net-a"}))
            .await,
    );
    let net_b = uuid(
        &zs.admin()
            .post("/zstack/l3-networks", json!({"name": "net-b"}))
            .await,
    );
    let fill = json!([{"offset": 5 * MIB, "length": MIB, "pattern": "random", "seed": 71}]);
    let with_offering = uuid(
        &zs.admin()
            .post(
                "/zstack/vms",
                json!({"name": "shaped-1",
        "image_uuid": zs.image, "root_fill": fill, "instance_offering_uuid": big,
        "l3_network_uuids": [net_b, net_a]}),
            )
            .await,
    );
    let with_cpu = uuid(
        &zs.admin()
            .post(
                "/zstack/vms",
                json!({"name": "shaped-2",
        "image_uuid": zs.image, "root_fill": fill, "cpu_num": 3, "memory_size": 3u64 << 30,
        "l3_network_uuids": [net_a]}),
            )
            .await,
    );
    let provider = zs.provider();
    let report = zs
        .backup(provider.clone(), &[&with_offering, &with_cpu])
        .await;
    assert_ok(&report);
    for (i, original) in [&with_offering, &with_cpu].into_iter().enumerate() {
        let restored = zs
            .restore(
                provider.clone(),
                &snapshot_of(&report, i),
                &format!("shaped-r{i}"),
            )
            .await
            .expect("restore");
        let new = restored.guest.id.0.clone();
        let (a, b) = (
            vm_inventory(&zs, original).await,
            vm_inventory(&zs, &new).await,
        );
        assert_eq!(b["cpuNum"], a["cpuNum"]);
        assert_eq!(b["memorySize"], a["memorySize"]);
        assert_eq!(b["instanceOfferingUuid"], a["instanceOfferingUuid"]);
        assert_eq!(nic_networks(&b), nic_networks(&a));
        assert_eq!(b["defaultL3NetworkUuid"], a["defaultL3NetworkUuid"]);
        assert_eq!(zs.digests(&new).await, zs.digests(original).await);
    }
    let a = vm_inventory(&zs, &with_offering).await;
    assert_eq!(
        (a["cpuNum"].as_u64(), nic_networks(&a)),
        (Some(4), vec![net_b, net_a])
    );
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_offering_or_network_is_gone_fails_clearly_and_leaves_nothing() {
    let zs = Zs::start().await;
    let (default_offering, default_l3) = zs.default_offering_and_l3().await;
    let gone = uuid(
        &zs.admin()
            .post(
                "/zstack/instance-offerings",
                json!({"name": "gone", "cpu_num": 1, "memory_size": 1u64 << 30}),
            )
            .await,
    );
    let net = uuid(
        &zs.admin()
            .post("/zstack/l3-networks", json!({"name": "net-gone"}))
            .await,
    );
    let vm = uuid(&zs.admin().post("/zstack/vms", json!({"name": "orphan", "image_uuid": zs.image,
        "data": [{"size": 4 * MIB, "fill": [{"offset": 0, "length": MIB, "pattern": "random", "seed": 5}]}],
        "instance_offering_uuid": gone, "l3_network_uuids": [net]})).await);
    let provider = zs.provider();
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    zs.admin()
        .delete(&format!("/zstack/instance-offerings/{gone}"))
        .await;
    zs.admin()
        .delete(&format!("/zstack/l3-networks/{net}"))
        .await;
    let images_before = zs.image_count().await;
    let before = zs.objects().await;
    let snap = snapshot_of(&report, 0);
    let e = zs
        .restore(provider.clone(), &snap, "orphan-r")
        .await
        .expect_err("offering gone");
    let text = e.report();
    assert!(
        text.contains(&gone) && text.contains("instance_offering_uuid"),
        "{text}"
    );
    // Overriding the offering: the network is next.
    let mut o = zs.options();
    o.instance_offering_uuid = Some(default_offering.clone());
    let e = zs
        .restore(zs.provider_with(o.clone()), &snap, "orphan-r")
        .await
        .expect_err("network gone");
    let text = e.report();
    assert!(
        text.contains(&net) && text.contains("l3_network_uuids"),
        "{text}"
    );
    let after = zs.objects().await;
    assert_eq!(zs.image_count().await, images_before);
    assert_eq!(vm_names(&after), vm_names(&before));
    assert_eq!(
        after["volumes"].as_array().unwrap().len(),
        before["volumes"].as_array().unwrap().len()
    );
    zs.assert_no_leftovers().await;
    // Both overridden: the restore works on this target.
    o.l3_network_uuids = vec![default_l3.clone()];
    let restored = zs
        .restore(zs.provider_with(o), &snap, "orphan-r")
        .await
        .expect("restore with overrides");
    let inv = vm_inventory(&zs, &restored.guest.id.0).await;
    assert_eq!(inv["instanceOfferingUuid"], default_offering.as_str());
    assert_eq!(nic_networks(&inv), vec![default_l3]);
    assert_eq!(
        zs.digests(&restored.guest.id.0).await,
        zs.digests(&vm).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_and_the_sweep_destroy_and_expunge_vms() {
    let zs = Zs::start().await;
    let vm = uuid(&zs.vm("expunge", 180, true).await);
    let provider = zs.provider();
    let report = zs
        .backup_job(provider.clone(), &[&vm], 1, job("host-a", "job-1", &[]))
        .await;
    assert_ok(&report);
    let before = zs.objects().await;
    // The data volume cannot be created: the VM exists already and the
    // failed restore destroys and expunges it (its root volume with it).
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "POST", "path": "/zstack/v1/volumes/data/from/", "status": 400, "times": 50}),
        )
        .await;
    zs.restore(provider.clone(), &snapshot_of(&report, 0), "expunge-r")
        .await
        .expect_err("data volume refused");
    zs.admin().delete("/faults").await;
    let after = zs.objects().await;
    assert_eq!(vm_names(&after), vm_names(&before));
    assert_eq!(after["volumes"], before["volumes"]);

    // An interrupted restore's VM destroyed but not expunged: the next
    // job's sweep expunges it.
    let p = zs.provider();
    p.client().login().await.unwrap();
    let (offering, l3) = zs.default_offering_and_l3().await;
    let created: Value = p
        .client()
        .call(
            reqwest::Method::POST,
            "/vm-instances",
            Some(json!({"params": {"name": "half-destroyed", "imageUuid": zs.image,
                "instanceOfferingUuid": offering, "l3NetworkUuids": [l3],
                "description": "restored from x: vmbackup restore in progress (vmbackup.host-a.job-3.r0-x)"}})),
            "CreateVmInstance",
        )
        .await
        .unwrap();
    let half = created["inventory"]["uuid"].as_str().unwrap().to_owned();
    p.client()
        .call(
            reqwest::Method::DELETE,
            &format!("/vm-instances/{half}"),
            None,
            "DestroyVmInstance",
        )
        .await
        .unwrap();
    let o = zs.objects().await;
    let listed = o["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["uuid"] == half.as_str())
        .cloned();
    assert_eq!(listed.expect("destroyed VM listed")["state"], "Destroyed");
    assert!(
        o["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["vmInstanceUuid"] == half.as_str())
    );
    let next = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-4", &[]))
        .await;
    assert_ok(&next);
    let o = zs.objects().await;
    assert!(
        !o["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["uuid"] == half.as_str()),
        "not expunged"
    );
    assert!(
        !o["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["vmInstanceUuid"] == half.as_str())
    );
}

/// The largest file under `dir` (recursively), in bytes.
fn largest_file(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => largest_file(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_stream_exports_without_staging_and_restore_byte_for_byte() {
    let zs = Zs::start().await;
    let vm = three_volume_vm(&zs, "stream-3").await;
    let want = zs.digests(&vm).await;
    assert_eq!(want.len(), 3);
    let options = zs.options();
    let work = options.work_dir.clone();
    let provider = zs.provider_with(options);
    // Watch the work directory while the backup runs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, work) = (stop.clone(), work.clone());
        tokio::task::spawn_blocking(move || {
            let mut max = 0u64;
            let mut looks = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(largest_file(&work));
                looks += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            (max, looks)
        })
    };
    let report = zs.backup(provider.clone(), &[&vm]).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max, looks) = watcher.await.unwrap();
    assert_ok(&report);
    assert!(looks > 0);
    // Only the base image's digest cache (32 bytes per 64 KiB block) is
    // written: nothing close to one 4 MiB chunk, let alone a volume.
    assert!(max < MIB, "a {max}-byte file was written to the work dir");
    assert!(largest_file(&work) < MIB);
    let g = report.guests[0].result.as_ref().unwrap();
    assert_eq!(g.snapshot.volumes.len(), 3);
    zs.assert_no_leftovers().await;

    assert_restores(&zs, provider.clone(), &report, "stream-3-restored", &want).await;

    // Again with the base image now stored and its digests cached: the
    // linked root volume's regions come from the sequential pass.
    let report = zs.backup(provider.clone(), &[&vm]).await;
    assert_ok(&report);
    assert_restores(&zs, provider, &report, "stream-3-again", &want).await;
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_export_byte_fails_the_backup_naming_volume_md5_and_call() {
    let zs = Zs::start().await;
    // A byte flipped in every export (the volumes' and the base
    // image's): the base image's digest pass fails (the root volume is
    // then read in full), and the volumes read in full have their md5
    // checked as the data mover reads them.
    let vm = uuid(&zs.vm("corrupt", 9, true).await);
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "export_corrupt", "after_bytes": MIB + 7}),
        )
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("md5 mismatch");
    let text = err.report();
    assert!(
        text.contains("volume root") || text.contains("volume data-1"),
        "{text}"
    );
    for want in [
        "md5",
        "exportMd5Sum",
        "ExportImageFromBackupStorage",
        "GET ",
    ] {
        assert!(text.contains(want), "{want:?} missing: {text}");
    }
    zs.admin().delete("/zstack/faults").await;
    zs.assert_no_leftovers().await;

    // A linked root volume: the sequential pass that finds its regions
    // checks the md5 too.
    let linked = uuid(&zs.vm("corrupt-linked", 31, false).await);
    let provider = zs.provider();
    assert_ok(&zs.backup(provider.clone(), &[&linked]).await);
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "export_corrupt", "after_bytes": 15 * MIB}),
        )
        .await;
    let report = zs.backup(provider, &[&linked]).await;
    let err = report.guests[0].result.as_ref().expect_err("md5 mismatch");
    let text = err.report();
    assert!(text.contains("exportMd5Sum"), "{text}");
    assert!(text.contains("root"), "{text}");
    zs.admin().delete("/zstack/faults").await;
    zs.assert_no_leftovers().await;
}

/// Counts of what a backup or restore creates on the platform.
async fn platform_counts(zs: &Zs) -> (u64, usize, usize, usize) {
    let o = zs.objects().await;
    let len = |k: &str| o[k].as_array().map(Vec::len).unwrap_or(0);
    (
        o["private_images"].as_u64().expect("private_images"),
        len("images"),
        len("snapshots"),
        len("exports"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_backup_and_restore_cycles_keep_the_image_quota_free() {
    let zs = Zs::start().await;
    // A tiny guest (2 MiB root, 1 MiB data) so that 100 cycles stay fast.
    let image = uuid(
        &zs.admin()
            .post(
                "/zstack/images",
                json!({"name": "tiny", "size": 2 * MIB, "fill": [
                    {"offset": 0, "length": MIB, "pattern": "random", "seed": 5}]}),
            )
            .await,
    );
    let vm = uuid(
        &zs.admin()
            .post(
                "/zstack/vms",
                json!({"name": "tiny-vm", "image_uuid": image,
                    "root_fill": [{"offset": MIB, "length": 256 * 1024, "pattern": "random", "seed": 6}],
                    "data": [{"size": MIB, "fill": [{"offset": 0, "length": 512 * 1024, "pattern": "random", "seed": 7}]}]}),
            )
            .await,
    );
    let want = zs.digests(&vm).await;
    assert_eq!(want.len(), 2);
    let provider = zs.provider();
    let before = platform_counts(&zs).await;
    // Two free slots: one per volume, the least a cycle needs. A single
    // slot leaked by any cycle makes a later one fail.
    zs.admin()
        .put("/zstack/quota", json!({"image_num": before.0 + 2}))
        .await;
    const CYCLES: usize = 100;
    for i in 0..CYCLES {
        let report = zs.backup(provider.clone(), &[&vm]).await;
        assert_ok(&report);
        let r = zs
            .restore(
                provider.clone(),
                &snapshot_of(&report, 0),
                &format!("tiny-{i}"),
            )
            .await
            .unwrap_or_else(|e| panic!("restore {i}: {}", e.report()));
        if i == 0 || i == CYCLES - 1 || i % 10 == 0 {
            assert_eq!(zs.digests(&r.guest.id.0).await, want, "cycle {i}");
        }
        // The restored VM is dropped so that only the platform's own
        // objects are counted.
        zs.admin()
            .delete(&format!("/zstack/vms/{}", r.guest.id.0))
            .await;
        assert_eq!(platform_counts(&zs).await, before, "cycle {i}");
    }
    zs.assert_no_leftovers().await;
    assert_eq!(zs.digests(&vm).await, want, "the source is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_volume_vm_is_snapshotted_as_one_group() {
    let zs = Zs::start().await;
    let vm = three_volume_vm(&zs, "grouped").await;
    let want = zs.digests(&vm).await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    assert_ok(&report);
    let o = zs.objects().await;
    assert_eq!(o["snapshot_group_creates"], 1);
    assert_eq!(o["snapshot_creates"], 0, "no per-volume snapshot");
    assert!(o["snapshot_groups"].as_array().unwrap().is_empty());
    let g = report.guests[0].result.as_ref().unwrap();
    assert!(g.snapshot.warnings.is_empty(), "{:?}", g.snapshot.warnings);
    zs.assert_no_leftovers().await;
    assert_restores(&zs, zs.provider(), &report, "grouped-restored", &want).await;

    // A failure after the group exists leaves neither it nor its snapshots.
    zs.admin()
        .post(
            "/zstack/faults",
            json!({"kind": "job_poll_503", "action": "CreateDataVolumeTemplateFromVolumeSnapshot", "times": 1}),
        )
        .await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    report.guests[0].result.as_ref().expect_err("503");
    let o = zs.objects().await;
    assert_eq!(o["snapshot_group_creates"], 2);
    assert!(o["snapshot_groups"].as_array().unwrap().is_empty());
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_snapshot_groups_volumes_are_snapshotted_alone_with_a_warning() {
    let zs = Zs::start_with(|c| c.snapshot_groups = false).await;
    let vm = three_volume_vm(&zs, "older").await;
    let want = zs.digests(&vm).await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    assert_ok(&report);
    let o = zs.objects().await;
    assert_eq!(o["snapshot_group_creates"], 0);
    assert_eq!(o["snapshot_creates"], 3);
    let g = report.guests[0].result.as_ref().unwrap();
    let w = g.snapshot.warnings.join("\n");
    assert!(
        w.contains("not crash-consistent") && w.contains("data-2"),
        "{w}"
    );
    zs.assert_no_leftovers().await;
    assert_restores(&zs, zs.provider(), &report, "older-restored", &want).await;
}

/// Puts a volume in another status (as ZStack does during a migration).
async fn set_volume_status(zs: &Zs, volume: &str, status: &str) {
    zs.admin()
        .put(
            &format!("/zstack/volumes/{volume}/status"),
            json!({"status": status}),
        )
        .await;
}

/// The volume snapshot group API exists but refuses: the guest fails,
/// naming the call and the volume, and nothing is snapshotted volume by
/// volume (only a platform without the API falls back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_group_the_platform_refuses_fails_the_guest_naming_the_call_and_volume() {
    let zs = Zs::start().await;
    let vm = three_volume_vm(&zs, "refused-group").await;
    let vm_inv = vm_inventory(&zs, &vm).await;
    let data = vm_inv["allVolumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["type"] == "Data")
        .unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    // A data volume that is not Ready (a storage migration): ZStack
    // refuses the group (VolumeApiInterceptor, SYS.1006).
    set_volume_status(&zs, &data, "Migrating").await;
    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("refused");
    let text = err.report();
    assert!(
        text.contains("CreateVolumeSnapshotGroup")
            && text.contains(&data)
            && text.contains("Migrating"),
        "{text}"
    );
    let o = zs.objects().await;
    assert_eq!(o["snapshot_creates"], 0, "no per-volume fallback");
    assert_eq!(o["snapshot_group_creates"], 0);
    zs.assert_no_leftovers().await;
    set_volume_status(&zs, &data, "Ready").await;

    // The root volume is gone when the group is asked for (the VM was
    // deleted meanwhile): ZStack answers SYS.1003 (resource not found),
    // which is not "no such API".
    zs.admin()
        .post(
            "/faults/http",
            json!({"method": "POST", "path": "/zstack/v1/volume-snapshots/group", "latency_ms": 3000, "times": 1}),
        )
        .await;
    let backup = {
        let zs_provider = zs.provider();
        let vm = vm.clone();
        let zs = &zs;
        async move { zs.backup(zs_provider, &[&vm]).await }
    };
    // Once the call has arrived (its fault consumed) and waits, the VM
    // and its volumes go.
    let delete = async {
        while !zs.admin().get("/faults").await["http"]
            .as_array()
            .unwrap()
            .is_empty()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        zs.admin().delete(&format!("/zstack/vms/{vm}")).await;
    };
    let (report, ()) = tokio::join!(backup, delete);
    zs.admin().delete("/faults").await;
    let err = report.guests[0].result.as_ref().expect_err("root gone");
    let text = err.report();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{text}");
    assert!(
        text.contains("CreateVolumeSnapshotGroup") && text.contains("rootVolumeUuid"),
        "{text}"
    );
    let o = zs.objects().await;
    assert_eq!(o["snapshot_creates"], 0, "no per-volume fallback");
    zs.assert_no_leftovers().await;
}

/// A job killed after CreateVolumeSnapshotGroup leaves the group; the
/// next job of the host deletes it (DeleteVolumeSnapshotGroup) with its
/// member snapshots, and the next backup restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_group_left_by_a_killed_job_is_swept_by_the_next_job() {
    let zs = Zs::start().await;
    let vm = three_volume_vm(&zs, "group-left").await;
    let want = zs.digests(&vm).await;
    backup_killed_after_its_snapshots(&zs, &vm).await;
    let o = zs.objects().await;
    let groups = o["snapshot_groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{o}");
    assert!(
        groups[0]["name"]
            .as_str()
            .unwrap()
            .starts_with("vmbackup.host-a.job-1."),
        "{o}"
    );
    assert_eq!(o["snapshots"].as_array().unwrap().len(), 3, "{o}");
    assert_eq!(o["snapshot_group_deletes"], 0);

    // The next job of host-a (job-1 is gone) backs up another, one-volume
    // VM (no group of its own): its sweep deletes the group.
    let other = uuid(&zs.vm("single", 160, false).await);
    let next = zs
        .backup_job(zs.provider(), &[&other], 1, job("host-a", "job-2", &[]))
        .await;
    assert_ok(&next);
    let o = zs.objects().await;
    assert!(o["snapshot_groups"].as_array().unwrap().is_empty(), "{o}");
    assert!(o["snapshots"].as_array().unwrap().is_empty(), "{o}");
    assert_eq!(
        o["snapshot_group_deletes"], 1,
        "the group is deleted as a group"
    );
    zs.assert_no_leftovers().await;

    let report = zs
        .backup_job(zs.provider(), &[&vm], 1, job("host-a", "job-3", &[]))
        .await;
    assert_ok(&report);
    assert_restores(&zs, zs.provider(), &report, "group-left-restored", &want).await;
    zs.assert_no_leftovers().await;
}

/// A destroyed VM (recoverable until expunged) is refused before any
/// snapshot, naming it and its state; ZStack itself refuses snapshots of
/// its root volume (`Deleted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_vm_is_refused_naming_it_and_its_state() {
    let zs = Zs::start().await;
    let vm = three_volume_vm(&zs, "destroyed-vm").await;
    let p = zs.provider();
    p.client().login().await.expect("login");
    p.client()
        .call(
            reqwest::Method::DELETE,
            &format!("/vm-instances/{vm}?deleteMode=Permissive"),
            None,
            "DestroyVmInstance",
        )
        .await
        .expect("destroy");
    let inv = vm_inventory(&zs, &vm).await;
    assert_eq!(inv["state"], "Destroyed");
    let root = inv["rootVolumeUuid"].as_str().unwrap().to_owned();

    let report = zs.backup(zs.provider(), &[&vm]).await;
    let err = report.guests[0].result.as_ref().expect_err("destroyed");
    let text = err.report();
    assert_eq!(err.kind(), ErrorKind::Refused, "{text}");
    assert!(
        text.contains("destroyed-vm") && text.contains("Destroyed") && text.contains(&vm),
        "{text}"
    );
    let o = zs.objects().await;
    assert_eq!(o["snapshot_creates"], 0);
    assert_eq!(o["snapshot_group_creates"], 0);
    zs.assert_no_leftovers().await;

    // The platform refuses them too: the root volume is Deleted.
    for (path, body, action) in [
        (
            format!("/volumes/{root}/volume-snapshots"),
            json!({"params": {"name": "x"}}),
            "CreateVolumeSnapshot",
        ),
        (
            "/volume-snapshots/group".to_owned(),
            json!({"params": {"name": "x", "rootVolumeUuid": root}}),
            "CreateVolumeSnapshotGroup",
        ),
    ] {
        let e = p
            .client()
            .call(reqwest::Method::POST, &path, Some(body), action)
            .await
            .expect_err("refused");
        assert!(
            e.report().contains("SYS.1006")
                && e.report()
                    .contains("not in status Ready, current is Deleted"),
            "{}",
            e.report()
        );
    }
    zs.assert_no_leftovers().await;
}
