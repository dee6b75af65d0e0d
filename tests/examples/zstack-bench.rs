//! Benchmark: full backup of a 4 GiB ZStack VM through the image export
//! path (snapshot → template → export → ranged download → datastore), the
//! linked root volume's base image stored too.
//!
//! `cargo run --release -p scenarios --example zstack-bench`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark program: a failed step ends the run"
)]

use scenarios::zstack::*;
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    const GIB: u64 = 1 << 30;
    let env = Env::start(|_, _| {}).await;
    let t = std::time::Instant::now();
    let image = env
        .admin
        .post(
            "/zstack/images",
            json!({"name": "bench-base", "size": 4 * GIB, "fill": [
                {"offset": 0, "length": 512 * MIB, "pattern": "text", "seed": 1},
                {"offset": GIB, "length": GIB, "pattern": "random", "seed": 2}]}),
        )
        .await;
    let vm = env
        .admin
        .post(
            "/zstack/vms",
            json!({"name": "bench", "image_uuid": image["uuid"],
                "root_fill": [{"offset": 3 * GIB, "length": 512 * MIB, "pattern": "random", "seed": 3}]}),
        )
        .await;
    eprintln!("setup: {:?}", t.elapsed());
    let zs = Zs {
        env,
        image: uuid(&image),
    };
    let vm = uuid(&vm);
    // One work directory for both runs, as a configured provider keeps it
    // (the second run finds the base image's block digests there).
    let mut o = zs.options();
    o.job_timeout_secs = 600.0;
    for run in ["first (base image stored)", "second (base already stored)"] {
        let t = std::time::Instant::now();
        let report = zs.backup(zs.provider_with(o.clone()), &[&vm]).await;
        assert_ok(&report);
        let secs = t.elapsed().as_secs_f64();
        let g = report.guests[0].result.as_ref().unwrap();
        let read: u64 = g.volumes.iter().map(|v| v.stats.bytes_read).sum();
        let new: u64 = g.volumes.iter().map(|v| v.stats.target.bytes_new).sum();
        eprintln!(
            "BENCH {run}: {secs:.1} s, 4 GiB VM = {:.0} MiB/s of guest size; datastore read {} MiB, stored new {} MiB",
            4096.0 / secs,
            read / MIB,
            new / MIB
        );
    }
    assert!(zs.leftovers().await.is_empty());
}
