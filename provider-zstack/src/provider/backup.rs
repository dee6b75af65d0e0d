//! The backup half: per volume, snapshot → template → export, then the
//! export is **streamed** to the data mover: each volume is an
//! [`HttpExport`] on this backup's loopback NBD server ([`LoopbackNbd`],
//! `127.0.0.1`, any free port), every NBD read one ranged `GET` of the
//! export URL (resumed at the first missing byte when the transfer
//! breaks, `download_retries` times per read). Nothing is staged on the
//! local disk; memory is bounded by the data mover's window and the NBD
//! server's in-flight budgets (plus a 64 MiB reorder buffer, below).
//!
//! **The md5 check** (`exportMd5Sum` of `ExportImageFromBackupStorage`):
//! - a volume read in full (every volume but a linked root's): the
//!   export's in-order check ([`HttpExport::checked`]) hashes the bytes in
//!   offset order as the data mover reads them, on a thread of its own
//!   (reads are answered at once; at most 32 MiB wait for the md5, then
//!   reads wait for it; the read that ends the image waits for the
//!   verdict). The mover reads in
//!   ascending order with a bounded number of reads in flight; a read
//!   that completes ahead of a gap waits in a reorder buffer (at most
//!   64 MiB); a reader further ahead than that switches the export to a
//!   sequential verification pass (the rest of the export read again in
//!   order). The read that completes the md5 fails when it differs, with
//!   a message naming the volume, both md5s, the byte range and the API
//!   call, and so does every later read: the backup fails.
//! - a linked root volume: its dirty regions come from [`ScanRegions`], a
//!   sequential pass over the export (4 MiB ranged `GET`s, one in memory
//!   at a time) that hashes every byte for the md5 and every 64 KiB block
//!   for the comparison with the base image's digests (read from the
//!   digest cache file block by block, never loaded whole). The regions
//!   are handed to the mover as the pass finds them and the mover reads
//!   them through NBD, so the differing blocks are transferred twice; the
//!   pass ends with the md5 check and its error fails the volume.
//!
//! **Base images**: without cached digests the base image is exported
//! and read once sequentially (md5 checked) to write its digest cache in
//! `work_dir/base-digests/`; when the target lacks it, the same export is
//! also served to the mover as an NBD export (checked as above).
//!
//! Exports, templates and snapshots live until `backup_cleanup` (the
//! mover reads after `backup_vm` returns), so a backup holds one
//! temporary template per volume at once: the `image.num` check asks for
//! that many free slots.
//!
//! Locking: the per-guest `BackupState` (`backups`) and `export_users`
//! are locked only to record or forget an export, a reader or the server;
//! a base image's export and digest pass are serialised by its
//! `base_exports` lock, so parallel guests on one image compute its
//! digests once and an export shared by them is deleted by its last user.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;

use md5::{Digest as _, Md5};
use provider_api::{DirtyRegions, Extent, NbdAccess, NbdAddress};
use provider_kit::http_export::{HttpExport, PASS_CHUNK, SequentialCheck};
use sha2::Sha256;

use super::*;
use crate::download::BLOCK;

/// An export: where it is and what md5 the platform promised.
#[derive(Debug, Clone)]
struct Exported {
    bs: String,
    image: String,
    url: String,
    md5: String,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The md5 of an export's bytes, compared with `exportMd5Sum` at the end.
struct Md5Check {
    md5: Md5,
    expected: String,
    what: String,
    call: String,
    size: u64,
}

impl Md5Check {
    fn new(expected: &str, what: &str, call: String, size: u64) -> Self {
        Md5Check {
            md5: Md5::new(),
            expected: expected.to_ascii_lowercase(),
            what: what.to_string(),
            call,
            size,
        }
    }

    fn verdict(&mut self) -> std::result::Result<(), String> {
        let got = hex(&std::mem::take(&mut self.md5).finalize());
        if self.expected.len() != 32 || got == self.expected {
            return Ok(());
        }
        Err(md5_message(
            &self.what,
            &got,
            &self.expected,
            self.size,
            &self.call,
        ))
    }
}

fn md5_message(what: &str, got: &str, want: &str, size: u64, call: &str) -> String {
    format!(
        "export of {what}: md5 {got} of bytes 0..{size} differs from exportMd5Sum {want} (ExportImageFromBackupStorage; read with {call})"
    )
}

impl SequentialCheck for Md5Check {
    fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
    }

    fn finish(&mut self) -> std::result::Result<(), String> {
        self.verdict()
    }
}

/// A linked root volume's regions that differ from its base image, found
/// by a sequential pass over the export (see the module docs).
struct ScanRegions {
    source: Arc<HttpRange>,
    size: u64,
    pos: u64,
    check: Md5Check,
    /// The base image's block digests (32 bytes per block).
    base: std::fs::File,
    base_blocks: u64,
    found: std::collections::VecDeque<Extent>,
    device: String,
    /// The md5 was compared (at the end of the pass).
    verified: bool,
}

impl ScanRegions {
    fn differs(&self, block: u64, data: &[u8]) -> Result<bool> {
        if block >= self.base_blocks {
            return Ok(true);
        }
        let mut want = [0u8; 32];
        self.base
            .read_exact_at(&mut want, block * 32)
            .map_err(|e| {
                Error::new(ErrorKind::Io, "reading the base image's digest cache").with_source(e)
            })?;
        let got: [u8; 32] = Sha256::digest(data).into();
        Ok(got != want)
    }
}

#[async_trait]
impl DirtyRegions for ScanRegions {
    async fn next_dirty_region(&mut self) -> Result<Option<Extent>> {
        loop {
            if let Some(e) = self.found.pop_front() {
                return Ok(Some(e));
            }
            if self.pos >= self.size {
                if !self.verified {
                    self.verified = true;
                    if let Err(msg) = self.check.verdict() {
                        return Err(Error::new(ErrorKind::Corrupt, msg)
                            .api_call(self.source.call())
                            .volume(&self.device));
                    }
                }
                return Ok(None);
            }
            let n = PASS_CHUNK.min(self.size - self.pos);
            let data = self.source.read(self.pos, n).await?;
            self.check.update(&data);
            let mut run: Option<Extent> = None;
            for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                let off = self.pos + i as u64 * BLOCK;
                if self.differs(off / BLOCK, block)? {
                    match &mut run {
                        Some(r) if r.end() == off => r.length += block.len() as u64,
                        _ => {
                            if let Some(r) = run.take() {
                                self.found.push_back(r);
                            }
                            run = Some(Extent::new(off, block.len() as u64));
                        }
                    }
                }
            }
            self.found.extend(run);
            self.pos += n;
        }
    }
}

impl ZStackProvider {
    /// Exports `image` from `bs`; the export is recorded (before the call:
    /// one whose answer is lost is deleted too) and counted as used.
    async fn export(&self, bs: &str, image: &str, state_key: &str) -> Result<Exported> {
        let id = (bs.to_string(), image.to_string());
        self.backups
            .with_id(state_key, |st| st.exports.push(id.clone()));
        *lock(&self.export_users).entry(id).or_default() += 1;
        let r: ExportResult = self
            .client
            .call_as(
                Method::PUT,
                &format!("/backup-storage/{bs}/actions"),
                Some(json!({"exportImageFromBackupStorage": {"imageUuid": image, "exportFormat": "raw"}})),
                "ExportImageFromBackupStorage",
            )
            .await?;
        Ok(Exported {
            bs: bs.to_string(),
            image: image.to_string(),
            url: r.image_url,
            md5: r.export_md5_sum,
        })
    }

    /// Gives up one use of an export; the last user deletes it.
    async fn release_export(&self, bs: &str, image: &str, state_key: Option<&str>) -> Result<()> {
        let id = (bs.to_string(), image.to_string());
        if let Some(k) = state_key {
            // One use released: the same export may be held twice.
            self.backups.with_id(k, |st| {
                if let Some(i) = st.exports.iter().position(|e| *e == id) {
                    st.exports.remove(i);
                }
            });
        }
        let last = {
            let mut users = lock(&self.export_users);
            let n = users.entry(id.clone()).or_default();
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                users.remove(&id);
            }
            last
        };
        if last {
            self.delete_export(bs, image).await?;
        }
        Ok(())
    }

    async fn delete_export(&self, bs: &str, image: &str) -> Result<()> {
        self.client
            .call(
                Method::DELETE,
                &format!("/backup-storage/{bs}/exported-images/{image}"),
                None,
                "DeleteExportedImage",
            )
            .await
            .map(|_| ())
    }

    fn digest_cache(&self, image: &str) -> PathBuf {
        self.options
            .work_dir
            .join("base-digests")
            .join(format!("{}.sha256", safe(image)))
    }

    /// The digest cache of `image`, when it is there and whole.
    fn cached_digests(&self, image: &str) -> Option<PathBuf> {
        let path = self.digest_cache(image);
        let len = std::fs::metadata(&path).ok()?.len();
        (len % 32 == 0).then_some(path)
    }

    /// A reader of an export, counted in the backup's resumes.
    fn reader(&self, key: &str, url: &str, what: &str) -> Arc<HttpRange> {
        let source = Arc::new(
            HttpRange::new(self.client.http().clone(), url, what)
                .retries(self.options.download_retries),
        );
        self.backups
            .with_id(key, |st| st.sources.push(source.clone()));
        source
    }

    /// Serves `export` as `name` on the backup's loopback NBD server.
    async fn serve(&self, key: &str, name: &str, export: HttpExport) -> Result<SnapshotAccess> {
        let running = self
            .backups
            .with_id(key, |st| st.serving.as_ref().map(LoopbackNbd::address))
            .flatten();
        let address = match running {
            Some(a) => a,
            None => {
                let server = LoopbackNbd::start().await?;
                let a = server.address();
                self.backups
                    .with(&provider_api::GuestId(key.to_owned()), |st| {
                        st.serving = Some(server)
                    })?;
                a
            }
        };
        let export = Arc::new(export);
        self.backups.with_id(key, |st| {
            if let Some(s) = &st.serving {
                s.add(name, export);
            }
        });
        Ok(SnapshotAccess::Nbd(NbdAccess::new(
            NbdAddress::Tcp {
                host: address.ip().to_string(),
                port: address.port(),
            },
            name,
        )))
    }

    /// Reads an export once in order: checks its md5 and writes the digest
    /// of every 64 KiB block to `cache` (through a temporary file, renamed
    /// when whole). Memory: one chunk.
    async fn digest_pass(
        &self,
        source: &HttpRange,
        size: u64,
        md5: &str,
        cache: &Path,
    ) -> Result<()> {
        let tmp = cache.with_extension("tmp");
        let io = |e: std::io::Error| {
            Error::new(ErrorKind::Io, format!("writing {}", tmp.display()))
                .retryable(false)
                .with_source(e)
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let mut check = Md5Check::new(md5, source.what(), source.call(), size);
        let mut pos = 0;
        while pos < size {
            let n = PASS_CHUNK.min(size - pos);
            let data = source.read(pos, n).await?;
            check.update(&data);
            for block in data.chunks(BLOCK as usize) {
                let d: [u8; 32] = Sha256::digest(block).into();
                out.write_all(&d).map_err(io)?;
            }
            pos += n;
        }
        check
            .verdict()
            .map_err(|m| Error::new(ErrorKind::Corrupt, m).api_call(source.call()))?;
        out.flush().map_err(io)?;
        drop(out);
        std::fs::rename(&tmp, cache).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("renaming {} to {}", tmp.display(), cache.display()),
            )
            .with_source(e)
        })?;
        Ok(())
    }

    /// One volume: snapshot → template on backup storage → export. The
    /// three live until `backup_cleanup` (named by the tag).
    async fn export_volume(
        &self,
        key: &str,
        tag: &Tag,
        bs: &str,
        vol: &VolumeInventory,
        grouped: Option<String>,
    ) -> Result<Exported> {
        let device = device_of(vol);
        let uuid = &vol.uuid;
        let name = tag.name(&device);
        let snap_uuid = match grouped {
            Some(s) => s,
            None => {
                let snap: InventoryAnswer<VolumeSnapshotInventory> = self
                    .client
                    .call_as(
                        Method::POST,
                        &format!("/volumes/{uuid}/volume-snapshots"),
                        Some(json!({"params": {"name": name, "description": format!("vmbackup temporary snapshot ({})", tag.marker)}, "systemTags": [], "userTags": []})),
                        "CreateVolumeSnapshot",
                    )
                    .await?;
                snap.inventory.uuid
            }
        };
        let route = if vol.kind == "Root" {
            "root-volume-templates"
        } else {
            "data-volume-templates"
        };
        let image: InventoryAnswer<ImageInventory> = self
            .client
            .call_as_within(
                Method::POST,
                &format!("/images/{route}/from/volume-snapshots/{snap_uuid}"),
                Some(json!({"params": {"name": name, "backupStorageUuids": [bs], "description": format!("vmbackup temporary template ({})", tag.marker)}, "systemTags": [], "userTags": []})),
                if route == "root-volume-templates" {
                    "CreateRootVolumeTemplateFromVolumeSnapshot"
                } else {
                    "CreateDataVolumeTemplateFromVolumeSnapshot"
                },
                self.job_timeout_for(vol.size),
            )
            .await?;
        if image.inventory.size != 0 && image.inventory.size != vol.size {
            return Err(Error::new(
                ErrorKind::Platform,
                format!(
                    "the template of volume {} has {} bytes, the volume {}",
                    vol.uuid, image.inventory.size, vol.size
                ),
            ));
        }
        self.export(bs, &image.inventory.uuid, key).await
    }

    /// A VM with several volumes is snapshotted as one volume snapshot
    /// group (ZStack 3.6+), all volumes at the same instant: volume UUID →
    /// snapshot UUID. Empty for a single volume, or when the platform has
    /// no group API: then every volume is snapshotted on its own and a
    /// warning says the volumes are not crash-consistent with each other.
    async fn snapshot_group(
        &self,
        tag: &Tag,
        vols: &[VolumeInventory],
        warnings: &mut Vec<String>,
    ) -> Result<std::collections::HashMap<String, String>> {
        let mut out = std::collections::HashMap::new();
        let Some(root) = vols.iter().find(|v| v.kind == "Root") else {
            return Ok(out);
        };
        if vols.len() < 2 {
            return Ok(out);
        }
        let answer: Result<InventoryAnswer<VolumeSnapshotGroupInventory>> = self
            .client
            .call_as(
                Method::POST,
                "/volume-snapshots/group",
                Some(json!({"params": {"rootVolumeUuid": root.uuid, "name": tag.name("group"), "description": format!("vmbackup temporary snapshot group ({})", tag.marker)}, "systemTags": [], "userTags": []})),
                "CreateVolumeSnapshotGroup",
            )
            .await;
        match answer {
            Ok(g) => {
                for r in g.inventory.volume_snapshot_refs {
                    out.insert(r.volume_uuid, r.volume_snapshot_uuid);
                }
                if let Some(v) = vols.iter().find(|v| !out.contains_key(&v.uuid)) {
                    return Err(Error::new(
                        ErrorKind::Platform,
                        format!(
                            "CreateVolumeSnapshotGroup answered without a snapshot of volume {}",
                            v.uuid
                        ),
                    ));
                }
            }
            // Only a platform without the API (ZStack before 3.6) falls
            // back; the API refusing (a volume not Ready, the root volume
            // gone, ...) fails the guest.
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                let names: Vec<String> = vols
                    .iter()
                    .map(|v| format!("{} ({})", device_of(v), v.uuid))
                    .collect();
                warnings.push(format!(
                    "the platform has no volume snapshot groups (CreateVolumeSnapshotGroup: {}): volumes {} were snapshotted one after the other and are not crash-consistent with each other",
                    e.report(),
                    names.join(", ")
                ));
            }
            Err(e) => {
                let names: Vec<String> = vols.iter().map(|v| v.uuid.clone()).collect();
                return Err(Error::new(
                    e.kind(),
                    format!(
                        "CreateVolumeSnapshotGroup of root volume {} refused (volumes {}): {}",
                        root.uuid,
                        names.join(", "),
                        e.report()
                    ),
                )
                .api_call("CreateVolumeSnapshotGroup")
                .volume(device_of(root)));
            }
        }
        Ok(out)
    }

    /// The base layer of a linked root volume and the path of its block
    /// digests. `None` when the base image cannot be read (no longer on a
    /// backup storage): the volume is then stored in full.
    async fn base_layer(
        &self,
        key: &str,
        bs: &str,
        image_uuid: &str,
        has_base: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Option<(BaseLayer, PathBuf)>> {
        let export_lock = lock(&self.base_exports)
            .entry(image_uuid.to_string())
            .or_default()
            .clone();
        let _exporting = export_lock.lock().await;
        let gone = |warnings: &mut Vec<String>| {
            warnings.push(format!(
                "base image {image_uuid} is no longer on a backup storage: the root volume is stored in full"
            ));
        };
        let img: ImageInventory = match self.client.get_one("/images", image_uuid).await {
            Ok(i) => i,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                gone(warnings);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let cached = if has_base {
            self.cached_digests(image_uuid)
        } else {
            None
        };
        if let Some(path) = cached {
            // The digests cover whole blocks: the image's own size is the
            // base layer's size.
            return Ok(Some((
                BaseLayer::new(BaseImageId(image_uuid.to_string()), img.size, None),
                path,
            )));
        }
        let refs: Vec<String> = img
            .backup_storage_refs
            .iter()
            .map(|r| r.backup_storage_uuid.clone())
            .collect();
        if img.status != "Ready" || refs.is_empty() {
            warnings.push(format!(
                "base image {image_uuid} is {} on the backup storages: the root volume is stored in full",
                img.status
            ));
            return Ok(None);
        }
        if img.state != "Enabled" {
            warnings.push(format!(
                "base image {image_uuid} is {} and cannot be exported: the root volume is stored in full (flattened)",
                img.state
            ));
            return Ok(None);
        }
        let from = if refs.iter().any(|r| r == bs) {
            bs.to_string()
        } else {
            refs[0].clone()
        };
        let what = format!("base image {image_uuid}");
        let cache = self.digest_cache(image_uuid);
        let pass = async {
            let ex = self.export(&from, image_uuid, key).await?;
            let source = self.reader(key, &ex.url, &what);
            self.digest_pass(&source, img.size, &ex.md5, &cache).await?;
            Ok::<_, Error>((ex, source))
        }
        .await;
        let (ex, source) = match pass {
            Ok(v) => v,
            // The flattened volume is in hand: it is stored in full
            // instead of failing the guest.
            Err(e) => {
                let _ = self.release_export(&from, image_uuid, Some(key)).await;
                warnings.push(format!(
                    "base image {image_uuid} (rootImageUuid) could not be exported ({}): the root volume is stored in full (flattened)",
                    e.report()
                ));
                return Ok(None);
            }
        };
        let access = if has_base {
            self.release_export(&ex.bs, &ex.image, Some(key)).await?;
            None
        } else {
            let export = HttpExport::new(source.clone(), img.size).checked(Box::new(
                Md5Check::new(&ex.md5, &what, source.call(), img.size),
            ));
            let access = self
                .serve(key, &format!("base-{}", safe(image_uuid)), export)
                .await?;
            Some((access, DirtySource::All))
        };
        Ok(Some((
            BaseLayer::new(BaseImageId(image_uuid.to_string()), img.size, access),
            cache,
        )))
    }

    pub(super) async fn backup_vm_inner(
        &self,
        guest: &Guest,
        request: &BackupVmRequest,
    ) -> Result<VmBackup> {
        let key = guest.id.0.clone();
        let tag = self.backups.with(&guest.id, |st| st.tag.clone())?;
        let (vm, raw_vm) = self.vm(guest).await?;
        // A destroyed VM (recoverable until expunged) has its root volume
        // `Deleted`: ZStack takes no snapshot of it.
        if let Some(state) = vm
            .state
            .as_deref()
            .filter(|s| matches!(*s, "Destroyed" | "Destroying" | "Expunging"))
        {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "VM {} ({}) is {state}: a destroyed VM cannot be backed up (recover it first with RecoverVmInstance)",
                    vm.name, vm.uuid
                ),
            )
            .guest(&guest.id));
        }
        let vols = volumes_of(&vm).map_err(|e| e.guest(&guest.id))?;
        // Every volume's template lives until the data mover has read it.
        self.check_quota(
            vols.len() as u64,
            "a backup (one temporary template per volume, held while the volumes are read)",
        )
        .await?;
        let bs = self.backup_storage().await?;
        let mut volumes = Vec::new();
        let mut metas = Vec::new();
        let mut warnings = Vec::new();
        let grouped = self.snapshot_group(&tag, &vols, &mut warnings).await?;
        for vol in vols {
            let device = device_of(&vol);
            let mode = request.mode(&device);
            let root_image = vol.root_image_uuid.clone().filter(|s| !s.is_empty());
            let linked = mode == BitmapMode::New && root_image.is_some();
            let what = format!("volume {device} ({})", vol.uuid);
            let ex = self
                .export_volume(&key, &tag, &bs, &vol, grouped.get(&vol.uuid).cloned())
                .await
                .map_err(|e| e.volume(&device))?;
            let source = self.reader(&key, &ex.url, &what);
            let size = vol.size;
            let mut base = None;
            let mut dirty = DirtySource::All;
            let mut export = HttpExport::new(source.clone(), size);
            if let (true, Some(img)) = (linked, &root_image) {
                let has = request
                    .base_images
                    .has_base_image(&BaseImageId(img.clone()))
                    .await?;
                if let Some((layer, digests)) = self
                    .base_layer(&key, &bs, img, has, &mut warnings)
                    .await
                    .map_err(|e| e.volume(&device))?
                {
                    let file = std::fs::File::open(&digests).map_err(|e| {
                        Error::new(ErrorKind::Io, format!("opening {}", digests.display()))
                            .with_source(e)
                            .volume(&device)
                    })?;
                    let base_blocks = file.metadata().map(|m| m.len() / 32).unwrap_or(0);
                    dirty = DirtySource::Regions(Box::new(ScanRegions {
                        check: Md5Check::new(&ex.md5, &what, source.call(), size),
                        source: source.clone(),
                        size,
                        pos: 0,
                        base: file,
                        base_blocks,
                        found: Default::default(),
                        device: device.clone(),
                        verified: false,
                    }));
                    base = Some(layer);
                }
            }
            if base.is_none() {
                // Read in full: the md5 is checked as the mover reads.
                export =
                    export.checked(Box::new(Md5Check::new(&ex.md5, &what, source.call(), size)));
            }
            let access = self
                .serve(&key, &device, export)
                .await
                .map_err(|e| e.volume(&device))?;
            metas.push(VolumeMeta {
                device: device.clone(),
                uuid: vol.uuid.clone(),
                kind: vol.kind.clone(),
                size,
                md5: ex.md5.to_ascii_lowercase(),
                root_image_uuid: root_image.clone(),
                device_id: u64::from(vol.device_id),
                name: vol.name.clone(),
            });
            volumes.push(
                VolumeAccess::new(
                    Volume {
                        device: device.clone(),
                        size,
                        format: VolumeFormat::Qcow2,
                    },
                    access,
                )
                .bitmap_mode(if mode == BitmapMode::None {
                    BitmapMode::None
                } else {
                    BitmapMode::New
                })
                .dirty(dirty)
                .base(base),
            );
        }
        let meta = Metadata {
            vm_uuid: guest.id.0.clone(),
            vm_name: vm.name.clone(),
            platform: vm.platform.clone().unwrap_or_default(),
            backup_storage_uuid: bs,
            volumes: metas,
        };
        let metadata = serde_json::to_value(&meta).map_err(|e| {
            Error::other("serialising the snapshot's ZStack metadata").with_source(e)
        })?;
        let spec = guest_spec(&vm, &meta);
        Ok(VmBackup::new(ConfigBlob::json(&raw_vm), volumes)
            .metadata(metadata)
            .warnings(warnings)
            .spec(spec))
    }

    /// Closes the NBD server, releases the exports (a shared base export
    /// stays for its other users), removes the templates and snapshots
    /// (by tag) and the work directory.
    pub(super) async fn backup_cleanup_inner(
        &self,
        guest: &Guest,
        outcome: &Outcome,
    ) -> Result<BackupStats> {
        let st = self.backups.take(&guest.id);
        let mut stats = BackupStats::default();
        let Some(st) = st else { return Ok(stats) };
        let mut first: Option<Error> = None;
        self.client.ensure_session().await.ok();
        let mut st = st;
        let resumes: u32 = st.sources.iter().map(|s| s.resumes()).sum();
        if let Some(mut server) = st.serving.take() {
            server.close().await;
        }
        for (bs, image) in &st.exports {
            if let Err(e) = self.release_export(bs, image, None).await {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = self.sweep(&st.tag).await {
            first.get_or_insert(e);
        }
        if st.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&st.dir)
        {
            first.get_or_insert(e.into());
        }
        stats
            .extra
            .insert("export_resumes".into(), resumes.to_string());
        if !outcome.is_success() {
            tracing::info!(guest = %guest.id, "cleaned up after a failed backup");
        }
        match first {
            Some(e) => Err(e.guest(&guest.id)),
            None => Ok(stats),
        }
    }
}

/// The VM described platform-neutrally, for restores onto other
/// platforms: CPUs and memory as the inventory gives them (1 CPU and
/// 1 GiB when it gives none), ZStack's volumes as virtio disks with the
/// root volume first in the boot order, one virtio NIC per L3 network
/// (by device id) with its MAC and L3 network UUID.
fn guest_spec(vm: &VmInventory, meta: &Metadata) -> provider_api::GuestSpec {
    use provider_api::spec::{Bus, DiskSpec, NicSpec};
    let mut nics = vm.vm_nics.clone();
    nics.sort_by_key(|n| n.device_id);
    provider_api::GuestSpec {
        name: vm.name.clone(),
        os: vm.platform.clone().filter(|p| !p.is_empty()),
        firmware: Default::default(),
        cpus: vm.cpu_num.filter(|n| *n > 0).unwrap_or(1),
        memory_mib: vm
            .memory_size
            .map(|m| m >> 20)
            .filter(|m| *m > 0)
            .unwrap_or(1024),
        disks: meta
            .volumes
            .iter()
            .map(|v| DiskSpec {
                device: v.device.clone(),
                size: v.size,
                bus: Bus::Virtio,
                controller: None,
                boot_order: (v.kind == "Root").then_some(0),
            })
            .collect(),
        nics: nics
            .into_iter()
            .map(|n| NicSpec {
                model: Some("virtio".into()),
                mac: n.mac.filter(|m| !m.is_empty()),
                network: Some(n.l3_network_uuid),
            })
            .collect(),
    }
}
