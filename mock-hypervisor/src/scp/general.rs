//! The general Open API as real clients (`sangfor-scp`) read it, under
//! `/janus/20180725/`: resource pools (`azs`), volumes (the servers'
//! disks), images (the base images), the task list. Read-only views of the
//! same inventory the backup endpoints use; every list is paged like the
//! others (`page_num` from 0, `total_size`, `next_page_num`).

use std::sync::Arc;

use axum::extract::State;
use serde_json::{Value, json};

use super::ScpPlatform;
use super::envelope::{ScpError, ScpPath, ScpQuery, ScpResult, ok, paged};
use super::model::{DiskType, ScpInventory};

/// The one resource pool of the mock.
pub const AZ_ID: &str = "az-mock-1";

fn az(scp: &ScpPlatform) -> Value {
    json!({
        "id": AZ_ID,
        "name": "mock-pool",
        "status": "normal",
        "type": "hci",
        "tag": "public",
        "version": super::build_version(&scp.config().version),
    })
}

/// `GET /janus/20180725/azs`
pub async fn list_azs(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    paged(&q, vec![az(&scp)])
}

/// `GET /janus/20180725/azs/{az_id}`
pub async fn get_az(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    if id != AZ_ID {
        return Err(ScpError::not_found("az", &id));
    }
    ok(az(&scp))
}

fn volumes(doc: &ScpInventory) -> Vec<Value> {
    doc.servers
        .values()
        .flat_map(|s| {
            s.disks.iter().map(move |d| {
                json!({
                    "id": d.id,
                    "name": format!("{}-{}", s.name, d.name),
                    "status": "in-use",
                    "server_id": s.id,
                    "az_id": AZ_ID,
                    "storage_id": d.storage_id,
                    "size_mb": d.size.div_ceil(1 << 20),
                    "type": if d.base_image_id.is_some() { "derive_disk" } else { "new_disk" },
                    "is_system_disk": d.disk_type == DiskType::System,
                })
            })
        })
        .collect()
}

/// `GET /janus/20180725/volumes` (filters: `server_id`, `status`, `name`).
pub async fn list_volumes(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    let items: Vec<Value> = scp.inv.read(volumes);
    let items = items
        .into_iter()
        .filter(|v| {
            ["server_id", "status", "name"]
                .iter()
                .all(|k| q.get(*k).is_none_or(|want| v[*k] == want.as_str()))
        })
        .collect();
    paged(&q, items)
}

/// `GET /janus/20180725/volumes/{volume_id}`
pub async fn get_volume(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    scp.inv
        .read(volumes)
        .into_iter()
        .find(|v| v["id"] == id.as_str())
        .map_or_else(|| Err(ScpError::not_found("volume", &id)), ok)
}

/// `GET /janus/20180725/images` (the base images; filters: `name`,
/// `status`).
pub async fn list_images(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    let items: Vec<Value> = scp.inv.read(|doc| {
        doc.base_images
            .values()
            .map(|b| {
                json!({
                    "id": b.id,
                    "name": b.name,
                    "description": b.description,
                    "status": if b.status == "AVAILABLE" { "active" } else { "creating" },
                    "disk_format": "aCloud",
                    "image_type": "public",
                    "os_type": b.os_type,
                    "size_mb": b.size.div_ceil(1 << 20),
                    "azs": [AZ_ID],
                })
            })
            .filter(|v| {
                ["name", "status", "disk_format", "image_type"]
                    .iter()
                    .all(|k| q.get(*k).is_none_or(|want| v[*k] == want.as_str()))
            })
            .collect()
    });
    paged(&q, items)
}

/// `GET /janus/20180725/tasks` (filters: `status`, `object_id`), newest
/// first; listing does not move tasks on.
pub async fn list_tasks(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    let items: Vec<_> = scp
        .tasks
        .list()
        .into_iter()
        .filter(|t| q.get("status").is_none_or(|s| &t.status == s))
        .filter(|t| q.get("object_id").is_none_or(|s| &t.object_id == s))
        .collect();
    paged(&q, items)
}
