"""Concurrent chat users on one vLLM engine (GPU machines only; skipped without CUDA and vLLM).

Eight users, each with their own steering, chat at once through the worker's chat code
(`ndif_workers.chat.run_chat`, as a model actor runs it) on one `ndif.VLLM` engine: each
reply equals the same user's reply alone, the steering ran on the engine's taps, and the
tokens/s per user and overall are printed (and written to ``$NDIF_GPU_OUT/chat.json``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm")

import ndif  # noqa: E402
from ndif import interp  # noqa: E402
from ndif_workers.chat import Artifacts, run_chat  # noqa: E402

HIDDEN = 256
USERS = 8
TOKENS = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    path = ndif.make_tiny(root / "model", layers=4, hidden=HIDDEN, vocab_size=512)
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    # A random model's logits are nearly tied: spread them (as test_vllm_backend.py does), so
    # that greedy tokens alone and in a mixed batch do not hinge on a bf16 rounding.
    weights["lm_head.weight"] = weights["lm_head.weight"] * 40
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    folder = root / "artifacts"
    folder.mkdir()
    interp.save_vector(
        interp.SteeringVector(torch.randn(HIDDEN, generator=generator), layer=1), folder / "joy.safetensors"
    )
    interp.save_probe(
        interp.LinearProbe(torch.randn(HIDDEN, generator=generator), layer=2), folder / "mood.safetensors"
    )
    engine = ndif.VLLM(str(path), gpu_memory_utilization=0.25, max_model_len=512, dtype="bfloat16", seed=0)
    return engine, Artifacts(str(folder))


def reply(engine, artifacts, scale):
    payload = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me about the sea"}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ndif": {"steer": [{"vector": "joy", "scale": scale}], "observe": {"probes": [{"probe": "mood"}]}},
    }
    chunks = []
    started = time.perf_counter()
    result = run_chat(engine, payload, artifacts, chunks.append)
    return result, chunks, time.perf_counter() - started


def test_concurrent_chat_users_each_see_only_their_own_steering(setup):
    engine, artifacts = setup
    scales = [0.0, 2.0, -2.0, 4.0, -4.0, 1.0, 8.0, -8.0][:USERS]
    alone = [reply(engine, artifacts, scale) for scale in scales]
    counts = dict(engine.step_counts)
    together: list = [None] * USERS

    def user(n):
        together[n] = reply(engine, artifacts, scales[n])

    threads = [threading.Thread(target=user, args=(n,)) for n in range(USERS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    wall = time.perf_counter() - started
    for (mine, _, _), (theirs, chunks, _) in zip(alone, together):
        assert mine["tokens"] == theirs["tokens"]
        assert [chunk["token"] for chunk in chunks] == theirs["tokens"]
        for a, b in zip(mine["steps"], theirs["steps"]):
            assert a["observations"]["mood"] == pytest.approx(b["observations"]["mood"], abs=2e-2)
    assert len({tuple(r[0]["tokens"]) for r in alone}) > 1  # the scales did steer
    after = engine.step_counts
    assert after["taps"] > counts["taps"] and after["eager"] == counts["eager"]  # steering ran on taps
    per_user = [len(r[0]["tokens"]) / r[2] for r in together]
    total = sum(len(r[0]["tokens"]) for r in together) / wall
    report = {
        "card": torch.cuda.get_device_name(0),
        "users": USERS,
        "tokens_each": TOKENS,
        "per_user_tok_s": per_user,
        "overall_tok_s": total,
        "alone_tok_s": [len(r[0]["tokens"]) / r[2] for r in alone],
        "steps": {key: after[key] - counts[key] for key in after},
    }
    print("chat users:", json.dumps(report))
    out = os.environ.get("NDIF_GPU_OUT")
    if out:
        Path(out, "chat.json").write_text(json.dumps(report, indent=2))
