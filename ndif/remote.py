"""Running a trace elsewhere: the request a trace becomes, and its result coming back.

With ``remote=...`` a trace (or generate, scan, session) is not run in place. Its
body's source, inputs and the values it reads from the caller's scope become a
wire-format `Request` (`build_request`), a backend runs it, and the saved values of
the `Result` are bound in the caller's variables — or its error is raised at the
user's own line (`raise_remote_error`).

``remote="local"`` is local simulation: the request is encoded, decoded and run in
the sandbox in this very process, exactly as a server would run it, so a researcher
can check code before submitting it.
"""

from __future__ import annotations

import ast
import builtins
import linecache
import platform
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._version import __version__
from .envoy import Envoy
from .tracing.capture import Block
from .tracing.errors import NDIFError
from .tracing.scope import frame_locals
from .wire import codec
from .wire.schema import ClientInfo, ErrorInfo, Request, Result, Source
from .wire.values import Encoder, Placeholder, WireError

if TYPE_CHECKING:
    from .models.base import NNsight

#: A backend takes an encoded request and returns an encoded result.
Backend = Callable[[bytes], bytes]


@runtime_checkable
class Target(Protocol):
    """Where ``remote=`` sends a block when it is more than a function of bytes: the
    service (``remote=True``) or a batch being built. ``submit`` returns the saved
    values to bind in the caller's scope, or None when there is nothing to bind yet
    (the block was queued); it may leave a job handle on ``owner.job``."""

    def submit(self, data: bytes, request: Request, owner: Any) -> dict[str, Any] | None: ...


class RemoteError(NDIFError):
    """An error raised by a trace on the server, of a type this side does not know."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


_ABSENT = object()


def body_names(block: Block) -> set[str]:
    """Every name the body reads (it may read any of them from the caller's scope)."""
    names = set()
    for statement in block.node.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                names.add(node.id)
    return names


def _placeholders(model: NNsight, tracer: Any) -> Callable[[Any], Placeholder | None]:
    def resolve(value: Any) -> Placeholder | None:
        if value is model:
            return Placeholder("model")
        if tracer is not None and value is tracer:
            return Placeholder("tracer")
        if isinstance(value, Envoy):
            path = value.path
            relative = path[len(model.path) + 1 :] if path.startswith(model.path + ".") else None
            if relative is None or _envoy_at(model, relative) is not value:
                raise WireError(f"cannot send {path}: it is a module of another model than the one this trace runs on")
            return Placeholder("envoy", path)
        return None

    return resolve


def _envoy_at(model: NNsight, path: str) -> Any:
    try:
        return model.get(path)
    except (AttributeError, KeyError, IndexError):
        return None


def build_request(
    model: NNsight, kind: str, block: Block, frame: FrameType, inputs: tuple, kwargs: dict, tracer: Any = None
) -> Request:
    """The request a captured block becomes: its source, inputs and captured values."""
    encoder = Encoder(placeholders=_placeholders(model, tracer))
    local = frame_locals(frame)
    scope_globals = frame.f_globals
    captured: dict[str, Any] = {}
    tracer_name = None
    for name in sorted(body_names(block)):
        if name.startswith("__"):
            continue  # dunder names: the server refuses them at the user's line
        if name in local:
            value = local[name]
        elif name in scope_globals:
            value = scope_globals[name]
        else:
            continue
        if tracer is not None and value is tracer:
            tracer_name = name
            continue
        if getattr(builtins, name, _ABSENT) is value:
            continue
        captured[name] = encoder.encode(value, f"variable {name!r}")
    return Request(
        client=ClientInfo(library="ndif", version=__version__, python=platform.python_version()),
        model=model._model_key(),
        kind=kind,
        body=Source(text=block.body_source, filename=block.filename, first_line=block.body_lineno),
        inputs=[encoder.encode(value, f"input #{i + 1}") for i, value in enumerate(inputs)],
        kwargs={key: encoder.encode(value, f"keyword argument {key!r}") for key, value in kwargs.items()},
        captured=captured,
        tracer_name=tracer_name,
    )


def local_backend(model: NNsight, limits: Any = None) -> Backend:
    """Local simulation: a server for ``model`` in this process (wire format and sandbox included).

    ``limits`` is a `ndif.sandbox.JobLimits` (the server's defaults when omitted);
    pass ``remote=local_backend(model, limits)`` to a trace to try other limits.
    """
    from .sandbox.runtime import run_request

    def run(data: bytes) -> bytes:
        started = time.perf_counter()
        request = codec.decode_request(data)
        decoded = time.perf_counter() - started
        result = run_request(model, request, limits)
        result.timings.decode = decoded
        return codec.encode_result(result)

    return run


def backend_for(model: NNsight, remote: Any) -> Backend | Target:
    """What ``remote=`` names: the service (True), local simulation ("local"), a batch, or a backend."""
    if remote is True:
        try:
            from ndif_sdk.backend import RemoteBackend
        except ImportError:
            raise ImportError(
                "remote=True needs the ndif client (pip install ndif-sdk); remote='local' simulates the service here"
            ) from None
        return RemoteBackend()
    if remote == "local":
        return local_backend(model)
    if isinstance(remote, Target) or callable(remote):
        return remote
    raise ValueError(
        f"remote={remote!r} is not supported: pass remote=True to run on the ndif service, remote='local' to "
        "run the trace through the wire format and the sandbox in this process, a batch, or a backend"
    )


def run_remote(
    model: NNsight,
    remote: Any,
    kind: str,
    block: Block,
    frame: FrameType,
    inputs: tuple,
    kwargs: dict,
    tracer: Any = None,
    owner: Any = None,
) -> dict[str, Any] | None:
    """Send a captured block to a backend; returns its saved values (or raises its error),
    or None when the block was only submitted (``owner`` is the block's tracer)."""
    request = build_request(model, kind, block, frame, inputs, kwargs, tracer)
    data = codec.encode_request(request)
    backend = backend_for(model, remote)
    if isinstance(backend, Target):
        return backend.submit(data, request, owner)
    result = codec.decode_result(backend(data))
    return apply_result(result)


def apply_result(result: Result) -> dict[str, Any]:
    """Print what the remote body printed; raise its error, or return its saved values."""
    for line in result.logs:
        print(line)
    if result.error is not None:
        raise_remote_error(result.error)
    return result.saved


_KNOWN_ERRORS: dict[str, type[BaseException]] = {
    name: value
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, Exception) and not name.startswith("_")
}


def _error_class(name: str) -> type[BaseException] | None:
    """The exception class a server named: a builtin one, or one of ndif's."""
    if name in _KNOWN_ERRORS:
        return _KNOWN_ERRORS[name]
    from . import sandbox  # noqa: F401  (registers the sandbox's error classes)

    pending: list[type] = [NDIFError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def _instantiate(cls: type[BaseException], message: str) -> BaseException:
    error = cls.__new__(cls)
    BaseException.__init__(error, message)
    if isinstance(error, SyntaxError):
        error.msg = message
    return error


def raise_remote_error(info: ErrorInfo) -> None:
    """Raise a server-side error here, as its own type when known, at the user's own line."""
    kind = _error_class(info.type)
    error = _instantiate(kind, info.message) if kind is not None else RemoteError(info.type, info.message)
    for note in info.notes:
        error.add_note(note)
    if len(info.frames) > 1:
        error.add_note(
            "ndif: in your code, innermost last:\n"
            + "\n".join(f"  {frame.filename}:{frame.line} in {frame.name}: {frame.source}" for frame in info.frames)
        )
    error.ndif_error = info  # type: ignore[attr-defined]
    line = info.line
    if line is None:
        raise error
    # A traceback entry at the user's file and line: the printed traceback shows that
    # line of their source, as it would for an error raised locally (the statement spans
    # the whole line, so no column markers point at the wrong part of it).
    raw = linecache.getline(line.filename, line.line)
    start = len(raw) - len(raw.lstrip())
    statement = ast.Raise(exc=ast.Name(id="ndif__error", ctx=ast.Load()), cause=None)
    for node in (statement, statement.exc):
        node.lineno = node.end_lineno = line.line
        node.col_offset, node.end_col_offset = start, max(len(raw.rstrip()), start + 1)
    pointer = compile(ast.Module(body=[statement], type_ignores=[]), line.filename, "exec")
    try:
        exec(pointer, {"ndif__error": error})
    except BaseException as raised:
        tb = raised.__traceback__
        raise raised.with_traceback(tb.tb_next if tb is not None else None) from None
