"""One intervention block, run in its own greenlet in step with the model.

A `Mediator` runs a captured block (an invoke's body, an edit, a backward block)
as a greenlet, the *worker*. The worker runs until it asks for a value the model
has not produced yet, then *parks*: it switches back to the driver (the model
side) carrying a `Request`. The driver resumes it when the model reaches that
point (see `ndif.engine.run.Run`). Worker and model take strict turns on one
thread, so there are no locks, only greenlet switches.

While the model is paused at an event the worker was served at (its ``here``),
further reads and writes of that same event are answered in place, without a
switch: ``h = m.output; m.output = h * 2`` costs one park, not two.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import copy_context
from typing import TYPE_CHECKING, Any

from greenlet import greenlet

from ..tracing.errors import OutsideTraceError, user_line
from .context import ACTIVE_RUN, CURRENT_MEDIATOR, GUARD

if TYPE_CHECKING:
    from .instrument import Site

# Events: the points of a run a block can wait for.
INPUT, OUTPUT, RESULT, BARRIER, GRAD = range(5)
EVENT_NAMES = {INPUT: "input", OUTPUT: "output", RESULT: "result", BARRIER: "barrier", GRAD: "grad"}

# Operations on an event's value.
READ, READ_FIRST, WRITE, WRITE_FIRST, SKIP = range(5)


class Request:
    """What a parked worker waits for: an operation on an event at a step."""

    __slots__ = ("event", "op", "site", "path", "step", "value")

    def __init__(self, event: int, op: int, site: Any, path: str, step: int, value: Any = None) -> None:
        self.event = event
        self.op = op
        self.site = site
        self.path = path
        self.step = step
        self.value = value

    def describe(self) -> str:
        if self.event == RESULT:
            return "tracer.result"
        if self.event == GRAD:
            return f"{self.path}.grad"
        name = "inputs" if self.event == INPUT and self.op in (READ, WRITE) else EVENT_NAMES[self.event]
        if self.op == SKIP:
            name = "skip()"
        return f"{self.path}.{name}"


class Slot:
    """One event as it passes: a module's ``(args, kwargs)`` or output, or the result.

    Writes replace ``value``; ``skips`` collects ``.skip()`` replacements at an input.
    """

    __slots__ = ("event", "site", "value", "skips")

    def __init__(self, event: int, site: Site | None, value: Any) -> None:
        self.event = event
        self.site = site
        self.value = value
        self.skips: list | None = None


def first_input(args: tuple, kwargs: dict) -> Any:
    """A call's first input: its first positional argument, else its first keyword."""
    if args:
        return args[0]
    for value in kwargs.values():
        return value
    return None


def replace_first_input(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    for key in kwargs:
        return args, {**kwargs, key: value}
    return (value,), kwargs


def apply_op(request: Request, slot: Slot, batcher: Any, group: Any) -> Any:
    """Perform ``request`` on ``slot`` for the block owning ``group``; a read returns its view."""
    op = request.op
    if op == READ:
        return slot.value if batcher is None else batcher.narrow(slot.value, group)
    if op == READ_FIRST:
        value = first_input(*slot.value)
        return value if batcher is None else batcher.narrow(value, group)
    if op == WRITE:
        slot.value = request.value if batcher is None else batcher.widen(slot.value, group, request.value)
        return None
    if op == WRITE_FIRST:
        args, kwargs = slot.value
        current = first_input(args, kwargs)
        merged = request.value if batcher is None else batcher.widen(current, group, request.value)
        slot.value = replace_first_input(args, kwargs, merged)
        return None
    if op == SKIP:
        if slot.skips is None:
            slot.skips = []
        slot.skips.append((group, request.value))
        return None
    raise AssertionError(op)


def describe_value(value: Any) -> str:
    """A short description of a value for error messages: shape and dtype of tensors."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a tensor of shape {tuple(value.shape)} ({str(value.dtype).replace('torch.', '')})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe_value(item) for item in value[:3])
        more = ", ..." if len(value) > 3 else ""
        return f"a {type(value).__name__} of {len(value)} ({inner}{more})"
    return f"a {type(value).__name__}"


def describe_edit(mediator: Any, request: Request, slot: Slot, where: tuple[str, int] | None) -> str:
    """What an assignment replaced, for the note on an error the model raises later."""
    current = slot.value
    if request.op == WRITE_FIRST:
        current = first_input(*current)
    at = f" on line {where[1]} of {where[0]}" if where else ""
    return (
        f"{mediator.label} assigned {request.describe()}{at}: it was {describe_value(current)}, "
        f"you assigned {describe_value(request.value)}"
    )


def _enter_worker(mediator: Mediator) -> None:
    CURRENT_MEDIATOR.set(mediator)
    ACTIVE_RUN.set(None)  # modules called from a block run plainly (logit lens)


class Mediator:
    """One block of intervention code and the greenlet that runs it.

    Attributes:
        group: This block's part of the batch (see `ndif.engine.batching`), or
            ``None`` for the whole batch.
        label: How errors name the block (``"invoke #2"``, ``"edit"``).
        step: The model step this block is at (advanced by the run).
        target: The step its next request binds to (``tracer.iter``/``next``).
        loops: The ``tracer.iter`` loops it is inside, innermost last.
        pending: The request it is parked on, or ``None``.
        here: The event it was last served at, while the model is paused there.
    """

    __slots__ = (
        "body",
        "group",
        "label",
        "run",
        "worker",
        "pending",
        "here",
        "step",
        "target",
        "loops",
        "done",
        "caches",
        "backward",
        "guard",
        "grad_inside",
        "grad_outside",
        "max_steps",
    )

    def __init__(self, body: Callable[[], Any], group: Any = None, label: str = "invoke") -> None:
        self.body = body
        self.group = group
        self.label = label
        self.run: Any = None
        self.worker: greenlet | None = None
        self.pending: Request | None = None
        self.here: Slot | None = None
        self.step = 0
        self.target = 0
        self.loops: list = []
        self.done = False
        self.caches: list = []
        self.backward: Any = None  # the gradient run this block is the body of, if any
        self.guard: Any = None  # the sandbox job guarding this block's code, if any
        self.grad_inside: bool | None = None
        self.grad_outside: bool | None = None
        self.max_steps: int | None = None  # the most steps its request(s) can make, where the run cannot say

    # -- driver side -------------------------------------------------------------

    def start(self, run: Any) -> None:
        """Create the worker (not yet running); ``run`` drives it from now on."""
        self.run = run
        self.guard = GUARD.get()
        context = copy_context()
        context.run(_enter_worker, self)
        self.worker = greenlet(self._main)
        self.worker.gr_context = context

    def _main(self, *_: Any) -> None:
        guard = self.guard
        if guard is None:
            self.body()
            return None
        guard.enter(self)
        try:
            self.body()
        finally:
            guard.exit(self)
        return None

    @property
    def alive(self) -> bool:
        return self.worker is not None and not self.worker.dead

    # -- worker side -------------------------------------------------------------

    def request(self, event: int, op: int, site: Any, path: str, value: Any = None) -> Any:
        """Ask the model side for ``op`` on ``event``; parks until it is served."""
        step = self.target
        slot = self.here
        if slot is not None and slot.site is site and slot.event == event and step == self.step:
            run = self.run
            request = Request(event, op, site, path, step, value)
            if op in (WRITE, WRITE_FIRST):
                run.last_edit = describe_edit(self, request, slot, user_line(sys._getframe(1)))
            return apply_op(request, slot, run.batcher, self.group)
        if self.guard is not None:
            return self._guarded_switch(Request(event, op, site, path, step, value))
        return self.worker.parent.switch(Request(event, op, site, path, step, value))

    def park(self, request: Request) -> Any:
        """Park on a request the run answers itself (a barrier)."""
        if self.guard is not None:
            return self._guarded_switch(request)
        return self.worker.parent.switch(request)

    def _guarded_switch(self, request: Request) -> Any:
        """Switch to the model side with the sandbox's guard off while the block waits."""
        guard = self.guard
        guard.check()
        guard.exit(self)
        try:
            return self.worker.parent.switch(request)
        finally:
            guard.enter(self)


def current_mediator(what: str) -> Mediator:
    """The block running in this context; ``what`` names the caller for the error."""
    mediator = CURRENT_MEDIATOR.get()
    if mediator is None:
        raise OutsideTraceError(
            f"{what} is only available inside the body of a `with model.trace(...)` "
            "(or generate/session) block, while the model runs."
        )
    return mediator
