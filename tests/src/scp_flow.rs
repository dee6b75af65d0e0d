//! The backup → restore → compare flow of the SCP scenarios
//! (`tests/scp.rs`): run a backup through the engine and take a guest's
//! backup (or its error) out of the report, restore a snapshot to a new
//! VM on a mock (the one backed up or another), and read the restored
//! VM's disk digests. The helpers return what the tests compare; where one
//! panics, the message names the guest or the restore.

use std::sync::Arc;

use engine::{GuestBackup, JobReport, RestoreReport};
use provider_api::testing::EmptyCatalog;
use provider_api::{
    BackupProvider, BackupVmRequest, Guest, PreviousBackup, RestoreTarget, SnapshotId,
    SnapshotInfo, Target, VmBackup,
};
use provider_scp::{AccessMode, ScpProvider};
use serde_json::{Value, json};

use crate::scp::{Env, leftovers, restore_from};

/// A server object's id.
pub fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

/// The id of a server object's disk `i`.
pub fn disk_id(v: &Value, i: usize) -> String {
    v["disks"][i]["id"].as_str().expect("disk id").to_owned()
}

/// Guest `i`'s backup in `report`; panics naming the guest if it failed.
pub fn backed_up(report: &JobReport, i: usize) -> &GuestBackup {
    let g = &report.guests[i];
    g.result
        .as_ref()
        .unwrap_or_else(|e| panic!("backup of {} failed: {}", g.guest.id, e.report()))
}

/// Guest `i`'s error in `report`; panics naming the guest if it was
/// backed up.
pub fn failed(report: &JobReport, i: usize) -> &provider_api::Error {
    let g = &report.guests[i];
    match &g.result {
        Ok(_) => panic!("the backup of {} must fail", g.guest.id),
        Err(e) => e,
    }
}

/// Backs up the VM `vm` (a server object) with `scp` in a job of its own
/// and returns its backup; panics naming the VM if it failed.
pub async fn backup_ok(env: &Env, scp: &Arc<ScpProvider>, vm: &Value) -> GuestBackup {
    let mut report = env.backup(scp.clone(), &[&id(vm)]).await;
    match report.guests.remove(0).result {
        Ok(b) => b,
        Err(e) => panic!(
            "backup of {} ({}) failed: {}",
            vm["name"],
            id(vm),
            e.report()
        ),
    }
}

/// Restores `snapshot` from `from`'s datastore with `scp` (on `from`'s
/// mock or another) to a new VM named `name` (the provider's choice for `None`);
/// panics naming the snapshot and the name if the restore fails.
pub async fn restore_new(
    from: &Env,
    scp: &Arc<ScpProvider>,
    snapshot: &SnapshotId,
    name: Option<&str>,
) -> RestoreReport {
    let target = RestoreTarget::NewGuest {
        name: name.map(str::to_owned),
    };
    restore_from(&from.store, scp.clone(), snapshot, target)
        .await
        .unwrap_or_else(|e| panic!("restore of {snapshot:?} as {name:?}: {}", e.report()))
}

/// Digests of every disk of `guest` on `env`'s mock, as the guest sees
/// them, in disk order (a restored guest found through `scp`).
pub async fn digests_of(env: &Env, scp: &ScpProvider, guest: &Guest) -> Vec<String> {
    let server_id = scp.restored_server_id(guest).unwrap_or(guest.id.0.clone());
    let path = format!("/janus/20250725/servers/{server_id}");
    let server = janus(scp, reqwest::Method::GET, &path, None).await;
    env.admin.server_digests(&server).await
}

/// [`restore_new`] into `on`'s mock, then the restored VM's
/// [`digests_of`]: what a test compares with the source's digests.
pub async fn restored_digests(
    from: &Env,
    on: &Env,
    scp: &Arc<ScpProvider>,
    snapshot: &SnapshotId,
    name: Option<&str>,
) -> Vec<String> {
    let r = restore_new(from, scp, snapshot, name).await;
    digests_of(on, scp, &r.guest).await
}

/// The metadata stored with the snapshot `snapshot` in `env`'s datastore.
pub async fn snapshot_metadata(env: &Env, snapshot: &SnapshotId) -> Value {
    env.store
        .open_snapshot(snapshot)
        .await
        .expect("open snapshot")
        .metadata()
        .await
        .expect("snapshot metadata")
}

/// Asserts that nothing is left on `env`'s platform (snapshots, leases,
/// exports, hot-adds, unsealed base images).
pub async fn assert_clean(env: &Env) {
    assert_eq!(leftovers(&env.admin).await, Vec::<String>::new());
}

/// A `backup-proxy` VM with a 16 MiB disk for hot-add; its id.
pub async fn backup_proxy(env: &Env) -> String {
    let proxy = env
        .admin
        .server(json!({"name": "backup-proxy", "disks": [{"size": 16 << 20}]}))
        .await;
    id(&proxy)
}

/// Hot-add access through a new [`backup_proxy`] on `env`'s mock.
pub async fn hot_add_access(env: &Env) -> AccessMode {
    AccessMode::HotAdd {
        proxy_server_id: backup_proxy(env).await,
    }
}

/// The SCP snapshots published in `env`'s datastore.
pub async fn published(env: &Env) -> Vec<SnapshotInfo> {
    env.store
        .list_snapshots(Some("scp"), None)
        .await
        .expect("list snapshots")
}

/// Whether one of the warnings stored with `backup`'s snapshot mentions
/// `text`.
pub fn warned(backup: &GuestBackup, text: &str) -> bool {
    backup.snapshot.warnings.iter().any(|w| w.contains(text))
}

/// The provider's side of a backup of `guest` without the engine (the job
/// already initialised): `backup_init` at `start_time`, the plan against
/// `previous`, and `backup_vm`; returns what it exposes, for the test to
/// inspect or drop. Panics naming the guest if a step fails.
pub async fn expose_backup(
    scp: &ScpProvider,
    guest: &Guest,
    start_time: i64,
    previous: Option<PreviousBackup>,
) -> VmBackup {
    let fail = |step: &str, e: provider_api::Error| -> ! {
        panic!("{step} of {}: {}", guest.id, e.report())
    };
    scp.backup_init(guest, start_time)
        .await
        .unwrap_or_else(|e| fail("backup_init", e));
    let plan = scp
        .backup_vm_query_incremental(guest, previous.as_ref())
        .await
        .unwrap_or_else(|e| fail("backup plan", e));
    let request = BackupVmRequest::new(plan, previous, Arc::new(EmptyCatalog));
    scp.backup_vm(guest, request)
        .await
        .unwrap_or_else(|e| fail("backup_vm", e))
}

/// A janus API call through `scp`'s client (logged in as the provider
/// is); its answer, or a panic naming the call.
pub async fn janus(
    scp: &ScpProvider,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    scp.client()
        .call(method.clone(), path, &[], body.as_ref())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {}", e.report()))
}

/// Like [`assert_clean`], the message naming the `case` checked.
pub async fn assert_clean_for(env: &Env, case: &str) {
    assert_eq!(leftovers(&env.admin).await, Vec::<String>::new(), "{case}");
}
