//! The data path survives NBD failures: a transient read failure during a
//! full backup of an SCP guest is retried (the backup succeeds and restores
//! byte-identical); a persistent disconnect fails the guest after the
//! bounded attempts, naming the volume and the operation, with every
//! cleanup run. (A dropped TCP connection, reconnected once for all
//! concurrent readers, is covered by the engine's own unit tests behind a
//! flaky proxy: the mock's `disconnect` fault stops the export for good.)

use std::time::{Duration, Instant};

use engine::MoverOptions;
use provider_api::{ErrorKind, Guest, RestoreTarget, Target, TargetExt};
use scenarios::scp::{Env, leftovers};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A linked VM: a 24 MiB system disk on a 16 MiB base image (with data of
/// its own) and an 8 MiB data disk.
async fn linked_vm(env: &Env, name: &str) -> Value {
    let base = env
        .admin
        .base_image(
            "base",
            16 * MIB,
            json!([
                {"offset": 0, "length": MIB, "pattern": "text", "seed": 1},
                {"offset": 2 * MIB, "length": 6 * MIB, "pattern": "random", "seed": 2},
                {"offset": 12 * MIB, "length": 2 * MIB, "pattern": "random", "seed": 3},
            ]),
        )
        .await;
    env.admin
        .server(
            json!({"name": name, "storage_id": "storage-local", "disks": [
                {"size": 24 * MIB, "base_image_id": base, "fill": [
                    {"offset": MIB, "length": MIB, "pattern": "random", "seed": 10},
                    {"offset": 18 * MIB, "length": MIB, "pattern": "text", "seed": 11}]},
                {"size": 8 * MIB, "fill": [
                    {"offset": 0, "length": 3 * MIB, "pattern": "random", "seed": 12}]},
            ]}),
        )
        .await
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

/// Quick retries: 4 attempts, 20 ms doubling up to 100 ms.
fn mover() -> MoverOptions {
    let mut o = MoverOptions {
        piece_size: MIB,
        depth: 4,
        ..MoverOptions::default()
    };
    o.retry.attempts = 4;
    o.retry.initial_delay = Duration::from_millis(20);
    o.retry.max_delay = Duration::from_millis(100);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_nbd_read_failure_is_retried_and_the_backup_restores_byte_identical() {
    let env = Env::start(|_, _| {}).await;
    let vm = linked_vm(&env, "linked-1").await;
    let before = env.admin.server_digests(&vm).await;
    // One read fails with EIO once the export has served 3 MiB.
    env.admin
        .post(
            "/faults/nbd",
            json!({"export": "", "kind": "read_error", "after_bytes": 3 * MIB, "times": 1}),
        )
        .await;
    let scp = env.provider();
    let report = env.backup_with(scp.clone(), &[&id(&vm)], mover()).await;
    let b = report.guests[0]
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(
        env.admin.get("/faults").await["nbd"],
        json!([]),
        "the fault fired"
    );
    assert_eq!(leftovers(&env.admin).await, Vec::<String>::new());
    let r = env
        .restore(
            scp.clone(),
            &b.snapshot.id,
            RestoreTarget::NewGuest { name: None },
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    let server_id = scp
        .restored_server_id(&r.guest)
        .unwrap_or(r.guest.id.0.clone());
    let restored: Value = scp
        .client()
        .call(
            reqwest::Method::GET,
            &format!("/janus/20250725/servers/{server_id}"),
            &[],
            None,
        )
        .await
        .expect("restored server");
    assert_eq!(env.admin.server_digests(&restored).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_nbd_disconnect_fails_the_guest_after_bounded_attempts_and_cleans_up() {
    let env = Env::start(|_, _| {}).await;
    let vm = linked_vm(&env, "linked-1").await;
    // Every export stops serving once it has served 2 MiB, for good.
    env.admin
        .post(
            "/faults/nbd",
            json!({"export": "", "kind": "disconnect", "after_bytes": 2 * MIB}),
        )
        .await;
    let scp = env.provider();
    let start = Instant::now();
    let report = env.backup_with(scp.clone(), &[&id(&vm)], mover()).await;
    let took = start.elapsed();
    let e = report.guests[0].result.as_ref().unwrap_err();
    eprintln!("persistent disconnect after {took:?}: {}", e.report());
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_eq!(e.kind(), ErrorKind::DataPath, "{}", e.report());
    assert!(e.context().volume.is_some(), "{}", e.report());
    assert!(e.context().offset.is_some(), "{}", e.report());
    assert_eq!(e.context().guest.as_deref(), Some(id(&vm).as_str()));
    assert!(
        e.report().contains("over NBD (gave up after 4 attempts)"),
        "{}",
        e.report()
    );
    assert_eq!(leftovers(&env.admin).await, Vec::<String>::new());
    assert!(
        env.store
            .list_snapshots(Some("scp"), None)
            .await
            .unwrap()
            .is_empty(),
        "nothing published"
    );
    assert!(
        env.store
            .latest_good_snapshot("scp", &Guest::vm(id(&vm)).id)
            .await
            .unwrap()
            .is_none()
    );
}
