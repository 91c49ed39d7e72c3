"""Interleaved timing (defined in runtime.timing, shared with the board bench) and the host record."""
from __future__ import annotations

import os
import platform
import time

from runtime.device import ISA_FLAGS
from runtime.timing import interleaved, summarize

__all__ = ["interleaved", "summarize", "host_info", "load_average", "SIMD_FLAGS"]


SIMD_FLAGS = ISA_FLAGS


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
