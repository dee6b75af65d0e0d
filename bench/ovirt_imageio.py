#!/usr/bin/env python3
"""oVirt data path: vmbackup's provider vs the ovirt-imageio client, in one run.

    cargo build --release -p cli && bash scripts/pyenv && \\
        python3 bench/ovirt_imageio.py [--size-gib 2]

Starts the release `vmbackup mock` (the oVirt engine and its image server
over HTTPS), creates a VM with one cow disk of --size-gib (a third random,
a third text-like, a third never written), then, each against a fresh full
backup of the same disk:

  imageio client    the SDK's own example `backup_vm.py full` (start backup,
                    image transfer, `ovirt_imageio.client.download` with its
                    default 4 workers into a local qcow2, finalize, stop)
  vmbackup backup   the oVirt provider (backup, image transfer, ranged GETs
                    streamed into the data mover: hash, compress, dedup)

Reported: wall time, MiB/s of the disk's size, peak RSS of the measured
process (wait4), and the ratio ours / imageio. While vmbackup runs, the
largest file under its TMPDIR and the provider's work directories is
sampled: the provider stages nothing, so it stays below one chunk. Not
run in CI (absolute times on shared 2-core machines drift; the ratio much
less).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

from measure import run_measured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBACKUP = os.environ.get("VMBACKUP", os.path.join(ROOT, "target", "release", "vmbackup"))
PYTHON = os.path.join(ROOT, "target", "pyenv", "bin", "python")
EXAMPLES = os.path.join(ROOT, "tests", "python", "ovirt")
MIB = 1 << 20


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    for tool in (VMBACKUP, PYTHON):
        if not os.path.exists(tool):
            sys.exit(f"missing {tool}: cargo build --release -p cli; bash scripts/pyenv")
    size = int(args.size_gib * (1 << 30)) // MIB * MIB
    work = args.workdir or tempfile.mkdtemp(prefix="ovirt-bench-")
    os.makedirs(work, exist_ok=True)
    mock = subprocess.Popen(
        [VMBACKUP, "mock", "--state-dir", os.path.join(work, "mock"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        ep = json.loads(mock.stdout.readline())
        ov = ep["ovirt"]
        third = size // 3 // MIB * MIB
        post(ep["admin_url"] + "/ovirt/vms", {"name": "backup-appliance", "appliance": True})
        vm = post(
            ep["admin_url"] + "/ovirt/vms",
            {
                "name": "bench-vm",
                "disks": [
                    {
                        "size": size,
                        "fill": [
                            {"offset": 0, "length": third, "pattern": "random", "seed": 1},
                            {"offset": third, "length": third, "pattern": "text", "seed": 2},
                        ],
                    }
                ],
            },
        )
        vm_id = vm["id"]

        # The peer: the SDK's example with ovirt-imageio's client.
        home = os.path.join(work, "home")
        os.makedirs(os.path.join(home, ".config"), exist_ok=True)
        with open(os.path.join(home, ".config", "ovirt.conf"), "w") as f:
            f.write(
                f"[mock]\nengine_url = {ov['engine_url']}\nusername = {ov['username']}\n"
                f"password = {ov['password']}\ncafile = {ov['ca_file']}\n"
            )
        backups = os.path.join(work, "imageio-backups")
        os.makedirs(backups, exist_ok=True)
        env = dict(os.environ, HOME=home)
        peer_secs, peer_rss, _, _ = run_measured(
            [
                PYTHON,
                os.path.join(EXAMPLES, "run_example.py"),
                os.path.join(work, "imageio-work"),
                "backup_vm.py",
                "-c",
                "mock",
                "full",
                vm_id,
                "--backup-dir",
                backups,
            ],
            env=env,
        )
        shutil.rmtree(backups, ignore_errors=True)

        # Ours.
        config = os.path.join(work, "vmbackup.toml")
        store = os.path.join(work, "datastore")
        with open(config, "w") as f:
            f.write(
                f'datastore = "{store}"\n\n[platforms.engine]\nkind = "ovirt"\n'
                f'endpoint = "{ov["base_url"]}"\nusername = "{ov["username"]}"\n'
                f'password = "{ov["password"]}"\nappliance = "backup-appliance"\n'
                f'tls_ca = "{ov["ca_file"]}"\ndevice_root = "{ov["device_root"]}"\n'
            )
        tmp = os.path.join(work, "tmp")
        os.makedirs(tmp, exist_ok=True)
        ours_secs, ours_rss, largest, _ = run_measured(
            [VMBACKUP, "--config", config, "backup", "--platform", "engine", "--guest", vm_id],
            watch=[tmp],
            env=dict(os.environ, TMPDIR=tmp),
        )
    finally:
        mock.terminate()
        mock.wait()

    mib = size / MIB
    print(f"oVirt full backup of a {mib:.0f} MiB disk through the image server")
    print(f"{'':22} {'time':>8} {'MiB/s':>8} {'peak RSS':>10}")
    print(f"{'imageio client':22} {peer_secs:7.2f}s {mib / peer_secs:8.0f} {peer_rss:8.0f} MiB")
    print(f"{'vmbackup backup':22} {ours_secs:7.2f}s {mib / ours_secs:8.0f} {ours_rss:8.0f} MiB")
    print(f"ratio ours/imageio: {peer_secs / ours_secs:.2f}x; largest temporary file: {largest / MIB:.1f} MiB")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
