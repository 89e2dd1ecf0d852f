"""`NNsight`: wrap any ``torch.nn.Module`` for tracing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.batching import RowBatcher, map_tensors
from ..engine.mediator import Mediator
from ..engine.run import Run
from ..envoy import Envoy
from ..tracer import Edit, EditSpec, InvokeSpec, Session, Trace
from ..tracing.errors import InvokeError


@dataclass
class Prepared:
    """A batch ready to run: the call, and each invoke's rows (``(start, size)`` or ``None``)."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    groups: list[tuple[int, int] | None]
    total: int
    steps: int | None = 1  # forward passes the call makes at most (None: unknown)


class NNsight(Envoy):
    """Wraps a ``torch.nn.Module`` so its internals can be read and edited in traces.

    Example::

        model = ndif.NNsight(net)
        with model.trace(x):
            hidden = model.layer1.output.save()
    """

    def __init__(self, module: torch.nn.Module, rename: dict | None = None) -> None:
        super().__init__(module, "model", rename)
        self._edits: list[EditSpec] = []

    # -- opening blocks ---------------------------------------------------------------

    def trace(self, *inputs: Any, trace: bool = True, remote: Any = None, blocking: bool = True, **kwargs: Any) -> Any:
        """Open a trace of one forward pass over ``inputs`` (or over its invokes).

        ``trace=False`` skips the block and returns the output directly.
        ``remote=True`` runs the block on the ndif service (``ndif_sdk``; settings from
        ``NDIF_API_URL``/``NDIF_API_KEY``); with ``blocking=False`` it returns at once and
        ``tracer.job`` follows the job. ``remote=batch`` adds it to a `ndif_sdk.Batch`.
        ``remote="local"`` runs the block through the wire format and the sandbox in
        this process, as a server would (local simulation).
        """
        if not trace:
            return self._call_untraced("trace", inputs, kwargs)
        return Trace(self, "trace", inputs, kwargs, remote=remote, blocking=blocking)

    def scan(self, *inputs: Any, remote: Any = None, blocking: bool = True, **kwargs: Any) -> Trace:
        """Like `trace`, on fake tensors: shapes and dtypes only, no real compute."""
        return Trace(self, "scan", inputs, kwargs, remote=remote, blocking=blocking)

    def session(self, remote: Any = None, blocking: bool = True) -> Session:
        """Open a session: several traces that pass values to each other without ``.save()``.

        With ``remote`` set, the whole session is one request.
        """
        return Session(self, remote=remote, blocking=blocking)

    def _model_key(self) -> str:
        """How a server names this model (the request's ``model`` field)."""
        return type(self._module).__name__

    def edit(self, inplace: bool = False) -> Any:
        """Record interventions applied to every later trace.

        ``with model.edit() as (tracer, edited):`` leaves ``model`` untouched and
        returns an edited twin; ``inplace=True`` edits ``model`` itself. Undo with
        `clear_edits`.
        """
        return Edit(self, inplace)

    def clear_edits(self) -> None:
        """Remove every stored edit."""
        self._edits.clear()

    def _edited_copy(self) -> NNsight:
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        object.__setattr__(twin, "_edits", list(self._edits))
        return twin

    # -- running ----------------------------------------------------------------------

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        """Split a trace's keyword arguments into (per-input, per-call)."""
        return {}, kwargs

    def _has_input(self, inputs: tuple, kwargs: dict) -> bool:
        """Whether a trace was given an input directly (else its invokes bring them)."""
        return bool(inputs)

    def _batch_size(self, inputs: tuple, kwargs: dict) -> int:
        """How many batch rows an invoke's input contributes (0: no input)."""
        if not inputs:
            return 0
        first = inputs[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return first.shape[0]
        return 1

    def _prepare(self, kind: str, invokes: list[InvokeSpec], call_kwargs: dict) -> Prepared:
        """Combine the invokes' inputs into one call (tensors concatenated on dim 0)."""
        groups: list[tuple[int, int] | None] = []
        rows = []
        total = 0
        for spec in invokes:
            size = self._batch_size(spec.inputs, spec.kwargs)
            if size == 0:
                groups.append(None)
                continue
            groups.append((total, size))
            total += size
            rows.append(spec)
        if len(rows) == 1:
            args, kwargs = rows[0].inputs, {**rows[0].kwargs, **call_kwargs}
        else:
            args = []
            for position in range(len(rows[0].inputs)):
                parts = [spec.inputs[position] for spec in rows]
                if not all(isinstance(part, torch.Tensor) for part in parts):
                    raise InvokeError(
                        f"{type(self._module).__name__} can batch invokes only when their inputs are "
                        "tensors (concatenated along dim 0); use one trace per input instead"
                    )
                args.append(torch.cat(parts, dim=0))
            args, kwargs = tuple(args), {**rows[0].kwargs, **call_kwargs}
        return Prepared(self._module, args, kwargs, groups, total)

    def _device(self) -> torch.device | None:
        """Where the model's weights are (inputs are moved there)."""
        probe = self.__dict__.get("_probe")
        if probe is None or probe[0] is not self._module:
            first = next(iter(self._module.parameters()), None)
            probe = (self._module, first)
            object.__setattr__(self, "_probe", probe)
        return None if probe[1] is None else probe[1].device

    def _ready(self, kind: str) -> None:
        """Make the model runnable for ``kind`` (load weights, for lazily loaded models)."""

    def _execute(self, trace: Trace, invokes: list[InvokeSpec], call_kwargs: dict) -> Any:
        """Run the invokes interleaved with one execution of the model; returns its result."""
        self._ready(trace.kind)
        prepared = self._prepare(trace.kind, invokes, call_kwargs)
        groups = prepared.groups
        batched = sum(group is not None for group in groups) > 1
        batcher = RowBatcher(prepared.total) if batched else None
        mediators = [Mediator(edit.body(), None, "an edit") for edit in self._edits]
        for spec, group in zip(invokes, groups):
            if spec.body is not None:
                mediators.append(Mediator(spec.body, group if batched else None, spec.label))
        device = self._device()
        args, kwargs = prepared.args, prepared.kwargs
        if device is not None:
            args, kwargs = _to_device((args, kwargs), device)
        run = Run(mediators, batcher, root=self._site, sites=self._sites, max_steps=prepared.steps)
        try:
            if trace.kind != "scan":
                return run.execute(prepared.fn, args, kwargs)
            with _fake_tensors():
                return run.execute(prepared.fn, args, kwargs)
        finally:
            run.close()

    def _call_untraced(self, kind: str, inputs: tuple, kwargs: dict) -> Any:
        input_kwargs, call_kwargs = self._split_kwargs(kwargs)
        spec = InvokeSpec(inputs, input_kwargs, None)
        return self._execute(Trace(self, kind, inputs, kwargs), [spec], call_kwargs)


def _fake_tensors() -> Any:
    """Shapes and dtypes only: what ``scan`` runs under."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(assume_static_by_default=True))


def _to_device(value: Any, device: torch.device) -> Any:
    if not _elsewhere(value, device):
        return value
    return map_tensors(value, lambda tensor: tensor if tensor.device == device else tensor.to(device))


def _elsewhere(value: Any, device: torch.device) -> bool:
    """Whether any tensor in ``value`` is not on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.device != device
    if isinstance(value, (tuple, list)):
        return any(_elsewhere(item, device) for item in value)
    if isinstance(value, dict):
        return any(_elsewhere(item, device) for item in value.values())
    return False
