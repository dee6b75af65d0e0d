//! Restore: base image (create, AVAILABLE, replica, custom attributes,
//! then its data through the restored VM's system disk), the VM (new, or
//! in place with recovery-baseimage), and the destinations the host writes.

use super::*;

/// Tag in the description of a base image recreated by a restore, so
/// that later restores of the same image reuse it.
pub(super) fn restored_marker(original_id: &str) -> String {
    format!("[restored from base image {original_id}]")
}

impl ScpProvider {
    pub(super) async fn ensure_replica(&self, img: &BaseImage, storage_id: &str) -> Result<()> {
        if img
            .replicas
            .iter()
            .any(|r| r.storage_id == storage_id && r.status == "AVAILABLE")
        {
            return Ok(());
        }
        let _: Value = self
            .client
            .task(
                Method::POST,
                &format!("{BASE_IMAGES}/{}/replicas/actions/sync", img.id),
                Some(&json!({"storage_id": storage_id})),
            )
            .await?;
        Ok(())
    }

    /// Custom attributes of a base image: create missing ones, bind
    /// unbound ones (seed 4.5.2 steps 5 to 7).
    pub(super) async fn restore_attributes(
        &self,
        base_id: &str,
        meta: &BaseImageMeta,
    ) -> Result<()> {
        let existing: Vec<Binding> = self
            .client
            .list(
                BINDINGS,
                &[
                    ("resource_id", base_id.into()),
                    ("resource_type", "base_image".into()),
                ],
            )
            .await?;
        let mut to_bind = Vec::new();
        for b in &meta.bindings {
            let saved = meta
                .custom_attributes
                .iter()
                .find(|a| a.id == b.custom_attribute_id);
            let name = saved.map_or(b.custom_attribute_name.clone(), |a| a.name.clone());
            let description = saved.map_or(b.custom_attribute_description.clone(), |a| {
                a.description.clone()
            });
            let found: Vec<CustomAttribute> = self
                .client
                .list(
                    ATTRIBUTES,
                    &[
                        ("name", name.clone()),
                        ("resource_type", "base_image".into()),
                    ],
                )
                .await?;
            let attr_id = match found.into_iter().find(|a| a.name == name) {
                Some(a) => a.id,
                None => {
                    let created: IdAnswer = self
                        .client
                        .call(
                            Method::POST,
                            ATTRIBUTES,
                            &[],
                            Some(&json!({"name": name, "description": description,
                                "resource_type": "base_image"})),
                        )
                        .await?;
                    created.id
                }
            };
            if !existing.iter().any(|e| e.custom_attribute_id == attr_id) {
                to_bind.push(
                    json!({"custom_attribute_id": attr_id, "resource_type": "base_image",
                    "resource_id": base_id, "value": b.value}),
                );
            }
        }
        if !to_bind.is_empty() {
            let _: Value = self
                .client
                .call(
                    Method::POST,
                    &format!("{BINDINGS}/actions/bulk-create"),
                    &[],
                    Some(&json!({"bindings": to_bind})),
                )
                .await?;
        }
        Ok(())
    }

    pub(super) async fn delete_base_image(&self, id: &str) -> Result<()> {
        match self
            .client
            .call::<Value>(Method::DELETE, &format!("{BASE_IMAGES}/{id}"), &[], None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Create the new VM, or prepare the original one (in place).
    pub(super) async fn prepare_vm(&self, st: &mut RestoreState) -> Result<()> {
        let md = st
            .metadata
            .as_ref()
            .ok_or_else(|| Error::other("restore without metadata"))?;
        if st.in_place {
            let server = self.server(&st.server_id).await?;
            for d in &server.disks {
                st.disks.insert(d.device(), d.id.clone());
            }
            let linked_system = server.disks.first().and_then(|d| d.base_image_id.clone());
            if md.separate_linked_disk().is_some() && linked_system.is_some() {
                // Linked system disks cannot be deleted: erase their own
                // data with recovery-baseimage (relinking when the base
                // image was restored under a new id).
                let mut body = json!({});
                if let Some(b) = &st.base_image_id
                    && linked_system.as_ref() != Some(b)
                {
                    body = json!({"base_image_id": b});
                }
                let _: Value = self
                    .client
                    .task(
                        Method::POST,
                        &format!(
                            "/janus/20240725/servers/{}/recovery-baseimage",
                            st.server_id
                        ),
                        Some(&body),
                    )
                    .await
                    .map_err(|e| e.guest(&st.server_id))?;
            }
            return Ok(());
        }
        let mut disks = Vec::new();
        for d in &md.disks {
            let mut disk = json!({"size": d.disk.size});
            if matches!(d.policy, BasePolicy::Separate { .. })
                && let Some(b) = &st.base_image_id
            {
                disk["base_image_id"] = json!(b);
                disk["linked"] = json!(true);
            }
            disks.push(disk);
        }
        // While its base image's data is being written, the VM carries the
        // job marker too: a later job sweeps both if this one dies.
        let description = match (&st.unsealed_base, self.marker()) {
            (Some(b), Some(m)) => format!("{m} restoring base image {b}"),
            _ => String::new(),
        };
        let body = json!({"name": st.name, "description": description, "storage_id": st.storage_id,
            "application": md.server.application, "revert_mode": 0,
            "cores": md.server.cpu, "memory_mb": md.server.memory_mb, "os_type": md.server.os_type,
            "cbt_enable": 1, "disks": disks});
        let created: ServerCreated = self.client.task(Method::POST, SERVERS, Some(&body)).await?;
        st.created = true;
        st.server_id = created.server_id;
        if created.disk_ids.len() != md.disks.len() {
            return Err(Error::new(
                ErrorKind::Platform,
                format!(
                    "SCP created server {} with {} disk(s) for {} requested (disk_ids)",
                    st.server_id,
                    created.disk_ids.len(),
                    md.disks.len()
                ),
            )
            .api_call(format!("POST {SERVERS}")));
        }
        for (d, id) in md.disks.iter().zip(created.disk_ids) {
            st.disks.insert(d.device.clone(), id);
        }
        Ok(())
    }

    /// Restore a missing base image, in the seed's order (4.5.2): create
    /// it (`POST`, tagged with the job marker), set it `AVAILABLE` (`PUT`),
    /// sync its replica to the target storage, restore its custom
    /// attributes. Its data is written later through the restored VM's
    /// system disk ([`Self::write_base_image`]); until then it stays
    /// marker-tagged and is deleted when the restore fails (or swept by a
    /// later job when this one dies).
    pub(super) async fn create_base_image(&self, st: &mut RestoreState, size: u64) -> Result<()> {
        let md = st
            .metadata
            .clone()
            .ok_or_else(|| Error::other("restore without metadata"))?;
        let meta = md.base_image.as_ref();
        let original_id = md
            .separate_linked_disk()
            .and_then(|d| d.disk.base_image_id.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    "the snapshot's SCP metadata has no linked disk with a base image id",
                )
            })?;
        let name = meta.map_or_else(|| "restored-base-image".into(), |m| m.image.name.clone());
        let description = format!(
            "{} {}",
            meta.map(|m| m.image.description.clone())
                .unwrap_or_default(),
            restored_marker(&original_id)
        )
        .trim()
        .to_owned();
        let body = json!({"name": name, "size": size, "storage_id": st.storage_id,
            "description": sweep::marked(&description, self.marker().as_ref(), None),
            "os_type": meta.map(|m| m.image.os_type.clone()).unwrap_or_default()});
        let created: IdAnswer = self
            .client
            .call(Method::POST, BASE_IMAGES, &[], Some(&body))
            .await?;
        let id = created.id;
        st.unsealed_base = Some(id.clone());
        st.base_description = description;
        let _: Value = self
            .client
            .call(
                Method::PUT,
                &format!("{BASE_IMAGES}/{id}"),
                &[],
                Some(&json!({"status": "AVAILABLE"})),
            )
            .await?;
        let img: BaseImage = self
            .client
            .call(Method::GET, &format!("{BASE_IMAGES}/{id}"), &[], None)
            .await?;
        self.ensure_replica(&img, &st.storage_id).await?;
        if let Some(m) = meta {
            self.restore_attributes(&id, m).await?;
        }
        st.base_image_id = Some(id);
        st.pending_base = false;
        Ok(())
    }

    /// Write the base image's data from the host's `source` through the
    /// restored VM's system disk opened with the base-image flag (an
    /// export with `open_base_image: 1` under the `Recovery` resource, or
    /// a rw hot-add with `open_base_image: 1`), then drop the job marker
    /// from its description: the image is complete.
    pub(super) async fn write_base_image(
        &self,
        st: &mut RestoreState,
        device: &str,
        source: &str,
        size: u64,
    ) -> Result<()> {
        let id = st
            .unsealed_base
            .clone()
            .ok_or_else(|| Error::other("no base image being restored"))?;
        let disk_id = st.disks.get(device).cloned().ok_or_else(|| {
            Error::not_found(format!("the restored VM has no disk {device}")).guest(&st.server_id)
        })?;
        let lease = if self.disks.needs_lease() {
            let lease = self.restore_lease(st).await?;
            // The lease is recorded with the marker: a later job
            // releases it before it removes this image and its VM.
            self.describe_base_image(
                &id,
                &sweep::marked(&st.base_description, self.marker().as_ref(), Some(&lease)),
            )
            .await?;
            Some(lease)
        } else {
            None
        };
        let opened = self
            .open_disk(DiskTarget {
                server_id: st.server_id.clone(),
                disk_id,
                snapshot_id: None,
                open_base_image: true,
                mode: OpenMode::ReadWrite,
                lease,
            })
            .await?;
        let r = match &opened.access {
            SnapshotAccess::Nbd(a) => {
                copy::copy_source(source, size, &copy::Destination::Nbd(a.clone())).await
            }
            SnapshotAccess::FileHandle(f) => {
                copy::copy_source(source, size, &copy::Destination::File(f.path.clone())).await
            }
            other => Err(Error::unsupported(format!(
                "writing a base image through {other:?}"
            ))),
        };
        let c = self.disks.close(opened).await;
        let copied = r?;
        c?;
        tracing::info!(base_image = %id, written = copied.written, skipped = copied.skipped,
            "base image data restored");
        self.describe_base_image(&id, &st.base_description).await?;
        st.unsealed_base = None;
        Ok(())
    }

    async fn describe_base_image(&self, id: &str, description: &str) -> Result<()> {
        let _: Value = self
            .client
            .call(
                Method::PUT,
                &format!("{BASE_IMAGES}/{id}"),
                &[],
                Some(&json!({"description": description})),
            )
            .await?;
        Ok(())
    }

    /// The `Recovery` resource locking the restored VM (opened once).
    async fn restore_lease(&self, st: &mut RestoreState) -> Result<String> {
        if let Some(l) = &st.lease {
            return Ok(l.id.clone());
        }
        let l = self.open_lease(Some(&st.server_id), "Recovery").await?;
        let id = l.id.clone();
        st.lease = Some(l);
        Ok(id)
    }

    pub(super) async fn volume_init(
        &self,
        st: &mut RestoreState,
        request: &RestoreVolumeRequest,
    ) -> Result<VolumeImport> {
        let device = request.volume.volume.device.as_str();
        let md = st
            .metadata
            .clone()
            .ok_or_else(|| Error::invalid("restore state without metadata"))?;
        let linked = md
            .separate_linked_disk()
            .is_some_and(|d| d.device == device)
            && request.volume.base.is_some();
        if linked && st.pending_base {
            let source = request.sources.base.clone().ok_or_else(|| {
                Error::invalid("the host offered no base image source for a linked volume")
            })?;
            let size = request
                .sources
                .base_size
                .or(md.base_image.as_ref().map(|b| b.image.size))
                .filter(|s| *s > 0)
                .ok_or_else(|| {
                    Error::invalid(
                        "the size of the base image to restore is unknown \
                         (no base size from the host, none in the snapshot's metadata)",
                    )
                })?;
            self.create_base_image(st, size).await?;
            self.prepare_vm(st).await?;
            self.write_base_image(st, device, &source, size).await?;
        }
        if st.server_id.is_empty() {
            return Err(Error::invalid("the restored VM does not exist yet"));
        }
        let disk_id = st.disks.get(device).cloned().ok_or_else(|| {
            Error::not_found(format!("the restored VM has no disk {device}")).guest(&st.server_id)
        })?;
        let lease = if self.disks.needs_lease() {
            Some(self.restore_lease(st).await?)
        } else {
            None
        };
        let opened = self
            .open_disk(DiskTarget {
                server_id: st.server_id.clone(),
                disk_id,
                snapshot_id: None,
                open_base_image: false,
                mode: OpenMode::ReadWrite,
                lease,
            })
            .await?;
        let destination = opened.access.clone();
        st.open.insert(device.to_owned(), opened);
        let layer = if linked {
            Layer::Overlay
        } else {
            Layer::Merged
        };
        Ok(VolumeImport::writes(vec![LayerWrite::new(
            layer,
            destination,
        )]))
    }
}
