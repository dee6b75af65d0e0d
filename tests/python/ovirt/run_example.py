"""
Runs one of the SDK's example scripts (copied here, see README.md) in a
work directory, as `python EXAMPLE ARGS...` would from that directory:

    python run_example.py WORKDIR EXAMPLE.py [ARGS...]

The examples write their log, OVF and downloaded images into the current
directory and import `helpers` from theirs; this keeps both out of the
source tree without changing the examples.
"""

import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
workdir, example, args = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(workdir, exist_ok=True)
os.chdir(workdir)
sys.path.insert(0, here)
sys.argv = [example] + args
runpy.run_path(os.path.join(here, example), run_name="__main__")
