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
use provider_api::testing::{EmptyCatalog, check_all};
use provider_api::{
    AccessScope, BackupProvider, BackupVmRequest, BitmapMode, DirtySource, ErrorKind, Guest,
    JobInfo, Outcome, PreviousBackup, RestoreTarget, SnapshotAccess, Target,
};
use provider_ovirt::{BackupMode, OvirtProvider, WireFormat};
use scenarios::ovirt::*;
use serde_json::json;
use sha2::{Digest, Sha256};

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
    // The restored VM's configuration is its own: from the saved OVF, with
    // its id and its disks, none of the source's.
    let vm = env
        .api_get(&format!("/vms/{}?all_content=true", r.guest.id))
        .await;
    let data = vm["initialization"]["configuration"]["data"]
        .as_str()
        .unwrap();
    assert!(data.contains(&r.guest.id.0), "{data}");
    for d in &env.disks {
        assert!(!data.contains(d.as_str()), "{d} in {data}");
    }
    assert!(String::from_utf8_lossy(&ovf).contains(&env.disks[0]));
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
async fn incremental_streams_ranges_over_http_without_staging() {
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
    assert_eq!(env.staged_files(), Vec::<std::path::PathBuf>::new());
    assert_eq!(p.nbd_addresses(), vec![], "the NBD server stopped");
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

/// Issue 14: a disk is never staged. While a multi-disk VM is backed up
/// (full, then incremental) nothing appears on the local disk outside the
/// datastore, the job logs and the mock's own state; the backups restore
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_disk_incremental_stages_nothing_on_disk() {
    let env = Env::start("up").await;
    let vm = env
        .admin_post(
            "/admin/ovirt/vms",
            json!({"name": "multi", "disks": [
                {"size": 24 * MIB, "format": "cow", "alias": "m-os", "fill": [
                    {"offset": 0, "length": 8 * MIB, "pattern": "random", "seed": 31}]},
                {"size": 16 * MIB, "format": "cow", "alias": "m-db", "fill": [
                    {"offset": 4 * MIB, "length": 6 * MIB, "pattern": "random", "seed": 32}]},
                {"size": 8 * MIB, "format": "raw", "sparse": false, "alias": "m-raw", "fill": [
                    {"offset": 0, "length": 3 * MIB, "pattern": "random", "seed": 33}]}
            ]}),
        )
        .await;
    let vm_id = vm["id"].as_str().unwrap().to_owned();
    let disks: Vec<String> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    let p = env.provider(BackupMode::Incremental, WireFormat::Json);
    // Backs up `multi`, watching the directory while the job runs.
    async fn watched(env: &Env, p: Arc<OvirtProvider>, vm: &str) -> engine::GuestBackup {
        let job = env.backup_of(p.clone(), vm);
        tokio::pin!(job);
        let mut served = false;
        let mut report = loop {
            tokio::select! {
                r = &mut job => break r,
                () = tokio::time::sleep(Duration::from_millis(2)) => {
                    assert_eq!(env.staged_files(), Vec::<std::path::PathBuf>::new(), "during the backup");
                    served |= !p.nbd_addresses().is_empty();
                }
            }
        };
        assert!(served, "the disks were served over loopback NBD");
        match report.guests.remove(0).result {
            Ok(b) => b,
            Err(e) => panic!("backup failed: {}", e.report()),
        }
    }
    let full = watched(&env, p.clone(), &vm_id).await;
    assert_eq!(full.volumes.len(), 3);
    env.guest_write(&disks[0], 20 * MIB, MIB, 41).await;
    env.guest_write(&disks[1], 0, 2 * MIB, 42).await;
    let expected = env.shas(&disks).await;
    let inc = watched(&env, p.clone(), &vm_id).await;
    let modes: Vec<_> = inc.volumes.iter().map(|v| v.bitmap_mode).collect();
    assert_eq!(modes, [BitmapMode::Use, BitmapMode::Use, BitmapMode::None]);
    let read: Vec<_> = inc.volumes.iter().map(|v| v.stats.bytes_read).collect();
    assert_eq!(read, [MIB, 2 * MIB, 3 * MIB], "dirty extents only");
    assert_eq!(env.staged_files(), Vec::<std::path::PathBuf>::new());
    assert_eq!(p.nbd_addresses(), vec![]);
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    let r = env
        .restore(
            p.clone(),
            &inc.snapshot.id,
            RestoreTarget::NewGuest { name: None },
        )
        .await
        .unwrap_or_else(|e| panic!("restore failed: {}", e.report()));
    // Sorted by alias: m-db, m-os, m-raw.
    let ids: Vec<String> = env
        .disks_of(&r.guest.id.0)
        .into_iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(
        env.shas(&ids).await,
        vec![
            expected[1].clone(),
            expected[0].clone(),
            expected[2].clone()
        ]
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

/// Issue 14: the image server goes away in the middle of a disk (its
/// transfer stops serving after some bytes). The backup fails naming the
/// disk; the provider's NBD server is closed and every transfer and the
/// backup are finalized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_server_dying_mid_read_fails_naming_the_disk_and_leaves_nothing() {
    let env = Env::start("up").await;
    let vm = env
        .admin_post(
            "/admin/ovirt/vms",
            json!({"name": "doomed", "disks": [
                {"size": 48 * MIB, "format": "cow", "alias": "doomed-os", "fill": [
                    {"offset": 0, "length": 40 * MIB, "pattern": "random", "seed": 51}]},
                {"size": 4 * MIB, "format": "cow", "alias": "doomed-data", "fill": [
                    {"offset": 0, "length": MIB, "pattern": "random", "seed": 52}]}
            ]}),
        )
        .await;
    let vm_id = vm["id"].as_str().unwrap().to_owned();
    env.arm_nbd(json!({"export": "ovirt-transfer-", "kind": "disconnect", "after_bytes": 8 * MIB}))
        .await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    let job = env.backup_of(p.clone(), &vm_id);
    tokio::pin!(job);
    let mut addresses = Vec::new();
    let mut report = loop {
        tokio::select! {
            r = &mut job => break r,
            () = tokio::time::sleep(Duration::from_millis(2)) => {
                for a in p.nbd_addresses() {
                    if !addresses.contains(&a) {
                        addresses.push(a);
                    }
                }
            }
        }
    };
    let e = match report.guests.remove(0).result {
        Ok(_) => panic!("the backup succeeded"),
        Err(e) => e,
    };
    let msg = e.report();
    assert!(msg.contains("doomed-os"), "names the disk: {msg}");
    assert!(msg.contains("image server"), "says what failed: {msg}");
    assert!(!addresses.is_empty(), "the disks were served");
    assert_eq!(p.nbd_addresses(), vec![]);
    for a in addresses {
        assert!(
            tokio::net::TcpStream::connect(a).await.is_err(),
            "{a} still accepts connections"
        );
    }
    env.disarm().await;
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    let o = env.admin_get("/admin/ovirt/objects").await;
    assert_eq!(o["active_transfers"], json!([]));
    assert_eq!(o["active_backups"], json!([]));
}

/// An image server whose `OPTIONS` offers no `extents`: an incremental
/// that needs the dirty extents fails naming the transfer URL; a full
/// backup reads every byte and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_server_without_extents_fails_an_incremental_naming_the_url() {
    let env = Env::start("up").await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    env.arm(json!({"tamper": [{"method": "OPTIONS", "path": "/images/", "body": "{\"features\": []}"}]}))
        .await;
    let full = env.backup_ok(p.clone()).await;
    let read: Vec<_> = full.volumes.iter().map(|v| v.stats.bytes_read).collect();
    assert_eq!(read, [16 * MIB, 8 * MIB], "no extents: every byte read");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    env.guest_write(&env.disks[0], 0, MIB, 61).await;
    let e = env.backup_err(p.clone()).await;
    let msg = e.report();
    assert!(
        msg.contains("does not offer extents")
            && msg.contains("/images/")
            && msg.contains("volume system"),
        "{msg}"
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    assert_eq!(p.nbd_addresses(), vec![]);
    env.disarm().await;
    let inc = env.backup_ok(p.clone()).await;
    assert_eq!(inc.volumes[0].bitmap_mode, BitmapMode::Use);
}

/// Regression (issue 12): the host turns the provider's `Use` into a full
/// read when the previous backup holds the disk at another size (a resize
/// since). The export serves the whole point-in-time image, so a full
/// read gets every byte. The previous backup is handed to the provider as
/// a host sees it after a resize: the system disk recorded at another
/// size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_the_host_reads_in_full_is_served_in_full() {
    let env = Env::start_with("up", |c| c.ovirt.transfer_nbd_url = false).await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    let full = env.backup_ok(p.clone()).await;
    env.guest_write(&env.disks[0], 5 * MIB, MIB, 21).await;
    env.guest_write(&env.disks[0], 9 * MIB, MIB, 22).await;
    let expected = env.sha(&env.disks[0]).await;

    let mut snapshot = full.snapshot.clone();
    let stored = snapshot
        .volumes
        .iter_mut()
        .find(|v| v.volume.device == "system")
        .unwrap();
    stored.volume.size = 8 * MIB;
    let metadata = env
        .store
        .open_snapshot(&snapshot.id)
        .await
        .unwrap()
        .metadata()
        .await
        .unwrap();
    let previous = PreviousBackup::new(snapshot, metadata);
    let guest = Guest::vm(env.vm.clone());
    p.job_init(&JobInfo::new("resized", 1)).await.unwrap();
    p.backup_init(&guest, 1_800_000_000).await.unwrap();
    let plan = p
        .backup_vm_query_incremental(&guest, Some(&previous))
        .await
        .unwrap();
    assert_eq!(plan.get("system"), Some(&BitmapMode::Use));
    let request = BackupVmRequest::new(plan, Some(previous), Arc::new(EmptyCatalog));
    let b = p
        .backup_vm(&guest, request)
        .await
        .unwrap_or_else(|e| panic!("backup_vm: {}", e.report()));
    let v = &b.volumes[0];
    assert_eq!(v.volume.device, "system");
    assert_eq!(v.bitmap_mode, BitmapMode::New, "the host reads it in full");
    assert_eq!(v.scope, AccessScope::Whole);
    assert!(matches!(v.dirty, DirtySource::All), "{:?}", v.dirty);
    let SnapshotAccess::Nbd(n) = &v.access else {
        panic!("expected NBD access, got {:?}", v.access)
    };
    assert_eq!(n.dirty_bitmap_context, None);
    let served = read_export(n, 16 * MIB).await;
    let served: String = Sha256::digest(&served)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(served, expected, "the export serves the whole disk");
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("system") && w.contains("another size")),
        "{:?}",
        b.warnings
    );
    p.backup_cleanup(&guest, &Outcome::ok()).await.unwrap();
    p.job_cleanup().await.unwrap();
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

/// Every byte of an NBD export, read in 4 MiB pieces.
async fn read_export(n: &provider_api::NbdAccess, size: u64) -> Vec<u8> {
    let c = nbd::client::Client::connect(&options_of(n, &[]))
        .await
        .unwrap();
    assert_eq!(c.size(), size);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = (size - pos).min(4 * MIB);
        out.extend_from_slice(&c.read(pos, len as usize).await.unwrap());
        pos += len;
    }
    out
}

fn options_of(n: &provider_api::NbdAccess, contexts: &[&str]) -> nbd::client::ConnectOptions {
    let provider_api::NbdAddress::Tcp { host, port } = &n.address else {
        panic!("expected TCP, got {:?}", n.address)
    };
    assert_eq!(host, "127.0.0.1", "loopback only");
    let mut o = nbd::client::ConnectOptions::new(
        nbd::client::Address::Tcp {
            host: host.clone(),
            port: *port,
        },
        n.export.clone(),
    );
    for c in contexts {
        o = o.meta_context(*c);
    }
    o
}

/// When the host reads only the changes, the export offers them as a
/// qemu dirty bitmap (from the image server's dirty extents) next to
/// `base:allocation`, and the access still holds the whole disk. After
/// `backup_cleanup` nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_access_is_loopback_nbd_with_the_dirty_bitmap() {
    let env = Env::start_with("up", |c| c.ovirt.transfer_nbd_url = false).await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Json);
    let full = env.backup_ok(p.clone()).await;
    env.guest_write(&env.disks[0], 5 * MIB, MIB, 21).await;
    let metadata = env
        .store
        .open_snapshot(&full.snapshot.id)
        .await
        .unwrap()
        .metadata()
        .await
        .unwrap();
    let previous = PreviousBackup::new(full.snapshot.clone(), metadata);
    let guest = Guest::vm(env.vm.clone());
    p.job_init(&JobInfo::new("dirty-only", 1)).await.unwrap();
    p.backup_init(&guest, 1_800_000_000).await.unwrap();
    let plan = p
        .backup_vm_query_incremental(&guest, Some(&previous))
        .await
        .unwrap();
    let request = BackupVmRequest::new(plan, Some(previous), Arc::new(EmptyCatalog));
    let b = p.backup_vm(&guest, request).await.unwrap();
    let scopes: Vec<_> = b.volumes.iter().map(|v| (v.bitmap_mode, v.scope)).collect();
    assert_eq!(
        scopes,
        [
            (BitmapMode::Use, AccessScope::Whole),
            (BitmapMode::None, AccessScope::Whole)
        ]
    );
    assert!(matches!(b.volumes[0].dirty, DirtySource::NbdBitmap));
    assert!(matches!(b.volumes[1].dirty, DirtySource::All));
    let SnapshotAccess::Nbd(n) = &b.volumes[0].access else {
        panic!("expected NBD access, got {:?}", b.volumes[0].access)
    };
    let bitmap = n.dirty_bitmap_context.clone().expect("a dirty bitmap");
    assert!(bitmap.starts_with("qemu:dirty-bitmap:"), "{bitmap}");
    let c = nbd::client::Client::connect(&options_of(n, &["base:allocation", &bitmap]))
        .await
        .unwrap();
    let dirty: Vec<_> = c
        .block_status(0, 16 * MIB, &bitmap)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.is_dirty())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, [(5 * MIB, MIB)]);
    // The last 2 MiB were never written: no data there.
    let alloc = c
        .block_status(14 * MIB, 2 * MIB, "base:allocation")
        .await
        .unwrap();
    assert!(alloc.iter().all(|e| e.is_zero()), "{alloc:?}");
    drop(c);
    let SnapshotAccess::Nbd(raw) = &b.volumes[1].access else {
        panic!("expected NBD access, got {:?}", b.volumes[1].access)
    };
    assert_eq!(raw.dirty_bitmap_context, None);
    let addresses = p.nbd_addresses();
    assert_eq!(addresses.len(), 1);
    p.backup_cleanup(&guest, &Outcome::ok()).await.unwrap();
    assert_eq!(p.nbd_addresses(), vec![]);
    assert!(tokio::net::TcpStream::connect(addresses[0]).await.is_err());
    p.job_cleanup().await.unwrap();
    assert_eq!(env.leftovers().await, Vec::<String>::new());
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
async fn attached_disk_never_appearing_by_id_times_out_naming_disk_and_directory() {
    // The appliance never sees the attached disk under /dev/disk/by-id.
    let env = Env::start_with("up", |c| c.ovirt.device_links = false).await;
    let mut o = env.options(BackupMode::SnapshotAttach, WireFormat::Xml);
    o.operation_timeout = Duration::from_millis(400);
    let root = o.device_root.clone();
    let started = std::time::Instant::now();
    let e = env
        .backup_err(Arc::new(OvirtProvider::new(o).unwrap()))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(e.kind(), ErrorKind::Timeout, "{}", e.report());
    let msg = e.report();
    let first = &env.disks[0];
    assert!(msg.contains(&format!("disk {first}")), "{msg}");
    assert!(msg.contains(&root.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("virtio-{}", &first[..20])), "{msg}");
    assert!(msg.contains(&format!("guest {}", env.vm)), "{msg}");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    let o = env.admin_get("/admin/ovirt/objects").await;
    assert!(
        o["backup_attachments"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{o}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_attach_finds_disks_by_id_not_by_logical_name() {
    // logical_name is the guest's /dev/vdX (reported late), which does not
    // exist here: the backup reads the disks through their by-id links.
    let env = Env::start("up").await;
    let ep = &env.mock.endpoints().platforms["ovirt"];
    let root = std::path::PathBuf::from(ep["device_root"].as_str().unwrap());
    let p = env.provider(BackupMode::SnapshotAttach, WireFormat::Json);
    env.backup_ok(p).await;
    // Detached: no link left.
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "{}",
        root.display()
    );
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

    // Answers that parse but miss (or garble) a field the provider acts
    // on: an error naming the call and the field, never a default.
    for (method, path, field, value, mode, format, call) in [
        (
            "GET",
            "/disks/",
            "provisioned_size",
            None,
            BackupMode::SnapshotAttach,
            WireFormat::Xml,
            "GET /disks/",
        ),
        (
            "GET",
            "/disks/",
            "provisioned_size",
            Some("ten"),
            BackupMode::Incremental,
            WireFormat::Json,
            "GET /disks/",
        ),
        (
            "GET",
            "/disks/",
            "sparse",
            None,
            BackupMode::Incremental,
            WireFormat::Xml,
            "GET /disks/",
        ),
        (
            "GET",
            "/diskattachments",
            "interface",
            None,
            BackupMode::SnapshotAttach,
            WireFormat::Json,
            "/diskattachments",
        ),
        (
            "GET",
            "/diskattachments",
            "bootable",
            Some("maybe"),
            BackupMode::Incremental,
            WireFormat::Xml,
            "/diskattachments",
        ),
        (
            "GET",
            "/snapshots/",
            "snapshot_status",
            None,
            BackupMode::SnapshotAttach,
            WireFormat::Xml,
            "GET /vms/",
        ),
        (
            "GET",
            "/backups/",
            "phase",
            None,
            BackupMode::Incremental,
            WireFormat::Json,
            "/backups/",
        ),
        (
            "GET",
            "/imagetransfers/",
            "phase",
            None,
            BackupMode::Incremental,
            WireFormat::Xml,
            "GET /imagetransfers/",
        ),
        (
            "POST",
            "/snapshots",
            "id",
            None,
            BackupMode::SnapshotAttach,
            WireFormat::Xml,
            "POST /vms/",
        ),
        (
            "GET",
            "/ovirt-engine/api",
            "minor",
            None,
            BackupMode::Auto,
            WireFormat::Xml,
            "GET /",
        ),
    ] {
        let what = format!("{method} {path} {field}={value:?} ({mode:?}, {format:?})");
        // The API root's path is in every call's: alter every answer.
        let times = (path != "/ovirt-engine/api").then_some(1);
        env.arm(json!({"tamper": [{"method": method, "path": path, "field": field, "value": value, "times": times}]}))
            .await;
        let mut report = env.backup(env.provider(mode, format)).await;
        let e = match report.init_error.take() {
            Some(e) => e,
            None => match report.guests.remove(0).result {
                Ok(_) => panic!("{what}: backup succeeded"),
                Err(e) => e,
            },
        };
        let msg = e.report();
        assert_eq!(e.kind(), ErrorKind::Platform, "{what}: {msg}");
        assert!(msg.contains(field) && msg.contains(call), "{what}: {msg}");
        env.disarm().await;
        assert_eq!(env.leftovers().await, Vec::<String>::new(), "{what}");
    }

    // Extents that are not a list, or miss a field: an error, never
    // "nothing changed" (incremental without NBD access).
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    env.backup_ok(p.clone()).await;
    env.guest_write(&env.disks[0], 0, MIB, 3).await;
    for tamper in [
        json!({"path": "/extents", "body": "{\"extents\": []}", "times": 1}),
        json!({"path": "/extents", "field": "dirty", "times": 1}),
        json!({"path": "/extents", "body": "[]", "times": 1}),
    ] {
        env.arm(json!({"tamper": [tamper.clone()]})).await;
        let e = env.backup_err(p.clone()).await;
        let msg = e.report();
        assert!(
            msg.contains("extents?context=dirty") && e.kind() == ErrorKind::Platform,
            "{tamper}: {msg}"
        );
        env.disarm().await;
        assert_eq!(env.leftovers().await, Vec::<String>::new(), "{tamper}");
    }

    // Afterwards a backup works again.
    env.backup_ok(env.provider(BackupMode::Incremental, WireFormat::Xml))
        .await;
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

// ------------------------------------------------ interrupted jobs

/// What the mock holds that carries `marker` in a description.
async fn marked(env: &Env, marker: &str) -> Vec<String> {
    let o = env.admin_get("/admin/ovirt/objects").await;
    let mut out = Vec::new();
    for key in ["snapshots", "active_backups", "active_transfers"] {
        for item in o[key].as_array().cloned().unwrap_or_default() {
            if item["description"]
                .as_str()
                .is_some_and(|d| d.contains(marker))
            {
                out.push(format!("{key}: {}", item["id"]));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_init_sweeps_what_an_interrupted_job_of_this_host_left() {
    let env = Env::start("up").await;
    for mode in [BackupMode::Incremental, BackupMode::SnapshotAttach] {
        // Job A of host-1 dies after backup_vm: snapshot and attachments,
        // or a backup left `ready` and its transfers, stay behind.
        let dead = JobInfo::new("job-a", 1).on_host("host-1", []);
        env.interrupted_backup(&env.provider(mode, WireFormat::Xml), &dead)
            .await;
        let left = env.leftovers().await;
        assert!(!left.is_empty(), "{mode:?}");
        let tagged = marked(&env, "vmbackup.host-1.job-a").await;
        assert!(
            !tagged.is_empty(),
            "{mode:?}: objects carry the marker: {left:?}"
        );
        if mode == BackupMode::Incremental {
            // A backup left ready makes every later backup of the VM fail.
            let e = env
                .backup_err(env.provider(BackupMode::Incremental, WireFormat::Xml))
                .await;
            assert!(e.report().contains("in progress"), "{}", e.report());
        }

        // Another host's job, and a job of host-1 that knows job-a still
        // runs, leave them alone.
        for job in [
            JobInfo::new("job-b", 2).on_host("host-2", []),
            JobInfo::new("job-b", 2).on_host("host-1", ["job-a".to_string()]),
        ] {
            let p = env.provider(mode, WireFormat::Json);
            p.job_init(&job).await.unwrap();
            p.job_cleanup().await.unwrap();
            assert_eq!(env.leftovers().await, left, "{mode:?}: {job:?}");
        }

        // The next job of host-1 sweeps them, and backups work again.
        let p = env.provider(mode, WireFormat::Json);
        p.job_init(&JobInfo::new("job-c", 3).on_host("host-1", []))
            .await
            .unwrap();
        p.job_cleanup().await.unwrap();
        assert_eq!(env.leftovers().await, Vec::<String>::new(), "{mode:?}");
        env.backup_ok(env.provider(mode, WireFormat::Xml)).await;
        assert_eq!(env.leftovers().await, Vec::<String>::new(), "{mode:?}");
    }
}

// ---------------------------------------------------------- retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_503s_are_retried_and_persistent_ones_reported() {
    let env = Env::start_with("up", |c| c.ovirt.transfer_nbd_url = false).await;
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    env.backup_ok(p.clone()).await;
    env.guest_write(&env.disks[0], 2 * MIB, MIB, 8).await;
    let expected = env.shas(&env.disks).await;
    // Twice 503 on the engine's GETs and on the image server's extents,
    // then a 502 on the image server (the extents' third attempt).
    env.arm_http(json!({"method": "GET", "path": "/diskattachments", "status": 503, "times": 2}))
        .await;
    env.arm_http(json!({"method": "GET", "path": "/imagetransfers/", "status": 503, "times": 2}))
        .await;
    env.arm_http(json!({"method": "GET", "path": "/extents", "status": 503, "times": 2}))
        .await;
    env.arm_http(json!({"method": "GET", "path": "/images/", "status": 502, "times": 1}))
        .await;
    let inc = env.backup_ok(p.clone()).await;
    assert_eq!(inc.volumes[0].bitmap_mode, BitmapMode::Use);
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

    // A 503 that does not go away: reported with the call.
    env.arm_http(json!({"method": "GET", "path": "/diskattachments", "status": 503}))
        .await;
    let e = env.backup_err(p.clone()).await;
    let msg = e.report();
    assert!(
        msg.contains("503") && msg.contains("GET /vms/") && msg.contains("/diskattachments"),
        "{msg}"
    );
    env.disarm().await;
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    // A 500 is not retried: the engine failed, it is not busy.
    env.arm_http(json!({"method": "GET", "path": "/diskattachments", "status": 500, "times": 1}))
        .await;
    let e = env.backup_err(p.clone()).await;
    assert!(e.report().contains("500"), "{}", e.report());
    env.disarm().await;
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

/// The engine is reached over HTTPS only, its certificate checked against
/// `tls_ca`: another CA (or none, the system's roots) is refused with an
/// error naming the host, and plain HTTP is refused by the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_is_refused_naming_the_host() {
    let env = Env::start("up").await;
    let ep = &env.mock.endpoints().platforms["ovirt"];
    let base = ep["base_url"].as_str().unwrap().to_owned();
    assert!(base.starts_with("https://"), "{base}");
    let host = base
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let other = mock_hypervisor::tls::ensure(&env.dir.path().join("other-ca"), &[]).unwrap();
    for ca in [Some(other.ca_cert.clone()), None] {
        let mut o = env.options(BackupMode::Incremental, WireFormat::Xml);
        o.tls_ca = ca.clone();
        let p = OvirtProvider::new(o).unwrap();
        let e = p
            .job_init(&JobInfo::new("tls", 1_700_000_000))
            .await
            .unwrap_err();
        let m = e.report();
        assert!(
            m.contains(&host) && m.contains("certificate"),
            "{ca:?}: {m}"
        );
    }
    // The right CA works.
    let p = env.provider(BackupMode::Incremental, WireFormat::Xml);
    p.job_init(&JobInfo::new("tls", 1_700_000_000))
        .await
        .unwrap();
    p.job_cleanup().await.unwrap();
    // Plain HTTP to the engine is refused.
    let plain = format!("{}/ovirt-engine/api", env.mock.endpoints().http_url);
    let r = reqwest::get(&plain).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN);
}

// ------------------------------------------- restore to a new VM (issue 14)

/// VM ids and disk ids in the mock's inventory.
fn objects(env: &Env) -> (Vec<String>, Vec<String>) {
    env.mock.ovirt().inventory().read(|doc| {
        (
            doc.vms.keys().cloned().collect(),
            doc.disks.keys().cloned().collect(),
        )
    })
}

/// `(memory, cpus)` of a VM.
fn hardware(env: &Env, vm: &str) -> (u64, u32) {
    env.mock
        .ovirt()
        .inventory()
        .read(|doc| doc.vms.get(vm).map(|v| (v.memory, v.cpu_cores)))
        .unwrap_or_else(|| panic!("no VM {vm}"))
}

/// Restores `snapshot` to a new VM `name` and checks it against the
/// source: exactly new disks, with the source's alias, format, interface,
/// bootable flag and bytes, the source's memory and CPUs.
async fn restore_new_and_check(
    env: &Env,
    p: Arc<OvirtProvider>,
    snapshot: &provider_api::SnapshotId,
    name: &str,
    source: &[(String, String, String, String, bool)],
    shas: &[String],
    not_ids: &[String],
) -> String {
    let r = env
        .restore(
            p,
            snapshot,
            RestoreTarget::NewGuest {
                name: Some(name.into()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("restore failed: {}", e.report()));
    let id = r.guest.id.0.clone();
    let vm = env.api_get(&format!("/vms/{id}")).await;
    assert_eq!(vm["name"], json!(name), "{vm}");
    let restored = env.disks_of(&id);
    assert_eq!(restored.len(), source.len(), "{restored:?}");
    for (a, b) in restored.iter().zip(source) {
        assert_eq!(
            (&a.0, &a.2, &a.3, a.4),
            (&b.0, &b.2, &b.3, b.4),
            "alias, format, interface, bootable"
        );
        assert!(!not_ids.contains(&a.1), "disk {} is not a new disk", a.1);
    }
    let ids: Vec<String> = restored.iter().map(|d| d.1.clone()).collect();
    assert_eq!(env.shas(&ids).await, shas);
    assert_eq!(hardware(env, &id), hardware(env, &env.vm), "memory, CPUs");
    // Its configuration names it and its disks, none of the source's.
    let full = env.api_get(&format!("/vms/{id}?all_content=true")).await;
    let ovf = full["initialization"]["configuration"]["data"]
        .as_str()
        .unwrap();
    assert!(ovf.contains(&id), "{ovf}");
    for d in not_ids {
        assert!(!ovf.contains(d.as_str()), "{d} in {ovf}");
    }
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_vm_restore_gets_new_disks_whether_the_source_keeps_its_disks_or_not() {
    let env = Env::start("down").await;
    let before = env.shas(&env.disks).await;
    let source = env.disks_of(&env.vm);
    let source_hw = hardware(&env, &env.vm);
    let p = env.provider(BackupMode::SnapshotAttach, WireFormat::Xml);
    let b = env.backup_ok(p.clone()).await;
    // Sorted by alias: data, system.
    let shas = vec![before[1].clone(), before[0].clone()];

    // 1. The source VM still has its disks.
    let r1 = restore_new_and_check(
        &env,
        p.clone(),
        &b.snapshot.id,
        "r1",
        &source,
        &shas,
        &env.disks,
    )
    .await;
    assert_ne!(r1, env.vm);
    assert_eq!(env.disks_of(&env.vm), source, "the source VM is untouched");
    assert_eq!(env.shas(&env.disks).await, before);
    assert_eq!(hardware(&env, &env.vm), source_hw);
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // 2. The source's disks detached (an operator did): the engine would
    // attach every disk the OVF names; the restored VM still gets only
    // new disks and the source's stay detached.
    env.mock
        .ovirt()
        .inventory()
        .update(|doc| {
            doc.attachments.retain(|_, a| a.vm_id != env.vm);
            Ok(())
        })
        .unwrap();
    let mut not = env.disks.clone();
    not.extend(env.disks_of(&r1).into_iter().map(|d| d.1));
    let r2 =
        restore_new_and_check(&env, p.clone(), &b.snapshot.id, "r2", &source, &shas, &not).await;
    assert_ne!(r2, r1);
    let (_, disks) = objects(&env);
    for d in &env.disks {
        assert!(disks.contains(d), "source disk {d} still exists");
        let owner = env
            .mock
            .ovirt()
            .inventory()
            .read(|doc| doc.owner_of(d).map(|a| a.vm_id.clone()));
        assert_eq!(owner, None, "source disk {d} stays detached");
    }
    assert_eq!(env.shas(&env.disks).await, before);
    let events = env.api_get("/events").await.to_string();
    assert!(!events.contains("Failed to attach"), "{events}");
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_vm_restore_that_fails_leaves_no_vm_and_no_new_disk() {
    let env = Env::start("up").await;
    let p = env.provider(BackupMode::SnapshotAttach, WireFormat::Json);
    let b = env.backup_ok(p.clone()).await;
    let source = env.disks_of(&env.vm);
    let start = objects(&env);
    let target = |name: &str| RestoreTarget::NewGuest {
        name: Some(name.into()),
    };

    // A name in use: refused before anything is created.
    let e = env
        .restore(p.clone(), &b.snapshot.id, target("vm1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{}", e.report());
    assert!(
        e.report().contains("a VM named vm1 exists"),
        "{}",
        e.report()
    );
    assert_eq!(objects(&env), start);

    // The second disk's attachment to the appliance fails.
    env.arm(json!({"attach_fail_after": 1})).await;
    let e = env
        .restore(p.clone(), &b.snapshot.id, target("r-attach"))
        .await
        .unwrap_err();
    assert!(e.report().contains("hot plugging"), "{}", e.report());
    env.disarm().await;
    assert_eq!(objects(&env), start);
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // The disks written, the VM created, then attaching them fails (the
    // engine's import and the provider's attachments alike).
    env.arm(json!({"attach_fail_after": 2})).await;
    let e = env
        .restore(p.clone(), &b.snapshot.id, target("r-late"))
        .await
        .unwrap_err();
    assert!(e.report().contains("hot plugging"), "{}", e.report());
    env.disarm().await;
    assert_eq!(objects(&env), start);
    let events = env.api_get("/events").await.to_string();
    assert!(
        events.contains("Failed to attach Disk(s) system, data to VM r-late"),
        "{events}"
    );
    assert_eq!(env.leftovers().await, Vec::<String>::new());

    // The engine answers another VM id than the OVF gives (the two
    // attachments to the appliance match the path too; their answers are
    // not read).
    env.arm(
        json!({"tamper": [{"method": "POST", "path": "api/vms", "field": "id",
        "value": "00000000-0000-4000-8000-000000000000", "times": 3}]}),
    )
    .await;
    let e = env
        .restore(p.clone(), &b.snapshot.id, target("r-id"))
        .await
        .unwrap_err();
    assert!(e.report().contains("the engine created"), "{}", e.report());
    env.disarm().await;
    assert_eq!(objects(&env), start);
    assert_eq!(env.leftovers().await, Vec::<String>::new());
    assert_eq!(env.disks_of(&env.vm), source, "the source VM is untouched");
}
