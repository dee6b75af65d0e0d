//! [`Kit`]: the entry point, and the harness every check runs in (a fresh
//! recording target, the provider behind the recording decorator, the
//! engine's drivers, guests the check created and removes at the end).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use engine::{
    BackupDriver, JobOptions, JobReport, NbdExposer, RestoreDriver, RestoreReport, StandardMover,
};
use provider_api::{
    BackupProvider, Guest, JobInfo, RestoreTarget, Result, SnapshotId, SnapshotInfo, Target,
};

use crate::content::{CHUNK, MIB, compare, pattern};
use crate::driver::{DriverVolume, PlatformDriver};
use crate::recorder::Recorder;
use crate::report::{Check, CheckReport, Failure, Report, Status};
use crate::target::{Faults, KitTarget};

/// The default volume sizes of a kit guest: three sizes that are not
/// multiples of each other, the first not a multiple of 4 MiB.
pub const DEFAULT_VOLUME_SIZES: [u64; 3] = [5 * MIB + 4096, 9 * MIB, 12 * MIB];

/// The conformance kit for one provider on one platform.
///
/// Build it with [`Kit::new`], adjust it with [`Kit::skip`],
/// [`Kit::volume_sizes`] and [`Kit::guest_prefix`], then call
/// [`Kit::run_all`] or one check's method.
pub struct Kit {
    provider: Arc<dyn BackupProvider>,
    driver: Arc<dyn PlatformDriver>,
    skips: BTreeMap<Check, String>,
    sizes: Vec<u64>,
    prefix: String,
    host_id: String,
    counter: AtomicU64,
}

impl std::fmt::Debug for Kit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kit")
            .field("provider", &self.provider.provider_name())
            .field("skips", &self.skips)
            .field("sizes", &self.sizes)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

static KITS: AtomicU64 = AtomicU64::new(0);

impl Kit {
    /// A kit for `provider`, with `driver` playing the platform's operator
    /// and guests.
    pub fn new(provider: Arc<dyn BackupProvider>, driver: Arc<dyn PlatformDriver>) -> Self {
        let n = KITS.fetch_add(1, Ordering::Relaxed);
        Kit {
            provider,
            driver,
            skips: BTreeMap::new(),
            sizes: DEFAULT_VOLUME_SIZES.to_vec(),
            prefix: format!("kit{}", std::process::id()),
            host_id: format!("conformance-{}-{n}", std::process::id()),
            counter: AtomicU64::new(0),
        }
    }

    /// Do not run `check`; the report lists it as skipped with `reason`
    /// (say why the platform cannot do it, and where that is tracked).
    pub fn skip(mut self, check: Check, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.trim().is_empty() {
            reason = "skipped without a reason".into();
        }
        self.skips.insert(check, reason);
        self
    }

    /// Volume sizes (bytes) of the guests the kit creates, instead of
    /// [`DEFAULT_VOLUME_SIZES`]. Keep them a few MiB; use at least three
    /// sizes that are not multiples of each other where the platform
    /// allows. [`PlatformDriver::max_volumes`] still applies. Sizes below
    /// 64 KiB are raised to 64 KiB; an empty list keeps the defaults.
    pub fn volume_sizes(mut self, sizes: Vec<u64>) -> Self {
        if !sizes.is_empty() {
            self.sizes = sizes.into_iter().map(|s| s.max(64 * 1024)).collect();
        }
        self
    }

    /// Names of the guests the kit creates start with `prefix` (default
    /// `kit<pid>`).
    pub fn guest_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Run every check of [`Check::ALL`] in order; stop at the first
    /// failure (whose [`Failure::before`] holds the checks done so far).
    pub async fn run_all(&self) -> std::result::Result<Report, Failure> {
        let mut report = Report::default();
        for check in Check::ALL {
            match self.run(check).await {
                Ok(r) => report.checks.push(r),
                Err(mut f) => {
                    f.before = report;
                    return Err(f);
                }
            }
        }
        Ok(report)
    }

    /// Run one check (or report it skipped).
    pub async fn run(&self, check: Check) -> std::result::Result<CheckReport, Failure> {
        if let Some(reason) = self.skip_reason(check) {
            return Ok(CheckReport::skipped(check, reason));
        }
        let started = Instant::now();
        let mut session = Session::start(self, check).await?;
        let result = match check {
            Check::Lifecycle => crate::checks::lifecycle(&mut session).await,
            Check::CapabilityHonesty => crate::checks::capability_honesty(&mut session).await,
            Check::RoundTrip => crate::checks::round_trip(&mut session).await,
            Check::IncrementalReads => crate::checks::incremental_reads(&mut session).await,
            Check::MultiGuest => crate::checks::multi_guest(&mut session).await,
            Check::RestoreCleanups => crate::checks::restore_cleanups(&mut session).await,
            Check::FailureInjection => crate::checks::failure_injection(&mut session).await,
            // Skipped above: the ContainerKit runs it.
            Check::Containers => Ok(()),
        };
        let notes = session.finish(result).await?;
        Ok(CheckReport {
            check,
            status: Status::Passed,
            notes,
            elapsed: started.elapsed(),
        })
    }

    /// [`Check::Lifecycle`].
    pub async fn lifecycle(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::Lifecycle).await
    }

    /// [`Check::CapabilityHonesty`].
    pub async fn capability_honesty(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::CapabilityHonesty).await
    }

    /// [`Check::RoundTrip`].
    pub async fn round_trip(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::RoundTrip).await
    }

    /// [`Check::IncrementalReads`] (skipped when the provider denies
    /// incrementals).
    pub async fn incremental_reads(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::IncrementalReads).await
    }

    /// [`Check::MultiGuest`].
    pub async fn multi_guest(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::MultiGuest).await
    }

    /// [`Check::RestoreCleanups`].
    pub async fn restore_cleanups(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::RestoreCleanups).await
    }

    /// [`Check::FailureInjection`].
    pub async fn failure_injection(&self) -> std::result::Result<CheckReport, Failure> {
        self.run(Check::FailureInjection).await
    }

    fn skip_reason(&self, check: Check) -> Option<String> {
        if let Some(r) = self.skips.get(&check) {
            return Some(r.clone());
        }
        match check {
            Check::Containers => Some("container checks run in ContainerKit".into()),
            Check::IncrementalReads if !self.provider.capabilities().incremental => {
                Some("capabilities().incremental is false".into())
            }
            _ => None,
        }
    }

    /// The volume sizes for guests of this platform.
    pub(crate) fn sizes(&self) -> Vec<u64> {
        let max = self.driver.max_volumes().max(1);
        self.sizes.iter().copied().take(max).collect()
    }

    fn unique(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn guest_name(&self, label: &str) -> String {
        format!("{}-{label}-{}", self.prefix, self.unique())
    }

    pub(crate) fn provider(&self) -> &Arc<dyn BackupProvider> {
        &self.provider
    }

    pub(crate) fn driver(&self) -> &Arc<dyn PlatformDriver> {
        &self.driver
    }
}

/// Seconds since the epoch, distinct per call in this process (snapshots
/// are named by time).
fn job_time() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let prev = LAST.fetch_max(now, Ordering::SeqCst);
    if prev >= now {
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        now
    }
}

/// A guest the kit created, with what the kit believes it holds.
pub(crate) struct TestGuest {
    pub guest: Guest,
    pub volumes: Vec<DriverVolume>,
    /// Per volume: the content the guest holds (what the platform started
    /// it with, plus every write of the kit).
    pub model: Vec<Vec<u8>>,
}

impl TestGuest {
    pub(crate) fn id(&self) -> &str {
        &self.guest.id.0
    }
}

/// What the guest held at a backup, and the snapshot it went into.
#[derive(Clone)]
pub(crate) struct Taken {
    pub what: String,
    pub snapshot: SnapshotInfo,
    pub expected: Vec<Vec<u8>>,
}

/// One check's run.
pub(crate) struct Session<'k> {
    pub kit: &'k Kit,
    pub check: Check,
    pub provider: Arc<Recorder>,
    pub target: KitTarget,
    pub faults: Arc<Faults>,
    exposer: Arc<NbdExposer>,
    logs: tempfile::TempDir,
    created: Vec<Guest>,
    removed: std::collections::BTreeSet<provider_api::GuestId>,
    pub notes: Vec<String>,
}

impl<'k> Session<'k> {
    async fn start(kit: &'k Kit, check: Check) -> std::result::Result<Self, Failure> {
        let fail = |m: String| Failure::new(check, m);
        let logs = tempfile::tempdir()
            .map_err(|e| fail(format!("creating a directory for task logs: {e}")))?;
        let exposer = NbdExposer::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| fail(format!("starting the restore NBD exposer: {}", e.report())))?;
        let faults = Arc::new(Faults::default());
        let session = Session {
            kit,
            check,
            provider: Arc::new(Recorder::new(kit.provider.clone(), faults.clone())),
            target: KitTarget::new(faults.clone()),
            faults,
            exposer: Arc::new(exposer),
            logs,
            created: Vec::new(),
            removed: std::collections::BTreeSet::new(),
            notes: Vec::new(),
        };
        let left = session.driver_leftovers().await?;
        if !left.is_empty() {
            return Err(session.fail(format!(
                "the platform is not clean before the check starts (an earlier test left: {}); \
                 give each kit run a platform of its own",
                left.join("; ")
            )));
        }
        Ok(session)
    }

    /// Remove the guests, stop the exposer, check the platform is clean.
    async fn finish(
        mut self,
        result: std::result::Result<(), Failure>,
    ) -> std::result::Result<Vec<String>, Failure> {
        let mut guests = std::mem::take(&mut self.created);
        guests.extend(self.provider.restored_guests());
        for g in guests {
            self.remove_guest(&g).await;
        }
        self.exposer.server().shutdown().await;
        result?;
        self.leftovers("the check").await?;
        Ok(self.notes)
    }

    pub(crate) fn fail(&self, message: impl Into<String>) -> Failure {
        Failure::new(self.check, message)
    }

    pub(crate) fn driver(&self) -> &dyn PlatformDriver {
        &**self.kit.driver()
    }

    pub(crate) fn sizes(&self) -> Vec<u64> {
        self.kit.sizes()
    }

    pub(crate) fn granularity(&self) -> u64 {
        self.driver().tracking_granularity().max(1)
    }

    fn driver_error(&self, what: &str, e: provider_api::Error) -> Failure {
        self.fail(format!("platform driver: {what} failed: {}", e.report()))
    }

    async fn driver_leftovers(&self) -> std::result::Result<Vec<String>, Failure> {
        self.driver()
            .leftovers()
            .await
            .map_err(|e| self.driver_error("leftovers()", e))
    }

    /// Fail when the platform holds anything a backup or restore left.
    pub(crate) async fn leftovers(&self, after: &str) -> std::result::Result<(), Failure> {
        let left = self.driver_leftovers().await?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(self.fail(format!(
                "after {after} the platform still holds: {}",
                left.join("; ")
            )))
        }
    }

    /// A guest named after `label` with volumes of `sizes`; its initial
    /// content is read back as the model.
    pub(crate) async fn new_guest(
        &mut self,
        label: &str,
        sizes: &[u64],
    ) -> std::result::Result<TestGuest, Failure> {
        let name = self.kit.guest_name(label);
        let guest = self
            .driver()
            .create_guest(&name, sizes)
            .await
            .map_err(|e| self.driver_error(&format!("create_guest({name})"), e))?;
        self.created.push(guest.clone());
        let volumes = self.volumes_of(&guest).await?;
        if volumes.len() != sizes.len() {
            return Err(self
                .fail(format!(
                    "platform driver: create_guest asked for {} volumes, volumes() lists {}",
                    sizes.len(),
                    volumes.len()
                ))
                .guest(&guest.id));
        }
        let mut devices = std::collections::BTreeSet::new();
        for (v, want) in volumes.iter().zip(sizes) {
            if v.size < *want || !devices.insert(v.device.clone()) {
                return Err(self
                    .fail(format!(
                        "platform driver: volume {:?} of {} bytes for a request of {want} \
                         (sizes must be at least the request, devices unique)",
                        v.device, v.size
                    ))
                    .guest(&guest.id));
            }
        }
        let mut model = Vec::new();
        for v in &volumes {
            model.push(self.read(&guest, v).await?);
        }
        Ok(TestGuest {
            guest,
            volumes,
            model,
        })
    }

    pub(crate) async fn volumes_of(
        &self,
        guest: &Guest,
    ) -> std::result::Result<Vec<DriverVolume>, Failure> {
        self.driver()
            .volumes(guest)
            .await
            .map_err(|e| self.driver_error("volumes()", e).guest(&guest.id))
    }

    async fn read(&self, guest: &Guest, v: &DriverVolume) -> std::result::Result<Vec<u8>, Failure> {
        let data = self.driver().read(guest, &v.device).await.map_err(|e| {
            self.driver_error("read()", e)
                .guest(&guest.id)
                .volume(&v.device)
        })?;
        if data.len() as u64 != v.size {
            return Err(self
                .fail(format!(
                    "platform driver: read() returned {} bytes of a {}-byte volume",
                    data.len(),
                    v.size
                ))
                .guest(&guest.id)
                .volume(&v.device));
        }
        Ok(data)
    }

    /// The guest writes `data` at `offset` of its volume `vol`.
    pub(crate) async fn write(
        &self,
        g: &mut TestGuest,
        vol: usize,
        offset: u64,
        data: Vec<u8>,
    ) -> std::result::Result<(), Failure> {
        let device = g.volumes[vol].device.clone();
        self.driver()
            .write(&g.guest, &device, offset, &data)
            .await
            .map_err(|e| {
                self.driver_error(&format!("write({offset}, {} bytes)", data.len()), e)
                    .guest(&g.guest.id)
                    .volume(&device)
            })?;
        let m = &mut g.model[vol];
        let end = offset as usize + data.len();
        if m.len() < end {
            m.resize(end, 0);
        }
        m[offset as usize..end].copy_from_slice(&data);
        Ok(())
    }

    /// Fill every volume with the pattern `seed`, leaving every fourth MiB
    /// as the platform created it (holes where it starts with zeroes).
    pub(crate) async fn fill(
        &self,
        g: &mut TestGuest,
        seed: u64,
    ) -> std::result::Result<(), Failure> {
        for vol in 0..g.volumes.len() {
            let size = g.volumes[vol].size;
            let mut pos = 0;
            while pos < size {
                let len = MIB.min(size - pos);
                if (pos / MIB) % 4 != 2 {
                    let data = pattern(seed ^ ((vol as u64) << 32), pos, len as usize);
                    self.write(g, vol, pos, data).await?;
                }
                pos += len;
            }
        }
        Ok(())
    }

    /// The writes a guest makes between two backups, on volume `vol`: its
    /// first byte and its last byte, a write straddling every 4 MiB
    /// boundary, one in the middle (in a hole left by [`Session::fill`]
    /// where there is one). Returns the ranges written (`offset, length`).
    pub(crate) async fn scatter(
        &self,
        g: &mut TestGuest,
        vol: usize,
        seed: u64,
    ) -> std::result::Result<Vec<(u64, u64)>, Failure> {
        let size = g.volumes[vol].size;
        let mut ranges = Vec::new();
        for at in [0, size - 1] {
            let old = g.model[vol][at as usize];
            self.write(g, vol, at, vec![!old]).await?;
            ranges.push((at, 1));
        }
        let mut boundary = CHUNK;
        while boundary < size {
            let start = boundary.saturating_sub(3000).max(1);
            let end = (boundary + 5000).min(size - 1);
            let data = pattern(seed ^ 0xb0, start, (end - start) as usize);
            self.write(g, vol, start, data).await?;
            ranges.push((start, end - start));
            boundary += CHUNK;
        }
        // In the hole `fill` leaves at 2..3 MiB where the volume has one.
        let (middle, len) = if size > 3 * MIB {
            (2 * MIB + 12_345, 8192)
        } else {
            (size / 2, (size / 4).min(8192))
        };
        if middle > 1 && len > 0 {
            let data = pattern(seed ^ 0x3d, middle, len as usize);
            self.write(g, vol, middle, data).await?;
            ranges.push((middle, len));
        }
        Ok(ranges)
    }

    /// Grow volume `vol` to at least `new_size`; the model's new tail is
    /// zeroes.
    pub(crate) async fn grow(
        &self,
        g: &mut TestGuest,
        vol: usize,
        new_size: u64,
    ) -> std::result::Result<(), Failure> {
        let device = g.volumes[vol].device.clone();
        self.driver()
            .grow(&g.guest, &device, new_size)
            .await
            .map_err(|e| {
                self.driver_error(&format!("grow({new_size})"), e)
                    .guest(&g.guest.id)
                    .volume(&device)
            })?;
        let volumes = self.volumes_of(&g.guest).await?;
        let Some(v) = volumes.get(vol).filter(|v| v.device == device) else {
            return Err(self
                .fail("platform driver: volumes() changed order or names after grow()")
                .guest(&g.guest.id)
                .volume(&device));
        };
        if v.size < new_size {
            return Err(self
                .fail(format!(
                    "platform driver: grow({new_size}) left the volume at {} bytes",
                    v.size
                ))
                .guest(&g.guest.id)
                .volume(&device));
        }
        g.model[vol].resize(v.size as usize, 0);
        g.volumes = volumes;
        Ok(())
    }

    /// What the guest holds now, read through the driver; it must be what
    /// the kit wrote (else the driver, not the provider, is wrong).
    pub(crate) async fn capture(
        &self,
        g: &mut TestGuest,
    ) -> std::result::Result<Vec<Vec<u8>>, Failure> {
        let volumes = self.volumes_of(&g.guest).await?;
        if volumes != g.volumes {
            return Err(self
                .fail(format!(
                    "platform driver: the guest's volumes changed behind the kit's back: \
                     was {:?}, now {:?}",
                    g.volumes, volumes
                ))
                .guest(&g.guest.id));
        }
        let mut out = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            let data = self.read(&g.guest, v).await?;
            if let Some(d) = compare(&g.model[i], &data) {
                return Err(self
                    .fail(format!(
                        "platform driver: read() does not return what the guest wrote: {}",
                        d.text
                    ))
                    .guest(&g.guest.id)
                    .volume(&v.device)
                    .offset(d.offset));
            }
            out.push(data);
        }
        Ok(out)
    }

    fn job_options(&self) -> JobOptions {
        let n = self.kit.unique();
        let info = JobInfo::new(format!("kit-{}-{n}", self.check.name()), job_time())
            .on_host(self.kit.host_id.clone(), Vec::new());
        JobOptions {
            info,
            parallelism: 1,
            log_dir: self.logs.path().join(format!("job-{n}")),
        }
    }

    /// One backup job over `guests`, as the engine runs it.
    pub(crate) async fn run_job(&self, guests: &[&TestGuest], parallelism: usize) -> JobReport {
        let mut options = self.job_options();
        options.parallelism = parallelism;
        let driver = BackupDriver::new(
            self.provider.clone() as Arc<dyn BackupProvider>,
            Arc::new(self.target.clone()) as Arc<dyn Target>,
            Arc::new(StandardMover::default()),
        );
        driver
            .run_job(&options, guests.iter().map(|g| g.guest.clone()).collect())
            .await
    }

    /// A backup job that must succeed; the platform must be clean after it.
    pub(crate) async fn backup(
        &self,
        guests: &[&TestGuest],
        parallelism: usize,
        what: &str,
    ) -> std::result::Result<Vec<SnapshotInfo>, Failure> {
        let report = self.run_job(guests, parallelism).await;
        if let Some(e) = &report.init_error {
            return Err(self.fail(format!("{what}: job_init failed: {}", e.report())));
        }
        let mut out = Vec::new();
        for o in report.guests {
            match o.result {
                Ok(b) => out.push(b.snapshot),
                Err(e) => {
                    return Err(self
                        .fail(format!("{what} failed: {}", e.report()))
                        .guest(&o.guest.id));
                }
            }
        }
        if let Some(e) = &report.cleanup_error {
            return Err(self.fail(format!("{what}: job_cleanup failed: {}", e.report())));
        }
        self.leftovers(what).await?;
        Ok(out)
    }

    /// Capture the guest, back it up alone, check what the target stored.
    pub(crate) async fn take(
        &self,
        g: &mut TestGuest,
        what: &str,
    ) -> std::result::Result<Taken, Failure> {
        let expected = self.capture(g).await?;
        let snapshot = self
            .backup(&[g], 1, what)
            .await?
            .pop()
            .ok_or_else(|| self.fail(format!("{what}: the job reported no guest")))?;
        let taken = Taken {
            what: what.to_owned(),
            snapshot,
            expected,
        };
        self.verify_stored(g, &taken)?;
        Ok(taken)
    }

    /// The snapshot holds every volume of the guest, at its size, with the
    /// bytes the guest held at backup time.
    pub(crate) fn verify_stored(
        &self,
        g: &TestGuest,
        taken: &Taken,
    ) -> std::result::Result<(), Failure> {
        let snap = &taken.snapshot;
        let what = &taken.what;
        if snap.volumes.len() != g.volumes.len() {
            return Err(self
                .fail(format!(
                    "{what}: the snapshot holds {} volumes ({}), the guest has {} ({})",
                    snap.volumes.len(),
                    snap.volumes
                        .iter()
                        .map(|v| v.volume.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    g.volumes.len(),
                    g.volumes
                        .iter()
                        .map(|v| v.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .guest(g.id()));
        }
        for (i, v) in g.volumes.iter().enumerate() {
            let expected = &taken.expected[i];
            let Some(stored) = snap.volume(&v.device) else {
                return Err(self
                    .fail(format!(
                        "{what}: the snapshot has no volume named {:?} (the provider must expose \
                         each volume under the device name the driver reports)",
                        v.device
                    ))
                    .guest(g.id())
                    .volume(&v.device));
            };
            if stored.volume.size != expected.len() as u64 {
                return Err(self
                    .fail(format!(
                        "{what}: the snapshot records {} bytes, the guest's volume had {}",
                        stored.volume.size,
                        expected.len()
                    ))
                    .guest(g.id())
                    .volume(&v.device));
            }
            let data = self
                .target
                .volume_data(&snap.id, &v.device)
                .unwrap_or_default();
            if let Some(d) = compare(expected, &data) {
                return Err(self
                    .fail(format!(
                        "{what} (snapshot {}, bitmap mode {:?}): the stored volume differs from \
                         what the guest held at backup time: {}",
                        snap.id, stored.bitmap_mode, d.text
                    ))
                    .guest(g.id())
                    .volume(&v.device)
                    .offset(d.offset));
            }
        }
        Ok(())
    }

    /// A restore through the engine.
    pub(crate) async fn restore(
        &self,
        snapshot: &SnapshotId,
        to: RestoreTarget,
    ) -> Result<RestoreReport> {
        let driver = RestoreDriver::new(
            self.provider.clone() as Arc<dyn BackupProvider>,
            Arc::new(self.target.clone()) as Arc<dyn Target>,
            Arc::new(StandardMover::default()),
            self.exposer.clone(),
        );
        driver.restore_vm(snapshot, to).await
    }

    /// Restore `taken` to a new guest, compare every volume, check the
    /// platform is clean, remove the new guest.
    pub(crate) async fn restore_new_and_compare(
        &mut self,
        taken: &Taken,
    ) -> std::result::Result<(), Failure> {
        let name = self.kit.guest_name("restored");
        let what = format!("restore of {} to a new guest", taken.what);
        let report = self
            .restore(
                &taken.snapshot.id,
                RestoreTarget::NewGuest {
                    name: Some(name.clone()),
                },
            )
            .await
            .map_err(|e| {
                self.fail(format!("{what} failed: {}", e.report()))
                    .guest(&taken.snapshot.guest)
            })?;
        self.created.push(report.guest.clone());
        self.leftovers(&what).await?;
        self.compare_guest(&report.guest, &taken.expected, &what)
            .await?;
        self.remove_guest(&report.guest).await;
        Ok(())
    }

    /// Remove a guest (once); a failure becomes a note.
    pub(crate) async fn remove_guest(&mut self, guest: &Guest) {
        if !self.removed.insert(guest.id.clone()) {
            return;
        }
        self.created.retain(|g| g.id != guest.id);
        if let Err(e) = self.kit.driver.remove_guest(guest).await {
            self.notes.push(format!(
                "removing guest {} failed: {}",
                guest.id,
                e.report()
            ));
        }
    }

    /// The guest's volumes, in order, hold `expected`.
    pub(crate) async fn compare_guest(
        &self,
        guest: &Guest,
        expected: &[Vec<u8>],
        what: &str,
    ) -> std::result::Result<(), Failure> {
        let volumes = self.volumes_of(guest).await?;
        if volumes.len() != expected.len() {
            return Err(self
                .fail(format!(
                    "{what}: the guest has {} volumes ({}), the snapshot {}",
                    volumes.len(),
                    volumes
                        .iter()
                        .map(|v| v.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    expected.len()
                ))
                .guest(&guest.id));
        }
        for (v, want) in volumes.iter().zip(expected) {
            let data = self.driver().read(guest, &v.device).await.map_err(|e| {
                self.driver_error("read()", e)
                    .guest(&guest.id)
                    .volume(&v.device)
            })?;
            // A platform may round a restored volume up: the extra bytes
            // must then read as zeroes.
            let found = if data.len() > want.len() && data[want.len()..].iter().all(|b| *b == 0) {
                &data[..want.len()]
            } else {
                &data[..]
            };
            if let Some(d) = compare(want, found) {
                return Err(self
                    .fail(format!(
                        "{what}: the restored volume differs from what the guest held at backup \
                         time: {}",
                        d.text
                    ))
                    .guest(&guest.id)
                    .volume(&v.device)
                    .offset(d.offset));
            }
        }
        Ok(())
    }
}
