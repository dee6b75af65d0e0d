//! Domain types shared by providers, targets and hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A guest's id on its platform (VM UUID, SCP server id, ...).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GuestId(pub String);

impl fmt::Display for GuestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for GuestId {
    fn from(s: &str) -> Self {
        GuestId(s.to_owned())
    }
}

/// Whether a guest is a virtual machine or a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// A virtual machine: backed up volume by volume.
    Vm,
    /// A container: backed up as a directory tree.
    Container,
}

/// A guest to back up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    /// Platform id.
    pub id: GuestId,
    /// VM or container.
    pub kind: GuestKind,
    /// Human name, if the platform has one.
    pub name: Option<String>,
}

impl Guest {
    /// A VM with this id.
    pub fn vm(id: impl Into<String>) -> Self {
        Guest {
            id: GuestId(id.into()),
            kind: GuestKind::Vm,
            name: None,
        }
    }

    /// A container with this id.
    pub fn container(id: impl Into<String>) -> Self {
        Guest {
            id: GuestId(id.into()),
            kind: GuestKind::Container,
            name: None,
        }
    }
}

/// The name under which one guest's backup is stored
/// (Proxmox: `backup_init`'s archive name).
///
/// Only `[a-zA-Z0-9-.+=_/:]` and non-empty; no `..` component and no
/// leading `/`, so that it is safe as a relative path in any target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ArchiveName(String);

impl ArchiveName {
    /// Validate and wrap.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::invalid("archive name is empty"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-.+=_/:".contains(*c)))
        {
            return Err(Error::invalid(format!(
                "archive name {name:?} contains {c:?}: only [a-zA-Z0-9-.+=_/:] are allowed"
            )));
        }
        if name.starts_with('/') || name.split('/').any(|p| p == ".." || p == ".") {
            return Err(Error::invalid(format!(
                "archive name {name:?} must be relative without . or .. components"
            )));
        }
        Ok(ArchiveName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ArchiveName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        ArchiveName::new(s)
    }
}

impl From<ArchiveName> for String {
    fn from(a: ArchiveName) -> String {
        a.0
    }
}

impl fmt::Display for ArchiveName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Image format of a volume on its platform.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum VolumeFormat {
    /// Raw.
    Raw,
    /// qcow2.
    Qcow2,
    /// Anything else the platform names.
    Other(String),
}

/// A guest's volume (disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Device name, unique in the guest (`sys`, `scsi0`, the platform's disk id).
    pub device: String,
    /// Size in bytes as the guest sees it.
    pub size: u64,
    /// Format on the platform (restores recreate it).
    pub format: VolumeFormat,
}

/// A byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
}

impl Extent {
    /// `offset..offset+length`.
    pub fn new(offset: u64, length: u64) -> Self {
        Extent { offset, length }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A provider's opaque change-tracking position (SCP checkpoint id, oVirt
/// checkpoint, qemu bitmap name), stored with each volume of a snapshot and
/// handed back at the next incremental.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Checkpoint(pub String);

/// A platform's id of a shared base image (SCP `base_image_id`, ZStack
/// `rootImageUuid`). It changes whenever the image's data changes, so one
/// id names one content for the whole backup system.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BaseImageId(pub String);

impl fmt::Display for BaseImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Proxmox's bitmap mode for incremental VM backup, per volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitmapMode {
    /// Start (or restart) change tracking: this backup reads the volume in
    /// full and records a new checkpoint.
    New,
    /// Use the tracking since the previous checkpoint: only dirty regions are
    /// read (falls back to a full when the provider finds it invalid).
    Use,
    /// No change tracking: read in full, record nothing.
    None,
}

/// A configuration blob with its media type (Proxmox's guest config, oVirt
/// OVF, SCP vmconf JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigBlob {
    /// Media type, e.g. `application/json`, `application/ovf+xml`.
    pub content_type: String,
    /// The bytes as the platform gave them.
    pub data: Vec<u8>,
}

impl ConfigBlob {
    /// JSON blob.
    pub fn json(value: &serde_json::Value) -> Self {
        ConfigBlob {
            content_type: "application/json".into(),
            data: serde_json::to_vec_pretty(value).unwrap_or_default(),
        }
    }
}

/// Opaque platform metadata a provider needs back at restore (SCP base
/// image metadata, custom attributes and bindings; ZStack image inventory).
/// Stored by the target as JSON and never interpreted by the host.
pub type PlatformMetadata = serde_json::Value;

/// What the host tells the provider about the job in `job_init`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobInfo {
    /// Job id (for logs and platform-side naming of temporary objects);
    /// `[A-Za-z0-9-]+`, unique among the jobs of one host.
    pub job_id: String,
    /// Start time, seconds since the epoch.
    pub start_time: i64,
    /// Free-form options from the host's configuration.
    pub options: BTreeMap<String, String>,
    /// The backup host running the job (`[A-Za-z0-9-]+`, stable across
    /// runs of one host, distinct between hosts sharing a platform).
    pub host_id: String,
    /// Jobs of this host that are running now, this one included. A
    /// provider's `job_init` may sweep platform objects whose
    /// [`JobMarker`] names this host and a job that is not in this set:
    /// an earlier job that crashed or was killed before its cleanups.
    pub running_jobs: BTreeSet<String>,
}

impl JobInfo {
    /// A job of the host `localhost` that believes it runs alone. Ids are
    /// made safe for markers: characters outside `[A-Za-z0-9-]` become `-`.
    pub fn new(job_id: impl Into<String>, start_time: i64) -> Self {
        let job_id = marker_safe(&job_id.into());
        JobInfo {
            running_jobs: BTreeSet::from([job_id.clone()]),
            job_id,
            start_time,
            options: BTreeMap::new(),
            host_id: "localhost".into(),
        }
    }

    /// Set the host and the jobs of that host running now (this job is
    /// added to them).
    pub fn on_host(
        mut self,
        host_id: impl Into<String>,
        running_jobs: impl IntoIterator<Item = String>,
    ) -> Self {
        self.host_id = marker_safe(&host_id.into());
        self.running_jobs = running_jobs.into_iter().collect();
        self.running_jobs.insert(self.job_id.clone());
        self
    }

    /// Set the free-form options.
    pub fn with_options(mut self, options: BTreeMap<String, String>) -> Self {
        self.options = options;
        self
    }

    /// The marker every platform object this job creates carries.
    pub fn marker(&self) -> JobMarker {
        JobMarker {
            host: self.host_id.clone(),
            job: self.job_id.clone(),
        }
    }
}

/// Makes `text` a marker id: characters outside `[A-Za-z0-9-]` become `-`;
/// empty becomes `-`.
pub fn marker_safe(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() { "-".into() } else { s }
}

/// The tag a provider puts on every platform object it creates for a job
/// (in a name, description or tag, wherever the platform has room), so
/// that a later job can find objects an interrupted job left behind.
///
/// Text form: `vmbackup.<host>.<job>` where host and job are
/// `[A-Za-z0-9-]+`; inside a longer text it ends at the first character
/// outside that set (so `…job-1` never matches `…job-10`: compare the
/// parsed marker, never a prefix).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobMarker {
    /// The host's id.
    pub host: String,
    /// The job's id.
    pub job: String,
}

impl JobMarker {
    /// Text every marker starts with.
    pub const PREFIX: &'static str = "vmbackup.";

    /// The first marker inside `text`, if any.
    pub fn find_in(text: &str) -> Option<JobMarker> {
        let is_id = |c: char| c.is_ascii_alphanumeric() || c == '-';
        let mut rest = text;
        while let Some(at) = rest.find(Self::PREFIX) {
            // A marker starts at the beginning or after a non-id character.
            let starts_clean = rest[..at].chars().next_back().is_none_or(|c| !is_id(c));
            let tail = &rest[at + Self::PREFIX.len()..];
            let host_len = tail.find(|c: char| !is_id(c)).unwrap_or(tail.len());
            let after_host = &tail[host_len..];
            if starts_clean && host_len > 0 && after_host.starts_with('.') {
                let job_tail = &after_host[1..];
                let job_len = job_tail.find(|c: char| !is_id(c)).unwrap_or(job_tail.len());
                if job_len > 0 {
                    return Some(JobMarker {
                        host: tail[..host_len].to_owned(),
                        job: job_tail[..job_len].to_owned(),
                    });
                }
            }
            rest = &rest[at + Self::PREFIX.len()..];
        }
        None
    }

    /// True when this marker names `job`'s host and a job of that host
    /// that is not running: what it tags was left behind and may be swept.
    pub fn is_stale_for(&self, job: &JobInfo) -> bool {
        self.host == job.host_id && !job.running_jobs.contains(&self.job)
    }
}

impl fmt::Display for JobMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}.{}", Self::PREFIX, self.host, self.job)
    }
}

/// What a provider reports in `backup_cleanup`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackupStats {
    /// Archive size the provider knows of (0 when the host counts).
    pub archive_size: u64,
    /// Extra key/values for the job log.
    pub extra: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_match_exactly() {
        let job = JobInfo::new("job-1", 0).on_host("host_a", ["job-2".to_owned()]);
        assert_eq!(job.host_id, "host-a");
        let m = job.marker();
        assert_eq!(m.to_string(), "vmbackup.host-a.job-1");
        let text = format!("snapshot for vm 7 ({m}) archive vm/7/1");
        assert_eq!(JobMarker::find_in(&text), Some(m.clone()));
        // `job-1` never matches `job-10`.
        let ten = JobMarker::find_in("x vmbackup.host-a.job-10 y").unwrap();
        assert_eq!(ten.job, "job-10");
        assert_ne!(ten, m);
        assert_eq!(JobMarker::find_in("novmbackup.host-a.job-1"), None);
        assert_eq!(JobMarker::find_in("vmbackup.host-a"), None);
        assert_eq!(
            JobMarker::find_in("vmbackup.x.vmbackup.h.j").unwrap().host,
            "x"
        );
        // Stale: same host, not running.
        let other = JobMarker {
            host: "host-a".into(),
            job: "job-0".into(),
        };
        assert!(other.is_stale_for(&job));
        assert!(!m.is_stale_for(&job), "a running job is never stale");
        let running = JobMarker {
            host: "host-a".into(),
            job: "job-2".into(),
        };
        assert!(!running.is_stale_for(&job));
        let foreign = JobMarker {
            host: "host-b".into(),
            job: "job-0".into(),
        };
        assert!(
            !foreign.is_stale_for(&job),
            "another host's objects are never swept"
        );
    }

    #[test]
    fn archive_names_are_validated() {
        for ok in ["vm/100/2026-11-22T00:00:00Z", "a", "x-y.z+w=v_u:t"] {
            ArchiveName::new(ok).unwrap();
        }
        for bad in ["", "a b", "ä", "/abs", "a/../b", "a\nb", "./a"] {
            assert!(ArchiveName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
