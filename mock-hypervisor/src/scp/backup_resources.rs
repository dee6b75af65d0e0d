//! Backup resources (leases) and the NBD exports opened under them.
//!
//! A backup resource locks a server for a backup (`Backup`) or a restore
//! (`Recovery`) and lives for `remain_time` seconds unless renewed. When it
//! expires the platform drops it and every export opened under it stops
//! serving: a backup that forgot to renew is aborted. Exports emulate
//! sfvddk's `sfdisklib_open` (NBD / NBDSSL transports; `open_base_image`
//! selects the base image disk).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ScpPlatform;
use super::envelope::{
    RESOURCE_EXPIRED, REVERT_MODE_UNSUPPORTED, ScpError, ScpPath, ScpQuery, ScpResult, ok, paged,
    parse_body,
};
use crate::disk::View;
use crate::exports::ExportTarget;
use crate::ids::{new_uuid, unix_now};

/// A backup resource.
#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    /// Identifier.
    pub id: String,
    /// Locked server (optional for a `Recovery` that only writes a base image).
    pub server_id: Option<String>,
    /// `Backup` or `Recovery`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Lifetime granted by the last create/renew, in seconds.
    pub lease_seconds: u64,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    /// Names of the exports opened under it.
    pub exports: Vec<String>,
    #[serde(skip)]
    expires_at: Instant,
}

impl Lease {
    fn view(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            let left = self.expires_at.saturating_duration_since(Instant::now());
            o.insert("remain_time".into(), json!(left.as_secs()));
            o.insert("status".into(), json!("active"));
        }
        v
    }

    fn owner(&self) -> String {
        owner_tag(&self.id)
    }
}

fn owner_tag(id: &str) -> String {
    format!("scp:backup-resource:{id}")
}

/// Active and expired leases.
#[derive(Debug, Default)]
pub struct LeaseTable {
    active: BTreeMap<String, Lease>,
    expired: BTreeSet<String>,
}

impl LeaseTable {
    /// Active leases.
    pub fn active(&self) -> Vec<Lease> {
        self.active.values().cloned().collect()
    }
}

/// Drops leases whose time ran out and stops their exports.
pub fn expire_due(scp: &ScpPlatform) {
    let now = Instant::now();
    let due: Vec<Lease> = {
        let mut t = scp.leases_lock();
        let ids: Vec<String> = t
            .active
            .values()
            .filter(|l| l.expires_at <= now)
            .map(|l| l.id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| {
                t.expired.insert(id.clone());
                t.active.remove(id)
            })
            .collect()
    };
    for l in due {
        tracing::info!(lease = %l.id, "backup resource expired");
        let written = written_base_images(scp, &l.exports);
        scp.hv.exports.remove_owned_by(&l.owner());
        settle_all(scp, &written);
    }
}

/// Base images that writable exports among `names` write.
fn written_base_images(scp: &ScpPlatform, names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| scp.hv.exports.get(n))
        .filter(|e| !e.read_only())
        .filter_map(|e| match e.target() {
            ExportTarget::BaseImage(i) => Some(i.id().to_string()),
            ExportTarget::Disk { .. } => None,
        })
        .collect()
}

/// Settles base images whose writer closed (see [`super::base_images::settle`]).
fn settle_all(scp: &ScpPlatform, ids: &[String]) {
    for id in ids {
        if let Err(e) = super::base_images::settle(scp, id) {
            tracing::warn!(base_image = %id, error = ?e, "settling a restored base image failed");
        }
    }
}

/// Makes a lease expire now (admin fault injection).
pub fn expire_now(scp: &ScpPlatform, id: &str) -> Result<(), ScpError> {
    {
        let mut t = scp.leases_lock();
        let l = t
            .active
            .get_mut(id)
            .ok_or_else(|| ScpError::not_found("backup resource", id))?;
        l.expires_at = Instant::now();
    }
    expire_due(scp);
    Ok(())
}

/// The lease locking a server, if any.
pub fn lease_of_server(scp: &ScpPlatform, server_id: &str) -> Option<String> {
    expire_due(scp);
    scp.leases_lock()
        .active
        .values()
        .find(|l| l.server_id.as_deref() == Some(server_id))
        .map(|l| l.id.clone())
}

fn active_lease(scp: &ScpPlatform, id: &str) -> Result<Lease, ScpError> {
    expire_due(scp);
    let t = scp.leases_lock();
    if let Some(l) = t.active.get(id) {
        return Ok(l.clone());
    }
    if t.expired.contains(id) {
        return Err(ScpError::refused(
            RESOURCE_EXPIRED,
            format!("The backup resource {id} has expired and was released"),
        ));
    }
    Err(ScpError::not_found("backup resource", id))
}

fn default_kind() -> String {
    "Backup".into()
}
fn default_remain() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
struct CreateLease {
    #[serde(default)]
    server_id: Option<String>,
    #[serde(rename = "type", default = "default_kind")]
    kind: String,
    #[serde(default = "default_remain")]
    remain_time: u64,
}

/// `GET /janus/20240725/backup-resources`
pub async fn list(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    expire_due(&scp);
    let items: Vec<Value> = scp.leases_lock().active.values().map(Lease::view).collect();
    paged(&q, items)
}

/// `POST /janus/20240725/backup-resources`
pub async fn create(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let req: CreateLease = parse_body(&body)?;
    if req.kind != "Backup" && req.kind != "Recovery" {
        return Err(ScpError::invalid("type must be Backup or Recovery"));
    }
    if req.remain_time == 0 || req.remain_time > 86_400 {
        return Err(ScpError::invalid("remain_time must be 1..=86400 seconds"));
    }
    match (&req.server_id, req.kind.as_str()) {
        (None, "Backup") => return Err(ScpError::invalid("a Backup resource needs server_id")),
        (Some(sid), kind) => {
            let server = scp.inv.read(|doc| doc.server(sid).cloned())?;
            if kind == "Backup" && server.application == "desk" && server.revert_mode == 1 {
                return Err(ScpError::refused(
                    REVERT_MODE_UNSUPPORTED,
                    "Agentless backup is not supported for desktop VMs in revert mode",
                ));
            }
            if let Some(other) = lease_of_server(&scp, sid) {
                return Err(ScpError::conflict(format!(
                    "server {sid} is already locked by backup resource {other}"
                )));
            }
        }
        (None, _) => {}
    }
    let lease = Lease {
        id: new_uuid(),
        server_id: req.server_id,
        kind: req.kind,
        lease_seconds: req.remain_time,
        created_at: unix_now(),
        exports: Vec::new(),
        expires_at: Instant::now() + Duration::from_secs(req.remain_time),
    };
    let view = lease.view();
    scp.leases_lock().active.insert(lease.id.clone(), lease);
    ok(view)
}

/// `GET /janus/20240725/backup-resources/{resource_id}`
pub async fn get_one(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    ok(active_lease(&scp, &id)?.view())
}

#[derive(Debug, Deserialize)]
struct Renew {
    #[serde(default = "default_remain")]
    remain_time: u64,
}

/// `PUT /janus/20240725/backup-resources/{resource_id}` renews the lease.
pub async fn renew(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: Renew = parse_body(&body)?;
    if req.remain_time == 0 || req.remain_time > 86_400 {
        return Err(ScpError::invalid("remain_time must be 1..=86400 seconds"));
    }
    active_lease(&scp, &id)?;
    let mut t = scp.leases_lock();
    let l = t
        .active
        .get_mut(&id)
        .ok_or_else(|| ScpError::not_found("backup resource", &id))?;
    l.lease_seconds = req.remain_time;
    l.expires_at = Instant::now() + Duration::from_secs(req.remain_time);
    ok(l.view())
}

/// `DELETE /janus/20240725/backup-resources/{resource_id}` releases the
/// lease and closes its exports.
pub async fn release(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    let lease = active_lease(&scp, &id)?;
    scp.leases_lock().active.remove(&id);
    let written = written_base_images(&scp, &lease.exports);
    let closed = scp.hv.exports.remove_owned_by(&lease.owner());
    settle_all(&scp, &written);
    ok(json!({"id": id, "closed_exports": closed.iter().map(|s| &s.name).collect::<Vec<_>>()}))
}

#[derive(Debug, Deserialize)]
struct OpenExport {
    #[serde(default)]
    snapshot_id: Option<String>,
    #[serde(default)]
    server_id: Option<String>,
    #[serde(default)]
    disk_id: Option<String>,
    #[serde(default)]
    base_image_id: Option<String>,
    #[serde(default)]
    open_base_image: u8,
    #[serde(default)]
    transport: Option<String>,
}

/// `POST /janus/20240725/backup-resources/{resource_id}/exports`: opens a
/// disk over NBD (read-only snapshot disks under `Backup`; writable live
/// disks or `CREATING` base images under `Recovery`).
pub async fn open_export(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: OpenExport = parse_body(&body)?;
    let lease = active_lease(&scp, &id)?;
    let transport = req.transport.clone().unwrap_or_else(|| "nbd".into());
    let nbd = scp.hv.nbd_endpoint();
    match transport.as_str() {
        "nbd" if nbd.tls_required => {
            return Err(ScpError::conflict(
                "the NBD server requires TLS: use transport nbdssl",
            ));
        }
        "nbdssl" if !nbd.tls => {
            return Err(ScpError::conflict(
                "NBDSSL is not configured on this platform",
            ));
        }
        "nbd" | "nbdssl" => {}
        other => {
            return Err(ScpError::invalid(format!(
                "transport must be nbd or nbdssl, not {other}"
            )));
        }
    }
    if req.open_base_image > 1 {
        return Err(ScpError::invalid("open_base_image must be 0 or 1"));
    }
    let open_base = req.open_base_image == 1;
    let (target, writable, restore_server) = scp.inv.read(|doc| -> Result<_, ScpError> {
        let store = &scp.hv.store;
        if lease.kind == "Backup" {
            let sid = req
                .snapshot_id
                .as_deref()
                .ok_or_else(|| ScpError::invalid("a Backup export needs snapshot_id"))?;
            let server_id = lease.server_id.as_deref().unwrap_or_default();
            let snap = doc.snapshot(server_id, sid)?;
            let disks: Vec<super::model::ServerDisk> = snap
                .vmconf
                .pointer("/hardware_option/disks")
                .cloned()
                .and_then(|d| serde_json::from_value(d).ok())
                .unwrap_or_default();
            let disk = match &req.disk_id {
                Some(d) => disks.iter().find(|x| &x.id == d),
                None => disks.first(),
            }
            .ok_or_else(|| {
                ScpError::not_found("disk", req.disk_id.as_deref().unwrap_or("system"))
            })?;
            if open_base {
                let b = disk.base_image_id.as_deref().ok_or_else(|| {
                    ScpError::conflict(format!("disk {} has no base image", disk.id))
                })?;
                return Ok((ExportTarget::BaseImage(store.image(b)?), false, None));
            }
            return Ok((
                ExportTarget::Disk {
                    disk: store.disk(&disk.id)?,
                    view: View::Snapshot(sid.to_string()),
                    include_base: true,
                },
                false,
                None,
            ));
        }
        // Recovery.
        if req.snapshot_id.is_some() {
            return Err(ScpError::invalid(
                "a Recovery export writes live disks: no snapshot_id",
            ));
        }
        if let Some(b) = &req.base_image_id {
            doc.base_image(b)?;
            return Err(ScpError::invalid(format!(
                "base image {b} cannot be opened by its id: its data is written through \
                 the restored VM's system disk (server_id, open_base_image=1; sfdisklib_open \
                 with SFDISKLIB_FLAG_OPEN_BASE_IMAGE)"
            )));
        }
        let server_id = req
            .server_id
            .clone()
            .or_else(|| lease.server_id.clone())
            .ok_or_else(|| {
                ScpError::invalid("a Recovery export needs server_id or base_image_id")
            })?;
        if lease.server_id.as_ref().is_some_and(|s| s != &server_id) {
            return Err(ScpError::conflict(format!(
                "backup resource {} does not lock server {server_id}",
                lease.id
            )));
        }
        let server = doc.server(&server_id)?;
        let disk = match &req.disk_id {
            Some(d) => server.disks.iter().find(|x| &x.id == d),
            None => server.system_disk(),
        }
        .ok_or_else(|| ScpError::not_found("disk", req.disk_id.as_deref().unwrap_or("system")))?;
        if open_base {
            let b = disk
                .base_image_id
                .as_deref()
                .ok_or_else(|| ScpError::conflict(format!("disk {} has no base image", disk.id)))?;
            let status = doc.base_image(b)?.status.clone();
            if status != "AVAILABLE" {
                return Err(ScpError::conflict(format!(
                    "base image {b} is {status}: set it AVAILABLE first"
                )));
            }
            let writable = super::base_images::restoring(&scp, b);
            return Ok((ExportTarget::BaseImage(store.image(b)?), writable, None));
        }
        if super::base_images::disk_waits_for_base(&scp, disk) {
            return Err(ScpError::conflict(format!(
                "the base image of disk {} is being restored: write its data first \
                 (open_base_image=1)",
                disk.id
            )));
        }
        Ok((
            ExportTarget::Disk {
                disk: store.disk(&disk.id)?,
                view: View::Live,
                include_base: true,
            },
            true,
            Some(server_id),
        ))
    })?;
    if let Some(server_id) = restore_server {
        // A restore into a server invalidates its CBT.
        scp.expire_cbt(&server_id)?;
    }
    let name = new_uuid();
    let export = scp
        .hv
        .exports
        .add(&name, &lease.owner(), target, writable)?;
    let attached = {
        let mut t = scp.leases_lock();
        match t.active.get_mut(&id) {
            Some(l) => {
                l.exports.push(name.clone());
                true
            }
            None => false,
        }
    };
    if !attached {
        let _ = scp.hv.exports.remove(&name);
        return Err(ScpError::refused(
            RESOURCE_EXPIRED,
            format!("The backup resource {id} has expired"),
        ));
    }
    let tls = transport == "nbdssl";
    let scheme = if tls { "nbds" } else { "nbd" };
    ok(json!({
        "id": name,
        "export_name": name,
        "transport": transport,
        "host": nbd.host,
        "port": nbd.port,
        "tls": tls,
        "uri": format!("{scheme}://{}:{}/{name}", nbd.host, nbd.port),
        "size": export.size(),
        "sector_size": 512,
        "writable": writable,
        "meta_contexts": export.meta_contexts(),
    }))
}

/// `GET /janus/20240725/backup-resources/{resource_id}/exports`
pub async fn list_exports(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    ScpQuery(q): ScpQuery,
) -> ScpResult {
    let lease = active_lease(&scp, &id)?;
    let items: Vec<_> = lease
        .exports
        .iter()
        .filter_map(|n| scp.hv.exports.get(n))
        .map(|e| e.stats())
        .collect();
    paged(&q, items)
}

/// `DELETE /janus/20240725/backup-resources/{resource_id}/exports/{export_id}`
pub async fn close_export(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath((id, export_id)): ScpPath<(String, String)>,
) -> ScpResult {
    let lease = active_lease(&scp, &id)?;
    if !lease.exports.contains(&export_id) {
        return Err(ScpError::not_found("export", &export_id));
    }
    if let Some(l) = scp.leases_lock().active.get_mut(&id) {
        l.exports.retain(|e| e != &export_id);
    }
    let written = written_base_images(&scp, std::slice::from_ref(&export_id));
    let stats = scp.hv.exports.remove(&export_id)?;
    settle_all(&scp, &written);
    ok(stats)
}
