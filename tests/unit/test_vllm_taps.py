"""Taps: layer outputs served from inside compiled code, so intervening steps keep graphs.

On CPU: the op inside a Dynamo-compiled toy (the graph vLLM would split), which names a
job's code reaches (`names_in`), and `ndif.VLLM` over the fake engine, where a step on
taps runs the model without ndif's module controllers, as a compiled step does.
"""

from __future__ import annotations

import pytest
import torch
from fake_vllm import FakeVLLM, ToyForCausalLM

import ndif
from ndif.models.vllm import taps
from ndif.tracer import _exec
from ndif.tracing.names import names_in

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2], [2, 7]]


# -- the op in compiled code ----------------------------------------------------------------


def _splits_at_tap(node: torch.fx.Node) -> bool:
    """vLLM's test for a splitting op (``vllm.compilation.partition_rules.should_split``)."""
    target = node.target
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name == taps.TAP_OP
    if isinstance(target, torch._ops.OpOverload):
        return target.name() == taps.TAP_OP or f"{target.name()}.{target._overloadname}" == taps.TAP_OP
    return False


def split_at_taps(graph_module, example_inputs):
    """A Dynamo backend shaped like vLLM's piecewise one: the graph is cut at every tap
    (`_splits_at_tap`, vLLM's test), each tap alone in its piece, the other pieces compiled
    (AOT autograd: functionalized) and run one after another; the taps' pieces run as they are."""
    from torch.fx.passes.split_module import split_module

    piece = 0
    pieces = {}
    for node in graph_module.graph.nodes:
        if _splits_at_tap(node):
            piece += 1
            pieces[node] = piece
            piece += 1
        else:
            pieces[node] = piece
    split = split_module(graph_module, None, lambda node: pieces[node], keep_original_order=True)
    taps_alone = 0
    for name, child in list(split.named_children()):
        if any(_splits_at_tap(node) for node in child.graph.nodes):
            taps_alone += 1
        else:
            setattr(split, name, _Piece(child))
    SPLITS.append(taps_alone)
    return split.forward


SPLITS: list[int] = []


class _Piece(torch.nn.Module):
    """A piece between taps, compiled by AOT autograd on its first call."""

    def __init__(self, child):
        super().__init__()
        self.child = child
        self.run = None

    def forward(self, *args):
        if self.run is None:
            from functorch.compile import make_boxed_func
            from torch._functorch.aot_autograd import aot_module_simplified

            output = next(node for node in self.child.graph.nodes if node.op == "output")
            single = not isinstance(output.args[0], (tuple, list))
            if single:  # AOT autograd wants a tuple out
                output.args = ((output.args[0],),)
                self.child.recompile()
            compiled = aot_module_simplified(
                self.child, list(args), fw_compiler=lambda gm, _: make_boxed_func(gm.forward)
            )
            self.run = (lambda *a: compiled(*a)[0]) if single else compiled
        return self.run(*args)


@pytest.mark.parametrize("backend", ["graph", "aot_eager", "split"])
def test_taps_run_inside_compiled_code_and_their_edits_reach_the_output(backend):
    torch.manual_seed(0)
    model = ToyForCausalLM().double().eval()
    points = taps.add_taps(model)
    assert points == [*model.model.layers, model.model.norm]
    served = []

    def serve(module, values, kind):
        served.append((module.ndif_tap, kind, len(values)))
        if module is model.model.layers[1]:
            values[0].add_(0.5)  # an in-place edit, as a block's edit is written back

    for module in points:
        taps.connect(module, serve)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    ids, positions = torch.tensor([1, 2, 3]), torch.arange(3)
    with torch.inference_mode():
        eager = model(ids, positions)
        assert len(served) == 4
        torch._dynamo.reset()
        chosen = {"graph": capture, "split": split_at_taps}.get(backend, backend)
        compiled = torch.compile(model.forward, backend=chosen, fullgraph=True)
        first, second = compiled(ids, positions), compiled(ids, positions)
    assert len(served) == 12  # the op's Python ran at every tap of every compiled call
    assert [kind for _, kind, _ in served[:4]] == [taps.TUPLE] * 3 + [taps.TENSOR]
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-12)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-12)
    untouched = ToyForCausalLM().double().eval()
    untouched.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert (untouched(ids, positions) - eager).abs().max() > 1e-3  # the edit did change the output
    if backend == "graph":
        splits = [node for node in graphs[0].graph.nodes if _splits_at_tap(node)]
        assert len(splits) == 4  # where vLLM's piecewise backend cuts the graph
    if backend == "split":
        assert SPLITS[-1] == 4  # four pieces of one tap each ran between the compiled pieces


def test_a_second_engine_compiles_with_modules_shared_with_an_instrumented_one():
    """vLLM caches rotary embeddings across engines (``get_rope``): a second engine in the
    process compiles a module that the first engine's ndif wrapper already instrumented.
    Dynamo must trace it as the plain module (it cannot trace the controller's context
    variable), and the first engine's traces still see it."""
    torch.manual_seed(0)
    first = ToyForCausalLM().double().eval()
    wrapped = ndif.NNsight(first)
    second = ToyForCausalLM().double().eval()
    second.load_state_dict(first.state_dict())
    shared = first.model.layers[0].mlp
    second.model.layers[0].mlp = shared  # as one cached module in both models
    assert "forward" in shared.__dict__  # instrumented by the first wrapper
    ids, positions = torch.tensor([1, 2, 3]), torch.arange(3)
    with torch.inference_mode():
        eager = second(ids, positions)
        torch._dynamo.reset()
        compiled = torch.compile(second.forward, backend="eager", fullgraph=True)(ids, positions)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    hooked = []
    handle = shared.register_forward_hook(lambda module, args, output: hooked.append(output.clone()))
    try:
        with wrapped.trace(ids, positions):
            seen = wrapped.model.layers[0].mlp.output.save()
    finally:
        handle.remove()
    torch.testing.assert_close(seen, hooked[-1], rtol=0, atol=0)  # the first wrapper still serves it


def test_splitting_ops_are_asked_for_only_where_they_apply():
    assert taps.with_taps({"enforce_eager": True}) == {"enforce_eager": True}
    own = {"compilation_config": {"splitting_ops": []}}
    assert taps.with_taps(own) == own
    assert taps.with_taps({"compilation_config": 3}) == {"compilation_config": 3}


# -- which names a job's code reaches ----------------------------------------------------


def helper(model):
    return model.model.layers[2].mlp.output


class Probe:
    def read(self, model):
        return model.model.embed_tokens.output


def test_names_in_follows_a_blocks_code_its_helpers_and_its_strings():
    scope = {"helper": helper, "Probe": Probe, "model": None}
    code = compile(
        "x = helper(model)\ny = model.model.layers[1].output[0]\nz = model.get('model.lm_head')\n"
        "w = [q.self_attn for q in y]\nv = Probe().read(model)\n",
        "<block>",
        "exec",
    )
    names = names_in(_exec(code, scope))
    assert {"helper", "layers", "output", "mlp", "lm_head", "self_attn", "embed_tokens"} <= names
    assert "input" not in names


def test_names_in_follows_helpers_found_through_a_blocks_scope_fallbacks():
    from ndif.tracing.scope import Scope

    def from_shared(model):
        return model.model.layers[0].mlp

    def from_globals(model):
        return model.lm_head

    code = compile("a = from_shared(model)\nb = from_globals(model)\nc = len([])\n", "<block>", "exec")
    scope = Scope({"model": None}, {"from_shared": from_shared}, {"from_globals": from_globals})
    names = names_in(_exec(code, scope))
    assert {"mlp", "lm_head"} <= names
    assert scope.find("len") is len and scope.find("from_shared") is from_shared
    assert scope.find("nowhere", "absent") == "absent"
    with pytest.raises(KeyError):
        scope["nowhere"]


def test_a_jobs_code_is_scanned_on_the_callers_thread_not_the_engines(monkeypatch):
    import threading

    from ndif.engine import serving

    model = FakeVLLM()
    scanned_on: list[str] = []
    scan = serving.names_in

    def recording(function):
        scanned_on.append(threading.current_thread().name)
        return scan(function)

    monkeypatch.setattr(serving, "names_in", recording)
    on_taps = steer(model, PROMPTS[0], 2.0)
    mlp = mlp_reader(model, PROMPTS[1])
    assert scanned_on and set(scanned_on) == {threading.current_thread().name}
    # What the caller found decided the steps: the steering on taps, the MLP reader eagerly.
    assert len(on_taps[0]) == 4 and len(mlp[0]) == 4
    assert model.step_counts["taps"] == 4 and model.step_counts["eager"] == 4


def test_untapped_names_are_every_module_name_off_the_tapped_paths():
    model = FakeVLLM()
    names = model._hooks.run.untapped_names
    assert {"mlp", "proj", "embed_tokens", "lm_head", "input", "skip", "modules"} <= names
    assert not {"model", "layers", "norm", "logits", "samples", "output"} & names


# -- serving on taps -------------------------------------------------------------------------


def steer(model, prompt, scale, steps=4, extra=None):
    """A job that reads and steers only layer outputs (so it may run on taps)."""
    with model.generate(prompt, max_tokens=steps) as tracer:
        hidden = ndif.save([])
        final = ndif.save([])
        for step in tracer.iter[:steps]:
            model.model.layers[1].output[0][:] += scale
            hidden.append(model.model.layers[2].output[0])
            if extra is not None:
                hidden.append(extra(model))
            final.append(model.model.norm.output)
        tokens = tracer.result.save()
    return hidden, final, tokens


def mlp_reader(model, prompt, steps=4):
    """A job that needs a module without a tap (so its steps run eagerly)."""
    with model.generate(prompt, max_tokens=steps) as tracer:
        seen = ndif.save([])
        for step in tracer.iter[:steps]:
            seen.append(model.model.layers[0].mlp.output)
        tokens = tracer.result.save()
    return seen, tokens


def same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_job_on_taps_equals_the_same_job_run_eagerly():
    tapped, eager = FakeVLLM(taps=True), FakeVLLM(taps=False)
    before = dict(tapped.step_counts)
    on_taps = steer(tapped, PROMPTS[0], 2.0)
    assert tapped.step_counts["taps"] - before["taps"] == 4 and tapped.step_counts["eager"] == before["eager"]
    reference = steer(eager, PROMPTS[0], 2.0)
    assert eager.step_counts["eager"] == 4
    same(on_taps[0], reference[0])
    same(on_taps[1], reference[1])
    assert on_taps[2] == reference[2]
    assert steer(tapped, PROMPTS[0], 0.0)[2] != on_taps[2]  # the steering changed the tokens


def test_taps_and_eager_jobs_share_steps_and_stay_apart():
    model = FakeVLLM()
    alone_steer = [steer(model, prompt, 0.2 * n) for n, prompt in enumerate(PROMPTS[:2])]
    alone_mlp = mlp_reader(model, PROMPTS[2])
    before = dict(model.step_counts)
    together = model.run_together(
        [lambda p=p, n=n: steer(model, p, 0.2 * n) for n, p in enumerate(PROMPTS[:2])]
        + [lambda: mlp_reader(model, PROMPTS[2]), lambda: model.generate(PROMPTS[3], max_tokens=4, trace=False)]
    )
    for alone, result in zip(alone_steer, together[:2]):
        same(alone[0], result[0])
        assert alone[2] == result[2]
    same(alone_mlp[0], together[2][0])
    assert len(together[3]) == 4
    counts = model.step_counts
    assert counts["eager"] - before["eager"] == 4  # the MLP reader is in every step: all eager
    # The steering jobs alone: all four steps on taps.
    before = dict(model.step_counts)
    model.run_together([lambda p=p: steer(model, p, 0.1) for p in PROMPTS[:2]])
    assert model.step_counts["taps"] - before["taps"] == 4 and model.step_counts["eager"] == before["eager"]


def test_a_job_reaching_an_untapped_module_without_naming_it_ends_alone_with_a_hint():
    model = FakeVLLM()
    alone = steer(model, PROMPTS[1], 0.1)
    name = "".join(["m", "l", "p"])  # built at run time: the scan cannot see it

    def sneaky(model):
        return getattr(model.model.layers[2], name).output

    together = model.run_together(
        [lambda: steer(model, PROMPTS[0], 0.1, extra=sneaky), lambda: steer(model, PROMPTS[1], 0.1)]
    )
    assert isinstance(together[0], Exception)
    assert "compiled graphs" in str(together[0]) and "Name the module" in str(together[0])
    same(alone[0], together[1][0])
    assert not model._hooks.run.jobs


def test_a_block_calling_a_tapped_module_itself_serves_no_one():
    """A logit lens calls the final norm from inside a block: on a TAPS step that call must
    not serve the blocks (of any job) waiting for the norm's real output."""
    model = FakeVLLM()

    def lens(prompt):
        with model.generate(prompt, max_tokens=2) as tracer:
            seen = ndif.save([])
            for step in tracer.iter[:2]:
                hidden = model.model.layers[0].output[0]
                seen.append(model.model.norm(hidden * 0 + 7.0))  # an ad-hoc call, not the forward's
        return seen

    def final(prompt):
        with model.generate(prompt, max_tokens=2) as tracer:
            seen = ndif.save([])
            for step in tracer.iter[:2]:
                seen.append(model.model.norm.output)
        return seen

    alone = final(PROMPTS[1])
    before = dict(model.step_counts)
    together = model.run_together([lambda: lens(PROMPTS[0]), lambda: final(PROMPTS[1])])
    assert model.step_counts["taps"] - before["taps"] == 2
    same(alone, together[1])
