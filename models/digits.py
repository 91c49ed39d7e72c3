"""A trained model for the test suite: `fasternet_digits` on scikit-learn's `digits` (1797 8×8 greyscale images of
handwritten digits, 10 classes), trained deterministically on the CPU in about a minute.

The images are upscaled to 32×32 RGB PNGs in an ImageFolder tree (train/ and val/, one folder per class index,
a stratified split with a fixed seed) under a cache directory, and the network sees them through the runtime's
own preprocessing (runtime.preprocess from the model's config: resize/crop, mean/std), so the evaluation of an
exported file on val/ measures the same task the PyTorch model was trained on.

    python -m models.digits data  [--cache DIR]              # write the ImageFolder tree (idempotent)
    python -m models.digits train [--cache DIR] [--out FILE]  # data + training → safetensors checkpoint

The committed checkpoint is models/weights/fasternet_digits.safetensors (WEIGHTS). The images are not committed:
they are regenerated from sklearn, byte for byte, by `make_imagefolder`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from runtime.atomic import write_atomic
from runtime.images import load_image
from runtime.preprocess import preprocess

from ._registry import build_model, get_cfg
from .checkpoint import save_checkpoint

MODEL = "fasternet_digits"
ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = Path(__file__).resolve().parent / "weights" / f"{MODEL}.safetensors"
DEFAULT_CACHE = ROOT / ".cache" / "digits"
SIDE = 32           # each 8×8 digit is upscaled to SIDE×SIDE (bicubic)
VAL_FRACTION = 0.2  # stratified: 360 of the 1797 images
SPLIT_SEED = 0
TRAIN_SEED = 0
EPOCHS = 12
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 0.05
THREADS = 1  # one intra-op thread: the same float reduction order on every run (bit-reproducible training)
DONE = ".complete"  # written last: a tree without it is regenerated


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: per class, a seeded permutation with VAL_FRACTION of it held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * VAL_FRACTION))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(train), np.sort(val)


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One 8×8 digit (sklearn: 0..16, ink high) → SIDE×SIDE RGB, dark ink on white like a scanned page."""
    grey = (255 - np.round(pixels.reshape(8, 8) * (255 / 16))).astype(np.uint8)
    return Image.fromarray(grey, "L").resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB")


def make_imagefolder(cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """cache/{train,val}/<class index>/<sklearn index>.png for every digit; skipped when already complete."""
    cache = Path(cache)
    if (cache / DONE).is_file():
        return cache
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val = split_indices(digits.target)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = cache / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            png = io.BytesIO()
            digit_image(digits.data[i]).save(png, format="PNG")
            write_atomic(folder / f"{int(i):04d}.png", png.getvalue())  # concurrent test runs may share the cache
    write_atomic(cache / DONE, f"{len(train)} train, {len(val)} val\n")
    return cache


def runtime_meta(name: str = MODEL) -> dict:
    """The preprocessing metadata an export of `name` carries (what runtime.load(...).preprocess reads)."""
    cfg = get_cfg(name)
    return {"input_shape": [1, *cfg.input_size], "mean": list(cfg.mean), "std": list(cfg.std),
            "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}


def load_split(root: str | os.PathLike, meta: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images [N, 3, H, W] preprocessed as the runtime does, labels [N], paths) of an ImageFolder split whose
    folders are class indices, in sorted path order."""
    meta = meta or runtime_meta()
    root = Path(root)
    paths = sorted(str(p) for p in root.glob("*/*.png"))
    if not paths:
        raise FileNotFoundError(f"{root}: no */*.png images; run python -m models.digits data")
    x = np.concatenate([preprocess(load_image(p), meta) for p in paths])
    y = [int(Path(p).parent.name) for p in paths]
    return torch.from_numpy(x), torch.tensor(y), paths


def _deterministic():
    torch.manual_seed(TRAIN_SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def train(cache: str | os.PathLike = DEFAULT_CACHE, epochs: int = EPOCHS, log=print) -> nn.Module:
    """The trained fasternet_digits (eval mode): AdamW with a cosine schedule on the train split, fixed seeds,
    one thread, deterministic kernels; random shifts of up to 2 pixels as the only augmentation."""
    cache = make_imagefolder(cache)
    threads = torch.get_num_threads()
    _deterministic()
    try:
        x, y, _ = load_split(cache / "train")
        model = build_model(MODEL)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        steps = epochs * ((len(x) + BATCH - 1) // BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.15)
        gen = torch.Generator().manual_seed(TRAIN_SEED)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), BATCH):
                idx = order[start:start + BATCH]
                xb = _shift(x[idx], gen)
                loss = loss_fn(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}")
        return model.eval()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def _shift(xb: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Each image rolled by its own (dy, dx) in [-max_px, max_px], the vacated border filled with the image's
    corner value (the background)."""
    out = torch.empty_like(xb)
    shifts = torch.randint(-max_px, max_px + 1, (len(xb), 2), generator=gen).tolist()
    for i, (dy, dx) in enumerate(shifts):
        img = torch.roll(xb[i], (dy, dx), (1, 2))
        bg = xb[i, :, :1, :1]
        if dy > 0:
            img[:, :dy] = bg
        elif dy < 0:
            img[:, dy:] = bg
        if dx > 0:
            img[:, :, :dx] = bg
        elif dx < 0:
            img[:, :, dx:] = bg
        out[i] = img
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Top-1 class of each image (eval mode)."""
    model.eval()
    return torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.digits", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("data", "train"))
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"ImageFolder root (default {DEFAULT_CACHE})")
    p.add_argument("--out", default=str(WEIGHTS), help=f"checkpoint to write (default {WEIGHTS})")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    args = p.parse_args(argv)
    cache = make_imagefolder(args.cache)
    print(f"data: {cache}/train, {cache}/val")
    if args.command == "train":
        model = train(cache, args.epochs, log=lambda s: print(s, file=sys.stderr, flush=True))
        x, y, _ = load_split(cache / "val")
        correct = int((predict(model, x) == y).sum())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, args.out)
        print(f"val top-1 {correct}/{len(y)} = {correct / len(y):.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
