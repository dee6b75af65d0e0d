//! Restore: a new VM from the saved OVF, or in place; each disk written
//! through the appliance.

use super::*;

impl OvirtProvider {
    pub(super) fn restore_state<R>(
        &self,
        guest: &Guest,
        f: impl FnOnce(&mut RestoreState) -> R,
    ) -> Result<R> {
        let mut all = lock(&self.restores);
        let st = all.get_mut(&guest.id.0).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "restore_vm_init was not called").guest(&guest.id)
        })?;
        Ok(f(st))
    }

    pub(super) async fn attach_to(
        &self,
        vm: &str,
        disk: &str,
        bootable: bool,
        interface: &str,
    ) -> Result<()> {
        self.client
            .post(
                &format!("/vms/{vm}/diskattachments"),
                "disk_attachment",
                json!({"disk": {"id": disk}, "active": true, "bootable": bootable, "interface": interface}),
            )
            .await
            .map(|_| ())
    }

    pub(super) async fn init_restore(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let meta = metadata_of(&request.archive)?;
        self.appliance().await?;
        match &request.target {
            RestoreTarget::InPlace => {
                let vm: api::Vm = self.client.get_as(&vm_path(&meta.vm_id)).await?;
                let status = vm.status;
                if status != "down" {
                    return Err(Error::new(
                        ErrorKind::Refused,
                        format!(
                            "VM {} is {status}: shut it down before an in-place restore",
                            meta.vm_name
                        ),
                    )
                    .api_call(format!("GET /vms/{}", meta.vm_id)));
                }
                let current = self.vm_disks(&meta.vm_id).await?;
                for d in &meta.disks {
                    let now = current
                        .iter()
                        .find(|c| c.disk_id == d.disk_id)
                        .ok_or_else(|| {
                            Error::not_found(format!(
                                "disk {} is no longer attached to the VM",
                                d.disk_id
                            ))
                            .volume(&d.device)
                        })?;
                    if now.provisioned_size != d.provisioned_size {
                        return Err(Error::invalid(format!(
                            "disk {} is {} bytes now, {} in the backup",
                            d.alias, now.provisioned_size, d.provisioned_size
                        ))
                        .volume(&d.device));
                    }
                }
                lock(&self.restores).insert(
                    meta.vm_id.clone(),
                    RestoreState {
                        vm_id: meta.vm_id.clone(),
                        new_vm: false,
                        metadata: Some(meta.clone()),
                        disks: BTreeMap::new(),
                    },
                );
                Ok(Guest {
                    id: GuestId(meta.vm_id.clone()),
                    kind: GuestKind::Vm,
                    name: Some(meta.vm_name),
                })
            }
            RestoreTarget::NewGuest { name } => {
                let name = name
                    .clone()
                    .unwrap_or_else(|| format!("{}-restored", meta.vm_name));
                let ovf = String::from_utf8(request.guest_config.data.clone())
                    .map_err(|_| Error::invalid("the saved OVF is not UTF-8"))?;
                let vm: api::Created = self
                    .client
                    .post_as(
                        "/vms",
                        "vm",
                        json!({
                            "name": name,
                            "cluster": {"name": self.options.cluster},
                            "template": {"name": "Blank"},
                            "initialization": {"configuration": {"type": "ovf", "data": ovf}},
                        }),
                    )
                    .await?;
                let id = vm.id;
                lock(&self.restores).insert(
                    id.clone(),
                    RestoreState {
                        vm_id: id.clone(),
                        new_vm: true,
                        metadata: Some(meta),
                        disks: BTreeMap::new(),
                    },
                );
                Ok(Guest {
                    id: GuestId(id),
                    kind: GuestKind::Vm,
                    name: Some(name),
                })
            }
            other => Err(Error::unsupported(format!("restore target {other:?}"))),
        }
    }

    pub(super) async fn init_restore_volume(
        &self,
        request: &RestoreVolumeRequest,
    ) -> Result<VolumeImport> {
        let device = request.volume.volume.device.clone();
        let guest = &request.guest;
        let (vm_id, new_vm, record) = self.restore_state(guest, |s| {
            let rec = s
                .metadata
                .as_ref()
                .and_then(|m| m.disks.iter().find(|d| d.device == device).cloned());
            (s.vm_id.clone(), s.new_vm, rec)
        })?;
        let record = record
            .ok_or_else(|| Error::not_found("the backup metadata does not describe this volume"))
            .map_err(|e| e.volume(&device))?;
        let appliance = self.appliance().await?;
        let r = async {
            let disk_id = if new_vm {
                let mut body = json!({
                    "alias": record.alias,
                    "provisioned_size": record.provisioned_size,
                    "format": record.format,
                    "sparse": record.sparse,
                    "backup": record.backup,
                });
                // The option names a domain; the metadata holds the id the
                // engine reported (a name in older metadata).
                let sd = match (&self.options.storage_domain, &record.storage_domain) {
                    (Some(name), _) => Some(json!({"name": name})),
                    (None, Some(id)) if looks_like_uuid(id) => Some(json!({"id": id})),
                    (None, Some(name)) => Some(json!({"name": name})),
                    (None, None) => None,
                };
                if let Some(sd) = sd {
                    body["storage_domains"] = json!({"storage_domain": [sd]});
                }
                let d: api::Created = self.client.post_as("/disks", "disk", body).await?;
                d.id
            } else {
                self.client
                    .delete(&format!("/vms/{vm_id}/diskattachments/{}", record.disk_id))
                    .await?;
                record.disk_id.clone()
            };
            self.restore_state(guest, |s| {
                s.disks.insert(
                    device.clone(),
                    RestoreDisk {
                        disk_id: disk_id.clone(),
                        record: record.clone(),
                        attached_to_appliance: false,
                    },
                )
            })?;
            self.attach_to(&appliance, &disk_id, false, "virtio")
                .await?;
            self.restore_state(guest, |s| {
                if let Some(d) = s.disks.get_mut(&device) {
                    d.attached_to_appliance = true;
                }
            })?;
            let path = self.wait_device(&disk_id, Some(&appliance)).await?;
            Ok(VolumeImport::merged_into(SnapshotAccess::FileHandle(
                FileAccess::new(path),
            )))
        }
        .await;
        r.map_err(|e: Error| e.volume(&device).guest(&guest.id))
    }

    pub(super) async fn cleanup_restore_volume(
        &self,
        guest: &Guest,
        device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        let (vm_id, disk) =
            self.restore_state(guest, |s| (s.vm_id.clone(), s.disks.get(device).cloned()))?;
        let Some(disk) = disk else {
            return Ok(());
        };
        let mut first: Option<Error> = None;
        if disk.attached_to_appliance {
            let appliance = self.appliance().await?;
            match self
                .client
                .delete(&format!(
                    "/vms/{appliance}/diskattachments/{}",
                    disk.disk_id
                ))
                .await
            {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => first = Some(e),
            }
        }
        // The disk goes to the VM: restored, or back where it was.
        if first.is_none()
            && let Err(e) = self
                .attach_to(
                    &vm_id,
                    &disk.disk_id,
                    disk.record.bootable,
                    &disk.record.interface,
                )
                .await
        {
            first = Some(e);
        }
        if !outcome.is_success() {
            tracing::warn!(guest = %guest.id, device, "volume restore failed");
        }
        self.restore_state(guest, |s| {
            s.disks.remove(device);
        })?;
        match first {
            None => Ok(()),
            Some(e) => Err(e.volume(device).guest(&guest.id)),
        }
    }

    pub(super) async fn cleanup_restore(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(st) = lock(&self.restores).remove(&guest.id.0) else {
            return Ok(());
        };
        if outcome.is_success() || !st.new_vm {
            return Ok(());
        }
        // A failed restore to a new VM leaves no half-restored VM.
        let appliance = self.appliance().await?;
        for d in st.disks.values() {
            if d.attached_to_appliance {
                let _ = self
                    .client
                    .delete(&format!("/vms/{appliance}/diskattachments/{}", d.disk_id))
                    .await;
            }
            let _ = self.client.delete(&format!("/disks/{}", d.disk_id)).await;
        }
        self.client
            .delete(&vm_path(&st.vm_id))
            .await
            .map_err(|e| e.guest(&guest.id))
    }
}

pub(super) fn metadata_of(archive: &ArchiveView) -> Result<OvirtMetadata> {
    let m: OvirtMetadata = serde_json::from_value(archive.metadata.clone()).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("snapshot {} has no oVirt metadata", archive.snapshot.id),
        )
        .with_source(e)
    })?;
    for d in &m.disks {
        if d.format != "raw" && d.format != "cow" {
            return Err(Error::invalid(format!(
                "disk {} has the unknown format {:?} (expected raw or cow)",
                d.alias, d.format
            ))
            .volume(&d.device));
        }
    }
    Ok(m)
}
