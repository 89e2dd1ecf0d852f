"""The ``with`` blocks of the tracing API: trace/generate, invoke, session, edit.

Every block here is captured from source (`ndif.tracing.capture`) and run by
ndif instead of in place. What "run" means differs:

* `Trace` (``model.trace`` / ``model.generate`` / ``model.scan``): collect the
  invokes, hand them to the model, which runs them interleaved with its forward
  pass, then put the saved values into the caller's variables.
* `Invoke` (``tracer.invoke``): register one input and its body with the trace.
* `Session` (``model.session``): run the body as plain Python; traces inside it
  pass values to each other without ``.save()``.
* `Edit` (``model.edit``): store the body, replayed on every later trace.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import torch

from .engine.barrier import Barrier
from .engine.cache import Cache, CacheView
from .engine.context import SAVES
from .engine.iteration import Steps, StepSelector, advance
from .engine.mediator import READ, RESULT, WRITE, current_mediator
from .engine.saving import SaveScope, save
from .tracing.capture import Armed, SkipBody, capture, disarm, skip_body
from .tracing.capture import Block as CapturedBlock
from .tracing.errors import InvokeError, StopTrace, clean_traceback
from .tracing.scope import Scope, frame_locals, release_locals, write_back

if TYPE_CHECKING:
    from .models.base import NNsight


@dataclass
class InvokeSpec:
    """One invoke of a trace: its inputs and its body (compiled code plus scope)."""

    inputs: tuple
    kwargs: dict
    body: Callable[[], Any] | None
    scope: Scope | None = None
    label: str = "invoke"


def _exec(code: Any, scope: Scope) -> Callable[[], Any]:
    return lambda: exec(code, scope)


class BlockTracer(abc.ABC):
    """A ``with`` block that ndif captures and runs itself."""

    _frame: FrameType | None = None
    _block: CapturedBlock | None = None
    _armed: Armed | None = None

    def _capture(self, frame: FrameType) -> None:
        self._frame = frame
        self._block = capture(frame)
        self._armed = skip_body(self._block, frame)

    def __enter__(self) -> Any:
        self._capture(sys._getframe(1))
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        armed, self._armed = self._armed, None
        disarm(armed)
        if kind is not None and kind is not SkipBody:
            self._frame = None
            return False
        frame, self._frame = self._frame, None
        try:
            self._execute(frame)
        except BaseException as failure:
            failure.__context__ = None
            stashed = getattr(failure, "__ndif_traceback__", None)
            raise failure.with_traceback(clean_traceback(stashed or failure.__traceback__)) from None
        finally:
            release_locals(frame)
            del frame
        return True

    @abc.abstractmethod
    def _execute(self, frame: FrameType) -> None:
        """Run (or register, or store) the captured block for ``frame``, its caller."""


class ScopedTracer(BlockTracer):
    """A block that owns a save boundary: the outermost one returns only saved values.

    With ``remote`` set, the block is not run here: it is sent to a backend as a
    wire-format request, and the saved values that come back are bound instead.
    """

    remote: Any = None
    blocking: bool = True
    job: Any = None  # the service's job handle, after a ``remote=True`` block
    model: Any = None
    kind = "trace"

    def _remote_parts(self) -> tuple[tuple, dict, Any]:
        """(inputs, kwargs, tracer) of the request this block becomes."""
        return (), {}, None

    def _execute(self, frame: FrameType) -> None:
        if self.remote is not None and self.remote is not False:
            from .remote import run_remote

            assert self._block is not None
            inputs, kwargs, tracer = self._remote_parts()
            saved = run_remote(self.model, self.remote, self.kind, self._block, frame, inputs, kwargs, tracer, self)
            if saved is not None:  # None: submitted without waiting (blocking=False, or into a batch)
                write_back(frame, saved)
            return
        outermost = SAVES.get() is None
        saves = SaveScope() if outermost else None
        token = SAVES.set(saves) if outermost else None
        try:
            values = self._run(frame)
            if outermost:
                values = saves.select(values)  # type: ignore[union-attr]
            write_back(frame, values)
        finally:
            if token is not None:
                SAVES.reset(token)

    def _run(self, frame: FrameType) -> dict[str, Any]:
        assert self._block is not None
        return self.run_body(self._block.code, frame_locals(frame), frame.f_globals)

    @abc.abstractmethod
    def run_body(
        self,
        code: Any,
        snapshot: dict,
        glbls: dict,
        builtins: dict | None = None,
        hidden: frozenset[str] = frozenset(),
        bound_only: bool = True,
    ) -> dict[str, Any]:
        """Run compiled body code; returns the names it bound (all it holds, if not ``bound_only``)."""


class Trace(ScopedTracer):
    """``with model.trace(...) as tracer:`` / ``model.generate(...)`` / ``model.scan(...)``.

    Inside the body: read and edit module values; use ``tracer.invoke``,
    ``tracer.iter``/``all()``/``next()``, ``tracer.barrier``, ``tracer.cache``,
    ``tracer.stop()`` and ``tracer.result``.
    """

    def __init__(
        self, model: NNsight, kind: str, inputs: tuple, kwargs: dict, remote: Any = None, blocking: bool = True
    ) -> None:
        self.model = model
        self.kind = kind
        self.inputs = inputs
        self.kwargs = kwargs
        self.remote = remote
        self.blocking = blocking
        self._invokes: list[InvokeSpec] | None = None
        self._shared: dict | None = None

    def _remote_parts(self) -> tuple[tuple, dict, Any]:
        return self.inputs, self.kwargs, self

    def run_body(
        self,
        code: Any,
        snapshot: dict,
        glbls: dict,
        builtins: dict | None = None,
        hidden: frozenset[str] = frozenset(),
        bound_only: bool = True,
    ) -> dict[str, Any]:
        """Run a compiled body against the model; returns the names the body bound
        (every name it holds, with ``bound_only=False``).

        ``snapshot`` and ``glbls`` are the names the body sees (a frame's locals and
        globals locally; the captured values on a server, with the sandbox's
        ``builtins`` and ``hidden`` guard names).
        """
        model = self.model
        if model._has_input(self.inputs, self.kwargs):
            scope = Scope(snapshot, None, glbls, builtins, hidden)
            input_kwargs, call_kwargs = model._split_kwargs(self.kwargs)
            invokes = [InvokeSpec(self.inputs, input_kwargs, _exec(code, scope), scope)]
            scopes = [scope]
        else:
            self._shared = {}
            body = Scope(snapshot, self._shared, glbls, builtins, hidden)
            self._invokes = []
            try:
                exec(code, body)
            finally:
                invokes, self._invokes = self._invokes, None
            if not any(spec.inputs or spec.kwargs for spec in invokes):
                raise InvokeError(
                    f"{self.kind}() needs an input: pass one to {self.kind}(...) or add at least one "
                    "`with tracer.invoke(input):` block with an input"
                )
            call_kwargs = self.kwargs
            scopes = [body] + [spec.scope for spec in invokes if spec.scope is not None]
        for number, spec in enumerate(invokes, 1):
            spec.label = f"invoke #{number}" if len(invokes) > 1 else "the trace body"
        try:
            model._execute(self, invokes, call_kwargs)
        finally:
            self._shared = None
        values: dict[str, Any] = {}
        for scope in scopes:
            values.update(scope.written() if bound_only else scope.visible())
        return values

    # -- the body's API ----------------------------------------------------------------

    def invoke(self, *inputs: Any, **kwargs: Any) -> Invoke:
        """Add one input to the batch; the block's interventions see only its rows.

        ``tracer.invoke()`` with no input sees the whole batch.
        """
        return Invoke(self, inputs, kwargs)

    @property
    def iter(self) -> StepSelector:
        """Choose generation steps: ``for step in tracer.iter[:3]:``."""
        return StepSelector()

    def all(self) -> Steps:
        """Every step the run makes: ``for step in tracer.all():``."""
        return Steps()

    def next(self, count: int = 1) -> None:
        """Bind this block's following requests ``count`` steps later."""
        advance(count)

    def barrier(self, n: int) -> Barrier:
        """A point ``n`` blocks wait at until all have arrived (share values between invokes)."""
        return Barrier(n)

    def stop(self) -> None:
        """End the model's run here; values saved so far are kept."""
        raise StopTrace()

    @property
    def result(self) -> Any:
        """What the traced call returned (the model output, or generate's token ids)."""
        return current_mediator("tracer.result").request(RESULT, READ, None, "tracer")

    @result.setter
    def result(self, value: Any) -> None:
        current_mediator("tracer.result").request(RESULT, WRITE, None, "tracer", value)

    def cache(
        self,
        modules: list[Any] | None = None,
        device: torch.device | str | None = "cpu",
        dtype: torch.dtype | None = None,
        detach: bool = True,
        include_output: bool = True,
        include_inputs: bool = False,
    ) -> CacheView:
        """Record the outputs (and optionally inputs) of many modules for this block.

        ``modules`` are envoys or paths (default: every module). Values are recorded
        after interventions, moved to ``device``; the returned view is saved.
        """
        mediator = current_mediator("tracer.cache()")
        sites = self.model._sites()
        if modules is not None:
            wanted = {m.path if hasattr(m, "path") else str(m) for m in modules}
            unknown = wanted - set(sites.values())
            if unknown:
                raise KeyError(f"tracer.cache(): no module at {', '.join(sorted(unknown))}")
            sites = {site: path for site, path in sites.items() if path in wanted}
        cache = Cache(sites, mediator.group, device, dtype, detach, include_output, include_inputs)
        for site in sites:
            mediator.run.observe(site, cache)
        return save(CacheView(cache, self.model.path))


class Invoke(BlockTracer):
    """``with tracer.invoke(input):`` — one input of the batch and its interventions."""

    def __init__(self, trace: Trace, inputs: tuple, kwargs: dict) -> None:
        if trace._invokes is None:
            raise InvokeError(
                "tracer.invoke(...) must be used in the body of a trace that was given no input "
                "(with model.trace() as tracer:), before the model runs"
            )
        self.trace = trace
        self.inputs = inputs
        self.kwargs = kwargs

    def _execute(self, frame: FrameType) -> None:
        block = self._block
        assert block is not None and self.trace._invokes is not None
        snapshot = frame_locals(frame)
        scope = Scope(snapshot, self.trace._shared, frame.f_globals)
        self.trace._invokes.append(InvokeSpec(self.inputs, self.kwargs, _exec(block.code, scope), scope))


class Session(ScopedTracer):
    """``with model.session():`` — several traces whose values flow into each other."""

    kind = "session"

    def __init__(self, model: Any = None, remote: Any = None, blocking: bool = True) -> None:
        self.model = model
        self.remote = remote
        self.blocking = blocking

    def run_body(
        self,
        code: Any,
        snapshot: dict,
        glbls: dict,
        builtins: dict | None = None,
        hidden: frozenset[str] = frozenset(),
        bound_only: bool = True,
    ) -> dict[str, Any]:
        """Run a session body as plain Python; returns the names it bound."""
        scope = Scope(snapshot, None, glbls, builtins, hidden)
        exec(code, scope)
        return scope.written() if bound_only else scope.visible()


@dataclass
class EditSpec:
    """A stored edit: its code and the names it captured."""

    code: Any
    snapshot: dict
    glbls: dict
    label: str = "edit"
    extra: dict = field(default_factory=dict)

    def body(self) -> Callable[[], Any]:
        return _exec(self.code, Scope(dict(self.snapshot), None, self.glbls))


class EditHandle(tuple):
    """What ``with model.edit() as ...`` binds: ``(tracer, edited_model)``.

    Unpack it (``as (tracer, edited)``, as in NNsight 0.8) or use it as the edited
    model directly (``as edited``, as in earlier NNsight).
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(tuple.__getitem__(self, 1), name)


class Edit(BlockTracer):
    """``with model.edit() as (tracer, edited):`` — interventions applied to every later trace."""

    def __init__(self, model: NNsight, inplace: bool) -> None:
        self.target = model if inplace else model._edited_copy()
        self.inplace = inplace

    def __enter__(self) -> Any:
        self._capture(sys._getframe(1))
        return self if self.inplace else EditHandle((self, self.target))

    def _execute(self, frame: FrameType) -> None:
        assert self._block is not None
        self.target._edits.append(EditSpec(self._block.code, frame_locals(frame), frame.f_globals))

    # An edit body may use the step API like a trace body.
    iter = Trace.iter
    all = Trace.all
    next = Trace.next
