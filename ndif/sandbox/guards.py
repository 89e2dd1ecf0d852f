"""What a sandboxed body can reach: guarded attribute access, writes, imports, builtins.

RestrictedPython (`ndif.sandbox.policy`) turns every ``a.b`` into
``_getattr_(a, "b")``, every ``a.b = c`` / ``a[k] = c`` into a write through
``_write_(a)``, every ``a[k]`` into ``_getitem_(a, k)`` and every loop into
``_getiter_(...)``. This module implements those guards:

* Attribute reads are decided per type (cached): plain data, tensors (minus the
  storage-level escape hatches), the model's envoys (values, submodules and
  parameters only; never the module's methods such as ``register_forward_hook``),
  the tracer (its trace API), the allowed libraries (through `Library` proxies that
  leave out loaders, global settings and C extension doors) and the user's own
  classes and modules. Anything else is refused with a message naming the type.
* Writes go to the user's own objects only: containers, tensors (in place; the
  model's weights are protected by `ndif.sandbox.limits.SandboxMode`), their own
  class instances and modules, and the ``.output``/``.input``/``.inputs`` of
  envoys and ``tracer.result``.
* Imports: ``torch``, ``math``, ``numpy``, ``einops`` and ``ndif`` (for
  ``ndif.save``), each as a `Library` proxy.
* Builtins: a safe set; ``getattr``/``setattr``/``hasattr`` are the guarded ones,
  ``type``, ``eval``, ``exec``, ``open``, ``vars``, ``globals`` and the like are absent.
"""

from __future__ import annotations

import builtins
import io
import math
import operator
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from ..engine.barrier import Barrier
from ..engine.cache import CacheView, Entry
from ..engine.context import GUARD
from ..engine.iteration import Steps, StepSelector
from ..envoy import Envoy
from ..tracer import Trace
from ..tracing.errors import NDIFError

_MISSING = object()


class SandboxViolation(NDIFError, PermissionError):
    """The body tried something a remote trace does not allow."""


# -- libraries -----------------------------------------------------------------------------


class _StandIn(type):
    """Metaclass of a class's stand-in: ``isinstance``/``issubclass`` work, calling it does not."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._real)

    def __subclasscheck__(cls, other: type) -> bool:
        return isinstance(other, type) and issubclass(other, cls._real)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise SandboxViolation(f"{cls._shown}(...) is not available in a remote trace: {cls._why}")

    def __getattr__(cls, name: str) -> Any:
        raise SandboxViolation(
            f"{cls._shown}.{name} is not available in a remote trace: call methods on the objects themselves "
            f"(x.{name}(...))"
        )


def stand_in(real: type, shown: str, why: str) -> type:
    """A class usable in ``isinstance`` checks but not to construct objects."""
    return _StandIn(real.__name__, (), {"_real": real, "_shown": shown, "_why": why})


class Library:
    """An allowed library module as a sandboxed body sees it.

    ``allow`` (when given) lists the attributes that may be read; otherwise every
    public attribute but those in ``deny`` (and, with ``deny_setters``, every
    ``set_*`` function and ``*Storage`` class). ``replace`` swaps an attribute for a
    safer stand-in; submodules come back as proxies when listed in ``submodules``.
    """

    __slots__ = ("_name", "_module", "_allow", "_deny", "_submodules", "_replace", "_deny_setters")

    def __init__(
        self,
        name: str,
        module: types.ModuleType,
        allow: frozenset[str] | None = None,
        deny: frozenset[str] = frozenset(),
        submodules: dict[str, Library] | None = None,
        replace: dict[str, Any] | None = None,
        deny_setters: bool = False,
    ) -> None:
        self._name = name
        self._module = module
        self._allow = allow
        self._deny = deny
        self._submodules = submodules or {}
        self._replace = replace or {}
        self._deny_setters = deny_setters

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    def _denied(self, name: str) -> bool:
        if name in self._deny or (self._allow is not None and name not in self._allow):
            return True
        return self._deny_setters and (name.startswith("set_") or name.endswith("Storage"))

    def get(self, name: str) -> Any:
        if name.startswith("_"):
            raise SandboxViolation(f"{self._name}.{name} is not available in a remote trace")
        if name in self._submodules:
            return self._submodules[name]
        if name in self._replace:
            return self._replace[name]
        if self._denied(name):
            raise SandboxViolation(
                f"{self._name}.{name} is not available in a remote trace "
                f"({_DENY_REASONS.get(name, 'it is outside what trace bodies may use')})"
            )
        try:
            value = getattr(self._module, name)
        except AttributeError:
            raise AttributeError(f"{self._name} has no attribute {name!r}") from None
        if isinstance(value, types.ModuleType):
            raise SandboxViolation(f"{self._name}.{name} is not available in a remote trace")
        return value

    def __repr__(self) -> str:
        return f"<library {self._name} (sandboxed)>"


def _numpy_copy(function: Callable[..., Any]) -> Callable[..., Any]:
    """``np.array``/``np.asarray`` that never share memory with a tensor."""

    def copying(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().clone()
        kwargs.pop("copy", None)
        return np.array(value, *args, **kwargs)

    copying.__name__ = function.__name__
    return copying


_DENY_REASONS = {
    "load": "it unpickles data",
    "save": "it writes files",
    "manual_seed": "it changes the process-wide random state; pass generator=torch.Generator().manual_seed(n)",
    "seed": "it changes the process-wide random state",
    "set_grad_enabled": "it changes thread-wide state; use `with torch.no_grad():`",
    "ops": "it reaches operators outside the public API",
    "classes": "it reaches C++ classes",
    "as_strided": "it can read memory outside a tensor's view",
    "frombuffer": "it reads raw memory",
    "empty": "uninitialized memory may hold another job's data; use torch.zeros",
    "empty_like": "uninitialized memory may hold another job's data; use torch.zeros_like",
    "default_generator": "it is the process-wide random state; use torch.Generator()",
    "from_dlpack": "it reaches raw memory",
}

_TORCH_DENY = frozenset(
    """
    load save from_file frombuffer as_strided as_strided_ as_strided_scatter asarray set_ ops
    empty empty_like empty_strided empty_permuted default_generator from_dlpack to_dlpack
    classes library hub jit compile utils distributed multiprocessing cuda mps xpu backends fx
    export package profiler onnx quantization ao testing overrides random storage _C
    set_default_dtype set_default_device set_default_tensor_type set_num_threads
    set_num_interop_threads manual_seed seed initial_seed set_rng_state get_rng_state
    use_deterministic_algorithms set_deterministic_debug_mode set_printoptions set_flush_denormal
    set_anomaly_enabled set_grad_enabled set_warn_always set_float32_matmul_precision inference_mode
    UntypedStorage TypedStorage ByteStorage FloatStorage DoubleStorage HalfStorage LongStorage
    IntStorage ShortStorage CharStorage BoolStorage BFloat16Storage ComplexFloatStorage
    ComplexDoubleStorage get_default_device set_autocast_enabled set_autocast_dtype autocast
    compiler cpu xpu mtia accelerator
""".split()
)

_NUMPY_ALLOW = frozenset(
    """
    array asarray zeros ones full zeros_like ones_like full_like arange linspace eye identity
    float16 float32 float64 int8 int16 int32 int64 uint8 bool_ complex64 complex128 dtype abs
    absolute sqrt exp log log2 log10 sin cos tanh maximum minimum clip round floor ceil sign sum
    mean std var max min argmax argmin argsort sort cumsum prod median percentile quantile dot
    matmul outer einsum tensordot stack concatenate vstack hstack split where isclose allclose
    array_equal isnan isinf nan inf pi e reshape transpose squeeze expand_dims unique flip linalg
    ndarray newaxis
""".split()
)

_NDIF_ALLOW = frozenset({"save"})

#: The building blocks a remote body may use: tensor code only (file I/O and functions that
#: run traces of their own stay out).
_INTERP_ALLOW = frozenset(
    """
    SAE LinearProbe SteeringVector Recipe Steer EditFeatures ReadProbe ReadFeatures ReadNorm LogitLens
    add_to_stream read_stream write_stream decoder_layers logit_lens principal_direction
""".split()
)


def _libraries() -> dict[str, Library]:
    import ndif
    import ndif.interp

    interp = Library("ndif.interp", ndif.interp, allow=_INTERP_ALLOW)
    nn_functional = Library("torch.nn.functional", torch.nn.functional)
    nn_init = Library("torch.nn.init", torch.nn.init)
    nn = Library(
        "torch.nn",
        torch.nn,
        deny=frozenset({"utils", "modules", "parallel", "parameter", "backends", "attention", "intrinsic", "qat"}),
        submodules={"functional": nn_functional, "init": nn_init},
    )
    autograd = Library("torch.autograd", torch.autograd, allow=frozenset({"grad"}))
    torch_library = Library(
        "torch",
        torch,
        deny=_TORCH_DENY,
        deny_setters=True,
        replace={
            "Tensor": stand_in(
                torch.Tensor, "torch.Tensor", "it returns uninitialized memory; use torch.tensor or torch.zeros"
            ),
        },
        submodules={
            "nn": nn,
            "linalg": Library("torch.linalg", torch.linalg),
            "fft": Library("torch.fft", torch.fft),
            "special": Library("torch.special", torch.special),
            "autograd": autograd,
            "distributions": Library("torch.distributions", torch.distributions, deny_setters=True),
        },
    )
    numpy_library = Library(
        "numpy",
        np,
        allow=_NUMPY_ALLOW,
        replace={
            "ndarray": stand_in(np.ndarray, "numpy.ndarray", "it returns uninitialized memory; use numpy.zeros"),
            "array": _numpy_copy(np.array),
            "asarray": _numpy_copy(np.asarray),
        },
        submodules={"linalg": Library("numpy.linalg", np.linalg, allow=frozenset({"norm", "svd", "eigh", "inv"}))},
    )
    found = {
        "torch": torch_library,
        "torch.nn": nn,
        "torch.nn.functional": nn_functional,
        "torch.nn.init": nn_init,
        "torch.linalg": torch_library.get("linalg"),
        "math": Library("math", math),
        "numpy": numpy_library,
        "ndif": Library("ndif", ndif, allow=_NDIF_ALLOW, submodules={"interp": interp}),
        "ndif.interp": interp,
    }
    try:
        import einops

        found["einops"] = Library("einops", einops, deny=frozenset({"layers", "array_api"}))
    except ImportError:  # einops is optional
        pass
    return found


LIBRARIES: dict[str, Library] = {}


def libraries() -> dict[str, Library]:
    if not LIBRARIES:
        LIBRARIES.update(_libraries())
    return LIBRARIES


def resolve_library_path(path: str) -> Any:
    """A dotted path such as ``torch.nn.functional.gelu``, resolved through the proxies."""
    parts = path.split(".")
    table = libraries()
    for size in range(len(parts), 0, -1):
        head = ".".join(parts[:size])
        if head in table:
            value: Any = table[head]
            for part in parts[size:]:
                value = value.get(part) if isinstance(value, Library) else guarded_getattr(value, part)
            return value
    raise SandboxViolation(f"{path} is not available in a remote trace")


def guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    table = libraries()
    if level != 0 or name not in table:
        allowed = ", ".join(sorted({key.split(".")[0] for key in table}))
        raise SandboxViolation(f"import {name} is not allowed in a remote trace (allowed: {allowed})")
    if fromlist:
        return table[name]
    return table[name.split(".")[0]]


# -- attribute reads ---------------------------------------------------------------------------

_TENSOR_DENY = frozenset(
    """
    new new_empty new_empty_strided
    as_strided as_strided_ as_strided_scatter set_ storage untyped_storage data_ptr storage_offset
    grad_fn register_post_accumulate_grad_hook share_memory_ is_shared from_file resize_ resize_as_
    untyped_storage_ pin_memory record_stream module_load
""".split()
)
_NDARRAY_DENY = frozenset({"base", "ctypes", "data", "tofile", "dump", "dumps", "setflags", "flags", "view", "strides"})
_STR_DENY = frozenset({"format", "format_map"})
_TRACER_ALLOW = frozenset({"invoke", "iter", "all", "next", "barrier", "stop", "result", "cache"})
_ENVOY_API = frozenset({"output", "input", "inputs", "skip", "next", "path", "modules", "named_modules", "get"})
_ROOT_API = frozenset({"trace", "generate", "scan", "session", "config", "tokenizer"})
_VALUE_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)

#: Types whose attributes are all readable (minus ``_`` names and frame/code attributes).
_OPEN_TYPES: tuple[type, ...] = (
    int,
    float,
    complex,
    bool,
    bytes,
    type(None),
    list,
    tuple,
    dict,
    set,
    frozenset,
    range,
    slice,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.Generator,
    np.generic,
    np.dtype,
    CacheView,
    Entry,
    Steps,
    StepSelector,
    Barrier,
    BaseException,
    torch.nn.Module,
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodType,
    types.MethodWrapperType,
    types.GeneratorType,
    torch.distributions.Distribution,
)

#: Classes and functions created by sandboxed code (their instances are the job's own).
SANDBOX_FILE_PREFIX = "<ndif-job "


def is_sandbox_code(function: Any) -> bool:
    code = getattr(function, "__code__", None)
    return code is not None and code.co_filename.startswith(SANDBOX_FILE_PREFIX)


def is_sandbox_class(cls: type) -> bool:
    return any(is_sandbox_code(member) for member in vars(cls).values()) or getattr(cls, "__module__", "") == (
        "ndif_sandbox"
    )


class ConfigView:
    """A read-only copy of a model's config: its values, none of its methods."""

    def __init__(self, config: Any) -> None:
        values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the model's config has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise SandboxViolation("the model's config is read-only in a remote trace")

    def to_dict(self) -> dict:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"ConfigView({self._values})"


def _envoy_attribute(envoy: Envoy, name: str) -> Any:
    if name in _ENVOY_API:
        return getattr(envoy, name)
    child = envoy.__dict__.get(name)
    if isinstance(child, Envoy):
        return child
    is_root = envoy.path == "model" or "_edits" in envoy.__dict__
    if is_root and name in _ROOT_API:
        if name == "config":
            return ConfigView(envoy._module.config)
        if name == "tokenizer":
            raise SandboxViolation("the tokenizer is not available inside a remote trace; tokenize before the trace")
        return getattr(envoy, name)
    module = envoy._module
    value = module._parameters.get(name, _MISSING)
    if value is _MISSING:
        value = module._buffers.get(name, _MISSING)
    if value is not _MISSING:
        return value
    if name in module._modules:
        return getattr(envoy, name)
    value = getattr(module, name, _MISSING)
    if value is _MISSING:
        raise AttributeError(envoy._unknown(name))
    if isinstance(value, _VALUE_TYPES) or (
        isinstance(value, tuple) and all(isinstance(v, _VALUE_TYPES) for v in value)
    ):
        return value
    raise SandboxViolation(
        f"{envoy.path}.{name} is not available in a remote trace: a trace may read a module's values "
        "(.output/.input/.inputs), its submodules, parameters, buffers and plain attributes, and call it"
    )


def _rule_for(kind: type) -> Callable[[Any, str, tuple], Any]:
    if issubclass(kind, torch.Tensor):
        return _tensor_rule
    if issubclass(kind, Envoy):
        return _envoy_rule
    if issubclass(kind, Trace):
        return _tracer_rule
    if issubclass(kind, Library):
        return _library_rule
    if issubclass(kind, str):
        return _str_rule
    if issubclass(kind, np.ndarray):
        return _ndarray_rule
    if issubclass(kind, ConfigView):
        return _plain_rule
    if issubclass(kind, type):
        return _class_rule
    if issubclass(kind, BaseException):
        return _exception_rule
    if issubclass(kind, _OPEN_TYPES):
        return _plain_rule
    if issubclass(kind, types.FunctionType):
        return _plain_rule
    if kind.__module__.startswith("transformers.") and issubclass(kind, dict):  # model outputs
        return _plain_rule
    if kind.__module__ == "torch.return_types":
        return _plain_rule
    if is_sandbox_class(kind):
        return _plain_rule
    return _deny_rule


def _plain_rule(obj: Any, name: str, default: tuple) -> Any:
    return getattr(obj, name, *default)


def _tensor_rule(obj: Any, name: str, default: tuple) -> Any:
    if name in _TENSOR_DENY:
        raise SandboxViolation(f"tensor.{name} is not available in a remote trace (it reaches storage or the graph)")
    if name == "numpy":  # a copy: an array sharing a weight's memory would be a way to write it
        return lambda *args, **kwargs: obj.detach().cpu().clone().numpy(*args, **kwargs)
    return getattr(obj, name, *default)


def _exception_rule(obj: Any, name: str, default: tuple) -> Any:
    if name == "obj":  # AttributeError.obj: the object the failed lookup was made on
        raise SandboxViolation("exception.obj is not available in a remote trace")
    return getattr(obj, name, *default)


def _class_rule(cls: Any, name: str, default: tuple) -> Any:
    """Attributes of a class: no way around what its instances deny, no shared state to edit."""
    if is_sandbox_class(cls) or isinstance(cls, _StandIn):
        return getattr(cls, name, *default)
    if issubclass(cls, (Envoy, Trace, Library, ConfigView, _Writer, PrintCollector, _StandIn)):
        raise SandboxViolation(f"{cls.__name__}.{name} is not available in a remote trace")
    denied = (
        (issubclass(cls, torch.Tensor) and name in _TENSOR_DENY)
        or (issubclass(cls, str) and name in _STR_DENY)
        or (issubclass(cls, np.ndarray) and name in _NDARRAY_DENY)
        or "Storage" in cls.__name__
        or name.startswith("set_")
    )
    if denied:
        raise SandboxViolation(f"{cls.__name__}.{name} is not available in a remote trace")
    value = getattr(cls, name, *default)
    if isinstance(value, (dict, list, set)):
        return type(value)(value)  # a class's shared container: hand back a copy
    return value


def _envoy_rule(obj: Any, name: str, default: tuple) -> Any:
    try:
        return _envoy_attribute(obj, name)
    except AttributeError:
        if default:
            return default[0]
        raise


def _tracer_rule(obj: Any, name: str, default: tuple) -> Any:
    if name not in _TRACER_ALLOW:
        raise SandboxViolation(f"tracer.{name} is not available in a remote trace")
    return getattr(obj, name)


def _library_rule(obj: Any, name: str, default: tuple) -> Any:
    return obj.get(name)


def _str_rule(obj: Any, name: str, default: tuple) -> Any:
    if name in _STR_DENY:
        raise SandboxViolation("str.format is not available in a remote trace; use an f-string")
    return getattr(obj, name, *default)


def _ndarray_rule(obj: Any, name: str, default: tuple) -> Any:
    if name in _NDARRAY_DENY:
        raise SandboxViolation(f"ndarray.{name} is not available in a remote trace")
    return getattr(obj, name, *default)


def _deny_rule(obj: Any, name: str, default: tuple) -> Any:
    kind = type(obj)
    raise SandboxViolation(
        f"reading .{name} of a {kind.__module__}.{kind.__qualname__} is not available in a remote trace"
    )


_RULES: dict[type, Callable[[Any, str, tuple], Any]] = {}


def guarded_getattr(obj: Any, name: str, *default: Any) -> Any:
    """``_getattr_``: the attribute read every ``a.b`` in a sandboxed body goes through."""
    if type(name) is not str:
        raise TypeError("attribute name must be a string")
    if name.startswith("_") or name in INSPECT_ATTRIBUTES:
        raise SandboxViolation(f"the attribute {name!r} is not available in a remote trace")
    kind = type(obj)
    rule = _RULES.get(kind)
    if rule is None:
        rule = _RULES[kind] = _rule_for(kind)
    return rule(obj, name, default)


def guarded_hasattr(obj: Any, name: str) -> bool:
    try:
        guarded_getattr(obj, name)
    except (AttributeError, SandboxViolation):
        return False
    return True


# -- writes ------------------------------------------------------------------------------------


class _Writer:
    """What ``_write_`` hands back for an object that allows some writes only."""

    __slots__ = ("_target", "_names", "_items", "_what")

    def __init__(self, target: Any, names: frozenset[str], items: bool, what: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_items", items)
        object.__setattr__(self, "_what", what)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._names:
            raise SandboxViolation(f"cannot set .{name} of {self._what} in a remote trace")
        target = self._target
        if isinstance(target, torch.Tensor):
            job = GUARD.get()
            if job is not None and job.mode.is_protected(target):
                raise SandboxViolation(f"cannot set .{name} of the model's weights in a remote trace")
        setattr(target, name, value)

    def __delattr__(self, name: str) -> None:
        raise SandboxViolation(f"cannot delete .{name} of {self._what} in a remote trace")

    def __getattr__(self, name: str) -> Any:  # augmented assignment reads before it writes
        if name not in self._names:
            raise SandboxViolation(f"cannot set .{name} of {self._what} in a remote trace")
        return getattr(self._target, name)

    def __getitem__(self, key: Any) -> Any:
        return guarded_getitem(self._target, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self._items:
            raise SandboxViolation(f"cannot assign items of {self._what} in a remote trace")
        self._target[key] = value

    def __delitem__(self, key: Any) -> None:
        if not self._items:
            raise SandboxViolation(f"cannot delete items of {self._what} in a remote trace")
        del self._target[key]


_OWN_CONTAINERS = (list, dict, set, bytearray)
_ENVOY_WRITES = frozenset({"output", "input", "inputs"})


def guarded_write(obj: Any) -> Any:
    """``_write_``: the object an assignment to ``obj.x`` or ``obj[k]`` goes to."""
    kind = type(obj)
    if kind in _OWN_CONTAINERS:
        return obj
    if isinstance(obj, torch.Tensor):
        return _Writer(obj, frozenset({"requires_grad"}), True, "a tensor")
    if isinstance(obj, Envoy):
        return _Writer(obj, _ENVOY_WRITES, False, obj.path)
    if isinstance(obj, Trace):
        return _Writer(obj, frozenset({"result"}), False, "the tracer")
    if isinstance(obj, np.ndarray):
        return _Writer(obj, frozenset(), True, "an array")
    if isinstance(obj, torch.nn.Module) or is_sandbox_class(kind):
        return obj
    if kind.__module__.startswith("transformers.") and isinstance(obj, dict):
        return obj
    if isinstance(obj, _StandIn):
        raise SandboxViolation(f"cannot modify {obj._shown} in a remote trace")
    raise SandboxViolation(f"cannot modify a {kind.__module__}.{kind.__qualname__} in a remote trace")


def guarded_setattr(obj: Any, name: str, value: Any) -> None:
    if type(name) is not str or name.startswith("_"):
        raise SandboxViolation(f"the attribute {name!r} is not available in a remote trace")
    setattr(guarded_write(obj), name, value)


def guarded_delattr(obj: Any, name: str) -> None:
    if type(name) is not str or name.startswith("_"):
        raise SandboxViolation(f"the attribute {name!r} is not available in a remote trace")
    delattr(guarded_write(obj), name)


# -- items, iteration, operators --------------------------------------------------------------


def guarded_getitem(obj: Any, key: Any) -> Any:
    """``_getitem_``: ``obj[key]``, on values whose items are safe to read."""
    kind = type(obj)
    rule = _RULES.get(kind)
    if rule is None:
        rule = _RULES[kind] = _rule_for(kind)
    if rule is _deny_rule:
        raise SandboxViolation(f"indexing a {kind.__module__}.{kind.__qualname__} is not available in a remote trace")
    return obj[key]


def guarded_iter(obj: Any) -> Any:
    """``_getiter_``: iteration, over values whose items are safe to read."""
    kind = type(obj)
    if kind in (list, tuple, range, dict, set, frozenset, str, bytes):
        return iter(obj)
    rule = _RULES.get(kind)
    if rule is None:
        rule = _RULES[kind] = _rule_for(kind)
    if rule is _deny_rule:
        raise SandboxViolation(f"iterating a {kind.__module__}.{kind.__qualname__} is not available in a remote trace")
    return iter(obj)


_INPLACE = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "@=": operator.imatmul,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "^=": operator.ixor,
    "|=": operator.ior,
}


MAX_SEQUENCE = 1 << 26
MAX_INT_BITS = 1 << 20
_BINARY = {"*": operator.mul, "**": operator.pow, "<<": operator.lshift}
_SEQUENCES = (str, bytes, bytearray, list, tuple)


def _check_growth(op: str, left: Any, right: Any) -> None:
    if op in ("*", "*="):
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and isinstance(count, int) and len(seq) * count > MAX_SEQUENCE:
                raise SandboxViolation(
                    f"repeating a {type(seq).__name__} {count} times is over the limit of {MAX_SEQUENCE} items "
                    "in a remote trace"
                )
    elif isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool):
        if op in ("**", "**="):
            bits = abs(right) * max(abs(left), 1).bit_length() if abs(left) > 1 else 0
        elif op in ("<<", "<<="):
            bits = left.bit_length() + right
        else:
            return
        if bits > MAX_INT_BITS:
            raise SandboxViolation(
                f"an integer of about {bits} bits is over the limit of {MAX_INT_BITS} in a remote trace"
            )


def binop(op: str, left: Any, right: Any) -> Any:
    """``_binop_``: ``left * right``, ``left ** right``, ``left << right``, bounded in size."""
    _check_growth(op, left, right)
    return _BINARY[op](left, right)


def inplace_var(op: str, target: Any, value: Any) -> Any:
    """``_inplacevar_``: ``name op= value``."""
    _check_growth(op, target, value)
    return _INPLACE[op](target, value)


def apply_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``_apply_``: calls with ``*args``/``**kwargs``."""
    return function(*args, **kwargs)


class PrintCollector:
    """``_print_``: where a sandboxed ``print`` goes (the job's log, up to ``limit`` characters)."""

    def __init__(self, sink: list[str], limit: int = 1 << 20) -> None:
        self.sink = sink
        self.left = limit

    def __call__(self, _getattr: Any = None) -> PrintCollector:
        return self

    def _call_print(self, *args: Any, **kwargs: Any) -> None:
        if self.left <= 0:
            return
        kwargs.pop("file", None)
        kwargs.pop("flush", None)
        buffer = io.StringIO()
        print(*args, **kwargs, file=buffer)
        line = buffer.getvalue().rstrip("\n")
        if len(line) >= self.left:
            line = line[: self.left] + "\n[ndif: the job's output was cut here, at its size limit]"
        self.left -= len(line)
        self.sink.append(line)

    def __call_print__(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - RestrictedPython name
        self._call_print(*args, **kwargs)


# -- builtins ------------------------------------------------------------------------------------

_SAFE_BUILTIN_NAMES = """
    None True False abs all any bool bytes callable chr complex dict divmod enumerate filter float
    format frozenset hash hex int isinstance issubclass len list map max min next oct ord pow
    range repr reversed round set slice sorted str sum tuple zip super object property staticmethod
    classmethod id bin ascii ArithmeticError AssertionError AttributeError BaseException Exception
    IndexError KeyError LookupError NameError NotImplementedError OverflowError RuntimeError
    StopIteration TypeError ValueError ZeroDivisionError RecursionError MemoryError
""".split()


MAX_RANGE = 10**7


def guarded_range(*args: int) -> range:
    """``range``, bounded: a huge range is a loop in C that no time limit can interrupt."""
    span = range(*args)
    if len(span) > MAX_RANGE:
        raise SandboxViolation(f"range of {len(span)} items is over the limit of {MAX_RANGE} in a remote trace")
    return span


def guarded_iter_builtin(obj: Any) -> Any:
    """``iter(x)`` (the one-argument form; ``iter(f, sentinel)`` could loop forever in C)."""
    return guarded_iter(obj)


def safe_builtins() -> dict[str, Any]:
    table = {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
    table.update(
        {
            "iter": guarded_iter_builtin,
            "range": guarded_range,
            "getattr": guarded_getattr,
            "hasattr": guarded_hasattr,
            "setattr": guarded_setattr,
            "delattr": guarded_delattr,
            "__import__": guarded_import,
            "__build_class__": builtins.__build_class__,
            "__name__": "ndif_sandbox",
        }
    )
    return table


def guard_names(logs: list[str], tick: Callable[[], None]) -> dict[str, Any]:
    """The names RestrictedPython's output calls, bound for one job."""
    return {
        "_getattr_": guarded_getattr,
        "_getitem_": guarded_getitem,
        "_write_": guarded_write,
        "_getiter_": guarded_iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_inplacevar_": inplace_var,
        "_binop_": binop,
        "_apply_": apply_call,
        "_print_": PrintCollector(logs),
        "_tick_": tick,
        "__metaclass__": type,
        "__name__": "ndif_sandbox",
        "__builtins__": safe_builtins(),
    }
