"""ONNX graph inspection: op-type histogram, and a lint for ops the chosen inference form should not have."""
from __future__ import annotations

from collections import Counter

import onnx


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """{op_type: count} over the main graph, most frequent first (ties by name, so the order is stable)."""
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def lint(histogram: dict[str, int], pconv: str | None, mlp: str | None, dynamic_batch: bool = False,
         task: str = "classification"):
    """Warnings (list of str) for ops that betray a slow or unintended form.

    Only `slicing` PConv may scatter (ScatterND is its in-place slice write); the conv MLP must not permute
    (Transpose is the NHWC round trip of the fc form; a detector's head transposes by design: DFL bins,
    attention, anchors-last outputs); after simplification with a static shape, Gather/Shape only survive
    when some shape arithmetic was not folded.
    """
    warnings = []
    if pconv not in (None, "slicing") and histogram.get("ScatterND"):
        n = histogram["ScatterND"]
        warnings.append(f"{n} ScatterND with pconv={pconv} (expected none; slicing leaked?)")
    if mlp == "conv" and task != "detection" and histogram.get("Transpose"):
        n = histogram["Transpose"]
        warnings.append(f"{n} Transpose with mlp=conv (expected none; NHWC permute leaked?)")
    if not dynamic_batch:
        for op in ("Gather", "Shape"):
            if histogram.get(op):
                warnings.append(f"{histogram[op]} {op} in a static-shape graph (unfolded shape arithmetic)")
    return warnings
