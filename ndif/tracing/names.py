"""The names a block's code can reach: what a serving engine reads to plan its steps.

`names_in` collects every attribute and global name a function's code uses, and the
dotted parts of its string constants, through nested code (comprehensions, lambdas,
inner functions) and the Python functions it reaches by name (its globals and closure).
A name that appears nowhere in this set cannot be reached by ordinary code: the vLLM
backend uses that to run a job's steps on compiled graphs when its code names only
modules that are tapped there (see ``ndif.models.vllm.taps``).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import sysconfig
import types
from collections.abc import Mapping
from typing import Any

_PARTS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: How far the scan follows functions named by a function (helpers calling helpers).
MAX_DEPTH = 6


def names_in(function: Any) -> set[str]:
    """Every name ``function``'s code may use to reach an attribute (see the module doc)."""
    names: set[str] = set()
    _scan_function(function, names, set(), 0)
    return names


def _scan_function(function: Any, names: set[str], seen: set[int], depth: int) -> None:
    function = getattr(function, "__func__", function)  # a bound method's function
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType) or id(function) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(function))
    codes = [code]
    scopes: list[Mapping] = [getattr(function, "__globals__", {})]
    # A captured block is ``lambda: exec(code, scope)``: its code and names sit in the closure.
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, types.CodeType):
            codes.append(value)
        elif isinstance(value, Mapping):
            scopes.append(value)
        else:
            _follow(value, names, seen, depth + 1)
    for each in codes:
        for name in _scan_code(each, names):
            for scope in scopes:
                value = _resolve(scope, name)
                if value is not _UNRESOLVED:
                    _follow(value, names, seen, depth + 1)
                    break


_UNRESOLVED = object()


def _resolve(scope: Mapping, name: str) -> Any:
    """What ``name`` refers to in ``scope``, without raising for a name it lacks (most names
    a code object holds are attributes, which no scope has)."""
    find = getattr(scope, "find", None)  # a block's Scope: with its fallbacks
    if find is not None:
        return find(name, _UNRESOLVED)
    if type(scope) is dict:
        return scope.get(name, _UNRESOLVED)
    try:
        return scope[name]
    except Exception:  # noqa: BLE001 - a name the code cannot resolve reaches nothing
        return _UNRESOLVED


def _follow(value: Any, names: set[str], seen: set[int], depth: int) -> None:
    """Scan what a name refers to, where it is user code: a function or a class."""
    if isinstance(value, (types.FunctionType, types.MethodType)):
        if not _in_library(value):
            _scan_function(value, names, seen, depth)
    elif isinstance(value, type) and not _in_library(value):
        _scan_class(value, names, seen, depth)


def _in_library(value: Any) -> bool:
    """Whether ``value`` comes from an installed package or the standard library (whose code
    cannot know the model's module names), rather than from the user's code. ndif's own
    code counts as a library: what it reaches of a model is decoder layer outputs
    (``ndif.interp``), which the vLLM backend taps."""
    module = sys.modules.get(getattr(value, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    return path is not None and path.startswith(_LIBRARY_PATHS)


_LIBRARY_PATHS = tuple(
    {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    | {os.path.dirname(os.path.dirname(__file__))}  # ndif itself
)


def _scan_class(cls: type, names: set[str], seen: set[int], depth: int) -> None:
    if id(cls) in seen:
        return
    seen.add(id(cls))
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, types.FunctionType):
            _scan_function(value, names, seen, depth)


def _scan_code(code: types.CodeType, names: set[str]) -> frozenset[str]:
    """Add ``code``'s names and string words (nested code too) to ``names``; returns the
    names it looks up (attributes and globals), for the caller to resolve."""
    found, looked_up = _code_names(code)
    names.update(found)
    return looked_up


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> tuple[frozenset[str], frozenset[str]]:
    """``code``'s names and string words, and the names it looks up; once per code object
    (a serving engine scans every job, and many jobs run the same traced code)."""
    names: set[str] = set()
    looked_up = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            looked_up |= _scan_code(const, names)
        elif isinstance(const, str):
            names.update(_PARTS.findall(const))
        elif isinstance(const, (tuple, frozenset)):
            for item in const:
                if isinstance(item, str):
                    names.update(_PARTS.findall(item))
    names.update(looked_up)
    return frozenset(names), frozenset(looked_up)
