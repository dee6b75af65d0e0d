//! Persisted oVirt objects (`<state-dir>/ovirt.json`). Disk content lives
//! in the shared [`crate::disk::DiskStore`] under the same ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A virtual machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    /// UUID.
    pub id: String,
    /// Name (unique).
    pub name: String,
    /// `up` or `down`.
    pub status: String,
    /// Memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpu_cores: u32,
    /// Cluster name.
    pub cluster: String,
    /// A backup appliance: disks attached to it appear as local files.
    #[serde(default)]
    pub appliance: bool,
    /// OVF given at creation (restore from OVF); served verbatim.
    #[serde(default)]
    pub ovf: Option<String>,
    /// Creation time (seconds since the epoch).
    pub creation_time: u64,
    /// Network interfaces (from an imported OVF's network items).
    #[serde(default)]
    pub nics: Vec<Nic>,
}

/// A VM's network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// UUID.
    pub id: String,
    /// Name (`nic1`).
    pub name: String,
    /// `virtio`, `e1000`, `rtl8139`.
    pub interface: String,
    /// MAC address.
    pub mac: String,
    /// The vNIC profile (`None`: not connected to any network).
    pub vnic_profile: Option<String>,
}

/// A disk (its data: the store's virtual disk with the same id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    /// UUID.
    pub id: String,
    /// Alias (name).
    pub alias: String,
    /// Image (volume) id of the active layer.
    pub image_id: String,
    /// Virtual size in bytes.
    pub provisioned_size: u64,
    /// `raw` or `cow` (anything else is kept, to test clients).
    pub format: String,
    /// Thin provisioning.
    pub sparse: bool,
    /// `none` or `incremental` (only `cow` disks may be incremental).
    pub backup: String,
    /// Storage domain name.
    pub storage_domain: String,
    /// `ok` or `locked`.
    pub status: String,
}

/// A disk attached to a VM. The id is the disk id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    /// Disk id (also the attachment id).
    pub disk_id: String,
    /// VM it is attached to.
    pub vm_id: String,
    /// A disk snapshot attached for backup (backup API seed).
    pub snapshot_id: Option<String>,
    /// Bootable.
    pub bootable: bool,
    /// `virtio`, `virtio_scsi`, `ide`, `sata`.
    pub interface: String,
    /// Plugged.
    pub active: bool,
    /// Read-only.
    pub read_only: bool,
    /// For disks attached to an appliance: the file the appliance sees
    /// (reported as `logical_name`).
    pub local_path: Option<String>,
    /// For disks attached to an appliance: the device the guest sees
    /// (`/dev/vdX`), reported as `logical_name` with `guest_agent_names`.
    #[serde(default)]
    pub device: Option<String>,
    /// Attachment order (lists show attachments in this order).
    #[serde(default)]
    pub seq: u64,
}

/// A VM snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// UUID.
    pub id: String,
    /// VM.
    pub vm_id: String,
    /// Description.
    pub description: String,
    /// `locked` then `ok`.
    pub status: String,
    /// Status polls left before `ok` (`u32::MAX`: stuck).
    pub polls_left: u32,
    /// Disks frozen (store snapshot name: [`store_snapshot_name`]).
    pub disk_ids: Vec<String>,
    /// Image id of each frozen disk.
    pub image_ids: BTreeMap<String, String>,
    /// OVF of the VM at snapshot time.
    pub ovf: String,
    /// Creation time.
    pub date: u64,
}

/// Name of the disk-model snapshot behind an oVirt snapshot.
pub fn store_snapshot_name(snapshot_id: &str) -> String {
    format!("ovirt-{snapshot_id}")
}

/// Name of the disk-model snapshot behind a backup.
pub fn backup_snapshot_name(backup_id: &str) -> String {
    format!("ovirt-backup-{backup_id}")
}

/// A VM checkpoint (incremental backup).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// UUID.
    pub id: String,
    /// VM.
    pub vm_id: String,
    /// Previous checkpoint of the VM.
    pub parent_id: Option<String>,
    /// `created` or `invalid`.
    pub state: String,
    /// Disk-model checkpoint number per disk.
    pub disks: BTreeMap<String, u64>,
    /// Creation time.
    pub creation_date: u64,
}

/// A VM backup (oVirt 4.4+).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backup {
    /// UUID.
    pub id: String,
    /// VM.
    pub vm_id: String,
    /// Description.
    pub description: String,
    /// `initializing`, `starting`, `ready`, `finalizing`, `succeeded`, `failed`.
    pub phase: String,
    /// Polls left in the current transitional phase.
    pub polls_left: u32,
    /// Incremental base.
    pub from_checkpoint_id: Option<String>,
    /// Checkpoint this backup creates.
    pub to_checkpoint_id: String,
    /// Disks in the backup.
    pub disk_ids: Vec<String>,
    /// Creation time.
    pub creation_date: u64,
}

/// An image transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    /// UUID (also the ticket).
    pub id: String,
    /// Disk.
    pub disk_id: String,
    /// Backup it reads (download of a backup).
    pub backup_id: Option<String>,
    /// `download` or `upload`.
    pub direction: String,
    /// `raw`.
    pub format: String,
    /// `initializing`, `transferring`, `finalizing_success`,
    /// `finished_success`, `cancelled`, `finished_failure`.
    pub phase: String,
    /// Polls left before `transferring`.
    pub polls_left: u32,
    /// NBD export serving the same data (mock extension).
    pub export_name: String,
    /// Bytes moved through the image server (ranged GET/PUT).
    #[serde(default)]
    pub bytes_transferred: u64,
}

/// The whole oVirt inventory.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OvirtInventory {
    /// VMs by id.
    pub vms: BTreeMap<String, Vm>,
    /// Disks by id.
    pub disks: BTreeMap<String, Disk>,
    /// Attachments, keyed `(vm_id, disk_id)` as `"vm/disk"`.
    pub attachments: BTreeMap<String, Attachment>,
    /// Snapshots by id.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Checkpoints by id.
    pub checkpoints: BTreeMap<String, Checkpoint>,
    /// Backups by id.
    pub backups: BTreeMap<String, Backup>,
    /// Transfers by id.
    pub transfers: BTreeMap<String, Transfer>,
}

/// Key of an attachment.
pub fn attachment_key(vm_id: &str, disk_id: &str) -> String {
    format!("{vm_id}/{disk_id}")
}

impl OvirtInventory {
    /// Attachments of one VM, in attachment order.
    pub fn attachments_of(&self, vm_id: &str) -> Vec<&Attachment> {
        let mut list: Vec<&Attachment> = self
            .attachments
            .values()
            .filter(|a| a.vm_id == vm_id)
            .collect();
        list.sort_by_key(|a| a.seq);
        list
    }

    /// The next attachment sequence number.
    pub fn next_seq(&self) -> u64 {
        self.attachments.values().map(|a| a.seq).max().unwrap_or(0) + 1
    }

    /// The VM's own disks (not snapshot disks attached for backup).
    pub fn own_disks(&self, vm_id: &str) -> Vec<(&Attachment, &Disk)> {
        self.attachments_of(vm_id)
            .into_iter()
            .filter(|a| a.snapshot_id.is_none())
            .filter_map(|a| self.disks.get(&a.disk_id).map(|d| (a, d)))
            .collect()
    }

    /// The VM owning a disk (its non-snapshot attachment), if any.
    pub fn owner_of(&self, disk_id: &str) -> Option<&Attachment> {
        self.attachments
            .values()
            .find(|a| a.disk_id == disk_id && a.snapshot_id.is_none())
    }
}
