//! The conformance kit against provider-template on a real guest directory,
//! through [`DirDriver`]: the platform's "admin side" is the directory and
//! the qemu tools, never the provider under test.
//!
//! Needs `qemu-img`, `qemu-io` and `qemu-nbd` on `PATH`. Without them the
//! tests say so and pass, except under `CI` (the variable set), where a
//! missing tool fails them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use conformance::{DriverVolume, Kit, PlatformDriver};
use provider_api::{BackupProvider, Error, ErrorKind, Guest, Result};
use provider_template::{DiskConfig, GuestConfig, TemplateProvider, image_info, qemu_img, run};
use tokio::process::Command;

/// True when the qemu tools are there; false (skip) when not, unless `CI`
/// is set: then a missing tool fails the test.
fn qemu_tools() -> bool {
    for tool in ["qemu-img", "qemu-io", "qemu-nbd"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "{tool} is missing and CI is set: install qemu-utils"
            );
            eprintln!("skipping: {tool} is not installed");
            return false;
        }
    }
    true
}

/// The guest directory as its operator and its guests see it.
struct DirDriver {
    root: PathBuf,
    /// The provider's runtime directory: its sockets and pid files.
    runtime: PathBuf,
    scratch: tempfile::TempDir,
    counter: AtomicU64,
}

impl DirDriver {
    fn new(root: &Path, provider: &TemplateProvider) -> Self {
        DirDriver {
            root: root.to_owned(),
            runtime: provider.runtime_dir().to_owned(),
            scratch: tempfile::tempdir().unwrap(),
            counter: AtomicU64::new(0),
        }
    }

    fn disk(&self, guest: &Guest, device: &str) -> Result<PathBuf> {
        let dir = self.root.join(&guest.id.0);
        let config = GuestConfig::load(&dir)?;
        let disk = config.disks.iter().find(|d| d.device == device);
        let disk = disk.ok_or_else(|| Error::not_found("no such disk").volume(device))?;
        Ok(dir.join(&disk.file))
    }

    fn scratch_file(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.scratch.path().join(format!("f{n}"))
    }
}

fn io(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, e.to_string())
}

#[async_trait]
impl PlatformDriver for DirDriver {
    async fn create_guest(&self, name: &str, sizes: &[u64]) -> Result<Guest> {
        let dir = self.root.join(name);
        std::fs::create_dir(&dir).map_err(io)?;
        let mut disks = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let file = format!("disk{i}.qcow2");
            let size = size.to_string();
            qemu_img("create", &["-q"], &dir.join(&file), Some(&size)).await?;
            let device = format!("disk{i}");
            disks.push(DiskConfig { device, file });
        }
        let config = GuestConfig {
            name: name.to_owned(),
            cpus: 2,
            memory_mib: 1024,
            disks,
        };
        config.save(&dir)?;
        Ok(Guest::vm(name))
    }

    async fn volumes(&self, guest: &Guest) -> Result<Vec<DriverVolume>> {
        let dir = self.root.join(&guest.id.0);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for d in GuestConfig::load(&dir)?.disks {
            let (size, _) = image_info(&dir.join(&d.file)).await?;
            out.push(DriverVolume {
                device: d.device,
                size,
            });
        }
        Ok(out)
    }

    /// The guest writes through qemu (`qemu-io`), which marks the disk's
    /// enabled persistent bitmaps.
    async fn write(&self, guest: &Guest, device: &str, offset: u64, data: &[u8]) -> Result<()> {
        let file = self.disk(guest, device)?;
        let src = self.scratch_file();
        std::fs::write(&src, data).map_err(io)?;
        let cmd = format!("write -q -s {} {offset} {}", src.display(), data.len());
        let mut qemu_io = Command::new("qemu-io");
        let r = run(qemu_io.args(["-f", "qcow2", "-c", &cmd]).arg(&file)).await;
        let _ = std::fs::remove_file(&src);
        r.map(drop)
    }

    async fn read(&self, guest: &Guest, device: &str) -> Result<Vec<u8>> {
        let file = self.disk(guest, device)?;
        let out = self.scratch_file();
        let mut convert = Command::new("qemu-img");
        convert.args(["convert", "-U", "-f", "qcow2", "-O", "raw"]);
        run(convert.arg(&file).arg(&out)).await?;
        let data = std::fs::read(&out).map_err(io);
        let _ = std::fs::remove_file(&out);
        data
    }

    async fn grow(&self, guest: &Guest, device: &str, new_size: u64) -> Result<()> {
        let file = self.disk(guest, device)?;
        let size = new_size.to_string();
        qemu_img("resize", &[], &file, Some(&size)).await.map(drop)
    }

    /// Sockets and pid files in the provider's runtime directory, its
    /// `qemu-nbd` processes, guest directories without a `guest.json`
    /// (a restore not finished).
    async fn leftovers(&self) -> Result<Vec<String>> {
        let mut left = Vec::new();
        for entry in std::fs::read_dir(&self.runtime).map_err(io)? {
            left.push(format!(
                "runtime file {}",
                entry.map_err(io)?.path().display()
            ));
        }
        for entry in std::fs::read_dir(&self.root).map_err(io)? {
            let dir = entry.map_err(io)?.path();
            if !dir.join("guest.json").exists() {
                left.push(format!("unfinished guest directory {}", dir.display()));
            }
        }
        let runtime = self.runtime.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").map_err(io)?.flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("qemu-nbd") && cmdline.contains(&runtime) {
                left.push(format!(
                    "process {}: {cmdline}",
                    entry.file_name().display()
                ));
            }
        }
        Ok(left)
    }

    async fn remove_guest(&self, guest: &Guest) -> Result<()> {
        match std::fs::remove_dir_all(self.root.join(&guest.id.0)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }

    /// qemu's default bitmap granularity for a qcow2 of 64 KiB clusters.
    fn tracking_granularity(&self) -> u64 {
        64 * 1024
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_kit_passes() {
    if !qemu_tools() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let provider = Arc::new(TemplateProvider::new(root.path()).unwrap());
    let driver = Arc::new(DirDriver::new(root.path(), &provider));
    let kit = Kit::new(provider.clone() as Arc<dyn BackupProvider>, driver).guest_prefix("tpl");
    match kit.run_all().await {
        Ok(report) => eprintln!("{report}"),
        Err(failure) => panic!("{}{failure}", failure.before),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_guest_and_the_directory() {
    let root = tempfile::tempdir().unwrap();
    let provider = TemplateProvider::new(root.path()).unwrap();
    let e = provider
        .backup_init(&Guest::vm("nope"), 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let text = e.to_string();
    assert!(
        text.contains("guest nope") && text.contains("guest.json"),
        "{text}"
    );
    let e = provider
        .backup_init(&Guest::vm("../etc"), 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// The driver alone: what it writes and grows is what it reads, and the
/// writes mark the provider's bitmaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_mark_the_bitmap() {
    if !qemu_tools() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let provider = TemplateProvider::new(root.path()).unwrap();
    let d = DirDriver::new(root.path(), &provider);
    let g = d.create_guest("g", &[1 << 20]).await.unwrap();
    let file = root.path().join("g/disk0.qcow2");
    qemu_img("bitmap", &["--add"], &file, Some("vmbackup-1"))
        .await
        .unwrap();
    d.write(&g, "disk0", 200_000, b"hello").await.unwrap();
    d.grow(&g, "disk0", 2 << 20).await.unwrap();
    let data = d.read(&g, "disk0").await.unwrap();
    assert_eq!(data.len(), 2 << 20);
    assert_eq!(&data[200_000..200_005], b"hello");
    let (_, bitmaps) = image_info(&file).await.unwrap();
    assert_eq!(bitmaps, [("vmbackup-1".to_owned(), true)]);
    assert!(d.leftovers().await.unwrap().is_empty());
}
