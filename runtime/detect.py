"""Detect objects with an edgeport detector artifact (.mnn / .onnx), torch-free: letterbox, run, NMS in numpy,
boxes back in the original image's pixels, optionally a PNG per image with the labelled boxes.

Examples:
  python -m runtime.detect model.mnn street.jpg
  python -m runtime.detect model.onnx photos/ --conf 0.4 --save-dir out/ --json
  python -m runtime.detect model.mnn street.jpg --threads 4 --labels coco.txt
  python -m runtime.detect model.onnx street.jpg --engine openvino
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from .atomic import write_atomic
from .cli import OneLineParser, cli_main, expand_images, for_each_image, int_in, read_labels
from .errors import EdgeRuntimeError
from .images import load_image
from .predictor import ENGINE_CHOICES
from .preprocess import PAD_VALUE, Letterbox, letterbox

DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET = 0.25, 0.45, 300
MAX_NMS = 30000  # candidates kept for NMS, best first (Ultralytics' max_nms)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of x1y1x2y2 boxes [N, 4] × [M, 4] (areas without +1, as torchvision)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU,
        max_det: int = DEFAULT_MAX_DET) -> np.ndarray:
    """One image: boxes [A, 4] x1y1x2y2, scores [A, nc] → [K, 6] rows (x1, y1, x2, y2, score, class), best first.

    Ultralytics' default NMS: each anchor's best class, kept if its score > conf; greedy, class-aware (a box only
    suppresses boxes of its own class) at IoU > iou; at most MAX_NMS candidates and max_det results."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep, best, cls = nms_anchors(boxes, scores, conf, iou, max_det)
    return np.concatenate([boxes[keep], best[keep, None], cls[keep, None].astype(np.float32)], 1)


def nms_anchors(boxes: np.ndarray, scores: np.ndarray, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU,
                max_det: int = DEFAULT_MAX_DET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`nms` as anchor indices: (kept anchors best first, each anchor's best score, each anchor's class)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(len(boxes), -1)
    cls = scores.argmax(1)
    best = scores[np.arange(len(scores)), cls]
    cand = np.flatnonzero(best > conf)
    cand = cand[np.argsort(-best[cand], kind="stable")][:MAX_NMS]
    keep = []
    for c in np.unique(cls[cand]):
        idx = cand[cls[cand] == c]  # still sorted by score
        while idx.size:
            keep.append(idx[0])
            if idx.size == 1:
                break
            overlaps = box_iou(boxes[idx[:1]], boxes[idx[1:]])[0]
            idx = idx[1:][overlaps <= iou]
    keep = np.asarray(keep, dtype=np.int64)
    return keep[np.argsort(-best[keep], kind="stable")][:max_det], best, cls


def to_original(dets: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Detections in network-input pixels → original-image pixels, clipped to the image."""
    out = dets.copy()
    out[:, [0, 2]] = np.clip((dets[:, [0, 2]] - lb.left) / lb.scale, 0, lb.width)
    out[:, [1, 3]] = np.clip((dets[:, [1, 3]] - lb.top) / lb.scale, 0, lb.height)
    return out


def as_dicts(dets: np.ndarray, labels=None) -> list[dict]:
    rows = []
    for x1, y1, x2, y2, score, c in dets.tolist():
        row = {"box": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)], "score": round(score, 5),
               "class": int(c)}
        if labels is not None and int(c) < len(labels):
            row["label"] = labels[int(c)]
        rows.append(row)
    return rows


def labels_of(predictor) -> list[str] | None:
    names = predictor.meta.get("names") or predictor.meta.get("labels")  # lists of strings (runtime.metadata)
    return list(names) if names else None


def detect(predictor, images, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU,
           max_det: int = DEFAULT_MAX_DET, labels=None) -> list[list[dict]]:
    """Paths or PIL images (or one) → per image a list of {"box": [x1, y1, x2, y2] in original pixels, "score",
    "class"[, "label"]}, best first; [] when nothing passes `conf`."""
    if not 0 <= conf <= 1 or not 0 <= iou <= 1 or max_det < 1:
        raise EdgeRuntimeError(f"conf {conf} and iou {iou} must be in [0, 1], max_det {max_det} >= 1")
    meta = predictor.meta
    if meta.get("task") != "detection":
        raise EdgeRuntimeError(f"{predictor.path}: a {meta.get('task', 'classification')} model, not a detector; "
                               "use python -m runtime.infer")
    box_name, score_name = predictor.detector_outputs()
    labels = labels if labels is not None else labels_of(predictor)
    size = tuple(int(d) for d in meta["input_shape"][-2:])
    batch = meta["input_shape"][0] if meta["input_shape"][0] > 0 else 1
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    results = []
    for img in images:
        x, lb = letterbox(load_image(img), size, int(meta.get("pad_value", PAD_VALUE)), meta.get("mean", (0, 0, 0)),
                          meta.get("std", (1, 1, 1)))
        if batch > 1:  # a fixed-batch model: pad, use the first row
            x = np.concatenate([x, np.zeros((batch - 1, *x.shape[1:]), np.float32)])
        out = predictor.run(x)
        dets = nms(out[box_name][0], out[score_name][0], conf, iou, max_det)
        results.append(as_dicts(to_original(dets, lb), labels))
    return results


_COLOURS = [(255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
            (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
            (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255)]


def draw(img: Image.Image, detections: list[dict]) -> Image.Image:
    """A copy of `img` with each detection's box and "label score" drawn."""
    out = img.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 320))
    for det in detections:
        colour = _COLOURS[det["class"] % len(_COLOURS)]
        x1, y1, x2, y2 = det["box"]
        d.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{det.get('label', det['class'])} {det['score']:.2f}"
        tb = d.textbbox((x1, y1), text)
        th = tb[3] - tb[1] + 4
        ty = y1 - th if y1 - th >= 0 else y1
        d.rectangle((x1, ty, x1 + tb[2] - tb[0] + 4, ty + th), fill=colour)
        d.text((x1 + 2, ty + 1), text, fill=(255, 255, 255))
    return out


def save_png(img: Image.Image, path: str) -> None:
    """Write atomically (runtime.atomic: a temp file beside it, then rename; nothing left behind on failure)."""
    png = io.BytesIO()
    img.save(png, format="PNG")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, png.getvalue())
    except OSError as e:
        raise EdgeRuntimeError(f"{path}: cannot write the drawing ({e.strerror or e})") from None


def drawing_names(paths: list[str]) -> dict[str, str]:
    """image path → file name of its drawing: "<stem>.png", and "<stem>-2.png", "<stem>-3.png", ... for later
    images whose stem is taken (a/x.jpg, b/x.jpg, x.png), in argument order, so no drawing overwrites another."""
    names, taken = {}, set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = stem + ".png", 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}.png"
        taken.add(name)
        names[path] = name
    return names


def prepare_save_dir(save_dir: str) -> None:
    """Create --save-dir (and its parents) up front: EdgeRuntimeError if it is a file or cannot be made."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise EdgeRuntimeError(f"--save-dir {save_dir}: exists and is not a directory; name a directory (it is "
                               "created if missing)")
    try:
        os.makedirs(save_dir or ".", exist_ok=True)
    except OSError as e:
        raise EdgeRuntimeError(f"--save-dir {save_dir}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(save_dir or ".", os.W_OK | os.X_OK):
        raise EdgeRuntimeError(f"--save-dir {save_dir}: directory is not writable")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m runtime.detect", description=__doc__.split("\n\n")[0],
        epilog="\n".join(__doc__.splitlines()[3:]) + "\n\nExit status: 0 ok (also when nothing is detected), "
               "2 on any error (one line each).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="detector artifact: .mnn (MNN) or .onnx (onnxruntime or OpenVINO)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or directories (their image files, sorted, not recursive)")
    p.add_argument("--conf", type=float, default=DEFAULT_CONF, help=f"score threshold (default {DEFAULT_CONF})")
    p.add_argument("--iou", type=float, default=DEFAULT_IOU, help=f"NMS IoU threshold (default {DEFAULT_IOU})")
    p.add_argument("--max-det", type=int_in(1), default=DEFAULT_MAX_DET, help="detections kept per image (default 300)")
    p.add_argument("--save-dir", metavar="DIR",
                   help="write <image stem>.png with the labelled boxes here (created if missing); images sharing "
                        "a stem get <stem>-2.png, <stem>-3.png, ... in argument order")
    p.add_argument("--labels", metavar="FILE", help="text file: one class name a line (default: the artifact's)")
    p.add_argument("--threads", type=int_in(1), default=1, help="intra-op CPU threads (default: 1)")
    p.add_argument("--engine", "--backend", dest="engine", choices=ENGINE_CHOICES, default="auto",
                   help="auto = from the file extension (.mnn: mnn, .onnx: onnxruntime); openvino runs a .onnx file "
                        "(pip install openvino); --backend is its former name")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p.parse_args(argv)


def format_result(path: str, dets: list[dict]) -> str:
    lines = [f"{path}: {len(dets)} detection{'s' if len(dets) != 1 else ''}"]
    for d in dets:
        x1, y1, x2, y2 = d["box"]
        lines.append(f"  {d['score']:.3f}  {d.get('label', d['class'])!s:<14} "
                     f"[{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .predictor import load

    args = parse_args(argv)
    try:
        if not 0 <= args.conf <= 1 or not 0 <= args.iou <= 1:
            raise EdgeRuntimeError(f"--conf {args.conf} / --iou {args.iou}: both must be in [0, 1]")
        predictor = load(args.model, engine=args.engine, threads=args.threads)
        if predictor.meta.get("task") != "detection" or "input_shape" not in predictor.meta:
            raise EdgeRuntimeError(f"{args.model}: not an edgeport detector artifact (metadata task is "
                                   f"{predictor.meta.get('task')!r}); for classifiers use python -m runtime.infer")
        labels = read_labels(args.labels) if args.labels else labels_of(predictor)
        paths = expand_images(args.images)
        if args.save_dir is not None:
            prepare_save_dir(args.save_dir)
            drawings = drawing_names(paths)
    except EdgeRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def handle(path):
        (dets,) = detect(predictor, [path], args.conf, args.iou, args.max_det, labels)
        result = {"image": path, "detections": dets}
        if args.save_dir is not None:
            result["saved"] = os.path.join(args.save_dir, drawings[path])
            save_png(draw(load_image(path), dets), result["saved"])
        return result

    def show(r):
        return format_result(r["image"], r["detections"]) + (f"\n  drawn to {r['saved']}" if "saved" in r else "")

    results, failed = for_each_image(paths, handle, show, args.json)
    if args.json:
        print(json.dumps({"model": args.model, "backend": predictor.backend, "conf": args.conf, "iou": args.iou,
                          "results": results}, indent=2))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
