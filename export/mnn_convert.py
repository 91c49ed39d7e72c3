"""ONNX → MNN through the converter linked into the MNN wheel (`_tools.mnnconvert`, in-process).

Never the Python tool wrappers shipped in the MNN package (its console script and tools modules): they
pip-install a telemetry SDK and phone home at import.
"""
from __future__ import annotations

import copy
import hashlib
import os
import struct
import tempfile
import threading
import uuid
from pathlib import Path

from models.errors import EdgeportError

from ._console import redirect_fds

PRECISIONS = ("fp32", "fp16", "int8w")
_PRECISION_ARGS = {"fp32": [], "fp16": ["--fp16"], "int8w": ["--weightQuantBits", "8"]}
_NET_UUID_FIELD = 11  # Net.mnn_uuid: the 12th field of the root table in MNN's schema/default/MNN.fbs
# The converter keeps a scratch file `.__convert_external_data.bin` in the working directory: two conversions
# sharing a directory silently corrupt each other's weights. Each call gets its own directory, one at a time.
_CWD_LOCK = threading.Lock()
# Ops whose weight (input 1) MNN's --fp16 stores as half; their biases stay float32.
_HALVED_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_FP16_MAX = 65504.0


def convert(onnx_path, mnn_path, biz_code: str, precision: str = "fp32", log_path=None, verbose: bool = False,
            gelu_approximation: bool = False) -> Path:
    """Convert one precision variant; the result is byte-reproducible (see `make_uuid_deterministic`).

    GELU stays exact (erf) unless `gelu_approximation`: the converter's default tanh approximation costs ~1e-3
    relative error on realistic activations, above the parity gate.
    """
    mnn_path = Path(mnn_path).resolve()
    onnx_path = Path(onnx_path).resolve()
    argv = ["MNNConvert", "-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(mnn_path),
            "--bizCode", biz_code, "--useGeluApproximation", "1" if gelu_approximation else "0",
            *_PRECISION_ARGS[precision]]
    mnn_path.unlink(missing_ok=True)
    log_path = Path(log_path or mnn_path.with_suffix(".log")).resolve()
    with _CWD_LOCK, tempfile.TemporaryDirectory(prefix="mnn-convert-") as scratch, \
            redirect_fds(log_path, enabled=not verbose):
        if precision == "fp16":
            argv[argv.index(str(onnx_path))] = _write_fp16_rounded(onnx_path, Path(scratch))
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            from runtime.mnn_import import import_extension

            _tools = import_extension("_tools")  # the import itself prints "The device supports ..." from C
            ok = _tools.mnnconvert(argv)
        finally:
            os.chdir(cwd)
    # The converter reports success even when it wrote nothing (e.g. a missing input file) or could not read
    # its own scratch file: check the output and the log.
    wrote = mnn_path.is_file() and mnn_path.stat().st_size > 0
    if not ok or not wrote or _log_says(log_path, "Can't open file"):
        raise EdgeportError(f"MNN converter produced no {precision} model ({_last_line(log_path)})")
    make_uuid_deterministic(mnn_path)
    return mnn_path


def round_weights_to_fp16(model):
    """A copy of the ONNX `model` whose Conv / ConvTranspose / Gemm / MatMul weight initializers are rounded to
    the nearest float16 value (stored as float32, clamped to ±65504 like the converter).

    MNN's `--fp16` casts weights with half_float's default rounding style, which truncates toward zero: every
    weight shrinks by half an fp16 ulp on average, a gain loss that compounds with depth (efficientnetv2_s at
    128²: 0.107 of max|ref| against 0.009 for round-to-nearest). Weights that are already fp16 values cast
    exactly, so the .fp16.mnn file computes the round-to-nearest network."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    weights = {node.input[1] for node in model.graph.node
               if node.op_type in _HALVED_WEIGHT_OPS and len(node.input) > 1}
    for init in model.graph.initializer:
        if init.name in weights and init.data_type == onnx.TensorProto.FLOAT:
            w = np.clip(numpy_helper.to_array(init), -_FP16_MAX, _FP16_MAX)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float16).astype(np.float32), init.name))
    return model


def _write_fp16_rounded(onnx_path: Path, directory: Path) -> str:
    import onnx

    rounded = directory / "model.fp16-rounded.onnx"
    onnx.save_model(round_weights_to_fp16(onnx.load_model(str(onnx_path))), str(rounded))
    return str(rounded)


def _log_says(log_path, text: str) -> bool:
    try:
        return text in Path(log_path).read_text(errors="replace")
    except OSError:
        return False


def _last_line(log_path) -> str:
    try:
        lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no converter log"
    return f"converter said: {lines[-1]}" if lines else "converter printed nothing"


def _uuid_span(buf: bytes) -> tuple[int, int] | None:
    """(offset, length) of the Net.mnn_uuid string in a flatbuffer, or None when the field is absent."""
    root = struct.unpack_from("<I", buf, 0)[0]
    vtable = root - struct.unpack_from("<i", buf, root)[0]
    slot = 4 + 2 * _NET_UUID_FIELD
    if slot >= struct.unpack_from("<H", buf, vtable)[0]:
        return None
    field = struct.unpack_from("<H", buf, vtable + slot)[0]
    if field == 0:
        return None
    pos = root + field
    start = pos + struct.unpack_from("<I", buf, pos)[0]
    return start + 4, struct.unpack_from("<I", buf, start)[0]


def make_uuid_deterministic(mnn_path) -> None:
    """Replace the converter's random uuid4 (std::random_device, no flag to fix it) by one derived from the
    file's own content, in place and with the same length, so identical inputs give identical bytes."""
    path = Path(mnn_path)
    buf = bytearray(path.read_bytes())
    span = _uuid_span(buf)
    if span is None:
        return
    start, length = span
    buf[start:start + length] = b"0" * length
    digest = hashlib.sha256(buf).digest()
    new = str(uuid.UUID(bytes=digest[:16], version=4)).encode()[:length].ljust(length, b"0")
    buf[start:start + length] = new
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf)
    tmp.replace(path)


def read_uuid(mnn_path) -> str | None:
    buf = Path(mnn_path).read_bytes()
    span = _uuid_span(buf)
    return None if span is None else buf[span[0]:span[0] + span[1]].decode()
