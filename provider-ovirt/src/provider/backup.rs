//! Backup: snapshot attach and incremental (4.4 backups, image transfers
//! served over NBD), finishing and cleaning up.

use super::*;

impl OvirtProvider {
    /// The VM's own disks with their attachment settings, checked.
    pub(super) async fn vm_disks(&self, vm_id: &str) -> Result<Vec<DiskRecord>> {
        let list: api::DiskAttachments = self
            .client
            .get_as(&format!("/vms/{vm_id}/diskattachments"))
            .await?;
        let mut out: Vec<DiskRecord> = Vec::new();
        for a in list.disk_attachment {
            if a.disk.snapshot.is_some() {
                continue; // a disk snapshot attached for backup: never backed up
            }
            let disk_id = a.disk.id;
            let dcall = format!("GET /disks/{disk_id}");
            let d: api::Disk = self.client.get_as(&format!("/disks/{disk_id}")).await?;
            if d.id != disk_id {
                return Err(bad_answer(
                    &dcall,
                    format!("asked for disk {disk_id}, got disk {}", d.id),
                ));
            }
            let (size, format, alias) = (d.provisioned_size, d.format, d.alias);
            if format != "raw" && format != "cow" {
                return Err(Error::invalid(format!(
                    "disk {alias} has the unknown format {format:?} (expected raw or cow)"
                ))
                .volume(&alias)
                .api_call(&dcall));
            }
            out.push(DiskRecord {
                device: String::new(),
                disk_id: disk_id.clone(),
                alias,
                provisioned_size: size,
                format,
                sparse: d.sparse,
                // Absent before 4.4, where no disk has incremental backup.
                backup: d.backup.unwrap_or_else(|| "none".into()),
                interface: a.interface,
                bootable: a.bootable,
                storage_domain: d
                    .storage_domains
                    .storage_domain
                    .into_iter()
                    .find_map(|s| s.id.or(s.name)),
            });
        }
        // Device names: the alias when unique and safe, else the disk id.
        let mut counts: HashMap<String, usize> = HashMap::new();
        for d in &out {
            *counts.entry(d.alias.clone()).or_default() += 1;
        }
        for d in &mut out {
            let safe = !d.alias.is_empty()
                && d.alias
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            d.device = if safe && counts[&d.alias] == 1 {
                d.alias.clone()
            } else {
                d.disk_id.clone()
            };
        }
        Ok(out)
    }

    /// The VM described platform-neutrally, its NICs from
    /// `GET /vms/{id}/nics` and their vNIC profiles' names from
    /// `GET /vnicprofiles/{id}`. The NICs are for restores elsewhere only:
    /// when the engine does not list them, the spec has none and the
    /// backup goes on with a warning.
    pub(super) async fn spec_of(
        &self,
        guest: &Guest,
        vm: &api::Vm,
        disks: &[DiskRecord],
    ) -> GuestSpec {
        let nics = async {
            let nics: api::Nics = self.client.get_as(&format!("/vms/{}/nics", vm.id)).await?;
            let mut profiles = Vec::new();
            for id in nics
                .nic
                .iter()
                .filter_map(|n| n.vnic_profile.as_ref().and_then(|p| p.id.clone()))
            {
                if profiles.iter().any(|(i, _)| *i == id) {
                    continue;
                }
                let p: api::Named = self.client.get_as(&format!("/vnicprofiles/{id}")).await?;
                if let Some(name) = p.name {
                    profiles.push((id, name));
                }
            }
            Ok::<_, Error>((nics.nic, profiles))
        }
        .await;
        let (nics, profiles) = match nics {
            Ok(n) => n,
            Err(e) => {
                let w = format!(
                    "the VM's NICs could not be read ({}): the stored guest spec has none",
                    e.report()
                );
                let _ = self.state(guest, |s| s.warnings.push(w));
                Default::default()
            }
        };
        crate::spec::of_vm(vm, disks, &nics, &profiles)
    }

    /// The VM (`GET /vms/{id}?all_content=true`) and its OVF.
    pub(super) async fn ovf(&self, vm_id: &str) -> Result<(api::Vm, ConfigBlob)> {
        let call = format!("GET /vms/{vm_id}");
        let mut vm: api::Vm = self
            .client
            .get_as(&format!("/vms/{vm_id}?all_content=true"))
            .await?;
        let data = vm
            .initialization
            .take()
            .map(|i| i.configuration.data)
            .ok_or_else(|| {
                bad_answer(
                    &call,
                    "missing field `initialization` (the OVF, asked for with all_content=true)"
                        .into(),
                )
            })?;
        client::xml_to_value(&data)
            .map_err(|e| bad_answer(&call, format!("the OVF is not valid XML: {e}")))?;
        Ok((
            vm,
            ConfigBlob {
                content_type: "application/ovf+xml".into(),
                data: data.into_bytes(),
            },
        ))
    }

    // ---------------------------------------------------- snapshot attach

    pub(super) async fn backup_snapshot_attach(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
    ) -> Result<Vec<VolumeAccess>> {
        let appliance = self.appliance().await?;
        let snap: api::Created = self
            .client
            .post_as(
                &format!("/vms/{vm_id}/snapshots"),
                "snapshot",
                json!({"description": tag, "persist_memorystate": false}),
            )
            .await?;
        let sid = snap.id;
        self.state(guest, |s| s.snapshot_id = Some(sid.clone()))?;
        let spath = format!("/vms/{vm_id}/snapshots/{sid}");
        let scall = format!("GET {spath}");
        self.poll(&format!("snapshot {sid} stayed locked"), &scall, || async {
            let s: api::Snapshot = self.client.get_as(&spath).await?;
            match s.snapshot_status.as_str() {
                "ok" => Ok(Some(())),
                "locked" | "in_preview" => Ok(None),
                other => Err(platform(format!("snapshot {sid} is {other}")).api_call(&scall)),
            }
        })
        .await?;
        let dcall = format!("GET {spath}/disks");
        let sdisks: api::SnapshotDisks = self.client.get_as(&format!("{spath}/disks")).await?;
        let in_snapshot: Vec<String> = sdisks.disk.into_iter().map(|d| d.id).collect();
        let mut volumes = Vec::new();
        for d in disks {
            if !in_snapshot.contains(&d.disk_id) {
                return Err(bad_answer(
                    &dcall,
                    format!("snapshot {sid} has no image of disk {}", d.disk_id),
                )
                .volume(&d.device));
            }
            self.client
                .post(
                    &format!("/vms/{appliance}/diskattachments"),
                    "disk_attachment",
                    json!({
                        "disk": {"id": d.disk_id, "snapshot": {"id": sid}},
                        "active": true,
                        "bootable": false,
                        "interface": "virtio",
                    }),
                )
                .await
                .map_err(|e| e.volume(&d.device))?;
            self.state(guest, |s| s.attached.push(d.disk_id.clone()))?;
            let path = self
                .wait_device(&d.disk_id, None)
                .await
                .map_err(|e| e.volume(&d.device))?;
            volumes.push(VolumeAccess::new(
                d.volume(),
                SnapshotAccess::FileHandle(FileAccess::new(path)),
            ));
        }
        Ok(volumes)
    }

    // -------------------------------------------------------- incremental

    pub(super) async fn start_backup(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
        from: Option<&str>,
    ) -> Result<api::Backup> {
        let mut body = json!({
            "description": tag,
            "disks": {"disk": disks.iter().map(|d| json!({"id": d.disk_id})).collect::<Vec<_>>()},
        });
        if let Some(f) = from {
            body["from_checkpoint_id"] = json!(f);
        }
        let b: api::Created = self
            .client
            .post_as(&format!("/vms/{vm_id}/backups"), "backup", body)
            .await?;
        let bid = b.id;
        self.state(guest, |s| s.backup_id = Some(bid.clone()))?;
        let path = format!("/vms/{vm_id}/backups/{bid}");
        let pcall = format!("GET {path}");
        self.poll(
            &format!("backup {bid} did not get ready"),
            &pcall,
            || async {
                let b: api::Backup = self.client.get_as(&path).await?;
                match b.phase.as_str() {
                    "ready" => Ok(Some(b)),
                    "failed" | "succeeded" => Err(platform(format!(
                        "backup {bid} ended before it was ready ({})",
                        b.phase
                    ))
                    .api_call(&pcall)),
                    _ => Ok(None),
                }
            },
        )
        .await
    }

    pub(super) async fn open_transfer(
        &self,
        guest: &Guest,
        disk: &DiskRecord,
        backup_id: &str,
        tag: &str,
    ) -> Result<api::ImageTransfer> {
        let t: api::Created = self
            .client
            .post_as(
                "/imagetransfers",
                "image_transfer",
                json!({
                    "description": tag,
                    "disk": {"id": disk.disk_id},
                    "backup": {"id": backup_id},
                    "direction": "download",
                    "format": "raw",
                    "inactivity_timeout": 3600,
                }),
            )
            .await?;
        let tid = t.id;
        self.state(guest, |s| s.transfers.push(tid.clone()))?;
        let path = format!("/imagetransfers/{tid}");
        let pcall = format!("GET {path}");
        self.poll(
            &format!("image transfer {tid} did not start"),
            &pcall,
            || async {
                let t: api::ImageTransfer = self.client.get_as(&path).await?;
                match t.phase.as_str() {
                    "transferring" => Ok(Some(t)),
                    "initializing" | "resuming" => Ok(None),
                    other => {
                        Err(platform(format!("image transfer {tid} is {other}")).api_call(&pcall))
                    }
                }
            },
        )
        .await
    }

    /// Exposes one disk's transfer on this backup's loopback NBD server
    /// ([`imageio::ImageioExport`]): `OPTIONS` on the transfer URL once;
    /// with `extents` offered, its `extents?context=zero` as
    /// `base:allocation`; with `dirty_since` (the checkpoint the host reads
    /// the changes since), `extents?context=dirty` as
    /// `qemu:dirty-bitmap:<checkpoint>`. Both lists are checked to cover
    /// every byte of the disk in order: a region an answer skipped would
    /// be taken for unchanged or zero and its data lost.
    pub(super) async fn serve_disk(
        &self,
        guest: &Guest,
        transfer: &api::ImageTransfer,
        disk: &DiskRecord,
        dirty_since: Option<&str>,
    ) -> Result<NbdAccess> {
        let url = transfer.url(&format!("GET /imagetransfers/{}", transfer.id))?;
        let features = self.client.image_features(url).await?;
        let extents = features.iter().any(|f| f == "extents");
        if !extents && dirty_since.is_some() {
            return Err(platform(format!(
                "the image server at {url} does not offer extents (OPTIONS lists {features:?}): \
                 the changed regions of disk {} cannot be read",
                disk.alias
            ))
            .api_call(format!("OPTIONS {url}")));
        }
        let size = disk.provisioned_size;
        // The dirty extents first: the changes are what an incremental
        // cannot do without.
        let dirty = match dirty_since {
            Some(checkpoint) => {
                let what = "/images/{ticket}/extents?context=dirty";
                let list: Vec<api::DirtyExtent> = self
                    .client
                    .image_json(&format!("{url}/extents?context=dirty"), what)
                    .await?;
                let list: Vec<(u64, u64, u32)> = list
                    .iter()
                    .map(|e| (e.start, e.length, imageio::dirty_flags(e.dirty)))
                    .collect();
                Some((
                    format!("qemu:dirty-bitmap:{checkpoint}"),
                    imageio::extents(&format!("GET {what}"), &list, size)?,
                ))
            }
            None => None,
        };
        let allocation = if extents {
            let what = "/images/{ticket}/extents?context=zero";
            let list: Vec<api::ZeroExtent> = self
                .client
                .image_json(&format!("{url}/extents?context=zero"), what)
                .await?;
            let list: Vec<(u64, u64, u32)> = list
                .iter()
                .map(|e| (e.start, e.length, imageio::allocation_flags(e.zero, e.hole)))
                .collect();
            Some(imageio::extents(&format!("GET {what}"), &list, size)?)
        } else {
            tracing::info!(guest = %guest.id, device = %disk.device, "the image server offers no extents: every byte is read");
            None
        };
        let context = dirty.as_ref().map(|(c, _)| c.clone());
        let export = imageio::ImageioExport::new(
            self.client.clone(),
            url,
            &disk.device,
            size,
            allocation,
            dirty,
        );
        let address = self.serving(guest).await?;
        self.state(guest, |s| {
            if let Some(sv) = &s.serving {
                sv.add(&disk.device, Arc::new(export));
            }
        })?;
        Ok(NbdAccess::new(
            NbdAddress::Tcp {
                host: address.ip().to_string(),
                port: address.port(),
            },
            disk.device.clone(),
        )
        .with_dirty_bitmap(context))
    }

    /// This backup's loopback NBD server, started on first use.
    pub(super) async fn serving(&self, guest: &Guest) -> Result<std::net::SocketAddr> {
        if let Some(a) = self.state(guest, |s| s.serving.as_ref().map(|sv| sv.address()))? {
            return Ok(a);
        }
        let sv = provider_kit::http_export::LoopbackNbd::start().await?;
        let address = sv.address();
        // Recorded before any export is added: `backup_cleanup` closes it.
        self.state(guest, |s| s.serving = Some(sv))?;
        Ok(address)
    }

    pub(super) async fn backup_incremental(
        &self,
        guest: &Guest,
        vm_id: &str,
        tag: &str,
        disks: &[DiskRecord],
        request: &BackupVmRequest,
    ) -> Result<Vec<VolumeAccess>> {
        use BitmapMode::{New, Use};
        let mut warnings = Vec::new();
        // Each disk's mode as the host will apply it: a Use the host turns
        // into a full read (a disk resized since the previous backup, ...)
        // is a full read here too, so that the whole disk is exposed.
        let mut modes: BTreeMap<String, BitmapMode> = BTreeMap::new();
        for d in disks {
            let provided = match request.mode(&d.device) {
                Use if d.incremental() => Use,
                _ if d.incremental() => New,
                _ => BitmapMode::None,
            };
            let (mode, why) = request.host_mode_why(&d.device, d.provisioned_size, provided);
            if provided == Use && mode != Use {
                warnings.push(format!(
                    "volume {}: {}; full backup",
                    d.device,
                    why.unwrap_or("the host reads it in full")
                ));
            }
            modes.insert(d.device.clone(), mode);
        }
        // The checkpoint the Use volumes start from (one per VM).
        let from = request.previous.as_ref().and_then(|p| {
            disks
                .iter()
                .filter(|d| modes[&d.device] == Use)
                .find_map(|d| p.snapshot.volume(&d.device)?.checkpoint.clone())
        });
        if from.is_none() {
            for (device, m) in modes.iter_mut().filter(|(_, m)| **m == Use) {
                warnings.push(format!(
                    "volume {device}: the previous backup has no checkpoint for it; full backup"
                ));
                *m = New;
            }
        }
        let uses = modes.values().any(|m| *m == Use);
        let from = from.filter(|_| uses).map(|c| c.0);
        let backup = match self
            .start_backup(guest, vm_id, tag, disks, from.as_deref())
            .await
        {
            Ok(b) => b,
            Err(e) if from.is_some() && e.kind() == ErrorKind::InvalidInput => {
                // The checkpoint went invalid between the query and now.
                let bid = self.state(guest, |s| s.backup_id.take())?;
                if let Some(bid) = bid {
                    self.finish_backup(vm_id, &bid, &[]).await?;
                }
                warnings.push(format!(
                    "checkpoint {} refused by the engine ({}); full backup",
                    from.as_deref().unwrap_or_default(),
                    e.message()
                ));
                for m in modes.values_mut() {
                    if *m == Use {
                        *m = New;
                    }
                }
                self.start_backup(guest, vm_id, tag, disks, None).await?
            }
            Err(e) => return Err(e),
        };
        for w in &warnings {
            tracing::warn!(guest = %guest.id, "{w}");
        }
        self.state(guest, |s| s.warnings.extend(warnings))?;
        // The checkpoint the dirty extents are relative to.
        let since = from
            .as_deref()
            .filter(|_| modes.values().any(|m| *m == Use));
        let mut volumes = Vec::new();
        for d in disks {
            let t = self
                .open_transfer(guest, d, &backup.id, tag)
                .await
                .map_err(|e| e.volume(&d.device))?;
            let mode = modes[&d.device];
            // The API model has no NBD access to a transfer: serve it on
            // loopback NBD, read from the image server on demand.
            let access = self
                .serve_disk(guest, &t, d, since.filter(|_| mode == Use))
                .await
                .map_err(|e| e.volume(&d.device))?;
            let dirty = if mode == Use {
                DirtySource::NbdBitmap
            } else {
                DirtySource::All
            };
            let checkpoint = if d.incremental() {
                backup.to_checkpoint_id.clone().map(Checkpoint)
            } else {
                None
            };
            volumes.push(
                VolumeAccess::new(d.volume(), SnapshotAccess::Nbd(access))
                    .bitmap_mode(mode)
                    .dirty(dirty)
                    .checkpoint(checkpoint),
            );
        }
        Ok(volumes)
    }

    /// Finalizes (or cancels) transfers, waits for them, then finalizes
    /// the backup and waits for its end.
    pub(super) async fn finish_backup(
        &self,
        vm_id: &str,
        backup_id: &str,
        transfers: &[String],
    ) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut transfers: Vec<String> = transfers.to_vec();
        // Transfers the engine knows for this backup (lost answers).
        match self
            .client
            .get_as::<api::ImageTransfers>("/imagetransfers")
            .await
        {
            Ok(list) => {
                for t in list.image_transfer {
                    if t.backup.as_ref().is_some_and(|b| b.id == backup_id)
                        && !transfers.contains(&t.id)
                    {
                        transfers.push(t.id);
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        for tid in &transfers {
            if let Err(e) = self.finish_transfer(tid).await {
                first.get_or_insert(e);
            }
        }
        let path = format!("/vms/{vm_id}/backups/{backup_id}");
        let backup: api::Backup = match found(self.client.get_as(&path).await) {
            Ok(Some(b)) => b,
            Ok(None) => return first.map_or(Ok(()), Err),
            Err(e) => return Err(first.unwrap_or(e)),
        };
        if !backup.ended()
            && backup.phase != "finalizing"
            && let Err(e) = self
                .client
                .post(&format!("{path}/finalize"), "action", json!({}))
                .await
        {
            return Err(first.unwrap_or(e));
        }
        let call = format!("GET {path}");
        let r = self
            .poll(
                &format!("backup {backup_id} did not end"),
                &call,
                || async {
                    let b: api::Backup = self.client.get_as(&path).await?;
                    Ok(b.ended().then_some(()))
                },
            )
            .await;
        match (first, r) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(()),
        }
    }

    /// Finalizes (or, when that is refused, cancels) one image transfer
    /// and waits until it has ended; a transfer that is gone is done.
    pub(super) async fn finish_transfer(&self, tid: &str) -> Result<()> {
        let path = format!("/imagetransfers/{tid}");
        let Some(t) = found(self.client.get_as::<api::ImageTransfer>(&path).await)? else {
            return Ok(());
        };
        if !t.ended() && t.phase != "finalizing_success" {
            let r = self
                .client
                .post(&format!("{path}/finalize"), "action", json!({}))
                .await;
            if let Err(e) = r {
                self.client
                    .post(&format!("{path}/cancel"), "action", json!({}))
                    .await
                    .map_err(|_| e)?;
            }
        }
        let call = format!("GET {path}");
        self.poll(
            &format!("image transfer {tid} did not finish"),
            &call,
            || async {
                Ok(
                    found(self.client.get_as::<api::ImageTransfer>(&path).await)?
                        .is_none_or(|t| t.ended())
                        .then_some(()),
                )
            },
        )
        .await
    }

    /// Detaches the disks of `snapshots` (and `also`) from the appliance.
    pub(super) async fn detach_snapshot_disks(
        &self,
        snapshots: &[String],
        also: &[String],
        errors: &mut Vec<Error>,
    ) {
        let app = match self.appliance().await {
            Ok(a) => a,
            Err(e) => return errors.push(e),
        };
        let mut detach: Vec<String> = also.to_vec();
        match self
            .client
            .get_as::<api::DiskAttachments>(&format!("/vms/{app}/diskattachments"))
            .await
        {
            Ok(list) => {
                for a in list.disk_attachment {
                    if a.disk
                        .snapshot
                        .as_ref()
                        .is_some_and(|s| snapshots.contains(&s.id))
                        && !detach.contains(&a.disk.id)
                    {
                        detach.push(a.disk.id);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        for d in detach {
            if let Err(e) = found(
                self.client
                    .delete(&format!("/vms/{app}/diskattachments/{d}"))
                    .await,
            ) {
                errors.push(e);
            }
        }
    }

    pub(super) async fn delete_snapshots(
        &self,
        vm: &str,
        snapshots: &[String],
        errors: &mut Vec<Error>,
    ) {
        for s in snapshots {
            if let Err(e) = found(
                self.client
                    .delete(&format!("/vms/{vm}/snapshots/{s}"))
                    .await,
            ) {
                errors.push(e);
            }
        }
    }

    pub(super) async fn cleanup_guest(&self, st: &BackupState) -> Vec<Error> {
        let mut errors = Vec::new();
        let vm = &st.vm_id;
        // 1. Image transfers and backups (incremental mode).
        let mut backups: Vec<String> = st.backup_id.iter().cloned().collect();
        if st.mode == BackupMode::Incremental {
            match found(
                self.client
                    .get_as::<api::Backups>(&format!("/vms/{vm}/backups"))
                    .await,
            ) {
                Ok(list) => {
                    for b in list.into_iter().flat_map(|l| l.backup) {
                        if b.description.as_deref() == Some(st.tag.as_str())
                            && !b.ended()
                            && !backups.contains(&b.id)
                        {
                            backups.push(b.id);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for b in &backups {
            if let Err(e) = self.finish_backup(vm, b, &st.transfers).await {
                errors.push(e);
            }
        }
        // 2. Attachments on the appliance (snapshot-attach mode).
        let mut snapshots: Vec<String> = st.snapshot_id.iter().cloned().collect();
        if st.mode == BackupMode::SnapshotAttach {
            match self
                .client
                .get_as::<api::Snapshots>(&format!("/vms/{vm}/snapshots"))
                .await
            {
                Ok(list) => {
                    for s in list.snapshot {
                        if s.description.as_deref() == Some(st.tag.as_str())
                            && !snapshots.contains(&s.id)
                        {
                            snapshots.push(s.id);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
            self.detach_snapshot_disks(&snapshots, &st.attached, &mut errors)
                .await;
        }
        self.delete_snapshots(vm, &snapshots, &mut errors).await;
        errors
    }
}
