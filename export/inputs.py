"""Realistic inputs for calibration and parity: photographs bundled with scikit-image (no downloads) through
the model's own preprocessing, plus seeded random tensors."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from runtime.preprocess import preprocess

# Colour photographs shipped inside the scikit-image wheel.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "ihc.png", "color.png", "brick.png", "grass.png", "gravel.png", "camera.png", "coins.png",
          "moon.png", "page.png", "text.png", "horse.png", "cell.png", "logo.png")


def _data_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def sample_images() -> list[tuple[str, Image.Image]]:
    d = _data_dir()
    out = []
    for name in PHOTOS:
        path = os.path.join(d, name)
        if os.path.exists(path):
            with Image.open(path) as im:
                out.append((name, im.convert("RGB")))
    return out


def sample_batch(meta: dict, n_images: int = 16, n_random: int = 4, seed: int = 0) -> np.ndarray:
    """(n_images + n_random, 3, H, W) float32: photos through `preprocess`, then N(0, 1) tensors (for a
    detector, random mosaics: see _mosaics).

    With more requested photos than are bundled, mirrored copies fill the rest."""
    photos = sample_images()
    if not photos:
        raise RuntimeError("scikit-image sample photographs not found; install scikit-image")
    arrays = []
    for i in range(n_images):
        name, img = photos[i % len(photos)]
        if (i // len(photos)) % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arrays.append(preprocess(img, meta)[0])
    rng = np.random.default_rng(seed)
    shape = (n_random, 3, *meta["input_shape"][-2:])
    if meta.get("task") == "detection":
        arrays.extend(_mosaics(rng, shape, meta))
    else:
        arrays.extend(rng.standard_normal(shape, dtype=np.float32))
    return np.stack(arrays).astype(np.float32)


def _mosaics(rng, shape, meta: dict, block: int = 32) -> np.ndarray:
    """Random-colour 32-pixel tiles in the detector's input range: per-pixel noise makes a detector fire on
    every anchor (yolo11n_fasternet_t0 at 320²: 2100 of 2100 above conf 0.25), and max_det then cuts through
    near-tied scores; tiles have edges and flat regions, like a scene."""
    n, c, h, w = shape
    tiles = rng.random((n, c, -(-h // block), -(-w // block)), dtype=np.float32)
    x = tiles.repeat(block, 2).repeat(block, 3)[:, :, :h, :w]
    mean, std = (np.asarray(meta[k], np.float32)[:, None, None] for k in ("mean", "std"))
    return (x - mean) / std
