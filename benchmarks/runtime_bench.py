"""Edge-runtime benchmark for one artifact, torch-free: load time, peak RSS, RSS growth over N inferences
(a leak shows as growth in the second half), and the Predictor wrapper's overhead over the bare engine call.

  python -m benchmarks.runtime_bench artifacts/fasternet_t0/<tag>/model.mnn [--n 10000] [--threads 1] [--json]
  python -m benchmarks.runtime_bench artifacts/convnext_atto/conv/model.onnx --engine openvino
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from runtime import EdgeRuntimeError, load
from runtime.bench import peak_rss_mb, rss_mb
from runtime.cli import OneLineParser, cli_main, int_in
from runtime.engines import import_mnn, import_openvino, mnn_runtime_manager, openvino_config, stdout_silenced
from runtime.predictor import ENGINE_CHOICES

MAX_RUNS = 10_000_000  # 80 MB of latencies; more is a typo


def bare_engine_call(path: str, backend: str, threads: int, precision: str, x: np.ndarray):
    """The engine with nothing of ours around it: what the wrapper's overhead is measured against."""
    if backend == "mnn":
        MNN = import_mnn()
        F = MNN.expr
        rt = mnn_runtime_manager(threads, precision)  # configured as runtime.load does
        with stdout_silenced():
            module = MNN.nn.load_module_from_file(path, [], [], runtime_manager=rt)
            if not module.forward([F.const(x, list(x.shape), F.NCHW)]):  # the Predictor ran it: not expected
                raise EdgeRuntimeError(f"MNN forward failed on {os.path.basename(path)} outside the Predictor")

        def call():
            outs = module.forward([F.const(x, list(x.shape), F.NCHW)])
            return [(F.convert(o, F.NCHW) if o.data_format == F.NC4HW4 else o).read() for o in outs]
        return call
    if backend == "openvino":
        ov = import_openvino()
        core = ov.Core()
        request = core.compile_model(path, "CPU", openvino_config(core, threads, precision)).create_infer_request()
        request.set_input_tensor(0, ov.Tensor(x, shared_memory=True))  # once: the same array every call

        def call():
            request.infer()
            return [request.get_output_tensor(i).data.copy() for i in range(len(request.model_outputs))]
        return call
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def interleaved_medians(a, b, runs: int) -> tuple[float, float]:
    """Median seconds of a() and b(), alternating which goes first so drift and caches hit both alike."""
    ta, tb = [], []
    for i in range(runs):
        for fn, out in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb))


def measure(path: str, n: int, threads: int, precision: str, overhead_runs: int, engine: str = "auto") -> dict:
    rss_start = rss_mb()
    t = time.perf_counter()
    if engine in ("openvino", "ov"):
        import_openvino()
    elif path.lower().endswith(".mnn"):
        import_mnn()
    else:
        import onnxruntime  # noqa: F401
    import_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    predictor = load(path, engine, threads=threads, precision=precision)
    load_ms = (time.perf_counter() - t) * 1e3
    threads = predictor.threads  # capped for onnxruntime above the CPU count: the bare engine gets the same
    rss_loaded = rss_mb()
    if not predictor.input_shape:
        raise EdgeRuntimeError(f"{path}: input shape unknown (no edgeport metadata); cannot make an input")
    shape = [d if d > 0 else 1 for d in predictor.input_shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

    for _ in range(min(10, n)):
        predictor.run(x)
    rss_warm = rss_mb()
    latencies, rss_half = np.empty(n), rss_warm  # preallocated: a growing list would show up as RSS growth
    for i in range(n):
        t = time.perf_counter()
        predictor.run(x)
        latencies[i] = time.perf_counter() - t
        if i == n // 2:
            rss_half = rss_mb()
    rss_end = rss_mb()
    peak = peak_rss_mb()  # before the bare engine below adds a second copy of the model

    bare = bare_engine_call(path, predictor.backend, threads, precision, x)
    wrapped_s, bare_s = interleaved_medians(lambda: predictor.run(x), bare, overhead_runs)
    return {
        "artifact": path, "backend": predictor.backend, "threads": threads, "precision": precision,
        "input_shape": shape, "import_ms": import_ms, "load_ms": load_ms,
        "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak, "runs": n, "rss_growth_mb": rss_end - rss_warm,
        "rss_growth_second_half_mb": rss_end - rss_half,
        "latency_median_ms": float(np.median(latencies)) * 1e3,
        "latency_p90_ms": float(np.percentile(latencies, 90)) * 1e3,
        "overhead_runs": overhead_runs, "wrapper_median_ms": wrapped_s * 1e3, "bare_median_ms": bare_s * 1e3,
        "wrapper_overhead_us": (wrapped_s - bare_s) * 1e6, "wrapper_ratio": wrapped_s / bare_s,
    }


def report(r: dict) -> str:
    return "\n".join([
        f"{r['artifact']} ({r['backend']}, threads={r['threads']}, precision={r['precision']}, "
        f"input {r['input_shape']})",
        f"  load            {r['load_ms']:.1f} ms (engine import {r['import_ms']:.1f} ms before it)",
        f"  RSS             {r['rss_start_mb']:.1f} MB before engine import, "
        f"{r['rss_after_load_mb']:.1f} MB after load, peak {r['peak_rss_mb']:.1f} MB",
        f"  RSS growth      {r['rss_growth_mb']:+.2f} MB over {r['runs']} runs "
        f"({r['rss_growth_second_half_mb']:+.2f} MB in the second half)",
        f"  latency         median {r['latency_median_ms']:.3f} ms, p90 {r['latency_p90_ms']:.3f} ms",
        f"  wrapper         {r['wrapper_median_ms']:.3f} ms vs bare engine {r['bare_median_ms']:.3f} ms: "
        f"{r['wrapper_overhead_us']:+.1f} us, ratio {r['wrapper_ratio']:.3f} "
        f"(interleaved, {r['overhead_runs']} each)",
    ])


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m benchmarks.runtime_bench", description=__doc__.split("\n\n")[0],
                      epilog="Exit status: 0 ok; 2 bad input or option (one line); 1 internal error.")
    p.add_argument("artifact", help=".mnn or .onnx file exported by edgeport")
    p.add_argument("--n", type=int_in(1, MAX_RUNS), default=10_000,
                   help="inferences for the RSS-growth run (default: 10000)")
    p.add_argument("--overhead-runs", type=int_in(1, MAX_RUNS), default=1000,
                   help="interleaved pairs for the overhead (default: 1000)")
    p.add_argument("--threads", type=int_in(1), default=1,
                   help="intra-op threads (default: 1); above the CPU count warns, and onnxruntime is capped")
    p.add_argument("--precision", choices=("fp32", "low"), default="fp32",
                   help="arithmetic: low = fp16/bf16 where the CPU has it (MNN, OpenVINO)")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="auto = from the extension (.mnn: mnn, .onnx: onnxruntime); openvino runs a .onnx file")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    try:
        result = measure(args.artifact, args.n, args.threads, args.precision, args.overhead_runs, args.engine)
    except EdgeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
