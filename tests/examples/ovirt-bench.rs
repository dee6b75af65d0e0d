//! Benchmark: full and 1%-incremental backup of a 4 GiB two-disk oVirt VM
//! (2 x 2 GiB qcow2 disks, 1 GiB of random data each) from the mock, in
//! both modes (4.4 incremental backups and snapshot attach).
//!
//! `cargo run --release -p scenarios --example ovirt-bench`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark program: a failed step ends the run"
)]

use engine::JobReport;
use provider_ovirt::{BackupMode, WireFormat};
use scenarios::ovirt::{Env, MIB};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    const GIB: u64 = 1 << 30;
    let env = Env::start("up").await;
    let fill = |seed: u64| json!([{"offset": 0, "length": GIB, "pattern": "random", "seed": seed}]);
    let t = std::time::Instant::now();
    let vm = env
        .admin_post(
            "/admin/ovirt/vms",
            json!({"name": "big", "disks": [
                {"size": 2 * GIB, "format": "cow", "alias": "sys", "fill": fill(1)},
                {"size": 2 * GIB, "format": "cow", "alias": "data", "fill": fill(2)}]}),
        )
        .await;
    println!(
        "setup (2 GiB of guest writes): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    let disks: Vec<String> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    let mib = |b: u64| b as f64 / MIB as f64;
    let run = |name: &'static str, r: JobReport| {
        let g = r.guests.into_iter().next().unwrap();
        let b = g
            .result
            .unwrap_or_else(|e| panic!("{name}: {}", e.report()));
        let read: u64 = b.volumes.iter().map(|v| v.stats.bytes_read).sum();
        let secs = b.elapsed.as_secs_f64();
        println!(
            "{name:<32} {secs:>7.2} s  read {:>8.1} MiB  {:>7.1} MiB/s of virtual size",
            mib(read),
            mib(4 * GIB) / secs
        );
    };
    for (mode, label_full, label_inc) in [
        (
            BackupMode::Incremental,
            "incremental mode: full",
            "incremental mode: 1% changed",
        ),
        (
            BackupMode::SnapshotAttach,
            "snapshot-attach: full",
            "snapshot-attach: full again",
        ),
    ] {
        let p = env.provider(mode, WireFormat::Json);
        run(label_full, env.backup_of(p.clone(), &id).await);
        // 1% of 4 GiB: 41 x 1 MiB spread over both disks.
        for i in 0..41u64 {
            let d = &disks[(i % 2) as usize];
            env.guest_write(d, (i * 47 % 2000) * MIB, MIB, 100 + i)
                .await;
        }
        run(label_inc, env.backup_of(p.clone(), &id).await);
    }
    assert_eq!(env.leftovers().await, Vec::<String>::new());
}
