"""The OpenVINO engine: runtime.load(engine="openvino") on model.onnx equals ONNX Runtime within the fp32 gate,
its precision mapping, its errors, no telemetry, and the `openvino` target's parity gate (which catches a
perturbed file and OpenVINO's own bf16 default)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import runtime
from export import parity, targets
from runtime.engines import OpenVinoEngine, openvino_config
from runtime.errors import EdgeRuntimeError

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from test_runtime_cli import BLOCKED_RUN  # noqa: E402  (torch and onnx imports fail, each reported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"input_shape": [1, 3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "crop_pct": 0.875, "interpolation": "bicubic", "input_name": "input", "output_names": ["logits"],
        "task": "classification", "num_classes": 10, "model": "tiny_ov"}
ORT_GATE = dict(targets.get("ort").gates)


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 16, 3, 2, 1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # BN statistics that are not the identity
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny classifier exported with the ort and openvino targets (build_artifact, as `make export` builds)."""
    from export.build import build_artifact

    d = tmp_path_factory.mktemp("ov")
    net = tiny_net()
    build = build_artifact(net, META, d, ["openvino"])
    return SimpleNamespace(dir=d, onnx=d / "model.onnx", net=net, built=build["targets"])


def photos_batch(n: int = 6) -> np.ndarray:
    from export.inputs import sample_batch

    return sample_batch(META, n_images=n, n_random=2)


# ---------------------------------------------------------------------------------------------- the engine
def test_openvino_target_builds_only_the_onnx_file(exported):
    assert exported.built == ["ort", "openvino"]  # the file is ort's: openvino adds a target, not a file
    assert sorted(p.name for p in exported.dir.glob("model*")) == ["model.onnx"]


def test_engine_matches_onnxruntime_within_the_fp32_gate(exported):
    ov = runtime.load(exported.onnx, engine="openvino")
    ort = runtime.load(exported.onnx)
    assert ov.backend == "openvino" and ort.backend == "onnxruntime"
    assert ov.meta == ort.meta and ov.meta["model"] == "tiny_ov"  # ONNX metadata_props read by OpenVINO
    assert (ov.input_names, ov.output_names, ov.input_shape) == (ort.input_names, ort.output_names, ort.input_shape)
    assert ov._engine.precision_hint == "f32"
    for x in photos_batch():
        a, b = ort.run(x[None])["logits"], ov.run(x[None])["logits"]
        assert a.shape == b.shape == (1, 10)
        assert parity.max_rel(a, b) <= ORT_GATE["max_rel"]
    # outputs are the caller's: a second run does not overwrite the first's array
    x = photos_batch(2)
    first = ov.run(x[:1])["logits"]
    kept = first.copy()
    ov.run(x[1:2])
    np.testing.assert_array_equal(first, kept)


def test_engine_aliases_and_the_former_keyword(exported):
    for kwargs in ({"engine": "ov"}, {"backend": "openvino"}, {"engine": "openvino", "backend": "openvino"}):
        assert runtime.load(exported.onnx, **kwargs).backend == "openvino"
    assert runtime.load(exported.onnx, "ort").backend == "onnxruntime"  # positional engine, as before


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "tensorrt"}, "unknown engine 'tensorrt'; choose auto, mnn, onnxruntime, openvino"),
    ({"engine": "mnn", "backend": "openvino"}, "engine 'mnn' and backend 'openvino' disagree"),
    ({"engine": "openvino", "winograd": "fast"}, "winograd 'fast' is an MNN option"),
])
def test_bad_engine_options_are_one_line_errors(exported, kwargs, message):
    with pytest.raises(EdgeRuntimeError) as e:
        runtime.load(exported.onnx, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_file_openvino_cannot_read_is_a_one_line_error(tmp_path, capfd):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(EdgeRuntimeError, match="not an ONNX model .*use engine mnn for a .mnn file"):
        runtime.load(bad, engine="openvino")
    assert capfd.readouterr().err == ""  # no other frontend (TensorFlow's) printing parse errors


class FakeCore:
    def __init__(self, capabilities):
        self.capabilities = capabilities

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


@pytest.mark.parametrize("capabilities, precision, hint", [
    (["FP32", "BF16", "INT8"], "fp32", "f32"),  # asked for: the plugin's own default here would be bf16
    (["FP32", "BF16", "INT8"], "low", "bf16"),  # x86 with AVX512_BF16 / AMX
    (["FP32", "FP16", "INT8"], "low", "f16"),   # ARMv8.2+
    (["FP32", "INT8"], "low", "f32"),           # nothing lower on this CPU
])
def test_precision_maps_to_the_plugins_hint(capabilities, precision, hint):
    config = openvino_config(FakeCore(capabilities), threads=3, precision=precision)
    assert config["INFERENCE_PRECISION_HINT"] == hint
    assert config["INFERENCE_NUM_THREADS"] == 3 and config["PERFORMANCE_HINT"] == "LATENCY"


def test_low_precision_runs_with_the_cpus_hint(exported):
    from runtime.engines import import_openvino

    capabilities = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    low = runtime.load(exported.onnx, engine="openvino", precision="low")
    expected = "bf16" if "BF16" in capabilities else "f16" if "FP16" in capabilities else "f32"
    assert low._engine.precision_hint == expected
    assert low.run(photos_batch(1)[:1])["logits"].shape == (1, 10)


# ---------------------------------------------------------------------------------------------- the CLIs
def test_infer_cli_engine_openvino_gives_onnxruntimes_top1_on_the_photos(exported, tmp_path, capsys):
    from export.inputs import sample_images
    from runtime.infer import main

    for name, img in sample_images()[:4]:
        img.save(tmp_path / f"{os.path.splitext(name)[0]}.png")
    docs = {}
    for flag, engine in (("--engine", "openvino"), ("--backend", "onnxruntime")):  # --backend: the former name
        assert main([str(exported.onnx), str(tmp_path), flag, engine, "--json"]) == 0
        docs[engine] = json.loads(capsys.readouterr().out)
    assert docs["openvino"]["backend"] == "openvino" and len(docs["openvino"]["results"]) == 4
    top1 = {e: [r["topk"][0]["index"] for r in d["results"]] for e, d in docs.items()}
    assert top1["openvino"] == top1["onnxruntime"]


def test_cli_unknown_engine_is_one_line_exit_2(exported, capsys):
    from runtime.infer import main

    with pytest.raises(SystemExit) as e:
        main([str(exported.onnx), "x.png", "--engine", "tensorrt"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--engine/--backend: invalid choice: 'tensorrt'" in err and "openvino" in err


def test_cli_runs_without_torch_and_writes_no_telemetry_state(exported, tmp_path):
    """`runtime.infer --engine openvino` with torch and onnx unimportable. And: `import openvino` alone, with
    openvino-telemetry installed and no opt-out file, writes ~/intel/openvino_ga_cid and sends a Google
    Analytics event; through the runtime it must do neither."""
    home = tmp_path / "home"
    home.mkdir()
    photo = tmp_path / "photo.png"
    from export.inputs import sample_images

    sample_images()[0][1].save(photo)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": REPO}
    env.pop("CI", None)  # openvino-telemetry's own off switch: the runtime must not depend on it
    run = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "runtime.infer", str(exported.onnx), str(photo),
                          "--engine", "openvino", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "BLOCKED" not in run.stderr
    assert json.loads(run.stdout)["backend"] == "openvino"
    assert not list(home.iterdir()), list(home.rglob("*"))


def test_the_telemetry_check_can_fail(tmp_path):
    """A plain `import openvino` does write the telemetry state, so the test above can fail. Run without a
    network (`unshare -rn`), so the event it sends cannot leave; the client-id file is written beside it."""
    import importlib.util

    if importlib.util.find_spec("openvino_telemetry") is None:
        pytest.skip("openvino-telemetry is not installed: nothing to switch off")
    if not _can_unshare_network():
        pytest.skip("no `unshare -rn` here: a plain `import openvino` would really send its event")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)
    run = subprocess.run(["unshare", "-rn", sys.executable, "-c", "import openvino, time; time.sleep(1)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "intel" / "openvino_ga_cid").is_file()


def _can_unshare_network() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# ---------------------------------------------------------------------------------------------- the gate
def _parity(directory, net, names=("ort", "openvino"), bisect=False):
    return parity.run_parity(directory, net, net, META, n_images=8, bisect=bisect, bisect_budget=60, write=False,
                             target_names=list(names))


def test_openvino_target_passes_its_gate(exported):
    r = _parity(exported.dir, exported.net)
    assert r["passed"], r["breaches"]
    assert r["gates"]["openvino"] == r["gates"]["ort"] == ORT_GATE  # set before measuring: the ORT fp32 gate
    assert r["results"]["openvino"]["logits"]["max_rel"] <= ORT_GATE["max_rel"]


def test_openvino_target_fails_on_a_perturbed_file(exported, tmp_path):
    """A conv's weights 0.1 % too large (a BatchNorm folded with a slightly wrong scale): a defect in the file,
    caught under OpenVINO."""
    from onnx import numpy_helper

    model = onnx.load(str(exported.onnx))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.001), init.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    r = _parity(tmp_path, exported.net, ["openvino"])
    assert not r["passed"]
    assert any(b.startswith("openvino: max_rel") for b in r["breaches"]), r["breaches"]


def test_openvino_target_catches_the_plugins_bf16_default(exported, monkeypatch):
    """Without the f32 hint, OpenVINO's CPU plugin computes in bf16 where the CPU has it: far outside the gate,
    and bisection (OpenVINO on the probe graph, configured as the runtime) names the first layer."""
    from runtime.engines import import_openvino

    if "BF16" not in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: the plugin's default is f32 here")
    import export.bisect as bisect
    import runtime.engines as engines

    real = engines.openvino_config

    def plugin_default(core, threads=1, precision="fp32"):
        return {**real(core, threads, precision), "INFERENCE_PRECISION_HINT": "bf16"}

    monkeypatch.setattr(engines, "openvino_config", plugin_default)
    monkeypatch.setattr(bisect, "openvino_config", plugin_default)
    r = _parity(exported.dir, exported.net, ["ort", "openvino"], bisect=True)
    assert not r["passed"]
    assert [b.split(":")[0] for b in r["breaches"]] == ["openvino"], r["breaches"]
    hit = r["bisection"]["openvino"]
    assert hit["found"] and hit["op_type"] == "Conv" and hit["max_rel"] > ORT_GATE["max_rel"], hit


def test_engine_class_is_registered():
    from runtime.engines import ENGINES

    assert ENGINES["openvino"] is OpenVinoEngine
    assert targets.get("openvino").engine == "openvino" and targets.producer(targets.get("openvino")).name == "ort"
    assert targets.producer(targets.get("openvino_int8")).name == "ort_int8"
