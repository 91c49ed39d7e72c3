"""The one place the exported networks are built: from a "source" record (the manifest keeps it) to the
training-form reference and the inference-form model, deterministically. Export and the parity CLI both call
`build_models`, so an artifact directory alone is enough to rebuild and re-check what it was made from."""
from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from importlib import metadata
from typing import Callable

import torch
from torch import nn

import models
from models.errors import EdgeportError
from models.layers import PartialConv, PointwiseMlp, SqueezeExcite
from runtime.documents import sha256_file  # noqa: F401 (export's modules import it from here)

FEATURE_NAMES = ("feat_s4", "feat_s8", "feat_s16", "feat_s32")


def edgeport_version() -> str:
    try:
        return metadata.version("edgeport")
    except metadata.PackageNotFoundError:
        return "0+unknown"




def make_source(model: str, weights=None, img_size: int | None = None, batch: int = 1,
                dynamic_batch: bool = False, features_only: bool = False, pconv: str = "split_cat",
                mlp: str = "fc", seed: int = 0) -> dict:
    """Validate the request and pin everything needed to rebuild it (weights by path and sha256).

    model ULTRALYTICS ("ultralytics"): the network is the one an Ultralytics checkpoint (`weights`) describes."""
    cfg = models.get_cfg(model)  # unknown names fail here, before any work
    if weights is not None:
        weights = os.path.abspath(os.fspath(weights))
        if not os.path.isfile(weights) or not os.access(weights, os.R_OK):
            raise EdgeportError(f"weights file not found or not readable: {weights}")
    if img_size is None and model == ULTRALYTICS:  # not the user's value: never reported as --img-size
        img_size = _ultralytics_size(weights)
        try:
            check_size(img_size, batch, seed, ("the checkpoint's training size (train_args imgsz)",
                                               *OPTION_LABELS[1:]))
        except EdgeportError as e:
            raise EdgeportError(f"{e}; pass --img-size N (a multiple of 32) to export at another size") from None
    img_size = cfg.input_size[-1] if img_size is None else img_size
    check_size(img_size, batch, seed)
    return {"model": model, "weights": weights, "weights_sha256": sha256_file(weights) if weights else None,
            "seed": seed, "img_size": img_size, "batch": batch, "dynamic_batch": dynamic_batch,
            "features_only": features_only, "pconv": pconv, "mlp": mlp, "calibrated": weights is None}


ULTRALYTICS = "ultralytics"  # models.yolo11: the detector an Ultralytics checkpoint's own YAML describes


def _ultralytics_size(weights) -> int:
    """The checkpoint's training size (its train_args imgsz; 640 if it has none)."""
    from models.ultralytics_ckpt import is_ultralytics_checkpoint, read_ultralytics

    if weights is None or not is_ultralytics_checkpoint(weights):
        raise EdgeportError(f"model '{ULTRALYTICS}' is built from an Ultralytics checkpoint: give its .pt file, "
                            "e.g. python -m export path/to/best.pt")
    size = read_ultralytics(weights)[2]["imgsz"]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 640


MAX_SEED = 2**32 - 1
# The parity inputs (20 samples) and the exporter's activations must fit in memory with room to spare: above
# this many input pixels per export (batch × H × W) the run would need tens of GB.
MAX_PIXELS = 64 * 2048 * 2048


OPTION_LABELS = ("--img-size", "--batch", "--seed")
SOURCE_LABELS = tuple(f"source record field {k}" for k in ("img_size", "batch", "seed"))


def check_size(img_size, batch, seed, labels: tuple[str, str, str] = OPTION_LABELS) -> None:
    """Bounds of the numeric options. `labels` say where each value came from (the command line's options by
    default; a manifest's source record, which may be hand-edited, or a checkpoint), so an error never blames
    an option the user did not pass."""
    size_label, batch_label, seed_label = labels
    for name, value in zip(labels, (img_size, batch, seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise EdgeportError(f"{name} must be an integer, got {value!r}")
    if img_size < 32 or img_size % 32:
        raise EdgeportError(f"{size_label} {img_size} must be a positive multiple of 32 (the total stride)")
    if batch < 1:
        raise EdgeportError(f"{batch_label} {batch} must be at least 1")
    if batch * img_size * img_size > MAX_PIXELS:
        raise EdgeportError(f"{size_label} {img_size} with {batch_label} {batch} needs more memory than an export "
                            f"can have (batch × size² ≤ {MAX_PIXELS:,}); use a smaller size or batch")
    if not 0 <= seed <= MAX_SEED:
        raise EdgeportError(f"{seed_label} {seed} must be between 0 and {MAX_SEED}")


def model_forms(model: nn.Module) -> tuple[bool, bool]:
    """(has a PConv, has a pointwise MLP or SE) — which form switches mean anything for this network."""
    mods = list(model.modules())
    return (any(isinstance(m, PartialConv) for m in mods),
            any(isinstance(m, (PointwiseMlp, SqueezeExcite)) for m in mods))


def form_tag(meta: dict) -> str:
    """Directory name of an export: "split_cat-fc", "fc", "conv-features", ..."""
    tag = "-".join(f for f in (meta["pconv"], meta["mlp"]) if f) or "default"
    return tag + ("-features" if meta["task"] == "features" else "")


def task_of(cfg_extra: dict, features_only: bool) -> str:
    """An export's task: "detection" for a detector (whatever --features-only says), else "features" or
    "classification"."""
    if cfg_extra.get("task") == "detection":
        return "detection"
    return "features" if features_only else "classification"


def artifact_meta(model: nn.Module, source: dict) -> dict:
    """The metadata contract carried by every artifact (ONNX metadata_props "edgeport", MNN bizCode)."""
    cfg = model.default_cfg
    has_pconv, has_mlp = model_forms(model)
    task = task_of(cfg["extra"], bool(source["features_only"]))
    size = source["img_size"]
    if task == "detection":
        return _detector_meta(model, source, has_pconv, has_mlp)
    return {
        "edgeport_version": edgeport_version(),
        "model": source["model"],
        "family": cfg["family"],
        "task": task,
        "input_name": "input",
        "input_shape": [-1 if source["dynamic_batch"] else source["batch"], 3, size, size],
        "layout": "NCHW",
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "interpolation": cfg["interpolation"],
        "num_classes": 0 if task == "features" else int(cfg["num_classes"]),
        "output_names": list(FEATURE_NAMES) if task == "features" else ["logits"],
        "pconv": source["pconv"] if has_pconv else None,
        "mlp": source["mlp"] if has_mlp else None,
        "weights_sha256": source["weights_sha256"],
        "precision": "fp32",
    }


def _detector_meta(model: nn.Module, source: dict, has_pconv: bool, has_mlp: bool) -> dict:
    """A detector's contract (issue 14): input `images` [N, 3, H, W] RGB 0..1 letterboxed with grey `pad_value`;
    outputs `boxes` [N, A, 4] x1y1x2y2 in input pixels and `scores` [N, A, nc] after sigmoid; NMS outside the
    graph with the `nms` settings (runtime.detect)."""
    from runtime.detect import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET

    cfg, extra = model.default_cfg, model.default_cfg["extra"]
    size = source["img_size"]
    names = extra.get("names")
    return {
        "edgeport_version": edgeport_version(),
        "model": source["model"],
        "architecture": cfg.get("architecture"),
        "family": cfg["family"],
        "task": "detection",
        "input_name": "images",
        "input_shape": [-1 if source["dynamic_batch"] else source["batch"], 3, size, size],
        "layout": "NCHW",
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": 1.0,
        "interpolation": cfg["interpolation"],
        "resize": "letterbox",
        "pad_value": int(extra.get("pad_value", 114)),
        "num_classes": int(model.nc),
        "names": list(names) if names else None,
        "output_names": ["boxes", "scores"],
        "box_format": "xyxy",
        "strides": [int(s) for s in model.model[-1].stride],
        "nms": {"conf": DEFAULT_CONF, "iou": DEFAULT_IOU, "max_det": DEFAULT_MAX_DET},
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
    _check_source(source)
    if source["model"] == ULTRALYTICS:
        with step("load Ultralytics checkpoint"):
            model = _load_ultralytics(source)
    else:
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


def _check_source(source: dict) -> None:
    """A manifest's source record is user-editable: the same bounds as the command line, one-line errors."""
    from models.inference import MLP_FORMS, PCONV_FORMS
    from runtime.documents import check_document

    from .schemas import Source

    check_document(source, Source, "source record", "re-export the artifact", error=EdgeportError)
    try:
        models.get_cfg(source["model"])
    except (KeyError, TypeError, EdgeportError):
        raise EdgeportError(f"source record names an unknown model {source['model']!r}; re-export") from None
    check_size(source["img_size"], source["batch"], source["seed"], SOURCE_LABELS)
    for key in ("dynamic_batch", "features_only", "calibrated"):
        if not isinstance(source[key], bool):
            raise EdgeportError(f"source record field {key} must be true or false, got {source[key]!r}")
    for key, valid in (("pconv", PCONV_FORMS), ("mlp", MLP_FORMS)):
        if source[key] is not None and source[key] not in valid:
            raise EdgeportError(f"source record field {key} is {source[key]!r}; expected one of "
                                f"{', '.join(valid)}")
    if source["weights"] is not None and not isinstance(source["weights"], str):
        raise EdgeportError(f"source record field weights must be a path or null, got {source['weights']!r}")
    if not source["weights"] and not source["calibrated"]:
        raise EdgeportError("source record has neither weights nor calibrated random init; re-export")


def _checked_weights(source: dict) -> str:
    path = source["weights"]
    if not path or not os.path.isfile(path):
        raise EdgeportError(f"weights file not found: {path}")
    digest = sha256_file(path)
    if source["weights_sha256"] and digest != source["weights_sha256"]:
        raise EdgeportError(f"weights file {path} changed since export (sha256 {digest[:12]}… ≠ "
                            f"{source['weights_sha256'][:12]}…); re-export")
    return path


def _load_weights(model: nn.Module, source: dict) -> None:
    models.load_checkpoint(model, _checked_weights(source))


def _load_ultralytics(source: dict) -> nn.Module:
    from models.ultralytics_ckpt import is_ultralytics_checkpoint
    from models.yolo11 import load_ultralytics

    path = _checked_weights(source)
    if not is_ultralytics_checkpoint(path):
        raise EdgeportError(f"{path}: not an Ultralytics checkpoint (a zip holding Ultralytics' pickled model); "
                            "for a plain state_dict name the model: python -m export yolo11n --weights FILE")
    if source["features_only"]:
        raise EdgeportError("an Ultralytics detector has no features-only form; drop --features-only")
    return load_ultralytics(path)[0]


def _calibrate(model: nn.Module, meta: dict, seed: int) -> nn.Module:
    """Random init → realistic activations (BN statistics from real photos, head scaled to O(1–10) logits):
    random weights make every backend look perfect because the outputs are tiny."""
    from models.calibrate import make_realistic

    from .inputs import sample_batch

    if meta["task"] == "detection":  # no classifier head to scale: the Detect head's last convs instead
        from models.yolo11 import make_realistic_detector

        # Photos and the parity set's random mosaics: BN statistics from photos alone leave the class branch
        # 7–9 logits higher on mosaics, where every anchor then fires (487 detections on one 640² mosaic,
        # whose NMS order hinges on ties); a trained detector fires rarely on random tiles.
        return make_realistic_detector(model, [torch.from_numpy(sample_batch(meta, seed=seed))], seed=seed)
    batch = torch.from_numpy(sample_batch(meta, seed=seed))
    return make_realistic(model, [batch], seed=seed)


def _to_inference(model: nn.Module, pconv: str, mlp: str) -> nn.Module:
    from models.inference import to_inference

    return to_inference(model, pconv=pconv, mlp=mlp)
