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
        "vllm.utils": types.ModuleType("vllm.utils"),
        "vllm.utils.torch_utils": types.SimpleNamespace(weak_ref_tensor=lambda tensor: tensor),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return context


FULL_256 = BatchExecutionDescriptor(CUDAGraphMode.FULL, 256, 256, uniform_token_count=1)
PIECEWISE_256 = BatchExecutionDescriptor(CUDAGraphMode.PIECEWISE, 256, None)


class Manager:
    """The V2 runner's cudagraph manager as FULL_AND_PIECEWISE sets it up for one size: a
    FULL graph for uniform decode batches first, then the PIECEWISE graph. ``captured``: the
    FULL graph was captured (vLLM's `graphs`, replayed by `run_fullgraph`), and can be again."""

    def __init__(self, captured: bool = False):
        self._candidates = {(n, 0): [FULL_256, PIECEWISE_256] for n in range(200, 257)}
        self._capture_descs = {CUDAGraphMode.PIECEWISE: [PIECEWISE_256]}
        self.graphs = {}
        self.pool = "the pool"
        if captured:
            self._capture_descs[CUDAGraphMode.FULL] = [FULL_256]
            self.graphs[FULL_256] = Graph("vllm")

    def dispatch(self, num_reqs, num_tokens, uniform, num_active_loras=0):
        for desc in self._candidates.get((num_tokens, num_active_loras), ()):
            if desc.uniform_token_count in (None, uniform) and (desc.num_reqs or num_reqs) >= num_reqs:
                return desc
        return BatchExecutionDescriptor(CUDAGraphMode.NONE, num_tokens, num_reqs)

    def run_fullgraph(self, desc):
        assert desc in self.graphs, desc
        self.graphs[desc].replay()
        return desc


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


class Graph:
    """A CUDA graph stand-in: what was done to it goes to `LOG`."""

    LOG: list = []

    def __init__(self, name="segment"):
        self.name = name

    def capture_begin(self, pool=None, capture_error_mode="global"):
        Graph.LOG.append(("begin", pool))

    def capture_end(self):
        Graph.LOG.append(("end",))

    def replay(self):
        Graph.LOG.append(("replay", self.name))


class CapturingRunner(FakeRunner):
    """`FakeRunner` with ``capture_model`` as vLLM's: a forward of each FULL size inside
    ``torch.cuda.graph(graph, pool)``, the graph kept in the manager's ``graphs``."""

    def capture_model(self):
        import torch

        manager = self.cudagraph_manager
        for desc in manager._capture_descs.get(CUDAGraphMode.FULL, []):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, manager.pool):
                self.model(torch.arange(desc.num_tokens) % 50, torch.arange(desc.num_tokens))
            manager.graphs[desc] = graph


def test_decode_steps_on_taps_replay_full_graphs_broken_at_the_taps(fake_vllm_modules, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    model = ToyForCausalLM()
    points = taps.add_taps(model)  # three layers and the norm
    runner = CapturingRunner(model)
    runner.cudagraph_manager = manager = Manager(captured=True)
    runner.req_states = {}
    real_graph = torch.cuda.graph
    Graph.LOG.clear()
    served = []
    for module in points:
        taps.connect(module, lambda module, values, kind: served.append((module, values[0].shape[0], kind)))

    hooks = install(runner)  # captures the FULL size again, cut at the taps

    assert served == []  # taps met while capturing end segments; they serve no one
    assert Graph.LOG == [("begin", "the pool"), ("end",)] * 5  # one segment per layer, and the norm's
    assert set(hooks.segments) == {FULL_256} and hooks.segments[FULL_256].taps == 4
    assert manager.graphs == {FULL_256: manager.graphs[FULL_256]} and manager.graphs[FULL_256].name == "vllm"
    assert set(manager._capture_descs) == {CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL}  # as vLLM left them
    assert torch.cuda.graph is real_graph
    taps.tap([torch.zeros(2)], points[0].ndif_tap, taps.TENSOR)
    assert len(served) == 1  # after the capture, taps reach their handlers again
    served.clear()

    hooks.mode, hooks.eager = StepMode.TAPS, False
    assert manager.dispatch(240, 240, 1) is FULL_256  # a decode step on taps keeps its FULL size
    Graph.LOG.clear()
    manager.run_fullgraph(FULL_256)
    assert Graph.LOG == [("replay", "segment")] * 5  # the segments, with the taps served between them
    assert [(module, kind) for module, _, kind in served] == [(p, taps.TUPLE) for p in points[:3]] + [
        (points[3], taps.TENSOR)
    ]
    assert {rows for _, rows, _ in served} == {256}  # on the tensors the capture saw

    hooks.mode = StepMode.GRAPHS
    Graph.LOG.clear()
    manager.run_fullgraph(FULL_256)
    assert Graph.LOG == [("replay", "vllm")]  # a step without blocks waiting replays vLLM's own graph
    assert hooks.modes == {"FULL-TAPS": 1}


def test_a_failed_capture_leaves_the_taps_on_piecewise_graphs(fake_vllm_modules, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    model = ToyForCausalLM()
    points = taps.add_taps(model)
    runner = CapturingRunner(model)
    runner.cudagraph_manager = manager = Manager(captured=True)
    runner.req_states = {}
    real_graph = torch.cuda.graph
    served = []
    taps.connect(points[0], lambda module, values, kind: served.append(module))

    def out_of_memory(self, *args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ToyForCausalLM, "forward", out_of_memory)  # fails inside the capture
    hooks = install(runner)
    assert hooks.segments == {} and torch.cuda.graph is real_graph
    assert manager.graphs[FULL_256].name == "vllm"
    hooks.mode, hooks.eager = StepMode.TAPS, False
    assert manager.dispatch(240, 240, 1).cg_mode is CUDAGraphMode.PIECEWISE
    taps.tap([torch.zeros(2)], points[0].ndif_tap, taps.TENSOR)
    assert served == [points[0]]  # no capture is left intercepting the taps


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
