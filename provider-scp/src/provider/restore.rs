//! Restore: base image (create, write, AVAILABLE, replica, custom
//! attributes), the VM (new, or in place with recovery-baseimage), and
//! the destinations the host writes.

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
        let body = json!({"name": st.name, "storage_id": st.storage_id,
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

    /// Restore a missing base image from the host's base source: create it
    /// (`CREATING`), write its data, set it `AVAILABLE`, sync the replica,
    /// restore its custom attributes.
    pub(super) async fn restore_base_image(
        &self,
        st: &mut RestoreState,
        source: &str,
        size: u64,
    ) -> Result<()> {
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
        // Over NBD the Recovery lease comes first, so that the image's
        // description records it with the job marker while the image is
        // incomplete (a later job sweeps both if this one dies).
        let lease = match &self.options.access {
            AccessMode::HotAdd { .. } => None,
            _ => Some(self.open_lease(None, "Recovery").await?),
        };
        let body = json!({"name": name, "size": size, "storage_id": st.storage_id,
            "description": sweep::marked(&description, self.marker().as_ref(),
                lease.as_ref().map(|l| l.id.as_str())),
            "os_type": meta.map(|m| m.image.os_type.clone()).unwrap_or_default()});
        let created: std::result::Result<IdAnswer, Error> = self
            .client
            .call(Method::POST, BASE_IMAGES, &[], Some(&body))
            .await;
        let id = match created {
            Ok(c) => c.id,
            Err(e) => {
                if let Some(l) = lease {
                    let _ = self.close_lease(l).await;
                }
                return Err(e);
            }
        };
        st.unsealed_base = Some(id.clone());
        match (&self.options.access, lease) {
            (AccessMode::HotAdd { .. }, _) | (_, None) => {
                let h = self
                    .hot_add(json!({"base_image_id": id, "open_base_image": 1, "mode": "rw"}))
                    .await?;
                let r = self
                    .qemu_img_convert(source, &QemuTarget::File(PathBuf::from(&h.local_path)))
                    .await;
                let d = self.hot_remove(&h.id).await;
                r?;
                d?;
            }
            (_, Some(lease)) => {
                let r = async {
                    let (e, access) = self
                        .open_export(&lease.id, json!({"base_image_id": id}))
                        .await?;
                    let r = self
                        .qemu_img_convert(source, &QemuTarget::Nbd(access))
                        .await;
                    let c = self.close_export(&lease.id, &e.id).await;
                    r?;
                    c
                }
                .await;
                let c = self.close_lease(lease).await;
                r?;
                if c? {
                    return Err(Error::new(
                        ErrorKind::LeaseLost,
                        "the recovery resource expired while the base image was written",
                    ));
                }
            }
        }
        let _: Value = self
            .client
            .call(
                Method::PUT,
                &format!("{BASE_IMAGES}/{id}"),
                &[],
                Some(&json!({"status": "AVAILABLE", "description": description})),
            )
            .await?;
        st.unsealed_base = None;
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

    pub(super) async fn qemu_img_convert(&self, source: &str, target: &QemuTarget) -> Result<()> {
        let mut cmd = tokio::process::Command::new(&self.options.qemu_img);
        cmd.args(["convert", "-n", "--target-is-zero", "-f", "raw", source]);
        let _tls_dir;
        match target {
            QemuTarget::File(p) => {
                cmd.args(["-O", "raw"]).arg(p);
            }
            QemuTarget::Nbd(n) => {
                let NbdAddress::Tcp { host, port } = &n.address else {
                    return Err(Error::invalid("base image export is not on TCP"));
                };
                let mut opts = format!(
                    "driver=nbd,server.type=inet,server.host={host},server.port={port},export={}",
                    n.export
                );
                if let Some(tls) = &n.tls {
                    let dir = std::env::temp_dir().join(format!(
                        "provider-scp-tls-{}-{}",
                        std::process::id(),
                        self.pending_ids.fetch_add(1, Ordering::Relaxed)
                    ));
                    std::fs::create_dir_all(&dir)?;
                    std::fs::write(dir.join("ca-cert.pem"), &tls.ca_pem)?;
                    cmd.arg("--object").arg(format!(
                        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                        dir.display()
                    ));
                    opts.push_str(",tls-creds=tls0");
                    _tls_dir = TempDir(dir);
                }
                cmd.arg("--target-image-opts").arg(opts);
            }
        }
        let out = cmd.output().await.map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("running {}", self.options.qemu_img.display()),
            )
            .with_source(e)
        })?;
        if !out.status.success() {
            return Err(Error::new(
                ErrorKind::DataPath,
                format!(
                    "writing the base image failed: qemu-img convert: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
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
            self.restore_base_image(st, &source, size).await?;
            self.prepare_vm(st).await?;
        }
        if st.server_id.is_empty() {
            return Err(Error::invalid("the restored VM does not exist yet"));
        }
        let disk_id = st.disks.get(device).cloned().ok_or_else(|| {
            Error::not_found(format!("the restored VM has no disk {device}")).guest(&st.server_id)
        })?;
        let destination = match &self.options.access {
            AccessMode::HotAdd { .. } => {
                let h = self
                    .hot_add(json!({"server_id": st.server_id, "disk_id": disk_id, "mode": "rw"}))
                    .await?;
                st.open
                    .insert(device.to_owned(), Opened::HotAdd(h.id.clone()));
                SnapshotAccess::FileHandle(FileAccess::new(PathBuf::from(h.local_path)))
            }
            _ => {
                let lease = match &st.lease {
                    Some(l) => l.id.clone(),
                    None => {
                        let l = self.open_lease(Some(&st.server_id), "Recovery").await?;
                        let id = l.id.clone();
                        st.lease = Some(l);
                        id
                    }
                };
                let (e, access) = self
                    .open_export(
                        &lease,
                        json!({"server_id": st.server_id, "disk_id": disk_id}),
                    )
                    .await?;
                st.open
                    .insert(device.to_owned(), Opened::Export { lease, id: e.id });
                SnapshotAccess::Nbd(access)
            }
        };
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

pub(super) enum QemuTarget {
    File(PathBuf),
    Nbd(NbdAccess),
}

pub(super) struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
