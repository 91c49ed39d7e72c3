"""The export CLI's pipeline: source → models → `build_artifact` (every selected target) → parity gate →
manifest + report, with progress on the console.

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
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from models.errors import EdgeportError
from models.inference import DEFAULT_MLP, DEFAULT_PCONV, MLP_FORMS, PCONV_FORMS
from runtime.atomic import write_json

from . import onnx_export, targets
from ._console import Steps, make_console, redirect_fds
from .build import LOG, build_artifact
from .install import install, make_build_dir, remove_if_empty
from .manifest import MANIFEST, file_entries, tool_versions, write_report
from .quantize import MNN_METHODS
from .source import ULTRALYTICS, build_models, form_tag, make_source, task_of

RECOMMENDATION = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "recommendation.json"
# Used without benchmarks/results/recommendation.json: split_cat ran 14–19 % faster than slicing (ORT, MNN).
FALLBACK_FORMS = {"pconv": DEFAULT_PCONV, "mlp": DEFAULT_MLP}


@dataclass
class ExportOptions:
    model: str = "fasternet_t0"
    weights: str | None = None
    img_size: int | None = None
    batch: int = 1
    dynamic_batch: bool = False
    pconv: str = "auto"
    mlp: str = "auto"
    targets: tuple[str, ...] | None = None  # None: the model's defaults (export.targets.default_targets)
    calib: str | None = None
    val: str | None = None  # labelled ImageFolder: every file's top-1, int8 judged by it (export.accuracy)
    int8_mnn: str = "auto"
    opset: int = onnx_export.DEFAULT_OPSET
    exporter: str = "legacy"
    simplifier: str = "onnxsim"
    features_only: bool = False
    out: str = "artifacts"
    parity: bool = True
    seed: int = 0
    verbose: bool = False
    gates: dict | None = None
    device: str | None = None   # board results (edgeport-bench --json) to choose the form from
    allow_emulated: bool = False




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


def form_of_tag(tag: str) -> tuple[str | None, str | None]:
    """"split_cat-fc" → ("split_cat", "fc"); "conv" → (None, "conv"): the forms a result's tag names."""
    parts = tag.removesuffix("-features").split("-")
    return (next((p for p in parts if p in PCONV_FORMS), None), next((p for p in parts if p in MLP_FORMS), None))


def choose_from_device(model: str, path: str, pconv: str = "auto", mlp: str = "auto",
                       allow_emulated: bool = False) -> tuple[str, str, dict]:
    """(pconv, mlp, record): the form a board measured fastest (edgeport-bench --json) among files whose targets
    passed their gates, within any form given explicitly, and per engine that form's fastest file. The record
    (device, numbers that chose) goes into the manifest and report."""
    from runtime.device import describe, read_results
    from runtime.errors import EdgeRuntimeError

    try:
        board = read_results(path)
    except EdgeRuntimeError as e:
        raise EdgeportError(f"--device {e}") from None
    device = board.device
    if device.emulated and not allow_emulated:
        raise EdgeportError(f"--device {path}: measured under emulation ({device.emulation_evidence}); emulated "
                            "timings are not a board's latency: bench on the board, or add --allow-emulated")
    if board.run.model and board.run.model != model:
        raise EdgeportError(f"--device {path}: measured {board.run.model}, not {model}; bench {model}'s bundle")
    usable = [r for r in board.results if r.gate == "passed" and r.ratio_to_baseline is not None
              and (pconv == "auto" or form_of_tag(r.form)[0] == pconv)
              and (mlp == "auto" or form_of_tag(r.form)[1] == mlp)]
    if not usable:
        raise EdgeportError(f"--device {path}: no result of a target that passed its gate"
                            + (f" with --pconv {pconv} --mlp {mlp}" if (pconv, mlp) != ("auto", "auto") else "")
                            + "; re-make the bundle with its parity gate and bench it again")
    # The fastest file kind (engine, target, precision) by median; among its forms, the lowest paired ratio to the
    # baseline (per-round ratios cancel the drift a median across minutes of rounds does not).
    fastest = min(usable, key=lambda r: r.median_ms)
    kind = (fastest.engine, fastest.target, fastest.precision)
    best = min((r for r in usable if (r.engine, r.target, r.precision) == kind), key=lambda r: r.ratio_to_baseline)
    chosen_pconv, chosen_mlp = form_of_tag(best.form)
    per_engine = {}
    for r in sorted(usable, key=lambda r: r.median_ms):
        if r.form == best.form:
            per_engine.setdefault(r.engine, {"target": r.target, "file": r.file, "precision": r.precision,
                                             "median_ms": r.median_ms, "ratio_to_baseline": r.ratio_to_baseline})
    forms = {}
    for r in sorted(usable, key=lambda r: r.median_ms):
        forms.setdefault(r.form, {"fastest_ms": r.median_ms, "engine": r.engine, "target": r.target,
                                  "ratio_to_baseline": r.ratio_to_baseline})
    record = {"file": os.path.abspath(path), "device": describe(device), "emulated": device.emulated,
              "hostname": device.hostname, "measured": board.run.date, "baseline": board.run.baseline_form,
              "chosen": {"form": best.form, "engine": best.engine, "target": best.target,
                         "median_ms": best.median_ms, "ratio_to_baseline": best.ratio_to_baseline},
              "per_engine": per_engine, "forms": forms}
    return ((chosen_pconv or DEFAULT_PCONV) if pconv == "auto" else pconv,
            (chosen_mlp or DEFAULT_MLP) if mlp == "auto" else mlp, record)


def _resolve(opts: ExportOptions) -> tuple[str, str, dict]:
    """(pconv, mlp, forms record for the manifest): from the board (--device) or the build host."""
    if opts.device:
        pconv, mlp, record = choose_from_device(opts.model, opts.device, opts.pconv, opts.mlp, opts.allow_emulated)
        chosen = record["chosen"]
        note = (f"form {chosen['form']} chosen on the board: {chosen['median_ms']:.3f} ms with {chosen['engine']} "
                f"{chosen['target']} ({chosen['ratio_to_baseline']:.3f}× {record['baseline']}), {record['device']}")
        return pconv, mlp, {"resolved_by": note, "chosen_on": "device", "device": record}
    pconv, mlp, note = resolve_forms(opts.model, opts.pconv, opts.mlp)
    given = opts.pconv != "auto" and opts.mlp != "auto"
    return pconv, mlp, {"resolved_by": note or "given", "chosen_on": "given" if given else "build host"}


def _check_options(opts: ExportOptions) -> None:
    onnx_export.check_options(opts.opset, opts.exporter, opts.simplifier)
    targets.select(opts.targets or targets.DEFAULT_TARGETS)
    if opts.calib is not None:
        import models

        from .calibration import image_files

        task = task_of(models.get_cfg(opts.model).extra, opts.features_only)  # before any model is built
        chosen = opts.targets or targets.default_targets(task, trained=opts.weights is not None)
        if not any(targets.get(t).compute == "int8" for t in chosen):
            raise EdgeportError("--calib is only used by int8 targets; add --targets ...,ort_int8,mnn_int8 or drop it")
        calib_files = image_files(opts.calib)  # a missing, empty or image-free directory fails here, before any work
    if opts.val is not None:
        import models

        from .accuracy import check_val

        check_val(opts.val, task_of(models.get_cfg(opts.model).extra, opts.features_only))
        if opts.calib is not None:  # the int8 gates are judged on --val: they must be images never calibrated on
            from .calibration import image_files

            shared = {os.path.realpath(f) for f in calib_files} & {
                os.path.realpath(f) for f in image_files(opts.val, "--val")}
            if shared:
                raise EdgeportError(f"--calib and --val share {len(shared)} image(s) (e.g. {sorted(shared)[0]}); int8 "
                                    "is judged on --val, so give it images the calibration never saw")
    if opts.int8_mnn not in MNN_METHODS:
        raise EdgeportError(f"unknown --int8-mnn {opts.int8_mnn}; use one of {', '.join(MNN_METHODS)}")
    if opts.pconv not in ("auto", *PCONV_FORMS):
        raise EdgeportError(f"unknown --pconv {opts.pconv}; use auto or one of {', '.join(PCONV_FORMS)}")
    if opts.mlp not in ("auto", *MLP_FORMS):
        raise EdgeportError(f"unknown --mlp {opts.mlp}; use auto or one of {', '.join(MLP_FORMS)}")


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
    pconv, mlp, forms = _resolve(opts)
    if forms["resolved_by"] != "given":
        console.print(f"[dim]{forms['resolved_by']}[/dim]")
    source = make_source(opts.model, opts.weights, opts.img_size, opts.batch, opts.dynamic_batch,
                         opts.features_only, pconv, mlp, opts.seed)
    out = Path(opts.out)
    build = make_build_dir(out, export_name(source))
    try:
        manifest, dest = _run_steps(opts, source, build, console, start, forms)
        installed = install(build, dest, manifest["status"])
    except EdgeportError as e:
        kept = _keep_log(build, opts)
        _discard(build)
        raise EdgeportError(f"{e}{kept}") from None
    except BaseException:
        _discard(build)
        raise
    colour = {"passed": "green", "failed": "red"}.get(manifest["status"], "yellow")
    console.print(f"[{colour}]{manifest['status'].upper()}[/{colour}] {installed}  ({manifest['total_s']:.1f} s)")
    if installed != dest:
        console.print(f"[yellow]the passing export in {dest} was kept; this failed one is in {installed}[/yellow]")
    return manifest


def _discard(build: Path) -> None:
    shutil.rmtree(build, ignore_errors=True)
    remove_if_empty(build.parent)


def _run_steps(opts: ExportOptions, source: dict, build: Path, console: Console, start: float, forms: dict):
    steps = Steps(console)
    reference, inference, meta = build_models(source, step=steps.step)
    tag = form_tag(meta)
    dest = Path(opts.out) / export_name(source) / tag
    console.print(f"[bold]{opts.model}[/bold] → {dest}  "
                  f"(input {meta['input_shape']}, pconv={meta['pconv']}, mlp={meta['mlp']})")
    trained = not source["calibrated"]
    optional = frozenset() if opts.targets else targets.optional_targets(meta["task"], trained)
    unjudged = optional if not opts.parity else frozenset()  # no verdict will pass them: not built at all
    opts = replace(opts, targets=tuple(t for t in opts.targets or targets.default_targets(meta["task"], trained)
                                       if t not in unjudged))
    built = build_artifact(inference, meta, build, opts.targets, opset=opts.opset, exporter=opts.exporter,
                           simplifier=opts.simplifier, log=build / LOG, verbose=opts.verbose, calib_dir=opts.calib,
                           int8_mnn_method=opts.int8_mnn, optional=optional, step=steps.step,
                           held_out_dir=_held_out(opts))
    for name in sorted(unjudged):
        built["records"][name] = {"not_shipped": f"{name}: not built: --no-parity leaves no final verdict to pass it"}
    opts = replace(opts, targets=tuple(built["targets"]))
    for name, record in built["records"].items():
        for w in record.get("calibration", {}).get("warnings", []):
            console.print(f"  [yellow]warning:[/yellow] {name}: {w}")
        if record.get("not_shipped"):
            _not_shipped(console, name, record)
        elif record.get("kept_in_float"):
            console.print(f"  {name}: {len(record['kept_in_float'])} layer(s) kept in float")
    for w in built["onnx"]["lint"] + _ignored_options(opts, meta):
        console.print(f"  [yellow]warning:[/yellow] {w}")

    parity = _parity(opts, build, reference, inference, meta, steps, build / LOG, optional)
    verdicts = parity.get("not_shipped", {})
    if parity["status"] == "skipped":  # no final verdict: nothing optional has been passed by one
        verdicts = {t: [f"{t}: not judged ({parity['reason']})"] for t in sorted(optional & set(opts.targets))}
    opts = replace(opts, targets=_drop_not_shipped(build, built, verdicts, console))
    accuracy = _accuracy(opts, build, built, optional, steps)
    if accuracy.get("breaches"):
        parity = {**parity, "status": "failed", "breaches": [*parity.get("breaches", []), *accuracy["breaches"]]}
    if "ort" not in built["targets"]:
        (build / "model.onnx").unlink()

    status = "unchecked" if parity["status"] == "skipped" else parity["status"]
    manifest = {
        "status": status,
        "status_reason": parity.get("reason") if status == "unchecked" else
        ("; ".join(parity.get("breaches", [])) if status == "failed" else None),
        "form_tag": tag,
        "source": source,
        "metadata": meta,
        "export": {"targets": built["targets"], "opset": opts.opset, "held_out": _held_out(opts),
                   "exporter": opts.exporter, "simplifier": opts.simplifier,
                   "forms": {"pconv": opts.pconv, "mlp": opts.mlp, **forms}},
        "files": {},
        "onnx": built["onnx"],
        "targets": built["records"],
        "parity": {k: v for k, v in parity.items() if k != "markdown"},
        "accuracy": accuracy,
        "tools": tool_versions(),
        "timings_s": steps.timings,
        "total_s": 0.0,
    }
    with steps.step("manifest + report"):
        manifest["files"] = file_entries(build)
        manifest["total_s"] = round(time.perf_counter() - start, 3)
        write_json(build / MANIFEST, manifest)
        write_report(build, manifest, parity.get("markdown"))
    return manifest, dest


def export_name(source: dict) -> str:
    """The directory under --out that holds this export's form tags: the model name, or for an Ultralytics
    checkpoint "<file stem>-<first 8 hex of its sha256>" (every trainer run writes a best.pt: one shared
    "ultralytics" directory would let the second export replace the first). The full path and sha256 stay
    in the manifest's source."""
    if source["model"] == ULTRALYTICS:
        return f"{Path(source['weights']).stem}-{source['weights_sha256'][:8]}"
    return source["model"]


def _ignored_options(opts: ExportOptions, meta: dict) -> list[str]:
    """Form options given on the command line that this network has nothing to apply to."""
    return [f"--{key} {given} ignored: {opts.model} has no {what}"
            for key, given, what in (("pconv", opts.pconv, "PConv"), ("mlp", opts.mlp, "pointwise MLP or SE"))
            if given != "auto" and meta[key] is None]


def _not_shipped(console: Console, name: str, record: dict) -> None:
    kept = record.get("kept_in_float")
    fallback = f"; the int8 search kept {len(kept)} layer(s) in float" if kept is not None else ""
    console.print(f"  [yellow]not shipped:[/yellow] {name} ({record['not_shipped']}{fallback}); it is optional "
                  f"here, so the export's status comes from the other targets; --calib DIR with your own images "
                  f"may help, and --targets ...,{name} makes it a required target")


def _drop_not_shipped(build: Path, built: dict, verdicts: dict, console: Console) -> tuple[str, ...]:
    """The optional targets the final parity verdict breached (`verdicts`: {target: breach lines}): their files
    deleted, their records marked "not_shipped" with those breaches, left out of built["targets"]."""
    for name, lines in verdicts.items():
        record = built["records"].setdefault(name, {})
        record["not_shipped"] = "; ".join(lines)
        _not_shipped(console, name, record)
    built["targets"] = [t for t in built["targets"] if t not in verdicts]
    kept_files = {targets.get(t).file for t in built["targets"]}
    for name in verdicts:
        if targets.get(name).file not in kept_files:
            (build / targets.get(name).file).unlink(missing_ok=True)
    return tuple(built["targets"])


def _held_out(opts: ExportOptions) -> str | None:
    """Where the int8 targets are judged: the --val images (absolute, recorded in the manifest so that
    `python -m export.parity DIR` judges them on the same images), else None: the bundled photos."""
    return os.path.abspath(opts.val) if opts.val is not None else None


def _parity(opts, build, reference, inference, meta, steps: Steps, log, optional=frozenset()) -> dict:
    if not opts.parity:
        steps.note("[yellow]parity gate skipped (--no-parity)[/yellow]")
        return {"status": "skipped", "reason": "--no-parity"}
    run_parity, why = _parity_function()
    if run_parity is None:
        steps.note(f"[yellow]parity gate not available: {why}[/yellow]")
        return {"status": "skipped", "reason": f"parity gate not available: {why}"}
    with steps.step("parity gate"), redirect_fds(log, not opts.verbose):
        result = run_parity(build, reference, inference, meta, opts.gates, target_names=opts.targets,
                            optional=frozenset(optional) & set(opts.targets), held_out_dir=_held_out(opts))
    for breach in result.get("breaches", []):
        steps.note(f"[red]breach:[/red] {breach}")
    for breach in (line for lines in result.get("not_shipped", {}).values() for line in lines):
        steps.note(f"[yellow]breach (optional target, not shipped):[/yellow] {breach}")
    return {"status": "passed" if result["passed"] else "failed", **result}


def _accuracy(opts, build, built, optional, steps: Steps) -> dict:
    """Every shipped file's top-1 on --val; optional int8 targets over the gate are dropped (export.accuracy)."""
    from .accuracy import judge_accuracy

    if opts.val is None:
        steps.note("[dim]accuracy not measured (no --val DIR)[/dim]")
        return judge_accuracy(None, build, built)
    with steps.step("accuracy on --val"):
        record = judge_accuracy(opts.val, build, built, optional, steps.note)
    for name, f in record["files"].items():
        steps.note(f"{name:<18} top-1 {100 * f['top1']:6.2f} % ({f['correct1']}/{f['n']})  "
                   f"Δ {f['delta_top1_points']:+.2f} pts vs model.onnx")
    return record
