"""The int8 targets' producers: calibrate, quantise, and keep the most harmful layers in float until the
target's own gates (export.targets) pass against the float model on held-out images, or a limit is hit.

The fallback judges with export.parity.judge, the same definition the parity gate uses afterwards (there
against the PyTorch training form on the same held-out images).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from models.errors import EdgeportError
from runtime.atomic import write_atomic

from . import quantize
from .parity import held_out_description


def _float_outputs(onnx_path: Path, x: np.ndarray) -> dict:
    import runtime

    predictor = runtime.load(onnx_path, backend="onnxruntime", threads=1)
    return _batched(predictor, x)


def _batched(predictor, x: np.ndarray) -> dict:
    rows = [predictor.run(np.ascontiguousarray(x[i:i + 1]), check_finite=False) for i in range(len(x))]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _judge(target, ctx, outputs: dict) -> tuple[dict, list[str]]:
    from .parity import judge

    classifier = ctx.meta.get("task", "classification") == "classification"
    return judge(target.name, ctx.float_eval(), outputs, dict(target.gates), classifier)


def _record(ctx, target, found, info: dict, **extra) -> None:
    ctx.records[target.name] = {
        "calibration": info, "kept_in_float": found.kept, "fallback_metrics_vs_float": found.metrics,
        "fallback_breaches": found.breaches, "fallback_stopped": found.stopped,
        "evaluated_on": held_out_description(ctx.held_out_dir),
        **extra}


def produce_ort_int8(ctx, target) -> None:
    """model.int8.onnx: QDQ (per-channel int8 weights, uint8 activations), ranges from the calibration set."""
    import onnx

    from .onnx_export import set_metadata

    calib, info = ctx.calibration()
    float_model = onnx.load(str(ctx.onnx_path))
    x = ctx.eval_inputs()
    with tempfile.TemporaryDirectory(prefix="edgeport-int8-") as tmp:
        cache = Path(tmp) / "ranges"

        def quantised(exclude):
            return quantize.ort_int8(float_model, calib, exclude=exclude, cache=cache)

        def outputs(model):
            session = quantize.ort_session(model)
            names = [o.name for o in session.get_outputs()]
            rows = [session.run(names, {session.get_inputs()[0].name: x[i:i + 1]}) for i in range(len(x))]
            return {n: np.concatenate([r[k] for r in rows]) for k, n in enumerate(names)}

        def metrics_without(exclude):
            ctx.progress(_candidate(exclude))
            return _judge(target, ctx, outputs(quantised(exclude)))[0]

        layers = quantize.quantisable_nodes(float_model)

        def ranked():
            ctx.progress("ranking layers by the error each adds")
            return quantize.ort_layer_errors(float_model, quantised([]), x, layers)

        found = quantize.fallback(layers, metrics_without, lambda m: _judge_metrics(target, m), ranked=ranked)
        model = quantised(found.kept)
    set_metadata(model, {**ctx.meta, "precision": "int8"})
    write_atomic(ctx.path(target.file), model.SerializeToString())
    _record(ctx, target, found, info, method=quantize.ORT_METHOD,
            qdq_layers=len(quantize.onnx_qdq_layers(model)["qdq"]))


def produce_mnn_int8(ctx, target) -> None:
    """model.int8.mnn: MNN's offline quantiser (int8 convolutions, calibrated feature scales)."""
    import onnx

    import runtime

    from .onnx_export import metadata_json

    calib, info = ctx.calibration()
    x = ctx.eval_inputs()
    out = ctx.path(target.file)
    biz = metadata_json({**ctx.meta, "precision": "int8"})
    on_disk = []

    def build(method, skip):
        ctx.progress(f"{method}, {_candidate(skip)}")
        config = {"feature_quantize_method": method}
        quantize.mnn_int8(ctx.onnx_path, out, calib, biz, config, skip=skip, log_path=ctx.log)
        on_disk[:] = [(method, list(skip))]
        return _judge(target, ctx, _batched(runtime.load(out, threads=1), x))[0]

    tried: dict[str, dict | str] = {}  # method → its all-int8 metrics, or why it failed
    methods = quantize.MNN_AUTO_ORDER if ctx.int8_mnn_method == "auto" else (ctx.int8_mnn_method,)
    for method in methods:
        try:
            tried[method] = build(method, [])
        except quantize.QuantiserFailed as e:
            tried[method] = f"quantiser failed ({e.why})"
            continue
        if not _judge_metrics(target, tried[method]):
            break
    built = {m: v for m, v in tried.items() if isinstance(v, dict)}
    if not built:
        raise EdgeportError(f"MNN int8 quantiser failed with {', '.join(f'{m} ({v})' for m, v in tried.items())}"
                            f" (log: {ctx.log}); retry with another --int8-mnn method or without mnn_int8")
    method = min(built, key=lambda m: quantize.candidate_key(built[m], _judge_metrics(target, built[m])))

    float_model = onnx.load(str(ctx.onnx_path))
    layers = quantize.quantisable_nodes(float_model)
    outputs_of = {n.name: n.output[0] for n in float_model.graph.node}  # MNN names ops by output tensor

    def ranked():  # ONNX Runtime's one-pass ranking: MNN has no cheap per-layer probe
        ctx.progress("ranking layers by the error each adds (ONNX Runtime)")
        errors = quantize.ort_layer_errors(float_model, quantize.ort_int8(float_model, calib), x, layers)
        return [(outputs_of[n], s) for n, s in errors]

    found = quantize.fallback(
        [outputs_of[n] for n in layers], lambda skip: built[method] if not skip else build(method, skip),
        lambda m: _judge_metrics(target, m), ranked=ranked)
    if on_disk != [(method, found.kept)]:
        build(method, found.kept)  # the file on disk is the chosen candidate
    config = {**quantize.MNN_CONFIG, "feature_quantize_method": method}
    _record(ctx, target, found, info, method=config,
            methods_tried={m: v if isinstance(v, str) else {k: {"cosine": o["cosine"], "top1": o.get("top1")}
                                                             for k, o in v.items()}
                           for m, v in tried.items()},
            int8_convolutions=len(quantize.mnn_int8_layers(out)["int8"]))


def _candidate(kept) -> str:
    return f"fallback: {len(kept)} layer(s) in float" if kept else "all int8"


def _judge_metrics(target, metrics: dict) -> list[str]:
    from models.metrics import check_gates

    one = len(metrics) == 1  # a multi-output (features) model's lines name the output
    return [b for name, m in metrics.items()
            for b in check_gates(m, dict(target.gates), target.name if one else f"{target.name} {name}")]
