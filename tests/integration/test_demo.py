"""`make demo` runs `ndif demo`: the local tour, then the embedded stack end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path):
    ndif = Path(sys.executable).with_name("ndif")
    done = subprocess.run(
        [str(ndif), "demo", "--directory", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())  # rich wraps long lines
    assert "local tracing demo complete" in out
    assert "(bitwise equal: True)" in out
    assert "waited: COMPLETED" in out
    assert "finished: {'COMPLETED': 6}" in out
    assert "stack stopped" in out and "demo complete" in out
