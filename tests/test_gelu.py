"""GELU lowering: each method stays within its stated error of erf-GELU (and a perturbed method is caught), the
torch export patterns are found and replaced without touching the input model, and an MNN conversion of a
lowered model holds no GELU_STANDARD."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from scipy.special import erf
from torch import nn

from export import gelu

LOWERED = [name for name, spec in gelu.GELU_METHODS.items() if spec is not None]
GRID = np.concatenate([np.linspace(-10, 10, 400_001), [-1e4, -60.0, 60.0, 1e4]]).astype(np.float32)


def gelu64(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def erf_gelu_graph(n: int = GRID.size, order: str = "torch") -> onnx.ModelProto:
    """The erf-GELU as torch exports it (Div √2, Erf, Add 1, Mul x, Mul 0.5), or with the products reordered."""
    c = {"sq2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}
    nodes = [helper.make_node("Div", ["x", "sq2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"])]
    if order == "torch":
        nodes += [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    else:  # (x·0.5)·(1 + erf)
        nodes += [helper.make_node("Mul", ["half", "x"], ["h"]), helper.make_node("Mul", ["a", "h"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(v, k) for k, v in c.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def max_error(method: str) -> float:
    y = run_ort(gelu.lower_gelu(erf_gelu_graph(), method), GRID[None])[0]
    return float(np.abs(y - gelu64(GRID)).max())


@pytest.mark.parametrize("method", LOWERED)
def test_lowering_stays_within_its_stated_error(method):
    assert max_error(method) <= gelu.GELU_METHODS[method].max_abs_error


def test_error_gate_catches_a_perturbed_coefficient(monkeypatch):
    """A method whose scale is off by 0.1 % (or the tanh approximation, ~3e-4) must fail the same gate."""
    spec = gelu.GELU_METHODS[gelu.DEFAULT_METHOD]
    monkeypatch.setitem(gelu.GELU_METHODS, "perturbed", dataclasses.replace(spec, scale=spec.scale * 1.001))
    assert max_error("perturbed") > spec.max_abs_error
    x = GRID.astype(np.float64)
    tanh_gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    assert np.abs(tanh_gelu - gelu64(x)).max() > spec.max_abs_error


class TwoGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gelu") / "tiny.onnx"
    torch.onnx.export(TwoGelu().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return onnx.load(str(path))


def test_torch_export_patterns_are_found_and_replaced(tiny):
    before = tiny.SerializeToString()
    assert gelu.count_gelu(tiny) == 2
    lowered = gelu.lower_gelu(tiny)
    assert tiny.SerializeToString() == before  # the input is untouched
    onnx.checker.check_model(lowered, full_check=True)
    assert gelu.count_gelu(lowered) == 0
    assert not any(n.op_type in ("Erf", "Div") for n in lowered.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8), dtype=np.float32) * 3
    np.testing.assert_allclose(run_ort(lowered, x), run_ort(tiny, x), atol=1e-5)
    assert gelu.lower_gelu(tiny, "erf").SerializeToString() == before


def test_reordered_products_and_opset20_gelu_are_found():
    assert gelu.count_gelu(erf_gelu_graph(8, order="half_first")) == 1
    for approximate, expected in (("none", 1), ("tanh", 0)):
        graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        assert gelu.count_gelu(model) == expected
        if expected:
            assert not any(n.op_type == "Gelu" for n in gelu.lower_gelu(model).graph.node)


def test_pattern_with_a_shared_intermediate_is_left_alone():
    model = erf_gelu_graph(8)
    model.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8]))  # erf is an output
    assert gelu.count_gelu(model) == 0


def test_unknown_method_is_rejected(tiny):
    with pytest.raises(ValueError, match="unknown GELU method"):
        gelu.lower_gelu(tiny, "fast")


def _mnn(model: onnx.ModelProto, tmp_path, name: str):
    from benchmarks.profile import mnn_op_types
    from export import mnn_convert

    onnx_path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(onnx_path))
    mnn_path = mnn_convert.convert(onnx_path, tmp_path / f"{name}.mnn", "test")
    return mnn_path, set(mnn_op_types(mnn_path).values())


def test_mnn_export_of_a_lowered_model_has_no_gelu_standard(tiny, tmp_path):
    _, plain = _mnn(tiny, tmp_path, "plain")
    assert "GELU_STANDARD" in plain  # what the check must catch: the converter's scalar exact GELU
    _, lowered = _mnn(gelu.lower_gelu(tiny), tmp_path, "lowered")
    assert "GELU_STANDARD" not in lowered and "GELU" not in lowered
    assert {"SIGMOID", "SquaredDifference"} <= lowered


@pytest.mark.parametrize("method", LOWERED)
def test_mnn_runs_the_lowering_within_its_stated_error(method, tmp_path):
    from runtime import load

    n = 100_000
    x = np.linspace(-10, 10, n, dtype=np.float32)[None]
    path, _ = _mnn(gelu.lower_gelu(erf_gelu_graph(n), method), tmp_path, method)
    y = load(str(path)).run(x)["y"][0]
    assert np.abs(y - gelu64(x[0])).max() <= gelu.GELU_METHODS[method].max_abs_error


@pytest.mark.parametrize("method", LOWERED)
def test_lowering_survives_float16_arithmetic(method):
    """MNN's precision 'low' runs the lowered ops in float16 on ARMv8.2: every intermediate must stay finite
    where the result matters (unscaled, the product was ~1e6 at x = 0: inf, then 0 × inf = NaN)."""
    spec = gelu.GELU_METHODS[method]
    c = {t.name.rsplit("/", 1)[1]: np.float16(numpy_helper.to_array(t)) for t in gelu._method_constants(spec, "k")}
    x = np.concatenate([np.linspace(-300, 300, 60001), [0.0, -0.0]]).astype(np.float16)
    v = x * x * c["c"]
    p = np.float16(1)
    for k in range(len(spec.factors)):
        d = v - c[f"cm{k}"]
        p = p * (d * d + c[f"ce{k}"])
    with np.errstate(over="ignore"):
        y = x * (np.float16(1) / (np.float16(1) + np.exp(-(x * p))))
    exact = 0.5 * x.astype(np.float64) * (1 + erf(x.astype(np.float64) / np.sqrt(2)))
    assert np.isfinite(y).all()
    assert (np.abs(y - exact) <= 2e-2 * np.maximum(1, np.abs(x))).all()
