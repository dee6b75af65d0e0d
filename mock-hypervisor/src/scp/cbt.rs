//! CBT: status (enable / reset) and changed areas.
//!
//! Rules (seed `scp-linked-vm-backup.txt`): `checkpoint_id=0` means every
//! allocated area; `base_image=1` queries the base image (checkpoint 0 only);
//! below 6.11.3 `base_image=1` is refused (non-desktop VMs: the system disk
//! CBT already includes the base image, which it then does; desktop VMs: the
//! base image CBT cannot be queried at all); after a revert or restore every
//! query answers "The VM CBT has expired. Please reset it." until
//! `PUT .../cbt/status`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::json;

use super::ScpPlatform;
use super::envelope::{
    BASE_IMAGE_CBT_UNSUPPORTED, CBT_DISABLED, CBT_EXPIRED_MESSAGE, CHECKPOINT_INVALID, REFUSED,
    ScpError, ScpPath, ScpQuery, ScpResult, ok, parse_body, query_u64,
};
use crate::disk::bitmap::runs;
use crate::disk::{BlockBitmap, View};
use crate::error::Error;

/// `GET /janus/20240725/servers/{server_id}/cbt/status`
pub async fn get_status(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    let cbt = scp.inv.read(|doc| doc.server(&id).map(|s| s.cbt))?;
    // No expiry field: an expired CBT shows in the changed-areas answer.
    ok(json!({"enable": cbt.enable}))
}

#[derive(Debug, Deserialize)]
struct PutStatus {
    enable: u8,
}

/// `PUT /janus/20240725/servers/{server_id}/cbt/status` with `{"enable":1}`
/// enables or resets CBT; `{"enable":0}` disables it. Either way the old
/// checkpoints stop being usable once tracking was interrupted.
pub async fn put_status(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: PutStatus = parse_body(&body)?;
    if req.enable > 1 {
        return Err(ScpError::invalid("enable must be 0 or 1"));
    }
    let (disks, interrupted) = scp.inv.update(|doc| {
        let s = doc
            .servers
            .get_mut(&id)
            .ok_or_else(|| Error::not_found("server", &id))?;
        let interrupted = s.cbt.enable == 0 || req.enable == 0;
        s.cbt.enable = req.enable;
        s.cbt.expired = false;
        Ok((
            s.disks.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            interrupted,
        ))
    })?;
    if interrupted {
        for d in disks {
            scp.hv.store.disk(&d)?.invalidate_checkpoints()?;
        }
    }
    ok(json!({"enable": req.enable}))
}

/// `GET /janus/20240725/servers/{server_id}/cbt/changed-areas`
pub async fn changed_areas(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(server_id): ScpPath<String>,
    ScpQuery(q): ScpQuery,
) -> ScpResult {
    let snapshot_id = q
        .get("snapshot_id")
        .cloned()
        .ok_or_else(|| ScpError::invalid("query parameter snapshot_id is required"))?;
    let base_image = query_u64(&q, "base_image")?.unwrap_or(0);
    if base_image > 1 {
        return Err(ScpError::invalid("base_image must be 0 or 1"));
    }
    let checkpoint_id = query_u64(&q, "checkpoint_id")?.unwrap_or(0);
    let offset = query_u64(&q, "offset")?.unwrap_or(0);
    let (server, snap) = scp.inv.read(|doc| -> Result<_, ScpError> {
        Ok((
            doc.server(&server_id)?.clone(),
            doc.snapshot(&server_id, &snapshot_id)?.clone(),
        ))
    })?;
    if server.cbt.enable == 0 {
        return Err(ScpError::refused(
            CBT_DISABLED,
            format!("CBT is not enabled on server {server_id}"),
        ));
    }
    if server.cbt.expired {
        // The documented signal is the message, not a code.
        return Err(ScpError::refused(REFUSED, CBT_EXPIRED_MESSAGE));
    }
    let disks: Vec<super::model::ServerDisk> = snap
        .vmconf
        .pointer("/hardware_option/disks")
        .cloned()
        .and_then(|d| serde_json::from_value(d).ok())
        .unwrap_or_default();
    let disk_meta = match q.get("disk_id") {
        Some(d) => disks.iter().find(|x| &x.id == d),
        None => disks.first(),
    }
    .ok_or_else(|| {
        ScpError::not_found(
            "disk",
            q.get("disk_id").map(String::as_str).unwrap_or("system"),
        )
    })?;
    let desk = server.application == "desk";
    let recent = scp.version_at_least("6.11.3");
    let disk = scp.hv.store.disk(&disk_meta.id)?;
    let size = disk.size();
    let map: BlockBitmap = if base_image == 1 {
        let Some(base_id) = &disk_meta.base_image_id else {
            return Err(ScpError::conflict(format!(
                "disk {} has no base image",
                disk_meta.id
            )));
        };
        if !recent {
            return Err(ScpError::refused(
                BASE_IMAGE_CBT_UNSUPPORTED,
                if desk {
                    "The base image CBT of desktop VMs cannot be queried before 6.11.3: back up the full base image"
                } else {
                    "Separate base image CBT is not supported before 6.11.3: the system disk CBT already includes the base image"
                },
            ));
        }
        if checkpoint_id != 0 {
            return Err(ScpError::invalid(
                "the base image CBT only supports checkpoint_id=0",
            ));
        }
        scp.hv.store.image(base_id)?.allocated_map()
    } else if checkpoint_id == 0 {
        let include_base = disk_meta.base_image_id.is_some() && !recent && !desk;
        disk.allocated_map(&View::Snapshot(snapshot_id.clone()), include_base)?
    } else {
        disk.changed_since(&snapshot_id, checkpoint_id)
            .map_err(|e| match e {
                Error::Refused(m) => ScpError::refused(CHECKPOINT_INVALID, m),
                other => other.into(),
            })?
    };
    if offset >= size || !offset.is_multiple_of(512) {
        return Err(ScpError::invalid(format!(
            "offset must be a multiple of 512 below the disk size ({size})"
        )));
    }
    let page = scp.config().changed_areas_page.max(512);
    let length = query_u64(&q, "length")?
        .unwrap_or(page)
        .min(page)
        .min(size - offset);
    let areas: Vec<_> = runs(size, offset, length, |b| map.get(b))
        .into_iter()
        .filter(|r| r.set)
        .map(|r| json!({"offset": r.offset, "length": r.length}))
        .collect();
    let end = offset + length;
    ok(json!({
        "server_id": server_id,
        "snapshot_id": snapshot_id,
        "disk_id": disk_meta.id,
        "base_image": base_image,
        "checkpoint_id": checkpoint_id,
        "snapshot_checkpoint_id": snap.checkpoint_id,
        "disk_size": size,
        "block_size": crate::disk::BLOCK_SIZE,
        "offset": offset,
        "length": length,
        "next_offset": if end < size { Some(end) } else { None },
        "areas": areas,
    }))
}
