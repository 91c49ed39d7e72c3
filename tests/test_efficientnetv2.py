"""EfficientNetV2: sizes against the seed-002 implementation, feature maps, SE forms, checkpoints."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from models import EdgeportError, create_model, load_checkpoint
from models.layers import SqueezeExcite

# Parameter counts of the seed's effnetv2_{s,m,l,xl} (d-li14/efficientnetv2.pytorch).
SEED_PARAMS = {"s": 24.124e6, "m": 55.300e6, "l": 119.356e6, "xl": 208.960e6}
INPUT = 128


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _make_realistic(model, seed=0):
    """Random BN statistics/affines and an O(1) head, so outputs carry signal (random init: ~1e-3 logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if getattr(model, "head", None) is not None:
            model.head.fc.weight.copy_(torch.randn(model.head.fc.weight.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model_s():
    torch.manual_seed(0)
    return _make_realistic(create_model("efficientnetv2_s"))


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model_s, image):
    """model_s's final feature map and logits, computed once (forwards dominate this file's run time)."""
    with torch.no_grad():
        features = model_s.forward_features(image)
        return features, model_s.head(features)


@pytest.mark.parametrize("variant", ["s", "m", "l", "xl"])
def test_param_count_matches_seed(variant):
    with torch.device("meta"):
        model = create_model(f"efficientnetv2_{variant}")
    assert _n_params(model) == pytest.approx(SEED_PARAMS[variant], rel=0.01)
    assert model.default_cfg["family"] == "efficientnetv2"


def test_s_macs_at_384():
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        create_model("efficientnetv2_s")(torch.empty(1, 3, 384, 384))
    assert counter.get_total_flops() / 2 == pytest.approx(8.640e9, rel=0.01)


def test_classifier_forward(reference):
    logits = reference[1]
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert logits.std() > 0.1  # _make_realistic worked: comparisons below see real signal


def test_features_only_s_takes_classifier_weights(model_s, image, reference):
    model = create_model("efficientnetv2_s", features_only=True, weights=model_s.state_dict()).eval()
    assert model.features_only and model.head is None
    with torch.no_grad():
        feats = model(image)
    assert model.feature_channels == [48, 64, 160, 272]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, INPUT // s, INPUT // s) for c, s in zip(model.feature_channels, (4, 8, 16, 32))]
    torch.testing.assert_close(feats[-1], reference[0])


def test_features_only_seven_stage_variant():
    channels = [48, 80, 176, 512]  # efficientnetv2_m: stages 1, 2, 4 and 6
    with torch.device("meta"):
        model = create_model("efficientnetv2_m", features_only=True)
        feats = model(torch.empty(1, 3, INPUT, INPUT))
    assert model.feature_channels == channels
    assert [tuple(f.shape) for f in feats] == [
        (1, c, INPUT // s, INPUT // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_se_fc_form_equals_conv_form(model_s, image, reference):
    fc_model = create_model("efficientnetv2_s", mlp="fc").eval()
    se = [m for m in fc_model.modules() if isinstance(m, SqueezeExcite)][-1]
    assert se.fc1.weight.ndim == 2  # the load below really reshapes conv [out, in, 1, 1] → fc [out, in]
    load_checkpoint(fc_model, model_s.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fc_model(image), reference[1])
        se.fc1.bias.add_(0.5)  # a defect in one SE must show in the output
        assert not torch.allclose(fc_model(image), reference[1], atol=1e-3)


# The seed's key names, written out independently of the converter: features.0 = stem, features.1.. = blocks
# in order, the layers of a block's `conv` Sequential by index (activations take indices too), head conv.0/1.
_FUSED_TO_SEED = {"conv_exp.conv": "0", "conv_exp.bn": "1", "conv_pwl.conv": "3", "conv_pwl.bn": "4"}
_MBCONV_TO_SEED = {"conv_pw.conv": "0", "conv_pw.bn": "1", "conv_dw.conv": "3", "conv_dw.bn": "4",
                   "se.fc1": "6.fc.0", "se.fc2": "6.fc.2", "conv_pwl.conv": "7", "conv_pwl.bn": "8"}


def _to_seed_layout(model):
    block_index = {f"stages.{i}.{j}": n for n, (i, j) in enumerate(
        (i, j) for i, stage in enumerate(model.stages) for j in range(len(stage)))}
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, param = key.rpartition(".")
        if m := re.match(r"(stages\.\d+\.\d+)\.(.+)$", prefix):
            table = _MBCONV_TO_SEED if hasattr(model.get_submodule(m.group(1)), "se") else _FUSED_TO_SEED
            new = f"features.{block_index[m.group(1)] + 1}.conv.{table[m.group(2)]}.{param}"
            if m.group(2).startswith("se.") and value.ndim == 4:
                value = value.flatten(1)  # the seed's SE is nn.Linear
        else:
            new = {"stem.conv": "features.0.0", "stem.bn": "features.0.1", "head.conv.conv": "conv.0",
                   "head.conv.bn": "conv.1", "head.fc": "classifier"}[prefix] + "." + param
        out[new] = value.clone()
    return out


def test_seed_checkpoint_round_trip(model_s, image, reference):
    seed_sd = _to_seed_layout(model_s)
    # shapes the seed's code gives efficientnetv2_s: blocks 1-10 fused, block 11 the first MBConv (64 → 128,
    # hidden 256, SE 256 → make_divisible(64 // 4, 8) = 16), block 40 the last, head 272 → 1792
    expected = {"features.0.0.weight": (24, 3, 3, 3), "features.1.conv.0.weight": (24, 24, 3, 3),
                "features.1.conv.3.weight": (24, 24, 1, 1), "features.11.conv.6.fc.0.weight": (16, 256),
                "features.11.conv.7.weight": (128, 256, 1, 1), "features.40.conv.8.running_var": (272,),
                "conv.0.weight": (1792, 272, 1, 1), "classifier.weight": (1000, 1792)}
    assert {k: tuple(seed_sd[k].shape) for k in expected} == expected
    assert "features.41.conv.0.weight" not in seed_sd

    fresh = create_model("efficientnetv2_s").eval()
    report = load_checkpoint(fresh, seed_sd)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    with torch.no_grad():
        torch.testing.assert_close(fresh(image), reference[1])


def test_wrong_variant_checkpoint_raises(model_s):
    with torch.device("meta"):
        model_m = create_model("efficientnetv2_m")
    with pytest.raises(EdgeportError, match="does not fit efficientnetv2_m"):
        load_checkpoint(model_m, model_s.state_dict())
    with pytest.raises(EdgeportError, match="does not fit efficientnetv2_m"):
        load_checkpoint(model_m, _to_seed_layout(model_s))


def test_timm_layout_is_refused_with_a_reason():
    with pytest.raises(EdgeportError, match="timm"):
        models.load_checkpoint(create_model("efficientnetv2_s"), {
            "conv_stem.weight": torch.zeros(24, 3, 3, 3), "blocks.0.0.conv.weight": torch.zeros(24, 24, 3, 3),
        })


def test_unknown_se_form_raises():
    with pytest.raises(EdgeportError, match="SE form"):
        create_model("efficientnetv2_s", mlp="linear")
