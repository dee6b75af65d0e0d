#!/usr/bin/env python3
"""Directory trees: vmbackup against restic and tar | zstd on the same tree,
in one run.

    cargo build --release -p cli && python3 bench/tree.py [--tree /usr/lib] [--rounds 3]

Each round, in rotating order: a full backup of --tree by each tool into a
fresh repository, then a second backup of the unchanged tree (vmbackup:
the incremental against the previous catalog; restic: its parent
snapshot; tar: GNU tar's --listed-incremental with the first run's
snapshot file). Reported: median seconds, peak RSS of the tool's process
(tar's pipeline: the larger of tar and zstd), stored bytes, and vmbackup's
time as a ratio of each peer's. restic encrypts and vmbackup's local
datastore does not (the encryption benchmark measures that cost
separately: ~6 %). Not run in CI.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import VMBACKUP, timed  # noqa: E402


def du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def drop(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="/usr/lib")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit("build first: cargo build --release -p cli")
    for tool in ("restic", "tar", "zstd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed")
    work = a.workdir or tempfile.mkdtemp(prefix="vmbackup-bench-tree-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"))
    entries = sum(1 + len(f) for _, _, f in os.walk(a.tree))
    size = du(a.tree)
    print(f"tree {a.tree}: ~{entries} entries, {size / 2**30:.2f} GiB", file=sys.stderr)

    def vmbackup(repo, _state):
        return [VMBACKUP, "backup", "-d", repo, "--dir", a.tree, "--id", "tree"]

    def restic(repo, _state):
        return ["restic", "-r", repo, "backup", "--quiet", a.tree]

    def tar(repo, state):
        return ["sh", "-c",
                f"tar -C '{a.tree}' --listed-incremental='{state}' -cf - . 2>/dev/null"
                f" | zstd -T0 -3 -q -o '{repo}'"]

    tools = {"vmbackup": vmbackup, "restic": restic, "tar|zstd": tar}
    res = {t: {"full": [], "unchanged": [], "rss": [], "stored": []} for t in tools}
    order = list(tools)
    for r in range(a.rounds):
        for t in order:
            repo = os.path.join(work, t.replace("|", "-") + ".repo")
            state = os.path.join(work, "tar.snar")
            drop(repo)
            drop(state)
            drop(repo + ".2")
            if t == "restic":
                subprocess.run(["restic", "-r", repo, "init", "--quiet"], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            subprocess.run(["sync"], check=True)
            secs, rss, _ = timed(tools[t](repo, state), env=env)
            res[t]["full"].append(secs)
            res[t]["rss"].append(rss)
            res[t]["stored"].append(du(repo) if os.path.isdir(repo) else os.path.getsize(repo))
            second = repo + ".2" if t == "tar|zstd" else repo
            secs, rss2, _ = timed(tools[t](second, state), env=env)
            res[t]["unchanged"].append(secs)
            res[t]["rss"][-1] = max(res[t]["rss"][-1], rss2)
            print(f"round {r} {t}: full {res[t]['full'][-1]:.2f}s, unchanged {secs:.2f}s, "
                  f"peak RSS {res[t]['rss'][-1]:.0f} MiB", file=sys.stderr)
        order = order[1:] + order[:1]
    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in res.items()}
    print(f"\ntree {a.tree}: ~{entries} entries, {size / 2**30:.2f} GiB; median of {a.rounds} rounds\n")
    print("| tool | full s | unchanged s | peak RSS MiB | stored MiB |")
    print("|---|---:|---:|---:|---:|")
    for t, m in med.items():
        print(f"| {t} | {m['full']:.2f} | {m['unchanged']:.2f} | {m['rss']:.0f} | {m['stored'] / 2**20:.0f} |")
    v = med["vmbackup"]
    for peer in ("restic", "tar|zstd"):
        p = med[peer]
        print(f"\nvmbackup / {peer} time: full {v['full'] / p['full']:.3f}, "
              f"unchanged {v['unchanged'] / p['unchanged']:.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
