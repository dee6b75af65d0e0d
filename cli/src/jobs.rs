//! This host's identity and job registry, and interruption by signals.
//!
//! Every backup and restore runs as a job of this host: it registers in
//! the host's [`JobRegistry`] (`<state_dir>/jobs`) and hands the provider a
//! [`JobInfo`] with the host id and the jobs running now, so that the
//! provider tags what it creates and sweeps what dead jobs left.
//!
//! - host id: `host_id` in the config file, else `VMBACKUP_HOST_ID`, else
//!   the machine's host name;
//! - state directory: `state_dir` in the config file, else
//!   `VMBACKUP_STATE_DIR`, else `$XDG_STATE_HOME/vmbackup`, else
//!   `~/.local/state/vmbackup`;
//! - job id: `<kind>-<unix seconds>-<pid>`.
//!
//! SIGINT or SIGTERM cancels the job: copies stop, the cleanups run, and
//! the command exits with 128 + the signal number. A second signal exits
//! at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};
use engine::{CancelToken, JobLease, JobRegistry, cancel_pair};
use provider_api::JobInfo;

use crate::config::Config;

/// A registered job of this host.
pub struct HostJob {
    /// What the provider gets in `job_init`.
    pub info: JobInfo,
    _lease: JobLease,
}

fn host_id(config: &Config) -> String {
    if let Some(id) = &config.host_id {
        return id.clone();
    }
    if let Ok(id) = std::env::var("VMBACKUP_HOST_ID")
        && !id.is_empty()
    {
        return id;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn state_dir(config: &Config) -> Result<PathBuf> {
    if let Some(d) = &config.state_dir {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("VMBACKUP_STATE_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return Ok(PathBuf::from(d).join("vmbackup"));
    }
    let home = std::env::var_os("HOME").context(
        "no state directory: set state_dir in the config file, VMBACKUP_STATE_DIR or HOME",
    )?;
    Ok(PathBuf::from(home).join(".local/state/vmbackup"))
}

/// Register a new job of kind `kind` (`backup`, `restore`) starting at
/// `start_time`.
pub fn register(config: &Config, kind: &str, start_time: i64) -> Result<HostJob> {
    let dir = state_dir(config)?.join("jobs");
    let registry = JobRegistry::open(&dir)
        .with_context(|| format!("opening the job registry {}", dir.display()))?;
    let job_id = format!("{kind}-{start_time}-{}", std::process::id());
    let lease = registry.register(&job_id)?;
    let running = registry.running()?;
    let info = JobInfo::new(job_id, start_time).on_host(host_id(config), running);
    Ok(HostJob {
        info,
        _lease: lease,
    })
}

/// Cancels the returned token on SIGINT or SIGTERM; a second signal exits
/// the process at once. [`Interrupt::exit_code`] tells which signal came.
pub struct Interrupt {
    signal: Arc<AtomicI32>,
}

impl Interrupt {
    /// Install the handlers.
    pub fn install() -> Result<(Interrupt, CancelToken)> {
        use tokio::signal::unix::{SignalKind, signal};
        let (canceller, token) = cancel_pair();
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let seen = Arc::new(AtomicI32::new(0));
        let flag = seen.clone();
        tokio::spawn(async move {
            loop {
                let signo = tokio::select! {
                    _ = int.recv() => 2,
                    _ = term.recv() => 15,
                };
                if flag.swap(signo, Ordering::SeqCst) != 0 {
                    eprintln!("second signal: exiting without cleanup");
                    std::process::exit(128 + signo);
                }
                eprintln!(
                    "interrupted: stopping and cleaning up on the platform (signal again to exit at once)"
                );
                canceller.cancel();
            }
        });
        Ok((Interrupt { signal: seen }, token))
    }

    /// `Some(128 + signal)` once a signal came.
    pub fn exit_code(&self) -> Option<u8> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some((128 + s) as u8),
        }
    }
}

/// Wait for SIGINT or SIGTERM: how a long-running command (`serve`,
/// `mock`) is asked to stop. Stopping that way is its normal end.
pub async fn wait_for_stop_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
