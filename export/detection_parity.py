"""Parity for detectors: raw-output errors, and the same detections after NMS (runtime/detect.py's NMS, the one
the board runs).

    compare_detections(ref, out, meta) -> metrics    ref/out: {"boxes": [N, A, 4], "scores": [N, A, nc]}
    check_detection_gates(metrics, gates, label) -> breach lines

A detection whose score lies within SCORE_MARGIN of the threshold, or whose suppression hinged on an IoU within
IOU_MARGIN of the NMS threshold, may legitimately appear on one side only: it counts as `borderline`, not as
`unmatched` (the raw score and box errors are gated on their own).
"""
from __future__ import annotations

import numpy as np

from runtime.detect import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, box_iou, nms

SCORE_MARGIN = 0.01
IOU_MARGIN = 0.02
PAIR_IOU = 0.5  # below this two boxes are different objects, not one detection moved
BOX_SCORE_FLOOR = 0.01  # box errors are judged on anchors some class scores at least this high

_FP32 = {"box_px": 0.05, "score": 1e-4, "min_iou": 0.99, "unmatched": 0, "class_mismatch": 0}
# fp16-stored weights, measured on yolo11n_fasternet_t0 at 640² (calibrated random weights, 20 inputs, 515
# detections): box_px 16.4 (one P5 anchor: the DFL expectation over 16 bins × stride 32 turns a 2^-11 weight
# rounding, grown over ~100 layers, into pixels), score 0.011, after NMS 0 unmatched, 10 borderline, min IoU
# 0.956. Gates = measurement + ~20 % margin; the classifier's max_rel 1e-2 would fail it too (boxes 2 %).
_LOSSY = {"box_px": 20.0, "score": 2e-2, "min_iou": 0.95, "unmatched": 0, "class_mismatch": 0}
# Starting points, per export target (export/targets.py names); measure and tighten per model.
DEFAULT_DETECTION_GATES = {
    "torch_inference": dict(_FP32),  # yolo11n_fasternet_t0 at 640², BN folds: 0.015 px, 4e-5 score (float32 rounding)
    "ort": dict(_FP32),
    "mnn_fp32": dict(_FP32),
    "mnn_fp16w": dict(_LOSSY),
    "mnn_low": dict(_LOSSY),
    "mnn_fp16w_low": dict(_LOSSY),
    # int8 weights: unmeasured-as-passing; yolo11n_fasternet_t0 at 640² gives 140 unmatched of 515, box_px 355,
    # score 0.27, min IoU 0.50 on calibrated random weights: it FAILS, as it should (not loosened to pass).
    "mnn_int8w": {**_LOSSY, "box_px": 8.0, "score": 0.1, "min_iou": 0.9},
    "ort_int8": {**_LOSSY, "box_px": 8.0, "score": 0.1, "min_iou": 0.9},
    "mnn_int8": {**_LOSSY, "box_px": 8.0, "score": 0.1, "min_iou": 0.9},
}
_LOWER_BOUNDED = ("min_iou",)
METRICS = ("box_px", "box_px_all", "score", "unmatched", "class_mismatch", "min_iou", "borderline")


def detection_gates(target: str, gates: dict | None = None) -> dict:
    """The detection gates of `target`: DEFAULT_DETECTION_GATES, with any detection metric in `gates` laid over
    (the registry's classification metrics, max_rel/top1/cosine, do not apply to a detector)."""
    if target not in DEFAULT_DETECTION_GATES:
        raise KeyError(f"no detection gates for target '{target}'; add them to DEFAULT_DETECTION_GATES")
    return {**DEFAULT_DETECTION_GATES[target], **{k: v for k, v in (gates or {}).items() if k in METRICS}}


def _pair(ref_dets, out_dets):
    """Greedy pairs (ref i, out j, IoU), best reference detections first, each side used once."""
    if not len(ref_dets) or not len(out_dets):
        return []
    ious = box_iou(ref_dets[:, :4], out_dets[:, :4])
    same_class = ref_dets[:, None, 5] == out_dets[None, :, 5]
    pairs, used = [], set()
    for i in range(len(ref_dets)):  # same class first, then the most overlapping
        order = [j for j in np.lexsort((-ious[i], ~same_class[i])) if j not in used]
        if order and ious[i, order[0]] >= PAIR_IOU:
            used.add(order[0])
            pairs.append((i, int(order[0]), float(ious[i, order[0]])))
    return pairs


def _borderline(det, other_dets, conf, iou) -> bool:
    if abs(det[4] - conf) <= SCORE_MARGIN:
        return True
    rivals = other_dets[(other_dets[:, 5] == det[5]) & (other_dets[:, 4] >= det[4] - SCORE_MARGIN)]
    if len(rivals):
        overlap = box_iou(det[None, :4], rivals[:, :4]).max()
        return abs(overlap - iou) <= IOU_MARGIN
    return False


def compare_detections(ref: dict, out: dict, meta: dict | None = None) -> dict:
    """Metrics of a candidate's detector outputs against the reference's, over the batch.

    box_px: max |Δ| of box coordinates (input pixels) over anchors whose reference scores reach BOX_SCORE_FLOOR;
    box_px_all over every anchor; score: max |Δ| of scores. After NMS (conf, iou, max_det from meta's
    "nms" entry or runtime.detect's defaults): matched, unmatched (either side), borderline, class_mismatch and
    min_iou over matched pairs (1.0 when there are none)."""
    settings = (meta or {}).get("nms") or {}
    conf = float(settings.get("conf", DEFAULT_CONF))
    iou = float(settings.get("iou", DEFAULT_IOU))
    max_det = int(settings.get("max_det", DEFAULT_MAX_DET))
    rb, rs = np.asarray(ref["boxes"], np.float64), np.asarray(ref["scores"], np.float64)
    ob, os_ = np.asarray(out["boxes"], np.float64), np.asarray(out["scores"], np.float64)
    if rb.shape != ob.shape or rs.shape != os_.shape:
        raise ValueError(f"shape mismatch: boxes {rb.shape} vs {ob.shape}, scores {rs.shape} vs {os_.shape}")
    finite = bool(np.isfinite(ob).all() and np.isfinite(os_).all())
    box_err = np.abs(np.nan_to_num(ob, nan=np.inf) - rb).max(-1)  # [N, A]
    scored = rs.max(-1) >= BOX_SCORE_FLOOR
    score_err = float(np.abs(np.nan_to_num(os_, nan=np.inf) - rs).max()) if rs.size else 0.0
    m = {"box_px": float(box_err[scored].max()) if scored.any() else 0.0,
         "box_px_all": float(box_err.max()) if box_err.size else 0.0,
         "score": score_err, "detections_ref": 0, "detections_out": 0, "matched": 0, "unmatched": 0,
         "borderline": 0, "class_mismatch": 0, "min_iou": 1.0, "nan_inf": 0 if finite else 1,
         "nms": {"conf": conf, "iou": iou, "max_det": max_det}}
    for n in range(rb.shape[0]):
        rd = nms(rb[n], rs[n], conf, iou, max_det).astype(np.float64)
        od = nms(np.nan_to_num(ob[n]), np.nan_to_num(os_[n]), conf, iou, max_det).astype(np.float64)
        pairs = _pair(rd, od)
        m["detections_ref"] += len(rd)
        m["detections_out"] += len(od)
        m["matched"] += len(pairs)
        m["class_mismatch"] += int(sum(rd[i, 5] != od[j, 5] for i, j, _ in pairs))
        if pairs:
            m["min_iou"] = min(m["min_iou"], min(p[2] for p in pairs))
        lone_ref = set(range(len(rd))) - {i for i, _, _ in pairs}
        lone_out = set(range(len(od))) - {j for _, j, _ in pairs}
        for dets, others, lone in ((rd, od, lone_ref), (od, rd, lone_out)):
            for k in lone:
                if _borderline(dets[k], others, conf, iou):
                    m["borderline"] += 1
                else:
                    m["unmatched"] += 1
    return m


def check_detection_gates(metrics: dict, gates: dict, label: str) -> list[str]:
    """Breach lines ("mnn_fp32: box_px 0.31 > 0.05") for every gated metric that fails; NaN/Inf always breaches."""
    breaches = [f"{label}: NaN/Inf in the outputs"] if metrics.get("nan_inf") else []
    for name, limit in gates.items():
        value = metrics.get(name)
        if value is None:
            continue
        if name in _LOWER_BOUNDED and not value >= limit:
            breaches.append(f"{label}: {name} {value:.4g} < {limit:.4g}")
        elif name not in _LOWER_BOUNDED and not value <= limit:
            breaches.append(f"{label}: {name} {value:.4g} > {limit:.4g}")
    return breaches
