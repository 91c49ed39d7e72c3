"""`python -m runtime.infer` and `python -m benchmarks.runtime_bench`: output, exit codes, no torch/onnx."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import runtime
from runtime.infer import main

pytest.importorskip("torch")
from test_runtime import make_photo, tiny_artifacts, write_bad_images  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run a module as __main__ with `import torch` / `import onnx` failing, each attempt reported on stderr.
BLOCKED_RUN = """
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx"):
            print("BLOCKED import " + name, file=sys.stderr)
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_blocked(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for i, size in enumerate([(40, 30), (30, 50), (64, 64)]):
        make_photo(*size, seed=i).save(d / f"photo{i}.png")
    (d / "notes.txt").write_text("not an image, and not picked up from a directory\n")
    return d


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_directory_json_matches_predictor(artifacts, photos, capsys):
    code, out, err = run_cli(capsys, artifacts.cls["mnn"], photos, "--json", "--topk", "3")
    assert code == 0 and err == ""
    doc = json.loads(out)
    expected = runtime.load(artifacts.cls["mnn"]).classify(sorted(photos.glob("*.png")), topk=3)
    assert [r["image"] for r in doc["results"]] == [str(p) for p in sorted(photos.glob("*.png"))]
    for result, top in zip(doc["results"], expected):
        assert [t["index"] for t in result["topk"]] == [i for i, _ in top]
        np.testing.assert_allclose([t["prob"] for t in result["topk"]], [p for _, p in top], rtol=1e-6)
    assert doc["meta"]["model"] == "tiny_cnn" and doc["backend"] == "mnn"


def test_text_output_with_labels_and_bench(artifacts, photos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"name{i}\n" for i in range(10)))
    code, out, err = run_cli(capsys, artifacts.cls["onnx"], photos / "photo0.png", "--labels", labels,
                             "--topk", "2", "--bench", "5", "--threads", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].endswith("photo0.png") and len(lines) == 4
    top = runtime.load(artifacts.cls["onnx"]).classify(photos / "photo0.png", topk=2)[0]
    for line, (index, _) in zip(lines[1:3], top):
        assert line.split()[1:] == [str(index), f"name{index}"]
    assert "load" in lines[3] and "median" in lines[3] and "p90" in lines[3]
    code, out, _ = run_cli(capsys, artifacts.cls["onnx"], photos / "photo0.png", "--json", "--bench", "3")
    assert set(json.loads(out)["bench"]) >= {"load_ms", "median_ms", "p90_ms", "runs"}


def test_feature_model_prints_output_shapes(artifacts, photos, capsys):
    code, out, _ = run_cli(capsys, artifacts.feat["mnn"], photos / "photo1.png")
    assert code == 0
    assert out.strip().endswith("feat_s2 [1, 8, 16, 16]  feat_s4 [1, 16, 8, 8]")


def test_bad_images_exit_2_one_line_each_and_good_ones_still_print(artifacts, photos, tmp_path, capsys):
    bad = write_bad_images(tmp_path)
    code, out, err = run_cli(capsys, artifacts.cls["mnn"], photos / "photo0.png", *bad.values())
    assert code == 2
    assert out.startswith(str(photos / "photo0.png"))
    assert len(err.splitlines()) == len(bad) and all(line.startswith("error: ") for line in err.splitlines())


@pytest.mark.parametrize("case", ["missing model", "truncated model", "bad labels", "bad topk", "empty dir"])
def test_setup_errors_exit_2(artifacts, photos, tmp_path, capsys, case):
    truncated = tmp_path / "t.mnn"
    truncated.write_bytes(artifacts.cls["mnn"].read_bytes()[:500])
    (tmp_path / "labels.txt").write_text("just\nthree\nlabels\n")
    (tmp_path / "empty").mkdir()
    model, extra = artifacts.cls["mnn"], []
    if case == "missing model":
        model = tmp_path / "nope.mnn"
    elif case == "truncated model":
        model = truncated
    elif case == "bad labels":
        extra = ["--labels", tmp_path / "labels.txt"]
    elif case == "bad topk":
        extra = ["--topk", "0"]
    images = tmp_path / "empty" if case == "empty dir" else photos
    code, out, err = run_cli(capsys, model, images, *extra)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for option in ("--topk", "--labels", "--threads", "--precision", "--json", "--bench", "IMAGE_OR_DIR"):
        assert option in out


# ---- subprocesses: torch and onnx unavailable, real stdout


def test_blocker_catches_an_onnx_import():
    result = run_blocked("onnx")  # proves the guard below can fail
    assert result.returncode != 0 and "BLOCKED import onnx" in result.stderr


def test_cli_never_imports_torch_or_onnx(artifacts, photos):
    for kind in ("mnn", "onnx"):
        result = run_blocked("runtime.infer", artifacts.cls[kind], photos, "--json")
        assert result.returncode == 0, result.stderr
        assert "BLOCKED" not in result.stderr and "Traceback" not in result.stderr
        doc = json.loads(result.stdout)  # MNN's "The device supports" banner would break this
        assert doc["meta"]["model"] == "tiny_cnn" and len(doc["results"]) == 3
    bad = run_blocked("runtime.infer", artifacts.cls["mnn"], photos / "notes.txt")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_runtime_bench_smoke(artifacts):
    result = run_blocked("benchmarks.runtime_bench", artifacts.cls["mnn"], "--n", "20",
                         "--overhead-runs", "20", "--json")
    assert result.returncode == 0, result.stderr
    assert "BLOCKED" not in result.stderr
    r = json.loads(result.stdout)
    assert r["runs"] == 20 and r["load_ms"] > 0 and r["peak_rss_mb"] > 0 and r["wrapper_ratio"] > 0


@pytest.mark.parametrize("option", [["--threads", "0"], ["--max-det", "0"], ["--max-det", "x"]])
def test_detect_bad_options_exit_2_one_line(capsys, option):
    from runtime.detect import main as detect_main

    with pytest.raises(SystemExit) as e:
        detect_main(["model.mnn", "a.jpg", *option])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and option[0] in err
