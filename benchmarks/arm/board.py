"""The board bench and the runtime's engines on an emulated ARM board: edgeport-runtime (installed from ./runtime as
a wheel, torch-free, with MNN, onnxruntime and OpenVINO's aarch64 wheels) run under qemu-user 10 for a named CPU.

    python -m benchmarks.arm.board bench BUNDLE --json OUT.json [--cpu cortex-a76] [--rounds 3] [-- BENCH ARGS]
    python -m benchmarks.arm.board parity ARTIFACT_DIR... [--cpu cortex-a76] [--targets openvino]
    python -m benchmarks.arm.board count ARTIFACT_DIR... [--cpu cortex-a76]

`bench` runs `edgeport-bench BUNDLE --json OUT.json` in the guest exactly as on a board; the JSON says
`"emulated": true` (runtime.device detects qemu-user), so `python -m export MODEL --device OUT.json` refuses it
unless --allow-emulated. `parity` judges a runtime target (default `openvino` on model.onnx) run by the guest's
edgeport_runtime.load against the host's reference with the host's gates (export.parity.judge), as
benchmarks.arm.parity does for MNN and onnxruntime. `count` counts the guest instructions of one inference by
each engine through the runtime (ONNX Runtime and OpenVINO on model.onnx, MNN on model.mnn at fp32 and low) with
the insncount TCG plugin under the qemu 10 built with plugins (`make arm-setup`): a deterministic proxy of the
CPU's work, not latency.

Emulated wall time is qemu's translation of the ARM code on this host, not the CPU's latency: use it to prove that
every form runs with every engine, never to rank forms or engines or to choose for a real board.

The guest needs `make arm-board-setup` (ARM_CACHE/board-site: msgspec, Pillow, OpenVINO, edgeport-runtime) on top
of `make arm-setup-parity` (sysroot, CPython 3.11, numpy, MNN, onnxruntime, qemu 10).
"""
from __future__ import annotations

import argparse
import filecmp
import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import targets
from export.parity import judge, merge_gates
from models.errors import EdgeportError
from runtime.atomic import write_json
from runtime.cli import OneLineParser, cli_main, int_in

from .run import COUNT_KEYS, ArmEnv, _guest_environ, arm_env

REPO = Path(__file__).resolve().parents[2]
GUEST_RUNTIME = Path(__file__).with_name("guest_runtime.py")
DEFAULT_CPU = "cortex-a76"  # Raspberry Pi 5
QEMU10 = Path("qemu10", "usr", "bin", "qemu-aarch64")  # trixie's static qemu-user 10 (benchmarks/arm/setup.sh)
BOARD_SITE = "board-site"  # benchmarks/arm/board_setup.sh
TIMEOUT_S = 3 * 3600
RUNTIME_TARGETS = ("openvino",)  # runtime targets the MNN/onnxruntime ARM parity (benchmarks.arm.parity) leaves out


@dataclass(frozen=True)
class Guest:
    """The emulated board: the ARM environment plus the runtime's guest packages."""

    env: ArmEnv
    cpu: str = DEFAULT_CPU

    @property
    def qemu(self) -> Path:
        return self.env.cache / QEMU10

    @property
    def site(self) -> Path:
        return self.env.cache / BOARD_SITE

    def missing(self) -> str | None:
        needed = {self.qemu: "arm-setup-parity", self.env.python: "arm-setup-parity",
                  self.env.site / "MNN": "arm-setup-parity", self.env.site / "onnxruntime": "arm-setup-parity",
                  self.site / "edgeport_runtime": "arm-board-setup", self.site / "openvino": "arm-board-setup"}
        for path, make in needed.items():
            if not path.exists():
                return f"{path} missing; run `make {make}`"
        stale = stale_runtime(self.site / "edgeport_runtime")
        if stale:
            return f"the guest's edgeport_runtime differs from runtime/ ({stale}); run `make arm-board-setup`"
        return None

    @functools.cached_property
    def qemu_version(self) -> str:
        out = subprocess.run([str(self.qemu), "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip() if out else "unknown"

    def cpu_models(self) -> list[str]:
        out = subprocess.run([str(self.qemu), "-cpu", "help"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ") and line.split()]

    def require(self) -> Guest:
        why = self.missing()
        if why:
            raise EdgeportError(f"emulated board not ready: {why}")
        models = self.cpu_models()
        if models and self.cpu not in models:
            raise EdgeportError(f"qemu does not know --cpu {self.cpu}; choose one of {', '.join(models)}")
        return self

    @property
    def count_qemu(self) -> Path:
        return self.env.cache / "qemu-count" / "bin" / "qemu-aarch64"

    @property
    def count_plugin(self) -> Path:
        return self.env.cache / "qemu-count" / "libinsncount.so"

    def command(self, args: list[str], counts: Path | None = None) -> list[str]:
        """The guest's python3.11 with `args`; with `counts`, under the plugin qemu writing its counts there
        (address randomisation off, so that a run repeats its count)."""
        if counts is None:
            return [str(self.qemu), "-cpu", self.cpu, "-L", str(self.env.sysroot), str(self.env.python), *args]
        if not (self.count_qemu.exists() and self.count_plugin.exists()):
            raise EdgeportError(f"counting needs qemu 10 with TCG plugins ({self.count_qemu} missing); build it "
                                "once with `make arm-setup`")
        return ["setarch", "-R", str(self.count_qemu), "-cpu", self.cpu, "-L", str(self.env.sysroot),
                "-plugin", f"{self.count_plugin},out={counts}", str(self.env.python), *args]

    def environ(self) -> dict[str, str]:
        return {**_guest_environ(self.env), "PYTHONPATH": f"{self.site}{os.pathsep}{self.env.site}"}

    def run(self, args: list[str], cwd: Path, capture: bool = True, counts: Path | None = None
            ) -> subprocess.CompletedProcess:
        """Run the guest's python3.11 with `args`; EdgeportError with its last stderr line when it fails (with
        capture=False its progress goes to this process's stderr as it comes)."""
        try:
            pipe = subprocess.PIPE if capture else None
            proc = subprocess.run(self.command(args, counts), cwd=cwd, env=self.environ(), text=True, timeout=TIMEOUT_S,
                                  stdout=pipe, stderr=pipe)
        except subprocess.TimeoutExpired:
            raise EdgeportError(f"aarch64 guest timed out after {TIMEOUT_S} s (cpu {self.cpu})") from None
        if proc.returncode != 0 and not capture:  # the guest's own one-line error went to stderr already
            raise GuestFailed("", proc.returncode)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise GuestFailed(f"aarch64 guest failed (cpu {self.cpu}): {last}", proc.returncode)
        return proc


class GuestFailed(EdgeportError):
    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def stale_runtime(installed: Path) -> str | None:
    """The first runtime/*.py whose installed copy differs (or is missing), or None."""
    for src in sorted((REPO / "runtime").glob("*.py")):
        copy = installed / src.name
        if not copy.exists() or not filecmp.cmp(src, copy, shallow=False):
            return src.name
    return None


def board(cpu: str = DEFAULT_CPU, cache=None) -> Guest:
    return Guest(arm_env(cache), cpu).require()


# ---- the board bench --------------------------------------------------------------------------------------------
def bench(bundle, json_out, cpu: str = DEFAULT_CPU, rounds: int = 3, extra: list[str] = (), cache=None) -> Path:
    """edgeport-bench BUNDLE --json JSON_OUT under emulation; returns the JSON's path."""
    guest = board(cpu, cache)
    bundle, json_out = Path(bundle).resolve(), Path(json_out).resolve()
    if not bundle.exists():
        raise EdgeportError(f"{bundle} not found; make it with python -m export MODEL --bundle")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    print(f"edgeport-bench under {guest.qemu_version}, -cpu {cpu}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="arm-board-") as tmp:
        guest.run(["-m", "edgeport_runtime.bench", str(bundle), "--json", str(json_out), "--rounds", str(rounds),
                   *extra], Path(tmp), capture=False)
    return json_out


# ---- parity of runtime targets ----------------------------------------------------------------------------------
def guest_outputs(guest: Guest, model: Path, x: np.ndarray, engine: str, precision: str,
                  counted_runs: int = 0) -> tuple[dict, dict, list[dict]]:
    """({output: array}, versions, counts) of `model` run by the guest's edgeport_runtime on every sample of x;
    with counted_runs, the instruction counts of that many more inferences of sample 0 (one dict each)."""
    with tempfile.TemporaryDirectory(prefix="arm-board-") as tmp:
        work = Path(tmp)
        np.save(work / "input.npy", np.ascontiguousarray(x, dtype=np.float32))
        counts = work / "counts.jsonl" if counted_runs else None
        guest.run([str(GUEST_RUNTIME), str(model.resolve()), "input.npy", "out", "--engine", engine,
                   "--precision", precision, "--counted-runs", str(counted_runs)], work, counts=counts)
        info = json.loads((work / "out" / "info.json").read_text())
        regions = [json.loads(line) for line in counts.read_text().splitlines()] if counts else []
        if len(regions) != counted_runs:
            raise EdgeportError(f"the insncount plugin reported {len(regions)} of {counted_runs} regions; rebuild it "
                                "with `make arm-setup`")
        return ({n: np.load(work / "out" / f"out{k}.npy") for k, n in enumerate(info["output_names"])},
                info["versions"], regions)


def check_dir(artifact_dir, cpu: str = DEFAULT_CPU, target_names=RUNTIME_TARGETS, gates=None, n_images: int = 3,
              n_random: int = 1, seed: int = 0, cache=None, log=print) -> list[dict]:
    """Rows (benchmarks.arm.parity's format) of each runtime target of the dir, judged as on the host."""
    from export.inputs import sample_batch

    from .parity import format_row, read_metadata, reference_for

    guest = board(cpu, cache)
    d = Path(artifact_dir)
    chosen = [t for t in targets.ARTIFACTS if t.name in target_names and (d / t.file).is_file()]
    if not chosen:
        raise EdgeportError(f"no file of {', '.join(target_names)} in {d}; export the model first")
    gates = merge_gates(gates)
    meta = read_metadata(d)
    x = sample_batch(meta, n_images=n_images, n_random=n_random, seed=seed)
    reference_of, ref_name = reference_for(d, meta)
    ref = reference_of(x)
    classifier = meta.get("task", "classification") == "classification"
    rows = []
    for target in chosen:
        out, versions, _ = guest_outputs(guest, d / target.file, x, target.engine, target.precision)
        metrics, breaches = judge(target.name, ref, out, gates[target.name], classifier, meta)
        worst = max((m for m in metrics.values() if "max_rel" in m), key=lambda m: m["max_rel"], default={})
        row = {"dir": str(d), "target": target.name, "file": target.file, "engine": target.engine, "cpu": cpu,
               "precision": target.precision, "compute": "fp32", "qemu": guest.qemu_version,
               "versions": versions, "device": {}, "reference": ref_name, "metrics": metrics,
               "max_rel": worst.get("max_rel"), "top1": worst.get("top1"), "gates": gates[target.name],
               "breaches": breaches, "passed": not breaches,
               "inputs": f"export.inputs.sample_batch(n_images={n_images}, n_random={n_random}, seed={seed})"}
        rows.append(row)
        log(format_row(row))
    return rows


# ---- instruction counts -----------------------------------------------------------------------------------------
COUNTED_TARGETS = ("ort", "openvino", "mnn_fp32", "mnn_low")  # each counted when its file is in the dir
COUNTED_RUNS = 3


def count_dir(artifact_dir, cpu: str = DEFAULT_CPU, cache=None, log=print) -> list[dict]:
    """Guest instructions of one inference (N(0, 1) input of the model's shape, seed 0) by each target of
    COUNTED_TARGETS whose file is in the dir: the smallest total of the counted runs after the first (the first
    still warms up)."""
    from .parity import read_metadata

    guest = board(cpu, cache)
    d = Path(artifact_dir)
    meta = read_metadata(d)
    x = np.random.default_rng(0).standard_normal([1, *meta["input_shape"][1:]]).astype(np.float32)
    rows = []
    for target in map(targets.get, COUNTED_TARGETS):
        engine, file, precision = target.engine, target.file, target.precision
        if not (d / file).is_file():
            continue
        _, versions, regions = guest_outputs(guest, d / file, x, engine, precision, COUNTED_RUNS)
        steady = min(regions[1:], key=lambda c: c["total"])
        row = {"dir": str(d), "engine": engine, "file": file, "precision": precision, "cpu": cpu,
               **{k: int(steady[k]) for k in COUNT_KEYS}, "engine_version": versions.get(engine, "")}
        rows.append(row)
        log(f"{d.name:<16} {engine:<12} {file:<11} {precision:<5} {row['total'] / 1e6:9.1f} M  "
            f"simd/fp {row['simd_fp'] / 1e6:7.1f} M  load/store {row['load_store'] / 1e6:6.1f} M")
    return rows


# ---- CLI --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.arm.board", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help="ARM environment dir (default .cache/arm or $EDGEPORT_ARM_CACHE)")
    p.add_argument("--cpu", default=DEFAULT_CPU, help=f"qemu CPU model (default {DEFAULT_CPU}: Raspberry Pi 5; "
                                                     "cortex-a72: Raspberry Pi 4; neoverse-n1)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="edgeport-bench on a bundle in the guest (after --: more of its options)")
    b.add_argument("bundle", help="MODEL.bundle.tar.gz or its directory (python -m export MODEL --bundle)")
    b.add_argument("--json", required=True, help="where the guest writes the board results")
    b.add_argument("--rounds", type=int_in(1), default=3, help="timed rounds (default 3: emulation is slow)")
    q = sub.add_parser("parity", help="judge runtime targets (OpenVINO) run in the guest")
    q.add_argument("dirs", nargs="+", help="artifact dirs (OUT/MODEL/FORM), each with model.onnx and manifest.json")
    q.add_argument("--targets", nargs="+", default=list(RUNTIME_TARGETS), choices=[t.name for t in targets.ARTIFACTS
                                                                                   if t.engine == "openvino"])
    q.add_argument("--json", help="write the rows here")
    c = sub.add_parser("count", help="guest instructions of one inference per engine (needs `make arm-setup`)")
    c.add_argument("dirs", nargs="+", help="artifact dirs (OUT/MODEL/FORM) of an export")
    c.add_argument("--json", help="write the rows here")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # edgeport-bench's own options
    args = build_parser().parse_args(argv[:len(argv) - len(extra) - bool(extra or "--" in argv)])
    try:
        if args.command == "bench":
            bench(args.bundle, args.json, args.cpu, args.rounds, extra, args.cache)  # the guest says where it wrote
            return 0
        if args.command == "count":
            rows = [r for d in args.dirs for r in count_dir(d, args.cpu, cache=args.cache)]
        else:
            from .parity import HEADER

            print(HEADER)
            rows = [r for d in args.dirs for r in check_dir(d, args.cpu, tuple(args.targets), cache=args.cache)]
        if args.json:
            write_json(args.json, rows)
        return 0 if all(r.get("passed", True) for r in rows) else 1
    except GuestFailed as e:
        if str(e):
            print(f"error: {e}", file=sys.stderr)
        return e.returncode if e.returncode in (1, 2) else 2
    except EdgeportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
