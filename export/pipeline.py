"""The export pipeline: model → ONNX → MNN (fp32, fp16, int8w) → parity gate → manifest + report.

Everything is built in a temporary directory next to the destination and moved into place only when every
step succeeded, so a failed run leaves the previous artifacts untouched and no partial files behind.
A parity breach is not an error of the run: the artifacts are installed (to be inspected) with
manifest status "failed", and the CLI exits 1.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from rich.console import Console

from models.errors import EdgeportError
from models.inference import MLP_FORMS, PCONV_FORMS

from . import graph, mnn_convert, onnx_export
from ._console import Steps, make_console, redirect_fds
from .manifest import MANIFEST, file_entries, tool_versions, write_json, write_report
from .source import build_models, form_tag, make_source

FORMATS = ("onnx", "mnn")
RECOMMENDATION = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "recommendation.json"
# Used without benchmarks/results/recommendation.json: split_cat ran 14–19 % faster than slicing (ORT, MNN).
FALLBACK_FORMS = {"pconv": "split_cat", "mlp": "fc"}
LOG = "export.log"


@dataclass
class ExportOptions:
    model: str = "fasternet_t0"
    weights: str | None = None
    img_size: int | None = None
    batch: int = 1
    dynamic_batch: bool = False
    pconv: str = "auto"
    mlp: str = "auto"
    formats: tuple[str, ...] = FORMATS
    precisions: tuple[str, ...] = mnn_convert.PRECISIONS
    opset: int = onnx_export.DEFAULT_OPSET
    exporter: str = "legacy"
    simplifier: str = "onnxsim"
    features_only: bool = False
    out: str = "artifacts"
    parity: bool = True
    seed: int = 0
    verbose: bool = False
    gates: dict | None = None


def resolve_forms(model: str, pconv: str, mlp: str, path: Path = RECOMMENDATION):
    """(pconv, mlp, note): "auto" reads the benchmarks' recommendation, else the measured fallback.

    recommendation.json: {"pconv": .., "mlp": .., "by_family": {family: {..}}, "by_model": {name: {..}}};
    the most specific entry wins."""
    if pconv != "auto" and mlp != "auto":
        return pconv, mlp, None
    rec, note = {}, None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            from models import get_cfg

            family = get_cfg(model).family
            for scope in (data, data.get("by_family", {}).get(family, {}),
                          data.get("by_model", {}).get(model, {})):
                rec.update({k: v for k, v in scope.items() if k in FALLBACK_FORMS and isinstance(v, str)})
            note = f"forms from {path.name}"
        except (OSError, ValueError, AttributeError) as e:
            note = f"{path.name} unreadable ({type(e).__name__}); using measured defaults"
    else:
        note = f"no {path.parent.name}/{path.name}; using measured defaults split_cat/fc"
    choice = {**FALLBACK_FORMS, **{k: v for k, v in rec.items()
                                   if v in (PCONV_FORMS if k == "pconv" else MLP_FORMS)}}
    return (choice["pconv"] if pconv == "auto" else pconv), (choice["mlp"] if mlp == "auto" else mlp), note


def _check_options(opts: ExportOptions) -> None:
    onnx_export.check_options(opts.opset, opts.exporter, opts.simplifier)
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise EdgeportError(f"unknown --formats {','.join(bad) or '(empty)'}; "
                            f"use a subset of {','.join(FORMATS)}")
    bad = [p for p in opts.precisions if p not in mnn_convert.PRECISIONS]
    if bad or not opts.precisions:
        raise EdgeportError(f"unknown --precision {','.join(bad) or '(empty)'}; use a subset of "
                            f"{','.join(mnn_convert.PRECISIONS)}")
    if opts.pconv not in ("auto", *PCONV_FORMS):
        raise EdgeportError(f"unknown --pconv {opts.pconv}; use auto or one of {', '.join(PCONV_FORMS)}")
    if opts.mlp not in ("auto", *MLP_FORMS):
        raise EdgeportError(f"unknown --mlp {opts.mlp}; use auto or one of {', '.join(MLP_FORMS)}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_build_dir(out: Path, model: str) -> Path:
    parent = out / model
    try:
        parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=parent))
        os.chmod(build, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact dir should not be
        return build
    except OSError as e:
        reason = e.strerror or str(e)
        raise EdgeportError(f"cannot write to --out {out}: {reason}; choose a writable directory") from None


def _install(build: Path, dest: Path) -> None:
    """Replace `dest` by `build`: rename, never copy, so readers see the old or the new directory whole."""
    for f in build.iterdir():  # temp-file helpers create 0600 files
        os.chmod(f, 0o666 & ~_umask())
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(build, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _parity_function():
    try:
        from . import parity
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.parity":
            return None, "export/parity.py not found"
        raise
    fn = getattr(parity, "run_parity", None)
    return fn, None if fn else "export.parity has no run_parity"


def _keep_log(build: Path, opts: ExportOptions) -> str:
    """On failure the build dir goes away; keep its log (converter output) in the temp dir for diagnosis."""
    log = build / LOG
    if not log.is_file() or not log.stat().st_size:
        return ""
    fd, kept = tempfile.mkstemp(prefix=f"edgeport-{opts.model}-", suffix=".log")
    os.close(fd)
    shutil.copyfile(log, kept)
    return f" (log: {kept})"


def run_export(opts: ExportOptions, console: Console | None = None) -> dict:
    """Run the whole pipeline; returns the manifest. Raises EdgeportError on bad input or a failed step."""
    console = console or make_console()
    start = time.perf_counter()
    _check_options(opts)
    pconv, mlp, note = resolve_forms(opts.model, opts.pconv, opts.mlp)
    if note:
        console.print(f"[dim]{note}[/dim]")
    source = make_source(opts.model, opts.weights, opts.img_size, opts.batch, opts.dynamic_batch,
                         opts.features_only, pconv, mlp, opts.seed)
    out = Path(opts.out)
    build = _make_build_dir(out, opts.model)
    try:
        manifest, dest = _run_steps(opts, source, build, console, start, note)
        _install(build, dest)
    except EdgeportError as e:
        kept = _keep_log(build, opts)
        shutil.rmtree(build, ignore_errors=True)
        raise EdgeportError(f"{e}{kept}") from None
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    colour = {"passed": "green", "failed": "red"}.get(manifest["status"], "yellow")
    console.print(f"[{colour}]{manifest['status'].upper()}[/{colour}] {dest}  ({manifest['total_s']:.1f} s)")
    return manifest


def _run_steps(opts: ExportOptions, source: dict, build: Path, console: Console, start: float,
               forms_note: str | None):
    steps = Steps(console)
    log = build / LOG
    quiet = not opts.verbose

    reference, inference, meta = build_models(source, step=steps.step)
    tag = form_tag(meta)
    console.print(f"[bold]{opts.model}[/bold] → {Path(opts.out) / opts.model / tag}  "
                  f"(input {meta['input_shape']}, pconv={meta['pconv']}, mlp={meta['mlp']})")
    raw_path, onnx_path = build / "model.raw.onnx", build / "model.onnx"

    with steps.step(f"ONNX export (opset {opts.opset}, {opts.exporter})"):
        try:
            with redirect_fds(log, quiet):
                exported = onnx_export.export_onnx(inference, raw_path, meta, opts.opset, opts.exporter)
        except EdgeportError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise EdgeportError(f"ONNX export failed: {type(e).__name__}: {first}") from None
    with steps.step("onnx.checker (full)"):
        onnx_export.full_check(exported, "exported")
    with steps.step(f"simplify ({opts.simplifier})"), redirect_fds(log, quiet):
        final = onnx_export.simplify(exported, opts.simplifier)
    with steps.step("graph lint"):
        hist_raw, hist = graph.op_histogram(exported), graph.op_histogram(final)
        warnings = graph.lint(hist, meta["pconv"], meta["mlp"], opts.dynamic_batch)
    for w in warnings:
        console.print(f"  [yellow]warning:[/yellow] {w}")
    with steps.step("ONNX metadata + save"):
        onnx_export.set_metadata(final, meta)
        onnx.save_model(final, str(onnx_path))
        raw_path.unlink()

    if "mnn" in opts.formats:
        for precision in opts.precisions:
            with steps.step(f"MNN convert {precision}"):
                biz = onnx_export.metadata_json({**meta, "precision": precision})
                mnn_convert.convert(onnx_path, build / mnn_convert.FILENAMES[precision], biz, precision,
                                    log_path=log, verbose=opts.verbose)

    parity = _parity(opts, build, reference, inference, meta, steps, log)
    if "onnx" not in opts.formats:
        onnx_path.unlink()

    status = "unchecked" if parity["status"] == "skipped" else parity["status"]
    manifest = {
        "status": status,
        "status_reason": parity.get("reason") if status == "unchecked" else
        ("; ".join(parity.get("breaches", [])) if status == "failed" else None),
        "form_tag": tag,
        "source": source,
        "metadata": meta,
        "export": {"formats": list(opts.formats), "precisions": list(opts.precisions), "opset": opts.opset,
                   "exporter": opts.exporter, "simplifier": opts.simplifier,
                   "forms": {"pconv": opts.pconv, "mlp": opts.mlp, "resolved_by": forms_note or "given"}},
        "files": {},
        "onnx": {"op_histogram_exported": hist_raw, "op_histogram": hist, "lint": warnings,
                 "nodes_exported": sum(hist_raw.values()), "nodes": sum(hist.values())},
        "parity": {k: v for k, v in parity.items() if k != "markdown"},
        "tools": tool_versions(),
        "timings_s": steps.timings,
        "total_s": 0.0,
    }
    with steps.step("manifest + report"):
        manifest["files"] = file_entries(build)
        manifest["total_s"] = round(time.perf_counter() - start, 3)
        write_json(build / MANIFEST, manifest)
        write_report(build, manifest, parity.get("markdown"))
    return manifest, Path(opts.out) / opts.model / tag


def _parity(opts, build, reference, inference, meta, steps: Steps, log) -> dict:
    if not opts.parity:
        steps.note("[yellow]parity gate skipped (--no-parity)[/yellow]")
        return {"status": "skipped", "reason": "--no-parity"}
    run_parity, why = _parity_function()
    if run_parity is None:
        steps.note(f"[yellow]parity gate not available: {why}[/yellow]")
        return {"status": "skipped", "reason": f"parity gate not available: {why}"}
    with steps.step("parity gate"), redirect_fds(log, not opts.verbose):
        result = run_parity(build, reference, inference, meta, opts.gates)
    for breach in result.get("breaches", []):
        steps.note(f"[red]breach:[/red] {breach}")
    return {"status": "passed" if result["passed"] else "failed", **result}
