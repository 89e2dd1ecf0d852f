"""Per-job limits and the torch-level guard of sandboxed code.

A `Job` carries one request's limits and state. While its code runs (inside the
body's greenlets only, switched off whenever the body waits for the model) it
keeps a `SandboxMode` active, a ``TorchFunctionMode`` that

* refuses in-place operations on the model's weights and buffers (by storage, so
  ``w.data.zero_()``, ``w.detach()[:] = 0`` and ``torch.nn.init.zeros_(w)`` are all
  caught), and hooks on them that would outlive the job;
* refuses the operations that reach memory outside a tensor's view;
* estimates the size of every operation that can allocate more than its inputs
  (factories, broadcasting arithmetic, matrix products, concatenation, repeats) and
  refuses one that would exceed the job's allocation limit, before it allocates.

Time: the job's deadline is enforced three ways: a check at every loop iteration
and function call of the body (``_tick_``), at every model step, and by a watchdog
thread that raises `TimeLimitExceeded` asynchronously into a body stuck in a
single long operation. Saved bytes are counted as values are saved; memory growth
is measured where it can be (CUDA allocated bytes; the process's peak RSS).
"""

from __future__ import annotations

import bisect
import ctypes
import math
import resource
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..engine.saving import SaveScope
from ..tracing.errors import NDIFError
from .guards import SandboxViolation


class LimitExceeded(NDIFError):
    """A job went past one of its limits."""


class TimeLimitExceeded(LimitExceeded):
    """The job ran longer than its wall-clock limit."""


class MemoryLimitExceeded(LimitExceeded):
    """The job allocated (or would allocate) more memory than allowed."""


class SaveLimitExceeded(LimitExceeded):
    """The job saved more bytes than allowed."""


class JobCancelled(NDIFError):
    """The job was cancelled while it ran (by its owner, or by the service)."""


class CancelToken:
    """Cancels a running job from another thread: `cancel` stops it at its next check.

    A job stuck in one long operation is interrupted by the watchdog, as at its deadline.
    """

    def __init__(self) -> None:
        self.cancelled = False
        self.job: Job | None = None

    def attach(self, job: Job) -> None:
        self.job = job
        if self.cancelled:
            job.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.job is not None:
            self.job.cancel()


@dataclass
class JobLimits:
    """Limits of one job (server configuration; see ``docs/sandbox.md``)."""

    time_s: float = 60.0
    max_saved_bytes: int = 1 << 30
    max_allocation_bytes: int = 4 << 30
    max_memory_growth_bytes: int = 16 << 30


def nbytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors and arrays inside ``value`` (containers included)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes") and isinstance(getattr(value, "nbytes", None), int):
        return value.nbytes
    if isinstance(value, (list, tuple, set, frozenset)):
        return sys.getsizeof(value) + sum(nbytes(item, seen) for item in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes(k, seen) + nbytes(v, seen) for k, v in value.items())
    return sys.getsizeof(value)


class LimitedSaves(SaveScope):
    """A save scope that refuses to hold more than ``limit`` bytes."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.used = 0

    def mark(self, value: Any) -> None:
        if self.is_saved(value):
            return
        size = nbytes(value)
        if self.used + size > self.limit:
            raise SaveLimitExceeded(
                f"saving this value ({size} bytes) would bring the job's saved values to {self.used + size} "
                f"bytes, over the limit of {self.limit}; save less (a slice, a reduction) or fewer steps"
            )
        self.used += size
        super().mark(value)


# -- the torch-level guard --------------------------------------------------------------------

_BROADCASTING = {
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow,
    torch.where, torch.eq, torch.ne, torch.lt, torch.gt, torch.le, torch.ge, torch.atan2, torch.logical_and,
    torch.logical_or, torch.bitwise_and, torch.bitwise_or,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.pow,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.Tensor.__pow__, torch.Tensor.__rpow__, torch.Tensor.__eq__, torch.Tensor.__ne__,
    torch.Tensor.__lt__, torch.Tensor.__gt__, torch.Tensor.__le__, torch.Tensor.__ge__,
    torch.Tensor.__and__, torch.Tensor.__or__, torch.Tensor.__xor__,
}  # fmt: skip

_SIZED_BY_META = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.randint, torch.arange,
    torch.linspace, torch.logspace, torch.eye, torch.tensor,
    torch.matmul, torch.mm, torch.bmm, torch.outer, torch.kron, torch.einsum, torch.tensordot, torch.cat,
    torch.concat, torch.stack, torch.hstack, torch.vstack, torch.tile, torch.repeat_interleave, torch.cartesian_prod,
    torch.cdist, torch.meshgrid, torch.block_diag, torch.zeros_like, torch.ones_like, torch.full_like,
    torch.rand_like, torch.randn_like, torch.empty_like, torch.nn.functional.pad, torch.nn.functional.one_hot,
    torch.nn.functional.interpolate,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.repeat,
    torch.Tensor.repeat_interleave, torch.Tensor.tile, torch.Tensor.new_zeros, torch.Tensor.new_ones,
    torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.outer,
    torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.to, torch.Tensor.mm, torch.Tensor.bmm,
}  # fmt: skip

_MEMORY_ESCAPES = {
    torch.as_strided, torch.Tensor.as_strided, torch.Tensor.as_strided_, torch.Tensor.set_, torch.Tensor.storage,
    torch.Tensor.untyped_storage, torch.Tensor.resize_, torch.Tensor.share_memory_,
}  # fmt: skip

_HOOKS = {torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook, torch.Tensor.retain_grad}

#: Operations that make views or read metadata: they allocate nothing.
_VIEWS = {
    torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.broadcast_to, torch.broadcast_to, torch.Tensor.view,
    torch.Tensor.view_as, torch.Tensor.narrow, torch.narrow, torch.Tensor.select, torch.select,
    torch.Tensor.__getitem__, torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose,
    torch.Tensor.permute, torch.permute, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze,
    torch.unsqueeze, torch.Tensor.unflatten, torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk,
    torch.Tensor.unbind, torch.unbind, torch.Tensor.movedim, torch.movedim, torch.Tensor.diagonal,
    torch.Tensor.detach, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride,
    torch.Tensor.is_contiguous, torch.Tensor.element_size, torch.Tensor.__len__, torch.Tensor.__repr__,
    torch.Tensor.__format__, torch.Tensor.__bool__, torch.Tensor.item,
}  # fmt: skip


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(item) for item in value)
    if isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in ("cuda", "cpu")):
        return torch.device("meta")
    return value


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors(value))
    return found


class SandboxMode(TorchFunctionMode):
    """The torch-level guard of one job's code (see the module docstring)."""

    def __init__(self, protected: Protected, max_bytes: int) -> None:
        super().__init__()
        self.protected = protected
        self.max_bytes = max_bytes

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MEMORY_ESCAPES:
            raise SandboxViolation(f"{_name(func)} is not available in a remote trace (it reaches raw memory)")
        name = _name(func)
        inplace = (
            (name.endswith("_") and not name.endswith("__"))
            or name in _INPLACE_DUNDERS
            or name == "__set__"  # a property setter: .data, .grad, .requires_grad = ...
            or "out" in kwargs
            or kwargs.get("inplace") is True
        )
        if inplace or func in _HOOKS:
            target = kwargs.get("out", args[0] if args else None)
            for tensor in _tensors([target]):
                if self.is_protected(tensor):
                    what = "register hooks on" if func in _HOOKS else "modify"
                    raise SandboxViolation(
                        f"cannot {what} the model's weights in a remote trace ({name} on a parameter or buffer); "
                        "edit activations instead, or work on a copy (w.clone())"
                    )
        if func not in _VIEWS:
            # An operation materializes at least its largest input: an expanded view
            # (broadcast_to, expand) can be far larger than the memory behind it.
            largest = max((t.numel() * t.element_size() for t in _tensors(args)), default=0)
            if largest > self.max_bytes:
                self._check(name, largest)
        if func in _BROADCASTING:
            shapes = [t.shape for t in _tensors(args)]
            if len(shapes) > 1:
                try:
                    shape = torch.broadcast_shapes(*shapes)
                except RuntimeError:
                    shape = None
                if shape is not None:
                    self._check(name, math.prod(shape) * max(t.element_size() for t in _tensors(args)))
        elif func in _SIZED_BY_META:
            self._check_meta(func, name, args, kwargs)
        return func(*args, **kwargs)

    def is_protected(self, tensor: torch.Tensor) -> bool:
        return bool(self.protected) and tensor.device.type != "meta" and tensor in self.protected

    def _check(self, name: str, size: int) -> None:
        if size > self.max_bytes:
            raise MemoryLimitExceeded(
                f"{name} would allocate {size / 2**20:.1f} MiB, over the job's limit of "
                f"{self.max_bytes / 2**20:.1f} MiB per allocation"
            )

    def _check_meta(self, func: Any, name: str, args: tuple, kwargs: dict) -> None:
        if func is torch.Tensor.to or func is torch.Tensor.contiguous or func is torch.Tensor.clone:
            tensor = args[0] if args else None
            if isinstance(tensor, torch.Tensor):
                self._check(name, tensor.numel() * 8)
            return
        try:
            meta_kwargs = {key: _meta(value) for key, value in kwargs.items()}
            if func in _FACTORIES:
                meta_kwargs["device"] = torch.device("meta")
            result = func(*(_meta(arg) for arg in args), **meta_kwargs)
        except Exception:  # the real call will raise the user's error, if any
            return
        self._check(name, sum(t.numel() * t.element_size() for t in _tensors([result])))


_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.randint, torch.arange,
    torch.linspace, torch.logspace, torch.eye, torch.tensor,
}  # fmt: skip
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__imatmul__",
                    "__ifloordiv__", "__imod__", "__iand__", "__ior__", "__ixor__"}  # fmt: skip


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__" and hasattr(func, "__self__"):
        return getattr(func.__self__, "__name__", "attribute")
    return name or repr(func)


class Protected:
    """The memory of a model's parameters and buffers, as address ranges per device.

    A tensor is protected if its storage overlaps any of them: views, ``.data``,
    ``.detach()`` and DLPack round trips of a weight all are, wherever they start.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        ranges: dict[str, list[tuple[int, int]]] = {}
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "meta":
                continue
            try:
                storage = tensor.untyped_storage()
                start = storage.data_ptr()
                ranges.setdefault(str(tensor.device), []).append((start, start + max(storage.nbytes(), 1)))
            except (RuntimeError, NotImplementedError):
                continue
        self.ranges = {device: sorted(spans) for device, spans in ranges.items()}

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        spans = self.ranges.get(str(tensor.device))
        if not spans:
            return False
        try:
            with torch._C.DisableTorchFunction():  # the guard's own look, not the job's
                storage = tensor.untyped_storage()
            start = storage.data_ptr()
            end = start + max(storage.nbytes(), 1)
        except (RuntimeError, NotImplementedError):
            return False
        index = bisect.bisect_right(spans, (start, float("inf"))) - 1
        # Allocations never overlap, so only the span starting at or before this storage,
        # and the next one, can.
        return any(low < end and start < high for low, high in spans[max(index, 0) : index + 2])


# -- jobs and the watchdog ------------------------------------------------------------------------

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
# Never call it with NULL to cancel: on CPython 3.11 that leaves the eval loop's
# breaker set, and a thread with a trace function then hangs (see `Watchdog.release`).


def resident_bytes() -> int:
    """This process's resident memory now (not its peak, which only ever grows)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PAGE = resource.getpagesize()


class Job:
    """One request's limits and running state."""

    def __init__(self, limits: JobLimits, protected: Protected, device: torch.device | None) -> None:
        self.limits = limits
        self.mode = SandboxMode(protected, limits.max_allocation_bytes)
        self.deadline = time.monotonic() + limits.time_s
        self.expired = False
        self.inside = 0  # how many of this job's blocks are executing right now (0 or 1 per thread)
        self.thread = threading.get_ident()
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.memory_start = self._memory()
        self.saves = LimitedSaves(limits.max_saved_bytes)
        self.interrupted = False  # the watchdog raised into this job's thread
        self.released = False
        self.cancelled = False

    def _memory(self) -> int:
        if self.cuda is not None:
            return torch.cuda.memory_allocated(self.cuda)
        return resident_bytes()

    def cancel(self) -> None:
        """Stop the job: its next check raises `JobCancelled`; the watchdog interrupts it if busy."""
        self.cancelled = True
        self.deadline = -math.inf

    def tick(self) -> None:
        """``_tick_``: called at every loop iteration and function call of the body."""
        if self.cancelled:
            raise JobCancelled("the job was cancelled")
        if self.expired or time.monotonic() > self.deadline:
            self.expired = True
            raise TimeLimitExceeded(f"the job ran longer than its limit of {self.limits.time_s:g} s")

    def check(self) -> None:
        """At model steps and when the body waits: time and memory growth."""
        self.tick()
        growth = self._memory() - self.memory_start
        if growth > self.limits.max_memory_growth_bytes:
            raise MemoryLimitExceeded(
                f"the job grew memory by {growth / 2**20:.0f} MiB, over its limit of "
                f"{self.limits.max_memory_growth_bytes / 2**20:.0f} MiB"
            )

    def drain(self) -> None:
        """Deliver here an interruption the watchdog raised into this job's thread, if any."""
        if self.interrupted:
            try:
                for _ in range(1000):  # bytecodes on which a pending asynchronous exception lands
                    pass
            except TimeLimitExceeded:
                pass

    # Called by the engine around every switch into and out of a sandboxed block.

    def enter(self, mediator: Any) -> None:
        # Blocks nest (a backward block runs inside the block that started it): the
        # mode is pushed once, by the outermost.
        if self.inside == 0:
            self.mode.__enter__()
            self.thread = threading.get_ident()  # a serving engine runs blocks on its own thread
        self.inside += 1
        mediator.grad_outside = torch.is_grad_enabled()
        inside = mediator.grad_inside
        torch.set_grad_enabled(mediator.grad_outside if inside is None else inside)

    def exit(self, mediator: Any) -> None:
        mediator.grad_inside = torch.is_grad_enabled()
        torch.set_grad_enabled(mediator.grad_outside)
        self.inside -= 1
        if self.inside == 0:
            self.mode.__exit__(None, None, None)


class Watchdog:
    """One thread per process that interrupts jobs past their deadline."""

    _instance: Watchdog | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.jobs: set[Job] = set()
        self.guard = threading.Lock()
        thread = threading.Thread(target=self._loop, name="ndif-watchdog", daemon=True)
        thread.start()

    @classmethod
    def get(cls) -> Watchdog:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Watchdog()
            return cls._instance

    def watch(self, job: Job) -> None:
        with self.guard:
            self.jobs.add(job)

    def release(self, job: Job) -> None:
        """Stop watching ``job``; an interruption still in flight is delivered and dropped here."""
        with self.guard:
            self.jobs.discard(job)
            job.released = True
        job.drain()

    def _loop(self) -> None:
        while True:
            time.sleep(0.05)
            now = time.monotonic()
            with self.guard:
                for job in self.jobs:
                    if now > job.deadline:
                        job.expired = True
                        if job.inside and not job.released:
                            job.interrupted = True
                            _set_async_exc(job.thread, TimeLimitExceeded)
