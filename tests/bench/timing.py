"""Interleaved timing: every repetition runs each contender once, in rotating order,
so drift (thermal, other load, allocator state) affects all of them alike."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Stats:
    """Timings of one contender on one case, in microseconds."""

    median: float
    p25: float
    p75: float
    reps: int
    samples: list[float]  # seconds, in repetition order (paired across contenders)

    def as_dict(self) -> dict[str, Any]:
        return {"median_us": self.median, "p25_us": self.p25, "p75_us": self.p75, "reps": self.reps}


def _stats(samples: list[float]) -> Stats:
    us = sorted(sample * 1e6 for sample in samples)
    quartiles = statistics.quantiles(us, n=4) if len(us) > 1 else [us[0]] * 3
    return Stats(statistics.median(us), quartiles[0], quartiles[2], len(us), samples)


def paired_ratio(left: Stats, right: Stats) -> float:
    """Median over repetitions of left/right, each pair timed back to back: robust
    to drift that slows both alike (other load on the machine)."""
    return statistics.median([a / b for a, b in zip(left.samples, right.samples)])


def paired_difference(left: Stats, right: Stats) -> float:
    """Median over repetitions of left - right, in microseconds (pairs from one rotation)."""
    return statistics.median([(a - b) * 1e6 for a, b in zip(left.samples, right.samples)])


@dataclass
class Timing:
    """One contender's timings on one case, on both clocks: wall (``perf_counter``)
    and the thread's CPU time (``thread_time``; with torch on one thread, all of a
    call's work is on this thread, and CPU time leaves out the time other processes
    on a shared machine held the core)."""

    wall: Stats
    cpu: Stats

    def on(self, clock: str) -> Stats:
        return self.wall if clock == "wall" else self.cpu


def measure(
    contenders: dict[str, Callable[[], Any]],
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
) -> dict[str, Timing]:
    """Time each contender over the same repetitions.

    After ``warmup`` rounds, the number of repetitions is what fits in ``budget_s``
    (judged from the warm-up's CPU time), clamped to ``[min_reps, max_reps]``.
    """
    names = list(contenders)
    calls = [contenders[name] for name in names]
    gc.collect()
    started = time.thread_time()
    for _ in range(warmup):
        for call in calls:
            call()
    per_round = (time.thread_time() - started) / max(warmup, 1)
    reps = max(min_reps, min(max_reps, int(budget_s / max(per_round, 1e-9))))
    wall: list[list[float]] = [[] for _ in names]
    cpu: list[list[float]] = [[] for _ in names]
    count = len(calls)
    clock, cpu_clock = time.perf_counter, time.thread_time
    for rep in range(reps):
        for offset in range(count):
            index = (rep + offset) % count
            call = calls[index]
            start = clock()
            start_cpu = cpu_clock()
            call()
            end_cpu = cpu_clock()
            end = clock()
            wall[index].append(end - start)
            cpu[index].append(end_cpu - start_cpu)
    return {name: Timing(_stats(w), _stats(c)) for name, w, c in zip(names, wall, cpu)}
