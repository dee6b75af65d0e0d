//! SCP linked VMs end to end: provider-scp against the in-process mock
//! hypervisor (real HTTP and NBD sockets), through engine::BackupDriver /
//! RestoreDriver with the StandardMover and NbdExposer, into a datastore.

use std::sync::Arc;

use provider_api::{
    BackupProvider, BitmapMode, ErrorKind, Guest, RestoreTarget, Target, TargetExt,
};
use provider_scp::AccessMode;
use scenarios::scp::{Env, ScpProbe, leftovers, restore_from};
use scenarios::scp_flow::{
    assert_clean, assert_clean_for, backed_up, backup_ok, backup_proxy, digests_of, disk_id,
    expose_backup, failed, hot_add_access, id, janus, published, restore_new, restored_digests,
    snapshot_metadata, warned,
};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A 16 MiB base image: text, random data, allocated zeroes and holes.
async fn base_image(env: &Env, name: &str) -> String {
    env.admin
        .base_image(
            name,
            16 * MIB,
            json!([
                {"offset": 0, "length": MIB, "pattern": "text", "seed": 1},
                {"offset": 2 * MIB, "length": 6 * MIB, "pattern": "random", "seed": 2},
                {"offset": 9 * MIB, "length": MIB, "pattern": "zero", "seed": 0},
                {"offset": 12 * MIB, "length": 2 * MIB, "pattern": "random", "seed": 3},
            ]),
        )
        .await
}

/// A linked VM on `base` (24 MiB system disk with 2 MiB of its own data)
/// and optionally an 8 MiB data disk.
async fn linked_vm(env: &Env, name: &str, base: &str, seed: u64, data_disk: bool) -> Value {
    linked_vm_with(env, name, base, seed, data_disk, json!({})).await
}

async fn linked_vm_with(
    env: &Env,
    name: &str,
    base: &str,
    seed: u64,
    data_disk: bool,
    extra: Value,
) -> Value {
    let mut disks = vec![json!({"size": 24 * MIB, "base_image_id": base, "fill": [
        {"offset": MIB, "length": MIB, "pattern": "random", "seed": seed},
        {"offset": 18 * MIB, "length": MIB, "pattern": "text", "seed": seed + 1},
    ]})];
    if data_disk {
        disks.push(json!({"size": 8 * MIB, "fill": [
            {"offset": 0, "length": 3 * MIB, "pattern": "random", "seed": seed + 2}]}));
    }
    let mut body = json!({"name": name, "storage_id": "storage-local", "disks": disks});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    env.admin.server(body).await
}

/// A fresh mock with the 16 MiB base image `base` and one linked VM
/// `linked-1` on it (seed 10, with or without its data disk): the mock,
/// the base image's id and the VM.
async fn one_linked_vm(data_disk: bool) -> (Env, String, Value) {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, data_disk).await;
    (env, base, vm)
}

/// A slow mover (256 KiB pieces, 4 MiB/s) that does not retry: a lost
/// lease shuts the export, retrying cannot help.
fn slow_mover() -> engine::MoverOptions {
    engine::MoverOptions {
        piece_size: 256 << 10,
        depth: 2,
        bandwidth_limit: Some(4 * MIB),
        retry: engine::RetryPolicy::none(),
        ..engine::MoverOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_linked_vms_store_the_base_image_once_and_restore_byte_identical() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "centos-base").await;
    let vm1 = linked_vm(&env, "linked-1", &base, 10, true).await;
    let vm2 = linked_vm(&env, "linked-2", &base, 20, false).await;
    let before1 = env.admin.server_digests(&vm1).await;
    let before2 = env.admin.server_digests(&vm2).await;

    let scp = env.provider();
    let report = env.backup(scp.clone(), &[&id(&vm1), &id(&vm2)]).await;
    let (b1, b2) = (backed_up(&report, 0), backed_up(&report, 1));
    assert!(
        b1.volumes[0].base_image_stored,
        "first backup stores the base"
    );
    assert!(!b2.volumes[0].base_image_stored, "second reuses it");
    assert_eq!(b1.snapshot.volumes[0].base.as_ref().unwrap().0, base);

    // Stored: the base image's 8 MiB of data (text + random; zeroes and
    // holes are free) + 2 x 2 MiB overlays + 3 MiB data disk, not twice
    // the base.
    let stats = env.store.stats().unwrap();
    assert_eq!(stats.base_images, 1);
    let expected = (8 + 4 + 3) * MIB;
    assert!(
        stats.chunk_bytes <= expected + 2 * MIB && stats.chunk_bytes >= 10 * MIB,
        "stored {} bytes, expected about {expected}",
        stats.chunk_bytes
    );
    assert_clean(&env).await;

    // Restores to new VMs (base image present on the platform).
    for (b, before, name) in [(b1, &before1, "r1"), (b2, &before2, "r2")] {
        let restored = restored_digests(&env, &env, &scp, &b.snapshot.id, Some(name)).await;
        assert_eq!(&restored, before);
        let restored: Value = env.admin.server_by_name(&scp, name).await.unwrap();
        assert_eq!(restored["disks"][0]["base_image_id"], base.as_str());
    }
    assert_clean(&env).await;
}

/// The custom attribute `os-family` created and bound to the base image
/// `base` with the value `centos`, through the SCP API: the attribute and
/// the binding.
async fn os_family_centos(scp: &provider_scp::ScpProvider, base: &str) -> (Value, Value) {
    let attr = janus(
        scp,
        reqwest::Method::POST,
        "/janus/20190725/custom-attributes",
        Some(json!({"name": "os-family", "description": "OS", "resource_type": "base_image"})),
    )
    .await;
    let binding = janus(
        scp,
        reqwest::Method::POST,
        "/janus/20190725/custom-attributes/bindings",
        Some(
            json!({"custom_attribute_id": attr["id"], "resource_type": "base_image",
                "resource_id": base, "value": "centos"}),
        ),
    )
    .await;
    (attr, binding)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_another_scp_recreates_base_image_replica_and_attributes() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "centos-base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let before = env.admin.server_digests(&vm).await;
    let scp = env.provider();
    // A custom attribute bound to the base image, through the SCP API.
    os_family_centos(&scp, &base).await;
    let b = backup_ok(&env, &scp, &vm).await;
    let md = snapshot_metadata(&env, &b.snapshot.id).await;
    assert_eq!(md["base_image"]["image"]["id"], base.as_str());
    assert_eq!(md["base_image"]["bindings"][0]["value"], "centos");

    // A second, empty SCP: the base image, its replica on storage-vs and
    // the attribute binding are recreated.
    let other = Env::start(|_, _| {}).await;
    let mut options = other.options(AccessMode::Nbd);
    options.restore_storage_id = Some("storage-vs".into());
    let scp2 = other.provider_with(options);
    assert_eq!(
        restored_digests(&env, &other, &scp2, &b.snapshot.id, Some("moved")).await,
        before
    );
    let objects = other.admin.scp_objects().await;
    let images = objects["base_images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0]["status"], "AVAILABLE");
    assert!(
        images[0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["storage_id"] == "storage-vs" && r["status"] == "AVAILABLE")
    );
    let bindings = objects["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0]["resource_id"], images[0]["id"]);
    assert_eq!(bindings[0]["value"], "centos");
    let moved = other.admin.server_by_name(&scp2, "moved").await.unwrap();
    assert_eq!(moved["disks"][0]["base_image_id"], images[0]["id"]);
    assert_clean(&other).await;

    // Restoring a second time reuses the restored base image.
    assert_eq!(
        restored_digests(&env, &other, &scp2, &b.snapshot.id, Some("moved-2")).await,
        before
    );
    let objects = other.admin.scp_objects().await;
    assert_eq!(objects["base_images"].as_array().unwrap().len(), 1);
    // Seed 4.5.2 step 5: the attribute exists and is bound: nothing is
    // created or bound a second time.
    assert_eq!(
        objects["custom_attributes"].as_array().unwrap().len(),
        1,
        "{objects}"
    );
    assert_eq!(
        objects["bindings"].as_array().unwrap().len(),
        1,
        "bound once: {}",
        objects["bindings"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reads_only_the_changed_extents() {
    let (env, _, vm) = one_linked_vm(true).await;
    let scp = env.provider();
    let full = env.backup(scp.clone(), &[&id(&vm)]).await;
    assert!(full.success(), "{:?}", full.guests[0].result.as_ref().err());

    // 1% of the 24 MiB system disk, as four 64 KiB runs.
    let sys = disk_id(&vm, 0);
    for i in 0..4u64 {
        env.admin
            .write(&sys, 3 * MIB + i * 5 * MIB, 64 << 10, "random", 100 + i)
            .await;
    }
    let after = env.admin.server_digests(&vm).await;
    env.admin.reset_export_history().await;
    let b = backup_ok(&env, &scp, &vm).await;
    assert_eq!(b.volumes[0].bitmap_mode, BitmapMode::Use);
    assert_eq!(b.volumes[1].bitmap_mode, BitmapMode::Use);
    assert!(!b.volumes[0].base_image_stored);
    let read = env.admin.bytes_read().await;
    assert_eq!(read, 4 * (64 << 10), "only the changed extents are read");
    assert!(b.snapshot.warnings.is_empty(), "{:?}", b.snapshot.warnings);

    assert_eq!(
        restored_digests(&env, &env, &scp, &b.snapshot.id, Some("r")).await,
        after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_desktop_rules() {
    let env = Env::start(|c, _| c.scp.version = "6.11.2".into()).await;
    let base = base_image(&env, "base").await;
    let plain = linked_vm(&env, "linked-old", &base, 10, false).await;
    let desk = linked_vm_with(
        &env,
        "desk-old",
        &base,
        20,
        false,
        json!({"application": "desk"}),
    )
    .await;
    let revert = linked_vm_with(
        &env,
        "desk-revert",
        &base,
        30,
        false,
        json!({"application": "desk", "revert_mode": 1}),
    )
    .await;
    let scp = env.provider();
    let report = env
        .backup(scp.clone(), &[&id(&plain), &id(&desk), &id(&revert)])
        .await;

    // Below 6.11.3, non-desktop: the system disk merged, no base image.
    let p = backed_up(&report, 0);
    assert!(p.snapshot.volumes[0].base.is_none());
    assert!(!p.volumes[0].base_image_stored);
    // Below 6.11.3, desktop: base image separately, read in full.
    let d = backed_up(&report, 1);
    assert!(d.volumes[0].base_image_stored);
    assert_eq!(d.snapshot.volumes[0].base.as_ref().unwrap().0, base);
    // Revert mode: refused, naming the VM.
    let e = failed(&report, 2);
    assert_eq!(e.kind(), ErrorKind::Refused, "{}", e.report());
    assert!(e.report().contains("desk-revert"), "{}", e.report());
    assert_clean(&env).await;

    assert_eq!(
        restored_digests(&env, &env, &scp, &p.snapshot.id, Some("rp")).await,
        env.admin.server_digests(&plain).await
    );
    assert_eq!(
        restored_digests(&env, &env, &scp, &d.snapshot.id, Some("rd")).await,
        env.admin.server_digests(&desk).await
    );

    // From 6.11.3 desktop VMs are ordinary linked VMs: base image from
    // CBT (holes and unallocated areas are not read).
    env.admin
        .put("/scp/version", json!({"version": "6.11.3"}))
        .await;
    let desk2 = linked_vm_with(
        &env,
        "desk-new",
        &base,
        40,
        false,
        json!({"application": "desk"}),
    )
    .await;
    let store2 = Arc::new(
        datastore::Datastore::create(
            env.dir.path().join("store2"),
            datastore::DatastoreOptions::default(),
        )
        .unwrap(),
    );
    let driver = engine::BackupDriver::new(
        scp.clone(),
        store2.clone() as Arc<dyn Target>,
        Arc::new(engine::StandardMover::default()),
    );
    env.admin.reset_export_history().await;
    let rep = driver
        .run_job(
            &engine::JobOptions {
                info: provider_api::JobInfo::default(),
                parallelism: 1,
                log_dir: env.dir.path().join("logs2"),
            },
            vec![Guest::vm(id(&desk2))],
        )
        .await;
    let b = backed_up(&rep, 0);
    assert!(b.volumes[0].base_image_stored);
    // Base: 1 + 6 + 1 (allocated zeroes) + 2 MiB allocated; own data 2 MiB.
    let read = env.admin.bytes_read().await;
    assert!(read <= 12 * MIB, "read {read} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_cbt_falls_back_to_a_full_backup_with_a_warning() {
    let (env, _, vm) = one_linked_vm(true).await;
    let scp = env.provider();
    assert!(env.backup(scp.clone(), &[&id(&vm)]).await.success());
    env.admin
        .post(&format!("/scp/servers/{}/cbt/expire", id(&vm)), json!({}))
        .await;
    env.admin
        .write(&disk_id(&vm, 0), 0, 65536, "random", 7)
        .await;
    let after = env.admin.server_digests(&vm).await;
    let b = backup_ok(&env, &scp, &vm).await;
    assert!(b.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::New));
    assert!(warned(&b, "CBT has expired"), "{:?}", b.snapshot.warnings);
    // The warning is stored with the snapshot.
    let stored = env
        .store
        .latest_good_snapshot("scp", &Guest::vm(id(&vm)).id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored
            .warnings
            .iter()
            .any(|w| w.contains("CBT has expired"))
    );
    // And the chain continues incrementally.
    let n = backup_ok(&env, &scp, &vm).await;
    assert!(n.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::Use));
    assert_eq!(
        restored_digests(&env, &env, &scp, &n.snapshot.id, None).await,
        after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_during_a_backup_fails_cleanly() {
    let (env, _, vm) = one_linked_vm(true).await;
    let scp = env.provider();
    let admin = env.admin.clone();
    // Expire the lease once the backup has read a little.
    let killer = tokio::spawn(async move {
        for _ in 0..400 {
            let o = admin.scp_objects().await;
            if let Some(l) = o["backup_resources"].as_array().and_then(|a| a.first())
                && admin.bytes_read().await >= MIB
            {
                let lid = l["id"].as_str().unwrap().to_owned();
                admin
                    .post(&format!("/scp/backup-resources/{lid}/expire"), json!({}))
                    .await;
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    });
    let report = env
        .backup_with(scp.clone(), &[&id(&vm)], slow_mover())
        .await;
    assert!(killer.await.unwrap(), "the lease was expired mid-backup");
    let e = failed(&report, 0);
    eprintln!("lease expiry: {}", e.report());
    assert!(
        matches!(e.kind(), ErrorKind::LeaseLost | ErrorKind::DataPath),
        "{}",
        e.report()
    );
    let log = std::fs::read_to_string(&report.guests[0].log_file).unwrap();
    assert!(log.contains("expired during the backup"), "{log}");
    assert!(published(&env).await.is_empty(), "nothing published");
    assert_clean(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_read_error_fails_one_guest_and_leaks_nothing() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "base").await;
    let vm1 = linked_vm(&env, "linked-1", &base, 10, true).await;
    let vm2 = linked_vm(&env, "linked-2", &base, 20, true).await;
    // Export names are random: the job runs one guest at a time and the
    // fault fires once, on the first export that served 1 MiB.
    env.admin
        .post(
            "/faults/nbd",
            json!({"export": "", "kind": "read_error", "after_bytes": MIB, "times": 1}),
        )
        .await;
    let scp = env.provider();
    // Retries disabled: the one read error fails the guest (that the data
    // path recovers from it with retries is tests/nbd_retry.rs).
    let report = env
        .backup_with(
            scp.clone(),
            &[&id(&vm1), &id(&vm2)],
            engine::MoverOptions {
                retry: engine::RetryPolicy::none(),
                ..engine::MoverOptions::default()
            },
        )
        .await;
    let e = failed(&report, 0);
    eprintln!("read error: {}", e.report());
    assert_eq!(e.kind(), ErrorKind::DataPath, "{}", e.report());
    assert!(e.context().offset.is_some(), "{}", e.report());
    assert_eq!(e.context().guest.as_deref(), Some(id(&vm1).as_str()));
    assert!(e.context().volume.is_some(), "{}", e.report());
    assert!(report.guests[1].result.is_ok());
    assert_clean(&env).await;
    let snaps = published(&env).await;
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].guest.0, id(&vm2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_base_image_restore_deletes_the_base_image() {
    let (env, _, vm) = one_linked_vm(false).await;
    let scp = env.provider();
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let b = backed_up(&report, 0);

    let other = Env::start(|_, _| {}).await;
    // The base image data is written, then setting it AVAILABLE fails.
    other
        .admin
        .post(
            "/faults/http",
            json!({"method": "PUT", "path": "/janus/20180725/base-images/", "status": 500,
                "code": 50000, "message": "injected", "times": 1}),
        )
        .await;
    let scp2 = other.provider();
    let e = restore_from(
        &env.store,
        scp2.clone(),
        &b.snapshot.id,
        RestoreTarget::NewGuest {
            name: Some("broken".into()),
        },
    )
    .await
    .unwrap_err();
    assert!(e.report().contains("injected"), "{}", e.report());
    let objects = other.admin.scp_objects().await;
    assert_eq!(
        objects["base_images"],
        json!([]),
        "incomplete base image deleted"
    );
    assert_eq!(objects["servers"], json!([]), "no half-restored VM");
    assert_clean(&other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_restore_of_a_linked_vm_uses_recovery_baseimage() {
    let (env, _, vm) = one_linked_vm(true).await;
    let before = env.admin.server_digests(&vm).await;
    let scp = env.provider();
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let b = backed_up(&report, 0);
    // The guest changes both disks after the backup.
    env.admin
        .write(&disk_id(&vm, 0), 5 * MIB, 2 * MIB, "random", 99)
        .await;
    env.admin.write(&disk_id(&vm, 1), 0, MIB, "zero", 0).await;
    assert_ne!(env.admin.server_digests(&vm).await, before);
    let r = env
        .restore(scp.clone(), &b.snapshot.id, RestoreTarget::InPlace)
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(r.guest.id.0, id(&vm));
    assert_eq!(env.admin.server_digests(&vm).await, before);
    let servers = env.admin.scp_objects().await["servers"].clone();
    assert_eq!(servers.as_array().unwrap().len(), 1, "same VM, no new one");
    assert_clean(&env).await;
    // The restore expired CBT: the next backup is a full with a warning.
    let next = env.backup(scp.clone(), &[&id(&vm)]).await;
    let n = backed_up(&next, 0);
    assert!(n.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::New));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_recovery_of_a_linked_vm_is_refused() {
    let (env, _, vm) = one_linked_vm(false).await;
    let scp = env.provider();
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let b = backed_up(&report, 0);
    let reader = env.store.open_snapshot(&b.snapshot.id).await.unwrap();
    let archive = provider_api::ArchiveView::new(
        reader.info().clone(),
        None,
        None,
        reader.metadata().await.unwrap(),
    );
    let e = scp.quick_recovery(&archive).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.report().contains("linked-1"), "{}", e.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdssl_backs_up_with_the_right_ca_and_refuses_a_wrong_one() {
    let env = Env::start(|c, dir| {
        c.tls_dir = Some(dir.join("tls"));
        c.nbd_tls_required = true;
    })
    .await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let before = env.admin.server_digests(&vm).await;

    let wrong = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])
        .unwrap()
        .cert
        .pem();
    let bad = env.provider_with(env.options(AccessMode::NbdSsl {
        ca_pem: wrong,
        server_name: None,
    }));
    let report = env.backup(bad, &[&id(&vm)]).await;
    let e = failed(&report, 0);
    eprintln!("wrong CA: {}", e.report());
    assert_eq!(e.kind(), ErrorKind::Refused, "{}", e.report());
    assert_clean(&env).await;

    let good = env.provider_with(env.options(AccessMode::NbdSsl {
        ca_pem: env.ca_pem(),
        server_name: None,
    }));
    let b = backup_ok(&env, &good, &vm).await;
    // Restore to another storage through NBDSSL.
    assert_eq!(
        restored_digests(&env, &env, &good, &b.snapshot.id, Some("tls")).await,
        before
    );
    assert_clean(&env).await;

    // Into another SCP (its own CA): the base image is written over NBDSSL.
    let other = Env::start(|c, dir| {
        c.tls_dir = Some(dir.join("tls"));
        c.nbd_tls_required = true;
    })
    .await;
    let scp2 = other.provider_with(other.options(AccessMode::NbdSsl {
        ca_pem: other.ca_pem(),
        server_name: None,
    }));
    assert_eq!(
        restored_digests(&env, &other, &scp2, &b.snapshot.id, Some("tls-moved")).await,
        before
    );
    assert_eq!(
        other.admin.scp_objects().await["base_images"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_clean(&other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_add_full_incremental_and_restore() {
    let env = Env::start(|_, _| {}).await;
    let hot_add = hot_add_access(&env).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let scp = env.provider_with(env.options(hot_add));
    let f = backup_ok(&env, &scp, &vm).await;
    assert!(f.volumes[0].base_image_stored);
    assert_clean(&env).await;
    env.admin
        .write(&disk_id(&vm, 0), 7 * MIB, 128 << 10, "random", 5)
        .await;
    let after = env.admin.server_digests(&vm).await;
    let i = backup_ok(&env, &scp, &vm).await;
    assert_eq!(i.volumes[0].bitmap_mode, BitmapMode::Use);
    assert_eq!(i.volumes[0].stats.bytes_read, 128 << 10);
    assert_clean(&env).await;

    // Restore into a fresh SCP through hot-add (base image restored too).
    let other = Env::start(|_, _| {}).await;
    let scp2 = other.provider_with(other.options(hot_add_access(&other).await));
    assert_eq!(
        restored_digests(&env, &other, &scp2, &i.snapshot.id, Some("hot")).await,
        after
    );
    assert_clean(&other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_kit_over_nbd_and_hot_add() {
    let (env, _, vm) = one_linked_vm(true).await;
    let probe = ScpProbe {
        admin: env.admin.clone(),
    };
    let guest = Guest::vm(id(&vm));
    let nbd: Arc<dyn BackupProvider> = env.provider();
    provider_api::testing::check_all(&*nbd, &guest, &probe)
        .await
        .unwrap();
    let hot: Arc<dyn BackupProvider> = env.provider_with(env.options(hot_add_access(&env).await));
    provider_api::testing::check_all(&*hot, &guest, &probe)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_cleanup_releases_what_a_guest_still_holds() {
    let (env, _, vm) = one_linked_vm(true).await;
    let scp = env.provider();
    let guest = Guest::vm(id(&vm));
    scp.job_init(&provider_api::JobInfo::default())
        .await
        .unwrap();
    let exposed = expose_backup(&scp, &guest, 1, None).await;
    assert_eq!(exposed.volumes.len(), 2);
    drop(exposed);
    assert!(!leftovers(&env.admin).await.is_empty());
    // The host never called backup_cleanup: job_cleanup is the last resort.
    scp.job_cleanup().await.unwrap();
    assert_clean(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_errors_with_http_200_and_an_upgrade_to_6_11_3() {
    let env = Env::start(|c, _| c.scp.version = "6.11.2".into()).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, false).await;
    let scp = env.provider();
    // A non-zero code with HTTP 200 is an error naming the call.
    env.admin
        .post(
            "/faults/http",
            json!({"method": "POST", "path": "/servers/{server_id}/snapshots", "status": 200,
                "code": 60000, "message": "snapshots are paused", "times": 1}),
        )
        .await;
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let e = failed(&report, 0);
    assert_eq!(e.kind(), ErrorKind::Refused, "{}", e.report());
    assert!(
        e.report().contains("snapshots are paused"),
        "{}",
        e.report()
    );
    assert!(
        e.context()
            .api_call
            .as_deref()
            .is_some_and(|c| c.starts_with("POST /janus/20240725/servers/")),
        "{}",
        e.report()
    );
    assert_clean(&env).await;

    // Below 6.11.3 the system disk is stored merged; after the upgrade the
    // next backup is a full that stores the base image separately.
    let merged = env.backup(scp.clone(), &[&id(&vm)]).await;
    assert!(merged.success());
    env.admin
        .put("/scp/version", json!({"version": "6.11.3"}))
        .await;
    let b = backup_ok(&env, &scp, &vm).await;
    assert_eq!(b.volumes[0].bitmap_mode, BitmapMode::New);
    assert!(b.volumes[0].base_image_stored);
    let before = env.admin.server_digests(&vm).await;
    assert_eq!(
        restored_digests(&env, &env, &scp, &b.snapshot.id, None).await,
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_a_slow_backup_reads() {
    let (env, _, vm) = one_linked_vm(true).await;
    // A 2 s lease, renewed every 300 ms, for a backup of about 3 s.
    let mut options = env.options(AccessMode::Nbd);
    options.lease_seconds = 2;
    options.renew_interval = std::time::Duration::from_millis(300);
    let scp = env.provider_with(options);
    let started = std::time::Instant::now();
    let report = env.backup_with(scp, &[&id(&vm)], slow_mover()).await;
    let b = backed_up(&report, 0);
    assert!(started.elapsed() > std::time::Duration::from_millis(2500));
    assert!(b.volumes[0].base_image_stored);
    assert_clean(&env).await;
}

/// Answers missing a field that decides what is backed up are errors
/// naming the call and the field (they used to default to zero, an empty
/// list or "no next page"), the guest's cleanups run and nothing is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_missing_a_deciding_field_fail_the_guest_naming_call_and_field() {
    let (env, _, vm) = one_linked_vm(true).await;
    let scp = env.provider();
    // (path, JSON pointer removed from the answer, field, call named)
    let cases = [
        (
            "/cbt/changed-areas",
            "/data/areas",
            "areas",
            "cbt/changed-areas",
        ),
        (
            "/cbt/changed-areas",
            "/data/next_offset",
            "next_offset",
            "cbt/changed-areas",
        ),
        (
            "/snapshots/{snapshot_id}",
            "/data/vmconf/hardware_option/disks",
            "disks",
            "/snapshots/",
        ),
        (
            "/snapshots/{snapshot_id}",
            "/data/checkpoint_id",
            "checkpoint_id",
            "/snapshots/",
        ),
        (
            "/janus/20180725/base-images",
            "/data/data/*/size",
            "size",
            "base-images",
        ),
        (
            "/janus/20250725/servers/{server_id}",
            "/data/disks",
            "disks",
            "/janus/20250725/servers/",
        ),
        ("/cbt/status", "/data/enable", "enable", "cbt/status"),
        (
            "/janus/20180725/tasks/",
            "/data/entities/checkpoint_id",
            "checkpoint_id",
            "/snapshots",
        ),
    ];
    for (path, pointer, field, call) in cases {
        env.admin
            .post(
                "/scp/faults/answers",
                json!({"method": "GET", "path": path, "remove": [pointer]}),
            )
            .await;
        let report = env.backup(scp.clone(), &[&id(&vm)]).await;
        env.admin.delete("/scp/faults/answers").await;
        let e = report.guests[0]
            .result
            .as_ref()
            .expect_err(&format!("{pointer} removed: the backup must fail"));
        let text = e.report();
        assert!(
            text.contains(&format!("missing field `{field}`")),
            "{pointer}: {text}"
        );
        assert!(
            e.context()
                .api_call
                .as_deref()
                .is_some_and(|c| c.contains(call)),
            "{pointer}: {text}"
        );
        assert_clean_for(&env, pointer).await;
    }
    assert!(published(&env).await.is_empty(), "nothing published");
    // Complete answers again: the backup works.
    assert!(env.backup(scp.clone(), &[&id(&vm)]).await.success());
}

/// A fast retry policy for tests.
fn fast_retries(env: &Env) -> provider_scp::ScpOptions {
    let mut o = env.options(AccessMode::Nbd);
    o.retry = provider_scp::RetryPolicy {
        attempts: 4,
        initial_delay: std::time::Duration::from_millis(10),
        max_delay: std::time::Duration::from_millis(40),
    };
    o
}

/// HTTP 503 on idempotent calls (a `GET`, task polling) is retried; a
/// persistent one is reported naming the call; a failing call that changes
/// something is not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_503_is_retried_and_a_persistent_one_is_reported() {
    let (env, _, vm) = one_linked_vm(true).await;
    let before = env.admin.server_digests(&vm).await;
    let scp = env.provider_with(fast_retries(&env));
    for path in [
        "/cbt/changed-areas",
        "/janus/20180725/tasks/",
        "/janus/20180725/base-images",
    ] {
        env.admin
            .post(
                "/faults/http",
                json!({"method": "GET", "path": path, "status": 503, "code": 50300,
                    "message": "busy", "times": 2}),
            )
            .await;
    }
    let b = backup_ok(&env, &scp, &vm).await;
    assert_eq!(
        env.admin.get("/faults").await["http"],
        json!([]),
        "every transient fault fired"
    );
    assert_eq!(
        restored_digests(&env, &env, &scp, &b.snapshot.id, Some("r")).await,
        before
    );

    // Persistent: reported with the call once the attempts are spent.
    env.admin
        .post(
            "/faults/http",
            json!({"method": "GET", "path": "/cbt/status", "status": 503, "code": 50300,
                "message": "still busy"}),
        )
        .await;
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    env.admin.delete("/faults").await;
    let e = failed(&report, 0);
    assert!(e.report().contains("HTTP 503"), "{}", e.report());
    assert!(
        e.context().api_call.as_deref().is_some_and(|c| c
            .starts_with("GET /janus/20240725/servers/")
            && c.ends_with("/cbt/status")),
        "{}",
        e.report()
    );
    assert_clean(&env).await;

    // A POST is sent once: the second answer would succeed, but the
    // snapshot call is not repeated.
    env.admin
        .post(
            "/faults/http",
            json!({"method": "POST", "path": "/servers/{server_id}/snapshots", "status": 503,
                "code": 50300, "message": "busy", "times": 1}),
        )
        .await;
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let e = failed(&report, 0);
    assert!(
        e.context()
            .api_call
            .as_deref()
            .is_some_and(|c| c.starts_with("POST ")),
        "{}",
        e.report()
    );
    assert_clean(&env).await;
}

/// Job `job` of `host` starts a backup of `vm` and dies without any
/// cleanup: the platform keeps its snapshot, lease and exports or
/// hot-adds. Returns the provider of a job that is still running when
/// `keep` is true (dropped otherwise).
async fn backup_left_open(
    env: &Env,
    options: provider_scp::ScpOptions,
    host: &str,
    job: &str,
    running: &[&str],
    vm: &str,
    keep: bool,
) -> Option<Arc<provider_scp::ScpProvider>> {
    let scp = env.provider_with(options);
    let guest = Guest::vm(vm);
    let info = provider_api::JobInfo::new(job, scenarios::scp::now())
        .on_host(host, running.iter().map(|j| j.to_string()));
    scp.job_init(&info).await.unwrap();
    let exposed = expose_backup(&scp, &guest, 1, None).await;
    drop(exposed);
    keep.then_some(scp)
}

/// What the platform holds for a server: (snapshots, leases, hot-adds of
/// its snapshots).
async fn held_for(env: &Env, server: &str) -> (usize, usize, usize) {
    let o = env.admin.scp_objects().await;
    let count = |key: &str, f: &dyn Fn(&Value) -> bool| {
        o[key]
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| f(x)).count())
    };
    let snapshots: Vec<Value> = o["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["server_id"] == server)
        .cloned()
        .collect();
    (
        snapshots.len(),
        count("backup_resources", &|l| l["server_id"] == server),
        count("hotadds", &|h| {
            snapshots
                .iter()
                .any(|s| h["source"]["snapshot_id"] == s["id"])
        }),
    )
}

/// Objects of a job that died are swept by the next job of the same host;
/// a running job's and another host's objects stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_job_of_the_host_sweeps_what_a_dead_job_left() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "base").await;
    let vm1 = id(&linked_vm(&env, "dead-job", &base, 10, true).await);
    let vm2 = id(&linked_vm(&env, "running-job", &base, 20, true).await);
    let vm3 = id(&linked_vm(&env, "other-host", &base, 30, false).await);
    let hot_add = env.options(hot_add_access(&env).await);

    // host-a/job-1 (hot-add) dies; host-a/job-3 is still running;
    // host-b/job-1 died too, but on another host.
    backup_left_open(&env, hot_add, "host-a", "job-1", &[], &vm1, false).await;
    // job-3 started while job-1 still ran: it leaves job-1's objects.
    let running = backup_left_open(
        &env,
        env.options(AccessMode::Nbd),
        "host-a",
        "job-3",
        &["job-1"],
        &vm2,
        true,
    )
    .await
    .unwrap();
    backup_left_open(
        &env,
        env.options(AccessMode::Nbd),
        "host-b",
        "job-1",
        &[],
        &vm3,
        false,
    )
    .await;
    let dead = held_for(&env, &vm1).await;
    assert_eq!(
        dead,
        (1, 1, 3),
        "snapshot, lease, 2 disks + base image hot-added"
    );
    assert_eq!(held_for(&env, &vm2).await, (1, 1, 0));
    assert_eq!(held_for(&env, &vm3).await, (1, 1, 0));
    assert!(!leftovers(&env.admin).await.is_empty());

    // host-a/job-2 starts while job-3 runs.
    let sweeper = env.provider();
    sweeper
        .job_init(
            &provider_api::JobInfo::new("job-2", scenarios::scp::now())
                .on_host("host-a", vec!["job-3".to_owned()]),
        )
        .await
        .unwrap();
    let swept = sweeper.swept();
    eprintln!("swept: {swept:#?}");
    assert_eq!(held_for(&env, &vm1).await, (0, 0, 0), "{swept:?}");
    assert_eq!(held_for(&env, &vm2).await, (1, 1, 0), "running job kept");
    assert_eq!(held_for(&env, &vm3).await, (1, 1, 0), "other host's kept");
    assert!(
        swept.iter().all(|l| l.contains("vmbackup.host-a.job-1")),
        "{swept:?}"
    );
    assert_eq!(swept.len(), 5, "3 hot-adds, 1 lease, 1 snapshot: {swept:?}");
    sweeper.job_cleanup().await.unwrap();

    // vm1 is no longer locked by the dead job's lease: it backs up.
    let report = env.backup(env.provider(), &[&vm1]).await;
    assert!(
        report.success(),
        "{:?}",
        report.guests[0].result.as_ref().err().map(|e| e.report())
    );

    // The running job ends normally; host-b's next job sweeps its own.
    let guest = Guest::vm(vm2.as_str());
    running
        .backup_cleanup(
            &guest,
            &provider_api::Outcome::failed(&provider_api::Error::other("test over")),
        )
        .await
        .unwrap();
    running.job_cleanup().await.unwrap();
    let b = env.provider();
    b.job_init(
        &provider_api::JobInfo::new("job-5", scenarios::scp::now()).on_host("host-b", Vec::new()),
    )
    .await
    .unwrap();
    assert_eq!(held_for(&env, &vm3).await, (0, 0, 0));
    b.job_cleanup().await.unwrap();
    assert_clean(&env).await;
}

/// A task the platform fails (here the snapshot) fails the guest with the
/// platform's own error text (task `description`), after polling it
/// through `waiting` and `doing`; nothing is left behind and the next
/// backup works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_fails_the_guest_with_the_platform_error() {
    let env = Env::start(|c, _| c.scp.task_polls = 3).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, false).await;
    let scp = env.provider();
    let message = "Insufficient space on datastore local-lvm to create the snapshot";
    env.admin
        .post(
            "/scp/faults/tasks",
            json!({"action": "create_snapshot", "message": message, "times": 1}),
        )
        .await;
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let e = failed(&report, 0);
    assert!(e.report().contains(message), "{}", e.report());
    assert_eq!(
        e.context().api_call.as_deref(),
        Some(format!("POST /janus/20240725/servers/{}/snapshots", id(&vm)).as_str()),
        "{}",
        e.report()
    );
    assert_clean(&env).await;
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    assert!(report.success());
}

/// Tokens expire: the provider logs in again (before `expires_in` runs
/// out, and on a 401) instead of failing, within a job whose calls
/// outlive several tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_renewed_by_logging_in_again() {
    let env = Env::start(|c, _| {
        c.scp.token_ttl = std::time::Duration::from_millis(300);
        c.scp.task_polls = 4;
    })
    .await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let mut options = env.options(AccessMode::Nbd);
    options.poll_interval = std::time::Duration::from_millis(100);
    let scp = env.provider_with(options);
    scp.client().login().await.unwrap();
    let logins = env.mock.scp().logins();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    janus(
        &scp,
        reqwest::Method::GET,
        "/janus/20180725/system/version",
        None,
    )
    .await;
    assert_eq!(env.mock.scp().logins(), logins + 1);
    // One backup job: each task takes 4 polls of 100 ms, longer than a
    // token lives.
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    backed_up(&report, 0);
    assert!(
        env.mock.scp().logins() >= logins + 3,
        "{} logins",
        env.mock.scp().logins()
    );
}

/// `6.11.3-beta` is 6.11.3 for the platform and the provider alike (the
/// base image backed up separately from its CBT), and `SCP6.11.2-rc1` is
/// below 6.11.3 for both (system disk merged): were they to disagree, the
/// platform would refuse the base image CBT query or the provider would
/// store the base image inside the system disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_strings_with_suffixes_are_judged_alike_by_platform_and_provider() {
    let env = Env::start(|c, _| c.scp.version = "6.11.3-beta".into()).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, false).await;
    let scp = env.provider();
    let b = backup_ok(&env, &scp, &vm).await;
    assert!(b.volumes[0].base_image_stored);
    assert_eq!(b.snapshot.volumes[0].base.as_ref().unwrap().0, base);
    assert!(env.mock.scp().version_at_least("6.11.3"));

    env.admin
        .put("/scp/version", json!({"version": "6.11.2-rc1"}))
        .await;
    assert!(!env.mock.scp().version_at_least("6.11.3"));
    let vm2 = linked_vm(&env, "linked-2", &base, 20, false).await;
    let b = backup_ok(&env, &scp, &vm2).await;
    assert!(b.snapshot.volumes[0].base.is_none());
    assert_eq!(
        restored_digests(&env, &env, &scp, &b.snapshot.id, Some("r2")).await,
        env.admin.server_digests(&vm2).await
    );
}

/// Changed areas come in pages of 1 MiB here: a full and an incremental
/// with changes spread over the disks read every page (the restore is
/// byte-identical) and only the changed extents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_areas_over_several_pages_are_all_read() {
    let env = Env::start(|c, _| c.scp.changed_areas_page = MIB).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let scp = env.provider();
    let first = env.backup(scp.clone(), &[&id(&vm)]).await;
    assert!(first.success());
    for (disk, offset) in [(0, 0), (0, 5 * MIB + 4096), (0, 23 * MIB), (1, 7 * MIB)] {
        env.admin
            .write(&disk_id(&vm, disk), offset, 65536, "random", offset + 99)
            .await;
    }
    let after = env.admin.server_digests(&vm).await;
    env.admin.reset_export_history().await;
    let n = backup_ok(&env, &scp, &vm).await;
    assert!(n.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::Use));
    let read = env.admin.bytes_read().await;
    assert!(read <= 8 * 65536 * 2, "read {read} bytes");
    assert_eq!(
        restored_digests(&env, &env, &scp, &n.snapshot.id, None).await,
        after
    );
}

/// With an access key the provider signs every request and never logs in
/// with the password; a wrong secret key is an authentication error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_key_signing_backs_up_without_a_password_login() {
    let (env, _, vm) = one_linked_vm(false).await;
    let ep = env.mock.endpoints();
    let keys = &ep.platforms["scp"];
    let mut options = env.options(AccessMode::Nbd);
    options.password = provider_scp::Secret::new("not-the-password");
    options.access_key = keys["access_key"].as_str().map(str::to_owned);
    options.secret_key = keys["secret_key"].as_str().map(provider_scp::Secret::new);
    let scp = env.provider_with(options.clone());
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    backed_up(&report, 0);
    assert_eq!(env.mock.scp().logins(), 0);
    options.secret_key = Some(provider_scp::Secret::new("wrong"));
    let bad = env.provider_with(options);
    let e = bad
        .client()
        .call::<Value>(reqwest::Method::GET, "/janus/20250725/servers", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{}", e.report());
}

/// SHA-256 of a base image's own data.
async fn image_sha256(env: &Env, image: &str) -> String {
    env.admin.get(&format!("/images/{image}/sha256")).await["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned()
}

/// Seed 4.5.2: a missing base image is created, set `AVAILABLE`, and only
/// then written, through the restored VM's system disk opened with the
/// base-image flag; the platform refuses the old order (writing a base
/// image by its own id). Over NBD, NBDSSL and hot-add, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_image_restore_writes_through_the_vm_system_disk_after_available() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "centos-base").await;
    let base_digest = image_sha256(&env, &base).await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let before = env.admin.server_digests(&vm).await;
    let b = backup_ok(&env, &env.provider(), &vm).await;

    for mode in ["nbd", "nbdssl", "hotadd"] {
        let other = Env::start(|c, dir| {
            if mode == "nbdssl" {
                c.tls_dir = Some(dir.join("tls"));
                c.nbd_tls_required = true;
            }
        })
        .await;
        let access = match mode {
            "nbd" => AccessMode::Nbd,
            "nbdssl" => AccessMode::NbdSsl {
                ca_pem: other.ca_pem(),
                server_name: None,
            },
            _ => AccessMode::HotAdd {
                proxy_server_id: id(&other
                    .admin
                    .server(json!({"name": "proxy", "disks": [{"size": 16 * MIB}]}))
                    .await),
            },
        };
        let scp2 = other.provider_with(other.options(access));
        // The old order is refused by the platform: a base image cannot be
        // written by its own id, neither over NBD nor hot-added.
        let img = janus(
            &scp2,
            reqwest::Method::POST,
            "/janus/20180725/base-images",
            Some(json!({"name": "probe", "size": MIB})),
        )
        .await;
        let lease = janus(
            &scp2,
            reqwest::Method::POST,
            "/janus/20240725/backup-resources",
            Some(json!({"type": "Recovery", "remain_time": 60})),
        )
        .await;
        let e = scp2
            .client()
            .call::<Value>(
                reqwest::Method::POST,
                &format!("/janus/20240725/backup-resources/{}/exports", id(&lease)),
                &[],
                Some(&json!({"base_image_id": id(&img),
                    "transport": if mode == "nbdssl" { "nbdssl" } else { "nbd" }})),
            )
            .await
            .unwrap_err();
        assert!(e.report().contains("open_base_image"), "{}", e.report());
        let lease_path = format!("/janus/20240725/backup-resources/{}", id(&lease));
        janus(&scp2, reqwest::Method::DELETE, &lease_path, None).await;
        let img_path = format!("/janus/20180725/base-images/{}", id(&img));
        janus(&scp2, reqwest::Method::DELETE, &img_path, None).await;

        let name = format!("moved-{mode}");
        let restored = restored_digests(&env, &other, &scp2, &b.snapshot.id, Some(&name)).await;
        assert_eq!(restored, before, "{mode}");
        let images = other.admin.scp_objects().await["base_images"].clone();
        let images = images.as_array().unwrap();
        assert_eq!(images.len(), 1, "{mode}: {images:?}");
        assert_eq!(images[0]["status"], "AVAILABLE");
        let restored = images[0]["id"].as_str().unwrap();
        assert_eq!(image_sha256(&other, restored).await, base_digest, "{mode}");
        // No job marker left on a complete image.
        assert!(
            provider_api::JobMarker::find_in(images[0]["description"].as_str().unwrap()).is_none(),
            "{images:?}"
        );
        assert_clean_for(&other, mode).await;
    }
}

/// Seed 4.5.2 steps 1 and 4: the base image exists but has no replica on
/// the storage restored to: a replica is synced there (the platform links
/// a VM only to a replica on its own storage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_replica_is_synced_to_the_restore_storage() {
    let env = Env::start(|_, _| {}).await;
    // A base image with a replica on storage-local only.
    let base = env
        .admin
        .post(
            "/scp/base-images",
            json!({"name": "base", "size": 16 * MIB, "storage_ids": ["storage-local"],
                "fill": [{"offset": 0, "length": 5 * MIB, "pattern": "random", "seed": 4}]}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let before = env.admin.server_digests(&vm).await;
    let b = backup_ok(&env, &env.provider(), &vm).await;
    let replicas = |o: &Value| -> Vec<String> {
        o["base_images"][0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["storage_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        replicas(&env.admin.scp_objects().await),
        vec!["storage-local"]
    );
    let mut options = env.options(AccessMode::Nbd);
    options.restore_storage_id = Some("storage-vs".into());
    let scp = env.provider_with(options);
    assert_eq!(
        restored_digests(&env, &env, &scp, &b.snapshot.id, Some("on-vs")).await,
        before
    );
    let objects = env.admin.scp_objects().await;
    assert_eq!(objects["base_images"].as_array().unwrap().len(), 1);
    assert_eq!(replicas(&objects), vec!["storage-local", "storage-vs"]);
    let restored = env.admin.server_by_name(&scp, "on-vs").await.unwrap();
    assert_eq!(restored["disks"][0]["base_image_id"], base.as_str());
    assert_eq!(restored["storage_id"], "storage-vs");
    assert_clean(&env).await;
}

/// Seed 4.5.2 step 5: a custom attribute that exists but is not bound to
/// the base image is bound (not created a second time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_unbound_custom_attribute_is_bound() {
    let (env, base, vm) = one_linked_vm(false).await;
    let before = env.admin.server_digests(&vm).await;
    let scp = env.provider();
    let (attr, binding) = os_family_centos(&scp, &base).await;
    let b = backup_ok(&env, &scp, &vm).await;
    // After the backup the binding is removed; the attribute stays.
    env.admin
        .delete(&format!("/scp/bindings/{}", id(&binding)))
        .await;
    assert_eq!(
        env.admin.scp_objects().await["bindings"],
        json!([]),
        "binding removed"
    );
    assert_eq!(
        restored_digests(&env, &env, &scp, &b.snapshot.id, Some("bound")).await,
        before
    );
    let objects = env.admin.scp_objects().await;
    let attrs = objects["custom_attributes"].as_array().unwrap();
    assert_eq!(attrs.len(), 1, "not created twice: {attrs:?}");
    let bindings = objects["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0]["resource_id"], base.as_str());
    assert_eq!(bindings[0]["custom_attribute_id"], attr["id"]);
    assert_eq!(bindings[0]["value"], "centos");
    assert_clean(&env).await;
}

/// Seed 4.5.3 rule 8: a base image restore killed while its data is
/// written leaves an incomplete (marker-tagged, already `AVAILABLE`) base
/// image and the VM created on it; the next job of the host deletes both
/// (and the restore's resource), while a base image an earlier restore
/// finished is kept. Both VMs then restore byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_image_restore_killed_midway_is_swept_by_the_next_job() {
    let env = Env::start(|_, _| {}).await;
    let base_a = base_image(&env, "base-a").await;
    let base_b = env
        .admin
        .base_image(
            "base-b",
            16 * MIB,
            json!([{"offset": 0, "length": 12 * MIB, "pattern": "random", "seed": 7}]),
        )
        .await;
    let digest_b = image_sha256(&env, &base_b).await;
    let vm_a = linked_vm(&env, "vm-a", &base_a, 10, true).await;
    let vm_b = linked_vm(&env, "vm-b", &base_b, 20, false).await;
    let before_a = env.admin.server_digests(&vm_a).await;
    let before_b = env.admin.server_digests(&vm_b).await;
    let report = env.backup(env.provider(), &[&id(&vm_a), &id(&vm_b)]).await;
    let snap = |i: usize| {
        report.guests[i]
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}", e.report()))
            .snapshot
            .id
            .clone()
    };
    let (snap_a, snap_b) = (snap(0), snap(1));

    let other = Env::start(|_, _| {}).await;
    // A finished base image restore (job-0 of host-a).
    let job = |name: &str| {
        provider_api::JobInfo::new(name, scenarios::scp::now()).on_host("host-a", Vec::new())
    };
    let driver = |job: provider_api::JobInfo| async {
        let exposer = engine::NbdExposer::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        engine::RestoreDriver::new(
            other.provider() as Arc<dyn BackupProvider>,
            env.store.clone() as Arc<dyn provider_api::Target>,
            Arc::new(engine::StandardMover::default()),
            Arc::new(exposer),
        )
        .with_job(job)
    };
    let done = driver(job("job-0"))
        .await
        .restore_vm(
            &snap_a,
            RestoreTarget::NewGuest {
                name: Some("done".into()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    let finished = other.admin.scp_objects().await["base_images"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // job-1 dies while it writes base-b: closing its export after the
    // data is slow, and the job is killed meanwhile (no cleanup runs).
    other
        .admin
        .post(
            "/faults/http",
            json!({"method": "DELETE", "path": "/exports/", "latency_ms": 3000, "times": 1}),
        )
        .await;
    let killed = driver(job("job-1")).await;
    let snap_k = snap_b.clone();
    let task = tokio::spawn(async move {
        killed
            .restore_vm(
                &snap_k,
                RestoreTarget::NewGuest {
                    name: Some("killed".into()),
                },
            )
            .await
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let o = other.admin.scp_objects().await;
        let written = o["exports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["bytes_written"].as_u64().unwrap_or(0) > 0);
        if written {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no base image write seen: {o}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    task.abort();
    let _ = task.await;
    let o = other.admin.scp_objects().await;
    let images = o["base_images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2, "{images:?}");
    let half = images
        .iter()
        .find(|i| i["id"] != finished.as_str())
        .unwrap();
    assert_eq!(
        half["status"], "AVAILABLE",
        "the seed's order: AVAILABLE first"
    );
    assert!(
        half["description"]
            .as_str()
            .unwrap()
            .contains("vmbackup.host-a.job-1"),
        "{half}"
    );
    assert!(
        o["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "killed")
    );
    assert!(!leftovers(&other.admin).await.is_empty());

    // The next job of host-a sweeps what job-1 left, and only that.
    let sweeper = other.provider();
    sweeper.job_init(&job("job-2")).await.unwrap();
    let swept = sweeper.swept();
    eprintln!("swept: {swept:#?}");
    assert!(
        swept.iter().all(|l| l.contains("vmbackup.host-a.job-1")),
        "{swept:?}"
    );
    assert!(
        swept.iter().any(|l| l.contains("incomplete base image")),
        "{swept:?}"
    );
    sweeper.job_cleanup().await.unwrap();
    let o = other.admin.scp_objects().await;
    let images = o["base_images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(
        images[0]["id"],
        finished.as_str(),
        "the finished one is kept"
    );
    let names: Vec<&str> = o["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["done"]);
    assert_clean(&other).await;
    let scp2 = other.provider();
    let _ = done;
    let restored_a = other.admin.server_by_name(&scp2, "done").await.unwrap();
    assert_eq!(other.admin.server_digests(&restored_a).await, before_a);

    // Restoring vm-b again now works, byte for byte.
    assert_eq!(
        restored_digests(&env, &other, &scp2, &snap_b, Some("again")).await,
        before_b
    );
    let o = other.admin.scp_objects().await;
    let again = o["base_images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] != finished.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(image_sha256(&other, &again).await, digest_b);
    assert_clean(&other).await;
}

/// HotAdd as on a real proxy: the platform hands out no path; the
/// provider finds each hot-added disk by its serial under the proxy's
/// by-id directory (the mock makes the links there). A backup and its
/// restore to a platform without the base image, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_add_finds_disks_by_serial_under_the_by_id_root() {
    let by_id = |c: &mut mock_hypervisor::MockConfig, dir: &std::path::Path| {
        c.scp.disk_by_id_dir = Some(dir.join("by-id"));
    };
    let env = Env::start(by_id).await;
    let proxy = backup_proxy(&env).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm(&env, "linked-1", &base, 10, true).await;
    let before = env.admin.server_digests(&vm).await;
    let options = |env: &Env, proxy: &str| {
        let mut o = env.options(AccessMode::HotAdd {
            proxy_server_id: proxy.to_owned(),
        });
        o.hotadd_device_root = Some(env.dir.path().join("by-id"));
        o.hotadd_device_wait = std::time::Duration::from_secs(5);
        o
    };
    // Without the root the provider has no path to read.
    let e = env
        .backup(
            env.provider_with(env.options(AccessMode::HotAdd {
                proxy_server_id: proxy.clone(),
            })),
            &[&id(&vm)],
        )
        .await;
    let err = failed(&e, 0);
    assert!(
        err.report().contains("hotadd_device_root"),
        "{}",
        err.report()
    );
    assert_clean(&env).await;

    let scp = env.provider_with(options(&env, &proxy));
    let b = backup_ok(&env, &scp, &vm).await;
    assert!(b.volumes[0].base_image_stored);
    assert_clean(&env).await;
    let links: Vec<_> = std::fs::read_dir(env.dir.path().join("by-id"))
        .unwrap()
        .collect();
    assert!(links.is_empty(), "links removed with the hot-adds");

    let other = Env::start(by_id).await;
    let proxy2 = backup_proxy(&other).await;
    let scp2 = other.provider_with(options(&other, &proxy2));
    assert_eq!(
        restored_digests(&env, &other, &scp2, &b.snapshot.id, Some("by-id")).await,
        before
    );
    assert_eq!(
        image_sha256(
            &other,
            other.admin.scp_objects().await["base_images"][0]["id"]
                .as_str()
                .unwrap()
        )
        .await,
        image_sha256(&env, &base).await
    );
    assert_clean(&other).await;
}

/// SHA-256 of a file (a mock disk's raw data file, read behind the mock's
/// back as a site helper reads the platform's storage).
fn file_sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// [`children_of_test_named`] once it is empty, or what is left
/// after 3 s. Tests of this binary run in parallel in one process, so a
/// zombie (no command line to tell whose it is) may be another test's
/// helper between its kill and its reaping; a leaked process or zombie
/// stays, a passing one does not.
fn children_named(name: &str, marker: &str) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let left = children_of_test_named(name, marker);
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Children of this process running `name` whose command line mentions
/// `marker` (zombies included; tests run in parallel in this process, so
/// each looks for its own).
fn children_of_test_named(name: &str, marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mine = cmdline.is_empty() // a zombie has none
            || String::from_utf8_lossy(&cmdline).contains(marker);
        if comm == name && ppid == Some(&me.to_string()) && mine {
            out.push(pid);
        }
    }
    out
}

/// The disk helper command (the sfvddk seam) as `nbdkit` serving the
/// mock's disk files: `{disk}` picks the file, `{if_readonly}-r` makes
/// backups read-only.
fn nbdkit_helper(env: &Env, plugin: &str) -> provider_scp::HelperCommandOptions {
    let disks = env.mock.hypervisor().store.root().join("disks");
    provider_scp::HelperCommandOptions::new([
        "nbdkit".to_owned(),
        "--exit-with-parent".to_owned(),
        "-U".to_owned(),
        "{socket}".to_owned(),
        "-f".to_owned(),
        "{if_readonly}-r".to_owned(),
        plugin.to_owned(),
        format!("file={}/{{disk}}/overlay.raw", disks.display()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_command_serves_disks_for_backup_and_restore() {
    let env = Env::start(|_, _| {}).await;
    let vm = env
        .admin
        .server(
            json!({"name": "plain", "storage_id": "storage-local", "disks": [
            {"size": 8 * MIB, "fill": [
                {"offset": 0, "length": MIB, "pattern": "text", "seed": 5},
                {"offset": 3 * MIB, "length": 2 * MIB, "pattern": "random", "seed": 6}]}]}),
        )
        .await;
    let before = env.admin.server_digests(&vm).await;
    let root = env.mock.hypervisor().store.root().join("disks");
    // The raw file is what the helper serves: same data as the guest sees.
    assert_eq!(
        file_sha256(&root.join(disk_id(&vm, 0)).join("overlay.raw")),
        before[0]
    );

    let mut options = env.options(AccessMode::Nbd);
    options.helper_command = Some(nbdkit_helper(&env, "file"));
    let scp = env.provider_with(options);
    let b = backup_ok(&env, &scp, &vm).await;
    assert_clean(&env).await;
    let marker = root.display().to_string();
    assert_eq!(
        children_named("nbdkit", &marker),
        Vec::<u32>::new(),
        "after backup"
    );
    // No REST export was used.
    assert_eq!(env.admin.bytes_read().await, 0, "read through nbdkit only");

    let r = restore_new(&env, &scp, &b.snapshot.id, Some("from-helper")).await;
    assert_eq!(
        children_named("nbdkit", &marker),
        Vec::<u32>::new(),
        "after restore"
    );
    let restored: Value = env
        .admin
        .server_by_name(&scp, "from-helper")
        .await
        .expect("restored VM");
    assert_ne!(id(&restored), id(&vm));
    assert_eq!(scp.restored_server_id(&r.guest), Some(id(&restored)));
    assert_eq!(
        file_sha256(&root.join(disk_id(&restored, 0)).join("overlay.raw")),
        before[0],
        "restored disk written through nbdkit"
    );
    assert_clean(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_command_that_exits_at_once_fails_the_guest_naming_it() {
    let env = Env::start(|_, _| {}).await;
    let vm = env
        .admin
        .server(
            json!({"name": "plain", "storage_id": "storage-local", "disks": [
            {"size": 4 * MIB, "fill": [
                {"offset": 0, "length": MIB, "pattern": "random", "seed": 9}]}]}),
        )
        .await;
    let mut options = env.options(AccessMode::Nbd);
    options.helper_command = Some(nbdkit_helper(&env, "no-such-plugin-xyz"));
    let scp = env.provider_with(options);
    let report = env.backup(scp.clone(), &[&id(&vm)]).await;
    let e = failed(&report, 0).report();
    assert!(e.contains("nbdkit --exit-with-parent"), "{e}");
    assert!(e.contains("no-such-plugin-xyz"), "{e}");
    assert!(e.contains("exited"), "{e}");
    assert_eq!(
        children_named("nbdkit", "no-such-plugin-xyz"),
        Vec::<u32>::new()
    );
    assert_clean(&env).await;
}

/// Seed 4.5.1 steps 1 to 3: the linked disk's `base_image_id` (in the
/// snapshot's `vmconf.hardware_option.disks`) names the base image; its
/// details are filtered out of the base image list and only the custom
/// attributes bound to *it* out of the binding list. Other base images
/// (one listed before it) and bindings of the same attribute to other
/// images are left out of the stored metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_stores_its_own_base_image_and_only_the_attributes_bound_to_it() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "ours").await;
    // Other base images; at least one sorts (and is listed) before ours.
    let mut others: Vec<String> = Vec::new();
    while others.len() < 2 || others.iter().all(|o| o > &base) {
        let name = format!("other-{}", others.len());
        others.push(
            env.admin
                .base_image(
                    &name,
                    8 * MIB,
                    json!([{"offset": 0, "length": MIB, "pattern": "random", "seed": 60}]),
                )
                .await,
        );
    }
    let vm = linked_vm(&env, "linked-1", &base, 10, false).await;
    let scp = env.provider();
    let post =
        async |path: &str, body: Value| janus(&scp, reqwest::Method::POST, path, Some(body)).await;
    let attributes = "/janus/20190725/custom-attributes";
    let bindings = "/janus/20190725/custom-attributes/bindings";
    let os = post(
        attributes,
        json!({"name": "os-family", "description": "OS", "resource_type": "base_image"}),
    )
    .await;
    let owner = post(
        attributes,
        json!({"name": "owner", "description": "who", "resource_type": "base_image"}),
    )
    .await;
    for (attr, resource, value) in [
        (&os, &base, "centos"),
        (&os, &others[0], "debian"),
        (&owner, &others[1], "team-b"),
    ] {
        post(
            bindings,
            json!({"custom_attribute_id": attr["id"], "resource_type": "base_image",
                "resource_id": resource, "value": value}),
        )
        .await;
    }
    let b = backup_ok(&env, &scp, &vm).await;
    // Step 1: the disk is linked to `base`.
    assert_eq!(b.snapshot.volumes[0].base.as_ref().unwrap().0, base);
    let md = snapshot_metadata(&env, &b.snapshot.id).await;
    // Step 2: its own details.
    let image = &md["base_image"]["image"];
    assert_eq!(image["id"], base.as_str(), "{md}");
    assert_eq!(image["name"], "ours", "{md}");
    assert_eq!(image["size"], 16 * MIB, "{md}");
    // Step 3: only the binding to it, and only its attribute.
    let stored = md["base_image"]["bindings"].as_array().unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["resource_id"], base.as_str());
    assert_eq!(stored[0]["custom_attribute_id"], os["id"]);
    assert_eq!(stored[0]["value"], "centos");
    let attrs = md["base_image"]["custom_attributes"].as_array().unwrap();
    assert_eq!(attrs.len(), 1, "{attrs:?}");
    assert_eq!(attrs[0]["name"], "os-family");
}

/// Seed 4.5.1 step 5 and 4.5.2 step 3: the base-image flag
/// (`open_base_image: 1`, sfvddk's `SFDISKLIB_FLAG_OPEN_BASE_IMAGE`) opens
/// the base image and only the base image; without it the system disk is
/// opened. The VM's own data overwrites part of the base image's data, so
/// the base image read through the system disk (the guest's view), or the
/// system disk read through the base image, gives other bytes. Over NBD
/// and HotAdd: backup, restore to a platform without the base image, the
/// restored base image and the restored disks compared by sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_base_image_is_set_for_the_base_image_only_where_the_overlay_overlaps_it() {
    for mode in ["nbd", "hotadd"] {
        let env = Env::start(|_, _| {}).await;
        let base = env
            .admin
            .base_image(
                "base",
                16 * MIB,
                json!([{"offset": 0, "length": 8 * MIB, "pattern": "random", "seed": 41}]),
            )
            .await;
        let base_digest = image_sha256(&env, &base).await;
        let vm = env
            .admin
            .server(
                json!({"name": "overlap", "storage_id": "storage-local", "disks": [
                {"size": 24 * MIB, "base_image_id": base, "fill": [
                    {"offset": MIB, "length": MIB, "pattern": "random", "seed": 42},
                    {"offset": 6 * MIB, "length": 3 * MIB, "pattern": "text", "seed": 43}]},
                {"size": 8 * MIB, "fill": [
                    {"offset": 0, "length": 2 * MIB, "pattern": "random", "seed": 44}]}]}),
            )
            .await;
        let before = env.admin.server_digests(&vm).await;
        let access = async |env: &Env| match mode {
            "nbd" => AccessMode::Nbd,
            _ => hot_add_access(env).await,
        };
        let scp = env.provider_with(env.options(access(&env).await));
        let b = backup_ok(&env, &scp, &vm).await;
        drop(scp);
        assert!(b.volumes[0].base_image_stored, "{mode}");
        assert_clean_for(&env, mode).await;

        let other = Env::start(|_, _| {}).await;
        let scp2 = other.provider_with(other.options(access(&other).await));
        let r = restore_new(&env, &scp2, &b.snapshot.id, Some("overlap")).await;
        let images = other.admin.scp_objects().await["base_images"].clone();
        let restored = images[0]["id"].as_str().unwrap();
        assert_eq!(
            image_sha256(&other, restored).await,
            base_digest,
            "{mode}: the restored base image holds the base image's bytes"
        );
        assert_eq!(
            digests_of(&other, &scp2, &r.guest).await,
            before,
            "{mode}: the restored disks hold the VM's bytes"
        );
        assert_clean_for(&other, mode).await;
    }
}

/// Seed 4.5.1 step 4 note and 4.5.3 rule 1 note: CBT is enabled with the
/// new API (`PUT /janus/20240725/servers/{id}/cbt/status`) on a VM that
/// has it off; that backup is full with a warning, the next one
/// incremental, and the restore byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_off_is_enabled_with_the_new_api_and_the_backup_is_full_with_a_warning() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "base").await;
    let vm = linked_vm_with(&env, "no-cbt", &base, 10, true, json!({"cbt_enable": 0})).await;
    let scp = env.provider();
    let path = format!("/janus/20250725/servers/{}", id(&vm));
    let server = async || janus(&scp, reqwest::Method::GET, &path, None).await;
    assert_eq!(server().await["cbt"]["enable"], 0);
    let b = backup_ok(&env, &scp, &vm).await;
    assert!(b.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::New));
    assert!(
        warned(&b, "CBT was not enabled"),
        "{:?}",
        b.snapshot.warnings
    );
    assert_eq!(server().await["cbt"]["enable"], 1);
    env.admin
        .write(&disk_id(&vm, 0), 4 * MIB, 64 << 10, "random", 70)
        .await;
    let after = env.admin.server_digests(&vm).await;
    let n = backup_ok(&env, &scp, &vm).await;
    assert!(n.volumes.iter().all(|v| v.bitmap_mode == BitmapMode::Use));
    assert_eq!(
        restored_digests(&env, &env, &scp, &n.snapshot.id, None).await,
        after
    );
}

/// Seed 4.5.1 step 4 note and 4.5.3 rule 5: an incremental never reads the
/// base image, even when the target says it does not hold it (the base
/// layer is named, without access).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_never_reads_the_base_image_even_if_the_target_lacks_it() {
    let (env, base, vm) = one_linked_vm(true).await;
    let scp = env.provider();
    assert!(env.backup(scp.clone(), &[&id(&vm)]).await.success());
    let guest = Guest::vm(id(&vm));
    let info = env
        .store
        .latest_good_snapshot("scp", &guest.id)
        .await
        .unwrap()
        .unwrap();
    let metadata = env
        .store
        .open_snapshot(&info.id)
        .await
        .unwrap()
        .metadata()
        .await
        .unwrap();
    let previous = provider_api::PreviousBackup::new(info, metadata);
    scp.job_init(&provider_api::JobInfo::default())
        .await
        .unwrap();
    let exposed = expose_backup(&scp, &guest, 2, Some(previous)).await;
    assert_eq!(exposed.volumes[0].bitmap_mode, BitmapMode::Use);
    let layer = exposed.volumes[0].base.as_ref().expect("a base layer");
    assert_eq!(layer.id.0, base);
    assert!(
        layer.access.is_none(),
        "an incremental exposes no base image data"
    );
    drop(exposed);
    scp.backup_cleanup(
        &guest,
        &provider_api::Outcome::failed(&provider_api::Error::other("test over")),
    )
    .await
    .unwrap();
    scp.job_cleanup().await.unwrap();
    assert_clean(&env).await;
}

/// The disk helper command (the sfvddk seam) for a linked VM: a script
/// that serves the base image's file when `{base_image}` is 1 and the
/// disk's own file otherwise, as a site's nbdkit plugin would pass
/// `SFDISKLIB_FLAG_OPEN_BASE_IMAGE` on. It logs each open.
fn linked_helper(env: &Env) -> (provider_scp::HelperCommandOptions, std::path::PathBuf) {
    let root = env.mock.hypervisor().store.root().to_path_buf();
    let log = env.dir.path().join("helper.log");
    let script = r#"root=$0 base=$1 disk=$2 sock=$3 ro=$4 log=$5
if [ "$base" = 1 ]; then
  img=$(tr -d ' \n' < "$root/disks/$disk/meta.json" | sed -n 's/.*"base_image_id":"\([^"]*\)".*/\1/p')
  [ -n "$img" ] || img=$(ls "$root/images" | head -n 1)
  file="$root/images/$img/data.raw"
else
  file="$root/disks/$disk/overlay.raw"
fi
echo "base=$base readonly=$ro disk=$disk" >> "$log"
if [ "$ro" = 1 ]; then
  exec nbdkit --exit-with-parent -U "$sock" -f -r file "file=$file"
fi
exec nbdkit --exit-with-parent -U "$sock" -f file "file=$file""#;
    (
        provider_scp::HelperCommandOptions::new([
            "sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
            root.display().to_string(),
            "{base_image}".to_owned(),
            "{disk}".to_owned(),
            "{socket}".to_owned(),
            "{readonly}".to_owned(),
            log.display().to_string(),
        ]),
        log,
    )
}

/// The helper's log (see [`linked_helper`]) and its lines, sorted.
fn logged_opens(log: &std::path::Path) -> (String, Vec<String>) {
    let opens = std::fs::read_to_string(log).unwrap();
    let mut lines: Vec<String> = opens.lines().map(str::to_owned).collect();
    lines.sort();
    (opens, lines)
}

/// The opens [`linked_helper`] logs for a two-disk linked VM, sorted:
/// each disk without the base-image flag, the base image through the
/// system disk with it; `readonly` 1 for a backup, 0 for a restore.
fn two_disk_opens(vm: &Value, readonly: u8) -> Vec<String> {
    let mut expected = vec![
        format!("base=0 readonly={readonly} disk={}", disk_id(vm, 0)),
        format!("base=0 readonly={readonly} disk={}", disk_id(vm, 1)),
        format!("base=1 readonly={readonly} disk={}", disk_id(vm, 0)),
    ];
    expected.sort();
    expected
}

/// The helper command with a linked VM: the backup opens the base image
/// (flag set, read-only) once and each disk without the flag; the backup
/// restores byte for byte (through the platform's export). A restore
/// through the helper to a platform without the base image writes the
/// base image's data with the flag set (read-write) and the disks without
/// it: the restored files equal the source files byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_command_backs_up_and_restores_a_linked_vm_with_the_base_image_flag() {
    let (env, base, vm) = one_linked_vm(true).await;
    let before = env.admin.server_digests(&vm).await;
    let (helper, log) = linked_helper(&env);
    let mut options = env.options(AccessMode::Nbd);
    options.helper_command = Some(helper);
    let scp = env.provider_with(options);
    let b = backup_ok(&env, &scp, &vm).await;
    assert!(b.volumes[0].base_image_stored);
    assert_eq!(
        env.admin.bytes_read().await,
        0,
        "read through the helper only"
    );
    let (opens, lines) = logged_opens(&log);
    assert_eq!(lines, two_disk_opens(&vm, 1), "{opens}");
    assert_clean(&env).await;

    // What the helper read restores byte for byte (platform export).
    let check = Env::start(|_, _| {}).await;
    let scp_check = check.provider();
    assert_eq!(
        restored_digests(&env, &check, &scp_check, &b.snapshot.id, Some("checked")).await,
        before
    );

    // A restore through the helper to a platform without the base image.
    let other = Env::start(|_, _| {}).await;
    let (helper, log2) = linked_helper(&other);
    let mut options = other.options(AccessMode::Nbd);
    options.helper_command = Some(helper);
    let scp2 = other.provider_with(options);
    restore_new(&env, &scp2, &b.snapshot.id, Some("through-helper")).await;
    let restored = other
        .admin
        .server_by_name(&scp2, "through-helper")
        .await
        .expect("restored VM");
    let (opens, lines) = logged_opens(&log2);
    assert_eq!(lines, two_disk_opens(&restored, 0), "{opens}");
    let src = env.mock.hypervisor().store.root().to_path_buf();
    let dst = other.mock.hypervisor().store.root().to_path_buf();
    let images = other.admin.scp_objects().await["base_images"].clone();
    let new_base = images[0]["id"].as_str().unwrap();
    assert_eq!(
        file_sha256(&dst.join("images").join(new_base).join("data.raw")),
        file_sha256(&src.join("images").join(&base).join("data.raw")),
        "base image data written through the helper with the flag"
    );
    for i in 0..2 {
        assert_eq!(
            file_sha256(
                &dst.join("disks")
                    .join(disk_id(&restored, i))
                    .join("overlay.raw")
            ),
            file_sha256(&src.join("disks").join(disk_id(&vm, i)).join("overlay.raw")),
            "disk {i} written through the helper without the flag"
        );
    }
    assert_eq!(
        children_named("nbdkit", &dst.display().to_string()),
        Vec::<u32>::new()
    );
}

/// Seed 4.5.3 rule 8: a base image whose data is not complete (it still
/// carries a job marker, here of a job still running on another host) is
/// never reused by a restore, although it is `AVAILABLE` (the seed's order)
/// and names the base image it restores: the restore recreates the base
/// image and the VM restores byte for byte; the other job's image is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_image_still_being_written_is_not_reused_by_a_restore() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "base").await;
    let digest = image_sha256(&env, &base).await;
    let vm = linked_vm(&env, "linked-1", &base, 10, false).await;
    let before = env.admin.server_digests(&vm).await;
    let b = backup_ok(&env, &env.provider(), &vm).await;

    let other = Env::start(|_, _| {}).await;
    let scp2 = other.provider();
    let marker = provider_api::JobInfo::new("job-7", scenarios::scp::now())
        .on_host("another-host", Vec::<String>::new())
        .marker();
    let half = janus(
        &scp2,
        reqwest::Method::POST,
        "/janus/20180725/base-images",
        Some(
            json!({"name": "base", "size": 16 * MIB, "storage_id": "storage-local",
                "description": format!("[restored from base image {base}] {marker}")}),
        ),
    )
    .await;
    janus(
        &scp2,
        reqwest::Method::PUT,
        &format!("/janus/20180725/base-images/{}", id(&half)),
        Some(json!({"status": "AVAILABLE"})),
    )
    .await;
    assert_eq!(
        restored_digests(&env, &other, &scp2, &b.snapshot.id, Some("fresh")).await,
        before
    );
    let restored = other.admin.server_by_name(&scp2, "fresh").await.unwrap();
    let linked_to = restored["disks"][0]["base_image_id"].as_str().unwrap();
    assert_ne!(linked_to, id(&half), "the incomplete image is not used");
    assert_eq!(image_sha256(&other, linked_to).await, digest);
    let images = other.admin.scp_objects().await["base_images"].clone();
    assert_eq!(images.as_array().unwrap().len(), 2, "{images}");
}

/// Seed 4.5.3 rule 6: a base image the backup system already holds (by
/// its id) is not opened again: the full backup of a second VM on it opens
/// no base image export (the host would skip storing it anyway, so only
/// the platform's export list shows it) and reads only the VM's own data;
/// it restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_image_already_stored_is_not_opened_again() {
    let env = Env::start(|_, _| {}).await;
    let base = base_image(&env, "base").await;
    let vm1 = linked_vm(&env, "linked-1", &base, 10, false).await;
    let vm2 = linked_vm(&env, "linked-2", &base, 20, false).await;
    let before2 = env.admin.server_digests(&vm2).await;
    let base_exports = |e: Value| -> usize {
        ["active", "closed"]
            .iter()
            .flat_map(|k| e[*k].as_array().cloned().unwrap_or_default())
            .filter(|s| {
                s["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("base image"))
            })
            .count()
    };
    let scp = env.provider();
    let f = backup_ok(&env, &scp, &vm1).await;
    assert!(f.volumes[0].base_image_stored);
    assert_eq!(base_exports(env.admin.get("/exports").await), 1);
    env.admin.reset_export_history().await;
    let s = backup_ok(&env, &scp, &vm2).await;
    assert!(!s.volumes[0].base_image_stored);
    assert_eq!(s.snapshot.volumes[0].base.as_ref().unwrap().0, base);
    let exports = env.admin.get("/exports").await;
    assert_eq!(
        base_exports(exports.clone()),
        0,
        "the stored base image is not opened again: {exports}"
    );
    let read = env.admin.bytes_read().await;
    assert!(read <= 2 * MIB + (256 << 10), "read {read} bytes");
    assert_eq!(
        restored_digests(&env, &env, &scp, &s.snapshot.id, Some("second")).await,
        before2
    );
}
