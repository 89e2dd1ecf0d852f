"""The engine's own cost per accessed module, away from a transformer's noise.

On the tiny Llama a forward pass takes milliseconds and varies by more than one
module access costs, so the few-module rows of the per-module table are within
noise (and saving a large activation costs an allocation both libraries pay).
Here the model is a chain of 64 ``Linear(4, 4)`` modules: the forward is cheap
and steady, and a trace that saves ``k`` evenly spaced outputs measures what the
engine spends per access (parking the body, serving the value, saving it).
"""

from __future__ import annotations

from typing import Any

import torch

from .timing import Timing, measure, paired_difference

DEPTH = 64
ACCESSES = (1, 4, 16, 64)


def chain() -> torch.nn.Sequential:
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(DEPTH)])
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return net.eval()


def trivial(model: Any, x: torch.Tensor) -> list:
    # Hands a saved value back like the accessing traces do, so the difference is
    # module access alone.
    with model.trace(x):
        saved = [].save()
    return saved


def accessing(indices: list[int]) -> Any:
    def body(model: Any, x: torch.Tensor) -> list:
        with model.trace(x):
            saved = [model[i].output for i in indices].save()
        return saved

    return body


def run(budget: float, warmup: int, min_reps: int, max_reps: int) -> list[dict[str, Any]]:
    import nnsight

    import ndif

    x = torch.ones(1, 4)
    models = {"ndif": ndif.NNsight(chain()), "nnsight": nnsight.NNsight(chain())}
    rows = []
    with torch.no_grad():
        for count in ACCESSES:
            body = accessing([i * DEPTH // count for i in range(count)])
            expected = body(models["ndif"], x)
            got = body(models["nnsight"], x)
            if len(got) != count or not all(torch.equal(a, b) for a, b in zip(expected, got)):
                raise AssertionError(f"engine bench: ndif and nnsight saved different values at k={count}")
            contenders = {}
            for name, model in models.items():
                contenders[f"{name} trivial"] = lambda model=model: trivial(model, x)
                contenders[name] = lambda model=model, body=body: body(model, x)
            timings: dict[str, Timing] = measure(contenders, warmup, min_reps, max_reps, budget)
            row: dict[str, Any] = {"accessed": count, "reps": timings["ndif"].wall.reps}
            for name in models:
                row[f"{name}_us_per_access"] = (
                    paired_difference(timings[name].cpu, timings[f"{name} trivial"].cpu) / count
                )
            row["ratio"] = row["ndif_us_per_access"] / row["nnsight_us_per_access"]
            rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'modules accessed':>16}  {'ndif µs/access':>14}  {'nnsight µs/access':>17}  {'ndif/nnsight':>12}")
    for row in rows:
        print(
            f"{row['accessed']:>16}  {row['ndif_us_per_access']:>14.2f}  "
            f"{row['nnsight_us_per_access']:>17.2f}  {row['ratio']:>12.2f}"
        )
