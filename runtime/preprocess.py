"""Image preprocessing from an artifact's metadata (numpy + Pillow only): the exact transform the parity
suite feeds PyTorch, so what runs on the board is what was validated."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import EdgeRuntimeError
from .images import MAX_IMAGE_SIDE, to_rgb

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
TASKS = ("classification", "features", "detection")
RESIZES = ("crop", "letterbox")  # timm's resize + centre crop; Ultralytics' scale-to-fit + grey padding
# Peak memory of one forward, as a multiple of its float32 input: the widest activations of our families at
# stride 2-4 (e.g. 96 channels at 1/4 side = 2x the input) plus the preprocessing buffers, with a margin.
ACTIVATION_FACTOR = 32
PAD_VALUE = 114  # Ultralytics' letterbox grey
MIN_CROP_PCT = 0.1  # smaller would resize the shorter side to over 10x the input size


def memory_budget() -> int:
    """Bytes of physical memory (Linux/macOS sysconf); 8 GiB where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _numbers(value, n: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return [float(v) for v in value]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_metadata(meta: dict, name: str = "model") -> None:
    """EdgeRuntimeError naming the first out-of-bounds field of an artifact's metadata (hand-edited or corrupt);
    absent fields are left to require_metadata."""
    def bad(field, expected):
        raise EdgeRuntimeError(f"{name}: metadata {field} is {meta[field]!r}, expected {expected}; re-export the "
                               "model rather than editing its metadata")

    shape = meta.get("input_shape")
    if "input_shape" in meta:
        if not isinstance(shape, (list, tuple)) or len(shape) != 4 or not all(map(_is_int, shape)):
            bad("input_shape", "[N, 3, H, W] integers")
        n, c, h, w = shape
        if c != 3 or not (n == -1 or n >= 1) or not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
            bad("input_shape", f"[N, 3, H, W] with N -1 or >= 1 and H, W in 1..{MAX_IMAGE_SIDE}")
        need, budget = max(n, 1) * c * h * w * 4 * ACTIVATION_FACTOR, memory_budget()
        if need > budget:
            bad("input_shape", f"a size whose forward fits memory (needs ~{need / 2**30:.0f} GiB; this machine "
                f"has {budget / 2**30:.0f} GiB)")
    if "mean" in meta and not all(0 <= m <= 1 for m in _numbers(meta["mean"], 3) or [-1]):
        bad("mean", "three values in [0, 1] (0..1-scaled pixels, e.g. ImageNet's [0.485, 0.456, 0.406])")
    if "std" in meta and not all(0 < v <= 1 for v in _numbers(meta["std"], 3) or [0]):
        bad("std", "three values in (0, 1] (0..1-scaled pixels, e.g. ImageNet's [0.229, 0.224, 0.225])")
    crop = meta.get("crop_pct")
    if "crop_pct" in meta and not (_numbers([crop], 1) and MIN_CROP_PCT <= crop <= 1):
        bad("crop_pct", f"a number in [{MIN_CROP_PCT}, 1] (timm: 0.875 to 1.0)")
    if "interpolation" in meta and meta["interpolation"] not in INTERPOLATIONS:
        bad("interpolation", "one of " + ", ".join(INTERPOLATIONS))
    if "task" in meta and meta["task"] not in TASKS:
        bad("task", "one of " + ", ".join(TASKS))
    if "resize" in meta and meta["resize"] not in RESIZES:
        bad("resize", "one of " + ", ".join(RESIZES))
    pad = meta.get("pad_value")
    if "pad_value" in meta and not (_is_int(pad) and 0 <= pad <= 255):
        bad("pad_value", "an integer grey level in 0..255")
    k = meta.get("num_classes")
    if "num_classes" in meta and not (_is_int(k) and k >= (1 if meta.get("task") == "classification" else 0)):
        bad("num_classes", "a positive integer (0 for a features model)")


MAX_RESIZED_PIXELS = 64_000_000


def resize_crop(img: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str) -> Image.Image:
    """timm's eval transform geometry: resize the shorter side to size/crop_pct, then centre-crop `size`."""
    th, tw = size
    scale = math.floor(min(th, tw) / crop_pct)
    w, h = img.size
    if w <= h:
        new_w, new_h = scale, int(scale * h / w)
    else:
        new_w, new_h = int(scale * w / h), scale
    if new_w * new_h > MAX_RESIZED_PIXELS:  # a 20000×2 strip would become ~655 MP (gigabytes) before the crop
        raise EdgeRuntimeError(f"image {w}×{h} is too elongated for this model's resize ({new_w}×{new_h} before the "
                               "centre crop); crop it closer to the model's aspect ratio first")
    img = img.resize((new_w, new_h), INTERPOLATIONS[interpolation])
    left, top = int(round((new_w - tw) / 2.0)), int(round((new_h - th) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def normalize(img: Image.Image, mean, std) -> np.ndarray:
    """RGB image → float32 CHW, scaled to [0, 1] and normalised."""
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img: Image.Image, meta: dict) -> np.ndarray:
    """A PIL image (any mode; see images.to_rgb) → (1, 3, H, W) float32 per the metadata's input_shape,
    mean, std, crop_pct and interpolation (or, with resize "letterbox", a detector's letterbox)."""
    check_metadata(meta)
    h, w = meta["input_shape"][-2:]
    if meta.get("resize") == "letterbox":
        return letterbox(to_rgb(img), (h, w), meta.get("pad_value", PAD_VALUE), meta["mean"], meta["std"])[0]
    img = resize_crop(to_rgb(img), (h, w), meta["crop_pct"], meta["interpolation"])
    return normalize(img, meta["mean"], meta["std"])[None]


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits in the network input: input = original · scale + (left, top)."""

    scale: float
    left: int
    top: int
    width: int  # original size
    height: int


def letterbox(img: Image.Image, size: tuple[int, int], pad_value: int = PAD_VALUE, mean=(0.0, 0.0, 0.0),
              std=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, Letterbox]:
    """RGB image → ([1, 3, H, W] float32 in 0..1 (then (x - mean) / std), placement).

    Ultralytics' convention: scale to fit (up or down) keeping the aspect ratio, round the scaled size, centre it,
    pad with grey; Ultralytics splits an odd padding as round(d/2 ∓ 0.1), as here. Resampling is Pillow's bilinear
    (Ultralytics uses OpenCV's, which does not antialias when shrinking)."""
    th, tw = size
    w, h = img.size
    r = min(th / h, tw / w)
    nw, nh = int(round(w * r)), int(round(h * r))
    dw, dh = (tw - nw) / 2, (th - nh) / 2
    left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    canvas = Image.new("RGB", (tw, th), (pad_value,) * 3)
    canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR) if (nw, nh) != (w, h) else img, (left, top))
    x = np.asarray(canvas, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None], Letterbox(r, left, top, w, h)
