//! Importing an appliance: from an OVA (or an OVF with its files beside
//! it) to disks qemu can read in place, and a provider that hands them to
//! the host's backup as one guest.
//!
//! [`Appliance::load`] parses the descriptor, checks the manifest, then
//! looks at every disk before anything is stored: its format is read from
//! its first bytes (VMDK sparse/streamOptimized, qcow2, VDI, else raw;
//! checked against the descriptor's format URL), images that would make
//! qemu open other files are refused (a qcow2 backing file or external
//! data file, a VMDK with a parent or a descriptor naming extents), and
//! `qemu-img info` reads each image's virtual size through the same
//! options the export uses. Nothing is extracted: qemu reads the members
//! of the OVA through its raw driver's offset/size window.
//!
//! [`OvaProvider`] serves each disk with `qemu-nbd --read-only` on a unix
//! socket in a private directory for the time of the backup (killed at
//! `backup_cleanup`, and on drop), and returns them with the guest's
//! `GuestSpec` as its configuration. It only backs up:
//! an imported snapshot restores through any other provider.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use provider_api::{
    ArchiveName, BackupMechanism, BackupStats, BackupVmRequest, ConfigBlob, DirtySource, Guest,
    GuestKind, IncrementalPlan, JobInfo, NbdAccess, NbdAddress, Outcome, PreviousBackup,
    RestoreVmRequest, RestoreVolumeRequest, SnapshotAccess, VmBackup, Volume, VolumeAccess,
    VolumeFormat, VolumeImport,
};

use crate::error::{Error, ErrorKind, Result};
use crate::ova::{MAX_MANIFEST, Member, Ova, Span, check_manifest};
use crate::ovf::{self, MAX_DESCRIPTOR};
use crate::spec::GuestSpec;

/// Where a disk's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    /// qemu block driver (`vmdk`, `qcow2`, `vdi`, `raw`).
    pub driver: String,
    /// `--image-opts` for qemu-img and qemu-nbd.
    pub opts: String,
    /// Virtual size (from `qemu-img info`).
    pub size: u64,
}

/// One disk ready to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedDisk {
    /// Device name in the snapshot.
    pub device: String,
    /// Its content; `None` for a blank disk (served as zeros).
    pub source: Option<ImageSource>,
    /// Virtual size.
    pub size: u64,
}

/// A loaded appliance.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// The guest.
    pub spec: GuestSpec,
    /// Its disks, in device order.
    pub disks: Vec<PreparedDisk>,
    /// What was assumed, left out or not checked.
    pub warnings: Vec<String>,
    /// The descriptor as the appliance had it.
    pub descriptor: String,
    /// The file imported.
    pub origin: PathBuf,
}

/// Where the bytes of a file the descriptor references are.
type WindowOf = Box<dyn Fn(&str) -> Result<Window>>;

/// Bytes of a disk: a window of a file.
struct Window {
    path: PathBuf,
    offset: u64,
    size: u64,
}

impl Window {
    fn read_at(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let shown = self.path.display().to_string();
        if at >= self.size {
            return Ok(Vec::new());
        }
        let len = len.min((self.size - at) as usize);
        let mut f = std::fs::File::open(&self.path).map_err(|e| Error::io(&shown, e))?;
        f.seek(SeekFrom::Start(self.offset + at))
            .map_err(|e| Error::io(&shown, e))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f.read(&mut buf[got..]).map_err(|e| Error::io(&shown, e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn image_opts(&self, driver: &str) -> String {
        Member {
            name: String::new(),
            offset: self.offset,
            size: self.size,
        }
        .image_opts(driver, &self.path)
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// The qemu driver for the image in `w`, refusing images that would make
/// qemu open other files, and a warning when `declared` (the descriptor's
/// format URL) says otherwise.
fn sniff(w: &Window, context: &str, declared: Option<&str>) -> Result<(String, Option<String>)> {
    let head = w.read_at(0, 512)?;
    let refused = |m: &str| Error::new(ErrorKind::Refused, context, m);
    let driver = if head.starts_with(b"KDMV") {
        // Sparse VMDK header (little endian): descriptor offset and size
        // in sectors at 28 and 36.
        let off = le64(&head, 28);
        let len = le64(&head, 36);
        if off > 0 && len > 0 && len <= 128 {
            let text = w.read_at(off.saturating_mul(512), (len * 512) as usize)?;
            let text = String::from_utf8_lossy(&text);
            if text.contains("parentFileNameHint") {
                return Err(refused(
                    "a VMDK delta with a parent (parentFileNameHint): qemu would open another file",
                ));
            }
        }
        "vmdk"
    } else if head.starts_with(b"# Disk DescriptorFile") {
        return Err(refused(
            "a VMDK descriptor naming extent files: only monolithic VMDKs (streamOptimized, monolithicSparse) are imported",
        ));
    } else if head.starts_with(b"QFI\xfb") {
        if be64(&head, 8) != 0 {
            return Err(refused(
                "a qcow2 image with a backing file: qemu would open another file",
            ));
        }
        // Version 3: incompatible feature bit 2 is an external data file.
        if u32::from_be_bytes([head[4], head[5], head[6], head[7]]) >= 3 && be64(&head, 72) & 4 != 0
        {
            return Err(refused(
                "a qcow2 image with an external data file: qemu would open another file",
            ));
        }
        "qcow2"
    } else if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        "vdi"
    } else if head.starts_with(b"conectix") {
        // A dynamic VHD (its footer copy first): disk type 4 is a
        // differencing disk with a parent.
        if head.get(60..64) == Some(&[0, 0, 0, 4]) {
            return Err(refused(
                "a differencing VHD with a parent: qemu would open another file",
            ));
        }
        "vpc"
    } else {
        "raw"
    };
    if let Some(url) = declared {
        let url = url.to_ascii_lowercase();
        let says = if url.contains("vmdk") {
            Some("vmdk")
        } else if url.contains("qcow") {
            Some("qcow2")
        } else if url.contains("vdi") {
            Some("vdi")
        } else if url.contains("vhd") {
            Some("vpc")
        } else {
            None
        };
        if let Some(says) = says
            && says != driver
        {
            // oVirt's OVAs say VMDK and hold qcow2: the content decides.
            return Ok((
                driver.to_owned(),
                Some(format!(
                    "{context}: the descriptor says {says} ({url}), the content is {driver}: read as {driver}"
                )),
            ));
        }
    }
    Ok((driver.to_owned(), None))
}

/// `qemu-img info` of `opts`: the virtual size.
fn virtual_size(opts: &str, context: &str) -> Result<u64> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "--image-opts", opts])
        .output()
        .map_err(|e| Error::io(format!("{context}: running qemu-img"), e))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Tool,
            context,
            format!(
                "qemu-img info: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::new(
            ErrorKind::Tool,
            context,
            format!("qemu-img info output: {e}"),
        )
    })?;
    v["virtual-size"].as_u64().ok_or_else(|| {
        Error::new(
            ErrorKind::Tool,
            context,
            "qemu-img info gave no virtual-size",
        )
    })
}

/// A file named by an OVF beside it: one plain component.
fn beside(descriptor: &Path, href: &str) -> Result<PathBuf> {
    let context = format!("file {href:?}");
    let ok = !href.is_empty()
        && href != "."
        && href != ".."
        && !href.contains('/')
        && !href.contains('\\')
        && !href.contains(':')
        && !href.chars().any(char::is_control);
    if !ok {
        return Err(Error::new(
            ErrorKind::Refused,
            context,
            "not a plain file name beside the descriptor (URLs and paths are not followed)",
        ));
    }
    Ok(descriptor.parent().unwrap_or(Path::new(".")).join(href))
}

impl Appliance {
    /// Load the OVA or OVF at `path`; `name` overrides the guest's name.
    pub fn load(path: &Path, name: Option<&str>) -> Result<Appliance> {
        let shown = path.display().to_string();
        let is_ovf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ovf"));
        let fallback = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "imported".to_owned());
        // An OVA's headers are read once: the members checked are the
        // members read.
        let ova = if is_ovf { None } else { Some(Ova::open(path)?) };
        let (descriptor, windows_of): (Vec<u8>, WindowOf) = if let Some(ova) = &ova {
            let xml = ova.read(ova.descriptor()?, MAX_DESCRIPTOR as u64)?;
            let archive = ova.clone();
            (
                xml,
                Box::new(move |href: &str| {
                    let m = archive.member(href)?;
                    Ok(Window {
                        path: archive.path().to_owned(),
                        offset: m.offset,
                        size: m.size,
                    })
                }),
            )
        } else {
            let meta = std::fs::metadata(path).map_err(|e| Error::io(&shown, e))?;
            if meta.len() > MAX_DESCRIPTOR as u64 {
                return Err(Error::new(
                    ErrorKind::Limit,
                    &shown,
                    format!(
                        "{} bytes, more than the {MAX_DESCRIPTOR} accepted",
                        meta.len()
                    ),
                ));
            }
            let xml = std::fs::read(path).map_err(|e| Error::io(&shown, e))?;
            let base = path.to_owned();
            (
                xml,
                Box::new(move |href: &str| {
                    let file = beside(&base, href)?;
                    let size = std::fs::metadata(&file)
                        .map_err(|e| Error::io(file.display().to_string(), e))?
                        .len();
                    Ok(Window {
                        path: file,
                        offset: 0,
                        size,
                    })
                }),
            )
        };
        let parsed = ovf::parse(&descriptor).map_err(|e| e.within(&shown))?;
        let (mut spec, disks, mut warnings) =
            parsed.guest(&fallback).map_err(|e| e.within(&shown))?;
        if let Some(n) = name {
            spec.name = n.to_owned();
        }
        // The manifest: every referenced file and the descriptor.
        let mut names: Vec<&str> = disks.iter().filter_map(|d| d.href.as_deref()).collect();
        names.sort_unstable();
        names.dedup();
        match &ova {
            None => warnings.extend(verify_beside(path, &names)?),
            Some(ova) => {
                let mut all = names.clone();
                all.push(&ova.descriptor()?.name);
                warnings.extend(ova.verify(&all)?);
            }
        }
        let mut prepared = Vec::with_capacity(disks.len());
        for (d, spec_disk) in disks.iter().zip(spec.disks.iter_mut()) {
            let Some(href) = &d.href else {
                // `guest` refuses a blank disk without a capacity.
                let size = d.size.unwrap_or(0);
                warnings.push(format!(
                    "{}: a blank disk of {size} bytes (no file in the appliance)",
                    d.device
                ));
                prepared.push(PreparedDisk {
                    device: d.device.clone(),
                    source: None,
                    size,
                });
                continue;
            };
            let context = format!("{shown}: disk {} ({href})", d.device);
            let w = windows_of(href).map_err(|e| e.within(&shown))?;
            let (driver, warning) = sniff(&w, &context, d.format.as_deref())?;
            warnings.extend(warning);
            let opts = w.image_opts(&driver);
            let size = virtual_size(&opts, &context)?;
            match d.size {
                Some(declared) if declared != size => warnings.push(format!(
                    "{}: the descriptor declares {declared} bytes, the image holds {size}: the image's size is kept",
                    d.device
                )),
                _ => {}
            }
            spec_disk.size = size;
            prepared.push(PreparedDisk {
                device: d.device.clone(),
                source: Some(ImageSource { driver, opts, size }),
                size,
            });
        }
        if prepared.is_empty() {
            return Err(Error::new(
                ErrorKind::Missing,
                &shown,
                "the descriptor attaches no disk: nothing to import",
            ));
        }
        Ok(Appliance {
            spec,
            disks: prepared,
            warnings,
            descriptor: String::from_utf8_lossy(&descriptor).into_owned(),
            origin: path.to_owned(),
        })
    }
}

/// The manifest check of an OVF with its files beside it (`<stem>.mf`).
fn verify_beside(descriptor: &Path, names: &[&str]) -> Result<Vec<String>> {
    let mf = descriptor.with_extension("mf");
    let shown = mf.display().to_string();
    let size = match std::fs::metadata(&mf) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(vec![format!(
                "{} has no manifest beside it: its files are not checked",
                descriptor.display()
            )]);
        }
        Err(e) => return Err(Error::io(&shown, e)),
    };
    if size > MAX_MANIFEST {
        return Err(Error::new(
            ErrorKind::Limit,
            &shown,
            format!("{size} bytes, more than the {MAX_MANIFEST} accepted"),
        ));
    }
    let text = std::fs::read(&mf).map_err(|e| Error::io(&shown, e))?;
    let mut files = Vec::new();
    let desc_name = descriptor
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for name in names.iter().copied().chain([desc_name.as_str()]) {
        let path = if name == desc_name {
            descriptor.to_owned()
        } else {
            beside(descriptor, name)?
        };
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(path.display().to_string(), e))?
            .len();
        files.push((name, path, size));
    }
    let spans: Vec<Span<'_>> = files
        .iter()
        .map(|(name, path, size)| Span {
            name,
            path,
            offset: 0,
            size: *size,
        })
        .collect();
    check_manifest(&text, &shown, &spans)
}

/// A running `qemu-nbd` serving one disk.
struct Server {
    device: String,
    socket: PathBuf,
    size: u64,
    child: tokio::process::Child,
}

/// Start `qemu-nbd --read-only` on `opts` at `socket`; returns once it
/// accepts connections (its socket file appears at `bind`, before
/// `listen`).
async fn serve(opts: &str, socket: &Path, context: &str) -> Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new("qemu-nbd")
        .args([
            "--read-only",
            "--persistent",
            "--shared=16",
            "--export-name=disk",
        ])
        .arg("--socket")
        .arg(socket)
        .args(["--image-opts", opts])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io(format!("{context}: starting qemu-nbd"), e))?;
    let t0 = Instant::now();
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Err(Error::new(
                ErrorKind::Tool,
                context,
                format!("qemu-nbd exited ({status}): {}", err.trim()),
            ));
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(Error::new(
                ErrorKind::Tool,
                context,
                "qemu-nbd did not listen within 30 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The import provider: backs up one [`Appliance`] as guest `id`
/// (platform `ova`). Restores go through other providers.
pub struct OvaProvider {
    id: String,
    appliance: Appliance,
    /// Private directory of the sockets.
    dir: PathBuf,
    servers: tokio::sync::Mutex<Vec<Server>>,
}

impl std::fmt::Debug for OvaProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvaProvider")
            .field("id", &self.id)
            .field("origin", &self.appliance.origin)
            .finish_non_exhaustive()
    }
}

/// Platform name of imported snapshots.
pub const PLATFORM: &str = "ova";

impl OvaProvider {
    /// A provider importing `appliance` as guest `id`; sockets go into
    /// `socket_dir` (private to this user, created if missing).
    pub fn new(id: impl Into<String>, appliance: Appliance, socket_dir: PathBuf) -> Self {
        OvaProvider {
            id: id.into(),
            appliance,
            dir: socket_dir,
            servers: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    fn check(&self, guest: &Guest) -> provider_api::Result<()> {
        if guest.id.0 != self.id || guest.kind != GuestKind::Vm {
            return Err(provider_api::Error::not_found(format!(
                "this import provider holds guest {} only",
                self.id
            ))
            .guest(&guest.id));
        }
        Ok(())
    }

    async fn stop_servers(&self) {
        let mut servers = self.servers.lock().await;
        for mut s in servers.drain(..) {
            let _ = s.child.kill().await;
            let _ = std::fs::remove_file(&s.socket);
        }
    }
}

#[async_trait]
impl provider_api::BackupProvider for OvaProvider {
    fn provider_name(&self) -> &str {
        PLATFORM
    }

    fn capabilities(&self) -> provider_api::Capabilities {
        provider_api::Capabilities::none()
    }

    async fn job_init(&self, _job: &JobInfo) -> provider_api::Result<()> {
        Ok(())
    }

    async fn job_cleanup(&self) -> provider_api::Result<()> {
        self.stop_servers().await;
        Ok(())
    }

    async fn backup_init(
        &self,
        guest: &Guest,
        start_time: i64,
    ) -> provider_api::Result<ArchiveName> {
        self.check(guest)?;
        ArchiveName::new(format!("vm/{}/{start_time}", guest.id))
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> provider_api::Result<BackupMechanism> {
        self.check(guest)?;
        Ok(BackupMechanism::Nbd)
    }

    async fn backup_vm_query_incremental(
        &self,
        guest: &Guest,
        _previous: Option<&PreviousBackup>,
    ) -> provider_api::Result<IncrementalPlan> {
        self.check(guest)?;
        // An appliance has no change tracking: every import reads it all
        // (unchanged chunks still deduplicate in the datastore).
        Ok(IncrementalPlan::new())
    }

    async fn backup_vm(
        &self,
        guest: &Guest,
        _request: BackupVmRequest,
    ) -> provider_api::Result<VmBackup> {
        self.check(guest)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| provider_api::Error::from(Error::io(self.dir.display().to_string(), e)))?;
        let mut volumes = Vec::new();
        let mut servers = self.servers.lock().await;
        for d in &self.appliance.disks {
            let socket = self.dir.join(format!("{}.sock", d.device));
            let _ = std::fs::remove_file(&socket);
            let blank;
            let opts = match &d.source {
                Some(s) => s.opts.as_str(),
                None => {
                    blank = format!("driver=null-co,size={},read-zeroes=on", d.size);
                    blank.as_str()
                }
            };
            let context = format!("{}: disk {}", self.appliance.origin.display(), d.device);
            let child = serve(opts, &socket, &context)
                .await
                .map_err(|e| provider_api::Error::from(e).guest(&guest.id))?;
            servers.push(Server {
                device: d.device.clone(),
                socket: socket.clone(),
                size: d.size,
                child,
            });
            volumes.push(
                VolumeAccess::new(
                    Volume {
                        device: d.device.clone(),
                        size: d.size,
                        format: VolumeFormat::Raw,
                    },
                    SnapshotAccess::Nbd(NbdAccess::new(NbdAddress::Unix(socket), "disk")),
                )
                .dirty(DirtySource::All),
            );
        }
        tracing::info!(
            guest = %guest.id,
            disks = servers.len(),
            sizes = ?servers.iter().map(|s| (&s.device, s.size)).collect::<Vec<_>>(),
            "serving the appliance's disks"
        );
        let metadata = serde_json::json!({
            "origin": self.appliance.origin.file_name().map(|n| n.to_string_lossy().into_owned()),
            "ovf": self.appliance.descriptor,
        });
        let config: ConfigBlob = self.appliance.spec.to_config();
        Ok(VmBackup::new(config, volumes)
            .metadata(metadata)
            .warnings(self.appliance.warnings.clone()))
    }

    async fn backup_cleanup(
        &self,
        guest: &Guest,
        _outcome: &Outcome,
    ) -> provider_api::Result<BackupStats> {
        self.check(guest)?;
        self.stop_servers().await;
        Ok(BackupStats::default())
    }

    async fn restore_vm_init(&self, _request: &RestoreVmRequest) -> provider_api::Result<Guest> {
        Err(provider_api::Error::unsupported(
            "restore through the OVA importer (restore an imported snapshot with any other provider)",
        ))
    }

    async fn restore_vm_volume_init(
        &self,
        _request: &RestoreVolumeRequest,
    ) -> provider_api::Result<VolumeImport> {
        Err(provider_api::Error::unsupported(
            "restore through the OVA importer",
        ))
    }

    async fn restore_vm_volume_cleanup(
        &self,
        _guest: &Guest,
        _device: &str,
        _outcome: &Outcome,
    ) -> provider_api::Result<()> {
        Ok(())
    }

    async fn restore_vm_cleanup(
        &self,
        _guest: &Guest,
        _outcome: &Outcome,
    ) -> provider_api::Result<()> {
        Ok(())
    }
}
