"""A detector's mAP (runtime.map_eval through runtime.evaluate): equal to what pycocotools' COCOeval gives when
called directly on hand-written COCO dicts of the same boxes, 1.0 for perfect detections, and bad YOLO labels as
counted skips."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from runtime import evaluate, map_eval
from tests.test_detect import SIZE, TOY_BOXES, write_toy_detector

# The toy detector's anchors (network pixels = image pixels for a SIZE² image) and class scores on a white image:
# after NMS (IoU 0.7) it finds class 0 at BOX0 (score 1.0) and class 1 at BOX1 (0.9); the third anchor overlaps
# BOX0 at IoU 0.78 and is suppressed.
BOX0, BOX1 = TOY_BOXES[:2]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return write_toy_detector(tmp_path_factory.mktemp("det") / "model.onnx")


def yolo_line(c, box):
    x1, y1, x2, y2 = box
    return f"{c} {(x1 + x2) / 2 / SIZE} {(y1 + y2) / 2 / SIZE} {(x2 - x1) / SIZE} {(y2 - y1) / SIZE}"


def make_dataset(root, labels: dict[str, list[str]], names=("cat", "dog")):
    """root/data.yaml, root/images/val/<name>.png (white SIZE² images), root/labels/val/<name>.txt."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for name, lines in labels.items():
        Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(root / "images" / "val" / f"{name}.png")
        if lines is not None:
            (root / "labels" / "val" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\nval: images/val\nnames: {list(names)}\n")
    return root / "data.yaml"


def cocoeval_directly(gt_boxes: dict[int, list], dets: dict[int, list]) -> tuple[float, float]:
    """(mAP50-95, mAP50) from pycocotools on COCO dicts written here by hand: boxes as (category id, x, y, w, h)."""
    images = [{"id": i, "width": SIZE, "height": SIZE} for i in sorted(gt_boxes)]
    anns = [{"id": k, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            for k, (i, (c, x, y, w, h)) in enumerate(((i, b) for i, bs in gt_boxes.items() for b in bs), 1)]
    results = [{"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": s}
               for i, ds in dets.items() for c, x, y, w, h, s in ds]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def run(capsys, *argv):
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_perfect_detections_score_1(detector, tmp_path, capsys):
    data = make_dataset(tmp_path, {"a": [yolo_line(0, BOX0), yolo_line(1, BOX1)], "b": [yolo_line(0, BOX0),
                                                                                     yolo_line(1, BOX1)]})
    code, out, err = run(capsys, detector, "--data", data, "--json")
    assert code == 0, err
    (r,) = json.loads(out)["files"]
    assert (r["n"], r["objects"]) == (2, 4)
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0)


def test_map_equals_cocoeval_on_the_same_boxes(detector, tmp_path, capsys):
    """Image a: class 0 drawn 1 px off the detection (IoU 0.78: a hit up to IoU 0.75), class 1 exact. Image b:
    class 0 exact, a class-1 object nobody detects, and the class-1 detection where there is none."""
    shifted = [b + 1 for b in BOX0]
    missed = [40, 2, 60, 20]
    data = make_dataset(tmp_path, {"a": [yolo_line(0, shifted), yolo_line(1, BOX1)],
                                   "b": [yolo_line(0, BOX0), yolo_line(1, missed)]})
    code, out, err = run(capsys, detector, "--data", data, "--json")
    assert code == 0, err
    (r,) = json.loads(out)["files"]

    def xywh(c, b, *score):
        return (c + 1, b[0], b[1], b[2] - b[0], b[3] - b[1], *score)

    gt = {1: [xywh(0, shifted), xywh(1, BOX1)], 2: [xywh(0, BOX0), xywh(1, missed)]}
    dets = {i: [xywh(0, BOX0, 1.0), xywh(1, BOX1, 0.9)] for i in (1, 2)}
    map50_95, map50 = cocoeval_directly(gt, dets)
    assert 0 < map50 < 1 and 0 < map50_95 < map50  # the case is not degenerate
    assert r["map50"] == pytest.approx(map50, abs=1e-6)
    assert r["map50_95"] == pytest.approx(map50_95, abs=1e-6)


def test_background_images_and_names_mapping(tmp_path):
    """An image without a label file is a background image; names may be {index: name}."""
    data = make_dataset(tmp_path, {"a": [yolo_line(1, BOX1)], "b": None})
    data.write_text("val: images/val\nnames:\n  0: cat\n  1: dog\n")
    loaded = map_eval.load_yolo(str(data))
    assert loaded.names == ["cat", "dog"]
    assert [len(b) for *_r, b in loaded.images] == [1, 0]
    gt = map_eval.coco_ground_truth(loaded)
    assert gt["annotations"][0]["bbox"] == pytest.approx([30, 30, 30, 30]) and gt["annotations"][0]["category_id"] == 2


@pytest.mark.parametrize("line, why", [("2 0.5 0.5 0.1 0.1", "class 2 is outside 0..1"),
                                       ("0 0.5 1.5 0.1 0.1", "is not normalised"),
                                       ("0 0.5 0.5", "is not 'class cx cy w h'")])
def test_bad_label_line_is_a_counted_skip_of_its_image(detector, tmp_path, capsys, line, why):
    data = make_dataset(tmp_path, {"a": [yolo_line(0, BOX0), yolo_line(1, BOX1)], "b": [yolo_line(0, BOX0), line]})
    code, out, err = run(capsys, detector, "--data", data, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["n_images"] == 2 and doc["files"][0]["n"] == 1 and doc["files"][0]["map50"] == pytest.approx(1.0)
    (skip,) = err.strip().splitlines()
    assert skip.startswith("skipped: ") and "b.txt:2" in skip and why in skip


@pytest.mark.parametrize("case", ["no_yaml", "no_split", "no_names", "all_bad"])
def test_bad_dataset_one_line_exit_2(detector, tmp_path, capsys, case):
    data = make_dataset(tmp_path, {"a": ["7 0.5 0.5 0.1 0.1"] if case == "all_bad" else [yolo_line(0, BOX0)]})
    if case == "no_yaml":
        data.unlink()
        data = tmp_path
    elif case == "no_split":
        data.write_text("path: .\ntrain: images/val\nnames: [cat, dog]\n")
    elif case == "no_names":
        data.write_text("path: .\nval: images/val\n")
    code, out, err = run(capsys, detector, "--data", data)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
