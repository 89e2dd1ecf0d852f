"""ndif's serving overhead on the CPU stand-in engine, against that engine alone.

`tests/unit/fake_vllm.py` schedules and batches like vLLM (flat batches, continuous
batching) around a toy model; it has no GPU, no graphs and no kernels to hide behind, so
what this measures is ndif's own Python per job and per step: admitting concurrent traces,
planning each step, serving taps, running blocks, retiring jobs. The GPU benchmark
(`tests/bench/vllm.py`) says what that costs against real vLLM; this one lets the CPU side
be iterated on without a GPU.

Cases, each N concurrent requests (one per thread for ndif's), the same prompts and lengths:

* ``engine``: the stand-in engine driven directly (all requests added, stepped to the end);
* ``ndif-none``: traces that only save ``tracer.result``;
* ``ndif-steer-10%``: every tenth trace adds a vector to one layer's output at every step
  (served on taps), the others as ``ndif-none``;
* ``ndif-steer``: every trace steers (on taps);
* ``ndif-steer-eager``: every trace steers by code that names an MLP too (eager steps);
* ``ndif-none-one-call``, ``ndif-steer-one-call``: one trace of one invoke per request.

    python -m tests.bench.serving [--requests 256] [--tokens 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from fake_vllm import FakeEngine, FakeRunner, FakeVLLM, ToyForCausalLM  # noqa: E402

from .jobs import cases, one_call_jobs, run_clients, trace_jobs  # noqa: E402

LAYERS = 32


def prompts(count: int, length: int = 16) -> list[list[int]]:
    return [[(number * 7 + index) % 60 + 1 for index in range(length)] for number in range(count)]


def engine_alone(batch: list[list[int]], tokens: int) -> tuple[int, int]:
    """The stand-in engine without ndif: every request added, then stepped until done;
    returns the tokens produced and the steps taken."""
    torch.manual_seed(0)
    engine = FakeEngine(FakeRunner(ToyForCausalLM(layers=LAYERS).double().eval()), budget=8192)
    params = SimpleNamespace(max_tokens=tokens)
    for number, prompt in enumerate(batch):
        engine.add_request(f"r{number}", {"prompt_token_ids": prompt}, params)
    produced = 0
    while engine.has_unfinished_requests():
        produced += sum(len(output.outputs[0].token_ids) for output in engine.step())
    return produced, engine.steps


def ndif_jobs(model: FakeVLLM, tokens: int) -> dict[str, Callable[[list], list[tuple[Any, Any]]]]:
    """This benchmark's cases (`tests.bench.jobs`): for a batch of prompts, the ``(job,
    input)`` each client thread runs (one trace per prompt, or one trace of them all)."""
    layer = model.model.layers[LAYERS // 2]
    steer = torch.full((16,), 0.01, dtype=torch.float64)
    everything = cases(trace_jobs(model, layer, steer, tokens))
    jobs: dict[str, Callable[[list], list[tuple[Any, Any]]]] = {
        name: lambda batch, chooser=everything[name]: [(chooser(n), prompt) for n, prompt in enumerate(batch)]
        for name in ("ndif-none", "ndif-steer-10%", "ndif-steer", "ndif-steer-eager")
    }
    one_call = one_call_jobs(model, layer, steer, tokens)
    for name in ("ndif-none-one-call", "ndif-steer-one-call"):
        jobs[name] = lambda batch, job=one_call[name]: [(job, batch)]
    return jobs


def run(args: Any = None) -> dict[str, Any]:
    requests = getattr(args, "requests", 256)
    tokens = getattr(args, "tokens", 32)
    repeat = getattr(args, "repeat", 3)
    batch = prompts(requests)
    model = FakeVLLM(budget=8192, layers=LAYERS)
    cases = ndif_jobs(model, tokens)

    steps: dict[str, int] = {}
    per_request: dict[str, list[tuple[float, float]]] = {}  # the engine thread's admit and retire, µs a request

    def timed(name: str) -> float:
        if name == "engine":
            started = time.perf_counter()
            produced, steps[name] = engine_alone(batch, tokens)
            seconds = time.perf_counter() - started
        else:  # the clients start before the clock and are released together, as on the GPU
            loop = model._loop
            first, admitting, retiring = loop.steps, loop.admitting_s, loop.retiring_s
            clients = run_clients(cases[name](batch))
            per_request.setdefault(name, []).append(
                ((loop.admitting_s - admitting) * 1e6 / requests, (loop.retiring_s - retiring) * 1e6 / requests)
            )
            if clients.errors:
                raise RuntimeError(f"{name}: {len(clients.errors)} jobs failed, e.g. {clients.errors[0]}")
            produced, seconds = sum(clients.counts), clients.seconds
            steps[name] = model._loop.steps - first
        if produced != requests * tokens:
            raise RuntimeError(f"{name}: {produced} tokens, expected {requests * tokens}")
        return produced / seconds

    names = ["engine", *cases]
    for name in names:  # warm-up
        timed(name)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeat):  # interleaved, so that drift of the machine hits every case alike
        for name in names:
            rates[name].append(timed(name))
    base = statistics.median(rates["engine"])
    print(f"\nndif serving on the CPU stand-in engine: {requests} requests, {tokens} tokens, {LAYERS} layers")
    print(f"{'case':<20}{'tok/s':>10}{'/ engine':>10}{'steps':>7}{'admit us':>10}{'retire us':>11}")
    report = {}
    for name in names:
        rate = statistics.median(rates[name])
        admit, retire = (
            (statistics.median(column) for column in zip(*per_request[name])) if name in per_request else (0, 0)
        )
        report[name] = {
            "tok_s": rate,
            "ratio": rate / base,
            "runs": rates[name],
            "steps": steps.get(name),
            "admit_us_per_request": admit,
            "retire_us_per_request": retire,
        }
        print(f"{name:<20}{rate:>10.0f}{rate / base:>10.3f}{steps[name]:>7}{admit:>10.1f}{retire:>11.1f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
