"""The inference engines behind Predictor, each a thin adapter: load a file, report names and metadata, run a
dict of float32 arrays. MNN, onnxruntime and OpenVINO are imported only when a model is loaded with them."""
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


def import_openvino():
    """`import openvino` without its telemetry. Importing the package imports its converter (openvino.tools.ovc),
    which sends a Google Analytics event ("ov", "import") from a background process and writes ~/intel/
    openvino_ga_cid whenever the openvino-telemetry package (a dependency of the openvino wheel) is installed
    and ~/intel/openvino_telemetry does not opt out. With that package hidden from this process, ovc takes its
    own no-op stub (telemetry_stub): no file, no connection (docs/guides/engines.md shows how this was checked)."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    sys.modules.setdefault("openvino_telemetry", None)  # kept for the process: ovc may import it again later
    try:
        import openvino
    except ImportError as e:
        raise EdgeRuntimeError(f"openvino is not installed ({e}); pip install openvino "
                               "(or edgeport-runtime[openvino])") from None
    return openvino


def _last_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def openvino_config(core, threads: int = 1, precision: str = "fp32") -> dict:
    """The CPU plugin's compile config as the runtime sets it (OpenVinoEngine; the benchmarks' bare call).

    INFERENCE_PRECISION_HINT: fp32 is asked for explicitly, as the plugin's own default is bf16 wherever the CPU
    has it (AVX512_BF16 / AMX), far outside the fp32 gate; "low" is bf16 on such x86 CPUs, f16 where the plugin
    offers it (ARMv8.2+), else f32. No CPU pinning (on by default on Linux): like onnxruntime's threads, ours may
    move between cores; on a shared 2-core host under load, pinned took 0.98x onnxruntime's time on
    convnext_atto, unpinned 0.78x."""
    hint = "f32"
    if precision == "low":
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        hint = "bf16" if "BF16" in capabilities else "f16" if "FP16" in capabilities else "f32"
    return {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}


class OpenVinoEngine:
    """OpenVINO CPU plugin on an ONNX file (read directly, no conversion step), one synchronous infer request
    compiled for latency. An InferRequest is not thread-safe, so calls are serialised by a lock."""

    backend = "openvino"

    def __init__(self, path: str, threads: int, precision: str, winograd: str = "accurate"):
        if winograd != "accurate":
            raise EdgeRuntimeError(f"winograd {winograd!r} is an MNN option; OpenVINO has no such choice")
        ov = import_openvino()
        # The ONNX frontend itself, not Core.read_model: that tries every frontend on a file that is not ONNX, and
        # TensorFlow's prints parse errors to stderr.
        onnx_frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
        if not onnx_frontend.supported(path):
            raise EdgeRuntimeError(f"{path}: not an ONNX model (truncated, or another format); OpenVINO runs the "
                                   ".onnx file: re-export it, or use engine mnn for a .mnn file")
        core = ov.Core()
        config = openvino_config(core, threads, precision)
        self.precision_hint = config["INFERENCE_PRECISION_HINT"]
        try:
            model = onnx_frontend.convert(onnx_frontend.load(path))
            compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO's exceptions carry a C++ check location first, the reason last
            raise EdgeRuntimeError(f"{path}: OpenVINO cannot load it ({_last_line(e)}); re-export it") from None
        self._request = compiled.create_infer_request()
        self._Tensor = ov.Tensor
        self.input_names = [i.get_any_name() for i in model.inputs]
        self.output_names = [o.get_any_name() for o in model.outputs]
        self.input_shapes = {i.get_any_name(): [d.get_length() if d.is_static else -1 for d in i.get_partial_shape()]
                             for i in model.inputs}
        # The ONNX frontend keeps the file's metadata_props under rt_info["framework"]
        key = ["framework", METADATA_KEY]
        self.metadata_text = str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else ""
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Tensors set by index and outputs read by index: InferRequest.infer(inputs) converts and wraps them in
        # Python and took ~40 us more per call (tiny model). The inputs are shared (contiguous, checked by
        # Predictor); the outputs are copied out of the request's buffers, which the next call overwrites.
        request = self._request
        try:
            with self._lock:
                for i, name in enumerate(self.input_names):
                    request.set_input_tensor(i, self._Tensor(feeds[name], shared_memory=True))
                request.infer()
                return {name: request.get_output_tensor(i).data.copy() for i, name in enumerate(self.output_names)}
        except Exception as e:
            raise EdgeRuntimeError(f"OpenVINO failed: {_last_line(e)}") from None


ENGINES = {"mnn": MnnEngine, "onnxruntime": OrtEngine, "openvino": OpenVinoEngine}
EXTENSIONS = {".mnn": "mnn", ".onnx": "onnxruntime"}
