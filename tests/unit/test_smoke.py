"""The first things a researcher does, checked against plain PyTorch forward hooks."""

from __future__ import annotations

import torch

import ndif


def test_save_and_zero_match_plain_hooks(llama, reference_llama):
    prompt = "The Eiffel Tower is in"
    ids = llama.tokenizer(prompt, return_tensors="pt")["input_ids"]

    with llama.trace(prompt):
        hidden = llama.model.layers[1].output.save()
        llama.model.layers[2].mlp.output[:, -1] = 0
        logits = llama.lm_head.output.save()
        unsaved = hidden * 2

    seen = {}
    handles = [
        reference_llama.model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("hidden", o.clone())),
        reference_llama.model.layers[2].mlp.register_forward_hook(
            lambda m, a, o: o.index_fill(1, torch.tensor([o.shape[1] - 1]), 0.0)
        ),
    ]
    try:
        with torch.no_grad():
            expected = reference_llama(ids).logits
    finally:
        for handle in handles:
            handle.remove()

    torch.testing.assert_close(hidden, seen["hidden"])
    torch.testing.assert_close(logits, expected)
    assert "unsaved" not in locals()


def test_values_unsaved_do_not_leak_into_the_caller(mlp):
    model = ndif.NNsight(mlp)
    with model.trace(torch.ones(2, 4)):
        kept = model[0].output.save()
        dropped = model[2].output
    assert kept.shape == (2, 8)
    assert "dropped" not in locals()
