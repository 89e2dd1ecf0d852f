"""Values on the wire: Python objects <-> MessagePack-ready trees.

Plain data maps to MessagePack natives (None, bool, int, float, str, bytes,
lists). Everything else is a map with a ``"$"`` tag (see ``docs/wire-format.md``):
tuples, dicts (any keys), sets, complex numbers, slices, Ellipsis, tensors of any
dtype (raw little-endian bytes, never pickles), NumPy arrays of numeric dtypes,
``torch.dtype``/``torch.device``, functions and classes from the user's own code
(as source, with the values they capture), ``torch.nn.Module`` instances (class,
attributes, parameters, buffers, children) and placeholders for things the server
has itself (the model, its modules, the tracer, allowed library modules and their
functions).

Decoding builds data only. Code (functions, classes, modules of user classes)
comes back as specs — `FunctionSpec`, `ClassSpec`, `ModuleSpec` — which only the
sandbox turns into live objects. Nothing here executes code or unpickles.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import math
import re
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..tracing.errors import NDIFError


class WireError(NDIFError, ValueError):
    """A value cannot be sent (client side) or a message is malformed (server side)."""


#: Modules a body may use by name; their functions travel as references.
LIBRARY_MODULES = ("torch", "math", "numpy", "einops", "ndif")

#: Tensor dtypes that travel, by wire name.
TENSOR_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex64",
        "complex128",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
    if hasattr(torch, name)
}
_DTYPE_NAMES = {dtype: name for name, dtype in TENSOR_DTYPES.items()}

#: NumPy dtypes that travel (no object or structured dtypes).
NDARRAY_KINDS = frozenset("biufc")

#: transformers output classes that travel by name.
MODEL_OUTPUTS = ("transformers.modeling_outputs", "transformers.generation.utils")


@dataclass
class Limits:
    """Bounds a decoder enforces on a message's values."""

    max_depth: int = 64
    max_items: int = 1_000_000
    max_tensor_bytes: int = 8 << 30
    max_source_chars: int = 1 << 20


@dataclass(eq=False)
class FunctionSpec:
    """A function from the user's code, by source: compiled only by the sandbox."""

    name: str
    source: str
    filename: str
    line: int
    globals: dict[str, Any] = field(default_factory=dict)
    closure: dict[str, Any] = field(default_factory=dict)
    is_lambda: bool = False


@dataclass(eq=False)
class ClassSpec:
    """A class from the user's code, by source: compiled only by the sandbox."""

    name: str
    source: str
    filename: str
    line: int
    globals: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class ModuleSpec:
    """A ``torch.nn.Module`` instance: its class and its state, rebuilt without running ``__init__``."""

    cls: Any  # ClassSpec or a Placeholder naming a torch.nn class
    attrs: dict[str, Any]
    parameters: dict[str, Any]
    buffers: dict[str, Any]
    children: dict[str, Any]
    training: bool


@dataclass(frozen=True)
class Placeholder:
    """Something the server provides itself.

    ``kind`` is ``"model"`` (the traced model), ``"envoy"`` (one of its modules,
    ``value`` is its path), ``"tracer"``, ``"import"`` (an allowed library module,
    ``value`` its name) or ``"attr"`` (a function or class of one, ``value`` its
    dotted path such as ``"torch.nn.functional.gelu"``).
    """

    kind: str
    value: str = ""


def _module_name(key: Any) -> bool:
    """A name for a submodule or parameter: ``"proj"``, or ``"0"`` in a ModuleList or
    Sequential (letters, digits and underscores; never empty, never dotted)."""
    return isinstance(key, str) and 0 < len(key) <= 256 and _MODULE_NAME.fullmatch(key) is not None


_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+")


_BIG_INT = re.compile(r"-?[0-9]{1,4000}")
_MAX_DIMENSION = 2**40


# -- encoding ----------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _library_path(value: Any) -> str | None:
    """``"torch.nn.functional.gelu"`` for a function or class of an allowed library, else None."""
    spellings = _public_spellings(value)
    return spellings[0] if spellings else None


_PUBLIC_NAMESPACES = (
    "torch",
    "torch.nn",
    "torch.nn.functional",
    "torch.linalg",
    "torch.fft",
    "torch.special",
    "math",
    "numpy",
    "numpy.linalg",
    "einops",
    "ndif.interp",
)


def _public_spellings(value: Any) -> list[str]:
    found = []
    name = getattr(value, "__name__", None)
    if not isinstance(name, str):
        return found
    for namespace in _PUBLIC_NAMESPACES:
        module = sys.modules.get(namespace)
        if module is not None and getattr(module, name, None) is value:
            found.append(f"{namespace}.{name}")
    return found


class Encoder:
    """Turns Python values into wire trees.

    Args:
        placeholders: Maps an object to a `Placeholder` the server resolves (the
            model, its envoys, the tracer), or returns None.
        allow_code: Whether functions, classes and user modules may be sent (a
            client's request); results carry data only.
    """

    def __init__(self, placeholders: Callable[[Any], Placeholder | None] | None = None, allow_code: bool = True):
        self.placeholders = placeholders
        self.allow_code = allow_code
        self._ids: dict[int, int] = {}
        self._keep: list[Any] = []
        self._active: set[int] = set()

    def encode(self, value: Any, where: str) -> Any:
        """Encode ``value``; ``where`` names it in errors (``"variable 'steer'"``)."""
        return self._value(value, where)

    def _refuse(self, value: Any, where: str, why: str = "") -> WireError:
        kind = type(value)
        reason = why or (
            "only plain data (numbers, strings, bytes, lists, tuples, dicts, sets, slices), tensors, NumPy "
            "arrays, dtypes/devices, and functions, classes and torch modules from your own code can be sent"
        )
        return WireError(f"cannot send {where}: it is a {kind.__module__}.{kind.__qualname__}; {reason}")

    def _memo(self, value: Any) -> tuple[int, bool]:
        key = id(value)
        if key in self._ids:
            return self._ids[key], True
        number = self._ids[key] = len(self._ids)
        self._keep.append(value)
        return number, False

    def _value(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str, bytes)):
            return value
        if isinstance(value, int):
            return value if -(2**63) <= value < 2**64 else {"$": "int", "v": str(value)}
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
        if self.placeholders is not None:
            try:
                holder = self.placeholders(value)
            except WireError as refused:
                raise WireError(f"cannot send {where}: {refused}") from None
            if holder is not None:
                return {"$": holder.kind, "v": holder.value}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        key = id(value)
        if key in self._ids:  # a function, class, module or tensor already on its way
            return {"$": "ref", "v": self._ids[key]}
        if key in self._active:
            raise self._refuse(value, where, "it contains itself, which cannot be sent")
        self._active.add(key)
        try:
            return self._container(value, where)
        finally:
            self._active.discard(key)

    def _container(self, value: Any, where: str) -> Any:
        kind = type(value)
        if kind is list:
            return [self._value(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if kind is torch.Size:
            return {"$": "size", "v": [int(size) for size in value]}
        if kind is tuple or (isinstance(value, tuple) and not hasattr(value, "_fields")):
            return {"$": "tuple", "v": [self._value(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if kind is dict:
            return self._dict(value, where)
        if kind in (set, frozenset):
            items = [self._value(item, f"an item of {where}") for item in value]
            return {"$": "set" if kind is set else "frozenset", "v": items}
        if kind is complex:
            return {"$": "complex", "v": [value.real, value.imag]}
        if kind is slice:
            parts = [self._value(part, f"{where} (a slice)") for part in (value.start, value.stop, value.step)]
            return {"$": "slice", "v": parts}
        if value is Ellipsis:
            return {"$": "ellipsis"}
        if kind is torch.dtype:
            if value not in _DTYPE_NAMES:
                raise self._refuse(value, where, f"dtype {value} does not travel")
            return {"$": "dtype", "v": _DTYPE_NAMES[value]}
        if kind is torch.device:
            return {"$": "device", "v": str(value)}
        if isinstance(value, np.ndarray):
            return self._ndarray(value, where)
        if isinstance(value, np.generic):
            return self._value(value.item(), where)
        output = self._model_output(value, where)
        if output is not None:
            return output
        if isinstance(value, types.ModuleType):
            if value.__name__.split(".")[0] in LIBRARY_MODULES:
                return {"$": "import", "v": value.__name__}
            raise self._refuse(
                value,
                where,
                f"module {value.__name__!r} is not available to trace bodies (allowed: {', '.join(LIBRARY_MODULES)})",
            )
        library = _library_path(value) if callable(value) else None
        if library is not None:
            return {"$": "attr", "v": library}
        if isinstance(value, torch.nn.Module):
            return self._module(value, where)
        if isinstance(value, (types.FunctionType, type)):
            return self._code(value, where)
        encoded = self._extension(value, where)
        if encoded is not None:
            return encoded
        raise self._refuse(value, where)

    def _extension(self, value: Any, where: str) -> Any:
        """Values of ndif's own types (a cache view)."""
        from ..engine.cache import CacheView

        if isinstance(value, CacheView):
            entries = {
                path: [{"inputs": self._value(e.inputs, where), "output": self._value(e.output, where)} for e in items]
                for path, items in value._cache.entries.items()
            }
            return {"$": "cache", "root": value._root, "entries": entries}
        return None

    def _dict(self, value: dict, where: str) -> Any:
        keys, items = [], []
        for key, item in value.items():
            keys.append(self._value(key, f"a key of {where}"))
            items.append(self._value(item, f"{where}[{key!r}]"))
        return {"$": "dict", "k": keys, "v": items}

    def _tensor(self, tensor: torch.Tensor, where: str) -> Any:
        if tensor.dtype not in _DTYPE_NAMES:
            raise self._refuse(tensor, where, f"tensors of dtype {tensor.dtype} do not travel")
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise self._refuse(tensor, where, "only dense (strided) tensors travel; call .to_dense()")
        number, seen = self._memo(tensor)
        if seen:
            return {"$": "ref", "v": number}
        if tensor.device.type == "meta" or type(tensor).__name__ == "FakeTensor":
            return {
                "$": "tensor",
                "id": number,
                "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data": None,
                "grad": False,
            }
        return {
            "$": "tensor",
            "id": number,
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data": _tensor_bytes(tensor),
            "grad": bool(tensor.requires_grad and tensor.is_leaf),
        }

    def _ndarray(self, array: np.ndarray, where: str) -> Any:
        if array.dtype.kind not in NDARRAY_KINDS:
            raise self._refuse(array, where, f"NumPy arrays of dtype {array.dtype} do not travel (numeric only)")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return {
            "$": "ndarray",
            "dtype": little.dtype.str,
            "shape": list(array.shape),
            "data": np.ascontiguousarray(little).tobytes(),
        }

    def _model_output(self, value: Any, where: str) -> Any:
        kind = type(value)
        if not kind.__module__.startswith(MODEL_OUTPUTS) or not isinstance(value, dict):
            return None
        fields = {key: item for key, item in value.items() if _output_field(item)}
        return {"$": "output", "class": f"{kind.__module__}.{kind.__qualname__}", "v": self._dict(fields, where)}

    def _module(self, module: torch.nn.Module, where: str) -> Any:
        if not self.allow_code:
            raise self._refuse(module, where, "a result can hold data only")
        number, seen = self._memo(module)
        if seen:
            return {"$": "ref", "v": number}
        kind = type(module)
        cls = self._value(kind, f"the class of {where}")
        internal = _MODULE_INTERNALS
        attrs = {key: item for key, item in vars(module).items() if key not in internal}
        return {
            "$": "module",
            "id": number,
            "class": cls,
            "attrs": self._dict(attrs, f"{where} (attributes)"),
            "parameters": {
                name: None if p is None else self._value(p, f"{where}.{name}") for name, p in module._parameters.items()
            },
            "buffers": {
                name: None if b is None else self._value(b, f"{where}.{name}") for name, b in module._buffers.items()
            },
            "children": {
                name: None if c is None else self._value(c, f"{where}.{name}") for name, c in module._modules.items()
            },
            "training": module.training,
        }

    def _code(self, value: types.FunctionType | type, where: str) -> Any:
        if not self.allow_code:
            raise self._refuse(value, where, "a result can hold data only")
        number, seen = self._memo(value)
        if seen:
            return {"$": "ref", "v": number}
        if isinstance(value, type):
            return self._class(value, number, where)
        return self._function(value, number, where)

    def _function(self, function: types.FunctionType, number: int, where: str) -> Any:
        code = function.__code__
        source, is_lambda = _function_source(function, where)
        scope = function.__globals__
        # Names the code reads, and names its definition reads (annotations, defaults, decorators).
        names = _code_names(code) | _source_names(source)
        globals_ = {name: scope[name] for name in sorted(names) if name in scope and not _is_builtin(name, scope[name])}
        closure = {}
        for name, cell in zip(code.co_freevars, function.__closure__ or ()):
            try:
                closure[name] = cell.cell_contents
            except ValueError:
                continue
        return {
            "$": "function",
            "id": number,
            "name": function.__name__,
            "source": source,
            "filename": code.co_filename,
            "line": code.co_firstlineno,
            "globals": self._dict(globals_, f"a name used by {function.__qualname__}"),
            "closure": self._dict(closure, f"a name captured by {function.__qualname__}"),
            "lambda": is_lambda,
        }

    def _class(self, cls: type, number: int, where: str) -> Any:
        module = sys.modules.get(cls.__module__)
        filename = getattr(module, "__file__", None) or "<unknown>"
        try:
            lines, line = _class_source(cls)
        except (OSError, TypeError) as error:
            raise self._refuse(
                cls, where, f"its source cannot be read ({error}); define it in a file or a notebook cell"
            ) from None
        scope = vars(module) if module is not None else {}
        names = sorted(_source_names(lines))
        globals_ = {
            name: scope[name]
            for name in names
            if name in scope and name != cls.__name__ and not _is_builtin(name, scope[name])
        }
        code = next((v.__code__ for v in vars(cls).values() if isinstance(v, types.FunctionType)), None)
        if code is not None:
            filename = code.co_filename
        return {
            "$": "class",
            "id": number,
            "name": cls.__name__,
            "source": lines,
            "filename": filename,
            "line": line,
            "globals": self._dict(globals_, where),
        }


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()).keys()) | {"training"}


def _output_field(value: Any) -> bool:
    """Whether a model output's field travels: tensors, and tuples of them (not caches)."""
    if value is None or isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple) and all(isinstance(item, (torch.Tensor, tuple)) for item in value)


def _is_builtin(name: str, value: Any) -> bool:
    return getattr(builtins, name, _SENTINEL) is value


_SENTINEL = object()


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _source_names(source: str) -> set[str]:
    """Names a definition's source reads, leaving out annotations (never evaluated remotely)."""
    from ..tracing.rewrite import strip_annotations

    tree = strip_annotations(ast.parse(source))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def _lines_of(code: types.CodeType) -> list[str]:
    from ..tracing.capture import source_lines

    return source_lines(code.co_filename)


def _function_source(function: types.FunctionType, where: str) -> tuple[str, bool]:
    code = function.__code__
    lines = _lines_of(code)
    if not lines:
        raise WireError(
            f"cannot send {where}: the source of {function.__qualname__} cannot be read; "
            "define it in a file or a notebook cell"
        )
    first = code.co_firstlineno
    if function.__name__ == "<lambda>":
        text = "".join(lines[first - 1 : first + 20])
        tree = None
        for end in range(1, 21):
            try:
                tree = ast.parse(textwrap.dedent("".join(lines[first - 1 : first - 1 + end])))
                break
            except SyntaxError:
                continue
        if tree is None:
            raise WireError(f"cannot send {where}: the source of its lambda cannot be isolated; use a def")
        lambdas = [node for node in ast.walk(tree) if isinstance(node, ast.Lambda)]
        if len(lambdas) != 1:
            raise WireError(f"cannot send {where}: its line holds {len(lambdas)} lambdas; write it as a def")
        text = textwrap.dedent("".join(lines[first - 1 : first - 1 + end]))
        return ast.get_source_segment(text, lambdas[0]) or "", True
    node = _definition(code.co_filename, ast.FunctionDef, function.__name__, lambda n: _first_line(n) == first)
    if node is not None:
        return _node_source(lines, node), False
    block = inspect.getblock(lines[first - 1 :])
    return textwrap.dedent("".join(block)), False


def _first_line(node: ast.AST) -> int:
    """A definition's first line: its first decorator's, as the code object counts it."""
    return min([decorator.lineno for decorator in getattr(node, "decorator_list", [])] + [node.lineno])


def _node_source(lines: list[str], node: ast.AST) -> str:
    return textwrap.dedent("".join(lines[_first_line(node) - 1 : node.end_lineno]))


_DEFINITIONS: dict[str, tuple[ast.Module, dict[tuple[type, str], list[ast.AST]]]] = {}


def _definition(filename: str, kind: type, name: str, matches: Callable[[ast.AST], bool]) -> ast.AST | None:
    """The one definition of ``kind`` called ``name`` in ``filename`` that ``matches``."""
    from ..tracing.capture import parsed

    tree = parsed(filename)
    if tree is None:
        return None
    cached = _DEFINITIONS.get(filename)
    if cached is None or cached[0] is not tree:  # index the file's definitions once per parse
        index: dict[tuple[type, str], list[ast.AST]] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                index.setdefault((type(node), node.name), []).append(node)
        cached = _DEFINITIONS[filename] = (tree, index)
    found = [node for node in cached[1].get((kind, name), []) if matches(node)]
    return found[0] if len(found) == 1 else None


def _class_source(cls: type) -> tuple[str, int]:
    """A class's source, from the parsed file (cached) rather than re-reading it each time."""
    methods = [v.__code__ for v in vars(cls).values() if isinstance(v, types.FunctionType)]
    filename = methods[0].co_filename if methods else getattr(sys.modules.get(cls.__module__), "__file__", None)
    if filename:

        def holds_methods(node: ast.AST) -> bool:
            return all(node.lineno <= code.co_firstlineno <= node.end_lineno for code in methods)

        node = _definition(filename, ast.ClassDef, cls.__name__, holds_methods)
        if node is not None:
            from ..tracing.capture import source_lines

            return _node_source(source_lines(filename), node), _first_line(node)
    lines, line = inspect.getsourcelines(cls)
    return textwrap.dedent("".join(lines)), line


# -- decoding ----------------------------------------------------------------------------


class Decoder:
    """Turns wire trees back into values (data and specs), validating as it goes."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._objects: dict[int, Any] = {}
        self._items = 0

    def decode(self, tree: Any) -> Any:
        return self._value(tree, 0)

    def _fail(self, why: str) -> WireError:
        return WireError(f"malformed message: {why}")

    def _value(self, tree: Any, depth: int) -> Any:
        if depth > self.limits.max_depth:
            raise self._fail(f"values nest deeper than {self.limits.max_depth}")
        self._items += 1
        if self._items > self.limits.max_items:
            raise self._fail(f"more than {self.limits.max_items} values")
        if tree is None or isinstance(tree, (bool, int, float, str, bytes)):
            return tree
        if isinstance(tree, list):
            return [self._value(item, depth + 1) for item in tree]
        if not isinstance(tree, dict):
            raise self._fail(f"unexpected {type(tree).__name__}")
        tag = tree.get("$")
        handler = self._HANDLERS.get(tag) if isinstance(tag, str) else None
        if handler is None:
            raise self._fail(f"unknown value tag {tag!r}")
        return handler(self, tree, depth + 1)

    def _field(self, tree: dict, name: str, kind: type | tuple[type, ...]) -> Any:
        value = tree.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._fail(f"field {name!r} of a {tree.get('$')!r} value must be {getattr(kind, '__name__', kind)}")
        return value

    def _list(self, tree: dict, depth: int, name: str = "v") -> list:
        return [self._value(item, depth) for item in self._field(tree, name, list)]

    def _int(self, tree: dict, depth: int) -> int:
        text = self._field(tree, "v", str)
        if not _BIG_INT.fullmatch(text):
            raise self._fail("bad big integer")
        return int(text)

    def _float(self, tree: dict, depth: int) -> float:
        text = self._field(tree, "v", str)
        if text not in ("nan", "inf", "-inf"):
            raise self._fail("bad special float")
        return float(text)

    def _tuple(self, tree: dict, depth: int) -> tuple:
        return tuple(self._list(tree, depth))

    def _size(self, tree: dict, depth: int) -> torch.Size:
        dims = self._field(tree, "v", list)
        if len(dims) > 32 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in dims):
            raise self._fail("a torch.Size must be at most 32 non-negative integers")
        return torch.Size(dims)

    def _dict(self, tree: dict, depth: int) -> dict:
        keys = self._list(tree, depth, "k")
        values = self._list(tree, depth, "v")
        if len(keys) != len(values):
            raise self._fail("a dict's keys and values differ in number")
        try:
            return dict(zip(keys, values))
        except TypeError:
            raise self._fail("a dict key is not hashable") from None

    def _set(self, tree: dict, depth: int) -> set | frozenset:
        items = self._list(tree, depth)
        try:
            return set(items) if tree["$"] == "set" else frozenset(items)
        except TypeError:
            raise self._fail("a set item is not hashable") from None

    def _complex(self, tree: dict, depth: int) -> complex:
        parts = self._field(tree, "v", list)
        if len(parts) != 2 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
            raise self._fail("a complex number needs two real numbers")
        return complex(parts[0], parts[1])

    def _slice(self, tree: dict, depth: int) -> slice:
        parts = self._list(tree, depth)
        if len(parts) != 3:
            raise self._fail("a slice needs start, stop and step")
        return slice(*parts)

    def _ellipsis(self, tree: dict, depth: int) -> Any:
        return Ellipsis

    def _dtype(self, tree: dict, depth: int) -> torch.dtype:
        name = self._field(tree, "v", str)
        if name not in TENSOR_DTYPES:
            raise self._fail(f"unknown dtype {name!r}")
        return TENSOR_DTYPES[name]

    def _device(self, tree: dict, depth: int) -> torch.device:
        text = self._field(tree, "v", str)
        if len(text) > 32:
            raise self._fail("bad device")
        try:
            return torch.device(text)
        except (RuntimeError, ValueError):
            raise self._fail(f"bad device {text!r}") from None

    def _shape(self, tree: dict) -> list[int]:
        shape = self._field(tree, "shape", list)
        if len(shape) > 32 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise self._fail("a shape must be at most 32 non-negative integers")
        if any(s > _MAX_DIMENSION for s in shape):
            raise self._fail(f"a dimension is larger than {_MAX_DIMENSION}")
        return shape

    def _remember(self, tree: dict, value: Any) -> Any:
        number = tree.get("id")
        if isinstance(number, int) and not isinstance(number, bool):
            self._objects[number] = value
        return value

    def _tensor(self, tree: dict, depth: int) -> torch.Tensor:
        name = self._field(tree, "dtype", str)
        if name not in TENSOR_DTYPES:
            raise self._fail(f"unknown tensor dtype {name!r}")
        dtype = TENSOR_DTYPES[name]
        shape = self._shape(tree)
        numel = math.prod(shape)
        size = numel * torch.empty((), dtype=dtype).element_size()
        if size > self.limits.max_tensor_bytes:
            raise self._fail(f"a tensor of {size} bytes exceeds the limit of {self.limits.max_tensor_bytes}")
        data = tree.get("data")
        if data is None:
            return self._remember(tree, torch.empty(shape, dtype=dtype, device="meta"))
        if not isinstance(data, bytes) or len(data) != size:
            raise self._fail(
                f"tensor data has {len(data) if isinstance(data, bytes) else 'no'} bytes, "
                f"its shape and dtype need {size}"
            )
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if size else torch.zeros(0, dtype=torch.uint8)
        tensor = (raw != 0).reshape(shape) if dtype is torch.bool else raw.view(dtype).reshape(shape)
        if tree.get("grad") is True and (tensor.is_floating_point() or tensor.is_complex()):
            tensor.requires_grad_(True)
        return self._remember(tree, tensor)

    def _ndarray(self, tree: dict, depth: int) -> np.ndarray:
        text = self._field(tree, "dtype", str)
        try:
            dtype = np.dtype(text)
        except TypeError:
            raise self._fail(f"bad NumPy dtype {text!r}") from None
        if dtype.kind not in NDARRAY_KINDS or dtype.fields is not None or len(text) > 8:
            raise self._fail(f"NumPy dtype {text!r} does not travel")
        shape = self._shape(tree)
        size = math.prod(shape) * dtype.itemsize
        data = self._field(tree, "data", bytes)
        if len(data) != size or size > self.limits.max_tensor_bytes:
            raise self._fail("NumPy array data does not match its shape and dtype")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    def _ref(self, tree: dict, depth: int) -> Any:
        number = tree.get("v")
        if not isinstance(number, int) or number not in self._objects:
            raise self._fail("a reference to an unknown value")
        return self._objects[number]

    def _placeholder(self, tree: dict, depth: int) -> Placeholder:
        value = tree.get("v", "")
        if not isinstance(value, str) or len(value) > 256:
            raise self._fail("bad placeholder")
        return Placeholder(tree["$"], value)

    def _source(self, tree: dict, name: str = "source") -> str:
        text = self._field(tree, name, str)
        if len(text) > self.limits.max_source_chars:
            raise self._fail("source text too long")
        return text

    def _function(self, tree: dict, depth: int) -> FunctionSpec:
        spec = FunctionSpec(
            name=self._field(tree, "name", str),
            source=self._source(tree),
            filename=self._field(tree, "filename", str),
            line=self._field(tree, "line", int),
            is_lambda=tree.get("lambda") is True,
        )
        self._remember(tree, spec)
        spec.globals = self._named(tree, "globals", depth)
        spec.closure = self._named(tree, "closure", depth)
        return spec

    def _named(self, tree: dict, name: str, depth: int) -> dict[str, Any]:
        inner = tree.get(name)
        if not isinstance(inner, dict) or inner.get("$") != "dict":
            raise self._fail(f"field {name!r} must be a dict")
        values = self._dict(inner, depth)
        if not all(isinstance(key, str) and key.isidentifier() for key in values):
            raise self._fail(f"field {name!r} must map identifiers")
        return values

    def _class(self, tree: dict, depth: int) -> ClassSpec:
        spec = ClassSpec(
            name=self._field(tree, "name", str),
            source=self._source(tree),
            filename=self._field(tree, "filename", str),
            line=self._field(tree, "line", int),
        )
        self._remember(tree, spec)
        spec.globals = self._named(tree, "globals", depth)
        return spec

    def _module(self, tree: dict, depth: int) -> ModuleSpec:
        spec = ModuleSpec(
            cls=None, attrs={}, parameters={}, buffers={}, children={}, training=tree.get("training") is True
        )
        self._remember(tree, spec)
        spec.cls = self._value(tree.get("class"), depth)
        if not isinstance(spec.cls, (ClassSpec, Placeholder)):
            raise self._fail("a module's class must be a class")
        spec.attrs = self._named(tree, "attrs", depth)
        for name, kind in (("parameters", torch.Tensor), ("buffers", torch.Tensor), ("children", ModuleSpec)):
            group = tree.get(name)
            if not isinstance(group, dict):
                raise self._fail(f"a module's {name} must be a map")
            decoded = {}
            for key, item in group.items():
                if not _module_name(key):
                    raise self._fail(f"bad name in a module's {name}")
                value = None if item is None else self._value(item, depth)
                if value is not None and not isinstance(value, kind):
                    raise self._fail(f"a module's {name} must be {kind.__name__} values")
                decoded[key] = value
            setattr(spec, name, decoded)
        return spec

    def _output(self, tree: dict, depth: int) -> Any:
        path = self._field(tree, "class", str)
        module_name, _, name = path.rpartition(".")
        fields = self._dict(self._field(tree, "v", dict), depth)
        if not all(isinstance(key, str) and _output_field(value) for key, value in fields.items()):
            raise self._fail("a model output's fields must be tensors or tuples of tensors")
        module = sys.modules.get(module_name) if module_name.startswith(MODEL_OUTPUTS) else None
        cls = getattr(module, name, None) if module is not None and name.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, dict) and dataclasses.is_dataclass(cls)):
            return fields
        known = {field.name for field in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in fields.items() if key in known})
        except (TypeError, ValueError) as error:
            raise self._fail(f"bad model output: {error}") from None

    def _cache(self, tree: dict, depth: int) -> Any:
        from ..engine.cache import Cache, CacheView, Entry

        root = self._field(tree, "root", str)
        cache = Cache({}, None)
        for path, items in self._field(tree, "entries", dict).items():
            if not isinstance(path, str) or not isinstance(items, list):
                raise self._fail("bad cache entries")
            entries = []
            for item in items:
                if not isinstance(item, dict):
                    raise self._fail("bad cache entry")
                entry = Entry()
                entry.inputs = self._value(item.get("inputs"), depth)
                entry.output = self._value(item.get("output"), depth)
                entries.append(entry)
            cache.entries[path] = entries
        return CacheView(cache, root)

    _HANDLERS: dict[str, Callable[..., Any]] = {
        "int": _int,
        "float": _float,
        "tuple": _tuple,
        "size": _size,
        "dict": _dict,
        "set": _set,
        "frozenset": _set,
        "complex": _complex,
        "slice": _slice,
        "ellipsis": _ellipsis,
        "dtype": _dtype,
        "device": _device,
        "tensor": _tensor,
        "ndarray": _ndarray,
        "ref": _ref,
        "model": _placeholder,
        "envoy": _placeholder,
        "tracer": _placeholder,
        "import": _placeholder,
        "attr": _placeholder,
        "function": _function,
        "class": _class,
        "module": _module,
        "output": _output,
        "cache": _cache,
    }
