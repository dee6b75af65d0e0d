#!/usr/bin/env python3
"""OVA import: `vmbackup import` of a 2 GiB appliance against `qemu-img
convert` of the same VMDK to raw, in one run.

    cargo build --release -p cli && python3 bench/ova.py [--size-gib 2] [--rounds 3]

The appliance: a mixed disk (a third random, a third text, a third zero;
bench.py's image) as a streamOptimized VMDK in an OVA with a SHA-256
manifest. Each round, in rotating order: `vmbackup import` into a fresh
local datastore (reads the VMDK member in place through qemu-nbd, checks
the manifest, stores deduplicated compressed chunks), and `qemu-img
convert -O raw` of the same VMDK (already extracted: the peer is spared the
tar) into a fresh file. Reported: median seconds, peak RSS, and the ratio.
Both decompress the same VMDK; vmbackup also hashes the member for the
manifest and hashes, compresses and writes chunks. Not run in CI.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import VMBACKUP, make_image, timed  # noqa: E402

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="f1" ovf:href="disk1.vmdk"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="{size}" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <VirtualSystem ovf:id="bench"><Info>vm</Info><Name>bench</Name>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/d1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit("build first: cargo build --release -p cli")
    work = a.workdir or tempfile.mkdtemp(prefix="vmbackup-bench-ova-")
    os.makedirs(work, exist_ok=True)
    size = int(a.size_gib * (1 << 30)) // (1 << 20) * (1 << 20)
    raw = os.path.join(work, "src.raw")
    src = os.path.join(work, "src")
    os.makedirs(src, exist_ok=True)
    make_image(raw, size)
    vmdk = os.path.join(src, "disk1.vmdk")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", raw, vmdk], check=True)
    with open(os.path.join(src, "vm.ovf"), "w") as f:
        f.write(OVF.format(size=size))
    with open(os.path.join(src, "vm.mf"), "w") as f:
        for n in ("vm.ovf", "disk1.vmdk"):
            f.write(f"SHA256({n})= {sha256(os.path.join(src, n))}\n")
    ova = os.path.join(work, "bench.ova")
    subprocess.run(["tar", "-C", src, "-cf", ova, "--format=ustar",
                    "vm.ovf", "vm.mf", "disk1.vmdk"], check=True)
    want = sha256(raw)
    os.unlink(raw)
    print(f"appliance: {size >> 20} MiB disk, VMDK {os.path.getsize(vmdk) >> 20} MiB, "
          f"OVA {os.path.getsize(ova) >> 20} MiB")

    def ours():
        store = os.path.join(work, "store")
        shutil.rmtree(store, ignore_errors=True)
        return timed([VMBACKUP, "import", "--id", "bench", "-d", store, ova])

    def peer():
        out = os.path.join(work, "peer.raw")
        if os.path.exists(out):
            os.unlink(out)
        r = timed(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", vmdk, out])
        os.unlink(out)
        return r

    tools = [("vmbackup import", ours), ("qemu-img convert", peer)]
    results = {n: [] for n, _ in tools}
    for r in range(a.rounds):
        order = tools[r % 2:] + tools[:r % 2]
        for name, fn in order:
            secs, rss, _ = fn()
            results[name].append((secs, rss))
            print(f"round {r + 1}: {name}: {secs:.2f} s, {rss:.0f} MiB")
    # The import restores to the source's bytes.
    store = os.path.join(work, "store")
    snaps = subprocess.run([VMBACKUP, "--json", "list", "-d", store], check=True,
                           capture_output=True, text=True).stdout
    import json
    snap = json.loads(snaps)[-1]["id"]
    out = os.path.join(work, "restored")
    os.makedirs(out, exist_ok=True)
    subprocess.run([VMBACKUP, "restore", snap, "--name", "r", "--to", out, "-d", store],
                   check=True, capture_output=True)
    got = sha256(os.path.join(out, "r.raw"))
    assert got == want, f"restored {got} != source {want}"
    med = {n: statistics.median(s for s, _ in v) for n, v in results.items()}
    rss = {n: max(m for _, m in v) for n, v in results.items()}
    for n in med:
        print(f"{n:>18}: median {med[n]:.2f} s, peak RSS {rss[n]:.0f} MiB, "
              f"{size / med[n] / (1 << 20):.0f} MiB/s of disk")
    print(f"ratio vmbackup import / qemu-img convert: "
          f"{med['vmbackup import'] / med['qemu-img convert']:.2f}x (restored bytes identical)")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
