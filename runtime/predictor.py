"""`load(path)` → Predictor: run arrays, preprocess and classify images per the artifact's own metadata."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

from .engines import ENGINES, EXTENSIONS, WINOGRAD_LEVEL
from .errors import EdgeRuntimeError
from .images import load_image
from .metadata import read_metadata
from .preprocess import preprocess as preprocess_image

PREPROCESS_KEYS = ("input_shape", "mean", "std", "crop_pct", "interpolation")
# The one list of engine names runtime.load, the CLIs (--engine) and the benchmarks accept: each engine's own
# name (runtime.engines.ENGINES) and a few short ones.
ENGINE_ALIASES = {**{name: name for name in ENGINES}, "ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino"}
ENGINE_CHOICES = ("auto", *ENGINES)  # what --help lists

ImageLike = Union[str, os.PathLike, Image.Image]


def load(path: str | os.PathLike, engine: str = "auto", threads: int = 1, precision: str = "fp32",
         winograd: str = "accurate", *, backend: str | None = None) -> Predictor:
    """Load a .mnn (MNN Module API) or .onnx model (onnxruntime, or OpenVINO with engine="openvino"; CPU).

    engine: "auto" (from the extension: .mnn → mnn, .onnx → onnxruntime), "mnn", "onnxruntime" ("ort") or
    "openvino" ("ov"); `backend` is its former name, still accepted. threads: intra-op threads. precision:
    "fp32", or "low" to allow fp16/bf16 arithmetic where the CPU has it (MNN: ARMv8.2+, identical to fp32 on
    x86; OpenVINO: bf16 on AVX512_BF16/AMX x86, f16 on ARMv8.2+). winograd (MNN): "accurate" keeps 3x3 convs to
    F(2,3) tiles, as the parity gate checks them; "fast" is MNN's default (up to F(6,3): "accurate" took 1.12×
    as long on efficientnetv2_s, but "fast" is ~1e-3 off in float32, over the fp32 gate)."""
    path = os.fspath(path)
    if backend is not None:
        if engine not in ("auto", backend):
            raise EdgeRuntimeError(f"engine {engine!r} and backend {backend!r} disagree; name the engine once")
        engine = backend
    if engine == "auto":
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise EdgeRuntimeError(
                f"{path}: unknown model type {ext!r}; expected .mnn or .onnx (or name the engine)")
        engine = EXTENSIONS[ext]
    if engine not in ENGINE_ALIASES:
        raise EdgeRuntimeError(f"unknown engine {engine!r}; choose {', '.join(ENGINE_CHOICES)}")
    if precision not in ("fp32", "low"):
        raise EdgeRuntimeError(f"unknown precision {precision!r}; choose fp32 or low")
    if winograd not in WINOGRAD_LEVEL:
        raise EdgeRuntimeError(f"unknown winograd {winograd!r}; choose accurate or fast")
    if not isinstance(threads, int) or threads < 1:
        raise EdgeRuntimeError(f"threads must be a positive integer, got {threads!r}")
    if not os.path.isfile(path):
        raise EdgeRuntimeError(f"{path}: no such model file")
    engine = ENGINE_ALIASES[engine]
    threads = capped_threads(threads, engine)
    predictor = Predictor(ENGINES[engine](path, threads, precision, winograd), path)
    predictor.threads = threads
    return predictor


def usable_cpus() -> int:
    """CPUs this process may run on (affinity and cpusets count; os.cpu_count does not see them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def capped_threads(threads: int, backend: str) -> int:
    """`threads`, or the usable CPU count for onnxruntime above it (oversubscribed, its spinning intra-op
    threads ran fasternet_t0 ~100x slower); warns (RuntimeWarning) whenever threads exceed the CPUs."""
    cpus = usable_cpus()
    if threads <= cpus:
        return threads
    if backend == "onnxruntime":
        warnings.warn(f"threads={threads} is above the {cpus} usable CPUs; onnxruntime capped to {cpus} "
                      "(oversubscribed it runs up to 100x slower)", RuntimeWarning, stacklevel=3)
        return cpus
    warnings.warn(f"threads={threads} is above the {cpus} usable CPUs; expect {backend} to run slower than with "
                  f"{cpus}", RuntimeWarning, stacklevel=3)
    return threads


def _format_shape(shape) -> str:
    """[-1, 3, 224, 224] → "[N, 3, 224, 224]"; other unknown dims show as "?"."""
    dims = ("N" if i == 0 and d < 0 else "?" if d < 0 else str(d) for i, d in enumerate(shape))
    return "[" + ", ".join(dims) + "]"


def softmax_topk(logits: np.ndarray, topk: int, labels: Sequence[str] | None = None) -> list[tuple]:
    """One image's logits → [(class_index, probability[, label]), ...], most probable first."""
    z = logits.astype(np.float64).ravel()
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[: max(1, topk)]
    if labels is None:
        return [(int(i), float(p[i])) for i in order]
    return [(int(i), float(p[i]), labels[i]) for i in order]


class Predictor:
    """A loaded model. `.meta` is the artifact metadata ({} if the file has none)."""

    def __init__(self, engine, path: str):
        self._engine = engine
        self.path = path
        self.backend = engine.backend
        self.meta = read_metadata(engine.metadata_text, path)
        self.input_names = engine.input_names
        self.input_name = self.input_names[0]
        self.output_names = engine.output_names
        graph_shape = engine.input_shapes[self.input_name]
        shape = self.meta.get("input_shape") or graph_shape
        if graph_shape and shape and (len(shape) != len(graph_shape) or any(
                0 <= g != d for g, d in zip(graph_shape, shape))):
            raise EdgeRuntimeError(f"{path}: metadata input_shape {list(shape)} disagrees with the model's input "
                                   f"{_format_shape(graph_shape)}; re-export the model rather than editing it")
        self.input_shape = [int(d) for d in shape] if shape else None
        missing = [n for n in self.meta.get("output_names") or [] if n not in self.output_names]
        if missing:
            raise EdgeRuntimeError(f"{path}: metadata output_names {self.meta['output_names']} disagrees with the "
                                   f"model's outputs {self.output_names}; re-export the model rather than editing it")
        self.threads = None  # set by load()

    def __repr__(self) -> str:
        shape = _format_shape(self.input_shape) if self.input_shape else ""
        return (f"Predictor({self.path!r}, backend={self.backend!r}, input={self.input_name}{shape}, "
                f"outputs={self.output_names})")

    # ---- arrays
    def _check_input(self, name: str, x) -> np.ndarray:
        shape = self.input_shape if name == self.input_name else self._engine.input_shapes.get(name)
        if not isinstance(x, np.ndarray):
            problem = f"is a {type(x).__name__}"
        elif x.dtype != np.float32:
            problem = f"has dtype {x.dtype}"
        elif 0 in x.shape or (shape and (
                x.ndim != len(shape) or any(0 <= d != s for d, s in zip(shape, x.shape)))):
            problem = f"has shape {list(x.shape)}"
        else:
            return np.ascontiguousarray(x)
        expected = f"float32 array of shape {_format_shape(shape)}" if shape else "float32 array"
        raise EdgeRuntimeError(f"input '{name}' {problem}; expected a {expected}")

    def run(self, inputs, check_finite: bool = True) -> dict[str, np.ndarray]:
        """An array (for the single input) or {input_name: array} → {output_name: array} for every output.

        With check_finite (default), NaN, Inf or ±float-max in any output raises EdgeRuntimeError instead of
        returning garbage that would rank as a confident class."""
        if not isinstance(inputs, dict):
            inputs = {self.input_name: inputs}
        if set(inputs) != set(self.input_names):
            raise EdgeRuntimeError(f"inputs named {sorted(inputs)}; the model expects {self.input_names}")
        feeds = {name: self._check_input(name, x) for name, x in inputs.items()}
        outputs = self._engine.run(feeds)
        self._check_outputs(outputs, len(feeds[self.input_name]))
        if check_finite:
            for name, y in outputs.items():
                if y.dtype.kind != "f":
                    continue
                # MNN saturates NaN/Inf to ±float-max instead of propagating them, so those count too
                limit = np.finfo(y.dtype).max
                if not np.abs(y).max() < limit:  # one reduction on the fast path; NaN fails the comparison
                    bad = y.size - int(np.count_nonzero(np.abs(y) < limit))
                    raise EdgeRuntimeError(
                        f"output '{name}' has {bad} of {y.size} values NaN/Inf (or saturated at float max); "
                        "check the input for NaN/huge values, or the model (if precision='low', try fp32)")
        return outputs

    def expected_outputs(self, n: int) -> dict[str, list | None]:
        """{output name: shape} a forward of batch n must return, per the metadata's task and num_classes (None
        for a dimension it leaves open; None for the whole shape when the metadata names no task: it must exist)."""
        if "task" not in self.meta:
            return dict.fromkeys(self.output_names)
        task, k = self.meta["task"], self.meta.get("num_classes")
        if task == "detection":
            boxes, scores = self.detector_outputs()
            return {boxes: [n, None, 4], scores: [n, None, k]}
        if task == "features":
            return {name: [n, None, None, None] for name in self.output_names}
        return {self.output_names[0]: [n, k]}

    def detector_outputs(self) -> tuple[str, str]:
        """(boxes, scores) output names of a detector: so named, or the first two."""
        names = self.output_names
        if {"boxes", "scores"} <= set(names):
            return "boxes", "scores"
        if len(names) == 2:
            return names[0], names[1]
        raise EdgeRuntimeError(f"{self.path}: not a detector (outputs {names}; expected 'boxes' and 'scores')")

    def _check_outputs(self, outputs: dict, n: int) -> None:
        """EdgeRuntimeError (one line) unless every output the metadata promises came back with its shape."""
        expected = self.expected_outputs(n)
        for name, shape in expected.items():
            got = list(outputs[name].shape) if name in outputs else None
            if got is not None and 0 not in got and (shape is None or (len(got) == len(shape) and all(
                    e is None or e == g for e, g in zip(shape, got)))):
                continue
            want = "" if shape is None else ", expected [" + ", ".join(
                "?" if d is None else str(d) for d in shape) + "]"
            found = "no output" if got is None else f"output {got} as"
            raise EdgeRuntimeError(f"{self.backend} forward failed on {os.path.basename(self.path)}: {found} "
                                   f"'{name}'{want}; re-export the model (or check its metadata)")
        if self.meta.get("task") == "detection":
            (boxes, b), (scores, s) = ((name, outputs[name].shape) for name in expected)
            if b[1] != s[1]:
                raise EdgeRuntimeError(f"{self.backend} forward failed on {os.path.basename(self.path)}: {b[1]} "
                                       f"'{boxes}' for {s[1]} '{scores}' anchors; re-export the model")

    # ---- images
    def require_metadata(self) -> None:
        """Raise EdgeRuntimeError unless the artifact's metadata says how to preprocess images."""
        missing = [k for k in PREPROCESS_KEYS if k not in self.meta]
        if missing:
            raise EdgeRuntimeError(
                f"{self.path}: no edgeport preprocessing metadata (missing {', '.join(missing)}); re-export "
                "with edgeport, or preprocess yourself and call run()")

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """A path or PIL image → (1, 3, H, W) float32 exactly as the artifact's metadata prescribes."""
        self.require_metadata()
        return preprocess_image(load_image(image), self.meta)

    def classify(self, images, topk: int = 5, labels: Sequence[str] | None = None) -> list[list[tuple]]:
        """Paths or PIL images (or one of them) → per image [(class_index, probability[, label]), ...]."""
        if self.meta.get("task", "classification") != "classification":
            raise EdgeRuntimeError(f"{self.path}: a {self.meta['task']} model has no classes; use run()")
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        batch = self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else 1
        results = []
        for start in range(0, len(images), batch):
            x = np.concatenate([self.preprocess(img) for img in images[start: start + batch]])
            n = len(x)
            if n < batch:  # a fixed-batch model: pad, then drop the padding's outputs
                x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])
            logits = self.run(x)[self.output_names[0]][:n].reshape(n, -1)
            if labels is not None and len(labels) != logits.shape[1]:
                raise EdgeRuntimeError(f"{len(labels)} labels given; the model has {logits.shape[1]} classes")
            results.extend(softmax_topk(row, topk, labels) for row in logits)
        return results
