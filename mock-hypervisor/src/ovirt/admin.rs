//! oVirt admin extensions under `/admin/ovirt`: create VMs (and backup
//! appliances) with guest data, invalidate checkpoints, arm oVirt faults,
//! change the engine version, list oVirt objects for leak checks.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{AttachRequest, NewDisk, attach_disk, create_disk_record, disk_view};
use super::model::Vm;
use super::{OvirtFaults, OvirtPlatform};
use crate::admin::{AdminError, AdminResult, Fill, FillTarget, parse, run_blocking, write_fill};
use crate::ids::{new_uuid, unix_now};

/// Router nested at `/admin/ovirt`.
pub fn router(p: Arc<OvirtPlatform>) -> Router {
    Router::new()
        .route("/vms", post(create_vm))
        .route("/vms/{vm}/checkpoints/invalidate", post(invalidate))
        .route(
            "/faults",
            get(list_faults).post(add_faults).delete(clear_faults),
        )
        .route("/version", put(set_version))
        .route("/objects", get(list_objects))
        .with_state(p)
}

/// Every oVirt object a backup or restore could leave behind. The keys
/// `snapshots`, `backup_attachments`, `appliance_files`, `active_backups`,
/// `active_transfers` and `exports` must be empty after a clean run.
pub fn objects(p: &OvirtPlatform) -> Value {
    let mut files: Vec<String> = Vec::new();
    if let Ok(dirs) = std::fs::read_dir(p.appliance_dir()) {
        for d in dirs.flatten() {
            if let Ok(entries) = std::fs::read_dir(d.path()) {
                files.extend(entries.flatten().map(|e| e.path().display().to_string()));
            }
        }
    }
    p.inv.read(|doc| {
        json!({
            "vms": doc.vms.values().map(|v| {
                // The VM's own disks (not snapshot attachments), in
                // attachment order.
                let mut own: Vec<_> = doc
                    .attachments
                    .values()
                    .filter(|a| a.vm_id == v.id && a.snapshot_id.is_none())
                    .collect();
                own.sort_by_key(|a| a.seq);
                let disks: Vec<Value> = own
                    .iter()
                    .filter_map(|a| doc.disks.get(&a.disk_id))
                    .map(|d| json!({"id": d.id, "size": d.provisioned_size}))
                    .collect();
                json!({"id": v.id, "name": v.name, "appliance": v.appliance, "disks": disks})
            }).collect::<Vec<_>>(),
            "disks": doc.disks.values().map(|d| json!({"id": d.id, "alias": d.alias, "format": d.format, "size": d.provisioned_size})).collect::<Vec<_>>(),
            "snapshots": doc.snapshots.values().map(|s| json!({"id": s.id, "vm_id": s.vm_id, "description": s.description, "status": s.status})).collect::<Vec<_>>(),
            "backup_attachments": doc.attachments.values().filter(|a| a.snapshot_id.is_some() || a.local_path.is_some()).collect::<Vec<_>>(),
            "appliance_files": files,
            "active_backups": doc.backups.values().filter(|b| !super::api::backup_done(&b.phase)).collect::<Vec<_>>(),
            "backups": doc.backups.values().map(|b| json!({"id": b.id, "vm_id": b.vm_id, "phase": b.phase})).collect::<Vec<_>>(),
            "active_transfers": doc.transfers.values().filter(|t| !super::backups::transfer_done(&t.phase)).collect::<Vec<_>>(),
            "checkpoints": doc.checkpoints.values().filter(|c| c.state != "pending").collect::<Vec<_>>(),
            "exports": p.hv.exports.active_stats().into_iter().filter(|e| e.owner.starts_with("ovirt:")).collect::<Vec<_>>(),
        })
    })
}

#[derive(Debug, Deserialize)]
struct AdminDisk {
    size: u64,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default = "cow")]
    format: String,
    #[serde(default = "yes")]
    sparse: bool,
    #[serde(default)]
    backup: Option<String>,
    #[serde(default = "virtio")]
    interface: String,
    #[serde(default)]
    bootable: Option<bool>,
    #[serde(default)]
    fill: Vec<Fill>,
}

fn cow() -> String {
    "cow".into()
}
fn yes() -> bool {
    true
}
fn virtio() -> String {
    "virtio".into()
}

/// What `POST /admin/ovirt/vms` takes.
#[derive(Debug, Deserialize)]
pub struct AdminVm {
    name: String,
    #[serde(default)]
    appliance: bool,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    cpu_cores: Option<u32>,
    #[serde(default)]
    disks: Vec<AdminDisk>,
}

/// Creates a VM with disks (cow disks default to `backup: incremental`)
/// and writes their fills; returns the VM and its disks.
pub async fn create_vm_record(p: &Arc<OvirtPlatform>, req: AdminVm) -> Result<Value, AdminError> {
    let vm = Vm {
        id: new_uuid(),
        name: req.name.clone(),
        status: req.status.unwrap_or_else(|| "up".into()),
        memory: req.memory_mb.unwrap_or(2048) << 20,
        cpu_cores: req.cpu_cores.unwrap_or(2),
        cluster: "Default".into(),
        // Set once its own disks are attached (they are not materialised).
        appliance: false,
        ovf: None,
        creation_time: unix_now(),
        nics: Vec::new(),
    };
    p.inv.update(|doc| {
        if doc.vms.values().any(|v| v.name == vm.name) {
            return Err(crate::error::Error::Conflict(format!(
                "a VM named {} exists",
                vm.name
            )));
        }
        doc.vms.insert(vm.id.clone(), vm.clone());
        Ok(())
    })?;
    let mut disks = Vec::new();
    for (i, d) in req.disks.into_iter().enumerate() {
        crate::disk::check_size(d.size)?;
        let backup = d.backup.clone().unwrap_or_else(|| {
            if d.format == "cow" {
                "incremental".into()
            } else {
                "none".into()
            }
        });
        let pp = p.clone();
        let alias = d
            .alias
            .clone()
            .unwrap_or_else(|| format!("{}_Disk{}", req.name, i + 1));
        let (fmt, sparse, size) = (d.format.clone(), d.sparse, d.size);
        let rec = run_blocking(move || {
            create_disk_record(
                &pp,
                NewDisk {
                    alias,
                    size,
                    format: fmt,
                    sparse,
                    backup,
                },
            )
        })
        .await?;
        attach_disk(
            p,
            AttachRequest {
                vm_id: vm.id.clone(),
                disk_id: rec.id.clone(),
                snapshot_id: None,
                bootable: d.bootable.unwrap_or(i == 0),
                interface: d.interface.clone(),
                active: true,
                read_only: false,
            },
        )
        .await
        .map_err(|f| AdminError(f.status, f.detail))?;
        let vd = p.hv.store.disk(&rec.id)?;
        let fills = d.fill;
        run_blocking(move || {
            fills
                .iter()
                .try_for_each(|f| write_fill(FillTarget::Disk(&vd), f))
        })
        .await?;
        disks.push(disk_view(p, &rec));
    }
    if req.appliance {
        p.inv.update(|doc| {
            if let Some(v) = doc.vms.get_mut(&vm.id) {
                v.appliance = true;
            }
            Ok(())
        })?;
    }
    Ok(json!({"id": vm.id, "name": vm.name, "appliance": req.appliance, "disks": disks}))
}

async fn create_vm(State(p): State<Arc<OvirtPlatform>>, body: Bytes) -> AdminResult {
    let req: AdminVm = parse(&body)?;
    Ok(Json(create_vm_record(&p, req).await?))
}

async fn invalidate(State(p): State<Arc<OvirtPlatform>>, Path(vm): Path<String>) -> AdminResult {
    let p2 = p.clone();
    let vm2 = vm.clone();
    let n = run_blocking(move || super::backups::invalidate_checkpoints(&p2, &vm2)).await?;
    Ok(Json(json!({"vm_id": vm, "invalidated": n})))
}

async fn list_faults(State(p): State<Arc<OvirtPlatform>>) -> AdminResult {
    Ok(Json(serde_json::to_value(p.faults()).unwrap_or_default()))
}

async fn add_faults(State(p): State<Arc<OvirtPlatform>>, body: Bytes) -> AdminResult {
    let f: OvirtFaults = parse(&body)?;
    p.add_faults(f);
    Ok(Json(serde_json::to_value(p.faults()).unwrap_or_default()))
}

async fn clear_faults(State(p): State<Arc<OvirtPlatform>>) -> AdminResult {
    p.clear_faults();
    Ok(Json(json!({})))
}

#[derive(Debug, Deserialize)]
struct Version {
    version: String,
}

async fn set_version(State(p): State<Arc<OvirtPlatform>>, body: Bytes) -> AdminResult {
    let v: Version = parse(&body)?;
    if super::parse_version(&v.version).iter().all(|n| *n == 0) {
        return Err(AdminError(
            StatusCode::BAD_REQUEST,
            "version must look like 4.5.5".into(),
        ));
    }
    p.set_version(&v.version);
    Ok(Json(json!({"version": v.version})))
}

async fn list_objects(State(p): State<Arc<OvirtPlatform>>) -> AdminResult {
    Ok(Json(objects(&p)))
}
