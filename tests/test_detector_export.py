"""Detectors through the export pipeline (issue 14): `python -m export DETECTOR|best.pt` → ONNX/MNN judged by
detection parity, `runtime.detect` on the sample photos equal to PyTorch after NMS, and the bad inputs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from export.__main__ import main as export_main
from export.inputs import sample_images
from export.source import build_models
from runtime import detect as rdetect
from tests.test_yolo11 import _save_like_ultralytics_trainer, fake_ultralytics  # noqa: F401  (fixture)

SIZE = 256


def _export(tmp, *args):
    return export_main([*args, "--img-size", str(SIZE), "--out", str(tmp), "--targets", "ort,mnn_fp32"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("art")
    assert _export(out, "yolo11n_fasternet_t0") == 0
    (d,) = (out / "yolo11n_fasternet_t0").glob("*/manifest.json")
    return d.parent


def test_detector_export_passes_detection_gates(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    meta = manifest["metadata"]
    assert manifest["status"] == "passed"
    assert meta["task"] == "detection" and meta["input_name"] == "images"
    assert meta["output_names"] == ["boxes", "scores"] and meta["resize"] == "letterbox"
    dets = manifest["parity"]["results"]["mnn_fp32"]["detections"]
    assert dets["matched"] >= 20 and dets["unmatched"] == 0  # a realistic number of detections was compared
    assert "box_px" in manifest["parity"]["gates"]["ort"]


@pytest.mark.parametrize("file", ["model.onnx", "model.mnn"])
def test_runtime_detect_equals_pytorch_after_nms(exported, file):
    import runtime

    source = json.loads((exported / "manifest.json").read_text())["source"]
    reference, _, meta = build_models(source)
    predictor = runtime.load(exported / file)
    total = 0
    for _, img in sample_images()[:6]:
        (got,) = rdetect.detect(predictor, [img])
        x, lb = rdetect.letterbox(img, (SIZE, SIZE))
        with torch.no_grad():
            boxes, scores = reference(torch.from_numpy(x))
        want = rdetect.as_dicts(rdetect.to_original(rdetect.nms(boxes[0].numpy(), scores[0].numpy()), lb))
        assert [d["class"] for d in got] == [d["class"] for d in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g["box"], w["box"], atol=0.05)
            assert abs(g["score"] - w["score"]) < 1e-4
        total += len(want)
    assert total > 0


def test_detect_cli_no_detections_and_non_image(exported, tmp_path, capsys):
    grey = tmp_path / "grey.png"
    Image.new("RGB", (50, 40), (114, 114, 114)).save(grey)
    assert rdetect.main([str(exported / "model.onnx"), str(grey), "--conf", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["detections"] == []
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert rdetect.main([str(exported / "model.onnx"), str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.jpg" in err and "\n" not in err


def _ultralytics_ckpt(tmp_path, classes, edit_yaml=None, name="best.pt", seed=0):
    from export.source import make_source

    model = build_models(make_source("yolo11n", img_size=128, seed=seed))[0]  # calibrated on the photos at 128²
    if edit_yaml:
        edit_yaml(model.yaml)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_like_ultralytics_trainer(model, path, classes)
    return path


def test_export_an_ultralytics_checkpoint(tmp_path, fake_ultralytics):  # noqa: F811
    from export.parity import main as parity_main
    from export.source import sha256_file

    # Two trainer runs each write a best.pt: each export gets its own <stem>-<sha8> directory.
    paths = [_ultralytics_ckpt(tmp_path, fake_ultralytics, name=f"run{i}/weights/best.pt", seed=i) for i in (1, 2)]
    out = tmp_path / "out"
    for path in paths:
        # Once exit 1 was allowed here (fp32 rounding of plain yolo11n above the fixed gates): the detection gates
        # now rise to the reference's own float32 noise (export.detection_parity).
        assert export_main([str(path), "--img-size", "128", "--out", str(out), "--targets", "ort"]) == 0
    dirs = {}
    for path in paths:
        sha = sha256_file(path)
        (d,) = (out / f"best-{sha[:8]}").glob("*/manifest.json")
        manifest = json.loads(d.read_text())
        assert manifest["source"]["model"] == "ultralytics" and manifest["source"]["weights"] == str(path)
        assert manifest["source"]["weights_sha256"] == sha
        assert manifest["metadata"]["names"][:2] == ["class0", "class1"]
        dirs[path] = d.parent
    assert len(set(dirs.values())) == 2 and sorted(p.name for p in out.iterdir()) == sorted(
        f"best-{sha256_file(p)[:8]}" for p in paths)
    assert parity_main([str(dirs[paths[0]]), "--no-bisect"]) == 0  # the checker finds the checkpoint again


def _one_line_exit_2(capsys, argv, tmp_path, want):
    assert export_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert want in err and "\n" not in err, err
    assert not list((tmp_path / "out").glob("*/*/manifest.json"))


def test_checkpoint_with_unknown_block_is_one_line_exit_2(tmp_path, capsys, fake_ultralytics):  # noqa: F811
    def unknown(yaml):
        yaml["head"][0][2] = "FancyBlock"
    path = _ultralytics_ckpt(tmp_path, fake_ultralytics, unknown)
    _one_line_exit_2(capsys, [str(path), "--img-size", "128"], tmp_path, "unknown block 'FancyBlock'")


class _Evil:
    def __reduce__(self):
        return os.system, ("touch /tmp/detect-integ-pwned",)


def test_foreign_pickle_checkpoint_is_refused_before_running(tmp_path, capsys):
    path = tmp_path / "best.pt"
    torch.save({"ema": _Evil(), "ultralytics": 1}, path)
    _one_line_exit_2(capsys, [str(path)], tmp_path, "posix.system")
    assert not os.path.exists("/tmp/detect-integ-pwned")


def test_unsupported_module_in_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "best.pt"
    torch.save({"ema": torch.nn.Conv2d(1, 1, 1), "note": "ultralytics"}, path)
    _one_line_exit_2(capsys, [str(path)], tmp_path, "best.pt")


def test_checkpoint_and_weights_together_exit_2(tmp_path, capsys):
    _one_line_exit_2(capsys, [str(tmp_path / "a.pt"), "--weights", str(tmp_path / "b.pt")], tmp_path, "give one")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolo11n_fasternet_t0", "yolo11n_inception_next_atto"])
def test_full_size_export_passes_every_default_gate(tmp_path, name):
    assert export_main([name, "--out", str(tmp_path)]) == 0


def _untrained_ultralytics_yolo11n(tmp_path, classes, size=SIZE):
    """Ultralytics' yolo11n as its trainer saves it before learning anything: random weights, BatchNorm
    statistics from letterboxed photos (train() mode, no gradient step), fp16 EMA in the trainer's layout."""
    import models

    torch.manual_seed(1)
    model = models.create_model("yolo11n")
    x = torch.cat([torch.from_numpy(rdetect.letterbox(img, (size, size))[0]) for _, img in sample_images()])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 4):
            model(x[i:i + 4])
    path = tmp_path / "best.pt"
    _save_like_ultralytics_trainer(model.eval(), path, classes)
    return path


def test_untrained_checkpoint_exports_and_a_wrong_file_still_fails(tmp_path, fake_ultralytics):  # noqa: F811
    """Issue 24: detection parity judges the network, not its ties. An untrained checkpoint's float32 forms agree
    with the reference within its own rounding noise, and NMS on its near-tied scores decides nothing the gate
    holds against them: exit 0. A weight of the ONNX file moved by 1 %, or its boxes shifted by half a pixel,
    still fail. Its fp16-weight copy cannot hold this network within DET_FP16 (PyTorch with its weights rounded to
    fp16 moves boxes by tens of pixels): in a detector's default export it is optional, not shipped, said so."""
    import onnx
    from onnx import numpy_helper

    from export import parity
    from export.detection_parity import NOISE_FACTOR

    path = _untrained_ultralytics_yolo11n(tmp_path, fake_ultralytics)
    out = tmp_path / "out"
    assert export_main([str(path), "--img-size", str(SIZE), "--out", str(out)]) == 0
    (found,) = out.glob("*/*/manifest.json")
    manifest = json.loads(found.read_text())
    shipped = manifest["export"]["targets"]
    assert {"ort", "mnn_fp32"} <= set(shipped) and manifest["status"] == "passed"
    fp16 = manifest["targets"].get("mnn_fp16w", {})
    assert ("mnn_fp16w" in shipped) != bool(fp16.get("not_shipped"))  # shipped exactly when its verdict passed
    assert (found.parent / "model.fp16.mnn").is_file() == ("mnn_fp16w" in shipped)
    floor = manifest["parity"]["detection_noise"]
    dets = manifest["parity"]["results"]["ort"]["detections"]
    assert dets["judged"] > 0 and dets["unmatched"] == 0  # after NMS: the clear-margin detections, all kept
    assert dets["gates"]["box_px"] == max(0.05, NOISE_FACTOR * floor["box_px"])

    reference, inference, meta = build_models(manifest["source"])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    model = onnx.load(str(found.parent / "model.onnx"))
    weights = [t for t in model.graph.initializer if len(t.dims) == 4 and t.dims[0] >= 64]
    victim = weights[len(weights) // 2]
    victim.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(victim) * np.float32(1.01), victim.name))
    onnx.save(model, str(wrong / "model.onnx"))
    r = parity.run_parity(wrong, reference, inference, meta, bisect=False, write=False, target_names=["ort"])
    assert not r["passed"] and any(b.startswith("ort: ") for b in r["breaches"]), r["breaches"]

    x = parity.sample_batch(meta, n_images=4, n_random=0)
    ref = parity.reference_outputs(reference, x, meta)
    good = parity.target_outputs(parity.targets.get("ort"), found.parent / "model.onnx", x, meta)
    shifted = {"boxes": good["boxes"] + np.float32(0.5), "scores": good["scores"]}
    assert parity.judge("ort", ref, good, {}, False, meta, noise=floor)[1] == []
    lines = parity.judge("ort", ref, shifted, {}, False, meta, noise=floor)[1]
    assert any(b.startswith("ort: box_px") for b in lines), lines
