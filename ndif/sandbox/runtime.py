"""Running a decoded request inside the sandbox: the server side of a remote trace.

`run_request` takes a `Request` (decoded: data and code specs) and a model, and
returns a `Result`. The body is registered under a per-job file name, compiled by
`ndif.sandbox.policy`, and run by the same engine as a local trace (`Trace`,
`Session`), with the sandbox's guards in its namespace, its builtins, a
`ndif.sandbox.limits.Job` watching time, memory and saved bytes, and the torch-level
guard on while (and only while) the job's code runs. Whatever the body does, the
job ends in a `Result`: saved values, or an error that names the user's own line.
The process is left as it was: sources forgotten, the torch mode stack and grad mode
restored, gradients the job left on the model's parameters cleared.
"""

from __future__ import annotations

import itertools
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import _get_current_function_mode_stack

from ..engine.context import GUARD, SAVES
from ..tracer import Session, Trace
from ..tracing.capture import COMPILER, forget_source, register_source
from ..tracing.errors import NDIFError
from ..wire.schema import ErrorInfo, Frame, Request, Result
from ..wire.values import ClassSpec, Encoder, FunctionSpec, ModuleSpec, Placeholder
from .guards import SANDBOX_FILE_PREFIX, guard_names, resolve_library_path
from .limits import CancelToken, Job, JobCancelled, JobLimits, Protected, SandboxMode, TimeLimitExceeded, Watchdog
from .policy import SandboxSyntaxError, compile_restricted_body, compile_restricted_source

_job_numbers = itertools.count(1)


@dataclass
class SourceMap:
    """Per-job file names -> the user's own file names (line numbers are kept)."""

    files: dict[str, str]
    texts: dict[str, list[str]]

    def frame(self, filename: str, line: int, name: str) -> Frame | None:
        original = self.files.get(filename)
        if original is None:
            return None
        lines = self.texts.get(filename, [])
        text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        return Frame(filename=original, line=line, name=name, source=text)


class Materializer:
    """Turns decoded values (data, specs, placeholders) into live objects for one job."""

    def __init__(
        self,
        job_id: str,
        model: Any,
        tracer: Any,
        device: torch.device | None,
        sources: SourceMap,
        namespace: dict[str, Any],
    ) -> None:
        self.job_id = job_id
        self.model = model
        self.tracer = tracer
        self.device = device
        self.sources = sources
        self.namespace = namespace  # guards and builtins every compiled piece runs with
        self._done: dict[int, Any] = {}
        self._pending: dict[int, list[tuple[dict, str]]] = {}
        self._count = itertools.count(1)

    def value(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, int, float, bool, type(None))):
            return value
        key = id(value)
        if key in self._done:
            return self._done[key]
        if isinstance(value, torch.Tensor):
            moved = value if self.device is None or value.device.type == "meta" else value.to(self.device)
            self._done[key] = moved
            return moved
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self.value(item) for item in value)
        if isinstance(value, dict) and type(value) is dict:
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (set, frozenset)):
            return type(value)(self.value(item) for item in value)
        if isinstance(value, Placeholder):
            return self._placeholder(value)
        if isinstance(value, FunctionSpec):
            return self._function(value)
        if isinstance(value, ClassSpec):
            return self._class(value)
        if isinstance(value, ModuleSpec):
            return self._module(value)
        return value

    def _placeholder(self, holder: Placeholder) -> Any:
        if holder.kind == "model":
            return self.model
        if holder.kind == "envoy":
            path = holder.value
            if path == self.model.path:
                return self.model
            prefix = self.model.path + "."
            if not path.startswith(prefix):
                raise NDIFError(f"{path!r} is not a module of the served model")
            return self.model.get(path[len(prefix) :])
        if holder.kind == "tracer":
            if self.tracer is None:
                raise NDIFError("the body refers to a tracer, but this request has none")
            return self.tracer
        return resolve_library_path(holder.value)

    def _filename(self, original: str) -> str:
        return f"{SANDBOX_FILE_PREFIX}{self.job_id}:{next(self._count)}>"

    def _compile(self, source: str, original: str, line: int) -> tuple[Any, str]:
        filename = self._filename(original)
        padded = "\n" * (line - 1) + source
        register_source(filename, padded)
        self.sources.files[filename] = original
        self.sources.texts[filename] = padded.splitlines()
        return compile_restricted_source(source, filename, line, name="<module>"), filename

    def _scope(self) -> dict[str, Any]:
        return dict(self.namespace)

    def _names(self, spec: FunctionSpec | ClassSpec, names: dict[str, Any]) -> dict[str, Any]:
        """The namespace a function or class is defined in. A name referring to code still
        being defined (recursion, mutual references) is bound once that code exists."""
        scope = self._scope()
        self._pending[id(spec)] = []
        for name, item in names.items():
            if isinstance(item, (FunctionSpec, ClassSpec)) and id(item) in self._pending:
                self._pending[id(item)].append((scope, name))
            else:
                scope[name] = self.value(item)
        return scope

    def _defined(self, spec: FunctionSpec | ClassSpec, value: Any) -> Any:
        self._done[id(spec)] = value
        for scope, name in self._pending.pop(id(spec)):
            scope[name] = value
        return value

    def _function(self, spec: FunctionSpec) -> Any:
        scope = self._names(spec, {**spec.globals, **spec.closure})
        text = f"ndif__lambda = {spec.source}" if spec.is_lambda else spec.source
        code, _ = self._compile(text, spec.filename, spec.line)
        exec(code, scope)
        return self._defined(spec, scope["ndif__lambda" if spec.is_lambda else spec.name])

    def _class(self, spec: ClassSpec) -> type:
        scope = self._names(spec, spec.globals)
        code, _ = self._compile(spec.source, spec.filename, spec.line)
        exec(code, scope)
        cls = scope[spec.name]
        if not isinstance(cls, type):
            raise NDIFError(f"{spec.name} did not define a class")
        return self._defined(spec, cls)

    def _module(self, spec: ModuleSpec) -> torch.nn.Module:
        cls = self.value(spec.cls)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise NDIFError(f"{cls!r} is not a torch.nn.Module class")
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        self._done[id(spec)] = module
        for name, item in spec.attrs.items():
            object.__setattr__(module, name, self.value(item))
        for name, tensor in spec.parameters.items():
            module._parameters[name] = (
                None if tensor is None else torch.nn.Parameter(self.value(tensor), requires_grad=tensor.requires_grad)
            )
        for name, tensor in spec.buffers.items():
            module._buffers[name] = None if tensor is None else self.value(tensor)
        for name, child in spec.children.items():
            module._modules[name] = None if child is None else self.value(child)
        module.train(spec.training)
        return module


def _error_info(error: BaseException, sources: SourceMap) -> ErrorInfo:
    tb = getattr(error, "__ndif_traceback__", None) or error.__traceback__
    frames = []
    for summary, line in traceback.walk_tb(tb):
        code = summary.f_code
        frame = sources.frame(code.co_filename, line, code.co_name)
        if frame is not None:
            frames.append(frame)
    if isinstance(error, SandboxSyntaxError) and error.lineno is not None:
        frame = sources.frame(error.filename, error.lineno, "<trace>")
        if frame is not None:
            frames.append(frame)
    message = str(error)
    if not message and type(error).__name__ == "TimeLimitExceeded":
        message = "the job ran longer than its time limit"
    notes = [note for note in getattr(error, "__notes__", []) if isinstance(note, str)]
    return ErrorInfo(type=type(error).__name__, message=message, frames=frames, notes=notes)


def _model_device(model: Any) -> torch.device | None:
    device = model._device() if hasattr(model, "_device") else None
    return None if device is None or device.type == "meta" else device


def run_request(
    model: Any,
    request: Request,
    limits: JobLimits | None = None,
    job_id: str | None = None,
    cancel: CancelToken | None = None,
) -> Result:
    """Run a decoded request on ``model`` in the sandbox; always returns a `Result`.

    ``cancel.cancel()``, from another thread, ends the job with `JobCancelled`.
    """
    started = time.perf_counter()
    job_id = job_id or str(next(_job_numbers))
    sources = SourceMap({}, {})
    result = Result()
    logs: list[str] = []
    model._ready(request.kind)
    device = _model_device(model)
    job = Job(limits or JobLimits(), _protected(model), device)
    if cancel is not None:
        cancel.attach(job)
    state = TorchState.now()
    depth = len(_get_current_function_mode_stack())
    watchdog = Watchdog.get()
    watchdog.watch(job)
    tokens = [GUARD.set(job), SAVES.set(job.saves), COMPILER.set(compile_restricted_body)]
    try:
        namespace = guard_names(logs, job.tick)
        hidden = frozenset(namespace)
        tracer = None if request.kind == "session" else Trace(model, request.kind, (), {})
        materialize = Materializer(job_id, model, tracer, device, sources, namespace)
        if tracer is not None:
            tracer.inputs = tuple(materialize.value(item) for item in request.inputs)
            tracer.kwargs = {key: materialize.value(item) for key, item in request.kwargs.items()}
        snapshot = dict(namespace)
        for name, item in request.captured.items():
            snapshot[name] = materialize.value(item)
        if request.tracer_name and tracer is not None:
            snapshot[request.tracer_name] = tracer
        code, _ = materialize._compile(request.body.text, request.body.filename, request.body.first_line)
        code = code.replace(co_name="<trace>")
        runner = Session() if tracer is None else tracer
        held = runner.run_body(code, snapshot, {}, builtins=namespace["__builtins__"], hidden=hidden, bound_only=False)
        if job.cancelled:
            raise JobCancelled("the job was cancelled")
        if job.expired:  # the body caught the interruption and went on
            raise TimeLimitExceeded(f"the job ran longer than its limit of {job.limits.time_s:g} s")
        saved = job.saves.select(held)
        encoder = Encoder(allow_code=False)
        encoding = time.perf_counter()
        result.saved = {name: encoder.encode(value, f"the saved value {name!r}") for name, value in saved.items()}
        result.timings.encode = time.perf_counter() - encoding
    except BaseException as raised:  # every failure ends in a Result, never in the worker
        error = raised
        if job.cancelled:
            error = JobCancelled("the job was cancelled")
        elif job.expired and not isinstance(error, NDIFError):
            error = TimeLimitExceeded(f"the job ran longer than its limit of {job.limits.time_s:g} s")
        result.saved = {}
        result.error = _error_info(error, sources)
    finally:
        watchdog.release(job)
        for token in reversed(tokens):
            token.var.reset(token)
        _restore_modes(depth)
        state.restore()
        _clear_model_grads(model)
        for filename in sources.files:
            forget_source(filename)
    result.logs = logs
    result.timings.run = time.perf_counter() - started - result.timings.encode
    return result


def check_request(request: Request) -> ErrorInfo | None:
    """Compile the request's body under the sandbox policy without running it.

    Returns the error running it would raise at once (a syntax error, a forbidden
    construct), at the user's own line; None if the body compiles.
    """
    sources = SourceMap({}, {})
    filename = f"{SANDBOX_FILE_PREFIX}check:{next(_job_numbers)}>"
    sources.files[filename] = request.body.filename
    sources.texts[filename] = ("\n" * (request.body.first_line - 1) + request.body.text).splitlines()
    try:
        compile_restricted_source(request.body.text, filename, request.body.first_line)
    except NDIFError as error:
        return _error_info(error, sources)
    return None


def _protected(model: Any) -> Protected:
    # Recomputed per job (cheap), so nothing can make a stale copy of it.
    return Protected(model._module)


@dataclass
class TorchState:
    """Process-wide torch settings a job must leave as it found them."""

    grad: bool
    dtype: torch.dtype
    autocast_cpu: bool
    deterministic: bool

    @classmethod
    def now(cls) -> TorchState:
        return cls(
            torch.is_grad_enabled(),
            torch.get_default_dtype(),
            torch.is_autocast_enabled("cpu"),
            torch.are_deterministic_algorithms_enabled(),
        )

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad)
        torch.set_default_dtype(self.dtype)
        torch.set_autocast_enabled("cpu", self.autocast_cpu)
        torch.use_deterministic_algorithms(self.deterministic)


def _restore_modes(depth: int) -> None:
    """Pop sandbox modes an interrupted job may have left on this thread's stack."""
    while len(_get_current_function_mode_stack()) > depth:
        mode = _get_current_function_mode_stack()[-1]
        if not isinstance(mode, SandboxMode):
            break
        mode.__exit__(None, None, None)


def _clear_model_grads(model: Any) -> None:
    for parameter in model._module.parameters():
        if parameter.grad is not None:
            parameter.grad = None
