"""Instrumenting modules: how a forward pass reaches the engine.

Each wrapped module gets a `Controller` as its instance ``forward``. Outside a
run it costs one context-variable read and calls the original forward. Inside a
run (in the thread or context that started it) it hands the call to the active
`ndif.engine.run.Run`, which serves the module's input and output to whichever
intervention blocks asked for them. Being the ``forward`` rather than a hook
keeps modules on PyTorch's fast call path, and being per context rather than a
flag on the module keeps concurrent traces apart.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .context import ACTIVE_RUN


class Site:
    """A module's identity in the engine: requests and events are keyed by it.

    One per module object, shared by every envoy tree that wraps the module.
    ``path`` is the module's path in the first tree that wrapped it.
    """

    __slots__ = ("path", "__weakref__")

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Site({self.path})"


class Controller:
    """The ``forward`` ndif installs on a module: the module's handoff to the run."""

    __slots__ = ("site", "body", "module_ref", "replaced", "_signature", "__weakref__")

    def __init__(self, site: Site, body: Callable[..., Any], module: torch.nn.Module, replaced: Any = None) -> None:
        self.site = site
        self.body = body  # unbound: called with the module first
        self.module_ref = weakref.ref(module)
        self.replaced = replaced  # the instance ``forward`` this controller displaced, if any
        self._signature: inspect.Signature | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Being traced by torch.compile: a module shared with an instrumented model (vLLM
            # caches rotary embeddings across engines) compiles as itself; Dynamo cannot
            # trace a context variable.
            return self.body(self.module_ref(), *args, **kwargs)
        run = ACTIVE_RUN.get()
        if run is None:
            return self.body(self.module_ref(), *args, **kwargs)
        return run.module_call(self, self.module_ref(), args, kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # transformers inspects ``model.forward`` to decide which kwargs to pass.
        if self._signature is None:
            signature = inspect.signature(self.body)
            parameters = list(signature.parameters.values())[1:]
            self._signature = signature.replace(parameters=parameters)
        return self._signature

    @property
    def __name__(self) -> str:
        return getattr(self.body, "__name__", "forward")

    @property
    def __self__(self) -> torch.nn.Module | None:
        return self.module_ref()

    @property
    def __func__(self) -> Callable[..., Any]:
        return self.body

    def __deepcopy__(self, memo: dict) -> Controller:
        # The module's copy is already in ``memo``: bind the copy to it.
        module = copy.deepcopy(self.module_ref(), memo)
        return Controller(Site(self.site.path), self.body, module)

    def __reduce__(self) -> tuple:
        # A pickled module comes back uninstrumented.
        return _bound_forward, (self.module_ref(), self.body)


def _bound_forward(module: torch.nn.Module, body: Callable[..., Any]) -> Callable[..., Any]:
    return body.__get__(module) if hasattr(body, "__get__") else body


def _module_body(module: torch.nn.Module) -> Callable[..., Any]:
    """The forward to run under the controller: an instance forward (accelerate,
    a monkeypatch) if the module has one, else its class's."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return type(module).forward
    if inspect.ismethod(forward) and forward.__self__ is module:
        return forward.__func__
    return lambda _module, *args, **kwargs: forward(*args, **kwargs)


def instrument(module: torch.nn.Module, path: str) -> Site:
    """Install the controller on ``module`` (once) and return its site."""
    controller = module.__dict__.get("forward")
    if isinstance(controller, Controller) and controller.module_ref() is module:
        return controller.site
    replaced = module.__dict__.get("forward")
    controller = Controller(Site(path), _module_body(module), module, replaced)
    module.__dict__["forward"] = controller
    return controller.site


def site_of(module: torch.nn.Module) -> Site | None:
    controller = module.__dict__.get("forward")
    return controller.site if isinstance(controller, Controller) else None


def restore(module: torch.nn.Module) -> None:
    """Remove ndif's controllers from ``module`` and all its submodules."""
    for submodule in module.modules():
        controller = submodule.__dict__.get("forward")
        if isinstance(controller, Controller):
            if controller.replaced is None:
                del submodule.__dict__["forward"]
            else:
                submodule.__dict__["forward"] = controller.replaced
