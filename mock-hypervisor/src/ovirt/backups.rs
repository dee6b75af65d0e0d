//! oVirt 4.4+ incremental backup: backups, checkpoints, image transfers,
//! and the image server (`/images/{ticket}`: ranged GET/PUT, extents).
//!
//! A backup freezes its disks (a disk-model snapshot) and records a
//! disk-model checkpoint per disk at start; dirty extents of a backup with
//! `from_checkpoint_id` are the blocks written between that checkpoint and
//! the start. The checkpoint becomes visible (`state: created`) when the
//! backup is finalized; only `cow` disks with `backup: incremental` get one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::api::{Reply, blocking, created, done, ok};
use super::model::{Backup, Checkpoint, Transfer, backup_snapshot_name};
use super::wire::{Fault, Format, nested_id, parse_body, text};
use super::{API, OvirtPlatform};
use crate::disk::View;
use crate::exports::ExportTarget;
use crate::ids::{new_uuid, unix_now};

type P = State<Arc<OvirtPlatform>>;

fn require_44(p: &OvirtPlatform) -> Result<(), Fault> {
    if p.version_at_least("4.4") {
        Ok(())
    } else {
        Err(Fault::new(
            StatusCode::NOT_FOUND,
            "Not Found",
            format!(
                "incremental backup needs engine 4.4 or later (this is {})",
                p.config().version
            ),
        ))
    }
}

fn backup_view(b: &Backup) -> Value {
    json!({
        "id": b.id,
        "href": format!("{API}/vms/{}/backups/{}", b.vm_id, b.id),
        "phase": b.phase,
        "description": b.description,
        "from_checkpoint_id": b.from_checkpoint_id,
        "to_checkpoint_id": b.to_checkpoint_id,
        "creation_date": super::wire::date(b.creation_date),
        "vm": {"id": b.vm_id, "href": format!("{API}/vms/{}", b.vm_id)},
        "disks": {"disk": b.disk_ids.iter().map(|d| json!({"id": d})).collect::<Vec<_>>()},
    })
}

fn checkpoint_view(c: &Checkpoint) -> Value {
    json!({
        "id": c.id,
        "href": format!("{API}/vms/{}/checkpoints/{}", c.vm_id, c.id),
        "parent_id": c.parent_id,
        "state": c.state,
        "creation_date": super::wire::date(c.creation_date),
        "vm": {"id": c.vm_id},
        "disks": {"disk": c.disks.keys().map(|d| json!({"id": d})).collect::<Vec<_>>()},
    })
}

/// Whether a transfer phase is final.
pub fn transfer_done(phase: &str) -> bool {
    matches!(
        phase,
        "finished_success" | "finished_failure" | "cancelled" | "cancelled_user"
    )
}

fn transfer_view(p: &OvirtPlatform, t: &Transfer, base: &str) -> Value {
    let nbd = p.hv.nbd_endpoint();
    let url = format!("{base}/images/{}", t.id);
    json!({
        "id": t.id,
        "href": format!("{API}/imagetransfers/{}", t.id),
        "phase": t.phase,
        "direction": t.direction,
        "format": t.format,
        "transfer_url": url,
        "proxy_url": url,
        // A mock extension outside the API model, only when configured.
        "nbd_url": (t.phase == "transferring" && p.config().transfer_nbd_url).then(|| format!("nbd://{}:{}/{}", nbd.host, nbd.port, t.export_name)),
        "inactivity_timeout": 60,
        "timeout_policy": "legacy",
        "shallow": false,
        "active": t.phase == "transferring",
        "transferred": t.bytes_transferred,
        "host": super::system::host_link(),
        "image": {"id": t.disk_id},
        "disk": {"id": t.disk_id, "href": format!("{API}/disks/{}", t.disk_id)},
        "backup": t.backup_id.as_ref().map(|b| json!({"id": b})),
    })
}

// -------------------------------------------------------------- backups

/// `GET /vms/{vm}/backups`.
pub async fn list_backups(State(p): P, headers: HeaderMap, Path(vm): Path<String>) -> Response {
    let r = require_44(&p).map(|_| {
        let list: Vec<Value> = p.inv.read(|doc| {
            doc.backups
                .values()
                .filter(|b| b.vm_id == vm)
                .map(backup_view)
                .collect()
        });
        ok("backups", json!({"backup": list}))
    });
    done(Format::of(&headers), r)
}

/// `POST /vms/{vm}/backups`: `{from_checkpoint_id?, description?,
/// disks: {disk: [{id}]}}`.
pub async fn start_backup(
    State(p): P,
    headers: HeaderMap,
    Path(vm): Path<String>,
    body: Bytes,
) -> Response {
    let format = Format::of(&headers);
    let r = async {
        require_44(&p)?;
        let req = parse_body(&headers, &body)?;
        let from = text(&req, "from_checkpoint_id");
        let wanted: Vec<String> = super::wire::list(&req, "disks", "disk")
            .into_iter()
            .filter_map(|d| text(d, "id"))
            .collect();
        let disk_ids = p.inv.read(|doc| {
            if !doc.vms.contains_key(&vm) {
                return Err(Fault::not_found("VM", &vm));
            }
            if let Some(b) = doc
                .backups
                .values()
                .find(|b| b.vm_id == vm && !super::api::backup_done(&b.phase))
            {
                return Err(Fault::conflict(format!(
                    "Cannot backup VM: backup {} is in progress",
                    b.id
                )));
            }
            if let Some(c) = &from {
                let cp = doc
                    .checkpoints
                    .get(c)
                    .filter(|cp| cp.vm_id == vm)
                    .ok_or_else(|| Fault::bad_request(format!("checkpoint {c} does not exist")))?;
                if cp.state != "created" {
                    return Err(Fault::bad_request(format!(
                        "checkpoint {c} is {}: take a full backup",
                        cp.state
                    )));
                }
            }
            let own: Vec<String> = doc
                .own_disks(&vm)
                .into_iter()
                .map(|(_, d)| d.id.clone())
                .collect();
            if wanted.is_empty() {
                return Ok(own);
            }
            for w in &wanted {
                if !own.contains(w) {
                    return Err(Fault::bad_request(format!(
                        "disk {w} is not a disk of VM {vm}"
                    )));
                }
            }
            Ok(wanted.clone())
        })?;
        let id = new_uuid();
        let name = backup_snapshot_name(&id);
        let pp = p.clone();
        let ids2 = disk_ids.clone();
        let cps = blocking(move || super::api::freeze(&pp, &ids2, &name)).await?;
        let polls = p.config().backup_polls;
        let b = Backup {
            id: id.clone(),
            vm_id: vm.clone(),
            description: text(&req, "description").unwrap_or_default(),
            phase: if polls == 0 {
                "ready".into()
            } else {
                "initializing".into()
            },
            polls_left: polls,
            from_checkpoint_id: from,
            to_checkpoint_id: new_uuid(),
            disk_ids,
            creation_date: unix_now(),
        };
        p.inv.update(|doc| {
            // Pending checkpoint numbers ride on the checkpoint record
            // created at finalize; keep them in a pending entry now.
            let incremental: BTreeMap<String, u64> = cps
                .iter()
                .filter(|(d, _)| {
                    doc.disks
                        .get(*d)
                        .is_some_and(|d| d.format == "cow" && d.backup == "incremental")
                })
                .map(|(d, c)| (d.clone(), *c))
                .collect();
            doc.checkpoints.insert(
                b.to_checkpoint_id.clone(),
                Checkpoint {
                    id: b.to_checkpoint_id.clone(),
                    vm_id: vm.clone(),
                    parent_id: None,
                    state: "pending".into(),
                    disks: incremental,
                    creation_date: unix_now(),
                },
            );
            doc.backups.insert(id.clone(), b.clone());
            Ok(())
        })?;
        Ok(created("backup", backup_view(&b)))
    }
    .await;
    done(format, r)
}

/// `GET /vms/{vm}/backups/{b}`: each call is a phase poll.
pub async fn get_backup(
    State(p): P,
    headers: HeaderMap,
    Path((vm, bid)): Path<(String, String)>,
) -> Response {
    let polls = p.config().backup_polls;
    let r = require_44(&p).and_then(|_| {
        p.inv
            .update(|doc| {
                let b = doc
                    .backups
                    .get_mut(&bid)
                    .filter(|b| b.vm_id == vm)
                    .ok_or_else(|| crate::error::Error::not_found("Backup", &bid))?;
                let next = match b.phase.as_str() {
                    "initializing" => Some("starting"),
                    "starting" => Some("ready"),
                    "finalizing" => Some("succeeded"),
                    _ => None,
                };
                if let Some(next) = next {
                    b.polls_left = b.polls_left.saturating_sub(1);
                    if b.polls_left == 0 {
                        b.phase = next.into();
                        b.polls_left = polls.max(1);
                    }
                }
                Ok(backup_view(b))
            })
            .map(|v| ok("backup", v))
            .map_err(Fault::from)
    });
    done(Format::of(&headers), r)
}

/// `GET /vms/{vm}/backups/{b}/disks`: the disks of the backup, each with
/// its `backup_mode`: `incremental` when the backup starts from a
/// checkpoint that has the disk, else `full`.
pub async fn backup_disks(
    State(p): P,
    headers: HeaderMap,
    Path((vm, bid)): Path<(String, String)>,
) -> Response {
    let r = require_44(&p).and_then(|_| {
        let (b, modes) = p.inv.read(|doc| {
            let b = doc
                .backups
                .get(&bid)
                .filter(|b| b.vm_id == vm)
                .cloned()
                .ok_or_else(|| Fault::not_found("Backup", &bid))?;
            let from = b
                .from_checkpoint_id
                .as_ref()
                .and_then(|c| doc.checkpoints.get(c));
            let modes: Vec<(super::model::Disk, &'static str)> = b
                .disk_ids
                .iter()
                .filter_map(|d| doc.disks.get(d).cloned())
                .map(|d| {
                    let incremental = from.is_some_and(|c| c.disks.contains_key(&d.id));
                    (d, if incremental { "incremental" } else { "full" })
                })
                .collect();
            Ok::<_, Fault>((b, modes))
        })?;
        let list: Vec<Value> = modes
            .iter()
            .map(|(d, mode)| {
                let mut v = super::api::disk_view(&p, d);
                v["backup_mode"] = json!(mode);
                v["href"] = json!(format!(
                    "{API}/vms/{}/backups/{}/disks/{}",
                    b.vm_id, b.id, d.id
                ));
                v
            })
            .collect();
        Ok(ok("disks", json!({"disk": list})))
    });
    done(Format::of(&headers), r)
}

/// `POST /vms/{vm}/backups/{b}/finalize`: refused while one of its image
/// transfers is not finalized; publishes the checkpoint.
pub async fn finalize_backup(
    State(p): P,
    headers: HeaderMap,
    Path((vm, bid)): Path<(String, String)>,
) -> Response {
    let format = Format::of(&headers);
    let r = async {
        require_44(&p)?;
        let b =
            p.inv.update(|doc| {
                let b = doc
                    .backups
                    .get(&bid)
                    .filter(|b| b.vm_id == vm)
                    .cloned()
                    .ok_or_else(|| crate::error::Error::not_found("Backup", &bid))?;
                if super::api::backup_done(&b.phase) || b.phase == "finalizing" {
                    return Err(crate::error::Error::Conflict(format!(
                        "backup {bid} is already {}",
                        b.phase
                    )));
                }
                if let Some(t) = doc.transfers.values().find(|t| {
                    t.backup_id.as_deref() == Some(bid.as_str()) && !transfer_done(&t.phase)
                }) {
                    return Err(crate::error::Error::Conflict(format!(
                        "Cannot finalize backup {bid}: image transfer {} is {}",
                        t.id, t.phase
                    )));
                }
                let ready = b.phase == "ready";
                let parent = doc
                    .checkpoints
                    .values()
                    .filter(|c| c.vm_id == vm && c.state != "pending")
                    .max_by_key(|c| c.creation_date)
                    .map(|c| c.id.clone());
                if ready {
                    if let Some(c) = doc.checkpoints.get_mut(&b.to_checkpoint_id) {
                        c.state = "created".into();
                        c.parent_id = parent;
                        c.creation_date = unix_now();
                    }
                } else {
                    doc.checkpoints.remove(&b.to_checkpoint_id);
                }
                if let Some(bb) = doc.backups.get_mut(&bid) {
                    bb.phase = if ready {
                        "finalizing".into()
                    } else {
                        "failed".into()
                    };
                    bb.polls_left = 1;
                }
                Ok(b)
            })?;
        let hv = p.hv.clone();
        blocking(move || {
            let name = backup_snapshot_name(&b.id);
            for d in &b.disk_ids {
                if let Ok(vd) = hv.store.disk(d)
                    && vd.snapshot_ids().contains(&name)
                {
                    vd.delete_snapshot(&name)?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(ok("action", json!({"status": "complete"})))
    }
    .await;
    done(format, r)
}

// ---------------------------------------------------------- checkpoints

/// `GET /vms/{vm}/checkpoints`.
pub async fn list_checkpoints(State(p): P, headers: HeaderMap, Path(vm): Path<String>) -> Response {
    let r = require_44(&p).map(|_| {
        let mut list: Vec<Checkpoint> = p.inv.read(|doc| {
            doc.checkpoints
                .values()
                .filter(|c| c.vm_id == vm && c.state != "pending")
                .cloned()
                .collect()
        });
        list.sort_by_key(|c| c.creation_date);
        ok(
            "checkpoints",
            json!({"checkpoint": list.iter().map(checkpoint_view).collect::<Vec<_>>()}),
        )
    });
    done(Format::of(&headers), r)
}

/// `GET /vms/{vm}/checkpoints/{c}`.
pub async fn get_checkpoint(
    State(p): P,
    headers: HeaderMap,
    Path((vm, cid)): Path<(String, String)>,
) -> Response {
    let r = require_44(&p).and_then(|_| {
        p.inv
            .read(|doc| {
                doc.checkpoints
                    .get(&cid)
                    .filter(|c| c.vm_id == vm && c.state != "pending")
                    .cloned()
            })
            .ok_or_else(|| Fault::not_found("Checkpoint", &cid))
            .map(|c| ok("checkpoint", checkpoint_view(&c)))
    });
    done(Format::of(&headers), r)
}

/// `DELETE /vms/{vm}/checkpoints/{c}`.
pub async fn delete_checkpoint(
    State(p): P,
    headers: HeaderMap,
    Path((vm, cid)): Path<(String, String)>,
) -> Response {
    let r = require_44(&p).and_then(|_| {
        p.inv
            .update(|doc| {
                doc.checkpoints
                    .remove(&cid)
                    .filter(|c| c.vm_id == vm)
                    .ok_or_else(|| crate::error::Error::not_found("Checkpoint", &cid))?;
                Ok(ok("action", json!({"status": "complete"})))
            })
            .map_err(Fault::from)
    });
    done(Format::of(&headers), r)
}

/// Marks a VM's checkpoints invalid (admin: bitmaps lost).
pub fn invalidate_checkpoints(p: &OvirtPlatform, vm: &str) -> crate::error::Result<usize> {
    let disks = p.inv.update(|doc| {
        let mut n = 0;
        for c in doc.checkpoints.values_mut().filter(|c| c.vm_id == vm) {
            c.state = "invalid".into();
            n += 1;
        }
        let disks: Vec<String> = doc
            .own_disks(vm)
            .into_iter()
            .map(|(_, d)| d.id.clone())
            .collect();
        Ok((n, disks))
    })?;
    for d in &disks.1 {
        p.hv.store.disk(d)?.invalidate_checkpoints()?;
    }
    Ok(disks.0)
}

// ------------------------------------------------------------ transfers

/// `GET /imagetransfers`.
pub async fn list_transfers(State(p): P, headers: HeaderMap) -> Response {
    let base = p.public_base(&headers);
    let list: Vec<Value> = p.inv.read(|doc| {
        doc.transfers
            .values()
            .map(|t| transfer_view(&p, t, &base))
            .collect()
    });
    done(
        Format::of(&headers),
        Ok(ok("image_transfers", json!({"image_transfer": list}))),
    )
}

/// `POST /imagetransfers`: `{disk: {id}, backup?: {id}, direction:
/// download|upload, format: raw}`.
pub async fn start_transfer(State(p): P, headers: HeaderMap, body: Bytes) -> Response {
    let format = Format::of(&headers);
    let base = p.public_base(&headers);
    let r: Result<Reply, Fault> = async {
        let req = parse_body(&headers, &body)?;
        let disk_id = nested_id(&req, "disk")
            .or_else(|| nested_id(&req, "image"))
            .ok_or_else(|| Fault::bad_request("image_transfer.disk.id is required"))?;
        let backup_id = nested_id(&req, "backup");
        let direction = text(&req, "direction").unwrap_or_else(|| "upload".into());
        let fmt = text(&req, "format").unwrap_or_else(|| "cow".into());
        if direction != "download" && direction != "upload" {
            return Err(Fault::bad_request(format!(
                "direction must be download or upload, not {direction}"
            )));
        }
        if fmt != "raw" {
            return Err(Fault::bad_request(format!(
                "the mock transfers raw data only (format {fmt})"
            )));
        }
        let view = p.inv.read(|doc| {
            let disk = doc
                .disks
                .get(&disk_id)
                .ok_or_else(|| Fault::not_found("Disk", &disk_id))?;
            if doc
                .transfers
                .values()
                .any(|t| t.disk_id == disk_id && !transfer_done(&t.phase))
            {
                return Err(Fault::conflict(format!(
                    "disk {} has an image transfer in progress",
                    disk.id
                )));
            }
            match &backup_id {
                Some(b) => {
                    require_44(&p)?;
                    let b = doc
                        .backups
                        .get(b)
                        .ok_or_else(|| Fault::not_found("Backup", b))?;
                    if direction != "download" {
                        return Err(Fault::bad_request("a backup is downloaded, not uploaded"));
                    }
                    if b.phase != "ready" {
                        return Err(Fault::conflict(format!(
                            "backup {} is {}, not ready",
                            b.id, b.phase
                        )));
                    }
                    if !b.disk_ids.contains(&disk_id) {
                        return Err(Fault::bad_request(format!(
                            "disk {disk_id} is not part of backup {}",
                            b.id
                        )));
                    }
                    Ok(View::Snapshot(backup_snapshot_name(&b.id)))
                }
                None => {
                    if let Some(a) = doc.owner_of(&disk_id)
                        && doc.vms.get(&a.vm_id).is_some_and(|v| v.status == "up")
                    {
                        return Err(Fault::conflict(format!(
                            "disk {disk_id} is attached to running VM {}",
                            a.vm_id
                        )));
                    }
                    Ok(View::Live)
                }
            }
        })?;
        let disk = p.hv.store.disk(&disk_id)?;
        let id = new_uuid();
        let export_name = format!("ovirt-transfer-{id}");
        p.hv.exports.add(
            &export_name,
            &format!("ovirt:transfer:{id}"),
            ExportTarget::Disk {
                disk,
                view,
                include_base: true,
            },
            direction == "upload",
        )?;
        let polls = p.config().transfer_polls;
        let t = Transfer {
            id: id.clone(),
            disk_id,
            backup_id,
            direction,
            format: fmt,
            phase: if polls == 0 {
                "transferring".into()
            } else {
                "initializing".into()
            },
            polls_left: polls,
            export_name,
            bytes_transferred: 0,
        };
        p.inv.update(|doc| {
            doc.transfers.insert(id.clone(), t.clone());
            Ok(())
        })?;
        Ok(created("image_transfer", transfer_view(&p, &t, &base)))
    }
    .await;
    done(format, r)
}

/// `GET /imagetransfers/{t}`: each call is a phase poll.
pub async fn get_transfer(State(p): P, headers: HeaderMap, Path(tid): Path<String>) -> Response {
    let base = p.public_base(&headers);
    let r = p
        .inv
        .update(|doc| {
            let t = doc
                .transfers
                .get_mut(&tid)
                .ok_or_else(|| crate::error::Error::not_found("Image transfer", &tid))?;
            match t.phase.as_str() {
                "initializing" => {
                    t.polls_left = t.polls_left.saturating_sub(1);
                    if t.polls_left == 0 {
                        t.phase = "transferring".into();
                    }
                }
                "finalizing_success" => t.phase = "finished_success".into(),
                _ => {}
            }
            Ok(t.clone())
        })
        .map(|t| ok("image_transfer", transfer_view(&p, &t, &base)))
        .map_err(Fault::from);
    done(Format::of(&headers), r)
}

fn end_transfer(p: &OvirtPlatform, tid: &str, phase: &str) -> Result<Reply, Fault> {
    let t = p.inv.update(|doc| {
        let t = doc
            .transfers
            .get_mut(tid)
            .ok_or_else(|| crate::error::Error::not_found("Image transfer", tid))?;
        if transfer_done(&t.phase) || t.phase == "finalizing_success" {
            return Err(crate::error::Error::Conflict(format!(
                "image transfer {tid} is already {}",
                t.phase
            )));
        }
        t.phase = phase.into();
        Ok(t.clone())
    })?;
    let _ = p.hv.exports.remove(&t.export_name);
    Ok(ok("action", json!({"status": "complete"})))
}

/// `POST /imagetransfers/{t}/finalize`.
pub async fn finalize_transfer(
    State(p): P,
    headers: HeaderMap,
    Path(tid): Path<String>,
) -> Response {
    done(
        Format::of(&headers),
        end_transfer(&p, &tid, "finalizing_success"),
    )
}

/// `POST /imagetransfers/{t}/cancel`.
pub async fn cancel_transfer(State(p): P, headers: HeaderMap, Path(tid): Path<String>) -> Response {
    done(Format::of(&headers), end_transfer(&p, &tid, "cancelled"))
}

// --------------------------------------------------------- image server

fn image_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, msg.into()).into_response()
}

/// The transfer behind a ticket and its export, or the image server's
/// refusal (status, message).
fn ticket(
    p: &OvirtPlatform,
    id: &str,
) -> Result<(Transfer, Arc<crate::exports::DiskExport>), (StatusCode, String)> {
    let t = p
        .inv
        .read(|doc| doc.transfers.get(id).cloned())
        .ok_or_else(|| (StatusCode::FORBIDDEN, format!("no such ticket {id}")))?;
    if t.phase != "transferring" {
        return Err((
            StatusCode::FORBIDDEN,
            format!("ticket {id} is not transferring ({})", t.phase),
        ));
    }
    let e =
        p.hv.exports
            .get(&t.export_name)
            .ok_or_else(|| (StatusCode::FORBIDDEN, format!("ticket {id} expired")))?;
    Ok((t, e))
}

fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let r = v.trim().strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = if b.trim().is_empty() {
        size.checked_sub(1)?
    } else {
        b.trim().parse().ok()?
    };
    (start <= end && end < size).then(|| (start, end - start + 1))
}

fn count(p: &OvirtPlatform, tid: &str, n: u64) {
    let _ = p.inv.update(|doc| {
        if let Some(t) = doc.transfers.get_mut(tid) {
            t.bytes_transferred += n;
        }
        Ok(())
    });
}

/// `GET /images/{ticket}` with `Range: bytes=a-b` (206) or the whole
/// image (200).
pub async fn image_get(State(p): P, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (_t, e) = match ticket(&p, &id) {
        Ok(x) => x,
        Err((status, msg)) => return image_error(status, msg),
    };
    let size = e.size();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (offset, length, partial) = match range {
        Some(r) => match parse_range(r, size) {
            Some((o, l)) => (o, l, true),
            None => {
                return image_error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("bad range {r} for size {size}"),
                );
            }
        },
        None => (0, size, false),
    };
    if length > 256 << 20 {
        return image_error(StatusCode::BAD_REQUEST, "ranges are limited to 256 MiB");
    }
    let e2 = e.clone();
    match tokio::task::spawn_blocking(move || e2.read(offset, length)).await {
        Ok(Ok(data)) => {
            count(&p, &id, length);
            let mut r = (
                if partial {
                    StatusCode::PARTIAL_CONTENT
                } else {
                    StatusCode::OK
                },
                data,
            )
                .into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            if partial
                && let Ok(v) = header::HeaderValue::from_str(&format!(
                    "bytes {offset}-{}/{size}",
                    offset + length - 1
                ))
            {
                h.insert(header::CONTENT_RANGE, v);
            }
            r
        }
        Ok(Err(err)) => image_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
        Err(err) => image_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

/// `OPTIONS /images/{ticket}`: the ticket's features, as imageio answers
/// (`extents` for a download; `zero` and `flush` too for an upload) and
/// how many connections it serves. Without it imageio clients take the
/// server for one without extents and read every byte.
pub async fn image_options(State(p): P, Path(id): Path<String>) -> Response {
    let t = if id == "*" {
        None
    } else {
        match ticket(&p, &id) {
            Ok((t, _)) => Some(t),
            Err((status, msg)) => return image_error(status, msg),
        }
    };
    let write = t.as_ref().is_none_or(|t| t.direction == "upload");
    let (features, allow) = if write {
        (json!(["extents", "zero", "flush"]), "OPTIONS,GET,PUT,PATCH")
    } else {
        (json!(["extents"]), "OPTIONS,GET")
    };
    let mut body = json!({"features": features});
    if t.is_some() {
        body["max_readers"] = json!(8);
        body["max_writers"] = json!(if write { 8 } else { 0 });
    }
    let mut r = axum::Json(body).into_response();
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// `PUT /images/{ticket}` with `Content-Range: bytes a-b/*` (upload).
pub async fn image_put(
    State(p): P,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (t, e) = match ticket(&p, &id) {
        Ok(x) => x,
        Err((status, msg)) => return image_error(status, msg),
    };
    if t.direction != "upload" {
        return image_error(StatusCode::FORBIDDEN, "this ticket is for download");
    }
    let offset = match headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => match v
            .trim()
            .strip_prefix("bytes ")
            .and_then(|r| r.split(['-', '/']).next())
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(o) => o,
            None => return image_error(StatusCode::BAD_REQUEST, format!("bad Content-Range {v}")),
        },
        None => 0,
    };
    let n = body.len() as u64;
    if offset.checked_add(n).is_none_or(|end| end > e.size()) {
        return image_error(StatusCode::BAD_REQUEST, "write past the end of the image");
    }
    match tokio::task::spawn_blocking(move || e.write(offset, &body)).await {
        Ok(Ok(())) => {
            count(&p, &id, n);
            StatusCode::OK.into_response()
        }
        Ok(Err(err)) => image_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
        Err(err) => image_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

/// `GET /images/{ticket}/extents?context=zero|dirty`: imageio extents
/// (`[{"start", "length", "zero"|"dirty"}]`, plain JSON).
pub async fn image_extents(
    State(p): P,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (t, e) = match ticket(&p, &id) {
        Ok(x) => x,
        Err((status, msg)) => return image_error(status, msg),
    };
    let size = e.size();
    let context = q.get("context").map(String::as_str).unwrap_or("zero");
    let result: Result<Vec<Value>, Response> = match context {
        "zero" => e
            .block_status(crate::exports::BASE_ALLOCATION, 0, size)
            .map_err(|err| image_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))
            .map(|list| {
                let mut pos = 0;
                list.into_iter()
                    .map(|x| {
                        let zero = x.flags & crate::exports::STATE_ZERO != 0;
                        let v =
                            json!({"start": pos, "length": x.length, "zero": zero, "hole": zero});
                        pos += x.length;
                        v
                    })
                    .collect()
            }),
        "dirty" => {
            let plan = p.inv.read(|doc| {
                let b = t.backup_id.as_ref().and_then(|b| doc.backups.get(b))?;
                let from = b.from_checkpoint_id.as_ref()?;
                let cp = doc.checkpoints.get(from)?;
                let n = cp.disks.get(&t.disk_id)?;
                Some((b.id.clone(), *n))
            });
            match plan {
                None => Err(image_error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "dirty extents are not available for disk {}: not an incremental backup of a disk with a checkpoint",
                        t.disk_id
                    ),
                )),
                Some((bid, n)) => {
                    let disk = match p.hv.store.disk(&t.disk_id) {
                        Ok(d) => d,
                        Err(err) => return image_error(StatusCode::NOT_FOUND, err.to_string()),
                    };
                    disk.changed_since(&backup_snapshot_name(&bid), n)
                        .map_err(|err| image_error(StatusCode::CONFLICT, err.to_string()))
                        .map(|changed| {
                            crate::disk::bitmap::runs(size, 0, size, |b| changed.get(b))
                                .into_iter()
                                .map(|r| json!({"start": r.offset, "length": r.length, "dirty": r.set}))
                                .collect()
                        })
                }
            }
        }
        other => Err(image_error(
            StatusCode::BAD_REQUEST,
            format!("unknown context {other}: use zero or dirty"),
        )),
    };
    match result {
        Ok(list) => axum::Json(Value::Array(list)).into_response(),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 10)));
        assert_eq!(parse_range("bytes=90-100", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
    }
}
