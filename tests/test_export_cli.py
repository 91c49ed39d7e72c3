"""`python -m export` end to end in a subprocess: layout, manifest, metadata in ONNX and MNN, parity, byte
reproducibility, quiet output, and no network / package installation during export."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("model.onnx", "model.mnn", "model.fp16.mnn", "model.int8w.mnn")

SITECUSTOMIZE = '''
import os, socket
_marker = os.environ["EDGEPORT_NET_MARKER"]
def _refuse(self, address, *a, **k):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        open(_marker, "a").write(f"connect {address}\\n")
        raise OSError("network access during export")
    return _orig(self, address, *a, **k)
_orig = socket.socket.connect
socket.socket.connect = _refuse
'''


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_export(tmp: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI with a `pip` that fails loudly first on PATH and sockets that refuse to connect."""
    fake_bin, site = tmp / "bin", tmp / "site"
    for d in (fake_bin, site):
        d.mkdir(exist_ok=True)
    for name in ("pip", "pip3"):
        script = fake_bin / name
        script.write_text(f'#!/bin/sh\necho "$0 $*" >> "{tmp}/pip_called"\n'
                          'echo "pip must not run during export" >&2\nexit 97\n')
        script.chmod(0o755)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "EDGEPORT_NET_MARKER": str(tmp / "net_used")}
    argv = [sys.executable, "-m", "export", "fasternet_t0", "--img-size", "64", "--out", str(out),
            "--pconv", "split_cat", "--mlp", "fc", *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    first = _run_export(tmp, tmp / "a")
    second = _run_export(tmp, tmp / "b", "--no-parity")
    return tmp, first, second


def _dest(tmp: Path, run: str) -> Path:
    return tmp / run / "fasternet_t0" / "split_cat-fc"


def test_export_succeeds_quietly(exports):
    _, first, _ = exports
    assert first.returncode == 0, first.stderr
    assert "The device supports" not in first.stdout + first.stderr  # MNN's C-level print is silenced
    assert "Converted Success" not in first.stdout + first.stderr
    for step in ("create model", "calibrate", "ONNX export", "simplify", "mnn_int8w → model.int8w.mnn", "parity gate"):
        assert step in first.stdout
    assert "PASSED" in first.stdout


def test_no_network_and_no_package_installation(exports):
    tmp, first, _ = exports
    assert first.returncode == 0, first.stderr
    assert not (tmp / "pip_called").exists()
    assert not (tmp / "net_used").exists()
    assert importlib.util.find_spec("aliyun") is None  # what MNN's Python tools would pip-install


def test_layout_and_manifest(exports):
    tmp, first, _ = exports
    dest = _dest(tmp, "a")
    names = {p.name for p in dest.iterdir()}
    assert names == {*MODEL_FILES, "manifest.json", "report.md", "parity.json", "export.log"}
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["parity"]["passed"]
    for name, entry in manifest["files"].items():
        assert entry == {"size": (dest / name).stat().st_size, "sha256": _sha(dest / name)}
    assert set(MODEL_FILES) <= set(manifest["files"])
    src = manifest["source"]
    assert src == {"model": "fasternet_t0", "weights": None, "weights_sha256": None, "seed": 0,
                   "img_size": 64, "batch": 1, "dynamic_batch": False, "features_only": False,
                   "pconv": "split_cat", "mlp": "fc", "calibrated": True}
    hist = manifest["onnx"]["op_histogram"]
    assert "ScatterND" not in hist and hist["Split"] == hist["Concat"] == 13
    assert manifest["onnx"]["lint"] == []
    assert {"torch", "onnx", "MNN", "onnxsim"} <= set(manifest["tools"])
    assert all(t >= 0 for t in manifest["timings_s"].values()) and "mnn_fp16w → model.fp16.mnn" in manifest["timings_s"]
    report = (dest / "report.md").read_text()
    assert "PASSED" in report and "mnn_int8w → model.int8w.mnn" in report and "| mnn_fp32 |" in report


def test_metadata_in_onnx_and_every_mnn_file(exports):
    import MNN

    tmp, first, _ = exports
    dest = _dest(tmp, "a")
    meta = json.loads((dest / "manifest.json").read_text())["metadata"]
    assert meta["input_shape"] == [1, 3, 64, 64] and meta["output_names"] == ["logits"]
    assert meta["pconv"] == "split_cat" and meta["mlp"] == "fc" and meta["precision"] == "fp32"
    g = onnx.load(dest / "model.onnx")
    props = {p.key: p.value for p in g.metadata_props}
    assert json.loads(props["edgeport"]) == meta and props["model"] == "fasternet_t0"
    assert [i.name for i in g.graph.input] == ["input"] and [o.name for o in g.graph.output] == ["logits"]
    assert g.opset_import[0].version == 17
    for fname, precision, gelu in (("model.mnn", "fp32", "sigmoid_p4"), ("model.fp16.mnn", "fp16", "tanh"),
                                   ("model.int8w.mnn", "int8w", "tanh")):
        info = MNN.nn.load_module_from_file(str(dest / fname), [], []).get_info()
        assert json.loads(info["bizCode"]) == {**meta, "precision": precision, "gelu": gelu}
        assert info["inputNames"] == ["input"] and info["outputNames"] == ["logits"]


def test_rerun_is_byte_identical(exports):
    tmp, first, second = exports
    assert second.returncode == 0, second.stderr
    assert "parity gate skipped" in second.stdout
    for name in MODEL_FILES:
        assert _sha(_dest(tmp, "a") / name) == _sha(_dest(tmp, "b") / name), name


def test_help_documents_the_defaults():
    out = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for words in ("split_cat", "fc", "opset 17", "fasternet_t0", "recommendation.json", "exit status"):
        assert words in out.stdout


@pytest.mark.slow
def test_default_224_export_passes_the_gelu_gate(tmp_path):
    """The full-size default export: every MNN fp32 output within 1e-4 of max|ref| (exact GELU)."""
    proc = _run_export(tmp_path, tmp_path / "out", "--img-size", "224")  # the last --img-size wins
    assert proc.returncode == 0, proc.stderr
    parity = json.loads((_dest(tmp_path, "out") / "parity.json").read_text())
    assert parity["results"]["mnn_fp32"]["logits"]["max_rel"] < 1e-4
