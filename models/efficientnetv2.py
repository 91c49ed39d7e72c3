"""EfficientNetV2 (Tan & Le, 2021, https://arxiv.org/abs/2104.00298) in the layout of seed 002, the
d-li14/efficientnetv2.pytorch implementation; its stage tables and widths reproduce its parameter counts
exactly.

How the seed's variant differs from the paper / TF / timm (`tf_efficientnetv2_*`) models, which is why timm
weights cannot be loaded here:
  * the head conv is 1792 wide in every variant (TF: 1280); the stem is 24 wide even for l/xl (TF: 32);
  * expand-ratio-1 Fused-MBConv blocks keep a 1x1 projection after the 3x3 conv (TF: a single 3x3 conv);
  * the S variant's last stage is 272 wide (TF: 256);
  * SE reduces to make_divisible(block_in // 4, 8) channels (TF: block_in // 4, unrounded).

Features (features_only=True), the last block of each resolution, before the head conv:
  stride 4 → stage 1, stride 8 → stage 2, stride 16 → stage 4, stride 32 → last stage (5 for s, 6 for m/l/xl).
"""
from __future__ import annotations

import re

from torch import nn

from ._registry import ModelCfg, register_checkpoint_converter, register_model
from .errors import EdgeportError
from .layers import ConvNormAct, DropPath, SqueezeExcite

# (block, expand ratio, out channels, depth, first stride); Fused-MBConv blocks never have SE, MBConv always.
STAGES = {
    "s": [("fused", 1, 24, 2, 1), ("fused", 4, 48, 4, 2), ("fused", 4, 64, 4, 2),
          ("mbconv", 4, 128, 6, 2), ("mbconv", 6, 160, 9, 1), ("mbconv", 6, 272, 15, 2)],
    "m": [("fused", 1, 24, 3, 1), ("fused", 4, 48, 5, 2), ("fused", 4, 80, 5, 2),
          ("mbconv", 4, 160, 7, 2), ("mbconv", 6, 176, 14, 1), ("mbconv", 6, 304, 18, 2),
          ("mbconv", 6, 512, 5, 1)],
    "l": [("fused", 1, 32, 4, 1), ("fused", 4, 64, 7, 2), ("fused", 4, 96, 7, 2),
          ("mbconv", 4, 192, 10, 2), ("mbconv", 6, 224, 19, 1), ("mbconv", 6, 384, 25, 2),
          ("mbconv", 6, 640, 7, 1)],
    "xl": [("fused", 1, 32, 4, 1), ("fused", 4, 64, 8, 2), ("fused", 4, 96, 8, 2),
           ("mbconv", 4, 192, 16, 2), ("mbconv", 6, 256, 24, 1), ("mbconv", 6, 512, 32, 2),
           ("mbconv", 6, 640, 8, 1)],
}
STEM_WIDTH = 24
HEAD_WIDTH = 1792


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10 % down (the TF/MobileNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class FusedMBConv(nn.Module):
    """3x3 conv (expand) → 1x1 conv (project), residual when the shape is kept."""

    def __init__(self, in_ch, out_ch, stride, expand, drop_path=0.0):
        super().__init__()
        hidden = round(in_ch * expand)
        self.conv_exp = ConvNormAct(in_ch, hidden, 3, stride, act=nn.SiLU)
        self.conv_pwl = ConvNormAct(hidden, out_ch, 1)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    @property
    def branch_end_norm(self):
        """The norm closing the residual branch, the block's layer scale in effect (see models.calibrate)."""
        return self.conv_pwl.bn if self.has_skip else None

    def forward(self, x):
        y = self.conv_pwl(self.conv_exp(x))
        return x + self.drop_path(y) if self.has_skip else y


class MBConv(nn.Module):
    """1x1 expand → 3x3 depthwise → SE → 1x1 project, residual when the shape is kept."""

    def __init__(self, in_ch, out_ch, stride, expand, drop_path=0.0, mlp="conv"):
        super().__init__()
        hidden = round(in_ch * expand)
        self.conv_pw = ConvNormAct(in_ch, hidden, 1, act=nn.SiLU)
        self.conv_dw = ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, make_divisible(in_ch // 4), act=nn.SiLU, form=mlp)
        self.conv_pwl = ConvNormAct(hidden, out_ch, 1)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    branch_end_norm = FusedMBConv.branch_end_norm

    def forward(self, x):
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + self.drop_path(y) if self.has_skip else y


class ClassifierHead(nn.Module):
    """1x1 conv → BN → SiLU → global average pool → dropout → Linear."""

    def __init__(self, in_ch, width, num_classes, drop_rate=0.0):
        super().__init__()
        self.conv = ConvNormAct(in_ch, width, 1, act=nn.SiLU)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.conv(x).mean((2, 3))))


class EfficientNetV2(nn.Module):
    def __init__(self, stages, num_classes=1000, drop_rate=0.0, drop_path_rate=0.0, mlp="conv",
                 features_only=False):
        super().__init__()
        if mlp not in SqueezeExcite.FORMS:
            raise EdgeportError(f"unknown SE form mlp='{mlp}'; valid forms: "
                                f"{', '.join(SqueezeExcite.FORMS)}")
        self.stem = ConvNormAct(3, STEM_WIDTH, 3, 2, act=nn.SiLU)
        n_blocks = sum(depth for *_, depth, _ in stages)
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear, no tensors
        in_ch, stride, stage_strides, blocks_done = STEM_WIDTH, 2, [], 0
        self.stages = nn.Sequential()
        for kind, expand, out_ch, depth, first_stride in stages:
            blocks = []
            for i in range(depth):
                s = first_stride if i == 0 else 1
                dp = rates[blocks_done + i]
                if kind == "fused":
                    blocks.append(FusedMBConv(in_ch, out_ch, s, expand, dp))
                else:
                    blocks.append(MBConv(in_ch, out_ch, s, expand, dp, mlp))
                in_ch = out_ch
            blocks_done += depth
            stride *= first_stride
            stage_strides.append(stride)
            self.stages.append(nn.Sequential(*blocks))
        # The last stage at each stride in (4, 8, 16, 32) feeds the features_only outputs.
        self.feature_stages = [max(i for i, s in enumerate(stage_strides) if s == t) for t in (4, 8, 16, 32)]
        self.feature_channels = [stages[i][2] for i in self.feature_stages]
        self.features_only = features_only
        self.num_features = HEAD_WIDTH
        self.head = None if features_only else ClassifierHead(in_ch, HEAD_WIDTH, num_classes, drop_rate)
        self.apply(_init_weights)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x):
        if not self.features_only:
            return self.head(self.forward_features(x))
        x, feats = self.stem(x), []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.feature_stages:
                feats.append(x)
        return feats


def _init_weights(m):
    """The seed's init (convs N(0, 2/fan_out), BN 1/0, classifier N(0, 1e-3)), except SE: initialised like the
    1x1 convs it is in TF, the same in both forms (the seed's Linear init would pin every gate at 0.5)."""
    if isinstance(m, SqueezeExcite):
        for fc in (m.fc1, m.fc2):
            nn.init.normal_(fc.weight, 0.0, (2.0 / fc.weight.shape[0]) ** 0.5)
            nn.init.zeros_(fc.bias)
    elif isinstance(m, nn.Conv2d):
        k_h, k_w = m.kernel_size
        nn.init.normal_(m.weight, 0.0, (2.0 / (k_h * k_w * m.out_channels)) ** 0.5)
    elif isinstance(m, ClassifierHead):
        nn.init.normal_(m.fc.weight, 0.0, 1e-3)
        nn.init.zeros_(m.fc.bias)


# Eval preprocessing (the seed ships none): ImageNet mean/std as for any torchvision-style training; the
# paper's eval resolutions (s 384 — 300 is its train size —, m/l 480, xl 512); crop_pct 1.0 and bicubic as in
# the official TF eval pipeline (resize the whole image, no centre-crop margin).
def _cfg(size):
    return ModelCfg(input_size=(3, size, size), crop_pct=1.0, interpolation="bicubic",
                    family="efficientnetv2")


def _create(variant, features_only=False, **kwargs):
    return EfficientNetV2(STAGES[variant], features_only=features_only, **kwargs)


@register_model(_cfg(384))
def efficientnetv2_s(features_only=False, **kwargs):
    return _create("s", features_only, **kwargs)


@register_model(_cfg(480))
def efficientnetv2_m(features_only=False, **kwargs):
    return _create("m", features_only, **kwargs)


@register_model(_cfg(480))
def efficientnetv2_l(features_only=False, **kwargs):
    return _create("l", features_only, **kwargs)


@register_model(_cfg(512))
def efficientnetv2_xl(features_only=False, **kwargs):
    return _create("xl", features_only, **kwargs)


# Seed layout: one flat `features` Sequential (0 = stem, then every block in order), each block's layers in
# `conv` (an nn.Sequential whose activations also take indices), head conv `conv.0/1`, `classifier`.
_SEED_BLOCK_KEYS = {
    FusedMBConv: {"0": "conv_exp.conv", "1": "conv_exp.bn", "3": "conv_pwl.conv", "4": "conv_pwl.bn"},
    MBConv: {"0": "conv_pw.conv", "1": "conv_pw.bn", "3": "conv_dw.conv", "4": "conv_dw.bn",
             "6.fc.0": "se.fc1", "6.fc.2": "se.fc2", "7": "conv_pwl.conv", "8": "conv_pwl.bn"},
}
_SEED_FIXED = {"features.0.0": "stem.conv", "features.0.1": "stem.bn", "conv.0": "head.conv.conv",
               "conv.1": "head.conv.bn", "classifier": "head.fc"}
_SEED_BLOCK = re.compile(r"features\.(\d+)\.conv\.(\d+(?:\.fc\.\d)?)\.(\w+)$")


def _from_seed(sd: dict, model: EfficientNetV2) -> dict:
    blocks = [(f"stages.{i}.{j}", type(block))
              for i, stage in enumerate(model.stages) for j, block in enumerate(stage)]
    out = {}
    for key, value in sd.items():
        new = key
        m = _SEED_BLOCK.match(key)
        if m:
            index, layer, param = int(m.group(1)) - 1, m.group(2), m.group(3)
            if 0 <= index < len(blocks) and layer in _SEED_BLOCK_KEYS[blocks[index][1]]:
                new = f"{blocks[index][0]}.{_SEED_BLOCK_KEYS[blocks[index][1]][layer]}.{param}"
        else:
            prefix, _, param = key.rpartition(".")
            new = f"{_SEED_FIXED[prefix]}.{param}" if prefix in _SEED_FIXED else key
        out[new] = value  # unmappable keys stay as they are, so the strict check names them
    return out


@register_checkpoint_converter("efficientnetv2")
def convert_efficientnetv2(sd: dict, model: nn.Module) -> dict:
    """Seed-002 (d-li14) layout → ours; ours passes through. TF/timm weights are a different architecture."""
    if any(k.startswith(("conv_stem.", "blocks.")) for k in sd):
        raise EdgeportError("checkpoint is a timm/TF EfficientNetV2 (head 1280, single-conv first stage), a "
                            "different architecture from these seed-002 models; load it with timm instead")
    if any(k.startswith("features.0.0.") for k in sd):
        return _from_seed(sd, model)
    return sd
