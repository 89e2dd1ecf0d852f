"""The namespace a captured block runs in, and writing results back to the caller."""

from __future__ import annotations

import builtins
import ctypes
import inspect
import sys
from types import FrameType
from typing import Any

from .rewrite import PREFIX

if sys.version_info < (3, 13):
    _locals_to_fast = ctypes.pythonapi.PyFrame_LocalsToFast
    _locals_to_fast.argtypes = (ctypes.py_object, ctypes.c_int)
    _locals_to_fast.restype = None
else:  # PEP 667: f_locals writes through
    _locals_to_fast = None

_BUILTINS = builtins.__dict__
_MISSING = object()

#: Names the rewritten code calls (see `ndif.tracing.rewrite`); filled by the engine.
HELPERS: dict[str, Any] = {}


class Scope(dict):
    """A block's namespace: its own names, then names shared with sibling blocks,
    then the globals it was written against, then builtins and ndif's helpers.

    A block runs later than the line it was written on, so it starts from a
    snapshot of the frame's locals (a loop variable keeps the value it had when the
    block was written). Names a block binds are also written to ``shared``, so a
    later ``tracer.invoke`` block of the same trace can read them. Used as
    ``exec``'s globals too, so lambdas and nested functions see the block's names.

    ``builtins`` is what names fall back to last (the sandbox passes its own; a
    block nested in another inherits its enclosing block's). ``hidden`` names were
    put in by ndif (the sandbox's guards) and are never handed back to the caller.
    """

    __slots__ = ("snapshot", "shared", "glbls", "builtins", "hidden")

    def __init__(
        self,
        own: dict,
        shared: dict | None,
        glbls: dict,
        builtins: dict | None = None,
        hidden: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(own)
        self.snapshot = own
        self.shared = shared
        self.glbls = glbls
        if builtins is None:
            builtins = glbls.builtins if isinstance(glbls, Scope) else _BUILTINS
        self.builtins = builtins
        self.hidden = hidden or (glbls.hidden if isinstance(glbls, Scope) else frozenset())

    def written(self) -> dict[str, Any]:
        """The names the block bound or rebound (not the ones it only inherited)."""
        snapshot = self.snapshot
        hidden = self.hidden
        return {
            name: value
            for name, value in self.items()
            if not name.startswith(PREFIX)
            and name not in hidden
            and (name not in snapshot or snapshot[name] is not value)
        }

    def visible(self) -> dict[str, Any]:
        """Every name the block holds, but ndif's own."""
        hidden = self.hidden
        return {name: value for name, value in self.items() if not name.startswith(PREFIX) and name not in hidden}

    def __missing__(self, key: str) -> Any:
        value = self._fallback(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def find(self, key: str, default: Any = None) -> Any:
        """What ``key`` names here, with every fallback (as ``self[key]``), else ``default``."""
        if key in self:
            return dict.__getitem__(self, key)
        return self._fallback(key, default)

    def _fallback(self, key: str, default: Any) -> Any:
        """What ``key`` names beyond the block's own names (a miss: ``__missing__``)."""
        helper = HELPERS.get(key)
        if helper is not None:
            return helper
        shared = self.shared
        if shared is not None and key in shared:
            return shared[key]
        glbls = self.glbls
        if type(glbls) is dict:
            if key in glbls:
                return glbls[key]
        elif isinstance(glbls, Scope):  # an enclosing block's: let its own fallbacks answer
            value = glbls.find(key, _MISSING)
            if value is not _MISSING:
                return value
        else:
            try:
                return glbls[key]
            except KeyError:
                pass
        return self.builtins.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        if self.shared is not None:
            self.shared[key] = value


def frame_locals(frame: FrameType) -> dict:
    """A snapshot of ``frame``'s own names: a function's locals, or the names an
    enclosing block bound; nothing for a module, whose globals are read live."""
    names = frame.f_locals
    if names is frame.f_globals and type(names) is dict:
        return {}
    return dict(names)


def write_back(frame: FrameType, values: dict[str, Any]) -> None:
    """Bind ``values`` as variables of ``frame`` (the caller of a trace).

    A function's local names go to its locals; a name the function does not own
    (declared ``global``) goes to its globals, as the assignment would have.
    """
    if not values:
        return
    target = frame.f_locals
    if target is frame.f_globals or not frame.f_code.co_flags & inspect.CO_OPTIMIZED:
        for name, value in values.items():
            target[name] = value  # item by item, so an enclosing Scope shares them
        return
    owned = _owned_names(frame.f_code)
    for name, value in values.items():
        (target if name in owned else frame.f_globals)[name] = value
    if _locals_to_fast is not None:
        _locals_to_fast(frame, 0)


_OWNED: dict[Any, frozenset[str]] = {}


def _owned_names(code: Any) -> frozenset[str]:
    """The names a function's code keeps as locals (everything else it assigns is global)."""
    owned = _OWNED.get(code)
    if owned is None:
        owned = _OWNED[code] = frozenset(code.co_varnames + code.co_cellvars + code.co_freevars)
    return owned


def release_locals(frame: FrameType) -> None:
    """Drop the snapshot of a function's locals that reading ``f_locals`` cached on
    the frame (Python < 3.13), so a variable deleted after the trace is freed."""
    if _locals_to_fast is not None and frame.f_code.co_flags & inspect.CO_OPTIMIZED:
        frame.f_locals.clear()
