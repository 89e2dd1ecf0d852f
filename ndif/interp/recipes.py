"""A declarative layer over the tracing API for the common cases: steer, edit SAE features,
read probes, features, norms and the logit lens.

A `Recipe` is a list of such items; inside a trace it compiles to ordinary interventions
(reads and in-place edits of decoder layer outputs), so it mixes with raw code:

    recipe = ndif.interp.Recipe(
        ndif.interp.Steer(vector, scale=4.0),
        ndif.interp.ReadProbe(probe, layer=6, name="sentiment"),
    )
    with model.generate(prompt, max_new_tokens=20) as tracer:
        seen = recipe.run(model, tracer, steps=20)
    seen["sentiment"]  # one tensor per step: a score per token

At each step, a layer's edits are made first, in the recipe's order, then its reads see
the edited stream. Layers are visited in forward order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..engine.saving import save
from ..tracing.errors import IterationEnd
from .probes import LinearProbe
from .sae import SAE
from .stream import add_to_stream, decoder_layers, logit_lens, read_stream, write_stream
from .vectors import SteeringVector

PHASES = ("all", "prompt", "generation")


def _in_phase(phase: str, step: int) -> bool:
    return phase == "all" or (phase == "prompt") == (step == 0)


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")
    return phase


class Item(torch.nn.Module):
    """One thing a `Recipe` does at some layers. Items are modules so that a recipe built
    on a laptop travels to a server inside a remote trace."""

    layer: int

    def at(self) -> list[int]:
        """The decoder layers whose output it uses (its ``layer``, unless it has several)."""
        return [self.layer]


class Steer(Item):
    """Add ``scale * vector`` to the residual stream after each of ``layers``.

    ``layers`` defaults to the vector's own layer; ``phase`` is ``"all"`` steps, the
    ``"prompt"`` (step 0) or ``"generation"`` (later steps); ``positions`` picks prompt tokens
    (indices, negative from the end) at step 0."""

    def __init__(
        self,
        vector: SteeringVector | torch.Tensor,
        layers: Sequence[int] | int | None = None,
        scale: float = 1.0,
        phase: str = "all",
        positions: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.vector = vector if isinstance(vector, SteeringVector) else SteeringVector(vector)
        layers = layers if layers is not None else self.vector.layer
        if layers is None:
            raise ValueError("Steer needs layers (the vector has no layer of its own)")
        self.layers = [int(layers)] if isinstance(layers, int) else [int(layer) for layer in layers]
        self.scale = float(scale)
        self.phase = _check_phase(phase)
        self.positions = None if positions is None else [int(position) for position in positions]

    def at(self) -> list[int]:
        return list(self.layers)

    def edit(self, model: Any, output: Any, step: int) -> None:
        if _in_phase(self.phase, step):
            positions = self.positions if step == 0 else None
            add_to_stream(model, output, self.scale * self.vector.vector, positions)


class EditFeatures(Item):
    """Edit an SAE's features at its layer: ``clamp`` sets, ``add`` adds, ``scale`` multiplies
    (feature index or name -> value); the SAE's reconstruction error is kept."""

    def __init__(
        self,
        sae: SAE,
        layer: int | None = None,
        clamp: dict[int | str, float] | None = None,
        add: dict[int | str, float] | None = None,
        scale: dict[int | str, float] | None = None,
        phase: str = "all",
    ) -> None:
        super().__init__()
        self.sae = sae
        self.layer = _layer_of(layer, sae, "EditFeatures")
        self.clamp = _features(clamp, sae)
        self.add = _features(add, sae)
        self.scale = _features(scale, sae)
        self.phase = _check_phase(phase)

    def edit(self, model: Any, output: Any, step: int) -> None:
        if _in_phase(self.phase, step):
            stream = read_stream(model, output)
            edited, _ = self.sae.edit(stream, clamp=self.clamp, add=self.add, scale=self.scale)
            write_stream(model, output, edited)


def _features(edits: dict[int | str, float] | None, sae: SAE) -> dict[int, float]:
    return {sae.feature(which): float(value) for which, value in (edits or {}).items()}


class ReadProbe(Item):
    """A probe's score per token at ``layer`` (defaults to the probe's own)."""

    def __init__(self, probe: LinearProbe, layer: int | None = None, name: str = "probe") -> None:
        super().__init__()
        self.probe = probe
        self.layer = _layer_of(layer, probe, "ReadProbe")
        self.name = name

    def read(self, model: Any, output: Any) -> torch.Tensor:
        return self.probe(_tokens(read_stream(model, output)))


class ReadFeatures(Item):
    """Activations of chosen SAE ``features`` (indices or names) per token (``[tokens, len(features)]``)."""

    def __init__(
        self, sae: SAE, features: Sequence[int | str], layer: int | None = None, name: str = "features"
    ) -> None:
        super().__init__()
        self.sae = sae
        self.features = [sae.feature(which) for which in features]
        self.layer = _layer_of(layer, sae, "ReadFeatures")
        self.name = name

    def read(self, model: Any, output: Any) -> torch.Tensor:
        return self.sae.encode(_tokens(read_stream(model, output)))[:, self.features]


class ReadNorm(Item):
    """The residual stream's L2 norm per token at ``layer``."""

    def __init__(self, layer: int, name: str = "norm") -> None:
        super().__init__()
        self.layer = int(layer)
        self.name = name

    def read(self, model: Any, output: Any) -> torch.Tensor:
        return _tokens(read_stream(model, output)).float().norm(dim=-1)


class LogitLens(Item):
    """The top ``k`` tokens the logit lens gives at ``layer``, per token: ``[tokens, k, 2]``
    (token id, probability)."""

    def __init__(self, layer: int, k: int = 5, name: str = "logit_lens") -> None:
        super().__init__()
        self.layer = int(layer)
        self.k = int(k)
        self.name = name

    def read(self, model: Any, output: Any) -> torch.Tensor:
        logits = logit_lens(model, _tokens(read_stream(model, output)))
        top = torch.softmax(logits.float(), dim=-1).topk(self.k, dim=-1)
        return torch.stack([top.indices.float(), top.values], dim=-1)


def _tokens(stream: torch.Tensor) -> torch.Tensor:
    """``[tokens, hidden]`` for one request's stream (transformers adds a batch axis of 1)."""
    return stream.reshape(-1, stream.shape[-1])


def _layer_of(layer: int | None, artifact: Any, what: str) -> int:
    layer = layer if layer is not None else getattr(artifact, "layer", None)
    if layer is None:
        raise ValueError(f"{what} needs a layer (its {type(artifact).__name__} has none of its own)")
    return int(layer)


class Recipe(torch.nn.Module):
    """Interventions and observations to run at every step of a trace (see the module doc)."""

    def __init__(self, *items: Item) -> None:
        super().__init__()
        for item in items:
            if not isinstance(item, Item):
                raise TypeError(f"a Recipe holds Steer, EditFeatures, ReadProbe... items; got {type(item).__name__}")
        self.items = torch.nn.ModuleList(items)
        names = [item.name for item in items if hasattr(item, "read")]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"two observations share the name(s) {duplicates}: give each its own name")
        self.names = names

    def layers(self) -> list[int]:
        """The layers the recipe touches, in forward order."""
        return sorted({layer for item in self.items for layer in item.at()})

    def step(self, model: Any, step: int) -> dict[str, torch.Tensor]:
        """Apply the recipe at the current step of a trace; returns this step's observations."""
        envoys = decoder_layers(model)
        seen: dict[str, torch.Tensor] = {}
        for layer in self.layers():
            output = envoys[layer].output
            for item in self.items:
                if hasattr(item, "edit") and layer in item.at():
                    item.edit(model, output, step)
            for item in self.items:
                if hasattr(item, "read") and layer in item.at():
                    seen[item.name] = item.read(model, output).detach().float().cpu()
        return seen

    def run(self, model: Any, tracer: Any, steps: int | None = None) -> dict[str, list[torch.Tensor]]:
        """Inside a trace: apply the recipe at each of the first ``steps`` steps (every step
        if None); returns, per observation name, one tensor per step (saved: usable after
        the trace)."""
        observations = save({name: [] for name in self.names})
        loop = tracer.all() if steps is None else tracer.iter[:steps]
        try:
            for step in loop:
                for name, value in self.step(model, step).items():
                    observations[name].append(value)
        except IterationEnd:  # generation ended before ``steps``
            pass
        return observations
