"""`python -m export MODEL ...`: export a model to ONNX and MNN with a manifest and a parity report."""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _interrupted_while_importing(signum, frame):
    print("export: interrupted; previous artifacts untouched", file=sys.stderr, flush=True)
    os._exit(130)  # an exception raised inside a half-imported C extension can recurse; nothing to clean up yet


# Ctrl-C during the seconds torch takes to import: one line, not a traceback (main() restores the default).
signal.signal(signal.SIGINT, _interrupted_while_importing)

from models.errors import EdgeportError  # noqa: E402
from runtime.cli import OneLineParser  # noqa: E402

from . import quantize, targets  # noqa: E402

EPILOG = """\
defaults: fasternet_t0 at its configured size (224), batch 1, --pconv auto --mlp auto, every default target,
opset 17 with the legacy (TorchScript) exporter, onnxsim, artifacts under ./artifacts.

forms: "auto" takes, per model, the form `make bench` measured fastest on this machine (benchmarks/results/
recommendation.json; forms within a few % of each other may change between runs); without that file, --pconv
split_cat (slicing exports as Slice+ScatterND and ran 14-19 % slower in ORT and MNN) and --mlp fc. The choice
is recorded in the manifest.

targets (--targets, registry in export/targets.py; each is judged against PyTorch by its own gate):
{targets}
mnn_fp16w: conv/matmul weights stored as half floats, rounded to nearest by us first (MNN's own cast
truncates, a bias that compounds with depth). mnn_int8w: per-output-channel int8 weights with a scale and
offset each (MNN expands them to float at load: a smaller file, not faster arithmetic). ort_int8, mnn_int8:
integer arithmetic with activation scales calibrated on --calib DIR; judged on held-out photos (cosine, top-1
against the float model); layers that break the gate are kept in float (listed in the manifest and report).

output: OUT/MODEL/FORM-TAG/{{the targets' files, parity.json, manifest.json, report.md, export.log}};
FORM-TAG is e.g. split_cat-fc, fc (no PConv), ...-features.
Random-init models (no --weights) are first calibrated to realistic activations (seeded).

exit status: 0 exported (parity passed or not run), 1 exported but the parity gate failed (artifacts kept,
manifest status "failed"), 2 bad input or a failed step (previous artifacts untouched).
"""


def _target_lines() -> str:
    width = max(len(t.name) for t in targets.ARTIFACTS)
    return "\n".join(f"  {t.name:<{width}}  {t.file:<16} {t.description}"
                     + ("" if t.default else " (not by default)") for t in targets.ARTIFACTS)


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose from {','.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    from . import onnx_export
    from .pipeline import MLP_FORMS, PCONV_FORMS

    p = OneLineParser(prog="python -m export", description=__doc__,
                                epilog=EPILOG.format(targets=_target_lines()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="fasternet_t0",
                   help="registered model (default fasternet_t0), or an Ultralytics checkpoint (best.pt): the "
                        "detector its own YAML describes, exported as model 'ultralytics'")
    p.add_argument("--weights", help="checkpoint (.pth/.pt/.safetensors; official, timm or our layout); "
                   "default: seeded random init calibrated to realistic activations")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's, e.g. 224)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="batch axis left dynamic (-1)")
    p.add_argument("--pconv", default="auto", choices=("auto", *PCONV_FORMS),
                   help="FasterNet PConv form (default auto: see forms below)")
    p.add_argument("--mlp", default="auto", choices=("auto", *MLP_FORMS),
                   help="pointwise MLP / SE form (default auto: see forms below)")
    p.add_argument("--targets", type=_csv(tuple(t.name for t in targets.ARTIFACTS)),
                   help="comma-separated artifact targets (default: " + ",".join(targets.DEFAULT_TARGETS)
                        + "; a detector leaves out " + ",".join(sorted(set(targets.DEFAULT_TARGETS)
                                                                      - set(targets.default_targets("detection"))))
                        + "; with --weights, except for a detector, also " + ",".join(sorted(targets.optional_targets(
                            trained=True))) + ", each shipped only if the final parity verdict passes it)")
    p.add_argument("--calib", metavar="DIR",
                   help="int8 targets: calibrate on these images (recursively; 300+ like the deployment's "
                        "recommended; default: the bundled sample photos, augmented, which is weaker)")
    p.add_argument("--val", metavar="DIR",
                   help="labelled images (ImageFolder: one sub-folder per class, named by class index or sorted): "
                        "every file's top-1 is measured on them, the int8 targets' parity gates are judged on them "
                        "(not on the bundled photos), and an int8 target ships only if it loses at most 1.0 point "
                        "against model.onnx (without it, accuracy is not measured)")
    p.add_argument("--int8-mnn", default="auto", choices=quantize.MNN_METHODS,
                   help="mnn_int8: MNN's activation-scale method (default auto: " + ", then ".join(
                       quantize.MNN_AUTO_ORDER) + " when the first crashes or misses the gates; the better is kept)")
    p.add_argument("--opset", type=int, default=onnx_export.DEFAULT_OPSET,
                   help=f"ONNX opset (default {onnx_export.DEFAULT_OPSET})")
    p.add_argument("--exporter", default="legacy", choices=onnx_export.EXPORTERS,
                   help="legacy = TorchScript exporter (default); dynamo needs onnxscript")
    p.add_argument("--simplifier", default="onnxsim", choices=onnx_export.SIMPLIFIERS, help="default onnxsim")
    p.add_argument("--features-only", action="store_true", help="export the stage outputs feat_s4..feat_s32")
    p.add_argument("--out", default="artifacts", help="output root (default artifacts/)")
    board = p.add_argument_group("boards (docs/guides/board.md)")
    board.add_argument("--bundle", action="store_true",
                       help="export every inference form (fc baseline first), each gated, and write OUT/MODEL/"
                            "bundle.json + OUT/MODEL.bundle.tar.gz for edgeport-bench on the board")
    board.add_argument("--device", metavar="RESULTS.json",
                       help="choose the form (and the file per engine) the board measured fastest among files "
                            "whose targets passed their gates (edgeport-bench --json); default: the build host's "
                            "recommendation")
    board.add_argument("--allow-emulated", action="store_true",
                       help="let --device choose from results measured under emulation (qemu): not latency")
    p.add_argument("--no-parity", dest="parity", action="store_false", help="skip the parity gate")
    p.add_argument("--seed", type=int, default=0, help="seed of random init and calibration (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="show converter and library output")
    return p


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's way out: build dir removed, previous artifacts kept


def main(argv=None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("export: interrupted; previous artifacts untouched", file=sys.stderr)
        return 130


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import ExportOptions, run_export

    if _is_checkpoint_path(args.model):
        if args.weights:
            print(f"export: error: {args.model} is a checkpoint and --weights {args.weights} another; give one "
                  "(python -m export best.pt, or python -m export MODEL --weights FILE)", file=sys.stderr)
            return 2
        from .source import ULTRALYTICS

        args.model, args.weights = ULTRALYTICS, args.model

    opts = ExportOptions(model=args.model, weights=args.weights, img_size=args.img_size,
                         batch=args.batch, dynamic_batch=args.dynamic_batch, pconv=args.pconv, mlp=args.mlp,
                         targets=args.targets, calib=args.calib, val=args.val, int8_mnn=args.int8_mnn, opset=args.opset,
                         exporter=args.exporter, simplifier=args.simplifier,
                         features_only=args.features_only, out=args.out, parity=args.parity, seed=args.seed,
                         verbose=args.verbose, device=args.device, allow_emulated=args.allow_emulated)
    try:
        if args.bundle:
            if args.device:
                raise EdgeportError("--bundle builds every form for the board; --device chooses one from its "
                                    "results: use them in two runs")
            from .bundle import build_bundle

            _, bundle = build_bundle(opts)
            return 1 if any(f.status == "failed" for f in bundle.forms) else 0
        manifest = run_export(opts)
    except EdgeportError as e:
        print(f"export: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # the environment failed (disk full, quota, read-only, fds, memory)
        from .install import environment_failure

        line = environment_failure(e, "exporting")
        if line is None:
            raise
        print(f"export: error: {_one_line(line)} (previous artifacts untouched)", file=sys.stderr)
        return 2
    return 1 if manifest["status"] == "failed" else 0


def _is_checkpoint_path(model: str) -> bool:
    """A file path rather than a registered name. A registered name is always the model, even when a file of
    that name is in the working directory (write ./NAME for the file)."""
    from models import list_models

    if model in list_models():
        return False
    return os.sep in model or (os.altsep or os.sep) in model or model.endswith((".pt", ".pth")) \
        or os.path.isfile(model)


if __name__ == "__main__":
    from runtime.cli import cli_main

    sys.exit(cli_main(main))
