"""The board loop: bundle → edgeport-bench on the board → export --device → merged device report.

Fast tests run the bench on a tiny 3-form bundle (benchmarks.arm.tiny: the same network as split_cat-fc,
split_cat-conv and slicing-fc at 96², ONNX + MNN files); the slow one runs the real fasternet_t0 loop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from export import pipeline
from models.errors import EdgeportError
from runtime import bench, device
from runtime.engines import OrtEngine

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY_FORMS = [("split_cat", "fc"), ("split_cat", "conv"), ("slicing", "fc")]
TARGETS = {"ort": ("model.onnx", "onnxruntime", "fp32"), "mnn_fp32": ("model.mnn", "mnn", "fp32"),
           "mnn_low": ("model.mnn", "mnn", "low"), "mnn_fp16w": ("model.fp16.mnn", "mnn", "fp32")}
FAST = ["--rounds", "3", "--warmup", "1", "--engines", "mnn,onnxruntime"]


def make_bundle(root: Path, dirs: list[str]) -> Path:
    """A bundle directory (bundle.json and the forms' files) as export.bundle writes one."""
    from runtime import load

    model_dir = root / "arm_tiny"
    forms = []
    for d in map(Path, dirs):
        predictor = load(d / "model.onnx")
        outputs = predictor.run(np.zeros(predictor.input_shape, np.float32))
        files = {t: bench.BundleFile(file=f"{d.name}/{f}", sha256=bench.sha256_file(d / f), engine=e, precision=p,
                                     gate="passed") for t, (f, e, p) in TARGETS.items()}
        pconv, mlp = d.name.split("-")
        forms.append(bench.BundleForm(tag=d.name, pconv=pconv, mlp=mlp, status="passed",
                                      input_shape=predictor.input_shape,
                                      outputs={k: list(v.shape) for k, v in outputs.items()}, files=files))
    b = bench.Bundle(schema=device.Schema(*bench.BUNDLE_SCHEMA), model="arm_tiny", baseline="split_cat-fc",
                     forms=forms, source={"model": "arm_tiny"}, host=device.fingerprint())
    (model_dir / bench.BUNDLE_JSON).write_bytes(msgspec.json.encode(b))
    return model_dir


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from benchmarks.arm.tiny import make_tiny_artifacts

    root = tmp_path_factory.mktemp("board")
    return make_bundle(root, make_tiny_artifacts(str(root), forms=TINY_FORMS))


@pytest.fixture(scope="module")
def bench_json(tiny_bundle, tmp_path_factory):
    from export.bundle import write_tarball

    b = bench.read_bundle(tiny_bundle)
    tarball = write_tarball(tiny_bundle, b, (tiny_bundle / bench.BUNDLE_JSON).read_bytes())
    out = tmp_path_factory.mktemp("results") / "board.json"
    assert bench.main([str(tarball), "--json", str(out), *FAST]) == 0
    return out


def test_bench_times_every_file_engine_and_precision_against_the_fc_baseline(bench_json):
    board = device.read_results(bench_json)
    assert board.schema.name == device.SCHEMA_NAME and board.device.emulated is False
    got = {(r.form, r.target, r.engine, r.precision) for r in board.results}
    assert got == {(f"{p}-{m}", t, e, prec) for p, m in TINY_FORMS for t, (_, e, prec) in TARGETS.items()}
    for r in board.results:
        assert r.rounds == board.run.rounds >= 3 and r.p10_ms <= r.median_ms <= r.p90_ms and r.median_ms > 0
        assert r.sha256 and r.load_ms >= 0 and r.first_ms > 0 and r.gate == "passed"
        if r.form == "split_cat-fc":
            assert r.baseline and r.ratio_to_baseline == 1.0
        else:
            # a tiny model on a shared machine: one hiccup can make a round 30x; the spread must bracket the median
            assert not r.baseline and 0 < r.ratio_p10 <= r.ratio_to_baseline <= r.ratio_p90
    assert board.drift is not None and board.drift.ratio > 0 and board.run.cores


def _tamper(tiny_bundle, tmp_path, form: str, name: str) -> Path:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    path = copy / form / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return copy


def _run_bench(args, capsys):
    code = bench.main([*args, *FAST])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_file_whose_sha256_differs_gets_no_time_and_exit_2(tiny_bundle, tmp_path, capsys):
    copy = _tamper(tiny_bundle, tmp_path, "slicing-fc", "model.mnn")
    out = tmp_path / "r.json"
    code, err = _run_bench([str(copy), "--json", str(out)], capsys)
    assert code == 2
    errors = [line for line in err if line.startswith("edgeport-bench: error:")]
    assert errors and all("slicing-fc/model.mnn" in line and "sha256" in line for line in errors)
    timed = {(r.form, r.file) for r in device.read_results(out).results}
    assert ("slicing-fc", "slicing-fc/model.mnn") not in timed and ("slicing-fc", "slicing-fc/model.onnx") in timed


@pytest.mark.parametrize("fault", ["nan", "shape"])
def test_a_forward_returning_nan_or_a_wrong_shape_gets_no_time_and_exit_2(tiny_bundle, tmp_path, capsys,
                                                                         monkeypatch, fault):
    real = OrtEngine.run

    def broken(self, feeds):
        out = real(self, feeds)
        if "split_cat-conv" not in self._session._model_path:
            return out
        return {k: (np.full_like(v, np.nan) if fault == "nan" else v[..., :-1]) for k, v in out.items()}

    monkeypatch.setattr(OrtEngine, "run", broken)
    out = tmp_path / "r.json"
    code, err = _run_bench([str(tiny_bundle), "--json", str(out)], capsys)
    assert code == 2
    errors = [line for line in err if line.startswith("edgeport-bench: error:")]
    assert len(errors) == 1 and "split_cat-conv/model.onnx (onnxruntime, fp32)" in errors[0]
    assert ("NaN" if fault == "nan" else "expected [1, 10]") in errors[0]
    results = device.read_results(out).results
    assert not [r for r in results if r.form == "split_cat-conv" and r.engine == "onnxruntime"]
    assert [r for r in results if r.form == "split_cat-conv" and r.engine == "mnn"]


def test_plain_files_without_a_bundle(tiny_bundle, capsys):
    files = [str(tiny_bundle / f / "model.mnn") for f in ("split_cat-fc", "slicing-fc")]
    assert bench.main([*files, "--precision", "fp32", *FAST]) == 0
    table = capsys.readouterr().out
    assert "split_cat-fc *" in table and "slicing-fc" in table


# ------------------------------------------------------------------------------------- results contract
def board_results(times: dict[str, float], emulated: bool = False, model: str = "fasternet_t0",
                  gate: str = "passed") -> device.BoardResults:
    """Results of fasternet_t0 forms {tag: median ms}, MNN fp32 and ORT, the first tag the baseline."""
    base = next(iter(times))
    results = [device.Result(form=tag, target=t, file=f"{tag}/{f}", engine=e, precision="fp32",
                             median_ms=ms * k, p10_ms=ms * k * 0.95, p90_ms=ms * k * 1.05,
                             ratio_to_baseline=round(ms / times[base], 4), ratio_p10=0.9 * ms / times[base],
                             ratio_p90=1.1 * ms / times[base], baseline=tag == base, gate=gate, rounds=5)
               for tag, ms in times.items() for t, f, e, k in (("mnn_fp32", "model.mnn", "mnn", 1.0),
                                                               ("ort", "model.onnx", "onnxruntime", 0.5))]
    dev = device.fingerprint()
    dev = msgspec.structs.replace(dev, emulated=emulated, emulation_evidence="test" if emulated else None)
    run = device.Run(threads=1, cores=[0], rounds=5, warmup=1, budget_s=10.0, seconds=1.0, peak_rss_mb=100.0,
                     date=device.now(), model=model, baseline_form=base)
    return device.BoardResults(schema=device.new_schema(), device=dev, run=run, results=results)


def write(path: Path, board: device.BoardResults) -> Path:
    device.write_results(path, board)
    return path


@pytest.mark.parametrize("fastest", ["full-conv", "slicing-fc"])
def test_the_device_choice_follows_the_fastest_passing_form(tmp_path, fastest):
    times = {"split_cat-fc": 10.0, "split_cat-conv": 9.5, "full-conv": 9.0, "slicing-fc": 9.2}
    times[fastest] = 5.0
    path = write(tmp_path / "b.json", board_results(times))
    pconv, mlp, record = pipeline.choose_from_device("fasternet_t0", str(path))
    assert f"{pconv}-{mlp}" == fastest == record["chosen"]["form"]
    assert record["per_engine"]["onnxruntime"]["file"] == f"{fastest}/model.onnx"  # ORT was faster here
    assert record["chosen"]["engine"] == "onnxruntime"
    # a failed gate takes a form out, whatever its time
    board = board_results(times)
    board.results[:] = [msgspec.structs.replace(r, gate="failed") if r.form == fastest else r
                        for r in board.results]
    expected = ("slicing", "fc") if fastest == "full-conv" else ("full", "conv")  # the next fastest
    assert pipeline.choose_from_device("fasternet_t0", str(write(tmp_path / "c.json", board)))[:2] == expected


def test_emulated_results_are_refused_unless_allowed(tmp_path):
    path = write(tmp_path / "e.json", board_results({"split_cat-fc": 10.0, "slicing-conv": 8.0}, emulated=True))
    with pytest.raises(EdgeportError, match="emulation.*--allow-emulated"):
        pipeline.choose_from_device("fasternet_t0", str(path))
    assert pipeline.choose_from_device("fasternet_t0", str(path), allow_emulated=True)[:2] == ("slicing", "conv")


def _export_cli(*args):
    return subprocess.run([PY, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=600)


def test_bad_or_emulated_device_json_is_one_line_and_exit_2(tmp_path, capsys):
    good = json.loads(msgspec.json.encode(board_results({"split_cat-fc": 10.0, "slicing-conv": 8.0})))
    bad_type = json.loads(json.dumps(good))
    bad_type["results"][1]["median_ms"] = "fast"
    missing = json.loads(json.dumps(good))
    del missing["device"]["emulated"]
    cases = {"notjson.json": "{not json", "type.json": json.dumps(bad_type), "missing.json": json.dumps(missing),
             "schema.json": json.dumps({**good, "schema": {"name": "other", "version": 1}})}
    expect = {"notjson.json": "malformed", "type.json": "results[1].median_ms", "missing.json": "emulated",
              "schema.json": "schema other"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(EdgeportError, match=expect[name].replace("[", r"\[").replace("]", r"\]")):
            pipeline.choose_from_device("fasternet_t0", str(tmp_path / name))
    with pytest.raises(EdgeportError, match="not a regular file"):
        pipeline.choose_from_device("fasternet_t0", str(tmp_path))
    from export.__main__ import main

    assert main(["fasternet_t0", "--device", str(tmp_path / "type.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results[1].median_ms" in err[0] and not (tmp_path / "out").exists()
    emulated = write(tmp_path / "emu.json", board_results({"split_cat-fc": 1.0}, emulated=True))
    r = _export_cli("fasternet_t0", "--device", str(emulated), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "emulation" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_export_with_device_builds_the_form_the_board_measured_fastest(tmp_path):
    path = write(tmp_path / "b.json", board_results({"split_cat-fc": 10.0, "slice_cat-conv": 7.0,
                                                     "full-fc": 9.0}))
    r = _export_cli("fasternet_t0", "--device", str(path), "--targets", "ort", "--no-parity",
                    "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "fasternet_t0" / "slice_cat-conv"
    manifest = json.loads((out / "manifest.json").read_text())
    forms = manifest["export"]["forms"]
    assert (manifest["metadata"]["pconv"], manifest["metadata"]["mlp"]) == ("slice_cat", "conv")
    assert forms["chosen_on"] == "device" and forms["device"]["chosen"]["median_ms"] == 3.5
    report = (out / "report.md").read_text()
    assert "Chosen on: **device**" in report and "slice_cat-conv" in report and "3.500" in report


def test_without_device_the_report_says_the_build_host_chose(tmp_path):
    pconv, mlp, forms = pipeline._resolve(pipeline.ExportOptions())
    assert forms["chosen_on"] == "build host" and (pconv, mlp) == pipeline.resolve_forms("fasternet_t0", "auto",
                                                                                          "auto")[:2]
    from export.manifest import _form_lines

    assert "Chosen on: **build host**" in "\n".join(_form_lines(forms))


# ------------------------------------------------------------------------------------- fingerprint
def test_arm_cores_are_decoded_from_midr():
    assert device.arm_core_name("0x41", "0xd0b") == "Cortex-A76"
    assert device.arm_core_name(0x41, 0xd08) == "Cortex-A72"
    assert device.arm_core_name("0x41", "0xd0c") == "Neoverse-N1"
    assert device.arm_core_name("0x41", "0xd99") == "Arm part 0xd99"
    cpuinfo = ("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\nFeatures\t: fp asimd asimdhp asimddp\n\n"
               "processor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\nFeatures\t: fp asimd asimdhp asimddp\n")
    blocks = device.cpuinfo_blocks(cpuinfo)
    assert device.core_names(blocks) == {0: "Cortex-A55", 1: "Cortex-A76"}
    assert device.isa_flags(blocks) == ["asimd", "asimdhp", "asimddp"]
    assert device.emulation_evidence("aarch64", blocks, environ={}, maps="") is None


def test_emulation_is_detected():
    x86 = device.cpuinfo_blocks("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t: sse avx2\n")
    assert "x86" in device.emulation_evidence("aarch64", x86, environ={}, maps="")
    assert device.emulation_evidence("x86_64", x86, environ={}, maps="") is None
    assert device.emulation_evidence("aarch64", [], environ={}, maps="")
    assert "QEMU_CPU" in device.emulation_evidence("x86_64", x86, environ={"QEMU_CPU": "cortex-a76"}, maps="")
    assert device.emulation_evidence("x86_64", x86, environ={"EDGEPORT_EMULATED": "1"}, maps="")


def test_the_fastest_cluster_of_a_big_little_cpu(tmp_path, monkeypatch):
    for cpu, khz in enumerate([1800000] * 4 + [2400000] * 4):
        d = tmp_path / f"cpu{cpu}" / "cpufreq"
        d.mkdir(parents=True)
        (d / "cpuinfo_max_freq").write_text(f"{khz}\n")
        (d / "scaling_governor").write_text("schedutil\n")
    (tmp_path / "online").write_text("0-7\n")
    monkeypatch.setattr(device, "SYSFS_CPU", tmp_path)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    names = {i: "Cortex-A55" if i < 4 else "Cortex-A76" for i in range(8)}
    clusters = device.clusters(names)
    assert [(c.core, c.cpus, c.max_mhz, c.governor) for c in clusters] == [
        ("Cortex-A76", [4, 5, 6, 7], 2400.0, "schedutil"), ("Cortex-A55", [0, 1, 2, 3], 1800.0, "schedutil")]
    monkeypatch.setattr(device, "core_names", lambda blocks: names)
    assert device.fastest_cluster_cpus() == [4, 5, 6, 7]


def test_the_board_bench_imports_no_torch():
    code = "import sys, runtime.bench, runtime.device; sys.exit('torch' in sys.modules or 'onnx' in sys.modules)"
    assert subprocess.run([PY, "-c", code], cwd=ROOT).returncode == 0


# ------------------------------------------------------------------------------------- many boards
def test_merged_report_of_two_devices(tmp_path, capsys):
    from benchmarks import devices

    host = write(tmp_path / "host.json", board_results({"split_cat-fc": 10.0, "split_cat-conv": 8.6,
                                                        "slicing-fc": 12.0}))
    emu = board_results({"split_cat-fc": 100.0, "split_cat-conv": 104.0, "slicing-fc": 130.0}, emulated=True)
    emu.device.hostname = "pi5"
    emu_path = write(tmp_path / "emu.json", emu)
    assert devices.main([str(host), str(emu_path), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "devices.md").read_text()
    assert (tmp_path / "rep" / "devices.png").stat().st_size > 10_000
    assert "pi5" in text and "(emulated)" in text and "| split_cat-conv | mnn_fp32 | mnn | fp32 | 8.60 (0.860×)" in text
    claims = [line for line in text.splitlines() if line.startswith("| ") and "mnn_fp32" in line and "hold" in line]
    assert len(claims) == 2 and "does not hold" in claims[1] and "does not hold" not in claims[0]
    (tmp_path / "bad.json").write_text("[]")
    assert devices.main([str(host), str(tmp_path / "bad.json"), "--out", str(tmp_path / "rep2")]) == 2
    assert "bad.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the real loop
@pytest.mark.slow
def test_fasternet_bundle_bench_and_export_follow_the_board(tmp_path):
    r = _export_cli("fasternet_t0", "--bundle", "--targets", "ort,mnn_fp32", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-2000:]
    tarball = tmp_path / "b" / "fasternet_t0.bundle.tar.gz"
    out = tmp_path / "board.json"
    assert bench.main([str(tarball), "--json", str(out), "--rounds", "5"]) == 0
    board = device.read_results(out)
    best = min((r for r in board.results if r.gate == "passed"), key=lambda r: r.median_ms)
    r = _export_cli("fasternet_t0", "--device", str(out), "--targets", "ort", "--out", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "x" / "fasternet_t0" / best.form / "manifest.json").is_file()


def test_low_memory_times_one_file_kind_at_a_time_with_the_same_results(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "low.json"
    assert bench.main([str(tiny_bundle), "--low-memory", "--json", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("group ") == len(TARGETS)
    results = device.read_results(out).results
    assert {(r.form, r.target) for r in results} == {(f"{p}-{m}", t) for p, m in TINY_FORMS for t in TARGETS}
    assert all(r.ratio_to_baseline == 1.0 for r in results if r.baseline)
