"""Layers shared by every family. The inference transforms (models/inference.py) recognise these types,
so a family built from them gets form switching and folding for free."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EdgeportError


def init_trunc_normal(m: nn.Module) -> None:
    """timm's default init for conv/linear weights (std 0.02, zero bias); use with `model.apply`."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def stage_outputs(stages, x) -> list:
    """Run the stages in order and return every stage's output (features_only mode)."""
    outs = []
    for stage in stages:
        x = stage(x)
        outs.append(x)
    return outs


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval; removed by `to_inference`)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of NCHW, written without permutes (exports as reduce/elementwise ops)."""

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNormAct(nn.Module):
    """Conv2d → BatchNorm2d → activation; `fold_batchnorm` turns the norm into the conv's bias."""

    def __init__(self, in_ch, out_ch, kernel_size=1, stride=1, padding=None, groups=1, act=None, norm=True):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=not norm)
        self.bn = nn.BatchNorm2d(out_ch) if norm else nn.Identity()
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class PartialConv(nn.Module):
    """FasterNet's PConv: a k×k conv on the first dim/n_div channels, the rest passed through.

    Forms (same weights, same output):
      split_cat  split → conv → concat (training form)
      slice_cat  two slices → conv → concat: exports as ONNX Slice, not Split, so MNN keeps NC4HW4 (its
                 converter moves a Split with a constant sizes input to NCHW, two layout conversions each side)
      slicing    clone the input, conv the slice in place (clone kept: the block's shortcut needs x untouched)
      full       one dense conv over all channels; untouched channels get an identity kernel
    """

    FORMS = ("split_cat", "slice_cat", "slicing", "full")

    def __init__(self, dim: int, n_div: int = 4, kernel_size: int = 3, form: str = "split_cat"):
        super().__init__()
        if dim % n_div:
            raise EdgeportError(f"PartialConv: {dim} channels are not divisible by n_div={n_div}")
        self.dim, self.n_div, self.kernel_size = dim, n_div, kernel_size
        self.dim_conv = dim // n_div
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, kernel_size, 1, kernel_size // 2, bias=False)
        self.form = form

    @property
    def form(self) -> str:
        return self._form

    @form.setter
    def form(self, value: str):
        if value not in self.FORMS:
            raise EdgeportError(f"unknown PConv form '{value}'; valid forms: {', '.join(self.FORMS)}")
        self._form = value

    def full_weight(self) -> torch.Tensor:
        k, c, dc = self.kernel_size, self.dim, self.dim_conv
        w = self.conv.weight.new_zeros(c, c, k, k)
        w[:dc, :dc] = self.conv.weight
        idx = torch.arange(dc, c)
        w[idx, idx, k // 2, k // 2] = 1.0
        return w

    def forward(self, x):
        dc = self.dim_conv
        if self.form == "slicing":
            x = x.clone()
            x[:, :dc, :, :] = self.conv(x[:, :dc, :, :])
            return x
        if self.form == "full":
            return F.conv2d(x, self.full_weight(), padding=self.kernel_size // 2)
        if self.form == "slice_cat":
            return torch.cat((self.conv(x[:, :dc]), x[:, dc:]), 1)
        x1, x2 = torch.split(x, [dc, self.dim - dc], dim=1)
        return torch.cat((self.conv(x1), x2), 1)

    def extra_repr(self):
        return f"dim={self.dim}, n_div={self.n_div}, form={self.form}"


def _pointwise(in_ch, out_ch, bias, form):
    return nn.Conv2d(in_ch, out_ch, 1, bias=bias) if form == "conv" else nn.Linear(in_ch, out_ch, bias=bias)


def _batch_norm_last(bn: nn.BatchNorm2d, x):
    """Apply a BatchNorm2d to a channels-last tensor: as (N·H·W, C, 1, 1) its statistics are the same."""
    return bn(x.reshape(-1, x.shape[-1], 1, 1)).reshape(x.shape)


class PointwiseMlp(nn.Module):
    """The pointwise (1x1) MLP of a block, with its optional pre-norm, mid-norm and layer scale.

        pre_norm → fc1 → mid_norm → act → fc2 → × gamma

    form "conv": NCHW throughout, 1x1 convs, LayerNorm2d for a LayerNorm pre-norm (no permutes).
    form "fc":   permute to NHWC, nn.Linear layers and nn.LayerNorm, permute back (the original ConvNeXt form).
    pre_norm / mid_norm: None, "ln" or "bn". Parameter names are the same in both forms; only the
    weight shapes differ ([out, in, 1, 1] vs [out, in]).
    """

    FORMS = ("conv", "fc")

    def __init__(self, in_ch, hidden, out_ch=None, act=nn.GELU, bias=True, pre_norm=None, mid_norm=None,
                 layer_scale=None, norm_eps=1e-6, form="conv"):
        super().__init__()
        if form not in self.FORMS:
            raise EdgeportError(f"unknown MLP form '{form}'; valid forms: {', '.join(self.FORMS)}")
        out_ch = out_ch or in_ch
        self.form = form
        self.norm = self._make_norm(pre_norm, in_ch, norm_eps)
        self.fc1 = _pointwise(in_ch, hidden, bias, form)
        self.mid_norm = self._make_norm(mid_norm, hidden, 1e-5)
        self.act = act()
        self.fc2 = _pointwise(hidden, out_ch, bias, form)
        self.gamma = nn.Parameter(torch.full((out_ch,), float(layer_scale))) if layer_scale else None

    def _make_norm(self, kind, ch, eps):
        if kind is None:
            return nn.Identity()
        if kind == "bn":
            return nn.BatchNorm2d(ch)
        if kind == "ln":
            return LayerNorm2d(ch, eps=eps) if self.form == "conv" else nn.LayerNorm(ch, eps=eps)
        raise EdgeportError(f"unknown norm kind '{kind}'; valid: ln, bn")

    def _norm(self, norm, x):
        if self.form == "fc" and isinstance(norm, nn.BatchNorm2d):
            return _batch_norm_last(norm, x)
        return norm(x)

    def forward(self, x):
        if self.form == "fc":
            x = x.permute(0, 2, 3, 1)
        x = self.fc1(self._norm(self.norm, x))
        x = self.fc2(self.act(self._norm(self.mid_norm, x)))
        if self.gamma is not None:
            x = x * (self.gamma if self.form == "fc" else self.gamma[:, None, None])
        return x.permute(0, 3, 1, 2) if self.form == "fc" else x


class SqueezeExcite(nn.Module):
    """SE on the pooled map: reduce → act → expand → sigmoid, as 1x1 convs ("conv") or nn.Linear ("fc")."""

    FORMS = ("conv", "fc")

    def __init__(self, ch, rd_ch, act=nn.SiLU, form="conv"):
        super().__init__()
        self.form = form
        self.fc1 = _pointwise(ch, rd_ch, True, form)
        self.act = act()
        self.fc2 = _pointwise(rd_ch, ch, True, form)

    def forward(self, x):
        if self.form == "fc":
            s = x.mean((2, 3))
            s = torch.sigmoid(self.fc2(self.act(self.fc1(s))))
            return x * s[:, :, None, None]
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))
