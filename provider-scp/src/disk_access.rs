//! Disk access behind one seam: how the provider gets a disk (or a
//! snapshot of it, or its base image) opened for the host to read or write.
//!
//! On a real SCP, reading and writing disk data is not a REST call: it is
//! the vendor library *sfvddk* — `sfdisklib_open(server, disk, flags)`,
//! with `SFDISKLIB_FLAG_OPEN_BASE_IMAGE` to reach the base image under a
//! linked system disk — which hands back an NBD (or NBDSSL) endpoint, or
//! the disk is hot-added to a backup proxy VM. The provider's backup and
//! restore code never chooses between these itself: it describes *what*
//! it needs ([`DiskTarget`]) and calls [`DiskAccess::open`], hands the
//! [`OpenedDisk::access`] to the host, and later gives the
//! [`OpenedDisk`] back to [`DiskAccess::close`], which releases whatever
//! the open acquired (an export under a lease, a hot-add, a child
//! process).
//!
//! Three implementations, chosen by [`for_options`] from
//! [`ScpOptions::access`] and [`ScpOptions::helper_command`]:
//!
//! | options | implementation | what `open` does | what `close` does |
//! | --- | --- | --- | --- |
//! | `Nbd` / `NbdSsl`, no helper | [`RestExport`] | `POST …/backup-resources/{lease}/exports` | `DELETE` the export |
//! | `HotAdd` | [`HotAdd`] | hot-add to the proxy, find the device | detach |
//! | `Nbd` / `NbdSsl` + helper | [`HelperCommand`] | start the site's command serving NBD on a private Unix socket | kill and reap it |
//!
//! [`RestExport`] is the **test double of sfvddk**: the mock hypervisor
//! (and SCP builds that publish it) exposes the export over REST, so the
//! whole data path can be exercised without the vendor library.
//! [`HelperCommand`] is how a site plugs in the real thing: any command
//! that serves the disk as NBD on a Unix socket (e.g. `nbdkit` with a
//! plugin wrapping sfvddk).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use provider_api::{
    Error, ErrorKind, FileAccess, NbdAccess, NbdAddress, Result, SnapshotAccess, TlsSettings,
};
use reqwest::Method;
use serde_json::{Value, json};

use crate::api::{self, Export, HotAddResult};
use crate::client::ScpClient;
use crate::options::{AccessMode, HelperCommandOptions, ScpOptions};

const SERVERS: &str = "/janus/20250725/servers";
const RESOURCES: &str = "/janus/20240725/backup-resources";

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The host only reads (backups).
    ReadOnly,
    /// The host writes (restores, base image writes).
    ReadWrite,
}

/// What to open — the arguments of sfvddk's `sfdisklib_open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTarget {
    /// The VM the disk belongs to.
    pub server_id: String,
    /// The disk.
    pub disk_id: String,
    /// The snapshot to read (backups); `None` for the live disk (restores).
    pub snapshot_id: Option<String>,
    /// Open the base image under the (linked system) disk instead of the
    /// disk's own data (`SFDISKLIB_FLAG_OPEN_BASE_IMAGE`,
    /// `open_base_image: 1`).
    pub open_base_image: bool,
    /// Read-only or read-write.
    pub mode: OpenMode,
    /// The backup resource (lease) the open happens under, for
    /// implementations that need one ([`DiskAccess::needs_lease`]).
    pub lease: Option<String>,
}

/// A disk opened by a [`DiskAccess`]: where the host reads or writes it,
/// and what must be released. Give it back to [`DiskAccess::close`];
/// dropped without that, a helper process is still killed and reaped (a
/// platform export or hot-add is left for the lease expiry or the next
/// job's sweep).
#[derive(Debug)]
pub struct OpenedDisk {
    /// Where the host reads or writes the disk.
    pub access: SnapshotAccess,
    held: Held,
}

#[derive(Debug)]
enum Held {
    Export { lease: String, id: String },
    HotAdd { proxy: String, id: String },
    Process(HelperProcess),
}

/// The seam: one way of opening disks. See the module documentation.
#[async_trait]
pub trait DiskAccess: Send + Sync + std::fmt::Debug {
    /// Short name for logs (`rest-export`, `hot-add`, `helper-command`).
    fn name(&self) -> &'static str;

    /// Whether [`DiskTarget::lease`] must be set (a backup resource open
    /// while the disk is).
    fn needs_lease(&self) -> bool {
        false
    }

    /// Whether the host reads the opened disks as files (hot-add) rather
    /// than over NBD.
    fn is_file(&self) -> bool {
        false
    }

    /// Open `target` for the host.
    async fn open(&self, target: &DiskTarget) -> Result<OpenedDisk>;

    /// Release what [`Self::open`] acquired. Already released on the
    /// platform (e.g. the lease expired) is not an error.
    async fn close(&self, disk: OpenedDisk) -> Result<()>;
}

/// The implementation the options select (see the module documentation).
pub fn for_options(client: Arc<ScpClient>, options: &ScpOptions) -> Result<Arc<dyn DiskAccess>> {
    match (&options.access, &options.helper_command) {
        (AccessMode::HotAdd { .. }, Some(_)) => Err(Error::invalid(
            "helper_command serves disks over NBD: it cannot be combined with AccessMode::HotAdd",
        )),
        (AccessMode::HotAdd { proxy_server_id }, None) => Ok(Arc::new(HotAdd {
            client,
            proxy_server_id: proxy_server_id.clone(),
            device_root: options.hotadd_device_root.clone(),
            device_wait: options.hotadd_device_wait,
        })),
        (_, Some(helper)) => Ok(Arc::new(HelperCommand::new(helper.clone())?)),
        (AccessMode::Nbd, None) => Ok(Arc::new(RestExport { client, tls: None })),
        (
            AccessMode::NbdSsl {
                ca_pem,
                server_name,
            },
            None,
        ) => Ok(Arc::new(RestExport {
            client,
            tls: Some((ca_pem.clone(), server_name.clone())),
        })),
    }
}

/// The platform's REST export (`POST …/backup-resources/{lease}/exports`,
/// `transport: nbd` or `nbdssl`) under a backup resource: **the test
/// double of sfvddk's `sfdisklib_open`**, as the mock hypervisor offers
/// it. NBDSSL exports are verified against the configured CA.
#[derive(Debug)]
pub struct RestExport {
    client: Arc<ScpClient>,
    /// NBDSSL: CA PEM and the name to verify (default: the export's host).
    tls: Option<(String, Option<String>)>,
}

#[async_trait]
impl DiskAccess for RestExport {
    fn name(&self) -> &'static str {
        "rest-export"
    }

    fn needs_lease(&self) -> bool {
        true
    }

    async fn open(&self, target: &DiskTarget) -> Result<OpenedDisk> {
        let lease = target
            .lease
            .clone()
            .ok_or_else(|| Error::invalid("a REST export needs a backup resource (lease)"))?;
        let mut body = platform_body(target);
        body["transport"] = json!(if self.tls.is_some() { "nbdssl" } else { "nbd" });
        let e: Export = self
            .client
            .call(
                Method::POST,
                &format!("{RESOURCES}/{lease}/exports"),
                &[],
                Some(&body),
            )
            .await?;
        let tls = self.tls.as_ref().map(|(ca_pem, server_name)| TlsSettings {
            ca_pem: ca_pem.as_bytes().to_vec(),
            server_name: server_name.clone().unwrap_or_else(|| e.host.clone()),
            client_cert_pem: None,
            client_key_pem: None,
        });
        let access = NbdAccess::new(
            NbdAddress::Tcp {
                host: e.host.clone(),
                port: e.port,
            },
            e.export_name.clone(),
        )
        .with_tls(tls);
        Ok(OpenedDisk {
            access: SnapshotAccess::Nbd(access),
            held: Held::Export { lease, id: e.id },
        })
    }

    async fn close(&self, disk: OpenedDisk) -> Result<()> {
        close_held(&self.client, disk.held).await
    }
}

/// The disk hot-added to the backup proxy VM (`PUT …/servers/{proxy}`,
/// `action: attach`) and read or written as a local device: `<root>/
/// virtio-<serial>` under [`ScpOptions::hotadd_device_root`] (waited for),
/// or the `local_path` the platform answers.
#[derive(Debug)]
pub struct HotAdd {
    client: Arc<ScpClient>,
    proxy_server_id: String,
    device_root: Option<PathBuf>,
    device_wait: Duration,
}

#[async_trait]
impl DiskAccess for HotAdd {
    fn name(&self) -> &'static str {
        "hot-add"
    }

    fn is_file(&self) -> bool {
        true
    }

    async fn open(&self, target: &DiskTarget) -> Result<OpenedDisk> {
        let mut disk = platform_body(target);
        if target.mode == OpenMode::ReadWrite {
            disk["mode"] = json!("rw");
        }
        disk["action"] = json!("attach");
        let r: HotAddResult = self
            .client
            .task(
                Method::PUT,
                &format!("{SERVERS}/{}", self.proxy_server_id),
                Some(&json!({"disks": [disk]})),
            )
            .await?;
        let h = r
            .hotadd_disks
            .into_iter()
            .next()
            .ok_or_else(|| Error::new(ErrorKind::Platform, "hot-add answered no disk"))?;
        let held = Held::HotAdd {
            proxy: self.proxy_server_id.clone(),
            id: h.id.clone(),
        };
        match self.device(&h).await {
            Ok(path) => Ok(OpenedDisk {
                access: SnapshotAccess::FileHandle(FileAccess::new(path)),
                held,
            }),
            Err(e) => {
                if let Err(d) = close_held(&self.client, held).await {
                    tracing::warn!(error = %d.report(), "detaching a hot-added disk failed");
                }
                Err(e)
            }
        }
    }

    async fn close(&self, disk: OpenedDisk) -> Result<()> {
        close_held(&self.client, disk.held).await
    }
}

impl HotAdd {
    /// Where this proxy sees a hot-added disk.
    async fn device(&self, h: &api::HotAddDisk) -> Result<PathBuf> {
        let Some(root) = &self.device_root else {
            if h.local_path.is_empty() {
                return Err(Error::new(
                    ErrorKind::Platform,
                    format!(
                        "hot-added disk {} has no local_path: set hotadd_device_root \
                         to find it by serial",
                        h.id
                    ),
                ));
            }
            return Ok(PathBuf::from(&h.local_path));
        };
        let serial: String = if h.serial.is_empty() {
            h.id.replace('-', "").chars().take(20).collect()
        } else {
            h.serial.clone()
        };
        let path = root.join(format!("virtio-{serial}"));
        let deadline = tokio::time::Instant::now() + self.device_wait;
        loop {
            if tokio::fs::metadata(&path).await.is_ok() {
                return Ok(path);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "hot-added disk {} (serial {serial}) did not appear as {} within {:?}",
                        h.id,
                        path.display(),
                        self.device_wait
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The request body naming the disk, as the platform's export and hot-add
/// calls take it.
fn platform_body(target: &DiskTarget) -> Value {
    let mut body = match &target.snapshot_id {
        Some(s) => json!({"snapshot_id": s, "disk_id": target.disk_id,
            "open_base_image": u8::from(target.open_base_image)}),
        None => json!({"server_id": target.server_id, "disk_id": target.disk_id}),
    };
    if target.snapshot_id.is_none() && target.open_base_image {
        body["open_base_image"] = json!(1);
    }
    body
}

/// Detach hot-added disk `id` from `proxy` (gone already is fine).
pub(crate) async fn hot_remove(client: &ScpClient, proxy: &str, id: &str) -> Result<()> {
    match client
        .task::<Value>(
            Method::PUT,
            &format!("{SERVERS}/{proxy}"),
            Some(&json!({"disks": [{"action": "detach", "hotadd_id": id}]})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

async fn close_held(client: &ScpClient, held: Held) -> Result<()> {
    match held {
        Held::Export { lease, id } => {
            let path = format!("{RESOURCES}/{lease}/exports/{id}");
            match client.call::<Value>(Method::DELETE, &path, &[], None).await {
                Ok(_) => Ok(()),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::LeaseLost) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Held::HotAdd { proxy, id } => hot_remove(client, &proxy, &id).await,
        Held::Process(p) => {
            tokio::task::spawn_blocking(move || drop(p))
                .await
                .map_err(|e| Error::other(format!("reaping the helper command: {e}")))?;
            Ok(())
        }
    }
}

/// A site-configured command that serves the disk as NBD on a Unix socket
/// ([`ScpOptions::helper_command`]) — e.g. `nbdkit` with a plugin around
/// sfvddk's `sfdisklib_open`.
///
/// Each open starts the command (argv, never a shell) with placeholders
/// substituted in every argument:
///
/// | placeholder | value |
/// | --- | --- |
/// | `{socket}` | the Unix socket to serve on, in a fresh private (0700) temporary directory |
/// | `{server}` | the VM's server id |
/// | `{disk}` | the disk id |
/// | `{snapshot}` | the snapshot id (empty for a live disk) |
/// | `{base_image}` | `1` to open the base image (`SFDISKLIB_FLAG_OPEN_BASE_IMAGE`), else `0` |
/// | `{readonly}` | `1` for a read-only open, else `0` |
///
/// An argument starting with `{if_readonly}` is kept (without that
/// prefix) only for read-only opens, e.g. `{if_readonly}-r` for nbdkit's
/// `-r`. The provider waits (up to
/// [`HelperCommandOptions::start_timeout`]) until the socket accepts a
/// connection; a command that exits or does not listen in time fails the
/// open with the command and the tail of its standard error. `close` (and
/// dropping the [`OpenedDisk`]) kills and reaps the process and removes
/// the directory. The command should also exit with its parent
/// (`nbdkit --exit-with-parent`) in case this process dies.
#[derive(Debug)]
pub struct HelperCommand {
    options: HelperCommandOptions,
}

impl HelperCommand {
    /// A helper running `options.argv`.
    pub fn new(options: HelperCommandOptions) -> Result<Self> {
        if options.argv.is_empty() || options.argv[0].is_empty() {
            return Err(Error::invalid("helper_command.argv is empty"));
        }
        Ok(HelperCommand { options })
    }

    /// The argv for `target` with the socket at `socket`.
    pub fn argv(&self, target: &DiskTarget, socket: &str) -> Vec<String> {
        let readonly = target.mode == OpenMode::ReadOnly;
        self.options
            .argv
            .iter()
            .filter_map(|a| match a.strip_prefix("{if_readonly}") {
                Some(rest) if readonly => Some(rest.to_owned()),
                Some(_) => None,
                None => Some(a.clone()),
            })
            .map(|a| {
                a.replace("{socket}", socket)
                    .replace("{server}", &target.server_id)
                    .replace("{disk}", &target.disk_id)
                    .replace("{snapshot}", target.snapshot_id.as_deref().unwrap_or(""))
                    .replace(
                        "{base_image}",
                        if target.open_base_image { "1" } else { "0" },
                    )
                    .replace("{readonly}", if readonly { "1" } else { "0" })
            })
            .collect()
    }
}

#[async_trait]
impl DiskAccess for HelperCommand {
    fn name(&self) -> &'static str {
        "helper-command"
    }

    async fn open(&self, target: &DiskTarget) -> Result<OpenedDisk> {
        // tempfile creates the directory with mode 0700.
        let dir = tempfile::Builder::new()
            .prefix("scp-disk-")
            .tempdir()
            .map_err(|e| Error::other("creating the helper's socket directory").with_source(e))?;
        let socket = dir.path().join("nbd.sock");
        let argv = self.argv(target, &socket.to_string_lossy());
        let shown = argv.join(" ");
        let stderr_path = dir.path().join("stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| Error::other("creating the helper's stderr file").with_source(e))?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Platform,
                    format!("the disk helper command `{shown}` does not start: {e}"),
                )
            })?;
        tracing::debug!(command = %shown, pid = child.id(), "disk helper started");
        let mut process = HelperProcess {
            child: Some(child),
            stderr: stderr_path,
            command: shown,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + self.options.start_timeout;
        loop {
            if let Some(status) = process.try_wait() {
                return Err(Error::new(
                    ErrorKind::Platform,
                    format!(
                        "the disk helper command `{}` exited ({status}) before serving disk {}: {}",
                        process.command,
                        target.disk_id,
                        process.stderr_tail()
                    ),
                ));
            }
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let tail = process.stderr_tail();
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the disk helper command `{}` did not listen on {} within {:?}: {tail}",
                        process.command,
                        socket.display(),
                        self.options.start_timeout
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(OpenedDisk {
            access: SnapshotAccess::Nbd(NbdAccess::new(NbdAddress::Unix(socket), "")),
            held: Held::Process(process),
        })
    }

    async fn close(&self, disk: OpenedDisk) -> Result<()> {
        match disk.held {
            Held::Process(p) => {
                tokio::task::spawn_blocking(move || drop(p))
                    .await
                    .map_err(|e| Error::other(format!("reaping the helper command: {e}")))?;
                Ok(())
            }
            other => Err(Error::invalid(format!(
                "the helper command cannot close {other:?}"
            ))),
        }
    }
}

/// A running helper; killed and reaped on drop, its directory removed.
#[derive(Debug)]
struct HelperProcess {
    child: Option<Child>,
    stderr: PathBuf,
    command: String,
    _dir: tempfile::TempDir,
}

impl HelperProcess {
    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// The last lines of its standard error (or a note that there are none).
    fn stderr_tail(&self) -> String {
        const TAIL: u64 = 2048;
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            text = String::from_utf8_lossy(&buf).trim().to_owned();
        }
        if text.is_empty() {
            "no standard error output".into()
        } else {
            format!("standard error: {text}")
        }
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(mode: OpenMode) -> DiskTarget {
        DiskTarget {
            server_id: "srv".into(),
            disk_id: "dsk".into(),
            snapshot_id: Some("snap".into()),
            open_base_image: true,
            mode,
            lease: None,
        }
    }

    fn helper(argv: &[&str]) -> HelperCommand {
        HelperCommand::new(HelperCommandOptions {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            start_timeout: Duration::from_secs(2),
        })
        .unwrap()
    }

    #[test]
    fn placeholders_are_substituted_per_argument() {
        let h = helper(&[
            "nbdkit",
            "-U",
            "{socket}",
            "{if_readonly}-r",
            "p",
            "server={server}",
            "disk={disk}",
            "snap={snapshot}",
            "base_image={base_image}",
            "readonly={readonly}",
        ]);
        assert_eq!(
            h.argv(&target(OpenMode::ReadOnly), "/s/x.sock"),
            [
                "nbdkit",
                "-U",
                "/s/x.sock",
                "-r",
                "p",
                "server=srv",
                "disk=dsk",
                "snap=snap",
                "base_image=1",
                "readonly=1"
            ]
        );
        let rw = h.argv(&target(OpenMode::ReadWrite), "/s");
        assert!(!rw.contains(&"-r".to_owned()), "{rw:?}");
        assert!(rw.contains(&"readonly=0".to_owned()), "{rw:?}");
    }

    #[tokio::test]
    async fn a_command_that_exits_at_once_is_a_clear_error() {
        let h = helper(&["sh", "-c", "echo no such disk >&2; exit 3", "{socket}"]);
        let e = h.open(&target(OpenMode::ReadOnly)).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("no such disk"), "{text}");
    }

    #[tokio::test]
    async fn a_command_that_never_listens_times_out_and_is_killed() {
        let h = HelperCommand::new(HelperCommandOptions {
            argv: vec!["sleep".into(), "30".into()],
            start_timeout: Duration::from_millis(200),
        })
        .unwrap();
        let e = h.open(&target(OpenMode::ReadOnly)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("sleep 30"), "{e}");
    }
}
