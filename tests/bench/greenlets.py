"""What a block's greenlet costs the engine's thread: a new one per block against one kept
parked in a pool and reused, with the caches cooled between operations as engine steps
cool them (a burst of unrelated Python in between).

    python -m tests.bench.greenlets [--blocks 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import greenlet


def _cool() -> None:
    """Unrelated Python between two operations, as an engine step runs between a block's."""
    for _ in range(20):
        sum(range(2000))


def run(blocks: int = 300) -> dict[str, float]:
    """Median µs of: starting a new greenlet until it parks, resuming it until it ends;
    switching a pooled greenlet into a new block until it parks, and until the block ends."""
    main = greenlet.getcurrent()

    def block() -> None:
        main.switch("parked")

    def pooled() -> None:
        main.switch("ready")
        while True:
            main.switch("parked")  # a block's body, until it waits
            main.switch("done")  # the block ended; wait here for the next one

    timings: dict[str, list[float]] = {"new-start": [], "new-end": [], "pool-start": [], "pool-end": []}
    pool = greenlet.greenlet(pooled)
    pool.switch()
    for _ in range(blocks):
        for name, operation in (
            ("new-start", None),
            ("new-end", None),
            ("pool-start", pool.switch),
            ("pool-end", pool.switch),
        ):
            _cool()
            began = time.perf_counter()
            if name == "new-start":
                fresh = greenlet.greenlet(block)
                fresh.switch()
            elif name == "new-end":
                fresh.switch()
            else:
                operation()
            timings[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) * 1e6 for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=300)
    result = run(parser.parse_args().blocks)
    for name, microseconds in result.items():
        print(f"{name:<12}{microseconds:8.1f} µs")


if __name__ == "__main__":
    main()
