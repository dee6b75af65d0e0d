//! `vmbackup` against real qemu: a qcow2 with a persistent dirty bitmap
//! exported by qemu-nbd is backed up in full, changed with qemu-io, backed
//! up incrementally (only the dirty extents are read), served with
//! `vmbackup serve`, converted back with qemu-img, and `qemu-img compare`
//! finds it identical to the source.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common;
use common::{Killed, have, spawn_listening};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_nbd(image: &Path, sock: &Path) -> Killed {
    let _ = std::fs::remove_file(sock);
    spawn_listening(
        Command::new("qemu-nbd")
            .args([
                "-r", "-t", "-e", "4", "-x", "disk", "-f", "qcow2", "--bitmap", "cbt0", "-k",
            ])
            .arg(sock)
            .arg(image),
        sock,
    )
}

fn vmbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbackup"))
}

fn backup(store: &Path, sock: &Path) -> serde_json::Value {
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = run(vmbackup()
        .args([
            "--json", "backup", "--id", "qemu-vm", "--bitmap", "cbt0", "--nbd", &uri, "-d",
        ])
        .arg(store));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows[0].clone()
}

#[test]
fn qcow2_with_dirty_bitmap_full_incremental_serve_and_compare() {
    if !(have("qemu-img") && have("qemu-nbd") && have("qemu-io")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let sock = dir.path().join("nbd.sock");
    let store = dir.path().join("store");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 20M 4M",
        ])
        .arg(&image));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "--granularity", "64K"])
        .arg(&image)
        .arg("cbt0"));

    let full = {
        let _nbd = qemu_nbd(&image, &sock);
        backup(&store, &sock)
    };
    assert_eq!(full["mode"], "full", "{full}");
    assert!(full["error"].is_null(), "{full}");
    // Holes are not read: 12 MiB of data in a 64 MiB disk.
    assert_eq!(full["bytes_read"], 12 << 20, "{full}");

    // The guest changes 128 KiB in two places.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 1M 64K",
            "-c",
            "write -P 0x44 40M 64K",
        ])
        .arg(&image));
    let incr = {
        let _nbd = qemu_nbd(&image, &sock);
        backup(&store, &sock)
    };
    assert_eq!(incr["mode"], "incremental", "{incr}");
    assert_eq!(
        incr["bytes_read"],
        128 << 10,
        "only the dirty extents are read: {incr}"
    );

    let list: serde_json::Value =
        serde_json::from_str(&run(vmbackup().args(["--json", "list", "-d"]).arg(&store))).unwrap();
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    let latest = snaps[1]["id"].as_str().unwrap().to_owned();

    // The same list for people: a header, one aligned row per snapshot,
    // sizes in binary units, modes in words (no Debug names).
    let text = run(vmbackup().args(["list", "-d"]).arg(&store));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("snapshot") && lines[0].contains("size") && lines[0].contains("mode"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(snaps[0]["id"].as_str().unwrap()),
        "{text}"
    );
    assert!(
        lines[1].contains("64.0 MiB") && lines[1].contains("full"),
        "{text}"
    );
    assert!(
        lines[2].contains("64.0 MiB") && lines[2].contains("incremental"),
        "{text}"
    );
    assert_eq!(
        lines[1].find("64.0 MiB"),
        lines[2].find("64.0 MiB"),
        "{text}"
    );
    assert!(!text.contains("None") && !text.contains("Use"), "{text}");

    let show = run(vmbackup().args(["show", "-d"]).arg(&store).arg(&latest));
    assert!(
        show.contains(
            "disk0: 64.0 MiB (67108864 bytes), raw, incremental\n            checkpoint cbt0"
        ),
        "{show}"
    );
    // The time as RFC 3339, as the snapshot id ends with it (the id may
    // add `-N` when two snapshots share a second).
    let time = show
        .lines()
        .find_map(|l| l.strip_prefix("  time      "))
        .unwrap_or_else(|| panic!("{show}"));
    assert!(time.ends_with('Z') && time.contains('T'), "{show}");
    assert!(
        latest.rsplit('/').next().unwrap().starts_with(time),
        "{show}"
    );
    assert!(show.contains("guest     qemu-vm (platform nbd)"), "{show}");

    // Instant restore: serve the snapshot and let qemu-img pull it.
    let mut serve = vmbackup()
        .args(["serve", "--listen", "127.0.0.1:0", "-d"])
        .arg(&store)
        .args([&latest, "disk0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let serve = Killed(serve);
    let uri = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no URI in {line:?}"))
        .to_owned();
    let restored = dir.path().join("restored.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", &uri, "-O", "qcow2"])
        .arg(&restored));
    drop(serve);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&restored)
        .arg(&image));
    // Sparse: the holes of the source stay holes.
    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&restored));
    let allocated: u64 = serde_json::from_str::<serde_json::Value>(&map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        allocated <= 13 << 20,
        "restored image allocates {allocated} bytes"
    );

    let verify = run(vmbackup().args(["verify", "-d"]).arg(&store));
    assert!(verify.contains("0 bad"), "{verify}");
}

/// A `--bitmap` the export does not offer is refused on the first backup
/// too (exit 2, before any datastore exists): a full backup would record
/// the missing bitmap as its checkpoint and every later incremental would
/// fail (issue 13, item 6).
#[test]
fn a_bitmap_the_export_does_not_offer_is_refused_on_the_first_backup() {
    if !(have("qemu-img") && have("qemu-nbd")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let sock = dir.path().join("nbd.sock");
    let store = dir.path().join("store");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("4M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "--granularity", "64K"])
        .arg(&image)
        .arg("cbt0"));
    let _nbd = qemu_nbd(&image, &sock);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = vmbackup()
        .args([
            "backup", "--id", "qemu-vm", "--bitmap", "nosuch", "--nbd", &uri, "-d",
        ])
        .arg(&store)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("\"nosuch\""), "{err}");
    assert!(!store.exists(), "a refused backup created the datastore");
}
