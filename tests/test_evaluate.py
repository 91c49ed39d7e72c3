"""runtime.evaluate on the trained digits model: the same top-1 as PyTorch, every file of an export in one table,
and bad input as one line each; and int8 judged by accuracy (export.accuracy, `python -m export --val DIR`): every
file's top-1 in the manifest and report, an int8 file that loses more than the threshold dropped (optional) or
failing the export (required)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from export import accuracy
from export.__main__ import main as export_main
from models import digits
from runtime import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return digits.make_imagefolder()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, data):
    from rich.console import Console

    from export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("digits-export")
    manifest = run_export(ExportOptions(model=digits.MODEL, weights=str(digits.WEIGHTS),
                                        targets=("ort", "mnn_fp32", "mnn_int8w"), out=str(out),
                                        val=str(data / "val")),
                          Console(file=open(os.devnull, "w")))
    assert manifest["status"] == "passed"
    return out / digits.MODEL / manifest["form_tag"]


def run(capsys, *argv):
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_same_top1_as_pytorch(data, export_dir, capsys):
    """Every image of the val split: the ONNX file's top-1 class is PyTorch's, so the counts are equal."""
    x, y, paths = digits.load_split(data / "val")
    model = models.create_model(digits.MODEL, weights=str(digits.WEIGHTS)).eval()
    torch_top1 = digits.predict(model, x)
    code, out, _ = run(capsys, export_dir / "model.onnx", "--data", data / "val", "--json")
    assert code == 0
    (result,) = json.loads(out)["files"]
    assert result["n"] == len(y)
    assert result["correct1"] == int((torch_top1 == y).sum())
    doc = evaluate.evaluate_classifiers([str(export_dir / "model.onnx")], evaluate.scan_imagefolder(str(data / "val")))
    assert [doc["files"][0]["top1_index"][p] for p in paths] == torch_top1.tolist()


def test_export_dir_table(data, export_dir, capsys):
    code, out, _ = run(capsys, export_dir, "--data", data / "val", "--json")
    assert code == 0
    doc = json.loads(out)
    files = [os.path.basename(r["file"]) for r in doc["files"]]
    assert files == ["model.onnx", "model.int8w.mnn", "model.mnn"]
    ref = doc["files"][0]
    assert ref["delta_top1_points"] == 0 and ref["agreement"] == 1.0
    for r in doc["files"]:
        assert 0.9 < r["top1"] <= r["top5"] <= 1 and r["n"] == doc["n_images"]
        assert r["delta_top1_points"] == pytest.approx((r["top1"] - ref["top1"]) * 100, abs=1e-3)
    code, out, _ = run(capsys, export_dir, "--data", data / "val")
    assert code == 0 and "Δ top-1 pts" in out and "model.int8w.mnn" in out


def test_precision_low_keeps_stdout_clean(data, export_dir, capfd):
    """MNN prints a line to fd 1 when it makes a low-precision runtime: --json output must stay one document."""
    code = evaluate.main([str(export_dir), "--data", str(data / "val"), "--limit", "10", "--precision", "low",
                          "--json"])
    out, _ = capfd.readouterr()
    assert code == 0
    doc = json.loads(out)
    assert doc["precision"] == "low" and {os.path.basename(r["file"]) for r in doc["files"]} >= {"model.mnn"}


def test_accuracy_and_confusion_from_known_predictions():
    import numpy as np

    top = np.array([[0, 1], [1, 0], [1, 2], [2, 1], [1, 0]])
    labels = np.array([0, 1, 2, 2, 2])
    acc = evaluate.accuracy(top, labels, {"zero": 0, "one": 1, "two": 2})
    assert (acc["correct1"], acc["correct5"], acc["n"]) == (3, 4, 5)
    assert acc["confused"][0] == {"true": 2, "predicted": 1, "count": 2, "true_name": "two", "predicted_name": "one"}


def test_limit_takes_every_class(data, export_dir, capsys):
    code, out, _ = run(capsys, export_dir / "model.onnx", "--data", data / "val", "--limit", 20, "--json")
    assert code == 0 and json.loads(out)["files"][0]["n"] == 20
    samples = evaluate.balanced_subset(evaluate.scan_imagefolder(str(data / "val")).samples, 20)
    assert sorted(c for _, c in samples) == sorted(list(range(10)) * 2)


def _tree(tmp_path, data, folders: dict[str, int]) -> str:
    """A small ImageFolder: `n` val images of digit class `int(name)` (or i-th folder) per folder name."""
    root = tmp_path / "tree"
    for i, (name, n) in enumerate(folders.items()):
        (root / name).mkdir(parents=True)
        src = sorted((data / "val" / str(int(name) if name.isdigit() else i)).glob("*.png"))[:n]
        for p in src:
            shutil.copy(p, root / name / p.name)
    return root


def test_folder_names_sorted_order_and_labels_file(tmp_path, data, export_dir, capsys):
    root = _tree(tmp_path, data, {"a_zero": 3, "b_one": 3, "c_two": 3})
    assert evaluate.scan_imagefolder(str(root)).classes == {"a_zero": 0, "b_one": 1, "c_two": 2}
    labels = tmp_path / "labels.txt"
    labels.write_text("# folder index\na_zero 0\nb_one 1\nc_two 2\n")
    code, out, _ = run(capsys, export_dir / "model.onnx", "--data", root, "--labels", labels, "--json")
    assert code == 0 and json.loads(out)["files"][0]["correct1"] >= 8
    labels.write_text("a_zero 5\nb_one 6\nc_two 7\n")  # wrong mapping: accuracy collapses, proving it is used
    code, out, _ = run(capsys, export_dir / "model.onnx", "--data", root, "--labels", labels, "--json")
    assert code == 0 and json.loads(out)["files"][0]["correct1"] == 0


@pytest.mark.parametrize("case", ["no_images", "loose_images", "class_out_of_range", "labels_missing_folder",
                                  "labels_bad_line", "not_a_dir", "yaml_for_classifier", "no_manifest",
                                  "all_unreadable"])
def test_bad_input_one_line_exit_2(case, tmp_path, data, export_dir, capsys):
    model = export_dir / "model.onnx"
    root = tmp_path / "tree"
    root.mkdir()
    extra = []
    if case == "no_images":
        (root / "0").mkdir()
        (root / "0" / "notes.txt").write_text("x")
    elif case == "loose_images":
        shutil.copy(next((data / "val" / "1").glob("*.png")), root / "a.png")
    elif case == "class_out_of_range":
        root = _tree(tmp_path / "r", data, {"3": 1, "12": 0})
        (root / "12" / "x.png").write_bytes((next((data / "val" / "1").glob("*.png"))).read_bytes())
    elif case in ("labels_missing_folder", "labels_bad_line"):
        root = _tree(tmp_path / "r", data, {"a": 1, "b": 1})
        (tmp_path / "l.txt").write_text("a 0\n" if case == "labels_missing_folder" else "a zero\n")
        extra = ["--labels", tmp_path / "l.txt"]
    elif case == "not_a_dir":
        root = tmp_path / "missing"
    elif case == "yaml_for_classifier":
        root = tmp_path / "data.yaml"
        root.write_text("path: .\n")
    elif case == "all_unreadable":
        (root / "0").mkdir()
        (root / "0" / "a.png").write_bytes(b"not a png")
    elif case == "no_manifest":
        model = tmp_path
        root = data / "val"
    code, out, err = run(capsys, model, "--data", root, *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_empty_class_folder_and_unreadable_images_are_counted_skips(tmp_path, data, export_dir, capsys):
    root = _tree(tmp_path, data, {"0": 2, "1": 2, "2": 0})
    (root / "1" / "broken.png").write_bytes(b"not a png")
    code, out, err = run(capsys, export_dir / "model.onnx", "--data", root, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["n_images"] == 5 and doc["files"][0]["n"] == 4
    skipped = {os.path.basename(s["image"]) for s in doc["skipped"]}
    assert skipped == {"2", "broken.png"}
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("skipped: ") for line in lines)


def test_runs_without_torch(data, export_dir):
    """The board has no torch: runtime.evaluate must not import it (nor onnx, models, export)."""
    code = ("import sys\n"
            "for m in ('torch', 'onnx', 'models', 'export'): sys.modules[m] = None\n"
            "from runtime.evaluate import main\n"
            f"sys.exit(main([{str(export_dir)!r}, '--data', {str(data / 'val')!r}, '--limit', '10']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "model.mnn" in proc.stdout


# ---- export --val (export.accuracy)
def test_manifest_and_report_show_every_files_accuracy(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    record = manifest["accuracy"]
    assert record["measured"] and record["n_images"] == 359
    assert set(record["files"]) == {"model.onnx", "model.mnn", "model.int8w.mnn"}
    assert record["files"]["model.int8w.mnn"]["targets"] == ["mnn_int8w"]
    assert not record["breaches"] and not record["dropped"] and manifest["status"] == "passed"
    report = (export_dir / "report.md").read_text()
    assert "## Accuracy on labelled images" in report and "`model.int8w.mnn` | mnn_int8w |" in report


def _noisy_copy(src, dst, scale):
    """model.onnx with Gaussian noise of `scale` × each weight tensor's std added: a file that computes a worse
    model (a stand-in for a bad int8 quantisation)."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 16:
            init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, scale * w.std(), w.shape)).astype(np.float32),
                                                  init.name))
    onnx.save(model, str(dst))


@pytest.fixture
def build(export_dir, tmp_path):
    d = tmp_path / "build"
    shutil.copytree(export_dir, d)
    return d


@pytest.mark.parametrize("optional", [True, False])
def test_an_int8_file_losing_accuracy_is_dropped_or_fails(build, data, optional):
    _noisy_copy(build / "model.onnx", build / "model.int8.onnx", scale=1.0)
    built = {"targets": ["ort", "mnn_fp32", "ort_int8"], "records": {}}
    notes = []
    record = accuracy.judge_accuracy(str(data / "val"), build, built, {"ort_int8"} if optional else set(),
                                     notes.append)
    loss = -record["files"]["model.int8.onnx"]["delta_top1_points"]
    assert loss > accuracy.INT8_MAX_TOP1_LOSS_POINTS
    if optional:
        assert record["dropped"] == ["ort_int8"] and not record["breaches"]
        assert built["targets"] == ["ort", "mnn_fp32"] and not (build / "model.int8.onnx").exists()
        assert "top-1" in built["records"]["ort_int8"]["not_shipped"]
    else:
        assert record["breaches"] and "ort_int8" in record["breaches"][0]
        assert "ort_int8" in built["targets"] and (build / "model.int8.onnx").exists()
    assert len(notes) == 1


def test_an_int8_file_within_the_threshold_ships(build, data):
    _noisy_copy(build / "model.onnx", build / "model.int8.onnx", scale=0.01)
    built = {"targets": ["ort", "ort_int8"], "records": {}}
    record = accuracy.judge_accuracy(str(data / "val"), build, built, {"ort_int8"})
    assert -record["files"]["model.int8.onnx"]["delta_top1_points"] <= accuracy.INT8_MAX_TOP1_LOSS_POINTS
    assert built["targets"] == ["ort", "ort_int8"] and not record["dropped"] and not record["breaches"]


def test_int8_targets_are_those_with_int8_weights_or_arithmetic():
    from export import targets

    int8 = [t.name for t in targets.ARTIFACTS if accuracy.is_int8(t)]
    assert int8 == ["mnn_int8w", "ort_int8", "mnn_int8", "openvino_int8"]


def test_without_val_the_report_says_not_measured(build):
    record = accuracy.judge_accuracy(None, build, {"targets": ["ort"], "records": {}})
    assert record["measured"] is False and "not measured" in accuracy.accuracy_markdown(record)


@pytest.mark.parametrize("val", ["missing", "flat"])
def test_bad_val_dir_is_one_line_exit_2_before_any_work(tmp_path, capsys, val):
    root = tmp_path / val
    if val == "flat":
        root.mkdir()
        (root / "a.png").write_bytes(b"")
    code = export_main([digits.MODEL, "--weights", str(digits.WEIGHTS), "--val", str(root),
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("export: error: --val") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_int8_files_of_the_trained_model_keep_its_accuracy(data, tmp_path):
    """The documented export (docs/guides/accuracy.md): every target, int8 calibrated on the training split; each
    int8 file is measured on the val split and loses at most the threshold (the int8 quantisers take minutes)."""
    from rich.console import Console

    from export.pipeline import ExportOptions, run_export

    manifest = run_export(ExportOptions(
        model=digits.MODEL, weights=str(digits.WEIGHTS), out=str(tmp_path), calib=str(data / "train"),
        val=str(data / "val"), targets=("ort", "mnn_fp32", "mnn_fp16w", "mnn_int8w", "ort_int8", "mnn_int8")),
        Console(file=open(os.devnull, "w")))
    files = manifest["accuracy"]["files"]
    assert {"model.int8.onnx", "model.int8.mnn", "model.int8w.mnn"} <= set(files)
    for name in ("model.int8.onnx", "model.int8.mnn", "model.int8w.mnn"):
        assert -files[name]["delta_top1_points"] <= accuracy.INT8_MAX_TOP1_LOSS_POINTS, (name, files[name])
    assert not manifest["accuracy"]["breaches"]


def test_with_val_int8_is_judged_on_those_images(data, tmp_path):
    """A digit classifier's int8 file judged on photographs says nothing (activations it never sees): with --val
    the int8 gates are judged on those labelled images, recorded so that export.parity re-runs on them."""
    out = tmp_path / "out"
    code = export_main([digits.MODEL, "--weights", str(digits.WEIGHTS), "--targets", "ort,ort_int8",
                        "--calib", str(data / "train"), "--val", str(data / "val"), "--out", str(out)])
    (found,) = out.glob("*/*/manifest.json")
    manifest = json.loads(found.read_text())
    held = manifest["parity"]["inputs"]["held_out"]
    assert "--val" in held["description"] and held["count"] == 256  # a seeded subset of the 359 val images
    assert manifest["export"]["held_out"] == str((data / "val").resolve())
    assert "--val" in manifest["targets"]["ort_int8"]["evaluated_on"]
    assert code == (0 if manifest["status"] == "passed" else 1)


def test_calib_and_val_must_not_share_images(data, tmp_path, capsys):
    code = export_main([digits.MODEL, "--weights", str(digits.WEIGHTS), "--calib", str(data / "val"),
                        "--val", str(data / "val"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--calib and --val share" in err and len(err.strip().splitlines()) == 1
