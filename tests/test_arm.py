"""MNN's and onnxruntime's aarch64 kernels under qemu-user: parity gates and instruction counts (needs
`make arm-setup`).

Run with: .venv/bin/python -m pytest tests/test_arm.py -m arm   (`make test` skips these)."""
import json
import os
from pathlib import Path

import pytest

from benchmarks.arm.run import arm_env

_MISSING = arm_env().missing()
pytestmark = [pytest.mark.arm,
              pytest.mark.skipif(bool(_MISSING), reason=f"ARM environment not built ({_MISSING}); "
                                                        "run `make arm-setup`")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from benchmarks.arm.tiny import make_tiny_artifacts

    return make_tiny_artifacts(str(tmp_path_factory.mktemp("arm")), forms=[("split_cat", "fc")])[0]


@pytest.fixture(scope="module")
def inputs(tiny_dir):
    from benchmarks.arm.parity import read_metadata
    from export.inputs import sample_batch

    return sample_batch(read_metadata(Path(tiny_dir)), n_images=2, n_random=1)


@pytest.fixture(scope="module")
def outputs(tiny_dir, inputs):
    """Guest outputs of model.mnn by (cpu, precision), run once per module."""
    from benchmarks.arm import run_mnn_arm

    cache = {}

    def get(cpu, precision):
        if (cpu, precision) not in cache:
            cache[cpu, precision] = run_mnn_arm(os.path.join(tiny_dir, "model.mnn"), inputs, cpu, precision)
        return cache[cpu, precision]

    return get


def test_instruction_counts_repeat_exactly(tiny_dir, inputs):
    from benchmarks.arm import count_instructions

    model = os.path.join(tiny_dir, "model.mnn")
    first = count_instructions(model, inputs, "cortex-a53")
    second = count_instructions(model, inputs, "cortex-a53")
    assert first == second
    assert first["total"] == first["load_store"] + first["simd_fp"] + first["other"]
    assert min(first.values()) > 0


def test_fp32_parity_passes(tiny_dir):
    from benchmarks.arm.parity import check_dir
    from export import targets

    report = check_dir(tiny_dir, cpus=["cortex-a53"], target_names=["mnn_fp32"], n_images=2, n_random=1,
                       log=lambda s: None)
    (row,) = report["rows"]
    assert row["target"] == "mnn_fp32" and row["compute"] == "fp32" and row["reference"] == "onnxruntime"
    assert row["max_rel"] <= targets.get("mnn_fp32").gates["max_rel"] and row["top1"] == 1.0
    assert report["passed"]
    with open(os.path.join(tiny_dir, "arm_parity.json")) as f:
        assert json.load(f)["passed"] is True


def test_too_tight_fp16_gate_fails(tiny_dir):
    """The same gate definition as the host's: a tightened mnn_low gate fails on the fp16 path."""
    from benchmarks.arm.parity import check_dir
    from export import targets

    report = check_dir(tiny_dir, cpus=["neoverse-n1"], target_names=["mnn_low"],
                       gates={"mnn_low": {"max_rel": 1e-7}}, n_images=2, n_random=1, log=lambda s: None)
    (row,) = report["rows"]
    assert row["compute"] == "fp16", "neoverse-n1 should take MNN's fp16 path at precision low"
    assert not row["passed"] and not report["passed"] and row["breaches"]
    assert row["max_rel"] <= targets.get("mnn_low").gates["max_rel"], "the default gate passes the same outputs"


def test_precision_low_is_fp16_only_where_the_cpu_has_it(tiny_dir, inputs, outputs):
    """neoverse-n1 (ARMv8.2) reports fp16 arithmetic and runs precision 'low' in it; cortex-a53 (ARMv8.0) does
    not. MNN's 'low' still approximates some elementwise ops on ARMv8.0 (6e-4 of max|logit| on this net, whose
    exact GELU is a chain of elementwise ops), but less than the fp16 path changes the result."""
    from benchmarks.arm.run import guest_infer
    from models.metrics import max_rel

    model = os.path.join(tiny_dir, "model.mnn")
    assert guest_infer(model, inputs[:1], "cortex-a53", "low").device.get("fp16") == 0
    assert guest_infer(model, inputs[:1], "neoverse-n1", "low").device.get("fp16") == 1
    drift = {cpu: max(max_rel(outputs(cpu, "normal")[k], outputs(cpu, "low")[k]) for k in outputs(cpu, "normal"))
             for cpu in ("cortex-a53", "neoverse-n1")}
    assert 0 < drift["neoverse-n1"] and drift["cortex-a53"] < drift["neoverse-n1"], drift
    assert drift["neoverse-n1"] <= 3e-2, drift  # within the mnn_low gate


_ORT_MISSING = arm_env().missing("onnxruntime")
needs_ort = pytest.mark.skipif(bool(_ORT_MISSING), reason=f"onnxruntime's qemu 10 not set up ({_ORT_MISSING}); "
                                                          "run `make arm-setup`")


@needs_ort
def test_onnx_parity_passes_under_qemu10(tiny_dir):
    """model.onnx on onnxruntime's aarch64 kernels (cortex-a76 under qemu 10), judged with the host's ort gate."""
    from benchmarks.arm.parity import check_dir
    from export import targets

    report = check_dir(tiny_dir, cpus=["cortex-a76"], target_names=["ort"], n_images=2, n_random=1,
                       log=lambda s: None)
    (row,) = report["rows"]
    assert (row["target"], row["engine"], row["file"]) == ("ort", "onnxruntime", "model.onnx")
    assert row["qemu"].startswith("10."), row["qemu"]
    assert row["max_rel"] <= targets.get("ort").gates["max_rel"] and row["top1"] == 1.0 and report["passed"]


@needs_ort
def test_onnx_gate_catches_changed_weights(tiny_dir, tmp_path, monkeypatch):
    """A model.onnx whose weights changed after export (one conv's weights × 1.01) runs in the guest and fails the
    ort gate against the exported model's outputs."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from benchmarks.arm import parity

    shutil.copytree(tiny_dir, tmp_path / "bad")
    model = onnx.load(str(tmp_path / "bad" / "model.onnx"))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    onnx.save(model, str(tmp_path / "bad" / "model.onnx"))
    good = Path(tiny_dir) / "model.onnx"  # the reference stays the exported file, as a manifest's would
    monkeypatch.setattr(parity, "reference_for", lambda d, meta: (
        lambda x: parity.onnx_reference(good, x, list(meta["output_names"])), "onnxruntime"))
    report = parity.check_dir(tmp_path / "bad", cpus=["cortex-a76"], target_names=["ort"], n_images=2,
                              n_random=1, log=lambda s: None)
    (row,) = report["rows"]
    assert not row["passed"] and not report["passed"] and row["breaches"], row


@pytest.mark.skipif(not arm_env().can_count("onnxruntime"),
                    reason="onnxruntime is counted only by the qemu 10 with plugins that `make arm-setup` builds")
def test_onnxruntime_counted_under_qemu10(tiny_dir, inputs):
    """onnxruntime counted by the qemu 10 with plugins: repeats agree within arm-cost's tolerance, and its count
    differs from MNN's on the same model by far more than that."""
    from benchmarks.arm import count_instructions
    from benchmarks.arm.cost import REPEAT_TOLERANCE
    from benchmarks.arm.run import arm_env

    assert arm_env().emulator("onnxruntime", counting=True)[0].endswith("qemu-count/bin/qemu-aarch64")
    path = os.path.join(tiny_dir, "model.onnx")
    first, second = (count_instructions(path, inputs, "cortex-a76") for _ in range(2))
    assert abs(first["total"] / second["total"] - 1) <= REPEAT_TOLERANCE, (first, second)
    assert first["total"] == first["load_store"] + first["simd_fp"] + first["other"] > 0
    mnn = count_instructions(os.path.join(tiny_dir, "model.mnn"), inputs, "cortex-a76")
    assert abs(first["total"] / mnn["total"] - 1) > 10 * REPEAT_TOLERANCE, (first, mnn)
