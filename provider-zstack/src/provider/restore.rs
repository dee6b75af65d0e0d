//! The restore half: images (reused by md5 and size, or AddImage from the
//! host's HTTP URL), the VM's shape, the VM and its data volumes, and
//! what a failed restore leaves.
//!
//! Locking: the per-guest `RestoreState` (`restores`) is locked only to
//! read or update it ([`ZStackProvider::restore_state`]), never across an
//! `.await`; `restore_vm_cleanup` takes it out of the map.

use std::collections::BTreeMap;

use super::*;

#[derive(Debug)]
pub(super) struct RestoreState {
    vm_uuid: String,
    name: String,
    tag: Tag,
    meta: Metadata,
    /// device → (image uuid, uploaded by this restore)
    images: BTreeMap<String, (String, bool)>,
    bs: String,
    shape: VmShape,
}

/// What a restored VM is created with besides its volumes.
#[derive(Debug, Clone)]
struct VmShape {
    /// Instance offering, or (without one) CPUs and memory in bytes.
    compute: Compute,
    /// L3 networks, the first the default.
    l3_network_uuids: Vec<String>,
}

#[derive(Debug, Clone)]
enum Compute {
    Offering(String),
    CpuMemory(u32, u64),
}

/// The metadata and VM shape of a snapshot taken on another platform or
/// imported, from its platform-neutral guest spec: the spec's boot disk
/// (else the first volume) is the root volume, the others data volumes,
/// CPUs and memory as the spec says; networks come from the provider
/// options (`l3_network_uuids`), the source's networks mean nothing here.
/// What ZStack does not take (NIC models and MACs, firmware, disk buses)
/// is a restore warning.
fn foreign(request: &RestoreVmRequest) -> Result<(Metadata, Option<VmInventory>)> {
    let archive = &request.archive;
    let snapshot = &archive.snapshot;
    let spec = archive.foreign_guest_spec()?;
    if snapshot.volumes.is_empty() {
        return Err(Error::invalid(format!(
            "snapshot {} holds no volumes",
            snapshot.id
        )));
    }
    let windows = spec
        .os
        .as_deref()
        .is_some_and(|o| o.to_ascii_lowercase().contains("win"));
    // The root volume is the spec's boot disk when it names one.
    let mut stored: Vec<_> = snapshot.volumes.iter().collect();
    if let Some(boot) = spec.disks.iter().find(|d| d.boot_order == Some(0))
        && let Some(at) = stored.iter().position(|v| v.volume.device == boot.device)
    {
        let v = stored.remove(at);
        stored.insert(0, v);
    }
    let volumes = stored
        .into_iter()
        .enumerate()
        .map(|(n, v)| VolumeMeta {
            device: v.volume.device.clone(),
            uuid: String::new(),
            kind: if n == 0 { "Root" } else { "Data" }.to_owned(),
            size: v.volume.size,
            md5: String::new(),
            root_image_uuid: None,
            device_id: n as u64,
            name: format!("{}-{}", spec.name, v.volume.device),
        })
        .collect();
    let meta = Metadata {
        vm_uuid: snapshot.guest.0.clone(),
        vm_name: spec.name.clone(),
        platform: if windows { "Windows" } else { "Linux" }.to_owned(),
        backup_storage_uuid: String::new(),
        volumes,
    };
    let inventory: VmInventory = serde_json::from_value(serde_json::json!({
        "uuid": snapshot.guest.0,
        "name": spec.name,
        "allVolumes": [],
        "cpuNum": spec.cpus,
        "memorySize": spec.memory_mib << 20,
    }))
    .map_err(|e| Error::invalid("the guest spec does not map to a ZStack VM").with_source(e))?;
    let mut unmapped = Vec::new();
    if !spec.nics.is_empty() {
        unmapped.push(format!(
            "{} NIC(s): models and MAC addresses are not kept, networks come from l3_network_uuids",
            spec.nics.len()
        ));
    }
    if spec.firmware == provider_api::spec::Firmware::Efi {
        unmapped
            .push("UEFI firmware: the VM is created with the instance's default boot mode".into());
    }
    if spec
        .disks
        .iter()
        .any(|d| d.bus != provider_api::spec::Bus::Virtio)
    {
        unmapped.push("disk buses: ZStack attaches volumes as virtio".into());
    }
    for w in unmapped {
        request.warn(format!(
            "not mapped from {} onto ZStack: {w}",
            snapshot.platform
        ));
    }
    Ok((meta, Some(inventory)))
}

impl ZStackProvider {
    fn restore_state<R>(&self, guest: &Guest, f: impl FnOnce(&mut RestoreState) -> R) -> Result<R> {
        self.restores.with(&guest.id, f)
    }

    async fn reusable_image(&self, v: &VolumeMeta) -> Result<Option<String>> {
        if v.md5.len() != 32 {
            return Ok(None);
        }
        let media = if v.kind == "Root" {
            "RootVolumeTemplate"
        } else {
            "DataVolumeTemplate"
        };
        let hits: Vec<ImageInventory> = self
            .client
            .query(
                "/images",
                &[
                    format!("md5Sum={}", v.md5),
                    format!("size={}", v.size),
                    "status=Ready".into(),
                    "state=Enabled".into(),
                    format!("mediaType={media}"),
                ],
            )
            .await?;
        // Checked again here: reusing a wrong image restores wrong data.
        Ok(hits
            .into_iter()
            .find(|i| {
                i.md5_sum.as_deref() == Some(v.md5.as_str())
                    && i.size == v.size
                    && i.status == "Ready"
                    && i.state == "Enabled"
                    && i.media_type == media
            })
            .map(|i| i.uuid))
    }

    /// The instance offering (or CPU and memory) and L3 networks of the
    /// restored VM: the provider options', else the backed-up VM's; each
    /// must exist on the target, checked before anything is created.
    async fn vm_shape(&self, backed: Option<&VmInventory>) -> Result<VmShape> {
        let exists = |resource: &'static str, uuid: String| async move {
            let hits: Vec<UuidInventory> = self
                .client
                .query(resource, &[format!("uuid={uuid}")])
                .await?;
            Ok::<bool, Error>(hits.iter().any(|h| h.uuid == uuid))
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let compute = match (
            nonempty(&self.options.instance_offering_uuid),
            backed.and_then(|v| nonempty(&v.instance_offering_uuid)),
        ) {
            (Some(o), _) => {
                if !exists("/instance-offerings", o.clone()).await? {
                    return Err(Error::not_found(format!(
                        "instance offering {o} (provider option instance_offering_uuid) does not exist on the target"
                    )));
                }
                Compute::Offering(o)
            }
            (None, Some(o)) => {
                if !exists("/instance-offerings", o.clone()).await? {
                    return Err(Error::not_found(format!(
                        "instance offering {o} of the backed-up VM does not exist on the target; \
                         set the provider option instance_offering_uuid to one that does"
                    )));
                }
                Compute::Offering(o)
            }
            (None, None) => match backed.map(|v| (v.cpu_num, v.memory_size)) {
                Some((Some(c), Some(m))) if c > 0 && m > 0 => Compute::CpuMemory(c, m),
                _ => {
                    return Err(Error::invalid(
                        "the backup records neither an instance offering nor CPU and memory of the VM; \
                         set the provider option instance_offering_uuid",
                    ));
                }
            },
        };
        let from_options = !self.options.l3_network_uuids.is_empty();
        let l3: Vec<String> = if from_options {
            self.options.l3_network_uuids.clone()
        } else {
            let mut nics: Vec<_> = backed.map(|v| v.vm_nics.clone()).unwrap_or_default();
            nics.sort_by_key(|n| n.device_id.unwrap_or(u32::MAX));
            let mut l3: Vec<String> = Vec::new();
            if let Some(d) = backed.and_then(|v| nonempty(&v.default_l3_network_uuid)) {
                l3.push(d);
            }
            for n in nics {
                if !n.l3_network_uuid.is_empty() && !l3.contains(&n.l3_network_uuid) {
                    l3.push(n.l3_network_uuid);
                }
            }
            l3
        };
        if l3.is_empty() {
            return Err(Error::invalid(
                "the backup records no L3 network of the VM; set the provider option l3_network_uuids",
            ));
        }
        for n in &l3 {
            if !exists("/l3-networks", n.clone()).await? {
                return Err(Error::not_found(if from_options {
                    format!(
                        "L3 network {n} (provider option l3_network_uuids) does not exist on the target"
                    )
                } else {
                    format!(
                        "L3 network {n} of the backed-up VM does not exist on the target; \
                         set the provider option l3_network_uuids to networks that do"
                    )
                }));
            }
        }
        Ok(VmShape {
            compute,
            l3_network_uuids: l3,
        })
    }

    /// Creates the VM and its data volumes. While this runs, the VM's and
    /// the volumes' descriptions carry the restore's tag (so that a job
    /// that dies here leaves objects the next `job_init` sweeps); once
    /// every volume is attached, the tags are replaced by plain
    /// descriptions, the VM's last. A VM without the tag is a finished
    /// restore and is never swept.
    async fn create_restored_vm(&self, st: &RestoreState) -> Result<()> {
        let root = st
            .meta
            .volumes
            .iter()
            .find(|v| v.kind == "Root")
            .and_then(|v| st.images.get(&v.device))
            .ok_or_else(|| {
                Error::invalid("the backup has no root volume image to create the VM from")
            })?;
        let in_progress = format!("vmbackup restore in progress ({})", st.tag.prefix());
        let mut params = json!({"name": st.name, "imageUuid": root.0, "resourceUuid": st.vm_uuid,
                                "l3NetworkUuids": st.shape.l3_network_uuids,
                                "defaultL3NetworkUuid": st.shape.l3_network_uuids.first(),
                                "description": format!("restored from {}: {in_progress}", st.meta.vm_uuid)});
        match &st.shape.compute {
            Compute::Offering(o) => params["instanceOfferingUuid"] = json!(o),
            Compute::CpuMemory(c, m) => {
                params["cpuNum"] = json!(c);
                params["memorySize"] = json!(m);
            }
        }
        self.client
            .call(
                Method::POST,
                "/vm-instances",
                Some(json!({"params": params, "systemTags": [], "userTags": []})),
                "CreateVmInstance",
            )
            .await?;
        let mut data: Vec<&VolumeMeta> = st
            .meta
            .volumes
            .iter()
            .filter(|v| v.kind != "Root")
            .collect();
        data.sort_by_key(|v| v.device_id);
        let mut created = Vec::new();
        for v in data {
            let (image, _) = st
                .images
                .get(&v.device)
                .ok_or_else(|| Error::invalid(format!("volume {} was not restored", v.device)))?;
            let vol: InventoryAnswer<VolumeInventory> = self
                .client
                .call_as(
                    Method::POST,
                    &format!("/volumes/data/from/data-volume-templates/{image}"),
                    Some(
                        json!({"params": {"name": format!("{}-{}", st.name, v.device),
                                           "description": in_progress},
                                "systemTags": [], "userTags": []}),
                    ),
                    "CreateDataVolumeFromVolumeTemplate",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
            let vol_uuid = vol.inventory.uuid;
            self.client
                .call(
                    Method::POST,
                    &format!("/volumes/{vol_uuid}/vm-instances/{}", st.vm_uuid),
                    None,
                    "AttachDataVolumeToVm",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
            created.push((vol_uuid, v));
        }
        for (vol_uuid, v) in created {
            self.client
                .call(
                    Method::PUT,
                    &format!("/volumes/{vol_uuid}/actions"),
                    Some(json!({"updateVolume": {"description": format!(
                        "vmbackup: volume {} of VM {} restored", v.device, st.meta.vm_uuid)}})),
                    "UpdateVolume",
                )
                .await
                .map_err(|e| e.volume(&v.device))?;
        }
        self.client
            .call(
                Method::PUT,
                &format!("/vm-instances/{}/actions", st.vm_uuid),
                Some(json!({"updateVmInstance": {"description": format!("restored from {}", st.meta.vm_uuid)}})),
                "UpdateVmInstance",
            )
            .await?;
        Ok(())
    }

    /// Removes what a failed restore created: the VM (with its attached
    /// volumes), data volumes not attached yet, uploaded images.
    async fn undo_restore(&self, st: &RestoreState) {
        if let Err(e) = self.destroy_vm(&st.vm_uuid).await {
            tracing::warn!(error = %e.report(), "destroying the VM of a failed restore");
        }
        let prefix = st.tag.prefix();
        let vols: Result<Vec<VolumeInventory>> = self
            .client
            .query(
                "/volumes",
                &[format!("description~=%{}%", like_escape(&prefix))],
            )
            .await;
        match vols {
            Ok(vols) => {
                for v in vols {
                    let exact = v
                        .description
                        .as_deref()
                        .is_some_and(|d| d.split([' ', '(', ')']).any(|w| w == prefix));
                    if exact && let Err(e) = self.delete_volume(&v.uuid).await {
                        tracing::warn!(error = %e.report(), "deleting a volume of a failed restore");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.report(), "finding the volumes of a failed restore")
            }
        }
        if let Err(e) = self.sweep(&st.tag).await {
            tracing::warn!(error = %e.report(), "removing the images of a failed restore");
        }
    }

    /// A kept restore image loses the restore's tag (it is no longer
    /// temporary); when renaming fails it is removed instead (it is only
    /// there to be reused).
    async fn keep_image(&self, st: &RestoreState, device: &str, image: &str) -> Result<()> {
        let renamed = self
            .client
            .call(
                Method::PUT,
                &format!("/images/{image}/actions"),
                Some(json!({"updateImage": {
                    "name": format!("{KEPT_PREFIX}{}-{device}", short(&marker_safe(&st.meta.vm_uuid))),
                    "description": format!("vmbackup: volume {device} of VM {} (kept for later restores)", st.meta.vm_uuid)}})),
                "UpdateImage",
            )
            .await;
        if let Err(e) = renamed {
            tracing::warn!(error = %e.report(), image, "renaming a kept restore image failed; removing it");
            self.drop_image(image).await?;
        }
        Ok(())
    }

    pub(super) async fn restore_vm_init_inner(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let name = match &request.target {
            RestoreTarget::NewGuest { name } => name.clone(),
            _ => return Err(Error::unsupported("restore in place")),
        };
        let (meta, backed) = if request.archive.is_foreign_to(self.provider_name()) {
            foreign(request)?
        } else {
            let meta: Metadata =
                serde_json::from_value(request.archive.metadata.clone()).map_err(|e| {
                    Error::new(
                        ErrorKind::Corrupt,
                        "the snapshot's ZStack metadata does not parse",
                    )
                    .with_source(e)
                })?;
            // The guest configuration is the backed-up VM's inventory.
            let backed: Option<VmInventory> = request
                .archive
                .guest_config
                .as_ref()
                .and_then(|c| serde_json::from_slice(&c.data).ok());
            (meta, backed)
        };
        self.client.ensure_session().await?;
        let shape = self.vm_shape(backed.as_ref()).await?;
        let bs = match &self.options.backup_storage_uuid {
            Some(b) => b.clone(),
            None => self.backup_storage().await?,
        };
        let mut needed = 0;
        for v in &meta.volumes {
            if self.reusable_image(v).await?.is_none() {
                needed += 1;
            }
        }
        self.check_quota(needed, "this restore").await?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let vm_uuid = new_uuid(n);
        let name = name.unwrap_or_else(|| format!("{}-restored", meta.vm_name));
        let marker = self.marker_or(&format!("restore-{}", short(&vm_uuid)));
        let tag = Tag::new(&marker, format!("r{n}-{}", short(&vm_uuid)));
        self.restores.insert(
            &vm_uuid,
            RestoreState {
                vm_uuid: vm_uuid.clone(),
                name: name.clone(),
                tag,
                meta,
                images: BTreeMap::new(),
                bs,
                shape,
            },
        );
        Ok(Guest {
            id: provider_api::GuestId(vm_uuid),
            kind: GuestKind::Vm,
            name: Some(name),
        })
    }

    pub(super) async fn restore_vm_volume_init_inner(
        &self,
        request: &RestoreVolumeRequest,
    ) -> Result<VolumeImport> {
        let device = request.volume.volume.device.clone();
        let (meta, tag, bs, platform) = self.restore_state(&request.guest, |st| {
            (
                st.meta.volumes.iter().find(|v| v.device == device).cloned(),
                st.tag.clone(),
                st.bs.clone(),
                st.meta.platform.clone(),
            )
        })?;
        let meta = meta.ok_or_else(|| {
            Error::not_found("the metadata does not list this volume").volume(&device)
        })?;
        if let Some(uuid) = self.reusable_image(&meta).await? {
            tracing::info!(device, image = %uuid, "reusing an image with the same md5 and size");
            self.restore_state(&request.guest, |st| {
                st.images.insert(device.clone(), (uuid, false))
            })?;
            return Ok(VolumeImport::default());
        }
        let media = if meta.kind == "Root" {
            "RootVolumeTemplate"
        } else {
            "DataVolumeTemplate"
        };
        let platform = if platform.is_empty() {
            "Linux".to_string()
        } else {
            platform
        };
        let url = &request.sources.merged;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            let scheme = url.split("://").next().unwrap_or(url);
            return Err(Error::invalid(format!(
                "ZStack's backup storage fetches images over http(s), the host offered a {scheme}:// source: serve restore sources over HTTP (restore_listen, advertise_url)"
            ))
            .volume(&device));
        }
        // What the error names: where the backup storage was sent (the
        // one-time path is left out).
        let site = url
            .split_once("://")
            .map(|(scheme, rest)| format!("{scheme}://{}", rest.split('/').next().unwrap_or("")))
            .unwrap_or_default();
        let inv: InventoryAnswer<ImageInventory> = self
            .client
            .call_as_within(
                Method::POST,
                "/images",
                Some(json!({"params": {
                    "name": tag.name(&device),
                    "url": url,
                    "mediaType": media,
                    "format": "raw",
                    "platform": platform,
                    "system": false,
                    "backupStorageUuids": [bs],
                    "description": format!("vmbackup restore of volume {} of VM {}", meta.uuid, request.volume.volume.device),
                }, "systemTags": [], "userTags": []})),
                "AddImage",
                self.job_timeout_for(meta.size),
            )
            .await
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!(
                        "ZStack's backup storage could not fetch the restore source from {site} (the advertised restore address; check advertise_url and that the backup storage host reaches it)"
                    ),
                )
                .with_source(e)
                .volume(&device)
            })?;
        let img = inv.inventory;
        let uuid = img.uuid;
        self.restore_state(&request.guest, |st| {
            st.images.insert(device.clone(), (uuid.clone(), true))
        })?;
        if img.size != meta.size {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "restored image {uuid} has {} bytes, the backup {}",
                    img.size, meta.size
                ),
            )
            .volume(&device));
        }
        // Compared when ZStack computed it (it may say "not calculated").
        let md5 = img.md5_sum.unwrap_or_default();
        if meta.md5.len() == 32 && md5.len() == 32 && md5 != meta.md5 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "restored image {uuid} has md5 {md5}, the backup {}",
                    meta.md5
                ),
            )
            .volume(&device));
        }
        Ok(VolumeImport::default())
    }

    pub(super) async fn restore_vm_volume_cleanup_inner(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        if outcome.is_success() {
            return Ok(());
        }
        let (tag, uploaded) = self.restore_state(guest, |st| {
            let uploaded = st.images.remove(device).filter(|(_, up)| *up);
            (st.tag.clone(), uploaded)
        })?;
        // Also finds an image whose AddImage job never reported back.
        let name = tag.name(device);
        let images: Vec<ImageInventory> = self
            .client
            .query("/images", &[format!("name={name}")])
            .await?;
        let mut doomed: Vec<String> = images
            .into_iter()
            .filter(|i| i.name == name)
            .map(|i| i.uuid)
            .collect();
        doomed.extend(uploaded.map(|(uuid, _)| uuid));
        doomed.sort();
        doomed.dedup();
        for uuid in doomed {
            self.drop_image(&uuid).await.map_err(|e| e.volume(device))?;
        }
        Ok(())
    }

    pub(super) async fn restore_vm_cleanup_inner(
        &self,
        guest: &Guest,
        outcome: &Outcome,
    ) -> Result<()> {
        let Some(st) = self.restores.take(&guest.id) else {
            return Ok(());
        };
        let mut result = Ok(());
        if outcome.is_success() {
            result = self
                .create_restored_vm(&st)
                .await
                .map_err(|e| e.guest(&guest.id));
        }
        if result.is_err() || !outcome.is_success() {
            self.undo_restore(&st).await;
            return result;
        }
        // The VM exists: what remains is only the uploaded images, whose
        // names carry the restore's tag until kept or removed.
        for (device, (image, uploaded)) in &st.images {
            if !*uploaded {
                continue;
            }
            let r = if self.options.keep_restore_images {
                self.keep_image(&st, device, image).await
            } else {
                self.drop_image(image).await
            };
            // The restore itself succeeded; an image left here still has
            // the tag and is swept by a later job.
            if let Err(e) = r {
                tracing::warn!(error = %e.report(), image, "an uploaded image is left; the next job sweeps it");
            }
        }
        result
    }
}
