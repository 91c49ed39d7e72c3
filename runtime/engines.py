"""The two inference engines behind Predictor, each a thin adapter: load a file, report names and metadata,
run a dict of float32 arrays. MNN and onnxruntime are imported only when a model of that kind is loaded."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

from .console import last_words, stdout_silenced  # noqa: F401 (stdout_silenced: imported from here)
from .errors import EdgeRuntimeError

METADATA_KEY = "edgeport"  # ONNX metadata_props key; the MNN file carries the same JSON as its bizCode
MNN_PRECISION = {"fp32": "normal", "low": "low"}
# MNN hint WINOGRAD_MEMORY_LEVEL (Interpreter::HintMode 3): 3, MNN's default, lets 3x3 convs use Winograd tiles up
# to F(6,3), whose float32 error reaches ~1e-3 of max|out| on one 64-channel conv with N(0, 1) input; any other
# level keeps F(2,3) (~3e-7). Measured on efficientnetv2_s at 384², 1 thread: "accurate" takes 1.12× the time of
# "fast", whose logits differ from PyTorch by 1.2e-3 (random inputs) against 3.5e-6. No effect on the other
# families on x86 (their 3x3 convs never choose Winograd); on aarch64 (qemu) fasternet_t0's do, and "accurate"
# costs 1.3 % (fp32, cortex-a53) to 2.7 % (fp16, neoverse-n1) more instructions.
WINOGRAD_LEVEL = {"accurate": 1, "fast": 3}
WINOGRAD_HINT = 3
# Runtime managers with equal configs share one MNN runtime, and a module reads the hint when it resizes (first
# forward, new input shape): the hint is set and the resize done under one process-wide lock.
_RESIZE_LOCK = threading.Lock()


def import_mnn():
    """`import MNN` without its "The device supports: ..." line on stdout, also where glibc ≥ 2.41 refuses the
    wheel's executable-stack extension (runtime.mnn_import)."""
    if "MNN" in sys.modules:
        return sys.modules["MNN"]
    from .mnn_import import import_mnn as import_mnn_patched_if_needed

    with stdout_silenced():
        return import_mnn_patched_if_needed()


def mnn_runtime_manager(threads: int = 1, precision: str = "fp32", winograd: str = "accurate"):
    """An MNN CPU runtime manager as the runtime configures it (numThread, precision, Winograd tiles). The hint
    also goes on the shared runtime: set it again before a module's resize if other managers exist (MnnEngine)."""
    MNN = import_mnn()
    config = {"backend": "CPU", "numThread": threads, "precision": MNN_PRECISION[precision]}
    with stdout_silenced():  # "MNN use low precision"
        manager = MNN.nn.create_runtime_manager((config,))
        manager.set_hint(WINOGRAD_HINT, WINOGRAD_LEVEL[winograd])
    return manager


class MnnEngine:
    """MNN Module API. Module.forward is not documented as thread-safe, so calls are serialised by a lock.

    MNN reports a failed forward (e.g. a shape its graph cannot take) by printing on stdout and returning no
    outputs: the resize (first forward, new input shape), where such failures happen, runs with stdout captured,
    and every forward's outputs are counted, so a failure is one EdgeRuntimeError with MNN's reason."""

    backend = "mnn"

    def __init__(self, path: str, threads: int, precision: str, winograd: str = "accurate"):
        MNN = import_mnn()
        self._F = MNN.expr
        self._path = path
        self._runtime_manager = runtime_manager = mnn_runtime_manager(threads, precision, winograd)
        self._winograd_level = WINOGRAD_LEVEL[winograd]
        self._resized_for = None
        try:
            with stdout_silenced():
                self._module = MNN.nn.load_module_from_file(path, [], [], runtime_manager=runtime_manager)
                info = self._module.get_info()
        except (SystemError, RuntimeError):
            raise EdgeRuntimeError(
                f"{path}: not a valid MNN model (truncated, or another format); re-export it") from None
        self.input_names = list(info["inputNames"])
        self.output_names = list(info["outputNames"])
        self.input_shapes = dict.fromkeys(self.input_names)
        for name, var in zip(self.input_names, info.get("inputs") or []):
            try:
                self.input_shapes[name] = graph_input_shape(var.shape)
            except (RuntimeError, SystemError, ValueError, TypeError):  # a shape MNN cannot tell before resize
                pass
        self.metadata_text = info.get("bizCode") or ""
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        F = self._F
        inputs = [F.const(feeds[name], list(feeds[name].shape), F.NCHW) for name in self.input_names]
        shapes = [feeds[name].shape for name in self.input_names]
        with self._lock:
            if shapes != self._resized_for:
                printed = []
                with _RESIZE_LOCK, stdout_silenced(printed):
                    self._runtime_manager.set_hint(WINOGRAD_HINT, self._winograd_level)
                    outputs = self._module.forward(inputs)
                outputs = self._check_forward(outputs, shapes, printed)
                self._resized_for = shapes  # only once it worked: a failing shape stays silenced
            else:
                outputs = self._check_forward(self._module.forward(inputs), shapes, None)
            arrays = []
            for out in outputs:
                if out.data_format == F.NC4HW4:
                    out = F.convert(out, F.NCHW)
                arrays.append(np.array(out.read(), copy=True))  # read() may alias MNN's buffers
        return dict(zip(self.output_names, arrays))

    def _check_forward(self, outputs, shapes, printed: list | None) -> list:
        """MNN's outputs as a list, or EdgeRuntimeError when any is missing or empty (a failed forward)."""
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        missing = [name for i, name in enumerate(self.output_names)
                   if i >= len(outputs) or not outputs[i].shape or 0 in outputs[i].shape]
        if missing:
            reason = last_words("".join(printed or []))
            shape = ", ".join(str(list(s)) for s in shapes)
            raise EdgeRuntimeError(
                f"MNN forward failed on {os.path.basename(self._path)}: no output '{missing[0]}' for input {shape}"
                + (f" (MNN: {reason})" if reason else "") + "; check the input shape, or re-export the model")
        return outputs


def graph_input_shape(shape) -> list[int] | None:
    """An MNN graph input's recorded shape, batch 1 as -1 (MNN records a dynamic batch as 1); None if unknown."""
    shape = [int(d) for d in shape or []]
    if not shape or any(d < 1 for d in shape[1:]):
        return None
    return [-1 if shape[0] == 1 else shape[0], *shape[1:]]


class OrtEngine:
    """onnxruntime CPU session; InferenceSession.run is thread-safe, so no lock."""

    backend = "onnxruntime"

    def __init__(self, path: str, threads: int, precision: str, winograd: str = "accurate"):
        if winograd != "accurate":
            raise EdgeRuntimeError(f"winograd {winograd!r} is an MNN option; onnxruntime has no such choice")
        if precision != "fp32":
            raise EdgeRuntimeError(
                f"precision {precision!r} is an MNN option; onnxruntime runs the file as exported (use fp32)")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EdgeRuntimeError(f"onnxruntime is not installed ({e}); pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # fatal only: a failed run is raised to us, then reported once
        try:
            self._session = ort.InferenceSession(
                path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's pybind exceptions share no useful base class
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EdgeRuntimeError(f"{path}: not a loadable ONNX model ({reason}); re-export it") from None
        inputs = self._session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_shapes = {i.name: [d if isinstance(d, int) else -1 for d in i.shape] for i in inputs}
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.metadata_text = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(self.output_names, feeds)
        except Exception as e:  # inputs were validated: a model fault, or a shape we could not check
            raise EdgeRuntimeError(f"onnxruntime failed: {str(e).splitlines()[0]}") from None
        return dict(zip(self.output_names, outputs))


ENGINES = {"mnn": MnnEngine, "onnxruntime": OrtEngine}
EXTENSIONS = {".mnn": "mnn", ".onnx": "onnxruntime"}
