"""Wire-format portability: requests made by another Python run here, and ours run there.

``tests/data/cross-version`` was written on the GPU machine (Python 3.12.3, torch
2.11, transformers 5.17) by ``tests/gpu/cross_version.py run``: its ``a-*.result``
are that interpreter's results for requests encoded here (Python 3.11), its
``b-*.request`` requests it encoded itself. The models are rebuilt here from the
same deterministic recipe.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "tests" / "data" / "cross-version"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cross_version", ROOT / "tests" / "gpu" / "cross_version.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cross_version"] = module  # its classes' source is found through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["cross_version"]


def test_requests_from_python_312_run_here_and_ours_ran_there(script, tmp_path):
    assert {path.name for path in RECORDED.iterdir()} == {
        f"{side}-{case}.{kind}" for side, kind in (("a", "result"), ("b", "request")) for case in script.CASES
    }
    problems = script.check(tmp_path, RECORDED)
    assert problems == []


def test_the_cross_version_script_round_trips_in_one_interpreter(script, tmp_path):
    made, out = tmp_path / "made", tmp_path / "out"
    assert script.main(["make", str(made)]) == 0
    assert script.main(["run", str(made), str(out)]) == 0
    assert script.check(made, out) == []
