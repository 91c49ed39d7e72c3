"""Bad input to `python -m export` and `python -m export.parity`: every case gets its exit status, exactly one
line on stderr (no traceback), and leaves a prior passing export byte-identical.

The runtime's and the checkpoint loader's cases are in test_bad_input.py."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL, TAG = "fasternet_t0", "split_cat-fc"
BASE = ["--img-size", "64", "--pconv", "split_cat", "--mlp", "fc", "--targets", "ort,mnn_fp32"]


def run(*argv: str, module: str = "export") -> subprocess.CompletedProcess:
    """The CLI's main() in this process (a subprocess per case costs ~20 s of imports on a busy machine);
    `run_process` checks the real command line the same way."""
    import importlib
    import signal

    main = importlib.import_module("export.__main__" if module == "export" else module).main
    out, err, handler = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # what a user's interpreter shows
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_process(*argv: str, module: str = "export") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_one_line(proc: subprocess.CompletedProcess, code: int, words: str = "") -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A passing export (the good artifact every bad run must leave alone) and a state dict of the model."""
    out = tmp_path_factory.mktemp("prior")
    proc = run_process(MODEL, "--out", str(out), *BASE)
    assert proc.returncode == 0, proc.stderr
    from export.source import build_models, make_source

    reference, _, _ = build_models(make_source(MODEL, img_size=64))
    return out, {k: v.clone() for k, v in reference.state_dict().items()}


def _safetensors(path: Path, state: dict) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _poisoned(state: dict, value: float) -> dict:
    bad = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    bad[key] = state[key].clone()
    bad[key].view(-1)[0] = value
    return bad


def weights_file(kind: str, d: Path, state: dict) -> str:
    if kind == "text":
        (d / "w.pth").write_text("these are not weights\n")
    elif kind == "csv":
        (d / "w.pth").write_text("name,value\nconv,1.0\n")
    elif kind == "empty":
        (d / "w.pth").write_bytes(b"")
    elif kind == "int64":
        return _safetensors(d / "w.safetensors", {k: v.to(torch.int64) if v.is_floating_point() else v
                                                  for k, v in state.items()})
    elif kind in ("nan", "inf"):
        return _safetensors(d / "w.safetensors", _poisoned(state, math.nan if kind == "nan" else math.inf))
    elif kind == "pickle":  # would create a marker file if unpickled
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {d / 'pwned'}",))
        (d / "w.pth").write_bytes(pickle.dumps({"state_dict": Evil()}))
    elif kind == "missing":
        return str(d / "nope.pth")
    return str(d / "w.pth")


EXPORT_CASES = [  # (id, extra argv, words in the one error line)
    ("img-size-0", ["--img-size", "0"], "--img-size 0"),
    ("img-size-not-stride", ["--img-size", "100"], "multiple of 32"),
    ("img-size-huge", ["--img-size", "65536"], "memory"),
    ("img-size-text", ["--img-size", "big"], "invalid int"),
    ("seed-negative", ["--seed", "-1"], "--seed"),
    ("seed-huge", ["--seed", str(2**40)], "--seed"),
    ("batch-0", ["--batch", "0"], "--batch"),
    ("unknown-target", ["--targets", "tflite"], "tflite"),
    ("empty-targets", ["--targets", ","], "targets"),
    ("unknown-pconv", ["--pconv", "diagonal"], "--pconv"),
    ("opset-too-old", ["--opset", "9"], "opset"),
    ("unknown-simplifier", ["--simplifier", "magic"], "simplifier"),
    ("unknown-option", ["--colour", "blue"], "unrecognized"),
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_refuses_bad_options(case, prior):
    out, _ = prior
    before = snapshot(out)
    _, extra, words = case
    assert_one_line(run(MODEL, "--out", str(out), *BASE, *extra), 2, words)
    assert snapshot(out) == before


WEIGHT_CASES = [("text", "text"), ("csv", "csv"), ("empty", "empty"), ("int64", "int64"), ("nan", "nan"),
                ("inf", "nan"), ("pickle", "refuse"), ("missing", "not found")]


@pytest.mark.parametrize("kind,words", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_export_refuses_bad_weights_before_building(kind, words, prior, tmp_path):
    """Garbage weights are bad input (exit 2), never a passing or a failed export; the prior one is kept."""
    out, state = prior
    before = snapshot(out)
    path = weights_file(kind, tmp_path, state)
    assert_one_line(run(MODEL, "--out", str(out), *BASE, "--weights", path), 2, words)
    assert snapshot(out) == before
    assert not (tmp_path / "pwned").exists()


def test_export_refuses_an_unknown_model_and_leaves_no_directory(tmp_path):
    assert_one_line(run_process("resnet_9000", "--out", str(tmp_path)), 2, "resnet_9000")
    assert_one_line(run("../../etc", "--out", str(tmp_path)), 2, "etc")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_unwritable_destination(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line(run(MODEL, "--out", str(blocker), *BASE), 2, "--out")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert_one_line(run(MODEL, "--out", str(ro), *BASE), 2, "--out")


def test_stale_build_directories_of_dead_processes_are_swept(prior, tmp_path):
    from export.install import make_build_dir

    out = tmp_path / "out"
    dead = out / MODEL / ".build-999999999-abcd"  # no such pid
    dead.mkdir(parents=True)
    live = out / MODEL / f".build-{os.getpid()}-efgh"
    live.mkdir()
    build = make_build_dir(out, MODEL)
    assert not dead.exists() and live.exists() and build.exists()


# ------------------------------------------------------------------------------------------------ parity
@pytest.fixture()
def copy_of_prior(prior, tmp_path):
    out, _ = prior
    d = tmp_path / TAG
    shutil.copytree(out / MODEL / TAG, d)
    return d


def _edit_manifest(d: Path, edit) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))


MANIFEST_EDITS = {
    "img-size-text": lambda m: m["source"].update(img_size="abc"),
    "img-size-huge": lambda m: m["source"].update(img_size=2**20),
    "seed-negative": lambda m: m["source"].update(seed=-1),
    "model-unknown": lambda m: m["source"].update(model="resnet_9000"),
    "pconv-unknown": lambda m: m["source"].update(pconv="diagonal"),
    "no-source": lambda m: m.pop("source"),
    "source-lacks-keys": lambda m: m["source"].pop("seed"),
    "flag-not-bool": lambda m: m["source"].update(features_only="yes"),
    "weights-not-path": lambda m: m["source"].update(weights=42),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS), ids=list(MANIFEST_EDITS))
def test_parity_refuses_hand_edited_manifests(edit, copy_of_prior):
    _edit_manifest(copy_of_prior, MANIFEST_EDITS[edit])
    before = snapshot(copy_of_prior)
    assert_one_line(run(str(copy_of_prior), module="export.parity"), 2, "")
    assert snapshot(copy_of_prior) == before


PARITY_OPTION_CASES = [
    ("gates-not-json", ["--gates", "{nope"], "--gates"),
    ("gates-unknown-metric", ["--gates", '{"ort": {"speed": 1}}'], "speed"),
    ("gates-unknown-target", ["--gates", '{"tflite": {"max_rel": 1}}'], "tflite"),
    ("gates-negative", ["--gates", '{"ort": {"max_rel": -1}}'], "non-negative"),
    ("gates-nan", ["--gates", '{"ort": {"max_rel": NaN}}'], "finite"),
    ("n-images-0", ["--n-images", "0"], "--n-images"),
]


@pytest.mark.parametrize("case", PARITY_OPTION_CASES, ids=[c[0] for c in PARITY_OPTION_CASES])
def test_parity_refuses_bad_options(case, copy_of_prior):
    _, extra, words = case
    before = snapshot(copy_of_prior)
    assert_one_line(run(str(copy_of_prior), *extra, "--no-bisect", module="export.parity"), 2, words)
    assert snapshot(copy_of_prior) == before


def test_parity_refuses_what_is_not_an_export(tmp_path):
    assert_one_line(run_process(str(tmp_path / "missing"), module="export.parity"), 2, "not found")
    assert_one_line(run(str(tmp_path), module="export.parity"), 2, "manifest.json")
    (tmp_path / "manifest.json").write_text("[1, 2")
    assert_one_line(run(str(tmp_path), module="export.parity"), 2, "not JSON")


@pytest.mark.parametrize("defect", ["all-model-files-deleted", "onnx-deleted", "mnn-replaced-by-onnx"])
def test_parity_fails_on_files_that_are_not_the_exported_ones(defect, copy_of_prior):
    d = copy_of_prior
    if defect == "all-model-files-deleted":
        for f in ("model.onnx", "model.mnn"):
            (d / f).unlink()
    elif defect == "onnx-deleted":
        (d / "model.onnx").unlink()
    else:
        shutil.copyfile(d / "model.onnx", d / "model.mnn")
    line = assert_one_line(run_process(str(d), "--no-bisect", module="export.parity"), 1, "model.")
    assert "manifest" in line


def test_parity_write_into_a_read_only_directory_is_one_line(copy_of_prior):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    os.chmod(copy_of_prior, 0o555)
    try:
        assert_one_line(run(str(copy_of_prior), "--write", "--no-bisect", module="export.parity"), 2,
                        "permission denied")
    finally:
        os.chmod(copy_of_prior, 0o755)


def test_parity_write_keeps_the_manifest_true(copy_of_prior):
    proc = run(str(copy_of_prior), "--write", "--no-bisect", module="export.parity")
    assert proc.returncode == 0, proc.stderr
    again = run(str(copy_of_prior), "--no-bisect", module="export.parity")
    assert again.returncode == 0, again.stderr
    assert np.isfinite(json.loads((copy_of_prior / "parity.json").read_text())["results"]["ort"]["logits"]
                       ["max_rel"])


# ------------------------------------------------------------------------- parity trusts only the code (issue 24)
def _rehash(d: Path, edit=None) -> None:
    """What a careful tamperer does after changing a file: regenerate the manifest's hashes."""
    from export.manifest import file_entries

    manifest = json.loads((d / "manifest.json").read_text())
    if edit:
        edit(manifest)
    manifest["files"] = file_entries(d)
    (d / "manifest.json").write_text(json.dumps(manifest))


def _edit_onnx(path: Path, meta_edit=None, weight_scale=None) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    if meta_edit:
        for prop in model.metadata_props:
            if prop.key == "edgeport":
                meta = json.loads(prop.value)
                meta_edit(meta)
                prop.value = json.dumps(meta)
    if weight_scale:
        init = next(i for i in model.graph.initializer if len(i.dims) == 4)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * weight_scale, init.name))
    onnx.save(model, str(path))


META_EDITS = {  # field: a value a hand-edit could give it
    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "interpolation": "bilinear",
    "input_shape": [2, 3, 64, 64], "task": "features", "num_classes": 10, "output_names": ["scores"],
}


@pytest.mark.parametrize("field", list(META_EDITS))
def test_parity_fails_an_artifact_whose_embedded_metadata_was_edited(field, copy_of_prior):
    """model.onnx's metadata edited and the hashes regenerated: the files agree with the manifest, not with
    the source. Exit 1, naming the file and the field."""
    d = copy_of_prior
    _edit_onnx(d / "model.onnx", meta_edit=lambda m: m.update({field: META_EDITS[field]}))
    _rehash(d)
    line = assert_one_line(run(str(d), "--no-bisect", module="export.parity"), 1, "model.onnx")
    assert field in line


def test_parity_fails_an_mnn_whose_embedded_metadata_was_edited(copy_of_prior):
    from export.mnn_convert import convert

    d = copy_of_prior
    meta = json.loads((d / "manifest.json").read_text())["metadata"]
    convert(d / "model.onnx", d / "model.mnn", json.dumps({**meta, "crop_pct": 0.5}), "fp32")
    _rehash(d)
    line = assert_one_line(run(str(d), "--no-bisect", module="export.parity"), 1, "model.mnn")
    assert "crop_pct" in line


@pytest.mark.parametrize("field", ["mean", "crop_pct", "interpolation", "task", "num_classes", "output_names"])
def test_parity_fails_a_manifest_whose_metadata_was_edited(field, copy_of_prior):
    d = copy_of_prior
    _rehash(d, lambda m: m["metadata"].update({field: META_EDITS[field]}))
    line = assert_one_line(run(str(d), "--no-bisect", module="export.parity"), 1, "manifest.json")
    assert field in line and "source" in line


def test_parity_never_takes_the_manifests_gates(copy_of_prior):
    """A swapped-in ONNX that breaches, with the manifest's recorded gates loosened to 100: still exit 1 (the
    registry's gates judge); the same loosening given on the command line is taken, printed and recorded."""
    d = copy_of_prior
    _edit_onnx(d / "model.onnx", weight_scale=1.5)
    loose = {t: {"max_rel": 100.0} for t in ("ort", "mnn_fp32", "torch_inference")}
    _rehash(d, lambda m: m["parity"].update(gates=loose))
    proc = run(str(d), "--no-bisect", module="export.parity")
    assert proc.returncode == 1 and "ort: max_rel" in proc.stderr, proc.stderr
    proc = run(str(d), "--no-bisect", "--write", "--gates", json.dumps({"ort": {"max_rel": 100.0}}),
               module="export.parity")
    assert proc.returncode == 0, proc.stderr
    assert "gates overridden" in proc.stdout
    assert json.loads((d / "parity.json").read_text())["gates_override"] == {"ort": {"max_rel": 100.0}}


# ------------------------------------------------------------------------------------ smaller cases (item 9)
SHADOWED = ["fasternet_t0", "convnext_atto", "yolo11n", "efficientnetv2_s", "inception_next_atto"]


@pytest.mark.parametrize("name", SHADOWED)
def test_a_file_named_like_a_model_does_not_shadow_it(name, tmp_path, monkeypatch):
    from export.__main__ import _is_checkpoint_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    assert not _is_checkpoint_path(name)
    assert _is_checkpoint_path(f"./{name}") and _is_checkpoint_path(str(tmp_path / name))
    (tmp_path / "out").write_text("a file")
    line = assert_one_line(run(name, "--out", "out", "--img-size", "64"), 2, "--out")
    assert "checkpoint" not in line


def _build_dir(parent: Path) -> Path:
    build = parent / ".build-test"
    build.mkdir(parents=True)
    (build / "manifest.json").write_text('{"status": "passed"}')
    return build


@pytest.mark.parametrize("kind", ["file", "symlink", "user-directory", "failed-file"])
def test_a_users_file_where_a_form_directory_goes_is_refused(kind, tmp_path):
    """Never moved aside to a hidden name or deleted: refused in one line, left as it was."""
    from export.install import install

    parent = tmp_path / "fasternet_t0"
    build = _build_dir(parent)
    dest = parent / "split_cat-fc"
    victim = dest.with_name(dest.name + ".failed") if kind == "failed-file" else dest
    if kind in ("file", "failed-file"):
        victim.write_text("my notes")
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        victim.symlink_to(tmp_path / "elsewhere")
    else:
        victim.mkdir()
        (victim / "thesis.tex").write_text("my thesis")
    before = snapshot(tmp_path)
    with pytest.raises(Exception) as e:
        install(build, dest, "passed")
    assert type(e.value).__name__ == "EdgeportError" and str(victim) in str(e.value), e.value
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")}  # the lock stays
    assert after == before
    assert not [p for p in parent.iterdir() if ".old-" in p.name]


def test_export_onto_a_users_file_leaves_it_and_no_build(tmp_path):
    dest = tmp_path / MODEL / TAG
    dest.parent.mkdir(parents=True)
    dest.write_text("my notes")
    assert_one_line(run(MODEL, "--out", str(tmp_path), *BASE), 2, "not an export directory")
    assert dest.read_text() == "my notes"
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")) == [TAG]


# ------------------------------------------------------------------ the environment fails (issue 24, item 5)
def _fail(err):
    def raise_(*args, **kwargs):
        raise err
    return raise_


ENV_FAILURES = {  # id: (what to patch, the error, words of the one line)
    "enospc-onnx-save": ("onnx.save_model", OSError(28, "No space left on device"), "no space left"),
    "edquot-manifest": ("export.pipeline.write_json", OSError(122, "Disk quota exceeded"), "quota"),
    "emfile-mnn": ("export.mnn_convert.convert", OSError(24, "Too many open files"), "too many open files"),
    "enomem-build": ("export.pipeline.build_models", MemoryError(), "out of memory"),
    "erofs-report": ("export.pipeline.write_report", OSError(30, "Read-only file system"), "read-only"),
}


@pytest.mark.parametrize("case", list(ENV_FAILURES))
def test_environment_failures_are_bad_input(case, prior, monkeypatch):
    """ENOSPC, EDQUOT, EMFILE, ENOMEM, EROFS at several steps: exit 2, one line saying what ran out, the prior
    export byte-identical, no build directory left."""
    out, _ = prior
    target, err, words = ENV_FAILURES[case]
    module, _, name = target.rpartition(".")
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name, _fail(err))
    before = snapshot(out)
    assert_one_line(run(MODEL, "--out", str(out), *BASE), 2, words)
    assert snapshot(out) == before
    assert not list((out / MODEL).glob(".build-*"))


@pytest.mark.parametrize("errno_, words", [(28, "no space left"), (13, "permission denied"), (24, "too many open")])
def test_parity_write_environment_failures_are_bad_input(errno_, words, copy_of_prior, monkeypatch):
    import export.parity

    monkeypatch.setattr(export.parity, "write_json", _fail(OSError(errno_, os.strerror(errno_))))
    before = snapshot(copy_of_prior)
    assert_one_line(run(str(copy_of_prior), "--write", "--no-bisect", module="export.parity"), 2, words)
    assert snapshot(copy_of_prior) == before
