"""Peak SGEMM throughput here: the roof every artifact's achieved FLOP/s is compared with."""
from __future__ import annotations

import time

import torch


def sgemm_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """Best GFLOP/s of an n×n float32 matmul in PyTorch at `threads` threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(prev)
