"""Layer-level inference transforms: each one preserves the function over random shapes and random weights."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models import inference
from models.errors import EdgeportError
from models.inference import (
    FusedPConvMlp,
    assert_equivalent,
    fold_batchnorm,
    fold_layer_scale,
    relative_error,
    remove_droppath,
    set_mlp_form,
    set_pconv_form,
)
from models.layers import ConvNormAct, DropPath, LayerNorm2d, PartialConv, PointwiseMlp, SqueezeExcite

FAST = settings(max_examples=20, deadline=None)
norm_kinds = st.sampled_from([None, "ln", "bn"])
acts = st.sampled_from([nn.GELU, nn.ReLU, nn.SiLU])
forms = st.sampled_from(["conv", "fc"])


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for every parameter and BN statistic (identity BN stats would hide fold bugs)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.3)
    return module.eval()


def image(seed, n, c, h, w):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


class Block(nn.Module):
    """FasterNet-shaped block: x + mlp(pconv(x))."""

    def __init__(self, dim, n_div, k, hidden, mid_norm="bn", pre_norm=None, layer_scale=None, act=nn.ReLU,
                 bias=False, form="conv"):
        super().__init__()
        self.spatial_mixing = PartialConv(dim, n_div, k)
        self.mlp = PointwiseMlp(dim, hidden, act=act, bias=bias, pre_norm=pre_norm, mid_norm=mid_norm,
                                layer_scale=layer_scale, form=form)
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.spatial_mixing(x)))


class ReusedOutput(Block):
    def forward(self, x):
        y = self.spatial_mixing(x)
        return y + self.mlp(y)


@FAST
@given(dc=st.integers(1, 6), n_div=st.sampled_from([1, 2, 4, 8]), k=st.sampled_from([1, 3, 5]),
       n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_pconv_forms_match_split_cat(dc, n_div, k, n, h, w, seed):
    ref = randomize(PartialConv(dc * n_div, n_div, k), seed)
    before = snapshot(ref)
    x = image(seed, n, dc * n_div, h, w)
    for form in PartialConv.FORMS[1:]:
        new = set_pconv_form(ref, form)
        assert new.form == form
        assert_equivalent(ref, new, x)
    assert ref.form == "split_cat"
    assert_untouched(ref, before)


@FAST
@given(dc=st.integers(1, 5), n_div=st.sampled_from([2, 4]), k=st.sampled_from([1, 3, 5]),
       hidden=st.integers(1, 24), mid_norm=norm_kinds, layer_scale=st.sampled_from([None, 0.5]), act=acts,
       bias=st.booleans(), mlp=forms, fold_first=st.booleans(), n=st.integers(1, 2),
       hw=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_fused_pconv_is_one_exact_dense_conv(dc, n_div, k, hidden, mid_norm, layer_scale, act, bias, mlp,
                                             fold_first, n, hw, seed):
    dim = dc * n_div
    ref = randomize(Block(dim, n_div, k, hidden, mid_norm, None, layer_scale, act, bias, form=mlp), seed)
    x = image(seed, n, dim, hw, hw + 1)
    new = fold_batchnorm(ref) if fold_first else ref
    new = set_pconv_form(new, "fused")
    if not fold_first:
        new = fold_batchnorm(new)
    assert isinstance(new.spatial_mixing, FusedPConvMlp) and isinstance(new.mlp.fc1, nn.Identity)
    assert new.spatial_mixing.weight.shape == (hidden, dim, k, k)
    if mid_norm == "bn":  # folded into the fused conv whichever order the transforms ran in
        assert isinstance(new.mlp.mid_norm, nn.Identity) and new.spatial_mixing.bias is not None
    assert_equivalent(ref, new, x)
    assert_equivalent(ref, set_mlp_form(new, "fc" if mlp == "conv" else "conv"), x)


def test_fused_refuses_where_it_would_be_wrong():
    with pytest.raises(EdgeportError, match=r"spatial_mixing: .*pre-norm"):
        set_pconv_form(Block(8, 4, 3, 16, mid_norm=None, pre_norm="bn"), "fused")
    with pytest.raises(EdgeportError, match="one module call only"):
        set_pconv_form(ReusedOutput(8, 4, 3, 8), "fused")
    with pytest.raises(EdgeportError, match="bare PartialConv"):
        set_pconv_form(PartialConv(8, 4), "fused")
    fused = set_pconv_form(Block(8, 4, 3, 16), "fused")
    with pytest.raises(EdgeportError, match="already fused"):
        set_pconv_form(fused, "slicing")


def test_pconv_fused_catches_a_wrong_composition(monkeypatch):
    """The gate catches a real defect: pass-through channels given an identity kernel on the wrong tap."""
    ref = randomize(Block(8, 4, 3, 12), 0)
    x = image(0, 2, 8, 6, 6)
    good = set_pconv_form(ref, "fused")
    assert_equivalent(ref, good, x)
    bad = set_pconv_form(ref, "fused")
    with torch.no_grad():
        bad.spatial_mixing.weight[:, 2:] = bad.spatial_mixing.weight[:, 2:].roll(1, dims=-1)
    with pytest.raises(AssertionError, match="models differ"):
        assert_equivalent(ref, bad, x)


def test_pconv_slice_cat_catches_swapped_halves():
    """The gate catches a real defect in slice_cat: the conv'd and passed-through halves concatenated in the
    wrong order (same shape, other values)."""
    ref = randomize(PartialConv(8, 4), 0)
    x = image(0, 2, 8, 5, 5)
    good = set_pconv_form(ref, "slice_cat")
    assert_equivalent(ref, good, x)
    bad = set_pconv_form(ref, "slice_cat")
    dc = bad.dim_conv
    bad.forward = lambda x: torch.cat((x[:, dc:], bad.conv(x[:, :dc])), 1)
    with pytest.raises(AssertionError, match="models differ"):
        assert_equivalent(ref, bad, x)


def export_block(form, tmp_path):
    """A 1x1 stem conv and a FasterNet-shaped block (dim 40, PConv width 10: not a multiple of MNN's 4-channel
    pack) in `form`, exported to ONNX like `make export` does; returns the path and its op types."""

    from export import onnx_export

    # the stem: in a network the block's input arrives packed (NC4HW4), not as the NCHW model input
    block = set_pconv_form(randomize(nn.Sequential(nn.Conv2d(40, 40, 1), Block(40, 4, 3, 80)), 0), form)
    path = tmp_path / f"{form}.onnx"
    meta = {"input_shape": [1, 40, 8, 8], "input_name": "input", "output_names": ["out"]}
    graph = onnx_export.export_onnx(block, path, meta)
    return path, [n.op_type for n in graph.graph.node]


def mnn_op_types(onnx_path):
    import json

    import _tools

    from export import mnn_convert
    from export._console import redirect_fds

    mnn = mnn_convert.convert(onnx_path, onnx_path.with_suffix(".mnn"), "test")
    dump = mnn.with_suffix(".json")
    with redirect_fds(mnn.with_suffix(".json.log")):
        _tools.mnnconvert(["MNNConvert", "-f", "MNN", "--modelFile", str(mnn), "--JsonFile", str(dump)])
    return [op["type"] for op in json.loads(dump.read_text())["oplists"]]


def test_pconv_slice_cat_keeps_mnn_packed_layout(tmp_path):
    """Why slice_cat exists: MNN's converter puts an ONNX Split (sizes as a constant input) on NCHW with four
    layout conversions around it; two ONNX Slices keep NC4HW4 (only the input's and output's remain)."""
    split_path, split_ops = export_block("split_cat", tmp_path)
    slice_path, slice_ops = export_block("slice_cat", tmp_path)
    assert "Split" in split_ops and "Slice" not in split_ops
    assert "Split" not in slice_ops and slice_ops.count("Slice") == 2 and "Concat" in slice_ops
    # split_cat: the input's and the output's, plus stem → Split, Split → conv, conv → Concat, Concat → fc1
    assert mnn_op_types(split_path).count("ConvertTensor") == 2 + 4
    assert mnn_op_types(slice_path).count("ConvertTensor") == 2


def test_pconv_divisibility_error_names_the_layer():
    model = nn.Sequential(nn.Identity(), nn.Sequential(PartialConv(8, 4)))
    model[1][0].n_div = 3
    with pytest.raises(EdgeportError, match=r"^1\.0: PartialConv has 8 channels, not divisible"):
        set_pconv_form(model, "slicing")


def test_unknown_forms_list_the_valid_ones():
    with pytest.raises(EdgeportError, match="valid forms: split_cat, slice_cat, slicing, full, fused"):
        set_pconv_form(PartialConv(8), "dense")
    with pytest.raises(EdgeportError, match="valid forms: conv, fc"):
        set_mlp_form(PointwiseMlp(8, 16), "linear")


@FAST
@given(in_ch=st.integers(1, 12), hidden=st.integers(1, 24), out_ch=st.integers(1, 12), pre_norm=norm_kinds,
       mid_norm=norm_kinds, layer_scale=st.sampled_from([None, 1e-6, 0.7]), act=acts, bias=st.booleans(),
       n=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), seed=st.integers(0, 10**6))
def test_mlp_forms_convert_exactly_both_ways(in_ch, hidden, out_ch, pre_norm, mid_norm, layer_scale, act,
                                             bias, n, h, w, seed):
    ref = randomize(PointwiseMlp(in_ch, hidden, out_ch, act, bias, pre_norm, mid_norm, layer_scale), seed)
    before = snapshot(ref)
    x = image(seed, n, in_ch, h, w)
    fc = set_mlp_form(ref, "fc")
    assert fc.form == "fc" and isinstance(fc.fc1, nn.Linear) and isinstance(fc.fc2, nn.Linear)
    for norm in (fc.norm, fc.mid_norm):
        assert not isinstance(norm, LayerNorm2d)
    assert_equivalent(ref, fc, x)
    back = set_mlp_form(fc, "conv")
    assert type(back.norm) is type(ref.norm) and type(back.mid_norm) is type(ref.mid_norm)
    assert_untouched(back, before)  # the round trip restores every tensor bit for bit
    assert_untouched(ref, before)


@FAST
@given(ch=st.integers(1, 16), rd=st.integers(1, 8), act=acts, n=st.integers(1, 3), h=st.integers(1, 6),
       seed=st.integers(0, 10**6))
def test_squeeze_excite_forms(ch, rd, act, n, h, seed):
    ref = randomize(SqueezeExcite(ch, rd, act), seed)
    x = image(seed, n, ch, h, h + 2)
    fc = set_mlp_form(ref, "fc")
    assert fc.form == "fc" and isinstance(fc.fc1, nn.Linear)
    assert_equivalent(ref, fc, x)
    assert_untouched(set_mlp_form(fc, "conv"), snapshot(ref))


@FAST
@given(in_g=st.integers(1, 4), out_g=st.integers(1, 4), groups=st.sampled_from([1, 2, "dw"]),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), act=st.sampled_from([None, nn.SiLU]),
       n=st.integers(1, 3), hw=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_conv_norm_act_bn_fold(in_g, out_g, groups, k, stride, act, n, hw, seed):
    if groups == "dw":
        in_ch = out_ch = groups = in_g * 2
    else:
        in_ch, out_ch = in_g * groups, out_g * groups
    ref = randomize(ConvNormAct(in_ch, out_ch, k, stride, groups=groups, act=act), seed)
    new = fold_batchnorm(ref)
    assert isinstance(new.bn, nn.Identity) and new.conv.bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in new.modules())
    assert_equivalent(ref, new, image(seed, n, in_ch, hw, hw))


@FAST
@given(in_ch=st.integers(1, 12), hidden=st.integers(1, 24), pre_norm=st.sampled_from([None, "bn"]),
       mid_norm=norm_kinds, layer_scale=st.sampled_from([None, 0.3]), bias=st.booleans(), form=forms,
       n=st.integers(1, 3), hw=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_mlp_bn_folds_in_both_forms(in_ch, hidden, pre_norm, mid_norm, layer_scale, bias, form, n, hw, seed):
    ref = randomize(PointwiseMlp(in_ch, hidden, None, nn.GELU, bias, pre_norm, mid_norm, layer_scale,
                                 form=form), seed)
    new = fold_batchnorm(ref)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in new.modules())
    if "bn" in (pre_norm, mid_norm):
        assert new.fc1.bias is not None
    assert_equivalent(ref, new, image(seed, n, in_ch, hw, hw))


@FAST
@given(in_ch=st.integers(1, 8), out_ch=st.integers(1, 8), k=st.sampled_from([1, 2, 3]),
       stride=st.sampled_from([1, 2]), hw=st.integers(3, 8), seed=st.integers(0, 10**6))
def test_sequential_conv_bn_neighbours_fold(in_ch, out_ch, k, stride, hw, seed):
    """BN → unpadded conv (InceptionNeXt's downsample) and padded conv → BN, inside nn.Sequential."""
    ref = nn.Sequential(nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, k, stride),
                        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
    ref = randomize(ref, seed)
    new = fold_batchnorm(ref)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in new.modules())
    assert_equivalent(ref, new, image(seed, 2, in_ch, hw, hw))


def test_batchnorm_without_adjacent_conv_or_before_padding_stays():
    ref = randomize(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), 0)
    assert isinstance(fold_batchnorm(ref)[1], nn.BatchNorm2d)


@FAST
@given(in_ch=st.integers(1, 12), hidden=st.integers(1, 24), out_ch=st.integers(1, 12),
       layer_scale=st.sampled_from([1e-6, 0.5, 2.0]), bias=st.booleans(), form=forms, hw=st.integers(1, 6),
       seed=st.integers(0, 10**6))
def test_layer_scale_fold(in_ch, hidden, out_ch, layer_scale, bias, form, hw, seed):
    ref = PointwiseMlp(in_ch, hidden, out_ch, nn.GELU, bias, "ln", None, layer_scale, form=form)
    ref = randomize(ref, seed)
    new = fold_layer_scale(ref)
    assert new.gamma is None and "gamma" not in new.state_dict()
    assert_equivalent(ref, new, image(seed, 2, in_ch, hw, hw))


def test_bn_fold_with_wrong_statistics_is_caught(monkeypatch):
    """The gate catches a real defect: a BN fold that forgets the running mean."""
    ref = randomize(PointwiseMlp(8, 16, pre_norm="bn", mid_norm="bn"), 1)
    x = image(1, 2, 8, 5, 5)
    assert_equivalent(ref, fold_batchnorm(ref), x)
    real = inference._bn_scale_shift

    def forgets_mean(bn, path):
        s, _ = real(bn, path)
        return s, bn.bias.double()

    monkeypatch.setattr(inference, "_bn_scale_shift", forgets_mean)
    with pytest.raises(AssertionError, match="models differ"):
        assert_equivalent(ref, fold_batchnorm(ref), x)


def test_remove_droppath():
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), DropPath(0.5), nn.Dropout(0.5), nn.Sequential(nn.Dropout2d(0.3)))
    ref.train()
    new = remove_droppath(ref)
    assert not any(isinstance(m, (DropPath, nn.Dropout, nn.Dropout2d)) for m in new.modules())
    assert isinstance(ref[1], DropPath)
    x = image(0, 4, 3, 4, 4)
    assert torch.equal(new(x), new(x))  # train mode, yet deterministic
    new.eval()
    ref.eval()
    assert_equivalent(ref, new, x)


def test_relative_error_and_its_failures():
    a = torch.tensor([1.0, -2.0])
    assert relative_error(a, a) == 0.0
    assert relative_error([a], [a + torch.tensor([0.0, 0.02])]) == pytest.approx(0.01)
    with pytest.raises(AssertionError, match="shape differs"):
        relative_error(a, a[:1])
    with pytest.raises(AssertionError, match="output count"):
        relative_error([a, a], [a])
    assert relative_error(a, a * float("nan")) == float("inf")  # models.metrics.max_rel: non-finite is inf
    assert relative_error(torch.zeros(2), a) == float("inf")  # a zero reference and a non-zero candidate
    with pytest.raises(EdgeportError, match="train mode"):
        assert_equivalent(nn.Dropout().train(), nn.Identity(), a)
