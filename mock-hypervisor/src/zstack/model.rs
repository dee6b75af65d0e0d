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
    /// `Ready`, or `Deleted` (the root volume of a destroyed VM, as
    /// ZStack's default `Delay` deletion policy leaves it until the VM is
    /// expunged), `Migrating`, ... Snapshots need `Ready`.
    #[serde(default = "ready")]
    pub status: String,
}

fn ready() -> String {
    "Ready".into()
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
            "status": self.status,
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
    /// Instance offering it was created with (none: `cpuNum` and
    /// `memorySize` were given instead).
    #[serde(default)]
    pub instance_offering_uuid: Option<String>,
    /// CPUs.
    #[serde(default = "default_cpu_num")]
    pub cpu_num: u32,
    /// Memory in bytes.
    #[serde(default = "default_memory_size")]
    pub memory_size: u64,
    /// One NIC per L3 network, in order (the first is the default).
    #[serde(default)]
    pub l3_network_uuids: Vec<String>,
    /// `Running`, or `Destroyed` (DestroyVmInstance: still listed, still
    /// holding its volumes, until ExpungeVmInstance).
    #[serde(default = "default_vm_state")]
    pub state: String,
}

fn default_cpu_num() -> u32 {
    2
}
fn default_memory_size() -> u64 {
    2 << 30
}
fn default_vm_state() -> String {
    "Running".into()
}

/// An instance offering (CPU and memory of a VM).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceOffering {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// CPUs.
    pub cpu_num: u32,
    /// Memory in bytes.
    pub memory_size: u64,
}

impl InstanceOffering {
    /// The API inventory.
    pub fn inventory(&self) -> Value {
        json!({
            "uuid": self.uuid,
            "name": self.name,
            "cpuNum": self.cpu_num,
            "cpuSpeed": 0,
            "memorySize": self.memory_size,
            "type": "UserVm",
            "allocatorStrategy": "LeastVmPreferredHostAllocatorStrategy",
            "state": "Enabled",
        })
    }
}

/// An L3 network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct L3Network {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
}

impl L3Network {
    /// The API inventory.
    pub fn inventory(&self) -> Value {
        json!({
            "uuid": self.uuid,
            "name": self.name,
            "type": "L3BasicNetwork",
            "state": "Enabled",
            "system": false,
            "category": "Private",
        })
    }
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
    /// Instance offerings.
    #[serde(default)]
    pub instance_offerings: BTreeMap<String, InstanceOffering>,
    /// L3 networks.
    #[serde(default)]
    pub l3_networks: BTreeMap<String, L3Network>,
    /// Volume snapshot groups.
    #[serde(default)]
    pub snapshot_groups: BTreeMap<String, SnapshotGroup>,
    /// Calls made: `CreateVolumeSnapshot` and `CreateVolumeSnapshotGroup`
    /// (tests tell which way a backup snapshotted).
    #[serde(default)]
    pub snapshot_creates: u64,
    /// See `snapshot_creates`.
    #[serde(default)]
    pub snapshot_group_creates: u64,
    /// Calls made: `DeleteVolumeSnapshotGroup` that deleted a group.
    #[serde(default)]
    pub snapshot_group_deletes: u64,
}

/// A volume snapshot group: one snapshot of every volume of a VM, taken at
/// the same instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotGroup {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// The VM.
    pub vm_instance_uuid: String,
    /// Member snapshots (`VolumeSnapshotGroupRefVO`), one per volume.
    #[serde(default)]
    pub refs: Vec<GroupRef>,
}

/// A member of a volume snapshot group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRef {
    /// The snapshot.
    pub snapshot_uuid: String,
    /// Its name.
    pub snapshot_name: String,
    /// Its volume.
    pub volume_uuid: String,
    /// `Root` or `Data`.
    pub volume_type: String,
    /// The volume's device id.
    pub device_id: u32,
    /// The snapshot was deleted on its own (`snapshotDeleted`): ZStack
    /// keeps the member, marked, while the group lives.
    #[serde(default)]
    pub deleted: bool,
}

impl ZsInventory {
    /// Images counted by the `image.num` quota: every non-system image not
    /// yet expunged (soft-deleted ones still count).
    pub fn private_images(&self) -> u64 {
        self.images.values().filter(|i| !i.system).count() as u64
    }

    /// Adds a default instance offering and L3 network when there are
    /// none (what the admin-created and demo VMs use).
    pub fn ensure_defaults(&mut self) {
        if self.instance_offerings.is_empty() {
            let uuid = zs_uuid();
            self.instance_offerings.insert(
                uuid.clone(),
                InstanceOffering {
                    uuid,
                    name: "small-2c2g".into(),
                    cpu_num: default_cpu_num(),
                    memory_size: default_memory_size(),
                },
            );
        }
        if self.l3_networks.is_empty() {
            let uuid = zs_uuid();
            self.l3_networks.insert(
                uuid.clone(),
                L3Network {
                    uuid,
                    name: "l3-default".into(),
                },
            );
        }
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
            "state": vm.state,
            "type": "UserVm",
            "hypervisorType": "KVM",
            "imageUuid": vm.image_uuid,
            "rootVolumeUuid": vm.root_volume_uuid,
            "platform": vm.platform,
            "instanceOfferingUuid": vm.instance_offering_uuid,
            "cpuNum": vm.cpu_num,
            "memorySize": vm.memory_size,
            "defaultL3NetworkUuid": vm.l3_network_uuids.first(),
            "vmNics": vm.l3_network_uuids.iter().enumerate().map(|(i, l3)| json!({
                "uuid": format!("{}{i:02x}", vm.uuid.get(..30).unwrap_or(&vm.uuid)),
                "vmInstanceUuid": vm.uuid,
                "l3NetworkUuid": l3,
                "deviceId": i,
                "mac": format!("fa:16:3e:00:00:{:02x}", i),
            })).collect::<Vec<_>>(),
            "allVolumes": vols.iter().map(|v| v.inventory(&self.primary_storage_uuid)).collect::<Vec<_>>(),
            "createDate": fmt_date(vm.created),
            "lastOpDate": fmt_date(vm.created),
        })
    }
}

/// A date as ZStack's inventories print it: `Jun 1, 2015 6:17:48 PM`
/// (Java's `MMM d, yyyy h:mm:ss a`; UTC here).
pub fn fmt_date(secs: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let (h12, ampm) = match h {
        0 => (12, "AM"),
        1..=11 => (h, "AM"),
        12 => (12, "PM"),
        _ => (h - 12, "PM"),
    };
    format!(
        "{} {day}, {year} {h12}:{m:02}:{s:02} {ampm}",
        MONTHS[(month - 1) as usize]
    )
}

/// A ZStack UUID: 32 lower-case hex digits.
pub fn zs_uuid() -> String {
    crate::ids::new_uuid().replace('-', "")
}

#[cfg(test)]
mod tests {
    use super::fmt_date;

    #[test]
    fn dates_print_like_zstack() {
        assert_eq!(fmt_date(0), "Jan 1, 1970 12:00:00 AM");
        // 2017-06-07 21:20:31 UTC
        assert_eq!(fmt_date(1_496_870_431), "Jun 7, 2017 9:20:31 PM");
        // 2024-02-29 12:05:09 UTC
        assert_eq!(fmt_date(1_709_208_309), "Feb 29, 2024 12:05:09 PM");
    }
}
