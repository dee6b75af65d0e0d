//! The janus OpenAPI shapes this provider reads and writes, written from
//! the SCP seed, `PLATFORMS.md` and the mock hypervisor's README (never
//! from the mock's code, so that a misreading shows up as a failing test).
//!
//! Only fields the provider uses are typed; unknown fields are ignored, so
//! newer platforms keep parsing. Fields that decide what is backed up or
//! restored (disk lists, sizes, changed areas and their paging, base image
//! ids and sizes, checkpoints, CBT state, list totals) are *required*: an
//! answer without one is an error naming the call and the field, never a
//! silent zero or empty list. Only fields that are optional on the
//! platform, or merely descriptive, default.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every answer: `{"code": 0, "message": "success", "data": …}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    /// 0 on success; anything else is an error, whatever the HTTP status.
    pub code: i64,
    /// Human text.
    #[serde(default)]
    pub message: String,
    /// The payload.
    #[serde(default)]
    pub data: Value,
}

/// The platform's documented message when a VM's CBT expired (after a
/// snapshot revert or a restore): "The VM CBT has expired. Please reset
/// it." The provider recognises expiry by this text, whatever the code.
pub const CBT_EXPIRED_MESSAGE: &str = "The VM CBT has expired";

/// Whether an envelope message says that the VM's CBT expired.
pub fn says_cbt_expired(message: &str) -> bool {
    message
        .to_ascii_lowercase()
        .contains(&CBT_EXPIRED_MESSAGE.to_ascii_lowercase())
}

/// Envelope codes with a meaning for the provider.
pub mod codes {
    /// Authentication (missing, unknown or expired token, bad password).
    pub const UNAUTHORIZED: i64 = 40100;
    /// Object or API path not found.
    pub const NOT_FOUND: i64 = 40400;
    /// Object in a conflicting state.
    pub const CONFLICT: i64 = 40900;
    /// Generic platform rule refusal.
    pub const REFUSED: i64 = 60000;
    /// CBT is not enabled on the server.
    pub const CBT_DISABLED: i64 = 60002;
    /// Base image CBT not available in this version.
    pub const BASE_CBT_UNAVAILABLE: i64 = 60003;
    /// Checkpoint no longer valid.
    pub const CHECKPOINT_INVALID: i64 = 60004;
    /// Agentless backup unsupported (desktop VM in revert mode).
    pub const REVERT_MODE: i64 = 60005;
    /// The backup resource expired and was released.
    pub const LEASE_EXPIRED: i64 = 60006;
}

/// A paged list: `{"total_size", "page_num", "page_size",
/// "next_page_num", "data": [...]}`; pages count from 0, `next_page_num`
/// is `""` on the last page.
#[derive(Debug, Clone, Deserialize)]
pub struct Page<T> {
    /// Items over all pages (required: a list that does not say how many
    /// items it holds cannot be checked for completeness).
    pub total_size: u64,
    /// The next page, `""` (or `null`) on the last one (required: a
    /// missing one would end the list early).
    #[serde(deserialize_with = "required_nullable")]
    pub next_page_num: Option<Value>,
    /// This page's items.
    pub data: Vec<T>,
}

impl<T> Page<T> {
    /// The next page number, `None` on the last page.
    pub fn next(&self) -> Option<u64> {
        match self.next_page_num.as_ref()? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// Deserializes a field that must be present but may be `null` (serde
/// otherwise reads a missing `Option` field as `None`).
pub fn required_nullable<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// `data` of a call marked *task*: at least the task id.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskRef {
    /// Poll `GET /janus/20180725/tasks/{task_id}`.
    pub task_id: String,
}

/// `GET /janus/20180725/tasks/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    /// `waiting`, `doing`, `finish`, `failure`, `canceling` or `canceled`.
    pub status: String,
    /// -2 waiting, -1 failure, 0–99 doing, 100 finish.
    #[serde(default)]
    pub progress: i64,
    /// What the task created, once `finish`.
    #[serde(default)]
    pub entities: Value,
    /// The platform's error text on `failure`.
    #[serde(default)]
    pub description: String,
}

/// `POST /janus/authenticate` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthAnswer {
    /// `{"token": {"id"}}`.
    pub access: AuthAccess,
}

/// Part of [`AuthAnswer`].
#[derive(Debug, Clone, Deserialize)]
pub struct AuthAccess {
    /// The token.
    pub token: AuthToken,
}

/// Part of [`AuthAnswer`].
#[derive(Debug, Clone, Deserialize)]
pub struct AuthToken {
    /// Sent as `Authorization: Token <id>`.
    pub id: String,
    /// Lifetime in seconds, when the platform says it.
    #[serde(default)]
    pub expires_in: Option<f64>,
}

/// `GET /janus/20180725/system/version`.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionAnswer {
    /// E.g. `SCP6.11.3 B-2025-07-25 10:00:00` (see
    /// [`crate::rules::ScpVersion::parse`]).
    pub build_version: String,
}

/// CBT state of a server (required: it decides between an incremental
/// and a full backup). Expiry is not a field: the platform says it in the
/// CBT calls' answers ([`says_cbt_expired`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CbtStatus {
    /// 1 enabled, 0 disabled.
    pub enable: i64,
}

/// A disk as servers and snapshots (`vmconf.hardware_option.disks`) list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Disk id.
    pub id: String,
    /// Device name (`scsi0`): the volume's device in every snapshot.
    pub name: String,
    /// `system` or `data`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Storage.
    #[serde(default)]
    pub storage_id: String,
    /// Present only on a linked system disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image_id: Option<String>,
}

impl Disk {
    /// The device name the provider stores it under (the disk's name, or
    /// its id when the platform gives no name).
    pub fn device(&self) -> String {
        if self.name.is_empty() {
            self.id.clone()
        } else {
            self.name.clone()
        }
    }
}

/// `GET /janus/20250725/servers/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    /// Server id.
    pub id: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// `"desk"`: desktop-cloud VM.
    pub application: String,
    /// 1: desktop VM in revert mode.
    pub revert_mode: i64,
    /// Storage.
    pub storage_id: String,
    /// vCPUs.
    #[serde(default)]
    pub cores: Value,
    /// Memory.
    #[serde(default)]
    pub memory_mb: Value,
    /// OS type.
    #[serde(default)]
    pub os_type: String,
    /// Change tracking.
    pub cbt: CbtStatus,
    /// Disks, the system disk first.
    pub disks: Vec<Disk>,
}

/// `GET …/snapshots/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    /// Snapshot id.
    pub id: String,
    /// Its CBT checkpoint.
    pub checkpoint_id: u64,
    /// The VM configuration at the snapshot (kept whole as the guest config).
    pub vmconf: Value,
}

/// The part of `vmconf` the provider interprets.
#[derive(Debug, Clone, Deserialize)]
pub struct VmConf {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// `"desk"` for desktop-cloud VMs.
    pub application: String,
    /// 1: revert mode.
    #[serde(default)]
    pub revert_mode: i64,
    /// Hardware (required: it lists the disks to back up).
    pub hardware_option: HardwareOption,
}

/// `vmconf.hardware_option`.
#[derive(Debug, Clone, Deserialize)]
pub struct HardwareOption {
    /// Disks; a linked one carries `base_image_id`.
    pub disks: Vec<Disk>,
}

/// Result of snapshot creation.
#[derive(Debug, Clone, Deserialize)]
pub struct SnapshotCreated {
    /// New snapshot.
    pub snapshot_id: String,
    /// Its checkpoint.
    pub checkpoint_id: u64,
}

/// One changed area.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Area {
    /// Bytes.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// `GET …/cbt/changed-areas` (one page).
#[derive(Debug, Clone, Deserialize)]
pub struct ChangedAreasPage {
    /// Disk size.
    pub disk_size: u64,
    /// Start of the next page, `null` at the end (required: a missing one
    /// would end the list early).
    #[serde(deserialize_with = "required_nullable")]
    pub next_offset: Option<u64>,
    /// Areas inside this page.
    pub areas: Vec<Area>,
}

/// A base image replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Storage.
    pub storage_id: String,
    /// `AVAILABLE`, ...
    #[serde(default)]
    pub status: String,
}

/// A base image object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    /// Id (changes when its data changes).
    pub id: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// `CREATING` or `AVAILABLE`.
    pub status: String,
    /// Bytes.
    pub size: u64,
    /// `raw`.
    #[serde(default)]
    pub disk_format: String,
    /// OS type.
    #[serde(default)]
    pub os_type: String,
    /// Home storage.
    #[serde(default)]
    pub storage_id: String,
    /// Replicas.
    pub replicas: Vec<Replica>,
}

/// `{"id": …}` answers.
#[derive(Debug, Clone, Deserialize)]
pub struct IdAnswer {
    /// The id.
    pub id: String,
}

/// A custom attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomAttribute {
    /// Id.
    pub id: String,
    /// Name (unique).
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// `base_image` or `server`.
    #[serde(default)]
    pub resource_type: String,
}

/// A custom attribute binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Binding id.
    #[serde(default)]
    pub id: String,
    /// Attribute id.
    pub custom_attribute_id: String,
    /// Attribute name.
    #[serde(default)]
    pub custom_attribute_name: String,
    /// Attribute description.
    #[serde(default)]
    pub custom_attribute_description: String,
    /// `base_image`.
    #[serde(default)]
    pub resource_type: String,
    /// The base image id.
    pub resource_id: String,
    /// Value.
    pub value: String,
}

/// A backup resource (lease).
#[derive(Debug, Clone, Deserialize)]
pub struct BackupResource {
    /// Id.
    pub id: String,
    /// Seconds left.
    #[serde(default)]
    pub remain_time: i64,
}

/// An NBD export opened under a backup resource.
#[derive(Debug, Clone, Deserialize)]
pub struct Export {
    /// Export id (for closing it).
    pub id: String,
    /// NBD export name.
    pub export_name: String,
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Whether TLS is used.
    #[serde(default)]
    pub tls: bool,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
}

/// A disk hot-added to the proxy.
#[derive(Debug, Clone, Deserialize)]
pub struct HotAddDisk {
    /// Hot-add id (for detaching).
    pub id: String,
    /// Where the proxy sees the disk as a raw file (absent when the proxy
    /// finds it by serial, see [`crate::ScpOptions::hotadd_device_root`]).
    #[serde(default)]
    pub local_path: String,
    /// Size.
    #[serde(default)]
    pub size: u64,
    /// The disk's serial as the proxy's guest sees it (virtio: at most 20
    /// characters).
    #[serde(default)]
    pub serial: String,
}

/// Result of `PUT /janus/20250725/servers/{proxy}`.
#[derive(Debug, Clone, Deserialize)]
pub struct HotAddResult {
    /// Attached disks.
    pub hotadd_disks: Vec<HotAddDisk>,
}

/// Result of `POST /janus/20250725/servers`.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerCreated {
    /// New server.
    pub server_id: String,
    /// Its disks, in request order.
    pub disk_ids: Vec<String>,
}

/// A server as `GET /janus/20250725/servers` lists it, read by the
/// leftover sweep only.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerListed {
    /// Server id.
    pub id: String,
    /// Disks hot-added to it (a backup proxy). Absent: none to sweep.
    #[serde(default)]
    pub hotadd_disks: Vec<HotAddListed>,
    /// Description (a restore's job marker while its base image is written).
    #[serde(default)]
    pub description: String,
    /// Its disks (a linked one names its base image).
    #[serde(default)]
    pub disks: Vec<Disk>,
}

/// A disk hot-added to a server, as the server lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct HotAddListed {
    /// Hot-add id (for detaching).
    pub id: String,
    /// What it shows.
    pub source: HotAddSource,
}

/// What a hot-added disk shows.
#[derive(Debug, Clone, Deserialize)]
pub struct HotAddSource {
    /// The snapshot whose frozen disk it shows.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// The base image it shows (`open_base_image`).
    #[serde(default)]
    pub base_image_id: Option<String>,
}

/// A snapshot as `GET …/servers/{id}/snapshots` lists it, read by the
/// leftover sweep only.
#[derive(Debug, Clone, Deserialize)]
pub struct SnapshotListed {
    /// Snapshot id.
    pub id: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Description (where the provider records its job marker).
    #[serde(default)]
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_readme_examples() {
        let s: Snapshot = serde_json::from_value(serde_json::json!({
            "id": "s", "server_id": "v", "name": "snapshot-7", "description": "", "status": "ok",
            "checkpoint_id": 7, "created_at": 1795307362,
            "vmconf": {"name": "linked-vm-1", "application": "", "revert_mode": 0,
                "hardware_option": {"disks": [{"id": "d", "name": "scsi0", "type": "system",
                    "size": 201326592, "storage_id": "storage-local", "base_image_id": "b"}]}}
        }))
        .unwrap();
        let conf: VmConf = serde_json::from_value(s.vmconf).unwrap();
        assert_eq!(s.checkpoint_id, 7);
        assert_eq!(
            conf.hardware_option.disks[0].base_image_id.as_deref(),
            Some("b")
        );
        let p: ChangedAreasPage = serde_json::from_value(serde_json::json!({
            "disk_size": 201326592, "block_size": 65536, "offset": 0, "length": 67108864,
            "next_offset": null, "areas": [{"offset": 0, "length": 65536}]
        }))
        .unwrap();
        assert_eq!(p.next_offset, None);
        assert_eq!(p.areas.len(), 1);
    }

    #[test]
    fn answers_missing_a_deciding_field_do_not_parse() {
        let page = serde_json::json!({"disk_size": 1, "next_offset": null, "areas": []});
        for field in ["next_offset", "areas", "disk_size"] {
            let mut v = page.clone();
            v.as_object_mut().unwrap().remove(field);
            let e = serde_json::from_value::<ChangedAreasPage>(v).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        let e =
            serde_json::from_value::<VmConf>(serde_json::json!({"application": ""})).unwrap_err();
        assert!(e.to_string().contains("hardware_option"), "{e}");
        let e = serde_json::from_value::<Page<Value>>(
            serde_json::json!({"data": [], "next_page_num": ""}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("total_size"), "{e}");
        let e =
            serde_json::from_value::<Page<Value>>(serde_json::json!({"data": [], "total_size": 0}))
                .unwrap_err();
        assert!(e.to_string().contains("next_page_num"), "{e}");
        for (next, want) in [
            (serde_json::json!(""), None),
            (serde_json::json!(3), Some(3)),
            (serde_json::json!("2"), Some(2)),
        ] {
            let p: Page<Value> = serde_json::from_value(
                serde_json::json!({"data": [], "total_size": 9, "next_page_num": next}),
            )
            .unwrap();
            assert_eq!(p.next(), want);
        }
    }
}
