"""The bad-input corpus (issue 16): careless and hostile inputs to the CLIs and to checkpoint loading. Every case
asserts the exit status, a single stderr line without a traceback, and that the artifacts it was given are
byte-identical afterwards. Cases are rows of the tables below: add a row, not a test.

runtime.infer and benchmarks.runtime_bench run as subprocesses (`python -m ...`), as a user runs them; export
runs in-process (its torch import alone costs seconds a run), where a traceback would fail the test as well."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import models

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402
from test_runtime import make_photo, png_header_only, tiny_artifacts, write_failing_forward_model  # noqa: E402

from export.mnn_convert import convert  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root) -> dict[str, str]:
    """relative path → sha256 of every file under root (lock files excluded: taking a lock is not a change)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".lock"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def hand_edit(src, dst, old: str, new: str) -> None:
    """Copy a model file replacing its metadata text `old` by `new` padded to the same length with JSON
    whitespace, as an editor would: the MNN flatbuffer and the ONNX protobuf stay well-formed."""
    assert len(new) <= len(old), (old, new)
    data = src.read_bytes()
    assert old.encode() in data, old  # MNN files hold the bizCode twice: both are edited
    dst.write_bytes(data.replace(old.encode(), new.ljust(len(old)).encode()))


# ---- artifacts: tiny models (test_runtime's, built once a session) and hand-made bad files next to them

METADATA_EDITS = {  # name → (metadata text in the file, hand-edited text)
    "crop_neg": ('"crop_pct": 0.875', '"crop_pct": -1'),
    "crop_zero": ('"crop_pct": 0.875', '"crop_pct": 0'),
    "crop_big": ('"crop_pct": 0.875', '"crop_pct": 2.5'),
    "crop_str": ('"crop_pct": 0.875', '"crop_pct": "x"'),
    "std_zero": ('"std": [0.229, 0.224, 0.225]', '"std": [0.229, 0.0, 0.225]'),
    "mean_two": ('"mean": [0.485, 0.456, 0.406]', '"mean": [0.485, 0.456]'),
    "mean_pixels": ('"mean": [0.485, 0.456, 0.406]', '"mean": [123.6, 116.2, 103.5]'),
    "shape_huge_side": ('"input_shape": [-1, 3, 32, 32]', '"input_shape": [1,3,99999,999]'),
    "shape_huge_memory": ('"input_shape": [-1, 3, 32, 32]', '"input_shape": [9,3,9999,9999]'),
    "shape_4ch": ('"input_shape": [-1, 3, 32, 32]', '"input_shape": [-1, 4, 32, 32]'),
    "shape_3d": ('"input_shape": [-1, 3, 32, 32]', '"input_shape": [3, 32, 32]'),
    "shape_other": ('"input_shape": [-1, 3, 32, 32]', '"input_shape": [-1, 3, 64, 64]'),
    "interp": ('"interpolation": "bicubic"', '"interpolation": "bicubix"'),
    "task": ('"task": "classification"', '"task": "regression"'),
    "classes": ('"num_classes": 10', '"num_classes": -5'),
    "classes_7": ('"num_classes": 10', '"num_classes": 7'),  # in bounds, but not what the graph returns
}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    tiny = tiny_artifacts(tmp_path_factory)
    d = tmp_path_factory.mktemp("bad_input")
    files = {"cls_mnn": tiny.cls["mnn"], "cls_onnx": tiny.cls["onnx"], "feat_mnn": tiny.feat["mnn"]}
    for name, (old, new) in METADATA_EDITS.items():
        for kind in ("mnn", "onnx"):
            files[f"{name}_{kind}"] = d / f"{name}.{kind}"
            hand_edit(tiny.cls[kind], files[f"{name}_{kind}"], old, new)
    for task in ("classification", "detection"):  # load, then fail every forward at their metadata's size
        failing = write_failing_forward_model(d, task)
        files[f"fails_{task}_mnn"], files[f"fails_{task}_onnx"] = failing.mnn, failing.onnx
    files["plain_mnn"] = convert(tiny.cls["onnx"], d / "plain.mnn", "", log_path=d / "plain.log")
    mnn = tiny.cls["mnn"].read_bytes()
    raw = {"text.mnn": b"not a model\n", "truncated.mnn": mnn[:500], "onnx_named.mnn": tiny.cls["onnx"].read_bytes(),
           "text.onnx": b"name,score\n1,2\n", "notes.jpg": b"hello, I am text\n", "empty.png": b"",
           "bomb.png": png_header_only(10_000, 7_000), "labels3.txt": b"cat\ndog\nfox\n",
           "labels_binary.txt": bytes(range(256)) * 4}
    for name, data in raw.items():
        (d / name).write_bytes(data)
        files[name.replace(".", "_")] = d / name
    jpeg = io.BytesIO()
    make_photo(200, 150).save(jpeg, "JPEG")
    files["truncated_jpg"] = d / "truncated.jpg"
    files["truncated_jpg"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10])
    photo = make_photo(48, 40, seed=3).convert("L")
    files["photo_png"] = d / "photo.png"
    photo.save(files["photo_png"])
    grey = np.asarray(photo, np.float32)
    files["float01_tif"] = d / "float01.tif"  # what scientific and HDR tools write: float samples in [0, 1]
    Image.fromarray(grey / 255, "F").save(files["float01_tif"])
    nan = grey / 255
    nan[3, 4] = np.nan
    files["float_nan_tif"] = d / "float_nan.tif"
    Image.fromarray(nan, "F").save(files["float_nan_tif"])
    (d / "no_images").mkdir()
    (d / "no_images" / "readme.txt").write_text("no images here\n")
    files["no_images"] = d / "no_images"
    files["missing"] = d / "missing.mnn"
    files["dir"] = d
    return SimpleNamespace(files={k: str(v) for k, v in files.items()}, roots=[str(tiny.dir), str(d)])


def run_module(module: str, args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def check_one_line(result: subprocess.CompletedProcess, code: int, words: str, prefix: str = "error: ") -> None:
    err = result.stderr
    assert "Traceback" not in err, err
    assert result.returncode == code, (result.returncode, err)
    assert len(err.splitlines()) == 1 and err.startswith(prefix), err
    assert words.lower() in err.lower(), err


# ---- python -m runtime.infer: (case, argv with {file} names, exit status, words the one stderr line holds)

INFER_CASES = [
    # model files
    ("missing model", "{missing} {photo_png}", 2, "no such model file"),
    ("model is a directory", "{dir} {photo_png}", 2, "unknown model type"),
    ("text as .mnn", "{text_mnn} {photo_png}", 2, "not a valid MNN model"),
    ("CSV as .onnx", "{text_onnx} {photo_png}", 2, "not a loadable ONNX model"),
    ("truncated .mnn", "{truncated_mnn} {photo_png}", 2, "not a valid MNN model"),
    ("ONNX named .mnn", "{onnx_named_mnn} {photo_png}", 2, "not a valid MNN model"),
    ("no metadata", "{plain_mnn} {photo_png}", 2, "no edgeport preprocessing metadata"),
    ("ONNX file, --backend mnn", "{cls_onnx} {photo_png} --backend mnn", 2, "not a valid MNN model"),
    # hand-edited metadata, MNN and ONNX
    ("crop_pct -1 (mnn)", "{crop_neg_mnn} {photo_png}", 2, "metadata crop_pct is -1"),
    ("crop_pct -1 (onnx)", "{crop_neg_onnx} {photo_png}", 2, "metadata crop_pct is -1"),
    ("crop_pct 0", "{crop_zero_mnn} {photo_png}", 2, "metadata crop_pct is 0"),
    ("crop_pct 2.5", "{crop_big_onnx} {photo_png}", 2, "metadata crop_pct is 2.5"),
    ("crop_pct a string", "{crop_str_mnn} {photo_png}", 2, "metadata crop_pct is 'x'"),
    ("std zero", "{std_zero_mnn} {photo_png}", 2, "metadata std"),
    ("two mean values", "{mean_two_onnx} {photo_png}", 2, "metadata mean"),
    ("mean in pixel units", "{mean_pixels_mnn} {photo_png}", 2, "metadata mean"),
    ("input_shape 99999 high (mnn)", "{shape_huge_side_mnn} {photo_png}", 2, "metadata input_shape"),
    ("input_shape needing 345 GB (mnn)", "{shape_huge_memory_mnn} {photo_png}", 2, "fits memory"),
    ("input_shape 4 channels", "{shape_4ch_mnn} {photo_png}", 2, "metadata input_shape"),
    ("input_shape 3-D", "{shape_3d_onnx} {photo_png}", 2, "metadata input_shape"),
    ("input_shape not the graph's (onnx)", "{shape_other_onnx} {photo_png}", 2, "disagrees with the model"),
    ("input_shape not the graph's (mnn)", "{shape_other_mnn} {photo_png}", 2, "disagrees with the model"),
    # the engine: a forward that fails, or returns other shapes than the metadata promises
    ("MNN forward fails", "{fails_classification_mnn} {photo_png}", 2, "MNN forward failed"),
    ("onnxruntime forward fails", "{fails_classification_onnx} {photo_png}", 2, "onnxruntime failed"),
    ("7 classes, 10 logits (mnn)", "{classes_7_mnn} {photo_png}", 2, "output [1, 10] as 'logits', expected [1, 7]"),
    ("7 classes, 10 logits (onnx)", "{classes_7_onnx} {photo_png}", 2, "expected [1, 7]"),
    ("unknown interpolation", "{interp_mnn} {photo_png}", 2, "metadata interpolation"),
    ("unknown task", "{task_onnx} {photo_png}", 2, "metadata task"),
    ("negative num_classes", "{classes_mnn} {photo_png}", 2, "metadata num_classes"),
    # images (a model that loads; the image is bad)
    ("text named .jpg", "{cls_mnn} {notes_jpg}", 2, "not an image"),
    ("empty image", "{cls_onnx} {empty_png}", 2, "not an image"),
    ("truncated JPEG", "{cls_mnn} {truncated_jpg}", 2, "truncated"),
    ("70 MP header", "{cls_mnn} {bomb_png}", 2, "over the limit"),
    ("missing image", "{cls_mnn} {missing}", 2, "no such image"),
    ("directory without images", "{cls_mnn} {no_images}", 2, "no image files"),
    ("float TIFF with NaN", "{cls_onnx} {float_nan_tif}", 2, "NaN/Inf pixel"),
    # labels
    ("3 labels for 10 classes", "{cls_mnn} {photo_png} --labels {labels3_txt}", 2, "3 labels"),
    ("binary labels", "{cls_mnn} {photo_png} --labels {labels_binary_txt}", 2, "cannot read labels"),
    ("labels from /dev/zero", "{cls_mnn} {photo_png} --labels /dev/zero", 2, "labels file"),
    ("labels is a directory", "{cls_mnn} {photo_png} --labels {dir}", 2, "labels file"),
    ("--labels on a features model", "{feat_mnn} {photo_png} --labels {labels3_txt}", 2, "classifiers only"),
    ("--topk on a features model", "{feat_mnn} {photo_png} --topk 3", 2, "classifiers only"),
    # options
    ("--topk 0", "{cls_mnn} {photo_png} --topk 0", 2, "--topk"),
    ("--topk x", "{cls_mnn} {photo_png} --topk x", 2, "--topk"),
    ("--bench -1", "{cls_mnn} {photo_png} --bench -1", 2, "--bench"),
    ("--bench 10^12", "{cls_onnx} {photo_png} --bench 1000000000000", 2, "--bench"),
    ("--threads 0", "{cls_mnn} {photo_png} --threads 0", 2, "--threads"),
    ("--threads -3", "{cls_onnx} {photo_png} --threads -3", 2, "--threads"),
    ("--threads abc", "{cls_onnx} {photo_png} --threads abc", 2, "--threads"),
    ("--precision fp8", "{cls_mnn} {photo_png} --precision fp8", 2, "--precision"),
    ("--precision low on ONNX", "{cls_onnx} {photo_png} --precision low", 2, "MNN option"),
    ("--winograd fast on ONNX", "{cls_onnx} {photo_png} --winograd fast", 2, "MNN option"),
    ("--backend tensorrt", "{cls_onnx} {photo_png} --backend tensorrt", 2, "--backend"),
    ("unknown option", "{cls_onnx} {photo_png} --fp16", 2, "unrecognized arguments"),
    ("no image", "{cls_onnx}", 2, "required"),
]


@pytest.mark.parametrize("case, argv, code, words", INFER_CASES, ids=[c[0] for c in INFER_CASES])
def test_runtime_infer(art, case, argv, code, words):
    before = [tree_digest(r) for r in art.roots]
    check_one_line(run_module("runtime.infer", argv.format(**art.files).split()), code, words)
    assert [tree_digest(r) for r in art.roots] == before


@pytest.mark.parametrize("kind", ["onnx", "mnn"])
def test_threads_above_the_cpus_warn_in_one_line_and_cap_onnxruntime(art, kind):
    result = run_module("runtime.infer", [art.files[f"cls_{kind}"], art.files["photo_png"], "--threads", "999",
                                          "--bench", "2"])
    check_one_line(result, 0, "threads=999 is above", prefix="warning: ")
    bench_line = result.stdout.splitlines()[-1]
    assert ("threads=999" in bench_line) == (kind == "mnn"), bench_line  # onnxruntime capped, MNN as asked
    assert ("capped" in result.stderr) == (kind == "onnx")


def test_float_tiff_classified_like_its_8_bit_png(art):
    """A [0, 1] float TIFF was clipped to a black image; scaled, it is the same picture as the 8-bit PNG."""
    result = run_module("runtime.infer", [art.files["cls_onnx"], art.files["photo_png"], art.files["float01_tif"],
                                          "--json", "--topk", "10"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    png, tif = json.loads(result.stdout)["results"]
    assert [t["index"] for t in tif["topk"]] == [t["index"] for t in png["topk"]]
    np.testing.assert_allclose([t["prob"] for t in tif["topk"]], [t["prob"] for t in png["topk"]], atol=1e-6)


# ---- python -m benchmarks.runtime_bench

BENCH_CASES = [
    ("missing artifact", "{missing}", 2, "no such model file"),
    ("text artifact", "{text_mnn}", 2, "not a valid MNN model"),
    ("MNN forward fails", "{fails_classification_mnn} --n 2", 2, "MNN forward failed"),
    ("onnxruntime forward fails", "{fails_classification_onnx} --n 2", 2, "onnxruntime failed"),
    ("7 classes, 10 logits", "{classes_7_mnn} --n 2", 2, "expected [1, 7]"),
    ("hand-edited crop_pct", "{crop_neg_onnx} --n 2", 2, "metadata crop_pct"),
    ("hand-edited huge input_shape", "{shape_huge_memory_mnn} --n 2", 2, "fits memory"),
    ("--n 0", "{cls_onnx} --n 0", 2, "--n"),
    ("--n 10^12", "{cls_onnx} --n 1000000000000", 2, "--n"),
    ("--overhead-runs x", "{cls_onnx} --overhead-runs x", 2, "--overhead-runs"),
    ("--threads 0", "{cls_onnx} --threads 0", 2, "--threads"),
    ("--threads 1.5", "{cls_mnn} --threads 1.5", 2, "--threads"),
    ("--precision low on ONNX", "{cls_onnx} --precision low --n 2", 2, "MNN option"),
    ("--precision half", "{cls_mnn} --precision half", 2, "--precision"),
    ("unknown option", "{cls_mnn} --runs 5", 2, "unrecognized arguments"),
]


@pytest.mark.parametrize("case, argv, code, words", BENCH_CASES, ids=[c[0] for c in BENCH_CASES])
def test_runtime_bench(art, case, argv, code, words):
    before = [tree_digest(r) for r in art.roots]
    check_one_line(run_module("benchmarks.runtime_bench", argv.format(**art.files).split()), code, words)
    assert [tree_digest(r) for r in art.roots] == before


DETECT_CASES = [
    ("MNN forward fails", "{fails_detection_mnn} {photo_png}", 2, "MNN forward failed"),
    ("onnxruntime forward fails", "{fails_detection_onnx} {photo_png}", 2, "onnxruntime failed"),
    ("a classifier", "{cls_mnn} {photo_png}", 2, "not an edgeport detector"),
    ("--save-dir is a file", "{fails_detection_mnn} {photo_png} --save-dir {labels3_txt}", 2, "not a directory"),
]


@pytest.mark.parametrize("case, argv, code, words", DETECT_CASES, ids=[c[0] for c in DETECT_CASES])
def test_runtime_detect(art, case, argv, code, words):
    before = [tree_digest(r) for r in art.roots]
    result = run_module("runtime.detect", argv.format(**art.files).split())
    check_one_line(result, code, words)
    assert result.stdout == ""  # MNN's own complaint is captured into the error line, not printed
    assert [tree_digest(r) for r in art.roots] == before


def test_failed_forward_prints_nothing_on_stdout(art):
    for kind in ("mnn", "onnx"):
        result = run_module("runtime.infer", [art.files[f"fails_classification_{kind}"], art.files["photo_png"]])
        check_one_line(result, 2, "failed")
        assert result.stdout == "", result.stdout


def test_runtime_bench_threads_above_the_cpus_capped_for_onnxruntime(art):
    result = run_module("benchmarks.runtime_bench", [art.files["cls_onnx"], "--threads", "999", "--n", "3",
                                                     "--overhead-runs", "3", "--json"])
    check_one_line(result, 0, "capped", prefix="warning: ")
    assert json.loads(result.stdout)["threads"] == len(os.sched_getaffinity(0))


# ---- checkpoints: models.load_checkpoint, and export --weights (both must refuse before building anything)

MODEL = "fasternet_t0"


def _first_float_key(sd):
    return next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)


def _with_value(sd, value):
    sd = {k: v.clone() for k, v in sd.items()}
    sd[_first_float_key(sd)].view(-1)[1] = value
    return sd


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("checkpoints")
    sd = {k: v.contiguous() for k, v in models.create_model(MODEL).state_dict().items()}
    as_int64 = {k: (v * 100).to(torch.int64) if v.is_floating_point() else v for k, v in sd.items()}
    marker = d / "EXECUTED"

    class Payload:  # what a hostile pickle does on load: run a command
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = {
        "text.pth": b"these are my weights, honest\n", "weights.csv": b"name,value\nstem.weight,0.1\n",
        "empty.pth": b"", "zeros.pth": b"\0" * 64,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    save_file(as_int64, d / "int64.safetensors")
    torch.save(as_int64, d / "int64.pth")
    save_file(_with_value(sd, float("nan")), d / "nan.safetensors")
    torch.save(_with_value(sd, float("inf")), d / "inf.pth")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in _with_value(sd, float("-inf")).items()},
              d / "neg_inf_fp16.safetensors")
    torch.save({"state_dict": sd, "hook": Payload()}, d / "hostile.pth")
    torch.save({"state_dict": sd, "hook": Payload()}, d / "hostile_legacy.pth", _use_new_zipfile_serialization=False)
    save_file(sd, d / "safetensors_named.pth")  # content decides, not the name: both load
    torch.save(sd, d / "legacy_named.safetensors", _use_new_zipfile_serialization=False)
    return SimpleNamespace(dir=d, marker=marker, sd=sd)


CHECKPOINT_CASES = [  # file, words the one-line error holds
    ("text.pth", "is a text file"), ("weights.csv", "is a CSV text file"), ("empty.pth", "empty"),
    ("zeros.pth", "not in a known weights format"),
    ("int64.safetensors", "non-float tensors"), ("int64.pth", "non-float tensors"),
    ("nan.safetensors", "NaN/Inf"), ("inf.pth", "NaN/Inf"), ("neg_inf_fp16.safetensors", "NaN/Inf"),
    ("hostile.pth", "refuse to unpickle"), ("hostile_legacy.pth", "refuse to unpickle"),
]


@pytest.mark.parametrize("name, words", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_refused_in_one_line(checkpoints, name, words):
    with pytest.raises(models.EdgeportError) as e:
        models.load_checkpoint(models.create_model(MODEL), checkpoints.dir / name)
    msg = str(e.value)
    assert "\n" not in msg and words in msg and name in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg  # never invite it
    assert not checkpoints.marker.exists()  # the hostile pickle did not run


@pytest.mark.parametrize("name", ["safetensors_named.pth", "legacy_named.safetensors"])
def test_checkpoint_format_from_content_not_name(checkpoints, name):
    model = models.create_model(MODEL)
    assert models.load_checkpoint(model, checkpoints.dir / name) == {"missing": [], "unexpected": [], "mismatched": []}
    key = _first_float_key(checkpoints.sd)
    assert torch.equal(model.state_dict()[key], checkpoints.sd[key])


# export --weights: content checks (models.load_checkpoint) reached through the export CLI. A prior export of
# the same form must come out byte-identical.
EXPORT_ARGS = [MODEL, "--img-size", "64", "--targets", "ort", "--pconv", "split_cat", "--mlp", "fc"]
EXPORT_WEIGHTS_CASES = [("text.pth", "text file"), ("weights.csv", "CSV"), ("int64.safetensors", "non-float"),
                        ("nan.safetensors", "NaN/Inf"), ("inf.pth", "NaN/Inf")]


@pytest.fixture(scope="module")
def prior_export(tmp_path_factory):
    from export.__main__ import main

    out = tmp_path_factory.mktemp("export_out")
    assert main([*EXPORT_ARGS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name, words", EXPORT_WEIGHTS_CASES, ids=[c[0] for c in EXPORT_WEIGHTS_CASES])
def test_export_refuses_bad_weights_and_keeps_the_prior_export(checkpoints, prior_export, capsys, name, words):
    from export.__main__ import main

    before = tree_digest(prior_export)
    capsys.readouterr()
    code = main([*EXPORT_ARGS, "--out", str(prior_export), "--weights", str(checkpoints.dir / name)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert tree_digest(prior_export) == before
