//! Contract tests of the oVirt emulation with the real clients: the
//! official SDK (`ovirt-engine-sdk-python`) and `ovirt-imageio`, pinned in
//! `tests/python/requirements.txt`, run against a mock started in process,
//! over HTTPS with the mock's CA.
//!
//! - `sdk_calls.py`: every endpoint provider-ovirt uses, through the SDK;
//!   the disks read through a backup's image transfers match the mock's.
//! - The SDK's own examples, unchanged but for connection settings (see
//!   `tests/python/ovirt/README.md`): `vm_backup.py` (snapshot attach) and
//!   `backup_vm.py` (full, then incremental from the checkpoint, downloaded
//!   by imageio into qcow2 files), whose images are compared by sha256 with
//!   the mock's disk contents at each backup point.

use std::path::{Path, PathBuf};
use std::process::Command;

use scenarios::ovirt::{Env, MIB};
use scenarios::python;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The environment the scripts connect with.
fn engine_env(env: &Env) -> Vec<(String, String)> {
    let ep = &env.mock.endpoints().platforms["ovirt"];
    let s = |k: &str| ep[k].as_str().unwrap().to_owned();
    vec![
        ("OVIRT_URL".into(), s("engine_url")),
        ("OVIRT_API_URL".into(), s("base_url")),
        ("OVIRT_USER".into(), s("username")),
        ("OVIRT_PASSWORD".into(), s("password")),
        ("OVIRT_CA_FILE".into(), s("ca_file")),
        ("OVIRT_VM".into(), "vm1".into()),
        ("OVIRT_DATA_VM".into(), "vm1".into()),
        ("OVIRT_APPLIANCE".into(), "backup-appliance".into()),
        ("OVIRT_AGENT_VM".into(), "backup-appliance".into()),
    ]
}

async fn run(script: &str, args: &[&str], env: &[(String, String)]) -> Option<String> {
    let script = script.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env = env.to_vec();
    // The mock runs on this runtime: the script must not block it.
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        python::run_script(&script, &args, &env)
    })
    .await
    .unwrap()
}

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&data))
}

/// The guest data of a downloaded qcow2 file (with its backing chain).
fn raw_sha(qcow2: &Path) -> String {
    let raw = qcow2.with_extension("raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow2)
        .arg(&raw)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert {}: {}",
        qcow2.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let sha = sha256_file(&raw);
    std::fs::remove_file(&raw).unwrap();
    sha
}

/// The file `backup_vm.py` downloaded for `disk` at checkpoint `cp`.
fn downloaded(dir: &Path, cp: &str, disk: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.contains(&format!(".{cp}.{disk}.")) && n.ends_with(".qcow2")
        })
        .unwrap_or_else(|| panic!("no download of disk {disk} at checkpoint {cp} in {dir:?}"))
}

fn created_checkpoint(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split("Created checkpoint '").nth(1))
        .and_then(|r| r.split('\'').next())
        .unwrap_or_else(|| panic!("no checkpoint in:\n{out}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_calls_every_endpoint_the_provider_uses() {
    if python::interpreter().is_none() {
        return;
    }
    let env = Env::start("up").await;
    let before = env.shas(&env.disks).await;
    let Some(out) = run("ovirt/sdk_calls.py", &[], &engine_env(&env)).await else {
        return;
    };
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let calls = v["calls"].as_u64().unwrap();
    eprintln!("SDK calls exercised: {calls}");
    assert!(calls >= 60, "{v}");
    for (disk, sha) in env.disks.iter().zip(&before) {
        assert_eq!(v["full"][disk].as_str(), Some(sha.as_str()), "disk {disk}");
    }
    // Only the qcow2 disk with incremental backup has dirty extents.
    assert_eq!(v["dirty"].as_object().unwrap().len(), 1, "{v}");
    assert!(
        env.leftovers().await.is_empty(),
        "{:?}",
        env.leftovers().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_example_vm_backup_attaches_snapshot_disks() {
    if python::interpreter().is_none() {
        return;
    }
    let env = Env::start("up").await;
    let work = env.dir.path().join("vm_backup");
    let work_s = work.display().to_string();
    run(
        "ovirt/run_example.py",
        &[&work_s, "vm_backup.py"],
        &engine_env(&env),
    )
    .await;
    // The OVF it saved is the VM's.
    let ovf = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ovf"))
        .expect("the example writes the OVF");
    assert!(std::fs::read_to_string(ovf).unwrap().contains("vm1"));
    // Snapshot detached and removed; two events in the audit log.
    assert!(
        env.leftovers().await.is_empty(),
        "{:?}",
        env.leftovers().await
    );
    let events = env.api_get("/events").await;
    assert_eq!(
        events["event"].as_array().map(Vec::len),
        Some(2),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_example_backup_vm_full_then_incremental_through_imageio() {
    if python::interpreter().is_none() {
        return;
    }
    let env = Env::start("up").await;
    let home = env.dir.path().join("home");
    std::fs::create_dir_all(home.join(".config")).unwrap();
    let ep = &env.mock.endpoints().platforms["ovirt"];
    std::fs::write(
        home.join(".config/ovirt.conf"),
        format!(
            "[mock]\nengine_url = {}\nusername = {}\npassword = {}\ncafile = {}\n",
            ep["engine_url"].as_str().unwrap(),
            ep["username"].as_str().unwrap(),
            ep["password"].as_str().unwrap(),
            ep["ca_file"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let mut vars = engine_env(&env);
    vars.push(("HOME".into(), home.display().to_string()));
    let work = env.dir.path().join("backup_vm");
    let backups = work.join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let (w, b) = (work.display().to_string(), backups.display().to_string());
    let vm = env.vm.clone();

    let full_shas = env.shas(&env.disks).await;
    let out = run(
        "ovirt/run_example.py",
        &[
            &w,
            "backup_vm.py",
            "-c",
            "mock",
            "full",
            &vm,
            "--backup-dir",
            &b,
        ],
        &vars,
    )
    .await
    .unwrap_or_default();
    if out.is_empty() {
        return;
    }
    let cp1 = created_checkpoint(&out);

    // Guest writes between the two backups, on both disks.
    env.guest_write(&env.disks[0], 5 * MIB, MIB, 41).await;
    env.guest_write(&env.disks[0], 64 * 1024, 4096, 42).await;
    env.guest_write(&env.disks[1], 6 * MIB, MIB / 2, 43).await;
    let incr_shas = env.shas(&env.disks).await;

    let out = run(
        "ovirt/run_example.py",
        &[
            &w,
            "backup_vm.py",
            "-c",
            "mock",
            "incremental",
            &vm,
            "--from-checkpoint-uuid",
            &cp1,
            "--backup-dir",
            &b,
        ],
        &vars,
    )
    .await
    .unwrap();
    let cp2 = created_checkpoint(&out);
    assert!(
        out.contains("Downloading incremental backup for disk"),
        "{out}"
    );

    for (i, disk) in env.disks.iter().enumerate() {
        let full = downloaded(&backups, &cp1, disk);
        assert_eq!(raw_sha(&full), full_shas[i], "full backup of disk {disk}");
        let incr = downloaded(&backups, &cp2, disk);
        assert_eq!(
            raw_sha(&incr),
            incr_shas[i],
            "incremental backup of disk {disk} ({})",
            incr.display()
        );
    }
    // The incremental of the qcow2 disk holds the changed data only.
    let incr = downloaded(&backups, &cp2, &env.disks[0]);
    assert!(
        incr.file_name()
            .unwrap()
            .to_string_lossy()
            .contains(".incremental."),
        "{incr:?}"
    );
    assert!(
        std::fs::metadata(&incr).unwrap().len() < 4 * MIB,
        "the incremental download is not incremental: {incr:?}"
    );
    assert!(
        env.leftovers().await.is_empty(),
        "{:?}",
        env.leftovers().await
    );
}
