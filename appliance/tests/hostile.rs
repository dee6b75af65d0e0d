//! Hostile descriptors and archives are refused with one clear error, and
//! loading them writes nothing anywhere.

use std::path::{Path, PathBuf};

use appliance::import::Appliance;
use appliance::ova::Ova;
use appliance::{ErrorKind, ovf};

/// A ustar header for `name` of `size` bytes and type `kind`.
fn header(name: &[u8], size: u64, kind: u8, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    let sz = format!("{size:011o}");
    h[124..124 + sz.len()].copy_from_slice(sz.as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// One member: name, type flag, link target, data.
type Raw<'a> = (&'a [u8], u8, &'a [u8], &'a [u8]);

/// A tar of `members`, two zero blocks at the end.
fn tar(members: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in members {
        out.extend_from_slice(&header(name, data.len() as u64, *kind, link));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

const OVF: &[u8] = br#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="f1" ovf:href="disk1.raw"/></References>
  <DiskSection><Info>x</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^20"/></DiskSection>
  <VirtualSystem ovf:id="vm"><Info>x</Info><Name>vm</Name>
    <VirtualHardwareSection><Info>x</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/d1</rasd:HostResource><rasd:InstanceID>2</rasd:InstanceID><rasd:Parent>1</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_archives_are_refused_and_nothing_is_written() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let disk = vec![7u8; 1 << 20];
    let good = tar(&[
        (b"vm.ovf", b'0', b"", OVF),
        (b"disk1.raw", b'0', b"", &disk),
    ]);
    // Where disk1.raw's header is.
    let second = 512 + OVF.len().div_ceil(512) * 512;
    let mut bad_checksum = good.clone();
    bad_checksum[second + 3] ^= 1; // its name
    let mut oversize = good.clone();
    // disk1.raw's header claims 8 GiB.
    oversize[second..second + 512].copy_from_slice(&header(b"disk1.raw", 8 << 30, b'0', b""));
    let truncated = good[..good.len() - 1024 - 4096].to_vec();
    let cases: Vec<(&str, Vec<u8>, ErrorKind, &str)> = vec![
        (
            "traversal",
            tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"../disk1.raw", b'0', b"", &disk),
            ]),
            ErrorKind::Refused,
            "path with directories",
        ),
        (
            "absolute",
            tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"/etc/disk1.raw", b'0', b"", &disk),
            ]),
            ErrorKind::Refused,
            "absolute path",
        ),
        (
            "symlink",
            tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"disk1.raw", b'2', b"/etc/shadow", b""),
            ]),
            ErrorKind::Refused,
            "a link",
        ),
        (
            "hardlink",
            tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"disk1.raw", b'1', b"vm.ovf", b""),
            ]),
            ErrorKind::Refused,
            "a link",
        ),
        (
            "directory",
            tar(&[(b"vm.ovf", b'0', b"", OVF), (b"sub/", b'5', b"", b"")]),
            ErrorKind::Refused,
            "",
        ),
        (
            "device",
            tar(&[(b"vm.ovf", b'0', b"", OVF), (b"disk1.raw", b'3', b"", b"")]),
            ErrorKind::Refused,
            "plain files",
        ),
        (
            "duplicate",
            tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"disk1.raw", b'0', b"", &disk),
                (b"disk1.raw", b'0', b"", b"x"),
            ]),
            ErrorKind::Refused,
            "a second member",
        ),
        ("oversize", oversize, ErrorKind::Malformed, "beyond the end"),
        (
            "truncated",
            truncated,
            ErrorKind::Malformed,
            "beyond the end",
        ),
        ("checksum", bad_checksum, ErrorKind::Malformed, "checksum"),
        ("empty", vec![0u8; 1024], ErrorKind::Malformed, "no members"),
        ("garbage", vec![b'x'; 4096], ErrorKind::Malformed, ""),
    ];
    let before = listing(root.path());
    for (name, bytes, kind, words) in &cases {
        let p = write(&work, &format!("{name}.ova"), bytes);
        let e = Ova::open(&p).expect_err(name);
        assert_eq!(e.kind(), *kind, "{name}: {e}");
        assert!(e.to_string().contains(words), "{name}: {e}");
        assert!(
            e.to_string().contains(&format!("{name}.ova")),
            "{name}: {e}"
        );
        let e = Appliance::load(&p, None).expect_err(name);
        assert_eq!(e.kind(), *kind, "{name}: {e}");
        std::fs::remove_file(&p).unwrap();
    }
    assert_eq!(listing(root.path()), before, "nothing written");

    // The good one loads (qemu-img reads the member in place).
    if have("qemu-img") {
        let p = write(&work, "good.ova", &good);
        let a = Appliance::load(&p, None).unwrap();
        assert_eq!(a.disks.len(), 1);
        assert_eq!(a.disks[0].size, 1 << 20);
        assert_eq!(a.disks[0].source.as_ref().unwrap().driver, "raw");
        // A member the descriptor references but the archive lacks.
        let p = write(&work, "missing.ova", &tar(&[(b"vm.ovf", b'0', b"", OVF)]));
        let e = Appliance::load(&p, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
        assert!(e.to_string().contains("disk1.raw"), "{e}");
        // A manifest that disagrees.
        let mf = b"SHA256(disk1.raw)= 0000000000000000000000000000000000000000000000000000000000000000\n";
        let p = write(
            &work,
            "tampered.ova",
            &tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"vm.mf", b'0', b"", mf),
                (b"disk1.raw", b'0', b"", &disk),
            ]),
        );
        let e = Appliance::load(&p, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
        assert!(e.to_string().contains("disk1.raw"), "{e}");
        // A qcow2 with a backing file: qemu would open another file.
        let q = root.path().join("q");
        std::fs::create_dir(&q).unwrap();
        let status = std::process::Command::new("qemu-img")
            .current_dir(&q)
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "/etc/hostname",
                "-F",
                "raw",
                "x.qcow2",
                "1M",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let qcow = std::fs::read(q.join("x.qcow2")).unwrap();
        let p = write(
            &work,
            "backing.ova",
            &tar(&[
                (b"vm.ovf", b'0', b"", OVF),
                (b"disk1.raw", b'0', b"", &qcow),
            ]),
        );
        let e = Appliance::load(&p, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        assert!(e.to_string().contains("backing file"), "{e}");
    }
}

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

fn refused(xml: &str) -> appliance::Error {
    ovf::parse(xml.as_bytes()).expect_err(xml)
}

#[test]
fn hostile_descriptors_are_refused() {
    // Billion laughs and external entities: no DTD at all.
    let laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><Envelope><VirtualSystem>&lol2;</VirtualSystem></Envelope>"#;
    let e = refused(laughs);
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("DOCTYPE"), "{e}");
    let xxe = r#"<?xml version="1.0"?><!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///proc/self/comm">]><Envelope><VirtualSystem><Name>&xxe;</Name></VirtualSystem></Envelope>"#;
    assert_eq!(refused(xxe).kind(), ErrorKind::Refused);
    // An entity without a DTD.
    let e = refused("<Envelope><VirtualSystem><Name>&xxe;</Name></VirtualSystem></Envelope>");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    // Predefined and numeric references are fine.
    let d = ovf::parse(
        b"<Envelope><VirtualSystem><Name>a&amp;b&#x41;</Name></VirtualSystem></Envelope>",
    )
    .unwrap();
    assert_eq!(d.name.as_deref(), Some("a&bA"));
    // Deep nesting.
    let deep = format!(
        "<Envelope>{}{}</Envelope>",
        "<a>".repeat(100),
        "</a>".repeat(100)
    );
    assert_eq!(refused(&deep).kind(), ErrorKind::Limit);
    // Too large.
    let big = format!("<Envelope>{}</Envelope>", " ".repeat(ovf::MAX_DESCRIPTOR));
    assert_eq!(refused(&big).kind(), ErrorKind::Limit);
    // Not XML, not OVF, nothing to import.
    assert_eq!(refused("\u{1}\u{2}garbage<").kind(), ErrorKind::Malformed);
    assert_eq!(
        refused("<Envelope><a></b></Envelope>").kind(),
        ErrorKind::Malformed
    );
    assert_eq!(refused("<html></html>").kind(), ErrorKind::Malformed);
    assert_eq!(refused("<Envelope></Envelope>").kind(), ErrorKind::Missing);
    // Sizes.
    let disk = |attrs: &str| {
        format!(
            r#"<Envelope><DiskSection><Disk ovf:diskId="d" {attrs}/></DiskSection><VirtualSystem/></Envelope>"#
        )
    };
    let e = refused(&disk(
        r#"ovf:capacity="1" ovf:capacityAllocationUnits="furlong""#,
    ));
    assert!(e.to_string().contains("furlong"), "{e}");
    let e = refused(&disk(
        r#"ovf:capacity="99999999999" ovf:capacityAllocationUnits="byte * 2^40""#,
    ));
    assert!(e.to_string().contains("too large"), "{e}");
    let e = refused(&disk(r#"ovf:capacity="${disk.size}""#));
    assert!(e.to_string().contains("not a number"), "{e}");
}

/// What `guest` refuses: descriptors that parse but do not hang together.
#[test]
fn inconsistent_descriptors_name_what_is_wrong() {
    let with = |refs: &str, disks: &str, items: &str| {
        format!(
            r#"<Envelope><References>{refs}</References><DiskSection>{disks}</DiskSection><VirtualSystem ovf:id="v"><VirtualHardwareSection>{items}</VirtualHardwareSection></VirtualSystem></Envelope>"#
        )
    };
    let item = |res: &str| {
        format!(
            "<Item><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>{res}</rasd:HostResource></Item>"
        )
    };
    let guest = |xml: String| ovf::parse(xml.as_bytes()).unwrap().guest("x");
    // virt-v2v's test-i-ova-gz: a gzip-compressed member.
    let e = guest(with(
        r#"<File ovf:id="f" ovf:href="d.vmdk.gz" ovf:compression="gzip"/>"#,
        r#"<Disk ovf:diskId="d" ovf:fileRef="f" ovf:capacity="1"/>"#,
        &item("ovf:/disk/d"),
    ))
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("gzip"), "{e}");
    // A disk whose file is not referenced.
    let e = guest(with(
        "",
        r#"<Disk ovf:diskId="d" ovf:fileRef="nope" ovf:capacity="1"/>"#,
        &item("ovf:/disk/d"),
    ))
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    // An item naming a disk that does not exist.
    let e = guest(with("", "", &item("ovf:/disk/ghost"))).unwrap_err();
    assert!(e.to_string().contains("ghost"), "{e}");
    // A disk attached twice.
    let two = format!("{}{}", item("/disk/d"), item("ovf:/disk/d"));
    let e = guest(with(
        r#"<File ovf:id="f" ovf:href="a"/>"#,
        r#"<Disk ovf:diskId="d" ovf:fileRef="f" ovf:capacity="1"/>"#,
        &two,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("attached twice"), "{e}");
    // pve-storage's Win10-Liz_no_default_ns: prefixes declared on each
    // element, no default namespace; CRLF line ends (virt-v2v's as-root).
    let xml = "<ovf:Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\">\r\n<ovf:References><ovf:File ovf:id=\"f\" ovf:href=\"a.vmdk\"/></ovf:References>\r\n<ovf:DiskSection><ovf:Disk ovf:diskId=\"d\" ovf:fileRef=\"f\" ovf:capacity=\"2\" ovf:capacityAllocationUnits=\"byte * 2^30\"/></ovf:DiskSection>\r\n<ovf:VirtualSystem ovf:id=\"w\"><ovf:VirtualHardwareSection><ovf:Item><rasd:ResourceType xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\">4</rasd:ResourceType><rasd:VirtualQuantity xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\">2048</rasd:VirtualQuantity><rasd:AllocationUnits xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\">byte * 2^20</rasd:AllocationUnits></ovf:Item></ovf:VirtualHardwareSection></ovf:VirtualSystem></ovf:Envelope>";
    let (spec, disks, warnings) = ovf::parse(xml.as_bytes()).unwrap().guest("x").unwrap();
    assert_eq!(spec.memory_mib, 2048);
    assert_eq!(spec.name, "w");
    assert_eq!(disks[0].size, Some(2 << 30));
    assert_eq!(disks[0].href.as_deref(), Some("a.vmdk"));
    assert!(
        warnings.iter().any(|w| w.contains("not attached")),
        "{warnings:?}"
    );
}
