"""runtime/detect.py (letterbox, NMS, CLI) and export/detection_parity.py, on a hand-built ONNX detector."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from export.detection_parity import check_detection_gates, compare_detections, detection_gates
from runtime.detect import box_iou, main, nms, to_original
from runtime.preprocess import letterbox

SIZE = 64


def _brute_force_nms(boxes, scores, conf, iou, max_det):
    """The definition, spelled out: best class per anchor above conf; in score order, keep a box unless a kept
    box of its class overlaps it by more than iou."""
    order = sorted(range(len(boxes)), key=lambda a: -scores[a].max())
    kept = []
    for a in order:
        c, s = int(scores[a].argmax()), float(scores[a].max())
        if s <= conf:
            continue
        if all(int(scores[k].argmax()) != c or box_iou(boxes[k:k + 1], boxes[a:a + 1])[0, 0] <= iou for k in kept):
            kept.append(a)
    return [(a, int(scores[a].argmax())) for a in kept[:max_det]]


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (300, 4)).astype(np.float32) ** 3
    got = nms(boxes, scores, conf=0.25, iou=0.45, max_det=40)
    want = _brute_force_nms(boxes, scores, 0.25, 0.45, 40)
    assert [int(c) for c in got[:, 5]] == [c for _, c in want]
    np.testing.assert_array_equal(got[:, :4], boxes[[a for a, _ in want]])


def test_nms_is_class_aware_and_thresholded():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.9, 0], [0.8, 0], [0, 0.7], [0.2, 0.1]], np.float32)
    got = nms(boxes, scores, conf=0.25, iou=0.45)
    assert got[:, 5].tolist() == [0, 1] and got[:, 4].tolist() == pytest.approx([0.9, 0.7])
    assert nms(boxes, scores, conf=0.95).shape == (0, 6)


def test_letterbox_places_the_image_and_boxes_map_back():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x, lb = letterbox(img, (SIZE, SIZE))
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == np.float32
    assert (lb.scale, lb.left, lb.top) == (0.32, 0, 16)
    assert x[0, :, 0, 0] == pytest.approx([114 / 255] * 3) and x[0, :, 32, 32] == pytest.approx([1, 0, 0])
    dets = np.array([[0, 16, 64, 48, 0.9, 3]], np.float32)
    np.testing.assert_allclose(to_original(dets, lb)[0, :4], [0, 0, 200, 100], atol=1e-4)


def _outputs(n=1, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 600, (n, 500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 500, 2))], 2).astype(np.float32)
    scores = (rng.uniform(0, 1, (n, 500, 3)) ** 4).astype(np.float32)
    return {"boxes": boxes, "scores": scores}


def test_compare_detections_same_outputs_pass_and_defects_breach():
    ref = _outputs(2)
    same = compare_detections(ref, {k: v.copy() for k, v in ref.items()}, {})
    assert same["matched"] == same["detections_ref"] > 0 and same["unmatched"] == 0 and same["min_iou"] == 1.0
    assert check_detection_gates(same, detection_gates("ort"), "ort") == []
    shifted = {k: v.copy() for k, v in ref.items()}
    shifted["boxes"][0, :, [0, 2]] += 1.0  # every box one pixel to the right
    m = compare_detections(ref, shifted, {})
    lines = check_detection_gates(m, detection_gates("ort"), "ort")
    assert m["box_px"] == pytest.approx(1.0) and any("box_px" in line for line in lines)
    two = {"boxes": np.array([[[0, 0, 10, 10], [100, 100, 120, 130]]], np.float32),
           "scores": np.array([[[0.9, 0.0], [0.0, 0.6]]], np.float32)}
    one = {"boxes": two["boxes"].copy(), "scores": two["scores"].copy()}
    one["scores"][0, 1, 1] = 0.0  # the second object is not detected any more
    m = compare_detections(two, one, {})
    assert (m["matched"], m["unmatched"], m["borderline"]) == (1, 1, 0)
    assert any("unmatched" in x for x in check_detection_gates(m, detection_gates("ort"), "ort"))
    near = {"boxes": two["boxes"].copy(), "scores": two["scores"].copy()}
    near["scores"][0, 1, 1] = 0.2499  # crossed the 0.25 threshold by a hair: borderline
    two["scores"][0, 1, 1] = 0.2501
    m = compare_detections(two, near, {})
    assert (m["unmatched"], m["borderline"]) == (0, 1)


def test_borderline_margin_is_the_targets_score_gate():
    """A detection that fell 0.04 below the threshold: unmatched for a target whose scores may move by 0.02 at
    most (fp16 weights), borderline for one allowed 0.06 (fp16 arithmetic), judged through export.parity.judge."""
    from export.parity import judge

    ref = {"boxes": np.array([[[0, 0, 10, 10], [100, 100, 120, 130]]], np.float32),
           "scores": np.array([[[0.9, 0.0], [0.0, 0.27]]], np.float32)}
    out = {"boxes": ref["boxes"].copy(), "scores": ref["scores"].copy()}
    out["scores"][0, 1, 1] = 0.23
    meta = {"task": "detection"}
    strict = judge("mnn_fp16w", ref, out, {}, False, meta)
    loose = judge("mnn_low", ref, out, {}, False, meta)
    assert (strict[0]["detections"]["unmatched"], strict[0]["detections"]["borderline"]) == (1, 0)
    assert any("unmatched" in b for b in strict[1]) and any("score" in b for b in strict[1])
    assert (loose[0]["detections"]["unmatched"], loose[0]["detections"]["borderline"]) == (0, 1)
    assert loose[1] == []
    out["scores"][0, 1, 1] = 0.15  # 0.12 off: beyond any fp16 gate, a lost detection however it is counted
    assert judge("mnn_low", ref, out, {}, False, meta)[1]



def test_tied_overlapping_boxes_may_trade_places_but_a_real_move_may_not():
    # Anchors 0 and 1: one object seen twice (IoU 0.82 > the NMS threshold), same class, scores tied within
    # 5e-4; anchor 2 is another object.
    boxes = np.array([[[0, 0, 100, 100], [5, 5, 105, 105], [60, 60, 160, 160]]], np.float32)
    ref = {"boxes": boxes, "scores": np.array([[[0.5005], [0.5000], [0.3]]], np.float32)}
    out = {"boxes": boxes.copy(), "scores": np.array([[[0.5000], [0.5005], [0.3]]], np.float32)}
    m = compare_detections(ref, out, {})
    assert (m["swapped"], m["unmatched"], m["min_iou"]) == (1, 0, 1.0), m
    assert check_detection_gates(m, detection_gates("mnn_fp16w"), "mnn_fp16w") == []  # score error 5e-4 ok
    # The same trade with scores 0.2 apart is not a tie: the kept box moved by 5 px, and that is an error.
    ref["scores"][0, 0, 0], out["scores"][0, 1, 0] = 0.9, 0.9
    m = compare_detections(ref, out, {})
    assert m["swapped"] == 0 and m["min_iou"] < 0.9
    assert any("min_iou" in x for x in check_detection_gates(m, detection_gates("mnn_fp16w"), "mnn_fp16w"))

# --- CLI on a hand-built ONNX "detector": 3 fixed boxes whose scores are the image's mean brightness ----------

TOY_BOXES = ([4, 4, 20, 20], [30, 30, 60, 60], [5, 5, 21, 21])  # the third overlaps the first at IoU 0.78


def write_toy_detector(path) -> str:
    """A SIZE² ONNX detector with 3 fixed anchors (TOY_BOXES) whose 2 class scores are the image's mean brightness
    times fixed weights: on a white image class 0 at the first box (1.0) and class 1 at the second (0.9)."""
    boxes = np.array([TOY_BOXES], np.float32)
    weights = np.array([[[1.0, 0.0], [0.0, 0.9], [0.95, 0.0]]], np.float32)  # 2 classes
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=1, axes=[1, 2, 3]),  # [1, 1, 1, 1]
        helper.make_node("Reshape", ["mean", "shape111"], ["m"]),
        helper.make_node("Mul", ["m", "weights"], ["scores"]),
        helper.make_node("Identity", ["box_init"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes, "toy_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 2])],
        [helper.make_tensor("box_init", TensorProto.FLOAT, boxes.shape, boxes.ravel()),
         helper.make_tensor("weights", TensorProto.FLOAT, weights.shape, weights.ravel()),
         helper.make_tensor("shape111", TensorProto.INT64, [3], [1, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"task": "detection", "input_shape": [1, 3, SIZE, SIZE], "mean": [0, 0, 0], "std": [1, 1, 1],
            "crop_pct": 1.0, "interpolation": "bilinear", "resize": "letterbox", "pad_value": 114,
            "names": ["cat", "dog"], "output_names": ["boxes", "scores"]}
    helper.set_model_props(model, {"edgeport": json.dumps(meta)})
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return write_toy_detector(tmp_path_factory.mktemp("det") / "toy.onnx")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (SIZE, SIZE), (200, 200, 200)).save(d / "bright.png")
    Image.new("RGB", (128, 64), (0, 0, 0)).save(d / "black.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def test_cli_detects_saves_pngs_and_json(detector, photos, tmp_path, capsys):
    rc = main([detector, str(photos / "bright.png"), "--json", "--save-dir", str(tmp_path)])
    doc = json.loads(capsys.readouterr().out)
    (res,) = doc["results"]
    assert rc == 0 and [d["label"] for d in res["detections"]] == ["cat", "dog"]  # box 3 suppressed by box 1
    top = res["detections"][0]
    assert top["box"] == [4, 4, 20, 20] and top["score"] == pytest.approx(200 / 255, abs=1e-4)
    with Image.open(res["saved"]) as im:
        assert im.size == (SIZE, SIZE) and im.getpixel((4, 12)) != (200, 200, 200)  # a box edge was drawn


def test_cli_no_detections_is_an_empty_list_exit_0(detector, photos, capsys):
    assert main([detector, str(photos / "black.jpg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["detections"] == []


def test_cli_non_image_is_one_line_exit_2(detector, photos, capsys):
    assert main([detector, str(photos / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "not an image" in err


def test_cli_bad_threshold_exit_2(detector, photos, capsys):
    assert main([detector, str(photos / "bright.png"), "--conf", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --conf")


@pytest.mark.parametrize("case", ["regular file", "below a regular file", "/dev/null", "drawing name is a dir"])
def test_cli_unusable_save_dir_is_one_line_exit_2(detector, photos, tmp_path, capsys, case):
    (tmp_path / "file.txt").write_text("mine\n")
    save_dir = {"regular file": tmp_path / "file.txt", "below a regular file": tmp_path / "file.txt" / "out",
                "/dev/null": "/dev/null", "drawing name is a dir": tmp_path / "out"}[case]
    (tmp_path / "out" / "bright.png").mkdir(parents=True)  # where bright.png's drawing would go
    code = main([detector, str(photos / "bright.png"), "--save-dir", str(save_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert (tmp_path / "file.txt").read_text() == "mine\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["bright.png"]  # no temp file left behind


def test_cli_same_stem_in_different_folders_never_overwrites(detector, tmp_path, capsys):
    """a/x.png, b/x.png and a/x.jpg: three drawings, each of its own image (sizes differ), none overwritten."""
    sizes = {"a/x.png": (40, 30), "b/x.png": (50, 20), "a/x.jpg": (30, 60)}
    for rel, size in sizes.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 200, 200)).save(tmp_path / rel)
    images = [str(tmp_path / rel) for rel in sizes]
    assert main([detector, *images, "--save-dir", str(tmp_path / "out"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    saved = [r["saved"] for r in doc["results"]]
    assert [os.path.basename(p) for p in saved] == ["x.png", "x-2.png", "x-3.png"]
    for path, size in zip(saved, sizes.values()):
        with Image.open(path) as im:
            assert im.size == size
