//! SCP objects as persisted in `<state-dir>/scp.json` and as returned on the
//! wire (field names follow the SCP OpenAPI where the seed names them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A storage (datastore) of the platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Storage {
    /// Identifier.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// `system` or `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    /// Boot disk (the one a base image backs on linked VMs).
    System,
    /// Data disk.
    Data,
}

/// A disk of a server (`vmconf.hardware_option.disks[]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerDisk {
    /// Disk id (also the disk store id).
    pub id: String,
    /// Bus name (`ide0`, `scsi1`, ...).
    pub name: String,
    /// System or data disk.
    #[serde(rename = "type")]
    pub disk_type: DiskType,
    /// Size in bytes.
    pub size: u64,
    /// Storage holding it.
    pub storage_id: String,
    /// Base image of a linked disk.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base_image_id: Option<String>,
}

/// CBT state of a server.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub struct Cbt {
    /// 1 when enabled.
    pub enable: u8,
    /// True after a snapshot revert or a restore, until reset.
    pub expired: bool,
}

/// A virtual machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    /// Identifier.
    pub id: String,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// `running` or `stopped`.
    pub status: String,
    /// `"desk"` for desktop-cloud VMs, empty otherwise.
    pub application: String,
    /// 1 for desktop VMs in revert mode.
    pub revert_mode: u8,
    /// Storage of the system disk.
    pub storage_id: String,
    /// vCPUs (`cores` on the wire; `cpu` in older state files).
    #[serde(rename = "cores", alias = "cpu")]
    pub cpu: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Guest OS type.
    pub os_type: String,
    /// Disks, system disk first.
    pub disks: Vec<ServerDisk>,
    /// CBT state.
    pub cbt: Cbt,
    /// Creation time (Unix seconds).
    pub created_at: u64,
}

/// A VM snapshot (with the VM configuration frozen in `vmconf`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Identifier.
    pub id: String,
    /// Server it belongs to.
    pub server_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// `ok` once created.
    pub status: String,
    /// CBT checkpoint taken with the snapshot.
    pub checkpoint_id: u64,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    /// VM configuration at snapshot time.
    pub vmconf: serde_json::Value,
}

/// A base image replica on one storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replica {
    /// Storage.
    pub storage_id: String,
    /// `CREATING` or `AVAILABLE`.
    pub status: String,
}

/// A base image (public image under linked VMs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseImageRecord {
    /// Identifier (also the disk store image id).
    pub id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// `CREATING` until set `AVAILABLE`.
    pub status: String,
    /// Size in bytes.
    pub size: u64,
    /// Always `raw` in the mock.
    pub disk_format: String,
    /// Guest OS type.
    pub os_type: String,
    /// Storage it was created on.
    pub storage_id: String,
    /// Replicas (the home storage included).
    pub replicas: Vec<Replica>,
    /// Creation time (Unix seconds).
    pub created_at: u64,
}

/// A custom attribute definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomAttribute {
    /// Identifier.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Resource type it applies to (`base_image`, `server`).
    pub resource_type: String,
}

/// A custom attribute bound to a resource with a value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Binding {
    /// Identifier.
    pub id: String,
    /// Attribute.
    pub custom_attribute_id: String,
    /// `base_image` or `server`.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// Value.
    pub value: String,
}

/// What a hot-added disk shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HotAddSource {
    /// Server whose disk is added.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_id: Option<String>,
    /// Snapshot whose frozen disk is added (read-only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snapshot_id: Option<String>,
    /// Disk.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_id: Option<String>,
    /// Base image (when `open_base_image` is 1).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base_image_id: Option<String>,
    /// 1 when the base image disk was opened.
    pub open_base_image: u8,
}

/// A disk hot-added to a (backup proxy) server, materialised as a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HotAdd {
    /// Identifier.
    pub id: String,
    /// Server the disk was added to.
    pub proxy_server_id: String,
    /// Guest device name.
    pub device: String,
    /// Raw sparse file the proxy reads (and writes, in `rw` mode).
    pub local_path: String,
    /// Size in bytes.
    pub size: u64,
    /// `ro` or `rw`.
    pub mode: String,
    /// What it shows.
    pub source: HotAddSource,
    /// Disk serial the proxy's guest sees (`/dev/disk/by-id/virtio-<serial>`,
    /// at most 20 characters as virtio-blk reports it).
    #[serde(default)]
    pub serial: String,
}

/// Everything SCP persists.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ScpInventory {
    /// Last checkpoint id handed out.
    pub last_checkpoint: u64,
    /// Storages.
    pub storages: Vec<Storage>,
    /// Servers by id.
    pub servers: BTreeMap<String, Server>,
    /// Snapshots by id.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Base images by id.
    pub base_images: BTreeMap<String, BaseImageRecord>,
    /// Custom attributes by id.
    pub custom_attributes: BTreeMap<String, CustomAttribute>,
    /// Bindings by id.
    pub bindings: BTreeMap<String, Binding>,
    /// Hot-added disks by id.
    pub hotadds: BTreeMap<String, HotAdd>,
}

impl ScpInventory {
    /// A server by id.
    pub fn server(&self, id: &str) -> Result<&Server, super::ScpError> {
        self.servers
            .get(id)
            .ok_or_else(|| super::ScpError::not_found("server", id))
    }

    /// A snapshot of a server.
    pub fn snapshot(&self, server_id: &str, id: &str) -> Result<&Snapshot, super::ScpError> {
        self.snapshots
            .get(id)
            .filter(|s| s.server_id == server_id)
            .ok_or_else(|| super::ScpError::not_found("snapshot", id))
    }

    /// A base image by id.
    pub fn base_image(&self, id: &str) -> Result<&BaseImageRecord, super::ScpError> {
        self.base_images
            .get(id)
            .ok_or_else(|| super::ScpError::not_found("base image", id))
    }

    /// Whether a storage exists.
    pub fn has_storage(&self, id: &str) -> bool {
        self.storages.iter().any(|s| s.id == id)
    }
}

impl Server {
    /// The vmconf document of this server (as frozen in snapshots).
    pub fn vmconf(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "application": self.application,
            "revert_mode": self.revert_mode,
            "cpu": {"sockets": 1, "cores": self.cpu},
            "memory_mb": self.memory_mb,
            "os_type": self.os_type,
            "storage_id": self.storage_id,
            "hardware_option": {
                "disks": self.disks,
                "nics": [{"name": "net0", "model": "virtio", "mac": mac_of(&self.id)}],
            },
        })
    }

    /// The system disk.
    pub fn system_disk(&self) -> Option<&ServerDisk> {
        self.disks.iter().find(|d| d.disk_type == DiskType::System)
    }
}

fn mac_of(id: &str) -> String {
    let h = id
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!(
        "fe:fc:fe:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}
