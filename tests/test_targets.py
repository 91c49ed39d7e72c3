"""The artifact-target registry: one list, consistent records, and nothing else in the code naming its files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from export import targets
from export.producers import PRODUCERS
from models.errors import EdgeportError

ROOT = Path(__file__).resolve().parent.parent


def test_records_are_consistent():
    names = [t.name for t in targets.TARGETS]
    assert len(names) == len(set(names))
    runs = [(t.file, t.engine, t.precision) for t in targets.ARTIFACTS]  # another engine is another way
    assert len(runs) == len(set(runs)), "two targets run the same file the same way"
    for t in targets.ARTIFACTS:
        assert t.made_from in names or t.made_from == "reference"
        assert t.gates and all(v >= 0 for v in t.gates.values())
        assert targets.producer(t).produce in PRODUCERS  # every shipped file has a maker
        assert targets.for_file(t.file, t.precision, t.engine) is t
    with pytest.raises(TypeError):
        targets.get("ort").gates["max_rel"] = 1.0  # frozen: nobody loosens a gate in place


def test_select_adds_what_a_target_is_made_from():
    assert [t.name for t in targets.select(["mnn_low"])] == ["mnn_fp32", "mnn_low"]
    assert [t.name for t in targets.select(["mnn_fp32", "ort", "ort"])] == ["ort", "mnn_fp32"]
    for bad in ([], ["tflite"], [targets.INFERENCE]):
        with pytest.raises(EdgeportError):
            targets.select(bad)


def test_no_other_module_lists_the_artifact_files():
    """Adding a target is adding a record: file names of targets appear in code only in export/targets.py."""
    files = {t.file for t in targets.ARTIFACTS if t.file != "model.onnx"}  # model.onnx: the build's own input
    pattern = re.compile("|".join(re.escape(f) for f in files))
    offenders = []
    for package in ("export", "runtime", "models", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            if (path.name == "targets.py" and path.parent.name == "export") or path.name.startswith("guest_"):
                continue  # guest_*.py run inside emulated userlands that have no export package
            code = "\n".join(line for line in path.read_text().splitlines()
                             if not line.lstrip().startswith("#"))
            code = re.sub(r'"""(.*?)"""', "", code, flags=re.S)  # docstrings may mention them
            if pattern.search(code):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_a_detector_default_export_leaves_out_what_cannot_meet_detection_gates():
    assert targets.default_targets() == targets.DEFAULT_TARGETS
    detection = targets.default_targets("detection")
    assert "mnn_int8w" in targets.DEFAULT_TARGETS and "mnn_int8w" not in detection
    assert set(detection) == {n for n in targets.DEFAULT_TARGETS if targets.get(n).for_detectors}
    assert {"ort", "mnn_fp32", "mnn_fp16w"} <= set(detection)
    assert not {"mnn_low", "mnn_fp16w_low"} & set(detection)  # fp16 arithmetic misses DET_FP16_ARITH on ARM


def test_real_weights_add_the_int8_targets_as_optional_except_for_detectors(tmp_path):
    """int8's top-1 gate means something only on trained weights (README "int8"): with --weights a classifier's
    default adds ort_int8 and mnn_int8, shipped only when they pass; --calib is then accepted without
    --targets. A detector's default never gets them."""
    from export.pipeline import ExportOptions, _check_options

    int8 = {"ort_int8", "mnn_int8"}
    assert not int8 & set(targets.default_targets())
    assert int8 <= set(targets.default_targets(trained=True)) and int8 <= set(targets.default_targets("features", True))
    assert targets.optional_targets(trained=True) == int8 and not targets.optional_targets()
    assert not int8 & set(targets.default_targets("detection", trained=True))
    # a detector's only optional target is its fp16-weight copy, trained or not (next test)
    assert targets.optional_targets("detection", trained=True) == targets.optional_targets("detection") == {
        "mnn_fp16w"}
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _check_options(ExportOptions(model="fasternet_t0", weights="w.pth", calib=str(tmp_path)))
    for opts in (ExportOptions(model="fasternet_t0", calib=str(tmp_path)),
                 ExportOptions(model="yolo11n", weights="w.pt", calib=str(tmp_path))):
        with pytest.raises(EdgeportError, match="only used by int8 targets"):
            _check_options(opts)


def test_arm_parity_judges_int8_on_held_out_images_like_the_host(tmp_path, monkeypatch):
    """Under emulation an int8 file is judged on images never calibrated on, as export.parity does on the host
    (the guest is replaced by the host's MNN here: what is checked is which inputs each target gets)."""
    import numpy as np
    import torch
    from torch import nn

    import runtime
    from benchmarks.arm import parity as arm
    from benchmarks.arm.run import GuestRun
    from export.build import build_artifact
    from export.parity import held_out_inputs

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    meta = {"input_shape": [1, 3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "crop_pct": 0.875, "interpolation": "bicubic", "input_name": "input", "output_names": ["logits"],
            "task": "classification", "num_classes": 10}
    build_artifact(net, meta, tmp_path, ["ort", "mnn_fp32", "mnn_int8"])
    seen = {}

    def host_as_guest(path, x, cpu, precision, cache=None):
        seen[Path(path).name] = x
        model = runtime.load(path)
        rows = [model.run(x[i:i + 1], check_finite=False)["logits"] for i in range(len(x))]
        return GuestRun({"logits": np.concatenate(rows)}, [], {}, {})

    monkeypatch.setattr(arm, "guest_infer", host_as_guest)
    monkeypatch.setattr(arm, "versions", lambda cache=None: {})  # no ARM environment needed
    report = arm.check_dir(tmp_path, quick=True, log=lambda line: None)
    assert {r["target"] for r in report["rows"]} == {"ort", "mnn_fp32", "mnn_low", "mnn_int8"}
    np.testing.assert_array_equal(seen["model.int8.mnn"], held_out_inputs(meta, 4))
    assert not np.array_equal(seen["model.mnn"], seen["model.int8.mnn"])


def test_arm_parity_runs_the_targets_an_export_shipped(tmp_path):
    """A detector's default export ships model.mnn without promising precision='low' on it: the ARM harness
    must judge what the manifest lists, not every target whose file happens to be there."""
    import json

    from benchmarks.arm.parity import guest_targets

    for name in ("model.onnx", "model.mnn", "model.fp16.mnn"):
        (tmp_path / name).write_bytes(b"")
    every = {t.name for t in guest_targets(tmp_path)}
    assert every == {"ort", "mnn_fp32", "mnn_fp16w", "mnn_low", "mnn_fp16w_low"}
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"export": {"targets": list(targets.default_targets("detection"))}}))
    assert {t.name for t in guest_targets(tmp_path)} == {"ort", "mnn_fp32", "mnn_fp16w"}
    assert [t.name for t in guest_targets(tmp_path, ["mnn_low"])] == ["mnn_low"]  # --targets still reaches it
