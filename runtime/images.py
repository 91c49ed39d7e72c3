"""Reading images safely: any Pillow mode to RGB, EXIF orientation applied, decompression bombs refused."""
from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from .console import last_words, stderr_silenced
from .errors import EdgeRuntimeError

# Refused before decoding. 64 MP covers camera photos; a 50,000-pixel-wide strip is refused by the side limit,
# because the shorter-side resize would blow it up to a gigapixel.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_SIDE = 20_000

def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def check_size(size: tuple[int, int], name: str = "image") -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise EdgeRuntimeError(f"{name}: image is empty ({w}x{h} pixels)")
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise EdgeRuntimeError(
            f"{name}: image is {w}x{h} pixels, over the limit ({MAX_IMAGE_SIDE} px a side, "
            f"{MAX_IMAGE_PIXELS // 1_000_000} MP); downscale it first")


# Full scales tried in order for float ("F") images: [0, 1] floats, 8-bit and 16-bit samples stored as floats.
FLOAT_FULL_SCALES = (1.0, 255.0, 65535.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; alpha is dropped as timm / torchvision loaders do, so inputs match what the
    models saw. Pillow's own convert clips wider samples to 255; we rescale them instead (scale_samples):
    16-bit ("I;16*") by 255/65535, 32-bit "I" the same when its samples fit 16 bits, float "F" by the smallest
    full scale holding all its samples (1, 255 or 65535); other ranges (negative values) are min-max stretched."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        return _grey(scale_samples(np.asarray(img), (65535.0,)))
    if img.mode in ("I", "F"):
        return _grey(scale_samples(np.asarray(img), FLOAT_FULL_SCALES if img.mode == "F" else (65535.0,)))
    if img.mode == "P":  # via RGBA so palette transparency does not raise Pillow's warning
        img = img.convert("RGBA")
    return img.convert("RGB")


def scale_samples(x: np.ndarray, full_scales=FLOAT_FULL_SCALES) -> np.ndarray:
    """Greyscale samples → uint8: [0, s] → 0..255 for the first full scale s holding them all, else min → 0 and
    max → 255. NaN/Inf samples raise EdgeRuntimeError."""
    x = x.astype(np.float64)
    if x.size and not np.isfinite(x).all():
        raise EdgeRuntimeError("image has NaN/Inf pixel values; fix or re-save the image")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    scale = next((s for s in full_scales if lo >= 0 and hi <= s), None)
    if scale is None:
        x, scale = x - lo, (hi - lo) or 1.0
    return np.floor(x * (255.0 / scale) + 0.5).astype(np.uint8)


def _grey(x: np.ndarray) -> Image.Image:
    return Image.fromarray(x, "L").convert("RGB")


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """A path or PIL image → RGB PIL image, upright per its EXIF orientation; EdgeRuntimeError if bad."""
    if isinstance(source, Image.Image):
        return _decode(source, "image")
    name = os.fspath(source)
    if not os.path.isfile(name):
        raise EdgeRuntimeError(f"{name}: no such image file")
    with _decoder_quiet():
        try:
            img = Image.open(name)
        except Image.DecompressionBombError:
            raise EdgeRuntimeError(f"{name}: image is over the size limit; downscale it first") from None
        except Image.UnidentifiedImageError:
            raise EdgeRuntimeError(f"{name}: not an image Pillow can read") from None
        except MemoryError:
            raise
        except Exception as e:  # Pillow's plugins raise OSError, ValueError, SyntaxError, EOFError, struct.error
            # and more on damaged files (a TIFF tag of another type: TypeError; tests/test_fuzz_runtime.py)
            raise EdgeRuntimeError(f"{name}: cannot read image ({_reason(e)})") from None
        with img:
            return _decode(img, name)


@contextlib.contextmanager
def _decoder_quiet(printed: list | None = None):
    """Decoding with libtiff's and libjpeg's own stderr lines (appended to `printed`) and Pillow's warnings
    (corrupt EXIF, our own size limits' bomb warning) kept off the console: a bad file is reported once, by our
    error."""
    with warnings.catch_warnings(), stderr_silenced(printed):
        warnings.simplefilter("ignore")
        yield


def _decode(img: Image.Image, name: str) -> Image.Image:
    check_size(img.size, name)  # from the header: nothing decoded yet
    printed = []
    try:
        with _decoder_quiet(printed):
            return to_rgb(ImageOps.exif_transpose(img))
    except EdgeRuntimeError as e:
        raise EdgeRuntimeError(f"{name}: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # as in load_image: any error of Pillow's on a damaged file
        said = last_words("".join(printed))
        raise EdgeRuntimeError(f"{name}: cannot decode image: {_reason(e)}"
                               + (f" (decoder: {said})" if said else "")) from None
