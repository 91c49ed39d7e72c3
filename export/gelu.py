"""Exact GELU, x·Φ(x), lowered into ONNX ops that MNN runs vectorised.

MNN's converter turns the erf-GELU that torch exports (Div by √2, Erf, Add 1, Mul x, Mul 0.5) into one UnaryOp
GELU_STANDARD, whose CPU kernel calls a scalar double-precision erf per element (20–55 ns per element on
realistic activations); with `--useGeluApproximation 1` it becomes the vectorised tanh GELU instead, whose error
fails the MNN fp32 gate. `lower_gelu` rewrites every erf-GELU into ops MNN vectorises (Square,
SquaredDifference, Add, Mul, Sigmoid), so the converter keeps no GELU_STANDARD; each method's error is stated
in GELU_METHODS and checked by tests/test_gelu.py. ONNX Runtime fuses the Erf pattern into its own fast Gelu
kernel, so its artifact keeps "erf".
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

SQRT2 = float(np.sqrt(2.0))
_TOL = 1e-5  # how near a constant must be to √2, 1/√2, 1 or 0.5 to count as the erf-GELU's


@dataclass(frozen=True)
class GeluMethod:
    """Φ(x) ≈ σ(g(x)), g(x) = x·scale·∏ᵢ((x² - mᵢ)² + eᵢ): a polynomial in x² with a positive leading
    coefficient and no real root (every eᵢ > 0), so g keeps the sign of x and σ saturates correctly for any
    |x| (no clamp needed). Each factor is one SquaredDifference (MNN fuses Sub-then-Mul-by-itself) and one Add.
    Weighted minimax fit of logit Φ; the weight |x|·Φ(x)·Φ(-x) is the GELU error per unit error in g."""
    scale: float
    factors: tuple[tuple[float, float], ...]  # (mᵢ, eᵢ)
    max_abs_error: float  # max |lowered − erf-GELU| in float32 on x in [-10, 10] (ONNX Runtime and MNN)
    ops: int  # elementwise ops per GELU
    note: str


GELU_METHODS: dict[str, GeluMethod | None] = {
    "erf": None,  # keep the Erf pattern
    "sigmoid_p4": GeluMethod(2.225274353875363e-06, ((-17.6938858838888, 113.16264999067305),
                                                     (31.385360723376184, 697.2655299338038)),
                             4e-6, 10, "degree 4 in x², fitted on |x| ≤ 4.5"),
    "sigmoid_p6": GeluMethod(3.3364567598531286e-09, ((-12.54865682461023, 76.95157440482687),
                                                      (10.229388993291977, 956.5976696108431),
                                                      (40.60571841383485, 273.7172134825349)),
                             1.2e-6, 13, "degree 6 in x², fitted on |x| ≤ 5"),
}
DEFAULT_METHOD = "sigmoid_p4"


@dataclass(frozen=True)
class GeluMatch:
    x: str  # GELU input tensor
    y: str  # GELU output tensor
    nodes: tuple[int, ...]  # indices of the matched nodes in graph.node


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _scalar(consts: dict, name: str | None) -> float | None:
    value = consts.get(name) if name else None
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= _TOL * abs(target)


class _Graph:
    """Producer/consumer look-ups over one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = graph.node
        self.consts = _constants(graph)
        self.producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                self.consumers.setdefault(name, []).append(i)
        self.outputs = {o.name for o in graph.output}

    def only_consumer(self, tensor: str, op_type: str) -> int | None:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.outputs or self.nodes[users[0]].op_type != op_type:
            return None
        return users[0]

    def made_by(self, tensor: str, op_type: str) -> int | None:
        i = self.producer.get(tensor)
        return i if i is not None and self.nodes[i].op_type == op_type else None

    @staticmethod
    def other_input(node, tensor: str) -> str | None:
        ins = list(node.input)
        if len(ins) != 2 or tensor not in ins:
            return None
        return ins[1] if ins[0] == tensor else ins[0]


def find_gelu(model: onnx.ModelProto) -> list[GeluMatch]:
    """Every erf-GELU in the main graph: torch's pattern (x/√2 or x·(1/√2), Erf, +1, and the products with x and
    0.5 in any order) and the opset-20 `Gelu` op with approximate="none". Its intermediate tensors must have no
    other consumer and not be graph outputs."""
    g = _Graph(model.graph)
    matches = []
    for i, node in enumerate(g.nodes):
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            approx = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
            if approx == "none":
                matches.append(GeluMatch(node.input[0], node.output[0], (i,)))
            continue
        if node.op_type != "Erf":
            continue
        x, scale_node = _erf_input(g, node.input[0])
        if x is None or g.only_consumer(node.input[0], "Erf") is None:
            continue
        add = g.only_consumer(node.output[0], "Add")
        if add is None or not _near(_scalar(g.consts, g.other_input(g.nodes[add], node.output[0])), 1.0):
            continue
        tail = _product_tail(g, g.nodes[add].output[0], x)
        if tail is not None:
            nodes, y = tail
            matches.append(GeluMatch(x, y, tuple(sorted({scale_node, i, add, *nodes}))))
    return matches


def _erf_input(g: _Graph, scaled: str) -> tuple[str | None, int | None]:
    """x where `scaled` = x/√2 or x·(1/√2)."""
    d = g.made_by(scaled, "Div")
    if d is not None and _near(_scalar(g.consts, g.nodes[d].input[1]), SQRT2):
        return g.nodes[d].input[0], d
    m = g.made_by(scaled, "Mul")
    if m is not None:
        for a, b in (g.nodes[m].input, reversed(g.nodes[m].input)):
            if _near(_scalar(g.consts, b), 1 / SQRT2):
                return a, m
    return None, None


def _product_tail(g: _Graph, one_plus_erf: str, x: str) -> tuple[tuple[int, ...], str] | None:
    """The two Muls that multiply (1 + erf) by x and 0.5, in any order: (x·0.5)·s, (x·s)·0.5 or (s·0.5)·x."""
    m1 = g.only_consumer(one_plus_erf, "Mul")
    if m1 is None:
        return None
    partner = g.other_input(g.nodes[m1], one_plus_erf)
    h = g.made_by(partner, "Mul") if partner else None
    if h is not None and g.only_consumer(partner, "Mul") == m1 and x in g.nodes[h].input and \
            _near(_scalar(g.consts, g.other_input(g.nodes[h], x)), 0.5):
        return (h, m1), g.nodes[m1].output[0]
    out1 = g.nodes[m1].output[0]
    m2 = g.only_consumer(out1, "Mul")
    if m2 is None:
        return None
    last = g.other_input(g.nodes[m2], out1)
    if (partner == x and _near(_scalar(g.consts, last), 0.5)) or \
            (_near(_scalar(g.consts, partner), 0.5) and last == x):
        return (m1, m2), g.nodes[m2].output[0]
    return None


def count_gelu(model: onnx.ModelProto) -> int:
    """How many exact (erf) GELUs the graph holds, as `lower_gelu` finds them."""
    return len(find_gelu(model))


def lower_gelu(model: onnx.ModelProto, method: str = DEFAULT_METHOD) -> onnx.ModelProto:
    """A copy of `model` with every erf-GELU replaced by `method`'s decomposition (GELU_METHODS); the input is
    not modified. "erf" returns an unchanged copy."""
    if method not in GELU_METHODS:
        raise ValueError(f"unknown GELU method {method!r}; choose one of {', '.join(GELU_METHODS)}")
    model = copy.deepcopy(model)
    spec = GELU_METHODS[method]
    matches = find_gelu(model) if spec is not None else []
    if not matches:
        return model
    graph = model.graph
    prefix = _unique_prefix(graph, f"gelu_{method}")
    graph.initializer.extend(_method_constants(spec, prefix))
    removed = {i for m in matches for i in m.nodes}
    at_last_node = {max(m.nodes): m for m in matches}  # x exists there, and y is consumed only after it
    nodes = []
    for i, node in enumerate(graph.node):
        if i in at_last_node:
            nodes.extend(_decomposition(spec, at_last_node[i], f"{prefix}/{i}", prefix))
        elif i not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_constants(graph)
    return model


def _unique_prefix(graph, base: str) -> str:
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer} | \
        {o for n in graph.node for o in n.output}
    prefix, k = base, 0
    while any(name.startswith(prefix + "/") for name in names):
        k += 1
        prefix = f"{base}_{k}"
    return prefix


def _method_constants(spec: GeluMethod, prefix: str) -> list[onnx.TensorProto]:
    """The scale is spread over the factors (each times scale^(1/n), written as (c·x² − c·mᵢ)² + c²·eᵢ with
    c = scale^(1/2n)): unscaled, the product is ~1e6 at x = 0, which overflows float16 (MNN's precision 'low' on
    ARMv8.2 computed inf, then NaN at x = 0, and a ReLU elsewhere)."""
    c = float(spec.scale) ** (1.0 / (2 * len(spec.factors)))
    values = {"c": c}
    for k, (m, e) in enumerate(spec.factors):
        values.update({f"cm{k}": c * m, f"ce{k}": c * c * e})
    return [numpy_helper.from_array(np.array(v, dtype=np.float32), f"{prefix}/{k}") for k, v in values.items()]


def _decomposition(spec: GeluMethod, m: GeluMatch, tag: str, prefix: str) -> list[onnx.NodeProto]:
    """y = x·σ(x·∏((c·x² - c·mᵢ)² + c²·eᵢ)) = x·σ(x·scale·∏((x² - mᵢ)² + eᵢ))"""
    nodes = []

    def op(op_type, *inputs):
        out = f"{tag}/{op_type}_{len(nodes)}"
        nodes.append(helper.make_node(op_type, list(inputs), [out], name=out))
        return out

    v = op("Mul", op("Mul", m.x, m.x), f"{prefix}/c")
    p = None
    for k in range(len(spec.factors)):
        diff = op("Sub", v, f"{prefix}/cm{k}")
        factor = op("Add", op("Mul", diff, diff), f"{prefix}/ce{k}")
        p = factor if p is None else op("Mul", p, factor)
    s = op("Sigmoid", op("Mul", m.x, p))
    nodes.append(helper.make_node("Mul", [m.x, s], [m.y], name=f"{tag}/Mul_out"))
    return nodes


def _drop_unused_constants(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in used]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
