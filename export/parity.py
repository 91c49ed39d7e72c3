"""Parity suite: every artifact proven equal to its PyTorch source, with the first diverging layer on failure.

The same inputs (photos through the model's own preprocessing plus seeded random tensors) run through the
PyTorch training form (eval, the reference) → PyTorch inference form → ONNX Runtime (model.onnx) → MNN fp32,
fp16-weight, int8-weight and precision="low" artifacts. Every backend is compared against the reference; a
gate breach names the backend, metric and value, and bisection finds the first node that diverges.

    python -m export.parity artifacts/fasternet_t0/split_cat-fc [--gates JSON] [--n-images N] [--json]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from models.errors import EdgeportError
from runtime.engines import stdout_silenced

from .inputs import sample_batch
from .metrics import LOWER_BOUNDED, check_gates, compare, max_rel, validate_gates

REFERENCE = "PyTorch training form (eval)"
N_RANDOM = 4
DEFAULT_GATES = {
    "torch_inference": {"max_rel": 1e-5},
    "ort": {"max_rel": 1e-5},
    "mnn_fp32": {"max_rel": 1e-4},
    "mnn_fp16w": {"max_rel": 1e-2},
    "mnn_int8w": {"max_rel": 5e-2, "top1": 0.9},
    "mnn_low": {"max_rel": 3e-2},
}
# backend → (file, runtime backend, runtime precision, the stage it was made from)
ARTIFACT_BACKENDS = {
    "ort": ("model.onnx", "onnxruntime", "fp32", "torch_inference"),
    "mnn_fp32": ("model.mnn", "mnn", "fp32", "ort"),
    "mnn_fp16w": ("model.fp16.mnn", "mnn", "fp32", "ort"),
    "mnn_int8w": ("model.int8w.mnn", "mnn", "fp32", "ort"),
    "mnn_low": ("model.mnn", "mnn", "low", "ort"),
}
BISECT_SAMPLES = 2
RUNTIME_WINOGRAD = "accurate"  # runtime.load's default; what the gates vouch for


def merge_gates(gates: dict | None) -> dict:
    """DEFAULT_GATES with `gates` ({backend: {metric: threshold}}) laid over them, validated."""
    merged = copy.deepcopy(DEFAULT_GATES)
    for backend, limits in (gates or {}).items():
        if backend not in DEFAULT_GATES:
            raise EdgeportError(f"unknown backend '{backend}' in gates; known: {', '.join(DEFAULT_GATES)}")
        if not isinstance(limits, dict):
            raise EdgeportError(f"gates for '{backend}' must be a JSON object of metric: threshold")
        merged[backend].update(limits)
    try:
        validate_gates(merged)
    except ValueError as e:
        raise EdgeportError(f"bad gates: {e}") from None
    return merged


@functools.lru_cache(maxsize=1)
def cpu_fp16() -> bool | None:
    """Whether MNN reports fp16 arithmetic on this CPU ("The device supports: ... fp16:1"), None if unknown.
    Asked in a subprocess: MNN prints the line once, at import, from C."""
    try:
        out = subprocess.run([sys.executable, "-c", "import MNN"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"fp16:\s*(\d)", out.stdout + out.stderr)
    return None if found is None else found.group(1) == "1"


def _torch_outputs(model, x: np.ndarray, names: list[str], chunk: int = 4, dtype=None) -> dict:
    import torch

    parts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like every other backend here; also much faster on a shared, busy CPU
    try:
        with torch.no_grad():
            for start in range(0, len(x), chunk):
                out = model(torch.from_numpy(x[start:start + chunk]))
                outs = list(out) if isinstance(out, (list, tuple)) else [out]
                parts.append([o.detach().to(dtype or torch.float32).numpy() for o in outs])
    finally:
        torch.set_num_threads(threads)
    if len(parts[0]) != len(names):
        raise EdgeportError(f"the model returns {len(parts[0])} outputs but the metadata names {len(names)}")
    return {n: np.concatenate([p[i] for p in parts]) for i, n in enumerate(names)}


def _fp64_noise(reference, x: np.ndarray, ref_out: dict, names: list[str]) -> dict | None:
    """max_rel of the fp32 reference against the same network in float64: the rounding noise every fp32
    backend starts from. Gates far below it cannot be met by any fp32 implementation."""
    import torch

    try:
        ref64 = copy.deepcopy(reference).double()
        out64 = _torch_outputs(ref64, x.astype(np.float64), names, dtype=torch.float64)
    except Exception:  # a module that cannot run in float64: no noise floor, nothing else lost
        return None
    return {n: max_rel(out64[n], ref_out[n]) for n in names}


def _runtime_outputs(path: Path, backend: str, precision: str, x: np.ndarray, names: list[str]) -> dict:
    """Run an artifact through the torch-free runtime, in batches of its fixed batch size (padded)."""
    import runtime

    with stdout_silenced():  # MNN prints "MNN use low precision" from C
        predictor = runtime.load(path, backend=backend, threads=1, precision=precision,
                                 winograd=RUNTIME_WINOGRAD)
    shape = predictor.meta.get("input_shape") or predictor.input_shape or [-1]
    batch = shape[0] if shape[0] > 0 else 4
    parts = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        n = len(xb)
        if shape[0] > 0 and n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), np.float32)])
        with stdout_silenced():
            out = predictor.run(np.ascontiguousarray(xb), check_finite=False)
        parts.append({k: v[:n] for k, v in out.items()})
    missing = [n for n in names if n not in parts[0]]
    if missing:
        raise EdgeportError(f"{path.name} has no output(s) {missing}; it outputs {sorted(parts[0])}")
    return {n: np.concatenate([p[n] for p in parts]) for n in names}


def _worst_samples(ref: dict, out: dict, k: int) -> np.ndarray:
    """Indices of the k samples with the largest error relative to each output's scale."""
    score = np.zeros(len(next(iter(ref.values()))))
    for name, r in ref.items():
        d = np.abs(np.nan_to_num(out[name].astype(np.float64), nan=np.inf) - r).reshape(len(r), -1).max(1)
        score = np.maximum(score, d / max(float(np.abs(r).max()), 1e-30))
    return np.argsort(-score, kind="stable")[:k]


def _bisect(backend: str, artifact_dir: Path, x, outputs, gates, reference, inference, budget) -> dict:
    from .bisect import bisect_onnx, bisect_torch

    gate = gates[backend].get("max_rel")
    if gate is None:
        return {"found": False, "note": "no max_rel gate to bisect on"}
    worst = x[_worst_samples(outputs["reference"], outputs[backend], BISECT_SAMPLES)]
    if backend == "torch_inference":
        return bisect_torch(reference, inference, worst, gate)
    previous = ARTIFACT_BACKENDS[backend][3]
    if previous in outputs:
        step = max(max_rel(outputs[previous][n], outputs[backend][n]) for n in outputs[backend])
        if step <= gate:
            return {"found": False, "inherited_from": previous, "max_rel_vs_previous": step,
                    "note": f"{backend} agrees with {previous} (max_rel {step:.3g} ≤ {gate:.3g}): the "
                            f"divergence is already in {previous}"}
    mnn_path = artifact_dir / ARTIFACT_BACKENDS[backend][0] if backend != "ort" else None
    return bisect_onnx(artifact_dir / "model.onnx", worst, backend, gate, mnn_path=mnn_path,
                       time_budget=budget)


def run_parity(artifact_dir: Path, reference, inference, meta: dict, gates: dict | None = None,
               n_images: int = 16, bisect: bool = True, bisect_budget: float = 300.0,
               write: bool = True) -> dict:
    """Compare every artifact in `artifact_dir` (and the PyTorch inference form) against `reference` on the
    same inputs; write artifact_dir/parity.json and return {"passed", "breaches", "gates", "results",
    "markdown", "inputs", ...}. results = {backend: {output_name: metrics}}; absent files are skipped (listed
    in "skipped"). On a breach, "bisection" holds the first diverging layer per breached backend (bounded by
    `bisect_budget` seconds each). `write=False` leaves parity.json alone."""
    artifact_dir = Path(artifact_dir)
    gates = merge_gates(gates)
    if n_images < 1:
        raise EdgeportError(f"--n-images {n_images} must be at least 1")
    names = list(meta["output_names"])
    classifier = meta.get("task", "classification") == "classification"
    x = sample_batch(meta, n_images=n_images, n_random=N_RANDOM, seed=0)
    inputs = {"count": len(x), "shape": list(x.shape), "photos": n_images, "random": N_RANDOM, "seed": 0,
              "description": f"{n_images} scikit-image photos through the model's preprocessing + {N_RANDOM} "
                             "seeded N(0, 1) tensors (export.inputs.sample_batch)"}

    outputs = {"reference": _torch_outputs(reference.eval(), x, names)}
    noise = _fp64_noise(reference, x, outputs["reference"], names)
    sources, skipped, errors = {"torch_inference": "PyTorch inference form (models.to_inference)"}, {}, {}
    if inference is not None:
        outputs["torch_inference"] = _torch_outputs(inference.eval(), x, names)
    else:
        skipped["torch_inference"] = "no inference-form model given"
    for backend, (fname, rt_backend, precision, _) in ARTIFACT_BACKENDS.items():
        path = artifact_dir / fname
        if not path.is_file():
            skipped[backend] = f"{fname} absent"
            continue
        sources[backend] = fname + (f" (precision={precision})" if precision != "fp32" else "")
        try:
            outputs[backend] = _runtime_outputs(path, rt_backend, precision, x, names)
        except Exception as e:  # any failure to load or run is a failure to prove parity
            errors[backend] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    results, breaches, breached = {}, [], []
    for backend in DEFAULT_GATES:
        if backend in errors:
            breaches.append(f"{backend}: failed to run ({errors[backend]})")
        if backend not in outputs:
            continue
        results[backend], lines = {}, []
        for name in names:
            m = compare(outputs["reference"][name], outputs[backend][name], classifier=classifier)
            results[backend][name] = m
            lines += check_gates(m, gates[backend], backend if len(names) == 1 else f"{backend}[{name}]")
        breaches += lines
        if lines:
            breached.append(backend)

    notes = [f"every backend is compared against the {REFERENCE} on the same inputs"]
    if any(b.startswith("mnn") for b in results):
        notes.append(f"MNN ran as runtime.load runs it by default: 1 thread, winograd='{RUNTIME_WINOGRAD}' (3x3 convs "
                     "in F(2,3) tiles); winograd='fast' (F(6,3)) is not what this checks")
    if noise:
        floor = max(noise.values())
        notes.append(f"the fp32 reference itself is max_rel {floor:.3g} from the same network in float64 "
                     "(its rounding noise)")
        below = [b for b in breached if all(m["max_rel"] <= 2 * noise[n] for n, m in results[b].items())]
        if below:
            notes.append(f"breaches within 2x of that noise ({', '.join(below)}) are the size of fp32 "
                         "rounding accumulated over the network's depth; the gate is kept as set")
    precision_low = None
    if "mnn_low" in outputs:
        fp16 = cpu_fp16()
        same = "mnn_fp32" in outputs and all(
            np.array_equal(outputs["mnn_low"][n], outputs["mnn_fp32"][n]) for n in names)
        ran_fp16 = bool(fp16) and not same
        precision_low = {"cpu_fp16": fp16, "identical_to_mnn_fp32": same, "ran_fp16": ran_fp16}
        if not ran_fp16:
            why = "MNN reports fp16:0 for this CPU" if fp16 is False else "outputs bit-identical to mnn_fp32"
            notes.append(f"mnn_low: precision='low' ran in fp32 here ({why}); the fp16-compute gate is not "
                         "exercised on this machine — run it on an ARMv8.2+ board")

    bisection = {}
    if bisect and breaches:
        for backend in breached:
            if backend == "mnn_low" and precision_low and precision_low["identical_to_mnn_fp32"]:
                bisection[backend] = {"found": False, "note": "identical to mnn_fp32; see its bisection"}
                continue
            try:
                bisection[backend] = _bisect(backend, artifact_dir, x, outputs, gates, reference, inference,
                                             bisect_budget)
            except Exception as e:  # a bisection failure must not hide the breach itself
                bisection[backend] = {"found": False, "error": f"{type(e).__name__}: {e}"}

    result = {
        "passed": not breaches,
        "breaches": breaches,
        "gates": gates,
        "reference": REFERENCE,
        "results": results,
        "sources": {b: s for b, s in sources.items() if b in results},
        "skipped": skipped,
        "inputs": inputs,
        "reference_fp64_max_rel": noise,
        "precision_low": precision_low,
        "bisection": bisection,
        "notes": notes,
        "versions": _versions(),
    }
    result["markdown"] = to_markdown(result)
    if write:
        write_json_atomic(artifact_dir / "parity.json", {k: v for k, v in result.items() if k != "markdown"})
    return result


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "onnx", "onnxruntime", "MNN"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else str(float(obj))  # JSON has no inf/nan
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(v) -> str:
    return "–" if v is None else str(v) if isinstance(v, int) else f"{v:.3g}"


def _gate_text(limits: dict) -> str:
    return ", ".join(f"{k} {'≥' if k in LOWER_BOUNDED else '≤'} {v:g}" for k, v in limits.items())


def to_markdown(result: dict) -> str:
    """A table for report.md: one row per backend and output, plus breaches and bisection."""
    lines = [f"Parity against the {result['reference']} on {result['inputs']['count']} inputs "
             f"({result['inputs']['description']}): **{'PASSED' if result['passed'] else 'FAILED'}**", "",
             "| backend | source | output | max_rel | max_abs | mean_abs | cosine | top1 | top5 | NaN/Inf "
             "| gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for backend, per_output in result["results"].items():
        for name, m in per_output.items():
            row = [backend, result["sources"].get(backend, ""), name, _fmt(m["max_rel"]), _fmt(m["max_abs"]),
                   _fmt(m["mean_abs"]), f"{m['cosine']:.6f}", _fmt(m.get("top1")), _fmt(m.get("top5")),
                   str(m["nan_inf"]), _gate_text(result["gates"][backend])]
            lines.append("| " + " | ".join(row) + " |")
    for backend, why in result["skipped"].items():
        lines.append(f"\nSkipped {backend}: {why}.")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}.")
    if result["breaches"]:
        lines.append("\nBreaches:\n")
        lines += [f"- {b}" for b in result["breaches"]]
    for backend, b in result["bisection"].items():
        lines.append(f"\nBisection ({backend}): {describe_bisection(b)}")
    return "\n".join(lines) + "\n"


def describe_bisection(b: dict) -> str:
    if b.get("error"):
        return f"failed: {b['error']}"
    if not b.get("found"):
        return b.get("note", "no diverging layer found")
    if "module" in b:  # PyTorch hooks
        what = f"module `{b['module']}` ({b['reference_type']} → {b['inference_type']})"
        if b.get("folded_batchnorm"):
            what += f", with BatchNorm `{b['folded_batchnorm']}` folded into it"
        return f"first diverging {what}: max_rel {b['max_rel']:.3g} > {b['gate']:.3g}"
    text = (f"first diverging ONNX node `{b['node']}` ({b['op_type']}"
            + (f", MNN op {b['mnn_op']}" if b.get("mnn_op") else "") + f") max_rel {b['max_rel']:.3g} > "
            f"{b['gate']:.3g}; upstream ops {' ← '.join(b['upstream_ops'])}")
    if b.get("previous"):
        p = b["previous"]
        text += f"; last agreeing probe `{p['node']}` ({p['op_type']}, max_rel {p['max_rel']:.3g})"
    if b.get("onset"):
        o = b["onset"]
        text += (f"; error first above a tenth of the gate at `{o['node']}` ({o['op_type']}, max_rel "
                 f"{o['max_rel']:.3g}; upstream {' ← '.join(o['upstream_ops'])})")
    if b.get("note"):
        text += f" ({b['note']})"
    return text


def _load_gates(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        raw = Path(text).read_text() if os.path.isfile(text) else text
        gates = json.loads(raw)
    except (OSError, ValueError) as e:
        raise EdgeportError(f"--gates is neither a JSON object nor a readable JSON file ({e})") from None
    if not isinstance(gates, dict):
        raise EdgeportError('--gates must be a JSON object like {"mnn_fp32": {"max_rel": 1e-4}}')
    return gates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__.splitlines()[0])
    p.add_argument("artifact_dir", type=Path, help="an export directory (artifacts/<model>/<form-tag>)")
    p.add_argument("--gates", help="JSON object (or file) laid over the export's gates, e.g. "
                                   '{"mnn_fp32": {"max_rel": 1e-4}}')
    p.add_argument("--n-images", type=int, default=16, help="photos in the input set (+4 random tensors)")
    p.add_argument("--no-bisect", action="store_true", help="skip the first-diverging-layer search")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--write", action="store_true",
                   help="rewrite ARTIFACT_DIR/parity.json (left alone by default: the manifest hashes it)")
    args = p.parse_args(argv)
    try:
        gates = _load_gates(args.gates)
        d = args.artifact_dir
        if not d.is_dir():
            raise EdgeportError(f"artifact directory not found: {d} (make one with `make export MODEL=...`)")
        manifest_path = d / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            raise EdgeportError(f"{manifest_path} missing or not JSON; pass an export directory "
                                "(artifacts/<model>/<form-tag>) or re-export") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("source"), dict):
            raise EdgeportError(f"{manifest_path} has no 'source' to rebuild the model from; re-export")
        # The gates the export was judged by (they may be custom), then the command line's on top.
        recorded = (manifest.get("parity") or {}).get("gates") or {}
        merge_gates(gates)  # validates the command line's gates before mixing them in
        gates = {b: {**recorded.get(b, {}), **(gates or {}).get(b, {})} for b in {*recorded, *(gates or {})}}
        from .source import build_models

        reference, inference, meta = build_models(manifest["source"])
        result = run_parity(d, reference, inference, meta, gates=gates, n_images=args.n_images,
                            bisect=not args.no_bisect, write=args.write)
    except EdgeportError as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_jsonable({k: v for k, v in result.items() if k != "markdown"}), indent=2))
    else:
        print(result["markdown"])
    if not result["passed"]:
        print("parity FAILED:\n" + "\n".join(f"  {b}" for b in result["breaches"]), file=sys.stderr)
        for backend, b in result["bisection"].items():
            print(f"  bisection {backend}: {describe_bisection(b)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
