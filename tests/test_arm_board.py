"""The board bench on an emulated ARM board (benchmarks.arm.board): qemu-user detection, the bench's entries, and
(@pytest.mark.arm, needs `make arm-setup-parity arm-board-setup`) a bundle benched end to end in the aarch64 guest,
refused by the export unless --allow-emulated, and OpenVINO's aarch64 kernels judged by the host's gate."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from runtime import bench, device

REPO = Path(__file__).resolve().parents[1]

# /proc/cpuinfo as qemu-user 10.0 (Debian 13) synthesises it for -cpu cortex-a76 (one block of two).
QEMU10_CPUINFO = ("processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nBogoMIPS\t: 100.00\n"
                  "Features\t: fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                  "asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\n"
                  "CPU revision\t: 1\n")
# A Raspberry Pi 5 (arm64 kernel, 64-bit process): no "model name" line.
PI5_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
               "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
               "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\nRevision\t: d04170\n"
               "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n")


def test_qemu_user_10_is_detected_from_its_cpuinfo_or_process_name():
    qemu = device.cpuinfo_blocks(QEMU10_CPUINFO)
    assert device.core_names(qemu) == {0: "Cortex-A76"}  # qemu 10 shows the emulated CPU, not the host's x86
    assert "qemu-user" in device.emulation_evidence("aarch64", qemu, environ={}, maps="", comm="python3\n")
    pi5 = device.cpuinfo_blocks(PI5_CPUINFO)
    assert device.emulation_evidence("aarch64", pi5, environ={}, maps="", comm="python3\n") is None
    assert "qemu-aarch64" in device.emulation_evidence("aarch64", pi5, environ={}, maps="", comm="qemu-aarch64\n")
    assert device.emulation_evidence("aarch64", qemu, environ={"EDGEPORT_EMULATED": "0"}, maps="") is None


def _bundle(files: dict[str, tuple[str, str]]) -> bench.Bundle:
    """A one-form bundle with {target: (file, engine)}."""
    form = bench.BundleForm("split_cat-fc", "split_cat", "fc", "passed", [1, 3, 32, 32], {"logits": [1, 1000]},
                            {t: bench.BundleFile(f, "0" * 64, e, "fp32", "passed") for t, (f, e) in files.items()})
    return bench.Bundle(device.new_schema(), "fasternet_t0", "split_cat-fc", [form], {}, device.fingerprint())


def test_each_engine_times_a_shared_file_once_under_its_own_target():
    engines = ["onnxruntime", "openvino"]
    both = _bundle({"ort": ("f/model.onnx", "onnxruntime"), "openvino": ("f/model.onnx", "openvino")})
    timed = {(e.target, e.engine) for e in bench.bundle_entries(Path("/b"), both, engines, ("fp32",))}
    assert timed == {("ort", "onnxruntime"), ("openvino", "openvino")}
    # a bundle without an openvino target: OpenVINO still runs the ort target's file as it is
    ort_only = _bundle({"ort": ("f/model.onnx", "onnxruntime")})
    timed = [(e.target, e.engine) for e in bench.bundle_entries(Path("/b"), ort_only, engines, ("fp32",))]
    assert timed == [("ort", "onnxruntime"), ("ort", "openvino")]


def test_a_stale_guest_runtime_is_named(tmp_path):
    from benchmarks.arm.board import stale_runtime

    installed = tmp_path / "edgeport_runtime"
    shutil.copytree(REPO / "runtime", installed)
    assert stale_runtime(installed) is None
    (installed / "bench.py").write_text((installed / "bench.py").read_text() + "\n# edited\n")
    assert stale_runtime(installed) == "bench.py"


def test_board_cli_without_the_environment_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.arm.board", "--cache", str(tmp_path), "bench",
                           str(tmp_path / "b.tar.gz"), "--json", str(tmp_path / "o.json")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "make arm-setup-parity" in proc.stderr
    assert not (tmp_path / "o.json").exists()


# ---- in the aarch64 guest ---------------------------------------------------------------------------------------
def _guest_or_skip():
    from benchmarks.arm.board import Guest, arm_env

    why = Guest(arm_env()).missing()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """fasternet_t0 at 32², two forms (the fc baseline and slicing-conv), ort + mnn_fp32 + openvino."""
    _guest_or_skip()
    from export import bundle as bundle_module
    from export.pipeline import ExportOptions

    out = tmp_path_factory.mktemp("bundle")
    grid = bundle_module.model_grid
    bundle_module.model_grid = lambda opts: grid(opts)[:1] + [("slicing", "conv")]
    try:
        tarball, _ = bundle_module.build_bundle(ExportOptions(model="fasternet_t0", img_size=32, out=str(out),
                                                              targets=("ort", "mnn_fp32", "openvino")))
    finally:
        bundle_module.model_grid = grid
    return Path(tarball)


@pytest.mark.arm
def test_bundle_benched_under_emulation_is_refused_unless_allowed(small_bundle, tmp_path):
    result = tmp_path / "emulated.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.arm.board", "--cpu", "cortex-a76", "bench",
                           str(small_bundle), "--json", str(result), "--rounds", "1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    board = device.read_results(result)
    assert board.device.emulated and board.device.machine == "aarch64"
    assert board.device.cores[0] == "Cortex-A76"
    assert {"mnn", "onnxruntime", "openvino"} <= set(board.device.engines)
    timed = {(r.form, r.engine) for r in board.results}
    assert timed == {(f, e) for f in ("split_cat-fc", "slicing-conv") for e in ("mnn", "onnxruntime", "openvino")}
    assert all(r.median_ms > 0 and r.ratio_to_baseline is not None for r in board.results)

    export = [sys.executable, "-m", "export", "fasternet_t0", "--device", str(result), "--img-size", "32",
              "--targets", "ort", "--out", str(tmp_path / "out")]
    refused = subprocess.run(export, capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "emulation" in refused.stderr and "--allow-emulated" in refused.stderr
    assert not (tmp_path / "out").exists()

    from export.pipeline import choose_from_device

    pconv, mlp, record = choose_from_device("fasternet_t0", str(result), allow_emulated=True)
    built = subprocess.run(export + ["--allow-emulated"], capture_output=True, text=True, cwd=REPO)
    assert built.returncode == 0, built.stderr[-2000:]
    (manifest,) = (tmp_path / "out" / "fasternet_t0").glob("*/manifest.json")
    assert manifest.parent.name.startswith(record["chosen"]["form"])
    assert msgspec.json.decode(manifest.read_bytes())["export"]["forms"]["chosen_on"] == "device"


@pytest.mark.arm
def test_openvino_on_aarch64_passes_the_host_gate_and_catches_a_changed_weight(small_bundle, tmp_path):
    import onnx
    from onnx import numpy_helper

    from benchmarks.arm.board import check_dir

    form = small_bundle.parent / "fasternet_t0" / "slicing-conv"
    (row,) = check_dir(form, "cortex-a76", ("openvino",), log=lambda _: None)
    assert row["passed"] and row["versions"]["machine"] == "aarch64", row["breaches"]
    assert row["max_rel"] <= row["gates"]["max_rel"]

    broken = tmp_path / "slicing-conv"
    shutil.copytree(form, broken)
    model = onnx.load(str(broken / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.001), weight.name))
    onnx.save(model, str(broken / "model.onnx"))
    (row,) = check_dir(broken, "cortex-a76", ("openvino",), log=lambda _: None)
    assert not row["passed"] and row["breaches"]
    json.dumps(row["metrics"])  # the row is reportable as written by `parity --json`


@pytest.mark.arm
def test_an_unknown_cpu_is_one_line_and_exit_2(tmp_path):
    _guest_or_skip()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.arm.board", "--cpu", "cortex-a99", "bench",
                           str(tmp_path), "--json", str(tmp_path / "o.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cortex-a99" in proc.stderr and "cortex-a76" in proc.stderr


@pytest.mark.arm
def test_three_engines_are_counted_and_fp16_arithmetic_counts_fewer(small_bundle):
    from benchmarks.arm.board import Guest, arm_env, count_dir

    if not Guest(arm_env()).count_qemu.exists():
        pytest.skip("counting needs the plugin qemu of `make arm-setup`")
    form = small_bundle.parent / "fasternet_t0" / "split_cat-fc"
    rows = {(r["engine"], r["precision"]): r for r in count_dir(form, "cortex-a76", log=lambda _: None)}
    assert set(rows) == {("onnxruntime", "fp32"), ("openvino", "fp32"), ("mnn", "fp32"), ("mnn", "low")}
    assert all(r["total"] > r["simd_fp"] > 0 for r in rows.values())
    # cortex-a76 has fp16 arithmetic (asimdhp): MNN's "low" does the same convolutions with half-width lanes
    assert rows["mnn", "low"]["simd_fp"] < 0.8 * rows["mnn", "fp32"]["simd_fp"]
