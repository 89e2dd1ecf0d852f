"""The vLLM backend on a real engine (GPU machines only; skipped without CUDA and vLLM).

One tiny random Llama checkpoint (one set of safetensors, written by `ndif.make_tiny`)
runs through `ndif.LanguageModel` (transformers) and `ndif.VLLM`; concurrent jobs run in
one engine's continuous batches. Run by ``tests/gpu/run_vllm.sh`` with the benchmark.
"""

from __future__ import annotations

import threading
import traceback

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm")

import ndif  # noqa: E402
from ndif.remote import local_backend  # noqa: E402
from ndif.sandbox import JobLimits  # noqa: E402

LAYERS = 4
HIDDEN = 256
ENGINE = {"gpu_memory_utilization": 0.25, "max_model_len": 512, "dtype": "bfloat16", "seed": 0}
TOLERANCE = 1e-2  # relative error (norm of the difference over the norm): bf16, different batch shapes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    path = ndif.make_tiny(tmp_path_factory.mktemp("tiny-llama"), layers=LAYERS, hidden=HIDDEN, vocab_size=512)
    weights = load_file(path / "model.safetensors")
    # A random model's logits are nearly tied; spread them so greedy tokens do not hinge
    # on the last bit of a bf16 kernel.
    weights["lm_head.weight"] = weights["lm_head.weight"] * 40
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    return ndif.VLLM(str(checkpoint), **ENGINE)


@pytest.fixture(scope="module")
def prompts(engine):
    texts = ["The Eiffel Tower is in", "Residual streams carry", "def add(a, b): return", "Attention heads"]
    return [engine.tokenizer.encode(text) for text in texts] + [list(range(5, 60))]


def generate_saving(model, prompt, steps=6, steer=None, fail_at=None, limits=None, eager=False):
    """A job reading layer 2's output (and steering layer 1's) at every step: served on the
    graphs' taps, or, with ``eager``, eagerly (`_generate_saving_eagerly`)."""
    if eager:
        return _generate_saving_eagerly(model, prompt, steps, steer)
    remote = None if limits is None else local_backend(model, limits)
    spin_at = None if limits is None else 2
    with model.generate(prompt, max_tokens=steps, temperature=0.0, remote=remote) as tracer:
        hidden = ndif.save([])
        for step in tracer.iter[:steps]:
            if steer is not None:
                model.model.layers[1].output[0][:] += steer
            out = model.model.layers[2].output
            hidden.append(out[0] + out[1])  # vLLM's layer output is (hidden, residual)
            if fail_at == step:
                hidden.append(1 / 0)
            if spin_at == step:
                spin = 0
                while spin >= 0:
                    spin += 1
        tokens = tracer.result.save()
    return [h.float().cpu() for h in hidden], tokens


def _generate_saving_eagerly(model, prompt, steps, steer):
    """`generate_saving`'s job, by code that also reads an MLP (which has no tap): a job
    whose code names an untapped module has its steps run eagerly."""
    with model.generate(prompt, max_tokens=steps, temperature=0.0) as tracer:
        hidden = ndif.save([])
        for step in tracer.iter[:steps]:
            if steer is not None:
                model.model.layers[1].output[0][:] += steer
            model.model.layers[2].mlp.output.save()
            out = model.model.layers[2].output
            hidden.append(out[0] + out[1])
        tokens = tracer.result.save()
    return [h.float().cpu() for h in hidden], tokens


def together(jobs):
    results = [None] * len(jobs)

    def target(number, job):
        try:
            results[number] = job()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            results[number] = error

    threads = [threading.Thread(target=target, args=(n, job)) for n, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


def close(first, second, tolerance=TOLERANCE):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.shape == b.shape
        assert relative_error(a, b) < tolerance, relative_error(a, b)


def test_transformers_and_vllm_agree_on_one_checkpoint(checkpoint, engine, prompts):
    hf = ndif.LanguageModel(str(checkpoint), dtype=torch.bfloat16, device_map="cuda", dispatch=True)
    steer = torch.full((HIDDEN,), 0.5, dtype=torch.bfloat16, device="cuda")
    for prompt in prompts[:3]:
        ids = torch.tensor([prompt], device="cuda")
        for edit in (None, steer):
            with hf.generate(ids, max_new_tokens=4, do_sample=False) as tracer:
                for step in tracer.iter[:4]:
                    if edit is not None:
                        output = hf.model.layers[1].output
                        (output[0] if isinstance(output, tuple) else output)[:] += edit
                    output = hf.model.layers[2].output
                    if step == 0:
                        expected = (output[0] if isinstance(output, tuple) else output)[0].float().cpu().save()
                sequences = tracer.result.save()
            hidden, tokens = generate_saving(engine, prompt, steps=4, steer=edit)
            assert relative_error(hidden[0], expected) < 3 * TOLERANCE, relative_error(hidden[0], expected)
            assert tokens == sequences[0, len(prompt) :].tolist(), (prompt, edit is not None)


def test_each_job_sees_only_its_own_tokens_in_a_mixed_batch(engine, prompts):
    alone = [generate_saving(engine, prompt) for prompt in prompts]
    plain = [lambda p=p: engine.generate(p, max_tokens=12, temperature=0.0, trace=False) for p in prompts]
    mixed = together([lambda p=p: generate_saving(engine, p) for p in prompts] + plain)
    for (hidden, tokens), result, prompt in zip(alone, mixed, prompts):
        assert not isinstance(result, BaseException), result
        assert [h.shape[0] for h in result[0]] == [len(prompt)] + [1] * 5
        close(hidden, result[0])
        assert tokens == result[1]


def test_an_edit_touches_only_its_own_request(engine, prompts):
    steer = torch.full((HIDDEN,), 2.0, dtype=torch.bfloat16, device="cuda")
    steered = generate_saving(engine, prompts[0], steer=steer)
    others = [generate_saving(engine, prompt) for prompt in prompts[1:]]
    mixed = together(
        [lambda: generate_saving(engine, prompts[0], steer=steer)]
        + [lambda p=p: generate_saving(engine, p) for p in prompts[1:]]
    )
    close(steered[0], mixed[0][0])
    for alone, result in zip(others, mixed[1:]):
        close(alone[0], result[0])
        assert alone[1] == result[1]
    assert not torch.allclose(steered[0][-1], generate_saving(engine, prompts[0])[0][-1])


def test_logits_and_samples_at_every_step(engine, prompts):
    with engine.generate(prompts[1], max_tokens=4, temperature=0.0) as tracer:
        shapes = ndif.save([])
        for step in tracer.iter[:4]:
            shapes.append(tuple(engine.logits.output.shape))
            engine.samples.output = torch.tensor([100 + step], device="cuda")
        tokens = tracer.result.save()
    assert tokens == [100, 101, 102, 103]
    assert shapes[0][0] == 1 and len(shapes) == 4


def test_failures_end_their_own_job_only(engine, prompts):
    others = [generate_saving(engine, prompt) for prompt in prompts[2:]]
    raising = lambda: generate_saving(engine, prompts[0], fail_at=2)  # noqa: E731
    slow = lambda: generate_saving(engine, prompts[1], limits=JobLimits(time_s=1.0))  # noqa: E731
    mixed = together([raising, slow] + [lambda p=p: generate_saving(engine, p) for p in prompts[2:]])
    assert isinstance(mixed[0], ZeroDivisionError)
    assert any(frame.line == "hidden.append(1 / 0)" for frame in traceback.extract_tb(mixed[0].__traceback__))
    assert type(mixed[1]).__name__ == "TimeLimitExceeded", mixed[1]
    for alone, result in zip(others, mixed[2:]):
        close(alone[0], result[0])
        assert alone[1] == result[1]
    assert not engine._hooks.run.jobs
    assert generate_saving(engine, prompts[0])[1] == generate_saving(engine, prompts[0])[1]


@pytest.mark.parametrize("site", ["layer", "mlp"])
def test_plain_steps_stay_on_graphs(engine, prompts, site):
    before, modes = dict(engine.step_counts), dict(engine._hooks.modes)
    # Two bodies: a job's code that names an MLP anywhere runs eagerly (names decide taps).
    if site == "layer":
        with engine.generate(prompts[0], max_tokens=16, temperature=0.0) as tracer:
            for step in tracer.iter[[0, 8]]:
                engine.model.layers[0].output[0].save()
    else:
        with engine.generate(prompts[0], max_tokens=16, temperature=0.0) as tracer:
            for step in tracer.iter[[0, 8]]:
                engine.model.layers[0].mlp.output.save()
    after = engine.step_counts
    ran = {mode: count - modes.get(mode, 0) for mode, count in engine._hooks.modes.items()}
    assert after["graph"] - before["graph"] == 7  # steps 1-7 stayed on vLLM's graphs
    assert ran.get("FULL", 0) >= 13, ran  # vLLM's own choice (FULL) for the decode steps without reads
    if site == "layer":  # steps 0 and 8 on taps: the prefill on PIECEWISE graphs, the decode
        # step on its FULL graph's copy broken at the taps (`segments`), served between them
        assert after["taps"] - before["taps"] == 2 and after["eager"] == before["eager"]
        assert not ran.get("NONE") and ran.get("PIECEWISE", 0) >= 1 and ran.get("FULL-TAPS") == 1, ran
    else:  # an MLP has no tap: steps 0 and 8 ran the model's Python
        assert after["eager"] - before["eager"] == 2 and after["taps"] == before["taps"]
        assert ran.get("NONE") == 2, ran
    tokens = engine.generate(prompts[0], max_tokens=16, temperature=0.0, trace=False)
    assert len(tokens) == 16


def test_taps_and_eager_steps_agree_and_mix(engine, prompts):
    steer = torch.full((HIDDEN,), 1.0, dtype=torch.bfloat16, device="cuda")
    for prompt in prompts[:3]:
        before, modes = dict(engine.step_counts), dict(engine._hooks.modes)
        on_taps = generate_saving(engine, prompt, steer=steer)
        middle = dict(engine.step_counts)
        ran = {mode: count - modes.get(mode, 0) for mode, count in engine._hooks.modes.items()}
        eager = generate_saving(engine, prompt, steer=steer, eager=True)
        after = engine.step_counts
        assert middle["taps"] - before["taps"] == 6 and middle["eager"] == before["eager"]
        # The prefill between PIECEWISE graphs, the five decode steps between FULL graph segments.
        assert ran.get("PIECEWISE") == 1 and ran.get("FULL-TAPS") == 5, ran
        assert after["eager"] - middle["eager"] == 6 and after["taps"] == middle["taps"]
        # Compiled code (Inductor's fused kernels) and eager kernels round differently in bf16.
        close(on_taps[0], eager[0], tolerance=3 * TOLERANCE)
        assert on_taps[1] == eager[1]
    alone = [generate_saving(engine, p, steer=steer, eager=n % 2 == 1) for n, p in enumerate(prompts)]
    mixed = together(
        [lambda p=p, n=n: generate_saving(engine, p, steer=steer, eager=n % 2 == 1) for n, p in enumerate(prompts)]
    )
    for (hidden, tokens), result in zip(alone, mixed):
        assert not isinstance(result, BaseException), result
        close(hidden, result[0], tolerance=3 * TOLERANCE)  # a step shared with an eager job runs eagerly
        assert tokens == result[1]


def test_chunked_prefill_keeps_requests_apart(checkpoint, prompts):
    import subprocess
    import sys

    # A second engine in its own process (this one's memory is held by the first).
    code = f"""
import torch, ndif, json
m = ndif.VLLM({str(checkpoint)!r}, enable_chunked_prefill=True, max_num_batched_tokens=32, **{ENGINE!r})
long = list(range(3, 120))
def run(p):
    with m.generate(p, max_tokens=4, temperature=0.0) as tracer:
        hs = ndif.save([])
        for step in tracer.iter[:4]:
            o = m.model.layers[2].output
            hs.append((o[0] + o[1]).float().cpu())
        t = tracer.result.save()
    return hs, t
alone_long, alone_short = run(long), run({prompts[1]!r})
import threading
res = {{}}
ts = [threading.Thread(target=lambda k=k, p=p: res.__setitem__(k, run(p))) for k, p in (("l", long), ("s", {prompts[1]!r}))]
[t.start() for t in ts]; [t.join() for t in ts]
def err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    e = ((a - b).norm() / b.norm()).item()
    assert e < {TOLERANCE}, e
first = res["l"][0][0]
assert first.shape[0] < len(long), first.shape  # served by a chunk, not the whole prompt
n = min(first.shape[0], alone_long[0][0].shape[0])
err(first[:n], alone_long[0][0][:n])
for a, b in zip(alone_long[0][1:], res["l"][0][1:]):
    err(b, a)
for a, b in zip(alone_short[0], res["s"][0]):
    err(b, a)
assert res["l"][1] == alone_long[1] and res["s"][1] == alone_short[1]
print("CHUNKED OK", first.shape[0])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
    assert "CHUNKED OK" in done.stdout, done.stdout[-3000:] + done.stderr[-6000:]
