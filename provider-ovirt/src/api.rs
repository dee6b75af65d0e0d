//! The oVirt REST shapes this provider acts on, typed, written from the
//! oVirt API model (`ovirt-engine-api-model`: `Vm`, `Disk`,
//! `DiskAttachment`, `Snapshot`, `Backup`, `Checkpoint`, `ImageTransfer`,
//! `ProductInfo`) and imageio's extents, never from the mock's code.
//!
//! Answers arrive in the JSON shape whatever the wire format (see
//! [`crate::client`]): the engine sends numbers and booleans as strings in
//! JSON, and XML has only text, so the readers here accept
//! `"10737418240"` for a number and `"true"` for a boolean, one element
//! where a list is expected, and an empty element for an empty list.
//!
//! Every field the provider decides something with is *required*: a
//! missing or malformed one is an [`ErrorKind::Platform`] error naming the
//! API call and the field's path ([`decode`]), never a silent default.
//! Fields that only narrow what a sweep touches (a description) default to
//! empty, which matches nothing. Unknown fields are ignored.

use provider_api::{Error, ErrorKind, Result};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Reads `value`, the answer to `call`, as a `T`. Errors name the call
/// and the path of the offending field (`disk_attachment[1].disk: missing
/// field `id``).
pub fn decode<T: DeserializeOwned>(call: &str, value: Value) -> Result<T> {
    // An empty XML root (`<disk_attachments/>`) reads as "": an empty object.
    let value = match value {
        Value::String(s) if s.trim().is_empty() => Value::Object(Default::default()),
        v => v,
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at {path}")
        };
        Error::new(
            ErrorKind::Platform,
            format!("unexpected answer{at}: {inner}"),
        )
        .api_call(call)
    })
}

// ------------------------------------------------------------ readers

/// A non-negative integer given as a number or a decimal string.
pub(crate) fn number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| D::Error::custom(format!("not a non-negative integer: {n}"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("not a number: {s:?}"))),
        other => Err(D::Error::custom(format!("not a number: {other}"))),
    }
}

/// A boolean given as a boolean or `"true"` / `"false"`.
pub(crate) fn boolean<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::String(s) => match s.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            o => Err(D::Error::custom(format!("not a boolean: {o:?}"))),
        },
        other => Err(D::Error::custom(format!("not a boolean: {other}"))),
    }
}

/// A non-empty string (ids, states, names the provider acts on).
pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) if !s.trim().is_empty() => Ok(s),
        Value::String(_) => Err(D::Error::custom("empty")),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(D::Error::custom(format!("not a string: {other}"))),
    }
}

/// An optional string: absent, null and empty read as `None`.
pub(crate) fn opt_text<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(D::Error::custom(format!("not a string: {other}"))),
    }
}

/// An optional non-negative integer: absent, null and empty read as `None`.
pub(crate) fn opt_number<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<u64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        v => number(v).map(Some).map_err(D::Error::custom),
    }
}

/// A list given as an array, one element, or an empty element.
pub(crate) fn list<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let items = match Value::deserialize(d)? {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        Value::String(s) if s.trim().is_empty() => Vec::new(),
        o @ Value::Object(_) => vec![o],
        other => return Err(D::Error::custom(format!("not a list: {other}"))),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    D::Error::custom(format!("[{i}]: {inner}"))
                } else {
                    D::Error::custom(format!("[{i}].{path}: {inner}"))
                }
            })
        })
        .collect()
}

/// An object that may be an empty element (`<storage_domains/>`).
pub(crate) fn object<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    match Value::deserialize(d)? {
        Value::Null => Ok(T::default()),
        Value::String(s) if s.trim().is_empty() => Ok(T::default()),
        v => serde_json::from_value(v).map_err(D::Error::custom),
    }
}

// ------------------------------------------------------------- shapes

/// A link to another object: `{"id": …}` (`<disk id="…"/>`).
#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    /// The object's id.
    #[serde(deserialize_with = "text")]
    pub id: String,
}

/// `POST` answers: the created object, of which the provider needs the id.
#[derive(Debug, Clone, Deserialize)]
pub struct Created {
    /// The new object's id.
    #[serde(deserialize_with = "text")]
    pub id: String,
}

/// `POST /ovirt-engine/sso/oauth/token`.
#[derive(Debug, Clone, Deserialize)]
pub struct Token {
    /// The bearer token.
    #[serde(deserialize_with = "text")]
    pub access_token: String,
}

/// `GET /` (the API root).
#[derive(Debug, Clone, Deserialize)]
pub struct ApiRoot {
    /// Product information.
    pub product_info: ProductInfo,
}

/// `api.product_info`.
#[derive(Debug, Clone, Deserialize)]
pub struct ProductInfo {
    /// The engine's version.
    pub version: Version,
}

/// `product_info.version`.
#[derive(Debug, Clone, Deserialize)]
pub struct Version {
    /// Major version (4).
    #[serde(deserialize_with = "number")]
    pub major: u64,
    /// Minor version (4 and later have incremental backup).
    #[serde(deserialize_with = "number")]
    pub minor: u64,
}

/// A VM (`GET /vms/{id}`, items of `GET /vms`).
#[derive(Debug, Clone, Deserialize)]
pub struct Vm {
    /// Id.
    #[serde(deserialize_with = "text")]
    pub id: String,
    /// Name.
    #[serde(deserialize_with = "text")]
    pub name: String,
    /// `up`, `down`, ...
    #[serde(deserialize_with = "text")]
    pub status: String,
    /// Present with `all_content=true`: the OVF.
    #[serde(default)]
    pub initialization: Option<Initialization>,
    /// Memory in bytes (read for the platform-neutral spec only).
    #[serde(default, deserialize_with = "opt_number")]
    pub memory: Option<u64>,
    /// `cpu.topology`.
    #[serde(default)]
    pub cpu: Option<VmCpu>,
    /// `bios.type`: `i440fx_sea_bios`, `q35_sea_bios`, `q35_ovmf`,
    /// `q35_secure_boot`, `cluster_default`.
    #[serde(default)]
    pub bios: Option<TypeOnly>,
    /// `os.type` (`other_linux`, `rhel_8x64`, `windows_2019x64`, ...).
    #[serde(default)]
    pub os: Option<TypeOnly>,
}

/// `vm.cpu`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VmCpu {
    /// `cpu.topology`.
    #[serde(default)]
    pub topology: Option<CpuTopology>,
}

/// `vm.cpu.topology`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CpuTopology {
    /// Sockets.
    #[serde(default, deserialize_with = "opt_number")]
    pub sockets: Option<u64>,
    /// Cores per socket.
    #[serde(default, deserialize_with = "opt_number")]
    pub cores: Option<u64>,
    /// Threads per core.
    #[serde(default, deserialize_with = "opt_number")]
    pub threads: Option<u64>,
}

/// An element read for its `type` only (`bios`, `os`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TypeOnly {
    /// `type`.
    #[serde(default, rename = "type", deserialize_with = "opt_text")]
    pub kind: Option<String>,
}

/// `vm.initialization`.
#[derive(Debug, Clone, Deserialize)]
pub struct Initialization {
    /// `initialization.configuration`.
    pub configuration: Configuration,
}

/// `initialization.configuration`.
#[derive(Debug, Clone, Deserialize)]
pub struct Configuration {
    /// The OVF document.
    #[serde(deserialize_with = "text")]
    pub data: String,
}

/// `GET /vms?search=…`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Vms {
    /// The VMs (absent when none match).
    #[serde(default, deserialize_with = "list")]
    pub vm: Vec<Vm>,
}

/// A disk attachment (`GET /vms/{vm}/diskattachments[/{disk}]`).
#[derive(Debug, Clone, Deserialize)]
pub struct DiskAttachment {
    /// The attached disk (with `snapshot` for a disk snapshot attached for
    /// backup).
    pub disk: AttachedDisk,
    /// `virtio`, `virtio_scsi`, ...
    #[serde(deserialize_with = "text")]
    pub interface: String,
    /// Bootable.
    #[serde(deserialize_with = "boolean")]
    pub bootable: bool,
    /// Where the VM sees the disk once plugged (absent until then).
    #[serde(default, deserialize_with = "opt_text")]
    pub logical_name: Option<String>,
}

/// `disk_attachment.disk`.
#[derive(Debug, Clone, Deserialize)]
pub struct AttachedDisk {
    /// Disk id.
    #[serde(deserialize_with = "text")]
    pub id: String,
    /// The disk snapshot, for snapshot disks attached for backup.
    #[serde(default)]
    pub snapshot: Option<Link>,
}

/// `GET /vms/{vm}/diskattachments`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DiskAttachments {
    /// The attachments.
    #[serde(default, deserialize_with = "list")]
    pub disk_attachment: Vec<DiskAttachment>,
}

/// A disk (`GET /disks/{id}`).
#[derive(Debug, Clone, Deserialize)]
pub struct Disk {
    /// Id.
    #[serde(deserialize_with = "text")]
    pub id: String,
    /// Alias.
    #[serde(deserialize_with = "text")]
    pub alias: String,
    /// Virtual size in bytes.
    #[serde(deserialize_with = "number")]
    pub provisioned_size: u64,
    /// `raw` or `cow`.
    #[serde(deserialize_with = "text")]
    pub format: String,
    /// Thin provisioning.
    #[serde(deserialize_with = "boolean")]
    pub sparse: bool,
    /// `none` or `incremental` (4.4+; absent before, where no disk has
    /// incremental backup: a full backup, never fewer bytes).
    #[serde(default, deserialize_with = "opt_text")]
    pub backup: Option<String>,
    /// Storage domains.
    #[serde(default, deserialize_with = "object")]
    pub storage_domains: StorageDomains,
    /// Image (volume) id of the active layer (absent on engines that do
    /// not show it).
    #[serde(default, deserialize_with = "opt_text")]
    pub image_id: Option<String>,
    /// Description (carries the job marker of a disk being restored).
    #[serde(default, deserialize_with = "opt_text")]
    pub description: Option<String>,
}

/// `disk.storage_domains`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StorageDomains {
    /// The domains.
    #[serde(default, deserialize_with = "list")]
    pub storage_domain: Vec<Named>,
}

/// An object given by id (`<storage_domain id="…" href="…"/>`, as the
/// engine links objects) or by name.
#[derive(Debug, Clone, Deserialize)]
pub struct Named {
    /// Id.
    #[serde(default, deserialize_with = "opt_text")]
    pub id: Option<String>,
    /// Name.
    #[serde(default, deserialize_with = "opt_text")]
    pub name: Option<String>,
}

/// `GET /vms/{vm}/nics`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Nics {
    /// The NICs (absent when none).
    #[serde(default, deserialize_with = "list")]
    pub nic: Vec<Nic>,
}

/// A VM's network interface (read for the platform-neutral spec only).
#[derive(Debug, Clone, Deserialize)]
pub struct Nic {
    /// Name (`nic1`).
    #[serde(default, deserialize_with = "opt_text")]
    pub name: Option<String>,
    /// `virtio`, `e1000`, `rtl8139`, ...
    #[serde(default, deserialize_with = "opt_text")]
    pub interface: Option<String>,
    /// `mac.address`.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// The vNIC profile (absent: not connected).
    #[serde(default)]
    pub vnic_profile: Option<Named>,
}

/// `nic.mac`.
#[derive(Debug, Clone, Deserialize)]
pub struct Mac {
    /// The address.
    #[serde(default, deserialize_with = "opt_text")]
    pub address: Option<String>,
}

/// A snapshot (`GET /vms/{vm}/snapshots[/{id}]`).
#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    /// Id.
    #[serde(deserialize_with = "text")]
    pub id: String,
    /// Description (empty matches no sweep).
    #[serde(default, deserialize_with = "opt_text")]
    pub description: Option<String>,
    /// `locked`, `ok`, `in_preview`.
    #[serde(deserialize_with = "text")]
    pub snapshot_status: String,
}

/// `GET /vms/{vm}/snapshots`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Snapshots {
    /// The snapshots.
    #[serde(default, deserialize_with = "list")]
    pub snapshot: Vec<Snapshot>,
}

/// `GET /vms/{vm}/snapshots/{id}/disks`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SnapshotDisks {
    /// The disk images in the snapshot.
    #[serde(default, deserialize_with = "list")]
    pub disk: Vec<Link>,
}

/// A backup (`GET /vms/{vm}/backups[/{id}]`, 4.4+).
#[derive(Debug, Clone, Deserialize)]
pub struct Backup {
    /// Id.
    #[serde(deserialize_with = "text")]
    pub id: String,
    /// `initializing`, `starting`, `ready`, `finalizing`, `succeeded`,
    /// `failed`.
    #[serde(deserialize_with = "text")]
    pub phase: String,
    /// Description (empty matches no sweep).
    #[serde(default, deserialize_with = "opt_text")]
    pub description: Option<String>,
    /// The checkpoint this backup creates (without one the next backup is
    /// a full: never fewer bytes).
    #[serde(default, deserialize_with = "opt_text")]
    pub to_checkpoint_id: Option<String>,
}

impl Backup {
    /// Whether the backup has ended.
    pub fn ended(&self) -> bool {
        matches!(self.phase.as_str(), "succeeded" | "failed")
    }
}

/// `GET /vms/{vm}/backups`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Backups {
    /// The backups.
    #[serde(default, deserialize_with = "list")]
    pub backup: Vec<Backup>,
}

/// A checkpoint (`GET /vms/{vm}/checkpoints/{id}`).
#[derive(Debug, Clone, Deserialize)]
pub struct Checkpoint {
    /// `created` or `invalid`.
    #[serde(deserialize_with = "text")]
    pub state: String,
}

/// An image transfer (`GET /imagetransfers[/{id}]`).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageTransfer {
    /// Id (also the image server ticket).
    #[serde(deserialize_with = "text")]
    pub id: String,
    /// `initializing`, `transferring`, `finalizing_success`, ...
    #[serde(deserialize_with = "text")]
    pub phase: String,
    /// The image server URL on the host (while transferring).
    #[serde(default, deserialize_with = "opt_text")]
    pub transfer_url: Option<String>,
    /// The image server URL through the engine's proxy.
    #[serde(default, deserialize_with = "opt_text")]
    pub proxy_url: Option<String>,
    /// The backup a download reads.
    #[serde(default)]
    pub backup: Option<Link>,
    /// Description (empty matches no sweep).
    #[serde(default, deserialize_with = "opt_text")]
    pub description: Option<String>,
}

impl ImageTransfer {
    /// The image server URL (`transfer_url`, else `proxy_url`).
    pub fn url(&self, call: &str) -> Result<&str> {
        self.transfer_url
            .as_deref()
            .or(self.proxy_url.as_deref())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Platform,
                    format!(
                        "unexpected answer: image transfer {} has neither transfer_url nor proxy_url",
                        self.id
                    ),
                )
                .api_call(call)
            })
    }

    /// Whether the transfer has ended.
    pub fn ended(&self) -> bool {
        transfer_final(&self.phase)
    }
}

/// Whether a transfer phase is final.
pub fn transfer_final(phase: &str) -> bool {
    matches!(
        phase,
        "finished_success"
            | "finished_failure"
            | "cancelled"
            | "cancelled_user"
            | "cancelled_system"
    )
}

/// `GET /imagetransfers`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageTransfers {
    /// The transfers.
    #[serde(default, deserialize_with = "list")]
    pub image_transfer: Vec<ImageTransfer>,
}

/// One extent of `GET /images/{ticket}/extents?context=dirty` (imageio:
/// a JSON array, every byte of the disk in one extent).
#[derive(Debug, Clone, Deserialize)]
pub struct DirtyExtent {
    /// Offset.
    #[serde(deserialize_with = "number")]
    pub start: u64,
    /// Length.
    #[serde(deserialize_with = "number")]
    pub length: u64,
    /// Changed since the backup's `from_checkpoint_id`.
    #[serde(deserialize_with = "boolean")]
    pub dirty: bool,
}

/// One extent of `GET /images/{ticket}/extents?context=zero`.
#[derive(Debug, Clone, Deserialize)]
pub struct ZeroExtent {
    /// Offset.
    #[serde(deserialize_with = "number")]
    pub start: u64,
    /// Length.
    #[serde(deserialize_with = "number")]
    pub length: u64,
    /// Reads as zeroes.
    #[serde(deserialize_with = "boolean")]
    pub zero: bool,
    /// Unallocated (newer imageio; absent: allocated).
    #[serde(default, deserialize_with = "boolean")]
    pub hole: bool,
}

/// The answer to `OPTIONS /images/{ticket}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageOptions {
    /// What the ticket offers: `extents`, `zero`, `flush`.
    #[serde(default)]
    pub features: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_read_as_numbers_and_booleans() {
        let d: Disk = decode(
            "GET /disks/d",
            json!({"id": "d", "alias": "a", "provisioned_size": "10737418240",
                   "format": "cow", "sparse": "true", "backup": "incremental",
                   "storage_domains": {"storage_domain": {"name": "data"}}}),
        )
        .unwrap();
        assert_eq!(d.provisioned_size, 10737418240);
        assert!(d.sparse);
        assert_eq!(
            d.storage_domains.storage_domain[0].name.as_deref(),
            Some("data")
        );
    }

    #[test]
    fn missing_fields_name_the_call_and_the_path() {
        let e = decode::<Disk>(
            "GET /disks/d",
            json!({"id": "d", "alias": "a", "format": "cow", "sparse": "true"}),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Platform);
        let m = e.to_string();
        assert!(
            m.contains("provisioned_size") && m.contains("GET /disks/d"),
            "{m}"
        );

        let e = decode::<DiskAttachments>(
            "GET /vms/v/diskattachments",
            json!({"disk_attachment": [
                {"disk": {"id": "a"}, "interface": "virtio", "bootable": "true"},
                {"disk": {}, "interface": "virtio", "bootable": "false"}]}),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("disk_attachment") && m.contains("[1]") && m.contains("`id`"),
            "{m}"
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        for bad in [json!("ten"), json!(-1), json!(true)] {
            let e = decode::<Version>("GET /", json!({"major": bad, "minor": "4"})).unwrap_err();
            assert!(e.to_string().contains("major"), "{e}");
        }
        let e = decode::<Vec<DirtyExtent>>(
            "GET /images/t/extents",
            json!({"start": 0, "length": 1, "dirty": true}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sequence"), "{e}");
        let e =
            decode::<Vec<DirtyExtent>>("GET /images/t/extents", json!([{"start": 0, "length": 1}]))
                .unwrap_err();
        assert!(e.to_string().contains("dirty"), "{e}");
    }

    #[test]
    fn one_element_and_empty_elements_read_as_lists() {
        let one: Snapshots = decode(
            "GET /vms/v/snapshots",
            json!({"snapshot": {"id": "s", "snapshot_status": "ok"}}),
        )
        .unwrap();
        assert_eq!(one.snapshot.len(), 1);
        let none: Snapshots = decode("GET /vms/v/snapshots", json!("")).unwrap();
        assert!(none.snapshot.is_empty());
        let none: Snapshots = decode("GET /vms/v/snapshots", json!({})).unwrap();
        assert!(none.snapshot.is_empty());
    }
}
