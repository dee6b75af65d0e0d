//! # provider-template: the adapter a vendor copies
//!
//! A complete, small provider for a platform-like source, written to be
//! copied (see `README.md`, the vendor guide). Its "platform" is a
//! directory of guests on the backup host; platform kind `qcow2dir`
//! ([`KIND`], registered by [`register`], settings [`TemplateSettings`]).
//!
//! ## The platform's layout
//!
//! ```text
//! <root>/
//!   web1/                 guest id = subdirectory name
//!     guest.json          {"name": "web1", "cpus": 2, "memory_mib": 2048,
//!                          "disks": [{"device": "disk0", "file": "disk0.qcow2"}]}
//!     disk0.qcow2         one qcow2 file per disk, in the guest's directory
//! ```
//!
//! A directory is a guest once it holds a `guest.json` ([`GuestConfig`]);
//! guest ids and disk file names are plain names (no `/`, no leading `.`).
//!
//! ## Change tracking
//!
//! Each disk carries qemu *persistent dirty bitmaps* named `vmbackup-*`
//! ([`BITMAP_PREFIX`]); anything that writes the qcow2 through qemu
//! (`qemu-io`, `qemu-nbd`, a VM) marks them. Every backup that tracks a
//! disk adds a fresh bitmap (`qemu-img bitmap --add`, enabled) before
//! exposing it; its name is the volume's checkpoint in the snapshot. The
//! next backup is incremental (`Use`) when the previous snapshot's
//! checkpoint names a bitmap the disk still has, enabled and consistent:
//! it exports that bitmap (`qemu-nbd --bitmap NAME`, meta context
//! `qemu:dirty-bitmap:NAME`) and the host reads only its dirty blocks (64
//! KiB with qemu's default granularity). Otherwise the backup is full
//! (`New`); a disk that grew is read in full too (the host's rule).
//!
//! `backup_cleanup(success)` removes every `vmbackup-*` bitmap except the
//! one just added and the one just read: if the host then fails to
//! publish the snapshot, the older snapshot's bitmap still holds every
//! change. `backup_cleanup(failure)` removes the bitmap just added, so a
//! failed backup never advances change tracking.
//!
//! ## Access, locking and cleanup
//!
//! Disks are exposed by `qemu-nbd --fork` daemons (export [`EXPORT`]) on
//! Unix sockets in a private runtime directory, a fresh 0700 temporary
//! directory per provider ([`TemplateProvider::runtime_dir`], removed when
//! the provider is dropped): read-only for backup, writable for restore.
//! `--fork` returns once the export serves, or fails with qemu's message.
//! While a backup export runs, qemu's image locking keeps writers out (the
//! snapshot is consistent; a guest write fails with a lock error until
//! `backup_cleanup`). The provider runs one backup or restore per guest at
//! a time. Every `qemu-nbd` is stopped explicitly, on every path, by
//! `backup_cleanup`, `restore_vm_volume_cleanup`, `restore_vm_cleanup` or
//! at the latest `job_cleanup`: SIGTERM (so that qemu stores the bitmaps),
//! wait until the process is gone, SIGKILL after 30 s; socket and pid file
//! are removed. Linux only (`/proc`).
//!
//! ## Restore
//!
//! To a new guest (`RestoreTarget::NewGuest`, default name
//! `<original>-restored`): `restore_vm_init` creates `<root>/NAME/`
//! (refused when it exists); each volume gets a new `disk<i>.qcow2`
//! (`qemu-img create`) written by the host through a writable `qemu-nbd`;
//! `restore_vm_cleanup(success)` writes `guest.json` (the stored
//! configuration, renamed, with the new disks) last, so an interrupted
//! restore never looks like a guest; a failed restore removes the
//! directory.
//!
//! In place (`RestoreTarget::InPlace`): each stored volume is written over
//! the original guest's disk of the same device, first resized to the
//! stored size (`qemu-img resize --shrink`), through a writable `qemu-nbd`.
//! qemu marks the disk's enabled bitmaps with everything the restore
//! writes, so the next incremental backup holds the restored data. A
//! stored device the guest no longer has fails that volume's restore.

mod settings;

pub use settings::{TemplateSettings, register};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use provider_api::*;
use provider_kit::lock;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// The platform kind and provider name.
pub const KIND: &str = "qcow2dir";
/// Prefix of the dirty bitmaps this provider adds and removes.
pub const BITMAP_PREFIX: &str = "vmbackup-";
/// Export name of every `qemu-nbd` the provider starts.
pub const EXPORT: &str = "disk";

/// A guest's `guest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Display name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks in order.
    pub disks: Vec<DiskConfig>,
}

/// One disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Device name (the volume's name in snapshots).
    pub device: String,
    /// The qcow2 file, relative to the guest's directory.
    pub file: String,
}

impl GuestConfig {
    /// Read `<dir>/guest.json`.
    pub fn load(dir: &Path) -> Result<GuestConfig> {
        let path = dir.join("guest.json");
        let text = std::fs::read(&path).map_err(|e| io("reading", &path, e))?;
        let config = serde_json::from_slice::<GuestConfig>(&text);
        let config = config.map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        for d in &config.disks {
            plain_name("disk file", &d.file).map_err(|e| e.volume(&d.device))?;
        }
        Ok(config)
    }

    /// Each disk's device and file, the guest's directory being `dir`.
    pub fn files(&self, dir: &Path) -> BTreeMap<String, PathBuf> {
        let file = |d: &DiskConfig| (d.device.clone(), dir.join(&d.file));
        self.disks.iter().map(file).collect()
    }

    /// Write `<dir>/guest.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("guest.json");
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::other(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| io("writing", &path, e))
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{what} {}", path.display())).with_source(e)
}

fn platform(message: String) -> Error {
    Error::new(ErrorKind::Platform, message)
}

fn plain_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        let msg = format!("{what} {name:?}: not empty, no '/', no leading '.'");
        return Err(Error::invalid(msg));
    }
    Ok(())
}

/// Run a tool; the error names the command line and its stderr.
pub async fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().await;
    let line = format!("{:?}", cmd.as_std());
    let out = out.map_err(|e| platform(format!("running {line}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = format!("{line} failed ({}): {}", out.status, err.trim());
        return Err(platform(msg));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img OP FLAGS.. -f qcow2 FILE [LAST]`.
pub async fn qemu_img(op: &str, flags: &[&str], file: &Path, last: Option<&str>) -> Result<String> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg(op).args(flags).args(["-f", "qcow2"]);
    run(cmd.arg(file).args(last)).await
}

/// A qcow2 file's virtual size and its bitmaps (name, usable: enabled
/// and consistent).
pub async fn image_info(file: &Path) -> Result<(u64, Vec<(String, bool)>)> {
    let out = qemu_img("info", &["--output=json", "-U"], file, None).await?;
    let bad = |what: String| platform(format!("qemu-img info {}: {what}", file.display()));
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
    let size = v["virtual-size"].as_u64();
    let size = size.ok_or_else(|| bad("no virtual-size".into()))?;
    let bitmaps = v.pointer("/format-specific/data/bitmaps");
    let bitmaps = bitmaps.and_then(|b| b.as_array()).into_iter().flatten();
    let bitmaps = bitmaps.filter_map(|b| {
        let flags = b["flags"].to_string();
        let usable = flags.contains("\"auto\"") && !flags.contains("in-use");
        Some((b["name"].as_str()?.to_owned(), usable))
    });
    Ok((size, bitmaps.collect()))
}

/// One running `qemu-nbd` daemon: (pid, socket, pid file).
type Export = (String, PathBuf, PathBuf);

/// SIGTERM (qemu stores the bitmaps and closes the image), wait until the
/// process is gone; SIGKILL after 30 s.
async fn stop((pid, socket, pid_file): Export) -> Result<()> {
    let _ = run(Command::new("kill").args(["-TERM", &pid])).await;
    let cmdline = Path::new("/proc").join(&pid).join("cmdline");
    let gone = || std::fs::read(&cmdline).map_or(true, |c| c.is_empty());
    let mut waited = 0;
    while !gone() && waited < 1200 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        waited += 1;
    }
    let stopped = gone();
    if !stopped {
        let _ = run(Command::new("kill").args(["-KILL", &pid])).await;
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&pid_file);
    let msg = format!("qemu-nbd {pid} did not stop in 30 s; killed it");
    stopped.then_some(()).ok_or_else(|| platform(msg))
}

async fn stop_all(exports: impl IntoIterator<Item = Export>) -> Result<()> {
    let stopped = futures::future::join_all(exports.into_iter().map(stop)).await;
    stopped.into_iter().collect()
}

/// One guest's backup (`backup_init`..`backup_cleanup`) or restore
/// (`restore_vm_init`..`restore_vm_cleanup`).
#[derive(Debug, Default)]
struct Session {
    start_time: i64,
    /// Running `qemu-nbd`s by device.
    exports: BTreeMap<String, Export>,
    /// Backup, per tracked disk: (file, bitmap read, bitmap added).
    bitmaps: Vec<(PathBuf, Option<String>, String)>,
    /// Restore: each device's qcow2 (new or in place).
    files: BTreeMap<String, PathBuf>,
    /// Restore to a new guest: its directory and the `guest.json` written
    /// there when the restore succeeded.
    new_guest: Option<(PathBuf, GuestConfig)>,
}

/// The provider for one guest directory.
#[derive(Debug)]
pub struct TemplateProvider {
    root: PathBuf,
    runtime: tempfile::TempDir,
    counter: AtomicU64,
    /// Sessions by guest id: one backup or restore per guest at a time.
    sessions: Mutex<BTreeMap<String, Session>>,
}

impl TemplateProvider {
    /// A provider for the guests under `root`; creates its private runtime
    /// directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let runtime = tempfile::Builder::new().prefix("qcow2dir-").tempdir();
        let runtime = runtime.map_err(|e| io("creating in", &std::env::temp_dir(), e))?;
        Ok(TemplateProvider {
            root: root.into(),
            runtime,
            counter: AtomicU64::new(0),
            sessions: Mutex::default(),
        })
    }

    /// Where the `qemu-nbd` sockets and pid files live.
    pub fn runtime_dir(&self) -> &Path {
        self.runtime.path()
    }

    /// The guest's configuration and its disks' files by device.
    fn disks(&self, id: &str) -> Result<(BTreeMap<String, PathBuf>, GuestConfig)> {
        plain_name("guest", id).map_err(|e| e.guest(id))?;
        let dir = self.root.join(id);
        if !dir.join("guest.json").is_file() {
            let msg = format!("no guest directory {} with a guest.json", dir.display());
            return Err(Error::not_found(msg).guest(id));
        }
        let config = GuestConfig::load(&dir).map_err(|e| e.guest(id))?;
        Ok((config.files(&dir), config))
    }

    /// Start a session for guest `id` (one backup or restore at a time),
    /// set up by `init`.
    fn begin(&self, id: &str, init: impl FnOnce(&mut Session)) -> Result<()> {
        let mut sessions = lock(&self.sessions);
        if sessions.contains_key(id) {
            let e = Error::new(ErrorKind::Refused, "a backup or restore of it is running");
            return Err(e.guest(id));
        }
        init(sessions.entry(id.to_owned()).or_default());
        Ok(())
    }

    fn session<T>(&self, id: &str, f: impl FnOnce(&mut Session) -> T) -> Result<T> {
        let mut sessions = lock(&self.sessions);
        let msg = "no backup_init or restore_vm_init for this guest";
        let session = sessions.get_mut(id);
        Ok(f(session.ok_or_else(|| Error::invalid(msg).guest(id))?))
    }

    /// Start a `qemu-nbd` daemon for `device` (its `file`) in guest `id`'s
    /// session, with options `opts`; `--fork` returns once it serves.
    async fn serve(&self, id: &str, device: &str, file: &Path, opts: &[&str]) -> Result<NbdAccess> {
        self.session(id, |_| ())?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let socket = self.runtime.path().join(format!("nbd{n}.sock"));
        let pid_file = self.runtime.path().join(format!("nbd{n}.pid"));
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["--fork", "--format=qcow2", "--persistent", "--shared=0"]);
        cmd.args(["-x", EXPORT, "-k"]).arg(&socket);
        cmd.arg("--pid-file").arg(&pid_file).args(opts);
        if let Err(e) = run(cmd.arg(file)).await {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
        let pid = std::fs::read_to_string(&pid_file).map_err(|e| io("reading", &pid_file, e))?;
        let export = (pid.trim().to_owned(), socket.clone(), pid_file);
        self.session(id, |s| s.exports.insert(device.to_owned(), export))?;
        Ok(NbdAccess::new(NbdAddress::Unix(socket), EXPORT))
    }
}

#[async_trait]
impl BackupProvider for TemplateProvider {
    fn provider_name(&self) -> &str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::none().incremental(true);
        caps.restore_in_place(true)
    }

    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        let listed = std::fs::read_dir(&self.root).map(drop);
        listed.map_err(|e| io("listing the guest directory", &self.root, e))
    }

    async fn job_cleanup(&self) -> Result<()> {
        let sessions = std::mem::take(&mut *lock(&self.sessions));
        stop_all(sessions.into_values().flat_map(|s| s.exports.into_values())).await
    }

    async fn backup_init(&self, guest: &Guest, start_time: i64) -> Result<ArchiveName> {
        self.disks(&guest.id.0)?;
        self.begin(&guest.id.0, |s| s.start_time = start_time)?;
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        let vm = (guest.kind == GuestKind::Vm).then_some(BackupMechanism::Nbd);
        vm.ok_or_else(|| Error::unsupported("container backup"))
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        use BitmapMode::{New, Use};
        let mut plan = IncrementalPlan::new();
        for (device, file) in self.disks(&guest.id.0)?.0 {
            let info = image_info(&file).await;
            let (_, bitmaps) = info.map_err(|e| e.guest(&guest.id).volume(&device))?;
            let checkpoint = previous.and_then(|p| p.snapshot.volume(&device)?.checkpoint.clone());
            let usable = checkpoint.is_some_and(|c| bitmaps.iter().any(|(b, ok)| *ok && *b == c.0));
            plan.insert(device, if usable { Use } else { New });
        }
        Ok(plan)
    }

    async fn backup_vm(&self, guest: &Guest, request: BackupVmRequest) -> Result<VmBackup> {
        use DirtySource::{All, NbdBitmap};
        let id = &guest.id.0;
        let (disks, config) = self.disks(id)?;
        let bitmap = format!("{BITMAP_PREFIX}{}", self.session(id, |s| s.start_time)?);
        let mut volumes = Vec::new();
        for (device, file) in disks {
            let context = |e: Error| e.guest(id).volume(&device);
            let size = image_info(&file).await.map_err(context)?.0;
            let mode = request.host_mode(&device, size, request.mode(&device));
            let previous = request.previous.as_ref();
            let previous = previous.and_then(|p| p.snapshot.volume(&device)?.checkpoint.clone());
            let read = previous.map(|c| c.0).filter(|_| mode == BitmapMode::Use);
            let added = (mode != BitmapMode::None).then(|| Checkpoint(bitmap.clone()));
            if mode != BitmapMode::None {
                let add = qemu_img("bitmap", &["--add"], &file, Some(&bitmap)).await;
                add.map_err(context)?;
                let entry = (file.clone(), read.clone(), bitmap.clone());
                self.session(id, |s| s.bitmaps.push(entry))?;
            }
            let mut opts = vec!["--read-only"];
            opts.extend(read.iter().flat_map(|b| ["--bitmap", b.as_str()]));
            let access = self.serve(id, &device, &file, &opts).await;
            let access = access.map_err(context)?;
            let dirty = if read.is_some() { NbdBitmap } else { All };
            let context = read.map(|b| format!("qemu:dirty-bitmap:{b}"));
            let access = SnapshotAccess::Nbd(access.with_dirty_bitmap(context));
            let volume = Volume {
                device,
                size,
                format: VolumeFormat::Raw,
            };
            let volume = VolumeAccess::new(volume, access).bitmap_mode(mode);
            volumes.push(volume.dirty(dirty).checkpoint(added));
        }
        let config = serde_json::to_value(&config).map_err(|e| Error::other(e.to_string()))?;
        Ok(VmBackup::new(ConfigBlob::json(&config), volumes))
    }

    async fn backup_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<BackupStats> {
        let Some(session) = lock(&self.sessions).remove(&guest.id.0) else {
            return Ok(BackupStats::default());
        };
        let mut result = stop_all(session.exports.into_values()).await;
        for (file, read, added) in session.bitmaps {
            let read = read.unwrap_or_default();
            let mut stale = vec![added.clone()];
            if outcome.is_success() {
                let info = image_info(&file).await.map_err(|e| e.guest(&guest.id));
                let bitmaps = info?.1.into_iter().map(|b| b.0);
                let old = |b: &String| b.starts_with(BITMAP_PREFIX) && *b != added && *b != read;
                stale = bitmaps.filter(old).collect();
            }
            for name in stale {
                let r = qemu_img("bitmap", &["--remove"], &file, Some(&name)).await;
                result = result.and(r.map(drop).map_err(|e| e.guest(&guest.id)));
            }
        }
        result.map(|()| BackupStats::default())
    }

    async fn restore_vm_init(&self, request: &RestoreVmRequest) -> Result<Guest> {
        let snapshot = &request.archive.snapshot;
        if request.target == RestoreTarget::InPlace {
            let (id, files) = (&snapshot.guest.0, self.disks(&snapshot.guest.0)?.0);
            self.begin(id, |s| s.files = files)?;
            return Ok(Guest::vm(id.clone()));
        }
        let RestoreTarget::NewGuest { name } = &request.target else {
            return Err(Error::unsupported("this restore target"));
        };
        let name = name.clone();
        let name = name.unwrap_or_else(|| format!("{}-restored", snapshot.guest));
        plain_name("restore name", &name)?;
        let config = serde_json::from_slice::<GuestConfig>(&request.guest_config.data);
        let msg = |e| Error::invalid(format!("the stored config is no guest.json: {e}"));
        let mut config = config.map_err(msg)?;
        let devices = snapshot.volumes.iter().map(|v| v.volume.device.clone());
        let disk = |(i, device)| DiskConfig {
            device,
            file: format!("disk{i}.qcow2"),
        };
        config.disks = devices.enumerate().map(disk).collect();
        config.name.clone_from(&name);
        let dir = self.root.join(&name);
        self.begin(&name, |s| {
            s.files = config.files(&dir);
            s.new_guest = Some((dir.clone(), config));
        })?;
        if let Err(e) = std::fs::create_dir(&dir) {
            lock(&self.sessions).remove(&name);
            let msg = format!("{} exists (guest or interrupted restore)", dir.display());
            return Err(Error::new(ErrorKind::Refused, msg).with_source(e));
        }
        Ok(Guest::vm(name))
    }

    async fn restore_vm_volume_init(&self, request: &RestoreVolumeRequest) -> Result<VolumeImport> {
        let (id, volume) = (&request.guest.id.0, &request.volume.volume);
        let context = |e: Error| e.guest(id).volume(&volume.device);
        let file = self.session(id, |s| s.files.get(&volume.device).cloned())?;
        let file = file.ok_or_else(|| context(Error::not_found("no such disk in the restore")))?;
        let size = volume.size.to_string();
        let op = if file.exists() { "resize" } else { "create" };
        let flags = [if op == "resize" { "--shrink" } else { "-q" }];
        let done = qemu_img(op, &flags, &file, Some(&size)).await;
        done.map_err(context)?;
        let access = self.serve(id, &volume.device, &file, &[]).await;
        let access = SnapshotAccess::Nbd(access.map_err(context)?);
        Ok(VolumeImport::merged_into(access))
    }

    async fn restore_vm_volume_cleanup(&self, guest: &Guest, dev: &str, _: &Outcome) -> Result<()> {
        let export = self.session(&guest.id.0, |s| s.exports.remove(dev))?;
        let stopped = stop_all(export).await;
        stopped.map_err(|e| e.guest(&guest.id).volume(dev))
    }

    async fn restore_vm_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(session) = lock(&self.sessions).remove(&guest.id.0) else {
            return Ok(());
        };
        let result = stop_all(session.exports.into_values()).await;
        let mut result = result.map_err(|e| e.guest(&guest.id));
        let Some((dir, config)) = session.new_guest else {
            return result;
        };
        if outcome.is_success() && result.is_ok() {
            result = config.save(&dir);
        }
        if !outcome.is_success() || result.is_err() {
            let removed = std::fs::remove_dir_all(&dir);
            result = result.and(removed.map_err(|e| io("removing", &dir, e)));
        }
        result
    }
}
