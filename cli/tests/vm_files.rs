//! Files out of a VM backup without restoring the disk: the README's
//! recipe, run as written. A guest disk holding an ext4 file system (made
//! by mkfs.ext4 from a directory, no mount needed) is backed up from a
//! qemu-nbd export; `vmbackup serve` exports the snapshot's volume;
//! `nbdfuse` shows it as a file; `debugfs` reads files out of it. Only
//! the blocks those reads touch are read from the datastore.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common;
use common::{Killed, have, run, spawn_listening, vmbackup};

fn wait_for(p: &Path) {
    for _ in 0..200 {
        if p.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} did not appear", p.display());
}

#[test]
fn files_come_out_of_a_served_ext4_disk_with_nbdfuse_and_debugfs() {
    if !(have("qemu-nbd") && have("nbdfuse") && have("debugfs") && have("mkfs.ext4")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("guest-root");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("var/lib")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"guest-42\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    std::fs::write(src.join("var/lib/data.bin"), &big).unwrap();
    let image = dir.path().join("disk.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&image)
        .arg("64M"));

    // Back the disk up from a qemu-nbd export.
    let sock = dir.path().join("nbd.sock");
    let _nbd = spawn_listening(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-x", "disk", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(&image),
        &sock,
    );
    let store = dir.path().join("store");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    run(vmbackup()
        .args(["backup", "--id", "vm1", "--nbd", &uri, "-d"])
        .arg(&store));
    let list: serde_json::Value =
        serde_json::from_str(&run(vmbackup().args(["--json", "list", "-d"]).arg(&store))).unwrap();
    let snap = list[0]["id"].as_str().unwrap().to_owned();

    // The recipe: serve, nbdfuse, debugfs.
    let mut serve = vmbackup()
        .args(["serve", "--listen", "127.0.0.1:0", &snap, "disk0", "-d"])
        .arg(&store)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _serve = Killed(serve);
    let served = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no URI in {line:?}"))
        .to_owned();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fuse = Killed(
        Command::new("nbdfuse")
            .arg("--readonly")
            .arg(&mnt)
            .arg(&served)
            .spawn()
            .unwrap(),
    );
    let disk = mnt.join("nbd");
    wait_for(&disk);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dump = |from: &str, to: &Path| {
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump -p {from} {}", to.display()))
            .arg(&disk));
    };
    dump("/etc/hostname", &out.join("hostname"));
    dump("/var/lib/data.bin", &out.join("data.bin"));
    let _ = Command::new("umount").arg(&mnt).status();
    drop(fuse);
    assert_eq!(std::fs::read(out.join("hostname")).unwrap(), b"guest-42\n");
    assert!(std::fs::read(out.join("data.bin")).unwrap() == big);
}
