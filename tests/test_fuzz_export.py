"""Property-based tests (Hypothesis) of every export-side reader and command line: generated malformed
manifests, parity.json files, --gates, model YAMLs, Ultralytics checkpoints and command lines never produce a
traceback, an "internal error" or a hang: each ends with its documented exit status (docs/reference/
exit-codes.md) and one stderr line, or (a library call) EdgeportError.

The CLIs run in-process (main(argv)) to stay fast; a fixed example budget and deadline per test keep the
file well under a minute."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import signal
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from models.errors import EdgeportError

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=20), derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------- helpers
JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def run(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """main(argv) of `module` in this process: its exit status and what it printed. An exception escaping
    main is what `python -m` would show as "internal error" (cli_main): the test fails on it."""
    import importlib

    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_clean(proc: subprocess.CompletedProcess, codes=(2,)) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if currently_in_test_context():  # --hypothesis-show-statistics: what docs/reference/exit-codes.md lists
        event(f"exit {proc.returncode}")
    assert proc.returncode in codes, (proc.returncode, proc.args, proc.stderr)
    assert len(lines) == 1, (proc.args, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    return lines[0]


def mutate(doc, path: list, value, delete: bool):
    """`doc` with the node at `path` (keys/indices, clipped to what exists) replaced by `value` or deleted."""
    doc = copy.deepcopy(doc)
    node, key = None, None
    cur = doc
    for step in path:
        if isinstance(cur, dict) and cur:
            k = sorted(cur)[step % len(cur)]
        elif isinstance(cur, list) and cur:
            k = step % len(cur)
        else:
            break
        node, key, cur = cur, k, cur[k]
    if node is None:
        return value
    if delete and isinstance(node, dict):
        del node[key]
    else:
        node[key] = value
    return doc


MUTATION = st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=5), JSON, st.booleans())

# ------------------------------------------------------------------------------------------ manifest, parity
SOURCE = {"model": "fasternet_t0", "weights": None, "weights_sha256": None, "seed": 0, "img_size": 64, "batch": 1,
          "dynamic_batch": False, "features_only": False, "pconv": "split_cat", "mlp": "fc", "calibrated": True}
MANIFEST = {
    "status": "passed", "status_reason": None, "form_tag": "split_cat-fc", "source": SOURCE,
    "metadata": {"model": "fasternet_t0", "task": "classification", "input_shape": [1, 3, 64, 64],
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.9,
                 "interpolation": "bicubic", "output_names": ["logits"]},
    "export": {"targets": ["ort"], "opset": 17},
    "files": {"model.onnx": {"size": 4, "sha256": "0" * 64}},
    "parity": {"status": "passed", "passed": True, "breaches": [], "gates": {"ort": {"max_rel": 1e-5}}},
}


@pytest.fixture
def export_dir(tmp_path):
    d = tmp_path / "split_cat-fc"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"fake")  # its sha256 is not the manifest's: a valid manifest fails (1)
    return d


@FUZZ
@given(MUTATION)
def test_parity_cli_on_mutated_manifests(export_dir, mutation):
    (export_dir / "manifest.json").write_text(json.dumps(mutate(MANIFEST, *mutation)))
    line = assert_clean(run("export.parity", [str(export_dir), "--no-bisect"]), codes=(1, 2))
    assert line.startswith("parity")


@FUZZ
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_manifest_and_parity_json_readers_on_arbitrary_bytes(export_dir, data):
    from export.schemas import read_manifest, read_parity_json

    for name, read in (("manifest.json", read_manifest), ("parity.json", read_parity_json)):
        (export_dir / name).write_bytes(data)
        try:
            doc = read(export_dir)
        except EdgeportError as e:
            assert "\n" not in str(e) and name in str(e)
        else:
            assert isinstance(doc, dict)


@pytest.mark.parametrize("kind", ["deep-object", "deep-array", "fifo", "directory", "huge"])
def test_manifest_reader_bounds(export_dir, kind):
    """A 200,000-deep document, a FIFO (would hang), a directory, a 17 MB file: one line each, exit 2."""
    import os

    path = export_dir / "manifest.json"
    if kind == "deep-object":
        path.write_text('{"a":' * 200_000 + "1" + "}" * 200_000)
    elif kind == "deep-array":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b" " * (17 << 20))
    line = assert_clean(run("export.parity", [str(export_dir), "--no-bisect"]))
    assert "manifest" in line


GATE_VALUES = st.one_of(JSON, st.dictionaries(st.sampled_from(["ort", "mnn_fp32", "mnn_int8", "tflite", ""]),
                                              st.dictionaries(st.sampled_from(["max_rel", "top1", "cosine", "x"]),
                                                              JSON, max_size=3), max_size=3))


@FUZZ
@given(GATE_VALUES)
def test_parity_gates_option(tmp_path, gates):
    """Any --gates: a bad one is refused naming it, a good one gets as far as the (missing) manifest."""
    line = assert_clean(run("export.parity", [str(tmp_path), "--gates", json.dumps(gates), "--no-bisect"]))
    assert line.startswith("parity")


SOURCE_FIELDS = st.sampled_from(sorted(SOURCE))


@FUZZ
@given(SOURCE_FIELDS, JSON)
def test_build_models_refuses_bad_source_records(field, value):
    """A source record with one field of the wrong type or range: EdgeportError before any model is built."""
    from export.source import build_models

    source = {**SOURCE, field: value}
    ok = {"weights": (None,), "weights_sha256": (None,), "seed": range(0, 2**32), "img_size": (64, 96, 128, 224),
          "batch": range(1, 64), "dynamic_batch": (True, False), "features_only": (True, False),
          "calibrated": (True,), "model": ("fasternet_t0",), "pconv": ("split_cat",), "mlp": ("fc",)}
    if type(value) is type(SOURCE[field]) and value in ok[field]:
        return  # a valid record: building it is test_export's business
    with pytest.raises(EdgeportError) as e:
        build_models(source)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- export CLI
OPTIONS = ["--img-size", "--batch", "--seed", "--targets", "--pconv", "--mlp", "--opset", "--calib", "--weights",
           "--int8-mnn", "--exporter", "--simplifier", "--features-only", "--dynamic-batch", "--no-parity"]
TOKENS = st.one_of(st.sampled_from(OPTIONS), st.integers(-2**40, 2**40).map(str),
                   st.sampled_from(["ort", "mnn_int8,ort", "split_cat", "fc", "auto", "onnxsim", "yolo11n",
                                    "fasternet_t0", "", ",", "-1", "1e3", "nan", "../x", "/dev/null"]),
                   st.text(max_size=10).filter(lambda s: "\x00" not in s))


@FUZZ
@given(st.lists(TOKENS, max_size=6))
def test_export_cli_on_generated_command_lines(tmp_path, argv):
    """Any command line ends in exit 2 with one line; --out is a file, so even a valid one stops there."""
    (tmp_path / "out").write_text("a file, not a directory")
    argv = [a for a in argv if a not in ("--out", "-v", "--verbose", "-h", "--help")]
    proc = run("export.__main__", [*argv, "--out", str(tmp_path / "out")])
    assert_clean(proc)
    assert not any(p.name.startswith(".build-") for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------- model YAML, Ultralytics checkpoints
TINY_YAML = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                                   [-1, 1, "Conv", [64, 3, 2]]],
             "head": [[[0, 1, 2], 1, "Detect", ["nc"]]]}
YAML_VALUES = st.one_of(JSON, st.sampled_from(["2", "nc", "Conv", "Detect", [0.5, 0.25], [0.5], [1, 2, 3, 4],
                                                {0: "a", "1": "b"}, -7, 99, 10**9, [-1, 6], [[-1, 99]]]))


@FUZZ
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), YAML_VALUES, st.booleans())
def test_parse_model_on_mutated_yamls(path, value, delete):
    from models.yolo11 import YOLO11

    cfg = mutate(TINY_YAML, path, value, delete)
    try:
        YOLO11(cfg)
    except EdgeportError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("edit,words", [
    (lambda c: c["backbone"].__setitem__(1, [7, 1, "Conv", [32, 3, 2]]), "out of range"),  # index ahead
    (lambda c: c["head"].__setitem__(0, [[0, 1, 42], 1, "Detect", ["nc"]]), "out of range"),
    (lambda c: c["backbone"].__setitem__(0, [-1, "2", "Conv", [16, 3, 2]]), "backbone"),  # repeat a string
    (lambda c: c.update(scales={"n": [0.5, 0.25]}, scale="n"), "scales"),  # a scale with two values
    (lambda c: c["backbone"].__setitem__(0, [-1, 1, "Conv", [10**9, 3, 2]]), "out of range"),
    (lambda c: c["backbone"].__setitem__(0, [-1, 10**6, "Conv", [16, 3, 2]]), "backbone"),
    (lambda c: c.update(nc="80"), "nc"),
])
def test_parse_model_names_the_field(edit, words):
    from models.yolo11 import YOLO11

    cfg = copy.deepcopy(TINY_YAML)
    edit(cfg)
    with pytest.raises(EdgeportError, match=words) as e:
        YOLO11(cfg)
    assert "\n" not in str(e.value)


def write_checkpoint(path: Path, yaml_cfg, names=None, train_args=None) -> Path:
    """A file shaped like an Ultralytics trainer checkpoint: {"ema": DetectionModel, "train_args": ...}, the
    model pickled under Ultralytics' class name (no weights: everything here fails before they are read)."""
    module = types.ModuleType("ultralytics.nn.tasks")
    cls = type("DetectionModel", (), {"__module__": "ultralytics.nn.tasks"})
    module.DetectionModel = cls

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            return (cls, (), obj.__dict__) if isinstance(obj, cls) else NotImplemented

    model = cls()
    model.__dict__.update(yaml=yaml_cfg, names=names, _parameters={}, _buffers={}, _modules={})
    saved = {k: sys.modules.get(k) for k in ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks")}
    sys.modules.update({"ultralytics": types.ModuleType("ultralytics"), "ultralytics.nn": types.ModuleType("u"),
                        "ultralytics.nn.tasks": module})
    try:
        torch.save({"ema": model, "train_args": train_args, "version": "8.4.0"}, path,
                   pickle_module=types.SimpleNamespace(Pickler=Pickler, __name__="pickle"))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return path


CKPT_PARTS = st.tuples(st.sampled_from(["yaml", "names", "train_args"]), st.lists(st.integers(0, 50), max_size=4),
                       YAML_VALUES, st.booleans())


@FUZZ
@given(CKPT_PARTS)
def test_export_cli_on_malformed_ultralytics_checkpoints(tmp_path, part):
    """python -m export best.pt with a mutated YAML, names or train_args: exit 2, one line naming the problem."""
    which, path, value, delete = part
    docs = {"yaml": TINY_YAML, "names": {0: "a", 1: "b"}, "train_args": {"imgsz": 64, "task": "detect"}}
    docs[which] = mutate(docs[which], path, value, delete) if path else value
    ckpt = write_checkpoint(tmp_path / "best.pt", docs["yaml"], docs["names"], docs["train_args"])
    (tmp_path / "out").write_text("a file, not a directory")  # a valid checkpoint stops at --out
    assert_clean(run("export.__main__", [str(ckpt), "--out", str(tmp_path / "out")]))


@pytest.mark.parametrize("names", [{0: "a", "1": "b"}, {"0": "a"}, {0: 1}, {-1: "a"}, "ab", [1, 2]])
def test_checkpoint_names_of_the_wrong_kind_are_one_line(tmp_path, names):
    from models.ultralytics_ckpt import read_ultralytics

    ckpt = write_checkpoint(tmp_path / "best.pt", TINY_YAML, names, {"imgsz": 64})
    with pytest.raises(EdgeportError, match="names") as e:
        read_ultralytics(ckpt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("imgsz", [100, 33, 16, 10**6, [640, 320], [96, 100]])
def test_a_checkpoints_image_size_is_not_reported_as_the_users(tmp_path, imgsz):
    """The training size a checkpoint carries is named as such, with the option that overrides it; the user
    passed no --img-size, so no line may say they did."""
    ckpt = write_checkpoint(tmp_path / "best.pt", TINY_YAML, {0: "a", 1: "b"}, {"imgsz": imgsz, "task": "detect"})
    line = assert_clean(run("export.__main__", [str(ckpt), "--out", str(tmp_path / "out")]))
    assert "imgsz" in line and "pass --img-size" in line, line
    assert f"--img-size {imgsz}" not in line


ISSUE_CHECKPOINTS = {  # the issue's examples: (yaml edit, names, words of the one line)
    "layer-index-out-of-range": (lambda c: c["head"].__setitem__(0, [[0, 1, 9], 1, "Detect", ["nc"]]), None,
                                 "out of range"),
    "repeat-a-string": (lambda c: c["backbone"][1].__setitem__(1, "2"), None, "backbone[1][1]"),
    "scale-with-two-values": (lambda c: c.update(scales={"n": [0.5, 0.25]}, scale="n"), None, "scales"),
    "names-with-mixed-keys": (None, {0: "a", "1": "b"}, "names"),
}


@pytest.mark.parametrize("case", list(ISSUE_CHECKPOINTS))
def test_export_of_the_issues_malformed_checkpoints(case, tmp_path):
    """python -m export best.pt with a usable --out: exit 2, the field named, no directory left behind."""
    edit, names, words = ISSUE_CHECKPOINTS[case]
    cfg = copy.deepcopy(TINY_YAML)
    if edit:
        edit(cfg)
    ckpt = write_checkpoint(tmp_path / "best.pt", cfg, names or {0: "a", 1: "b"}, {"imgsz": 64, "task": "detect"})
    out = tmp_path / "out"
    line = assert_clean(run("export.__main__", [str(ckpt), "--out", str(out)]))
    assert words in line, line
    assert not out.exists() or not any(out.rglob("*"))
