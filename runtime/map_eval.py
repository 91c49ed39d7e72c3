"""A detector's mAP50 and mAP50-95 on a YOLO-format data set (Ultralytics' data.yaml, images/ and labels/*.txt),
computed by pycocotools' COCOeval (runtime extra `eval`): ground truth and runtime.detect's detections become COCO
dicts in memory. Part of `python -m runtime.evaluate` (it picks this for a detector artifact).

data.yaml: `path` (the root; relative to the YAML's folder, else to the working directory; default the YAML's
folder), a split key (`val` by default) naming an image folder, a list of them or a .txt list of images (relative
to `path`), and `names` (a list or {index: name}) or `nc`. Each image's labels are the file found by replacing the
last `images` folder of its path with `labels` and its extension with .txt: one `class cx cy w h` line per object,
normalised to 0..1. An image without a label file is a background image (no objects).

A label file with a bad line (not 5 numbers, class outside 0..nc-1, a coordinate outside 0..1 or a non-positive
size) is a counted skip of its whole image, one line naming the file and line, as Ultralytics drops such an image
from its cache ("ignoring corrupt image/label"); the other images are still evaluated.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field

from .cli import IMAGE_EXTENSIONS
from .errors import EdgeRuntimeError
from .images import load_image

# Ultralytics val: every box above conf 0.001, NMS IoU 0.7, at most 300 per image.
VAL_CONF, VAL_IOU, VAL_MAX_DET = 0.001, 0.7, 300
COORD_SLACK = 1e-6  # labels written as 1.0000001 by float formatting are still in range


@dataclass
class YoloData:
    """The images of one split with their boxes: `images` [(path, width, height, [(class, x, y, w, h) in pixels])],
    `names` class names, `skipped` [(path, why)]."""

    yaml: str
    names: list[str]
    images: list[tuple[str, int, int, list[tuple[int, float, float, float, float]]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise EdgeRuntimeError(f"mAP needs {module} (pip install 'edgeport-runtime[eval]')") from None


def read_data_yaml(path: str) -> tuple[dict, str]:
    """(the YAML document, its data root)."""
    yaml = _need("yaml")
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("data.yaml", "data.yml") if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise EdgeRuntimeError(f"{path}: no data.yaml; a detector is evaluated on a YOLO data set (data.yaml "
                                   "with images/ and labels/)")
        path = found[0]
    if not os.path.isfile(path):
        raise EdgeRuntimeError(f"{path}: no such data.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise EdgeRuntimeError(f"{path}: not a readable YAML file ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise EdgeRuntimeError(f"{path}: expected a mapping with path, val and names (Ultralytics data.yaml)")
    here = os.path.dirname(os.path.abspath(path))
    root = str(doc.get("path") or here)
    if not os.path.isabs(root):
        root = next((r for r in (os.path.join(here, root), os.path.abspath(root)) if os.path.isdir(r)),
                    os.path.join(here, root))
    return {**doc, "yaml_file": path}, os.path.normpath(root)


def class_names(doc: dict) -> list[str]:
    names = doc.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = None
        if keys is None or keys != list(range(len(keys))):
            raise EdgeRuntimeError(f"{doc['yaml_file']}: names must be a list or {{0: name, 1: name, ...}}")
        return [str(names.get(k, names.get(str(k)))) for k in keys]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    nc = doc.get("nc")
    if isinstance(nc, int) and nc > 0:
        return [str(i) for i in range(nc)]
    raise EdgeRuntimeError(f"{doc['yaml_file']}: no class names (names: [...] or nc: N)")


def split_images(doc: dict, root: str, split: str) -> list[str]:
    entry = doc.get(split)
    if not entry:
        raise EdgeRuntimeError(f"{doc['yaml_file']}: no '{split}' split; choose one with --split")
    images = []
    for item in entry if isinstance(entry, list) else [entry]:
        item = os.path.normpath(os.path.join(root, str(item)))
        if os.path.isdir(item):
            for folder, _, files in os.walk(item):
                images += [os.path.join(folder, n) for n in files if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
        elif os.path.isfile(item) and item.endswith(".txt"):
            with open(item, encoding="utf-8") as f:
                images += [os.path.normpath(os.path.join(root, line.strip())) for line in f if line.strip()]
        else:
            raise EdgeRuntimeError(f"{doc['yaml_file']}: {split} split {item} is neither a folder nor a .txt list")
    if not images:
        raise EdgeRuntimeError(f"{doc['yaml_file']}: the {split} split has no image files")
    return sorted(images)


def label_path(image: str) -> str:
    """Ultralytics' img2label_paths: the last /images/ of the path becomes /labels/, the extension .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = image.rpartition(sa)
    base = (head + sb + tail) if sep else os.path.join(os.path.dirname(image), os.path.basename(image))
    return os.path.splitext(base)[0] + ".txt"


def read_labels(path: str, nc: int, width: int, height: int) -> list[tuple[int, float, float, float, float]]:
    """One label file → [(class, x, y, w, h)] in pixels (COCO's top-left + size); EdgeRuntimeError on a bad line."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeRuntimeError(f"{path}: cannot read labels ({e})") from None
    boxes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(values) != 5:
            raise EdgeRuntimeError(f"{path}:{number}: {line.strip()!r} is not 'class cx cy w h' (5 numbers)")
        c, cx, cy, w, h = values
        if c != int(c) or not 0 <= c < nc:
            raise EdgeRuntimeError(f"{path}:{number}: class {fields[0]} is outside 0..{nc - 1} (data.yaml names)")
        if not all(-COORD_SLACK <= v <= 1 + COORD_SLACK for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise EdgeRuntimeError(f"{path}:{number}: box {' '.join(fields[1:])} is not normalised (cx cy w h in "
                                   "0..1, w and h > 0)")
        boxes.append((int(c), (cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height))
    return boxes


def load_yolo(data: str, split: str = "val", limit: int | None = None) -> YoloData:
    doc, root = read_data_yaml(data)
    names = class_names(doc)
    out = YoloData(doc["yaml_file"], names)
    for image in split_images(doc, root, split)[:limit]:
        try:
            img = load_image(image)
            boxes = read_labels(label_path(image), len(names), *img.size)
        except EdgeRuntimeError as e:
            out.skipped.append((image, str(e)))
            continue
        out.images.append((image, img.size[0], img.size[1], boxes))
    if not out.images:
        raise EdgeRuntimeError(f"{out.yaml}: none of the {len(out.skipped)} {split} images could be used (first: "
                               f"{out.skipped[0][1] if out.skipped else '-'})")
    return out


def coco_ground_truth(data: YoloData) -> dict:
    """The COCO annotation dict: image ids 1.., category ids = class index + 1 (COCO ids start at 1)."""
    images, annotations = [], []
    for image_id, (path, w, h, boxes) in enumerate(data.images, 1):
        images.append({"id": image_id, "file_name": path, "width": w, "height": h})
        for c, x, y, bw, bh in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c + 1,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(data.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(per_image: list[list[dict]]) -> list[dict]:
    """runtime.detect.detect() output, one list per image in YoloData order → COCO result dicts."""
    return [{"image_id": image_id, "category_id": d["class"] + 1, "score": d["score"],
             "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
            for image_id, dets in enumerate(per_image, 1) for d in dets]


def coco_map(ground_truth: dict, detections: list[dict]) -> dict:
    """{"map50_95", "map50"} by COCOeval with its defaults (bbox, all areas, the 100 best detections per image, as
    the COCO benchmark and Ultralytics' pycocotools check); None where the data set has no objects, 0.0 when there
    are objects but no detections."""
    _need("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not ground_truth["annotations"]:
        return {"map50_95": None, "map50": None}
    if not detections:
        return {"map50_95": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print their progress
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map50_95": float(ev.stats[0]), "map50": float(ev.stats[1])}


def evaluate_detector(model_path: str, data: YoloData, on_image=None, threads: int = 1) -> dict:
    """One detector file on `data`: {"file", "backend", "n", "objects", "map50", "map50_95"}; `on_image(done)`
    is called after each image (progress)."""
    from .detect import detect
    from .predictor import load

    predictor = load(model_path, threads=threads)
    if predictor.meta.get("task") != "detection":
        raise EdgeRuntimeError(f"{model_path}: not a detector (metadata task {predictor.meta.get('task')!r})")
    nc = len(data.names)
    per_image = []
    for done, (path, *_rest) in enumerate(data.images, 1):
        (dets,) = detect(predictor, [path], VAL_CONF, VAL_IOU, VAL_MAX_DET)
        per_image.append([d for d in dets if d["class"] < nc])
        if on_image:
            on_image(done)
    result = coco_map(coco_ground_truth(data), coco_detections(per_image))
    return {"file": model_path, "backend": predictor.backend, "n": len(data.images),
            "objects": sum(len(b) for *_r, b in data.images), **result}
