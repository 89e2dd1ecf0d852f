"""The traces the serving benchmarks time, one per thread: `tests.bench.vllm` on a real
vLLM engine (GPU), `tests.bench.serving` on the CPU stand-in."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ndif

#: A job: a prompt in, the number of tokens its trace generated out.
Job = Callable[[list[int]], int]


def trace_jobs(model: Any, layer: Any, steer: Any, steps: int) -> dict[str, Job]:
    """Traces of ``steps`` tokens on ``model``: ``plain`` only saves ``tracer.result``;
    ``saving`` appends ``layer``'s output at every step; ``steering`` adds ``steer`` to it
    in place at every step; ``steering_eagerly`` does the same by code that also names an
    MLP, which has no tap, so that its steps run eagerly."""

    def plain(prompt: list[int]) -> int:
        with model.generate(prompt, max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            out = tracer.result.save()
        return len(out)

    def saving(prompt: list[int]) -> int:
        with model.generate(prompt, max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            hidden = ndif.save([])
            for _ in tracer.iter[:steps]:
                hidden.append(layer.output[0])
            out = tracer.result.save()
        return len(out)

    def steering(prompt: list[int]) -> int:
        with model.generate(prompt, max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            for _ in tracer.iter[:steps]:
                layer.output[0][:] += steer
            out = tracer.result.save()
        return len(out)

    def steering_eagerly(prompt: list[int]) -> int:
        # The same steering, by code that also reaches a module without a tap (it never
        # reads it): ndif cannot serve such a job on the graphs' taps, so its steps run eagerly.
        with model.generate(prompt, max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            for _ in tracer.iter[:steps]:
                layer.output[0][:] += steer
                if steps < 0:
                    layer.mlp.output.save()
            out = tracer.result.save()
        return len(out)

    return {"plain": plain, "saving": saving, "steering": steering, "steering_eagerly": steering_eagerly}


def cases(jobs: dict[str, Job]) -> dict[str, Callable[[int], Job]]:
    """The benchmark's cases: for each, which job the ``n``-th request runs."""
    plain, steering, eagerly = jobs["plain"], jobs["steering"], jobs["steering_eagerly"]
    return {
        "ndif-none": lambda n: plain,
        "ndif-save": lambda n: jobs["saving"],
        "ndif-steer": lambda n: steering,
        "ndif-steer-10%": lambda n: steering if n % 10 == 0 else plain,
        "ndif-steer-eager": lambda n: eagerly,
        "ndif-steer-10%-eager": lambda n: eagerly if n % 10 == 0 else plain,
    }


#: A job of the one-call form: every prompt of the batch in one trace, one invoke each.
OneCall = Callable[[list[list[int]]], int]


def one_call_jobs(model: Any, layer: Any, steer: Any, steps: int) -> dict[str, OneCall]:
    """The goal cases in one call, as vLLM's ``LLM.generate`` takes its batch: one trace of
    one invoke (one vLLM request) per prompt, doing what `trace_jobs`' trace of that case
    does. Each returns the tokens generated."""

    def none(batch: list[list[int]]) -> int:
        with model.generate(max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            outputs = ndif.save([])
            for prompt in batch:
                with tracer.invoke(prompt):
                    outputs.append(tracer.result)
        return sum(len(output) for output in outputs)

    def save(batch: list[list[int]]) -> int:
        with model.generate(max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            outputs = ndif.save([])
            for prompt in batch:
                with tracer.invoke(prompt):
                    hidden = ndif.save([])
                    for _ in tracer.iter[:steps]:
                        hidden.append(layer.output[0])
                    outputs.append(tracer.result)
        return sum(len(output) for output in outputs)

    def steering(batch: list[list[int]], every: int) -> int:
        with model.generate(max_tokens=steps, ignore_eos=True, temperature=0) as tracer:
            outputs = ndif.save([])
            for number, prompt in enumerate(batch):
                with tracer.invoke(prompt):
                    if number % every == 0:
                        for _ in tracer.iter[:steps]:
                            layer.output[0][:] += steer
                    outputs.append(tracer.result)
        return sum(len(output) for output in outputs)

    return {
        "ndif-none-one-call": none,
        "ndif-save-one-call": save,
        "ndif-steer-one-call": lambda batch: steering(batch, 1),
        "ndif-steer-10%-one-call": lambda batch: steering(batch, 10),
    }


@dataclass
class ClientRun:
    """What `run_clients` measured: per client, its tokens, its thread's CPU time and any
    error; when the clients were released and how long until the last one finished."""

    counts: list[int]
    cpu_s: list[float]
    errors: list[str]
    started: float  # time.perf_counter() when the clients were released
    seconds: float


def run_clients(jobs: list[tuple[Job, Any]], before: Callable[[], None] | None = None) -> ClientRun:
    """Run each ``(job, prompt)`` on its own thread, all released together.

    The threads are started before the clock, as plain vLLM's batch is built before its
    clock starts: starting hundreds of threads is the harness's cost, not ndif's. ``before``
    runs once they all wait (a snapshot of counters), just before the clock starts.
    """
    counts = [0] * len(jobs)
    cpu = [0.0] * len(jobs)
    errors: list[str] = []
    ready = threading.Barrier(len(jobs) + 1)

    def client(number: int, job: Job, prompt: Any) -> None:
        ready.wait()
        began = time.thread_time()
        try:
            counts[number] = job(prompt)
        except BaseException as error:  # noqa: BLE001 - reported
            errors.append(repr(error))
        cpu[number] = time.thread_time() - began

    threads = [threading.Thread(target=client, args=(n, job, prompt)) for n, (job, prompt) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    if before is not None:
        before()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return ClientRun(counts, cpu, errors, started, time.perf_counter() - started)
