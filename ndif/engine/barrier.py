"""A meeting point for the blocks of one trace (activation patching across invokes)."""

from __future__ import annotations

from .mediator import BARRIER, READ, Mediator, Request, current_mediator


class Barrier:
    """Every block that calls the barrier waits until ``n`` of them have.

    The blocks of a trace run in the order the model reaches what each asked for,
    so one that hands a value to another needs a point both agree on: everything
    above a barrier happens before anything below it. Reusable: each round waits
    for its own ``n`` arrivals.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a barrier needs at least one block, got n={n}")
        self.n = n
        self._arrived: list[Mediator] = []

    def __call__(self) -> None:
        mediator = current_mediator("barrier()")
        self._arrived.append(mediator)
        if len(self._arrived) < self.n:
            mediator.park(Request(BARRIER, READ, None, "barrier", mediator.target))
            return
        others, self._arrived = self._arrived[:-1], []
        mediator.run.release(others)
