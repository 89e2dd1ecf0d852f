"""Errors a researcher can act on: the right type, a message naming the module, a
traceback that points at their own line, and a model that still works afterwards.

Every test here provokes one mistake on the same wrapped model (``model``, private
to this file so that tests which attach modules leave the shared ``llama`` alone),
checks the error, then checks the model still traces correctly against a plain
transformers reference (``assert_healthy``).

The offending line of each test is tagged with a ``# @tag`` comment;
`line_of` finds it, so the tests do not hard-code line numbers.
"""

# Traces stay their own `with` inside pytest.raises, as a user writes them.
# ruff: noqa: SIM117

from __future__ import annotations

import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ndif
from ndif.engine.context import ACTIVE_RUN, CURRENT_MEDIATOR

PROMPT = "The Eiffel Tower is in"
THIS_FILE = os.path.realpath(__file__)
NDIF_DIR = os.path.dirname(os.path.realpath(ndif.__file__)) + os.sep
SOURCE_LINES = Path(THIS_FILE).read_text().splitlines()
ORIGINAL_TRACE = sys.gettrace()


# -- helpers ------------------------------------------------------------------------------


def line_of(tag: str) -> int:
    """The line of this file tagged ``# @tag``."""
    pattern = re.compile(rf"# @{re.escape(tag)}(\s|$)")
    hits = [number for number, text in enumerate(SOURCE_LINES, 1) if pattern.search(text)]
    assert len(hits) == 1, f"tag {tag!r} found on lines {hits}"
    return hits[0]


def frames_of(error: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(error.__traceback__)


def describe(frames: list[traceback.FrameSummary]) -> str:
    return "\n".join(f"  {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames)


def assert_points_at(error: BaseException, *tags: str) -> None:
    """The last frame of the traceback that lies in this file is the tagged line
    (one of ``tags``, where more than one line is acceptable)."""
    frames = frames_of(error)
    mine = [f for f in frames if os.path.realpath(f.filename) == THIS_FILE]
    assert mine, f"no frame of the test file in the traceback:\n{describe(frames)}"
    expected = {line_of(tag) for tag in tags}
    assert mine[-1].lineno in expected, (
        f"the traceback's last frame in the test file is line {mine[-1].lineno}, expected line(s) "
        f"{sorted(expected)}:\n{describe(frames)}"
    )


def assert_no_internal_frames(error: BaseException) -> None:
    """No frame of ndif's own code is shown between the user's frames: only the
    tracer's ``__exit__`` (the line Python itself must show for an error leaving a
    ``with``) and, below the user's last line, the ndif call that line made and
    that raised (Python cannot drop the frames an exception is raised in)."""
    frames = frames_of(error)
    last_mine = max(i for i, f in enumerate(frames) if os.path.realpath(f.filename) == THIS_FILE)
    internal = [
        f for f in frames[:last_mine] if os.path.realpath(f.filename).startswith(NDIF_DIR) and f.name != "__exit__"
    ]
    assert not internal, f"ndif's internal frames appear in the traceback:\n{describe(frames)}"


@dataclass
class Expected:
    hidden: torch.Tensor  # layers[1] output
    logits: torch.Tensor
    edited_logits: torch.Tensor  # with layers[2].mlp output zeroed at the last position


@pytest.fixture(scope="module")
def model(tiny_llama_path) -> ndif.LanguageModel:
    """A wrapped model private to this file: some tests attach modules to it."""
    return ndif.LanguageModel(tiny_llama_path, dispatch=True)


@pytest.fixture(scope="module")
def expected(tiny_llama_path) -> Expected:
    """What a healthy model computes, from a plain transformers copy of the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama_path)(PROMPT, return_tensors="pt")["input_ids"]
    seen = {}
    handle = reference.model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("hidden", o.clone()))
    with torch.no_grad():
        logits = reference(ids).logits
    handle.remove()
    handle = reference.model.layers[2].mlp.register_forward_hook(
        lambda m, a, o: o.index_fill(1, torch.tensor([o.shape[1] - 1]), 0.0)
    )
    with torch.no_grad():
        edited = reference(ids).logits
    handle.remove()
    return Expected(seen["hidden"], logits, edited)


def assert_healthy(model: ndif.LanguageModel, expected: Expected) -> None:
    """The model traces correctly, edits apply and leave nothing behind, and no
    trace state is left in this thread."""
    assert sys.gettrace() is ORIGINAL_TRACE, "the thread's trace function was not restored"
    assert CURRENT_MEDIATOR.get() is None and ACTIVE_RUN.get() is None, "a trace is still active in this context"
    with model.trace(PROMPT):
        hidden = model.model.layers[1].output.save()
        logits = model.lm_head.output.save()
    torch.testing.assert_close(hidden, expected.hidden)
    torch.testing.assert_close(logits, expected.logits)
    with model.trace(PROMPT):
        model.model.layers[2].mlp.output[:, -1] = 0
        edited = model.lm_head.output.save()
    torch.testing.assert_close(edited, expected.edited_logits)
    with model.trace(PROMPT):
        again = model.lm_head.output.save()
    torch.testing.assert_close(again, expected.logits)
    # Untraced calls are plain too.
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model._module(ids).logits, expected.logits)
    with pytest.raises(ndif.OutsideTraceError):
        model.lm_head.output


# -- the model is healthy to begin with ----------------------------------------------------


def test_model_is_healthy_before_any_error(model, expected):
    assert_healthy(model, expected)


# -- missed values -----------------------------------------------------------------------


def test_out_of_order_within_one_invoke(model, expected):
    with pytest.raises(ndif.OutOfOrderError) as excinfo:
        with model.trace(PROMPT):
            late = model.model.layers[2].output.save()
            early = model.model.layers[0].output.save()  # @out_of_order
    error = excinfo.value
    assert isinstance(error, ndif.MissedValueError) and isinstance(error, ndif.NDIFError)
    assert "model.model.layers.0" in str(error)
    assert_points_at(error, "out_of_order")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_out_of_order_in_the_second_invoke_names_it(model, expected):
    with pytest.raises(ndif.OutOfOrderError) as excinfo:
        with model.trace() as tracer:
            with tracer.invoke(PROMPT):
                fine = model.model.layers[0].output.save()
            with tracer.invoke("The capital of France is"):
                late = model.model.layers[3].output.save()
                early = model.model.layers[1].mlp.output.save()  # @out_of_order_invoke
    error = excinfo.value
    assert "model.model.layers.1.mlp" in str(error)
    assert "invoke #2" in str(error)
    assert_points_at(error, "out_of_order_invoke")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_attached_module_that_never_runs(tiny_llama_path, expected):
    # A model of its own: the attached module stays attached.
    model = ndif.LanguageModel(tiny_llama_path, dispatch=True)
    model.model.probe = torch.nn.Linear(64, 2)  # attached, but the forward never calls it
    with pytest.raises(ndif.NeverRanError) as excinfo:
        with model.trace(PROMPT):
            hidden = model.model.layers[0].output.save()
            probed = model.model.probe.output.save()  # @never_ran
    error = excinfo.value
    assert "model.model.probe" in str(error)
    assert_points_at(error, "never_ran")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_module_of_a_different_model(model, expected, gpt2, reference_gpt2):
    with pytest.raises(ndif.NDIFError) as excinfo:
        with model.trace(PROMPT):
            foreign = gpt2.transformer.h[0].output.save()  # @foreign
    error = excinfo.value
    assert isinstance(error, ndif.NeverRanError), f"expected NeverRanError, got {type(error).__name__}: {error}"
    assert "transformer.h.0" in str(error)
    assert_points_at(error, "foreign")
    assert_healthy(model, expected)
    # The other model is untouched too.
    ids = gpt2.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with gpt2.trace(PROMPT):
        gpt2_logits = gpt2.lm_head.output.save()
    with torch.no_grad():
        torch.testing.assert_close(gpt2_logits, reference_gpt2(ids).logits)
    assert_no_internal_frames(error)


def test_next_step_in_a_single_forward_never_runs(model, expected):
    with pytest.raises(ndif.NeverRanError) as excinfo:
        with model.trace(PROMPT):
            now = model.model.layers[0].output.save()
            later = model.model.layers[1].next().output.save()  # @next_step
    error = excinfo.value
    assert "model.model.layers.1" in str(error)
    assert_points_at(error, "next_step")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


# -- reaching modules ----------------------------------------------------------------------


def test_misspelled_module_path(model, expected):
    with pytest.raises(AttributeError) as excinfo:
        with model.trace(PROMPT):
            hidden = model.model.layer[0].output.save()  # @typo
    error = excinfo.value
    assert "Did you mean 'layers'" in str(error)
    assert "model.model" in str(error)
    assert_points_at(error, "typo")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_index_out_of_range(model, expected):
    with pytest.raises(IndexError) as excinfo:
        with model.trace(PROMPT):
            hidden = model.model.layers[99].output.save()  # @index
    error = excinfo.value
    assert "model.model.layers" in str(error)
    assert "99" in str(error)
    assert_points_at(error, "index")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


# -- the user's own exceptions -------------------------------------------------------------


def test_zero_division_in_the_body(model, expected):
    with pytest.raises(ZeroDivisionError) as excinfo:
        with model.trace(PROMPT):
            hidden = model.model.layers[1].output
            ratio = hidden.shape[0] / 0  # @zero_division
    error = excinfo.value
    assert type(error) is ZeroDivisionError
    assert_points_at(error, "zero_division")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_zero_division_before_any_request(model, expected):
    with pytest.raises(ZeroDivisionError) as excinfo:
        with model.trace(PROMPT):
            ratio = 1 / 0  # @zero_division_first
            hidden = model.model.layers[1].output.save()
    assert_points_at(excinfo.value, "zero_division_first")
    assert_healthy(model, expected)
    assert_no_internal_frames(excinfo.value)


def test_shape_error_from_a_torch_op_in_user_code(model, expected):
    with pytest.raises(RuntimeError) as excinfo:
        with model.trace(PROMPT):
            hidden = model.model.layers[1].output
            projected = hidden @ torch.zeros(3, 3)  # @torch_shape
    error = excinfo.value
    assert "shape" in str(error) or "size" in str(error)
    assert_points_at(error, "torch_shape")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_wrong_shaped_output_assignment(model, expected):
    with pytest.raises(RuntimeError) as excinfo:
        with model.trace(PROMPT):  # @wrong_shape_with
            model.model.layers[0].output = torch.zeros(3)  # @wrong_shape
            logits = model.lm_head.output.save()
    error = excinfo.value
    assert not isinstance(error, ndif.NDIFError), "the model's own error is expected, not a wrapper"
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "model.model.layers.0.output" in notes, f"no note names the assignment: {notes!r}"
    assert f"line {line_of('wrong_shape')}" in notes, f"no note names the assignment's line: {notes!r}"
    assert os.path.basename(THIS_FILE) in notes
    # The model raised it, called from the trace's exit: the line of the `with` (or of
    # the assignment) is the last line of this file shown.
    assert_points_at(error, "wrong_shape_with", "wrong_shape")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


# -- outside a trace -------------------------------------------------------------------------


def test_output_outside_a_trace(model, expected):
    with pytest.raises(ndif.OutsideTraceError) as excinfo:
        model.model.layers[0].output  # @outside_output
    error = excinfo.value
    assert isinstance(error, ndif.NDIFError)
    assert "model.model.layers.0.output" in str(error)
    assert_points_at(error, "outside_output")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_output_of_a_stored_envoy_after_the_trace(model, expected):
    layer = model.model.layers[3]
    with model.trace(PROMPT):
        hidden = layer.output.save()
    assert hidden.shape[-1] == 64
    with pytest.raises(ndif.OutsideTraceError) as excinfo:
        layer.output  # @outside_after
    assert "model.model.layers.3.output" in str(excinfo.value)
    assert_points_at(excinfo.value, "outside_after")
    assert_healthy(model, expected)
    assert_no_internal_frames(excinfo.value)


def test_save_outside_a_trace(model, expected):
    with pytest.raises(ndif.OutsideTraceError) as excinfo:
        ndif.save(torch.zeros(2))  # @outside_save
    assert_points_at(excinfo.value, "outside_save")
    assert_healthy(model, expected)
    assert_no_internal_frames(excinfo.value)


# -- invokes and barriers --------------------------------------------------------------------


def test_invoke_in_a_trace_given_an_input(model, expected):
    with pytest.raises(ndif.InvokeError) as excinfo:
        with model.trace(PROMPT) as tracer:
            with tracer.invoke("The capital of France is"):  # @invoke_with_input
                logits = model.lm_head.output.save()
    assert_points_at(excinfo.value, "invoke_with_input")
    assert_healthy(model, expected)
    assert_no_internal_frames(excinfo.value)


def test_trace_without_input_or_invokes(model, expected):
    with pytest.raises(ndif.InvokeError) as excinfo:
        with model.trace() as tracer:  # @no_input
            nothing = 1
    assert_points_at(excinfo.value, "no_input")
    assert_healthy(model, expected)
    assert_no_internal_frames(excinfo.value)


def test_barrier_reached_by_fewer_blocks_than_created_for(model, expected):
    with pytest.raises(ndif.BarrierError) as excinfo:
        with model.trace() as tracer:
            barrier = tracer.barrier(3)
            with tracer.invoke(PROMPT):
                source = model.model.layers[1].output
                barrier()  # @barrier
            with tracer.invoke("The capital of France is"):
                barrier()
                model.model.layers[1].output[:, -1] = source[:, -1]
                patched = model.lm_head.output.save()
    error = excinfo.value
    assert "barrier" in str(error)
    assert_points_at(error, "barrier")
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


# -- how the block is written ---------------------------------------------------------------


def test_body_on_the_with_line(model, expected):
    # fmt: off
    with pytest.raises(ndif.TraceSyntaxError) as excinfo:
        with model.trace(PROMPT): logits = model.lm_head.output.save()  # @one_liner  # noqa: E701
    # fmt: on
    error = excinfo.value
    assert isinstance(error, SyntaxError)
    assert_points_at(error, "one_liner")
    assert "logits" not in locals()
    assert_healthy(model, expected)
    assert_no_internal_frames(error)


def test_pass_on_the_with_line_is_fine(model, expected):
    # fmt: off
    with model.trace(PROMPT): pass  # noqa: E701
    # fmt: on
    assert_healthy(model, expected)


# -- many errors in a row -------------------------------------------------------------------


def test_many_errors_in_a_row_leave_the_model_healthy(model, expected):
    for _ in range(5):
        with pytest.raises(ndif.OutOfOrderError):
            with model.trace(PROMPT):
                late = model.model.layers[3].output.save()
                early = model.model.layers[0].output.save()
        with pytest.raises(RuntimeError):
            with model.trace(PROMPT):
                model.model.layers[2].output = torch.zeros(5)
        with pytest.raises(ZeroDivisionError):
            with model.trace(PROMPT):
                hidden = model.model.layers[0].output
                1 / 0
    assert_healthy(model, expected)
