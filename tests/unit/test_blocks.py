"""Sessions, edits, scans, lazy loading, ``rename=``, ``tracer.cache()`` and ``trace=False``.

Expected values come from the reference models (the same checkpoints loaded plainly
by transformers) with ordinary forward hooks; ndif is never used to compute one.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoTokenizer

import ndif

PROMPT = "The Eiffel Tower is in"
OTHER = "One two"


@functools.cache
def _tokenizer(path: str):
    """The checkpoint's tokenizer, loaded plainly (left padding, as ndif batches)."""
    return AutoTokenizer.from_pretrained(path, padding_side="left")


def encode(reference, prompts) -> dict:
    """Token ids (and mask) of ``prompts`` for the reference model, without ndif."""
    return dict(_tokenizer(reference.name_or_path)(prompts, return_tensors="pt", padding=True))


@contextmanager
def hooked(*pairs):
    """Register ``(module, forward_hook)`` pairs for the duration of the block."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def recorder(store: dict, key):
    def hook(module, args, output):
        store[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    return hook


def zeroing(module, args, output):
    return torch.zeros_like(output)


def reference_logits(reference, model, prompt, *pairs) -> torch.Tensor:
    with torch.no_grad(), hooked(*pairs):
        return reference(**encode(reference, prompt)).logits


# -- session ---------------------------------------------------------------------------------


def test_session_values_flow_between_traces_without_save(llama, reference_llama):
    seen: dict = {}
    with torch.no_grad(), hooked((reference_llama.model.layers[1], recorder(seen, "other"))):
        reference_llama(**encode(reference_llama, OTHER))
    donor = seen["other"][:, -1]

    def patch_last(module, args, output):
        patched = output.clone()
        patched[:, -1] = donor
        return patched

    expected = reference_logits(reference_llama, llama, PROMPT, (reference_llama.model.layers[1], patch_last))
    clean = reference_logits(reference_llama, llama, PROMPT)
    assert not torch.allclose(expected, clean)

    with llama.session():
        with llama.trace(OTHER):
            hidden = llama.model.layers[1].output[:, -1]
        with llama.trace(PROMPT):
            llama.model.layers[1].output[:, -1] = hidden
            logits = llama.lm_head.output.save()

    torch.testing.assert_close(logits, expected)
    assert "hidden" not in locals()


def test_session_returns_only_saved_values(llama, reference_llama):
    seen: dict = {}
    with torch.no_grad(), hooked((reference_llama.model.layers[2], recorder(seen, "h"))):
        reference_llama(**encode(reference_llama, PROMPT))

    with llama.session():
        with llama.trace(PROMPT):
            kept = llama.model.layers[2].output.save()
            dropped = llama.model.layers[3].output
        doubled = kept * 2
        doubled_saved = (kept * 3).save()

    torch.testing.assert_close(kept, seen["h"])
    torch.testing.assert_close(doubled_saved, seen["h"] * 3)
    assert "dropped" not in locals()
    assert "doubled" not in locals()


# -- edit ------------------------------------------------------------------------------------


def test_edit_applies_to_the_edited_model_only(llama, reference_llama):
    mlp = reference_llama.model.layers[1].mlp
    expected = reference_logits(reference_llama, llama, PROMPT, (mlp, zeroing))
    clean = reference_logits(reference_llama, llama, PROMPT)
    assert not torch.allclose(expected, clean)

    with llama.edit() as (tracer, edited):
        llama.model.layers[1].mlp.output = torch.zeros_like(llama.model.layers[1].mlp.output)

    with edited.trace(PROMPT):
        mlp_out = edited.model.layers[1].mlp.output.save()
        edited_logits = edited.lm_head.output.save()
    with llama.trace(PROMPT):
        original_logits = llama.lm_head.output.save()

    assert (mlp_out == 0).all()  # the trace sees the edit's value
    torch.testing.assert_close(edited_logits, expected)
    torch.testing.assert_close(original_logits, clean)


def test_edit_is_replayed_on_every_trace_of_the_edited_model(llama, reference_llama):
    mlp = reference_llama.model.layers[2].mlp
    expected = {p: reference_logits(reference_llama, llama, p, (mlp, zeroing)) for p in (PROMPT, OTHER)}

    with llama.edit() as (tracer, edited):
        llama.model.layers[2].mlp.output[:] = 0

    for prompt in (PROMPT, OTHER, PROMPT):
        with edited.trace(prompt):
            logits = edited.lm_head.output.save()
        torch.testing.assert_close(logits, expected[prompt])


def test_edit_old_form_binds_the_edited_model(llama, reference_llama):
    mlp = reference_llama.model.layers[1].mlp
    expected = reference_logits(reference_llama, llama, PROMPT, (mlp, zeroing))
    clean = reference_logits(reference_llama, llama, PROMPT)

    with llama.edit() as edited:
        llama.model.layers[1].mlp.output[:] = 0

    with edited.trace(PROMPT):
        logits = edited.lm_head.output.save()
    with llama.trace(PROMPT):
        original = llama.lm_head.output.save()

    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(original, clean)


def test_edit_inplace_then_clear_edits(llama, reference_llama):
    mlp = reference_llama.model.layers[1].mlp
    expected = reference_logits(reference_llama, llama, PROMPT, (mlp, zeroing))
    clean = reference_logits(reference_llama, llama, PROMPT)

    try:
        with llama.edit(inplace=True):
            llama.model.layers[1].mlp.output[:] = 0
        with llama.trace(PROMPT):
            edited_logits = llama.lm_head.output.save()
        llama.clear_edits()
        with llama.trace(PROMPT):
            cleared_logits = llama.lm_head.output.save()
    finally:
        llama.clear_edits()

    torch.testing.assert_close(edited_logits, expected)
    torch.testing.assert_close(cleared_logits, clean)


def test_edit_on_a_fresh_model_with_trace_interventions_on_top(tiny_llama_path, reference_llama):
    """The trace's own interventions run after the stored edit: reading the edited
    module shows the edit; the trace's write composes with it."""
    model = ndif.LanguageModel(tiny_llama_path)
    mlp1 = reference_llama.model.layers[1].mlp
    seen: dict = {}

    def double(module, args, output):
        return output * 2

    expected = reference_logits(
        reference_llama,
        model,
        PROMPT,
        (mlp1, zeroing),
        (reference_llama.model.layers[2], recorder(seen, "h2")),
        (reference_llama.model.layers[3].mlp, double),
    )

    with model.edit(inplace=True):
        model.model.layers[1].mlp.output[:] = 0
    with model.trace(PROMPT):
        h2 = model.model.layers[2].output.save()
        model.model.layers[3].mlp.output = model.model.layers[3].mlp.output * 2
        logits = model.lm_head.output.save()

    torch.testing.assert_close(h2, seen["h2"])
    torch.testing.assert_close(logits, expected)


# -- scan ------------------------------------------------------------------------------------


def reference_shapes(reference, model, prompts) -> dict:
    seen: dict = {}
    pairs = [
        (reference.model.layers[1], recorder(seen, "layer")),
        (reference.model.layers[1].mlp, recorder(seen, "mlp")),
        (reference.lm_head, recorder(seen, "logits")),
    ]
    with torch.no_grad(), hooked(*pairs):
        reference(**encode(reference, prompts))
    return {key: (tuple(value.shape), value.dtype) for key, value in seen.items()}


def test_scan_undispatched_gives_shapes_without_loading(tiny_llama_path, reference_llama):
    model = ndif.LanguageModel(tiny_llama_path)
    assert not model.dispatched
    expected = reference_shapes(reference_llama, model, PROMPT)

    with model.scan(PROMPT):
        mlp_shape = tuple(model.model.layers[1].mlp.output.shape)
        layer_shape = tuple(model.model.layers[1].output.shape)
        logits_shape = tuple(model.lm_head.output.shape)
        logits_dtype = model.lm_head.output.dtype
        layer_shape = ndif.save(layer_shape)
        mlp_shape = ndif.save(mlp_shape)
        logits_shape = ndif.save(logits_shape)
        logits_dtype = ndif.save(logits_dtype)

    assert layer_shape == expected["layer"][0]
    assert mlp_shape == expected["mlp"][0]
    assert logits_shape == expected["logits"][0]
    assert logits_dtype == expected["logits"][1]
    assert model.dispatched is False
    assert all(parameter.is_meta for parameter in model.parameters())


def test_scan_batched_invokes_undispatched(tiny_llama_path, reference_llama):
    model = ndif.LanguageModel(tiny_llama_path)
    expected = reference_shapes(reference_llama, model, [PROMPT, OTHER])

    with model.scan() as tracer:
        with tracer.invoke(PROMPT):
            first = ndif.save(tuple(model.model.layers[1].output.shape))
        with tracer.invoke(OTHER):
            second = ndif.save(tuple(model.lm_head.output.shape))

    batch, width, hidden = expected["layer"][0]
    assert batch == 2
    assert first == (1, width, hidden)
    assert second == (1, *expected["logits"][0][1:])
    assert not model.dispatched


def test_scan_on_a_dispatched_model(llama, reference_llama):
    expected = reference_shapes(reference_llama, llama, PROMPT)
    weight_before = llama.lm_head.weight.detach().clone()

    with llama.scan(PROMPT):
        layer_shape = ndif.save(tuple(llama.model.layers[1].output.shape))
        logits_shape = ndif.save(tuple(llama.lm_head.output.shape))

    assert layer_shape == expected["layer"][0]
    assert logits_shape == expected["logits"][0]
    assert llama.dispatched
    assert torch.equal(llama.lm_head.weight, weight_before)
    with llama.trace(PROMPT):
        logits = llama.lm_head.output.save()
    torch.testing.assert_close(logits, reference_logits(reference_llama, llama, PROMPT))


# -- lazy loading ----------------------------------------------------------------------------


def test_new_model_dispatches_on_first_trace(tiny_llama_path, reference_llama):
    model = ndif.LanguageModel(tiny_llama_path)
    assert model.dispatched is False
    assert all(parameter.is_meta for parameter in model.parameters())
    text = repr(model)
    assert "LlamaDecoderLayer" in text and "lm_head" in text
    print(model)
    assert model.model.layers[1].mlp is not None  # navigation works before loading

    with model.trace(PROMPT):
        logits = model.lm_head.output.save()

    assert model.dispatched is True
    assert not any(parameter.is_meta for parameter in model.parameters())
    torch.testing.assert_close(logits, reference_logits(reference_llama, model, PROMPT))


def test_dispatch_true_loads_immediately(tiny_llama_path, reference_llama):
    model = ndif.LanguageModel(tiny_llama_path, dispatch=True)
    assert model.dispatched is True
    assert not any(parameter.is_meta for parameter in model.parameters())
    torch.testing.assert_close(model.lm_head.weight, reference_llama.lm_head.weight)
    print(model)


def test_new_model_dispatches_on_first_generate(tiny_llama_path, reference_llama):
    model = ndif.LanguageModel(tiny_llama_path)
    with torch.no_grad():
        expected = reference_llama.generate(
            **encode(reference_llama, PROMPT),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=_tokenizer(reference_llama.name_or_path).pad_token_id,
        )
    with model.generate(PROMPT, max_new_tokens=3, min_new_tokens=3, do_sample=False) as tracer:
        tokens = tracer.result.save()
    assert model.dispatched
    assert torch.equal(tokens, expected)


# -- rename ----------------------------------------------------------------------------------


def test_rename_aliases_reach_the_same_values(tiny_llama_path, reference_llama):
    model = ndif.LanguageModel(tiny_llama_path, rename={"model.layers": "layers", "self_attn": "attn"}, dispatch=True)
    seen: dict = {}
    with (
        torch.no_grad(),
        hooked(
            (reference_llama.model.layers[1].self_attn, recorder(seen, "attn")),
            (reference_llama.model.layers[2], recorder(seen, "layer")),
        ),
    ):
        reference_llama(**encode(reference_llama, PROMPT))

    assert model.layers is model.model.layers
    assert model.layers[1].attn is model.model.layers[1].self_attn

    with model.trace(PROMPT):
        attn = model.layers[1].attn.output[0].save()
        layer = model.layers[2].output.save()
    torch.testing.assert_close(attn, seen["attn"])
    torch.testing.assert_close(layer, seen["layer"])

    with model.trace(PROMPT):
        attn_by_name = model.model.layers[1].self_attn.output[0].save()
        model.layers[2].output[:] = 0
        logits = model.lm_head.output.save()
    torch.testing.assert_close(attn_by_name, seen["attn"])
    expected = reference_logits(reference_llama, model, PROMPT, (reference_llama.model.layers[2], zeroing))
    torch.testing.assert_close(logits, expected)


def test_rename_alias_that_shadows_an_existing_name_is_an_error(tiny_llama_path):
    with pytest.raises(ValueError):
        ndif.LanguageModel(tiny_llama_path, rename={"model.layers": "lm_head"})
    with pytest.raises(ValueError):
        ndif.LanguageModel(tiny_llama_path, rename={"self_attn": "mlp"})
    with pytest.raises(ValueError):
        ndif.LanguageModel(tiny_llama_path, rename={"model.norm": "output"})


def test_rename_gpt2_blocks_to_layers(tiny_gpt2_path, reference_gpt2):
    model = ndif.LanguageModel(tiny_gpt2_path, rename={"transformer.h": "layers"}, dispatch=True)
    seen: dict = {}
    with torch.no_grad(), hooked((reference_gpt2.transformer.h[1], recorder(seen, "h1"))):
        reference_gpt2(**encode(reference_gpt2, PROMPT))

    assert model.layers is model.transformer.h
    assert len(model.layers) == len(reference_gpt2.transformer.h)
    with model.trace(PROMPT):
        hidden = model.layers[1].output
        hidden = (hidden[0] if isinstance(hidden, tuple) else hidden).save()
    torch.testing.assert_close(hidden, seen["h1"])


# -- cache -----------------------------------------------------------------------------------


def test_cache_during_generate_has_one_entry_per_step(llama, reference_llama):
    steps = 3
    outputs: list[torch.Tensor] = []
    with torch.no_grad(), hooked((reference_llama.model.layers[1], lambda m, a, o: outputs.append(o.clone()))):
        reference_llama.generate(
            **encode(reference_llama, PROMPT),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=_tokenizer(reference_llama.name_or_path).pad_token_id,
        )
    assert len(outputs) == steps

    with llama.generate(PROMPT, max_new_tokens=steps, min_new_tokens=steps, do_sample=False) as tracer:
        cache = tracer.cache(modules=[llama.model.layers[1]])

    entries = cache["model.model.layers.1"].output
    assert isinstance(entries, list) and len(entries) == steps
    for got, want in zip(entries, outputs):
        torch.testing.assert_close(got, want)
    by_navigation = cache.model.model.layers[1].output
    assert len(by_navigation) == steps
    torch.testing.assert_close(by_navigation[2], outputs[2])


def test_cache_of_every_module_during_generate(llama, reference_llama):
    steps = 3
    outputs: list[torch.Tensor] = []
    with torch.no_grad(), hooked((reference_llama.lm_head, lambda m, a, o: outputs.append(o.clone()))):
        reference_llama.generate(
            **encode(reference_llama, PROMPT),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=_tokenizer(reference_llama.name_or_path).pad_token_id,
        )

    with llama.generate(PROMPT, max_new_tokens=steps, min_new_tokens=steps, do_sample=False) as tracer:
        cache = tracer.cache()

    assert "model.lm_head" in cache.keys()  # noqa: SIM118 (CacheView.keys() is the API under test)
    for path in ("model.lm_head", "model.model.layers.0", "model.model.layers.3.mlp", "model.model.norm"):
        assert len(cache[path]) == steps, path
    for got, want in zip(cache["model.lm_head"].output, outputs):
        torch.testing.assert_close(got, want)


# -- NNsight on a plain module ---------------------------------------------------------------


def test_nnsight_trace_false_returns_the_output(mlp):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    expected = mlp(x)
    model = ndif.NNsight(mlp)
    output = model.trace(x, trace=False)
    torch.testing.assert_close(output, expected)


def test_nnsight_trace_false_applies_stored_edits(mlp):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = mlp[2](torch.zeros(3, 8))
    model = ndif.NNsight(mlp)
    with model.edit(inplace=True):
        model[1].output = torch.zeros_like(model[1].output)
    output = model.trace(x, trace=False)
    torch.testing.assert_close(output, expected)
