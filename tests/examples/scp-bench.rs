//! Benchmark: full and 1%-incremental backup of a 4 GiB linked SCP VM
//! through NBD from the in-process mock, compared with
//! `qemu-img convert -f raw nbd://… -O qcow2` of the same VM's NBD export.
//!
//! ```sh
//! cargo run --release -p scenarios --example scp-bench [-- --gib 4]
//! ```
//!
//! Layout: a 1/4-size base image of random data; the VM's system disk has
//! random data of its own on the other 3/4, so the guest sees the whole
//! disk allocated and the full backup reads base image + overlay = the
//! disk size (as qemu-img does from the guest-view export). The 1% of the
//! incremental is written as clustered 1 MiB runs spread over the disk.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark program: a failed step ends the run"
)]

use std::time::Instant;

use provider_api::Guest;
use reqwest::Method;
use scenarios::scp::Env;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let gib: u64 = std::env::args()
        .skip_while(|a| a != "--gib")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let size = gib << 30;
    let base_size = size / 4;
    let env = Env::start(|_, _| {}).await;
    let t = Instant::now();
    let base = env
        .admin
        .base_image(
            "bench-base",
            base_size,
            json!([{"offset": 0, "length": base_size, "pattern": "random", "seed": 1}]),
        )
        .await;
    let vm = env
        .admin
        .server(json!({"name": "bench-vm", "disks": [{"size": size, "base_image_id": base,
            "fill": [{"offset": base_size, "length": size - base_size, "pattern": "random", "seed": 2}]}]}))
        .await;
    let vm_id = vm["id"].as_str().unwrap().to_owned();
    let disk = vm["disks"][0]["id"].as_str().unwrap().to_owned();
    eprintln!(
        "setup: {gib} GiB linked VM in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // qemu-img convert of the VM's guest-view NBD export (same mock).
    let scp = env.provider();
    let client = scp.client().clone();
    let lease: Value = client
        .call(
            Method::POST,
            "/janus/20240725/backup-resources",
            &[],
            Some(&json!({"server_id": vm_id, "type": "Backup", "remain_time": 3600})),
        )
        .await
        .unwrap();
    let lease_id = lease["id"].as_str().unwrap().to_owned();
    let snap: Value = client
        .task(
            Method::POST,
            &format!("/janus/20240725/servers/{vm_id}/snapshots"),
            Some(&json!({})),
        )
        .await
        .unwrap();
    let snap_id = snap["snapshot_id"].as_str().unwrap().to_owned();
    let export: Value = client
        .call(
            Method::POST,
            &format!("/janus/20240725/backup-resources/{lease_id}/exports"),
            &[],
            Some(&json!({"snapshot_id": snap_id, "transport": "nbd"})),
        )
        .await
        .unwrap();
    let uri = export["uri"].as_str().unwrap().to_owned();
    let out = env.dir.path().join("qemu-img.qcow2");
    let t = Instant::now();
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", &uri, "-O", "qcow2"])
        .arg(&out)
        .status()
        .expect("qemu-img runs");
    let qemu_secs = t.elapsed().as_secs_f64();
    assert!(status.success(), "qemu-img convert failed");
    let _ = std::fs::remove_file(&out);
    let _: Value = client
        .call(
            Method::DELETE,
            &format!("/janus/20240725/backup-resources/{lease_id}"),
            &[],
            None,
        )
        .await
        .unwrap();
    let _: Value = client
        .task(
            Method::DELETE,
            &format!("/janus/20240725/servers/{vm_id}/snapshots/{snap_id}"),
            None,
        )
        .await
        .unwrap();

    // Full backup through the engine.
    let t = Instant::now();
    let full = env.backup(scp.clone(), &[&vm_id]).await;
    let full_secs = t.elapsed().as_secs_f64();
    let f = full.guests[0].result.as_ref().expect("full backup");
    let full_read: u64 = f.volumes.iter().map(|v| v.stats.bytes_read).sum();

    // 1% as clustered 1 MiB runs.
    let runs = (size / 100).div_ceil(MIB);
    let stride = size / runs;
    for i in 0..runs {
        env.admin
            .write(&disk, i * stride, MIB, "random", 1000 + i)
            .await;
    }
    let t = Instant::now();
    let inc = env.backup(scp.clone(), &[&vm_id]).await;
    let inc_secs = t.elapsed().as_secs_f64();
    let i = inc.guests[0].result.as_ref().expect("incremental backup");
    let inc_read: u64 = i.volumes.iter().map(|v| v.stats.bytes_read).sum();
    let _ = Guest::vm(&vm_id);

    println!(
        "SCP linked VM, {gib} GiB (base image {} MiB), NBD from the in-process mock",
        base_size / MIB
    );
    println!(
        "qemu-img convert -O qcow2 : {qemu_secs:7.2} s  {:8.1} MiB/s",
        mibps(size, qemu_secs)
    );
    println!(
        "full backup              : {full_secs:7.2} s  {:8.1} MiB/s  (read {} MiB; {:.2}x qemu-img)",
        mibps(full_read, full_secs),
        full_read / MIB,
        mibps(full_read, full_secs) / mibps(size, qemu_secs)
    );
    println!(
        "1% incremental           : {inc_secs:7.2} s  (read {} MiB in {runs} x 1 MiB runs; {:.1}% of the full's time)",
        inc_read / MIB,
        100.0 * inc_secs / full_secs
    );
    env.mock.shutdown().await;
}
