//! What the provider stores with each snapshot (`PlatformMetadata`) and
//! reads back at restore.

use serde::{Deserialize, Serialize};

use crate::api::{BaseImage, Binding, CustomAttribute, Disk};
use crate::rules::BasePolicy;

/// Format tag of [`SnapshotMetadata`].
pub const FORMAT: &str = "scp-linked-vm/1";

/// The snapshot's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMetadata {
    /// [`FORMAT`].
    pub format: String,
    /// Platform version at backup.
    pub platform_version: String,
    /// The VM.
    pub server: ServerMeta,
    /// Platform snapshot id and checkpoint.
    pub snapshot_id: String,
    /// Checkpoint of that snapshot.
    pub checkpoint_id: u64,
    /// Disks in platform order (system disk first).
    pub disks: Vec<DiskMeta>,
    /// The base image of the linked system disk, when backed up separately.
    pub base_image: Option<BaseImageMeta>,
}

/// VM properties restored with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerMeta {
    /// Server id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `desk` for desktop VMs.
    pub application: String,
    /// Revert mode.
    pub revert_mode: i64,
    /// Storage.
    pub storage_id: String,
    /// vCPUs (as the platform gave it).
    pub cpu: serde_json::Value,
    /// Memory.
    pub memory_mb: serde_json::Value,
    /// OS type.
    pub os_type: String,
}

/// One disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    /// Device name in the snapshot.
    pub device: String,
    /// The platform disk.
    pub disk: Disk,
    /// How its base image was handled.
    pub policy: BasePolicy,
}

/// A base image with its custom attributes and bindings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseImageMeta {
    /// The object as `GET /janus/20180725/base-images` gave it.
    pub image: BaseImage,
    /// Attributes bound to it.
    pub custom_attributes: Vec<CustomAttribute>,
    /// Its bindings.
    pub bindings: Vec<Binding>,
}

impl SnapshotMetadata {
    /// The linked system disk backed up with a separate base image.
    pub fn separate_linked_disk(&self) -> Option<&DiskMeta> {
        self.disks
            .iter()
            .find(|d| matches!(d.policy, BasePolicy::Separate { .. }))
    }

    /// Whether the VM is linked (whatever the policy was).
    pub fn is_linked(&self) -> bool {
        self.disks.iter().any(|d| d.disk.base_image_id.is_some())
    }
}
