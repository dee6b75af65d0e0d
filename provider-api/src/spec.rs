//! The platform-neutral guest specification.
//!
//! What a snapshot says about the machine, in terms every platform maps:
//! CPUs, memory, firmware, disks with their bus, NICs with model, MAC and
//! the network they were on. JSON (the fields below) of content type
//! [`CONTENT_TYPE`]: an imported appliance stores it as its guest
//! configuration; a platform backup stores it beside the platform's own
//! configuration ([`VmBackup::spec`](crate::VmBackup), kept as
//! [`ConfigKind::Spec`](crate::ConfigKind)). A restore onto another
//! platform reads it through [`ArchiveView::guest_spec`](crate::ArchiveView::guest_spec).

use serde::{Deserialize, Serialize};

/// Content type of a [`GuestSpec`] stored as a guest configuration.
pub const CONTENT_TYPE: &str = "application/vnd.vmbackup.guest-spec+json";

/// Firmware the guest boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (the default when nothing says otherwise).
    #[default]
    Bios,
    /// UEFI.
    Efi,
}

/// The bus a disk hangs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bus {
    /// IDE.
    Ide,
    /// SATA (AHCI).
    Sata,
    /// SCSI (any controller model: LSI Logic, BusLogic, PVSCSI, virtio-scsi).
    #[default]
    Scsi,
    /// virtio-blk.
    Virtio,
    /// NVMe.
    Nvme,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Device name in the snapshot (`disk0`, `disk1`, ...).
    pub device: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bus.
    pub bus: Bus,
    /// The controller model as the source named it (`lsilogic`,
    /// `VirtualSCSI`, `AHCI`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// Position in the boot order (0 first), if the source said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Adapter model as the source named it (`E1000`, `VmxNet3`,
    /// `virtio`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// MAC address, if the source had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The network it was connected to on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// A guest, platform-neutral.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSpec {
    /// Name.
    pub name: String,
    /// Operating system as the source described it (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks in device order.
    pub disks: Vec<DiskSpec>,
    /// Network interfaces in order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

impl GuestSpec {
    /// As a guest configuration blob.
    pub fn to_config(&self) -> crate::ConfigBlob {
        crate::ConfigBlob {
            content_type: CONTENT_TYPE.to_owned(),
            data: serde_json::to_vec_pretty(self).unwrap_or_default(),
        }
    }

    /// From a guest configuration blob of [`CONTENT_TYPE`]; `None` for
    /// other content types.
    pub fn from_config(blob: &crate::ConfigBlob) -> Option<serde_json::Result<Self>> {
        (blob.content_type == CONTENT_TYPE).then(|| serde_json::from_slice(&blob.data))
    }
}
