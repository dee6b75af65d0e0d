//! An encrypted datastore end to end through the command line: `init
//! --new-key`, a backup of a qemu-nbd export, every reading command with
//! the key file (restore compared byte for byte, `serve` read back by
//! qemu-img, verify, prune, gc), clear errors without the key or with a
//! wrong passphrase, and none of the disk's bytes readable in the store.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common;
use common::{Killed, have, spawn_listening};

const MARKER: &[u8] = b"==encrypted-store-marker-5d1e==";

fn vmbackup() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    for var in [
        "VMBACKUP_KEYFILE",
        "VMBACKUP_PASSPHRASE",
        "VMBACKUP_DATASTORE",
    ] {
        c.env_remove(var);
    }
    c
}

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
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn qemu_nbd(image: &Path, sock: &Path) -> Killed {
    spawn_listening(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-x", "disk", "-f", "raw", "-k"])
            .arg(sock)
            .arg(image),
        sock,
    )
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every file under `root` whose bytes contain `needle`.
fn leaking(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if std::fs::read(&p)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn an_encrypted_datastore_through_the_command_line() {
    if !(have("qemu-img") && have("qemu-nbd")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, key, pass, wrong) = (
        dir.path().join("store"),
        dir.path().join("vm.key"),
        dir.path().join("pass"),
        dir.path().join("wrong"),
    );
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    std::fs::write(&wrong, "incorrect horse\n").unwrap();
    let with_key = |args: &[&str]| {
        let mut c = vmbackup();
        c.args(args)
            .arg("-d")
            .arg(&store)
            .arg("--keyfile")
            .arg(&key)
            .arg("--passphrase-file")
            .arg(&pass);
        c
    };

    // A 12 MiB disk: noise-like data with the marker in its first and
    // last bytes and across a 4 MiB chunk boundary, and a zero hole.
    let image = dir.path().join("disk.raw");
    let mut disk: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    disk[5 << 20..6 << 20].fill(0);
    let n = disk.len();
    for at in [0, (4 << 20) - 9, n - MARKER.len()] {
        disk[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    std::fs::write(&image, &disk).unwrap();

    // init --new-key: the key file and the encrypted datastore.
    let out: serde_json::Value =
        serde_json::from_str(&run(&mut with_key(&["--json", "init", "--new-key"]))).unwrap();
    assert_eq!(out["encrypted"], true, "{out}");
    let fp = out["key_fingerprint"].as_str().unwrap().to_owned();
    let shown = run(vmbackup()
        .args(["key", "show", "--file"])
        .arg(&key)
        .arg("--passphrase-file")
        .arg(&pass));
    assert!(shown.contains(&fp), "{shown}");
    // A second init there is refused, and --new-key never overwrites.
    let err = fails(&mut with_key(&["init", "--new-key"]));
    assert!(err.contains(&*key.to_string_lossy()), "{err}");

    let sock = dir.path().join("nbd.sock");
    let nbd = qemu_nbd(&image, &sock);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    for _ in 0..2 {
        run(&mut with_key(&["backup", "--id", "vm1", "--nbd", &uri]));
    }
    drop(nbd);
    assert_eq!(leaking(&store, MARKER), Vec::<String>::new());

    // Without the key, or with a wrong passphrase: one clear error.
    let err = fails(vmbackup().args(["list", "-d"]).arg(&store));
    assert!(
        err.contains(&format!("is encrypted (key {fp})")) && err.contains("--keyfile"),
        "{err}"
    );
    let err = fails(
        vmbackup()
            .args(["list", "-d"])
            .arg(&store)
            .arg("--keyfile")
            .arg(&key)
            .arg("--passphrase-file")
            .arg(&wrong),
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    // A plain datastore refuses a key rather than ignoring it.
    let plain = dir.path().join("plain");
    run(vmbackup().args(["init", "-d"]).arg(&plain));
    let err = fails(
        vmbackup()
            .args(["list", "-d"])
            .arg(&plain)
            .arg("--keyfile")
            .arg(&key)
            .arg("--passphrase-file")
            .arg(&pass),
    );
    assert!(err.contains("is not encrypted"), "{err}");

    // With the key: list, restore byte for byte, serve, verify, prune, gc.
    let list: serde_json::Value =
        serde_json::from_str(&run(&mut with_key(&["--json", "list"]))).unwrap();
    let snaps: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(snaps.len(), 2, "{list}");
    let to = dir.path().join("restored");
    run(&mut with_key(&[
        "restore",
        &snaps[1],
        "--to",
        to.to_str().unwrap(),
    ]));
    let restored: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(sha256(&restored[0]), sha256(&image));

    let mut serve = with_key(&["serve", "--listen", "127.0.0.1:0", &snaps[1], "disk0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let serve = Killed(serve);
    let served_uri = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no URI in {line:?}"))
        .to_owned();
    let served = dir.path().join("served.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", &served_uri, "-O", "raw"])
        .arg(&served));
    drop(serve);
    assert_eq!(sha256(&served), sha256(&image));

    run(&mut with_key(&["verify"]));
    run(&mut with_key(&["prune", "--id", "vm1", "--keep-last", "1"]));
    run(&mut with_key(&["gc"]));
    let to2 = dir.path().join("restored2");
    run(&mut with_key(&[
        "restore",
        &snaps[1],
        "--to",
        to2.to_str().unwrap(),
    ]));
    let restored: Vec<_> = std::fs::read_dir(&to2)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sha256(&restored[0]), sha256(&image));
}
