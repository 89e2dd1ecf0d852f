"""Steering vectors: computed from contrastive prompts, applied at chosen layers and positions.

vector = ndif.interp.contrast_vector(model, ["I love it"], ["I hate it"], layer=4)
with model.generate("The movie was", max_new_tokens=10) as tracer:
    for step in tracer.iter[:10]:
        vector.apply(model, scale=4.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .stream import add_to_stream, decoder_layers, read_stream


class SteeringVector(torch.nn.Module):
    """A direction in a model's residual stream, and the layer it was read at.

    A module only so that it travels to a server like any other (its ``vector`` is a buffer).

    Attributes:
        vector: ``[hidden]``.
        layer: The decoder layer it was computed at (the default layer to apply it at).
        method: How it was computed (``"mean_diff"``, ``"pca"``, or ``"given"``).
    """

    def __init__(self, vector: torch.Tensor, layer: int | None = None, method: str = "given", name: str = "") -> None:
        super().__init__()
        if vector.dim() != 1:
            raise ValueError(f"a steering vector is one direction ([hidden]); got shape {tuple(vector.shape)}")
        self.register_buffer("vector", vector.detach().clone())
        self.layer = layer
        self.method = method
        self.name = name

    def forward(self, stream: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``stream`` steered: ``stream + scale * vector``."""
        return stream + scale * self.vector.to(device=stream.device, dtype=stream.dtype)

    def unit(self) -> SteeringVector:
        """This direction with norm 1."""
        return SteeringVector(self.vector / self.vector.norm().clamp_min(1e-12), self.layer, self.method, self.name)

    def apply(
        self, model: Any, scale: float = 1.0, layers: Sequence[int] | int | None = None, positions: Any = None
    ) -> None:
        """Inside a trace, at the current step: add ``scale * vector`` to the residual stream
        at the output of each of ``layers`` (default: the layer it was computed at), at
        ``positions`` (token indices of this step; all if None)."""
        layers = _layers(layers if layers is not None else self.layer)
        envoys = decoder_layers(model)
        delta = scale * self.vector
        for layer in sorted(layers):
            add_to_stream(model, envoys[layer].output, delta, positions)

    def extra_repr(self) -> str:
        return f"hidden={self.vector.shape[0]}, layer={self.layer}, method={self.method!r}"


def _layers(layers: Sequence[int] | int | None) -> list[int]:
    if layers is None:
        raise ValueError("say which layers to steer at (this vector has no layer of its own)")
    return [layers] if isinstance(layers, int) else list(layers)


def contrast_vector(
    model: Any,
    positive: Sequence[Any],
    negative: Sequence[Any],
    layer: int,
    method: str = "mean_diff",
    position: int | str = -1,
    remote: Any = None,
) -> SteeringVector:
    """A steering vector from contrastive prompts: what separates ``positive`` from ``negative``
    in the residual stream at ``layer``'s output.

    Args:
        positive, negative: Prompts (text or token ids). For ``"pca"`` they are pairs: the
            i-th positive goes with the i-th negative.
        method: ``"mean_diff"``: the mean of the positives' activations minus the mean of the
            negatives'. ``"pca"``: the first principal component of the pairs' differences,
            signed to agree with the difference of means, scaled to its length.
        position: Which token's activation stands for a prompt: an index (default the last),
            or ``"mean"`` for the mean over the prompt's tokens.
        remote: Passed to each trace (run the traces on a server).
    """
    if not positive or not negative:
        raise ValueError("contrast_vector needs at least one positive and one negative prompt")
    if method == "pca" and len(positive) != len(negative):
        raise ValueError(f"pca pairs prompts: {len(positive)} positive but {len(negative)} negative")
    if method not in ("mean_diff", "pca"):
        raise ValueError(f"unknown method {method!r}: use 'mean_diff' or 'pca'")
    pos = stream_activations(model, positive, layer, position, remote)
    neg = stream_activations(model, negative, layer, position, remote)
    mean_diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return SteeringVector(mean_diff, layer, method)
    return SteeringVector(principal_direction(pos - neg, mean_diff), layer, method)


def principal_direction(differences: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The first principal component of ``differences`` (``[pairs, hidden]``, centred here),
    with the sign and length of its projection of ``reference``."""
    centred = differences - differences.mean(0)
    if len(differences) < 2 or centred.abs().max() == 0:
        return reference.clone()
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    direction = vh[0].to(reference.dtype)
    along = torch.dot(direction, reference)
    sign = 1.0 if along >= 0 else -1.0
    return sign * direction * along.abs()


def stream_activations(
    model: Any, prompts: Sequence[Any], layer: int, position: int | str = -1, remote: Any = None
) -> torch.Tensor:
    """``[len(prompts), hidden]``: each prompt's residual stream at ``layer``'s output, at
    ``position`` (an index, or ``"mean"``), float32 on the CPU."""
    rows = []
    for prompt in prompts:
        with model.trace(prompt, remote=remote):
            stream = read_stream(model, decoder_layers(model)[layer].output)
            tokens = stream.reshape(-1, stream.shape[-1])  # one prompt: its tokens' rows
            row = (tokens.mean(0) if position == "mean" else tokens[position]).float().cpu().save()
        rows.append(row)
    return torch.stack(rows)
