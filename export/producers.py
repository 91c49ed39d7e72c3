"""How each artifact target's file is made: `PRODUCERS[target.produce](ctx, target)` writes `ctx.path(target.file)`
(ctx: export.build.BuildContext) from the float ONNX or from another target's file. The registry
(export.targets) names its maker by key; adding a target that needs a new kind of file adds a function here."""
from __future__ import annotations

from collections.abc import Callable

from . import int8, mnn_convert
from .onnx_export import metadata_json


def _mnn(precision: str) -> Callable:
    """MNN's converter with its `precision` flags (export.mnn_convert.PRECISIONS), from the float ONNX with the
    target's GELU (export.gelu lowers erf-GELU exactly; "tanh" is MNN's fused approximation)."""
    def produce(ctx, target) -> None:
        mnn_convert.convert(ctx.mnn_source(target.gelu), ctx.path(target.file),
                            metadata_json({**ctx.meta, "precision": precision, "gelu": target.gelu}), precision,
                            log_path=ctx.log, verbose=ctx.verbose, gelu_approximation=target.gelu == "tanh")
    return produce


def _onnx(ctx, target) -> None:
    """Nothing to do: model.onnx is the build's first product, every other file derives from it."""


PRODUCERS: dict[str, Callable] = {
    "onnx": _onnx,
    "mnn_fp32": _mnn("fp32"),
    "mnn_fp16": _mnn("fp16"),
    "mnn_int8w": _mnn("int8w"),
    "ort_int8": int8.produce_ort_int8,
    "mnn_int8": int8.produce_mnn_int8,
}
