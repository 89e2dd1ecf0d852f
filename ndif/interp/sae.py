"""Sparse autoencoders inline: encode a layer's activations, read and edit features, decode
back with the reconstruction error kept.

The parameters follow SAELens' layout: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, and ``threshold [d_sae]`` for JumpReLU.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .stream import follow

ACTIVATIONS = ("relu", "jumprelu", "topk")


class SAE(torch.nn.Module):
    """A sparse autoencoder over a model's residual stream (or any activation).

    Args:
        activation: ``"relu"``, ``"jumprelu"`` (features below ``threshold`` are zero) or
            ``"topk"`` (only the ``k`` largest features per token are kept).
        subtract_decoder_bias: Subtract ``b_dec`` from the input before encoding (SAELens'
            ``apply_b_dec_to_input``).
        layer: The decoder layer whose output it reads, if known.
        feature_names: Names of some features (index -> name, e.g. their explanations);
            anything that takes a feature takes its name too.
    """

    def __init__(
        self,
        W_enc: torch.Tensor,  # noqa: N803 - SAELens' names
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,  # noqa: N803
        b_dec: torch.Tensor,
        activation: str = "relu",
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        subtract_decoder_bias: bool = True,
        layer: int | None = None,
        feature_names: dict[int, str] | None = None,
    ) -> None:
        super().__init__()
        d_in, d_sae = W_enc.shape
        if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
            raise ValueError(
                f"SAE shapes do not fit: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                f"W_dec {tuple(W_dec.shape)} (expected {(d_sae, d_in)}), b_dec {tuple(b_dec.shape)}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown SAE activation {activation!r}: one of {', '.join(ACTIVATIONS)}")
        if activation == "jumprelu" and (threshold is None or threshold.shape != (d_sae,)):
            raise ValueError(f"a JumpReLU SAE needs a threshold of shape ({d_sae},)")
        if activation == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
            raise ValueError(f"a TopK SAE needs k between 1 and {d_sae}; got {k!r}")
        self.W_enc = torch.nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec.detach().clone(), requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        if threshold is not None:
            self.threshold = torch.nn.Parameter(threshold.detach().clone(), requires_grad=False)
        else:
            self.threshold = None
        self.activation = activation
        self.k = k
        self.subtract_decoder_bias = subtract_decoder_bias
        self.layer = layer
        self.feature_names = {int(index): str(name) for index, name in (feature_names or {}).items()}

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def feature(self, which: int | str) -> int:
        """A feature's index, from its index or its name."""
        if isinstance(which, str) and not which.lstrip("-").isdigit():
            for index, name in self.feature_names.items():
                if name == which:
                    return index
            known = ", ".join(repr(name) for name in list(self.feature_names.values())[:8]) or "none"
            raise ValueError(f"this SAE has no feature named {which!r} (named: {known})")
        index = int(which)
        if not 0 <= index < self.d_sae:
            raise ValueError(f"feature {index} is not one of the SAE's {self.d_sae}")
        return index

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of activations ``x`` ``[..., d_in]``."""
        follow(self, x)
        x = x.to(self.W_enc.dtype)
        if self.subtract_decoder_bias:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_in]`` of ``features``."""
        follow(self, features)
        return features @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def edit(
        self,
        x: torch.Tensor,
        clamp: dict[int | str, float] | None = None,
        add: dict[int | str, float] | None = None,
        scale: dict[int | str, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` with features edited; returns ``(edited x, the features before the edit)``.

        ``clamp`` sets features to values, ``add`` adds to them, ``scale`` multiplies them.
        The reconstruction error is kept: ``decode(edited) + (x - decode(features))``, so
        with no edit ``x`` comes back unchanged, and only the edited features move it.
        """
        features = self.encode(x)
        edited = features.clone()
        for which, value in (scale or {}).items():
            edited[..., self.feature(which)] *= value
        for which, value in (add or {}).items():
            edited[..., self.feature(which)] += value
        for which, value in (clamp or {}).items():
            edited[..., self.feature(which)] = value
        # decode(edited) - decode(features) == (edited - features) @ W_dec: the error term kept.
        delta = (edited - features) @ self.W_dec
        return (x + delta.to(x.dtype)), features

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.activation == "topk" else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{extra}, layer={self.layer}"


def sae_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, **options: Any) -> SAE:
    """An `SAE` from a state dict in SAELens' names (``W_enc``...) or as two linear layers
    (``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``decoder.weight [d_in, d_sae]``,
    ``decoder.bias``). ``metadata`` (a safetensors header's) and ``options`` give
    ``activation``, ``k``, ``layer`` and ``subtract_decoder_bias``."""
    settings: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if key == "activation":
            settings[key] = value
        elif key in ("k", "layer"):
            settings[key] = int(value)
        elif key == "feature_names":
            settings[key] = {int(index): name for index, name in json.loads(value).items()}
        elif key == "subtract_decoder_bias":
            settings[key] = value.lower() in ("1", "true", "yes")
    settings.update(options)
    if "W_enc" in tensors:
        weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    elif "encoder.weight" in tensors:
        weights = {
            "W_enc": tensors["encoder.weight"].T,
            "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["decoder.weight"].T,
            "b_dec": tensors["decoder.bias"],
        }
    else:
        raise ValueError(f"not an SAE's tensors (no W_enc or encoder.weight): {sorted(tensors)[:8]}")
    if "threshold" in tensors:
        settings.setdefault("activation", "jumprelu")
        settings["threshold"] = tensors["threshold"]
    return SAE(**weights, **settings)
