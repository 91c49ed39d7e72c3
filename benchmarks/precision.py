"""int8 against fp32 and fp16 on the host: every precision target of a model's default form (export's
`resolve_forms`), built by build_artifact into one directory, timed per engine with the files interleaved,
each beside its parity verdict (export.parity.run_parity, the gate `make export` applies): a fast file that
fails its gate says so. A model with labelled data (LABELLED) is built from its trained weights, its int8 files
calibrated on the train split and judged on the val split (as `python -m export --calib ... --val ...`), and
each file gets its top-1 on val (runtime.evaluate, as `edgeport-eval` measures it) and Δ points vs model.onnx."""
from __future__ import annotations

import time
from pathlib import Path

import runtime
from export import targets
from export.inputs import sample_batch
from export.parity import run_parity
from export.pipeline import resolve_forms
from export.source import build_models, form_tag, make_source
from models import digits
from models.errors import EdgeportError
from runtime.evaluate import REFERENCE, evaluate_classifiers, scan_imagefolder

from .forms import Form, export_dir, export_form, export_root
from .timing import interleaved, summarize

# engine → the targets it times, fp32 first (the baseline of the ratios). On x86, MNN's precision "low" runs
# fp32 arithmetic: the fp16 file (fp32 arithmetic on fp16-stored weights) is the host's fp16 line.
PRECISION_TARGETS = {"ort": ("ort", "ort_int8"), "mnn": ("mnn_fp32", "mnn_fp16w", "mnn_int8w", "mnn_int8"),
                     "openvino": ("openvino", "openvino_int8")}


# model → (trained weights, a function writing its labelled ImageFolder tree with train/ and val/ and returning
# its root): the precision models whose files get an accuracy column. Add a model here to measure it too.
LABELLED = {digits.MODEL: (digits.WEIGHTS, digits.make_imagefolder)}
NO_LABELS = "no labelled data for this model (seeded random weights; labelled: {})"


def target_breaches(parity: dict, name: str) -> list[str]:
    return [b for b in parity["breaches"] if b.startswith((f"{name}:", f"{name}["))]


# A quantiser can fail on one network (MNN's crashed on inception_next_atto): drop these, in order, and rebuild.
DROPPABLE = ("mnn_int8", "ort_int8")


def build_dropping(form: Form, directory: Path, names: list[str], log=print, **build_options) -> tuple[dict, dict]:
    """({target: file}, {target: the build error that dropped it}): the build with every target, else without
    the calibrated int8 targets one at a time (DROPPABLE order), so one quantiser's failure does not cost the
    other files' numbers. A dropped target's error may be the other's when both fail: the message names it."""
    failed = {}
    while True:
        try:
            return export_form(form, directory, names, **build_options), failed
        except EdgeportError as e:
            drop = next((t for t in DROPPABLE if t in names), None)
            if drop is None:
                raise
            log(f"  build failed ({e}); again without {drop}")
            failed[drop] = str(e)
            runs_it = [n for n in names if n != drop and targets.producer(targets.get(n)).name == drop]
            failed.update({n: f"runs {drop}'s file: {e}" for n in runs_it})  # e.g. openvino_int8
            names = [n for n in names if n != drop and n not in runs_it]


def bench_precision(model: str, engines, threads: int, iters: int, warmup: int, img_size: int | None = None,
                    cache: Path | None = None, budget_s: float | None = None, parity_images: int = 16,
                    log=print, only=None) -> dict:
    """{"timings": {engine: {target: timing row + file, MB, compute, gate verdict, int8 layers kept in
    float, "accuracy": top-1 record or None}}, "accuracy": how it was measured or why not} for one model at
    `threads`. `only`: a subset of the targets (each engine's fp32 file stays). A labelled model is built at
    its trained input size (`img_size` is ignored for it)."""
    clock = {"start": time.perf_counter()}
    pconv, mlp, _ = resolve_forms(model, "auto", "auto")
    weights, labelled = LABELLED.get(model, (None, None))
    data = labelled() if labelled else None
    if data and img_size:
        log(f"  {model}: trained at its own input size; --img {img_size} ignored")
    source = make_source(model, weights=weights, img_size=None if data else img_size, pconv=pconv or "split_cat",
                         mlp=mlp or "fc")
    reference, inference, meta = build_models(source)
    form = Form(form_tag(meta), meta["pconv"], meta["mlp"], inference, meta)
    groups = {e: [t for i, t in enumerate(PRECISION_TARGETS[e]) if i == 0 or not only or t in only]
              for e in engines if e in PRECISION_TARGETS}
    names = [t for group in groups.values() for t in group]
    clock["build"] = time.perf_counter()
    with export_root(cache) as root:
        directory = export_dir(root, form)
        options = {}
        if data:  # trained weights: not the random-init files of the same form
            directory = directory.with_name(f"{directory.name}-trained")
            options = {"calib_dir": str(data / "train"), "held_out_dir": str(data / "val")}
        log(f"  export {model} {form.tag}: {', '.join(names)}")
        files, failed = build_dropping(form, directory, names, log, **options)
        groups = {e: [t for t in group if t not in failed] for e, group in groups.items()}
        names = [t for t in names if t not in failed]
        clock["export"] = time.perf_counter()
        log(f"  parity {model}: {len(names)} targets")
        parity = run_parity(directory, reference, inference, meta, n_images=parity_images, bisect=False,
                            write=False, target_names=names, held_out_dir=options.get("held_out_dir"))
        clock["parity"] = time.perf_counter()
        accuracy, top1 = measure_accuracy(model, data, directory, files, weights, log)
        clock["accuracy"] = time.perf_counter()
        x = sample_batch(meta, n_images=1, n_random=0)
        records = form.build.get("records", {})
        result = {"form": form.tag, "img_size": meta["input_shape"][-1], "threads": threads,
                  "parity_inputs": parity["inputs"], "failed": failed, "accuracy": accuracy, "timings": {}}
        for engine, group in groups.items():
            log(f"  time {model} {engine} {threads} thread{'s' * (threads > 1)} ({len(group)} files × {iters})")
            fns = {}
            for name in group:
                target = targets.get(name)
                predictor = runtime.load(files[name], engine=target.engine, threads=threads,
                                         precision=target.precision)
                fns[name] = (lambda p: lambda: p.run(x))(predictor)
            rows = summarize(interleaved(fns, iters=iters, warmup=warmup, max_seconds=budget_s),
                             baseline=group[0])
            for name, row in rows.items():
                record = records.get(name, {})
                row.update(file=files[name].name, mb=files[name].stat().st_size / 2**20,
                           compute=targets.get(name).compute, gates=dict(targets.get(name).gates),
                           breaches=target_breaches(parity, name),
                           metrics=parity["results"].get(name, {}),
                           kept_in_float=record.get("kept_in_float"),
                           calibration=(record.get("calibration") or {}).get("source"),
                           accuracy=top1.get(files[name].name))
            result["timings"][engine] = rows
        clock["time"] = time.perf_counter()
    stages = list(clock)
    result["seconds"] = {b: round(clock[b] - clock[a], 1) for a, b in zip(stages, stages[1:])}
    return result


def measure_accuracy(model: str, data: Path | None, directory: Path, files: dict, weights, log=print):
    """(how the top-1 was measured, or why not; {file name: {"n", "correct1", "top1", "top5",
    "delta_top1_points", "agreement"}}): every built file and model.onnx on the val split, by runtime.evaluate."""
    if data is None:
        return {"measured": False, "reason": NO_LABELS.format(", ".join(LABELLED))}, {}
    paths = sorted({str(directory / REFERENCE), *map(str, files.values())},
                   key=lambda p: (Path(p).name != REFERENCE, p))
    val = data / "val"
    log(f"  top-1 {model}: {len(paths)} files on {val}")
    doc = evaluate_classifiers(paths, scan_imagefolder(str(val)))
    top1 = {Path(r["file"]).name: {k: r[k] for k in ("n", "correct1", "top1", "top5", "delta_top1_points",
                                                     "agreement")} for r in doc["files"]}
    calibrated = any(targets.get(n).compute == "int8" for n in files)  # int8w files quantise weights alone
    return {"measured": True, "data": shown(val), "n_images": doc["n_images"], "skipped": len(doc["skipped"]),
            "weights": shown(weights), "calib": shown(data / "train") if calibrated else None}, top1


def shown(path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(digits.ROOT)) if path.is_relative_to(digits.ROOT) else str(path)
