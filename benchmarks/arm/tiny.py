"""A tiny FasterNet/ConvNeXt-like CNN exported as an artifact dir (model.onnx, model.mnn, model.fp16.mnn),
so the ARM tooling can be developed and tested without the real export pipeline.

    python -m benchmarks.arm.tiny OUT_ROOT        # writes OUT_ROOT/arm_tiny/<pconv>-<mlp>/ for 4 forms

The forms compute the same function from the same weights: PConv as split/conv/concat or as an in-place
slice, the MLP as 1x1 convs with a channels-first LayerNorm (NCHW) or as permute + nn.Linear/nn.LayerNorm.
BN statistics are calibrated on real photos and the head scaled, so parity is judged on O(1-10) logits.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 96
NUM_CLASSES = 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FORMS = (("split_cat", "fc"), ("split_cat", "conv"), ("slicing", "fc"), ("slicing", "conv"))


class PConv(nn.Module):
    def __init__(self, dim, form):
        super().__init__()
        self.dc, self.form = dim // 4, form
        self.conv = nn.Conv2d(self.dc, self.dc, 3, 1, 1, bias=False)

    def forward(self, x):
        if self.form == "slicing":
            x = x.clone()
            x[:, :self.dc] = self.conv(x[:, :self.dc])
            return x
        x1, x2 = torch.split(x, [self.dc, x.shape[1] - self.dc], 1)
        return torch.cat((self.conv(x1), x2), 1)


class Mlp(nn.Module):
    """LayerNorm → fc1 → GELU → fc2 → ×gamma; "fc" is NHWC Linear layers, "conv" NCHW 1x1 convs."""

    def __init__(self, dim, hidden, form):
        super().__init__()
        self.form = form
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if form == "fc":
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        else:
            self.fc1, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        if self.form == "fc":
            x = self.fc2(self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1))))) * self.gamma
            return x.permute(0, 3, 1, 2)
        mu = x.mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt((x - mu).pow(2).mean(1, keepdim=True) + self.norm.eps)
        x = x * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]
        return self.fc2(self.act(self.fc1(x))) * self.gamma[:, None, None]


class Block(nn.Module):
    def __init__(self, dim, pconv, mlp):
        super().__init__()
        self.spatial = PConv(dim, pconv)
        self.mlp = Mlp(dim, 3 * dim, mlp)

    def forward(self, x):
        return x + self.mlp(self.spatial(x))


class TinyNet(nn.Module):
    def __init__(self, pconv="split_cat", mlp="fc", dims=(24, 48)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), nn.BatchNorm2d(dims[0]), nn.GELU())
        self.stage1 = nn.Sequential(Block(dims[0], pconv, mlp), Block(dims[0], pconv, mlp))
        self.down = nn.Sequential(nn.Conv2d(dims[0], dims[1], 2, 2), nn.BatchNorm2d(dims[1]))
        self.dw = nn.Sequential(nn.Conv2d(dims[1], dims[1], 3, 1, 1, groups=dims[1]), nn.BatchNorm2d(dims[1]),
                                nn.GELU())
        self.stage2 = Block(dims[1], pconv, mlp)
        self.head = nn.Linear(dims[1], NUM_CLASSES)

    def forward(self, x):
        x = self.stage2(self.dw(self.down(self.stage1(self.stem(x)))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def metadata(pconv, mlp, precision="fp32"):
    return {"edgeport_version": "0.1.0", "model": "arm_tiny", "family": "arm_tiny", "task": "classification",
            "input_name": "input", "input_shape": [1, 3, INPUT_SIZE, INPUT_SIZE], "layout": "NCHW",
            "mean": list(MEAN), "std": list(STD), "crop_pct": 0.875, "interpolation": "bicubic",
            "num_classes": NUM_CLASSES, "output_names": ["logits"], "pconv": pconv, "mlp": mlp,
            "weights_sha256": None, "precision": precision}


def calibrated_weights(batch: torch.Tensor, seed: int = 0) -> dict:
    """Random init, BN statistics from `batch`, head scaled so logits have std ≈ 3."""
    torch.manual_seed(seed)
    model = TinyNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(batch)
        model.eval()
        std = model(batch).std().item()
        model.head.weight.mul_(3.0 / max(std, 1e-6))
        model.head.bias.zero_()
    return model.state_dict()


def build(pconv: str, mlp: str, state_dict: dict) -> nn.Module:
    model = TinyNet(pconv, mlp)
    sd = dict(state_dict)
    if mlp == "conv":  # Linear [out, in] → 1x1 conv [out, in, 1, 1]; same parameter names
        pointwise = ("fc1.weight", "fc2.weight")
        sd = {k: v[:, :, None, None] if k.endswith(pointwise) else v for k, v in sd.items()}
    model.load_state_dict(sd)
    return model.eval()


def export_artifact(model: nn.Module, out_dir: str, meta: dict) -> str:
    """model.onnx, model.mnn and model.fp16.mnn, built by the export's own `build_artifact`."""
    from export.build import build_artifact

    os.makedirs(out_dir, exist_ok=True)
    build_artifact(model, meta, out_dir, ("ort", "mnn_fp32", "mnn_fp16w"))
    return out_dir


def make_tiny_artifacts(root: str, forms=FORMS) -> list[str]:
    """Export the tiny net in each (pconv, mlp) form under root/arm_tiny/<pconv>-<mlp>/; returns the dirs."""
    from export.inputs import sample_batch

    batch = torch.from_numpy(sample_batch(metadata("split_cat", "fc"), n_images=12, n_random=4))
    sd = calibrated_weights(batch)
    dirs = []
    for pconv, mlp in forms:
        d = os.path.join(root, "arm_tiny", f"{pconv}-{mlp}")
        dirs.append(export_artifact(build(pconv, mlp, sd), d, metadata(pconv, mlp)))
    return dirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="artifact root (the tiny model goes to ROOT/arm_tiny/<form>/)")
    p.add_argument("--forms", nargs="*", default=None, help="pconv-mlp tags, e.g. split_cat-fc slicing-conv")
    a = p.parse_args(argv)
    forms = [tuple(f.split("-")) for f in a.forms] if a.forms else FORMS
    for d in make_tiny_artifacts(a.root, forms):
        print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
