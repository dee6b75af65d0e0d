//! Prune, protection, deletion, garbage collection, verification, stats.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use provider_api::{Error, ErrorKind, GuestId, Result, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, KeptLease, LeaseInfo};
use crate::chunk::Digest;
use crate::index::FixedIndex;
use crate::manifest::{
    BaseImageManifest, VerifyState, check_key, load_sealed, read_blob, read_sealed, write_sealed,
};
use crate::storage::key_of;
use crate::store::{
    BASE_DIR, BASE_MANIFEST_FILE, Datastore, MANIFEST_FILE, PROTECTED_FILE, SnapPath, VERIFY_FILE,
    open_lock_file,
};
use crate::util::{io_err, is_safe_component, now_secs, sync_dir, unique_suffix, utc};

/// Retention: how many snapshots to keep per rule (`None` = rule unused).
/// With no rule set, everything is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepOptions {
    /// The newest N.
    pub keep_last: Option<u64>,
    /// The newest of each of the last N hours.
    pub keep_hourly: Option<u64>,
    /// ... days.
    pub keep_daily: Option<u64>,
    /// ... ISO weeks.
    pub keep_weekly: Option<u64>,
    /// ... months.
    pub keep_monthly: Option<u64>,
    /// ... years.
    pub keep_yearly: Option<u64>,
}

impl KeepOptions {
    /// True when at least one rule is set (with none, prune keeps all).
    pub fn any(&self) -> bool {
        [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
        .iter()
        .any(|k| k.is_some())
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcStats {
    /// Indexes read in the mark phase.
    pub indexes: u64,
    /// Distinct chunks referenced.
    pub referenced_chunks: u64,
    /// Chunks removed.
    pub removed_chunks: u64,
    /// Bytes removed.
    pub removed_bytes: u64,
    /// Chunks kept (referenced or too young).
    pub kept_chunks: u64,
    /// Bytes kept.
    pub kept_bytes: u64,
    /// Leftovers of crashed backups removed.
    pub removed_temp_dirs: u64,
}

/// A chunk that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadChunk {
    /// Its digest (hex).
    pub digest: String,
    /// Its file.
    pub path: String,
    /// What is wrong.
    pub error: String,
}

/// What to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyScope {
    /// One snapshot.
    Snapshot(SnapshotId),
    /// Every snapshot and base image.
    All,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Each snapshot checked and whether it is intact.
    pub snapshots: Vec<(SnapshotId, bool)>,
    /// Distinct chunks re-read and re-hashed.
    pub chunks_checked: u64,
    /// Damaged or missing chunks.
    pub bad_chunks: Vec<BadChunk>,
    /// Every problem found (manifests, indexes, blobs, chunks), with paths.
    pub errors: Vec<String>,
}

impl VerifyReport {
    /// Nothing damaged.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty() && self.bad_chunks.is_empty()
    }
}

/// Size of the datastore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreStats {
    /// Finished snapshots.
    pub snapshots: u64,
    /// Stored base images.
    pub base_images: u64,
    /// Stored chunks.
    pub chunks: u64,
    /// Bytes of stored chunks.
    pub chunk_bytes: u64,
}

/// Period keys of a time (UTC) for the retention rules: hour, day, ISO
/// week (the week's Thursday decides its year), month, year.
fn period_keys(t: i64) -> [i64; 5] {
    let d = utc(t);
    let (iso_year, week, _) = d.to_iso_week_date();
    [
        t.div_euclid(3600),
        t.div_euclid(86_400),
        i64::from(iso_year) * 100 + i64::from(week),
        i64::from(d.year()) * 100 + i64::from(u8::from(d.month())),
        i64::from(d.year()),
    ]
}

/// Which of `times` (newest first) to keep; `protected` always kept.
pub(crate) fn select_keep(times: &[(i64, bool)], keep: &KeepOptions) -> Vec<bool> {
    let n = times.len();
    if !keep.any() {
        return vec![true; n];
    }
    // None = undecided, Some(true) keep, Some(false) remove.
    let mut mark: Vec<Option<bool>> = vec![None; n];
    for (i, (_, protected)) in times.iter().enumerate() {
        if *protected {
            mark[i] = Some(true);
        }
    }
    if let Some(k) = keep.keep_last {
        let mut kept = 0;
        for m in mark.iter_mut() {
            if kept >= k {
                break;
            }
            if m.is_none() {
                *m = Some(true);
                kept += 1;
            }
        }
    }
    let rules = [
        keep.keep_hourly,
        keep.keep_daily,
        keep.keep_weekly,
        keep.keep_monthly,
        keep.keep_yearly,
    ];
    for (r, k) in rules.iter().enumerate() {
        let Some(k) = *k else { continue };
        let key = |i: usize| period_keys(times[i].0)[r];
        let already: HashSet<i64> = (0..n)
            .filter(|i| mark[*i] == Some(true) && !times[*i].1)
            .map(key)
            .collect();
        let mut included = HashSet::new();
        for (i, m) in mark.iter_mut().enumerate() {
            if m.is_some() {
                continue;
            }
            let p = key(i);
            if already.contains(&p) || included.contains(&p) {
                continue;
            }
            if included.len() as u64 >= k {
                break;
            }
            included.insert(p);
            *m = Some(true);
        }
    }
    mark.into_iter().map(|m| m == Some(true)).collect()
}

impl Datastore {
    /// Whether a snapshot is protected from prune and deletion.
    pub fn is_protected(&self, id: &SnapshotId) -> Result<bool> {
        let sp = SnapPath::parse(id)?;
        let dir = self.snap_dir(&sp);
        if !self.storage().exists(&dir.join(MANIFEST_FILE))? {
            return Err(Error::not_found(format!("snapshot {id} does not exist")));
        }
        self.storage().exists(&dir.join(PROTECTED_FILE))
    }

    /// Protect a snapshot (or lift the protection).
    pub fn protect(&self, id: &SnapshotId, protected: bool) -> Result<()> {
        let sp = SnapPath::parse(id)?;
        let dir = self.snap_dir(&sp);
        if !self.storage().exists(&dir.join(MANIFEST_FILE))? {
            return Err(Error::not_found(format!("snapshot {id} does not exist")));
        }
        let p = dir.join(PROTECTED_FILE);
        if self.storage().object().is_some() {
            return match protected {
                true => self.storage().write_atomic(&p, Vec::new()),
                false => self.storage().remove(&p),
            };
        }
        if protected {
            crate::util::create_private(&p).map_err(|e| io_err("creating", &p, e))?;
        } else if p.exists() {
            fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?;
        }
        sync_dir(&dir)
    }

    /// Delete a snapshot. Refused while it is protected, open for reading,
    /// or the start of a running incremental backup.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let sp = SnapPath::parse(id)?;
        let dir = self.snap_dir(&sp);
        let mpath = dir.join(MANIFEST_FILE);
        if self.storage().exists(&dir.join(PROTECTED_FILE))? {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("snapshot {id} is protected"),
            ));
        }
        if let Some(b) = self.storage().object() {
            let _held = self.exclusive_lease(b, &key_of(&dir)?, &format!("snapshot {id}"))?;
            if !self.storage().exists(&mpath)? {
                return Err(Error::not_found(format!("snapshot {id} does not exist")));
            }
            // The manifest first: from then on the snapshot is invisible.
            self.storage().remove(&mpath)?;
            return self.storage().remove_tree(&dir);
        }
        let f = File::open(&mpath).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!("snapshot {id} does not exist"))
            } else {
                io_err("opening", &mpath, e)
            }
        })?;
        // A GC or verify holds the lock only briefly: wait a little.
        let mut tries = 0;
        let locked = loop {
            match f.try_lock() {
                Err(TryLockError::WouldBlock) if tries < 25 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other,
            }
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!("snapshot {id} is in use (being read or the base of a running backup)"),
                )
                .retryable(true));
            }
            Err(TryLockError::Error(e)) => return Err(io_err("locking", &mpath, e)),
        }
        let group = self.group_dir(&sp.platform, &sp.guest);
        let trash = group.join(format!(".del-{}", unique_suffix()));
        fs::rename(&dir, &trash).map_err(|e| io_err("deleting snapshot", &dir, e))?;
        sync_dir(&group)?;
        drop(f);
        // Already invisible; a GC may be removing it at the same time.
        if let Err(e) = fs::remove_dir_all(&trash) {
            tracing::debug!("removing {}: {e}", trash.display());
        }
        Ok(())
    }

    /// Delete a stored base image. Refused while any snapshot refers to it
    /// or a backup or restore is using it.
    pub fn delete_base_image(&self, platform: &str, id: &provider_api::BaseImageId) -> Result<()> {
        let users: Vec<String> = self
            .list_sync(Some(platform), None)?
            .into_iter()
            .filter(|s| s.volumes.iter().any(|v| v.base.as_ref() == Some(id)))
            .map(|s| s.id.0)
            .collect();
        if !users.is_empty() {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "base image {id} is used by {} snapshot(s), e.g. {}",
                    users.len(),
                    users[0]
                ),
            ));
        }
        let dir = self.base_dir(platform, id);
        let mpath = dir.join(BASE_MANIFEST_FILE);
        if let Some(b) = self.storage().object() {
            let _held = self.exclusive_lease(b, &key_of(&dir)?, &format!("base image {id}"))?;
            if !self.storage().exists(&mpath)? {
                return Err(Error::not_found(format!(
                    "base image {id} of {platform} is not stored"
                )));
            }
            self.storage().remove(&mpath)?;
            return self.storage().remove_tree(&dir);
        }
        let f = File::open(&mpath).map_err(|e| io_err("opening", &mpath, e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!("base image {id} is in use"),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(io_err("locking", &mpath, e)),
        }
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let trash = parent.join(format!(".del-{}", unique_suffix()));
        fs::rename(&dir, &trash).map_err(|e| io_err("deleting base image", &dir, e))?;
        sync_dir(&parent)?;
        drop(f);
        let _ = fs::remove_dir_all(&trash);
        Ok(())
    }

    /// Apply retention to one guest's snapshots. Returns each snapshot
    /// (oldest first) and whether it is kept. With `dry_run` nothing is
    /// deleted. Snapshots in use are left alone (logged).
    pub fn prune(
        &self,
        platform: &str,
        guest: &GuestId,
        keep: &KeepOptions,
        dry_run: bool,
    ) -> Result<Vec<(SnapshotId, bool)>> {
        let group = self.group_dir(
            &crate::util::encode_component(platform),
            &crate::util::encode_component(&guest.0),
        );
        if self.storage().object().is_none() && !group.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock_group(&group)?;
        let mut list = self.list_sync(Some(platform), Some(&guest.0))?;
        list.reverse(); // newest first
        let times: Vec<(i64, bool)> = list
            .iter()
            .map(|s| (s.time, self.is_protected(&s.id).unwrap_or(true)))
            .collect();
        let keep_marks = select_keep(&times, keep);
        let mut out = Vec::new();
        for (s, k) in list.iter().zip(keep_marks) {
            if !k
                && !dry_run
                && let Err(e) = self.delete_snapshot(&s.id)
            {
                tracing::warn!("prune: keeping {}: {}", s.id, e.report());
            }
            out.push((s.id.clone(), k));
        }
        out.reverse();
        Ok(out)
    }

    /// Garbage collection: remove chunks that no snapshot or base image
    /// references and that were not written or reused since
    /// `grace` before the oldest running backup began (see the crate docs).
    pub fn gc(&self, grace: Duration) -> Result<GcStats> {
        if let Some(b) = self.storage().object().cloned() {
            return self.gc_object(&b, grace);
        }
        let gc_lock = open_lock_file(&self.locks_dir().join("gc.lock"))?;
        gc_lock
            .lock()
            .map_err(|e| io_err("locking", &self.locks_dir(), e))?;
        let start = SystemTime::now();
        let mut stats = GcStats::default();

        // Running backups: their registration files are locked.
        let wdir = self.locks_dir().join("writers");
        let mut oldest = start;
        if let Ok(rd) = fs::read_dir(&wdir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if name.starts_with(".new-") {
                    let old = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .map(|t| t + Duration::from_secs(3600) < start)
                        .unwrap_or(false);
                    if old {
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                }
                let Ok(f) = File::open(&path) else { continue };
                match f.try_lock() {
                    Ok(()) => {
                        let _ = fs::remove_file(&path);
                    }
                    Err(_) => {
                        let nanos: u128 = name
                            .split('-')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        let t = UNIX_EPOCH + Duration::from_nanos(nanos as u64);
                        oldest = oldest.min(t);
                    }
                }
            }
        }
        let cutoff = oldest.checked_sub(grace).unwrap_or(UNIX_EPOCH);

        // Mark.
        let mut marked: HashSet<Digest> = HashSet::new();
        // Snapshots committed while marking are found by listing again
        // until nothing new appears: a snapshot committed after the last
        // listing had its incremental base locked (hence listed and marked)
        // throughout, and its other chunks are younger than the cutoff.
        let mut seen: HashSet<SnapshotId> = HashSet::new();
        loop {
            let fresh: Vec<SnapPath> = self
                .snapshot_paths(None, None)?
                .into_iter()
                .filter(|sp| seen.insert(sp.id()))
                .collect();
            if fresh.is_empty() {
                break;
            }
            self.mark_snapshots(&fresh, &mut marked, &mut stats)?;
        }
        let bdir = self.root().join(BASE_DIR);
        for plat in read_names(&bdir)? {
            let pdir = bdir.join(&plat);
            for id in read_names(&pdir)? {
                let dir = pdir.join(&id);
                if id.starts_with(".del-") {
                    let _ = fs::remove_dir_all(&dir);
                    stats.removed_temp_dirs += 1;
                    continue;
                }
                if let Some(rest) = id.strip_prefix(".tmp-") {
                    let reg: Vec<&str> = rest.splitn(4, '-').take(3).collect();
                    if !self.writer_is_live(&reg.join("-")) {
                        let _ = fs::remove_dir_all(&dir);
                        stats.removed_temp_dirs += 1;
                    }
                    continue;
                }
                let mpath = dir.join(BASE_MANIFEST_FILE);
                let m: BaseImageManifest = load_sealed(&mpath, self.crypt())?;
                check_key(m.key_fingerprint.as_deref(), self.crypt(), &mpath)?;
                let idx = FixedIndex::load(
                    &dir.join(&m.index.file),
                    Some(&m.index.sha256),
                    self.crypt(),
                )?;
                stats.indexes += 1;
                marked.extend(idx.digests.iter().filter(|d| !d.is_zero()));
            }
        }
        stats.referenced_chunks = marked.len() as u64;

        // Leftovers of crashed or deleted snapshots.
        for plat in read_names(self.root())? {
            if !is_safe_component(&plat) {
                continue;
            }
            for guest in read_names(&self.root().join(&plat))? {
                let gdir = self.root().join(&plat).join(&guest);
                for name in read_names(&gdir)? {
                    let stale = match name.strip_prefix(".tmp-") {
                        Some(reg) => !self.writer_is_live(reg),
                        None => name.starts_with(".del-"),
                    };
                    if stale {
                        let _ = fs::remove_dir_all(gdir.join(&name));
                        stats.removed_temp_dirs += 1;
                    }
                }
            }
        }

        // Sweep.
        let (r, rb, k, kb) = self.chunks().sweep(&marked, cutoff)?;
        stats.removed_chunks = r;
        stats.removed_bytes = rb;
        stats.kept_chunks = k;
        stats.kept_bytes = kb;
        Ok(stats)
    }

    /// GC on an object store (see [`crate::backend`] for why it is safe
    /// beside backups on other hosts).
    fn gc_object(&self, b: &Arc<dyn Backend>, grace: Duration) -> Result<GcStats> {
        let _gc = KeptLease::acquire(b.clone(), ".locks/gc", "gc", self.inner.lease_ttl)?;
        let grace = grace.max(self.inner.object_grace);
        let start = b.now()?;
        let mut stats = GcStats::default();
        // Running backups, by their leases; a lapsed lease is a crashed
        // backup's.
        let mut oldest = start;
        let mut live_writers = HashSet::new();
        for m in b.list(".locks/writers/")? {
            let Some((data, meta)) = b.get(&m.key, 64 << 10)? else {
                continue;
            };
            match serde_json::from_slice::<LeaseInfo>(&data) {
                Ok(info) if info.live_at(&meta, start) => {
                    oldest = oldest.min(info.started_at(&meta));
                    live_writers.insert(m.key.rsplit('/').next().unwrap_or_default().to_owned());
                }
                _ => b.delete(&m.key)?,
            }
        }
        let cutoff = oldest.checked_sub(grace).unwrap_or(UNIX_EPOCH);
        let mut marked: HashSet<Digest> = HashSet::new();
        let mut seen: HashSet<SnapshotId> = HashSet::new();
        loop {
            let fresh: Vec<SnapPath> = self
                .snapshot_paths(None, None)?
                .into_iter()
                .filter(|sp| seen.insert(sp.id()))
                .collect();
            if fresh.is_empty() {
                break;
            }
            self.mark_snapshots(&fresh, &mut marked, &mut stats)?;
        }
        let bdir = self.root().join(BASE_DIR);
        for plat in self.storage().children(&bdir)? {
            for id in self.storage().children(&bdir.join(&plat))? {
                let dir = bdir.join(&plat).join(&id);
                let mpath = dir.join(BASE_MANIFEST_FILE);
                if !self.storage().exists(&mpath)? {
                    continue;
                }
                let m: BaseImageManifest = read_sealed(self.storage(), &mpath, self.crypt())?;
                check_key(m.key_fingerprint.as_deref(), self.crypt(), &mpath)?;
                let idx = FixedIndex::read(
                    self.storage(),
                    &dir.join(&m.index.file),
                    Some(&m.index.sha256),
                    self.crypt(),
                )?;
                stats.indexes += 1;
                marked.extend(idx.digests.iter().filter(|d| !d.is_zero()));
            }
        }
        stats.referenced_chunks = marked.len() as u64;
        // Temporary files of crashed backups.
        for plat in self.storage().children(self.root())? {
            if !is_safe_component(&plat) {
                continue;
            }
            for guest in self.storage().children(&self.root().join(&plat))? {
                let gdir = self.root().join(&plat).join(&guest);
                for name in self.storage().children(&gdir)? {
                    // A writer that began after the listing above has its
                    // lease before its first temporary file: ask again.
                    if let Some(reg) = name.strip_prefix(".tmp-")
                        && !live_writers.contains(reg)
                        && !self.object_writer_is_live(b, reg)?
                    {
                        self.storage().remove_tree(&gdir.join(&name))?;
                        stats.removed_temp_dirs += 1;
                    }
                }
            }
        }
        let (r, rb, k, kb) = self.chunks().sweep(&marked, cutoff)?;
        stats.removed_chunks = r;
        stats.removed_bytes = rb;
        stats.kept_chunks = k;
        stats.kept_bytes = kb;
        Ok(stats)
    }

    /// Object stores: whether the backup registered as `name` holds a
    /// live lease now.
    fn object_writer_is_live(&self, b: &Arc<dyn Backend>, name: &str) -> Result<bool> {
        let Some((data, meta)) = b.get(&format!(".locks/writers/{name}"), 64 << 10)? else {
            return Ok(false);
        };
        Ok(serde_json::from_slice::<LeaseInfo>(&data)
            .map(|i| i.live_at(&meta, b.now().unwrap_or(UNIX_EPOCH)))
            .unwrap_or(false))
    }

    fn mark_snapshots(
        &self,
        list: &[SnapPath],
        marked: &mut HashSet<Digest>,
        stats: &mut GcStats,
    ) -> Result<()> {
        for sp in list {
            // Locked while read, so that it is not deleted half-way.
            let (_lock, dir, m) = match self.lock_snapshot(&sp.id()) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::NotFound => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            for v in &m.volumes {
                let idx = FixedIndex::read(
                    self.storage(),
                    &dir.join(&v.index.file),
                    Some(&v.index.sha256),
                    self.crypt(),
                )?;
                stats.indexes += 1;
                marked.extend(idx.digests.iter().filter(|d| !d.is_zero()));
            }
            for a in &m.archives {
                let (cat, data) = self.archive_indexes(&dir, a)?;
                stats.indexes += 2;
                marked.extend(cat.chunks.iter().chain(&data.chunks).map(|c| c.1));
            }
        }
        Ok(())
    }

    /// Whether the backup registered as `name` is still running.
    fn writer_is_live(&self, name: &str) -> bool {
        let path = self.locks_dir().join("writers").join(name);
        match File::open(&path) {
            Ok(f) => matches!(f.try_lock(), Err(TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }

    /// Re-read and re-hash every chunk of one snapshot or of the whole
    /// datastore. Each snapshot checked gets its verify state recorded;
    /// a failed one is never used as an incremental base.
    pub fn verify(&self, scope: VerifyScope) -> Result<VerifyReport> {
        let ids: Vec<SnapshotId> = match scope {
            VerifyScope::Snapshot(id) => vec![id],
            VerifyScope::All => self
                .snapshot_paths(None, None)?
                .into_iter()
                .map(|s| s.id())
                .collect(),
        };
        let mut report = VerifyReport::default();
        let mut checked: HashMap<Digest, bool> = HashMap::new();
        let mut checked_bases: HashMap<(String, String), bool> = HashMap::new();
        for id in ids {
            let mut errors = Vec::new();
            let res = (|| -> Result<()> {
                let (_lock, dir, m) = match self.lock_snapshot(&id) {
                    Ok(x) => x,
                    Err(e) if e.kind() == ErrorKind::Corrupt => {
                        // Damaged manifest: record it as failed.
                        let sp = SnapPath::parse(&id)?;
                        errors.push(e.report());
                        self.write_verify_state(&self.snap_dir(&sp), &errors)?;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                for b in &m.blobs {
                    if let Err(e) = read_blob(self.storage(), &dir, &b.file, self.crypt()) {
                        errors.push(e.report());
                    }
                }
                for v in &m.volumes {
                    match FixedIndex::read(
                        self.storage(),
                        &dir.join(&v.index.file),
                        Some(&v.index.sha256),
                        self.crypt(),
                    ) {
                        Ok(idx) => self.verify_index(&idx, &mut checked, &mut report, &mut errors),
                        Err(e) => errors.push(e.report()),
                    }
                    if let Some(bid) = &v.base {
                        let key = (m.platform.clone(), bid.0.clone());
                        let ok = match checked_bases.get(&key) {
                            Some(ok) => *ok,
                            None => {
                                let before = errors.len();
                                match self.lock_base_image(&m.platform, bid) {
                                    Ok((_l, idx)) => self.verify_index(
                                        &idx,
                                        &mut checked,
                                        &mut report,
                                        &mut errors,
                                    ),
                                    Err(e) => errors.push(e.report()),
                                }
                                let ok = errors.len() == before;
                                checked_bases.insert(key, ok);
                                ok
                            }
                        };
                        if !ok {
                            errors.push(format!(
                                "base image {bid} of volume {} is damaged",
                                v.volume.device
                            ));
                        }
                    }
                }
                for a in &m.archives {
                    match self.archive_indexes(&dir, a) {
                        Ok((cat, data)) => {
                            for idx in [&cat, &data] {
                                self.verify_dynamic(idx, &mut checked, &mut report, &mut errors);
                            }
                        }
                        Err(e) => errors.push(e.report()),
                    }
                }
                self.write_verify_state(&dir, &errors)
            })();
            if let Err(e) = res {
                errors.push(e.report());
            }
            report.snapshots.push((id, errors.is_empty()));
            report.errors.extend(errors);
        }
        Ok(report)
    }

    fn verify_index(
        &self,
        idx: &FixedIndex,
        checked: &mut HashMap<Digest, bool>,
        report: &mut VerifyReport,
        errors: &mut Vec<String>,
    ) {
        for (i, d) in idx.digests.iter().enumerate() {
            if !d.is_zero() {
                self.verify_chunk(d, idx.chunk_len(i), checked, report, errors);
            }
        }
    }

    /// Load and check one chunk of `len` bytes (once per verify).
    fn verify_chunk(
        &self,
        d: &Digest,
        len: u64,
        checked: &mut HashMap<Digest, bool>,
        report: &mut VerifyReport,
        errors: &mut Vec<String>,
    ) {
        let ok = match checked.get(d) {
            Some(ok) => *ok,
            None => {
                report.chunks_checked += 1;
                let bad = match self.chunks().load(d) {
                    Ok(data) if data.len() as u64 == len => None,
                    Ok(data) => Some(format!("{} bytes, expected {len}", data.len())),
                    Err(e) => Some(e.report()),
                };
                if let Some(error) = &bad {
                    report.bad_chunks.push(BadChunk {
                        digest: d.to_hex(),
                        path: self.chunks().path(d).display().to_string(),
                        error: error.clone(),
                    });
                }
                checked.insert(*d, bad.is_none());
                bad.is_none()
            }
        };
        if !ok {
            errors.push(format!(
                "chunk {d} at {} is damaged or missing",
                self.chunks().path(d).display()
            ));
        }
    }

    /// [`Self::verify_index`] for a file archive's stream.
    fn verify_dynamic(
        &self,
        idx: &crate::archive::DynamicIndex,
        checked: &mut HashMap<Digest, bool>,
        report: &mut VerifyReport,
        errors: &mut Vec<String>,
    ) {
        for (i, (end, d)) in idx.chunks.iter().enumerate() {
            self.verify_chunk(d, end - idx.start(i), checked, report, errors);
        }
    }

    fn write_verify_state(&self, dir: &Path, errors: &[String]) -> Result<()> {
        if !self.storage().exists(&dir.join(MANIFEST_FILE))? {
            return Ok(());
        }
        write_sealed(
            self.storage(),
            &dir.join(VERIFY_FILE),
            &VerifyState {
                state: if errors.is_empty() { "ok" } else { "failed" }.into(),
                time: now_secs(),
                errors: errors.to_vec(),
            },
            self.crypt(),
        )
    }

    /// Counts and sizes.
    pub fn stats(&self) -> Result<DatastoreStats> {
        let snapshots = self.snapshot_paths(None, None)?.len() as u64;
        let bdir = self.root().join(BASE_DIR);
        let mut base_images = 0;
        for p in self.storage().children(&bdir)? {
            base_images += self
                .storage()
                .children(&bdir.join(&p))?
                .iter()
                .filter(|n| !n.starts_with('.'))
                .count() as u64;
        }
        let (chunks, chunk_bytes) = self.chunks().usage()?;
        Ok(DatastoreStats {
            snapshots,
            base_images,
            chunks,
            chunk_bytes,
        })
    }
}

/// Names of the directories in `dir` (empty when it does not exist).
fn read_names(dir: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("listing", dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| io_err("listing", dir, e))?;
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_weeks() {
        // 2021-01-03 (Sunday) is in ISO week 2020-W53; 2021-01-04 in 2021-W01.
        let d = |days: i64| period_keys(days * 86_400)[2];
        let jan3_2021 = 18_630;
        assert_eq!(
            crate::util::rfc3339(jan3_2021 * 86_400),
            "2021-01-03T00:00:00Z"
        );
        assert_eq!(d(jan3_2021) / 100, 2020);
        assert_eq!(d(jan3_2021 + 1) / 100, 2021);
        assert_ne!(d(jan3_2021), d(jan3_2021 + 1));
        assert_eq!(d(jan3_2021 + 1), d(jan3_2021 + 7));
        // 2026 has 53 ISO weeks: Friday 2027-01-01 is in 2026-W53, with
        // Thursday 2026-12-31; Monday 2027-01-04 starts 2027-W01.
        let dec31_2026 = 20_818;
        assert_eq!(
            crate::util::rfc3339(dec31_2026 * 86_400),
            "2026-12-31T00:00:00Z"
        );
        assert_eq!(d(dec31_2026), 202_653);
        assert_eq!(d(dec31_2026 + 1), 202_653);
        assert_eq!(d(dec31_2026 + 4), 202_701);
        // Month and year keys follow the calendar, not the ISO year.
        let k = period_keys((dec31_2026 + 1) * 86_400);
        assert_eq!((k[3], k[4]), (202_701, 2027));
    }

    #[test]
    fn retention_rules() {
        let day = 86_400;
        // One snapshot every 6 hours over 10 days, newest first.
        let times: Vec<(i64, bool)> = (0..40)
            .rev()
            .map(|i| (1_700_000_000 + i * day / 4, false))
            .collect();
        let keep = select_keep(
            &times,
            &KeepOptions {
                keep_last: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(keep.iter().filter(|k| **k).count(), 3);
        assert!(keep[..3].iter().all(|k| *k));
        let keep = select_keep(
            &times,
            &KeepOptions {
                keep_daily: Some(4),
                ..Default::default()
            },
        );
        assert_eq!(keep.iter().filter(|k| **k).count(), 4);
        assert!(keep[0]);
        let keep = select_keep(
            &times,
            &KeepOptions {
                keep_last: Some(2),
                keep_daily: Some(3),
                ..Default::default()
            },
        );
        // The days of the two newest count as covered: three more days.
        assert_eq!(keep.iter().filter(|k| **k).count(), 2 + 3, "{keep:?}");
        // Protected snapshots are always kept, and no rule keeps everything.
        let mut t2 = times.clone();
        t2[39].1 = true;
        let keep = select_keep(
            &t2,
            &KeepOptions {
                keep_last: Some(1),
                ..Default::default()
            },
        );
        assert!(keep[39] && keep[0]);
        assert_eq!(keep.iter().filter(|k| **k).count(), 2);
        assert!(
            select_keep(&times, &KeepOptions::default())
                .iter()
                .all(|k| *k)
        );
        let keep = select_keep(
            &times,
            &KeepOptions {
                keep_yearly: Some(5),
                ..Default::default()
            },
        );
        assert_eq!(keep.iter().filter(|k| **k).count(), 1);
    }
}
