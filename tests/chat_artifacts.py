"""Chat artifacts for tests and benchmarks: a seeded steering vector, probe and SAE for the
tiny Llama, written as ``ndif.interp`` files (what a deployment's ``artifacts`` folder holds)."""

from __future__ import annotations

from pathlib import Path

#: The tiny Llama's width (``ndif.make_tiny``'s default).
HIDDEN = 64


def write_artifacts(folder: Path) -> Path:
    """A steering vector ("joy", layer 1), a probe ("mood", layer 2) and an SAE ("res-2"),
    seeded, for chat requests to name."""
    import torch

    from ndif import interp

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    vector = interp.SteeringVector(torch.randn(HIDDEN, generator=generator) * 3, layer=1, name="joy")
    interp.save_vector(vector, folder / "joy.safetensors")
    probe = interp.LinearProbe(torch.randn(HIDDEN, generator=generator), layer=2, labels=["mood"])
    interp.save_probe(probe, folder / "mood.safetensors")
    sae = interp.SAE(
        torch.randn(HIDDEN, 32, generator=generator),
        torch.zeros(32),
        torch.randn(32, HIDDEN, generator=generator) * 0.1,
        torch.zeros(HIDDEN),
        layer=2,
    )
    interp.save_sae(sae, folder / "res-2.safetensors")
    return folder
