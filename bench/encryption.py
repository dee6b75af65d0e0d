#!/usr/bin/env python3
"""What client-side encryption costs: the same backups and restores into an
unencrypted and an encrypted datastore, alternating, in one run.

    cargo build --release -p cli && python3 bench/encryption.py [--size-gib 2] [--rounds 3]

The image is bench.py's (a third random, a third text-like, a third
zeroes), exported by qemu-nbd. Each round, in alternating order: a full
backup into a fresh plain datastore and into a fresh encrypted one, a 1 %
incremental into each, and a restore of each to a raw file. Datastores and
restores go to --store-dir (default: the workdir; tmpfs there isolates the
CPU cost from the disk's writeback). Reported: encrypted / plain time per
operation, median of the rounds, as measured and with the key file's
unlock (Argon2id, a fixed cost per command, timed each round with `vmbackup
key show`) taken out: the data path's cost (target: < 15 % on a backup).
Not run in CI.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import VMBACKUP, QemuNbd, change, clear_bitmap, make_image, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--store-dir", help="where datastores and restores go (default: the workdir)")
    a = ap.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit("build first: cargo build --release -p cli")
    size = int(a.size_gib * (1 << 30))
    work = a.workdir or tempfile.mkdtemp(prefix="vmbackup-bench-enc-")
    os.makedirs(work, exist_ok=True)
    stores = a.store_dir or work
    raw, image = os.path.join(work, "src.raw"), os.path.join(work, "disk.qcow2")
    sock = os.path.join(work, "nbd.sock")
    print(f"generating {a.size_gib} GiB in {work} ...", file=sys.stderr)
    make_image(raw, size)
    import subprocess
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True)
    os.unlink(raw)
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "--granularity", "64K",
                    image, "cbt0"], check=True)
    key, passfile = os.path.join(work, "bench.key"), os.path.join(work, "pass")
    with open(passfile, "w") as f:
        f.write("benchmark passphrase\n")
    if os.path.exists(key):
        os.unlink(key)
    subprocess.run([VMBACKUP, "key", "create", "--file", key, "--passphrase-file", passfile],
                   check=True, stdout=subprocess.DEVNULL)
    flags = {"plain": [], "encrypted": ["--keyfile", key, "--passphrase-file", passfile]}
    times = {op: {m: [] for m in flags} for op in ("full backup", "1% incremental", "restore")}
    unlock = []
    for k in range(a.rounds):
        print(f"round {k + 1} of {a.rounds} ...", file=sys.stderr)
        order = list(flags) if k % 2 == 0 else list(reversed(flags))
        s, _, _ = timed([VMBACKUP, "key", "show", "--file", key, "--passphrase-file", passfile])
        unlock.append(s)
        dirs = {m: os.path.join(stores, f"store-{m}") for m in flags}
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        with QemuNbd(image, sock) as uri:
            for m in order:
                s, _, _ = timed([VMBACKUP, "backup", "-d", dirs[m], *flags[m], "--id", "bench",
                                 "--bitmap", "cbt0", "--nbd", uri])
                times["full backup"][m].append(s)
        clear_bitmap(image)
        change(image, size, 1, 100 + k)
        with QemuNbd(image, sock) as uri:
            for m in order:
                s, _, _ = timed([VMBACKUP, "backup", "-d", dirs[m], *flags[m], "--id", "bench",
                                 "--bitmap", "cbt0", "--nbd", uri])
                times["1% incremental"][m].append(s)
        clear_bitmap(image)
        for m in order:
            _, _, listing = timed([VMBACKUP, "list", "-d", dirs[m], *flags[m]])
            latest = listing.strip().splitlines()[-1].split()[0]
            out = os.path.join(stores, f"restored-{m}")
            shutil.rmtree(out, ignore_errors=True)
            s, _, _ = timed([VMBACKUP, "restore", "-d", dirs[m], *flags[m], latest, "--to", out])
            times["restore"][m].append(s)
            shutil.rmtree(out)
        for d in dirs.values():
            shutil.rmtree(d)
    mib = size / (1 << 20)
    print(f"\n{a.size_gib:g} GiB image, {os.cpu_count()} CPUs, stores in {stores}, "
          f"{a.rounds} rounds\n")
    u = statistics.median(unlock)
    print(f"key file unlock (Argon2id, `vmbackup key show`): {u:.2f} s median\n")
    print("| operation | plain s | encrypted s | encrypted / plain time | "
          "same, unlock taken out |")
    print("|---|---:|---:|---|---|")

    def cell(ratios):
        ratios = sorted(ratios)
        return f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})"

    for op, by in times.items():
        rounds = list(zip(by["plain"], by["encrypted"], unlock))
        print(f"| {op} | {statistics.median(by['plain']):.2f} "
              f"| {statistics.median(by['encrypted']):.2f} "
              f"| {cell(e / p for p, e, _ in rounds)} "
              f"| {cell((e - k) / p for p, e, k in rounds)} |")
    print(f"\nfull backup plain: {mib / statistics.median(times['full backup']['plain']):.0f} MiB/s")
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
