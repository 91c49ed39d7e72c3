"""Parity suite: every artifact proven equal to its PyTorch source, with the first diverging layer on failure.

The same inputs (photos through the model's own preprocessing plus seeded random tensors) run through the
PyTorch training form (eval, the reference), the PyTorch inference form and every artifact target of
`export.targets` (ONNX Runtime, MNN fp32 / fp16 weights / int8 weights / precision "low", ...). Each is
compared against the reference with `judge`, the one parity definition (the ARM harness uses it too); a gate
breach names the target, metric and value, and bisection finds the first node that diverges.

    python -m export.parity artifacts/fasternet_t0/split_cat-fc [--gates JSON] [--n-images N] [--json]
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from models.errors import EdgeportError
from models.metrics import LOWER_BOUNDED, check_gates, compare, max_rel, validate_gates
from runtime.atomic import jsonable, write_json
from runtime.cli import OneLineParser
from runtime.engines import stdout_silenced

from . import targets
from .detection_parity import NOISE_FACTOR
from .inputs import sample_batch
from .tables import markdown_table

REFERENCE = "PyTorch training form (eval)"
N_RANDOM = 4
BISECT_SAMPLES = 2
RUNTIME_WINOGRAD = "accurate"  # runtime.load's default; what the gates vouch for


def merge_gates(gates: dict | None) -> dict:
    """The registry's gates with `gates` ({target: {metric: threshold}}) laid over them, validated."""
    merged = targets.default_gates()
    for backend, limits in (gates or {}).items():
        if backend not in merged:
            raise EdgeportError(f"unknown target '{backend}' in gates; known: {', '.join(merged)}")
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


def _fp64_outputs(reference, x: np.ndarray, names: list[str]) -> dict | None:
    """The same network in float64 on `x`: what the fp32 reference's own rounding noise is measured against
    (every fp32 backend starts from that noise; gates far below it cannot be met by any fp32 implementation)."""
    import torch

    try:
        ref64 = copy.deepcopy(reference).double()
        return _torch_outputs(ref64, x.astype(np.float64), names, dtype=torch.float64)
    except Exception:  # a module that cannot run in float64: no noise floor, nothing else lost
        return None


def _detection_noise(ref: dict, ref64: dict | None, meta: dict) -> dict | None:
    """A detector's raw-output error of its own fp32 reference against float64 (box_px, score), or None."""
    if meta.get("task") != "detection" or ref64 is None:
        return None
    from .detection_parity import raw_errors

    return raw_errors(ref64, ref)


def _runtime_outputs(path: Path, backend: str, precision: str, x: np.ndarray, names: list[str]) -> dict:
    """Run an artifact through the torch-free runtime, in batches of its fixed batch size (padded)."""
    import runtime

    predictor = runtime.load(path, backend=backend, threads=1, precision=precision,  # MNN's load is silenced
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

    target = targets.get(backend)
    gate = gates[backend].get("max_rel")
    if gate is None and "box_px" in gates[backend]:
        # A detector is judged in pixels: its layers are bisected on the same error as a fraction of the input
        # size (fp32 at 640²: 0.05 px → 7.8e-5; float32 noise inside yolo11n is ~1.3e-5 of a tensor's max).
        gate = gates[backend]["box_px"] / max(x.shape[-2:])
    if gate is None:
        return {"found": False, "note": "no max_rel gate to bisect on"}
    worst = x[_worst_samples(outputs["reference"], outputs[backend], BISECT_SAMPLES)]
    if target.bisect == "none":
        return {"found": False, "note": f"{backend} is not bisected: its producer already kept the most harmful "
                                        "layers in float (see the manifest's targets record)"}
    if target.bisect == "torch":
        return bisect_torch(reference, inference, worst, gate)
    previous = target.made_from
    if previous in outputs:
        step = max(max_rel(outputs[previous][n], outputs[backend][n]) for n in outputs[backend])
        if step <= gate:
            return {"found": False, "inherited_from": previous, "max_rel_vs_previous": step,
                    "note": f"{backend} agrees with {previous} (max_rel {step:.3g} ≤ {gate:.3g}): the "
                            f"divergence is already in {previous}"}
    return bisect_onnx(artifact_dir / "model.onnx", worst, target, gate,
                       artifact=artifact_dir / target.file, time_budget=budget)


HELD_OUT_DESCRIPTION = ("the evaluation half of the bundled photos and augmented views of them "
                        "(export.calibration.evaluation_batch), never used for calibration")
HELD_OUT_MAX = 256  # of the user's --val images (a seeded subset when there are more)


def held_out_description(directory=None) -> str:
    if directory is None:
        return HELD_OUT_DESCRIPTION
    return (f"up to {HELD_OUT_MAX} of the labelled images of --val {os.path.abspath(os.fspath(directory))} "
            "(images like the deployment's, never used for calibration)")


def held_out_inputs(meta: dict, n: int | None = None, directory=None) -> np.ndarray:
    """What targets with inputs="held_out" (int8) are judged on: the export's --val images when it has them (the
    user's own domain: a digit classifier judged on photographs says nothing), else the evaluation half of the
    bundled photos."""
    from .calibration import DEFAULT_EVAL, calibration_batch, evaluation_batch

    if directory is not None:
        return calibration_batch(meta, directory, n=n or HELD_OUT_MAX, option="--val")[0]
    return evaluation_batch(meta, n or DEFAULT_EVAL)


def reference_outputs(reference, x: np.ndarray, meta: dict) -> dict:
    """The PyTorch training form's outputs: what every target is judged against."""
    return _torch_outputs(reference.eval(), x, list(meta["output_names"]))


def target_outputs(target: targets.Target, path: Path, x: np.ndarray, meta: dict) -> dict:
    """One artifact target's outputs on `x`, run as the runtime runs it."""
    return _runtime_outputs(path, target.engine, target.precision, x, list(meta["output_names"]))


def judge(target: str, ref: dict, out: dict, gates: dict, classifier: bool,
          meta: dict | None = None, noise: dict | None = None) -> tuple[dict, list[str]]:
    """The parity definition: ({output: metrics}, breach lines) of `out` against `ref` under `gates`
    ({metric: threshold}). Used on the host (run_parity) and under ARM emulation (benchmarks.arm.parity).

    A detector (meta task "detection") is judged by export.detection_parity instead: first its raw outputs per
    anchor before NMS (box error in pixels, score error) under `detection_gates(target, gates)`, each gate
    raised to NOISE_FACTOR x the reference's own fp32 rounding error on the same inputs when `noise` gives it
    (run_parity measures it against float64); then after NMS only the detections that a clear score margin
    makes decidable. Its outputs' generic metrics are reported beside ("detections" holds the judged ones)."""
    if (meta or {}).get("task") == "detection":
        return _judge_detection(target, ref, out, gates, meta, noise)
    metrics, breaches = {}, []
    for name, r in ref.items():
        if name not in out:
            breaches.append(f"{target}: output '{name}' missing")
            continue
        metrics[name] = compare(r, out[name], classifier=classifier)
        breaches += check_gates(metrics[name], gates, target if len(ref) == 1 else f"{target}[{name}]")
    return metrics, breaches


def _judge_detection(target, ref, out, gates, meta, noise=None):
    from .detection_parity import check_detection_gates, compare_detections, detection_gates, with_noise_floor

    missing = [n for n in ref if n not in out]
    if missing:
        return {}, [f"{target}: output '{n}' missing" for n in missing]
    metrics = {n: compare(r, out[n], classifier=False) for n, r in ref.items()}
    gates = with_noise_floor(detection_gates(target, gates), noise)
    metrics["detections"] = compare_detections(ref, out, meta, score_margin=gates.get("score", 0.0))
    metrics["detections"]["gates"] = gates
    return metrics, check_detection_gates(metrics["detections"], gates, target)


def run_parity(artifact_dir: Path, reference, inference, meta: dict, gates: dict | None = None,
               n_images: int = 16, bisect: bool = True, bisect_budget: float = 300.0,
               write: bool = True, target_names=None, optional=frozenset(), held_out_dir=None) -> dict:
    """Compare every artifact target in `artifact_dir` (and the PyTorch inference form) against `reference` on
    the same inputs; write artifact_dir/parity.json and return {"passed", "breaches", "gates", "results",
    "markdown", "inputs", ...}. results = {target: {output_name: metrics}}.

    `target_names`: the targets the directory must hold (a missing file is a breach); None: whichever
    targets' files are present (the others are listed in "skipped"). On a breach, "bisection" holds the first
    diverging layer per breached target (bounded by `bisect_budget` seconds each). `write=False` leaves
    parity.json alone.

    `optional`: targets this verdict decides to ship or not (export.targets.optional_targets): their breaches
    go to "not_shipped" ({target: breach lines}) instead of "breaches", so they never fail the result; the
    caller deletes their files. Every other target is required: any breach fails."""
    artifact_dir = Path(artifact_dir)
    gates = merge_gates(gates)
    if n_images < 1:
        raise EdgeportError(f"--n-images {n_images} must be at least 1")
    names = list(meta["output_names"])
    classifier = meta.get("task", "classification") == "classification"
    if meta.get("task") == "detection":  # what judge applies, so the report shows it
        from .detection_parity import detection_gates

        gates = {t: detection_gates(t, g) for t, g in gates.items()}
    x = sample_batch(meta, n_images=n_images, n_random=N_RANDOM, seed=0)
    inputs = {"count": len(x), "shape": list(x.shape), "photos": n_images, "random": N_RANDOM, "seed": 0,
              "description": f"{n_images} scikit-image photos through the model's preprocessing + {N_RANDOM} "
                             "seeded N(0, 1) tensors (export.inputs.sample_batch)"}

    outputs = {"reference": reference_outputs(reference, x, meta)}
    reference64 = _fp64_outputs(reference, x, names)
    noise = None if reference64 is None else {n: max_rel(reference64[n], outputs["reference"][n]) for n in names}
    sources, skipped, errors = {targets.INFERENCE: targets.get(targets.INFERENCE).description}, {}, {}
    if inference is not None:
        outputs[targets.INFERENCE] = _torch_outputs(inference.eval(), x, names)
    else:
        skipped[targets.INFERENCE] = "no inference-form model given"
    required = None if target_names is None else {t.name for t in targets.select(target_names)}
    held = None
    for target in targets.ARTIFACTS:
        path = artifact_dir / target.file
        if required is not None and target.name not in required:
            continue
        if not path.is_file():
            if required is None:
                skipped[target.name] = f"{target.file} absent"
            else:
                errors[target.name] = f"{target.file} missing"
            continue
        sources[target.name] = target.file
        if target.precision != "fp32":
            sources[target.name] += f" (precision={target.precision})"
        if target.engine == "mnn":
            sources[target.name] += f" (GELU={target.gelu})"
        try:
            if target.inputs == "held_out" and "reference@held_out" not in outputs:
                held = held_out_inputs(meta, directory=held_out_dir)
                outputs["reference@held_out"] = reference_outputs(reference, held, meta)
                inputs["held_out"] = {"count": len(held), "description": held_out_description(held_out_dir)}
            outputs[target.name] = target_outputs(target, path, held if target.inputs == "held_out" else x, meta)
        except Exception as e:  # any failure to load or run is a failure to prove parity
            errors[target.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    results, breaches, breached, not_shipped = {}, [], [], {}
    det_noise = _detection_noise(outputs["reference"], reference64, meta)
    for target in targets.TARGETS:
        backend = target.name
        lines = [f"{backend}: failed to run ({errors[backend]})"] if backend in errors else []
        if backend in outputs:
            held_out = target.inputs == "held_out"
            ref = outputs["reference@held_out" if held_out else "reference"]
            results[backend], judged = judge(backend, ref, outputs[backend], gates[backend], classifier, meta,
                                             noise=None if held_out else det_noise)
            lines += judged
            if target.engine == "mnn":
                lines += approximate_gelu(target, artifact_dir / target.file)
        if backend in optional:
            if lines:
                not_shipped[backend] = lines
            continue
        breaches += lines
        if lines and backend in outputs:
            breached.append(backend)
    degenerate = _degenerate(outputs["reference"])
    if degenerate:
        breaches.insert(0, f"reference: {degenerate}")

    notes = [f"every target is compared against the {REFERENCE} on the same inputs"]
    if "held_out" in inputs:
        notes.append(f"int8 targets are judged on {inputs['held_out']['count']} other inputs: "
                     f"{inputs['held_out']['description']}")
    if any(targets.get(b).engine == "mnn" for b in results if b in targets.TARGET_BY_NAME):
        notes.append(f"MNN ran as runtime.load runs it by default: 1 thread, winograd='{RUNTIME_WINOGRAD}' (3x3 convs "
                     "in F(2,3) tiles); winograd='fast' (F(6,3)) is not what this checks")
    if noise:
        floor = max(noise.values())
        notes.append(f"the fp32 reference itself is max_rel {floor:.3g} from the same network in float64 "
                     "(its rounding noise)")
        below = [b for b in breached if all(m["max_rel"] <= 2 * noise[n] for n, m in results[b].items()
                                            if n in noise)]
        if below:
            notes.append(f"breaches within 2x of that noise ({', '.join(below)}) are the size of fp32 "
                         "rounding accumulated over the network's depth; the gate is kept as set")
    precision_low = _precision_low(outputs, names, notes)

    bisection = {}
    if bisect and breaches:
        for backend in breached:
            twin = _fp32_twin(backend)
            if precision_low and precision_low["identical_to_fp32"].get(backend):
                bisection[backend] = {"found": False, "note": f"identical to {twin}; see its bisection"}
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
        "detection_noise": det_noise,
        "precision_low": precision_low,
        "bisection": bisection,
        "not_shipped": not_shipped,
        "notes": notes,
        "versions": _versions(),
    }
    result["markdown"] = to_markdown(result)
    if write:
        write_parity_json(artifact_dir, result, fix="make the directory writable or run without --write")
    return result


def approximate_gelu(target: targets.Target, path: Path) -> list[str]:
    """A breach when an MNN file holds MNN's tanh GELU but its target promises exact GELU: the approximation
    stays within the fp32 gate on some models (convnext_atto: 4.3e-5), so the numbers alone cannot be trusted to
    show it. Never approximate silently."""
    if target.gelu == "tanh":
        return []
    from .bisect import mnn_tensor_ops

    tanh = sum(op == "GELU" for op in mnn_tensor_ops(path).values())
    return [f"{target.name}: {path.name} holds {tanh} approximate (tanh) GELU op(s); this target promises exact "
            f"GELU ({target.gelu}); re-export"] if tanh else []


def _degenerate(ref: dict) -> str | None:
    """Why the reference cannot vouch for anything (outputs that do not vary across inputs, or non-finite
    ones: garbage weights make every backend agree), or None."""
    for name, r in ref.items():
        if not np.isfinite(r).all():
            return f"output '{name}' is not finite: the weights are broken"
        if len(r) > 1 and np.ptp(r.reshape(len(r), -1), axis=0).max() <= 1e-6 * max(float(np.abs(r).max()), 1e-30):
            return (f"output '{name}' is the same for every input (degenerate weights): parity on it "
                    "proves nothing")
    return None


def _fp32_twin(name: str) -> str | None:
    """The fp32-arithmetic target running the same file as a precision-'low' target."""
    target = targets.get(name)
    if target.precision != "low":
        return None
    twin = targets.for_file(target.file, "fp32", target.engine)
    return twin.name if twin else None


def _precision_low(outputs: dict, names: list[str], notes: list[str]) -> dict | None:
    """Whether precision='low' really ran fp16 arithmetic here, per 'low' target (x86 runs it as fp32)."""
    lows = [b for b in outputs if b in targets.TARGET_BY_NAME and targets.get(b).precision == "low"]
    if not lows:
        return None
    fp16 = cpu_fp16()
    same = {}
    for b in lows:
        twin = _fp32_twin(b)
        same[b] = twin in outputs and all(np.array_equal(outputs[b][n], outputs[twin][n]) for n in names)
    ran_fp16 = bool(fp16) and not all(same.values())
    if not ran_fp16:
        why = "MNN reports fp16:0 for this CPU" if fp16 is False else "outputs bit-identical to fp32"
        notes.append(f"{', '.join(lows)}: precision='low' ran in fp32 here ({why}); the fp16-compute gate is "
                     "not exercised on this machine — run it on an ARMv8.2+ board or `make arm`")
    return {"cpu_fp16": fp16, "identical_to_fp32": same, "ran_fp16": ran_fp16}


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "onnx", "onnxruntime", "MNN"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(v) -> str:
    return "–" if v is None else str(v) if isinstance(v, int) else f"{v:.3g}"


def gate_text(limits: dict) -> str:
    lower = (*LOWER_BOUNDED, "min_iou")  # min_iou: export.detection_parity
    return ", ".join(f"{k} {'≥' if k in lower else '≤'} {v:g}" for k, v in limits.items())


def to_markdown(result: dict) -> str:
    """A table for report.md: one row per backend and output, plus breaches and bisection."""
    lines = [f"Parity against the {result['reference']} on {result['inputs']['count']} inputs "
             f"({result['inputs']['description']}): **{'PASSED' if result['passed'] else 'FAILED'}**", ""]
    rows = [[backend, result["sources"].get(backend, ""), name, _fmt(m["max_rel"]), _fmt(m["max_abs"]),
             _fmt(m["mean_abs"]), f"{m['cosine']:.6f}", _fmt(m.get("top1")), _fmt(m.get("top5")),
             str(m["nan_inf"]), gate_text(result["gates"][backend])]
            for backend, per_output in result["results"].items() for name, m in per_output.items()
            if "max_rel" in m]
    lines += markdown_table(["target", "source", "output", "max_rel", "max_abs", "mean_abs", "cosine", "top1",
                             "top5", "NaN/Inf", "gate"], rows)
    detections = {b: r["detections"] for b, r in result["results"].items() if "detections" in r}
    if detections:
        floor = result.get("detection_noise")
        noise = (f"; the fp32 reference itself is {floor['box_px']:.3g} px and {floor['score']:.3g} in score from "
                 f"float64, so those gates are at least {NOISE_FACTOR:g}x that") if floor else ""
        lines += ["", "Detections (gated before NMS: box error in input pixels over anchors scoring ≥ 0.01 and "
                  f"score error, per anchor{noise}; after NMS, over the detections a clear score margin decides "
                  "(judged): unmatched, class mismatches, min IoU; not gated: borderline = on one side only "
                  "without a clear margin, swapped = two overlapping tied anchors kept the other way round):", ""]
        lines += markdown_table(
            ["target", "box_px", "score", "ref dets", "judged", "unmatched", "borderline", "swapped", "class ≠",
             "min IoU", "gate"],
            [[b, _fmt(m["box_px"]), _fmt(m["score"]), str(m["detections_ref"]), str(m.get("judged", "–")),
              str(m["unmatched"]), str(m["borderline"]), str(m.get("swapped", 0)), str(m["class_mismatch"]),
              f"{m['min_iou']:.4f}", gate_text(m.get("gates") or result["gates"][b])]
             for b, m in detections.items()])
    for backend, why in result["skipped"].items():
        lines.append(f"\nSkipped {backend}: {why}.")
    for backend, why in result.get("not_shipped", {}).items():
        lines.append(f"\nNot shipped {backend} (optional target, breached the final verdict): {'; '.join(why)}.")
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


def manifest_targets(manifest: dict) -> list[str]:
    """The targets an export shipped: as recorded, else (older manifests) those whose file it lists. Each
    named target must be a registered one (EdgeportError otherwise)."""
    recorded = (manifest.get("export") or {}).get("targets")
    if recorded is None:
        return [t.name for t in targets.ARTIFACTS if t.file in (manifest.get("files") or {})]
    unknown = [t for t in recorded if t not in targets.TARGET_BY_NAME or t not in ARTIFACT_NAMES]
    if unknown:
        raise EdgeportError(f"manifest field export.targets names {', '.join(map(repr, unknown))}, not artifact "
                            f"targets (known: {', '.join(ARTIFACT_NAMES)}); re-export")
    return list(recorded)


ARTIFACT_NAMES = tuple(t.name for t in targets.ARTIFACTS)


def verify_files(directory: Path, manifest: dict) -> str | None:
    """Why the directory is not what its manifest lists (a file missing, or its sha256 differs), or None.
    `manifest` has been read through export.schemas.Manifest (entries well-formed, names without a path)."""
    from .manifest import sha256_file

    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} listed in the manifest is missing from {directory}; re-export"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} differs from the manifest (sha256): it was modified or replaced; re-export"
    return None


# Per-file fields: an artifact's metadata names its own precision (and MNN GELU form); the manifest holds fp32's.
PER_FILE_FIELDS = ("precision", "gelu")


def _first_difference(have: dict, want: dict, skip=()) -> str | None:
    for key in sorted({*have, *want} - set(skip)):
        if key not in have:
            return f"field {key} missing (expected {want[key]!r})"
        if key not in want:
            return f"field {key} unexpected ({have[key]!r})"
        if have[key] != want[key]:
            return f"field {key} is {have[key]!r}, expected {want[key]!r}"
    return None


def embedded_metadata(path: Path, target: targets.Target) -> dict:
    """The metadata an artifact carries (ONNX metadata_props "edgeport", MNN bizCode), read by the runtime as a
    board reads it; EdgeportError when the runtime refuses the file."""
    import runtime
    from runtime.errors import EdgeRuntimeError

    try:
        return runtime.load(path, backend=target.engine).meta
    except EdgeRuntimeError as e:
        raise EdgeportError(str(e)) from None


def metadata_disagreements(directory: Path, manifest: dict, meta: dict, target_names) -> list[str]:
    """What makes the directory's metadata other than what its source rebuilds (`meta`), one line each naming
    the file and field: the manifest's "metadata" against `meta` (the code's version aside), then each shipped
    artifact's embedded metadata against the manifest's (its own precision aside)."""
    lines = []
    recorded = manifest["metadata"]
    diff = _first_difference(recorded, meta, skip=("edgeport_version",))
    if diff:
        lines.append(f"manifest.json metadata disagrees with the source checkpoint's: {diff}")
    by_file = {}  # one load per file (a precision-low target runs its fp32 twin's file): the first, its producer
    for target in targets.select(target_names):
        by_file.setdefault(target.file, target)
    for target in by_file.values():
        path = directory / target.file
        if not path.is_file():
            continue  # run_parity reports the missing file
        try:
            embedded = embedded_metadata(path, target)
        except EdgeportError as e:
            lines.append(f"{target.file}: its metadata is refused by the runtime ({e})")
            continue
        diff = _first_difference(embedded, recorded, skip=PER_FILE_FIELDS)
        if diff:
            lines.append(f"{target.file} embedded metadata disagrees with manifest.json: {diff}")
    return list(dict.fromkeys(lines))


def _load_gates(text: str | None) -> dict | None:
    """The --gates override: a JSON object or a (regular, small) JSON file of {target: {metric: threshold}}."""
    from runtime.documents import read_bytes

    if not text:
        return None
    try:
        raw = read_bytes(text, "--gates file", 1 << 20, EdgeportError) if os.path.isfile(text) else text
        gates = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise EdgeportError(f"--gates is neither a JSON object nor a readable JSON file ({e})") from None
    if not isinstance(gates, dict):
        raise EdgeportError('--gates must be a JSON object like {"mnn_fp32": {"max_rel": 1e-4}}')
    return gates


def write_parity_json(directory: Path, result: dict, fix: str = "run without --write") -> None:
    """parity.json (atomically); an environment failure, or any other refusal to write, is one line naming the
    file and `fix`."""
    from .install import environment_failure

    path = directory / "parity.json"
    try:
        write_json(path, {k: v for k, v in result.items() if k != "markdown"})
    except OSError as e:
        why = environment_failure(e, f"writing {path}", elsewhere=fix)
        raise EdgeportError(why or f"cannot write {path}: {e.strerror or e}; {fix}") from None


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m export.parity", description=__doc__.splitlines()[0],
                      epilog="Trusted: this code (the target registry's gates) and the source checkpoint the "
                             "manifest names; judged: every file in ARTIFACT_DIR, the manifest included (its "
                             "recorded gates are never used). Exit status: 0 passed, 1 parity failed (a gate "
                             "breached, a file or its metadata not what the source rebuilds), 2 bad input "
                             "(not an export, a malformed manifest, a bad option, the environment failed).")
    p.add_argument("artifact_dir", type=Path, help="an export directory (artifacts/<model>/<form-tag>)")
    p.add_argument("--gates", help="JSON object (or file) laid over the registry's gates, e.g. "
                                   '{"mnn_fp32": {"max_rel": 1e-4}}; printed and recorded as gates_override')
    p.add_argument("--n-images", type=int, default=16, help="photos in the input set (+4 random tensors)")
    p.add_argument("--no-bisect", action="store_true", help="skip the first-diverging-layer search")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--write", action="store_true",
                   help="rewrite ARTIFACT_DIR/parity.json (left alone by default: the manifest hashes it), "
                        "under the directory's lock")
    args = p.parse_args(argv)
    try:
        override = _load_gates(args.gates)
        merge_gates(override)  # validated before any work
        d = args.artifact_dir
        if not d.is_dir():
            raise EdgeportError(f"artifact directory not found: {d} (make one with `make export MODEL=...`)")
        if args.write:
            from .install import destination_lock

            with destination_lock(d, waiting=lambda m: print(f"parity: {m}", file=sys.stderr, flush=True)):
                code, result = _check(d, args, override)
        else:
            code, result = _check(d, args, override)
    except EdgeportError as e:
        print(f"parity: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        from .install import environment_failure

        line = environment_failure(e, "running parity" + (" --write" if args.write else ""),
                                   elsewhere="copy the directory elsewhere")
        if line is None:
            raise
        print(f"parity: {line}", file=sys.stderr)
        return 2
    if code:
        print(f"parity FAILED: {result}", file=sys.stderr)
        return code
    if override:
        print(f"gates overridden from the command line (recorded as gates_override): {json.dumps(override)}")
    if args.json:
        print(json.dumps(jsonable({k: v for k, v in result.items() if k != "markdown"}), indent=2))
    else:
        print(result["markdown"])
    if not result["passed"]:
        print("parity FAILED:\n" + "\n".join(f"  {b}" for b in result["breaches"]), file=sys.stderr)
        for backend, b in result["bisection"].items():
            print(f"  bisection {backend}: {describe_bisection(b)}", file=sys.stderr)
        return 1
    return 0


def _check(d: Path, args, override: dict | None) -> tuple[int, dict | str]:
    """(0, result) after running parity, or (1, why) when the directory is not what its source rebuilds."""
    from .schemas import read_manifest
    from .source import build_models

    manifest = read_manifest(d)
    shipped = manifest_targets(manifest)
    tampered = verify_files(d, manifest)
    if tampered:
        return 1, tampered
    reference, inference, meta = build_models(manifest["source"])
    disagreements = metadata_disagreements(d, manifest, meta, shipped)
    if disagreements:
        return 1, "; ".join(disagreements)
    held_out = manifest["export"].get("held_out")
    if held_out is not None and not os.path.isdir(held_out) and any(
            targets.get(t).inputs == "held_out" for t in shipped):
        raise EdgeportError(f"the export judged its int8 targets on --val {held_out}, which is gone; put those "
                            "images back there to re-run parity on them")
    result = run_parity(d, reference, inference, meta, gates=override, n_images=args.n_images,
                        bisect=not args.no_bisect, write=False, target_names=shipped, held_out_dir=held_out)
    result["gates_override"] = override
    if args.write:
        write_parity_json(d, result)
        if "parity.json" in manifest["files"]:  # the manifest hashes it: keep them in step
            from .manifest import MANIFEST, sha256_file

            written = d / "parity.json"
            manifest["files"]["parity.json"] = {"size": written.stat().st_size, "sha256": sha256_file(written)}
            write_json(d / MANIFEST, manifest)
    return 0, result


if __name__ == "__main__":
    from runtime.cli import cli_main

    sys.exit(cli_main(main))
