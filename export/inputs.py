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
    """(n_images + n_random, 3, H, W) float32: photos through `preprocess`, then N(0, 1) tensors.

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
    arrays.extend(rng.standard_normal(shape, dtype=np.float32))
    return np.stack(arrays).astype(np.float32)
