//! Backup: snapshot, CBT, exposure of each disk and its base image,
//! lease renewal, cleanup.

use super::*;

impl ScpProvider {
    /// Expose one disk (or its base image) of the snapshot.
    pub(super) async fn expose(
        &self,
        guest: &Guest,
        lease: &str,
        snapshot_id: &str,
        disk_id: &str,
        base: bool,
    ) -> Result<SnapshotAccess> {
        let opened = self
            .open_disk(DiskTarget {
                server_id: guest.id.0.clone(),
                disk_id: disk_id.to_owned(),
                snapshot_id: Some(snapshot_id.to_owned()),
                open_base_image: base,
                mode: OpenMode::ReadOnly,
                lease: Some(lease.to_owned()),
            })
            .await?;
        let access = opened.access.clone();
        self.with_backup(guest, |s| s.opened.push(opened));
        Ok(access)
    }

    pub(super) fn with_backup(&self, guest: &Guest, f: impl FnOnce(&mut BackupState)) {
        let mut b = lock(&self.backups);
        f(b.entry(guest.id.0.clone()).or_default());
    }

    pub(super) async fn changed_areas(
        &self,
        guest: &Guest,
        device: &str,
        query: AreaQuery,
        lost: Arc<AtomicBool>,
    ) -> Result<ChangedAreas> {
        let mut c = ChangedAreas {
            client: self.client.clone(),
            guest: guest.id.0.clone(),
            device: device.to_owned(),
            query,
            next_offset: Some(0),
            pending: VecDeque::new(),
            lost,
        };
        c.fetch().await?;
        Ok(c)
    }

    pub(super) async fn base_image_meta(&self, id: &str) -> Result<BaseImageMeta> {
        let images: Vec<BaseImage> = self.client.list(BASE_IMAGES, &[("id", id.into())]).await?;
        let image = images
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| Error::not_found(format!("base image {id} is not listed")))?;
        let bindings: Vec<Binding> = self
            .client
            .list(
                BINDINGS,
                &[
                    ("resource_id", id.into()),
                    ("resource_type", "base_image".into()),
                ],
            )
            .await?;
        let mut custom_attributes = Vec::new();
        for b in &bindings {
            let found: Vec<CustomAttribute> = self
                .client
                .list(ATTRIBUTES, &[("id", b.custom_attribute_id.clone())])
                .await?;
            custom_attributes.extend(found.into_iter().filter(|a| a.id == b.custom_attribute_id));
        }
        Ok(BaseImageMeta {
            image,
            custom_attributes,
            bindings,
        })
    }

    /// Everything of `backup_vm` after the guest's state exists; failures
    /// leave the state for `backup_cleanup`.
    pub(super) async fn backup_vm_inner(
        &self,
        guest: &Guest,
        request: BackupVmRequest,
    ) -> Result<VmBackup> {
        let id = guest.id.0.as_str();
        let server = self.server(id).await?;
        check_backup_allowed(id, &server.name, server.revert_mode)?;
        let version = self.version().await?;
        let mut warnings = Vec::new();

        // CBT: enable or reset it before the snapshot, so that the
        // snapshot's checkpoint is valid for the next incremental.
        let cbt: CbtStatus = self
            .client
            .call(
                Method::GET,
                &format!("/janus/20240725/servers/{id}/cbt/status"),
                &[],
                None,
            )
            .await?;
        let mut force_full = false;
        if cbt.enable != 1 {
            let what = "CBT was not enabled";
            self.reset_cbt(id).await?;
            warnings.push(format!(
                "{what} on VM {} ({id}): CBT reset, full backup instead of incremental",
                server.name
            ));
            force_full = true;
        }

        let lease = self.open_lease(Some(id), "Backup").await?;
        let lease_id = lease.id.clone();
        let lost = lease.lost.clone();
        self.with_backup(guest, |s| s.lease = Some(lease));

        let (mut snapshot, mut conf) = self.take_snapshot(guest).await?;
        if conf.hardware_option.disks.is_empty() {
            return Err(Error::new(
                ErrorKind::Platform,
                format!(
                    "snapshot {} of VM {} lists no disks (vmconf.hardware_option.disks is empty)",
                    snapshot.id, server.name
                ),
            )
            .api_call(format!(
                "GET /janus/20240725/servers/{id}/snapshots/{}",
                snapshot.id
            )));
        }

        let mut volumes = Vec::new();
        let mut disks_meta = Vec::new();
        let mut base_meta = None;
        let desktop = conf.application == "desk";
        let mut retried = false;
        let mut i = 0;
        while i < conf.hardware_option.disks.len() {
            let disk = conf.hardware_option.disks[i].clone();
            let device = disk.device();
            let linked = disk.base_image_id.is_some();
            let policy = base_policy(&version, desktop, linked);
            let planned = request.mode(&device);
            let previous_volume = request
                .previous
                .as_ref()
                .and_then(|p| p.snapshot.volume(&device));
            let previous_checkpoint = previous_volume
                .filter(|v| usable_previous(v, &disk, policy))
                .and_then(|v| v.checkpoint.as_ref())
                .and_then(|c| c.0.parse::<u64>().ok());
            let mut mode = planned;
            if mode == BitmapMode::Use && (force_full || previous_checkpoint.is_none()) {
                if !force_full {
                    warnings.push(format!(
                        "volume {device}: the previous backup cannot serve as a base \
                         (no checkpoint, other size or other base image): full backup"
                    ));
                }
                mode = BitmapMode::New;
            }
            // `checkpoint_id=0`: all the disk's own data (a full read).
            let checkpoint_id = match (mode, previous_checkpoint) {
                (BitmapMode::Use, Some(c)) => c,
                (BitmapMode::Use, None) => {
                    return Err(
                        Error::other("an incremental without the previous checkpoint")
                            .volume(&device),
                    );
                }
                _ => 0,
            };
            let own = AreaQuery {
                server_id: id.to_owned(),
                snapshot_id: snapshot.id.clone(),
                disk_id: disk.id.clone(),
                base_image: false,
                checkpoint_id,
            };
            let regions = match self
                .changed_areas(guest, &device, own.clone(), lost.clone())
                .await
            {
                Ok(r) => r,
                Err(e) if is_cbt_expired(&e) && !retried => {
                    // Expired between the check and the snapshot: reset,
                    // take a new snapshot and read everything.
                    retried = true;
                    self.reset_cbt(id).await?;
                    warnings.push(format!(
                        "The VM CBT has expired on VM {} ({id}): CBT reset, full backup instead of incremental",
                        server.name
                    ));
                    force_full = true;
                    self.delete_snapshot(guest).await?;
                    (snapshot, conf) = self.take_snapshot(guest).await?;
                    volumes.clear();
                    disks_meta.clear();
                    base_meta = None;
                    i = 0;
                    continue;
                }
                Err(e)
                    if mode == BitmapMode::Use
                        && (error_code(&e) == Some(codes::CHECKPOINT_INVALID)
                            || is_cbt_expired(&e)
                            || e.kind() == ErrorKind::NotFound) =>
                {
                    warnings.push(format!(
                        "volume {device}: checkpoint {} of the previous backup is no longer valid ({}): full backup",
                        own.checkpoint_id,
                        e.message()
                    ));
                    mode = BitmapMode::New;
                    self.changed_areas(
                        guest,
                        &device,
                        AreaQuery {
                            checkpoint_id: 0,
                            ..own.clone()
                        },
                        lost.clone(),
                    )
                    .await?
                }
                Err(e) => return Err(e.volume(&device)),
            };

            let mut base = None;
            if let (BasePolicy::Separate { base_cbt }, Some(base_id)) =
                (policy, disk.base_image_id.as_ref())
            {
                let meta = self
                    .base_image_meta(base_id)
                    .await
                    .map_err(|e| e.volume(&device))?;
                let size = meta.image.size;
                base_meta = Some(meta);
                let stored = request
                    .base_images
                    .has_base_image(&BaseImageId(base_id.clone()))
                    .await?;
                // Only full backups read the base image, and only when
                // the target does not hold it yet.
                let access = if mode == BitmapMode::Use || stored {
                    None
                } else {
                    let access = self
                        .expose(guest, &lease_id, &snapshot.id, &disk.id, true)
                        .await
                        .map_err(|e| e.volume(format!("{device} (base image {base_id})")))?;
                    let dirty = if base_cbt {
                        DirtySource::Regions(Box::new(
                            self.changed_areas(guest, &device, own.base(), lost.clone())
                                .await?,
                        ))
                    } else {
                        // Desktop VM below 6.11.3: no base image CBT, read
                        // the whole image.
                        DirtySource::All
                    };
                    Some((access, dirty))
                };
                base = Some(BaseLayer::new(BaseImageId(base_id.clone()), size, access));
            }
            let access = self
                .expose(guest, &lease_id, &snapshot.id, &disk.id, false)
                .await
                .map_err(|e| e.volume(&device))?;
            volumes.push(
                VolumeAccess::new(
                    Volume {
                        device: device.clone(),
                        size: disk.size,
                        format: VolumeFormat::Raw,
                    },
                    access,
                )
                .bitmap_mode(mode)
                .dirty(DirtySource::Regions(Box::new(regions)))
                .checkpoint(Some(Checkpoint(snapshot.checkpoint_id.to_string())))
                .base(base),
            );
            disks_meta.push(DiskMeta {
                device,
                disk,
                policy,
            });
            i += 1;
        }

        let metadata = SnapshotMetadata {
            format: FORMAT.into(),
            platform_version: version.to_string(),
            server: ServerMeta {
                id: server.id.clone(),
                name: server.name.clone(),
                application: server.application.clone(),
                revert_mode: server.revert_mode,
                storage_id: server.storage_id.clone(),
                cpu: server.cores.clone(),
                memory_mb: server.memory_mb.clone(),
                os_type: server.os_type.clone(),
            },
            snapshot_id: snapshot.id.clone(),
            checkpoint_id: snapshot.checkpoint_id,
            disks: disks_meta,
            base_image: base_meta,
        };
        let spec = crate::spec::of_server(&server, &metadata.disks, &snapshot.vmconf);
        Ok(VmBackup::new(ConfigBlob::json(&snapshot.vmconf), volumes)
            .metadata(
                serde_json::to_value(&metadata)
                    .map_err(|e| Error::other("serialising the metadata").with_source(e))?,
            )
            .warnings(warnings)
            .spec(spec))
    }

    pub(super) async fn reset_cbt(&self, id: &str) -> Result<()> {
        let _: Value = self
            .client
            .call(
                Method::PUT,
                &format!("/janus/20240725/servers/{id}/cbt/status"),
                &[],
                Some(&json!({"enable": 1})),
            )
            .await
            .map_err(|e| e.guest(id))?;
        Ok(())
    }

    pub(super) async fn take_snapshot(&self, guest: &Guest) -> Result<(Snapshot, VmConf)> {
        let id = guest.id.0.as_str();
        // The job marker and the lease in the description: a later job of
        // this host finds both if this one dies before its cleanups.
        let lease = lock(&self.backups)
            .get(&guest.id.0)
            .and_then(|s| s.lease.as_ref().map(|l| l.id.clone()));
        let description = sweep::snapshot_description(self.marker().as_ref(), lease.as_deref());
        let created: SnapshotCreated = self
            .client
            .task(
                Method::POST,
                &format!("/janus/20240725/servers/{id}/snapshots"),
                Some(&json!({"name": "vmbackup", "description": description})),
            )
            .await?;
        self.with_backup(guest, |s| s.snapshot_id = Some(created.snapshot_id.clone()));
        let path = format!(
            "/janus/20240725/servers/{id}/snapshots/{}",
            created.snapshot_id
        );
        let snapshot: Snapshot = self.client.call(Method::GET, &path, &[], None).await?;
        let conf: VmConf = serde_json::from_value(snapshot.vmconf.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Platform,
                format!("SCP answer does not parse: vmconf: {e}"),
            )
            .api_call(format!("GET {path}"))
            .guest(id)
        })?;
        Ok((snapshot, conf))
    }

    /// Close exports and hot-adds, release the lease, delete the snapshot.
    pub(super) async fn delete_snapshot(&self, guest: &Guest) -> Result<()> {
        let (opened, snapshot) = {
            let mut b = lock(&self.backups);
            let s = b.entry(guest.id.0.clone()).or_default();
            (std::mem::take(&mut s.opened), s.snapshot_id.take())
        };
        let mut first: Option<Error> = self.close_disks(opened).await;
        if let Some(s) = snapshot {
            let path = format!("/janus/20240725/servers/{}/snapshots/{s}", guest.id);
            match self.client.task::<Value>(Method::DELETE, &path, None).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Delete the guest's snapshots whose description records backup
    /// resource `lease` (unique to one backup: the match is exact).
    async fn delete_snapshots_of_resource(&self, guest: &Guest, lease: &str) -> Result<()> {
        let path = format!("/janus/20240725/servers/{}/snapshots", guest.id);
        let listed: Vec<api::SnapshotListed> = self.client.list(&path, &[]).await?;
        for s in listed {
            if sweep::recorded_resource(&s.description).as_deref() != Some(lease) {
                continue;
            }
            tracing::warn!(snapshot = %s.id, guest = %guest.id, "deleting a snapshot the backup did not record");
            match self
                .client
                .task::<Value>(Method::DELETE, &format!("{path}/{}", s.id), None)
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) async fn cleanup_backup(&self, guest: &Guest) -> Result<bool> {
        let lease = {
            let mut b = lock(&self.backups);
            b.get_mut(&guest.id.0).and_then(|s| s.lease.take())
        };
        let lease_id = lease.as_ref().map(|l| l.id.clone());
        let mut lost = lease
            .as_ref()
            .is_some_and(|l| l.lost.load(Ordering::SeqCst));
        if let Some(l) = &lease {
            l.renew.abort();
        }
        // Exports first (a snapshot being read cannot be deleted), then the
        // lease, then the snapshot.
        let opened = {
            let mut b = lock(&self.backups);
            b.get_mut(&guest.id.0)
                .map(|s| std::mem::take(&mut s.opened))
                .unwrap_or_default()
        };
        let mut first: Option<Error> = self.close_disks(opened).await;
        if let Some(l) = lease {
            let id = l.id.clone();
            match self.close_lease(l).await {
                Ok(expired) => lost |= expired,
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
            if lost {
                let note = format!(
                    "ERROR: backup resource {id} of VM {} expired during the backup: \
                     the platform closed its exports, reads after that failed",
                    guest.id
                );
                tracing::error!("{note}");
                lock(&self.notes)
                    .entry(guest.id.0.clone())
                    .or_default()
                    .push(note);
            }
        }
        if let Err(e) = self.delete_snapshot(guest).await {
            first.get_or_insert(e);
        }
        // A snapshot whose creation answer was lost or unreadable is not in
        // the state, but its description records this backup's lease.
        if let Some(l) = lease_id
            && let Err(e) = self.delete_snapshots_of_resource(guest, &l).await
        {
            first.get_or_insert(e);
        }
        lock(&self.backups).remove(&guest.id.0);
        match first {
            Some(e) => Err(e.guest(&guest.id)),
            None => Ok(lost),
        }
    }
}

/// Keeps a backup resource alive; marks it lost when the platform says it
/// expired.
pub(super) async fn renew_lease(
    client: Arc<ScpClient>,
    id: String,
    seconds: u32,
    every: std::time::Duration,
    lost: Arc<AtomicBool>,
) {
    let path = format!("{RESOURCES}/{id}");
    loop {
        tokio::time::sleep(every).await;
        match client
            .call::<BackupResource>(
                Method::PUT,
                &path,
                &[],
                Some(&json!({"remain_time": seconds})),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::LeaseLost | ErrorKind::NotFound) => {
                tracing::error!(lease = %id, error = %e.report(), "backup resource lost");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %id, error = %e.report(), "renewing the backup resource failed")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct AreaQuery {
    server_id: String,
    snapshot_id: String,
    disk_id: String,
    base_image: bool,
    checkpoint_id: u64,
}

impl AreaQuery {
    /// The base image's areas under the same disk (seed 4.5.1 step 4:
    /// `base_image=1`, `checkpoint_id=0` whatever the system disk's
    /// checkpoint: the base image has no checkpoints of its own).
    fn base(&self) -> AreaQuery {
        AreaQuery {
            base_image: true,
            checkpoint_id: 0,
            ..self.clone()
        }
    }
}

/// Changed areas, fetched page by page as the host asks (bounded memory
/// whatever the disk size). Fails with [`ErrorKind::LeaseLost`] once the
/// backup resource is known to be gone.
pub(super) struct ChangedAreas {
    client: Arc<ScpClient>,
    guest: String,
    device: String,
    query: AreaQuery,
    next_offset: Option<u64>,
    pending: VecDeque<Extent>,
    lost: Arc<AtomicBool>,
}

impl ChangedAreas {
    async fn fetch(&mut self) -> Result<()> {
        let Some(offset) = self.next_offset else {
            return Ok(());
        };
        let q = &self.query;
        let path = format!("/janus/20240725/servers/{}/cbt/changed-areas", q.server_id);
        let page: ChangedAreasPage = self
            .client
            .call(
                Method::GET,
                &path,
                &[
                    ("snapshot_id", q.snapshot_id.clone()),
                    ("disk_id", q.disk_id.clone()),
                    ("base_image", u8::from(q.base_image).to_string()),
                    ("checkpoint_id", q.checkpoint_id.to_string()),
                    ("offset", offset.to_string()),
                ],
                None,
            )
            .await
            .map_err(|e| e.guest(&self.guest).volume(&self.device).offset(offset))?;
        for a in page.areas {
            if a.length == 0 {
                continue;
            }
            match self.pending.back_mut() {
                Some(last) if last.end() == a.offset => last.length += a.length,
                _ => self.pending.push_back(Extent::new(a.offset, a.length)),
            }
        }
        self.next_offset = match page.next_offset {
            Some(n) if n > offset => Some(n),
            Some(n) => {
                return Err(Error::new(
                    ErrorKind::Platform,
                    format!("changed areas did not advance (next_offset {n})"),
                )
                .guest(&self.guest)
                .volume(&self.device)
                .offset(offset));
            }
            None => None,
        };
        Ok(())
    }
}

#[async_trait]
impl DirtyRegions for ChangedAreas {
    async fn next_dirty_region(&mut self) -> Result<Option<Extent>> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                "the backup resource expired while the backup was reading",
            )
            .guest(&self.guest)
            .volume(&self.device));
        }
        // Join areas that continue on the next page.
        while self.pending.len() < 2 && self.next_offset.is_some() {
            self.fetch().await?;
        }
        Ok(self.pending.pop_front())
    }
}

/// Whether a stored volume can be the base of an incremental of `disk`:
/// a checkpoint, the same size, a bitmap, and the same base image (a new
/// base image id, or a change of the version rules, needs a full backup so
/// that the base image is stored).
pub(super) fn usable_previous(v: &StoredVolume, disk: &api::Disk, policy: BasePolicy) -> bool {
    let expected = match policy {
        BasePolicy::Separate { .. } => disk.base_image_id.clone(),
        _ => None,
    };
    v.checkpoint.is_some()
        && v.volume.size == disk.size
        && v.bitmap_mode != BitmapMode::None
        && v.base.as_ref().map(|b| b.0.clone()) == expected
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 4.5.1 step 4: the base image's CBT is asked with
    /// `base_image=1, checkpoint_id=0`, also when the system disk's query
    /// carries the last backup's checkpoint.
    #[test]
    fn the_base_image_query_has_base_image_1_and_checkpoint_0() {
        let own = AreaQuery {
            server_id: "srv".into(),
            snapshot_id: "snap".into(),
            disk_id: "dsk".into(),
            base_image: false,
            checkpoint_id: 7,
        };
        let base = own.base();
        assert!(base.base_image);
        assert_eq!(base.checkpoint_id, 0);
        assert_eq!(
            (base.server_id, base.snapshot_id, base.disk_id),
            ("srv".into(), "snap".into(), "dsk".into())
        );
        assert!(!own.base_image);
    }
}
