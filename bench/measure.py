"""Shared by the benchmark scripts: run a command and measure it."""

import os
import subprocess
import sys
import tempfile
import threading
import time


def run_measured(cmd, watch=None, **kw):
    """Run cmd; return (seconds, peak RSS MiB, largest file under watch, stderr)."""
    largest = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.1):
            for d in watch or []:
                for dirpath, _, files in os.walk(d):
                    for f in files:
                        try:
                            st = os.stat(os.path.join(dirpath, f))
                            largest[0] = max(largest[0], st.st_blocks * 512)
                        except OSError:
                            pass

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out_f, err_f = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, **kw)
    _, status, rusage = os.wait4(p.pid, 0)
    elapsed = time.monotonic() - start
    stop.set()
    t.join()
    code = os.waitstatus_to_exitcode(status)
    out_f.seek(0)
    err_f.seek(0)
    err = err_f.read().decode()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{out_f.read().decode()}\n{err}")
    return elapsed, rusage.ru_maxrss / 1024.0, largest[0], err
