//! Base images: list (with filters), create (status `CREATING`), update
//! (status `AVAILABLE`), delete, replicas and replica sync.
//!
//! Restoring a base image follows the seed (4.5.2): create it, set it
//! `AVAILABLE`, create the VM linked to it, then write its data through that
//! VM's system disk opened with the base-image flag (an export with
//! `open_base_image: 1`, as sfvddk's `sfdisklib_open` with
//! `SFDISKLIB_FLAG_OPEN_BASE_IMAGE`, or a rw hot-add with
//! `open_base_image: 1`). Writing a base image by its own id is refused.
//! The image's data is *being restored* from `AVAILABLE` until the first
//! such writer closes ([`settle`]): only then is it sealed and the VMs
//! created on it linked to it; until then their own disks cannot be opened
//! (the base is incomplete, seed 4.5.3 rule 8). Images made by the admin
//! API are sealed at once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::json;

use super::ScpPlatform;
use super::envelope::{ScpError, ScpPath, ScpQuery, ScpResult, ok, paged, parse_body};
use super::model::{BaseImageRecord, Replica};
use crate::error::Error;
use crate::exports::ExportTarget;
use crate::ids::unix_now;

/// `GET /janus/20180725/base-images` (filters: `id`, `name`, `status`,
/// `storage_id` (any replica), paging).
pub async fn list(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    let items: Vec<BaseImageRecord> = scp.inv.read(|doc| {
        doc.base_images
            .values()
            .filter(|b| q.get("id").is_none_or(|v| &b.id == v))
            .filter(|b| q.get("name").is_none_or(|v| &b.name == v))
            .filter(|b| {
                q.get("status")
                    .is_none_or(|v| b.status.eq_ignore_ascii_case(v))
            })
            .filter(|b| {
                q.get("storage_id")
                    .is_none_or(|v| b.replicas.iter().any(|r| &r.storage_id == v))
            })
            .cloned()
            .collect()
    });
    paged(&q, items)
}

/// `GET /janus/20180725/base-images/{base_image_id}`
pub async fn get_one(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    let b = scp.inv.read(|doc| doc.base_image(&id).cloned())?;
    ok(b)
}

/// Body of `POST /janus/20180725/base-images`.
#[derive(Debug, Deserialize)]
pub struct CreateBaseImage {
    /// Name.
    pub name: String,
    /// Size in bytes (multiple of 512).
    pub size: u64,
    /// Home storage (default: the first storage).
    #[serde(default)]
    pub storage_id: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Guest OS type.
    #[serde(default)]
    pub os_type: Option<String>,
}

/// Creates a base image record and its empty data (status `CREATING`).
pub fn create_record(scp: &ScpPlatform, req: CreateBaseImage) -> Result<BaseImageRecord, ScpError> {
    if req.name.trim().is_empty() {
        return Err(ScpError::invalid("name must not be empty"));
    }
    if req.size == 0 || !req.size.is_multiple_of(512) {
        return Err(ScpError::invalid("size must be a positive multiple of 512"));
    }
    let storage_id = match req.storage_id {
        Some(s) => s,
        None => scp
            .inv
            .read(|d| d.storages.first().map(|s| s.id.clone()))
            .ok_or_else(|| ScpError::invalid("no storage"))?,
    };
    if !scp.inv.read(|d| d.has_storage(&storage_id)) {
        return Err(ScpError::not_found("storage", &storage_id));
    }
    let image = scp.hv.store.create_image(req.size)?;
    let rec = BaseImageRecord {
        id: image.id().to_string(),
        name: req.name,
        description: req.description,
        status: "CREATING".into(),
        size: req.size,
        disk_format: "raw".into(),
        os_type: req.os_type.unwrap_or_else(|| "linux".into()),
        storage_id: storage_id.clone(),
        replicas: vec![Replica {
            storage_id,
            status: "CREATING".into(),
        }],
        created_at: unix_now(),
    };
    let r2 = rec.clone();
    scp.inv.update(|doc| {
        doc.base_images.insert(r2.id.clone(), r2);
        Ok(())
    })?;
    Ok(rec)
}

/// `POST /janus/20180725/base-images`
pub async fn create(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let req: CreateBaseImage = parse_body(&body)?;
    let rec = create_record(&scp, req)?;
    ok(json!({"id": rec.id, "status": rec.status}))
}

#[derive(Debug, Deserialize)]
struct UpdateBaseImage {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

fn writers_of(scp: &ScpPlatform, id: &str) -> Vec<String> {
    let mut out: Vec<String> = scp
        .hv
        .exports
        .find(|e| matches!(e.target(), ExportTarget::BaseImage(i) if i.id() == id))
        .iter()
        .map(|e| format!("export {}", e.name()))
        .collect();
    out.extend(scp.inv.read(|doc| {
        doc.hotadds
            .values()
            .filter(|h| h.source.base_image_id.as_deref() == Some(id))
            .map(|h| format!("hot-added disk {}", h.id))
            .collect::<Vec<_>>()
    }));
    out
}

/// Whether a base image's data is still being restored: `AVAILABLE`
/// (or `CREATING`) but not sealed yet.
pub fn restoring(scp: &ScpPlatform, id: &str) -> bool {
    scp.hv.store.image(id).is_ok_and(|i| !i.is_sealed())
}

/// Whether a server disk is linked to a base image whose data is still
/// being restored (the disk store links it once the data is complete).
pub fn disk_waits_for_base(scp: &ScpPlatform, disk: &super::model::ServerDisk) -> bool {
    let Some(b) = &disk.base_image_id else {
        return false;
    };
    let linked = scp
        .hv
        .store
        .disk(&disk.id)
        .ok()
        .and_then(|d| d.base_image())
        .is_some_and(|i| i.id() == b);
    !linked && restoring(scp, b)
}

/// The base image data written through a VM's system disk is complete
/// (its writer closed): seal it and link the disks created on it.
pub fn settle(scp: &ScpPlatform, id: &str) -> Result<(), ScpError> {
    let Ok(image) = scp.hv.store.image(id) else {
        return Ok(());
    };
    let available = scp.inv.read(|doc| {
        doc.base_images
            .get(id)
            .is_some_and(|b| b.status == "AVAILABLE")
    });
    if !available || !writers_of(scp, id).is_empty() {
        return Ok(());
    }
    if !image.is_sealed() {
        image.seal()?;
    }
    let waiting: Vec<String> = scp.inv.read(|doc| {
        doc.servers
            .values()
            .flat_map(|s| s.disks.iter())
            .filter(|d| d.base_image_id.as_deref() == Some(id))
            .map(|d| d.id.clone())
            .collect()
    });
    for d in waiting {
        let disk = scp.hv.store.disk(&d)?;
        if disk.base_image().is_none_or(|b| b.id() != id) {
            disk.reset_to_base(Some(image.clone()))?;
        }
    }
    Ok(())
}

/// Makes a base image `AVAILABLE` (marks its replicas). Its data stays
/// writable through a linked VM's system disk until [`settle`]d.
pub fn make_available(scp: &ScpPlatform, id: &str) -> Result<(), ScpError> {
    let status = scp
        .inv
        .read(|doc| doc.base_image(id).map(|b| b.status.clone()))?;
    if status == "AVAILABLE" {
        return Ok(());
    }
    let users: Vec<String> = writers_of(scp, id)
        .into_iter()
        .filter(|u| u.starts_with("export") || u.starts_with("hot"))
        .collect();
    if !users.is_empty() {
        return Err(ScpError::conflict(format!(
            "base image {id} is still open: {}",
            users.join(", ")
        )));
    }
    scp.inv.update(|doc| {
        if let Some(b) = doc.base_images.get_mut(id) {
            b.status = "AVAILABLE".into();
            b.replicas
                .iter_mut()
                .for_each(|r| r.status = "AVAILABLE".into());
        }
        Ok(())
    })?;
    Ok(())
}

/// `PUT /janus/20180725/base-images/{base_image_id}`
pub async fn update(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: UpdateBaseImage = parse_body(&body)?;
    scp.inv.read(|doc| doc.base_image(&id).map(|_| ()))?;
    if let Some(s) = &req.status {
        if !s.eq_ignore_ascii_case("AVAILABLE") {
            return Err(ScpError::invalid(format!(
                "status can only be set to AVAILABLE, not {s}"
            )));
        }
        make_available(&scp, &id)?;
    }
    let rec = scp.inv.update(|doc| {
        let b = doc
            .base_images
            .get_mut(&id)
            .ok_or_else(|| Error::not_found("base image", &id))?;
        if let Some(n) = &req.name {
            b.name = n.clone();
        }
        if let Some(d) = &req.description {
            b.description = d.clone();
        }
        Ok(b.clone())
    })?;
    ok(rec)
}

/// `DELETE /janus/20180725/base-images/{base_image_id}`
pub async fn delete(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    scp.inv.read(|doc| doc.base_image(&id).map(|_| ()))?;
    let mut users = scp.hv.store.disks_using(&id);
    users.extend(scp.inv.read(|doc| {
        doc.servers
            .values()
            .flat_map(|s| s.disks.iter())
            .filter(|d| d.base_image_id.as_deref() == Some(id.as_str()))
            .map(|d| d.id.clone())
            .collect::<Vec<_>>()
    }));
    users.sort();
    users.dedup();
    if !users.is_empty() {
        return Err(ScpError::conflict(format!(
            "base image {id} is used by {} linked disk(s)",
            users.len()
        )));
    }
    let open = writers_of(&scp, &id);
    if !open.is_empty() {
        return Err(ScpError::conflict(format!(
            "base image {id} is still open: {}",
            open.join(", ")
        )));
    }
    scp.hv.store.delete_image(&id)?;
    scp.inv.update(|doc| {
        doc.base_images.remove(&id);
        doc.bindings.retain(|_, b| b.resource_id != id);
        Ok(())
    })?;
    ok(json!({"id": id}))
}

/// `GET /janus/20180725/base-images/{base_image_id}/replicas`
pub async fn list_replicas(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    ScpQuery(q): ScpQuery,
) -> ScpResult {
    let reps = scp
        .inv
        .read(|doc| doc.base_image(&id).map(|b| b.replicas.clone()))?;
    paged(&q, reps)
}

#[derive(Debug, Deserialize)]
struct SyncReplica {
    storage_id: String,
}

/// `POST /janus/20180725/base-images/{base_image_id}/replicas/actions/sync`
pub async fn sync_replica(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: SyncReplica = parse_body(&body)?;
    if let Some(failed) = scp.failed_task("sync_base_image_replica", &id) {
        return failed;
    }
    scp.inv.update(|doc| {
        if !doc.has_storage(&req.storage_id) {
            return Err(Error::not_found("storage", &req.storage_id));
        }
        let b = doc
            .base_images
            .get_mut(&id)
            .ok_or_else(|| Error::not_found("base image", &id))?;
        if b.status != "AVAILABLE" {
            return Err(Error::Conflict(format!(
                "base image {id} is not AVAILABLE: cannot sync replicas"
            )));
        }
        if !b.replicas.iter().any(|r| r.storage_id == req.storage_id) {
            b.replicas.push(Replica {
                storage_id: req.storage_id.clone(),
                status: "AVAILABLE".into(),
            });
        }
        Ok(())
    })?;
    scp.task(
        "sync_base_image_replica",
        &id,
        json!({"base_image_id": id, "storage_id": req.storage_id}),
    )
}
