"""A model worker serving a vLLM deployment: many users' jobs in one engine's batches.

The real `ModelActor` (called directly, not through Ray) with its local object store;
its model is `FakeVLLM` (the backend over a CPU stand-in for vLLM's engine), so the
actor's threads, the sandbox, the wire format and the serving engine all run for real.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from fake_vllm import FakeRanksVLLM, FakeVLLM

import ndif
from ndif_scheduler.config import Settings
from ndif_scheduler.storage import request_key, result_key
from ndif_workers import actor as actor_module

STEPS = 5


@pytest.fixture
def worker(tmp_path, monkeypatch):
    model = FakeVLLM()
    monkeypatch.setattr(actor_module, "load_model", lambda deployment: model)
    deployment = {"key": "toy-vllm", "path": "toy-vllm", "backend": "vllm", "max_concurrency": 8}
    # A generous time limit: on a loaded 2-core CI machine six jobs can take seconds to be
    # queued, and a job's time runs from its start (a 5 s limit once ended them all while held).
    settings = Settings(state_dir=tmp_path, job_time_s=120.0).model_dump(mode="json")
    return actor_module.ModelActor(deployment, settings), model


def through(worker_actor, outcomes, job_id=None):
    """A ``remote=`` backend that runs the request on the actor as a dispatcher would."""

    def backend(data: bytes) -> bytes:
        key = job_id or uuid.uuid4().hex
        worker_actor.store.put(request_key(key), data)
        outcomes.append(worker_actor.run(key))
        return worker_actor.store.get(result_key(key))

    return backend


def job(model, backend, prompt, steer=0.0):
    with model.generate(prompt, max_tokens=STEPS, remote=backend) as tracer:
        hidden = ndif.save([])
        for step in tracer.iter[:STEPS]:
            model.model.layers[1].output[0][:] += steer
            hidden.append(model.model.layers[1].output[0])
        tokens = tracer.result.save()
    return hidden, tokens


def test_concurrent_jobs_share_the_engines_steps_and_stay_apart(worker):
    actor, model = worker
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3, 3, 3], [7, 1]]
    outcomes: list = []
    alone = [job(model, through(actor, outcomes), prompt, steer=0.25 * n) for n, prompt in enumerate(prompts)]
    steps, counts = model.engine.steps, dict(model.step_counts)
    results = model.run_together(
        [lambda n=n, p=p: job(model, through(actor, outcomes), p, steer=0.25 * n) for n, p in enumerate(prompts)]
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert model.engine.steps - steps == STEPS  # six users' jobs, one engine, the steps of one job
    # Sandboxed code that names only layer outputs is served on the graphs' taps.
    assert model.step_counts["taps"] - counts["taps"] == STEPS and model.step_counts["eager"] == counts["eager"]
    for n, (hidden, tokens) in enumerate(alone):
        assert results[n][1] == tokens
        for a, b in zip(hidden, results[n][0]):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-12
    assert {outcome["status"] for outcome in outcomes} == {"completed"}


def test_a_cancelled_job_ends_alone_and_the_actor_stays_healthy(worker):
    actor, model = worker
    outcomes: list = []
    model.hold()
    cancelled = threading.Thread(target=lambda: _expect_error(model, actor, outcomes, "slow"))
    cancelled.start()
    deadline = time.monotonic() + 10
    while not model.engine.waiting and time.monotonic() < deadline:
        time.sleep(0.005)
    assert actor.cancel("slow")
    model.release()
    cancelled.join(30)
    assert outcomes[0]["status"] == "cancelled"
    hidden, tokens = job(model, through(actor, outcomes), [1, 2, 3])
    assert len(tokens) == STEPS and outcomes[-1]["status"] == "completed"
    assert not model._hooks.run.jobs
    assert actor.health()["in_flight"] == 0


def _expect_error(model, actor, outcomes, job_id):
    with pytest.raises(Exception, match="cancelled"):
        job(model, through(actor, outcomes, job_id), [5, 6, 7])


def test_an_engine_failure_takes_the_replica_down_for_a_restart(worker, monkeypatch):
    actor, model = worker
    exits = []
    monkeypatch.setattr(actor_module.os, "_exit", lambda code: exits.append(code))

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model.engine, "step", broken_step)
    outcomes: list = []
    with pytest.raises(Exception, match="engine failed"):
        job(model, through(actor, outcomes), [1, 2, 3])
    assert exits == [70]  # the process would end here; Ray restarts the actor, dispatchers retry
    assert not model.healthy
    with pytest.raises(RuntimeError, match="engine failed"):
        actor.health()  # dispatchers stop routing to it meanwhile


def test_a_tensor_parallel_deployment_runs_requests_on_its_ranks(tmp_path, monkeypatch):
    ranks, reference = FakeRanksVLLM(), FakeVLLM()
    monkeypatch.setattr(actor_module, "load_model", lambda deployment: ranks)
    deployment = {"key": "toy-vllm", "path": "toy-vllm", "backend": "vllm", "tensor_parallel_size": 2}
    actor = actor_module.ModelActor(deployment, Settings(state_dir=tmp_path).model_dump(mode="json"))
    outcomes: list = []
    hidden, tokens = job(ranks, through(actor, outcomes), [4, 2, 4, 2], steer=0.5)
    expected, expected_tokens = job(reference, None, [4, 2, 4, 2], steer=0.5)
    assert outcomes[-1]["status"] == "completed" and tokens == expected_tokens
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(hidden, expected))
    assert not ranks.worker.ndif.jobs
