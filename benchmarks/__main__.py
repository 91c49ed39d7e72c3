"""CPU latency of every inference form against the fc baseline (classifiers, and YOLO11 detectors per backbone
form), int8 against fp32 and fp16, the FasterNet paper's operator table, the SGEMM roofline and the seed claims;
writes results.json, report.md, PNG plots and recommendation.json.

  python -m benchmarks [--models ...] [--full | --detectors ... --precision-models ...] [--iters N]
                       [--threads 1,all] [--engines ort,mnn,openvino] [--quick] [--out DIR]

By default the classifier forms at 1 thread, the operator table, the roofline and the seed checks run (minutes:
`make bench`). --full (`make bench-full`) adds 2-thread timings, the MNN per-op profile and GELU forms, and the
detector and precision sections (tens of minutes: 22 exports at 640², int8 fallback searches); each can also be
asked for alone (--threads 1,all, --mnn-profile, --detectors, --precision-models).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from models.errors import EdgeportError
from runtime import EdgeRuntimeError

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"
DEFAULT_MODELS = ("fasternet_t0", "convnext_atto", "inception_next_atto", "efficientnetv2_s")
QUICK_OP_SHAPES = ((32, 16),)
DEFAULT_DETECTORS = ("yolo11n_fasternet_t0", "yolo11n_inception_next_atto")
DETECTOR_REFERENCES = ("yolo11n",)  # plain YOLO11n (its own backbone): timed in the detectors' rounds
DETECTOR_ENGINES = ("ort", "mnn", "openvino")
# A detector round is ~11 forms × 0.1–0.3 s: the per-group budget is this many times the classifiers'.
DETECTOR_BUDGET_FACTOR = 3


def _csv(values) -> list[str]:
    return [v for item in ([values] if isinstance(values, str) else values) for v in item.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="model names (space or comma separated), or 'all' for every registered variant "
                        f"(default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--iters", type=int, help="interleaved timed rounds (default 20; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 3; --quick 1)")
    p.add_argument("--threads", help="thread counts, 'all' = every CPU (default 1; with --full 1,all)")
    p.add_argument("--engines", default="ort,mnn,openvino",
                   help="subset of torch,ort,mnn,openvino (default ort,mnn,openvino: the engines a board runs; "
                        "torch, PyTorch eager, on request); ort, mnn and openvino run in the same interleaved rounds, "
                        "so every form has a paired ratio to ONNX Runtime")
    p.add_argument("--forms", help="only these form tags, e.g. split_cat-conv,fc (the baseline always runs)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds per (model, engine, threads) group; past it, stop after 3 rounds "
                        "(default 10; 0 = no limit)")
    p.add_argument("--img", type=int, help="input size (default: each model's own; --quick 64)")
    p.add_argument("--full", action="store_true",
                   help="also 2-thread timings, the MNN profile, the detector and precision sections with their "
                        "defaults (make bench-full; tens of minutes on a first run)")
    p.add_argument("--mnn-profile", action="store_true",
                   help="also MNN's per-op profile and GELU forms of each model (~1 min per model; on with --full)")
    p.add_argument("--detectors", nargs="+",
                   help="detectors timed per backbone form at 1 thread, ONNX Runtime and MNN, beside plain "
                        f"yolo11n (default: none; with --full {' '.join(DEFAULT_DETECTORS)})")
    p.add_argument("--det-img", type=int, help="detector input size (default 640; --quick 128)")
    p.add_argument("--precision-models", nargs="+",
                   help="models whose fp32 / fp16 / int8 files are timed against each other at 1 thread "
                        "(default: none; with --full the --models)")
    p.add_argument("--precision-targets",
                   help="of ort,ort_int8,mnn_fp32,mnn_fp16w,mnn_int8w,mnn_int8,openvino,openvino_int8 (default all; "
                        "--quick: all but the calibrated int8 ones, whose fallback search takes minutes)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds, 64² input, one small operator shape, short roofline")
    p.add_argument("--out", help="output directory (default benchmarks/results; --quick: .cache/bench/quick)")
    p.add_argument("--cache", default=str(CACHE), help="export cache, or 'none' (a temporary directory)")
    p.add_argument("--no-ops", action="store_true", help="skip the operator table")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="measure nothing: rewrite report, plots and recommendation from a results.json "
                        "(into --out, default its own directory)")
    args = p.parse_args(argv)
    args.quick_defaults = ({"iters": 2, "warmup": 1, "img": 64, "det_img": 128,
                            "precision_targets": "ort,mnn_fp32,mnn_fp16w,mnn_int8w"} if args.quick
                           else {"iters": 20, "warmup": 3, "det_img": 640})
    args.quick_defaults["threads"] = "1,all" if args.full else "1"
    args.mnn_profile = args.mnn_profile or args.full
    for key, value in args.quick_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def model_names(values, default=None) -> list[str]:
    """Names from the command line ('all': every registered classifier; 'none': nothing), checked."""
    import models

    names = _csv(values) if values is not None else list(default or [])
    if names == ["none"]:
        return []
    if names == ["all"]:
        names = [n for n in models.list_models() if not models.get_cfg(n).extra.get("alias_of")
                 and not models.get_cfg(n).extra.get("from_checkpoint")
                 and models.get_cfg(n).extra.get("task") != "detection"]
    for name in names:
        models.get_cfg(name)  # unknown names fail here, before any work
    return names


def precision_targets(values) -> list[str] | None:
    """The precision section's targets (None: all); each engine's fp32 file stays, as the ratios' baseline."""
    from benchmarks.precision import PRECISION_TARGETS

    if values is None:
        return None
    names = _csv(values)
    known = [t for group in PRECISION_TARGETS.values() for t in group]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise EdgeportError(f"unknown --precision-targets {','.join(bad) or '(empty)'}; use a subset of "
                            f"{','.join(known)}")
    return names


def resolve(args) -> tuple[list[str], list[int], list[str]]:
    from benchmarks.forms import ENGINES

    names = model_names(args.models)
    args.detector_names = model_names(args.detectors, default=DEFAULT_DETECTORS if args.full else ())
    args.precision_names = model_names(args.precision_models, default=names if args.full else ())
    args.precision_target_names = precision_targets(args.precision_targets)
    try:
        threads = sorted({(os.cpu_count() or 1) if t == "all" else int(t) for t in _csv(args.threads)})
    except ValueError:
        raise EdgeportError(f"--threads {args.threads}: use positive counts or 'all', e.g. 1,all") from None
    engines = _csv(args.engines)
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise EdgeportError(f"unknown --engines {','.join(bad) or '(empty)'}; "
                            f"use a subset of {','.join(ENGINES)}")
    if not threads or threads[0] < 1:
        raise EdgeportError(f"--threads {args.threads}: use positive counts or 'all', e.g. 1,all")
    if args.det_img < 32 or args.det_img % 32:
        raise EdgeportError(f"--det-img {args.det_img} must be a positive multiple of 32 (the total stride)")
    if args.iters < 1 or args.warmup < 0 or args.budget < 0:
        raise EdgeportError("--iters must be at least 1, --warmup and --budget at least 0")
    return names, threads, engines


def measured_at(before: dict | None = None) -> dict:
    """When a section's model was measured and the load around it (sections can be re-run and merged alone)."""
    from .timing import load_average

    now = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load": load_average()}
    return now if before is None else {"date": before["date"], "load_start": before["load"],
                                       "load_end": now["load"]}


def write_outputs(results: dict, out: Path) -> dict:
    """Derived numbers, recommendation, plots and report from the measurements; every file replaced whole."""
    from runtime.atomic import write_atomic, write_json

    from .plots import make_plots
    from .report import add_roofline, recommend, render, seed003

    results.pop("recommendation", None)
    add_roofline(results)
    results["seed_checks"]["seed003"] = seed003(results)
    rec = recommend(results)
    plots = make_plots(results, out)
    markdown = render(results, rec, plots)
    results["recommendation"] = rec
    write_json(out / "results.json", results)
    write_json(out / "recommendation.json", rec)
    write_atomic(out / "report.md", markdown)
    return rec


def rerender(args) -> tuple[dict, Path]:
    path = Path(args.from_results)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgeportError(f"--from-results {path}: not a readable results.json ({type(e).__name__})") from None
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, out)
    return results, out


def run(args, log) -> tuple[dict, Path]:
    from export.manifest import tool_versions

    from .forms import bench_model
    from .ops import SHAPES, operator_table
    from .precision import PRECISION_TARGETS, bench_precision
    from .roofline import fma_peak, sgemm_by_engine, sgemm_gflops
    from .seed_checks import seed000_table
    from .timing import host_info, load_average

    names, threads, engines = resolve(args)
    out = Path(args.out) if args.out else (CACHE / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    roof_kw = {"n": 256, "seconds": 0.1} if args.quick else {}
    results = {
        "host": host_info(), "loadavg": {"start": load_average()}, "versions": tool_versions(),
        "settings": {"models": names, "iters": args.iters, "warmup": args.warmup, "threads": threads,
                     "engines": engines, "img": args.img, "forms": args.forms,
                     "detectors": args.detector_names, "det_img": args.det_img,
                     "det_engines": [e for e in engines if e in DETECTOR_ENGINES], "det_threads": threads[0],
                     "det_budget_s": args.budget * DETECTOR_BUDGET_FACTOR or None,
                     "precision_models": args.precision_names, "precision_threads": threads[0],
                     "precision_targets": args.precision_target_names,
                     "budget_s": args.budget or None, "calibrated": True,
                     "quick": args.quick, "batch": 1, "precision": "fp32",
                     "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_"))}},
        "roofline": {}, "models": {}, "detectors": {}, "precision": {}, "mnn": {}, "operators": {},
        "seed_checks": {},
    }
    seconds, mark = {}, [start]

    def stage(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - mark[0]
        mark[0] = now

    log(f"roofline: SGEMM at {threads} threads")
    roof_start = {str(t): sgemm_gflops(t, **roof_kw) for t in threads}
    stage("roofline")
    cache = None if args.cache == "none" else Path(args.cache)
    only = set(_csv(args.forms)) if args.forms else None
    for name in names:
        log(f"{name}: build forms")
        results["models"][name] = bench_model(name, engines, threads, args.iters, args.warmup, args.img,
                                              cache, only, args.budget or None, log=log)
        stage("models")
        if "mnn" in engines and args.mnn_profile:
            from export.pipeline import resolve_forms

            from .gelu import bench_mnn

            pconv, mlp, _ = resolve_forms(name, "auto", "auto")
            log(f"{name}: MNN per-op profile and GELU forms ({pconv}-{mlp})")
            before = measured_at()
            results["mnn"][name] = bench_mnn(name, pconv, mlp, args.iters, args.warmup, args.img,
                                             args.budget or None)
            results["mnn"][name]["measured"] = measured_at(before)
            stage("mnn")
    det_engines = results["settings"]["det_engines"]
    for name in args.detector_names if det_engines else []:
        log(f"{name}: build backbone forms at {args.det_img}²")
        before = measured_at()
        results["detectors"][name] = bench_model(
            name, det_engines, threads[:1], args.iters, args.warmup, args.det_img, cache, only,
            args.budget * DETECTOR_BUDGET_FACTOR or None, log=log, references=DETECTOR_REFERENCES)
        results["detectors"][name]["measured"] = measured_at(before)
        stage("detectors")
    for name in args.precision_names if set(engines) & set(PRECISION_TARGETS) else []:
        log(f"{name}: int8 / fp16 / fp32 files")
        before = measured_at()
        results["precision"][name] = bench_precision(name, engines, threads[0], args.iters, args.warmup,
                                                     args.img, cache, args.budget or None,
                                                     parity_images=4 if args.quick else 16, log=log,
                                                     only=args.precision_target_names)
        results["precision"][name]["measured"] = measured_at(before)
        stage("precision")
    if not args.no_ops:
        for t in threads:
            log(f"operator table, {t} thread(s)")
            results["operators"][str(t)] = operator_table(iters=args.iters, threads=t,
                                                          shapes=QUICK_OP_SHAPES if args.quick else SHAPES)
        stage("operators")
    log("seed checks")
    results["seed_checks"]["seed000"] = seed000_table()
    stage("seed checks")
    roof_end = {str(t): sgemm_gflops(t, **roof_kw) for t in threads}
    stage("roofline")
    # The roof is the best the machine showed: measured at both ends because other load comes and goes, and
    # never below the roof at fewer threads (a shared machine can make 2 threads slower than 1).
    best = {t: max(roof_start[t], roof_end[t]) for t in roof_start}
    roof = {t: max(g for u, g in best.items() if int(u) <= int(t)) for t in best}
    results["roofline"] = {"gflops": roof, "start": roof_start, "end": roof_end, "n": roof_kw.get("n", 1024),
                           "by_engine": {str(t): sgemm_by_engine(t, **roof_kw) for t in threads},
                           "fma_peak": {str(t): fma_peak(t) for t in threads}}
    results["loadavg"]["end"] = load_average()
    results["wall_s"] = time.perf_counter() - start
    results["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    write_outputs(results, out)
    return results, out


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    try:
        results, out = rerender(args) if args.from_results else run(args, log)
    except (EdgeportError, EdgeRuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    took = "re-rendered" if args.from_results else f"in {results['wall_s'] / 60:.1f} min"
    log(f"wrote {out}/{{results.json,report.md,recommendation.json,*.png}} {took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
