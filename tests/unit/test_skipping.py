"""Skipping a ``with`` body (`ndif.tracing.skipping`), on both of its ways.

The module uses only the standard library, so a script loads it by path and runs under
this interpreter (3.11 here: ``sys.settrace``) and under a Python 3.12+ found on the
machine (``sys.monitoring``). The script checks that an armed frame skips its body and
goes on after it, that another thread running the same function unarmed runs its body,
and, with ``sys.monitoring``, that nothing but the armed function is instrumented (no
global events, no trace function) and that disarming removes its events.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "ndif" / "tracing" / "skipping.py"

SCRIPT = r"""
import importlib.util, json, sys, threading
spec = importlib.util.spec_from_file_location("skipping", sys.argv[1])
skipping = importlib.util.module_from_spec(spec)
spec.loader.exec_module(skipping)
if sys.argv[2] == "settrace":  # as if every monitoring tool id were taken
    skipping._tool_tried = True

report = {"monitoring": None, "ran": [], "during": {}}
entered, release = threading.Event(), threading.Event()


class Skipper:
    def __init__(self, armed, wait=False):
        self.armed, self.wait = armed, wait

    def __enter__(self):
        frame = sys._getframe(1)
        if self.armed:
            self.token = skipping.arm(frame, frame.f_lineno + 1)
            report["monitoring"] = self.token.monitored
        if self.wait:  # armed, not yet at the body: let another thread run the same code
            entered.set()
            release.wait()
        return self

    def __exit__(self, kind, error, traceback):
        if self.armed:
            skipping.disarm(self.token)
        return kind is skipping.SkipBody


def user(name, armed, wait=False):
    before = name + ":header"
    with Skipper(armed, wait):
        report["ran"].append(name + ":body")
    report["ran"].append(before)
    return name


def elsewhere():
    return sum(range(10))


waiting = threading.Thread(target=user, args=("a", True, True))
waiting.start()
entered.wait()
user("b", False)  # the same function, unarmed, while "a" is armed in it
if report["monitoring"]:
    tool = skipping._tool[0]
    report["during"] = {
        "global_events": sys.monitoring.get_events(tool),
        "elsewhere_events": sys.monitoring.get_local_events(tool, elsewhere.__code__),
        "user_events": sys.monitoring.get_local_events(tool, user.__code__),
        "line": sys.monitoring.events.LINE,
    }
report["trace_function"] = sys.gettrace() is not None
release.set()
waiting.join()
assert user("c", True) == "c"
if report["monitoring"]:
    report["after"] = sys.monitoring.get_local_events(skipping._tool[0], user.__code__)
print(json.dumps(report))
"""


def run(python: str, way: str) -> dict:
    done = subprocess.run([python, "-c", SCRIPT, str(MODULE), way], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def newer_python() -> str | None:
    """A Python 3.12 or later: this one, one on the PATH, or one pyenv installed."""
    if sys.version_info >= (3, 12):
        return sys.executable
    candidates = [shutil.which(name) for name in ("python3.14", "python3.13", "python3.12")]
    candidates += sorted(map(str, Path.home().glob(".pyenv/versions/3.1[2-9]*/bin/python3")), reverse=True)
    for found in candidates:
        if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
            return found
    return None


def check_skipped(report: dict) -> None:
    # "b" ran its body although "a" was armed in the same function; "a" and "c" skipped theirs.
    assert report["ran"] == ["b:body", "b:header", "a:header", "c:header"], report["ran"]


def test_settrace_way_skips_only_the_armed_frame():
    report = run(sys.executable, "settrace")
    check_skipped(report)
    assert report["monitoring"] is False


@pytest.mark.skipif(newer_python() is None, reason="needs a Python 3.12+ interpreter (sys.monitoring)")
def test_monitoring_way_instruments_only_the_armed_function():
    report = run(newer_python(), "default")
    check_skipped(report)
    assert report["monitoring"] is True
    during = report["during"]
    assert during["global_events"] == 0 and during["elsewhere_events"] == 0
    assert during["user_events"] == during["line"]  # LINE events on the armed function alone
    assert report["trace_function"] is False  # no thread trace function: other threads run unslowed
    assert report["after"] == 0


def test_this_interpreter_skips_a_traced_body():
    """The way this interpreter takes (monitoring from 3.12) skips a real trace's body."""
    import torch

    import ndif

    model = ndif.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    ran = []
    with model.trace(torch.ones(1, 2)):
        ran.append("body")
        out = model[0].output.save()
    assert ran == ["body"]  # once, by ndif, not inline as well
    assert out.shape == (1, 2)
