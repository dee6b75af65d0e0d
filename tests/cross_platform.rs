//! Restores across platforms: a snapshot of an imported appliance (its
//! configuration a platform-neutral guest spec) restores onto the ZStack
//! mock with the disks identical and CPUs and memory mapped; networks come
//! from the target's provider options, and without them the restore fails
//! naming the option and leaves nothing on the platform.

use std::path::Path;
use std::sync::Arc;

use appliance::import::{Appliance, OvaProvider};
use appliance::ovf::ExportDisk;
use appliance::spec::{Bus, DiskSpec, Firmware, GuestSpec, NicSpec};
use engine::{BackupDriver, JobOptions, StandardMover};
use provider_api::{BackupProvider, Guest, JobInfo, Target};
use provider_zstack::ZStackOptions;
use scenarios::zstack::*;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_appliance_restores_onto_zstack_with_identical_disks() {
    if !(have("qemu-img") && have("qemu-nbd")) {
        return;
    }
    let zs = Zs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ova, spec, digests) = appliance(dir.path());

    // Import: the appliance's disks through qemu-nbd into the datastore.
    let loaded = Appliance::load(&ova, None).unwrap();
    let importer = Arc::new(OvaProvider::new("web", loaded, dir.path().join("sockets")));
    let report = BackupDriver::new(
        importer as Arc<dyn BackupProvider>,
        zs.env.store.clone() as Arc<dyn Target>,
        Arc::new(StandardMover::default()),
    )
    .run_job(
        &JobOptions {
            info: JobInfo::new("import", now()),
            parallelism: 1,
            log_dir: dir.path().join("logs"),
        },
        vec![Guest::vm("web")],
    )
    .await;
    assert_ok(&report);
    let snapshot = snapshot_of(&report, 0);

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
