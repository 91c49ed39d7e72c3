"""Many boards side by side: merge edgeport-bench results (schema edgeport.board-results) into one report.

  python -m benchmarks.devices pi5.json rk3588.json host.json [--out DIR]

Writes DIR/devices.md (one table per model: form × file rows, a column per device with ms and × fc; per device
whether seed 003's claim — a 1x1-conv MLP runs faster than the fc one in MNN on CPU, conv/fc ≈ 0.85 — holds)
and DIR/devices.png (ratio to the fc baseline per form, a bar per device, one panel per engine file).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from runtime.atomic import write_atomic
from runtime.cli import OneLineParser, cli_main
from runtime.device import BoardResults, describe, read_results
from runtime.errors import EdgeRuntimeError

from .report import SEED003, _verdict

SEED003_RATIO = SEED003["conv_ms"] / SEED003["fc_ms"]


def device_labels(boards: list[BoardResults]) -> list[str]:
    """Short, unique column names: hostname (or CPU), "emulated" marked."""
    labels = []
    for b in boards:
        d = b.device
        core = d.clusters[0].core if d.clusters else d.cpu_model
        label = f"{d.hostname or d.machine}: {core}" + (" (emulated)" if d.emulated else "")
        n = sum(1 for x in labels if x == label or x.startswith(label + " #"))
        labels.append(label if not n else f"{label} #{n + 1}")
    return labels


def row_key(r) -> tuple:
    return r.form, r.target or Path(r.file).name, r.engine, r.precision


def merged_rows(boards: list[BoardResults]) -> dict[str, dict[tuple, list]]:
    """{model: {(form, target, engine, precision): [result or None per board]}}, baseline rows first."""
    out: dict[str, dict[tuple, list]] = {}
    for i, b in enumerate(boards):
        model = b.run.model or "(files)"
        # stable: the forms keep the bench's (bundle's) order, baseline first
        for r in sorted(b.results, key=lambda r: (r.engine, r.target, r.precision, not r.baseline)):
            out.setdefault(model, {}).setdefault(row_key(r), [None] * len(boards))[i] = r
    return out


def claim_rows(board: BoardResults) -> list[dict]:
    """Seed 003 on one device: for every MNN fp32 file, the fc baseline's conv twin (same PConv form)."""
    base = board.run.baseline_form
    if not base.endswith("fc"):
        return []
    twin = base[: -len("fc")] + "conv"
    rows = []
    for r in board.results:
        if r.form == twin and r.engine == "mnn" and r.ratio_to_baseline is not None:
            row = {"ratio": r.ratio_to_baseline, "ratio_p10": r.ratio_p10, "ratio_p90": r.ratio_p90}
            rows.append({"target": r.target or Path(r.file).name, "precision": r.precision, **row,
                         "verdict": _verdict(row, SEED003_RATIO)})
    return rows


def _cell(r) -> str:
    if r is None:
        return "—"
    ratio = "" if r.ratio_to_baseline is None else f" ({r.ratio_to_baseline:.3f}×)"
    return f"{r.median_ms:.2f}{ratio}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


EMULATED_NOTE = ("Emulated devices (qemu-user) time qemu translating the ARM code on its host, without instruction "
                 "counts: their ms and × fc are **not the ARM CPU's latency** (nor its ratios). They show that every "
                 "form runs with every engine there; choose on a real board.")


def report(boards: list[BoardResults], files: list[str], labels: list[str], plot: str | None) -> str:
    lines = ["# Board results", "", "Timed on each device by `edgeport-bench` (forms interleaved in rounds; "
             "× fc is the median per-round ratio to the fc baseline on that device, same engine and file).", ""]
    lines += _table(["device", "CPU (ISA)", "engines", "threads / cores", "rounds", "drift", "emulated", "file"],
                    [[lab, describe(b.device).removesuffix(" EMULATED"),
                      ", ".join(f"{k} {v}" for k, v in b.device.engines.items() if k != "numpy"),
                      f"{b.run.threads} / {','.join(map(str, b.run.cores))}", b.run.rounds,
                      f"{b.drift.ratio:.3f}" if b.drift else "—", "**yes**" if b.device.emulated else "no",
                      f"`{f}`"] for lab, b, f in zip(labels, boards, files)])
    if any(b.device.emulated for b in boards):
        lines += ["", EMULATED_NOTE]
    for model, rows in merged_rows(boards).items():
        lines += ["", f"## {model}: ms (× fc)", ""]
        lines += _table(["form", "file", "engine", "precision", *labels],
                        [[*key[:4], *(_cell(r) for r in results)] for key, results in rows.items()])
    lines += ["", f"## Seed 003 per device: 1x1-conv MLP vs fc in MNN (claimed conv/fc {SEED003_RATIO:.3f})", ""]
    claim = [[lab, c["target"], c["precision"], f"{c['ratio']:.3f} ({c['ratio_p10']:.2f}–{c['ratio_p90']:.2f})",
              c["verdict"] + (" (emulated: not latency)" if b.device.emulated else "")]
             for lab, b in zip(labels, boards) for c in claim_rows(b)]
    lines += _table(["device", "file", "precision", "conv / fc (p10–p90)", "verdict"], claim) if claim else [
        "No device timed an MNN fc baseline with its conv twin."]
    if plot:
        lines += ["", f"![ratio to fc per form and device]({plot})"]
    return "\n".join(lines) + "\n"


def plot(boards: list[BoardResults], labels: list[str], path: Path) -> None:
    """One panel per (engine, file, precision): ratio to fc per form, a bar (p10–p90 whisker) per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict] = {}
    for i, b in enumerate(boards):
        for r in b.results:
            if r.ratio_to_baseline is not None:
                form, *panel = row_key(r)
                panels.setdefault(tuple(panel), {}).setdefault(form, [None] * len(boards))[i] = r
    keys = sorted(panels, key=lambda k: (k[1], k[0], k[2]))
    cols = min(3, len(keys)) or 1
    rows = (len(keys) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    width = 0.8 / len(boards)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        forms = list(panels[key])
        for i, label in enumerate(labels):
            values = [panels[key][f][i] for f in forms]
            xs = [j + (i - (len(boards) - 1) / 2) * width for j in range(len(forms))]
            ys = [r.ratio_to_baseline if r else float("nan") for r in values]
            err = [[(r.ratio_to_baseline - r.ratio_p10) if r else 0 for r in values],
                   [(r.ratio_p90 - r.ratio_to_baseline) if r else 0 for r in values]]
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=label, hatch="//" if boards[i].device.emulated else None,
                   alpha=0.85)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(forms)))
        ax.set_xticklabels(forms, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("× fc baseline (lower is faster)", fontsize=8)
        ax.set_title(f"{key[1]}: {key[0]} ({key[2]})", fontsize=9)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(3, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, 1.0 + 0.04 / rows))
    fig.tight_layout()
    if any(b.device.emulated for b in boards):
        fig.text(0.5, -0.01, "hatched: emulated (qemu-user) — time of the emulator on its host, not the ARM CPU's "
                 "latency", ha="center", va="top", fontsize=8, style="italic")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m benchmarks.devices", description=__doc__.split("\n\n")[0],
                      epilog="Exit status: 0 written; 2 a results file is missing or invalid (one line naming it "
                             "and the field).")
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="edgeport-bench --json files")
    p.add_argument("--out", default="artifacts/devices", help="directory for devices.md and devices.png "
                   "(default artifacts/devices)")
    args = p.parse_args(argv)
    try:
        boards = [read_results(f) for f in args.results]
    except EdgeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = device_labels(boards)
    plot(boards, labels, out / "devices.png")
    text = report(boards, args.results, labels, "devices.png")
    write_atomic(out / "devices.md", text)
    print(text)
    print(f"wrote {out / 'devices.md'}, {out / 'devices.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
