"""The residual stream at a decoder layer's output, whichever backend serves the model.

A transformers decoder layer returns the stream itself (a tensor, or a tuple whose first
item it is): ``[batch, tokens, hidden]``. vLLM's returns ``(hidden, residual)``, flat
``[tokens, hidden]``, and the stream is their sum. These helpers read and change the stream
inside a trace the same way on both; positions are always the second-to-last axis.
"""

from __future__ import annotations

from typing import Any

import torch


def follow(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Move ``module`` (a probe or SAE, loaded on the CPU) to ``x``'s device, once: the
    activations it reads are on the model's GPU."""
    first = next(module.parameters(), None)
    if first is not None and first.device != x.device:
        module.to(x.device)


def split_residual(model: Any) -> bool:
    """Whether ``model``'s decoder layers return the stream as ``(hidden, residual)`` (vLLM)."""
    return bool(getattr(model, "splits_residual", False))


def read_stream(model: Any, output: Any) -> torch.Tensor:
    """The residual stream in a layer's ``output`` (a new tensor for vLLM, a view otherwise)."""
    if split_residual(model):
        return output[0] + output[1]
    return output[0] if isinstance(output, tuple) else output


def stream_part(output: Any) -> torch.Tensor:
    """The tensor of ``output`` that edits go into: adding to it adds to the stream."""
    return output[0] if isinstance(output, tuple) else output


def add_to_stream(model: Any, output: Any, delta: torch.Tensor, positions: Any = None) -> None:
    """Add ``delta`` (broadcast over tokens) to the stream in ``output``, in place, at
    ``positions`` (indices along the token axis; all tokens if None)."""
    part = stream_part(output)
    delta = delta.to(device=part.device, dtype=part.dtype)
    if positions is None:
        part += delta
    else:
        part[..., positions, :] += delta


def write_stream(model: Any, output: Any, stream: torch.Tensor) -> None:
    """Make the stream in ``output`` equal ``stream``, in place."""
    part = stream_part(output)
    if split_residual(model):
        stream = stream - output[1]
    part.copy_(stream.to(device=part.device, dtype=part.dtype))


def layer_output(model: Any, layer: int) -> Any:
    """``model.model.layers[layer].output``: the envoy value of a decoder layer's output."""
    return decoder_layers(model)[layer].output


def decoder_layers(model: Any) -> Any:
    """The envoy of the model's list of decoder layers (``model.model.layers`` and kin)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        envoy = model
        try:
            for part in path.split("."):
                envoy = getattr(envoy, part)
        except AttributeError:
            continue
        return envoy
    raise AttributeError(f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers and kin)")


def logit_lens(model: Any, stream: torch.Tensor) -> torch.Tensor:
    """Logits the model would give if ``stream`` were its last layer's output: its final
    norm, then its unembedding. Called inside a trace, the modules run plainly."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    if norm is None:
        transformer = getattr(model, "transformer", None)
        norm = getattr(transformer, "ln_f", None) if transformer is not None else None
    normed = norm(stream) if norm is not None else stream
    if isinstance(normed, tuple):
        normed = normed[0]
    compute = getattr(model, "compute_logits", None)  # vLLM: its lm_head cannot be called
    if compute is not None and split_residual(model):
        return compute(normed)
    return model.lm_head(normed)
