//! The jobs of one backup host: which are running, so that a provider's
//! `job_init` can sweep what an earlier, dead job left on the platform.
//!
//! One directory per host holds a lock file per job
//! (`<dir>/<job_id>.lock`). A running job holds an exclusive `flock` on its
//! file for its whole life; the kernel releases it when the process ends,
//! however it ends (kill -9 included). A job is running exactly when its
//! file is locked, so [`JobRegistry::running`] needs no clean shutdown and
//! no clock. Files of dead jobs are removed when found.
//!
//! Locking: the registry directory is per host (never share it between
//! hosts: flock is local). Registering takes the job's lock with
//! `try_lock` (a second job with the same id on the same host is refused);
//! listing probes each file with a non-blocking shared lock.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use provider_api::{Error, ErrorKind, Result, marker_safe};

/// The job registry of one host.
#[derive(Debug, Clone)]
pub struct JobRegistry {
    dir: PathBuf,
}

/// A registered, running job; the registration ends when it is dropped.
#[derive(Debug)]
pub struct JobLease {
    path: PathBuf,
    _file: File,
}

impl Drop for JobLease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io(what: String, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, what).with_source(e)
}

impl JobRegistry {
    /// The registry in `dir` (created, mode 0700, if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(JobRegistry { dir })
    }

    /// The registry's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Register `job_id` (made marker-safe) as running until the lease is
    /// dropped or the process ends.
    pub fn register(&self, job_id: &str) -> Result<JobLease> {
        let path = self.dir.join(format!("{}.lock", marker_safe(job_id)));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(format!("creating {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => Ok(JobLease { path, _file: file }),
            Err(TryLockError::WouldBlock) => Err(Error::new(
                ErrorKind::Refused,
                format!("job {job_id} is already running on this host"),
            )),
            Err(TryLockError::Error(e)) => Err(io(format!("locking {}", path.display()), e)),
        }
    }

    /// Ids of the jobs running now on this host.
    pub fn running(&self) -> Result<BTreeSet<String>> {
        let mut running = BTreeSet::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| io(format!("listing {}", self.dir.display()), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".lock"))
                .map(str::to_owned)
            else {
                continue;
            };
            let Ok(file) = File::open(&path) else {
                continue; // removed meanwhile: that job ended
            };
            match file.try_lock_shared() {
                Ok(()) => {
                    // Nobody holds it: the job is gone. Remove its file
                    // while we hold the lock (a new job with this id would
                    // create a new file).
                    let _ = std::fs::remove_file(&path);
                }
                Err(TryLockError::WouldBlock) => {
                    running.insert(id);
                }
                Err(TryLockError::Error(_)) => {
                    // Cannot tell: count it as running (never sweep a
                    // job that may be alive).
                    running.insert(id);
                }
            }
        }
        Ok(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_jobs_run_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = JobRegistry::open(dir.path().join("jobs")).unwrap();
        let a = reg.register("backup-1").unwrap();
        let _b = reg.register("backup.2").unwrap();
        assert_eq!(
            reg.running().unwrap(),
            BTreeSet::from(["backup-1".to_owned(), "backup-2".to_owned()])
        );
        let e = reg.register("backup-1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        drop(a);
        assert_eq!(
            reg.running().unwrap(),
            BTreeSet::from(["backup-2".to_owned()])
        );
    }

    #[test]
    fn a_dead_job_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let reg = JobRegistry::open(dir.path()).unwrap();
        // What a killed process leaves: the file, without its lock.
        std::fs::write(dir.path().join("old-job.lock"), b"").unwrap();
        assert!(reg.running().unwrap().is_empty());
        assert!(!dir.path().join("old-job.lock").exists());
    }
}
