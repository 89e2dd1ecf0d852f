"""``remote="local"`` gives bit for bit what a local trace gives.

Every test here runs the same trace body twice: in place (``remote=None``) and
through the wire format (``remote="local"``: the body becomes a `Request`, is
encoded, decoded, run in the sandbox, and its `Result` is encoded, decoded and
bound in the caller's variables). The two runs must agree exactly: ``torch.equal``
on tensors (same dtype and shape), ``==`` and the same type on everything else.

The body of each trace is written once, in a nested ``run(remote)`` function that
returns what the body saved; the values it reads from the caller's scope are the
test's own locals (or this module's globals), so they are what the wire captures.

The last part checks what the client refuses to send, before anything runs.
"""

from __future__ import annotations

import io
import math
import os
import socket
import threading
from typing import Any

import numpy as np
import pytest
import torch
from conftest import module_at as sub
from transformers.utils import ModelOutput

import ndif
from ndif.engine.cache import CacheView
from ndif.sandbox import runtime
from ndif.wire import WireError

PROMPT = "The Eiffel Tower is in"
OTHER = "One two"
SHORT = "Hi"
LONG = "The quick brown fox jumps over the lazy dog again and again"
MID = "Paris is the capital of"

#: Exactly this many greedy steps (the tiny random models may emit EOS at any step).
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}

#: A module-level constant a captured helper function reads.
SCALE = 3.0

ARCHS = {
    "llama": {"layers": "model.layers", "attn": "self_attn", "norm": "model.norm"},
    "gpt2": {"layers": "transformer.h", "attn": "attn", "norm": "transformer.ln_f"},
}


# -- comparison -------------------------------------------------------------------------------


def assert_same(local: Any, wire: Any, where: str = "value") -> None:
    """``wire`` is exactly ``local``: tensors bit for bit, containers of the same type."""
    if isinstance(local, torch.Tensor):
        assert isinstance(wire, torch.Tensor), f"{where}: expected a tensor, got {type(wire).__name__}"
        assert wire.dtype == local.dtype, f"{where}: dtype {wire.dtype} != {local.dtype}"
        assert wire.shape == local.shape, f"{where}: shape {tuple(wire.shape)} != {tuple(local.shape)}"
        assert wire.device == local.device, f"{where}: device {wire.device} != {local.device}"
        assert torch.equal(wire.detach(), local.detach()), f"{where}: the values differ"
    elif isinstance(local, ModelOutput):
        # A transformers output: its tensor fields travel (a KV cache object does not).
        assert type(wire) is type(local), f"{where}: {type(wire).__name__} != {type(local).__name__}"
        for key, item in local.items():
            if isinstance(item, (torch.Tensor, tuple, list)):
                assert key in wire, f"{where}: no field {key!r} (has {list(wire.keys())})"
                assert_same(item, wire[key], f"{where}.{key}")
    elif isinstance(local, CacheView):
        assert isinstance(wire, CacheView), f"{where}: expected a CacheView, got {type(wire).__name__}"
        assert wire.keys() == local.keys(), f"{where}: keys {wire.keys()} != {local.keys()}"
        for path in local.keys():  # noqa: SIM118 (CacheView.keys() is its API)
            assert len(wire[path]) == len(local[path]), f"{where}[{path!r}]: number of calls"
            assert_same(local[path].output, wire[path].output, f"{where}[{path!r}].output")
            assert_same(local[path].inputs, wire[path].inputs, f"{where}[{path!r}].inputs")
    elif isinstance(local, np.ndarray):
        assert isinstance(wire, np.ndarray), f"{where}: expected an ndarray, got {type(wire).__name__}"
        assert wire.dtype == local.dtype and wire.shape == local.shape, f"{where}: {wire.dtype}{wire.shape}"
        assert np.array_equal(wire, local), f"{where}: the values differ"
    elif isinstance(local, (tuple, list)):
        assert type(wire) is type(local), f"{where}: {type(wire).__name__} != {type(local).__name__}"
        assert len(wire) == len(local), f"{where}: length {len(wire)} != {len(local)}"
        for index, (a, b) in enumerate(zip(local, wire)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(local, dict):
        assert type(wire) is type(local), f"{where}: {type(wire).__name__} != {type(local).__name__}"
        assert list(wire.keys()) == list(local.keys()), f"{where}: keys {list(wire)} != {list(local)}"
        for key in local:
            assert_same(local[key], wire[key], f"{where}[{key!r}]")
    elif isinstance(local, float) and math.isnan(local):
        assert isinstance(wire, float) and math.isnan(wire), f"{where}: {wire!r} is not nan"
    else:
        assert type(wire) is type(local), f"{where}: {type(wire).__name__} != {type(local).__name__}"
        assert wire == local, f"{where}: {wire!r} != {local!r}"


#: The kinds of the requests the sandbox ran (a spy on `run_request`, see `_served`).
SERVED: list[str] = []


@pytest.fixture(autouse=True)
def _served(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every request the local backend decodes and runs, so a test knows the wire was used."""
    real = runtime.run_request

    def spy(model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        SERVED.append(request.kind)
        return real(model, request, *args, **kwargs)

    monkeypatch.setattr(runtime, "run_request", spy)
    SERVED.clear()


def both(run: Any) -> tuple[Any, Any]:
    """``run(None)`` (in place) and ``run("local")`` (through the wire), checked equal."""
    served = len(SERVED)
    local = run(None)
    assert len(SERVED) == served, "the local run went through the wire"
    wire = run("local")
    assert len(SERVED) == served + 1, "the remote run did not go through the wire (one request)"
    assert_same(local, wire, "saved")
    return local, wire


@pytest.fixture(params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest) -> tuple[ndif.LanguageModel, dict[str, str]]:
    return request.getfixturevalue(request.param), ARCHS[request.param]


# -- saves -------------------------------------------------------------------------------------


def test_saves_of_outputs_inputs_and_tuples(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])
    attn = getattr(layers[1], names["attn"])

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            layer0 = layers[0].output.save()
            layer1_input = layers[1].input.save()
            attn_out = attn.output.save()  # a tuple (hidden, weights)
            mlp_inputs = layers[1].mlp.inputs.save()  # (args, kwargs)
            mlp_input = layers[1].mlp.input.save()
            layer1 = layers[1].output.save()
            head = model.lm_head.output.save()
        return layer0, layer1_input, attn_out, mlp_inputs, mlp_input, layer1, head

    local, _ = both(run)
    assert isinstance(local[2], tuple)
    assert isinstance(local[3], tuple) and isinstance(local[3][1], dict)


def test_save_parts_of_a_layers_inputs(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            args, kwargs = llama.model.layers[1].inputs
            hidden = args[0].save()
            positions = kwargs["position_ids"].save()
            rotary = kwargs["position_embeddings"].save()  # a tuple (cos, sin)
            n_args = ndif.save(len(args))
        return hidden, positions, rotary, n_args

    both(run)


def test_root_output_and_tracer_result(arch) -> None:
    model, _ = arch

    def run(remote):
        with model.trace(PROMPT, remote=remote) as tracer:
            logits = model.lm_head.output.save()
            result = tracer.result.save()
        return logits, result

    local, wire = both(run)
    assert isinstance(wire[1], ModelOutput)
    assert isinstance(wire[1].logits, torch.Tensor)


def test_saved_ints_strings_shapes_and_dtypes(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            h = llama.model.layers[0].output
            dims = ndif.save(tuple(h.shape))
            dtype = ndif.save(h.dtype)
            device = ndif.save(h.device)
            norm = ndif.save(h.norm().item())
            name = ndif.save(f"layer {h.shape[-1]}")
            flag = ndif.save(bool(h.sum() > 0))
        return dims, dtype, device, norm, name, flag

    both(run)


def test_saved_torch_size_stays_a_torch_size(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            shape = ndif.save(llama.model.layers[0].output.shape)
        return shape

    local, wire = both(run)
    assert isinstance(local, torch.Size)


# -- editing -----------------------------------------------------------------------------------


def test_in_place_zeroing(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            layers[1].output[:, -1] = 0
            edited = layers[1].output.save()
            layers[2].mlp.output[:] = 0
            logits = model.lm_head.output.save()
        return edited, logits

    local, _ = both(run)
    assert (local[0][:, -1] == 0).all()


def test_replacement(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            layers[1].mlp.output = layers[1].mlp.output * 2
            layers[2].input = layers[2].input + 1
            seen = layers[2].input.save()
            logits = model.lm_head.output.save()
        return seen, logits

    both(run)


def test_replacing_inputs(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            args, kwargs = llama.model.layers[1].inputs
            llama.model.layers[1].inputs = ((args[0] * 0.25, *args[1:]), kwargs)
            logits = llama.lm_head.output.save()
        return logits

    both(run)


def test_skip(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            layers[1].skip(layers[1].input)
            skipped = layers[1].output.save()
            logits = model.lm_head.output.save()
        return skipped, logits

    both(run)


def test_stop(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        after = "unset"
        with model.trace(PROMPT, remote=remote) as tracer:
            hidden0 = layers[0].output.save()
            hidden1 = layers[1].output.save()
            tracer.stop()
            after = layers[2].output.save()
        return hidden0, hidden1, after

    local, _ = both(run)
    assert local[2] == "unset"


def test_assigning_tracer_result(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote) as tracer:
            logits = llama.lm_head.output.save()
            tracer.result = logits * 0 + 1
            result = tracer.result.save()
        return logits, result

    both(run)


# -- cache -------------------------------------------------------------------------------------


def test_cache_of_chosen_modules(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        with model.trace(PROMPT, remote=remote) as tracer:
            cache = tracer.cache(modules=[layers[1], model.lm_head])
        return cache

    local, wire = both(run)
    assert isinstance(wire, CacheView)
    path = f"model.{names['layers']}.1"
    assert_same(local[path].output, wire[path].output)
    assert_same(local.model.lm_head.output, wire.model.lm_head.output)


def test_cache_with_inputs_dtype_and_device(llama) -> None:
    def run(remote):
        with llama.trace(remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                cache = tracer.cache(
                    modules=[llama.model.layers[1].mlp, llama.lm_head], dtype=torch.float16, include_inputs=True
                )
            with tracer.invoke([OTHER, LONG]):
                llama.model.layers[1].mlp.output[:] = 0
                other = tracer.cache(modules=["model.model.layers.1.mlp"], device=torch.device("cpu"))
        return cache, other

    local, wire = both(run)
    assert local[0]["model.lm_head"].output.dtype == torch.float16
    assert local[0]["model.lm_head"].inputs is not None


def test_cache_of_every_module_during_generate(llama) -> None:
    def run(remote):
        with llama.generate(PROMPT, **GREEDY, remote=remote) as tracer:
            cache = tracer.cache()
        return cache

    local, wire = both(run)
    assert len(wire["model.lm_head"].output) == GREEDY["max_new_tokens"]
    assert_same(local.model.model.layers[2].output, wire.model.model.layers[2].output)


# -- calling modules, control flow, print ------------------------------------------------------


def test_logit_lens_calls_modules_in_the_body(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])
    norm = sub(model, names["norm"])

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            lens = []
            for i in range(4):
                hidden = layers[i].output
                lens.append(model.lm_head(norm(hidden)).argmax(dim=-1))
            lens = ndif.save(lens)
            probs = torch.softmax(model.lm_head.output[0, -1], dim=-1).save()
        return lens, probs

    both(run)


def test_python_control_flow(llama) -> None:
    threshold = 1.0

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            picked = []
            i = 0
            while i < 4:
                hidden = llama.model.layers[i].output
                if hidden.norm() > threshold:
                    picked.append(i)
                elif i == 100:
                    picked.append(-1)
                else:
                    picked.append(None)
                if i == 2:
                    hidden[:, -1] = hidden[:, -1] * -1
                    break
                i += 1
            squares = [k * k for k in range(5) if k % 2 == 0]
            table = {f"k{k}": k for k in range(3)}
            try:
                [][1]
            except IndexError:
                caught = "IndexError"
            logits = llama.lm_head.output.save()
            picked, squares, table, caught = ndif.save(picked), ndif.save(squares), ndif.save(table), ndif.save(caught)
        return picked, squares, table, caught, logits

    both(run)


def test_print_comes_back_as_log_lines(llama, capsys) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[1].output
            print("shape", hidden.shape)
            print(f"norm {hidden.norm().item():.4f}")
            print("a", 1, 2.5, None, sep="|")
            print(hidden[0, -1, :3])
            print("two\nlines")
            print()
            print("end", end="!\n")
        return None

    run(None)
    local = capsys.readouterr().out
    run("local")
    wire = capsys.readouterr().out
    assert SERVED == ["trace"]
    assert "shape torch.Size" in local
    assert wire == local


# -- batching ----------------------------------------------------------------------------------


def test_invokes_of_different_lengths_and_an_empty_invoke(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(SHORT):
                short = layers[1].output.save()
                short_logits = model.lm_head.output.save()
            with tracer.invoke([LONG, MID]):
                layers[1].output[:, -1] = 0
                pair_logits = model.lm_head.output.save()
            with tracer.invoke():
                whole = model.lm_head.output.save()
        return short, short_logits, pair_logits, whole

    local, _ = both(run)
    assert local[2].shape[0] == 2 and local[3].shape[0] == 3


def test_activation_patching_with_a_barrier(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])

    def run(remote):
        with model.trace(remote=remote) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke("The Colosseum is in"):
                clean = layers[1].output[:, -1]
                barrier()
                source_logits = model.lm_head.output.save()
            with tracer.invoke(MID):
                barrier()
                layers[1].output[:, -1] = clean
                patched_logits = model.lm_head.output.save()
        return source_logits, patched_logits

    both(run)


# -- generation --------------------------------------------------------------------------------


def test_generate_with_all_and_per_step_edits(arch) -> None:
    model, names = arch
    layers = sub(model, names["layers"])
    steer = torch.randn(model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))

    def run(remote):
        with model.generate(PROMPT, **GREEDY, remote=remote) as tracer:
            outputs = [].save()
            steps = [].save()
            for step in tracer.all():
                layers[1].output[:] += steer
                outputs.append(layers[2].output.clone())
                steps.append(step)
            tokens = tracer.result.save()
        return outputs, steps, tokens

    local, _ = both(run)
    assert local[1] == [0, 1, 2, 3]


def test_generate_with_iter_slice_and_next(llama) -> None:
    def run(remote):
        with llama.generate(**GREEDY, remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                sliced = [].save()
                for step in tracer.iter[1:3]:
                    sliced.append((step, llama.lm_head.output.argmax(dim=-1)))
                tokens = tracer.result.save()
            with tracer.invoke(OTHER):
                listed = [].save()
                for _ in tracer.iter[[0, 3]]:
                    listed.append(llama.model.layers[0].output.clone())
        return sliced, listed, tokens

    both(run)


def test_generate_with_next_and_an_edit_at_one_step(llama) -> None:
    def run(remote):
        with llama.generate(PROMPT, **GREEDY, remote=remote) as tracer:
            first = llama.model.layers[1].output.save()
            tracer.next()
            second = llama.model.layers[1].output.save()
            llama.model.layers[1].output = llama.model.layers[1].output * 10
            llama.model.layers[3].next()
            third = llama.model.layers[3].output.save()
            tokens = tracer.result.save()
        return first, second, third, tokens

    both(run)


def test_generate_with_invokes(llama) -> None:
    def run(remote):
        with llama.generate(**GREEDY, remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                for _ in tracer.all():
                    llama.model.layers[1].output[:, -1] = 0
                first = tracer.result.save()
            with tracer.invoke(OTHER):
                second = tracer.result.save()
        return first, second

    both(run)


# -- gradients ---------------------------------------------------------------------------------


def test_gradient_read(grad_llama) -> None:
    model = grad_llama

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            hidden = model.model.layers[1].output
            loss = model.lm_head.output.sum()
            with loss.backward():
                grad = hidden.grad.save()
        return grad

    local, _ = both(run)
    assert local.abs().sum() > 0


def test_gradient_edits(grad_llama) -> None:
    model = grad_llama

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            h0 = model.model.layers[0].output
            h1 = model.model.layers[1].output
            h2 = model.model.layers[2].output
            logit = model.lm_head.output[0, -1, 7]
            with logit.backward():
                g2 = h2.grad.save()
                h2.grad = h2.grad * 0.5
                g1 = h1.grad.save()
                h1.grad[:, 0] = 0
                g0 = h0.grad.save()
        return g2, g1, g0

    both(run)
    for parameter in model.parameters():
        parameter.grad = None


# -- sessions and scans ------------------------------------------------------------------------


def test_session_values_flow_between_traces(llama) -> None:
    def run(remote):
        with llama.session(remote=remote):
            with llama.trace(OTHER):
                hidden = llama.model.layers[1].output[:, -1]
            with llama.trace(PROMPT):
                llama.model.layers[1].output[:, -1] = hidden
                logits = llama.lm_head.output.save()
            doubled = (logits * 2).save()
            unsaved = logits * 3
        return logits, doubled

    both(run)


def test_session_of_generate_and_trace(llama) -> None:
    def run(remote):
        with llama.session(remote=remote):
            with llama.generate(PROMPT, **GREEDY) as tracer:
                tokens = tracer.result.save()
            with llama.trace(tokens):
                logits = llama.lm_head.output.save()
        return tokens, logits

    both(run)


def test_scan_on_an_undispatched_model(tiny_llama_path) -> None:
    model = ndif.LanguageModel(tiny_llama_path)
    assert not model.dispatched

    def run(remote):
        with model.scan(PROMPT, remote=remote):
            mlp_shape = ndif.save(tuple(model.model.layers[1].mlp.output.shape))
            layer_shape = ndif.save(tuple(model.model.layers[1].output.shape))
            logits_shape = ndif.save(tuple(model.lm_head.output.shape))
            logits_dtype = ndif.save(model.lm_head.output.dtype)
        return layer_shape, mlp_shape, logits_shape, logits_dtype

    local, _ = both(run)
    assert local[0][0] == 1
    assert not model.dispatched
    assert all(parameter.is_meta for parameter in model.parameters())


def test_scan_with_invokes(tiny_llama_path) -> None:
    model = ndif.LanguageModel(tiny_llama_path)

    def run(remote):
        with model.scan(remote=remote) as tracer:
            with tracer.invoke(PROMPT):
                first = ndif.save(tuple(model.model.layers[1].output.shape))
            with tracer.invoke([OTHER, LONG]):
                second = ndif.save(tuple(model.lm_head.output.shape))
        return first, second

    both(run)
    assert not model.dispatched


# -- values captured from the caller's scope ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steering_tensor(arch, dtype) -> None:
    model, names = arch
    layers = sub(model, names["layers"])
    width = model.lm_head.weight.shape[1]
    steer = torch.randn(width, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            layers[1].output = layers[1].output + steer.float() * 4
            layers[2].output[:, -1] += steer
            echoed = ndif.save(steer)
            logits = model.lm_head.output.save()
        return echoed, logits

    local, wire = both(run)
    assert wire[0].dtype == dtype


def test_numpy_array(llama) -> None:
    direction = np.linspace(-1, 1, 64, dtype=np.float32)
    positions = np.array([0, 2, 4], dtype=np.int64)

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[1].output
            projected = (hidden @ torch.tensor(direction)).save()
            picked = hidden[:, torch.tensor(positions)].save()
            echoed = ndif.save(direction)
            doubled = ndif.save(positions * 2)
        return projected, picked, echoed, doubled

    both(run)


def test_plain_python_values(llama) -> None:
    count = 2
    big = 2**70
    negative_big = -(2**65)
    factor = 0.5
    infinite = float("inf")
    specials = [float("-inf"), float("nan"), -0.0, 1e-310]
    imaginary = 1.5 - 2j
    raw = b"\x00\xffbytes"
    window = slice(1, None, 2)
    everything = ...
    chosen = {1, 3}
    frozen = frozenset({"a", "b"})
    keyed = {1: "one", (2, 3): "pair", None: "none", 2.5: "float", b"k": "bytes", "s": {"nested": [1, (2,)]}}
    nested = ((1, (2, (3, ()))), [4, (5, [6])], {"t": (7,)})
    dtype = torch.float16
    device = torch.device("cpu")

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[count].output
            strided = hidden[:, window].save()
            last = hidden[everything, -1].save()
            scaled = (hidden * factor).save()
            half = hidden.to(dtype).to(device).save()
            flags = ndif.save([i in chosen for i in range(4)])
            values = ndif.save(
                [count, big, negative_big, factor, infinite, specials, imaginary, raw, window, everything]
            )
            containers = ndif.save([chosen, frozen, keyed, nested, dtype, device])
            made = ndif.save({(count, "x"): abs(imaginary), frozenset({count}): math.isinf(infinite)})
        return strided, last, scaled, half, flags, values, containers, made

    both(run)


def test_a_tensor_saved_twice_comes_back_as_one_object(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[1].output.save()
            alias = hidden
            pair = ndif.save((hidden, hidden))
        return hidden, alias, pair

    local, wire = both(run)
    assert local[0] is local[1] is local[2][0]
    assert wire[0] is wire[1] is wire[2][0] is wire[2][1]


def test_a_captured_none(llama) -> None:
    nothing = None
    mask = None

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            value = ndif.save([nothing])
            hidden = llama.model.layers[0].output
            kept = (hidden if mask is None else hidden * 0).save()
        return value, kept

    both(run)


def helper_with_a_global(x: torch.Tensor) -> torch.Tensor:
    """A helper reading a module constant and another helper."""
    return normalize(x) * SCALE


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_shifter(offset: float):
    def shift(x):
        return x + offset * SCALE

    return shift


def test_helper_functions_with_globals_and_closures(llama) -> None:
    shift = make_shifter(0.25)

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[1].output
            normed = helper_with_a_global(hidden).save()
            shifted = shift(hidden).save()
            llama.model.layers[2].output = shift(llama.model.layers[2].output)
            logits = llama.lm_head.output.save()
        return normed, shifted, logits

    both(run)


def typed_helper(x: Any, factor: float | None = None) -> Any:
    """A helper annotated with typing.Any (annotation names travel with a function)."""
    return x * (factor or SCALE)


def test_a_helper_annotated_with_typing_any(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            llama.model.layers[1].output = typed_helper(llama.model.layers[1].output, 0.5)
            logits = llama.lm_head.output.save()
        return logits

    both(run)


def clipped_depth(x: torch.Tensor, depth: int) -> torch.Tensor:
    """A recursive helper."""
    return x if depth == 0 else clipped_depth(torch.tanh(x), depth - 1)


def test_a_recursive_helper(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            squashed = clipped_depth(llama.model.layers[1].output, 3).save()
        return squashed

    both(run)


def test_complex_tensors_and_a_conjugate_view(llama) -> None:
    spectrum = torch.fft.fft(torch.randn(64, generator=torch.Generator().manual_seed(5)))
    conjugate = spectrum.conj()  # a lazy view: the conjugate bit is set

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[1].output
            mixed = (hidden + spectrum.real + conjugate.imag).save()
            echoed = ndif.save((spectrum, conjugate))
        return mixed, echoed

    both(run)


def test_a_lambda(llama) -> None:
    double = lambda x: x * 2  # noqa: E731 (a lambda is the thing under test)

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            llama.model.layers[1].output = double(llama.model.layers[1].output)
            logits = llama.lm_head.output.save()
        return logits

    both(run)


class Scaler:
    """A user class (not a module) the body instantiates."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor + SCALE

    def describe(self) -> str:
        return f"Scaler({self.factor})"


def test_a_user_class(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            scaler = Scaler(0.5)
            llama.model.layers[1].output = scaler(llama.model.layers[1].output)
            described = ndif.save(scaler.describe())
            logits = llama.lm_head.output.save()
        return described, logits

    both(run)


class TinySAE(torch.nn.Module):
    """A sparse autoencoder: parameters, a buffer, a child module and encode/decode methods."""

    def __init__(self, width: int, features: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.encoder = torch.nn.Linear(width, features)
        self.decoder = torch.nn.Parameter(torch.randn(features, width, generator=generator) * 0.1)
        self.register_buffer("center", torch.randn(width, generator=generator))
        self.features = features

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.center))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.decoder + self.center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def test_user_modules_a_probe_and_an_sae(llama) -> None:
    torch.manual_seed(0)
    probe = torch.nn.Linear(64, 2)
    sae = TinySAE(64, 16).eval()

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = llama.model.layers[1].output
            scores = probe(hidden).save()
            codes = sae.encode(hidden).save()
            recon = sae.decode(codes).save()
            llama.model.layers[1].output = sae(hidden)
            n_features = ndif.save(sae.features)
            logits = llama.lm_head.output.save()
        return scores, codes, recon, n_features, logits

    both(run)


def test_a_sequential_probe_with_numbered_children(llama) -> None:
    torch.manual_seed(0)
    probe = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            scores = probe(llama.model.layers[1].output).save()
        return scores

    both(run)


def test_a_library_function_captured_as_a_variable(llama) -> None:
    act = torch.nn.functional.gelu
    reduce = torch.mean

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            llama.model.layers[1].output = act(llama.model.layers[1].output)
            mean = reduce(llama.model.layers[2].output, dim=-1).save()
            logits = llama.lm_head.output.save()
        return mean, logits

    both(run)


def test_an_envoy_captured_before_the_trace(llama) -> None:
    layer = llama.model.layers[2]
    head = llama.lm_head
    layer_list = llama.model.layers

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            hidden = layer.output.save()
            layer_list[3].output[:] = 0
            logits = head.output.save()
        return hidden, logits

    both(run)


def test_lists_defined_before_the_trace_come_back_with_the_servers_contents(llama) -> None:
    def run(remote):
        collected = []
        marked = ["before"]
        with llama.trace(PROMPT, remote=remote):
            for i in range(3):
                collected.append(llama.model.layers[i].output)
            ndif.save(collected)
            marked.append(llama.lm_head.output.argmax(dim=-1))
            marked.save()
        return collected, marked

    local, wire = both(run)
    assert len(wire[0]) == 3 and wire[1][0] == "before" and len(wire[1]) == 2


def test_dicts_mutated_in_the_body(llama) -> None:
    def run(remote):
        found = {}
        with llama.trace(PROMPT, remote=remote):
            for i in range(2):
                found[i] = llama.model.layers[i].output.norm().item()
            ndif.save(found)
        return found

    both(run)


# -- refusals ----------------------------------------------------------------------------------


def _refused(model: ndif.LanguageModel, run: Any, *fragments: str) -> WireError:
    """``run("local")`` raises WireError on the client, naming every fragment.

    docs/wire-format.md: refused values (including "a module of another model") get a
    WireError that "names the variable and its type".
    """
    with pytest.raises(WireError) as info:
        run("local")
    assert SERVED == [], "the request was sent although it holds a value that cannot travel"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


class NotAModule:
    def __init__(self) -> None:
        self.value = 1


def test_refuses_an_open_file(llama, tmp_path) -> None:
    with open(tmp_path / "notes.txt", "w") as handle:

        def run(remote):
            with llama.trace(PROMPT, remote=remote):
                handle.write("x")
                h = llama.model.layers[0].output.save()
            return h

        _refused(llama, run, "'handle'", "TextIOWrapper")


def test_refuses_a_lock(llama) -> None:
    lock = threading.Lock()

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            lock.acquire()
            h = llama.model.layers[0].output.save()
        return h

    _refused(llama, run, "'lock'", "lock")


def test_refuses_a_generator(llama) -> None:
    numbers = (i for i in range(3))

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            first = ndif.save(next(numbers))
        return first

    _refused(llama, run, "'numbers'", "generator")


def test_refuses_a_socket(llama) -> None:
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:

        def run(remote):
            with llama.trace(PROMPT, remote=remote):
                connection.send(b"x")
                h = llama.model.layers[0].output.save()
            return h

        _refused(llama, run, "'connection'", "socket")
    finally:
        connection.close()


def test_refuses_a_file_like_object(llama) -> None:
    buffer = io.BytesIO(b"data")

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            data = ndif.save(buffer.read())
        return data

    _refused(llama, run, "'buffer'", "BytesIO")


def test_refuses_the_os_module(llama) -> None:
    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            where = ndif.save(os.getcwd())
        return where

    _refused(llama, run, "'os'", "module", "os")


def test_refuses_an_instance_of_a_user_class(llama) -> None:
    thing = NotAModule()

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            value = ndif.save(thing.value)
        return value

    _refused(llama, run, "'thing'", "NotAModule")


def test_refuses_a_value_nested_in_a_container(llama) -> None:
    lock = threading.Lock()
    settings = {"scale": 2, "lock": lock}

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            scale = ndif.save(settings["scale"])
        return scale

    _refused(llama, run, "'settings'", "lock")


def test_refuses_a_function_whose_source_cannot_be_read(llama) -> None:
    namespace: dict[str, Any] = {}
    exec(compile("def hidden_helper(x):\n    return x * 2\n", "<no such file>", "exec"), namespace)
    hidden_helper = namespace["hidden_helper"]

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            h = hidden_helper(llama.model.layers[0].output).save()
        return h

    _refused(llama, run, "'hidden_helper'", "source")


def test_refuses_an_envoy_of_another_model(llama, gpt2) -> None:
    other_layer = gpt2.transformer.h[1]

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            h = other_layer.output.save()
        return h

    _refused(llama, run, "'other_layer'", "transformer.h.1", "another model")


def test_refuses_an_envoy_of_another_model_with_the_same_paths(llama, tiny_llama_path) -> None:
    twin = ndif.LanguageModel(tiny_llama_path)
    twin_layer = twin.model.layers[1]

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            h = twin_layer.output.save()
        return h

    _refused(llama, run, "'twin_layer'", "model.layers.1", "another model")


def test_refuses_another_model_itself(llama, gpt2) -> None:
    other = gpt2

    def run(remote):
        with llama.trace(PROMPT, remote=remote):
            h = other.transformer.h[0].output.save()
        return h

    _refused(llama, run, "'other'", "another model")
