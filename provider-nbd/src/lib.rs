//! # provider-nbd: back up any NBD export
//!
//! A provider for "platforms" that are just NBD exports: disks served by
//! `qemu-nbd`, `qemu-storage-daemon` or `nbdkit`. A guest is one or more
//! exports ([`NbdGuest::volumes`], one per device, `disk0` for a
//! single-export guest); the host reads them through the `nbd` mechanism.
//!
//! Incrementals use a qemu persistent dirty bitmap exported as the meta
//! context `qemu:dirty-bitmap:NAME` (`qemu-nbd --bitmap NAME`). The
//! checkpoint stored with each volume is the bitmap's name: the next
//! backup of that volume is incremental (`Use`) when the previous snapshot
//! recorded the same bitmap, and a full (`New`) otherwise. A bitmap is a
//! superset of the changes since the previous backup as long as it was not
//! cleared or replaced in between; whoever manages the bitmaps (QMP
//! `block-dirty-bitmap-clear`, or a rotation in one `transaction`) names a
//! new bitmap after rotation, which makes the next backup a full one.
//!
//! ## Restore
//!
//! The destination is decided once, in `restore_vm_init`, from the
//! request's [`RestoreTarget`] and remembered for the guest it returns;
//! it is never inferred from a name afterwards:
//!
//! - [`RestoreTarget::NewGuest`]: one new sparse raw file per volume in
//!   the restore directory: `<name>.raw` for a single-volume snapshot,
//!   `<name>-<device>.raw` otherwise (characters of the device outside
//!   `[A-Za-z0-9._-]` become `_`). Restore refuses when a file exists or
//!   when two devices would map to one file. Each file is written under a
//!   temporary name (`.<file>.partial`, mode 0600) and renamed when the
//!   whole VM restored; a failed restore removes what it wrote.
//! - [`RestoreTarget::InPlace`]: over the original guest's configured
//!   exports, volume by volume (each export must be writable and at least
//!   as large as the stored volume).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use async_trait::async_trait;
use provider_api::*;
use provider_kit::lock;
use serde::{Deserialize, Serialize};

/// Device name of the volume of a single-export guest.
pub const DEVICE: &str = "disk0";

/// One export of an NBD guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdVolume {
    /// Device name, unique in the guest.
    pub device: String,
    /// Where the export is.
    pub access: NbdAccess,
    /// Size of the export in bytes (the host learns it when connecting).
    pub size: u64,
    /// qemu dirty bitmap tracking changes of this export, if any.
    pub bitmap: Option<String>,
}

/// NBD exports backed up as one guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdGuest {
    /// Guest id (names the snapshots).
    pub id: String,
    /// The guest's volumes, in order.
    pub volumes: Vec<NbdVolume>,
}

impl NbdGuest {
    /// A guest of one export, device [`DEVICE`].
    pub fn single(
        id: impl Into<String>,
        access: NbdAccess,
        size: u64,
        bitmap: Option<String>,
    ) -> Self {
        NbdGuest {
            id: id.into(),
            volumes: vec![NbdVolume {
                device: DEVICE.to_owned(),
                access,
                size,
                bitmap,
            }],
        }
    }
}

/// Where a restore started by `restore_vm_init` writes.
#[derive(Debug, Clone)]
enum RestoreDestination {
    /// Over the configured exports of this guest.
    InPlace(NbdGuest),
    /// New files, per device: (final path, temporary path).
    Files(BTreeMap<String, (PathBuf, PathBuf)>),
}

/// The provider.
#[derive(Debug)]
pub struct NbdProvider {
    /// Configured guests by id; [`NbdProvider::add_guest`] and
    /// [`NbdProvider::remove_guest`] change them while the provider runs.
    guests: RwLock<BTreeMap<String, NbdGuest>>,
    restore_dir: PathBuf,
    /// Guests between backup_init and backup_cleanup (for logs/asserts).
    active: Mutex<BTreeMap<String, i64>>,
    /// Restores between restore_vm_init and restore_vm_cleanup, by the
    /// guest id `restore_vm_init` returned.
    restores: Mutex<BTreeMap<String, RestoreDestination>>,
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// `text` with every character but ASCII letters, digits and `._-`
/// replaced by `_`: a name safe for a file (or a tar member) whatever a
/// guest or device is called.
pub fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn io_error(what: String, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, what).with_source(e)
}

impl NbdProvider {
    /// A provider for these guests; restores to new guests go to
    /// `restore_dir`.
    pub fn new(guests: impl IntoIterator<Item = NbdGuest>, restore_dir: PathBuf) -> Self {
        NbdProvider {
            guests: RwLock::new(guests.into_iter().map(|g| (g.id.clone(), g)).collect()),
            restore_dir,
            active: Mutex::default(),
            restores: Mutex::default(),
        }
    }

    /// Configure guest `guest.id`, or replace its configuration (e.g. after
    /// an export grew or moved); returns the previous configuration.
    /// Takes effect for every later provider call: a backup already past
    /// `backup_vm` keeps the accesses it was given, a running in-place
    /// restore the exports `restore_vm_init` chose.
    pub fn add_guest(&self, guest: NbdGuest) -> Option<NbdGuest> {
        write_lock(&self.guests).insert(guest.id.clone(), guest)
    }

    /// Forget guest `id`; returns its configuration.
    pub fn remove_guest(&self, id: &str) -> Option<NbdGuest> {
        write_lock(&self.guests).remove(id)
    }

    /// Guests currently between `backup_init` and `backup_cleanup`.
    pub fn active_backups(&self) -> Vec<String> {
        lock(&self.active).keys().cloned().collect()
    }

    /// The files a restore of `volumes` to a new guest `name` writes, by
    /// device (see the crate docs for the naming rule).
    pub fn restore_files(&self, name: &str, devices: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
        let mut files = BTreeMap::new();
        let mut seen: BTreeMap<PathBuf, &str> = BTreeMap::new();
        for device in devices {
            let file = if devices.len() == 1 {
                format!("{name}.raw")
            } else {
                format!("{name}-{}.raw", file_safe(device))
            };
            let path = self.restore_dir.join(file);
            if let Some(other) = seen.insert(path.clone(), device) {
                return Err(Error::invalid(format!(
                    "volumes {other:?} and {device:?} would both be restored to {}; restore them under another name",
                    path.display()
                )));
            }
            files.insert((*device).to_owned(), path);
        }
        Ok(files)
    }

    fn guest(&self, guest: &Guest) -> Result<NbdGuest> {
        read_lock(&self.guests)
            .get(&guest.id.0)
            .cloned()
            .ok_or_else(|| {
                Error::not_found("no NBD export configured for this guest").guest(&guest.id)
            })
    }

    fn destination(&self, guest: &Guest) -> Result<RestoreDestination> {
        lock(&self.restores)
            .get(&guest.id.0)
            .cloned()
            .ok_or_else(|| {
                Error::invalid("restore_vm_init was not called for this guest").guest(&guest.id)
            })
    }

    /// Removes the temporary files of a restore (nothing else: finished
    /// files of another run are never touched).
    fn remove_partial(files: &BTreeMap<String, (PathBuf, PathBuf)>) -> Result<()> {
        for (_, partial) in files.values() {
            match std::fs::remove_file(partial) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(format!("removing {}", partial.display()), e)),
            }
        }
        Ok(())
    }
}

fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

#[async_trait]
impl BackupProvider for NbdProvider {
    fn provider_name(&self) -> &str {
        "nbd"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .incremental(true)
            .restore_in_place(true)
    }

    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        lock(&self.active).clear();
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        self.guest(guest)?;
        lock(&self.active).insert(guest.id.0.clone(), start_time);
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        match guest.kind {
            GuestKind::Vm => Ok(BackupMechanism::Nbd),
            _ => Err(Error::unsupported("container backup")),
        }
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        let g = self.guest(guest)?;
        let mut plan = IncrementalPlan::new();
        for v in &g.volumes {
            let Some(bitmap) = &v.bitmap else { continue };
            let same_bitmap = previous
                .and_then(|p| p.snapshot.volume(&v.device))
                .and_then(|sv| sv.checkpoint.as_ref())
                .is_some_and(|c| &c.0 == bitmap);
            let mode = if same_bitmap {
                BitmapMode::Use
            } else {
                BitmapMode::New
            };
            plan.insert(v.device.clone(), mode);
        }
        Ok(plan)
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        let g = self.guest(guest)?;
        if g.volumes.is_empty() {
            return Err(Error::invalid("no export configured for this guest").guest(&guest.id));
        }
        let mut volumes = Vec::with_capacity(g.volumes.len());
        for v in &g.volumes {
            let mode = request.mode(&v.device);
            let access = v
                .access
                .clone()
                .with_dirty_bitmap(v.bitmap.as_deref().map(bitmap_context));
            let dirty = if mode == BitmapMode::Use {
                DirtySource::NbdBitmap
            } else {
                DirtySource::All
            };
            volumes.push(
                VolumeAccess::new(
                    Volume {
                        device: v.device.clone(),
                        size: v.size,
                        format: VolumeFormat::Raw,
                    },
                    SnapshotAccess::Nbd(access),
                )
                .bitmap_mode(mode)
                .dirty(dirty)
                .checkpoint(v.bitmap.clone().map(Checkpoint)),
            );
        }
        let config = serde_json::json!({
            "volumes": g.volumes.iter().map(|v| serde_json::json!({
                "device": v.device,
                "export": v.access.uri(),
                "size": v.size,
                "bitmap": v.bitmap,
            })).collect::<Vec<_>>(),
        });
        Ok(VmBackup::new(ConfigBlob::json(&config), volumes))
    }

    async fn backup_cleanup(&self, guest: &Guest, _outcome: &Outcome) -> Result<BackupStats> {
        lock(&self.active).remove(&guest.id.0);
        Ok(BackupStats::default())
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let snapshot = &request.archive.snapshot;
        let original = &snapshot.guest;
        let (guest, destination) = match &request.target {
            RestoreTarget::InPlace => {
                let g = read_lock(&self.guests)
                    .get(&original.0)
                    .cloned()
                    .ok_or_else(|| {
                        Error::not_found("no NBD export configured for the original guest")
                            .guest(original)
                    })?;
                for sv in &snapshot.volumes {
                    let v = g
                        .volumes
                        .iter()
                        .find(|v| v.device == sv.volume.device)
                        .ok_or_else(|| {
                            Error::not_found("no export configured for this volume")
                                .guest(original)
                                .volume(&sv.volume.device)
                        })?;
                    if v.size < sv.volume.size {
                        return Err(Error::invalid(format!(
                            "export {} has {} bytes, the stored volume {}",
                            v.access.uri(),
                            v.size,
                            sv.volume.size
                        ))
                        .guest(original)
                        .volume(&sv.volume.device));
                    }
                }
                (g.id.clone(), RestoreDestination::InPlace(g.clone()))
            }
            RestoreTarget::NewGuest { name } => {
                let name = name
                    .clone()
                    .unwrap_or_else(|| format!("{original}-restored"));
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    return Err(Error::invalid(format!(
                        "restore name {name:?}: not empty, no '/', no leading '.'"
                    )));
                }
                let devices: Vec<&str> = snapshot
                    .volumes
                    .iter()
                    .map(|v| v.volume.device.as_str())
                    .collect();
                let files = self.restore_files(&name, &devices)?;
                std::fs::create_dir_all(&self.restore_dir)
                    .map_err(|e| io_error(format!("creating {}", self.restore_dir.display()), e))?;
                let mut planned = BTreeMap::new();
                for (device, path) in files {
                    if path.exists() {
                        return Err(Error::new(
                            ErrorKind::Refused,
                            format!("{} exists; not overwriting it", path.display()),
                        ));
                    }
                    let file_name = path
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let partial = self.restore_dir.join(format!(".{file_name}.partial"));
                    if partial.exists() {
                        return Err(Error::new(
                            ErrorKind::Refused,
                            format!(
                                "{} exists: a restore to {} is running or was interrupted (remove the partial file to restore again)",
                                partial.display(),
                                path.display()
                            ),
                        ));
                    }
                    planned.insert(device, (path, partial));
                }
                (name, RestoreDestination::Files(planned))
            }
            other => return Err(Error::unsupported(format!("restore target {other:?}"))),
        };
        let mut restores = lock(&self.restores);
        if restores.contains_key(&guest) {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("a restore to {guest} is already running"),
            ));
        }
        restores.insert(guest.clone(), destination);
        Ok(Guest::vm(guest))
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let device = &request.volume.volume.device;
        let destination = match self.destination(&request.guest)? {
            RestoreDestination::InPlace(g) => {
                let v = g
                    .volumes
                    .iter()
                    .find(|v| &v.device == device)
                    .ok_or_else(|| {
                        Error::not_found("no export configured for this volume").volume(device)
                    })?;
                SnapshotAccess::Nbd(v.access.clone())
            }
            RestoreDestination::Files(files) => {
                let (_, partial) = files.get(device).ok_or_else(|| {
                    Error::invalid("this volume is not part of the restored snapshot")
                        .volume(device)
                })?;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                // A restored disk is as secret as the guest: owner only.
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let f = options
                    .open(partial)
                    .map_err(|e| io_error(format!("creating {}", partial.display()), e))?;
                f.set_len(request.volume.volume.size)
                    .map_err(|e| io_error(format!("sizing {}", partial.display()), e))?;
                SnapshotAccess::FileHandle(FileAccess::new(partial.clone()))
            }
        };
        Ok(VolumeImport::merged_into(destination))
    }

    async fn restore_vm_volume_cleanup(
        &self,
        _guest: &Guest,
        _device: &str,
        _outcome: &Outcome,
    ) -> Result<()> {
        // Files are renamed (or removed) once the whole VM is done.
        Ok(())
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(destination) = lock(&self.restores).remove(&guest.id.0) else {
            return Ok(());
        };
        let RestoreDestination::Files(files) = destination else {
            return Ok(());
        };
        if !outcome.is_success() {
            return Self::remove_partial(&files);
        }
        // Every volume written: make them durable, then give them their
        // final names (no file under a final name is ever half written).
        for (device, (path, partial)) in &files {
            let result = std::fs::File::open(partial)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::rename(partial, path));
            if let Err(e) = result {
                let _ = Self::remove_partial(&files);
                return Err(io_error(format!("finishing {}", path.display()), e).volume(device));
            }
        }
        if let Ok(dir) = std::fs::File::open(&self.restore_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::testing::{NoProbe, check_all};

    fn access(export: &str) -> NbdAccess {
        NbdAccess::new(
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 10809,
            },
            export,
        )
    }

    fn provider(bitmap: Option<&str>, dir: PathBuf) -> NbdProvider {
        NbdProvider::new(
            [NbdGuest::single(
                "vm1",
                access("disk"),
                1 << 20,
                bitmap.map(str::to_owned),
            )],
            dir,
        )
    }

    fn snapshot(guest: &str, devices: &[(&str, u64)]) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId("s1".into()),
            platform: "ovirt".into(),
            guest: GuestId(guest.into()),
            archive: ArchiveName::new("vm/x/1").unwrap(),
            time: 1,
            volumes: devices
                .iter()
                .map(|(d, size)| StoredVolume {
                    volume: Volume {
                        device: (*d).into(),
                        size: *size,
                        format: VolumeFormat::Raw,
                    },
                    base: None,
                    bitmap_mode: BitmapMode::None,
                    checkpoint: None,
                })
                .collect(),
            warnings: vec![],
            verified: None,
        }
    }

    fn request(snapshot: SnapshotInfo, target: RestoreTarget) -> RestoreVmRequest {
        let config = ConfigBlob::json(&serde_json::json!({}));
        RestoreVmRequest::new(
            ArchiveView::new(
                snapshot,
                Some(config.clone()),
                None,
                serde_json::Value::Null,
            ),
            target,
            config,
            None,
        )
    }

    async fn destination_of(p: &NbdProvider, guest: &Guest, sv: &StoredVolume) -> SnapshotAccess {
        let import = p
            .restore_vm_volume_init(&RestoreVolumeRequest::new(
                guest.clone(),
                sv.clone(),
                RestoreSources::new("nbd://unused"),
            ))
            .await
            .unwrap();
        assert_eq!(import.writes.len(), 1);
        import.writes[0].destination.clone()
    }

    #[tokio::test]
    async fn passes_the_conformance_kit() {
        let p = provider(Some("cbt0"), std::env::temp_dir());
        check_all(&p, &Guest::vm("vm1"), &NoProbe).await.unwrap();
        assert!(p.active_backups().is_empty());
    }

    #[tokio::test]
    async fn without_a_bitmap_every_backup_is_full() {
        let p = provider(None, std::env::temp_dir());
        let plan = p
            .backup_vm_query_incremental(&Guest::vm("vm1"), None)
            .await
            .unwrap();
        assert!(plan.is_empty());
    }

    #[tokio::test]
    async fn unknown_guest_is_a_clear_error() {
        let p = provider(None, std::env::temp_dir());
        let e = p.backup_init(&Guest::vm("nope"), 1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("guest nope"), "{e}");
    }

    #[tokio::test]
    async fn every_volume_of_a_new_guest_gets_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(None, dir.path().to_path_buf());
        let snap = snapshot("vm9", &[("sda", 4096), ("sdb", 8192), ("disk/3", 512)]);
        let guest = p
            .restore_vm_init(&request(
                snap.clone(),
                RestoreTarget::NewGuest {
                    name: Some("k".into()),
                },
            ))
            .await
            .unwrap();
        let mut paths = Vec::new();
        for sv in &snap.volumes {
            match destination_of(&p, &guest, sv).await {
                SnapshotAccess::FileHandle(f) => {
                    assert_eq!(std::fs::metadata(&f.path).unwrap().len(), sv.volume.size);
                    paths.push(f.path);
                }
                other => panic!("{other:?}"),
            }
        }
        #[cfg(unix)]
        for path in &paths {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 3, "one file per volume: {paths:?}");
        p.restore_vm_cleanup(&guest, &Outcome::ok()).await.unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["k-disk_3.raw", "k-sda.raw", "k-sdb.raw"]);
    }

    #[tokio::test]
    async fn a_failed_restore_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(None, dir.path().to_path_buf());
        let snap = snapshot("vm9", &[("sda", 4096), ("sdb", 8192)]);
        let guest = p
            .restore_vm_init(&request(
                snap.clone(),
                RestoreTarget::NewGuest { name: None },
            ))
            .await
            .unwrap();
        destination_of(&p, &guest, &snap.volumes[0]).await;
        p.restore_vm_cleanup(&guest, &Outcome::failed_with("injected"))
            .await
            .unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_interrupted_restore_is_never_taken_for_a_finished_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(None, dir.path().to_path_buf());
        let snap = snapshot("vm9", &[("sda", 4096)]);
        let target = || RestoreTarget::NewGuest {
            name: Some("k".into()),
        };
        let guest = p
            .restore_vm_init(&request(snap.clone(), target()))
            .await
            .unwrap();
        destination_of(&p, &guest, &snap.volumes[0]).await;
        // The process dies here (kill -9): no cleanup runs. The data sits
        // under a temporary name, never under the final one.
        assert!(!dir.path().join("k.raw").exists());
        assert!(dir.path().join(".k.raw.partial").exists());
        let other = provider(None, dir.path().to_path_buf());
        let e = other
            .restore_vm_init(&request(snap, target()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("interrupted"), "{e}");
    }

    #[tokio::test]
    async fn two_volumes_mapping_to_one_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(None, dir.path().to_path_buf());
        let snap = snapshot("vm9", &[("a/b", 4096), ("a_b", 4096)]);
        let e = p
            .restore_vm_init(&request(snap, RestoreTarget::NewGuest { name: None }))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("would both be restored"), "{e}");
    }

    #[tokio::test]
    async fn a_new_guest_named_like_an_export_never_writes_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(None, dir.path().to_path_buf());
        let snap = snapshot("vm1", &[(DEVICE, 4096)]);
        let guest = p
            .restore_vm_init(&request(
                snap.clone(),
                RestoreTarget::NewGuest {
                    name: Some("vm1".into()),
                },
            ))
            .await
            .unwrap();
        match destination_of(&p, &guest, &snap.volumes[0]).await {
            SnapshotAccess::FileHandle(f) => assert!(f.path.starts_with(dir.path())),
            other => panic!("a new guest was restored into {other:?}"),
        }
        p.restore_vm_cleanup(&guest, &Outcome::ok()).await.unwrap();
        assert!(dir.path().join("vm1.raw").exists());
    }

    #[tokio::test]
    async fn in_place_writes_into_the_configured_exports() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(None, dir.path().to_path_buf());
        let snap = snapshot("vm1", &[(DEVICE, 4096)]);
        let guest = p
            .restore_vm_init(&request(snap.clone(), RestoreTarget::InPlace))
            .await
            .unwrap();
        match destination_of(&p, &guest, &snap.volumes[0]).await {
            SnapshotAccess::Nbd(n) => assert_eq!(n.export, "disk"),
            other => panic!("{other:?}"),
        }
        p.restore_vm_cleanup(&guest, &Outcome::ok()).await.unwrap();
        // A stored volume larger than the export is refused.
        let big = snapshot("vm1", &[(DEVICE, 2 << 20)]);
        let e = p
            .restore_vm_init(&request(big, RestoreTarget::InPlace))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");
    }
}
