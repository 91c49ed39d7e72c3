"""to_inference on the real families: every form combination computes what the training form computes."""
import copy
import inspect
import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import create_model, get_cfg, list_models
from models import inference as inference_module
from models.calibrate import calibrate_bn, make_realistic, randomize_affine, scale_head
from models.errors import EdgeportError
from models.inference import (
    PCONV_FORMS,
    assert_equivalent,
    count_parameters,
    float32_noise,
    to_inference,
)
from models.layers import PartialConv

SMALL = ("fasternet_t0", "convnext_atto", "inception_next_atto", "efficientnetv2_s")
SIZE = 128
MLP_FORMS = ("conv", "fc")


OTHERS = [n for n in list_models() if n not in SMALL and not get_cfg(n).extra.get("alias_of")
          and get_cfg(n).extra.get("task") != "detection"]  # detectors: tests/test_yolo11.py


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The suite shares 2 cores with other jobs; oversubscribed intra-op threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(seed=0, n=4):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


CALIB = inputs(0)
X = CALIB[:2]  # judged on calibration data: elsewhere a random-init BN net is far out of distribution


_cache = {}


def realistic(name, features_only=False):
    """Calibrated BN statistics, random norm affines / layer scales / biases, head scaled to logits std 3."""
    key = (name, features_only)
    if key not in _cache:
        _cache[key] = make_realistic(create_model(name, features_only=features_only), [CALIB])
    return _cache[key]


def form_combinations(model):
    has_pconv = any(isinstance(m, PartialConv) for m in model.modules())
    pconvs = PCONV_FORMS if has_pconv else ("slicing",)  # the PConv form is a no-op without PConvs
    return list(itertools.product(pconvs, MLP_FORMS, (True, False)))


def check_all_forms(ref, combos, x):
    """float32 within 1e-5 of max|reference|, or within 3× the reference's own float32 noise (vs float64)
    where that is larger (its noise + the new model's, of the same size + the rounding of folded weights);
    folded forms also in float64 within 1e-5 (exact up to the float32 rounding of the folded weights)."""
    rtol32 = max(1e-5, 3 * float32_noise(ref, x))
    ref64 = copy.deepcopy(ref).double()
    errors = {}
    for pconv, mlp, fold_bn in combos:
        new = to_inference(ref, pconv, mlp, fold_bn)
        assert not new.training
        errors[(pconv, mlp, fold_bn)] = assert_equivalent(ref, new, x, rtol=rtol32)
        if fold_bn:
            assert_equivalent(ref64, new.double(), x.double(), rtol=1e-5)
    return errors


@pytest.mark.parametrize("name", SMALL)
def test_every_form_combination_matches_training_form(name):
    ref = realistic(name)
    before = copy.deepcopy(ref.state_dict())
    with torch.no_grad():
        assert ref(X).std() > 0.5  # calibrated + head scaled: logits are O(1), not O(1e-2)
    check_all_forms(ref, form_combinations(ref), X)
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("name", SMALL)
def test_features_only_models(name):
    ref = realistic(name, features_only=True)
    combos = form_combinations(ref)
    combos = [combos[0], combos[-1], *([c for c in combos if c[0] == "fused"][:1])]
    x = X
    check_all_forms(ref, combos, x)
    with torch.no_grad():
        feats = to_inference(ref)(x)
    assert [f.shape[1] for f in feats] == ref.feature_channels
    assert [SIZE // f.shape[-1] for f in feats] == [4, 8, 16, 32]


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_other_variants(name):
    ref = realistic(name)
    check_all_forms(ref, form_combinations(ref), X)
    _cache.clear()


def test_input_model_untouched_and_info_reported():
    ref = realistic("fasternet_t0")
    ref_sd = copy.deepcopy(ref.state_dict())
    types = [type(m) for m in ref.modules()]
    new = to_inference(ref, "fused", "fc", fold_bn=True)
    assert [type(m) for m in ref.modules()] == types
    assert all(torch.equal(v, ref_sd[k]) for k, v in ref.state_dict().items())
    assert {m.form for m in ref.modules() if isinstance(m, PartialConv)} == {"split_cat"}
    info = new.inference_info
    assert info["params_before"] == count_parameters(ref) and info["params_after"] == count_parameters(new)
    assert (info["pconv"], info["mlp"], info["fold_bn"], info["batchnorms_left"]) == ("fused", "fc", True, 0)
    # folding removes BN parameters; fusing fc1 with the 3x3 PConv multiplies fc1 by ~k² = 9
    assert to_inference(ref).inference_info["params_after"] < info["params_before"] < info["params_after"]
    assert to_inference(realistic("convnext_atto")).inference_info["pconv"] is None


def test_wrong_fold_is_caught(monkeypatch):
    """The equivalence gate catches a real defect: a layer-scale fold that forgets fc2's bias."""
    ref = realistic("convnext_atto")
    x = X

    def forgets_bias(model):
        for m in model.modules():
            if getattr(m, "gamma", None) is not None:
                g = m.gamma.detach().reshape(-1)
                m.fc2.weight = nn.Parameter(m.fc2.weight * g.view(-1, *[1] * (m.fc2.weight.ndim - 1)))
                m.gamma = None

    assert_equivalent(ref, to_inference(ref), x)
    monkeypatch.setattr(inference_module, "_fold_layer_scale_", forgets_bias)
    with pytest.raises(AssertionError, match="models differ"):
        assert_equivalent(ref, to_inference(ref), x)


def test_train_mode_model_is_switched_to_eval_with_a_warning():
    ref = realistic("fasternet_t0")
    training = copy.deepcopy(ref).train()
    with pytest.warns(UserWarning, match="train mode"):
        new = to_inference(training)
    assert training.training and not any(m.training for m in new.modules())
    assert_equivalent(ref, new, X)  # running statistics were folded, not batch statistics


def test_default_forms_are_the_export_fallback():
    """One vocabulary: to_inference's defaults are what an export gets when no form is chosen."""
    from export.source import make_source

    ours = {k: p.default for k, p in inspect.signature(to_inference).parameters.items() if k in ("pconv", "mlp")}
    theirs = {k: p.default for k, p in inspect.signature(make_source).parameters.items() if k in ("pconv", "mlp")}
    assert ours == theirs == {"pconv": "split_cat", "mlp": "fc"}
    info = to_inference(realistic("fasternet_t0")).inference_info
    assert (info["pconv"], info["mlp"]) == ("split_cat", "fc")


def test_unknown_forms_are_refused():
    model = create_model("fasternet_t0")
    with pytest.raises(EdgeportError, match="'dense'; valid forms: split_cat, slice_cat, slicing, full, fused"):
        to_inference(model, pconv="dense")
    with pytest.raises(EdgeportError, match="unknown MLP form 'linear'; valid forms: conv, fc"):
        to_inference(model, mlp="linear")


def test_pconv_flops_are_one_sixteenth_of_a_full_conv():
    dim, x = 64, torch.randn(1, 64, 28, 28)

    def flops(module):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        return counter.get_total_flops()

    full = flops(nn.Conv2d(dim, dim, 3, padding=1, bias=False))
    for form in ("split_cat", "slicing"):
        assert flops(PartialConv(dim, 4, form=form)) * 16 == full
    assert flops(PartialConv(dim, 4, form="full")) == full  # the dense lowering pays for the zeros


def test_calibration_is_real_and_pure():
    model = create_model("efficientnetv2_s")
    before = copy.deepcopy(model.state_dict())
    calibrated = calibrate_bn(model, [inputs(0), inputs(1)])
    bn = calibrated.stem.bn
    assert not calibrated.training and bn.momentum == model.stem.bn.momentum
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():  # cumulative average over both batches, from the stem conv's outputs
        y = torch.cat([model.stem.conv(inputs(0)), model.stem.conv(inputs(1))])
    torch.testing.assert_close(bn.running_mean, y.mean((0, 2, 3)))
    scaled = scale_head(calibrated, [inputs(0)], target_std=3.0)
    with torch.no_grad():
        assert scaled(inputs(0)).std().item() == pytest.approx(3.0, rel=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    features = create_model("convnext_atto", features_only=True)
    assert isinstance(scale_head(features, [inputs(0)])(inputs(0, 1)), list)  # no head: no-op


def test_residual_branch_norms_are_drawn_like_layer_scales():
    """EfficientNetV2's skip blocks end their branch in a BN: its weight is the block's layer scale in effect, so
    it gets ±U[0.2, 0.8] like ConvNeXt's; every other norm weight stays in U[0.5, 1.5]."""
    model = randomize_affine(create_model("efficientnetv2_s"))
    blocks = [m for m in model.modules() if hasattr(m, "has_skip")]
    ends = [b.branch_end_norm.weight for b in blocks if b.has_skip]
    assert len(ends) == sum(b.has_skip for b in blocks) > 30
    ends = torch.cat(ends)
    assert ends.abs().min() >= 0.2 and ends.abs().max() <= 0.8 and (ends < 0).any() and (ends > 0).any()
    others = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                        and not any(m is b.branch_end_norm for b in blocks)])
    assert others.min() >= 0.5 and others.max() <= 1.5
