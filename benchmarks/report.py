"""From the benchmark results: roofline fractions, the forms recommendation (the file export's `resolve_forms`
reads), the seed-claim verdicts and the Markdown report."""
from __future__ import annotations

from collections import Counter

import models

ENGINE_NAMES = {"torch": "PyTorch eager", "ort": "ONNX Runtime", "mnn": "MNN", "openvino": "OpenVINO"}
RUNTIME_ENGINES = ("ort", "mnn", "openvino")  # what a deployment runs (runtime.load); the fastest is recorded
# Export targets MNN first (ORT second): the per-model default follows MNN at one thread, the edge-board case.
BASIS = (("mnn", "1"), ("ort", "1"), ("torch", "1"))
FORM_KEYS = ("pconv", "mlp")
# A form must be this much faster (median paired ratio ≤ 0.99) to displace the baseline. Small on purpose: the
# default must stay within 2 % of the fastest form in a re-run, and a 1 % flip between runs costs at most 1 %.
MIN_GAIN = 0.01
# Seed 003: ConvNeXt-ExTiny converted to MNN, CPU: fc MLP 16.4 ms, 1x1-conv MLP 14.0 ms.
SEED003 = {"fc_ms": 16.4, "conv_ms": 14.0}


# ---------------------------------------------------------------------------------------------------------
# Derived numbers

def add_roofline(results: dict) -> None:
    """Every timing row gains gflops_per_s (2 × counted MACs / median latency) and roof_fraction (of the SGEMM
    peak at the same thread count)."""
    roof = results["roofline"]["gflops"]
    for r in results["models"].values():
        for by_threads in r["timings"].values():
            for threads, rows in by_threads.items():
                for tag, row in rows.items():
                    row["gflops_per_s"] = 2 * r["forms"][tag]["macs"] / (row["median_ms"] * 1e-3) / 1e9
                    row["roof_fraction"] = row["gflops_per_s"] / roof[threads]


def fastest(rows: dict) -> str:
    return min(rows, key=lambda tag: rows[tag]["median_ms"])


def _fastest_row(rows: dict) -> dict:
    tag = fastest(rows)
    return {"fastest": tag, **{k: rows[tag][k] for k in ("ratio", "ratio_p10", "ratio_p90")}}


def _basis(timings: dict) -> tuple[str, str]:
    """The (engine, threads) the default follows: BASIS order, else the first engine at its fewest threads."""
    for engine, threads in BASIS:
        if threads in timings.get(engine, {}):
            return engine, threads
    engine = next(e for e, _ in BASIS if e in timings)
    return engine, min(timings[engine], key=int)


def _choice(r: dict, engine: str, threads: str) -> tuple[str, bool]:
    """(form tag to use, whether it beat the baseline by at least MIN_GAIN at the median paired ratio)."""
    rows = r["timings"][engine][threads]
    best = fastest(rows)
    clear = best == r["baseline"] or rows[best]["ratio"] <= 1 - MIN_GAIN
    return (best if clear else r["baseline"]), clear


def _majority(entries: list[dict]) -> dict:
    out = {}
    for key in FORM_KEYS:
        votes = Counter(e[key] for e in entries if e.get(key))
        if votes:
            out[key] = votes.most_common(1)[0][0]
    return out


def recommend(results: dict) -> dict:
    """recommendation.json: top-level / by_family / by_model {"pconv", "mlp"} as export's resolve_forms reads
    it, plus by_engine {model: {engine: {threads: {fastest, ratio, ratio_p10, ratio_p90}}}} and the basis."""
    by_model, by_engine, basis_used = {}, {}, {}
    for name, r in results["models"].items():
        by_engine[name] = {engine: {t: _fastest_row(rows) for t, rows in by_threads.items()}
                           for engine, by_threads in r["timings"].items()}
        engine, threads = _basis(r["timings"])
        tag, clear = _choice(r, engine, threads)
        by_model[name] = {k: v for k, v in r["forms"][tag].items() if k in FORM_KEYS and v}
        basis_used[name] = {"engine": engine, "threads": int(threads), "form": tag, "fastest_clearly": clear}
    families = {}
    for name, r in results["models"].items():
        families.setdefault(r["family"], []).append(by_model[name])
    top = _majority(list(by_model.values()))
    fastest_engine = {name: row for name, r in results["models"].items()
                      if (row := fastest_engine_form(r["timings"])) is not None}
    aliases = {a: models.get_cfg(a).extra.get("alias_of") for a in models.list_models()}
    by_model.update({a: by_model[c] for a, c in aliases.items() if c in by_model and a not in by_model})
    return {**top,
            "by_family": {f: _majority(e) for f, e in families.items()},
            "by_model": by_model,
            "basis": basis_used,
            "by_engine": by_engine,
            "fastest_engine": fastest_engine,
            "rule": "per model, the form with the lowest median latency in MNN at 1 thread (else ORT, "
                    f"torch), unless its median paired ratio to the baseline is above {1 - MIN_GAIN:.2f} "
                    "(then the baseline)",
            "fastest_engine_rule": "per model, the (engine, form) of the runtime's engines "
                                   f"({', '.join(RUNTIME_ENGINES)}) with the lowest median latency at 1 thread, "
                                   "all timed in the same interleaved rounds on this host; vs_ort: its paired "
                                   "ratio to ONNX Runtime on the same form",
            "date": results["host"]["date"], "host": results["host"]["host"], "cpu": results["host"]["cpu"],
            "simd": results["host"].get("simd", [])}


def fastest_engine_form(timings: dict, threads: str = "1") -> dict | None:
    """{"engine", "form", "threads", "median_ms"[, "vs_ort", "vs_ort_p10", "vs_ort_p90"]}: the fastest
    (engine, form) among RUNTIME_ENGINES at `threads`, or None when none of them ran there."""
    cells = [(rows[tag]["median_ms"], engine, tag) for engine in RUNTIME_ENGINES
             if (rows := timings.get(engine, {}).get(threads)) for tag in rows]
    if not cells:
        return None
    median_ms, engine, tag = min(cells)
    row = timings[engine][threads][tag]
    paired = {k: row[k] for k in ("vs_ort", "vs_ort_p10", "vs_ort_p90") if k in row}
    return {"engine": engine, "form": tag, "threads": int(threads), "median_ms": median_ms, **paired}


def _verdict(row: dict, claimed: float) -> str:
    """The claim is a size (conv/fc ≈ `claimed`), not only a direction."""
    pct = abs(1 - row["ratio"]) * 100
    if row["ratio_p10"] <= claimed <= row["ratio_p90"]:
        return "holds (the seed's ratio is inside the spread)"
    if row["ratio_p90"] < 1.0:
        return f"direction only: conv {pct:.0f} % faster, not ~{(1 - claimed) * 100:.0f} %"
    if row["ratio_p10"] > 1.0:
        return f"does not hold: conv {pct:.0f} % slower"
    return "does not hold: no difference beyond the spread"


def seed003(results: dict) -> dict | None:
    """Seed 003's claim (1x1-conv MLP faster than fc in MNN on CPU) against this run's ConvNeXt numbers."""
    name = next((n for n, r in results["models"].items() if r["family"] == "convnext"), None)
    if name is None or "mnn" not in results["models"][name]["timings"]:
        return None
    out = {"model": name, "seed": {**SEED003, "ratio": SEED003["conv_ms"] / SEED003["fc_ms"]}, "here": {}}
    for threads, rows in results["models"][name]["timings"]["mnn"].items():
        conv = rows["conv"]  # ratios are conv / fc: fc is the baseline
        out["here"][threads] = {"fc_ms": rows["fc"]["median_ms"], "conv_ms": conv["median_ms"],
                                "ratio": conv["ratio"], "ratio_p10": conv["ratio_p10"],
                                "ratio_p90": conv["ratio_p90"],
                                "verdict": _verdict(conv, out["seed"]["ratio"])}
    return out


# ---------------------------------------------------------------------------------------------------------
# Markdown

def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(row: dict) -> str:
    return f"{row['ratio']:.2f} [{row['ratio_p10']:.2f}–{row['ratio_p90']:.2f}]"


def _threads_label(threads: str) -> str:
    return f"{threads} thread" + ("s" if threads != "1" else "")


def _measured(r: dict) -> str:
    m = r.get("measured")
    return f"\n\nmeasured {m['date']}, load average {m['load_start']} → {m['load_end']}" if m else ""


def forms_tables(by_model: dict) -> str:
    """Per model and thread count: every form's latency and paired ratio to the baseline, per engine."""
    out = []
    for name, r in by_model.items():
        engines = list(r["timings"])
        refs = [t for t in r.get("references", []) if t in r["forms"]]
        out.append(f"### {name} ({r['img_size']}², baseline `{r['baseline']}`"
                   + (f"; reference line: {', '.join(f'`{t}`' for t in refs)}, timed in the same rounds"
                      if refs else "") + ")" + _measured(r))
        for threads in next(iter(r["timings"].values())):
            paired = {e for e in engines if "vs_ort" in next(iter(r["timings"][e][threads].values()))}
            header = ["form", "GMACs"] + [f"{ENGINE_NAMES[e]} {x}" for e in engines
                                          for x in ("ms", "× base", "× ORT")[:3 if e in paired else 2]]
            best = {e: fastest(r["timings"][e][threads]) for e in engines}
            rows = []
            for tag, form in r["forms"].items():
                label = f"`{tag}` (reference)" if tag in refs else f"`{tag}`"
                row = [label, f"{form['macs'] / 1e9:.3f}"]
                for e in engines:
                    t = r["timings"][e][threads][tag]
                    bold = "**" if tag == best[e] else ""
                    row += [f"{bold}{t['median_ms']:.2f}{bold}", _ratio(t)]
                    if e in paired:
                        row.append(_ratio({"ratio": t["vs_ort"], "ratio_p10": t["vs_ort_p10"],
                                           "ratio_p90": t["vs_ort_p90"]}))
                rows.append(row)
            n = sorted({r["timings"][e][threads][tag]["iters"] for e in engines for tag in r["forms"]})
            n_text = f"{n[0]}" if len(n) == 1 else f"{n[0]}–{n[-1]} (time budget reached)"
            out.append(f"\n{_threads_label(threads)}, {n_text} rounds:\n\n" + _table(header, rows))
        if r["skipped"]:
            out.append("\nnot built: " + "; ".join(f"`{t}` ({why})" for t, why in r["skipped"].items()))
        bad = {f"{e}/{t}": err for e, errs in r["max_rel_err"].items() for t, err in errs.items()
               if not err <= 1e-3}
        if bad:
            out.append("\n**output mismatch vs PyTorch** (max rel. error): "
                       + ", ".join(f"{k} {v:.2g}" for k, v in bad.items()))
        out.append("")
    return "\n".join(out)


def _verdict_cell(row: dict) -> str:
    """The parity gate `make export` applies to this file, and what int8's fallback kept in float."""
    gates = ", ".join(f"{k} {'≥' if k in ('top1', 'cosine') else '≤'} {v:g}" for k, v in row["gates"].items())
    worst = {}
    for metrics in row["metrics"].values():
        for k in row["gates"]:
            if k in metrics and metrics[k] is not None:
                worse = min if k in ("top1", "cosine") else max  # the worst output's value
                worst[k] = worse(worst[k], metrics[k]) if k in worst else metrics[k]
    seen = ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
    kept = row.get("kept_in_float")
    kept_text = f"; {len(kept)} layer(s) kept in float" if kept else ""
    if row["breaches"]:
        return f"**FAILS its gate** ({gates}): {seen}{kept_text}"
    return f"passes ({gates}): {seen}{kept_text}"


def _accuracy_cells(acc: dict | None) -> list[str]:
    if not acc:
        return ["–", "–"]
    delta = acc.get("delta_top1_points")
    return [f"{100 * acc['top1']:.2f} ({acc['correct1']}/{acc['n']})", "–" if delta is None else f"{delta:+.2f}"]


def _accuracy_note(acc: dict | None) -> str:
    if not acc or not acc.get("measured"):
        return "top-1: – (" + (acc or {}).get("reason", "not measured (results from before the accuracy column)") + ")"
    calib = f"; int8 calibrated on {acc['calib']}" if acc.get("calib") else ""
    return (f"top-1 on {acc['data']} ({acc['n_images']} labelled images, {acc['skipped']} skipped) by "
            f"runtime.evaluate (ORT runs .onnx, MNN .mnn; a file shared by targets has one figure); trained "
            f"weights `{acc['weights']}`{calib}; int8 parity gates judged on the same val images.")


def precision_tables(results: dict) -> str:
    out = []
    for name, r in results.get("precision", {}).items():
        out.append(f"### {name} ({r['img_size']}², form `{r['form']}`, {_threads_label(str(r['threads']))})"
                   + _measured(r))
        for engine, rows in r["timings"].items():
            n = sorted({row["iters"] for row in rows.values()})
            header = ["target", "file", "MB", "compute", "ms", "× fp32", "top-1 %", "Δ pts vs model.onnx",
                      "parity gate (as `make export`)"]
            table = [[f"`{t}`", f"`{row['file']}`", f"{row['mb']:.1f}", row["compute"],
                      f"{row['median_ms']:.2f}", _ratio(row), *_accuracy_cells(row.get("accuracy")),
                      _verdict_cell(row)] for t, row in rows.items()]
            out.append(f"\n{ENGINE_NAMES[engine]}, {n[0]}{'' if len(n) == 1 else f'–{n[-1]}'} rounds:\n\n"
                       + _table(header, table))
        out.append("\n" + _accuracy_note(r.get("accuracy")))
        if r.get("failed"):
            out.append("\nnot built: " + "; ".join(f"`{t}` ({why})" for t, why in r["failed"].items()))
        out.append("")
    return "\n".join(out) if out else "(not run)"


def recommendation_table(rec: dict, results: dict) -> str:
    cols = [(e, t) for e in ("mnn", "ort", "openvino", "torch") for t in results["settings"]["threads"]]
    cols = [(e, str(t)) for e, t in cols if e in results["settings"]["engines"]]
    header = ["model", "default (export)"] + [f"{ENGINE_NAMES[e]} {_threads_label(t)}" for e, t in cols]
    header.append("fastest engine + form, 1 thread (× ORT, same form)")
    rows = []
    for name, b in rec["basis"].items():
        default = f"`{b['form']}`" + ("" if b["fastest_clearly"] else " (baseline: no clear winner)")
        cells = []
        for e, t in cols:
            d = rec["by_engine"][name][e][t]
            cells.append(f"`{d['fastest']}` {d['ratio']:.2f}")
        f = rec.get("fastest_engine", {}).get(name)
        cells.append(f"{ENGINE_NAMES[f['engine']]} `{f['form']}` {f['median_ms']:.2f} ms"
                     + (f" ({f['vs_ort']:.2f})" if "vs_ort" in f else "") if f else "")
        rows.append([name, default] + cells)
    return _table(header, rows)


def roofline_table(results: dict) -> str:
    roof = results["roofline"]["gflops"]
    cols = [(e, t) for e in results["settings"]["engines"] for t in map(str, results["settings"]["threads"])]
    header = ["model", "form"] + [f"{ENGINE_NAMES[e]} {_threads_label(t)}" for e, t in cols]
    rows = []
    for name, r in results["models"].items():
        for tag in r["forms"]:
            cells = []
            for e, t in cols:
                row = r["timings"][e][t][tag]
                cells.append(f"{row['gflops_per_s']:.1f} ({100 * row['roof_fraction']:.0f} %)")
            rows.append([name, f"`{tag}`"] + cells)
    rf = results["roofline"]
    peaks = ", ".join(f"{_threads_label(t)} {g:.1f} GFLOP/s" for t, g in roof.items())
    measured = ", ".join(f"{_threads_label(t)} {rf['start'][t]:.1f} / {rf['end'][t]:.1f}" for t in roof)
    engines = "; ".join(f"{_threads_label(t)}: " + ", ".join(f"{e} {g:.1f}" for e, g in by.items())
                        for t, by in rf.get("by_engine", {}).items())
    isa = "; ".join(f"{_threads_label(t)}: " + (f"{p['gflops']:.1f} GFLOP/s" if p["gflops"] else "unknown clock")
                    + f" ({p['isa']}, {p['fp32_lanes']} lanes; {p['assumed']})"
                    for t, p in rf.get("fma_peak", {}).items())
    return (f"SGEMM roof (best of PyTorch, ONNX Runtime and MNN, {rf['n']}² fp32 matmul): {peaks} (measured at "
            f"start / end: {measured}; the best of both, and never below the roof at fewer threads). Per engine "
            f"at the end: {engines or 'not recorded'}. The ISA's theoretical FMA peak: {isa or 'not recorded'}. "
            "FLOPs are counted "
            "as direct convolution: an engine using Winograd for 3x3 convs (MNN's CPU backend can) does "
            "fewer multiplications and can exceed 100 %.\n\n"
            + _table(header, rows))


def operator_table(results: dict) -> str:
    by_threads = results.get("operators") or {}
    if not by_threads:
        return "(not run)"
    threads = list(by_threads)
    keyed = {t: {(row["shape"], row["op"]): row for row in rows} for t, rows in by_threads.items()}
    header = ["shape", "op", "MACs (M) paper", "MACs (M) counted", "memory (M elem)"]
    header += [f"{x} {_threads_label(t)}" for t in threads for x in ("ms", "GFLOP/s")]
    rows = []
    for key, first in keyed[threads[0]].items():
        row = [first["shape"], first["op"], f"{first['macs_paper'] / 1e6:.1f}",
               f"{first['macs_counted'] / 1e6:.1f}", f"{first['memory_access'] / 1e6:.2f}"]
        for t in threads:
            row += [f"{keyed[t][key]['median_ms']:.3f}", f"{keyed[t][key]['gflops_per_s']:.1f}"]
        rows.append(row)
    return _table(header, rows)


def operator_highlights(results: dict) -> str:
    """PConv against Conv per shape: how much of its 16× FLOP saving turns into latency."""
    lines = []
    for t, rows in (results.get("operators") or {}).items():
        keyed = {(r["shape"], r["op"]): r for r in rows}
        for shape in dict.fromkeys(r["shape"] for r in rows):
            conv, pconv, dw = keyed[(shape, "conv")], keyed[(shape, "pconv")], keyed[(shape, "dwconv")]
            time_ratio = pconv["median_ms"] / conv["median_ms"]
            mac_ratio = conv["macs_paper"] / pconv["macs_paper"]
            lines.append(f"- {shape}, {_threads_label(t)}: PConv takes {time_ratio:.2f}× Conv's time for "
                         f"1/{mac_ratio:.0f} of its MACs; "
                         f"GFLOP/s Conv {conv['gflops_per_s']:.1f}, PConv {pconv['gflops_per_s']:.1f}, "
                         f"DWConv {dw['gflops_per_s']:.1f}")
    return "\n".join(lines)


def seed_section(results: dict) -> str:
    out = []
    rows = results["seed_checks"].get("seed000") or []
    if rows:
        out.append("Seed 000 — FasterNet(depths=(1,1,1,1), embed 96) at 256², torch.utils.flop_counter "
                   "(MACs = FLOPs / 2; fvcore's \"flops\" are MACs):\n")
        out.append(_table(["variant", "params (M) here", "seed", "GMACs here", "seed", "holds"],
                          [[r["variant"], f"{r['params_m']:.2f}", r["seed_params_m"], f"{r['gmacs']:.3f}",
                            r["seed_gmacs"], "yes" if r["holds"] else "**no**"] for r in rows]))
    s = results["seed_checks"].get("seed003")
    if s:
        seed = s["seed"]
        out.append("\nSeed 003 — \"ConvNeXt with a 1x1-conv MLP is faster than with nn.Linear in MNN on "
                   "CPU\" "
                   f"(seed: ConvNeXt-ExTiny, fc {seed['fc_ms']} ms vs conv {seed['conv_ms']} ms, conv/fc = "
                   f"{seed['ratio']:.2f}). Here, {s['model']} in MNN:\n")
        out.append(_table(["threads", "fc ms", "conv ms", "conv / fc [p10–p90]", "claim"],
                          [[t, f"{h['fc_ms']:.2f}", f"{h['conv_ms']:.2f}", _ratio(h), h["verdict"]]
                           for t, h in s["here"].items()]))
    return "\n".join(out) if out else "(not run)"


def settings_section(results: dict) -> str:
    h, s, v = results["host"], results["settings"], results["versions"]
    load = results.get("loadavg", {})
    lines = [
        f"- date: {h['date']}; host `{h['host']}`, {h['cpu']} ({h['cpus']} logical CPUs, {h['machine']}; "
        f"SIMD: {', '.join(h.get('simd', [])) or 'unknown'})",
        f"- load average (1/5/15 min) at start {load.get('start')}, at end {load.get('end')} — the machine "
        "was shared; ratios are paired per round, absolute times carry the load",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "onnxruntime", "MNN", "openvino",
                                                         "onnx", "onnxsim") if k in v),
        f"- timing: {s['warmup']} warm-up + {s['iters']} interleaved rounds per (model, engine, threads), "
        "order rotated each round; median, p10, p90; ratio = per-round time / the baseline's in that round",
        f"- budget: {s['budget_s'] or 'none'} s of warm-up + rounds per (model, engine, threads); past it a "
        "group stops after 3 rounds (the tables give the rounds done)",
        f"- threads: {', '.join(map(str, s['threads']))}; batch 1, fp32, "
        f"{'calibrated' if s['calibrated'] else 'random-init (uncalibrated)'} weights (as `make export`: BN "
        "statistics and layer scales from photos); input: one bundled photo through the model's preprocessing",
        "- engines: PyTorch eager (`torch.inference_mode`, `torch.set_num_threads`); ONNX Runtime and MNN "
        "through `runtime.load(path, threads=N).run(x)` (ORT: CPU provider, default graph optimisation, "
        "intra-op N, inter-op 1; MNN: CPU backend, precision normal, numThread N, 3x3 convs in F(2,3) Winograd "
        "tiles, the runtime default; OpenVINO: the same model.onnx, CPU plugin, f32 precision hint, "
        "INFERENCE_NUM_THREADS N, latency hint, no CPU pinning); the runtime's engines run in the same interleaved "
        "rounds (× ORT: paired ratio to ONNX Runtime on the same form); exported with "
        "`export.onnx_export` (opset 17, onnxsim) and `export.mnn_convert` (fp32)",
        f"- wall time {results['wall_s'] / 60:.1f} min: " + _stages(results),
    ]
    return "\n".join(lines)


def _stages(results: dict) -> str:
    """"roofline 3 s, models 400 s (build 60, export 90, check 20, time 230), ..." """
    per_model = Counter()
    for r in results["models"].values():
        per_model.update(r.get("seconds", {}))
    parts = []
    for k, v in results.get("seconds", {}).items():
        detail = f" ({', '.join(f'{s} {t:.0f}' for s, t in per_model.items())})" if k == "models" else ""
        parts.append(f"{k} {v:.0f} s{detail}")
    return ", ".join(parts)


def render(results: dict, rec: dict, plots: dict[str, str]) -> str:
    from .gelu import to_markdown as mnn_markdown

    parts = [
        "# Benchmarks: inference forms, operators, roofline",
        settings_section(results),
        "Reading the numbers: compare forms by their paired ratio, not by absolute times across runs. With "
        "as many threads as CPUs, any other process on the machine stalls the engines' thread pools "
        "(PyTorch's OpenMP barriers worst, ORT's spinning workers next), so multi-thread absolutes mostly "
        "measure the load; interleaving also alternates ORT sessions that each own a thread pool, a cost a "
        "single-model application does not pay. The `fused` PConv form folds the 3x3 PConv into fc1, "
        "turning a 1x1 conv into a dense 3x3 one (more MACs by construction).",
        "## Forms: latency and ratio to the baseline",
        "Ratios below 1 are faster than the model's baseline (the `fc` MLP form; for FasterNet "
        "`split_cat-fc`). Bold: the fastest form per engine. `[p10–p90]` is the spread of the paired "
        "per-round ratio.\n",
        forms_tables(results["models"]),
        "## Detectors: latency per backbone form against the fc variant",
        "YOLO11n with a zoo backbone (features-only, P3/P4/P5), calibrated random weights, one bundled photo "
        "letterboxed, 1 thread; boxes and scores decoded in the graph, NMS not timed. The baseline is the "
        "backbone's fc MLP form (FasterNet: `split_cat-fc`); plain `yolo11n` (its own backbone) runs in the "
        "same rounds as a reference line.\n",
        forms_tables(results.get("detectors") or {}) or "(not run)",
        "## Precision: int8 against fp32 and fp16 (host)",
        "Each model's default form (`recommendation.json`), one build holding every file; per engine the files "
        "run interleaved, ratio to the fp32 file. Gates are the targets' own (`export/targets.py`), judged "
        "as `make export` judges them (`export.parity.run_parity`; int8 on held-out images). On x86 MNN has "
        "no fp16 arithmetic: the `mnn_fp16w` file stores fp16 weights and computes in fp32 — the ARM numbers "
        "(`make arm-cost`) are where fp16 arithmetic shows. A model with labelled data "
        "(`benchmarks.precision.LABELLED`) is built from its trained weights, and each file shows its top-1 on "
        "the labelled val images and its difference in points from `model.onnx`; other models show –.\n",
        precision_tables(results),
        "## Recommendation (`recommendation.json`)",
        f"Export default (`by_model`): {rec['rule']}. Other cells: the fastest form and its ratio to the "
        "baseline.\n",
        recommendation_table(rec, results),
        "## MNN: per-op profile and GELU",
        "The exported files as shipped (`benchmarks/gelu.py`; per-op times from MNN's callbacks and ONNX Runtime's "
        "profiler, `python -m benchmarks.profile FILE` for any file). For GELU models, the shipped MNN files "
        "against the same graph converted with MNN's tanh GELU and with its scalar exact `GELU_STANDARD`.\n",
        "\n".join(mnn_markdown(results.get("mnn", {}))),
        "## Roofline: achieved GFLOP/s (2 × counted MACs / median latency) and fraction of SGEMM peak",
        roofline_table(results),
        "## Operator table (FasterNet paper, Table 1 style; PyTorch eager)",
        operator_highlights(results) + "\n",
        operator_table(results),
        "## Seed claims",
        seed_section(results),
    ]
    if plots:
        parts += ["## Plots", "\n".join(f"![{name}]({path})" for name, path in plots.items())]
    return "\n\n".join(parts) + "\n"
