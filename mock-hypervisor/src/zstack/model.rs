//! Persisted ZStack objects (`<state-dir>/zstack.json`): backup storages,
//! the primary storage and its image cache, images, VMs, volumes and volume
//! snapshots. Disk content lives in the shared [`crate::disk::DiskStore`]:
//! an image's data is a sealed [`crate::disk::BaseImage`], a volume is a
//! [`crate::disk::VirtualDisk`] (a root volume is linked to the cached base
//! image of its `rootImageUuid`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A backup storage (ImageStore).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStorage {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// `Connected` or `Disconnected` (admin); images cannot be added to a
    /// disconnected one.
    pub status: String,
}

/// One backup storage holding an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BsRef {
    /// Backup storage UUID.
    pub backup_storage_uuid: String,
    /// Install path on it.
    pub install_path: String,
    /// Creation time (seconds).
    pub created: u64,
}

/// An image (template, ISO) on backup storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// `Enabled` / `Disabled`.
    pub state: String,
    /// `Creating`, `Downloading`, `Ready`, `Error`, `Deleted`.
    pub status: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes stored.
    pub actual_size: u64,
    /// `http://…`, `nbd://…`, `volume://<uuid>`, `volumeSnapshot://<uuid>`.
    pub url: String,
    /// `RootVolumeTemplate`, `DataVolumeTemplate`, `ISO`.
    pub media_type: String,
    /// Guest OS type.
    pub guest_os_type: String,
    /// `Linux`, `Windows`, `Paravirtualization`, `Other`.
    pub platform: String,
    /// System image.
    pub system: bool,
    /// `raw` or `qcow2`.
    pub format: String,
    /// md5 of the raw content (`not calculated` while unknown).
    pub md5_sum: String,
    /// Backup storages holding it.
    pub backup_storage_refs: Vec<BsRef>,
    /// References removed by a delete (given back by `recoverImage`).
    #[serde(default)]
    pub deleted_refs: Vec<BsRef>,
    /// Id of the data in the disk store (empty while downloading).
    pub data_id: String,
    /// Creation time (seconds).
    pub created: u64,
}

impl Image {
    /// The API inventory.
    pub fn inventory(&self) -> Value {
        let date = fmt_date(self.created);
        json!({
            "uuid": self.uuid,
            "name": self.name,
            "description": self.description,
            "state": self.state,
            "status": self.status,
            "size": self.size,
            "actualSize": self.actual_size,
            "url": self.url,
            "mediaType": self.media_type,
            "guestOsType": self.guest_os_type,
            "platform": self.platform,
            "architecture": "x86_64",
            "virtio": true,
            "system": self.system,
            "format": self.format,
            "md5Sum": self.md5_sum,
            "type": "zstack",
            "createDate": date,
            "lastOpDate": date,
            "backupStorageRefs": self.backup_storage_refs.iter().map(|r| json!({
                "imageUuid": self.uuid,
                "backupStorageUuid": r.backup_storage_uuid,
                "installPath": r.install_path,
                "status": "Ready",
                "createDate": fmt_date(r.created),
                "lastOpDate": fmt_date(r.created),
            })).collect::<Vec<_>>(),
        })
    }

    /// Whether the image was made from a volume or a volume snapshot (a
    /// template a backup creates and must delete).
    pub fn from_volume(&self) -> bool {
        self.url.starts_with("volume://") || self.url.starts_with("volumeSnapshot://")
    }
}

/// A volume (root or data disk).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// `Root` or `Data`.
    pub kind: String,
    /// VM it is attached to.
    pub vm_instance_uuid: Option<String>,
    /// Root volumes: the image in the primary storage image cache it is
    /// thin-cloned from.
    pub root_image_uuid: Option<String>,
    /// Device id in the VM (0 = root).
    pub device_id: u32,
    /// Size in bytes.
    pub size: u64,
    /// Disk id in the disk store.
    pub disk_id: String,
    /// Creation time.
    pub created: u64,
    /// Description.
    #[serde(default)]
    pub description: String,
}

impl Volume {
    /// The API inventory.
    pub fn inventory(&self, ps: &str) -> Value {
        json!({
            "uuid": self.uuid,
            "name": self.name,
            "description": self.description,
            "type": self.kind,
            "vmInstanceUuid": self.vm_instance_uuid,
            "rootImageUuid": self.root_image_uuid,
            "deviceId": self.device_id,
            "size": self.size,
            "actualSize": self.size,
            "format": "qcow2",
            "state": "Enabled",
            "status": "Ready",
            "primaryStorageUuid": ps,
            "installPath": format!("/zstack_ps/vol-{}/{}.qcow2", self.uuid, self.uuid),
            "createDate": fmt_date(self.created),
            "lastOpDate": fmt_date(self.created),
        })
    }
}

/// A VM instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Image the VM was created from.
    pub image_uuid: Option<String>,
    /// Root volume.
    pub root_volume_uuid: String,
    /// Platform of the image.
    pub platform: String,
    /// Creation time.
    pub created: u64,
    /// Description.
    #[serde(default)]
    pub description: String,
}

/// A volume snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// UUID (also the disk-model snapshot id).
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Volume.
    pub volume_uuid: String,
    /// Size of the volume.
    pub size: u64,
    /// Creation time.
    pub created: u64,
}

impl Snapshot {
    /// The API inventory.
    pub fn inventory(&self, volume_type: &str, ps: &str) -> Value {
        json!({
            "uuid": self.uuid,
            "name": self.name,
            "volumeUuid": self.volume_uuid,
            "volumeType": volume_type,
            "type": "Hypervisor",
            "format": "qcow2",
            "state": "Enabled",
            "status": "Ready",
            "size": self.size,
            "primaryStorageUuid": ps,
            "latest": true,
            "createDate": fmt_date(self.created),
            "lastOpDate": fmt_date(self.created),
        })
    }
}

/// An image exported from a backup storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Export {
    /// Image.
    pub image_uuid: String,
    /// Backup storage.
    pub backup_storage_uuid: String,
    /// Path part of the download URL.
    pub path: String,
    /// `raw` or `qcow2` (the mock serves raw either way).
    pub format: String,
}

/// The ZStack document.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ZsInventory {
    /// Backup storages.
    pub backup_storages: Vec<BackupStorage>,
    /// The primary storage's UUID.
    pub primary_storage_uuid: String,
    /// Image cache of the primary storage: image UUID → disk-store image id.
    pub image_cache: BTreeMap<String, String>,
    /// Images.
    pub images: BTreeMap<String, Image>,
    /// VMs.
    pub vms: BTreeMap<String, Vm>,
    /// Volumes.
    pub volumes: BTreeMap<String, Volume>,
    /// Volume snapshots.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Exports, by image UUID.
    pub exports: BTreeMap<String, Export>,
    /// Private-image quota (`image.num`).
    pub image_quota: u64,
}

impl ZsInventory {
    /// Images counted by the `image.num` quota: every non-system image not
    /// yet expunged (soft-deleted ones still count).
    pub fn private_images(&self) -> u64 {
        self.images.values().filter(|i| !i.system).count() as u64
    }

    /// VM inventory with its volumes.
    pub fn vm_inventory(&self, vm: &Vm) -> Value {
        let mut vols: Vec<&Volume> = self
            .volumes
            .values()
            .filter(|v| v.vm_instance_uuid.as_deref() == Some(&vm.uuid))
            .collect();
        vols.sort_by_key(|v| v.device_id);
        json!({
            "uuid": vm.uuid,
            "name": vm.name,
            "description": vm.description,
            "state": "Running",
            "type": "UserVm",
            "hypervisorType": "KVM",
            "imageUuid": vm.image_uuid,
            "rootVolumeUuid": vm.root_volume_uuid,
            "platform": vm.platform,
            "cpuNum": 2,
            "memorySize": 2147483648u64,
            "allVolumes": vols.iter().map(|v| v.inventory(&self.primary_storage_uuid)).collect::<Vec<_>>(),
            "createDate": fmt_date(vm.created),
            "lastOpDate": fmt_date(vm.created),
        })
    }
}

/// `Jun 1, 2015 6:17:48 PM`-style date (the mock prints seconds since the
/// epoch in that slot's place, which clients must treat as opaque text).
pub fn fmt_date(secs: u64) -> String {
    format!("{secs}")
}

/// A ZStack UUID: 32 lower-case hex digits.
pub fn zs_uuid() -> String {
    crate::ids::new_uuid().replace('-', "")
}
