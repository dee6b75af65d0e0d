#!/usr/bin/env python3
"""Benchmark: `vmbackup serve` stays bounded under load and idles when clients leave.

    cargo build --release -p cli && python3 bench/serve_bounds.py [--size-gib 4]

A raw disk of random data (incompressible: every read decodes a chunk) is
backed up through qemu-nbd and served with `vmbackup serve`. Measured on
the server process (from /proc, sampled every 20 ms):

  1. nbdcopy with its defaults (4 connections x 64 requests) copying the
     whole snapshot to null: peak RSS (VmHWM) and peak thread count, and
     the copy's throughput next to nbdcopy from qemu-nbd serving the raw
     source (ratio, same run);
  2. 50 clients that each queue 64 reads of 32 MiB and disconnect at once:
     peak RSS, and the server's CPU time from 1 s to 3 s after the last
     one left (0 = idle: the abandoned work was cancelled).

The issue's bounds: under 256 MiB RSS in (1); idle within one second in
(2). Not run in CI.
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMBACKUP = os.path.join(ROOT, "target", "release", "vmbackup")
TICK = os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Peak threads of a process, sampled until stopped."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.threads, self.running = pid, 0, True

    def run(self):
        while self.running:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("Threads:"):
                            self.threads = max(self.threads, int(line.split()[1]))
            except FileNotFoundError:
                return
            time.sleep(0.02)


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def reset_peak(pid):
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def abandoning_client(port, export, size):
    """Handshake (fixed newstyle, EXPORT_NAME), queue 64 reads of 32 MiB,
    close without reading a reply."""
    s = socket.create_connection(("127.0.0.1", port))
    hello = b""
    while len(hello) < 18:
        hello += s.recv(18 - len(hello))
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    reply = b""
    while len(reply) < 10:
        reply += s.recv(10 - len(reply))
    length = 32 << 20
    reqs = b"".join(
        struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i * length) % (size - length), length)
        for i in range(64))
    s.sendall(reqs)
    s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30)) // (1 << 20) * (1 << 20)
    if not os.path.exists(VMBACKUP):
        sys.exit("build first: cargo build --release -p cli")
    work = tempfile.mkdtemp(prefix="serve-bench-", dir=args.workdir)
    disk = os.path.join(work, "disk.raw")
    with open(disk, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    sock = os.path.join(work, "src.sock")
    store = os.path.join(work, "store")
    src = subprocess.Popen(["qemu-nbd", "-r", "-t", "-x", "disk", "-f", "raw", "-k", sock, disk])
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    src_uri = f"nbd+unix:///disk?socket={sock}"
    run([VMBACKUP, "backup", "--id", "vm", "--nbd", src_uri, "-d", store])
    t = time.monotonic()
    run(["nbdcopy", src_uri, "null:"])
    peer_seconds = time.monotonic() - t
    src.terminate()
    src.wait()
    snapshot = run([VMBACKUP, "--json", "list", "-d", store])
    import json
    snapshot = json.loads(snapshot)[0]["id"]

    server = subprocess.Popen(
        [VMBACKUP, "serve", "-d", store, snapshot, "disk0", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    uri = next(w for w in line.split() if w.startswith("nbd://"))
    port = int(uri.split(":")[2].split("/")[0])
    pid = server.pid

    sampler = Sampler(pid)
    sampler.start()
    t = time.monotonic()
    run(["nbdcopy", uri, "null:"])
    ours_seconds = time.monotonic() - t
    copy_rss = status_kib(pid, "VmHWM") / 1024
    copy_threads = sampler.threads

    reset_peak(pid)
    clients = [threading.Thread(target=abandoning_client, args=(port, "disk0", size))
               for _ in range(50)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    left = time.monotonic()
    time.sleep(max(0.0, left + 1.0 - time.monotonic()))
    cpu_1s = cpu_seconds(pid)
    time.sleep(2.0)
    cpu_after = cpu_seconds(pid) - cpu_1s
    flood_rss = status_kib(pid, "VmHWM") / 1024
    sampler.running = False

    t = time.monotonic()
    server.terminate()
    server.wait()
    stop_seconds = time.monotonic() - t

    mib = size >> 20
    print(f"serve bounds, {mib} MiB snapshot of random data")
    print(f"  nbdcopy 4x64 from serve: {mib / ours_seconds:7.0f} MiB/s, "
          f"{mib / peer_seconds:7.0f} MiB/s from qemu-nbd (ratio {peer_seconds / ours_seconds:.2f})")
    print(f"  peak RSS {copy_rss:.0f} MiB (bound 256), peak threads {copy_threads}")
    print(f"  50 abandoning clients: peak RSS {flood_rss:.0f} MiB, "
          f"CPU from 1 s to 3 s after they left {cpu_after:.2f} s (0 = idle)")
    print(f"  SIGTERM to exit: {stop_seconds:.2f} s")
    ok = copy_rss < 256 and cpu_after < 0.05 and stop_seconds < 1.0
    print("  within bounds" if ok else "  OUT OF BOUNDS")
    subprocess.run(["rm", "-rf", work])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
