"""The model side of interleaving: one execution of a model, serving its blocks.

A `Run` owns the mediators of one model execution (one forward pass, or a whole
``generate``), the batcher that scopes values to each block, and the bookkeeping of
which block waits for which event. Instrumented modules (`ndif.engine.instrument`)
call `Run.module_call` while the run is active in their context.

Steps: every call of the root module is one step (one forward of a generation
loop). A block's request binds to a step (``tracer.iter``/``tracer.next`` move it)
and to the next time its event happens in that step. A request still waiting when
its step ends was out of order or for a module that never ran; it is thrown back
into the block as an error at the user's own line.

Backends whose batch is not one forward for everyone (vLLM: requests join and
leave between steps) drive steps themselves through `begin_step`/`end_step` and
isolate errors per block (``isolate_errors``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from greenlet import GreenletExit

from ..tracing.errors import (
    BarrierError,
    InvokeError,
    IterationEnd,
    NeverRanError,
    OutOfOrderError,
    StopTrace,
    user_line,
)
from .context import ACTIVE_RUN, GUARD
from .instrument import Controller, Site
from .mediator import (
    BARRIER,
    EVENT_NAMES,
    INPUT,
    OUTPUT,
    READ,
    RESULT,
    WRITE,
    WRITE_FIRST,
    Mediator,
    Request,
    Slot,
    apply_op,
    describe_edit,
)


class Waiters:
    """Who is waiting at one module: blocks parked on its input or output, and caches.

    The blocks are ordered sets (dicts of ``None``): in the order they parked, and found
    or removed at once however many are parked (hundreds, on a serving engine)."""

    __slots__ = ("inputs", "outputs", "observers")

    def __init__(self) -> None:
        self.inputs: dict[Mediator, None] = {}
        self.outputs: dict[Mediator, None] = {}
        self.observers: list = []

    def empty(self) -> bool:
        return not (self.inputs or self.outputs or self.observers)


class Run:
    """Drives one model execution and serves its blocks' requests.

    Args:
        mediators: The blocks, in the order they are started (edits first).
        batcher: Scopes values to each block's group; ``None`` when one block
            owns the whole batch.
        root: The site whose calls delimit steps, or ``None`` if the backend
            calls `begin_step`/`end_step` itself.
        isolate_errors: Record a block's exception on it and keep the run going
            (a serving backend), instead of failing the whole run.
        sites: Returns the sites of the model being run; only consulted to explain
            a request that was never served.
        max_steps: The most steps the run can make, if known; bounds open step
            loops (``tracer.all()``) whose body never waits for the model.
    """

    def __init__(
        self,
        mediators: list[Mediator],
        batcher: Any = None,
        root: Site | None = None,
        isolate_errors: bool = False,
        sites: Callable[[], Any] | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.mediators = mediators
        self.batcher = batcher
        self.root = root
        self.isolate_errors = isolate_errors
        self.sites = sites
        self.max_steps = max_steps
        self.waiting: dict[Site, Waiters] = {}
        self.results: dict[Mediator, int] = {}  # blocks waiting for ``tracer.result`` -> their place in line
        self._in_line = itertools.count()
        self.released: list[Mediator] = []
        self.ran: set[Site] = set()  # modules called this step while a block could still ask
        self.at_barrier = 0  # blocks parked at a barrier (they may ask again mid-forward)
        self.steps = 0  # steps begun
        self.in_root = False
        self.stop_pending = False
        self.stopped = False
        self.finishing = False
        self.errors: dict[Mediator, BaseException] = {}
        self.last_edit: str | None = None

    # -- lifecycle ---------------------------------------------------------------

    def execute(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> Any:
        """Start every block, run ``fn(*args, **kwargs)`` interleaved with them, and
        finish (serve ``tracer.result``, end step loops, report what was missed).
        Returns ``fn``'s result, as edited through ``tracer.result``."""
        for mediator in self.mediators:
            mediator.start(self)
        for mediator in self.mediators:
            self._resume(mediator)
            self._resume_released()
        if self.stop_pending:
            self.stopped = True
            return self.finish(None)
        token = ACTIVE_RUN.set(self)
        try:
            result = fn(*args, **(kwargs or {}))
        except StopTrace:
            self.stopped = True
            result = None
        except BaseException as error:
            if self.last_edit is not None and not hasattr(error, "__ndif_traceback__"):
                error.add_note(f"ndif: the model raised this after {self.last_edit}.")
            raise
        finally:
            ACTIVE_RUN.reset(token)
        return self.finish(result)

    def finish(self, result: Any) -> Any:
        """The model is done: serve ``tracer.result`` and settle every block still waiting."""
        self.finishing = True
        slot = Slot(RESULT, None, result)

        def serve(mediator: Mediator, request: Request) -> None:
            self._resume(mediator, apply_op(request, slot, self.batcher, mediator.group), slot=slot)

        self._wind_down(self.mediators, serve, "check the number passed to tracer.barrier(n)")
        return slot.value

    def _wind_down(self, mediators: list[Mediator], serve: Callable[[Mediator, Request], None], hint: str) -> None:
        """Settle ``mediators``: serve those waiting for ``tracer.result`` with ``serve``, end
        step loops waiting for steps that never came, report barriers never completed."""
        while True:
            progressed = False
            for mediator in mediators:  # only these blocks: a serving run holds many jobs' blocks
                if self._parked_at_module(mediator):
                    progressed = True
                    self._settle(mediator)
            waiting = sorted((m for m in mediators if m in self.results), key=self.results.__getitem__)
            if waiting:
                progressed = True
                for mediator in waiting:
                    del self.results[mediator]
                for mediator in waiting:
                    request, mediator.pending = mediator.pending, None
                    if self.stopped:
                        self._kill(mediator)
                        continue
                    serve(mediator, request)
            if self.released:
                progressed = True
                self._resume_released()
            if not progressed:
                break
        for mediator in mediators:
            request = mediator.pending
            if mediator.alive and request is not None and request.event == BARRIER and not self.stopped:
                self._resume(
                    mediator,
                    error=BarrierError(
                        f"{mediator.label} waited at a barrier that fewer blocks reached than it was "
                        f"created for; {hint}"
                    ),
                )

    def _settle(self, mediator: Mediator) -> None:
        """A block waits for a module event that can no longer happen."""
        request = mediator.pending
        self._unwait(mediator)
        if self.stopped:
            self._kill(mediator)
        elif mediator.loops and request.step > mediator.step:
            loop = mediator.loops[-1]
            if loop.bounded:
                warnings.warn(
                    f"{mediator.label}: tracer.iter asked for step {request.step} but the run made "
                    f"{mediator.step + 1} step(s); the loop ended early (pass min_new_tokens= to "
                    "generate as many steps as the loop expects)",
                    stacklevel=1,
                )
            self._resume(mediator, error=IterationEnd())
        else:
            self._resume(mediator, error=self._missed(mediator, request))

    def close(self) -> None:
        """End every block still alive and drop all references (no leaks)."""
        for mediator in self.mediators:
            self._kill(mediator)
            mediator.run = None
            mediator.pending = None
            mediator.here = None
            mediator.worker = None
        self.waiting.clear()
        self.results.clear()
        self.released.clear()
        self.mediators = []
        self.batcher = None

    def _kill(self, mediator: Mediator) -> None:
        worker = mediator.worker
        if worker is not None and not worker.dead:
            try:
                worker.throw(GreenletExit)
            except BaseException:  # a `finally` in user code raising while unwound
                pass
        mediator.pending = None
        mediator.done = True

    # -- steps -------------------------------------------------------------------

    def begin_step(self, participants: Iterable[Mediator] | None = None) -> None:
        """A new step begins for ``participants`` (default: every block)."""
        guard = GUARD.get()
        if guard is not None:
            guard.check()  # a sandboxed job's time and memory limits
        if self.steps:
            for mediator in self.mediators if participants is None else participants:
                mediator.step += 1
        self.steps += 1
        self.ran = set()

    def end_step(self, participants: Iterable[Mediator] | None = None) -> None:
        """The step is over: a request still waiting for it was missed."""
        members = None if participants is None else set(participants)
        for site in list(self.waiting):
            waiters = self.waiting.get(site)
            if waiters is None:
                continue
            for mediator in [*waiters.inputs, *waiters.outputs]:
                if members is not None and mediator not in members:
                    continue
                request = mediator.pending
                if request is not None and request.step <= mediator.step:
                    self._unwait(mediator)
                    self._resume(mediator, error=self._missed(mediator, request))

    def _missed(self, mediator: Mediator, request: Request) -> Exception:
        what = request.describe()
        step = f" (generation step {request.step})" if self.steps > 1 or request.step else ""
        if self.sites is not None and request.site not in self.sites():
            return NeverRanError(
                f"{what} was requested, but {request.path} is not a module of the model being "
                f"traced (it belongs to another model). ({mediator.label})"
            )
        if request.step > mediator.step or self.steps == 0:
            return NeverRanError(
                f"{what} was requested for step {request.step}, but the run made only "
                f"{max(self.steps, 1)} step(s); nothing was served to it. ({mediator.label})"
            )
        if request.site in self.ran:
            return OutOfOrderError(
                f"{what} was requested after the model had already run {request.path}{step}. "
                f"Within one invoke, request modules in the order the forward pass runs them "
                f"(or use separate invokes, or tracer.cache()). ({mediator.label})"
            )
        return NeverRanError(
            f"{what} was requested but {request.path} never ran{step}: the model's forward "
            f"pass does not call it (or it was skipped). ({mediator.label})"
        )

    # -- module events -------------------------------------------------------------

    def module_call(self, controller: Controller, module: Any, args: tuple, kwargs: dict) -> Any:
        """Called by an instrumented module's forward while this run is active."""
        site = controller.site
        if site is self.root and not self.in_root:
            return self._root_call(controller, module, args, kwargs)
        waiting = self.waiting
        if not waiting and not self.at_barrier:
            # No block can be resumed during this call, so none can ask about it.
            return controller.body(module, *args, **kwargs)
        self.ran.add(site)
        waiters = waiting.get(site)
        if waiters is not None and (waiters.inputs or waiters.observers):
            slot = Slot(INPUT, site, (args, kwargs))
            self._serve(slot)
            args, kwargs = slot.value
            if slot.skips is not None:
                return self._output(site, self._skipped(controller, module, args, kwargs, slot.skips))
        output = controller.body(module, *args, **kwargs)
        if site in self.waiting:
            return self._output(site, output)
        return output

    def _skipped(self, controller: Controller, module: Any, args: tuple, kwargs: dict, skips: list) -> Any:
        """The output of a module every block waiting at its input asked to ``.skip()``."""
        return self.batcher.assemble_skips(skips) if self.batcher else skips[-1][1]

    def _serving(self, slot: Slot, ready: list[Mediator]) -> None:
        """``ready`` are about to be served at ``slot`` (a backend may prepare their values at once)."""

    def _ready(self, mediator: Mediator) -> bool:
        """Whether a block parked on the current event is served now (its step has come)."""
        return mediator.pending.step == mediator.step

    def _root_call(self, controller: Controller, module: Any, args: tuple, kwargs: dict) -> Any:
        self.begin_step()
        self.in_root = True
        try:
            output = self.module_call(controller, module, args, kwargs)
        finally:
            self.in_root = False
        self.end_step()
        return output

    def _output(self, site: Site, output: Any) -> Any:
        slot = Slot(OUTPUT, site, output)
        self._serve(slot)
        return slot.value

    def _serve(self, slot: Slot) -> None:
        """Serve every block waiting on this event, until none is."""
        site = slot.site
        event = slot.event
        waiting = self.waiting
        batcher = self.batcher
        while True:
            waiters = waiting.get(site)
            ready = None
            if waiters is not None:
                parked = waiters.inputs if event == INPUT else waiters.outputs
                if parked:
                    ready = [m for m in parked if self._ready(m)]
            if not ready:
                if self.released:
                    self._resume_released()
                    continue
                break
            if len(ready) == len(parked):
                parked.clear()
            else:
                for mediator in ready:
                    del parked[mediator]
            if waiters.empty() and waiting.get(site) is waiters:
                del waiting[site]
            self._serving(slot, ready)
            for mediator in ready:
                request = mediator.pending
                if request is None:  # ended meanwhile (its job failed in an earlier block)
                    continue
                mediator.pending = None
                op = request.op
                if op == READ:
                    value = slot.value if batcher is None else batcher.narrow(slot.value, mediator.group)
                else:
                    if op in (WRITE, WRITE_FIRST):
                        self._note_edit(mediator, request, slot)
                    try:
                        value = apply_op(request, slot, batcher, mediator.group)
                    except InvokeError as error:
                        if not self.isolate_errors:
                            raise
                        self._resume(mediator, error=error)  # a bad edit fails its own block, at its line
                        continue
                self._resume(mediator, value, slot=slot)
        waiters = waiting.get(site)
        if waiters is not None and waiters.observers:
            for cache in waiters.observers:
                cache.observe(slot, self)
        if self.stop_pending and not self.finishing:
            self.stop_pending = False
            raise StopTrace()

    def _note_edit(self, mediator: Mediator, request: Request, slot: Slot) -> None:
        where = user_line(mediator.worker.gr_frame) if mediator.worker is not None else None
        self.last_edit = describe_edit(mediator, request, slot, where)

    # -- driving blocks ------------------------------------------------------------

    def _resume(
        self, mediator: Mediator, value: Any = None, error: BaseException | None = None, slot: Slot | None = None
    ) -> None:
        """Switch into a block until it parks again (or finishes), then file its request."""
        worker = mediator.worker
        if worker is None or worker.dead:
            return
        mediator.here = slot
        try:
            request = worker.switch(value) if error is None else worker.throw(error)
        except StopTrace:
            request = None
            self._stop(mediator)
        except IterationEnd:  # a step loop the rewrite could not see ended the block
            request = None
        except GreenletExit:
            request = None
        except BaseException as exception:
            mediator.here = None
            mediator.done = True
            if slot is not None and error is None and slot.site is not None:
                where = "inputs" if slot.event == INPUT else EVENT_NAMES[slot.event]
                exception.add_note(f"ndif: raised in {mediator.label}, which had just read {slot.site.path}.{where}.")
            self._failed(mediator, exception)
            return
        mediator.here = None
        self._park(mediator, request)

    def _stop(self, mediator: Mediator) -> None:
        """A block called ``tracer.stop()``: unwind the model once the current event is served."""
        self.stop_pending = True

    def _failed(self, mediator: Mediator, exception: BaseException) -> None:
        if not hasattr(exception, "__ndif_traceback__"):
            exception.__ndif_traceback__ = exception.__traceback__
        if self.isolate_errors:
            self.errors[mediator] = exception
            return
        raise exception

    def _park(self, mediator: Mediator, request: Request | None) -> None:
        if request is None:
            mediator.done = True
            mediator.pending = None
            return
        mediator.pending = request
        event = request.event
        if event == BARRIER:
            self.at_barrier += 1
            return
        if event == RESULT:
            self.results[mediator] = next(self._in_line)
            return
        if request.step < mediator.step:
            mediator.pending = None
            self._resume(
                mediator,
                error=OutOfOrderError(
                    f"{request.describe()} was requested for step {request.step}, but the run is "
                    f"already at step {mediator.step}. ({mediator.label})"
                ),
            )
            return
        waiters = self.waiting.get(request.site)
        if waiters is None:
            waiters = self.waiting[request.site] = Waiters()
        (waiters.inputs if event == INPUT else waiters.outputs)[mediator] = None
        if self.finishing:
            self._settle(mediator)

    def _parked_at_module(self, mediator: Mediator) -> bool:
        """Whether ``mediator`` is parked on a module's input or output."""
        request = mediator.pending
        if request is None or request.event not in (INPUT, OUTPUT):
            return False
        waiters = self.waiting.get(request.site)
        return waiters is not None and mediator in (waiters.inputs if request.event == INPUT else waiters.outputs)

    def _unwait(self, mediator: Mediator) -> None:
        request = mediator.pending
        waiters = self.waiting.get(request.site)
        if waiters is None:
            return
        parked = waiters.inputs if request.event == INPUT else waiters.outputs
        parked.pop(mediator, None)
        if waiters.empty():
            del self.waiting[request.site]

    def release(self, mediators: list[Mediator]) -> None:
        """Let blocks parked at a barrier go on, as soon as control is back here."""
        self.released.extend(mediators)

    def _resume_released(self) -> None:
        while self.released:
            mediator = self.released.pop(0)
            mediator.pending = None
            self.at_barrier -= 1
            self._resume(mediator)

    # -- caches --------------------------------------------------------------------

    def observe(self, site: Site, cache: Any) -> None:
        """Have ``cache`` see every event of ``site`` (after interventions)."""
        waiters = self.waiting.get(site)
        if waiters is None:
            waiters = self.waiting[site] = Waiters()
        waiters.observers.append(cache)
