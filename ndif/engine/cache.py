"""``tracer.cache()``: record many modules' activations in one go."""

from __future__ import annotations

from typing import Any

import torch

from .batching import map_tensors
from .instrument import Site
from .mediator import INPUT, Slot, first_input


class Entry:
    """One call of a module: what it was given and what it returned."""

    __slots__ = ("inputs", "output")

    def __init__(self) -> None:
        self.inputs: Any = None
        self.output: Any = None

    @property
    def input(self) -> Any:
        return None if self.inputs is None else first_input(*self.inputs)

    def __repr__(self) -> str:
        return f"Entry(inputs={self.inputs is not None}, output={self.output is not None})"


class Cache:
    """Records the events of chosen modules for one block, after interventions."""

    def __init__(
        self,
        paths: dict[Site, str],
        group: Any,
        device: torch.device | str | None = "cpu",
        dtype: torch.dtype | None = None,
        detach: bool = True,
        include_output: bool = True,
        include_inputs: bool = False,
    ) -> None:
        self.paths = paths
        self.group = group
        self.device = device
        self.dtype = dtype
        self.detach = detach
        self.include_output = include_output
        self.include_inputs = include_inputs
        self.entries: dict[str, list[Entry]] = {}

    def _transform(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.detach:
            tensor = tensor.detach()
        if self.device is not None or self.dtype is not None:
            tensor = tensor.to(device=self.device, dtype=self.dtype)
        return tensor

    def observe(self, slot: Slot, run: Any) -> None:
        path = self.paths.get(slot.site)
        if path is None:
            return
        is_input = slot.event == INPUT
        if (is_input and not self.include_inputs) or (not is_input and not self.include_output):
            return
        value = slot.value if run.batcher is None else run.batcher.narrow(slot.value, self.group)
        value = map_tensors(value, self._transform)
        entries = self.entries.setdefault(path, [])
        if is_input or not entries or entries[-1].output is not None or not self.include_inputs:
            entries.append(Entry())
        if is_input:
            entries[-1].inputs = value
        else:
            entries[-1].output = value


class CacheView:
    """What ``tracer.cache()`` returns: entries addressable by path or by navigation.

    ``cache["model.model.layers.0"].output`` or ``cache.model.model.layers[0].output``.
    A module called several times (a generation loop) gives a list, one per call.
    """

    def __init__(self, cache: Cache, root: str, path: str | None = None) -> None:
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_path", path)

    def save(self) -> CacheView:
        from .saving import save

        return save(self)

    def _child(self, name: str) -> CacheView:
        if self._path is None:
            path = self._root if name == self._root else f"{self._root}.{name}"
        else:
            path = f"{self._path}.{name}"
        return CacheView(self._cache, self._root, path)

    def __getattr__(self, name: str) -> CacheView:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._child(name)

    def __getitem__(self, key: str | int) -> CacheView:
        if isinstance(key, str) and (key == self._root or key.startswith(self._root + ".")):
            return CacheView(self._cache, self._root, key)
        return self._child(str(key))

    def keys(self) -> list[str]:
        return list(self._cache.entries)

    def __contains__(self, path: str) -> bool:
        return path in self._cache.entries

    def _entries(self) -> list[Entry]:
        if self._path is None:
            raise KeyError("pick a module first, e.g. cache['model.model.layers.0']")
        entries = self._cache.entries.get(self._path)
        if entries is None:
            known = ", ".join(list(self._cache.entries)[:8])
            raise KeyError(f"{self._path!r} was not cached (cached: {known}...)")
        return entries

    def _values(self, name: str) -> Any:
        values = [getattr(entry, name) for entry in self._entries()]
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        return self._values("output")

    @property
    def inputs(self) -> Any:
        return self._values("inputs")

    @property
    def input(self) -> Any:
        return self._values("input")

    def __len__(self) -> int:
        return len(self._entries()) if self._path is not None else len(self._cache.entries)

    def __repr__(self) -> str:
        if self._path is None:
            return f"CacheView({len(self._cache.entries)} modules)"
        return f"CacheView({self._path})"
