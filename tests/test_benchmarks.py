"""Benchmarks: interleaved timing and ratios on a fake clock, the recommendation file export reads, the seed
verdicts, the int8 / fp16 verdicts and ARM count ratios, and one real quick run of the harness (tiny inputs: a
classifier's two forms, a detector's forms beside plain yolo11n, the precision files; two rounds). No timing
thresholds."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import precision, report, timing
from benchmarks.__main__ import DEFAULT_DETECTORS, DEFAULT_MODELS, main, parse_args, resolve
from benchmarks.arm import cost
from export import pipeline
from models.errors import EdgeportError

ALL_PRECISION = [t for group in precision.PRECISION_TARGETS.values() for t in group]
ROW_KEYS = {"median_ms", "p10_ms", "p90_ms", "iters", "ratio", "ratio_p10", "ratio_p90", "gflops_per_s",
            "roof_fraction"}


class FakeClock:
    """time.perf_counter that only moves when a fake workload 'runs' for a set duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, seconds, log=None, name=None):
        def run():
            if log is not None:
                log.append(name)
            self.now += seconds
        return run


def test_interleaved_rotates_order_each_round(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    fns = {n: clock.work(1.0, calls, n) for n in "abc"}
    times = timing.interleaved(fns, iters=3, warmup=1)
    rounds = [calls[i:i + 3] for i in range(3, 12, 3)]  # the first 3 calls are the warm-up
    assert rounds == [list("abc"), list("bca"), list("cab")]
    assert all(len(t) == 3 for t in times.values())


def test_interleaved_budget_cuts_warmup_and_rounds(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    fns = {n: clock.work(1.0, calls, n) for n in "ab"}
    times = timing.interleaved(fns, iters=20, warmup=3, max_seconds=5.0, min_iters=3)
    # one warm-up round (2 s > a quarter of 5 s), then rounds until 5 s are spent but at least 3
    assert len(calls) == 2 + 3 * 2
    assert all(len(t) == 3 for t in times.values())
    assert len(timing.interleaved(fns, iters=4, warmup=1)["a"]) == 4  # no budget: every round


def test_summarize_pairs_each_round_with_the_baseline(monkeypatch):
    """Machine load that changes 10× between rounds cancels in the per-round ratio: exactly 2, no spread."""
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing.time, "perf_counter", clock)

    def workload(ms):
        def run():
            drift = 10.0 if (len(calls) // 2) % 2 else 1.0  # two calls per round
            calls.append(ms)
            clock.now += ms * drift * 1e-3
        return run
    times = timing.interleaved({"base": workload(1.0), "other": workload(2.0)}, iters=6, warmup=0)
    stats = timing.summarize(times, baseline="base")
    assert stats["base"]["ratio"] == stats["base"]["ratio_p10"] == stats["base"]["ratio_p90"] == 1.0
    assert stats["other"]["ratio_p10"] == pytest.approx(2.0) == stats["other"]["ratio_p90"]
    assert stats["base"]["p10_ms"] == pytest.approx(1.0) and stats["base"]["p90_ms"] == pytest.approx(10.0)
    assert stats["other"]["median_ms"] == pytest.approx(1e3 * float(np.median(times["other"])))


def test_summarize_ratio_is_per_round_not_of_medians():
    times = {"base": np.array([1.0, 10.0, 1.0]), "x": np.array([2.0, 20.0, 2.0])}
    stats = timing.summarize(times, baseline="base")
    assert stats["x"]["ratio"] == stats["x"]["ratio_p10"] == stats["x"]["ratio_p90"] == pytest.approx(2.0)


def _rows(ratios: dict[str, tuple[float, float, float]], base_ms=10.0) -> dict:
    return {tag: {"median_ms": base_ms * r, "p10_ms": base_ms * lo, "p90_ms": base_ms * hi, "iters": 5,
                  "ratio": r, "ratio_p10": lo, "ratio_p90": hi} for tag, (r, lo, hi) in ratios.items()}


def _fake_results(fasternet_mnn: dict, convnext_mnn: dict) -> dict:
    forms_fn = {"split_cat-fc": ("split_cat", "fc"), "slicing-conv": ("slicing", "conv"),
                "fused-fc": ("fused", "fc")}
    return {
        "host": {"date": "d", "host": "h", "cpu": "c"},
        "models": {
            "fasternet_t0": {"family": "fasternet", "baseline": "split_cat-fc",
                             "forms": {t: {"pconv": p, "mlp": m, "macs": 1}
                                       for t, (p, m) in forms_fn.items()},
                             "timings": {"mnn": {"1": fasternet_mnn}}},
            "inception_next_atto": {"family": "inceptionnext", "baseline": "fc",
                                    "forms": {"fc": {"pconv": None, "mlp": "fc", "macs": 1},
                                              "conv": {"pconv": None, "mlp": "conv", "macs": 1}},
                                    "timings": {"mnn": {"1": convnext_mnn}}},
        },
    }


def test_recommendation_is_what_export_resolve_forms_reads(tmp_path):
    results = _fake_results(
        _rows({"split_cat-fc": (1, 1, 1), "slicing-conv": (0.8, 0.7, 0.9), "fused-fc": (1.2, 1.1, 1.3)}),
        _rows({"fc": (1, 1, 1), "conv": (0.7, 0.6, 0.8)}))
    rec = report.recommend(results)
    path = tmp_path / "recommendation.json"
    path.write_text(json.dumps(rec))
    pconv, mlp, note = pipeline.resolve_forms("fasternet_t0", "auto", "auto", path=path)
    assert (pconv, mlp) == ("slicing", "conv") and "recommendation" in note
    # an alias of a measured model gets its entry; a model of an unmeasured family gets the top level
    assert rec["by_model"]["inceptionnext_atto"] == rec["by_model"]["inception_next_atto"] == {"mlp": "conv"}
    assert pipeline.resolve_forms("convnext_atto", "auto", "auto", path=path)[:2] == ("slicing", "conv")
    assert rec["by_family"]["inceptionnext"] == {"mlp": "conv"}
    assert rec["by_engine"]["fasternet_t0"]["mnn"]["1"]["fastest"] == "slicing-conv"


def test_recommendation_keeps_the_baseline_when_the_win_is_noise():
    results = _fake_results(
        _rows({"split_cat-fc": (1, 1, 1), "slicing-conv": (0.995, 0.9, 1.04), "fused-fc": (1.2, 1.1, 1.3)}),
        _rows({"fc": (1, 1, 1), "conv": (1.3, 1.2, 1.4)}))
    rec = report.recommend(results)
    assert rec["by_model"]["fasternet_t0"] == {"pconv": "split_cat", "mlp": "fc"}
    assert rec["basis"]["fasternet_t0"]["fastest_clearly"] is False
    assert rec["by_engine"]["fasternet_t0"]["mnn"]["1"]["fastest"] == "slicing-conv"  # the raw measurement
    assert rec["by_model"]["inception_next_atto"] == {"mlp": "fc"}


def test_recommendation_ignores_a_consistent_but_tiny_win():
    results = _fake_results(_rows({"split_cat-fc": (1, 1, 1), "slicing-conv": (0.995, 0.99, 0.999)}),
                            _rows({"fc": (1, 1, 1), "conv": (0.98, 0.94, 1.02)}))
    rec = report.recommend(results)
    assert rec["by_model"]["fasternet_t0"] == {"pconv": "split_cat", "mlp": "fc"}
    assert rec["by_model"]["inception_next_atto"] == {"mlp": "conv"}


@pytest.mark.parametrize("ratios, verdict", [((0.85, 0.8, 0.9), "holds"),
                                             ((0.95, 0.93, 0.97), "direction only: conv 5 % faster"),
                                             ((1.2, 1.1, 1.3), "does not hold: conv 20 % slower"),
                                             ((1.0, 0.9, 1.1), "does not hold: no difference")])
def test_seed003_verdict_follows_the_conv_over_fc_spread(ratios, verdict):
    results = {"models": {"convnext_atto": {"family": "convnext", "timings": {
        "mnn": {"1": _rows({"fc": (1, 1, 1), "conv": ratios})}}}}}
    here = report.seed003(results)["here"]["1"]
    assert here["verdict"].startswith(verdict)
    assert here["conv_ms"] == pytest.approx(10 * ratios[0])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, printed = tmp_path_factory.mktemp("bench"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["--quick", "--models", "fasternet_t0", "--forms", "slicing-conv", "--threads", "1",
                   "--engines", "torch,ort,mnn,openvino", "--precision-models", "fasternet_t0", "--mnn-profile",
                   "--out", str(out), "--cache", "none"])
    return rc, out, printed.getvalue()


@pytest.mark.parametrize("argv, detectors, precision, threads, mnn_profile", [
    ([], [], [], [1], False),  # make bench: the minutes-long sections are off
    (["--full"], list(DEFAULT_DETECTORS), list(DEFAULT_MODELS), sorted({1, os.cpu_count()}), True),  # bench-full
    (["--full", "--models", "convnext_atto", "--detectors", "none", "--threads", "1"], [], ["convnext_atto"], [1],
     True),
    (["--detectors", "yolo11n", "--precision-models", "fasternet_t0", "--mnn-profile"], ["yolo11n"],
     ["fasternet_t0"], [1], True),
])
def test_long_sections_run_only_with_full_or_when_named(argv, detectors, precision, threads, mnn_profile):
    args = parse_args(argv)
    _, resolved_threads, _ = resolve(args)
    assert args.detector_names == detectors and args.precision_names == precision
    assert resolved_threads == threads and args.mnn_profile == mnn_profile


@pytest.fixture(scope="module")
def detector_int8_run(tmp_path_factory):
    """The minutes-long sections alone: a detector's forms beside plain yolo11n (calibrating a detector takes
    ~45 s at any size) and the calibrated int8 files (their fallback search takes minutes)."""
    out = tmp_path_factory.mktemp("bench-det")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--quick", "--models", "none", "--detectors", "yolo11n_inception_next_atto",
                   "--precision-models", "fasternet_t0", "--precision-targets", ",".join(ALL_PRECISION),
                   "--threads", "1", "--no-ops", "--out", str(out), "--cache", "none"])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_quick_run_writes_results_report_plots_and_recommendation(quick_run):
    rc, out, _ = quick_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("host", "versions", "settings", "roofline", "models", "operators", "seed_checks", "loadavg"):
        assert key in results
    r = results["models"]["fasternet_t0"]
    assert r["baseline"] == "split_cat-fc" and list(r["forms"]) == ["split_cat-fc", "slicing-conv"]
    assert r["img_size"] == 64
    for engine in ("torch", "ort", "mnn", "openvino"):
        rows = r["timings"][engine]["1"]
        assert set(rows) == set(r["forms"])
        assert all(ROW_KEYS <= set(row) for row in rows.values())
        assert rows["split_cat-fc"]["ratio"] == 1.0 and rows["slicing-conv"]["iters"] == 2
        # the runtime's engines ran in the same rounds: each form has a paired ratio to ORT on that form
        assert all(("vs_ort" in row) == (engine in ("mnn", "openvino")) for row in rows.values())
    # the exported artifacts compute what PyTorch computes (else their timings mean nothing)
    assert all(err < 1e-3 for errs in r["max_rel_err"].values() for err in errs.values())
    assert r["forms"]["slicing-conv"]["macs"] > 0
    assert results["operators"]["1"] and results["seed_checks"]["seed000"]
    md = (out / "report.md").read_text()
    assert "## Forms" in md and "`slicing-conv`" in md and "## Roofline" in md and "Seed 000" in md
    for png in ("latency.png", "flops_latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads((out / "recommendation.json").read_text())
    pconv, mlp, _ = pipeline.resolve_forms("fasternet_t0", "auto", "auto", path=out / "recommendation.json")
    assert {"pconv": pconv, "mlp": mlp} == rec["by_model"]["fasternet_t0"]
    assert rec["basis"]["fasternet_t0"]["engine"] == "mnn"
    fastest = rec["fastest_engine"]["fasternet_t0"]
    timings = r["timings"][fastest["engine"]]["1"]
    assert fastest["median_ms"] == timings[fastest["form"]]["median_ms"] == min(
        row["median_ms"] for e in ("ort", "mnn", "openvino") for row in r["timings"][e]["1"].values())


@pytest.mark.slow
def test_detector_forms_are_timed_against_fc_beside_plain_yolo11n(detector_int8_run):
    results, md = detector_int8_run
    r = results["detectors"]["yolo11n_inception_next_atto"]
    assert r["baseline"] == "fc" and list(r["forms"]) == ["fc", "conv", "yolo11n"] and r["img_size"] == 128
    assert r["forms"]["yolo11n"]["model"] == "yolo11n" and r["references"] == ["yolo11n"]
    for engine in ("ort", "mnn"):
        rows = r["timings"][engine]["1"]
        assert set(rows) == {"fc", "conv", "yolo11n"} and rows["fc"]["ratio"] == 1.0
    assert "torch" not in r["timings"]
    # both outputs (boxes and scores) of every exported detector equal PyTorch's
    assert all(err < 1e-3 for errs in r["max_rel_err"].values() for err in errs.values())
    section = md.split("## Detectors")[1].split("\n## ")[0]
    assert "### yolo11n_inception_next_atto (128², baseline `fc`" in section
    assert "| `fc` |" in section and "| `conv` |" in section and "| `yolo11n` (reference) |" in section


@pytest.mark.slow
def test_int8_is_timed_against_fp32_and_fp16_with_gate_verdicts(detector_int8_run):
    results, md = detector_int8_run
    r = results["precision"]["fasternet_t0"]
    assert {e: list(rows) for e, rows in r["timings"].items()} == \
        {e: list(group) for e, group in precision.PRECISION_TARGETS.items()}
    assert r["timings"]["mnn"]["mnn_int8"]["compute"] == "int8"
    assert r["timings"]["mnn"]["mnn_int8"]["file"] == "model.int8.mnn"
    assert r["timings"]["ort"]["ort_int8"]["file"] == "model.int8.onnx"
    section = md.split("## Precision")[1].split("\n## ")[0]
    for target in ALL_PRECISION:
        assert f"| `{target}` |" in section


def test_quick_run_times_fp16_and_int8_weight_files_against_fp32(quick_run):
    _, out, _ = quick_run
    r = json.loads((out / "results.json").read_text())["precision"]["fasternet_t0"]
    assert {e: list(rows) for e, rows in r["timings"].items()} == {
        "ort": ["ort"], "mnn": ["mnn_fp32", "mnn_fp16w", "mnn_int8w"],
        "openvino": ["openvino"]}  # --quick leaves calibrated int8 out
    for rows in r["timings"].values():
        base = next(iter(rows.values()))
        assert base["ratio"] == 1.0 and base["compute"] == "fp32"
        assert all(row["mb"] > 0 and isinstance(row["breaches"], list) and row["metrics"] for row in rows.values())
    assert r["timings"]["mnn"]["mnn_fp16w"]["file"] == "model.fp16.mnn"
    assert not r["timings"]["mnn"]["mnn_fp16w"]["breaches"]  # the fp16-weight file passes its parity gate
    section = (out / "report.md").read_text().split("## Precision")[1].split("\n## ")[0]
    for target in ("ort", "mnn_fp32", "mnn_fp16w", "mnn_int8w"):
        assert f"| `{target}` |" in section
    assert "(not run)" in (out / "report.md").read_text().split("## Detectors")[1].split("\n## ")[0]


def test_detector_table_labels_the_reference_line():
    rows = _rows({"fc": (1, 1, 1), "conv": (0.9, 0.8, 1.0), "yolo11n": (0.5, 0.4, 0.6)})
    r = {"img_size": 640, "baseline": "fc", "references": ["yolo11n"], "skipped": {}, "max_rel_err": {},
         "forms": {t: {"pconv": None, "mlp": t if t != "yolo11n" else None, "macs": 1e9} for t in rows},
         "timings": {"ort": {"1": rows}, "mnn": {"1": rows}}}
    md = report.forms_tables({"yolo11n_inception_next_atto": r})
    assert "### yolo11n_inception_next_atto (640², baseline `fc`; reference line: `yolo11n`" in md
    assert "| `fc` | 1.000 | 10.00 | 1.00 [1.00–1.00] |" in md and "| `yolo11n` (reference) |" in md


def test_a_file_that_fails_its_gate_says_so():
    row = {"gates": {"cosine": 0.99, "top1": 0.95}, "breaches": ["mnn_int8: top1 0.875 < 0.95"],
           "metrics": {"logits": {"cosine": 0.996, "top1": 0.875}}, "kept_in_float": ["a", "b"]}
    assert report._verdict_cell(row).startswith("**FAILS its gate**") and "top1 0.875" in report._verdict_cell(row)
    assert "2 layer(s) kept in float" in report._verdict_cell(row)
    assert report._verdict_cell({**row, "breaches": []}).startswith("passes")
    parity = {"breaches": ["mnn_fp16w_low: max_rel 0.1 > 0.03", "mnn_fp16w[logits]: max_rel 0.2 > 0.01"]}
    assert precision.target_breaches(parity, "mnn_fp16w") == ["mnn_fp16w[logits]: max_rel 0.2 > 0.01"]
    assert precision.target_breaches(parity, "mnn_int8") == []


def test_arm_cost_compares_int8_with_fp16_on_the_same_cpu(tmp_path, monkeypatch):
    totals = {("neoverse-n1", "mnn_int8"): 40, ("neoverse-n1", "mnn_fp16w_low"): 50,
              ("neoverse-n1", "mnn_low"): 80, ("cortex-a53", "mnn_fp32"): 100}
    for tag in ("split_cat-fc", "slicing-conv"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "model.mnn").write_bytes(b"")
    monkeypatch.setattr(cost, "versions", lambda cache=None: {})
    monkeypatch.setattr(cost, "read_metadata", lambda d: {"model": "m", "pconv": d.name.split("-")[0],
                                                          "mlp": d.name.split("-")[1], "input_shape": [1, 3, 64, 64]})

    def count(vdir, meta, cpu, target, repeat, cache):
        n = totals[(cpu, target.name)]
        return {"file": target.file, "counts": {k: n for k in cost.COUNT_KEYS}, "repeatable": True, "repeats": 1,
                "first_counted_run": {}, "device": {"fp16": 1, "i8sdot": int(cpu == "neoverse-n1")},
                "versions": {}}
    monkeypatch.setattr(cost, "count_variant", count)
    m = cost.cost_model(tmp_path, [f"{c}:{t}" for c, t in totals], only=["split_cat-fc"], log=lambda s: None)
    int8 = next(r for r in m["rows"] if r["target"] == "mnn_int8")
    assert {r["variant"] for r in m["rows"]} == {"split_cat-fc"}
    assert int8["total_vs_targets_same_cpu"] == {"mnn_fp16w_low": 0.8, "mnn_low": 0.5}  # not cortex-a53's
    assert int8["compute"] == "int8" and int8["img_size"] == 64
    lines = cost.precision_lines(m["rows"])
    assert any("mnn_int8 (int8, `model.int8.mnn`) = 0.800× mnn_fp16w_low" in line and "i8sdot 1" in line
               for line in lines)


def test_arm_cost_config_can_run_a_target_at_another_precision():
    cpu, target = cost.parse_config("neoverse-n1:mnn_int8@low")
    assert (cpu, target.name, target.file, target.precision, target.compute) == \
        ("neoverse-n1", "mnn_int8@low", "model.int8.mnn", "low", "int8+fp16")
    assert cost.parse_config("neoverse-n1:mnn_fp16w_low@low")[1].name == "mnn_fp16w_low"  # already low
    with pytest.raises(EdgeportError, match="precision 'fp8'"):
        cost.parse_config("neoverse-n1:mnn_int8@fp8")
    assert cost.parse_config("cortex-a76:ort")[1].file == "model.onnx"  # onnxruntime is counted too
    with pytest.raises(EdgeportError, match="drop '@low'"):
        cost.parse_config("cortex-a76:ort_int8@low")
    with pytest.raises(EdgeportError, match="not an MNN or onnxruntime target"):
        cost.parse_config("cortex-a76:torch_inference")


def test_quick_run_prints_the_tables(quick_run):
    _, out, printed = quick_run
    assert "| `slicing-conv` |" in printed and "| shape | op |" in printed
    assert printed.strip() == (out / "report.md").read_text().strip()


def test_from_results_rewrites_outputs_without_measuring(quick_run, tmp_path):
    _, out, _ = quick_run
    assert main(["--from-results", str(out / "results.json"), "--out", str(tmp_path)]) == 0
    for name in ("results.json", "report.md", "recommendation.json", "latency.png", "flops_latency.png"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "recommendation.json").read_text())["by_model"] == \
        json.loads((out / "recommendation.json").read_text())["by_model"]


@pytest.mark.parametrize("argv, message", [(["--engines", "tensorrt"], "unknown --engines tensorrt"),
                                           (["--models", "resnet50"], "unknown model 'resnet50'"),
                                           (["--threads", "two"], "--threads two"),
                                           (["--detectors", "yolo11z"], "unknown model 'yolo11z'"),
                                           (["--det-img", "100"], "--det-img 100"),
                                           (["--precision-targets", "trt_int8"],
                                            "unknown --precision-targets trt_int8")])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())


def test_precision_drops_a_failing_quantiser_and_keeps_the_other_files(monkeypatch):
    built = []

    def export_form(form, directory, names):
        built.append(list(names))
        if "mnn_int8" in names:
            raise EdgeportError("MNN int8 quantiser failed (exit -11)")
        return {n: directory / n for n in names}
    monkeypatch.setattr(precision, "export_form", export_form)
    files, failed = precision.build_dropping(None, Path("d"), ["ort", "ort_int8", "mnn_fp32", "mnn_int8"],
                                             log=lambda s: None)
    assert list(files) == ["ort", "ort_int8", "mnn_fp32"] and list(failed) == ["mnn_int8"]
    assert "exit -11" in failed["mnn_int8"] and len(built) == 2
    r = {"form": "conv", "img_size": 224, "threads": 1, "failed": failed, "timings": {}}
    assert "not built: `mnn_int8` (MNN int8 quantiser failed (exit -11))" in report.precision_tables(
        {"precision": {"inception_next_atto": r}})


def test_arm_parity_row_of_a_detector_shows_what_it_is_judged_on():
    from benchmarks.arm.parity import format_row
    from export.detection_parity import detection_gates

    det = {"box_px": 17.75, "score": 0.0408}
    row = {"target": "mnn_low", "file": "model.mnn", "cpu": "neoverse-n1", "compute": "fp16", "reference": "pytorch",
           "max_rel": 0.041, "top1": None, "metrics": {"boxes": {"max_rel": 0.02}, "detections": det},
           "gates": detection_gates("mnn_low"), "passed": False}
    line = format_row(row)
    gate = detection_gates("mnn_low")["score"]
    assert "17.8px" in line and "0.041" in line and f"score ≤ {gate:g}" in line and "max_rel" not in line


def test_arm_parity_row_of_an_int8_file_shows_its_cosine():
    from benchmarks.arm.parity import format_row
    from export import targets

    row = {"target": "mnn_int8", "file": "model.int8.mnn", "cpu": "cortex-a53", "compute": "fp32",
           "reference": "pytorch", "max_rel": 0.0866, "top1": 1.0,
           "metrics": {"logits": {"max_rel": 0.0866, "cosine": 0.99909, "top1": 1.0}},
           "gates": dict(targets.get("mnn_int8").gates), "passed": True}
    line = format_row(row)
    assert "0.99909" in line and "8.66e-02" not in line and "cosine ≥ 0.99" in line


def test_arm_parity_refuses_an_unknown_target_in_one_line(capsys, tmp_path):
    from benchmarks.arm.parity import main as arm_parity_main

    assert arm_parity_main(["--targets", "mnn_fp32", str(tmp_path)]) == 2  # the dir swallowed by --targets
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "after --" in err


def test_precision_section_shows_each_files_top1_where_labels_exist(tmp_path):
    """fasternet_digits (labelled): built from its trained weights, each file's top-1 on val is what
    runtime.evaluate measures on that file; fasternet_t0 (no labels): – and the reason."""
    from models import digits
    from runtime.evaluate import evaluate_classifier, scan_imagefolder

    out, cache = tmp_path / "out", tmp_path / "cache"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--quick", "--models", "none", "--precision-models", "fasternet_digits", "fasternet_t0",
                   "--precision-targets", "ort,mnn_fp32,mnn_int8w", "--engines", "ort,mnn", "--threads", "1",
                   "--no-ops", "--out", str(out), "--cache", str(cache)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["precision"]
    text = report.precision_tables({"precision": results})
    labelled, unlabelled = results["fasternet_digits"], results["fasternet_t0"]
    assert labelled["accuracy"]["measured"] and labelled["img_size"] == 32  # its own size, not --quick's 64
    (directory,) = cache.glob("*/fasternet_digits-32/*-trained")
    val = scan_imagefolder(str(digits.make_imagefolder() / "val"))
    rows = {t: row for rows in labelled["timings"].values() for t, row in rows.items()}
    assert set(rows) == {"ort", "mnn_fp32", "mnn_int8w"}
    reference = evaluate_classifier(str(directory / "model.onnx"), val)
    assert reference["top1"] > 0.9  # the trained weights, not random ones (10 classes: ~0.1)
    for row in rows.values():
        expected = evaluate_classifier(str(directory / row["file"]), val)
        acc = row["accuracy"]
        assert (acc["correct1"], acc["n"], acc["top1"]) == (expected["correct1"], expected["n"], expected["top1"])
        assert acc["delta_top1_points"] == pytest.approx(100 * (expected["top1"] - reference["top1"]), abs=1e-3)
        assert f"| {100 * expected['top1']:.2f} ({expected['correct1']}/{expected['n']}) |" in text
    assert not unlabelled["accuracy"]["measured"]
    assert all(row["accuracy"] is None for rows in unlabelled["timings"].values() for row in rows.values())
    t0 = text[text.index("### fasternet_t0"):]
    assert "| – | – |" in t0 and "top-1: – (no labelled data for this model" in t0
