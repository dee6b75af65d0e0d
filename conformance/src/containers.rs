//! The container checks ([`Check::Containers`]): what a provider that
//! claims containers must do, driven by the reference host (the engine's
//! drivers) against a real datastore in a temporary directory.
//!
//! The vendor writes a [`ContainerDriver`] (the platform's admin side: a
//! container with an empty root file system the kit fills as the
//! container would, the root file system of a restored container, and
//! leftovers). The kit then checks:
//!
//! 1. `capabilities().containers` is claimed, `backup_get_mechanism` of a
//!    container is `directory`, `restore_get_mechanism(Container)` is
//!    `directory` or `tar`;
//! 2. a full backup of a tree (files of several sizes, empty files,
//!    directories, symlinks, modes, times), then an incremental after a
//!    change, an addition and a removal; each snapshot restored to a new
//!    container and compared entry by entry with the tree at its backup
//!    (content, type, mode, mtime, link target);
//! 3. a restore under a name that is taken is refused, and nothing is
//!    left on the platform after any of it.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use engine::{BackupDriver, JobOptions, RestoreDriver, StandardMover};
use provider_api::{
    BackupMechanism, BackupProvider, Guest, GuestKind, JobInfo, RestoreMechanism, RestoreTarget,
    Result, SnapshotId, Target,
};

use crate::report::{Check, Failure};

/// The platform's admin side for containers.
#[async_trait]
pub trait ContainerDriver: Send + Sync {
    /// A new container named `name` with an empty root file system, and
    /// where that file system is on this host (the kit writes into it as
    /// the container would).
    async fn create_container(&self, name: &str) -> Result<(Guest, PathBuf)>;
    /// Where a restored container's root file system is on this host.
    async fn restored_root(&self, guest: &Guest) -> Result<PathBuf>;
    /// Remove a container (created or restored).
    async fn remove_container(&self, guest: &Guest) -> Result<()>;
    /// Objects a backup or restore may leave behind, one line each.
    async fn leftovers(&self) -> Result<Vec<String>>;
}

/// Runs [`Check::Containers`] on a provider.
pub struct ContainerKit {
    provider: Arc<dyn BackupProvider>,
    driver: Arc<dyn ContainerDriver>,
}

type Entries = BTreeMap<String, (char, u32, (i64, i64), Vec<u8>)>;

fn fail(message: impl Into<String>) -> Failure {
    Failure::new(Check::Containers, message)
}

/// Every entry below `root` (the root's own times excluded: restoring
/// into it changes them on some platforms).
fn entries(root: &Path) -> std::result::Result<Entries, Failure> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let m = std::fs::symlink_metadata(&full)
            .map_err(|e| fail(format!("reading {}: {e}", full.display())))?;
        let (kind, body) = if m.is_dir() {
            let rd = std::fs::read_dir(&full)
                .map_err(|e| fail(format!("listing {}: {e}", full.display())))?;
            for e in rd {
                let e = e.map_err(|e| fail(format!("listing {}: {e}", full.display())))?;
                stack.push(rel.join(e.file_name()));
            }
            ('d', Vec::new())
        } else if m.file_type().is_symlink() {
            let t = std::fs::read_link(&full)
                .map_err(|e| fail(format!("reading link {}: {e}", full.display())))?;
            ('l', t.into_os_string().into_encoded_bytes())
        } else {
            let c = std::fs::read(&full)
                .map_err(|e| fail(format!("reading {}: {e}", full.display())))?;
            ('-', c)
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let mode = if kind == 'l' { 0 } else { m.mode() & 0o7777 };
        let mtime = if kind == 'd' {
            (0, 0)
        } else {
            (m.mtime(), m.mtime_nsec())
        };
        out.insert(
            rel.to_string_lossy().into_owned(),
            (kind, mode, mtime, body),
        );
    }
    Ok(out)
}

fn compare(want: &Entries, got: &Entries, what: &str) -> std::result::Result<(), Failure> {
    for (k, v) in want {
        match got.get(k) {
            None => return Err(fail(format!("{what}: {k} is missing"))),
            Some(g) if g != v => {
                let field = if g.0 != v.0 {
                    "type"
                } else if g.1 != v.1 {
                    "mode"
                } else if g.2 != v.2 {
                    "mtime"
                } else {
                    "content or link target"
                };
                return Err(fail(format!("{what}: {k} differs in {field}")));
            }
            _ => {}
        }
    }
    if let Some(k) = got.keys().find(|k| !want.contains_key(*k)) {
        return Err(fail(format!("{what}: {k} should not be there")));
    }
    Ok(())
}

fn io(e: std::io::Error, what: &str) -> Failure {
    fail(format!("{what}: {e}"))
}

/// The first tree: a bit of everything a root file system has.
fn fill(root: &Path) -> std::result::Result<(), Failure> {
    let w = |p: &str, data: &[u8]| -> std::result::Result<(), Failure> {
        let path = root.join(p);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| io(e, p))?;
        }
        std::fs::write(&path, data).map_err(|e| io(e, p))
    };
    w("etc/hostname", b"conformance\n")?;
    w("etc/empty", b"")?;
    w("usr/lib/blob.bin", &crate::content::pattern(1, 0, 5 << 20))?;
    for i in 0..200 {
        w(
            &format!("var/lib/many/{i:03}"),
            format!("entry {i}\n").as_bytes(),
        )?;
    }
    std::fs::create_dir_all(root.join("tmp/empty-dir")).map_err(|e| io(e, "tmp/empty-dir"))?;
    std::os::unix::fs::symlink("../etc/hostname", root.join("usr/hostname-link"))
        .map_err(|e| io(e, "symlink"))?;
    std::fs::set_permissions(
        root.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o600),
    )
    .map_err(|e| io(e, "chmod"))?;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| io(e, "chmod"))?;
    Ok(())
}

impl ContainerKit {
    /// The kit for `provider` on the platform `driver` administers.
    pub fn new(provider: Arc<dyn BackupProvider>, driver: Arc<dyn ContainerDriver>) -> Self {
        ContainerKit { provider, driver }
    }

    /// Run every container check; the notes say what was exercised.
    pub async fn run(&self) -> std::result::Result<Vec<String>, Failure> {
        let p = &*self.provider;
        if !p.capabilities().containers {
            return Err(fail("capabilities().containers is false: nothing to check"));
        }
        let mut notes = Vec::new();
        let work = tempfile::tempdir().map_err(|e| io(e, "temporary directory"))?;
        let ds = datastore::Datastore::create(work.path().join("ds"), Default::default())
            .map_err(|e| fail(format!("creating the datastore: {}", e.report())))?;
        let target: Arc<dyn Target> = Arc::new(ds);
        let (guest, root) = self
            .driver
            .create_container("conformance-ct")
            .await
            .map_err(|e| fail(format!("create_container: {}", e.report())))?;
        let result = self
            .exercise(&guest, &root, &target, work.path(), &mut notes)
            .await;
        let removed = self.driver.remove_container(&guest).await;
        result?;
        removed.map_err(|e| fail(format!("remove_container: {}", e.report())))?;
        let left = self
            .driver
            .leftovers()
            .await
            .map_err(|e| fail(format!("leftovers: {}", e.report())))?;
        if !left.is_empty() {
            return Err(fail(format!("left on the platform: {}", left.join("; "))));
        }
        Ok(notes)
    }

    async fn exercise(
        &self,
        guest: &Guest,
        root: &Path,
        target: &Arc<dyn Target>,
        work: &Path,
        notes: &mut Vec<String>,
    ) -> std::result::Result<(), Failure> {
        let p = &*self.provider;
        if guest.kind != GuestKind::Container {
            return Err(fail(
                "create_container returned a guest that is not a container",
            ));
        }
        let m = p
            .backup_get_mechanism(guest)
            .await
            .map_err(|e| fail(format!("backup_get_mechanism: {}", e.report())))?;
        if m != BackupMechanism::Directory {
            return Err(fail(format!(
                "backup_get_mechanism of a container is {m:?}, not directory"
            )));
        }
        let rm = p
            .restore_get_mechanism(GuestKind::Container)
            .await
            .map_err(|e| fail(format!("restore_get_mechanism: {}", e.report())))?;
        if !matches!(rm, RestoreMechanism::Directory | RestoreMechanism::Tar) {
            return Err(fail(format!("restore_get_mechanism(Container) is {rm:?}")));
        }
        notes.push(format!("restore mechanism {rm:?}"));

        fill(root)?;
        let first = entries(root)?;
        let s1 = self.backup(guest, target, work, 1_000).await?;
        // The container changes: one file rewritten, one added, one removed.
        std::fs::write(root.join("etc/hostname"), b"changed\n").map_err(|e| io(e, "write"))?;
        std::fs::write(root.join("var/lib/many/new"), b"new").map_err(|e| io(e, "write"))?;
        std::fs::remove_file(root.join("var/lib/many/007")).map_err(|e| io(e, "remove"))?;
        let second = entries(root)?;
        let s2 = self.backup(guest, target, work, 2_000).await?;
        let mut restored = Vec::new();
        for (i, (snap, want)) in [(&s1, &first), (&s2, &second)].into_iter().enumerate() {
            let name = format!("conformance-restored-{i}");
            let r = self.restore(snap, target, &name, want).await;
            if let Ok(g) = &r {
                restored.push(g.clone());
            } else {
                for g in &restored {
                    let _ = self.driver.remove_container(g).await;
                }
            }
            r?;
        }
        // A taken name is refused, and the refusal leaves nothing.
        let driver = self.restore_driver(target).await?;
        let taken = driver
            .restore_container(
                &s2,
                RestoreTarget::NewGuest {
                    name: Some("conformance-restored-0".into()),
                },
                engine::CancelToken::never(),
            )
            .await;
        if let Ok(r) = &taken {
            restored.push(r.guest.clone());
        }
        for g in &restored {
            self.driver
                .remove_container(g)
                .await
                .map_err(|e| fail(format!("remove_container: {}", e.report())))?;
        }
        if taken.is_ok() {
            return Err(fail("a restore under a name already taken succeeded"));
        }
        notes.push("full and incremental restored and compared; taken name refused".into());
        Ok(())
    }

    async fn backup(
        &self,
        guest: &Guest,
        target: &Arc<dyn Target>,
        work: &Path,
        time: i64,
    ) -> std::result::Result<SnapshotId, Failure> {
        let driver = BackupDriver::new(
            self.provider.clone(),
            target.clone(),
            Arc::new(StandardMover::default()),
        );
        let options = JobOptions {
            info: JobInfo::new(format!("conformance-ct-{time}"), time),
            parallelism: 1,
            log_dir: work.join("logs"),
        };
        let report = driver.run_job(&options, vec![guest.clone()]).await;
        let outcome = report
            .guests
            .into_iter()
            .next()
            .ok_or_else(|| fail("the job reported no guest"))?;
        match outcome.result {
            Ok(b) => Ok(b.snapshot.id),
            Err(e) => {
                Err(fail(format!("container backup failed: {}", e.report())).guest(&guest.id))
            }
        }
    }

    async fn restore_driver(
        &self,
        target: &Arc<dyn Target>,
    ) -> std::result::Result<RestoreDriver, Failure> {
        let exposer = engine::NbdExposer::start(
            "127.0.0.1:0"
                .parse()
                .map_err(|_| fail("loopback address"))?,
        )
        .await
        .map_err(|e| fail(format!("NBD exposer: {}", e.report())))?;
        Ok(RestoreDriver::new(
            self.provider.clone(),
            target.clone(),
            Arc::new(StandardMover::default()),
            Arc::new(exposer),
        ))
    }

    async fn restore(
        &self,
        snap: &SnapshotId,
        target: &Arc<dyn Target>,
        name: &str,
        want: &Entries,
    ) -> std::result::Result<Guest, Failure> {
        let driver = self.restore_driver(target).await?;
        let r = driver
            .restore_container(
                snap,
                RestoreTarget::NewGuest {
                    name: Some(name.into()),
                },
                engine::CancelToken::never(),
            )
            .await
            .map_err(|e| fail(format!("restore of {snap}: {}", e.report())))?;
        let root = self
            .driver
            .restored_root(&r.guest)
            .await
            .map_err(|e| fail(format!("restored_root: {}", e.report())))?;
        let got = entries(&root)?;
        compare(want, &got, &format!("snapshot {snap} restored"))?;
        Ok(r.guest)
    }
}
