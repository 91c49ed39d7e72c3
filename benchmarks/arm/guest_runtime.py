"""Runs INSIDE the aarch64 guest (qemu-aarch64 + Debian's python3.11): a model through the installed torch-free
runtime (edgeport_runtime.load, as a board runs it), every input sample alone at batch 1.

Only the standard library, numpy and the guest's edgeport_runtime (with its engines) exist here; this file must
not import the project.

    guest_runtime.py MODEL INPUTS.npy OUT_DIR --engine openvino [--precision fp32|low] [--counted-runs K]

Writes OUT_DIR/out<k>.npy (the k-th output, one row per sample) and OUT_DIR/info.json (output names, versions).
With --counted-runs K, then runs sample 0 K more times, each between the two markers benchmarks/arm's insncount
TCG plugin watches (close() on two impossible fds, as guest_infer.py marks them): one counted region each.
"""
import argparse
import json
import os
import platform

import numpy as np
from edgeport_runtime import load
from edgeport_runtime.device import engine_versions

MARK_BEGIN, MARK_END = 0x7E570001, 0x7E570002  # benchmarks/arm/insncount.c


def mark(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("out_dir")
    p.add_argument("--engine", required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--counted-runs", type=int, default=0)
    a = p.parse_args()
    predictor = load(a.model, engine=a.engine, threads=1, precision=a.precision)
    x = np.load(a.inputs)
    rows = [predictor.run(x[i:i + 1]) for i in range(len(x))]
    names = list(rows[0])
    os.makedirs(a.out_dir, exist_ok=True)
    for k, name in enumerate(names):
        np.save(os.path.join(a.out_dir, f"out{k}.npy"), np.concatenate([r[name] for r in rows]))
    for _ in range(a.counted_runs):
        mark(MARK_BEGIN)
        predictor.run(x[:1])
        mark(MARK_END)
    info = {"output_names": names, "versions": {"python": platform.python_version(),
                                                "machine": platform.machine(), **engine_versions()}}
    with open(os.path.join(a.out_dir, "info.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
