#!/usr/bin/env python3
"""How much content-defined chunking dedups between two versions of a
real tree, per datastore chunk size (the largest chunk; FastCDC's average
is a quarter of it, its minimum a sixteenth).

    cargo build --release -p cli && python3 bench/tree_dedup.py [--tree /usr/share] [--percent 1]

Version B is a copy of --tree in which --percent of the files (every
n-th, at least 1 KiB) have 100 bytes inserted at their start: content
shifts, which fixed-size chunking would not survive. Each chunk size: a
fresh datastore, A backed up as one guest, then B as another (so nothing
is reused by metadata, only by chunk dedup). Reported: bytes B added to
the datastore and the time of B's backup; the ideal is the changed files'
compressed size. Not run in CI.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import VMBACKUP, timed  # noqa: E402


def du(path):
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="/usr/share")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="vmbackup-bench-dedup-")
    os.makedirs(work, exist_ok=True)
    b = os.path.join(work, "b")
    shutil.rmtree(b, ignore_errors=True)
    subprocess.run(["cp", "-a", a.tree, b], check=True)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(b) for f in fs
                   if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
                   and os.path.getsize(os.path.join(d, f)) >= 1024)
    step = max(1, int(100 / a.percent))
    changed = files[::step]
    changed_bytes = 0
    for p in changed:
        with open(p, "rb") as f:
            data = f.read()
        with open(p, "wb") as f:
            f.write(os.urandom(100) + data)
        changed_bytes += len(data) + 100
    print(f"{a.tree}: {len(files)} files >= 1 KiB, {len(changed)} changed "
          f"({changed_bytes / 2**20:.1f} MiB)")
    print("\n| chunk size (max/avg/min) | B adds MiB | B backup s | A stored MiB |")
    print("|---|---:|---:|---:|")
    for cs in (1 << 20, 4 << 20, 16 << 20):
        ds = os.path.join(work, "ds")
        shutil.rmtree(ds, ignore_errors=True)
        subprocess.run([VMBACKUP, "init", "-d", ds, "--chunk-size", str(cs)], check=True,
                       stdout=subprocess.DEVNULL)
        timed([VMBACKUP, "backup", "-d", ds, "--dir", a.tree, "--id", "a"])
        after_a = du(ds)
        secs, _, _ = timed([VMBACKUP, "backup", "-d", ds, "--dir", b, "--id", "b"])
        added = du(ds) - after_a
        print(f"| {cs >> 20} MiB / {cs >> 22 if cs >= 4 << 20 else '256 K'}"
              f"{' MiB' if cs >= 4 << 20 else ''} / {cs >> 4 >> 10} KiB | {added / 2**20:.1f} | "
              f"{secs:.2f} | {after_a / 2**20:.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
