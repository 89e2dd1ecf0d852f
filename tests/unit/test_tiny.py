"""The tiny-model factory: deterministic, offline, loadable by ndif and transformers."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ndif
from ndif_sdk.cli import app


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_arguments_give_the_same_weights(tmp_path, arch):
    first = ndif.make_tiny(tmp_path / "a", arch=arch, layers=2, hidden=32)
    second = ndif.make_tiny(tmp_path / "b", arch=arch, layers=2, hidden=32)
    other = ndif.make_tiny(tmp_path / "c", arch=arch, layers=2, hidden=32, seed=1)
    weights, again, different = (load_file(p / "model.safetensors") for p in (first, second, other))
    assert weights.keys() == again.keys()
    for name in weights:
        assert torch.equal(weights[name], again[name]), name
    assert any(not torch.equal(weights[name], different[name]) for name in weights)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_make_tiny_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ndif.make_tiny(tmp_path / "m", layers=1, hidden=16)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_round_trips_and_prepends_bos(tiny_llama_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tokenizer("The Eiffel Tower is in Paris")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The Eiffel Tower is in Paris"


def test_cli_make_tiny_writes_a_loadable_model(tmp_path):
    result = CliRunner().invoke(app, ["models", "make-tiny", str(tmp_path / "g"), "--arch", "gpt2", "--layers", "2"])
    assert result.exit_code == 0, result.output
    model = ndif.LanguageModel(tmp_path / "g")
    assert len(model.transformer.h) == 2
    with model.trace("Hello world"):
        logits = model.lm_head.output.save()
    assert logits.shape[-1] == model.config.vocab_size


def test_cli_rejects_an_unknown_architecture(tmp_path):
    result = CliRunner().invoke(app, ["models", "make-tiny", str(tmp_path / "x"), "--arch", "mamba"])
    assert result.exit_code != 0
    assert "llama" in result.output


def test_loads_with_the_hub_unreachable(tiny_llama_path):
    code = (
        f"import ndif, sys;m = ndif.LanguageModel({str(tiny_llama_path)!r}, dispatch=True);print(m.config.model_type)"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "llama"
