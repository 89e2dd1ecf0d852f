"""The thread that owns a vLLM engine: admits jobs, steps the engine, ends jobs.

vLLM's engine is not thread-safe, and an intervention block is a greenlet that can only
be resumed on the thread that created it. So one thread does everything: callers (a
local trace, or the worker's job threads) post a `Submission` and wait on its future;
between engine steps the loop adds the job's requests, starts its blocks
(`ServingRun.admit`), and after each step ends the jobs whose requests all finished
(`ServingRun.retire`), or whose blocks raised or stopped (their requests are aborted;
the other requests of the step are untouched).
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextvars import Context
from dataclasses import dataclass, field
from typing import Any

from ...engine.mediator import Mediator
from ...engine.serving import ServingJob, ServingRun

_job_numbers = itertools.count(1)
log = logging.getLogger(__name__)


def freeze_static_heap() -> None:
    """Mark every object alive now as static for Python's garbage collector, as vLLM does
    after building its engine: ndif's own setup (envoys, hooks, the serving run) comes
    after vLLM's freeze, and without this each full collection during serving walks it
    again (on the CPU stand-in, ~30 ms a run of 256 traces before, 1-2 ms after)."""
    gc.collect()
    gc.freeze()


class EngineFailed(RuntimeError):
    """The engine (not a job) failed: every job in it ends, and the engine must be rebuilt."""


#: After a job arrives, how long the loop waits for another before stepping, and for a
#: whole burst at most: jobs submitted together then start in the same step.
ADMISSION_WAIT_S = 0.002
ADMISSION_WINDOW_S = 0.02


@dataclass
class Submission:
    """One job for the engine: a request per invoke (prompt, sampling params, its blocks)."""

    prompts: list[dict]
    params: list[Any]
    blocks: list[list[Mediator]]
    wide: list[Mediator]
    context: Context | None
    names: frozenset[str] | None = None  # what its blocks' code can name, scanned by the caller
    key: str = field(default_factory=lambda: f"ndif{next(_job_numbers)}")
    future: Future = field(default_factory=Future)
    ids: list[str] = field(default_factory=list)  # the engine's ids of its requests
    outputs: dict[str, list[int]] = field(default_factory=dict)
    job: ServingJob | None = None


@dataclass
class WireSubmission:
    """One job as a wire request, for an engine whose workers run the blocks (`rank.RankServer`).

    Its future gets the encoded `ndif.wire.schema.Result` the first rank returns.
    """

    data: bytes
    limits: dict
    make_params: Any  # sampling options (plus ndif's key in extra_args) -> vLLM's SamplingParams
    key: str = field(default_factory=lambda: f"ndif{next(_job_numbers)}")
    future: Future = field(default_factory=Future)
    ids: list[str] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)


class EngineLoop:
    """Runs a vLLM ``LLMEngine`` on its own thread for many concurrent jobs.

    Jobs come as a `Submission` (blocks that run here, on the loop's thread: the engine's
    worker is in this process) or as a `WireSubmission` (the request is sent to every worker
    rank, which run the blocks: ``collective_rpc`` to `extension.NdifWorkerExtension`).
    """

    def __init__(self, engine: Any, run: ServingRun | None) -> None:
        self.engine = engine
        self.run = run
        self.wire: dict[str, WireSubmission] = {}  # by job key
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.active: dict[str, Submission] = {}  # by job key
        self.by_request: dict[str, Submission] = {}  # by the engine's request id
        self.external: dict[str, str] = {}  # the id ndif chose -> the engine's id
        self.failure: BaseException | None = None
        self.steps = 0  # engine steps taken (benchmarks read it, with `last_admission`)
        self.last_admission = 0.0  # time.perf_counter() of the last job admitted
        self.admitting_s = 0.0  # this thread's time spent admitting jobs, in all
        self.retiring_s = 0.0  # ... and retiring finished jobs (handing over their results)
        self.thread = threading.Thread(target=self._main, name="ndif-vllm-engine", daemon=True)
        self.thread.start()

    # -- called from any thread ---------------------------------------------------------

    def submit(self, submission: Submission) -> Future:
        if self.failure is not None:
            raise EngineFailed(f"the vLLM engine stopped after an internal error: {self.failure!r}")
        self.commands.put(("submit", submission, None))
        return submission.future

    def submit_wire(self, submission: WireSubmission) -> Future:
        if self.failure is not None:
            raise EngineFailed(f"the vLLM engine stopped after an internal error: {self.failure!r}")
        self.commands.put(("wire", submission, None))
        return submission.future

    def cancel(self, submission: Submission | WireSubmission, error: BaseException) -> None:
        """End a job now with ``error`` (cancelled, or over its time limit)."""
        self.commands.put(("cancel", submission, error))

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the engine's thread between steps; returns its result."""
        future: Future = Future()
        self.commands.put(("call", fn, future))
        return future.result()

    # -- the engine's thread -------------------------------------------------------------

    def _main(self) -> None:
        engine = self.engine
        while True:
            try:
                busy = engine.has_unfinished_requests()
                self._drain(block=not busy)
                if engine.has_unfinished_requests():
                    self._collect(engine.step())
                    self.steps += 1
                if self.run is not None:
                    for job in self.run.take_finished():
                        self._end(job)
                if self.wire:
                    for key in self.engine.collective_rpc("ndif_poll")[0]:
                        self._end_wire(self.wire.get(key))
                # Let callers' threads run between steps: without this the loop, which holds
                # the GIL for most of a step, starves threads still setting up their traces,
                # and a burst of jobs trickles in over many small steps.
                time.sleep(0)
            except BaseException as error:  # noqa: BLE001 - an engine failure fails every job, loudly
                self.failure = error
                for submission in [*self.active.values(), *self.wire.values()]:
                    if not submission.future.done():
                        submission.future.set_exception(
                            EngineFailed(f"the vLLM engine failed: {type(error).__name__}: {error}")
                        )
                log.exception("the vLLM engine failed; every job in it ended")
                return

    def _drain(self, block: bool) -> None:
        window_ends = None
        while True:
            if block:
                wait = None
            elif window_ends is None:
                wait = 0
            else:  # jobs are arriving: a moment for the rest of a burst to join this step
                wait = max(0.0, min(ADMISSION_WAIT_S, window_ends - time.monotonic()))
            try:
                kind, item, extra = self.commands.get(block=wait != 0, timeout=wait)
            except queue.Empty:
                return
            block = False
            if kind in ("submit", "wire"):
                if window_ends is None:
                    window_ends = time.monotonic() + ADMISSION_WINDOW_S
                if kind == "submit":
                    self._admit(item)
                else:
                    self._admit_wire(item)
            elif kind == "cancel" and isinstance(item, WireSubmission):
                self._end_wire(item, extra)
            elif kind == "cancel":
                if item.job is not None and item.key in self.active:
                    self._abort(item)
                    self.run.kill(item.job)
                    self._forget(item)
                    if not item.future.done():
                        item.future.set_exception(extra)
            elif kind == "call":
                try:
                    extra.set_result(item())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    extra.set_exception(error)

    def _admit(self, submission: Submission) -> None:
        started = time.perf_counter()
        try:
            for number, (prompt, params) in enumerate(zip(submission.prompts, submission.params)):
                self._add(submission, number, prompt, params)
        except BaseException as error:  # noqa: BLE001 - a bad prompt or parameter fails this job only
            self._abort(submission)
            self._forget(submission)
            submission.future.set_exception(error)
            return
        self.active[submission.key] = submission
        job = ServingJob(
            submission.key,
            dict(zip(submission.ids, submission.blocks)),
            submission.wide,
            submission.context,
            names=submission.names,
        )
        submission.job = job
        self.run.admit(job)
        self.last_admission = time.perf_counter()
        self.admitting_s += self.last_admission - started

    def _add(self, submission: Submission | WireSubmission, number: int, prompt: dict, params: Any) -> None:
        """Add a job's request ``number`` to the engine, under an id ndif can map back."""
        external = f"{submission.key}-{number}"
        internal = self.engine.add_request(external, prompt, params)
        submission.ids.append(internal)
        self.external[external] = internal
        self.by_request[internal] = submission

    def _collect(self, outputs: list[Any]) -> None:
        for output in outputs:
            if not output.finished:
                continue
            internal = self.external.get(output.request_id)
            submission = self.by_request.get(internal) if internal is not None else None
            if submission is None:
                continue
            submission.outputs[internal] = list(output.outputs[0].token_ids)
            if len(submission.outputs) < len(submission.ids):
                continue
            if isinstance(submission, WireSubmission):
                self._finish_wire(submission)
            elif submission.job is not None:
                job = submission.job
                if job.error is None and not job.stopped:
                    self._retire(submission)

    # -- jobs whose blocks run on the engine's worker ranks ----------------------------------

    def _admit_wire(self, submission: WireSubmission) -> None:
        reply = self.engine.collective_rpc("ndif_admit", args=(submission.key, submission.data, submission.limits))[0]
        if "result" in reply:  # it ended before reaching the model (an error at its first lines)
            submission.future.set_result(reply["result"])
            return
        self.wire[submission.key] = submission
        try:
            for number, (prompt, options) in enumerate(zip(reply["prompts"], reply["options"])):
                params = submission.make_params(options, f"{submission.key}/{number}")
                prompt = {**prompt, "cache_salt": f"ndif-{submission.key}-{number}-{time.monotonic_ns()}"}
                self._add(submission, number, prompt, params)
        except BaseException as error:  # noqa: BLE001 - a bad prompt or sampling option ends this job only
            self._end_wire(submission, error)

    def _finish_wire(self, submission: WireSubmission) -> None:
        outputs = [submission.outputs.get(key) for key in submission.ids]
        result = self.engine.collective_rpc("ndif_finish", args=(submission.key, outputs))[0]
        self._forget_wire(submission)
        submission.future.set_result(result)

    def _end_wire(self, submission: WireSubmission | None, error: BaseException | None = None) -> None:
        """End a job early: its block raised or stopped (``error`` None), or the driver ends it."""
        if submission is None or submission.key not in self.wire or submission.future.done():
            return
        self._abort(submission)
        outputs = [submission.outputs.get(key) for key in submission.ids]
        kind, message = (None, "") if error is None else (type(error).__name__, str(error))
        result = self.engine.collective_rpc("ndif_end", args=(submission.key, kind, message, outputs))[0]
        self._forget_wire(submission)
        submission.future.set_result(result)

    def _forget_wire(self, submission: WireSubmission) -> None:
        self.wire.pop(submission.key, None)
        self._forget(submission)

    def _retire(self, submission: Submission) -> None:
        started = time.perf_counter()
        job = submission.job
        self.run.retire(job, submission.outputs)
        self._forget(submission)
        if job.error is not None:  # a block raised while being handed its result
            submission.future.set_exception(job.error)
        else:
            submission.future.set_result([submission.outputs.get(key) for key in submission.ids])
        self.retiring_s += time.perf_counter() - started

    def _end(self, job: ServingJob) -> None:
        submission = self.active.get(job.key)
        if submission is None:
            return
        self._abort(submission)
        if job.error is not None:
            self.run.kill(job)
            self._forget(submission)
            submission.future.set_exception(job.error)
        else:  # tracer.stop(): keep what was saved, end its requests
            self._retire(submission)

    def _abort(self, submission: Submission) -> None:
        running = [key for key in submission.ids if key not in submission.outputs]
        if running:
            self.engine.abort_request(running, internal=True)

    def _forget(self, submission: Submission) -> None:
        self.active.pop(submission.key, None)
        for number, key in enumerate(submission.ids):
            self.by_request.pop(key, None)
            self.external.pop(f"{submission.key}-{number}", None)
