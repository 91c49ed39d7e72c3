"""Full int8 (calibrated activations): ONNX Runtime QDQ and MNN's offline quantiser, their gates against the
float model on held-out images, and the accuracy-guided fallback that keeps the most harmful layers in float.

MNN runs through the quantiser linked into the MNN wheel (`_tools.mnnquant`), never the Python tool wrappers
shipped in the MNN package (they pip-install a telemetry SDK and phone home at import).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.errors import EdgeportError
from models.metrics import compare
from runtime.atomic import write_atomic

from . import mnn_convert

FALLBACK_LIMIT = 0.10  # at most this fraction of the quantisable layers is kept in float
# ... and at most this many fallback candidates are built (after the all-int8 one). A count, not a time budget:
# the same command must give the same file on a fast idle host and a slow busy one. Doubling reaches 2^5 = 32
# layers in 6 candidates (efficientnetv2_s needed 16, the 5th); each MNN candidate costs ~4 min there.
FALLBACK_MAX_CANDIDATES = 6
QUANTISED_OPS = ("Conv", "MatMul", "Gemm")  # the layers the fallback ranks and may keep in float
# MNN: KL (histogram, scales per tensor) held the gates where EMA did not; see README "int8".
MNN_CONFIG = {"feature_quantize_method": "KL", "weight_quantize_method": "MAX_ABS"}
# --int8-mnn: "auto" tries MNN_AUTO_ORDER and keeps the first method whose file passes, else the best-scoring
# one. MNN 3.6.1's KL segfaults on any graph with a Raster op fed only by internal tensors (convnext_atto,
# inception_next_atto, efficientnetv2_s); upstream fixed it in 602d160 (Aug 2026), after the last wheel.
MNN_METHODS = ("auto", "KL", "ADMM", "EMA")
MNN_AUTO_ORDER = ("KL", "ADMM")
ORT_METHOD = "MinMax"
# MinMax calibration keeps every intermediate tensor of every sample until it computes the ranges: 128 samples
# of efficientnetv2_s at 384² took the 24 GB host out of memory. It runs in strides of at most this many samples,
# each stride's ranges merged into the last (onnxruntime's CalibStridedMinMax; its CalibMaxIntermediateOutputs
# drops each full batch of outputs without computing their ranges).
CALIB_STRIDE = 8


# ---- ONNX Runtime ----------------------------------------------------------------------------------------

class _Reader:
    """onnxruntime CalibrationDataReader over a (N, 3, H, W) array, one sample per call (fixed-batch graphs)."""

    def __init__(self, input_name: str, calib: np.ndarray):
        self.input_name, self.calib, self.i, self.end = input_name, calib, 0, len(calib)

    def get_next(self):
        if self.i >= self.end:
            return None
        self.i += 1
        return {self.input_name: self.calib[self.i - 1:self.i]}

    def rewind(self):
        self.i, self.end = 0, len(self.calib)

    def set_range(self, start_index: int, end_index: int):
        self.i, self.end = start_index, min(end_index, len(self.calib))

    def __len__(self):
        return len(self.calib)


def ort_session(model, log_severity: int = 3):
    """An ONNX Runtime CPU session (ModelProto, bytes or path) with one intra- and one inter-op thread, run
    sequentially: every session of the int8 search is, so that a candidate's outputs (and the layers ranked and
    kept from them) do not depend on the host's core count or load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else os.fspath(model) \
        if isinstance(model, os.PathLike) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _single_threaded_calibration():
    """quantize_static's calibrator builds its own session with default options (every core) and no way to pass
    any: its session factory is replaced, for this call only, by one with ort_session's thread settings."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibraterBase

    def create_inference_session(self):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=options,
                                                  providers=self.execution_providers)

    original = CalibraterBase.create_inference_session
    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static logs advice ("consider pre-processing") on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def ort_int8(onnx_model, calib: np.ndarray, method: str = ORT_METHOD, exclude: Sequence[str] = (),
             cache: str | os.PathLike | None = None, op_types: Sequence[str] | None = None):
    """The float ONNX model → a QDQ int8 ModelProto: per-channel symmetric int8 weights, asymmetric uint8
    activations (what ONNX Runtime's x86 kernels fuse into QLinearConv / QLinearMatMul), activation ranges from
    `calib` by `method` ("MinMax", "Entropy", "Percentile"). `exclude`: node names kept in float. `cache`: a file
    holding the calibration ranges, reused when it exists (the fallback re-quantises many times). The
    metadata_props of the input are kept."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CalibrationMethod.__members__:
        raise EdgeportError(f"unknown ONNX Runtime calibration method {method!r}; use MinMax, Entropy or Percentile")
    input_name = onnx_model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="edgeport-ort-int8-") as tmp:
        out, src = Path(tmp) / "quantised.onnx", Path(tmp) / "float.onnx"
        onnx.save_model(onnx_model, str(src))  # quantize_static rewrites a ModelProto it is given in place
        reader = None if cache and Path(cache).is_file() else _Reader(input_name, calib)
        with _quiet_root_logger(), _single_threaded_calibration():
            quantize_static(src, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod[method], nodes_to_exclude=list(exclude),
                            op_types_to_quantize=list(op_types) if op_types else None,
                            calibration_cache_path=cache, extra_options=_strided(method, len(calib)))
        model = onnx.load_model(str(out))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx_model.metadata_props)
    return model


def _strided(method: str, n: int) -> dict:
    """quantize_static's extra_options: MinMax in the largest stride ≤ CALIB_STRIDE that divides n (it must)."""
    if method != "MinMax" or n <= CALIB_STRIDE:
        return {}
    return {"CalibStridedMinMax": max(d for d in range(1, CALIB_STRIDE + 1) if n % d == 0)}


def quantisable_nodes(onnx_model) -> list[str]:
    """Names of the nodes the fallback may keep in float, in graph order."""
    return [n.name for n in onnx_model.graph.node if n.op_type in QUANTISED_OPS]


# ---- MNN -------------------------------------------------------------------------------------------------

def _write_sequence(calib: np.ndarray, input_name: str, directory: Path) -> None:
    """MNN's "sequence" calibration input: one folder per sample with <input>.txt (whitespace-separated
    values) and input.json (its shape), so MNN applies none of its own image preprocessing."""
    shape = {"inputs": [{"name": input_name, "shape": [1, *calib.shape[1:]]}]}
    for i, sample in enumerate(calib):
        d = directory / f"{i:06d}"
        d.mkdir(parents=True)
        sample.tofile(d / f"{input_name}.txt", sep=" ", format="%.6g")
        (d / "input.json").write_text(json.dumps(shape))


class QuantiserFailed(EdgeportError):
    """MNN's quantiser crashed or wrote nothing; `why` is the short reason ("SIGSEGV", "exit 3", "no output")."""

    def __init__(self, why: str, log_path):
        self.why = why
        super().__init__(f"MNN int8 quantiser failed ({why}; log: {log_path}); retry with another --int8-mnn "
                         f"method or without the mnn_int8 target")


def _why(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"{signal.Signals(-returncode).name}, exit {returncode}"
    return f"exit {returncode}" if returncode else "no output"


# The quantiser crashes the process on some graphs (e.g. a segfault on exact-erf GELU), and reports success
# whatever happened: it runs in a child interpreter, through the same _tools entry point.
_QUANT_CHILD = "import sys, _tools; _tools.mnnquant(sys.argv[1:])"
# The quantiser takes no thread option (its sessions use MNN's default of 4) and _tools is built with OpenMP:
# dynamic OpenMP teams would let the host's load change how work is split, so the child runs with a fixed
# team; the hash seed pins anything the child does in Python. (Its calibration samples are read in directory
# order: the same names written in the same order, see _write_sequence.)
_QUANT_ENV = {"OMP_DYNAMIC": "FALSE", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def mnn_int8(onnx_path, out, calib: np.ndarray, biz_code: str, config: dict | None = None,
             skip: Sequence[str] = (), input_name: str = "input", log_path=None) -> Path:
    """The float ONNX → `out` (.mnn) with int8 convolutions and calibrated activation scales.

    The float .mnn it quantises is converted here with GELU as MNN's tanh approximation: the quantiser has no
    int8 table for exact-erf GELU (it crashes), and int8's own error is far above the approximation's ~1e-3.
    `config`: MNN quantiser keys laid over MNN_CONFIG ("feature_quantize_method" KL / ADMM / EMA,
    "weight_quantize_method" MAX_ABS / ADMM, ...). `skip`: MNN op names kept in float (KL and ADMM only:
    MNN's EMA path ignores skip_quant_op_names). Written atomically: a failure leaves `out` untouched."""
    out = Path(out).resolve()
    cfg = {**MNN_CONFIG, **(config or {})}
    if skip:
        cfg["skip_quant_op_names"] = list(skip)
    log_path = Path(log_path or out.with_suffix(".log")).resolve()
    with tempfile.TemporaryDirectory(prefix="edgeport-mnn-int8-") as tmp:
        tmp = Path(tmp)
        float_mnn = mnn_convert.convert(onnx_path, tmp / "float.mnn", biz_code, "fp32", log_path=log_path,
                                        gelu_approximation=True)
        _write_sequence(calib, input_name, tmp / "calib")
        cfg.update(path=str(tmp / "calib"), input_type="sequence", used_sample_num=len(calib), batch_size=1)
        (tmp / "quant.json").write_text(json.dumps(cfg))
        quantised = tmp / "quantised.mnn"
        with open(log_path, "ab") as log:
            done = subprocess.run([sys.executable, "-c", _QUANT_CHILD, "quantized.out", str(float_mnn),
                                   str(quantised), str(tmp / "quant.json")], stdout=log, stderr=log, cwd=tmp,
                                  env={**os.environ, **_QUANT_ENV})
        if done.returncode or not quantised.is_file() or not quantised.stat().st_size:
            raise QuantiserFailed(_why(done.returncode), log_path)
        mnn_convert.make_uuid_deterministic(quantised)
        write_atomic(out, quantised.read_bytes())
    return out


# ---- gates and the fallback ------------------------------------------------------------------------------

def score(metrics: dict) -> float:
    """One number to rank candidates by (higher is better): the worst cosine and top-1 agreement."""
    return min(min(m.get("top1", 1.0), m["cosine"]) for m in metrics.values())


def candidate_key(metrics: dict, breaches: list[str]) -> tuple[int, float]:
    """Sort key of candidates, best first: fewer gate breaches, then the higher `score`. (On near-tied logits
    top-1 is the noisy term: a file that passes cosine and misses top-1 beats one that misses both.)"""
    return len(breaches), -score(metrics)


def rank_sensitivity(layers: Sequence[str], evaluate_without: Callable[[list[str]], dict],
                     baseline: dict | None = None) -> list[tuple[str, float]]:
    """Layers ordered most harmful first: `evaluate_without([layer])` is the metrics ({output: metrics}) with
    only that layer kept in float; harm is how much that improves the score over `baseline`."""
    base = score(baseline) if baseline else 0.0
    ranked = [(layer, score(evaluate_without([layer])) - base) for layer in layers]
    return sorted(ranked, key=lambda r: -r[1])  # stable: ties keep graph order


class Fallback(NamedTuple):
    kept: list[str]      # layers kept in float
    metrics: dict        # their metrics ({output: metrics})
    breaches: list[str]  # empty when the gates pass
    stopped: str | None  # which limit ended the search without a pass ("layer limit ...", "candidate limit ..."),
                         # else None


def fallback(layers: Sequence[str], evaluate_without: Callable[[list[str]], dict], breaches_of: Callable,
             limit: float = FALLBACK_LIMIT,
             ranked: list[tuple[str, float]] | Callable[[], list[tuple[str, float]]] | None = None,
             max_candidates: int = FALLBACK_MAX_CANDIDATES) -> Fallback:
    """Keep layers in float, most harmful first, until the gates pass, `limit` of `layers` are kept, or
    `max_candidates` fallback candidates were built. The kept set doubles (1, 2, 4, ... the limit): a candidate
    of a large network costs minutes with MNN, and the harm is spread over many layers (efficientnetv2_s kept
    16); the price is up to 2x the float layers strictly needed. `ranked`: the order (or a function computing
    it, called only when the all-int8 candidate misses the gates); default `rank_sensitivity`. Ties in the
    ranking keep the layers' graph order. Nothing here reads a clock: the same inputs give the same candidate.

    Returns the first candidate that passes, else the best one seen (possibly all-int8, with its breaches, and
    which limit stopped the search); kept is empty when no fallback was needed."""
    metrics = evaluate_without([])
    breaches = breaches_of(metrics)
    if not breaches:
        return Fallback([], metrics, breaches, None)
    ranked = ranked() if callable(ranked) else ranked
    ranked = ranked or rank_sensitivity(layers, evaluate_without, metrics)
    most = min(max(1, int(limit * len(layers))), len(ranked))
    sizes = [1 << i for i in range(most.bit_length()) if 1 << i < most] + [most] if most else []
    best = ([], metrics, breaches)
    stopped = f"layer limit: {most} of {len(layers)} layers in float"
    if len(sizes) > max_candidates:
        sizes = sizes[:max_candidates]
        stopped = f"candidate limit: {max_candidates} candidates (largest: {sizes[-1]} layer(s) in float)"
    for size in sizes:
        kept = [layer for layer, _ in ranked[:size]]
        metrics = evaluate_without(kept)
        breaches = breaches_of(metrics)
        if not breaches:
            return Fallback(list(kept), metrics, breaches, None)
        if candidate_key(metrics, breaches) < candidate_key(*best[1:]):
            best = (list(kept), metrics, breaches)
    return Fallback(*best, stopped)  # the gates still missed: the best candidate seen


# ---- evidence that the compute is integer ----------------------------------------------------------------

_MNN_CONV_TYPES = {12: "Convolution", 13: "ConvolutionDepthwise", 17: "Deconvolution"}
_MNN_CONV2D_PARAM = 9  # OpParameter_Convolution2D in MNN's schema


def _fb_field(buf: bytes, table: int, slot: int) -> int | None:
    """Absolute position of field `slot` of the flatbuffer table at `table`, or None when absent."""
    import struct

    vtable = table - struct.unpack_from("<i", buf, table)[0]
    offset = 4 + 2 * slot
    if offset >= struct.unpack_from("<H", buf, vtable)[0]:
        return None
    field = struct.unpack_from("<H", buf, vtable + offset)[0]
    return table + field if field else None


def _fb_deref(buf: bytes, pos: int) -> int:
    import struct

    return pos + struct.unpack_from("<I", buf, pos)[0]


def mnn_int8_layers(mnn_path) -> dict:
    """Convolutions of a .mnn file by storage: {"int8": [names], "float": [names]}. An int8 convolution
    carries symmetric quantisation parameters and calibrated input/output scales (IDSTQuan scaleIn/scaleOut),
    which make MNN's CPU backend run it as an int8 kernel; "int8w" files have int8 weights but no scales."""
    import struct

    buf = Path(mnn_path).read_bytes()
    root = struct.unpack_from("<I", buf, 0)[0]
    ops = _fb_field(buf, root, 3)  # Net.oplists
    found = {"int8": [], "float": []}
    if ops is None:
        return found
    vec = _fb_deref(buf, ops)
    for i in range(struct.unpack_from("<I", buf, vec)[0]):
        op = _fb_deref(buf, vec + 4 + 4 * i)
        type_pos, main_type_pos = _fb_field(buf, op, 5), _fb_field(buf, op, 1)
        op_type = struct.unpack_from("<i", buf, type_pos)[0] if type_pos else 0
        if op_type not in _MNN_CONV_TYPES or not main_type_pos or buf[main_type_pos] != _MNN_CONV2D_PARAM:
            continue
        name_pos = _fb_field(buf, op, 3)
        name = ""
        if name_pos:
            s = _fb_deref(buf, name_pos)
            name = buf[s + 4:s + 4 + struct.unpack_from("<I", buf, s)[0]].decode()
        conv = _fb_deref(buf, _fb_field(buf, op, 2))
        quan, symmetric = _fb_field(buf, conv, 3), _fb_field(buf, conv, 4)
        scale_in = 0.0
        if quan:
            pos = _fb_field(buf, _fb_deref(buf, quan), 5)  # IDSTQuan.scaleIn
            scale_in = struct.unpack_from("<f", buf, pos)[0] if pos else 0.0
        found["int8" if symmetric and scale_in else "float"].append(name)
    return found


def onnx_qdq_layers(onnx_model) -> dict:
    """Conv / MatMul / Gemm nodes by form: {"qdq": [names], "float": [names]}; "qdq" when both the activation
    and the weight arrive through DequantizeLinear (a QDQ pair ONNX Runtime can fuse into an integer op)."""
    producer = {out: node.op_type for node in onnx_model.graph.node for out in node.output}
    found = {"qdq": [], "float": []}
    for node in onnx_model.graph.node:
        if node.op_type in QUANTISED_OPS:
            dq = all(producer.get(name) == "DequantizeLinear" for name in node.input[:2])
            found["qdq" if dq else "float"].append(node.name)
    return found


def ort_fused_ops(onnx_path) -> dict[str, int]:
    """Op histogram of the graph ONNX Runtime actually runs (CPU, extended optimisations): QDQ pairs it fused
    show up as QLinearConv / QLinearMatMul / QLinearAdd ...; none of those appear for a float model."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgeport-ort-opt-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load_model(options.optimized_model_filepath).graph
    return dict(Counter(node.op_type for node in graph.node))


def ort_layer_errors(float_model, int8_model, x: np.ndarray, layers: Sequence[str]) -> list[tuple[str, float]]:
    """One-pass sensitivity for ONNX Runtime: for each layer, the cosine its output loses in the int8 model
    beyond what its input already lost (error this layer adds), most harmful first. Cheap (two runs over `x`),
    so the fallback can rank every layer of a large network; `rank_sensitivity` is the exact, slow ranking.
    Cosines are the worst per sample (models.metrics.compare), taken one sample at a time: holding every probed
    tensor of the whole batch does not fit in memory for a large network."""
    import onnx

    def probes(model):  # node names survive quantisation; tensor names around a quantised node do not
        nodes = {n.name: n for n in model.graph.node}
        return {layer: (nodes[layer].input[0], nodes[layer].output[0]) for layer in layers if layer in nodes}

    def session(model, probe):
        tensors = sorted({t for pair in probe.values() for t in pair})
        model = onnx.ModelProto.FromString(model.SerializeToString())
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
        sess = ort_session(model)
        names = [o.name for o in sess.get_outputs()]
        return lambda sample: dict(zip(names, sess.run(None, {model.graph.input[0].name: sample})))

    fp, qp = probes(float_model), probes(int8_model)
    common = [layer for layer in layers if layer in fp and layer in qp]  # graph order (a set's is per-process)
    run_float, run_int8 = session(float_model, fp), session(int8_model, qp)
    worst = {layer: [1.0, 1.0] for layer in common}  # [input cosine, output cosine]
    for i in range(len(x)):
        ref, q = run_float(x[i:i + 1]), run_int8(x[i:i + 1])
        for layer in common:
            for k in (0, 1):
                cos = compare(ref[fp[layer][k]], q[qp[layer][k]])["cosine"]
                worst[layer][k] = min(worst[layer][k], cos)
    ranked = [(layer, cos_in - cos_out) for layer, (cos_in, cos_out) in worst.items()]
    return sorted(ranked, key=lambda r: -r[1])  # stable: ties keep graph order
