"""``with loss.backward():`` — read and edit gradients as autograd computes them.

Inside a trace body, ``with loss.backward(...):`` is rewritten (see
`ndif.tracing.rewrite`) into a call of `run_backward` with the block as a
function. The block runs as its own greenlet while this greenlet runs the real
backward pass; ``t.grad`` parks the block until autograd computes the gradient
flowing into ``t``, and ``t.grad = g`` replaces that gradient for the rest of the
pass. Gradients arrive in reverse forward order, so request them that way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..tracing.errors import NDIFError
from .context import CURRENT_MEDIATOR
from .mediator import GRAD, READ, WRITE, Mediator, Slot
from .run import Run


class GradKey:
    """The site of one tensor's gradient within a backward run.

    A row view of a batched activation (what an invoke reads) is not itself in the
    loss graph, so its gradient is taken from the hook on the full tensor (``base``),
    narrowed to its ``rows``.
    """

    __slots__ = ("tensor", "base", "rows", "path")

    def __init__(self, tensor: torch.Tensor, base: torch.Tensor, rows: tuple | None, path: str) -> None:
        self.tensor = tensor
        self.base = base
        self.rows = rows
        self.path = path


class BackwardRun(Run):
    """One backward pass interleaved with one ``with loss.backward():`` block."""

    def __init__(self) -> None:
        super().__init__([], batcher=None, root=None)
        self.keys: dict[int, GradKey] = {}
        self.hooked: dict[int, list[GradKey]] = {}  # id(base) -> the keys it serves
        self.handles: list[Any] = []

    def execute_backward(self, loss: torch.Tensor, body: Callable[[], Any], args: tuple, kwargs: dict) -> None:
        mediator = Mediator(body, label="the backward block")
        mediator.backward = self
        self.mediators = [mediator]
        try:
            mediator.start(self)
            self._resume(mediator)
            loss.backward(*args, **kwargs)
            self.finishing = True
            for site in list(self.waiting):
                for waiting in list(self.waiting[site].outputs):
                    request = waiting.pending
                    self._unwait(waiting)
                    self._resume(
                        waiting,
                        error=NDIFError(
                            f"{request.describe()} was requested but autograd did not compute it after "
                            "the request: request gradients in the reverse order of the forward pass, "
                            "and only for tensors the loss depends on"
                        ),
                    )
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            self.keys.clear()
            self.hooked.clear()
            self.close()

    def request(self, mediator: Mediator, tensor: torch.Tensor, op: int, value: Any = None) -> Any:
        key = self.keys.get(id(tensor))
        if key is None:
            key = self._hook(tensor)
        return mediator.request(GRAD, op, key, key.path, value)

    def _hook(self, tensor: torch.Tensor) -> GradKey:
        rows = getattr(tensor, "_ndif_rows", None)
        base = tensor if rows is None else rows[0]
        key = GradKey(tensor, base, None if rows is None else rows[1:], f"tensor of shape {tuple(tensor.shape)}")
        if not base.requires_grad:
            raise NDIFError(
                f"the {key.path} does not require grad, so it has no gradient: run the trace with "
                "gradients enabled (not under torch.no_grad / generate) on a model whose "
                "parameters require grad"
            )
        served = self.hooked.get(id(base))
        if served is None:
            served = self.hooked[id(base)] = []
            self.handles.append(base.register_hook(lambda grad: self._on_grad(served, grad)))
        served.append(key)
        self.keys[id(tensor)] = key
        return key

    def _on_grad(self, keys: list[GradKey], grad: torch.Tensor) -> torch.Tensor | None:
        """Autograd computed a hooked tensor's gradient: serve every view of it asked for,
        including views the block asks for while this one is being served."""
        full = grad
        done: set[int] = set()
        while True:
            ready = [key for key in keys if id(key) not in done and key in self.waiting]
            if not ready:
                break
            for key in ready:
                done.add(id(key))
                part = full if key.rows is None else full.narrow(0, key.rows[0], key.rows[1])
                slot = Slot(GRAD, key, part)
                self._serve(slot)
                if slot.value is part:
                    continue
                if key.rows is None:
                    full = slot.value
                else:
                    start, size = key.rows
                    rest = full.shape[0] - start - size
                    full = torch.cat([full.narrow(0, 0, start), slot.value, full.narrow(0, start + size, rest)])
        return None if full is grad else full


def run_backward(loss: torch.Tensor, body: Callable[[], Any], *args: Any, **kwargs: Any) -> None:
    """What ``with loss.backward(*args, **kwargs): body`` compiles to."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"`with x.backward():` needs a tensor, got {type(loss).__name__}")
    BackwardRun().execute_backward(loss, body, args, kwargs)


def _backward_of() -> BackwardRun | None:
    mediator = CURRENT_MEDIATOR.get()
    return None if mediator is None else mediator.backward


def read_grad(value: Any) -> Any:
    """What ``t.grad`` compiles to inside a backward block."""
    run = _backward_of()
    if run is None or not isinstance(value, torch.Tensor):
        return value.grad
    return run.request(CURRENT_MEDIATOR.get(), value, READ)


def write_grad(owner: Any, value: Any) -> None:
    """What ``t.grad = g`` compiles to inside a backward block."""
    run = _backward_of()
    if run is None or not isinstance(owner, torch.Tensor):
        owner.grad = value
        return
    run.request(CURRENT_MEDIATOR.get(), owner, WRITE, value)
