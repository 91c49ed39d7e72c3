"""The inference switch: a training-form model → the form we export, proven equal.

Every transform is pure (model → new model, input untouched) and recognises the shared layers in
`models.layers`, so it works for every family built from them:

    remove_droppath   DropPath / Dropout → Identity
    fold_batchnorm    BN into the adjacent conv / linear (ConvNormAct, PointwiseMlp pre- and mid-norm,
                      Conv2d/BN neighbours in an nn.Sequential); BNs with no adjacent conv stay
    fold_layer_scale  PointwiseMlp.gamma into fc2
    set_mlp_form      PointwiseMlp / SqueezeExcite: 1x1 conv ("conv") ⇄ nn.Linear ("fc")
    set_pconv_form    PartialConv: split_cat | slice_cat | slicing | full, or "fused" into the next MLP's fc1

`to_inference` composes them; `assert_equivalent` is the check that they changed nothing but the form.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .errors import EdgeportError
from .layers import ConvNormAct, DropPath, LayerNorm2d, PartialConv, PointwiseMlp, SqueezeExcite
from .metrics import max_rel

PCONV_FORMS = (*PartialConv.FORMS, "fused")
MLP_FORMS = PointwiseMlp.FORMS
# What an export gets when nobody picks a form: the training PConv and the original-layout MLP.
DEFAULT_PCONV, DEFAULT_MLP = "split_cat", "fc"


class EquivalenceError(EdgeportError, AssertionError):
    """Two models that should compute the same function do not."""


class FusedPConvMlp(nn.Conv2d):
    """A PartialConv with the following MLP's fc1 composed in: one dense k×k conv dim → hidden.

    Exact because nothing non-linear sits between them: the k×k kernel on the first dim/n_div channels is
    multiplied into fc1's columns, and each passed-through channel becomes fc1's column at the kernel centre.
    `feeds` names the sibling PointwiseMlp whose fc1 (now Identity) it absorbed."""

    def __init__(self, in_ch, out_ch, kernel_size, bias, feeds):
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)
        self.feeds = feeds


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def to_inference(model: nn.Module, pconv: str = DEFAULT_PCONV, mlp: str = DEFAULT_MLP,
                 fold_bn: bool = True) -> nn.Module:
    """A new eval-mode copy of `model` in the requested forms with dropout removed, layer scales folded and
    (with `fold_bn`) BatchNorms folded into their convs. `model.inference_info` reports what changed."""
    _check_form("PConv", pconv, PCONV_FORMS)
    _check_form("MLP", mlp, MLP_FORMS)
    new = copy.deepcopy(model)
    if new.training:
        warnings.warn("to_inference: the model was in train mode; switched to eval (BatchNorm running "
                      "statistics are folded, never batch statistics)", stacklevel=2)
    new.eval()
    new = _remove_droppath_(new)
    if fold_bn:
        _fold_batchnorm_(new)
    _fold_layer_scale_(new)
    _set_mlp_form_(new, mlp)
    has_pconv = any(isinstance(m, PartialConv) for m in new.modules())
    _set_pconv_form_(new, pconv)
    new.inference_info = {
        "params_before": count_parameters(model),
        "params_after": count_parameters(new),
        "pconv": pconv if has_pconv else None,
        "mlp": mlp,
        "fold_bn": fold_bn,
        "batchnorms_left": sum(isinstance(m, _BatchNorm) for m in new.modules()),
    }
    return new


# ---------------------------------------------------------------------------------------------------------
# Public transforms: copy, then the in-place worker.

def remove_droppath(model: nn.Module) -> nn.Module:
    return _remove_droppath_(copy.deepcopy(model))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold BN running statistics (the eval behaviour) into the adjacent conv / linear; lone BNs stay."""
    new = copy.deepcopy(model)
    _fold_batchnorm_(new)
    return new


def fold_layer_scale(model: nn.Module) -> nn.Module:
    new = copy.deepcopy(model)
    _fold_layer_scale_(new)
    return new


def set_mlp_form(model: nn.Module, form: str) -> nn.Module:
    _check_form("MLP", form, MLP_FORMS)
    new = copy.deepcopy(model)
    _set_mlp_form_(new, form)
    return new


def set_pconv_form(model: nn.Module, form: str) -> nn.Module:
    """Switch every PartialConv to `form`. "fused" is a block-level rewrite, valid only where the PConv's
    output goes to a sibling PointwiseMlp without pre-norm and nowhere else; it is one-way."""
    _check_form("PConv", form, PCONV_FORMS)
    new = copy.deepcopy(model)
    _set_pconv_form_(new, form)
    return new


# ---------------------------------------------------------------------------------------------------------
# Equivalence check (for export's parity gate to reuse too).

def relative_error(ref_out, new_out) -> float:
    """max |ref − new| / max |ref| over every output tensor (a tensor or a list/tuple of them): the project's one
    metric (models.metrics.max_rel), worst over the outputs."""
    refs, news = _as_list(ref_out), _as_list(new_out)
    if len(refs) != len(news):
        raise EquivalenceError(f"output count differs: {len(refs)} vs {len(news)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(refs, news)):
        if a.shape != b.shape:
            raise EquivalenceError(f"output {i} shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
        worst = max(worst, max_rel(a.detach().double().numpy(), b.detach().double().numpy()))
    return worst


@torch.no_grad()
def assert_equivalent(ref: nn.Module, new: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> float:
    """Raise EquivalenceError unless both eval-mode models give the same outputs on `x` within
    rtol · max|reference| (per output). Returns the relative error."""
    for name, m in (("reference", ref), ("new", new)):
        if m.training:
            raise EdgeportError(f"assert_equivalent: the {name} model is in train mode; call .eval() first")
    err = relative_error(ref(x), new(x))
    if not err <= rtol:  # also catches NaN
        raise EquivalenceError(f"models differ: max error {err:.3g} of max|reference| exceeds rtol {rtol:g}")
    return err


@torch.no_grad()
def float32_noise(model: nn.Module, x: torch.Tensor) -> float:
    """The model's own float32 error (vs its float64 forward) on `x`, relative to max|output|: the floor under
    any float32 parity. A deep random-init BN net gets close to 1e-5 on its own (EfficientNetV2-S at 128²:
    ~2e-6 on its calibration inputs, ~1.4e-5 on fresh random ones)."""
    ref = copy.deepcopy(model).double()
    return relative_error(ref(x.double()), model(x))


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


# ---------------------------------------------------------------------------------------------------------
# Workers (in place).

def _check_form(what, form, valid):
    if form not in valid:
        raise EdgeportError(f"unknown {what} form '{form}'; valid forms: {', '.join(valid)}")


def _identity(replaced: nn.Module) -> nn.Module:
    return nn.Identity().train(replaced.training)


def _replace(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    root.set_submodule(path, module)
    return root


def _remove_droppath_(model):
    for path, m in list(model.named_modules()):
        if isinstance(m, (DropPath, _DropoutNd)):
            model = _replace(model, path, _identity(m))
    return model


def _bn_scale_shift(bn: _BatchNorm, path: str):
    """y = s·x + t of an eval-mode BN, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise EdgeportError(f"{path}: BatchNorm without running statistics cannot be folded; "
                            "use fold_bn=False or calibrate it")
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def _set_weight_bias(layer, weight, bias):
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype))
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype))


def _fold_bn_after(layer, bn, path):
    """layer → BN  ⇒  layer' (per output channel: W' = s·W, b' = s·b + t)."""
    s, t = _bn_scale_shift(bn, path)
    w = layer.weight.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    _set_weight_bias(layer, w * s.view(-1, *[1] * (w.ndim - 1)), s * b + t)


def _exact_after_bn(layer) -> bool:
    """A BN in front of this layer folds into it exactly: no zero padding (it would see BN's shift), no
    groups."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding in ((0, 0), "valid")


def _fold_bn_before(layer, bn, path):
    """BN → conv / linear  ⇒  layer' (W' = W·diag(s), b' = b + Σ_taps W·t)."""
    if not _exact_after_bn(layer):
        raise EdgeportError(f"{path}: a BatchNorm before a padded or grouped conv cannot be folded exactly")
    s, t = _bn_scale_shift(bn, path)
    w = layer.weight.double()
    taps_sum = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)
    b = layer.bias.double() if layer.bias is not None else w.new_zeros(w.shape[0])
    _set_weight_bias(layer, w * s.view(1, -1, *[1] * (w.ndim - 2)), b + taps_sum @ t)


def _fold_batchnorm_(model):
    for parent_path, parent in list(model.named_modules()):
        path = _join(parent_path)
        if isinstance(parent, ConvNormAct) and isinstance(parent.bn, _BatchNorm):
            _fold_bn_after(parent.conv, parent.bn, path("bn"))
            parent.bn = _identity(parent.bn)
        elif isinstance(parent, PointwiseMlp) and not isinstance(parent.fc1, nn.Identity):
            if isinstance(parent.norm, _BatchNorm):
                _fold_bn_before(parent.fc1, parent.norm, path("norm"))
                parent.norm = _identity(parent.norm)
            if isinstance(parent.mid_norm, _BatchNorm):
                _fold_bn_after(parent.fc1, parent.mid_norm, path("mid_norm"))
                parent.mid_norm = _identity(parent.mid_norm)
        elif isinstance(parent, nn.Sequential):
            _fold_sequential_pairs_(parent, path)
        for child in parent.children():
            if isinstance(child, FusedPConvMlp):  # the MLP's fc1 lives here now
                mlp = parent.get_submodule(child.feeds)
                if isinstance(mlp.mid_norm, _BatchNorm):
                    _fold_bn_after(child, mlp.mid_norm, path(f"{child.feeds}.mid_norm"))
                    mlp.mid_norm = _identity(mlp.mid_norm)


def _fold_sequential_pairs_(seq: nn.Sequential, path):
    """Conv2d → BN and BN → Conv2d neighbours in a Sequential (InceptionNeXt's BN + 2x2 downsample conv)."""
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        first, second = seq._modules[a], seq._modules[b]
        if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
            _fold_bn_after(first, second, path(b))
            seq._modules[b] = _identity(second)
        elif isinstance(first, nn.BatchNorm2d) and isinstance(second, nn.Conv2d) and _exact_after_bn(second):
            _fold_bn_before(second, first, path(a))
            seq._modules[a] = _identity(first)


def _join(prefix):
    return lambda name: f"{prefix}.{name}" if prefix else name


def _fold_layer_scale_(model):
    for m in model.modules():
        if isinstance(m, PointwiseMlp) and m.gamma is not None:
            g = m.gamma.detach().double().reshape(-1)
            w = m.fc2.weight.double()
            bias = m.fc2.bias
            m.fc2.weight = nn.Parameter((w * g.view(-1, *[1] * (w.ndim - 1))).to(m.fc2.weight.dtype))
            if bias is not None:
                m.fc2.bias = nn.Parameter((bias.double() * g).to(bias.dtype))
            m.gamma = None


def _pointwise_as(layer: nn.Module, form: str, path: str) -> nn.Module:
    """A 1x1 Conv2d ⇄ nn.Linear with the same weights (Identity stays)."""
    if isinstance(layer, nn.Identity):
        return layer
    want = nn.Linear if form == "fc" else nn.Conv2d
    if type(layer) is want:
        return layer
    if isinstance(layer, nn.Conv2d) and (layer.kernel_size != (1, 1) or layer.groups != 1
                                         or layer.stride != (1, 1) or layer.padding != (0, 0)):
        raise EdgeportError(f"{path}: only a plain 1x1 conv can become nn.Linear (got {layer})")
    w = layer.weight.detach()
    out_ch, in_ch = w.shape[:2]
    kw = {"bias": layer.bias is not None, "device": w.device, "dtype": w.dtype}
    new = nn.Linear(in_ch, out_ch, **kw) if form == "fc" else nn.Conv2d(in_ch, out_ch, 1, **kw)
    with torch.no_grad():
        new.weight.copy_(w.reshape(new.weight.shape))
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def _layer_norm_as(norm: nn.Module, form: str) -> nn.Module:
    """LayerNorm2d (channels-first, conv form) ⇄ nn.LayerNorm (channels-last, fc form); others unchanged."""
    if not isinstance(norm, nn.LayerNorm):
        return norm
    cls = nn.LayerNorm if form == "fc" else LayerNorm2d
    if type(norm) is cls:
        return norm
    w = norm.weight
    new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=w is not None,
              device=None if w is None else w.device, dtype=None if w is None else w.dtype)
    if w is not None:
        new.load_state_dict(norm.state_dict())
    return new.train(norm.training)


def _set_mlp_form_(model, form):
    for mpath, m in model.named_modules():
        path = _join(mpath)
        if isinstance(m, PointwiseMlp):
            m.norm = _layer_norm_as(m.norm, form)
            m.mid_norm = _layer_norm_as(m.mid_norm, form)
        if isinstance(m, (PointwiseMlp, SqueezeExcite)):
            m.fc1 = _pointwise_as(m.fc1, form, path("fc1"))
            m.fc2 = _pointwise_as(m.fc2, form, path("fc2"))
            m.form = form


def _set_pconv_form_(model, form):
    for path, m in list(model.named_modules()):
        if isinstance(m, FusedPConvMlp) and form != "fused":
            raise EdgeportError(f"{path}: this PConv is already fused into its MLP (one-way); "
                                f"switch the unfused model to '{form}' instead")
        if not isinstance(m, PartialConv):
            continue
        if m.dim % m.n_div or m.conv.in_channels * m.n_div != m.dim:
            raise EdgeportError(f"{path or 'model'}: PartialConv has {m.dim} channels, not divisible into "
                                f"n_div={m.n_div} parts of {m.conv.in_channels}; fix the layer's dim/n_div")
        if form == "fused":
            _fuse_pconv_(model, path, m)
        else:
            m.form = form


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward; every submodule call stays a single call_module node."""

    def is_leaf_module(self, m, qualname):
        return True


def _fusion_partner(parent: nn.Module, pconv_name: str, path: str) -> str:
    """Name of the sibling PointwiseMlp that is the only consumer of the PConv's output, or EdgeportError."""
    def refuse(why):
        return EdgeportError(f"{path}: cannot use PConv form 'fused' here ({why}); "
                             "use split_cat, slice_cat, slicing or full")

    try:
        graph = _ShallowTracer().trace(parent)
    except Exception as e:
        raise refuse(f"its block's forward is not traceable: {type(e).__name__}") from None
    calls = [n for n in graph.nodes if n.op == "call_module"]
    nodes = [n for n in calls if n.target == pconv_name]
    if len(nodes) != 1:
        raise refuse("the PConv is not called exactly once by its block")
    users = list(nodes[0].users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].kwargs or users[0].args != (nodes[0],):
        raise refuse("its output does not go to one module call only")
    mlp_name = users[0].target
    mlp = parent.get_submodule(mlp_name)
    if "." in mlp_name or not isinstance(mlp, PointwiseMlp):
        raise refuse(f"its output goes to '{mlp_name}', not to a PointwiseMlp of the same block")
    if sum(n.target == mlp_name for n in calls) != 1:
        raise refuse(f"'{mlp_name}' is called more than once")
    if not isinstance(mlp.norm, nn.Identity):
        raise refuse(f"'{mlp_name}' has a pre-norm between the PConv and fc1")
    return mlp_name


@torch.no_grad()
def _fuse_pconv_(model, path, pconv: PartialConv):
    if not path:
        raise EdgeportError("model: PConv form 'fused' needs the block holding the PConv and its MLP, "
                            "not a bare PartialConv")
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    mlp_name = _fusion_partner(parent, name, path)
    mlp = parent.get_submodule(mlp_name)
    w1 = mlp.fc1.weight.double()
    w1 = w1.reshape(w1.shape[0], w1.shape[1])
    k, dc = pconv.kernel_size, pconv.dim_conv
    w = torch.einsum("oj,jikl->oikl", w1, pconv.full_weight().double())
    bias = mlp.fc1.bias.double() if mlp.fc1.bias is not None else None
    if pconv.conv.bias is not None:
        bias = (0 if bias is None else bias) + w1[:, :dc] @ pconv.conv.bias.double()
    dtype, device = mlp.fc1.weight.dtype, mlp.fc1.weight.device
    fused = FusedPConvMlp(pconv.dim, w1.shape[0], k, bias is not None, mlp_name)
    fused = fused.to(device=device, dtype=dtype)
    fused.weight.copy_(w)
    if bias is not None:
        fused.bias.copy_(bias)
    parent.set_submodule(name, fused.train(pconv.training))
    mlp.fc1 = _identity(mlp.fc1)
