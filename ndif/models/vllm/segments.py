"""FULL CUDA graphs broken at the taps: decode steps on taps at nearly a FULL graph's speed.

A step whose blocks wait only for tapped sites used to run on vLLM's PIECEWISE graphs,
which also break at every attention layer and run attention's Python eagerly: on an 8B
model that step costs about as much as an eager one (docs/benchmarks.md). Here ndif
captures, for every FULL graph vLLM captured (its uniform-decode sizes), a second copy of
the same forward cut only at the taps: one graph segment per decoder layer, attention
inside, with the tap's Python between segments. A decode step on taps replays those
segments, and its blocks are served between them as on PIECEWISE graphs.

The capture reuses vLLM's own (``GPUModelRunner.capture_model``, FULL sizes only), with
``torch.cuda.graph`` stood in for by `SegmentedCapture`, which ends the current segment
where the model calls the tap op and begins the next one after it. The segments share
vLLM's graph memory pool; like vLLM's breakable graphs, a replayed tap holds only weak
references to the captured tensors, whose addresses every replay writes again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from . import taps

log = logging.getLogger(__name__)


class Segments:
    """One forward captured as graph segments with taps between them; `replay` runs them in order."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], Any]] = []
        self.graphs: list[Any] = []  # the segments' graphs, kept alive with their executables
        self.taps = 0

    def replay(self) -> None:
        for step in self.steps:
            step()


class SegmentedCapture:
    """A stand-in for ``torch.cuda.graph(graph, pool)`` that records `Segments` instead,
    breaking the capture at every tap the forward calls (see `taps.tap`)."""

    def __init__(
        self,
        pool: Any = None,
        stream: Any = None,
        capture_error_mode: str = "global",
    ) -> None:
        self.pool = pool
        self.stream = stream
        self.error_mode = capture_error_mode
        self.segments = Segments()
        self.graph: Any = None
        self._stream_context: Any = None

    def __enter__(self) -> SegmentedCapture:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            stream = self.stream if self.stream is not None else _capture_stream()
            self._stream_context = torch.cuda.stream(stream)
            self._stream_context.__enter__()
        self._begin()
        taps.break_captures_with(self.tap)
        return self

    def __exit__(self, *error: Any) -> None:
        taps.break_captures_with(None)
        try:
            self._end()
        finally:
            if self._stream_context is not None:
                self._stream_context.__exit__(*error)

    def tap(self, values: list[torch.Tensor], index: int, kind: int) -> None:
        """The forward reached tap ``index``: close this segment; replays serve the tap
        here (on the tensors' captured addresses) before the next segment runs."""
        self._end()
        self.segments.steps.append(partial(taps.tap, [_weak_ref(value) for value in values], index, kind))
        self.segments.taps += 1
        self._begin()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            graph.capture_begin(capture_error_mode=self.error_mode)
        else:
            graph.capture_begin(self.pool, capture_error_mode=self.error_mode)
        self.graph = graph

    def _end(self) -> None:
        graph, self.graph = self.graph, None
        if graph is None:  # its capture never began
            return
        graph.capture_end()
        self.segments.graphs.append(graph)
        self.segments.steps.append(graph.replay)


def _capture_stream() -> Any:
    """The side stream ``torch.cuda.graph`` captures on by default."""
    graph_class = torch.cuda.graphs.graph
    if graph_class.default_capture_stream is None:
        graph_class.default_capture_stream = torch.cuda.Stream()
    return graph_class.default_capture_stream


def _weak_ref(tensor: torch.Tensor) -> torch.Tensor:
    from vllm.utils.torch_utils import weak_ref_tensor

    return weak_ref_tensor(tensor)


def capture_segments(runner: Any) -> dict[Any, Segments]:
    """Capture tap-broken copies of ``runner``'s FULL graphs; returns them by descriptor.

    Nothing is captured (an empty dict) when the model has no taps or vLLM captured no
    FULL graphs. ``runner`` keeps its own graphs; its manager is left as it was.
    """
    from vllm.config import CUDAGraphMode

    manager = getattr(runner, "cudagraph_manager", None)
    if manager is None or not taps.tapped_modules(runner.model):
        return {}
    full = manager._capture_descs.get(CUDAGraphMode.FULL)
    if not full or getattr(manager, "use_breakable_cg", False):
        return {}
    saved_descs, saved_graphs = manager._capture_descs, manager.graphs
    captures: dict[int, SegmentedCapture] = {}

    def stand_in(graph: Any, pool: Any = None, stream: Any = None, capture_error_mode: str = "global") -> Any:
        capture = SegmentedCapture(pool, stream, capture_error_mode)  # in place of ``graph``, never captured into
        captures[id(graph)] = capture
        return capture

    real_graph = torch.cuda.graph
    manager._capture_descs = {CUDAGraphMode.FULL: full}
    manager.graphs = {}
    torch.cuda.graph = stand_in
    try:
        runner.capture_model()
        recorded = manager.graphs
    except Exception as error:  # noqa: BLE001 - the engine still serves, its decode steps on taps on PIECEWISE graphs
        log.warning(
            "ndif: no FULL graphs broken at the taps (%s: %s); steps on taps use PIECEWISE graphs",
            type(error).__name__,
            error,
        )
        return {}
    finally:
        torch.cuda.graph = real_graph
        manager._capture_descs, manager.graphs = saved_descs, saved_graphs
    segments = {desc: captures[id(graph)].segments for desc, graph in recorded.items() if id(graph) in captures}
    tapped = {len(segment.graphs) for segment in segments.values()}
    log.info("ndif: captured %d FULL graphs broken at taps (%s segments each)", len(segments), sorted(tapped))
    return segments
