"""`VLLM`: a vLLM engine wrapped for tracing, with every trace a job in its continuous batch."""

from __future__ import annotations

import os
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import copy_context
from typing import Any

from ...engine.context import GUARD
from ...engine.serving import ServingRun
from ...tracer import InvokeSpec, Trace
from ...tracing.errors import InvokeError
from ..base import NNsight
from .loop import EngineLoop, Submission
from .requests import job_parts
from .runner import fast_eager_kernels, install

#: Engine arguments ndif sets unless the caller does (see docs/vllm.md).
_ENGINE_DEFAULTS: dict[str, Any] = {
    # A prompt prefilled in one step is one step 0, as in LanguageModel; with chunked
    # prefill on, a step-0 block is served by the chunks still ahead of it.
    "enable_chunked_prefill": False,
    # The worker in this process (also inside a Ray actor, where vLLM would pick Ray's executor).
    "distributed_executor_backend": "uni",
}


class VLLM(NNsight):
    """A model served by vLLM, traced with the same API as `LanguageModel`.

    Each invoke is one vLLM request; many traces (from many threads, or many users of a
    worker) run at once in vLLM's continuous batching, each seeing only its own tokens.
    Module values are vLLM's: flat ``[tokens, hidden]`` tensors of the request's tokens
    in the step (the whole prompt at step 0, one token per decode step), and a decoder
    layer's output is vLLM's ``(hidden, residual)`` pair. ``model.logits`` and
    ``model.samples`` are served at every step; sampling keywords (``max_tokens``,
    ``temperature``, ...) pass through to ``vllm.SamplingParams``.

    Args:
        model: A checkpoint directory (or anything vLLM's ``LLM`` accepts).
        tensor_parallel_size: GPUs per engine (1 for now; see docs/vllm.md).
        eager_kernels: Run vLLM's CUDA kernels (rather than the native PyTorch the
            compiled graphs fuse) on the steps ndif runs eagerly.
        **engine_args: Passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``dtype``, ...).

    Example::

        model = ndif.VLLM("path/to/llama", gpu_memory_utilization=0.5)
        with model.generate("The Eiffel Tower is in", max_tokens=5) as tracer:
            for step in tracer.iter[:5]:
                hidden = model.model.layers[4].output[0].save()
    """

    def __init__(
        self,
        model: str | os.PathLike,
        tensor_parallel_size: int = 1,
        eager_kernels: bool = True,
        rename: dict | None = None,
        **engine_args: Any,
    ) -> None:
        if tensor_parallel_size != 1:
            raise NotImplementedError(
                "ndif.VLLM runs one GPU per engine in this version (tensor_parallel_size=1); "
                "tensor parallelism is tracked in docs/vllm.md"
            )
        if engine_args.get("speculative_config"):
            raise ValueError("ndif.VLLM does not support speculative decoding (its steps are not one token)")
        # The engine core runs in this process, on the loop's thread: the model is reachable.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        source = os.fspath(model)
        llm = LLM(source, tensor_parallel_size=1, **{**_ENGINE_DEFAULTS, **engine_args})
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        hooks = install(runner)
        if eager_kernels:
            fast_eager_kernels(runner.model)
        try:
            tokenizer = None if engine_args.get("skip_tokenizer_init") else llm.get_tokenizer()
        except Exception:  # noqa: BLE001 - a model without tokenizer files takes token ids only
            tokenizer = None
        self._connect(llm.llm_engine, hooks, source, tokenizer, rename)
        object.__setattr__(self, "llm", llm)

    def _connect(
        self,
        engine: Any,
        hooks: Any,
        source: str,
        tokenizer: Any,
        rename: dict | None,
        shardings: dict | None = None,
        gather: Any = None,
    ) -> None:
        """Wrap the runner's model in envoys and start the engine's loop.

        ``shardings`` (module -> `ndif.models.vllm.tp.SiteSharding`) and ``gather`` make
        tensor-parallel slices whole for the blocks of this rank.
        """
        NNsight.__init__(self, hooks.root, rename=rename)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_hooks", hooks)
        object.__setattr__(self, "tokenizer", tokenizer)
        by_site = {module.forward.site: sharding for module, sharding in (shardings or {}).items()}
        run = ServingRun(
            sites=self._sites,
            passive=(hooks.logits.forward.site, hooks.samples.forward.site),
            shardings=by_site,
            gather=gather,
        )
        hooks.run = run
        object.__setattr__(self, "_loop", EngineLoop(engine, run))

    # -- the tracing API -------------------------------------------------------------------

    def generate(
        self, *inputs: Any, trace: bool = True, remote: Any = None, blocking: bool = True, **kwargs: Any
    ) -> Any:
        """Open a trace over generation: each step is one token (``max_tokens``, default 16).

        ``trace=False`` generates without a trace and returns the token ids.
        """
        if not trace:
            return self._call_untraced("generate", inputs, kwargs)[0]
        return Trace(self, "generate", inputs, kwargs, remote=remote, blocking=blocking)

    def _model_key(self) -> str:
        return self._source

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        return {}, kwargs

    def _execute(self, trace: Trace, invokes: list[InvokeSpec], call_kwargs: dict) -> Any:
        """Submit the invokes as one job of vLLM requests and wait for them; returns each
        request's generated token ids."""
        parts = job_parts(self._edits, trace, invokes, call_kwargs, self.tokenizer)
        params = [self._sampling(options) for options in parts.options]
        if parts.intervenes:
            private_cache(parts.prompts, params)
        submission = Submission(parts.prompts, params, parts.blocks, parts.wide, copy_context())
        return self._wait(self._loop.submit(submission), submission)

    def _wait(self, future: Any, submission: Submission) -> Any:
        guard = GUARD.get()  # a sandboxed job: its cancel and deadline end the engine's part too
        try:
            while True:
                try:
                    return future.result(timeout=None if guard is None else 0.05)
                except FutureTimeout:
                    if guard.cancelled or time.monotonic() > guard.deadline:
                        guard.expired = guard.expired or not guard.cancelled
                        self._loop.cancel(submission, _limit_error(guard))
                        return future.result()
        except KeyboardInterrupt:
            self._loop.cancel(submission, KeyboardInterrupt())
            raise

    def _sampling(self, options: dict) -> Any:
        try:
            return self._sampling_params(options)
        except TypeError as error:
            raise InvokeError(f"not a vLLM sampling parameter: {error}") from None

    @staticmethod
    def _sampling_params(options: dict) -> Any:
        from vllm import SamplingParams

        return SamplingParams(**options)

    # -- inspection --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the engine failed (an internal error, not a job's): rebuild the model."""
        return self._loop.failure is None and self._loop.thread.is_alive()

    @property
    def step_counts(self) -> dict[str, int]:
        """How many steps with ndif requests ran eagerly, and how many on vLLM's graphs."""
        return {"eager": self._hooks.eager_steps, "graph": self._hooks.graph_steps}


def private_cache(prompts: list[dict], params: list[Any]) -> None:
    """Give intervened requests their own KV blocks: they neither read another request's
    cache (the prompt must pass through the modules) nor leave edited blocks for others."""
    for prompt, param in zip(prompts, params):
        prompt["cache_salt"] = f"ndif-{id(prompt)}-{time.monotonic_ns()}"
        param.skip_reading_prefix_cache = True


def _limit_error(guard: Any) -> BaseException:
    from ...sandbox.limits import JobCancelled, TimeLimitExceeded

    if guard.cancelled:
        return JobCancelled("the job was cancelled")
    return TimeLimitExceeded(f"the job ran longer than its limit of {guard.limits.time_s:g} s")
