"""FasterNet: "Run, Don't Walk: Chasing Higher FLOPS for Faster Neural Networks" (Chen et al., CVPR 2023).

Official code: https://github.com/JierunChen/FasterNet (timm port: timm/models/fasternet.py).

    patch embed (4x4 conv, stride 4, BN) → 4 stages of blocks; a 2x2 stride-2 conv + BN merges before 2–4
    block: x + drop_path(mlp(pconv(x))), pconv = 3x3 conv on dim/4 channels, mlp = 1x1 → BN → act → 1x1
    head: global pool → 1x1 conv to 1280 → act → linear

Checkpoints in the official and timm layouts load through the "fasternet" converter below.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ._registry import ModelCfg, register_checkpoint_converter, register_model
from .checkpoint import rename_key
from .layers import ConvNormAct, DropPath, PartialConv, PointwiseMlp, init_trunc_normal

__all__ = ["FasterNet", "FasterNetBlock", "FasterNetStage", "FasterNetHead"]


class FasterNetBlock(nn.Module):
    def __init__(self, dim, n_div=4, mlp_ratio=2.0, act=nn.ReLU, drop_path=0.0, layer_scale=None,
                 pconv="split_cat", mlp="conv"):
        super().__init__()
        self.spatial_mixing = PartialConv(dim, n_div, 3, form=pconv)
        self.mlp = PointwiseMlp(dim, int(dim * mlp_ratio), dim, act=act, bias=False, mid_norm="bn",
                                layer_scale=layer_scale, form=mlp)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.spatial_mixing(x)))


class FasterNetStage(nn.Module):
    """Optional patch merging (in_dim → dim, spatial / merge_stride) followed by `depth` blocks."""

    def __init__(self, in_dim, dim, depth, merge_size=2, merge_stride=2, drop_path=(), **block_kwargs):
        super().__init__()
        self.downsample = (ConvNormAct(in_dim, dim, merge_size, merge_stride, padding=0)
                           if merge_stride > 1 or in_dim != dim else nn.Identity())
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(*[FasterNetBlock(dim, drop_path=p, **block_kwargs) for p in drop_path])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class FasterNetHead(nn.Module):
    """Pool first, then the 1x1 conv to `feature_dim`: the conv runs on a 1x1 map, so it is nearly free."""

    def __init__(self, in_ch, feature_dim=1280, num_classes=1000, act=nn.ReLU):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_ch, feature_dim, 1, bias=False)
        self.act = act()
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.fc(self.flatten(self.act(self.conv(self.pool(x)))))


class FasterNet(nn.Module):
    def __init__(self, embed_dim=96, depths=(1, 2, 8, 2), mlp_ratio=2.0, n_div=4, patch_size=4,
                 patch_stride=4, merge_size=2, merge_stride=2, feature_dim=1280, act=nn.ReLU,
                 drop_path_rate=0.1, layer_scale=None, num_classes=1000, in_chans=3, features_only=False,
                 pconv="split_cat", mlp="conv"):
        super().__init__()
        dims = [int(embed_dim * 2 ** i) for i in range(len(depths))]
        self.patch_embed = ConvNormAct(in_chans, embed_dim, patch_size, patch_stride, padding=0)
        # Linear stochastic-depth decay over all blocks (plain Python: the model may live on the meta device).
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            stages.append(FasterNetStage(
                dims[max(i - 1, 0)], dims[i], depth, merge_size, merge_stride if i > 0 else 1,
                drop_path=dpr[first:first + depth], n_div=n_div, mlp_ratio=mlp_ratio, act=act,
                layer_scale=layer_scale, pconv=pconv, mlp=mlp))
        self.stages = nn.Sequential(*stages)
        self.num_features = dims[-1]
        self.feature_channels = dims
        self.features_only = features_only
        if features_only:  # the official `fork_feat` norms, one per stage output
            self.out_norms = nn.ModuleList(nn.BatchNorm2d(d) for d in dims)
        else:
            self.num_classes = num_classes
            self.head = FasterNetHead(dims[-1], feature_dim, num_classes, act)
        self.apply(init_trunc_normal)

    def forward_features(self, x):
        return self.stages(self.patch_embed(x))

    def forward(self, x):
        if not self.features_only:
            return self.head(self.forward_features(x))
        x = self.patch_embed(x)
        outs = []
        for stage, norm in zip(self.stages, self.out_norms):
            x = stage(x)
            outs.append(norm(x))
        return outs


# --- checkpoint layouts --------------------------------------------------------------------------------
# Official: stages.{0,2,4,6} hold blocks, stages.{1,3,5} are PatchMerging(reduction, norm); fork_feat norms
# are norm{0,2,4,6}; the head is avgpool_pre_head = (pool, conv, act) + head (Linear).
# timm: stages.{0..3} each with blocks and (stages 1–3) downsample.{reduction,norm}; conv_head + classifier.
# Both: patch_embed.{proj,norm}, blocks.N.spatial_mixing.partial_conv3, blocks.N.mlp.{0,1,3}, layer_scale.
_OFFICIAL_RULES = (  # first matching rule wins
    (r"^stages\.(\d+)\.blocks\.", lambda m: f"stages.{int(m[1]) // 2}.blocks."),
    (r"^stages\.(\d+)\.(reduction|norm)\.", lambda m: f"stages.{(int(m[1]) + 1) // 2}.downsample.{m[2]}."),
    (r"^norm(\d+)\.", lambda m: f"out_norms.{int(m[1]) // 2}."),
    (r"^avgpool_pre_head\.1\.", "head.conv."),
    (r"^head\.", "head.fc."),
)
_TIMM_RULES = (
    (r"^conv_head\.", "head.conv."),
    (r"^classifier\.", "head.fc."),
)
_SHARED_RULES = (  # applied after the layout rules, all of them
    (r"^patch_embed\.proj\.", "patch_embed.conv."),
    (r"^patch_embed\.norm\.", "patch_embed.bn."),
    (r"\.downsample\.reduction\.", ".downsample.conv."),
    (r"\.downsample\.norm\.", ".downsample.bn."),
    (r"\.spatial_mixing\.partial_conv3\.", ".spatial_mixing.conv."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.1\.", ".mlp.mid_norm."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"\.layer_scale$", ".mlp.gamma"),
)


def checkpoint_layout(keys) -> str:
    """The layout of a state_dict: "official", "timm" or "ours", told apart by names only one layout uses."""
    keys = list(keys)
    if any(k.startswith(("conv_head.", "classifier.")) or ".downsample.reduction." in k for k in keys):
        return "timm"
    if any(k.startswith(("patch_embed.proj.", "avgpool_pre_head."))
           or re.match(r"(stages\.\d+\.reduction|norm\d+)\.", k) for k in keys):
        return "official"
    return "ours"


def _rename(key: str, layout_rules) -> str:
    for pattern, repl in layout_rules:
        new = re.sub(pattern, repl, key, count=1)
        if new != key:
            key = new
            break
    return rename_key(key, _SHARED_RULES)


@register_checkpoint_converter("fasternet")
def convert_fasternet_checkpoint(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Official JierunChen/FasterNet or timm layout → ours; our own layout passes through unchanged."""
    layout = checkpoint_layout(state_dict)
    rules = _OFFICIAL_RULES if layout == "official" else _TIMM_RULES
    sd = dict(state_dict) if layout == "ours" else {_rename(k, rules): v for k, v in state_dict.items()}
    if getattr(model, "features_only", False) and not any(k.startswith("out_norms.") for k in sd):
        sd.update(_identity_out_norms(model))
    return sd


def _identity_out_norms(model: FasterNet) -> dict:
    """A classification checkpoint has no fork_feat norms: make them identities (running_var = 1 − eps), so a
    features_only model built from ImageNet weights returns the raw stage outputs, as timm's does."""
    sd = {}
    for i, bn in enumerate(model.out_norms):
        ones = torch.ones(bn.num_features)
        sd.update({f"out_norms.{i}.weight": ones, f"out_norms.{i}.bias": torch.zeros_like(ones),
                   f"out_norms.{i}.running_mean": torch.zeros_like(ones),
                   f"out_norms.{i}.running_var": ones - bn.eps,
                   f"out_norms.{i}.num_batches_tracked": torch.tensor(0)})
    return sd


# --- variants ------------------------------------------------------------------------------------------
_RELEASE = "https://github.com/JierunChen/FasterNet/releases/download/v1.0/"


def _cfg(weights_file: str) -> ModelCfg:
    # Official eval: resize to 224 / 0.9 with bicubic, centre crop 224 (timm: test_crop_pct 0.9, bicubic).
    return ModelCfg(crop_pct=0.9, interpolation="bicubic", family="fasternet",
                    extra={"weights_url": _RELEASE + weights_file})


def _fasternet(features_only, arch: dict, overrides: dict) -> FasterNet:
    return FasterNet(features_only=features_only, **{**arch, **overrides})


@register_model(_cfg("fasternet_t0-epoch.281-val_acc1.71.9180.pth"))
def fasternet_t0(features_only=False, **kwargs):
    arch = dict(embed_dim=40, depths=(1, 2, 8, 2), act=nn.GELU, drop_path_rate=0.0)
    return _fasternet(features_only, arch, kwargs)


@register_model(_cfg("fasternet_t1-epoch.291-val_acc1.76.2180.pth"))
def fasternet_t1(features_only=False, **kwargs):
    arch = dict(embed_dim=64, depths=(1, 2, 8, 2), act=nn.GELU, drop_path_rate=0.02)
    return _fasternet(features_only, arch, kwargs)


@register_model(_cfg("fasternet_t2-epoch.289-val_acc1.78.8860.pth"))
def fasternet_t2(features_only=False, **kwargs):
    arch = dict(embed_dim=96, depths=(1, 2, 8, 2), act=nn.ReLU, drop_path_rate=0.05)
    return _fasternet(features_only, arch, kwargs)


@register_model(_cfg("fasternet_s-epoch.299-val_acc1.81.2840.pth"))
def fasternet_s(features_only=False, **kwargs):
    arch = dict(embed_dim=128, depths=(1, 2, 13, 2), act=nn.ReLU, drop_path_rate=0.1)
    return _fasternet(features_only, arch, kwargs)


@register_model(_cfg("fasternet_m-epoch.291-val_acc1.82.9620.pth"))
def fasternet_m(features_only=False, **kwargs):
    arch = dict(embed_dim=144, depths=(3, 4, 18, 3), act=nn.ReLU, drop_path_rate=0.2)
    return _fasternet(features_only, arch, kwargs)


@register_model(_cfg("fasternet_l-epoch.299-val_acc1.83.5060.pth"))
def fasternet_l(features_only=False, **kwargs):
    arch = dict(embed_dim=192, depths=(3, 4, 18, 3), act=nn.ReLU, drop_path_rate=0.3)
    return _fasternet(features_only, arch, kwargs)


# A narrow FasterNet for 32×32 inputs, trained on scikit-learn's digits by models.digits (the test suite's trained
# model: its checkpoint is models/weights/fasternet_digits.safetensors). Images are 32×32 already: crop_pct 1.0
# keeps them whole (the resize is the identity); dark ink on white, so mean/std are those of the digits' pixels.
@register_model(ModelCfg(input_size=(3, 32, 32), mean=(0.8, 0.8, 0.8), std=(0.35, 0.35, 0.35), crop_pct=1.0,
                         interpolation="bicubic", num_classes=10, family="fasternet",
                         extra={"trained_on": "sklearn digits (models.digits)"}))
def fasternet_digits(features_only=False, **kwargs):
    arch = dict(embed_dim=8, depths=(1, 1, 2, 1), feature_dim=128, act=nn.GELU, drop_path_rate=0.0,
                num_classes=10)
    return _fasternet(features_only, arch, kwargs)
