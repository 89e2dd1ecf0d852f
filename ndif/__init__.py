"""ndif: interpretability on production inference.

Write ordinary Python against a model's internals inside ``with model.trace(...)``;
it runs locally on any PyTorch or transformers model, with NNsight's API.

    import ndif
    model = ndif.LanguageModel("path/to/model")
    with model.trace("The Eiffel Tower is in"):
        hidden = model.model.layers[5].output.save()
"""

from . import engine as _engine  # registers the helpers rewritten bodies call
from . import interp
from ._version import __version__
from .engine.cache import CacheView
from .engine.saving import install_tensor_save, save
from .envoy import Envoy
from .models import LanguageModel, NNsight, make_tiny
from .tracer import Trace
from .tracing.errors import (
    BarrierError,
    InvokeError,
    MissedValueError,
    NDIFError,
    NeverRanError,
    OutOfOrderError,
    OutsideTraceError,
    TraceSyntaxError,
)

install_tensor_save()
del _engine

_CLIENT_NAMES = {"jobs": "jobs", "Batch": "Batch"}


def __getattr__(name: str) -> object:
    """``ndif.VLLM`` loads the vLLM backend on first use; ``ndif.jobs`` and ``ndif.Batch``
    come from the client package, ``ndif_sdk``, when installed."""
    if name == "VLLM":
        from .models.vllm import VLLM

        return VLLM
    if name in _CLIENT_NAMES:
        try:
            import ndif_sdk
        except ImportError:
            raise AttributeError(f"ndif.{name} needs the ndif client: pip install ndif-sdk") from None
        return getattr(ndif_sdk, _CLIENT_NAMES[name])
    raise AttributeError(f"module 'ndif' has no attribute {name!r}")


__all__ = [
    "interp",
    "BarrierError",
    "CacheView",
    "Envoy",
    "InvokeError",
    "LanguageModel",
    "MissedValueError",
    "NDIFError",
    "NNsight",
    "NeverRanError",
    "OutOfOrderError",
    "OutsideTraceError",
    "Trace",
    "TraceSyntaxError",
    "__version__",
    "make_tiny",
    "save",
]
