"""Full int8: the gates catch a bad calibration, the fallback rescues a model the gates reject, the files hold
integer compute, and bad --calib directories fail with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from export import calibration, quantize, targets
from export.parity import judge
from models.errors import EdgeportError
from models.metrics import check_gates

META = {"input_shape": [1, 3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "crop_pct": 0.875, "interpolation": "bicubic"}


def tiny_net(outlier: float = 1.0) -> nn.Module:
    """Conv-ReLU-Conv-ReLU-Conv-pool-Linear. `outlier` scales one channel of the second conv's output up and
    the third conv's matching weights down: same float function, but one per-tensor activation scale must
    cover both the outlier channel and seven small ones (int8 flattens the small ones)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        net[2].weight[0] *= outlier
        net[2].bias[0] *= outlier
        net[4].weight[:, 0] /= outlier
    return net


def to_onnx(net: nn.Module, path):
    import onnx

    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=False, opset_version=17)
    return onnx.load(str(path))


def run(model_or_path, x: np.ndarray, tmp_path) -> dict:
    import onnx

    from runtime.engines import MnnEngine, OrtEngine, stdout_silenced

    path = model_or_path
    if not isinstance(model_or_path, (str, bytes)) and hasattr(model_or_path, "graph"):
        path = str(tmp_path / "run.onnx")
        onnx.save(model_or_path, path)
    with stdout_silenced():
        engine = (MnnEngine if str(path).endswith(".mnn") else OrtEngine)(str(path), 1, "fp32")
    return {"logits": np.concatenate([engine.run({"input": x[i:i + 1]})["logits"] for i in range(len(x))])}


def breaches(metrics: dict) -> list[str]:
    return [b for name, m in metrics.items() for b in check_gates(m, dict(targets.INT8_GATES), name)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((32, 3, 32, 32), dtype=np.float32),
            rng.standard_normal((32, 3, 32, 32), dtype=np.float32))


def test_gate_catches_int8_calibrated_on_zeros(tmp_path, data):
    calib, held_out = data
    float_model = to_onnx(tiny_net(), tmp_path / "f.onnx")
    ref = run(float_model, held_out, tmp_path)
    good = gate(ref, run(quantize.ort_int8(float_model, calib), held_out, tmp_path), "ort", True)
    zeros = gate(ref, run(quantize.ort_int8(float_model, np.zeros_like(calib)), held_out, tmp_path),
                          "ort", True)
    assert good[1] == []
    assert zeros[1], zeros[0]


def test_fallback_rescues_a_model_that_misses_the_gate(tmp_path, data):
    calib, held_out = data
    float_model = to_onnx(tiny_net(outlier=1000.0), tmp_path / "f.onnx")
    ref = run(float_model, held_out, tmp_path)
    layers = quantize.quantisable_nodes(float_model)

    def evaluate_without(kept):
        return gate(ref, run(quantize.ort_int8(float_model, calib, exclude=kept), held_out, tmp_path),
                             "ort", True)[0]

    assert breaches(evaluate_without([]))  # all-int8 misses the gate
    ranked = quantize.ort_layer_errors(float_model, quantize.ort_int8(float_model, calib), held_out[:8], layers)
    kept, metrics, left = quantize.fallback(layers, evaluate_without, breaches, limit=0.5, ranked=ranked)
    assert left == [] and 0 < len(kept) <= 2
    assert "/4/Conv" in kept  # the conv reading the outlier channel


def test_onnx_holds_qdq_pairs_that_ort_fuses(tmp_path, data):
    calib, _ = data
    float_model = to_onnx(tiny_net(), tmp_path / "f.onnx")
    q = quantize.ort_int8(float_model, calib)
    layers = quantize.onnx_qdq_layers(q)
    assert len(layers["qdq"]) == 4 and layers["float"] == []
    assert quantize.onnx_qdq_layers(float_model)["qdq"] == []
    import onnx

    onnx.save(q, str(tmp_path / "q.onnx"))
    fused = quantize.ort_fused_ops(tmp_path / "q.onnx")
    assert fused.get("QLinearConv", 0) == 3, fused
    assert "QLinearConv" not in quantize.ort_fused_ops(tmp_path / "f.onnx")


def test_mnn_int8_holds_int8_convolutions(tmp_path, data):
    calib, held_out = data
    to_onnx(tiny_net(), tmp_path / "f.onnx")
    out = quantize.mnn_int8(tmp_path / "f.onnx", tmp_path / "model.int8.mnn", calib[:8], json.dumps(META))
    layers = quantize.mnn_int8_layers(out)
    assert len(layers["int8"]) == 4 and layers["float"] == []
    ref = run(str(tmp_path / "f.onnx"), held_out, tmp_path)
    assert gate(ref, run(str(out), held_out, tmp_path), "mnn", True)[1] == []
    skipped = quantize.mnn_int8(tmp_path / "f.onnx", tmp_path / "skip.mnn", calib[:8], json.dumps(META),
                                skip=layers["int8"][:1])
    assert quantize.mnn_int8_layers(skipped)["float"] == layers["int8"][:1]


def test_mnn_quantiser_failure_is_one_line_and_leaves_out_untouched(tmp_path, data):
    calib, _ = data
    to_onnx(tiny_net(), tmp_path / "f.onnx")
    out = tmp_path / "model.int8.mnn"
    out.write_bytes(b"previous")
    with pytest.raises(EdgeportError, match="MNN int8 quantiser failed"):
        quantize.mnn_int8(tmp_path / "f.onnx", out, calib[:2], "{}", {"feature_quantize_method": "NOPE"})
    assert out.read_bytes() == b"previous"


# ---- calibration data ------------------------------------------------------------------------------------

def test_calibration_and_evaluation_share_no_photo():
    calib_half, eval_half = calibration.split_photos()
    assert {n for n, _ in calib_half}.isdisjoint(n for n, _ in eval_half)
    x, info = calibration.calibration_batch(META, n=6)
    assert x.shape == (6, 3, 32, 32) and x.dtype == np.float32 and info["augmented"]
    assert "weaker" in info["warnings"][0]
    again, _ = calibration.calibration_batch(META, n=6)
    np.testing.assert_array_equal(x, again)  # seeded
    assert calibration.evaluation_batch(META, n=4).shape == (4, 3, 32, 32)


def test_user_directory_is_used_with_a_warning_under_300(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x, info = calibration.calibration_batch(META, tmp_path)
    assert x.shape == (3, 3, 32, 32) and not info["augmented"]
    assert "300" in info["warnings"][0]


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "unreadable"])
def test_bad_calib_directory_is_one_line_naming_the_fix(tmp_path, case):
    d = tmp_path / "calib"
    if case != "missing":
        d.mkdir()
    if case == "no_images":
        (d / "readme.txt").write_text("hello")
    if case == "unreadable":
        (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(EdgeportError) as err:
        calibration.calibration_batch(META, d)
    message = str(err.value)
    assert "\n" not in message and "--calib" in message
    assert any(fix in message for fix in ("give a folder", "remove or replace"))


def gate(reference, candidate, label, classifier):
    """The int8 targets' gate, judged by export.parity.judge (the one parity definition)."""
    return judge(label, reference, candidate, dict(targets.INT8_GATES), classifier)
