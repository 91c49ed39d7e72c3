"""YOLO11 detectors: Ultralytics' architecture written for edgeport, built from an Ultralytics model YAML dict.

    YOLO11(cfg, scale="n", nc=80)    the `backbone` + `head` lists of a yolo11*.yaml, scaled by depth/width
    forward(images) -> (boxes, scores)   boxes [N, A, 4] x1, y1, x2, y2 in input pixels, scores [N, A, nc] after
                                     sigmoid; anchors in Ultralytics' order (P3, P4, P5, each row-major).
                                     DFL and box decoding are in the graph, NMS is not (runtime/detect.py).

Module and parameter names follow Ultralytics' (`model.0.conv.weight`, `model.23.cv2.0.0.conv.weight`,
`model.23.dfl.conv.weight`), so the state dict of an Ultralytics checkpoint loads strictly
(models/ultralytics_ckpt.py). Every Conv+BN+SiLU is a `ConvNormAct`, so `to_inference` folds the neck's and
head's BatchNorms like any backbone's.

The seeds' variant (seeds 001, 004): a zoo backbone in features-only form as layer 0, its four outputs (strides
4/8/16/32) taking layer indices 1–4 as in the seeds' parse_model, so P3/P4/P5 are indices 2/3/4.
"""
from __future__ import annotations

import ast
import copy
import math
import os

import torch
from torch import nn

from ._registry import ModelCfg, register_model
from .checkpoint import convert_state_dict
from .errors import EdgeportError
from .layers import ConvNormAct
from .ultralytics_ckpt import MAX_ARG, ModuleStub, check_yaml, read_ultralytics

# Ultralytics' initialize_weights sets every BatchNorm2d to eps=1e-3, momentum=0.03; checkpoints do not store eps,
# so a model built with PyTorch's 1e-5 would load strictly and still compute something else.
BN_EPS, BN_MOMENTUM = 1e-3, 0.03
REG_MAX = 16

# Ultralytics' cfg/models/11/yolo11.yaml as data (pyyaml is not a dependency of edgeport).
YOLO11_YAML = {
    "nc": 80,
    "scales": {  # [depth, width, max_channels]
        "n": [0.50, 0.25, 1024], "s": [0.50, 0.50, 1024], "m": [0.50, 1.00, 512],
        "l": [1.00, 1.00, 512], "x": [1.00, 1.50, 512],
    },
    "backbone": [
        [-1, 1, "Conv", [64, 3, 2]],  # 0-P1/2
        [-1, 1, "Conv", [128, 3, 2]],  # 1-P2/4
        [-1, 2, "C3k2", [256, False, 0.25]],
        [-1, 1, "Conv", [256, 3, 2]],  # 3-P3/8
        [-1, 2, "C3k2", [512, False, 0.25]],
        [-1, 1, "Conv", [512, 3, 2]],  # 5-P4/16
        [-1, 2, "C3k2", [512, True]],
        [-1, 1, "Conv", [1024, 3, 2]],  # 7-P5/32
        [-1, 2, "C3k2", [1024, True]],
        [-1, 1, "SPPF", [1024, 5]],  # 9
        [-1, 2, "C2PSA", [1024]],  # 10
    ],
    "head": [
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],  # cat backbone P4
        [-1, 2, "C3k2", [512, False]],  # 13
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],  # cat backbone P3
        [-1, 2, "C3k2", [256, False]],  # 16 (P3/8-small)
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 13], 1, "Concat", [1]],  # cat head P4
        [-1, 2, "C3k2", [512, False]],  # 19 (P4/16-medium)
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 10], 1, "Concat", [1]],  # cat head P5
        [-1, 2, "C3k2", [1024, True]],  # 22 (P5/32-large)
        [[16, 19, 22], 1, "Detect", ["nc"]],  # Detect(P3, P4, P5)
    ],
}


def zoo_backbone_yaml(backbone: str) -> dict:
    """The seeds' yolo11-<backbone>.yaml: the zoo model replaces layers 0–8 (it fills indices 0–4), SPPF and
    C2PSA follow, and the YOLO11 neck takes P3/P4/P5 from indices 2/3/4."""
    cfg = copy.deepcopy(YOLO11_YAML)
    cfg["backbone"] = [[-1, 1, backbone, []], [-1, 1, "SPPF", [1024, 5]], [-1, 2, "C2PSA", [1024]]]
    cfg["head"] = [
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 3], 1, "Concat", [1]],  # cat backbone P4
        [-1, 2, "C3k2", [512, False]],  # 9
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 2], 1, "Concat", [1]],  # cat backbone P3
        [-1, 2, "C3k2", [256, False]],  # 12 (P3/8-small)
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 9], 1, "Concat", [1]],  # cat head P4
        [-1, 2, "C3k2", [512, False]],  # 15 (P4/16-medium)
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 6], 1, "Concat", [1]],  # cat head P5
        [-1, 2, "C3k2", [1024, True]],  # 18 (P5/32-large)
        [[12, 15, 18], 1, "Detect", ["nc"]],
    ]
    return cfg


def load_yaml(path: str | os.PathLike) -> dict:
    """A model YAML file → dict. Needs pyyaml, which edgeport does not install: the built-in configs are dicts
    and a checkpoint carries its own."""
    try:
        import yaml
    except ImportError:
        raise EdgeportError(f"{os.fspath(path)}: reading a model YAML needs pyyaml (pip install pyyaml); "
                            "or pass the config as a dict") from None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise EdgeportError(f"{os.fspath(path)}: cannot read model YAML ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise EdgeportError(f"{os.fspath(path)}: not a model YAML (no mapping at top level)")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Blocks (constructor signatures are Ultralytics', so YAML args map one to one).

def conv_bn_silu(c1, c2, k=1, s=1, g=1, act=True) -> ConvNormAct:
    """Ultralytics' Conv: Conv2d (no bias, 'same' padding) → BatchNorm2d(eps 1e-3) → SiLU (or identity)."""
    m = ConvNormAct(c1, c2, k, s, groups=g, act=nn.SiLU if act else None)
    m.bn.eps, m.bn.momentum = BN_EPS, BN_MOMENTUM
    return m


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = conv_bn_silu(c1, c_, k[0])
        self.cv2 = conv_bn_silu(c_, c2, k[1], g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3k(nn.Module):
    """CSP block with two 1x1 branches; `n` bottlenecks with k×k convs on one of them."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, k=3):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = conv_bn_silu(c1, c_)
        self.cv2 = conv_bn_silu(c1, c_)
        self.cv3 = conv_bn_silu(2 * c_, c2)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """Split cv1's output in two halves, chain `n` blocks on the second, concatenate every intermediate."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = conv_bn_silu(c1, 2 * self.c)
        self.cv2 = conv_bn_silu((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class C3k2(C2f):
    """C2f whose blocks are C3k (c3k=True), plain bottlenecks (hidden width c/2) or bottleneck + attention."""

    def __init__(self, c1, c2, n=1, c3k=False, e=0.5, attn=False, g=1, shortcut=True):
        super().__init__(c1, c2, n, shortcut, g, e)
        c = self.c
        self.m = nn.ModuleList(
            nn.Sequential(Bottleneck(c, c, shortcut, g), PSABlock(c, attn_ratio=0.5, num_heads=max(c // 64, 1)))
            if attn else C3k(c, c, 2, shortcut, g) if c3k else Bottleneck(c, c, shortcut, g)
            for _ in range(n))


class SPPF(nn.Module):
    """n chained k×k max-pools (n=3, k=5: SPP with 5/9/13 windows), concatenated with their input.

    cv1 has SiLU for YAML rows [c2, k] (YOLO11); Ultralytics 8.4 drops it when the row also gives n / shortcut
    (YOLO26), which parse_model mirrors with cv1_act."""

    def __init__(self, c1, c2, k=5, n=3, shortcut=False, cv1_act=True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = conv_bn_silu(c1, c_, act=cv1_act)
        self.cv2 = conv_bn_silu(c_ * (n + 1), c2)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)
        self.n = n
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(self.n):
            y.append(self.m(y[-1]))
        y = self.cv2(torch.cat(y, 1))
        return y + x if self.add else y


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, queries/keys of half the head width, plus a depthwise
    3x3 positional term on the values."""

    def __init__(self, dim, num_heads=8, attn_ratio=0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = conv_bn_silu(dim, dim + 2 * self.key_dim * num_heads, act=False)
        self.proj = conv_bn_silu(dim, dim, act=False)
        self.pe = conv_bn_silu(dim, dim, 3, 1, g=dim, act=False)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(x)


class PSABlock(nn.Module):
    def __init__(self, c, attn_ratio=0.5, num_heads=4, shortcut=True):
        super().__init__()
        self.attn = Attention(c, num_heads=num_heads, attn_ratio=attn_ratio)
        self.ffn = nn.Sequential(conv_bn_silu(c, c * 2), conv_bn_silu(c * 2, c, act=False))
        self.add = shortcut

    def forward(self, x):
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nn.Module):
    """Half the channels through `n` attention blocks, the other half passed by, then a 1x1 merge."""

    def __init__(self, c1, c2, n=1, e=0.5):
        super().__init__()
        if c1 != c2:
            raise EdgeportError(f"C2PSA needs equal input and output channels (got {c1} → {c2})")
        self.c = int(c1 * e)
        self.cv1 = conv_bn_silu(c1, 2 * self.c)
        self.cv2 = conv_bn_silu(2 * self.c, c1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=max(self.c // 64, 1))
                                 for _ in range(n)))

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over REG_MAX bins, expectation by a fixed 1x1 conv (weights
    0..REG_MAX-1, stored in checkpoints as `dfl.conv.weight`)."""

    def __init__(self, c1=REG_MAX):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1))

    def forward(self, x):  # [N, 4·c1, A] → [N, 4, A]
        n = x.shape[0]
        x = x.reshape(n, 4, self.c1, -1).transpose(2, 1).softmax(1)
        return self.conv(x).reshape(n, 4, -1)


class Detect(nn.Module):
    """Anchor-free head: per level a box branch (4·REG_MAX DFL logits) and a class branch (nc logits, depthwise
    separable in YOLO11), decoded in the graph to pixel boxes and sigmoid scores."""

    def __init__(self, nc=80, reg_max=REG_MAX, end2end=False, ch=()):
        super().__init__()
        if end2end or reg_max < 2:
            raise EdgeportError("Detect: end-to-end (one-to-one, YOLO26-style) heads and reg_max < 2 are not "
                                "supported; YOLO11 heads are")
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        c2 = max(16, ch[0] // 4, self.reg_max * 4)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(conv_bn_silu(x, c2, 3), conv_bn_silu(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(nn.Sequential(_dwconv(x, x, 3), conv_bn_silu(x, c3, 1)),
                          nn.Sequential(_dwconv(c3, c3, 3), conv_bn_silu(c3, c3, 1)),
                          nn.Conv2d(c3, nc, 1))
            for x in ch)
        self.dfl = DFL(self.reg_max)
        self.stride = tuple(float(s) for s in (8, 16, 32)[: self.nl])  # set from the network by YOLO11

    def forward(self, feats):
        n = feats[0].shape[0]
        box = torch.cat([self.cv2[i](f).reshape(n, 4 * self.reg_max, -1) for i, f in enumerate(feats)], 2)
        cls = torch.cat([self.cv3[i](f).reshape(n, self.nc, -1) for i, f in enumerate(feats)], 2)
        points, strides = make_anchors(feats, self.stride)
        lt, rb = self.dfl(box).chunk(2, 1)
        boxes = torch.cat((points - lt, points + rb), 1) * strides
        return boxes.transpose(1, 2), cls.sigmoid().transpose(1, 2)


def _dwconv(c1, c2, k):
    return conv_bn_silu(c1, c2, k, g=math.gcd(c1, c2))


def make_anchors(feats, strides, offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres in grid units [2, A] (x, y) and their strides [1, A], levels in order, each row-major.
    Sizes are read as Python ints, so an export at a fixed input size gets them as constants."""
    points, stride_rows = [], []
    for f, s in zip(feats, strides):
        h, w = int(f.shape[2]), int(f.shape[3])
        sx = torch.arange(w, dtype=f.dtype, device=f.device) + offset
        sy = torch.arange(h, dtype=f.dtype, device=f.device) + offset
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy)).reshape(2, h * w))
        stride_rows.append(torch.full((1, h * w), float(s), dtype=f.dtype, device=f.device))
    return torch.cat(points, 1), torch.cat(stride_rows, 1)


# ---------------------------------------------------------------------------------------------------------
# The YAML builder (Ultralytics' parse_model rules for the blocks above).

BLOCKS = {"Conv": conv_bn_silu, "Bottleneck": Bottleneck, "C2f": C2f, "C3k": C3k, "C3k2": C3k2, "SPPF": SPPF,
          "C2PSA": C2PSA, "Concat": Concat, "Detect": Detect, "nn.Upsample": nn.Upsample}
_CHANNEL_BLOCKS = {"Conv", "Bottleneck", "C2f", "C3k", "C3k2", "SPPF", "C2PSA"}
_REPEAT_BLOCKS = {"C2f", "C3k", "C3k2", "C2PSA"}  # take the repeat count as their third argument
_ZOO_SLOTS = 5  # a zoo backbone fills indices 0..4: [unused, stride 4, 8, 16, 32]


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _resolve_arg(a, nc):
    if not isinstance(a, str):
        return a
    if a == "nc":
        return nc
    try:
        return ast.literal_eval(a)
    except (ValueError, SyntaxError):
        return a


def _scale_of(cfg: dict, scale: str | None):
    scales = cfg.get("scales")
    if not scales:
        return scale, cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), float("inf")
    scale = scale or cfg.get("scale") or next(iter(scales))
    if scale not in scales:
        raise EdgeportError(f"model YAML has no scale '{scale}'; valid: {', '.join(scales)}")
    depth, width, max_channels = scales[scale]
    return scale, depth, width, max_channels


def _check_layer(index: int, fi, args, available: int) -> None:
    """A layer's inputs must come from layers before it; its numeric arguments within reason (a typo of
    10**9 channels or repeats would exhaust memory rather than fail)."""
    for j in ([fi] if isinstance(fi, int) else fi):
        if not -available <= j < available:
            raise EdgeportError(f"model YAML layer {index}: input index {j} is out of range (the {available} "
                                "layer(s) before it)")
    for a in args:
        if isinstance(a, (int, float)) and not isinstance(a, bool) and not abs(a) <= MAX_ARG:
            raise EdgeportError(f"model YAML layer {index}: argument {a!r} is out of range (|value| ≤ {MAX_ARG})")


def parse_model(cfg: dict, scale: str | None = None, ch: int = 3):
    """(layers, froms, multi_out, scale): Ultralytics' parse_model for the YOLO11 blocks, plus a registered zoo
    model name as a features-only backbone. Unknown blocks raise EdgeportError naming the layer."""
    from ._registry import build_model, list_models

    check_yaml(cfg)
    nc = cfg.get("nc", 80)
    if cfg.get("activation") not in (None, "nn.SiLU()"):
        raise EdgeportError(f"model YAML activation {cfg['activation']!r} is not supported (YOLO11 uses nn.SiLU())")
    scale, depth, width, max_channels = _scale_of(cfg, scale)
    layers, froms, multi = [], [], []
    chs = [ch]
    rows = list(cfg.get("backbone") or []) + list(cfg.get("head") or [])
    if not rows:
        raise EdgeportError("model YAML has no 'backbone'/'head' layers")
    index = 0  # Ultralytics' layer index (a zoo backbone takes several)
    for layer in rows:
        f, n, name, args = layer
        args = [_resolve_arg(a, nc) for a in args]
        _check_layer(index, f, args, len(chs))
        n = max(round(n * depth), 1) if n > 1 else n
        fi = f if isinstance(f, int) else list(f)
        if name in _CHANNEL_BLOCKS:
            if not isinstance(f, int) or not args or not isinstance(args[0], (int, float)) or args[0] <= 0:
                raise EdgeportError(f"model YAML layer {index}: {name} takes one input and a positive channel "
                                    f"count first, got from={f!r}, args={args!r}")
            c1, c2 = chs[f], make_divisible(min(args[0], max_channels) * width, 8)
            args = [c1, c2, *args[1:]]
            if name in _REPEAT_BLOCKS:
                args.insert(2, n)
                n = 1
            if name == "C3k2" and scale in ("m", "l", "x"):  # Ultralytics forces C3k blocks for M/L/X
                args[3:4] = [True]
            if name == "SPPF":
                args = [*args, *[3, False][len(args) - 3:], len(args) <= 3]
        elif name == "Concat":
            c2 = sum(chs[j] for j in fi)
        elif name == "Detect":
            args.extend([cfg.get("reg_max", REG_MAX), cfg.get("end2end"), [chs[j] for j in fi]])
            c2 = None
        elif name == "nn.Upsample":
            if not isinstance(f, int):
                raise EdgeportError(f"model YAML layer {index}: nn.Upsample takes one input, got from={f!r}")
            c2 = chs[f]
        elif name in list_models() and index == 0:
            backbone = build_model(name, features_only=True, **(dict(args[0]) if args else {}))
            c2 = list(_feature_channels(backbone, ch))
            layers.append(backbone)
            froms.append(fi)
            multi.append(True)
            chs = [0] * (_ZOO_SLOTS - len(c2)) + c2
            index = _ZOO_SLOTS
            continue
        else:
            known = ", ".join(sorted(BLOCKS))
            where = " (a zoo backbone must be the first layer)" if name in list_models() else ""
            raise EdgeportError(f"model YAML layer {index}: unknown block '{name}'{where}; supported: {known}, "
                                "or a registered zoo model name as the first layer")
        try:
            block = BLOCKS[name]
            module = nn.Sequential(*(block(*args) for _ in range(n))) if n > 1 else block(*args)
        except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as e:
            raise EdgeportError(f"model YAML layer {index} ({name} {args}): {' '.join(str(e).split())[:200]}") from None
        layers.append(module)
        froms.append(fi)
        multi.append(False)
        if index == 0:
            chs = []
        chs.append(c2)
        index += 1
    if not isinstance(layers[-1], Detect):
        raise EdgeportError("model YAML: the last layer must be Detect (only detection models are supported)")
    return layers, froms, multi, scale


@torch.no_grad()
def _feature_channels(backbone: nn.Module, ch: int) -> list[int]:
    channels = getattr(backbone, "feature_channels", None)
    if channels:
        return list(channels)
    was = backbone.training
    outs = backbone.eval()(torch.zeros(1, ch, 64, 64))
    backbone.train(was)
    return [o.shape[1] for o in outs]


class YOLO11(nn.Module):
    """A YOLO11 detector from an Ultralytics model YAML dict; `self.model` is the layer list whose state-dict
    keys Ultralytics uses."""

    def __init__(self, cfg: dict | None = None, scale: str | None = None, nc: int | None = None, ch: int = 3):
        super().__init__()
        cfg = copy.deepcopy(cfg if cfg is not None else YOLO11_YAML)
        if nc is not None:
            cfg["nc"] = int(nc)
        layers, self.froms, self.multi_out, scale = parse_model(cfg, scale, ch)
        cfg["scale"] = scale
        self.yaml = cfg
        self.model = nn.ModuleList(layers)
        self.nc = self.model[-1].nc
        self.features_only = False
        self.model[-1].stride = self._strides(ch)

    @torch.no_grad()
    def _strides(self, ch: int, s: int = 256) -> tuple[float, ...]:
        was = self.training
        self.eval()
        feats = self._run(torch.zeros(1, ch, s, s), head=False)
        self.train(was)
        return tuple(s / f.shape[-2] for f in feats)

    def _run(self, x, head=True):
        y = []
        for m, f, multi in zip(self.model, self.froms, self.multi_out):
            if f != -1:
                x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
            if m is self.model[-1] and not head:
                return x
            if multi:
                outs = list(m(x))
                y.extend([None] * (_ZOO_SLOTS - len(outs)) + outs)
                x = outs[-1]
            else:
                x = m(x)
                y.append(x)
        return x

    def forward(self, x):
        """images [N, 3, H, W] (RGB 0..1, H and W multiples of 32) → (boxes [N, A, 4], scores [N, A, nc])."""
        return self._run(x)


# ---------------------------------------------------------------------------------------------------------
# Realistic random weights (a detector has no classifier for models.calibrate.scale_head to scale).

@torch.no_grad()
def make_realistic_detector(model: YOLO11, batches, seed: int = 0, side_bins: tuple[float, float] = (4.0, 0.5),
                            dfl_sigma: float = 0.8, cls_std: float = 0.5, candidates: int = 100,
                            conf: float = 0.25) -> YOLO11:
    """`models.calibrate`'s random affines and BN calibration, then the Detect head's last convs rebuilt to
    produce what a trained head produces. Returns a new eval model.

    Box branch: a trained DFL (Distribution Focal Loss, Li et al. 2020) puts each side's mass on the two bins
    around the true distance, so its 16-bin distribution is unimodal. Random logits are multimodal instead:
    two far-apart near-tied bins let a rounding-sized perturbation move the expectation by many bins × stride
    (yolo11n_fasternet_t0's int8-weight file: 355 px). So per level and side s, a distance in bins
    t_s = a·(|w_s|·f + b_s) + β (w_s, b_s: the side's first random row) drives the bin logits
    ((k − c)·(t_s − c) − (k − c)²/2)/σ², σ = `dfl_sigma`: softmax_k ∝ exp(−(k − t_s)²/(2σ²)), expectation
    ≈ t_s. Linear in t_s, hence plain conv weights; centring on c = side_bins[0] only drops terms independent
    of k (softmax ignores them) and keeps the logits small for fp16 arithmetic. Every row of a side is a
    multiple of |w_s|, so per-channel weight quantisation moves t_s, never the distribution's shape.
    The conv reads SiLU outputs (≥ SILU_MIN) and |w_s| ≥ 0, so on any input t_s ≥ side_bins[1] (a trained
    head's anchors lie inside their boxes; a signed random direction gave sides far below 0 and zero-width
    boxes, whose IoU is undefined); a and β put the mean over the batches at side_bins[0].

    Class branch: logits rescaled to std `cls_std` (top scores below float32's sigmoid saturation, 1.0 ties)
    and shifted so that on the busiest calibration image `candidates` anchors score above `conf`. Random weights
    make the count very uneven across photos (yolo11n_fasternet_t0 at 320², 16 photos: 0 to 400 candidates),
    so the busiest one is what is bounded: below max_det after NMS (else near-tied scores decide the cut-off),
    with most photos keeping a few to tens. A random-init head gives near-equal bins and scores ≈ 0.5
    everywhere, which hides decode and NMS errors."""
    from .calibrate import _batches, calibrate_bn, randomize_affine

    xs = _batches(batches)
    model = calibrate_bn(randomize_affine(model, seed), xs)
    head = model.model[-1]
    seen = {id(seq[-1]): [] for seq in (*head.cv2, *head.cv3)}  # box convs: inputs; class convs: outputs
    boxes = {id(seq[-1]) for seq in head.cv2}
    hooks = [m.register_forward_hook(lambda mod, a, out: seen[id(mod)].append(
        (a[0] if id(mod) in boxes else out).double())) for m in (seq[-1] for seq in (*head.cv2, *head.cv3))]
    try:
        for x in xs:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for seq in head.cv2:
        f_mean = torch.cat(seen[id(seq[-1])]).mean((0, 2, 3))
        _gaussian_dfl_(seq[-1], f_mean, head.reg_max, *side_bins, dfl_sigma)
    best = []  # per level: [images, anchors] best class logit after rescaling
    for seq in head.cv3:
        m = seq[-1]
        y = torch.cat(seen[id(m)])  # [images, nc, H, W]
        mean, std = y.mean().item(), y.std().item()
        if not std > 0:
            raise EdgeportError("make_realistic_detector: the class logits do not vary over the batches")
        k = cls_std / std
        m.weight.mul_(k)
        m.bias.copy_((m.bias - mean) * k)
        best.append(((y - mean) * k).amax(1).flatten(1))
    best = torch.cat(best, 1)
    kth = best.topk(min(candidates, best.shape[1]), dim=1).values[:, -1]  # per image
    shift = math.log(conf / (1 - conf)) - kth.max().item() + 1e-3
    for seq in head.cv3:
        seq[-1].bias.add_(shift)
    return model.eval()


SILU_MIN = -0.2784645427610738  # min of x·sigmoid(x), at x ≈ −1.2785


def _gaussian_dfl_(conv: nn.Conv2d, f_mean: torch.Tensor, reg_max: int, mean: float, floor: float,
                   sigma: float) -> None:
    """Rewrite the box conv (4·reg_max outputs; f_mean: its inputs' channel means over the batches) in place:
    each side's bins a discretised Gaussian of width `sigma` around t = a·(|w|·f + b) + β ≥ `floor`, mean
    `mean` (w, b: the side's first row)."""
    w = conv.weight.double().reshape(4, reg_max, -1)
    b = conv.bias.double().reshape(4, reg_max)
    k = torch.arange(reg_max, dtype=torch.float64) - mean  # k − c
    new_w, new_b = [], []
    for s in range(4):
        u = w[s, 0].abs()
        lowest, average = b[s, 0] + SILU_MIN * u.sum(), b[s, 0] + u @ f_mean  # of u·f + b
        if not average - lowest > 0:
            raise EdgeportError("make_realistic_detector: the box branch's features do not vary over the batches")
        a = (mean - floor) / (average - lowest)
        t0 = a * (b[s, 0] - lowest) + floor  # t = a·u·f + t0
        new_w.append(k[:, None] / sigma ** 2 * (a * u))
        new_b.append((k * (t0 - mean) - k ** 2 / 2) / sigma ** 2)
    conv.weight.copy_(torch.cat(new_w).reshape(conv.weight.shape))
    conv.bias.copy_(torch.cat(new_b))


# ---------------------------------------------------------------------------------------------------------
# Registered detectors.

def _cfg(backbone: str = "", from_checkpoint: bool = False) -> ModelCfg:
    # Inputs are RGB in 0..1, letterboxed (scale to fit, centred, grey 114/255 padding): Ultralytics' convention.
    # from_checkpoint: no architecture of its own (list_models users that build every model skip it).
    return ModelCfg(input_size=(3, 640, 640), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0,
                    interpolation="bilinear", num_classes=80, family="yolo11",
                    extra={"task": "detection", "resize": "letterbox", "pad_value": 114, "strides": [8, 16, 32],
                           "output_names": ["boxes", "scores"], "box_format": "xyxy",
                           **({"backbone": backbone} if backbone else {}),
                           **({"from_checkpoint": True} if from_checkpoint else {})})


def _detector(name, features_only, cfg, scale, kwargs) -> YOLO11:
    if features_only:
        raise EdgeportError(f"{name} is a detector and has no features-only form; export its backbone instead")
    nc = kwargs.pop("num_classes", None)
    if kwargs:
        raise EdgeportError(f"{name}: unknown option(s) {', '.join(sorted(kwargs))}")
    return YOLO11(cfg, scale=scale, nc=nc)


@register_model(_cfg())
def yolo11n(features_only=False, **kwargs):
    return _detector("yolo11n", features_only, YOLO11_YAML, "n", kwargs)


@register_model(_cfg())
def yolo11s(features_only=False, **kwargs):
    return _detector("yolo11s", features_only, YOLO11_YAML, "s", kwargs)


@register_model(_cfg("fasternet_t0"))
def yolo11n_fasternet_t0(features_only=False, **kwargs):
    return _detector("yolo11n_fasternet_t0", features_only, zoo_backbone_yaml("fasternet_t0"), "n", kwargs)


@register_model(_cfg("inception_next_atto"))
def yolo11n_inception_next_atto(features_only=False, **kwargs):
    return _detector("yolo11n_inception_next_atto", features_only, zoo_backbone_yaml("inception_next_atto"), "n",
                     kwargs)


@register_model(_cfg(from_checkpoint=True))
def ultralytics(features_only=False, **kwargs):
    """The detector an Ultralytics checkpoint describes (its own YAML): built by export.source from the file."""
    raise EdgeportError("model 'ultralytics' is built from an Ultralytics checkpoint: python -m export path/to/best.pt "
                        "(or models.yolo11.load_ultralytics)")


# ---- Ultralytics checkpoints (read by models.ultralytics_ckpt's restricted unpickler) ----

def load_ultralytics(path) -> tuple[torch.nn.Module, dict]:
    """An Ultralytics YOLO11 checkpoint → (our YOLO11 model in eval mode with its weights, info).

    Strict: every key and shape must match. `model.default_cfg` is the registered yolo11 config with the
    checkpoint's class count, names and input size."""
    sd, yaml_cfg, info = read_ultralytics(path)
    stub = info.pop("stub")
    if info["task"] not in (None, "detect"):
        raise EdgeportError(f"{info['path']}: a '{info['task']}' model; only detection (task 'detect') is supported")
    model = YOLO11(yaml_cfg)
    sd = _convert_zoo_backbones(sd, model, convert_state_dict)
    _load_strict(model, sd, info["path"])
    _adopt_activations(model, stub, info["path"])
    if info["stride"] and [float(s) for s in model.model[-1].stride] != info["stride"]:
        raise EdgeportError(f"{info['path']}: strides {info['stride']} differ from the rebuilt model's "
                            f"{list(model.model[-1].stride)}")
    cfg = _cfg().to_dict()
    size = info["imgsz"] if isinstance(info["imgsz"], int) else 640
    cfg.update(input_size=(3, size, size), num_classes=model.nc,
               extra={**cfg["extra"], "names": info["names"], "source": "ultralytics",
                      "ultralytics_version": info["ultralytics_version"]},
               architecture=f"yolo11{model.yaml['scale'] or ''}")
    model.default_cfg = cfg
    model.model_name = os.path.splitext(os.path.basename(info["path"]))[0]
    return model.eval(), info


def _convert_zoo_backbones(sd, model, convert):
    """A zoo backbone at layer 0 may come in its official layout (the seeds' forks): map it like
    models.load_checkpoint does for the backbone alone."""
    for pos, multi in enumerate(model.multi_out):
        if not multi:
            continue
        prefix = f"model.{pos}."
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
            sd.update({prefix + k: v for k, v in convert(sub, model.model[pos]).items()})
    return sd


def _load_strict(model, sd, path):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
                 if keys]
        raise EdgeportError(f"{path}: weights do not fit the model its YAML describes ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=True)


_ACTIVATIONS = {
    "torch.nn.modules.activation.SiLU": nn.SiLU,
    "torch.nn.modules.linear.Identity": nn.Identity,
}


def _adopt_activations(model, stub, path):
    """Each Conv's activation as pickled (Ultralytics 8.4 builds SPPF.cv1 without one, 8.3 with SiLU)."""
    for name, m in model.named_modules():
        if not isinstance(m, ConvNormAct):
            continue
        node = stub
        for part in name.split("."):
            node = (node.__dict__.get("_modules") or {}).get(part) if isinstance(node, ModuleStub) else None
        act = (node.__dict__.get("_modules") or {}).get("act") if isinstance(node, ModuleStub) else None
        if act is None:  # our layout for a zoo backbone, or a module without a pickled activation
            continue
        cls = _ACTIVATIONS.get(act.pickled_class)
        if cls is None:
            raise EdgeportError(f"{path}: {name} uses activation {act.pickled_class}; only SiLU and identity are "
                                "supported")
        m.act = cls()
