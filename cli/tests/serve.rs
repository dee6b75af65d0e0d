//! `vmbackup serve` (instant restore) as a network service: real NBD
//! clients (nbdcopy, nbdinfo from libnbd, and vmbackup's own client) over
//! TLS with client certificates, zero chunks mapped as holes, listening
//! beyond loopback refused without TLS, a busy port named, and SIGTERM
//! ending the server promptly while clients are reading.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common;
use common::{Killed, have, spawn_listening};

const MIB: u64 = 1 << 20;

fn vmbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbackup"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&data))
}

/// A 64 MiB raw disk: data in the first and last bytes, a 4 MiB chunk of
/// zeroes written as data (allocated, so the source reports it as data),
/// random data across a chunk boundary, and a hole.
fn make_disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>()
    };
    use std::os::unix::fs::FileExt;
    f.write_all_at(&random(MIB as usize), 0).unwrap();
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 8 * MIB)
        .unwrap();
    f.write_all_at(&random(2 * MIB as usize), 15 * MIB).unwrap();
    f.write_all_at(&random(4096), 64 * MIB - 4096).unwrap();
    f.sync_all().unwrap();
}

/// Back `disk` up into `store` through qemu-nbd; returns the snapshot id.
fn backup_disk(dir: &Path, disk: &Path, store: &Path) -> String {
    let sock = dir.join("src.sock");
    let _nbd = spawn_listening(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-x", "disk", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(disk),
        &sock,
    );
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    run(vmbackup()
        .args(["--json", "backup", "--id", "vm", "--nbd", &uri, "-d"])
        .arg(store));
    let list: serde_json::Value =
        serde_json::from_str(&run(vmbackup().args(["--json", "list", "-d"]).arg(store))).unwrap();
    list[0]["id"].as_str().unwrap().to_owned()
}

/// Start `vmbackup serve` with `extra` arguments; returns it and the URI
/// it prints.
fn serve(store: &Path, snapshot: &str, extra: &[&str]) -> (Killed, String) {
    let mut child = vmbackup()
        .args(["serve", "-d"])
        .arg(store)
        .args([snapshot, "disk0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://") || w.starts_with("nbds://"))
        .unwrap_or_else(|| panic!("no URI in {line:?}"))
        .to_owned();
    (Killed(child), uri)
}

/// SIGTERM, then the exit status within `limit` (None: still running).
fn terminate(server: &mut Killed, limit: Duration) -> Option<std::process::ExitStatus> {
    let pid = server.0.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = server.0.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn setup(dir: &Path) -> (PathBuf, PathBuf, String) {
    let disk = dir.join("disk.raw");
    make_disk(&disk);
    let store = dir.join("store");
    let snapshot = backup_disk(dir, &disk, &store);
    (disk, store, snapshot)
}

#[test]
fn instant_restore_over_tls_admits_only_clients_with_a_certificate() {
    if !(have("qemu-nbd") && have("nbdcopy") && have("nbdinfo")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (disk, store, snapshot) = setup(dir.path());
    let pki = dir.path().join("pki");
    mock_hypervisor::tls::ensure(&pki, &[]).unwrap();
    let file = |n: &str| pki.join(n).to_string_lossy().into_owned();
    let (_server, uri) = serve(
        &store,
        &snapshot,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &file("server-cert.pem"),
            "--tls-key",
            &file("server-key.pem"),
            "--tls-client-ca",
            &file("ca-cert.pem"),
        ],
    );
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");

    // libnbd with the client certificate: the exact bytes.
    let with_certs = format!("{uri}?tls-certificates={}", pki.display());
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(&with_certs).arg(&copy));
    assert_eq!(sha256(&copy), sha256(&disk));

    // Plain NBD is refused (TLS is required).
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let out = Command::new("nbdinfo").arg(&plain).output().unwrap();
    assert!(
        !out.status.success(),
        "plain NBD was served: {}",
        text(&out)
    );

    // vmbackup's own client: with its certificate it backs the served
    // snapshot up into a second datastore, restored byte for byte.
    let store2 = dir.path().join("store2");
    let backup = |with_cert: bool| {
        let mut cmd = vmbackup();
        cmd.args(["backup", "--id", "copy", "--nbd", &uri, "--tls-ca"])
            .arg(pki.join("ca-cert.pem"));
        if with_cert {
            cmd.arg("--tls-cert")
                .arg(pki.join("client-cert.pem"))
                .arg("--tls-key")
                .arg(pki.join("client-key.pem"));
        }
        cmd.arg("-d").arg(&store2).output().unwrap()
    };
    let refused = backup(false);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("requires a client certificate"),
        "{}",
        text(&refused)
    );
    let out = backup(true);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value =
        serde_json::from_str(&run(vmbackup().args(["--json", "list", "-d"]).arg(&store2))).unwrap();
    let copied = list[0]["id"].as_str().unwrap().to_owned();
    let to = dir.path().join("restored");
    run(vmbackup()
        .args(["restore", "--name", "r", "-d"])
        .arg(&store2)
        .arg(&copied)
        .arg("--to")
        .arg(&to));
    assert_eq!(sha256(&to.join("r.raw")), sha256(&disk));
}

#[test]
fn zero_chunks_are_served_as_holes() {
    if !(have("qemu-nbd") && have("nbdinfo")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_disk, store, snapshot) = setup(dir.path());
    let (_server, uri) = serve(&store, &snapshot, &["--listen", "127.0.0.1:0"]);
    let map: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").args(["--map", "--json", &uri])))
            .unwrap();
    let state_at = |offset: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= offset && offset < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("{offset} not mapped: {map}"))
    };
    // 8-12 MiB was written as zeroes by the guest: a hole, not data.
    assert_eq!(state_at(8 * MIB), 3, "{map}");
    assert_eq!(state_at(12 * MIB - 1), 3, "{map}");
    assert_eq!(state_at(0), 0, "{map}");
    assert_eq!(state_at(16 * MIB), 0, "{map}");
    assert_eq!(state_at(64 * MIB - 1), 0, "{map}");
    assert_eq!(state_at(40 * MIB), 3, "{map}");
}

#[test]
fn listening_beyond_loopback_needs_tls_or_insecure_listen() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    datastore::Datastore::create(&store, datastore::DatastoreOptions::default()).unwrap();
    let out = vmbackup()
        .args(["serve", "-d"])
        .arg(&store)
        .args(["nbd/vm/x", "disk0", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--insecure-listen"), "{}", text(&out));
}

#[test]
fn a_busy_port_is_named() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_disk, store, snapshot) = setup(dir.path());
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = vmbackup()
        .args(["serve", "-d"])
        .arg(&store)
        .args([&snapshot, "disk0", "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&addr),
        "{}",
        text(&out)
    );
}

/// SIGTERM stops accepting and ends the server within a second or so,
/// even while clients have many reads in flight; exit status 0.
#[test]
fn sigterm_stops_the_server_while_clients_read() {
    if !(have("qemu-nbd") && have("nbdcopy")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_disk, store, snapshot) = setup(dir.path());
    let (mut server, uri) = serve(
        &store,
        &snapshot,
        &["--listen", "0.0.0.0:0", "--insecure-listen"],
    );
    let uri = uri.replacen("0.0.0.0", "127.0.0.1", 1);
    // Readers that keep the server busy (the disk is copied again and
    // again) when the signal comes.
    let mut readers: Vec<Killed> = (0..4)
        .map(|_| {
            Killed(
                Command::new("sh")
                    .args([
                        "-c",
                        &format!("while nbdcopy --requests=64 '{uri}' null: ; do :; done"),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let status = terminate(&mut server, Duration::from_secs(3));
    readers.clear();
    let status = status.expect("serve still running 3 s after SIGTERM");
    assert!(status.success(), "serve exited with {status}");
    let mut stderr = String::new();
    if let Some(mut e) = server.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
