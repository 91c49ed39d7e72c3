"""Interleaved timing: variants run A B C A B C … (order rotated each round) so machine drift hits all alike,
and each variant is reported as a paired ratio to its baseline."""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import numpy as np


def interleaved(fns: dict[str, Callable[[], object]], iters: int = 30, warmup: int = 3,
                max_seconds: float | None = None, min_iters: int = 3) -> dict[str, np.ndarray]:
    """Seconds per call for every variant, measured in rotating round-robin order.

    With `max_seconds` (a budget for warm-up and rounds together, so a loaded machine cannot stretch a run
    without bound) warm-up ends after one round once a quarter of it is spent, and rounds stop once all of it
    is spent and `min_iters` are done; the arrays then hold the rounds done."""
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


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",  # x86
              "asimd", "asimdhp", "asimddp", "i8mm", "sve", "sve2")  # arm


def host_info() -> dict:
    cpu, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not cpu:
                    cpu = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return {"host": platform.node(), "machine": platform.machine(), "cpu": cpu or platform.processor(),
            "cpus": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags],
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
