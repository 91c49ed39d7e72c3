"""Numerical agreement between a reference output and a candidate output, and the gates that judge it.

Every metric is computed against the reference tensor. `max_rel` = max|out - ref| / max|ref|: one number per
tensor, insensitive to where in the tensor the error sits, and comparable across models and layers."""
from __future__ import annotations

import numpy as np

# Gate direction: metrics where a larger value is worse, and metrics where a smaller value is worse.
UPPER_BOUNDED = ("max_abs", "max_rel", "mean_abs", "nan_inf",
                 # detectors (export.detection_parity): pixels, score units, detection counts
                 "box_px", "box_px_all", "score", "unmatched", "class_mismatch", "borderline")
LOWER_BOUNDED = ("cosine", "top1", "top5", "min_iou")


def max_rel(ref: np.ndarray, out: np.ndarray) -> float:
    """max|out - ref| / max|ref| in float64; inf when the candidate has NaN/Inf or the reference is all zero
    while the candidate is not."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    err = float(np.abs(out - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def _cosine_per_sample(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    r = ref.reshape(ref.shape[0], -1)
    o = out.reshape(out.shape[0], -1)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    den = nr * no
    both_zero = (nr == 0) & (no == 0)
    return np.where(den > 0, (r * o).sum(1) / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))


def compare(ref: np.ndarray, out: np.ndarray, classifier: bool = False) -> dict:
    """Metrics of `out` against `ref` (same shape, batch first).

    cosine is the worst per-sample cosine similarity. For classifier logits (N, C): top1 is the fraction of
    samples with the same arg-max, top5 the mean overlap of the two top-5 sets (1.0 = identical sets)."""
    ref = np.asarray(ref)
    out = np.asarray(out)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {out.shape}")
    nan_inf = int((~np.isfinite(out)).sum())
    r = ref.astype(np.float64)
    o = np.nan_to_num(out.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    diff = np.abs(o - r)
    m = {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": max_rel(ref, out),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "cosine": float(_cosine_per_sample(r, o).min()) if r.size else 1.0,
        "nan_inf": nan_inf,
    }
    if classifier and ref.ndim == 2:
        m["top1"] = float((r.argmax(1) == o.argmax(1)).mean())
        k = min(5, ref.shape[1])
        top_r = np.argsort(-r, 1)[:, :k]
        top_o = np.argsort(-o, 1)[:, :k]
        m["top5"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_r, top_o)]))
    return m


def check_gates(metrics: dict, gates: dict, label: str) -> list[str]:
    """Breach lines ("mnn_fp32: max_rel 0.0031 > 0.0001") for every gated metric that fails; NaN/Inf in the
    candidate is always a breach. A gate on a metric the output lacks (top1 on features) is skipped."""
    breaches = []
    if metrics.get("nan_inf", 0) and "nan_inf" not in gates:
        breaches.append(f"{label}: nan_inf {metrics['nan_inf']} > 0")
    for name, limit in gates.items():
        if name not in metrics:
            continue
        value = metrics[name]
        if name in UPPER_BOUNDED and not value <= limit:
            breaches.append(f"{label}: {name} {value:.3g} > {limit:.3g}")
        elif name in LOWER_BOUNDED and not value >= limit:
            breaches.append(f"{label}: {name} {value:.3g} < {limit:.3g}")
    return breaches


def validate_gates(gates: dict) -> None:
    known = UPPER_BOUNDED + LOWER_BOUNDED
    for backend, limits in gates.items():
        if not isinstance(limits, dict):
            raise ValueError(f"gates for '{backend}' must be a mapping of metric to threshold")
        for name, limit in limits.items():
            if name not in known:
                raise ValueError(f"unknown gate metric '{name}' for '{backend}'; known: {', '.join(known)}")
            if not isinstance(limit, (int, float)) or isinstance(limit, bool):
                raise ValueError(f"gate {backend}.{name} must be a number, got {limit!r}")
            if not 0 <= limit < float("inf"):
                raise ValueError(f"gate {backend}.{name} must be finite and non-negative, got {limit!r}")
