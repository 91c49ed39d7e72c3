"""manifest.json (machine-readable record of an export) and report.md (the same, for people)."""
from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from runtime.atomic import write_atomic

from .source import sha256_file
from .tables import markdown_table

TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "MNN", "openvino", "numpy")
MANIFEST, REPORT = "manifest.json", "report.md"


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    commit = _git_commit()
    if commit:
        versions["edgeport_git"] = commit
    return versions


def _git_commit() -> str | None:
    """HEAD of the source checkout (+ "-dirty" with local changes): the code is part of what an export is."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = {"cwd": root, "capture_output": True, "text": True, "timeout": 10}
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def file_entries(directory: Path, skip=(MANIFEST, REPORT)) -> dict[str, dict]:
    """{name: {size, sha256}} for every file of the artifact directory, sorted by name."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in skip}


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _histogram_table(raw: dict, final: dict) -> list[str]:
    ops = list(final) + [op for op in raw if op not in final]
    rows = [[op, raw.get(op, 0), final.get(op, 0)] for op in ops]
    rows.append(["**total**", sum(raw.values()), sum(final.values())])
    return markdown_table(["op", "exported", "simplified"], rows, "lrr")


def _record_lines(record: dict) -> list[str]:
    """What an int8 producer decided, for people."""
    calib = record.get("calibration", {})
    lines = [f"- calibration: {calib.get('samples')} samples from {calib.get('source')}"]
    lines += [f"- warning: {w}" for w in calib.get("warnings", [])]
    method = record.get("method")
    if method:
        lines.append(f"- method: `{json.dumps(method)}`")
    for name, result in (record.get("methods_tried") or {}).items():
        lines.append(f"- tried {name}, all int8: " + (result if isinstance(result, str) else "; ".join(
            f"{out} cosine {m['cosine']:.4f}" + (f", top-1 {m['top1']:.3f}" if m.get("top1") is not None else "")
            for out, m in result.items())))
    kept = record.get("kept_in_float") or []
    label = "in the best candidate, layers kept in float" if record.get("not_shipped") else "layers kept in float"
    lines.append(f"- {label}: {len(kept)}" + (": " + ", ".join(f"`{k}`" for k in kept) if kept else ""))
    if record.get("fallback_breaches"):
        lines.append("- still breaching against the float model: " + "; ".join(record["fallback_breaches"]))
    if record.get("fallback_stopped"):
        lines.append(f"- fallback stopped at its {record['fallback_stopped']}")
    if record.get("not_shipped"):
        lines.append(f"- **not shipped** ({record['not_shipped']}): an optional default target (real weights) "
                     "ships only when the final parity verdict passes it; `--targets` with its name makes it "
                     "required")
    lines.append(f"- judged on: {record.get('evaluated_on')}")
    return lines


def _form_lines(forms: dict) -> list[str]:
    """Where the form was chosen: on a board (its device and the numbers that chose), the build host, or given."""
    if not forms:
        return []
    lines = ["", "## Form", "", f"Chosen on: **{forms.get('chosen_on', 'given')}** — {forms.get('resolved_by')}"]
    device = forms.get("device")
    if device:
        lines += ["", f"Board results `{device['file']}` ({device['device']}, measured {device['measured']}; "
                  f"ratios to {device['baseline']}):", ""]
        lines += markdown_table(["form", "fastest ms", "engine", "target", "× baseline"],
                                [[f"**{f}**" if f == device["chosen"]["form"] else f, f"{r['fastest_ms']:.3f}",
                                  r["engine"], r["target"], f"{r['ratio_to_baseline']:.3f}"]
                                 for f, r in device["forms"].items()], "lrllr")
        lines += ["", "Fastest file per engine for this form: " + "; ".join(
            f"{e}: `{r['file']}` ({r['target']}, {r['median_ms']:.3f} ms)" for e, r in device["per_engine"].items())]
    return lines


def render_report(manifest: dict, parity_markdown: str | None = None) -> str:
    src, meta, onnx_info = manifest["source"], manifest["metadata"], manifest.get("onnx", {})
    status = f"**Status: {manifest['status'].upper()}**"
    if manifest.get("status_reason"):
        status += f" — {manifest['status_reason']}"
    lines = [f"# {src['model']} — {manifest['form_tag']}", "", status,
             "", "## Source", ""]
    lines += markdown_table(["key", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in src.items()])
    lines += _form_lines((manifest.get("export") or {}).get("forms") or {})
    lines += ["", "## Metadata (ONNX metadata_props `edgeport`; MNN bizCode with its precision)", ""]
    lines += markdown_table(["key", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in meta.items()])
    lines += ["", "## Files", ""]
    lines += markdown_table(["file", "size", "sha256"], [[name, _fmt_size(f["size"]), f"`{f['sha256']}`"]
                                                         for name, f in manifest["files"].items()], "lrl")
    if onnx_info:
        exp = manifest["export"]
        lines += ["", f"## ONNX graph (opset {exp['opset']}, exporter {exp['exporter']}, "
                  f"simplifier {exp['simplifier']})", ""]
        lines += _histogram_table(onnx_info["op_histogram_exported"], onnx_info["op_histogram"])
        lines += ["", "Lint: " + ("; ".join(onnx_info["lint"]) if onnx_info["lint"] else "clean")]
    for name, record in (manifest.get("targets") or {}).items():
        lines += ["", f"## {name}", ""] + _record_lines(record)
    lines += ["", "## Parity", ""]
    parity = manifest["parity"]
    if parity.get("status") == "skipped":
        lines.append(f"Skipped: {parity['reason']}")
    else:
        lines.append(parity_markdown or "")
        if parity.get("breaches"):
            lines += ["", "Breaches:", ""] + [f"- {b}" for b in parity["breaches"]]
    if manifest.get("accuracy"):
        from .accuracy import accuracy_markdown

        lines += ["", "## Accuracy on labelled images", "", accuracy_markdown(manifest["accuracy"])]
    lines += ["", "## Timings", ""]
    lines += markdown_table(["step", "seconds"], [[k, f"{v:.2f}"] for k, v in manifest["timings_s"].items()]
                            + [["**total**", f"{manifest['total_s']:.2f}"]], "lr")
    lines += ["", "## Tools", "",
              ", ".join(f"{k} {v}" for k, v in manifest["tools"].items()), ""]
    return "\n".join(lines)


def write_report(directory: Path, manifest: dict, parity_markdown: str | None = None) -> None:
    write_atomic(Path(directory) / REPORT, render_report(manifest, parity_markdown))
