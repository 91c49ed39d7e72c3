"""ARM parity without a board: every MNN and onnxruntime target of an artifact dir, run by the engines' aarch64
kernels under qemu-user, judged exactly as on the host: the same targets (export.targets), reference, metrics and
gates (export.parity.judge).

    python -m benchmarks.arm.parity [ARTIFACT_DIR ...] [--cpus cortex-a53 neoverse-n1] [--quick] [--gates JSON]
                                    [--targets NAME ...] [--n-images N] [--n-random M] [--seed S]

Default dirs: artifacts/*/*/ holding a .mnn; default targets: those the dir's manifest lists (else every MNN
and onnxruntime target whose file is there: model.onnx is `ort`, model.int8.onnx `ort_int8`). The reference is
the PyTorch training form rebuilt from the directory's manifest (as `python -m export.parity` does); a directory
without a manifest (benchmarks.arm.tiny) is judged against ONNX Runtime on the host on its model.onnx, and the
report says so. Each target runs on every CPU (--quick: MNN's fp32-arithmetic targets on cortex-a53, ARMv8.0;
precision-'low' targets on neoverse-n1, ARMv8.2 with fp16 arithmetic; onnxruntime's on cortex-a76, Raspberry
Pi 5). MNN runs under the host's qemu-user, onnxruntime under qemu 10 (its wheel crashes under qemu 7.2; see
benchmarks/arm/run.py). Writes arm_parity.json into each dir and prints a table; exit 1 when a gate fails.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from export import targets
from export.detection_parity import detection_gates
from export.parity import held_out_inputs, judge, manifest_targets, merge_gates, reference_outputs
from models.errors import EdgeportError
from runtime.atomic import write_json
from runtime.cli import OneLineParser, int_in
from runtime.engines import stdout_silenced

from .run import guest_infer, versions

DEFAULT_CPUS = ("cortex-a53", "neoverse-n1")  # ARMv8.0 (no fp16 arithmetic), ARMv8.2 (fp16, dotprod)
QUICK_CPU = {"fp32": "cortex-a53", "low": "neoverse-n1"}  # MNN target precision → the CPU that exercises it
ORT_QUICK_CPU = "cortex-a76"  # Raspberry Pi 5: onnxruntime's MLAS picks its ARMv8.2 kernels (dotprod, fp16)
MNN_PRECISION = {"fp32": "normal", "low": "low"}  # runtime.load precision → MNN's own name
ENGINES = ("mnn", "onnxruntime")  # the engines the aarch64 guest runs


def quick_cpu(target) -> str:
    return ORT_QUICK_CPU if target.engine == "onnxruntime" else QUICK_CPU[target.precision]


def read_metadata(artifact_dir: Path) -> dict:
    """The edgeport metadata JSON: ONNX metadata_props "edgeport", else the bizCode of model.mnn."""
    onnx_path = artifact_dir / "model.onnx"
    if onnx_path.is_file():
        import onnxruntime as ort

        props = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]) \
            .get_modelmeta().custom_metadata_map
        if "edgeport" in props:
            return json.loads(props["edgeport"])
    for mnn in sorted(artifact_dir.glob("*.mnn")):
        biz = mnn_info(mnn).get("bizCode") or ""
        if biz.startswith("{"):
            return json.loads(biz)
    raise EdgeportError(f"no edgeport metadata in {artifact_dir} (model.onnx metadata or .mnn bizCode); "
                        "re-export it with `make export`")


def mnn_info(path: Path) -> dict:
    with stdout_silenced():
        import MNN

        return MNN.nn.load_module_from_file(str(path), [], []).get_info()


def onnx_reference(onnx_path: Path, x: np.ndarray, output_names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    rows = [sess.run(output_names, {in_name: x[i:i + 1]}) for i in range(len(x))]
    return {n: np.concatenate([r[k] for r in rows]) for k, n in enumerate(output_names)}


def reference_for(d: Path, meta: dict):
    """(outputs_of(x), name) of the reference: PyTorch rebuilt from the manifest's source, else ONNX Runtime."""
    if (d / "manifest.json").is_file():
        from export.schemas import read_manifest
        from export.source import build_models

        reference, _, _ = build_models(read_manifest(d)["source"])
        return (lambda x: reference_outputs(reference, x, meta)), "pytorch"
    return (lambda x: onnx_reference(d / "model.onnx", x, list(meta["output_names"]))), "onnxruntime"


def guest_targets(d: Path, names=None) -> list:
    """The MNN and onnxruntime targets whose file is in `d`: those named, if `names`; else those its manifest says
    were exported (a detector's default export leaves out targets that share a file with one it ships); else
    every one."""
    if names is None and (d / "manifest.json").is_file():
        from export.schemas import ManifestTargets, read_manifest

        names = manifest_targets(read_manifest(d, ManifestTargets))
    found = [t for t in targets.ARTIFACTS if t.engine in ENGINES and (d / t.file).is_file()]
    return [t for t in found if names is None or t.name in names]


def check_dir(artifact_dir, cpus=DEFAULT_CPUS, quick: bool = False, target_names=None, gates=None,
              n_images=3, n_random=1, cache=None, log=print, seed: int = 0) -> dict:
    """Run the ARM parity matrix for one artifact dir; returns the report (also written to arm_parity.json)."""
    from export.inputs import sample_batch

    d = Path(artifact_dir)
    chosen = guest_targets(d, target_names)
    if not chosen:
        raise EdgeportError(f"no MNN or ONNX target file in {d}; export the model first (make export)")
    gates = merge_gates(gates)
    meta = read_metadata(d)
    x = {"parity": sample_batch(meta, n_images=n_images, n_random=n_random, seed=seed)}
    if any(t.inputs == "held_out" for t in chosen):  # int8: images never calibrated on, as on the host
        x["held_out"] = held_out_inputs(meta, n_images + n_random)
    classifier = meta.get("task", "classification") == "classification"
    reference_of, ref_name = reference_for(d, meta)
    ref = {kind: reference_of(inputs) for kind, inputs in x.items()}
    rows, guest_versions, by_run = [], {}, {}
    for target in chosen:
        for cpu in [quick_cpu(target)] if quick else cpus:
            t0 = time.perf_counter()
            key = (target.file, cpu, target.precision, target.inputs)
            if key not in by_run:
                by_run[key] = guest_infer(d / target.file, x[target.inputs], cpu, MNN_PRECISION[target.precision],
                                          cache=cache)
            run = by_run[key]
            guest_versions = {k: v for k, v in run.versions.items() if k not in ("engine", "qemu_used")}
            compute = "fp16" if target.precision == "low" and run.device.get("fp16") else \
                "int8" if target.engine == "onnxruntime" and target.compute == "int8" else "fp32"
            metrics, breaches = judge(target.name, ref[target.inputs], run.outputs, gates[target.name], classifier,
                                      meta)
            raw = [m for m in metrics.values() if "max_rel" in m]  # a detector's "detections" entry has none
            worst = max(raw, key=lambda m: m["max_rel"]) if raw else {}
            judged = detection_gates(target.name, gates[target.name]) if "detections" in metrics \
                else gates[target.name]
            row = {"target": target.name, "file": target.file, "engine": target.engine, "cpu": cpu,
                   "precision": target.precision, "compute": compute, "qemu": run.versions.get("qemu_used"),
                   "device": run.device, "reference": ref_name, "metrics": metrics,
                   "max_rel": worst.get("max_rel"), "top1": worst.get("top1"), "gates": judged,
                   "breaches": breaches, "passed": not breaches,
                   "emulated_seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            log(format_row(row))
    report = {"dir": str(d), "model": meta.get("model"), "task": meta.get("task"), "reference": ref_name,
              "inputs": f"export.inputs.sample_batch(n_images={n_images}, n_random={n_random}, seed={seed})"
                        + (f"; int8 targets: export.parity.held_out_inputs(n={len(x['held_out'])})"
                           if "held_out" in x else ""),
              "n_inputs": int(len(x["parity"])), "versions": {**versions(cache), **guest_versions}, "rows": rows,
              "passed": all(r["passed"] for r in rows),
              "note": "gates and metrics are export.parity's (export.targets); emulated_seconds is qemu wall "
                      "time: not a proxy for ARM latency"}
    write_json(d / "arm_parity.json", report)
    return report


HEADER = f"{'target':<14} {'file':<16} {'cpu':<12} {'compute':<7} {'reference':<11} {'max_rel':>9} {'top1':>5}  " \
         "gate   (detectors: box px in the max_rel column, score error in the top1 column; int8: the worst " \
         "cosine in the max_rel column)"


def format_row(r: dict) -> str:
    from export.parity import gate_text

    top1 = "-" if r["top1"] is None else f"{r['top1']:.2f}"
    err = "-" if r["max_rel"] is None else f"{r['max_rel']:.2e}"
    det = r["metrics"].get("detections")
    if "cosine" in r["gates"]:  # int8 is judged on cosine, not on max_rel
        err = f"{min(m['cosine'] for m in r['metrics'].values() if 'cosine' in m):.5f}"
    if det:  # a detector is judged on these, not on max_rel
        err, top1 = f"{det['box_px']:.3g}px", f"{det['score']:.2g}"
    return (f"{r['target']:<14} {r['file']:<16} {r['cpu']:<12} {r['compute']:<7} {r['reference']:<11} "
            f"{err:>9} {top1:>5}  {gate_text(r['gates'])}  {'ok' if r['passed'] else 'FAIL'}")


def default_dirs(root="artifacts") -> list[str]:
    found = glob.glob(os.path.join(root, "*", "*", "*.mnn")) + glob.glob(os.path.join(root, "*", "*", "model.onnx"))
    return sorted({os.path.dirname(p) for p in found})


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m benchmarks.arm.parity", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="artifact dirs (default: artifacts/*/*/ with a .mnn or model.onnx)")
    p.add_argument("--cpus", nargs="+", default=list(DEFAULT_CPUS), help="qemu -cpu models")
    p.add_argument("--targets", nargs="+", default=None,
                   help="MNN and onnxruntime targets to run, e.g. ort mnn_fp32 (default: those the manifest "
                        "lists, else every one present)")
    p.add_argument("--gates", help='JSON object laid over the targets\' gates, e.g. {"mnn_low": {"max_rel": 1e-2}}')
    p.add_argument("--quick", action="store_true",
                   help=f"MNN fp32 targets on cortex-a53 only, precision-low targets on neoverse-n1 only, "
                        f"onnxruntime targets on {ORT_QUICK_CPU} only (CI-sized)")
    p.add_argument("--n-images", type=int_in(1, 64), default=3, help="bundled photos, in order (default 3)")
    p.add_argument("--n-random", type=int_in(0, 64), default=1,
                   help="random inputs after them (a detector's: mosaics; default 1)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--cache", default=None, help="ARM environment dir (default .cache/arm)")
    a = p.parse_args(argv)
    try:
        from export.parity import _load_gates

        gates = _load_gates(a.gates)
        known = [t.name for t in targets.ARTIFACTS if t.engine in ENGINES]
        unknown = [n for n in a.targets or () if n not in known]
        if unknown:
            raise EdgeportError(f"--targets {' '.join(unknown)}: not an MNN or onnxruntime target "
                                f"({', '.join(known)}); artifact dirs go before --targets, or after --")
        dirs = a.dirs or default_dirs()
        if not dirs:
            raise EdgeportError("no artifact dir with a .mnn or model.onnx under artifacts/; run `make export` or "
                                "pass one")
        failed = []
        for d in dirs:
            print(f"\n{d}\n{HEADER}", flush=True)
            report = check_dir(d, a.cpus, a.quick, a.targets, gates, a.n_images, a.n_random, cache=a.cache,
                               log=lambda s: print(s, flush=True), seed=a.seed)
            print(f"-> {Path(d) / 'arm_parity.json'}")
            if not report["passed"]:
                failed.append(d)
    except EdgeportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"\nARM parity FAILED in: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\nARM parity passed ({len(dirs)} dir(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
