"""Steering vectors, SAEs and probes as safetensors files (the header's metadata holds their
settings: ``ndif_kind``, ``layer``, ``activation``...). Files are read and written on the
machine that calls these functions; a remote trace receives the loaded objects."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .probes import LinearProbe, probe_from_tensors
from .sae import SAE, sae_from_tensors
from .vectors import SteeringVector

PathLike = str | os.PathLike


def save_vector(vector: SteeringVector, path: PathLike) -> None:
    """Write a steering vector (``vector`` tensor; layer, method and name in the header)."""
    metadata = {"ndif_kind": "steering_vector", "method": vector.method, "name": vector.name}
    if vector.layer is not None:
        metadata["layer"] = str(vector.layer)
    save_file({"vector": vector.vector.detach().cpu().contiguous()}, os.fspath(path), metadata=metadata)


def load_vector(path: PathLike) -> SteeringVector:
    """A steering vector from a file: ndif's own, or any safetensors file with one 1-d tensor."""
    tensors, metadata = _read(path)
    if "vector" in tensors:
        vector = tensors["vector"]
    else:
        flat = [tensor for tensor in tensors.values() if tensor.dim() == 1]
        if len(flat) != 1:
            raise ValueError(f"{path}: expected one 1-d tensor named 'vector'; found {sorted(tensors)}")
        vector = flat[0]
    layer = metadata.get("layer")
    name = metadata.get("name") or os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return SteeringVector(vector, int(layer) if layer else None, metadata.get("method", "given"), name)


def save_sae(sae: SAE, path: PathLike) -> None:
    """Write an SAE in SAELens' tensor names; its settings go in the header."""
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().cpu().contiguous()
    metadata = {
        "ndif_kind": "sae",
        "activation": sae.activation,
        "subtract_decoder_bias": str(sae.subtract_decoder_bias).lower(),
    }
    if sae.k is not None:
        metadata["k"] = str(sae.k)
    if sae.layer is not None:
        metadata["layer"] = str(sae.layer)
    if sae.feature_names:
        metadata["feature_names"] = json.dumps({str(index): name for index, name in sae.feature_names.items()})
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_sae(path: PathLike, **options: Any) -> SAE:
    """An SAE from a safetensors file (SAELens names, or encoder/decoder linear layers);
    ``options`` (``activation``, ``k``, ``layer``...) override the file's header."""
    tensors, metadata = _read(path)
    return sae_from_tensors(tensors, metadata, **options)


def save_probe(probe: LinearProbe, path: PathLike) -> None:
    """Write a linear probe (``weight``, ``bias``; output, labels and layer in the header)."""
    metadata = {"ndif_kind": "probe", "output": probe.output}
    if probe.labels:
        metadata["labels"] = ",".join(probe.labels)
    if probe.layer is not None:
        metadata["layer"] = str(probe.layer)
    tensors = {"weight": probe.weight.detach().cpu().contiguous(), "bias": probe.bias.detach().cpu().contiguous()}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_probe(path: PathLike, **options: Any) -> LinearProbe:
    """A linear probe from a safetensors file; ``options`` override the file's header."""
    tensors, metadata = _read(path)
    return probe_from_tensors(tensors, metadata, **options)


def load(path: PathLike) -> SteeringVector | SAE | LinearProbe:
    """Whatever ndif wrote at ``path`` (by the ``ndif_kind`` in its header)."""
    kind = _read_metadata(path).get("ndif_kind")
    loaders = {"steering_vector": load_vector, "sae": load_sae, "probe": load_probe}
    if kind not in loaders:
        raise ValueError(
            f"{path}: not written by ndif (its header has no ndif_kind); use load_vector, load_sae or load_probe"
        )
    return loaders[kind](path)


def _read(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(os.fspath(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def _read_metadata(path: PathLike) -> dict[str, str]:
    with safe_open(os.fspath(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
