"""InceptionNeXt: sizes against the published numbers, names, MLP forms, features_only, checkpoint layouts."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models.checkpoint import convert_state_dict

# (params M, MACs G) at 224², batch 1; MACs = conv/matmul FLOPs / 2 as counted by torch.utils.flop_counter.
TARGETS = {"inception_next_atto": (4.157, 0.503), "inception_next_tiny": (28.056, 4.189)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _params_macs(name: str) -> tuple[float, float]:
    with torch.device("meta"):  # shapes only
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


def test_timm_names_are_canonical_and_official_names_alias_them():
    for size in ("atto", "tiny", "small", "base"):
        canonical, alias = f"inception_next_{size}", f"inceptionnext_{size}"
        assert models.get_cfg(canonical).family == "inceptionnext"
        assert models.get_cfg(alias).extra == {"alias_of": canonical}
        assert models.get_cfg(alias).crop_pct == models.get_cfg(canonical).crop_pct
    with torch.device("meta"):
        a, b = models.create_model("inceptionnext_atto"), models.create_model("inception_next_atto")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.model_name == "inceptionnext_atto"


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norms, BN statistics and layer scales near 1, so every layer shows in the output."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale=1.0, offset=0.0):
        t.copy_(offset + scale * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                rand(m.weight, 0.2, 1.0)
                rand(m.bias, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                rand(m.running_mean, 0.2)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith("bias") and ("conv" in name or "fc" in name):
                rand(p, 0.1)
    return model.eval()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_fc_and_conv_mlp_forms_agree(x):
    conv = _randomize(models.create_model("inception_next_atto"))
    fc = models.create_model("inception_next_atto", mlp="fc").eval()
    models.load_checkpoint(fc, conv.state_dict())
    with torch.no_grad():
        assert _rel_err(fc(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("mlp", ["conv", "fc"])
def test_features_only_returns_four_strided_maps(x, mlp):
    model = models.create_model("inception_next_atto", features_only=True, mlp=mlp).eval()
    assert model.features_only is True and model.feature_channels == [40, 80, 160, 320]
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s)
                                              for c, s in zip(model.feature_channels, (4, 8, 16, 32))]


# Our layout → the layout shared by sail-sg/inceptionnext and timm's inception_next.py, written independently
# of the converter. The official stem conv has a bias that ours folds into the stem BN.
_TO_OFFICIAL = [
    (r"^stem\.conv\.", "stem.0."),
    (r"^stem\.bn\.", "stem.1."),
    (r"^(stages\.\d+\.blocks\.\d+)\.mlp\.(norm\.|gamma$)", r"\1.\2"),
]


def _official_state_dict(model: nn.Module, seed: int = 2) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        for pattern, repl in _TO_OFFICIAL:
            k = re.sub(pattern, repl, k)
        out[k] = v.clone()
    bias = 0.5 * torch.randn(out["stem.0.weight"].shape[0], generator=torch.Generator().manual_seed(seed))
    out["stem.0.bias"] = bias
    out["stem.1.running_mean"] += bias  # the same network, written with a stem-conv bias
    return out


def test_official_and_timm_layout_loads_exactly(x):
    src = _randomize(models.create_model("inception_next_atto"))
    sd = _official_state_dict(src)
    assert "stages.1.blocks.0.norm.running_var" in sd and "stages.3.blocks.1.gamma" in sd
    assert "stages.1.downsample.0.weight" in sd and "head.fc2.weight" in sd
    dst = models.create_model("inception_next_atto").eval()
    assert models.load_checkpoint(dst, sd) == {"missing": [], "unexpected": [], "mismatched": []}
    for k, v in src.state_dict().items():
        assert torch.allclose(dst.state_dict()[k], v, atol=1e-6), k
    with torch.no_grad():
        assert _rel_err(dst(x), src(x)) <= 1e-5


def _official_stem(sd: dict, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    y = F.conv2d(x, sd["stem.0.weight"], sd["stem.0.bias"] if with_bias else None, stride=4)
    return F.batch_norm(y, sd["stem.1.running_mean"], sd["stem.1.running_var"], sd["stem.1.weight"],
                        sd["stem.1.bias"], training=False, eps=1e-5)


def test_stem_bias_folding_is_exact_and_needed(x):
    sd = _official_state_dict(_randomize(models.create_model("inception_next_atto")))
    model = models.create_model("inception_next_atto", weights=sd).eval()
    with torch.no_grad():
        ours = model.stem(x)
        assert _rel_err(ours, _official_stem(sd, x)) <= 1e-5
        # Dropping the bias instead of folding it would be caught.
        assert _rel_err(ours, _official_stem(sd, x, with_bias=False)) > 1e-2


def test_own_layout_passes_through_unchanged():
    model = models.create_model("inception_next_atto")
    sd = model.state_dict()
    converted = convert_state_dict(sd, model)
    assert list(converted) == list(sd) and all(converted[k] is sd[k] for k in sd)


def test_wrong_variant_checkpoint_is_refused():
    sd = _official_state_dict(models.create_model("inception_next_atto"))
    with torch.device("meta"):
        tiny = models.create_model("inception_next_tiny")
    with pytest.raises(models.EdgeportError, match="does not fit inception_next_tiny"):
        models.load_checkpoint(tiny, sd)
