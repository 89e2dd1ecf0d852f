"""`make bench`: ndif's tracing overhead side by side with nnsight's, on the same tiny model.

Three separate copies of one tiny random Llama are loaded: a plain transformers
model (the baseline, no wrapping at all), one wrapped by ``ndif.LanguageModel``
and one by ``nnsight.LanguageModel``. (Separate copies: both libraries install a
wrapper as each module's ``forward``; wrapping one module twice would stack them.)
Every call of one input size gets the same pre-tokenized ``input_ids``, so
tokenization is not measured; everything runs under ``torch.no_grad()`` with one
torch thread. The trace bodies are written once (`tests.bench.cases`) and run
under both libraries.

Timing: after a warm-up, each repetition runs plain, ndif and nnsight once each in
rotating order, so drift hits all alike; each call is timed on the wall clock
(``perf_counter``) and on the thread's CPU time (steadier when other processes
share the machine). The table reports medians on one clock (``--clock``), the
total ratio on the other, and a paired ratio (median over repetitions of ndif/
nnsight timed back to back). The cost per accessed module is
``(t_k - t_trivial) / k``, with the trivial trace timed in the same rotation.

A further section (`tests.bench.wire`) measures the wire format of ``remote=``: encoded
sizes and encode/decode times of typical requests and results.

The service section (`tests.bench.service`) starts the service twice, as the embedded
stack and against PostgreSQL, Redis and SeaweedFS, and measures a tiny trace's
submit→result latency (sequential, and with 32 concurrent clients) and throughput,
with the service's own share of the time (total minus the actor's model time).

This is a benchmark, not a test: nothing asserts on timings. It does check once,
before timing, that ndif and nnsight save equal values (both wrap identical
weights), so the two are known to do equal work.

    python -m tests.bench.run [tracing] [service] [chat] [serving] [vllm] [--json PATH] [--clock wall|cpu] [--budget S] [--quick] [--profile]

With no section named, every section runs: ``tracing`` (the tracing tables, the engine
and the wire format, against nnsight), ``service``, ``chat`` (`tests.bench.chat`: the chat
API's tokens/s per user and overall, against the same replies in process), ``serving``
(`tests.bench.serving`: ndif's serving overhead on the CPU stand-in of vLLM, against that
engine alone), and ``vllm``
(`tests.bench.vllm`: ndif.VLLM against plain vLLM; it needs a GPU and says it skipped
without one).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from . import cases as bench_cases  # noqa: E402
from . import chat as bench_chat  # noqa: E402
from . import engine as bench_engine  # noqa: E402
from . import service as bench_service  # noqa: E402
from . import serving as bench_serving  # noqa: E402
from . import vllm as bench_vllm  # noqa: E402
from . import wire as bench_wire  # noqa: E402
from .cases import Case, Inputs  # noqa: E402
from .timing import Timing, measure, paired_difference, paired_ratio  # noqa: E402

#: (batch, tokens) of the input sizes measured.
SIZES = ((1, 16), (8, 64))
#: The sections ``python -m tests.bench.run SECTION...`` may name (none named: all of them).
SECTIONS = ("tracing", "service", "chat", "serving", "vllm")


# -- setup ------------------------------------------------------------------------------------


def quiet() -> None:
    """Silence what would interleave with the table: load progress bars, nnsight's
    deprecation of ``LanguageModel`` and its note that an open ``tracer.all()`` loop
    was cut short at the end of generation (by design)."""
    import nnsight
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=nnsight.NNsightDeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*was never reached.*", category=UserWarning)


def unshadow_nnsight_save() -> bool:
    """Remove the ``torch.Tensor.save`` that ndif installs for helper functions.

    nnsight mounts ``save`` on ``object``, not on ``torch.Tensor``, so importing
    ndif beside it gives tensors ndif's ``save``, which hands calls made outside an
    ndif trace to nnsight's: every ``tensor.save()`` in an nnsight body would pay
    for a detour through ndif. ndif's own trace bodies never use it (``.save()``
    is rewritten at compile time), so removing it leaves ndif's numbers alone and
    gives nnsight the path it has when imported alone. Returns whether it was there.
    """
    from ndif.engine import saving

    if vars(torch.Tensor).get("save") is saving._tensor_save:
        del torch.Tensor.save
        return True
    return False


def load_models(path: Path) -> tuple[torch.nn.Module, Any, Any]:
    """Three separate copies of the checkpoint: plain, ndif-wrapped, nnsight-wrapped."""
    import nnsight
    from transformers import AutoModelForCausalLM

    import ndif

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    nd = ndif.LanguageModel(path, dispatch=True)
    ns = nnsight.LanguageModel(path, dispatch=True)
    modules = [hf, nd._module, ns._module]
    if len({id(module) for module in modules}) != 3:
        raise RuntimeError("the three models must be separate module objects")
    for module in modules:
        module.eval()
    return hf, nd, ns


def output_order(hf: torch.nn.Module, input_ids: torch.Tensor) -> list[str]:
    """Paths of every submodule, in the order their outputs are produced (the
    order a trace body must request them in)."""
    order: list[str] = []
    handles = []
    for name, module in hf.named_modules():
        if not name:
            continue

        def record(_module: Any, _args: Any, _output: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            hf(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for handle in handles:
            handle.remove()
    return order


def envoy_at(model: Any, path: str) -> Any:
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def make_inputs(batch: int, tokens: int, vocab: int, pad_id: int, paths: list[str], models: list[Any]) -> Inputs:
    generator = torch.Generator().manual_seed(batch * 1000 + tokens)
    # Ids 0-2 are the tiny tokenizer's pad/bos/eos; stay clear of them.
    input_ids = torch.randint(3, vocab, (batch, tokens), generator=generator)
    inputs = Inputs(f"{batch}x{tokens}", input_ids, torch.ones_like(input_ids), pad_id, paths=paths)
    for model in models:
        inputs.envoys[id(model)] = [envoy_at(model, path) for path in paths]
    return inputs


# -- values check -----------------------------------------------------------------------------


def _equal(left: Any, right: Any, depth: int = 0) -> bool:
    """Equal values: tensors exactly, containers item by item, other objects (a KV
    cache in a model output) attribute by attribute."""
    if depth > 8:
        return True
    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        return left.shape == right.shape and torch.equal(left, right)
    if type(left) is not type(right):
        return False
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(_equal(a, b, depth + 1) for a, b in zip(left, right))
    if isinstance(left, Mapping):
        return left.keys() == right.keys() and all(_equal(left[k], right[k], depth + 1) for k in left)
    if hasattr(left, "__dict__") and not callable(left):
        return _equal(vars(left), vars(right), depth + 1)
    return left == right


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{len(value)}]"
    return type(value).__name__


def check_values(hf: torch.nn.Module, nd: Any, ns: Any, inputs: Inputs, rows: list[Case]) -> list[str]:
    """Run every traced case once per library and compare what each saved.

    Raises if ndif and nnsight disagree (they wrap identical weights, so every
    saved value must be equal), or if a save did not come back.
    """
    notes = []
    checks = [(case.name, case.traced) for case in rows if case.traced is not None]
    checks.append(("edit 4 mlp outputs (+ logits, check only)", bench_cases.trace_edit_mlps_checked))
    with torch.no_grad():
        for name, traced in checks:
            ndif_value = traced(nd, inputs)
            nnsight_value = traced(ns, inputs)
            if traced is bench_cases.trace_trivial or traced is bench_cases.trace_edit_mlps:
                continue
            if ndif_value is None or nnsight_value is None:
                raise AssertionError(
                    f"values check, {name}: a save did not come back "
                    f"(ndif: {_describe(ndif_value)}, nnsight: {_describe(nnsight_value)})"
                )
            if not _equal(ndif_value, nnsight_value):
                raise AssertionError(
                    f"values check, {name}: ndif saved {_describe(ndif_value)}, "
                    f"nnsight saved {_describe(nnsight_value)}, and they differ"
                )
            notes.append(f"{name}: equal ({_describe(ndif_value)})")
        # The edit must really change the model's output.
        plain_logits = bench_cases.plain_forward(hf, inputs).logits
        edited = bench_cases.trace_edit_mlps_checked(nd, inputs)
        if torch.equal(plain_logits, edited):
            raise AssertionError("values check: the in-place mlp edit did not change the logits")
        for label, model in (("ndif", nd), ("nnsight", ns)):
            if not torch.equal(plain_logits, bench_cases.wrapped_forward(model, inputs).logits):
                raise AssertionError(f"values check: {label}'s model, outside a trace, differs from the plain one")
    return notes


# -- timing -----------------------------------------------------------------------------------


def contenders(case: Case, hf: torch.nn.Module, nd: Any, ns: Any, inputs: Inputs) -> dict[str, Any]:
    wrapped = case.traced or case.untraced
    assert wrapped is not None
    calls = {
        "plain": lambda: case.plain(hf, inputs),
        "ndif": lambda: wrapped(nd, inputs),
        "nnsight": lambda: wrapped(ns, inputs),
    }
    if case.accessed:
        # The trivial trace again, in the same rotation: the cost per accessed
        # module subtracts a fixed overhead measured at the same time.
        calls["ndif trivial"] = lambda: bench_cases.trace_trivial(nd, inputs)
        calls["nnsight trivial"] = lambda: bench_cases.trace_trivial(ns, inputs)
    return calls


def time_case(case: Case, hf: torch.nn.Module, nd: Any, ns: Any, inputs: Inputs, args: argparse.Namespace):
    budget = args.budget * (2.0 if case.generate else 1.0)
    return measure(contenders(case, hf, nd, ns, inputs), args.warmup, args.min_reps, args.max_reps, budget)


# -- report -----------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0 or numerator < 0:
        return None
    return numerator / denominator


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def summarize(name: str, size: str, timings: dict[str, Timing], accessed: int | None, clock: str) -> dict[str, Any]:
    """One table row, on ``clock``; the other clock's ratio rides along."""
    stats = {key: timing.on(clock) for key, timing in timings.items()}
    other = "cpu" if clock == "wall" else "wall"
    plain, nd, ns = stats["plain"].median, stats["ndif"].median, stats["nnsight"].median
    return {
        "case": name,
        "size": size,
        "clock": clock,
        "accessed": accessed,
        "plain_us": plain,
        "ndif_us": nd,
        "nnsight_us": ns,
        "ndif_overhead_us": nd - plain,
        "nnsight_overhead_us": ns - plain,
        "overhead_ratio": _ratio(nd - plain, ns - plain),
        "total_ratio": nd / ns,
        "paired_ratio": paired_ratio(stats["ndif"], stats["nnsight"]),
        f"{other}_total_ratio": timings["ndif"].on(other).median / timings["nnsight"].on(other).median,
        "ndif_below_nnsight": nd < ns,
        "stats": {key: {"wall": timing.wall.as_dict(), "cpu": timing.cpu.as_dict()} for key, timing in timings.items()},
    }


HEADER = (
    "case",
    "size",
    "plain µs",
    "ndif µs",
    "nnsight µs",
    "ndif ovh µs",
    "nnsight ovh µs",
    "ovh ndif/nns",
    "total ndif/nns",
    "paired",
    "{other} total",
)


def print_table(rows: list[dict[str, Any]], clock: str) -> None:
    other = "cpu" if clock == "wall" else "wall"
    lines = [tuple(cell.format(other=other) for cell in HEADER)]
    for row in rows:
        lines.append(
            (
                row["case"],
                row["size"],
                f"{row['plain_us']:.0f}",
                f"{row['ndif_us']:.0f}",
                f"{row['nnsight_us']:.0f}",
                f"{row['ndif_overhead_us']:.0f}",
                f"{row['nnsight_overhead_us']:.0f}",
                _fmt_ratio(row["overhead_ratio"]),
                f"{row['total_ratio']:.2f}",
                f"{row['paired_ratio']:.2f}",
                f"{row[other + '_total_ratio']:.2f}",
            )
        )
    _print_columns(lines)


def per_module(rows: list[dict[str, Any]], timings: dict[int, dict[str, Timing]]) -> list[dict[str, Any]]:
    """Cost per accessed module: (t_k - t_trivial) / k, with t_trivial timed in the same
    rotation; the difference is the median of the per-repetition differences."""
    result = []
    for index, row in enumerate(rows):
        k = row["accessed"]
        if not k:
            continue
        clock = row["clock"]
        timing = {key: value.on(clock) for key, value in timings[index].items()}
        nd = paired_difference(timing["ndif"], timing["ndif trivial"]) / k
        ns = paired_difference(timing["nnsight"], timing["nnsight trivial"]) / k
        result.append(
            {
                "size": row["size"],
                "accessed": k,
                "ndif_trivial_us": timing["ndif trivial"].median,
                "nnsight_trivial_us": timing["nnsight trivial"].median,
                "ndif_us_per_module": nd,
                "nnsight_us_per_module": ns,
                "ratio": _ratio(nd, ns),
            }
        )
    return result


def print_per_module(rows: list[dict[str, Any]]) -> None:
    lines = [
        (
            "size",
            "modules accessed",
            "ndif trivial µs",
            "nnsight trivial µs",
            "ndif µs/module",
            "nnsight µs/module",
            "ndif/nnsight",
        )
    ]
    for row in rows:
        lines.append(
            (
                row["size"],
                str(row["accessed"]),
                f"{row['ndif_trivial_us']:.0f}",
                f"{row['nnsight_trivial_us']:.0f}",
                f"{row['ndif_us_per_module']:.1f}",
                f"{row['nnsight_us_per_module']:.1f}",
                _fmt_ratio(row["ratio"]),
            )
        )
    _print_columns(lines)


def _print_columns(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for number, line in enumerate(lines):
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        print("  ".join(cells).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))


# -- profiling (optional) ---------------------------------------------------------------------


#: Which profiled functions belong to a tracing library (its own code, plus greenlet switches).
LIBRARY_CODE = r"/ndif/|/nnsight/|greenlet|contextvars|_contextvars"


def profile(nd: Any, ns: Any, inputs: Inputs, rows: list[Case], reps: int = 200) -> None:
    """cProfile each library on the trivial trace and on saving every module: how much
    of a call is the library's own Python (not the model's), and in which functions."""
    import cProfile
    import pstats
    import re

    library = re.compile(LIBRARY_CODE)
    wanted = [case for case in rows if case.traced in (bench_cases.trace_trivial, bench_cases.trace_save_all)]
    for case in wanted:
        for label, model in (("ndif", nd), ("nnsight", ns)):
            profiler = cProfile.Profile()
            with torch.no_grad():
                for _ in range(10):
                    case.traced(model, inputs)
                profiler.enable()
                for _ in range(reps):
                    case.traced(model, inputs)
                profiler.disable()
            stats = pstats.Stats(profiler)
            total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
            own = sum(
                entry[2]
                for (filename, _, function), entry in stats.stats.items()  # type: ignore[attr-defined]
                if library.search(filename) or library.search(function)
            )
            print(
                f"\n--- cProfile: {label}, {case.name}, {inputs.label}, {reps} calls: "
                f"{total / reps * 1e6:.0f} µs/call profiled, of which the library's own code "
                f"{own / reps * 1e6:.0f} µs/call; its top functions by own time ---"
            )
            stats.sort_stats("tottime").print_stats(library.pattern, 12)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)}); default: all",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument(
        "--budget",
        type=float,
        default=4.0,
        help="seconds of timed repetitions per case and size (generate: twice that)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds per case")
    parser.add_argument("--min-reps", type=int, default=200)
    parser.add_argument("--max-reps", type=int, default=2000)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="the table's clock: wall (perf_counter) or this thread's CPU time (steadier on a "
        "machine other processes load); the other clock's total ratio is shown too",
    )
    parser.add_argument(
        "--keep-tensor-save",
        action="store_true",
        help="keep the torch.Tensor.save ndif installs (nnsight's tensor saves then detour through it)",
    )
    service = parser.add_argument_group("service section")
    service.add_argument("--service-warmup", type=int, default=bench_service.WARMUP, help="untimed jobs per stack")
    service.add_argument(
        "--sequential", type=int, default=bench_service.SEQUENTIAL, help="jobs one after the other, per stack"
    )
    service.add_argument("--clients", type=int, default=bench_service.CLIENTS, help="concurrent clients")
    service.add_argument("--per-client", type=int, default=bench_service.PER_CLIENT, help="jobs per client")
    service.add_argument(
        "--baseline-reps", type=int, default=100, help="repetitions of the in-process baseline, per stack"
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (few repetitions)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile summaries (1x16)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    args.sections = list(dict.fromkeys(args.sections)) or list(SECTIONS)
    if min(args.sequential, args.clients, args.per_client) < 1 or args.service_warmup < 0:
        parser.error("--sequential, --clients and --per-client must be at least 1, --service-warmup at least 0")
    if args.quick:
        args.budget, args.warmup, args.min_reps, args.max_reps = 0.3, 3, 10, 50
        args.service_warmup, args.sequential, args.clients, args.per_client = 2, 10, 4, 3
        args.baseline_reps = 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    report: dict[str, Any] = {}
    failed = []
    # A section that fails is reported and the next one still runs (its numbers are not lost).
    for section in args.sections:
        section_began = time.perf_counter()
        try:
            if section == "tracing":
                report.update(tracing(args))
            elif section == "vllm":  # GPU only: ndif.VLLM against plain vLLM (tests/bench/vllm.py)
                report["vllm"] = bench_vllm.run_all(args.json.parent if args.json is not None else None)
            elif section == "chat":  # the chat API's tokens/s per user and overall (tests/bench/chat.py)
                report["chat"] = bench_chat.run(args)
            elif section == "serving":  # ndif's serving overhead on the CPU stand-in engine (tests/bench/serving.py)
                report["serving"] = bench_serving.run()
            elif section == "service":
                report["service"] = bench_service.run(args)
                print(f"(service section: {time.perf_counter() - section_began:.0f} s)")
                if any("error" in result for result in report["service"]):
                    failed.append(section)
        except Exception:
            traceback.print_exc()
            print(f"\nthe {section} section FAILED after {time.perf_counter() - section_began:.0f} s (traceback above)")
            failed.append(section)
    if len(args.sections) > 1:
        print(f"(all sections: {time.perf_counter() - began:.0f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if failed:
        print(f"failed section(s): {', '.join(failed)}")
        return 1
    return 0


def tracing(args: argparse.Namespace) -> dict[str, Any]:
    """The tracing section: ndif vs nnsight tables, the engine and the wire format."""
    import nnsight

    import ndif

    quiet()
    unshadowed = False if args.keep_tensor_save else unshadow_nnsight_save()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ndif-bench-") as directory:
        path = ndif.make_tiny(Path(directory) / "llama", arch="llama")
        hf, nd, ns = load_models(path)
        pad_id = int(nd.tokenizer.pad_token_id)
        vocab = hf.config.vocab_size
        paths = output_order(hf, torch.tensor([[3, 4, 5]]))
        rows = bench_cases.cases(len(paths))
        sizes = [make_inputs(b, t, vocab, pad_id, paths, [nd, ns]) for b, t in SIZES]

        print(
            f"ndif {ndif.__version__} vs nnsight {nnsight.__version__}; torch {torch.__version__}, "
            f"python {platform.python_version()}, {torch.get_num_threads()} torch thread(s)"
        )
        print(
            f"model: tiny random Llama ({hf.config.num_hidden_layers} layers, hidden {hf.config.hidden_size}, "
            f"{len(paths)} submodules), float32 on CPU, torch.no_grad()"
        )

        if unshadowed:
            print("removed ndif's torch.Tensor.save for this run, so nnsight's tensor saves take nnsight's own path")
            print("(ndif's trace bodies do not use it; --keep-tensor-save keeps it)")
        for note in check_values(hf, nd, ns, sizes[0], rows):
            print(f"values check: {note}")

        results = []
        all_timings: dict[int, dict[str, Timing]] = {}
        for inputs in sizes:
            for case in rows:
                timings = time_case(case, hf, nd, ns, inputs, args)
                all_timings[len(results)] = timings
                row = summarize(case.name, inputs.label, timings, case.accessed, args.clock)
                results.append(row)
                print(f"  {case.name} [{inputs.label}]: {timings['ndif'].wall.reps} repetitions", file=sys.stderr)

        clock = "wall-clock (perf_counter)" if args.clock == "wall" else "thread CPU time (thread_time)"
        other = "cpu" if args.clock == "wall" else "wall"
        print()
        print(f"Median {clock} per call, µs. ovh = time - plain transformers on the same input. Ratios are")
        print("ndif/nnsight (< 1: ndif is faster): of overheads, of totals, paired = median over repetitions of")
        print(f"ndif/nnsight timed back to back (robust to load drift), and of totals on the {other} clock.")
        print_table(results, args.clock)
        modules = per_module(results, all_timings)
        print()
        print("Cost per accessed module: (t_k - t_trivial) / k, the median of per-repetition differences with the")
        print("trivial trace timed in the same rotation (few modules: within the noise of one forward pass).")
        print_per_module(modules)
        losses = [f"{row['case']} [{row['size']}]" for row in results if not row["ndif_below_nnsight"]]
        other_losses = [f"{row['case']} [{row['size']}]" for row in results if row[f"{other}_total_ratio"] >= 1]
        print()
        if losses:
            print(f"ndif NOT below nnsight on {len(losses)} case(s): {'; '.join(losses)}")
        else:
            print(f"ndif below nnsight on every case measured ({len(results)}).")
        if other_losses != losses:
            print(f"  (on the {other} clock, ndif is not below on: {'; '.join(other_losses) or 'none'})")
        module_losses = [
            f"{row['accessed']} module(s) [{row['size']}]"
            for row in modules
            if row["ndif_us_per_module"] >= row["nnsight_us_per_module"]
        ]
        if module_losses:
            print(f"cost per accessed module not below nnsight: {'; '.join(module_losses)}")

        engine_rows = bench_engine.run(args.budget / 2, args.warmup, max(args.min_reps, 1000), 6000)
        print()
        print(f"Engine cost per accessed module, on a chain of {bench_engine.DEPTH} Linear(4, 4) modules (a cheap,")
        print("steady forward): (t_k - t_trivial) / k on the thread's CPU clock, paired per repetition.")
        print("(k = 1 is a difference of a few µs on a ~0.5 ms trace: at the noise floor, its sign varies by run.)")
        bench_engine.print_rows(engine_rows)
        engine_losses = [str(row["accessed"]) for row in engine_rows if row["ratio"] >= 1]
        print(
            "engine cost per access below nnsight at every k."
            if not engine_losses
            else f"engine cost per access NOT below nnsight at k = {', '.join(engine_losses)}"
        )

        wire_rows = bench_wire.run(nd, vocab, hf.config.hidden_size, pad_id, quick=args.quick)
        bench_wire.print_section(wire_rows)
        elapsed = time.perf_counter() - began
        print(f"({elapsed:.0f} s)")

        if args.profile:
            profile(nd, ns, sizes[0], rows)

        report = {
            "ndif": ndif.__version__,
            "nnsight": nnsight.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "ndif_tensor_save_removed": unshadowed,
            "settings": {
                "budget_s": args.budget,
                "warmup": args.warmup,
                "min_reps": args.min_reps,
                "max_reps": args.max_reps,
            },
            "cases": results,
            "per_module": modules,
            "clock": args.clock,
            "ndif_not_below_nnsight": losses,
            f"ndif_not_below_nnsight_{other}": other_losses,
            "per_module_not_below_nnsight": module_losses,
            "engine_per_access": engine_rows,
            "wire": wire_rows,
        }
    return report


if __name__ == "__main__":
    sys.exit(main())
