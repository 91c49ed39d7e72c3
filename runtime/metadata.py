"""The artifact metadata schema: the JSON every edgeport .onnx (metadata_props "edgeport") and .mnn (bizCode)
carries, declared once (msgspec) and read only through `read_metadata` / `check_metadata`.

The file is not trusted: every field the runtime acts on has a type and a bound here, and any violation is one
EdgeRuntimeError line naming the field, its value and what is expected. Absent fields are allowed (older or
foreign files); the Predictor asks for the preprocessing ones when it needs them. Unknown fields are kept."""
# ruff: noqa: UP045  msgspec evaluates the annotations at run time: Optional[X], not X | None, on Python 3.9
from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

import msgspec

from .documents import decode_json
from .errors import EdgeRuntimeError
from .images import MAX_IMAGE_SIDE

# Peak memory of one forward, as a multiple of its float32 input: the widest activations of our families at
# stride 2-4 (e.g. 96 channels at 1/4 side = 2x the input) plus the preprocessing buffers, with a margin.
ACTIVATION_FACTOR = 32
MIN_CROP_PCT = 0.1  # smaller would resize the shorter side to over 10x the input size
MAX_METADATA_BYTES = 1 << 20  # our metadata is ~1 KB (a detector's 80 class names ~2 KB)
INTERPOLATION_NAMES = ("bicubic", "bilinear", "nearest", "lanczos")
TASKS = ("classification", "features", "detection")
RESIZES = ("crop", "letterbox")  # timm's resize + centre crop; Ultralytics' scale-to-fit + grey padding

Side = Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGE_SIDE)]
UnitMean = Annotated[float, msgspec.Meta(ge=0, le=1)]
UnitStd = Annotated[float, msgspec.Meta(gt=0, le=1)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]


class Nms(msgspec.Struct, forbid_unknown_fields=False):
    conf: Fraction = 0.25
    iou: Fraction = 0.45
    max_det: Annotated[int, msgspec.Meta(ge=1)] = 300


class ArtifactMeta(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """Field by field: docs/reference/runtime-checks.md. None means absent."""

    edgeport_version: Optional[str] = None
    model: Optional[str] = None
    family: Optional[str] = None
    architecture: Optional[str] = None
    task: Optional[Literal[TASKS]] = None
    input_name: Optional[str] = None
    input_shape: Optional[tuple[Annotated[int, msgspec.Meta(ge=-1)], Literal[3], Side, Side]] = None
    layout: Optional[Literal["NCHW"]] = None
    mean: Optional[tuple[UnitMean, UnitMean, UnitMean]] = None
    std: Optional[tuple[UnitStd, UnitStd, UnitStd]] = None
    crop_pct: Optional[Annotated[float, msgspec.Meta(ge=MIN_CROP_PCT, le=1)]] = None
    interpolation: Optional[Literal[INTERPOLATION_NAMES]] = None
    resize: Optional[Literal[RESIZES]] = None
    pad_value: Optional[Annotated[int, msgspec.Meta(ge=0, le=255)]] = None
    num_classes: Optional[Annotated[int, msgspec.Meta(ge=0)]] = None
    names: Optional[list[str]] = None
    labels: Optional[list[str]] = None
    output_names: Optional[Annotated[list[str], msgspec.Meta(min_length=1)]] = None
    box_format: Optional[Literal["xyxy"]] = None
    strides: Optional[list[Annotated[int, msgspec.Meta(ge=1)]]] = None
    nms: Optional[Nms] = None
    precision: Optional[str] = None
    weights_sha256: Optional[str] = None
    pconv: Optional[str] = None
    mlp: Optional[str] = None
    gelu: Optional[str] = None


# What each field must be, in the words of the one-line error (the schema above is the check).
EXPECTED = {
    "input_shape": f"[N, 3, H, W] integers with N -1 or >= 1 and H, W in 1..{MAX_IMAGE_SIDE}",
    "mean": "three values in [0, 1] (0..1-scaled pixels, e.g. ImageNet's [0.485, 0.456, 0.406])",
    "std": "three values in (0, 1] (0..1-scaled pixels, e.g. ImageNet's [0.229, 0.224, 0.225])",
    "crop_pct": f"a number in [{MIN_CROP_PCT}, 1] (timm: 0.875 to 1.0)",
    "interpolation": "one of " + ", ".join(INTERPOLATION_NAMES),
    "task": "one of " + ", ".join(TASKS),
    "resize": "one of " + ", ".join(RESIZES),
    "layout": "NCHW",
    "pad_value": "an integer grey level in 0..255",
    "num_classes": "a positive integer (0 for a features model)",
    "names": "a list of class names", "labels": "a list of class names",
    "output_names": "a non-empty list of output names",
    "box_format": "xyxy",
    "strides": "a list of positive integers",
    "nms": "{conf, iou in [0, 1], max_det >= 1}",
}


# What preprocessing and the output checks read: absent is allowed (require_metadata names it), null is not.
NOT_NULL = ("input_shape", "mean", "std", "crop_pct", "interpolation", "task", "resize", "layout", "pad_value",
            "num_classes", "output_names")


def memory_budget() -> int:
    """Bytes of physical memory (Linux/macOS sysconf); 8 GiB where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _bad(name: str, field: str, value, expected: str) -> EdgeRuntimeError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return EdgeRuntimeError(f"{name}: metadata {field} is {shown}, expected {expected}; re-export the model rather "
                            "than editing its metadata")


def check_metadata(meta: dict, name: str = "model") -> ArtifactMeta:
    """The metadata dict as an ArtifactMeta; EdgeRuntimeError naming the first field out of its bounds."""
    try:
        parsed = msgspec.convert(meta, ArtifactMeta)
    except msgspec.ValidationError as e:
        path = str(e).rsplit(" - at `$.", 1)
        field = path[1].split("[")[0].split(".")[0].rstrip("`") if len(path) == 2 else None
        if field in meta:
            raise _bad(name, field, meta[field], EXPECTED.get(field, f"another value ({path[0]})")) from None
        raise EdgeRuntimeError(f"{name}: metadata is not an edgeport metadata object ({e}); re-export the "
                               "model rather than editing its metadata") from None
    for field in NOT_NULL:
        if field in meta and meta[field] is None:
            raise _bad(name, field, None, EXPECTED[field])
    if parsed.input_shape:
        n, c, h, w = parsed.input_shape
        if n == 0:
            raise _bad(name, "input_shape", meta["input_shape"], EXPECTED["input_shape"])
        need, budget = max(n, 1) * c * h * w * 4 * ACTIVATION_FACTOR, memory_budget()
        if need > budget:
            raise _bad(name, "input_shape", meta["input_shape"], f"a size whose forward fits memory (needs "
                       f"~{need / 2**30:.0f} GiB; this machine has {budget / 2**30:.0f} GiB)")
    if parsed.task == "classification" and parsed.num_classes == 0:
        raise _bad(name, "num_classes", 0, EXPECTED["num_classes"])
    return parsed


def read_metadata(text: str | bytes, name: str = "model") -> dict:
    """The metadata embedded in a model file → a dict that passed ArtifactMeta ({} for files not exported by
    edgeport: no text, or text that is not a JSON object, such as MNN's default bizCode "MNNTest")."""
    if not text or text.lstrip()[:1] not in ("{", b"{"):
        return {}
    if len(text) > MAX_METADATA_BYTES:
        raise EdgeRuntimeError(f"{name}: metadata is {len(text)} bytes, over the {MAX_METADATA_BYTES} a model's "
                               "metadata may take; re-export the model")
    meta = decode_json(text, f"{name}: metadata", "re-export the model")
    if not isinstance(meta, dict):
        return {}
    check_metadata(meta, name)
    return meta
