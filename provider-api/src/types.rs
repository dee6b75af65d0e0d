//! Domain types shared by providers, targets and hosts.

use std::collections::BTreeMap;
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
pub struct JobInfo {
    /// Job id (for logs and platform-side naming of temporary objects).
    pub job_id: String,
    /// Start time, seconds since the epoch.
    pub start_time: i64,
    /// Free-form options from the host's configuration.
    pub options: BTreeMap<String, String>,
}

/// What a provider reports in `backup_cleanup`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    fn archive_names_are_validated() {
        for ok in ["vm/100/2026-11-22T00:00:00Z", "a", "x-y.z+w=v_u:t"] {
            ArchiveName::new(ok).unwrap();
        }
        for bad in ["", "a b", "ä", "/abs", "a/../b", "a\nb", "./a"] {
            assert!(ArchiveName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
