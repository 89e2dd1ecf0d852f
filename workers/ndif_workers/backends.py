"""Loading a deployment's model for an actor: transformers, or a vLLM engine."""

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
    if deployment.backend == "vllm":
        # One engine per actor; the actor's job threads all submit into its continuous batch.
        import ndif

        engine_args = {"dtype": deployment.dtype, **deployment.engine_args}
        return ndif.VLLM(deployment.path, tensor_parallel_size=deployment.tensor_parallel_size, **engine_args)
    raise ValueError(f"unknown backend {deployment.backend!r} (expected 'transformers' or 'vllm')")
