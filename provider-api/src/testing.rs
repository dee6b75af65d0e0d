//! Conformance kit: checks every provider's own tests run against its
//! platform (the mock hypervisor, or a vendor's lab).
//!
//! Each check drives the provider directly through the lifecycle, the way
//! a host would, and returns `Err(description)` naming the violated rule.
//! A [`PlatformProbe`] supplied by the test lists what the platform still
//! holds (snapshots, attached disks, leases, temporary images) so that the
//! kit can assert that cleanups leave nothing behind.
//!
//! These are protocol checks only: they never read a byte. The data kit
//! (crate `conformance`) runs them first and then proves that backups
//! restore byte for byte.
//!
//! ```no_run
//! use std::sync::Arc;
//! use provider_api::testing::{NoProbe, check_all};
//! use provider_api::{BackupProvider, Guest};
//!
//! async fn conformance(provider: Arc<dyn BackupProvider>) {
//!     check_all(&*provider, &Guest::vm("vm1"), &NoProbe).await.unwrap();
//! }
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "the conformance kit's fakes run inside tests: a failed unwrap is a failed check"
)]

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::access::{SnapshotAccess, VmBackup};
use crate::error::{ErrorKind, Result};
use crate::provider::{
    BackupMechanism, BackupProvider, BackupVmRequest, IncrementalPlan, Outcome, PreviousBackup,
    RestoreMechanism,
};
use crate::target::BaseImageCatalog;
use crate::types::{BaseImageId, BitmapMode, Guest, GuestKind, JobInfo};

/// What the platform holds that a backup may leave behind.
#[async_trait]
pub trait PlatformProbe: Send + Sync {
    /// Descriptions of leftover objects (empty when clean).
    async fn leftovers(&self) -> Vec<String>;
}

/// A probe for platforms that cannot be inspected.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbe;

#[async_trait]
impl PlatformProbe for NoProbe {
    async fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A catalog that holds no base image.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmptyCatalog;

#[async_trait]
impl BaseImageCatalog for EmptyCatalog {
    async fn has_base_image(&self, _id: &BaseImageId) -> Result<bool> {
        Ok(false)
    }
}

/// Outcome of a check: `Err` names the rule that was broken.
pub type CheckResult = std::result::Result<(), String>;

fn fail<T>(rule: &str, detail: impl std::fmt::Display) -> std::result::Result<T, String> {
    Err(format!("{rule}: {detail}"))
}

async fn no_leftovers(probe: &dyn PlatformProbe, after: &str) -> CheckResult {
    let left = probe.leftovers().await;
    if left.is_empty() {
        Ok(())
    } else {
        fail(
            "cleanup leaves nothing behind",
            format!("after {after}: {}", left.join(", ")),
        )
    }
}

fn job() -> JobInfo {
    JobInfo {
        job_id: "conformance".into(),
        start_time: 1_700_000_000,
        ..JobInfo::default()
    }
}

fn check_exposed(guest: &Guest, vm: &VmBackup, plan: &IncrementalPlan) -> CheckResult {
    if vm.volumes.is_empty() {
        return fail(
            "backup_vm exposes the VM's volumes",
            format!("{} has none", guest.id),
        );
    }
    let mut devices = BTreeSet::new();
    for v in &vm.volumes {
        let d = &v.volume.device;
        if d.is_empty() || !devices.insert(d.clone()) {
            return fail("device names are unique and non-empty", format!("{d:?}"));
        }
        if v.volume.size == 0 {
            return fail("volumes have a size", d);
        }
        if !plan.contains_key(d) && v.bitmap_mode == BitmapMode::Use {
            return fail("volumes left out of the plan are not incremental", d);
        }
        if plan.get(d) == Some(&BitmapMode::New) && v.bitmap_mode == BitmapMode::Use {
            return fail("a volume planned New is read in full", d);
        }
        match &v.access {
            SnapshotAccess::Nbd(n) if n.export.is_empty() => {
                return fail("NBD access names an export", d);
            }
            SnapshotAccess::FileHandle(f) if !f.path.exists() => {
                return fail(
                    "file-handle access names a readable file",
                    format!("{d}: {}", f.path.display()),
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// A full backup walks the lifecycle in order and cleans up: `job_init`,
/// `backup_init`, `backup_get_mechanism` (valid for the guest's kind),
/// `backup_vm_query_incremental` without a previous backup (no `Use`),
/// `backup_vm` (volumes exposed), `backup_cleanup(true)`, `job_cleanup`.
pub async fn check_backup_lifecycle(
    provider: &dyn BackupProvider,
    guest: &Guest,
    probe: &dyn PlatformProbe,
) -> CheckResult {
    provider
        .job_init(&job())
        .await
        .map_err(|e| format!("job_init: {}", e.report()))?;
    let r = async {
        let archive = provider
            .backup_init(guest, 1_700_000_000)
            .await
            .map_err(|e| format!("backup_init: {}", e.report()))?;
        if archive.as_str().is_empty() {
            return fail("backup_init names an archive", "empty");
        }
        let mechanism = provider
            .backup_get_mechanism(guest)
            .await
            .map_err(|e| format!("backup_get_mechanism: {}", e.report()))?;
        let valid = match guest.kind {
            GuestKind::Vm => matches!(
                mechanism,
                BackupMechanism::Nbd | BackupMechanism::FileHandle
            ),
            GuestKind::Container => mechanism == BackupMechanism::Directory,
        };
        if !valid {
            return fail("mechanism fits the guest kind", format!("{mechanism:?}"));
        }
        let plan = provider
            .backup_vm_query_incremental(guest, None)
            .await
            .map_err(|e| format!("backup_vm_query_incremental: {}", e.report()))?;
        if let Some((d, _)) = plan.iter().find(|(_, m)| **m == BitmapMode::Use) {
            return fail("no Use without a previous backup", d);
        }
        let vm = provider
            .backup_vm(
                guest,
                BackupVmRequest {
                    plan: plan.clone(),
                    previous: None,
                    base_images: Arc::new(EmptyCatalog),
                },
            )
            .await;
        let vm = match vm {
            Ok(vm) => vm,
            Err(e) => {
                let _ = provider.backup_cleanup(guest, &Outcome::failed(&e)).await;
                return Err(format!("backup_vm: {}", e.report()));
            }
        };
        let exposed = check_exposed(guest, &vm, &plan);
        drop(vm);
        let outcome = match &exposed {
            Ok(()) => Outcome::ok(),
            Err(e) => Outcome::failed_with(e.clone()),
        };
        provider
            .backup_cleanup(guest, &outcome)
            .await
            .map_err(|e| format!("backup_cleanup: {}", e.report()))?;
        exposed
    }
    .await;
    let c = provider.job_cleanup().await;
    r?;
    c.map_err(|e| format!("job_cleanup: {}", e.report()))?;
    no_leftovers(probe, "a successful backup").await
}

/// Cleanup on each failure point a host can inject: after `backup_init`
/// (nothing exposed yet), after `backup_vm` (snapshot exposed, host failed
/// while copying), and a failure cleanup following a success cleanup (the
/// host failed to publish). Each must succeed and leave nothing behind.
pub async fn check_cleanup_on_failure(
    provider: &dyn BackupProvider,
    guest: &Guest,
    probe: &dyn PlatformProbe,
) -> CheckResult {
    let injected = Outcome::failed_with("injected failure");
    provider
        .job_init(&job())
        .await
        .map_err(|e| format!("job_init: {}", e.report()))?;
    let r = async {
        // 1. Failure right after backup_init.
        provider
            .backup_init(guest, 1_700_000_001)
            .await
            .map_err(|e| format!("backup_init: {}", e.report()))?;
        provider
            .backup_cleanup(guest, &injected)
            .await
            .map_err(|e| format!("backup_cleanup(false) after backup_init: {}", e.report()))?;
        no_leftovers(probe, "a failure after backup_init").await?;

        // 2. Failure while the host copies.
        provider
            .backup_init(guest, 1_700_000_002)
            .await
            .map_err(|e| format!("backup_init: {}", e.report()))?;
        let plan = provider
            .backup_vm_query_incremental(guest, None)
            .await
            .map_err(|e| format!("backup_vm_query_incremental: {}", e.report()))?;
        let vm = provider
            .backup_vm(
                guest,
                BackupVmRequest {
                    plan,
                    previous: None,
                    base_images: Arc::new(EmptyCatalog),
                },
            )
            .await;
        drop(vm);
        provider
            .backup_cleanup(guest, &injected)
            .await
            .map_err(|e| format!("backup_cleanup(false) after backup_vm: {}", e.report()))?;
        no_leftovers(probe, "a failure after backup_vm").await?;

        // 3. Success cleanup, then the host fails to publish.
        provider
            .backup_init(guest, 1_700_000_003)
            .await
            .map_err(|e| format!("backup_init: {}", e.report()))?;
        let vm = provider
            .backup_vm(
                guest,
                BackupVmRequest {
                    plan: IncrementalPlan::new(),
                    previous: None,
                    base_images: Arc::new(EmptyCatalog),
                },
            )
            .await
            .map_err(|e| format!("backup_vm: {}", e.report()))?;
        drop(vm);
        provider
            .backup_cleanup(guest, &Outcome::ok())
            .await
            .map_err(|e| format!("backup_cleanup(true): {}", e.report()))?;
        provider
            .backup_cleanup(guest, &injected)
            .await
            .map_err(|e| {
                format!(
                    "backup_cleanup(false) after backup_cleanup(true): {}",
                    e.report()
                )
            })?;
        no_leftovers(probe, "a failure to publish").await
    }
    .await;
    let c = provider.job_cleanup().await;
    r?;
    c.map_err(|e| format!("job_cleanup: {}", e.report()))?;
    Ok(())
}

/// Bitmap-mode semantics: with an empty plan every volume is read in
/// full (no `Use`); with a previous backup the answer only names devices
/// of the guest and never answers `Use` for a device the previous backup
/// lacks.
pub async fn check_bitmap_modes(
    provider: &dyn BackupProvider,
    guest: &Guest,
    previous: Option<&PreviousBackup>,
) -> CheckResult {
    provider
        .job_init(&job())
        .await
        .map_err(|e| format!("job_init: {}", e.report()))?;
    let r = async {
        provider
            .backup_init(guest, 1_700_000_004)
            .await
            .map_err(|e| format!("backup_init: {}", e.report()))?;
        let answer = provider
            .backup_vm_query_incremental(guest, previous)
            .await
            .map_err(|e| format!("backup_vm_query_incremental: {}", e.report()))?;
        for (device, mode) in &answer {
            let known = previous.and_then(|p| p.snapshot.volume(device)).is_some();
            if *mode == BitmapMode::Use && !known {
                let _ = provider.backup_cleanup(guest, &Outcome::ok()).await;
                return fail("Use only for volumes of the previous backup", device);
            }
        }
        let vm = provider
            .backup_vm(
                guest,
                BackupVmRequest {
                    plan: IncrementalPlan::new(),
                    previous: previous.cloned(),
                    base_images: Arc::new(EmptyCatalog),
                },
            )
            .await;
        let checked = match &vm {
            Ok(vm) => check_exposed(guest, vm, &IncrementalPlan::new()),
            Err(e) => Err(format!("backup_vm: {}", e.report())),
        };
        drop(vm);
        provider
            .backup_cleanup(guest, &Outcome::ok())
            .await
            .map_err(|e| format!("backup_cleanup: {}", e.report()))?;
        checked
    }
    .await;
    let c = provider.job_cleanup().await;
    r?;
    c.map_err(|e| format!("job_cleanup: {}", e.report()))?;
    Ok(())
}

/// Abilities the provider does not claim answer `Unsupported` instead of
/// panicking or doing something else; restore mechanisms fit the kind.
pub async fn check_capabilities(provider: &dyn BackupProvider, guest: &Guest) -> CheckResult {
    let caps = provider.capabilities();
    let _ = guest;
    if caps.containers != provider.containers().is_some() {
        return fail(
            "capabilities().containers matches containers()",
            format!(
                "containers claimed: {}, container half given: {}",
                caps.containers,
                provider.containers().is_some()
            ),
        );
    }
    match provider.restore_get_mechanism(GuestKind::Vm).await {
        Ok(RestoreMechanism::QemuImg) => {}
        Ok(m) => return fail("VM restore mechanism is qemu-img", format!("{m:?}")),
        Err(e) => return fail("VM restore mechanism is qemu-img", e.report()),
    }
    match provider.restore_get_mechanism(GuestKind::Container).await {
        Ok(RestoreMechanism::Directory | RestoreMechanism::Tar) if caps.containers => {}
        Err(e) if !caps.containers && e.kind() == ErrorKind::Unsupported => {}
        other => {
            return fail(
                "container restore mechanism matches the containers capability",
                format!("{:?}", other.map_err(|e| e.report())),
            );
        }
    }
    Ok(())
}

/// Every check above that needs no previous backup.
pub async fn check_all(
    provider: &dyn BackupProvider,
    guest: &Guest,
    probe: &dyn PlatformProbe,
) -> CheckResult {
    check_capabilities(provider, guest).await?;
    check_backup_lifecycle(provider, guest, probe).await?;
    check_cleanup_on_failure(provider, guest, probe).await?;
    check_bitmap_modes(provider, guest, None).await?;
    no_leftovers(probe, "the conformance checks").await
}

/// An in-memory [`Target`](crate::target::Target) for tests of hosts and
/// providers: volumes are kept as plain byte vectors, so keep them small.
pub mod memory {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use bytes::Bytes;

    use crate::error::{Error, Result};
    use crate::target::*;
    use crate::types::{BaseImageId, ConfigBlob, Extent, GuestId, PlatformMetadata};

    #[derive(Debug, Clone)]
    struct Stored {
        info: SnapshotInfo,
        configs: BTreeMap<&'static str, ConfigBlob>,
        metadata: PlatformMetadata,
        data: BTreeMap<String, Arc<Vec<u8>>>,
    }

    #[derive(Debug, Default)]
    struct State {
        snapshots: Vec<Stored>,
        base_images: BTreeMap<(String, BaseImageId), Arc<Vec<u8>>>,
    }

    /// The in-memory target. Clones share the same store.
    #[derive(Debug, Clone, Default)]
    pub struct MemoryTarget {
        state: Arc<Mutex<State>>,
    }

    impl MemoryTarget {
        /// An empty target.
        pub fn new() -> Self {
            Self::default()
        }

        /// The bytes of a stored volume (merged view).
        pub fn volume_data(&self, id: &SnapshotId, device: &str) -> Option<Vec<u8>> {
            let st = self.state.lock().unwrap();
            st.snapshots
                .iter()
                .find(|s| &s.info.id == id)
                .and_then(|s| s.data.get(device))
                .map(|d| d.to_vec())
        }

        /// How many base images are stored.
        pub fn base_image_count(&self) -> usize {
            self.state.lock().unwrap().base_images.len()
        }
    }

    fn kind_key(kind: ConfigKind) -> &'static str {
        match kind {
            ConfigKind::Guest => "guest",
            ConfigKind::Firewall => "firewall",
            ConfigKind::Spec => "spec",
        }
    }

    struct Catalog {
        platform: String,
        state: Arc<Mutex<State>>,
    }

    #[async_trait]
    impl BaseImageCatalog for Catalog {
        async fn has_base_image(&self, id: &BaseImageId) -> Result<bool> {
            let st = self.state.lock().unwrap();
            Ok(st
                .base_images
                .contains_key(&(self.platform.clone(), id.clone())))
        }
    }

    type Buffer = Arc<Mutex<Vec<u8>>>;

    struct Writer {
        state: Arc<Mutex<State>>,
        spec: SnapshotSpec,
        pending: Arc<Mutex<Stored>>,
        pending_bases: Arc<Mutex<Vec<(BaseImageId, Buffer)>>>,
        volumes: Vec<(String, Buffer)>,
    }

    struct VolWriter {
        data: Arc<Mutex<Vec<u8>>>,
        written: u64,
        last_end: u64,
        what: String,
    }

    impl VolWriter {
        fn put(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
            if offset < self.last_end {
                return Err(Error::invalid(format!(
                    "{}: write at {offset} goes backwards (last end {})",
                    self.what, self.last_end
                )));
            }
            let mut d = self.data.lock().unwrap();
            let end = offset + bytes.len() as u64;
            if end > d.len() as u64 {
                return Err(Error::invalid(format!(
                    "{}: write {offset}+{} past the end {}",
                    self.what,
                    bytes.len(),
                    d.len()
                )));
            }
            d[offset as usize..end as usize].copy_from_slice(bytes);
            self.written += bytes.len() as u64;
            self.last_end = end;
            Ok(())
        }
    }

    #[async_trait]
    impl VolumeWriter for VolWriter {
        async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
            self.put(offset, &data)
        }
        async fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
            self.put(offset, &vec![0; length as usize])
        }
        async fn finish(self: Box<Self>) -> Result<VolumeStats> {
            Ok(VolumeStats {
                bytes_written: self.written,
                bytes_new: self.written,
                bytes_stored: self.written,
            })
        }
    }

    #[async_trait]
    impl SnapshotWriter for Writer {
        async fn put_config(&mut self, kind: ConfigKind, blob: ConfigBlob) -> Result<()> {
            self.pending
                .lock()
                .unwrap()
                .configs
                .insert(kind_key(kind), blob);
            Ok(())
        }
        async fn put_metadata(&mut self, metadata: PlatformMetadata) -> Result<()> {
            self.pending.lock().unwrap().metadata = metadata;
            Ok(())
        }
        async fn begin_base_image(
            &mut self,
            id: &BaseImageId,
            size: u64,
        ) -> Result<Option<Box<dyn VolumeWriter>>> {
            let key = (self.spec.platform.clone(), id.clone());
            if self.state.lock().unwrap().base_images.contains_key(&key) {
                return Ok(None);
            }
            let data = Arc::new(Mutex::new(vec![0; size as usize]));
            self.pending_bases
                .lock()
                .unwrap()
                .push((id.clone(), data.clone()));
            Ok(Some(Box::new(VolWriter {
                data,
                written: 0,
                last_end: 0,
                what: format!("base image {id}"),
            })))
        }
        async fn begin_volume(&mut self, spec: VolumeSpec) -> Result<Box<dyn VolumeWriter>> {
            let size = spec.volume.size as usize;
            let start: Vec<u8> = match &spec.start_from {
                StartFrom::Empty => vec![0; size],
                StartFrom::Previous(id) => {
                    let st = self.state.lock().unwrap();
                    let prev = st
                        .snapshots
                        .iter()
                        .find(|s| &s.info.id == id)
                        .and_then(|s| s.data.get(&spec.volume.device))
                        .ok_or_else(|| Error::not_found(format!("previous snapshot {id}")))?;
                    prev.to_vec()
                }
                StartFrom::BaseImage(b) => {
                    let key = (self.spec.platform.clone(), b.clone());
                    let pending = self.pending_bases.lock().unwrap();
                    if let Some((_, d)) = pending.iter().find(|(i, _)| i == b) {
                        d.lock().unwrap().clone()
                    } else {
                        let st = self.state.lock().unwrap();
                        st.base_images
                            .get(&key)
                            .ok_or_else(|| Error::not_found(format!("base image {b}")))?
                            .to_vec()
                    }
                }
            };
            let mut start = start;
            start.resize(size, 0);
            let data = Arc::new(Mutex::new(start));
            let device = spec.volume.device.clone();
            {
                let mut p = self.pending.lock().unwrap();
                p.info.volumes.push(StoredVolume {
                    volume: spec.volume.clone(),
                    base: spec.base.clone(),
                    bitmap_mode: spec.bitmap_mode,
                    checkpoint: spec.checkpoint.clone(),
                });
            }
            self.volumes.push((device.clone(), data.clone()));
            Ok(Box::new(VolWriter {
                data,
                written: 0,
                last_end: 0,
                what: format!("volume {device}"),
            }))
        }
        async fn commit(self: Box<Self>, warnings: Vec<String>) -> Result<SnapshotInfo> {
            let mut st = self.state.lock().unwrap();
            for (id, d) in self.pending_bases.lock().unwrap().drain(..) {
                let data = d.lock().unwrap().clone();
                st.base_images
                    .insert((self.spec.platform.clone(), id), Arc::new(data));
            }
            let mut stored = self.pending.lock().unwrap().clone();
            stored.info.warnings = warnings;
            for (device, d) in &self.volumes {
                stored
                    .data
                    .insert(device.clone(), Arc::new(d.lock().unwrap().clone()));
            }
            st.snapshots.push(stored.clone());
            Ok(stored.info)
        }
        async fn abort(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    struct Reader {
        stored: Stored,
        bases: BTreeMap<(String, BaseImageId), Arc<Vec<u8>>>,
    }

    struct VolReader {
        data: Arc<Vec<u8>>,
        base: Option<Arc<Vec<u8>>>,
    }

    #[async_trait]
    impl VolumeReader for VolReader {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes> {
            let end = offset
                .checked_add(length)
                .filter(|e| *e <= self.size())
                .ok_or_else(|| Error::invalid(format!("read {offset}+{length} past the end")))?;
            Ok(Bytes::copy_from_slice(
                &self.data[offset as usize..end as usize],
            ))
        }
        async fn regions(&self, offset: u64, length: u64) -> Result<Vec<Region>> {
            // 4 KiB granularity: zero, inherited (equal to the base) or data.
            let mut out: Vec<Region> = Vec::new();
            let end = (offset + length).min(self.size());
            let mut pos = offset;
            while pos < end {
                let n = (4096 - pos % 4096).min(end - pos);
                let r = pos as usize..(pos + n) as usize;
                let kind = match &self.base {
                    Some(b) if b.get(r.clone()) == Some(&self.data[r.clone()]) => {
                        RegionKind::Inherited
                    }
                    _ if self.data[r].iter().all(|b| *b == 0) => RegionKind::Zero,
                    _ => RegionKind::Data,
                };
                match out.last_mut() {
                    Some(last) if last.kind == kind => last.extent.length += n,
                    _ => out.push(Region {
                        extent: Extent::new(pos, n),
                        kind,
                    }),
                }
                pos += n;
            }
            Ok(out)
        }
    }

    #[async_trait]
    impl SnapshotReader for Reader {
        fn info(&self) -> &SnapshotInfo {
            &self.stored.info
        }
        async fn config(&self, kind: ConfigKind) -> Result<Option<ConfigBlob>> {
            Ok(self.stored.configs.get(kind_key(kind)).cloned())
        }
        async fn metadata(&self) -> Result<PlatformMetadata> {
            Ok(self.stored.metadata.clone())
        }
        async fn open_volume(&self, device: &str, layer: Layer) -> Result<Arc<dyn VolumeReader>> {
            let data = self
                .stored
                .data
                .get(device)
                .cloned()
                .ok_or_else(|| Error::not_found(format!("volume {device}")))?;
            let vol = self
                .stored
                .info
                .volume(device)
                .ok_or_else(|| Error::not_found(format!("volume {device}")))?;
            let base = vol.base.as_ref().and_then(|b| {
                self.bases
                    .get(&(self.stored.info.platform.clone(), b.clone()))
                    .cloned()
            });
            Ok(match layer {
                Layer::Merged => Arc::new(VolReader { data, base: None }),
                Layer::Base => Arc::new(VolReader {
                    data: base.ok_or_else(|| Error::not_found(format!("base of {device}")))?,
                    base: None,
                }),
                Layer::Overlay => Arc::new(VolReader { data, base }),
            })
        }
    }

    #[async_trait]
    impl Target for MemoryTarget {
        async fn begin_snapshot(&self, spec: SnapshotSpec) -> Result<Box<dyn SnapshotWriter>> {
            let n = self.state.lock().unwrap().snapshots.len();
            let info = SnapshotInfo {
                id: SnapshotId(format!(
                    "{}/{}/{}-{n}",
                    spec.platform, spec.guest, spec.time
                )),
                platform: spec.platform.clone(),
                guest: spec.guest.clone(),
                archive: spec.archive.clone(),
                time: spec.time,
                volumes: Vec::new(),
                warnings: Vec::new(),
                verified: None,
            };
            Ok(Box::new(Writer {
                state: self.state.clone(),
                spec,
                pending: Arc::new(Mutex::new(Stored {
                    info,
                    configs: BTreeMap::new(),
                    metadata: PlatformMetadata::Null,
                    data: BTreeMap::new(),
                })),
                pending_bases: Arc::default(),
                volumes: Vec::new(),
            }))
        }
        async fn list_snapshots(
            &self,
            platform: Option<&str>,
            guest: Option<&GuestId>,
        ) -> Result<Vec<SnapshotInfo>> {
            let st = self.state.lock().unwrap();
            Ok(st
                .snapshots
                .iter()
                .filter(|s| platform.is_none_or(|p| s.info.platform == p))
                .filter(|s| guest.is_none_or(|g| &s.info.guest == g))
                .map(|s| s.info.clone())
                .collect())
        }
        async fn open_snapshot(&self, id: &SnapshotId) -> Result<Box<dyn SnapshotReader>> {
            let st = self.state.lock().unwrap();
            let stored = st
                .snapshots
                .iter()
                .find(|s| &s.info.id == id)
                .cloned()
                .ok_or_else(|| Error::not_found(format!("snapshot {id}")))?;
            Ok(Box::new(Reader {
                stored,
                bases: st.base_images.clone(),
            }))
        }
        fn base_images(&self, platform: &str) -> Arc<dyn BaseImageCatalog> {
            Arc::new(Catalog {
                platform: platform.to_owned(),
                state: self.state.clone(),
            })
        }
    }
}
