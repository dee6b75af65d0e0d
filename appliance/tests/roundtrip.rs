//! Property tests: an exported descriptor parses back to the guest it was
//! written from; mutated archives and descriptors give errors, never
//! panics, and an archive the reader accepts has every member inside it.

use std::io::Cursor;

use appliance::ova;
use appliance::ovf::{self, ExportDisk};
use appliance::spec::{Bus, DiskSpec, Firmware, GuestSpec, NicSpec};
use proptest::prelude::*;

fn bus() -> impl Strategy<Value = Bus> {
    prop_oneof![
        Just(Bus::Ide),
        Just(Bus::Sata),
        Just(Bus::Scsi),
        Just(Bus::Nvme)
    ]
}

/// Text as element content keeps it: no space at either end (the parser
/// trims), XML's special characters included.
const TEXT: &str = "[a-zA-Z0-9&<>'\"_.-]([a-zA-Z0-9 &<>'\"_.()-]{0,22}[a-zA-Z0-9&<>'\"_.-])?";

fn guest() -> impl Strategy<Value = GuestSpec> {
    let disk = (1u64..(1 << 42), bus());
    let nic = (
        proptest::option::of(prop_oneof![
            Just("E1000".to_owned()),
            Just("VmxNet3".to_owned()),
            Just("virtio".to_owned())
        ]),
        proptest::option::of(proptest::array::uniform6(any::<u8>())),
        proptest::option::of(TEXT),
    );
    (
        TEXT,
        proptest::option::of(TEXT),
        any::<bool>(),
        1u32..256,
        1u64..(1 << 22),
        proptest::collection::vec(disk, 1..6),
        proptest::collection::vec(nic, 0..4),
    )
        .prop_map(|(name, os, efi, cpus, memory_mib, disks, nics)| GuestSpec {
            name,
            os,
            firmware: if efi { Firmware::Efi } else { Firmware::Bios },
            cpus,
            memory_mib,
            disks: disks
                .into_iter()
                .enumerate()
                .map(|(n, (size, bus))| DiskSpec {
                    device: format!("disk{n}"),
                    size,
                    bus,
                    controller: None,
                    boot_order: None,
                })
                .collect(),
            nics: nics
                .into_iter()
                .map(|(model, mac, network)| NicSpec {
                    model,
                    mac: mac.map(|m| {
                        m.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    }),
                    network,
                })
                .collect(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn exported_descriptors_parse_back(spec in guest()) {
        let disks: Vec<ExportDisk> = spec
            .disks
            .iter()
            .map(|d| ExportDisk { spec: d.clone(), href: format!("{}.vmdk", d.device), file_size: 1 })
            .collect();
        let xml = ovf::write(&spec, &disks);
        let parsed = ovf::parse(xml.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        let (back, imports, warnings) = parsed.guest("x").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(warnings.is_empty(), "{warnings:?}");
        prop_assert_eq!(&back.name, &spec.name);
        prop_assert_eq!(back.cpus, spec.cpus);
        prop_assert_eq!(back.memory_mib, spec.memory_mib);
        prop_assert_eq!(back.firmware, spec.firmware);
        prop_assert_eq!(back.os.as_deref(), Some(spec.os.as_deref().unwrap_or("Other")));
        prop_assert_eq!(imports.len(), spec.disks.len());
        // Disks come back grouped by controller, each in its order.
        for (d, i) in spec.disks.iter().zip(&disks) {
            let (n, b) = back
                .disks
                .iter()
                .enumerate()
                .find(|(n, _)| imports[*n].href.as_deref() == Some(i.href.as_str()))
                .ok_or_else(|| TestCaseError::fail(format!("{} lost", i.href)))?;
            prop_assert_eq!(b.size, d.size);
            prop_assert_eq!(b.bus, d.bus);
            prop_assert_eq!(imports[n].size, Some(d.size));
        }
        prop_assert_eq!(back.nics.len(), spec.nics.len());
        for (a, b) in spec.nics.iter().zip(&back.nics) {
            prop_assert_eq!(b.model.as_deref(), Some(a.model.as_deref().unwrap_or("E1000")));
            prop_assert_eq!(&b.mac, &a.mac);
            prop_assert_eq!(b.network.as_deref(), Some(a.network.as_deref().unwrap_or("default")));
        }
    }

    #[test]
    fn mutated_archives_are_errors_not_panics(
        cut in 0usize..6000,
        flips in proptest::collection::vec((0usize..6000, any::<u8>()), 0..8),
    ) {
        let mut bytes = small_ova();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        bytes.truncate(cut.max(1).min(bytes.len()));
        let len = bytes.len() as u64;
        if let Ok(members) = ova::members(Cursor::new(bytes), len) {
            for m in members {
                prop_assert!(m.offset + m.size <= len, "{m:?} beyond {len}");
                prop_assert!(!m.name.contains('/') && m.name != "..", "{m:?}");
            }
        }
    }

    #[test]
    fn mutated_descriptors_are_errors_not_panics(
        flips in proptest::collection::vec((0usize..4000, any::<u8>()), 1..16),
        cut in 1usize..4000,
    ) {
        let spec = GuestSpec {
            name: "vm".into(), os: None, firmware: Firmware::Bios, cpus: 2, memory_mib: 512,
            disks: vec![DiskSpec { device: "disk0".into(), size: 1 << 30, bus: Bus::Scsi, controller: None, boot_order: None }],
            nics: vec![NicSpec { model: None, mac: None, network: Some("lan".into()) }],
        };
        let disks = [ExportDisk { spec: spec.disks[0].clone(), href: "d.vmdk".into(), file_size: 1 }];
        let mut xml = ovf::write(&spec, &disks).into_bytes();
        for (at, x) in flips {
            let n = xml.len();
            xml[at % n] ^= x;
        }
        xml.truncate(cut.min(xml.len()));
        if let Ok(d) = ovf::parse(&xml) {
            let _ = d.guest("x");
        }
    }
}

/// A small valid OVA: descriptor, manifest, one disk, through the writer.
fn small_ova() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vmdk");
    std::fs::write(&disk, vec![0x5a; 1500]).unwrap();
    let out = dir.path().join("x.ova");
    ova::write(&out, "x.ovf", b"<Envelope/>", &[("d.vmdk".into(), disk)]).unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn the_writer_puts_descriptor_and_manifest_first_and_the_reader_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.ova");
    std::fs::write(&p, small_ova()).unwrap();
    let a = ova::Ova::open(&p).unwrap();
    let names: Vec<&str> = a.members().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["x.ovf", "x.mf", "d.vmdk"]);
    assert!(a.verify(&["x.ovf", "d.vmdk"]).unwrap().is_empty());
    let d = a.member("d.vmdk").unwrap();
    assert_eq!(a.read(d, 1 << 20).unwrap(), vec![0x5a; 1500]);
    assert_eq!(
        a.read(d, 100).unwrap_err().kind(),
        appliance::ErrorKind::Limit
    );
    // Never over an existing file.
    let e = ova::write(&p, "x.ovf", b"", &[]).unwrap_err();
    assert_eq!(e.kind(), appliance::ErrorKind::Refused);
}
