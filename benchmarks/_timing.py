"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/bench_X.py`, so this
folder is on sys.path and `from _timing import ...` works)."""
from __future__ import annotations

import time


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed warm-up call (seconds)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fwd_bwd(layer, x):
    """A step that runs `layer` forward on `x` and back-propagates a scalar of its output."""
    def step():
        y, _ = layer(x)
        y.square().mean().backward()
    return step
