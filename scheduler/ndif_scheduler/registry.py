"""The model registry: which deployments exist and how each is served.

A TOML file with one ``[[deployments]]`` table per deployment::

    [[deployments]]
    key = "tiny-llama"            # what clients and the API call it
    backend = "transformers"      # or "vllm"
    path = "/models/tiny-llama"   # local checkpoint (or a hub id where the hub is reachable)
    aliases = []                  # other names a request may use for it
    dtype = "float32"
    device = "cpu"                # or "cuda", "cuda:1"
    replicas = 1
    max_concurrency = 4           # interactive jobs in flight per replica
    batch_concurrency = 2         # batch-experiment jobs in flight per replica (their own slots)
    tensor_parallel_size = 1
    num_gpus = 0
    torch_threads = 0             # 0: torch's default
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class Deployment:
    """One served model."""

    key: str
    path: str
    backend: str = "transformers"
    aliases: tuple[str, ...] = ()
    dtype: str = "float32"
    device: str = "cpu"
    replicas: int = 1
    max_concurrency: int = 4
    batch_concurrency: int = 0  # 0: as many as max_concurrency
    tensor_parallel_size: int = 1
    num_gpus: float = 0
    num_cpus: float = 0
    torch_threads: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)
    #: A folder of steering vectors, SAEs and probes (``<name>.safetensors``) that chat
    #: requests may name (``ndif.interp`` files).
    artifacts: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"deployment {self.key!r}: backend must be one of {', '.join(BACKENDS)}")
        if self.replicas < 1 or self.max_concurrency < 1:
            raise ValueError(f"deployment {self.key!r}: replicas and max_concurrency must be at least 1")

    def names(self) -> set[str]:
        """Every name a request may give this deployment by."""
        names = {self.key, self.path, *self.aliases}
        if os.path.isabs(self.path):
            names.add(os.path.realpath(self.path))
        return names

    def lanes(self) -> dict[str, int]:
        """Each lane's own slots in a replica: batch jobs never take an interactive one."""
        return {"interactive": self.max_concurrency, "batch": self.batch_concurrency or self.max_concurrency}

    def actor_name(self, replica: int) -> str:
        return f"{self.key}#{replica}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        return data


@dataclass(frozen=True)
class Registry:
    deployments: tuple[Deployment, ...]

    def get(self, key: str) -> Deployment | None:
        for deployment in self.deployments:
            if deployment.key == key:
                return deployment
        return None

    def resolve(self, name: str) -> Deployment | None:
        """The deployment a request's ``model`` field names (its key, path or an alias)."""
        for deployment in self.deployments:
            if name in deployment.names():
                return deployment
        if os.path.isabs(name):
            real = os.path.realpath(name)
            for deployment in self.deployments:
                if real in deployment.names():
                    return deployment
        return None

    @property
    def keys(self) -> list[str]:
        return [deployment.key for deployment in self.deployments]


def parse_registry(data: dict[str, Any], base: Path | None = None) -> Registry:
    deployments = []
    seen: set[str] = set()
    for entry in data.get("deployments", []):
        entry = dict(entry)
        entry["aliases"] = tuple(entry.get("aliases", ()))
        path = entry.get("path", "")
        if base is not None and path and not os.path.isabs(path) and (base / path).exists():
            entry["path"] = str((base / path).resolve())
        artifacts = entry.get("artifacts", "")
        if base is not None and artifacts and not os.path.isabs(artifacts):
            entry["artifacts"] = str((base / artifacts).resolve())
        try:
            deployment = Deployment(**entry)
        except TypeError as error:
            raise ValueError(f"model registry: {error}") from None
        if deployment.key in seen:
            raise ValueError(f"model registry: the key {deployment.key!r} appears twice")
        seen.add(deployment.key)
        deployments.append(deployment)
    return Registry(tuple(deployments))


def load_registry(path: str | os.PathLike) -> Registry:
    """Read a registry file (paths in it are relative to the file's folder)."""
    path = Path(path)
    with path.open("rb") as handle:
        return parse_registry(tomllib.load(handle), base=path.parent)
