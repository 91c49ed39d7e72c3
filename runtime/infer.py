"""Classify images (or print feature shapes) with an edgeport .mnn / .onnx artifact, torch-free.

Examples:
  python -m runtime.infer model.mnn cat.jpg
  python -m runtime.infer model.mnn photos/ --topk 3 --labels imagenet_labels.txt --threads 4
  python -m runtime.infer model.onnx cat.jpg --json
  python -m runtime.infer model.onnx cat.jpg --engine openvino --bench 200
  python -m runtime.infer model.mnn cat.jpg --bench 200 --precision low
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .cli import OneLineParser, cli_main, expand_images, for_each_image, int_in, read_labels
from .errors import EdgeRuntimeError
from .predictor import ENGINE_CHOICES, Predictor, load

MAX_BENCH_RUNS = 1_000_000
DEFAULT_TOPK = 5


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m runtime.infer", description=__doc__.split("\n\n")[0],
        epilog="\n".join(__doc__.splitlines()[2:]) + "\n\nExit status: 0 ok; 2 bad input or option, or any image "
               "failed (one line each); 1 internal error; 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="artifact: .mnn (MNN) or .onnx (onnxruntime or OpenVINO); preprocessing "
                                 "comes from its embedded metadata")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or directories (their image files, sorted, not recursive)")
    p.add_argument("--topk", type=int_in(1), help=f"classes to print per image (default: {DEFAULT_TOPK})")
    p.add_argument("--labels", metavar="FILE", help="text file: one class name a line, in class-index order")
    p.add_argument("--threads", type=int_in(1), default=1,
                   help="intra-op CPU threads (default: 1); above the CPU count warns, and onnxruntime is capped")
    p.add_argument("--precision", choices=("fp32", "low"), default="fp32",
                   help="arithmetic: fp32, or low = fp16/bf16 where the CPU supports it (MNN: ARMv8.2+; OpenVINO: "
                        "also bf16 on AVX512_BF16/AMX x86); onnxruntime runs fp32 only")
    p.add_argument("--winograd", choices=("accurate", "fast"), default="accurate",
                   help="MNN 3x3 convs: accurate = F(2,3) Winograd only (what the parity gate checks), fast = "
                        "MNN's default F(6,3) tiles (accurate took 1.12x as long on efficientnetv2_s; fast is ~1e-3 "
                        "off in float32)")
    p.add_argument("--engine", "--backend", dest="engine", choices=ENGINE_CHOICES, default="auto",
                   help="auto = from the file extension (.mnn: mnn, .onnx: onnxruntime); openvino runs a .onnx file "
                        "(pip install openvino); --backend is its former name")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--bench", type=int_in(0, MAX_BENCH_RUNS), default=0, metavar="N",
                   help="also time N inferences on the first image: load time, latency median / p90")
    return p.parse_args(argv)


def infer_one(predictor: Predictor, path: str, topk: int, labels) -> dict:
    if predictor.meta.get("task", "classification") == "classification":
        (top,) = predictor.classify(path, topk=topk, labels=labels)
        keys = ("index", "prob", "label")
        return {"image": path, "topk": [dict(zip(keys, t)) for t in top]}
    outputs = predictor.run(predictor.preprocess(path))
    return {"image": path, "outputs": {name: list(y.shape) for name, y in outputs.items()}}


def format_result(result: dict) -> str:
    if "outputs" in result:
        return result["image"] + ": " + "  ".join(f"{n} {s}" for n, s in result["outputs"].items())
    lines = [result["image"]]
    for t in result["topk"]:
        lines.append(f"  {t['prob']:.4f}  {t['index']:>5d}  {t.get('label', '')}".rstrip())
    return "\n".join(lines)


def bench(predictor: Predictor, path: str, runs: int) -> dict:
    t = time.perf_counter()
    x = predictor.preprocess(path)
    preprocess_ms = (time.perf_counter() - t) * 1e3
    for _ in range(min(3, runs)):  # warm-up: first calls allocate and pack weights
        predictor.run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        predictor.run(x)
        times.append((time.perf_counter() - t) * 1e3)
    return {"runs": runs, "preprocess_ms": preprocess_ms, "median_ms": float(np.median(times)),
            "p90_ms": float(np.percentile(times, 90))}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        t = time.perf_counter()
        predictor = load(args.model, engine=args.engine, threads=args.threads, precision=args.precision,
                         winograd=args.winograd)
        load_ms = (time.perf_counter() - t) * 1e3
        predictor.require_metadata()
        if predictor.meta.get("task", "classification") != "classification":
            given = [o for o, v in (("--labels", args.labels), ("--topk", args.topk)) if v is not None]
            if given:
                raise EdgeRuntimeError(f"{' and '.join(given)}: for classifiers only; {args.model} is a "
                                       f"{predictor.meta['task']} model (it prints output shapes): drop them")
        labels = read_labels(args.labels) if args.labels else None
        n_classes = predictor.meta.get("num_classes")
        if labels is not None and n_classes and len(labels) != n_classes:
            raise EdgeRuntimeError(f"{args.labels}: {len(labels)} labels; the model has {n_classes} classes")
        paths = expand_images(args.images)
    except EdgeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    results, failed = for_each_image(paths, lambda path: infer_one(predictor, path, args.topk or DEFAULT_TOPK,
                                                                  labels), format_result, args.json)

    timing = None
    ok = [r["image"] for r in results if "error" not in r]
    if args.bench and ok:
        timing = {"load_ms": load_ms, **bench(predictor, ok[0], args.bench)}
        if not args.json:
            print(f"bench ({predictor.backend}, threads={predictor.threads}, precision={args.precision}): "
                  f"load {timing['load_ms']:.1f} ms, preprocess {timing['preprocess_ms']:.1f} ms, "
                  f"inference median {timing['median_ms']:.2f} ms, p90 {timing['p90_ms']:.2f} ms "
                  f"over {args.bench} runs")
    if args.json:
        doc = {"model": args.model, "backend": predictor.backend, "meta": predictor.meta, "results": results}
        if timing:
            doc["bench"] = timing
        print(json.dumps(doc, indent=2))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
