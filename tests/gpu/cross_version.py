"""Requests made under one Python run under another (wire format portability).

Three steps, each a subcommand:

* ``make DIR``: build the tiny models into ``DIR``, then for every case record the
  request this interpreter encodes and the result of running it locally
  (``remote="local"``).
* ``run DIR OUT``: on another interpreter (the GPU machine's Python 3.12), decode and
  run every request recorded in ``DIR`` on the same weights, and record the results
  in ``OUT``. Also record this interpreter's own requests for the same cases, so the
  check also runs the other way.
* ``check DIR OUT``: the results computed on the other side equal the ones computed
  here, and the requests encoded there run here to the same results.

``tests/unit/test_cross_version.py`` runs all three in one interpreter; the
cross-version run is recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import ndif  # noqa: E402
from ndif.remote import local_backend  # noqa: E402
from ndif.sandbox.runtime import run_request  # noqa: E402
from ndif.wire import codec  # noqa: E402

HIDDEN = 16


class Probe(torch.nn.Module):
    """A user module sent by source: a linear probe with a scale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, 1)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def shift(h: torch.Tensor, by: float = 1.5) -> torch.Tensor:
    """A helper function sent by source."""
    return h + by * OFFSET


OFFSET = 0.25


def mlp(directory: Path) -> ndif.NNsight:
    """A small MLP whose weights are stored in ``directory`` (same on both sides)."""
    net = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, 4))
    path = directory / "mlp.pt"
    if path.exists():
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(path)))
    else:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(path))
    return ndif.NNsight(net.eval())


def case_mlp_values(model: Any, remote: Any) -> None:
    x = torch.arange(2 * HIDDEN, dtype=torch.float32).reshape(2, HIDDEN) / 10
    steer = torch.linspace(-1, 1, HIDDEN, dtype=torch.bfloat16)
    probe = Probe(HIDDEN)
    with torch.no_grad():
        probe.linear.weight.fill_(0.1)
        probe.linear.bias.fill_(0.0)
    with model.trace(x, remote=remote):
        hidden = model[0].output.save()
        model[1].output = shift(model[1].output) + steer.float()
        score = probe(model[1].output).save()
        out = model.output.save()
        extra = ndif.save({"slice": slice(1, None), "pair": (1, 2.5), "dtype": torch.float16})
    return {"hidden": hidden, "score": score, "out": out, "extra": extra}


def case_llama_generate(model: Any, remote: Any) -> None:
    with model.generate("The Eiffel Tower is in", max_new_tokens=3, min_new_tokens=3, remote=remote) as tracer:
        norms = ndif.save([])
        for _ in tracer.all():
            norms.append(model.model.layers[1].output[0, -1].norm())
        tokens = tracer.result.save()
    return {"norms": norms, "tokens": tokens}


def case_llama_invokes(model: Any, remote: Any) -> None:
    with model.trace(remote=remote) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke("The Colosseum is in"):
            source = model.model.layers[1].output[:, -1]
            barrier()
        with tracer.invoke("The Eiffel Tower is in"):
            barrier()
            model.model.layers[1].output[:, -1] = source
            logits = model.lm_head.output[:, -1].save()
    return {"logits": logits}


CASES = {
    "mlp_values": ("mlp", case_mlp_values),
    "llama_generate": ("llama", case_llama_generate),
    "llama_invokes": ("llama", case_llama_invokes),
}


def models(directory: Path) -> dict[str, Any]:
    found = {"mlp": mlp(directory)}
    llama = directory / "llama"
    if not llama.exists():
        ndif.make_tiny(llama, arch="llama", layers=2, hidden=32)
    try:
        found["llama"] = ndif.LanguageModel(llama, dispatch=True)
    except Exception as error:  # noqa: BLE001 - recorded: a transformers too old for the checkpoint
        print(f"llama unavailable here: {type(error).__name__}: {error}")
    return found


def _recording(model: Any, sink: dict[str, bytes], name: str) -> Any:
    run = local_backend(model)

    def backend(data: bytes) -> bytes:
        sink[name] = data
        return run(data)

    return backend


def record(directory: Path, prefix: str, dest: Path | None = None) -> dict[str, Any]:
    """Run each case through this interpreter's wire format; its requests go to ``dest``
    as ``prefix-<case>.request``. Returns {case: saved values}."""
    loaded = models(directory)
    requests: dict[str, bytes] = {}
    values = {}
    for name, (which, case) in CASES.items():
        if which not in loaded:
            continue
        values[name] = case(loaded[which], _recording(loaded[which], requests, name))
        if dest is not None:
            (dest / f"{prefix}-{name}.request").write_bytes(requests[name])
    return values


def run_requests(directory: Path, source: Path, prefix: str) -> dict[str, Any]:
    """Decode and run the requests ``prefix-*.request`` in ``source``; returns {case: Result}."""
    loaded = models(directory)
    results = {}
    for name, (which, _case) in CASES.items():
        path = source / f"{prefix}-{name}.request"
        if which not in loaded or not path.exists():
            continue
        request = codec.decode_request(path.read_bytes())
        results[name] = codec.decode_result(codec.encode_result(run_request(loaded[which], request)))
        status = "error: " + results[name].error.message if results[name].error else "ok"
        print(f"ran {path.name}: made by Python {request.client.python}, run by {platform.python_version()}: {status}")
    return results


def _equal(left: Any, right: Any, tolerance: float) -> bool:
    if isinstance(left, torch.Tensor):
        if not isinstance(right, torch.Tensor) or left.shape != right.shape or left.dtype != right.dtype:
            return False
        if left.is_floating_point():
            return torch.allclose(left.float(), right.float(), atol=tolerance, rtol=tolerance)
        return torch.equal(left, right)
    if isinstance(left, (list, tuple)):
        return (
            type(left) is type(right)
            and len(left) == len(right)
            and all(_equal(a, b, tolerance) for a, b in zip(left, right))
        )
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_equal(left[k], right[k], tolerance) for k in left)
    return left == right


def check(directory: Path, out: Path, tolerance: float = 1e-5) -> list[str]:
    """Results of this side's requests computed over there equal this side's own; the
    other side's requests run here to the same values."""
    problems = []
    here = record(directory, "check")
    there_results = {
        path.name.removeprefix("a-").removesuffix(".result"): codec.decode_result(path.read_bytes())
        for path in out.glob("a-*.result")
    }
    ran_here = run_requests(directory, out, "b")
    for name, values in here.items():
        for side, result in (
            ("their run of our request", there_results.get(name)),
            ("our run of theirs", ran_here.get(name)),
        ):
            if result is None:
                problems.append(f"{name}: {side} is missing")
            elif result.error is not None:
                problems.append(f"{name}: {side}: {result.error.type}: {result.error.message}")
            elif not _equal(values, result.saved, tolerance):
                problems.append(f"{name}: {side}: values differ")
    return problems


def main(argv: list[str]) -> int:
    command, *paths = argv
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if command == "make":
        directory = Path(paths[0])
        directory.mkdir(parents=True, exist_ok=True)
        record(directory, "a", directory)
        return 0
    if command == "run":
        directory, out = Path(paths[0]), Path(paths[1])
        out.mkdir(parents=True, exist_ok=True)
        loaded = models(directory)
        for name, (which, _case) in CASES.items():
            path = directory / f"a-{name}.request"
            if which in loaded and path.exists():
                request = codec.decode_request(path.read_bytes())
                result = run_request(loaded[which], request)
                (out / f"a-{name}.result").write_bytes(codec.encode_result(result))
                status = f"error: {result.error.type}: {result.error.message}" if result.error else "ok"
                print(f"ran {path.name}: made by Python {request.client.python}, run here: {status}")
        record(directory, "b", out)
        return 0
    if command == "check":
        problems = check(Path(paths[0]), Path(paths[1]))
        for problem in problems:
            print("PROBLEM:", problem)
        print("cross-version check:", "ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
