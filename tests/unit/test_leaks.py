"""Nothing accumulates across traces: threads, greenlets, hooks, tensors, memory.

A serving process runs traces for days; each one must leave the process as it
found it, whether it finished, raised, stopped early, batched invokes behind a
barrier, generated with step loops or ran a backward block.
"""

# Traces stay their own `with` inside pytest.raises, as a user writes them.
# ruff: noqa: SIM117

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import Callable

import greenlet
import psutil
import pytest
import torch

import ndif
from ndif.engine.context import ACTIVE_RUN, CURRENT_MEDIATOR, SAVES
from ndif.tracing import capture

PROMPT = "The Eiffel Tower is in"
RSS_SLACK_MB = 30
TENSOR_SLACK = 10


# -- measuring -----------------------------------------------------------------------------


def hook_count(modules: list[torch.nn.Module]) -> int:
    per_module = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for root in modules
        for m in root.modules()
    )
    from torch.nn.modules import module as torch_module

    global_hooks = sum(
        len(getattr(torch_module, name, {}))
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )
    return per_module + global_hooks


def snapshot(modules: list[torch.nn.Module]) -> dict[str, float]:
    gc.collect()
    objects = gc.get_objects()
    counts = {
        "threads": threading.active_count(),
        # type() rather than isinstance(): some module proxies warn when asked their __class__.
        "greenlets": sum(issubclass(type(o), greenlet.greenlet) for o in objects),
        "tensors": sum(issubclass(type(o), torch.Tensor) for o in objects),
        "hooks": hook_count(modules),
        "captured blocks": len(capture._BLOCKS),
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
    }
    del objects
    return counts


def assert_no_growth(before: dict[str, float], after: dict[str, float], what: str) -> None:
    for key in ("threads", "greenlets", "hooks", "captured blocks"):
        assert after[key] == before[key], f"{what}: {key} went from {before[key]} to {after[key]}"
    assert after["tensors"] <= before["tensors"] + TENSOR_SLACK, (
        f"{what}: live tensors went from {before['tensors']} to {after['tensors']}"
    )
    growth = after["rss_mb"] - before["rss_mb"]
    assert growth < RSS_SLACK_MB, f"{what}: RSS grew by {growth:.1f} MB"


def assert_no_trace_state() -> None:
    assert CURRENT_MEDIATOR.get() is None and ACTIVE_RUN.get() is None and SAVES.get() is None


# -- the kinds of trace in the mix -----------------------------------------------------------


def make_kinds(net: torch.nn.Module, llama: ndif.LanguageModel) -> list[Callable[[], None]]:
    model = ndif.NNsight(net)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    expected = net(x).detach()

    def plain() -> None:
        with model.trace(x):
            hidden = model[0].output.save()
            model[1].output[:, 0] = 0
            out = model[2].output.save()
        assert hidden.shape == (2, 8) and out.shape == (2, 3)

    def out_of_order() -> None:
        with pytest.raises(ndif.OutOfOrderError):
            with model.trace(x):
                late = model[2].output.save()
                early = model[0].output.save()

    def body_raises() -> None:
        with pytest.raises(ZeroDivisionError):
            with model.trace(x):
                hidden = model[0].output
                ratio = hidden.shape[0] / 0

    def model_raises() -> None:
        with pytest.raises(RuntimeError):
            with model.trace(x):
                model[0].output = torch.zeros(5)
                out = model[2].output.save()

    def invokes_and_barrier() -> None:
        with model.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(x[:1]):
                source = model[0].output
                barrier()
            with tracer.invoke(x[1:]):
                barrier()
                model[0].output = source
                patched = model[2].output.save()
        assert patched.shape == (1, 3)

    def barrier_missed() -> None:
        with pytest.raises(ndif.BarrierError):
            with model.trace() as tracer:
                barrier = tracer.barrier(3)
                with tracer.invoke(x[:1]):
                    source = model[0].output
                    barrier()
                with tracer.invoke(x[1:]):
                    barrier()
                    out = model[2].output.save()

    def stop() -> None:
        with model.trace(x) as tracer:
            hidden = model[0].output.save()
            tracer.stop()
            never = model[2].output.save()
        assert hidden.shape == (2, 8)

    def backward() -> None:
        with model.trace(x):
            hidden = model[0].output
            loss = model[2].output.sum()
            with loss.backward():
                grad = hidden.grad.save()
        assert grad.shape == (2, 8)

    def cache() -> None:
        with model.trace(x) as tracer:
            cached = tracer.cache()
            out = model[2].output.save()
        torch.testing.assert_close(out, expected)
        assert cached["model.2"].output.shape == (2, 3)

    def session() -> None:
        with model.session():
            with model.trace(x):
                hidden = model[0].output
            with model.trace(x):
                model[0].output = hidden * 2
                out = model[2].output.save()
        assert out.shape == (2, 3)

    def generate() -> None:
        with llama.generate(PROMPT, max_new_tokens=3) as tracer:
            tokens = ndif.save([])
            for _step in tracer.iter[:3]:
                llama.model.layers[0].output[:, -1] *= 1.0
                tokens.append(llama.lm_head.output[:, -1].argmax(-1))
            ids = tracer.result.save()
        assert len(tokens) == 3 and ids.shape[-1] >= 3

    def generate_stop() -> None:
        with llama.generate(PROMPT, max_new_tokens=3) as tracer:
            first = llama.lm_head.output.save()
            tracer.stop()
        assert first.dim() == 3

    def llama_error() -> None:
        with pytest.raises(RuntimeError):
            with llama.trace(PROMPT):
                llama.model.layers[1].output = torch.zeros(3)
                logits = llama.lm_head.output.save()

    mlp_kinds = [plain, out_of_order, body_raises, model_raises, invokes_and_barrier, barrier_missed, stop]
    mlp_kinds += [backward, cache, session]
    # One language-model trace in every five, to keep the whole run well under a minute.
    return mlp_kinds + [generate, plain, stop, generate_stop, backward, llama_error, plain, invokes_and_barrier]


def run_mix(kinds: list[Callable[[], None]], count: int, offset: int = 0) -> None:
    for index in range(offset, offset + count):
        kinds[index % len(kinds)]()


# -- tests ---------------------------------------------------------------------------------


def test_two_thousand_traces_leave_nothing_behind(mlp, llama):
    kinds = make_kinds(mlp, llama)
    roots = [mlp, llama._module]
    trace_function = sys.gettrace()
    warm_up, total = 300, 2000
    run_mix(kinds, warm_up)
    before = snapshot(roots)
    assert before["hooks"] == 0, "ndif should not need module hooks at rest"
    run_mix(kinds, (total - warm_up) // 2, warm_up)
    middle = snapshot(roots)
    run_mix(kinds, total - warm_up - (total - warm_up) // 2, warm_up + (total - warm_up) // 2)
    after = snapshot(roots)
    assert_no_growth(before, middle, "after 1150 traces")
    assert_no_growth(before, after, "after 2000 traces")
    assert sys.gettrace() is trace_function
    assert_no_trace_state()


def test_traces_in_threads_leave_nothing_behind(mlp, llama):
    kinds = make_kinds(mlp, llama)
    roots = [mlp, llama._module]
    run_mix(kinds, len(kinds))
    before = snapshot(roots)
    failures: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            run_mix(kinds, 2 * len(kinds), offset)
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            failures.append(error)

    for _round in range(3):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
    if failures:
        raise failures[0]
    assert_no_growth(before, snapshot(roots), "after traces in 9 threads")


def _use_and_forget(model: ndif.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        hidden = model[0].output.save()
        out = model[2].output.save()
    with pytest.raises(ndif.OutOfOrderError):
        with model.trace(x):
            late = model[2].output.save()
            early = model[0].output.save()
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            hidden = model[0].output
            ratio = 1 / 0
    with model.trace(x):
        hidden = model[0].output
        loss = model[2].output.sum()
        with loss.backward():
            grad = hidden.grad.save()
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(x[:1]):
            source = model[0].output
            barrier()
        with tracer.invoke(x[1:]):
            barrier()
            model[0].output = source
            patched = model[2].output.save()


def test_deleting_a_wrapped_module_frees_it():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net_ref = weakref.ref(net)
    model = ndif.NNsight(net)
    model_ref = weakref.ref(model)
    del net
    _use_and_forget(model, torch.randn(2, 4))
    del model
    gc.collect()
    assert model_ref() is None, "the NNsight wrapper is still alive"
    assert net_ref() is None, "the wrapped module is still alive after `del model`"


def _use_language_model(model: ndif.LanguageModel) -> None:
    with model.generate(PROMPT, max_new_tokens=2) as tracer:
        logits = ndif.save([])
        for _step in tracer.iter[:2]:
            logits.append(model.lm_head.output)
    with pytest.raises(RuntimeError):
        with model.trace(PROMPT):
            model.model.layers[0].output = torch.zeros(3)
    with pytest.raises(ndif.OutOfOrderError):
        with model.trace(PROMPT):
            late = model.model.layers[2].output.save()
            early = model.model.layers[0].output.save()
    with model.trace() as tracer:
        with tracer.invoke(PROMPT):
            first = model.lm_head.output.save()
        with tracer.invoke("The capital of France is"):
            second = model.lm_head.output.save()


def test_deleting_a_language_model_frees_it(tiny_llama_path):
    model = ndif.LanguageModel(tiny_llama_path, dispatch=True)
    module_ref = weakref.ref(model._module)
    model_ref = weakref.ref(model)
    _use_language_model(model)
    del model
    gc.collect()
    assert model_ref() is None, "the LanguageModel wrapper is still alive"
    assert module_ref() is None, "the transformers model is still alive after `del model`"


def test_del_model_right_after_tracing_it_in_the_same_function_frees_it():
    """The plain way to write it: trace, then ``del model`` in the same function."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net_ref = weakref.ref(net)
    model = ndif.NNsight(net)
    with model.trace(torch.ones(2, 4)):
        out = model[2].output.save()
    assert out.shape == (2, 3)
    del model, net
    gc.collect()
    assert net_ref() is None, "the wrapped module is still alive after `del model` in the function that traced it"


def test_a_local_deleted_after_a_trace_is_freed():
    """A large value the caller drops after a trace is not kept alive by the trace."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = ndif.NNsight(net)
    activations = torch.zeros(10_000_000)  # 40 MB, unrelated to the trace
    activations_ref = weakref.ref(activations)
    with model.trace(torch.ones(2, 4)):
        out = model[2].output.save()
    del activations
    gc.collect()
    assert activations_ref() is None, "a local deleted after the trace is still alive"


def test_a_model_traced_from_another_thread_is_freed():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net_ref = weakref.ref(net)
    failures: list[BaseException] = []

    def work(model: ndif.NNsight) -> None:
        try:
            _use_and_forget(model, torch.randn(2, 4))
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            failures.append(error)

    thread = threading.Thread(target=work, args=(ndif.NNsight(net),))
    del net
    thread.start()
    thread.join(timeout=60)
    if failures:
        raise failures[0]
    del thread
    gc.collect()
    assert net_ref() is None, "the wrapped module is still alive after its model and thread are gone"
