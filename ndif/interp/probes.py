"""Linear probes: a score per token from a layer's activations."""

from __future__ import annotations

from typing import Any

import torch

from .stream import follow

OUTPUTS = ("sigmoid", "softmax", "logit")


class LinearProbe(torch.nn.Module):
    """``output(x @ weight.T + bias)`` per token.

    Args:
        weight: ``[d_in]`` (one score) or ``[classes, d_in]``.
        bias: A number or ``[classes]``.
        output: ``"sigmoid"`` (a probability per token, the default for one score),
            ``"softmax"`` (over classes) or ``"logit"`` (the raw score).
        labels: Names of the classes (or of the one score).
        layer: The decoder layer whose output it reads, if known.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | float = 0.0,
        output: str = "sigmoid",
        labels: list[str] | None = None,
        layer: int | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() not in (1, 2):
            raise ValueError(f"a probe's weight is [d_in] or [classes, d_in]; got {tuple(weight.shape)}")
        if output not in OUTPUTS:
            raise ValueError(f"unknown probe output {output!r}: one of {', '.join(OUTPUTS)}")
        classes = 1 if weight.dim() == 1 else weight.shape[0]
        bias = torch.as_tensor(bias, dtype=weight.dtype).reshape(-1)
        if bias.numel() == 1 and classes > 1:
            bias = bias.expand(classes)
        if bias.numel() != classes:
            raise ValueError(f"a probe with {classes} classes needs {classes} biases; got {bias.numel()}")
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.output = output
        self.labels = list(labels) if labels else None
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores ``[...]`` for one score, ``[..., classes]`` otherwise."""
        follow(self, x)
        x = x.to(self.weight.dtype)
        if self.weight.dim() == 1:
            score = x @ self.weight + self.bias[0]
            return torch.sigmoid(score) if self.output == "sigmoid" else score
        score = x @ self.weight.T + self.bias
        if self.output == "softmax":
            return torch.softmax(score, dim=-1)
        return torch.sigmoid(score) if self.output == "sigmoid" else score

    score = forward

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, output={self.output!r}, layer={self.layer}"


def probe_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, **options: Any
) -> LinearProbe:
    """A `LinearProbe` from ``weight`` (and ``bias``) tensors; ``metadata`` and ``options``
    give ``output``, ``labels`` (comma-separated in metadata) and ``layer``."""
    settings: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if key == "output":
            settings[key] = value
        elif key == "layer":
            settings[key] = int(value)
        elif key == "labels":
            settings[key] = [label for label in value.split(",") if label]
    settings.update(options)
    if "weight" not in tensors:
        raise ValueError(f"not a probe's tensors (no weight): {sorted(tensors)[:8]}")
    return LinearProbe(tensors["weight"], tensors.get("bias", 0.0), **settings)
