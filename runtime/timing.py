"""Interleaved timing: variants run A B C A B C … (order rotated each round) so machine drift hits all alike,
and each variant is reported as a paired ratio to its baseline. Torch-free: the board bench (runtime.bench)
and the benchmarks share it."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def interleaved(fns: dict[str, Callable[[], object]], iters: int = 30, warmup: int = 3,
                max_seconds: float | None = None, min_iters: int = 3,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Seconds per call for every variant, measured in rotating round-robin order.

    With `max_seconds` (a budget for warm-up and rounds together, so a loaded machine cannot stretch a run
    without bound) warm-up ends after one round once a quarter of it is spent, and rounds stop once all of it
    is spent and `min_iters` are done; the arrays then hold the rounds done. `progress(rounds_done)` is called
    after every round."""
    names = list(fns)
    start = time.perf_counter()

    def spent(fraction: float) -> bool:
        return max_seconds is not None and time.perf_counter() - start > fraction * max_seconds

    for w in range(warmup):
        if w and spent(0.25):
            break
        for name in names:
            fns[name]()
    times = {name: np.empty(iters) for name in names}
    done = 0
    for i in range(iters):
        if i >= min_iters and spent(1.0):
            break
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            times[name][i] = time.perf_counter() - t0
        done += 1
        if progress:
            progress(done)
    return {name: t[:done] for name, t in times.items()}


def summarize(times: dict[str, np.ndarray], baseline: str | None = None) -> dict[str, dict]:
    """median/p10/p90 in ms, and the per-round ratio to `baseline` (median with p10–p90 spread)."""
    out = {}
    for name, t in times.items():
        row = {"median_ms": 1e3 * float(np.median(t)), "p10_ms": 1e3 * float(np.percentile(t, 10)),
               "p90_ms": 1e3 * float(np.percentile(t, 90)), "iters": int(len(t))}
        if baseline is not None:
            r = t / times[baseline]
            row.update(ratio=float(np.median(r)), ratio_p10=float(np.percentile(r, 10)),
                       ratio_p90=float(np.percentile(r, 90)))
        out[name] = row
    return out
