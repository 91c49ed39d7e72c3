"""ARM parity without a board: every .mnn of an artifact dir, run by MNN's aarch64 kernels under qemu-user,
against host ONNX Runtime on model.onnx.

    python -m benchmarks.arm.parity [ARTIFACT_DIR ...] [--cpus cortex-a53 neoverse-n1] [--fp16-gate 3e-2]

Default dirs: artifacts/*/*/ holding a .mnn. For each file × CPU × MNN precision (normal, low) the error is
max|Δ|/max|ref| over all outputs; the gate is the fp32 one unless fp16 is involved (fp16-stored weights, or
precision "low" on a CPU whose MNN build runs fp16 arithmetic), where the fp16 gate and top-1 agreement apply.
int8 weight-only files are compared with host (x86) MNN running the same file, so the row measures the ARM
kernels rather than quantisation error. Writes arm_parity.json into each dir and prints a table; exit 1 when
a gate fails.
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

from models.errors import EdgeportError
from runtime.engines import mnn_runtime_manager, stdout_silenced

from .run import PRECISIONS, guest_infer, versions

FP32_GATE, FP16_GATE = 1e-4, 3e-2
DEFAULT_CPUS = ("cortex-a53", "neoverse-n1")  # ARMv8.0 (no fp16 arithmetic), ARMv8.2 (fp16, dotprod)
QUICK_CONFIGS = (("cortex-a53", "normal"), ("neoverse-n1", "low"))


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


def mnn_host_reference(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The same .mnn on host (x86) MNN, fp32, batch 1 per sample."""
    with stdout_silenced():
        import MNN

        F = MNN.expr
        rt = mnn_runtime_manager()  # fp32, 1 thread, F(2,3) tiles: as runtime.load does
        mod = MNN.nn.load_module_from_file(str(path), [], [], runtime_manager=rt)
        names = list(mod.get_info()["outputNames"])
        rows = []
        for i in range(len(x)):
            outs = mod.forward([F.const(x[i:i + 1], list(x[i:i + 1].shape), F.NCHW, F.float)])
            rows.append([np.array(F.convert(o, F.NCHW).read(), dtype=np.float32) for o in outs])
    return {n: np.concatenate([r[k] for r in rows]) for k, n in enumerate(names)}


def weights_kind(path: Path) -> str:
    """fp32 | fp16 | int8w, from the artifact file name (model.fp16.mnn, model.int8w.mnn) or its bizCode."""
    parts = path.name.split(".")
    if len(parts) == 3 and parts[1] in ("fp16", "int8w", "fp32"):
        return parts[1]
    biz = mnn_info(path).get("bizCode") or ""
    return json.loads(biz).get("precision", "fp32") if biz.startswith("{") else "fp32"


def compare(out: dict, ref: dict, classification: bool) -> dict:
    missing = set(ref) - set(out)
    if missing:
        raise EdgeportError(f"ARM outputs lack {sorted(missing)}: the .mnn and model.onnx name outputs "
                            "differently; re-export both")
    err = max(float(np.abs(out[n].astype(np.float64) - ref[n]).max()) for n in ref)
    scale = max(float(np.abs(ref[n]).max()) for n in ref)
    top1 = None
    if classification:
        name = next(iter(ref))
        top1 = float((out[name].argmax(1) == ref[name].argmax(1)).mean())
    return {"max_abs_err": err, "rel_err": err / max(scale, 1e-12), "top1_agreement": top1}


def check_dir(artifact_dir, cpus=DEFAULT_CPUS, precisions=PRECISIONS, fp32_gate=FP32_GATE,
              fp16_gate=FP16_GATE, n_images=3, n_random=1, files=None, configs=None, cache=None,
              log=print) -> dict:
    """Run the parity matrix for one artifact dir; returns the report (also written to arm_parity.json).

    `configs`, a list of (cpu, precision) pairs, replaces the cpus × precisions product."""
    from export.inputs import sample_batch

    d = Path(artifact_dir)
    mnn_files = [d / f for f in files] if files else \
        sorted(d.glob("*.mnn"), key=lambda p: (p.name != "model.mnn", p.name))
    if not mnn_files:
        raise EdgeportError(f"no .mnn file in {d}; export the model first (make export)")
    if not (d / "model.onnx").is_file():
        raise EdgeportError(f"{d / 'model.onnx'} missing: ARM parity compares against ONNX Runtime on it")
    meta = read_metadata(d)
    x = sample_batch(meta, n_images=n_images, n_random=n_random)
    classification = meta.get("task", "classification") == "classification"
    ort_ref = onnx_reference(d / "model.onnx", x, list(meta["output_names"]))
    rows, checks, guest_versions = [], [], {}
    for path in mnn_files:
        kind = weights_kind(path)
        if kind == "int8w":
            ref, ref_name = mnn_host_reference(path, x), "mnn-x86"
        else:
            ref, ref_name = ort_ref, "onnxruntime"
        by_cpu: dict[tuple[str, str], dict] = {}
        for cpu, precision in configs or [(c, p) for c in cpus for p in precisions]:
            t0 = time.perf_counter()
            run = guest_infer(path, x, cpu, precision, cache=cache)
            guest_versions = run.versions
            by_cpu[cpu, precision] = run.outputs
            compute = "fp16" if precision == "low" and run.device.get("fp16") else "fp32"
            gate_kind = "fp16" if "fp16" in (compute, kind) else "fp32"
            gate = fp16_gate if gate_kind == "fp16" else fp32_gate
            m = compare(run.outputs, ref, classification)
            ok = m["rel_err"] <= gate and (gate_kind == "fp32" or m["top1_agreement"] in (None, 1.0))
            row = {"file": path.name, "weights": kind, "cpu": cpu, "precision": precision,
                   "compute": compute, "device": run.device, "reference": ref_name, **m,
                   "gate_kind": gate_kind, "gate": gate, "passed": bool(ok),
                   "emulated_seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            log(format_row(row))
            if precision == "low" and compute == "fp32" and (cpu, "normal") in by_cpu:
                same = all(np.array_equal(v, by_cpu[cpu, "normal"][n]) for n, v in run.outputs.items())
                checks.append({"file": path.name, "cpu": cpu, "low_equals_normal": bool(same)})
    report = {"dir": str(d), "model": meta.get("model"), "task": meta.get("task"),
              "inputs": f"export.inputs.sample_batch(n_images={n_images}, n_random={n_random}, seed=0)",
              "n_inputs": int(len(x)), "gates": {"fp32_rel": fp32_gate, "fp16_rel": fp16_gate,
                                                 "fp16_top1_agreement": 1.0},
              "versions": {**versions(cache), **guest_versions}, "rows": rows,
              "no_fp16_path_checks": checks, "passed": all(r["passed"] for r in rows),
              "note": "emulated_seconds is qemu wall time: not a proxy for ARM latency"}
    write_json(d / "arm_parity.json", report)
    return report


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


HEADER = f"{'file':<20} {'cpu':<12} {'prec':<6} {'compute':<7} {'ref':<11} {'rel_err':>9} {'top1':>5} " \
         f"{'gate':>7}  result"


def format_row(r: dict) -> str:
    top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.2f}"
    return (f"{r['file']:<20} {r['cpu']:<12} {r['precision']:<6} {r['compute']:<7} {r['reference']:<11} "
            f"{r['rel_err']:>9.2e} {top1:>5} {r['gate']:>7.0e}  {'ok' if r['passed'] else 'FAIL'}")


def default_dirs(root="artifacts") -> list[str]:
    return sorted({os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "*", "*.mnn"))})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="MNN aarch64 parity under qemu-user vs host ONNX Runtime")
    p.add_argument("dirs", nargs="*", help="artifact dirs (default: artifacts/*/*/ with a .mnn)")
    p.add_argument("--cpus", nargs="+", default=list(DEFAULT_CPUS), help="qemu -cpu models")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--fp32-gate", type=float, default=FP32_GATE, help="max rel error, fp32 compute")
    p.add_argument("--fp16-gate", type=float, default=FP16_GATE, help="max rel error where fp16 is involved")
    p.add_argument("--quick", action="store_true",
                   help="only cortex-a53/normal (fp32) and neoverse-n1/low (fp16): the CI-sized matrix")
    p.add_argument("--n-images", type=int, default=3)
    p.add_argument("--n-random", type=int, default=1)
    p.add_argument("--cache", default=None, help="ARM environment dir (default .cache/arm)")
    a = p.parse_args(argv)
    try:
        dirs = a.dirs or default_dirs()
        if not dirs:
            raise EdgeportError("no artifact dir with a .mnn under artifacts/; run `make export` or pass one")
        failed = []
        for d in dirs:
            print(f"\n{d}\n{HEADER}", flush=True)
            report = check_dir(d, a.cpus, a.precisions, a.fp32_gate, a.fp16_gate, a.n_images, a.n_random,
                               configs=QUICK_CONFIGS if a.quick else None, cache=a.cache,
                               log=lambda s: print(s, flush=True))
            for c in report["no_fp16_path_checks"]:
                print(f"{c['file']} on {c['cpu']}: precision low == normal bit-exact: "
                      f"{c['low_equals_normal']}")
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
