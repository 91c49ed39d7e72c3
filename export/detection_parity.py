"""Parity for detectors: raw-output errors, and the same detections after NMS (runtime/detect.py's NMS, the one
the board runs).

    compare_detections(ref, out, meta, score_margin) -> metrics    ref/out: {"boxes": [N, A, 4], "scores": [N, A, nc]}
    check_detection_gates(metrics, gates, label) -> breach lines

A detection whose score lies within the score margin of the threshold, or whose suppression hinged on an IoU
within IOU_MARGIN of the NMS threshold or on a score order within the score margin, may legitimately appear on
one side only: it counts as `borderline`, not as `unmatched`. Two overlapping anchors whose scores tie within
the margin may also trade places (each side keeps the other one): such a pair is `swapped`, and its IoU is
the two anchors' overlap, not an error, so it is left out of min_iou (the raw score and box errors of every
anchor are gated on their own). The score margin is the target's own score gate (at least SCORE_MARGIN): a
target allowed to move scores by e cannot be asked to order, or threshold, scores closer than e.
"""
from __future__ import annotations

import numpy as np

from models.metrics import check_gates
from runtime.detect import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, box_iou, nms_anchors

SCORE_MARGIN = 0.01  # the least score margin, for targets whose score gate is tighter (fp32)
IOU_MARGIN = 0.02
PAIR_IOU = 0.5  # below this two boxes are different objects, not one detection moved
BOX_SCORE_FLOOR = 0.01  # box errors are judged on anchors some class scores at least this high

METRICS = ("box_px", "box_px_all", "score", "unmatched", "class_mismatch", "min_iou", "borderline", "swapped")


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


def _borderline(det, other_dets, conf, iou, margin) -> bool:
    if abs(det[4] - conf) <= margin:
        return True
    rivals = other_dets[(other_dets[:, 5] == det[5]) & (other_dets[:, 4] >= det[4] - margin)]
    if len(rivals):
        overlap = box_iou(det[None, :4], rivals[:, :4]).max()
        return abs(overlap - iou) <= IOU_MARGIN
    return False


class _Side:
    """One image's outputs on one side: its NMS result as anchors (`keep`) and rows (`dets`)."""

    def __init__(self, boxes, scores, conf, iou, max_det, margin):
        self.margin = margin
        self.boxes = np.asarray(boxes, np.float64)
        keep, self.best, self.cls = nms_anchors(boxes, scores, conf, iou, max_det)
        self.keep = keep.tolist()
        self.dets = np.concatenate([self.boxes[keep], self.best[keep, None].astype(np.float64),
                                    self.cls[keep, None].astype(np.float64)], 1)

    def tied(self, a: int, b: int) -> bool:
        return abs(float(self.best[a]) - float(self.best[b])) <= self.margin

    def suppressed_by_tie(self, anchor: int, iou: float, traded: set) -> bool:
        """This side dropped `anchor` for a kept same-class box overlapping it near or above the NMS threshold
        whose score ties with it, or which itself traded places with a tied anchor."""
        rivals = [k for k in self.keep if k != anchor and self.cls[k] == self.cls[anchor]]
        if not rivals:
            return False
        overlap = box_iou(self.boxes[anchor][None], self.boxes[rivals])[0]
        return any(o > iou - IOU_MARGIN and (self.tied(k, anchor) or k in traded)
                   for k, o in zip(rivals, overlap))


def compare_detections(ref: dict, out: dict, meta: dict | None = None, score_margin: float = SCORE_MARGIN
                       ) -> dict:
    """Metrics of a candidate's detector outputs against the reference's, over the batch.

    box_px: max |Δ| of box coordinates (input pixels) over anchors whose reference scores reach BOX_SCORE_FLOOR;
    box_px_all over every anchor; score: max |Δ| of scores. After NMS (conf, iou, max_det from meta's
    "nms" entry or runtime.detect's defaults): matched, unmatched (either side), borderline, class_mismatch and
    min_iou over matched pairs (1.0 when there are none). `score_margin`: the target's score gate (module doc);
    below SCORE_MARGIN it is SCORE_MARGIN."""
    margin = max(SCORE_MARGIN, float(score_margin))
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
         "borderline": 0, "swapped": 0, "class_mismatch": 0, "min_iou": 1.0, "nan_inf": 0 if finite else 1,
         "nms": {"conf": conf, "iou": iou, "max_det": max_det}, "score_margin": margin}
    for n in range(rb.shape[0]):
        ref_side = _Side(rb[n], rs[n], conf, iou, max_det, margin)
        out_side = _Side(np.nan_to_num(ob[n]), np.nan_to_num(os_[n]), conf, iou, max_det, margin)
        rd, od = ref_side.dets, out_side.dets
        pairs = _pair(rd, od)
        swapped = [(i, j) for i, j, _ in pairs if ref_side.keep[i] != out_side.keep[j]
                   and (ref_side.tied(ref_side.keep[i], out_side.keep[j])
                        or out_side.tied(ref_side.keep[i], out_side.keep[j]))]
        traded = {a for i, j in swapped for a in (ref_side.keep[i], out_side.keep[j])}
        m["detections_ref"] += len(rd)
        m["detections_out"] += len(od)
        m["matched"] += len(pairs)
        m["swapped"] += len(swapped)
        m["class_mismatch"] += int(sum(rd[i, 5] != od[j, 5] for i, j, _ in pairs))
        ious = [v for i, j, v in pairs if (i, j) not in swapped]
        if ious:
            m["min_iou"] = min(m["min_iou"], min(ious))
        lone_ref = set(range(len(rd))) - {i for i, _, _ in pairs}
        lone_out = set(range(len(od))) - {j for _, j, _ in pairs}
        for side, other, lone in ((ref_side, out_side, lone_ref), (out_side, ref_side, lone_out)):
            for k in lone:
                if _borderline(side.dets[k], other.dets, conf, iou, margin) or \
                        other.suppressed_by_tie(side.keep[k], iou, traded):
                    m["borderline"] += 1
                else:
                    m["unmatched"] += 1
    return m


def check_detection_gates(metrics: dict, gates: dict, label: str) -> list[str]:
    """Breach lines ("mnn_fp32: box_px 0.31 > 0.05") for every gated metric that fails; NaN/Inf always breaches
    (models.metrics.check_gates: one gate checker for every output kind)."""
    return check_gates(metrics, gates, label)
