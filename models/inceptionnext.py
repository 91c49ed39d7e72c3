"""InceptionNeXt (Yu et al. 2023, "InceptionNeXt: When Inception Meets ConvNeXt"), names as in timm.

Registered as timm's `inception_next_{atto,tiny,small,base}`; the official repo's `inceptionnext_*` names are
aliases (cfg.extra["alias_of"] names the canonical model).
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import ModelCfg, register_checkpoint_converter, register_model
from .checkpoint import rename_key
from .errors import EdgeportError
from .layers import ConvNormAct, DropPath, PointwiseMlp, init_trunc_normal, stage_outputs

__all__ = ["InceptionDWConv2d", "InceptionNeXt", "InceptionNeXtBlock"]


class InceptionDWConv2d(nn.Module):
    """Depthwise token mixer split over channels: identity | 3x3 | 1xk | kx1, concatenated back in order."""

    def __init__(self, dim: int, square_kernel_size: int = 3, band_kernel_size: int = 11,
                 branch_ratio: float = 0.125):
        super().__init__()
        gc = int(dim * branch_ratio)
        sk, bk = square_kernel_size, band_kernel_size
        self.dwconv_hw = nn.Conv2d(gc, gc, sk, padding=sk // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, bk), padding=(0, bk // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (bk, 1), padding=(bk // 2, 0), groups=gc)
        self.split_sizes = (dim - 3 * gc, gc, gc, gc)

    def forward(self, x):
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class InceptionNeXtBlock(nn.Module):
    """x + drop_path(mlp(token_mixer(x))); the MLP holds the BatchNorm before fc1 and the layer scale."""

    def __init__(self, dim: int, mlp_ratio: int, band_kernel_size: int, branch_ratio: float,
                 drop_path: float = 0.0, mlp: str = "conv"):
        super().__init__()
        self.token_mixer = InceptionDWConv2d(dim, band_kernel_size=band_kernel_size,
                                             branch_ratio=branch_ratio)
        self.mlp = PointwiseMlp(dim, mlp_ratio * dim, act=nn.GELU, bias=True, pre_norm="bn", layer_scale=1e-6,
                                form=mlp)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.token_mixer(x)))


class InceptionNeXtStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, drop_paths, downsample: bool, **block_kwargs):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[InceptionNeXtBlock(out_ch, drop_path=dp, **block_kwargs)
                                      for dp in drop_paths])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class MlpHead(nn.Module):
    """Global average pool → fc1 (dim → 3·dim) → GELU → LayerNorm → fc2."""

    def __init__(self, in_ch: int, num_classes: int, mlp_ratio: int = 3):
        super().__init__()
        hidden = mlp_ratio * in_ch
        self.fc1 = nn.Linear(in_ch, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x.mean((2, 3))))))


class InceptionNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), mlp_ratios=(4, 4, 4, 3),
                 band_kernel_size: int = 11, branch_ratio: float = 0.125, num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.0, mlp: str = "conv",
                 features_only: bool = False):
        super().__init__()
        if mlp not in PointwiseMlp.FORMS:
            raise EdgeportError(f"unknown InceptionNeXt mlp form '{mlp}'; valid forms: "
                                f"{', '.join(PointwiseMlp.FORMS)}")
        # The official stem conv has a bias; BN cancels it, so the converter moves it into bn.running_mean.
        self.stem = ConvNormAct(in_chans, dims[0], 4, stride=4, padding=0)
        # Stochastic depth rising linearly over all blocks; on the CPU even under a meta-device context.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        rates = [r.tolist() for r in rates]
        in_dims = (dims[0], *dims[:-1])
        self.stages = nn.Sequential(*[
            InceptionNeXtStage(i, o, dp, downsample=n > 0, mlp_ratio=r, band_kernel_size=band_kernel_size,
                               branch_ratio=branch_ratio, mlp=mlp)
            for n, (i, o, dp, r) in enumerate(zip(in_dims, dims, rates, mlp_ratios))])
        self.features_only = features_only
        self.feature_channels = list(dims)
        self.head = None if features_only else MlpHead(dims[-1], num_classes)
        self.apply(init_trunc_normal)

    def forward(self, x):
        x = self.stem(x)
        if self.features_only:
            return stage_outputs(self.stages, x)
        return self.head(self.stages(x))


_ARCHS = {
    "inception_next_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), band_kernel_size=9,
                                branch_ratio=0.25),
    "inception_next_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "inception_next_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "inception_next_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
}


def _create(name: str, features_only: bool, **kwargs) -> InceptionNeXt:
    return InceptionNeXt(**{**_ARCHS[name], **kwargs}, features_only=features_only)


@register_model(ModelCfg(crop_pct=0.875, family="inceptionnext"))
def inception_next_atto(features_only=False, **kwargs):
    return _create("inception_next_atto", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="inceptionnext"))
def inception_next_tiny(features_only=False, **kwargs):
    return _create("inception_next_tiny", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="inceptionnext"))
def inception_next_small(features_only=False, **kwargs):
    return _create("inception_next_small", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.95, family="inceptionnext"))
def inception_next_base(features_only=False, **kwargs):
    return _create("inception_next_base", features_only, **kwargs)


def _register_alias(canonical: str, crop_pct: float) -> None:
    def fn(features_only=False, **kwargs):
        return _create(canonical, features_only, **kwargs)

    fn.__name__ = fn.__qualname__ = canonical.replace("inception_next", "inceptionnext")
    register_model(ModelCfg(crop_pct=crop_pct, family="inceptionnext", extra={"alias_of": canonical}))(fn)


for _name, _crop in [("inception_next_atto", 0.875), ("inception_next_tiny", 0.875),
                     ("inception_next_small", 0.875), ("inception_next_base", 0.95)]:
    _register_alias(_name, _crop)


# The official sail-sg/inceptionnext and timm's inception_next.py share one layout; ours differs only in the
# stem (ConvNormAct) and in the block's BatchNorm and layer scale living inside the MLP.
_RULES = [
    (r"^stem\.0\.", "stem.conv."),
    (r"^stem\.1\.", "stem.bn."),
    (r"^(stages\.\d+\.blocks\.\d+)\.(norm\.|gamma$)", r"\1.mlp.\2"),
]


@register_checkpoint_converter("inceptionnext")
def convert_inceptionnext(state_dict: dict, model: nn.Module) -> dict:
    """Official / timm InceptionNeXt layout → ours; our own layout passes through unchanged."""
    sd = dict(state_dict)
    if "stem.0.bias" in sd and "stem.1.running_mean" in sd:
        # BN(conv(x) + b) == BN'(conv(x)) with running_mean' = running_mean - b, in eval and in training.
        sd["stem.1.running_mean"] = sd["stem.1.running_mean"] - sd.pop("stem.0.bias")
    return {rename_key(k, _RULES): v for k, v in sd.items()}
