//! Interrupted jobs leave the platform clean (issue 12, item 4).
//!
//! For each platform of the mock hypervisor, a `vmbackup backup` slowed by
//! `--bwlimit` is interrupted while it holds platform objects (snapshots,
//! backups, transfers, leases, exports):
//!
//! - SIGTERM: the command runs its cleanups, exits with 128 + 15 and
//!   publishes nothing; the platform holds nothing afterwards;
//! - kill -9: no cleanup can run, the objects stay; the next job of the
//!   same host sweeps them in `job_init` (their job marker names a job
//!   that no longer runs), backs the guest up and leaves the platform
//!   clean.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vmbackup(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    c.env("VMBACKUP_STATE_DIR", state)
        .env("VMBACKUP_HOST_ID", "interrupt-test-host")
        .env_remove("VMBACKUP_LOG");
    c
}

fn start_mock(dir: &Path) -> (Killed, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .args(["mock", "--seed-demo", "--state-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the mock");
    let stdout = child.stdout.take().unwrap();
    let mock = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    (mock, serde_json::from_str(&line).unwrap())
}

/// What the platform holds that a backup creates and must remove.
async fn held(admin: &str, platform: &str) -> Vec<String> {
    let objects: Value = reqwest::get(format!("{admin}/objects"))
        .await
        .expect("GET /admin/objects")
        .json()
        .await
        .expect("GET /admin/objects");
    let keys: &[&str] = match platform {
        "ovirt" => &[
            "active_backups",
            "active_transfers",
            "appliance_files",
            "backup_attachments",
            "snapshots",
            "exports",
        ],
        "scp" => &[
            "backup_resources",
            "exports",
            "hotadds",
            "running_tasks",
            "snapshots",
            "temporary_base_images",
        ],
        "zstack" => &["exports", "running_jobs", "snapshots", "temporary_images"],
        other => panic!("{other}"),
    };
    let p = &objects["platforms"][platform];
    let mut held = Vec::new();
    for k in keys {
        let n = match &p[*k] {
            Value::Array(a) => a.len() as u64,
            Value::Number(n) => n.as_u64().unwrap_or(0),
            Value::Null => panic!("the mock's {platform} objects have no {k}: {p}"),
            other => panic!("{platform} {k}: {other}"),
        };
        if n > 0 {
            held.push(format!("{platform} {k}: {n}"));
        }
    }
    if let Some(e) = objects["exports"].as_array()
        && !e.is_empty()
    {
        held.push(format!("NBD exports: {}", e.len()));
    }
    held
}

fn config(dir: &Path, endpoints: &Value, platform: &str) -> std::path::PathBuf {
    let e = &endpoints[platform];
    let s = |k: &str| {
        e[k].as_str()
            .unwrap_or_else(|| panic!("{platform} {k}: {e}"))
            .to_owned()
    };
    let body = match platform {
        "scp" => format!(
            "kind = \"scp\"\nendpoint = {:?}\nusername = {:?}\npassword = {:?}\n",
            s("base_url"),
            s("username"),
            s("password")
        ),
        "ovirt" => format!(
            "kind = \"ovirt\"\nendpoint = {:?}\nusername = {:?}\npassword = {:?}\nappliance = \"backup-appliance\"\ntls_ca = {:?}\n",
            s("base_url"),
            s("username"),
            s("password"),
            s("ca_file")
        ),
        "zstack" => format!(
            "kind = \"zstack\"\nendpoint = {:?}\nusername = {:?}\npassword = {:?}\nwork_dir = {:?}\n",
            s("base_url"),
            s("account"),
            s("password"),
            dir.join("zstack-work")
        ),
        other => panic!("{other}"),
    };
    let path = dir.join("vmbackup.toml");
    std::fs::write(
        &path,
        format!(
            "datastore = {:?}\n\n[platforms.p]\n{body}",
            dir.join("store")
        ),
    )
    .unwrap();
    path
}

async fn guest(admin: &str, platform: &str, name: &str) -> String {
    let objects: Value = reqwest::get(format!("{admin}/{platform}/objects"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = match platform {
        "scp" => &objects["servers"],
        _ => &objects["vms"],
    };
    let vm = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {objects}"));
    vm["id"]
        .as_str()
        .or(vm["uuid"].as_str())
        .unwrap()
        .to_owned()
}

/// Starts a slow backup and waits until the platform holds its objects.
async fn slow_backup(state: &Path, cfg: &Path, vm: &str, admin: &str, platform: &str) -> Killed {
    let child = vmbackup(state)
        .arg("--config")
        .arg(cfg)
        .args(["backup", "--platform", "p", "--guest", vm, "--bwlimit", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("{platform}: the backup ended ({status}) before it could be interrupted");
        }
        if !held(admin, platform).await.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{platform}: the backup never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the copy run a little.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "{platform}: the backup finished too early to be interrupted; slow it down"
    );
    child
}

fn snapshots(state: &Path, cfg: &Path) -> usize {
    let out = vmbackup(state)
        .args(["--json", "--config"])
        .arg(cfg)
        .arg("list")
        .output()
        .unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    list.as_array().map_or(0, Vec::len)
}

async fn interrupted_jobs_leave_the_platform_clean(platform: &str, vm_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, endpoints) = start_mock(&dir.path().join("mock"));
    let admin = endpoints["admin_url"].as_str().unwrap().to_owned();
    let state = dir.path().join("state");
    let cfg = config(dir.path(), &endpoints, platform);
    let vm = guest(&admin, platform, vm_name).await;
    assert!(
        held(&admin, platform).await.is_empty(),
        "{:?}",
        held(&admin, platform).await
    );

    // 1. SIGTERM: cleanups run before exit.
    let mut child = slow_backup(&state, &cfg, &vm, &admin, platform).await;
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{platform}: SIGTERM did not end the backup"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(143), "{platform}: {status}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{platform}: {stderr}");
    assert!(
        held(&admin, platform).await.is_empty(),
        "{platform}: SIGTERM left {:?}\n{stderr}",
        held(&admin, platform).await
    );
    assert_eq!(
        snapshots(&state, &cfg),
        0,
        "{platform}: an interrupted backup published"
    );

    // 2. kill -9: the objects stay, the next job sweeps them.
    let mut child = slow_backup(&state, &cfg, &vm, &admin, platform).await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Operations the dead job started on the platform (ZStack API jobs,
    // SCP tasks) still finish there and may create objects after the kill;
    // let them, as they would before the next scheduled job. (An object
    // created after a sweep carries the dead job's marker and is swept by
    // the job after.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while held(&admin, platform)
        .await
        .iter()
        .any(|h| h.contains("running_"))
    {
        assert!(
            Instant::now() < deadline,
            "{platform}: platform jobs never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = held(&admin, platform).await;
    assert!(
        !left.is_empty(),
        "{platform}: kill -9 left nothing to sweep"
    );
    let out = vmbackup(&state)
        .args(["--json", "--config"])
        .arg(&cfg)
        .args(["backup", "--platform", "p", "--guest", &vm])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{platform}: the backup after kill -9 failed (left: {left:?}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        held(&admin, platform).await.is_empty(),
        "{platform}: after the next job the platform still holds {:?} (the killed job left {left:?})",
        held(&admin, platform).await
    );
    assert_eq!(snapshots(&state, &cfg), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp() {
    interrupted_jobs_leave_the_platform_clean("scp", "full-vm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovirt() {
    interrupted_jobs_leave_the_platform_clean("ovirt", "ovirt-vm1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstack() {
    interrupted_jobs_leave_the_platform_clean("zstack", "zs-vm-1").await;
}

/// A guest that fails is also reported on stderr, one line naming the
/// guest and the cause, and log lines carry no ANSI colour codes when
/// stderr is not a terminal (issue 13, item 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_guest_is_one_plain_line_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, endpoints) = start_mock(&dir.path().join("mock"));
    let state = dir.path().join("state");
    let cfg = config(dir.path(), &endpoints, "scp");
    let out = vmbackup(&state)
        .env("VMBACKUP_LOG", "info")
        .args(["--json", "--config"])
        .arg(&cfg)
        .args(["backup", "--platform", "p", "--guest", "no-such-server"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: guest no-such-server:"))
        .unwrap_or_else(|| panic!("no error line for the guest on stderr:\n{err}"));
    assert!(line.len() > "error: guest no-such-server: ".len(), "{line}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes on a non-terminal stderr:\n{err}"
    );
}
