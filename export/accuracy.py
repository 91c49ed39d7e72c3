"""int8 judged by accuracy: with `python -m export ... --val DIR` (a labelled ImageFolder tree), every file of the
export is evaluated on DIR by runtime.evaluate (the board's own preprocessing and engines), and an int8 target
(int8 weights or int8 arithmetic) ships only if its top-1 on DIR is at most INT8_MAX_TOP1_LOSS_POINTS below the
fp32 file's (model.onnx), besides its other gates. A target that is optional (a default int8 target of a trained
export) and misses is deleted and marked not shipped; a required one (named in --targets) fails the export, as a
parity breach does. Without --val, the other gates stand and the record says accuracy was not measured.
"""
from __future__ import annotations

from pathlib import Path

from models.errors import EdgeportError
from runtime.errors import EdgeRuntimeError
from runtime.evaluate import REFERENCE, evaluate_classifiers, scan_imagefolder

from . import targets
from .tables import markdown_table

# One point of top-1: what the int8 literature reports as a good post-training quantisation (ImageNet ResNet-50
# and MobileNet int8 lose 0.1-1 point); more is a visible regression a user should opt into by hand.
INT8_MAX_TOP1_LOSS_POINTS = 1.0


def is_int8(target: targets.Target) -> bool:
    """int8 arithmetic or int8-stored weights: the targets whose loss is judged by accuracy."""
    return target.compute == "int8" or ".int8" in (target.file or "")


def check_val(val: str | None, task: str) -> None:
    """Before any work: --val must be a labelled ImageFolder tree, and the model a classifier."""
    if val is None:
        return
    if task != "classification":
        raise EdgeportError(f"--val: top-1 needs a classifier, and this export is a {task} model; drop --val "
                            "(python -m runtime.evaluate measures a detector's mAP on a data.yaml)")
    try:
        scan_imagefolder(val)
    except EdgeRuntimeError as e:
        raise EdgeportError(f"--val: {e}") from None


def judge_accuracy(val: str | None, build: Path, built: dict, optional=frozenset(), note=print) -> dict:
    """Evaluate the shipped files of `build` on `val`; drop optional int8 targets over the threshold (their file
    deleted, `built["targets"]` and `built["records"]` updated). Returns the manifest's "accuracy" record:
    {"measured", "data", "n_images", "threshold_points", "files": {file: {...}}, "breaches": [...]} (breaches:
    required targets over the threshold)."""
    if val is None:
        return {"measured": False, "reason": "no --val DIR (labelled images) given: accuracy not measured; int8 "
                                             "targets judged by their parity gates only"}
    shipped = [targets.get(name) for name in built["targets"]]
    files = sorted({REFERENCE, *(t.file for t in shipped)}, key=lambda f: (f != REFERENCE, f))
    try:
        doc = evaluate_classifiers([str(build / f) for f in files], scan_imagefolder(val))
    except EdgeRuntimeError as e:
        raise EdgeportError(f"--val: {e}") from None
    by_file = {Path(r["file"]).name: r for r in doc["files"]}
    record = {"measured": True, "data": str(val), "n_images": doc["n_images"], "skipped": doc["skipped"],
              "threshold_points": INT8_MAX_TOP1_LOSS_POINTS, "files": {}, "breaches": [], "dropped": []}
    for name, r in by_file.items():
        record["files"][name] = {k: r[k] for k in ("n", "correct1", "top1", "top5", "delta_top1_points",
                                                   "agreement")}
        record["files"][name]["targets"] = [t.name for t in shipped if t.file == name]
    for target in shipped:
        loss = -by_file[target.file]["delta_top1_points"]
        if not is_int8(target) or loss <= INT8_MAX_TOP1_LOSS_POINTS:
            continue
        why = (f"{target.name}: top-1 {100 * by_file[target.file]['top1']:.2f} % on --val is {loss:.2f} points "
               f"below model.onnx's (gate {INT8_MAX_TOP1_LOSS_POINTS})")
        if target.name in optional:
            (build / target.file).unlink(missing_ok=True)
            built["targets"].remove(target.name)
            built["records"].setdefault(target.name, {})["not_shipped"] = why
            record["dropped"].append(target.name)
            note(f"[yellow]not shipped:[/yellow] {why}")
        else:
            record["breaches"].append(why)
            note(f"[red]breach:[/red] {why}")
    return record


def accuracy_markdown(record: dict) -> str:
    """The report's accuracy section."""
    if not record.get("measured"):
        return record.get("reason", "accuracy not measured")
    lines = [f"On {record['data']}: {record['n_images']} images ({len(record['skipped'])} skipped); an int8 "
             f"target ships only if its top-1 is at most {record['threshold_points']} point below model.onnx's.", ""]
    rows = []
    for name, f in record["files"].items():
        agreement = "-" if f["agreement"] is None else f"{100 * f['agreement']:.2f}"
        rows.append([f"`{name}`", ", ".join(f["targets"]) or "(reference)",
                     f"{100 * f['top1']:.2f} ({f['correct1']}/{f['n']})", f"{100 * f['top5']:.2f}",
                     f"{f['delta_top1_points']:+.2f}", agreement])
    lines += markdown_table(["file", "targets", "top-1 %", "top-5 %", "Δ top-1 pts", "agreement %"], rows, "llrrrr")
    for name in record["dropped"]:
        lines.append(f"\n**Not shipped** (accuracy gate): {name}")
    return "\n".join(lines)
