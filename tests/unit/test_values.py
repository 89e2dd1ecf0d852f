"""Reading and editing values in a trace, checked against plain PyTorch hooks.

Every expected value here is computed independently: the same checkpoint loaded
plainly by transformers (``reference_*``) or a fresh copy of the plain MLP, run
with ``register_forward_hook`` / ``register_forward_pre_hook(with_kwargs=True)``.
ndif is never used to compute an expectation.
"""

from __future__ import annotations

import copy
import runpy
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import module_at as sub
from transformers import AutoTokenizer

import ndif

PROMPT = "The Eiffel Tower is in"

# -- architectures -----------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    name: str
    layers: str  # dotted path of the decoder layer list
    attn: str  # attention submodule name inside a layer
    norm: str  # dotted path of the final norm


ARCHS = {
    "llama": Arch("llama", "model.layers", "self_attn", "model.norm"),
    "gpt2": Arch("gpt2", "transformer.h", "attn", "transformer.ln_f"),
}


@dataclass
class Case:
    arch: Arch
    model: ndif.LanguageModel
    ref: torch.nn.Module
    tokenizer: Any

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(prompt, return_tensors="pt"))

    def layers(self, root: Any) -> Any:
        return sub(root, self.arch.layers)

    def ref_layer(self, index: int) -> torch.nn.Module:
        return self.layers(self.ref)[index]


@pytest.fixture(params=sorted(ARCHS))
def case(request: pytest.FixtureRequest) -> Case:
    name = request.param
    path = request.getfixturevalue(f"tiny_{name}_path")
    return Case(
        ARCHS[name],
        request.getfixturevalue(name),
        request.getfixturevalue(f"reference_{name}"),
        AutoTokenizer.from_pretrained(path),
    )


# -- independent reference machinery ----------------------------------------------------


def tree_map(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(tree_map(item, fn) for item in value)
    if isinstance(value, list):
        return [tree_map(item, fn) for item in value]
    if isinstance(value, dict):
        return {key: tree_map(item, fn) for key, item in value.items()}
    return value


def clone(value: Any) -> Any:
    return tree_map(value, lambda t: t.detach().clone())


def assert_tree_close(actual: Any, expected: Any, where: str = "value", **tolerance: Any) -> None:
    """Tensors close; containers of the same shape; other objects of the same type."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual).__name__}"
        torch.testing.assert_close(actual.detach(), expected.detach(), msg=lambda m: f"{where}: {m}", **tolerance)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{where}: expected a sequence, got {type(actual).__name__}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_close(a, e, f"{where}[{index}]", **tolerance)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a mapping, got {type(actual).__name__}"
        assert list(actual.keys()) == list(expected.keys()), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_tree_close(actual[key], expected[key], f"{where}[{key!r}]", **tolerance)
    elif expected is None or isinstance(expected, (bool, int, float, str)):
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"


class Hooks:
    """Plain torch hooks on a reference model, removed on exit."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.out: dict[str, Any] = {}
        self.inp: dict[str, Any] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def record(self, module: torch.nn.Module, key: str) -> None:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            self.out[key] = clone(output)

        self.handles.append(module.register_forward_hook(hook))

    def record_inputs(self, module: torch.nn.Module, key: str) -> None:
        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            self.inp[key] = (clone(args), clone(kwargs))

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def edit_output(self, module: torch.nn.Module, fn: Callable[[Any], Any]) -> None:
        self.handles.append(module.register_forward_hook(lambda _m, _a, output: fn(output)))

    def edit_inputs(self, module: torch.nn.Module, fn: Callable[[tuple, dict], tuple[tuple, dict]]) -> None:
        self.handles.append(
            module.register_forward_pre_hook(lambda _m, args, kwargs: fn(args, kwargs), with_kwargs=True)
        )

    def count(self, module: torch.nn.Module, key: str) -> None:
        self.calls.setdefault(key, 0)

        def hook(*_: Any) -> None:
            self.calls[key] += 1

        self.handles.append(module.register_forward_hook(hook))


def run_ref(model: torch.nn.Module, encoding: dict) -> Any:
    with torch.no_grad():
        return model(**encoding)


def first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def zero_last(output: torch.Tensor) -> torch.Tensor:
    output = output.clone()
    output[:, -1] = 0
    return output


# -- saves: outputs, inputs, the root ---------------------------------------------------


def test_save_outputs_of_several_modules(case: Case) -> None:
    model, arch = case.model, case.arch
    with model.trace(PROMPT) as tracer:
        layers = case.layers(model)
        layer0 = layers[0].output.save()
        attn1 = getattr(layers[1], arch.attn).output.save()
        mlp2 = layers[2].mlp.output.save()
        layer3 = layers[3].output.save()
        head = model.lm_head.output.save()
        root = model.output.save()
        result = tracer.result.save()

    with Hooks() as hooks:
        hooks.record(case.ref_layer(0), "layer0")
        hooks.record(getattr(case.ref_layer(1), arch.attn), "attn1")
        hooks.record(case.ref_layer(2).mlp, "mlp2")
        hooks.record(case.ref_layer(3), "layer3")
        hooks.record(case.ref.lm_head, "head")
        expected = run_ref(case.ref, case.encode(PROMPT))

    assert isinstance(attn1, tuple), "attention returns a tuple (hidden, weights)"
    assert_tree_close(layer0, hooks.out["layer0"], "layer0")
    assert_tree_close(attn1, hooks.out["attn1"], "attn1")
    assert_tree_close(mlp2, hooks.out["mlp2"], "mlp2")
    assert_tree_close(layer3, hooks.out["layer3"], "layer3")
    assert_tree_close(head, hooks.out["head"], "lm_head")
    torch.testing.assert_close(root.logits, expected.logits)
    torch.testing.assert_close(result.logits, expected.logits)
    torch.testing.assert_close(head, expected.logits)


def test_save_inputs_of_several_modules(case: Case) -> None:
    model, arch = case.model, case.arch
    with model.trace(PROMPT):
        root_input = model.input.save()
        root_inputs = model.inputs.save()
        layers = case.layers(model)
        layer0_input = layers[0].input.save()
        layer1_inputs = layers[1].inputs.save()
        attn1_input = getattr(layers[1], arch.attn).input.save()
        attn1_inputs = getattr(layers[1], arch.attn).inputs.save()
        mlp2_input = layers[2].mlp.input.save()
        head_input = model.lm_head.input.save()

    encoding = case.encode(PROMPT)
    with Hooks() as hooks:
        hooks.record_inputs(case.ref, "root")
        hooks.record_inputs(case.ref_layer(0), "layer0")
        hooks.record_inputs(case.ref_layer(1), "layer1")
        hooks.record_inputs(getattr(case.ref_layer(1), arch.attn), "attn1")
        hooks.record_inputs(case.ref_layer(2).mlp, "mlp2")
        hooks.record_inputs(case.ref.lm_head, "head")
        run_ref(case.ref, encoding)

    # The root is called with keywords only: `.input` is its first keyword, the ids.
    assert hooks.inp["root"][0] == ()
    torch.testing.assert_close(root_input, encoding["input_ids"])
    assert_tree_close(root_inputs, hooks.inp["root"], "root.inputs")
    assert_tree_close(layer0_input, first_input(*hooks.inp["layer0"]), "layer0.input")
    assert_tree_close(layer1_inputs, hooks.inp["layer1"], "layer1.inputs")
    # Llama's attention gets hidden_states as a keyword, GPT-2's positionally.
    assert_tree_close(attn1_input, first_input(*hooks.inp["attn1"]), "attn1.input")
    assert_tree_close(attn1_inputs, hooks.inp["attn1"], "attn1.inputs")
    assert_tree_close(mlp2_input, first_input(*hooks.inp["mlp2"]), "mlp2.input")
    assert_tree_close(head_input, first_input(*hooks.inp["head"]), "lm_head.input")


def test_llama_attention_input_is_its_first_keyword(llama, reference_llama, tiny_llama_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    with llama.trace(PROMPT):
        hidden = llama.model.layers[0].self_attn.input.save()
        args, kwargs = llama.model.layers[0].self_attn.inputs
        n_args = ndif.save(len(args))
        first_key = ndif.save(next(iter(kwargs)))

    with Hooks() as hooks:
        hooks.record_inputs(reference_llama.model.layers[0].self_attn, "attn")
        hooks.record(reference_llama.model.layers[0].input_layernorm, "norm")
        run_ref(reference_llama, dict(tokenizer(PROMPT, return_tensors="pt")))
    ref_args, ref_kwargs = hooks.inp["attn"]
    assert n_args == len(ref_args) == 0
    assert first_key == next(iter(ref_kwargs)) == "hidden_states"
    torch.testing.assert_close(hidden, ref_kwargs["hidden_states"])
    torch.testing.assert_close(hidden, hooks.out["norm"])


def test_save_non_tensor_values(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        norms = []
        for index, layer in enumerate(case.layers(model)):
            hidden = layer.output
            if index == 0:
                width = ndif.save(hidden.shape[-1])
                pair = ndif.save([hidden.shape[1], "tokens"])
            elif index == 1:
                summary = ndif.save({"first": hidden[0, 0].clone(), "label": "layer1"})
            norms.append(hidden.norm().item())
        norms.save()
        last = model.lm_head.output[0, -1].argmax().item()
        last = ndif.save(last)

    n_tokens = case.encode(PROMPT)["input_ids"].shape[1]
    with Hooks() as hooks:
        for index in range(len(case.layers(case.ref))):
            hooks.record(case.ref_layer(index), f"layer{index}")
        expected = run_ref(case.ref, case.encode(PROMPT))

    assert width == 64
    assert pair == [n_tokens, "tokens"]
    assert set(summary) == {"first", "label"} and summary["label"] == "layer1"
    torch.testing.assert_close(summary["first"], hooks.out["layer1"][0, 0])
    assert isinstance(norms, list) and len(norms) == 4
    expected_norms = [hooks.out[f"layer{index}"].norm().item() for index in range(4)]
    assert norms == pytest.approx(expected_norms, rel=1e-6)
    assert last == expected.logits[0, -1].argmax().item()


def test_unsaved_values_do_not_reach_the_caller(case: Case) -> None:
    model = case.model
    previous = "before the trace"
    with model.trace(PROMPT):
        layers = case.layers(model)
        kept = layers[1].output.save()
        unsaved = layers[1].output * 2
        unsaved_list = [unsaved]
        unsaved_int = 123456
        previous = unsaved
    names = locals()
    assert "kept" in names
    for name in ("layers", "unsaved", "unsaved_list", "unsaved_int"):
        assert name not in names, f"unsaved {name!r} leaked into the caller"
    assert previous == "before the trace"
    with Hooks() as hooks:
        hooks.record(case.ref_layer(1), "layer1")
        run_ref(case.ref, case.encode(PROMPT))
    torch.testing.assert_close(kept, hooks.out["layer1"])


def _trace_in_a_function(model: Any, layer: Any, prompt: str) -> dict[str, Any]:
    """A plain helper function (not a test) that traces and reports its own locals."""
    untouched = "set before"
    with model.trace(prompt):
        hidden = layer.output.save()
        tokens = ndif.save(hidden.shape[1])
        scratch = hidden + 1
        untouched = "rebound in the body"
    return dict(locals())


def test_saved_values_are_bound_in_a_function(case: Case) -> None:
    names = _trace_in_a_function(case.model, case.layers(case.model)[2], PROMPT)
    assert "hidden" in names and "tokens" in names
    assert "scratch" not in names
    assert names["untouched"] == "set before"
    with Hooks() as hooks:
        hooks.record(case.ref_layer(2), "layer2")
        run_ref(case.ref, case.encode(PROMPT))
    torch.testing.assert_close(names["hidden"], hooks.out["layer2"])
    assert names["tokens"] == case.encode(PROMPT)["input_ids"].shape[1]


MODULE_LEVEL_SCRIPT = """\
import ndif

with model.trace(prompt):
    hidden = layer.output.save()
    stats = ndif.save({"rows": hidden.shape[0]})
    scratch = hidden * 3

after = "the script went on"
"""


def test_saved_values_are_bound_at_module_level(case: Case, tmp_path) -> None:
    script = tmp_path / f"module_level_{case.arch.name}.py"
    script.write_text(textwrap.dedent(MODULE_LEVEL_SCRIPT))
    layer = case.layers(case.model)[1]
    names = runpy.run_path(str(script), init_globals={"model": case.model, "prompt": PROMPT, "layer": layer})
    assert names["after"] == "the script went on"
    assert "hidden" in names and "stats" in names
    assert "scratch" not in names
    assert names["stats"] == {"rows": 1}
    with Hooks() as hooks:
        hooks.record(case.ref_layer(1), "layer1")
        run_ref(case.ref, case.encode(PROMPT))
    torch.testing.assert_close(names["hidden"], hooks.out["layer1"])


# -- edits ------------------------------------------------------------------------------


def test_zero_in_place_changes_downstream(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        layers = case.layers(model)
        layers[2].mlp.output[:, -1] = 0
        mlp2 = layers[2].mlp.output.save()
        layer3 = layers[3].output.save()
        logits = model.lm_head.output.save()

    with Hooks() as hooks:
        hooks.edit_output(case.ref_layer(2).mlp, zero_last)
        hooks.record(case.ref_layer(2).mlp, "mlp2")
        hooks.record(case.ref_layer(3), "layer3")
        edited = run_ref(case.ref, case.encode(PROMPT)).logits
    plain = run_ref(case.ref, case.encode(PROMPT)).logits

    assert bool((mlp2[:, -1] == 0).all())
    torch.testing.assert_close(mlp2, hooks.out["mlp2"])
    torch.testing.assert_close(layer3, hooks.out["layer3"])
    torch.testing.assert_close(logits, edited)
    # Only the last position changed (causal), and it did change.
    torch.testing.assert_close(logits[:, :-1], plain[:, :-1])
    assert not torch.allclose(logits[:, -1], plain[:, -1])


def test_replace_output(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        layers = case.layers(model)
        layers[1].output = layers[1].output * 2
        doubled = layers[1].output.save()
        layer2_input = layers[2].input.save()
        logits = model.lm_head.output.save()

    with Hooks() as hooks:
        hooks.record(case.ref_layer(1), "original")
        hooks.edit_output(case.ref_layer(1), lambda output: output * 2)
        hooks.record_inputs(case.ref_layer(2), "layer2")
        expected = run_ref(case.ref, case.encode(PROMPT)).logits

    torch.testing.assert_close(doubled, hooks.out["original"] * 2)
    torch.testing.assert_close(layer2_input, first_input(*hooks.inp["layer2"]))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


def test_replace_tuple_output_of_attention(case: Case) -> None:
    model, arch = case.model, case.arch
    with model.trace(PROMPT):
        attention = getattr(case.layers(model)[0], arch.attn)
        hidden, weights = attention.output
        attention.output = (hidden * 0.5, weights)
        logits = model.lm_head.output.save()

    with Hooks() as hooks:
        hooks.edit_output(getattr(case.ref_layer(0), arch.attn), lambda output: (output[0] * 0.5, *output[1:]))
        expected = run_ref(case.ref, case.encode(PROMPT)).logits
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


def test_replace_input(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        layers = case.layers(model)
        layers[2].input = layers[2].input + 1
        seen = layers[2].input.save()
        mlp_in = layers[3].mlp.input
        layers[3].mlp.input = mlp_in * 3
        logits = model.lm_head.output.save()

    def plus_one(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args[0] + 1, *args[1:]), kwargs

    def times_three(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args[0] * 3, *args[1:]), kwargs

    with Hooks() as hooks:
        hooks.edit_inputs(case.ref_layer(2), plus_one)
        hooks.record_inputs(case.ref_layer(2), "layer2")
        hooks.edit_inputs(case.ref_layer(3).mlp, times_three)
        expected = run_ref(case.ref, case.encode(PROMPT)).logits

    torch.testing.assert_close(seen, first_input(*hooks.inp["layer2"]))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


def test_replace_keyword_input_of_llama_attention(llama, reference_llama, tiny_llama_path) -> None:
    """`.input = x` on a module whose first input is a keyword replaces that keyword."""
    encoding = dict(AutoTokenizer.from_pretrained(tiny_llama_path)(PROMPT, return_tensors="pt"))
    with llama.trace(PROMPT):
        attention = llama.model.layers[1].self_attn
        attention.input = attention.input * -1
        attention_output = attention.output[0].save()
        logits = llama.lm_head.output.save()

    def negate(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "hidden_states": -kwargs["hidden_states"]}

    with Hooks() as hooks:
        hooks.edit_inputs(reference_llama.model.layers[1].self_attn, negate)
        hooks.record(reference_llama.model.layers[1].self_attn, "attn")
        expected = run_ref(reference_llama, encoding).logits
    torch.testing.assert_close(attention_output, hooks.out["attn"][0])
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(reference_llama, encoding).logits)


def test_replace_inputs_args_and_kwargs(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        layers = case.layers(model)
        args, kwargs = layers[1].inputs
        layers[1].inputs = ((args[0] * 0.25, *args[1:]), kwargs)
        logits = model.lm_head.output.save()

    def quarter(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args[0] * 0.25, *args[1:]), kwargs

    with Hooks() as hooks:
        hooks.edit_inputs(case.ref_layer(1), quarter)
        expected = run_ref(case.ref, case.encode(PROMPT)).logits
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


def test_in_place_edit_of_input(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        layers = case.layers(model)
        layers[1].mlp.input[:, 0] = 0
        mlp1 = layers[1].mlp.output.save()
        layers[2].input[:, -1] *= 3
        logits = model.lm_head.output.save()

    def zero_first(args: tuple, kwargs: dict) -> None:
        args[0][:, 0] = 0

    def triple_last(args: tuple, kwargs: dict) -> None:
        args[0][:, -1] *= 3

    with Hooks() as hooks:
        hooks.edit_inputs(case.ref_layer(1).mlp, zero_first)
        hooks.record(case.ref_layer(1).mlp, "mlp1")
        hooks.edit_inputs(case.ref_layer(2), triple_last)
        expected = run_ref(case.ref, case.encode(PROMPT)).logits
    torch.testing.assert_close(mlp1, hooks.out["mlp1"])
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


# -- skip, stop -------------------------------------------------------------------------


def test_skip_layer_is_identity(case: Case) -> None:
    model = case.model
    inner = case.layers(model)[1].mlp._module
    calls = {"inner": 0}
    handle = inner.register_forward_hook(lambda *_: calls.__setitem__("inner", calls["inner"] + 1))
    try:
        with model.trace(PROMPT):
            layers = case.layers(model)
            layers[1].skip(layers[1].input)
            skipped = layers[1].output.save()
            layer2_input = layers[2].input.save()
            logits = model.lm_head.output.save()
    finally:
        handle.remove()
    assert calls["inner"] == 0, "the skipped layer's submodules ran"

    with Hooks() as hooks:
        # The reference layer 1 is an identity: a forward hook returning its input.
        hooks.handles.append(case.ref_layer(1).register_forward_hook(lambda _m, args, _o: args[0]))
        hooks.record(case.ref_layer(0), "layer0")
        hooks.record_inputs(case.ref_layer(2), "layer2")
        expected = run_ref(case.ref, case.encode(PROMPT)).logits

    torch.testing.assert_close(skipped, hooks.out["layer0"])
    torch.testing.assert_close(layer2_input, first_input(*hooks.inp["layer2"]))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


def test_stop_keeps_earlier_saves_and_runs_nothing_later(case: Case) -> None:
    model = case.model
    calls = {"layer0": 0, "layer1 started": 0, "layer3": 0, "lm_head": 0}

    def counter(key: str) -> Callable[..., None]:
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    handles = [
        case.layers(model)[0]._module.register_forward_hook(counter("layer0")),
        case.layers(model)[1]._module.register_forward_pre_hook(counter("layer1 started")),
        case.layers(model)[3]._module.register_forward_hook(counter("layer3")),
        model.lm_head._module.register_forward_hook(counter("lm_head")),
    ]
    try:
        with model.trace(PROMPT) as tracer:
            layers = case.layers(model)
            hidden0 = layers[0].output.save()
            hidden1 = layers[1].output.save()
            tracer.stop()
            after = layers[2].output.save()
    finally:
        for handle in handles:
            handle.remove()

    # Layer 1 started (and stopped the model from its output); nothing after it ran.
    assert calls == {"layer0": 1, "layer1 started": 1, "layer3": 0, "lm_head": 0}
    assert "after" not in locals()
    with Hooks() as hooks:
        hooks.record(case.ref_layer(0), "layer0")
        hooks.record(case.ref_layer(1), "layer1")
        run_ref(case.ref, case.encode(PROMPT))
    torch.testing.assert_close(hidden0, hooks.out["layer0"])
    torch.testing.assert_close(hidden1, hooks.out["layer1"])

    # The model is usable again afterwards, unedited.
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    torch.testing.assert_close(logits, run_ref(case.ref, case.encode(PROMPT)).logits)


# -- cache ------------------------------------------------------------------------------


def _ndif_path(name: str) -> str:
    return "model" if not name else f"model.{name}"


def _record_all(ref: torch.nn.Module, hooks: Hooks, inputs: bool = False) -> None:
    for name, module in ref.named_modules():
        hooks.record(module, _ndif_path(name))
        if inputs:
            hooks.record_inputs(module, _ndif_path(name))


def test_cache_all_modules(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache()

    with Hooks() as hooks:
        _record_all(case.ref, hooks)
        run_ref(case.ref, case.encode(PROMPT))

    assert set(cache.keys()) == set(hooks.out), "cache should hold every module that ran"
    for path, expected in hooks.out.items():
        assert_tree_close(cache[path].output, expected, path)
    layer_path = f"model.{case.arch.layers}.2"
    torch.testing.assert_close(case.layers(cache.model)[2].output, hooks.out[layer_path])


def test_cache_subset_by_envoys_and_paths(case: Case) -> None:
    model, arch = case.model, case.arch
    wanted_paths = [f"model.{arch.layers}.1", "model.lm_head"]
    with model.trace(PROMPT) as tracer:
        layers = case.layers(model)
        by_envoy = tracer.cache(modules=[layers[0], layers[2].mlp])
        by_path = tracer.cache(modules=wanted_paths)

    with Hooks() as hooks:
        _record_all(case.ref, hooks)
        run_ref(case.ref, case.encode(PROMPT))

    envoy_paths = [f"model.{arch.layers}.0", f"model.{arch.layers}.2.mlp"]
    assert sorted(by_envoy.keys()) == sorted(envoy_paths)
    assert sorted(by_path.keys()) == sorted(wanted_paths)
    for view, paths in ((by_envoy, envoy_paths), (by_path, wanted_paths)):
        for path in paths:
            torch.testing.assert_close(view[path].output, hooks.out[path])


def test_cache_include_inputs(case: Case) -> None:
    model, arch = case.model, case.arch
    paths = ["model", f"model.{arch.layers}.1", f"model.{arch.layers}.1.{arch.attn}", "model.lm_head"]
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=paths, include_inputs=True)

    with Hooks() as hooks:
        _record_all(case.ref, hooks, inputs=True)
        run_ref(case.ref, case.encode(PROMPT))

    for path in paths:
        assert_tree_close(cache[path].inputs, hooks.inp[path], f"{path}.inputs")
        assert_tree_close(cache[path].input, first_input(*hooks.inp[path]), f"{path}.input")
        assert_tree_close(cache[path].output, hooks.out[path], f"{path}.output")


def test_cache_records_values_after_interventions(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(include_inputs=True)
        layers = case.layers(model)
        layers[1].mlp.output = layers[1].mlp.output * 3
        layers[2].input = layers[2].input + 0.5
        layers[3].output[:, -1] = 0

    def plus_half(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args[0] + 0.5, *args[1:]), kwargs

    with Hooks() as hooks:
        hooks.edit_output(case.ref_layer(1).mlp, lambda output: output * 3)
        hooks.edit_inputs(case.ref_layer(2), plus_half)
        hooks.edit_output(case.ref_layer(3), zero_last)
        _record_all(case.ref, hooks, inputs=True)
        run_ref(case.ref, case.encode(PROMPT))

    prefix = f"model.{case.arch.layers}"
    for path in (f"{prefix}.1.mlp", f"{prefix}.1", f"{prefix}.3", "model.lm_head"):
        assert_tree_close(cache[path].output, hooks.out[path], f"{path}.output")
    assert_tree_close(cache[f"{prefix}.2"].input, first_input(*hooks.inp[f"{prefix}.2"]), f"{prefix}.2.input")
    assert bool((cache[f"{prefix}.3"].output[:, -1] == 0).all())
    for path, expected in hooks.out.items():
        assert_tree_close(cache[path].output, expected, path)


# -- logit lens, control flow -----------------------------------------------------------


def test_logit_lens_in_the_body(case: Case) -> None:
    model = case.model
    with model.trace(PROMPT):
        layers = case.layers(model)
        norm = sub(model, case.arch.norm)
        lens = []
        for layer in layers:
            lens.append(model.lm_head(norm(layer.output)))
        lens.save()
        final_norm = norm.output.save()
        logits = model.lm_head.output.save()

    with Hooks() as hooks:
        for index in range(4):
            hooks.record(case.ref_layer(index), f"layer{index}")
        hooks.record(sub(case.ref, case.arch.norm), "norm")
        expected = run_ref(case.ref, case.encode(PROMPT)).logits
    ref_norm = sub(case.ref, case.arch.norm)
    with torch.no_grad():
        expected_lens = [case.ref.lm_head(ref_norm(hooks.out[f"layer{index}"])) for index in range(4)]

    assert len(lens) == 4
    for index in range(4):
        torch.testing.assert_close(lens[index], expected_lens[index])
    # The body's own module calls did not take the place of the model's.
    torch.testing.assert_close(final_norm, hooks.out["norm"])
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(lens[-1], expected)


def test_control_flow_in_the_body(case: Case, capsys: pytest.CaptureFixture) -> None:
    model = case.model
    with model.trace(PROMPT):
        branches = []
        for index, layer in enumerate(case.layers(model)):
            hidden = layer.output
            print(f"layer {index} shape {tuple(hidden.shape)}")
            if hidden[:, -1].mean() > 0:
                layer.output = hidden * 2
                branches.append("up")
            else:
                layer.output = hidden * -1
                branches.append("flip")
        branches.save()
        logits = model.lm_head.output.save()

    taken = []

    def data_dependent(output: torch.Tensor) -> torch.Tensor:
        if output[:, -1].mean() > 0:
            taken.append("up")
            return output * 2
        taken.append("flip")
        return output * -1

    with Hooks() as hooks:
        for index in range(4):
            hooks.edit_output(case.ref_layer(index), data_dependent)
        encoding = case.encode(PROMPT)
        expected = run_ref(case.ref, encoding).logits

    n_tokens = encoding["input_ids"].shape[1]
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"layer {index} shape (1, {n_tokens}, 64)" for index in range(4)]
    assert branches == taken
    torch.testing.assert_close(logits, expected)


# -- NNsight on a plain module ------------------------------------------------------------


def test_nnsight_mlp_saves(mlp: torch.nn.Sequential) -> None:
    plain = copy.deepcopy(mlp)
    model = ndif.NNsight(mlp)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with model.trace(x) as tracer:
        hidden = model[0].output.save()
        relu_input = model[1].input.save()
        relu_inputs = model[1].inputs.save()
        out = model.output.save()
        result = tracer.result.save()

    with Hooks() as hooks:
        hooks.record(plain[0], "0")
        hooks.record_inputs(plain[1], "1")
        with torch.no_grad():
            expected = plain(x)
    torch.testing.assert_close(hidden, hooks.out["0"])
    torch.testing.assert_close(relu_input, hooks.inp["1"][0][0])
    assert_tree_close(relu_inputs, hooks.inp["1"], "relu.inputs")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(result, expected)


def test_nnsight_mlp_edits(mlp: torch.nn.Sequential) -> None:
    plain = copy.deepcopy(mlp)
    model = ndif.NNsight(mlp)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    with model.trace(x):
        model[0].output = model[0].output * 2
        model[1].output[:, 0] = 0
        model[2].input = model[2].input + 1
        out = model.output.save()

    def zero_column(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, 0] = 0
        return output

    with Hooks() as hooks:
        hooks.edit_output(plain[0], lambda output: output * 2)
        hooks.edit_output(plain[1], zero_column)
        hooks.edit_inputs(plain[2], lambda args, kwargs: ((args[0] + 1,), kwargs))
        with torch.no_grad():
            expected = plain(x)
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        assert not torch.allclose(out, plain(x))


def test_nnsight_mlp_batches_tensor_invokes(mlp: torch.nn.Sequential) -> None:
    plain = copy.deepcopy(mlp)
    model = ndif.NNsight(mlp)
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(2, 4, generator=generator), torch.randn(3, 4, generator=generator)
    with model.trace() as tracer:
        with tracer.invoke(first):
            hidden_a = model[0].output.save()
            model[1].output[:] = 0  # only this invoke's rows
            out_a = model.output.save()
        with tracer.invoke(second):
            hidden_b = model[0].output.save()
            out_b = model.output.save()
        with tracer.invoke():
            hidden_all = model[0].output.save()
            out_all = model.output.save()

    with torch.no_grad():
        expected_hidden = plain[0](torch.cat([first, second]))
        expected_b = plain(second)
        expected_a = plain[2](torch.zeros(2, 8))
    assert hidden_a.shape == (2, 8) and hidden_b.shape == (3, 8) and hidden_all.shape == (5, 8)
    torch.testing.assert_close(hidden_a, expected_hidden[:2])
    torch.testing.assert_close(hidden_b, expected_hidden[2:])
    torch.testing.assert_close(hidden_all, expected_hidden)
    torch.testing.assert_close(out_a, expected_a)
    torch.testing.assert_close(out_b, expected_b)
    torch.testing.assert_close(out_all, torch.cat([expected_a, expected_b]))
