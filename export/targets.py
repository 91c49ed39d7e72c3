"""The artifact targets: the one list of what an export can ship, how each file is made, how the runtime runs
it, and what it must prove. Everything else (the export CLI, parity on the host and under ARM emulation,
bisection, benchmarks, tests) reads this registry; adding a target is adding a record here.

A target's `produce` names its maker in `export.producers` (kept apart so that this registry is data, below
parity and the int8 producers that import it), which writes `file` into the build directory from the float ONNX
(`ctx.onnx_path`) or from another target's file. `made_from` names the stage the file was derived from:
bisection compares a breaching target with that stage first, to tell an inherited divergence from a new one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from models.errors import EdgeportError

from .gelu import DEFAULT_METHOD as EXACT_GELU

INFERENCE = "torch_inference"  # the PyTorch inference form: a stage every target is judged after, not a file
# EXACT_GELU: MNN runs erf-GELU (GELU_STANDARD) as a scalar loop, up to 55 ns/element on real activations; the
# lowering is 3.4e-6 off erf-GELU and ~1.5x faster on fasternet_t0 (export/gelu.py). MNN's tanh GELU is faster
# still but 4.7e-4 off: only targets whose gate is far above that (fp16 and int8 weights) use it.


@dataclass(frozen=True)
class Target:
    name: str
    file: str | None           # the file it ships; None for the PyTorch inference stage
    engine: str                # how it runs: "torch", or a runtime.load engine ("onnxruntime", "mnn", "openvino")
    precision: str             # runtime.load precision: "fp32", or "low" (MNN fp16/bf16 arithmetic)
    made_from: str             # the stage it is derived from (bisection's first suspect); a target running
                               # another's file with another engine or precision: that file's producer
    gates: Mapping[str, float]  # {metric: threshold} against the PyTorch training form (export.parity)
    description: str
    produce: str | None = None  # its maker in export.producers.PRODUCERS (writes `file`); None: runs another's
    default: bool = True       # part of every export unless --targets says otherwise
    for_detectors: bool = True  # with `default`: part of a detector's default export too
    default_when_trained: bool = False  # part of the default when the export has real weights (--weights),
                                        # shipped only if the final parity verdict passes it
                                        # (export.parity.run_parity `optional`)
    optional_for_detectors: bool = False  # in a detector's default export: shipped only if the final verdict
                                          # passes it (a lossy copy of a file that ships anyway)
    bisect: str = "onnx"       # how a breach is localised: "torch" (module hooks), "onnx" (graph probes), "none"
    compute: str = field(default="fp32")  # arithmetic the file asks for: fp32 | fp16 | int8 (ARM harness)
    gelu: str = "erf"          # GELU in the file: "erf" (as exported), an exact lowering of export.gelu
                               # ("sigmoid_p4"), or "tanh" (MNN's approximation: only where the gate allows it)
    detection_gates: Mapping[str, float] = field(default_factory=lambda: DET_FP32)  # for detectors instead
    inputs: str = "parity"     # what it is judged on: "parity" (export.inputs.sample_batch) or "held_out"
                               # (export.calibration.evaluation_batch: images never calibrated on)


def _gates(**limits) -> Mapping[str, float]:
    return MappingProxyType(limits)


# Detectors are judged by export.detection_parity: first per anchor before NMS (box error in pixels, score
# error), then after NMS every detection a clear score margin decides must be kept, same class, IoU ≥ min_iou.
# box_px and score rise to 4x the fp32 reference's own error against float64 where that is larger (an untrained
# yolo11n: 0.059 px, 5.3e-4); the values here are unchanged. fp32: float32 rounding (both registered detectors
# at 640², calibrated random weights with a Gaussian DFL head: 0.002–0.009 px, scores ≤ 8.5e-5; ARM cortex-a53
# 0.005 px).
DET_FP32 = _gates(box_px=0.05, score=1e-4, min_iou=0.99, unmatched=0, class_mismatch=0)
# fp16: set from fp16-stored weights on x86 (then 16.4 px, score 0.011 with the former multimodal DFL head; now
# 1.9–4.2 px, scores ≤ 0.017).
DET_FP16 = _gates(box_px=20.0, score=2e-2, min_iou=0.95, unmatched=0, class_mismatch=0)
# fp16 arithmetic (precision low on ARMv8.2+): 3x DET_FP16's score gate, the ratio classifiers use (max_rel 1e-2
# → 3e-2); box and IoU gates unchanged. Rounding every activation to fp16 alone, accumulating in fp32 (PyTorch,
# yolo11n_fasternet_t0 640², parity set), already moves scores by 0.022; MNN's fp16 kernels also accumulate in
# fp16. The wider score gate also widens the borderline margin (export.detection_parity). Set before measuring;
# MNN on neoverse-n1 then missed it (scores 0.098 on yolo11n_fasternet_t0's second photo set, 0.22 on
# yolo11n_inception_next_atto), so the precision-low targets are not in a detector's default export.
DET_FP16_ARITH = _gates(box_px=20.0, score=6e-2, min_iou=0.95, unmatched=0, class_mismatch=0)
# int8: set before measuring, not loosened after. int8-stored weights miss it on both detectors (71 / 146 px):
# per-channel int8 weights alone, simulated in PyTorch, put 17 % relative error on the neck output, so
# mnn_int8w is not in a detector's default export (for_detectors=False; --targets still builds and judges it).
DET_INT8 = _gates(box_px=8.0, score=0.1, min_iou=0.9, unmatched=0, class_mismatch=0)

TARGETS: tuple[Target, ...] = (
    Target(INFERENCE, None, "torch", "fp32", "reference", _gates(max_rel=1e-5),
           "PyTorch inference form (models.to_inference)", bisect="torch"),
    Target("ort", "model.onnx", "onnxruntime", "fp32", INFERENCE, _gates(max_rel=1e-5),
           "ONNX, fp32 (ONNX Runtime)", produce="onnx"),
    Target("mnn_fp32", "model.mnn", "mnn", "fp32", "ort", _gates(max_rel=1e-4),
           "MNN, fp32, exact GELU (lowered to vectorised ops)", produce="mnn_fp32", gelu=EXACT_GELU),
    Target("mnn_fp16w", "model.fp16.mnn", "mnn", "fp32", "ort", _gates(max_rel=1e-2),
           "MNN, fp16-stored weights, fp32 arithmetic, MNN's tanh GELU", produce="mnn_fp16", gelu="tanh",
           detection_gates=DET_FP16, optional_for_detectors=True),
    Target("mnn_int8w", "model.int8w.mnn", "mnn", "fp32", "ort", _gates(max_rel=5e-2, top1=0.9),
           "MNN, int8-stored weights, fp32 arithmetic, MNN's tanh GELU", produce="mnn_int8w", gelu="tanh",
           detection_gates=DET_INT8, for_detectors=False),
    Target("mnn_low", "model.mnn", "mnn", "low", "mnn_fp32", _gates(max_rel=3e-2),
           "MNN, fp32 file with precision='low' (fp16 arithmetic on ARMv8.2+; fp32 on x86)", compute="fp16",
           gelu=EXACT_GELU, detection_gates=DET_FP16_ARITH, for_detectors=False),
    Target("mnn_fp16w_low", "model.fp16.mnn", "mnn", "low", "mnn_fp16w", _gates(max_rel=3e-2),
           "MNN, fp16-stored weights with precision='low' (fp16 arithmetic on ARMv8.2+)", compute="fp16",
           gelu="tanh", detection_gates=DET_FP16_ARITH, for_detectors=False),
)
INT8_GATES = _gates(cosine=0.99, top1=0.95)
TARGETS += (
    Target("ort_int8", "model.int8.onnx", "onnxruntime", "fp32", "ort", INT8_GATES,
           "ONNX, int8 QDQ (calibrated activations; ONNX Runtime fuses QLinearConv/MatMul)",
           produce="ort_int8", default=False, default_when_trained=True, for_detectors=False, compute="int8",
           inputs="held_out", bisect="none", detection_gates=DET_INT8),
    Target("mnn_int8", "model.int8.mnn", "mnn", "fp32", "mnn_fp32", INT8_GATES,
           "MNN, int8 convolutions (offline quantiser, calibrated feature scales)",
           produce="mnn_int8", default=False, default_when_trained=True, for_detectors=False, compute="int8",
           inputs="held_out", bisect="none", gelu="tanh", detection_gates=DET_INT8),
)
# OpenVINO reads the ONNX files as they are (no file of its own, so a target costs parity time only) and is the
# fastest engine for them on x86 (docs/guides/engines.md). Gates: those of the ONNX Runtime target on the same
# file, set before measuring. `openvino` is in a classifier's default export (fasternet_t0, convnext_atto,
# inception_next_atto: max_rel 7e-7 to 9e-7, the ORT file's own 5e-7), so whoever runs model.onnx with OpenVINO
# gets a file proven under it; not in a detector's: on yolo11n (640², calibrated random weights) its scores
# were 1.17e-4 off, over DET_FP32's 1e-4 (ORT 9.2e-5; PyTorch's inference form 1.33e-4 in the same run), though
# yolo11n_fasternet_t0 passed (scores 1.7e-5, boxes 0.002 px).
# `openvino_int8` only with --targets: an optional int8 target is dropped on its producer's own check, before
# parity, so an OpenVINO-only miss would fail an export whose int8 file is fine under ONNX Runtime.
TARGETS += (
    Target("openvino", "model.onnx", "openvino", "fp32", "ort", _gates(max_rel=1e-5),
           "ONNX, fp32, run by OpenVINO (CPU plugin, f32 precision hint)", for_detectors=False),
    Target("openvino_int8", "model.int8.onnx", "openvino", "fp32", "ort_int8", INT8_GATES,
           "ONNX int8 QDQ, run by OpenVINO (CPU plugin; int8 kernels for the QDQ pairs)",
           default=False, for_detectors=False, compute="int8", inputs="held_out", bisect="none",
           detection_gates=DET_INT8),
)
TARGET_BY_NAME: Mapping[str, Target] = MappingProxyType({t.name: t for t in TARGETS})
ARTIFACTS = tuple(t for t in TARGETS if t.file)  # the targets that are files to ship and run
DEFAULT_TARGETS = tuple(t.name for t in ARTIFACTS if t.default)


def default_targets(task: str = "classification", trained: bool = False) -> tuple[str, ...]:
    """What an export builds when --targets is not given: DEFAULT_TARGETS, plus with real weights (`trained`)
    the `default_when_trained` ones (int8: on calibrated random init its top-1 gate is decided by near-tied
    logits, README "int8"), less for a detector the targets whose files cannot meet the detection gates
    (`for_detectors`)."""
    return tuple(t.name for t in ARTIFACTS if (t.default or (trained and t.default_when_trained))
                 and (task != "detection" or t.for_detectors))


def optional_targets(task: str = "classification", trained: bool = False) -> frozenset[str]:
    """The default targets shipped only when the final parity verdict passes them: those the default adds for
    real weights, and for a detector its lossy copies (`optional_for_detectors`: fp16-stored weights cannot hold
    an untrained or early detector within DET_FP16 — an untrained yolo11n with BatchNorm statistics from photos:
    148 px and score 0.72, as PyTorch itself with its weights rounded to fp16 — while model.onnx and model.mnn
    carry the network)."""
    chosen = default_targets(task, trained)
    added = frozenset(chosen) - frozenset(default_targets(task))
    lossy = {n for n in chosen if task == "detection" and TARGET_BY_NAME[n].optional_for_detectors}
    return added | lossy


def get(name: str) -> Target:
    try:
        return TARGET_BY_NAME[name]
    except KeyError:
        raise EdgeportError(f"unknown target '{name}'; known: {', '.join(TARGET_BY_NAME)}") from None


def select(names) -> tuple[Target, ...]:
    """The artifact targets named (registry order), with every target they need to be made from."""
    names = list(dict.fromkeys(names))
    if not names:
        raise EdgeportError(f"no target selected; choose from {', '.join(t.name for t in ARTIFACTS)}")
    chosen = set()
    for name in names:
        target = get(name)
        if target.file is None:
            raise EdgeportError(f"'{name}' is not an artifact target; choose from "
                                f"{', '.join(t.name for t in ARTIFACTS)}")
        chosen.update({name, producer(target).name})
    return tuple(t for t in ARTIFACTS if t.name in chosen)


def producer(target: Target) -> Target:
    """The target whose `produce` writes `target.file` (itself, or the one whose file it runs)."""
    return next(t for t in ARTIFACTS if t.file == target.file and t.produce is not None)


def for_file(filename: str, precision: str = "fp32", engine: str | None = None) -> Target | None:
    """The target that runs `filename` at `precision` with `engine` (None: the file's own, its producer's), or
    None."""
    return next((t for t in ARTIFACTS if t.file == filename and t.precision == precision
                 and t.engine == (engine or producer(t).engine)), None)


def default_gates() -> dict[str, dict[str, float]]:
    return {t.name: dict(t.gates) for t in TARGETS}
