"""Image preprocessing from an artifact's metadata (numpy + Pillow only): the exact transform the parity
suite feeds PyTorch, so what runs on the board is what was validated."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import EdgeRuntimeError
from .images import to_rgb
from .metadata import check_metadata

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
PAD_VALUE = 114  # Ultralytics' letterbox grey
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
