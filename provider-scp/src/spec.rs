//! The platform-neutral guest spec on SCP, both ways.
//!
//! - A backup records the server as a [`GuestSpec`] ([`of_server`]):
//!   `cores`, `memory_mb`, `os_type`, the disks in platform order (the
//!   system disk boots; the bus from the device name, `scsi0`, `ide1`,
//!   …), the NICs of the snapshot's `vmconf.hardware_option.nics` (model
//!   and MAC).
//! - A restore of a snapshot taken elsewhere (or imported) describes the
//!   server to create from the snapshot's spec ([`foreign_metadata`]): a
//!   new server with one plain (unlinked) disk per stored volume, the
//!   first the system disk, CPUs, memory and the OS type mapped. What the
//!   server cannot take here (NICs, firmware, buses) is a restore warning.

use provider_api::spec::{Bus, DiskSpec, Firmware, NicSpec};
use provider_api::{Error, GuestSpec, RestoreVmRequest, Result};
use serde_json::{Value, json};

use crate::api::{Disk, Server};
use crate::metadata::{DiskMeta, FORMAT, ServerMeta, SnapshotMetadata};
use crate::rules::BasePolicy;

/// A count given as a number or a decimal string.
fn count(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// The bus a device name implies (`scsi0`, `ide1`, `sata0`, `virtio0`,
/// `nvme0`); SCSI when it names none.
fn bus_of(device: &str) -> Bus {
    let d = device.to_ascii_lowercase();
    if d.starts_with("ide") {
        Bus::Ide
    } else if d.starts_with("sata") {
        Bus::Sata
    } else if d.starts_with("virtio") || d.starts_with("vd") {
        Bus::Virtio
    } else if d.starts_with("nvme") {
        Bus::Nvme
    } else {
        Bus::Scsi
    }
}

/// The server and its backed-up disks (in platform order, the system
/// disk first) as a platform-neutral spec; `vmconf` is the snapshot's
/// configuration, whose `hardware_option.nics` gives the NICs.
pub(crate) fn of_server(server: &Server, disks: &[DiskMeta], vmconf: &Value) -> GuestSpec {
    let nics = vmconf
        .pointer("/hardware_option/nics")
        .and_then(Value::as_array)
        .map(|nics| {
            nics.iter()
                .map(|n| NicSpec {
                    model: n.get("model").and_then(Value::as_str).map(str::to_owned),
                    mac: n.get("mac").and_then(Value::as_str).map(str::to_owned),
                    network: None,
                })
                .collect()
        })
        .unwrap_or_default();
    GuestSpec {
        name: server.name.clone(),
        os: Some(server.os_type.clone()).filter(|o| !o.is_empty()),
        firmware: Firmware::Bios,
        cpus: count(&server.cores)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1),
        memory_mib: count(&server.memory_mb).unwrap_or(1024),
        disks: disks
            .iter()
            .map(|d| DiskSpec {
                device: d.device.clone(),
                size: d.disk.size,
                bus: bus_of(&d.device),
                controller: None,
                boot_order: (d.disk.kind == "system").then_some(0),
            })
            .collect(),
        nics,
    }
}

/// The metadata a restore of a snapshot from another platform creates
/// the server from: its spec's name, CPUs, memory and OS (`windows` or
/// `linux`), one unlinked disk per stored volume in the snapshot's order
/// (the spec's boot disk first when it names one), on `storage_id` (the
/// option `restore_storage_id`: the snapshot names no storage of this
/// platform).
pub(crate) fn foreign_metadata(
    request: &RestoreVmRequest,
    storage_id: Option<&str>,
) -> Result<SnapshotMetadata> {
    let snapshot = &request.archive.snapshot;
    let spec = request.archive.foreign_guest_spec()?;
    let Some(storage_id) = storage_id else {
        return Err(Error::invalid(format!(
            "snapshot {} comes from platform {}: name the storage of the restored server \
             (SCP option restore_storage_id)",
            snapshot.id, snapshot.platform
        )));
    };
    if snapshot.volumes.is_empty() {
        return Err(Error::invalid(format!(
            "snapshot {} holds no volumes",
            snapshot.id
        )));
    }
    let mut volumes: Vec<_> = snapshot.volumes.iter().map(|v| &v.volume).collect();
    // The system disk is the first: the spec's boot disk when it names one.
    if let Some(boot) = spec.disks.iter().find(|d| d.boot_order == Some(0))
        && let Some(at) = volumes.iter().position(|v| v.device == boot.device)
    {
        let v = volumes.remove(at);
        volumes.insert(0, v);
    }
    let disks = volumes
        .iter()
        .enumerate()
        .map(|(n, v)| DiskMeta {
            device: v.device.clone(),
            disk: Disk {
                id: String::new(),
                name: v.device.clone(),
                kind: if n == 0 { "system" } else { "data" }.into(),
                size: v.size,
                storage_id: storage_id.to_owned(),
                base_image_id: None,
            },
            policy: BasePolicy::NotLinked,
        })
        .collect();
    let windows = spec
        .os
        .as_deref()
        .is_some_and(|o| o.to_ascii_lowercase().contains("win"));
    let os_type = if windows { "windows" } else { "linux" };
    if spec.os.as_deref().is_some_and(|o| o != os_type) {
        request.warn(format!(
            "operating system {:?} is created as SCP os_type {os_type}",
            spec.os.as_deref().unwrap_or_default()
        ));
    }
    if !spec.nics.is_empty() {
        request.warn(format!(
            "{} NIC(s) not restored: the server is created without NICs (connect it to a \
             network in SCP)",
            spec.nics.len()
        ));
    }
    if spec.firmware == Firmware::Efi {
        request.warn("UEFI firmware: the server is created with SCP's default boot firmware");
    }
    if !spec.disks.is_empty() {
        let buses: Vec<String> = spec
            .disks
            .iter()
            .map(|d| format!("{} {:?}", d.device, d.bus).to_ascii_lowercase())
            .collect();
        request.warn(format!(
            "disk buses not requested (SCP's server creation takes none): {}",
            buses.join(", ")
        ));
    }
    Ok(SnapshotMetadata {
        format: FORMAT.into(),
        platform_version: String::new(),
        server: ServerMeta {
            id: snapshot.guest.0.clone(),
            name: spec.name.clone(),
            application: String::new(),
            revert_mode: 0,
            storage_id: storage_id.to_owned(),
            cpu: json!(spec.cpus.max(1)),
            memory_mb: json!(spec.memory_mib.max(1)),
            os_type: os_type.into(),
        },
        snapshot_id: String::new(),
        checkpoint_id: 0,
        disks,
        base_image: None,
    })
}
