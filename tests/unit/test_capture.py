"""Where a trace can be written: the body is captured from source and run by ndif.

Functions, methods, loops, scripts, ``python -c``, IPython cells, exec'd code with
registered source, multi-line headers, comments, sessions. Each test checks the
values the body produced against plain PyTorch, so a body that ran inline, ran
twice, ran stale code or saw the wrong variables fails.
"""

# Traces stay their own `with` inside pytest.raises, as a user writes them.
# ruff: noqa: SIM117

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch

import ndif
from ndif.tracing.capture import register_source

PROMPT = "The Eiffel Tower is in"
X = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]])
RESULT = None  # set through `global` by a trace body in a test below


@pytest.fixture
def model(mlp) -> ndif.NNsight:
    return ndif.NNsight(mlp)


def plain(net: torch.nn.Module, x: torch.Tensor, first: float | None = None) -> torch.Tensor:
    """The MLP's output, with its first layer's output set to ``first`` if given."""
    with torch.no_grad():
        hidden = net[0](x)
        if first is not None:
            hidden = torch.full_like(hidden, first)
        return net[2](net[1](hidden))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    )
    return env


# -- functions, methods, loops -----------------------------------------------------------------


def test_trace_in_a_nested_function(mlp, model):
    def outer(scale: float):
        offset = 0.5  # a free variable of `inner`

        def inner(x: torch.Tensor):
            with model.trace(x * scale):
                model[0].output[:] = offset
                out = model[2].output.save()
                unsaved = out * 2
            reader = lambda: out  # `out` is a cell: the saved value must land in it
            assert "unsaved" not in locals()
            return reader()

        return inner(X)

    torch.testing.assert_close(outer(2.0), plain(mlp, X * 2.0, first=0.5))
    torch.testing.assert_close(outer(-1.0), plain(mlp, X, first=0.5))


def test_trace_inside_another_context_manager(mlp, model):
    def run():
        with torch.no_grad():
            with model.trace(X):
                out = model[2].output.save()
        return out

    out = run()
    torch.testing.assert_close(out, plain(mlp, X))
    assert not out.requires_grad


class Probe:
    def __init__(self, model: ndif.NNsight) -> None:
        self.model = model
        self.hidden = None

    def run(self, x: torch.Tensor, value: float) -> torch.Tensor:
        with self.model.trace(x) as tracer:
            self.model[0].output[:] = value
            self.hidden = self.model[0].output.save()
            out = self.model[2].output.save()
        return out

    @classmethod
    def once(cls, model: ndif.NNsight, x: torch.Tensor) -> torch.Tensor:
        with model.trace(x):
            out = model[2].output.save()
        return out


def test_trace_in_a_method(mlp, model):
    probe = Probe(model)
    for value in (1.0, -2.0):
        out = probe.run(X, value)
        torch.testing.assert_close(out, plain(mlp, X, first=value))
        torch.testing.assert_close(probe.hidden, torch.full((2, 8), value))
    torch.testing.assert_close(Probe.once(model, X), plain(mlp, X))


def test_trace_in_a_loop_sees_each_iteration(mlp, model):
    results = []
    for step in range(12):
        value = step * 0.25
        with model.trace(X):
            model[0].output[:] = value
            out = model[2].output.save()
        results.append((value, out))
    for value, out in results:
        torch.testing.assert_close(out, plain(mlp, X, first=value))


def test_same_call_site_many_times_with_different_locals(mlp, model):
    def run(x: torch.Tensor, value: float) -> torch.Tensor:
        with model.trace(x):
            model[0].output[:] = value
            out = model[2].output.save()
        return out

    inputs = [X * k for k in range(1, 6)]
    for round_ in range(4):
        for k, x in enumerate(inputs):
            value = round_ - k * 0.5
            torch.testing.assert_close(run(x, value), plain(mlp, x, first=value))
    # And from a comprehension, which is another frame per call.
    outs = [run(x, float(k)) for k, x in enumerate(inputs)]
    for k, (x, out) in enumerate(zip(inputs, outs)):
        torch.testing.assert_close(out, plain(mlp, x, first=float(k)))


def test_nested_loops_with_a_trace_inside(mlp, model):
    seen = {}
    for i in range(3):
        for j in range(3):
            x = X + i
            with model.trace(x):
                model[0].output[:] = j
                out = model[2].output.save()
            seen[i, j] = out
    for (i, j), out in seen.items():
        torch.testing.assert_close(out, plain(mlp, X + i, first=float(j)))


def test_trace_in_a_generator(mlp, model):
    def outputs(xs):
        for x in xs:
            with model.trace(x):
                out = model[2].output.save()
            yield out

    xs = [X, X * 3, -X]
    for x, out in zip(xs, outputs(xs)):
        torch.testing.assert_close(out, plain(mlp, x))


def test_saved_value_reaches_a_nonlocal(mlp, model):
    def run():
        box = None

        def inner():
            nonlocal box
            with model.trace(X):
                box = model[2].output.save()

        inner()
        return box

    out = run()
    assert out is not None, "the saved value did not reach the `nonlocal` name"
    torch.testing.assert_close(out, plain(mlp, X))


def test_saved_value_reaches_a_global(mlp, model):
    global RESULT
    RESULT = None

    def run():
        global RESULT
        with model.trace(X):
            RESULT = model[2].output.save()

    run()
    assert RESULT is not None, "the saved value did not reach the name declared `global` in the caller"
    torch.testing.assert_close(RESULT, plain(mlp, X))
    RESULT = None


# -- how the `with` is written -------------------------------------------------------------------


def test_multi_line_headers(mlp, model):
    with model.trace(
        X,
    ) as tracer:
        first = model[2].output.save()

    with model.trace(X *
                     2):  # fmt: skip
        second = model[2].output.save()

    with model.trace(
            X * 3
        ) as tracer:  # fmt: skip
        third = model[2].output.save()

    with \
            model.trace(X * 4):  # fmt: skip
        fourth = model[2].output.save()

    with model.trace(
        # a comment inside the header
        X * 5,
    ) as tracer:
        model[0].output[:] = 1.0
        fifth = model[2].output.save()

    torch.testing.assert_close(first, plain(mlp, X))
    torch.testing.assert_close(second, plain(mlp, X * 2))
    torch.testing.assert_close(third, plain(mlp, X * 3))
    torch.testing.assert_close(fourth, plain(mlp, X * 4))
    torch.testing.assert_close(fifth, plain(mlp, X * 5, first=1.0))


# fmt: off
def test_comments_and_blank_lines_in_the_body(mlp, model):
    with model.trace() as tracer:
        # A comment before the first statement.

        # And another, after a blank line.
        with tracer.invoke(X[:1]):
            # inside an invoke
            top = model[2].output.save()  # trailing comment

        with tracer.invoke(X[1:]):

            model[0].output[:] = 2.0

            # between statements

            bottom = model[2].output.save()
        # a comment at the end of the body
    torch.testing.assert_close(top, plain(mlp, X[:1]))
    torch.testing.assert_close(bottom, plain(mlp, X[1:], first=2.0))
# fmt: on


def test_body_starting_with_a_string(mlp, model):
    with model.trace(X) as tracer:
        """A string first: it compiles to nothing, so the body starts on the next line."""
        out = model[2].output.save()
        result = tracer.result.save()
    torch.testing.assert_close(out, plain(mlp, X))
    torch.testing.assert_close(result, plain(mlp, X))


def test_body_starting_with_try_is_a_trace_syntax_error(mlp, model):
    trace_function = sys.gettrace()
    with pytest.raises(ndif.TraceSyntaxError) as excinfo:
        with model.trace(X):
            try:
                out = model[2].output.save()
            except KeyError:
                pass
    error = excinfo.value
    assert "try" in str(error)
    assert isinstance(error, SyntaxError)
    mine = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
    assert mine and "model.trace(X)" in (mine[-1].line or ""), "the error does not point at the `with` line"
    assert sys.gettrace() is trace_function, "the trace function was not restored"
    assert "out" not in locals(), "the body ran inline"
    # The fix the message suggests works: a statement above the `try`.
    with model.trace(X):
        out = None
        try:
            out = model[2].output.save()
        except KeyError:
            pass
    torch.testing.assert_close(out, plain(mlp, X))


def test_a_debugger_trace_function_survives_a_trace(mlp, model):
    """A thread's trace function (a debugger, coverage) keeps seeing the caller's lines."""
    events = []

    def traced():
        with model.trace(X):
            out = model[2].output.save()
        after = out.sum()  # the tracer must still see this line
        return after

    def tracer(frame, event, arg):
        if frame.f_code is traced.__code__:
            events.append((event, frame.f_lineno))
            return tracer
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        total = traced()
        still = sys.gettrace()
    finally:
        sys.settrace(previous)
    assert still is tracer, "the thread's trace function was replaced"
    first = traced.__code__.co_firstlineno
    lines = {line - first for event, line in events if event == "line"}
    assert {1, 3, 4} <= lines, f"line events after the trace were lost: {sorted(lines)}"
    torch.testing.assert_close(total, plain(mlp, X).sum())


# -- sessions ------------------------------------------------------------------------------------


def test_nested_traces_in_a_session(mlp, model):
    with model.session():
        with model.trace(X):
            hidden = model[0].output  # not saved: flows into the next trace
        with model.trace(X * 0):
            model[0].output = hidden
            out = model[2].output.save()
        doubled = out * 2  # not saved: stays in the session
        outs = []
        for value in (1.0, 2.0, 3.0):
            with model.trace(X):
                model[0].output[:] = value
                each = model[2].output
            outs.append(each)
        kept = ndif.save(outs)
    torch.testing.assert_close(out, plain(mlp, X))
    for value, each in zip((1.0, 2.0, 3.0), kept):
        torch.testing.assert_close(each, plain(mlp, X, first=value))
    assert "hidden" not in locals() and "doubled" not in locals()


# -- exec'd code ---------------------------------------------------------------------------------


def test_exec_with_registered_source(mlp, model):
    source = textwrap.dedent(
        """
        scale = 3.0
        with model.trace(x * scale):
            model[0].output[:] = value
            out = model[2].output.save()
            unsaved = out + 1

        def helper(y):
            with model.trace(y):
                inner = model[2].output.save()
            return inner
        """
    )
    filename = "<ndif-test-exec-registered>"
    register_source(filename, source)
    namespace = {"model": model, "x": X, "value": -1.5}
    exec(compile(source, filename, "exec"), namespace)
    torch.testing.assert_close(namespace["out"], plain(mlp, X * 3.0, first=-1.5))
    assert "unsaved" not in namespace
    torch.testing.assert_close(namespace["helper"](X * 2), plain(mlp, X * 2))


def test_reregistering_a_filename_runs_the_new_source(mlp, model):
    """Code built at run time under a reused name (a REPL, a notebook tool): each
    registration's own body runs, not the first one's."""
    filename = "<ndif-test-exec-reused>"
    template = "with model.trace(x):\n    model[0].output[:] = {value}\n    out = model[2].output.save()\n"
    for value in (1.0, 2.0, 3.0):
        source = template.format(value=value)
        register_source(filename, source)
        namespace = {"model": model, "x": X}
        exec(compile(source, filename, "exec"), namespace)
        torch.testing.assert_close(
            namespace["out"], plain(mlp, X, first=value), msg=f"registration with value {value} ran another body"
        )


def test_exec_without_source_is_a_clear_error(model):
    source = "with model.trace(x):\n    out = model[2].output.save()\n"
    namespace = {"model": model, "x": X}
    with pytest.raises(ndif.TraceSyntaxError) as excinfo:
        exec(compile(source, "<ndif-test-no-source>", "exec"), namespace)
    assert "register_source" in str(excinfo.value)
    assert "out" not in namespace


# -- other processes -----------------------------------------------------------------------------


SCRIPT = """\
import json
import sys

import torch

import ndif

torch.set_num_threads(1)
model = ndif.LanguageModel(sys.argv[1], dispatch=True)
prompt = "The Eiffel Tower is in"
scale = 2.0

with model.trace(prompt) as tracer:
    # module level: the body reads and writes the script's globals
    model.model.layers[1].output[:, -1] *= scale
    hidden = model.model.layers[1].output.save()

    logits = model.lm_head.output.save()
    unsaved = hidden + 1

error_line = None
try:
    with model.trace(prompt):
        late = model.model.layers[2].output.save()
        early = model.model.layers[0].output.save()
except ndif.OutOfOrderError as error:
    import traceback

    error_line = traceback.extract_tb(error.__traceback__)[-1].lineno

print(
    "RESULT "
    + json.dumps(
        {
            "hidden": hidden[0, -1].tolist(),
            "logits": logits[0, -1].tolist(),
            "leaked": "unsaved" in globals(),
            "error_line": error_line,
        }
    )
)
"""
ERROR_LINE = SCRIPT.splitlines().index("        early = model.model.layers[0].output.save()") + 1


@pytest.fixture(scope="module")
def script_expected(tiny_llama_path):
    """What the script prints, computed by plain transformers with a hook."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama_path)(PROMPT, return_tensors="pt")["input_ids"]
    seen = {}

    def scale(module, args, output):
        output = output.clone()
        output[:, -1] *= 2.0
        seen["hidden"] = output
        return output

    handle = reference.model.layers[1].register_forward_hook(scale)
    with torch.no_grad():
        logits = reference(ids).logits
    handle.remove()
    return {"hidden": seen["hidden"][0, -1], "logits": logits[0, -1]}


def check_script_output(completed: subprocess.CompletedProcess, expected: dict) -> None:
    assert completed.returncode == 0, f"the script failed:\n{completed.stderr[-4000:]}"
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result printed:\nstdout: {completed.stdout[-2000:]}\nstderr: {completed.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    torch.testing.assert_close(torch.tensor(result["hidden"]), expected["hidden"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected["logits"], rtol=1e-4, atol=1e-5)
    assert result["leaked"] is False, "an unsaved value leaked into the script's globals"
    assert result["error_line"] == ERROR_LINE, "the error's traceback does not end at the offending line"


def test_module_level_of_a_script(tmp_path: Path, tiny_llama_path, script_expected):
    script = tmp_path / "trace_script.py"
    script.write_text(SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script), str(tiny_llama_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    check_script_output(completed, script_expected)


def test_python_dash_c(tmp_path: Path, tiny_llama_path, script_expected):
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    check_script_output(completed, script_expected)


def test_ipython_cells(mlp, model):
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.user_ns.update({"model": model, "x": X})
        cells = [
            "with model.trace(x):\n    hidden = model[0].output.save()\n    unsaved = hidden * 2\n",
            "def run(value):\n    with model.trace(x):\n        model[0].output[:] = value\n"
            "        out = model[2].output.save()\n    return out\n",
            "first = run(1.0)\nsecond = run(2.0)\n",
            # The same text again is a new cell: it must run again, on the new x.
            "x = x * 3\nwith model.trace(x):\n    hidden = model[0].output.save()\n    unsaved = hidden * 2\n",
        ]
        for number, cell in enumerate(cells):
            result = shell.run_cell(cell, store_history=True)
            assert result.success, f"cell {number} failed: {result.error_in_exec or result.error_before_exec}"
            if number == 0:
                torch.testing.assert_close(shell.user_ns["hidden"], mlp[0](X))
        assert "unsaved" not in shell.user_ns
        torch.testing.assert_close(shell.user_ns["first"], plain(mlp, X, first=1.0))
        torch.testing.assert_close(shell.user_ns["second"], plain(mlp, X, first=2.0))
        torch.testing.assert_close(shell.user_ns["hidden"], mlp[0](X * 3))
    finally:
        InteractiveShell.clear_instance()
