"""Torch-free checks of the runtime, run INSIDE a Debian 13 userland (tests/ need torch, so they cannot run there).

  python guest_check.py MODEL_DIR IMAGE [--onnx]     prints one JSON document; exit 1 if a check fails

MODEL_DIR holds model.mnn, model.fp16.mnn (and model.onnx). Checks: MNN loads (through the patched copy where
glibc refuses the wheel's executable stack), fp32 and fp16 files classify, low precision runs, bad inputs give
EdgeRuntimeError, the ONNX file agrees with the MNN one, and neither torch nor onnx was imported.
"""
from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np


def main(argv: list[str]) -> int:
    model_dir, image = argv[0], argv[1]
    with_onnx = "--onnx" in argv
    import runtime
    from runtime.engines import import_mnn

    checks, failures = {}, []

    def check(name, ok, detail=None):
        checks[name] = {"ok": bool(ok), **({"detail": detail} if detail is not None else {})}
        if not ok:
            failures.append(name)

    MNN = import_mnn()
    engine_file = sys.modules["_mnncengine"].__file__
    site = os.path.dirname(os.path.dirname(MNN.__file__))
    check("mnn_imports", True, {"version": MNN.version(), "_mnncengine": engine_file,
                                "patched_copy": not engine_file.startswith(site)})
    logits = {}
    for name in ("model.mnn", "model.fp16.mnn"):
        for precision in ("fp32", "low"):
            p = runtime.load(os.path.join(model_dir, name), precision=precision)
            x = p.preprocess(image)
            out = p.run(x)[p.output_names[0]].reshape(-1)
            logits[name, precision] = out
            check(f"{name}:{precision}", np.isfinite(out).all() and out.shape == (1000,), {"top1": int(out.argmax())})
            if (name, precision) == ("model.mnn", "fp32"):
                top = p.classify(image, topk=1)[0][0]
                check("classify_api", top[0] == out.argmax(), {"top1": int(top[0]), "p1": round(float(top[1]), 5)})
    ref = logits["model.mnn", "fp32"]
    for key, out in logits.items():
        check(f"close_to_fp32:{key[0]}:{key[1]}", np.abs(out - ref).max() <= 5e-2 * np.abs(ref).max(),
              {"max_abs_diff": float(np.abs(out - ref).max()), "max_abs": float(np.abs(ref).max())})
    if with_onnx:
        p = runtime.load(os.path.join(model_dir, "model.onnx"))
        out = p.run(p.preprocess(image))[p.output_names[0]].reshape(-1)
        check("onnx_matches_mnn", np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max(),
              {"max_abs_diff": float(np.abs(out - ref).max())})
    for bad, what in ((os.path.join(model_dir, "missing.mnn"), "model"), (__file__, "image")):
        try:
            if what == "model":
                runtime.load(bad)
            else:
                runtime.load(os.path.join(model_dir, "model.mnn")).classify(bad)
            check(f"bad_{what}_rejected", False, "no error")
        except runtime.EdgeRuntimeError as e:
            check(f"bad_{what}_rejected", "\n" not in str(e), str(e))
    check("no_torch_no_onnx", not {"torch", "onnx"} & set(sys.modules))
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if ".so" in path:
                libs.add(path)
    userland = (os.path.dirname(sys.prefix), site, os.path.dirname(os.path.dirname(engine_file)))
    check("libraries_from_userland", all(lib.startswith(userland) for lib in libs),
          sorted(lib for lib in libs if not lib.startswith(userland)))
    print(json.dumps({"python": sys.version.split()[0], "glibc": os.confstr("CS_GNU_LIBC_VERSION"),
                      "machine": platform.machine(), "checks": checks, "failures": failures,
                      "shared_libraries": sorted(libs)}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
