"""Loading a deployment's model for an actor: the transformers backend here (vLLM: issue #5)."""

from __future__ import annotations

from typing import Any

from ndif_scheduler.registry import Deployment


def load_model(deployment: Deployment) -> Any:
    """The ndif model a deployment serves, weights loaded on its device."""
    if deployment.backend == "transformers":
        import torch

        import ndif

        if deployment.torch_threads:
            torch.set_num_threads(deployment.torch_threads)
        model = ndif.LanguageModel(
            deployment.path, dtype=getattr(torch, deployment.dtype), dispatch=True, **deployment.engine_args
        )
        if deployment.device != "cpu":
            model._module.to(deployment.device)
        return model
    raise NotImplementedError(f"the {deployment.backend!r} backend is not available in this build of ndif-workers")
