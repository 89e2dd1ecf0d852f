"""ndif's hooks into vLLM's dispatcher and model loading, against stand-ins of the few vLLM
0.26 names they use (`CUDAGraphMode`, `BatchExecutionDescriptor`, the V2 runner's
``cudagraph_manager`` with its ``_candidates``, ``GPUModelRunner.load_model`` and
``CompilationConfig._attention_ops``), shaped as vLLM's source has them. The GPU suite runs
the same code on a real engine; this catches a wrong name or a wrong branch before then."""

from __future__ import annotations

import enum
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from fake_vllm import FakeRunner, ToyForCausalLM

from ndif.engine.serving import StepMode
from ndif.models.vllm import taps
from ndif.models.vllm.runner import install


class CUDAGraphMode(enum.Enum):
    NONE = 0
    PIECEWISE = 1
    FULL = 2


@dataclass(frozen=True)
class BatchExecutionDescriptor:
    cg_mode: CUDAGraphMode
    num_tokens: int
    num_reqs: int | None
    uniform_token_count: int | None = None
    num_active_loras: int = 0


class CompilationConfig:
    _attention_ops = ["vllm::unified_attention_with_output", "vllm::unified_mla_attention_with_output"]


class GPUModelRunner:
    def __init__(self, splitting_ops):
        self.vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(splitting_ops=splitting_ops))
        self.model = None

    def load_model(self, load_dummy_weights=False):
        self.model = ToyForCausalLM()


@pytest.fixture
def fake_vllm_modules(monkeypatch):
    """vLLM's modules that ndif imports, as stand-ins."""
    context = SimpleNamespace(skip_compiled=False)
    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.config": types.SimpleNamespace(CUDAGraphMode=CUDAGraphMode, CompilationConfig=CompilationConfig),
        "vllm.forward_context": types.SimpleNamespace(
            get_forward_context=lambda: context, is_forward_context_available=lambda: True
        ),
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.worker": types.ModuleType("vllm.v1.worker"),
        "vllm.v1.worker.gpu": types.ModuleType("vllm.v1.worker.gpu"),
        "vllm.v1.worker.gpu.cudagraph_utils": types.SimpleNamespace(BatchExecutionDescriptor=BatchExecutionDescriptor),
        "vllm.v1.worker.gpu.model_runner": types.SimpleNamespace(GPUModelRunner=GPUModelRunner),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return context


class Manager:
    """The V2 runner's cudagraph manager as FULL_AND_PIECEWISE sets it up for one size: a
    FULL graph for uniform decode batches first, then the PIECEWISE graph."""

    def __init__(self):
        full = BatchExecutionDescriptor(CUDAGraphMode.FULL, 256, 256, uniform_token_count=1)
        piecewise = BatchExecutionDescriptor(CUDAGraphMode.PIECEWISE, 256, None)
        self._candidates = {(n, 0): [full, piecewise] for n in range(200, 257)}

    def dispatch(self, num_reqs, num_tokens, uniform, num_active_loras=0):
        for desc in self._candidates.get((num_tokens, num_active_loras), ()):
            if desc.uniform_token_count in (None, uniform) and (desc.num_reqs or num_reqs) >= num_reqs:
                return desc
        return BatchExecutionDescriptor(CUDAGraphMode.NONE, num_tokens, num_reqs)


def test_each_step_mode_gets_its_graphs(fake_vllm_modules):
    model = ToyForCausalLM()
    taps.add_taps(model)
    runner = FakeRunner(model)
    runner.cudagraph_manager = Manager()
    runner.req_states = {}
    hooks = install(runner)
    dispatch = runner.cudagraph_manager.dispatch

    hooks.mode, hooks.eager = StepMode.GRAPHS, False
    assert dispatch(240, 240, 1).cg_mode is CUDAGraphMode.FULL  # vLLM's own choice
    hooks.mode = StepMode.TAPS
    chosen = dispatch(240, 240, 1)
    assert chosen.cg_mode is CUDAGraphMode.PIECEWISE and chosen.num_tokens == 256  # taps run between pieces
    assert dispatch(600, 600, 1).cg_mode is CUDAGraphMode.NONE  # no graph this big: compiled code, taps too
    assert dispatch(240, 250, None).cg_mode is CUDAGraphMode.PIECEWISE  # a mixed batch was PIECEWISE anyway
    hooks.mode, hooks.eager = StepMode.EAGER, True
    assert dispatch(240, 240, 1).cg_mode is CUDAGraphMode.NONE
    assert hooks.modes == {"FULL": 1, "PIECEWISE": 2, "NONE": 2}

    runner.model(*_inputs())  # the pre-hook: only an eager step skips the compiled model
    assert fake_vllm_modules.skip_compiled is True
    fake_vllm_modules.skip_compiled = False
    hooks.eager = False
    runner.model(*_inputs())
    assert fake_vllm_modules.skip_compiled is False


def _inputs():
    import torch

    return torch.tensor([1, 2]), torch.arange(2)


def test_loading_adds_taps_only_when_the_graphs_split_at_them(fake_vllm_modules, monkeypatch):
    monkeypatch.setattr(GPUModelRunner, "load_model", GPUModelRunner.load_model)  # undone after the test
    taps.patch_model_loading()
    taps.patch_model_loading()  # once is enough: a second call does not wrap it again
    assert getattr(GPUModelRunner.load_model, "ndif_taps", False)
    with_taps = GPUModelRunner(taps.splitting_ops())
    with_taps.load_model()
    assert [getattr(m, "ndif_tap", None) is not None for m in with_taps.model.model.layers] == [True] * 3
    assert getattr(with_taps.model.model.norm, "ndif_tap", None) is not None
    without = GPUModelRunner(CompilationConfig._attention_ops)
    without.load_model()
    assert taps.tapped_modules(without.model) == []


def test_the_splitting_ops_keep_vllms_own(fake_vllm_modules):
    ops = taps.splitting_ops()
    assert ops[: len(CompilationConfig._attention_ops)] == CompilationConfig._attention_ops
    assert "vllm::unified_kv_cache_update" in ops and ops[-1] == taps.TAP_OP
    asked = taps.with_taps({"gpu_memory_utilization": 0.5, "compilation_config": {"mode": 3}})
    assert asked["compilation_config"] == {"mode": 3, "splitting_ops": ops}
