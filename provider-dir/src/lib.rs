//! # provider-dir: directory trees and container root file systems
//!
//! A provider whose guests are containers given as directory trees (a
//! container's root file system, or any tree to protect). It offers the
//! `directory` backup mechanism: the host walks the tree it returns from
//! `backup_container` into a file archive. Restores go to a new directory
//! under a restore root, through either mechanism:
//!
//! - `directory`: the provider creates the (empty) destination directory
//!   and the host writes the tree into it;
//! - `tar`: the host writes a tar stream to a file the provider names; on
//!   success the provider extracts it with GNU `tar` (`--xattrs --acls`,
//!   numeric owners), the way Proxmox hands container archives to `tar`.
//!
//! A failed restore leaves nothing behind: the destination and the tar
//! file are removed in `restore_container_cleanup`. VMs are not this
//! provider's: their calls answer `Unsupported`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use provider_api::{
    ArchiveName, BackupMechanism, BackupProvider, BackupStats, BackupVmRequest, Capabilities,
    ConfigBlob, ContainerBackup, ContainerProvider, ContainerRestore, Error, ErrorKind, Guest,
    GuestKind, IdMap, IncrementalPlan, JobInfo, Outcome, PreviousBackup, RestoreContainerRequest,
    RestoreMechanism, RestoreTarget, RestoreVmRequest, RestoreVolumeRequest, Result, VmBackup,
    VolumeImport,
};

/// The provider's name (groups its snapshots in a datastore).
pub const PROVIDER_NAME: &str = "dir";

/// A restore under way: what to remove on failure, what to extract.
#[derive(Debug)]
struct Pending {
    destination: PathBuf,
    tar: Option<PathBuf>,
}

/// Directory trees as container guests.
#[derive(Debug)]
pub struct DirProvider {
    trees: BTreeMap<String, PathBuf>,
    id_map: Option<IdMap>,
    restore_root: PathBuf,
    mechanism: RestoreMechanism,
    pending: Mutex<HashMap<String, Pending>>,
}

impl DirProvider {
    /// Guests `id → tree`; restores go to new directories under
    /// `restore_root`, through the `directory` mechanism.
    pub fn new(
        trees: impl IntoIterator<Item = (String, PathBuf)>,
        restore_root: PathBuf,
    ) -> DirProvider {
        DirProvider {
            trees: trees.into_iter().collect(),
            id_map: None,
            restore_root,
            mechanism: RestoreMechanism::Directory,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Restore through a tar stream instead (`tar` mechanism).
    pub fn with_tar_restore(mut self) -> DirProvider {
        self.mechanism = RestoreMechanism::Tar;
        self
    }

    /// Unprivileged containers: map owner ids (`host_base..+count` on the
    /// host are `0..count` in the archive).
    pub fn with_id_map(mut self, id_map: IdMap) -> DirProvider {
        self.id_map = Some(id_map);
        self
    }

    fn tree(&self, guest: &Guest) -> Result<&PathBuf> {
        if guest.kind != GuestKind::Container {
            return Err(vm_unsupported());
        }
        self.trees.get(&guest.id.0).ok_or_else(|| {
            Error::not_found(format!(
                "no directory tree is configured for guest {}",
                guest.id
            ))
            .guest(&guest.id)
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn vm_unsupported() -> Error {
    Error::unsupported("VMs in the directory provider (it backs up directory trees as containers)")
}

fn io(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::new(ErrorKind::Io, format!("{what} {}: {e}", path.display())).with_source(e)
}

/// A guest id as an archive name component.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.+=_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[async_trait]
impl BackupProvider for DirProvider {
    fn provider_name(&self) -> &str {
        PROVIDER_NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none().containers(true).incremental(true)
    }

    fn containers(&self) -> Option<&dyn ContainerProvider> {
        Some(self)
    }

    async fn job_init(&self, _job: &JobInfo) -> Result<()> {
        Ok(())
    }

    async fn job_cleanup(&self) -> Result<()> {
        Ok(())
    }

    async fn backup_init(&self, guest: &Guest, _start_time: i64) -> Result<ArchiveName> {
        self.tree(guest)?;
        ArchiveName::new(format!("ct/{}", sanitize(&guest.id.0)))
    }

    async fn backup_get_mechanism(&self, guest: &Guest) -> Result<BackupMechanism> {
        self.tree(guest)?;
        Ok(BackupMechanism::Directory)
    }

    async fn backup_vm_query_incremental(
        &self,
        _guest: &Guest,
        _previous: Option<&PreviousBackup>,
    ) -> Result<IncrementalPlan> {
        Err(vm_unsupported())
    }

    async fn backup_vm(&self, _guest: &Guest, _request: BackupVmRequest) -> Result<VmBackup> {
        Err(vm_unsupported())
    }

    async fn backup_cleanup(&self, _guest: &Guest, _outcome: &Outcome) -> Result<BackupStats> {
        Ok(BackupStats::default())
    }

    async fn restore_get_mechanism(&self, kind: GuestKind) -> Result<RestoreMechanism> {
        match kind {
            GuestKind::Container => Ok(self.mechanism),
            GuestKind::Vm => Err(vm_unsupported()),
        }
    }

    async fn restore_vm_init(&self, _request: &RestoreVmRequest) -> Result<Guest> {
        Err(vm_unsupported())
    }

    async fn restore_vm_volume_init(
        &self,
        _request: &RestoreVolumeRequest,
    ) -> Result<VolumeImport> {
        Err(vm_unsupported())
    }

    async fn restore_vm_volume_cleanup(
        &self,
        _guest: &Guest,
        _device: &str,
        _outcome: &Outcome,
    ) -> Result<()> {
        Err(vm_unsupported())
    }

    async fn restore_vm_cleanup(&self, _guest: &Guest, _outcome: &Outcome) -> Result<()> {
        Err(vm_unsupported())
    }
}

#[async_trait]
impl ContainerProvider for DirProvider {
    /// The tree must be a directory this process can list.
    async fn backup_container_prepare(&self, guest: &Guest) -> Result<()> {
        let tree = self.tree(guest)?.clone();
        let meta = tokio::fs::metadata(&tree)
            .await
            .map_err(|e| io(e, "the tree of guest", &tree).guest(&guest.id))?;
        if !meta.is_dir() {
            return Err(Error::invalid(format!(
                "the tree of guest {} ({}) is not a directory",
                guest.id,
                tree.display()
            )));
        }
        let mut list = tokio::fs::read_dir(&tree)
            .await
            .map_err(|e| io(e, "listing the tree", &tree).guest(&guest.id))?;
        list.next_entry()
            .await
            .map_err(|e| io(e, "listing the tree", &tree).guest(&guest.id))?;
        Ok(())
    }

    async fn backup_container(&self, guest: &Guest) -> Result<ContainerBackup> {
        let tree = self.tree(guest)?.clone();
        let config = serde_json::json!({
            "kind": "directory",
            "path": tree.to_string_lossy(),
            "id_map": self.id_map.map(|m| [m.host_base, m.count]),
        });
        let mut ct = ContainerBackup::new(ConfigBlob::json(&config), tree);
        if let Some(m) = self.id_map {
            ct = ct.with_id_map(m);
        }
        Ok(ct)
    }

    /// A new, empty directory `<restore root>/<name>` (default
    /// `<guest>-restored`); refused when something is already there.
    async fn restore_container_init(
        &self,
        request: &RestoreContainerRequest,
    ) -> Result<ContainerRestore> {
        let name = match &request.target {
            RestoreTarget::NewGuest { name } => name
                .clone()
                .unwrap_or_else(|| format!("{}-restored", request.archive.snapshot.guest)),
            _ => {
                return Err(Error::unsupported(
                    "restoring a directory tree in place: restore to a new directory",
                ));
            }
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::invalid(format!(
                "restore name {name:?} is not a plain directory name"
            )));
        }
        tokio::fs::create_dir_all(&self.restore_root)
            .await
            .map_err(|e| io(e, "creating the restore root", &self.restore_root))?;
        let destination = self.restore_root.join(&name);
        let guest = Guest::container(name.clone());
        // Created here, so never someone else's directory.
        tokio::fs::create_dir(&destination).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    ErrorKind::Refused,
                    format!(
                        "{} already exists: restore under another name",
                        destination.display()
                    ),
                )
            } else {
                io(e, "creating", &destination)
            }
        })?;
        let (handed, tar) = match request.mechanism {
            RestoreMechanism::Tar => {
                let t = self.restore_root.join(format!(".{name}.restore.tar"));
                (t.clone(), Some(t))
            }
            _ => (destination.clone(), None),
        };
        self.pending().insert(name, Pending { destination, tar });
        let mut r = ContainerRestore::new(guest, handed);
        if let Some(m) = self.id_map {
            r = r.with_id_map(m);
        }
        Ok(r)
    }

    /// Success: extract the tar (tar mechanism). Failure: remove what
    /// this restore created.
    async fn restore_container_cleanup(&self, guest: &Guest, outcome: &Outcome) -> Result<()> {
        let Some(p) = self.pending().remove(&guest.id.0) else {
            return Ok(()); // init failed before creating anything
        };
        let mut result = Ok(());
        if *outcome == Outcome::Success
            && let Some(tar) = &p.tar
        {
            let mut cmd = tokio::process::Command::new("tar");
            cmd.args([
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--numeric-owner",
                "-xpf",
            ])
            .arg(tar)
            .arg("-C")
            .arg(&p.destination);
            result = match cmd.output().await {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(Error::new(
                    ErrorKind::Platform,
                    format!(
                        "tar -x of {} into {} failed: {}",
                        tar.display(),
                        p.destination.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                )),
                Err(e) => Err(io(e, "running tar for", tar)),
            };
        }
        if let Some(tar) = &p.tar {
            let _ = tokio::fs::remove_file(tar).await;
        }
        if (*outcome != Outcome::Success || result.is_err())
            && let Err(e) = tokio::fs::remove_dir_all(&p.destination).await
        {
            tracing::warn!("removing {}: {e}", p.destination.display());
        }
        result
    }
}
