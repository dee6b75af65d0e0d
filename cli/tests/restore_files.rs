//! `vmbackup restore -d STORE SNAPSHOT --to DIR` of a multi-disk snapshot
//! writes one raw file per volume, each with the exact bytes the disk held
//! at backup time (issue 12: both volumes used to go to one file, the
//! second truncating the first, and the command reported success), and a
//! second restore under the same name is refused without touching the
//! first one's files.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};

fn vmbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbackup"))
}

/// The mock hypervisor, killed (and reaped) on drop.
struct Mock(Child);
impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_mock(state_dir: &Path) -> (Mock, Value) {
    let mut child = vmbackup()
        .args(["mock", "--seed-demo", "--state-dir"])
        .arg(state_dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting `vmbackup mock`");
    let stdout = child.stdout.take().expect("the mock's stdout");
    let mock = Mock(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the mock prints its endpoints");
    let endpoints: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the mock's endpoints line {line:?}: {e}"));
    (mock, endpoints)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running vmbackup");
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(path: &Path) -> (u64, String) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).expect("reading a restored file");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    (len, hex)
}

/// (name, size, sha256) of every file in `dir`, sorted by name.
fn files_in(dir: &Path) -> Vec<(String, u64, String)> {
    let mut out: Vec<(String, u64, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            let (size, sha) = sha256_file(&e.path());
            (e.file_name().to_string_lossy().into_owned(), size, sha)
        })
        .collect();
    out.sort();
    out
}

/// The restore naming rule for a multi-volume snapshot (provider-nbd):
/// `<name>-<device>.raw`, characters outside `[A-Za-z0-9._-]` as `_`.
fn file_for(name: &str, device: &str) -> String {
    let device: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}-{device}.raw")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_disk_snapshot_restores_to_one_file_per_volume_with_the_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, endpoints) = start_mock(&dir.path().join("mock"));
    let admin = endpoints["admin_url"]
        .as_str()
        .expect("admin_url")
        .to_owned();
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(&path).send().await.expect(&path);
            assert!(r.status().is_success(), "GET {path}: {}", r.status());
            r.json::<Value>().await.expect(&path)
        }
    };

    // The oVirt demo VM with two disks, and what each disk holds now.
    let objects = get(format!("{admin}/ovirt/objects")).await;
    let vm = objects["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["name"] == "ovirt-vm1")
        .unwrap_or_else(|| panic!("no ovirt-vm1 in {objects}"))
        .clone();
    let vm_id = vm["id"].as_str().expect("vm id").to_owned();
    let disks: Vec<String> = vm["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["id"].as_str().expect("disk id").to_owned())
        .collect();
    assert_eq!(disks.len(), 2, "ovirt-vm1 has two disks: {vm}");
    // (size, sha256) of each disk as the guest sees it, at backup time.
    let mut at_backup = Vec::new();
    for d in &disks {
        let v = get(format!("{admin}/disks/{d}/sha256")).await;
        at_backup.push((
            v["size"].as_u64().expect("size"),
            v["sha256"].as_str().expect("sha256").to_owned(),
        ));
    }
    assert_ne!(at_backup[0], at_backup[1], "the two disks differ");

    // Back up through a config file.
    let store = dir.path().join("store");
    let ovirt = &endpoints["ovirt"];
    let config = dir.path().join("vmbackup.toml");
    std::fs::write(
        &config,
        format!(
            "datastore = {:?}\n\n[platforms.engine]\nkind = \"ovirt\"\nendpoint = {:?}\n\
             username = {:?}\npassword = {:?}\nappliance = \"backup-appliance\"\ntls_ca = {:?}\n",
            store,
            ovirt["base_url"].as_str().expect("ovirt base_url"),
            ovirt["username"].as_str().expect("ovirt username"),
            ovirt["password"].as_str().expect("ovirt password"),
            ovirt["ca_file"]
                .as_str()
                .expect("ovirt ca_file (the engine is HTTPS only)"),
        ),
    )
    .unwrap();
    let rows: Value = serde_json::from_str(&run_ok(
        vmbackup().args(["--json", "--config"]).arg(&config).args([
            "backup",
            "--platform",
            "engine",
            "--guest",
            &vm_id,
        ]),
    ))
    .expect("backup --json");
    assert!(rows[0]["error"].is_null(), "{rows}");

    // The snapshot and its volumes (devices, sizes).
    let list: Value = serde_json::from_str(&run_ok(
        vmbackup().arg("--json").arg("list").arg("-d").arg(&store),
    ))
    .expect("list --json");
    let snapshots = list.as_array().expect("a list");
    assert_eq!(snapshots.len(), 1, "{list}");
    let snapshot = snapshots[0]["id"].as_str().expect("snapshot id").to_owned();
    let guest = snapshots[0]["guest"].as_str().expect("guest").to_owned();
    let volumes: Vec<(String, u64)> = snapshots[0]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            (
                v["volume"]["device"].as_str().expect("device").to_owned(),
                v["volume"]["size"].as_u64().expect("size"),
            )
        })
        .collect();
    assert_eq!(volumes.len(), 2, "{list}");

    // Restore into raw files.
    let out_dir = dir.path().join("out");
    let restore = |out_dir: &PathBuf| {
        vmbackup()
            .args(["restore", "-d"])
            .arg(&store)
            .arg(&snapshot)
            .arg("--to")
            .arg(out_dir)
            .output()
            .expect("running vmbackup restore")
    };
    let first = restore(&out_dir);
    assert!(first.status.success(), "restore failed: {}", text(&first));

    // One file per volume, named after the volume, holding exactly what
    // the disk held at backup time.
    let name = format!("{guest}-restored");
    let files = files_in(&out_dir);
    let mut expected_names: Vec<String> = volumes.iter().map(|(d, _)| file_for(&name, d)).collect();
    expected_names.sort();
    assert_eq!(
        files.iter().map(|f| f.0.clone()).collect::<Vec<_>>(),
        expected_names,
        "one file per volume in {}",
        out_dir.display()
    );
    let by_name: BTreeMap<&str, (u64, &str)> = files
        .iter()
        .map(|(n, size, sha)| (n.as_str(), (*size, sha.as_str())))
        .collect();
    for (device, size) in &volumes {
        let file = file_for(&name, device);
        let (found_size, found_sha) = by_name[file.as_str()];
        assert_eq!(found_size, *size, "{file}: the size of volume {device}");
        assert!(
            at_backup
                .iter()
                .any(|(s, sha)| *s == found_size && sha == found_sha),
            "{file} (volume {device}, {found_size} bytes, sha256 {found_sha}) is not the \
             content of any disk of ovirt-vm1 at backup time: {at_backup:?}"
        );
    }
    // And every disk came back (not one disk twice).
    for (size, sha) in &at_backup {
        assert!(
            files.iter().any(|(_, s, h)| s == size && h == sha),
            "disk content ({size} bytes, sha256 {sha}) is in no restored file: {files:?}"
        );
    }

    // A second restore under the same name is refused, names the file
    // that exists, and leaves the first restore's files as they were.
    let second = restore(&out_dir);
    assert_eq!(
        second.status.code(),
        Some(1),
        "a second restore over existing files must fail: {}",
        text(&second)
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        files
            .iter()
            .any(|(n, _, _)| stderr.contains(&*out_dir.join(n).to_string_lossy())),
        "the refusal names the existing file: {}",
        text(&second)
    );
    assert_eq!(
        files_in(&out_dir),
        files,
        "the refused restore changed {} (or left files in it)",
        out_dir.display()
    );
}
