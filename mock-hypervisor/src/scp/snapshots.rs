//! VM snapshots: create (one CBT checkpoint per snapshot), list, get (with
//! `vmconf`), delete, revert.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::json;

use super::ScpPlatform;
use super::envelope::{ScpError, ScpPath, ScpQuery, ScpResult, ok, paged, parse_body};
use super::model::Snapshot;
use super::servers::blocking;
use crate::disk::View;
use crate::error::Error;
use crate::exports::ExportTarget;
use crate::ids::{new_uuid, unix_now};

/// `GET /janus/20240725/servers/{server_id}/snapshots`
pub async fn list(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(server_id): ScpPath<String>,
    ScpQuery(q): ScpQuery,
) -> ScpResult {
    let items = scp.inv.read(|doc| -> Result<Vec<Snapshot>, ScpError> {
        doc.server(&server_id)?;
        Ok(doc
            .snapshots
            .values()
            .filter(|s| s.server_id == server_id)
            .cloned()
            .collect())
    })?;
    paged(&q, items)
}

/// `GET /janus/20240725/servers/{server_id}/snapshots/{snapshot_id}`
pub async fn get_one(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath((server_id, id)): ScpPath<(String, String)>,
) -> ScpResult {
    let snap = scp.inv.read(|doc| doc.snapshot(&server_id, &id).cloned())?;
    ok(snap)
}

#[derive(Debug, Deserialize, Default)]
struct CreateSnapshot {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: String,
}

/// Takes a snapshot of every disk of a server; returns it.
pub fn take_snapshot(
    scp: &ScpPlatform,
    server_id: &str,
    name: Option<String>,
    description: String,
) -> Result<Snapshot, ScpError> {
    let (server, checkpoint_id) = scp.inv.update(|doc| {
        let server = doc
            .servers
            .get(server_id)
            .cloned()
            .ok_or_else(|| Error::not_found("server", server_id))?;
        doc.last_checkpoint += 1;
        Ok((server, doc.last_checkpoint))
    })?;
    let id = new_uuid();
    let mut done = Vec::new();
    for d in &server.disks {
        let r = scp
            .hv
            .store
            .disk(&d.id)
            .and_then(|disk| disk.create_snapshot(&id, checkpoint_id).map(|_| disk));
        match r {
            Ok(disk) => done.push(disk),
            Err(e) => {
                for disk in done {
                    let _ = disk.delete_snapshot(&id);
                }
                return Err(e.into());
            }
        }
    }
    let snap = Snapshot {
        id: id.clone(),
        server_id: server_id.to_string(),
        name: name.unwrap_or_else(|| format!("snapshot-{checkpoint_id}")),
        description,
        status: "ok".into(),
        checkpoint_id,
        created_at: unix_now(),
        vmconf: server.vmconf(),
    };
    let s2 = snap.clone();
    scp.inv.update(|doc| {
        doc.snapshots.insert(id.clone(), s2);
        Ok(())
    })?;
    Ok(snap)
}

/// `POST /janus/20240725/servers/{server_id}/snapshots`
pub async fn create(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(server_id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: CreateSnapshot = parse_body(&body)?;
    scp.inv.read(|d| d.server(&server_id).map(|_| ()))?;
    if let Some(failed) = scp.failed_task("create_snapshot", &server_id) {
        return failed;
    }
    let snap = take_snapshot(&scp, &server_id, req.name, req.description)?;
    scp.task(
        "create_snapshot",
        &server_id,
        json!({"snapshot_id": snap.id, "checkpoint_id": snap.checkpoint_id}),
    )
}

/// Exports still reading a snapshot.
fn exports_of(scp: &ScpPlatform, snapshot_id: &str) -> Vec<String> {
    scp.hv
        .exports
        .find(|e| {
            matches!(e.target(), ExportTarget::Disk { view: View::Snapshot(s), .. } if s == snapshot_id)
        })
        .iter()
        .map(|e| e.name().to_string())
        .collect()
}

/// `DELETE /janus/20240725/servers/{server_id}/snapshots/{snapshot_id}`
pub async fn delete(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath((server_id, id)): ScpPath<(String, String)>,
) -> ScpResult {
    let snap = scp.inv.read(|doc| doc.snapshot(&server_id, &id).cloned())?;
    if let Some(failed) = scp.failed_task("delete_snapshot", &server_id) {
        return failed;
    }
    let users = exports_of(&scp, &id);
    if !users.is_empty() {
        return Err(ScpError::conflict(format!(
            "snapshot {id} is in use by export(s) {}",
            users.join(", ")
        )));
    }
    let disks = snap
        .vmconf
        .pointer("/hardware_option/disks")
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.get("id").and_then(|i| i.as_str()).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for d in disks {
        if let Ok(disk) = scp.hv.store.disk(&d) {
            disk.delete_snapshot(&id)?;
        }
    }
    scp.inv.update(|doc| {
        doc.snapshots.remove(&id);
        Ok(())
    })?;
    scp.task("delete_snapshot", &server_id, json!({"snapshot_id": id}))
}

/// Reverts a server to a snapshot; its CBT expires.
pub async fn revert_server(
    scp: &Arc<ScpPlatform>,
    server_id: &str,
    id: &str,
) -> Result<(), ScpError> {
    let server = scp.inv.read(|doc| -> Result<_, ScpError> {
        doc.snapshot(server_id, id)?;
        Ok(doc.server(server_id)?.clone())
    })?;
    let hv = scp.hv.clone();
    let sid = id.to_string();
    blocking(move || {
        for d in &server.disks {
            let disk = hv.store.disk(&d.id)?;
            if disk.snapshot_ids().contains(&sid) {
                disk.revert(&sid)?;
            }
        }
        Ok(())
    })
    .await?;
    scp.expire_cbt(server_id)
}

/// `POST /janus/20240725/servers/{server_id}/snapshots/{snapshot_id}/actions/revert`
pub async fn revert(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath((server_id, id)): ScpPath<(String, String)>,
) -> ScpResult {
    if let Some(failed) = scp.failed_task("revert_snapshot", &server_id) {
        return failed;
    }
    revert_server(&scp, &server_id, &id).await?;
    scp.task("revert_snapshot", &server_id, json!({"snapshot_id": id}))
}
