"""Time every inference form of a model on this board, torch-free, against the bundle's fc baseline.

  edgeport-bench fasternet_t0.bundle.tar.gz --json board.json      (python -m runtime.bench in the repository)
  edgeport-bench a.mnn b.mnn c.onnx                                (plain files: the first is the baseline)

Every file is checked against the bundle's sha256, loaded by every installed engine that runs it (.mnn: MNN at
fp32 and "low"; .onnx: onnxruntime, and OpenVINO once runtime.engines registers it), run once and checked (finite
outputs of the shapes the bundle recorded), then all are timed interleaved in rounds (order rotated each round),
each round's time divided by the same round's baseline (same engine, target and precision, fc form).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from .cli import OneLineParser, cli_main, int_in
from .device import (
    BoardResults,
    Device,
    Drift,
    Result,
    Run,
    Schema,
    cpu_state,
    describe,
    fastest_cluster_cpus,
    fingerprint,
    new_schema,
    now,
    online_cpus,
    parse_cpu_list,
    write_results,
)
from .documents import check_document, decode_json, read_bytes, sha256_file
from .engines import ENGINES
from .errors import EdgeRuntimeError
from .predictor import load

BUNDLE_JSON = "bundle.json"
BUNDLE_SCHEMA = ("edgeport.bundle", 1)
MAX_BUNDLE_JSON_BYTES = 4 << 20
# file extension → the engines that run it (runtime.load backends), in table order. An engine is timed when
# runtime.engines.ENGINES has it and its Python package is installed: OpenVINO joins by registering "openvino".
FILE_ENGINES = {".onnx": ("onnxruntime", "openvino"), ".mnn": ("mnn",)}
ENGINE_PACKAGES = {"mnn": "MNN", "onnxruntime": "onnxruntime", "openvino": "openvino"}
PRECISIONS = ("fp32", "low")
LOW_ENGINES = {"mnn"}  # engines with a precision="low" (fp16 arithmetic) mode


# ---- the bundle contract (written by `python -m export MODEL --bundle`) -------------------------------------
class BundleFile(msgspec.Struct):
    file: str            # relative to the bundle's model directory: "<form tag>/<file name>"
    sha256: str
    engine: str          # the target's engine (runtime backend)
    precision: str       # fp32 | low
    gate: str            # the target's parity gate on the build host: passed | failed | unchecked
    size: int = 0


class BundleForm(msgspec.Struct):
    tag: str
    pconv: str | None
    mlp: str | None
    status: str                          # the export's status (passed | failed | unchecked)
    input_shape: list[int]
    outputs: dict[str, list[int]]        # output name → shape, from the host's run of model.onnx
    files: dict[str, BundleFile]         # target → file


class Bundle(msgspec.Struct):
    schema: Schema
    model: str
    baseline: str                        # the fc form every ratio is taken against
    forms: list[BundleForm]
    source: dict
    host: Device
    created: str = ""


def read_bundle(directory: Path) -> Bundle:
    path = directory / BUNDLE_JSON
    what, fix = f"bundle {path}", "re-make it with python -m export MODEL --bundle"
    bundle = check_document(decode_json(read_bytes(path, "bundle", MAX_BUNDLE_JSON_BYTES), what, fix), Bundle,
                            what, fix)
    if (bundle.schema.name, bundle.schema.version) != BUNDLE_SCHEMA:
        raise EdgeRuntimeError(f"{path}: schema {bundle.schema.name} v{bundle.schema.version}; this bench reads "
                               f"{BUNDLE_SCHEMA[0]} v{BUNDLE_SCHEMA[1]}")
    for form in bundle.forms:
        for target, f in form.files.items():
            if Path(f.file).is_absolute() or ".." in Path(f.file).parts:
                raise EdgeRuntimeError(f"{path}: forms[{form.tag}].files[{target}] {f.file!r} points outside the "
                                       "bundle; re-make it with python -m export MODEL --bundle")
    return bundle


# ---- what is timed ----------------------------------------------------------------------------------------------
@dataclass
class Entry:
    form: str
    target: str
    file: str                 # as recorded (bundle-relative) or given
    path: Path
    engine: str
    precision: str
    gate: str = "unchecked"
    sha256: str = ""
    expected_sha256: str | None = None
    outputs: dict | None = None   # expected {name: shape}
    input_shape: list | None = None
    baseline: bool = False
    load_ms: float = 0.0
    first_ms: float = 0.0
    rss_load_mb: float = 0.0
    run: object = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.form}|{self.target or Path(self.file).name}|{self.engine}|{self.precision}"

    @property
    def pair(self) -> tuple:
        """What the baseline entry shares with this one."""
        return self.target or Path(self.file).suffix, self.engine, self.precision

    @property
    def label(self) -> str:
        return f"{self.file} ({self.engine}, {self.precision})"


def installed_engines(wanted=None) -> list[str]:
    return [e for e in ENGINE_PACKAGES if e in ENGINES and (wanted is None or e in wanted)
            and importlib.util.find_spec(ENGINE_PACKAGES[e]) is not None]


def engines_for(path: str, engines: list[str]) -> list[str]:
    return [e for e in FILE_ENGINES.get(Path(path).suffix.lower(), ()) if e in engines]


def bundle_entries(root: Path, bundle: Bundle, engines: list[str], precisions) -> list[Entry]:
    if bundle.baseline not in {f.tag for f in bundle.forms}:
        raise EdgeRuntimeError(f"{root / BUNDLE_JSON}: baseline {bundle.baseline!r} is not one of its forms")
    entries = []
    for form in bundle.forms:
        own = {(f.file, f.engine) for f in form.files.values()}  # files an engine runs under a target of its own
        for target, f in form.files.items():
            for engine in engines_for(f.file, engines):
                # the target's own precision; another engine (OpenVINO on model.onnx) runs the file as it is,
                # unless the bundle has that engine's own target on it (ort and openvino both name model.onnx)
                precision = f.precision if engine == f.engine else "fp32"
                if precision not in precisions or (engine != f.engine and (f.precision != "fp32"
                                                                           or (f.file, engine) in own)):
                    continue
                entries.append(Entry(form.tag, target, f.file, root / f.file, engine, precision, f.gate,
                                     expected_sha256=f.sha256, outputs=form.outputs, input_shape=form.input_shape,
                                     baseline=form.tag == bundle.baseline))
    return entries


def file_entries(paths: list[str], engines: list[str], precisions) -> list[Entry]:
    """Plain model files: each its own "form" (its name), the first the baseline."""
    entries = []
    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            raise EdgeRuntimeError(f"{p}: no such model file or bundle")
        runnable = FILE_ENGINES.get(Path(p).suffix.lower())
        if runnable is None:
            raise EdgeRuntimeError(f"{p}: unknown model type; give .mnn or .onnx files, or a bundle")
        form = _plain_form_name(p, paths)
        for engine in engines_for(p, engines):
            for precision in precisions if engine in LOW_ENGINES else ("fp32",):
                entries.append(Entry(form, "", p, Path(p), engine, precision, baseline=i == 0))
    return entries


def _plain_form_name(path: str, paths: list[str]) -> str:
    """The export's form directory (split_cat-fc/model.mnn → split_cat-fc) when names would clash, else the
    file name."""
    names = [Path(p).name for p in paths]
    return Path(path).parent.name or Path(path).stem if names.count(Path(path).name) > 1 else Path(path).stem


# ---- inputs: bundle directory, tarball or files ------------------------------------------------------------------
def open_inputs(args: list[str], scratch: Path) -> tuple[Path | None, Bundle | None, list[str]]:
    """(bundle root, bundle, []) or (None, None, plain files)."""
    if len(args) == 1 and (args[0].endswith((".tar.gz", ".tgz")) or os.path.isdir(args[0])):
        root = Path(args[0])
        if root.is_file():
            root = _extract(root, scratch)
        root = _bundle_root(root)
        return root, read_bundle(root), []
    for a in args:
        if os.path.isdir(a) or a.endswith((".tar.gz", ".tgz")):
            raise EdgeRuntimeError(f"{a}: give one bundle (directory or .tar.gz), or model files, not both")
    return None, None, list(args)


def _bundle_root(path: Path) -> Path:
    if (path / BUNDLE_JSON).is_file():
        return path
    found = [p.parent for p in path.glob(f"*/{BUNDLE_JSON}")]
    if len(found) == 1:
        return found[0]
    raise EdgeRuntimeError(f"{path}: no {BUNDLE_JSON} in it" + (f" (several bundles: name one of "
                           f"{', '.join(str(p) for p in found)})" if found else "; make one with "
                           "python -m export MODEL --bundle"))


def _extract(tarball: Path, scratch: Path) -> Path:
    """Regular files and directories only, inside `scratch` (no links, devices or ../ paths)."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = (scratch / m.name).resolve()
                if not (m.isfile() or m.isdir()) or not str(target).startswith(str(scratch.resolve())):
                    raise EdgeRuntimeError(f"{tarball}: unsafe member {m.name!r}; not an edgeport bundle")
            tar.extractall(scratch, members=members)  # noqa: S202 (members checked above)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise EdgeRuntimeError(f"{tarball}: not a readable .tar.gz ({e}); copy the bundle again") from None
    return scratch


# ---- load, check, time -----------------------------------------------------------------------------------------
def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # macOS reports bytes, Linux KiB


def check_outputs(entry: Entry, outputs: dict, expected: dict) -> None:
    """EdgeRuntimeError unless `outputs` has the expected names and shapes (the host's run of the same form;
    non-finite values are refused by Predictor.run itself)."""
    if set(outputs) != set(expected):
        raise EdgeRuntimeError(f"outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        y = outputs[name]
        if list(y.shape) != list(shape):
            raise EdgeRuntimeError(f"output '{name}' has shape {list(y.shape)}, expected {list(shape)}")


def prepare(entry: Entry, threads: int, expected: dict | None) -> dict:
    """Check the file's sha256, load it, run it once and check the outputs; set entry.run. Returns the outputs
    (the reference shapes for plain files). Raises EdgeRuntimeError naming what is wrong."""
    entry.sha256 = sha256_file(entry.path) if entry.path.is_file() else ""
    if not entry.sha256:
        raise EdgeRuntimeError("missing from the bundle")
    if entry.expected_sha256 and entry.sha256 != entry.expected_sha256:
        raise EdgeRuntimeError("sha256 differs from the bundle's (corrupted or replaced); copy the bundle again")
    rss = rss_mb()
    t = time.perf_counter()
    predictor = load(entry.path, backend=entry.engine, threads=threads, precision=entry.precision)
    entry.load_ms = (time.perf_counter() - t) * 1e3
    shape = entry.input_shape or predictor.input_shape
    if not shape:
        raise EdgeRuntimeError("input shape unknown (no edgeport metadata); cannot make an input")
    x = np.random.default_rng(0).standard_normal([d if d > 0 else 1 for d in shape], dtype=np.float32)
    t = time.perf_counter()
    outputs = predictor.run(x)  # the first run is checked (finite, shapes); the timed ones are not
    entry.first_ms = (time.perf_counter() - t) * 1e3
    entry.rss_load_mb = rss_mb() - rss
    expected = entry.outputs or expected or {n: list(y.shape) for n, y in outputs.items()}
    check_outputs(entry, outputs, expected)
    entry.outputs = expected
    entry.run = lambda: predictor.run(x, check_finite=False)
    return expected


def pin(cores: str) -> list[int]:
    """Set this process's CPU affinity (engines' threads inherit it) and return the CPUs."""
    if cores == "all":
        cpus = online_cpus()
    elif cores == "auto":
        cpus = fastest_cluster_cpus()
    else:
        cpus = parse_cpu_list(cores)
        if not cpus:
            raise EdgeRuntimeError(f"--cores {cores!r}: give auto, all, or CPUs like 4-7 or 0,2")
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError, ValueError) as e:
        raise EdgeRuntimeError(f"--cores {cores}: cannot run on CPUs {cpus} ({e}); see /sys/devices/system/cpu/"
                               "online") from None
    return sorted(os.sched_getaffinity(0))


def _groups(entries: list[Entry]) -> list[list[Entry]]:
    """Entries by (target, engine, precision): each group holds every form of one file kind and its baseline."""
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.pair, []).append(e)
    return list(groups.values())


def time_group(entries: list[Entry], args, failed: list[str], shared: dict, budget: float):
    """Prepare (load, run once, check) and time `entries` interleaved: (entries timed, {key: seconds})."""
    from .timing import interleaved

    ready = []
    for i, entry in enumerate(entries, 1):
        try:
            shared["expected"] = prepare(entry, args.threads, shared["expected"])
            ready.append(entry)
            log(f"  [{i}/{len(entries)}] {entry.label}: load {entry.load_ms:.0f} ms, first {entry.first_ms:.1f} ms")
        except EdgeRuntimeError as e:
            failed.append(f"{entry.label}: {str(e).removeprefix(str(entry.path) + ': ')}")
            log(f"  [{i}/{len(entries)}] {entry.label}: FAILED, not timed")
    if not ready:
        return [], {}
    start = last = time.perf_counter()

    def progress(done: int) -> None:
        nonlocal last
        if time.perf_counter() - last > 2 or done == args.rounds:
            last = time.perf_counter()
            log(f"  round {done}/{args.rounds} ({last - start:.0f} s)")

    log(f"timing {len(ready)} files × engines, interleaved: {args.warmup} warm-up + {args.rounds} rounds "
        f"(budget {budget:.0f} s)")
    times = interleaved({e.key: e.run for e in ready}, iters=args.rounds, warmup=args.warmup,
                        max_seconds=budget, progress=progress)
    for entry in list(ready):  # a file that went wrong during the rounds is not reported either
        try:
            check_outputs(entry, entry.run(), entry.outputs)
        except EdgeRuntimeError as e:
            failed.append(f"{entry.label}: after the rounds: {e}")
            ready.remove(entry)
    return ready, {e.key: times[e.key] for e in ready}


def drift(times: dict[str, np.ndarray], start_state, end_state) -> Drift | None:
    rounds = min((len(t) for t in times.values()), default=0)
    if rounds < 2:
        return None
    k = max(1, rounds // 5)
    first = sum(float(np.median(t[:k])) for t in times.values()) * 1e3
    last = sum(float(np.median(t[-k:])) for t in times.values()) * 1e3
    return Drift(first_ms=round(first, 4), last_ms=round(last, 4), ratio=round(last / first, 4),
                 freq_mhz_start=start_state[0], freq_mhz_end=end_state[0],
                 temp_c_start=start_state[1], temp_c_end=end_state[1])


def results_of(entries: list[Entry], times: dict[str, np.ndarray]) -> list[Result]:
    base = {e.pair: e for e in entries if e.baseline}
    out = []
    for e in entries:
        t = times[e.key]
        ratio = None
        b = base.get(e.pair)
        if b is not None and len(times[b.key]) == len(t):
            ratio = t / times[b.key]
        ms = lambda v: round(float(v) * 1e3, 4)  # noqa: E731
        out.append(Result(
            form=e.form, target=e.target, file=e.file, engine=e.engine, precision=e.precision,
            median_ms=ms(np.median(t)), p10_ms=ms(np.percentile(t, 10)), p90_ms=ms(np.percentile(t, 90)),
            ratio_to_baseline=None if ratio is None else round(float(np.median(ratio)), 4),
            ratio_p10=None if ratio is None else round(float(np.percentile(ratio, 10)), 4),
            ratio_p90=None if ratio is None else round(float(np.percentile(ratio, 90)), 4),
            baseline=e.baseline, gate=e.gate, rounds=len(t), load_ms=round(e.load_ms, 2),
            first_ms=round(e.first_ms, 3), rss_load_mb=round(e.rss_load_mb, 1), sha256=e.sha256))
    return out


def table(results: list[Result]) -> str:
    header = ["form", "target", "engine", "prec", "median ms", "p10–p90 ms", "× fc (p10–p90)", "load ms",
              "first ms", "gate"]
    rows = []
    for r in sorted(results, key=lambda r: (r.engine, r.target, r.precision, r.median_ms)):
        ratio = "—" if r.ratio_to_baseline is None else (
            f"{r.ratio_to_baseline:.3f} ({r.ratio_p10:.2f}–{r.ratio_p90:.2f})")
        rows.append([r.form + (" *" if r.baseline else ""), r.target or Path(r.file).name, r.engine, r.precision,
                     f"{r.median_ms:.3f}", f"{r.p10_ms:.2f}–{r.p90_ms:.2f}", ratio, f"{r.load_ms:.0f}",
                     f"{r.first_ms:.1f}", r.gate])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], "* baseline (fc form)"])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- command line ----------------------------------------------------------------------------------------------
EPILOG = """\
output: progress on stderr; the table on stdout; --json OUT.json the results (schema edgeport.board-results v1,
docs/guides/board.md), which `python -m export MODEL --device OUT.json` chooses the form from and
`python -m benchmarks.devices` merges with other boards'.

exit status: 0 every file timed; 2 bad input, or a file whose sha256 differs, whose forward fails, returns
NaN/Inf or outputs of the wrong shape (one line naming it; it gets no time, the others are still timed).
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="edgeport-bench", description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[2],
                      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="BUNDLE|FILE",
                   help="a bundle (directory with bundle.json, or MODEL.bundle.tar.gz), or .mnn/.onnx files")
    p.add_argument("--json", metavar="OUT.json", help="write the results (atomically) to this file")
    p.add_argument("--threads", type=int_in(1, 256), default=1, help="intra-op threads per engine (default 1)")
    p.add_argument("--cores", default="auto",
                   help="CPUs to run on: auto (default: the fastest cluster of a big.LITTLE CPU, by "
                        "cpuinfo_max_freq), all, or a list like 4-7 or 0,2")
    p.add_argument("--rounds", type=int_in(1, 100_000), default=20,
                   help="timed rounds, every file once per round in rotating order (default 20)")
    p.add_argument("--warmup", type=int_in(0, 1000), default=3, help="untimed rounds first (default 3)")
    p.add_argument("--budget", type=float, default=600.0, metavar="SECONDS",
                   help="stop after this many seconds of warm-up + rounds once 3 rounds are done (default 600)")
    p.add_argument("--engines", help="comma-separated subset of " + ",".join(ENGINE_PACKAGES)
                   + " (default: every installed one)")
    p.add_argument("--low-memory", action="store_true",
                   help="load and time one file kind (target × engine × precision) at a time, its forms interleaved "
                        "with their baseline, instead of every file at once (fasternet_t0's bundle: 2.9 GB resident)")
    p.add_argument("--precision", default="fp32,low",
                   help="MNN precisions to time: fp32, low (fp16 arithmetic on ARMv8.2+) or both (default)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="edgeport-bench-"))
    try:
        return _main(args, scratch)
    except EdgeRuntimeError as e:
        print(f"edgeport-bench: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _options(args) -> tuple[list[str], tuple[str, ...]]:
    wanted = None if args.engines is None else {e.strip() for e in args.engines.split(",") if e.strip()}
    if wanted is not None and not wanted <= set(ENGINE_PACKAGES):
        raise EdgeRuntimeError(f"--engines {args.engines}: choose from {','.join(ENGINE_PACKAGES)}")
    engines = installed_engines(wanted)
    if not engines:
        raise EdgeRuntimeError("no inference engine installed; pip install 'edgeport-runtime[mnn]' (or "
                               "[onnxruntime], [all])")
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    if not precisions or set(precisions) - set(PRECISIONS):
        raise EdgeRuntimeError(f"--precision {args.precision}: choose fp32, low or fp32,low")
    if not args.budget > 0:
        raise EdgeRuntimeError(f"--budget {args.budget}: give a positive number of seconds")
    return engines, precisions


def _main(args, scratch: Path) -> int:
    engines, precisions = _options(args)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise EdgeRuntimeError(f"--json {args.json}: its directory does not exist")
    root, bundle, files = open_inputs(args.inputs, scratch)
    entries = bundle_entries(root, bundle, engines, precisions) if bundle else file_entries(files, engines,
                                                                                             precisions)
    if not entries:
        raise EdgeRuntimeError(f"nothing to time with the installed engines ({', '.join(engines)})")
    cores = pin(args.cores)
    device = fingerprint()
    log(f"device: {describe(device)}; running on CPUs {cores}, {args.threads} thread(s)")
    if device.emulated:
        log(f"warning: emulated ({device.emulation_evidence}): timings are not this CPU's latency")

    groups = _groups(entries) if args.low_memory else [entries]
    failed, ready, times, shared = [], [], {}, {"expected": None}
    start, state = time.perf_counter(), cpu_state()
    for n, group in enumerate(groups, 1):
        if len(groups) > 1:
            log(f"group {n}/{len(groups)}: {group[0].pair[0]} ({group[0].engine}, {group[0].precision})")
        got, got_times = time_group(group, args, failed, shared, args.budget / len(groups))
        ready += got
        times.update(got_times)
        for entry in group:
            entry.run = None  # --low-memory: the group's models go before the next group loads
    if not ready:
        for line in failed:
            print(f"edgeport-bench: error: {line}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    results = results_of(ready, times)
    board = BoardResults(
        schema=new_schema(), device=device, results=results, drift=drift(times, state, cpu_state()),
        run=Run(threads=args.threads, cores=cores, rounds=min(len(t) for t in times.values()), warmup=args.warmup,
                budget_s=args.budget, seconds=round(seconds, 2), peak_rss_mb=round(peak_rss_mb(), 1), date=now(),
                bundle=os.path.basename(os.path.normpath(args.inputs[0])) if bundle else "",
                model=bundle.model if bundle else "", baseline_form=bundle.baseline if bundle else entries[0].form))
    print(table(results))
    if board.drift:
        d = board.drift
        temps = f", {d.temp_c_start:.0f}→{d.temp_c_end:.0f} °C" if d.temp_c_start is not None else ""
        print(f"drift: last rounds {d.ratio:.3f}× the first{temps}" + ("  (throttling?)" if d.ratio > 1.05 else ""))
    print(f"{board.run.rounds} rounds in {seconds:.1f} s, peak RSS {board.run.peak_rss_mb:.0f} MB; "
          f"{describe(device)}")
    if args.json:
        write_results(args.json, board)
        log(f"wrote {args.json}")
    for line in failed:
        print(f"edgeport-bench: error: {line}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
