//! VMs, disks, disk attachments and snapshots.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::model::{Attachment, Disk, Snapshot, Vm, attachment_key, store_snapshot_name};
use super::wire::{self, Fault, Format, flag, nested_id, number, parse_body, text};
use super::{API, OvirtPlatform};
use crate::disk::transfer::{self, Source, Target};
use crate::disk::{BLOCK_SIZE, View};
use crate::ids::{new_uuid, unix_now};

/// What a handler answers: status, root element, value.
pub struct Reply {
    status: StatusCode,
    root: &'static str,
    value: Value,
}

/// 200 with `value` as `root`.
pub fn ok(root: &'static str, value: Value) -> Reply {
    Reply {
        status: StatusCode::OK,
        root,
        value,
    }
}

/// 201 with `value` as `root`.
pub fn created(root: &'static str, value: Value) -> Reply {
    Reply {
        status: StatusCode::CREATED,
        root,
        value,
    }
}

/// Renders a handler's result in the client's format.
pub fn done(format: Format, r: Result<Reply, Fault>) -> Response {
    match r {
        Ok(reply) => wire::render_status(reply.status, format, reply.root, &reply.value),
        Err(f) => axum::response::IntoResponse::into_response(f.in_format(format)),
    }
}

/// Runs disk work off the executor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, Fault> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Fault::from),
        Err(e) => Err(Fault::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Operation Failed",
            e.to_string(),
        )),
    }
}

type P = State<Arc<OvirtPlatform>>;
type Q = Query<HashMap<String, String>>;

/// `GET /ovirt-engine/api`: product information.
pub async fn product_info(State(p): P, headers: HeaderMap) -> Response {
    let v = p.config().version.clone();
    let n = super::parse_version(&v);
    let part = |i: usize| n.get(i).copied().unwrap_or(0);
    done(
        Format::of(&headers),
        Ok(ok(
            "api",
            json!({
                "product_info": {
                    "name": "oVirt Engine",
                    "vendor": "ovirt.org",
                    "version": {"full_version": v, "major": part(0), "minor": part(1), "build": part(2), "revision": 0},
                },
                "special_objects": {},
            }),
        )),
    )
}

// ---------------------------------------------------------------- views

/// A VM as the API shows it; with `all_content` the OVF configuration.
pub fn vm_view(p: &OvirtPlatform, vm: &Vm, all_content: bool) -> Result<Value, Fault> {
    let mut v = json!({
        "id": vm.id,
        "href": format!("{API}/vms/{}", vm.id),
        "name": vm.name,
        "status": vm.status,
        "memory": vm.memory,
        "cpu": {"topology": {"cores": vm.cpu_cores, "sockets": 1, "threads": 1}},
        "cluster": {"name": vm.cluster},
        "creation_time": wire::date(vm.creation_time),
        "disk_attachments": {"href": format!("{API}/vms/{}/diskattachments", vm.id)},
    });
    if all_content {
        let ovf = match &vm.ovf {
            Some(o) => o.clone(),
            None => p.inv.read(|doc| super::ovf::generate(doc, vm)),
        };
        v["initialization"] = json!({"configuration": {"type": "ovf", "data": ovf}});
    }
    Ok(v)
}

/// A disk as the API shows it.
pub fn disk_view(p: &OvirtPlatform, d: &Disk) -> Value {
    let actual =
        p.hv.store
            .disk(&d.id)
            .and_then(|vd| vd.allocated_map(&View::Live, true))
            .map(|m| m.count() * BLOCK_SIZE)
            .unwrap_or(0);
    json!({
        "id": d.id,
        "href": format!("{API}/disks/{}", d.id),
        "alias": d.alias,
        "name": d.alias,
        "image_id": d.image_id,
        "provisioned_size": d.provisioned_size,
        "actual_size": actual.min(d.provisioned_size),
        "total_size": actual.min(d.provisioned_size),
        "format": d.format,
        "sparse": d.sparse,
        "backup": d.backup,
        "status": d.status,
        "storage_type": "image",
        "content_type": "data",
        "storage_domains": {"storage_domain": [super::system::storage_domain_link(&d.storage_domain)]},
    })
}

/// An attachment as the API shows it.
pub fn attachment_view(a: &Attachment) -> Value {
    let mut disk = json!({"id": a.disk_id, "href": format!("{API}/disks/{}", a.disk_id)});
    if let Some(s) = &a.snapshot_id {
        disk["snapshot"] = json!({"id": s});
    }
    json!({
        "id": a.disk_id,
        "href": format!("{API}/vms/{}/diskattachments/{}", a.vm_id, a.disk_id),
        "bootable": a.bootable,
        "interface": a.interface,
        "active": a.active,
        "read_only": a.read_only,
        "pass_discard": false,
        "uses_scsi_reservation": false,
        "logical_name": a.local_path,
        "disk": disk,
        "vm": {"id": a.vm_id, "href": format!("{API}/vms/{}", a.vm_id)},
    })
}

/// An attachment as the API shows it after `polls` polls of it: with
/// `guest_agent_names`, an appliance disk's `logical_name` is its `/dev/vdX`
/// and shows only from the second poll on (the engine learns it from the
/// guest agent).
pub fn attachment_shown(p: &OvirtPlatform, a: &Attachment, polls: u32) -> Value {
    let mut v = attachment_view(a);
    if p.config().guest_agent_names
        && let Some(o) = v.as_object_mut()
    {
        match &a.device {
            Some(dev) if a.local_path.is_some() && polls >= 2 => {
                o.insert("logical_name".into(), json!(dev));
            }
            _ => {
                o.remove("logical_name");
            }
        }
    }
    v
}

/// The names a disk attached to an appliance has under `/dev/disk/by-id`:
/// virtio disks carry the first 20 characters of the disk id as serial,
/// SCSI disks the whole id.
pub fn device_link_names(disk_id: &str, interface: &str) -> Vec<String> {
    if interface == "virtio" {
        let short: String = disk_id.chars().take(20).collect();
        vec![format!("virtio-{short}")]
    } else {
        vec![format!("scsi-0QEMU_QEMU_HARDDISK_{disk_id}")]
    }
}

fn remove_device_links(p: &OvirtPlatform, a: &Attachment) {
    for n in device_link_names(&a.disk_id, &a.interface) {
        let link = p.device_root().join(n);
        // Only a link that points at this attachment's file.
        if a.local_path
            .as_deref()
            .is_some_and(|f| std::fs::read_link(&link).is_ok_and(|t| t == std::path::Path::new(f)))
        {
            let _ = std::fs::remove_file(&link);
        }
    }
}

/// Creates the by-id links of an appliance attachment after the configured
/// delay, unless it was detached meanwhile.
fn spawn_device_links(p: &Arc<OvirtPlatform>, a: &Attachment) {
    let (links, delay) = {
        let c = p.config();
        (c.device_links, c.device_link_delay)
    };
    let Some(file) = a.local_path.clone() else {
        return;
    };
    if !links {
        return;
    }
    let (p, a) = (p.clone(), a.clone());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let key = attachment_key(&a.vm_id, &a.disk_id);
        let still = |p: &OvirtPlatform| {
            p.inv.read(|doc| {
                doc.attachments
                    .get(&key)
                    .is_some_and(|x| x.local_path.as_deref() == Some(file.as_str()))
            })
        };
        if !still(&p) {
            return;
        }
        for n in device_link_names(&a.disk_id, &a.interface) {
            let link = p.device_root().join(n);
            let _ = std::fs::remove_file(&link);
            if let Err(e) = std::os::unix::fs::symlink(&file, &link) {
                tracing::warn!(link = %link.display(), error = %e, "creating a device link failed");
            }
        }
        // Detached while the links were made: take them away again.
        if !still(&p) {
            remove_device_links(&p, &a);
        }
    });
}

fn snapshot_view(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "href": format!("{API}/vms/{}/snapshots/{}", s.vm_id, s.id),
        "description": s.description,
        "snapshot_status": s.status,
        "snapshot_type": "regular",
        "persist_memorystate": false,
        "date": wire::date(s.date),
        "vm": {"id": s.vm_id, "href": format!("{API}/vms/{}", s.vm_id)},
    })
}

fn vm_of(p: &OvirtPlatform, id: &str) -> Result<Vm, Fault> {
    p.inv
        .read(|doc| doc.vms.get(id).cloned())
        .ok_or_else(|| Fault::not_found("VM", id))
}

// ------------------------------------------------------------------ VMs

/// `GET /vms[?search=name=NAME]`.
pub async fn list_vms(State(p): P, headers: HeaderMap, Query(q): Q) -> Response {
    let name = q
        .get("search")
        .and_then(|s| s.trim().strip_prefix("name="))
        .map(|s| s.trim().to_string());
    let all = q.get("all_content").is_some_and(|v| v == "true");
    let vms: Vec<Vm> = p.inv.read(|doc| {
        doc.vms
            .values()
            .filter(|v| name.as_ref().is_none_or(|n| &v.name == n))
            .cloned()
            .collect()
    });
    let r = vms
        .iter()
        .map(|v| vm_view(&p, v, all))
        .collect::<Result<Vec<_>, _>>()
        .map(|list| ok("vms", json!({"vm": list})));
    done(Format::of(&headers), r)
}

/// `GET /vms/{vm}[?all_content=true]`.
pub async fn get_vm(
    State(p): P,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Q,
) -> Response {
    let all = q.get("all_content").is_some_and(|v| v == "true");
    let r = vm_of(&p, &id)
        .and_then(|vm| vm_view(&p, &vm, all))
        .map(|v| ok("vm", v));
    done(Format::of(&headers), r)
}

/// `POST /vms`: a new VM; with an OVF configuration
/// (`initialization.configuration {type: ovf, data}`) an import the way
/// the engine does it ([`super::import`]).
pub async fn create_vm(State(p): P, headers: HeaderMap, body: Bytes) -> Response {
    let format = Format::of(&headers);
    let r = async {
        let req = parse_body(&headers, &body)?;
        let name = text(&req, "name");
        let cluster = req
            .get("cluster")
            .and_then(|c| text(c, "name").or_else(|| text(c, "id")))
            .ok_or_else(|| Fault::bad_request("vm.cluster is required"))?;
        let init = req.get("initialization");
        if let Some(c) = init.and_then(|i| i.get("configuration")) {
            if text(c, "type").as_deref() != Some("ovf") {
                return Err(Fault::bad_request("configuration.type must be ovf"));
            }
            let data = text(c, "data")
                .ok_or_else(|| Fault::bad_request("configuration.data is required"))?;
            let regenerate = match init {
                Some(i) => flag(i, "regenerate_ids")?.unwrap_or(false),
                None => false,
            };
            let vm = super::import::import_vm(&p, &data, name, cluster, regenerate).await?;
            return Ok(created("vm", vm_view(&p, &vm, false)?));
        }
        let name = name.ok_or_else(|| Fault::bad_request("vm.name is required"))?;
        let memory = number(&req, "memory")?.unwrap_or(1 << 30);
        let cores = req
            .get("cpu")
            .and_then(|c| c.get("topology"))
            .map(|t| number(t, "cores"))
            .transpose()?
            .flatten()
            .unwrap_or(1) as u32;
        let vm = Vm {
            id: new_uuid(),
            name,
            status: "down".into(),
            memory,
            cpu_cores: cores,
            cluster,
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
        Ok(created("vm", vm_view(&p, &vm, false)?))
    }
    .await;
    done(format, r)
}

/// `DELETE /vms/{vm}`: removes the VM, its snapshots and its own disks.
pub async fn delete_vm(State(p): P, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let format = Format::of(&headers);
    let r = async {
        let (snaps, disks) = p.inv.update(|doc| {
            if !doc.vms.contains_key(&id) {
                return Err(crate::error::Error::not_found("VM", &id));
            }
            if doc
                .backups
                .values()
                .any(|b| b.vm_id == id && !backup_done(&b.phase))
            {
                return Err(crate::error::Error::Conflict(format!(
                    "VM {id} has a backup in progress"
                )));
            }
            if doc.attachments.values().any(|a| {
                a.snapshot_id.is_some()
                    && doc
                        .snapshots
                        .get(a.snapshot_id.as_deref().unwrap_or(""))
                        .is_some_and(|s| s.vm_id == id)
            }) {
                return Err(crate::error::Error::Conflict(format!(
                    "a snapshot disk of VM {id} is attached to another VM"
                )));
            }
            let snaps: Vec<Snapshot> = doc
                .snapshots
                .values()
                .filter(|s| s.vm_id == id)
                .cloned()
                .collect();
            let disks: Vec<String> = doc
                .own_disks(&id)
                .into_iter()
                .map(|(_, d)| d.id.clone())
                .collect();
            doc.snapshots.retain(|_, s| s.vm_id != id);
            doc.checkpoints.retain(|_, c| c.vm_id != id);
            doc.attachments.retain(|_, a| a.vm_id != id);
            for d in &disks {
                doc.disks.remove(d);
            }
            doc.vms.remove(&id);
            Ok((snaps, disks))
        })?;
        let _ = snaps;
        let hv = p.hv.clone();
        blocking(move || {
            for d in disks {
                hv.store.delete_disk(&d)?;
            }
            Ok(())
        })
        .await?;
        Ok(ok("action", json!({"status": "complete"})))
    }
    .await;
    done(format, r)
}

pub(crate) fn backup_done(phase: &str) -> bool {
    matches!(phase, "succeeded" | "failed")
}

// ---------------------------------------------------------------- disks

/// `GET /disks`.
pub async fn list_disks(State(p): P, headers: HeaderMap) -> Response {
    let disks: Vec<Disk> = p.inv.read(|doc| doc.disks.values().cloned().collect());
    let list: Vec<Value> = disks.iter().map(|d| disk_view(&p, d)).collect();
    done(Format::of(&headers), Ok(ok("disks", json!({"disk": list}))))
}

/// `GET /disks/{disk}`.
pub async fn get_disk(State(p): P, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = p
        .inv
        .read(|doc| doc.disks.get(&id).cloned())
        .ok_or_else(|| Fault::not_found("Disk", &id))
        .map(|d| ok("disk", disk_view(&p, &d)));
    done(Format::of(&headers), r)
}

/// Validated disk parameters.
pub struct NewDisk {
    /// Alias.
    pub alias: String,
    /// Size.
    pub size: u64,
    /// `raw` or `cow` (the admin API accepts anything).
    pub format: String,
    /// Thin.
    pub sparse: bool,
    /// `none` or `incremental`.
    pub backup: String,
}

/// Creates a disk record and its data.
pub fn create_disk_record(p: &OvirtPlatform, d: NewDisk) -> crate::error::Result<Disk> {
    let vd = p.hv.store.create_disk(d.size, None)?;
    let disk = Disk {
        id: vd.id().to_string(),
        alias: d.alias,
        image_id: new_uuid(),
        provisioned_size: d.size,
        format: d.format,
        sparse: d.sparse,
        backup: d.backup,
        storage_domain: p.config().storage_domain.clone(),
        status: "ok".into(),
    };
    p.inv.update(|doc| {
        doc.disks.insert(disk.id.clone(), disk.clone());
        Ok(())
    })?;
    Ok(disk)
}

/// `POST /disks`: `{alias|name, provisioned_size, format: raw|cow, sparse,
/// backup: none|incremental, storage_domains}`.
pub async fn create_disk(State(p): P, headers: HeaderMap, body: Bytes) -> Response {
    let format = Format::of(&headers);
    let r = async {
        let req = parse_body(&headers, &body)?;
        let alias = text(&req, "alias")
            .or_else(|| text(&req, "name"))
            .unwrap_or_else(|| "disk".into());
        let size = number(&req, "provisioned_size")?
            .ok_or_else(|| Fault::bad_request("disk.provisioned_size is required"))?;
        crate::disk::check_size(size)?;
        let fmt =
            text(&req, "format").ok_or_else(|| Fault::bad_request("disk.format is required"))?;
        if fmt != "raw" && fmt != "cow" {
            return Err(Fault::bad_request(format!(
                "disk.format must be raw or cow, not {fmt}"
            )));
        }
        let backup = text(&req, "backup").unwrap_or_else(|| "none".into());
        if backup != "none" && backup != "incremental" {
            return Err(Fault::bad_request(format!(
                "disk.backup must be none or incremental, not {backup}"
            )));
        }
        if backup == "incremental" && fmt != "cow" {
            return Err(Fault::bad_request(
                "incremental backup needs a cow (qcow2) disk",
            ));
        }
        // The engine needs the storage domain (by id or name).
        let sd = wire::list(&req, "storage_domains", "storage_domain")
            .first()
            .map(|sd| (text(sd, "id"), text(sd, "name")))
            .ok_or_else(|| {
                Fault::bad_request(
                    "Cannot add Virtual Disk: disk.storage_domains.storage_domain is required",
                )
            })?;
        let ours = p.config().storage_domain.clone();
        match sd {
            (Some(id), _) if id == super::system::storage_domain_id(&ours) => {}
            (None, Some(name)) if name == ours => {}
            (id, name) => {
                return Err(Fault::not_found(
                    "Storage domain",
                    &id.or(name).unwrap_or_default(),
                ));
            }
        }
        let sparse = flag(&req, "sparse")?.unwrap_or(true);
        let pp = p.clone();
        let disk = blocking(move || {
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
        Ok(created("disk", disk_view(&p, &disk)))
    }
    .await;
    done(format, r)
}

/// `DELETE /disks/{disk}`: refused while attached.
pub async fn delete_disk(State(p): P, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let format = Format::of(&headers);
    let r = async {
        p.inv.update(|doc| {
            if !doc.disks.contains_key(&id) {
                return Err(crate::error::Error::not_found("Disk", &id));
            }
            if let Some(a) = doc.attachments.values().find(|a| a.disk_id == id) {
                return Err(crate::error::Error::Conflict(format!(
                    "disk {id} is attached to VM {}",
                    a.vm_id
                )));
            }
            if doc
                .transfers
                .values()
                .any(|t| t.disk_id == id && !super::backups::transfer_done(&t.phase))
            {
                return Err(crate::error::Error::Conflict(format!(
                    "disk {id} has an image transfer in progress"
                )));
            }
            doc.disks.remove(&id);
            Ok(())
        })?;
        let hv = p.hv.clone();
        blocking(move || hv.store.delete_disk(&id)).await?;
        Ok(ok("action", json!({"status": "complete"})))
    }
    .await;
    done(format, r)
}

// ---------------------------------------------------------- attachments

/// `GET /vms/{vm}/diskattachments`.
pub async fn list_attachments(State(p): P, headers: HeaderMap, Path(vm): Path<String>) -> Response {
    let r = vm_of(&p, &vm).map(|_| {
        let list: Vec<Value> = p.inv.read(|doc| {
            doc.attachments_of(&vm)
                .into_iter()
                .map(|a| {
                    attachment_shown(&p, a, p.attachment_polls(&attachment_key(&vm, &a.disk_id)))
                })
                .collect()
        });
        ok("disk_attachments", json!({"disk_attachment": list}))
    });
    done(Format::of(&headers), r)
}

/// `GET /vms/{vm}/nics`: the VM's network interfaces.
pub async fn list_nics(State(p): P, headers: HeaderMap, Path(vm): Path<String>) -> Response {
    let r = vm_of(&p, &vm).map(|v| {
        let list: Vec<Value> = v
            .nics
            .iter()
            .map(|n| {
                let mut nic = json!({
                    "id": n.id,
                    "href": format!("{API}/vms/{vm}/nics/{}", n.id),
                    "name": n.name,
                    "interface": n.interface,
                    "linked": true,
                    "plugged": true,
                    "mac": {"address": n.mac},
                    "vm": {"id": vm, "href": format!("{API}/vms/{vm}")},
                });
                if let Some(profile) = &n.vnic_profile {
                    nic["vnic_profile"] =
                        json!({"id": profile, "href": format!("{API}/vnicprofiles/{profile}")});
                }
                nic
            })
            .collect();
        ok("nics", json!({"nic": list}))
    });
    done(Format::of(&headers), r)
}

/// `GET /vms/{vm}/diskattachments/{disk}`.
pub async fn get_attachment(
    State(p): P,
    headers: HeaderMap,
    Path((vm, disk)): Path<(String, String)>,
) -> Response {
    let r = p
        .inv
        .read(|doc| doc.attachments.get(&attachment_key(&vm, &disk)).cloned())
        .ok_or_else(|| Fault::not_found("Disk attachment", &disk))
        .map(|a| {
            let polls = p.poll_attachment(&attachment_key(&vm, &disk));
            ok("disk_attachment", attachment_shown(&p, &a, polls))
        });
    done(Format::of(&headers), r)
}

/// The attachment request after validation.
pub struct AttachRequest {
    /// Target VM.
    pub vm_id: String,
    /// Disk.
    pub disk_id: String,
    /// Disk snapshot (backup API).
    pub snapshot_id: Option<String>,
    /// Bootable.
    pub bootable: bool,
    /// Interface.
    pub interface: String,
    /// Plugged.
    pub active: bool,
    /// Read-only.
    pub read_only: bool,
}

/// Attaches a disk (or a disk snapshot) to a VM; for an appliance the
/// data is materialised as a sparse raw file.
pub async fn attach_disk(p: &Arc<OvirtPlatform>, req: AttachRequest) -> Result<Attachment, Fault> {
    let appliance =
        p.inv.read(|doc| {
            let vm = doc
                .vms
                .get(&req.vm_id)
                .ok_or_else(|| Fault::not_found("VM", &req.vm_id))?;
            let disk = doc
                .disks
                .get(&req.disk_id)
                .ok_or_else(|| Fault::not_found("Disk", &req.disk_id))?;
            if doc
                .attachments
                .contains_key(&attachment_key(&req.vm_id, &req.disk_id))
            {
                return Err(Fault::conflict(format!(
                    "Cannot attach disk {}: it is already attached to VM {}",
                    disk.id, vm.name
                )));
            }
            match &req.snapshot_id {
                Some(sid) => {
                    let s = doc
                        .snapshots
                        .get(sid)
                        .ok_or_else(|| Fault::not_found("Snapshot", sid))?;
                    if !s.disk_ids.contains(&req.disk_id) {
                        return Err(Fault::bad_request(format!(
                            "snapshot {sid} has no image of disk {}",
                            req.disk_id
                        )));
                    }
                    if s.status != "ok" {
                        return Err(Fault::conflict(format!(
                            "Cannot attach a disk snapshot: snapshot {sid} is {}",
                            s.status
                        )));
                    }
                    if s.vm_id == req.vm_id {
                        return Err(Fault::conflict(
                            "a disk snapshot cannot be attached to its own VM",
                        ));
                    }
                }
                None => {
                    if let Some(owner) = doc.owner_of(&req.disk_id) {
                        return Err(Fault::conflict(format!(
                            "Cannot attach disk {}: it is attached to VM {} and not shareable",
                            req.disk_id, owner.vm_id
                        )));
                    }
                    if doc.transfers.values().any(|t| {
                        t.disk_id == req.disk_id && !super::backups::transfer_done(&t.phase)
                    }) {
                        return Err(Fault::conflict(format!(
                            "disk {} has an image transfer in progress",
                            req.disk_id
                        )));
                    }
                }
            }
            Ok(vm.appliance)
        })?;
    if p.attach_should_fail() {
        return Err(Fault::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Operation Failed",
            format!(
                "injected fault: hot plugging disk {} to VM {} failed",
                req.disk_id, req.vm_id
            ),
        ));
    }
    let local_path = if appliance && req.active {
        let dir = p.appliance_dir.join(&req.vm_id);
        let name = match &req.snapshot_id {
            Some(s) => format!("{}@{s}.raw", req.disk_id),
            None => format!("{}.raw", req.disk_id),
        };
        let path = dir.join(name);
        let hv = p.hv.clone();
        let disk_id = req.disk_id.clone();
        let view = match &req.snapshot_id {
            Some(s) => View::Snapshot(store_snapshot_name(s)),
            None => View::Live,
        };
        let path2 = path.clone();
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(crate::error::Error::io(&dir))?;
            let d = hv.store.disk(&disk_id)?;
            transfer::materialize(Source::Disk(&d, &view), &path2)
        })
        .await?;
        Some(path.display().to_string())
    } else {
        None
    };
    let a = Attachment {
        disk_id: req.disk_id.clone(),
        vm_id: req.vm_id.clone(),
        snapshot_id: req.snapshot_id.clone(),
        bootable: req.bootable,
        interface: req.interface.clone(),
        active: req.active,
        read_only: req.read_only,
        local_path: local_path.clone(),
        device: None,
        seq: 0,
    };
    let r = p.inv.update(|doc| {
        let key = attachment_key(&a.vm_id, &a.disk_id);
        if doc.attachments.contains_key(&key) {
            return Err(crate::error::Error::Conflict(format!(
                "disk {} was attached meanwhile",
                a.disk_id
            )));
        }
        let mut a = a.clone();
        a.seq = doc.next_seq();
        if a.local_path.is_some() {
            // The next free /dev/vdX of the appliance (vda is its own).
            let used: Vec<String> = doc
                .attachments
                .values()
                .filter(|x| x.vm_id == a.vm_id)
                .filter_map(|x| x.device.clone())
                .collect();
            a.device = (b'b'..=b'z')
                .map(|c| format!("/dev/vd{}", c as char))
                .find(|d| !used.contains(d));
        }
        doc.attachments.insert(key, a.clone());
        Ok(a)
    });
    match r {
        Ok(a) => {
            p.forget_attachment(&attachment_key(&a.vm_id, &a.disk_id));
            spawn_device_links(p, &a);
            Ok(a)
        }
        Err(e) => {
            if let Some(path) = &local_path {
                let _ = std::fs::remove_file(path);
            }
            Err(e.into())
        }
    }
}

/// `POST /vms/{vm}/diskattachments`: `<disk_attachment><disk id="D">
/// [<snapshot id="S"/>]</disk><bootable/><interface/><active/>`.
pub async fn attach(
    State(p): P,
    headers: HeaderMap,
    Path(vm): Path<String>,
    body: Bytes,
) -> Response {
    let format = Format::of(&headers);
    let r = async {
        let req = parse_body(&headers, &body)?;
        let disk = req
            .get("disk")
            .ok_or_else(|| Fault::bad_request("disk_attachment.disk is required"))?;
        let disk_id = text(disk, "id").ok_or_else(|| Fault::bad_request("disk.id is required"))?;
        let snapshot_id = nested_id(disk, "snapshot");
        let interface = text(&req, "interface")
            .ok_or_else(|| Fault::bad_request("disk_attachment.interface is required"))?;
        if !["virtio", "virtio_scsi", "ide", "sata", "spapr_vscsi"].contains(&interface.as_str()) {
            return Err(Fault::bad_request(format!(
                "unknown disk interface {interface}"
            )));
        }
        let a = attach_disk(
            &p,
            AttachRequest {
                vm_id: vm,
                disk_id,
                snapshot_id,
                bootable: flag(&req, "bootable")?.unwrap_or(false),
                interface,
                active: flag(&req, "active")?.unwrap_or(true),
                read_only: flag(&req, "read_only")?.unwrap_or(false),
            },
        )
        .await?;
        Ok(created("disk_attachment", attachment_shown(&p, &a, 0)))
    }
    .await;
    done(format, r)
}

/// Detaches; a live disk attached to an appliance gets the appliance's
/// writes back, a snapshot disk's temporary layer is dropped.
pub async fn detach_disk(
    p: &Arc<OvirtPlatform>,
    vm: &str,
    disk: &str,
) -> Result<Attachment, Fault> {
    let a = p
        .inv
        .read(|doc| doc.attachments.get(&attachment_key(vm, disk)).cloned())
        .ok_or_else(|| Fault::not_found("Disk attachment", disk))?;
    if let Some(path) = a.local_path.clone() {
        let hv = p.hv.clone();
        let write_back = a.snapshot_id.is_none() && !a.read_only;
        let disk_id = a.disk_id.clone();
        blocking(move || {
            let path = std::path::PathBuf::from(path);
            if write_back && let Ok(d) = hv.store.disk(&disk_id) {
                transfer::import(&path, Target::Disk(&d))?;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(crate::error::Error::io(&path)(e)),
            }
        })
        .await?;
    }
    remove_device_links(p, &a);
    p.inv.update(|doc| {
        doc.attachments.remove(&attachment_key(vm, disk));
        Ok(())
    })?;
    p.forget_attachment(&attachment_key(vm, disk));
    Ok(a)
}

/// `PUT /vms/{vm}/diskattachments/{disk}`: updates the attachment and the
/// disk in it (the model's `DiskAttachmentService.update`):
/// `<disk_attachment><bootable/><interface/><disk><alias/>
/// <provisioned_size>N</provisioned_size></disk></disk_attachment>`, every
/// field optional. A larger `provisioned_size` extends the disk in place
/// (base-image link, snapshots and checkpoints kept; the new part reads as
/// zeroes); a smaller one is refused, as are extends of a disk snapshot
/// attachment, of a locked disk, of a disk with an image transfer in
/// progress or of a VM during a backup. Answers the updated attachment.
pub async fn update_attachment(
    State(p): P,
    headers: HeaderMap,
    Path((vm, disk_id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let format = Format::of(&headers);
    let r = (|| {
        let req = parse_body(&headers, &body)?;
        let disk_req = req.get("disk").cloned().unwrap_or(Value::Null);
        if let Some(id) = text(&disk_req, "id")
            && id != disk_id
        {
            return Err(Fault::bad_request(format!(
                "disk.id {id} does not match the attachment {disk_id}"
            )));
        }
        let size = number(&disk_req, "provisioned_size")?;
        if let Some(size) = size {
            crate::disk::check_size(size)?;
        }
        let alias = text(&disk_req, "alias").or_else(|| text(&disk_req, "name"));
        let bootable = flag(&req, "bootable")?;
        let interface = text(&req, "interface");
        if let Some(i) = &interface
            && !["virtio", "virtio_scsi", "ide", "sata", "spapr_vscsi"].contains(&i.as_str())
        {
            return Err(Fault::bad_request(format!("unknown disk interface {i}")));
        }
        let key = attachment_key(&vm, &disk_id);
        let hv = p.hv.clone();
        let a = p.inv.update(|doc| {
            let a = doc
                .attachments
                .get(&key)
                .cloned()
                .ok_or_else(|| crate::error::Error::not_found("Disk attachment", &disk_id))?;
            let d = doc
                .disks
                .get(&disk_id)
                .cloned()
                .ok_or_else(|| crate::error::Error::not_found("Disk", &disk_id))?;
            if let Some(size) = size.filter(|s| *s != d.provisioned_size) {
                if a.snapshot_id.is_some() {
                    return Err(crate::error::Error::Conflict(format!(
                        "Cannot edit Virtual Disk. Disk {disk_id} is attached as a snapshot \
                         disk: it cannot be extended"
                    )));
                }
                if size < d.provisioned_size {
                    return Err(crate::error::Error::Invalid(format!(
                        "Cannot edit Virtual Disk. New disk size ({size} bytes) cannot be \
                         smaller than the current size ({} bytes)",
                        d.provisioned_size
                    )));
                }
                if d.status != "ok" {
                    return Err(crate::error::Error::Conflict(format!(
                        "Cannot edit Virtual Disk. Disk {disk_id} is {}",
                        d.status
                    )));
                }
                if a.local_path.is_some() {
                    return Err(crate::error::Error::Conflict(format!(
                        "Cannot edit Virtual Disk. Disk {disk_id} is plugged into a backup \
                         appliance"
                    )));
                }
                if doc
                    .transfers
                    .values()
                    .any(|t| t.disk_id == disk_id && !super::backups::transfer_done(&t.phase))
                {
                    return Err(crate::error::Error::Conflict(format!(
                        "Cannot edit Virtual Disk. Disk {disk_id} has an image transfer in \
                         progress"
                    )));
                }
                if doc
                    .backups
                    .values()
                    .any(|b| b.vm_id == vm && !backup_done(&b.phase))
                {
                    return Err(crate::error::Error::Conflict(format!(
                        "Cannot edit Virtual Disk. VM {vm} is during a backup operation"
                    )));
                }
                // O(metadata): the overlay file is extended sparsely.
                hv.store.disk(&disk_id)?.resize(size)?;
                if let Some(d) = doc.disks.get_mut(&disk_id) {
                    d.provisioned_size = size;
                }
            }
            if let Some(alias) = &alias
                && let Some(d) = doc.disks.get_mut(&disk_id)
            {
                d.alias = alias.clone();
            }
            let a = doc
                .attachments
                .get_mut(&key)
                .ok_or_else(|| crate::error::Error::not_found("Disk attachment", &disk_id))?;
            if let Some(b) = bootable {
                a.bootable = b;
            }
            if let Some(i) = &interface {
                a.interface = i.clone();
            }
            Ok(a.clone())
        })?;
        Ok(ok(
            "disk_attachment",
            attachment_shown(
                &p,
                &a,
                p.attachment_polls(&attachment_key(&a.vm_id, &a.disk_id)),
            ),
        ))
    })();
    done(format, r)
}

/// `DELETE /vms/{vm}/diskattachments/{disk}` (detach only).
pub async fn detach(
    State(p): P,
    headers: HeaderMap,
    Path((vm, disk)): Path<(String, String)>,
) -> Response {
    let r = detach_disk(&p, &vm, &disk)
        .await
        .map(|_| ok("action", json!({"status": "complete"})));
    done(Format::of(&headers), r)
}

// ------------------------------------------------------------ snapshots

/// `GET /vms/{vm}/snapshots`: the active layer plus regular snapshots.
pub async fn list_snapshots(State(p): P, headers: HeaderMap, Path(vm): Path<String>) -> Response {
    let r = vm_of(&p, &vm).map(|_| {
        let mut list = vec![json!({
            "id": format!("active-{vm}"),
            "description": "Active VM",
            "snapshot_type": "active",
            "snapshot_status": "ok",
            "vm": {"id": vm},
        })];
        list.extend(p.inv.read(|doc| {
            doc.snapshots
                .values()
                .filter(|s| s.vm_id == vm)
                .map(snapshot_view)
                .collect::<Vec<_>>()
        }));
        ok("snapshots", json!({"snapshot": list}))
    });
    done(Format::of(&headers), r)
}

/// `GET /vms/{vm}/snapshots/{s}`: each call is a status poll.
pub async fn get_snapshot(
    State(p): P,
    headers: HeaderMap,
    Path((vm, sid)): Path<(String, String)>,
) -> Response {
    let r = p
        .inv
        .update(|doc| {
            let s = doc
                .snapshots
                .get_mut(&sid)
                .filter(|s| s.vm_id == vm)
                .ok_or_else(|| crate::error::Error::not_found("Snapshot", &sid))?;
            if s.status == "locked" && s.polls_left != u32::MAX {
                s.polls_left = s.polls_left.saturating_sub(1);
                if s.polls_left == 0 {
                    s.status = "ok".into();
                }
            }
            Ok(snapshot_view(s))
        })
        .map(|v| ok("snapshot", v))
        .map_err(Fault::from);
    done(Format::of(&headers), r)
}

fn next_checkpoint(d: &crate::disk::VirtualDisk) -> u64 {
    d.checkpoints().keys().max().copied().unwrap_or(0) + 1
}

/// Freezes the disks as store snapshot `name`; returns each disk's new
/// checkpoint number. On failure, already frozen disks are released.
pub fn freeze(
    p: &OvirtPlatform,
    disk_ids: &[String],
    name: &str,
) -> crate::error::Result<BTreeMap<String, u64>> {
    let mut done: BTreeMap<String, u64> = BTreeMap::new();
    for id in disk_ids {
        let r = p.hv.store.disk(id).and_then(|d| {
            let cp = next_checkpoint(&d);
            d.create_snapshot(name, cp).map(|_| cp)
        });
        match r {
            Ok(cp) => {
                done.insert(id.clone(), cp);
            }
            Err(e) => {
                for d in done.keys() {
                    if let Ok(vd) = p.hv.store.disk(d) {
                        let _ = vd.delete_snapshot(name);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// `POST /vms/{vm}/snapshots`: `{description, persist_memorystate: false}`;
/// the new snapshot is `locked` for a few polls.
pub async fn create_snapshot(
    State(p): P,
    headers: HeaderMap,
    Path(vm): Path<String>,
    body: Bytes,
) -> Response {
    let format = Format::of(&headers);
    let r = async {
        let req = parse_body(&headers, &body)?;
        if flag(&req, "persist_memorystate")?.unwrap_or(true) {
            return Err(Fault::bad_request(
                "the mock takes disk-only snapshots: set persist_memorystate to false",
            ));
        }
        let description = text(&req, "description").unwrap_or_default();
        let vmrec = vm_of(&p, &vm)?;
        let (disks, ovf) = p.inv.read(|doc| {
            let disks: Vec<(String, String)> = doc
                .own_disks(&vm)
                .into_iter()
                .map(|(_, d)| (d.id.clone(), d.image_id.clone()))
                .collect();
            (disks, super::ovf::generate(doc, &vmrec))
        });
        let id = new_uuid();
        let name = store_snapshot_name(&id);
        let ids: Vec<String> = disks.iter().map(|(d, _)| d.clone()).collect();
        let pp = p.clone();
        let ids2 = ids.clone();
        blocking(move || freeze(&pp, &ids2, &name).map(|_| ())).await?;
        let polls = if p.snapshot_stuck() {
            u32::MAX
        } else {
            p.config().snapshot_polls
        };
        let s = Snapshot {
            id: id.clone(),
            vm_id: vm.clone(),
            description,
            status: if polls == 0 {
                "ok".into()
            } else {
                "locked".into()
            },
            polls_left: polls,
            disk_ids: ids,
            image_ids: disks.into_iter().map(|(d, _)| (d, new_uuid())).collect(),
            ovf,
            date: unix_now(),
        };
        p.inv.update(|doc| {
            doc.snapshots.insert(id.clone(), s.clone());
            Ok(())
        })?;
        Ok(created("snapshot", snapshot_view(&s)))
    }
    .await;
    done(format, r)
}

/// `DELETE /vms/{vm}/snapshots/{s}`: refused while one of its disks is
/// attached somewhere.
pub async fn delete_snapshot(
    State(p): P,
    headers: HeaderMap,
    Path((vm, sid)): Path<(String, String)>,
) -> Response {
    let format = Format::of(&headers);
    let r = async {
        let s = p.inv.update(|doc| {
            let s = doc
                .snapshots
                .get(&sid)
                .filter(|s| s.vm_id == vm)
                .cloned()
                .ok_or_else(|| crate::error::Error::not_found("Snapshot", &sid))?;
            if let Some(a) = doc
                .attachments
                .values()
                .find(|a| a.snapshot_id.as_deref() == Some(sid.as_str()))
            {
                return Err(crate::error::Error::Conflict(format!(
                    "Cannot remove Snapshot. Disk {} of the snapshot is attached to VM {}",
                    a.disk_id, a.vm_id
                )));
            }
            doc.snapshots.remove(&sid);
            Ok(s)
        })?;
        let hv = p.hv.clone();
        blocking(move || {
            let name = store_snapshot_name(&s.id);
            for d in &s.disk_ids {
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

/// `GET /vms/{vm}/snapshots/{s}/disks`: the disks frozen by the snapshot.
pub async fn snapshot_disks(
    State(p): P,
    headers: HeaderMap,
    Path((vm, sid)): Path<(String, String)>,
) -> Response {
    let r = p.inv.read(|doc| {
        let s = doc
            .snapshots
            .get(&sid)
            .filter(|s| s.vm_id == vm)
            .ok_or_else(|| Fault::not_found("Snapshot", &sid))?;
        let list: Vec<Value> = s
            .disk_ids
            .iter()
            .filter_map(|d| doc.disks.get(d))
            .map(|d| {
                let mut v = disk_view(&p, d);
                v["image_id"] = json!(s.image_ids.get(&d.id).cloned().unwrap_or_default());
                v["snapshot"] = json!({"id": s.id});
                v
            })
            .collect();
        Ok(ok("disks", json!({"disk": list})))
    });
    done(Format::of(&headers), r)
}
