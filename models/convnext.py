"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"), with timm's atto..nano variants.

The block's pointwise MLP is a `layers.PointwiseMlp`: form "fc" (default) is the original permute + nn.Linear
block, form "conv" (`create_model(name, mlp="conv")`) the 1x1-conv block with a channels-first LayerNorm. Both
forms share parameter names, so one checkpoint loads into either.
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import ModelCfg, register_checkpoint_converter, register_model
from .checkpoint import rename_key
from .errors import EdgeportError
from .layers import DropPath, LayerNorm2d, PointwiseMlp, init_trunc_normal, stage_outputs

__all__ = ["ConvNeXt", "ConvNeXtBlock"]

_EPS = 1e-6


class ConvNeXtBlock(nn.Module):
    """x + drop_path(mlp(dwconv7x7(x))); the MLP holds the LayerNorm and the layer scale."""

    def __init__(self, dim: int, mlp_ratio: int = 4, drop_path: float = 0.0, mlp: str = "fc"):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.mlp = PointwiseMlp(dim, mlp_ratio * dim, act=nn.GELU, pre_norm="ln", layer_scale=1e-6,
                                norm_eps=_EPS, form=mlp)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.conv_dw(x)))


class ConvNeXtStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, drop_paths, mlp: str, downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_ch, eps=_EPS),
                                            nn.Conv2d(in_ch, out_ch, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_ch, drop_path=dp, mlp=mlp) for dp in drop_paths])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pool → LayerNorm → Linear (the original ConvNeXt head order)."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_ch, eps=_EPS)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x.mean((2, 3))))


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.0, mlp: str = "fc",
                 features_only: bool = False):
        super().__init__()
        if mlp not in PointwiseMlp.FORMS:
            raise EdgeportError(f"unknown ConvNeXt mlp form '{mlp}'; valid forms: "
                                f"{', '.join(PointwiseMlp.FORMS)}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=_EPS))
        # Stochastic depth rising linearly over all blocks; on the CPU even under a meta-device context.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        rates = [r.tolist() for r in rates]
        in_dims = (dims[0], *dims[:-1])
        self.stages = nn.Sequential(*[ConvNeXtStage(i, o, dp, mlp, downsample=n > 0)
                                      for n, (i, o, dp) in enumerate(zip(in_dims, dims, rates))])
        self.features_only = features_only
        self.feature_channels = list(dims)
        self.head = None if features_only else ClassifierHead(dims[-1], num_classes)
        self.apply(init_trunc_normal)

    def forward(self, x):
        x = self.stem(x)
        if self.features_only:
            return stage_outputs(self.stages, x)
        return self.head(self.stages(x))


_ARCHS = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


def _create(name: str, features_only: bool, **kwargs) -> ConvNeXt:
    depths, dims = _ARCHS[name]
    return ConvNeXt(depths, dims, features_only=features_only, **kwargs)


# crop_pct as timm's default pretrained tag for each name (atto/femto/pico d*_in1k: 0.875 at 224, 0.95 only at
# their 288 test size; nano in12k_ft_in1k/d1h: 0.95; tiny/small/base: the FB in1k weights, 0.875).
@register_model(ModelCfg(crop_pct=0.875, family="convnext"))
def convnext_atto(features_only=False, **kwargs):
    return _create("convnext_atto", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="convnext"))
def convnext_femto(features_only=False, **kwargs):
    return _create("convnext_femto", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="convnext"))
def convnext_pico(features_only=False, **kwargs):
    return _create("convnext_pico", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.95, family="convnext"))
def convnext_nano(features_only=False, **kwargs):
    return _create("convnext_nano", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="convnext"))
def convnext_tiny(features_only=False, **kwargs):
    return _create("convnext_tiny", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="convnext"))
def convnext_small(features_only=False, **kwargs):
    return _create("convnext_small", features_only, **kwargs)


@register_model(ModelCfg(crop_pct=0.875, family="convnext"))
def convnext_base(features_only=False, **kwargs):
    return _create("convnext_base", features_only, **kwargs)


# Official facebookresearch/ConvNeXt names → ours. Ours keep timm's names, except that the block's LayerNorm
# and layer scale live inside the MLP (stages.i.blocks.j.mlp.{norm,gamma}).
_OFFICIAL = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)", r"stages.\1.blocks.\2.mlp.\3"),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
# timm/models/convnext.py names → ours (stem, downsample, conv_dw, mlp.fc*, head.* are already ours).
_TIMM = [(r"^(stages\.\d+\.blocks\.\d+)\.(norm\.|gamma$)", r"\1.mlp.\2")]


@register_checkpoint_converter("convnext")
def convert_convnext(state_dict: dict, model: nn.Module) -> dict:
    """Official and timm ConvNeXt layouts → ours; our own layout passes through unchanged."""
    return {rename_key(rename_key(k, _OFFICIAL), _TIMM): v for k, v in state_dict.items()}
