#!/usr/bin/env python3
"""Regenerate expected.json from the *.ovf files in this directory.

Semantics (kept deliberately literal; see README.md for the per-file caveats):
  * Elements and attributes are matched by *local name*, so the OVF 0.9
    namespace, the oVirt `envelope/1/` (trailing slash) namespace and the
    OVF 2.0 `envelope/2` namespace are all handled alike.
  * Old-style sections (`<Section xsi:type="ovf:DiskSection_Type">`,
    `<Content xsi:type="ovf:VirtualSystem_Type">`) count as the modern ones.
  * name   : VirtualSystem/Name, else the VirtualSystem's ovf:id, else null.
  * cpus   : VirtualQuantity of the ResourceType 3 item (null if absent).
  * memory : VirtualQuantity of the ResourceType 4 item, converted to MiB.
    Where several items carry the same ResourceType (DeploymentOptionSection
    profiles), the one *without* an ovf:configuration attribute is used.
  * disks  : DiskSection/Disk in document order; file_href is the href of the
    References/File whose ovf:id equals the Disk's ovf:fileRef (null when the
    Disk has no fileRef or no File has that id).
  * nics   : number of hardware items (Item, EthernetPortItem, StorageItem)
    whose ResourceType is 10 in the default configuration.
  * The default configuration of a DeploymentOptionSection is the
    Configuration with ovf:default="true", else the first; an item with an
    ovf:configuration attribute belongs only to the configurations it lists
    (space-separated). Items of other configurations are left out.
  * os     : ovf:id and Description of the OperatingSystemSection.
"""
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
XSI = "{http://www.w3.org/2001/XMLSchema-instance}"

EXPORTER = {
    "govmomi-xp-multinic.ovf": "VMware VirtualCenter Server (build-233726)",
    "govmomi-VM_OVF09.ovf": "VMware Studio (OVF 0.9)",
    "govmomi-ubuntu24.10.ovf": "Canonical Ubuntu cloud-image build (VMware-style template)",
    "cot-ubuntu.2.0.ovf": "VirtualBox (OVF 2.0 export)",
    "cot-iosv.ovf": "Cisco IOSv appliance descriptor (vendor-authored, re-serialized by COT)",
    "xenadmin-sample_app.ovf": "Citrix XenCenter (XenOVF)",
    "ovirt-engine-vmOvfData.ovf": "oVirt engine (ENGINE 3.3.0.0 OVF)",
    "ovirt-engine-vmOvfData2.ovf": "virt-v2v 2.3.4 -o rhv/ovirt (oVirt-flavoured OVF)",
}


def local(tag):
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else tag


def attr(el, name):
    """Attribute by local name; prefer a namespaced one (ovf:foo) over a bare one."""
    bare = None
    for k, v in el.attrib.items():
        if local(k) == name:
            if k.startswith("{"):
                return v
            bare = v
    return bare


def is_section(el, name):
    if local(el.tag) == name:
        return True
    t = el.attrib.get(XSI + "type")
    return local(el.tag) in ("Section", "Content") and t is not None and t.split(":")[-1] == name + "_Type"


def find_all(root, name):
    return [e for e in root.iter() if is_section(e, name)]


def child(el, name):
    for c in el:
        if local(c.tag) == name:
            return c
    return None


def text(el, name):
    c = child(el, name)
    return c.text.strip() if c is not None and c.text is not None else None


UNIT_RE = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.I)
NAMED_UNITS = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 ** 2, "gigabytes": 1024 ** 3}


def unit_factor(unit):
    if unit is None:
        return 1
    m = UNIT_RE.match(unit)
    if m:
        return int(m.group(1)) ** int(m.group(2)) if m.group(1) else 1
    if unit.strip().lower() in NAMED_UNITS:
        return NAMED_UNITS[unit.strip().lower()]
    raise ValueError("unknown unit %r" % unit)


def parse(path):
    data = open(path, "rb").read()
    try:
        return ET.fromstring(data)
    except ET.ParseError:
        # xenadmin-sample_app.ovf declares encoding="utf-16" but is stored as
        # UTF-8/ASCII without BOM; parse the decoded text instead.
        return ET.fromstring(data.decode("utf-8"))


def default_configuration(root):
    configs = []
    for dos in find_all(root, "DeploymentOptionSection"):
        configs += [c for c in dos if local(c.tag) == "Configuration"]
    for c in configs:
        if attr(c, "default") == "true":
            return attr(c, "id")
    return attr(configs[0], "id") if configs else None


def hw_items(vs, default):
    out = []
    for vhs in find_all(vs, "VirtualHardwareSection"):
        out += [c for c in vhs if local(c.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    if default is None:
        return out
    return [i for i in out
            if attr(i, "configuration") is None
            or default in attr(i, "configuration").split()]


def pick(items, rtype):
    cands = [i for i in items if text(i, "ResourceType") == str(rtype)]
    if not cands:
        return None
    plain = [i for i in cands if attr(i, "configuration") is None]
    return (plain or cands)[0]


def describe(fname):
    root = parse(os.path.join(HERE, fname))
    files = {}
    for refs in find_all(root, "References"):
        for f in refs:
            if local(f.tag) == "File":
                files[attr(f, "id")] = attr(f, "href")
    disks = []
    for ds in find_all(root, "DiskSection"):
        for d in ds:
            if local(d.tag) != "Disk":
                continue
            cap = attr(d, "capacity")
            disks.append({
                "file_href": files.get(attr(d, "fileRef")) if attr(d, "fileRef") is not None else None,
                "capacity_bytes": int(cap) * unit_factor(attr(d, "capacityAllocationUnits")) if cap is not None else None,
                "format": attr(d, "format"),
            })
    vss = find_all(root, "VirtualSystem")
    vs = vss[0]
    items = hw_items(vs, default_configuration(root))
    cpu = pick(items, 3)
    mem = pick(items, 4)
    cpus = text(cpu, "VirtualQuantity") if cpu is not None else None
    memory = None
    if mem is not None and text(mem, "VirtualQuantity") is not None:
        memory = int(text(mem, "VirtualQuantity")) * unit_factor(text(mem, "AllocationUnits")) // (1024 ** 2)
    oss = find_all(vs, "OperatingSystemSection")
    os_ = None
    if oss:
        os_ = {"id": attr(oss[0], "id"), "description": text(oss[0], "Description")}
    return {
        "exporter": EXPORTER[fname],
        "name": text(vs, "Name") or attr(vs, "id"),
        "cpus": int(cpus) if cpus is not None else None,
        "memory_mib": memory,
        "disks": disks,
        "nics": sum(1 for i in items if text(i, "ResourceType") == "10"),
        "os": os_,
    }


def main():
    names = sorted(f for f in os.listdir(HERE) if f.endswith(".ovf"))
    missing = set(names) ^ set(EXPORTER)
    if missing:
        sys.exit("EXPORTER table out of sync: %s" % sorted(missing))
    out = {n: describe(n) for n in names}
    with open(os.path.join(HERE, "expected.json"), "w") as fh:
        json.dump(out, fh, indent=2, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
