"""Peak float32 matmul throughput here, the roof every artifact's achieved FLOP/s is compared with: the best of
PyTorch (torch.mm), ONNX Runtime (MatMul) and MNN (expr matmul) on the same n×n product, and beside it the
ISA's theoretical FMA peak (cores × fp32 lanes × FMA pipes × 2 FLOP × clock)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

ENGINES = ("torch", "onnxruntime", "mnn")


def _best_gflops(fn: Callable[[], object], n: int, seconds: float) -> float:
    fn()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def _torch_mm(threads: int, a: np.ndarray, b: np.ndarray, n: int, seconds: float) -> float:
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return _best_gflops(lambda: torch.mm(ta, tb), n, seconds)
    finally:
        torch.set_num_threads(prev)


def _ort_matmul(threads: int, a: np.ndarray, b: np.ndarray, n: int, seconds: float) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return _best_gflops(lambda: sess.run(None, {"a": a}), n, seconds)


def _mnn_matmul(threads: int, a: np.ndarray, b: np.ndarray, n: int, seconds: float) -> float:
    from runtime.engines import import_mnn

    F = import_mnn().expr
    F.set_thread_number(threads)  # MNN's expression executor, not the Module runtimes the artifacts use
    va, vb = F.const(a, [n, n]), F.const(b, [n, n])
    return _best_gflops(lambda: F.matmul(va, vb).read(), n, seconds)


_RUNNERS = {"torch": _torch_mm, "onnxruntime": _ort_matmul, "mnn": _mnn_matmul}


def sgemm_by_engine(threads: int, n: int = 1024, seconds: float = 1.0,
                    engines: tuple[str, ...] = ENGINES) -> dict[str, float]:
    """Best GFLOP/s of an n×n float32 matmul in each engine at `threads` threads (`seconds` each); an engine that
    is not installed is left out."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    for name in engines:
        try:
            out[name] = _RUNNERS[name](threads, a, b, n, seconds)
        except ImportError:
            continue
    return out


def sgemm_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """The roof: best GFLOP/s of an n×n float32 matmul over PyTorch, ONNX Runtime and MNN."""
    return max(sgemm_by_engine(threads, n, seconds / len(ENGINES)).values())


def _cpu_flags() -> set[str]:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return flags


def _clock_ghz() -> tuple[float | None, str]:
    """Max clock from cpufreq when the kernel exposes it, else the TSC/nominal rate ("cpu MHz" of cpuinfo)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.lower().startswith("cpu mhz")]
        if mhz:
            return max(mhz) / 1e3, "/proc/cpuinfo 'cpu MHz' (nominal; turbo may be higher)"
    except (OSError, ValueError):
        pass
    return None, "clock not readable"


def fma_peak(threads: int = 1) -> dict:
    """The ISA's theoretical fp32 peak: threads × lanes × FMA pipes × 2 × clock. Lanes from the widest vector
    ISA in the CPU flags; two FMA pipes assumed for AVX2/AVX-512 and NEON server cores (true of Intel server
    cores with two 512-bit FMA units and AMD Zen 4/5; client parts may have one), one otherwise."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        isa, lanes, pipes = "AVX-512", 16, 2
    elif "fma" in flags and "avx2" in flags:
        isa, lanes, pipes = "AVX2+FMA", 8, 2
    elif "asimd" in flags or os.uname().machine in ("aarch64", "arm64"):
        isa, lanes, pipes = "NEON", 4, 2
    else:
        isa, lanes, pipes = "SSE", 4, 1
    ghz, clock_source = _clock_ghz()
    gflops = threads * lanes * pipes * 2 * ghz if ghz else None
    return {"isa": isa, "fp32_lanes": lanes, "fma_pipes": pipes, "clock_ghz": ghz, "threads": threads,
            "gflops": gflops, "assumed": f"{pipes} FMA pipes per core (not readable); clock: {clock_source}"}
