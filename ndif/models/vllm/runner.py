"""ndif inside vLLM's GPU model runner (the V2 runner of vLLM 0.26).

`install` turns a live runner into an ndif runner after the engine is built (compiled
and its CUDA graphs captured): its class gains `NdifRunnerMixin`, whose overrides tell
the engine's `ServingRun` which requests each step schedules and where their rows are,
and run each step as its `StepMode` says:

* GRAPHS (no scheduled block waits for a value of the forward): vLLM's own choice stands
  (FULL or PIECEWISE graphs, compiled code);
* TAPS (blocks wait only for tapped sites, see `taps`): a FULL graph is swapped for its
  copy broken at the taps (`segments`), or where there is none for the PIECEWISE graph of
  the same size; the taps run between the pieces and serve the blocks;
* EAGER: the cudagraph dispatcher is told to return ``NONE`` and the forward context's
  ``skip_compiled`` is set, so the model's Python runs module by module and every
  instrumented module reaches the run.

Logits and samples are served from inside ``sample()`` on every step, graphs or not,
through two passthrough modules the root gains, ``model.logits`` and ``model.samples``.
"""

from __future__ import annotations

from typing import Any

import torch

from ...engine.context import ACTIVE_RUN, CURRENT_MEDIATOR
from ...engine.instrument import site_of
from ...engine.serving import Scheduled, ServingRun, StepMode
from . import segments, taps


class Passthrough(torch.nn.Module):
    """A module that returns its input: a place in the engine where ndif serves a value."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


class RequestState:
    """Where one ndif request is in its prefill."""

    __slots__ = ("prefill_len", "computed")

    def __init__(self, prefill_len: int, computed: int) -> None:
        self.prefill_len = prefill_len
        self.computed = computed


class Hooks:
    """ndif's state in one model runner: the serving run and this step's bookkeeping."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.run: ServingRun | None = None  # set once the envoys exist (the model wraps the runner's module)
        self.root: torch.nn.Module = runner.model
        self.logits = Passthrough()
        self.samples = Passthrough()
        # ``eager`` is set only while an eager step's forward runs (the dispatcher and the
        # model's pre-hook read it); ``mode`` lasts the whole step, sampling included.
        self.eager = False
        self.mode = StepMode.GRAPHS  # this step's
        self.stepping = False
        self.sampled_rows: Any = None  # the step's input batch while its logits and samples are served
        self.requests: dict[str, RequestState] = {}  # by the engine's request id
        self.alias: dict[str, Any] = {}  # the engine's request id -> ndif's key, where they differ
        self.eager_steps = 0
        self.graph_steps = 0
        self.tap_steps = 0
        self.modes: dict[str, int] = {}  # how each dispatched forward ran: NONE, PIECEWISE, FULL, FULL-TAPS
        self.segments: dict[Any, Any] = {}  # FULL graphs broken at the taps (`segments`), by descriptor

    # -- one step ----------------------------------------------------------------------

    def key(self, request_id: str) -> Any:
        """ndif's key of an engine request (its ``extra_args["ndif_request"]``, else its id)."""
        return self.alias.get(request_id, request_id)

    def plan(self, scheduler_output: Any) -> None:
        """Before the forward: which ndif requests this step schedules, and eager or not."""
        run = self.run
        if self.stepping:  # the previous step failed before sampling
            run.end()
            self.stepping = False
        for request_id in scheduler_output.preempted_req_ids or ():
            if self.key(request_id) in run.requests:
                run.preempted(self.key(request_id))
        for request_id in scheduler_output.finished_req_ids:
            self.requests.pop(request_id, None)
            self.alias.pop(request_id, None)
        known = run.awake
        for new in scheduler_output.scheduled_new_reqs:
            extra = getattr(getattr(new, "sampling_params", None), "extra_args", None)
            if extra and "ndif_request" in extra:
                self.alias[new.req_id] = extra["ndif_request"]
            if self.key(new.req_id) in known:
                self.requests[new.req_id] = RequestState(len(new.prefill_token_ids), new.num_computed_tokens)
        cached = scheduler_output.scheduled_cached_reqs
        for request_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            state = self.requests.get(request_id)
            if state is not None:
                state.computed = computed
        scheduled = []
        for request_id, count in scheduler_output.num_scheduled_tokens.items():
            state = self.requests.get(request_id)
            if state is None:
                continue
            key = self.key(request_id)
            if key not in known:
                continue
            prefilling = state.computed < state.prefill_len
            scheduled.append(
                Scheduled(
                    key,
                    new_step=not prefilling or state.computed == 0,
                    samples=state.computed + count >= state.prefill_len,
                )
            )
        if not scheduled:
            self.mode = StepMode.GRAPHS
            self.eager = False
            return
        self.stepping = True
        self.mode = run.begin(scheduled)
        self.eager = self.mode == StepMode.EAGER
        if self.eager:
            self.eager_steps += 1
        elif self.mode == StepMode.TAPS:
            self.tap_steps += 1
        else:
            self.graph_steps += 1

    def layout_tokens(self, input_batch: Any) -> None:
        if not self.stepping:
            return
        spans = self._spans(input_batch.req_ids, input_batch.query_start_loc_np)
        self.run.batcher.layout(spans, int(input_batch.num_tokens_after_padding))

    def _spans(self, request_ids: list[str], starts: Any) -> dict[Any, tuple[int, int]]:
        """Rows ``[starts[i], starts[i + 1])`` of each ndif request, by ndif's key."""
        known = self.run.awake
        spans = {}
        for i, request_id in enumerate(request_ids):
            key = self.key(request_id)
            if key in known:
                spans[key] = (int(starts[i]), int(starts[i + 1]))
        return spans

    def begin_sampling(self, input_batch: Any) -> None:
        self.sampled_rows = input_batch
        self.run.sampling()

    def serve(self, module: Passthrough, value: torch.Tensor) -> torch.Tensor:
        """Serve ``value`` (logits or samples, one row per request) at ``module``'s site."""
        run = self.run
        batch = self.sampled_rows
        if batch is None or module.forward.site not in run.waiting:
            return value
        run.batcher.layout(self._spans(batch.req_ids, batch.cu_num_logits_np), int(value.shape[0]))
        token = ACTIVE_RUN.set(run)
        try:
            return module(value)
        finally:
            ACTIVE_RUN.reset(token)

    def end_sampling(self) -> None:
        self.sampled_rows = None

    def finish_step(self) -> None:
        self.mode = StepMode.GRAPHS
        if self.stepping:
            self.stepping = False
            self.run.end()

    # -- taps ----------------------------------------------------------------------------

    def serve_tap(self, module: torch.nn.Module, values: list[torch.Tensor], kind: int) -> None:
        """A tapped module's output, on a TAPS step: serve it; edits go back in place."""
        run = self.run
        if self.mode != StepMode.TAPS or run is None or CURRENT_MEDIATOR.get() is not None:
            return  # not a TAPS step, or a block calling the module itself (a logit lens)
        if values[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a graph being captured must not hold ndif's work
        site = site_of(module)
        if site is None or site not in run.waiting:
            if site is not None:
                run.ran.add(site)
            return
        value = tuple(values) if kind == taps.TUPLE else values[0]
        token = ACTIVE_RUN.set(run)
        try:
            served = run.serve_output(site, value)
        finally:
            ACTIVE_RUN.reset(token)
        fresh = list(served) if kind == taps.TUPLE else [served]
        if len(fresh) != len(values):
            raise RuntimeError(f"{site.path}: an edit changed its output's structure (now {len(fresh)} values)")
        for old, new in zip(values, fresh):
            if new is not old:
                old.copy_(new)

    def start_run(
        self, model: Any, shardings: dict | None = None, gather: Any = None, check_limits: bool = True
    ) -> ServingRun:
        """The serving run of ``model`` (the envoys over this runner's module), taps connected."""
        run = ServingRun(
            sites=model._sites,
            passive=(self.logits.forward.site, self.samples.forward.site),
            shardings=shardings,
            gather=gather,
            check_limits=check_limits,
        )
        tapped = taps.tapped_modules(self.root)
        if tapped:
            for module in tapped:
                taps.connect(module, self.serve_tap)
            run.tapped = {site_of(module) for module in tapped}
            run.untapped_names = taps.untapped_names(model, [site_of(m) for m in (*tapped, self.logits, self.samples)])
        self.run = run
        return run


class NdifRunnerMixin:
    """Overrides of vLLM's V2 ``GPUModelRunner`` (mixed into the live runner's class)."""

    _ndif: Hooks

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = self._ndif
        dummy = kwargs.get("dummy_run", args[1] if len(args) > 1 else False)
        if dummy or hooks.run is None or not hooks.run.jobs:
            hooks.eager = False
            hooks.mode = StepMode.GRAPHS
            return super().execute_model(scheduler_output, *args, **kwargs)
        hooks.plan(scheduler_output)
        if not hooks.eager:
            return super().execute_model(scheduler_output, *args, **kwargs)
        token = ACTIVE_RUN.set(hooks.run)
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            ACTIVE_RUN.reset(token)
            hooks.eager = False

    def prepare_inputs(self, scheduler_output: Any, batch_desc: Any) -> Any:
        input_batch = super().prepare_inputs(scheduler_output, batch_desc)
        self._ndif.layout_tokens(input_batch)
        return input_batch

    def sample(self, hidden_states: Any, input_batch: Any, grammar_output: Any) -> Any:
        hooks = self._ndif
        if not hooks.stepping:
            return super().sample(hidden_states, input_batch, grammar_output)
        hooks.begin_sampling(input_batch)
        try:
            return super().sample(hidden_states, input_batch, grammar_output)
        finally:
            hooks.end_sampling()

    def sample_tokens(self, grammar_output: Any) -> Any:
        try:
            return super().sample_tokens(grammar_output)
        finally:
            self._ndif.finish_step()


def attach(runner: Any) -> Hooks:
    """The engine-independent part of `install`: ndif's hooks on any runner shaped like
    vLLM's (``model`` with ``compute_logits``, ``sampler.sample``, and the step methods)."""
    hooks = Hooks(runner)
    root = runner.model
    root.add_module("logits", hooks.logits)
    root.add_module("samples", hooks.samples)
    runner._ndif = hooks
    runner.__class__ = type(f"Ndif{type(runner).__name__}", (NdifRunnerMixin, type(runner)), {})

    compute_logits = root.compute_logits

    def compute_and_serve_logits(hidden_states: torch.Tensor) -> torch.Tensor:
        return hooks.serve(hooks.logits, compute_logits(hidden_states))

    root.compute_logits = compute_and_serve_logits

    sampler = runner.sampler
    if sampler is not None:
        sample = sampler.sample

        def sample_and_serve(*args: Any, **kwargs: Any) -> Any:
            sampled, processed = sample(*args, **kwargs)
            return hooks.serve(hooks.samples, sampled), processed

        sampler.sample = sample_and_serve
    return hooks


def install(runner: Any) -> Hooks:
    """Make ``runner`` (a built, captured V2 ``GPUModelRunner``) an ndif runner, with copies
    of vLLM's FULL graphs broken at the taps (`segments`) for decode steps on taps."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    if not hasattr(runner, "cudagraph_manager") or not hasattr(runner, "req_states"):
        raise RuntimeError(
            "ndif needs vLLM's V2 model runner (vLLM 0.26, VLLM_USE_V2_MODEL_RUNNER unset or 1); "
            f"this engine runs {type(runner).__module__}.{type(runner).__name__}"
        )
    hooks = attach(runner)
    manager = runner.cudagraph_manager
    if manager is not None:
        dispatch = manager.dispatch

        def eager_or_graphs(num_reqs: int, num_tokens: int, uniform: Any, num_active_loras: int = 0) -> Any:
            taps_step = hooks.mode == StepMode.TAPS
            if hooks.eager:
                chosen = BatchExecutionDescriptor(
                    cg_mode=CUDAGraphMode.NONE,
                    num_tokens=num_tokens,
                    num_reqs=num_reqs,
                    num_active_loras=num_active_loras,
                )
            else:
                chosen = dispatch(num_reqs, num_tokens, uniform, num_active_loras=num_active_loras)
                if taps_step and chosen.cg_mode == CUDAGraphMode.FULL and chosen not in hooks.segments:
                    chosen = _piecewise(manager, chosen, num_reqs, num_tokens, num_active_loras)
            mode = chosen.cg_mode.name
            if mode == "FULL" and taps_step:
                mode = "FULL-TAPS"
            hooks.modes[mode] = hooks.modes.get(mode, 0) + 1
            return chosen

        manager.dispatch = eager_or_graphs
        run_fullgraph = manager.run_fullgraph

        def full_graph_or_segments(desc: Any) -> Any:
            # A decode step on taps replays the FULL graph's tap-broken copy: vLLM's replay
            # (its buffers, its returned hidden states) with the segments in the graph's place.
            if hooks.mode != StepMode.TAPS or desc not in hooks.segments:
                return run_fullgraph(desc)
            graphs = manager.graphs
            manager.graphs = hooks.segments
            try:
                return run_fullgraph(desc)
            finally:
                manager.graphs = graphs

        manager.run_fullgraph = full_graph_or_segments

    def run_python(module: torch.nn.Module, args: Any) -> None:
        # Without this, an eager step still calls the compiled model, whose modules'
        # Python (and so ndif) never runs.
        if hooks.eager and is_forward_context_available():
            get_forward_context().skip_compiled = True

    runner.model.register_forward_pre_hook(run_python)
    if manager is not None:
        hooks.segments = segments.capture_segments(runner)
    return hooks


def _piecewise(manager: Any, full: Any, num_reqs: int, num_tokens: int, num_active_loras: int) -> Any:
    """The PIECEWISE graph for a step that would replay ``full`` (a FULL graph, inside which
    taps do not run), or compiled code without graphs if none was captured for its size."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    for desc in manager._candidates.get((num_tokens, full.num_active_loras), ()):
        fits = desc.num_tokens >= num_tokens and (desc.num_reqs is None or desc.num_reqs >= num_reqs)
        if desc.cg_mode == CUDAGraphMode.PIECEWISE and fits:
            return desc
    return BatchExecutionDescriptor(
        cg_mode=CUDAGraphMode.NONE, num_tokens=num_tokens, num_reqs=num_reqs, num_active_loras=num_active_loras
    )


def fast_eager_kernels(root: torch.nn.Module) -> int:
    """Point vLLM's custom ops at their CUDA kernels for eager steps; returns how many.

    A compiled engine runs custom ops as native PyTorch, which Inductor fuses; an eager
    step would run that native code unfused. The compiled code is built already and does
    not call these methods, so only eager steps change.
    """
    from vllm import ir
    from vllm.model_executor.custom_op import CustomOp

    switched = 0
    for module in root.modules():
        if isinstance(module, CustomOp) and type(module).forward_cuda is not CustomOp.forward_cuda:
            module._forward_method = module.forward_cuda
            switched += 1
    for name in ("rms_norm", "fused_add_rms_norm"):
        op = getattr(ir.ops, name, None)
        if op is not None and "vllm_c" in getattr(op, "impls", {}):
            op.set_default(["vllm_c", "native"])
    return switched
