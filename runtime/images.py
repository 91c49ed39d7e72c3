"""Reading images safely: any Pillow mode to RGB, EXIF orientation applied, decompression bombs refused."""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from .errors import EdgeRuntimeError

# Refused before decoding. 64 MP covers camera photos; a 50,000-pixel-wide strip is refused by the side limit,
# because the shorter-side resize would blow it up to a gigapixel.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_SIDE = 20_000

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def check_size(size: tuple[int, int], name: str = "image") -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise EdgeRuntimeError(f"{name}: image is empty ({w}x{h} pixels)")
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise EdgeRuntimeError(
            f"{name}: image is {w}x{h} pixels, over the limit ({MAX_IMAGE_SIDE} px a side, "
            f"{MAX_IMAGE_PIXELS // 1_000_000} MP); downscale it first")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. 16-bit greyscale is rescaled (65535 → 255), not clipped as Pillow's
    convert does; alpha is dropped as timm / torchvision loaders do, so inputs match what the models saw."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N and 32-bit I holding 16-bit samples
        x = np.asarray(img).astype(np.int64)
        x = (np.clip(x, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(x.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":  # via RGBA so palette transparency does not raise Pillow's warning
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """A path or PIL image → RGB PIL image, upright per its EXIF orientation; EdgeRuntimeError if bad."""
    if isinstance(source, Image.Image):
        return _decode(source, "image")
    name = os.fspath(source)
    if not os.path.isfile(name):
        raise EdgeRuntimeError(f"{name}: no such image file")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: we refuse such images ourselves
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(name)
    except Image.DecompressionBombError:
        raise EdgeRuntimeError(f"{name}: image is over the size limit; downscale it first") from None
    except Image.UnidentifiedImageError:
        raise EdgeRuntimeError(f"{name}: not an image Pillow can read") from None
    except _DECODE_ERRORS as e:
        raise EdgeRuntimeError(f"{name}: cannot read image ({e})") from None
    with img:
        return _decode(img, name)


def _decode(img: Image.Image, name: str) -> Image.Image:
    check_size(img.size, name)  # from the header: nothing decoded yet
    try:
        return to_rgb(ImageOps.exif_transpose(img))
    except _DECODE_ERRORS as e:
        raise EdgeRuntimeError(f"{name}: cannot decode image: {e}") from None
