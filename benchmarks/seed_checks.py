"""Claims from the seed articles, re-checked here with torch.utils.flop_counter (MACs = FLOPs / 2)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.fasternet import FasterNet
from models.layers import PartialConv

# Seed 000: fvcore on FasterNet(depths=(1, 1, 1, 1)) at 256² (fvcore counts one MAC as one "flop").
SEED000 = {"pconv": {"params_m": 7.4, "gmacs": 0.948}, "full_conv": {"params_m": 14.0, "gmacs": 2.222}}


def _with_full_convs(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, PartialConv):
                setattr(module, name, nn.Conv2d(child.dim, child.dim, child.kernel_size,
                                                padding=child.kernel_size // 2, bias=False))
    return model


def params_and_macs(model: nn.Module, size: int) -> tuple[float, float]:
    """(millions of parameters, GMACs) at batch 1."""
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 2e9


def seed000_table() -> list[dict]:
    rows = []
    for variant, replace in (("pconv", False), ("full_conv", True)):
        model = FasterNet(embed_dim=96, depths=(1, 1, 1, 1), drop_path_rate=0.0)
        if replace:
            model = _with_full_convs(model)
        params, gmacs = params_and_macs(model, 256)
        claim = SEED000[variant]
        holds = (abs(params - claim["params_m"]) / claim["params_m"] < 0.01
                 and abs(gmacs - claim["gmacs"]) / claim["gmacs"] < 0.02)
        rows.append({"variant": variant, "params_m": params, "gmacs": gmacs,
                     "seed_params_m": claim["params_m"], "seed_gmacs": claim["gmacs"], "holds": holds})
    return rows
