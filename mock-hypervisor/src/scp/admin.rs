//! SCP admin extensions under `/admin/scp`: create servers and base images
//! with guest data, revert snapshots, expire CBT or leases, change the
//! platform version, list SCP objects, and the test-only answer fault
//! (`POST /admin/scp/faults/answers {"method"?, "path", "remove": ["/data/areas"], "times"?}`
//! removes fields from matching answers; `DELETE` disarms them), failing
//! tasks (`POST /admin/scp/faults/tasks {"action", "message", "times"?}`),
//! the token lifetime (`PUT /admin/scp/token-ttl {"ttl_ms"}`) and the login
//! count (`GET /admin/scp/logins`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ScpPlatform;
use super::base_images::{CreateBaseImage, create_record, make_available, restoring, settle};
use super::servers::{CreateServer, NewDisk, create_server_record};
use crate::admin::{AdminResult, Fill, FillTarget, parse, run_blocking, write_fill};
use crate::error::Error;

/// Router nested at `/admin/scp`.
pub fn router(scp: Arc<ScpPlatform>) -> Router {
    Router::new()
        .route("/servers", post(create_server))
        .route("/base-images", post(create_base_image))
        .route("/servers/{server_id}/cbt/expire", post(expire_cbt))
        .route("/servers/{server_id}/disks/{disk_id}/grow", post(grow_disk))
        .route(
            "/servers/{server_id}/snapshots/{snapshot_id}/revert",
            post(revert_snapshot),
        )
        .route("/backup-resources/{resource_id}/expire", post(expire_lease))
        .route("/version", put(set_version))
        .route("/objects", get(list_objects))
        .route(
            "/faults/answers",
            post(add_answer_fault).delete(clear_answer_faults),
        )
        .route(
            "/faults/tasks",
            post(add_task_fault).delete(clear_task_faults),
        )
        .route(
            "/bindings/{binding_id}",
            axum::routing::delete(delete_binding),
        )
        .route("/token-ttl", put(set_token_ttl))
        .route("/logins", get(logins))
        .with_state(scp)
}

/// Every SCP object that a backup or restore could leave behind.
pub fn objects(scp: &ScpPlatform) -> Value {
    let leases = scp.leases_lock().active();
    scp.inv.read(|doc| {
        json!({
            "servers": doc.servers.values().map(|s| json!({
                "id": s.id,
                "name": s.name,
                "disks": s.disks.iter().map(|d| json!({"id": d.id, "size": d.size, "base_image_id": d.base_image_id})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "snapshots": doc.snapshots.values().collect::<Vec<_>>(),
            "hotadds": doc.hotadds.values().collect::<Vec<_>>(),
            "base_images": doc.base_images.values().collect::<Vec<_>>(),
            "temporary_base_images": doc.base_images.values().filter(|b| b.status != "AVAILABLE" || restoring(scp, &b.id)).map(|b| &b.id).collect::<Vec<_>>(),
            "custom_attributes": doc.custom_attributes.values().collect::<Vec<_>>(),
            "bindings": doc.bindings.values().collect::<Vec<_>>(),
            "backup_resources": leases,
            "running_tasks": scp.tasks.running(),
            "exports": scp.hv.exports.active_stats().into_iter().filter(|e| e.owner.starts_with("scp:")).collect::<Vec<_>>(),
        })
    })
}

#[derive(Debug, Deserialize)]
struct AdminDisk {
    size: u64,
    #[serde(default)]
    base_image_id: Option<String>,
    #[serde(default = "yes")]
    linked: bool,
    #[serde(default)]
    fill: Vec<Fill>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct AdminServer {
    name: String,
    #[serde(default)]
    storage_id: Option<String>,
    #[serde(default)]
    application: String,
    #[serde(default)]
    revert_mode: u8,
    #[serde(default)]
    cbt_enable: Option<u8>,
    disks: Vec<AdminDisk>,
}

async fn create_server(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> AdminResult {
    let req: AdminServer = parse(&body)?;
    let fills: Vec<Vec<Fill>> = req.disks.iter().map(|d| d.fill.clone()).collect();
    let server = create_server_record(
        &scp,
        CreateServer {
            name: req.name,
            storage_id: req.storage_id,
            application: req.application,
            revert_mode: req.revert_mode,
            cpu: 2,
            memory_mb: 2048,
            os_type: "linux".into(),
            disks: req
                .disks
                .into_iter()
                .map(|d| NewDisk {
                    size: d.size,
                    base_image_id: d.base_image_id,
                    linked: d.linked,
                })
                .collect(),
            cbt_enable: req.cbt_enable,
        },
    )
    .await?;
    for (disk, fills) in server.disks.iter().zip(fills) {
        let d = scp.hv.store.disk(&disk.id)?;
        run_blocking(move || {
            fills
                .iter()
                .try_for_each(|f| write_fill(FillTarget::Disk(&d), f))
        })
        .await?;
    }
    Ok(Json(serde_json::to_value(&server).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
struct AdminBaseImage {
    name: String,
    size: u64,
    #[serde(default)]
    storage_ids: Vec<String>,
    #[serde(default)]
    fill: Vec<Fill>,
    #[serde(default)]
    description: String,
}

async fn create_base_image(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> AdminResult {
    let req: AdminBaseImage = parse(&body)?;
    let rec = create_record(
        &scp,
        CreateBaseImage {
            name: req.name,
            size: req.size,
            storage_id: req.storage_ids.first().cloned(),
            description: req.description,
            os_type: None,
        },
    )?;
    let image = scp.hv.store.image(&rec.id)?;
    let fills = req.fill;
    run_blocking(move || {
        fills
            .iter()
            .try_for_each(|f| write_fill(FillTarget::Image(&image), f))
    })
    .await?;
    make_available(&scp, &rec.id)?;
    settle(&scp, &rec.id)?;
    for s in req.storage_ids.iter().skip(1) {
        scp.inv.update(|doc| {
            if !doc.has_storage(s) {
                return Err(Error::not_found("storage", s));
            }
            if let Some(b) = doc.base_images.get_mut(&rec.id) {
                b.replicas.push(super::model::Replica {
                    storage_id: s.clone(),
                    status: "AVAILABLE".into(),
                });
            }
            Ok(())
        })?;
    }
    let rec = scp.inv.read(|doc| doc.base_image(&rec.id).cloned())?;
    Ok(Json(serde_json::to_value(rec).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
struct Grow {
    size: u64,
}

/// The operator grows a disk of a stopped server (test-only emulation):
/// the disk is replaced by a bigger one with the same name, linked to the
/// same base image, holding the same own data (the new part reads as
/// zeroes). Its id changes and its CBT history starts over, as after any
/// resize the provider must treat as a full backup.
async fn grow_disk(
    State(scp): State<Arc<ScpPlatform>>,
    Path((server_id, disk_id)): Path<(String, String)>,
    body: Bytes,
) -> AdminResult {
    let req: Grow = parse(&body)?;
    let old = scp.inv.read(|doc| -> std::result::Result<_, Error> {
        let server = doc
            .servers
            .get(&server_id)
            .ok_or_else(|| Error::not_found("server", &server_id))?;
        if doc.snapshots.values().any(|s| s.server_id == server_id) {
            return Err(Error::Conflict(format!(
                "server {server_id} has snapshots: delete them before growing a disk"
            )));
        }
        server
            .disks
            .iter()
            .find(|d| d.id == disk_id)
            .cloned()
            .ok_or_else(|| Error::not_found("disk", &disk_id))
    })?;
    if req.size < old.size || !req.size.is_multiple_of(512) {
        return Err(crate::admin::AdminError(
            axum::http::StatusCode::BAD_REQUEST,
            format!("size must be a multiple of 512 and at least {}", old.size),
        ));
    }
    let store_old = scp.hv.store.disk(&disk_id)?;
    let new = scp
        .hv
        .store
        .create_disk(req.size, old.base_image_id.as_deref())?;
    let (from, to) = (store_old.clone(), new.clone());
    run_blocking(move || {
        use crate::disk::{BLOCK_SIZE, View};
        let own = from.allocated_map(&View::Live, false)?;
        for blk in 0..own.blocks() {
            if own.get(blk) {
                let off = blk * BLOCK_SIZE;
                let len = BLOCK_SIZE.min(from.size() - off);
                to.write(off, &from.read(&View::Live, off, len)?)?;
            }
        }
        Ok(())
    })
    .await?;
    let new_id = new.id().to_string();
    scp.inv.update(|doc| {
        if let Some(d) = doc
            .servers
            .get_mut(&server_id)
            .and_then(|s| s.disks.iter_mut().find(|d| d.id == disk_id))
        {
            d.id = new_id.clone();
            d.size = req.size;
        }
        Ok(())
    })?;
    scp.hv.store.delete_disk(&disk_id)?;
    Ok(Json(
        json!({"server_id": server_id, "old_disk_id": disk_id, "disk_id": new_id, "size": req.size}),
    ))
}

async fn expire_cbt(State(scp): State<Arc<ScpPlatform>>, Path(id): Path<String>) -> AdminResult {
    scp.expire_cbt(&id)?;
    Ok(Json(json!({"server_id": id, "cbt": "expired"})))
}

async fn revert_snapshot(
    State(scp): State<Arc<ScpPlatform>>,
    Path((id, sid)): Path<(String, String)>,
) -> AdminResult {
    super::snapshots::revert_server(&scp, &id, &sid).await?;
    Ok(Json(json!({"server_id": id, "snapshot_id": sid})))
}

async fn expire_lease(State(scp): State<Arc<ScpPlatform>>, Path(id): Path<String>) -> AdminResult {
    super::backup_resources::expire_now(&scp, &id)?;
    Ok(Json(json!({"id": id, "status": "expired"})))
}

#[derive(Debug, Deserialize)]
struct Version {
    version: String,
}

async fn set_version(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> AdminResult {
    let v: Version = parse(&body)?;
    if super::parse_version(&v.version).iter().all(|n| *n == 0) {
        return Err(crate::admin::AdminError(
            axum::http::StatusCode::BAD_REQUEST,
            "version must look like 6.11.3".into(),
        ));
    }
    scp.set_version(&v.version);
    Ok(Json(json!({"version": v.version})))
}

async fn add_answer_fault(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> AdminResult {
    let f: super::AnswerFault = parse(&body)?;
    if f.remove.iter().any(|p| !p.starts_with('/')) {
        return Err(crate::admin::AdminError(
            axum::http::StatusCode::BAD_REQUEST,
            "remove: JSON pointers start with /".into(),
        ));
    }
    scp.add_answer_fault(f);
    Ok(Json(json!({})))
}

async fn clear_answer_faults(State(scp): State<Arc<ScpPlatform>>) -> AdminResult {
    Ok(Json(json!({"cleared": scp.clear_answer_faults()})))
}

async fn add_task_fault(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> AdminResult {
    let f: super::TaskFault = parse(&body)?;
    scp.add_task_fault(f);
    Ok(Json(json!({})))
}

async fn clear_task_faults(State(scp): State<Arc<ScpPlatform>>) -> AdminResult {
    Ok(Json(json!({"cleared": scp.clear_task_faults()})))
}

#[derive(Debug, Deserialize)]
struct TokenTtl {
    /// Milliseconds.
    ttl_ms: u64,
}

async fn set_token_ttl(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> AdminResult {
    let t: TokenTtl = parse(&body)?;
    scp.set_token_ttl(std::time::Duration::from_millis(t.ttl_ms));
    Ok(Json(json!({"ttl_ms": t.ttl_ms})))
}

async fn logins(State(scp): State<Arc<ScpPlatform>>) -> AdminResult {
    Ok(Json(json!({"logins": scp.logins()})))
}

async fn list_objects(State(scp): State<Arc<ScpPlatform>>) -> AdminResult {
    Ok(Json(objects(&scp)))
}

/// The operator unbinds a custom attribute (test-only: the attribute
/// stays, the binding goes).
async fn delete_binding(
    State(scp): State<Arc<ScpPlatform>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> AdminResult {
    scp.inv.update(|doc| {
        doc.bindings
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| Error::not_found("binding", &id))
    })?;
    Ok(Json(json!({"id": id})))
}
