//! Leases: locks between hosts that share only a [`Backend`].
//!
//! A lease is an object (say `.locks/gc.lease`) holding a [`LeaseInfo`]
//! (who holds it, what for, for how long). Its rules:
//!
//! - **Taking** a free lease is `put_new` of the object: of two hosts, one
//!   creates it and the other finds it taken.
//! - **Expiry** is judged by the store alone: a lease is expired when the
//!   store's clock ([`Backend::now`]) is past the object's `modified`
//!   time plus its `ttl`. Hosts' own clocks never enter it.
//! - **Taking over** an expired lease (its holder crashed or lost the
//!   store) is `put_if_version` against the version read: of several
//!   hosts that saw it expired, exactly one replaces it.
//! - **Renewing** (before `ttl` runs out; [`Lease::renew`]) is also
//!   `put_if_version` against the holder's own last version, so a holder
//!   whose lease was taken over learns it at its next renewal
//!   ([`ErrorKind::LeaseLost`]) and must stop: what it protected is no
//!   longer protected.
//! - **Releasing** deletes the object after checking it is still ours.
//!   (A check and a delete are two requests; a holder releases while its
//!   lease is fresh, long before anyone may take it over.)
//!
//! What a holder must do to be safe: renew well within `ttl` (every
//! `ttl / 3`, say), and treat a failed renewal as the loss of the lock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use provider_api::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

use super::Backend;
use crate::util::unique_suffix;

/// The content of a lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// Unique per acquisition.
    pub owner: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// What it is held for (`backup`, `gc`, …).
    pub purpose: String,
    /// Seconds the lease lasts after its last write.
    pub ttl_secs: u64,
    /// When it was first taken, store time (Unix seconds); written from
    /// the first renewal on (before it, the object's own time is that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<i64>,
}

impl LeaseInfo {
    /// When the lease was first taken, given its object's metadata.
    pub fn started_at(&self, meta: &super::ObjectMeta) -> SystemTime {
        match self.started {
            Some(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64),
            None => meta.modified,
        }
    }

    /// Whether the lease is live at store time `now`, given its object's
    /// metadata.
    pub fn live_at(&self, meta: &super::ObjectMeta, now: SystemTime) -> bool {
        now < meta.modified + Duration::from_secs(self.ttl_secs)
    }
}

/// A held lease (see the module docs). Dropping it does not release it:
/// call [`Lease::release`] (a lease left behind expires).
#[derive(Debug)]
pub struct Lease {
    backend: Arc<dyn Backend>,
    key: String,
    info: LeaseInfo,
    version: String,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into())
}

fn encode(info: &LeaseInfo) -> Result<Bytes> {
    serde_json::to_vec(info)
        .map(Bytes::from)
        .map_err(|e| Error::other("serializing a lease").with_source(e))
}

impl Lease {
    /// Take the lease at `key` for `ttl`, or take over an expired one;
    /// refused (kind `Refused`, naming the holder and when it expires) when
    /// another holder's lease is live.
    pub fn acquire(
        backend: Arc<dyn Backend>,
        key: &str,
        purpose: &str,
        ttl: Duration,
    ) -> Result<Lease> {
        let info = LeaseInfo {
            owner: unique_suffix(),
            host: host_name(),
            pid: std::process::id(),
            purpose: purpose.to_owned(),
            ttl_secs: ttl.as_secs().max(1),
            started: None,
        };
        let data = encode(&info)?;
        // A few rounds: the object may vanish or change between reads.
        for _ in 0..8 {
            if let Some(version) = backend.put_new(key, data.clone())? {
                return Lease::taken(backend, key, info, version);
            }
            let Some((bytes, meta)) = backend.get(key, 64 << 10)? else {
                continue;
            };
            let held: Option<LeaseInfo> = serde_json::from_slice(&bytes).ok();
            let ttl_held = Duration::from_secs(held.as_ref().map_or(0, |h| h.ttl_secs));
            let expires = meta.modified + ttl_held;
            let now = backend.now()?;
            if now < expires {
                let left = expires.duration_since(now).unwrap_or_default().as_secs();
                let who = match &held {
                    Some(h) => format!("{} (pid {}) for {}", h.host, h.pid, h.purpose),
                    None => "an unreadable lease".into(),
                };
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!(
                        "lease {}/{key} is held by {who}; it expires in {left} s unless renewed",
                        backend.location()
                    ),
                ));
            }
            if let Some(version) = backend.put_if_version(key, data.clone(), &meta.version)? {
                tracing::warn!(
                    "took over the expired lease {}/{key} (held by {:?})",
                    backend.location(),
                    held
                );
                return Lease::taken(backend, key, info, version);
            }
        }
        Err(Error::new(
            ErrorKind::Refused,
            format!("lease {}/{key} keeps changing hands", backend.location()),
        ))
    }

    /// A lease just written: its start is the object's time.
    fn taken(
        backend: Arc<dyn Backend>,
        key: &str,
        mut info: LeaseInfo,
        version: String,
    ) -> Result<Lease> {
        if let Some(m) = backend.head(key)?
            && m.version == version
        {
            let secs = m
                .modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            info.started = Some(secs);
        }
        Ok(Lease {
            backend,
            key: key.to_owned(),
            info,
            version,
        })
    }

    /// Who holds it.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// When it was first taken, by the store's clock (whole seconds).
    pub fn started(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.info.started.unwrap_or(0).max(0) as u64)
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Extend the lease by its ttl from now (store time); `LeaseLost` when
    /// it was taken over (after expiring) or removed.
    pub fn renew(&mut self) -> Result<()> {
        match self
            .backend
            .put_if_version(&self.key, encode(&self.info)?, &self.version)?
        {
            Some(v) => {
                self.version = v;
                Ok(())
            }
            None => Err(Error::new(
                ErrorKind::LeaseLost,
                format!(
                    "lease {}/{} was lost (it expired and was taken over, or was removed)",
                    self.backend.location(),
                    self.key
                ),
            )),
        }
    }

    /// When the lease expires unless renewed, by the store's clock.
    pub fn expires(&self) -> Result<Option<SystemTime>> {
        Ok(self
            .backend
            .head(&self.key)?
            .filter(|m| m.version == self.version)
            .map(|m| m.modified + Duration::from_secs(self.info.ttl_secs)))
    }

    /// Give the lease up (only if it is still ours).
    pub fn release(self) -> Result<()> {
        match self.backend.head(&self.key)? {
            Some(m) if m.version == self.version => self.backend.delete(&self.key),
            _ => Ok(()),
        }
    }
}

/// A [`Lease`] renewed by a background thread every third of its ttl, and
/// released when dropped. [`KeptLease::check`] says whether it is still
/// held (a renewal that failed means it may have been taken over).
#[derive(Debug)]
pub struct KeptLease {
    state: Arc<std::sync::Mutex<KeptState>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    key: String,
    started: SystemTime,
}

#[derive(Debug)]
struct KeptState {
    lease: Option<Lease>,
    lost: Option<String>,
}

impl KeptLease {
    /// Take the lease (see [`Lease::acquire`]) and keep it.
    pub fn acquire(
        backend: Arc<dyn Backend>,
        key: &str,
        purpose: &str,
        ttl: Duration,
    ) -> Result<KeptLease> {
        let lease = Lease::acquire(backend, key, purpose, ttl)?;
        let started = lease.started();
        let state = Arc::new(std::sync::Mutex::new(KeptState {
            lease: Some(lease),
            lost: None,
        }));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let st = state.clone();
        let every = (ttl / 3).max(Duration::from_millis(300));
        let thread = std::thread::Builder::new()
            .name("vmbackup-lease".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                    if g.lost.is_some() {
                        continue;
                    }
                    if let Some(l) = g.lease.as_mut()
                        && let Err(e) = l.renew()
                    {
                        tracing::warn!("{}", e.report());
                        g.lost = Some(e.to_string());
                    }
                }
            })
            .map_err(|e| {
                Error::new(ErrorKind::Io, "starting a lease renewal thread").with_source(e)
            })?;
        Ok(KeptLease {
            state,
            stop: Some(tx),
            thread: Some(thread),
            key: key.to_owned(),
            started,
        })
    }

    /// When it was first taken, by the store's clock.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `LeaseLost` once a renewal failed.
    pub fn check(&self) -> Result<()> {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &g.lost {
            None => Ok(()),
            Some(why) => Err(Error::new(ErrorKind::LeaseLost, why.clone())),
        }
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let lease = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lease
            .take();
        if let Some(l) = lease
            && let Err(e) = l.release()
        {
            tracing::warn!("releasing lease {}: {}", self.key, e.report());
        }
    }
}
