"""One command, one result (issue 24 item 8): the int8 targets are byte-identical across runs, and an optional
target ships exactly when the final parity verdict passes it, never failing the export."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# A child process quantises tests.test_quantize's outlier network the way export.int8 does (its all-int8
# candidate misses the gate, so the fallback ranks layers and keeps some in float), with both quantisers, and
# prints each file's sha256 and what the search kept.
_BUILD = """
import hashlib, json, sys
from pathlib import Path
import numpy as np
from export import quantize
from tests.test_quantize import META, breaches, gate, run, tiny_net, to_onnx
out = Path(sys.argv[1])
rng = np.random.default_rng(0)
calib, held_out = (rng.standard_normal((16, 3, 32, 32), dtype=np.float32) for _ in range(2))
float_model = to_onnx(tiny_net(outlier=1000.0), out / "f.onnx")
ref = run(float_model, held_out, out)
layers = quantize.quantisable_nodes(float_model)
def evaluate_without(kept):
    return gate(ref, run(quantize.ort_int8(float_model, calib, exclude=kept), held_out, out), "ort", True)[0]
ranked = quantize.ort_layer_errors(float_model, quantize.ort_int8(float_model, calib), held_out, layers)
found = quantize.fallback(layers, evaluate_without, breaches, limit=0.5, ranked=ranked)
(out / "model.int8.onnx").write_bytes(quantize.ort_int8(float_model, calib, exclude=found.kept).SerializeToString())
quantize.mnn_int8(out / "f.onnx", out / "model.int8.mnn", calib[:8], json.dumps(META), skip=found.kept[:1])
files = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("f.onnx", "model.int8.onnx", "model.int8.mnn")}
print(json.dumps({"files": files, "kept": found.kept, "ranked": [name for name, _ in ranked]}))
"""


def _build_in_child(out: Path, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", _BUILD, str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_int8_build_is_byte_identical_across_processes(tmp_path):
    """Two processes (different hash seeds: set iteration order differs between them) running the same int8
    quantisation, fallback ranking and search included, write the same bytes."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _build_in_child(tmp_path / "a", "1")
    second = _build_in_child(tmp_path / "b", "2")
    assert first["kept"], first  # the fallback ran: the comparison covers the ranking and the search too
    assert first == second


def _weights(tmp_path) -> Path:
    import models

    path = tmp_path / "trained.pth"
    torch.manual_seed(0)
    torch.save(models.create_model("fasternet_t0").state_dict(), path)
    return path


def _export(tmp_path, out, *extra) -> int:
    from export.__main__ import main

    return main(["fasternet_t0", "--weights", str(_weights(tmp_path)), "--img-size", "64", "--out", str(out),
                 *extra])


def _folder(out: Path) -> Path:
    (folder,) = (p for p in (out / "fasternet_t0").iterdir() if p.is_dir() and not p.name.startswith("."))
    return folder


def test_optional_target_follows_the_final_verdict(tmp_path, monkeypatch, capsys):
    """ort_int8's outputs are corrupted in the final parity run only (its producer saw a good file): optional
    (the default with --weights), it is deleted, recorded "not_shipped" with that breach, and the export exits
    0; named in --targets, the same breach fails the export with exit 1."""
    from export import parity

    real = parity.target_outputs

    def corrupted(target, path, x, meta):
        out = real(target, path, x, meta)
        return {k: -v for k, v in out.items()} if target.name == "ort_int8" else out

    monkeypatch.setattr(parity, "target_outputs", corrupted)
    optional = tmp_path / "optional"
    assert _export(tmp_path, optional) == 0
    folder = _folder(optional)
    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["targets"]["ort_int8"]
    assert manifest["status"] == "passed" and "ort_int8" not in manifest["export"]["targets"]
    assert not (folder / "model.int8.onnx").exists() and "model.int8.onnx" not in manifest["files"]
    assert record["not_shipped"].startswith("ort_int8: cosine") and "not shipped" in (folder / "report.md").read_text()
    assert manifest["parity"]["not_shipped"]["ort_int8"] and not manifest["parity"]["breaches"]
    assert "not shipped" in capsys.readouterr().out
    shipped = "mnn_int8" in manifest["export"]["targets"]
    assert shipped == (folder / "model.int8.mnn").is_file() == ("not_shipped" not in manifest["targets"]["mnn_int8"])

    required = tmp_path / "required"
    assert _export(tmp_path, required, "--targets", "ort,ort_int8") == 1
    manifest = json.loads((_folder(required) / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "ort_int8" in manifest["export"]["targets"]
    assert any(b.startswith("ort_int8: cosine") for b in manifest["parity"]["breaches"])


@pytest.mark.slow
def test_cli_int8_export_twice_gives_the_same_files(tmp_path):
    """`python -m export fasternet_t0 --weights W` twice (int8 targets included): same files, same status."""
    runs = []
    for name in ("first", "second"):
        assert _export(tmp_path, tmp_path / name) == 0
        folder = _folder(tmp_path / name)
        manifest = json.loads((folder / "manifest.json").read_text())
        runs.append((manifest["status"], manifest["export"]["targets"],
                     {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                      for f in manifest["files"] if f.startswith("model.")}))
    assert runs[0] == runs[1] and len(runs[0][2]) >= 4, runs


def test_parity_splits_optional_breaches_from_required(tmp_path):
    """run_parity: an optional target's breach goes to not_shipped and leaves passed alone; required, it fails."""
    import copy

    from export import parity
    from export.build import build_artifact
    from tests.test_quantize import BUILD_META, tiny_net

    net = tiny_net()
    build_artifact(net, BUILD_META, tmp_path, ["ort"])
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[0].bias += 0.5  # the file no longer computes the reference
    kwargs = {"n_images": 2, "bisect": False, "write": False, "target_names": ["ort"]}
    result = parity.run_parity(tmp_path, other, None, BUILD_META, optional={"ort"}, **kwargs)
    assert result["passed"] and result["not_shipped"]["ort"] and not result["breaches"]
    assert "Not shipped ort" in result["markdown"]
    required = parity.run_parity(tmp_path, other, None, BUILD_META, **kwargs)
    assert not required["passed"] and required["breaches"] == result["not_shipped"]["ort"]
    assert parity.run_parity(tmp_path, net, None, BUILD_META, optional={"ort"}, **kwargs)["not_shipped"] == {}


def test_without_a_verdict_nothing_optional_ships(tmp_path):
    """--no-parity: no final verdict can pass the optional int8 targets, so neither is built or shipped; the
    export is unchecked."""
    out = tmp_path / "out"
    assert _export(tmp_path, out, "--no-parity") == 0
    manifest = json.loads((_folder(out) / "manifest.json").read_text())
    assert manifest["status"] == "unchecked"
    for name, file in (("ort_int8", "model.int8.onnx"), ("mnn_int8", "model.int8.mnn")):
        assert name not in manifest["export"]["targets"] and not (_folder(out) / file).exists()
        assert "--no-parity" in manifest["targets"][name]["not_shipped"]
