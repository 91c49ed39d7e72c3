"""YOLO11 detectors: architecture vs Ultralytics' published counts, decode, inference forms, and Ultralytics
checkpoints read by the restricted unpickler (no Ultralytics installed)."""
import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import models
from models.calibrate import calibrate_bn, randomize_affine
from models.errors import EdgeportError
from models.inference import to_inference
from models.ultralytics_ckpt import is_ultralytics_checkpoint, read_ultralytics
from models.yolo11 import YOLO11, YOLO11_YAML, load_ultralytics


@pytest.fixture(scope="module")
def yolo11n():
    torch.manual_seed(0)
    return models.create_model("yolo11n").eval()


@pytest.fixture(scope="module")
def realistic(yolo11n):
    """Random affines and BN statistics measured on 8 inputs: every BN does something to fold."""
    g = torch.Generator().manual_seed(1)
    return calibrate_bn(randomize_affine(yolo11n, seed=0), [torch.rand(8, 3, 96, 96, generator=g)])


def test_parameter_counts_match_ultralytics_yaml_summary():
    # Ultralytics' yolo11.yaml: n 2,624,080, s 9,458,752 parameters (nc=80); m forces C3k blocks.
    counts = {s: sum(p.numel() for p in YOLO11(scale=s).parameters()) for s in ("n", "s", "m")}
    assert counts == {"n": 2_624_080, "s": 9_458_752, "m": 20_114_688}


def test_state_dict_names_are_ultralytics(yolo11n):
    keys = yolo11n.state_dict().keys()
    for k in ("model.0.conv.weight", "model.0.bn.running_var", "model.2.m.0.cv1.conv.weight",
              "model.10.m.0.attn.qkv.conv.weight", "model.23.cv2.0.0.conv.weight", "model.23.cv3.2.0.0.bn.bias",
              "model.23.cv2.2.2.bias", "model.23.dfl.conv.weight"):
        assert k in keys, k
    assert yolo11n.model[0].bn.eps == 1e-3  # Ultralytics' BN eps; checkpoints do not carry it


def test_outputs_non_square_anchor_order_and_strides(yolo11n):
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        boxes, scores = yolo11n(x)
    assert yolo11n.model[-1].stride == (8.0, 16.0, 32.0)
    assert boxes.shape == (1, 12 * 16 + 6 * 8 + 3 * 4, 4) and scores.shape == (1, 252, 80)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1


def test_decode_matches_a_hand_decode(realistic):
    head = realistic.model[-1]
    feats = []
    hook = head.register_forward_hook(lambda m, args, out: feats.extend(args[0]))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        boxes, scores = realistic(x)
        hook.remove()
        raw = [(head.cv2[i](f)[0].numpy(), head.cv3[i](f)[0].numpy()) for i, f in enumerate(feats)]
    a = 0
    for (box, cls), stride in zip(raw, (8, 16, 32)):
        _, h, w = box.shape
        for gy in range(h):
            for gx in range(w):  # row-major within a level, levels P3, P4, P5
                logits = box[:, gy, gx].reshape(4, 16).astype(np.float64)
                p = np.exp(logits - logits.max(1, keepdims=True))
                dist = (p / p.sum(1, keepdims=True)) @ np.arange(16)
                cx, cy = gx + 0.5, gy + 0.5
                want = np.array([cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]]) * stride
                np.testing.assert_allclose(boxes[0, a].numpy(), want, rtol=1e-5, atol=1e-3)
                np.testing.assert_allclose(scores[0, a].numpy(), 1 / (1 + np.exp(-cls[:, gy, gx])), rtol=1e-5,
                                           atol=1e-7)
                a += 1
    assert a == boxes.shape[1]


def test_to_inference_folds_every_batchnorm_and_keeps_outputs(realistic):
    fast = to_inference(realistic, pconv="split_cat", mlp="conv")
    assert fast.inference_info["batchnorms_left"] == 0
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))[:1]
    with torch.no_grad():
        (b0, s0), (b1, s1) = realistic(x), fast(x)
    assert float((b0 - b1).abs().max()) < 1e-2 and float((s0 - s1).abs().max()) < 1e-4


def test_zoo_backbone_variant_takes_p3_p4_p5_from_the_backbone():
    m = models.create_model("yolo11n_fasternet_t0").eval()
    assert type(m.model[0]).__name__ == "FasterNet" and m.multi_out[0]
    assert m.model[-1].stride == (8.0, 16.0, 32.0)
    assert any(type(x).__name__ == "PartialConv" for x in m.modules())
    with torch.no_grad():
        boxes, scores = m(torch.rand(1, 3, 64, 64))
    assert boxes.shape == (1, 84, 4) and scores.shape == (1, 84, 80)


def test_bad_yaml_and_options_are_one_line_errors():
    cfg = copy.deepcopy(YOLO11_YAML)
    cfg["backbone"][3] = [-1, 1, "FancyConv", [256, 3, 2]]
    with pytest.raises(EdgeportError, match="layer 3: unknown block 'FancyConv'"):
        YOLO11(cfg)
    with pytest.raises(EdgeportError, match="no features-only form"):
        models.create_model("yolo11n", features_only=True)
    with pytest.raises(EdgeportError, match="no scale 'q'"):
        YOLO11(scale="q")


# --- realistic random weights ----------------------------------------------------------------------------

def _dfl_logits(model, x) -> torch.Tensor:
    """The box branch's DFL logits [N, 4 sides, 16 bins, A] over every level."""
    head, logits = model.model[-1], []
    hooks = [seq[-1].register_forward_hook(lambda m, a, out: logits.append(out.flatten(2))) for seq in head.cv2]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return torch.cat(logits, 2).double().unflatten(1, (4, head.reg_max))


def _modes(logits: torch.Tensor) -> torch.Tensor:
    """Local maxima of each side's bin distribution [N, 4, A] (a plateau of equal bins counts once)."""
    d = torch.diff(logits.softmax(2), dim=2).sign()
    d = torch.cat([torch.ones_like(d[:, :, :1]), d, -torch.ones_like(d[:, :, :1])], 2)
    rising = d > 0
    return (rising[:, :, :-1] & (d[:, :, 1:] < 0)).sum(2)


@pytest.fixture(scope="module")
def calibrated_detector():
    from models.yolo11 import make_realistic_detector

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 128, 128, generator=g)
    return make_realistic_detector(models.create_model("yolo11n"), [x], seed=0, side_bins=(4.0, 0.5),
                                   dfl_sigma=0.8), x


def test_calibrated_dfl_is_unimodal_and_its_expectation_tracks_t(calibrated_detector):
    model, x = calibrated_detector
    logits = _dfl_logits(model, x)
    assert bool((_modes(logits) == 1).all())  # a trained DFL's mass sits on the bins around the distance
    sigma, k = 0.8, torch.arange(16, dtype=torch.float64)[None, None, :, None]
    t = sigma ** 2 * (logits[:, :, 1] - logits[:, :, 0]) + 0.5  # logit_k − logit_0 = (k·t − k²/2)/σ²
    gauss = (-(k - t[:, :, None]) ** 2 / (2 * sigma ** 2)).softmax(2)
    assert float((logits.softmax(2) - gauss).abs().max()) < 1e-4  # float32 logits
    inside = (t > 1) & (t < 14)  # away from the ends, where the Gaussian is cut off
    expectation = (logits.softmax(2) * k).sum(2)
    assert float((expectation - t)[inside].abs().max()) < 0.05 and float(inside.double().mean()) > 0.8
    assert abs(float(t.mean()) - 4.0) < 1e-3 and float(t.min()) >= 0.5 - 1e-4  # side_bins: mean, floor
    assert float(t.std()) > 0.5  # boxes of varied sizes
    noise = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3)) * 4 - 2  # far off the photos
    assert float((sigma ** 2 * (_dfl_logits(model, noise).diff(dim=2)[:, :, 0]) + 0.5).min()) >= 0.5 - 1e-4


def test_unimodality_check_catches_random_dfl_logits(calibrated_detector):
    model, x = calibrated_detector
    noisy = copy.deepcopy(model)
    for seq in noisy.model[-1].cv2:  # the former construction: random rows scaled to std-3 logits
        torch.nn.init.normal_(seq[-1].weight, std=0.3)
    assert float((_modes(_dfl_logits(noisy, x)) > 1).double().mean()) > 0.3


def test_calibrated_detector_scores_some_candidates(calibrated_detector):
    model, x = calibrated_detector
    with torch.no_grad():
        boxes, scores = model(x)
    best = scores.amax(-1)
    assert int((best > 0.25).sum(1).max()) == 100  # the busiest image: `candidates` above conf
    assert float(best.max()) < 1.0 and bool(torch.isfinite(boxes).all())


# --- checkpoints -----------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", ["system", "eval"])
def test_foreign_pickle_is_refused_before_anything_runs(tmp_path, call):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if call == "system" else f"open({str(marker)!r}, 'w').close()"
    fn = os.system if call == "system" else eval
    path = tmp_path / "evil.pt"
    torch.save({"ema": _Evil(fn, payload)}, path)
    qual = "posix.system" if call == "system" else "builtins.eval"
    with pytest.raises(EdgeportError, match=f"refused.*'{qual}'") as err:
        load_ultralytics(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


# Our classes → the Ultralytics classes a real checkpoint pickles (torch.nn layers pickle as themselves).
_ULTRALYTICS_NAMES = {
    "ConvNormAct": ("ultralytics.nn.modules.conv", "Conv"), "Concat": ("ultralytics.nn.modules.conv", "Concat"),
    "Detect": ("ultralytics.nn.modules.head", "Detect"), "YOLO11": ("ultralytics.nn.tasks", "DetectionModel"),
    **{n: ("ultralytics.nn.modules.block", n)
       for n in ("Bottleneck", "C3k", "C3k2", "SPPF", "C2PSA", "PSABlock", "Attention", "DFL")},
}


@pytest.fixture
def fake_ultralytics(monkeypatch):
    """Empty stand-ins for Ultralytics' modules, so pickle can name Ultralytics' classes when saving."""
    classes = {}
    for our, (module, name) in _ULTRALYTICS_NAMES.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod not in sys.modules:
                monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
        cls = type(name, (), {"__module__": module})
        setattr(sys.modules[module], name, cls)
        classes[our] = cls
    return classes


def _save_like_ultralytics_trainer(model, path, classes):
    """torch.save of the trainer's dict, with our modules pickled under Ultralytics' class names."""
    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            cls = classes.get(type(obj).__name__)
            if cls is None or not isinstance(obj, torch.nn.Module):
                return NotImplemented
            return cls, (), dict(obj.__dict__)

    pickle_module = types.SimpleNamespace(Pickler=Pickler, __name__="pickle")
    ema = copy.deepcopy(model).half()
    ema.names = {i: f"class{i}" for i in range(model.nc)}
    ema.stride = torch.tensor([8.0, 16.0, 32.0])
    ckpt = {"epoch": 3, "model": None, "ema": ema, "updates": 10, "train_args": {"task": "detect", "imgsz": 320},
            "date": "2026-01-01T00:00:00", "version": "8.4.190", "license": "AGPL-3.0"}
    torch.save(ckpt, path, pickle_module=pickle_module)


def test_loads_a_synthetic_ultralytics_checkpoint_strictly(realistic, tmp_path, fake_ultralytics, monkeypatch):
    path = tmp_path / "last.pt"
    _save_like_ultralytics_trainer(realistic, path, fake_ultralytics)
    for name in [m for m in sys.modules if m.startswith("ultralytics")]:
        monkeypatch.delitem(sys.modules, name)  # the loader must not need them
    assert is_ultralytics_checkpoint(path)
    model, info = load_ultralytics(path)
    assert info["weights"] == "ema" and info["dtype"] == "float16" and info["names"][:2] == ["class0", "class1"]
    assert model.default_cfg["input_size"] == (3, 320, 320) and model.default_cfg["extra"]["names"][0] == "class0"
    assert all(t.dtype != torch.float16 for t in model.state_dict().values())
    want = copy.deepcopy(realistic).half().float()  # what the trainer saved: fp16-rounded weights
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), want(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    sd, yaml_cfg, _ = read_ultralytics(path)
    assert yaml_cfg["scale"] == "n" and set(sd) == set(realistic.state_dict())


def test_checkpoint_that_does_not_fit_its_yaml_is_refused(realistic, tmp_path, fake_ultralytics):
    broken = copy.deepcopy(realistic)
    del broken.model[-1].dfl  # a missing tensor
    path = tmp_path / "broken.pt"
    _save_like_ultralytics_trainer(broken, path, fake_ultralytics)
    with pytest.raises(EdgeportError, match="missing: model.23.dfl.conv.weight"):
        load_ultralytics(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    assert not is_ultralytics_checkpoint(path)
    with pytest.raises(EdgeportError, match="not a readable PyTorch checkpoint"):
        load_ultralytics(path)
