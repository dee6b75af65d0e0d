//! Credentials never appear in logs, errors or --json output: everything
//! `vmbackup` prints (stdout and stderr, with trace logging) during a
//! successful backup and restore, and during failures, is captured and
//! searched for the password.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const SECRET: &str = "S3cr3t-Pa55-zz9";

fn vmbackup() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    c.env("VMBACKUP_LOG", "trace");
    c
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (success, stdout, stdout and stderr)
fn printed(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout, all)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_password_in_anything_printed() {
    let dir = tempfile::tempdir().unwrap();
    let mut mock = Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .args([
            "mock",
            "--seed-demo",
            "--scp-password",
            SECRET,
            "--state-dir",
        ])
        .arg(dir.path().join("mock"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _mock = Killed(mock);
    let endpoints: serde_json::Value = serde_json::from_str(&line).unwrap();
    let objects: serde_json::Value = reqwest::get(format!(
        "{}/scp/objects",
        endpoints["admin_url"].as_str().unwrap()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let vm = objects["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "linked-vm-1")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let pw_file = dir.path().join("scp.password");
    std::fs::write(&pw_file, format!("{SECRET}\n")).unwrap();
    let write_config = |name: &str, password_line: String| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "datastore = {:?}\n[platforms.lab]\nkind = \"scp\"\nendpoint = {:?}\nusername = \"admin\"\n{password_line}\n",
                dir.path().join("store"),
                endpoints["scp"]["base_url"].as_str().unwrap()
            ),
        )
        .unwrap();
        path
    };
    let good = write_config("good.toml", format!("password_file = {pw_file:?}"));
    let bad = write_config("bad.toml", format!("password = \"{SECRET}-wrong\""));

    let backup = ["backup", "--platform", "lab", "--guest", &vm];
    let (ok, stdout, out) = printed(
        vmbackup()
            .args(["--json", "--config"])
            .arg(&good)
            .args(backup),
    );
    assert!(ok, "{out}");
    assert!(!out.contains(SECRET), "backup printed the password:\n{out}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(rows[0]["error"].is_null(), "{rows}");

    let (_, list, _) = printed(
        vmbackup()
            .args(["--json", "--config"])
            .arg(&good)
            .arg("list"),
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let snapshot = list[0]["id"].as_str().unwrap().to_owned();
    let (ok, _, out) = printed(vmbackup().args(["--json", "--config"]).arg(&good).args([
        "restore",
        "--platform",
        "lab",
        "--name",
        "restored-creds",
        &snapshot,
    ]));
    assert!(ok, "{out}");
    assert!(
        !out.contains(SECRET),
        "restore printed the password:\n{out}"
    );

    // Failures: a wrong password, a missing guest.
    let (ok, _, out) = printed(vmbackup().args(["--json", "--config"]).arg(&bad).args([
        "backup",
        "--platform",
        "lab",
        "--guest",
        &vm,
    ]));
    assert!(!ok, "{out}");
    assert!(
        !out.contains(SECRET),
        "a failed login printed the password:\n{out}"
    );
    let (ok, _, out) = printed(vmbackup().args(["--config"]).arg(&good).args([
        "backup",
        "--platform",
        "lab",
        "--guest",
        "no-such-vm",
    ]));
    assert!(!ok, "{out}");
    assert!(!out.contains(SECRET), "{out}");
    assert!(
        out.contains("no-such-vm"),
        "the error names the guest:\n{out}"
    );
}
