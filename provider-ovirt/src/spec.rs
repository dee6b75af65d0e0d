//! The platform-neutral guest spec on oVirt, both ways.
//!
//! - A backup records the VM as a [`GuestSpec`] ([`of_vm`]) beside the
//!   engine's OVF, from `GET /vms/{id}` (`cpu.topology`, `memory`,
//!   `bios.type`, `os.type`), the disk attachments (interface, bootable)
//!   and `GET /vms/{id}/nics` (interface, MAC, vNIC profile), so that the
//!   snapshot restores onto other platforms.
//! - A restore of a snapshot taken elsewhere (or imported) builds the
//!   oVirt side from the snapshot's spec: the disk records the new disks
//!   are created from ([`foreign_metadata`]: thin qcow2 disks enabled for
//!   incremental backup, the bus mapped to an attachment interface), and
//!   the OVF the VM is added from ([`ovf`], in the engine's own layout:
//!   `References`, `DiskSection`, `VirtualSystem` with the OS, the
//!   hardware items for CPUs, memory and NICs). What oVirt cannot take is
//!   a restore warning.

use provider_api::spec::{Bus, DiskSpec, Firmware, NicSpec};
use provider_api::{Error, GuestSpec, RestoreVmRequest, RestoreWarnings, Result};
use quick_xml::escape::escape;

use crate::api;
use crate::metadata::{DiskRecord, OvirtMetadata};
use crate::options::BackupMode;

/// The bus of an oVirt attachment interface.
fn bus_of(interface: &str) -> Bus {
    match interface {
        "virtio" => Bus::Virtio,
        "ide" => Bus::Ide,
        "sata" => Bus::Sata,
        // virtio_scsi, spapr_vscsi
        _ => Bus::Scsi,
    }
}

/// The attachment interface for a bus (oVirt has no NVMe interface).
fn interface_of(bus: Bus) -> &'static str {
    match bus {
        Bus::Virtio => "virtio",
        Bus::Ide => "ide",
        Bus::Sata => "sata",
        Bus::Scsi | Bus::Nvme => "virtio_scsi",
    }
}

/// The OVF's `ovf:disk-interface` for an attachment interface.
fn ovf_interface(interface: &str) -> &'static str {
    match interface {
        "virtio_scsi" => "VirtIO_SCSI",
        "ide" => "IDE",
        "sata" => "SATA",
        "spapr_vscsi" => "SPAPR_VSCSI",
        _ => "VirtIO",
    }
}

/// The VM of `GET /vms/{id}` with its disks and NICs as a
/// platform-neutral spec. CPUs are sockets × cores × threads (1 each when
/// absent), memory 1 GiB when absent; `q35_ovmf` and `q35_secure_boot`
/// are UEFI; a NIC's network is its vNIC profile's name (`profiles`: id →
/// name), its model the interface.
pub(crate) fn of_vm(
    vm: &api::Vm,
    disks: &[DiskRecord],
    nics: &[api::Nic],
    profiles: &[(String, String)],
) -> GuestSpec {
    let topology = vm.cpu.as_ref().and_then(|c| c.topology.clone());
    let count = |v: Option<u64>| v.filter(|n| *n > 0).unwrap_or(1);
    let cpus = topology.map_or(1, |t| count(t.sockets) * count(t.cores) * count(t.threads));
    let firmware = match vm.bios.as_ref().and_then(|b| b.kind.as_deref()) {
        Some("q35_ovmf" | "q35_secure_boot") => Firmware::Efi,
        _ => Firmware::Bios,
    };
    GuestSpec {
        name: vm.name.clone(),
        os: vm.os.as_ref().and_then(|o| o.kind.clone()),
        firmware,
        cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        memory_mib: vm
            .memory
            .map(|m| m >> 20)
            .filter(|m| *m > 0)
            .unwrap_or(1024),
        disks: disks
            .iter()
            .map(|d| DiskSpec {
                device: d.device.clone(),
                size: d.provisioned_size,
                bus: bus_of(&d.interface),
                controller: None,
                boot_order: d.bootable.then_some(0),
            })
            .collect(),
        nics: nics
            .iter()
            .map(|n| NicSpec {
                model: n.interface.clone(),
                mac: n.mac.as_ref().and_then(|m| m.address.clone()),
                network: n
                    .vnic_profile
                    .as_ref()
                    .and_then(|p| p.id.as_ref())
                    .and_then(|id| profiles.iter().find(|(i, _)| i == id))
                    .map(|(_, name)| name.clone()),
            })
            .collect(),
    }
}

/// What a restore from another platform creates on oVirt, from the
/// snapshot's spec: one disk record per stored volume (in the
/// snapshot's order; the spec's disk of the same device gives the bus
/// and the boot flag, the first volume boots when the spec names no boot
/// disk). Needs a storage domain (`storage_domain`): the snapshot names
/// none of this engine's.
pub(crate) fn foreign_metadata(
    request: &RestoreVmRequest,
    storage_domain: Option<&str>,
) -> Result<(OvirtMetadata, GuestSpec)> {
    let snapshot = &request.archive.snapshot;
    let spec = request.archive.foreign_guest_spec()?;
    let Some(storage_domain) = storage_domain else {
        return Err(Error::invalid(format!(
            "snapshot {} comes from platform {}: name the storage domain of the restored \
             disks (oVirt option storage_domain)",
            snapshot.id, snapshot.platform
        )));
    };
    if snapshot.volumes.is_empty() {
        return Err(Error::invalid(format!(
            "snapshot {} holds no volumes",
            snapshot.id
        )));
    }
    let boot_named = spec.disks.iter().any(|d| d.boot_order == Some(0));
    let mut disks = Vec::new();
    for (n, v) in snapshot.volumes.iter().enumerate() {
        let device = &v.volume.device;
        let described = spec.disks.iter().find(|d| &d.device == device);
        let bus = described.map_or(Bus::Virtio, |d| d.bus);
        if bus == Bus::Nvme {
            request.warn(format!(
                "disk {device}: oVirt has no NVMe interface, attached as virtio_scsi"
            ));
        }
        let bootable = if boot_named {
            described.is_some_and(|d| d.boot_order == Some(0))
        } else {
            n == 0
        };
        disks.push(DiskRecord {
            device: device.clone(),
            disk_id: String::new(),
            alias: format!("{}-{device}", spec.name),
            provisioned_size: v.volume.size,
            format: "cow".into(),
            sparse: true,
            backup: "incremental".into(),
            interface: interface_of(bus).into(),
            bootable,
            storage_domain: Some(storage_domain.to_owned()),
        });
    }
    let meta = OvirtMetadata {
        vm_id: snapshot.guest.0.clone(),
        vm_name: spec.name.clone(),
        mode: BackupMode::Auto,
        disks,
    };
    Ok((meta, spec))
}

/// The oVirt OS type for a spec's free-text OS: kept when it is one
/// already (a spec from oVirt), else `windows_2019x64` or `other_linux`
/// (a warning says which was assumed).
fn os_type(warnings: &RestoreWarnings, os: Option<&str>) -> String {
    let Some(os) = os.map(str::trim).filter(|o| !o.is_empty()) else {
        return "other_linux".into();
    };
    let native = os
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if native {
        return os.to_owned();
    }
    let guess = if os.to_ascii_lowercase().contains("win") {
        "windows_2019x64"
    } else {
        "other_linux"
    };
    warnings.push(format!(
        "operating system {os:?} is not an oVirt OS type: the VM is created as {guess}"
    ));
    guess.into()
}

/// The OVF's `ResourceSubType` of a NIC model (the engine's
/// `VmInterfaceType`: 1 rtl8139, 2 e1000, 3 virtio); `None` for models
/// oVirt does not emulate (virtio is used).
fn nic_type(model: Option<&str>) -> Option<u8> {
    match model.map(str::to_ascii_lowercase).as_deref() {
        None | Some("virtio" | "pv" | "virtio-net") => Some(3),
        Some("e1000") => Some(2),
        Some("rtl8139") => Some(1),
        Some(_) => None,
    }
}

/// One restored disk for [`ovf`]: its record, the new disk's id and its
/// image id.
pub(crate) struct OvfDisk<'a> {
    /// How it is attached.
    pub record: &'a DiskRecord,
    /// The disk created.
    pub disk_id: &'a str,
    /// Its image (volume) id.
    pub image_id: &'a str,
}

/// The OVF a VM restored from another platform is added from: the
/// engine's layout, the VM id `vm_id`, the restored disks, CPUs (one
/// socket), memory, firmware (`BiosType` 3, Q35 with OVMF, for UEFI), the
/// OS type, and one NIC per spec NIC on `network` (none without a
/// network: a warning says so). MAC addresses are not kept: the restored
/// VM may run beside its source, and the engine gives new ones.
pub(crate) fn ovf(
    warnings: &RestoreWarnings,
    spec: &GuestSpec,
    vm_id: &str,
    name: &str,
    disks: &[OvfDisk<'_>],
    network: Option<&str>,
) -> String {
    let mut refs = String::new();
    let mut section = String::new();
    for d in disks {
        let r = d.record;
        let gib = r.provisioned_size.div_ceil(1 << 30);
        refs.push_str(&format!(
            "<File ovf:href=\"{0}/{1}\" ovf:id=\"{1}\" ovf:size=\"{2}\" ovf:description=\"\" ovf:disk_storage_type=\"IMAGE\" ovf:cinder_volume_type=\"\"></File>",
            d.disk_id, d.image_id, r.provisioned_size
        ));
        section.push_str(&format!(
            "<Disk ovf:diskId=\"{image}\" ovf:size=\"{gib}\" ovf:actual_size=\"{gib}\" ovf:vm_snapshot_id=\"\" ovf:parentRef=\"\" ovf:fileRef=\"{disk}/{image}\" ovf:format=\"http://www.vmware.com/specifications/vmdk.html#sparse\" ovf:volume-format=\"{format}\" ovf:volume-type=\"{ty}\" ovf:disk-interface=\"{interface}\" ovf:read-only=\"false\" ovf:shareable=\"false\" ovf:boot=\"{boot}\" ovf:pass-discard=\"false\" ovf:incremental-backup=\"{incremental}\" ovf:disk-alias=\"{alias}\" ovf:disk-description=\"\" ovf:wipe-after-delete=\"false\"></Disk>",
            image = d.image_id,
            disk = d.disk_id,
            format = if r.format == "cow" { "COW" } else { "RAW" },
            ty = if r.sparse { "Sparse" } else { "Preallocated" },
            interface = ovf_interface(&r.interface),
            boot = r.bootable,
            incremental = r.backup == "incremental",
            alias = escape(r.alias.as_str()),
        ));
    }
    let mut nics = String::new();
    match network {
        Some(net) => {
            for (n, nic) in spec.nics.iter().enumerate() {
                let sub = nic_type(nic.model.as_deref()).unwrap_or_else(|| {
                    warnings.push(format!(
                        "NIC {n}: model {:?} is not emulated by oVirt, created as virtio",
                        nic.model.as_deref().unwrap_or_default()
                    ));
                    3
                });
                nics.push_str(&nic_item(n, sub, net));
            }
            if spec.nics.iter().any(|n: &NicSpec| n.mac.is_some()) {
                warnings.push(
                    "MAC addresses are not kept: the engine gives the restored NICs new ones",
                );
            }
        }
        None if !spec.nics.is_empty() => warnings.push(format!(
            "{} NIC(s) not restored: no target network given (oVirt option network)",
            spec.nics.len()
        )),
        None => {}
    }
    let bios = match spec.firmware {
        Firmware::Efi => 3,
        Firmware::Bios => 1,
    };
    let memory = spec.memory_mib;
    let cpus = spec.cpus.max(1);
    let os = os_type(warnings, spec.os.as_deref());
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ovf:Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1/\" xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ovf:version=\"4.4.0.0\"><References>{refs}</References><Section xsi:type=\"ovf:NetworkSection_Type\"><Info>List of networks</Info>{networks}</Section><Section xsi:type=\"ovf:DiskSection_Type\"><Info>List of Virtual Disks</Info>{section}</Section><Content ovf:id=\"out\" xsi:type=\"ovf:VirtualSystem_Type\"><Name>{name}</Name><TemplateId>00000000-0000-0000-0000-000000000000</TemplateId><TemplateName>Blank</TemplateName><IsAutoStartup>false</IsAutoStartup><BiosType>{bios}</BiosType><Section ovf:id=\"{vm_id}\" ovf:required=\"false\" xsi:type=\"ovf:OperatingSystemSection_Type\"><Info>Guest Operating System</Info><Description>{os}</Description></Section><Section xsi:type=\"ovf:VirtualHardwareSection_Type\"><Info>{cpus} CPU, {memory} Memory</Info><Item><rasd:Caption>{cpus} virtual cpu</rasd:Caption><rasd:Description>Number of virtual CPU</rasd:Description><rasd:InstanceId>1</rasd:InstanceId><rasd:ResourceType>3</rasd:ResourceType><rasd:num_of_sockets>1</rasd:num_of_sockets><rasd:cpu_per_socket>{cpus}</rasd:cpu_per_socket><rasd:threads_per_cpu>1</rasd:threads_per_cpu></Item><Item><rasd:Caption>{memory} MB of memory</rasd:Caption><rasd:Description>Memory Size</rasd:Description><rasd:InstanceId>2</rasd:InstanceId><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity></Item>{nics}</Section></Content></ovf:Envelope>",
        networks = network
            .map(|n| format!("<Network ovf:name=\"{}\"></Network>", escape(n)))
            .unwrap_or_default(),
        name = escape(name),
        os = escape(os.as_str()),
    )
}

/// A NIC as the engine's OVF writer writes it (`ResourceType` 10).
fn nic_item(n: usize, sub: u8, network: &str) -> String {
    let network = escape(network);
    format!(
        "<Item><rasd:Caption>Ethernet adapter on {network}</rasd:Caption><rasd:InstanceId>nic{i}</rasd:InstanceId><rasd:ResourceType>10</rasd:ResourceType><rasd:OtherResourceType>{network}</rasd:OtherResourceType><rasd:ResourceSubType>{sub}</rasd:ResourceSubType><rasd:Connection>{network}</rasd:Connection><rasd:Linked>true</rasd:Linked><rasd:Name>nic{i}</rasd:Name><rasd:ElementName>nic{i}</rasd:ElementName><rasd:MACAddress></rasd:MACAddress><Type>interface</Type><Device>bridge</Device></Item>",
        i = n + 1
    )
}
