"""Make a random-init model behave like a trained one numerically, so parity checks mean something.

A freshly initialised model has identity BN statistics, norm affines of 1/0, zero biases, layer scales of 1e-6
(blocks ≈ identity) and a head of std ~0.02 (logits ≈ 1e-2): export errors hide under all of those.
Every function returns a new eval-mode model and leaves its input untouched.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import EdgeportError

_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def make_realistic(model: nn.Module, batches, target_std: float = 3.0, seed: int = 0,
                   class_views=None) -> nn.Module:
    """`randomize_affine` → `calibrate_bn` → (`fit_head` to `class_views`, when given: a head with trained-like
    top-1 margins) → `scale_head`, on one copy.

    LayerNorm-only families (ConvNeXt) have no statistics to calibrate: their blocks only do something once
    the layer scales (init 1e-6) and norm affines are non-trivial, hence the seeded random values. BN affines
    and conv / linear biases are randomised too, so a fold that ignores one of them cannot pass by chance."""
    model = copy.deepcopy(model).eval()
    xs = _batches(batches)
    _randomize_affine_(model, seed)
    _calibrate_bn_(model, xs)
    if class_views is not None:
        _fit_head_(model, [_batches(v)[0] for v in class_views], xs[0])
    _scale_head_(model, xs, target_std)
    return model


def randomize_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded trained-looking values for every norm's weight (U[0.5, 1.5]) and bias (N(0, 0.1)), every conv /
    linear bias (N(0, 0.05)) and every layer scale (a 1-D parameter named `gamma` or `layer_scale*`:
    ±U[0.2, 0.8]).

    A block without a layer scale whose residual branch ends in a norm (`branch_end_norm`, EfficientNetV2's
    MBConv / FusedMBConv) gets that norm's weight drawn like a layer scale: otherwise each branch would be as
    large as the path it joins (ConvNeXt / InceptionNeXt branches are ~0.1 of it, FasterNet's ~0.2), and 40
    such blocks compound every rounding error ~40× (fp16 weights 9e-3 instead of ~1e-3, float32 noise 1e-5)."""
    model = copy.deepcopy(model).eval()
    _randomize_affine_(model, seed)
    return model


def calibrate_bn(model: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics as the cumulative average over `batches` (BN layers in
    train mode with momentum=None, everything else — dropout, drop-path — in eval). Returns an eval model."""
    model = copy.deepcopy(model).eval()
    _calibrate_bn_(model, _batches(batches))
    return model


def scale_head(model: nn.Module, batches, target_std: float = 3.0) -> nn.Module:
    """Rescale the classifier (the last nn.Linear whose output is the model's output) so the logits' std over
    `batches` is `target_std`. Exact: scaling the final affine layer scales the logits. No-op for
    features_only models."""
    model = copy.deepcopy(model).eval()
    _scale_head_(model, _batches(batches), target_std)
    return model


@torch.no_grad()
def _randomize_affine_(model, seed):
    g = torch.Generator().manual_seed(seed)

    def fill(p, draw):
        p.copy_(draw(torch.empty(p.shape)))

    for m in model.modules():
        if isinstance(m, _NORMS) and m.weight is not None:
            fill(m.weight, lambda t: t.uniform_(0.5, 1.5, generator=g))
            fill(m.bias, lambda t: t.normal_(0.0, 0.1, generator=g))
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            fill(m.bias, lambda t: t.normal_(0.0, 0.05, generator=g))
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or leaf.startswith("layer_scale"):
            p.copy_(_layer_scale_like(p.shape, g))
    for m in model.modules():  # after every other draw, so families without such blocks keep their values
        norm = getattr(m, "branch_end_norm", None)
        if norm is not None:
            norm.weight.copy_(_layer_scale_like(norm.weight.shape, g))


def _layer_scale_like(shape, g) -> torch.Tensor:
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return torch.empty(shape).uniform_(0.2, 0.8, generator=g) * sign


@torch.no_grad()
def _calibrate_bn_(model, xs):
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    if bns:
        for x in xs:
            model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()


@torch.no_grad()
def _scale_head_(model, xs, target_std):
    if getattr(model, "features_only", False):
        return
    head, first = _find_head(model, xs[0])
    logits = torch.cat([first.double().flatten()] + [model(x).double().flatten() for x in xs[1:]])
    std = logits.std().item()
    if not std > 0 or not np.isfinite(std):
        raise EdgeportError(f"scale_head: logits have std {std} over the batches; cannot rescale the head")
    head.weight.mul_(target_std / std)
    if head.bias is not None:
        head.bias.mul_(target_std / std)


# A trained ImageNet classifier's top logit sits ~6–10σ above its other logits on a photo of a class it knows; a
# random head puts it at the maximum of 1000 draws (~3σ) with the runner-up 0.03–0.3σ below, so a cosine of
# 0.997 flips 10 % of the arg-maxes. PROBE_MARGIN is the own-class logit on the views the probe is fitted to, in σ
# of the untouched rows' logits; on held-out views of the same photos it gives (fasternet_t0, 224²) a median
# top-1 margin of 2.2σ (was 0.18σ) and a median top logit of 6.7σ. PROBE_RIDGE: relative ridge of the fit.
# Not used by export.source yet: the probe reads the small between-photo differences of random features, so it
# amplifies weight/activation rounding (efficientnetv2_s 384²: mnn_int8w max_rel 0.028 → 0.106 > its 0.05 gate).
PROBE_MARGIN = 10.0
PROBE_RIDGE = 0.1


def fit_head(model: nn.Module, class_views, margin: float = PROBE_MARGIN, ridge: float = PROBE_RIDGE) -> nn.Module:
    """The classifier's first len(class_views) rows become a linear probe trained on the model's own pooled
    features: `class_views[c]` (a batch of views of one photo) is class c, fitted by ridge-regularised least
    squares to one-hot targets (what training a linear head does), scaled so the own-class logit is `margin`
    times the spread of the other, untouched rows' logits. Those keep their random values (the classes no photo
    shows). Logit scale is `scale_head`'s job afterwards. No-op for features_only models."""
    model = copy.deepcopy(model).eval()
    views = [_batches(v)[0] for v in class_views]
    if views:
        _fit_head_(model, views, views[0][:1], margin, ridge)
    return model


@torch.no_grad()
def _fit_head_(model, views, x, margin=PROBE_MARGIN, ridge=PROBE_RIDGE):
    if getattr(model, "features_only", False):
        return
    head, _ = _find_head(model, x)
    k = min(len(views), head.out_features // 2)  # at least as many untouched rows as probe rows
    if k < 2:
        return
    pooled = []
    hook = head.register_forward_pre_hook(lambda mod, args: pooled.append(args[0].double().flatten(1)))
    try:
        for v in views[:k]:
            model(v)
    finally:
        hook.remove()
    labels = torch.cat([torch.full((len(f),), c) for c, f in enumerate(pooled)])
    onehot = nn.functional.one_hot(labels, k).double()
    features = torch.cat(pooled)
    mean = features.mean(0)
    centred = features - mean
    gram = centred @ centred.T  # the dual form: fewer views than feature channels
    lam = ridge * gram.trace() / len(gram)
    probe = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), onehot).T @ centred
    bias = head.bias.double()[k:] if head.bias is not None else 0.0
    rest = features @ head.weight.double()[k:].T + bias  # the untouched rows' logits
    own = (centred @ probe.T)[onehot.bool()]
    probe *= margin * rest.std(1).median() / own.median()
    head.weight[:k] = probe.to(head.weight.dtype)
    if head.bias is not None:  # centred: the probe's logits sit at the other rows' mean logit, plus the class's
        head.bias[:k] = (rest.mean() - probe @ mean).to(head.bias.dtype)


def _find_head(model, x) -> tuple[nn.Linear, torch.Tensor]:
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append((mod, out)))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(logits, torch.Tensor):
        for mod, out in reversed(outputs):
            if out is logits or (out.numel() == logits.numel()
                                 and torch.equal(out.reshape(logits.shape), logits)):
                return mod, logits
    raise EdgeportError("scale_head: no nn.Linear produces the model's output; is it a classifier "
                        "(features_only models need no head scaling)?")


def _batches(batches) -> list[torch.Tensor]:
    if isinstance(batches, (torch.Tensor, np.ndarray)):
        batches = [batches]
    out = [torch.as_tensor(b, dtype=torch.float32) for b in batches]
    if not out:
        raise EdgeportError("calibration needs at least one batch of inputs")
    return out
