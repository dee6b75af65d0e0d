#!/usr/bin/env python3
"""ZStack data path: vmbackup's streaming backup vs curl on an export, in one run.

    cargo build --release -p cli && python3 bench/zstack_curl.py [--size-gib 2]

Starts the release `vmbackup mock` (ZStack's REST API and its image store),
makes a data volume template of --size-gib on the backup storage (a third
random, a third text-like, a third zeroes) and a VM whose data volume holds
the same bytes, then:

  curl              ExportImageFromBackupStorage of the template (REST,
                    not timed), then `curl -o /dev/null` of its imageUrl
  curl | md5sum     the same, piped into md5sum: the least work a client
                    that checks the export's md5 does
  vmbackup backup   the ZStack provider on the VM: snapshot, template,
                    export, ranged GETs streamed into the data mover (hash,
                    compress, dedup, md5 checked), cleanup

Reported: wall time, MiB/s of the data volume, peak RSS of the measured
process (wait4), the ratio ours / curl, and the largest file seen in the
provider's work directory while it runs (nothing is staged). The whole
backup includes the platform's own work (snapshot, template, export, and
their cleanup), which the mock emulates by copying and hashing the image
as an image store does; the data phase (from the engine's guest log: the
data volume's first to last byte) is the part comparable with curl, and
the same bytes backed up from a local file through qemu-nbd give our
pipeline's own ceiling (hash, compress, store) on this machine. Not run in
CI: absolute times on shared 2-core machines drift, the ratio much less.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from measure import run_measured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBACKUP = os.environ.get("VMBACKUP", os.path.join(ROOT, "target", "release", "vmbackup"))
MIB = 1 << 20


def stamp(line):
    """Seconds of a log line's RFC 3339 timestamp (same day)."""
    t = line.split()[0].rstrip("Z").split("T")[1]
    h, m, sec = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def data_phase(log, volume):
    """Seconds the data mover spent on `volume`, from the engine's guest log."""
    start = end = None
    for line in log.splitlines():
        if f"volume {volume}: " in line and "bitmap mode" in line:
            start = stamp(line)
        if f"volume {volume}: read " in line:
            end = stamp(line)
    return end - start if start is not None and end is not None else float("nan")


def call(method, url, body=None, session=None):
    headers = {"Content-Type": "application/json"}
    if session:
        headers["Authorization"] = f"OAuth {session}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req) as r:
        status, v = r.status, json.loads(r.read() or b"{}")
    # Asynchronous calls answer 202 {"location"}: poll it until 200.
    while status == 202:
        time.sleep(0.05)
        req = urllib.request.Request(v["location"], headers=headers)
        with urllib.request.urlopen(req) as r:
            status, v = r.status, json.loads(r.read() or b"{}")
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit(f"missing {VMBACKUP}: cargo build --release -p cli")
    if not shutil.which("curl"):
        sys.exit("missing curl")
    size = int(args.size_gib * (1 << 30)) // MIB * MIB
    third = size // 3 // MIB * MIB
    fill = [
        {"offset": 0, "length": third, "pattern": "random", "seed": 1},
        {"offset": third, "length": third, "pattern": "text", "seed": 2},
        {"offset": 2 * third, "length": size - 2 * third, "pattern": "zero"},
    ]
    work = args.workdir or tempfile.mkdtemp(prefix="zstack-bench-")
    os.makedirs(work, exist_ok=True)
    mock = subprocess.Popen(
        [VMBACKUP, "mock", "--state-dir", os.path.join(work, "mock"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        ep = json.loads(mock.stdout.readline())
        zs = ep["zstack"]
        admin = ep["admin_url"] + "/zstack"
        root = call("POST", admin + "/images", {"name": "bench-root", "size": 64 * MIB})
        tmpl = call(
            "POST",
            admin + "/images",
            {"name": "bench-data", "size": size, "fill": fill, "media_type": "DataVolumeTemplate"},
        )
        vm = call(
            "POST",
            admin + "/vms",
            {"name": "bench-vm", "image_uuid": root["uuid"], "data": [{"size": size, "fill": fill}]},
        )

        # The peer: curl on an export of the same bytes.
        base = zs["base_url"]
        pw = hashlib.sha512(zs["password"].encode()).hexdigest()
        session = call(
            "PUT", base + "/v1/accounts/login", {"logInByAccount": {"accountName": zs["account"], "password": pw}}
        )["inventory"]["uuid"]
        bs = call("GET", base + "/v1/backup-storage", session=session)["inventories"][0]["uuid"]
        export = call(
            "PUT",
            f"{base}/v1/backup-storage/{bs}/actions",
            {"exportImageFromBackupStorage": {"imageUuid": tmpl["uuid"], "exportFormat": "raw"}},
            session=session,
        )
        url = export.get("inventory", export)["imageUrl"]
        curl_secs, curl_rss, _, _ = run_measured(["curl", "-sSf", "-o", "/dev/null", url])
        # The least a client that checks exportMd5Sum does: curl into md5sum.
        md5_secs, _, _, _ = run_measured(["sh", "-c", f"curl -sSf '{url}' | md5sum >/dev/null"])

        # Our own ceiling: the same bytes from a local file through qemu-nbd.
        raw = os.path.join(work, "export.raw")
        subprocess.run(["curl", "-sSf", "-o", raw, url], check=True)
        sock = os.path.join(work, "nbd.sock")
        nbd = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", sock, "-t", raw])
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        try:
            nbd_secs, _, _, _ = run_measured(
                [VMBACKUP, "backup", "-d", os.path.join(work, "datastore-nbd"),
                 "--nbd", f"nbd+unix:///?socket={sock}", "--id", "ceiling"]
            )
        finally:
            nbd.terminate()
            nbd.wait()
            os.unlink(raw)

        # Ours.
        config = os.path.join(work, "vmbackup.toml")
        zwork = os.path.join(work, "zstack-work")
        with open(config, "w") as f:
            f.write(
                f'datastore = "{os.path.join(work, "datastore")}"\n\n[platforms.zs]\nkind = "zstack"\n'
                f'endpoint = "{base}"\nusername = "{zs["account"]}"\npassword = "{zs["password"]}"\n'
                f'work_dir = "{zwork}"\n'
            )
        os.makedirs(zwork, exist_ok=True)
        ours_secs, ours_rss, largest, log = run_measured(
            [VMBACKUP, "--config", config, "backup", "--platform", "zs", "--guest", vm["uuid"]],
            watch=[zwork],
            env=dict(os.environ, VMBACKUP_LOG="info"),
        )
        data_secs = data_phase(log, "data-1")
    finally:
        mock.terminate()
        mock.wait()

    mib = size / MIB
    print(f"ZStack backup of a {mib:.0f} MiB data volume (plus a 64 MiB root) through the image store export")
    print(f"{'':18} {'time':>8} {'MiB/s':>8} {'peak RSS':>10}")
    print(f"{'curl':18} {curl_secs:7.2f}s {mib / curl_secs:8.0f} {curl_rss:8.0f} MiB")
    print(f"{'curl | md5sum':18} {md5_secs:7.2f}s {mib / md5_secs:8.0f}   (the least a client checking exportMd5Sum does)")
    print(f"{'vmbackup backup':18} {ours_secs:7.2f}s {mib / ours_secs:8.0f} {ours_rss:8.0f} MiB")
    print(f"{'  its data phase':18} {data_secs:7.2f}s {mib / data_secs:8.0f}")
    print(f"{'same bytes via NBD':18} {nbd_secs:7.2f}s {mib / nbd_secs:8.0f}   (qemu-nbd on a local file: our pipeline's ceiling)")
    print(
        f"ratio ours/curl: {curl_secs / ours_secs:.2f}x whole backup, {curl_secs / data_secs:.2f}x data phase; "
        f"data phase / curl | md5sum: {md5_secs / data_secs:.2f}x; "
        f"data phase / NBD ceiling: {nbd_secs / data_secs:.2f}x; "
        f"largest file in the work dir: {largest / MIB:.1f} MiB"
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
