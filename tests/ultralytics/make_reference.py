"""Runs in .venv-ultralytics only (Ultralytics installed): build YOLO("yolo11n.yaml"), give it trained-looking
BatchNorm statistics, save it the way Ultralytics' trainer saves (BaseTrainer.save_model: a dict whose 'ema' is
a deepcopy(model).half(), 'model' None, train_args, metrics, version ...) and also with YOLO.save(), then write
Ultralytics' own forward on seeded inputs (480x640 and 640x640) for check_against_reference.py.

usage: python tests/ultralytics/make_reference.py OUT_DIR
"""
import os
import sys
from copy import deepcopy
from datetime import datetime

import numpy as np
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

from ultralytics import YOLO, __version__  # noqa: E402


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    yolo = YOLO("yolo11n.yaml")
    model = yolo.model
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():  # random-init BNs are identities: random affines, statistics measured on inputs
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        for _ in range(2):
            model(torch.rand(4, 3, 320, 320, generator=g))
        head = model.model[-1]  # bias_init leaves every score ~1e-4: spread them so the score check means something
        for seq in head.cv3:
            seq[-1].bias.copy_(torch.randn(seq[-1].bias.shape, generator=g) - 4)
            seq[-1].weight.mul_(8)
        for seq in head.cv2:
            seq[-1].weight.mul_(4)
    model.eval()
    # What the trainer writes (fp16 EMA); compare against the fp16-rounded weights, as they are what is saved.
    ema = deepcopy(model).half()
    ckpt = {"epoch": -1, "best_fitness": None, "model": None, "ema": ema, "updates": 0, "optimizer": None,
            "train_args": {"task": "detect", "model": "yolo11n.yaml", "imgsz": 640},
            "train_metrics": {"fitness": 0.0}, "train_results": {}, "date": datetime.now().isoformat(),
            "version": __version__, "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com"}
    torch.save(ckpt, os.path.join(out, "trainer_last.pt"))
    yolo.model = deepcopy(ema).float()
    yolo.save(os.path.join(out, "yolo_save.pt"))
    ref = deepcopy(ema).float().eval()
    arrays = {}
    for name, (h, w) in {"square": (640, 640), "wide": (480, 640)}.items():
        x = torch.rand(1, 3, h, w, generator=g)
        with torch.no_grad():
            y = ref(x)
        y = y[0] if isinstance(y, (tuple, list)) else y  # (B, 4 + nc, A): cx, cy, w, h in pixels, then scores
        arrays[f"{name}_input"] = x.numpy()
        arrays[f"{name}_output"] = y.numpy()
    np.savez(os.path.join(out, "reference.npz"), **arrays, version=np.array(__version__))
    print(f"ultralytics {__version__}, torch {torch.__version__}: wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
