#!/usr/bin/env python3
"""vmbackup and restic into the same S3 server (moto), in one run.

    cargo build --release -p cli && bash scripts/pyenv && python3 bench/s3.py [--size-gib 2] [--rounds 3]

The image is bench.py's (a third random, a third text-like, a third
zeroes), exported by qemu-nbd. Each round, on a fresh bucket of one moto
server on a loopback port: a full backup and a 1 % incremental (1 MiB runs
changed with qemu-io, read through the dirty bitmap by vmbackup; restic
reads the whole export again, as it must with --stdin) by

  vmbackup   -d s3://bench-vmbackup-K/ds (encrypted, the default there)
  restic     -r s3:http://127.0.0.1:PORT/bench-restic-K (nbdcopy | restic backup --stdin)

Reported: seconds per operation, vmbackup / restic time ratios per round
and their medians, and what each stored (bytes in its bucket). moto keeps
objects in Python memory: its speed bounds both tools alike, so the ratios
compare the tools, the absolute times only this machine. Not run in CI.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ROOT, VMBACKUP, QemuNbd, change, clear_bitmap, make_image, timed  # noqa: E402

PYTHON = os.environ.get("VMBACKUP_PYTHON", os.path.join(ROOT, "target", "pyenv", "bin", "python"))
KEY_ID, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def bucket_bytes(endpoint, bucket):
    """Bytes stored in a bucket (boto3 from the Python environment)."""
    code = ("import boto3,sys; s3=boto3.client('s3',endpoint_url=sys.argv[1],"
            "aws_access_key_id='a',aws_secret_access_key='b',region_name='us-east-1');"
            "p=s3.get_paginator('list_objects_v2');"
            "print(sum(o['Size'] for pg in p.paginate(Bucket=sys.argv[2]) for o in pg.get('Contents',[])))")
    out = subprocess.run([PYTHON, "-c", code, endpoint, bucket], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit("build first: cargo build --release -p cli")
    size = int(a.size_gib * (1 << 30))
    work = a.workdir or tempfile.mkdtemp(prefix="vmbackup-bench-s3-")
    os.makedirs(work, exist_ok=True)
    raw, image, sock = (os.path.join(work, n) for n in ("src.raw", "disk.qcow2", "nbd.sock"))
    print(f"generating {a.size_gib} GiB in {work} ...", file=sys.stderr)
    make_image(raw, size)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True)
    os.unlink(raw)
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "--granularity", "64K",
                    image, "cbt0"], check=True)
    key, passfile = os.path.join(work, "bench.key"), os.path.join(work, "pass")
    with open(passfile, "w") as f:
        f.write("benchmark passphrase\n")

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=KEY_ID,
               AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", RESTIC_PASSWORD="bench")
    times = {op: {"vmbackup": [], "restic": []} for op in ("full", "1% incremental")}
    stored = {"vmbackup": [], "restic": []}
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        for k in range(a.rounds):
            print(f"round {k + 1} of {a.rounds} ...", file=sys.stderr)
            vb, rb = f"bench-vmbackup-{k}", f"bench-restic-{k}"
            for b in (vb, rb):
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{b}", method="PUT"))
            repo = f"s3://{vb}/ds"
            if os.path.exists(key):
                os.unlink(key)
            subprocess.run([VMBACKUP, "init", "-d", repo, "--keyfile", key, "--new-key",
                            "--passphrase-file", passfile], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            restic_repo = f"s3:{endpoint}/{rb}"
            subprocess.run(["restic", "-r", restic_repo, "init", "-q"], env=env, check=True)
            vm = [VMBACKUP, "backup", "-d", repo, "--keyfile", key, "--passphrase-file", passfile,
                  "--id", "bench", "--bitmap", "cbt0", "--nbd"]
            rs = ["bash", "-c", 'set -o pipefail; nbdcopy "$1" - | restic -r "$2" backup -q '
                  '--stdin --stdin-filename disk.raw', "-"]
            for op in ("full", "1% incremental"):
                if op != "full":
                    change(image, size, 1, 100 + k)
                with QemuNbd(image, sock) as uri:
                    s, _, _ = timed(vm + [uri], env=env)
                    times[op]["vmbackup"].append(s)
                    s, _, _ = timed(rs + [uri, restic_repo], env=env)
                    times[op]["restic"].append(s)
                clear_bitmap(image)
            stored["vmbackup"].append(bucket_bytes(endpoint, vb))
            stored["restic"].append(bucket_bytes(endpoint, rb))
            # Start the next round from a fresh server: moto keeps it all in memory.
            moto.terminate()
            moto.wait()
            moto = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
    finally:
        moto.terminate()
        moto.wait()
    print(f"\n{a.size_gib:g} GiB image, {os.cpu_count()} CPUs, moto on loopback, {a.rounds} rounds\n")
    print("| operation | vmbackup s (median) | restic s (median) | vmbackup / restic time (median; each round) |")
    print("|---|---:|---:|---|")
    for op, by in times.items():
        ratios = sorted(v / r for v, r in zip(by["vmbackup"], by["restic"]))
        print(f"| {op} | {statistics.median(by['vmbackup']):.2f} | {statistics.median(by['restic']):.2f} "
              f"| {statistics.median(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)}) |")
    print(f"\nstored after full + incremental: vmbackup {statistics.median(stored['vmbackup']) / 2**20:.0f} MiB, "
          f"restic {statistics.median(stored['restic']) / 2**20:.0f} MiB")
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
