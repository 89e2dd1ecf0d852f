"""Which values leave a trace: ``.save()`` and ``ndif.save(x)``."""

from __future__ import annotations

from typing import Any

import torch

from ..tracing.errors import OutsideTraceError
from .context import SAVES


class SaveScope:
    """The values marked as saved during one outermost trace or session.

    Marks by identity and keeps a reference, so an id cannot be reused by another
    object while the scope is open.
    """

    __slots__ = ("_ids", "_kept")

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._kept: list[Any] = []

    def mark(self, value: Any) -> None:
        if id(value) not in self._ids:
            self._ids.add(id(value))
            self._kept.append(value)

    def is_saved(self, value: Any) -> bool:
        return id(value) in self._ids

    def select(self, names: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``names`` whose values were saved."""
        ids = self._ids
        return {name: value for name, value in names.items() if id(value) in ids}


def save(value: Any) -> Any:
    """Mark ``value`` to be returned from the enclosing trace; returns it unchanged.

    ``h = ndif.save(model.model.layers[0].output)`` is the same as
    ``h = model.model.layers[0].output.save()``.
    """
    scope = SAVES.get()
    if scope is None:
        raise OutsideTraceError(
            "save() was called outside a trace. It marks a value to return from the "
            "enclosing `with model.trace(...):` block; move it into the block."
        )
    scope.mark(value)
    return value


def save_method_call(value: Any) -> Any:
    """What ``value.save()`` in a trace body compiles to.

    An object with a ``save`` method of its own keeps it; everything else is saved.
    (A ``save`` every object inherits, as another tracing library may mount on
    ``object``, does not count as the object's own.)
    """
    kind = type(value)
    if kind is torch.Tensor:
        return save(value)
    own = getattr(kind, "save", None)
    if own is None or own is _tensor_save or own is getattr(object, "save", None):
        return save(value)
    return value.save()


def _tensor_save(self: torch.Tensor) -> torch.Tensor:
    """Mark this tensor to be returned from the enclosing trace (``ndif.save``)."""
    if SAVES.get() is None:
        inherited = getattr(object, "save", None)  # another library's, outside ndif's traces
        if inherited is not None:
            return inherited(self)
    return save(self)


def install_tensor_save() -> None:
    """Give ``torch.Tensor`` a ``save()`` method, for helper functions written
    outside a trace body (inside a body every ``x.save()`` already works)."""
    if "save" not in vars(torch.Tensor):
        torch.Tensor.save = _tensor_save  # type: ignore[attr-defined]
