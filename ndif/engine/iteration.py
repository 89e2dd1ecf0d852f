"""Binding requests to generation steps: ``tracer.iter``, ``tracer.all()``, ``tracer.next()``."""

from __future__ import annotations

from collections.abc import Iterator

from .mediator import current_mediator


class Steps:
    """A selection of steps; looping over it binds the loop body's requests to each.

    ``tracer.iter[:3]`` is steps 0-2, ``tracer.iter[2]`` step 2, ``tracer.iter[[0, 4]]``
    those two, ``tracer.iter[:]`` (or ``tracer.all()``) every step the run makes.
    A loop that asks for a step the run never makes ends there; the code after it
    still runs.
    """

    def __init__(
        self, start: int = 0, stop: int | None = None, steps: list[int] | None = None, stride: int = 1
    ) -> None:
        if stride < 1:
            raise ValueError(f"tracer.iter slices need a positive step, got {stride}")
        self.start = start
        self.stop = stop
        self.steps = steps
        self.stride = stride

    @property
    def bounded(self) -> bool:
        return self.steps is not None or self.stop is not None

    def _indices(self, limit: int | None) -> Iterator[int]:
        if self.steps is not None:
            yield from self.steps
            return
        step = self.start
        stop = self.stop if self.stop is not None else limit
        while stop is None or step < stop:
            yield step
            step += self.stride

    def __iter__(self) -> Iterator[int]:
        mediator = current_mediator("tracer.iter")
        previous = mediator.target
        mediator.loops.append(self)
        # An open loop ends after the last step the run can make, even if its body never
        # waits for the model (which is what otherwise ends it).
        limit = mediator.max_steps if mediator.max_steps is not None else getattr(mediator.run, "max_steps", None)
        try:
            for step in self._indices(limit):
                if step < 0:
                    raise ValueError(f"tracer.iter steps cannot be negative, got {step}")
                mediator.target = step
                yield step
        finally:
            mediator.target = previous
            if self in mediator.loops:
                mediator.loops.remove(self)


class StepSelector:
    """``tracer.iter``: index it to choose steps."""

    def __getitem__(self, key: int | slice | list[int] | tuple[int, ...]) -> Steps:
        if isinstance(key, slice):
            return Steps(key.start or 0, key.stop, stride=key.step or 1)
        if isinstance(key, (list, tuple)):
            return Steps(steps=[int(k) for k in key])
        return Steps(int(key), int(key) + 1)

    def __iter__(self) -> Iterator[int]:
        return iter(Steps())


def advance(count: int = 1) -> None:
    """Bind the current block's next requests ``count`` steps later (``tracer.next()``)."""
    mediator = current_mediator("tracer.next()")
    mediator.target += count
