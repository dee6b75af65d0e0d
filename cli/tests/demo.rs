//! The demo is the README's main job: it must pass, and its checks must be
//! real (a corrupted restored byte makes it fail).

use std::process::Command;

fn vmbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbackup"))
}

#[test]
fn demo_passes_and_verifies_every_restore() {
    let out = vmbackup()
        .args(["demo", "--size-mib", "32"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every check passed"), "{stdout}");
    // Every row verified: 3 NBD guests and the mock's demo guests of each
    // platform, full and incremental.
    assert!(stdout.matches(" yes ").count() >= 18, "{stdout}");
    assert!(!stdout.contains(" NO "), "{stdout}");
    for platform in ["nbd", "scp", "ovirt", "zstack"] {
        assert!(
            stdout.contains(&format!(" {platform} ")),
            "{platform}: {stdout}"
        );
    }
    assert!(stdout.contains("incremental"), "{stdout}");
}

#[test]
fn demo_fails_when_a_restored_byte_is_corrupted() {
    let out = vmbackup()
        .args(["demo", "--size-mib", "16", "--corrupt-restored-byte"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("demo: FAILED"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("MISMATCH"));
}

#[test]
fn json_demo_reports_success() {
    let out = vmbackup()
        .args(["--json", "demo", "--size-mib", "8"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["success"], true);
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= 18);
    assert!(rows.iter().all(|r| r["verified"] == true), "{v}");
}
