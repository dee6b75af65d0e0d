#!/usr/bin/env python3
"""Benchmark table: vmbackup against its peers, in one run, on generated data.

    cargo build --release -p cli && python3 bench/bench.py [--size-gib 2]

A qcow2 image with a persistent dirty bitmap (a third random, a third
text-like, a third zeroes) is exported by qemu-nbd over a Unix socket.
Measured, each as wall time and peak RSS of the child process (wait4):

  nbdcopy ... null:            the NBD read ceiling
  qemu-img convert -> qcow2    a plain copy of the same export
  nbdcopy --flush -> raw file  the same reads written to the disk the
                               datastore is on (source and datastore share
                               one disk here, so a backup's chunk writes
                               compete with its reads; nbdcopy -> null
                               writes nothing)
  vmbackup backup (full)       read, hash, compress, dedup into a datastore;
                               with --out-dir also into a datastore there
                               (tmpfs: a datastore on another device)
  restic backup                the same export through nbdcopy into
                               `restic backup --stdin`, fresh repository
  vmbackup backup (1%, 10%)    incrementals after qemu-io changes
  qemu-img convert -> raw      the restore peer: qemu-nbd to a raw file
  vmbackup restore             snapshot back into a raw file
  vmbackup serve               qemu-img convert from the instant-restore
                               NBD server to a raw file
  random 4 KiB reads           qemu-io, one read at a time (latency),
                               from `vmbackup serve` vs qemu-nbd: in a
                               48 MiB working set (fits the serve chunk
                               cache) and across the whole disk (cold)

With --rounds N (default 1) every measurement after the image is made runs
N times on a fresh datastore; the summary gives each ratio's median.

Ratios are ours / peer throughput in the same run; absolute MiB/s on shared
2-core machines drift, ratios much less. Not run in CI.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBACKUP = os.environ.get("VMBACKUP", os.path.join(ROOT, "target", "release", "vmbackup"))


def timed(cmd, **kw):
    """Run cmd; return (seconds, peak RSS MiB, stdout)."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    _, status, rusage = os.wait4(p.pid, 0)
    elapsed = time.monotonic() - start
    out = p.stdout.read().decode()
    err = p.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{out}\n{err}")
    return elapsed, rusage.ru_maxrss / 1024.0, out


def make_image(path, size):
    third = size // 3 // (1 << 20) * (1 << 20)
    text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; log line %d\n"
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, third, 1 << 20):
            f.seek(off)
            f.write(os.urandom(1 << 20))
        line = b"".join(text % (i,) for i in range(16))
        block = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
        for off in range(third, 2 * third, 1 << 20):
            f.seek(off)
            f.write(block[:-8] + off.to_bytes(8, "little"))


class QemuNbd:
    def __init__(self, image, sock):
        self.image, self.sock = image, sock

    def __enter__(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.p = subprocess.Popen(
            ["qemu-nbd", "-r", "-t", "-e", "8", "-x", "disk", "-f", "qcow2",
             "--bitmap", "cbt0", "--cache=none", "--aio=threads", "-k", self.sock, self.image])
        for _ in range(200):
            if os.path.exists(self.sock):
                return f"nbd+unix:///disk?socket={self.sock}"
            time.sleep(0.05)
        sys.exit("qemu-nbd did not start")

    def __exit__(self, *a):
        self.p.terminate()
        self.p.wait()


def change(image, size, percent, seed):
    """Guest writes: `percent` of the disk as 1 MiB runs at random places
    (files and databases write in runs; uniformly scattered 64 KiB writes
    would touch most 4 MiB chunks even at 1%)."""
    rnd = random.Random(seed)
    block = 1 << 20
    n = int(size * percent / 100 / block)
    cmds = "".join(
        f"write -P {rnd.randrange(1, 255)} {rnd.randrange(size // block) * block} 1M\n"
        for _ in range(n))
    subprocess.run(["qemu-io", "-f", "qcow2", image], input=cmds.encode(),
                   stdout=subprocess.DEVNULL, check=True)
    return n * block


def clear_bitmap(image):
    """After a successful backup the changes are consumed (a platform
    rotates its CBT checkpoint; here the bitmap is cleared offline)."""
    subprocess.run(["qemu-img", "bitmap", "--clear", image, "cbt0"], check=True)


def random_reads(uri, size, count, span, seed):
    """Seconds for `count` 4 KiB reads at random 4 KiB-aligned offsets in
    the first `span` bytes, one at a time (qemu-io)."""
    rnd = random.Random(seed)
    blocks = max(1, min(span, size) // 4096)
    script = "".join(f"read {rnd.randrange(blocks) * 4096} 4k\n" for _ in range(count))
    start = time.monotonic()
    subprocess.run(["qemu-io", "-r", "-f", "raw", uri], input=script.encode(),
                   stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def measure(a, work, image, sock, store, size, mib):
    """One round of every measurement; returns the rows."""
    rows = []

    def row(name, secs, rss, logical=mib, note=""):
        rows.append((name, secs, logical / secs, rss, note))

    with QemuNbd(image, sock) as uri:
        s, r, _ = timed(["nbdcopy", uri, "null:"])
        row("nbdcopy -> null (ceiling)", s, r)
        out = os.path.join(work, "copy.qcow2")
        s, r, _ = timed(["qemu-img", "convert", "-f", "raw", uri, "-O", "qcow2", out])
        row("qemu-img convert -> qcow2", s, r)
        os.unlink(out)
        # The write-inclusive peer: the same reads into a raw file on the
        # disk the datastore lives on, flushed at the end as a backup is.
        out = os.path.join(work, "copy.raw")
        s, r, _ = timed(["nbdcopy", "--flush", uri, out])
        row("nbdcopy -> raw file, flushed (same disk)", s, r)
        os.unlink(out)
        if a.out_dir:
            # The datastore on another device than the source (tmpfs as a
            # stand-in): the pipeline without the shared disk's writes.
            fast = os.path.join(a.out_dir, "store-fast")
            shutil.rmtree(fast, ignore_errors=True)
            s, r, _ = timed([VMBACKUP, "backup", "-d", fast, "--id", "bench", "--nbd", uri])
            row("vmbackup backup, full, datastore in --out-dir", s, r)
            shutil.rmtree(fast)
        s, r, _ = timed([VMBACKUP, "backup", "-d", store, "--id", "bench", "--bitmap", "cbt0",
                         "--nbd", uri])
        row("vmbackup backup, full", s, r)
        # restic reads the same export (no raw copy of the image kept on
        # disk: at 16 GiB it would crowd the page cache).
        repo = os.path.join(work, "restic")
        shutil.rmtree(repo, ignore_errors=True)
        env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=repo)
        subprocess.run(["restic", "init", "-q"], env=env, check=True)
        s, r, _ = timed(["bash", "-c", 'set -o pipefail; nbdcopy "$1" - | '
                         'restic backup -q --stdin --stdin-filename disk.raw', "-", uri], env=env)
        row("restic backup (nbdcopy | restic --stdin)", s, r)
        shutil.rmtree(repo)
    clear_bitmap(image)

    for pct in (1, 10):
        changed = change(image, size, pct, pct)
        with QemuNbd(image, sock) as uri:
            s, r, _ = timed([VMBACKUP, "backup", "-d", store, "--id", "bench",
                             "--bitmap", "cbt0", "--nbd", uri])
        clear_bitmap(image)
        row(f"vmbackup backup, {pct}% incremental", s, r,
            note=f"{changed >> 20} MiB changed in 1 MiB runs")
    _, _, listing = timed([VMBACKUP, "list", "-d", store])
    latest = listing.strip().splitlines()[-1].split()[0]
    # Restore and instant restore against qemu's own copy of the same
    # guest disk, every output a raw file in the same directory (--out-dir,
    # tmpfs to time decoding rather than writeback).
    outs = a.out_dir or work
    peer_raw = os.path.join(outs, "peer.raw")
    with QemuNbd(image, sock) as uri:
        s, r, _ = timed(["qemu-img", "convert", "-f", "raw", uri, "-O", "raw", peer_raw])
        row("qemu-img convert qemu-nbd -> raw (restore peer)", s, r)
    os.unlink(peer_raw)
    restored = os.path.join(outs, "restored")
    s, r, _ = timed([VMBACKUP, "restore", "-d", store, latest, "--to", restored])
    row("vmbackup restore -> raw file", s, r)
    shutil.rmtree(restored)
    serve = subprocess.Popen([VMBACKUP, "serve", "--listen", "127.0.0.1:0", "-d", store,
                              latest, "disk0"], stdout=subprocess.PIPE)
    try:
        line = serve.stdout.readline().decode()
        served = next(w for w in line.split() if w.startswith("nbd://"))
        out = os.path.join(outs, "served.raw")
        s, r, _ = timed(["qemu-img", "convert", "-f", "raw", served, "-O", "raw", out])
        row("qemu-img convert vmbackup serve -> raw", s, r)
        os.unlink(out)
        for label, span, count in (("48 MiB working set", 48 << 20, 2000),
                                   ("whole disk", size, 300)):
            s = random_reads(served, size, count, span, 7)
            row(f"random 4 KiB reads, {label}: vmbackup serve", s, 0, logical=count * 4096 / (1 << 20))
        with open(f"/proc/{serve.pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        rows.append(("vmbackup serve process (peak RSS)", 1.0, 0.0, hwm / 1024.0, "whole serve run"))
    finally:
        serve.terminate()
        serve.wait()
    with QemuNbd(image, sock) as uri:
        for label, span, count in (("48 MiB working set", 48 << 20, 2000),
                                   ("whole disk", size, 300)):
            s = random_reads(uri, size, count, span, 7)
            row(f"random 4 KiB reads, {label}: qemu-nbd", s, 0, logical=count * 4096 / (1 << 20))

    return rows


def report(a, rows):
    """Prints one round's table; returns its ratios by name."""
    by = {n: t for n, _, t, _, _ in rows}
    qemu, ceiling = by["qemu-img convert -> qcow2"], by["nbdcopy -> null (ceiling)"]
    restic = by["restic backup (nbdcopy | restic --stdin)"]
    print(f"\n{a.size_gib:g} GiB image, {os.cpu_count()} CPUs, {os.uname().release}\n")
    print("| run | seconds | MiB/s | vs qemu-img | vs nbdcopy | vs restic | peak RSS MiB | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, secs, thr, rss, note in rows:
        print(f"| {name} | {secs:.2f} | {thr:.0f} | {thr / qemu:.2f}x | {thr / ceiling:.2f}x "
              f"| {thr / restic:.2f}x | {rss:.0f} | {note} |")
    full = [s for n, s, *_ in rows if n == "vmbackup backup, full"][0]
    inc1 = [s for n, s, *_ in rows if n.startswith("vmbackup backup, 1%")][0]
    print(f"\n1% incremental / full time: {inc1 / full:.1%}")
    peer = by["qemu-img convert qemu-nbd -> raw (restore peer)"]
    print(f"restore / qemu-img convert: {by['vmbackup restore -> raw file'] / peer:.2f}x; "
          f"serve / qemu-nbd: {by['qemu-img convert vmbackup serve -> raw'] / peer:.2f}x")
    rr = {}
    for label in ("48 MiB working set", "whole disk"):
        rr[label] = by[f"random 4 KiB reads, {label}: vmbackup serve"] / by[f"random 4 KiB reads, {label}: qemu-nbd"]
    print(f"random 4 KiB reads / qemu-nbd: {rr['48 MiB working set']:.2f}x in a 48 MiB working set, "
          f"{rr['whole disk']:.2f}x across the disk")
    return {
        "serve peak RSS MiB": [r for n, _, _, r, _ in rows if n.startswith("vmbackup serve process")][0],
        "restore peak RSS MiB": [r for n, _, _, r, _ in rows if n == "vmbackup restore -> raw file"][0],
        "full backup / nbdcopy": by["vmbackup backup, full"] / ceiling,
        "full backup / qemu-img convert": by["vmbackup backup, full"] / qemu,
        "full backup / nbdcopy -> file": by["vmbackup backup, full"]
        / by["nbdcopy -> raw file, flushed (same disk)"],
        **({"full backup, datastore in --out-dir / nbdcopy":
            by["vmbackup backup, full, datastore in --out-dir"] / ceiling}
           if "vmbackup backup, full, datastore in --out-dir" in by else {}),
        "1% incremental / full time": inc1 / full,
        "restore / qemu-img convert": by["vmbackup restore -> raw file"] / peer,
        "serve / qemu-nbd": by["qemu-img convert vmbackup serve -> raw"] / peer,
        "random reads 48 MiB / qemu-nbd": rr["48 MiB working set"],
        "random reads whole disk / qemu-nbd": rr["whole disk"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--workdir")
    ap.add_argument("--out-dir", help="where restores write (default: the workdir)")
    ap.add_argument("--rounds", type=int, default=1, help="measure N times, report medians")
    a = ap.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit("build first: cargo build --release -p cli")
    size = int(a.size_gib * (1 << 30))
    work = a.workdir or tempfile.mkdtemp(prefix="vmbackup-bench-")
    os.makedirs(work, exist_ok=True)
    raw, image = os.path.join(work, "src.raw"), os.path.join(work, "disk.qcow2")
    sock, store = os.path.join(work, "nbd.sock"), os.path.join(work, "store")
    print(f"generating {a.size_gib} GiB in {work} ...", file=sys.stderr)
    make_image(raw, size)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True)
    os.unlink(raw)
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "--granularity", "64K",
                    image, "cbt0"], check=True)
    mib = size / (1 << 20)
    summaries = []
    for k in range(a.rounds):
        if a.rounds > 1:
            print(f"round {k + 1} of {a.rounds} ...", file=sys.stderr)
        store_k = store + (f"-{k}" if k else "")
        rows = measure(a, work, image, sock, store_k, size, mib)
        summaries.append(report(a, rows))
        shutil.rmtree(store_k, ignore_errors=True)
    if a.rounds > 1:
        print(f"\nmedians of {a.rounds} rounds:")
        for key in summaries[0]:
            vals = sorted(sm[key] for sm in summaries)
            shown = ", ".join(f"{v:.3f}" for v in vals)
            print(f"  {key}: {statistics.median(vals):.3f}  ({shown})")
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
