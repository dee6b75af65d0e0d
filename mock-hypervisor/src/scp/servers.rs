//! Servers (VMs): list, get, create, delete, hot-add/hot-remove of disks on a
//! backup proxy (`PUT /janus/20250725/servers/{id}` with `disks`),
//! `recovery-baseimage`, plus tasks, version and storages.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ScpPlatform;
use super::envelope::{ScpError, ScpPath, ScpQuery, ScpResult, ok, paged, parse_body};
use super::model::{Cbt, DiskType, HotAdd, HotAddSource, ScpInventory, Server, ServerDisk};
use crate::disk::transfer::{self, Source, Target};
use crate::disk::{BLOCK_SIZE, View};
use crate::error::Error;
use crate::ids::{new_uuid, unix_now};

/// `GET /janus/20180725/tasks/{task_id}`
pub async fn get_task(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(task_id): ScpPath<String>,
) -> ScpResult {
    match scp.tasks.poll(&task_id) {
        Some(t) => ok(t),
        None => Err(ScpError::not_found("task", &task_id)),
    }
}

/// `GET /janus/20180725/system/version`: `build_version` as the platform
/// reports it (`SCP6.11.3 B-2025-07-25 10:00:00`).
pub async fn get_version(State(scp): State<Arc<ScpPlatform>>) -> ScpResult {
    ok(json!({
        "build_version": super::build_version(&scp.config().version),
        "custom_version": [],
    }))
}

/// `GET /janus/20180725/storages` (paged).
pub async fn list_storages(
    State(scp): State<Arc<ScpPlatform>>,
    ScpQuery(q): ScpQuery,
) -> ScpResult {
    let storages = scp.inv.read(|d| d.storages.clone());
    paged(&q, storages)
}

/// The wire form of a server: the record plus CBT status text and the disks
/// hot-added to it.
pub fn server_view(doc: &ScpInventory, s: &Server) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    let hotadds: Vec<&HotAdd> = doc
        .hotadds
        .values()
        .filter(|h| h.proxy_server_id == s.id)
        .collect();
    if let Some(o) = v.as_object_mut() {
        // CBT expiry is not a field: the platform says it in the answer
        // of the CBT calls ("The VM CBT has expired. Please reset it.").
        o.insert("cbt".into(), json!({"enable": s.cbt.enable}));
        o.insert("sockets".into(), json!(1));
        o.insert("az_id".into(), json!(super::general::AZ_ID));
        if let Some(disks) = o.get_mut("disks").and_then(Value::as_array_mut) {
            for d in disks.iter_mut().filter_map(Value::as_object_mut) {
                let size = d.get("size").and_then(Value::as_u64).unwrap_or(0);
                d.insert("size_mb".into(), json!(size.div_ceil(1 << 20)));
            }
        }
        o.insert("hotadd_disks".into(), json!(hotadds));
        o.insert(
            "is_linked".into(),
            json!(s.disks.iter().any(|d| d.base_image_id.is_some())),
        );
    }
    v
}

/// `GET /janus/20250725/servers` (filters: `name`, `id`, `application`).
pub async fn list_servers(State(scp): State<Arc<ScpPlatform>>, ScpQuery(q): ScpQuery) -> ScpResult {
    let items: Vec<Value> = scp.inv.read(|doc| {
        doc.servers
            .values()
            .filter(|s| q.get("name").is_none_or(|n| &s.name == n))
            .filter(|s| q.get("id").is_none_or(|n| &s.id == n))
            .filter(|s| q.get("application").is_none_or(|n| &s.application == n))
            .map(|s| server_view(doc, s))
            .collect()
    });
    paged(&q, items)
}

/// `GET /janus/20250725/servers/{server_id}`
pub async fn get_server(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    let v = scp
        .inv
        .read(|doc| doc.server(&id).map(|s| server_view(doc, s)))?;
    ok(v)
}

fn default_cpu() -> u32 {
    2
}
fn default_memory() -> u64 {
    2048
}
fn default_os() -> String {
    "linux".into()
}
fn default_true() -> bool {
    true
}

/// Body of `POST /janus/20250725/servers`.
#[derive(Debug, Deserialize)]
pub struct CreateServer {
    /// Name.
    pub name: String,
    /// Storage (default: the first storage).
    #[serde(default)]
    pub storage_id: Option<String>,
    /// `"desk"` for a desktop VM.
    #[serde(default)]
    pub application: String,
    /// 1 for revert mode.
    #[serde(default)]
    pub revert_mode: u8,
    /// vCPUs (`cores`; `cpu` accepted).
    #[serde(default = "default_cpu", rename = "cores", alias = "cpu")]
    pub cpu: u32,
    /// Memory (MiB).
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Guest OS type.
    #[serde(default = "default_os")]
    pub os_type: String,
    /// Disks, the first is the system disk.
    pub disks: Vec<NewDisk>,
    /// CBT enabled at creation (1, default) or not (0).
    #[serde(default)]
    pub cbt_enable: Option<u8>,
}

/// The `description` of a `POST /janus/20250725/servers` body.
#[derive(Debug, Deserialize)]
struct Described {
    #[serde(default)]
    description: String,
}

/// One disk of a new server.
#[derive(Debug, Deserialize)]
pub struct NewDisk {
    /// Size in bytes (multiple of 512).
    pub size: u64,
    /// Base image for the system disk.
    #[serde(default)]
    pub base_image_id: Option<String>,
    /// Linked (default) or full copy of the base image.
    #[serde(default = "default_true")]
    pub linked: bool,
}

/// Validates and creates a server with empty (or base-backed) disks.
pub async fn create_server_record(
    scp: &Arc<ScpPlatform>,
    req: CreateServer,
) -> Result<Server, ScpError> {
    if req.name.trim().is_empty() {
        return Err(ScpError::invalid("name must not be empty"));
    }
    if req.disks.is_empty() {
        return Err(ScpError::invalid("a server needs at least one disk"));
    }
    if req.revert_mode > 1 || req.cbt_enable.is_some_and(|c| c > 1) {
        return Err(ScpError::invalid(
            "revert_mode and cbt_enable must be 0 or 1",
        ));
    }
    let storage_id = match req.storage_id {
        Some(s) => s,
        None => scp
            .inv
            .read(|d| d.storages.first().map(|s| s.id.clone()))
            .ok_or_else(|| ScpError::invalid("no storage"))?,
    };
    scp.inv.read(|doc| -> Result<(), ScpError> {
        if !doc.has_storage(&storage_id) {
            return Err(ScpError::not_found("storage", &storage_id));
        }
        for (i, d) in req.disks.iter().enumerate() {
            if d.size == 0 || !d.size.is_multiple_of(512) {
                return Err(ScpError::invalid(format!(
                    "disks[{i}].size must be a positive multiple of 512"
                )));
            }
            if let Some(b) = &d.base_image_id {
                if i != 0 {
                    return Err(ScpError::invalid(
                        "only the system disk (disks[0]) can use a base image",
                    ));
                }
                let image = doc.base_image(b)?;
                if image.status != "AVAILABLE" {
                    return Err(ScpError::conflict(format!(
                        "base image {b} is not AVAILABLE"
                    )));
                }
                if !image
                    .replicas
                    .iter()
                    .any(|r| r.storage_id == storage_id && r.status == "AVAILABLE")
                {
                    return Err(ScpError::conflict(format!(
                        "base image {b} has no replica on storage {storage_id}: sync one first"
                    )));
                }
                if image.size > d.size {
                    return Err(ScpError::invalid(format!(
                        "disk size {} is smaller than base image {b} ({} bytes)",
                        d.size, image.size
                    )));
                }
            }
        }
        Ok(())
    })?;
    if let Some(b) = req
        .disks
        .iter()
        .find(|d| !d.linked && d.base_image_id.is_some())
        .and_then(|d| d.base_image_id.as_deref())
        .filter(|b| super::base_images::restoring(scp, b))
    {
        return Err(ScpError::conflict(format!(
            "base image {b} has no data yet: a full copy cannot be made of it"
        )));
    }
    let mut disks = Vec::new();
    for (i, d) in req.disks.iter().enumerate() {
        let linked_base = d.base_image_id.as_deref().filter(|_| d.linked);
        // A base image whose data is still being restored (through this
        // VM's system disk, `open_base_image`) is linked once complete.
        let store_base = linked_base.filter(|b| !super::base_images::restoring(scp, b));
        let disk = scp.hv.store.create_disk(d.size, store_base)?;
        if let (Some(b), false) = (&d.base_image_id, d.linked) {
            let image = scp.hv.store.image(b)?;
            let disk2 = disk.clone();
            blocking(move || {
                let map = image.allocated_map();
                for blk in 0..map.blocks() {
                    if map.get(blk) {
                        let off = blk * BLOCK_SIZE;
                        let len = BLOCK_SIZE.min(image.size() - off);
                        disk2.write(off, &image.read(off, len)?)?;
                    }
                }
                Ok(())
            })
            .await?;
        }
        disks.push(ServerDisk {
            id: disk.id().to_string(),
            name: format!("scsi{i}"),
            disk_type: if i == 0 {
                DiskType::System
            } else {
                DiskType::Data
            },
            size: d.size,
            storage_id: storage_id.clone(),
            base_image_id: linked_base.map(str::to_string),
        });
    }
    let server = Server {
        id: new_uuid(),
        name: req.name,
        description: String::new(),
        status: "running".into(),
        application: req.application,
        revert_mode: req.revert_mode,
        storage_id,
        cpu: req.cpu,
        memory_mb: req.memory_mb,
        os_type: req.os_type,
        disks,
        cbt: Cbt {
            enable: req.cbt_enable.unwrap_or(1),
            expired: false,
        },
        created_at: unix_now(),
    };
    let s = server.clone();
    scp.inv.update(|doc| {
        doc.servers.insert(s.id.clone(), s);
        Ok(())
    })?;
    Ok(server)
}

/// `POST /janus/20250725/servers`
pub async fn create_server(State(scp): State<Arc<ScpPlatform>>, body: Bytes) -> ScpResult {
    let req: CreateServer = parse_body(&body)?;
    if let Some(failed) = scp.failed_task("create_server", "") {
        return failed;
    }
    let described: Described = parse_body(&body)?;
    let mut server = create_server_record(&scp, req).await?;
    if !described.description.is_empty() {
        server.description = described.description;
        let s = server.clone();
        scp.inv.update(|doc| {
            doc.servers.insert(s.id.clone(), s);
            Ok(())
        })?;
    }
    let disk_ids: Vec<&str> = server.disks.iter().map(|d| d.id.as_str()).collect();
    scp.task(
        "create_server",
        &server.id,
        json!({"server_id": server.id, "disk_ids": disk_ids}),
    )
}

/// Runs blocking disk work off the async executor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ScpError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ScpError::from),
        Err(e) => Err(ScpError::from(Error::Conflict(format!(
            "worker failed: {e}"
        )))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

/// One entry of `disks` in `PUT /janus/20250725/servers/{id}`.
#[derive(Debug, Deserialize)]
struct DiskOp {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    server_id: Option<String>,
    #[serde(default)]
    snapshot_id: Option<String>,
    #[serde(default)]
    disk_id: Option<String>,
    #[serde(default)]
    base_image_id: Option<String>,
    #[serde(default)]
    open_base_image: u8,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    hotadd_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UpdateServer {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    disks: Option<OneOrMany<DiskOp>>,
}

/// `PUT /janus/20250725/servers/{server_id}`: rename and/or hot-add or
/// hot-remove disks.
pub async fn update_server(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(proxy_id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: UpdateServer = parse_body(&body)?;
    scp.inv.read(|d| d.server(&proxy_id).map(|_| ()))?;
    if let Some(failed) = scp.failed_task("update_server", &proxy_id) {
        return failed;
    }
    if let Some(name) = &req.name {
        if name.trim().is_empty() {
            return Err(ScpError::invalid("name must not be empty"));
        }
        scp.inv.update(|doc| {
            if let Some(s) = doc.servers.get_mut(&proxy_id) {
                s.name = name.clone();
            }
            Ok(())
        })?;
    }
    if let Some(d) = &req.description {
        scp.inv.update(|doc| {
            if let Some(s) = doc.servers.get_mut(&proxy_id) {
                s.description = d.clone();
            }
            Ok(())
        })?;
    }
    let ops = match req.disks {
        None => Vec::new(),
        Some(OneOrMany::One(op)) => vec![op],
        Some(OneOrMany::Many(ops)) => ops,
    };
    let mut attached = Vec::new();
    let mut detached = Vec::new();
    for op in ops {
        match op.action.as_deref().unwrap_or("attach") {
            "attach" | "add" => attached.push(hot_add(&scp, &proxy_id, op).await?),
            "detach" | "remove" => detached.push(hot_remove(&scp, &proxy_id, op).await?),
            other => return Err(ScpError::invalid(format!("unknown disk action {other}"))),
        }
    }
    let attached: Vec<Value> = attached.iter().map(|h| hotadd_answer(&scp, h)).collect();
    scp.task(
        "update_server",
        &proxy_id,
        json!({"hotadd_disks": attached, "removed_hotadd_ids": detached}),
    )
}

enum HotAddTarget {
    Snapshot { disk: String, snapshot: String },
    Live { server: String, disk: String },
    Image { image: String },
}

async fn hot_add(scp: &Arc<ScpPlatform>, proxy_id: &str, op: DiskOp) -> Result<HotAdd, ScpError> {
    let open_base = op.open_base_image == 1;
    let (target, source, writable_default) = scp.inv.read(|doc| -> Result<_, ScpError> {
        if let Some(sid) = &op.snapshot_id {
            let snap = doc
                .snapshots
                .get(sid)
                .ok_or_else(|| ScpError::not_found("snapshot", sid))?;
            let server = doc.server(&snap.server_id)?;
            let disk = match &op.disk_id {
                Some(d) => server.disks.iter().find(|x| &x.id == d),
                None => server.system_disk(),
            }
            .ok_or_else(|| {
                ScpError::not_found("disk", op.disk_id.as_deref().unwrap_or("system"))
            })?;
            let source = HotAddSource {
                server_id: Some(server.id.clone()),
                snapshot_id: Some(sid.clone()),
                disk_id: Some(disk.id.clone()),
                base_image_id: disk.base_image_id.clone().filter(|_| open_base),
                open_base_image: op.open_base_image,
            };
            if open_base {
                let image = disk.base_image_id.clone().ok_or_else(|| {
                    ScpError::conflict(format!("disk {} has no base image", disk.id))
                })?;
                return Ok((HotAddTarget::Image { image }, source, false));
            }
            return Ok((
                HotAddTarget::Snapshot {
                    disk: disk.id.clone(),
                    snapshot: sid.clone(),
                },
                source,
                false,
            ));
        }
        if let Some(b) = &op.base_image_id {
            // Read-only: base image data is written through a restored
            // VM's system disk with `open_base_image` (seed 4.5.2 step 3).
            doc.base_image(b)?;
            let source = HotAddSource {
                server_id: None,
                snapshot_id: None,
                disk_id: None,
                base_image_id: Some(b.clone()),
                open_base_image: 1,
            };
            return Ok((HotAddTarget::Image { image: b.clone() }, source, false));
        }
        let server_id = op.server_id.clone().ok_or_else(|| {
            ScpError::invalid("a disk to attach needs snapshot_id, base_image_id or server_id")
        })?;
        let server = doc.server(&server_id)?;
        let disk = match &op.disk_id {
            Some(d) => server.disks.iter().find(|x| &x.id == d),
            None => server.system_disk(),
        }
        .ok_or_else(|| ScpError::not_found("disk", op.disk_id.as_deref().unwrap_or("system")))?;
        let source = HotAddSource {
            server_id: Some(server_id.clone()),
            snapshot_id: None,
            disk_id: Some(disk.id.clone()),
            base_image_id: disk.base_image_id.clone().filter(|_| open_base),
            open_base_image: op.open_base_image,
        };
        if open_base {
            let image = disk
                .base_image_id
                .clone()
                .ok_or_else(|| ScpError::conflict(format!("disk {} has no base image", disk.id)))?;
            let status = doc.base_image(&image)?.status.clone();
            if status != "AVAILABLE" {
                return Err(ScpError::conflict(format!(
                    "base image {image} is {status}: set it AVAILABLE first"
                )));
            }
            let writable = super::base_images::restoring(scp, &image);
            return Ok((HotAddTarget::Image { image }, source, writable));
        }
        if super::base_images::disk_waits_for_base(scp, disk) {
            return Err(ScpError::conflict(format!(
                "the base image of disk {} is being restored: write its data first \
                 (open_base_image=1)",
                disk.id
            )));
        }
        Ok((
            HotAddTarget::Live {
                server: server_id,
                disk: disk.id.clone(),
            },
            source,
            true,
        ))
    })?;
    let mode = op
        .mode
        .clone()
        .unwrap_or_else(|| if writable_default { "rw" } else { "ro" }.to_string());
    match (mode.as_str(), &target) {
        ("ro", HotAddTarget::Live { .. }) => {
            return Err(ScpError::invalid(
                "a live disk can only be hot-added rw (for restore)",
            ));
        }
        ("rw", HotAddTarget::Snapshot { .. }) => {
            return Err(ScpError::invalid(
                "a snapshot disk can only be hot-added ro",
            ));
        }
        ("rw", HotAddTarget::Image { image }) if !writable_default => {
            return Err(ScpError::conflict(format!(
                "base image {image} is read-only: its data is written only while it is \
                 restored, through a VM's system disk with open_base_image=1"
            )));
        }
        ("ro" | "rw", _) => {}
        (other, _) => {
            return Err(ScpError::invalid(format!(
                "mode must be ro or rw, not {other}"
            )));
        }
    }
    if let HotAddTarget::Live { server, .. } = &target {
        // Writing a server's disk is a restore: its CBT no longer holds.
        scp.expire_cbt(server)?;
    }
    let id = new_uuid();
    let path = scp.hv.hotadd_dir().join(format!("{id}.raw"));
    let store_hv = scp.hv.clone();
    let path2 = path.clone();
    let size = blocking(move || {
        let store = &store_hv.store;
        match &target {
            HotAddTarget::Snapshot { disk, snapshot } => {
                let d = store.disk(disk)?;
                transfer::materialize(Source::Disk(&d, &View::Snapshot(snapshot.clone())), &path2)?;
                Ok(d.size())
            }
            HotAddTarget::Live { disk, .. } => {
                let d = store.disk(disk)?;
                transfer::materialize(Source::Disk(&d, &View::Live), &path2)?;
                Ok(d.size())
            }
            HotAddTarget::Image { image } => {
                let i = store.image(image)?;
                transfer::materialize(Source::Image(&i), &path2)?;
                Ok(i.size())
            }
        }
    })
    .await?;
    let hotadd = scp.inv.update(|doc| {
        let used: Vec<&str> = doc
            .hotadds
            .values()
            .filter(|h| h.proxy_server_id == proxy_id)
            .map(|h| h.device.as_str())
            .collect();
        let device = (b'b'..=b'z')
            .map(|c| format!("/dev/vd{}", c as char))
            .find(|d| !used.contains(&d.as_str()))
            .ok_or_else(|| Error::Conflict(format!("server {proxy_id} has no free disk slot")))?;
        let h = HotAdd {
            id: id.clone(),
            proxy_server_id: proxy_id.to_string(),
            device,
            local_path: path.display().to_string(),
            size,
            mode,
            source,
            serial: id.replace('-', "").chars().take(20).collect(),
        };
        doc.hotadds.insert(id.clone(), h.clone());
        Ok(h)
    })?;
    if let Some(dir) = by_id_dir(scp) {
        let link = dir.join(format!("virtio-{}", hotadd.serial));
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::os::unix::fs::symlink(&path, &link))
            .map_err(Error::io(&link))?;
    }
    Ok(hotadd)
}

fn by_id_dir(scp: &ScpPlatform) -> Option<std::path::PathBuf> {
    scp.config().disk_by_id_dir.clone()
}

/// A hot-add as the platform answers it: with `disk_by_id_dir` the proxy
/// finds the disk by its serial, not by a path the platform hands out.
fn hotadd_answer(scp: &ScpPlatform, h: &HotAdd) -> Value {
    let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
    if by_id_dir(scp).is_some()
        && let Some(o) = v.as_object_mut()
    {
        o.remove("local_path");
    }
    v
}

async fn hot_remove(
    scp: &Arc<ScpPlatform>,
    proxy_id: &str,
    op: DiskOp,
) -> Result<String, ScpError> {
    let id = op
        .hotadd_id
        .or(op.disk_id)
        .ok_or_else(|| ScpError::invalid("detach needs hotadd_id"))?;
    let h = scp.inv.read(|doc| {
        doc.hotadds
            .get(&id)
            .filter(|h| h.proxy_server_id == proxy_id)
            .cloned()
            .ok_or_else(|| ScpError::not_found("hot-added disk", &id))
    })?;
    let hv = scp.hv.clone();
    let h2 = h.clone();
    blocking(move || {
        let path = std::path::PathBuf::from(&h2.local_path);
        if h2.mode == "rw" {
            if let Some(b) = h2
                .source
                .base_image_id
                .as_ref()
                .filter(|_| h2.source.open_base_image == 1)
            {
                // The target may be gone (deleted meanwhile): drop the file.
                if let Ok(image) = hv.store.image(b) {
                    transfer::import(&path, Target::Image(&image))?;
                }
            } else if let Some(Ok(disk)) = h2.source.disk_id.as_ref().map(|d| hv.store.disk(d)) {
                transfer::import(&path, Target::Disk(&disk))?;
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path)(e)),
        }
    })
    .await?;
    if let Some(dir) = by_id_dir(scp) {
        let _ = std::fs::remove_file(dir.join(format!("virtio-{}", h.serial)));
    }
    scp.inv.update(|doc| {
        doc.hotadds.remove(&id);
        Ok(())
    })?;
    if h.mode == "rw"
        && h.source.open_base_image == 1
        && let Some(b) = &h.source.base_image_id
    {
        super::base_images::settle(scp, b)?;
    }
    Ok(id)
}

/// `DELETE /janus/20250725/servers/{server_id}`: deletes the server, its
/// snapshots and disks; disks hot-added to it are dropped (not written back).
pub async fn delete_server(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
) -> ScpResult {
    scp.inv.read(|d| d.server(&id).map(|_| ()))?;
    if let Some(failed) = scp.failed_task("delete_server", &id) {
        return failed;
    }
    if let Some(lease) = super::backup_resources::lease_of_server(&scp, &id) {
        return Err(ScpError::conflict(format!(
            "server {id} is locked by backup resource {lease}"
        )));
    }
    let (server, hotadds) = scp.inv.update(|doc| {
        let server = doc
            .servers
            .remove(&id)
            .ok_or_else(|| Error::not_found("server", &id))?;
        doc.snapshots.retain(|_, s| s.server_id != id);
        doc.bindings.retain(|_, b| b.resource_id != id);
        let hotadds: Vec<HotAdd> = doc
            .hotadds
            .values()
            .filter(|h| h.proxy_server_id == id)
            .cloned()
            .collect();
        doc.hotadds.retain(|_, h| h.proxy_server_id != id);
        Ok((server, hotadds))
    })?;
    for h in hotadds {
        let _ = std::fs::remove_file(&h.local_path);
    }
    for d in &server.disks {
        scp.hv.store.delete_disk(&d.id)?;
    }
    scp.task("delete_server", &id, json!({"server_id": id}))
}

#[derive(Debug, Deserialize)]
struct RecoveryBaseImage {
    #[serde(default)]
    base_image_id: Option<String>,
}

/// `POST /janus/20240725/servers/{server_id}/recovery-baseimage`: erases the
/// system disk's own data so the VM sees its base image again (overwrite
/// restore of a linked VM); optionally relinks it to another base image.
pub async fn recovery_base_image(
    State(scp): State<Arc<ScpPlatform>>,
    ScpPath(id): ScpPath<String>,
    body: Bytes,
) -> ScpResult {
    let req: RecoveryBaseImage = parse_body(&body)?;
    if let Some(failed) = scp.failed_task("recovery_baseimage", &id) {
        return failed;
    }
    let (disk_id, base) = scp.inv.read(|doc| -> Result<_, ScpError> {
        let server = doc.server(&id)?;
        let disk = server
            .system_disk()
            .filter(|d| d.base_image_id.is_some())
            .ok_or_else(|| ScpError::conflict(format!("server {id} is not a linked VM")))?;
        if let Some(b) = &req.base_image_id {
            let image = doc.base_image(b)?;
            if image.status != "AVAILABLE" {
                return Err(ScpError::conflict(format!(
                    "base image {b} is not AVAILABLE"
                )));
            }
        }
        Ok((disk.id.clone(), req.base_image_id.clone()))
    })?;
    let hv = scp.hv.clone();
    let d2 = disk_id.clone();
    let b2 = base.clone();
    // A base image whose data is still being restored is linked once
    // complete (`base_images::settle`); meanwhile the own data is erased.
    let b2 = b2.filter(|b| !super::base_images::restoring(&scp, b));
    blocking(move || {
        let disk = hv.store.disk(&d2)?;
        let new_base = b2.map(|b| hv.store.image(&b)).transpose()?;
        disk.reset_to_base(new_base)
    })
    .await?;
    if let Some(b) = &base {
        scp.inv.update(|doc| {
            if let Some(d) = doc
                .servers
                .get_mut(&id)
                .and_then(|s| s.disks.iter_mut().find(|d| d.id == disk_id))
            {
                d.base_image_id = Some(b.clone());
            }
            Ok(())
        })?;
    }
    scp.expire_cbt(&id)?;
    scp.task("recovery_baseimage", &id, json!({"server_id": id}))
}
