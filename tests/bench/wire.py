"""The wire format's cost: encode and decode time and encoded size of typical requests and results.

Each scenario is a trace written once and run three ways on the tiny Llama:
locally (no wire), with ``remote="local"`` (encoded, decoded, run in the sandbox
of this process, its result encoded and decoded) and once with a recording
backend that keeps the bytes of the request and of the result.

While the recording run is inside ``run_remote`` (the caller's frame is live),
``build_request`` + ``encode_request`` is timed there, on the very block, frame
and inputs of the trace: that is the client's encode. The request's decode is
``decode_request`` on the recorded bytes (the server's; it yields data and code
specs, which the sandbox then materializes, outside the wire). The result's encode
is what the server does after the body ran: the saved values through an
``Encoder(allow_code=False)``, then ``encode_result``; its decode is
``decode_result`` on the recorded bytes (the client's). Each is the median of
repetitions after a warm-up, on the wall clock (``perf_counter``). A second table
splits each into its stages (values <-> trees, MessagePack, zstd), timed in place
in a replica of the codec's steps (see `_staged`).

End to end, the local and the ``remote="local"`` runs are timed interleaved (one
of each per repetition): wire overhead = (remote - local) / local, which holds the
wire and the sandbox (restricted compile, guards, materializing captured code).
Nothing here asserts on timings. Once, before timing, the saved values of the
local and the remote run are compared; a difference is printed (and kept in the
JSON report), not raised, so the sizes and times still come out.
"""

from __future__ import annotations

import gc
import io
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import zstandard

from .timing import measure

#: Generation length of the generate scenario.
NEW_TOKENS = 8
#: Invokes of the many-invokes scenario.
INVOKES = 8


# -- what the traces capture from the user's scope -------------------------------------------


def steer_hidden(hidden: torch.Tensor, vector: torch.Tensor, scale: float) -> torch.Tensor:
    """A user helper: add a unit steering direction to every position."""
    return hidden + scale * vector / vector.norm()


class SparseAutoencoder(torch.nn.Module):
    """A small SAE on the residual stream (hidden 64, 512 latents)."""

    def __init__(self, hidden: int = 64, latents: int = 512) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(hidden, latents)
        self.decoder = torch.nn.Linear(latents, hidden)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


@dataclass
class Data:
    """The inputs and captured values of every scenario, made once (seeded)."""

    ids: torch.Tensor  # 1x16
    big_ids: torch.Tensor  # 8x64
    prompts: list[torch.Tensor]  # INVOKES prompts of 1x16
    steer: torch.Tensor  # float32, (hidden,)
    sae: SparseAutoencoder
    bias: torch.Tensor  # bfloat16, (hidden,)
    generate_kwargs: dict[str, Any]


def make_data(vocab: int, hidden: int, pad_id: int) -> Data:
    generator = torch.Generator().manual_seed(7)

    def ids(batch: int, tokens: int) -> torch.Tensor:
        # Ids 0-2 are the tiny tokenizer's pad/bos/eos; stay clear of them.
        return torch.randint(3, vocab, (batch, tokens), generator=generator)

    torch.manual_seed(7)
    sae = SparseAutoencoder(hidden, 512).eval()
    return Data(
        ids=ids(1, 16),
        big_ids=ids(8, 64),
        prompts=[ids(1, 16) for _ in range(INVOKES)],
        steer=torch.randn(hidden, generator=generator),
        sae=sae,
        bias=torch.randn(hidden, generator=generator).to(torch.bfloat16),
        generate_kwargs={
            "max_new_tokens": NEW_TOKENS,
            "min_new_tokens": NEW_TOKENS,
            "do_sample": False,
            "pad_token_id": pad_id,
        },
    )


# -- the scenarios: each runs locally (remote=None) or through a backend ---------------------


def save_one_layer(model: Any, data: Data, remote: Any) -> Any:
    ids = data.ids
    with model.trace(ids, remote=remote):
        hidden = model.model.layers[3].output.save()
    return hidden


def steering(model: Any, data: Data, remote: Any) -> Any:
    ids, steer, scale = data.ids, data.steer, 4.0
    with model.trace(ids, remote=remote):
        model.model.layers[1].output = steer_hidden(model.model.layers[1].output, steer, scale)
        logits = model.lm_head.output.save()
    return logits


def generate_steps(model: Any, data: Data, remote: Any) -> Any:
    ids = data.ids
    with model.generate(ids, remote=remote, **data.generate_kwargs) as tracer:
        hidden = [].save()
        for step in tracer.all():  # noqa: B007  (names starting with "_" are refused remotely)
            hidden.append(model.model.layers[3].output)
    return hidden


def many_invokes(model: Any, data: Data, remote: Any) -> Any:
    prompts = data.prompts
    with model.trace(remote=remote) as tracer:
        layers = [].save()
        for prompt in prompts:
            with tracer.invoke(prompt):
                layers.append([layer.output for layer in model.model.layers])
    return layers


def cache_everything(model: Any, data: Data, remote: Any) -> Any:
    ids = data.big_ids
    with model.trace(ids, remote=remote) as tracer:
        cache = tracer.cache()
    return cache


def sae_latents(model: Any, data: Data, remote: Any) -> Any:
    ids, sae, bias = data.ids, data.sae, data.bias
    with model.trace(ids, remote=remote):
        residual = model.model.layers[2].output + bias.to(torch.float32)
        latents = sae.encode(residual).save()
    return latents


@dataclass
class Scenario:
    name: str
    size: str
    body: Callable[[Any, Data, Any], Any]
    reps: int  # repetitions of each encode/decode timing (fewer for large messages)


SCENARIOS = (
    Scenario("trace, save 1 layer output", "1x16", save_one_layer, 200),
    Scenario("steering vector + helper fn, save logits", "1x16", steering, 200),
    Scenario(f"generate {NEW_TOKENS} tokens, layer output per step", "1x16", generate_steps, 200),
    Scenario(f"{INVOKES} invokes, 4 layer outputs each", f"{INVOKES}x(1x16)", many_invokes, 100),
    Scenario("tracer.cache() of every module", "8x64", cache_everything, 30),
    Scenario("user SAE module + bfloat16 tensor", "1x16", sae_latents, 200),
)


# -- values check -----------------------------------------------------------------------------


def difference(left: Any, right: Any, where: str = "saved") -> str | None:
    """Where ``left`` (saved locally) and ``right`` (saved via the wire) first differ, or None."""
    from ndif.engine.cache import CacheView

    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        if left.dtype != right.dtype or left.shape != right.shape or not torch.equal(left, right):
            return f"{where}: {_describe(left)} vs {_describe(right)}, unequal"
        return None
    if isinstance(left, CacheView) and isinstance(right, CacheView):
        a, b = left._cache.entries, right._cache.entries
        if a.keys() != b.keys():
            return f"{where}: caches of modules {sorted(a)} vs {sorted(b)}"
        for key in a:
            if len(a[key]) != len(b[key]):
                return f"{where}[{key!r}]: {len(a[key])} vs {len(b[key])} calls"
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                found = difference(x.inputs, y.inputs, f"{where}[{key!r}][{i}].inputs") or difference(
                    x.output, y.output, f"{where}[{key!r}][{i}].output"
                )
                if found:
                    return found
        return None
    if type(left) is not type(right):
        return f"{where}: {_describe(left)} vs {_describe(right)}"
    if isinstance(left, dict) and type(left).__module__.startswith("transformers."):
        # A model output travels with its tensor (and tuple/list/None) fields only: a
        # KV cache object stays on the server.
        def travels(output: dict) -> dict:
            return {k: v for k, v in output.items() if isinstance(v, (torch.Tensor, tuple, list, type(None)))}

        left = travels(left)
    if isinstance(left, (list, tuple)):
        if len(left) != len(right):
            return f"{where}: {_describe(left)} vs {_describe(right)}"
        for i, (a, b) in enumerate(zip(left, right)):
            found = difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(left, dict):
        if left.keys() != right.keys():
            return f"{where}: keys {list(left)} vs {list(right)}"
        for key in left:
            found = difference(left[key], right[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    return None if left == right else f"{where}: {left!r} vs {right!r}"


def _describe(value: Any) -> str:
    from ndif.engine.cache import CacheView

    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, CacheView):
        return f"cache of {len(value._cache.entries)} modules"
    if isinstance(value, (list, tuple)):
        inner = f" of {_describe(value[0])}" if value else ""
        return f"{type(value).__name__}[{len(value)}]{inner}"
    if isinstance(value, dict):
        return f"{type(value).__name__} with keys {list(value)[:6]}"
    return type(value).__name__


# -- timing -----------------------------------------------------------------------------------


def _median_us(call: Callable[[], Any], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    gc.collect()
    samples = []
    clock = time.perf_counter
    for _ in range(reps):
        start = clock()
        call()
        samples.append(clock() - start)
    return statistics.median(samples) * 1e6


def _staged(stages: dict[str, Callable[[Any], Any]], first: Any, reps: int, warmup: int) -> dict[str, float]:
    """Run ``stages`` in a row, each on the previous one's output, as the codec does, and
    time each in place (medians, µs; ``total_us`` is the median of the whole). Timed in
    place rather than apart: a stage's cost depends on the allocator's state the
    previous one leaves (fresh megabytes of tensor bytes make the next buffer fault in
    new pages), which a stage repeated on its own input does not pay."""
    names, calls = list(stages), list(stages.values())
    samples: dict[str, list[float]] = {name: [] for name in names}
    totals: list[float] = []
    clock = time.perf_counter
    for rep in range(warmup + reps):
        value = first
        began = last = clock()
        for name, call in zip(names, calls):
            value = call(value)
            now = clock()
            if rep >= warmup:
                samples[name].append(now - last)
            last = now
        if rep >= warmup:
            totals.append(last - began)
        del value
        if rep + 1 == warmup:
            gc.collect()
    medians = {f"{name}_us": statistics.median(values) * 1e6 for name, values in samples.items()}
    medians["total_us"] = statistics.median(totals) * 1e6
    return medians


def _compress(raw: bytes) -> bytes:
    from ndif.wire.codec import MAGIC

    return MAGIC + zstandard.ZstdCompressor(level=3).compress(raw)


def _decompress(data: bytes) -> bytes:
    """As ``ndif.wire.codec._unpack`` decompresses: in one call when the frame declares a size
    within the limit, else a stream read bounded by it."""
    from ndif.wire.codec import SizeLimits

    limit = SizeLimits().max_uncompressed
    payload = bytes(data[4:])
    declared = zstandard.frame_content_size(payload)
    if 0 <= declared <= limit:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=limit)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=False)
    return reader.read(limit + 1)


def _decode_values(message: Any) -> Any:
    """The codec's last step: every value tree of a request or result to data and specs."""
    from ndif.wire.schema import Request
    from ndif.wire.values import Decoder

    decoder = Decoder()
    if isinstance(message, Request):
        message.inputs = [decoder.decode(item) for item in message.inputs]
        message.kwargs = {key: decoder.decode(item) for key, item in message.kwargs.items()}
        message.captured = {key: decoder.decode(item) for key, item in message.captured.items()}
    else:
        message.saved = {key: decoder.decode(item) for key, item in message.saved.items()}
    return message


@dataclass
class Recorded:
    request: bytes = b""
    result: bytes = b""
    encode_us: float = 0.0
    stages: dict[str, float] | None = None


def record(model: Any, data: Data, scenario: Scenario, reps: int, warmup: int) -> Recorded:
    """Run the scenario once through a backend that keeps the bytes; time the request's
    encode from inside ``run_remote``, where the trace's frame is live."""
    import ndif.remote as ndif_remote
    from ndif.wire import codec

    recorded = Recorded()
    forward = ndif_remote.local_backend(model)

    def backend(data: bytes) -> bytes:
        recorded.request = bytes(data)
        recorded.result = forward(data)
        return recorded.result

    original = ndif_remote.run_remote

    def timed_run_remote(
        model: Any,
        remote: Any,
        kind: str,
        block: Any,
        frame: Any,
        inputs: tuple,
        kwargs: dict,
        tracer: Any = None,
        owner: Any = None,
    ) -> dict[str, Any] | None:
        args = (model, kind, block, frame, inputs, kwargs, tracer)
        build = ndif_remote.build_request
        recorded.encode_us = _median_us(lambda: codec.encode_request(build(*args)), reps, warmup)
        stages = {"tree": lambda _: build(*args), "msgpack": msgspec.msgpack.encode, "zstd": _compress}
        recorded.stages = _staged(stages, None, reps, warmup)
        return original(model, remote, kind, block, frame, inputs, kwargs, tracer, owner)

    ndif_remote.run_remote = timed_run_remote
    try:
        scenario.body(model, data, backend)
    finally:
        ndif_remote.run_remote = original
    return recorded


def wire_timings(recorded: Recorded, reps: int, warmup: int) -> dict[str, Any]:
    """Sizes and encode/decode medians of one recorded request and result."""
    from ndif.wire import codec
    from ndif.wire.schema import Request, Result
    from ndif.wire.values import Encoder

    result = codec.decode_result(recorded.result)
    if result.error is not None:
        raise AssertionError(f"wire bench: the remote run failed: {result.error.type}: {result.error.message}")

    def encode_saved(saved: dict[str, Any]) -> Result:
        # What the server does once the body ran (ndif.sandbox.runtime.run_request).
        encoder = Encoder(allow_code=False)
        trees = {name: encoder.encode(value, f"the saved value {name!r}") for name, value in saved.items()}
        return Result(saved=trees, logs=result.logs, timings=result.timings)

    reencoded = codec.encode_result(encode_saved(result.saved))
    assert recorded.stages is not None
    return {
        "request_bytes": len(recorded.request),
        "request_msgpack_bytes": len(_decompress(recorded.request)),
        "result_bytes": len(recorded.result),
        "result_msgpack_bytes": len(_decompress(recorded.result)),
        "result_reencoded_bytes": len(reencoded),
        "request_encode_us": recorded.encode_us,
        "request_decode_us": _median_us(lambda: codec.decode_request(recorded.request), reps, warmup),
        "result_encode_us": _median_us(lambda: codec.encode_result(encode_saved(result.saved)), reps, warmup),
        "result_decode_us": _median_us(lambda: codec.decode_result(recorded.result), reps, warmup),
        "stages": {
            "request_encode": recorded.stages,
            "request_decode": _staged(
                {
                    "zstd": _decompress,
                    "msgpack": lambda raw: msgspec.msgpack.decode(raw, type=Request),
                    "tree": _decode_values,
                },
                recorded.request,
                reps,
                warmup,
            ),
            "result_encode": _staged(
                {"tree": encode_saved, "msgpack": msgspec.msgpack.encode, "zstd": _compress},
                result.saved,
                reps,
                warmup,
            ),
            "result_decode": _staged(
                {
                    "zstd": _decompress,
                    "msgpack": lambda raw: msgspec.msgpack.decode(raw, type=Result),
                    "tree": _decode_values,
                },
                recorded.result,
                reps,
                warmup,
            ),
        },
    }


# -- the section ------------------------------------------------------------------------------


def run(model: Any, vocab: int, hidden: int, pad_id: int, quick: bool = False) -> list[dict[str, Any]]:
    """Every scenario: check values once, then sizes, encode/decode medians and end-to-end times."""
    data = make_data(vocab, hidden, pad_id)
    rows = []
    with torch.no_grad():
        for scenario in SCENARIOS:
            local = scenario.body(model, data, None)
            remote = scenario.body(model, data, "local")
            # Reported, not raised: a value the wire garbles is a finding of this
            # section, and the sizes and times of the rest still stand.
            differs = difference(local, remote)
            reps = max(5, scenario.reps // 10) if quick else scenario.reps
            warmup = 2 if quick else max(3, reps // 10)
            row: dict[str, Any] = {
                "case": scenario.name,
                "size": scenario.size,
                "saved": _describe(local),
                "values_equal": differs is None,
                "values_difference": differs,
            }
            row.update(wire_timings(record(model, data, scenario, reps, warmup), reps, warmup))
            row["reps"] = reps
            end_to_end = measure(
                {
                    "local": lambda scenario=scenario: scenario.body(model, data, None),
                    "remote": lambda scenario=scenario: scenario.body(model, data, "local"),
                },
                warmup=2 if quick else 5,
                min_reps=5 if quick else 20,
                max_reps=50 if quick else 300,
                budget_s=0.3 if quick else 2.5,
            )
            row["local_us"] = end_to_end["local"].wall.median
            row["remote_us"] = end_to_end["remote"].wall.median
            row["end_to_end_reps"] = end_to_end["local"].wall.reps
            row["wire_overhead"] = (row["remote_us"] - row["local_us"]) / row["local_us"]
            # On the thread's CPU clock too: steadier when other processes share the machine.
            row["local_cpu_us"] = end_to_end["local"].cpu.median
            row["remote_cpu_us"] = end_to_end["remote"].cpu.median
            row["wire_overhead_cpu"] = (row["remote_cpu_us"] - row["local_cpu_us"]) / row["local_cpu_us"]
            rows.append(row)
            print(f"  wire: {scenario.name} [{scenario.size}]: {reps} repetitions", file=sys.stderr)
    return rows


def _size(count: int) -> str:
    if count < 10_000:
        return f"{count} B"
    if count < 10_000_000:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:.2f} MB"


def _us(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _print_columns(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for number, line in enumerate(lines):
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        print("  ".join(cells).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))


def print_rows(rows: list[dict[str, Any]]) -> None:
    lines = [
        (
            "case",
            "size",
            "req zstd",
            "req msgpack",
            "req enc µs",
            "req dec µs",
            "res zstd",
            "res msgpack",
            "res enc µs",
            "res dec µs",
            "local µs",
            "remote µs",
            "(r-l)/l",
            "cpu (r-l)/l",
        )
    ]
    for row in rows:
        lines.append(
            (
                row["case"],
                row["size"],
                _size(row["request_bytes"]),
                _size(row["request_msgpack_bytes"]),
                _us(row["request_encode_us"]),
                _us(row["request_decode_us"]),
                _size(row["result_bytes"]),
                _size(row["result_msgpack_bytes"]),
                _us(row["result_encode_us"]),
                _us(row["result_decode_us"]),
                _us(row["local_us"]),
                _us(row["remote_us"]),
                f"{row['wire_overhead']:.2f}",
                f"{row['wire_overhead_cpu']:.2f}",
            )
        )
    _print_columns(lines)


def print_stages(rows: list[dict[str, Any]]) -> None:
    stages = {
        "request_encode": ("req enc: tree / msgpack / zstd", ("tree", "msgpack", "zstd")),
        "request_decode": ("req dec: zstd / msgpack / tree", ("zstd", "msgpack", "tree")),
        "result_encode": ("res enc: tree / msgpack / zstd", ("tree", "msgpack", "zstd")),
        "result_decode": ("res dec: zstd / msgpack / tree", ("zstd", "msgpack", "tree")),
    }
    lines = [("case", *(title for title, _ in stages.values()))]
    for row in rows:
        cells = [row["case"]]
        for stage, (_, order) in stages.items():
            parts = row["stages"][stage]
            cells.append(" / ".join(_us(parts[f"{part}_us"]) for part in order))
        lines.append(tuple(cells))
    _print_columns(lines)
    for row in rows:
        if row["reps"] < 30:  # a --quick run: too few repetitions to compare medians
            continue
        for stage in stages:
            staged, whole = row["stages"][stage]["total_us"], row[f"{stage}_us"]
            if abs(staged - whole) > max(0.25 * whole, 20.0):
                print(
                    f"note: {row['case']}, {stage.replace('_', ' ')}: the stages add up to {staged:.0f} µs, the codec "
                    f"call takes {whole:.0f} µs (noise, or the codec changed: see _staged's callers in this file)"
                )


def print_section(rows: list[dict[str, Any]]) -> None:
    print()
    print("Wire format (zstd-compressed MessagePack, level 3): sizes and median wall-clock µs of typical requests")
    print("and results. req enc = build_request + encode_request (client), req dec = decode_request (server, to")
    print("data and code specs); res enc = Encoder on the saved values + encode_result (server), res dec =")
    print("decode_result (client). local = the trace run in place; remote = remote='local' end to end (wire,")
    print("sandbox and run, in this process), timed interleaved with local; (r-l)/l = the wire + sandbox overhead,")
    print("on the wall clock and on the thread's CPU clock (steadier when other processes share the machine).")
    print_rows(rows)
    for row in rows:
        if row["values_equal"]:
            print(f"values check: {row['case']}: local and remote='local' saved equal values ({row['saved']})")
        else:
            print(f"values check: {row['case']}: remote='local' saved a DIFFERENT value: {row['values_difference']}")
    print()
    print("Where the wire's time goes: median µs of each stage, timed in place in a replica of the codec's steps")
    print("(tree = Python values <-> MessagePack-ready trees, incl. build_request for a request; msgpack = msgspec;")
    print("zstd = (de)compression, level 3, with a fresh (de)compressor and the magic prefix, as the codec does).")
    print_stages(rows)
