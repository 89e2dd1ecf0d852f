"""Per-context state of the engine.

Everything the engine needs to know about "the current run" lives in context
variables, never in module globals or on shared objects. Each thread has its own
context, and each intervention block runs in a greenlet with a context of its own,
so two traces running at once in two threads of one process, on one model, never
see each other.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .mediator import Mediator
    from .run import Run
    from .saving import SaveScope

#: The run whose model is executing in this context; read by every instrumented module.
ACTIVE_RUN: ContextVar[Run | None] = ContextVar("ndif_active_run", default=None)

#: The intervention block executing in this context (set only inside its greenlet).
CURRENT_MEDIATOR: ContextVar[Mediator | None] = ContextVar("ndif_current_mediator", default=None)

#: Where ``.save()`` marks values: the outermost trace or session of this context.
SAVES: ContextVar[SaveScope | None] = ContextVar("ndif_saves", default=None)

#: The sandbox job whose code runs in this context, if any (see `ndif.sandbox.limits.Job`):
#: blocks switch its torch-level guard on and off as they run and wait.
GUARD: ContextVar[Any] = ContextVar("ndif_guard", default=None)
