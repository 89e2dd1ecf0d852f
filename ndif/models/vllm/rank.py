"""ndif on one worker rank of an engine whose workers are separate processes (tensor parallel).

With tensor parallelism, vLLM's model lives in worker processes, one per GPU, and every
rank must run the same intervention code on the same (whole) values, so that their
collectives match. The driver (`EngineLoop` in the caller's process) therefore sends each
job's wire request to every rank, and each rank's `RankServer` runs it through the sandbox
exactly as a worker runs a remote job (`ndif.sandbox.run_request`), in a *job greenlet* on
the rank's worker thread:

1. ``admit(key, request)``: the job greenlet runs the request until the trace reaches the
   model: `RankModel._execute` builds the blocks and hands them over; the server admits them
   into the rank's `ServingRun` and returns the prompts and sampling options (the driver adds
   the requests, each tagged with ndif's key in ``extra_args``).
2. Steps run as on one GPU (`runner.Hooks`); split values are gathered whole (`tp`).
3. ``finish(key, outputs)``: the requests finished: ``tracer.result`` is served, the job
   greenlet resumes, ``run_request`` completes, and the rank returns the encoded `Result`.
   ``end(key, error)`` ends a job early (its block raised or stopped, or the driver decided a
   limit or a cancel); ``poll()`` tells the driver which jobs must end.

Time limits are the driver's to decide (`ServingRun.check_limits` is off here): a clock read
on one rank could end a job a step before another rank does.
"""

from __future__ import annotations

from contextvars import copy_context
from typing import Any

import torch
from greenlet import greenlet

from ...engine.serving import ServingJob, ServingRun
from ...sandbox.limits import JobLimits
from ...sandbox.runtime import run_request
from ...tracer import InvokeSpec, Trace
from ...wire import codec
from ...wire.schema import ErrorInfo, Result
from ..base import NNsight
from .requests import context_length, job_parts

#: Added to a job's time limit on the ranks: the driver ends a job at its limit, between steps.
RANK_GRACE_S = 30.0


class Handoff:
    """What a job greenlet hands the server when its trace reaches the model."""

    def __init__(self, job: ServingJob, prompts: list[dict], options: list[dict]) -> None:
        self.job = job
        self.prompts = prompts
        self.options = options


class RankModel(NNsight):
    """The rank's model as a trace sees it; running a trace hands its blocks to the server."""

    splits_residual = True  # vLLM's decoder layers, as on `VLLM` (see `ndif.interp`)

    def __init__(self, root: torch.nn.Module, source: str, max_model_len: int | None = None) -> None:
        super().__init__(root)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_job_key", None)
        object.__setattr__(self, "_max_model_len", max_model_len)

    def _model_key(self) -> str:
        return self._source

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        return {}, kwargs

    def _execute(self, trace: Trace, invokes: list[InvokeSpec], call_kwargs: dict) -> Any:
        key = self._job_key
        parts = job_parts(self._edits, trace, invokes, call_kwargs, tokenizer=False, max_model_len=self._max_model_len)
        requests = {f"{key}/{number}": blocks for number, blocks in enumerate(parts.blocks)}
        job = ServingJob(key, requests, parts.wide, copy_context())
        outputs = greenlet.getcurrent().parent.switch(Handoff(job, parts.prompts, parts.options))
        if isinstance(outputs, BaseException):
            raise outputs
        return outputs


class RankServer:
    """Runs jobs' wire requests on one rank, in step with the other ranks (see the module doc)."""

    def __init__(self, model: RankModel, run: ServingRun, hooks: Any = None) -> None:
        self.model = model
        self.run = run
        self.hooks = hooks  # the runner's (step counters), where there is one
        self.jobs: dict[str, tuple[greenlet, ServingJob | None]] = {}

    def admit(self, key: str, data: bytes, limits: dict | None = None) -> dict:
        """Start a job; returns its requests (``prompts``, ``options``) or, if it ended before
        reaching the model, its encoded ``result``."""
        try:
            request = codec.decode_request(data)
        except Exception as error:  # noqa: BLE001 - a request the driver accepted but this rank cannot read
            return {"result": codec.encode_result(_failed(error))}
        job_limits = JobLimits(**(limits or {}))
        job_limits.time_s += RANK_GRACE_S
        worker = greenlet(lambda: run_request(self.model, request, job_limits, job_id=key))
        worker.gr_context = copy_context()
        object.__setattr__(self.model, "_job_key", key)
        try:
            handed = worker.switch()
        finally:
            object.__setattr__(self.model, "_job_key", None)
        if isinstance(handed, Result):
            return {"result": codec.encode_result(handed)}
        self.jobs[key] = (worker, handed.job)
        self.run.admit(handed.job)
        return {"prompts": handed.prompts, "options": handed.options}

    def finish(self, key: str, outputs: list[Any]) -> bytes:
        """The job's requests finished with ``outputs`` (token ids per request): its result."""
        worker, job = self.jobs.pop(key)
        self.run.retire(job, {f"{key}/{number}": output for number, output in enumerate(outputs)})
        if job.error is not None:  # a block raised while handed its result
            return self._resume(worker, job.error)
        return self._resume(worker, outputs)

    def end(self, key: str, kind: str | None = None, message: str = "", outputs: list[Any] | None = None) -> bytes:
        """End a job now: with the error its block raised, with ``kind``/``message`` (a limit or a
        cancel decided by the driver), or, after ``tracer.stop()``, with what it has."""
        worker, job = self.jobs.pop(key)
        if kind is None and job.error is None and job.stopped:
            self.run.retire(job, {f"{key}/{number}": output for number, output in enumerate(outputs or [])})
            return self._resume(worker, outputs)
        error = job.error if kind is None else _error(kind, message)
        self.run.kill(job)
        return self._resume(worker, error)

    def poll(self) -> list[str]:
        """Jobs that must end now (a block raised or called ``tracer.stop()``), in a fixed order."""
        return sorted(job.key for job in self.run.take_finished() if job.key in self.jobs)

    def _resume(self, worker: greenlet, value: Any) -> bytes:
        result = worker.switch(value)
        if not isinstance(result, Result):  # the body asked for the model again after it ran
            worker.throw(GeneratorExit)
            result = _failed(RuntimeError("the trace ran the model twice; one trace is one job"))
        return codec.encode_result(result)


def _error(kind: str, message: str) -> BaseException:
    """The exception the driver named (a limit, a cancel, a bad request), to end a job with."""
    from ...sandbox import limits
    from ...tracing import errors

    for home in (limits, errors):
        cls = getattr(home, kind, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls(message)
    return RuntimeError(f"{kind}: {message}")


def _failed(error: BaseException) -> Result:
    result = Result()
    result.error = ErrorInfo(type=type(error).__name__, message=str(error), frames=[], notes=[])
    return result


def rank_server(hooks: Any, source: str, rank: int, size: int, gather: Any) -> RankServer:
    """ndif on one rank: envoys over the rank's model, its serving run (split values made
    whole with ``gather``), and the server the driver's RPCs reach."""
    from .tp import model_shardings

    model = RankModel(hooks.root, source, context_length(hooks.runner))
    shardings = {module.forward.site: sharding for module, sharding in model_shardings(hooks.root, rank, size).items()}
    run = hooks.start_run(model, shardings=shardings, gather=gather, check_limits=False)
    return RankServer(model, run, hooks)


class Skeleton(torch.nn.Module):
    """A module with a name and children only: the driver's picture of the ranks' model."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.kind} runs on the engine's workers; call it inside a trace's model run")

    def extra_repr(self) -> str:
        return self.kind


def module_structure(root: torch.nn.Module) -> list[tuple[str, str]]:
    """Every module's path and class name (plain data, for the driver)."""
    return [(name, type(module).__name__) for name, module in root.named_modules() if name]


def build_skeleton(structure: list[tuple[str, str]], kind: str = "model") -> torch.nn.Module:
    """A tree of `Skeleton` modules with the ranks' module paths (envoys resolve paths on it)."""
    root = Skeleton(kind)
    for path, name in structure:
        parent = root
        *parents, last = path.split(".")
        for part in parents:
            parent = parent._modules[part]
        parent.add_module(last, Skeleton(name))
    return root
