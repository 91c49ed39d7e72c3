"""Interleaved timing (defined in runtime.timing, shared with the board bench) and the host record."""
from __future__ import annotations

import os
import platform
import time

from runtime.device import cpuinfo_blocks, isa_flags
from runtime.timing import interleaved, summarize

__all__ = ["interleaved", "summarize", "host_info", "load_average"]


def host_info() -> dict:
    blocks = cpuinfo_blocks()  # the board bench's reading of /proc/cpuinfo, so both name a CPU the same way
    cpu = next((b["model name"] for b in blocks if b.get("model name")), "")
    return {"host": platform.node(), "machine": platform.machine(), "cpu": cpu or platform.processor(),
            "cpus": os.cpu_count(), "simd": isa_flags(blocks),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
