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

from models.metrics import check_gates
from runtime.detect import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, box_iou, nms

SCORE_MARGIN = 0.01
IOU_MARGIN = 0.02
PAIR_IOU = 0.5  # below this two boxes are different objects, not one detection moved
BOX_SCORE_FLOOR = 0.01  # box errors are judged on anchors some class scores at least this high

METRICS = ("box_px", "box_px_all", "score", "unmatched", "class_mismatch", "min_iou", "borderline")


def detection_gates(target: str, gates: dict | None = None) -> dict:
    """The detection gates of `target` (its registry record's `detection_gates`), with any detection metric in
    `gates` laid over (the classification metrics, max_rel/top1/cosine, do not apply to a detector)."""
    from . import targets

    return {**targets.get(target).detection_gates, **{k: v for k, v in (gates or {}).items() if k in METRICS}}


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
    """Breach lines ("mnn_fp32: box_px 0.31 > 0.05") for every gated metric that fails; NaN/Inf always breaches
    (models.metrics.check_gates: one gate checker for every output kind)."""
    return check_gates(metrics, gates, label)
