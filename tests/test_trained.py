"""The trained model of the suite: fasternet_digits on scikit-learn's digits (models.digits). The committed
checkpoint is what `make test` uses; `make test-slow` retrains it and checks that training reproduces it."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models import digits

MIN_VAL_TOP1 = 0.95  # the committed checkpoint: 351/359 = 0.9777 (README / docs/guides/accuracy.md)
# Retraining on another CPU (other SIMD widths change float reduction order) may not be bit-identical; the
# checkpoint must then still classify the val split within this many points of the committed one.
RETRAIN_TOLERANCE_POINTS = 1.0


@pytest.fixture(scope="module")
def data():
    return digits.make_imagefolder()


@pytest.fixture(scope="module")
def trained():
    return models.create_model(digits.MODEL, weights=str(digits.WEIGHTS)).eval()


def val_top1(model, root) -> tuple[int, int]:
    x, y, _ = digits.load_split(root / "val")
    return int((digits.predict(model, x) == y).sum()), len(y)


def test_split_is_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, val = digits.split_indices(labels)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    share = np.bincount(labels[val], minlength=10) / np.bincount(labels, minlength=10)
    assert np.allclose(share, digits.VAL_FRACTION, atol=0.01)


def test_imagefolder_images_are_the_sklearn_digits(data):
    from sklearn.datasets import load_digits

    d = load_digits()
    path = next((data / "val" / "7").glob("*.png"))
    img = Image.open(path)
    assert img.size == (digits.SIDE, digits.SIDE) and img.mode == "RGB"
    index = int(path.stem)
    assert d.target[index] == 7
    assert np.array_equal(np.asarray(img), np.asarray(digits.digit_image(d.data[index])))
    n_val = sum(1 for _ in (data / "val").glob("*/*.png"))
    assert n_val == len(digits.split_indices(d.target)[1])


def test_committed_checkpoint_is_small_and_accurate(trained, data):
    assert digits.WEIGHTS.stat().st_size < 400_000
    correct, n = val_top1(trained, data)
    assert correct / n >= MIN_VAL_TOP1, f"val top-1 {correct}/{n}"


def test_untrained_model_is_not_accurate(data):
    """The accuracy check above can fail: the same network with fresh weights is near chance."""
    torch.manual_seed(0)
    correct, n = val_top1(models.create_model(digits.MODEL).eval(), data)
    assert correct / n < 0.5


@pytest.mark.slow
def test_training_reproduces_the_committed_checkpoint(data, tmp_path):
    """Bit-identical on the machine that trained it (measured: two runs, byte-equal files); elsewhere the same
    accuracy within RETRAIN_TOLERANCE_POINTS."""
    model = digits.train(data, log=lambda s: None)
    committed = models.read_state_dict(str(digits.WEIGHTS))
    retrained = model.state_dict()
    identical = committed.keys() == retrained.keys() and all(torch.equal(committed[k], retrained[k])
                                                              for k in committed)
    if not identical:
        ref = models.create_model(digits.MODEL, weights=str(digits.WEIGHTS)).eval()
        (a, n), (b, _) = val_top1(model, data), val_top1(ref, data)
        assert abs(a - b) / n * 100 <= RETRAIN_TOLERANCE_POINTS, f"retrained {a}/{n}, committed {b}/{n}"
        warnings.warn(f"retrained weights differ bitwise from the committed ones (another CPU?); val top-1 "
                    f"{a}/{n} vs {b}/{n}, within {RETRAIN_TOLERANCE_POINTS} point", stacklevel=2)
