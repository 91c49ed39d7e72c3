"""PyTorch → ONNX: export with a pinned opset, full checker, simplification and the edgeport metadata."""
from __future__ import annotations

import importlib.util
import json
import warnings

import onnx
import torch
from torch import nn

from models.errors import EdgeportError

DEFAULT_OPSET = 17
# The TorchScript exporter stops at opset 20; below 13 Split/Squeeze take attributes MNN handles less well.
SUPPORTED_OPSETS = range(13, 21)
EXPORTERS = ("legacy", "dynamo")
SIMPLIFIERS = ("onnxsim", "onnxslim", "none")


def check_options(opset: int, exporter: str, simplifier: str) -> None:
    """Fail before any work is done on options the toolchain cannot honour."""
    if opset not in SUPPORTED_OPSETS:
        lo, hi = SUPPORTED_OPSETS.start, SUPPORTED_OPSETS.stop - 1
        raise EdgeportError(f"unsupported --opset {opset}; use {lo}–{hi} (default {DEFAULT_OPSET})")
    if exporter not in EXPORTERS:
        raise EdgeportError(f"unknown --exporter '{exporter}'; use one of: {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise EdgeportError("--exporter dynamo needs the onnxscript package, which is not installed; "
                            "use --exporter legacy (the default)")
    if simplifier not in SIMPLIFIERS:
        raise EdgeportError(f"unknown --simplifier '{simplifier}'; use one of: {', '.join(SIMPLIFIERS)}")


def export_onnx(model: nn.Module, path, meta: dict, opset: int = DEFAULT_OPSET,
                exporter: str = "legacy") -> onnx.ModelProto:
    """Export `model` (eval) with the input/output names and batch handling of `meta`; returns the graph."""
    batch, *chw = meta["input_shape"]
    dynamic = batch == -1
    example = torch.zeros(2 if dynamic else batch, *chw)
    inputs, outputs = [meta["input_name"]], list(meta["output_names"])
    axes = {name: {0: "batch"} for name in inputs + outputs} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer warnings
        if exporter == "dynamo":
            dyn_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=inputs, output_names=outputs, dynamic_shapes=dyn_shapes)
            program.save(str(path))
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              do_constant_folding=True)
    return onnx.load(str(path))


def full_check(graph: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(graph, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgeportError(f"onnx.checker rejected the {what} graph: {first}") from None


def simplify(graph: onnx.ModelProto, simplifier: str = "onnxsim") -> onnx.ModelProto:
    if simplifier == "none":
        return graph
    if simplifier == "onnxslim":
        import onnxslim

        out = onnxslim.slim(graph)
    else:
        import onnxsim

        # Keep weights as initializers: the default (Constant nodes) also rewrites the erf-GELU pattern
        # that MNN fuses into one GELU op.
        out, ok = onnxsim.simplify(graph, initializers_as_constants=False)
        if not ok:
            raise EdgeportError("onnxsim could not validate the simplified graph; retry with "
                                "--simplifier onnxslim or --simplifier none")
    full_check(out, "simplified")
    return out


def metadata_json(meta: dict) -> str:
    """The canonical text of the metadata (sorted keys, no spaces): identical bytes on every run."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def set_metadata(graph: onnx.ModelProto, meta: dict) -> onnx.ModelProto:
    """metadata_props: "edgeport" = the whole contract JSON, plus one flat key per field (simple readers)."""
    del graph.metadata_props[:]
    props = {"edgeport": metadata_json(meta)}
    for key, value in sorted(meta.items()):
        props[key] = value if isinstance(value, str) else json.dumps(value)
    onnx.helper.set_model_props(graph, props)
    return graph
