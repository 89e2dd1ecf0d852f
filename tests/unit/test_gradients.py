"""``with loss.backward():`` inside traces, checked against plain autograd.

Expected gradients come from the reference model (the same checkpoint loaded plainly
by transformers): a forward hook captures a layer's output and calls
``retain_grad()`` on it (or registers a tensor hook that rescales its gradient), then
an ordinary ``loss.backward()`` runs. ndif is never used to compute an expectation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import ndif

PROMPT = "The Eiffel Tower is in"
OTHER = "One two"
TOKEN = 7  # the logit a "specific logit" loss is taken from


@functools.cache
def _tokenizer(path: str):
    """The checkpoint's tokenizer, loaded plainly (left padding, as ndif batches)."""
    return AutoTokenizer.from_pretrained(path, padding_side="left")


def encode(reference, prompts) -> dict:
    """Token ids (and mask) of ``prompts`` for the reference model, without ndif."""
    return dict(_tokenizer(reference.name_or_path)(prompts, return_tensors="pt", padding=True))


class Captured:
    """Forward hooks on the reference's decoder layers that keep their outputs' gradients.

    ``scale`` maps a layer index to a factor its output's gradient is multiplied by
    (a tensor hook), as ``h.grad = h.grad * factor`` does in ndif.
    """

    def __init__(self, reference, layers: list[int], scale: dict[int, float] | None = None) -> None:
        self.reference = reference
        self.outputs: dict[int, torch.Tensor] = {}
        self.scale = scale or {}
        self.handles = [reference.model.layers[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, index: int):
        def hook(module, args, output):
            assert isinstance(output, torch.Tensor)
            output.retain_grad()
            if index in self.scale:
                factor = self.scale[index]
                output.register_hook(lambda grad: grad * factor)
            self.outputs[index] = output

        return hook

    def __enter__(self) -> Captured:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def logits_sum(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum()


def test_grad_of_a_layer_output_equals_retain_grad(grad_llama, reference_llama):
    with Captured(reference_llama, [1]) as captured:
        reference_llama(**encode(reference_llama, PROMPT)).logits.sum().backward()
    expected = captured.outputs[1].grad
    assert expected is not None and expected.abs().sum() > 0

    with grad_llama.trace(PROMPT):
        hidden = grad_llama.model.layers[1].output
        loss = grad_llama.lm_head.output.sum()
        with loss.backward():
            grad = hidden.grad.save()

    assert grad.shape == expected.shape
    torch.testing.assert_close(grad, expected)


def test_grad_of_a_specific_logit_equals_autograd_grad(grad_llama, reference_llama):
    with Captured(reference_llama, [2]) as captured:
        logits = reference_llama(**encode(reference_llama, PROMPT)).logits
    (expected,) = torch.autograd.grad(logits[0, -1, TOKEN], captured.outputs[2])

    with grad_llama.trace(PROMPT):
        hidden = grad_llama.model.layers[2].output
        logit = grad_llama.lm_head.output[0, -1, TOKEN]
        with logit.backward():
            grad = hidden.grad.save()

    torch.testing.assert_close(grad, expected)
    # only positions up to the last one can influence the last logit; all of them do here
    assert grad[0, -1].abs().sum() > 0


def test_two_grads_in_reverse_forward_order(grad_llama, reference_llama):
    with Captured(reference_llama, [1, 3]) as captured:
        reference_llama(**encode(reference_llama, PROMPT)).logits.sum().backward()

    with grad_llama.trace(PROMPT):
        h1 = grad_llama.model.layers[1].output
        h3 = grad_llama.model.layers[3].output
        loss = grad_llama.lm_head.output.sum()
        with loss.backward():
            g3 = h3.grad.save()
            g1 = h1.grad.save()

    torch.testing.assert_close(g3, captured.outputs[3].grad)
    torch.testing.assert_close(g1, captured.outputs[1].grad)
    assert not torch.allclose(g1, g3)


def test_grads_in_forward_order_raise_at_the_users_line(grad_llama):
    with pytest.raises(ndif.NDIFError) as excinfo:  # noqa: SIM117 (a trace is its own `with` statement)
        with grad_llama.trace(PROMPT):
            h1 = grad_llama.model.layers[1].output
            h3 = grad_llama.model.layers[3].output
            loss = grad_llama.lm_head.output.sum()
            with loss.backward():
                g1 = h1.grad.save()
                g3 = h3.grad.save()

    assert "reverse order" in str(excinfo.value)
    last = excinfo.traceback[-1]
    assert Path(str(last.path)) == Path(__file__)
    assert "g3 = h3.grad.save()" in str(last.statement)


def test_scaling_a_grad_scales_upstream_grads_like_a_tensor_hook(grad_llama, reference_llama):
    with Captured(reference_llama, [0, 1], scale={1: 2.0}) as captured:
        reference_llama(**encode(reference_llama, PROMPT)).logits.sum().backward()
    expected_h0 = captured.outputs[0].grad
    expected_weight = reference_llama.model.layers[0].mlp.down_proj.weight.grad.clone()
    expected_embed = reference_llama.model.embed_tokens.weight.grad.clone()
    expected_head = reference_llama.lm_head.weight.grad.clone()

    with Captured(reference_llama, [1]) as unscaled:
        reference_llama.zero_grad(set_to_none=True)
        reference_llama(**encode(reference_llama, PROMPT)).logits.sum().backward()
    plain_h1 = unscaled.outputs[1].grad
    plain_weight = reference_llama.model.layers[0].mlp.down_proj.weight.grad
    torch.testing.assert_close(expected_weight, plain_weight * 2)  # the hook did double it

    with grad_llama.trace(PROMPT):
        h0 = grad_llama.model.layers[0].output
        h1 = grad_llama.model.layers[1].output
        loss = grad_llama.lm_head.output.sum()
        with loss.backward():
            g1 = h1.grad.save()
            h1.grad = h1.grad * 2
            g0 = h0.grad.save()

    torch.testing.assert_close(g1, plain_h1)  # read before the write: the original gradient
    torch.testing.assert_close(g0, expected_h0)
    torch.testing.assert_close(grad_llama.model.layers[0].mlp.down_proj.weight.grad, expected_weight)
    torch.testing.assert_close(grad_llama.model.embed_tokens.weight.grad, expected_embed)
    torch.testing.assert_close(grad_llama.lm_head.weight.grad, expected_head)


def test_zeroing_a_grad_zeroes_every_upstream_grad(grad_llama, reference_llama):
    with Captured(reference_llama, [2], scale={2: 0.0}):
        reference_llama(**encode(reference_llama, PROMPT)).logits.sum().backward()
    expected_embed = reference_llama.model.embed_tokens.weight.grad
    expected_layer0 = reference_llama.model.layers[0].self_attn.q_proj.weight.grad
    expected_layer3 = reference_llama.model.layers[3].mlp.up_proj.weight.grad
    assert (expected_embed == 0).all() and (expected_layer0 == 0).all()
    assert expected_layer3.abs().sum() > 0  # downstream of the zeroed gradient

    with grad_llama.trace(PROMPT):
        h2 = grad_llama.model.layers[2].output
        loss = grad_llama.lm_head.output.sum()
        with loss.backward():
            h2.grad = h2.grad * 0

    torch.testing.assert_close(grad_llama.model.embed_tokens.weight.grad, expected_embed)
    torch.testing.assert_close(grad_llama.model.layers[0].self_attn.q_proj.weight.grad, expected_layer0)
    torch.testing.assert_close(grad_llama.model.layers[3].mlp.up_proj.weight.grad, expected_layer3)


def test_augmented_grad_assignment_scales_like_a_tensor_hook(grad_llama, reference_llama):
    with Captured(reference_llama, [0, 2], scale={2: 3.0}) as captured:
        reference_llama(**encode(reference_llama, PROMPT)).logits.sum().backward()

    with grad_llama.trace(PROMPT):
        h0 = grad_llama.model.layers[0].output
        h2 = grad_llama.model.layers[2].output
        loss = grad_llama.lm_head.output.sum()
        with loss.backward():
            h2.grad *= 3
            g0 = h0.grad.save()

    torch.testing.assert_close(g0, captured.outputs[0].grad)


def _padded_reference_grads(reference, model, layer: int, loss_of_row) -> list[torch.Tensor]:
    """Per-row gradients at ``layer``'s output on the left-padded batch, with the position
    ids ndif uses for a padded batch (each row counts from its first real token)."""
    batch = encode(reference, [PROMPT, OTHER])
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    grads = []
    for row in range(2):
        with Captured(reference, [layer]) as captured:
            logits = reference(**batch, position_ids=position_ids).logits
        (grad,) = torch.autograd.grad(loss_of_row(logits[row]), captured.outputs[layer])
        grads.append(grad[row : row + 1])
    return grads


def test_grads_with_two_invokes_are_each_invokes_own_rows(grad_llama, reference_llama):
    expected = _padded_reference_grads(reference_llama, grad_llama, 1, lambda logits: logits.sum())
    other_alone = encode(reference_llama, OTHER)["input_ids"].shape[1]

    with grad_llama.trace() as tracer:
        with tracer.invoke(PROMPT):
            ha = grad_llama.model.layers[1].output
            loss_a = grad_llama.lm_head.output.sum()
            with loss_a.backward(retain_graph=True):
                ga = ha.grad.save()
        with tracer.invoke(OTHER):
            hb = grad_llama.model.layers[1].output
            loss_b = grad_llama.lm_head.output.sum()
            with loss_b.backward():
                gb = hb.grad.save()

    assert ga.shape == expected[0].shape
    assert gb.shape == expected[1].shape  # padded to the batch's width
    assert gb.shape[1] > other_alone
    torch.testing.assert_close(ga, expected[0])
    torch.testing.assert_close(gb, expected[1])


def test_two_invoke_grads_match_each_prompt_alone_at_real_positions(grad_llama, reference_llama):
    """With a loss on each row's last token (the same real token in either layout), the
    gradient at the real positions equals the one from running that prompt alone."""
    alone = []
    for prompt in (PROMPT, OTHER):
        with Captured(reference_llama, [1]) as captured:
            logits = reference_llama(**encode(reference_llama, prompt)).logits
        alone.append(torch.autograd.grad(logits[0, -1].sum(), captured.outputs[1])[0])

    with grad_llama.trace() as tracer:
        with tracer.invoke(PROMPT):
            ha = grad_llama.model.layers[1].output
            loss_a = grad_llama.lm_head.output[:, -1].sum()
            with loss_a.backward(retain_graph=True):
                ga = ha.grad.save()
        with tracer.invoke(OTHER):
            hb = grad_llama.model.layers[1].output
            loss_b = grad_llama.lm_head.output[:, -1].sum()
            with loss_b.backward():
                gb = hb.grad.save()

    torch.testing.assert_close(ga, alone[0])
    real = alone[1].shape[1]
    torch.testing.assert_close(gb[:, -real:], alone[1])
    assert (gb[:, :-real] == 0).all()  # padding: masked out, no gradient


def test_whole_batch_backward_reads_each_invokes_rows(grad_llama, reference_llama):
    """A loss over the whole batch, backward in a no-input invoke; each invoke's tensor
    gets the gradient of its own rows."""
    batch = encode(reference_llama, [PROMPT, OTHER])
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with Captured(reference_llama, [1]) as captured:
        reference_llama(**batch, position_ids=position_ids).logits.sum().backward()
    expected = captured.outputs[1].grad

    with grad_llama.trace() as tracer:
        with tracer.invoke(PROMPT):
            ha = grad_llama.model.layers[1].output
        with tracer.invoke(OTHER):
            hb = grad_llama.model.layers[1].output
        with tracer.invoke():
            loss = grad_llama.lm_head.output.sum()
            with loss.backward():
                ga = ha.grad.save()
                gb = hb.grad.save()

    torch.testing.assert_close(ga, expected[0:1])
    torch.testing.assert_close(gb, expected[1:2])


def test_writing_one_invokes_grad_changes_only_its_rows_upstream(grad_llama, reference_llama):
    """``ha.grad = ha.grad * 0`` where ``ha`` is invoke #1's rows of a layer output: in a
    whole-batch backward only row 0's upstream gradient is zeroed (reference: a tensor
    hook zeroing row 0 of that layer's output gradient)."""
    batch = encode(reference_llama, [PROMPT, OTHER])
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    captured0: dict = {}

    def keep_h0(module, args, output):
        output.retain_grad()
        captured0["h0"] = output

    def zero_row0(module, args, output):
        output.register_hook(lambda grad: torch.cat([grad[:1] * 0, grad[1:]]))

    handles = [
        reference_llama.model.layers[0].register_forward_hook(keep_h0),
        reference_llama.model.layers[1].register_forward_hook(zero_row0),
    ]
    try:
        reference_llama(**batch, position_ids=position_ids).logits.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    expected = captured0["h0"].grad
    assert (expected[0] == 0).all() and expected[1].abs().sum() > 0

    with grad_llama.trace() as tracer:
        with tracer.invoke(PROMPT):
            ha = grad_llama.model.layers[1].output
        with tracer.invoke(OTHER):
            pass
        with tracer.invoke():
            h0 = grad_llama.model.layers[0].output
            loss = grad_llama.lm_head.output.sum()
            with loss.backward():
                ha.grad = ha.grad * 0
                g0 = h0.grad.save()

    torch.testing.assert_close(g0, expected)
