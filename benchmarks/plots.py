"""PNG figures of the benchmark results (matplotlib, Agg): latency per form and engine; FLOPs vs latency."""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from .report import ENGINE_NAMES  # noqa: E402

COLORS = {"torch": "#d62728", "ort": "#1f77b4", "mnn": "#2ca02c", "openvino": "#9467bd"}
MARKERS = {"torch": "s", "ort": "o", "mnn": "^", "openvino": "D"}


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _title(results: dict) -> str:
    h = results["host"]
    return f"{h['cpu']} ({h['cpus']} CPUs), {h['date'][:10]}, load {results['loadavg']['start']}"


def latency_plot(results: dict, path: Path) -> None:
    """One panel per model: median latency (p10–p90 whiskers) per form and engine; more threads hatched."""
    names = list(results["models"])
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        r = results["models"][name]
        tags = list(r["forms"])
        series = [(e, t) for e in r["timings"] for t in r["timings"][e]]
        width = 0.8 / len(series)
        for i, (e, t) in enumerate(series):
            rows_ = r["timings"][e][t]
            med = [rows_[tag]["median_ms"] for tag in tags]
            err = [[m - rows_[tag]["p10_ms"] for tag, m in zip(tags, med)],
                   [rows_[tag]["p90_ms"] - m for tag, m in zip(tags, med)]]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(tags))]
            ax.bar(xs, med, width, yerr=err, color=COLORS[e], alpha=1.0 if t == "1" else 0.55,
                   hatch=None if t == "1" else "//", edgecolor="white", linewidth=0.3, capsize=1.5,
                   error_kw={"elinewidth": 0.6}, label=f"{ENGINE_NAMES[e]}, {t} thr")
        ax.set_xticks(range(len(tags)))
        many = len(tags) > 3
        ax.set_xticklabels(tags, rotation=30 if many else 0, ha="right" if many else "center", fontsize=8)
        ax.set_ylabel("median latency (ms)")
        if max(ax.get_ylim()[1], 1e-9) / min(r["timings"][e][t][tag]["median_ms"] for e, t in series
                                              for tag in tags) > 15:
            ax.set_yscale("log")  # one slow series (e.g. threads fighting other load) would flatten the rest
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{name} ({r['img_size']}², baseline {r['baseline']})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Latency per inference form and engine (batch 1, fp32) — " + _title(results), fontsize=10)
    fig.tight_layout(rect=(0, 0.06 / rows, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    _save(fig, path)


def flops_plot(results: dict, path: Path) -> None:
    """Per thread count: GFLOPs against latency for every (model, form, engine), with the SGEMM roofline."""
    threads = [str(t) for t in results["settings"]["threads"]]
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.8), squeeze=False)
    model_colors = dict(zip(results["models"], plt.get_cmap("tab10").colors))
    for ax, t in zip(axes.flat, threads):
        flops = []
        for name, r in results["models"].items():
            for e, by_threads in r["timings"].items():
                xs = [2 * r["forms"][tag]["macs"] / 1e9 for tag in by_threads[t]]
                ys = [row["median_ms"] for row in by_threads[t].values()]
                flops += xs
                ax.scatter(xs, ys, color=model_colors[name], marker=MARKERS[e], s=28, alpha=0.8,
                           edgecolors="black", linewidths=0.3)
        peak = results["roofline"]["gflops"][t]
        lo, hi = min(flops) / 1.5, max(flops) * 1.5
        ax.plot([lo, hi], [1e3 * lo / peak, 1e3 * hi / peak], "k--", lw=1,
                label=f"SGEMM peak {peak:.0f} GFLOP/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GFLOPs per image (2 × counted MACs)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{t} thread{'s' * (t != '1')}", fontsize=10)
        ax.grid(which="both", alpha=0.3)
        for name, c in model_colors.items():
            ax.scatter([], [], color=c, marker="o", label=name)
        for e in next(iter(results["models"].values()))["timings"]:
            ax.scatter([], [], color="white", edgecolors="black", marker=MARKERS[e], label=ENGINE_NAMES[e])
        ax.legend(fontsize=7)
    fig.suptitle("FLOPs vs latency; dashed: the time at SGEMM peak — " + _title(results), fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def make_plots(results: dict, out: Path) -> dict[str, str]:
    """Writes the PNGs into `out`; returns {title: file name} for the report."""
    if not results["models"]:
        return {}
    latency_plot(results, out / "latency.png")
    flops_plot(results, out / "flops_latency.png")
    return {"latency per form and engine": "latency.png", "FLOPs vs latency": "flops_latency.png"}
