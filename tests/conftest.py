"""Shared fixtures: tiny random-weight models built locally (never from a hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import ndif  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread: deterministic CPU kernels, and fast ones on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def module_at(root, path: str):
    """Walk a dotted path on an envoy or a torch module (digits index lists)."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer, 64-wide random Llama with a locally trained tokenizer."""
    return ndif.make_tiny(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer, 64-wide random GPT-2 with a locally trained tokenizer."""
    return ndif.make_tiny(tmp_path_factory.mktemp("models") / "gpt2", arch="gpt2")


@pytest.fixture(scope="session")
def llama(tiny_llama_path) -> ndif.LanguageModel:
    """The tiny Llama wrapped by ndif, weights loaded. Shared: tests must not leave edits on it."""
    return ndif.LanguageModel(tiny_llama_path, dispatch=True)


@pytest.fixture
def grad_llama(llama):
    """The shared ``llama``, with parameter gradients cleared before and after the test."""

    def clear():
        for parameter in llama.parameters():
            parameter.grad = None

    clear()
    try:
        yield llama
    finally:
        clear()


@pytest.fixture(scope="session")
def gpt2(tiny_gpt2_path) -> ndif.LanguageModel:
    return ndif.LanguageModel(tiny_gpt2_path, dispatch=True)


@pytest.fixture
def reference_llama(tiny_llama_path):
    """The same checkpoint loaded plainly by transformers, for independently computed expectations."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()


@pytest.fixture
def reference_gpt2(tiny_gpt2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()


@pytest.fixture
def mlp() -> torch.nn.Sequential:
    """A small deterministic MLP for tests that need no language model."""
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return net


@pytest.fixture
def sessions(tmp_path):
    """A session factory on a fresh SQLite job store, made by the Alembic migrations."""
    from ndif_scheduler.db import create_engine, migrate, session_factory

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url)
    engine = create_engine(url)
    yield session_factory(engine)
    engine.dispose()
