//! provider-nbd runs the whole conformance kit against real `qemu-nbd`
//! exports.
//!
//! The platform is "qcow2 images served by qemu-nbd": each guest volume is
//! a qcow2 image with a persistent, enabled dirty bitmap `cbt0` (64 KiB
//! granularity), exported writable by its own `qemu-nbd` process on a unix
//! socket with `--bitmap cbt0`. The guest writes through NBD (so qemu's
//! bitmap records the writes); a disk grows by stopping its qemu-nbd,
//! `qemu-img resize` and starting it again (the bitmap persists; the host
//! then takes a full backup of that volume because its size changed).
//! Guests restored to new guests are the provider's raw files in its
//! restore directory (`<name>.raw`, or `<name>-<device>.raw` for several
//! volumes); in-place restores write into the exports.
//!
//! The kit creates guests while it runs; the driver tells the provider
//! about them with [`NbdProvider::add_guest`] (and about a grown volume's
//! new size the same way).
//!
//! Needs `qemu-img` and `qemu-nbd` (Debian `qemu-utils`). Without them the
//! test skips with a printed reason, unless `CI` is set: then it fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use conformance::{Check, DriverVolume, Kit, PlatformDriver};
use nbd::client::{Address, Client, ConnectOptions};
use provider_api::{BackupProvider, Error, ErrorKind, Guest, NbdAccess, NbdAddress, Result};
use provider_nbd::{NbdGuest, NbdProvider, NbdVolume};

const BITMAP: &str = "cbt0";
const EXPORT: &str = "disk";
const GRANULARITY: u64 = 64 * 1024;

/// Whether the qemu tools are here; `Err(reason)` when not.
fn qemu_tools() -> std::result::Result<(), String> {
    for tool in ["qemu-img", "qemu-nbd"] {
        match Command::new(tool).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("`{tool} --version` failed: {}", o.status)),
            Err(e) => return Err(format!("{tool} not found ({e}); install qemu-utils")),
        }
    }
    Ok(())
}

/// `true` when the test may run; skips (prints why) without `CI`, panics
/// with `CI` set.
fn require_qemu() -> bool {
    match qemu_tools() {
        Ok(()) => true,
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("CI is set and the qemu tools are missing: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED: provider-nbd conformance kit: {reason}");
            false
        }
    }
}

fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{what}: {e}"))
}

fn nbd_err(what: impl std::fmt::Display, e: nbd::Error) -> Error {
    Error::new(ErrorKind::DataPath, format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run a command to completion; an error carries its stderr.
fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io(&what, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One qemu-nbd process we started. Dropping it kills it (SIGKILL) and
/// reaps it; [`QemuNbd::stop`] ends it cleanly (SIGTERM: qemu-nbd closes
/// the image and stores the bitmap, so it is not left `in-use`).
struct QemuNbd {
    child: Child,
    log: PathBuf,
}

impl QemuNbd {
    /// Serve `image` (qcow2, bitmap [`BITMAP`]) writable on `socket`, and
    /// wait until it accepts connections.
    fn start(image: &Path, socket: &Path, log: &Path) -> Result<QemuNbd> {
        let _ = std::fs::remove_file(socket);
        let log_file = std::fs::File::create(log).map_err(|e| io(log.display(), e))?;
        let child = Command::new("qemu-nbd")
            .arg("--socket")
            .arg(socket)
            .args(["--export-name", EXPORT, "--format", "qcow2"])
            .args(["--bitmap", BITMAP])
            // Several connections at once (the host reads with several,
            // the driver connects for its writes and reads) and the
            // server survives every client's disconnect.
            .args(["--shared", "16", "--persistent"])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| io("starting qemu-nbd", e))?;
        let mut server = QemuNbd {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(Error::other(format!(
                    "qemu-nbd for {} exited at start ({status}): {}",
                    image.display(),
                    server.log_text()
                )));
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(Error::other(format!(
                    "qemu-nbd for {} did not listen on {} within 20 s: {}",
                    image.display(),
                    socket.display(),
                    server.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s.trim().to_owned()
    }

    /// SIGTERM, and wait (SIGKILL after 10 s).
    fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(Error::other(format!(
                        "qemu-nbd exited with {status} when stopped: {}",
                        self.log_text()
                    )));
                }
                Ok(None) if Instant::now() > deadline => {
                    return Err(Error::other(
                        "qemu-nbd did not stop within 10 s of SIGTERM (killed)",
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(io("waiting for qemu-nbd", e)),
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One volume of a guest the driver created.
struct Export {
    device: String,
    image: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    size: u64,
    server: Option<QemuNbd>,
}

impl Export {
    fn access(&self) -> NbdAccess {
        NbdAccess::new(NbdAddress::Unix(self.socket.clone()), EXPORT)
    }

    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new(Address::Unix(self.socket.clone()), EXPORT)
    }

    fn nbd_volume(&self) -> NbdVolume {
        NbdVolume {
            device: self.device.clone(),
            access: self.access(),
            size: self.size,
            bitmap: Some(BITMAP.to_owned()),
        }
    }
}

struct Platform {
    /// Images, sockets and logs; the provider's restore directory is
    /// `restore_dir` beside it.
    images: PathBuf,
    restore_dir: PathBuf,
    guests: BTreeMap<String, Vec<Export>>,
}

/// The platform driver: qcow2 images served by qemu-nbd, plus the
/// provider's restore directory for restored guests.
struct QemuNbdDriver {
    provider: Arc<NbdProvider>,
    platform: Arc<Mutex<Platform>>,
    // Last: removed after every qemu-nbd is gone (fields drop in order;
    // the processes die with `platform` when no blocking task holds it).
    _root: tempfile::TempDir,
}

impl QemuNbdDriver {
    fn new() -> (Arc<NbdProvider>, Arc<QemuNbdDriver>) {
        let root = tempfile::tempdir().expect("temporary directory");
        let images = root.path().join("images");
        let restore_dir = root.path().join("restore");
        std::fs::create_dir_all(&images).expect("images directory");
        std::fs::create_dir_all(&restore_dir).expect("restore directory");
        let provider = Arc::new(NbdProvider::new([], restore_dir.clone()));
        let driver = QemuNbdDriver {
            provider: provider.clone(),
            platform: Arc::new(Mutex::new(Platform {
                images,
                restore_dir,
                guests: BTreeMap::new(),
            })),
            _root: root,
        };
        (provider, Arc::new(driver))
    }

    /// Run `f` on the platform in a blocking task (qemu-img and process
    /// management block).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Platform) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let platform = self.platform.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&platform)))
            .await
            .map_err(|e| Error::other(format!("driver task failed: {e}")))?
    }

    /// The export of a created guest, or `None` for a restored guest.
    fn export(&self, guest: &Guest, device: &str) -> Result<Option<ConnectOptions>> {
        let p = lock(&self.platform);
        let Some(exports) = p.guests.get(&guest.id.0) else {
            return Ok(None);
        };
        exports
            .iter()
            .find(|e| e.device == device)
            .map(|e| Some(e.connect_options()))
            .ok_or_else(|| Error::not_found(format!("no volume {device:?} in guest {}", guest.id)))
    }

    fn nbd_guest(id: &str, exports: &[Export]) -> NbdGuest {
        NbdGuest {
            id: id.to_owned(),
            volumes: exports.iter().map(Export::nbd_volume).collect(),
        }
    }
}

impl Platform {
    /// The raw files a restore to a new guest `name` wrote, by device, in
    /// device order: `<name>.raw` (one volume, reported as `disk0`) or
    /// `<name>-<device>.raw`.
    fn restored_files(&self, name: &str) -> Result<Vec<(String, PathBuf)>> {
        let single = self.restore_dir.join(format!("{name}.raw"));
        if single.exists() {
            return Ok(vec![("disk0".to_owned(), single)]);
        }
        let prefix = format!("{name}-");
        let mut out = Vec::new();
        let dir =
            std::fs::read_dir(&self.restore_dir).map_err(|e| io(self.restore_dir.display(), e))?;
        for entry in dir {
            let entry = entry.map_err(|e| io(self.restore_dir.display(), e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(device) = file
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".raw"))
            else {
                continue;
            };
            // Our devices are `diskN`: a '-' means another guest's name.
            if !device.contains('-') {
                out.push((device.to_owned(), entry.path()));
            }
        }
        out.sort();
        if out.is_empty() {
            return Err(Error::not_found(format!(
                "guest {name}: neither a created guest nor restored files in {}",
                self.restore_dir.display()
            )));
        }
        Ok(out)
    }
}

#[async_trait]
impl PlatformDriver for QemuNbdDriver {
    async fn create_guest(&self, name: &str, sizes: &[u64]) -> Result<Guest> {
        let name = name.to_owned();
        let sizes = sizes.to_vec();
        let guest = self
            .blocking(move |p| {
                if p.guests.contains_key(&name) {
                    return Err(Error::invalid(format!("guest {name} exists")));
                }
                let mut exports = Vec::new();
                for (i, size) in sizes.iter().enumerate() {
                    // qcow2 sizes are whole sectors.
                    let size = size.div_ceil(512) * 512;
                    let device = format!("disk{i}");
                    let base = p.images.join(format!("{name}-{device}"));
                    let image = base.with_extension("qcow2");
                    run(Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2"])
                        .arg(&image)
                        .arg(size.to_string()))?;
                    run(Command::new("qemu-img")
                        .args(["bitmap", "--add", "--enable", "--granularity", "64K"])
                        .arg(&image)
                        .arg(BITMAP))?;
                    let socket = base.with_extension("sock");
                    let log = base.with_extension("log");
                    let server = QemuNbd::start(&image, &socket, &log)?;
                    exports.push(Export {
                        device,
                        image,
                        socket,
                        log,
                        size,
                        server: Some(server),
                    });
                }
                let guest = QemuNbdDriver::nbd_guest(&name, &exports);
                p.guests.insert(name, exports);
                Ok(guest)
            })
            .await?;
        let id = guest.id.clone();
        self.provider.add_guest(guest);
        Ok(Guest::vm(id))
    }

    async fn volumes(&self, guest: &Guest) -> Result<Vec<DriverVolume>> {
        let p = lock(&self.platform);
        if let Some(exports) = p.guests.get(&guest.id.0) {
            return Ok(exports
                .iter()
                .map(|e| DriverVolume {
                    device: e.device.clone(),
                    size: e.size,
                })
                .collect());
        }
        p.restored_files(&guest.id.0)?
            .into_iter()
            .map(|(device, path)| {
                let size = std::fs::metadata(&path)
                    .map_err(|e| io(path.display(), e))?
                    .len();
                Ok(DriverVolume { device, size })
            })
            .collect()
    }

    async fn write(&self, guest: &Guest, device: &str, offset: u64, data: &[u8]) -> Result<()> {
        let Some(opts) = self.export(guest, device)? else {
            return Err(Error::unsupported(format!(
                "writing into restored guest {} (its volumes are files)",
                guest.id
            )));
        };
        let what = format!("guest {} volume {device}: write at {offset}", guest.id);
        let client = Client::connect(&opts)
            .await
            .map_err(|e| nbd_err(&what, e))?;
        // Writes must be aligned to the server's minimum block size:
        // read-modify-write the edges when they are not.
        let min = u64::from(client.block_size().min.max(1));
        let start = offset / min * min;
        let end = ((offset + data.len() as u64).div_ceil(min) * min).min(client.size());
        let result = async {
            if start == offset && end == offset + data.len() as u64 {
                client.write(offset, data).await?;
            } else {
                let mut buf = client.read(start, (end - start) as usize).await?.to_vec();
                let at = (offset - start) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
                client.write(start, &buf).await?;
            }
            client.flush().await
        }
        .await;
        let _ = client.disconnect().await;
        result.map_err(|e| nbd_err(&what, e))
    }

    async fn read(&self, guest: &Guest, device: &str) -> Result<Vec<u8>> {
        let what = format!("guest {} volume {device}: read", guest.id);
        match self.export(guest, device)? {
            Some(opts) => {
                let client = Client::connect(&opts)
                    .await
                    .map_err(|e| nbd_err(&what, e))?;
                let result = client.read(0, client.size() as usize).await;
                let _ = client.disconnect().await;
                Ok(result.map_err(|e| nbd_err(&what, e))?.to_vec())
            }
            None => {
                let files = lock(&self.platform).restored_files(&guest.id.0)?;
                let (_, path) = files
                    .into_iter()
                    .find(|(d, _)| d == device)
                    .ok_or_else(|| Error::not_found(format!("{what}: no such volume")))?;
                std::fs::read(&path).map_err(|e| io(path.display(), e))
            }
        }
    }

    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> Result<()> {
        let id = guest.id.0.clone();
        let device = device.to_owned();
        let updated = self
            .blocking(move |p| {
                let exports = p.guests.get_mut(&id).ok_or_else(|| {
                    Error::unsupported(format!("growing restored guest {id} (files)"))
                })?;
                let e = exports
                    .iter_mut()
                    .find(|e| e.device == device)
                    .ok_or_else(|| Error::not_found(format!("no volume {device:?} in {id}")))?;
                let new_size = new_size.div_ceil(512) * 512;
                // qemu-nbd cannot resize a live export: stop it (cleanly,
                // so the persistent bitmap is stored), resize, serve again.
                if let Some(server) = e.server.take() {
                    server.stop()?;
                }
                run(Command::new("qemu-img")
                    .args(["resize", "-q", "-f", "qcow2"])
                    .arg(&e.image)
                    .arg(new_size.to_string()))?;
                e.server = Some(QemuNbd::start(&e.image, &e.socket, &e.log)?);
                e.size = new_size;
                Ok(QemuNbdDriver::nbd_guest(&id, exports))
            })
            .await?;
        // The provider reports the size it is configured with.
        self.provider.add_guest(updated);
        Ok(())
    }

    async fn leftovers(&self) -> Result<Vec<String>> {
        // provider-nbd creates nothing on the "platform" (no snapshot, no
        // export, no bitmap); what a restore may leave is its temporary
        // files in the restore directory.
        let dir = lock(&self.platform).restore_dir.clone();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io(dir.display(), e))? {
            let entry = entry.map_err(|e| io(dir.display(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".partial") {
                out.push(format!("restore temporary file {}", entry.path().display()));
            }
        }
        out.sort();
        Ok(out)
    }

    async fn remove_guest(&self, guest: &Guest) -> Result<()> {
        let id = guest.id.0.clone();
        if lock(&self.platform).guests.contains_key(&id) {
            self.provider.remove_guest(&id);
        }
        self.blocking(move |p| {
            if let Some(exports) = p.guests.remove(&id) {
                for e in exports {
                    if let Some(server) = e.server {
                        server.stop()?;
                    }
                    for f in [&e.image, &e.socket, &e.log] {
                        match std::fs::remove_file(f) {
                            Ok(()) => {}
                            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                            Err(err) => return Err(io(f.display(), err)),
                        }
                    }
                }
                return Ok(());
            }
            // A restored guest; a failed restore left no file (the kit
            // removes the guests of failed restores too).
            let files = match p.restored_files(&id) {
                Ok(files) => files,
                Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            for (_, path) in files {
                std::fs::remove_file(&path).map_err(|e| io(path.display(), e))?;
            }
            Ok(())
        })
        .await
    }

    fn tracking_granularity(&self) -> u64 {
        GRANULARITY
    }
}

/// The whole kit against qemu-nbd exports with a persistent dirty bitmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_nbd_passes_the_conformance_kit_against_qemu_nbd() {
    if !require_qemu() {
        return;
    }
    let (provider, driver) = QemuNbdDriver::new();
    let kit = Kit::new(provider as Arc<dyn BackupProvider>, driver)
        .skip(Check::IncrementalReads, INCREMENTAL_READS_GAP);
    let report = match kit.run_all().await {
        Ok(report) => report,
        Err(failure) => panic!("{}{failure}", failure.before),
    };
    println!("{report}");
    let expected: Vec<Check> = Check::ALL
        .into_iter()
        .filter(|c| *c != Check::IncrementalReads)
        .collect();
    assert_eq!(report.ran(), expected, "{report}");
}

/// Why [`Check::IncrementalReads`] is skipped: provider-nbd does not manage
/// the bitmap's epochs (its docs leave clearing and rotation to whoever
/// runs the qemu process; qemu-nbd has no control channel to do it), so
/// the persistent bitmap is never cleared and every incremental re-reads
/// every block dirtied since the bitmap was added, not only the changes
/// since the previous backup. The data stays right (a superset of the
/// changes; round-trip and failure-injection compare every byte).
const INCREMENTAL_READS_GAP: &str = "provider-nbd never clears or rotates the qemu dirty bitmap \
     (qemu-nbd has no control channel), so an incremental reads every block dirtied since the \
     bitmap was added, not only the changes since the previous backup; pinned by \
     incremental_reads_show_the_bitmap_is_never_rotated";

/// Pins the gap [`INCREMENTAL_READS_GAP`] names: when provider-nbd learns
/// to rotate bitmaps, this test fails and the skip above must go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reads_show_the_bitmap_is_never_rotated() {
    if !require_qemu() {
        return;
    }
    let (provider, driver) = QemuNbdDriver::new();
    let kit = Kit::new(provider as Arc<dyn BackupProvider>, driver);
    let failure = kit
        .incremental_reads()
        .await
        .expect_err("provider-nbd now reads only the changes: remove the IncrementalReads skip");
    let text = failure.to_string();
    assert!(
        text.contains("outside what the guest wrote since the full backup"),
        "{text}"
    );
}

/// `add_guest` / `remove_guest`: guests configured after the provider was
/// built are backed up; forgotten ones are unknown again (no qemu needed).
#[tokio::test]
async fn guests_can_be_added_and_removed_while_the_provider_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = NbdProvider::new([], dir.path().to_path_buf());
    let g = Guest::vm("late");
    assert_eq!(
        p.backup_init(&g, 1).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let mut config = NbdGuest::single(
        "late",
        NbdAccess::new(NbdAddress::Unix(dir.path().join("s.sock")), EXPORT),
        1 << 20,
        Some(BITMAP.into()),
    );
    assert!(p.add_guest(config.clone()).is_none());
    p.backup_init(&g, 1).await.unwrap();
    p.backup_cleanup(&g, &provider_api::Outcome::ok())
        .await
        .unwrap();
    config.volumes[0].size = 2 << 20;
    let old = p.add_guest(config).expect("the previous configuration");
    assert_eq!(old.volumes[0].size, 1 << 20);
    assert!(p.remove_guest("late").is_some());
    assert_eq!(
        p.backup_init(&g, 2).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
