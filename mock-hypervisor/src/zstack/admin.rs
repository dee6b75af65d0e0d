//! ZStack admin extensions under `/admin/zstack`: create images and VMs
//! with guest data, guest writes and digests of volumes, object listing
//! for leak checks, faults, the `image.num` quota, backup storage status.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{VmSpec, create_vm_record};
use super::model::{BsRef, Image, InstanceOffering, L3Network, Volume, zs_uuid};
use super::{ZStackPlatform, ZsError, ZsFault, transfer};
use crate::admin::{AdminError, AdminResult, Fill, FillTarget, parse, run_blocking, write_fill};
use crate::disk::View;
use crate::ids::unix_now;

type Zs = State<Arc<ZStackPlatform>>;

impl From<ZsError> for AdminError {
    fn from(e: ZsError) -> Self {
        AdminError(e.status, format!("{}: {}", e.description, e.details))
    }
}

/// Router nested at `/admin/zstack`.
pub fn router(zs: Arc<ZStackPlatform>) -> Router {
    Router::new()
        .route("/images", post(create_image))
        .route("/images/{uuid}/sha256", get(image_sha256))
        .route("/vms", post(create_vm))
        .route("/instance-offerings", post(create_offering))
        .route(
            "/instance-offerings/{uuid}",
            axum::routing::delete(delete_offering),
        )
        .route("/l3-networks", post(create_l3))
        .route("/l3-networks/{uuid}", axum::routing::delete(delete_l3))
        .route("/vms/{uuid}", axum::routing::delete(delete_vm))
        .route("/volumes/{uuid}/write", post(write_volume))
        .route("/volumes/{uuid}/sha256", get(volume_sha256))
        .route(
            "/volumes/{uuid}/data",
            get(read_volume_data).put(write_volume_data),
        )
        .route("/volumes/{uuid}/resize", post(resize_volume))
        .route("/volumes/{uuid}/status", put(set_volume_status))
        .route("/objects", get(list_objects))
        .route("/faults", post(add_fault).delete(clear_faults))
        .route("/quota", put(set_quota))
        .route("/backup-storage/{uuid}/status", put(set_bs_status))
        .with_state(zs)
}

/// Every ZStack object a backup or restore could leave behind.
pub fn objects(zs: &ZStackPlatform) -> Value {
    let running = zs.running_jobs();
    zs.inv.read(|d| {
        json!({
            "vms": d.vms.values().map(|v| {
                // The VM's volumes as disks (store disk ids), root first.
                let mut vols: Vec<_> = d
                    .volumes
                    .values()
                    .filter(|vol| vol.vm_instance_uuid.as_deref() == Some(v.uuid.as_str()))
                    .collect();
                vols.sort_by_key(|vol| (vol.kind != "Root", vol.device_id));
                let disks: Vec<Value> = vols
                    .iter()
                    .map(|vol| json!({"id": vol.disk_id, "size": vol.size, "volume_uuid": vol.uuid}))
                    .collect();
                json!({"uuid": v.uuid, "id": v.uuid, "name": v.name, "state": v.state, "disks": disks})
            }).collect::<Vec<_>>(),
            "volumes": d.volumes.values().map(|v| json!({"uuid": v.uuid, "name": v.name, "type": v.kind,
                "vmInstanceUuid": v.vm_instance_uuid, "rootImageUuid": v.root_image_uuid, "diskId": v.disk_id,
                "deviceId": v.device_id, "size": v.size, "description": v.description, "status": v.status})).collect::<Vec<_>>(),
            "images": d.images.values().map(|i| json!({"uuid": i.uuid, "name": i.name, "status": i.status,
                "state": i.state, "url": i.url, "mediaType": i.media_type, "md5Sum": i.md5_sum})).collect::<Vec<_>>(),
            "temporary_images": d.images.values().filter(|i| i.from_volume()).map(|i| json!({"uuid": i.uuid, "name": i.name, "status": i.status})).collect::<Vec<_>>(),
            "exports": d.exports.values().collect::<Vec<_>>(),
            "snapshots": d.snapshots.values().collect::<Vec<_>>(),
            "snapshot_groups": d.snapshot_groups.values().collect::<Vec<_>>(),
            "snapshot_creates": d.snapshot_creates,
            "snapshot_group_creates": d.snapshot_group_creates,
            "snapshot_group_deletes": d.snapshot_group_deletes,
            "image_cache": d.image_cache,
            "running_jobs": running,
            "private_images": d.private_images(),
            "image_quota": d.image_quota,
            "instance_offerings": d.instance_offerings.values().map(|o| o.inventory()).collect::<Vec<_>>(),
            "l3_networks": d.l3_networks.values().map(|n| n.inventory()).collect::<Vec<_>>(),
        })
    })
}

async fn list_objects(State(zs): Zs) -> AdminResult {
    Ok(Json(objects(&zs)))
}

#[derive(Debug, Deserialize)]
struct NewImage {
    name: String,
    size: u64,
    #[serde(default)]
    fill: Vec<Fill>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    backup_storage_uuids: Vec<String>,
}

/// Creates a `Ready` image with data on the given (default: every) backup
/// storage.
pub async fn create_image_record(
    zs: &Arc<ZStackPlatform>,
    req: NewImageReq,
) -> Result<Value, AdminError> {
    crate::disk::check_size(req.size)?;
    let hv = zs.hv.clone();
    let fills = req.fill.clone();
    let size = req.size;
    let (data_id, md5) = run_blocking(move || {
        let image = hv.store.create_image(size)?;
        for f in &fills {
            write_fill(FillTarget::Image(&image), f)?;
        }
        image.seal()?;
        let md5 = transfer::image_md5(&image)?;
        Ok((image.id().to_string(), md5))
    })
    .await?;
    let uuid = zs_uuid();
    let inv = zs.inv.update(|doc| {
        let bss: Vec<String> = if req.backup_storage_uuids.is_empty() {
            doc.backup_storages.iter().map(|b| b.uuid.clone()).collect()
        } else {
            req.backup_storage_uuids.clone()
        };
        let img = Image {
            uuid: uuid.clone(),
            name: req.name.clone(),
            description: String::new(),
            state: "Enabled".into(),
            status: "Ready".into(),
            size,
            actual_size: size,
            url: format!("http://images.example/{}.raw", req.name),
            media_type: req
                .media_type
                .clone()
                .unwrap_or_else(|| "RootVolumeTemplate".into()),
            guest_os_type: String::new(),
            platform: req.platform.clone().unwrap_or_else(|| "Linux".into()),
            system: false,
            format: "raw".into(),
            md5_sum: md5.clone(),
            backup_storage_refs: bss
                .iter()
                .map(|b| BsRef {
                    backup_storage_uuid: b.clone(),
                    install_path: format!("zstore://{b}/{uuid}"),
                    created: unix_now(),
                })
                .collect(),
            deleted_refs: Vec::new(),
            data_id: data_id.clone(),
            created: unix_now(),
        };
        let inv = img.inventory();
        doc.images.insert(uuid.clone(), img);
        Ok(inv)
    })?;
    Ok(inv)
}

/// Parameters of [`create_image_record`].
#[derive(Debug, Clone)]
pub struct NewImageReq {
    /// Name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Data.
    pub fill: Vec<Fill>,
    /// Media type (default `RootVolumeTemplate`).
    pub media_type: Option<String>,
    /// Platform (default `Linux`).
    pub platform: Option<String>,
    /// Backup storages (default: all).
    pub backup_storage_uuids: Vec<String>,
}

async fn create_image(State(zs): Zs, body: Bytes) -> AdminResult {
    let r: NewImage = parse(&body)?;
    let inv = create_image_record(
        &zs,
        NewImageReq {
            name: r.name,
            size: r.size,
            fill: r.fill,
            media_type: r.media_type,
            platform: r.platform,
            backup_storage_uuids: r.backup_storage_uuids,
        },
    )
    .await?;
    Ok(Json(inv))
}

#[derive(Debug, Clone, Deserialize)]
struct NewDataVolume {
    size: u64,
    #[serde(default)]
    fill: Vec<Fill>,
}

#[derive(Debug, Deserialize)]
struct NewVm {
    name: String,
    image_uuid: String,
    #[serde(default)]
    root_fill: Vec<Fill>,
    /// Instance offering (default: the first one).
    #[serde(default)]
    instance_offering_uuid: Option<String>,
    /// CPUs and memory instead of an offering.
    #[serde(default)]
    cpu_num: Option<u32>,
    #[serde(default)]
    memory_size: Option<u64>,
    /// L3 networks (default: the first one).
    #[serde(default)]
    l3_network_uuids: Vec<String>,
    #[serde(default)]
    data: Vec<NewDataVolume>,
}

/// Creates a VM: root volume thin-cloned from the cached image, guest
/// writes on it, and empty data volumes with their own data.
pub async fn create_vm_admin(
    zs: &Arc<ZStackPlatform>,
    name: &str,
    image_uuid: &str,
    root_fill: Vec<Fill>,
    data: Vec<(u64, Vec<Fill>)>,
    spec: Option<VmSpec>,
) -> Result<Value, AdminError> {
    let inv = create_vm_record(zs, name, image_uuid, None, spec)?;
    let vm_uuid = inv["inventory"]["uuid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let root_disk = zs.inv.read(|d| {
        d.vms
            .get(&vm_uuid)
            .and_then(|v| d.volumes.get(&v.root_volume_uuid))
            .map(|v| v.disk_id.clone())
    });
    let hv = zs.hv.clone();
    if let Some(disk_id) = root_disk {
        run_blocking(move || {
            let disk = hv.store.disk(&disk_id)?;
            for f in &root_fill {
                write_fill(FillTarget::Disk(&disk), f)?;
            }
            Ok(())
        })
        .await?;
    }
    for (i, (size, fills)) in data.into_iter().enumerate() {
        crate::disk::check_size(size)?;
        let disk = zs.hv.store.create_disk(size, None)?;
        let disk2 = disk.clone();
        run_blocking(move || {
            for f in &fills {
                write_fill(FillTarget::Disk(&disk2), f)?;
            }
            Ok(())
        })
        .await?;
        zs.inv.update(|doc| {
            let uuid = zs_uuid();
            doc.volumes.insert(
                uuid.clone(),
                Volume {
                    uuid,
                    name: format!("DATA-{}-for-{name}", i + 1),
                    kind: "Data".into(),
                    vm_instance_uuid: Some(vm_uuid.clone()),
                    root_image_uuid: None,
                    device_id: i as u32 + 1,
                    size,
                    disk_id: disk.id().to_string(),
                    created: unix_now(),
                    description: String::new(),
                    status: "Ready".into(),
                },
            );
            Ok(())
        })?;
    }
    Ok(zs.inv.read(|d| {
        d.vms
            .get(&vm_uuid)
            .map(|v| d.vm_inventory(v))
            .unwrap_or(Value::Null)
    }))
}

async fn create_vm(State(zs): Zs, body: Bytes) -> AdminResult {
    let r: NewVm = parse(&body)?;
    let data = r.data.into_iter().map(|d| (d.size, d.fill)).collect();
    let custom = r.instance_offering_uuid.is_some()
        || r.cpu_num.is_some()
        || r.memory_size.is_some()
        || !r.l3_network_uuids.is_empty();
    let spec = custom.then(|| {
        let mut l3 = r.l3_network_uuids;
        if l3.is_empty() {
            l3 = zs
                .inv
                .read(|d| d.l3_networks.keys().take(1).cloned().collect());
        }
        VmSpec {
            instance_offering_uuid: r.instance_offering_uuid,
            cpu_num: r.cpu_num,
            memory_size: r.memory_size,
            l3_network_uuids: l3,
        }
    });
    Ok(Json(
        create_vm_admin(&zs, &r.name, &r.image_uuid, r.root_fill, data, spec).await?,
    ))
}

#[derive(Debug, Deserialize)]
struct NewOffering {
    name: String,
    cpu_num: u32,
    memory_size: u64,
}

/// `POST /admin/zstack/instance-offerings`.
async fn create_offering(State(zs): Zs, body: Bytes) -> AdminResult {
    let r: NewOffering = parse(&body)?;
    let o = InstanceOffering {
        uuid: zs_uuid(),
        name: r.name,
        cpu_num: r.cpu_num,
        memory_size: r.memory_size,
    };
    let inv = o.inventory();
    zs.inv.update(|d| {
        d.instance_offerings.insert(o.uuid.clone(), o);
        Ok(())
    })?;
    Ok(Json(inv))
}

/// `DELETE /admin/zstack/instance-offerings/{uuid}` (VMs keep their
/// CPU and memory).
async fn delete_offering(State(zs): Zs, Path(uuid): Path<String>) -> AdminResult {
    zs.inv.update(|d| {
        d.instance_offerings
            .remove(&uuid)
            .map(|_| ())
            .ok_or_else(|| crate::error::Error::not_found("instance offering", uuid.clone()))
    })?;
    Ok(Json(json!({"uuid": uuid})))
}

#[derive(Debug, Deserialize)]
struct NewL3 {
    name: String,
}

/// `POST /admin/zstack/l3-networks`.
async fn create_l3(State(zs): Zs, body: Bytes) -> AdminResult {
    let r: NewL3 = parse(&body)?;
    let n = L3Network {
        uuid: zs_uuid(),
        name: r.name,
    };
    let inv = n.inventory();
    zs.inv.update(|d| {
        d.l3_networks.insert(n.uuid.clone(), n);
        Ok(())
    })?;
    Ok(Json(inv))
}

/// `DELETE /admin/zstack/l3-networks/{uuid}`.
async fn delete_l3(State(zs): Zs, Path(uuid): Path<String>) -> AdminResult {
    zs.inv.update(|d| {
        d.l3_networks
            .remove(&uuid)
            .map(|_| ())
            .ok_or_else(|| crate::error::Error::not_found("L3 network", uuid.clone()))
    })?;
    Ok(Json(json!({"uuid": uuid})))
}

/// `DELETE /admin/zstack/vms/{uuid}`: the operator destroys and expunges
/// a VM with its volumes.
async fn delete_vm(State(zs): Zs, Path(uuid): Path<String>) -> AdminResult {
    let disks = zs.inv.update(|d| {
        if d.vms.remove(&uuid).is_none() {
            return Err(crate::error::Error::not_found("VM", uuid.clone()));
        }
        let vols: Vec<String> = d
            .volumes
            .values()
            .filter(|v| v.vm_instance_uuid.as_deref() == Some(uuid.as_str()))
            .map(|v| v.uuid.clone())
            .collect();
        let mut disks = Vec::new();
        for v in vols {
            if let Some(v) = d.volumes.remove(&v) {
                d.snapshots.retain(|_, s| s.volume_uuid != v.uuid);
                disks.push(v.disk_id);
            }
        }
        Ok(disks)
    })?;
    for d in disks {
        let _ = zs.hv.store.delete_disk(&d);
    }
    Ok(Json(json!({"uuid": uuid})))
}

fn volume_disk(zs: &ZStackPlatform, uuid: &str) -> Result<String, AdminError> {
    zs.inv
        .read(|d| d.volumes.get(uuid).map(|v| v.disk_id.clone()))
        .ok_or_else(|| AdminError(StatusCode::NOT_FOUND, format!("volume {uuid} not found")))
}

async fn write_volume(State(zs): Zs, Path(uuid): Path<String>, body: Bytes) -> AdminResult {
    let fill: Fill = parse(&body)?;
    let disk = zs.hv.store.disk(&volume_disk(&zs, &uuid)?)?;
    let f2 = fill.clone();
    run_blocking(move || write_fill(FillTarget::Disk(&disk), &f2)).await?;
    Ok(Json(
        json!({"volume_uuid": uuid, "offset": fill.offset, "length": fill.length}),
    ))
}

#[derive(Debug, Deserialize)]
struct OffsetQuery {
    #[serde(default)]
    offset: u64,
}

/// `GET /admin/zstack/volumes/{uuid}/data`: the live content of a volume
/// (raw bytes; test-size volumes only).
async fn read_volume_data(
    State(zs): Zs,
    Path(uuid): Path<String>,
) -> Result<axum::response::Response, AdminError> {
    use axum::response::IntoResponse;
    let disk = zs.hv.store.disk(&volume_disk(&zs, &uuid)?)?;
    let size = disk.size();
    crate::disk::check_size(size)?;
    let data = run_blocking(move || disk.read(&View::Live, 0, size)).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        data,
    )
        .into_response())
}

/// `PUT /admin/zstack/volumes/{uuid}/data?offset=N`: the guest writes the
/// body at `offset`.
async fn write_volume_data(
    State(zs): Zs,
    Path(uuid): Path<String>,
    Query(q): Query<OffsetQuery>,
    body: Bytes,
) -> AdminResult {
    let disk = zs.hv.store.disk(&volume_disk(&zs, &uuid)?)?;
    let len = body.len() as u64;
    if q.offset
        .checked_add(len)
        .is_none_or(|end| end > disk.size())
    {
        return Err(AdminError(
            StatusCode::BAD_REQUEST,
            format!(
                "write of {len} bytes at {} beyond the volume's {} bytes",
                q.offset,
                disk.size()
            ),
        ));
    }
    let offset = q.offset;
    run_blocking(move || disk.write(offset, &body)).await?;
    Ok(Json(
        json!({"volume_uuid": uuid, "offset": offset, "length": len}),
    ))
}

#[derive(Debug, Deserialize)]
struct Resize {
    size: u64,
}

/// `POST /admin/zstack/volumes/{uuid}/resize {"size": n}`: the operator
/// grows a volume (ZStack's ResizeRootVolume / ResizeDataVolume) in place
/// ([`crate::disk::VirtualDisk::resize`]): same disk, still linked to its
/// base image, change tracking kept; the new tail reads as zeroes. Refused
/// while the volume has snapshots (a revert to one would shrink it) or for
/// a smaller size.
async fn resize_volume(State(zs): Zs, Path(uuid): Path<String>, body: Bytes) -> AdminResult {
    let r: Resize = parse(&body)?;
    crate::disk::check_size(r.size)?;
    let disk = zs.hv.store.disk(&volume_disk(&zs, &uuid)?)?;
    if r.size < disk.size() {
        return Err(AdminError(
            StatusCode::BAD_REQUEST,
            format!(
                "volume {uuid} has {} bytes: it cannot shrink to {}",
                disk.size(),
                r.size
            ),
        ));
    }
    if !disk.snapshot_ids().is_empty() {
        return Err(AdminError(
            StatusCode::CONFLICT,
            format!("volume {uuid} has snapshots: resize refused"),
        ));
    }
    let size = r.size;
    run_blocking(move || disk.resize(size)).await?;
    zs.inv.update(|d| {
        if let Some(v) = d.volumes.get_mut(&uuid) {
            v.size = r.size;
        }
        Ok(())
    })?;
    Ok(Json(json!({"volume_uuid": uuid, "size": r.size})))
}

#[derive(Debug, Deserialize)]
struct ShaQuery {
    #[serde(default)]
    snapshot_uuid: Option<String>,
}

async fn volume_sha256(
    State(zs): Zs,
    Path(uuid): Path<String>,
    Query(q): Query<ShaQuery>,
) -> AdminResult {
    let disk = zs.hv.store.disk(&volume_disk(&zs, &uuid)?)?;
    let view = q
        .snapshot_uuid
        .clone()
        .map(View::Snapshot)
        .unwrap_or(View::Live);
    let size = disk.size();
    let sha = run_blocking(move || disk.sha256(&view)).await?;
    Ok(Json(
        json!({"volume_uuid": uuid, "size": size, "sha256": sha}),
    ))
}

async fn image_sha256(State(zs): Zs, Path(uuid): Path<String>) -> AdminResult {
    let data = zs
        .inv
        .read(|d| d.images.get(&uuid).map(|i| i.data_id.clone()))
        .filter(|d| !d.is_empty())
        .ok_or_else(|| AdminError(StatusCode::NOT_FOUND, format!("image {uuid} has no data")))?;
    let image = zs.hv.store.image(&data)?;
    let size = image.size();
    let sha = run_blocking(move || image.sha256()).await?;
    Ok(Json(
        json!({"image_uuid": uuid, "size": size, "sha256": sha}),
    ))
}

async fn add_fault(State(zs): Zs, body: Bytes) -> AdminResult {
    let f: ZsFault = parse(&body)?;
    zs.add_fault(f);
    Ok(Json(json!({})))
}

async fn clear_faults(State(zs): Zs) -> AdminResult {
    zs.clear_faults();
    Ok(Json(json!({})))
}

#[derive(Debug, Deserialize)]
struct Quota {
    image_num: u64,
}

async fn set_quota(State(zs): Zs, body: Bytes) -> AdminResult {
    let q: Quota = parse(&body)?;
    zs.inv.update(|d| {
        d.image_quota = q.image_num;
        Ok(())
    })?;
    Ok(Json(json!({"image_num": q.image_num})))
}

#[derive(Debug, Deserialize)]
struct BsStatus {
    status: String,
}

async fn set_bs_status(State(zs): Zs, Path(uuid): Path<String>, body: Bytes) -> AdminResult {
    let s: BsStatus = parse(&body)?;
    if s.status != "Connected" && s.status != "Disconnected" {
        return Err(AdminError(
            StatusCode::BAD_REQUEST,
            "status: Connected or Disconnected".into(),
        ));
    }
    zs.inv.update(
        |d| match d.backup_storages.iter_mut().find(|b| b.uuid == uuid) {
            Some(b) => {
                b.status = s.status.clone();
                Ok(())
            }
            None => Err(crate::error::Error::not_found(
                "backup storage",
                uuid.clone(),
            )),
        },
    )?;
    Ok(Json(json!({"uuid": uuid, "status": s.status})))
}

/// `PUT /admin/zstack/volumes/{uuid}/status` `{"status": "Migrating"}`:
/// a volume in another status than `Ready` (as during a storage
/// migration), for tests of what ZStack refuses then.
async fn set_volume_status(State(zs): Zs, Path(uuid): Path<String>, body: Bytes) -> AdminResult {
    let s: BsStatus = parse(&body)?;
    zs.inv.update(|d| match d.volumes.get_mut(&uuid) {
        Some(v) => {
            v.status = s.status.clone();
            Ok(())
        }
        None => Err(crate::error::Error::not_found("volume", uuid.clone())),
    })?;
    Ok(Json(json!({"uuid": uuid, "status": s.status})))
}
