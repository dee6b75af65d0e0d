//! # provider-nbd: back up any NBD export
//!
//! A provider for "platforms" that are just NBD exports: a disk served by
//! `qemu-nbd`, `qemu-storage-daemon` or `nbdkit`. Each guest is one export
//! (one volume, device `disk0`); the host reads it through the `nbd`
//! mechanism.
//!
//! Incrementals use a qemu persistent dirty bitmap exported as the meta
//! context `qemu:dirty-bitmap:NAME` (`qemu-nbd --bitmap NAME`). The
//! checkpoint stored with each snapshot is the bitmap's name: the next
//! backup is incremental (`Use`) when the previous snapshot recorded the
//! same bitmap, and a full (`New`) otherwise. A bitmap is a superset of
//! the changes since the previous backup as long as it was not cleared or
//! replaced in between; whoever manages the bitmaps (QMP
//! `block-dirty-bitmap-clear`, or a rotation in one `transaction`) names a
//! new bitmap after rotation, which makes the next backup a full one.
//!
//! Restore writes each volume into a new sparse raw file
//! `<restore_dir>/<name>.raw` (or over the original export in place when
//! it is writable).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use provider_api::*;
use serde::{Deserialize, Serialize};

/// Device name of the single volume of an NBD guest.
pub const DEVICE: &str = "disk0";

/// One NBD export backed up as a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdGuest {
    /// Guest id (names the snapshots).
    pub id: String,
    /// Where the export is.
    pub access: NbdAccess,
    /// Size of the export in bytes (the host learns it when connecting).
    pub size: u64,
    /// qemu dirty bitmap tracking changes, if any.
    pub bitmap: Option<String>,
}

/// The provider.
#[derive(Debug)]
pub struct NbdProvider {
    guests: BTreeMap<String, NbdGuest>,
    restore_dir: PathBuf,
    /// Guests between backup_init and backup_cleanup (for logs/asserts).
    active: Mutex<BTreeMap<String, i64>>,
}

impl NbdProvider {
    /// A provider for these exports; restores go to `restore_dir`.
    pub fn new(guests: impl IntoIterator<Item = NbdGuest>, restore_dir: PathBuf) -> Self {
        NbdProvider {
            guests: guests.into_iter().map(|g| (g.id.clone(), g)).collect(),
            restore_dir,
            active: Mutex::default(),
        }
    }

    /// Guests currently between `backup_init` and `backup_cleanup`.
    pub fn active_backups(&self) -> Vec<String> {
        self.active
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn guest(&self, guest: &Guest) -> Result<&NbdGuest> {
        self.guests.get(&guest.id.0).ok_or_else(|| {
            Error::not_found("no NBD export configured for this guest").guest(&guest.id)
        })
    }

    fn restore_path(&self, name: &str) -> PathBuf {
        self.restore_dir.join(format!("{name}.raw"))
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
        Capabilities {
            containers: false,
            incremental: true,
            hot_add: false,
            restore_in_place: true,
        }
    }

    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        if let Ok(mut a) = self.active.lock() {
            a.clear();
        }
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        self.guest(guest)?;
        if let Ok(mut a) = self.active.lock() {
            a.insert(guest.id.0.clone(), start_time);
        }
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        match guest.kind {
            GuestKind::Vm => Ok(BackupMechanism::Nbd),
            GuestKind::Container => Err(Error::unsupported("container backup")),
        }
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        let g = self.guest(guest)?;
        let Some(bitmap) = &g.bitmap else {
            return Ok(IncrementalPlan::new());
        };
        let same_bitmap = previous
            .and_then(|p| p.snapshot.volume(DEVICE))
            .and_then(|v| v.checkpoint.as_ref())
            .is_some_and(|c| &c.0 == bitmap);
        let mode = if same_bitmap {
            BitmapMode::Use
        } else {
            BitmapMode::New
        };
        Ok([(DEVICE.to_owned(), mode)].into())
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        let g = self.guest(guest)?;
        let mode = request.mode(DEVICE);
        let mut access = g.access.clone();
        access.dirty_bitmap_context = g.bitmap.as_deref().map(bitmap_context);
        let dirty = if mode == BitmapMode::Use {
            DirtySource::NbdBitmap
        } else {
            DirtySource::All
        };
        Ok(VmBackup {
            guest_config: ConfigBlob::json(&serde_json::json!({
                "export": g.access.uri(),
                "size": g.size,
                "bitmap": g.bitmap,
            })),
            firewall_config: None,
            metadata: serde_json::Value::Null,
            volumes: vec![VolumeAccess {
                volume: Volume {
                    device: DEVICE.to_owned(),
                    size: g.size,
                    format: VolumeFormat::Raw,
                },
                access: SnapshotAccess::Nbd(access),
                bitmap_mode: mode,
                dirty,
                checkpoint: g.bitmap.clone().map(Checkpoint),
                base: None,
            }],
            warnings: Vec::new(),
        })
    }

    async fn backup_cleanup(&self, guest: &Guest, _outcome: &Outcome) -> Result<BackupStats> {
        if let Ok(mut a) = self.active.lock() {
            a.remove(&guest.id.0);
        }
        Ok(BackupStats::default())
    }

    async fn restore_get_mechanism(&self, kind: GuestKind) -> Result<RestoreMechanism> {
        match kind {
            GuestKind::Vm => Ok(RestoreMechanism::QemuImg),
            GuestKind::Container => Err(Error::unsupported("container restore")),
        }
    }

    async fn archive_get_guest_config(&self, archive: &ArchiveView) -> Result<ConfigBlob> {
        archive
            .guest_config
            .clone()
            .ok_or_else(|| Error::not_found("the archive has no guest configuration"))
    }

    async fn archive_get_firewall_config(
        &self,
        archive: &ArchiveView,
    ) -> Result<Option<ConfigBlob>> {
        Ok(archive.firewall_config.clone())
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let original = &request.archive.snapshot.guest;
        match &request.target {
            RestoreTarget::InPlace => {
                let g = self.guests.get(&original.0).ok_or_else(|| {
                    Error::not_found("no NBD export configured for the original guest")
                        .guest(original)
                })?;
                Ok(Guest::vm(g.id.clone()))
            }
            RestoreTarget::NewGuest { name } => {
                let name = name
                    .clone()
                    .unwrap_or_else(|| format!("{original}-restored"));
                if name.contains('/') || name.is_empty() {
                    return Err(Error::invalid(format!("restore name {name:?}")));
                }
                std::fs::create_dir_all(&self.restore_dir)?;
                if self.restore_path(&name).exists() {
                    return Err(Error::new(
                        ErrorKind::Refused,
                        format!(
                            "{} exists; not overwriting it",
                            self.restore_path(&name).display()
                        ),
                    ));
                }
                Ok(Guest::vm(name))
            }
        }
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let destination = match self.guests.get(&request.guest.id.0) {
            Some(g) => SnapshotAccess::Nbd(g.access.clone()),
            None => {
                let path = self.restore_path(&request.guest.id.0);
                let f = std::fs::File::create(&path)?;
                f.set_len(request.volume.volume.size)?;
                SnapshotAccess::FileHandle(FileAccess { path })
            }
        };
        Ok(VolumeImport {
            writes: vec![LayerWrite {
                layer: Layer::Merged,
                destination,
            }],
        })
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        _device: &str,
        outcome: &Outcome,
    ) -> Result<()> {
        // A failed restore into a new file leaves no half-written image.
        if !outcome.success && !self.guests.contains_key(&guest.id.0) {
            let path = self.restore_path(&guest.id.0);
            if path.exists() {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    async fn restore_vm_cleanup(&self, _guest: &Guest, _outcome: &Outcome) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::testing::{NoProbe, check_all};

    fn provider(bitmap: Option<&str>) -> NbdProvider {
        NbdProvider::new(
            [NbdGuest {
                id: "vm1".into(),
                access: NbdAccess {
                    address: NbdAddress::Tcp {
                        host: "127.0.0.1".into(),
                        port: 10809,
                    },
                    export: "disk".into(),
                    tls: None,
                    dirty_bitmap_context: None,
                },
                size: 1 << 20,
                bitmap: bitmap.map(str::to_owned),
            }],
            std::env::temp_dir(),
        )
    }

    #[tokio::test]
    async fn passes_the_conformance_kit() {
        let p = provider(Some("cbt0"));
        check_all(&p, &Guest::vm("vm1"), &NoProbe).await.unwrap();
        assert!(p.active_backups().is_empty());
    }

    #[tokio::test]
    async fn without_a_bitmap_every_backup_is_full() {
        let p = provider(None);
        let plan = p
            .backup_vm_query_incremental(&Guest::vm("vm1"), None)
            .await
            .unwrap();
        assert!(plan.is_empty());
    }

    #[tokio::test]
    async fn unknown_guest_is_a_clear_error() {
        let p = provider(None);
        let e = p.backup_init(&Guest::vm("nope"), 1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("guest nope"), "{e}");
    }
}
