//! The binary prints one JSON line with its endpoints and serves.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_endpoints_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-hypervisor"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--scp-version",
            "6.11.2",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .arg("--tls-dir")
        .arg(dir.path().join("tls"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ep: Value = serde_json::from_str(&line).unwrap();
    assert!(dir.path().join("tls/ca-cert.pem").is_file());
    assert_eq!(ep["nbd"]["tls"], true);
    assert_eq!(ep["scp"]["version"], "6.11.2");
    let url = ep["scp"]["base_url"].as_str().unwrap();
    let v: Value = reqwest::get(format!("{url}/janus/public-key"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["code"], 0);
    let admin = ep["admin_url"].as_str().unwrap();
    let v: Value = reqwest::get(format!("{admin}/endpoints"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["nbd_address"], ep["nbd_address"]);
    child.kill().unwrap();
    child.wait().unwrap();
}
