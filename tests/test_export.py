"""Export pieces: graph lint, ONNX metadata, MNN conversion (determinism, failures, GELU), output silencing,
form resolution, and the pipeline's failure handling (in-process, small inputs)."""
from __future__ import annotations

import ctypes
import hashlib
import json
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import graph, mnn_convert, onnx_export, pipeline
from export.__main__ import main
from export._console import redirect_fds
from models.errors import EdgeportError
from models.layers import PartialConv, PointwiseMlp

TINY_META = {"input_name": "input", "output_names": ["out"], "input_shape": [1, 8, 32, 32]}


class PConvMlp(nn.Module):
    def __init__(self, pconv="split_cat", mlp="conv"):
        super().__init__()
        self.pconv = PartialConv(8, 4, form=pconv)
        self.mlp = PointwiseMlp(8, 16, form=mlp)

    def forward(self, x):
        return x + self.mlp(self.pconv(x))


def _export(tmp_path, module, name="m.onnx") -> onnx.ModelProto:
    torch.manual_seed(0)
    g = onnx_export.export_onnx(module.eval(), tmp_path / name, TINY_META)
    return onnx_export.simplify(g, "onnxsim")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- graph lint
def test_lint_flags_the_slicing_scatter_and_the_fc_transpose(tmp_path):
    good = graph.op_histogram(_export(tmp_path, PConvMlp("split_cat", "conv")))
    assert "ScatterND" not in good and "Transpose" not in good and good["Split"] == 1
    assert graph.lint(good, "split_cat", "conv") == []

    sliced = graph.op_histogram(_export(tmp_path, PConvMlp("slicing", "fc")))
    assert sliced.get("ScatterND") and sliced.get("Transpose")
    warnings = graph.lint(sliced, "split_cat", "conv")  # what a mislabelled form would look like
    assert any("ScatterND" in w for w in warnings) and any("Transpose" in w for w in warnings)
    assert graph.lint(sliced, "slicing", "fc") == []  # ...and what the honest label allows
    detector = graph.lint({"Transpose": 5}, "split_cat", "conv", task="detection")  # DFL, attention, outputs
    assert detector == [] and graph.lint({"Transpose": 5}, "split_cat", "conv")


def test_op_histogram_order_is_stable():
    g = onnx.helper.make_graph([onnx.helper.make_node(op, ["x"], [f"y{i}"]) for i, op in
                                enumerate(["Relu", "Add", "Relu", "Add", "Abs"])], "g", [], [])
    hist = graph.op_histogram(onnx.helper.make_model(g))
    assert list(hist.items()) == [("Add", 2), ("Relu", 2), ("Abs", 1)]


# ------------------------------------------------------------------------------------------- ONNX metadata
def test_metadata_props_carry_the_contract_json(tmp_path):
    meta = {"model": "x", "input_shape": [-1, 3, 64, 64], "pconv": None, "precision": "fp32"}
    g = onnx_export.set_metadata(_export(tmp_path, PConvMlp()), meta)
    props = {p.key: p.value for p in g.metadata_props}
    assert json.loads(props["edgeport"]) == meta
    assert props["model"] == "x" and json.loads(props["input_shape"]) == [-1, 3, 64, 64]
    assert props["edgeport"] == onnx_export.metadata_json(meta)  # canonical: sorted keys, no spaces


@pytest.mark.parametrize("opset,exporter,simplifier", [(99, "legacy", "onnxsim"), (12, "legacy", "onnxsim"),
                                                       (17, "torchscript", "onnxsim"), (17, "legacy", "x")])
def test_bad_export_options_are_refused(opset, exporter, simplifier):
    with pytest.raises(EdgeportError):
        onnx_export.check_options(opset, exporter, simplifier)


# ---------------------------------------------------------------------------------------- MNN conversion
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    g = _export(d, PConvMlp())
    onnx.save(g, d / "model.onnx")
    return d / "model.onnx"


@pytest.mark.parametrize("precision", mnn_convert.PRECISIONS)
def test_mnn_conversion_is_byte_reproducible(tiny_onnx, tmp_path, precision):
    a = mnn_convert.convert(tiny_onnx, tmp_path / "a.mnn", "{}", precision)
    b = mnn_convert.convert(tiny_onnx, tmp_path / "b.mnn", "{}", precision)
    assert _sha(a) == _sha(b)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        mnn_convert.read_uuid(a))


def test_without_the_uuid_fix_conversions_differ(tiny_onnx, tmp_path, monkeypatch):
    """The converter stamps a random uuid4; this is what make_uuid_deterministic removes."""
    monkeypatch.setattr(mnn_convert, "make_uuid_deterministic", lambda path: None)
    a = mnn_convert.convert(tiny_onnx, tmp_path / "a.mnn", "{}")
    b = mnn_convert.convert(tiny_onnx, tmp_path / "b.mnn", "{}")
    assert _sha(a) != _sha(b) and mnn_convert.read_uuid(a) != mnn_convert.read_uuid(b)


def test_patched_mnn_file_still_loads_with_its_biz_code(tiny_onnx, tmp_path):
    import runtime

    biz = onnx_export.metadata_json({"model": "tiny", "precision": "fp16"})
    path = mnn_convert.convert(tiny_onnx, tmp_path / "m.mnn", biz, "fp16")
    out = runtime.load(path, backend="mnn").run(np.zeros((1, 8, 32, 32), np.float32))
    assert out["out"].shape == (1, 8, 32, 32)
    import MNN

    info = MNN.nn.load_module_from_file(str(path), [], []).get_info()
    assert info["bizCode"] == biz


def test_converter_that_writes_nothing_is_an_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EdgeportError, match="produced no fp32 model"):
        mnn_convert.convert(bad, tmp_path / "m.mnn", "{}", log_path=tmp_path / "log")
    assert not (tmp_path / "m.mnn").exists()


# ------------------------------------------------------------------------------------------- GELU (slow-ish)
@pytest.mark.parametrize("name", ["fasternet_t0", "convnext_atto"])
def test_gelu_approximation_is_caught_by_the_gate_metric(tmp_path, name):
    """Exact GELU matches the reference within 1e-4 of max|ref|; the converter's default tanh approximation is
    measurably worse: above the 1e-4 gate for FasterNet-T0 (≈2e-4), ~100× the exact error for ConvNeXt-atto
    (≈5e-5: under 1e-4, so only a tighter gate would fail it — see the export notes)."""
    import runtime
    from export.inputs import sample_batch
    from export.source import build_models, make_source
    from models.metrics import max_rel

    reference, inference, meta = build_models(make_source(name, img_size=64))
    g = onnx_export.simplify(onnx_export.export_onnx(inference, tmp_path / "raw.onnx", meta))
    onnx.save(g, tmp_path / "model.onnx")
    x = sample_batch(meta, n_images=8, n_random=0)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    errors = {}
    for approx in (False, True):
        path = mnn_convert.convert(tmp_path / "model.onnx", tmp_path / f"m{approx:d}.mnn", "{}",
                                   gelu_approximation=approx)
        predictor = runtime.load(path, backend="mnn")
        out = np.concatenate([predictor.run(x[i:i + 1])["logits"] for i in range(len(x))])
        errors[approx] = max_rel(ref, out)
    assert errors[False] < 1e-4, errors
    assert errors[True] > 20 * errors[False], errors
    if name == "fasternet_t0":
        assert errors[True] > 1e-4, errors


# ----------------------------------------------------------------------------------------- console output
def test_redirect_fds_captures_c_level_output(tmp_path, capfd):
    libc = ctypes.CDLL(None)
    log = tmp_path / "log"
    with redirect_fds(log):
        libc.puts(b"from C stdio")  # buffered in C, below sys.stdout: must be flushed into the log
        libc.write(2, b"raw fd 2\n", 9)
    libc.puts(b"after")
    libc.fflush(None)
    captured = capfd.readouterr()
    assert "from C stdio" not in captured.out and "raw fd 2" not in captured.err and "after" in captured.out
    assert "from C stdio" in log.read_text() and "raw fd 2" in log.read_text()


# ------------------------------------------------------------------------------------------- form choice
def test_forms_fall_back_to_measured_defaults_without_recommendation(tmp_path):
    pconv, mlp, note = pipeline.resolve_forms("fasternet_t0", "auto", "auto", tmp_path / "results" / "r.json")
    assert (pconv, mlp) == ("split_cat", "fc") and "measured defaults" in note


def test_forms_follow_the_most_specific_recommendation(tmp_path):
    rec = tmp_path / "recommendation.json"
    rec.write_text(json.dumps({"pconv": "slicing", "mlp": "conv",
                               "by_family": {"fasternet": {"pconv": "full"}},
                               "by_model": {"convnext_atto": {"mlp": "fc"}}}))
    assert pipeline.resolve_forms("fasternet_t0", "auto", "auto", rec)[:2] == ("full", "conv")
    assert pipeline.resolve_forms("convnext_atto", "auto", "auto", rec)[:2] == ("slicing", "fc")
    assert pipeline.resolve_forms("fasternet_t0", "split_cat", "auto", rec)[:2] == ("split_cat", "conv")
    rec.write_text(json.dumps({"pconv": "bogus"}))
    assert pipeline.resolve_forms("fasternet_t0", "auto", "auto", rec)[:2] == ("split_cat", "fc")


# ------------------------------------------------------------------------------- CLI errors (in-process)
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: error:"), err
    return err[0]


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["fasternet_t9", "--out", str(tmp_path)]) == 2
    assert "fasternet_t0" in _one_line_error(capsys)  # closest names are suggested
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,words", [
    (["--opset", "99"], "opset"),
    (["--weights", "/nonexistent/w.pth"], "not found"),
    (["--img-size", "100"], "multiple of 32"),
])
def test_bad_options_fail_before_any_work(tmp_path, capsys, args, words):
    assert main(["fasternet_t0", "--out", str(tmp_path), *args]) == 2
    assert words in _one_line_error(capsys)
    assert not any(tmp_path.iterdir())


def test_unreadable_and_mismatched_weights(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 64)
    assert main(["fasternet_t0", "--weights", str(garbage), "--out", str(tmp_path / "a"), "--no-parity"]) == 2
    assert "garbage.pth" in _one_line_error(capsys)
    torch.save({"stem.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "other.pth")
    assert main(["fasternet_t0", "--weights", str(tmp_path / "other.pth"), "--out", str(tmp_path / "b"),
                 "--no-parity"]) == 2
    assert "does not fit fasternet_t0" in _one_line_error(capsys)
    for out in ("a", "b"):  # nothing left behind, not even the build dir
        assert not any(p for p in (tmp_path / out).rglob("*") if p.is_file())


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    assert main(["fasternet_t0", "--out", str(blocker / "sub"), "--no-parity"]) == 2
    assert "cannot write to --out" in _one_line_error(capsys)


FORMS = ("--pconv", "split_cat", "--mlp", "fc")  # fixed, whatever benchmarks/results/recommendation.json says


def _previous_artifacts(out):
    dest = out / "fasternet_t0" / "split_cat-fc"
    dest.mkdir(parents=True)
    (dest / "model.onnx").write_bytes(b"previous good export")
    (dest / "manifest.json").write_text('{"status": "passed"}')
    return dest


def test_failing_converter_leaves_previous_artifacts_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("_tools.mnnconvert", lambda argv: True)  # "succeeds" but writes nothing
    dest = _previous_artifacts(tmp_path)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert main(["fasternet_t0", "--img-size", "64", "--out", str(tmp_path), "--no-parity", *FORMS]) == 2
    assert "MNN converter produced no fp32 model" in _one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in dest.parent.iterdir()] == ["split_cat-fc"]  # no build dir left behind


@pytest.mark.parametrize("previous", ["passed", "failed"])
def test_parity_breach_exits_1_and_never_replaces_a_passing_export(previous, tmp_path, capsys, monkeypatch):
    """A failed export is kept for inspection (status "failed"): in place of a failed previous one, beside a
    passing one (<tag>.failed), which stays byte-identical."""
    def failing_parity(artifact_dir, reference, inference, meta, gates=None, target_names=None, **options):
        assert (artifact_dir / "model.mnn").is_file() and meta["precision"] == "fp32"
        return {"passed": False, "breaches": ["mnn_fp32: max_rel 2e-04 > 1e-04"], "gates": {}, "results": {},
                "markdown": "| table |"}

    monkeypatch.setattr(pipeline, "_parity_function", lambda: (failing_parity, None))
    dest = _previous_artifacts(tmp_path)
    (dest / "manifest.json").write_text(json.dumps({"status": previous}))
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert main(["fasternet_t0", "--img-size", "64", "--out", str(tmp_path), "--targets", "ort,mnn_fp32",
                 *FORMS]) == 1
    failed = dest.with_name(dest.name + ".failed") if previous == "passed" else dest
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "max_rel 2e-04" in manifest["status_reason"]
    assert (failed / "model.onnx").read_bytes() != b"previous good export"
    assert sorted(manifest["files"]) == ["export.log", "model.mnn", "model.onnx"]
    assert "FAILED" in (failed / "report.md").read_text()
    if previous == "passed":
        assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
        assert str(failed) in capsys.readouterr().out


def test_missing_parity_gate_is_visible_and_marks_unchecked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "_parity_function", lambda: (None, "export/parity.py not found"))
    argv = ["fasternet_t0", "--img-size", "64", "--out", str(tmp_path), "--features-only", "--dynamic-batch",
            "--targets", "ort", "--pconv", "slicing", "--mlp", "fc"]
    assert main(argv) == 0
    dest = tmp_path / "fasternet_t0" / "slicing-fc-features"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["status"] == "unchecked" and "not available" in manifest["status_reason"]
    assert sorted(manifest["files"]) == ["export.log", "model.onnx"]
    g = onnx.load(dest / "model.onnx")
    assert [o.name for o in g.graph.output] == ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert manifest["metadata"]["input_shape"] == [-1, 3, 64, 64]
    assert manifest["onnx"]["op_histogram"]["ScatterND"]


# ------------------------------------------------------------------------------------------- fp16 weights
def test_fp16_rounding_is_nearest_and_only_touches_weights(tiny_onnx):
    from onnx import numpy_helper

    def arrays(model):
        return {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}

    model = onnx.load(tiny_onnx)
    before = arrays(model)
    rounded = arrays(mnn_convert.round_weights_to_fp16(model))
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    assert weights and all(np.array_equal(w, before[n]) for n, w in arrays(model).items())  # input untouched
    for name, w in before.items():
        expected = w.astype(np.float16).astype(np.float32) if name in weights else w
        assert np.array_equal(rounded[name], expected), name
    assert any(not np.array_equal(rounded[n], before[n]) for n in weights)


def _mnn_vs_ort(mnn_path, onnx_model, x) -> float:
    import onnxruntime as ort

    import runtime

    ref = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    out = runtime.load(mnn_path, backend="mnn").run(x)["out"]
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_fp16_file_computes_the_round_to_nearest_network(tiny_onnx, tmp_path, monkeypatch):
    """MNN's own cast truncates toward zero; with our pre-rounding the .fp16.mnn equals the rounded network to
    float32 precision, without it the truncation shows as a real error."""
    x = np.random.default_rng(0).standard_normal((1, 8, 32, 32)).astype(np.float32)
    nearest = mnn_convert.round_weights_to_fp16(onnx.load(tiny_onnx))
    fixed = _mnn_vs_ort(mnn_convert.convert(tiny_onnx, tmp_path / "a.mnn", "{}", "fp16"), nearest, x)
    monkeypatch.setattr(mnn_convert, "round_weights_to_fp16", lambda model: model)
    truncated = _mnn_vs_ort(mnn_convert.convert(tiny_onnx, tmp_path / "b.mnn", "{}", "fp16"), nearest, x)
    assert fixed < 1e-6 and truncated > max(100 * fixed, 1e-5), (fixed, truncated)
