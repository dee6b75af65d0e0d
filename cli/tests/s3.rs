//! A datastore on S3 (moto) through the command line, shared by several
//! `vmbackup` processes: `init` (encrypted by default there), two backups
//! at once with a GC looping beside them, a third backup and a GC killed
//! (`kill -9`) half-way, then every snapshot listed restores byte for byte
//! (and one through `serve` and qemu-img) and verifies, the killed backup's guest backs up again once its leases
//! lapse, and a foreign bucket, a missing bucket and a wrong key are one
//! clear error each.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use scenarios::s3::Moto;

use crate::common;
use common::{Killed, have, spawn_listening};

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn qemu_nbd(image: &Path, sock: &Path) -> Killed {
    spawn_listening(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-e", "8", "-x", "disk", "-f", "raw", "-k"])
            .arg(sock)
            .arg(image),
        sock,
    )
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn several_hosts_share_an_encrypted_datastore_on_s3() {
    if !(have("qemu-nbd") && have("qemu-img")) {
        return;
    }
    let Some(moto) = Moto::start(false) else {
        return;
    };
    moto.create_bucket("vmbackup-cli");
    let dir = tempfile::tempdir().unwrap();
    let (key, pass) = (dir.path().join("s3.key"), dir.path().join("pass"));
    std::fs::write(&pass, "s3 passphrase\n").unwrap();
    let repo = "s3://vmbackup-cli/site-a";
    let vmbackup = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
        c.env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
            .env(
                "AWS_SECRET_ACCESS_KEY",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            )
            .env("AWS_REGION", "us-east-1")
            .env("VMBACKUP_LEASE_TTL", "3")
            .env_remove("VMBACKUP_KEYFILE")
            .env_remove("VMBACKUP_DATASTORE");
        c
    };
    let keyed = |args: &[&str]| {
        let mut c = vmbackup();
        c.args(args)
            .args(["-d", repo, "--keyfile"])
            .arg(&key)
            .arg("--passphrase-file")
            .arg(&pass);
        c
    };

    // Encrypted unless said otherwise.
    let err = fails(vmbackup().args(["init", "-d", repo]));
    assert!(err.contains("--no-encryption"), "{err}");
    run(&mut keyed(&["init", "--new-key"]));

    // Three guests' disks: 12 MiB each, different data, first and last
    // bytes set, a hole in the middle.
    let mut socks = Vec::new();
    let mut images = Vec::new();
    let mut servers = Vec::new();
    for g in 0..3u32 {
        let image = dir.path().join(format!("vm{g}.raw"));
        let mut disk: Vec<u8> = (0..12u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761 + g) >> 13) as u8)
            .collect();
        disk[4 << 20..6 << 20].fill(0);
        let n = disk.len();
        disk[0] = 0xA5;
        disk[n - 1] = 0x5A;
        std::fs::write(&image, &disk).unwrap();
        let sock = dir.path().join(format!("vm{g}.sock"));
        servers.push(qemu_nbd(&image, &sock));
        socks.push(format!("nbd+unix:///disk?socket={}", sock.display()));
        images.push(image);
    }
    // Rate-limited so that they overlap, and the victim is still running
    // when it is killed.
    let backup = |g: usize, mib_s: &str| {
        keyed(&[
            "backup",
            "--id",
            &format!("vm{g}"),
            "--nbd",
            &socks[g],
            "--bwlimit",
            mib_s,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };

    // Host A and host B back up at once, host C runs GC in a loop; a
    // backup of vm2 and one GC are killed half-way.
    let a = backup(0, "4");
    let b = backup(1, "4");
    let mut victim = backup(2, "1");
    let mut gc_victim = keyed(&["gc"]).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the victim finished too soon"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    gc_victim.kill().unwrap();
    gc_victim.wait().unwrap();
    let mut gcs = 0;
    let (mut a, mut b) = (Some(a), Some(b));
    let start = std::time::Instant::now();
    while a.is_some() || b.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "backups did not finish"
        );
        let out = keyed(&["gc"]).output().unwrap();
        // A GC waits for, or is refused by, another's lease; both are fine.
        if out.status.success() {
            gcs += 1;
        }
        for c in [&mut a, &mut b] {
            if let Some(child) = c
                && let Some(status) = child.try_wait().unwrap()
            {
                let out = c.take().unwrap().wait_with_output().unwrap();
                assert!(status.success(), "a backup failed: {}", text(&out));
            }
        }
    }
    assert!(gcs > 0, "no GC ran beside the backups");

    // The killed backup left no snapshot; its guest backs up again (its
    // leases lapse after VMBACKUP_LEASE_TTL).
    let list: serde_json::Value =
        serde_json::from_str(&run(&mut keyed(&["--json", "list"]))).unwrap();
    let guests: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["guest"].as_str().unwrap())
        .collect();
    assert_eq!(guests.iter().filter(|g| **g == "vm2").count(), 0, "{list}");
    let out = keyed(&["backup", "--id", "vm2", "--nbd", &socks[2]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    drop(servers);

    // Every snapshot restores byte for byte, and verifies.
    let list: serde_json::Value =
        serde_json::from_str(&run(&mut keyed(&["--json", "list"]))).unwrap();
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 3, "{list}");
    for s in snaps {
        let id = s["id"].as_str().unwrap();
        let g: usize = s["guest"].as_str().unwrap()[2..].parse().unwrap();
        let to = dir.path().join(format!("restored-{g}"));
        run(&mut keyed(&["restore", id, "--to", to.to_str().unwrap()]));
        let files: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(sha256(&files[0]), sha256(&images[g]), "{id}");
    }
    run(&mut keyed(&["verify"]));
    run(&mut keyed(&["gc"]));
    run(&mut keyed(&["verify"]));

    // Instant restore from S3: `serve`, read back by qemu-img.
    let first = snaps[0]["id"].as_str().unwrap();
    let g: usize = snaps[0]["guest"].as_str().unwrap()[2..].parse().unwrap();
    let mut serve = keyed(&["serve", "--listen", "127.0.0.1:0", first, "disk0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(serve.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let serve = Killed(serve);
    let uri = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no URI in {line:?}"))
        .to_owned();
    let served = dir.path().join("served.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", &uri, "-O", "raw"])
        .arg(&served));
    drop(serve);
    assert_eq!(sha256(&served), sha256(&images[g]), "served {first}");

    // One clear error each: no key, a wrong passphrase, a missing bucket, a
    // bucket holding something else.
    let err = fails(vmbackup().args(["list", "-d", repo]));
    assert!(
        err.contains("is encrypted") && err.contains("--keyfile"),
        "{err}"
    );
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let err = fails(
        vmbackup()
            .args(["list", "-d", repo, "--keyfile"])
            .arg(&key)
            .arg("--passphrase-file")
            .arg(&wrong),
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    let err = fails(vmbackup().args(["list", "-d", "s3://no-such-bucket/x"]));
    assert!(err.contains("the bucket does not exist"), "{err}");
    let foreign = scenarios::s3::options_at(&moto.endpoint, "vmbackup-cli", "other");
    datastore::backend::Backend::put(
        &datastore::backend::S3Backend::new(&foreign).unwrap(),
        "photos/cat.jpg",
        bytes::Bytes::from_static(b"\xff\xd8"),
    )
    .unwrap();
    let err = fails(vmbackup().args(["list", "-d", "s3://vmbackup-cli/other"]));
    assert!(err.contains("is not a vmbackup datastore"), "{err}");
    let err = fails(vmbackup().args(["init", "--no-encryption", "-d", "s3://vmbackup-cli/other"]));
    assert!(err.contains("refusing to create a datastore"), "{err}");
}
