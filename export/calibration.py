"""Calibration and held-out evaluation images for int8 quantisation, through the model's own preprocessing.

The bundled scikit-image photos (export.inputs) are split in two fixed halves: the *evaluation* half is what
the int8 gates judge, and is never used for calibration; the *calibration* half, augmented (random resized
crops, flips, colour jitter), calibrates when the user gives no --calib DIR. A user directory calibrates
instead of it, and the gates still judge the evaluation half, so calibration and evaluation share no image.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageEnhance

from models.errors import EdgeportError
from runtime.errors import EdgeRuntimeError
from runtime.images import load_image
from runtime.preprocess import preprocess

from .inputs import sample_images

MIN_RECOMMENDED = 300  # below this a user directory is accepted with a warning
DEFAULT_CALIB = 128  # augmented views of the bundled calibration half
DEFAULT_EVAL = 64  # views of the bundled evaluation half: its photos, then augmented views of them
_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def split_photos() -> tuple[list[tuple[str, Image.Image]], list[tuple[str, Image.Image]]]:
    """(calibration half, evaluation half) of the bundled photos: odd and even positions of the fixed list."""
    photos = sample_images()
    if len(photos) < 4:
        raise EdgeportError("scikit-image sample photographs not found; pip install scikit-image")
    return photos[1::2], photos[0::2]


def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random resized crop (8–100 % of the area, aspect 3:4–4:3), a horizontal flip half the time, and
    brightness / contrast / saturation jitter of ±30 %; the model's preprocessing follows."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((left, top, left + cw, top + ch))
            break
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.7, 1.3)))
    return img


def _views(photos, n: int, meta: dict, seed: int, originals: bool) -> np.ndarray:
    """n preprocessed views cycling over `photos`: the photos themselves first when `originals`, then
    augmented views."""
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        _, img = photos[i % len(photos)]
        if not (originals and i < len(photos)):
            img = augment(img, rng)
        arrays.append(preprocess(img, meta)[0])
    return np.stack(arrays).astype(np.float32)


CLASS_VIEWS = 8  # augmented views per bundled photo that the synthetic head's probe is fitted to


def class_views(meta: dict, n: int = CLASS_VIEWS, seed: int = 0) -> list[np.ndarray]:
    """One (n, 3, H, W) float32 batch of augmented views per bundled photo (every photo a class): what
    models.calibrate.fit_head trains a synthetic classifier's probe rows on (make_realistic's class_views).
    Only augmented views (never the photo itself), from their own random stream: no tensor equals a
    calibration or evaluation input."""
    rng = np.random.default_rng([2, seed])
    return [np.stack([preprocess(augment(img, rng), meta)[0] for _ in range(n)]).astype(np.float32)
            for _, img in sample_images()]


def evaluation_batch(meta: dict, n: int = DEFAULT_EVAL, seed: int = 1) -> np.ndarray:
    """(n, 3, H, W) float32 from the evaluation half only: the int8 gates are judged on these."""
    return _views(split_photos()[1], n, meta, seed, originals=True)


def image_files(calib_dir, option: str = "--calib") -> list[str]:
    """Every file under `calib_dir` (recursively, sorted) whose extension Pillow can open."""
    root = os.fspath(calib_dir)
    if not os.path.isdir(root):
        raise EdgeportError(f"{option} {root}: no such directory; give a folder of photos like the model will see")
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(parent, f) for f in sorted(files)
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in _EXTENSIONS)
    if not found:
        raise EdgeportError(f"{option} {root} holds no images; give a folder of JPEG/PNG photos like the model "
                            f"will see (or omit --calib to use the bundled sample photos)")
    return found


def calibration_batch(meta: dict, calib_dir=None, n: int | None = None, seed: int = 0,
                      option: str = "--calib") -> tuple[np.ndarray, dict]:
    """(calibration tensors (N, 3, H, W) float32, info) for the int8 quantisers.

    With `calib_dir`: up to `n` of its images (all when n is None; a seeded subset when there are more), each
    through the model's preprocessing; fewer than 300 is allowed with a warning. Without: `n` (default 128)
    augmented views of the bundled calibration half, which info marks as the weaker choice.
    info: {"source", "images", "samples", "augmented", "warnings": [...]}."""
    if calib_dir is None:
        photos, _ = split_photos()
        n = n or DEFAULT_CALIB
        x = _views(photos, n, meta, seed, originals=False)
        return x, {"source": "bundled sample photos (calibration half), augmented", "images": len(photos),
                   "samples": len(x), "augmented": True,
                   "warnings": [f"calibrated on {len(photos)} bundled sample photos with augmentation, not on "
                                f"images like the deployment's: weaker than --calib DIR with "
                                f"{MIN_RECOMMENDED}+ of your own images"]}
    files = image_files(calib_dir, option)
    if n is not None and len(files) > n:
        pick = np.random.default_rng(seed).choice(len(files), n, replace=False)
        files = [files[i] for i in sorted(pick)]
    arrays = []
    for path in files:
        try:
            arrays.append(preprocess(load_image(path), meta)[0])
        except EdgeRuntimeError as e:
            raise EdgeportError(f"{option}: {e}; remove or replace that file") from None
    warnings = []
    if len(files) < MIN_RECOMMENDED:
        warnings.append(f"--calib {os.fspath(calib_dir)} has {len(files)} images; {MIN_RECOMMENDED}+ "
                        f"representative images give steadier int8 scales")
    return np.stack(arrays).astype(np.float32), {
        "source": os.path.abspath(os.fspath(calib_dir)), "images": len(files), "samples": len(files),
        "augmented": False, "warnings": warnings}
