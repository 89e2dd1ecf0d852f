"""The interleaving engine: intervention blocks run in step with a model's forward pass.

Backend-agnostic pieces a serving backend reuses: `Run` (the model side),
`Mediator` (one block), `Batcher` (how a batch is divided among blocks) and module
instrumentation. See ``docs/engine.md``.
"""

from ..tracing import rewrite
from ..tracing.errors import IterationEnd
from ..tracing.scope import HELPERS
from .batching import Batcher, RowBatcher
from .gradients import read_grad, run_backward, write_grad
from .mediator import Mediator
from .run import Run
from .saving import save, save_method_call

HELPERS.update(
    {
        rewrite.SAVE: save_method_call,
        rewrite.GRAD: read_grad,
        rewrite.SET_GRAD: write_grad,
        rewrite.BACKWARD: run_backward,
        rewrite.ITERATION_END: IterationEnd,
    }
)

__all__ = ["Batcher", "Mediator", "RowBatcher", "Run", "save"]
