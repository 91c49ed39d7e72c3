"""Runs INSIDE the aarch64 guest (qemu-aarch64 + Debian's python3.11): MNN Module API or onnxruntime inference
on a .npy.

Only the standard library, numpy, MNN and onnxruntime exist here; this file must not import the project.

    guest_infer.py MODEL.mnn INPUTS.npy OUT_DIR [--precision normal|low] [--counted-runs K]
    guest_infer.py MODEL.onnx INPUTS.npy OUT_DIR --engine onnxruntime [--counted-runs K]
    guest_infer.py --versions

Writes OUT_DIR/out<k>.npy for the k-th output (one row per input sample, each run alone at batch 1) and
OUT_DIR/info.json (output names, bizCode, versions).
With --counted-runs K, after the parity pass, runs sample 0 K more times, each between the two markers the
insncount TCG plugin watches (close() on two impossible fds), so the plugin counts one inference per region.
"""
import argparse
import json
import os
import platform
import sys
from importlib import metadata

import numpy as np

MARK_BEGIN, MARK_END = 0x7E570001, 0x7E570002


def mark(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def versions():
    # Read from the installed metadata, not by importing: onnxruntime's import crashes under qemu-user 7.2.
    return {"python": platform.python_version(), "glibc": "-".join(platform.libc_ver()),
            "machine": platform.machine(), "numpy": np.__version__, "MNN": metadata.version("MNN"),
            "onnxruntime": metadata.version("onnxruntime")}


class OrtModule:
    """onnxruntime with the MNN module's interface: one intra-op thread (runtime.load's threads=1)."""

    def __init__(self, model_path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def get_info(self):
        meta = self.session.get_modelmeta().custom_metadata_map
        return {"outputNames": [o.name for o in self.session.get_outputs()], "bizCode": meta.get("edgeport")}


def load(model_path, precision, engine="mnn"):
    if engine == "onnxruntime":
        module = OrtModule(model_path)
        return module, module.get_info()
    import MNN

    config = {"backend": "CPU", "numThread": 1, "precision": precision}
    rt = MNN.nn.create_runtime_manager((config,))
    rt.set_hint(3, 1)  # WINOGRAD_MEMORY_LEVEL 1 = F(2,3) only, runtime.load's default (runtime/engines.py)
    module = MNN.nn.load_module_from_file(model_path, [], [], runtime_manager=rt)
    return module, module.get_info()


def infer(module, x):
    """One full inference: numpy in, numpy out (the region the plugin counts)."""
    if isinstance(module, OrtModule):
        return module.session.run(None, {module.input_name: x})
    import MNN

    F = MNN.expr
    var = F.const(x, list(x.shape), F.NCHW, F.float)
    outs = module.forward([var])
    return [np.array(F.convert(o, F.NCHW).read(), dtype=np.float32, copy=True) for o in outs]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("inputs", nargs="?")
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--precision", default="normal", choices=["normal", "low", "high"])
    p.add_argument("--counted-runs", type=int, default=0)
    p.add_argument("--engine", default="mnn", choices=["mnn", "onnxruntime"])
    p.add_argument("--versions", action="store_true")
    a = p.parse_args()
    if a.versions:
        print(json.dumps(versions()))
        return 0

    module, info = load(a.model, a.precision, a.engine)
    x = np.ascontiguousarray(np.load(a.inputs), dtype=np.float32)
    rows = [infer(module, x[i:i + 1]) for i in range(len(x))]
    names = list(info["outputNames"])
    os.makedirs(a.out_dir, exist_ok=True)
    for k in range(len(names)):
        np.save(os.path.join(a.out_dir, f"out{k}.npy"), np.concatenate([r[k] for r in rows]))
    for _ in range(a.counted_runs):
        mark(MARK_BEGIN)
        infer(module, x[:1])
        mark(MARK_END)
    with open(os.path.join(a.out_dir, "info.json"), "w") as f:
        json.dump({"output_names": names, "bizCode": info.get("bizCode"), "versions": versions()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
