"""`VLLM`: a vLLM engine wrapped for tracing, with every trace a job in its continuous batch."""

from __future__ import annotations

import os
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import copy_context
from dataclasses import asdict
from typing import Any

from ...engine.context import GUARD
from ...engine.serving import names_reached
from ...sandbox.limits import CancelToken, JobCancelled, JobLimits, TimeLimitExceeded
from ...tracer import InvokeSpec, Trace
from ...tracing.errors import InvokeError
from ..base import NNsight
from .loop import EngineLoop, Submission, WireSubmission, freeze_static_heap
from .rank import build_skeleton
from .requests import context_length, job_parts
from .runner import fast_eager_kernels, install
from .taps import patch_model_loading, with_taps

#: Engine arguments ndif sets unless the caller does (see docs/vllm.md).
_ENGINE_DEFAULTS: dict[str, Any] = {
    # A prompt prefilled in one step is one step 0, as in LanguageModel; with chunked
    # prefill on, a step-0 block is served by the chunks still ahead of it.
    "enable_chunked_prefill": False,
    # The worker in this process (also inside a Ray actor, where vLLM would pick Ray's executor).
    "distributed_executor_backend": "uni",
}


#: Where vLLM finds ndif's worker methods (tensor-parallel engines).
_EXTENSION = "ndif.models.vllm.extension.NdifWorkerExtension"

#: A local trace's time limit on a tensor-parallel engine (its code runs sandboxed on the ranks).
LOCAL_TIME_S = 24 * 3600.0


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
        tensor_parallel_size: GPUs per engine. Above 1 the model lives in vLLM's worker
            processes and traces run there, sandboxed, as wire requests (docs/vllm.md).
        eager_kernels: Run vLLM's CUDA kernels (rather than the native PyTorch the
            compiled graphs fuse) on the steps ndif runs eagerly.
        taps: Split the compiled graphs at every decoder layer's output (and the final
            norm's), so that steps whose interventions read or edit only those (and logits
            and samples) keep the other requests on graphs (`ndif.models.vllm.taps`).
        **engine_args: Passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``dtype``, ...).

    Example::

        model = ndif.VLLM("path/to/llama", gpu_memory_utilization=0.5)
        with model.generate("The Eiffel Tower is in", max_tokens=5) as tracer:
            for step in tracer.iter[:5]:
                hidden = model.model.layers[4].output[0].save()
    """

    #: A decoder layer returns the residual stream as ``(hidden, residual)`` (see `ndif.interp`).
    splits_residual = True

    def __init__(
        self,
        model: str | os.PathLike,
        tensor_parallel_size: int = 1,
        eager_kernels: bool = True,
        taps: bool = True,
        rename: dict | None = None,
        **engine_args: Any,
    ) -> None:
        if engine_args.get("speculative_config"):
            raise ValueError("ndif.VLLM does not support speculative decoding (its steps are not one token)")
        # The engine core runs in this process, on the loop's thread.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        source = os.fspath(model)
        options = {**_ENGINE_DEFAULTS, **engine_args}
        if taps:
            patch_model_loading()
            options = with_taps(options)
        if tensor_parallel_size > 1:
            # The model lives in one worker process per GPU; ndif's part runs there too.
            options.update(distributed_executor_backend="mp", worker_extension_cls=_EXTENSION)
            llm = LLM(source, tensor_parallel_size=tensor_parallel_size, **options)
            llm.collective_rpc("ndif_install", args=(source, eager_kernels))
            self._connect_ranks(llm.llm_engine, source, _tokenizer(llm, engine_args), rename)
            object.__setattr__(self, "llm", llm)
            return
        llm = LLM(source, tensor_parallel_size=1, **options)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        hooks = install(runner)
        if eager_kernels:
            fast_eager_kernels(runner.model)
        self._connect(llm.llm_engine, hooks, source, _tokenizer(llm, engine_args), rename)
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
        run = hooks.start_run(self, shardings=by_site, gather=gather)
        object.__setattr__(self, "_loop", EngineLoop(engine, run))
        object.__setattr__(self, "_ranks", False)
        freeze_static_heap()

    def _connect_ranks(self, engine: Any, source: str, tokenizer: Any, rename: dict | None) -> None:
        """Envoys over the ranks' module tree (a skeleton here) and the engine's loop: traces
        go to the ranks as wire requests (`rank.RankServer`)."""
        skeleton = build_skeleton(engine.collective_rpc("ndif_structure")[0])
        # The model's config (its hidden size, ...), which the skeleton's modules do not hold.
        skeleton.config = getattr(getattr(engine, "model_config", None), "hf_config", None)
        NNsight.__init__(self, skeleton, rename=rename)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_hooks", None)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_loop", EngineLoop(engine, None))
        object.__setattr__(self, "_ranks", True)
        freeze_static_heap()

    # -- the tracing API -------------------------------------------------------------------

    def generate(
        self, *inputs: Any, trace: bool = True, remote: Any = None, blocking: bool = True, **kwargs: Any
    ) -> Any:
        """Open a trace over generation: each step is one token (``max_tokens``, default 16).

        ``trace=False`` generates without a trace and returns the token ids.
        """
        if not trace:
            return self._call_untraced("generate", inputs, kwargs)[0]
        return Trace(self, "generate", inputs, kwargs, remote=self._route(remote), blocking=blocking)

    def trace(self, *inputs: Any, trace: bool = True, remote: Any = None, blocking: bool = True, **kwargs: Any) -> Any:
        """Open a trace of one step (``max_tokens=1``); see `generate`."""
        if not trace:
            return self._call_untraced("trace", inputs, kwargs)
        return Trace(self, "trace", inputs, kwargs, remote=self._route(remote), blocking=blocking)

    def session(self, remote: Any = None, blocking: bool = True) -> Any:
        if self._ranks and remote is None:
            raise InvokeError("a tensor-parallel ndif.VLLM runs one trace per job: use traces, not a session")
        return super().session(remote=remote, blocking=blocking)

    def _route(self, remote: Any) -> Any:
        """Where a trace runs: on a tensor-parallel engine's ranks unless told otherwise."""
        if remote is None and self._ranks:
            return self._rank_backend
        return remote

    def _rank_backend(self, data: bytes) -> bytes:
        """A local trace on a tensor-parallel engine: its wire request, run on every rank."""
        return self.run_wire(data, JobLimits(time_s=LOCAL_TIME_S))

    def run_wire(self, data: bytes, limits: JobLimits, cancel: CancelToken | None = None) -> bytes:
        """Run an encoded request on the ranks; returns the encoded result. The deadline and
        ``cancel`` are checked here, and the job is ended on every rank between two steps."""
        submission = WireSubmission(data, asdict(limits), self._rank_params)
        future = self._loop.submit_wire(submission)
        deadline = time.monotonic() + limits.time_s

        def ended() -> BaseException | None:
            if cancel is not None and cancel.cancelled:
                return JobCancelled("the job was cancelled")
            if time.monotonic() > deadline:
                return TimeLimitExceeded(f"the job ran longer than its limit of {limits.time_s:g} s")
            return None

        return self._await(future, submission, ended)

    def _rank_params(self, options: dict, key: str) -> Any:
        params = self._sampling(options)
        params.extra_args = {**(params.extra_args or {}), "ndif_request": key}
        params.skip_reading_prefix_cache = True
        return params

    def _model_key(self) -> str:
        return self._source

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        return {}, kwargs

    def _execute(self, trace: Trace, invokes: list[InvokeSpec], call_kwargs: dict) -> Any:
        """Submit the invokes as one job of vLLM requests and wait for them; returns each
        request's generated token ids."""
        parts = job_parts(self._edits, trace, invokes, call_kwargs, self.tokenizer, context_length(self._loop.engine))
        params = [self._sampling(options) for options in parts.options]
        names = None
        if parts.intervenes:
            private_cache(parts.prompts, params)
            # What decides whether its steps may run on taps, scanned here on the caller's
            # thread rather than on the engine's between steps (an engine without taps: no need).
            if self._hooks.run.tapped:
                names = names_reached(parts.every_block)
        submission = Submission(parts.prompts, params, parts.blocks, parts.wide, copy_context(), names)
        return self._wait(self._loop.submit(submission), submission)

    def _wait(self, future: Any, submission: Submission) -> Any:
        guard = GUARD.get()  # a sandboxed job: its cancel and deadline end the engine's part too

        def ended() -> BaseException | None:
            if guard.cancelled or time.monotonic() > guard.deadline:
                guard.expired = guard.expired or not guard.cancelled
                return _limit_error(guard)
            return None

        try:
            return future.result() if guard is None else self._await(future, submission, ended)
        except KeyboardInterrupt:
            self._loop.cancel(submission, KeyboardInterrupt())
            raise

    def _await(self, future: Any, submission: Any, ended: Any) -> Any:
        """The job's outcome; ``ended()`` names an error that ends the job now (a cancel, a
        deadline), else None."""
        while True:
            try:
                return future.result(timeout=0.05)
            except FutureTimeout:
                error = ended()
                if error is not None:
                    self._loop.cancel(submission, error)
                    return future.result()

    def _sampling(self, options: dict) -> Any:
        try:
            return self._sampling_params(options)
        except TypeError as error:
            raise InvokeError(f"not a vLLM sampling parameter: {error}") from None

    @staticmethod
    def _sampling_params(options: dict) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**options)
        # Only a request's final output is read, as vLLM's own LLM.generate asks: the default
        # (cumulative) builds every request's output object again at every step.
        params.output_kind = RequestOutputKind.FINAL_ONLY
        return params

    # -- inspection --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the engine failed (an internal error, not a job's): rebuild the model."""
        return self._loop.failure is None and self._loop.thread.is_alive()

    @property
    def step_counts(self) -> dict[str, int]:
        """How many steps with ndif requests ran eagerly, on vLLM's graphs, and on taps."""
        if self._ranks:
            counts = self._loop.call(lambda: self._loop.engine.collective_rpc("ndif_counts")[0])
            return {"eager": counts["eager"], "graph": counts["graph"], "taps": counts["taps"]}
        return {"eager": self._hooks.eager_steps, "graph": self._hooks.graph_steps, "taps": self._hooks.tap_steps}


def _tokenizer(llm: Any, engine_args: dict) -> Any:
    if engine_args.get("skip_tokenizer_init"):
        return None
    try:
        return llm.get_tokenizer()
    except Exception:  # noqa: BLE001 - a model without tokenizer files takes token ids only
        return None


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
