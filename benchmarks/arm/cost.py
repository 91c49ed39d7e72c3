"""Deterministic aarch64 instruction counts per inference for each exported variant of a model, for both engines.

    python -m benchmarks.arm.cost [MODEL_DIR ...] [--configs cortex-a76:ort cortex-a76:mnn_fp32 ...]
                                  [--variants TAG ...]

A MODEL_DIR is artifacts/<model>/ whose form-tag subdirs (fc vs conv MLP, PConv forms, ...) hold the targets'
files (default: every artifacts/*/). Each variant is counted under each config (qemu -cpu : MNN or onnxruntime
target of export.targets, run at that target's precision) by the insncount TCG plugin: total and by class
(load/store, SIMD/FP, other), as ratios to the variant with the fc MLP form, and to every other target counted for
the same variant on the same CPU (cortex-a76:ort against cortex-a76:mnn_fp32: the engine comparison;
neoverse-n1:mnn_int8 against neoverse-n1:mnn_fp16w_low). The default CPUs are the boards people buy: cortex-a76
(Raspberry Pi 5) and cortex-a72 (Raspberry Pi 4); neoverse-n1 (AWS Graviton2, Ampere Altra) and cortex-a53 by
--configs. MNN is counted under Debian 12's qemu 7.2 (exactly repeatable), onnxruntime under the qemu 10 that
`make arm-setup` builds with TCG plugins (its wheel crashes under 7.2); see benchmarks/arm/run.py. Detector
directories count like classifiers (the input is a letterboxed photo). Writes arm_cost.json and arm_cost.md under
benchmarks/results/arm/.

Instruction counts are a proxy, not latency.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import replace
from pathlib import Path

from export import targets
from export.tables import markdown_table
from models.errors import EdgeportError
from runtime.atomic import write_atomic, write_json

from .parity import ENGINES, MNN_PRECISION, read_metadata
from .run import COUNT_KEYS, COUNTED_RUNS, REPO, guest_infer, steady_counts, versions

# Raspberry Pi 5 (cortex-a76: ARMv8.2, fp16 arithmetic and dot product) with both engines and MNN's fp16 path;
# Raspberry Pi 4 (cortex-a72: ARMv8.0, no fp16 arithmetic) with both engines.
DEFAULT_CONFIGS = ("cortex-a76:ort", "cortex-a76:mnn_fp32", "cortex-a76:mnn_fp16w_low",
                   "cortex-a72:ort", "cortex-a72:mnn_fp32")
FP32 = targets.get("mnn_fp32")
ONNX = targets.get("ort")
# MNN's counts repeat exactly (qemu 7.2). onnxruntime's, under qemu 10, repeat within ~4e-5 when no
# counted run executes its occasional extra ~0.3 % (run.steady_counts), else within 3e-3: below the form and
# engine differences compared here (2-25 %).
REPEAT_TOLERANCE = 5e-3
PROXY_NOTE = ("Instruction counts are a proxy, not latency: qemu counts the guest instructions the engines' "
              "aarch64 kernels execute, with no model of pipelines, caches, memory bandwidth or the "
              "throughput of fp16 versus fp32 units; emulated wall time is not ARM latency either. Use the "
              "ratios to compare variants, and measure on a board before quoting speed.")


def variant_dirs(model_dir: Path) -> list[Path]:
    return sorted({p.parent for f in (FP32.file, ONNX.file) for p in model_dir.glob(f"*/{f}")})


def parse_config(spec: str) -> tuple[str, targets.Target]:
    """CPU:TARGET, or CPU:TARGET@low: the target's file run at MNN precision low instead of its own (e.g.
    mnn_int8@low: int8 convolutions with every float op in fp16, which the registry does not ship)."""
    cpu, _, name = spec.partition(":")
    name, _, precision = name.partition("@")
    target = targets.get(name or FP32.name)
    if target.engine not in ENGINES:
        raise EdgeportError(f"--configs {spec}: {target.name} is not an MNN or onnxruntime target")
    if precision and target.engine != "mnn":
        raise EdgeportError(f"--configs {spec}: onnxruntime runs {target.file} at its own precision; drop "
                            f"'@{precision}'")
    if precision and precision not in MNN_PRECISION:
        raise EdgeportError(f"--configs {spec}: precision '{precision}'; use {' or '.join(MNN_PRECISION)}")
    if precision and precision != target.precision:
        compute = target.compute if target.compute != "fp32" else "fp16"
        target = replace(target, name=f"{target.name}@{precision}", precision=precision,
                         compute=f"{compute}+fp16" if compute == "int8" else compute)
    return cpu, target


def pick_baseline(variants: list[dict], tag: str | None) -> dict:
    if tag:
        for v in variants:
            if v["variant"] == tag:
                return v
        have = ", ".join(v["variant"] for v in variants)
        raise EdgeportError(f"--baseline {tag}: no such variant; have {have}")
    fc = [v for v in variants if v["mlp"] == "fc"]
    fc.sort(key=lambda v: (v["pconv"] not in (None, "split_cat"), v["variant"]))
    return (fc or variants)[0]


def count_variant(vdir: Path, meta: dict, cpu: str, target, repeat: int, cache) -> dict | None:
    """Counts of one target's file of one variant, or None when the variant has no such file."""
    from export.inputs import sample_batch

    path = vdir / target.file
    if not path.is_file():
        return None
    x = sample_batch(meta, n_images=1, n_random=0)
    runs = [guest_infer(path, x, cpu, MNN_PRECISION[target.precision], counted_runs=COUNTED_RUNS, cache=cache)
            for _ in range(repeat)]
    counts = [steady_counts(r) for r in runs]
    totals = [c["total"] for c in counts]
    repeatable = all(c == counts[0] for c in counts) if repeat > 1 else None  # None: not checked
    return {"file": path.name, "counts": min(counts, key=lambda c: c["total"]), "repeatable": repeatable,
            "totals": totals, "spread": round(max(totals) / min(totals) - 1, 7),
            "repeats": repeat, "first_counted_run": runs[0].counts[0], "device": runs[0].device,
            "versions": runs[0].versions}


def spread_text(res: dict) -> str:
    if res.get("repeatable") is None:
        return "not checked"
    return "equal" if res["repeatable"] else f"within {res['spread']:.1e}"


def ratio(a: dict, b: dict) -> dict:
    return {k: round(a[k] / b[k], 4) if b[k] else None for k in COUNT_KEYS}


def cost_model(model_dir, configs=DEFAULT_CONFIGS, baseline=None, repeat=2, cache=None, log=print,
               only=None) -> dict:
    """`only`: the variant (form-tag dir) names to count, e.g. the baseline and one other of a detector."""
    model_dir = Path(model_dir)
    vdirs = variant_dirs(model_dir)
    if only:
        vdirs = [d for d in vdirs if d.name in only]
    if not vdirs:
        raise EdgeportError(f"no <form-tag>/{FP32.file} or {ONNX.file} under {model_dir}"
                            + (f" for variants {', '.join(only)}" if only else "")
                            + "; export the model (make export)")
    host_versions = versions(cache)
    variants = []
    for vdir in vdirs:
        meta = read_metadata(vdir)
        variants.append({"variant": vdir.name, "pconv": meta.get("pconv"), "mlp": meta.get("mlp"),
                         "dir": str(vdir), "meta": meta})
    base = pick_baseline(variants, baseline)
    rows = []
    for spec in configs:
        cpu, target = parse_config(spec)
        for v in variants:
            res = count_variant(Path(v["dir"]), v["meta"], cpu, target, repeat, cache)
            if res is None:
                log(f"  {v['variant']:<24} {cpu:<12} {target.name:<14} no {target.file}: skipped")
                continue
            row = {"variant": v["variant"], "pconv": v["pconv"], "mlp": v["mlp"], "cpu": cpu,
                   "target": target.name, "compute": target.compute, "img_size": v["meta"]["input_shape"][-1],
                   **res, "versions": {**host_versions, **res["versions"]}}
            rows.append(row)
            log(f"  {v['variant']:<24} {cpu:<12} {target.name:<14} {row['file']:<16} "
                f"total {res['counts']['total']:>14,}  repeats {spread_text(res)}")
    for r in rows:
        b = [x for x in rows if x["variant"] == base["variant"] and x["cpu"] == r["cpu"]
             and x["target"] == r["target"]]
        r["ratio_to_baseline"] = ratio(r["counts"], b[0]["counts"]) if b else None
        fp32 = [x for x in rows if x["variant"] == r["variant"] and x["cpu"] == r["cpu"]
                and x["target"] == FP32.name]
        r["ratio_to_fp32_same_cpu"] = ratio(r["counts"], fp32[0]["counts"]) if fp32 else None
        r["total_vs_targets_same_cpu"] = {
            x["target"]: round(r["counts"]["total"] / x["counts"]["total"], 4) for x in rows
            if x is not r and x["variant"] == r["variant"] and x["cpu"] == r["cpu"] and x["counts"]["total"]}
    model = variants[0]["meta"].get("model") or model_dir.name
    return {"model": model, "dir": str(model_dir), "baseline": base["variant"], "rows": rows}


def markdown(report: dict) -> str:
    lines = ["# aarch64 instruction counts per inference (qemu-user TCG plugin)", "", f"**{PROXY_NOTE}**", "",
             f"Input: {report['input']}. Counting: {report['method']}", ""]
    v = report["versions"]
    lines += ["Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)), ""]
    used = sorted({r["versions"].get("qemu_used") for m in report["models"] for r in m["rows"]} - {None})
    if used:
        lines += [f"Counted by qemu-aarch64 {' and '.join(used)}.", ""]
    for m in report["models"]:
        lines += [f"## {m['model']} (baseline for ratios: `{m['baseline']}`)", ""]
        rows = []
        for r in m["rows"]:
            c, q, f32 = r["counts"], r["ratio_to_baseline"], r["ratio_to_fp32_same_cpu"]
            rows.append([r["variant"], r["pconv"], r["mlp"], r["cpu"], r["target"], r["file"],
                         *(f"{c[k]:,}" for k in COUNT_KEYS),
                         *(f"{q[k]:.3f}" if q else "-" for k in COUNT_KEYS),
                         f"{f32['total']:.3f}" if f32 else "-", spread_text(r)])
        lines += markdown_table(["variant", "pconv", "mlp", "cpu", "target", "file", "total", "load/store",
                                 "SIMD/FP", "other", "×total vs baseline", "×load/store", "×SIMD/FP", "×other",
                                 "×total vs mnn_fp32", "repeats"], rows, "llllllrrrrrrrrrl")
        lines += ["", *precision_lines(m["rows"]), ""]
    return "\n".join(lines)


def precision_lines(rows: list[dict]) -> list[str]:
    """Per variant and CPU, each target's total against the others counted there (int8 vs fp16 vs fp32), with
    the CPU features MNN reported (i8sdot: the dot-product instructions its int8 kernels use)."""
    out = []
    for r in rows:
        if r.get("total_vs_targets_same_cpu"):
            features = ", ".join(f"{k} {v}" for k, v in r["device"].items() if k in ("fp16", "i8sdot", "i8mm"))
            vs = ", ".join(f"{r['total_vs_targets_same_cpu'][t]:.3f}× {t}" for t in r["total_vs_targets_same_cpu"])
            out.append(f"- `{r['variant']}` on {r['cpu']} ({features or 'features not reported'}): "
                       f"{r['target']} ({r['compute']}, `{r['file']}`) = {vs}")
    return out


def default_model_dirs(root="artifacts") -> list[str]:
    found = glob.glob(os.path.join(root, "*", "*", FP32.file)) + glob.glob(os.path.join(root, "*", "*", ONNX.file))
    return sorted({os.path.dirname(os.path.dirname(p)) for p in found})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="aarch64 instruction counts per inference, per exported variant")
    p.add_argument("model_dirs", nargs="*", help="artifacts/<model>/ dirs (default: all under artifacts/)")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="CPU:TARGET pairs (qemu -cpu model : MNN or onnxruntime target, e.g. cortex-a76:ort "
                        f"neoverse-n1:mnn_fp16w_low; default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--baseline", default=None,
                   help="variant (form-tag dir) the ratios divide by (default: the fc MLP form)")
    p.add_argument("--repeat", type=int, default=2,
                   help=f"count each config this many times; the smallest total is reported, and the totals must "
                        f"agree within {REPEAT_TOLERANCE:.0e} (relative) or the exit status is 1")
    p.add_argument("--variants", nargs="+", help="only these variants (form-tag dirs), e.g. split_cat-fc")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "arm"))
    p.add_argument("--cache", default=None, help="ARM environment dir (default .cache/arm)")
    a = p.parse_args(argv)
    try:
        dirs = a.model_dirs or default_model_dirs()
        if not dirs:
            raise EdgeportError(f"no artifacts/<model>/<form>/{FP32.file} or {ONNX.file}; run `make export` or "
                                "pass model dirs")
        models = []
        for d in dirs:
            print(f"{d}:", flush=True)
            models.append(cost_model(d, a.configs, a.baseline, a.repeat, a.cache,
                                     log=lambda s: print(s, flush=True), only=a.variants))
        report = {"note": PROXY_NOTE, "versions": versions(a.cache),
                  "input": "export.inputs.sample_batch(n_images=1, n_random=0): one photo through the "
                           "model's preprocessing, batch 1",
                  "method": f"insncount TCG plugin; per config and repeat: 1 uncounted inference, {COUNTED_RUNS} "
                            "counted ones, the smallest after the first kept; the smallest of the repeats "
                            "reported; MNN numThread 1, onnxruntime 1 intra-op thread, ASLR off, PYTHONHASHSEED=0",
                  "configs": a.configs, "models": models}
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "arm_cost.json", report)
        write_atomic(out / "arm_cost.md", markdown(report) + "\n")
    except EdgeportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{PROXY_NOTE}\n-> {out / 'arm_cost.json'}, {out / 'arm_cost.md'}")
    not_repeatable = [r for m in models for r in m["rows"] if r.get("spread", 0) > REPEAT_TOLERANCE]
    for r in not_repeatable:
        print(f"error: {r['variant']} {r['cpu']}:{r['target']} counts differ by {r['spread']:.1e} between "
              f"repeats ({r['totals']})", file=sys.stderr)
    return 1 if not_repeatable else 0


if __name__ == "__main__":
    raise SystemExit(main())
