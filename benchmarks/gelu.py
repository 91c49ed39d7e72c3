"""What the shipped MNN files cost: per-op profiles of model.mnn and model.onnx (benchmarks.profile), and for a
GELU model the shipped MNN files against the same graph converted with MNN's tanh GELU (the speed the engine can
reach) and with its scalar exact GELU_STANDARD (what was shipped before), interleaved at one thread on a photo,
with ONNX Runtime beside them. Each row says whether that file passes its gate (the parity suite's verdict on the
same export)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from export import mnn_convert, targets
from export.build import build_artifact
from export.inputs import sample_batch
from export.parity import run_parity
from export.source import build_models, form_tag, make_source

from .timing import interleaved, summarize

SHIPPED = ("mnn_fp32", "mnn_fp16w")
BASELINE = "tanh GELU (reference)"
ORT = "ONNX Runtime (model.onnx, Erf)"


def _has_gelu(onnx_path: Path) -> bool:
    import onnx

    from export.gelu import count_gelu

    return count_gelu(onnx.load(str(onnx_path))) > 0


def bench_mnn(model: str, pconv: str, mlp: str, iters: int, warmup: int, img_size: int | None = None,
              budget_s: float | None = None) -> dict:
    """{"profiles": {file: profile}, "gelu": {rows: {label: timing summary, file, max_rel, passes_gate},
    baseline} or None when the model has no GELU}."""
    import runtime

    from .profile import profile

    source = make_source(model, img_size=img_size, pconv=pconv, mlp=mlp)
    reference, inference, meta = build_models(source)
    work = Path(tempfile.mkdtemp(prefix="edgeport-gelu-"))
    try:
        names = ("ort", *SHIPPED)
        build_artifact(inference, meta, work, names)
        out = {"model": model, "form": {"pconv": pconv, "mlp": mlp}, "form_tag": form_tag(meta),
               "img_size": meta["input_shape"][-1],
               "profiles": {f: {**profile(work / f, threads=1, runs=iters), "artifact": f"{model}/{f}"}
                            for f in (targets.get("mnn_fp32").file, targets.get("ort").file)},
               "gelu": None}
        if not _has_gelu(work / "model.onnx"):
            return out
        verdict = run_parity(work, reference, inference, meta, bisect=False, write=False, target_names=names)
        extra = {BASELINE: ("model.tanh.mnn", True), "GELU_STANDARD (exact, MNN's own)": ("model.erf.mnn", False)}
        for fname, approx in extra.values():
            mnn_convert.convert(work / "model.onnx", work / fname, "{}", log_path=work / "convert.log",
                                gelu_approximation=approx)
        x = sample_batch(meta, n_images=1, n_random=0)
        files = {f"{t} ({targets.get(t).file}, GELU {targets.get(t).gelu})": (targets.get(t).file, t)
                 for t in SHIPPED}
        files.update({label: (fname, None) for label, (fname, _) in extra.items()})
        files[ORT] = ("model.onnx", "ort")
        fns = {}
        for label, (fname, _) in files.items():
            predictor = runtime.load(work / fname, threads=1)
            fns[label] = (lambda p: lambda: p.run(x))(predictor)
        times = interleaved(fns, iters=iters, warmup=warmup, max_seconds=budget_s)
        rows, vs_ort = summarize(times, baseline=BASELINE), summarize(times, baseline=ORT)
        for label, (fname, target) in files.items():
            rows[label]["vs_ort"] = {k: vs_ort[label][k] for k in ("ratio", "ratio_p10", "ratio_p90")}
            rows[label]["file"] = fname
            if target:
                breaches = [b for b in verdict["breaches"] if b.startswith(f"{target}:")]
                rows[label]["passes_gate"] = not breaches
                rows[label]["max_rel"] = max(m["max_rel"] for m in verdict["results"][target].values())
        out["gelu"] = {"baseline": BASELINE, "rows": rows}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fastest_passing(gelu: dict) -> tuple[str, dict] | None:
    """The fastest shipped MNN file that passes its gate, and its row."""
    rows = {k: r for k, r in gelu["rows"].items() if r.get("passes_gate") and k != ORT}
    if not rows:
        return None
    label = min(rows, key=lambda k: rows[k]["median_ms"])
    return label, rows[label]


def _spread(r: dict) -> str:
    return f"{r['ratio']:.2f} [{r['ratio_p10']:.2f}–{r['ratio_p90']:.2f}]"


def to_markdown(results: dict) -> list[str]:
    from export.tables import markdown_table

    from .profile import to_markdown as profile_markdown

    lines = []
    for name, r in results.items():
        form = r.get("form_tag") or f"{r['form']['pconv'] or '-'}-{r['form']['mlp'] or '-'}"  # older results
        lines += [f"### {name} ({form}, {r['img_size']}²)", ""]
        if r.get("measured"):
            m = r["measured"]
            lines += [f"measured {m['date']}, load average {m['load_start']} → {m['load_end']}", ""]
        if r["gelu"]:
            g = r["gelu"]
            lines += ["MNN and ONNX Runtime at 1 thread on one photo, interleaved; ratios = per-round time / the "
                      "tanh-GELU conversion's, and / ONNX Runtime's:", ""]
            rows = [[label, f"{row['median_ms']:.2f}", _spread(row), _spread(row["vs_ort"]) if "vs_ort" in row else "-",
                     "-" if "max_rel" not in row else f"{row['max_rel']:.2g}",
                     "-" if "passes_gate" not in row else ("yes" if row["passes_gate"] else "no")]
                    for label, row in g["rows"].items()]
            lines += markdown_table(["file", "median ms", "× tanh conversion [p10–p90]", "× ONNX Runtime [p10–p90]",
                                     "max_rel vs PyTorch", "passes its gate"], rows, "lrrrrl")
            best = fastest_passing(g)
            if best:
                lines += ["", f"Fastest MNN file that passes its gate: {best[0]}, {best[1]['ratio']:.2f}× the "
                              "tanh-GELU conversion."]
            lines.append("")
        for profile in r["profiles"].values():
            lines += [profile_markdown(profile), ""]
    return lines
