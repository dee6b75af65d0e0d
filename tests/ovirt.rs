//! oVirt end to end: provider-ovirt against the in-process mock hypervisor
//! (real HTTP and NBD sockets), through engine::BackupDriver /
//! RestoreDriver with the StandardMover and NbdExposer, into a datastore.
//!
//! Every failure test ends with a leak check through the mock's inventory
//! (snapshots, appliance attachments and their files, backups, transfers,
//! exports).

use std::sync::Arc;
use std::time::Duration;

use engine::{BackupDriver, JobOptions, StandardMover};
use provider_api::testing::check_all;
use provider_api::{BackupProvider, BitmapMode, ErrorKind, Guest, JobInfo, RestoreTarget};
use provider_ovirt::{BackupMode, OvirtProvider, WireFormat};
use scenarios::ovirt::*;
use serde_json::json;

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

    // An attachment (JSON), a backup and a transfer (incremental mode)
    // whose answers are cut.
    for (path, mode, format, expected) in [
        (
            "/diskattachments",
            BackupMode::SnapshotAttach,
            WireFormat::Json,
            "invalid JSON",
        ),
        (
            "/backups",
            BackupMode::Incremental,
            WireFormat::Json,
            "invalid JSON",
        ),
        (
            "/imagetransfers",
            BackupMode::Incremental,
            WireFormat::Xml,
            "invalid XML",
        ),
    ] {
        env.arm(json!({"malformed": [{"method": "POST", "path": path, "times": 1}]}))
            .await;
        let e = env.backup_err(env.provider(mode, format)).await;
        assert!(e.report().contains(expected), "{path}: {}", e.report());
        assert_eq!(env.leftovers().await, Vec::<String>::new(), "{path}");
    }

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
