"""Parity for detectors: the raw head outputs per anchor before NMS (the primary gate), then the detections after
NMS (runtime/detect.py's NMS, the one the board runs) for what NMS can decide.

    raw_errors(ref, out) -> {"box_px", "score"}                 ref/out: {"boxes": [N, A, 4], "scores": [N, A, nc]}
    with_noise_floor(gates, noise) -> gates
    compare_detections(ref, out, meta, score_margin) -> metrics
    check_detection_gates(metrics, gates, label) -> breach lines

Before NMS every anchor is compared: box error in input pixels (over anchors some class scores at least
BOX_SCORE_FLOOR) and score error. Those are the target's tolerances, except where the network itself cannot be
computed that closely in float32: `with_noise_floor` raises each to NOISE_FACTOR x the error of the fp32
reference against the same network in float64 on the same inputs (measured by export.parity.run_parity). An
untrained or early checkpoint can amplify rounding a million-fold (yolo11n with BatchNorm statistics from photos:
the fp32 reference is 0.059 px and 5.3e-4 in score from float64 on the parity set, its C2PSA attention
multiplying the relative error 7x); the head's pre-decode tensors are no better conditioned there (max_rel
5e-5 box logits, 1e-4 class logits against float64), so the raw decoded outputs are what is gated.

After NMS a detection is judged only when a clear score margin decides it (`_Side.clear`): its score above the
confidence threshold by more than the margin, its class ahead of the runner-up class, and every same-class rival
that overlaps it near the NMS threshold, and the max_det / MAX_NMS cut, behind it, by more than twice the margin
(both sides may move by the margin). A correct candidate keeps every such detection of the reference, with the
same class, and vice versa: one missing is `unmatched`, another class `class_mismatch`, and `min_iou` is over
those. The others are reported, not gated: `borderline` (on one side only without a clear margin: near-tied
scores pick different winners, a gate on them measures ties) and `swapped` (two overlapping tied anchors kept the
other way round). The margin is the target's own score gate (at least SCORE_MARGIN).
"""
from __future__ import annotations

import numpy as np

from models.metrics import check_gates
from runtime.detect import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, MAX_NMS, box_iou, nms_anchors

SCORE_MARGIN = 0.01  # the least score margin, for targets whose score gate is tighter (fp32)
IOU_MARGIN = 0.02
PAIR_IOU = 0.5  # below this two boxes are different objects, not one detection moved
BOX_SCORE_FLOOR = 0.01  # box errors are judged on anchors some class scores at least this high
# Two fp32 implementations each within e of the exact result are within 2e of each other; 2x more for
# different summation orders (MNN's Winograd tiles, ORT's fused kernels). Set from that argument; measured
# after: ORT and MNN sit at 1.9-2.2x the reference's own error on the yolo11n checkpoint above.
NOISE_FACTOR = 4.0
RAW_GATES = ("box_px", "score")  # the gates the noise floor may raise

METRICS = ("box_px", "box_px_all", "score", "unmatched", "class_mismatch", "min_iou", "borderline", "swapped")


def detection_gates(target: str, gates: dict | None = None) -> dict:
    """The detection gates of `target` (its registry record's `detection_gates`), with any detection metric in
    `gates` laid over (the classification metrics, max_rel/top1/cosine, do not apply to a detector)."""
    from . import targets

    return {**targets.get(target).detection_gates, **{k: v for k, v in (gates or {}).items() if k in METRICS}}


def with_noise_floor(gates: dict, noise: dict | None) -> dict:
    """`gates` with box_px and score raised to NOISE_FACTOR x `noise` (raw_errors of the fp32 reference against
    float64) where that is larger: no float32 implementation, the reference included, can do better."""
    if not noise:
        return dict(gates)
    return {k: max(v, NOISE_FACTOR * float(noise[k])) if k in RAW_GATES and k in noise else v
            for k, v in gates.items()}


def _raw(ref: dict, out: dict):
    rb, rs = np.asarray(ref["boxes"], np.float64), np.asarray(ref["scores"], np.float64)
    ob, os_ = np.asarray(out["boxes"], np.float64), np.asarray(out["scores"], np.float64)
    if rb.shape != ob.shape or rs.shape != os_.shape:
        raise ValueError(f"shape mismatch: boxes {rb.shape} vs {ob.shape}, scores {rs.shape} vs {os_.shape}")
    return rb, rs, ob, os_


def raw_errors(ref: dict, out: dict) -> dict:
    """Per-anchor errors before NMS: box_px (max |Δ| of box coordinates over anchors whose reference scores reach
    BOX_SCORE_FLOOR), box_px_all (every anchor), score (max |Δ| of scores); NaN counts as infinitely wrong."""
    return _raw_errors(*_raw(ref, out))


def _raw_errors(rb, rs, ob, os_) -> dict:
    box_err = np.abs(np.nan_to_num(ob, nan=np.inf) - rb).max(-1)  # [N, A]
    scored = rs.max(-1) >= BOX_SCORE_FLOOR
    return {"box_px": float(box_err[scored].max()) if scored.any() else 0.0,
            "box_px_all": float(box_err.max()) if box_err.size else 0.0,
            "score": float(np.abs(np.nan_to_num(os_, nan=np.inf) - rs).max()) if rs.size else 0.0}


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


class _Side:
    """One image's outputs on one side: its NMS result as anchors (`keep`) and rows (`dets`)."""

    def __init__(self, boxes, scores, conf, iou, max_det, margin):
        self.conf, self.iou, self.margin = conf, iou, margin
        self.boxes = np.asarray(boxes, np.float64)
        self.scores = np.asarray(scores, np.float64)
        keep, self.best, self.cls = nms_anchors(boxes, scores, conf, iou, max_det)
        self.keep = keep.tolist()
        self.dets = np.concatenate([self.boxes[keep], self.best[keep, None].astype(np.float64),
                                    self.cls[keep, None].astype(np.float64)], 1)
        cut = [float(self.best[keep[-1]])] if len(keep) == max_det else []
        candidates = np.sort(self.best[self.best > conf])[::-1]
        if len(candidates) > MAX_NMS:
            cut.append(float(candidates[MAX_NMS - 1]))
        self.cut = max(cut) if cut else None  # the score a kept detection must beat to survive a count limit

    def tied(self, a: int, b: int) -> bool:
        return abs(float(self.best[a]) - float(self.best[b])) <= self.margin

    def clear(self, anchor: int) -> bool:
        """Whether any candidate whose scores are within the margin of these and whose boxes moved less than
        IOU_MARGIN in IoU keeps `anchor` with the same class (module doc)."""
        s, c, both = float(self.best[anchor]), int(self.cls[anchor]), 2 * self.margin
        if s - self.conf <= self.margin or (self.cut is not None and s - self.cut <= both):
            return False
        others = np.delete(self.scores[anchor], c)
        if others.size and s - others.max() <= both:
            return False
        rivals = np.flatnonzero(self.scores[:, c] >= s - both)
        rivals = rivals[rivals != anchor]
        if not rivals.size:
            return True
        return not (box_iou(self.boxes[anchor][None], self.boxes[rivals])[0] > self.iou - IOU_MARGIN).any()


def compare_detections(ref: dict, out: dict, meta: dict | None = None, score_margin: float = SCORE_MARGIN
                       ) -> dict:
    """Metrics of a candidate's detector outputs against the reference's, over the batch: `raw_errors`, then
    after NMS (conf, iou, max_det from meta's "nms" entry or runtime.detect's defaults) over the detections a
    clear margin decides ("judged", either side): unmatched, class_mismatch, min_iou (1.0 when none); reported
    beside: matched (greedy IoU pairs of all detections), borderline, swapped. `score_margin`: the target's
    score gate; below SCORE_MARGIN it is SCORE_MARGIN."""
    margin = max(SCORE_MARGIN, float(score_margin))
    settings = (meta or {}).get("nms") or {}
    conf = float(settings.get("conf", DEFAULT_CONF))
    iou = float(settings.get("iou", DEFAULT_IOU))
    max_det = int(settings.get("max_det", DEFAULT_MAX_DET))
    rb, rs, ob, os_ = _raw(ref, out)
    finite = bool(np.isfinite(ob).all() and np.isfinite(os_).all())
    m = {**_raw_errors(rb, rs, ob, os_), "detections_ref": 0, "detections_out": 0, "matched": 0, "judged": 0,
         "unmatched": 0, "borderline": 0, "swapped": 0, "class_mismatch": 0, "min_iou": 1.0,
         "nan_inf": 0 if finite else 1, "nms": {"conf": conf, "iou": iou, "max_det": max_det},
         "score_margin": margin}
    for n in range(rb.shape[0]):
        ref_side = _Side(rb[n], rs[n], conf, iou, max_det, margin)
        out_side = _Side(np.nan_to_num(ob[n]), np.nan_to_num(os_[n]), conf, iou, max_det, margin)
        pairs = _pair(ref_side.dets, out_side.dets)
        m["detections_ref"] += len(ref_side.keep)
        m["detections_out"] += len(out_side.keep)
        m["matched"] += len(pairs)
        m["swapped"] += sum(a != b and (ref_side.tied(a, b) or out_side.tied(a, b))
                            for a, b in ((ref_side.keep[i], out_side.keep[j]) for i, j, _ in pairs))
        partner = [{i: (j, v) for i, j, v in pairs}, {j: (i, v) for i, j, v in pairs}]
        for k, (side, other) in enumerate(((ref_side, out_side), (out_side, ref_side))):
            for row, anchor in enumerate(side.keep):
                there = anchor in other.keep
                if not side.clear(anchor):
                    m["borderline"] += not there
                    continue
                m["judged"] += 1
                if there:  # the same anchor kept on both sides: how far its box moved, and its class
                    iou_here = float(box_iou(side.boxes[anchor][None], other.boxes[anchor][None])[0, 0])
                    cls_there = int(other.cls[anchor])
                elif row in partner[k]:  # another anchor won there: the two boxes' overlap
                    j, iou_here = partner[k][row]
                    cls_there = int(other.dets[j, 5])
                else:
                    m["unmatched"] += 1
                    continue
                m["class_mismatch"] += cls_there != int(side.cls[anchor])
                m["min_iou"] = min(m["min_iou"], iou_here)
    return m


def check_detection_gates(metrics: dict, gates: dict, label: str) -> list[str]:
    """Breach lines ("mnn_fp32: box_px 0.31 > 0.05") for every gated metric that fails; NaN/Inf always breaches
    (models.metrics.check_gates: one gate checker for every output kind)."""
    return check_gates(metrics, gates, label)
