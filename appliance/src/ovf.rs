//! OVF descriptors: a tolerant parser and a writer.
//!
//! The parser reads what VMware (ovftool, vSphere), VirtualBox, oVirt and
//! virt-v2v write (samples with their origin in `tests/data/ovf/`):
//!
//! - elements and attributes are matched by local name, whatever the
//!   prefix or default namespace (`ovf:capacity`, `capacity`, OVF 1 and 2
//!   envelopes alike); OVF 2's `StorageItem` and `EthernetPortItem` count
//!   as `Item`s;
//! - optional sections may be missing (no `NetworkSection`, no
//!   `OperatingSystemSection`, no CPU or memory item: defaults with a
//!   warning), sizes carry units in their programmatic (`byte * 2^30`) or
//!   informal (`MegaBytes`) notation ([`crate::units`]);
//! - hostile input is refused before it costs anything: no DTD (so no
//!   entity expansion, no external entities: the XML bombs), at most
//!   [`MAX_DESCRIPTOR`] bytes, [`MAX_DEPTH`] levels and [`MAX_ELEMENTS`]
//!   elements, only the predefined and numeric character references.
//!
//! [`Descriptor::guest`] turns a parsed descriptor into the platform-neutral
//! [`GuestSpec`] and the list of disks to import; [`write()`] does the reverse
//! for exports.

use std::collections::BTreeMap;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

use crate::error::{Error, ErrorKind, Result};
use crate::spec::{Bus, DiskSpec, Firmware, GuestSpec, NicSpec};
use crate::units;

/// Largest descriptor read (real ones are a few to a few hundred KiB).
pub const MAX_DESCRIPTOR: usize = 16 << 20;
/// Deepest element nesting accepted (real descriptors nest about 6 deep).
pub const MAX_DEPTH: usize = 64;
/// Most elements accepted.
pub const MAX_ELEMENTS: usize = 200_000;

/// `References/File`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href`: a member of the OVA or a file beside the descriptor.
    pub href: String,
    /// `ovf:size`, when given.
    pub size: Option<u64>,
    /// `ovf:compression` (`gzip`): refused on import.
    pub compression: Option<String>,
}

/// `DiskSection/Disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    /// `ovf:diskId`.
    pub disk_id: String,
    /// `ovf:fileRef`: the [`FileRef::id`] holding its content; `None` for a
    /// blank disk.
    pub file_ref: Option<String>,
    /// Virtual size in bytes (capacity times its allocation units);
    /// `None` when the descriptor does not say (the image tells).
    pub capacity: Option<u64>,
    /// `ovf:format`, a URL naming the image format.
    pub format: Option<String>,
}

/// One virtual hardware item (`Item`, `StorageItem`, `EthernetPortItem`),
/// with the fields the import uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Item {
    /// `ResourceType` (3 CPU, 4 memory, 5 IDE, 6 SCSI, 10 NIC, 14 floppy,
    /// 15/16 CD/DVD, 17 disk, 20 other storage controller such as SATA).
    pub resource_type: u32,
    /// `ResourceSubType` (controller or NIC model).
    pub resource_sub_type: Option<String>,
    /// `InstanceID`.
    pub instance_id: Option<String>,
    /// `Parent` (the controller's `InstanceID`).
    pub parent: Option<String>,
    /// `Address` (a NIC's MAC on some exporters, a controller's number).
    pub address: Option<String>,
    /// `AddressOnParent` (the unit on the controller).
    pub address_on_parent: Option<String>,
    /// `HostResource` (`ovf:/disk/vmdisk1`, `ovf:/file/file1`).
    pub host_resource: Option<String>,
    /// `Connection` (a NIC's network).
    pub connection: Option<String>,
    /// `VirtualQuantity`.
    pub virtual_quantity: Option<u64>,
    /// `AllocationUnits`.
    pub allocation_units: Option<String>,
    /// `ElementName`.
    pub element_name: Option<String>,
    /// `ovf:configuration`: the deployment options the item belongs to
    /// (space-separated); `None`: every one.
    pub configuration: Option<String>,
}

/// A parsed descriptor (the first `VirtualSystem`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Files referenced.
    pub files: Vec<FileRef>,
    /// Disks.
    pub disks: Vec<DiskDef>,
    /// Networks of `NetworkSection`.
    pub networks: Vec<String>,
    /// `VirtualSystem`'s `ovf:id`.
    pub system_id: Option<String>,
    /// `VirtualSystem/Name`.
    pub name: Option<String>,
    /// `OperatingSystemSection`'s `Description` (or its `ovf:osType`, or
    /// its numeric `ovf:id`).
    pub os: Option<String>,
    /// Firmware named by `vmw:Config key="firmware"` or VirtualBox's
    /// `Firmware type`.
    pub firmware: Option<Firmware>,
    /// Hardware items in document order, of the deployment option used
    /// ([`Descriptor::configuration`]) when the descriptor has several.
    pub items: Vec<Item>,
    /// The deployment option used (`DeploymentOptionSection`): the
    /// `Configuration` marked `ovf:default="true"`, else the first.
    pub configuration: Option<String>,
    /// How many `VirtualSystem`s the envelope has (only the first is used).
    pub systems: usize,
}

/// A disk to import: where its content is and what the guest calls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportDisk {
    /// Device name in the snapshot.
    pub device: String,
    /// The member (OVA) or file (OVF) with the content; `None` for a blank
    /// disk of `size` bytes.
    pub href: Option<String>,
    /// Virtual size the descriptor declares, if it does.
    pub size: Option<u64>,
    /// The descriptor's format URL.
    pub format: Option<String>,
}

fn malformed(context: &str, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Malformed, context, message)
}

/// Parse a descriptor.
pub fn parse(xml: &[u8]) -> Result<Descriptor> {
    parse_inner(xml).map_err(|e| e.within("OVF descriptor"))
}

/// The parser's state between events.
#[derive(Default)]
struct Parser {
    d: Descriptor,
    /// Local names of the open elements.
    stack: Vec<Vec<u8>>,
    elements: usize,
    text: String,
    item: Option<Item>,
    /// Depth of the first `VirtualSystem` while inside it.
    system_depth: Option<usize>,
    seen_envelope: bool,
    /// A `Configuration` marked default was seen.
    default_configuration: bool,
}

/// Attributes by local name (`ovf:href` and `href` alike); namespace
/// declarations left out.
fn attributes(e: &BytesStart<'_>, reader: &Reader<&[u8]>) -> Result<BTreeMap<Vec<u8>, String>> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
    let mut out = BTreeMap::new();
    for a in e.attributes() {
        let a = a.map_err(|err| malformed(&name, format!("attribute: {err}")))?;
        let key = a.key;
        if key.as_ref().starts_with(b"xmlns") {
            continue;
        }
        let value = a
            .decode_and_unescape_value(reader.decoder())
            .map_err(|err| malformed(&name, format!("attribute value: {err}")))?;
        out.entry(key.local_name().as_ref().to_vec())
            .or_insert_with(|| value.into_owned());
    }
    Ok(out)
}

fn number(context: &str, what: &str, text: &str) -> Result<u64> {
    text.trim()
        .parse()
        .map_err(|_| malformed(context, format!("{what} {text:?} is not a number")))
}

impl Parser {
    fn inside(&self, name: &[u8]) -> bool {
        self.stack.iter().any(|n| n == name)
    }

    fn in_first_system(&self) -> bool {
        self.system_depth.is_some()
    }

    fn open(&mut self, e: &BytesStart<'_>, reader: &Reader<&[u8]>) -> Result<()> {
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(Error::new(
                ErrorKind::Limit,
                "",
                format!("more than {MAX_ELEMENTS} elements"),
            ));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::Limit,
                "",
                format!("elements nested more than {MAX_DEPTH} deep"),
            ));
        }
        let mut local = e.local_name().as_ref().to_vec();
        // OVF 0.9 and oVirt: `<Section xsi:type="ovf:DiskSection_Type">`,
        // `<Content xsi:type="ovf:VirtualSystem_Type">`.
        if local == b"Section" || local == b"Content" {
            let a = attributes(e, reader)?;
            if let Some(t) = a.get(b"type".as_slice()) {
                let t = t.rsplit(':').next().unwrap_or(t);
                local = t.strip_suffix("_Type").unwrap_or(t).as_bytes().to_vec();
            }
        }
        self.text.clear();
        match local.as_slice() {
            b"Envelope" if self.stack.is_empty() => self.seen_envelope = true,
            b"File" if self.inside(b"References") => {
                let a = attributes(e, reader)?;
                let id = a.get(b"id".as_slice()).cloned().unwrap_or_default();
                let context = format!("References/File {id:?}");
                let href = a
                    .get(b"href".as_slice())
                    .cloned()
                    .ok_or_else(|| malformed(&context, "no href"))?;
                if id.is_empty() {
                    return Err(malformed(&context, "no id"));
                }
                let size = a
                    .get(b"size".as_slice())
                    .map(|s| number(&context, "size", s))
                    .transpose()?;
                self.d.files.push(FileRef {
                    id,
                    href,
                    size,
                    compression: a
                        .get(b"compression".as_slice())
                        .filter(|c| !c.is_empty() && *c != "identity")
                        .cloned(),
                });
            }
            b"Disk" if self.inside(b"DiskSection") || self.inside(b"VirtualDiskDesc") => {
                let a = attributes(e, reader)?;
                let disk_id = a.get(b"diskId".as_slice()).cloned().unwrap_or_default();
                let context = format!("DiskSection/Disk {disk_id:?}");
                if disk_id.is_empty() {
                    return Err(malformed(&context, "no diskId"));
                }
                let capacity = match a.get(b"capacity".as_slice()) {
                    None => None,
                    Some(capacity) => {
                        let quantity = number(&context, "capacity", capacity)?;
                        let unit = a.get(b"capacityAllocationUnits".as_slice());
                        Some(units::bytes(quantity, unit.map(String::as_str)).ok_or_else(|| {
                            malformed(
                                &context,
                                format!(
                                    "capacity {quantity} in units {:?} is not understood or too large",
                                    unit.map(String::as_str).unwrap_or("byte")
                                ),
                            )
                        })?)
                    }
                };
                self.d.disks.push(DiskDef {
                    disk_id,
                    file_ref: a
                        .get(b"fileRef".as_slice())
                        .filter(|f| !f.is_empty())
                        .cloned(),
                    capacity,
                    format: a.get(b"format".as_slice()).cloned(),
                });
            }
            b"Network" if self.inside(b"NetworkSection") => {
                let a = attributes(e, reader)?;
                if let Some(name) = a.get(b"name".as_slice()) {
                    self.d.networks.push(name.clone());
                }
            }
            b"VirtualSystem" => {
                self.d.systems += 1;
                if self.d.systems == 1 {
                    self.system_depth = Some(self.stack.len());
                    let a = attributes(e, reader)?;
                    self.d.system_id = a.get(b"id".as_slice()).cloned();
                }
            }
            b"OperatingSystemSection" if self.in_first_system() => {
                let a = attributes(e, reader)?;
                if self.d.os.is_none() {
                    self.d.os = a
                        .get(b"osType".as_slice())
                        .or_else(|| a.get(b"id".as_slice()))
                        .cloned();
                }
            }
            b"Item" | b"StorageItem" | b"EthernetPortItem"
                if self.in_first_system() && self.inside(b"VirtualHardwareSection") =>
            {
                let a = attributes(e, reader)?;
                self.item = Some(Item {
                    configuration: a.get(b"configuration".as_slice()).cloned(),
                    ..Item::default()
                });
            }
            b"Configuration" if self.inside(b"DeploymentOptionSection") => {
                let a = attributes(e, reader)?;
                if let Some(id) = a.get(b"id".as_slice()) {
                    let default = a.get(b"default".as_slice()).is_some_and(|d| d == "true");
                    if default && !self.default_configuration {
                        self.d.configuration = Some(id.clone());
                        self.default_configuration = true;
                    } else if self.d.configuration.is_none() {
                        self.d.configuration = Some(id.clone());
                    }
                }
            }
            b"Config" if self.in_first_system() => {
                let a = attributes(e, reader)?;
                if a.get(b"key".as_slice()).map(String::as_str) == Some("firmware") {
                    self.d.firmware = match a.get(b"value".as_slice()).map(String::as_str) {
                        Some("efi") => Some(Firmware::Efi),
                        Some("bios") => Some(Firmware::Bios),
                        _ => self.d.firmware,
                    };
                }
            }
            b"Firmware" if self.in_first_system() => {
                let a = attributes(e, reader)?;
                if let Some(t) = a.get(b"type".as_slice()) {
                    self.d.firmware = Some(if t.to_ascii_uppercase().starts_with("EFI") {
                        Firmware::Efi
                    } else {
                        Firmware::Bios
                    });
                }
            }
            _ => {}
        }
        self.stack.push(local);
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let Some(local) = self.stack.pop() else {
            return Ok(());
        };
        let text = std::mem::take(&mut self.text);
        let value = text.trim();
        let depth = self.stack.len();
        if let Some(item) = &mut self.item {
            let context = "VirtualHardwareSection/Item";
            let set = |v: &str| (!v.is_empty()).then(|| v.to_owned());
            match local.as_slice() {
                b"Item" | b"StorageItem" | b"EthernetPortItem" => {
                    if let Some(item) = self.item.take() {
                        self.d.items.push(item);
                    }
                }
                b"ResourceType" => {
                    item.resource_type = u32::try_from(number(context, "ResourceType", value)?)
                        .map_err(|_| malformed(context, "ResourceType out of range"))?;
                }
                b"ResourceSubType" => item.resource_sub_type = set(value),
                b"InstanceID" | b"InstanceId" => item.instance_id = set(value),
                b"Parent" => item.parent = set(value),
                b"Address" => item.address = set(value),
                b"AddressOnParent" => item.address_on_parent = set(value),
                b"HostResource" => item.host_resource = set(value),
                b"Connection" => item.connection = set(value),
                b"VirtualQuantity" if !value.is_empty() => {
                    item.virtual_quantity = Some(number(context, "VirtualQuantity", value)?);
                }
                b"AllocationUnits" => item.allocation_units = set(value),
                b"ElementName" => item.element_name = set(value),
                _ => {}
            }
        } else if let Some(system) = self.system_depth {
            match local.as_slice() {
                b"VirtualSystem" if depth == system => self.system_depth = None,
                b"Name" if depth == system + 1 && !value.is_empty() => {
                    self.d.name = Some(value.to_owned());
                }
                b"Description" if self.inside(b"OperatingSystemSection") && !value.is_empty() => {
                    self.d.os = Some(value.to_owned());
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn parse_inner(xml: &[u8]) -> Result<Descriptor> {
    if xml.len() > MAX_DESCRIPTOR {
        return Err(Error::new(
            ErrorKind::Limit,
            "",
            format!(
                "{} bytes, more than the {MAX_DESCRIPTOR} accepted",
                xml.len()
            ),
        ));
    }
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().check_end_names = true;
    let mut p = Parser::default();
    loop {
        let pos = reader.buffer_position();
        let at = format!("byte {pos}");
        let event = reader
            .read_event()
            .map_err(|e| malformed(&at, e.to_string()))?;
        match event {
            Event::DocType(_) => {
                return Err(Error::new(
                    ErrorKind::Refused,
                    at,
                    "a DOCTYPE (DTD) is not accepted in an OVF descriptor (entity expansion, external entities)",
                ));
            }
            Event::Start(e) => p.open(&e, &reader)?,
            Event::Empty(e) => {
                p.open(&e, &reader)?;
                p.close()?;
            }
            Event::End(_) => p.close()?,
            Event::Text(t) => {
                let t = t.decode().map_err(|e| malformed(&at, e.to_string()))?;
                p.text.push_str(&t);
            }
            Event::CData(t) => {
                let t = t.decode().map_err(|e| malformed(&at, e.to_string()))?;
                p.text.push_str(&t);
            }
            Event::GeneralRef(r) => {
                if let Some(c) = r
                    .resolve_char_ref()
                    .map_err(|e| malformed(&at, e.to_string()))?
                {
                    p.text.push(c);
                } else {
                    let name = r.decode().map_err(|e| malformed(&at, e.to_string()))?;
                    let value =
                        quick_xml::escape::resolve_predefined_entity(&name).ok_or_else(|| {
                            Error::new(
                                ErrorKind::Refused,
                                at.clone(),
                                format!("entity &{name}; is not defined (no DTD is accepted)"),
                            )
                        })?;
                    p.text.push_str(value);
                }
            }
            Event::Eof => break,
            _ => {}
        }
        if p.text.len() > MAX_DESCRIPTOR {
            return Err(Error::new(ErrorKind::Limit, at, "text too long"));
        }
    }
    if !p.seen_envelope {
        return Err(malformed(
            "",
            "no Envelope element at the top: not an OVF descriptor",
        ));
    }
    if p.d.systems == 0 {
        return Err(Error::new(
            ErrorKind::Missing,
            "",
            "no VirtualSystem: nothing to import",
        ));
    }
    // Only the items of the deployment option used: the others describe
    // other sizes of the same appliance.
    if let Some(chosen) = p.d.configuration.clone() {
        p.d.items.retain(|i| {
            i.configuration
                .as_deref()
                .is_none_or(|c| c.split_whitespace().any(|id| id == chosen))
        });
    }
    Ok(p.d)
}

/// The target of a `HostResource`: `("disk", id)` or `("file", id)`.
fn host_resource(text: &str) -> Option<(&str, &str)> {
    let t = text.strip_prefix("ovf:").unwrap_or(text);
    let t = t.trim_start_matches('/');
    let (kind, id) = t.split_once('/')?;
    (!id.is_empty()).then_some((kind, id))
}

fn controller(item: &Item) -> Option<(Bus, Option<String>)> {
    let sub = item.resource_sub_type.clone();
    let lower = sub.as_deref().unwrap_or("").to_ascii_lowercase();
    match item.resource_type {
        5 => Some((Bus::Ide, sub)),
        6 => Some((Bus::Scsi, sub)),
        20 if lower.contains("nvme") => Some((Bus::Nvme, sub)),
        20 => Some((Bus::Sata, sub)),
        _ => None,
    }
}

fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Descriptor {
    /// The guest this descriptor describes and the disks to import, in
    /// device order, with warnings for what was assumed or left out.
    /// `fallback_name` names a guest the descriptor does not name.
    pub fn guest(&self, fallback_name: &str) -> Result<(GuestSpec, Vec<ImportDisk>, Vec<String>)> {
        let mut warnings = Vec::new();
        if let Some(c) = &self.configuration {
            warnings.push(format!(
                "deployment option {c:?} used (the descriptor's default): the hardware of its other options is left out"
            ));
        }
        if self.systems > 1 {
            warnings.push(format!(
                "the descriptor holds {} virtual systems; only the first is imported",
                self.systems
            ));
        }
        let name = self
            .name
            .clone()
            .or_else(|| self.system_id.clone())
            .unwrap_or_else(|| fallback_name.to_owned());
        let of_type = |t: u32| self.items.iter().filter(move |i| i.resource_type == t);
        let cpus = match of_type(3).next().and_then(|i| i.virtual_quantity) {
            Some(n) if n >= 1 => {
                u32::try_from(n).map_err(|_| malformed("CPU item", format!("{n} virtual CPUs")))?
            }
            _ => {
                warnings.push("no CPU count in the descriptor: 1 virtual CPU".to_owned());
                1
            }
        };
        let memory_mib = match of_type(4).next() {
            Some(Item {
                virtual_quantity: Some(q),
                allocation_units,
                ..
            }) => {
                let unit = allocation_units.as_deref().unwrap_or("byte * 2^20");
                match units::bytes(*q, Some(unit)) {
                    Some(b) if b > 0 => b.div_ceil(1 << 20),
                    _ => {
                        return Err(malformed(
                            "memory item",
                            format!("{q} in units {unit:?} is not understood"),
                        ));
                    }
                }
            }
            _ => {
                warnings.push("no memory size in the descriptor: 1024 MiB".to_owned());
                1024
            }
        };
        let controllers: BTreeMap<&str, (Bus, Option<String>)> = self
            .items
            .iter()
            .filter_map(|i| Some((i.instance_id.as_deref()?, controller(i)?)))
            .collect();
        let files: BTreeMap<&str, &FileRef> =
            self.files.iter().map(|f| (f.id.as_str(), f)).collect();
        let disks: BTreeMap<&str, &DiskDef> =
            self.disks.iter().map(|d| (d.disk_id.as_str(), d)).collect();
        let mut used = std::collections::BTreeSet::new();
        let mut specs = Vec::new();
        let mut imports = Vec::new();
        let add = |def: &DiskDef,
                   bus: Bus,
                   model: Option<String>,
                   specs: &mut Vec<DiskSpec>,
                   imports: &mut Vec<ImportDisk>|
         -> Result<()> {
            let context = format!("Disk {:?}", def.disk_id);
            if def.capacity == Some(0) {
                return Err(malformed(&context, "capacity 0"));
            }
            let href = match &def.file_ref {
                None if def.capacity.is_none() => {
                    return Err(malformed(
                        &context,
                        "a blank disk (no fileRef) without a capacity",
                    ));
                }
                None => None,
                Some(id) => {
                    // oVirt writes the file's href where its id belongs.
                    let by_href = || self.files.iter().find(|f| &f.href == id);
                    let f = files
                        .get(id.as_str())
                        .copied()
                        .or_else(by_href)
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Missing,
                                &context,
                                format!("fileRef {id:?} is not in References"),
                            )
                        })?;
                    if let Some(c) = &f.compression {
                        return Err(Error::new(
                            ErrorKind::Refused,
                            &context,
                            format!(
                                "file {:?} is {c}-compressed; export the appliance without compression",
                                f.href
                            ),
                        ));
                    }
                    Some(f.href.clone())
                }
            };
            let device = format!("disk{}", specs.len());
            specs.push(DiskSpec {
                device: device.clone(),
                size: def.capacity.unwrap_or(0),
                bus,
                controller: model,
                boot_order: None,
            });
            imports.push(ImportDisk {
                device,
                href,
                size: def.capacity,
                format: def.format.clone(),
            });
            Ok(())
        };
        for item in &self.items {
            let Some(resource) = item.host_resource.as_deref() else {
                continue;
            };
            match item.resource_type {
                // 19 (storage extent): XenCenter's disks.
                17 | 19 => {}
                14..=16 => {
                    warnings.push(format!(
                        "{} ({resource}) is a removable drive: not imported",
                        item.element_name
                            .as_deref()
                            .unwrap_or("a CD/DVD or floppy drive")
                    ));
                    continue;
                }
                _ => continue,
            }
            let context = format!(
                "disk item {:?}",
                item.element_name.as_deref().unwrap_or(resource)
            );
            // `ovf:/disk/ID` as the standard says; oVirt writes
            // `GROUP/ID`, XenCenter other paths: the last component names
            // the disk when it is one.
            let id = match host_resource(resource) {
                Some(("disk", id)) => id,
                _ => resource.rsplit('/').next().unwrap_or(resource),
            };
            let Some(def) = disks.get(id).copied() else {
                if host_resource(resource).is_some_and(|(kind, _)| kind == "disk") {
                    return Err(Error::new(
                        ErrorKind::Missing,
                        &context,
                        format!("disk {id:?} is not in the DiskSection"),
                    ));
                }
                continue;
            };
            if !used.insert(def.disk_id.clone()) {
                return Err(malformed(
                    &context,
                    format!("disk {:?} is attached twice", def.disk_id),
                ));
            }
            let (bus, model) = match item.parent.as_deref().and_then(|p| controllers.get(p)) {
                Some((bus, model)) => (*bus, model.clone()),
                None => {
                    warnings.push(format!(
                        "{context}: no controller found for it; SCSI assumed"
                    ));
                    (Bus::Scsi, None)
                }
            };
            add(def, bus, model, &mut specs, &mut imports)?;
        }
        for def in &self.disks {
            if !used.contains(&def.disk_id) {
                warnings.push(format!(
                    "disk {:?} is not attached to any controller; imported on SCSI",
                    def.disk_id
                ));
                add(def, Bus::Scsi, None, &mut specs, &mut imports)?;
            }
        }
        if let Some(first) = specs.first_mut() {
            first.boot_order = Some(0);
        }
        let nics = of_type(10)
            .map(|i| NicSpec {
                model: i.resource_sub_type.clone(),
                mac: i.address.clone().filter(|a| is_mac(a)),
                network: i.connection.clone(),
            })
            .collect();
        Ok((
            GuestSpec {
                name,
                os: self.os.clone(),
                firmware: self.firmware.unwrap_or_default(),
                cpus,
                memory_mib,
                disks: specs,
                nics,
            },
            imports,
            warnings,
        ))
    }
}

/// A disk of an export: its spec and the file that will hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDisk {
    /// The disk.
    pub spec: DiskSpec,
    /// Member name in the OVA (`<guest>-disk0.vmdk`).
    pub href: String,
    /// Size of that file in bytes.
    pub file_size: u64,
}

fn esc(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

/// An OVF 1.0 descriptor for `guest` with `disks` as streamOptimized VMDK
/// files (the format VMware, VirtualBox, oVirt and Proxmox import).
pub fn write(guest: &GuestSpec, disks: &[ExportDisk]) -> String {
    use std::fmt::Write;
    let mut x = String::new();
    let name = esc(&guest.name);
    // Writing into a String cannot fail.
    let _ = write!(
        x,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="1.0">
  <References>
"#
    );
    for (n, d) in disks.iter().enumerate() {
        let _ = writeln!(
            x,
            r#"    <File ovf:id="file{n}" ovf:href="{}" ovf:size="{}"/>"#,
            esc(&d.href),
            d.file_size
        );
    }
    let _ = writeln!(
        x,
        "  </References>\n  <DiskSection>\n    <Info>Virtual disks</Info>"
    );
    for (n, d) in disks.iter().enumerate() {
        let _ = writeln!(
            x,
            r#"    <Disk ovf:diskId="vmdisk{n}" ovf:fileRef="file{n}" ovf:capacity="{}" ovf:capacityAllocationUnits="byte" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>"#,
            d.spec.size
        );
    }
    let _ = writeln!(
        x,
        "  </DiskSection>\n  <NetworkSection>\n    <Info>Networks</Info>"
    );
    let mut networks: Vec<&str> = guest
        .nics
        .iter()
        .map(|n| n.network.as_deref().unwrap_or("default"))
        .collect();
    networks.sort_unstable();
    networks.dedup();
    for net in &networks {
        let _ = writeln!(
            x,
            r#"    <Network ovf:name="{}"><Description>{}</Description></Network>"#,
            esc(net),
            esc(net)
        );
    }
    let _ = writeln!(
        x,
        r#"  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine exported by vmbackup</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="1">
      <Info>Guest operating system</Info>
      <Description>{}</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-10</vssd:VirtualSystemType>
      </System>"#,
        esc(guest.os.as_deref().unwrap_or("Other"))
    );
    let mut id = 0u32;
    let mut item = |x: &mut String, fields: &[(&str, String)]| -> u32 {
        id += 1;
        let _ = writeln!(x, "      <Item>");
        for (k, v) in fields {
            let _ = writeln!(x, "        <rasd:{k}>{}</rasd:{k}>", esc(v));
        }
        let _ = writeln!(x, "        <rasd:InstanceID>{id}</rasd:InstanceID>");
        let _ = writeln!(x, "      </Item>");
        id
    };
    item(
        &mut x,
        &[
            ("AllocationUnits", "hertz * 10^6".into()),
            ("ElementName", format!("{} virtual CPU(s)", guest.cpus)),
            ("ResourceType", "3".into()),
            ("VirtualQuantity", guest.cpus.to_string()),
        ],
    );
    item(
        &mut x,
        &[
            ("AllocationUnits", "byte * 2^20".into()),
            ("ElementName", format!("{} MB of memory", guest.memory_mib)),
            ("ResourceType", "4".into()),
            ("VirtualQuantity", guest.memory_mib.to_string()),
        ],
    );
    // One controller per bus used, disks numbered on it in order.
    let mut controllers: BTreeMap<&'static str, (u32, u32)> = BTreeMap::new();
    for (n, d) in disks.iter().enumerate() {
        let (key, rtype, sub) = match d.spec.bus {
            Bus::Ide => ("ide", "5", "PIIX4"),
            Bus::Sata => ("sata", "20", "vmware.sata.ahci"),
            Bus::Nvme => ("nvme", "20", "vmware.nvme.controller"),
            Bus::Scsi | Bus::Virtio => ("scsi", "6", "lsilogic"),
        };
        let (parent, unit) = match controllers.get(key) {
            Some(c) => *c,
            None => {
                let n = controllers.len();
                let parent = item(
                    &mut x,
                    &[
                        ("Address", n.to_string()),
                        ("ElementName", format!("{key} controller {n}")),
                        ("ResourceSubType", sub.into()),
                        ("ResourceType", rtype.into()),
                    ],
                );
                (parent, 0)
            }
        };
        controllers.insert(key, (parent, unit + 1));
        item(
            &mut x,
            &[
                ("AddressOnParent", unit.to_string()),
                ("ElementName", d.spec.device.clone()),
                ("HostResource", format!("ovf:/disk/vmdisk{n}")),
                ("Parent", parent.to_string()),
                ("ResourceType", "17".into()),
            ],
        );
    }
    for (n, nic) in guest.nics.iter().enumerate() {
        let mut fields = Vec::new();
        if let Some(mac) = &nic.mac {
            fields.push(("Address", mac.clone()));
        }
        fields.push(("AddressOnParent", (7 + n).to_string()));
        fields.push(("AutomaticAllocation", "true".into()));
        fields.push((
            "Connection",
            nic.network.clone().unwrap_or_else(|| "default".into()),
        ));
        fields.push(("ElementName", format!("Network adapter {}", n + 1)));
        fields.push((
            "ResourceSubType",
            nic.model.clone().unwrap_or_else(|| "E1000".into()),
        ));
        fields.push(("ResourceType", "10".into()));
        item(&mut x, &fields);
    }
    if guest.firmware == Firmware::Efi {
        let _ = writeln!(
            x,
            r#"      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>"#
        );
    }
    let _ = writeln!(
        x,
        "    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>"
    );
    x
}
