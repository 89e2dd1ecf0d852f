"""Several threads tracing one wrapped model at the same time.

Nothing about a running trace is process-global (docs/tracing.md, "Concurrency"):
each thread's traces must see exactly the values they would see alone, whatever
the other threads read, edit or break meanwhile. Every check compares a thread's
values with the single-threaded reference for its own prompt and edit, bit for bit.
"""

# Traces stay their own `with` inside pytest.raises, as a user writes them.
# ruff: noqa: SIM117

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ndif

PROMPTS = [
    "The Eiffel Tower is in",
    "The capital of France is",
    "One two three four five six",
    "When Mary and John went to the store",
]


@pytest.fixture(scope="module", autouse=True)
def _interleave_often():
    """Deterministic, fast CPU kernels on a small machine, and thread switches every
    few bytecodes so that traces really interleave; both restored afterwards."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


# -- what each thread does -------------------------------------------------------------------


def trace_with_edit(model: ndif.LanguageModel, index: int) -> dict[str, torch.Tensor]:
    """A trace whose prompt, edits and saved modules all depend on ``index``."""
    prompt = PROMPTS[index % len(PROMPTS)]
    layer = index % 3  # before layers[3].mlp, read below
    scale = 0.5 * (index + 1)
    with model.trace(prompt):
        before = model.model.layers[layer].output.clone().save()
        model.model.layers[layer].output[:, -1] *= scale
        model.model.layers[3].mlp.output[:, 0] = float(index)
        hidden = model.model.norm.output.save()
        logits = model.lm_head.output.save()
    return {"before": before, "hidden": hidden, "logits": logits}


def patch_between_invokes(model: ndif.LanguageModel, index: int) -> dict[str, torch.Tensor]:
    """Activation patching across two invokes with a barrier (two greenlets per trace)."""
    source = PROMPTS[index % len(PROMPTS)]
    target = PROMPTS[(index + 1) % len(PROMPTS)]
    layer = 1 + index % 3
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source):
            clean = model.model.layers[layer].output[:, -1].clone().save()
            barrier()
        with tracer.invoke(target):
            barrier()
            model.model.layers[layer].output[:, -1] = clean
            patched = model.lm_head.output.save()
    return {"clean": clean, "patched": patched}


def generate_with_steering(model: ndif.LanguageModel, index: int) -> dict[str, Any]:
    prompt = PROMPTS[index % len(PROMPTS)]
    with model.generate(prompt, max_new_tokens=4) as tracer:
        steps = ndif.save([])
        for _step in tracer.iter[:4]:
            model.model.layers[1].output[:, -1] += 0.25 * (index + 1)
            steps.append(model.lm_head.output[:, -1].clone())
        tokens = tracer.result.save()
    return {"steps": steps, "tokens": tokens}


def assert_same(actual: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key, value in expected.items():
        got = actual[key]
        if isinstance(value, list):
            assert len(got) == len(value), f"{where}: {key} has {len(got)} items, expected {len(value)}"
            for position, (a, b) in enumerate(zip(got, value)):
                assert torch.equal(a, b), f"{where}: {key}[{position}] differs from the single-threaded reference"
        else:
            assert torch.equal(got, value), f"{where}: {key} differs from the single-threaded reference"


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` in ``count`` threads started together; re-raise the first failure."""
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def target(index: int) -> None:
        try:
            start.wait(timeout=60)
            work(index)
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            failures.append(error)

    threads = [threading.Thread(target=target, args=(i,), name=f"tracer-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a tracing thread hung"
    if failures:
        raise failures[0]


# -- tests ----------------------------------------------------------------------------------


def test_reference_edits_really_differ(llama):
    """The per-thread edits give different results, so a mix-up would be caught."""
    results = [trace_with_edit(llama, i) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(results[i]["logits"][:, -1], results[j]["logits"][:, -1])
    # And the single-threaded reference is stable (so exact comparison is meaningful).
    for i in range(4):
        assert_same(trace_with_edit(llama, i), results[i], f"rerun {i}")


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_tracing_the_same_model(llama, threads):
    iterations = 50
    expected = [trace_with_edit(llama, i) for i in range(threads)]
    spans: list[tuple[float, float, int]] = []

    def work(index: int) -> None:
        for iteration in range(iterations):
            start = time.perf_counter()
            result = trace_with_edit(llama, index)
            spans.append((start, time.perf_counter(), index))
            assert_same(result, expected[index], f"thread {index}, trace {iteration}")

    run_threads(threads, work)
    # The traces really ran at the same time (not one thread after the other).
    overlapping = sum(1 for a in spans for b in spans if a[2] < b[2] and a[0] < b[1] and b[0] < a[1])
    assert overlapping > iterations // 5, f"only {overlapping} pairs of traces overlapped in time"


def test_threads_mixing_plain_traces_and_invokes_with_barriers(llama):
    iterations = 30
    traces = [trace_with_edit(llama, i) for i in range(2)]
    patches = [patch_between_invokes(llama, i) for i in range(2)]

    def work(index: int) -> None:
        for iteration in range(iterations):
            if index < 2:
                assert_same(trace_with_edit(llama, index), traces[index], f"thread {index}, trace {iteration}")
            else:
                kind = index - 2
                assert_same(patch_between_invokes(llama, kind), patches[kind], f"thread {index}, patch {iteration}")

    run_threads(4, work)


def test_concurrent_generate(llama):
    iterations = 8
    expected = [generate_with_steering(llama, i) for i in range(3)]
    assert not torch.equal(expected[0]["steps"][0], expected[1]["steps"][0])

    def work(index: int) -> None:
        for iteration in range(iterations):
            assert_same(generate_with_steering(llama, index), expected[index], f"thread {index}, generate {iteration}")

    run_threads(3, work)


def test_generate_and_trace_at_the_same_time(llama):
    iterations = 10
    generated = generate_with_steering(llama, 1)
    traced = trace_with_edit(llama, 2)

    def work(index: int) -> None:
        for iteration in range(iterations):
            if index == 0:
                assert_same(generate_with_steering(llama, 1), generated, f"generate {iteration}")
            else:
                for _ in range(3):
                    assert_same(trace_with_edit(llama, 2), traced, f"trace {iteration}")

    run_threads(2, work)


def test_an_error_in_one_thread_leaves_the_other_unaffected(llama):
    iterations = 30
    expected = trace_with_edit(llama, 3)
    raised: list[type] = []

    def failing(iteration: int) -> None:
        kind = iteration % 4
        if kind == 0:
            with pytest.raises(ndif.OutOfOrderError) as excinfo:
                with llama.trace(PROMPTS[0]):
                    late = llama.model.layers[2].output.save()
                    early = llama.model.layers[0].output.save()
            assert "model.model.layers.0" in str(excinfo.value)
        elif kind == 1:
            with pytest.raises(ZeroDivisionError):
                with llama.trace(PROMPTS[1]):
                    hidden = llama.model.layers[1].output
                    ratio = hidden.shape[0] / 0
        elif kind == 2:
            with pytest.raises(RuntimeError) as excinfo:
                with llama.trace(PROMPTS[2]):
                    llama.model.layers[1].output = torch.zeros(3)
                    logits = llama.lm_head.output.save()
            notes = "\n".join(getattr(excinfo.value, "__notes__", []))
            assert "model.model.layers.1.output" in notes
        else:
            with pytest.raises(ndif.NeverRanError):
                with llama.trace(PROMPTS[3]):
                    later = llama.model.layers[0].next().output.save()
        raised.append(kind)

    def work(index: int) -> None:
        for iteration in range(iterations):
            if index == 0:
                failing(iteration)
            else:
                assert_same(trace_with_edit(llama, 3), expected, f"healthy thread, trace {iteration}")

    run_threads(2, work)
    assert len(raised) == iterations
    # Afterwards the model is healthy in this thread too.
    assert_same(trace_with_edit(llama, 3), expected, "after the threads")


def test_untraced_calls_in_another_thread_see_no_edits(llama):
    """The permanent forward wrapper is inert outside a trace, even while another
    thread's trace is editing the same modules."""
    ids = llama.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = llama._module(ids).logits
    expected = trace_with_edit(llama, 0)
    iterations = 40

    def work(index: int) -> None:
        for iteration in range(iterations):
            if index == 0:
                assert_same(trace_with_edit(llama, 0), expected, f"trace {iteration}")
            else:
                with torch.no_grad():
                    logits = llama._module(ids).logits
                assert torch.equal(logits, plain), f"untraced call {iteration} saw another thread's edit"

    run_threads(2, work)


def test_threads_tracing_different_wrappers_of_one_module(tiny_llama_path, llama):
    """Two wrappers of the same weights (a second LanguageModel on llama's module)
    traced from two threads at once."""
    twin = ndif.LanguageModel(llama._module, tokenizer=llama.tokenizer)
    expected = [trace_with_edit(llama, 0), trace_with_edit(twin, 1)]
    iterations = 25

    def work(index: int) -> None:
        model = llama if index == 0 else twin
        for iteration in range(iterations):
            assert_same(trace_with_edit(model, index), expected[index], f"wrapper {index}, trace {iteration}")

    run_threads(2, work)
