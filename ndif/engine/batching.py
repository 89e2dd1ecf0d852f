"""Scoping a batched value to one intervention block, and splicing edits back.

Several invokes share one forward pass; each block must see only its own part of
every activation and edit only that part. A `Batcher` knows the layout:

* `RowBatcher` (transformers and any dim-0 batched model): each invoke owns a
  contiguous range of rows.
* A vLLM backend implements the same protocol over a flat ``[num_tokens, ...]``
  batch whose token ranges change every step.

A ``group`` is whatever the batcher uses to name one block's part; ``None`` means
the whole batch (a lone invoke, an empty ``tracer.invoke()``, an edit).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..tracing.errors import InvokeError

Group = Any


class Batcher(Protocol):
    """How a batched forward is divided among intervention blocks."""

    def narrow(self, value: Any, group: Group) -> Any:
        """``value`` as block ``group`` sees it (views, so in-place edits land)."""

    def widen(self, full: Any, group: Group, edited: Any) -> Any:
        """``full`` with ``group``'s part replaced by ``edited``."""

    def assemble_skips(self, parts: list[tuple[Group, Any]]) -> Any:
        """A module's output built from every block's ``.skip()`` replacement."""


def map_tensors(value: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor inside ``value``, keeping container types."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        mapped = [map_tensors(item, fn) for item in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if isinstance(value, list):
        return [map_tensors(item, fn) for item in value]
    if isinstance(value, dict):
        mapped = value.copy()  # keeps OrderedDict / transformers ModelOutput types
        for key, item in value.items():
            mapped[key] = map_tensors(item, fn)
        return mapped
    return value


def merge_structure(whole: Any, part: Any, tensor: Any, where: str = "the value") -> Any:
    """``whole`` with ``part`` assigned into it, item by item of the same structure (tuples,
    lists, dicts); ``tensor(whole, part, where)`` merges where ``whole`` is a tensor."""
    if isinstance(whole, torch.Tensor):
        return tensor(whole, part, where)
    if isinstance(whole, (list, tuple)):
        if not isinstance(part, (list, tuple)) or len(part) != len(whole):
            raise InvokeError(
                f"{where} is a {type(whole).__name__} of {len(whole)} items; an invoke "
                f"assigned {type(part).__name__}. Assign the same structure (or edit an item)."
            )
        merged = [merge_structure(w, p, tensor, f"{where}[{i}]") for i, (w, p) in enumerate(zip(whole, part))]
        if isinstance(whole, tuple):
            return type(whole)(*merged) if hasattr(whole, "_fields") else type(whole)(merged)
        return merged
    if isinstance(whole, dict):
        merged = whole.copy()
        for key in whole:
            merged[key] = merge_structure(whole[key], part[key], tensor, f"{where}[{key!r}]")
        return merged
    return part


class RowBatcher:
    """Invokes stacked along dim 0; a group is ``(start, size)``.

    Only tensors whose first dimension is the whole batch are batched; any other
    value is shared by every block and passes through whole.
    """

    def __init__(self, total: int) -> None:
        self.total = total

    def narrow(self, value: Any, group: Group) -> Any:
        if group is None:
            return value
        start, size = group
        total = self.total

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0 or tensor.shape[0] != total:
                return tensor
            view = tensor.narrow(0, start, size)
            view._ndif_rows = (tensor, start, size)  # lets a gradient request find the graph
            return view

        return map_tensors(value, rows)

    def widen(self, full: Any, group: Group, edited: Any) -> Any:
        if group is None:
            return edited
        start, size = group
        total = self.total

        def rows(whole: torch.Tensor, part: Any, where: str) -> Any:
            if whole.dim() == 0 or whole.shape[0] != total:
                return part
            if not isinstance(part, torch.Tensor):
                raise InvokeError(
                    f"an invoke assigned a {type(part).__name__} to {where}, which is a batched "
                    "tensor; assign a tensor with one row per prompt of this invoke"
                )
            if getattr(part, "_ndif_rows", None) is not None and part._ndif_rows[0] is whole:
                return whole  # its own rows, edited in place or untouched
            if part.dim() == 0 or part.shape[0] != size:
                raise InvokeError(
                    f"an invoke with {size} row(s) assigned a value of shape {tuple(part.shape)} "
                    f"to {where} (full batch shape {tuple(whole.shape)})"
                )
            before = whole.narrow(0, 0, start)
            after = whole.narrow(0, start + size, total - start - size)
            return torch.cat([before, part.to(whole.dtype), after], dim=0)

        return merge_structure(full, edited, rows)

    def assemble_skips(self, parts: list[tuple[Group, Any]]) -> Any:
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1]
        ordered = sorted(parts, key=lambda part: -1 if part[0] is None else part[0][0])
        covered = 0
        for group, _ in ordered:
            if group is None or group[0] != covered:
                raise InvokeError(
                    "a batched .skip() must cover every row: skip the module in every invoke "
                    "(or in one whole-batch block), since one forward cannot run for only some rows"
                )
            covered += group[1]
        if covered != self.total:
            raise InvokeError("a batched .skip() must cover every row: skip the module in every invoke")
        return _concat([value for _, value in ordered])


def _concat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=0)
    if isinstance(first, (list, tuple)):
        combined = [_concat([value[i] for value in values]) for i in range(len(first))]
        return type(first)(combined)
    if isinstance(first, dict):
        return {key: _concat([value[key] for value in values]) for key in first}
    return first
