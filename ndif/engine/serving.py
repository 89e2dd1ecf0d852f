"""Interleaving inside a continuous-batching engine (vLLM): many jobs, one flat batch.

A serving engine runs one forward per step over a flat ``[num_tokens, ...]`` batch that
mixes the requests of many jobs, each at its own step: one decoding its 40th token,
another prefilling its prompt (perhaps in chunks), a third not intervening at all. This
module is the engine side of that, free of any vLLM import so that it is tested on CPU:

* `FlatBatcher`: a block's group is a stable key (its request, or all of its job's
  requests); every step the backend tells the batcher where each request's rows are.
  Reads are private copies (an engine reuses and overwrites its buffers in place);
  a copy the block edited in place is written back when the event has been served.
* `ServingRun`: one long-lived `Run` per engine. Jobs are admitted and retired while it
  runs; each step the backend says which requests are scheduled (`Scheduled`), and the
  run advances only their blocks, serves only them, and tells the backend how to run
  the step (`StepMode`): on its graphs when none of them intervenes in the forward, on
  its graphs with taps when they wait only for tapped sites, else eagerly.
  One block's exception, ``tracer.stop()`` or time limit ends its own job only.

The backend (``ndif.models.vllm``) calls, per step: `ServingRun.begin` with the
scheduled requests, `FlatBatcher.layout` once the token layout is known, runs the model
with ``ACTIVE_RUN`` set (eager steps), `ServingRun.sampling` before the logits and samples
are served, and `ServingRun.end`; then `ServingRun.take_finished` for jobs to end early.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from contextvars import Context
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from ..tracing.errors import InvokeError, NDIFError
from ..tracing.names import names_in
from .batching import map_tensors, merge_structure
from .mediator import BARRIER, INPUT, OUTPUT, READ, RESULT, Mediator, Slot
from .run import Run

Key = Hashable


class Preempted(NDIFError):
    """The engine preempted a request after its job had edited it; the edit cannot be replayed."""


@dataclass(frozen=True)
class JobRows:
    """The group of a block that sees every request of its job (an edit, an input-less invoke)."""

    job: Key
    keys: tuple


@dataclass
class Scheduled:
    """One request's part in a step.

    Attributes:
        key: The request.
        new_step: The step begins one of the request's steps (its first prefill chunk,
            or a decode); a later prefill chunk continues step 0.
        samples: The step ends with a token for it (its last prefill chunk, or a decode).
    """

    key: Key
    new_step: bool = True
    samples: bool = True


class FlatBatcher:
    """Scopes a flat ``[rows, ...]`` batch to one request's (or one job's) rows.

    `layout` sets where each request's rows are for the event being served; a tensor
    whose first dimension is the batch's row count is batched, anything else is shared.
    """

    def __init__(self) -> None:
        self.spans: dict[Key, tuple[int, int]] = {}
        self.total = -1
        self._copies: list[tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, int]] = []
        self._replaced: dict[int, torch.Tensor] = {}
        self._owned: set[int] = set()
        self._share = False
        self._own: dict[tuple[int, Any], torch.Tensor] = {}
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor, int, list[tuple[int, int]]]] = {}

    def layout(self, spans: dict[Key, tuple[int, int]], total: int) -> None:
        """Rows ``[start, stop)`` of each request; ``total`` rows in all."""
        self.spans = spans
        self.total = total

    def _spans(self, group: Any) -> list[tuple[int, int]]:
        if isinstance(group, JobRows):
            return [self.spans[key] for key in group.keys if key in self.spans]
        span = self.spans.get(group)
        if span is None:
            raise InvokeError(f"request {group!r} has no rows in this step")
        return [span]

    def prepare(self, groups: list[Any]) -> None:
        """The current event is about to be served to blocks of ``groups``.

        When they hold most of the batch's rows, each batched tensor is copied once for
        all of them and every block reads its rows of that copy: one copy instead of one
        per block. (A sandboxed block cannot reach past its view of the copy: storage,
        strides and private attributes are denied.)
        """
        rows = 0
        for group in groups:
            if isinstance(group, JobRows):
                continue
            span = self.spans.get(group)
            if span is not None:
                rows += span[1] - span[0]
        self._share = rows * 2 >= self.total and len(groups) > 1

    def narrow(self, value: Any, group: Any) -> Any:
        spans = self._spans(group)
        total = self.total
        copies = self._copies
        own = self._own
        shared = self._shared if self._share and len(spans) == 1 else None

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0 or tensor.shape[0] != total:
                return tensor
            if shared is not None:
                entry = shared.get(id(tensor))
                if entry is None:
                    whole = tensor.clone()
                    entry = shared[id(tensor)] = (tensor, whole, whole._version, [])
                start, stop = spans[0]
                entry[3].append((start, stop))
                return entry[1].narrow(0, start, stop - start)
            key = (id(tensor), group)
            copy = own.get(key)  # a block reading the value again sees its own edits
            if copy is not None:
                return copy
            if len(spans) == 1:
                start, stop = spans[0]
                copy = tensor.narrow(0, start, stop - start).clone()
            else:
                copy = torch.cat([tensor.narrow(0, start, stop - start) for start, stop in spans])
            copies.append((tensor, spans, copy, copy._version))
            own[key] = copy
            return copy

        # Normal tensors (not inference tensors), so a saved value can be edited after the job.
        guard = torch._C._InferenceMode(False)
        try:
            if isinstance(value, torch.Tensor):
                return rows(value)
            if type(value) is tuple:  # a decoder layer's (hidden, residual): the common case, fast
                return tuple(map_tensors(item, rows) for item in value)
            return map_tensors(value, rows)
        finally:
            del guard

    def widen(self, full: Any, group: Any, edited: Any) -> Any:
        spans = self._spans(group)
        size = sum(stop - start for start, stop in spans)

        def rows(whole: torch.Tensor, part: Any, where: str) -> Any:
            if whole.dim() == 0 or whole.shape[0] != self.total:
                return part
            if not isinstance(part, torch.Tensor):
                raise InvokeError(
                    f"an invoke assigned a {type(part).__name__} to {where}, which is a batched "
                    "tensor; assign a tensor with one row per token of this request"
                )
            if part.dim() == 0 or part.shape[0] != size:
                raise InvokeError(
                    f"a request with {size} row(s) in this step assigned a value of shape "
                    f"{tuple(part.shape)} to {where} (the step's batch has shape {tuple(whole.shape)})"
                )
            target = self._writable(whole)
            _put(target, spans, part)
            return target

        return merge_structure(full, edited, rows)

    def _writable(self, whole: torch.Tensor) -> torch.Tensor:
        """A tensor to write rows into: ``whole`` itself once it is ours, else a copy."""
        if id(whole) in self._owned:
            return whole
        target = whole.clone()
        self._owned.add(id(target))
        self._replaced[id(whole)] = target
        return target

    def assemble_skips(self, parts: list[tuple[Any, Any]]) -> Any:
        raise InvokeError("a serving engine runs a skipped module for the other requests")  # see ServingRun

    def commit(self, value: Any) -> Any:
        """The event is served: write copies that blocks edited in place back into the batch."""
        shared, self._shared = self._shared, {}
        for source, whole, version, handed in shared.values():
            if whole._version == version:
                continue
            target = self._current(source)
            if target is source:
                source.copy_(whole)  # rows nobody edited are copies of themselves
            else:  # a block assigned the value meanwhile: only the rows read from the copy
                for start, stop in handed:
                    target.narrow(0, start, stop - start).copy_(whole.narrow(0, start, stop - start))
        copies, self._copies = self._copies, []
        for source, spans, copy, version in copies:
            if copy._version == version:
                continue
            _put(self._current(source), spans, copy)
        self._replaced.clear()
        self._owned.clear()
        self._own.clear()
        self._share = False
        return value

    def _current(self, source: torch.Tensor) -> torch.Tensor:
        """The tensor that now stands for ``source`` in the event's value (after assignments)."""
        target = source
        while id(target) in self._replaced:
            target = self._replaced[id(target)]
        return target


def _put(target: torch.Tensor, spans: list[tuple[int, int]], rows: torch.Tensor) -> None:
    """Write ``rows`` (the spans' rows, one after the other) into ``target`` at ``spans``."""
    offset = 0
    for start, stop in spans:
        target.narrow(0, start, stop - start).copy_(rows.narrow(0, offset, stop - start))
        offset += stop - start


class StepMode(IntEnum):
    """How the backend runs a step's forward pass."""

    GRAPHS = 0  # no scheduled block waits for a value of the forward: the engine's own choice
    TAPS = 1  # blocks wait only for tapped sites: compiled code split at the taps (no FULL graph)
    EAGER = 2  # module by module, every instrumented module reaching the run


@dataclass(eq=False)
class ServingJob:
    """One job's blocks on a serving run.

    Attributes:
        key: The job's id.
        requests: Its requests, in invoke order, each with the blocks that see only it.
        wide: Blocks that see all of the job's requests (edits, invokes without input).
        context: The context its blocks start in (its saves, its sandbox guard).
    """

    key: Key
    requests: dict[Key, list[Mediator]]
    wide: list[Mediator] = field(default_factory=list)
    context: Context | None = None
    error: BaseException | None = None
    stopped: bool = False
    guard: Any = None
    taps: bool = False  # its code names no module but tapped ones: its steps may run on taps
    names: frozenset[str] | None = None  # what its code can name (`names_reached`), if scanned already
    mediators: list[Mediator] = field(init=False)  # every block: the wide ones, then each request's

    def __post_init__(self) -> None:
        self.mediators = list(self.wide)
        for own in self.requests.values():
            self.mediators.extend(own)


class ServingRun(Run):
    """A run that never ends: jobs come and go while the engine steps.

    Args:
        sites: The served model's sites (to explain a request for a module it lacks).
        passive: Sites served outside the forward pass (logits, samples): blocks waiting
            on them do not make a step eager.
        shardings: Under tensor parallelism, the sites whose values each rank holds a
            slice of (``ndif.models.vllm.tp.SiteSharding``): blocks see them whole.
        gather: The all-gather those use (every rank serves the same events, so the
            collectives match).
        check_limits: Check each job's time limit and cancellation at every step. Off on
            the ranks of a tensor-parallel engine, where a clock read on one rank could end a
            job one step before another rank does (their collectives would then not match):
            the driver decides, between steps, for all ranks.

    Taps (``ndif.models.vllm.taps``): the backend sets ``tapped`` (sites it can serve on a
    compiled step) and ``untapped_names`` (names that reach any other module). A job whose
    code uses none of those names (`ndif.tracing.names.names_in`) may take `StepMode.TAPS`
    steps.
    """

    def __init__(
        self,
        sites: Callable[[], Any] | None = None,
        passive: Iterable[Any] = (),
        shardings: dict[Any, Any] | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        check_limits: bool = True,
    ) -> None:
        super().__init__([], FlatBatcher(), root=None, isolate_errors=True, sites=sites)
        # Every live block, in admission order: a dict, so that ending a job costs its own
        # blocks, not a pass over every job's.
        self.mediators: dict[Mediator, None] = {}  # type: ignore[assignment]
        self.check_limits = check_limits
        self.shardings = shardings or {}  # site -> how its values are split across tensor-parallel ranks
        self.gather = gather
        self.batcher: FlatBatcher
        self.passive = set(passive)
        self.tapped: set[Any] = set()
        self.untapped_names: frozenset[str] = frozenset()
        self.mode = StepMode.GRAPHS  # the current step's
        self.jobs: dict[Key, ServingJob] = {}
        self.owner: dict[Mediator, ServingJob] = {}
        self.requests: dict[Key, ServingJob] = {}  # every request of a job with blocks
        self.awake: dict[Key, ServingJob] = {}  # ... whose blocks may still ask for the model
        self.started: set[Mediator] = set()
        self.active: set[Mediator] = set()  # blocks that may be served in the current phase
        self.participants: list[Mediator] = []
        self.step_jobs: list[ServingJob] = []
        self.sampling_keys: set[Key] = set()
        self.finished: list[ServingJob] = []  # jobs to end after this step (one thread steps, admits and ends)

    # -- jobs ------------------------------------------------------------------------

    def admit(self, job: ServingJob) -> None:
        """Start a job's blocks (on the thread that steps the engine): each runs until it
        first waits for the model."""
        self.jobs[job.key] = job
        if not job.mediators:
            return  # nothing to serve: its requests run as plain engine requests
        job.taps = bool(self.tapped) and self._names_only_tapped(job)
        for key in job.requests:
            self.requests[key] = job
            self.awake[key] = job
        keys = tuple(job.requests)
        for mediator in job.wide:
            mediator.group = JobRows(job.key, keys)
        for key, own in job.requests.items():
            for mediator in own:
                mediator.group = key
        mediators = job.mediators
        for mediator in mediators:
            self.owner[mediator] = job
            self.mediators[mediator] = None
            if job.context is not None:
                job.context.run(mediator.start, self)
            else:
                mediator.start(self)
        job.guard = mediators[0].guard if mediators else None
        for mediator in mediators:
            self._resume(mediator)
            self._resume_released()
        self._sleep_if_dormant(job)

    def _names_only_tapped(self, job: ServingJob) -> bool:
        names = job.names if job.names is not None else names_reached(job.mediators)
        return names is not None and self.untapped_names.isdisjoint(names)

    def retire(self, job: ServingJob, results: dict[Key, Any]) -> None:
        """The job's requests are done: serve ``tracer.result`` (each request's output;
        a job-wide block gets the list), end step loops, and drop the job's blocks."""
        self.active = set(job.mediators)
        self.finishing = True

        def serve(mediator: Mediator, request: Any) -> None:
            value = _result_for(mediator.group, results) if request.op == READ else None
            self._resume(mediator, value, slot=Slot(RESULT, None, value))

        try:
            if not job.stopped:
                hint = "in a serving engine, a job's requests meet at a barrier only in a step they share"
                self._wind_down(job.mediators, serve, hint)
        finally:
            self.finishing = False
            self.active = set()
        self._drop(job)

    def kill(self, job: ServingJob) -> None:
        """End the job's blocks where they are (cancelled, failed, or out of time)."""
        self._drop(job)

    def _drop(self, job: ServingJob) -> None:
        for mediator in job.mediators:
            if mediator.pending is not None:
                if mediator.pending.event == BARRIER:
                    self.at_barrier -= 1
                else:
                    self._unwait(mediator)
            self.results.pop(mediator, None)
            self._kill(mediator)
            mediator.run = None
            mediator.here = None
            mediator.worker = None
            self.owner.pop(mediator, None)
            self.mediators.pop(mediator, None)
            self.started.discard(mediator)
            self.errors.pop(mediator, None)
        for key in job.requests:
            self.requests.pop(key, None)
            self.awake.pop(key, None)
        self.jobs.pop(job.key, None)

    def take_finished(self) -> list[ServingJob]:
        """Jobs that must end now: a block raised, or called ``tracer.stop()``."""
        finished, self.finished = self.finished, []
        return finished

    # -- steps -----------------------------------------------------------------------

    def begin(self, scheduled: list[Scheduled]) -> StepMode:
        """A step with these requests begins (only requests of admitted jobs count).

        Returns how the backend runs its forward: on graphs if none of their blocks waits
        for a value of it, on taps if they wait only for tapped sites (and their jobs' code
        reaches no other module), else eagerly (module by module)."""
        keys = {item.key for item in scheduled}
        starting: set[Key] = set()
        sampling: set[Key] = set()
        jobs: dict[Key, ServingJob] = {}
        for item in scheduled:
            job = self.awake.get(item.key)
            if job is None:
                continue
            jobs[job.key] = job
            if item.new_step:
                starting.add(item.key)
            if item.samples:
                sampling.add(item.key)
        participants: list[Mediator] = []
        for job in jobs.values():
            if job.guard is not None and self.check_limits:
                try:
                    job.guard.tick()  # its time limit and cancellation, at every step it takes part in
                except BaseException as error:  # noqa: BLE001 - any failure ends the job only
                    self._end_job(job, error)
                    continue
            for mediator in job.wide:
                participants.append(mediator)
                if any(key in starting for key in job.requests):
                    self._advance(mediator)
            for key, own in job.requests.items():
                if key not in keys:
                    continue
                for mediator in own:
                    participants.append(mediator)
                    if key in starting:
                        self._advance(mediator)
        self.steps += 1
        self.ran = set()
        self.step_jobs = list(jobs.values())
        self.participants = [m for m in participants if m.alive]
        self.active = set(self.participants)
        self.sampling_keys = sampling
        mode = StepMode.GRAPHS
        for mediator in self.participants:
            mode = max(mode, self._needs(mediator))
            if mode == StepMode.EAGER:
                break
        self.mode = mode
        return mode

    def _advance(self, mediator: Mediator) -> None:
        if mediator in self.started:
            mediator.step += 1
        else:
            self.started.add(mediator)

    def _needs(self, mediator: Mediator) -> StepMode:
        """How a step must run for this block to be served what it waits for."""
        request = mediator.pending
        if request is None:
            return StepMode.GRAPHS
        if request.event == BARRIER or (request.event not in (INPUT, OUTPUT) and mediator.caches):
            return StepMode.EAGER
        if request.event not in (INPUT, OUTPUT) or request.step != mediator.step or request.site in self.passive:
            return StepMode.GRAPHS
        tapped = request.event == OUTPUT and request.site in self.tapped
        if tapped and not mediator.caches and self.owner[mediator].taps:
            return StepMode.TAPS
        return StepMode.EAGER

    def sampling(self) -> None:
        """The forward is over; logits and samples are served to requests that get a token."""
        self.active = {m for m in self.participants if self._samples(m.group)}

    def _samples(self, group: Any) -> bool:
        if isinstance(group, JobRows):
            return any(key in self.sampling_keys for key in group.keys)
        return group in self.sampling_keys

    def end(self) -> None:
        """The step is over: requests that got a token end their step; what a block waited
        for and did not get in it was missed."""
        completing = [m for m in self.participants if self._samples(m.group)]
        self.active = set(completing)
        self.end_step(completing)
        self.active = set()
        for job in self.step_jobs:
            if job.key in self.jobs:
                self._sleep_if_dormant(job)
        self.participants = []
        self.step_jobs = []

    def _sleep_if_dormant(self, job: ServingJob) -> None:
        """Stop stepping a job whose blocks all wait for ``tracer.result`` or are done: its
        requests then run as plain engine requests (on the graphs) until they finish."""
        for mediator in job.mediators:
            request = mediator.pending
            if mediator.alive and not (request is not None and request.event == RESULT):
                return
        for key in job.requests:
            self.awake.pop(key, None)

    def preempted(self, key: Key) -> None:
        """The engine preempted a request: it would recompute it as one prefill, which its
        blocks' steps (and edits) cannot follow; the job ends with a retryable error."""
        job = self.requests.get(key)
        if job is not None:
            self._end_job(
                job,
                Preempted(
                    "the engine preempted this job's request to free memory (too many long requests at "
                    "once); its interventions cannot be replayed on the recompute: submit the job again"
                ),
            )

    # -- serving ---------------------------------------------------------------------

    def serve_output(self, site: Any, value: Any) -> Any:
        """Serve a site's output outside a module call (a tap); returns the value to use."""
        self.ran.add(site)
        return self._output(site, value)

    def _missed(self, mediator: Mediator, request: Any) -> Exception:
        error = super()._missed(mediator, request)
        if self.mode == StepMode.TAPS and not (request.event == OUTPUT and request.site in self.tapped):
            error.args = (
                f"{error.args[0]} This step ran on vLLM's compiled graphs, which serve only layer outputs "
                f"and logits, because the job's code names no other module; it reached {request.path} "
                "without naming it (getattr with a computed name?). Name the module in the code.",
            )
        return error

    def _ready(self, mediator: Mediator) -> bool:
        return mediator in self.active and mediator.pending.step == mediator.step

    def _serve(self, slot: Slot) -> None:
        sharding = self.shardings.get(slot.site) if self.shardings else None
        memo = None
        if sharding is not None:
            slot.value, memo = sharding.whole(slot.event == INPUT, slot.value, self.gather)
        try:
            super()._serve(slot)
        finally:
            slot.value = self.batcher.commit(slot.value)
            if sharding is not None:
                slot.value = sharding.local(slot.event == INPUT, slot.value, memo)

    def _serving(self, slot: Slot, ready: list[Mediator]) -> None:
        self.batcher.prepare([mediator.group for mediator in ready])

    def _skipped(self, controller: Any, module: Any, args: tuple, kwargs: dict, skips: list) -> Any:
        # The other requests of the step still need the module: run it, then put each
        # skipping request's replacement in its rows.
        output = controller.body(module, *args, **kwargs)
        for group, value in skips:
            output = self.batcher.widen(output, group, value)
        return output

    def _stop(self, mediator: Mediator) -> None:
        job = self.owner.get(mediator)
        if job is not None and not job.stopped:
            job.stopped = True
            self.finished.append(job)

    def _failed(self, mediator: Mediator, exception: BaseException) -> None:
        super()._failed(mediator, exception)
        job = self.owner.get(mediator)
        if job is not None:
            self._end_job(job, exception)

    def _end_job(self, job: ServingJob, error: BaseException) -> None:
        if job.error is None and not job.stopped:
            job.error = error
            self.finished.append(job)

    def _resume(
        self, mediator: Mediator, value: Any = None, error: BaseException | None = None, slot: Slot | None = None
    ) -> None:
        job = self.owner.get(mediator)
        if job is not None and (job.error is not None or job.stopped) and not self.finishing:
            return  # the job is over; its other blocks wait to be dropped
        super()._resume(mediator, value, error, slot)
        guard = mediator.guard
        if guard is not None and guard.interrupted:
            guard.drain()  # an interruption aimed at the block must not land in the engine


def names_reached(mediators: Iterable[Mediator]) -> frozenset[str] | None:
    """Every name the blocks' code can use (`ndif.tracing.names.names_in`), or None where
    the scan cannot read it (such a job runs eagerly, which serves everything). A caller
    may scan on its own thread and hand the names in with the job (`ServingJob.names`)."""
    names: set[str] = set()
    try:
        for mediator in mediators:
            names |= names_in(mediator.body)
    except Exception:  # noqa: BLE001 - see above
        return None
    return frozenset(names)


def _result_for(group: Any, results: dict[Key, Any]) -> Any:
    """``tracer.result`` for a block: its request's output, or a list for a job-wide block."""
    if isinstance(group, JobRows):
        return [results.get(key) for key in group.keys]
    return results.get(group)
