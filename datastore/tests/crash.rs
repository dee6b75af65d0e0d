//! Crash safety: a child process backing up (incrementally, with prune and
//! GC) is killed with SIGKILL at random points; afterwards every listed
//! snapshot is complete and reads back right, and verify passes.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::*;
use datastore::{KeepOptions, VerifyScope};
use provider_api::*;

const SIZE: u64 = 256 * CS;
const ENV: &str = "DATASTORE_CRASH_CHILD_DIR";

/// The disk as of snapshot time `t`: a base plus steps 1..=t.
fn model(t: i64) -> Vec<u8> {
    let mut m = noise(1, SIZE as usize);
    for j in 1..=t {
        apply(&mut m, &[step(j)]);
    }
    m
}

fn step(j: i64) -> Op {
    let len = 5 * CS + 77;
    let off = (j as u64 * 7919 * 13) % (SIZE - len);
    Op::Data(off, noise(j as u64 + 1000, len as usize))
}

/// The name the test harness knows `crash_child` by (its module path
/// without the crate's name).
fn child_test() -> String {
    match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::crash_child"),
        None => "crash_child".to_owned(),
    }
}

/// Not a test on its own: the child's body, run when the parent sets `ENV`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV) else { return };
    let gc_too = std::env::var("DATASTORE_CRASH_CHILD_NO_GC").is_err();
    let ds = open_ds(std::path::Path::new(&dir));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        loop {
            let prev = ds
                .latest_good_snapshot("scp", &GuestId::from("vm"))
                .await
                .unwrap();
            let (t, start, ops) = match &prev {
                None => (0, StartFrom::Empty, vec![Op::Data(0, model(0))]),
                Some(p) => (
                    p.time + 1,
                    StartFrom::Previous(p.id.clone()),
                    vec![step(p.time + 1)],
                ),
            };
            backup(&ds, "vm", t, vspec("sys", SIZE, start), &ops)
                .await
                .unwrap();
            ds.prune(
                "scp",
                &GuestId::from("vm"),
                &KeepOptions {
                    keep_last: Some(3),
                    ..Default::default()
                },
                false,
            )
            .unwrap();
            if gc_too && t % 4 == 0 {
                ds.gc(Duration::ZERO).unwrap();
            }
        }
    });
}

#[tokio::test]
async fn killed_backups_leave_only_complete_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x5eed_u64;
    let mut max_t = -1;
    // On S3 a backup of these 4 KiB chunks is a few hundred requests: fewer,
    // longer rounds. A round in which the child committed nothing (a slow
    // or loaded machine) doubles the time the next one gets, so that the
    // test always sees progress as well as kills at random points.
    let rounds = if on_s3() { 5 } else { 8 };
    let mut scale = if on_s3() { 20 } else { 1 };
    let mut round = 0;
    while round < rounds || (max_t < 3 && round < 40) {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let delay = (150 + (seed >> 33) % 400) * scale;
        let before = max_t;
        let mut child = Command::new(&exe)
            .args([&child_test(), "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV, ds_path(dir.path()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let list = ds.list_snapshots(None, None).await.unwrap();
        for s in &list {
            assert_eq!(
                read_all(&ds, &s.id, "sys", Layer::Merged).await.unwrap(),
                model(s.time),
                "round {round} {}",
                s.id
            );
            max_t = max_t.max(s.time);
        }
        let rep = ds.verify(VerifyScope::All).unwrap();
        assert!(rep.is_ok(), "round {round}: {rep:?}");
        eprintln!(
            "round {round}: killed after {delay} ms, {} snapshot(s) listed, newest t={max_t}",
            list.len()
        );
        if max_t == before {
            scale = (scale * 2).min(400);
        }
        round += 1;
    }
    assert!(max_t >= 3, "the child made progress ({max_t})");
    // Leftovers of killed writers are cleaned, and nothing referenced goes.
    ds.gc(Duration::ZERO).unwrap();
    for name in raw_names(&ds, &ds.root().join("scp/vm")) {
        assert!(
            !name.starts_with(".tmp-") && !name.starts_with(".del-"),
            "{name} left"
        );
    }
    assert!(ds.verify(VerifyScope::All).unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_a_datastore() {
    // Two processes back up the same guest at once (same times, so names
    // collide and get suffixes; each prunes the other's snapshots) while
    // this one runs GC in a loop; then both are killed.
    let dir = tempfile::tempdir().unwrap();
    let ds = new_ds(dir.path());
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&exe)
            .args([&child_test(), "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV, ds_path(dir.path()))
            .env("DATASTORE_CRASH_CHILD_NO_GC", "1")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut children = [spawn(), spawn()];
    let t = std::time::Instant::now();
    let mut runs = 0;
    let run_for = Duration::from_millis(if on_s3() { 10_000 } else { 2500 });
    // Run for a while, and on a loaded machine (a slow object store)
    // until the children have committed something.
    loop {
        ds.gc(Duration::ZERO).unwrap();
        runs += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t.elapsed() >= run_for
            && (t.elapsed() >= 6 * run_for
                || !ds.list_snapshots(None, None).await.unwrap().is_empty())
        {
            break;
        }
    }
    for c in &mut children {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let list = ds.list_snapshots(None, None).await.unwrap();
    assert!(
        !list.is_empty() && runs > 3,
        "{} snapshot(s) after {:?}, {runs} GC runs",
        list.len(),
        t.elapsed()
    );
    eprintln!(
        "{runs} GC runs; listed: {:?}",
        list.iter().map(|s| &s.id.0).collect::<Vec<_>>()
    );
    for s in &list {
        assert_eq!(
            read_all(&ds, &s.id, "sys", Layer::Merged).await.unwrap(),
            model(s.time),
            "{}",
            s.id
        );
    }
    let rep = ds.verify(VerifyScope::All).unwrap();
    assert!(rep.is_ok(), "{rep:?}");
    ds.gc(Duration::ZERO).unwrap();
    assert!(ds.verify(VerifyScope::All).unwrap().is_ok());
}
