"""The FasterNet paper's operator comparison (its Table 1) measured on this CPU: Conv 3x3, GConv (g=16),
DWConv and PConv (r = 1/4), alone and followed by a PWConv, at four feature-map sizes, in PyTorch eager."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.layers import PartialConv

from .timing import interleaved, summarize

SHAPES = ((96, 56), (192, 28), (384, 14), (768, 7))
K = 3


def paper_cost(op: str, c: int, hw: int) -> tuple[int, int]:
    """(MACs, memory access in elements) by the paper's formulas."""
    n = hw * hw
    if op == "conv":
        return n * K * K * c * c, n * 2 * c + K * K * c * c
    if op == "gconv":
        return n * K * K * c * c // 16, n * 2 * c + K * K * c * c // 16
    if op == "dwconv":
        return n * K * K * c, n * 2 * c + K * K * c
    if op == "pconv":
        cp = c // 4
        return n * K * K * cp * cp, n * 2 * cp + K * K * cp * cp
    if op == "pwconv":
        return n * c * c, n * 2 * c + c * c
    raise ValueError(op)


def build(op: str, c: int) -> nn.Module:
    return {
        "conv": lambda: nn.Conv2d(c, c, K, padding=1, bias=False),
        "gconv": lambda: nn.Conv2d(c, c, K, padding=1, groups=16, bias=False),
        "dwconv": lambda: nn.Conv2d(c, c, K, padding=1, groups=c, bias=False),
        "pconv": lambda: PartialConv(c, 4, K, form="split_cat"),
    }[op]()


def counted_macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def operator_table(iters: int = 30, threads: int = 1, shapes=SHAPES) -> list[dict]:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _operator_rows(iters, threads, shapes)
    finally:
        torch.set_num_threads(prev)


def _operator_rows(iters: int, threads: int, shapes) -> list[dict]:
    rows = []
    for c, hw in shapes:
        x = torch.randn(1, c, hw, hw)
        variants = {}
        for op in ("conv", "gconv", "dwconv", "pconv"):
            variants[op] = build(op, c).eval()
            variants[f"{op}+pwconv"] = nn.Sequential(build(op, c), nn.Conv2d(c, c, 1, bias=False)).eval()
        with torch.inference_mode():
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
            stats = summarize(interleaved(fns, iters=iters))
            for name, module in variants.items():
                ops = name.split("+")
                macs = sum(paper_cost(o, c, hw)[0] for o in ops)
                mem = sum(paper_cost(o, c, hw)[1] for o in ops)
                ms = stats[name]["median_ms"]
                rows.append({"shape": f"{c}x{hw}x{hw}", "op": name, "macs_paper": macs,
                             "macs_counted": counted_macs(module, x), "memory_access": mem,
                             "median_ms": ms, "p10_ms": stats[name]["p10_ms"],
                             "p90_ms": stats[name]["p90_ms"],
                             "gflops_per_s": 2 * macs / (ms * 1e-3) / 1e9, "threads": threads})
    return rows
