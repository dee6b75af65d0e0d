//! Appliances through the command line: an OVA built here from generated
//! disks (a streamOptimized VMDK on SCSI and a qcow2 on SATA, odd sizes,
//! data at the first and last bytes and across chunk boundaries) is
//! imported, restored and compared byte for byte; its configuration comes
//! back platform-neutral; the same appliance as an OVF with its files
//! beside it imports the same; `export` writes an OVA whose disks
//! `qemu-img info` reads as streamOptimized VMDKs and which imports again
//! to the same bytes; restored onto a platform of the configuration (the
//! SCP of `vmbackup mock`), the disks are the same and what the platform
//! cannot take is printed as warnings. The real descriptors of
//! `appliance/tests/data/ovf` (VMware, VirtualBox, Cisco/COT, XenCenter),
//! given generated disks of the formats and capacities they declare,
//! import and restore to the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;
use common::{have, run, text, vmbackup};

const MIB: u64 = 1 << 20;

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw disk of `size` bytes: noise at the start, the end, around every
/// 4 MiB boundary, and a zero hole in between.
fn disk(path: &Path, size: u64, seed: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut at = |off: u64, n: usize| {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&noise(n, (seed as u64) << 32 ^ off)).unwrap();
    };
    at(0, 70_000);
    let mut b = 4 * MIB;
    while b < size {
        at(b - 3000, 6000.min((size - b + 3000) as usize));
        b += 4 * MIB;
    }
    at(size - 5000, 5000);
}

fn ovf(name: &str, a: (&str, u64), b: (&str, u64)) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:id="file1" ovf:href="{}"/>
    <File ovf:id="file2" ovf:href="{}"/>
  </References>
  <DiskSection>
    <Info>disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{}" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:capacity="{}" ovf:capacityAllocationUnits="byte"/>
  </DiskSection>
  <NetworkSection><Info>nets</Info><Network ovf:name="lan"/></NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>vm</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="101"><Info>os</Info><Description>Debian 12</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>hw</Info>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>3</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>5</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>6</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:aa:bb:cc</rasd:Address><rasd:Connection>lan</rasd:Connection><rasd:InstanceID>7</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
        a.0, b.0, a.1, b.1
    )
}

fn snapshot_of(store: &Path, guest: &str) -> String {
    let list: serde_json::Value = serde_json::from_str(&run(vmbackup()
        .args(["--json", "list", "--id", guest, "-d"])
        .arg(store)))
    .unwrap();
    let last = list.as_array().unwrap().last().unwrap();
    assert_eq!(last["platform"], "ova", "{last}");
    last["id"].as_str().unwrap().to_owned()
}

/// Restore `snap` into `dir` as guest `name`; the files by device.
fn restore(store: &Path, snap: &str, dir: &Path, name: &str) -> Vec<PathBuf> {
    run(vmbackup()
        .args(["restore", snap, "--name", name, "--to"])
        .arg(dir)
        .arg("-d")
        .arg(store));
    vec![
        dir.join(format!("{name}-disk0.raw")),
        dir.join(format!("{name}-disk1.raw")),
    ]
}

/// What [`build_ova`] made.
struct Built {
    ova: PathBuf,
    /// The OVF, manifest and images (the OVF-beside form).
    src: PathBuf,
    /// SHA-256 of the two disks' raw content.
    want: [String; 2],
    size_a: u64,
    size_b: u64,
}

/// An OVA in `d` (`vm.ova`, built with GNU tar): a streamOptimized VMDK on
/// SCSI and a qcow2 on SATA of odd sizes, a manifest, a VmxNet3 NIC, EFI.
fn build_ova(d: &Path) -> Built {
    // Sizes not multiple of the chunk size; one not even of a MiB.
    let (size_a, size_b) = (40 * MIB + 4096, 9 * MIB + 512);
    disk(&d.join("a.raw"), size_a, 1);
    disk(&d.join("b.raw"), size_b, 2);
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    run(Command::new("qemu-img")
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
        .arg(d.join("a.raw"))
        .arg(src.join("vm-disk1.vmdk")));
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(d.join("b.raw"))
        .arg(src.join("vm-disk2.qcow2")));
    std::fs::write(
        src.join("vm.ovf"),
        ovf(
            "appliance-vm",
            ("vm-disk1.vmdk", size_a),
            ("vm-disk2.qcow2", size_b),
        ),
    )
    .unwrap();
    let mf: String = ["vm.ovf", "vm-disk1.vmdk", "vm-disk2.qcow2"]
        .iter()
        .map(|f| format!("SHA256({f})= {}\n", sha256(&src.join(f))))
        .collect();
    std::fs::write(src.join("vm.mf"), mf).unwrap();
    let ova = d.join("vm.ova");
    run(Command::new("tar")
        .current_dir(&src)
        .args(["-cf"])
        .arg(&ova)
        .args([
            "--format=ustar",
            "vm.ovf",
            "vm.mf",
            "vm-disk1.vmdk",
            "vm-disk2.qcow2",
        ]));
    let want = [sha256(&d.join("a.raw")), sha256(&d.join("b.raw"))];
    Built {
        ova,
        src,
        want,
        size_a,
        size_b,
    }
}

#[test]
fn an_ova_imports_restores_exports_and_imports_again_byte_for_byte() {
    if !(have("qemu-img") && have("qemu-nbd") && have("tar")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let Built {
        ova,
        src,
        want,
        size_a,
        size_b,
    } = build_ova(d);

    // Import the OVA, restore, compare.
    run(vmbackup()
        .args(["import", "--id", "appl", "-d"])
        .arg(&store)
        .arg(&ova));
    let snap = snapshot_of(&store, "appl");
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let got: Vec<String> = restore(&store, &snap, &out, "r1")
        .iter()
        .map(|p| sha256(p))
        .collect();
    assert_eq!(got, want, "restored disks");

    // The configuration, platform-neutral.
    let show: serde_json::Value = serde_json::from_str(&run(vmbackup()
        .args(["--json", "show", &snap, "-d"])
        .arg(&store)))
    .unwrap();
    let spec: serde_json::Value =
        serde_json::from_str(show["guest_config"].as_str().unwrap()).unwrap();
    assert_eq!(spec["name"], "appliance-vm");
    assert_eq!(spec["cpus"], 2);
    assert_eq!(spec["memory_mib"], 3072);
    assert_eq!(spec["firmware"], "efi");
    assert_eq!(spec["os"], "Debian 12");
    assert_eq!(spec["disks"][0]["bus"], "scsi");
    assert_eq!(spec["disks"][0]["size"], size_a);
    assert_eq!(spec["disks"][1]["bus"], "sata");
    assert_eq!(spec["nics"][0]["mac"], "00:50:56:aa:bb:cc");
    assert_eq!(spec["nics"][0]["network"], "lan");
    assert_eq!(spec["nics"][0]["model"], "VmxNet3");

    // The same appliance as an OVF with its files beside it.
    run(vmbackup()
        .args(["import", "--id", "appl-ovf", "-d"])
        .arg(&store)
        .arg(src.join("vm.ovf")));
    let snap_ovf = snapshot_of(&store, "appl-ovf");
    let got: Vec<String> = restore(&store, &snap_ovf, &out, "r2")
        .iter()
        .map(|p| sha256(p))
        .collect();
    assert_eq!(got, want, "restored disks of the OVF import");

    // A damaged disk member: the manifest catches it, nothing is stored.
    let mut bytes = std::fs::read(&ova).unwrap();
    let vmdk = bytes.windows(4).position(|w| w == b"KDMV").unwrap();
    let at = vmdk + std::fs::metadata(src.join("vm-disk1.vmdk")).unwrap().len() as usize / 2;
    bytes[at] ^= 0xff; // in the middle of the VMDK member
    let bad = d.join("bad.ova");
    std::fs::write(&bad, &bytes).unwrap();
    let o = vmbackup()
        .args(["import", "--id", "appl-bad", "-d"])
        .arg(&store)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("vm-disk1.vmdk") && err.contains("manifest"),
        "{err}"
    );
    let o = vmbackup()
        .args(["--json", "list", "--id", "appl-bad", "-d"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "a snapshot of the damaged import: {}",
        text(&o)
    );

    // Export, check with qemu-img and tar, import again, compare.
    let exported = d.join("export.ova");
    run(vmbackup()
        .args(["export", &snap, "--ova"])
        .arg(&exported)
        .arg("-d")
        .arg(&store));
    let listing = run(Command::new("tar").arg("-tf").arg(&exported));
    let members: Vec<&str> = listing.lines().collect();
    assert_eq!(
        members,
        [
            "appliance-vm.ovf",
            "appliance-vm.mf",
            "appliance-vm-disk0.vmdk",
            "appliance-vm-disk1.vmdk"
        ],
        "descriptor first, then the manifest, then the disks"
    );
    let x = d.join("x");
    std::fs::create_dir(&x).unwrap();
    run(Command::new("tar")
        .current_dir(&x)
        .arg("-xf")
        .arg(&exported));
    for (m, size) in [
        ("appliance-vm-disk0.vmdk", size_a),
        ("appliance-vm-disk1.vmdk", size_b),
    ] {
        let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(x.join(m))))
        .unwrap();
        assert_eq!(info["format"], "vmdk", "{info}");
        assert_eq!(info["virtual-size"], size, "{info}");
        assert_eq!(
            info["format-specific"]["data"]["create-type"], "streamOptimized",
            "{info}"
        );
    }
    run(vmbackup()
        .args(["import", "--id", "appl-again", "-d"])
        .arg(&store)
        .arg(&exported));
    let again = snapshot_of(&store, "appl-again");
    let got: Vec<String> = restore(&store, &again, &out, "r3")
        .iter()
        .map(|p| sha256(p))
        .collect();
    assert_eq!(got, want, "disks after export and re-import");
    let show: serde_json::Value = serde_json::from_str(&run(vmbackup()
        .args(["--json", "show", &again, "-d"])
        .arg(&store)))
    .unwrap();
    let spec2: serde_json::Value =
        serde_json::from_str(show["guest_config"].as_str().unwrap()).unwrap();
    for key in ["name", "cpus", "memory_mib", "firmware", "os", "nics"] {
        assert_eq!(spec2[key], spec[key], "{key} after export and re-import");
    }
    assert_eq!(spec2["disks"][1]["bus"], "sata");
    // An existing file is never overwritten.
    let o = vmbackup()
        .args(["export", &snap, "--ova"])
        .arg(&exported)
        .arg("-d")
        .arg(&store)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
}

/// `vmbackup mock --seed-demo` in `dir`: the running mock and its
/// endpoints.
fn demo_mock(dir: &Path) -> (common::Killed, serde_json::Value) {
    use std::io::BufRead;
    let mut child = vmbackup()
        .args(["mock", "--seed-demo", "--state-dir"])
        .arg(dir.join("mock"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mock = common::Killed(child);
    (mock, serde_json::from_str(&line).unwrap())
}

/// A GET on the mock's admin API, as JSON.
async fn admin_get(endpoints: &serde_json::Value, path: &str) -> serde_json::Value {
    let url = format!("{}{path}", endpoints["admin_url"].as_str().unwrap());
    let r = reqwest::get(&url).await.unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imported_ova_restores_onto_a_platform_and_says_what_it_could_not_map() {
    if !(have("qemu-img") && have("qemu-nbd") && have("tar")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let built = build_ova(d);
    let (_mock, endpoints) = demo_mock(d);
    let scp = &endpoints["scp"];
    let config = d.join("vmbackup.toml");
    std::fs::write(
        &config,
        format!(
            "datastore = {:?}\n[platforms.lab]\nkind = \"scp\"\nendpoint = {:?}\nusername = {}\npassword = {}\nrestore_storage_id = \"storage-local\"\n",
            d.join("store"),
            scp["base_url"].as_str().unwrap(),
            scp["username"],
            scp["password"],
        ),
    )
    .unwrap();
    let with_config = || {
        let mut c = vmbackup();
        c.arg("--config").arg(&config);
        c
    };
    run(with_config()
        .args(["import", "--id", "appl"])
        .arg(&built.ova));
    let list: serde_json::Value =
        serde_json::from_str(&run(with_config().args(["--json", "list", "--id", "appl"]))).unwrap();
    let snap = list[0]["id"].as_str().unwrap().to_owned();

    // Restored onto the SCP platform of the config: the restore names the
    // target platform, the snapshot's ("ova") is only where it came from.
    let out = run(with_config().args([
        "restore",
        &snap,
        "--platform",
        "lab",
        "--name",
        "appl-on-scp",
    ]));
    for what in ["NIC(s) not restored", "UEFI firmware", "disk buses"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("warning: ") && l.contains(what)),
            "no warning about {what}:\n{out}"
        );
    }
    let objects = admin_get(&endpoints, "/scp/objects").await;
    let server = objects["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "appl-on-scp")
        .unwrap_or_else(|| panic!("no restored server in {objects}"));
    let mut got = Vec::new();
    for disk in server["disks"].as_array().unwrap() {
        let id = disk["id"].as_str().unwrap();
        let sha = admin_get(&endpoints, &format!("/disks/{id}/sha256")).await;
        got.push(sha["sha256"].as_str().unwrap().to_owned());
    }
    // (CPUs and memory are compared through the SCP API in the
    // cross-platform scenarios.)
    assert_eq!(got, built.want, "restored server disks");
}

/// `n` bytes of noise, deterministic by `seed`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn real_descriptors_import_with_generated_disks_and_restore_byte_for_byte() {
    if !(have("qemu-img") && have("qemu-nbd")) {
        return;
    }
    use std::io::{Seek, SeekFrom, Write};
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../appliance/tests/data/ovf");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(samples.join("expected.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut done = 0;
    for (n, (sample, want)) in expected.as_object().unwrap().iter().enumerate() {
        if sample.starts_with("ovirt-engine-") {
            // The engine's stored OVFs (OVF_STORE): their files are image
            // paths on a storage domain, not files of an appliance.
            continue;
        }
        let work = dir.path().join(format!("s{n}"));
        std::fs::create_dir(&work).unwrap();
        std::fs::copy(samples.join(sample), work.join(sample)).unwrap();
        // Each referenced disk: noise at its first and last bytes, in the
        // format the descriptor declares, of the capacity it declares.
        let mut sources = Vec::new();
        for (i, disk) in want["disks"].as_array().unwrap().iter().enumerate() {
            let size = disk["capacity_bytes"].as_u64().unwrap();
            let raw = work.join(format!("src{i}.raw"));
            let mut f = std::fs::File::create(&raw).unwrap();
            f.set_len(size).unwrap();
            let Some(href) = disk["file_href"].as_str() else {
                // A blank disk: imported as zeroes.
                sources.push(raw);
                continue;
            };
            f.write_all(&noise(70_000, n as u64 * 16 + i as u64))
                .unwrap();
            f.seek(SeekFrom::Start(size - 5000)).unwrap();
            f.write_all(&noise(5000, !(n as u64))).unwrap();
            drop(f);
            let format = disk["format"].as_str().unwrap_or_default();
            let convert: &[&str] = if format.ends_with("#streamOptimized") {
                &["-O", "vmdk", "-o", "subformat=streamOptimized"]
            } else if format.ends_with("vmdk.html#sparse") {
                &["-O", "vmdk", "-o", "subformat=monolithicSparse"]
            } else if format.contains("vhd") {
                &["-O", "vpc", "-o", "force_size=on"]
            } else {
                &["-O", "qcow2"]
            };
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw"])
                .args(convert)
                .arg(&raw)
                .arg(work.join(href)));
            sources.push(raw);
        }
        let id = format!("sample{n}");
        let o = vmbackup()
            .args(["import", "--id", &id, "-d"])
            .arg(&store)
            .arg(work.join(sample))
            .output()
            .unwrap();
        assert!(o.status.success(), "{sample}: {}", text(&o));
        // qemu-nbd closing the connection after our disconnect is the
        // expected end of the copy, not a failure to report.
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("connection failed"),
            "{sample}: {}",
            text(&o)
        );
        let snap = snapshot_of(&store, &id);
        let out = work.join("out");
        std::fs::create_dir(&out).unwrap();
        run(vmbackup()
            .args(["restore", &snap, "--name", "r", "--to"])
            .arg(&out)
            .arg("-d")
            .arg(&store));
        // Devices follow the hardware section's order, which need not be
        // the disk section's: every source matches one restored disk.
        let mut restored: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(restored.len(), sources.len(), "{sample}: {restored:?}");
        for (i, src) in sources.iter().enumerate() {
            let same = |r: &PathBuf| {
                Command::new("qemu-img")
                    .args(["compare", "-q", "-f", "raw", "-F", "raw"])
                    .arg(src)
                    .arg(r)
                    .status()
                    .unwrap()
                    .success()
            };
            let at = restored.iter().position(same).unwrap_or_else(|| {
                panic!("{sample}: no restored disk holds the bytes of disk {i}")
            });
            restored.remove(at);
        }
        done += 1;
    }
    assert_eq!(done, 6, "samples imported and compared");
}
