"""Envoys: the wrapped model's modules as seen from a trace body.

``model.model.layers[2].mlp`` is an `Envoy`: it mirrors a ``torch.nn.Module``
(attribute access, indexing, iteration, calling it) and adds what a trace needs:
``.output``, ``.input``, ``.inputs`` (read, assign, edit in place), ``.skip(value)``
and ``.next()``. Reading ``.output`` inside a trace body parks the body until the
model produces that output; outside a trace it is an error.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import torch

from .engine.context import CURRENT_MEDIATOR
from .engine.instrument import Site, instrument
from .engine.iteration import advance
from .engine.mediator import INPUT, OUTPUT, READ, READ_FIRST, SKIP, WRITE, WRITE_FIRST, current_mediator
from .tracing.errors import NDIFError

#: Names an envoy answers itself; a submodule with one of these names is reached as ``E_<name>``.
RESERVED = frozenset({"output", "input", "inputs", "skip", "next", "path", "get", "modules", "named_modules"})


def _request(envoy: Envoy, event: int, op: int, what: str, value: Any = None) -> Any:
    mediator = CURRENT_MEDIATOR.get()
    if mediator is None or mediator.backward is not None:
        _refuse(envoy, what)
    return mediator.request(event, op, envoy._site, envoy.path, value)


def _refuse(envoy: Envoy, what: str) -> None:
    current_mediator(f"{envoy.path}.{what}")  # raises outside a trace
    raise NDIFError(
        f"{envoy.path}.{what} cannot be used inside `with loss.backward():`, where only "
        "`.grad` is served (the forward pass is over). Read it before the backward block."
    )


class Envoy:
    """A proxy for one module of a wrapped model."""

    def __init__(self, module: torch.nn.Module, path: str = "model", rename: dict | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "_site", instrument(module, path))
        object.__setattr__(self, "_rename", rename)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_aliases", {})
        for name, child in module._modules.items():
            if child is not None:
                self._add_child(name, child)
        if rename:
            _bind_aliases(self, rename)

    def _add_child(self, name: str, module: torch.nn.Module) -> Envoy:
        child = Envoy(module, f"{self.path}.{name}", self._rename)
        self._children[name] = child
        attribute = f"E_{name}" if name in RESERVED or hasattr(type(self), name) else name
        object.__setattr__(self, attribute, child)
        return child

    # -- values in a trace -----------------------------------------------------------

    @property
    def output(self) -> Any:
        """The module's output (inside a trace); assign to replace it for the rest of the run."""
        return _request(self, OUTPUT, READ, "output")

    @output.setter
    def output(self, value: Any) -> None:
        _request(self, OUTPUT, WRITE, "output", value)

    @property
    def input(self) -> Any:
        """The module's first input (first positional argument, else first keyword)."""
        return _request(self, INPUT, READ_FIRST, "input")

    @input.setter
    def input(self, value: Any) -> None:
        _request(self, INPUT, WRITE_FIRST, "input", value)

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """All the module's inputs, as ``(args, kwargs)``."""
        return _request(self, INPUT, READ, "inputs")

    @inputs.setter
    def inputs(self, value: tuple[tuple, dict]) -> None:
        _request(self, INPUT, WRITE, "inputs", value)

    def skip(self, value: Any) -> None:
        """Do not run this module; use ``value`` as its output."""
        _request(self, INPUT, SKIP, "skip()", value)

    def next(self, count: int = 1) -> Envoy:
        """Bind this block's following requests ``count`` generation steps later."""
        advance(count)
        return self

    # -- module-like behaviour ----------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module directly (inside a trace: off the model's own pass, e.g. logit lens)."""
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        module = self.__dict__.get("_module")
        if module is None or name.startswith("_"):
            # Private names never fall through to the module: `torch.nn.Module` methods
            # called on an envoy must not reach the real module's hooks and parameters.
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: an envoy does not expose its module's private "
                "attributes (a torch.nn.Module method called on an envoy would need them)"
            )
        try:
            value = getattr(module, name)
        except AttributeError:
            raise AttributeError(self._unknown(name)) from None
        if isinstance(value, torch.nn.Module):
            return self._add_child(name, value)
        return value

    def _unknown(self, name: str) -> str:
        children = list(self._children)
        known = children + [a for a in self._aliases] + [a for a in dir(self._module) if not a.startswith("_")]
        close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = f" Its submodules: {', '.join(children)}." if children else " It has no submodules."
        return f"{self.path} ({type(self._module).__name__}) has no submodule or attribute {name!r}.{hint}{listing}"

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, torch.nn.Module) and not name.startswith("_"):
            setattr(self._module, name, value)  # attach a submodule (an SAE, a probe...)
            self._add_child(name, value)
        else:
            object.__setattr__(self, name, value)

    def __getitem__(self, key: int | str | slice) -> Any:
        children = self._children
        if isinstance(key, int):
            size = len(children)
            child = children.get(str(key if key >= 0 else key + size))
            if child is None:
                raise IndexError(f"{self.path} has {size} entries (0..{size - 1}); index {key} is out of range")
            return child
        if isinstance(key, slice):
            return list(children.values())[key]
        child = children.get(str(key))
        if child is None:
            raise KeyError(self._unknown(str(key)))
        return child

    def __iter__(self) -> Iterator[Envoy]:
        return iter(list(self._children.values()))

    def __len__(self) -> int:
        return len(self._module) if hasattr(self._module, "__len__") else len(self._children)

    def __bool__(self) -> bool:
        return True

    def get(self, path: str) -> Envoy:
        """The envoy at a dotted path below this one (``"model.layers.0.mlp"``); aliases work."""
        envoy: Envoy = self
        for part in path.split("."):
            child = envoy._children.get(part)
            if child is None:
                alias = envoy.__dict__.get(part) if part in envoy._aliases else None
                if not isinstance(alias, Envoy):
                    raise AttributeError(envoy._unknown(part))
                child = alias
            envoy = child
        return envoy

    def modules(self) -> list[Envoy]:
        """This envoy and every envoy below it, in module order."""
        found = [self]
        for child in self._children.values():
            found.extend(child.modules())
        return found

    def named_modules(self) -> list[tuple[str, Envoy]]:
        return [(envoy.path, envoy) for envoy in self.modules()]

    def _sites(self) -> dict[Site, str]:
        return {envoy._site: envoy.path for envoy in self.modules()}

    def _repoint(self, module: torch.nn.Module) -> None:
        """Point this subtree at a module of the same structure (after loading weights)."""
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_site", instrument(module, self.path))
        for name, child in self._children.items():
            replacement = module._modules.get(name)
            if replacement is None:
                replacement = getattr(module, name)
            child._repoint(replacement)

    def __repr__(self) -> str:
        return repr(self._module)


def _resolve(envoy: Envoy, key: str) -> list[tuple[str, Envoy]]:
    """Descendants named by a dotted ``rename`` key (``*`` matches any one child)."""
    found: list[tuple[str, Envoy]] = [("", envoy)]
    for part in key.strip(".").split("."):
        step = []
        for path, node in found:
            if part == "*":
                step += [(f"{path}.{name}", child) for name, child in node._children.items()]
            elif part in node._children:
                step.append((f"{path}.{part}", node._children[part]))
        found = step
    return [(path.lstrip("."), node) for path, node in found]


def _bind_aliases(envoy: Envoy, rename: dict) -> None:
    """Bind ``rename`` aliases that resolve from ``envoy`` as attributes pointing at the same envoys."""
    for key, aliases in rename.items():
        if isinstance(key, type):
            matches = [(name, child) for name, child in envoy._children.items() if isinstance(child._module, key)]
        else:
            matches = _resolve(envoy, key)
        if not matches:
            continue
        if len({id(node) for _, node in matches}) > 1:
            raise ValueError(
                f"rename key {key!r} matches {len(matches)} modules under {envoy.path} "
                f"({', '.join(path for path, _ in matches)}); an alias must name exactly one module"
            )
        path, target = matches[0]
        for alias in [aliases] if isinstance(aliases, str) else aliases:
            host, name = envoy, alias
            if "." in alias:
                prefix, _, name = alias.rpartition(".")
                host = envoy.get(prefix)
            if host.__dict__.get(name) is target:
                continue
            if name in host.__dict__ or hasattr(type(host), name) or hasattr(host._module, name):
                raise ValueError(
                    f"rename alias {alias!r} for {path!r} would shadow an existing name on {host.path}; "
                    "pick a different alias"
                )
            object.__setattr__(host, name, target)
            host._aliases[name] = path
