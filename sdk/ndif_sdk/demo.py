"""``ndif demo``: the tracing API and the service, end to end, on a tiny model.

Builds a tiny random-weight Llama (no hub access), then runs the things
researchers do every day: save activations, zero an MLP output, patch an
activation from one prompt into another, steer generation at every step, and read
the logit lens. Then it starts the embedded service stack (API, dispatchers, a Ray
model actor; SQLite, a local object store) serving the same model, and runs a
blocking remote trace, a non-blocking one and a small batch experiment against it,
and stops the stack. Each section prints what it measured.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import ndif

console = Console()


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def run_demo(directory: Path | None = None, service: bool = True, playground: bool = False) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(directory or scratch)
        path = root / "tiny-llama"
        _section("Building a tiny random-weight Llama (local tokenizer, no hub)")
        ndif.make_tiny(path, arch="llama", layers=4, hidden=64)
        model = ndif.LanguageModel(path, dtype=torch.float32)
        console.print(f"model at {path}; weights loaded: {model.dispatched} (lazy until the first trace)")
        _demo(model)
        if service:
            _service_demo(model, path.resolve(), root / "stack", playground)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service_demo(model: ndif.LanguageModel, path: Path, state: Path, playground: bool = False) -> None:
    from .backend import RemoteBackend
    from .batch import Batch
    from .client import Client
    from .launcher import background_stack

    _section("6. Starting the embedded service stack (API, dispatchers, Ray model actor)")
    state.mkdir(parents=True, exist_ok=True)
    registry = state / "models.toml"
    # One torch thread on both sides, so float sums run in the same order and the
    # remote values can be compared bit for bit with the local ones.
    artifacts = _artifacts(model, state / "artifacts")
    registry.write_text(
        f'[[deployments]]\nkey = "tiny-llama"\npath = "{path}"\ntorch_threads = 1\nartifacts = "{artifacts}"\n'
    )
    torch.set_num_threads(1)
    started = time.perf_counter()
    with background_stack(state, registry, _free_port()) as (url, key):
        console.print(f"up at {url} in {time.perf_counter() - started:.1f} s (logs in {state / 'logs'})")
        client = Client(url, key)
        remote = RemoteBackend(client)
        prompt = "The Eiffel Tower is in"

        _section("7. A blocking remote trace: the same values as a local one")
        with model.trace(prompt, remote=remote) as tracer:
            hidden = model.model.layers[2].output.save()
            logits = model.lm_head.output.save()
        with model.trace(prompt):
            local = model.lm_head.output.save()
        job = tracer.job
        difference = (logits - local).abs().max().item()
        console.print(
            f"job {job.id[:12]} {job.info['status']}; hidden {tuple(hidden.shape)}; "
            f"max |remote - local| over the logits: {difference:g} (bitwise equal: {torch.equal(logits, local)})"
        )

        _section("8. A non-blocking remote trace: submit, poll, fetch")
        with model.trace("The Colosseum is in", remote=remote, blocking=False) as tracer:
            top = model.lm_head.output[0, -1].argmax().save()
        job = tracer.job
        console.print(f"submitted job {job.id[:12]}: {job.status()}")
        console.print(f"waited: {job.wait(timeout=120, progress=False)}")
        token = int(job.result()["top"])
        console.print(f"top next token: {token} ({model.tokenizer.decode(token)!r})")

        _section("9. A batch experiment: one submission, followed and fetched by id")
        prompts = ["Paris is the capital of", "Rome is the capital of", "Berlin is the capital of"]
        scales = [0.0, 4.0]
        steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        with Batch("demo sweep", client=client) as batch:
            for text in prompts:
                for scale in scales:
                    with model.trace(text, remote=batch):
                        model.model.layers[1].output[:, -1] += scale * steer
                        top = model.lm_head.output[0, -1].argmax().save()  # noqa: F841 (bound by each result)
        console.print(f"batch {batch.id[:12]}: {len(batch)} traces")
        counts = batch.wait(timeout=300, progress=False)
        console.print(f"finished: {counts}")
        table = Table("prompt", "steering scale", "top next token")
        for index, result in enumerate(batch.results()):
            text, scale = prompts[index // len(scales)], scales[index % len(scales)]
            table.add_row(text, f"{scale:g}", repr(model.tokenizer.decode(int(result["top"]))))
        console.print(table)

        _chat_demo(url, key)
        client.close()
        if playground:
            import webbrowser

            page = f"{url}/playground#key={key}&model=tiny-llama"
            console.print(f"the playground is at [bold]{page}[/bold]; Ctrl-C stops the stack")
            webbrowser.open(page)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    console.print("stack stopped")


def _artifacts(model: ndif.LanguageModel, folder: Path) -> Path:
    """A steering vector from contrastive prompts and a probe along it, for the chat API."""
    from ndif import interp

    folder.mkdir(parents=True, exist_ok=True)
    vector = interp.contrast_vector(
        model, ["I love this", "What a joy", "Wonderful day"], ["I hate this", "What a pain", "Awful day"], layer=1
    )
    interp.save_vector(vector, folder / "joy.safetensors")
    probe = interp.LinearProbe(vector.unit().vector, 0.0, layer=2, labels=["joy"])
    interp.save_probe(probe, folder / "joy-probe.safetensors")
    return folder.resolve()


def _chat_demo(url: str, key: str) -> None:
    """OpenAI's chat API with ndif's extension: a plain reply and a steered one, with the
    probe's score per token."""
    import httpx

    _section("10. The chat API: steering and a probe per token (OpenAI-compatible)")
    table = Table("steering", "reply", "probe per token")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        for scale in (0.0, 8.0):
            body = {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "How was your day?"}],
                "max_tokens": 8,
                "temperature": 0,
                "ndif": {"steer": [{"vector": "joy", "scale": scale}], "observe": {"probes": [{"probe": "joy-probe"}]}},
            }
            reply = http.post("/v1/chat/completions", json=body)
            reply.raise_for_status()
            data = reply.json()
            scores = " ".join(f"{step['observations']['joy-probe']:.2f}" for step in data["ndif"]["steps"])
            table.add_row(f"joy x {scale:g}", repr(data["choices"][0]["message"]["content"]), scores)
    console.print(table)


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
    console.print("[green]local tracing demo complete")
