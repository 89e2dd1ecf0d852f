"""Taps: places in vLLM's compiled model where ndif can serve a value between graphs.

Hooks cannot run inside a captured CUDA graph, so a step where any request intervenes
used to run wholly eagerly. A tap is a custom op, ``ndif::tap``, that every decoder layer
(and the final norm) calls on its output. It is in vLLM's ``splitting_ops``, so vLLM's
piecewise compilation splits the graph there, as it does at attention, and runs the op
eagerly between captured pieces:

* on a step run on PIECEWISE graphs (or compiled code without graphs), the op's Python
  runs at every tapped site: it serves the site's output event to the blocks waiting for
  it, and writes their edits back into the tensors in place;
* on a FULL graph step the op ran once, at capture, doing nothing: replays skip it;
* on an eager step ndif's module controllers serve every site and the op does nothing.

So a step whose intervening blocks wait only for tapped sites (layer outputs, the final
norm, logits and samples) keeps the other requests on graphs. Taps are added to the model
after vLLM loads it and before it is compiled (`patch_model_loading`); this module imports
vLLM only inside the functions that need it, so it is usable with the CPU test doubles.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

#: The op's qualified name, as vLLM's ``splitting_ops`` lists it.
TAP_OP = "ndif::tap"

#: What a tap's values were: one tensor, or a tuple of tensors (a decoder layer's
#: ``(hidden, residual)``).
TENSOR, TUPLE = 0, 1

# index -> the callback serving that tap (a weak reference to its model's hooks inside)
_handlers: dict[int, Callable[[list[torch.Tensor], int], None]] = {}
_numbers = itertools.count()


#: While `segments.SegmentedCapture` captures a forward, where taps go instead (it ends a
#: graph segment there).
_breaker: list[Callable[[list[torch.Tensor], int, int], None]] = []


def break_captures_with(breaker: Callable[[list[torch.Tensor], int, int], None] | None) -> None:
    """Send taps to ``breaker(values, index, kind)`` (a capture under way), or back to their handlers."""
    _breaker[:] = [] if breaker is None else [breaker]


def tap(values: list[torch.Tensor], index: int, kind: int) -> None:
    """Serve a tapped site's output (``values``) to ndif; edits are made in place."""
    if _breaker:
        _breaker[0](values, index, kind)
        return
    handler = _handlers.get(index)
    if handler is not None:
        handler(values, kind)


def _tap_fake(values: list[torch.Tensor], index: int, kind: int) -> None:
    return None


# Defined on a plain ``torch.library.Library`` rather than by ``torch.library.custom_op``:
# the same schema, but the call costs ~3 µs instead of ~22 µs (its wrapper's checks), and a
# step on taps calls it once per decoder layer.
_LIBRARY = torch.library.Library("ndif", "DEF")
_LIBRARY.define("tap(Tensor(a!)[] values, int index, int kind) -> ()")
_LIBRARY.impl("tap", tap, "CompositeExplicitAutograd")
torch.library.register_fake(TAP_OP, _tap_fake, lib=_LIBRARY)


def _tapped_class(cls: type) -> type:
    tapped = _TAPPED_CLASSES.get(cls)
    if tapped is None:
        base_forward = cls.forward

        def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            output = base_forward(self, *args, **kwargs)
            if isinstance(output, torch.Tensor):
                torch.ops.ndif.tap([output], self.ndif_tap, TENSOR)
            elif isinstance(output, tuple) and output and all(isinstance(item, torch.Tensor) for item in output):
                torch.ops.ndif.tap(list(output), self.ndif_tap, TUPLE)
            return output

        tapped = type(f"Tapped{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
        _TAPPED_CLASSES[cls] = tapped
    return tapped


_TAPPED_CLASSES: dict[type, type] = {}


def tap_points(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that get taps: every decoder layer (the children of the model's first
    ``*layers`` ModuleList) and the final norm beside that list, if there is one."""
    for name, module in root.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1].endswith("layers") and len(module):
            parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
            points = list(module)
            norm = getattr(parent, "norm", None)
            if isinstance(norm, torch.nn.Module):
                points.append(norm)
            return points
    return []


def add_taps(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Give ``root``'s tap points their taps (before the model is compiled); returns them.

    Each module's class becomes a subclass whose ``forward`` calls the op on its output,
    and the module is numbered (``ndif_tap``) so that the op knows where it is.
    """
    points = tap_points(root)
    for module in points:
        if getattr(module, "ndif_tap", None) is None:
            module.__class__ = _tapped_class(type(module))
            module.ndif_tap = next(_numbers)
    return points


def tapped_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``root`` that have taps (in forward order)."""
    return [module for module in root.modules() if getattr(module, "ndif_tap", None) is not None]


def connect(module: torch.nn.Module, serve: Callable[[torch.nn.Module, list[torch.Tensor], int], None]) -> None:
    """Route ``module``'s tap to ``serve(module, values, kind)`` (held weakly, with the module)."""
    ref = weakref.ref(module)
    index = module.ndif_tap

    def handler(values: list[torch.Tensor], kind: int) -> None:
        target = ref()
        if target is None:
            _handlers.pop(index, None)
        else:
            serve(target, values, kind)

    _handlers[index] = handler


#: Envoy attributes that reach a module's input or other modules, whatever they are called.
REACHING_NAMES = frozenset(
    {"input", "inputs", "skip", "modules", "named_modules", "children", "named_children", "_children", "_module"}
)


def untapped_names(root: Any, served: list[Any]) -> frozenset[str]:
    """Names by which code can reach a module whose values a TAPS step does not serve.

    ``root`` is the envoy tree; ``served`` are the sites a TAPS step serves (tapped modules,
    logits, samples). Their envoys and those envoys' ancestors are reachable: every other
    child or alias name is returned, with `REACHING_NAMES`.
    """
    served_sites = set(served)
    reachable: set[int] = set()

    def visit(envoy: Any) -> bool:
        below = [visit(child) for child in envoy._children.values()]
        if envoy._site in served_sites or any(below):
            reachable.add(id(envoy))
            return True
        return False

    visit(root)
    names = set(REACHING_NAMES)
    for envoy in root.modules():
        for name, child in envoy._children.items():
            if id(child) not in reachable:
                names.add(name)
        for alias in envoy._aliases:
            target = envoy.__dict__.get(alias)
            if id(target) not in reachable:
                names.add(alias)
    return frozenset(names)


def splitting_ops() -> list[str]:
    """vLLM's default ``splitting_ops`` (attention and KV-cache updates) plus the tap."""
    from vllm.config import CompilationConfig

    return [
        *CompilationConfig._attention_ops,
        "vllm::unified_kv_cache_update",
        "vllm::unified_mla_kv_cache_update",
        TAP_OP,
    ]


def with_taps(engine_args: dict[str, Any]) -> dict[str, Any]:
    """``engine_args`` asking vLLM to split its compiled graphs at taps, unless the engine
    is eager anyway or the caller chose its own ``splitting_ops``."""
    if engine_args.get("enforce_eager"):
        return engine_args
    config = engine_args.get("compilation_config")
    if config is None:
        config = {}
    elif not isinstance(config, dict) or config.get("splitting_ops") is not None:
        return engine_args  # a level number, a config object, or the caller's own splits
    return {**engine_args, "compilation_config": {**config, "splitting_ops": splitting_ops()}}


def patch_model_loading() -> None:
    """Make vLLM's V2 GPU model runner add taps to the model it loads when its compilation
    splits at ``ndif::tap`` (in this process: the engine's, or a tensor-parallel worker's)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    original = GPUModelRunner.load_model
    if getattr(original, "ndif_taps", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if TAP_OP in (self.vllm_config.compilation_config.splitting_ops or ()):
            add_taps(self.model)
        return result

    load_model.ndif_taps = True
    GPUModelRunner.load_model = load_model
