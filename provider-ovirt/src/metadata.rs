//! The metadata stored with every backup: [`OvirtMetadata`], one
//! [`DiskRecord`] per disk.

use provider_api::{Volume, VolumeFormat};
use serde::{Deserialize, Serialize};

use crate::options::BackupMode;

/// One disk as the metadata records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Device name in the archive.
    pub device: String,
    /// Disk id.
    pub disk_id: String,
    /// Alias.
    pub alias: String,
    /// Size in bytes.
    pub provisioned_size: u64,
    /// `raw` or `cow`.
    pub format: String,
    /// Thin provisioning.
    pub sparse: bool,
    /// `none` or `incremental`.
    pub backup: String,
    /// Attachment interface.
    pub interface: String,
    /// Bootable.
    pub bootable: bool,
    /// Storage domain: its id as the engine gives it (`<storage_domain
    /// id="…" href="…"/>`), or its name when only that was given.
    pub storage_domain: Option<String>,
}

impl DiskRecord {
    pub(crate) fn incremental(&self) -> bool {
        self.format == "cow" && self.backup == "incremental"
    }

    pub(crate) fn volume_format(&self) -> VolumeFormat {
        if self.format == "cow" {
            VolumeFormat::Qcow2
        } else {
            VolumeFormat::Raw
        }
    }

    pub(crate) fn volume(&self) -> Volume {
        Volume {
            device: self.device.clone(),
            size: self.provisioned_size,
            format: self.volume_format(),
        }
    }
}

/// Metadata stored with every backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvirtMetadata {
    /// Original VM id.
    pub vm_id: String,
    /// Original VM name.
    pub vm_name: String,
    /// Mode used.
    pub mode: BackupMode,
    /// Disks.
    pub disks: Vec<DiskRecord>,
}
