"""The wire codec on its own: values, messages, limits, malformed input, fuzzing.

Values go through the whole message codec (`Encoder` -> `Request` -> bytes ->
`decode_request`) and must come back exactly: tensors bit for bit (the raw bytes of
every element, NaN payloads included), containers of the same type, floats with
their sign. Malformed or hostile input must be refused with `WireError` — never any
other exception — and decoding must never compile, execute or unpickle anything
(`builtins.exec`/`eval`/`compile`, `pickle.loads`/`load` and `torch.load` are patched
to fail the test while a message is decoded). The fuzz tests use hypothesis.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import math
import pickle
import struct
import threading
import tracemalloc
import types
import warnings
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from ndif.engine.cache import Cache, CacheView, Entry
from ndif.wire import (
    PROTOCOL_VERSION,
    ClientInfo,
    Decoder,
    Encoder,
    ErrorInfo,
    Frame,
    Limits,
    Request,
    Result,
    SizeLimits,
    Source,
    Timings,
    WireError,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)
from ndif.wire.codec import MAGIC
from ndif.wire.values import TENSOR_DTYPES, ClassSpec, FunctionSpec, ModuleSpec, Placeholder

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# -- helpers -----------------------------------------------------------------------------------


class CodeExecuted(BaseException):
    """Raised by the patched exec/eval/compile/unpickle: not an Exception, so nothing swallows it."""


@contextlib.contextmanager
def no_code_execution() -> Iterator[list[str]]:
    """Patch every way to run code or unpickle; yields the list of attempted calls."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise CodeExecuted(f"{name} was called while decoding")

        return refused

    targets = [
        (builtins, "exec"),
        (builtins, "eval"),
        (builtins, "compile"),
        (pickle, "loads"),
        (pickle, "load"),
        (torch, "load"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    for owner, name in targets:
        setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
    try:
        yield calls
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def assert_data_only(value: Any, seen: set[int] | None = None) -> None:
    """A decoded value holds data and specs: no function, class, code object or live module."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    live = (types.FunctionType, types.CodeType, types.MethodType, types.BuiltinFunctionType, type, torch.nn.Module)
    assert not isinstance(value, live), f"decoding produced a live {type(value).__name__}: {value!r}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert_data_only(key, seen)
            assert_data_only(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            assert_data_only(item, seen)
    elif isinstance(value, FunctionSpec):
        assert_data_only(value.globals, seen)
        assert_data_only(value.closure, seen)
    elif isinstance(value, ClassSpec):
        assert_data_only(value.globals, seen)
    elif isinstance(value, ModuleSpec):
        for part in (value.cls, value.attrs, value.parameters, value.buffers, value.children):
            assert_data_only(part, seen)
    elif isinstance(value, CacheView):
        for entries in value._cache.entries.values():
            for entry in entries:
                assert_data_only(entry.inputs, seen)
                assert_data_only(entry.output, seen)


def decode_only_wire_errors(decode: Any, data: Any) -> Any:
    """Decode ``data``: it either decodes to data and specs, or raises WireError. Nothing runs."""
    with no_code_execution() as calls:
        try:
            decoded = decode(data)
        except WireError:
            decoded = None
    assert calls == [], f"decoding called {calls}"
    if isinstance(decoded, Request):
        assert_data_only([decoded.inputs, decoded.kwargs, decoded.captured])
    elif isinstance(decoded, Result):
        assert_data_only(decoded.saved)
    else:
        assert_data_only(decoded)
    return decoded


def make_request(**fields: Any) -> Request:
    fields.setdefault("client", ClientInfo(library="ndif", version="0", python="3.11.7"))
    fields.setdefault("model", "tiny")
    fields.setdefault("kind", "trace")
    fields.setdefault("body", Source(text="h = model.output.save()\n", filename="user.py", first_line=3))
    return Request(**fields)


def through_the_wire(value: Any, allow_code: bool = True) -> Any:
    """``value`` encoded, put in a request, sent as bytes and decoded."""
    tree = Encoder(allow_code=allow_code).encode(value, "variable 'value'")
    data = encode_request(make_request(captured={"value": tree}))
    with no_code_execution() as calls:
        decoded = decode_request(data).captured["value"]
    assert calls == []
    return decoded


def through_a_result(value: Any) -> Any:
    tree = Encoder(allow_code=False).encode(value, "the saved value 'value'")
    data = encode_result(Result(saved={"value": tree}))
    return decode_result(data).saved["value"]


def raw_message(message: msgspec.Struct) -> Any:
    """The plain MessagePack tree of a message (what the wire holds)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(message))


def pack(tree: Any) -> bytes:
    """A MessagePack tree framed as a message (magic + zstd)."""
    return MAGIC + zstandard.ZstdCompressor().compress(msgspec.msgpack.encode(tree))


def pack_raw(raw: bytes) -> bytes:
    return MAGIC + zstandard.ZstdCompressor().compress(raw)


def tensor_bits(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def assert_exact(expected: Any, actual: Any, where: str = "value") -> None:
    """``actual`` is ``expected``, exactly: same types, same bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: got a {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if expected.device.type == "meta":
            assert actual.device.type == "meta", f"{where}: a meta tensor came back on {actual.device}"
        else:
            assert tensor_bits(actual) == tensor_bits(expected), f"{where}: the bytes differ"
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: got a {type(actual).__name__}"
        assert actual.dtype == expected.dtype.newbyteorder("<") or actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert np.array_equal(actual, expected, equal_nan=expected.dtype.kind in "fc"), f"{where}: values differ"
    elif isinstance(expected, float):
        assert type(actual) is float, f"{where}: got a {type(actual).__name__}"
        assert float_bits(actual) == float_bits(expected) or (math.isnan(actual) and math.isnan(expected)), where
    elif isinstance(expected, complex):
        assert type(actual) is complex, f"{where}: got a {type(actual).__name__}"
        assert_exact(expected.real, actual.real, f"{where}.real")
        assert_exact(expected.imag, actual.imag, f"{where}.imag")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_exact(a, b, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_exact(expected[key], actual[key], f"{where}[{key!r}]")
    else:
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns of ``dtype`` (NaNs, infinities, subnormals included); bools are 0/1."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape).clone()


# -- tensors -----------------------------------------------------------------------------------

DTYPE_NAMES = sorted(TENSOR_DTYPES)


def test_the_documented_dtypes_all_travel() -> None:
    documented = {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
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
    }
    assert documented <= set(TENSOR_DTYPES)


@pytest.mark.parametrize("name", DTYPE_NAMES)
@pytest.mark.parametrize("shape", [(2, 3, 5), (), (0,), (3, 0, 2), (1, 1, 1, 7)], ids=str)
def test_tensor_of_every_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    tensor = random_tensor(TENSOR_DTYPES[name], shape, seed=len(shape))
    decoded = through_the_wire(tensor)
    assert_exact(tensor, decoded)
    assert not decoded.requires_grad
    assert decoded.is_contiguous()
    assert_exact(tensor, through_a_result(tensor))


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_non_contiguous_views(name: str) -> None:
    base = random_tensor(TENSOR_DTYPES[name], (4, 6, 3), seed=7)
    views = {
        "transposed": base.transpose(0, 2),
        "strided": base[::2, 1::3],
        "offset": base[1:, 2:5, 1],
        "expanded": base[:, :1, :].expand(4, 5, 3),
        "permuted": base.permute(2, 0, 1),
        "diagonal": base[:, :3, :].diagonal(dim1=0, dim2=1),
    }
    for label, view in views.items():
        assert not view.is_contiguous() or label == "offset"
        assert_exact(view, through_the_wire(view), label)


def test_tensor_data_is_raw_little_endian_bytes() -> None:
    tree = Encoder().encode(torch.tensor([1.0, -2.0], dtype=torch.float32), "x")
    assert tree["dtype"] == "float32" and tree["shape"] == [2]
    assert tree["data"] == struct.pack("<2f", 1.0, -2.0)
    tree = Encoder().encode(torch.tensor([[1, 258]], dtype=torch.int16), "x")
    assert tree["data"] == struct.pack("<2h", 1, 258) and tree["shape"] == [1, 2]


@pytest.mark.parametrize("name", ["float32", "float64", "float16", "bfloat16", "complex64"])
def test_requires_grad_leaves_come_back_as_leaves(name: str) -> None:
    leaf = random_tensor(TENSOR_DTYPES[name], (3, 2), seed=1).requires_grad_(True)
    decoded = through_the_wire(leaf)
    assert_exact(leaf, decoded)
    assert decoded.requires_grad and decoded.is_leaf and decoded.grad_fn is None
    non_leaf = leaf * 1
    decoded = through_the_wire(non_leaf)
    assert_exact(non_leaf, decoded)
    assert not decoded.requires_grad, "only leaves travel as requiring grad"


def test_a_parameter_travels_as_a_leaf_tensor() -> None:
    parameter = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    decoded = through_the_wire(parameter)
    assert_exact(parameter.data, decoded)
    assert decoded.requires_grad and decoded.is_leaf


def test_meta_tensors_travel_as_shape_and_dtype() -> None:
    meta = torch.empty(2, 7, dtype=torch.bfloat16, device="meta")
    tree = Encoder().encode(meta, "x")
    assert tree["data"] is None
    decoded = through_the_wire(meta)
    assert decoded.device.type == "meta" and decoded.shape == (2, 7) and decoded.dtype == torch.bfloat16


def test_the_same_tensor_twice_is_one_object() -> None:
    tensor = torch.arange(6.0).reshape(2, 3)
    decoded = through_the_wire({"a": tensor, "b": [tensor, (tensor,)]})
    assert decoded["a"] is decoded["b"][0] is decoded["b"][1][0]
    assert_exact(tensor, decoded["a"])


def test_a_conjugate_view_travels_resolved() -> None:
    """``z.conj()`` is a lazy view with the conjugate bit set; its values must travel."""
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    conjugate = z.conj()
    assert conjugate.is_conj()
    decoded = through_the_wire(conjugate)
    assert_exact(conjugate.resolve_conj(), decoded)
    assert torch.equal(decoded, torch.conj_physical(z))


def test_a_negative_view_travels_resolved() -> None:
    """``z.conj().imag`` is a real view with the negative bit set."""
    z = torch.randn(4, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    negated = z.conj().imag
    assert negated.is_neg()
    decoded = through_the_wire(negated)
    assert torch.equal(decoded, -z.imag)


def test_unsupported_tensors_are_refused_with_wire_errors() -> None:
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(WireError, match="dense"):
        Encoder().encode(sparse, "variable 'sparse'")
    with warnings.catch_warnings():  # quantized tensors are deprecated; they still must not travel
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(WireError, match="variable 'q'"):
        Encoder().encode(quantized, "variable 'q'")
    with pytest.raises(WireError, match="qint8"):
        Encoder().encode(torch.qint8, "variable 'dtype'")


# -- numpy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    ["bool", "int8", "uint8", ">i2", "<i4", "int64", "uint64", "float16", ">f4", "float64", "complex64", "complex128"],
)
def test_numpy_arrays(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (np.abs(rng.standard_normal((3, 4))) * 50).astype(dtype)
    for label, value in {
        "plain": array,
        "transposed": array.T,
        "strided": array[::2, ::3],
        "0-d": np.array(array[0, 0]),
        "empty": array[:0],
    }.items():
        decoded = through_the_wire(value)
        assert_exact(value, decoded, label)
        assert decoded.dtype.byteorder in "<|=", label


def test_numpy_arrays_that_cannot_travel_are_refused() -> None:
    for label, array in {
        "object": np.array([object()], dtype=object),
        "str": np.array(["a"]),
        "structured": np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
        "datetime": np.array(["2024-01-01"], dtype="datetime64[D]"),
    }.items():
        with pytest.raises(WireError, match="variable 'arr'"):
            Encoder().encode(array, "variable 'arr'")
        assert label


def test_numpy_scalars_travel_as_python_numbers() -> None:
    assert_exact(1.5, through_the_wire(np.float32(1.5)))
    assert_exact(7, through_the_wire(np.int64(7)))
    assert_exact(True, through_the_wire(np.bool_(True)))


# -- plain values ------------------------------------------------------------------------------

PLAIN_VALUES = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int64 max": 2**63 - 1,
    "int64 min": -(2**63),
    "uint64 max": 2**64 - 1,
    "beyond uint64": 2**64,
    "below int64": -(2**63) - 1,
    "huge": 10**1000,
    "huge negative": -(7**900),
    "float": 0.1,
    "negative zero": -0.0,
    "subnormal": 5e-324,
    "inf": float("inf"),
    "-inf": float("-inf"),
    "nan": float("nan"),
    "str": "héllo\x00 wörld ✓ 𝔘",
    "empty str": "",
    "bytes": bytes(range(256)),
    "empty bytes": b"",
    "list": [1, "a", None, [2.5, [b"x"]]],
    "empty list": [],
    "tuple": (1, (2, (3, ())), [4, (5,)]),
    "empty tuple": (),
    "dict": {"a": 1, "b": {"c": [2]}},
    "dict with any keys": {
        1: "int",
        (2, "t"): "tuple",
        None: "none",
        2.5: "float",
        b"k": "bytes",
        frozenset({1}): "fs",
    },
    "dict order": {"z": 1, "a": 2, "m": 3},
    "empty dict": {},
    "set": {1, 2, "three", (4, 5)},
    "empty set": set(),
    "frozenset": frozenset({1, frozenset({2})}),
    "complex": 1.5 - 2.25j,
    "complex specials": complex(float("inf"), float("-inf")),
    "slice": slice(1, None, -2),
    "slice of none": slice(None),
    "ellipsis": ...,
    "device cpu": torch.device("cpu"),
    "device cuda": torch.device("cuda", 1),
    "device meta": torch.device("meta"),
    "nested": {"layers": [(0, slice(2, 5)), (1, ...)], "dtypes": (torch.float16, torch.bfloat16), 3: {4: {5: 6}}},
}


@pytest.mark.parametrize("name", sorted(PLAIN_VALUES))
def test_plain_values(name: str) -> None:
    value = PLAIN_VALUES[name]
    assert_exact(value, through_the_wire(value))
    assert_exact(value, through_a_result(value))


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_as_a_value(name: str) -> None:
    assert through_the_wire(TENSOR_DTYPES[name]) is TENSOR_DTYPES[name]


def test_a_torch_size_travels_as_a_torch_size() -> None:
    value = through_the_wire(torch.Size([2, 3]))
    assert type(value) is torch.Size
    assert value == torch.Size([2, 3])


def test_a_list_containing_itself_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(WireError, match="contains itself"):
        Encoder().encode(loop, "variable 'loop'")


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (threading.Lock(), "lock"),
        ((i for i in range(2)), "generator"),
        (io.BytesIO(b""), "BytesIO"),
        (object(), "object"),
        (types, "module"),
        (print, "builtin"),
    ],
    ids=["lock", "generator", "bytesio", "object", "module", "builtin"],
)
def test_values_that_cannot_travel_name_the_variable_and_type(value: Any, type_name: str) -> None:
    with pytest.raises(WireError) as info:
        Encoder().encode({"k": [value]}, "variable 'thing'")
    message = str(info.value)
    assert "variable 'thing'" in message and type_name in message, message


# -- code --------------------------------------------------------------------------------------

OFFSET = 4


def user_function(x: torch.Tensor) -> torch.Tensor:
    return helper_function(x) + OFFSET


def helper_function(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2


def typed_function(x: Any, scale: float | None = None) -> Any:
    """A helper annotated with ``typing.Any``, as much user code is."""
    return x * (scale or OFFSET)


def recursive(n: int) -> int:
    return 1 if n <= 1 else n * recursive(n - 1)


def is_even(n: int) -> bool:
    return n == 0 or is_odd(n - 1)


def is_odd(n: int) -> bool:
    return n != 0 and is_even(n - 1)


def closure_maker(factor: float):
    def scaled(x):
        return x * factor

    return scaled


class UserClass:
    limit = OFFSET

    def __init__(self, value: int) -> None:
        self.value = value


class UserProbe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))
        self.register_buffer("mean", torch.arange(3.0))
        self.register_buffer("unused", None)
        self.label = "probe"
        self.sizes = (3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x - self.mean) * self.scale


def test_functions_travel_as_specs_with_their_globals_and_closures() -> None:
    spec = through_the_wire(user_function)
    assert isinstance(spec, FunctionSpec)
    assert spec.name == "user_function" and spec.source.startswith("def user_function(")
    assert spec.filename == __file__ and spec.line == user_function.__code__.co_firstlineno
    assert spec.globals["OFFSET"] == OFFSET
    helper = spec.globals["helper_function"]
    assert isinstance(helper, FunctionSpec) and helper.globals["torch"] == Placeholder("import", "torch")

    spec = through_the_wire(closure_maker(2.5))
    assert isinstance(spec, FunctionSpec) and spec.closure == {"factor": 2.5}

    double = lambda x: x * 2  # noqa: E731
    spec = through_the_wire(double)
    assert spec.is_lambda and spec.source == "lambda x: x * 2"


def test_a_recursive_function_travels() -> None:
    spec = through_the_wire(recursive)
    assert isinstance(spec, FunctionSpec)
    assert spec.globals["recursive"] is spec, "a function referring to itself is one spec"


def test_mutually_recursive_functions_travel() -> None:
    spec = through_the_wire(is_even)
    assert isinstance(spec, FunctionSpec) and spec.name == "is_even"
    odd = spec.globals["is_odd"]
    assert isinstance(odd, FunctionSpec) and odd.globals["is_even"] is spec


def test_a_function_annotated_with_typing_any_travels() -> None:
    """Annotation names are sent with a function; ``typing.Any`` must not make it unsendable."""
    spec = through_the_wire(typed_function)
    assert isinstance(spec, FunctionSpec) and spec.name == "typed_function"
    assert spec.globals.get("OFFSET") == OFFSET


def test_classes_and_modules_travel_as_specs() -> None:
    spec = through_the_wire(UserClass)
    assert isinstance(spec, ClassSpec) and spec.name == "UserClass" and "class UserClass" in spec.source
    assert spec.globals["OFFSET"] == OFFSET

    probe = UserProbe().eval()
    spec = through_the_wire(probe)
    assert isinstance(spec, ModuleSpec) and isinstance(spec.cls, ClassSpec) and spec.cls.name == "UserProbe"
    assert spec.training is False
    assert spec.attrs == {"label": "probe", "sizes": (3, 2)}
    assert_exact(probe.scale.data, spec.parameters["scale"])
    assert spec.parameters["scale"].requires_grad
    assert_exact(probe.mean, spec.buffers["mean"])
    assert spec.buffers["unused"] is None
    linear = spec.children["linear"]
    assert isinstance(linear, ModuleSpec) and linear.cls == Placeholder("attr", "torch.nn.Linear")
    assert_exact(probe.linear.weight.data, linear.parameters["weight"])


def test_library_functions_and_modules_travel_as_placeholders() -> None:
    assert through_the_wire(torch.nn.functional.gelu) == Placeholder("attr", "torch.nn.functional.gelu")
    assert through_the_wire(torch) == Placeholder("import", "torch")
    assert through_the_wire(math) == Placeholder("import", "math")
    assert through_the_wire(torch.nn.Linear) == Placeholder("attr", "torch.nn.Linear")


def test_results_refuse_code() -> None:
    for value in (user_function, UserClass, UserProbe()):
        with pytest.raises(WireError, match="data only"):
            Encoder(allow_code=False).encode(value, "the saved value 'x'")


def test_refused_modules_and_unreadable_functions() -> None:
    import os

    with pytest.raises(WireError, match="'os'"):
        Encoder().encode(os, "variable 'os'")
    namespace: dict[str, Any] = {}
    exec(compile("def ghost(x):\n    return x\n", "<no file>", "exec"), namespace)
    with pytest.raises(WireError, match="variable 'ghost'.*source"):
        Encoder().encode(namespace["ghost"], "variable 'ghost'")


def test_model_outputs_and_cache_views() -> None:
    logits = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(4))
    hidden = (torch.ones(1, 2, 3), torch.zeros(1, 2, 3))
    output = CausalLMOutputWithPast(logits=logits, hidden_states=hidden)
    decoded = through_a_result(output)
    assert type(decoded) is CausalLMOutputWithPast
    assert_exact(logits, decoded.logits, "logits")
    assert_exact(hidden, decoded.hidden_states, "hidden_states")

    base = BaseModelOutput(last_hidden_state=torch.ones(1, 2, 3))
    decoded = through_a_result(base)
    assert type(decoded) is BaseModelOutput
    assert_exact(base.last_hidden_state, decoded.last_hidden_state)

    cache = Cache({}, None)
    entry = Entry()
    entry.inputs, entry.output = ((torch.ones(2),), {}), torch.zeros(2)
    cache.entries["model.layer"] = [entry]
    decoded = through_a_result(CacheView(cache, "model"))
    assert isinstance(decoded, CacheView) and decoded.keys() == ["model.layer"]
    assert_exact(entry.output, decoded["model.layer"].output)
    assert_exact(entry.inputs, decoded["model.layer"].inputs)


# -- messages ----------------------------------------------------------------------------------


def test_a_request_round_trips() -> None:
    encoder = Encoder()
    request = make_request(
        kind="generate",
        inputs=[encoder.encode("a prompt", "input"), encoder.encode(torch.tensor([[1, 2, 3]]), "input")],
        kwargs={"max_new_tokens": 3, "temperature": encoder.encode(0.5, "kw")},
        captured={"steer": encoder.encode(torch.ones(4), "steer"), "n": 2},
        tracer_name="tracer",
    )
    decoded = decode_request(encode_request(request))
    assert decoded.protocol == PROTOCOL_VERSION
    assert decoded.client == request.client and decoded.body == request.body
    assert decoded.model == "tiny" and decoded.kind == "generate" and decoded.tracer_name == "tracer"
    assert decoded.inputs[0] == "a prompt"
    assert_exact(torch.tensor([[1, 2, 3]]), decoded.inputs[1])
    assert decoded.kwargs == {"max_new_tokens": 3, "temperature": 0.5}
    assert_exact(torch.ones(4), decoded.captured["steer"])
    assert decoded.captured["n"] == 2


def test_a_result_round_trips() -> None:
    error = ErrorInfo(
        type="ValueError",
        message="bad",
        frames=[Frame(filename="user.py", line=4, name="<trace>", source="x = 1")],
        notes=["a note"],
    )
    result = Result(
        saved={"h": Encoder(allow_code=False).encode(torch.ones(2, dtype=torch.bfloat16), "h")},
        logs=["line one", "line two"],
        timings=Timings(decode=0.25, run=1.5, encode=0.125),
        error=error,
    )
    decoded = decode_result(encode_result(result))
    assert_exact(torch.ones(2, dtype=torch.bfloat16), decoded.saved["h"])
    assert decoded.logs == ["line one", "line two"]
    assert decoded.timings == Timings(decode=0.25, run=1.5, encode=0.125)
    assert decoded.error == error and decoded.error.line == error.frames[0]


def test_compression_levels_all_decode() -> None:
    request = make_request(captured={"t": Encoder().encode(torch.zeros(1000), "t")})
    for level in (1, 3, 19):
        data = encode_request(request, level=level)
        assert data.startswith(MAGIC)
        assert_exact(torch.zeros(1000), decode_request(data).captured["t"])


@pytest.mark.parametrize("protocol", [0, 2, 99, -1])
def test_another_protocol_version_is_refused(protocol: int) -> None:
    for data, decode in (
        (encode_request(make_request(protocol=protocol)), decode_request),
        (encode_result(Result(protocol=protocol)), decode_result),
    ):
        with pytest.raises(WireError) as info:
            decode(data)
        message = str(info.value)
        assert f"protocol version {protocol}" in message and "not supported" in message, message
        assert str(PROTOCOL_VERSION) in message and "upgrade" in message, message


def test_a_protocol_of_the_wrong_type_is_refused() -> None:
    tree = raw_message(make_request())
    tree["protocol"] = "1"
    with pytest.raises(WireError):
        decode_request(pack(tree))


@pytest.mark.parametrize(
    "data",
    [b"", b"NDI", b"NDIF", b"XXXX" + b"\x00" * 16, MAGIC + b"not zstd", "NDIF text", None, 12, [1, 2]],
    ids=["empty", "short", "magic only", "bad magic", "bad frame", "str", "none", "int", "list"],
)
def test_malformed_framing_is_refused(data: Any) -> None:
    for decode in (decode_request, decode_result):
        with pytest.raises(WireError):
            decode(data)


def test_truncated_messages_are_refused() -> None:
    data = encode_request(make_request(captured={"t": Encoder().encode(torch.randn(64), "t")}))
    for end in range(4, len(data) - 1, max(1, len(data) // 40)):
        with pytest.raises(WireError):
            decode_request(data[:end])


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = encode_result(Result(logs=["x"]))
    assert decode_result(bytearray(data)).logs == ["x"]
    assert decode_result(memoryview(data)).logs == ["x"]


def test_invalid_utf8_in_a_string_is_refused() -> None:
    """A MessagePack string that is not UTF-8 (one flipped byte can make one): a WireError."""
    for raw in (b"\xa1\xa5", b"\x91\xa1\xff"):
        for decode in (decode_request, decode_result):
            with pytest.raises(WireError):
                decode(pack_raw(raw))
    tree = raw_message(make_request())
    raw = msgspec.msgpack.encode({**tree, "model": "MODEL"}).replace(b"MODEL", b"\xffODEL")
    with pytest.raises(WireError):
        decode_request(pack_raw(raw))


def test_a_message_of_the_other_kind_is_refused() -> None:
    with pytest.raises(WireError):
        decode_request(encode_result(Result()))


def test_captured_names_must_be_identifiers() -> None:
    for name in ("not an identifier", "1x", "", "a.b"):
        with pytest.raises(WireError, match="identifiers"):
            decode_request(encode_request(make_request(captured={name: 1})))


# -- size limits -------------------------------------------------------------------------------


def incompressible(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def test_a_message_over_the_compressed_limit_is_refused_with_a_clear_message() -> None:
    request = make_request(captured={"big": Encoder().encode(incompressible(200_000), "big")})
    data = encode_request(request)
    limit = 100_000
    with pytest.raises(WireError) as info:
        decode_request(data, SizeLimits(max_compressed=limit))
    message = str(info.value)
    assert str(len(data)) in message and str(limit) in message and "limit" in message, message
    assert "smaller" in message or "less" in message, message
    decode_request(data, SizeLimits(max_compressed=len(data)))  # exactly at the limit: accepted

    result = Result(saved={"big": Encoder(allow_code=False).encode(incompressible(200_000), "big")})
    with pytest.raises(WireError, match=str(limit)):
        decode_result(encode_result(result), SizeLimits(max_compressed=limit))


def test_a_message_over_the_uncompressed_limit_is_refused() -> None:
    request = make_request(captured={"zeros": Encoder().encode(torch.zeros(1 << 20), "zeros")})
    data = encode_request(request)
    assert len(data) < 10_000
    with pytest.raises(WireError) as info:
        decode_request(data, SizeLimits(max_uncompressed=1 << 20))
    assert str(1 << 20) in str(info.value)
    decode_request(data, SizeLimits(max_uncompressed=8 << 20))


def bomb(size: int, content_size: bool) -> bytes:
    compressor = zstandard.ZstdCompressor(level=19, write_content_size=content_size)
    return MAGIC + compressor.compress(b"\x00" * size)


@pytest.mark.parametrize("content_size", [True, False], ids=["size in header", "streamed"])
def test_a_decompression_bomb_is_refused_without_expanding(content_size: bool) -> None:
    """A few KiB that expand to 64 MiB: refused, and never expanded past the limit."""
    data = bomb(64 << 20, content_size)
    assert len(data) < 64 << 10
    limit = 1 << 20
    for decode in (decode_request, decode_result):
        tracemalloc.start()
        try:
            with pytest.raises(WireError):
                decode(data, SizeLimits(max_uncompressed=limit))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * limit, f"decoding allocated {peak / 2**20:.1f} MiB for a limit of {limit / 2**20:.0f} MiB"


def test_a_frame_header_claiming_a_huge_size_is_refused() -> None:
    """A 17-byte frame whose header claims 32 TiB: a WireError, not an allocation."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 45)
    frame = header + b"\x01\x00\x00"  # one empty raw block, the last
    for decode in (decode_request, decode_result):
        with pytest.raises(WireError):
            decode(MAGIC + frame)


def test_a_tensor_over_the_tensor_limit_is_refused() -> None:
    data = encode_request(make_request(captured={"t": Encoder().encode(torch.zeros(1000), "t")}))
    with pytest.raises(WireError, match="exceeds the limit of 1000"):
        decode_request(data, SizeLimits(values=Limits(max_tensor_bytes=1000)))
    decode_request(data, SizeLimits(values=Limits(max_tensor_bytes=4000)))


def test_a_shape_claiming_a_huge_tensor_is_refused_before_allocating() -> None:
    for shape in ([1 << 40, 1 << 40], [2**63 - 1], [2**31] * 4):
        for data in (None, b""):
            tree = {"$": "tensor", "id": 0, "dtype": "float32", "shape": shape, "data": data, "grad": False}
            with pytest.raises(WireError):
                Decoder().decode(tree)


def test_too_many_values_are_refused() -> None:
    with pytest.raises(WireError, match="more than 100 values"):
        Decoder(Limits(max_items=100)).decode(list(range(200)))
    data = encode_request(make_request(captured={"a": list(range(60)), "b": list(range(60))}))
    with pytest.raises(WireError, match="more than 100 values"):
        decode_request(data, SizeLimits(values=Limits(max_items=100)))


def test_too_long_source_is_refused() -> None:
    tree = Encoder().encode(user_function, "f")
    with pytest.raises(WireError, match="source"):
        Decoder(Limits(max_source_chars=10)).decode(tree)


def nested_lists(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


def nested_tuples(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = {"$": "tuple", "v": [value]}
    return value


def test_the_nesting_limit() -> None:
    Decoder().decode(nested_lists(60))
    Decoder().decode(nested_tuples(30))
    for tree in (nested_lists(65), nested_lists(10_000), nested_tuples(65)):
        with pytest.raises(WireError, match="deeper than 64"):
            Decoder().decode(tree)
    with pytest.raises(WireError, match="deeper than 5"):
        Decoder(Limits(max_depth=5)).decode(nested_lists(7))
    data = encode_request(make_request(captured={"deep": nested_lists(100)}))
    with pytest.raises(WireError, match="deeper than"):
        decode_request(data)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_inside_the_messagepack_is_refused(depth: int) -> None:
    """A few bytes of nested MessagePack arrays: a WireError, not a RecursionError."""
    nested = b"\x91" * depth + b"\xc0"
    marker = msgspec.msgpack.encode({"x": None})
    for message, field in ((make_request(), "captured"), (Result(), "saved")):
        tree = raw_message(message)
        tree[field] = {"x": None}
        raw = msgspec.msgpack.encode(tree)
        assert raw.count(marker) == 1
        data = pack_raw(raw.replace(marker, b"\x81\xa1x" + nested))
        decode = decode_request if field == "captured" else decode_result
        with pytest.raises(WireError):
            decode(data)


# -- malformed values --------------------------------------------------------------------------


def tensor_tree(**fields: Any) -> dict:
    tree = {"$": "tensor", "id": 0, "dtype": "float32", "shape": [2], "data": b"\x00" * 8, "grad": False}
    tree.update(fields)
    return {key: value for key, value in tree.items() if value is not _DROP}


def ndarray_tree(**fields: Any) -> dict:
    tree = {"$": "ndarray", "dtype": "<f4", "shape": [2], "data": b"\x00" * 8}
    tree.update(fields)
    return {key: value for key, value in tree.items() if value is not _DROP}


def output_tree(keys: list, values: list) -> dict:
    return {
        "$": "output",
        "class": "transformers.modeling_outputs.CausalLMOutputWithPast",
        "v": {"$": "dict", "k": keys, "v": values},
    }


def empty_dict() -> dict:
    return {"$": "dict", "k": [], "v": []}


def function_tree(**fields: Any) -> dict:
    tree = {
        "$": "function",
        "id": 1,
        "name": "f",
        "source": "def f(x):\n    return x\n",
        "filename": "user.py",
        "line": 1,
        "globals": empty_dict(),
        "closure": empty_dict(),
        "lambda": False,
    }
    tree.update(fields)
    return {key: value for key, value in tree.items() if value is not _DROP}


def module_tree(**fields: Any) -> dict:
    tree = {
        "$": "module",
        "id": 2,
        "class": {"$": "attr", "v": "torch.nn.Linear"},
        "attrs": empty_dict(),
        "parameters": {},
        "buffers": {},
        "children": {},
        "training": False,
    }
    tree.update(fields)
    return {key: value for key, value in tree.items() if value is not _DROP}


_DROP = object()

MALFORMED = {
    # tags
    "unknown tag": {"$": "pickle", "v": b"cos\nsystem\n"},
    "tag not a string": {"$": 1, "v": 2},
    "untagged map": {"a": 1},
    "map with non-str keys": {1: 2},
    # big ints and floats
    "big int not digits": {"$": "int", "v": "12a"},
    "big int empty": {"$": "int", "v": ""},
    "big int double minus": {"$": "int", "v": "--5"},
    "big int superscript digit": {"$": "int", "v": "²"},
    "big int too long": {"$": "int", "v": "9" * 5000},
    "big int not a string": {"$": "int", "v": 5},
    "float not special": {"$": "float", "v": "1.5"},
    "float missing": {"$": "float"},
    # containers
    "tuple not a list": {"$": "tuple", "v": "abc"},
    "dict lengths differ": {"$": "dict", "k": [1, 2], "v": [1]},
    "dict unhashable key": {"$": "dict", "k": [[1]], "v": [1]},
    "dict missing keys": {"$": "dict", "v": [1]},
    "set unhashable": {"$": "set", "v": [[1]]},
    "frozenset unhashable": {"$": "frozenset", "v": [{"$": "dict", "k": [], "v": []}]},
    "complex one part": {"$": "complex", "v": [1.0]},
    "complex strings": {"$": "complex", "v": ["1", "2"]},
    "complex bools": {"$": "complex", "v": [True, False]},
    "slice two parts": {"$": "slice", "v": [1, 2]},
    # dtypes and devices
    "unknown dtype": {"$": "dtype", "v": "float128"},
    "dtype not a string": {"$": "dtype", "v": 3},
    "quantized dtype": {"$": "dtype", "v": "qint8"},
    "bad device": {"$": "device", "v": "gpu:0"},
    "device index too big": {"$": "device", "v": "cuda:99999999999999999999"},
    "negative device": {"$": "device", "v": "cpu:-5"},
    "long device": {"$": "device", "v": "cuda:" + "0" * 100},
    # tensors
    "tensor unknown dtype": tensor_tree(dtype="float128"),
    "tensor dtype of another library": tensor_tree(dtype="<f4"),
    "tensor data too short": tensor_tree(data=b"\x00" * 7),
    "tensor data too long": tensor_tree(data=b"\x00" * 9),
    "tensor data not bytes": tensor_tree(data="\x00" * 8),
    "tensor data a list": tensor_tree(data=[0] * 8),
    "tensor negative shape": tensor_tree(shape=[-2], data=b""),
    "tensor bool shape": tensor_tree(shape=[True, True], data=b"\x00" * 4),
    "tensor float shape": tensor_tree(shape=[2.0]),
    "tensor shape not a list": tensor_tree(shape=2),
    "tensor 33 dims": tensor_tree(shape=[1] * 33, data=b"\x00" * 4),
    "tensor shape missing": tensor_tree(shape=_DROP),
    "tensor huge shape": tensor_tree(shape=[2**40, 2**40], data=b""),
    "tensor huge shape with a zero": tensor_tree(shape=[2**62, 2**62, 0], data=b""),
    "tensor uint64-max shape with a zero": tensor_tree(shape=[2**64 - 1, 0], data=b""),
    "meta tensor huge shape with a zero": tensor_tree(shape=[2**62, 2**62, 0], data=None),
    "meta tensor uint64-max shape with a zero": tensor_tree(shape=[2**64 - 1, 0], data=None),
    "meta tensor huge": tensor_tree(shape=[2**63 - 1], data=None),
    # numpy arrays
    "ndarray object dtype": ndarray_tree(dtype="|O", data=b"\x00" * 16),
    "ndarray str dtype": ndarray_tree(dtype="<U1"),
    "ndarray structured dtype": ndarray_tree(dtype="i4,i4", data=b"\x00" * 16),
    "ndarray datetime dtype": ndarray_tree(dtype="<M8[D]", data=b"\x00" * 16),
    "ndarray nonsense dtype": ndarray_tree(dtype="not a dtype"),
    "ndarray dtype not a string": ndarray_tree(dtype=4),
    "ndarray data mismatch": ndarray_tree(data=b"\x00" * 3),
    "ndarray data missing": ndarray_tree(data=_DROP),
    "ndarray huge shape with a zero": ndarray_tree(shape=[2**64 - 1, 0], data=b""),
    "ndarray huge shape": ndarray_tree(shape=[2**40, 2**40], data=b""),
    # references and placeholders
    "ref unknown": {"$": "ref", "v": 5},
    "ref not an int": {"$": "ref", "v": "0"},
    "placeholder not a string": {"$": "envoy", "v": 3},
    "placeholder too long": {"$": "attr", "v": "x" * 1000},
    # code specs
    "function without a name": function_tree(name=_DROP),
    "function name not a string": function_tree(name=3),
    "function source not a string": function_tree(source=b"def f(): pass"),
    "function line a bool": function_tree(line=True),
    "function globals not a dict": function_tree(globals={"x": 1}),
    "function globals with a non-identifier": function_tree(globals={"$": "dict", "k": ["not valid"], "v": [1]}),
    "function closure missing": function_tree(closure=_DROP),
    "class without source": {
        "$": "class",
        "id": 3,
        "name": "C",
        "filename": "u.py",
        "line": 1,
        "globals": empty_dict(),
    },
    "module class not a class": module_tree(**{"class": 5}),
    "module class missing": module_tree(**{"class": _DROP}),
    "module parameters not a map": module_tree(parameters=[1]),
    "module parameter name not an identifier": module_tree(parameters={"a b": None}),
    "module attrs not a dict value": module_tree(attrs={}),
    # model outputs and caches
    "output class not a string": {"$": "output", "class": 1, "v": empty_dict()},
    "output fields not a dict value": {"$": "output", "class": "x.Y", "v": [1]},
    "output with an unknown field": output_tree(["bogus"], [1]),
    "output with junk pairs": output_tree(["loss"], [[["a", 1], 5]]),
    "output setting __dict__": output_tree(["loss"], [[["__dict__", 1]]]),
    "cache entries not a map": {"$": "cache", "root": "model", "entries": [1]},
    "cache entry not a map": {"$": "cache", "root": "model", "entries": {"model.x": [1]}},
    "cache path not a string": {"$": "cache", "root": "model", "entries": {1: []}},
    "cache root missing": {"$": "cache", "entries": {}},
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_values_are_refused_as_wire_errors(name: str) -> None:
    tree = MALFORMED[name]
    with no_code_execution() as calls:
        with pytest.raises(WireError, match="malformed message"):
            Decoder().decode(tree)
        with pytest.raises(WireError, match="malformed message"):
            decode_request(pack({**raw_message(make_request()), "captured": {"x": tree}}))
        with pytest.raises(WireError, match="malformed message"):
            decode_result(pack({**raw_message(Result()), "saved": {"x": tree}}))
    assert calls == []


MALFORMED_FIELDS = {
    "no client": ("client", _DROP),
    "client a string": ("client", "ndif"),
    "no body": ("body", _DROP),
    "body text missing": ("body", {"filename": "f.py", "first_line": 1}),
    "first line a string": ("body", {"text": "", "filename": "f.py", "first_line": "1"}),
    "model an int": ("model", 3),
    "kind a list": ("kind", ["trace"]),
    "inputs a map": ("inputs", {"a": 1}),
    "kwargs a list": ("kwargs", [1]),
    "kwargs with int keys": ("kwargs", {1: 2}),
    "captured a list": ("captured", [1]),
    "captured with bytes keys": ("captured", {b"x": 1}),
    "tracer name an int": ("tracer_name", 1),
    "protocol missing and unknown field": ("surprise", 1),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_FIELDS))
def test_malformed_request_fields_are_refused(name: str) -> None:
    field, value = MALFORMED_FIELDS[name]
    tree = raw_message(make_request())
    if value is _DROP:
        del tree[field]
    else:
        tree[field] = value
    if field == "surprise":  # unknown fields are ignored; a missing protocol defaults to 1
        del tree["protocol"]
        assert decode_request(pack(tree)).protocol == PROTOCOL_VERSION
        return
    with pytest.raises(WireError, match="malformed message"):
        decode_request(pack(tree))


# -- decoding never executes -------------------------------------------------------------------


def rich_request() -> Request:
    """A request holding one of everything: tensors, arrays, code, modules, placeholders."""
    encoder = Encoder()
    shared = torch.arange(4.0)
    increment = lambda x: x + 1  # noqa: E731
    captured = {
        "steer": torch.randn(8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "f8": torch.ones(3).to(torch.float8_e5m2),
        "flags": torch.tensor([True, False]),
        "leaf": torch.ones(2, requires_grad=True),
        "meta": torch.empty(3, device="meta"),
        "shared": [shared, shared],
        "array": np.arange(6, dtype=">i2").reshape(2, 3),
        "data": {1: (2, 3), "s": {4, 5}, None: [slice(1, 2), ..., 1 + 2j, 2**70, float("nan")]},
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "function": user_function,
        "closure": closure_maker(2.0),
        "lambda_": increment,
        "cls": UserClass,
        "probe": UserProbe(),
        "gelu": torch.nn.functional.gelu,
        "torch": torch,
    }
    return make_request(
        inputs=[encoder.encode("prompt", "input")],
        kwargs={"max_new_tokens": 2},
        captured={name: encoder.encode(value, name) for name, value in captured.items()},
        tracer_name="tracer",
    )


def rich_result() -> Result:
    encoder = Encoder(allow_code=False)
    saved = {
        "logits": CausalLMOutputWithPast(logits=torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(1))),
        "h": torch.ones(2, 3, dtype=torch.float16),
        "values": [1, (2.5, "x"), {3: b"y"}, torch.Size([2])],
    }
    return Result(saved={name: encoder.encode(value, name) for name, value in saved.items()}, logs=["a"])


RICH_REQUEST = encode_request(rich_request())
RICH_RESULT = encode_result(rich_result())

# msgspec builds its decoder for a Struct type on first use, evaluating the schema's own
# (postponed) annotations with typing.ForwardRef: a compile/eval of ndif's source text, once
# per process, unrelated to any message. Do it now, before `no_code_execution` watches.
decode_request(RICH_REQUEST)
decode_result(RICH_RESULT)


def test_decoding_a_rich_request_builds_data_and_specs_only() -> None:
    with no_code_execution() as calls:
        request = decode_request(RICH_REQUEST)
        result = decode_result(RICH_RESULT)
    assert calls == []
    assert_data_only([request.inputs, request.kwargs, request.captured, result.saved])
    captured = request.captured
    assert isinstance(captured["function"], FunctionSpec) and isinstance(captured["cls"], ClassSpec)
    assert isinstance(captured["probe"], ModuleSpec) and captured["torch"] == Placeholder("import", "torch")
    assert captured["shared"][0] is captured["shared"][1]
    assert captured["lambda_"].is_lambda


def test_the_patches_do_catch_code_execution() -> None:
    with no_code_execution() as calls:
        for run in (lambda: exec("1"), lambda: eval("1"), lambda: pickle.loads(pickle.dumps(1))):
            with pytest.raises(CodeExecuted):
                run()
    assert calls == ["builtins.exec", "builtins.eval", "pickle.loads"]


# -- fuzzing -----------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    for decode in (decode_request, decode_result):
        decode_only_wire_errors(decode, data)
        decode_only_wire_errors(decode, MAGIC + data)
        decode_only_wire_errors(decode, pack_raw(data))


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=8),
    which=st.sampled_from(["request", "result"]),
    compressed=st.booleans(),
    cut=st.none() | st.integers(0, 1 << 30),
)
def test_fuzz_flipped_bytes_of_valid_messages(flips: list, which: str, compressed: bool, cut: int | None) -> None:
    """Flip bytes of a valid message: in its compressed stream, or in its MessagePack before compressing."""
    data = RICH_REQUEST if which == "request" else RICH_RESULT
    decode = decode_request if which == "request" else decode_result
    if compressed:
        body = bytearray(data[len(MAGIC) :])
    else:
        body = bytearray(zstandard.ZstdDecompressor().decompress(data[len(MAGIC) :]))
    for index, mask in flips:
        body[index % len(body)] ^= mask
    if cut is not None:
        body = body[: cut % (len(body) + 1)]
    message = MAGIC + bytes(body) if compressed else pack_raw(bytes(body))
    decode_only_wire_errors(decode, message)


# Values a mutation puts anywhere in a message tree: wrong types, huge and negative numbers,
# tags with missing or wrong fields, shapes that overflow.
HUGE_INTS = st.sampled_from([2**64 - 1, 2**63 - 1, 2**63, -(2**63), 2**62, 2**32, -1, 0, 1])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=32),
    st.sampled_from(sorted(TENSOR_DTYPES) + ["float128", "qint8", "<f4", "|O", "i4,i4", "cpu", "cuda:0", "model"]),
)
TAGS = st.sampled_from(
    [
        "int",
        "float",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "complex",
        "slice",
        "ellipsis",
        "dtype",
        "device",
        "tensor",
        "ndarray",
        "ref",
        "model",
        "envoy",
        "tracer",
        "import",
        "attr",
        "function",
        "class",
        "module",
        "output",
        "cache",
        "bogus",
    ]
)
FIELDS = st.sampled_from(
    [
        "v",
        "k",
        "id",
        "dtype",
        "shape",
        "data",
        "grad",
        "name",
        "source",
        "filename",
        "line",
        "globals",
        "closure",
        "lambda",
        "class",
        "attrs",
        "parameters",
        "buffers",
        "children",
        "training",
        "root",
        "entries",
        "inputs",
        "output",
    ]
)
SHAPES = st.lists(st.one_of(st.integers(0, 4), HUGE_INTS), max_size=5)


@st.composite
def consistent_tensors(draw: st.DrawFn) -> dict:
    """A well-formed tensor value (so mutations start from something that decodes)."""
    name = draw(st.sampled_from(sorted(TENSOR_DTYPES)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = math.prod(shape) * torch.empty((), dtype=TENSOR_DTYPES[name]).element_size()
    data = draw(st.none() | st.binary(min_size=size, max_size=size))
    return {"$": "tensor", "id": draw(st.integers(0, 3)), "dtype": name, "shape": shape, "data": data, "grad": True}


@st.composite
def consistent_ndarrays(draw: st.DrawFn) -> dict:
    dtype = np.dtype(draw(st.sampled_from(["<f4", ">f8", "|b1", "<i8", "<u2", "<c8", "|i1"])))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = math.prod(shape) * dtype.itemsize
    return {"$": "ndarray", "dtype": dtype.str, "shape": shape, "data": draw(st.binary(min_size=size, max_size=size))}


def tagged(children: st.SearchStrategy) -> st.SearchStrategy:
    fields = st.dictionaries(FIELDS, st.one_of(children, SHAPES), max_size=6)
    return st.builds(lambda tag, rest: {**rest, "$": tag}, TAGS, fields)


# Leaves aimed at the decoder's checks: well-typed fields with hostile contents.
HOSTILE_TENSORS = st.fixed_dictionaries(
    {
        "$": st.just("tensor"),
        "id": st.integers(0, 3),
        "dtype": st.sampled_from(sorted(TENSOR_DTYPES) + ["float128", "<f4"]),
        "shape": SHAPES,
        "data": st.none() | st.just(b"") | st.binary(max_size=16),
        "grad": st.booleans(),
    }
)
HOSTILE_NDARRAYS = st.fixed_dictionaries(
    {
        "$": st.just("ndarray"),
        "dtype": st.sampled_from(["<f4", ">i8", "|b1", "<c16", "|O", "<U2", "i4,i4", "<M8[D]", "(2)f4", "V8", "f"]),
        "shape": SHAPES,
        "data": st.just(b"") | st.binary(max_size=16),
    }
)
HOSTILE_SCALARS = st.one_of(
    st.fixed_dictionaries({"$": st.just("int"), "v": st.text(alphabet="0123456789-+ _²١٣\n", max_size=8)}),
    st.fixed_dictionaries({"$": st.just("float"), "v": st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", ""])}),
    st.fixed_dictionaries({"$": st.just("device"), "v": st.text(alphabet="cpudametx:-0123456789 ", max_size=12)}),
    st.fixed_dictionaries({"$": st.just("dtype"), "v": st.text(max_size=8) | st.sampled_from(sorted(TENSOR_DTYPES))}),
)
OUTPUT_CLASSES = st.sampled_from(
    [
        "transformers.modeling_outputs.CausalLMOutputWithPast",
        "transformers.modeling_outputs.BaseModelOutput",
        "transformers.generation.utils.GenerateDecoderOnlyOutput",
        "transformers.modeling_outputs.ModelOutput",
        "transformers.modeling_outputs",
        "os.path",
    ]
)
OUTPUT_FIELDS = st.sampled_from(
    ["logits", "loss", "last_hidden_state", "hidden_states", "bogus", "__dict__", "__class__"]
)


def hostile_outputs(children: st.SearchStrategy) -> st.SearchStrategy:
    fields = st.builds(
        lambda keys, values: {"$": "dict", "k": keys, "v": values[: len(keys)] + [None] * (len(keys) - len(values))},
        st.lists(OUTPUT_FIELDS, max_size=3, unique=True),
        st.lists(children, max_size=3),
    )
    return st.fixed_dictionaries({"$": st.just("output"), "class": OUTPUT_CLASSES, "v": fields})


VALUE_TREES = st.recursive(
    st.one_of(SCALARS, consistent_tensors(), consistent_ndarrays(), HOSTILE_TENSORS, HOSTILE_NDARRAYS, HOSTILE_SCALARS),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        tagged(children),
        hostile_outputs(children),
        st.builds(
            lambda keys, values: {"$": "dict", "k": keys, "v": values},
            st.lists(children, max_size=3),
            st.lists(children, max_size=3),
        ),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1)), children, max_size=3),
    ),
    max_leaves=24,
)


@FUZZ
@given(tree=VALUE_TREES)
def test_fuzz_decoder_on_random_value_trees(tree: Any) -> None:
    decode_only_wire_errors(Decoder().decode, tree)
    decode_only_wire_errors(Decoder(Limits(max_depth=4, max_items=20, max_tensor_bytes=64)).decode, tree)


def tree_paths(tree: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every position in a MessagePack tree (maps by key, arrays by index)."""
    yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from tree_paths(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from tree_paths(value, (*path, index))


def replace_at(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        copy = dict(tree)
        if value is _DROP and not rest:
            del copy[head]
        else:
            copy[head] = replace_at(tree[head], rest, value)
        return copy
    copy = list(tree)
    if value is _DROP and not rest:
        del copy[head]
    else:
        copy[head] = replace_at(tree[head], rest, value)
    return copy


REQUEST_TREE = msgspec.msgpack.decode(zstandard.ZstdDecompressor().decompress(RICH_REQUEST[len(MAGIC) :]))
RESULT_TREE = msgspec.msgpack.decode(zstandard.ZstdDecompressor().decompress(RICH_RESULT[len(MAGIC) :]))


@FUZZ
@given(data=st.data(), which=st.sampled_from(["request", "result"]), count=st.integers(1, 4))
def test_fuzz_mutated_message_trees(data: st.DataObject, which: str, count: int) -> None:
    """Drop, replace and retype fields anywhere in a valid message (tensor shapes included)."""
    tree = REQUEST_TREE if which == "request" else RESULT_TREE
    for _ in range(count):
        paths = list(tree_paths(tree))
        path = data.draw(st.sampled_from(paths), label="path")
        if not path:
            continue
        key = path[-1]
        if key == "shape":
            replacement = data.draw(st.one_of(SHAPES, SCALARS), label="shape")
        elif key == "$":
            replacement = data.draw(st.one_of(TAGS, SCALARS), label="tag")
        else:
            replacement = data.draw(st.one_of(st.just(_DROP), SCALARS, VALUE_TREES), label="value")
        tree = replace_at(tree, path, replacement)
    decode = decode_request if which == "request" else decode_result
    decode_only_wire_errors(decode, pack(tree))


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(list(REQUEST_TREE) + ["saved", "logs", "error", "timings"]), VALUE_TREES))
def test_fuzz_random_message_maps(tree: dict) -> None:
    for decode in (decode_request, decode_result):
        decode_only_wire_errors(decode, pack(tree))
        decode_only_wire_errors(decode, pack({**raw_message(make_request()), **tree}))
