"""Per-op profile of one artifact: time per op type and the slowest nodes, each as a share of the total, and
the layout conversions in the graph. MNN through its per-op callbacks (Interpreter.runSessionWithCallBackInfo),
ONNX Runtime through its own profiler (SessionOptions.enable_profiling).

  python -m benchmarks.profile ARTIFACT [--threads N] [--runs N] [--json]

The input is a real photograph through the model's own preprocessing (activations decide what some ops cost:
MNN's exact GELU is 5x dearer on realistic inputs than on near-zero ones), or N(0, 1) for files without
edgeport metadata.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np

from runtime import EdgeRuntimeError, load
from runtime.engines import WINOGRAD_HINT, WINOGRAD_LEVEL, import_mnn, stdout_silenced

TOP_NODES = 10
# ONNX Runtime's NCHWc kernels reorder to and from their blocked layout; MNN's NC4HW4 conversions are
# ConvertTensor ops in the file (Raster at run time).
ORT_LAYOUT_OPS = ("ReorderInput", "ReorderOutput")
MNN_LAYOUT_OP = "ConvertTensor"


def profile(path, threads: int = 1, runs: int = 20, warmup: int = 3) -> dict:
    """{"artifact", "engine", "threads", "runs", "total_ms", "wall_ms", "by_type": [{"op_type", "count",
    "ms", "share"}], "slowest": [{"node", "op_type", "ms", "share"}], "layout_conversions", "op_counts"}.

    Per node, the median over `runs` profiled runs after `warmup`; total_ms is their sum, wall_ms the median
    of as many unprofiled runs (the difference is the profiler's own cost)."""
    path = os.fspath(path)
    if runs < 1 or warmup < 0 or threads < 1:
        raise EdgeRuntimeError("--runs and --threads must be at least 1 and warm-up at least 0")
    predictor = load(path, threads=threads)  # validates the file and its metadata
    x = _input(predictor)
    if predictor.backend == "mnn":
        nodes, wall, counts = _profile_mnn(path, x, threads, runs, warmup)
        layout = counts.get(MNN_LAYOUT_OP, 0)
    else:
        nodes, wall, counts = _profile_ort(path, x, threads, runs, warmup)
        layout = sum(counts.get(op, 0) for op in ORT_LAYOUT_OPS)
    return summarize(nodes, engine=predictor.backend, artifact=path, threads=threads, runs=runs,
                     wall_ms=wall, layout_conversions=layout, op_counts=counts)


def summarize(nodes: list[tuple[str, str, float]], **info) -> dict:
    """From (node, op_type, ms) rows: totals per op type and the slowest nodes, shares of the summed time."""
    total = sum(ms for _, _, ms in nodes) or 1e-12
    by_type: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for _, op_type, ms in nodes:
        by_type[op_type][0] += 1
        by_type[op_type][1] += ms
    types = [{"op_type": t, "count": c, "ms": ms, "share": ms / total}
             for t, (c, ms) in sorted(by_type.items(), key=lambda kv: -kv[1][1])]
    slowest = [{"node": n, "op_type": t, "ms": ms, "share": ms / total}
               for n, t, ms in sorted(nodes, key=lambda r: -r[2])[:TOP_NODES]]
    return {**info, "total_ms": total, "by_type": types, "slowest": slowest}


def to_markdown(result: dict, top_types: int = 12) -> str:
    """A short section: header line, op types table, slowest nodes table."""
    r = result
    lines = [f"**{os.path.basename(os.path.dirname(r['artifact']) or '.')}/{os.path.basename(r['artifact'])}** "
             f"({r['engine']}, {r['threads']} thread{'s' * (r['threads'] > 1)}, median of {r['runs']} runs): "
             f"ops sum to {r['total_ms']:.2f} ms (unprofiled run {r['wall_ms']:.2f} ms); "
             f"{r['layout_conversions']} layout conversion op{'s' * (r['layout_conversions'] != 1)} in the graph.",
             "", "| op type | nodes | ms | share |", "|---|---|---|---|"]
    for t in r["by_type"][:top_types]:
        lines.append(f"| {t['op_type']} | {t['count']} | {t['ms']:.3f} | {100 * t['share']:.1f} % |")
    rest = r["by_type"][top_types:]
    if rest:
        lines.append(f"| ({len(rest)} other types) | {sum(t['count'] for t in rest)} | "
                     f"{sum(t['ms'] for t in rest):.3f} | {100 * sum(t['share'] for t in rest):.1f} % |")
    lines += ["", "| slowest node | op type | ms | share |", "|---|---|---|---|"]
    for n in r["slowest"]:
        lines.append(f"| `{n['node']}` | {n['op_type']} | {n['ms']:.3f} | {100 * n['share']:.1f} % |")
    return "\n".join(lines) + "\n"


def _input(predictor) -> np.ndarray | None:
    """A photograph through the artifact's preprocessing; N(0, 1) of the graph's input shape without metadata;
    None when that shape is not known here (MNN reports it only once a session exists)."""
    if predictor.meta:
        from export.inputs import sample_batch

        return sample_batch(predictor.meta, n_images=1, n_random=0)
    shape = predictor.input_shape
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        return None
    return _random(shape)


def _random(shape) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32)


def _median_rows(samples: dict, types: dict, warmup: int) -> list[tuple[str, str, float]]:
    return [(name, types[name], 1e3 * float(np.median(t[warmup:] or t))) for name, t in samples.items()]


def mnn_op_types(path) -> dict[str, str]:
    """Tensor name → MNN op type from the file (UnaryOp and BinaryOp as their operation, e.g. GELU_STANDARD)."""
    MNN = import_mnn()
    with stdout_silenced():
        return {v.name: v.op_type for v in MNN.expr.load_as_list(str(path))}


def _profile_mnn(path, x, threads, runs, warmup):
    MNN = import_mnn()
    file_types = mnn_op_types(path)
    with stdout_silenced():
        interp = MNN.Interpreter(path)
        interp.setSessionHint(WINOGRAD_HINT, WINOGRAD_LEVEL["accurate"])  # as runtime.load runs it
        session = interp.createSession({"backend": "CPU", "numThread": threads, "precision": "normal"})
    inp = interp.getSessionInput(session)
    if x is None:
        shape = list(inp.getShape())
        if not shape or min(shape) < 1:
            raise EdgeRuntimeError(f"{path}: input shape unknown (no edgeport metadata, dynamic in the graph)")
        x = _random(shape)
    if list(inp.getShape()) != list(x.shape):
        interp.resizeTensor(inp, tuple(x.shape))
        interp.resizeSession(session)
    inp.copyFrom(MNN.Tensor(x.shape, MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe))
    samples: dict[str, list] = defaultdict(list)
    types: dict[str, str] = {}
    start: dict[str, int] = {}

    def begin(_tensors, info):
        start[info.getName()] = time.perf_counter_ns()
        return True

    def end(_tensors, info):
        name = info.getName()
        samples[name].append((time.perf_counter_ns() - start[name]) / 1e9)
        if name not in types:
            kind, sub = info.getType(), file_types.get(name, "")
            # the file names a UnaryOp/BinaryOp by its operation (GELU_STANDARD, ADD); Raster ops are the
            # run-time form of ConvertTensor, Concat and Slice
            types[name] = f"{kind} {sub}" if kind in ("UnaryOp", "BinaryOp") and sub and sub != kind else kind
        return True

    wall = []
    for i in range(warmup + runs):  # profiled and plain runs alternate, so load drift hits both alike
        interp.runSessionWithCallBackInfo(session, begin, end)
        t0 = time.perf_counter()
        interp.runSession(session)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
    counts = Counter(file_types.values())
    return _median_rows(samples, types, warmup), 1e3 * float(np.median(wall)), dict(counts)


def _profile_ort(path, x, threads, runs, warmup):
    import onnxruntime as ort

    if x is None:
        raise EdgeRuntimeError(f"{path}: input shape unknown (no edgeport metadata, dynamic in the graph)")
    with tempfile.TemporaryDirectory(prefix="edgeport-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        plain = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        wall = []
        for i in range(warmup + runs):
            sess.run(None, feed)
            t0 = time.perf_counter()
            plain.run(None, feed)
            if i >= warmup:
                wall.append(time.perf_counter() - t0)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    samples: dict[str, list] = defaultdict(list)
    types: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            samples[name].append(e["dur"] / 1e6)
            types[name] = e.get("args", {}).get("op_name", "?")
    counts = dict(Counter(types.values()))  # the graph ORT runs after its own rewrites (Reorder* included)
    return _median_rows(samples, types, warmup), 1e3 * float(np.median(wall)), counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("artifact", help="a .mnn or .onnx file")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=20, help="profiled runs after 3 warm-up runs (default 20)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of Markdown")
    args = p.parse_args(argv)
    try:
        if args.threads < 1 or args.runs < 1:
            raise EdgeRuntimeError(f"--threads {args.threads} and --runs {args.runs} must be at least 1")
        result = profile(args.artifact, threads=args.threads, runs=args.runs)
    except EdgeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else to_markdown(result), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
