"""The benchmark cases: what is timed, written once for both libraries.

Every traced case is one function taking the wrapped model (an ``ndif`` or an
``nnsight`` LanguageModel) and the `Inputs`. Both libraries capture a trace
body from source at its call site, so the very same ``with`` block runs under
each: the two do identical work, spelled identically. ``.save()`` on a list
works in both (ndif rewrites it at compile time; nnsight mounts ``save`` on
``object``).

Each function returns what its body saved, so `run.check_values` can compare
ndif's values with nnsight's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: Generation length of the ``generate`` case.
NEW_TOKENS = 8


@dataclass
class Inputs:
    """One input size: the pre-tokenized batch every call of that size uses."""

    label: str  # e.g. "1x16"
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pad_token_id: int
    # The envoys of every submodule, in the order their outputs are produced,
    # per wrapped model (keyed by id(model)); resolved outside the timed calls.
    envoys: dict[int, list[Any]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    @property
    def doubled_ids(self) -> torch.Tensor:
        return torch.cat([self.input_ids, self.input_ids])

    @property
    def doubled_mask(self) -> torch.Tensor:
        return torch.cat([self.attention_mask, self.attention_mask])


@dataclass
class Case:
    """One row of the table.

    ``plain(hf, inputs)`` is the same computation on an unwrapped transformers
    model; ``untraced(wrapped, inputs)`` replaces the traced call for the first
    row (the wrapped model's own module, called outside any trace);
    ``traced(wrapped, inputs)`` is the trace. ``accessed`` is how many module
    values the body requests (for the cost-per-module table).
    """

    name: str
    plain: Callable[[Any, Inputs], Any]
    traced: Callable[[Any, Inputs], Any] | None = None
    untraced: Callable[[Any, Inputs], Any] | None = None
    accessed: int | None = None
    generate: bool = False


# -- baselines: no ndif, no nnsight ------------------------------------------------------


def plain_forward(hf: torch.nn.Module, inputs: Inputs) -> Any:
    return hf(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)


def plain_forward_doubled(hf: torch.nn.Module, inputs: Inputs) -> Any:
    return hf(input_ids=inputs.doubled_ids, attention_mask=inputs.doubled_mask)


def generate_kwargs(inputs: Inputs) -> dict[str, Any]:
    # min_new_tokens: every run makes exactly NEW_TOKENS steps (random weights may emit EOS).
    return {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": inputs.pad_token_id,
    }


def plain_generate(hf: torch.nn.Module, inputs: Inputs) -> Any:
    return hf.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **generate_kwargs(inputs))


# -- the wrapped model, outside any trace -------------------------------------------------


def wrapped_forward(model: Any, inputs: Inputs) -> Any:
    """The wrapped model's own torch module: every submodule runs through the
    library's installed ``forward`` wrapper, with no trace open."""
    return model._module(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)


# -- traces ---------------------------------------------------------------------------------


def trace_trivial(model: Any, inputs: Inputs) -> Any:
    # Returns a value, as every real trace does: both libraries then pay for handing
    # saved values back, and the per-module costs measure module access alone.
    with model.trace(inputs.input_ids):
        nothing = [].save()
    return nothing


def trace_save_one(model: Any, inputs: Inputs) -> Any:
    with model.trace(inputs.input_ids):
        h = model.model.layers[3].output.save()
    return h


def trace_save_layers(model: Any, inputs: Inputs) -> Any:
    with model.trace(inputs.input_ids):
        h0 = model.model.layers[0].output.save()
        h1 = model.model.layers[1].output.save()
        h2 = model.model.layers[2].output.save()
        h3 = model.model.layers[3].output.save()
    return [h0, h1, h2, h3]


def trace_save_all(model: Any, inputs: Inputs) -> Any:
    envoys = inputs.envoys[id(model)]
    with model.trace(inputs.input_ids):
        outputs = [].save()
        for envoy in envoys:
            outputs.append(envoy.output.save())
    return outputs


def trace_edit_mlps(model: Any, inputs: Inputs) -> Any:
    with model.trace(inputs.input_ids):
        for layer in model.model.layers:
            layer.mlp.output[:, -1] = 0
    return None


def trace_edit_mlps_checked(model: Any, inputs: Inputs) -> Any:
    """`trace_edit_mlps` plus the logits, for the values check only (not timed)."""
    with model.trace(inputs.input_ids):
        for layer in model.model.layers:
            layer.mlp.output[:, -1] = 0
        logits = model.lm_head.output.save()
    return logits


def trace_two_invokes(model: Any, inputs: Inputs) -> Any:
    with model.trace() as tracer:
        with tracer.invoke(inputs.input_ids):
            first = model.model.layers[3].output.save()
        with tracer.invoke(inputs.input_ids):
            second = model.model.layers[3].output.save()
    return [first, second]


def generate_all_steps(model: Any, inputs: Inputs) -> Any:
    with model.generate(inputs.input_ids, **generate_kwargs(inputs)) as tracer:
        hidden = [].save()
        for _step in tracer.all():
            hidden.append(model.model.layers[3].output)
    return hidden


def cases(module_count: int) -> list[Case]:
    """The table's rows, in order."""
    return [
        Case("forward, no trace (wrapped)", plain_forward, untraced=wrapped_forward),
        Case("trace, trivial body (saves [])", plain_forward, trace_trivial, accessed=0),
        Case("trace, save 1 layer output", plain_forward, trace_save_one, accessed=1),
        Case("trace, save 4 layer outputs", plain_forward, trace_save_layers, accessed=4),
        Case(f"trace, save all {module_count} modules", plain_forward, trace_save_all, accessed=module_count),
        Case("trace, edit 4 mlp outputs in place", plain_forward, trace_edit_mlps),
        Case("trace, 2 invokes (batch x2)", plain_forward_doubled, trace_two_invokes),
        Case(f"generate {NEW_TOKENS} tokens, all() save", plain_generate, generate_all_steps, generate=True),
    ]
