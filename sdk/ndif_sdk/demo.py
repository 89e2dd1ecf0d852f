"""``ndif demo``: the tracing API end to end on a tiny local model.

Builds a tiny random-weight Llama (no hub access), then runs the things
researchers do every day: save activations, zero an MLP output, patch an
activation from one prompt into another, steer generation at every step, and read
the logit lens. Each section prints what it measured.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import ndif

console = Console()


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(directory: Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(directory or scratch) / "tiny-llama"
        _section("Building a tiny random-weight Llama (local tokenizer, no hub)")
        ndif.make_tiny(path, arch="llama", layers=4, hidden=64)
        model = ndif.LanguageModel(path, dtype=torch.float32)
        console.print(f"model at {path}; weights loaded: {model.dispatched} (lazy until the first trace)")
        _demo(model)


def _demo(model: ndif.LanguageModel) -> None:
    prompt = "The Eiffel Tower is in"
    layers = model.model.layers

    _section("1. Save every layer's output")
    with model.trace(prompt):
        norms = ndif.save([layer.output[0, -1].norm().item() for layer in layers])
        logits = model.lm_head.output.save()
    table = Table("layer", "‖h[-1]‖")
    for index, norm in enumerate(norms):
        table.add_row(str(index), f"{norm:.4f}")
    console.print(table)
    console.print(f"logits shape {tuple(logits.shape)}; top token {model.tokenizer.decode(logits[0, -1].argmax())!r}")

    _section("2. Zero layer 2's MLP output at the last position")
    with model.trace(prompt):
        model.model.layers[2].mlp.output[:, -1] = 0
        edited = model.lm_head.output.save()
    change = (edited[0, -1] - logits[0, -1]).abs().max().item()
    console.print(f"largest change in the last position's logits: {change:.4f}")

    _section("3. Activation patching between two prompts (one batched forward)")
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke("The Colosseum is in"):
            source = model.model.layers[1].output[:, -1]
            barrier()
        with tracer.invoke(prompt):
            barrier()
            model.model.layers[1].output[:, -1] = source
            patched = model.lm_head.output[:, -1].save()
    token = int(patched[0].argmax())
    console.print(f"patched prediction: token {token} ({model.tokenizer.decode(token)!r})")

    _section("4. Steering every generated token")
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    with model.generate(prompt, max_new_tokens=6, do_sample=False) as tracer:
        for _ in tracer.all():
            model.model.layers[1].output[:] += steer
        steered = tracer.result.save()
    with model.generate(prompt, max_new_tokens=6, do_sample=False) as tracer:
        plain = tracer.result.save()
    console.print(f"plain:   {model.tokenizer.decode(plain[0])!r}")
    console.print(f"steered: {model.tokenizer.decode(steered[0])!r}")

    _section("5. Logit lens")
    with model.trace(prompt):
        lens = ndif.save([])
        for layer in model.model.layers:
            lens.append(model.lm_head(model.model.norm(layer.output[0, -1])).argmax().item())
    table = Table("layer", "top token at the last position")
    for index, token in enumerate(lens):
        table.add_row(str(index), repr(model.tokenizer.decode(token)))
    console.print(table)
    console.print("[green]demo complete")
