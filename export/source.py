"""The one place the exported networks are built: from a "source" record (the manifest keeps it) to the
training-form reference and the inference-form model, deterministically. Export and the parity CLI both call
`build_models`, so an artifact directory alone is enough to rebuild and re-check what it was made from."""
from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager, nullcontext
from importlib import metadata
from typing import Callable

import torch
from torch import nn

import models
from models.errors import EdgeportError
from models.layers import PartialConv, PointwiseMlp, SqueezeExcite

FEATURE_NAMES = ("feat_s4", "feat_s8", "feat_s16", "feat_s32")
SOURCE_KEYS = ("model", "weights", "weights_sha256", "seed", "img_size", "batch", "dynamic_batch",
               "features_only", "pconv", "mlp", "calibrated")


def edgeport_version() -> str:
    try:
        return metadata.version("edgeport")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_source(model: str, weights=None, img_size: int | None = None, batch: int = 1,
                dynamic_batch: bool = False, features_only: bool = False, pconv: str = "split_cat",
                mlp: str = "fc", seed: int = 0) -> dict:
    """Validate the request and pin everything needed to rebuild it (weights by path and sha256)."""
    cfg = models.get_cfg(model)  # unknown names fail here, before any work
    if weights is not None:
        weights = os.path.abspath(os.fspath(weights))
        if not os.path.isfile(weights) or not os.access(weights, os.R_OK):
            raise EdgeportError(f"weights file not found or not readable: {weights}")
    img_size = img_size or cfg.input_size[-1]
    if img_size < 32 or img_size % 32:
        raise EdgeportError(f"--img-size {img_size} must be a positive multiple of 32 (the total stride)")
    if batch < 1:
        raise EdgeportError(f"--batch {batch} must be at least 1")
    return {"model": model, "weights": weights, "weights_sha256": sha256_file(weights) if weights else None,
            "seed": seed, "img_size": img_size, "batch": batch, "dynamic_batch": dynamic_batch,
            "features_only": features_only, "pconv": pconv, "mlp": mlp, "calibrated": weights is None}


def model_forms(model: nn.Module) -> tuple[bool, bool]:
    """(has a PConv, has a pointwise MLP or SE) — which form switches mean anything for this network."""
    mods = list(model.modules())
    return (any(isinstance(m, PartialConv) for m in mods),
            any(isinstance(m, (PointwiseMlp, SqueezeExcite)) for m in mods))


def form_tag(meta: dict) -> str:
    """Directory name of an export: "split_cat-fc", "fc", "conv-features", ..."""
    tag = "-".join(f for f in (meta["pconv"], meta["mlp"]) if f) or "default"
    return tag + ("-features" if meta["task"] == "features" else "")


def artifact_meta(model: nn.Module, source: dict) -> dict:
    """The metadata contract carried by every artifact (ONNX metadata_props "edgeport", MNN bizCode)."""
    cfg = model.default_cfg
    has_pconv, has_mlp = model_forms(model)
    features = bool(source["features_only"])
    size = source["img_size"]
    return {
        "edgeport_version": edgeport_version(),
        "model": source["model"],
        "family": cfg["family"],
        "task": "features" if features else "classification",
        "input_name": "input",
        "input_shape": [-1 if source["dynamic_batch"] else source["batch"], 3, size, size],
        "layout": "NCHW",
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "interpolation": cfg["interpolation"],
        "num_classes": 0 if features else int(cfg["num_classes"]),
        "output_names": list(FEATURE_NAMES) if features else ["logits"],
        "pconv": source["pconv"] if has_pconv else None,
        "mlp": source["mlp"] if has_mlp else None,
        "weights_sha256": source["weights_sha256"],
        "precision": "fp32",
    }


def build_models(source: dict, step: Callable[[str], AbstractContextManager] | None = None
                 ) -> tuple[nn.Module, nn.Module, dict]:
    """(reference, inference, meta): the training-form network in eval mode with real or calibrated weights,
    its inference form (`models.to_inference`), and the artifact metadata. Same source → same weights.

    `step(name)` wraps each stage (the export CLI times and displays them)."""
    step = step or (lambda name: nullcontext())
    missing = [k for k in SOURCE_KEYS if k not in source]
    if missing:
        raise EdgeportError(f"source record lacks {', '.join(missing)}; re-export the artifact")
    with step("create model"):
        torch.manual_seed(source["seed"])
        model = models.create_model(source["model"], features_only=source["features_only"])
    if source["weights"]:
        with step("load weights"):
            _load_weights(model, source)
    model.eval()
    meta = artifact_meta(model, source)
    if source["calibrated"]:
        with step("calibrate (random init)"):
            model = _calibrate(model, meta, source["seed"])
    reference = model.eval()
    with step("to_inference"):
        inference = _to_inference(reference, pconv=source["pconv"], mlp=source["mlp"]).eval()
    return reference, inference, meta


def _load_weights(model: nn.Module, source: dict) -> None:
    path = source["weights"]
    if not os.path.isfile(path):
        raise EdgeportError(f"weights file not found: {path}")
    digest = sha256_file(path)
    if source["weights_sha256"] and digest != source["weights_sha256"]:
        raise EdgeportError(f"weights file {path} changed since export (sha256 {digest[:12]}… ≠ "
                            f"{source['weights_sha256'][:12]}…); re-export")
    models.load_checkpoint(model, path)


def _calibrate(model: nn.Module, meta: dict, seed: int) -> nn.Module:
    """Random init → realistic activations (BN statistics from real photos, head scaled to O(1–10) logits):
    random weights make every backend look perfect because the outputs are tiny."""
    from models.calibrate import make_realistic

    from .inputs import sample_batch

    batch = torch.from_numpy(sample_batch(meta, seed=seed))
    return make_realistic(model, [batch], seed=seed)


def _to_inference(model: nn.Module, pconv: str, mlp: str) -> nn.Module:
    from models.inference import to_inference

    return to_inference(model, pconv=pconv, mlp=mlp)
