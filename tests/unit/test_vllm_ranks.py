"""`ndif.VLLM` on an engine whose workers run the blocks (how tensor parallelism runs).

Traces go to the worker ranks as wire requests (`ndif.models.vllm.rank.RankServer`, reached
through the engine's ``collective_rpc``); here one rank in this process (`FakeWorker` over
the CPU stand-in engine), so everything but vLLM's process plumbing and NCCL runs for real.
The split-tensor side of tensor parallelism is checked in ``test_vllm_tp.py``.
"""

from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch
from fake_vllm import FakeRanksVLLM, FakeVLLM

import ndif
from ndif.models.vllm import rank as rank_module
from ndif.sandbox import CancelToken, JobLimits
from ndif.wire import codec

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2]]


def job(model, prompt, steps=4, fail_at=None, stop_at=None):
    with model.generate(prompt, max_tokens=steps) as tracer:
        hidden = ndif.save([])
        for step in tracer.iter[:steps]:
            model.model.layers[1].output[0][:] += 0.5
            hidden.append(model.model.layers[1].output[0])
            if fail_at == step:
                hidden.append(1 / 0)
            if stop_at == step:
                tracer.stop()
        tokens = tracer.result.save()
    return hidden, tokens


@pytest.fixture(scope="module")
def model():
    return FakeRanksVLLM()


def test_a_trace_runs_on_the_ranks_as_it_runs_in_process(model):
    reference = FakeVLLM()
    for prompt in PROMPTS:
        hidden, tokens = job(model, prompt)
        expected, expected_tokens = job(reference, prompt)
        assert tokens == expected_tokens
        assert all(torch.equal(a, b) for a, b in zip(hidden, expected))
    assert isinstance(model.model._module, rank_module.Skeleton)  # the driver holds no weights


def test_concurrent_jobs_share_steps_and_stay_apart(model):
    alone = [job(model, prompt) for prompt in PROMPTS]
    steps = model.engine.steps
    mixed = model.run_together([lambda p=p: job(model, p) for p in PROMPTS])
    assert model.engine.steps - steps == 4  # three jobs, the steps of one
    for (hidden, tokens), result in zip(alone, mixed):
        assert result[1] == tokens
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(hidden, result[0]))  # float64, other batch shapes


def test_a_raising_block_ends_its_own_job_at_its_line(model):
    alone = [job(model, prompt) for prompt in PROMPTS[1:]]
    mixed = model.run_together(
        [lambda: job(model, PROMPTS[0], fail_at=1)] + [lambda p=p: job(model, p) for p in PROMPTS[1:]]
    )
    assert isinstance(mixed[0], ZeroDivisionError)
    assert any(frame.line == "hidden.append(1 / 0)" for frame in traceback.extract_tb(mixed[0].__traceback__))
    for (hidden, tokens), result in zip(alone, mixed[1:]):
        assert result[1] == tokens
    assert not model.worker.ndif.jobs and not model.worker.ndif.run.jobs


def test_stop_keeps_what_was_saved(model):
    with model.generate(PROMPTS[0], max_tokens=40) as tracer:
        hidden = ndif.save([])
        for step in tracer.iter[:40]:
            hidden.append(model.model.layers[1].output[0])
            if step == 1:
                tracer.stop()
    assert len(hidden) == 2
    assert not model.worker.ndif.jobs


def test_the_driver_ends_a_job_past_its_deadline_on_the_ranks(model):
    request = _request(model, PROMPTS[0], max_tokens=1000)
    model.hold()
    try:
        started = time.monotonic()
        result = codec.decode_result(model.run_wire(request, JobLimits(time_s=0.3)))
    finally:
        model.release()
    assert result.error is not None and result.error.type == "TimeLimitExceeded"
    assert time.monotonic() - started < 5
    assert not model.worker.ndif.jobs and not model.engine.waiting


def test_a_cancel_ends_the_job_on_the_ranks(model):
    token = CancelToken()
    request = _request(model, PROMPTS[1], max_tokens=1000)
    model.hold()
    threading.Timer(0.2, token.cancel).start()
    try:
        result = codec.decode_result(model.run_wire(request, JobLimits(time_s=30), token))
    finally:
        model.release()
    assert result.error.type == "JobCancelled"
    assert job(model, PROMPTS[1])[1] == job(model, PROMPTS[1])[1]  # the engine goes on


def test_an_error_before_the_model_runs_comes_back_at_once(model):
    with pytest.raises(ZeroDivisionError):
        with model.generate(PROMPTS[0], max_tokens=2):
            1 / 0
    assert not model.worker.ndif.jobs


def _request(model, prompt, max_tokens):
    """An encoded request, as the service would hand it to the worker."""
    captured = {}

    def keep(data: bytes) -> bytes:
        captured["data"] = data
        raise RuntimeError("captured")

    with pytest.raises(RuntimeError, match="captured"):
        with model.generate(prompt, max_tokens=max_tokens, remote=keep):
            model.model.layers[0].output[0].save()
    return captured["data"]
