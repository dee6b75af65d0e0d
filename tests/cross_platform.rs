//! Restores across platforms. A snapshot of an imported appliance (its
//! configuration a platform-neutral guest spec) restores onto the ZStack,
//! oVirt and SCP mocks; an oVirt backup restores onto ZStack and an SCP
//! backup onto oVirt (platform backups store a spec beside the platform's
//! own configuration). Every case compares the restored disks' SHA-256
//! with the source's and the mapped CPUs and memory with the source's; a
//! target that needs a choice the snapshot cannot make (ZStack's networks,
//! oVirt's storage domain) fails naming the option and leaves nothing on
//! the platform, and so does a restore that fails half-way (a disk that
//! cannot be attached, before or after the VM is added); what a platform
//! cannot take is a warning of the restore.

use std::path::Path;
use std::sync::Arc;

use appliance::import::{Appliance, OvaProvider};
use appliance::ovf::ExportDisk;
use appliance::spec::{Bus, DiskSpec, Firmware, GuestSpec, NicSpec};
use datastore::Datastore;
use engine::{BackupDriver, JobOptions, StandardMover};
use provider_api::{BackupProvider, ConfigKind, Guest, JobInfo, RestoreTarget, SnapshotId, Target};
use provider_ovirt::{BackupMode, OvirtProvider, WireFormat};
use provider_zstack::ZStackOptions;
use scenarios::zstack::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "{tool} is required when CI is set"
    );
    ok
}

/// A raw disk of `size` bytes with noise at both ends and in the middle.
fn disk(path: &Path, size: u64, seed: u8) -> String {
    let mut data = vec![0u8; size as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed as u64;
    let mut noise = |range: std::ops::Range<usize>, data: &mut [u8]| {
        for b in &mut data[range] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    };
    let n = data.len();
    noise(0..100_000, &mut data);
    noise(n / 2 - 5000..n / 2 + 5000, &mut data);
    noise(n - 7000..n, &mut data);
    std::fs::write(path, &data).unwrap();
    hex(&Sha256::digest(&data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OVA of two disks (streamOptimized VMDKs) written by the appliance
/// crate's own writers; the source disks' digests.
fn appliance(dir: &Path) -> (std::path::PathBuf, GuestSpec, Vec<String>) {
    let sizes = [24 * MIB + 4096, 6 * MIB];
    let mut digests = Vec::new();
    let mut files = Vec::new();
    let mut disks = Vec::new();
    let mut spec = GuestSpec {
        name: "appliance-web".into(),
        os: Some("Debian 12 (64-bit)".into()),
        firmware: Firmware::Bios,
        cpus: 3,
        memory_mib: 1536,
        disks: Vec::new(),
        nics: vec![NicSpec {
            model: Some("VmxNet3".into()),
            mac: Some("00:50:56:01:02:03".into()),
            network: Some("dmz".into()),
        }],
    };
    for (n, size) in sizes.into_iter().enumerate() {
        let raw = dir.join(format!("d{n}.raw"));
        digests.push(disk(&raw, size, n as u8 + 1));
        let vmdk = dir.join(format!("web-disk{n}.vmdk"));
        let ok = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
            ])
            .arg(&raw)
            .arg(&vmdk)
            .status()
            .unwrap();
        assert!(ok.success());
        let d = DiskSpec {
            device: format!("disk{n}"),
            size,
            bus: Bus::Scsi,
            controller: None,
            boot_order: None,
        };
        disks.push(ExportDisk {
            spec: d.clone(),
            href: format!("web-disk{n}.vmdk"),
            file_size: std::fs::metadata(&vmdk).unwrap().len(),
        });
        spec.disks.push(d);
        files.push((format!("web-disk{n}.vmdk"), vmdk));
    }
    let ova = dir.join("web.ova");
    appliance::ova::write(
        &ova,
        "web.ovf",
        appliance::ovf::write(&spec, &disks).as_bytes(),
        &files,
    )
    .unwrap();
    (ova, spec, digests)
}

/// Imports the OVA at `ova` into `store` (its disks through qemu-nbd);
/// the snapshot.
async fn import(ova: &Path, store: &Arc<Datastore>, dir: &Path) -> SnapshotId {
    let loaded = Appliance::load(ova, None).unwrap();
    let importer = Arc::new(OvaProvider::new("web", loaded, dir.join("sockets")));
    backup_into(importer, store, "web", dir).await
}

/// Backs up guest `guest` with `provider` into `store` (whatever the
/// provider's platform): the snapshot.
async fn backup_into(
    provider: Arc<dyn BackupProvider>,
    store: &Arc<Datastore>,
    guest: &str,
    dir: &Path,
) -> SnapshotId {
    let report = BackupDriver::new(
        provider,
        store.clone() as Arc<dyn Target>,
        Arc::new(StandardMover::default()),
    )
    .run_job(
        &JobOptions {
            info: JobInfo::new("cross", now()),
            parallelism: 1,
            log_dir: dir.join("logs"),
        },
        vec![Guest::vm(guest)],
    )
    .await;
    assert_ok(&report);
    snapshot_of(&report, 0)
}

/// The spec stored beside a platform backup's configuration.
async fn stored_spec(store: &Arc<Datastore>, snapshot: &SnapshotId) -> GuestSpec {
    let reader = store.open_snapshot(snapshot).await.unwrap();
    let blob = reader
        .config(ConfigKind::Spec)
        .await
        .unwrap()
        .expect("a platform backup stores a guest spec");
    GuestSpec::from_config(&blob).unwrap().unwrap()
}

/// A number the oVirt API gives as a number or a decimal string.
fn num(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

/// CPUs and memory (MiB) of an oVirt VM as the engine API shows it.
async fn ovirt_hardware(ov: &scenarios::ovirt::Env, vm: &str) -> (u64, u64) {
    let v = ov.api_get(&format!("/vms/{vm}")).await;
    let t = &v["cpu"]["topology"];
    (
        num(&t["sockets"]) * num(&t["cores"]) * num(&t["threads"]),
        num(&v["memory"]) >> 20,
    )
}

/// An oVirt provider for `ov`'s mock that restores onto its storage
/// domain `data` and its network `ovirtmgmt`.
fn ovirt_target(ov: &scenarios::ovirt::Env) -> Arc<OvirtProvider> {
    let mut o = ov.options(BackupMode::Auto, WireFormat::Json);
    o.storage_domain = Some("data".into());
    o.network = Some("ovirtmgmt".into());
    Arc::new(OvirtProvider::new(o).unwrap())
}

/// The restored oVirt VM's disks in the snapshot's order (their aliases
/// are `<name>-<device>`): (disk id, format, interface, bootable).
fn restored_disks(
    ov: &scenarios::ovirt::Env,
    vm: &str,
    name: &str,
    devices: &[&str],
) -> Vec<(String, String, String, bool)> {
    let disks = ov.disks_of(vm);
    devices
        .iter()
        .map(|dev| {
            let alias = format!("{name}-{dev}");
            let (_, id, format, interface, boot) = disks
                .iter()
                .find(|d| d.0 == alias)
                .unwrap_or_else(|| panic!("no restored disk {alias} in {disks:?}"))
                .clone();
            (id, format, interface, boot)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_appliance_restores_onto_zstack_with_identical_disks() {
    if !(have("qemu-img") && have("qemu-nbd")) {
        return;
    }
    let zs = Zs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ova, spec, digests) = appliance(dir.path());

    // Import: the appliance's disks through qemu-nbd into the datastore.
    let snapshot = import(&ova, &zs.env.store, dir.path()).await;

    // Without a target network the restore names the option and leaves
    // nothing behind.
    let e = zs
        .restore(zs.provider(), &snapshot, "web-restored")
        .await
        .unwrap_err();
    assert!(e.report().contains("l3_network_uuids"), "{}", e.report());
    zs.assert_no_leftovers().await;

    // With one, the VM is created from the spec and its disks hold the
    // appliance's bytes.
    let (_, l3) = zs.default_offering_and_l3().await;
    let provider = zs.provider_with(ZStackOptions {
        l3_network_uuids: vec![l3.clone()],
        ..zs.options()
    });
    let restored = zs
        .restore(provider, &snapshot, "web-restored")
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    let vm = restored.guest.id.0.clone();
    assert_eq!(zs.digests(&vm).await, digests, "restored volumes");
    let p = zs.provider();
    p.client().login().await.unwrap();
    let hits: Vec<serde_json::Value> = p
        .client()
        .query("/vm-instances", &[format!("uuid={vm}")])
        .await
        .unwrap();
    let inv = &hits[0];
    assert_eq!(inv["cpuNum"], spec.cpus);
    assert_eq!(inv["memorySize"], spec.memory_mib << 20);
    assert_eq!(inv["defaultL3NetworkUuid"], l3.as_str());
    assert_eq!(inv["name"], "web-restored");
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_appliance_restores_onto_ovirt_and_scp_with_identical_disks() {
    if !(have("qemu-img") && have("qemu-nbd")) {
        return;
    }
    let ov = scenarios::ovirt::Env::start("down").await;
    let dir = tempfile::tempdir().unwrap();
    let (ova, spec, digests) = appliance(dir.path());
    let snapshot = import(&ova, &ov.store, dir.path()).await;

    // oVirt: without a storage domain the snapshot names none of this
    // engine's; the restore says which option is missing and creates
    // nothing.
    let e = ov
        .restore(
            ov.provider(BackupMode::Auto, WireFormat::Json),
            &snapshot,
            RestoreTarget::NewGuest {
                name: Some("web-ovirt".into()),
            },
        )
        .await
        .unwrap_err();
    assert!(e.report().contains("storage_domain"), "{}", e.report());
    assert_eq!(ov.leftovers().await, Vec::<String>::new());

    let r = ov
        .restore(
            ovirt_target(&ov),
            &snapshot,
            RestoreTarget::NewGuest {
                name: Some("web-ovirt".into()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    let vm = r.guest.id.0.clone();
    let disks = restored_disks(&ov, &vm, "appliance-web", &["disk0", "disk1"]);
    let ids: Vec<String> = disks.iter().map(|d| d.0.clone()).collect();
    assert_eq!(ov.shas(&ids).await, digests, "restored oVirt disks");
    // SCSI → virtio_scsi; thin qcow2 disks ready for incremental backup;
    // no boot disk named: the first boots.
    for (n, (_, format, interface, boot)) in disks.iter().enumerate() {
        assert_eq!(
            (format.as_str(), interface.as_str(), *boot),
            ("cow", "virtio_scsi", n == 0)
        );
    }
    assert_eq!(
        ovirt_hardware(&ov, &vm).await,
        (u64::from(spec.cpus), spec.memory_mib)
    );
    // The NIC on the target's network (its vNIC profile), virtio for the
    // VmxNet3 oVirt does not emulate, a MAC from the engine's pool.
    let nics = ov.api_get(&format!("/vms/{vm}/nics")).await;
    let nic = &nics["nic"][0];
    assert_eq!(nics["nic"].as_array().map(Vec::len), Some(1), "{nics}");
    assert_eq!(nic["interface"], "virtio");
    let profile = nic["vnic_profile"]["id"].as_str().expect("a vNIC profile");
    let profile = ov.api_get(&format!("/vnicprofiles/{profile}")).await;
    assert_eq!(profile["name"], "ovirtmgmt");
    assert_ne!(nic["mac"]["address"], spec.nics[0].mac.as_deref().unwrap());
    let warned = |text: &str| r.warnings.iter().any(|w| w.contains(text));
    assert!(
        warned("VmxNet3") && warned("MAC") && warned("other_linux"),
        "{:?}",
        r.warnings
    );
    assert_eq!(ov.leftovers().await, Vec::<String>::new());

    // Backed up on oVirt in turn, the restored VM's spec is the
    // appliance's as oVirt holds it: same CPUs, memory and disks, its NIC
    // on the vNIC profile it got.
    let again = backup_into(
        ov.provider(BackupMode::Auto, WireFormat::Json),
        &ov.store,
        &vm,
        dir.path(),
    )
    .await;
    let held = stored_spec(&ov.store, &again).await;
    assert_eq!(
        (held.cpus, held.memory_mib, held.disks.len()),
        (spec.cpus, spec.memory_mib, 2)
    );
    assert_eq!(held.nics.len(), 1);
    assert_eq!(held.nics[0].model.as_deref(), Some("virtio"));
    assert_eq!(held.nics[0].network.as_deref(), Some("ovirtmgmt"));
    assert_eq!(ov.leftovers().await, Vec::<String>::new());

    // SCP: the same snapshot as a new server on its storage.
    let scp_env = scenarios::scp::Env::start(|_, _| {}).await;
    let mut o = scp_env.options(provider_scp::AccessMode::Nbd);
    o.restore_storage_id = Some("storage-local".into());
    let scp = scp_env.provider_with(o);
    let r = scenarios::scp::restore_from(
        &ov.store,
        scp.clone(),
        &snapshot,
        RestoreTarget::NewGuest {
            name: Some("web-scp".into()),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(
        scenarios::scp_flow::digests_of(&scp_env, &scp, &r.guest).await,
        digests,
        "restored SCP disks"
    );
    let server = scenarios::scp_flow::janus(
        &scp,
        reqwest::Method::GET,
        &format!("/janus/20250725/servers/{}", r.guest.id.0),
        None,
    )
    .await;
    assert_eq!(
        (num(&server["cores"]), num(&server["memory_mb"])),
        (u64::from(spec.cpus), spec.memory_mib)
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("NIC")),
        "{:?}",
        r.warnings
    );
    scenarios::scp_flow::assert_clean(&scp_env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ovirt_backup_restores_onto_zstack_with_identical_disks() {
    let ov = scenarios::ovirt::Env::start("down").await;
    let zs = Zs::start().await;
    let before = ov.shas(&ov.disks).await;
    let snapshot = backup_into(
        ov.provider(BackupMode::Auto, WireFormat::Json),
        &zs.env.store,
        &ov.vm,
        zs.env.dir.path(),
    )
    .await;
    assert_eq!(ov.leftovers().await, Vec::<String>::new());

    // The backup stored the VM platform-neutrally beside its OVF.
    let spec = stored_spec(&zs.env.store, &snapshot).await;
    let (cpus, memory) = ovirt_hardware(&ov, &ov.vm).await;
    assert_eq!((u64::from(spec.cpus), spec.memory_mib), (cpus, memory));
    let shape: Vec<_> = spec.disks.iter().map(|d| (d.bus, d.boot_order)).collect();
    assert_eq!(
        shape,
        [(Bus::Virtio, Some(0)), (Bus::Scsi, None)],
        "system disk (virtio, bootable), data disk (virtio_scsi)"
    );

    let (_, l3) = zs.default_offering_and_l3().await;
    let provider = zs.provider_with(ZStackOptions {
        l3_network_uuids: vec![l3],
        ..zs.options()
    });
    let r = zs
        .restore(provider, &snapshot, "vm1-from-ovirt")
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    let vm = r.guest.id.0.clone();
    assert_eq!(
        zs.digests(&vm).await,
        before,
        "root = system disk, then data"
    );
    let p = zs.provider();
    p.client().login().await.unwrap();
    let hits: Vec<Value> = p
        .client()
        .query("/vm-instances", &[format!("uuid={vm}")])
        .await
        .unwrap();
    assert_eq!(
        (num(&hits[0]["cpuNum"]), num(&hits[0]["memorySize"]) >> 20),
        (cpus, memory)
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("virtio")),
        "the data disk's bus is a warning: {:?}",
        r.warnings
    );
    zs.assert_no_leftovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_scp_backup_restores_onto_ovirt_with_identical_disks() {
    const MIB: u64 = 1 << 20;
    let scp_env = scenarios::scp::Env::start(|_, _| {}).await;
    // Odd sizes, data at the first and last bytes and across chunk
    // boundaries (1 MiB chunks in this datastore).
    let server = scp_env
        .admin
        .server(
            json!({"name": "plain", "storage_id": "storage-local", "disks": [
            {"size": 20 * MIB + 512, "fill": [
                {"offset": 0, "length": MIB + 4096, "pattern": "random", "seed": 21},
                {"offset": 20 * MIB - 4096, "length": 4096 + 512, "pattern": "text", "seed": 22}]},
            {"size": 6 * MIB, "fill": [
                {"offset": 2 * MIB - 100, "length": 200, "pattern": "random", "seed": 23},
                {"offset": 6 * MIB - 1, "length": 1, "pattern": "random", "seed": 24}]}]}),
        )
        .await;
    let before = scp_env.admin.server_digests(&server).await;
    let ov = scenarios::ovirt::Env::start("down").await;
    let snapshot = backup_into(
        scp_env.provider(),
        &ov.store,
        &scenarios::scp_flow::id(&server),
        ov.dir.path(),
    )
    .await;
    scenarios::scp_flow::assert_clean(&scp_env).await;
    let spec = stored_spec(&ov.store, &snapshot).await;
    assert_eq!(
        spec.disks
            .iter()
            .map(|d| d.device.as_str())
            .collect::<Vec<_>>(),
        ["scsi0", "scsi1"]
    );

    // Failures on the way leave nothing: the second disk's attachment to
    // the appliance, then the attachments after the VM is added (the
    // engine's import and the provider's alike).
    let inventory = || {
        ov.mock.ovirt().inventory().read(|doc| {
            (
                doc.vms.keys().cloned().collect::<Vec<_>>(),
                doc.disks.keys().cloned().collect::<Vec<_>>(),
            )
        })
    };
    let before_restores = inventory();
    for (after, name) in [(1, "plain-fail-early"), (2, "plain-fail-late")] {
        ov.arm(json!({"attach_fail_after": after})).await;
        let e = ov
            .restore(
                ovirt_target(&ov),
                &snapshot,
                RestoreTarget::NewGuest {
                    name: Some(name.into()),
                },
            )
            .await
            .unwrap_err();
        ov.disarm().await;
        assert!(e.report().contains("hot plugging"), "{}", e.report());
        assert_eq!(inventory(), before_restores, "{name}: VMs and disks");
        assert_eq!(ov.leftovers().await, Vec::<String>::new(), "{name}");
    }

    let r = ov
        .restore(
            ovirt_target(&ov),
            &snapshot,
            RestoreTarget::NewGuest {
                name: Some("plain-from-scp".into()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    let vm = r.guest.id.0.clone();
    let disks = restored_disks(&ov, &vm, "plain", &["scsi0", "scsi1"]);
    let ids: Vec<String> = disks.iter().map(|d| d.0.clone()).collect();
    assert_eq!(ov.shas(&ids).await, before, "restored disks");
    let shape: Vec<_> = disks.iter().map(|d| (d.2.as_str(), d.3)).collect();
    assert_eq!(shape, [("virtio_scsi", true), ("virtio_scsi", false)]);
    assert_eq!(
        ovirt_hardware(&ov, &vm).await,
        (u64::from(spec.cpus), spec.memory_mib)
    );
    assert_eq!((spec.cpus, spec.memory_mib), (2, 2048), "the server's");
    assert!(
        r.warnings.iter().any(|w| w.contains("MAC")),
        "{:?}",
        r.warnings
    );
    assert_eq!(ov.leftovers().await, Vec::<String>::new());
    // The source VM is untouched.
    assert_eq!(scp_env.admin.server_digests(&server).await, before);
}
