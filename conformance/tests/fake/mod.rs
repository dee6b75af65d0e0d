//! A small file-backed platform for the kit's self-test: guests are
//! directories, volumes raw files; the guest's writes go through the
//! driver, which records them per 64 KiB tracking block with a sequence
//! number (real change tracking: a checkpoint is a sequence number, the
//! dirty regions since it are the blocks written after it). The provider
//! stages each volume's snapshot as a file (`FileHandle` access) kept
//! until `backup_cleanup`, and restores by handing the host a file to
//! write into.
//!
//! [`Bugs`] turns on deliberate mistakes the kit must catch.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use conformance::{DriverVolume, PlatformDriver};
use provider_api::{
    AccessScope, ArchiveName, ArchiveView, BackupMechanism, BackupProvider, BackupStats,
    BackupVmRequest, BitmapMode, Capabilities, Checkpoint, ConfigBlob, DirtySource, Error, Extent,
    FileAccess, Guest, GuestKind, IncrementalPlan, JobInfo, Outcome, PreviousBackup, RegionList,
    RestoreMechanism, RestoreTarget, RestoreVmRequest, RestoreVolumeRequest, Result,
    SnapshotAccess, VmBackup, Volume, VolumeAccess, VolumeFormat, VolumeImport,
};

/// Tracking granularity of the fake platform.
pub const GRANULARITY: u64 = 64 * 1024;

/// Deliberate mistakes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bugs {
    /// Restore writes every volume of a guest into the same file (named
    /// per guest, not per volume): the multi-disk truncation bug.
    pub shared_restore_file: bool,
    /// When the provider offers `Use`, it stages only the dirty extents
    /// into a sparse file and still exposes it as the whole volume: when
    /// the host needs a full read (the disk grew), zeroes are stored.
    pub dirty_only_staging: bool,
    /// `Use` with every region dirty: the incremental reads everything.
    pub read_everything: bool,
    /// `backup_cleanup(failure)` forgets the staged snapshot files.
    pub leak_on_failure: bool,
    /// Not a bug: the correct form of `dirty_only_staging`. Stage only the
    /// dirty extents when the host will read only those
    /// ([`BackupVmRequest::host_mode`] is `Use`) and say so with
    /// [`AccessScope::DirtyOnly`]; stage the whole volume otherwise.
    pub honest_dirty_staging: bool,
}

struct Vol {
    device: String,
    path: PathBuf,
    /// Bumped whenever tracking is lost (a restore in place).
    epoch: u64,
    /// Tracking block index → sequence number of its last write.
    blocks: BTreeMap<u64, u64>,
}

struct GuestState {
    dir: PathBuf,
    volumes: Vec<Vol>,
}

#[derive(Default)]
struct State {
    guests: BTreeMap<String, GuestState>,
    seq: u64,
    next_id: u64,
    /// Staged snapshot files per guest, until backup_cleanup.
    staged: BTreeMap<String, Vec<PathBuf>>,
    /// Restore leases, until restore_vm_volume_cleanup.
    leases: BTreeSet<String>,
}

/// The platform.
pub struct FakePlatform {
    dir: tempfile::TempDir,
    state: Mutex<State>,
    bugs: Bugs,
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::new(provider_api::ErrorKind::Io, what.to_owned()).with_source(e)
}

impl FakePlatform {
    /// A fresh platform with these bugs.
    pub fn new(bugs: Bugs) -> Arc<FakePlatform> {
        Arc::new(FakePlatform {
            dir: tempfile::tempdir().expect("tempdir"),
            state: Mutex::default(),
            bugs,
        })
    }

    /// The provider.
    pub fn provider(self: &Arc<Self>) -> Arc<dyn BackupProvider> {
        Arc::new(FakeProvider(self.clone()))
    }

    /// The driver.
    pub fn driver(self: &Arc<Self>) -> Arc<dyn PlatformDriver> {
        Arc::new(FakeDriver(self.clone()))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_guest_dir(&self, st: &mut State) -> Result<(String, PathBuf)> {
        st.next_id += 1;
        let id = format!("g{}", st.next_id);
        let dir = self.dir.path().join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| io("creating a guest", e))?;
        Ok((id, dir))
    }
}

fn not_found(guest: &Guest) -> Error {
    Error::not_found(format!("guest {} does not exist", guest.id))
}

/// The dirty extents of `vol` since sequence `since`, clipped to `size`.
fn dirty_since(vol: &Vol, since: u64, size: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (&block, &seq) in &vol.blocks {
        if seq <= since {
            continue;
        }
        let start = block * GRANULARITY;
        if start >= size {
            continue;
        }
        let len = GRANULARITY.min(size - start);
        match out.last_mut() {
            Some(last) if last.end() == start => last.length += len,
            _ => out.push(Extent::new(start, len)),
        }
    }
    out
}

fn parse_checkpoint(c: &Checkpoint) -> Option<(u64, u64)> {
    let (e, s) = c.0.split_once(':')?;
    Some((e.parse().ok()?, s.parse().ok()?))
}

struct FakeProvider(Arc<FakePlatform>);
struct FakeDriver(Arc<FakePlatform>);

#[async_trait]
impl BackupProvider for FakeProvider {
    fn provider_name(&self) -> &str {
        "fake"
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
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }

    async fn backup_get_mechanism(&self, _guest: &Guest) -> Result<BackupMechanism> {
        Ok(BackupMechanism::FileHandle)
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        let st = self.0.state();
        let g = st.guests.get(&guest.id.0).ok_or_else(|| not_found(guest))?;
        Ok(g.volumes
            .iter()
            .map(|v| {
                let has = previous
                    .and_then(|p| p.snapshot.volume(&v.device))
                    .is_some_and(|s| s.checkpoint.is_some());
                let mode = if has {
                    BitmapMode::Use
                } else {
                    BitmapMode::New
                };
                (v.device.clone(), mode)
            })
            .collect())
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        let platform = &self.0;
        let mut st = platform.state();
        st.next_id += 1;
        let stage = platform.dir.path().join(format!("stage-{}", st.next_id));
        std::fs::create_dir_all(&stage).map_err(|e| io("creating a staging directory", e))?;
        let seq = st.seq;
        let g = st.guests.get(&guest.id.0).ok_or_else(|| not_found(guest))?;
        let mut volumes = Vec::new();
        let mut staged = Vec::new();
        let mut warnings = Vec::new();
        for v in &g.volumes {
            let size = std::fs::metadata(&v.path)
                .map_err(|e| io("reading a volume", e))?
                .len();
            let previous = request
                .previous
                .as_ref()
                .and_then(|p| p.snapshot.volume(&v.device))
                .and_then(|s| s.checkpoint.as_ref())
                .and_then(parse_checkpoint);
            let (mode, dirty) = match (request.mode(&v.device), previous) {
                (BitmapMode::Use, Some((epoch, since))) if epoch == v.epoch => {
                    (BitmapMode::Use, Some(dirty_since(v, since, size)))
                }
                (BitmapMode::Use, _) => {
                    warnings.push(format!("{}: change tracking lost; full backup", v.device));
                    (BitmapMode::New, None)
                }
                (m, _) => (m, None),
            };
            let path = stage.join(format!("{}.raw", v.device));
            let host_reads_dirty = request.host_mode(&v.device, size, mode) == BitmapMode::Use;
            let honest = platform.bugs.honest_dirty_staging && host_reads_dirty;
            match (&dirty, platform.bugs.dirty_only_staging || honest) {
                (Some(extents), true) => {
                    // The bug: only the dirty extents, exposed as the volume.
                    let src = std::fs::File::open(&v.path).map_err(|e| io("staging", e))?;
                    let dst = std::fs::File::create(&path).map_err(|e| io("staging", e))?;
                    dst.set_len(size).map_err(|e| io("staging", e))?;
                    for e in extents {
                        let mut buf = vec![0; e.length as usize];
                        src.read_exact_at(&mut buf, e.offset)
                            .map_err(|e| io("staging", e))?;
                        dst.write_all_at(&buf, e.offset)
                            .map_err(|e| io("staging", e))?;
                    }
                }
                _ => {
                    std::fs::copy(&v.path, &path).map_err(|e| io("staging", e))?;
                }
            }
            staged.push(path.clone());
            let source = match dirty {
                Some(_) if platform.bugs.read_everything => DirtySource::All,
                Some(extents) => DirtySource::Regions(Box::new(RegionList::new(extents))),
                None => DirtySource::All,
            };
            volumes.push(
                VolumeAccess::new(
                    Volume {
                        device: v.device.clone(),
                        size,
                        format: VolumeFormat::Raw,
                    },
                    SnapshotAccess::FileHandle(FileAccess::new(path)),
                )
                .bitmap_mode(mode)
                .scope(if honest {
                    AccessScope::DirtyOnly
                } else {
                    AccessScope::Whole
                })
                .dirty(source)
                .checkpoint(Some(Checkpoint(format!("{}:{seq}", v.epoch)))),
            );
        }
        staged.push(stage);
        let devices: Vec<String> = g.volumes.iter().map(|v| v.device.clone()).collect();
        st.staged
            .entry(guest.id.0.clone())
            .or_default()
            .extend(staged);
        let config = ConfigBlob::json(&serde_json::json!({ "devices": devices }));
        Ok(VmBackup::new(config, volumes).warnings(warnings))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        if !outcome.is_success() && self.0.bugs.leak_on_failure {
            return Ok(BackupStats::default());
        }
        let staged = self
            .0
            .state()
            .staged
            .remove(&guest.id.0)
            .unwrap_or_default();
        for p in staged {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
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
        let mut st = self.0.state();
        match &request.target {
            RestoreTarget::NewGuest { .. } => {
                let (id, dir) = self.0.new_guest_dir(&mut st)?;
                st.guests.insert(
                    id.clone(),
                    GuestState {
                        dir,
                        volumes: Vec::new(),
                    },
                );
                Ok(Guest::vm(id))
            }
            RestoreTarget::InPlace => {
                let id = request.archive.snapshot.guest.0.clone();
                if !st.guests.contains_key(&id) {
                    return Err(Error::not_found(format!("guest {id} does not exist")));
                }
                Ok(Guest::vm(id))
            }
            other => Err(Error::unsupported(format!("restore target {other:?}"))),
        }
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let bugs = self.0.bugs;
        let mut st = self.0.state();
        let device = request.volume.volume.device.clone();
        let size = request.volume.volume.size;
        let g = st
            .guests
            .get_mut(&request.guest.id.0)
            .ok_or_else(|| not_found(&request.guest))?;
        let path = match g.volumes.iter_mut().find(|v| v.device == device) {
            Some(v) => {
                // In place: tracking cannot follow what the host writes.
                v.epoch += 1;
                v.blocks.clear();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&v.path)
                    .map_err(|e| io("opening a volume", e))?;
                f.set_len(size).map_err(|e| io("resizing a volume", e))?;
                v.path.clone()
            }
            None => {
                let path = if bugs.shared_restore_file {
                    g.dir.join("restored.raw")
                } else {
                    g.dir.join(format!("{device}.raw"))
                };
                let f = std::fs::File::create(&path).map_err(|e| io("creating a volume", e))?;
                f.set_len(size).map_err(|e| io("sizing a volume", e))?;
                g.volumes.push(Vol {
                    device: device.clone(),
                    path: path.clone(),
                    epoch: 0,
                    blocks: BTreeMap::new(),
                });
                path
            }
        };
        st.leases
            .insert(format!("restore lease {}/{device}", request.guest.id));
        Ok(VolumeImport::merged_into(SnapshotAccess::FileHandle(
            FileAccess::new(path),
        )))
    }

    async fn restore_vm_volume_cleanup(
        &self,
        guest: &Guest,
        device: &str,
        _outcome: &Outcome,
    ) -> Result<()> {
        self.0
            .state()
            .leases
            .remove(&format!("restore lease {}/{device}", guest.id));
        Ok(())
    }

    async fn restore_vm_cleanup(&self, _guest: &Guest, _outcome: &Outcome) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl PlatformDriver for FakeDriver {
    async fn create_guest(&self, _name: &str, sizes: &[u64]) -> Result<Guest> {
        let mut st = self.0.state();
        let (id, dir) = self.0.new_guest_dir(&mut st)?;
        let mut volumes = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let path = dir.join(format!("disk{i}.raw"));
            let f = std::fs::File::create(&path).map_err(|e| io("creating a disk", e))?;
            f.set_len(*size).map_err(|e| io("sizing a disk", e))?;
            volumes.push(Vol {
                device: format!("disk{i}"),
                path,
                epoch: 0,
                blocks: BTreeMap::new(),
            });
        }
        st.guests.insert(id.clone(), GuestState { dir, volumes });
        Ok(Guest::vm(id))
    }

    async fn volumes(&self, guest: &Guest) -> Result<Vec<DriverVolume>> {
        let st = self.0.state();
        let g = st.guests.get(&guest.id.0).ok_or_else(|| not_found(guest))?;
        g.volumes
            .iter()
            .map(|v| {
                let size = std::fs::metadata(&v.path)
                    .map_err(|e| io("reading a disk", e))?
                    .len();
                Ok(DriverVolume {
                    device: v.device.clone(),
                    size,
                })
            })
            .collect()
    }

    async fn write(&self, guest: &Guest, device: &str, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.0.state();
        st.seq += 1;
        let seq = st.seq;
        let g = st
            .guests
            .get_mut(&guest.id.0)
            .ok_or_else(|| not_found(guest))?;
        let v = g
            .volumes
            .iter_mut()
            .find(|v| v.device == device)
            .ok_or_else(|| Error::not_found(format!("disk {device}")))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&v.path)
            .map_err(|e| io("opening a disk", e))?;
        f.write_all_at(data, offset)
            .map_err(|e| io("writing a disk", e))?;
        if !data.is_empty() {
            for block in offset / GRANULARITY..=(offset + data.len() as u64 - 1) / GRANULARITY {
                v.blocks.insert(block, seq);
            }
        }
        Ok(())
    }

    async fn read(&self, guest: &Guest, device: &str) -> Result<Vec<u8>> {
        let path = {
            let st = self.0.state();
            let g = st.guests.get(&guest.id.0).ok_or_else(|| not_found(guest))?;
            g.volumes
                .iter()
                .find(|v| v.device == device)
                .ok_or_else(|| Error::not_found(format!("disk {device}")))?
                .path
                .clone()
        };
        std::fs::read(path).map_err(|e| io("reading a disk", e))
    }

    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> Result<()> {
        let st = self.0.state();
        let g = st.guests.get(&guest.id.0).ok_or_else(|| not_found(guest))?;
        let v = g
            .volumes
            .iter()
            .find(|v| v.device == device)
            .ok_or_else(|| Error::not_found(format!("disk {device}")))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&v.path)
            .map_err(|e| io("opening a disk", e))?;
        f.set_len(new_size).map_err(|e| io("growing a disk", e))
    }

    async fn leftovers(&self) -> Result<Vec<String>> {
        let st = self.0.state();
        let mut out: Vec<String> = st
            .staged
            .iter()
            .flat_map(|(g, files)| {
                files
                    .iter()
                    .map(move |f| format!("staged snapshot of {g}: {}", f.display()))
            })
            .collect();
        out.extend(st.leases.iter().cloned());
        Ok(out)
    }

    async fn remove_guest(&self, guest: &Guest) -> Result<()> {
        let removed = self.0.state().guests.remove(&guest.id.0);
        if let Some(g) = removed {
            std::fs::remove_dir_all(&g.dir).map_err(|e| io("removing a guest", e))?;
        }
        Ok(())
    }

    fn tracking_granularity(&self) -> u64 {
        GRANULARITY
    }
}
