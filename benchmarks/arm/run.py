"""Host side of the ARM emulation: run a .mnn (MNN) or .onnx (onnxruntime) in the aarch64 guest (qemu-user +
Debian's CPython + the engines' aarch64 wheels, built by `make arm-setup`) and count the guest instructions of one
inference.

Three qemu-aarch64 builds, picked per run (ArmEnv.emulator):
  - the host's qemu-user (Debian 12: 7.2, with TCG plugins): MNN's parity and counts (which repeat exactly under
    it; under qemu 10 they differ by a few instructions from run to run, ~1e-7);
  - cache/qemu10: trixie's static qemu-user 10.0 (no plugins): onnxruntime's parity (its aarch64 wheel segfaults
    under 7.2 with every -cpu);
  - cache/qemu-count: qemu 10.0 built from trixie's source with plugins (`make arm-setup`): onnxruntime's counts.
The same .mnn counted by both: 125,361,765 instructions (7.2) against 125,361,736 (10): the emulator's version
does not move an engine comparison.

Emulated wall time says nothing about ARM latency; instruction counts are a deterministic proxy, not latency.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import EdgeportError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "arm"
GUEST_SCRIPT = Path(__file__).with_name("guest_infer.py")
PRECISIONS = ("normal", "low")
COUNT_KEYS = ("total", "load_store", "simd_fp", "other")
GUEST_TIMEOUT_S = 3600


@dataclass(frozen=True)
class ArmEnv:
    """The aarch64 environment under a cache dir (see setup.sh for its layout)."""

    cache: Path

    @property
    def sysroot(self) -> Path:
        return self.cache / "sysroot"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"

    @property
    def site(self) -> Path:
        return self.cache / "site"

    @property
    def plugin(self) -> Path:
        return self.cache / "plugin" / "libinsncount.so"

    @property
    def qemu10(self) -> Path:
        return self.cache / "qemu10" / "usr" / "bin" / "qemu-aarch64"

    @property
    def count_qemu(self) -> Path:
        return self.cache / "qemu-count" / "bin" / "qemu-aarch64"

    @property
    def count_plugin(self) -> Path:
        return self.cache / "qemu-count" / "libinsncount.so"

    def can_count(self, engine: str) -> bool:
        """Whether instructions of `engine` can be counted here (onnxruntime: only with the built qemu 10)."""
        if engine == "onnxruntime":
            return self.count_qemu.exists() and self.count_plugin.exists()
        return shutil.which("qemu-aarch64") is not None and self.plugin.exists()

    def emulator(self, engine: str = "mnn", counting: bool = False) -> tuple[str, Path | None]:
        """(qemu-aarch64 path, TCG plugin or None) that runs `engine`, counting instructions or not."""
        if engine != "onnxruntime":
            return "qemu-aarch64", self.plugin if counting else None
        if counting:
            if not self.can_count(engine):
                raise EdgeportError("counting onnxruntime needs qemu 10 with TCG plugins "
                                    f"({self.count_qemu} missing); build it once with `make arm-setup`")
            return str(self.count_qemu), self.count_plugin
        return str(self.qemu10 if self.qemu10.exists() else self.count_qemu), None

    def missing(self, engine: str = "mnn") -> str | None:
        """Why the environment cannot run `engine` ("mnn" or "onnxruntime"), or None when it can."""
        if engine == "onnxruntime":
            needed = [self.python, self.site / "onnxruntime"]
            if not (self.qemu10.exists() or self.count_qemu.exists()):
                return f"{self.qemu10} missing"
        else:
            if shutil.which("qemu-aarch64") is None:
                return "qemu-aarch64 not installed"
            needed = [self.python, self.site / "MNN", self.plugin]
        for path in needed:
            if not path.exists():
                return f"{path} missing"
        return None

    def require(self, engine: str = "mnn") -> ArmEnv:
        why = self.missing(engine)
        if why:
            raise EdgeportError(f"ARM environment not ready for {engine} ({why}); run `make arm-setup`")
        return self


def arm_env(cache: str | os.PathLike | None = None) -> ArmEnv:
    cache = cache or os.environ.get("EDGEPORT_ARM_CACHE") or DEFAULT_CACHE
    return ArmEnv(Path(cache).resolve())


@dataclass
class GuestRun:
    outputs: dict[str, np.ndarray]
    counts: list[dict[str, int]]  # one per counted region
    device: dict[str, int]  # MNN's "The device supports: ..." line: which ARM features its kernels use
    versions: dict[str, str]


def _guest_environ(env: ArmEnv) -> dict[str, str]:
    # A clean environment: nothing of the host's (OPENBLAS_CORETYPE may name an x86 core; PYTHONPATH the
    # host's packages). Threads pinned to 1 and the hash seed fixed so instruction counts repeat exactly.
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONNOUSERSITE": "1", "PYTHONPATH": str(env.site),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _guest(env: ArmEnv, cpu: str, args: list[str], cwd: Path, plugin_out: Path | None = None,
           engine: str = "mnn") -> str:
    """Run guest_infer.py under qemu-aarch64; returns its stdout.

    `setarch -R` turns address randomisation off: with it the same run repeats the same instruction count."""
    qemu, plugin = env.emulator(engine, counting=plugin_out is not None)
    cmd = [qemu, "-cpu", cpu, "-L", str(env.sysroot)]
    if plugin_out is not None:
        cmd += ["-plugin", f"{plugin},out={plugin_out}"]
    # Bytecode caching stays on: Debian's stdlib .debs ship no .pyc, and compiling on every start costs
    # seconds of emulation; the first run fills the caches under the sysroot and site dirs.
    cmd += [str(env.python), str(GUEST_SCRIPT), *args]
    if shutil.which("setarch"):
        cmd = ["setarch", "-R", *cmd]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=_guest_environ(env), capture_output=True, text=True,
                              timeout=GUEST_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise EdgeportError(f"aarch64 guest timed out after {GUEST_TIMEOUT_S} s (cpu {cpu}); "
                            "try a smaller model or fewer inputs") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode} (no output)"])[-1]
        if "unable to find CPU model" in proc.stderr:
            last = f"qemu does not know -cpu {cpu}; list the models with `qemu-aarch64 -cpu help`"
        raise EdgeportError(f"aarch64 guest failed (cpu {cpu}): {last}")
    return proc.stdout


def parse_device_line(stdout: str) -> dict[str, int]:
    """MNN's 'The device supports: i8sdot:0, fp16:1, ...' (printed at import) → {"i8sdot": 0, "fp16": 1}."""
    m = re.search(r"The device supports:(.*)", stdout)
    return {k: int(v) for k, v in re.findall(r"(\w+):\s*(\d+)", m.group(1))} if m else {}


def engine_of(path) -> str:
    """The engine that runs a model file in the guest, by its suffix."""
    suffix = Path(path).suffix
    if suffix not in (".mnn", ".onnx"):
        raise EdgeportError(f"{path}: the ARM guest runs .mnn (MNN) and .onnx (onnxruntime) files")
    return "onnxruntime" if suffix == ".onnx" else "mnn"


def guest_infer(model_path, inputs: np.ndarray, cpu: str = "cortex-a53", precision: str = "normal",
                counted_runs: int = 0, cache=None) -> GuestRun:
    """Run every sample of `inputs` (N, C, H, W) through the model (.mnn: MNN, .onnx: onnxruntime, one thread)
    at batch 1 in the guest; with counted_runs > 0 also count the instructions of that many extra inferences of
    sample 0."""
    if precision not in PRECISIONS:
        raise EdgeportError(f"unknown MNN precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    model_path = Path(model_path)
    engine = engine_of(model_path)
    if engine == "onnxruntime" and precision != "normal":
        raise EdgeportError(f"{model_path.name}: onnxruntime has no precision '{precision}' (fp32 only)")
    if not model_path.is_file():
        raise EdgeportError(f"{model_path} not found; export the model first (make export)")
    env = arm_env(cache).require(engine)
    work_root = env.cache / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    # Fixed-length names inside a fixed-length temp dir keep the guest's argv, paths and memory layout alike
    # from one run to the next.
    with tempfile.TemporaryDirectory(prefix="g", dir=work_root) as tmp:
        work = Path(tmp)
        net = "net" + model_path.suffix
        os.symlink(model_path.resolve(), work / net)
        np.save(work / "input.npy", np.ascontiguousarray(inputs, dtype=np.float32))
        counts_file = work / "counts.jsonl" if counted_runs else None
        args = [net, "input.npy", "out", "--precision", precision, "--engine", engine,
                "--counted-runs", str(counted_runs)]
        stdout = _guest(env, cpu, args, work, counts_file, engine)
        info = json.loads((work / "out" / "info.json").read_text())
        outputs = {name: np.load(work / "out" / f"out{k}.npy") for k, name in enumerate(info["output_names"])}
        counts = [json.loads(line) for line in counts_file.read_text().splitlines()] if counts_file else []
    if len(counts) != counted_runs:
        raise EdgeportError(f"the insncount plugin reported {len(counts)} of {counted_runs} regions; "
                            "rebuild it with `make arm-setup`")
    qemu = env.emulator(engine, counting=bool(counted_runs))[0]
    return GuestRun(outputs, counts, parse_device_line(stdout),
                    {**info["versions"], "engine": engine, "qemu_used": qemu_version(qemu)})


def run_mnn_arm(mnn_path, inputs: np.ndarray, cpu: str = "cortex-a53", precision: str = "normal",
                cache=None) -> dict[str, np.ndarray]:
    """Outputs of the .mnn on an emulated ARM core (MNN Module API, numThread 1), by output name."""
    return guest_infer(mnn_path, inputs, cpu, precision, cache=cache).outputs


COUNTED_RUNS = 4


def steady_counts(run: GuestRun) -> dict[str, int]:
    """The counts of one steady-state inference: the smallest total among the counted runs after the first.

    The first counted run still differs by a few hundred instructions of Python-side warm-up. onnxruntime's
    inference (under qemu 10) sometimes executes 0.1-0.3 % more instructions (163-410 k of fasternet_t0's 148 M,
    cause not found); the smallest of three is usually a run without them."""
    steady = min(run.counts[1:] or run.counts, key=lambda c: c["total"])
    return {k: int(steady[k]) for k in COUNT_KEYS}


def count_instructions(model_path, input: np.ndarray, cpu: str = "cortex-a53", precision: str = "normal",
                       cache=None) -> dict[str, int]:
    """Guest instructions of one inference of `input` (its first sample) by the .mnn or .onnx, total and by class.

    The model runs once untimed, then COUNTED_RUNS times counted (steady_counts picks the one reported)."""
    run = guest_infer(model_path, np.asarray(input)[:1], cpu, precision, counted_runs=COUNTED_RUNS, cache=cache)
    return steady_counts(run)


@functools.cache
def qemu_version(qemu: str = "qemu-aarch64") -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version\s+(.*)", out)
    return m.group(1).strip() if m else out.strip()


def qemu_versions(env: ArmEnv) -> dict[str, str]:
    """The version of each qemu present: `qemu` (the host's: MNN parity), `qemu_onnxruntime` (trixie's static
    build: onnxruntime parity), `qemu_counting` (built with plugins: every count)."""
    found = {"qemu": qemu_version()}
    for key, path in (("qemu_onnxruntime", env.qemu10), ("qemu_counting", env.count_qemu)):
        if path.exists():
            found[key] = qemu_version(str(path))
    return found


def versions(cache=None, probe: bool = False) -> dict[str, str]:
    """qemu (host and cache), Python, glibc, numpy, MNN and onnxruntime (guest) versions; read from the cache's
    versions.json, written by `make arm-setup`, unless probe=True or the file is missing or from other qemus."""
    env = arm_env(cache)
    path = env.cache / "versions.json"
    qemus = qemu_versions(env)
    if not probe and path.is_file():
        known = json.loads(path.read_text())
        if all(known.get(k) == v for k, v in qemus.items()):
            return known
    env.require()
    with tempfile.TemporaryDirectory() as tmp:
        out = _guest(env, "cortex-a53", ["--versions"], Path(tmp))
    # MNN's own C-level print may land after ours: take the JSON line.
    guest = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    return {**qemus, **guest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="aarch64 guest versions (qemu-user)")
    p.add_argument("--versions", action="store_true", help="probe the guest and print its versions as JSON")
    p.add_argument("--cache", default=None, help=f"environment dir (default {DEFAULT_CACHE})")
    a = p.parse_args(argv)
    try:
        print(json.dumps(versions(a.cache, probe=True)))
    except EdgeportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
