"""`build_artifact`: an inference-form network → the files of the chosen targets, in one directory.

UI-free: no console, no spinner. `step(name)` (a context-manager factory) wraps each stage for a caller that
shows progress; C libraries' output goes to `log` unless `verbose`. The export CLI, the benchmarks, the ARM
harness and the tests all build artifacts through this one function.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import onnx
from torch import nn

from models.errors import EdgeportError

from . import graph, onnx_export, targets
from ._console import redirect_fds
from .producers import PRODUCERS

LOG = "export.log"


def gelu_record(method: str, histogram: dict) -> dict:
    """What a file's GELU is, for the manifest: never approximate silently."""
    from .gelu import GELU_METHODS

    exact = GELU_METHODS.get(method)
    error = {"erf": 0.0, "tanh": 4.7e-4}.get(method, exact.max_abs_error if exact else None)
    return {"method": method, "erf_patterns_in_onnx": histogram.get("Erf", 0) + histogram.get("Gelu", 0),
            "max_abs_error_vs_erf_gelu": error}


@dataclass
class BuildContext:
    """What a target's `produce` gets: where to write, the metadata to embed, and the float ONNX."""

    out_dir: Path
    meta: dict
    log: Path
    verbose: bool
    calib_dir: str | None = None     # int8 targets: the user's calibration images (None: bundled, augmented)
    int8_mnn_method: str = "auto"   # MNN quantiser feature_quantize_method (quantize.MNN_METHODS)
    held_out_dir: str | None = None  # int8 targets are judged on these images (--val), else bundled photos
    records: dict = field(default_factory=dict)  # per target: what its producer decided (manifest "targets")
    progress: Callable[[str], None] = lambda detail: None  # what a long producer is doing (the CLI's spinner)

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / "model.onnx"

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def mnn_source(self, gelu: str = "erf") -> Path:
        """The ONNX graph MNN's converter reads for a target whose GELU is `gelu`: model.onnx, or (an exact
        lowering of export.gelu) a copy with every erf-GELU rewritten, written once per build beside the log."""
        if gelu in ("erf", "tanh"):  # tanh: the converter's own approximation of the erf pattern
            return self.onnx_path
        path = self.scratch / f"model.gelu-{gelu}.onnx"
        if not path.is_file():
            from .gelu import lower_gelu

            onnx.save_model(lower_gelu(onnx.load_model(str(self.onnx_path)), gelu), str(path))
        return path

    @cached_property
    def scratch(self) -> Path:
        """A private directory for intermediate files that are not shipped (removed by build_artifact)."""
        return Path(tempfile.mkdtemp(prefix="edgeport-build-"))

    @cached_property
    def _calibration(self):
        from .calibration import calibration_batch

        return calibration_batch(self.meta, self.calib_dir)

    def calibration(self):
        """(calibration tensors, info) for the int8 targets, computed once per build."""
        return self._calibration

    @cached_property
    def _eval(self):
        from .parity import held_out_inputs

        return held_out_inputs(self.meta, directory=self.held_out_dir)

    def eval_inputs(self):
        """Held-out inputs (never calibrated on) the int8 targets are judged on."""
        return self._eval

    @cached_property
    def _float_eval(self):
        from .int8 import _float_outputs

        return _float_outputs(self.onnx_path, self.eval_inputs())

    def float_eval(self) -> dict:
        """The float ONNX model's outputs on `eval_inputs()`: what the int8 fallback compares with."""
        return self._float_eval


def build_artifact(model: nn.Module, meta: dict, out_dir, target_names=targets.DEFAULT_TARGETS, *,
                   opset: int = onnx_export.DEFAULT_OPSET, exporter: str = "legacy", simplifier: str = "onnxsim",
                   log=None, verbose: bool = False, calib_dir: str | None = None, int8_mnn_method: str = "auto",
                   optional=frozenset(), step: Callable[[str], AbstractContextManager] | None = None,
                   held_out_dir: str | None = None) -> dict:
    """Export `model` (eval, inference form) to out_dir/model.onnx (checked, simplified, linted, with `meta`
    embedded), then produce every selected target's file from it. model.onnx is always written: every other
    file derives from it and bisection reads it. Returns {"targets": [...], "records": {target: what its
    producer decided, e.g. int8 layers kept in float}, "onnx": {...op histograms, lint}}.
    `optional`: targets whose producer may fail without failing the build: one that raises is left out of
    "targets" with no file, and its record says why ("not_shipped"). Whether an optional target that was built
    is shipped is the final parity verdict's decision (export.pipeline), not its producer's: a producer's own
    gate (int8 against the float model) only steers its search.
    Raises EdgeportError when a step fails."""
    step = step or (lambda name: nullcontext())
    chosen = targets.select(target_names)
    out_dir = Path(out_dir)
    ctx = BuildContext(out_dir, meta, Path(log) if log else out_dir / LOG, verbose, calib_dir, int8_mnn_method,
                       held_out_dir)
    quiet = not verbose
    raw_path = out_dir / "model.raw.onnx"

    with step(f"ONNX export (opset {opset}, {exporter})"):
        try:
            with redirect_fds(ctx.log, quiet):
                exported = onnx_export.export_onnx(model, raw_path, meta, opset, exporter)
        except EdgeportError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise EdgeportError(f"ONNX export failed: {type(e).__name__}: {first}") from None
        finally:
            raw_path.unlink(missing_ok=True)
    with step("onnx.checker (full)"):
        onnx_export.full_check(exported, "exported")
    with step(f"simplify ({simplifier})"), redirect_fds(ctx.log, quiet):
        final = onnx_export.simplify(exported, simplifier)
    with step("graph lint"):
        hist_raw, hist = graph.op_histogram(exported), graph.op_histogram(final)
        warnings = graph.lint(hist, meta.get("pconv"), meta.get("mlp"), meta["input_shape"][0] == -1,
                              meta.get("task", "classification"))
    with step("ONNX metadata + save"):
        onnx_export.set_metadata(final, meta)
        onnx.save_model(final, str(ctx.onnx_path))

    try:
        for target in chosen:
            if target.produce is not None and target.file != ctx.onnx_path.name:
                with step(f"{target.name} → {target.file}") as progress:
                    ctx.progress = progress or ctx.progress
                    try:
                        PRODUCERS[target.produce](ctx, target)
                    except EdgeportError as e:
                        if target.name not in optional:
                            raise
                        ctx.path(target.file).unlink(missing_ok=True)
                        ctx.records.setdefault(target.name, {})["not_shipped"] = f"{target.name}: {e}"
    finally:
        if "scratch" in ctx.__dict__:
            shutil.rmtree(ctx.scratch, ignore_errors=True)
    for target in chosen:
        if target.engine == "mnn" and target.produce is not None:
            ctx.records.setdefault(target.name, {})["gelu"] = gelu_record(target.gelu, hist)
    shipped = [t.name for t in chosen if "not_shipped" not in ctx.records.get(t.name, {})]
    return {"targets": shipped, "records": ctx.records,
            "onnx": {"op_histogram_exported": hist_raw, "op_histogram": hist, "lint": warnings,
                     "nodes_exported": sum(hist_raw.values()), "nodes": sum(hist.values())}}
