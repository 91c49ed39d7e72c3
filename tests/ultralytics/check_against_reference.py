"""Runs in edgeport's own .venv (no Ultralytics): load the checkpoints make_reference.py wrote with
models.ultralytics_ckpt and compare our forward with Ultralytics' on the same inputs.

Gate: max |Δ| / max |reference| ≤ 1e-4, separately for box coordinates and for scores.
usage: python tests/ultralytics/check_against_reference.py DIR     (exit 0 pass, 1 fail)
"""
import os
import sys

import numpy as np
import torch

from models.yolo11 import load_ultralytics

RTOL = 1e-4


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    xy, wh = b[..., :2], b[..., 2:]
    return np.concatenate((xy - wh / 2, xy + wh / 2), -1)


def main(d: str) -> int:
    ref = np.load(os.path.join(d, "reference.npz"))
    worst = 0.0
    for ckpt in ("trainer_last.pt", "yolo_save.pt"):
        model, info = load_ultralytics(os.path.join(d, ckpt))
        for name in ("square", "wide"):
            y = ref[f"{name}_output"].transpose(0, 2, 1)  # (B, A, 4 + nc)
            with torch.no_grad():
                boxes, scores = (t.numpy() for t in model(torch.from_numpy(ref[f"{name}_input"])))
            box_err = np.abs(boxes - xywh_to_xyxy(y[..., :4])).max() / np.abs(y[..., :4]).max()
            score_err = np.abs(scores - y[..., 4:]).max() / np.abs(y[..., 4:]).max()
            worst = max(worst, box_err, score_err)
            print(f"{ckpt} ({info['weights']}, {info['dtype']}, ultralytics {info['ultralytics_version']}) {name} "
                  f"{tuple(ref[f'{name}_input'].shape[2:])}: anchors {boxes.shape[1]}, box rel err {box_err:.2e}, "
                  f"score rel err {score_err:.2e}")
    ok = worst <= RTOL
    print(f"{'PASS' if ok else 'FAIL'}: worst relative error {worst:.2e} (gate {RTOL:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
