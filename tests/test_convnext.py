"""ConvNeXt: sizes against the published numbers, fc ⇄ conv MLP forms, features_only, checkpoint layouts."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from models.checkpoint import convert_state_dict

# (params M, MACs G) at 224², batch 1; MACs = conv/matmul FLOPs / 2 as counted by torch.utils.flop_counter.
TARGETS = {"convnext_atto": (3.696, 0.547), "convnext_tiny": (28.589, 4.456),
           "convnext_base": (88.591, 15.355)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params_macs(name: str) -> tuple[float, float]:
    with torch.device("meta"):  # shapes only: the big variants cost no memory or time
        model = models.create_model(name).eval()
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 2e9


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_params_and_macs_match_published(name):
    params, macs = _params_macs(name)
    want_params, want_macs = TARGETS[name]
    assert params == pytest.approx(want_params, rel=0.01)
    assert macs == pytest.approx(want_macs, rel=0.01)


def test_every_variant_is_registered_with_its_family():
    names = models.list_models("convnext_*")
    sizes = ("atto", "femto", "pico", "nano", "tiny", "small", "base")
    assert set(names) >= {f"convnext_{s}" for s in sizes}
    for name in names:
        cfg = models.get_cfg(name)
        assert cfg.family == "convnext" and cfg.interpolation == "bicubic"


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Layer scales near 1 and non-trivial norms, so every block changes the output (at init gamma = 1e-6
    would hide any mistake inside the MLP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):  # LayerNorm2d included
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith("bias") and ("conv" in name or "fc" in name):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_fc_and_conv_mlp_forms_agree_through_load_checkpoint(x):
    fc = _randomize(models.create_model("convnext_atto"))
    conv = models.create_model("convnext_atto", mlp="conv").eval()
    assert conv.stages[0].blocks[0].mlp.fc1.weight.ndim == 4
    assert fc.stages[0].blocks[0].mlp.fc1.weight.ndim == 2
    models.load_checkpoint(conv, fc.state_dict())  # fc-shaped weights into the 1x1-conv model
    back = models.create_model("convnext_atto").eval()
    models.load_checkpoint(back, conv.state_dict())  # and conv-shaped weights back into the fc model
    with torch.no_grad():
        ref, out_conv, out_back = fc(x), conv(x), back(x)
    assert _rel_err(out_conv, ref) <= 1e-5
    assert _rel_err(out_back, ref) <= 1e-5


def test_form_comparison_catches_a_mis_mapped_weight(x):
    fc = _randomize(models.create_model("convnext_atto"))
    conv = models.create_model("convnext_atto", mlp="conv").eval()
    models.load_checkpoint(conv, fc.state_dict())
    with torch.no_grad():  # what a transposing/permuting conversion bug would do to one layer
        w = conv.stages[2].blocks[3].mlp.fc1.weight
        w.copy_(w.flip(1))
        assert _rel_err(conv(x), fc(x)) > 1e-3


def test_unknown_mlp_form_is_a_one_line_error():
    with pytest.raises(models.EdgeportError, match="mlp form"):
        models.create_model("convnext_atto", mlp="linear")


@pytest.mark.parametrize("mlp", ["fc", "conv"])
def test_features_only_returns_four_strided_maps(x, mlp):
    model = models.create_model("convnext_atto", features_only=True, mlp=mlp).eval()
    assert model.features_only is True and model.feature_channels == [40, 80, 160, 320]
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s)
                                              for c, s in zip(model.feature_channels, (4, 8, 16, 32))]
    # A classifier checkpoint loads into the backbone; its head is ignored.
    report = models.load_checkpoint(model, models.create_model("convnext_atto").state_dict())
    assert report["missing"] == [] and report["mismatched"] == []


# Our layout → the official facebookresearch/ConvNeXt and timm layouts, written apart from the converter.
_TO_OFFICIAL = [
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"stages.\1.\2.pwconv\3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]
_TO_TIMM = [(r"^(stages\.\d+\.blocks\.\d+)\.mlp\.(norm\.|gamma$)", r"\1.\2")]


def _relayout(sd: dict, rules) -> dict:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


@pytest.mark.parametrize("layout,src_mlp", [("official", "fc"), ("timm", "fc"), ("timm", "conv")])
@pytest.mark.parametrize("dst_mlp", ["fc", "conv"])
def test_checkpoint_layouts_load_exactly(layout, src_mlp, dst_mlp, x):
    # timm's atto..nano use conv_mlp=True, so their checkpoints hold [out, in, 1, 1] MLP weights.
    src = _randomize(models.create_model("convnext_atto", mlp=src_mlp))
    sd = _relayout(src.state_dict(), _TO_OFFICIAL if layout == "official" else _TO_TIMM)
    expected = {"official": ("downsample_layers.1.1.weight", "stages.2.5.pwconv2.bias", "stages.2.5.gamma",
                             "norm.weight", "head.weight"),
                "timm": ("stages.2.blocks.5.norm.weight", "stages.2.blocks.5.gamma", "head.norm.bias",
                         "head.fc.weight")}[layout]
    assert set(expected) <= set(sd)
    dst = models.create_model("convnext_atto", mlp=dst_mlp).eval()
    report = models.load_checkpoint(dst, sd)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    with torch.no_grad():
        assert _rel_err(dst(x), src(x)) <= 1e-5
    if src_mlp == dst_mlp:
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k


def test_own_layout_passes_through_unchanged():
    model = models.create_model("convnext_atto")
    sd = model.state_dict()
    converted = convert_state_dict(sd, model)
    assert list(converted) == list(sd) and all(converted[k] is sd[k] for k in sd)


def test_wrong_variant_checkpoint_is_refused():
    sd = _relayout(models.create_model("convnext_atto").state_dict(), _TO_OFFICIAL)
    with pytest.raises(models.EdgeportError, match="does not fit convnext_femto"):
        models.create_model("convnext_femto", weights=sd)


def test_checkpoint_missing_a_block_is_refused():
    sd = _relayout(models.create_model("convnext_atto").state_dict(), _TO_TIMM)
    sd = {k: v for k, v in sd.items() if not k.startswith("stages.3.blocks.1.")}
    with pytest.raises(models.EdgeportError, match="missing: stages.3.blocks.1"):
        models.create_model("convnext_atto", weights=sd)
