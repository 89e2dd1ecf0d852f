"""ndif's methods on every vLLM worker (``worker_extension_cls``), for tensor-parallel engines.

vLLM mixes this class into its worker class in every worker process; the driver reaches its
methods with ``collective_rpc`` (every rank runs each call, on the thread that also runs the
model's steps, one call at a time). See `rank` for what each does.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .loop import freeze_static_heap
from .rank import RankServer, module_structure, rank_server
from .runner import Hooks, fast_eager_kernels, install
from .taps import patch_model_loading

if importlib.util.find_spec("vllm") is not None:
    # vLLM imports this module in each worker process before it loads the model: the
    # runner then adds ndif's taps to the model before compiling it.
    patch_model_loading()


class NdifWorkerExtension:
    """RPC methods for ndif (the worker's ``model_runner`` is vLLM's V2 GPU model runner)."""

    ndif: RankServer
    model_runner: Any

    def ndif_install(self, source: str, eager_kernels: bool = True) -> bool:
        hooks = self._ndif_hooks(eager_kernels)
        rank, size, gather = self._ndif_group()
        self.ndif = rank_server(hooks, source, rank, size, gather)
        freeze_static_heap()
        return True

    def _ndif_hooks(self, eager_kernels: bool) -> Hooks:
        # Every rank captures the same FULL graphs broken at the taps (`segments`), inside
        # vLLM's own capture (its collectives and custom all-reduce buffers included).
        hooks = install(self.model_runner)
        if eager_kernels:
            fast_eager_kernels(self.model_runner.model)
        return hooks

    def _ndif_group(self) -> tuple[int, int, Any]:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        return group.rank_in_group, group.world_size, lambda tensor: group.all_gather(tensor, dim=-1)

    def ndif_structure(self) -> list[tuple[str, str]]:
        return module_structure(self.model_runner.model)

    def ndif_admit(self, key: str, data: bytes, limits: dict | None = None) -> dict:
        return self.ndif.admit(key, data, limits)

    def ndif_finish(self, key: str, outputs: list[Any]) -> bytes:
        return self.ndif.finish(key, outputs)

    def ndif_end(self, key: str, kind: str | None, message: str, outputs: list[Any]) -> bytes:
        return self.ndif.end(key, kind, message, outputs)

    def ndif_poll(self) -> list[str]:
        return self.ndif.poll()

    def ndif_counts(self) -> dict[str, Any]:
        hooks = self.ndif.hooks
        counts = {"eager": hooks.eager_steps, "graph": hooks.graph_steps, "taps": hooks.tap_steps}
        return {**counts, "modes": dict(hooks.modes)}
