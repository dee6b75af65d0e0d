//! Restore: a new VM from the saved OVF, or in place; each disk written
//! through the appliance.
//!
//! A new VM is created last. `restore_vm_init` checks that the name is
//! free, reads the saved OVF and picks the new VM's id, creating nothing;
//! each volume is a new disk (`POST /disks` on the storage domain),
//! attached to the appliance, written and detached. On success
//! `restore_vm_cleanup` rewrites the OVF ([`crate::ovf::rewrite`]: the new
//! VM id, the new disk ids, the disks not restored left out, so that the
//! engine, which attaches every disk the OVF names, never takes one of the
//! source's), adds the VM from it, attaches what the engine did not and
//! checks the attachments. The id is chosen here rather than with
//! `initialization.regenerate_ids`: the `Guest` returned before the VM
//! exists names it, a lost answer to `POST /vms` still leaves a VM the
//! cleanup can find, and the answer is checked against it. A failure at
//! any step detaches what is not the restore's from the new VM, deletes
//! the VM and every disk created.

use super::*;

impl OvirtProvider {
    pub(super) fn restore_state<R>(
        &self,
        guest: &Guest,
        f: impl FnOnce(&mut RestoreState) -> R,
    ) -> Result<R> {
        self.restores.with(&guest.id, f)
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
        let foreign = request.archive.is_foreign_to(self.provider_name());
        if foreign && !matches!(request.target, RestoreTarget::NewGuest { .. }) {
            return Err(Error::invalid(format!(
                "snapshot {} comes from platform {}: it restores onto oVirt as a new VM only",
                request.archive.snapshot.id, request.archive.snapshot.platform
            )));
        }
        let (meta, spec) = if foreign {
            let (meta, spec) =
                crate::spec::foreign_metadata(request, self.options.storage_domain.as_deref())?;
            (meta, Some(spec))
        } else {
            (metadata_of(&request.archive)?, None)
        };
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
                self.restores.insert(
                    &meta.vm_id,
                    RestoreState {
                        vm_id: meta.vm_id.clone(),
                        new_vm: false,
                        metadata: Some(meta.clone()),
                        ..RestoreState::default()
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
                let ovf = if spec.is_some() {
                    // Built from the spec once the disks exist.
                    String::new()
                } else {
                    let ovf = String::from_utf8(request.guest_config.data.clone())
                        .map_err(|_| Error::invalid("the saved OVF is not UTF-8"))?;
                    crate::ovf::ids(&ovf).map_err(|e| {
                        Error::invalid(format!("the saved OVF cannot be restored from: {e}"))
                    })?;
                    ovf
                };
                let q = format!("/vms?search=name%3D{}", search_value(&name));
                let list: api::Vms = self.client.get_as(&q).await?;
                if let Some(vm) = list.vm.iter().find(|v| v.name == name) {
                    return Err(Error::invalid(format!(
                        "a VM named {name} exists already (id {}): choose another name for the \
                         restored VM",
                        vm.id
                    ))
                    .api_call(format!("GET {q}")));
                }
                let id = crate::ovf::new_uuid();
                self.restores.insert(
                    &id,
                    RestoreState {
                        vm_id: id.clone(),
                        new_vm: true,
                        metadata: Some(meta),
                        name: name.clone(),
                        ovf,
                        foreign: spec.map(|s| (s, request.warnings.clone())),
                        ..RestoreState::default()
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
                self.restore_state(guest, |s| s.created.push(d.id.clone()))?;
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
        let (vm_id, new_vm, disk) = self.restore_state(guest, |s| {
            (s.vm_id.clone(), s.new_vm, s.disks.get(device).cloned())
        })?;
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
        if !outcome.is_success() {
            tracing::warn!(guest = %guest.id, device, "volume restore failed");
        }
        if new_vm {
            // The VM does not exist yet: the disk waits for it (and is
            // deleted if the restore fails).
            let detached = first.is_none();
            self.restore_state(guest, |s| {
                if detached {
                    s.disks.remove(device);
                    if outcome.is_success() {
                        let mut d = disk.clone();
                        d.attached_to_appliance = false;
                        s.restored.insert(device.to_string(), d);
                    }
                }
            })?;
        } else {
            // The disk goes back where it was.
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
            self.restore_state(guest, |s| {
                s.disks.remove(device);
            })?;
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e.volume(device).guest(&guest.id)),
        }
    }

    pub(super) async fn cleanup_restore(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(mut st) = self.restores.take(&guest.id) else {
            return Ok(());
        };
        if !st.new_vm {
            return Ok(());
        }
        if outcome.is_success() {
            let r = self.create_restored_vm(&mut st).await;
            let Err(e) = r else {
                return Ok(());
            };
            tracing::warn!(guest = %guest.id, error = %e.report(), "creating the restored VM failed; removing what the restore created");
            if let Err(u) = self.undo_new_vm(&st).await {
                tracing::warn!(guest = %guest.id, error = %u.report(), "removing what the restore created failed");
            }
            return Err(e.guest(&guest.id));
        }
        // A failed restore to a new VM leaves no half-restored VM.
        self.undo_new_vm(&st).await.map_err(|e| e.guest(&guest.id))
    }

    /// The new VM from the rewritten OVF, with exactly the restored disks.
    async fn create_restored_vm(&self, st: &mut RestoreState) -> Result<()> {
        if let Some(device) = st.disks.keys().next() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("volume {device} was not cleaned up: its disk is still on the appliance"),
            )
            .volume(device));
        }
        let mut swaps = Vec::new();
        for d in st.restored.values() {
            let disk: Option<api::Disk> =
                found(self.client.get_as(&format!("/disks/{}", d.disk_id)).await)?;
            swaps.push(crate::ovf::Swap {
                original: d.record.disk_id.clone(),
                new: d.disk_id.clone(),
                new_image: disk.and_then(|x| x.image_id),
            });
        }
        let ovf = match &st.foreign {
            Some((spec, warnings)) => {
                let mut disks = Vec::new();
                for (d, swap) in st.restored.values().zip(&swaps) {
                    let image_id = swap.new_image.as_deref().ok_or_else(|| {
                        platform(format!("disk {} has no image id", d.disk_id))
                            .volume(&d.record.device)
                            .api_call(format!("GET /disks/{}", d.disk_id))
                    })?;
                    disks.push(crate::spec::OvfDisk {
                        record: &d.record,
                        disk_id: &d.disk_id,
                        image_id,
                    });
                }
                // In the snapshot's volume order (the boot flag is per disk).
                let order = |device: &str| {
                    st.metadata
                        .as_ref()
                        .and_then(|m| m.disks.iter().position(|r| r.device == device))
                };
                disks.sort_by_key(|d| order(&d.record.device));
                crate::spec::ovf(
                    warnings,
                    spec,
                    &st.vm_id,
                    &st.name,
                    &disks,
                    self.options.network.as_deref(),
                )
            }
            None => {
                let source = st.metadata.as_ref().map(|m| m.vm_id.as_str()).unwrap_or("");
                crate::ovf::rewrite(&st.ovf, &st.vm_id, &swaps, &[source]).map_err(|e| {
                    Error::new(ErrorKind::Corrupt, format!("rewriting the saved OVF: {e}"))
                })?
            }
        };
        st.vm_posted = true;
        let vm: api::Created = self
            .client
            .post_as(
                "/vms",
                "vm",
                json!({
                    "name": st.name,
                    "cluster": {"name": self.options.cluster},
                    "initialization": {"configuration": {"type": "ovf", "data": ovf}},
                }),
            )
            .await?;
        if vm.id != st.vm_id {
            let call = "POST /vms";
            let e = bad_answer(
                call,
                format!(
                    "the OVF gives the VM the id {}, the engine created {}",
                    st.vm_id, vm.id
                ),
            );
            st.answered_vm = Some(vm.id);
            return Err(e);
        }
        let id = st.vm_id.clone();
        let path = format!("/vms/{id}/diskattachments");
        let ours = |disk: &str| st.restored.values().any(|d| d.disk_id == disk);
        let list: api::DiskAttachments = self.client.get_as(&path).await?;
        // Only the restored disks: anything else the engine attached is
        // detached (never deleted: it is not the restore's).
        for a in &list.disk_attachment {
            if !ours(&a.disk.id) {
                tracing::warn!(vm = %id, disk = %a.disk.id, "the engine attached a disk that is not a restored one; detaching it");
                self.client.delete(&format!("{path}/{}", a.disk.id)).await?;
            }
        }
        for d in st.restored.values() {
            let now = list.disk_attachment.iter().find(|a| a.disk.id == d.disk_id);
            let right = now.is_some_and(|a| {
                a.interface == d.record.interface && a.bootable == d.record.bootable
            });
            if right {
                continue;
            }
            if now.is_some() {
                self.client.delete(&format!("{path}/{}", d.disk_id)).await?;
            }
            self.attach_to(&id, &d.disk_id, d.record.bootable, &d.record.interface)
                .await
                .map_err(|e| e.volume(&d.record.device))?;
        }
        let list: api::DiskAttachments = self.client.get_as(&path).await?;
        for d in st.restored.values() {
            let ok = list.disk_attachment.iter().any(|a| {
                a.disk.id == d.disk_id
                    && a.interface == d.record.interface
                    && a.bootable == d.record.bootable
            });
            if !ok {
                return Err(platform(format!(
                    "disk {} is not attached to the restored VM as {} (bootable {})",
                    d.disk_id, d.record.interface, d.record.bootable
                ))
                .volume(&d.record.device)
                .api_call(format!("GET {path}")));
            }
        }
        if let Some(a) = list.disk_attachment.iter().find(|a| !ours(&a.disk.id)) {
            return Err(platform(format!(
                "disk {} that is not a restored disk is attached to the restored VM",
                a.disk.id
            ))
            .api_call(format!("GET {path}")));
        }
        Ok(())
    }

    /// Removes what a restore to a new VM created: its disks off the
    /// appliance, the VM (once what is not the restore's is detached from
    /// it: deleting a VM deletes its disks), every disk created.
    async fn undo_new_vm(&self, st: &RestoreState) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<()>| {
            if let Err(e) = r
                && e.kind() != ErrorKind::NotFound
                && first.is_none()
            {
                first = Some(e);
            }
        };
        if st.disks.values().any(|d| d.attached_to_appliance) {
            match self.appliance().await {
                Ok(appliance) => {
                    for d in st.disks.values().filter(|d| d.attached_to_appliance) {
                        keep(
                            self.client
                                .delete(&format!("/vms/{appliance}/diskattachments/{}", d.disk_id))
                                .await,
                        );
                    }
                }
                Err(e) => keep(Err(e)),
            }
        }
        let mut vms: Vec<&str> = Vec::new();
        if st.vm_posted {
            vms.push(&st.vm_id);
        }
        if let Some(v) = &st.answered_vm {
            vms.push(v);
        }
        for vm in vms {
            let path = format!("/vms/{vm}/diskattachments");
            let list = match found(self.client.get_as::<api::DiskAttachments>(&path).await) {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => {
                    // Not knowing what is attached, the VM is not deleted.
                    keep(Err(e));
                    continue;
                }
            };
            let mut foreign_left = false;
            for a in &list.disk_attachment {
                if !st.created.contains(&a.disk.id) {
                    let r = self.client.delete(&format!("{path}/{}", a.disk.id)).await;
                    if r.as_ref().is_err_and(|e| e.kind() != ErrorKind::NotFound) {
                        foreign_left = true;
                    }
                    keep(r);
                }
            }
            if !foreign_left {
                keep(self.client.delete(&vm_path(vm)).await);
            }
        }
        for d in &st.created {
            keep(self.client.delete(&format!("/disks/{d}")).await);
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// A value for `search=name=…`: characters other than letters, digits and
/// `-_.` percent-encoded.
fn search_value(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
