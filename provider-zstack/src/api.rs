//! The ZStack REST shapes this provider reads, written from ZStack's
//! REST reference and its Java SDK inventories (`sdk/src/main/java/org/
//! zstack/sdk/*Inventory.java`, `*Result.java`) and the image seed, never
//! from the mock's code, so that a misreading shows up as a failing test.
//!
//! Every field the provider acts on is required: a missing `allVolumes`,
//! `deviceId`, `size` or `uuid` is an error naming the API call and the
//! field (serde's "missing field `allVolumes`"), never zero volumes or a
//! zero size. Fields that are only shown to people (descriptions) or that
//! ZStack documents as nullable are `Option`. Unknown fields are ignored,
//! so newer platforms keep parsing.
//!
//! Answer envelopes (from ZStack's `RestServer`):
//!
//! - a query or a read (`GET`): `200 {"inventories": [...]}`, or with
//!   `count=true` `{"total": n}`;
//! - login: `200 {"inventory": SessionInventory}`;
//! - any other call: `202 {"location": ".../v1/api-jobs/<uuid>"}`; polling
//!   it answers `202` while running, `200` with the result
//!   (`{"inventory": …}` for creations, the result's fields at the top
//!   level for `ExportImageFromBackupStorage`) or `503` with
//!   `{"error": ErrorCode}` when the API failed;
//! - a failed synchronous call: `503 {"error": ErrorCode}`.

use provider_api::{Error, ErrorKind, Result};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Reads a JSON answer of `call` into `T`; a missing or mistyped field is
/// an error naming the call and the field.
pub fn parse<T: DeserializeOwned>(call: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| {
        Error::new(
            ErrorKind::Platform,
            format!("the ZStack answer does not have the expected shape: {e}"),
        )
        .api_call(call)
    })
}

/// `{"inventory": T}`: login, creations (volume snapshot, template, image,
/// VM, data volume).
#[derive(Debug, Clone, Deserialize)]
pub struct InventoryAnswer<T> {
    /// The created or read object.
    pub inventory: T,
}

/// `{"inventories": [T]}`: a query.
#[derive(Debug, Clone, Deserialize)]
pub struct Inventories<T> {
    /// The matching objects.
    pub inventories: Vec<T>,
}

/// `{"inventories": [T], "total": n}`: a query with `replyWithCount=true`.
#[derive(Debug, Clone, Deserialize)]
pub struct InventoriesWithTotal<T> {
    /// The matching objects (up to the query's `limit`).
    pub inventories: Vec<T>,
    /// How many match in all.
    pub total: u64,
}

/// `{"total": n}`: a query with `count=true`.
#[derive(Debug, Clone, Deserialize)]
pub struct Total {
    /// Matching objects.
    pub total: u64,
}

/// `202 {"location"}` of an API job.
#[derive(Debug, Clone, Deserialize)]
pub struct JobLocation {
    /// URL to poll.
    pub location: String,
}

/// `{"error": ErrorCode}` of a failed call (the `ErrorCode` shape of
/// `header/errorcode/ErrorCode.java`).
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorAnswer {
    /// The error.
    pub error: ErrorCode,
}

/// A ZStack error code.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorCode {
    /// `SYS.1006`, `ID.1001`, ...
    pub code: String,
    /// Short description.
    #[serde(default)]
    pub description: Option<String>,
    /// Details.
    #[serde(default)]
    pub details: Option<String>,
}

/// `SessionInventory` (login).
#[derive(Debug, Clone, Deserialize)]
pub struct SessionInventory {
    /// The session id (`Authorization: OAuth <uuid>`).
    pub uuid: String,
}

/// `VmInstanceInventory`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInventory {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// `Linux`, `Windows`, `Paravirtualization`, `Other` (nullable).
    #[serde(default)]
    pub platform: Option<String>,
    /// Description (nullable; carries a job marker while a restore
    /// creates the VM).
    #[serde(default)]
    pub description: Option<String>,
    /// Every volume of the VM: required, a VM always has a root volume.
    pub all_volumes: Vec<VolumeInventory>,
    /// `Running`, `Stopped`, `Destroyed`, … (nullable).
    #[serde(default)]
    pub state: Option<String>,
    /// Instance offering the VM was created with (nullable: a VM created
    /// with `cpuNum` and `memorySize` has none).
    #[serde(default)]
    pub instance_offering_uuid: Option<String>,
    /// CPUs.
    #[serde(default)]
    pub cpu_num: Option<u32>,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_size: Option<u64>,
    /// Default L3 network.
    #[serde(default)]
    pub default_l3_network_uuid: Option<String>,
    /// NICs, one per L3 network.
    #[serde(default)]
    pub vm_nics: Vec<VmNicInventory>,
}

/// `VmNicInventory` (the fields the provider reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmNicInventory {
    /// L3 network of the NIC.
    pub l3_network_uuid: String,
    /// Device id (order of the NICs).
    #[serde(default)]
    pub device_id: Option<u32>,
    /// MAC address (nullable).
    #[serde(default)]
    pub mac: Option<String>,
}

/// Any inventory, by UUID only (existence checks).
#[derive(Debug, Clone, Deserialize)]
pub struct UuidInventory {
    /// UUID.
    pub uuid: String,
}

/// `VolumeInventory`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeInventory {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// `Root` or `Data` (other types are refused by the provider).
    #[serde(rename = "type")]
    pub kind: String,
    /// Device id in the VM (0 = root).
    pub device_id: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Root volumes: the cached image it is thin-cloned from (nullable).
    #[serde(default)]
    pub root_image_uuid: Option<String>,
    /// VM it is attached to (nullable).
    #[serde(default)]
    pub vm_instance_uuid: Option<String>,
    /// Description (nullable).
    #[serde(default)]
    pub description: Option<String>,
}

/// `ImageInventory`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageInventory {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Description (nullable).
    #[serde(default)]
    pub description: Option<String>,
    /// `Creating`, `Downloading`, `Ready`, ...
    pub status: String,
    /// `Enabled` or `Disabled`.
    pub state: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// md5 of the content (`not calculated` while unknown; nullable).
    #[serde(default)]
    pub md5_sum: Option<String>,
    /// `RootVolumeTemplate`, `DataVolumeTemplate`, `ISO`.
    pub media_type: String,
    /// Backup storages holding it (required: an empty list means on none).
    pub backup_storage_refs: Vec<ImageBackupStorageRef>,
    /// When it was created, as ZStack prints dates (`Jun 7, 2017 9:20:31
    /// PM`, see [`parse_date`]); nullable.
    #[serde(default)]
    pub create_date: Option<String>,
}

/// A ZStack date (`Jun 7, 2017 9:20:31 PM`, Java's
/// `MMM d, yyyy h:mm:ss a`) as seconds since the Unix epoch, reading the
/// wall time as UTC (ZStack prints the management node's local time
/// without a zone). `None` when it does not parse.
pub fn parse_date(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut it = text.split_whitespace();
    let name = it.next()?;
    let month = MONTHS.iter().position(|m| *m == name)? as i64 + 1;
    let day: i64 = it.next()?.strip_suffix(',')?.parse().ok()?;
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':');
    let h: i64 = hms.next()?.parse().ok()?;
    let m: i64 = hms.next()?.parse().ok()?;
    let s: i64 = hms.next()?.parse().ok()?;
    let h = match (it.next()?, h) {
        ("AM", 12) => 0,
        ("AM", h @ 0..=11) => h,
        ("PM", 12) => 12,
        ("PM", h @ 1..=11) => h + 12,
        _ => return None,
    };
    if it.next().is_some() || !(1..=31).contains(&day) || m > 59 || s > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + s).ok()
}

/// `ImageBackupStorageRefInventory`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageBackupStorageRef {
    /// The backup storage.
    pub backup_storage_uuid: String,
}

/// `BackupStorageInventory`.
#[derive(Debug, Clone, Deserialize)]
pub struct BackupStorageInventory {
    /// UUID.
    pub uuid: String,
    /// `Connected`, `Disconnected`, `Connecting`.
    pub status: String,
}

/// `VolumeSnapshotInventory`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotInventory {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
}

/// `VolumeSnapshotGroupInventory` (ZStack 3.6+).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotGroupInventory {
    /// UUID.
    pub uuid: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// One snapshot per volume.
    #[serde(default)]
    pub volume_snapshot_refs: Vec<VolumeSnapshotGroupRef>,
}

/// `VolumeSnapshotGroupRefInventory`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotGroupRef {
    /// The snapshot.
    pub volume_snapshot_uuid: String,
    /// Its volume.
    pub volume_uuid: String,
}

/// `QuotaInventory`.
#[derive(Debug, Clone, Deserialize)]
pub struct QuotaInventory {
    /// `image.num`, ...
    pub name: String,
    /// The limit (a negative value: no limit).
    pub value: i64,
}

/// `ExportImageFromBackupStorageResult` (fields at the top level).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportResult {
    /// HTTP URL of the exported image.
    pub image_url: String,
    /// md5 of what the URL serves.
    pub export_md5_sum: String,
}

/// A literal text for a `~=` (LIKE) query value: ZStack hands the value
/// through ZQL to MySQL's `LIKE`, where `%` and `_` are wildcards and `\`
/// is the escape character, so each of the three is preceded by `\`.
/// MySQL's default collation also compares case-insensitively: a match
/// is a candidate, to be checked exactly on the client.
pub fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn zstack_dates_parse() {
        assert_eq!(parse_date("Jun 7, 2017 9:20:31 PM"), Some(1_496_870_431));
        assert_eq!(parse_date("Jan 1, 1970 12:00:00 AM"), Some(0));
        assert_eq!(parse_date("Feb 29, 2024 12:05:09 PM"), Some(1_709_208_309));
        assert_eq!(parse_date("1496870431"), None);
        assert_eq!(parse_date("Jun 7, 2017 13:20:31 PM"), None);
    }

    #[test]
    fn like_values_escape_the_wildcards() {
        assert_eq!(like_escape("vmbackup.h-1.j-1."), "vmbackup.h-1.j-1.");
        assert_eq!(like_escape(r"a_b%c\d"), r"a\_b\%c\\d");
    }

    #[test]
    fn a_vm_without_all_volumes_is_an_error_naming_the_field_and_call() {
        let e = parse::<Inventories<VmInventory>>(
            "GET /zstack/v1/vm-instances/1",
            json!({"inventories": [{"uuid": "1", "name": "vm"}]}),
        )
        .unwrap_err();
        let text = e.report();
        assert!(text.contains("allVolumes"), "{text}");
        assert_eq!(
            e.context().api_call.as_deref(),
            Some("GET /zstack/v1/vm-instances/1")
        );
    }

    #[test]
    fn volumes_need_device_id_and_size() {
        for missing in ["deviceId", "size", "type", "uuid"] {
            let mut v = json!({"uuid": "v", "name": "n", "type": "Data", "deviceId": 1, "size": 5});
            v.as_object_mut().unwrap().remove(missing);
            let e = parse::<VolumeInventory>("GET x", v).unwrap_err();
            assert!(e.report().contains(missing), "{}", e.report());
        }
    }
}
