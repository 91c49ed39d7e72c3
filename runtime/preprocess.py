"""Image preprocessing from an artifact's metadata (numpy + Pillow only): the exact transform the parity
suite feeds PyTorch, so what runs on the board is what was validated."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .images import to_rgb

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_crop(img: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str) -> Image.Image:
    """timm's eval transform geometry: resize the shorter side to size/crop_pct, then centre-crop `size`."""
    th, tw = size
    scale = math.floor(min(th, tw) / crop_pct)
    w, h = img.size
    if w <= h:
        new_w, new_h = scale, int(scale * h / w)
    else:
        new_w, new_h = int(scale * w / h), scale
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
    mean, std, crop_pct and interpolation."""
    h, w = meta["input_shape"][-2:]
    img = resize_crop(to_rgb(img), (h, w), meta["crop_pct"], meta["interpolation"])
    return normalize(img, meta["mean"], meta["std"])[None]
