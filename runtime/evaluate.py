"""Accuracy of edgeport artifacts on labelled images, torch-free: top-1/top-5 of a classifier on an ImageFolder
tree, or (detectors) mAP50 and mAP50-95 on a YOLO data set, for one file or every file of an export directory.

Examples:
  python -m runtime.evaluate model.mnn --data val/
  python -m runtime.evaluate artifacts/fasternet_t0/split_cat-fc --data val/ --json
  python -m runtime.evaluate model.onnx --data imagenet/val --labels synsets.txt --limit 1000
  python -m runtime.evaluate yolo/model.onnx --data coco8/data.yaml

ImageFolder: one sub-folder per class. Folders named by integers (0 ... 999) are those class indices; otherwise
the folders in sorted order are classes 0, 1, ... (ImageNet's synset folders), or --labels FILE gives one
"FOLDER INDEX" pair a line. Images are preprocessed exactly as runtime.infer does (each file's own metadata).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .cli import IMAGE_EXTENSIONS, OneLineParser, cli_main, int_in
from .errors import EdgeRuntimeError
from .images import load_image
from .preprocess import preprocess

MANIFEST = "manifest.json"
REFERENCE = "model.onnx"  # the fp32 file every other file of an export is compared with
MODEL_EXTENSIONS = (".onnx", ".mnn")
TOPK = 5
CONFUSED_SHOWN = 5
PREPROCESS_KEYS = ("input_shape", "mean", "std", "crop_pct", "interpolation", "resize", "pad_value")
MAX_LABEL_LINES = 100_000


@dataclass
class ImageFolder:
    """A labelled image tree: `samples` [(path, class index)], `classes` {folder: index}, `skipped` [(what, why)]
    for what was left out before any model ran (empty class folders)."""

    root: str
    samples: list[tuple[str, int]]
    classes: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_folder_labels(path: str) -> dict[str, int]:
    """--labels FILE: one "FOLDER INDEX" pair a line (blank lines and # comments ignored)."""
    if not os.path.isfile(path):
        raise EdgeRuntimeError(f"{path}: no such labels file (expected one 'FOLDER INDEX' pair a line)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(16 << 20).splitlines()[:MAX_LABEL_LINES]
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeRuntimeError(f"{path}: cannot read labels ({e})") from None
    mapping = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise EdgeRuntimeError(f"{path}:{number}: {line!r} is not 'FOLDER INDEX' (a folder name, a space, a "
                                   "class index)")
        mapping[parts[0]] = int(parts[1])
    if not mapping:
        raise EdgeRuntimeError(f"{path}: no 'FOLDER INDEX' lines")
    return mapping


def _images_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, n)))


def scan_imagefolder(root: str, labels_file: str | None = None) -> ImageFolder:
    """The ImageFolder tree under `root` (class folders, their image files; not recursive below them)."""
    if not os.path.isdir(root):
        raise EdgeRuntimeError(f"{root}: not a directory; --data takes an ImageFolder tree (one sub-folder of "
                               "images per class)")
    try:
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    except OSError as e:
        raise EdgeRuntimeError(f"{root}: cannot list directory ({e.strerror})") from None
    if not folders:
        loose = " (it holds images directly: put them in one sub-folder per class)" if _images_in(root) else ""
        raise EdgeRuntimeError(f"{root}: no class sub-folders{loose}")
    if labels_file:
        mapping = read_folder_labels(labels_file)
        unmapped = [d for d in folders if d not in mapping]
        if unmapped:
            raise EdgeRuntimeError(f"{labels_file}: no index for folder(s) {', '.join(unmapped[:5])}"
                                   f"{' ...' if len(unmapped) > 5 else ''} of {root}; add a 'FOLDER INDEX' line each")
        classes = {d: mapping[d] for d in folders}
    elif all(d.isdigit() for d in folders):
        classes = {d: int(d) for d in folders}
    else:
        classes = {d: i for i, d in enumerate(folders)}
    samples, skipped = [], []
    for d in folders:
        try:
            images = _images_in(os.path.join(root, d))
        except OSError as e:
            raise EdgeRuntimeError(f"{os.path.join(root, d)}: cannot list directory ({e.strerror})") from None
        if not images:
            skipped.append((os.path.join(root, d), "class folder has no image files"))
        samples.extend((p, classes[d]) for p in images)
    if not samples:
        raise EdgeRuntimeError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class "
                               "sub-folders")
    return ImageFolder(root, samples, classes, skipped)


def balanced_subset(samples: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """The first `limit` samples taking each class in turn (every class represented), or all of them."""
    if limit is None or limit >= len(samples):
        return samples
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    queues = [list(reversed(v)) for _, v in sorted(by_class.items())]
    out = []
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop())
    return sorted(out)


def check_classes(data: ImageFolder, num_classes: int, model: str) -> None:
    """Every class index of the tree must be one of the model's outputs."""
    bad = {d: i for d, i in data.classes.items() if not 0 <= i < num_classes}
    if bad:
        shown = ", ".join(f"{d} → {i}" for d, i in list(bad.items())[:3])
        raise EdgeRuntimeError(f"{data.root}: class folder(s) {shown} map to no class of {model} ({num_classes} "
                               "classes, 0.." f"{num_classes - 1}); fix the folders or --labels")


class Progress:
    """One self-overwriting stderr line, only on a terminal (logs and pipes get none)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.enabled = getattr(self.stream, "isatty", lambda: False)()
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.enabled and (done == self.total or now - self.last > 0.1):
            self.last = now
            width = 30
            bar = "#" * (width * done // max(self.total, 1))
            self.stream.write(f"\r{self.label} [{bar:<{width}}] {done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class InputCache:
    """Preprocessed images per preprocessing metadata (every file of an export shares one), and the images that
    could not be read (each reported once)."""

    def __init__(self):
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self.unreadable: dict[str, str] = {}

    def get(self, path: str, meta: dict) -> np.ndarray | None:
        key = json.dumps({k: meta.get(k) for k in PREPROCESS_KEYS}, sort_keys=True)
        arrays = self._arrays.setdefault(key, {})
        if path not in arrays and path not in self.unreadable:
            try:
                arrays[path] = preprocess(load_image(path), meta)
            except EdgeRuntimeError as e:
                self.unreadable[path] = str(e)
        return arrays.get(path)


def classify_logits(predictor, samples, cache: InputCache, progress: Progress | None = None):
    """(logits [n, C] of the readable images, their labels [n], their paths) through one model file."""
    predictor.require_metadata()
    batch = predictor.input_shape[0] if predictor.input_shape and predictor.input_shape[0] > 0 else 1
    rows, labels, paths, pending = [], [], [], []

    def flush():
        x = np.concatenate([a for a, _, _ in pending])
        n = len(x)
        if n < batch:  # a fixed-batch model: pad, then drop the padding's outputs
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])
        rows.append(predictor.run(x)[predictor.output_names[0]][:n].reshape(n, -1))
        labels.extend(y for _, y, _ in pending)
        paths.extend(p for _, _, p in pending)
        pending.clear()

    for done, (path, label) in enumerate(samples, 1):
        x = cache.get(path, predictor.meta)
        if x is not None:
            pending.append((x, label, path))
            if len(pending) == batch:
                flush()
        if progress:
            progress.update(done)
    if pending:
        flush()
    if progress:
        progress.close()
    logits = np.concatenate(rows) if rows else np.zeros((0, predictor.meta.get("num_classes") or 0), np.float32)
    return logits, np.asarray(labels, np.int64), paths


def topk_indices(logits: np.ndarray, k: int = TOPK) -> np.ndarray:
    """[n, min(k, C)] class indices, best first (ties: lower index first, as runtime.infer)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def accuracy(top: np.ndarray, labels: np.ndarray, classes: dict[str, int] | None = None) -> dict:
    """{"n", "correct1", "correct5", "top1", "top5" (fractions), "confused": most frequent (true, predicted)}."""
    n = len(labels)
    correct1 = int((top[:, 0] == labels).sum()) if n else 0
    correct5 = int((top == labels[:, None]).any(1).sum()) if n else 0
    names = {i: d for d, i in (classes or {}).items()}
    pairs = Counter((int(t), int(p)) for t, p in zip(labels, top[:, 0] if n else []) if t != p)
    confused = [{"true": t, "predicted": p, "count": c, "true_name": names.get(t, str(t)),
                 "predicted_name": names.get(p, str(p))} for (t, p), c in pairs.most_common(CONFUSED_SHOWN)]
    return {"n": n, "correct1": correct1, "correct5": correct5, "top1": correct1 / n if n else 0.0,
            "top5": correct5 / n if n else 0.0, "topk": int(top.shape[1]) if top.ndim == 2 else TOPK,
            "confused": confused}


def evaluate_classifier(model_path: str, data: ImageFolder, cache: InputCache | None = None,
                        progress: bool = False, threads: int = 1, precision: str = "fp32") -> dict:
    """One classifier file on `data`: accuracy(...) plus "file", "backend" and "top1_index" (each evaluated
    image's top-1 class, for agreement between files)."""
    from .predictor import load

    cache = cache or InputCache()
    mnn = model_path.lower().endswith(".mnn")  # "low" is MNN's; onnxruntime runs a file as exported
    predictor = load(model_path, threads=threads, precision=precision if mnn else "fp32")  # MNN's load is silenced
    predictor.require_metadata()
    task = predictor.meta.get("task", "classification")
    if task != "classification":
        raise EdgeRuntimeError(f"{model_path}: a {task} model; top-1 needs a classifier")
    num_classes = predictor.meta.get("num_classes")
    if num_classes:
        check_classes(data, num_classes, model_path)
    bar = Progress(os.path.basename(model_path), len(data.samples)) if progress else None
    logits, labels, paths = classify_logits(predictor, data.samples, cache, bar)
    if not num_classes and logits.size:
        check_classes(data, logits.shape[1], model_path)
    top = topk_indices(logits)
    result = {"file": model_path, "backend": predictor.backend, **accuracy(top, labels, data.classes)}
    result["top1_index"] = dict(zip(paths, top[:, 0].tolist()))
    return result


def export_files(directory: str) -> list[str]:
    """The shipped model files of an export directory, per its manifest.json ("files"), model.onnx first."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = list(manifest["files"])
    except FileNotFoundError:
        raise EdgeRuntimeError(f"{directory}: no {MANIFEST}; give a model file (.onnx/.mnn) or an export "
                               "directory written by python -m export") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeRuntimeError(f"{path}: unreadable export manifest ({type(e).__name__}: {e}); re-export") from None
    models = sorted((f for f in files if f.endswith(MODEL_EXTENSIONS)), key=lambda f: (f != REFERENCE, f))
    missing = [f for f in models if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise EdgeRuntimeError(f"{directory}: {', '.join(missing)} listed in {MANIFEST} but missing; re-export")
    if not models:
        raise EdgeRuntimeError(f"{directory}: {MANIFEST} lists no .onnx/.mnn file")
    return [os.path.join(directory, f) for f in models]


def compare_with_reference(results: list[dict]) -> None:
    """Add "delta_top1_points" and "agreement" (same top-1 class, on the images both evaluated) against the
    model.onnx result, when there is one."""
    ref = next((r for r in results if os.path.basename(r["file"]) == REFERENCE), None)
    if ref is None:
        return
    for r in results:
        shared = [p for p in r["top1_index"] if p in ref["top1_index"]]
        same = sum(r["top1_index"][p] == ref["top1_index"][p] for p in shared)
        r["delta_top1_points"] = round((r["top1"] - ref["top1"]) * 100, 4)
        r["agreement"] = same / len(shared) if shared else None


def evaluate_classifiers(model_paths: list[str], data: ImageFolder, progress: bool = False,
                         threads: int = 1, precision: str = "fp32") -> dict:
    """Every file on the same images: {"data", "n_images", "skipped": [{"image", "error"}], "files": [...]}."""
    cache = InputCache()
    results = [evaluate_classifier(p, data, cache, progress, threads, precision) for p in model_paths]
    if not results[0]["n"] and cache.unreadable:
        first = next(iter(cache.unreadable.values()))
        raise EdgeRuntimeError(f"{data.root}: none of its {len(data.samples)} images could be read (first: {first})")
    compare_with_reference(results)
    skipped = [{"image": p, "error": e} for p, e in data.skipped] + [
        {"image": p, "error": e} for p, e in cache.unreadable.items()]
    return {"data": data.root, "n_images": len(data.samples), "classes": len(data.classes), "precision": precision,
            "skipped": skipped, "files": results}


# ---- output
def _pct(x) -> str:
    return f"{100 * x:.2f}"


def text_table(header: list[str], rows: list[list], align: str) -> list[str]:
    """A fixed-width text table (runtime/ has no rich and no export.tables)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = [(str.rjust if a == "r" else str.ljust) for a in align]
    lines = ["  ".join(f(c, w) for f, c, w in zip(fmt, row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_classification(doc: dict) -> str:
    files = doc["files"]
    has_ref = any("delta_top1_points" in r for r in files)
    k = files[0]["topk"] if files else TOPK
    header = ["file", "backend", "images", "top-1 %", f"top-{k} %"] + (["Δ top-1 pts", "agree %"] if has_ref else [])
    rows = []
    for r in files:
        row = [os.path.basename(r["file"]), r["backend"], r["n"], f"{_pct(r['top1'])} ({r['correct1']})",
               _pct(r["top5"])]
        if has_ref:
            row += [f"{r['delta_top1_points']:+.2f}", _pct(r["agreement"]) if r["agreement"] is not None else "-"]
        rows.append(row)
    lines = [f"{doc['data']}: {doc['n_images']} images, {doc['classes']} classes"
             + (f", {len(doc['skipped'])} skipped" if doc["skipped"] else "")
             + (", MNN precision low" if doc.get("precision") == "low" else "")]
    lines += text_table(header, rows, "llrrr" + "rr" * has_ref)
    for r in files:  # the first file's pairs, then only files whose pairs differ from them
        if r["confused"] and (r is files[0] or r["confused"] != files[0]["confused"]):
            pairs = ", ".join(f"{c['true_name']}→{c['predicted_name']} ×{c['count']}" for c in r["confused"])
            lines.append(f"most confused ({os.path.basename(r['file'])}, true→predicted): {pairs}")
    return "\n".join(lines)


def public(doc: dict) -> dict:
    """The JSON document: per-image maps dropped."""
    return {**doc, "files": [{k: v for k, v in r.items() if k != "top1_index"} for r in doc["files"]]}


def evaluate_detectors(model_paths: list[str], data_arg: str, split: str = "val", limit: int | None = None,
                       progress: bool = False, threads: int = 1) -> dict:
    """Every detector file on a YOLO data set (runtime.map_eval): mAP50, mAP50-95 and Δ mAP50-95 in points
    against model.onnx."""
    from .map_eval import evaluate_detector, load_yolo

    data = load_yolo(data_arg, split, limit)
    results = []
    for path in model_paths:
        bar = Progress(os.path.basename(path), len(data.images)) if progress else None
        results.append(evaluate_detector(path, data, bar.update if bar else None, threads))
        if bar:
            bar.close()
    ref = next((r for r in results if os.path.basename(r["file"]) == REFERENCE), None)
    for r in results:
        if ref is not None and r["map50_95"] is not None and ref["map50_95"] is not None:
            r["delta_map50_95_points"] = round((r["map50_95"] - ref["map50_95"]) * 100, 4)
    return {"data": data.yaml, "split": split, "n_images": len(data.images) + len(data.skipped),
            "classes": len(data.names), "skipped": [{"image": p, "error": e} for p, e in data.skipped],
            "files": results}


def format_detection(doc: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    has_ref = any("delta_map50_95_points" in r for r in doc["files"])
    header = ["file", "backend", "images", "objects", "mAP50 %", "mAP50-95 %"] + (["Δ mAP50-95 pts"] * has_ref)
    rows = [[os.path.basename(r["file"]), r["backend"], r["n"], r["objects"], pct(r["map50"]), pct(r["map50_95"])]
            + ([f"{r['delta_map50_95_points']:+.2f}" if "delta_map50_95_points" in r else "-"] * has_ref)
            for r in doc["files"]]
    lines = [f"{doc['data']} ({doc['split']}): {doc['n_images']} images, {doc['classes']} classes"
             + (f", {len(doc['skipped'])} skipped" if doc["skipped"] else "")]
    return "\n".join(lines + text_table(header, rows, "llrrrr" + "r" * has_ref))


# ---- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m runtime.evaluate", description=__doc__.split("\n\n")[0],
        epilog="\n".join(__doc__.splitlines()[2:]) + "\nExit status: 0 evaluated (skipped images are listed and "
               "counted); 2 bad input or option (one line); 1 internal error; 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="ARTIFACT_OR_EXPORT_DIR",
                   help="a .onnx/.mnn file, or an export directory (every model file its manifest.json lists, "
                        "compared with model.onnx)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="classifier: ImageFolder tree (one sub-folder per class); detector: a YOLO data.yaml "
                        "(or the directory holding it)")
    p.add_argument("--labels", metavar="FILE", help="classifier: one 'FOLDER INDEX' pair a line")
    p.add_argument("--split", default="val", help="detector: the data.yaml split to evaluate (default val)")
    p.add_argument("--limit", type=int_in(1), metavar="N",
                   help="evaluate N images at most (classifier: each class in turn, so every class is present)")
    p.add_argument("--threads", type=int_in(1), default=1, help="intra-op CPU threads (default: 1)")
    p.add_argument("--precision", choices=("fp32", "low"), default="fp32",
                   help="classifier, MNN files: fp32 arithmetic, or low = fp16/bf16 where the CPU has it (ARMv8.2+; "
                        "fp32 on x86), as runtime.infer --precision")
    p.add_argument("--json", action="store_true", help="print one JSON document (accuracies as fractions)")
    return p.parse_args(argv)


def _model_paths(target: str) -> list[str]:
    if os.path.isdir(target):
        return export_files(target)
    if not os.path.isfile(target):
        raise EdgeRuntimeError(f"{target}: no such model file or export directory")
    if not target.lower().endswith(MODEL_EXTENSIONS):
        raise EdgeRuntimeError(f"{target}: not a .onnx or .mnn file, nor an export directory")
    return [target]


def _task(path: str) -> str:
    from .predictor import load

    return load(path).meta.get("task", "classification")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = _model_paths(args.model)
        if _task(paths[0]) == "detection":
            if args.labels:
                raise EdgeRuntimeError("--labels is for classifiers; a detector's class names come from data.yaml")
            doc = evaluate_detectors(paths, args.data, args.split, args.limit, progress=not args.json,
                                     threads=args.threads)
            formatted = format_detection
        else:
            if args.data.endswith((".yaml", ".yml")):
                raise EdgeRuntimeError(f"{args.data}: a YOLO data set, but {paths[0]} is a classifier; give an "
                                       "ImageFolder tree")
            data = scan_imagefolder(args.data, args.labels)
            data.samples = balanced_subset(data.samples, args.limit)
            doc = evaluate_classifiers(paths, data, progress=not args.json, threads=args.threads,
                                       precision=args.precision)
            formatted = format_classification
    except EdgeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in doc["skipped"]:
        message = s["error"] if s["error"].startswith(s["image"]) else f"{s['image']}: {s['error']}"
        print(f"skipped: {message}", file=sys.stderr)
    print(json.dumps(public(doc), indent=2) if args.json else formatted(doc))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
